//! KVM's interrupt routing, irqfd and ioeventfd (`accel/kvm/kvm_irq.rs`) on real KVM: guest
//! writes that land on an ioeventfd signal it without reaching the device, MSI routes with
//! irqfds and `KVM_SIGNAL_MSI` deliver to the guest's IDT, and the legacy pins keep working
//! under qomvm's routing table. Skipped, with the reason printed, where `/dev/kvm` or one of
//! its ioctls is not usable.

use std::sync::Arc;
use std::time::Duration;

use guest::{Mode, Op};
use hw::core::accel_ops::{AccelOps, EventFd, IoEventAddr, IoEventSpace, MsiMessage};
use hw::core::machine::machine_state;
use hw::core::memory::{MemoryRegion, RegionEventFd};
use hw::core::runstate::RunRequest;
use test_support::irq_guest::{self, IrqGuestConfig, PIC_VECTOR_BASE};
use test_support::vm::{Recorder, TestVm, EXIT_PORT, MMIO_BASE};
use test_support::{guest, require_kvm};

fn eventfd() -> Arc<EventFd> {
    Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
}

/// How many times `fd` was signalled since the last call.
fn count(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

fn accel(vm: &TestVm) -> Arc<dyn AccelOps> {
    machine_state(&vm.machine).unwrap().accel_ops().unwrap()
}

/// Returns from the test, reporting the skip, if `$probe` (a `Result`) is an error.
macro_rules! require_ok {
    ($probe:expr, $what:expr) => {
        if let Err(e) = $probe {
            test_support::skip::skip(format!("{} refused by this KVM: {e}", $what));
            return;
        }
    };
}

const IOEVENT_PORT: u16 = 0x710;
const IOEVENT_MMIO: u64 = MMIO_BASE + 0x1000;

/// Writes to the ioeventfd test's ports and MMIO page, in the order the test checks.
fn ioevent_guest_ops() -> Vec<Op> {
    let mmio_addr = IOEVENT_MMIO as u32;
    vec![
        Op::OutB {
            port: IOEVENT_PORT,
            value: 1,
        },
        Op::OutB {
            port: IOEVENT_PORT + 1,
            value: 2,
        },
        Op::OutW {
            port: IOEVENT_PORT + 2,
            value: 0x1234,
        },
        Op::OutW {
            port: IOEVENT_PORT + 2,
            value: 0x5678,
        },
        Op::OutL {
            port: IOEVENT_PORT + 4,
            value: 7,
        },
        Op::OutB {
            port: IOEVENT_PORT + 4,
            value: 8,
        },
        Op::OutB {
            port: IOEVENT_PORT + 6,
            value: 3,
        },
        Op::MmioWriteL {
            addr: mmio_addr,
            value: 9,
        },
        Op::MmioWriteL {
            addr: mmio_addr + 4,
            value: 10,
        },
    ]
}

#[test]
fn guest_writes_on_an_ioeventfd_signal_it_and_skip_the_device() {
    require_kvm!();
    let image = guest::build(Mode::Protected32, &ioevent_guest_ops(), EXIT_PORT, 0x31);
    let vm = TestVm::new(&image, 1, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    let ops = accel(&vm);
    assert_eq!(ops.name(), "kvm");
    let probe = eventfd();
    let at = IoEventAddr {
        space: IoEventSpace::Pio,
        addr: 0x7f0,
        len: 1,
        datamatch: None,
    };
    require_ok!(ops.add_ioeventfd(at, &probe), "KVM_IOEVENTFD");
    ops.remove_ioeventfd(at, &probe).unwrap();

    // Port region: offset 0 any value of 1 byte, offset 2 only 0x1234 in 2 bytes, offset 4
    // any width (length 0); offsets 1, 3 and 6 reach the device.
    let (byte, word, any) = (eventfd(), eventfd(), eventfd());
    let ports = Arc::new(Recorder::default());
    let fds = vec![
        RegionEventFd {
            offset: 0,
            len: 1,
            datamatch: None,
            fd: byte.clone(),
        },
        RegionEventFd {
            offset: 2,
            len: 2,
            datamatch: Some(0x1234),
            fd: word.clone(),
        },
        RegionEventFd {
            offset: 4,
            len: 0,
            datamatch: None,
            fd: any.clone(),
        },
    ];
    let port_region = MemoryRegion::new_io_with_eventfds("ioevent-ports", 8, ports.clone(), fds);
    ms.system_io()
        .map(IOEVENT_PORT.into(), port_region.clone())
        .unwrap();
    // MMIO: a 4-byte ioeventfd at offset 0; offset 4 reaches the device.
    let mmio_fd = eventfd();
    let mmio = Arc::new(Recorder::default());
    let mmio_fds = vec![RegionEventFd {
        offset: 0,
        len: 4,
        datamatch: None,
        fd: mmio_fd.clone(),
    }];
    ms.system_memory()
        .map(
            IOEVENT_MMIO,
            MemoryRegion::new_io_with_eventfds("ioevent-mmio", 0x1000, mmio.clone(), mmio_fds),
        )
        .unwrap();
    // Added and removed again: its port reaches the device.
    let removed = eventfd();
    let removed_at = IoEventAddr {
        space: IoEventSpace::Pio,
        addr: u64::from(IOEVENT_PORT) + 6,
        len: 1,
        datamatch: None,
    };
    ops.add_ioeventfd(removed_at, &removed).unwrap();
    ops.remove_ioeventfd(removed_at, &removed).unwrap();

    assert_eq!(vm.run(), Some(RunRequest::DebugExit((0x31 << 1) | 1)));

    assert_eq!(count(&byte), 1, "1-byte ioeventfd");
    assert_eq!(count(&word), 1, "datamatch ioeventfd: 0x1234 only");
    assert_eq!(count(&any), 2, "any-length ioeventfd: a dword and a byte");
    assert_eq!(count(&mmio_fd), 1, "MMIO ioeventfd");
    assert_eq!(count(&removed), 0, "removed ioeventfd");
    assert_eq!(
        *ports.log.lock(),
        vec![(1, 2, 1, true), (2, 0x5678, 2, true), (6, 3, 1, true)],
        "the device sees only the writes no ioeventfd took"
    );
    assert_eq!(*mmio.log.lock(), vec![(4, 10, 4, true)]);

    // Unmapping removes the region's ioeventfds: the same fd can be registered again.
    ms.system_io().unmap(&port_region);
    let again = IoEventAddr {
        space: IoEventSpace::Pio,
        addr: IOEVENT_PORT.into(),
        len: 1,
        datamatch: None,
    };
    ops.add_ioeventfd(again, &byte).unwrap();
    ops.remove_ioeventfd(again, &byte).unwrap();
}

#[test]
fn bad_ioeventfd_requests_are_refused_with_a_reason() {
    require_kvm!();
    let vm = TestVm::bare(1, "qemu64", 1 << 20);
    let ops = accel(&vm);
    let fd = eventfd();
    let at = |len, datamatch| IoEventAddr {
        space: IoEventSpace::Mmio,
        addr: IOEVENT_MMIO,
        len,
        datamatch,
    };
    let err = ops.add_ioeventfd(at(3, None), &fd).unwrap_err().to_string();
    assert_eq!(err, "KVM_IOEVENTFD: length 3 is not 0, 1, 2, 4 or 8");
    let err = ops
        .add_ioeventfd(at(0, Some(1)), &fd)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "KVM_IOEVENTFD: a datamatch needs a length");
    // Removing what was never added is the kernel's ENOENT, not a panic.
    let err = ops
        .remove_ioeventfd(at(4, None), &fd)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("KVM_IOEVENTFD: "), "{err}");
    let err = ops
        .update_msi_route(4000, MsiMessage::default())
        .unwrap_err()
        .to_string();
    assert_eq!(err, "KVM_SET_GSI_ROUTING: GSI 4000 is not an MSI route");
}

