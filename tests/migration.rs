//! Issue 18: snapshot, restore and migration between qomvm processes, on KVM.
//!
//! The guest is `test_support::migration_guest`'s Multiboot kernel: it prints `COUNTER ok`
//! for each turn of a loop that writes memory and checks its sum. A migrated guest must go
//! on printing the next counter, without a gap or a repeat, and `ok`: registers, RAM, the
//! UART and the rest moved intact.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::console::ConsoleVm;
use test_support::migration_guest::migration_kernel;
use test_support::qmp::QmpClient;

/// PVM runs the guest's kernel code through KVM's emulator: generous.
const TIMEOUT: Duration = Duration::from_secs(120);

fn kvm_or_skip() -> bool {
    if let Some(reason) = test_support::vm::kvm_unusable() {
        test_support::skip::skip_kvm(reason);
        return false;
    }
    true
}

/// A scratch directory with the kernel in it.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qomvm-mig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kernel.elf"), migration_kernel()).unwrap();
    dir
}

/// The counters printed, in order, with whether each line said `ok`. A line still being
/// printed (no newline yet) does not count.
fn counters(text: &str) -> Vec<(u32, bool)> {
    let whole_lines = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    whole_lines
        .lines()
        .filter_map(|l| {
            let (n, verdict) = l.trim().split_once(' ')?;
            Some((u32::from_str_radix(n, 16).ok()?, verdict == "ok"))
        })
        .collect()
}

/// Checks that `text` counts 1, 2, 3... with every line `ok`, and returns the last.
fn check_counting(text: &str) -> u32 {
    let seen = counters(text);
    assert!(!seen.is_empty(), "nothing counted: {text:?}");
    for (i, (n, ok)) in seen.iter().enumerate() {
        assert_eq!(*n, i as u32 + 1, "a gap or a repeat at line {i}: {text:?}");
        assert!(ok, "the memory sum broke at {n:#x}: {text:?}");
    }
    seen.last().unwrap().0
}

