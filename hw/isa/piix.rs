//! PIIX3 (QEMU's `hw/isa/piix.c`): the PCI-to-ISA bridge at 00:01.0 (8086:7000) that owns
//! the ISA bus, whose IRQs reach the interrupt controller, and the reset control register at
//! port 0xcf9.

use crate::core::vmstate::{VmStateError, VmStateSection};
use std::sync::{Arc, Weak};

use qom::type_init;

use crate::core::irq::{GsiRouter, IrqLine};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::RunRequest;
use crate::core::services::MachineServices;
use crate::isa::isa_bus::{isa_bus_new, isa_bus_set_irqs, ISA_NUM_IRQS};
use crate::pci::pci::{PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's `TYPE_PIIX3_DEVICE`.
pub const TYPE_PIIX3: &str = "PIIX3";

/// QEMU's `PIIX3State`.
#[derive(qom::Object)]
#[qom(name = TYPE_PIIX3, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct Piix3 {
    #[parent]
    parent: PciDevice,
}

type_init!(Piix3);

/// The reset control register (RCR): a write with bit 2 set resets the machine.
struct ResetControl {
    machine: Weak<MachineServices>,
}

impl MemoryRegionOps for ResetControl {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        0
    }

    fn write(&self, _offset: u64, value: u64, _size: u32) {
        if value & 0x4 != 0 {
            if let Some(machine) = self.machine.upgrade() {
                machine.request(RunRequest::GuestReset);
            }
        }
    }
}

impl DeviceImpl for Piix3 {
    const DESCRIPTION: Option<&'static str> = Some("ISA bridge");
    const CATEGORY: DeviceCategory = DeviceCategory::Bridge;
    const USER_CREATABLE: bool = false;
    const HOTPLUGGABLE: bool = false;

    /// The configuration space: the reset control register keeps nothing, and the ISA
    /// interrupt levels live in the accelerator's interrupt controllers.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(1);
        self.parent.save_pci_state(&mut s);
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        self.parent.load_pci_state(state)
    }
}

impl PciDeviceImpl for Piix3 {
    const VENDOR_ID: u16 = 0x8086;
    const DEVICE_ID: u16 = 0x7000;
    const CLASS_ID: u16 = 0x0601;
    const MULTIFUNCTION: bool = true;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let bus = isa_bus_new(ctx.object(), "isa.0", services)?;
        let router = GsiRouter::new(services);
        let irqs = (0..ISA_NUM_IRQS as u32)
            .map(|n| IrqLine::new(router.clone(), n))
            .collect();
        isa_bus_set_irqs(&bus, irqs);
        let rcr = MemoryRegion::new_io(
            "piix-reset-control",
            1,
            Arc::new(ResetControl {
                machine: Arc::downgrade(services),
            }),
        );
        services.system_io().map(0xcf9, rcr)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bus::qbus_new;
    use crate::core::qdev::{qdev_new_typed, qdev_realize};
    use crate::pci::pci::TYPE_PCI_BUS;

    #[test]
    fn owns_isa_0_and_resets_through_0xcf9() {
        let services = Arc::new(MachineServices::default());
        let host = qom::object_new(qom::TYPE_CONTAINER).unwrap();
        let bus = qbus_new(TYPE_PCI_BUS, &host, "pci.0", &services).unwrap();
        let piix3 = qdev_new_typed::<Piix3>().unwrap();
        piix3.object().property_parse("addr", "01.0").unwrap();
        qdev_realize(piix3.object(), Some(&bus)).unwrap();
        assert!(piix3.object().child("isa.0").is_some());
        assert_eq!(piix3.read_config(0, 4), 0x7000_8086);
        assert_eq!(piix3.read_config(0x0e, 1), 0x80, "multi-function");
        let io = services.system_io();
        io.write(0xcf9, 0x02, 1);
        assert_eq!(services.vm().requests().take(), None);
        io.write(0xcf9, 0x06, 1);
        assert_eq!(
            services.vm().requests().take(),
            Some(RunRequest::GuestReset)
        );
    }
}
