//! The i440FX host bridge (QEMU's `hw/pci_host/i440fx.c`): the `pci.0` bus, PCI
//! configuration mechanism #1 on ports 0xcf8 (address) and 0xcfc-0xcff (data), and the
//! `i440FX` host bridge function at 00:00.0 (8086:1237).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::core::vmstate::{VmStateError, VmStateSection};
use std::sync::Arc;

use qom::{type_init, WeakObjectRef};

use crate::core::bus::qbus_new;
use crate::core::irq::{GsiRouter, IrqHandler, IrqLine};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, DeviceState, RealizeError};
use crate::pci::pci::{config, pci_bus_init, pci_find_device, PciBus, PciDevice, PciDeviceImpl, TYPE_PCI_BUS, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's `TYPE_I440FX_PCI_HOST_BRIDGE`.
pub const TYPE_I440FX_PCI_HOST_BRIDGE: &str = "i440FX-pcihost";
/// QEMU's `TYPE_I440FX_PCI_DEVICE`.
pub const TYPE_I440FX_PCI_DEVICE: &str = "i440FX";

/// The host bridge's registers: the configuration address register (CONFIG_ADDRESS).
#[derive(Default)]
struct HostRegs {
    config_address: AtomicU32,
}

/// QEMU's `I440FXState` (a `PCIHostState`): owns `pci.0` and the configuration ports.
#[derive(qom::Object)]
#[qom(name = TYPE_I440FX_PCI_HOST_BRIDGE)]
pub struct I440fxHost {
    #[parent]
    parent: DeviceState,
    /// Shared with the port handlers.
    regs: Arc<HostRegs>,
}

type_init!(I440fxHost);

struct ConfigAddress {
    regs: Arc<HostRegs>,
}

struct ConfigData {
    regs: Arc<HostRegs>,
    bus: WeakObjectRef,
}

impl MemoryRegionOps for ConfigAddress {
    fn read(&self, _offset: u64, size: u32) -> u64 {
        match size {
            4 => self.regs.config_address.load(Ordering::Relaxed).into(),
            _ => u64::from(u32::MAX) >> (32 - 8 * size.min(4)),
        }
    }

    fn write(&self, _offset: u64, value: u64, size: u32) {
        // Only dword accesses reach CONFIG_ADDRESS (byte 0xcf9 is PIIX's reset control).
        if size != 4 {
            return;
        }
        self.regs
            .config_address
            .store(value as u32, Ordering::Relaxed);
    }
}

impl ConfigData {
    /// The device and register the current CONFIG_ADDRESS selects, for an access at
    /// `offset` (0-3) into the data window.
    fn target(&self, offset: u64, size: u32) -> Option<(qom::Typed<PciDevice>, usize)> {
        let address = self.regs.config_address.load(Ordering::Relaxed);
        if address & 0x8000_0000 == 0 || (address >> 16) & 0xff != 0 {
            return None;
        }
        let devfn = ((address >> 8) & 0xff) as u8;
        let reg = (address & 0xfc) as usize + offset as usize;
        if reg + size as usize > 256 {
            return None;
        }
        let bus = self.bus.upgrade()?;
        Some((pci_find_device(&bus, devfn)?, reg))
    }
}

impl MemoryRegionOps for ConfigData {
    fn read(&self, offset: u64, size: u32) -> u64 {
        match self.target(offset, size) {
            Some((dev, reg)) => dev.guest_read_config(reg, size as usize).into(),
            // No device: the bus floats, reads are all ones.
            None => u64::from(u32::MAX) >> (32 - 8 * size.min(4)),
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        if let Some((dev, reg)) = self.target(offset, size) {
            dev.write_config(reg, value as u32, size as usize);
        }
    }
}

/// PIIX's PIRQ routing as firmware leaves it: PIRQA-D to ISA IRQs 10, 10, 11, 11, with the
/// standard swizzle of INTx pins across slots.
pub const PIRQ_IRQS: [u32; 4] = [10, 10, 11, 11];

/// PIIX3's PIRQ lines (QEMU's `piix3_set_irq` with `pci_irq_levels`): each input is one
/// PIRQ, asserted by every device whose INTx swizzles to it; an ISA IRQ is high while any
/// device on any PIRQ routed to it asserts. Level-triggered sharing needs the count: with
/// a plain line, one device lowering it would hide another's pending interrupt.
struct PirqRouter {
    asserted: parking_lot::Mutex<[u32; 4]>,
    gsi: Arc<GsiRouter>,
}

impl IrqHandler for PirqRouter {
    fn set_irq(&self, pirq: u32, level: bool) {
        let Some(index) = usize::try_from(pirq).ok().filter(|&i| i < 4) else {
            return;
        };
        let irq = PIRQ_IRQS[index];
        let high = {
            let mut asserted = self.asserted.lock();
            let n = &mut asserted[index];
            *n = if level { *n + 1 } else { n.saturating_sub(1) };
            (0..4).any(|i| PIRQ_IRQS[i] == irq && asserted[i] > 0)
        };
        self.gsi.set_irq(irq, high);
    }
}

fn route_intx(bus: &PciBus, dev: &PciDevice, pin: u8) -> IrqLine {
    let (Some(devfn), Some(router)) = (dev.devfn(), bus.irq_handler()) else {
        return IrqLine::disconnected();
    };
    let slot = devfn >> 3;
    let pirq = (usize::from(pin.saturating_sub(1)) + usize::from(slot)) % 4;
    dev.config_set(config::INTERRUPT_LINE, &[PIRQ_IRQS[pirq] as u8]);
    IrqLine::new(router, pirq as u32)
}

impl DeviceImpl for I440fxHost {
    const CATEGORY: DeviceCategory = DeviceCategory::Bridge;
    // Part of the board, like QEMU's (it is a sysbus device there).
    const USER_CREATABLE: bool = false;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let bus = qbus_new(TYPE_PCI_BUS, ctx.object(), "pci.0", services)?;
        pci_bus_init(&bus, route_intx);
        if let Some(pci) = bus.cast::<PciBus>() {
            pci.set_irq_handler(Arc::new(PirqRouter {
                asserted: parking_lot::Mutex::new([0; 4]),
                gsi: GsiRouter::new(services),
            }));
        }
        let address = MemoryRegion::new_io(
            "pci-conf-idx",
            1,
            Arc::new(ConfigAddress {
                regs: self.regs.clone(),
            }),
        );
        let data = MemoryRegion::new_io(
            "pci-conf-data",
            4,
            Arc::new(ConfigData {
                regs: self.regs.clone(),
                bus: bus.downgrade(),
            }),
        );
        services.system_io().map(0xcf8, address)?;
        services.system_io().map(0xcfc, data)?;
        Ok(())
    }

    /// The configuration address register (0xcf8); the PIRQ counts follow from the
    /// devices' INTx levels, which they load themselves.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        Ok(VmStateSection::new(1).with("config_address", self.regs.config_address.load(Ordering::Relaxed)))
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        self.regs
            .config_address
            .store(state.get("config_address")?, Ordering::Relaxed);
        Ok(())
    }
}

