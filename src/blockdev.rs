//! `-drive` and `-blockdev` (QEMU's `blockdev.c`): option strings to
//! [`block::OpenOptions`], with QEMU's errors, and the opened backends into the block
//! layer's table.

use block::{
    AioMode, BackingOption, BlockBackend, CacheMode, DetectZeroes, DiscardMode, Format, OpenOptions,
};
use serde_json::{Map, Value};

use crate::options::{keyval_nest, split_opts, Located, OptionError, RepeatedKey};

/// The `-drive` keys qomvm knows (QEMU's `qemu_common_drive_opts` and `qemu_legacy_drive_opts`
/// that apply).
const DRIVE_KEYS: &[&str] = &[
    "file",
    "format",
    "if",
    "id",
    "cache",
    "readonly",
    "discard",
    "detect-zeroes",
    "aio",
    "media",
    "index",
    "addr",
    "file.locking",
];

/// QEMU's `-drive` I/O limit keys: `throttling.*`, and the legacy names `drive_new` turns
/// into them.
fn throttle_key(key: &str) -> Option<String> {
    let legacy = [
        ("bps", "bps-total"),
        ("bps_rd", "bps-read"),
        ("bps_wr", "bps-write"),
        ("iops", "iops-total"),
        ("iops_rd", "iops-read"),
        ("iops_wr", "iops-write"),
        ("bps_max", "bps-total-max"),
        ("bps_rd_max", "bps-read-max"),
        ("bps_wr_max", "bps-write-max"),
        ("iops_max", "iops-total-max"),
        ("iops_rd_max", "iops-read-max"),
        ("iops_wr_max", "iops-write-max"),
        ("iops_size", "iops-size"),
        ("group", "group"),
    ];
    if let Some((_, name)) = legacy.iter().find(|(old, _)| *old == key) {
        return Some(format!("throttling.{name}"));
    }
    let name = key.strip_prefix("throttling.")?;
    let known = name == "iops-size" || name == "group" || {
        let base = name
            .strip_suffix("-max-length")
            .or_else(|| name.strip_suffix("-max"))
            .unwrap_or(name);
        [
            "bps-total",
            "bps-read",
            "bps-write",
            "iops-total",
            "iops-read",
            "iops-write",
        ]
        .contains(&base)
    };
    known.then(|| key.to_string())
}

/// Sets `-drive`'s I/O limit `key` (a `throttling.*` name) to `value` in `config`.
fn set_throttle(
    config: &mut block::throttle::ThrottleConfig,
    key: &str,
    value: &str,
) -> Result<(), String> {
    use block::throttle::Bucket;
    // QemuOpts' numbers: strtoull's, so "-1" wraps (and fails the range check).
    let number = value
        .parse::<u64>()
        .ok()
        .or_else(|| value.parse::<i64>().ok().map(|v| v as u64))
        .or_else(|| {
            value
                .strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
        })
        .ok_or_else(|| format!("Parameter '{key}' expects a number"))?;
    let name = &key["throttling.".len()..];
    if name == "iops-size" {
        config.op_size = number;
        return Ok(());
    }
    let (base, field) = if let Some(base) = name.strip_suffix("-max-length") {
        (base, 2)
    } else if let Some(base) = name.strip_suffix("-max") {
        (base, 1)
    } else {
        (name, 0)
    };
    let bucket = match base {
        "bps-total" => Bucket::BpsTotal,
        "bps-read" => Bucket::BpsRead,
        "bps-write" => Bucket::BpsWrite,
        "iops-total" => Bucket::OpsTotal,
        "iops-read" => Bucket::OpsRead,
        _ => Bucket::OpsWrite,
    };
    let b = config.bucket_mut(bucket);
    match field {
        0 => b.avg = number,
        1 => b.max = number,
        _ => b.burst_length = number,
    }
    Ok(())
}

/// Prints QEMU's `warning:` line.
fn warn(text: &str) {
    qom::error_report!("warning: {text}");
}

/// QemuOpts' boolean: `on`/`off` (and the historic `yes`/`no`, `true`/`false`).
fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

