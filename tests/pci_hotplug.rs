//! PCI hotplug on the pc machine, driven as the guest's ACPI would drive it (QEMU's
//! `docs/specs/acpi_pci_hotplug.rst`): `device_add` sets the slot's bit in PCIU and GPE0
//! bit 1; `device_del` sets its bit in PCID; the guest's write to B0EJ removes the device
//! (`DEVICE_DELETED`); a reset removes what the guest never ejected. QEMU's refusals in its
//! words. The DSDT the machine hands firmware, disassembled by ACPICA's `iasl`, has the
//! slots, `PCEJ`, `PCNT` and `\_GPE._E01`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use test_support::fuzz_qtest::Qtest;
use test_support::qmp::QmpClient;

const GPE0_STS: u16 = 0xafe0;
const GPE0_EN: u16 = 0xafe2;
const PCIU: u16 = 0xae00;
const PCID: u16 = 0xae04;
const B0EJ: u16 = 0xae08;
const PCRM: u16 = 0xae0c;
const BNUM: u16 = 0xae10;
/// GPE0 bit 1: PCI hotplug.
const GPE_PCI_HOTPLUG: u64 = 1 << 1;

fn start(name: &str, extra: &[&str]) -> (Qtest, QmpClient, std::path::PathBuf) {
    let mut dir = PathBuf::new();
    let qt = Qtest::start(env!("CARGO_BIN_EXE_qomvm"), name, |d| {
        dir = d.to_path_buf();
        std::fs::write(d.join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
        let qmp = format!("unix:{},server=on,wait=off", d.join("qmp.sock").display());
        let mut args = vec![
            "-qmp",
            &qmp,
            "-drive",
            "if=none,id=d1,file=disk.raw,format=raw",
        ];
        args.extend(extra);
        args.into_iter().map(String::from).collect()
    });
    let qmp = QmpClient::connect(&dir.join("qmp.sock"));
    (qt, qmp, dir)
}

fn inl(qt: &mut Qtest, port: u16) -> u64 {
    qt.value(format!("inl {port:#x}"))
}

fn inw(qt: &mut Qtest, port: u16) -> u64 {
    qt.value(format!("inw {port:#x}"))
}

fn outl(qt: &mut Qtest, port: u16, value: u64) {
    qt.cmd(format!("outl {port:#x} {value:#x}"));
}

fn outw(qt: &mut Qtest, port: u16, value: u64) {
    qt.cmd(format!("outw {port:#x} {value:#x}"));
}

fn error_text(reply: &Value) -> String {
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
        .to_string()
}

/// Waits for event `name`, returns its `data`.
fn wait_event(qmp: &mut QmpClient, name: &str) -> Value {
    match qmp.wait_event(name, Duration::from_secs(10)) {
        Some(event) => event["data"].clone(),
        None => panic!("no {name} event; events: {:?}", qmp.events),
    }
}

fn peripheral(qmp: &mut QmpClient) -> Vec<String> {
    qmp.execute("qom-list", json!({"path": "/machine/peripheral"}))["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

fn block_devices(qmp: &mut QmpClient) -> Vec<String> {
    qmp.execute("query-block", json!({}))["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["device"].as_str().map(str::to_string))
        .collect()
}

/// 00:05.0's vendor and device IDs.
const SLOT5: u32 = 5 << 3;

#[test]
fn a_hotplugged_disk_is_announced_asked_out_and_gone_once_the_guest_ejects_it() {
    let (mut qt, mut qmp, _dir) = start("qomvm-pcihp-cycle", &[]);
    // The slots the guest may eject: not those of the host bridge, PIIX3 and the VGA.
    let removable = inl(&mut qt, PCRM);
    assert_eq!(removable & 0b111, 0, "PCRM {removable:#x}");
    assert_eq!(
        removable >> 3,
        u64::from(u32::MAX >> 3),
        "PCRM {removable:#x}"
    );
    outw(&mut qt, GPE0_EN, GPE_PCI_HOTPLUG);
    assert_eq!(inw(&mut qt, GPE0_STS), 0);
    assert_eq!(qt.pci_read32(SLOT5, 0), u32::MAX, "slot 5 starts empty");

    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "d1", "id": "vd1", "addr": "0x5"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(
        qt.pci_read32(SLOT5, 0),
        0x1001_1af4,
        "a transitional virtio-blk"
    );
    assert_eq!(inw(&mut qt, GPE0_STS) & GPE_PCI_HOTPLUG, GPE_PCI_HOTPLUG);
    assert_eq!(inl(&mut qt, PCIU), 1 << 5);
    assert_eq!(inl(&mut qt, PCIU), 0, "reading PCIU clears it");
    assert_eq!(inl(&mut qt, PCID), 0);
    // The guest's _E01 handled it: clear the status (write one to clear).
    outw(&mut qt, GPE0_STS, GPE_PCI_HOTPLUG);
    assert_eq!(inw(&mut qt, GPE0_STS), 0);
    assert!(peripheral(&mut qmp).contains(&"vd1".to_string()));
    // query-pci and `info pci` list it, its BARs not yet programmed (the guest does that).
    let pci = qmp.execute("query-pci", json!({}));
    let dev = pci["return"][0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["slot"] == 5)
        .unwrap_or_else(|| panic!("no slot 5: {pci}"))
        .clone();
    assert_eq!(dev["qdev_id"], "vd1");
    assert_eq!(
        dev["id"],
        json!({"vendor": 0x1af4, "device": 0x1001, "subsystem-vendor": 0x1af4, "subsystem": 2})
    );
    assert_eq!(
        dev["class_info"],
        json!({"class": 0x0100, "desc": "SCSI controller"})
    );
    assert_eq!(dev["regions"][0]["address"], u64::MAX, "{dev}");
    let info = qmp.execute("human-monitor-command", json!({"command-line": "info pci"}));
    let info = info["return"].as_str().unwrap().replace("\r\n", "\n");
    assert!(
        info.contains(
            "  Bus  0, device   5, function 0:\n    SCSI controller: PCI device 1af4:1001\n"
        ),
        "{info}"
    );
    assert!(info.contains("      id \"vd1\"\n"), "{info}");

    // Asked out: the device stays until the guest ejects it, a second request asks again.
    assert_eq!(
        qmp.execute("device_del", json!({"id": "vd1"})),
        json!({"return": {}})
    );
    assert_eq!(inl(&mut qt, PCID), 1 << 5);
    assert_eq!(inw(&mut qt, GPE0_STS) & GPE_PCI_HOTPLUG, GPE_PCI_HOTPLUG);
    outw(&mut qt, GPE0_STS, GPE_PCI_HOTPLUG);
    assert_eq!(qt.pci_read32(SLOT5, 0), 0x1001_1af4);
    assert_eq!(
        qmp.execute("device_del", json!({"id": "vd1"})),
        json!({"return": {}})
    );
    assert_eq!(inw(&mut qt, GPE0_STS) & GPE_PCI_HOTPLUG, GPE_PCI_HOTPLUG);
    assert!(!qmp.events.iter().any(|e| e["event"] == "DEVICE_DELETED"));

    // A write to another bus's selector ejects nothing.
    outl(&mut qt, BNUM, 1);
    outl(&mut qt, B0EJ, 1 << 5);
    assert_eq!(qt.pci_read32(SLOT5, 0), 0x1001_1af4);
    // The guest's PCEJ(0, 5).
    outl(&mut qt, BNUM, 0);
    outl(&mut qt, B0EJ, 1 << 5);
    let deleted = wait_event(&mut qmp, "DEVICE_DELETED");
    assert_eq!(
        deleted,
        json!({"path": "/machine/peripheral/vd1", "device": "vd1"})
    );
    assert_eq!(qt.pci_read32(SLOT5, 0), u32::MAX, "the slot is empty again");
    assert_eq!(inl(&mut qt, PCID), 0);
    assert!(!peripheral(&mut qmp).contains(&"vd1".to_string()));
    // QEMU deletes a -drive with its device; a -blockdev node stays for blockdev-del.
    assert!(
        !block_devices(&mut qmp).contains(&"d1".to_string()),
        "d1 went with its device"
    );

    // The id and the slot are free again: a node plugged in the same way.
    let reply = qmp.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "n1",
               "file": {"driver": "file", "filename": "disk.raw"}}),
    );
    assert_eq!(reply, json!({"return": {}}));
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "n1", "id": "vd1", "addr": "0x5"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(inl(&mut qt, PCIU), 1 << 5);
    assert_eq!(
        qmp.execute("device_del", json!({"id": "vd1"})),
        json!({"return": {}})
    );
    outl(&mut qt, B0EJ, 1 << 5);
    wait_event(&mut qmp, "DEVICE_DELETED");
    assert_eq!(
        qmp.execute("blockdev-del", json!({"node-name": "n1"})),
        json!({"return": {}}),
        "the node is free once its device is gone"
    );
    qt.check_alive();
}

#[test]
fn a_reset_removes_what_the_guest_did_not_eject_and_a_nic_gives_back_its_netdev() {
    let (mut qt, mut qmp, _dir) = start("qomvm-pcihp-reset", &["-netdev", "user,id=n0"]);
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-net-pci", "netdev": "n0", "id": "nic1", "mac": "52:54:00:12:34:99"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    // Without addr= it took the first free slot.
    let slot = inl(&mut qt, PCIU).trailing_zeros();
    assert_eq!(qt.pci_read32(slot << 3, 0), 0x1000_1af4);
    assert_eq!(
        qmp.execute("device_del", json!({"id": "nic1"})),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute("system_reset", json!({})),
        json!({"return": {}})
    );
    let deleted = wait_event(&mut qmp, "DEVICE_DELETED");
    assert_eq!(deleted["device"], "nic1");
    // The NIC itself is gone, not only unplugged: no one holds it any more.
    let filters = qmp.execute("query-rx-filter", json!({}));
    assert_eq!(filters, json!({"return": []}), "the NIC is still somewhere");
    assert_eq!(qt.pci_read32(slot << 3, 0), u32::MAX);
    assert_eq!(inl(&mut qt, PCID), 0);
    // The netdev is free for another NIC.
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-net-pci", "netdev": "n0", "id": "nic2"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    qt.check_alive();
}

/// `e1000` the same way: plugged into a free slot, asked out, gone at the reset, out of
/// `info network`, and its netdev free for the next card.
#[test]
fn an_e1000_comes_goes_and_gives_back_its_netdev() {
    emulated_nic_comes_goes_and_gives_back_its_netdev("e1000", 0x100e_8086);
}

/// `rtl8139` too: its loop handlers and PCS timer go with it.
#[test]
fn an_rtl8139_comes_goes_and_gives_back_its_netdev() {
    emulated_nic_comes_goes_and_gives_back_its_netdev("rtl8139", 0x8139_10ec);
}

fn emulated_nic_comes_goes_and_gives_back_its_netdev(driver: &str, vendor_device: u32) {
    let (mut qt, mut qmp, _dir) =
        start(&format!("qomvm-pcihp-{driver}"), &["-netdev", "user,id=n0"]);
    let reply = qmp.execute(
        "device_add",
        json!({"driver": driver, "netdev": "n0", "id": "nic", "mac": "52:54:00:12:34:98"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    let slot = inl(&mut qt, PCIU).trailing_zeros();
    assert_eq!(qt.pci_read32(slot << 3, 0), vendor_device);
    let network = |qmp: &mut QmpClient| {
        qmp.execute(
            "human-monitor-command",
            json!({"command-line": "info network"}),
        )["return"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let entry = format!("nic: index=0,type=nic,model={driver},macaddr=52:54:00:12:34:98");
    assert!(network(&mut qmp).contains(&entry), "{}", network(&mut qmp));
    assert_eq!(
        qmp.execute("device_del", json!({"id": "nic"})),
        json!({"return": {}})
    );
    assert_eq!(
        qmp.execute("system_reset", json!({})),
        json!({"return": {}})
    );
    assert_eq!(wait_event(&mut qmp, "DEVICE_DELETED")["device"], "nic");
    assert!(!network(&mut qmp).contains("nic:"), "{}", network(&mut qmp));
    assert_eq!(qt.pci_read32(slot << 3, 0), u32::MAX);
    let reply = qmp.execute(
        "device_add",
        json!({"driver": driver, "netdev": "n0", "id": "nic2"}),
    );
    assert_eq!(reply, json!({"return": {}}), "the netdev is free again");
    qt.check_alive();
}

#[test]
fn what_cannot_be_plugged_or_unplugged_is_refused_in_qemus_words() {
    let (mut qt, mut qmp, _dir) = start(
        "qomvm-pcihp-errors",
        &["-device", "virtio-rng-pci,id=rng0,addr=0x6"],
    );
    let cases = [
        (
            json!({"driver": "nosuch"}),
            "'nosuch' is not a valid device model name",
        ),
        (
            json!({"driver": "VGA"}),
            "Device 'VGA' does not support hotplugging",
        ),
        (
            json!({"driver": "isa-serial"}),
            "Bus 'isa.0' does not support hotplugging",
        ),
        (
            json!({"driver": "virtio-rng-pci", "id": "rng0"}),
            "Duplicate ID 'rng0' for device",
        ),
        (
            json!({"driver": "virtio-rng-pci", "addr": "6.1"}),
            "PCI: slot 6 function 0 already occupied by virtio-rng-pci, new func virtio-rng-pci cannot be exposed to guest.",
        ),
        (json!({"driver": "virtio-rng-pci", "id": "a/b"}), "Parameter 'id' expects an identifier"),
        (json!({"driver": "virtio-rng-pci", "id": ""}), "Parameter 'id' expects an identifier"),
        (json!({"driver": "virtio-rng-pci", "id": "device[*]"}), "Parameter 'id' expects an identifier"),
        (
            json!({"driver": "virtio-rng-pci", "addr": "6"}),
            "PCI: slot 6 function 0 not available for virtio-rng-pci, in use by virtio-rng-pci,id=rng0",
        ),
        (
            json!({"driver": "virtio-blk-pci", "drive": "nosuch"}),
            "Property 'virtio-blk-device.drive' can't find value 'nosuch'",
        ),
    ];
    for (args, want) in cases {
        let reply = qmp.execute("device_add", args.clone());
        let text = error_text(&reply);
        assert!(
            text.contains(want),
            "device_add {args}: {text}, want {want}"
        );
    }
    assert_eq!(inl(&mut qt, PCIU), 0, "no refused device was announced");
    assert_eq!(
        error_text(&qmp.execute("device_del", json!({"id": "nosuch"}))),
        "Device 'nosuch' not found"
    );
    assert_eq!(
        qmp.execute("device_del", json!({"id": "nosuch"}))["error"]["class"],
        "DeviceNotFound"
    );
    // The board's own devices, by QOM path.
    let reply = qmp.execute("device_del", json!({"id": "/machine/pm"}));
    assert_eq!(
        error_text(&reply),
        "Device 'PIIX4_PM' does not support hotplugging"
    );
    // HMP spells the same commands.
    let reply = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "device_add virtio-rng-pci,id=rng1,addr=0x7"}),
    );
    assert_eq!(reply, json!({"return": ""}));
    assert_eq!(inl(&mut qt, PCIU), 1 << 7);
    let reply = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "device_del rng1"}),
    );
    assert_eq!(reply, json!({"return": ""}));
    assert_eq!(inl(&mut qt, PCID), 1 << 7);
    // `device_add help` lists what -device help lists; DRIVER,help its properties.
    let hmp = |qmp: &mut QmpClient, line: &str| {
        let reply = qmp.execute("human-monitor-command", json!({"command-line": line}));
        reply["return"]
            .as_str()
            .unwrap_or_else(|| panic!("{line}: {reply}"))
            .to_string()
    };
    let listing = hmp(&mut qmp, "device_add help");
    assert!(listing.contains("name \"virtio-blk-pci\""), "{listing}");
    let props = hmp(&mut qmp, "device_add virtio-rng-pci,help");
    assert!(props.contains("max-bytes"), "{props}");
    qt.check_alive();
}

