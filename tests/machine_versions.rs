//! QEMU's versioned i440FX machine types: `pc-i440fx-2.0` to `pc-i440fx-10.0` (`pc`) and
//! Ubuntu's names for them (`pc-i440fx-trusty`, as the seed's OpenStack line has it). Each
//! version carries QEMU's compat properties, which its devices take ahead of `-global`;
//! `-machine help` and `query-machines` list them as QEMU does, old ones deprecated.

use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};
use test_support::fuzz_qtest::Qtest;
use test_support::qmp::QmpClient;
use test_support::smbios::{find_anchor, structures};

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");

fn qomvm(args: &[&str]) -> Output {
    Command::new(QOMVM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn machine_help_lists_every_version_newest_first_as_qemu_does() {
    let out = qomvm(&["-machine", "help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "Supported machines are:");
    // QEMU's order within the family is by name from the last: Ubuntu's names (letters)
    // before the numbered versions, `pc` right before the version it stands for.
    assert_eq!(
        lines[1],
        "pc-i440fx-zesty      Ubuntu 17.04 PC (i440FX + PIIX, 1996)"
    );
    let alias = lines
        .iter()
        .position(|l| l.starts_with("pc   "))
        .unwrap_or_else(|| panic!("no pc alias line:\n{text}"));
    assert_eq!(
        lines[alias],
        "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)"
    );
    assert_eq!(
        lines[alias + 1],
        "pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)"
    );
    for line in [
        "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996)",
        "pc-i440fx-7.0        Standard PC (i440FX + PIIX, 1996) (deprecated)",
        "pc-i440fx-2.0        Standard PC (i440FX + PIIX, 1996) (deprecated)",
        "pc-i440fx-trusty     Ubuntu 14.04 PC (i440FX + PIIX, 1996)",
        "pc-i440fx-noble      Ubuntu 24.04 PC (i440FX + PIIX, 1996)",
    ] {
        assert!(lines.contains(&line), "no {line:?} in:\n{text}");
    }
    let at = |name: &str| {
        lines
            .iter()
            .position(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert!(at("pc-i440fx-9.2") < at("pc-i440fx-9.1"));
    assert!(at("pc-i440fx-2.12") < at("pc-i440fx-2.1"));
    assert!(at("pc-i440fx-trusty") < at("pc-i440fx-9.2"));
    assert_eq!(lines.last(), Some(&"none                 empty machine"));
    assert_eq!(lines.iter().filter(|l| l.ends_with("(default)")).count(), 1);
}

/// `query-machines`, as libvirt reads it to learn the machine types and their canonical
/// names.
#[test]
fn query_machines_lists_the_versions_with_qemus_flags() {
    let (_qt, mut qmp, _dir) = Qtest::start_with_qmp(QOMVM, "machines-query", &[]);
    let list = qmp.execute("query-machines", json!({}));
    let machines = list["return"].as_array().unwrap();
    let find = |name: &str| -> &Value {
        machines
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {list}"))
    };
    let latest = find("pc-i440fx-10.0");
    assert_eq!(latest["alias"], "pc");
    assert_eq!(latest["is-default"], true);
    assert_eq!(latest["deprecated"], false);
    assert_eq!(find("pc-i440fx-7.1")["deprecated"], false);
    assert_eq!(find("pc-i440fx-7.0")["deprecated"], true);
    let trusty = find("pc-i440fx-trusty");
    assert_eq!(trusty["deprecated"], false);
    assert_eq!(trusty["default-cpu-type"], "qemu64-x86_64-cpu");
    assert!(trusty.get("alias").is_none() && trusty.get("is-default").is_none());
    assert_eq!(
        machines.iter().filter(|m| m["is-default"] == true).count(),
        1
    );
    // 34 upstream versions, 21 of Ubuntu's, and `none`.
    assert_eq!(machines.len(), 56, "{list}");
}

fn qom_get(qmp: &mut QmpClient, path: &str, property: &str) -> Value {
    let reply = qmp.execute("qom-get", json!({"path": path, "property": property}));
    reply
        .get("return")
        .cloned()
        .unwrap_or_else(|| panic!("qom-get {path} {property}: {reply}"))
}

/// The devices of one machine: virtio-rng (a virtio-pci), e1000 and the first CPU.
fn devices(name: &str, machine: &str, extra: &[&str]) -> (Qtest, QmpClient) {
    let mut args = vec![
        "-M",
        machine,
        "-netdev",
        "user,id=n0",
        "-device",
        "e1000,netdev=n0,id=nic,addr=04.0",
        "-device",
        "virtio-rng-pci,id=rng,addr=05.0",
    ];
    args.extend(extra);
    let (qt, qmp, _dir) = Qtest::start_with_qmp(QOMVM, name, &args);
    (qt, qmp)
}

fn cpu0_path(qmp: &mut QmpClient) -> String {
    let cpus = qmp.execute("query-cpus-fast", json!({}));
    cpus["return"][0]["qom-path"]
        .as_str()
        .unwrap_or_else(|| panic!("{cpus}"))
        .to_string()
}

/// The PCI capability ids of function `devfn`, in list order.
fn capabilities(qt: &mut Qtest, devfn: u32) -> Vec<u8> {
    let mut ids = Vec::new();
    let mut at = qt.pci_read32(devfn, 0x34) & 0xfc;
    while at != 0 && ids.len() < 48 {
        let header = qt.pci_read32(devfn, at);
        ids.push(header as u8);
        at = (header >> 8) & 0xfc;
    }
    ids
}

/// Version 2.6 takes every array from 10.0 down to its own: legacy-only virtio (no
/// virtio 1.x vendor capabilities), virtio-rng without MSI-X vectors (7.1), e1000 without
/// the initial VET (6.0), qemu64 as family 6 model 6 stepping 3 (6.0), no L3 cache
/// (2.7); version 10.0 has none of them.
#[test]
fn an_older_version_gives_its_devices_qemus_compat_properties() {
    let (mut qt, mut qmp) = devices("machines-2-6", "pc-i440fx-2.6", &[]);
    let rng = "/machine/peripheral/rng";
    assert_eq!(qom_get(&mut qmp, rng, "disable-modern"), true);
    assert_eq!(qom_get(&mut qmp, rng, "disable-legacy"), "off");
    assert_eq!(qom_get(&mut qmp, rng, "vectors"), 0);
    assert_eq!(
        qom_get(&mut qmp, "/machine/peripheral/nic", "init-vet"),
        false
    );
    let cpu = cpu0_path(&mut qmp);
    assert_eq!(qom_get(&mut qmp, &cpu, "family"), 6);
    assert_eq!(qom_get(&mut qmp, &cpu, "model"), 6);
    assert_eq!(qom_get(&mut qmp, &cpu, "stepping"), 3);
    assert_eq!(qom_get(&mut qmp, &cpu, "l3-cache"), false);
    // What the guest sees: the transitional device id, no vendor-specific capability.
    assert_eq!(qt.pci_read32(5 << 3, 0), 0x1005_1af4);
    assert!(!capabilities(&mut qt, 5 << 3).contains(&0x09));
    drop(qt);

    let (mut qt, mut qmp) = devices("machines-10-0", "pc-i440fx-10.0", &[]);
    assert_eq!(qom_get(&mut qmp, rng, "disable-modern"), false);
    assert_ne!(qom_get(&mut qmp, rng, "vectors"), 0);
    assert_eq!(
        qom_get(&mut qmp, "/machine/peripheral/nic", "init-vet"),
        true
    );
    let cpu = cpu0_path(&mut qmp);
    assert_eq!(qom_get(&mut qmp, &cpu, "family"), 15);
    assert_eq!(qom_get(&mut qmp, &cpu, "l3-cache"), true);
    assert!(capabilities(&mut qt, 5 << 3).contains(&0x09));
}

/// `-global` comes after the machine's compat properties, as in QEMU.
#[test]
fn global_options_override_the_compat_properties() {
    let (_qt, mut qmp) = devices(
        "machines-global",
        "pc-i440fx-2.6",
        &[
            "-global",
            "virtio-pci.disable-modern=off",
            "-global",
            "e1000.init-vet=on",
        ],
    );
    assert_eq!(
        qom_get(&mut qmp, "/machine/peripheral/rng", "disable-modern"),
        false
    );
    assert_eq!(
        qom_get(&mut qmp, "/machine/peripheral/nic", "init-vet"),
        true
    );
}

/// Ubuntu's trusty is QEMU 2.0: qemu64 calls itself "QEMU Virtual CPU version 2.0.0", the
/// default display is the Cirrus VGA (QEMU 2.1 and older), and SMBIOS names the machine
/// type and its description.
#[test]
fn trusty_is_qemu_2_0_under_ubuntus_name() {
    if !std::path::Path::new("/usr/share/seabios/vgabios-cirrus.bin").is_file() {
        test_support::skip::skip("the Cirrus VGA's BIOS is missing (Debian package 'seabios')");
        return;
    }
    let (mut qt, mut qmp) = devices("machines-trusty", "pc-i440fx-trusty", &[]);
    assert_eq!(
        qom_get(&mut qmp, "/machine", "type"),
        "pc-i440fx-trusty-machine"
    );
    let cpu = cpu0_path(&mut qmp);
    assert_eq!(
        qom_get(&mut qmp, &cpu, "model-id"),
        "QEMU Virtual CPU version 2.0.0"
    );
    assert_eq!(
        qt.pci_read32(2 << 3, 0),
        0x00b8_1013,
        "cirrus-vga at 00:02.0"
    );
    let segment = qt.read_bytes(0xf0000, 0x100);
    let (_, addr, len, _) = find_anchor(&segment).expect("a valid _SM_ anchor");
    let tables = structures(&qt.read_bytes(u64::from(addr), usize::from(len)));
    let t1 = tables
        .iter()
        .find(|s| s.ty == 1)
        .expect("a type 1 structure");
    assert_eq!(
        t1.string_at(5),
        Some("Ubuntu 14.04 PC (i440FX + PIIX, 1996)")
    );
    assert_eq!(t1.string_at(6), Some("pc-i440fx-trusty"));
}

/// The seed's machine option as OpenStack on Ubuntu wrote it, on KVM: accepted as it is.
/// A deprecated version starts with QEMU's warning (not under qtest).
#[test]
fn the_seeds_machine_option_starts_and_old_versions_warn() {
    if let Some(reason) = test_support::vm::kvm_unusable() {
        test_support::skip::skip_kvm(reason);
        return;
    }
    let out = qmp_session(
        &[
            "-enable-kvm",
            "-name",
            "instance-00000024",
            "-machine",
            "pc-i440fx-trusty,accel=kvm,usb=off",
            "-m",
            "2048",
            "-smp",
            "1,sockets=1,cores=1,threads=1",
            "-rtc",
            "base=utc,driftfix=slew",
            "-nodefaults",
            "-display",
            "none",
        ],
        &[json!({"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"}})],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"{"return": "pc-i440fx-trusty-machine"}"#),
        "{stdout}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");

    // QEMU's warning, on KVM; qtest gets none (QEMU's `qtest_enabled()` check).
    let warning = "qomvm: warning: Machine type 'pc-i440fx-7.0' is deprecated: machines more than 3 years old are subject to deletion after 6 years";
    for (accel, warns) in [("kvm", true), ("qtest", false)] {
        let out = qmp_session(
            &[
                "-M",
                "pc-i440fx-7.0",
                "-accel",
                accel,
                "-nodefaults",
                "-display",
                "none",
            ],
            &[],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(
            stderr.lines().any(|l| l == warning),
            warns,
            "{accel}: {stderr}"
        );
    }
}

/// Runs qomvm stopped (`-S`) with `args` and QMP on stdio: `commands` after the
/// handshake, then `quit`.
fn qmp_session(args: &[&str], commands: &[Value]) -> Output {
    use std::io::Write;
    let mut child = Command::new(QOMVM)
        .args(args)
        .args(["-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let handshake = json!({"execute": "qmp_capabilities"});
    let quit = json!({"execute": "quit"});
    for command in std::iter::once(&handshake).chain(commands).chain([&quit]) {
        writeln!(stdin, "{command}").unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Every compat property of every machine type names a type qomvm has, a property it has,
/// and a value that property takes: a table entry that did not would fail at start-up for
/// every user of that version.
#[test]
fn every_compat_property_applies_to_a_real_property() {
    hw::init().unwrap();
    let machines = qom::object_class_get_list(Some(hw::core::machine::TYPE_MACHINE), false);
    let mut checked = 0;
    for class in machines {
        let mc = hw::core::machine::machine_class(class).unwrap();
        for (driver, property, value) in &mc.compat_props {
            hw::core::qdev_properties::check_global(driver, property, value)
                .unwrap_or_else(|e| panic!("{}: {driver}.{property}={value}: {e}", mc.name));
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked}");
}

/// The e1000 family's three cards are siblings, as in QEMU: 6.0's `e1000.init-vet=off`
/// reaches `e1000` and not `e1000-82545em`.
#[test]
fn a_compat_property_of_e1000_leaves_its_siblings_alone() {
    let (_qt, mut qmp, _dir) = Qtest::start_with_qmp(
        QOMVM,
        "machines-e1000-siblings",
        &[
            "-M",
            "pc-i440fx-5.2",
            "-nic",
            "none",
            "-netdev",
            "user,id=n0",
            "-netdev",
            "user,id=n1",
            "-device",
            "e1000,netdev=n0,id=nic",
            "-device",
            "e1000-82545em,netdev=n1,id=em",
        ],
    );
    assert_eq!(
        qom_get(&mut qmp, "/machine/peripheral/nic", "init-vet"),
        false
    );
    assert_eq!(
        qom_get(&mut qmp, "/machine/peripheral/em", "init-vet"),
        true
    );
}