fn parse_discard(value: &str) -> Option<DiscardMode> {
    match value {
        "ignore" | "off" => Some(DiscardMode::Ignore),
        "unmap" | "on" => Some(DiscardMode::Unmap),
        _ => None,
    }
}

fn parse_aio(value: &str) -> Option<AioMode> {
    match value {
        "threads" => Some(AioMode::Threads),
        "native" => Some(AioMode::Native),
        "io_uring" => Some(AioMode::IoUring),
        _ => None,
    }
}

/// When a drive's device is created among the others, as QEMU creates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveDeviceTurn {
    /// With the board (`pc_init1` makes the IDE drives' devices).
    Board,
    /// After the key=value `-device`s (QEMU appends `if=virtio` devices to their list).
    AfterDevices,
}

/// The `-drive`s placed so far, by interface and index (QEMU's `drive_get`), to find a
/// drive's first free unit and its default id. An index is `bus * max_devs + unit` for
/// interfaces with buses (IDE), the unit for those without (`none`, `virtio`).
#[derive(Default)]
pub struct DriveTable {
    units: Vec<(String, u32)>,
}

impl DriveTable {
    fn contains(&self, interface: &str, index: u32) -> bool {
        self.units
            .iter()
            .any(|(i, u)| i == interface && *u == index)
    }
    /// The first index of `interface` no drive uses (QEMU's loop in `drive_new`).
    fn first_free_index(&self, interface: &str) -> u32 {
        (0..)
            .find(|&index| !self.contains(interface, index))
            .expect("fewer than 2^32 drives")
    }
}

/// QEMU's `default_drive(default_cdrom, ..., block_default_type, 2, CDROM_OPTS)`: an IDE
/// board without a drive at index 2 gets an empty CD drive there (`ide1-cd0`, the
/// secondary master), whose medium `change`/`blockdev-change-medium` can insert later.
/// The caller checks `-nodefaults` and the `-device`s that turn it off.
pub fn default_cdrom_add(
    default_interface: &str,
    ide_buses: u32,
    drives: &mut DriveTable,
) -> Result<Option<(Located, DriveDeviceTurn)>, OptionError> {
    if default_interface != "ide" || ide_buses < 2 || drives.contains(default_interface, 2) {
        return Ok(None);
    }
    let located = Located {
        option: "drive",
        value: "media=cdrom,index=2".to_string(),
    };
    drive_add(&located, default_interface, ide_buses, drives)
}

/// QEMU's `default_drive(default_floppy, ..., IF_FLOPPY, 0, FD_OPTS)`: an empty floppy
/// drive A: (`floppy0`) unless a floppy drive has index 0.
pub fn default_floppy_add(
    default_interface: &str,
    ide_buses: u32,
    drives: &mut DriveTable,
) -> Result<Option<(Located, DriveDeviceTurn)>, OptionError> {
    if drives.contains("floppy", 0) {
        return Ok(None);
    }
    let located = Located {
        option: "drive",
        value: "if=floppy,index=0".to_string(),
    };
    drive_add(&located, default_interface, ide_buses, drives)
}

/// What a `-hda`...`-cdrom` shorthand stands for (QEMU's `drive_add` with `HD_OPTS` or
/// `CDROM_OPTS`); any other option's value as given.
fn drive_text(located: &Located) -> String {
    // QEMU's FD_OPTS: a floppy drive at the shorthand's index.
    if let Some(index) = match located.option {
        "fda" => Some(0),
        "fdb" => Some(1),
        _ => None,
    } {
        return format!(
            "file={},index={index},if=floppy",
            located.value.replace(',', ",,")
        );
    }
    let index = match located.option {
        "hda" => 0,
        "hdb" => 1,
        "hdc" => 2,
        "hdd" => 3,
        "cdrom" => 2,
        _ => return located.value.clone(),
    };
    let media = if located.option == "cdrom" {
        "cdrom"
    } else {
        "disk"
    };
    format!(
        "file={},index={index},media={media}",
        located.value.replace(',', ",,")
    )
}

/// Drives per bus of an interface (QEMU's `if_max_devs`): 2 for IDE's master and slave,
/// unlimited (0) for the others that qomvm knows.
fn max_devs(interface: &str) -> u32 {
    if interface == "ide" {
        2
    } else {
        0
    }
}

