//! Issue 6's end-to-end acceptance: a kvm-unit-tests style Multiboot kernel, built here
//! (no external assembler), run by the `qomvm` binary with the issue's exact command line.
//!
//! The kernel checks what the loader handed it (magic, memory, command line, module),
//! reads fw_cfg, exercises `pc-testdev` and `pci-testdev`, starts the APs with INIT/SIPI,
//! prints a line on COM1 and exits through `isa-debug-exit` with 0, or with the number of
//! the first check that failed (see [`CHECKS`]). The KVM runs are skipped, and the skip
//! reported (`test_support::skip`), where `/dev/kvm` is not usable.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_support::elf::{Elf32Kernel, PF_R, PF_W, PF_X};
use test_support::guest::{self, Asm, Cond, EAX, EBP, ECX, EDI, EDX, ESI};
use test_support::vm::kvm_unusable;

/// Where the kernel's one segment is loaded (and linked: vaddr = paddr).
const LOAD: u32 = 0x10_0000;
/// File offset of the kernel's data.
const DATA_OFF: usize = 0x1000;

/// The AP trampoline's page (SIPI vector 0x08) and its data: the check-in counter and one
/// byte per APIC ID, set to 1 by the AP with that ID.
const TRAMPOLINE: u32 = 0x8000;
const TRAMPOLINE_LEN: usize = 0x200;
const AP_COUNT_OFF: usize = 0x40;
const AP_SEEN_OFF: usize = 0x100;

/// Devices and ports of the issue's command line.
const EXIT_PORT: u16 = 0xf4;
const COM1: u16 = 0x3f8;
const FW_CFG_CTL: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;
const PC_TESTDEV_PORT: u16 = 0xe0;
const PC_TESTDEV_MEM: u32 = 0xff00_0000;
const PCI_CONFIG_ADDR: u16 = 0xcf8;
const PCI_CONFIG_DATA: u16 = 0xcfc;
const PCI_TESTDEV_ID: u32 = 0x0005_1b36;
const LAPIC: u32 = 0xfee0_0000;

/// QEMU's default `-m` (what the issue's command line gets).
const RAM_SIZE: u32 = 128 << 20;

const ARGS: &str = "arg1 arg2";
const ENV: &[u8] = b"QOMVM_TEST=1\nANSWER=42\n";
const PASS_LINE: &str = "qomvm test kernel: PASS";
const FAIL_LINE: &str = "qomvm test kernel: FAIL";

/// The kernel's checks: exit code `i + 1` means `CHECKS[i]` failed.
const CHECKS: &[&str] = &[
    "EAX == 0x2BADB002 at entry",
    "Multiboot flags have mem, cmdline and mods",
    "mem_upper == RAM size / 1 KiB - 1024",
    "cmdline has a space after the kernel path",
    "cmdline after the kernel path == the -append text",
    "mods_count == 1",
    "module length == the -initrd file's length",
    "module bytes == the -initrd file's content",
    "fw_cfg signature == \"QEMU\"",
    "fw_cfg NB_CPUS == -smp",
    "fw_cfg RAM_SIZE == 128 MiB",
    "pc-testdev port 0xe0 scratch reads back",
    "pc-testdev MMIO scratch at 0xff000000 reads back",
    "pci-testdev (1b36:0005) found on bus 0",
    "pci-testdev BAR0 assigned",
    "pci-testdev test 0's count is 0 before the write",
    "pci-testdev test 0's count is 1 after the write",
    "APs checked in before the TSC deadline",
    "exactly N-1 APs checked in",
    "the BSP (APIC ID 0) did not run the trampoline",
    "every AP reported its APIC ID",
];

fn check_code(name: &str) -> u8 {
    CHECKS
        .iter()
        .position(|c| *c == name)
        .expect("a known check") as u8
        + 1
}

/// What a kernel expects and how it ends.
struct Spec {
    ncpus: u8,
    /// Use x2APIC MSRs for the IPIs instead of the xAPIC MMIO page.
    x2apic: bool,
    /// The isa-debug-exit code once every check passed.
    final_code: u8,
}

