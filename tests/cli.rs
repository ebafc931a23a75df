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
        (&["-m"], "qomvm: -m: requires an argument\n"),
        (&["-M", "nosuch"], "qomvm: -machine nosuch: unsupported machine type 'nosuch'\nUse -machine help to list supported machines\n"),
        (&["-M", "none,foo=1", "-accel", "qtest"], "qomvm: -machine none,foo=1: Property 'none-machine.foo' not found\n"),
        (&["-M", "none", "-accel", "nosuch"], "qomvm: -accel nosuch: invalid accelerator nosuch\n"),
        (&["-M", "none", "-accel", "qtest", "-device", "isa-debug-exit"], "qomvm: -device isa-debug-exit: No 'ISA' bus found for device 'isa-debug-exit'\n"),
        (&["-M", "none", "-accel", "qtest", "-smp", "2"], "qomvm: Invalid SMP CPUs 2. The max CPUs supported by machine 'none' is 1\n"),
        (&["-M", "none", "-accel", "qtest", "-m", "lots"], "qomvm: -m lots: invalid RAM size 'lots'\n"),
        (&["-M", "none", "-accel", "qtest", "-smp", "4,sockets=3,cores=2,maxcpus=4"], "qomvm: -smp 4,sockets=3,cores=2,maxcpus=4: Invalid CPU topology: product of the hierarchy must match maxcpus: sockets (3) * cores (2) * threads (1) != maxcpus (4)\n"),
        (&["-M", "none", "-accel", "qtest", "-cpu", "nosuch"], "qomvm: -cpu nosuch: unable to find CPU model 'nosuch'\n"),
        (&["-M", "none", "-accel", "qtest", "-global", "isa-debug-exit.iobase=x"], "qomvm: -global isa-debug-exit.iobase=x: Parameter 'iobase' expects a non-negative integer below 65536\n"),
        (&["-M", "none,accel=qtest", "-accel", "qtest"], "qomvm: The -accel and \"-machine accel=\" options are incompatible\n"),
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
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(model)),
            "{out}"
        );
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