fn msi(vector: u8) -> MsiMessage {
    // Destination APIC ID 0, physical; fixed, edge.
    MsiMessage {
        address: 0xfee0_0000,
        data: u32::from(vector),
    }
}

fn irq_vm(config: &IrqGuestConfig) -> TestVm {
    let vm = TestVm::bare(1, "qemu64", 2 << 20);
    irq_guest::load(&vm, config);
    accel(&vm).vm_start();
    assert!(irq_guest::wait_ready(&vm), "the guest did not set up");
    vm
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn an_msi_route_with_an_irqfd_and_signal_msi_reach_the_guest() {
    require_kvm!();
    let vm = irq_vm(&IrqGuestConfig::default());
    let ops = accel(&vm);
    let gsi = match ops.add_msi_route(msi(0x41)) {
        Ok(gsi) => gsi,
        Err(e) => {
            ops.shutdown();
            test_support::skip::skip(format!("MSI routes refused by this KVM: {e}"));
            return;
        }
    };
    assert!(gsi >= 24, "MSI routes sit above the I/O APIC's pins: {gsi}");
    let fd = eventfd();
    if let Err(e) = ops.add_irqfd(&fd, gsi) {
        ops.shutdown();
        test_support::skip::skip(format!("KVM_IRQFD refused by this KVM: {e}"));
        return;
    }
    fd.write(1).unwrap();
    assert_eq!(irq_guest::wait_marks(&vm, 1, WAIT), [0x41], "irqfd");

    // A rewritten route takes effect for the same irqfd.
    ops.update_msi_route(gsi, msi(0x43)).unwrap();
    fd.write(1).unwrap();
    assert_eq!(irq_guest::wait_marks(&vm, 2, WAIT), [0x41, 0x43]);

    // A second route gets another GSI.
    let second = ops.add_msi_route(msi(0x44)).unwrap();
    assert_ne!(second, gsi);

    ops.send_msi(msi(0x42)).unwrap();
    assert_eq!(
        irq_guest::wait_marks(&vm, 3, WAIT),
        [0x41, 0x43, 0x42],
        "KVM_SIGNAL_MSI"
    );

    // Without the irqfd, writes to the eventfd go nowhere.
    ops.remove_irqfd(&fd, gsi).unwrap();
    ops.release_msi_route(gsi);
    ops.release_msi_route(second);
    fd.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        irq_guest::wait_marks(&vm, 4, Duration::ZERO),
        [0x41, 0x43, 0x42]
    );
    // The released GSI is handed out again.
    assert_eq!(ops.add_msi_route(msi(0x45)).unwrap(), gsi);
    ops.shutdown();
}

