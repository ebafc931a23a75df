//! QEMU-style command-line parsing (QEMU's `qemu-options.def` + `lookup_opt`).
//!
//! QEMU's options are single-dash long names (`-machine`, `-m`) that clap cannot express,
//! so they are parsed from a table, as QEMU does. `--name` is accepted for `-name`.

use std::fmt;

/// A command-line error: the option and its argument, then the reason, as QEMU prints them
/// (`qomvm: -device foo: 'foo' is not a valid device model name`).
#[derive(Debug)]
pub struct OptionError {
    /// `-device foo`, or empty for errors not tied to one option.
    pub location: String,
    /// The reason.
    pub message: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

impl std::error::Error for OptionError {}

impl OptionError {
    pub fn new(location: impl Into<String>, message: impl fmt::Display) -> Self {
        OptionError {
            location: location.into(),
            message: message.to_string(),
        }
    }
}

/// An option with where it was given, for error messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Located {
    pub option: &'static str,
    pub value: String,
}

impl Located {
    pub fn location(&self) -> String {
        match self.option {
            // A flag that stands for a machine option (its value is that option).
            "no-hpet" => "-no-hpet".to_string(),
            "watchdog-action" => format!(
                "-watchdog-action {}",
                self.value.strip_prefix("watchdog=").unwrap_or(&self.value)
            ),
            _ => format!("-{} {}", self.option, self.value),
        }
    }
    pub fn error(&self, message: impl fmt::Display) -> OptionError {
        OptionError::new(self.location(), message)
    }
}

/// Everything the command line asked for.
#[derive(Debug, Default)]
pub struct Options {
    pub machine: Vec<Located>,
    pub accel: Vec<Located>,
    pub enable_kvm: bool,
    pub cpu: Option<Located>,
    pub smp: Option<Located>,
    pub memory: Option<Located>,
    pub kernel: Option<Located>,
    /// `-bios FILE`: the firmware image.
    pub bios: Option<Located>,
    pub initrd: Option<Located>,
    pub append: Option<Located>,
    pub devices: Vec<Located>,
    /// `-drive`.
    pub drives: Vec<Located>,
    /// `-blockdev`.
    pub blockdevs: Vec<Located>,
    /// `-object`.
    pub objects: Vec<Located>,
    /// `-netdev`.
    pub netdevs: Vec<Located>,
    /// `-nic`.
    pub nics: Vec<Located>,
    /// `-net` (legacy: `nic`, `user`, `tap`, `none`).
    pub nets: Vec<Located>,
    pub globals: Vec<Located>,
    pub serial: Vec<Located>,
    /// `-parallel` (LPT1-LPT3 backends).
    pub parallel: Vec<Located>,
    /// `-debugcon` (each; QEMU allows one).
    pub debugcon: Vec<Located>,
    pub chardev: Vec<Located>,
    pub display: Option<Located>,
    /// `-vnc`: the last one given.
    pub vnc: Option<Located>,
    /// `-vga TYPE`: the last one given.
    pub vga: Option<Located>,
    pub nographic: bool,
    pub no_reboot: bool,
    pub no_shutdown: bool,
    /// `-action`, `-no-reboot` and `-no-shutdown` in command-line order (QEMU turns the
    /// last two into `-action reboot=shutdown` and `-action shutdown=pause`).
    pub actions: Vec<Located>,
    pub nodefaults: bool,
    pub name: Option<Located>,
    /// `-qmp`: QMP monitors.
    pub qmp: Vec<Located>,
    /// `-monitor`: human monitors.
    pub monitor: Vec<Located>,
    /// `-mon chardev=ID,mode=control|readline`: a monitor on a `-chardev`.
    pub mon: Vec<Located>,
    /// `-no-user-config`: read no configuration files (qomvm reads none anyway).
    pub no_user_config: bool,
    /// `-pidfile PATH`.
    pub pidfile: Option<Located>,
    /// `-daemonize`: detach once start-up has succeeded.
    pub daemonize: bool,
    /// `-uuid`.
    pub uuid: Option<Located>,
    /// `-overcommit mem-lock=on|off,cpu-pm=on|off`.
    pub overcommit: Vec<Located>,
    /// `-rtc base=utc,clock=host,driftfix=none`.
    pub rtc: Vec<Located>,
    /// `-usb`: the machine's USB controller (`usb=on`).
    pub usb: bool,
    /// `-usbdevice NAME`: a USB device by its legacy name (implies `-usb`).
    pub usbdevice: Vec<Located>,
    /// `-boot strict=on|off`.
    pub boot: Vec<Located>,
    /// `-smbios`, in order.
    pub smbios: Vec<Located>,
    /// `-add-fd fd=N,set=M[,opaque=S]`.
    pub add_fd: Vec<Located>,
    /// `-msg timestamp=on|off`.
    pub msg: Vec<Located>,
    /// `-audiodev driver=none,id=ID` (also as JSON).
    pub audiodev: Vec<Located>,
    /// `-incoming URI|defer`: wait for a migration stream instead of booting.
    pub incoming: Option<Located>,
    /// `-S`: do not start the vCPUs until the monitor's `cont`.
    pub start_paused: bool,
    /// `-sandbox`: the seccomp policy (on by default).
    pub sandbox: Option<Located>,
    /// `-qtest`: the qtest protocol's character device.
    pub qtest: Option<Located>,
    /// `-qtest-log`: where the qtest conversation is logged.
    pub qtest_log: Option<Located>,
    pub help: bool,
    pub version: bool,
}

