//! MSI-X (`hw/pci/msix.rs`) in a PCI device that owns it the way virtio-pci will: on real
//! KVM its vectors reach a guest's IDT through an MSI route and an irqfd, masking holds
//! them in the PBA and unmasking delivers them; on qtest notifications are dropped without
//! harm. The KVM test is skipped, and the skip reported (`test_support::skip`), where `/dev/kvm` is not usable.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hw::core::bus::qbus_new;
use hw::core::machine::machine_state;
use hw::core::qdev::{qdev_new, qdev_realize, DeviceContext, DeviceImpl, RealizeError};
use hw::core::services::MachineServices;
use hw::pci::msix::{Msix, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL};
use hw::pci::pci::{
    config, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE, TYPE_PCI_BUS,
};
use qom::ObjectRef;
use test_support::irq_guest::{self, IrqGuestConfig};
use test_support::require_kvm;
use test_support::vm::TestVm;

/// A PCI device with 4 MSI-X vectors on BAR 1, forwarding configuration writes and reset to
/// its `Msix` as an owner must.
#[derive(qom::Object)]
#[qom(name = "msix-testdev", interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
struct MsixTestDev {
    #[parent]
    parent: PciDevice,
    msix: OnceLock<Arc<Msix>>,
}

qom::type_init!(MsixTestDev);

const VECTORS: u16 = 4;
const MSIX_BAR: u8 = 1;
/// Where the test places BAR 1 (clear of `TestVm`'s MMIO recorder at 0xfe000000).
const BAR_ADDR: u64 = 0xfe10_0000;

impl DeviceImpl for MsixTestDev {
    fn reset(&self) {
        if let Some(msix) = self.msix.get() {
            msix.reset();
        }
    }
}

impl PciDeviceImpl for MsixTestDev {
    const VENDOR_ID: u16 = 0x1b36;
    const DEVICE_ID: u16 = 0x7fff;
    const CLASS_ID: u16 = 0x00ff;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let msix = Msix::init_exclusive_bar(self, VECTORS, MSIX_BAR, ctx.machine()?)?;
        let _ = self.msix.set(msix);
        Ok(())
    }

    fn config_write(&self, addr: usize, val: u32, len: usize) {
        if let Some(msix) = self.msix.get() {
            msix.config_write(addr, val, len);
        }
    }
}

/// Plugs an `msix-testdev` into a new PCI bus of `machine` and places its BAR at
/// [`BAR_ADDR`], as firmware would.
fn plug(machine: &ObjectRef, services: &Arc<MachineServices>) -> (ObjectRef, Arc<Msix>) {
    let bus = qbus_new(TYPE_PCI_BUS, machine, "pci.0", services).unwrap();
    let dev = qdev_new("msix-testdev").unwrap();
    qdev_realize(&dev, Some(&bus)).unwrap();
    let pci = dev.cast::<PciDevice>().unwrap();
    let bar = config::BAR0 + 4 * usize::from(MSIX_BAR);
    pci.write_config(bar, BAR_ADDR as u32, 4);
    pci.write_config(config::COMMAND, u32::from(config::COMMAND_MEMORY), 2);
    let msix = dev
        .cast::<MsixTestDev>()
        .unwrap()
        .msix
        .get()
        .unwrap()
        .clone();
    (dev, msix)
}

/// The guest's view: configuration writes and BAR accesses.
struct Guest<'a> {
    services: &'a MachineServices,
    dev: &'a ObjectRef,
    msix: &'a Msix,
}

