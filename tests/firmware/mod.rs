//! Shared by the tests that boot firmware on the pc board (`firmware_boot.rs`,
//! `ide_boot.rs`): SeaBIOS's path, the VM they start, scratch directories, skips.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's SeaBIOS, which the default firmware boot needs.
pub const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

/// A pc on KVM booting its default firmware, serial console on stdout.
pub const FIRMWARE_VM: [&str; 10] = [
    "-M",
    "pc",
    "-accel",
    "kvm",
    "-m",
    "128",
    "-nodefaults",
    "-nographic",
    "-serial",
    "stdio",
];

/// `FIRMWARE_VM` and `extra`.
pub fn firmware_vm<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    FIRMWARE_VM
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

/// PVM runs real mode through KVM's emulator: generous, as the host may be busy.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qomvm-fw-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A qomvm on KVM whose serial console (stdout) the test watches.
pub type Running = test_support::console::ConsoleVm;

/// Starts qomvm with `args`, waiting up to [`BOOT_TIMEOUT`] for what a test expects.
pub fn start_vm(args: &[&str]) -> Running {
    Running::start(env!("CARGO_BIN_EXE_qomvm"), args, BOOT_TIMEOUT)
}

pub fn kvm_or_skip() -> bool {
    if let Some(reason) = test_support::vm::kvm_unusable() {
        test_support::skip::skip_kvm(reason);
        return false;
    }
    true
}

pub fn seabios_or_skip() -> bool {
    if !Path::new(SEABIOS).is_file() {
        test_support::skip::skip(format!("{SEABIOS} is missing (Debian package 'seabios')"));
        return false;
    }
    true
}

/// How long a configuration error may take: qomvm refuses it before any guest code runs.
pub const ERROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a pc on qtest (nothing runs: only set-up errors show) with `extra`; returns its exit
/// code and stderr. Kills it and fails if it is still running after [`ERROR_TIMEOUT`]: the
/// configuration was accepted.
pub fn qtest_pc(extra: &[&str]) -> (Option<i32>, String) {
    let base = [
        "-M",
        "pc",
        "-accel",
        "qtest",
        "-nodefaults",
        "-display",
        "none",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(base)
        .args(extra)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qomvm runs");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > ERROR_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{extra:?} was accepted: qomvm still runs after {ERROR_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}
