//! The pc's HPET (`hw/timer/hpet.rs`): its registers and counter over QEMU's qtest
//! protocol, its interrupts as the I/O APIC's inputs see them (legacy replacement on
//! IRQ 0 and 8, level-triggered routes, the RTC's IRQ 8 held while legacy mode owns it),
//! the ACPI table, `hpet=off`/`-no-hpet`, its migrated state, and, on KVM, a guest that
//! takes its interrupts through the in-kernel I/O APIC and as MSIs.

use std::time::Duration;

use hw::core::machine::machine_state;
use hw::core::qdev::{qdev_new, qdev_realize, DeviceImpl, DeviceState};
use qom::Typed;
use test_support::fuzz_qtest::Qtest;
use test_support::irq_guest::{self, IrqGuestConfig};
use test_support::require_kvm;
use test_support::vm::TestVm;

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
const BASE: u64 = 0xfed0_0000;
const CFG: u64 = BASE + 0x10;
const STATUS: u64 = BASE + 0x20;
const COUNTER: u64 = BASE + 0xf0;
const WAIT: Duration = Duration::from_secs(10);

/// Timer `n`'s configuration, comparator and FSB route registers.
fn timer(n: u64) -> (u64, u64, u64) {
    let at = BASE + 0x100 + 0x20 * n;
    (at, at + 8, at + 0x10)
}

const TN_LEVEL: u64 = 0x2;
const TN_ENABLE: u64 = 0x4;
const TN_PERIODIC: u64 = 0x8;
const TN_SETVAL: u64 = 0x40;
const TN_32BIT: u64 = 0x100;
const TN_FSB: u64 = 0x4000;

fn start(name: &str, args: &[&str]) -> Qtest {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    Qtest::start(QOMVM, name, |_| args)
}

fn raises(irqs: &[String], gsi: u32) -> usize {
    irqs.iter()
        .filter(|l| **l == format!("IRQ raise {gsi}"))
        .count()
}

#[test]
fn registers_and_counter_answer_as_qemus_hpet() {
    let mut q = start("hpet-regs", &[]);
    // Revision 1, three timers, 64-bit counter, legacy replacement capable, vendor 8086;
    // the period is 10 ns (10^7 fs).
    assert_eq!(q.value(format!("readl {BASE:#x}")), 0x8086_a201);
    assert_eq!(q.value(format!("readl {:#x}", BASE + 4)), 10_000_000);
    assert_eq!(q.value(format!("readq {BASE:#x}")), 0x0098_9680_8086_a201);
    // Each timer: periodic and 64-bit capable, routes: the i440FX pc's GSI 2 only.
    for n in 0..3 {
        assert_eq!(
            q.value(format!("readq {:#x}", timer(n).0)),
            0x4_0000_0030,
            "timer {n}"
        );
        assert_eq!(
            q.value(format!("readq {:#x}", timer(n).1)),
            u64::MAX,
            "timer {n}"
        );
    }
    // No fourth timer; narrow accesses read nothing.
    assert_eq!(q.value(format!("readq {:#x}", timer(3).0)), 0);
    assert_eq!(q.value(format!("readb {BASE:#x}")), 0);
    assert_eq!(q.value(format!("readw {BASE:#x}")), 0);
    // Halted, the counter keeps what is written to it.
    q.cmd(format!("writeq {COUNTER:#x} 0x123456789"));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(q.value(format!("readq {COUNTER:#x}")), 0x1_2345_6789);
    q.cmd(format!("writel {:#x} 0x5", COUNTER + 4));
    assert_eq!(q.value(format!("readq {COUNTER:#x}")), 0x5_2345_6789);
    // Enabled, it counts up from there; the capabilities ignore writes.
    q.cmd(format!("writel {CFG:#x} 1"));
    q.cmd(format!("writel {BASE:#x} 0"));
    assert_eq!(q.value(format!("readl {BASE:#x}")), 0x8086_a201);
    let first = q.value(format!("readq {COUNTER:#x}"));
    std::thread::sleep(Duration::from_millis(50));
    let second = q.value(format!("readq {COUNTER:#x}"));
    assert!(
        first >= 0x5_2345_6789 && second > first,
        "{first:#x} {second:#x}"
    );
    // 50 ms at 100 MHz is 5 million ticks (the reads' own time is on top).
    assert!(second - first >= 5_000_000, "{first:#x} {second:#x}");
    // Disabled again, it stands still.
    q.cmd(format!("writel {CFG:#x} 0"));
    let halted = q.value(format!("readq {COUNTER:#x}"));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(q.value(format!("readq {COUNTER:#x}")), halted);
    assert_eq!(q.value(format!("readl {CFG:#x}")), 0);
    // Only the enable and legacy bits of the configuration are writable.
    q.cmd(format!("writel {CFG:#x} 0xfffffffc"));
    assert_eq!(q.value(format!("readl {CFG:#x}")), 0);
    q.check_alive();
}

