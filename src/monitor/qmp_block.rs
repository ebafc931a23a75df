//! Removable media and block nodes at run time (QEMU's `block/qapi-sysemu.c` and
//! `blockdev.c`): `eject`, `blockdev-open-tray`, `blockdev-close-tray`,
//! `blockdev-remove-medium`, `blockdev-insert-medium`, `blockdev-change-medium`,
//! `blockdev-add` and `blockdev-del`, with QEMU's errors. libvirt's `change-media` is
//! open-tray, remove-medium, `blockdev-del`, `blockdev-add`, insert-medium, close-tray.

use std::sync::Arc;

use block::{BlockBackend, DetectZeroes};
use hw::core::removable_media::{change_media, RemovableMedia};
use serde_json::{json, Map, Value};

use crate::monitor::info::{device_by_qdev, removable_devices};
use crate::monitor::qapi::{QapiEnum, QmpError};

/// QEMU's `BlockdevChangeReadOnlyMode`.
pub const READ_ONLY_MODE: QapiEnum = QapiEnum {
    name: "BlockdevChangeReadOnlyMode",
    values: &["retain", "read-only", "read-write"],
};

/// The backend a command names (QEMU's `qmp_get_blk`).
enum Blk {
    /// A device with removable media.
    Removable(qom::ObjectRef),
    /// A device's drive that has no removable medium (a disk).
    Fixed,
    /// A named backend without a device (`-drive if=none`), with its medium if it has one.
    Deviceless(String, Option<Arc<BlockBackend>>),
}

impl Blk {
    fn media(&self) -> Option<&dyn RemovableMedia> {
        match self {
            Blk::Removable(dev) => dev.interface::<dyn RemovableMedia>(),
            _ => None,
        }
    }
}

fn failed(text: String) -> QmpError {
    QmpError::Failed(text)
}

fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str)
}

fn bool_arg(args: &Map<String, Value>, name: &str) -> bool {
    args.get(name).and_then(Value::as_bool).unwrap_or(false)
}

/// QEMU's `qmp_get_blk`: the backend `device` names, or the one of the device `id`
/// names; exactly one of them. Returns it with the name errors quote.
fn get_blk(device: Option<&str>, id: Option<&str>) -> Result<(Blk, String), QmpError> {
    match (device, id) {
        (Some(_), Some(_)) | (None, None) => {
            Err(failed("Need exactly one of 'device' and 'id'".into()))
        }
        (None, Some(id)) => {
            let dev = device_by_qdev(id).ok_or_else(|| QmpError::DeviceNotFound(id.into()))?;
            if !dev.is_a(hw::core::qdev::TYPE_DEVICE) {
                return Err(failed(format!("{id} is not a hotpluggable device")));
            }
            if dev.interface::<dyn RemovableMedia>().is_some() {
                return Ok((Blk::Removable(dev), id.to_string()));
            }
            let path = dev.canonical_path().unwrap_or_default();
            let has_drive = block::backends()
                .iter()
                .any(|b| b.attached_dev().is_some_and(|q| q == id || q == path));
            if !has_drive {
                return Err(failed("Device does not have a block device backend".into()));
            }
            Ok((Blk::Fixed, id.to_string()))
        }
        (Some(name), None) => {
            if !name.is_empty() {
                for (_, dev) in removable_devices() {
                    let named = dev
                        .interface::<dyn RemovableMedia>()
                        .is_some_and(|m| m.blk_name() == name);
                    if named {
                        return Ok((Blk::Removable(dev), name.to_string()));
                    }
                }
                if let Some(b) = block::backends().into_iter().find(|b| b.id() == name) {
                    let blk = match b.attached_dev() {
                        Some(_) => Blk::Fixed,
                        None => Blk::Deviceless(name.to_string(), Some(b)),
                    };
                    return Ok((blk, name.to_string()));
                }
                if block::unattached_empty_drives().iter().any(|d| d == name) {
                    return Ok((Blk::Deviceless(name.to_string(), None), name.to_string()));
                }
            }
            Err(QmpError::DeviceNotFound(name.to_string()))
        }
    }
}

/// How [`do_open_tray`] ended when it did not fail outright.
enum TrayOutcome {
    /// Open (or no tray to open).
    Open,
    /// The drive has no tray (QEMU's -ENOSYS, "Device '...' does not have a tray",
    /// which every caller ignores).
    NoTray,
    /// The guest was asked to open it (QEMU's -EINPROGRESS).
    Asked(QmpError),
}

