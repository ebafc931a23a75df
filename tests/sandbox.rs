//! The seccomp sandbox (issue 19): on by default once the machine is built, off with
//! `-sandbox off`, QEMU's `-sandbox` spellings, and a forbidden call ends qomvm with one
//! line naming the thread and the call (the debug build's `QOMVM_SANDBOX_SELFTEST` makes
//! the call).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn qomvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qomvm"));
    c.env("RUST_LOG", "off").stdin(Stdio::null());
    c
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qomvm-sandbox-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits up to 20 s for `child` to end (its stderr is small); kills it after that.
fn wait_output(mut child: std::process::Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// The `Seccomp:` mode of the main thread and the number of filters, once the main loop
/// answers QMP (the sandbox goes on just before it starts).
fn seccomp_of_running_qomvm(name: &str, extra: &[&str]) -> (String, String) {
    let dir = scratch(name);
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut child = qomvm()
        .args(["-M", "pc", "-accel", "qtest", "-qmp", &qmp])
        .args(extra)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no QMP socket: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    for cmd in ["qmp_capabilities", "query-status"] {
        writeln!(writer, "{{\"execute\": \"{cmd}\"}}").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"return\""), "{cmd}: {line}");
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let result = (field("Seccomp:"), field("Seccomp_filters:"));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn the_sandbox_is_on_by_default_and_off_on_request() {
    // Mode 2 is a seccomp filter; the ENOSYS filter for clone3 and the process list.
    assert_eq!(
        seccomp_of_running_qomvm("default", &[]),
        ("2".into(), "2".into())
    );
    assert_eq!(
        seccomp_of_running_qomvm(
            "libvirt",
            &[
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ]
        ),
        ("2".into(), "2".into())
    );
    assert_eq!(
        seccomp_of_running_qomvm("off", &["-sandbox", "off"]),
        ("0".into(), "0".into())
    );
}

#[test]
fn bad_sandbox_options_get_qemus_errors() {
    for (arg, message) in [
        (
            "on,spawn=maybe",
            "Parameter 'spawn' expects 'allow' or 'deny'",
        ),
        ("on,warp=deny", "Invalid parameter 'warp'"),
        ("sometimes", "Parameter 'enable' expects 'on' or 'off'"),
    ] {
        let out = qomvm()
            .args(["-M", "none", "-accel", "qtest", "-sandbox", arg])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "-sandbox {arg}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim_end(),
            format!("qomvm: -sandbox {arg}: {message}"),
            "-sandbox {arg}"
        );
    }
}

/// A forbidden call: one line naming the thread and the call, status 159 (a SIGSYS death
/// as the shell reports it), whatever thread made it.
#[test]
fn a_forbidden_call_ends_qomvm_naming_the_thread_and_the_call() {
    if !cfg!(debug_assertions) {
        test_support::skip::skip("QOMVM_SANDBOX_SELFTEST exists in debug builds only");
        return;
    }
    let main = qomvm()
        .args(["-M", "pc", "-accel", "qtest", "-display", "none"])
        .env("QOMVM_SANDBOX_SELFTEST", "process")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(main);
    assert_eq!(out.status.code(), Some(159), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("qomvm: sandbox: thread 'qomvm' made a forbidden system call: ptrace (101)"),
        "{out:?}"
    );

    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = kvm {
        test_support::skip::skip_kvm(format!("the vCPU case needs /dev/kvm ({e})"));
        return;
    }
    let vcpu = qomvm()
        .args(["-M", "pc", "-accel", "kvm", "-display", "none", "-m", "64"])
        .env("QOMVM_SANDBOX_SELFTEST", "vcpu")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(vcpu);
    assert_eq!(out.status.code(), Some(159), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "qomvm: sandbox: thread 'CPU 0/KVM' made a forbidden system call: openat (257)"
        ),
        "{out:?}"
    );
}

/// A vCPU thread that allocates and frees large blocks after the sandbox is on (as an
/// event loop's device may): glibc trims the thread's heap, whose first time reads
/// `/proc/sys/vm/overcommit_memory` (forbidden there) unless qomvm made it happen before
/// the filters went on.
#[test]
fn large_frees_on_a_vcpu_thread_do_not_end_qomvm() {
    if !cfg!(debug_assertions) {
        test_support::skip::skip("QOMVM_SANDBOX_SELFTEST exists in debug builds only");
        return;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        test_support::skip::skip_kvm(format!("a vCPU thread needs /dev/kvm ({e})"));
        return;
    }
    let mut child = qomvm()
        .args([
            "-M", "pc", "-accel", "kvm", "-display", "none", "-m", "64", "-qmp", "stdio",
        ])
        .env("QOMVM_SANDBOX_SELFTEST", "heaptrim")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Time for the vCPU to start and run its self-test.
    std::thread::sleep(std::time::Duration::from_millis(500));
    use std::io::Write as _;
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    let out = wait_output(child);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