/// A qtest session with interrupt interception on: every request's `IRQ` lines are kept
/// in order, whatever request they arrived with.
struct Intercepted {
    q: Qtest,
    irqs: Vec<String>,
}

impl Intercepted {
    fn start(name: &str) -> Intercepted {
        Intercepted::on(start(name, &[]))
    }

    fn on(mut q: Qtest) -> Intercepted {
        assert_eq!(q.cmd("irq_intercept_in ioapic".into()), "OK");
        Intercepted {
            q,
            irqs: Vec::new(),
        }
    }

    fn cmd(&mut self, request: String) -> String {
        let (reply, irqs) = self.q.cmd_irqs(request);
        self.irqs.extend(irqs);
        reply
    }

    fn value(&mut self, request: String) -> u64 {
        let reply = self.cmd(request.clone());
        reply
            .strip_prefix("OK 0x")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or_else(|| panic!("{request}: {reply}"))
    }

    /// Waits until the lines since the last `take` satisfy `enough` (or `timeout`), and
    /// hands them over.
    fn take_when(&mut self, timeout: Duration, enough: impl Fn(&[String]) -> bool) -> Vec<String> {
        let mut seen = std::mem::take(&mut self.irqs);
        if !enough(&seen) {
            let more = self.q.wait_irqs(timeout, |more| {
                let all: Vec<String> = seen.iter().chain(more).cloned().collect();
                enough(&all)
            });
            seen.extend(more);
        }
        seen
    }

    /// The lines that arrive within `window`.
    fn take_for(&mut self, window: Duration) -> Vec<String> {
        self.take_when(window, |_| false)
    }
}