/// How an option takes its argument.
#[derive(Clone, Copy)]
enum Arity {
    Flag,
    Value,
}

const OPTIONS: &[(&str, Arity)] = &[
    ("machine", Arity::Value),
    ("M", Arity::Value),
    ("accel", Arity::Value),
    ("enable-kvm", Arity::Flag),
    ("cpu", Arity::Value),
    ("smp", Arity::Value),
    ("m", Arity::Value),
    ("kernel", Arity::Value),
    ("bios", Arity::Value),
    ("initrd", Arity::Value),
    ("append", Arity::Value),
    ("device", Arity::Value),
    ("drive", Arity::Value),
    ("hda", Arity::Value),
    ("hdb", Arity::Value),
    ("hdc", Arity::Value),
    ("hdd", Arity::Value),
    ("cdrom", Arity::Value),
    ("fda", Arity::Value),
    ("fdb", Arity::Value),
    ("pflash", Arity::Value),
    ("mtdblock", Arity::Value),
    ("sd", Arity::Value),
    ("blockdev", Arity::Value),
    ("object", Arity::Value),
    ("netdev", Arity::Value),
    ("nic", Arity::Value),
    ("net", Arity::Value),
    ("global", Arity::Value),
    ("serial", Arity::Value),
    ("parallel", Arity::Value),
    ("debugcon", Arity::Value),
    ("chardev", Arity::Value),
    ("display", Arity::Value),
    ("vnc", Arity::Value),
    ("vga", Arity::Value),
    ("nographic", Arity::Flag),
    ("no-reboot", Arity::Flag),
    ("no-shutdown", Arity::Flag),
    ("watchdog-action", Arity::Value),
    ("action", Arity::Value),
    ("nodefaults", Arity::Flag),
    ("name", Arity::Value),
    ("qmp", Arity::Value),
    ("monitor", Arity::Value),
    ("mon", Arity::Value),
    ("no-user-config", Arity::Flag),
    ("pidfile", Arity::Value),
    ("daemonize", Arity::Flag),
    ("uuid", Arity::Value),
    ("overcommit", Arity::Value),
    ("rtc", Arity::Value),
    ("no-hpet", Arity::Flag),
    ("usb", Arity::Flag),
    ("usbdevice", Arity::Value),
    ("boot", Arity::Value),
    ("smbios", Arity::Value),
    ("add-fd", Arity::Value),
    ("msg", Arity::Value),
    ("audiodev", Arity::Value),
    ("S", Arity::Flag),
    ("incoming", Arity::Value),
    ("sandbox", Arity::Value),
    ("qtest", Arity::Value),
    ("qtest-log", Arity::Value),
    ("h", Arity::Flag),
    ("help", Arity::Flag),
    ("version", Arity::Flag),
];