#[test]
fn without_acpi_root_pci_hotplug_the_bus_takes_no_devices() {
    let (mut qt, mut qmp, _dir) = start(
        "qomvm-pcihp-off",
        &[
            "-global",
            "PIIX4_PM.acpi-root-pci-hotplug=off",
            "-device",
            "virtio-rng-pci,id=rng0",
        ],
    );
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "rng1"}),
    );
    assert_eq!(
        error_text(&reply),
        "Bus 'pci.0' does not support hotplugging"
    );
    let reply = qmp.execute("device_del", json!({"id": "rng0"}));
    assert_eq!(
        error_text(&reply),
        "Bus 'pci.0' does not support hotplugging"
    );
    assert_eq!(inl(&mut qt, PCIU), 0xffff_ffff, "no hotplug registers");
    qt.check_alive();
}

/// The DSDT's AML for the slots, checked by ACPICA's disassembler.
#[test]
fn the_dsdt_describes_the_hotplug_slots_and_the_gpe_handler() {
    if Path::new("/usr/bin/iasl").metadata().is_err() {
        test_support::skip::skip("iasl is missing (Debian package acpica-tools)");
        return;
    }
    let seabios = "/usr/share/seabios/bios-256k.bin";
    if !Path::new(seabios).exists() {
        test_support::skip::skip(format!("{seabios} is missing (Debian package seabios)"));
        return;
    }
    let (mut qt, _qmp, dir) = start("qomvm-pcihp-dsdt", &["-bios", seabios]);
    let tables = qt.fw_cfg_file("etc/acpi/tables").expect("etc/acpi/tables");
    let at = tables
        .windows(4)
        .position(|w| w == b"DSDT")
        .expect("a DSDT");
    let len = u32::from_le_bytes(tables[at + 4..at + 8].try_into().unwrap()) as usize;
    let dsdt = dir.join("dsdt.dat");
    std::fs::write(&dsdt, &tables[at..at + len]).unwrap();
    let out = std::process::Command::new("iasl")
        .args(["-d", dsdt.to_str().unwrap()])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "iasl -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    for want in [
        "OperationRegion (PCST, SystemIO, 0xAE00, 0x08)",
        "Method (PCEJ, 2, NotSerialized)",
        "B0EJ = (One << Arg1)",
        "Device (S18)",
        "Name (_SUN, 0x03)",
        "Name (_ADR, 0x00030000)",
        "PCEJ (BSEL, _SUN)",
        "Method (DVNT, 2, NotSerialized)",
        "Notify (SF8, Arg1)",
        "DVNT (PCIU, One)",
        "DVNT (PCID, 0x03)",
        "Method (_E01, 0, NotSerialized)",
        "\\_SB.PCI0.PCNT ()",
    ] {
        assert!(dsl.contains(want), "the DSDT has no {want:?}:\n{dsl}");
    }
    // The host bridge, PIIX3 and the VGA's slots are not hotpluggable.
    for absent in ["Device (S00)", "Device (S08)", "Device (S10)"] {
        assert!(!dsl.contains(absent), "the DSDT describes {absent}:\n{dsl}");
    }
    let fadt_at = tables
        .windows(4)
        .position(|w| w == b"FACP")
        .expect("a FADT");
    let gpe0_blk = u32::from_le_bytes(tables[fadt_at + 80..fadt_at + 84].try_into().unwrap());
    assert_eq!(gpe0_blk, 0xafe0);
    assert_eq!(tables[fadt_at + 92], 4, "GPE0_BLK_LEN");
}