#[test]
fn legacy_replacement_takes_irq_0_and_8_and_holds_the_rtcs_interrupt() {
    let mut q = Intercepted::start("hpet-legacy");
    // The RTC's periodic interrupt (register B's PIE; register A's 1024 Hz rate) raises
    // IRQ 8 through the HPET while the HPET is not in legacy mode.
    q.cmd("outb 0x70 0x0b".into());
    q.cmd("outb 0x71 0x42".into());
    let irqs = q.take_when(WAIT, |i| raises(i, 8) >= 1);
    assert!(raises(&irqs, 8) >= 1, "{irqs:?}");

    // Legacy mode: the line goes down, and the RTC's level stays held.
    q.cmd(format!("writel {CFG:#x} 3"));
    let irqs = q.take_for(Duration::ZERO);
    assert_eq!(irqs, ["IRQ lower 8"]);
    // Timer 0 fires once on IRQ 0 (GSI 0, which the MADT sends to I/O APIC pin 2).
    let now = q.value(format!("readq {COUNTER:#x}"));
    q.cmd(format!("writeq {:#x} {:#x}", timer(0).1, now + 100_000));
    q.cmd(format!("writeq {:#x} {TN_ENABLE:#x}", timer(0).0));
    let irqs = q.take_when(WAIT, |i| i.contains(&"IRQ lower 0".to_string()));
    assert_eq!(irqs, ["IRQ raise 0", "IRQ lower 0"], "one edge");
    // Timer 1, periodic every millisecond, on IRQ 8 (SETVAL: the first write sets the
    // comparator, the second the period).
    let now = q.value(format!("readq {COUNTER:#x}"));
    q.cmd(format!(
        "writeq {:#x} {:#x}",
        timer(1).0,
        TN_ENABLE | TN_PERIODIC | TN_SETVAL
    ));
    q.cmd(format!("writeq {:#x} {:#x}", timer(1).1, now + 100_000));
    q.cmd(format!("writeq {:#x} 100000", timer(1).1));
    let irqs = q.take_when(WAIT, |i| raises(i, 8) >= 5);
    assert!(raises(&irqs, 8) >= 5, "{irqs:?}");
    assert_eq!(raises(&irqs, 0), 0, "timer 0 was one-shot: {irqs:?}");
    // The comparator moved on by whole periods.
    let cmp = q.value(format!("readq {:#x}", timer(1).1));
    assert!(
        cmp >= now + 600_000 && (cmp - (now + 100_000)).is_multiple_of(100_000),
        "{cmp:#x}"
    );
    q.cmd(format!("writeq {:#x} 0", timer(1).0));
    q.take_for(Duration::from_millis(20));
    let irqs = q.take_for(Duration::from_millis(50));
    assert_eq!(
        raises(&irqs, 8),
        0,
        "timer 1 disabled; the RTC's held: {irqs:?}"
    );

    // Out of legacy mode the RTC's held level reaches IRQ 8 again.
    q.cmd(format!("writel {CFG:#x} 1"));
    let irqs = q.take_for(Duration::ZERO);
    assert!(irqs.contains(&"IRQ raise 8".to_string()), "{irqs:?}");
    q.q.check_alive();
}

#[test]
fn a_level_triggered_timer_holds_its_route_until_its_status_is_cleared() {
    let mut q = Intercepted::start("hpet-level");
    q.cmd(format!("writel {CFG:#x} 1"));
    let now = q.value(format!("readq {COUNTER:#x}"));
    q.cmd(format!("writeq {:#x} {:#x}", timer(2).1, now + 100_000));
    // Route 2 (bits 9-13), level, enabled.
    q.cmd(format!(
        "writeq {:#x} {:#x}",
        timer(2).0,
        (2 << 9) | TN_LEVEL | TN_ENABLE
    ));
    let irqs = q.take_when(WAIT, |i| raises(i, 2) >= 1);
    assert_eq!(irqs, ["IRQ raise 2"]);
    assert_eq!(q.value(format!("readl {STATUS:#x}")), 1 << 2);
    // Writing another timer's bit changes nothing; timer 2's clears it and the line.
    q.cmd(format!("writel {STATUS:#x} 1"));
    assert!(q.take_for(Duration::ZERO).is_empty());
    q.cmd(format!("writel {STATUS:#x} 4"));
    assert_eq!(q.take_for(Duration::ZERO), ["IRQ lower 2"]);
    assert_eq!(q.value(format!("readl {STATUS:#x}")), 0);
    // Fired again, then the counter halted: the line drops, the status bit stays, and
    // the interrupt comes back when the counter runs again.
    let now = q.value(format!("readq {COUNTER:#x}"));
    q.cmd(format!("writeq {:#x} {:#x}", timer(2).1, now + 100_000));
    let irqs = q.take_when(WAIT, |i| raises(i, 2) >= 1);
    assert_eq!(irqs, ["IRQ raise 2"]);
    q.cmd(format!("writel {CFG:#x} 0"));
    assert_eq!(q.take_for(Duration::ZERO), ["IRQ lower 2"]);
    assert_eq!(q.value(format!("readl {STATUS:#x}")), 1 << 2);
    // The comparator moves ten seconds ahead first: one behind the counter would fire
    // the timer again at once when the counter runs (QEMU's `hpet_set_timer`), and that
    // second edge would race with the status write below.
    let now = q.value(format!("readq {COUNTER:#x}"));
    q.cmd(format!(
        "writeq {:#x} {:#x}",
        timer(2).1,
        now + 1_000_000_000
    ));
    q.cmd(format!("writel {CFG:#x} 1"));
    assert_eq!(q.take_for(Duration::ZERO), ["IRQ raise 2"]);
    q.cmd(format!("writel {STATUS:#x} 4"));
    assert_eq!(q.take_for(Duration::ZERO), ["IRQ lower 2"]);
    // An FSB route is refused without msi=on: the bit stays clear.
    q.cmd(format!("writeq {:#x} {:#x}", timer(2).0, TN_FSB));
    assert_eq!(q.value(format!("readq {:#x}", timer(2).0)) & TN_FSB, 0);
    q.q.check_alive();
}

