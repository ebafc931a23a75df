//! What older machine versions undo of later device defaults (QEMU's `hw_compat_X_Y`
//! arrays in `hw/core/machine.c`), restricted to the devices and properties qomvm has.
//!
//! A machine of version X.Y applies every array from the newest down to its own, in that
//! order, as globals ahead of `-global`: a later (older) entry wins over an earlier one,
//! and `-global` over all of them. QEMU's `virtio-X-device` entries name the virtio device
//! behind a proxy; qomvm's virtio devices are their PCI proxies, which have the same
//! properties, so those entries name `virtio-X-pci`. Entries for what qomvm does not
//! model (PCIe capabilities, migration stream flags, features it never offers such as
//! USO or queue reset, EDID) are left out: their QEMU default is what qomvm does. Also
//! left out: `fw_cfg_io`'s 16 file slots up to 2.8, which qomvm's firmware files can
//! outnumber.

/// One compat property: QEMU's `GlobalProperty` (driver or an ancestor type, property,
/// value as typed).
pub type CompatProp = (&'static str, &'static str, &'static str);

/// A machine version, `(major, minor)`.
pub type MachineVersion = (u32, u32);

/// QEMU's `hw_compat_X_Y`, newest first: each array is what machines of that version and
/// older need.
pub const HW_COMPAT: &[(MachineVersion, &[CompatProp])] = &[
    ((9, 2), &[("virtio-balloon-pci", "vectors", "0")]),
    ((7, 1), &[("virtio-rng-pci", "vectors", "0")]),
    ((6, 0), &[("e1000", "init-vet", "off")]),
    ((5, 2), &[("virtio-net-pci", "vectors", "3")]),
    (
        (5, 1),
        &[
            ("virtio-blk-pci", "num-queues", "1"),
            ("virtio-scsi-pci", "num_queues", "1"),
            ("pvpanic", "events", "1"),
        ],
    ),
    ((5, 0), &[("virtio-balloon-pci", "page-poison", "false")]),
    (
        (4, 2),
        &[
            ("virtio-blk-pci", "queue-size", "128"),
            ("virtio-scsi-pci", "virtqueue_size", "128"),
        ],
    ),
    (
        (3, 1),
        &[
            ("usb-kbd", "serial", "42"),
            ("usb-mouse", "serial", "42"),
            ("usb-tablet", "serial", "42"),
            ("virtio-blk-pci", "discard", "false"),
            ("virtio-blk-pci", "write-zeroes", "false"),
        ],
    ),
    ((2, 12), &[("cirrus-vga", "global-vmstate", "true")]),
    ((2, 11), &[("virtio-blk-pci", "vectors", "2")]),
    ((2, 8), &[("cirrus-vga", "vgamem_mb", "8")]),
    ((2, 7), &[("virtio-serial-pci", "emergency-write", "off")]),
    (
        (2, 6),
        &[
            ("virtio-pci", "disable-modern", "on"),
            ("virtio-pci", "disable-legacy", "off"),
        ],
    ),
    ((2, 4), &[("fw_cfg_io", "dma_enabled", "off")]),
    (
        (2, 1),
        &[
            ("VGA", "qemu-extended-regs", "off"),
            ("usb-mouse", "usb_version", "1"),
            ("usb-kbd", "usb_version", "1"),
        ],
    ),
];

/// The compat properties of a machine of `version`: the arrays of `tables` (each newest
/// first) from the newest down to `version`'s own, interleaved by version as QEMU's
/// machine options chain (`hw_compat_X_Y`, then the board's `pc_compat_X_Y`, for each
/// version from the newest).
pub fn compat_props_for(
    version: MachineVersion,
    tables: &[&[(MachineVersion, &'static [CompatProp])]],
) -> Vec<CompatProp> {
    let mut versions: Vec<MachineVersion> = tables
        .iter()
        .flat_map(|t| t.iter().map(|(v, _)| *v))
        .filter(|v| *v >= version)
        .collect();
    versions.sort_unstable_by(|a, b| b.cmp(a));
    versions.dedup();
    let mut props = Vec::new();
    for v in versions {
        for table in tables {
            for (_, entries) in table.iter().filter(|(tv, _)| *tv == v) {
                props.extend_from_slice(entries);
            }
        }
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_takes_its_own_and_newer_arrays_oldest_last() {
        const BOARD: &[(MachineVersion, &[CompatProp])] = &[
            ((7, 0), &[("cpu", "x", "7.0")]),
            ((2, 6), &[("cpu", "x", "2.6")]),
        ];
        let props = compat_props_for((2, 6), &[HW_COMPAT, BOARD]);
        // Newest first, the board's after the devices' of the same version.
        assert_eq!(props.first(), Some(&("virtio-balloon-pci", "vectors", "0")));
        let at = |p: CompatProp| props.iter().position(|q| *q == p).unwrap();
        assert!(at(("cpu", "x", "7.0")) < at(("cpu", "x", "2.6")));
        assert!(at(("virtio-rng-pci", "vectors", "0")) < at(("cpu", "x", "7.0")));
        assert_eq!(props.last(), Some(&("cpu", "x", "2.6")));
        assert!(!props.contains(&("VGA", "qemu-extended-regs", "off")), "2.1's");
        assert!(compat_props_for((10, 0), &[HW_COMPAT, BOARD]).is_empty());
        assert_eq!(
            compat_props_for((9, 2), &[HW_COMPAT, BOARD]),
            vec![("virtio-balloon-pci", "vectors", "0")]
        );
    }

    #[test]
    fn the_arrays_are_newest_first() {
        assert!(HW_COMPAT.windows(2).all(|w| w[0].0 > w[1].0));
    }
}