/// QEMU's `PCII440FXState`: the host bridge's PCI function.
#[derive(qom::Object)]
#[qom(name = TYPE_I440FX_PCI_DEVICE, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct I440fx {
    #[parent]
    parent: PciDevice,
    /// The shadow RAM switch, when the board boots firmware (direct kernel boot leaves
    /// 0xc0000-0xfffff plain RAM).
    pam: std::sync::OnceLock<crate::pci_host::pam::Pam>,
}

type_init!(I440fx);

impl DeviceImpl for I440fx {
    const DESCRIPTION: Option<&'static str> = Some("Host bridge");
    const CATEGORY: DeviceCategory = DeviceCategory::Bridge;
    const USER_CREATABLE: bool = false;
    const HOTPLUGGABLE: bool = false;

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(1);
        self.parent.save_pci_state(&mut s);
        Ok(s)
    }

    /// The configuration space, then the shadow RAM mapping its PAM registers select.
    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        self.parent.load_pci_state(state)?;
        self.apply_pam();
        Ok(())
    }
}

impl PciDeviceImpl for I440fx {
    const VENDOR_ID: u16 = 0x8086;
    const DEVICE_ID: u16 = 0x1237;
    const REVISION: u8 = 0x02;
    const CLASS_ID: u16 = 0x0600;