#[test]
fn a_32bit_one_shot_timer_interrupts_at_the_wrap_and_at_its_match() {
    let mut q = Intercepted::start("hpet-32bit");
    // Legacy mode (timer 0 on IRQ 0), the counter 2^20 ticks (10.5 ms) before its low half
    // wraps: the VM clock runs in real time here, and the timer is armed a moment after the
    // counter starts, which on a loaded host has been more than 256 ticks (the wrap missed).
    q.cmd(format!("writeq {COUNTER:#x} 0xfff00000"));
    q.cmd(format!("writel {:#x} {:#x}", timer(0).0, TN_32BIT));
    // In 32-bit mode the comparator's high half stays zero.
    q.cmd(format!("writel {:#x} 0x12345678", timer(0).1 + 4));
    q.cmd(format!("writel {:#x} 0x10000000", timer(0).1));
    assert_eq!(q.value(format!("readq {:#x}", timer(0).1)), 0x1000_0000);
    q.cmd(format!(
        "writel {:#x} {:#x}",
        timer(0).0,
        TN_32BIT | TN_ENABLE
    ));
    q.cmd(format!("writel {CFG:#x} 3"));
    // The wrap comes 10.5 ms later; the match 0x10000000 ticks (2.7 s) after it.
    let irqs = q.take_for(Duration::from_millis(500));
    assert_eq!(raises(&irqs, 0), 1, "the wrap's interrupt only: {irqs:?}");
    let irqs = q.take_when(WAIT, |i| raises(i, 0) >= 1);
    assert_eq!(raises(&irqs, 0), 1, "the match's interrupt: {irqs:?}");
    assert!(q.value(format!("readq {COUNTER:#x}")) >= 0x1_1000_0000);
    q.q.check_alive();
}

#[test]
fn the_counter_and_its_timers_stop_with_the_vm_and_a_reset_cancels_them() {
    let (q, mut qmp, _dir) = Qtest::start_with_qmp(QOMVM, "hpet-stop", &[]);
    let mut q = Intercepted::on(q);
    let ok = serde_json::json!({"return": {}});
    q.cmd(format!("writel {CFG:#x} 3"));
    assert_eq!(qmp.execute("stop", serde_json::json!({})), ok);
    let stopped = q.value(format!("readq {COUNTER:#x}"));
    // Timer 0 due 5 ms of VM time from now: not while the VM is stopped.
    q.cmd(format!("writeq {:#x} {:#x}", timer(0).1, stopped + 500_000));
    q.cmd(format!("writeq {:#x} {TN_ENABLE:#x}", timer(0).0));
    let irqs = q.take_for(Duration::from_millis(100));
    assert_eq!(raises(&irqs, 0), 0, "{irqs:?}");
    assert_eq!(
        q.value(format!("readq {COUNTER:#x}")),
        stopped,
        "the counter stood still"
    );
    assert_eq!(qmp.execute("cont", serde_json::json!({})), ok);
    let irqs = q.take_when(WAIT, |i| raises(i, 0) >= 1);
    assert_eq!(raises(&irqs, 0), 1, "{irqs:?}");
    assert!(q.value(format!("readq {COUNTER:#x}")) > stopped + 500_000);
    // Armed again 1 s ahead, then the machine resets: the timer is gone with the
    // registers.
    let now = q.value(format!("readq {COUNTER:#x}"));
    q.cmd(format!("writeq {:#x} {:#x}", timer(0).1, now + 100_000_000));
    assert_eq!(qmp.execute("system_reset", serde_json::json!({})), ok);
    let deadline = std::time::Instant::now() + WAIT;
    while q.value(format!("readl {CFG:#x}")) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reset did not come"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    q.irqs.clear();
    let irqs = q.take_for(Duration::from_millis(1500));
    assert_eq!(raises(&irqs, 0), 0, "{irqs:?}");
    assert_eq!(q.value(format!("readq {:#x}", timer(0).1)), u64::MAX);
    q.q.check_alive();
}

