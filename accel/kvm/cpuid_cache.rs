//! The cache and TLB descriptions a guest reads from CPUID (leaves 2, 4, 0x80000005,
//! 0x80000006, 0x8000001D), as QEMU gives them: its fixed "legacy" caches, whatever the
//! host has, so that a guest sees the same on every host it may migrate to. QEMU passes
//! the host's through only with `host-cache-info=on`.
//!
//! The values and encodings are QEMU 7.2's `target/i386/cpu.c` (`legacy_*_cache`,
//! `encode_cache_cpuid4`, `encode_cache_cpuid80000005`/`6`, `encode_cache_cpuid8000001d`);
//! tests/cpu_models.rs compares a guest's view with QEMU's under the same KVM.

use kvm_bindings::kvm_cpuid_entry2;

/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the entry is for one subleaf.
const SIGNIFICANT_INDEX: u32 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum CacheType {
    Data,
    Instruction,
    Unified,
}

/// QEMU's `CPUCacheInfo`.
struct CacheInfo {
    kind: CacheType,
    level: u32,
    size: u32,
    line_size: u32,
    associativity: u32,
    sets: u32,
    partitions: u32,
    lines_per_tag: u32,
    self_init: bool,
    no_invd_sharing: bool,
    inclusive: bool,
    complex_indexing: bool,
}

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;

const BASE: CacheInfo = CacheInfo {
    kind: CacheType::Unified,
    level: 0,
    size: 0,
    line_size: 64,
    associativity: 0,
    sets: 0,
    partitions: 1,
    lines_per_tag: 0,
    self_init: false,
    no_invd_sharing: false,
    inclusive: false,
    complex_indexing: false,
};

const L1D: CacheInfo = CacheInfo {
    kind: CacheType::Data,
    level: 1,
    size: 32 * KIB,
    associativity: 8,
    sets: 64,
    self_init: true,
    no_invd_sharing: true,
    ..BASE
};
const L1I: CacheInfo = CacheInfo {
    kind: CacheType::Instruction,
    ..L1D
};
const L2: CacheInfo = CacheInfo {
    level: 2,
    size: 4 * MIB,
    associativity: 16,
    sets: 4096,
    self_init: true,
    no_invd_sharing: true,
    ..BASE
};
const L3: CacheInfo = CacheInfo {
    level: 3,
    size: 16 * MIB,
    associativity: 16,
    sets: 16384,
    lines_per_tag: 1,
    self_init: true,
    inclusive: true,
    complex_indexing: true,
    ..BASE
};
// The AMD leaves describe other caches than leaves 2 and 4 (QEMU's FIXMEs say so).
const L1D_AMD: CacheInfo = CacheInfo {
    size: 64 * KIB,
    associativity: 2,
    sets: 512,
    lines_per_tag: 1,
    ..L1D
};
const L1I_AMD: CacheInfo = CacheInfo {
    kind: CacheType::Instruction,
    ..L1D_AMD
};
const L2_AMD: CacheInfo = CacheInfo {
    level: 2,
    size: 512 * KIB,
    associativity: 16,
    sets: 512,
    lines_per_tag: 1,
    ..BASE
};

/// Leaf 2's one-byte descriptors of the legacy caches (Intel SDM table 3-12): 0x2c L1d
/// 32 KiB 8-way, 0x30 L1i 32 KiB 8-way, 0x7d L2 2 MiB 8-way (QEMU's leaf 2 L2 differs
/// from leaf 4's), 0x4d L3 16 MiB 16-way; all with 64-byte lines.
const LEAF2_L1D: u32 = 0x2c;
const LEAF2_L1I: u32 = 0x30;
const LEAF2_L2: u32 = 0x7d;
const LEAF2_L3: u32 = 0x4d;

// TLBs of leaves 0x80000005/6 (QEMU's L1_DTLB_* ... L2_ITLB_*).
const L1_TLB_2M: u32 = (1 << 24) | (255 << 16) | (1 << 8) | 255;
const L1_TLB_4K: u32 = (1 << 24) | (255 << 16) | (1 << 8) | 255;
const L2_TLB_2M: u32 = 0;
const L2_TLB_4K: u32 = (amd_assoc(4) << 28) | (512 << 16) | (amd_assoc(4) << 12) | 512;