/// The options `query-command-line-options` reports (QEMU lists its QemuOpts groups): each
/// with the parameters qomvm's parser for it accepts and their QAPI `CommandLineParameterType`;
/// an empty list means the option's parameters depend on what it creates (a device's, an
/// object's properties), as QEMU reports `-device` and `-object`.
pub const COMMAND_LINE_OPTIONS: &[(&str, &[(&str, &str)])] = &[
    ("accel", &[("accel", "string")]),
    (
        "add-fd",
        &[("fd", "number"), ("set", "number"), ("opaque", "string")],
    ),
    (
        "boot-opts",
        &[
            ("order", "string"),
            ("once", "string"),
            ("menu", "boolean"),
            ("splash", "string"),
            ("splash-time", "number"),
            ("reboot-timeout", "number"),
            ("strict", "boolean"),
        ],
    ),
    (
        "chardev",
        &[
            ("backend", "string"),
            ("id", "string"),
            ("path", "string"),
            ("append", "boolean"),
            ("size", "size"),
            ("fd", "string"),
            ("server", "boolean"),
            ("wait", "boolean"),
        ],
    ),
    ("device", &[]),
    ("drive", &[]),
    (
        "global",
        &[
            ("driver", "string"),
            ("property", "string"),
            ("value", "string"),
        ],
    ),
    ("machine", &[]),
    (
        "mon",
        &[
            ("chardev", "string"),
            ("mode", "string"),
            ("pretty", "boolean"),
            ("id", "string"),
        ],
    ),
    ("msg", &[("timestamp", "boolean")]),
    ("name", &[("guest", "string"), ("debug-threads", "boolean")]),
    ("netdev", &[]),
    ("object", &[]),
    (
        "overcommit",
        &[("mem-lock", "boolean"), ("cpu-pm", "boolean")],
    ),
    ("smbios", &[]),
    (
        "rtc",
        &[
            ("base", "string"),
            ("clock", "string"),
            ("driftfix", "string"),
        ],
    ),
    (
        "sandbox",
        &[
            ("enable", "boolean"),
            ("obsolete", "string"),
            ("elevateprivileges", "string"),
            ("spawn", "string"),
            ("resourcecontrol", "string"),
        ],
    ),
    (
        "smp-opts",
        &[
            ("cpus", "number"),
            ("sockets", "number"),
            ("dies", "number"),
            ("clusters", "number"),
            ("cores", "number"),
            ("threads", "number"),
            ("maxcpus", "number"),
        ],
    ),
    // QEMU's qemu_vnc_opts, less what qomvm refuses (`sasl`, `tls-creds`, `websocket`,
    // `reverse`, the authz objects, `power-control`, `head`).
    (
        "vnc",
        &[
            ("vnc", "string"),
            ("to", "number"),
            ("share", "string"),
            ("ipv4", "boolean"),
            ("ipv6", "boolean"),
            ("password", "boolean"),
            ("password-secret", "string"),
            ("audiodev", "string"),
            ("lossy", "boolean"),
            ("non-adaptive", "boolean"),
            ("lock-key-sync", "boolean"),
            ("key-delay-ms", "number"),
            ("display", "string"),
            ("connections", "number"),
        ],
    ),
];