/// QEMU's `drive_new` for one `-drive` (or `-hda`...`-cdrom`): opens the image and adds
/// the backend. A drive without `if=` gets the machine's `default_interface` (QEMU's
/// `block_default_type`); `if=ide` drives go on the board's `ide_buses`. For `if=virtio`
/// and `if=ide` it returns the `-device` QEMU adds
/// for the drive (`virtio-blk-pci`; `ide-hd` or `ide-cd` on `ide.BUS`), to be created with
/// the other devices, and when.
pub fn drive_add(
    located: &Located,
    default_interface: &str,
    ide_buses: u32,
    drives: &mut DriveTable,
) -> Result<Option<(Located, DriveDeviceTurn)>, OptionError> {
    let err = |m: String| located.error(m);
    let mut file = None;
    let mut format = None;
    let mut interface = None;
    let mut index = None;
    let mut id = None;
    let mut addr = None;
    let mut cdrom = false;
    let mut opts = OpenOptions::new("");
    let mut throttle = block::throttle::ThrottleConfig::default();
    let mut throttle_group = None;
    for (key, value) in split_opts(&drive_text(located), Some("file")) {
        if let Some(key) = throttle_key(&key) {
            let value = value.unwrap_or_default();
            if key == "throttling.group" {
                throttle_group = Some(value);
            } else {
                set_throttle(&mut throttle, &key, &value).map_err(err)?;
            }
            continue;
        }
        if !DRIVE_KEYS.contains(&key.as_str()) {
            return Err(err(format!("Invalid parameter '{key}'")));
        }
        let value = value.unwrap_or_else(|| "on".to_string());
        match key.as_str() {
            "file" => file = Some(value),
            "format" => {
                format = Some(
                    Format::from_name(&value)
                        .ok_or_else(|| err(format!("Unknown driver '{value}'")))?,
                )
            }
            "if" => interface = Some(value),
            "id" => id = Some(value),
            "addr" => addr = Some(value),
            "cache" => {
                opts.cache = CacheMode::from_name(&value)
                    .ok_or_else(|| err("invalid cache option".to_string()))?
            }
            "readonly" => opts.read_only = parse_bool("readonly", &value).map_err(err)?,
            "discard" => {
                opts.discard =
                    parse_discard(&value).ok_or_else(|| err("Invalid discard option".into()))?
            }
            "aio" => {
                opts.aio = parse_aio(&value).ok_or_else(|| err("invalid aio option".into()))?
            }
            // QEMU's -drive takes `unmap` without `discard=unmap` (it then acts as `on`).
            "detect-zeroes" => {
                opts.detect_zeroes = DetectZeroes::from_name(&value)
                    .ok_or_else(|| err(format!("invalid parameter value: {value}")))?
            }
            // The file node's `locking=` (QEMU's -drive passes `file.*` down to it).
            "file.locking" => {
                opts.locking = match value.as_str() {
                    "on" | "auto" => true,
                    "off" => false,
                    _ => return Err(err(format!("invalid parameter value: {value}"))),
                }
            }
            "media" if value == "disk" || value == "cdrom" => cdrom = value == "cdrom",
            "media" => return Err(err(format!("'{value}' invalid media"))),
            "index" => {
                index = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| err("Parameter 'index' expects a number".to_string()))?,
                )
            }
            _ => {}
        }
    }
    throttle.validate().map_err(err)?;
    let interface = interface.unwrap_or_else(|| default_interface.to_string());
    match interface.as_str() {
        "none" | "virtio" | "ide" | "floppy" => {}
        // QEMU's if=scsi makes an LSI 53C895A adapter, which qomvm does not have.
        "scsi" => {
            return Err(err(
                "if=scsi is not available: use if=none with -device virtio-scsi-pci and -device scsi-hd,drive=ID".to_string(),
            ))
        }
        "pflash" | "mtd" | "sd" | "xen" => {
            return Err(err(format!(
                "if={interface} is not available: use if=virtio or if=ide, or if=none with -device virtio-blk-pci,drive=ID"
            )))
        }
        other => return Err(err(format!("unsupported bus type '{other}'"))),
    }
    // QEMU's bus and unit: from `index=` (IDE has two units per bus), else the first free
    // index of the interface.
    let max_devs = max_devs(&interface);
    let index = index.unwrap_or_else(|| drives.first_free_index(&interface));
    let (bus, unit) = match (index.checked_div(max_devs), index.checked_rem(max_devs)) {
        (Some(bus), Some(unit)) => (bus, unit),
        _ => (0, index),
    };
    // QEMU's drive_check_orphaned: no controller of the board takes the drive.
    if interface == "ide" && bus >= ide_buses {
        return Err(err(format!(
            "machine type does not support if=ide,bus={bus},unit={unit}"
        )));
    }
    // The pc's floppy controller has two drives.
    if interface == "floppy" && (bus > 0 || unit >= 2) {
        return Err(err(format!(
            "machine type does not support if=floppy,bus={bus},unit={unit}"
        )));
    }
    if addr.is_some() && interface != "virtio" {
        return Err(err("addr is not supported by this bus type".to_string()));
    }
    if cdrom && interface != "ide" && interface != "none" {
        return Err(err(format!(
            "media=cdrom is not supported by if={interface}"
        )));
    }
    if drives.contains(&interface, index) {
        return Err(err(format!(
            "drive with bus={bus}, unit={unit} (index={index}) exists"
        )));
    }
    // QEMU names unnamed drives after their interface, bus, medium and unit (`none0`,
    // `virtio1`, `ide1-cd0`).
    let id = id.unwrap_or_else(|| match interface.as_str() {
        "ide" => format!("ide{bus}-{}{unit}", if cdrom { "cd" } else { "hd" }),
        _ => format!("{interface}{unit}"),
    });
    let turn = if interface == "virtio" {
        DriveDeviceTurn::AfterDevices
    } else {
        DriveDeviceTurn::Board
    };
    let device = match interface.as_str() {
        "ide" => Some(format!(
            "{},bus=ide.{bus},unit={unit}",
            if cdrom { "ide-cd" } else { "ide-hd" }
        )),
        "virtio" => Some("virtio-blk-pci".to_string()),
        "floppy" => Some(format!("floppy,unit={unit}")),
        _ => None,
    };
    drives.units.push((interface.clone(), index));
    if block::name_in_use(&id) {
        return Err(err(format!("Duplicate ID '{id}' for drive")));
    }
    let Some(file) = file else {
        // A CD or floppy drive without a medium (QEMU's drive without a root node), named
        // so that `eject`/`blockdev-change-medium device=ID` find it; other drives need
        // one.
        if !cdrom && interface != "floppy" {
            return Err(err("an empty drive (no file=) is not supported".to_string()));
        }
        block::add_empty_drive(&id, None).map_err(|e| err(e.to_string()))?;
        let Some(mut device) = device else {
            return Ok(None);
        };
        block::set_empty_drive_auto_connected(&id);
        device.push_str(&format!(",drive={}", id.replace(',', ",,")));
        return Ok(Some((
            Located {
                option: "device",
                value: device,
            },
            turn,
        )));
    };
    opts.filename = file.into();
    opts.format = format;
    // A CD is read-only whatever the drive says (QEMU's drive_new for media=cdrom).
    if cdrom {
        opts.read_only = true;
    }
    let backend = BlockBackend::open(&id, &block::auto_node_name(), opts, warn)
        .map_err(|e| err(e.to_string()))?;
    backend.set_blk_owned();
    if throttle.enabled() {
        // QEMU's blockdev_init: the group defaults to the drive's id.
        backend.set_io_limits(throttle_group.as_deref().unwrap_or(&id), false, throttle);
    }
    let backend = block::add_backend(backend).map_err(|e| err(e.to_string()))?;
    let Some(mut device) = device else {
        return Ok(None);
    };
    backend.set_auto_connected();
    // QEMU's drive_new and pci_ide_create_devs: the drive's device.
    device.push_str(&format!(",drive={}", id.replace(',', ",,")));
    if let Some(addr) = addr {
        device.push_str(&format!(",addr={}", addr.replace(',', ",,")));
    }
    Ok(Some((
        Located {
            option: "device",
            value: device,
        },
        turn,
    )))
}