fn final_line(code: u8) -> String {
    if code == 0 {
        PASS_LINE.to_string()
    } else {
        format!("qomvm test kernel: checks passed, exiting with {code}")
    }
}

/// The kernel's data, laid out from `LOAD + DATA_OFF`.
struct Data {
    bytes: Vec<u8>,
}

impl Data {
    fn add(&mut self, b: &[u8]) -> u32 {
        let addr = LOAD + (DATA_OFF + self.bytes.len()) as u32;
        self.bytes.extend_from_slice(b);
        addr
    }
}

/// The 16-bit AP trampoline, copied to `TRAMPOLINE` (the AP starts at CS = 0x0800, IP = 0):
///
/// ```text
///     cli
///     xor ax, ax ; mov ds, ax
///     mov eax, 1 ; cpuid ; shr ebx, 24        ; initial APIC ID
///     mov byte [bx + seen], 1
///     lock inc byte [count]
/// 1:  hlt ; jmp 1b
/// ```
fn trampoline() -> Vec<u8> {
    let seen = (TRAMPOLINE as usize + AP_SEEN_OFF) as u16;
    let count = (TRAMPOLINE as usize + AP_COUNT_OFF) as u16;
    let mut t = vec![0xfa, 0x31, 0xc0, 0x8e, 0xd8];
    t.extend_from_slice(&[0x66, 0xb8, 1, 0, 0, 0, 0x0f, 0xa2, 0x66, 0xc1, 0xeb, 24]);
    t.extend_from_slice(&[0xc6, 0x87]);
    t.extend_from_slice(&seen.to_le_bytes());
    t.push(1);
    t.extend_from_slice(&[0xf0, 0xfe, 0x06]);
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    assert!(t.len() <= AP_COUNT_OFF);
    t.resize(TRAMPOLINE_LEN, 0);
    t
}

/// Emits: print the `len` bytes at `addr` on COM1, polling LSR.THRE before each.
fn print(a: &mut Asm, addr: u32, len: u32) {
    a.mov_imm(ESI, addr).mov_imm(ECX, len);
    let next = a.here();
    a.mov_dx(COM1 + 5);
    let wait = a.here();
    a.in_al_dx().test_al(0x20).jcc(Cond::E, wait);
    a.mov_dx(COM1).lodsb().out_dx_al().loop_back(next);
}

/// Emits: EAX = the next `n` (1..=4) bytes of the selected fw_cfg item, little-endian.
fn fw_cfg_read(a: &mut Asm, n: u8) {
    a.xor(EAX, EAX).mov_dx(FW_CFG_DATA);
    for _ in 0..n {
        a.in_al_dx().ror_imm(EAX, 8);
    }
    if n < 4 {
        a.ror_imm(EAX, 8 * (4 - n));
    }
}

/// Emits: select fw_cfg item `key`.
fn fw_cfg_select(a: &mut Asm, key: u16) {
    a.mov_imm(EAX, u32::from(key)).out_ax(FW_CFG_CTL);
}