/// The arguments as text: qomvm's options and file names are parsed as UTF-8, so an
/// argument that is not is refused in one line (`std::env::args` would panic on it).
pub fn args_from_os(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<Vec<String>, OptionError> {
    args.into_iter()
        .map(|arg| {
            arg.into_string().map_err(|arg| {
                OptionError::new(
                    "",
                    format!("argument '{}' is not valid UTF-8", arg.to_string_lossy()),
                )
            })
        })
        .collect()
}

pub fn parse(args: &[String]) -> Result<Options, OptionError> {
    let mut opts = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(name) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            // QEMU treats a bare argument as the first disk (-hda).
            opts.drives.push(Located {
                option: "hda",
                value: arg.clone(),
            });
            continue;
        };
        let &(option, arity) = OPTIONS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| OptionError::new("", format!("{arg}: invalid option")))?;
        let value = match arity {
            Arity::Flag => String::new(),
            Arity::Value => it
                .next()
                .cloned()
                .ok_or_else(|| OptionError::new("", format!("{arg}: requires an argument")))?,
        };
        let located = Located { option, value };
        match option {
            "machine" | "M" => opts.machine.push(Located {
                option: "machine",
                ..located
            }),
            "accel" => opts.accel.push(located),
            "enable-kvm" => opts.enable_kvm = true,
            "cpu" => opts.cpu = Some(located),
            "smp" => opts.smp = Some(located),
            "m" => opts.memory = Some(located),
            "kernel" => opts.kernel = Some(located),
            "bios" => opts.bios = Some(located),
            "initrd" => opts.initrd = Some(located),
            "append" => opts.append = Some(located),
            "device" => opts.devices.push(located),
            "drive" => opts.drives.push(located),
            // QEMU's shorthands for IDE drives (`drive_add(IF_DEFAULT, index, file, ...)`):
            // -drive's work, in their own words (see `blockdev::drive_add`).
            "hda" | "hdb" | "hdc" | "hdd" | "cdrom" | "fda" | "fdb" => opts.drives.push(located),
            "pflash" => {
                return Err(located.error(
                    "flash drives are not supported (qomvm has no pflash device): load firmware with -bios",
                ))
            }
            // QEMU's pc has neither: drive_new's words.
            "mtdblock" | "sd" => {
                let interface = if located.option == "sd" { "sd" } else { "mtd" };
                return Err(located.error(format!(
                    "machine type does not support if={interface},bus=0,unit=0"
                )));
            }
            "blockdev" => opts.blockdevs.push(located),
            "object" => opts.objects.push(located),
            "netdev" => opts.netdevs.push(located),
            "nic" => opts.nics.push(located),
            "net" => opts.nets.push(located),
            "global" => opts.globals.push(located),
            "serial" => opts.serial.push(located),
            "parallel" => opts.parallel.push(located),
            "debugcon" => opts.debugcon.push(located),
            "chardev" => opts.chardev.push(located),
            "display" => opts.display = Some(located),
            "vnc" => opts.vnc = Some(located),
            "vga" => opts.vga = Some(located),
            "nographic" => opts.nographic = true,
            "no-reboot" => {
                opts.no_reboot = true;
                opts.actions.push(Located {
                    option: "no-reboot",
                    value: "reboot=shutdown".into(),
                });
            }
            "no-shutdown" => {
                opts.no_shutdown = true;
                opts.actions.push(Located {
                    option: "no-shutdown",
                    value: "shutdown=pause".into(),
                });
            }
            "action" => opts.actions.push(located),
            // QEMU's -watchdog-action is `-action watchdog=`.
            "watchdog-action" => opts.actions.push(Located {
                option: "watchdog-action",
                value: format!("watchdog={}", located.value),
            }),
            "nodefaults" => opts.nodefaults = true,
            "name" => opts.name = Some(located),
            "qmp" => opts.qmp.push(located),
            "monitor" => opts.monitor.push(located),
            "mon" => opts.mon.push(located),
            "no-user-config" => opts.no_user_config = true,
            "pidfile" => opts.pidfile = Some(located),
            "daemonize" => opts.daemonize = true,
            "uuid" => opts.uuid = Some(located),
            "overcommit" => opts.overcommit.push(located),
            "rtc" => opts.rtc.push(located),
            // QEMU puts `hpet=off` among the machine options, in command-line order.
            "no-hpet" => opts.machine.push(Located {
                option: "no-hpet",
                value: "hpet=off".to_string(),
            }),
            "usb" => opts.usb = true,
            "usbdevice" => opts.usbdevice.push(located),
            "boot" => opts.boot.push(located),
            "smbios" => opts.smbios.push(located),
            "add-fd" => opts.add_fd.push(located),
            "msg" => opts.msg.push(located),
            "audiodev" => opts.audiodev.push(located),
            "S" => opts.start_paused = true,
            "incoming" => opts.incoming = Some(located),
            "sandbox" => opts.sandbox = Some(located),
            "qtest" => opts.qtest = Some(located),
            "qtest-log" => opts.qtest_log = Some(located),
            "h" | "help" => opts.help = true,
            "version" => opts.version = true,
            _ => unreachable!("every table entry is matched above"),
        }
    }
    Ok(opts)
}