    fn pci_realize(&self, _ctx: &DeviceContext) -> Result<(), RealizeError> {
        use crate::pci_host::pam::{I440FX_PAM, I440FX_PAM_SIZE};
        for reg in I440FX_PAM..I440FX_PAM + I440FX_PAM_SIZE {
            self.parent.config_set_wmask(reg, 0xff);
        }
        Ok(())
    }

    /// QEMU's `i440fx_write_config`: a PAM register write remaps shadow RAM.
    fn config_write(&self, addr: usize, _val: u32, len: usize) {
        use crate::pci_host::pam::{I440FX_PAM, I440FX_PAM_SIZE};
        if addr + len > I440FX_PAM && addr < I440FX_PAM + I440FX_PAM_SIZE {
            self.apply_pam();
        }
    }
}

impl I440fx {
    /// Re-applies the PAM registers 0x59-0x5f to the memory map.
    fn apply_pam(&self) {
        use crate::pci_host::pam::{I440FX_PAM, I440FX_PAM_SIZE};
        if let Some(pam) = self.pam.get() {
            let regs: [u8; I440FX_PAM_SIZE] =
                std::array::from_fn(|i| self.parent.read_config(I440FX_PAM + i, 1) as u8);
            pam.update(&regs);
        }
    }

    /// Hands the function the PAM that its registers 0x59-0x5f drive (the board does, when
    /// it boots firmware). The registers' current values apply at once.
    pub fn set_pam(&self, pam: crate::pci_host::pam::Pam) {
        let _ = self.pam.set(pam);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::qdev::{qdev_new, qdev_new_typed, qdev_realize};
    use crate::core::services::MachineServices;

    fn config_read(services: &MachineServices, devfn: u32, reg: u32, size: u32) -> u64 {
        let io = services.system_io();
        io.write(
            0xcf8,
            u64::from(0x8000_0000 | (devfn << 8) | (reg & 0xfc)),
            4,
        );
        io.read(0xcfc + u64::from(reg & 3), size)
    }

    #[test]
    fn config_mechanism_1_reaches_the_functions_and_bars_decode() {
        let services = Arc::new(MachineServices::default());
        let host = qdev_new_typed::<I440fxHost>().unwrap();
        host.set_services(&services);
        qdev_realize(host.object(), None).unwrap();
        let bus = host.object().child("pci.0").unwrap();
        let function = qdev_new(TYPE_I440FX_PCI_DEVICE).unwrap();
        function.property_parse("addr", "00.0").unwrap();
        qdev_realize(&function, Some(&bus)).unwrap();
        let testdev = qdev_new("pci-testdev").unwrap();
        testdev.property_parse("addr", "0x4").unwrap();
        qdev_realize(&testdev, Some(&bus)).unwrap();
        assert_eq!(testdev.property_print("addr").unwrap(), "04.0");
        let err = testdev
            .property_parse("addr", "05.0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("after realize") || err.contains("realized"),
            "{err}"
        );
        let err = qdev_new("pci-testdev")
            .unwrap()
            .property_parse("addr", "zz")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'addr' expects a PCI address 'slot[.function]', got 'zz'"
        );

        assert_eq!(config_read(&services, 0, 0, 4), 0x1237_8086);
        assert_eq!(config_read(&services, 0, 8, 4), 0x0600_0002);
        assert_eq!(config_read(&services, 4 << 3, 0, 4), 0x0005_1b36);
        assert_eq!(
            config_read(&services, 3 << 3, 0, 4),
            0xffff_ffff,
            "empty slot"
        );

        crate::pci::pci::pci_assign_bars(&bus);
        assert_eq!(config_read(&services, 4 << 3, 0x10, 4), 0xfe00_0000);
        assert_eq!(config_read(&services, 4 << 3, 0x14, 4), 0xc001);
        services.system_memory().write(0xfe00_0000, 2, 1);
        assert_eq!(services.system_memory().read(0xfe00_0000, 1), 2);

        let taken = qdev_new("pci-testdev").unwrap();
        taken.property_parse("addr", "04.0").unwrap();
        let err = qdev_realize(&taken, Some(&bus)).unwrap_err().to_string();
        assert!(err.contains("slot 4 function 0 not available"), "{err}");
    }
}
