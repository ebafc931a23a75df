//! Boots the Debian cloud kernel with a busybox initramfs (built by
//! `scripts/guest-assets.sh` from Debian packages) on the pc machine, as a user would:
//! `qomvm -M pc -m ... -smp ... -nographic -kernel ... -initrd ... -append ...`.
//!
//! Stock Linux needs a hardware-style KVM. On a host whose /dev/kvm is PVM, or that has
//! none, each boot runs inside the nested-KVM rig (`scripts/nested-kvm.sh`: an L1 Linux
//! under QEMU TCG with SVM and nested paging); on hardware KVM it runs directly. The test
//! output says which path it took.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// One boot at a time: each one (or the L1 that hosts it) wants both cores.
static BOOTS: Mutex<()> = Mutex::new(());

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The guest assets, built once per test run (cached across runs by the script).
fn assets() -> Result<&'static PathBuf, String> {
    static ASSETS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ASSETS
        .get_or_init(|| {
            let dir = repo().join("target/guest-assets");
            let out = Command::new(repo().join("scripts/guest-assets.sh"))
                .arg(&dir)
                .output()
                .map_err(|e| format!("scripts/guest-assets.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "scripts/guest-assets.sh failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(dir)
        })
        .as_ref()
        .map_err(Clone::clone)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path_ {
    Direct,
    NestedRig,
}

fn kvm_path() -> Path_ {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if usable && !Path::new("/sys/module/kvm_pvm").exists() {
        Path_::Direct
    } else {
        Path_::NestedRig
    }
}

/// Runs qomvm with `args` under `timeout timeout_s`, directly or through the rig; returns
/// its exit status (124 if the timeout ended it) and output.
///
/// The rig's L1 is a Linux guest of QEMU's TCG, which on rare runs stalls (the rig's own
/// time limit then ends it; seen before COMMAND printed anything, and once after the guest
/// had powered off), or ends under a running COMMAND without reporting its status (seen
/// once, L1's QEMU exiting 0 mid-boot). Such a
/// run says nothing about qomvm, so it is retried once (and the retry is reported).
fn qomvm(args: &[&str], timeout_s: u32) -> Output {
    let qomvm = env!("CARGO_BIN_EXE_qomvm");
    let path = kvm_path();
    eprintln!("linux-boot: {path:?}: qomvm {}", args.join(" "));
    let run = || {
        let mut cmd = match path {
            Path_::Direct => Command::new("timeout"),
            Path_::NestedRig => {
                let mut c = Command::new(repo().join("scripts/nested-kvm.sh"));
                // The rig's own limit only guards against a stalled L1.
                c.args(["--smp", "2", "--mem", "7G", "--timeout"])
                    .arg((timeout_s + 60).to_string())
                    .args(["--", "/usr/bin/timeout"]);
                c
            }
        };
        cmd.arg(timeout_s.to_string())
            .arg(qomvm)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("qomvm or the rig runs")
    };
    let first = run();
    // qomvm runs under its own, shorter `timeout`, which reports through the rig: the rig's
    // own time-out means L1 stopped answering, whatever qomvm had printed by then.
    let rig_stalled = path == Path_::NestedRig
        && first.status.code() == Some(124)
        && String::from_utf8_lossy(&first.stderr).contains("nested-kvm: timed out");
    let rig_died = path == Path_::NestedRig
        && first.status.code() == Some(125)
        && String::from_utf8_lossy(&first.stderr)
            .contains("L1 ended without reporting COMMAND's exit status");
    if rig_stalled || rig_died {
        eprintln!(
            "linux-boot: the rig's L1 {} ; retrying once",
            if rig_stalled {
                "stalled (the rig's time limit ended it)"
            } else {
                "ended without reporting qomvm's status"
            }
        );
        return run();
    }
    first
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Boots the guest with `-m mem -smp cpus` and extra kernel parameters; returns the output
/// after checking the exit status.
fn boot(mem: &str, cpus: u32, extra_append: &str, expect_status: i32) -> Option<String> {
    boot_with(Boot {
        mem,
        cpus,
        extra_append,
        expect_status,
        ..Boot::default()
    })
}

/// One boot's settings.
struct Boot<'a> {
    mem: &'a str,
    cpus: u32,
    extra_append: &'a str,
    expect_status: i32,
    /// The Debian generic kernel instead of the cloud one (it has /dev/port).
    generic_kernel: bool,
    no_reboot: bool,
    timeout_s: u32,
    /// More options (`-device ...`).
    extra_args: &'a [&'a str],
}

impl Default for Boot<'_> {
    fn default() -> Self {
        Boot {
            mem: "256",
            cpus: 1,
            extra_append: "",
            expect_status: 0,
            generic_kernel: false,
            no_reboot: true,
            timeout_s: 150,
            extra_args: &[],
        }
    }
}

