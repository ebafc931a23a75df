//! Shared by the tests that boot the Debian test guest (`linux_guest.rs`, `net_guest.rs`):
//! the guest assets, and running a command on this host (hardware KVM) or inside the
//! nested-KVM rig (`scripts/nested-kvm.sh`) where /dev/kvm is PVM or missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// One boot at a time: each one (or the L1 that hosts it) wants both cores.
pub static BOOTS: Mutex<()> = Mutex::new(());

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The guest assets, built once per test run (cached across runs by the script).
pub fn assets() -> Result<&'static PathBuf, String> {
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
pub enum Path_ {
    Direct,
    NestedRig,
}

pub fn kvm_path() -> Path_ {
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

/// Runs `command` on this host (hardware KVM) or inside the rig (`rig_options` added, e.g.
/// `--scratch`), with `envs` set; `timeout_s` bounds it in the rig (the command bounds
/// itself). Returns its exit status and output.
///
/// The rig's L1 is a Linux guest of QEMU's TCG, which on rare runs stalls (the rig ends it
/// after 3 minutes without a sign of life on L1's console, 45 s if its CPUs sit idle,
/// or at its own time limit; seen before COMMAND printed anything, and once after the guest had powered off), or ends
/// under a running COMMAND without reporting its status (seen once, L1's QEMU exiting 0
/// mid-boot); its nested guests have triple-faulted in ordinary kernel code, or stopped
/// making progress until the scenario's own `timeout` ended the VMM. Such a run says
/// nothing about qomvm, so it is retried (up to three times, each retry reported).
pub fn host_or_rig(
    command: &[&str],
    rig_options: &[&str],
    envs: &[(&str, String)],
    timeout_s: u32,
) -> Output {
    host_or_rig_ending(command, rig_options, envs, timeout_s, Ending::Itself)
}

/// How the command is meant to end.
#[derive(Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // linux_guest.rs boots guests that outlive their timeout, others not
pub enum Ending {
    /// By itself: its `timeout` ending the VMM means the nested guest stalled.
    Itself,
    /// By its own `timeout` (a guest that reboots for ever): that is no stall.
    ByTimeout,
}

/// [`host_or_rig`] for a command that ends as `ending` says.
pub fn host_or_rig_ending(
    command: &[&str],
    rig_options: &[&str],
    envs: &[(&str, String)],
    timeout_s: u32,
    ending: Ending,
) -> Output {
    let path = kvm_path();
    let run = || {
        let mut cmd = match path {
            Path_::Direct => Command::new(command[0]),
            Path_::NestedRig => {
                let mut c = Command::new(repo().join("scripts/nested-kvm.sh"));
                // The rig's own limit only guards against a stalled L1.
                c.args(["--smp", "2", "--mem", "7G", "--timeout"])
                    .arg((timeout_s + 60).to_string())
                    .args(rig_options)
                    .args(["--", command[0]]);
                c
            }
        };
        cmd.args(&command[1..])
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("the command or the rig runs")
    };
    // The command runs under its own, shorter `timeout`, which reports through the rig:
    // the rig's own time-out means L1 stopped answering, whatever was printed by then.
    // Under load L1 has failed three times in a row (CI: a nested guest's CPU
    // "triple-faulted" twice, then L1 ended mid-transfer), so such a run is tried up to
    // four times, each retry on the record (`.ci/run`'s summary).
    let mut out = run();
    for _ in 0..3 {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let rig_stalled = path == Path_::NestedRig
            && out.status.code() == Some(124)
            && stderr.contains("nested-kvm: timed out");
        let rig_died = path == Path_::NestedRig
            && out.status.code() == Some(125)
            && stderr.contains("L1 ended without reporting COMMAND's exit status");
        // A nested guest "triple-faulting" in the middle of ordinary kernel code (seen in
        // crypto self-tests, ACPI set-up, a TCP transfer; with QEMU as the VMM too, and
        // once with L1 itself ending at the same moment) is the rig's TCG-emulated SVM.
        // No test makes a guest fault on purpose in the rig.
        let guest_faulted = path == Path_::NestedRig
            && (stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)")
                || String::from_utf8_lossy(&out.stdout)
                    .contains("triple fault (KVM_EXIT_SHUTDOWN)"));
        // A nested guest that stops making progress until the scenario's own `timeout`
        // ends its VMM: with `-smp 2` the rig's guests have been seen to stall (RCU
        // warnings, output stopping mid-line) under QEMU as the VMM too. The same scenario
        // passes on its rerun; a guest that hangs every time still fails.
        let guest_hung = path == Path_::NestedRig
            && ending == Ending::Itself
            && text(&out).lines().any(ended_by_timeout);
        if !rig_stalled && !rig_died && !guest_faulted && !guest_hung {
            break;
        }
        let what = if rig_stalled {
            "the rig's L1 stalled (the rig's time limit ended it)"
        } else if rig_died {
            "the rig's L1 ended without reporting the command's status"
        } else if guest_faulted {
            "a guest triple-faulted in the rig"
        } else {
            "a guest stopped making progress in the rig (its VMM's timeout ended it)"
        };
        let all = text(&out);
        keep_failed_run(&all);
        let evidence = retry_evidence(&all);
        test_support::skip::retried(format!("{what}; retrying"), &evidence);
        out = run();
    }
    out
}

