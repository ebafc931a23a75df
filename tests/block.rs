//! The block layer on real images made by QEMU's tools: raw and qcow2 read back what
//! `qemu-io` wrote, qcow2 overlays keep their base untouched, read-only refuses writes,
//! QEMU-compatible image locks both ways (against `qemu-io` and a second qomvm), `-drive`
//! and `-blockdev` errors, and `query-block` over QMP. Skipped, with the reason printed,
//! where `qemu-img`/`qemu-io` are missing.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use block::{BlockBackend, BlockError, Format, OpenOptions};
use serde_json::Value;

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
static NEXT: AtomicU32 = AtomicU32::new(0);

fn have_qemu_tools() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        eprintln!("skipped: qemu-img and qemu-io (package qemu-utils) are needed");
    }
    ok
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "qomvm-block-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// An image of `format` with 0xab in its first 64 KiB, written by qemu-io.
fn image(dir: &Path, name: &str, format: &str) -> PathBuf {
    let path = dir.join(name);
    run("qemu-img", &["create", "-f", format, p(&path), "1M"]);
    run(
        "qemu-io",
        &["-f", format, "-c", "write -P 0xab 0 64k", p(&path)],
    );
    path
}

fn open(path: &Path, format: Format, read_only: bool) -> Result<BlockBackend, BlockError> {
    let mut opts = OpenOptions::new(path);
    opts.format = Some(format);
    opts.read_only = read_only;
    BlockBackend::open("d0", "#test", opts, |w| panic!("unexpected warning {w}"))
}

#[test]
fn raw_and_qcow2_read_back_what_qemu_io_wrote() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    for (format, kind) in [("raw", Format::Raw), ("qcow2", Format::Qcow2)] {
        let path = image(&dir, &format!("a.{format}"), format);
        let b = open(&path, kind, false).unwrap();
        assert_eq!(b.size(), 1 << 20);
        let mut buf = vec![0u8; 128 << 10];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf[..64 << 10].iter().all(|&x| x == 0xab), "{format}");
        assert!(buf[64 << 10..].iter().all(|&x| x == 0), "{format}");
        b.write_at(&[0x5a; 4096], 128 << 10).unwrap();
        b.write_zeroes(0, 4096).unwrap();
        b.flush().unwrap();
        assert!(matches!(
            b.read_at(&mut buf, (1 << 20) - 4096),
            Err(BlockError::OutOfRange { .. })
        ));
        drop(b);
        run(
            "qemu-io",
            &[
                "-f",
                format,
                "-c",
                "read -P 0x5a 128k 4k",
                "-c",
                "read -P 0 0 4k",
                "-c",
                "read -P 0xab 4k 60k",
                p(&path),
            ],
        );
        if format == "qcow2" {
            run("qemu-img", &["check", p(&path)]);
        }
    }
}

#[test]
fn qcow2_overlay_reads_its_base_and_writes_to_itself() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let base = image(&dir, "base.qcow2", "qcow2");
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    let b = open(&top, Format::Qcow2, false).unwrap();
    assert_eq!(b.image_info().backing_depth(), 1);
    let mut buf = vec![0u8; 64 << 10];
    b.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0xab));
    b.write_at(&[0xcd; 4096], 0).unwrap();
    b.flush().unwrap();
    drop(b);
    run("qemu-img", &["check", p(&top)]);
    run("qemu-img", &["check", p(&base)]);
    run("qemu-io", &["-r", "-c", "read -P 0xab 0 64k", p(&base)]);
    run(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0xcd 0 4k",
            "-c",
            "read -P 0xab 4k 60k",
            p(&top),
        ],
    );
    // The overlay differs from its base exactly where qomvm wrote.
    let out = Command::new("qemu-img")
        .args(["compare", p(&base), p(&top)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("offset 0"));
}

#[test]
fn read_only_refuses_writes() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let path = image(&dir, "ro.qcow2", "qcow2");
    let b = open(&path, Format::Qcow2, true).unwrap();
    assert!(matches!(
        b.write_at(&[1; 512], 0),
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(b.write_zeroes(0, 512), Err(BlockError::ReadOnly)));
    assert!(matches!(b.discard(0, 512), Err(BlockError::ReadOnly)));
    let mut buf = [0u8; 512];
    b.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xab; 512]);
}

/// A qomvm holding `drive` open, waiting on `-qmp stdio` (killed on drop).
struct Holder(Child);