/// A VM of the test machine (`-M pc -m 32`, COM1 on stdout, QMP on `qmp.sock` in `dir`
/// under `name`), with `extra` arguments.
fn vm(dir: &Path, name: &str, extra: &[&str]) -> (ConsoleVm, PathBuf) {
    let sock = dir.join(format!("{name}.qmp"));
    let kernel = dir.join("kernel.elf");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut args = vec![
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-m",
        "32",
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
    (
        ConsoleVm::start(env!("CARGO_BIN_EXE_qomvm"), &args, TIMEOUT),
        sock,
    )
}

/// All a stopped source printed: it quits, and its output is complete once it has exited
/// (its guest may have stopped in the middle of a line, which the destination finishes).
fn final_text(src: &mut ConsoleVm, qmp: &mut QmpClient) -> String {
    let _ = qmp.execute("quit", json!({}));
    assert_eq!(src.wait_exit(), Some(0));
    src.text()
}

fn wait_lines(vm: &mut ConsoleVm, n: usize) {
    vm.wait_until(&format!("{n} counter lines"), |t| counters(t).len() >= n);
}

fn wait_migration(qmp: &mut QmpClient) -> Value {
    qmp.wait_migration(TIMEOUT)
}

fn status(qmp: &mut QmpClient) -> String {
    qmp.execute("query-status", json!({}))["return"]["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Migrates a running guest from one qomvm to another through `uri` (the destination
/// listening with `-incoming uri`), and checks it goes on counting there.
fn migrate_between_processes(name: &str, uri: &str, extra: &[&str]) {
    migrate_kernel_between_processes(name, &migration_kernel(), uri, extra)
}

/// [`migrate_between_processes`] with another counting `kernel`.
fn migrate_kernel_between_processes(name: &str, kernel: &[u8], uri: &str, extra: &[&str]) {
    let dir = scratch(name);
    std::fs::write(dir.join("kernel.elf"), kernel).unwrap();
    let (mut src, src_sock) = vm(&dir, "src", extra);
    let mut dst_args = vec!["-incoming", uri];
    dst_args.extend_from_slice(extra);
    let (mut dst, dst_sock) = vm(&dir, "dst", &dst_args);
    let mut src_qmp = QmpClient::connect(&src_sock);
    let mut dst_qmp = QmpClient::connect(&dst_sock);
    assert_eq!(status(&mut dst_qmp), "inmigrate");
    wait_lines(&mut src, 5);
    let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
    assert_eq!(
        src_qmp.execute("migrate-set-capabilities", caps),
        json!({"return": {}})
    );
    assert_eq!(
        src_qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let info = wait_migration(&mut src_qmp);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    assert!(
        info["return"]["ram"]["total"].as_u64() >= Some(32 << 20),
        "{info}"
    );
    assert!(info["return"]["downtime"].as_u64().is_some(), "{info}");
    // Pre-copy: all of RAM while the guest ran, then at least one look at the dirty log.
    assert!(
        info["return"]["ram"]["dirty-sync-count"].as_u64() >= Some(1),
        "{info}"
    );
    eprintln!("migration {name}: {}", info["return"]);
    assert_eq!(status(&mut src_qmp), "postmigrate");
    let hmp = src_qmp.execute(
        "human-monitor-command",
        json!({"command-line": "info migrate"}),
    );
    let hmp = hmp["return"]
        .as_str()
        .unwrap_or_default()
        .replace("\r\n", "\n");
    assert!(hmp.starts_with("Migration status: completed\n"), "{hmp}");
    assert!(hmp.contains("\ntotal ram: 32768 kbytes\n"), "{hmp}");
    // As in QEMU, the status changes before its event goes out: a query-migrate answered
    // in between says "completed" before the event arrives.
    let migration_events = |qmp: &QmpClient| -> Vec<String> {
        qmp.events
            .iter()
            .filter(|e| e["event"] == "MIGRATION")
            .map(|e| e["data"]["status"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while migration_events(&src_qmp).len() < 3 && Instant::now() < deadline {
        src_qmp.execute("query-status", json!({}));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(migration_events(&src_qmp), ["setup", "active", "completed"]);
    let before = final_text(&mut src, &mut src_qmp);
    let last_src = check_counting(&before);
    wait_lines(&mut dst, 5);
    assert_eq!(status(&mut dst_qmp), "running");
    let all = format!("{before}{}", dst.text());
    let last = check_counting(&all);
    assert!(
        last > last_src + 3,
        "the destination did not go on: {all:?}"
    );
    let _ = dst_qmp.execute("quit", json!({}));
    assert_eq!(dst.wait_exit(), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_running_guest_moves_over_a_unix_socket() {
    if !kvm_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("qomvm-mig-sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    migrate_between_processes(
        "unix",
        &format!("unix:{}", dir.join("mig.sock").display()),
        &[],
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// With virtio devices: virtio-rng-pci, and virtio-blk-pci on a qcow2 image both
/// processes open (the destination inactive until the source hands it over, as on shared
/// storage). The image is consistent afterwards and only the destination holds it.
#[test]
fn virtio_devices_move_with_a_counting_guest() {
    if !kvm_or_skip() {
        return;
    }
    let have_qemu_img = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_qemu_img {
        test_support::skip::skip("qemu-img (package qemu-utils) is needed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("qomvm-mig-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.qcow2");
    let made = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            "16M",
        ])
        .status()
        .unwrap();
    assert!(made.success());
    let drive = format!("file={},if=none,id=d0,format=qcow2", image.display());
    migrate_between_processes(
        "virtio",
        &format!("unix:{}", dir.join("mig.sock").display()),
        &[
            "-device",
            "virtio-rng-pci",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0",
        ],
    );
    let check = Command::new("qemu-img")
        .args(["check", "-q", image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// With the std VGA (what `-M pc` has unless `-nodefaults`), under `-sandbox on`: the
/// guest keeps writing its framebuffer through BAR 0 (the accelerator's slot, so the
/// pages are dirty in KVM's log during the passes) and sums it with its RAM areas. Video
/// memory moves in the VGA's section, so a default guest never refuses `migrate`, and
/// the destination's sums still add up.
#[test]
fn a_guest_writing_its_vga_framebuffer_moves() {
    if !kvm_or_skip() {
        return;
    }
    if !std::path::Path::new("/usr/share/seabios/vgabios-stdvga.bin").exists() {
        test_support::skip::skip("the VGA BIOS (Debian package 'seabios') is missing");
        return;
    }
    let dir = std::env::temp_dir().join(format!("qomvm-mig-vga-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    migrate_kernel_between_processes(
        "vga",
        &test_support::migration_guest::vga_migration_kernel(),
        &format!("unix:{}", dir.join("mig.sock").display()),
        &["-device", "VGA,addr=02.0", "-sandbox", "on"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Over TCP on loopback, both ends under `-sandbox on`.
#[test]
fn a_running_guest_moves_over_tcp() {
    if !kvm_or_skip() {
        return;
    }
    // A free port on loopback (the destination binds it again at once).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Under the seccomp sandbox, as libvirt starts its guests.
    migrate_between_processes("tcp", &format!("tcp:127.0.0.1:{port}"), &["-sandbox", "on"]);
}

/// `migrate` to `file:` (what `virsh save` does), then a new process restores it with
/// `-incoming file:` and the guest goes on.
#[test]
fn a_guest_saved_to_a_file_is_restored_in_a_new_process() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("file");
    let image = dir.join("guest.state");
    let uri = format!("file:{}", image.display());
    let (mut src, src_sock) = vm(&dir, "src", &[]);
    let mut qmp = QmpClient::connect(&src_sock);
    wait_lines(&mut src, 3);
    assert_eq!(
        qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    assert_eq!(wait_migration(&mut qmp)["return"]["status"], "completed");
    let saved = final_text(&mut src, &mut qmp);
    drop(src);
    let last_saved = check_counting(&saved);
    // RAM sits at fixed offsets of the file, zero pages as holes: the 32 MiB guest's file
    // is as long as its RAM and more, but holds little more than the 4 MiB of pages it
    // wrote.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&image).unwrap();
    assert!(meta.len() > 32 << 20, "state file of {} bytes", meta.len());
    let stored = meta.blocks() * 512;
    assert!(
        (4 << 20..8 << 20).contains(&stored),
        "state file holding {stored} bytes"
    );
    let (mut dst, _) = vm(&dir, "dst", &["-incoming", &uri]);
    dst.wait_until("counting after the restore", |t| {
        counters(t).last().is_some_and(|(n, _)| *n > last_saved + 3)
    });
    check_counting(&format!("{saved}{}", dst.text()));
    drop(dst);
    // The same image as a descriptor the caller leaves open (as libvirt's restore passes
    // it): `-incoming fd:3`.
    let kernel = dir.join("kernel.elf");
    let script = format!(
        "exec \"$0\" -M pc -accel kvm -m 32 -nodefaults -display none -serial stdio \
         -kernel '{}' -incoming fd:3 3<'{}'",
        kernel.display(),
        image.display()
    );
    let mut fd_restore = ConsoleVm::start(
        "/bin/sh",
        &["-c", &script, env!("CARGO_BIN_EXE_qomvm")],
        TIMEOUT,
    );
    fd_restore.wait_until("counting after the fd: restore", |t| {
        counters(t).last().is_some_and(|(n, _)| *n > last_saved + 3)
    });
    check_counting(&format!("{saved}{}", fd_restore.text()));
    drop(fd_restore);
    let _ = std::fs::remove_dir_all(dir);
}

/// Restoring into a different machine fails with one line naming the difference, and
/// a device that cannot move blocks `migrate` up front.
#[test]
fn mismatched_restores_and_unmigratable_devices_are_refused() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("mismatch");
    let image = dir.join("guest.state");
    let uri = format!("file:{}", image.display());
    let (mut src, src_sock) = vm(&dir, "src", &["-device", "isa-debug-exit"]);
    let mut qmp = QmpClient::connect(&src_sock);
    wait_lines(&mut src, 2);
    assert_eq!(
        qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    assert_eq!(wait_migration(&mut qmp)["return"]["status"], "completed");
    let _ = qmp.execute("quit", json!({}));
    drop(src);
    let kernel = dir.join("kernel.elf");
    let restore = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_qomvm"))
            .args([
                "-M",
                "pc",
                "-accel",
                "kvm",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-serial", "null", "-kernel", kernel.to_str().unwrap()])
            .args(["-incoming", &uri])
            .args(extra)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // Host warnings aside (PVM lacks CPUID bits the CPU model asks for).
        let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.starts_with("qomvm: warning:"))
            .map(str::to_string)
            .collect();
        (out.status.code(), errors.join("\n"))
    };
    let (code, stderr) = restore(&["-m", "64", "-device", "isa-debug-exit"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("qomvm: load of migration failed: Length mismatch: guest RAM: 0x2000000 in != 0x4000000"),
        "{stderr}"
    );
    let (code, stderr) = restore(&["-m", "32"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(
            "Unknown savevm section '/machine/peripheral-anon/device[0]' (isa-debug-exit)"
        ),
        "{stderr}"
    );

    // A device not yet taught to migrate blocks it before anything is sent.
    let (mut testdev, testdev_sock) = vm(&dir, "testdev", &["-device", "pci-testdev"]);
    let mut qmp = QmpClient::connect(&testdev_sock);
    wait_lines(&mut testdev, 1);
    let reply = qmp.execute(
        "migrate",
        json!({"uri": format!("file:{}", dir.join("testdev.state").display())}),
    );
    assert_eq!(
        reply["error"]["desc"], "State blocked by non-migratable device 'pci-testdev'",
        "{reply}"
    );
    assert_eq!(status(&mut qmp), "running");
    drop(testdev);
    let _ = std::fs::remove_dir_all(dir);
}

/// `migrate-set-parameters max-bandwidth` limits the rate: the counting guest's 4 MiB of
/// written pages at 8 MiB/s take at least 400 ms (unlimited, tens of ms), and
/// `query-migrate-parameters` reports the value; `query-migrate` the rate at which the
/// guest dirtied pages meanwhile.
#[test]
fn max_bandwidth_limits_the_rate() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("bandwidth");
    let (mut src, src_sock) = vm(&dir, "src", &[]);
    let mut qmp = QmpClient::connect(&src_sock);
    wait_lines(&mut src, 2);
    let limit = 8 << 20;
    assert_eq!(
        qmp.execute("migrate-set-parameters", json!({"max-bandwidth": limit})),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute("query-migrate-parameters", json!({}))["return"]["max-bandwidth"],
        limit
    );
    let uri = format!("file:{}", dir.join("guest.state").display());
    assert_eq!(
        qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let info = wait_migration(&mut qmp);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    let transferred = info["return"]["ram"]["transferred"].as_u64().unwrap_or(0);
    let total = info["return"]["total-time"].as_u64().unwrap_or(0);
    // Everything but the last pass (with the guest stopped) is limited.
    assert!(transferred >= 4 << 20, "{info}");
    assert!(
        total >= 400,
        "{transferred} bytes in {total} ms at 8 MiB/s: {info}"
    );
    // The guest kept counting (writing its memory) through the half-second first pass:
    // the read of the dirty log after it found pages, at a rate query-migrate reports.
    let rate = info["return"]["ram"]["dirty-pages-rate"]
        .as_u64()
        .unwrap_or(0);
    assert!(rate > 0, "dirty-pages-rate: {info}");
    let _ = qmp.execute("quit", json!({}));
    let _ = std::fs::remove_dir_all(dir);
}

/// Sets `multifd` (and `events`) and `multifd-channels` on a side of a migration.
fn enable_multifd(qmp: &mut QmpClient, channels: u64) {
    let caps = json!({"capabilities": [
        {"capability": "events", "state": true},
        {"capability": "multifd", "state": true},
    ]});
    assert_eq!(
        qmp.execute("migrate-set-capabilities", caps),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute(
            "migrate-set-parameters",
            json!({"multifd-channels": channels})
        ),
        json!({"return": {}})
    );
}

/// Migrates the running counting guest with `multifd` on both sides (the destination
/// under `-incoming defer`, as libvirt starts it) over `channels` more connections to
/// `uri`; checks it goes on counting and both sides count the same bytes. `passes`: at
/// least that many pre-copy passes (a downtime limit of 0 keeps the source passing while
/// the guest writes anything), each ended by a sync of the channels.
fn migrate_with_multifd(name: &str, uri: &str, channels: u64, passes: u64, extra: &[&str]) {
    let dir = scratch(name);
    let (mut src, src_sock) = vm(&dir, "src", extra);
    let mut dst_args = vec!["-incoming", "defer"];
    dst_args.extend_from_slice(extra);
    let (mut dst, dst_sock) = vm(&dir, "dst", &dst_args);
    let mut src_qmp = QmpClient::connect(&src_sock);
    let mut dst_qmp = QmpClient::connect(&dst_sock);
    enable_multifd(&mut dst_qmp, channels);
    assert_eq!(
        dst_qmp.execute("migrate-incoming", json!({"uri": uri})),
        json!({"return": {}})
    );
    wait_lines(&mut src, 5);
    enable_multifd(&mut src_qmp, channels);
    let caps = src_qmp.execute("query-migrate-capabilities", json!({}));
    assert_eq!(
        caps["return"],
        json!([
            {"capability": "events", "state": true},
            {"capability": "multifd", "state": true},
        ])
    );
    assert_eq!(
        src_qmp.execute("query-migrate-parameters", json!({}))["return"]["multifd-channels"],
        channels
    );
    if passes > 1 {
        assert_eq!(
            src_qmp.execute("migrate-set-parameters", json!({"downtime-limit": 0})),
            json!({"return": {}})
        );
    }
    assert_eq!(
        src_qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let info = wait_migration(&mut src_qmp);
    eprintln!("multifd migration {name}: {}", info["return"]);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    let ram = &info["return"]["ram"];
    // The guest wrote 4 MiB: those pages went, with their data, over the channels.
    let normal_bytes = ram["normal-bytes"].as_u64().unwrap_or(0);
    assert!(normal_bytes >= 4 << 20, "{info}");
    let transferred = ram["transferred"].as_u64().unwrap_or(0);
    assert!(transferred > normal_bytes, "{info}");
    assert!(ram["dirty-sync-count"].as_u64() >= Some(passes), "{info}");
    assert_eq!(status(&mut src_qmp), "postmigrate");
    let before = final_text(&mut src, &mut src_qmp);
    let last_src = check_counting(&before);
    wait_lines(&mut dst, 5);
    let all = format!("{before}{}", dst.text());
    dst.wait_until("the destination counting on", |t| {
        counters(&format!("{before}{t}"))
            .last()
            .is_some_and(|(n, _)| *n > last_src + 3)
    });
    check_counting(&all);
    assert_eq!(status(&mut dst_qmp), "running");
    // Every byte the source counted, over the main channel and the others, arrived.
    let dst_info = dst_qmp.execute("query-migrate", json!({}));
    assert_eq!(dst_info["return"]["status"], "completed", "{dst_info}");
    assert_eq!(
        dst_info["return"]["ram"]["transferred"], transferred,
        "source {info}, destination {dst_info}"
    );
    let _ = dst_qmp.execute("quit", json!({}));
    assert_eq!(dst.wait_exit(), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

/// `multifd` with 4 channels over a Unix socket, then over TCP under `-sandbox on` with
/// passes until nothing is dirty: a page the guest rewrote is sent again, maybe over
/// another channel, and the destination must never apply the older copy last (the sums
/// would break).
#[test]
fn a_running_guest_moves_with_multifd() {
    if !kvm_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("qomvm-mig-multifd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    migrate_with_multifd(
        "multifd-unix",
        &format!("unix:{}", dir.join("mig.sock").display()),
        4,
        1,
        &[],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    migrate_with_multifd(
        "multifd-tcp",
        &format!("tcp:127.0.0.1:{port}"),
        4,
        2,
        &["-sandbox", "on"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A destination process (stderr kept) for a refused migration: QMP on `dst.qmp`.
fn refusing_destination(dir: &Path, incoming: &str) -> std::process::Child {
    let kernel = dir.join("kernel.elf");
    let qmp = format!("unix:{},server=on,wait=off", dir.join("dst.qmp").display());
    Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(["-M", "pc", "-accel", "kvm", "-m", "32", "-nodefaults"])
        .args(["-display", "none", "-serial", "null"])
        .args(["-kernel", kernel.to_str().unwrap(), "-qmp", &qmp])
        .args(["-incoming", incoming])
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The destination's error lines (host warnings aside), once it exited with 1.
fn refusal(mut child: std::process::Child) -> String {
    let out = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("qomvm: warning:"))
        .collect();
    assert_eq!(out.code(), Some(1), "{stderr}");
    assert_eq!(errors.len(), 1, "one line: {stderr}");
    errors[0].to_string()
}

/// A source whose migration failed resumes its guest, which goes on counting.
fn resumed(src: &mut ConsoleVm, qmp: &mut QmpClient, info: &Value) {
    assert_eq!(info["return"]["status"], "failed", "{info}");
    assert!(info["return"]["error-desc"].is_string(), "{info}");
    assert_eq!(status(qmp), "running");
    let n = counters(&src.text()).len();
    wait_lines(src, n + 2);
    check_counting(&src.text());
}

/// One side with `multifd` and the other without: the destination refuses with one line
/// that says so, and the source's migration fails with its guest running on.
#[test]
fn multifd_on_one_side_only_is_refused() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("multifd-refused");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let (mut src, src_sock) = vm(&dir, "src", &[]);
    let mut qmp = QmpClient::connect(&src_sock);
    wait_lines(&mut src, 2);

    // The source with multifd, the destination without.
    let dst = refusing_destination(&dir, &uri);
    let sock = dir.join("dst.qmp");
    let mut dst_qmp = QmpClient::connect(&sock);
    assert_eq!(status(&mut dst_qmp), "inmigrate");
    enable_multifd(&mut qmp, 4);
    assert_eq!(
        qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let info = wait_migration(&mut qmp);
    let line = refusal(dst);
    assert_eq!(
        line,
        "qomvm: load of migration failed: multifd: the source sends RAM over 4 multifd channels, but the capability 'multifd' is off here: enable it with migrate-set-capabilities before migrate-incoming"
    );
    resumed(&mut src, &mut qmp, &info);

    // The destination with multifd, the source without.
    let dst = refusing_destination(&dir, "defer");
    let mut dst_qmp = QmpClient::connect(&sock);
    enable_multifd(&mut dst_qmp, 4);
    assert_eq!(
        dst_qmp.execute("migrate-incoming", json!({"uri": uri})),
        json!({"return": {}})
    );
    let caps = json!({"capabilities": [{"capability": "multifd", "state": false}]});
    assert_eq!(
        qmp.execute("migrate-set-capabilities", caps),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let info = wait_migration(&mut qmp);
    let line = refusal(dst);
    assert_eq!(
        line,
        "qomvm: load of migration failed: multifd: the capability 'multifd' is on here, but the source sends RAM without it: enable it on both sides or on neither"
    );
    resumed(&mut src, &mut qmp, &info);
    let _ = qmp.execute("quit", json!({}));
    let _ = std::fs::remove_dir_all(dir);
}

/// `multifd` needs a socket (QEMU 7.2's words for the others), and capabilities do not
/// change while a migration runs.
#[test]
fn multifd_capability_errors() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("multifd-errors");
    let (mut src, src_sock) = vm(&dir, "src", &[]);
    let mut qmp = QmpClient::connect(&src_sock);
    wait_lines(&mut src, 1);
    enable_multifd(&mut qmp, 2);
    for uri in [
        format!("file:{}", dir.join("state").display()),
        "exec:cat > /dev/null".to_string(),
        "fd:nosuchfd".to_string(),
    ] {
        let reply = qmp.execute("migrate", json!({"uri": uri}));
        assert_eq!(
            reply["error"]["desc"], "multifd is not supported by current protocol",
            "{uri}: {reply}"
        );
    }
    assert_eq!(status(&mut qmp), "running");
    let reply = qmp.execute("migrate-set-parameters", json!({"multifd-channels": 0}));
    assert_eq!(
        reply["error"]["desc"], "Parameter 'multifd-channels' expects a value between 1 and 255",
        "{reply}"
    );
    let reply = qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifdd", "state": true}]}),
    );
    assert!(
        reply["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("multifdd")),
        "{reply}"
    );

    // While a (slow) migration runs, capabilities stay as they are.
    let off = json!({"capabilities": [{"capability": "multifd", "state": false}]});
    assert_eq!(
        qmp.execute("migrate-set-capabilities", off.clone()),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute("migrate-set-parameters", json!({"max-bandwidth": 1 << 20})),
        json!({"return": {}})
    );
    let uri = format!("file:{}", dir.join("slow.state").display());
    assert_eq!(
        qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let reply = qmp.execute("migrate-set-capabilities", off);
    assert_eq!(
        reply["error"]["desc"], "There's a migration process in progress",
        "{reply}"
    );
    assert_eq!(
        qmp.execute("migrate_cancel", json!({})),
        json!({"return": {}})
    );
    let info = wait_migration(&mut qmp);
    assert_eq!(info["return"]["status"], "cancelled", "{info}");
    assert_eq!(status(&mut qmp), "running");
    let _ = qmp.execute("quit", json!({}));
    drop(src);

    // A destination: multifd needs a socket to listen on.
    let (_dst, dst_sock) = vm(&dir, "dst", &["-incoming", "defer"]);
    let mut dst_qmp = QmpClient::connect(&dst_sock);
    enable_multifd(&mut dst_qmp, 2);
    let reply = dst_qmp.execute(
        "migrate-incoming",
        json!({"uri": format!("file:{}", dir.join("state").display())}),
    );
    assert_eq!(
        reply["error"]["desc"], "multifd is not supported by current protocol",
        "{reply}"
    );
    // A failed URI leaves `migrate-incoming` to be run again.
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    assert_eq!(
        dst_qmp.execute("migrate-incoming", json!({"uri": uri})),
        json!({"return": {}})
    );
    // Listening, before a source connected: still settable.
    assert_eq!(
        dst_qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": false}]})
        ),
        json!({"return": {}})
    );
    let _ = dst_qmp.execute("quit", json!({}));
    let _ = std::fs::remove_dir_all(dir);
}