/// [`split_opts`], or the members of a JSON object when `text` is one (`-device
/// {"driver":...}` as libvirt writes it): `implied` comes first, booleans read `on`/`off`.
pub fn split_opts_or_json(
    text: &str,
    implied: &str,
) -> Result<Vec<(String, Option<String>)>, String> {
    if !text.trim_start().starts_with('{') {
        return Ok(split_opts(text, Some(implied)));
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = value
        .as_object()
        .ok_or_else(|| "Invalid parameter type, expected: object".to_string())?;
    let mut items = Vec::with_capacity(map.len());
    let mut first = None;
    for (k, v) in map {
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => {
                return Err(format!(
                    "Invalid parameter type for '{k}', expected: string"
                ))
            }
        };
        if k == implied {
            first = Some((k.clone(), Some(text)));
        } else {
            items.push((k.clone(), Some(text)));
        }
    }
    let first = first.ok_or_else(|| format!("Parameter '{implied}' is missing"))?;
    items.insert(0, first);
    Ok(items)
}

/// Splits a QEMU option string `a,b=c,d=e,,f` into `(key, value)` pairs; the first bare word
/// gets `implied` as its key (`-device isa-serial,...` -> driver). `,,` is a literal comma.
pub fn split_opts(text: &str, implied: Option<&str>) -> Vec<(String, Option<String>)> {
    let mut items = Vec::new();
    let raw = hw::core::qemu_opts::split_commas(text);
    for (i, item) in raw.into_iter().enumerate() {
        match item.split_once('=') {
            Some((k, v)) => items.push((k.to_string(), Some(v.to_string()))),
            None if i == 0 && implied.is_some() => {
                items.push((implied.unwrap_or_default().to_string(), Some(item)))
            }
            None => items.push((item, None)),
        }
    }
    items
}

/// What [`keyval_nest`] does with a key given twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RepeatedKey {
    /// The last value counts (QEMU's `keyval_parse`).
    LastWins,
    /// "Parameter 'KEY' appears more than once".
    Refused,
}

/// QEMU's `keyval_parse` nesting: dotted keys (`file.driver=file`) become nested objects,
/// every value a string; a key that is both a value and an object is refused in QEMU's
/// words.
pub(crate) fn keyval_nest(
    pairs: impl IntoIterator<Item = (String, String)>,
    repeated: RepeatedKey,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    use serde_json::{Map, Value};
    let conflict = |path: &str| format!("Parameters '{path}.*' conflict with parameter '{path}'");
    let mut root = Map::new();
    for (key, value) in pairs {
        let (parents, last) = match key.rsplit_once('.') {
            Some((parents, last)) => (Some(parents), last),
            None => (None, key.as_str()),
        };
        let mut node = &mut root;
        let mut path_len = 0;
        for part in parents.into_iter().flat_map(|p| p.split('.')) {
            path_len += part.len() + usize::from(path_len > 0);
            node = node
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .ok_or_else(|| conflict(&key[..path_len]))?;
        }
        match node.get(last) {
            Some(Value::Object(_)) => return Err(conflict(&key)),
            Some(_) if repeated == RepeatedKey::Refused => {
                return Err(format!("Parameter '{key}' appears more than once"))
            }
            _ => {}
        }
        node.insert(last.to_string(), Value::String(value));
    }
    Ok(root)
}

