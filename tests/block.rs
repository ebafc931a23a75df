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
        test_support::skip::skip("qemu-img and qemu-io (package qemu-utils) are needed");
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
    unlocked(|| {
        BlockBackend::open("d0", "#test", opts.clone(), |w| {
            panic!("unexpected warning {w}")
        })
    })
}

/// Opens with `open`, again for up to two seconds while the image reads as locked. The
/// tests of this file run on parallel threads, several spawn `qemu-img`, and a child
/// forked before a backend was dropped holds the image's lock (an open file description
/// shared with this process) until its `exec` closes it: a reopen right after a drop can
/// meet that child's lock (CI saw it once). No test here expects a lock conflict.
fn unlocked(
    mut open: impl FnMut() -> Result<BlockBackend, BlockError>,
) -> Result<BlockBackend, BlockError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match open() {
            Err(BlockError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
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

/// The error of an open that must fail.
fn refused(opened: Result<BlockBackend, BlockError>) -> BlockError {
    match opened {
        Ok(_) => panic!("the image was opened"),
        Err(e) => e,
    }
}

/// Found by `tests/fuzz_loaders.rs`: a refcount table naming refcount blocks beyond the
/// end of the image, or none, made imago allocate a block for the block for the block...
/// until the stack overflowed; a size beyond the L1 table's reach made the open write L2
/// tables for ever. Such images are refused at open, as QEMU refuses them.
#[test]
fn corrupt_qcow2_metadata_is_refused_at_open() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let path = image(&dir, "reftable.qcow2", "qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    let table = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    bytes[table..table + 8].copy_from_slice(&0x0200_0000u64.to_be_bytes());
    bytes[table + 8..table + 16].copy_from_slice(&(1u64 << 56).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = refused(open(&path, Format::Qcow2, false));
    assert!(
        err.to_string().ends_with(
            "Refblock at 0x2000000 is beyond the end of the image (reftable index: 0x0)"
        ),
        "{err}"
    );
    // A size the L1 table does not cover (QEMU refuses it in qcow2_open): the L2 tables
    // qomvm adds at open would have filled the host's disk.
    let mut huge = std::fs::read(image(&dir, "size.qcow2", "qcow2")).unwrap();
    huge[24..32].copy_from_slice(&0xffff_ffff_0000u64.to_be_bytes());
    std::fs::write(dir.join("size.qcow2"), &huge).unwrap();
    let err = refused(open(&dir.join("size.qcow2"), Format::Qcow2, false));
    assert!(err.to_string().ends_with("L1 table is too small"), "{err}");
    // No refcount block for the header's cluster.
    bytes[table..table + 16].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let err = refused(open(&path, Format::Qcow2, false));
    assert!(
        err.to_string()
            .ends_with("no refcount block for clusters in use (reftable index: 0x0)"),
        "{err}"
    );
    // No refcount table at all (QEMU refuses it in qcow2_open).
    bytes[56..60].copy_from_slice(&0u32.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = refused(open(&path, Format::Qcow2, false));
    assert!(
        err.to_string()
            .ends_with("Image does not contain a reference count table"),
        "{err}"
    );
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
    // Replies in order; events (RESUME, when the machine starts after the greeting) skipped.
    let mut next = || -> Value {
        loop {
            let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    };
    assert_eq!(next()["return"], serde_json::json!({}));
    let blocks = next()["return"].clone();
    let b = &blocks[0];
    assert_eq!(b["device"], "disk0");
    assert_eq!(b["locked"], false);
    // A drive without a device takes any medium (QEMU 7.2 says so too).
    assert_eq!(b["removable"], true);
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
            "disk0 ({node}): {} (qcow2)\r\n    Removable device: not locked, tray closed\r\n    Cache mode:       writeback, direct\r\n    Backing file:     base.qcow2 (chain depth: 1)\r\n",
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
    // The caps reply, then the query's; the RESUME event of the vCPUs starting may come
    // anywhere between.
    let replies: Vec<Value> = lines
        .by_ref()
        .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
        .filter(|v| v.get("event").is_none())
        .take(2)
        .collect();
    let nodes = replies[1]["return"].as_array().unwrap().clone();
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
            vec!["-drive".into(), format!("file={f},format=raw,if=ide")],
            "machine type does not support if=ide,bus=0,unit=0".into(),
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
        // A bare argument is -hda (on -M none a drive of no device).
        (
            vec![missing.clone()],
            format!("Could not open '{missing}': No such file or directory"),
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

/// Opens `path` in `format` with `f` adjusting the options.
fn open_with(
    path: &Path,
    format: Format,
    f: impl FnOnce(&mut OpenOptions),
) -> Result<BlockBackend, BlockError> {
    let mut opts = OpenOptions::new(path);
    opts.format = Some(format);
    f(&mut opts);
    unlocked(|| {
        BlockBackend::open("", &block::auto_node_name(), opts.clone(), |w| {
            panic!("unexpected warning {w}")
        })
    })
}

/// `qemu-img map --output=json`'s entry covering `offset`: `(zero, data)`.
fn map_at(path: &Path, offset: u64) -> (bool, bool) {
    let out = run("qemu-img", &["map", "-U", "--output=json", p(path)]);
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap();
            start <= offset && offset < start + e["length"].as_u64().unwrap()
        })
        .unwrap_or_else(|| panic!("no map entry at {offset}: {map}"));
    (
        entry["zero"].as_bool().unwrap(),
        entry["data"].as_bool().unwrap(),
    )
}

/// `qemu-img check --output=json`, which must find no corruption nor leak. The checks
/// share the image (`-U`): a lock this process just dropped may live on for a moment in a
/// child a parallel test is spawning (forked, not yet exec'ed).
fn check(path: &Path) -> Value {
    let out = run("qemu-img", &["check", "-U", "--output=json", p(path)]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["check-errors"], 0, "{report}");
    assert!(report.get("corruptions").is_none_or(|c| c == 0), "{report}");
    assert!(report.get("leaks").is_none_or(|c| c == 0), "{report}");
    report
}

#[test]
fn io_accounting_counts_requests_as_qemu_does() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let path = image(&dir, "acct.raw", "raw");
    let b = open(&path, Format::Raw, false).unwrap();
    let fresh = b.stats();
    assert_eq!(fresh.idle_time_ns, None, "no request yet");
    assert!(fresh.account_invalid && fresh.account_failed);
    let mut buf = vec![0u8; 4096];
    b.read_at(&mut buf, 0).unwrap();
    b.read_at(&mut buf, 4096).unwrap();
    b.write_at(&[1; 512], 8192).unwrap();
    b.write_zeroes(65536, 4096).unwrap();
    b.flush().unwrap();
    // discard=ignore: a successful no-op, still a request.
    b.discard(0, 4096).unwrap();
    assert!(matches!(
        b.read_at(&mut buf, (1 << 20) - 1),
        Err(BlockError::OutOfRange { .. })
    ));
    b.account_invalid(block::IoType::Write);
    let s = b.stats();
    assert_eq!((s.rd.bytes, s.rd.operations, s.rd.invalid), (8192, 2, 1));
    assert_eq!((s.wr.bytes, s.wr.operations, s.wr.invalid), (4608, 2, 1));
    assert_eq!(
        (s.flush.operations, s.unmap.operations, s.unmap.bytes),
        (1, 1, 4096)
    );
    assert_eq!(s.wr_highest_offset, 65536 + 4096);
    assert!(s.rd.total_time_ns > 0 && s.wr.total_time_ns > 0);
    assert_eq!((s.rd.failed, s.wr.failed), (0, 0));
    assert!(s.idle_time_ns.is_some());
    assert_eq!(b.file_stats().wr_highest_offset, 65536 + 4096);
    drop(b);

    // A read-only node refuses writes as invalid requests; a probed raw image fails
    // writes that would make it look like qcow2 (an I/O error: failed).
    let ro = open(&path, Format::Raw, true).unwrap();
    assert!(matches!(
        ro.write_at(&[1; 512], 0),
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(ro.discard(0, 512), Err(BlockError::ReadOnly)));
    assert_eq!((ro.stats().wr.invalid, ro.stats().unmap.invalid), (1, 1));
    drop(ro);
    let probed =
        unlocked(|| BlockBackend::open("", "#probed", OpenOptions::new(&path), |_| {})).unwrap();
    let mut magic = vec![0u8; 512];
    magic[..4].copy_from_slice(b"QFI\xfb");
    assert!(probed.write_at(&magic, 0).is_err());
    assert_eq!(
        (probed.stats().wr.failed, probed.stats().wr.operations),
        (1, 0)
    );
}

#[test]
fn detect_zeroes_turns_zero_writes_into_zero_clusters() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let path = dir.join("dz.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "4M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xab 0 1M", p(&path)],
    );
    let zeroes = vec![0u8; 65536];
    // off: the zeroes are data.
    let b = open_with(&path, Format::Qcow2, |_| {}).unwrap();
    b.write_at(&zeroes, 0).unwrap();
    drop(b);
    assert_eq!(map_at(&path, 0), (false, true));
    // on: a zero cluster.
    let b = open_with(&path, Format::Qcow2, |o| {
        o.detect_zeroes = block::DetectZeroes::On
    })
    .unwrap();
    b.write_at(&zeroes, 65536).unwrap();
    // Not all zeroes: written as data.
    let mut mixed = zeroes.clone();
    mixed[100] = 1;
    b.write_at(&mixed, 131072).unwrap();
    assert_eq!(b.stats().wr.operations, 2);
    drop(b);
    assert_eq!(map_at(&path, 65536), (true, false));
    assert_eq!(map_at(&path, 131072), (false, true));
    let before = check(&path)["allocated-clusters"].as_u64().unwrap();
    // unmap with discard=unmap: the cluster is freed as well.
    let b = open_with(&path, Format::Qcow2, |o| {
        o.detect_zeroes = block::DetectZeroes::Unmap;
        o.discard = block::DiscardMode::Unmap;
    })
    .unwrap();
    b.write_at(&zeroes, 196608).unwrap();
    drop(b);
    assert_eq!(map_at(&path, 196608), (true, false));
    let after = check(&path)["allocated-clusters"].as_u64().unwrap();
    assert!(after < before, "{after} clusters, {before} before");
    run(
        "qemu-io",
        &[
            "-r",
            "-U",
            "-f",
            "qcow2",
            "-c",
            "read -P 0 0 128k",
            "-c",
            "read -P 0 192k 64k",
            "-c",
            "read -P 0xab 256k 768k",
            p(&path),
        ],
    );
}

#[test]
fn discard_frees_qcow2_clusters_and_punches_holes_in_raw_files() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    // qcow2: written clusters are freed under discard=unmap, kept under discard=ignore.
    let path = dir.join("d.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "4M"]);
    let b = open_with(&path, Format::Qcow2, |_| {}).unwrap();
    b.write_at(&vec![0x5a; 1 << 20], 0).unwrap();
    drop(b);
    let written = check(&path)["allocated-clusters"].as_u64().unwrap();
    assert_eq!(written, 16, "1 MiB of 64 KiB clusters");
    let b = open_with(&path, Format::Qcow2, |_| {}).unwrap();
    b.discard(0, 512 << 10).unwrap();
    drop(b);
    assert_eq!(check(&path)["allocated-clusters"].as_u64().unwrap(), 16);
    let b = open_with(&path, Format::Qcow2, |o| {
        o.discard = block::DiscardMode::Unmap
    })
    .unwrap();
    b.discard(0, 512 << 10).unwrap();
    drop(b);
    assert_eq!(check(&path)["allocated-clusters"].as_u64().unwrap(), 8);
    assert!(!map_at(&path, 0).1, "no data where it was discarded");
    assert!(map_at(&path, 512 << 10).1);
    run(
        "qemu-io",
        &[
            "-r",
            "-U",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 512k 512k",
            p(&path),
        ],
    );

    // raw: a hole (fewer blocks), reading back zeroes.
    use std::os::unix::fs::MetadataExt;
    let raw = dir.join("d.raw");
    run("qemu-img", &["create", "-f", "raw", p(&raw), "4M"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 2M", p(&raw)],
    );
    let blocks = |path: &Path| std::fs::metadata(path).unwrap().blocks();
    let full = blocks(&raw);
    let b = open_with(&raw, Format::Raw, |_| {}).unwrap();
    b.discard(0, 1 << 20).unwrap();
    assert_eq!(blocks(&raw), full, "discard=ignore keeps the data");
    drop(b);
    let b = open_with(&raw, Format::Raw, |o| o.discard = block::DiscardMode::Unmap).unwrap();
    b.discard(0, 1 << 20).unwrap();
    assert!(
        blocks(&raw) + 1024 <= full,
        "{} blocks, {full} before",
        blocks(&raw)
    );
    let file = b.file_stats();
    assert_eq!((file.discard_nb_ok, file.discard_bytes_ok), (1, 1 << 20));
    let mut buf = vec![0xffu8; 4096];
    b.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    drop(b);
    run(
        "qemu-io",
        &[
            "-r",
            "-U",
            "-f",
            "raw",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0x5a 1M 1M",
            p(&raw),
        ],
    );
}

#[test]
fn aio_modes_are_checked_as_qemu_checks_them() {
    let dir = scratch();
    let img = dir.join("aio.raw");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let f = img.display().to_string();
    let native =
        "aio=native was specified, but it requires cache.direct=on, which was not specified.";
    for args in [
        vec![
            "-drive".to_string(),
            format!("file={f},format=raw,if=none,aio=native"),
        ],
        vec![
            "-blockdev".to_string(),
            format!("driver=file,node-name=a0,filename={f},aio=native"),
        ],
        vec![
            "-blockdev".to_string(),
            format!("driver=raw,node-name=a0,file.driver=file,file.filename={f},file.aio=native"),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = qomvm(&args);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("qomvm: -{} {}: {native}\n", &args[0][1..], args[1])
        );
    }
    for args in [
        vec!["-drive".to_string(), format!("file={f},format=raw,if=none,aio=native,cache=none")],
        vec!["-drive".to_string(), format!("file={f},format=raw,if=none,aio=io_uring")],
        vec![
            "-blockdev".to_string(),
            format!("driver=raw,node-name=a0,file.driver=file,file.filename={f},file.aio=native,file.cache.direct=on"),
        ],
        vec![
            "-blockdev".to_string(),
            format!("driver=file,node-name=a0,filename={f},aio=native,cache.direct=on"),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = qomvm_quit(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
}

#[test]
fn detect_zeroes_and_reference_errors_are_qemus() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let img = dir.join("x.raw");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let f = img.display().to_string();
    let q = image(&dir, "x.qcow2", "qcow2").display().to_string();
    let file0 = format!("driver=file,node-name=f0,filename={f}");
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["-drive".into(), format!("file={f},format=raw,if=none,detect-zeroes=bogus")],
            "invalid parameter value: bogus".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                format!("driver=raw,node-name=r0,detect-zeroes=bogus,file.driver=file,file.filename={f}"),
            ],
            "Parameter 'detect-zeroes' does not accept value 'bogus'".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                format!("driver=raw,node-name=r0,detect-zeroes=unmap,file.driver=file,file.filename={f}"),
            ],
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into(),
        ),
        (
            vec!["-blockdev".into(), format!("{file0},detect-zeroes=unmap")],
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into(),
        ),
        (
            vec!["-blockdev".into(), "driver=raw,node-name=r0,file=nope".into()],
            "Cannot find device='nope' nor node-name='nope'".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                format!("driver=qcow2,node-name=q0,file.driver=file,file.filename={q},backing=nope"),
            ],
            "Could not open backing file: Cannot find device='nope' nor node-name='nope'".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                format!("driver=raw,node-name=r0,file.driver=file,file.filename={f},backing=null"),
            ],
            "Parameter 'backing' is unexpected".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                format!(r#"{{"driver":"qcow2","node-name":"q0","file":{{"driver":"file","filename":"{q}"}},"backing":5}}"#),
            ],
            "Invalid parameter type for 'backing', expected: BlockdevRefOrNull".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                file0.clone(),
                "-blockdev".into(),
                "driver=raw,node-name=r0,file=f0".into(),
                "-blockdev".into(),
                "driver=raw,node-name=r1,file=f0".into(),
            ],
            "Permission conflict on node 'f0': permissions 'write' are both required by node 'r0' (uses node 'f0' as 'file' child) and unshared by node 'r1' (uses node 'f0' as 'file' child).".into(),
        ),
        (
            vec![
                "-blockdev".into(),
                file0.clone(),
                "-blockdev".into(),
                "driver=raw,node-name=f0,file=f0".into(),
            ],
            "Duplicate nodes with node-name='f0'".into(),
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = qomvm(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(
            stderr,
            format!(
                "qomvm: {} {}: {expected}\n",
                args[args.len() - 2],
                args[args.len() - 1]
            )
        );
    }
    // -drive takes detect-zeroes=unmap without discard=unmap, as QEMU does.
    let out = qomvm_quit(&[
        "-drive",
        &format!("file={f},format=raw,if=none,detect-zeroes=unmap"),
    ]);
    assert!(out.status.success(), "{out:?}");
}

/// Runs qomvm with `-qmp stdio` and `args`, sends `commands` and returns their replies.
fn qmp_replies(args: &[&str], commands: &[Value]) -> Vec<Value> {
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
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, r#"{{"execute":"qmp_capabilities"}}"#).unwrap();
    for c in commands {
        writeln!(stdin, "{c}").unwrap();
    }
    writeln!(stdin, r#"{{"execute":"quit"}}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let replies: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("return").is_some() || v.get("error").is_some())
        .collect();
    // qmp_capabilities' reply first, quit's last.
    replies[1..=commands.len()].to_vec()
}

#[test]
fn blockdev_references_take_file_and_backing_nodes() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let base = image(&dir, "base.qcow2", "qcow2");
    let other = dir.join("other.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&other), "1M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xcd 0 64k", p(&other)],
    );
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    let query = serde_json::json!({"execute": "query-named-block-nodes"});
    // file=NODE and backing=NODE, in both syntaxes.
    let replies = qmp_replies(
        &[
            "-blockdev",
            &format!("driver=file,node-name=tf,filename={}", p(&top)),
            "-blockdev",
            &format!(
                "driver=qcow2,node-name=ob,file.driver=file,file.filename={}",
                p(&other)
            ),
            "-blockdev",
            r#"{"driver":"qcow2","node-name":"tq","file":"tf","backing":"ob"}"#,
        ],
        std::slice::from_ref(&query),
    );
    let nodes = replies[0]["return"].as_array().unwrap().clone();
    let find = |name: &str| {
        nodes
            .iter()
            .find(|n| n["node-name"] == name)
            .unwrap_or_else(|| panic!("no node {name}: {nodes:?}"))
            .clone()
    };
    let tq = find("tq");
    assert_eq!(tq["drv"], "qcow2");
    assert_eq!(tq["backing_file_depth"], 1);
    assert_eq!(tq["image"]["backing-image"]["filename"], p(&other));
    assert_eq!(find("tf")["drv"], "file");
    assert_eq!(find("tf")["file"], p(&top));
    assert_eq!(find("ob")["ro"], true, "a backing node is read through");
    // backing=null: no backing chain.
    let replies = qmp_replies(
        &[
            "-blockdev",
            &format!(
                r#"{{"driver":"qcow2","node-name":"tq","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
                p(&top)
            ),
        ],
        std::slice::from_ref(&query),
    );
    let tq = &replies[0]["return"][0];
    assert_eq!(tq["node-name"], "tq");
    assert_eq!(tq["backing_file_depth"], 0);
    assert!(tq["image"].get("backing-image").is_none());

    // The data: through the backing node, and none with backing=null.
    let named = |name: &str, path: &Path, format: Format| {
        let mut opts = OpenOptions::new(path);
        opts.format = Some(format);
        BlockBackend::open("", name, opts, |_| {}).unwrap()
    };
    block::add_backend(named("lib-other", &other, Format::Qcow2)).unwrap();
    let via_node = open_with(&top, Format::Qcow2, |o| {
        o.backing = block::BackingOption::Node("lib-other".into())
    })
    .unwrap();
    assert!(
        block::find_backend("lib-other").is_none(),
        "taken as the backing child"
    );
    let mut buf = vec![0u8; 4096];
    via_node.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0xcd));
    let without = open_with(&top, Format::Qcow2, |o| {
        o.backing = block::BackingOption::Null
    });
    assert!(without.is_err(), "the image is locked by the first");
    drop(via_node);
    // Another overlay of the same base: reopening `top` at once could meet its lock still
    // held by a process a parallel test is spawning (forked before the drop, not yet
    // exec'ed).
    let top2 = dir.join("top2.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top2),
        ],
    );
    let without = open_with(&top2, Format::Qcow2, |o| {
        o.backing = block::BackingOption::Null
    })
    .unwrap();
    without.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    drop(without);
    // A file node the format fails to open over is put back.
    let bad = dir.join("bad.qcow2");
    std::fs::write(&bad, b"QFI\xfbgarbage").unwrap();
    block::add_backend({
        let mut opts = OpenOptions::new(&bad);
        opts.format = Some(Format::Raw);
        opts.protocol_only = true;
        BlockBackend::open("", "lib-bad-file", opts, |_| {}).unwrap()
    })
    .unwrap();
    let failed = open_with(&bad, Format::Qcow2, |o| {
        o.file_ref = Some("lib-bad-file".into())
    });
    assert!(failed.is_err());
    assert!(block::find_backend("lib-bad-file").is_some(), "given back");
}