/// QEMU's `AMD_ENC_ASSOC`.
const fn amd_assoc(ways: u32) -> u32 {
    match ways {
        0 | 1 | 2 | 4 => ways,
        8 => 0x6,
        16 => 0x8,
        32 => 0xa,
        48 => 0xb,
        64 => 0xc,
        96 => 0xd,
        128 => 0xe,
        0xff => 0xf,
        _ => 0,
    }
}

impl CacheInfo {
    /// EAX bits 0-8 of leaves 4 and 0x8000001D: type, level, self-initialising.
    fn type_level(&self) -> u32 {
        let kind = match self.kind {
            CacheType::Data => 1,
            CacheType::Instruction => 2,
            CacheType::Unified => 3,
        };
        kind | (self.level << 5) | (u32::from(self.self_init) << 8)
    }
    /// EBX, ECX and EDX of leaves 4 and 0x8000001D.
    fn geometry(&self) -> (u32, u32, u32) {
        let ebx =
            (self.line_size - 1) | ((self.partitions - 1) << 12) | ((self.associativity - 1) << 22);
        let edx = u32::from(self.no_invd_sharing)
            | (u32::from(self.inclusive) << 1)
            | (u32::from(self.complex_indexing) << 2);
        (ebx, self.sets - 1, edx)
    }
    /// QEMU's `encode_cache_cpuid80000005`.
    fn leaf_8000_0005(&self) -> u32 {
        ((self.size / KIB) << 24)
            | (self.associativity << 16)
            | (self.lines_per_tag << 8)
            | self.line_size
    }
}

/// The guest's topology as the cache leaves describe it.
#[derive(Clone, Copy)]
pub(crate) struct CacheTopology {
    pub cores: u32,
    pub threads: u32,
    /// Bits of the APIC ID below the package (QEMU's `apicid_die_offset` with one die).
    pub package_bits: u32,
}

