//! The pc machine's E820 memory map and its RAM split around the 32-bit PCI hole (QEMU's
//! `hw/i386/e820_memory_layout.c` and the `lowmem` rule of `pc_piix.c`).
//!
//! The map handed to Linux (`boot_params.e820_table`):
//!
//! | range | type | what |
//! | --- | --- | --- |
//! | `0x0 .. 0x9fc00` | RAM | conventional memory, 640 KiB less the EBDA |
//! | `0x9fc00 .. 0xa0000` | reserved | EBDA |
//! | `0xe0000 .. 0x100000` | reserved | BIOS area: the ACPI tables at `0xe0000..0xf0000` (see `acpi_build`), the F-segment free for the SMBIOS/MP entry points |
//! | `0x100000 .. below_4g` | RAM | |
//! | `0xfeffc000 .. 0xff000000` | reserved | KVM's identity map and real-mode TSS (`kvm_arch_init`) |
//! | `4 GiB .. 4 GiB + above_4g` | RAM | only when `above_4g > 0` |
//!
//! `0xa0000..0xe0000` (VGA window, option ROMs) is left out of the map, as on real PCs.

/// Start of the EBDA, the top of conventional memory.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (start of the VGA window).
pub const LOWMEM_END: u64 = 0xa0000;
/// Start of the reserved BIOS area (ACPI tables, then the F-segment).
pub const BIOS_AREA_START: u64 = 0xe0000;
/// Start of RAM above 1 MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// QEMU's KVM identity-map page (`0xfeffc000`) and the three-page real-mode TSS after it.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// End of the KVM identity map/TSS region.
pub const KVM_IDENTITY_MAP_END: u64 = 0xff00_0000;
/// Where RAM above the 32-bit hole starts.
pub const FOUR_GIB: u64 = 0x1_0000_0000;

/// E820 range types (`E820_TYPE_*` in Linux's `asm/e820/types.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the OS must not use it.
    Reserved = 2,
    /// ACPI tables, reclaimable once read.
    Acpi = 3,
    /// ACPI non-volatile storage.
    Nvs = 4,
}

/// One E820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Kind,
}

impl E820Entry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

/// QEMU i440fx's split of `-m` into RAM below 4 GiB and RAM above it: `(below_4g, above_4g)`.
///
/// The default `max-ram-below-4g` is 3.5 GiB; when RAM reaches it, `gigabyte_align` lowers
/// the split to 3 GiB so that the 32-bit PCI hole starts on a gigabyte.
pub fn pc_ram_split(ram_size: u64) -> (u64, u64) {
    const MAX_RAM_BELOW_4G: u64 = 0xe000_0000;
    let lowmem = if ram_size >= MAX_RAM_BELOW_4G {
        0xc000_0000
    } else {
        MAX_RAM_BELOW_4G
    };
    let below_4g = ram_size.min(lowmem);
    (below_4g, ram_size - below_4g)
}

/// The pc machine's E820 table for `below_4g` bytes of RAM at 0 and `above_4g` bytes at
/// 4 GiB, sorted by address. RAM below 1 MiB is always listed as conventional memory (the
/// loader needs it); `below_4g` at or under 1 MiB lists no high RAM.
pub fn pc_e820_table(below_4g: u64, above_4g: u64) -> Vec<E820Entry> {
    let entry = |addr: u64, end: u64, kind: E820Kind| E820Entry {
        addr,
        size: end - addr,
        kind,
    };
    let mut table = vec![
        entry(0, EBDA_START, E820Kind::Ram),
        entry(EBDA_START, LOWMEM_END, E820Kind::Reserved),
        entry(BIOS_AREA_START, HIGH_MEMORY_START, E820Kind::Reserved),
    ];
    if below_4g > HIGH_MEMORY_START {
        table.push(entry(HIGH_MEMORY_START, below_4g, E820Kind::Ram));
    }
    table.push(entry(
        KVM_IDENTITY_MAP_START,
        KVM_IDENTITY_MAP_END,
        E820Kind::Reserved,
    ));
    if above_4g > 0 {
        table.push(entry(FOUR_GIB, FOUR_GIB + above_4g, E820Kind::Ram));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_split_follows_i440fx() {
        assert_eq!(pc_ram_split(128 * MIB), (128 * MIB, 0));
        // 3 GiB is under max-ram-below-4g (3.5 GiB): all of it stays low.
        assert_eq!(pc_ram_split(3 * GIB), (3 * GIB, 0));
        // From 3.5 GiB on, gigabyte_align splits at 3 GiB.
        assert_eq!(pc_ram_split(4 * GIB), (3 * GIB, GIB));
        assert_eq!(pc_ram_split(5 * GIB), (3 * GIB, 2 * GIB));
        assert_eq!(pc_ram_split(0xe000_0000), (3 * GIB, 512 * MIB));
        assert_eq!(pc_ram_split(0xdfff_f000), (0xdfff_f000, 0));
    }

    fn ranges(t: &[E820Entry]) -> Vec<(u64, u64, E820Kind)> {
        t.iter().map(|e| (e.addr, e.end(), e.kind)).collect()
    }

    #[test]
    fn table_for_128m() {
        let (lo, hi) = pc_ram_split(128 * MIB);
        assert_eq!(
            ranges(&pc_e820_table(lo, hi)),
            vec![
                (0, 0x9fc00, E820Kind::Ram),
                (0x9fc00, 0xa0000, E820Kind::Reserved),
                (0xe0000, 0x100000, E820Kind::Reserved),
                (0x100000, 128 * MIB, E820Kind::Ram),
                (0xfeffc000, 0xff000000, E820Kind::Reserved),
            ]
        );
    }

    #[test]
    fn table_for_5g_has_high_ram() {
        let (lo, hi) = pc_ram_split(5 * GIB);
        let t = pc_e820_table(lo, hi);
        assert_eq!(t.len(), 6);
        assert_eq!(
            (t[3].addr, t[3].end(), t[3].kind),
            (0x100000, 3 * GIB, E820Kind::Ram)
        );
        assert_eq!(
            (t[5].addr, t[5].end(), t[5].kind),
            (4 * GIB, 6 * GIB, E820Kind::Ram)
        );
        // Sorted and disjoint.
        for w in t.windows(2) {
            assert!(w[0].end() <= w[1].addr, "{w:?}");
        }
        // The RAM adds up to -m.
        let ram: u64 = t
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 5 * GIB - 0x100000 + 0x9fc00);
    }

    #[test]
    fn table_for_3g_and_4g() {
        let t = pc_e820_table(3 * GIB, 0);
        assert_eq!(t.len(), 5);
        assert_eq!(t[3].end(), 3 * GIB);
        let (lo, hi) = pc_ram_split(4 * GIB);
        let t = pc_e820_table(lo, hi);
        assert_eq!(t.last().unwrap().addr, 4 * GIB);
        assert_eq!(t.last().unwrap().size, GIB);
    }
}