/// `-blockdev`'s argument as a JSON object: JSON itself, or dotted keys (`file.driver=file`)
/// made nested, their values strings (QEMU's `keyval_parse`).
fn blockdev_args(text: &str) -> Result<Map<String, Value>, String> {
    if text.trim_start().starts_with('{') {
        return match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err("Invalid parameter type, expected: object".to_string()),
            Err(e) => Err(format!("JSON parse error, {e}")),
        };
    }
    let mut pairs = Vec::new();
    for (key, value) in split_opts(text, None) {
        match value {
            Some(value) => pairs.push((key, value)),
            None => return Err(format!("Expected '=' after parameter '{key}'")),
        }
    }
    keyval_nest(pairs, RepeatedKey::Refused)
}

/// A member as a string, whichever form it came in.
fn str_member(map: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<String>, String> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!(
            "Invalid parameter type for '{prefix}{key}', expected: string"
        )),
    }
}

/// A boolean member: JSON's true/false or keyval's on/off.
fn bool_member(map: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<bool>, String> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => match s.as_str() {
            "on" => Ok(Some(true)),
            "off" => Ok(Some(false)),
            _ => Err(format!("Parameter '{prefix}{key}' expects 'on' or 'off'")),
        },
        Some(_) => Err(format!(
            "Invalid parameter type for '{prefix}{key}', expected: boolean"
        )),
    }
}