fn entry(function: u32, index: u32, regs: [u32; 4], indexed: bool) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: if indexed { SIGNIFICANT_INDEX } else { 0 },
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Leaf 2 (QEMU's `cpu_x86_cpuid` case 2): one call, the legacy descriptors.
pub(crate) fn leaf_2(l3_cache: bool) -> kvm_cpuid_entry2 {
    let ecx = if l3_cache { LEAF2_L3 } else { 0 };
    let edx = (LEAF2_L1D << 16) | (LEAF2_L1I << 8) | LEAF2_L2;
    entry(2, 0, [1, 0, ecx, edx], false)
}

/// Leaf 4's subleaves, the terminating null one included (QEMU's case 4).
pub(crate) fn leaf_4(topo: CacheTopology, l3_cache: bool) -> Vec<kvm_cpuid_entry2> {
    let mut caches = vec![(&L1D, 1), (&L1I, 1), (&L2, topo.threads)];
    if l3_cache {
        caches.push((&L3, 1 << topo.package_bits));
    }
    let cores_field = (topo.cores.max(1) - 1) << 26;
    let mut entries: Vec<_> = caches
        .iter()
        .enumerate()
        .map(|(i, (cache, sharing))| {
            let (ebx, ecx, edx) = cache.geometry();
            let eax = cache.type_level() | cores_field | ((sharing - 1) << 14);
            entry(4, i as u32, [eax, ebx, ecx, edx], true)
        })
        .collect();
    entries.push(entry(4, caches.len() as u32, [0; 4], true));
    entries
}

/// Leaf 0x80000005: L1 TLBs and the AMD L1 caches.
pub(crate) fn leaf_8000_0005() -> kvm_cpuid_entry2 {
    let regs = [
        L1_TLB_2M,
        L1_TLB_4K,
        L1D_AMD.leaf_8000_0005(),
        L1I_AMD.leaf_8000_0005(),
    ];
    entry(0x8000_0005, 0, regs, false)
}

/// Leaf 0x80000006: L2 TLBs, the AMD L2 and the legacy L3 (QEMU's
/// `encode_cache_cpuid80000006`).
pub(crate) fn leaf_8000_0006(l3_cache: bool) -> kvm_cpuid_entry2 {
    let ecx = ((L2_AMD.size / KIB) << 16)
        | (amd_assoc(L2_AMD.associativity) << 12)
        | (L2_AMD.lines_per_tag << 8)
        | L2_AMD.line_size;
    let edx = if l3_cache {
        ((L3.size / (512 * KIB)) << 18)
            | (amd_assoc(L3.associativity) << 12)
            | (L3.lines_per_tag << 8)
            | L3.line_size
    } else {
        0
    };
    entry(0x8000_0006, 0, [L2_TLB_2M, L2_TLB_4K, ecx, edx], false)
}

/// Leaf 0x8000001D's subleaves (AMD's leaf 4), the null one included (QEMU's
/// `encode_cache_cpuid8000001d` over its AMD caches, one node per package).
pub(crate) fn leaf_8000_001d(topo: CacheTopology, l3_cache: bool) -> Vec<kvm_cpuid_entry2> {
    let mut caches = vec![&L1D_AMD, &L1I_AMD, &L2_AMD];
    if l3_cache {
        caches.push(&L3);
    }
    let mut entries: Vec<_> = caches
        .iter()
        .enumerate()
        .map(|(i, cache)| {
            let sharing = if cache.level == 3 {
                topo.cores * topo.threads
            } else {
                topo.threads
            };
            let (ebx, ecx, edx) = cache.geometry();
            let eax = cache.type_level() | ((sharing.max(1) - 1) << 14);
            entry(0x8000_001d, i as u32, [eax, ebx, ecx, edx], true)
        })
        .collect();
    entries.push(entry(0x8000_001d, caches.len() as u32, [0; 4], true));
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(e: &kvm_cpuid_entry2) -> [u32; 4] {
        [e.eax, e.ebx, e.ecx, e.edx]
    }

    /// What QEMU 7.2 gave a guest with `-cpu host -smp 4,threads=2` under KVM (its guest's
    /// CPUID, read through isa-debugcon).
    #[test]
    fn legacy_leaves_are_qemus() {
        let topo = CacheTopology {
            cores: 2,
            threads: 2,
            package_bits: 2,
        };
        assert_eq!(regs(&leaf_2(true)), [1, 0, 0x4d, 0x002c_307d]);
        let leaf4: Vec<_> = leaf_4(topo, true).iter().map(regs).collect();
        assert_eq!(
            leaf4,
            [
                [0x0400_0121, 0x01c0_003f, 0x3f, 1],
                [0x0400_0122, 0x01c0_003f, 0x3f, 1],
                [0x0400_4143, 0x03c0_003f, 0xfff, 1],
                [0x0400_c163, 0x03c0_003f, 0x3fff, 6],
                [0; 4],
            ]
        );
        assert_eq!(
            regs(&leaf_8000_0005()),
            [0x01ff_01ff, 0x01ff_01ff, 0x4002_0140, 0x4002_0140]
        );
        assert_eq!(
            regs(&leaf_8000_0006(true)),
            [0, 0x4200_4200, 0x0200_8140, 0x0080_8140]
        );
        let amd: Vec<_> = leaf_8000_001d(topo, true).iter().map(regs).collect();
        assert_eq!(amd[0], [0x4121, 0x0040_003f, 0x1ff, 1]);
        assert_eq!(amd[3], [0xc163, 0x03c0_003f, 0x3fff, 6]);
        assert_eq!(amd[4], [0; 4]);
        // l3-cache=off: no L3 anywhere.
        assert_eq!(leaf_2(false).ecx, 0);
        assert_eq!(leaf_4(topo, false).len(), 4);
        assert_eq!(leaf_8000_0006(false).edx, 0);
    }
}
