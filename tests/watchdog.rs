//! The i6300esb watchdog (`hw/watchdog/wdt_i6300esb.rs`) and the watchdog actions
//! (`-action watchdog=`, `-watchdog-action`, `watchdog-set-action`, the `WATCHDOG` event):
//! the guest's driver steps over QEMU's qtest protocol, the machine's reaction over QMP;
//! and `inject-nmi` reaching a KVM guest.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::fuzz_qtest::{program_bars, Qtest};
use test_support::irq_guest::{self, IrqGuestConfig};
use test_support::qmp::QmpClient;
use test_support::require_kvm;
use test_support::vm::TestVm;

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
const ESB_ID: u32 = 0x25ab_8086;
const WAIT: Duration = Duration::from_secs(10);

/// A machine with an i6300esb at 00:05.0 and the watchdog action `action`; the BAR's
/// address.
fn start(name: &str, action: &[&str]) -> (Qtest, QmpClient, u64) {
    let mut args = vec!["-nodefaults", "-device", "i6300esb,addr=05.0"];
    args.extend_from_slice(action);
    let (mut q, qmp, _) = Qtest::start_with_qmp(QOMVM, name, &args);
    let functions = program_bars(&mut q);
    let esb = functions
        .iter()
        .find(|f| f.vendor_device == ESB_ID)
        .expect("the i6300esb on the bus");
    assert_eq!(esb.devfn, 5 << 3);
    let bar = esb.bars[0].1;
    (q, qmp, bar)
}

const DEVFN: u32 = 5 << 3;

/// Configuration write of `len` bytes (the driver's `pci_write_config_word/byte`).
fn config_write(q: &mut Qtest, reg: u32, value: u32, len: u32) {
    q.cmd(format!("outl 0xcf8 {:#x}", Qtest::pci_address(DEVFN, reg)));
    let port = 0xcfc + (reg & 3);
    let op = match len {
        1 => "outb",
        2 => "outw",
        _ => "outl",
    };
    q.cmd(format!("{op} {port:#x} {value:#x}"));
}

fn config_read(q: &mut Qtest, reg: u32, len: u32) -> u32 {
    q.cmd(format!("outl 0xcf8 {:#x}", Qtest::pci_address(DEVFN, reg)));
    let port = 0xcfc + (reg & 3);
    let op = match len {
        1 => "inb",
        2 => "inw",
        _ => "inl",
    };
    q.value(format!("{op} {port:#x}")) as u32
}

/// The unlock sequence, then the access it lets through.
fn unlocked(q: &mut Qtest, bar: u64, access: String) {
    q.cmd(format!("writeb {:#x} 0x80", bar + 0xc));
    q.cmd(format!("writeb {:#x} 0x86", bar + 0xc));
    q.cmd(access);
}

/// Sets both stages' preloads, the scale (1 MHz: a tick of 32 PCI clocks, 0.96 us), and
/// enables the watchdog, as Linux's `esb_timer_start` does.
fn arm(q: &mut Qtest, bar: u64, preload: u32, fast: bool) {
    config_write(q, 0x60, if fast { 0x04 } else { 0 }, 2);
    unlocked(q, bar, format!("writel {bar:#x} {preload:#x}"));
    unlocked(q, bar, format!("writel {:#x} {preload:#x}", bar + 4));
    config_write(q, 0x68, 0x02, 1);
}

fn ping(q: &mut Qtest, bar: u64) {
    unlocked(q, bar, format!("writew {:#x} 0x100", bar + 0xc));
}

fn action_of(event: &Value) -> &str {
    event["data"]["action"].as_str().unwrap_or_default()
}