/// Where a run that is retried leaves its whole output when `QOMVM_RIG_KEEP` names a
/// directory (for chasing the rig's faults: the record keeps only the evidence).
fn keep_failed_run(all: &str) {
    let Some(dir) = std::env::var_os("QOMVM_RIG_KEEP").filter(|d| !d.is_empty()) else {
        return;
    };
    let name = test_support::skip::current_test().replace("::", "-");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = std::path::Path::new(&dir).join(format!("{name}-{stamp}.log"));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, all)) {
        eprintln!("QOMVM_RIG_KEEP: {} not written: {e}", path.display());
    }
}

/// What a retry puts on the record: where a kernel's report of its own failure starts (a
/// panic's reason, an oops and the code it hit: the last lines of a panic are only the
/// calling task's user registers), then the last lines of the kernels', qomvm's and the
/// rig's messages.
fn retry_evidence(all: &str) -> Vec<&str> {
    const FAILURE_STARTS: [&str; 9] = [
        "Kernel panic",
        "BUG:",
        "Oops:",
        "general protection fault",
        "double fault",
        "invalid opcode:",
        "WARNING: CPU:",
        "watchdog: BUG:",
        "rcu: INFO:",
    ];
    let lines: Vec<&str> = all
        .lines()
        .filter(|l| l.contains('[') || l.contains("qomvm:") || l.contains("nested-kvm:"))
        .collect();
    let tail_from = lines.len().saturating_sub(12);
    let mut evidence = Vec::new();
    if let Some(first) = lines[..tail_from]
        .iter()
        .position(|l| FAILURE_STARTS.iter().any(|s| l.contains(s)))
    {
        let header_end = (first + 24).min(tail_from);
        evidence.extend_from_slice(&lines[first..header_end]);
        if header_end < tail_from {
            evidence.push("    ...");
        }
    }
    evidence.extend_from_slice(&lines[tail_from..]);
    evidence
}

#[test]
fn a_retry_keeps_the_start_of_a_kernel_panic_and_the_last_lines() {
    let mut log = String::from("qomvm-l1: [1.0] running command\n");
    log.push_str("[ 90.1] BUG: kernel NULL pointer dereference, address: 0000000000000008\n");
    for i in 0..40 {
        log.push_str(&format!("[ 90.{i:02}] trace line {i}\n"));
    }
    log.push_str("nested-kvm: L1 ended without reporting COMMAND's exit status\n");
    let evidence = retry_evidence(&log);
    assert!(evidence[0].contains("BUG: kernel NULL pointer dereference"));
    assert_eq!(evidence[24], "    ...");
    assert_eq!(evidence.len(), 24 + 1 + 12);
    assert!(evidence.last().unwrap().starts_with("nested-kvm: L1 ended"));
    // Without a failure report, only the tail.
    let quiet = "[ 1.0] a\n[ 2.0] b\nqomvm: done\n";
    assert_eq!(
        retry_evidence(quiet),
        vec!["[ 1.0] a", "[ 2.0] b", "qomvm: done"]
    );
}

/// Whether `line` is qomvm's report of being ended by `timeout`: the process is named
/// as it was started, `(timeout)` or `(/usr/bin/timeout)`.
fn ended_by_timeout(line: &str) -> bool {
    let Some(rest) = line
        .trim_end()
        .split("qomvm: terminating on signal 15 from pid ")
        .nth(1)
    else {
        return false;
    };
    rest.rsplit_once('(')
        .and_then(|(_, name)| name.strip_suffix(')'))
        .is_some_and(|name| name.rsplit('/').next() == Some("timeout"))
}

