//! `device_add` and `device_del` (QEMU's `softmmu/qdev-monitor.c`): a device plugged into
//! the running machine, its bus's hotplug handler telling the guest; a device asked out,
//! gone once the guest lets it go (then `DEVICE_DELETED`).

use hw::core::qdev::{qdev_unplug, DeviceState, QdevError};
use qom::{object_get_root, resolve_path, ObjectRef};
use serde_json::{json, Map, Value};

use crate::monitor::qapi::{CommandCtx, QmpError};

fn qdev_error(e: QdevError) -> QmpError {
    match e {
        QdevError::Qom(e) => QmpError::Qom(e),
        e => QmpError::Failed(e.to_string()),
    }
}

/// QEMU's `qemu_opts_from_qdict` for `device_add`: `driver` first, then every member as
/// text (numbers in decimal, booleans `on`/`off`).
fn device_opts(args: &Map<String, Value>) -> Result<Vec<(String, Option<String>)>, QmpError> {
    let driver = args
        .get("driver")
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::MissingParameter("driver".into()))?;
    let mut items = vec![("driver".to_string(), Some(driver.to_string()))];
    for (key, value) in args.iter().filter(|(k, _)| k.as_str() != "driver") {
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            _ => {
                return Err(QmpError::InvalidParameterType {
                    name: key.clone(),
                    expected: "string",
                })
            }
        };
        items.push((key.clone(), Some(text)));
    }
    Ok(items)
}

/// Plugs in the device `items` describe while the machine runs.
pub fn device_add(
    machine: &ObjectRef,
    items: Vec<(String, Option<String>)>,
) -> Result<ObjectRef, QmpError> {
    if !crate::migration::is_idle() {
        return Err(QmpError::Failed(
            "device_add not allowed while migrating".into(),
        ));
    }
    crate::vl::qdev_device_add(machine, items, true).map_err(qdev_error)
}

/// QEMU's `qmp_device_add`.
pub fn qmp_device_add(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    device_add(&ctx.vm.machine, device_opts(args)?)?;
    Ok(json!({}))
}

/// QEMU's `find_device_state`: `id` is a device's `id=` or a QOM path.
pub fn find_device(machine: &ObjectRef, id: &str) -> Result<ObjectRef, QmpError> {
    let obj = if id.starts_with('/') {
        resolve_path(&object_get_root(), id).ok()
    } else {
        machine.child("peripheral").and_then(|p| p.child(id))
    };
    let obj = obj.ok_or_else(|| QmpError::DeviceNotFound(id.to_string()))?;
    if obj.downcast::<DeviceState>().is_none() {
        return Err(QmpError::Failed(format!(
            "{id} is not a hotpluggable device"
        )));
    }
    Ok(obj)
}

/// Asks the guest to let device `id` go.
pub fn device_del(machine: &ObjectRef, id: &str) -> Result<(), QmpError> {
    let dev = find_device(machine, id)?;
    if !crate::migration::is_idle() {
        return Err(QmpError::Failed(
            "device_del not allowed while migrating".into(),
        ));
    }
    qdev_unplug(&dev).map_err(qdev_error)
}

/// QEMU's `qmp_device_del`.
pub fn qmp_device_del(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
    device_del(&ctx.vm.machine, id)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_add_members_become_option_text() {
        let args: Map<String, Value> = serde_json::from_value(json!({
            "driver": "virtio-blk-pci", "id": "vd1", "addr": 5, "ioeventfd": false,
        }))
        .unwrap();
        let items = device_opts(&args).unwrap();
        assert_eq!(items[0], ("driver".into(), Some("virtio-blk-pci".into())));
        assert!(items.contains(&("addr".into(), Some("5".into()))));
        assert!(items.contains(&("ioeventfd".into(), Some("off".into()))));
        let nested: Map<String, Value> =
            serde_json::from_value(json!({"driver": "x", "drive": {"a": 1}})).unwrap();
        assert_eq!(
            device_opts(&nested).unwrap_err().to_string(),
            "Invalid parameter type for 'drive', expected: string"
        );
        let none: Map<String, Value> = serde_json::from_value(json!({"id": "x"})).unwrap();
        assert_eq!(
            device_opts(&none).unwrap_err().to_string(),
            "Parameter 'driver' is missing"
        );
    }
}
