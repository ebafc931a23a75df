//! The i440FX host bridge (QEMU's `hw/pci-host/i440fx.c`): the `pci.0` bus, PCI
//! configuration mechanism #1 on ports 0xcf8 (address) and 0xcfc-0xcff (data), and the
//! `i440FX` host bridge function at 00:00.0 (8086:1237).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use qom::{type_init, Error, Object, ObjectClass, ObjectRef, WeakObjectRef};

use crate::core::bus::qbus_new;
use crate::core::irq::IrqLine;
use crate::core::machine::{machine_of, machine_state};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{device_class_mut, DeviceCategory, TYPE_DEVICE};
use crate::pci::pci::{
    pci_bus_init, pci_config_read, pci_config_write, pci_find_device, PciDeviceClass,
    TYPE_PCI_BUS, TYPE_PCI_DEVICE,
};

/// QEMU's `TYPE_I440FX_PCI_HOST_BRIDGE`.
pub const TYPE_I440FX_PCI_HOST_BRIDGE: &str = "i440FX-pcihost";
/// QEMU's `TYPE_I440FX_PCI_DEVICE`.
pub const TYPE_I440FX_PCI_DEVICE: &str = "i440FX";

/// The host bridge's state: the configuration address register.
#[derive(Default)]
pub struct I440fxHost {
    config_address: AtomicU32,
}

struct ConfigAddress {
    host: WeakObjectRef,
}

struct ConfigData {
    host: WeakObjectRef,
}

fn host_state(host: &Object) -> &I440fxHost {
    host.downcast::<I440fxHost>()
        .expect("i440FX-pcihost has an I440fxHost part")
}

impl MemoryRegionOps for ConfigAddress {
    fn read(&self, _offset: u64, size: u32) -> u64 {
        match (self.host.upgrade(), size) {
            (Some(host), 4) => host_state(&host).config_address.load(Ordering::Relaxed).into(),
            _ => u64::from(u32::MAX) >> (32 - 8 * size.min(4)),
        }
    }

    fn write(&self, _offset: u64, value: u64, size: u32) {
        // Only dword accesses reach CONFIG_ADDRESS (byte 0xcf9 is PIIX's reset control).
        if size != 4 {
            return;
        }
        if let Some(host) = self.host.upgrade() {
            host_state(&host)
                .config_address
                .store(value as u32, Ordering::Relaxed);
        }
    }
}

impl ConfigData {
    /// The device and register the current CONFIG_ADDRESS selects, for an access at
    /// `offset` (0-3) into the data window.
    fn target(&self, offset: u64, size: u32) -> Option<(ObjectRef, usize)> {
        let host = self.host.upgrade()?;
        let address = host_state(&host).config_address.load(Ordering::Relaxed);
        if address & 0x8000_0000 == 0 || (address >> 16) & 0xff != 0 {
            return None;
        }
        let devfn = ((address >> 8) & 0xff) as u8;
        let reg = (address & 0xfc) as usize + offset as usize;
        if reg + size as usize > 256 {
            return None;
        }
        let bus = host.child("pci.0")?;
        Some((pci_find_device(&bus, devfn)?, reg))
    }
}

impl MemoryRegionOps for ConfigData {
    fn read(&self, offset: u64, size: u32) -> u64 {
        match self.target(offset, size) {
            Some((dev, reg)) => pci_config_read(&dev, reg, size as usize).into(),
            // No device: the bus floats, reads are all ones.
            None => u64::from(u32::MAX) >> (32 - 8 * size.min(4)),
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        if let Some((dev, reg)) = self.target(offset, size) {
            pci_config_write(&dev, reg, value as u32, size as usize);
        }
    }
}

/// PIIX's PIRQ routing as firmware leaves it: PIRQA-D to ISA IRQs 10, 10, 11, 11, with the
/// standard swizzle of INTx pins across slots.
pub const PIRQ_IRQS: [u32; 4] = [10, 10, 11, 11];

fn route_intx(bus: &Object, devfn: u8, pin: u8) -> IrqLine {
    let slot = devfn >> 3;
    let pirq = (usize::from(pin.saturating_sub(1)) + usize::from(slot)) % 4;
    let irq = PIRQ_IRQS[pirq];
    let Some(machine) = machine_of(bus) else {
        return IrqLine::disconnected();
    };
    if let Some(dev) = pci_find_device(bus, devfn) {
        crate::pci::pci::pci_config_set(&dev, crate::pci::pci::config::INTERRUPT_LINE, &[irq as u8]);
    }
    IrqLine::new(crate::core::irq::GsiRouter::new(&machine), irq)
}

/// Realize errors of the host bridge.
#[derive(Debug, thiserror::Error)]
enum I440fxError {
    #[error("i440FX-pcihost: not part of a machine")]
    NoMachine,
}

fn i440fx_pcihost_realize(dev: &Object) -> Result<(), Error> {
    let host = dev.to_ref().expect("a device being realized is alive");
    let machine = machine_of(dev).ok_or_else(|| Error::other(I440fxError::NoMachine))?;
    let ms = machine_state(&machine).expect("machines have a MachineState");
    let bus = qbus_new(TYPE_PCI_BUS, &host, "pci.0")?;
    pci_bus_init(&bus, ms.system_io().clone(), ms.system_memory().clone(), route_intx);
    let address = MemoryRegion::new_io(
        "pci-conf-idx",
        1,
        Arc::new(ConfigAddress {
            host: host.downgrade(),
        }),
    );
    let data = MemoryRegion::new_io(
        "pci-conf-data",
        4,
        Arc::new(ConfigData {
            host: host.downgrade(),
        }),
    );
    ms.system_io().map(0xcf8, address).map_err(Error::other)?;
    ms.system_io().map(0xcfc, data).map_err(Error::other)?;
    Ok(())
}

fn i440fx_pcihost_class_init(class: &mut ObjectClass) {
    let dc = device_class_mut(class);
    dc.realize = Some(i440fx_pcihost_realize);
    dc.category = DeviceCategory::Bridge;
    // Part of the board, like QEMU's (it is a sysbus device there).
    dc.user_creatable = false;
}

type_init! {
    name: TYPE_I440FX_PCI_HOST_BRIDGE,
    parent: Some(TYPE_DEVICE),
    class_init: Some(i440fx_pcihost_class_init),
    instance: Some(qom::InstanceSpec::of::<I440fxHost>()),
}

fn i440fx_class_init(class: &mut ObjectClass) {
    if let Some(pc) = class.get_mut::<PciDeviceClass>() {
        pc.vendor_id = 0x8086;
        pc.device_id = 0x1237;
        pc.revision = 0x02;
        pc.class_id = 0x0600;
    }
    let dc = device_class_mut(class);
    dc.desc = Some("Host bridge");
    dc.category = DeviceCategory::Bridge;
    dc.user_creatable = false;
}

type_init! {
    name: TYPE_I440FX_PCI_DEVICE,
    parent: Some(TYPE_PCI_DEVICE),
    class_init: Some(i440fx_class_init),
}
