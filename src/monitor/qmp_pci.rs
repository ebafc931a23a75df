//! `query-pci` and HMP `info pci` (QEMU's `qmp_query_pci` in `hw/pci/pci.c` and
//! `hmp_info_pci` in `hw/pci/pci-hmp-cmds.c`): the functions on the root bus, their IDs,
//! class, interrupt and regions as the guest programmed them.

use hw::core::bus::find_bus_by_type;
use hw::core::qdev::DeviceMethods;
use hw::pci::pci::{config, pci_bus_devices, BarKind, TYPE_PCI_BUS};
use qom::ObjectRef;
use serde_json::{json, Value};

/// QEMU's `pci_class_descriptions` for the classes a pc shows.
const CLASS_NAMES: &[(u16, &str)] = &[
    (0x0001, "VGA controller"),
    (0x0100, "SCSI controller"),
    (0x0101, "IDE controller"),
    (0x0106, "SATA controller"),
    (0x0180, "Storage controller"),
    (0x0200, "Ethernet controller"),
    (0x0280, "Network controller"),
    (0x0300, "VGA controller"),
    (0x0380, "Display controller"),
    (0x0401, "Audio controller"),
    (0x0403, "Audio controller"),
    (0x0480, "Multimedia controller"),
    (0x0500, "RAM controller"),
    (0x0580, "Memory controller"),
    (0x0600, "Host bridge"),
    (0x0601, "ISA bridge"),
    (0x0604, "PCI bridge"),
    (0x0680, "Bridge"),
    (0x0700, "Serial port"),
    (0x0c03, "USB controller"),
    (0x0c05, "SMBus"),
];

/// QEMU's `PCI_BAR_UNMAPPED`: the address of a region not mapped.
const UNMAPPED: u64 = u64::MAX;

/// QEMU's `qmp_query_pci`: one `PciInfo` for bus 0.
pub fn query_pci(machine: &ObjectRef) -> Value {
    let Some(bus) = find_bus_by_type(machine, TYPE_PCI_BUS) else {
        return json!([]);
    };
    let devices: Vec<Value> = pci_bus_devices(&bus)
        .into_iter()
        .map(|(devfn, dev)| {
            let cfg = |at: usize, len: usize| u64::from(dev.read_config(at, len));
            let class = cfg(config::CLASS, 2) as u16;
            let mut class_info = json!({"class": class});
            if let Some((_, desc)) = CLASS_NAMES.iter().find(|(c, _)| *c == class) {
                class_info["desc"] = (*desc).into();
            }
            let pin = cfg(config::INTERRUPT_PIN, 1);
            let regions: Vec<Value> = dev
                .regions()
                .into_iter()
                .map(|(bar, kind, address, size)| {
                    let mut region = json!({
                        "bar": bar,
                        "type": if kind == BarKind::Io { "io" } else { "memory" },
                        "address": address.unwrap_or(UNMAPPED),
                        "size": size,
                    });
                    if kind.is_memory() {
                        region["prefetch"] = kind.is_prefetch().into();
                        region["mem_type_64"] = kind.is_64bit().into();
                    }
                    region
                })
                .collect();
            let mut info = json!({
                "bus": 0,
                "slot": devfn >> 3,
                "function": devfn & 7,
                "class_info": class_info,
                "id": {
                    "vendor": cfg(config::VENDOR_ID, 2),
                    "device": cfg(config::DEVICE_ID, 2),
                    "subsystem-vendor": cfg(config::SUBSYSTEM_VENDOR_ID, 2),
                    "subsystem": cfg(config::SUBSYSTEM_ID, 2),
                },
                "irq_pin": pin,
                "qdev_id": dev.object().device_id().unwrap_or_default(),
                "regions": regions,
            });
            if pin != 0 {
                info["irq"] = cfg(config::INTERRUPT_LINE, 1).into();
            }
            info
        })
        .collect();
    json!([{"bus": 0, "devices": devices}])
}

/// QEMU's `hmp_info_pci`.
pub fn info_pci(machine: &ObjectRef, out: &mut String) {
    use std::fmt::Write;
    let int = |v: &Value| v.as_u64().unwrap_or(0);
    for bus in query_pci(machine).as_array().into_iter().flatten() {
        for dev in bus["devices"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  Bus {:2}, device {:3}, function {}:",
                int(&dev["bus"]),
                int(&dev["slot"]),
                int(&dev["function"])
            );
            let class = &dev["class_info"];
            let desc = class["desc"].as_str().map_or_else(
                || format!("Class {:04}", int(&class["class"])),
                str::to_string,
            );
            let id = &dev["id"];
            let _ = writeln!(
                out,
                "    {desc}: PCI device {:04x}:{:04x}",
                int(&id["vendor"]),
                int(&id["device"])
            );
            let _ = writeln!(
                out,
                "      PCI subsystem {:04x}:{:04x}",
                int(&id["subsystem-vendor"]),
                int(&id["subsystem"])
            );
            if let Some(irq) = dev["irq"].as_u64() {
                let pin = (b'A' + (int(&dev["irq_pin"]) as u8).saturating_sub(1)) as char;
                let _ = writeln!(out, "      IRQ {irq}, pin {pin}");
            }
            for region in dev["regions"].as_array().into_iter().flatten() {
                let (addr, size) = (int(&region["address"]), int(&region["size"]));
                let last = addr.wrapping_add(size).wrapping_sub(1);
                let _ = write!(out, "      BAR{}: ", int(&region["bar"]));
                if region["type"] == "io" {
                    let _ = writeln!(out, "I/O at 0x{addr:04x} [0x{last:04x}].");
                } else {
                    let prefetch = if region["prefetch"] == true {
                        " prefetchable"
                    } else {
                        ""
                    };
                    let bits = if region["mem_type_64"] == true {
                        64
                    } else {
                        32
                    };
                    let _ = writeln!(
                        out,
                        "{bits} bit{prefetch} memory at 0x{addr:08x} [0x{last:08x}]."
                    );
                }
            }
            let _ = writeln!(
                out,
                "      id \"{}\"",
                dev["qdev_id"].as_str().unwrap_or("")
            );
        }
    }
}