#[test]
fn no_device_comes_or_goes_while_a_migration_runs() {
    let (mut qt, mut qmp, dir) = start(
        "qomvm-pcihp-migrating",
        &["-device", "virtio-rng-pci,id=rng0"],
    );
    // A destination that accepts and never reads: the migration stays active.
    let sock = dir.join("dest.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let reply = qmp.execute(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    assert_eq!(reply, json!({"return": {}}));
    let (_conn, _) = listener.accept().unwrap();
    let status = qmp.execute("query-migrate", json!({}))["return"]["status"].clone();
    assert!(status == "active" || status == "setup", "{status}");
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "rng1"}),
    );
    assert_eq!(error_text(&reply), "device_add not allowed while migrating");
    let reply = qmp.execute("device_del", json!({"id": "rng0"}));
    assert_eq!(error_text(&reply), "device_del not allowed while migrating");
    assert_eq!(inl(&mut qt, PCIU) | inl(&mut qt, PCID), 0);
    assert_eq!(
        qmp.execute("migrate_cancel", json!({})),
        json!({"return": {}})
    );
    let done = qmp.wait_migration(Duration::from_secs(20));
    assert_eq!(done["return"]["status"], "cancelled", "{done}");
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "rng1"}),
    );
    assert_eq!(reply, json!({"return": {}}), "after the migration");
    qt.check_alive();
}