#[test]
fn query_blockstats_and_info_blockstats() {
    let dir = scratch();
    let img = dir.join("s.raw");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let f = img.display().to_string();
    let img1 = dir.join("s1.raw");
    std::fs::write(&img1, vec![0u8; 65536]).unwrap();
    let replies = qmp_replies(
        &[
            "-drive",
            &format!("file={f},format=raw,if=none,id=d0,detect-zeroes=on"),
            "-blockdev",
            &format!("driver=file,node-name=f1,filename={}", img1.display()),
        ],
        &[
            serde_json::json!({"execute": "query-blockstats"}),
            serde_json::json!({"execute": "query-blockstats", "arguments": {"query-nodes": true}}),
            serde_json::json!({"execute": "human-monitor-command", "arguments": {"command-line": "info blockstats"}}),
            serde_json::json!({"execute": "query-block"}),
        ],
    );
    // Only the -drive has a BlockBackend (a -blockdev node gets one when a device uses it).
    let list = replies[0]["return"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let d0 = &list[0];
    let keys: Vec<&str> = d0.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["device", "node-name", "stats", "parent"]);
    assert_eq!(d0["device"], "d0");
    let stats = d0["stats"].as_object().unwrap();
    let stat_keys: Vec<&str> = stats.keys().map(String::as_str).collect();
    assert_eq!(
        stat_keys,
        [
            "rd_bytes",
            "wr_bytes",
            "unmap_bytes",
            "rd_operations",
            "wr_operations",
            "flush_operations",
            "unmap_operations",
            "rd_total_time_ns",
            "wr_total_time_ns",
            "flush_total_time_ns",
            "unmap_total_time_ns",
            "wr_highest_offset",
            "rd_merged",
            "wr_merged",
            "unmap_merged",
            "failed_rd_operations",
            "failed_wr_operations",
            "failed_flush_operations",
            "failed_unmap_operations",
            "invalid_rd_operations",
            "invalid_wr_operations",
            "invalid_flush_operations",
            "invalid_unmap_operations",
            "account_invalid",
            "account_failed",
            "timed_stats"
        ]
    );
    assert_eq!(stats["account_invalid"], true);
    assert_eq!(d0["parent"]["stats"]["account_invalid"], false);
    assert_eq!(
        d0["parent"]["driver-specific"],
        serde_json::json!({"driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0, "discard-bytes-ok": 0})
    );
    let file_node = d0["parent"]["node-name"].as_str().unwrap();
    let nodes: Vec<&str> = replies[1]["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert!(
        nodes.contains(&"f1") && nodes.contains(&file_node),
        "{nodes:?}"
    );
    assert_eq!(
        replies[2]["return"],
        "d0: rd_bytes=0 wr_bytes=0 rd_operations=0 wr_operations=0 flush_operations=0 wr_total_time_ns=0 rd_total_time_ns=0 flush_total_time_ns=0 rd_merged=0 wr_merged=0 idle_time_ns=0\r\n"
    );
    assert_eq!(replies[3]["return"][0]["inserted"]["detect_zeroes"], "on");
}

/// QEMU itself and qomvm exclude each other: whichever opens the image read-write first
/// keeps the other out with the same words.
#[test]
fn qemu_and_qomvm_exclude_each_other() {
    if !have_qemu_tools() {
        return;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        test_support::skip::skip("qemu-system-x86_64 (package qemu-system-x86) is not installed");
        return;
    }
    let dir = scratch();
    let path = image(&dir, "qemu-held.qcow2", "qcow2");
    let drive = format!("file={},format=qcow2,if=none,id=d0", path.display());
    // QEMU first: it holds the image while it waits on its QMP socket.
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-accel",
            "tcg",
            "-S",
            "-display",
            "none",
            "-nodefaults",
        ])
        .args(["-drive", &drive, "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut greeting = String::new();
    BufReader::new(qemu.stdout.as_mut().unwrap())
        .read_line(&mut greeting)
        .unwrap();
    assert!(greeting.contains("QMP"), "QEMU did not start: {greeting:?}");
    let out = qomvm(&["-drive", &drive]);
    let _ = qemu.kill();
    let _ = qemu.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!("qomvm: -drive {drive}: {}\n", lock_error(&path))
    );
    // qomvm first: QEMU is refused.
    let _holder = Holder::start(&drive);
    let out = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-accel",
            "tcg",
            "-S",
            "-display",
            "none",
            "-nodefaults",
        ])
        .args(["-drive", &drive])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&lock_error(&path)), "QEMU said: {stderr}");
}

