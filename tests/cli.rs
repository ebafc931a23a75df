//! The `qomvm` binary's listings and errors, as a user sees them.

use std::process::{Command, Output};

fn qomvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("qomvm runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn machine_help_lists_registered_machines() {
    let o = qomvm(&["-machine", "help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.starts_with("Supported machines are:\n"));
    assert!(
        out.contains("\nnone                 empty machine\n"),
        "{out}"
    );
    let o = qomvm(&["-M", "?"]);
    assert_eq!(stdout(&o), out);
}

#[test]
fn device_help_lists_user_creatable_devices_by_category() {
    let o = qomvm(&["-device", "help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("Misc devices:\nname \"isa-debug-exit\", bus ISA\n"),
        "{out}"
    );
    assert!(
        !out.contains("\"cpu\""),
        "abstract and internal types are not listed: {out}"
    );
}

#[test]
fn device_property_help_shows_types_and_defaults() {
    let o = qomvm(&["-device", "isa-debug-exit,help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.starts_with("isa-debug-exit options:\n"), "{out}");
    assert!(
        out.contains("  iobase=<uint16>        - First I/O port (default: 1281)\n"),
        "{out}"
    );
    assert!(
        out.contains("  iosize=<uint16>        - Number of I/O ports (default: 2)\n"),
        "{out}"
    );
}

#[test]
fn accel_help_lists_accelerators() {
    let o = qomvm(&["-accel", "help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.starts_with("Accelerators supported in qomvm binary:\n"));
    assert!(out.lines().any(|l| l == "qtest"), "{out}");
}

#[test]
fn unknown_device_is_a_one_line_error() {
    let o = qomvm(&["-device", "foo"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "qomvm: -device foo: 'foo' is not a valid device model name\n"
    );
    let o = qomvm(&["-device", "nosuch,help"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "qomvm: -device nosuch,help: 'nosuch' is not a valid device model name\n"
    );
}

#[test]
fn bad_options_are_one_line_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["-bogus"], "qomvm: -bogus: invalid option\n"),
        // QEMU's IDE shorthands and its default -drive interface (IDE on pc) open the
        // image as QEMU does; the floppy shorthands are refused with what to use.
        (&["-hda", "/nonexistent,a.img"], "qomvm: -hda /nonexistent,a.img: Could not open '/nonexistent,a.img': No such file or directory\n"),
        (&["-cdrom", "/nonexistent.iso"], "qomvm: -cdrom /nonexistent.iso: Could not open '/nonexistent.iso': No such file or directory\n"),
        (&["-fda", "f.img"], "qomvm: -fda f.img: Could not open 'f.img': No such file or directory\n"),
        (&["-debugcon", "foo:bar"], "qomvm: -debugcon foo:bar: invalid character backend 'foo:bar'\n"),
        (&["-debugcon", "null", "-debugcon", "null"], "qomvm: -debugcon null: invalid character backend 'null'\n"),
        (&["-pflash", "OVMF.fd"], "qomvm: -pflash OVMF.fd: flash drives are not supported (qomvm has no pflash device): load firmware with -bios\n"),
        (&["-sd", "card.img"], "qomvm: -sd card.img: machine type does not support if=sd,bus=0,unit=0\n"),
        (&["-drive", "file=/nonexistent.img"], "qomvm: -drive file=/nonexistent.img: Could not open '/nonexistent.img': No such file or directory\n"),
        // IDE has two units per bus and pc two buses: index=4 would be a third bus.
        (&["-drive", "file=/nonexistent.img,index=4"], "qomvm: -drive file=/nonexistent.img,index=4: machine type does not support if=ide,bus=2,unit=0\n"),
        // Only pc has IDE: on `none` an explicit if=ide has no bus.
        (&["-M", "none", "-drive", "file=/nonexistent.img,if=ide"], "qomvm: -drive file=/nonexistent.img,if=ide: machine type does not support if=ide,bus=0,unit=0\n"),
        (&["-drive", "file=x.img,if=none,index=x"], "qomvm: -drive file=x.img,if=none,index=x: Parameter 'index' expects a number\n"),
        (&["-m"], "qomvm: -m: requires an argument\n"),
        (&["-M", "nosuch"], "qomvm: -machine nosuch: unsupported machine type 'nosuch'\nUse -machine help to list supported machines\n"),
        (&["-M", "none,foo=1", "-accel", "qtest"], "qomvm: -machine none,foo=1: Property 'none-machine.foo' not found\n"),
        (&["-M", "none", "-accel", "nosuch"], "qomvm: -accel nosuch: invalid accelerator nosuch\n"),
        (&["-M", "none", "-accel", "qtest", "-device", "isa-debug-exit"], "qomvm: -device isa-debug-exit: No 'ISA' bus found for device 'isa-debug-exit'\n"),
        (&["-accel", "qtest", "-chardev", "null,id=c", "-serial", "chardev:c", "-device", "isa-serial,chardev=c"], "qomvm: -device isa-serial,chardev=c: Property 'serial.chardev' can't take value 'c': Device 'c' is in use\n"),
        (&["-accel", "qtest", "-device", "virtio-rng-pci,id=a/b"], "qomvm: -device virtio-rng-pci,id=a/b: Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n"),
        (&["-M", "none", "-accel", "qtest", "-smp", "2"], "qomvm: Invalid SMP CPUs 2. The max CPUs supported by machine 'none' is 1\n"),
        (&["-M", "none", "-accel", "qtest", "-m", "lots"], "qomvm: -m lots: invalid RAM size 'lots'\n"),
        (&["-M", "none", "-accel", "qtest", "-smp", "4,sockets=3,cores=2,maxcpus=4"], "qomvm: -smp 4,sockets=3,cores=2,maxcpus=4: Invalid CPU topology: product of the hierarchy must match maxcpus: sockets (3) * cores (2) * threads (0) != maxcpus (4)\n"),
        // QEMU has host-cache-info on host and max only.
        (&["-M", "pc", "-accel", "qtest", "-cpu", "qemu64,host-cache-info=on"], "qomvm: -cpu qemu64,host-cache-info=on: Property 'qemu64-x86_64-cpu.host-cache-info' not found\n"),
        // pc's hierarchy names dies (QEMU's dies_supported).
        (&["-M", "pc", "-accel", "qtest", "-smp", "2,sockets=4"], "qomvm: -smp 2,sockets=4: Invalid CPU topology: product of the hierarchy must match maxcpus: sockets (4) * dies (1) * cores (0) * threads (1) != maxcpus (2)\n"),
        (&["-M", "pc", "-accel", "qtest", "-smp", "4,dies=2"], "qomvm: -smp 4,dies=2: dies=2: qomvm supports one die per socket\n"),
        (&["-M", "none", "-accel", "qtest", "-cpu", "nosuch"], "qomvm: -cpu nosuch: unable to find CPU model 'nosuch'\n"),
        (&["-M", "none", "-accel", "qtest", "-global", "isa-debug-exit.iobase=x"], "qomvm: -global isa-debug-exit.iobase=x: Parameter 'iobase' expects a non-negative integer below 65536\n"),
        (&["-M", "none,accel=qtest", "-accel", "qtest"], "qomvm: The -accel and \"-machine accel=\" options are incompatible\n"),
        (&["-M", "none", "-accel", "qtest", "-action", "panic=foo"], "qomvm: -action panic=foo: Parameter 'panic' does not accept value 'foo'\n"),
        (&["-M", "none", "-accel", "qtest", "-action", "foo=bar"], "qomvm: -action foo=bar: Invalid parameter 'foo'\n"),
        (&["-M", "none", "-accel", "qtest", "-action", "reboot=shutdown,shutdown=halt"], "qomvm: -action reboot=shutdown,shutdown=halt: Parameter 'shutdown' does not accept value 'halt'\n"),
        (&["-M", "none", "-accel", "qtest", "-uuid", "1234"], "qomvm: -uuid 1234: Fail to parse UUID string. Wrong format.\n"),
        (&["-M", "none", "-accel", "qtest", "-rtc", "base=yesterday"], "qomvm: -rtc base=yesterday: invalid datetime format; valid formats: '2006-06-17T16:01:21' or '2006-06-17'\n"),
        (&["-M", "none", "-accel", "qtest", "-rtc", "base=2006-06"], "qomvm: -rtc base=2006-06: invalid datetime format; valid formats: '2006-06-17T16:01:21' or '2006-06-17'\n"),
        (&["-M", "none", "-accel", "qtest", "-rtc", "clock=guest"], "qomvm: -rtc clock=guest: invalid option value 'guest'\n"),
        // The merged options' last values count, and the base is checked first.
        (&["-M", "none", "-accel", "qtest", "-rtc", "clock=vm", "-rtc", "clock=x,base=utc", "-rtc", "base=bad"], "qomvm: -rtc base=bad: invalid datetime format; valid formats: '2006-06-17T16:01:21' or '2006-06-17'\n"),
        (&["-M", "none", "-accel", "qtest", "-rtc", "clock=x", "-rtc", "base=localtime"], "qomvm: -rtc clock=x: invalid option value 'x'\n"),
        (&["-M", "none", "-accel", "qtest", "-rtc", "base=utc,tz=1"], "qomvm: -rtc base=utc,tz=1: Invalid parameter 'tz'\n"),
        (&["-M", "none", "-accel", "qtest", "-rtc", "driftfix=foo"], "qomvm: -rtc driftfix=foo: invalid option value 'foo'\n"),
        // QEMU's RTC drops or slews; KVM's PIT drops or delays.
        (&["-M", "pc", "-accel", "qtest", "-global", "mc146818rtc.lost_tick_policy=delay"], "qomvm: Invalid lost tick policy.\n"),
        (&["-M", "none", "-accel", "qtest", "-overcommit", "cpu-pm=on"], "qomvm: -overcommit cpu-pm=on: cpu-pm=on is not supported by qomvm\n"),
        (&["-M", "none", "-accel", "qtest", "-boot", "order=cc"], "qomvm: Boot device 'c' was given twice\n"),
        (&["-M", "none", "-accel", "qtest", "-audiodev", "pa,id=a"], "qomvm: -audiodev pa,id=a: Unknown audio driver `pa'\n"),
        (&["-M", "none", "-accel", "qtest", "-audiodev", "foo,id=a"], "qomvm: -audiodev foo,id=a: Parameter 'driver' does not accept value 'foo'\n"),
        (&["-M", "none", "-accel", "qtest", "-vnc", "none,audiodev=a"], "qomvm: -vnc none,audiodev=a: Audiodev 'a' not found\n"),
        (&["-M", "none", "-accel", "qtest", "-audiodev", "none"], "qomvm: -audiodev none: Parameter 'id' is missing\n"),
        (&["-M", "none", "-accel", "qtest", "-add-fd", "fd=1,set=2"], "qomvm: -add-fd fd=1,set=2: fd is not valid or already in use\n"),
        (&["-M", "none", "-accel", "qtest", "-name", "g,bogus=1"], "qomvm: -name g,bogus=1: Invalid parameter 'bogus'\n"),
        (&["-M", "none", "-accel", "qtest", "-mon", "chardev=nosuch,mode=control"], "qomvm: -mon chardev=nosuch,mode=control: chardev \"nosuch\" not found\n"),
        (&["-M", "none", "-accel", "qtest", "-chardev", "socket,id=s,path=/nonexistent/x"], "qomvm: -chardev socket,id=s,path=/nonexistent/x: Failed to connect to '/nonexistent/x': No such file or directory\n"),
        (&["-M", "none", "-accel", "qtest", "-chardev", "socket,id=s,path=/nonexistent/x,server=on,wait=off"], "qomvm: -chardev socket,id=s,path=/nonexistent/x,server=on,wait=off: Failed to bind socket to /nonexistent/x: No such file or directory\n"),
        (&["-M", "none", "-accel", "qtest", "-serial", "tcp:127.0.0.1:1"], "qomvm: -serial tcp:127.0.0.1:1: Failed to connect to '127.0.0.1:1': Connection refused\n"),
        (&["-M", "none", "-accel", "qtest", "-chardev", "socket,id=m,fd=0,server=on", "-mon", "chardev=m"], "qomvm: -chardev socket,id=m,fd=0,server=on: Could not use file descriptor '0': not an open descriptor\n"),
        (&["-daemonize", "-nographic", "-M", "none", "-accel", "qtest"], "qomvm: -nographic cannot be used with -daemonize\n"),
    ];
    for (args, expected) in cases {
        let o = qomvm(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), *expected, "{args:?}");
    }
}

#[test]
fn version_and_usage() {
    let o = qomvm(&["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("qomvm version "));
    let o = qomvm(&["-h"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("usage: qomvm [options]"));
}

#[test]
fn cpu_help_lists_models_and_accel_help_lists_kvm() {
    let out = stdout(&qomvm(&["-cpu", "help"]));
    for model in ["qemu64", "max", "host"] {
        let prefix = format!("x86 {model} ");
        assert!(out.lines().any(|l| l.starts_with(&prefix)), "{out}");
    }
    assert!(out.contains("\nRecognized CPUID flags:\n"), "{out}");
    assert!(out.contains(" x2apic "), "{out}");
    let out = stdout(&qomvm(&["-accel", "help"]));
    assert!(out.lines().any(|l| l == "kvm"), "{out}");
    let o = qomvm(&["-M", "none", "-cpu", "qemu64,+warp", "-accel", "qtest"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "qomvm: -cpu qemu64,+warp: Property 'qemu64-x86_64-cpu.warp' not found\n"
    );
}

#[test]
fn a_guest_fault_ends_the_vm_with_a_register_dump() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        test_support::skip::skip_kvm(format!("/dev/kvm not usable: {e}"));
        return;
    }
    // No firmware: the reset vector fetches code from unassigned MMIO, which KVM cannot
    // emulate.
    let o = qomvm(&["-M", "none", "-m", "2M", "-cpu", "qemu64", "-accel", "kvm"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("qomvm: KVM internal error. Suberror: 1\n"),
        "{err}"
    );
    assert!(
        err.contains("CS =f000 ffff0000 0000ffff 00009b00\n"),
        "{err}"
    );
}

#[test]
fn kvm_without_dev_kvm_fails_in_qemus_words() {
    // A private mount namespace with an empty /dev: /dev/kvm is missing there only.
    let probe = Command::new("unshare").args(["-m", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        test_support::skip::skip(
            "cannot create a mount namespace (needs root and util-linux unshare)",
        );
        return;
    }
    let script = format!(
        "mount -t tmpfs none /dev && exec {} -M none -accel kvm",
        env!("CARGO_BIN_EXE_qomvm")
    );
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "qomvm: -accel kvm: Could not access KVM kernel module: No such file or directory\n"
    );
    let script = format!(
        "mount -t tmpfs none /dev && exec {} -M none,accel=kvm:qtest",
        env!("CARGO_BIN_EXE_qomvm")
    );
    let mut child = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env("RUST_LOG", "off")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // kvm fails, qtest initialises and the VM runs until killed.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "qtest did not take over"
    );
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        stderr(&out),
        "qomvm: -machine none,accel=kvm:qtest: Could not access KVM kernel module: No such file or directory\n"
    );
}

#[test]
fn object_help_lists_user_creatable_types_and_their_properties() {
    let o = qomvm(&["-object", "help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.starts_with("List of user creatable objects:\n"),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "  iothread"), "{out}");
    assert!(!out.contains("container"), "{out}");
    let o = qomvm(&["-object", "iothread,help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.starts_with("iothread options:\n"), "{out}");
    for prop in ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"] {
        assert!(out.contains(&format!("  {prop}=<int64>")), "{out}");
    }
    assert!(out.contains("(default: 32768)"), "{out}");
    assert!(stdout(&qomvm(&["-help"])).contains("-object TYPE,id=ID"));
}

#[test]
fn object_errors_are_qemus() {
    let cases: &[(&str, &str)] = &[
        ("foo,id=x", "Parameter 'qom-type' does not accept value 'foo'"),
        (
            r#"{"qom-type":"foo","id":"x"}"#,
            "Parameter 'qom-type' does not accept value 'foo'",
        ),
        ("container,id=x", "Parameter 'qom-type' does not accept value 'container'"),
        ("iothread", "Parameter 'id' is missing"),
        (
            "iothread,id=1x",
            "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
        ),
        ("iothread,id=io0,bogus=1", "Invalid parameter 'bogus'"),
        (
            r#"{"qom-type":"iothread","id":"io0","bogus":1}"#,
            "Parameter 'bogus' is unexpected",
        ),
        (
            "iothread,id=io0,poll-max-ns=abc",
            "Parameter 'poll-max-ns' expects an int64 value",
        ),
        (
            "iothread,id=io0,poll-max-ns=-1",
            "poll-max-ns value must be in range [0, 9223372036854775807]",
        ),
    ];
    for (arg, message) in cases {
        let o = qomvm(&["-M", "none", "-accel", "qtest", "-object", arg]);
        assert_eq!(o.status.code(), Some(1), "{arg}");
        assert_eq!(stderr(&o), format!("qomvm: -object {arg}: {message}\n"));
    }
    let o = qomvm(&[
        "-M",
        "none",
        "-accel",
        "qtest",
        "-object",
        "iothread,id=io0",
        "-object",
        "iothread,id=io0",
    ]);
    assert_eq!(
        stderr(&o),
        "qomvm: -object iothread,id=io0: Duplicate ID 'io0' for object\n"
    );
}

#[test]
fn msg_timestamp_prefixes_messages_with_utc_time() {
    let o = qomvm(&["-msg", "timestamp=on", "-M", "nosuch"]);
    let err = stderr(&o);
    // 2026-12-01T20:51:40.310363Z qomvm: -machine nosuch: ...
    let (stamp, rest) = err.split_once(' ').unwrap();
    assert_eq!(stamp.len(), 27, "{err}");
    assert!(
        stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
        "{err}"
    );
    assert!(
        rest.starts_with("qomvm: -machine nosuch: unsupported machine type"),
        "{err}"
    );
}

/// The pid in `path`, once it is there.
fn read_pid(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn daemonize_returns_once_the_vm_is_up_and_the_pid_file_names_the_daemon() {
    let dir = std::env::temp_dir().join(format!("qomvm-cli-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("qomvm.pid");
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let o = qomvm(&[
        "-M",
        "none",
        "-accel",
        "qtest",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-daemonize",
        "-pidfile",
        pidfile.to_str().unwrap(),
        "-qmp",
        &qmp,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The parent returned after start-up: the pid file and the monitor are there already.
    let pid = read_pid(&pidfile).expect("the pid file holds a pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(sock.exists(), "the monitor listens before the parent exits");
    // A second instance with the same pid file fails in the parent, saying why.
    let o = qomvm(&[
        "-M",
        "none",
        "-accel",
        "qtest",
        "-nodefaults",
        "-display",
        "none",
        "-daemonize",
        "-pidfile",
        pidfile.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot create PID file: Cannot lock pid file"),
        "{}",
        stderr(&o)
    );
    // SIGTERM ends the daemon, which removes its pid file.
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pidfile.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A pid file left behind by a daemon that ended is a missed exit path; one left by a
    // daemon still running is a missed signal.
    assert!(
        !pidfile.exists(),
        "the daemon removed its pid file (still running: {})",
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn daemonize_reports_a_start_up_error_in_the_parent() {
    let o = qomvm(&[
        "-daemonize",
        "-M",
        "nosuch",
        "-accel",
        "qtest",
        "-nodefaults",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("qomvm: -machine nosuch: unsupported machine type"),
        "{}",
        stderr(&o)
    );
}

/// One QMP exchange on `stream`: sends `request`, returns the first reply line (events
/// are skipped).
fn qmp_call(
    stream: &mut std::io::BufReader<std::os::unix::net::UnixStream>,
    request: &str,
) -> serde_json::Value {
    use std::io::{BufRead, Write};
    stream.get_mut().write_all(request.as_bytes()).unwrap();
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("event").is_none() {
            return v;
        }
    }
}

#[test]
fn a_mon_on_a_socket_chardev_speaks_qmp_and_describes_its_schema() {
    use std::io::BufRead;
    let dir = std::env::temp_dir().join(format!("qomvm-cli-mon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("mon.sock");
    let chardev = format!(
        "socket,id=charmonitor,path={},server=on,wait=off",
        sock.display()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args([
            "-M",
            "none",
            "-accel",
            "qtest",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ])
        .args([
            "-chardev",
            &chardev,
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
        ])
        .args([
            "-uuid",
            "b90ff907-E156-421f-9c83-8e73ed8f0924",
            "-no-user-config",
        ])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => panic!("no monitor: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    let mut stream = std::io::BufReader::new(stream);
    let mut greeting = String::new();
    stream.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("{\"QMP\""), "{greeting}");
    qmp_call(&mut stream, "{\"execute\":\"qmp_capabilities\"}\n");
    let uuid = qmp_call(&mut stream, "{\"execute\":\"query-uuid\"}\n");
    assert_eq!(
        uuid["return"]["UUID"],
        "b90ff907-e156-421f-9c83-8e73ed8f0924"
    );
    let chardevs = qmp_call(&mut stream, "{\"execute\":\"query-chardev\"}\n");
    assert!(
        chardevs["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["label"] == "charmonitor"),
        "{chardevs}"
    );
    // The schema describes every command query-commands lists, with its arguments.
    let commands = qmp_call(&mut stream, "{\"execute\":\"query-commands\"}\n");
    let schema = qmp_call(&mut stream, "{\"execute\":\"query-qmp-schema\"}\n");
    let schema = schema["return"].as_array().unwrap().clone();
    let entry = |name: &str| schema.iter().find(|e| e["name"] == name).cloned();
    for c in commands["return"].as_array().unwrap() {
        let e = entry(c["name"].as_str().unwrap()).unwrap_or_else(|| panic!("{c} in the schema"));
        assert_eq!(e["meta-type"], "command");
        assert!(entry(e["arg-type"].as_str().unwrap()).is_some(), "{e}");
    }
    let qom_get = entry("qom-get").unwrap();
    let args = entry(qom_get["arg-type"].as_str().unwrap()).unwrap();
    assert_eq!(
        args["members"],
        serde_json::json!([{"name": "path", "type": "str"}, {"name": "property", "type": "str"}])
    );
    assert_eq!(entry("SHUTDOWN").unwrap()["meta-type"], "event");
    // Migration: 'events', which libvirt turns on, and 'multifd', off unless asked for.
    let set = qmp_call(
        &mut stream,
        "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[{\"capability\":\"events\",\"state\":true}]}}\n",
    );
    assert_eq!(set["return"], serde_json::json!({}));
    let caps = qmp_call(
        &mut stream,
        "{\"execute\":\"query-migrate-capabilities\"}\n",
    );
    assert_eq!(
        caps["return"],
        serde_json::json!([
            {"capability": "events", "state": true},
            {"capability": "multifd", "state": false},
        ])
    );
    let bad = qmp_call(
        &mut stream,
        "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[{\"capability\":\"xbzrle\",\"state\":true}]}}\n",
    );
    assert_eq!(
        bad["error"]["desc"],
        "Parameter 'capabilities[0].capability' does not accept value 'xbzrle'"
    );
    let missing = qmp_call(
        &mut stream,
        "{\"execute\":\"qom-list-properties\",\"arguments\":{\"typename\":\"nosuch\"}}\n",
    );
    assert_eq!(missing["error"]["class"], "DeviceNotFound");
    qmp_call(&mut stream, "{\"execute\":\"quit\"}\n");
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(dir);
}

/// QEMU's `drive_new`: a drive takes its interface's first free unit, names itself after it
/// (`none0`, `none1`) and may not take a unit another drive has.
#[test]
fn drives_take_free_units_and_refuse_taken_ones() {
    let dir = std::env::temp_dir().join(format!("qomvm-cli-drive-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let images: Vec<String> = ["a.raw", "b.raw"]
        .iter()
        .map(|name| {
            let path = dir.join(name);
            std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
            path.to_str().unwrap().to_string()
        })
        .collect();
    let first = format!("file={},format=raw,if=none,index=1", images[0]);
    let taken = format!("file={},format=raw,if=none,index=1", images[1]);
    let o = qomvm(&["-M", "none", "-drive", &first, "-drive", &taken]);
    assert_eq!(
        stderr(&o),
        format!("qomvm: -drive {taken}: drive with bus=0, unit=1 (index=1) exists\n")
    );
    // Unit 1 is taken, so the unnamed drive is unit 0, `none0`, and -device finds it.
    let unnamed = format!("file={},format=raw,if=none", images[1]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args([
            "-M", "pc", "-accel", "qtest", "-display", "none", "-monitor", "stdio",
        ])
        .args(["-drive", &first, "-drive", &unnamed])
        .args(["-device", "virtio-blk-pci,drive=none0,id=vd0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"info block none0\nquit\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("none0 (#block") && out.contains(&images[1]),
        "{out}"
    );
    // As in QEMU, the user of the backend is the proxy's inner virtio-blk-device.
    assert!(
        out.contains("    Attached to:      /machine/peripheral/vd0/virtio-backend\r\n"),
        "{out}"
    );
}

/// A `pc` on the qtest accelerator with `extra` options, its qtest protocol on the
/// child's stdin and stdout.
fn qtest_on_stdio(extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args([
            "-M", "pc", "-accel", "qtest", "-display", "none", "-qtest", "stdio",
        ])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `-debugcon file:PATH` (QEMU's debugcon_parse): an isa-debugcon at port 0xe9 whose bytes
/// go to the file; a guest's `outl` there prints its low byte, as under QEMU with KVM.
#[test]
fn debugcon_writes_the_guests_bytes_to_its_backend() {
    use std::io::{BufRead, BufReader, Write};
    let dir = std::env::temp_dir().join(format!("qomvm-cli-debugcon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("debug.log");
    let debugcon = format!("file:{}", log.display());
    let mut child = qtest_on_stdio(&["-debugcon", &debugcon]);
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"outb 0xe9 0x51\noutl 0xe9 0x4d4f5145\ninb 0xe9\n")
        .unwrap();
    let mut replies = BufReader::new(child.stdout.take().unwrap()).lines();
    let replies: Vec<String> = (0..3).map(|_| replies.next().unwrap().unwrap()).collect();
    child.kill().ok();
    child.wait().ok();
    let written = std::fs::read(&log).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(replies, ["OK", "OK", "OK 0x00e9"]);
    assert_eq!(written, b"QE");
}

/// `-rtc base=utc,driftfix=slew`, as the seed's OpenStack command line and libvirt's
/// `<timer name='rtc' tickpolicy='catchup'/>` write it: periodic ticks the guest did not
/// take come back one per read of register C, where QEMU's default drops them.
#[test]
fn rtc_driftfix_slew_gives_back_the_ticks_a_guest_missed() {
    use std::io::{BufRead, BufReader, Write};
    let mut taken = Vec::new();
    for rtc in ["base=utc", "base=utc,driftfix=slew"] {
        let mut child = qtest_on_stdio(&["-rtc", rtc]);
        let mut stdin = child.stdin.take().unwrap();
        let mut replies = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut qtest = |cmd: &str| {
            stdin.write_all(format!("{cmd}\n").as_bytes()).unwrap();
            replies.next().unwrap().unwrap()
        };
        // 1024 Hz (register A's reset rate) with PIE, then 50 ms without an ack.
        qtest("outb 0x70 0x0b");
        qtest("outb 0x71 0x42");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut count = 0;
        for _ in 0..30 {
            qtest("outb 0x70 0x0c");
            let reply = qtest("inb 0x71");
            let c = u8::from_str_radix(reply.trim_start_matches("OK 0x"), 16).unwrap();
            if c & 0x40 == 0 {
                break;
            }
            count += 1;
        }
        child.kill().ok();
        child.wait().ok();
        taken.push(count);
    }
    // Under discard a read may meet one new tick; under slew the 50 missed ones come back
    // (up to QEMU's 20 per tick, on top of the one that interrupted).
    assert!(taken[0] <= 2, "discard gave back {} ticks", taken[0]);
    assert!(taken[1] >= 15, "slew gave back only {} ticks", taken[1]);
}