#[test]
fn no_hpet_is_a_machine_option_in_command_line_order() {
    for (name, args, present) in [
        (
            "hpet-order1",
            &["-no-hpet", "-machine", "hpet=on"][..],
            true,
        ),
        (
            "hpet-order2",
            &["-machine", "hpet=on", "-no-hpet"][..],
            false,
        ),
    ] {
        let mut q = start(name, args);
        let id = q.value(format!("readl {BASE:#x}"));
        assert_eq!(id == 0x8086_a201, present, "{args:?}: {id:#x}");
    }
    let out = std::process::Command::new(QOMVM)
        .args(["-M", "none", "-no-hpet", "-display", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qomvm: -no-hpet: Property 'none-machine.hpet' not found\n"
    );
}

const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

/// The tables firmware would place (qtest runs no firmware, but with `-bios` the board
/// hands them to fw_cfg as for a firmware boot).
fn firmware_tables(name: &str, extra: &[&str]) -> (Qtest, Vec<u8>) {
    let mut args = vec!["-bios", SEABIOS];
    args.extend_from_slice(extra);
    let mut q = start(name, &args);
    let tables = q.fw_cfg_file("etc/acpi/tables").expect("etc/acpi/tables");
    (q, tables)
}

#[test]
fn the_acpi_tables_describe_it_and_hpet_off_leaves_it_out() {
    if !std::path::Path::new(SEABIOS).exists() {
        test_support::skip::skip(format!("{SEABIOS} is missing (Debian package seabios)"));
        return;
    }
    let has = |t: &[u8], needle: &[u8]| t.windows(needle.len()).any(|w| w == needle);
    const PNP0103: [u8; 5] = [0x0c, 0x41, 0xd0, 0x01, 0x03];
    let (mut q, tables) = firmware_tables("hpet-acpi", &[]);
    // The table: its signature, then its length (the DSDT's device is named HPET too).
    let at = tables
        .windows(8)
        .position(|w| w == b"HPET\x38\0\0\0")
        .expect("an HPET table");
    let table = &tables[at..at + 56];
    assert_eq!(&table[36..40], &0x8086_a201u32.to_le_bytes());
    assert_eq!(&table[44..52], &BASE.to_le_bytes());
    assert!(has(&tables, &PNP0103), "PNP0103 in the DSDT");
    q.check_alive();
    drop(q);
    // ACPICA's disassembler reads the table as an OS would.
    if std::path::Path::new("/usr/bin/iasl").exists() {
        let dir = std::env::temp_dir().join(format!("qomvm-hpet-iasl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hpet.dat"), table).unwrap();
        let out = std::process::Command::new("iasl")
            .args(["-d", "hpet.dat"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dsl = std::fs::read_to_string(dir.join("hpet.dsl")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        for line in [
            "Signature : \"HPET\"",
            "Hardware Block ID : 8086A201",
            "Address : 00000000FED00000",
        ] {
            assert!(dsl.contains(line), "{line} in:\n{dsl}");
        }
    } else {
        test_support::skip::skip(
            "iasl is missing (Debian package acpica-tools): HPET table not disassembled",
        );
    }
    for (name, args) in [
        ("hpet-off", &["-machine", "hpet=off"][..]),
        ("hpet-no", &["-no-hpet"][..]),
    ] {
        let (mut q, tables) = firmware_tables(name, args);
        assert!(!has(&tables, b"HPET") && !has(&tables, &PNP0103), "{name}");
        assert_ne!(q.value(format!("readl {BASE:#x}")), 0x8086_a201, "{name}");
        q.check_alive();
    }
}

/// The board's HPET on a machine built in this process.
fn board_hpet(machine: &qom::ObjectRef) -> Typed<hw::timer::hpet::Hpet> {
    machine
        .child("unattached")
        .unwrap()
        .children()
        .into_iter()
        .find_map(|(_, d)| Typed::<hw::timer::hpet::Hpet>::new(d))
        .expect("the pc has an HPET")
}

#[test]
fn its_state_migrates_with_the_counter_where_it_stood_and_its_timers_pending() {
    // Two pc boards on qtest. The source never starts: its VM clock stands still, so the
    // saved counter must come back exactly, and its timer 1 (level, route 2) is 1 ms away.
    let source = test_support::qtest::pc_on_qtest(64 << 20);
    let mem = machine_state(&source).unwrap().system_memory().clone();
    mem.write(COUNTER, 0xabcd_0000, 8);
    mem.write(timer(1).1, 0xabcd_0000 + 100_000, 8);
    mem.write(timer(1).0, TN_ENABLE | TN_LEVEL | (2 << 9), 8);
    mem.write(timer(2).2, 0xfee0_0000_0000_0041, 8);
    mem.write(CFG, 1, 4);
    let saved = board_hpet(&source).save_state().unwrap();

    let target = test_support::qtest::pc_on_qtest(64 << 20);
    let target_ms = machine_state(&target).unwrap();
    board_hpet(&target).load_state(&saved).unwrap();
    let tmem = target_ms.system_memory().clone();
    for reg in [CFG, COUNTER, timer(1).0, timer(1).1, timer(2).2, STATUS] {
        assert_eq!(tmem.read(reg, 8), mem.read(reg, 8), "register {reg:#x}");
    }
    assert_eq!(tmem.read(COUNTER, 8), 0xabcd_0000);
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !test_support::qtest::irq_level(&target, 2),
        "not before the target runs"
    );
    // Running, the counter goes on from there and the pending timer fires.
    hw::core::runstate::vm_start(target_ms).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !test_support::qtest::irq_level(&target, 2) {
        assert!(std::time::Instant::now() < deadline, "timer 1 never fired");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(tmem.read(COUNTER, 8) >= 0xabcd_0000 + 100_000);
    assert_eq!(tmem.read(STATUS, 8), 1 << 1);

    // A stream with another number of timers is refused.
    let other = test_support::qtest::pc_on_qtest(64 << 20);
    let hpet = board_hpet(&other);
    let mut fewer = saved.clone();
    let timers: Vec<serde_json::Value> = saved.get("timers").unwrap();
    fewer.put("timers", &timers[..2]);
    let err = hpet.load_state(&fewer).unwrap_err().to_string();
    assert!(err.contains("has 2 timers, this one 3"), "{err}");
}

/// An HPET on a bare KVM machine, as the board maps it.
fn kvm_hpet(vm: &TestVm, msi: bool) {
    let ms = machine_state(&vm.machine).unwrap();
    let dev = qdev_new("hpet").unwrap();
    dev.property_parse("hpet-intcap", "0x4").unwrap();
    dev.property_parse("msi", if msi { "on" } else { "off" })
        .unwrap();
    vm.machine.add_child("hpet", &dev).unwrap();
    Typed::<DeviceState>::new(dev.clone())
        .unwrap()
        .set_services(ms.services());
    qdev_realize(&dev, None).unwrap();
}

#[test]
fn a_kvm_guest_takes_its_legacy_and_msi_interrupts() {
    require_kvm!();
    let vm = TestVm::bare(1, "qemu64", 2 << 20);
    kvm_hpet(&vm, true);
    let config = IrqGuestConfig {
        ioapic: vec![(2, 0x50), (8, 0x58)],
        ..Default::default()
    };
    irq_guest::load(&vm, &config);
    let ms = machine_state(&vm.machine).unwrap();
    let ops = ms.accel_ops().unwrap().clone();
    // Through the run state, as `cont` does: the HPET's clock starts with the VM.
    hw::core::runstate::vm_start(ms).unwrap();
    assert!(irq_guest::wait_ready(&vm), "the guest did not set up");
    let mem = ms.system_memory().clone();
    // Legacy mode; timer 0 once in 1 ms (IRQ 0: I/O APIC pin 2), then timer 1 periodic
    // every 2 ms (IRQ 8).
    mem.write(CFG, 3, 4);
    let now = mem.read(COUNTER, 8);
    mem.write(timer(0).1, now + 100_000, 8);
    mem.write(timer(0).0, TN_ENABLE, 8);
    assert_eq!(
        irq_guest::wait_marks(&vm, 1, WAIT),
        [0x50],
        "timer 0 on IRQ 0"
    );
    let now = mem.read(COUNTER, 8);
    mem.write(timer(1).0, TN_ENABLE | TN_PERIODIC | TN_SETVAL, 8);
    mem.write(timer(1).1, now + 200_000, 8);
    mem.write(timer(1).1, 200_000, 8);
    // The periodic timer may fire again before the marks are read: the first four count.
    let marks = irq_guest::wait_marks(&vm, 4, WAIT);
    let first = &marks[..marks.len().min(4)];
    assert_eq!(
        first,
        &[0x50, 0x58, 0x58, 0x58][..first.len()],
        "timer 1 periodic on IRQ 8"
    );
    assert!(
        marks.len() >= 4 && marks[4..].iter().all(|&m| m == 0x58),
        "{marks:x?}"
    );
    mem.write(timer(1).0, 0, 8);
    // Timer 2 as an MSI to vector 0x41 on APIC ID 0.
    let seen = irq_guest::wait_marks(&vm, 64, Duration::from_millis(50)).len();
    let now = mem.read(COUNTER, 8);
    mem.write(timer(2).2, (0xfee0_0000u64 << 32) | 0x41, 8);
    mem.write(timer(2).1, now + 100_000, 8);
    mem.write(timer(2).0, TN_ENABLE | TN_FSB, 8);
    let marks = irq_guest::wait_marks(&vm, seen + 1, WAIT);
    assert_eq!(marks.last(), Some(&0x41), "the FSB route's MSI: {marks:x?}");
    ops.shutdown();
}

/// The in-kernel PIT's `KVM_PIT_FLAGS_HPET_LEGACY`, as the accelerator saves it.
fn pit_hpet_legacy(ms: &hw::core::machine::MachineState) -> bool {
    let section = ms.accel_ops().unwrap().save_vm_state().unwrap();
    let pit = section.get_bytes("pit").unwrap();
    let at = std::mem::offset_of!(kvm_bindings::kvm_pit_state2, flags);
    let flags = u32::from_le_bytes(pit[at..at + 4].try_into().unwrap());
    flags & kvm_bindings::KVM_PIT_FLAGS_HPET_LEGACY != 0
}

#[test]
fn legacy_mode_stops_the_in_kernel_pit_until_it_ends_or_the_machine_resets() {
    require_kvm!();
    let machine = test_support::vm::pc_machine("kvm", 64 << 20);
    let ms = machine_state(&machine).unwrap();
    let mem = ms.system_memory().clone();
    assert!(!pit_hpet_legacy(ms));
    mem.write(CFG, 3, 4);
    assert!(pit_hpet_legacy(ms), "legacy mode on");
    mem.write(CFG, 1, 4);
    assert!(!pit_hpet_legacy(ms), "legacy mode off");
    mem.write(CFG, 2, 4);
    assert!(pit_hpet_legacy(ms));
    hw::core::runstate::qemu_system_reset(
        ms,
        hw::core::runstate::ShutdownCause::HostQmpSystemReset,
    );
    assert!(!pit_hpet_legacy(ms), "a reset gives IRQ 0 back to the PIT");
    assert_eq!(mem.read(CFG, 4), 0);
    ms.accel_ops().unwrap().shutdown();
}
