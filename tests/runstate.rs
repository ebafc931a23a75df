//! The run-state code path the monitor's `stop`, `cont`, `system_powerdown` and
//! `info registers` take (`hw::core::runstate`, `AccelOps::cpu_dump_state`), driven
//! in-process without a socket: a counting guest on KVM really stops counting, and the
//! pc board's power button raises the SCI on qtest. The KVM tests skip, with the reason,
//! where `/dev/kvm` is not usable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest::{Mode, Op};
use hw::core::machine::{machine_run_board_init, machine_state, SmpConfig};
use hw::core::runstate::{self, RunStateError, RunStatus, VmEvent};
use parking_lot::Mutex;
use test_support::{guest, require_kvm, vm};
use vm::{TestVm, EXIT_PORT, RECORD_PORT};

fn record_events(ms: &hw::core::machine::MachineState) -> Arc<Mutex<Vec<VmEvent>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    ms.vm_state()
        .add_listener(Arc::new(move |e: &VmEvent| sink.lock().push(*e)));
    events
}

#[test]
fn stop_freezes_a_counting_guest_and_cont_lets_it_count_again() {
    require_kvm!();
    let image = guest::build(Mode::Real, &[Op::Loop { port: RECORD_PORT }], EXIT_PORT, 0);
    let vm = TestVm::new(&image, 2, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    let events = record_events(ms);
    let count = || vm.ports.count.load(Ordering::Relaxed);
    let wait_for_progress = |from: u32| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while count() < from + 100 {
            assert!(Instant::now() < deadline, "the guest made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    assert_eq!(ms.vm_state().status(), RunStatus::Prelaunch);
    runstate::vm_start(ms).unwrap();
    assert_eq!(ms.vm_state().status(), RunStatus::Running);
    wait_for_progress(0);

    // `stop` returns once every vCPU has left KVM_RUN: from then on nothing counts.
    runstate::vm_stop(ms, RunStatus::Paused).unwrap();
    assert_eq!(ms.vm_state().status(), RunStatus::Paused);
    let stopped_at = count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), stopped_at, "a stopped guest kept counting");

    // A stopped vCPU's registers are readable on its own thread: it sits in the loop.
    let ops = ms.accel_ops().unwrap();
    let dump = ops.cpu_dump_state(1).expect("registers of a paused vCPU");
    assert!(dump.contains("EIP=0000"), "{dump}");
    assert!(dump.contains("CR0="), "{dump}");

    runstate::vm_start(ms).unwrap();
    wait_for_progress(stopped_at);
    // ... and of a running one (it is kicked out of KVM_RUN for the read).
    let dump = ops.cpu_dump_state(0).expect("registers of a running vCPU");
    assert!(dump.contains("EIP=0000"), "{dump}");
    assert_eq!(
        ops.cpu_dump_state(7),
        Err(hw::core::accel_ops::CpuDumpError::NoThread(7))
    );

    runstate::vm_stop(ms, RunStatus::Paused).unwrap();
    runstate::vm_start(ms).unwrap();
    wait_for_progress(count());
    ops.shutdown();
    assert_eq!(
        *events.lock(),
        vec![
            VmEvent::Resume,
            VmEvent::Stop,
            VmEvent::Resume,
            VmEvent::Stop,
            VmEvent::Resume
        ]
    );
}

#[test]
fn concurrent_stop_and_cont_leave_a_status_that_matches_the_vcpus() {
    require_kvm!();
    let image = guest::build(Mode::Real, &[Op::Loop { port: RECORD_PORT }], EXIT_PORT, 0);
    let vm = TestVm::new(&image, 2, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    let events = record_events(ms);
    runstate::vm_start(ms).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for i in 0..20 {
                    if (i + t) % 2 == 0 {
                        runstate::vm_stop(ms, RunStatus::Paused).unwrap();
                    } else {
                        runstate::vm_start(ms).unwrap();
                    }
                }
            });
        }
    });
    // Events alternate, as the transitions did.
    let events = events.lock().clone();
    for pair in events.windows(2) {
        assert_ne!(pair[0], pair[1], "{events:?}");
    }
    let expected_last = if ms.vm_state().is_running() {
        VmEvent::Resume
    } else {
        VmEvent::Stop
    };
    assert_eq!(events.last(), Some(&expected_last));
    if !ms.vm_state().is_running() {
        let count = || vm.ports.count.load(Ordering::Relaxed);
        let at = count();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(count(), at, "the status says paused but the guest counts");
    }
    ms.accel_ops().unwrap().shutdown();
}