/// imago allocates an L2 table by writing the L1 entry before the table's refcount, so a
/// crash at that moment corrupts the image; qomvm therefore gives a writable qcow2 all its
/// L2 tables at open, with the metadata written back (block/src/qcow2_l2.rs). The guest's
/// view does not change: no data cluster is allocated, backing data shows through, and
/// `qemu-img check` finds the image clean.
#[test]
fn a_writable_qcow2_gets_its_l2_tables_at_open() {
    if !have_qemu_tools() {
        return;
    }
    let dir = scratch();
    let base = image(&dir, "l2-base.qcow2", "qcow2");
    let top = dir.join("l2-top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
            "1536M",
        ],
    );
    let b = open(&top, Format::Qcow2, false).unwrap();
    let mut buf = vec![0u8; 4096];
    b.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0xab), "backing data shows through");
    drop(b);
    run("qemu-img", &["check", p(&top)]);
    let map = run("qemu-img", &["map", "--output=json", p(&top)]);
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(
        !map.contains("\"depth\": 0, \"present\": true"),
        "no data allocated in the top: {map}"
    );
    let info = run("qemu-img", &["check", "--output=json", p(&top)]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("\"check-errors\": 0") && !info.contains("leaks"),
        "{info}"
    );
    // The three L2 tables (512 MiB each with 64 KiB clusters) are in place: opening again
    // adds nothing.
    let size = std::fs::metadata(&top).unwrap().len();
    drop(open(&top, Format::Qcow2, false).unwrap());
    assert_eq!(std::fs::metadata(&top).unwrap().len(), size);
}