/// The members every node takes (QAPI's `BlockdevOptions` base) besides `driver`.
const NODE_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "read-only",
    "cache",
    "discard",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
];

fn check_keys(map: &Map<String, Value>, prefix: &str, extra: &[&str]) -> Result<(), String> {
    match map
        .keys()
        .find(|k| !NODE_KEYS.contains(&k.as_str()) && !extra.contains(&k.as_str()))
    {
        Some(k) => Err(format!("Parameter '{prefix}{k}' is unexpected")),
        None => Ok(()),
    }
}

/// The members of a node shared by format and file nodes: read-only, cache, discard,
/// detect-zeroes.
fn node_common(
    map: &Map<String, Value>,
    prefix: &str,
    opts: &mut OpenOptions,
) -> Result<(), String> {
    match bool_member(map, prefix, "read-only")? {
        Some(ro) => opts.read_only = ro,
        // libvirt opens every file node so: read-only until a parent writes.
        None if map.get("driver").and_then(Value::as_str) == Some("file")
            && bool_member(map, prefix, "auto-read-only")? == Some(true) =>
        {
            opts.read_only = true;
            opts.auto_read_only = true;
        }
        None => {}
    }
    if let Some(cache) = map.get("cache") {
        let Value::Object(cache) = cache else {
            return Err(format!(
                "Invalid parameter type for '{prefix}cache', expected: object"
            ));
        };
        let cprefix = format!("{prefix}cache.");
        if let Some(k) = cache.keys().find(|k| *k != "direct" && *k != "no-flush") {
            return Err(format!("Parameter '{cprefix}{k}' is unexpected"));
        }
        let direct = bool_member(cache, &cprefix, "direct")?.unwrap_or(false);
        let no_flush = bool_member(cache, &cprefix, "no-flush")?.unwrap_or(false);
        opts.cache = match (direct, no_flush) {
            (true, _) => CacheMode::None,
            (false, true) => CacheMode::Unsafe,
            (false, false) => CacheMode::Writeback,
        };
    }
    if let Some(d) = str_member(map, prefix, "discard")? {
        opts.discard = parse_discard(&d)
            .ok_or_else(|| format!("Parameter '{prefix}discard' does not accept value '{d}'"))?;
    }
    if let Some(v) = str_member(map, prefix, "detect-zeroes")? {
        opts.detect_zeroes = DetectZeroes::from_name(&v).ok_or_else(|| {
            format!("Parameter '{prefix}detect-zeroes' does not accept value '{v}'")
        })?;
    }
    // QEMU's bdrv_open_common, for each node.
    if opts.detect_zeroes == DetectZeroes::Unmap && opts.discard != DiscardMode::Unmap {
        return Err(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
                .to_string(),
        );
    }
    Ok(())
}