/// QEMU's `qemu_strtou64` with base 0 over the whole text: decimal, `0x` hex, `0` octal;
/// a leading `-` negates modulo 2^64 (as strtoull does).
pub(crate) fn strtou64(text: &str) -> Option<u64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    Some(if negative {
        value.wrapping_neg()
    } else {
        value
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keyval_nest_nests_dotted_keys_and_refuses_conflicts_in_qemus_words() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let map = keyval_nest(
            pairs(&[("a.b.c", "1"), ("a.b.d", "2"), ("a.e", "3"), ("f", "4")]),
            RepeatedKey::Refused,
        )
        .unwrap();
        assert_eq!(
            serde_json::Value::Object(map),
            serde_json::json!({"a": {"b": {"c": "1", "d": "2"}, "e": "3"}, "f": "4"})
        );
        for (list, message) in [
            (
                &[("a.b", "1"), ("a.b.c", "2")][..],
                "Parameters 'a.b.*' conflict with parameter 'a.b'",
            ),
            (
                &[("a.b.c", "1"), ("a.b", "2")][..],
                "Parameters 'a.b.*' conflict with parameter 'a.b'",
            ),
            (
                &[("x", "1"), ("x", "2")][..],
                "Parameter 'x' appears more than once",
            ),
        ] {
            assert_eq!(
                keyval_nest(pairs(list), RepeatedKey::Refused).unwrap_err(),
                message
            );
        }
        let last = keyval_nest(pairs(&[("x.y", "1"), ("x.y", "2")]), RepeatedKey::LastWins);
        assert_eq!(
            serde_json::Value::Object(last.unwrap()),
            serde_json::json!({"x": {"y": "2"}})
        );
    }

    /// Found by `tests/fuzz_cli.rs`: a non-UTF-8 argument made `std::env::args` panic.
    #[test]
    fn an_argument_that_is_not_utf8_is_a_one_line_error() {
        use std::os::unix::ffi::OsStringExt;
        let bad = std::ffi::OsString::from_vec(b"id=c0\x93".to_vec());
        let err = args_from_os([std::ffi::OsString::from("-chardev"), bad]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "argument 'id=c0\u{fffd}' is not valid UTF-8"
        );
        assert_eq!(
            args_from_os([std::ffi::OsString::from("-M")]).unwrap(),
            vec!["-M".to_string()]
        );
    }

    #[test]
    fn options_parse_with_one_or_two_dashes() {
        let o = parse(&args(&[
            "-M",
            "pc",
            "--no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4",
        ]))
        .unwrap();
        assert_eq!(o.machine[0].value, "pc");
        assert!(o.no_reboot);
        assert_eq!(
            o.devices[0].location(),
            "-device isa-debug-exit,iobase=0xf4"
        );
    }

    #[test]
    fn unknown_and_incomplete_options_are_errors() {
        assert_eq!(
            parse(&args(&["-bogus"])).unwrap_err().to_string(),
            "-bogus: invalid option"
        );
        assert_eq!(
            parse(&args(&["-m"])).unwrap_err().to_string(),
            "-m: requires an argument"
        );
    }

    #[test]
    fn option_strings_split_like_qemu_opts() {
        assert_eq!(
            split_opts("isa-serial,id=s0,path=a,,b", Some("driver")),
            vec![
                ("driver".to_string(), Some("isa-serial".to_string())),
                ("id".to_string(), Some("s0".to_string())),
                ("path".to_string(), Some("a,b".to_string())),
            ]
        );
        assert_eq!(
            split_opts("help", Some("type"))[0],
            ("type".to_string(), Some("help".to_string()))
        );
        assert_eq!(
            split_opts("pc,usb", Some("type"))[1],
            ("usb".to_string(), None)
        );
    }
}
