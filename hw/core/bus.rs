//! qdev buses (QEMU's `hw/core/bus.c`): a bus is a child of the device that provides it
//! (`/machine/i440fx/pci.0`) and holds the devices plugged into it.

use parking_lot::Mutex;
use qom::{type_init, Object, ObjectRef};

/// QEMU's `TYPE_BUS`.
pub const TYPE_BUS: &str = "bus";

/// QEMU's `BusState`.
#[derive(Default)]
pub struct BusState {
    children: Mutex<Vec<ObjectRef>>,
}

type_init! {
    name: TYPE_BUS,
    parent: Some(qom::TYPE_OBJECT),
    abstract_: true,
    instance: Some(qom::InstanceSpec::of::<BusState>()),
}

fn state(bus: &Object) -> &BusState {
    bus.downcast::<BusState>()
        .expect("every bus instance has a BusState part")
}

pub(crate) fn bus_add_child(bus: &Object, dev: &ObjectRef) {
    state(bus).children.lock().push(dev.clone());
}

pub(crate) fn bus_remove_child(bus: &Object, dev: &Object) {
    state(bus)
        .children
        .lock()
        .retain(|c| !std::ptr::eq(&**c, dev));
}

/// QEMU's `qbus_new`: a bus of type `bus_type` named `name`, child of `parent`.
pub fn qbus_new(bus_type: &str, parent: &ObjectRef, name: &str) -> Result<ObjectRef, qom::Error> {
    let bus = qom::object_new(bus_type)?;
    parent.add_child(name, &bus)?;
    Ok(bus)
}

/// The devices plugged into `bus`, in plug order.
pub fn bus_children(bus: &Object) -> Vec<ObjectRef> {
    bus.downcast::<BusState>()
        .map(|s| s.children.lock().clone())
        .unwrap_or_default()
}

/// Finds the first bus of type `bus_type` under `root`, depth first in tree order (QEMU's
/// `qbus_find_recursive` for `-device` without `bus=`).
pub fn find_bus_by_type(root: &ObjectRef, bus_type: &str) -> Option<ObjectRef> {
    if root.is_a(bus_type) {
        return Some(root.clone());
    }
    root.children()
        .into_iter()
        .find_map(|(_, child)| find_bus_by_type(&child, bus_type))
}