/// The inline file node's `discard` and `detect-zeroes`, checked as QEMU checks each node.
/// Its `detect-zeroes` applies when the format node sets none (qomvm keeps one setting per
/// image).
fn file_node_common(file: &Map<String, Value>, opts: &mut OpenOptions) -> Result<(), String> {
    let mut file_opts = OpenOptions::new("");
    node_common(file, "file.", &mut file_opts)?;
    // O_DIRECT is the file's: `file.cache.direct=on` bypasses the host cache too.
    if file_opts.cache.direct() && !opts.cache.direct() {
        opts.cache = CacheMode::None;
    }
    if opts.detect_zeroes == DetectZeroes::Off {
        opts.detect_zeroes = match file_opts.detect_zeroes {
            // Unmapping at the file level needs the file's discard=unmap, checked above;
            // the image is discarded through the format node's setting.
            DetectZeroes::Unmap if opts.discard != DiscardMode::Unmap => DetectZeroes::On,
            other => other,
        };
    }
    Ok(())
}

/// `backing`: a node name, or null (JSON null; keyval's empty string, deprecated).
fn backing_member(map: &Map<String, Value>) -> Result<BackingOption, String> {
    match map.get("backing") {
        None => Ok(BackingOption::FromImage),
        Some(Value::Null) => Ok(BackingOption::Null),
        Some(Value::String(s)) if s.is_empty() => {
            warn("Use of \"backing\": \"\" is deprecated; use \"backing\": null instead");
            Ok(BackingOption::Null)
        }
        Some(Value::String(s)) => Ok(BackingOption::Node(s.clone())),
        Some(Value::Object(_)) => Err(
            "an inline 'backing' node is not supported: open it with its own -blockdev and give its node-name".to_string(),
        ),
        Some(_) => Err("Invalid parameter type for 'backing', expected: BlockdevRefOrNull".to_string()),
    }
}

/// The `file` protocol node's own members (`filename`, `aio`...) into `opts`.
fn file_node(map: &Map<String, Value>, prefix: &str, opts: &mut OpenOptions) -> Result<(), String> {
    check_keys(map, prefix, &["filename", "aio", "locking"])?;
    let filename = str_member(map, prefix, "filename")?
        .ok_or_else(|| format!("Parameter '{prefix}filename' is missing"))?;
    opts.filename = filename.into();
    if let Some(aio) = str_member(map, prefix, "aio")? {
        opts.aio = parse_aio(&aio)
            .ok_or_else(|| format!("Parameter '{prefix}aio' does not accept value '{aio}'"))?;
    }
    if let Some(l) = str_member(map, prefix, "locking")? {
        opts.locking = match l.as_str() {
            "on" | "auto" => true,
            "off" => false,
            _ => {
                return Err(format!(
                    "Parameter '{prefix}locking' does not accept value '{l}'"
                ))
            }
        };
    }
    Ok(())
}

/// QEMU's `-blockdev` (`qmp_blockdev_add`): a `file` node, or a `raw`/`qcow2` node over
/// an inline `file` node or a reference to a `file` node (`file=NODE`); a qcow2 node
/// takes `backing=NODE` or `"backing": null`.
pub fn blockdev_add(located: &Located) -> Result<(), OptionError> {
    let map = blockdev_args(&located.value).map_err(|m| located.error(m))?;
    blockdev_add_map(&map).map_err(|m| located.error(m))
}

/// QEMU's `bdrv_assign_node_name` checks: a drive's name, then a node's.
fn check_node_name(name: &str) -> Result<(), String> {
    if !qom::object_interfaces::id_wellformed(name) {
        return Err(format!("Invalid node-name: '{name}'"));
    }
    // QEMU's node_name[32], with its NUL.
    if name.len() >= 32 {
        return Err("Node name too long".to_string());
    }
    if block::is_drive_name(name) {
        return Err(format!("node-name={name} is conflicting with a device id"));
    }
    if block::name_in_use(name) {
        return Err(format!("Duplicate nodes with node-name='{name}'"));
    }
    Ok(())
}