/// libvirt's channel hotplug: a `virtserialport` on a running `virtio-serial-pci`'s bus,
/// taken out at once by `device_del` (no guest involved); ejecting the controller takes
/// its remaining ports with it, each with its `DEVICE_DELETED`.
#[test]
fn serial_ports_come_and_go_with_device_add_and_device_del() {
    let (mut qt, mut qmp, _dir) = start(
        "qomvm-pcihp-vserport",
        &[
            "-device",
            "virtio-serial-pci,id=vs,addr=0x6",
            "-chardev",
            "ringbuf,id=c1",
            "-chardev",
            "ringbuf,id=c2",
        ],
    );
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtserialport", "bus": "vs.0", "chardev": "c1", "id": "p1",
               "name": "org.qemu.guest_agent.0"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    assert_eq!(inl(&mut qt, PCIU), 0, "a port is no PCI slot");
    assert_eq!(
        qmp.execute("device_del", json!({"id": "p1"})),
        json!({"return": {}})
    );
    let deleted = wait_event(&mut qmp, "DEVICE_DELETED");
    assert_eq!(
        deleted,
        json!({"device": "p1", "path": "/machine/peripheral/p1"})
    );
    // The name and number are free again.
    for id in ["p2", "p3"] {
        let chardev = if id == "p2" { "c1" } else { "c2" };
        let reply = qmp.execute(
            "device_add",
            json!({"driver": "virtserialport", "bus": "vs.0", "chardev": chardev, "id": id,
                   "nr": if id == "p2" { 1 } else { 2 }}),
        );
        assert_eq!(reply, json!({"return": {}}), "{id}");
    }
    assert_eq!(
        qmp.execute("device_del", json!({"id": "vs"})),
        json!({"return": {}})
    );
    outl(&mut qt, B0EJ, 1 << 6);
    let mut gone: Vec<String> = (0..3)
        .map(|_| {
            wait_event(&mut qmp, "DEVICE_DELETED")["device"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    gone.sort();
    assert_eq!(gone, ["p2", "p3", "vs"]);
    // Their chardevs are free for a new controller's ports.
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-serial-pci", "id": "vs2"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtserialport", "bus": "vs2.0", "chardev": "c1", "id": "p4"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    qt.check_alive();
}

/// libvirt's channel hotplug: `chardev-add` (a Unix socket server), then the port on it;
/// the chardev is busy while the port has it and one frontend at a time; `chardev-add`'s
/// other backends and refusals.
#[test]
fn chardevs_are_added_and_removed_at_run_time() {
    let (mut qt, mut qmp, dir) = start(
        "qomvm-pcihp-chardev",
        &["-device", "virtio-serial-pci,id=vs"],
    );
    let sock = dir.join("agent.sock");
    let reply = qmp.execute(
        "chardev-add",
        json!({"id": "charchannel1", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": sock.display().to_string()}},
            "server": true, "wait": false}}}),
    );
    assert_eq!(reply, json!({"return": {}}));
    let chardevs = qmp.execute("query-chardev", json!({}));
    let listed = chardevs["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == "charchannel1")
        .unwrap_or_else(|| panic!("not listed: {chardevs}"))
        .clone();
    assert_eq!(listed["frontend-open"], false);
    let _client = std::os::unix::net::UnixStream::connect(&sock).expect("the server listens");
    let port = json!({"driver": "virtserialport", "bus": "vs.0", "chardev": "charchannel1",
                      "id": "channel1", "name": "org.qemu.guest_agent.1"});
    assert_eq!(qmp.execute("device_add", port), json!({"return": {}}));
    let again = json!({"driver": "virtserialport", "bus": "vs.0", "chardev": "charchannel1", "id": "channel2"});
    assert_eq!(
        error_text(&qmp.execute("device_add", again)),
        "Property 'virtserialport.chardev' can't take value 'charchannel1': Device 'charchannel1' is in use"
    );
    assert_eq!(
        error_text(&qmp.execute("chardev-remove", json!({"id": "charchannel1"}))),
        "Chardev 'charchannel1' is busy"
    );
    assert_eq!(
        qmp.execute("device_del", json!({"id": "channel1"})),
        json!({"return": {}})
    );
    wait_event(&mut qmp, "DEVICE_DELETED");
    assert_eq!(
        qmp.execute("chardev-remove", json!({"id": "charchannel1"})),
        json!({"return": {}})
    );
    let reply = qmp.execute("chardev-remove", json!({"id": "charchannel1"}));
    assert_eq!(reply["error"]["class"], "GenericError");
    assert_eq!(error_text(&reply), "Chardev 'charchannel1' not found");

    // The monitor's own chardev is busy, and its id taken.
    let reply = qmp.execute("chardev-remove", json!({"id": "compat_monitor0"}));
    assert_eq!(error_text(&reply), "Chardev 'compat_monitor0' is busy");
    let reply = qmp.execute(
        "chardev-add",
        json!({"id": "compat_monitor0", "backend": {"type": "null", "data": {}}}),
    );
    assert_eq!(
        error_text(&reply),
        "attempt to add duplicate property 'compat_monitor0' to object (type 'container')"
    );
    // A pseudo-terminal says where it is.
    let reply = qmp.execute(
        "chardev-add",
        json!({"id": "pty0", "backend": {"type": "pty", "data": {}}}),
    );
    let pty = reply["return"]["pty"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_string();
    assert!(
        pty.starts_with("/dev/pts/") && Path::new(&pty).exists(),
        "{pty}"
    );
    let log = dir.join("out.log");
    let reply = qmp.execute(
        "chardev-add",
        json!({"id": "file0", "backend": {"type": "file", "data": {"out": log.display().to_string()}}}),
    );
    assert_eq!(reply, json!({"return": {}}));
    assert!(log.exists());
    for (args, want) in [
        (
            json!({"id": "pty0", "backend": {"type": "null", "data": {}}}),
            "attempt to add duplicate property 'pty0' to object (type 'container')",
        ),
        (
            json!({"id": "r0", "backend": {"type": "ringbuf", "data": {"size": 3}}}),
            "ringbuf size must be power of two",
        ),
        (
            json!({"id": "x0", "backend": {"type": "spicevmc", "data": {}}}),
            "Parameter 'type' does not accept value 'spicevmc'",
        ),
        (
            json!({"id": "s0", "backend": {"type": "socket", "data": {
                "addr": {"type": "fd", "data": {"str": "nosuch"}}}}}),
            "File descriptor named 'nosuch' has not been found",
        ),
    ] {
        assert_eq!(
            error_text(&qmp.execute("chardev-add", args.clone())),
            want,
            "{args}"
        );
    }
    // HMP spells them as -chardev does.
    let reply = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "chardev-add null,id=n9"}),
    );
    assert_eq!(reply, json!({"return": ""}));
    let reply = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "chardev-remove n9"}),
    );
    assert_eq!(reply, json!({"return": ""}));
    qt.check_alive();
}
