//! ACPI PCI hotplug (QEMU's `hw/acpi/pcihp.c`, `docs/specs/acpi_pci_hotplug.rst`): the
//! register block at I/O port 0xae00 the DSDT's `PCNT` and `PCEJ` methods read and write.
//! A hotplugged device sets its slot's bit in PCIU, an unplug request its bit in PCID;
//! either raises GPE0 bit 1, whose `\_GPE._E01` notifies the slots (device check, eject
//! request). The guest answers an eject request by writing the slot's bit to B0EJ, which
//! removes the device. Only the root bus is served (bus selector 0): the pc machine has
//! no PCI bridges.
//!
//! | offset | name | |
//! | --- | --- | --- |
//! | 0x00 | PCIU | slots plugged since the last read (reading clears) |
//! | 0x04 | PCID | slots whose device the host asked to remove |
//! | 0x08 | B0EJ | write: eject the slots whose bits are set |
//! | 0x0c | PCRM | slots whose devices may be removed |
//! | 0x10 | BNUM | bus selector |

use std::sync::Arc;

use parking_lot::Mutex;
use qom::{Object, WeakObjectRef};

use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::MemoryRegionOps;
use crate::core::qdev::{device_class, qdev_unplug_complete, DeviceMethods};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::{pci_bus_devices, PciDevice};

/// Where the block is (QEMU's `ACPI_PCIHP_ADDR`).
pub const ACPI_PCIHP_ADDR: u16 = 0xae00;
/// Its length (QEMU's `ACPI_PCIHP_SIZE` without the ACPI index registers).
pub const ACPI_PCIHP_SIZE: u64 = 0x14;
/// The GPE0 status bit the block raises (QEMU's `ACPI_PCI_HOTPLUG_STATUS`).
pub const ACPI_PCI_HOTPLUG_STATUS: u16 = 1 << 1;

const PCI_UP: u64 = 0x00;
const PCI_DOWN: u64 = 0x04;
const PCI_EJ: u64 = 0x08;
const PCI_RMV: u64 = 0x0c;
const PCI_SEL: u64 = 0x10;

/// The root bus's selector (the DSDT's `BSEL` of `PCI0`).
pub const ROOT_BSEL: u32 = 0;

static GUEST_ERRORS: RateLimitedLog = RateLimitedLog::new(5);

#[derive(Default)]
struct Status {
    up: u32,
    down: u32,
    /// Slots whose devices may go (QEMU's `hotplug_enable`): those holding no device that
    /// cannot be unplugged.
    hotplug_enable: u32,
    select: u32,
}

/// Raises a GPE0 status bit (the PM block's SCI logic).
pub type GpeEvent = Box<dyn Fn(u16) + Send + Sync>;

/// QEMU's `AcpiPciHpState` for the root bus.
pub struct AcpiPciHp {
    status: Mutex<Status>,
    root_bus: WeakObjectRef,
    send_event: GpeEvent,
}

fn slot_of(dev: &Object) -> Option<u32> {
    let devfn = dev.cast::<PciDevice>()?.devfn()?;
    Some(u32::from(devfn >> 3))
}

/// QEMU's `acpi_pcihp_pc_no_hotplug`: the device may never be unplugged.
fn no_hotplug(dev: &Object) -> bool {
    !device_class(dev.class()).is_some_and(|dc| dc.hotpluggable)
}

impl AcpiPciHp {
    /// A block serving `root_bus`; `send_event` raises the GPE0 bit the DSDT's `_E01`
    /// handles.
    pub fn new(root_bus: &Object, send_event: GpeEvent) -> Arc<Self> {
        let hp = Arc::new(AcpiPciHp {
            status: Mutex::new(Status::default()),
            root_bus: root_bus.downgrade(),
            send_event,
        });
        hp.reset();
        hp
    }

    /// QEMU's `acpi_pcihp_device_plug_cb`: a device plugged while the machine runs sets
    /// its slot's PCIU bit; one created with the machine is found by the guest at boot.
    /// A device that can never go takes its slot out of PCRM here too: the board's own
    /// devices come after the PM block, before any reset.
    pub fn plug(&self, dev: &Object, hotplugged: bool) {
        let Some(slot) = slot_of(dev) else { return };
        let mut status = self.status.lock();
        if no_hotplug(dev) {
            status.hotplug_enable &= !(1 << slot);
        }
        if !hotplugged {
            return;
        }
        status.up |= 1 << slot;
        drop(status);
        (self.send_event)(ACPI_PCI_HOTPLUG_STATUS);
    }

