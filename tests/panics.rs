//! The panic policy (issue 19, item 3): a panic on the main loop, a vCPU or an event loop
//! thread ends qomvm with Rust's message, `qomvm: internal error: a panic ends the VM` and
//! status 101, and never leaves it hanging. The debug build's `QOMVM_PANIC_SELFTEST`
//! (`hw/core/panic_selftest.rs`) makes the thread panic.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs qomvm with `QOMVM_PANIC_SELFTEST=thread_kind`; kills it after 20 s.
fn run_with_panic_in(thread_kind: &str, args: &[&str]) -> (Output, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(args)
        .env("RUST_LOG", "off")
        .env("QOMVM_PANIC_SELFTEST", thread_kind)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let hung = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    (child.wait_with_output().unwrap(), hung)
}

fn assert_panic_ended_qomvm(thread_kind: &str, args: &[&str]) {
    let (out, hung) = run_with_panic_in(thread_kind, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !hung,
        "{thread_kind}: qomvm still ran 20 s after the panic: {stderr}"
    );
    assert_eq!(out.status.code(), Some(101), "{thread_kind}: {stderr}");
    assert!(
        stderr.contains(&format!(
            "QOMVM_PANIC_SELFTEST: the {thread_kind} thread panics as asked"
        )),
        "{thread_kind}: no panic message: {stderr}"
    );
    assert!(
        stderr.contains("qomvm: internal error: a panic ends the VM"),
        "{thread_kind}: {stderr}"
    );
}

fn debug_build() -> bool {
    if !cfg!(debug_assertions) {
        test_support::skip::skip("QOMVM_PANIC_SELFTEST exists in debug builds only");
    }
    cfg!(debug_assertions)
}

#[test]
fn a_panic_on_the_main_loop_ends_qomvm_with_101() {
    if debug_build() {
        assert_panic_ended_qomvm("main", &["-M", "pc", "-accel", "qtest", "-display", "none"]);
    }
}

#[test]
fn a_panic_on_an_iothread_ends_qomvm_with_101() {
    if debug_build() {
        assert_panic_ended_qomvm(
            "iothread",
            &[
                "-M",
                "pc",
                "-accel",
                "qtest",
                "-display",
                "none",
                "-object",
                "iothread,id=io0",
            ],
        );
    }
}

#[test]
fn a_panic_on_a_vcpu_ends_qomvm_with_101() {
    if !debug_build() {
        return;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        test_support::skip::skip_kvm(format!("the vCPU case needs /dev/kvm ({e})"));
        return;
    }
    assert_panic_ended_qomvm(
        "vcpu",
        &["-M", "pc", "-accel", "kvm", "-display", "none", "-m", "64"],
    );
}