#[test]
fn legacy_pins_follow_qemus_pc_routing_next_to_msi_routes() {
    require_kvm!();
    let config = IrqGuestConfig {
        ioapic: vec![(2, 0x50), (4, 0x54), (11, 0x5b)],
        pic_unmasked: 1 << 3,
        ..Default::default()
    };
    let vm = irq_vm(&config);
    let ops = accel(&vm);
    let pulse = |gsi| {
        ops.set_irq(gsi, true);
        ops.set_irq(gsi, false);
    };
    // GSI 0 (the PIT's IRQ 0) reaches I/O APIC pin 2, as the MADT's override says: the
    // table is QEMU's from the start (KVM's default sends GSI 0 to pin 0).
    pulse(0);
    assert_eq!(irq_guest::wait_marks(&vm, 1, WAIT), [0x50], "GSI 0");
    // An MSI route in the table as well: the pins are committed again with it.
    if let Err(e) = ops.add_msi_route(msi(0x41)) {
        ops.shutdown();
        test_support::skip::skip(format!("MSI routes refused by this KVM: {e}"));
        return;
    }
    pulse(4);
    assert_eq!(irq_guest::wait_marks(&vm, 2, WAIT), [0x50, 0x54], "GSI 4");
    pulse(11);
    assert_eq!(
        irq_guest::wait_marks(&vm, 3, WAIT),
        [0x50, 0x54, 0x5b],
        "GSI 11 (a PCI INTx line)"
    );
    // GSI 3: I/O APIC pin 3 is masked, the PIC's IRQ 3 is not: ExtINT through LINT0.
    pulse(3);
    assert_eq!(
        irq_guest::wait_marks(&vm, 4, WAIT),
        [0x50, 0x54, 0x5b, PIC_VECTOR_BASE + 3],
        "GSI 3 through the PIC"
    );
    ops.shutdown();
}
