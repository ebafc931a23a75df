//! The ISA bus (QEMU's `hw/isa/isa-bus.c`): ISA devices register their ports in the
//! machine's `system-io` address space through it.

use std::sync::Arc;

use parking_lot::Mutex;
use qom::{type_init, Error, Object, ObjectClass, ObjectRef};

use crate::core::bus::{qbus_new, TYPE_BUS};
use crate::core::memory::{AddressSpace, MemoryError, MemoryRegion};
use crate::core::qdev::{device_class_mut, DeviceMethods, TYPE_DEVICE};

/// QEMU's `TYPE_ISA_BUS`.
pub const TYPE_ISA_BUS: &str = "ISA";
/// QEMU's `TYPE_ISA_DEVICE`.
pub const TYPE_ISA_DEVICE: &str = "isa-device";

/// The ISA bus's state: the I/O space its devices' ports go into.
#[derive(Default)]
pub struct IsaBus {
    io: Mutex<Option<Arc<AddressSpace>>>,
}

/// What an ISA device remembers of what it mapped, to unmap it on unrealize.
#[derive(Default)]
pub struct IsaDevice {
    ports: Mutex<Vec<Arc<MemoryRegion>>>,
}

type_init! {
    name: TYPE_ISA_BUS,
    parent: Some(TYPE_BUS),
    instance: Some(qom::InstanceSpec::of::<IsaBus>()),
}

fn isa_device_class_init(class: &mut ObjectClass) {
    let dc = device_class_mut(class);
    dc.bus_type = Some(TYPE_ISA_BUS);
    dc.unrealize = Some(isa_device_unrealize);
}

fn isa_device_unrealize(obj: &Object) {
    let Some(isa) = obj.downcast::<IsaDevice>() else { return };
    let io = obj.parent_bus().and_then(|bus| isa_bus_io(&bus));
    for region in isa.ports.lock().drain(..) {
        if let Some(io) = &io {
            io.unmap(&region);
        }
    }
}

type_init! {
    name: TYPE_ISA_DEVICE,
    parent: Some(TYPE_DEVICE),
    abstract_: true,
    class_init: Some(isa_device_class_init),
    instance: Some(qom::InstanceSpec::of::<IsaDevice>()),
}

/// QEMU's `isa_bus_new`: an ISA bus named `name` under `parent`, whose ports go to `io`.
pub fn isa_bus_new(parent: &ObjectRef, name: &str, io: Arc<AddressSpace>) -> Result<ObjectRef, Error> {
    let bus = qbus_new(TYPE_ISA_BUS, parent, name)?;
    *bus.downcast::<IsaBus>()
        .expect("ISA buses have an IsaBus part")
        .io
        .lock() = Some(io);
    Ok(bus)
}

fn isa_bus_io(bus: &Object) -> Option<Arc<AddressSpace>> {
    bus.downcast::<IsaBus>()?.io.lock().clone()
}

/// Errors of mapping ISA ports.
#[derive(Debug, thiserror::Error)]
pub enum IsaError {
    /// The device is not plugged into an ISA bus.
    #[error("device '{0}' is not on an ISA bus")]
    NoBus(&'static str),
    /// The ports overlap another device's.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// QEMU's `isa_register_ioport`: maps `region` at port `base` of the device's bus.
pub fn isa_register_ioport(dev: &Object, region: Arc<MemoryRegion>, base: u16) -> Result<(), IsaError> {
    let io = dev
        .parent_bus()
        .and_then(|bus| isa_bus_io(&bus))
        .ok_or(IsaError::NoBus(dev.type_name()))?;
    io.map(base.into(), region.clone())?;
    if let Some(isa) = dev.downcast::<IsaDevice>() {
        isa.ports.lock().push(region);
    }
    Ok(())
}
