//! PIIX3 (QEMU's `hw/isa/piix.c`): the PCI-to-ISA bridge at 00:01.0 (8086:7000) that owns
//! the ISA bus, whose IRQs reach the interrupt controller, and the reset control register at
//! port 0xcf9.

use std::sync::Arc;

use qom::{type_init, Error, Object, ObjectClass, WeakObjectRef};

use crate::core::irq::{GsiRouter, IrqLine};
use crate::core::machine::{machine_of, machine_state, RunRequest};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{device_class_mut, DeviceCategory};
use crate::isa::isa_bus::{isa_bus_new, isa_bus_set_irqs, ISA_NUM_IRQS};
use crate::pci::pci::{PciDeviceClass, TYPE_PCI_DEVICE};

/// QEMU's `TYPE_PIIX3_DEVICE`.
pub const TYPE_PIIX3: &str = "PIIX3";

/// The reset control register (RCR): a write with bit 2 set resets the machine.
struct ResetControl {
    machine: WeakObjectRef,
}

impl MemoryRegionOps for ResetControl {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        0
    }

    fn write(&self, _offset: u64, value: u64, _size: u32) {
        if value & 0x4 != 0 {
            if let Some(ms) = self.machine.upgrade().as_deref().and_then(machine_state) {
                ms.run_state().request(RunRequest::GuestReset);
            }
        }
    }
}

/// Realize errors of PIIX3.
#[derive(Debug, thiserror::Error)]
enum PiixError {
    #[error("PIIX3: not part of a machine")]
    NoMachine,
}

fn piix3_realize(dev: &Object) -> Result<(), Error> {
    let this = dev.to_ref().expect("a device being realized is alive");
    let machine = machine_of(dev).ok_or_else(|| Error::other(PiixError::NoMachine))?;
    let ms = machine_state(&machine).expect("machines have a MachineState");
    let bus = isa_bus_new(&this, "isa.0", ms.system_io().clone())?;
    let router = GsiRouter::new(&machine);
    let irqs = (0..ISA_NUM_IRQS as u32)
        .map(|n| IrqLine::new(router.clone(), n))
        .collect();
    isa_bus_set_irqs(&bus, irqs);
    let rcr = MemoryRegion::new_io(
        "piix-reset-control",
        1,
        Arc::new(ResetControl {
            machine: machine.downgrade(),
        }),
    );
    ms.system_io().map(0xcf9, rcr).map_err(Error::other)
}

fn piix3_class_init(class: &mut ObjectClass) {
    if let Some(pc) = class.get_mut::<PciDeviceClass>() {
        pc.vendor_id = 0x8086;
        pc.device_id = 0x7000;
        pc.class_id = 0x0601;
        pc.multifunction = true;
        pc.realize = Some(piix3_realize);
    }
    let dc = device_class_mut(class);
    dc.desc = Some("ISA bridge");
    dc.category = DeviceCategory::Bridge;
    dc.user_creatable = false;
}

type_init! {
    name: TYPE_PIIX3,
    parent: Some(TYPE_PCI_DEVICE),
    class_init: Some(piix3_class_init),
}