/// QEMU's `do_open_tray`.
fn do_open_tray(blk: &Blk, name: &str, force: bool) -> Result<TrayOutcome, QmpError> {
    let Some(media) = blk.media() else {
        return match blk {
            Blk::Fixed => Err(failed(format!("Device '{name}' is not removable"))),
            _ => Ok(TrayOutcome::NoTray),
        };
    };
    if !media.has_tray() {
        return Ok(TrayOutcome::NoTray);
    }
    if media.is_tray_open() {
        return Ok(TrayOutcome::Open);
    }
    let locked = media.is_medium_locked();
    if locked {
        media.eject_request(force);
    }
    if !locked || force {
        change_media(media, false);
    }
    if locked && !force {
        return Ok(TrayOutcome::Asked(failed(format!(
            "Device '{name}' is locked and force was not specified, wait for tray to open and try again"
        ))));
    }
    Ok(TrayOutcome::Open)
}

/// `blockdev-open-tray`.
pub fn qmp_blockdev_open_tray(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let (blk, name) = get_blk(str_arg(args, "device"), str_arg(args, "id"))?;
    // Neither a missing tray nor a request to the guest is an error here.
    do_open_tray(&blk, &name, bool_arg(args, "force"))?;
    Ok(json!({}))
}

/// `blockdev-close-tray`.
pub fn qmp_blockdev_close_tray(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let (blk, name) = get_blk(str_arg(args, "device"), str_arg(args, "id"))?;
    close_tray(&blk, &name)?;
    Ok(json!({}))
}

fn close_tray(blk: &Blk, name: &str) -> Result<(), QmpError> {
    if matches!(blk, Blk::Fixed) {
        return Err(failed(format!("Device '{name}' is not removable")));
    }
    // Drives without a tray ignore it.
    if let Some(media) = blk.media().filter(|m| m.has_tray() && m.is_tray_open()) {
        change_media(media, true);
    }
    Ok(())
}

/// The throttle groups of removable-media drives whose medium was taken out, by the
/// device's QOM path, for the next medium: QEMU keeps the drive (its `BlockBackend`, in
/// qomvm the medium) in its group. They go with the device: a new one at the same path
/// does not inherit them.
static DRIVE_LIMITS: parking_lot::Mutex<
    std::collections::BTreeMap<String, (qom::WeakObjectRef, Arc<block::throttle::ThrottleGroup>)>,
> = parking_lot::Mutex::new(std::collections::BTreeMap::new());

/// QEMU's `blockdev_remove_medium`: the medium leaves the drive (closed if the drive
/// owned it, back to the monitor if it was a `-blockdev` node).
fn remove_medium(blk: &Blk, name: &str) -> Result<(), QmpError> {
    match blk {
        Blk::Fixed => Err(failed(format!("Device '{name}' is not removable"))),
        Blk::Removable(dev) => {
            let media = blk.media().expect("a removable device");
            if media.has_tray() && !media.is_tray_open() {
                return Err(failed(format!("Tray of device '{name}' is not open")));
            }
            if let Some(medium) = media.medium() {
                if let Some(group) = medium.throttle_group() {
                    let path = dev.canonical_path().unwrap_or_default();
                    let mut kept = DRIVE_LIMITS.lock();
                    kept.retain(|_, (owner, _)| owner.strong_count() > 0);
                    kept.insert(path, (Arc::downgrade(dev), group));
                }
                // The limits stay with the drive: the medium leaves without them, and a
                // command of the drive still waiting on them goes at once.
                medium.disable_io_limits();
            }
            media.remove_medium();
            if !media.has_tray() {
                change_media(media, false);
            }
            Ok(())
        }
        Blk::Deviceless(drive, medium) => {
            let Some(medium) = medium else {
                return Ok(());
            };
            if medium.is_blk_owned() {
                block::remove_backend(medium);
            }
            medium.set_id("");
            block::add_empty_drive(drive, None).map_err(|e| failed(e.to_string()))
        }
    }
}

/// `blockdev-remove-medium`.
pub fn qmp_blockdev_remove_medium(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let (blk, name) = get_blk(None, str_arg(args, "id"))?;
    remove_medium(&blk, &name)?;
    Ok(json!({}))
}

/// QEMU's `qmp_blockdev_insert_anon_medium`.
fn insert_medium(blk: &Blk, medium: Arc<BlockBackend>) -> Result<(), QmpError> {
    match blk {
        Blk::Fixed => Err(failed("Device is not removable".into())),
        Blk::Removable(dev) => {
            let media = blk.media().expect("a removable device");
            if media.has_tray() && !media.is_tray_open() {
                return Err(failed("Tray of the device is not open".into()));
            }
            if media.medium().is_some() {
                return Err(failed("There already is a medium in the device".into()));
            }
            media
                .insert_medium(medium.clone())
                .map_err(|e| failed(e.to_string()))?;
            let path = dev.canonical_path().unwrap_or_default();
            let kept = DRIVE_LIMITS.lock().remove(&path);
            if let Some((_, group)) =
                kept.filter(|(owner, _)| std::ptr::eq(owner.as_ptr(), Arc::as_ptr(dev)))
            {
                medium.join_throttle_group(group);
            }
            if !media.has_tray() {
                change_media(media, true);
            }
            Ok(())
        }
        Blk::Deviceless(_, Some(_)) => {
            Err(failed("There already is a medium in the device".into()))
        }
        Blk::Deviceless(drive, None) => {
            block::remove_empty_drive(drive);
            medium.set_id(drive);
            Ok(())
        }
    }
}