/// A Multiboot v1 ELF32 kernel for `spec`.
fn build_kernel(spec: &Spec) -> Vec<u8> {
    let mut a = Asm::flat32();
    let mut data = Data { bytes: Vec::new() };
    let mut fails: Vec<(guest::Label, u8)> = Vec::new();
    // `check(a, cc, name)`: continue if `cc` holds, else fail with the check's code.
    let mut check = |a: &mut Asm, pass: Cond, name: &str| {
        let l = a.label();
        a.jcc(!pass, l);
        fails.push((l, check_code(name)));
    };

    // 1. Multiboot.
    a.cmp_imm(EAX, 0x2bad_b002);
    check(&mut a, Cond::E, "EAX == 0x2BADB002 at entry");
    a.mov(EBP, guest::EBX);
    a.load(EAX, EBP, 0)
        .and_imm(EAX, 0b1101)
        .cmp_imm(EAX, 0b1101);
    check(
        &mut a,
        Cond::E,
        "Multiboot flags have mem, cmdline and mods",
    );
    a.load(EAX, EBP, 8).cmp_imm(EAX, RAM_SIZE / 1024 - 1024);
    check(&mut a, Cond::E, "mem_upper == RAM size / 1 KiB - 1024");
    // argv[0] is the kernel's path: skip to the first space, then compare the rest.
    let args = data.add(format!("{ARGS}\0").as_bytes());
    a.load(ESI, EBP, 16);
    let scan = a.here();
    let space = a.label();
    a.lodsb()
        .cmp_al(b' ')
        .jcc(Cond::E, space)
        .test_al(0xff)
        .jcc(Cond::Ne, scan);
    a.test_al(0); // ZF = 1: "no space" fails below
    check(
        &mut a,
        Cond::Ne,
        "cmdline has a space after the kernel path",
    );
    a.bind(space);
    a.mov_imm(EDI, args)
        .mov_imm(ECX, ARGS.len() as u32 + 1)
        .repe_cmpsb();
    check(
        &mut a,
        Cond::E,
        "cmdline after the kernel path == the -append text",
    );
    a.load(EAX, EBP, 20).cmp_imm(EAX, 1);
    check(&mut a, Cond::E, "mods_count == 1");
    let env = data.add(ENV);
    a.load(EDX, EBP, 24)
        .load(ESI, EDX, 0)
        .load(EAX, EDX, 4)
        .sub(EAX, ESI);
    a.cmp_imm(EAX, ENV.len() as u32);
    check(
        &mut a,
        Cond::E,
        "module length == the -initrd file's length",
    );
    a.mov_imm(EDI, env)
        .mov_imm(ECX, ENV.len() as u32)
        .repe_cmpsb();
    check(
        &mut a,
        Cond::E,
        "module bytes == the -initrd file's content",
    );

    // 2. fw_cfg through the traditional ports.
    fw_cfg_select(&mut a, 0x00);
    fw_cfg_read(&mut a, 4);
    a.cmp_imm(EAX, u32::from_le_bytes(*b"QEMU"));
    check(&mut a, Cond::E, "fw_cfg signature == \"QEMU\"");
    fw_cfg_select(&mut a, 0x05);
    fw_cfg_read(&mut a, 2);
    a.cmp_imm(EAX, u32::from(spec.ncpus));
    check(&mut a, Cond::E, "fw_cfg NB_CPUS == -smp");
    fw_cfg_select(&mut a, 0x03);
    fw_cfg_read(&mut a, 4);
    a.cmp_imm(EAX, RAM_SIZE);
    check(&mut a, Cond::E, "fw_cfg RAM_SIZE == 128 MiB");
    fw_cfg_read(&mut a, 4);
    a.cmp_imm(EAX, 0);
    check(&mut a, Cond::E, "fw_cfg RAM_SIZE == 128 MiB");

    // 3. pc-testdev: the port scratch register and the MMIO scratch memory.
    a.mov_imm(EAX, 0x1234_5678).out_eax(PC_TESTDEV_PORT);
    a.xor(EAX, EAX)
        .in_eax(PC_TESTDEV_PORT)
        .cmp_imm(EAX, 0x1234_5678);
    check(&mut a, Cond::E, "pc-testdev port 0xe0 scratch reads back");
    a.mov_imm(EAX, 0xcafe_f00d).store_abs(PC_TESTDEV_MEM, EAX);
    a.mov_imm(EAX, 0x0bad_c0de)
        .store_abs(PC_TESTDEV_MEM + 0xfffc, EAX);
    a.load_abs(EAX, PC_TESTDEV_MEM).cmp_imm(EAX, 0xcafe_f00d);
    check(
        &mut a,
        Cond::E,
        "pc-testdev MMIO scratch at 0xff000000 reads back",
    );
    a.load_abs(EAX, PC_TESTDEV_MEM + 0xfffc)
        .cmp_imm(EAX, 0x0bad_c0de);
    check(
        &mut a,
        Cond::E,
        "pc-testdev MMIO scratch at 0xff000000 reads back",
    );

    // 4. pci-testdev: scan bus 0, read BAR0, run test 0.
    a.mov_imm(ECX, 0x8000_0000);
    let next_dev = a.here();
    let found = a.label();
    a.mov(EAX, ECX)
        .out_eax(PCI_CONFIG_ADDR)
        .in_eax(PCI_CONFIG_DATA);
    a.cmp_imm(EAX, PCI_TESTDEV_ID).jcc(Cond::E, found);
    a.add_imm(ECX, 0x800)
        .cmp_imm(ECX, 0x8001_0000)
        .jcc(Cond::B, next_dev);
    a.cmp(ECX, ECX); // ZF = 1: "not found" fails below
    check(&mut a, Cond::Ne, "pci-testdev (1b36:0005) found on bus 0");
    a.bind(found);
    a.mov(EAX, ECX)
        .or_imm(EAX, 0x10)
        .out_eax(PCI_CONFIG_ADDR)
        .in_eax(PCI_CONFIG_DATA);
    a.and_imm(EAX, 0xffff_fff0).mov(EDI, EAX).cmp_imm(EAX, 0);
    check(&mut a, Cond::Ne, "pci-testdev BAR0 assigned");
    a.xor(EAX, EAX).store(EDI, 0, EAX); // select test 0
    a.load(EAX, EDI, 12).cmp_imm(EAX, 0);
    check(
        &mut a,
        Cond::E,
        "pci-testdev test 0's count is 0 before the write",
    );
    a.load(EDX, EDI, 4)
        .load(EAX, EDI, 8)
        .store_indexed(EDI, EDX, EAX);
    a.load(EAX, EDI, 12).cmp_imm(EAX, 1);
    check(
        &mut a,
        Cond::E,
        "pci-testdev test 0's count is 1 after the write",
    );

    // 5. The APs: trampoline, INIT, SIPI, a bounded wait (about 3 * 2^32 TSC ticks).
    if spec.ncpus > 1 {
        let tramp = data.add(&trampoline());
        a.mov_imm(ESI, tramp)
            .mov_imm(EDI, TRAMPOLINE)
            .mov_imm(ECX, TRAMPOLINE_LEN as u32);
        a.rep_movsb();
        let init = 0x000c_4500; // all excluding self, assert, INIT
        let sipi = 0x000c_4600 | (TRAMPOLINE >> 12); // all excluding self, STARTUP
        if spec.x2apic {
            // IA32_APIC_BASE |= EN | EXTD; SVR |= APIC enable; ICR (MSR 0x830) writes.
            a.mov_imm(ECX, 0x1b).rdmsr().or_imm(EAX, 0xc00).wrmsr();
            a.mov_imm(ECX, 0x80f).rdmsr().or_imm(EAX, 0x100).wrmsr();
            a.mov_imm(ECX, 0x830).xor(EDX, EDX);
            a.mov_imm(EAX, init).wrmsr();
            a.mov_imm(EAX, sipi).wrmsr();
        } else {
            a.load_abs(EAX, LAPIC + 0xf0)
                .or_imm(EAX, 0x100)
                .store_abs(LAPIC + 0xf0, EAX);
            a.xor(EAX, EAX).store_abs(LAPIC + 0x310, EAX);
            a.mov_imm(EAX, init).store_abs(LAPIC + 0x300, EAX);
            a.mov_imm(EAX, sipi).store_abs(LAPIC + 0x300, EAX);
        }
        let count = TRAMPOLINE + AP_COUNT_OFF as u32;
        let seen = TRAMPOLINE + AP_SEEN_OFF as u32;
        a.rdtsc().add_imm(EDX, 3).mov(ESI, EDX);
        let wait = a.here();
        let all_in = a.label();
        a.pause()
            .cmp_byte_abs(count, spec.ncpus - 1)
            .jcc(Cond::Ae, all_in);
        a.rdtsc().cmp(EDX, ESI).jcc(Cond::B, wait);
        check(&mut a, Cond::B, "APs checked in before the TSC deadline");
        a.bind(all_in);
        a.cmp_byte_abs(count, spec.ncpus - 1);
        check(&mut a, Cond::E, "exactly N-1 APs checked in");
        a.cmp_byte_abs(seen, 0);
        check(
            &mut a,
            Cond::E,
            "the BSP (APIC ID 0) did not run the trampoline",
        );
        for id in 1..u32::from(spec.ncpus) {
            a.cmp_byte_abs(seen + id, 1);
            check(&mut a, Cond::E, "every AP reported its APIC ID");
        }
    }

    // 6./7. Report and exit.
    let line = format!("{}\n", final_line(spec.final_code));
    let msg = data.add(line.as_bytes());
    print(&mut a, msg, line.len() as u32);
    a.exit(EXIT_PORT, spec.final_code);

    // The failure paths: BL = the check's code, print the FAIL line, exit with BL.
    let fail_line = format!("{FAIL_LINE}\n");
    let fail_msg = data.add(fail_line.as_bytes());
    let fail = a.label();
    for (l, code) in fails {
        a.bind(l).mov_bl(code).jmp(fail);
    }
    a.bind(fail);
    print(&mut a, fail_msg, fail_line.len() as u32);
    a.mov_dx(EXIT_PORT).mov_al_bl().out_dx_al();
    a.hlt_loop();

    elf32(&a.finish(), &data.bytes)
}

