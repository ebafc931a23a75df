//! Issue 15, items 4-6, end to end: Multiboot test kernels built here run by the `qomvm`
//! binary on KVM, watched over QMP.
//!
//! * `-machine pit=off`: the kernel programs PIT counter 0 and reads it back; with no PIT
//!   the ports float (0xff).
//! * S3: the kernel checks the DSDT has `\_S3_`, copies a real-mode stub below 1 MiB, puts
//!   its address in the FACS waking vector, marks its own memory, arms the RTC alarm two
//!   seconds ahead (PM1_EN.RTC_EN), and writes SLP_TYP 1 | SLP_EN. The machine reports
//!   `SUSPEND` and `suspended`; the alarm (or `system_wakeup`, or the power button) wakes
//!   it (`WAKEUP`), and the stub, entered in real mode at the waking vector, checks the
//!   mark survived and exits through isa-debug-exit with PM1_STS >> 10 (WAK_STS and the
//!   wake source's status bit).
//! * pvpanic: the kernel reads the supported events (3), reports a crash-loaded kernel,
//!   then a panic, then prints `C` on COM1; each `-action panic=` value gets its event,
//!   status and exit.
//!
//! Skipped, with the reason printed, where `/dev/kvm` is not usable.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::elf::{Elf32Kernel, PF_R, PF_W, PF_X};
use test_support::guest::{Asm, Cond, EAX, EBX, ECX, EDI, EDX, ESI};
use test_support::require_kvm;

/// Where the kernel's one segment is loaded (and linked).
const LOAD: u32 = 0x10_0000;
/// File offset of the kernel's data; the memory mark is its first byte.
const DATA_OFF: usize = 0x1000;
/// Where the kernel copies the real-mode resume stub (the waking vector).
const WAKING_VECTOR: u32 = 0x7000;
const MARK: u8 = 0x5a;
const EXIT_PORT: u16 = 0xf4;
const COM1: u16 = 0x3f8;
/// Where qomvm's ACPI tables start (the RSDP).
const RSDP: u32 = 0xe0000;
const PM1_STS: u16 = 0x600;
const PM1_EN: u16 = 0x602;
const PM1_CNT: u16 = 0x604;
const PVPANIC: u16 = 0x505;

/// Exit codes the kernels write (the process exits with `(code << 1) | 1`).
const NO_S3: u8 = 0x30;
const MARK_LOST: u8 = 0x7f;
const BAD_PVPANIC: u8 = 0x7e;

fn status(code: u8) -> i32 {
    (i32::from(code) << 1) | 1
}

fn kernel(code: &[u8], data: &[u8]) -> Vec<u8> {
    Elf32Kernel {
        vaddr: LOAD,
        paddr: LOAD,
        flags: PF_R | PF_W | PF_X,
        bss: 0,
        data_off: DATA_OFF,
        code,
        data,
    }
    .build()
}

/// Programs PIT counter 0 (mode 2, count 0x1234), latches it and exits with 1 if its high
/// byte reads 0xff (no PIT), 2 if not.
fn pit_kernel() -> Vec<u8> {
    let mut a = Asm::flat32();
    a.mov_al(0x34).out_al(0x43);
    a.mov_al(0x34).out_al(0x40).mov_al(0x12).out_al(0x40);
    a.mov_al(0x00).out_al(0x43);
    a.in_al(0x40).in_al(0x40);
    let no_pit = a.label();
    a.cmp_al(0xff).jcc(Cond::E, no_pit);
    a.exit(EXIT_PORT, 2);
    a.bind(no_pit);
    a.exit(EXIT_PORT, 1);
    kernel(&a.finish(), &[0; 16])
}

/// The resume stub, in real mode at the waking vector: checks the mark at `LOAD +
/// DATA_OFF` (through DS = 0xffff) and exits with PM1_STS >> 10.
fn resume_stub() -> Vec<u8> {
    let mut a = Asm::real_mode(u64::from(WAKING_VECTOR));
    a.mov_ax_imm16(0xffff).emit(&[0x8e, 0xd8]); // mov ds, ax
    let offset = (LOAD + DATA_OFF as u32 - 0xffff0) as u16;
    a.emit(&[0xa0]).emit(&offset.to_le_bytes()); // mov al, [offset]
    let lost = a.label();
    a.cmp_al(MARK).jcc_short(Cond::Ne, lost);
    a.mov_dx(PM1_STS).in_ax_dx();
    a.emit(&[0xc1, 0xe8, 10]); // shr ax, 10
    a.mov_dx(EXIT_PORT).out_dx_al().hlt_loop();
    a.bind(lost);
    a.exit(EXIT_PORT, MARK_LOST);
    a.finish()
}

