//! Guests on real KVM: tiny programs in real mode, 32-bit protected mode and 64-bit long mode
//! do port and MMIO accesses and exit through `isa-debug-exit`, on vCPU threads started the
//! way QEMU starts them. Skipped, with the reason printed, where `/dev/kvm` is not usable.
//!
//! Each test builds its own machine (not the process's `/machine`), so tests run side by
//! side in one process. The last test checks a migration's CPU state on bare KVM vCPUs.

use std::sync::atomic::Ordering;

use guest::{GuestImage, Mode, Op};
use hw::core::machine::machine_state;
use hw::core::runstate::RunRequest;
use test_support::{guest, require_kvm, vm};
use vm::{TestVm, EXIT_PORT, MMIO_BASE, RECORD_PORT};
use vm_memory::{Bytes, GuestAddress};

fn io_ops() -> Vec<Op> {
    vec![
        Op::OutB {
            port: RECORD_PORT,
            value: 0x11,
        },
        Op::OutW {
            port: RECORD_PORT + 2,
            value: 0x2233,
        },
        Op::OutL {
            port: RECORD_PORT + 4,
            value: 0x4455_6677,
        },
        Op::EchoInB {
            from: RECORD_PORT + 8,
            to: RECORD_PORT + 9,
        },
        Op::OutsB {
            port: RECORD_PORT + 10,
            data: vec![1, 2, 3, 4, 5],
        },
        Op::InsB {
            port: RECORD_PORT + 11,
            count: 3,
        },
        Op::MmioWriteL {
            addr: MMIO_BASE as u32 + 0x40,
            value: 0xdead_beef,
        },
        Op::MmioReadL {
            addr: MMIO_BASE as u32 + 0x44,
        },
    ]
}

fn check_io_guest(mode: Mode) {
    let image = guest::build(mode, &io_ops(), EXIT_PORT, 0x21);
    let vm = TestVm::new(&image, 1, "qemu64");
    assert_eq!(
        vm.run(),
        Some(RunRequest::DebugExit((0x21 << 1) | 1)),
        "{mode:?}"
    );
    let ports = vm.ports.log.lock().clone();
    let expected: Vec<(u64, u64, u32, bool)> = vec![
        (0, 0x11, 1, true),
        (2, 0x2233, 2, true),
        (4, 0x4455_6677, 4, true),
        (8, 0, 1, false),
        (9, 0x5a, 1, true),
        (10, 1, 1, true),
        (10, 2, 1, true),
        (10, 3, 1, true),
        (10, 4, 1, true),
        (10, 5, 1, true),
        (11, 0, 1, false),
        (11, 0, 1, false),
        (11, 0, 1, false),
    ];
    assert_eq!(ports, expected, "{mode:?}");
    let buffer = image.ins_buffers[0];
    let ms = machine_state(&vm.machine).unwrap();
    let mut got = [0u8; 3];
    ms.ram().read_slice(&mut got, GuestAddress(buffer)).unwrap();
    assert_eq!(
        got, [0x5a; 3],
        "rep insb stored what the port returned ({mode:?})"
    );
    let mmio = vm.mmio.log.lock().clone();
    assert_eq!(
        mmio,
        vec![(0x40, 0xdead_beef, 4, true), (0x44, 0, 4, false)],
        "{mode:?}"
    );
}

#[test]
fn real_mode_guest_does_port_string_and_mmio_io() {
    require_kvm!();
    check_io_guest(Mode::Real);
}

#[test]
fn protected_mode_guest_does_port_string_and_mmio_io() {
    require_kvm!();
    check_io_guest(Mode::Protected32);
}

#[test]
fn long_mode_guest_does_port_string_and_mmio_io() {
    require_kvm!();
    check_io_guest(Mode::Long64);
}

