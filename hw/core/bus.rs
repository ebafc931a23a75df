//! qdev buses (QEMU's `hw/core/bus.c`): a bus is a child of the device that provides it
//! (`/machine/i440fx/pci.0`) and holds the devices plugged into it.

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{type_init, Object, ObjectBase, ObjectRef, WeakObjectRef};

use crate::core::services::MachineServices;

/// QEMU's `TYPE_BUS`.
pub const TYPE_BUS: &str = "bus";

/// QEMU's `BusState`: the plugged devices, and the machine services the bus hands to them
/// at realize.
#[derive(qom::Object)]
#[qom(name = TYPE_BUS, abstract)]
pub struct BusState {
    #[parent]
    parent: ObjectBase,
    children: Mutex<Vec<ObjectRef>>,
    services: OnceLock<Arc<MachineServices>>,
    /// QEMU's `hotplug_handler` link: who plugs devices in while the machine runs.
    hotplug_handler: Mutex<Option<WeakObjectRef>>,
}

type_init!(BusState);

impl BusState {
    /// The services the bus's devices receive at realize.
    pub fn services(&self) -> Option<&Arc<MachineServices>> {
        self.services.get()
    }

    /// The devices plugged in, in plug order.
    pub fn children(&self) -> Vec<ObjectRef> {
        self.children.lock().clone()
    }

    /// QEMU's `qbus_set_hotplug_handler`: `handler` implements
    /// [`HotplugHandler`](crate::core::hotplug::HotplugHandler).
    pub fn set_hotplug_handler(&self, handler: Option<&ObjectRef>) {
        *self.hotplug_handler.lock() = handler.map(|h| h.downgrade());
    }

    /// The bus's hotplug handler, if it has one.
    pub fn hotplug_handler(&self) -> Option<ObjectRef> {
        self.hotplug_handler.lock().as_ref()?.upgrade()
    }

    /// QEMU's `qbus_is_hotpluggable`.
    pub fn is_hotpluggable(&self) -> bool {
        self.hotplug_handler().is_some()
    }
}

pub(crate) fn bus_add_child(bus: &Object, dev: &ObjectRef) {
    if let Some(st) = bus.downcast::<BusState>() {
        st.children.lock().push(dev.clone());
    }
}

pub(crate) fn bus_remove_child(bus: &Object, dev: &Object) {
    if let Some(st) = bus.downcast::<BusState>() {
        st.children.lock().retain(|c| !std::ptr::eq(&**c, dev));
    }
}

/// QEMU's `qbus_new`: a bus of type `bus_type` named `name`, child of `parent`, whose devices
/// receive `services` at realize.
pub fn qbus_new(
    bus_type: &str,
    parent: &ObjectRef,
    name: &str,
    services: &Arc<MachineServices>,
) -> Result<ObjectRef, qom::Error> {
    let bus = qom::object_new(bus_type)?;
    if let Some(st) = bus.downcast::<BusState>() {
        let _ = st.services.set(services.clone());
    }
    parent.add_child(name, &bus)?;
    Ok(bus)
}

/// The devices plugged into `bus`, in plug order.
pub fn bus_children(bus: &Object) -> Vec<ObjectRef> {
    bus.downcast::<BusState>()
        .map(BusState::children)
        .unwrap_or_default()
}

/// Finds the bus of type `bus_type` under `root` for a `-device` without `bus=` (QEMU's
/// `qbus_find_recursive`): depth first, newest child first, as QEMU's lists keep them (a
/// device's buses, devices on a bus). Of the PIIX3's `ide.0` and `ide.1` it is `ide.1`.
pub fn find_bus_by_type(root: &ObjectRef, bus_type: &str) -> Option<ObjectRef> {
    if root.is_a(bus_type) {
        return Some(root.clone());
    }
    root.children()
        .into_iter()
        .rev()
        .find_map(|(_, child)| find_bus_by_type(&child, bus_type))
}
