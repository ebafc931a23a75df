//! `chardev-add` and `chardev-remove` (QEMU's `qmp_chardev_add`/`qmp_chardev_remove` in
//! `chardev/char.c`): backends made while the machine runs, for a device plugged in next
//! (libvirt's channel hotplug: `chardev-add` a socket, then `device_add virtserialport`).
//! The `ChardevBackend` union of QAPI: `null`, `ringbuf`/`memory`, `file`, `pty`, `socket`
//! (`unix`, `inet` or an `fd` the client passed with `getfd`).

use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::sync::Arc;

use hw::core::char_socket::{SocketBackend, SocketSpec, SocketTarget};
use hw::core::chardev::{
    chardev_add, chardev_find, chardev_remove_idle, CharBackend, ChardevError, FileBackend,
    NullBackend, Ringbuf,
};
use serde_json::{json, Map, Value};

use crate::monitor::qapi::{CommandCtx, QmpError};

/// QEMU's `qemu_chr_open_ringbuf` default size.
const RINGBUF_DEFAULT: u64 = 65536;

fn field<'a>(data: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    data.get(name)
}

fn string(data: &Map<String, Value>, member: &str) -> Result<Option<String>, QmpError> {
    match field(data, member) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(QmpError::InvalidParameterType {
            name: member.into(),
            expected: "string",
        }),
    }
}

fn boolean(data: &Map<String, Value>, member: &str) -> Result<Option<bool>, QmpError> {
    match field(data, member) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(QmpError::InvalidParameterType {
            name: member.into(),
            expected: "boolean",
        }),
    }
}

fn object<'a>(value: Option<&'a Value>, member: &str) -> Result<&'a Map<String, Value>, QmpError> {
    match value {
        Some(Value::Object(o)) => Ok(o),
        Some(_) => Err(QmpError::InvalidParameterType {
            name: member.into(),
            expected: "object",
        }),
        None => Err(QmpError::MissingParameter(member.into())),
    }
}

/// QAPI's `SocketAddressLegacy` of a socket backend.
fn socket_target(addr: &Map<String, Value>) -> Result<SocketTarget, QmpError> {
    let kind = string(addr, "type")?.ok_or_else(|| QmpError::MissingParameter("type".into()))?;
    let data = object(addr.get("data"), "data")?;
    match kind.as_str() {
        "unix" => {
            let path =
                string(data, "path")?.ok_or_else(|| QmpError::MissingParameter("path".into()))?;
            Ok(SocketTarget::Unix(PathBuf::from(path)))
        }
        "inet" => {
            let host =
                string(data, "host")?.ok_or_else(|| QmpError::MissingParameter("host".into()))?;
            let port =
                string(data, "port")?.ok_or_else(|| QmpError::MissingParameter("port".into()))?;
            let port = port.parse::<u16>().map_err(|_| {
                QmpError::Failed(format!(
                    "Parameter 'port' expects a port number, got '{port}'"
                ))
            })?;
            Ok(SocketTarget::Tcp(host, port))
        }
        "fd" => {
            let name =
                string(data, "str")?.ok_or_else(|| QmpError::MissingParameter("str".into()))?;
            let fd = crate::monitor::fds::take(&name).ok_or_else(|| {
                QmpError::Failed(format!("File descriptor named '{name}' has not been found"))
            })?;
            Ok(SocketTarget::Fd(fd.into_raw_fd()))
        }
        other => Err(QmpError::InvalidEnumValue {
            name: "type".into(),
            value: other.into(),
        }),
    }
}