/// `blockdev-insert-medium`: the `-blockdev`/`blockdev-add` node `node-name` goes in.
pub fn qmp_blockdev_insert_medium(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let (blk, _) = get_blk(None, str_arg(args, "id"))?;
    let node_name = str_arg(args, "node-name").unwrap_or_default();
    let node = block::backends()
        .into_iter()
        .find(|b| b.node_name() == node_name)
        .ok_or_else(|| failed(format!("Node '{node_name}' not found")))?;
    if !node.id().is_empty() || node.attached_dev().is_some() {
        return Err(failed(format!("Node '{node_name}' is already in use")));
    }
    insert_medium(&blk, node)?;
    Ok(json!({}))
}

/// `blockdev-change-medium`: opens `filename`, then opens the tray, swaps the medium and
/// closes the tray.
pub fn qmp_blockdev_change_medium(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let (device, id) = (str_arg(args, "device"), str_arg(args, "id"));
    let (blk, name) = get_blk(device, id)?;
    let current = match &blk {
        Blk::Removable(_) => blk.media().and_then(|m| m.medium()),
        Blk::Deviceless(_, medium) => medium.clone(),
        Blk::Fixed => None,
    };
    // QEMU's root state: the medium's flags; a drive without one opens read-only.
    let read_only = match str_arg(args, "read-only-mode").unwrap_or("retain") {
        "read-only" => true,
        "read-write" => false,
        _ => current.as_ref().is_none_or(|m| m.is_read_only()),
    };
    let detect_zeroes = match current.as_ref().map(|m| m.options().detect_zeroes) {
        Some(DetectZeroes::Off) | None => DetectZeroes::Off,
        Some(_) => DetectZeroes::On,
    };
    let filename = str_arg(args, "filename").unwrap_or_default();
    let medium =
        crate::blockdev::open_medium(filename, str_arg(args, "format"), read_only, detect_zeroes)
            .map_err(failed)?;
    // In the table before anything moves: a name clash fails with the old medium in.
    let medium = block::add_backend(medium).map_err(|e| failed(e.to_string()))?;
    let swapped = (|| {
        match do_open_tray(&blk, &name, false)? {
            TrayOutcome::Asked(e) => return Err(e),
            TrayOutcome::Open | TrayOutcome::NoTray => {}
        }
        remove_medium(&blk, &name)?;
        // What the drive holds now (a drive without a device was looked up with its medium).
        let (blk, _) = get_blk(device, id)?;
        insert_medium(&blk, medium.clone())?;
        close_tray(&blk, &name)
    })();
    if swapped.is_err() {
        block::remove_backend(&medium);
    }
    swapped.map(|()| json!({}))
}

/// `eject`: opens the tray (`force`: even if the guest locked it) and takes the medium
/// out.
pub fn qmp_eject(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let (blk, name) = get_blk(str_arg(args, "device"), str_arg(args, "id"))?;
    match do_open_tray(&blk, &name, bool_arg(args, "force"))? {
        TrayOutcome::Asked(e) => return Err(e),
        TrayOutcome::Open | TrayOutcome::NoTray => {}
    }
    remove_medium(&blk, &name)?;
    Ok(json!({}))
}

/// `blockdev-add` at run time: the same node `-blockdev` makes.
pub fn qmp_blockdev_add(args: &Map<String, Value>) -> Result<Value, QmpError> {
    crate::blockdev::blockdev_add_map(args).map_err(failed)?;
    Ok(json!({}))
}

/// `blockdev-del`.
pub fn qmp_blockdev_del(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let node_name = str_arg(args, "node-name").unwrap_or_default();
    block::delete_node(node_name).map_err(|e| failed(e.to_string()))?;
    Ok(json!({}))
}

