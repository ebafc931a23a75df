//! Migration (issue 18): what moving a running guest costs, qomvm against QEMU on the same
//! guest in the same run (`test_support::migration_guest`'s counting kernel, 512 MiB, the
//! `pc` machine on KVM, `-nodefaults`, COM1 on a pipe).
//!
//! - `downtime`: a live migration between two processes over a Unix socket; the sample is
//!   the `downtime` the source's `query-migrate` reports (the guest's stop to the end of
//!   the stream). Target: <= 50 ms. `total` is the same migrations' `total-time`.
//! - `downtime-idle`, `total-idle`: the same with a guest that halts after one line and
//!   writes nothing.
//! - `downtime-multifd`, `total-multifd`: the counting guest's live migration with the
//!   `multifd` capability on both sides and 4 channels (the destination under
//!   `-incoming defer`, then `migrate-incoming`, as libvirt does it).
//! - `restore`: a guest saved with `migrate` to `exec:cat > FILE`; the sample is from
//!   spawning the destination (`-incoming exec:cat FILE`) to `query-status` answering
//!   `running`, polled
//!   every millisecond (process start-up, loading, first instruction).
//! - `restore-file` (qomvm only; QEMU 7.2 has no `file:`): the same through `migrate` to
//!   `file:FILE` and `-incoming file:FILE`, where guest RAM sits at fixed offsets of the
//!   file and the restore maps it instead of reading it. Target: <= 10 ms.
//!
//! At the end the medians and the ratios qomvm/QEMU are printed. QEMU is left out (with the
//! reason printed) when `qemu-system-x86_64` is missing or cannot run the guest; without a
//! usable /dev/kvm nothing runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use parking_lot::Mutex;
use serde_json::{json, Value};
use test_support::console::ConsoleVm;
use test_support::qmp::QmpClient;
use test_support::{migration_guest, skip, vm};

const MEM: &str = "512";
/// Guest code runs through KVM's emulator on PVM hosts, and QEMU boots through SeaBIOS.
const TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Qomvm,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Qomvm => "qomvm",
            Vmm::Qemu => "qemu",
        }
    }
    /// The arguments that turn the VMM's seccomp sandbox off (qomvm's is on by default).
    fn unsandboxed(self) -> &'static [&'static str] {
        match self {
            Vmm::Qomvm => &["-sandbox", "off"],
            Vmm::Qemu => &[],
        }
    }
    fn binary(self) -> &'static str {
        match self {
            Vmm::Qomvm => env!("CARGO_BIN_EXE_qomvm"),
            Vmm::Qemu => "qemu-system-x86_64",
        }
    }
}

/// Samples per (VMM, measurement), in milliseconds.
static SAMPLES: Mutex<Vec<(Vmm, &'static str, f64)>> = Mutex::new(Vec::new());

struct Scratch(PathBuf);

impl Scratch {
    /// A directory with the counting guest's kernel.
    fn new(what: &str) -> Scratch {
        Scratch::with(what, Guest::Writing)
    }

    /// A directory with `guest`'s kernel.
    fn with(what: &str, guest: Guest) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("qomvm-bench-mig-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = match guest {
            Guest::Writing => migration_guest::migration_kernel(),
            Guest::Idle => migration_guest::idle_kernel(),
        };
        std::fs::write(dir.join("kernel.elf"), kernel).unwrap();
        Scratch(dir)
    }
}

/// What the migrated guest does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Guest {
    /// The counting guest: writes memory all the time.
    Writing,
    /// Halted after one line: writes nothing.
    Idle,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A guest of `vmm` with QMP on `NAME.qmp` in `dir`, plus `extra`.
fn start(vmm: Vmm, dir: &Path, name: &str, extra: &[&str]) -> (ConsoleVm, QmpClient) {
    let sock = dir.join(format!("{name}.qmp"));
    let kernel = dir.join("kernel.elf");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut args = vec![
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-m",
        MEM,
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        kernel.to_str().unwrap(),
        "-qmp",
        &qmp,
    ];
    args.extend_from_slice(extra);
    let console = ConsoleVm::start(vmm.binary(), &args, TIMEOUT);
    let qmp = QmpClient::connect(&sock);
    (console, qmp)
}