/// The backend `backend` (`{"type": ..., "data": {...}}`) describes, opened.
fn open_backend(backend: &Map<String, Value>) -> Result<Arc<dyn CharBackend>, QmpError> {
    let kind = string(backend, "type")?.ok_or_else(|| QmpError::MissingParameter("type".into()))?;
    let empty = Map::new();
    let data = match backend.get("data") {
        None => &empty,
        value => object(value, "data")?,
    };
    let failed = |e: &dyn std::fmt::Display| QmpError::Failed(e.to_string());
    Ok(match kind.as_str() {
        "null" => Arc::new(NullBackend),
        "ringbuf" | "memory" => {
            let size = match field(data, "size") {
                None => RINGBUF_DEFAULT,
                Some(v) => v.as_u64().ok_or(QmpError::InvalidParameterType {
                    name: "size".into(),
                    expected: "integer",
                })?,
            };
            if !size.is_power_of_two() || size > u64::from(u32::MAX) {
                return Err(QmpError::Failed("ringbuf size must be power of two".into()));
            }
            Arc::new(Ringbuf::new(size as usize))
        }
        "file" => {
            if data.contains_key("in") {
                return Err(QmpError::Failed("input file not supported".into()));
            }
            let out =
                string(data, "out")?.ok_or_else(|| QmpError::MissingParameter("out".into()))?;
            let append = boolean(data, "append")?.unwrap_or(false);
            Arc::new(FileBackend::open(out, append).map_err(|e| failed(&e))?)
        }
        "pty" => Arc::new(hw::core::char_pty::PtyBackend::open().map_err(|e| failed(&e))?),
        "socket" => {
            for unsupported in [
                "tls-creds",
                "tls-authz",
                "websocket",
                "telnet",
                "tn3270",
                "reconnect",
            ] {
                if data.contains_key(unsupported) {
                    return Err(QmpError::Failed(format!(
                        "chardev-add: socket option '{unsupported}' is not supported by qomvm"
                    )));
                }
            }
            // QAPI's defaults for chardev-add: a server that does not wait.
            let server = boolean(data, "server")?.unwrap_or(true);
            if boolean(data, "wait")?.unwrap_or(false) {
                // It would hold this monitor until a client came.
                return Err(QmpError::Failed(
                    "chardev-add: 'wait' is not supported by qomvm (it would hold the monitor)"
                        .into(),
                ));
            }
            let nodelay = boolean(data, "nodelay")?.unwrap_or(false);
            // Last: a descriptor taken from the monitor is the backend's from here on.
            let target = socket_target(object(data.get("addr"), "addr")?)?;
            let passed = match target {
                SocketTarget::Fd(fd) => Some(fd),
                _ => None,
            };
            let spec = SocketSpec {
                target,
                server,
                wait: false,
                nodelay,
            };
            SocketBackend::open(spec).map_err(|e| {
                if let Some(fd) = passed {
                    // SAFETY: the descriptor was taken from the monitor's table above and
                    // nothing else owns it now that the backend refused it.
                    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
                }
                failed(&e)
            })?
        }
        other => {
            return Err(QmpError::InvalidEnumValue {
                name: "type".into(),
                value: other.into(),
            })
        }
    })
}

/// QEMU's `qmp_chardev_add`; a `pty` answers with its terminal's path.
pub fn qmp_chardev_add(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
    let backend = object(args.get("backend"), "backend")?;
    if chardev_find(id).is_some() || is_monitor_chardev(id) {
        return Err(QmpError::Failed(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    let chardev = open_backend(backend)?;
    let filename = chardev.filename();
    chardev_add(id, chardev).map_err(|e| QmpError::Failed(e.to_string()))?;
    Ok(match filename.strip_prefix("pty:") {
        Some(path) => json!({ "pty": path }),
        None => json!({}),
    })
}

/// QEMU's `qmp_chardev_remove`.
pub fn qmp_chardev_remove(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    remove(args.get("id").and_then(Value::as_str).unwrap_or_default())?;
    Ok(json!({}))
}

/// HMP's `chardev-add`: the argument is `-chardev`'s.
pub fn hmp_chardev_add(spec: &str) -> Result<(), QmpError> {
    // The id before the backend opens: a duplicate must not truncate a file or take over
    // a socket's path.
    let id = crate::options::split_opts(spec, None)
        .into_iter()
        .find(|(k, _)| k == "id")
        .and_then(|(_, v)| v);
    if let Some(id) = id.filter(|id| chardev_find(id).is_some() || is_monitor_chardev(id)) {
        return Err(QmpError::Failed(format!("Duplicate ID '{id}' for chardev")));
    }
    let chardev =
        hw::core::chardev::parse_chardev_opts(spec).map_err(|e| QmpError::Failed(e.to_string()))?;
    chardev
        .register()
        .map_err(|e| QmpError::Failed(e.to_string()))
}

/// A monitor's socket (`-mon chardev=ID`), which the monitor holds, not the registry.
fn is_monitor_chardev(id: &str) -> bool {
    crate::monitor::chardev::monitor_chardevs()
        .iter()
        .any(|(label, _)| label == id)
}

/// Removes chardev `id`: only one no device and no monitor uses.
pub fn remove(id: &str) -> Result<(), QmpError> {
    if is_monitor_chardev(id) {
        return Err(QmpError::Failed(format!("Chardev '{id}' is busy")));
    }
    chardev_remove_idle(id).map(drop).map_err(|e| match e {
        ChardevError::NotFound(_) => QmpError::Failed(format!("Chardev '{id}' not found")),
        _ => QmpError::Failed(format!("Chardev '{id}' is busy")),
    })
}
