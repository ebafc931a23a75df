//! The monitor's block commands that change a running drive, as libvirt and OpenStack use
//! them, on the same drives on QEMU 7.2 and on qomvm, every reply compared:
//! - `block_resize` (QMP and HMP; OpenStack's volume extend, `virsh blockresize`): growing
//!   and shrinking qcow2 and raw images, the refusals for read-only images, floppy and CD
//!   drives, unknown names, bad sizes; the images end up as `qemu-img` sees them,
//!   consistent. The devices' side (a virtio-blk capacity change, a SCSI unit attention)
//!   is in `tests/virtio_blk.rs` and `tests/virtio_scsi.rs`.
//! - `block_set_io_throttle` (libvirt's `<iotune>`, `virsh blkdeviotune`, OpenStack's disk
//!   QoS): limits by drive or device id, groups, bursts, QEMU's validation messages,
//!   `query-block`'s and `info block`'s report; and the limits hold (reads at 10 IOPS).
//!
//! Skipped, with the reason printed, without QEMU or its tools.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use test_support::qmp::QmpClient;

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");

/// A VMM with a QMP socket in its own directory of images; killed on drop.
struct Vm {
    child: Child,
    dir: PathBuf,
    qmp: QmpClient,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An empty directory of this test process's own, `tag` telling the tests apart.
fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qomvm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have_tools() -> bool {
    for (tool, package) in [
        ("qemu-img", "qemu-utils"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ] {
        if Command::new(tool).arg("--version").output().is_err() {
            test_support::skip::skip(format!("{tool} (package {package}) is not installed"));
            return false;
        }
    }
    true
}

/// The drives every run gets: a qcow2 and a raw disk (virtio-blk, ide-hd), a scsi-hd, a
/// floppy, an IDE CD, a read-only drive without a device and a read-only `-blockdev` node.
fn drive_args(dir: &Path) -> Vec<String> {
    let f = |name: &str| dir.join(name).display().to_string();
    [
        "-drive",
        &format!("file={},if=none,id=d0,format=qcow2", f("q.qcow2")),
        "-device",
        "virtio-blk-pci,drive=d0,id=vb",
        "-drive",
        &format!("file={},if=none,id=d1,format=raw", f("r.img")),
        "-device",
        "ide-hd,drive=d1,id=hd",
        "-drive",
        &format!("file={},if=floppy,format=raw", f("f.img")),
        "-drive",
        &format!("file={},if=none,id=d3,format=raw,media=cdrom", f("c.iso")),
        "-device",
        "ide-cd,drive=d3,id=cd",
        "-drive",
        &format!(
            "file={},if=none,id=d4,format=raw,readonly=on,file.locking=off",
            f("r.img")
        ),
        "-blockdev",
        &format!(
            "driver=file,filename={},node-name=qf,locking=off,read-only=on",
            f("q.qcow2")
        ),
        "-device",
        "virtio-scsi-pci,id=scsi",
        "-drive",
        &format!("file={},if=none,id=d5,format=raw", f("s.img")),
        "-device",
        "scsi-hd,drive=d5,id=sd",
        "-drive",
        "if=none,id=e0,media=cdrom",
        "-device",
        "scsi-cd,drive=e0,id=cd2",
        "-drive",
        &format!("file={},if=none,id=d6,format=qcow2", f("snap.qcow2")),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(program: &str, accel: &str, tag: &str) -> Vm {
    let dir = scratch_dir(&format!("resize-{tag}"));
    let path = |name: &str| dir.join(name).display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &path("q.qcow2"), "64M"]);
    for (name, size) in [
        ("r.img", "64M"),
        ("f.img", "1440K"),
        ("c.iso", "10M"),
        ("s.img", "32M"),
    ] {
        qemu_img(&["create", "-q", "-f", "raw", &path(name), size]);
    }
    qemu_img(&["create", "-q", "-f", "qcow2", &path("snap.qcow2"), "16M"]);
    qemu_img(&["snapshot", "-c", "s1", &path("snap.qcow2")]);
    spawn(program, accel, &dir, "qmp", &drive_args(&dir))
}

/// `program` on `-M pc -accel ACCEL -S` with `args`, its QMP socket `NAME.sock` in `dir`.
fn spawn(program: &str, accel: &str, dir: &Path, name: &str, args: &[String]) -> Vm {
    let sock = dir.join(format!("{name}.sock"));
    let child = Command::new(program)
        .args([
            "-M",
            "pc",
            "-accel",
            accel,
            "-S",
            "-nodefaults",
            "-display",
            "none",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the VMM starts");
    let qmp = QmpClient::connect(&sock);
    Vm {
        child,
        dir: dir.to_path_buf(),
        qmp,
    }
}

/// Automatic node names (`#block123`) differ from run to run.
fn without_node_numbers(reply: &Value) -> String {
    let text = reply.to_string();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("#block") {
        out.push_str(&rest[..at + 6]);
        rest = rest[at + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('N');
    }
    out.push_str(rest);
    out
}

const MIB: i64 = 1 << 20;

/// The commands, in order; each VMM's replies.
fn resize_commands() -> Vec<(&'static str, Value)> {
    vec![
        (
            "grow a qcow2 under virtio-blk",
            json!({"device": "d0", "size": 128 * MIB}),
        ),
        (
            "qcow2 sizes are whole sectors",
            json!({"device": "d0", "size": 1000}),
        ),
        ("a negative size", json!({"device": "d0", "size": -1})),
        ("an unknown drive", json!({"device": "nope", "size": 1})),
        ("an unknown node", json!({"node-name": "nope", "size": 1})),
        ("no size", json!({"device": "d0"})),
        ("no name", json!({"size": 1})),
        (
            "grow a raw image under ide-hd",
            json!({"device": "d1", "size": 96 * MIB}),
        ),
        (
            "a floppy does not share resize",
            json!({"device": "floppy0", "size": 2 * MIB}),
        ),
        ("nor does a CD", json!({"device": "d3", "size": 20 * MIB})),
        (
            "a read-only drive",
            json!({"device": "d4", "size": 80 * MIB}),
        ),
        (
            "a read-only node",
            json!({"node-name": "qf", "size": 80 * MIB}),
        ),
        (
            "a qcow2 with an internal snapshot (QEMU 5.0 on)",
            json!({"device": "d6", "size": 32 * MIB}),
        ),
        (
            "and shrink it below its first size",
            json!({"device": "d6", "size": 8 * MIB}),
        ),
        (
            "a read-only node past the largest length",
            json!({"node-name": "qf", "size": i64::MAX}),
        ),
        (
            "grow a raw image under scsi-hd",
            json!({"device": "d5", "size": 48 * MIB}),
        ),
        (
            "a qcow2 past its L1 table's limit",
            json!({"device": "d0", "size": 1i64 << 55}),
        ),
        (
            "past QEMU's largest length",
            json!({"device": "d0", "size": i64::MAX - 511}),
        ),
        (
            "a raw file past the file system's limit",
            json!({"device": "d1", "size": 1i64 << 62}),
        ),
        (
            "shrink the qcow2",
            json!({"device": "d0", "size": 32 * MIB}),
        ),
        (
            "raw sizes need not be whole sectors",
            json!({"device": "d1", "size": 1001}),
        ),
        (
            "a size that is not a number",
            json!({"device": "d0", "size": "x"}),
        ),
    ]
}

fn run_all(vm: &mut Vm) -> Vec<String> {
    let mut replies = Vec::new();
    for (_, args) in resize_commands() {
        replies.push(without_node_numbers(&vm.qmp.execute("block_resize", args)));
    }
    for line in [
        "block_resize d1 2",
        "block_resize d1 100M",
        "block_resize nope 100M",
        "block_resize d1",
        "help block_resize",
    ] {
        let reply = vm
            .qmp
            .execute("human-monitor-command", json!({"command-line": line}));
        replies.push(without_node_numbers(&reply));
        // A bare number is MiB (HMP's size argument), not bytes.
        if line == "block_resize d1 2" {
            let blocks = vm.qmp.execute("query-block", json!({}));
            let d1 = blocks["return"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["device"] == "d1")
                .cloned();
            replies.push(format!(
                "d1 {}",
                d1.unwrap()["inserted"]["image"]["virtual-size"]
            ));
        }
    }
    replies
}

/// Runs `run` on QEMU 7.2 (TCG: no guest runs under -S) and on qomvm, each with fresh
/// drives, and compares the results one by one, named by `names`.
fn compare_with_qemu(tag: &str, run: fn(&mut Vm) -> Vec<String>, names: &[String]) -> (Vm, Vm) {
    let mut theirs = start("qemu-system-x86_64", "tcg", &format!("qemu-{tag}"));
    let mut ours = start(QOMVM, "qtest", &format!("qomvm-{tag}"));
    let expected = run(&mut theirs);
    let got = run(&mut ours);
    assert_eq!(names.len(), expected.len(), "a name for each result");
    assert_eq!(got.len(), expected.len());
    for ((what, want), got) in names.iter().zip(&expected).zip(&got) {
        assert_eq!(got, want, "{what}");
    }
    (theirs, ours)
}

#[test]
fn block_resize_answers_as_qemu_and_the_images_follow() {
    if !have_tools() {
        return;
    }
    let names: Vec<String> = resize_commands()
        .into_iter()
        .map(|(what, _)| what)
        .chain([
            "HMP resize by a bare number",
            "its size",
            "HMP resize",
            "HMP unknown drive",
            "HMP without a size",
            "HMP help",
        ])
        .map(String::from)
        .collect();
    let (mut theirs, mut ours) = compare_with_qemu("resize", run_all, &names);
    // query-block reports the new sizes.
    let blocks = ours.qmp.execute("query-block", json!({}));
    let size_of = |device: &str| {
        blocks["return"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["device"] == device)
            .map(|b| b["inserted"]["image"]["virtual-size"].clone())
    };
    assert_eq!(size_of("d0"), Some(json!(32 * MIB)), "{blocks}");
    assert_eq!(size_of("d1"), Some(json!(100 * MIB)), "{blocks}");
    assert_eq!(size_of("d5"), Some(json!(48 * MIB)), "{blocks}");
    // The images as QEMU left them and as qomvm left them, after both quit.
    for vm in [&mut theirs, &mut ours] {
        vm.qmp.execute("quit", json!({}));
        let _ = vm.child.wait();
    }
    for vm in [&theirs, &ours] {
        let info = |name: &str| -> Value {
            let path = vm.dir.join(name).display().to_string();
            serde_json::from_str(&qemu_img(&["info", "--output=json", "-U", &path])).unwrap()
        };
        assert_eq!(
            info("q.qcow2")["virtual-size"],
            32 * MIB,
            "{}",
            vm.dir.display()
        );
        assert_eq!(info("r.img")["virtual-size"], 100 * MIB);
        assert_eq!(info("s.img")["virtual-size"], 48 * MIB);
        assert_eq!(info("f.img")["virtual-size"], 1440 * 1024);
        assert_eq!(info("c.iso")["virtual-size"], 10 * MIB);
        assert_eq!(info("snap.qcow2")["virtual-size"], 8 * MIB);
        for image in ["q.qcow2", "snap.qcow2"] {
            let q = vm.dir.join(image).display().to_string();
            let check = Command::new("qemu-img")
                .args(["check", "-q", &q])
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "qemu-img check {q}: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        // The snapshot is still there, at its own size.
        let snap = vm.dir.join("snap.qcow2").display().to_string();
        let list = qemu_img(&["snapshot", "-l", "-U", &snap]);
        assert!(list.contains("s1"), "{list}");
    }
    for vm in [theirs, ours] {
        let _ = std::fs::remove_dir_all(&vm.dir);
    }
}

/// `block_set_io_throttle` calls: each VMM's reply, then the throttle members of the
/// drive's `query-block` entry and its `info block` lines.
fn throttle_commands() -> Vec<(&'static str, Value, Option<&'static str>)> {
    let limits = |extra: Value| {
        let mut v =
            json!({"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    vec![
        (
            "bytes by drive",
            limits(json!({"device": "d0", "bps": 1_000_000})),
            Some("d0"),
        ),
        (
            "operations by device id, in a group, with a burst",
            limits(
                json!({"id": "vb", "iops": 100, "iops_max": 200, "iops_max_length": 5,
                "iops_size": 4096, "group": "g1"}),
            ),
            Some("d0"),
        ),
        (
            "the IDE disk joins the group",
            limits(json!({"device": "d1", "iops_rd": 50, "group": "g1"})),
            Some("d1"),
        ),
        (
            "the group's limits are the last set",
            limits(json!({"device": "d1", "iops_wr": 7})),
            Some("d0"),
        ),
        (
            "total and read at once",
            limits(json!({"device": "d0", "bps": 10, "bps_rd": 5})),
            None,
        ),
        (
            "iops_size without iops",
            limits(json!({"device": "d0", "bps": 10, "iops_size": 512})),
            None,
        ),
        (
            "a negative rate",
            limits(json!({"device": "d0", "iops": -1})),
            None,
        ),
        (
            "past the largest rate",
            limits(json!({"device": "d0", "bps": 1_000_000_000_000_001i64})),
            None,
        ),
        (
            "a burst below the rate",
            limits(json!({"device": "d0", "bps": 100, "bps_max": 50})),
            None,
        ),
        (
            "a burst without a rate",
            limits(json!({"device": "d0", "bps_max": 50})),
            None,
        ),
        (
            "a burst length without a burst",
            limits(json!({"device": "d0", "bps": 100, "bps_max_length": 3})),
            None,
        ),
        (
            "a burst length of 0",
            limits(json!({"device": "d0", "bps": 100, "bps_max": 200, "bps_max_length": 0})),
            None,
        ),
        (
            "both names",
            limits(json!({"device": "d0", "id": "vb", "bps": 1})),
            None,
        ),
        ("no name", limits(json!({"bps": 1})), None),
        (
            "an unknown drive",
            limits(json!({"device": "nope", "bps": 1})),
            None,
        ),
        (
            "an unknown device",
            limits(json!({"id": "nope", "bps": 1})),
            None,
        ),
        (
            "a drive without a medium",
            limits(json!({"device": "e0", "bps": 1})),
            None,
        ),
        ("a missing member", json!({"device": "d0", "bps": 1}), None),
        (
            "all zero lifts the limits",
            limits(json!({"device": "d0"})),
            Some("d0"),
        ),
    ]
}

/// The throttle members of drive `device`'s (or the anonymous drive of the newest device
/// of id `device`'s) `query-block` entry, by name (QEMU's QDict does not keep QAPI's order).
fn throttle_members(vm: &mut Vm, device: &str) -> Vec<(String, Value)> {
    let blocks = vm.qmp.execute("query-block", json!({}));
    let entry = blocks["return"]
        .as_array()
        .unwrap()
        .iter()
        // The newest: a device just deleted may still be listed (QEMU finalizes it later).
        .rfind(|b| b["device"] == device || (b["device"] == "" && b["qdev"] == device))
        .unwrap_or_else(|| panic!("no {device}: {blocks}"))
        .clone();
    let keep = |k: &str| k.starts_with("bps") || k.starts_with("iops") || k == "group";
    entry["inserted"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

fn run_throttle(vm: &mut Vm) -> Vec<String> {
    let mut seen = Vec::new();
    for (_, args, query) in throttle_commands() {
        seen.push(without_node_numbers(
            &vm.qmp.execute("block_set_io_throttle", args),
        ));
        if let Some(device) = query {
            seen.push(format!("{:?}", throttle_members(vm, device)));
        }
    }
    for line in [
        "block_set_io_throttle d1 0 0 0 10 0 0",
        "info block d1",
        "block_set_io_throttle d1 0 0 0 0 0 0",
        "info block d1",
        // With -n and a name QEMU 7.2 prints nothing.
        "info block -n d1",
        // A name no drive has is a device id.
        "block_set_io_throttle hd 0 0 0 5 0 0",
        "info block d1",
        "block_set_io_throttle hd 0 0 0 0 0 0",
    ] {
        let reply = vm
            .qmp
            .execute("human-monitor-command", json!({"command-line": line}));
        let text = reply["return"]
            .as_str()
            .unwrap_or_default()
            .replace(&vm.dir.display().to_string(), "DIR");
        seen.push(without_node_numbers(&Value::String(text)));
    }
    // A CD drive keeps its limits across medium changes (QEMU keeps them on the drive):
    // its group's, which another member may change while the drive has no medium.
    let iso = vm.dir.join("c.iso").display().to_string();
    let change = json!({"device": "d3", "filename": iso, "format": "raw"});
    let iops = |device: &str, iops: u32, group: &str| {
        json!({"device": device, "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": iops,
            "iops_rd": 0, "iops_wr": 0, "group": group})
    };
    for (name, args, query) in [
        ("block_set_io_throttle", iops("d3", 7, "d3"), true),
        ("blockdev-change-medium", change.clone(), true),
        ("eject", json!({"device": "d3"}), false),
        ("block_set_io_throttle", iops("d1", 3, "d3"), false),
        ("blockdev-change-medium", change, true),
        ("block_set_io_throttle", iops("d1", 0, "d3"), false),
    ] {
        seen.push(without_node_numbers(&vm.qmp.execute(name, args)));
        if query {
            seen.push(format!("{:?}", throttle_members(vm, "d3")));
        }
    }
    // They stay with the drive, not with the device's id: a new device of the same id
    // starts without them.
    let change = json!({"id": "cd2", "filename": iso, "format": "raw"});
    for (name, args) in [
        ("blockdev-change-medium", change.clone()),
        (
            "block_set_io_throttle",
            json!({"id": "cd2", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 9, "iops_rd": 0, "iops_wr": 0}),
        ),
        ("eject", json!({"id": "cd2"})),
        ("device_del", json!({"id": "cd2"})),
        ("device_add", json!({"driver": "scsi-cd", "id": "cd2"})),
        ("blockdev-change-medium", change),
    ] {
        seen.push(without_node_numbers(&vm.qmp.execute(name, args)));
    }
    seen.push(format!("{:?}", throttle_members(vm, "cd2")));
    // A `-blockdev` medium taken out leaves the limits with the drive: put in a new
    // device's drive, it has none.
    let node = json!({"driver": "raw", "node-name": "m1", "read-only": true,
        "file": {"driver": "file", "filename": iso, "read-only": true}});
    let limits = json!({"id": "cd2", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 5,
        "iops_rd": 0, "iops_wr": 0});
    for (name, args) in [
        ("blockdev-add", node),
        ("blockdev-open-tray", json!({"id": "cd2"})),
        ("blockdev-remove-medium", json!({"id": "cd2"})),
        (
            "blockdev-insert-medium",
            json!({"id": "cd2", "node-name": "m1"}),
        ),
        ("blockdev-close-tray", json!({"id": "cd2"})),
        ("block_set_io_throttle", limits),
        ("blockdev-open-tray", json!({"id": "cd2"})),
        ("blockdev-remove-medium", json!({"id": "cd2"})),
        ("device_del", json!({"id": "cd2"})),
        ("device_add", json!({"driver": "scsi-cd", "id": "cd2"})),
        ("blockdev-open-tray", json!({"id": "cd2"})),
        (
            "blockdev-insert-medium",
            json!({"id": "cd2", "node-name": "m1"}),
        ),
        ("blockdev-close-tray", json!({"id": "cd2"})),
    ] {
        seen.push(without_node_numbers(&vm.qmp.execute(name, args)));
    }
    seen.push(format!("{:?}", throttle_members(vm, "cd2")));
    seen
}

#[test]
fn block_set_io_throttle_answers_and_reports_as_qemu() {
    if !have_tools() {
        return;
    }
    let mut names = Vec::new();
    for (what, _, query) in throttle_commands() {
        names.push(what.to_string());
        if query.is_some() {
            names.push(format!("{what}: query-block"));
        }
    }
    names.extend(
        [
            "HMP set",
            "HMP info block",
            "HMP lift",
            "HMP info block after",
            "HMP info block -n NAME",
            "HMP set by device id",
            "HMP info block by id",
            "HMP lift by id",
            "CD limits",
            "CD limits: query-block",
            "CD medium changed",
            "CD medium changed: query-block",
            "CD ejected",
            "CD's group changed by another member",
            "CD medium back",
            "CD medium back: query-block",
            "the other member's limits lifted",
            "SCSI CD medium",
            "SCSI CD limits",
            "SCSI CD ejected",
            "SCSI CD unplugged",
            "SCSI CD plugged again",
            "SCSI CD medium again",
            "SCSI CD medium again: query-block",
            "node added",
            "tray opened",
            "medium removed",
            "node inserted",
            "tray closed",
            "node's limits",
            "tray opened again",
            "node removed",
            "SCSI CD unplugged again",
            "SCSI CD plugged a third time",
            "new tray opened",
            "node inserted in the new drive",
            "new tray closed",
            "new drive: query-block",
        ]
        .map(String::from),
    );
    let (theirs, ours) = compare_with_qemu("throttle", run_throttle, &names);
    for vm in [theirs, ours] {
        let _ = std::fs::remove_dir_all(&vm.dir);
    }
}

/// The limits hold: at 10 reads a second (a tenth of a second's burst), 21 reads take two
/// seconds at least; lifted, they take no time to speak of.
#[test]
fn reads_under_an_iops_limit_take_as_long_as_it_says() {
    use block::throttle::{Bucket, ThrottleConfig};
    let dir = scratch_dir("throttle");
    let path = dir.join("t.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let mut opts = block::OpenOptions::new(&path);
    opts.format = Some(block::Format::Raw);
    let backend = block::BlockBackend::open("", "throttled", opts, |_| {}).unwrap();
    let mut config = ThrottleConfig::default();
    config.bucket_mut(Bucket::OpsTotal).avg = 10;
    backend.set_io_limits("t", false, config);
    let mut buf = [0u8; 512];
    let start = std::time::Instant::now();
    for i in 0..21 {
        backend.read_at(&mut buf, i * 512).unwrap();
    }
    let limited = start.elapsed();
    assert!(
        limited >= Duration::from_millis(1900),
        "21 reads at 10 IOPS took {limited:?}"
    );
    assert!(limited < Duration::from_secs(20), "{limited:?}");
    backend.disable_io_limits();
    let start = std::time::Instant::now();
    for i in 0..21 {
        backend.read_at(&mut buf, i * 512).unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?} without limits",
        start.elapsed()
    );
    // Writes count against a write limit, reads do not.
    let mut config = ThrottleConfig::default();
    config.bucket_mut(Bucket::OpsWrite).avg = 5;
    backend.set_io_limits("t", false, config);
    let start = std::time::Instant::now();
    for i in 0..10 {
        backend.read_at(&mut buf, i * 512).unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "reads under a write limit"
    );
    for i in 0..6 {
        backend.write_at(&buf, i * 512).unwrap();
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "6 writes at 5 IOPS: {:?}",
        start.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Data written before a grow stays, the new space reads as zeroes, and a qcow2 grown over
/// a longer backing file does not show the backing file's bytes there.
#[test]
fn a_grown_image_keeps_its_data_and_reads_zeroes_beyond() {
    if !have_tools() {
        return;
    }
    let dir = scratch_dir("resize-data");
    let path = |name: &str| dir.join(name).display().to_string();
    // A 4 MiB base full of 0x5a; an overlay that shows only its first 1 MiB.
    qemu_img(&["create", "-q", "-f", "raw", &path("base.img"), "4M"]);
    std::fs::write(dir.join("base.img"), vec![0x5au8; 4 << 20]).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        &path("base.img"),
        &path("top.qcow2"),
        "1M",
    ]);
    let drive = format!("file={},if=none,id=top,format=qcow2", path("top.qcow2"));
    let args = ["-drive", &drive, "-device", "virtio-blk-pci,drive=top"].map(String::from);
    let mut vm = spawn(QOMVM, "qtest", &dir, "qmp", &args);
    let r = vm
        .qmp
        .execute("block_resize", json!({"device": "top", "size": 4 * MIB}));
    assert_eq!(r, json!({"return": {}}));
    vm.qmp.execute("quit", json!({}));
    vm.child.wait_timeout_or_kill(Duration::from_secs(10));
    // What qemu-io reads: the base's bytes in the first MiB, zeroes after.
    for (offset, len, byte) in [(0, MIB, 0x5a), (MIB, 3 * MIB, 0)] {
        let cmd = format!("read -P {byte} {offset} {len}");
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &cmd, &path("top.qcow2")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{cmd}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

trait WaitTimeout {
    fn wait_timeout_or_kill(&mut self, timeout: Duration);
}

impl WaitTimeout for Child {
    /// Waits for the process to end, killing it after `timeout`.
    fn wait_timeout_or_kill(&mut self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.kill();
        let _ = self.wait();
    }
}

/// `-drive`'s I/O limits (`throttling.*` and the legacy `iops=`, `bps_max=`, `group=`...):
/// QEMU's validation messages at start-up, and the limits `query-block` then reports.
#[test]
fn drive_throttling_options_start_as_on_qemu() {
    if !have_tools() {
        return;
    }
    let dir = scratch_dir("drive-throttle");
    let img = dir.join("t.img").display().to_string();
    qemu_img(&["create", "-q", "-f", "raw", &img, "1M"]);
    let refusal = |program: &str, extra: &str| -> String {
        let out = Command::new(program)
            .args([
                "-M",
                "none",
                "-S",
                "-display",
                "none",
                "-nodefaults",
                "-drive",
            ])
            .arg(format!("file={img},if=none,format=raw,id=t,{extra}"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{program} accepted {extra}");
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.split_once(": ")
            .map(|(_, rest)| rest.to_string())
            .unwrap_or(text)
    };
    for bad in [
        "iops=abc",
        "iops=10,iops_rd=5",
        "throttling.bps-total=100,throttling.bps-total-max=50",
        "iops=-1",
        "throttling.iops-size=512",
        "bps_max=5",
        "throttling.bps-total=100,throttling.bps-total-max-length=2",
    ] {
        assert_eq!(
            refusal(QOMVM, bad),
            refusal("qemu-system-x86_64", bad),
            "{bad}"
        );
    }
    let members = |program: &str, accel: &str| {
        let drive = format!(
            "file={img},if=none,format=raw,id=t,file.locking=off,iops=100,throttling.iops-total-max=150,throttling.iops-total-max-length=4,bps_wr=2000000,group=g2"
        );
        let mut vm = spawn(program, accel, &dir, accel, &["-drive".to_string(), drive]);
        throttle_members(&mut vm, "t")
    };
    let ours = members(QOMVM, "qtest");
    assert_eq!(ours, members("qemu-system-x86_64", "tcg"));
    assert!(
        ours.contains(&("group".to_string(), json!("g2"))),
        "{ours:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
