//! SMBIOS (issue 13): `-smbios` and `-uuid` reach the tables a guest reads, in the F
//! segment under direct boot and through fw_cfg for firmware; bad options get QEMU's errors.
//! These run on the qtest accelerator (no KVM); `tests/firmware_boot.rs` checks the tables
//! SeaBIOS installs from the same files.

use std::process::{Command, Stdio};

use serde_json::json;
use test_support::fuzz_qtest::Qtest;
use test_support::qmp::QmpClient;
use test_support::smbios::{find_anchor, structures, uuid_text, Structure};

const UUID: &str = "5f4b3c2a-1d0e-4f9a-8b7c-6d5e4f3a2b1c";

/// The options every test machine gets: two sockets of two cores, a UUID, fields of
/// types 1, 3 and 11, and 4 GiB so that RAM is split around the PCI hole.
fn smbios_args() -> Vec<String> {
    [
        "-m",
        "4G",
        "-smp",
        "4,sockets=2,cores=2",
        "-uuid",
        UUID,
        "-smbios",
        "type=1,serial=QOMVM,,SERIAL,family=Test",
        "-smbios",
        "type=3,asset=tag7",
        "-smbios",
        "type=11,value=first,value=qomvm.shell=1",
    ]
    .map(String::from)
    .to_vec()
}

/// What `smbios_args` asks for, checked in `tables`.
fn check_tables(tables: &[Structure]) {
    let of = |ty: u8| tables.iter().filter(move |s| s.ty == ty);
    let t1 = of(1).next().expect("a type 1 structure");
    assert_eq!(t1.string_at(4), Some("QEMU"));
    assert_eq!(t1.string_at(5), Some("Standard PC (i440FX + PIIX, 1996)"));
    assert_eq!(t1.string_at(6), Some("pc-i440fx-10.0"));
    assert_eq!(t1.string_at(7), Some("QOMVM,SERIAL"));
    assert_eq!(uuid_text(&t1.formatted[8..24]), UUID);
    assert_eq!(t1.string_at(26), Some("Test"));
    let t3 = of(3).next().expect("a type 3 structure");
    assert_eq!(t3.string_at(8), Some("tag7"));
    let t4: Vec<&Structure> = of(4).collect();
    assert_eq!(t4.len(), 2, "one type 4 per socket");
    assert_eq!(t4[1].string_at(4), Some("CPU 1"));
    assert_eq!(t4[0].formatted[0x23], 2, "cores per socket");
    let t11 = of(11).next().expect("a type 11 structure");
    assert_eq!(t11.formatted[4], 2);
    assert_eq!(t11.strings, ["first", "qomvm.shell=1"]);
    // 4 GiB: 3 GiB below the PCI hole, the rest above 4 GiB.
    let t19: Vec<&Structure> = of(19).collect();
    assert_eq!(t19.len(), 2, "{t19:?}");
    let kib =
        |s: &Structure, at: usize| u32::from_le_bytes(s.formatted[at..at + 4].try_into().unwrap());
    assert_eq!(kib(t19[1], 4), 4 << 20, "the second area starts at 4 GiB");
    assert_eq!(of(127).count(), 1);
    assert_eq!(tables.last().unwrap().ty, 127);
}

/// Direct boot: the anchor at the start of the F segment, checksummed, pointing at the
/// tables a kernel's DMI scan reads.
#[test]
fn a_directly_booted_guest_finds_the_tables_in_the_f_segment() {
    let mut qt = Qtest::start(env!("CARGO_BIN_EXE_qomvm"), "qomvm-smbios-direct", |_| {
        smbios_args()
    });
    let segment = qt.read_bytes(0xf0000, 0x100);
    let (at, addr, len, count) = find_anchor(&segment).expect("a valid _SM_ anchor");
    assert_eq!(at, 0);
    let tables = structures(&qt.read_bytes(u64::from(addr), usize::from(len)));
    assert_eq!(tables.len(), usize::from(count));
    check_tables(&tables);
    assert!(
        tables.iter().all(|s| s.ty != 0),
        "no type 0 without type=0 fields"
    );
}

/// Firmware boot: the tables and an anchor without an address (the firmware places them)
/// as fw_cfg files; nothing in the F segment (that is the firmware's).
#[test]
fn firmware_gets_the_tables_and_anchor_through_fw_cfg() {
    let seabios = "/usr/share/seabios/bios-256k.bin";
    if !std::path::Path::new(seabios).exists() {
        test_support::skip::skip(format!("{seabios} is missing (Debian package seabios)"));
        return;
    }
    let mut qt = Qtest::start(env!("CARGO_BIN_EXE_qomvm"), "qomvm-smbios-fw", |_| {
        let mut args = smbios_args();
        args.extend(["-bios".to_string(), seabios.to_string()]);
        args
    });
    let anchor = qt
        .fw_cfg_file("etc/smbios/smbios-anchor")
        .expect("the anchor file");
    assert_eq!(anchor.len(), 31);
    assert_eq!(&anchor[..4], b"_SM_");
    assert_eq!(
        &anchor[0x18..0x1c],
        &[0; 4],
        "the firmware fills in the address"
    );
    let tables = qt
        .fw_cfg_file("etc/smbios/smbios-tables")
        .expect("the tables file");
    assert_eq!(
        u16::from_le_bytes([anchor[0x16], anchor[0x17]]) as usize,
        tables.len()
    );
    let tables = structures(&tables);
    assert_eq!(
        u16::from_le_bytes([anchor[0x1c], anchor[0x1d]]) as usize,
        tables.len()
    );
    check_tables(&tables);
}

fn qomvm_error(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(["-M", "pc", "-accel", "qtest", "-display", "none"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_smbios_options_get_qemus_one_line_errors() {
    for (arg, message) in [
        ("type=1,colour=red", "Invalid parameter 'colour'"),
        ("serial=x", "Must specify type= or file="),
        ("type=128", "out of range!"),
        ("type=9", "Don't know how to build fields for SMBIOS type 9"),
        ("type=1,uuid=xyz", "Invalid UUID"),
        (
            "file=/nonexistent/t1.bin",
            "Cannot read SMBIOS file /nonexistent/t1.bin",
        ),
    ] {
        let (status, stderr) = qomvm_error(&["-smbios", arg]);
        assert_eq!(status, Some(1), "{arg}: {stderr}");
        assert_eq!(stderr, format!("qomvm: -smbios {arg}: {message}\n"));
    }
}

/// `-smbios type=1,uuid=` is the VM's UUID, as QEMU's `query-uuid` reports it.
#[test]
fn the_type1_uuid_is_the_vms_uuid() {
    let dir = std::env::temp_dir().join(format!("qomvm-smbios-uuid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(["-M", "pc", "-accel", "qtest", "-display", "none", "-S"])
        .args(["-smbios", &format!("type=1,uuid={UUID}")])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut qmp = QmpClient::connect(&sock);
    let reply = qmp.execute("query-uuid", json!({}));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(reply, json!({"return": {"UUID": UUID}}));
}