#[test]
fn each_of_four_vcpus_reports_its_apic_id_on_its_own_thread() {
    require_kvm!();
    let image = guest::smp_apic_id_reporter(RECORD_PORT, EXIT_PORT, 0x33, 4);
    let vm = TestVm::new(&image, 4, "qemu64");
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    for i in 0..4 {
        assert!(names.contains(&format!("CPU {i}/KVM")), "{names:?}");
    }
    assert_eq!(vm.run(), Some(RunRequest::DebugExit((0x33 << 1) | 1)));
    let mut ids: Vec<u64> = vm.ports.log.lock().iter().map(|(_, v, _, _)| *v).collect();
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2, 3]);
}

#[test]
fn a_triple_fault_ends_the_vm_as_a_guest_error() {
    require_kvm!();
    let image = guest::build(Mode::Real, &[Op::TripleFault], EXIT_PORT, 0);
    let vm = TestVm::new(&image, 1, "qemu64");
    assert_eq!(vm.run(), Some(RunRequest::GuestError));
}

/// Real mode: write 0x5a to and read every port but the exit ports (0xf4, 0xf5), then exit.
fn port_fuzz_image() -> GuestImage {
    #[rustfmt::skip]
    let code: Vec<u8> = vec![
        0x31, 0xc0,             // xor ax, ax
        0x8e, 0xd8,             // mov ds, ax
        0xba, 0xf6, 0x00,       // mov dx, 0xf6 (0xf4 and 0xf5 are the exit ports)
        0xb0, 0x5a,             // mov al, 0x5a
        0xee,                   // 1: out dx, al
        0xec,                   //    in al, dx
        0xb0, 0x5a,             //    mov al, 0x5a
        0x42,                   //    inc dx
        0x75, 0xf9,             //    jnz 1b
        0xee,                   // 2: out dx, al   (dx = 0 .. 0xf3)
        0xec,                   //    in al, dx
        0xb0, 0x5a,             //    mov al, 0x5a
        0x42,                   //    inc dx
        0x81, 0xfa, 0xf4, 0x00, //    cmp dx, 0xf4
        0x75, 0xf5,             //    jne 2b
        0xb0, 0x2a,             // mov al, 0x2a
        0xee,                   // out dx, al      (dx = 0xf4: exit)
        0xf4,                   // hlt
        0xeb, 0xfd,             // jmp hlt
    ];
    GuestImage {
        load_addr: guest::LOAD_ADDR,
        bytes: code,
        mode: Mode::Real,
        entry: guest::LOAD_ADDR,
        exit_port: EXIT_PORT,
        ins_buffers: Vec::new(),
    }
}

#[test]
fn a_guest_touching_every_port_and_stray_mmio_cannot_crash_the_vmm() {
    require_kvm!();
    let vm = TestVm::new(&port_fuzz_image(), 1, "qemu64");
    assert_eq!(vm.run(), Some(RunRequest::DebugExit((0x2a << 1) | 1)));
    // Every port but the exit port was written and read once; the recorder's 16 saw theirs.
    assert_eq!(vm.ports.count.load(Ordering::Relaxed), 32);

    let stray: Vec<Op> = (0..16u32)
        .flat_map(|i| {
            let addr = 0xd000_0000 + i * 0x10_0000;
            [Op::MmioWriteL { addr, value: i }, Op::MmioReadL { addr }]
        })
        .collect();
    let image = guest::build(Mode::Protected32, &stray, EXIT_PORT, 0x15);
    let vm = TestVm::new(&image, 1, "qemu64");
    assert_eq!(vm.run(), Some(RunRequest::DebugExit((0x15 << 1) | 1)));
}