#[test]
fn a_vmm_ended_by_timeout_is_recognised_however_timeout_was_named() {
    for line in [
        "qomvm: terminating on signal 15 from pid 138 (/usr/bin/timeout)",
        "qomvm: terminating on signal 15 from pid 7 (timeout)",
        "[   5.3] kprobes: optimized qomvm: terminating on signal 15 from pid 7 (timeout)\r",
    ] {
        assert!(ended_by_timeout(line), "{line}");
    }
    for line in [
        "qomvm: terminating on signal 15 from pid 139 (/bin/bash)",
        "qomvm: terminating on signal 2 from pid 7 (timeout)",
        "qomvm: terminating on signal 15 from pid 7 (mytimeout)",
        "[    5.1] timeout)",
    ] {
        assert!(!ended_by_timeout(line), "{line}");
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The environment qomvm boots the guest with: its `SHUTDOWN` events go to the log
/// (`hw/core/runstate.rs`, `report_shutdown`), so a test can tell a guest power-off from a
/// reset under `-no-reboot` (both exit 0).
#[allow(dead_code)] // linux_guest.rs uses it, net_guest.rs not yet
pub const SHUTDOWN_LOG: (&str, &str) = ("RUST_LOG", "warn,runstate=info");

/// How many times qomvm reported `SHUTDOWN` with `reason` (under [`SHUTDOWN_LOG`]).
#[allow(dead_code)] // linux_guest.rs uses it, net_guest.rs not yet
pub fn shutdowns(out: &str, reason: &str) -> usize {
    let line = format!("SHUTDOWN reason={reason} ");
    out.lines().filter(|l| l.contains(&line)).count()
}

/// Asserts that each of the `boots` boots in `out` ended in a clean power-off: the guest's
/// /init printed QOMVM-POWEROFF right before `poweroff -f`, no kernel panicked (a failed
/// power-off ends in "Kernel panic - not syncing: Attempted to kill init!", then, with
/// `panic=-1`, a reset that `-no-reboot` also turns into exit status 0), and qomvm reported
/// a guest shutdown each time and nothing else.
#[allow(dead_code)] // linux_guest.rs uses it, net_guest.rs not yet
pub fn assert_powered_off(out: &str, boots: usize) {
    assert_eq!(
        out.matches("QOMVM-POWEROFF").count(),
        boots,
        "the guest's power-off marker, once per boot:\n{out}"
    );
    assert!(!out.contains("Kernel panic"), "a kernel panicked:\n{out}");
    assert_eq!(
        shutdowns(out, "guest-shutdown"),
        boots,
        "qomvm's exit cause, a guest shutdown once per boot:\n{out}"
    );
    assert_eq!(
        out.matches("SHUTDOWN reason=").count(),
        boots,
        "no other exit cause:\n{out}"
    );
}

/// For a test that needs the kernel's vhost-net, which PVM hosts lack and the rig's L1
/// has: where /dev/vhost-net is missing and Linux guests go through the rig, runs this
/// test binary's test `name` inside the rig and checks that it ran and passed there, then
/// returns true (the caller returns). False where the test belongs here: /dev/vhost-net
/// exists (inside the rig too), or this host has hardware KVM (then it skips, saying why).
#[allow(dead_code)] // the vhost tests use it, the guest tests not
pub fn ran_in_rig_for_vhost(name: &str) -> bool {
    if Path::new("/dev/vhost-net").exists() || kvm_path() == Path_::Direct {
        return false;
    }
    let _one = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("the test binary's path");
    let exe = exe.to_str().expect("a UTF-8 path");
    let command = [exe, "--exact", name, "--nocapture", "--test-threads", "1"];
    eprintln!("{name}: no /dev/vhost-net here: running it in the nested rig");
    let o = host_or_rig(&command, &[], &[("QOMVM_SKIP_LOG", String::new())], 600);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{name} in the rig:\n{out}");
    assert!(
        out.contains("test result: ok. 1 passed") && !out.contains("SKIPPED"),
        "{name} ran and passed in the rig:\n{out}"
    );
    true
}