impl Guest<'_> {
    fn set_control(&self, bits: u16) {
        let pci = self.dev.cast::<PciDevice>().unwrap();
        pci.write_config(self.msix.capability() + PCI_MSIX_FLAGS, u32::from(bits), 2);
    }
    fn program(&self, vector: u64, apic_vector: u8, masked: bool) {
        let at = BAR_ADDR + 16 * vector;
        let memory = self.services.system_memory();
        memory.write(at, 0xfee0_0000, 4);
        memory.write(at + 4, 0, 4);
        memory.write(at + 8, u64::from(apic_vector), 4);
        memory.write(at + 12, u64::from(masked), 4);
    }
    fn set_masked(&self, vector: u64, masked: bool) {
        let at = BAR_ADDR + 16 * vector + 12;
        self.services
            .system_memory()
            .write(at, u64::from(masked), 4);
    }
    fn pba(&self) -> u64 {
        self.services.system_memory().read(BAR_ADDR + 2048, 8)
    }
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn msix_vectors_reach_a_kvm_guest_and_masking_holds_them() {
    require_kvm!();
    let vm = TestVm::bare(1, "qemu64", 2 << 20);
    let ms = machine_state(&vm.machine).unwrap();
    let ops = ms.accel_ops().unwrap();
    // The device's vectors take the irqfd path only if KVM gives routes and irqfds.
    let probe = ops.add_msi_route(hw::core::accel_ops::MsiMessage::default());
    match probe {
        Ok(gsi) => ops.release_msi_route(gsi),
        Err(e) => {
            test_support::skip::skip(format!("MSI routes refused by this KVM: {e}"));
            return;
        }
    }
    let (dev, msix) = plug(&vm.machine, ms.services());
    irq_guest::load(&vm, &IrqGuestConfig::default());
    ops.vm_start();
    assert!(irq_guest::wait_ready(&vm), "the guest did not set up");
    let guest = Guest {
        services: ms.services(),
        dev: &dev,
        msix: &msix,
    };

    guest.set_control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    guest.program(0, 0x41, false);
    guest.program(3, 0x44, false);
    guest.set_control(PCI_MSIX_FLAGS_ENABLE);
    msix.notify(0);
    assert_eq!(irq_guest::wait_marks(&vm, 1, WAIT), [0x41]);
    msix.notify(3);
    assert_eq!(irq_guest::wait_marks(&vm, 2, WAIT), [0x41, 0x44]);

    // Masked: nothing reaches the guest, the PBA says why; unmasking delivers it.
    guest.set_masked(3, true);
    msix.notify(3);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(irq_guest::wait_marks(&vm, 3, Duration::ZERO), [0x41, 0x44]);
    assert_eq!(guest.pba(), 0b1000);
    guest.set_masked(3, false);
    assert_eq!(irq_guest::wait_marks(&vm, 3, WAIT), [0x41, 0x44, 0x44]);
    assert_eq!(guest.pba(), 0);

    // A rewritten entry delivers its new vector; from another thread, as I/O threads do.
    guest.program(0, 0x42, false);
    std::thread::scope(|s| {
        s.spawn(|| msix.notify(0));
    });
    assert_eq!(
        irq_guest::wait_marks(&vm, 4, WAIT),
        [0x41, 0x44, 0x44, 0x42]
    );

    // Reset: MSI-X off, every vector masked.
    DeviceImpl::reset(dev.cast::<MsixTestDev>().unwrap());
    assert!(!msix.is_enabled() && msix.is_masked(0));
    msix.notify(0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(irq_guest::wait_marks(&vm, 5, Duration::ZERO).len(), 4);
    ops.shutdown();
}

#[test]
fn on_qtest_msix_notifications_are_dropped_without_harm() {
    let (machine, _isa) = test_support::qtest::machine_with_isa_bus();
    let ms = machine_state(&machine).unwrap();
    assert_eq!(ms.accel_ops().unwrap().name(), "qtest");
    let (dev, msix) = plug(&machine, ms.services());
    let guest = Guest {
        services: ms.services(),
        dev: &dev,
        msix: &msix,
    };
    guest.set_control(PCI_MSIX_FLAGS_ENABLE);
    guest.program(1, 0x41, false);
    for _ in 0..100 {
        msix.notify(1);
    }
    assert!(!msix.is_pending(1));
    guest.set_masked(1, true);
    msix.notify(1);
    assert_eq!(guest.pba(), 0b10);
    assert!(msix.is_enabled());
}