fn boot_with(b: Boot) -> Option<String> {
    let Boot {
        mem,
        cpus,
        extra_append,
        expect_status,
        generic_kernel,
        no_reboot,
        timeout_s,
        extra_args,
    } = b;
    let _one = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = match assets() {
        Ok(d) => d,
        Err(e) => panic!("guest assets: {e}"),
    };
    let kernel = dir.join(if generic_kernel {
        "vmlinuz-generic"
    } else {
        "vmlinuz"
    });
    let initrd = dir.join("initramfs.cpio.gz");
    let append = format!("console=ttyS0 panic=-1 {extra_append}");
    let smp = cpus.to_string();
    let mut args = vec!["-M", "pc", "-m", mem, "-smp", &smp, "-nographic"];
    if no_reboot {
        args.push("-no-reboot");
    }
    args.extend([
        "-kernel",
        kernel.to_str().unwrap(),
        "-initrd",
        initrd.to_str().unwrap(),
        "-append",
        &append,
    ]);
    args.extend(extra_args);
    let o = qomvm(&args, timeout_s);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(expect_status), "qomvm output:\n{out}");
    Some(out)
}

fn mem_total_kib(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("MemTotal: "))
        .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal line in:\n{out}"))
}

fn check_boot(mem: &str, mem_bytes: u64, cpus: u32) {
    let Some(out) = boot(mem, cpus, "", 0) else {
        return;
    };
    assert!(out.contains("QOMVM-GUEST-READY"), "{out}");
    assert!(out.contains(&format!("nproc: {cpus}")), "{out}");
    // The kernel keeps some memory for itself: MemTotal is a little below RAM.
    let total = mem_total_kib(&out) * 1024;
    assert!(
        total <= mem_bytes && total > mem_bytes / 10 * 8,
        "MemTotal {total} for -m {mem}:\n{out}"
    );
}

/// The guest finds PCI through the DSDT's `\_SB.PCI0` (issue 11): the pc board's
/// functions and a `-device` at the address it asked for, each with its IDs.
#[test]
fn a_linux_guest_enumerates_the_pci_bus_through_acpi() {
    let Some(out) = boot_with(Boot {
        extra_args: &["-device", "pci-testdev,addr=04.0"],
        ..Boot::default()
    }) else {
        return;
    };
    assert!(out.contains("QOMVM-GUEST-READY"), "{out}");
    assert!(out.contains("ACPI: PCI Root Bridge [PCI0]"), "{out}");
    for (addr, ids, what) in [
        ("00.0", "0x8086:0x1237", "i440FX host bridge"),
        ("01.0", "0x8086:0x7000", "PIIX3 ISA bridge"),
        ("01.3", "0x8086:0x7113", "PIIX4 power management"),
        ("04.0", "0x1b36:0x0005", "pci-testdev"),
    ] {
        let line = format!("pci: 0000:00:{addr} {ids}");
        assert!(out.contains(&line), "{what}: no '{line}' in:\n{out}");
    }
}

#[test]
fn boots_with_one_cpu_and_256m() {
    check_boot("256", 256 << 20, 1);
}

#[test]
fn boots_with_two_cpus() {
    check_boot("512", 512 << 20, 2);
}

#[test]
fn boots_with_four_cpus_and_2g() {
    check_boot("2G", 2 << 30, 4);
}

#[test]
fn boots_with_ram_above_4g() {
    check_boot("5G", 5 << 30, 1);
}