    /// QEMU's `acpi_pcihp_device_unplug_request_cb`: asks the guest to eject the slot.
    /// Asking again sends the event again, as QEMU 8.0 does (`pending_deleted_expires_ms`;
    /// 7.2 refused a second `device_del`): a guest that booted after the first request
    /// cleared it, and only another event makes it look.
    pub fn unplug_request(&self, dev: &Object) {
        let Some(slot) = slot_of(dev) else { return };
        self.status.lock().down |= 1 << slot;
        (self.send_event)(ACPI_PCI_HOTPLUG_STATUS);
    }

    /// QEMU's `acpi_pcihp_eject_slot`: removes the hotpluggable devices of the lowest slot
    /// set in `slots`.
    fn eject_slot(&self, slots: u32) {
        if slots == 0 {
            return;
        }
        let slot = slots.trailing_zeros();
        {
            let mut status = self.status.lock();
            status.down &= !(1 << slot);
            status.up &= !(1 << slot);
        }
        let Some(bus) = self.root_bus.upgrade() else { return };
        // Every function of the slot, the device lock not held while they go.
        let devices: Vec<_> = pci_bus_devices(&bus)
            .into_iter()
            .filter(|(devfn, _)| u32::from(devfn >> 3) == slot)
            .map(|(_, dev)| dev)
            .collect();
        for dev in devices {
            if !no_hotplug(dev.object()) && dev.object().is_realized() {
                qdev_unplug_complete(dev.object());
            }
        }
    }

    /// QEMU's `acpi_pcihp_reset`: removals the guest never answered happen now, and the
    /// removable slots are those without a device that cannot go.
    pub fn reset(&self) {
        loop {
            let down = self.status.lock().down;
            if down == 0 {
                break;
            }
            self.eject_slot(down);
        }
        let mut enable = u32::MAX;
        if let Some(bus) = self.root_bus.upgrade() {
            for (devfn, dev) in pci_bus_devices(&bus) {
                if no_hotplug(dev.object()) {
                    enable &= !(1 << (devfn >> 3));
                }
            }
        }
        let mut status = self.status.lock();
        status.hotplug_enable = enable;
        status.up = 0;
        status.select = ROOT_BSEL;
    }

    /// The block's part of the PM device's migration section.
    pub fn save_state(&self, section: &mut VmStateSection) {
        let status = self.status.lock();
        section.put("pcihp_up", status.up);
        section.put("pcihp_down", status.down);
        section.put("pcihp_select", status.select);
    }

    /// Puts back what [`AcpiPciHp::save_state`] saved.
    pub fn load_state(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let mut status = self.status.lock();
        status.up = section.get("pcihp_up")?;
        status.down = section.get("pcihp_down")?;
        status.select = section.get("pcihp_select")?;
        Ok(())
    }
}

impl MemoryRegionOps for AcpiPciHp {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let mut status = self.status.lock();
        if status.select != ROOT_BSEL && offset != PCI_SEL {
            return 0;
        }
        let value = match offset {
            // Reading PCIU clears it (QEMU's non-legacy mode, which its DSDT expects).
            PCI_UP => std::mem::take(&mut status.up),
            PCI_DOWN => status.down,
            PCI_RMV => status.hotplug_enable,
            PCI_SEL => status.select,
            _ => 0,
        };
        u64::from(value) & (u64::MAX >> (64 - 8 * size.min(8)))
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        match offset {
            PCI_EJ => {
                let select = self.status.lock().select;
                if select != ROOT_BSEL {
                    if GUEST_ERRORS.allow() {
                        log::warn!("acpi-pci-hotplug: eject on bus selector {select} (only the root bus, 0, exists)");
                    }
                    return;
                }
                self.eject_slot(value as u32);
            }
            PCI_SEL => self.status.lock().select = value as u32,
            _ => {
                if GUEST_ERRORS.allow() {
                    log::warn!("acpi-pci-hotplug: write of 0x{value:x} ({size} bytes) to read-only offset 0x{offset:x}");
                }
            }
        }
    }
}
