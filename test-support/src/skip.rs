//! Skipped tests, made visible.
//!
//! A test that cannot run here returns early after calling [`skip`] (or [`skip_kvm`] when
//! what it lacks is `/dev/kvm`, [`read_or_skip`] when it is a packaged file). `cargo test` hides the output of passing tests, so a skip
//! that only printed would look exactly like a pass; the reason therefore also goes, as one
//! line, to the file named by [`SKIP_LOG_ENV`] when it is set. `.ci/run` sets it and ends
//! with a count of the skipped tests and their reasons.
//!
//! Where `.ci/run` found `/dev/kvm` usable it also sets [`REQUIRE_KVM_ENV`]: a test that
//! would skip for want of KVM then fails instead, so a broken `/dev/kvm` check cannot turn
//! the KVM tests into silent passes. Skips for other reasons (no root for a network
//! namespace, no `qemu-img`, a KVM capability the host's KVM refuses) stay skips, listed in
//! the summary.

use std::io::Write;

/// Names the file skip reasons are appended to (one line each).
pub const SKIP_LOG_ENV: &str = "QOMVM_SKIP_LOG";
/// Set (to anything but `0` or empty) when `/dev/kvm` is known to be usable: KVM skips fail.
pub const REQUIRE_KVM_ENV: &str = "QOMVM_REQUIRE_KVM";

/// The running test, as `binary::test` (libtest names each test's thread after the test;
/// the binary is the test target, without cargo's hash).
pub fn current_test() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| match s.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
            _ => s,
        })
        .unwrap_or_else(|| "?".into());
    let thread = std::thread::current();
    match thread.name() {
        Some(name) if name != "main" => format!("{binary}::{name}"),
        _ => binary,
    }
}

/// Reports that the calling test skips, and why: on stderr (seen with `--nocapture`) and in
/// the skip log (`.ci/run`'s summary). The caller returns right after.
pub fn skip(reason: impl std::fmt::Display) {
    let line = format!("SKIPPED {}: {reason}", current_test());
    eprintln!("{line}");
    let log = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty());
    if let Err(e) = record(log.as_deref().map(std::path::Path::new), &line) {
        panic!("{line}; and the skip could not be recorded in the {SKIP_LOG_ENV} file: {e}");
    }
}

/// Reports that the calling test ran its scenario a second time, and why (a fault of the
/// nested rig, not of qomvm, as far as the test can tell): on stderr and, as
/// `RETRIED binary::test: what` followed by `evidence` (indented), in the skip log, so
/// `.ci/run`'s summary shows every retry even when the second run passed.
pub fn retried(what: impl std::fmt::Display, evidence: &[&str]) {
    let mut line = format!("RETRIED {}: {what}", current_test());
    for e in evidence {
        line.push_str("\n    ");
        line.push_str(e.trim_end());
    }
    eprintln!("{line}");
    let log = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty());
    if let Err(e) = record(log.as_deref().map(std::path::Path::new), &line) {
        panic!("{line}; and the retry could not be recorded in the {SKIP_LOG_ENV} file: {e}");
    }
}

/// Appends `line` to `log`, if there is one, in one write with `O_APPEND`, so that the lines
/// of tests running in parallel do not mix.
fn record(log: Option<&std::path::Path>, line: &str) -> std::io::Result<()> {
    let Some(path) = log else {
        return Ok(());
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(format!("{line}\n").as_bytes())
}

/// The contents of `path` (a file the host's Debian package `package` installs, a VGA BIOS
/// for one), or `None` after a [`skip`] saying it is missing.
pub fn read_or_skip(path: &str, package: &str) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(_) => {
            skip(format!("{path} is missing (Debian package '{package}')"));
            None
        }
    }
}

/// Whether the environment says `/dev/kvm` is usable ([`REQUIRE_KVM_ENV`]).
pub fn kvm_required() -> bool {
    std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// [`skip`] for a test that needs `/dev/kvm` and cannot use it; a failure instead when
/// [`REQUIRE_KVM_ENV`] says KVM is usable here.
pub fn skip_kvm(reason: impl std::fmt::Display) {
    if kvm_required() {
        panic!(
            "{} needs KVM and would skip ({reason}), but {REQUIRE_KVM_ENV} says /dev/kvm is \
             usable here",
            current_test()
        );
    }
    skip(reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_name_is_the_thread_name() {
        let name = current_test();
        assert!(
            name.ends_with("::skip::tests::the_test_name_is_the_thread_name"),
            "{name}"
        );
    }

    #[test]
    fn skips_are_appended_one_line_each() {
        let path = std::env::temp_dir().join(format!("qomvm-skip-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        record(Some(&path), "SKIPPED a: one").unwrap();
        record(Some(&path), "SKIPPED b: two").unwrap();
        record(None, "SKIPPED c: nowhere").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text, "SKIPPED a: one\nSKIPPED b: two\n");
    }
}