/// QMP's `blockdev-add` (and `-blockdev`'s parsed argument): opens the node `map`
/// describes and adds it to the block layer's table.
pub fn blockdev_add_map(map: &Map<String, Value>) -> Result<(), String> {
    let err = |m: String| m;
    let driver = str_member(map, "", "driver")
        .map_err(err)?
        .ok_or_else(|| err("Parameter 'driver' is missing".into()))?;
    let node_name = str_member(map, "", "node-name")
        .map_err(err)?
        .ok_or_else(|| err("'node-name' must be specified for the root node".into()))?;
    check_node_name(&node_name)?;
    let mut opts = OpenOptions::new("");
    node_common(map, "", &mut opts).map_err(err)?;
    match driver.as_str() {
        "file" => {
            file_node(map, "", &mut opts).map_err(err)?;
            opts.format = Some(Format::Raw);
            opts.protocol_only = true;
        }
        "raw" | "qcow2" => {
            let extra: &[&str] = if driver == "qcow2" {
                &["file", "backing"]
            } else {
                &["file"]
            };
            check_keys(map, "", extra).map_err(err)?;
            opts.backing = backing_member(map).map_err(err)?;
            opts.format = Format::from_name(&driver);
            match map.get("file") {
                None => return Err(err("Parameter 'file' is missing".into())),
                Some(Value::Object(file)) => {
                    let fdriver = str_member(file, "file.", "driver")
                        .map_err(err)?
                        .ok_or_else(|| err("Parameter 'file.driver' is missing".into()))?;
                    if fdriver != "file" {
                        return Err(err(format!(
                            "Parameter 'file.driver' does not accept value '{fdriver}'"
                        )));
                    }
                    file_node(file, "file.", &mut opts).map_err(err)?;
                    file_node_common(file, &mut opts).map_err(err)?;
                    let file_name = str_member(file, "file.", "node-name").map_err(err)?;
                    if let Some(name) = &file_name {
                        if *name == node_name {
                            return Err(err(format!("Duplicate nodes with node-name='{name}'")));
                        }
                        check_node_name(name)?;
                    }
                    opts.file_node_name = file_name;
                }
                // A reference to an existing `driver=file` node.
                Some(Value::String(name)) => opts.file_ref = Some(name.clone()),
                Some(_) => {
                    return Err(err(
                        "Invalid parameter type for 'file', expected: BlockdevRef".into(),
                    ))
                }
            }
        }
        other => {
            return Err(err(format!(
                "Parameter 'driver' does not accept value '{other}'"
            )))
        }
    }
    let backend = BlockBackend::open("", &node_name, opts, warn).map_err(|e| e.to_string())?;
    block::add_backend(backend).map_err(|e| e.to_string())?;
    Ok(())
}

/// `blockdev-change-medium`'s new medium (QEMU's `bdrv_open` of `filename` with the
/// drive's flags): `format` or probed, read-only or not, owned by the drive.
pub fn open_medium(
    filename: &str,
    format: Option<&str>,
    read_only: bool,
    detect_zeroes: DetectZeroes,
) -> Result<BlockBackend, String> {
    let mut opts = OpenOptions::new(filename);
    opts.format = match format {
        Some(name) => {
            Some(Format::from_name(name).ok_or_else(|| format!("Unknown driver '{name}'"))?)
        }
        None => None,
    };
    opts.read_only = read_only;
    opts.detect_zeroes = detect_zeroes;
    let medium =
        BlockBackend::open("", &block::auto_node_name(), opts, warn).map_err(|e| e.to_string())?;
    medium.set_blk_owned();
    Ok(medium)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_keys_nest_like_keyval() {
        let map =
            blockdev_args("driver=qcow2,node-name=n0,file.driver=file,file.filename=a,,b").unwrap();
        assert_eq!(
            Value::Object(map),
            serde_json::json!({"driver": "qcow2", "node-name": "n0",
                "file": {"driver": "file", "filename": "a,b"}})
        );
        assert!(blockdev_args("file=x,file.driver=file").is_err());
    }
}