/// An ELF32 executable with one R+W+X segment (the whole file) at `LOAD`, a Multiboot v1
/// header, entry at the code.
fn elf32(code: &[u8], data: &[u8]) -> Vec<u8> {
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

// ---------------------------------------------------------------------------
// Running the binary.

/// A fresh directory for one test's files.
fn scratch_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("qomvm-test-kernels-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `qomvm args`, killing it after `timeout`.
fn qomvm(args: &[&str], timeout: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qomvm runs");
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            child.kill().unwrap();
            let s = child.wait().unwrap();
            let (o, e) = (out.join().unwrap(), err.join().unwrap());
            panic!(
                "qomvm {args:?} still running after {timeout:?} ({s}); stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&o),
                String::from_utf8_lossy(&e)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, start.elapsed())
}

/// The issue's command line with `kernel`, `env` and `smp` substituted.
fn issue_args<'a>(kernel: &'a str, env: &'a str, smp: &'a str) -> Vec<&'a str> {
    vec![
        "--no-reboot",
        "-nodefaults",
        "-global",
        "kvm-pit.lost_tick_policy=discard",
        "-device",
        "pc-testdev",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x4",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-device",
        "pci-testdev",
        "-machine",
        "accel=kvm",
        "-kernel",
        kernel,
        "-smp",
        smp,
        "-cpu",
        "qemu64,+x2apic,vendor=GenuineIntel",
        "-append",
        ARGS,
        "-initrd",
        env,
    ]
}