/// The S3 kernel (see the module docs); without `rtc_alarm` it sleeps until woken by the
/// monitor.
fn s3_kernel(rtc_alarm: bool) -> Vec<u8> {
    let stub = resume_stub();
    let stub_addr = LOAD + DATA_OFF as u32 + 0x10;
    let mut a = Asm::flat32();
    // RSDP -> XSDT -> FADT (its first entry) -> DSDT: look for \_S3_.
    a.load_abs(EAX, RSDP + 24);
    a.load(EBX, EAX, 36);
    a.load(ESI, EBX, 40);
    a.load(ECX, ESI, 4);
    a.mov(EDI, ESI);
    let scan = a.here();
    let found = a.label();
    a.load(EAX, EDI, 0)
        .cmp_imm(EAX, u32::from_le_bytes(*b"_S3_"))
        .jcc(Cond::E, found);
    a.add_imm(EDI, 1).sub_imm(ECX, 1).jcc(Cond::Ne, scan);
    a.exit(EXIT_PORT, NO_S3);
    a.bind(found);
    // FACS.firmware_waking_vector = the stub's copy.
    a.load(EDX, EBX, 36);
    a.mov_imm(EAX, WAKING_VECTOR).store(EDX, 12, EAX);
    a.mov_imm(ESI, stub_addr)
        .mov_imm(EDI, WAKING_VECTOR)
        .mov_imm(ECX, stub.len() as u32)
        .rep_movsb();
    a.mov_imm(EAX, MARK.into())
        .store_abs(LOAD + DATA_OFF as u32, EAX);
    if rtc_alarm {
        // Binary, 24-hour; alarm at now + 2 s whatever the minute and hour; AIE.
        a.mov_al(0x0b).out_al(0x70).mov_al(0x06).out_al(0x71);
        a.mov_al(0x00).out_al(0x70).in_al(0x71);
        a.emit(&[0x04, 2]); // add al, 2
        let in_range = a.label();
        a.cmp_al(60).jcc_short(Cond::B, in_range);
        a.emit(&[0x2c, 60]); // sub al, 60
        a.bind(in_range);
        a.emit(&[0x88, 0xc3]); // mov bl, al
        a.mov_al(0x01).out_al(0x70).mov_al_bl().out_al(0x71);
        a.mov_al(0x03).out_al(0x70).mov_al(0xff).out_al(0x71);
        a.mov_al(0x05).out_al(0x70).mov_al(0xff).out_al(0x71);
        a.mov_al(0x0c).out_al(0x70).in_al(0x71);
        a.mov_al(0x0b).out_al(0x70).mov_al(0x26).out_al(0x71);
        a.mov_ax_imm16(1 << 10).out_ax(PM1_EN);
    }
    // SLP_TYP 1 (\_S3_), SLP_EN, SCI_EN kept.
    a.mov_ax_imm16((1 << 10) | (1 << 13) | 1).out_ax(PM1_CNT);
    a.hlt_loop();
    let mut data = vec![0u8; 0x10];
    data.extend_from_slice(&stub);
    kernel(&a.finish(), &data)
}