/// Polls configuration byte 0x68 until it reads `want` (the watchdog resets itself right
/// after its event).
fn wait_lock_reg(q: &mut Qtest, want: u32) {
    let deadline = Instant::now() + WAIT;
    while config_read(q, 0x68, 1) != want {
        assert!(Instant::now() < deadline, "0x68 never read {want:#x}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_expired_watchdog_reports_and_its_driver_sees_the_previous_reboot() {
    let (mut q, mut qmp, bar) = start("esb-none", &["-action", "watchdog=none"]);
    // Reset values, as the configuration space shows them.
    assert_eq!(config_read(&mut q, 0x60, 2), 0);
    assert_eq!(config_read(&mut q, 0x68, 1), 0);
    assert_eq!(q.value(format!("readw {:#x}", bar + 0xc)), 0);
    // Armed for 10 s a stage: the registers read back while it counts.
    arm(&mut q, bar, 10_000, false);
    assert_eq!(config_read(&mut q, 0x60, 2), 0);
    assert_eq!(config_read(&mut q, 0x68, 1), 0x02, "enabled");
    config_write(&mut q, 0x60, 0x04, 2);
    assert_eq!(config_read(&mut q, 0x60, 2), 0x04, "1 MHz scale");
    // 1000 ticks a stage at 1 MHz (about 1 ms), taken up by a ping.
    unlocked(&mut q, bar, format!("writel {bar:#x} 1000"));
    unlocked(&mut q, bar, format!("writel {:#x} 1000", bar + 4));
    ping(&mut q, bar);
    let event = qmp.wait_event("WATCHDOG", WAIT).expect("WATCHDOG");
    assert_eq!(action_of(&event), "none");
    // The watchdog reset itself; the previous-reboot flag is up (bits 9 and 12, as QEMU
    // answers Linux's driver) until the driver clears it.
    wait_lock_reg(&mut q, 0);
    assert_eq!(config_read(&mut q, 0x60, 2), 0, "reset: 1 kHz again");
    assert_eq!(q.value(format!("readw {:#x}", bar + 0xc)), 0x1200);
    unlocked(&mut q, bar, format!("writew {:#x} 0x200", bar + 0xc));
    assert_eq!(q.value(format!("readw {:#x}", bar + 0xc)), 0);
    // The lock bit freezes the enable bit (10 s stages again: nothing fires meanwhile).
    arm(&mut q, bar, 10_000, false);
    config_write(&mut q, 0x68, 0x03, 1);
    config_write(&mut q, 0x68, 0x00, 1);
    assert_eq!(config_read(&mut q, 0x68, 1), 0x03, "locked");
    q.check_alive();
}

#[test]
fn pings_keep_it_quiet_and_stopping_them_lets_it_fire() {
    let (mut q, mut qmp, bar) = start("esb-ping", &["-watchdog-action", "none"]);
    // 1000 ticks at 1 kHz: 0.98 s per stage, pinged every 20 ms for 2.5 s.
    arm(&mut q, bar, 1000, false);
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        ping(&mut q, bar);
        std::thread::sleep(Duration::from_millis(20));
    }
    let quiet = Instant::now();
    qmp.execute("query-status", json!({}));
    assert_eq!(
        qmp.wait_event("WATCHDOG", Duration::ZERO),
        None,
        "pinged every 20 ms"
    );
    let event = qmp.wait_event("WATCHDOG", WAIT).expect("WATCHDOG");
    assert_eq!(action_of(&event), "none");
    // Two stages of 0.98 s after the last ping.
    assert!(
        quiet.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        quiet.elapsed()
    );
    q.check_alive();
}

#[test]
fn the_actions_reset_pause_and_power_off_the_machine() {
    // reset: the guest's reset (QEMU's SHUTDOWN_CAUSE_GUEST_RESET).
    let (mut q, mut qmp, bar) = start("esb-reset", &[]);
    arm(&mut q, bar, 1000, true);
    let event = qmp.wait_event("WATCHDOG", WAIT).expect("WATCHDOG");
    assert_eq!(action_of(&event), "reset");
    let reset = qmp.wait_event("RESET", WAIT).expect("RESET");
    assert_eq!(
        reset["data"],
        json!({"guest": true, "reason": "guest-reset"})
    );
    drop(q);

    // pause: status watchdog, and `cont` resumes; watchdog-set-action changes it.
    let (mut q, mut qmp, bar) = start("esb-pause", &["-action", "watchdog=pause"]);
    arm(&mut q, bar, 1000, true);
    let event = qmp.wait_event("WATCHDOG", WAIT).expect("WATCHDOG");
    assert_eq!(action_of(&event), "pause");
    qmp.wait_event("STOP", WAIT).expect("STOP");
    assert_eq!(
        qmp.execute("query-status", json!({}))["return"]["status"],
        "watchdog"
    );
    assert_eq!(qmp.execute("cont", json!({})), json!({"return": {}}));
    assert_eq!(
        qmp.execute("watchdog-set-action", json!({"action": "debug"})),
        json!({"return": {}})
    );
    let bad = qmp.execute("watchdog-set-action", json!({"action": "explode"}));
    assert_eq!(bad["error"]["class"], "GenericError", "{bad}");
    arm(&mut q, bar, 1000, true);
    let event = qmp.wait_event("WATCHDOG", WAIT).expect("WATCHDOG");
    assert_eq!(action_of(&event), "debug");
    assert_eq!(
        qmp.execute("query-status", json!({}))["return"]["status"],
        "running"
    );
    drop(q);

    // shutdown: the power button, through the main loop.
    let (mut q, mut qmp, bar) = start("esb-shutdown", &["-action", "watchdog=shutdown"]);
    arm(&mut q, bar, 1000, true);
    let event = qmp.wait_event("WATCHDOG", WAIT).expect("WATCHDOG");
    assert_eq!(action_of(&event), "shutdown");
    qmp.wait_event("POWERDOWN", WAIT).expect("POWERDOWN");
    drop(q);

    // poweroff: qomvm exits at once with status 0, as QEMU's exit(0).
    let (mut q, _qmp, bar) = start("esb-poweroff", &["-action", "watchdog=poweroff"]);
    arm(&mut q, bar, 1000, true);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = q.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "qomvm did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_guest_firing_it_in_a_loop_gets_one_event_a_second() {
    let (mut q, mut qmp, bar) = start("esb-flood", &["-action", "watchdog=none"]);
    // Each arming fires within microseconds and resets the watchdog (preloads and
    // scale too), and the guest arms it again.
    let start = Instant::now();
    for _ in 0..30 {
        arm(&mut q, bar, 1, true);
        config_write(&mut q, 0x68, 0x00, 1);
    }
    let looped = start.elapsed();
    qmp.execute("query-status", json!({}));
    let first_second: usize = qmp
        .events
        .iter()
        .filter(|e| e["event"] == "WATCHDOG")
        .count();
    if looped < Duration::from_millis(900) {
        assert_eq!(first_second, 1, "QEMU throttles WATCHDOG to one a second");
    }
    // The last one of the period comes at its end.
    std::thread::sleep(Duration::from_millis(1200));
    qmp.execute("query-status", json!({}));
    let all = qmp
        .events
        .iter()
        .filter(|e| e["event"] == "WATCHDOG")
        .count();
    assert!(
        (2..=3).contains(&all),
        "{all} events for a guest firing it in a loop"
    );
    q.check_alive();
}

#[test]
fn bad_watchdog_actions_are_one_line_errors() {
    for (args, message) in [
        (
            &["-watchdog-action", "explode"][..],
            "qomvm: -watchdog-action explode: Parameter 'watchdog' does not accept value 'explode'\n",
        ),
        (
            &["-action", "watchdog=explode"][..],
            "qomvm: -action watchdog=explode: Parameter 'watchdog' does not accept value 'explode'\n",
        ),
    ] {
        assert_eq!(test_support::qtest::qomvm_pc_refused(QOMVM, args), message);
    }
}

/// `inject-nmi` (and `watchdog=inject-nmi`'s way to the CPUs): as QEMU's x86 NMI, `KVM_NMI`
/// to a CPU whose local APIC has LINT1 as an unmasked NMI (or is disabled), which the
/// guest takes through vector 2; with LINT1 masked (its reset value) nothing arrives.
#[test]
fn inject_nmi_follows_each_cpus_lint1_on_kvm() {
    require_kvm!();
    for lint1_nmi in [false, true] {
        // Two CPUs: the second waits for a SIPI, its LINT1 masked as after reset.
        let vm = TestVm::bare(2, "qemu64", 2 << 20);
        irq_guest::load(
            &vm,
            &IrqGuestConfig {
                lint1_nmi,
                ..Default::default()
            },
        );
        let ms = hw::core::machine::machine_state(&vm.machine).unwrap();
        let ops = ms.accel_ops().unwrap().clone();
        ops.vm_start();
        assert!(irq_guest::wait_ready(&vm), "the guest did not set up");
        ops.inject_nmi().unwrap();
        let want: &[u8] = if lint1_nmi { &[2] } else { &[] };
        let marks = irq_guest::wait_marks(
            &vm,
            want.len().max(1),
            Duration::from_millis(if lint1_nmi { 10_000 } else { 300 }),
        );
        assert_eq!(marks, want, "LINT1 as NMI: {lint1_nmi}");
        ops.shutdown();
    }
}