fn wait_completed(qmp: &mut QmpClient) -> Value {
    let info = qmp.wait_migration(TIMEOUT);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    info["return"].clone()
}

fn counting(vm: &mut ConsoleVm) {
    vm.wait_until("the guest counting", |t| t.matches(" ok").count() >= 2);
}

/// Channels of the multifd rows.
const MULTIFD_CHANNELS: u64 = 4;

/// Turns `multifd` on with [`MULTIFD_CHANNELS`] channels.
fn enable_multifd(qmp: &mut QmpClient) {
    let caps = json!({"capabilities": [{"capability": "multifd", "state": true}]});
    assert_eq!(
        qmp.execute("migrate-set-capabilities", caps),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute(
            "migrate-set-parameters",
            json!({"multifd-channels": MULTIFD_CHANNELS})
        ),
        json!({"return": {}})
    );
}

/// One live migration of `guest` between two processes over a Unix socket (with
/// `multifd` on both sides if asked); returns the downtime and the total time the source
/// reports, in ms.
fn live_once(vmm: Vmm, guest: Guest, multifd: bool) -> (f64, f64) {
    let scratch = Scratch::with("live", guest);
    let uri = format!("unix:{}", scratch.0.join("mig.sock").display());
    let (mut src, mut src_qmp) = start(vmm, &scratch.0, "src", &[]);
    let incoming = if multifd { "defer" } else { uri.as_str() };
    let (mut dst, mut dst_qmp) = start(vmm, &scratch.0, "dst", &["-incoming", incoming]);
    if multifd {
        enable_multifd(&mut dst_qmp);
        assert_eq!(
            dst_qmp.execute("migrate-incoming", json!({"uri": uri})),
            json!({"return": {}})
        );
        enable_multifd(&mut src_qmp);
    }
    match guest {
        Guest::Writing => counting(&mut src),
        Guest::Idle => src.wait_until("the guest's line", |t| t.contains("idle")),
    }
    assert_eq!(
        src_qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let info = wait_completed(&mut src_qmp);
    match guest {
        Guest::Writing => {
            let before = dst.text().len();
            dst.wait_until("the destination counting", |t| {
                t[before.min(t.len())..].contains(" ok")
            });
        }
        Guest::Idle => {
            // The source completes when it has sent the end; the destination still loads.
            let deadline = Instant::now() + TIMEOUT;
            loop {
                let status = dst_qmp.execute("query-status", json!({}));
                if status["return"]["status"] == "running" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the destination never ran: {status}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let _ = dst_qmp.execute("quit", json!({}));
    let _ = src_qmp.execute("quit", json!({}));
    (
        info["downtime"].as_f64().expect("a downtime"),
        info["total-time"].as_f64().expect("a total time"),
    )
}

/// A live migration of the counting guest; records its total time too.
fn downtime_writing_once(vmm: Vmm) -> f64 {
    let (downtime, total) = live_once(vmm, Guest::Writing, false);
    SAMPLES.lock().push((vmm, "total", total));
    downtime
}

/// A live migration of the idle guest; records its total time too.
fn downtime_idle_once(vmm: Vmm) -> f64 {
    let (downtime, total) = live_once(vmm, Guest::Idle, false);
    SAMPLES.lock().push((vmm, "total-idle", total));
    downtime
}

/// A live migration of the counting guest with `multifd`; records its total time too.
fn downtime_multifd_once(vmm: Vmm) -> f64 {
    let (downtime, total) = live_once(vmm, Guest::Writing, true);
    SAMPLES.lock().push((vmm, "total-multifd", total));
    downtime
}

/// One restore through a pipe; returns spawn-to-running in ms.
fn restore_once(vmm: Vmm) -> f64 {
    let scratch = Scratch::new("restore");
    let image = scratch.0.join("guest.state");
    // Through `cat`, as QEMU 7.2 has no `file:` (libvirt's save goes through a pipe too);
    // qomvm without its sandbox, which would not let `cat` run (QEMU has none by default).
    let save = format!("exec:cat > '{}'", image.display());
    let uri = format!("exec:cat '{}'", image.display());
    restore_from(vmm, &scratch, &save, &uri)
}

/// One restore from a `file:` (RAM mapped, not read); returns spawn-to-running in ms.
fn restore_file_once(vmm: Vmm) -> f64 {
    let scratch = Scratch::new("restore-file");
    let uri = format!("file:{}", scratch.0.join("guest.state").display());
    restore_from(vmm, &scratch, &uri, &uri)
}

/// Saves the counting guest with `migrate` to `save`, then times a new process restoring
/// it with `-incoming uri`: spawn to `query-status` answering `running`, in ms.
fn restore_from(vmm: Vmm, scratch: &Scratch, save: &str, uri: &str) -> f64 {
    {
        let (mut src, mut qmp) = start(vmm, &scratch.0, "src", vmm.unsandboxed());
        counting(&mut src);
        assert_eq!(
            qmp.execute("migrate", json!({"uri": save})),
            json!({"return": {}})
        );
        wait_completed(&mut qmp);
        let _ = qmp.execute("quit", json!({}));
        src.wait_exit();
    }
    let sock = scratch.0.join("dst.qmp");
    let kernel = scratch.0.join("kernel.elf");
    let spawned = Instant::now();
    let mut child: Child = Command::new(vmm.binary())
        .args([
            "-M",
            "pc",
            "-accel",
            "kvm",
            "-m",
            MEM,
            "-nodefaults",
            "-display",
            "none",
        ])
        .args([
            "-serial",
            "null",
            "-kernel",
            kernel.to_str().unwrap(),
            "-incoming",
            uri,
        ])
        .args(vmm.unsandboxed())
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the VMM starts");
    let mut qmp = QmpClient::connect(&sock);
    let running = loop {
        let status = qmp.execute("query-status", json!({}));
        if status["return"]["status"] == "running" {
            break spawned.elapsed();
        }
        assert!(
            spawned.elapsed() < TIMEOUT,
            "the restored guest never ran: {status}"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = qmp.execute("quit", json!({}));
    let _ = child.wait();
    running.as_secs_f64() * 1e3
}

/// Whether QEMU is here and can run and migrate the guest (it is the baseline).
fn qemu_usable() -> Result<(), String> {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_err(|_| {
            "qemu-system-x86_64 (Debian package qemu-system-x86) is not installed".to_string()
        })
        .map(drop)
}

fn bench(c: &mut Criterion) {
    if let Some(reason) = vm::kvm_unusable() {
        skip::skip_kvm(reason);
        return;
    }
    let mut vmms = vec![Vmm::Qomvm];
    match qemu_usable() {
        Ok(()) => vmms.push(Vmm::Qemu),
        Err(reason) => skip::skip(format!("the QEMU baseline: {reason}")),
    }
    let mut group = c.benchmark_group("migration");
    group.sample_size(10).warm_up_time(Duration::from_millis(1));
    for &vmm in &vmms {
        for (what, once) in [
            ("downtime", downtime_writing_once as fn(Vmm) -> f64),
            ("downtime-idle", downtime_idle_once),
            ("downtime-multifd", downtime_multifd_once),
            ("restore", restore_once),
            ("restore-file", restore_file_once),
        ] {
            if what == "restore-file" && vmm != Vmm::Qomvm {
                continue;
            }
            group.bench_function(format!("{what}/{}", vmm.name()), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let ms = once(vmm);
                        SAMPLES.lock().push((vmm, what, ms));
                        total += Duration::from_secs_f64(ms / 1e3);
                    }
                    total
                })
            });
        }
    }
    group.finish();
    report();
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn report() {
    let samples = SAMPLES.lock().clone();
    println!(
        "\nmigration: medians of {} samples (ms), 512 MiB guest",
        samples.len()
    );
    for what in [
        "downtime",
        "total",
        "downtime-idle",
        "total-idle",
        "downtime-multifd",
        "total-multifd",
        "restore",
        "restore-file",
    ] {
        let of = |vmm: Vmm| {
            median(
                samples
                    .iter()
                    .filter(|s| s.0 == vmm && s.1 == what)
                    .map(|s| s.2)
                    .collect(),
            )
        };
        let (ours, qemu) = (of(Vmm::Qomvm), of(Vmm::Qemu));
        let ratio = match (ours, qemu) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "  {what:16} qomvm {:>9} qemu {:>9} qomvm/qemu {ratio}",
            ours.map_or("-".into(), |v| format!("{v:.1}")),
            qemu.map_or("-".into(), |v| format!("{v:.1}")),
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