/// CPU time (user + system) the kernel has charged to the vCPU threads of `ms`, from
/// `/proc/self/task/TID/stat` (fields 14 and 15, in clock ticks).
fn vcpu_cpu_time(ms: &hw::core::machine::MachineState) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    let mut ticks = 0;
    for cpu in ms.cpus() {
        let tid = cpu
            .downcast::<hw::i386::x86_cpu::X86Cpu>()
            .unwrap()
            .thread_id();
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The command name (field 2) is in parentheses and may hold spaces: count after it.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    Duration::from_millis(ticks * 1000 / ticks_per_s)
}

#[test]
fn waiting_vcpus_take_no_cpu_time() {
    require_kvm!();
    let image = guest::build(Mode::Real, &[Op::Loop { port: RECORD_PORT }], EXIT_PORT, 0);
    let vm = TestVm::new(&image, 4, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    // Waiting vCPUs sleep: 4 of them once woke each other at every parking, which kept
    // about 70% of a host CPU busy before the guest ever ran (or while it was stopped).
    let idle_for = |what: &str| {
        let before = vcpu_cpu_time(ms);
        std::thread::sleep(Duration::from_millis(500));
        let spent = vcpu_cpu_time(ms) - before;
        assert!(
            spent < Duration::from_millis(100),
            "vCPUs {what} took {spent:?} of CPU time in 500 ms"
        );
    };
    idle_for("waiting for the first start");
    runstate::vm_start(ms).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.ports.count.load(Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "the guest made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    runstate::vm_stop(ms, RunStatus::Paused).unwrap();
    idle_for("stopped");
    ms.accel_ops().unwrap().shutdown();
}
fn qtest_machine(type_name: &str) -> qom::ObjectRef {
    accel::init().expect("registrations are intact");
    let machine = qom::object_new(type_name).unwrap();
    let ms = machine_state(&machine).unwrap();
    ms.set_ram_size(16 << 20);
    ms.set_smp(SmpConfig::default());
    let qtest = accel::accel_find("qtest").unwrap();
    accel::accel_init_machine(qtest, &machine).unwrap();
    machine_run_board_init(&machine).unwrap();
    machine
}

#[test]
fn the_pc_power_button_raises_the_sci_and_the_none_machine_has_none() {
    let pc = qtest_machine("pc-i440fx-10.0-machine");
    let ms = machine_state(&pc).unwrap();
    let events = record_events(ms);
    // Enable the power button event in PM1_EN, as a guest's ACPI driver does.
    ms.system_io().write(0x602, 1 << 8, 2);
    let sci = || {
        ms.accel_ops()
            .unwrap()
            .as_any()
            .downcast_ref::<accel::qtest::QtestOps>()
            .unwrap()
            .irq_level(9)
    };
    assert!(!sci());
    runstate::qemu_system_powerdown(ms).unwrap();
    assert!(sci(), "the power button raises the SCI");
    assert_eq!(
        ms.system_io().read(0x600, 2) & (1 << 8),
        1 << 8,
        "PWRBTN_STS"
    );
    assert_eq!(*events.lock(), vec![VmEvent::Powerdown]);

    let none = qtest_machine("none-machine");
    assert_eq!(
        runstate::qemu_system_powerdown(machine_state(&none).unwrap()),
        Err(RunStateError::NoPowerButton)
    );
}

/// The monitor's page walks (`x`, `gva2gpa`, `info tlb`) start from the CPU's paging
/// registers, read on its own thread: a long-mode guest has paging, PAE and long mode on;
/// a CPU that does not exist has no thread to ask.
#[test]
fn a_long_mode_guests_paging_registers_are_read_on_its_thread() {
    require_kvm!();
    let image = guest::build(
        Mode::Long64,
        &[Op::Loop { port: RECORD_PORT }],
        EXIT_PORT,
        0,
    );
    let vm = TestVm::new(&image, 1, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    runstate::vm_start(ms).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.ports.count.load(Ordering::Relaxed) < 10 {
        assert!(
            Instant::now() < deadline,
            "the guest never reached its loop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let ops = ms.accel_ops().unwrap();
    let regs = ops.paging_registers(0).expect("CPU 0 answers");
    assert_ne!(regs.cr0 & (1 << 31), 0, "CR0.PG: {regs:x?}");
    assert_ne!(regs.cr4 & (1 << 5), 0, "CR4.PAE: {regs:x?}");
    assert_ne!(regs.efer & (1 << 10), 0, "EFER.LMA: {regs:x?}");
    assert_eq!(
        ops.paging_registers(3).err(),
        Some(hw::core::accel_ops::CpuDumpError::NoThread(3))
    );
    ops.shutdown();
}
