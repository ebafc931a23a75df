//! The ISA bus (QEMU's `hw/isa/isa-bus.c`): ISA devices register their ports in the
//! machine's `system-io` address space through it.

use std::sync::Arc;

use parking_lot::Mutex;
use qom::{type_init, Error, Object, ObjectClass, ObjectRef};

use crate::core::bus::{qbus_new, TYPE_BUS};
use crate::core::irq::IrqLine;
use crate::core::memory::{AddressSpace, MemoryError, MemoryRegion};
use crate::core::qdev::{device_class_mut, DeviceMethods, TYPE_DEVICE};

/// QEMU's `TYPE_ISA_BUS`.
pub const TYPE_ISA_BUS: &str = "ISA";
/// QEMU's `TYPE_ISA_DEVICE`.
pub const TYPE_ISA_DEVICE: &str = "isa-device";

/// The ISA bus's state: the I/O space its devices' ports go into, and its 16 IRQ lines.
#[derive(Default)]
pub struct IsaBus {
    io: Mutex<Option<Arc<AddressSpace>>>,
    irqs: Mutex<Vec<IrqLine>>,
}

/// Number of ISA interrupt lines.
pub const ISA_NUM_IRQS: usize = 16;

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

/// QEMU's `isa_bus_register_input_irqs`: connects the bus's IRQ lines (the board does, to
/// the interrupt controller).
pub fn isa_bus_set_irqs(bus: &Object, irqs: Vec<IrqLine>) {
    if let Some(state) = bus.downcast::<IsaBus>() {
        *state.irqs.lock() = irqs;
    }
}

/// QEMU's `isa_get_irq`: ISA IRQ `n` of the bus `dev` is plugged into; a disconnected line
/// when the device is on no bus or the board connected none.
pub fn isa_get_irq(dev: &Object, n: usize) -> IrqLine {
    dev.parent_bus()
        .and_then(|bus| bus.downcast::<IsaBus>().and_then(|s| s.irqs.lock().get(n).cloned()))
        .unwrap_or_default()
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