#[test]
fn a_guest_writing_every_port_cannot_crash_qomvm() {
    // The generic kernel: it has /dev/port (the cloud kernel writes ports from user space
    // with iopl, which nested SVM under TCG refuses).
    let Some(out) = boot_with(Boot {
        extra_append: "qomvm.portfuzz=1",
        generic_kernel: true,
        // 65536 port writes from L2 through nested SVM under TCG: 35-75 s on an idle
        // machine, more under load.
        timeout_s: 300,
        ..Boot::default()
    }) else {
        return;
    };
    assert!(out.contains("QOMVM-PORTFUZZ-DONE"), "{out}");
}

#[test]
fn a_guest_reboot_exits_zero_under_no_reboot() {
    let Some(out) = boot("256", 1, "qomvm.reboot=1", 0) else {
        return;
    };
    assert!(out.contains("QOMVM-REBOOTING"), "{out}");
}

#[test]
fn a_kernel_panic_with_panic_minus_one_takes_the_reboot_path() {
    let Some(out) = boot("256", 1, "qomvm.panic=1", 0) else {
        return;
    };
    assert!(out.contains("QOMVM-PANICKING"), "{out}");
    assert!(out.contains("Kernel panic"), "{out}");
}

#[test]
fn a_guest_reboot_resets_the_machine_and_boots_again() {
    // Without -no-reboot the guest reboots for ever; qomvm is ended by the timeout once it
    // had the time to boot twice.
    let Some(out) = boot_with(Boot {
        extra_append: "qomvm.reboot=1 quiet",
        no_reboot: false,
        expect_status: 124,
        timeout_s: 60,
        ..Boot::default()
    }) else {
        return;
    };
    let boots = out.matches("QOMVM-GUEST-READY").count();
    assert!(boots >= 2, "booted {boots} time(s):\n{out}");
}

/// Runs qomvm directly on the qtest accelerator: the board loads the kernel at init, so
/// bad inputs are found without running guest code (or needing KVM).
fn qomvm_qtest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(["-M", "pc", "-accel", "qtest", "-display", "none"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn one_line_error(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    err
}

#[test]
fn bad_kernels_and_initrds_are_one_line_errors() {
    let dir = assets().expect("guest assets");
    let scratch = repo().join("target/bad-inputs");
    std::fs::create_dir_all(&scratch).unwrap();

    let o = qomvm_qtest(&["-kernel", "/nonexistent"]);
    assert_eq!(
        one_line_error(&o),
        "qomvm: could not load kernel '/nonexistent': No such file or directory\n"
    );

    let o = qomvm_qtest(&["-kernel", "/etc/passwd"]);
    assert_eq!(
        one_line_error(&o),
        "qomvm: could not load kernel '/etc/passwd': not a Linux bzImage or ELF kernel\n"
    );

    // The real kernel cut short after its setup header.
    let kernel = std::fs::read(dir.join("vmlinuz")).unwrap();
    let truncated = scratch.join("vmlinuz-truncated");
    std::fs::write(&truncated, &kernel[..64 << 10]).unwrap();
    let o = qomvm_qtest(&["-kernel", truncated.to_str().unwrap()]);
    let err = one_line_error(&o);
    assert!(
        err.starts_with(&format!(
            "qomvm: could not load kernel '{}': ",
            truncated.display()
        )),
        "{err}"
    );
    assert!(err.contains("truncated"), "{err}");

    let kernel = dir.join("vmlinuz");
    let o = qomvm_qtest(&[
        "-kernel",
        kernel.to_str().unwrap(),
        "-initrd",
        "/nonexistent",
    ]);
    let err = one_line_error(&o);
    assert!(
        err.contains("'/nonexistent'") && err.contains("No such file or directory"),
        "{err}"
    );

    // An initrd larger than the guest's RAM (sparse: no disk is used).
    let big = scratch.join("initrd-too-large");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let o = qomvm_qtest(&[
        "-m",
        "128",
        "-kernel",
        kernel.to_str().unwrap(),
        "-initrd",
        big.to_str().unwrap(),
    ]);
    let err = one_line_error(&o);
    assert!(err.contains("initrd is too large"), "{err}");

    let o = qomvm_qtest(&["-initrd", big.to_str().unwrap()]);
    assert_eq!(
        one_line_error(&o),
        "qomvm: -initrd only allowed with -kernel option\n"
    );
}