impl Holder {
    fn start(drive: &str) -> Holder {
        let mut child = Command::new(QOMVM)
            .args([
                "-M",
                "none",
                "-accel",
                "qtest",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-drive", drive, "-qmp", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The greeting comes once the images are open and locked.
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("QMP"), "no greeting: {line:?}");
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qomvm(args: &[&str]) -> Output {
    Command::new(QOMVM)
        .args([
            "-M",
            "none",
            "-accel",
            "qtest",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs qomvm with `-qmp stdio`, negotiating and quitting at once: whether the images open.
fn qomvm_quit(args: &[&str]) -> Output {
    let mut child = Command::new(QOMVM)
        .args([
            "-M",
            "none",
            "-accel",
            "qtest",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(args)
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.as_mut().unwrap();
    let _ = writeln!(stdin, r#"{{"execute":"qmp_capabilities"}}"#);
    let _ = writeln!(stdin, r#"{{"execute":"quit"}}"#);
    child.wait_with_output().unwrap()
}

fn lock_error(path: &Path) -> String {
    format!(
        "Failed to get \"write\" lock\nIs another process using the image [{}]?",
        path.display()
    )
}

/// What QEMU says when another user holds write permission it does not share, while it
/// shares the others (`qemu-io` on a raw image holds only the permission bytes).
fn shared_lock_error(path: &Path) -> String {
    format!(
        "Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
        path.display()
    )
}

#[test]
fn a_second_qomvm_gets_qemus_lock_error() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let path = image(&dir, "shared.qcow2", "qcow2");
    let drive = format!("file={},format=qcow2,if=none,id=d0", path.display());
    let _holder = Holder::start(&drive);
    let out = qomvm(&["-drive", &drive]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!("qomvm: -drive {drive}: {}\n", lock_error(&path))
    );
    // qemu-io cannot write it either, and says so in the same words.
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 512", p(&path)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&lock_error(&path)),
        "{out:?}"
    );
    // A reader that does not share writing is refused too; one that does (-U) reads.
    let out = Command::new("qemu-io")
        .args(["-r", "-c", "read 0 512", p(&path)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"));
    run(
        "qemu-io",
        &["-U", "-r", "-c", "read -P 0xab 0 512", p(&path)],
    );
}

#[test]
fn qemu_io_holding_the_image_locks_qomvm_out() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let path = image(&dir, "held.raw", "raw");
    let mut io = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 20000", p(&path)])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let drive = format!("file={},format=raw,if=none", path.display());
    // Wait for qemu-io's locks, probing them the way QEMU does.
    let deadline = Instant::now() + Duration::from_secs(10);
    while block::lock::ImageLock::acquire(&path, 3, 5).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = qomvm(&["-drive", &drive]);
    let _ = io.kill();
    let _ = io.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.ends_with(&format!("{}\n", shared_lock_error(&path))),
        "{stderr}"
    );
    // Released with qemu-io: a read-only qomvm and a read-write one both open it now.
    let out = qomvm_quit(&["-drive", &format!("{drive},readonly=on")]);
    assert!(out.status.success(), "{out:?}");
    let out = qomvm_quit(&["-drive", &drive]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn query_block_and_info_block() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    image(&dir, "base.qcow2", "qcow2");
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    let drive = format!("file={},if=none,id=disk0,cache=none", top.display());
    let mut holder = Holder::start(&drive);
    let stdin = holder.0.stdin.as_mut().unwrap();
    writeln!(stdin, r#"{{"execute":"qmp_capabilities"}}"#).unwrap();
    writeln!(stdin, r#"{{"execute":"query-block"}}"#).unwrap();
    writeln!(stdin, r#"{{"execute":"query-named-block-nodes"}}"#).unwrap();
    writeln!(
        stdin,
        r#"{{"execute":"human-monitor-command","arguments":{{"command-line":"info block"}}}}"#
    )
    .unwrap();
    let mut lines = BufReader::new(holder.0.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    assert_eq!(next()["return"], serde_json::json!({}));
    let blocks = next()["return"].clone();
    let b = &blocks[0];
    assert_eq!(b["device"], "disk0");
    assert_eq!(b["locked"], false);
    assert_eq!(b["removable"], false);
    let ins = &b["inserted"];
    assert_eq!(ins["file"], p(&top));
    assert_eq!(ins["drv"], "qcow2");
    assert_eq!(ins["ro"], false);
    assert_eq!(ins["backing_file"], "base.qcow2");
    assert_eq!(ins["backing_file_depth"], 1);
    assert_eq!(
        ins["cache"],
        serde_json::json!({"writeback": true, "direct": true, "no-flush": false})
    );
    assert_eq!(ins["image"]["format"], "qcow2");
    assert_eq!(ins["image"]["virtual-size"], 1 << 20);
    assert_eq!(ins["image"]["backing-filename"], "base.qcow2");
    assert_eq!(ins["image"]["backing-filename-format"], "qcow2");
    assert_eq!(ins["image"]["backing-image"]["format"], "qcow2");
    let nodes = next()["return"].clone();
    let drvs: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["drv"].as_str().unwrap())
        .collect();
    assert_eq!(drvs, ["qcow2", "file", "qcow2", "file"]);
    assert_eq!(nodes[2]["ro"], true);
    let info = next()["return"].as_str().unwrap().to_string();
    let node = ins["node-name"].as_str().unwrap();
    assert_eq!(
        info,
        format!(
            "disk0 ({node}): {} (qcow2)\r\n    Cache mode:       writeback, direct\r\n    Backing file:     base.qcow2 (chain depth: 1)\r\n",
            top.display()
        )
        .replace("\r\n", if info.contains("\r\n") { "\r\n" } else { "\n" })
    );
}

#[test]
fn blockdev_in_both_forms_opens_named_nodes() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let img = image(&dir, "n.qcow2", "qcow2");
    let raw = image(&dir, "n.raw", "raw");
    let dotted = format!(
        "driver=qcow2,node-name=n0,file.driver=file,file.filename={}",
        img.display()
    );
    let json = format!(
        r#"{{"driver":"raw","node-name":"n1","read-only":true,"file":{{"driver":"file","filename":"{}"}}}}"#,
        raw.display()
    );
    let mut child = Command::new(QOMVM)
        .args([
            "-M",
            "none",
            "-accel",
            "qtest",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-blockdev", &dotted, "-blockdev", &json, "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.as_mut().unwrap();
    writeln!(stdin, r#"{{"execute":"qmp_capabilities"}}"#).unwrap();
    writeln!(stdin, r#"{{"execute":"query-named-block-nodes"}}"#).unwrap();
    writeln!(stdin, r#"{{"execute":"quit"}}"#).unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _greeting = lines.next();
    let _caps = lines.next();
    let nodes: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let nodes = nodes["return"].as_array().unwrap().clone();
    let names: Vec<(&str, &str, bool)> = nodes
        .iter()
        .map(|n| {
            (
                n["node-name"].as_str().unwrap(),
                n["drv"].as_str().unwrap(),
                n["ro"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(names[0], ("n0", "qcow2", false));
    assert_eq!(names[2], ("n1", "raw", true));
    assert!(child.wait().unwrap().success());
    // The JSON form's node is read-only: qemu-io may still read it, and qomvm is gone.
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0xab 0 4k", p(&raw)],
    );
}

#[test]
fn bad_drive_options_are_one_line_errors() {
    let dir = scratch();
    let img = dir.join("x.raw");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let f = img.display().to_string();
    let missing = dir.join("missing.qcow2").display().to_string();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["-drive".into(), format!("file={f},if=none,foo=bar")],
            "Invalid parameter 'foo'".into(),
        ),
        (
            vec!["-drive".into(), format!("file={f},if=none,cache=fast")],
            "invalid cache option".into(),
        ),
        (
            vec!["-drive".into(), format!("file={f},if=none,readonly=maybe")],
            "Parameter 'readonly' expects 'on' or 'off'".into(),
        ),
        (
            vec!["-drive".into(), format!("file={f},if=none,format=vmdk")],
            "Unknown driver 'vmdk'".into(),
        ),
        (
            vec!["-drive".into(), format!("file={f},if=none,discard=maybe")],
            "Invalid discard option".into(),
        ),
        (
            vec!["-drive".into(), format!("file={f},if=none,aio=posix")],
            "invalid aio option".into(),
        ),
        (
            vec!["-drive".into(), format!("file={f},if=bogus")],
            "unsupported bus type 'bogus'".into(),
        ),
        (
            vec!["-drive".into(), format!("file={f},if=virtio")],
            "if=virtio is not available yet".into(),
        ),
        (
            vec!["-drive".into(), format!("file={missing},if=none")],
            format!("Could not open '{missing}': No such file or directory"),
        ),
        (
            vec![
                "-blockdev".into(),
                format!("driver=raw,file.driver=file,file.filename={f}"),
            ],
            "'node-name' must be specified for the root node".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                format!("driver=vhdx,node-name=a,file.driver=file,file.filename={f}"),
            ],
            "Parameter 'driver' does not accept value 'vhdx'".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                format!("driver=file,node-name=a,filename={f},bogus=1"),
            ],
            "Parameter 'bogus' is unexpected".into(),
        ),
        (
            vec![f.clone()],
            "a bare disk image (-hda) is not supported".into(),
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = qomvm(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
    }
    // Format probing: raw with QEMU's warning, and the VM still starts.
    let out = qomvm_quit(&["-drive", &format!("file={f},if=none")]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with(&format!(
        "qomvm: warning: Image format was not specified for '{f}' and probing guessed raw."
    )));
}