#[test]
fn pause_stops_every_vcpu_and_resume_restarts_them() {
    require_kvm!();
    let image = guest::build(Mode::Real, &[Op::Loop { port: RECORD_PORT }], EXIT_PORT, 0);
    let vm = TestVm::new(&image, 2, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    let ops = ms.accel_ops().unwrap();
    let count = || vm.ports.count.load(Ordering::Relaxed);
    let wait_for_progress = |from: u32| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while count() < from + 100 {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest made no progress"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    ops.vm_start();
    wait_for_progress(0);
    // pause_all returns only once every vCPU is out of KVM_RUN and parked.
    ops.pause_all();
    let paused_at = count();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(count(), paused_at, "a paused guest kept running");
    ops.resume_all();
    wait_for_progress(paused_at);
    ops.pause_all();
    ops.resume_all();
    wait_for_progress(count());
    ops.shutdown();
    let stopped_at = count();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(count(), stopped_at, "a stopped guest kept running");
}

/// Requests a guest reset when written, like a board's reset register.
struct ResetPort(qom::WeakObjectRef);

impl hw::core::memory::MemoryRegionOps for ResetPort {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        0
    }
    fn write(&self, _offset: u64, _value: u64, _size: u32) {
        if let Some(m) = self.0.upgrade() {
            machine_state(&m)
                .unwrap()
                .run_state()
                .request(RunRequest::GuestReset);
        }
    }
}

#[test]
fn a_system_reset_restarts_every_vcpu_from_its_start_state() {
    require_kvm!();
    const RESET_PORT: u16 = 0x720;
    let image = guest::build(
        Mode::Protected32,
        &[
            Op::OutB {
                port: RECORD_PORT,
                value: 0x42,
            },
            Op::OutB {
                port: RESET_PORT,
                value: 1,
            },
            Op::Hlt,
        ],
        EXIT_PORT,
        0,
    );
    let vm = TestVm::new(&image, 1, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    ms.system_io()
        .map(
            RESET_PORT.into(),
            hw::core::memory::MemoryRegion::new_io(
                "reset",
                1,
                std::sync::Arc::new(ResetPort(vm.machine.downgrade())),
            ),
        )
        .unwrap();
    let ops = ms.accel_ops().unwrap();
    // Through the run state, as the main loop starts a VM, so that a reset pauses it.
    hw::core::runstate::vm_start(ms).unwrap();
    for _ in 0..3 {
        let req = ms
            .run_state()
            .wait(Some(std::time::Duration::from_secs(20)));
        assert_eq!(req, Some(RunRequest::GuestReset));
        hw::core::runstate::qemu_system_reset(ms, hw::core::runstate::ShutdownCause::GuestReset);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Four runs (the first and three after resets), one marker each.
    while vm.ports.count.load(Ordering::Relaxed) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the vCPU did not restart"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ops.shutdown();
    let log = vm.ports.log.lock().clone();
    assert!(log.iter().all(|e| *e == (0, 0x42, 1, true)), "{log:?}");
}

/// Writes as regions saw them: (region's tag, offset, value), in order.
type WriteLog = std::sync::Arc<parking_lot::Mutex<Vec<(&'static str, u64, u64)>>>;

/// Logs writes with the region they hit, in the order the regions see them.
struct TaggedLog {
    tag: &'static str,
    log: WriteLog,
}

impl hw::core::memory::MemoryRegionOps for TaggedLog {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        0
    }
    fn write(&self, offset: u64, value: u64, _size: u32) {
        self.log.lock().push((self.tag, offset, value));
    }
}

/// Coalesced MMIO and PIO (as the VGA window and the RTC's index port use them): the
/// guest's writes there do not exit, reach the regions in the guest's order before the
/// next access the VMM handles, and a flush from outside the vCPUs hands over the rest.
#[test]
fn coalesced_writes_arrive_in_order_at_the_next_exit_or_flush() {
    use hw::core::memory::MemoryRegion;
    require_kvm!();
    const COALESCED_MMIO: u64 = MMIO_BASE + 0x1000;
    const COALESCED_PORT: u16 = RECORD_PORT + 0x10;
    let log = WriteLog::default();
    let region = |tag| {
        std::sync::Arc::new(TaggedLog {
            tag,
            log: log.clone(),
        })
    };
    let image = guest::build(
        Mode::Protected32,
        &[
            Op::MmioWriteL {
                addr: COALESCED_MMIO as u32,
                value: 0xa,
            },
            Op::OutB {
                port: COALESCED_PORT,
                value: 0xb,
            },
            Op::MmioWriteL {
                addr: COALESCED_MMIO as u32 + 4,
                value: 0xc,
            },
            // Exits: the three before it must be there first.
            Op::MmioWriteL {
                addr: MMIO_BASE as u32,
                value: 0xd,
            },
            Op::MmioWriteL {
                addr: COALESCED_MMIO as u32 + 8,
                value: 0xe,
            },
            Op::Spin,
        ],
        EXIT_PORT,
        0,
    );
    let vm = TestVm::new(&image, 1, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    ms.system_memory()
        .map(
            COALESCED_MMIO,
            MemoryRegion::new_io_coalesced("coalesced-mmio", 0x10, region("mmio"), 0..0x10),
        )
        .unwrap();
    ms.system_io()
        .map(
            COALESCED_PORT.into(),
            MemoryRegion::new_io_coalesced("coalesced-pio", 1, region("pio"), 0..1),
        )
        .unwrap();
    let ops = ms.accel_ops().unwrap().clone();
    // The guest never ends: its vCPU is stopped however the test ends.
    struct StopVcpus(hw::core::accel_ops::AccelOpsRef);
    impl Drop for StopVcpus {
        fn drop(&mut self) {
            self.0.shutdown();
        }
    }
    let _stop = StopVcpus(ops.clone());
    ops.vm_start();
    // The plain write (the recorder at MMIO_BASE) exits; the three buffered before it were
    // handed over first, on the same thread.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let seen_at_exit = loop {
        if vm.mmio.count.load(Ordering::Acquire) > 0 {
            break log.lock().clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit for the plain write"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(
        seen_at_exit.starts_with(&[("mmio", 0, 0xa), ("pio", 0, 0xb), ("mmio", 4, 0xc)]),
        "{seen_at_exit:?}"
    );
    assert_eq!(*vm.mmio.log.lock(), [(0, 0xd, 4, true)]);
    // The guest spins without exiting: its last write waits in the ring.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before_flush = log.lock().clone();
    assert_eq!(before_flush.len(), 3, "{before_flush:?}");
    ops.flush_coalesced_io();
    let after_flush = log.lock().clone();
    assert_eq!(after_flush[3..], [("mmio", 8, 0xe)], "{after_flush:?}");
}

/// A vCPU with the in-kernel irqchip whose CPUID offers the TSC-deadline timer; `None`
/// where this KVM does not offer it.
fn tsc_deadline_vcpu(kvm: &kvm_ioctls::Kvm) -> Option<(kvm_ioctls::VmFd, kvm_ioctls::VcpuFd)> {
    const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1)?;
    if leaf1.ecx & CPUID_1_ECX_TSC_DEADLINE == 0 {
        return None;
    }
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    Some((vm, vcpu))
}

fn read_msr(vcpu: &kvm_ioctls::VcpuFd, index: u32) -> u64 {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1, "MSR {index:#x}");
    msrs.as_slice()[0].data
}

/// A migrated CPU keeps its armed TSC-deadline timer: the deadline goes back in after the
/// local APIC has its timer mode (KVM drops a deadline written before).
#[test]
fn an_armed_tsc_deadline_moves_with_the_cpu() {
    use accel::kvm::kvm_state::{load_cpu_state, save_cpu_state};
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
    const LAPIC_LVTT: usize = 0x320;
    const LVTT_TSC_DEADLINE: u32 = 2 << 17;
    require_kvm!();
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let Some((_src_vm, src)) = tsc_deadline_vcpu(&kvm) else {
        test_support::skip::skip("this host's KVM offers no TSC-deadline timer");
        return;
    };
    let mut lapic = src.get_lapic().unwrap();
    for (i, b) in (LVTT_TSC_DEADLINE | 0xec).to_le_bytes().iter().enumerate() {
        lapic.regs[LAPIC_LVTT + i] = *b as _;
    }
    src.set_lapic(&lapic).unwrap();
    // An hour ahead at any plausible TSC rate: it does not fire during the test.
    let deadline = read_msr(&src, MSR_IA32_TSC) + (1 << 44);
    let entry = kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_TSC_DEADLINE,
        data: deadline,
        ..Default::default()
    };
    let armed = src.set_msrs(&kvm_bindings::Msrs::from_entries(&[entry]).unwrap());
    assert_eq!(armed.unwrap(), 1);
    assert_eq!(read_msr(&src, MSR_IA32_TSC_DEADLINE), deadline);

    let index_list = kvm.get_msr_index_list().unwrap();
    let saved = save_cpu_state(&src, index_list.as_slice()).unwrap();
    let (_dst_vm, dst) = tsc_deadline_vcpu(&kvm).expect("a second vCPU like the first");
    load_cpu_state(&dst, &saved).unwrap();
    assert_eq!(read_msr(&dst, MSR_IA32_TSC_DEADLINE), deadline);
}

/// kvmclock as the accelerator saves it (nanoseconds).
fn kvmclock_ns(ms: &hw::core::machine::MachineState) -> u64 {
    let section = ms.accel_ops().unwrap().save_vm_state().unwrap();
    section.get("clock").unwrap()
}

/// Guest time stands still while the VM is stopped (QEMU's kvmclock device): read when
/// it stops, set back when it runs.
#[test]
fn kvmclock_stands_still_while_the_vm_is_stopped() {
    require_kvm!();
    use hw::core::runstate::{vm_start, vm_stop, RunStatus};
    let machine = vm::pc_machine("kvm", 64 << 20);
    let ms = machine_state(&machine).unwrap();
    vm_start(ms).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    vm_stop(ms, RunStatus::Paused).unwrap();
    let stopped = kvmclock_ns(ms);
    std::thread::sleep(std::time::Duration::from_millis(2000));
    assert_eq!(
        kvmclock_ns(ms),
        stopped,
        "saved while stopped: where it stopped"
    );
    vm_start(ms).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    vm_stop(ms, RunStatus::Paused).unwrap();
    let ran = kvmclock_ns(ms) - stopped;
    assert!(
        (20_000_000..1_000_000_000).contains(&ran),
        "{ran} ns: the 2 s stop counted"
    );
    ms.accel_ops().unwrap().shutdown();
}

/// A loaded kvmclock is where guest time goes on from when the VM starts (QEMU's kvmclock
/// keeps it until then), and a migration's final stop leaves the clock running, so its
/// downtime counts.
#[test]
fn a_loaded_kvmclock_waits_for_the_start_and_a_migration_stop_keeps_it_running() {
    require_kvm!();
    use hw::core::runstate::{vm_start, vm_stop, RunStatus};
    let source = vm::pc_machine("kvm", 64 << 20);
    let src = machine_state(&source).unwrap();
    vm_start(src).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    vm_stop(src, RunStatus::FinishMigrate).unwrap();
    let first = kvmclock_ns(src);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let saved = src.accel_ops().unwrap().save_vm_state().unwrap();
    let at_save: u64 = saved.get("clock").unwrap();
    assert!(
        at_save >= first + 100_000_000,
        "the migration stop froze it: {first} {at_save}"
    );
    src.accel_ops().unwrap().shutdown();

    let target = vm::pc_machine("kvm", 64 << 20);
    let dst = machine_state(&target).unwrap();
    dst.accel_ops().unwrap().load_vm_state(&saved).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2000));
    assert_eq!(kvmclock_ns(dst), at_save, "not started: the loaded time");
    vm_start(dst).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    vm_stop(dst, RunStatus::Paused).unwrap();
    let ran = kvmclock_ns(dst) - at_save;
    assert!(
        (20_000_000..1_000_000_000).contains(&ran),
        "{ran} ns: the 2 s before the start counted"
    );
    dst.accel_ops().unwrap().shutdown();
}