/// Reads the pvpanic events (must be 3), reports a crash-loaded kernel, then a panic, then
/// prints `C` on COM1 and halts.
fn pvpanic_kernel() -> Vec<u8> {
    let mut a = Asm::flat32();
    let bad = a.label();
    a.in_al(PVPANIC).cmp_al(3).jcc(Cond::Ne, bad);
    a.mov_al(2).out_al(PVPANIC);
    a.mov_al(1).out_al(PVPANIC);
    a.mov_al(b'C').out_al(COM1);
    a.hlt_loop();
    a.bind(bad);
    a.exit(EXIT_PORT, BAD_PVPANIC);
    kernel(&a.finish(), &[0; 16])
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running qomvm (`-S`, a QMP socket, the kernel), killed on drop.
struct Vm {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Vm {
    fn start(kernel_image: &[u8], extra: &[&str]) -> Vm {
        let dir = std::env::temp_dir().join(format!(
            "qomvm-power-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel_path = dir.join("kernel.elf");
        std::fs::write(&kernel_path, kernel_image).unwrap();
        let sock = dir.join("qmp.sock");
        let qmp = format!("unix:{},server=on,wait=off", sock.display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
            .args([
                "-M",
                "pc",
                "-accel",
                "kvm",
                "-m",
                "64M",
                "-S",
                "-nodefaults",
            ])
            .args(["-display", "none", "-serial", "stdio"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"])
            .args(["-qmp", &qmp, "-kernel"])
            .arg(&kernel_path)
            .args(extra)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("qomvm starts");
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        Vm {
            child,
            dir,
            sock,
            stdout: Some(stdout),
        }
    }

    /// A negotiated QMP client.
    fn qmp(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no QMP socket: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut c = Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
            unread_replies: 0,
        };
        assert!(c.recv().get("QMP").is_some());
        assert_eq!(c.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
        c
    }

    /// The exit status, waiting up to 30 s.
    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "qomvm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the guest printed on COM1 (kills qomvm first).
    fn serial(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = self.stdout.take().unwrap().join().unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
    /// Replies to [`Client::send`] still to come, skipped when they do.
    unread_replies: usize,
}

impl Client {
    /// The next message, replies to [`Client::send`] left out.
    fn recv(&mut self) -> Value {
        loop {
            let v = self.recv_any();
            if v.get("event").is_none() && self.unread_replies > 0 {
                self.unread_replies -= 1;
                continue;
            }
            return v;
        }
    }

    fn recv_any(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("a QMP message");
        assert!(
            n > 0,
            "qomvm closed the QMP connection; events before: {:?}",
            self.events
        );
        serde_json::from_str(&line).unwrap()
    }

    /// Sends command `name` without waiting for its reply: a command that lets the guest
    /// end the run at once may take the process down before the reply is written (as
    /// QEMU's isa-debug-exit, which calls exit(), may).
    fn send(&mut self, name: &str) {
        let msg = json!({"execute": name}).to_string();
        self.writer.write_all(msg.as_bytes()).unwrap();
        self.unread_replies += 1;
    }

    /// `cont`, without waiting for its reply.
    fn start(&mut self) {
        self.send("cont");
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args}).to_string();
        self.writer.write_all(msg.as_bytes()).unwrap();
        loop {
            let v = self.recv();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// The next event called `name` (the ones before it are kept, in order).
    fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.recv();
            if v["event"] == name {
                return v;
            }
            self.events.push(v);
        }
    }

    /// The next event still to come (replies on the way are skipped).
    fn next_event(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v.get("event").is_some() {
                return v;
            }
        }
    }

    fn status(&mut self) -> Value {
        self.cmd("query-status", json!({}))["return"].clone()
    }
}

#[test]
fn without_a_pit_the_ports_float_and_the_guest_runs() {
    require_kvm!();
    for (extra, code) in [(&[][..], 2), (&["-machine", "pit=off"][..], 1)] {
        let mut vm = Vm::start(&pit_kernel(), extra);
        vm.qmp().start();
        assert_eq!(vm.wait_exit(), status(code), "{extra:?}");
    }
}

/// Runs the S3 kernel to its sleep: `SUSPEND`, status `suspended`, and it stays asleep
/// for a while (no spurious wake-up, `cont` does not wake it).
fn sleep(vm: &Vm, rtc_alarm: bool) -> Client {
    let mut c = vm.qmp();
    assert_eq!(
        c.cmd("system_wakeup", json!({}))["error"]["desc"],
        "Unable to wake up: guest is not in suspended state"
    );
    c.cmd("cont", json!({}));
    c.event("SUSPEND");
    assert_eq!(
        c.status(),
        json!({"status": "suspended", "singlestep": false, "running": false})
    );
    if !rtc_alarm {
        assert_eq!(c.cmd("cont", json!({})), json!({"return": {}}));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(c.status()["status"], "suspended");
    }
    c
}

#[test]
fn the_rtc_alarm_wakes_a_suspended_guest_at_its_waking_vector() {
    require_kvm!();
    let mut vm = Vm::start(&s3_kernel(true), &[]);
    let mut c = sleep(&vm, true);
    let before = Instant::now();
    c.event("WAKEUP");
    assert!(before.elapsed() < Duration::from_secs(5));
    // WAK_STS (bit 15) and RTC_STS (bit 10): 0x21.
    assert_eq!(vm.wait_exit(), status(0x21));
    assert!(
        !c.events
            .iter()
            .any(|e| e["event"] == "RESET" || e["event"] == "STOP"),
        "{:?}",
        c.events
    );
}

#[test]
fn system_wakeup_and_the_power_button_wake_a_suspended_guest() {
    require_kvm!();
    let mut vm = Vm::start(&s3_kernel(false), &[]);
    let mut c = sleep(&vm, false);
    // The reply may lose the race with the guest's exit once awake: not waited for.
    c.send("system_wakeup");
    c.event("WAKEUP");
    // WAK_STS and, as QEMU reports a monitor's wake-up, PWRBTN_STS (bit 8): 0x20.
    assert_eq!(vm.wait_exit(), status(0x20));

    let mut vm = Vm::start(&s3_kernel(false), &[]);
    let mut c = sleep(&vm, false);
    c.send("system_powerdown");
    c.event("POWERDOWN");
    c.event("WAKEUP");
    assert_eq!(vm.wait_exit(), status(0x20));
}

#[test]
fn disable_s3_leaves_s3_out_of_the_dsdt() {
    require_kvm!();
    let mut vm = Vm::start(&s3_kernel(true), &["-global", "PIIX4_PM.disable_s3=1"]);
    vm.qmp().start();
    assert_eq!(vm.wait_exit(), status(NO_S3));
}

/// Runs the pvpanic kernel under `extra` and returns the VM, a client with the
/// `GUEST_PANICKED` event, and that event's data.
fn panic_with(extra: &[&str]) -> (Vm, Client, Value) {
    let vm = Vm::start(
        &pvpanic_kernel(),
        &[&["-device", "pvpanic"][..], extra].concat(),
    );
    let mut c = vm.qmp();
    c.start();
    assert_eq!(
        c.event("GUEST_CRASHLOADED")["data"],
        json!({"action": "run"})
    );
    let data = c.event("GUEST_PANICKED")["data"].clone();
    (vm, c, data)
}

#[test]
fn pvpanic_pause_stops_the_guest() {
    require_kvm!();
    let (_vm, mut c, data) = panic_with(&["-action", "panic=pause"]);
    assert_eq!(data, json!({"action": "pause"}));
    c.event("STOP");
    assert_eq!(c.status()["status"], "guest-panicked");
    assert_eq!(
        c.cmd("cont", json!({}))["error"]["desc"],
        "Resetting the Virtual Machine is required"
    );
}

#[test]
fn pvpanic_shutdown_and_exit_failure_end_the_run() {
    require_kvm!();
    for (action, code) in [("shutdown", 0), ("exit-failure", 1)] {
        let (mut vm, mut c, data) = panic_with(&["-action", &format!("panic={action}")]);
        assert_eq!(data, json!({"action": "poweroff"}), "{action}");
        // QEMU 7.2's order: GUEST_PANICKED, then SHUTDOWN, no STOP.
        let next = c.next_event();
        assert_eq!(next["event"], "SHUTDOWN", "{next}");
        assert_eq!(
            next["data"],
            json!({"guest": true, "reason": "guest-panic"})
        );
        assert_eq!(vm.wait_exit(), code, "{action}");
    }
    // The default is panic=shutdown; -no-shutdown turns it into a pause.
    let (_vm, mut c, data) = panic_with(&["-no-shutdown"]);
    assert_eq!(data, json!({"action": "pause"}));
    c.event("STOP");
    assert_eq!(c.status()["status"], "guest-panicked");
}

#[test]
fn pvpanic_none_lets_the_guest_go_on_and_set_action_changes_it() {
    require_kvm!();
    let (mut vm, mut c, data) = panic_with(&["-action", "panic=none"]);
    assert_eq!(data, json!({"action": "run"}));
    assert_eq!(c.status()["status"], "running");
    // The guest goes on to print `C` after the panic (read once qomvm is gone).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.serial(), "C");

    // set-action over QMP: panic=pause from panic=none.
    let vm = Vm::start(
        &pvpanic_kernel(),
        &["-device", "pvpanic", "-action", "panic=none"],
    );
    let mut c = vm.qmp();
    assert_eq!(
        c.cmd("set-action", json!({"panic": "bogus"}))["error"]["desc"],
        "Parameter 'panic' does not accept value 'bogus'"
    );
    assert_eq!(
        c.cmd("set-action", json!({"panic": "pause", "watchdog": "none"})),
        json!({"return": {}})
    );
    c.cmd("cont", json!({}));
    assert_eq!(
        c.event("GUEST_PANICKED")["data"],
        json!({"action": "pause"})
    );
    c.event("STOP");
}