/// Builds the kernel for `spec` and runs it with the issue's command line and `-smp smp`;
/// `None` when KVM is not usable (the skip is reported).
fn run_kernel(name: &str, spec: &Spec, smp: u8) -> Option<(i32, String, String)> {
    if let Some(reason) = kvm_unusable() {
        test_support::skip::skip_kvm(reason);
        return None;
    }
    let dir = scratch_dir(name);
    let kernel = dir.join("test.flat");
    let env = dir.join("env.txt");
    std::fs::write(&kernel, build_kernel(spec)).unwrap();
    std::fs::write(&env, ENV).unwrap();
    let smp = smp.to_string();
    let args = issue_args(kernel.to_str().unwrap(), env.to_str().unwrap(), &smp);
    let (o, took) = qomvm(&args, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{name}: qomvm ran for {took:?}");
    let code = o
        .status
        .code()
        .expect("qomvm exits (not killed by a signal)");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    Some((code, stdout, stderr))
}

/// Runs the kernel for `spec` with `-smp spec.ncpus` and expects every check to pass and
/// the status to be `(spec.final_code << 1) | 1`.
fn expect_pass(name: &str, spec: Spec) {
    let Some((code, stdout, stderr)) = run_kernel(name, &spec, spec.ncpus) else {
        return;
    };
    if code & 1 == 1 && code > 1 && code >> 1 != i32::from(spec.final_code) {
        let failed = CHECKS
            .get((code >> 1) as usize - 1)
            .unwrap_or(&"(unknown check)");
        panic!(
            "the test kernel failed check {}: {failed}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            code >> 1
        );
    }
    assert_eq!(
        code,
        (i32::from(spec.final_code) << 1) | 1,
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = final_line(spec.final_code);
    assert!(
        stdout.lines().any(|l| l == line),
        "no {line:?} line; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(!stdout.contains(FAIL_LINE), "{stdout}");
}

#[test]
fn the_issue_command_line_runs_the_test_kernel_to_pass() {
    expect_pass(
        "pass",
        Spec {
            ncpus: 2,
            x2apic: false,
            final_code: 0,
        },
    );
}

#[test]
fn a_kernel_exit_code_becomes_the_status() {
    expect_pass(
        "exit5",
        Spec {
            ncpus: 2,
            x2apic: false,
            final_code: 5,
        },
    );
}

#[test]
fn four_cpus_start_through_x2apic() {
    expect_pass(
        "smp4",
        Spec {
            ncpus: 4,
            x2apic: true,
            final_code: 0,
        },
    );
}

/// A failed check is reported by its number: a kernel that expects 4 CPUs, run with
/// `-smp 2`, stops at the NB_CPUS check.
#[test]
fn a_failed_check_exits_with_its_number() {
    let spec = Spec {
        ncpus: 4,
        x2apic: false,
        final_code: 0,
    };
    let Some((code, stdout, stderr)) = run_kernel("nbcpus", &spec, 2) else {
        return;
    };
    let expected = check_code("fw_cfg NB_CPUS == -smp");
    assert_eq!(
        code,
        (i32::from(expected) << 1) | 1,
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.lines().any(|l| l == FAIL_LINE), "{stdout}");
    assert!(!stdout.contains(PASS_LINE), "{stdout}");
}

/// `qomvm -kernel /nonexistent`. With no `-accel`, KVM is the default accelerator and is
/// initialised before the board loads the kernel, so the plain command line needs a usable
/// `/dev/kvm` (as a KVM-only QEMU does); `-accel qtest` shows the same error without it.
#[test]
fn a_missing_kernel_is_a_one_line_error() {
    let expected = "qomvm: could not load kernel '/nonexistent': No such file or directory\n";
    let (o, _) = qomvm(
        &["-accel", "qtest", "-kernel", "/nonexistent"],
        Duration::from_secs(60),
    );
    assert_eq!(String::from_utf8_lossy(&o.stderr), expected);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    if let Some(reason) = kvm_unusable() {
        test_support::skip::skip_kvm(format!("the plain (KVM) command line: {reason}"));
        return;
    }
    let (o, _) = qomvm(&["-kernel", "/nonexistent"], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&o.stderr);
    // The default CPU model may lack features on this host's KVM (QEMU warns the same way);
    // such warnings come before the error, which must be the only other line.
    let rest: String = stderr
        .lines()
        .filter(|l| !l.starts_with("qomvm: warning: host doesn't support requested feature"))
        .map(|l| format!("{l}\n"))
        .collect();
    if rest.len() != stderr.len() {
        eprintln!("host feature warnings on stderr:\n{stderr}");
    }
    assert_eq!(rest, expected);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn the_kernel_fits_and_the_checks_are_numbered() {
    let k = build_kernel(&Spec {
        ncpus: 4,
        x2apic: true,
        final_code: 0,
    });
    assert_eq!(&k[..4], b"\x7fELF");
    assert!(CHECKS.len() < 128);
    assert!(Path::new(env!("CARGO_BIN_EXE_qomvm")).exists());
}
