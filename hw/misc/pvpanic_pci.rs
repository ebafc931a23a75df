//! `pvpanic-pci` (QEMU's `hw/misc/pvpanic-pci.c`, 1b36:0011): the pvpanic register in
//! memory BAR 0. A guest write of 1 reports a panic: `GUEST_PANICKED` and the
//! `-action panic=` action.

use std::sync::Arc;

use qom::{type_init, Prop};

use crate::core::memory::MemoryRegion;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::misc::pvpanic::{PvPanic, PVPANIC_EVENTS};
use crate::pci::pci::{BarKind, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's `TYPE_PVPANIC_PCI_DEVICE`.
pub const TYPE_PVPANIC_PCI: &str = "pvpanic-pci";

/// QEMU's `PVPanicPCIState`.
#[derive(qom::Object)]
#[qom(name = TYPE_PVPANIC_PCI, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct PvPanicPci {
    #[parent]
    parent: PciDevice,
    #[property(default = PVPANIC_EVENTS, desc = "Events reported: 1 panicked, 2 crash loaded")]
    events: Prop<u8>,
}

type_init!(PvPanicPci);

impl DeviceImpl for PvPanicPci {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
}

impl PciDeviceImpl for PvPanicPci {
    const VENDOR_ID: u16 = 0x1b36;
    const DEVICE_ID: u16 = 0x0011;
    const REVISION: u8 = 1;
    const CLASS_ID: u16 = 0x0880;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let register = Arc::new(PvPanic {
            events: self.events.get(),
            machine: Arc::downgrade(ctx.machine()?),
        });
        // QEMU's region is 2 bytes; a memory BAR is at least 16.
        self.register_bar(0, BarKind::Mem32, MemoryRegion::new_io("pvpanic", 2, register))
    }
}