/// QEMU's `qmp_block_resize`: the image behind backend `device` or node `node-name` changes
/// to `size` bytes (`bdrv_lookup_bs`'s lookup and messages, then `blk_co_truncate`'s).
pub fn qmp_block_resize(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let device = str_arg(args, "device");
    let node_name = str_arg(args, "node-name");
    let size = crate::monitor::qapi::int_arg(args, "size")?.unwrap_or(-1);
    let mut backend = None;
    if let Some(name) = device {
        if let Some(b) = block::backends().into_iter().find(|b| b.id() == name) {
            backend = Some(b);
        } else if block::is_empty_drive(name) {
            return Err(failed(format!("Device '{name}' has no medium")));
        }
    }
    if backend.is_none() {
        if let Some(name) = node_name {
            backend = block::backends()
                .into_iter()
                .find(|b| b.node_name() == name);
        }
    }
    let Some(backend) = backend else {
        return Err(failed(format!(
            "Cannot find device='{}' nor node-name='{}'",
            device.unwrap_or(""),
            node_name.unwrap_or("")
        )));
    };
    let size = u64::try_from(size)
        .map_err(|_| failed("Parameter 'size' expects a >0 size".to_string()))?;
    backend.truncate(size).map_err(|e| failed(e.to_string()))?;
    Ok(Value::Object(Map::new()))
}

/// The backend `device` or `id` names, with its medium (QEMU's `qmp_get_blk` then
/// `blk_bs`): a drive without one is "Device has no medium".
fn blk_backend(device: Option<&str>, id: Option<&str>) -> Result<Arc<BlockBackend>, QmpError> {
    // libvirt names a disk by the path query-block reports as its `qdev`, which for a
    // virtio disk is the proxy's inner device (`.../virtio-backend`).
    if let (None, Some(id)) = (device, id) {
        let attached = block::backends()
            .into_iter()
            .find(|b| b.attached_dev().as_deref() == Some(id));
        if let Some(backend) = attached {
            return Ok(backend);
        }
    }
    let (blk, name) = get_blk(device, id)?;
    let medium = match blk {
        Blk::Removable(dev) => dev
            .interface::<dyn RemovableMedia>()
            .and_then(|m| m.medium()),
        Blk::Deviceless(_, backend) => backend,
        Blk::Fixed => {
            let path = id
                .and_then(device_by_qdev)
                .and_then(|d| d.canonical_path())
                .unwrap_or_default();
            block::backends().into_iter().find(|b| match id {
                Some(id) => b.attached_dev().is_some_and(|q| q == id || q == path),
                None => b.id() == name,
            })
        }
    };
    medium.ok_or_else(|| failed("Device has no medium".to_string()))
}

/// QEMU's `qmp_block_set_io_throttle`: the I/O limits of the drive `device` or of device
/// `id` (libvirt's `<iotune>` and `virsh blkdeviotune`, OpenStack's disk QoS). All zero
/// takes the drive out of its throttle group.
pub fn qmp_block_set_io_throttle(args: &Map<String, Value>) -> Result<Value, QmpError> {
    use block::throttle::{Bucket, ThrottleConfig};
    // Every number is a QAPI int: one beyond int64 is refused (QEMU's input visitor,
    // before the command looks the drive up), not read as no limit.
    for (name, value) in args {
        if value.is_number() {
            crate::monitor::qapi::int_arg(args, name)?;
        }
    }
    let backend = blk_backend(str_arg(args, "device"), str_arg(args, "id"))?;
    let int = |name: &str| args.get(name).and_then(Value::as_i64);
    let mut config = ThrottleConfig::default();
    // QAPI's int in QEMU's int64_t/uint64_t: a negative value is out of range, which the
    // validation says in its turn (after the conflicts).
    let rate = |v: i64| v as u64;
    for (bucket, avg, max, length) in [
        (Bucket::BpsTotal, "bps", "bps_max", "bps_max_length"),
        (Bucket::BpsRead, "bps_rd", "bps_rd_max", "bps_rd_max_length"),
        (
            Bucket::BpsWrite,
            "bps_wr",
            "bps_wr_max",
            "bps_wr_max_length",
        ),
        (Bucket::OpsTotal, "iops", "iops_max", "iops_max_length"),
        (
            Bucket::OpsRead,
            "iops_rd",
            "iops_rd_max",
            "iops_rd_max_length",
        ),
        (
            Bucket::OpsWrite,
            "iops_wr",
            "iops_wr_max",
            "iops_wr_max_length",
        ),
    ] {
        let b = config.bucket_mut(bucket);
        b.avg = rate(int(avg).unwrap_or(0));
        if let Some(max) = int(max) {
            b.max = rate(max);
        }
        if let Some(length) = int(length) {
            // QAPI's int stored in QEMU's uint64_t.
            b.burst_length = length as u64;
        }
    }
    if let Some(size) = int("iops_size") {
        config.op_size = size as u64;
    }
    config.validate().map_err(failed)?;
    let group = str_arg(args, "group");
    if config.enabled() {
        let name = group
            .or(str_arg(args, "device"))
            .or(str_arg(args, "id"))
            .unwrap_or_default();
        backend.set_io_limits(name, group.is_some(), config);
    } else {
        backend.disable_io_limits();
    }
    Ok(Value::Object(Map::new()))
}
