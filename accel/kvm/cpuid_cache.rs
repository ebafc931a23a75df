//! The cache and TLB descriptions a guest reads from CPUID (leaves 2, 4, 0x80000005,
//! 0x80000006, 0x8000001D), as QEMU gives them: a model's own caches (the EPYC family) or
//! QEMU's fixed "legacy" ones, whatever the host has, so that a guest sees the same on
//! every host it may migrate to. QEMU passes the host's through only with
//! `host-cache-info=on`.
//!
//! The values and encodings are QEMU's `target/i386/cpu.c` (`legacy_*_cache`,
//! `epyc_*_cache_info`, `cpuid2_cache_descriptors`, `encode_cache_cpuid4`,
//! `encode_cache_cpuid80000005`/`6`, `encode_cache_cpuid8000001d`); tests/cpu_models.rs
//! compares a guest's view with QEMU 7.2's under the same KVM.

use hw::i386::x86_cpu_models::ModelCache;
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

/// QEMU's leaf-2 L2 (`legacy_l2_cache_cpuid2`), which differs from leaf 4's.
const L2_CPUID2: CacheInfo = CacheInfo {
    level: 2,
    size: 2 * MIB,
    associativity: 8,
    ..BASE
};

/// The EPYC family's caches (QEMU's `epyc_*_cache_info`): L1d 32 KiB 8-way, L1i, L2 and
/// L3 per generation.
const EPYC_L1D: CacheInfo = CacheInfo {
    lines_per_tag: 1,
    ..L1D
};
const EPYC_L1I_64K: CacheInfo = CacheInfo {
    kind: CacheType::Instruction,
    size: 64 * KIB,
    associativity: 4,
    sets: 256,
    ..EPYC_L1D
};
const EPYC_L1I_32K: CacheInfo = CacheInfo {
    kind: CacheType::Instruction,
    ..EPYC_L1D
};
const EPYC_L2_512K: CacheInfo = CacheInfo {
    level: 2,
    size: 512 * KIB,
    associativity: 8,
    sets: 1024,
    lines_per_tag: 1,
    ..BASE
};
const EPYC_L2_1M: CacheInfo = CacheInfo {
    size: MIB,
    sets: 2048,
    ..EPYC_L2_512K
};
const EPYC_L3_8M: CacheInfo = CacheInfo {
    size: 8 * MIB,
    sets: 8192,
    ..L3
};
const EPYC_L3_16M: CacheInfo = L3;
const EPYC_L3_32M: CacheInfo = CacheInfo {
    size: 32 * MIB,
    sets: 32768,
    ..L3
};
/// The later versions' L3 without complex indexing.
const fn simple_indexing(l3: CacheInfo) -> CacheInfo {
    CacheInfo {
        complex_indexing: false,
        ..l3
    }
}
const EPYC_V4_L3: CacheInfo = simple_indexing(EPYC_L3_8M);
const EPYC_ROME_V3_L3: CacheInfo = simple_indexing(EPYC_L3_16M);
const EPYC_L3_32M_SIMPLE: CacheInfo = simple_indexing(EPYC_L3_32M);

/// L1d, L1i, L2, L3.
type Caches = [&'static CacheInfo; 4];

/// What each group of leaves describes (QEMU's `cache_info_cpuid2`, `cache_info_cpuid4`,
/// `cache_info_amd`): the legacy sets differ from leaf to leaf, a model's are one.
pub(crate) struct CacheSet {
    cpuid2: Caches,
    cpuid4: Caches,
    amd: Caches,
}

const LEGACY: CacheSet = CacheSet {
    cpuid2: [&L1D, &L1I, &L2_CPUID2, &L3],
    cpuid4: [&L1D, &L1I, &L2, &L3],
    amd: [&L1D_AMD, &L1I_AMD, &L2_AMD, &L3],
};

const fn one_set(caches: Caches) -> CacheSet {
    CacheSet {
        cpuid2: caches,
        cpuid4: caches,
        amd: caches,
    }
}

/// The caches a model shows: its own, else QEMU's legacy ones.
pub(crate) fn cache_set(model: Option<ModelCache>) -> &'static CacheSet {
    const EPYC: CacheSet = one_set([&EPYC_L1D, &EPYC_L1I_64K, &EPYC_L2_512K, &EPYC_L3_8M]);
    const EPYC_V4: CacheSet = one_set([&EPYC_L1D, &EPYC_L1I_64K, &EPYC_L2_512K, &EPYC_V4_L3]);
    const ROME: CacheSet = one_set([&EPYC_L1D, &EPYC_L1I_32K, &EPYC_L2_512K, &EPYC_L3_16M]);
    const ROME_V3: CacheSet = one_set([&EPYC_L1D, &EPYC_L1I_32K, &EPYC_L2_512K, &EPYC_ROME_V3_L3]);
    const MILAN: CacheSet = one_set([&EPYC_L1D, &EPYC_L1I_32K, &EPYC_L2_512K, &EPYC_L3_32M]);
    const MILAN_V2: CacheSet =
        one_set([&EPYC_L1D, &EPYC_L1I_32K, &EPYC_L2_512K, &EPYC_L3_32M_SIMPLE]);
    const GENOA: CacheSet = one_set([&EPYC_L1D, &EPYC_L1I_32K, &EPYC_L2_1M, &EPYC_L3_32M_SIMPLE]);
    match model {
        None => &LEGACY,
        Some(ModelCache::Epyc) => &EPYC,
        Some(ModelCache::EpycV4) => &EPYC_V4,
        Some(ModelCache::EpycRome) => &ROME,
        Some(ModelCache::EpycRomeV3) => &ROME_V3,
        Some(ModelCache::EpycMilan) => &MILAN,
        Some(ModelCache::EpycMilanV2) => &MILAN_V2,
        Some(ModelCache::EpycGenoa) => &GENOA,
    }
}

/// Leaf 2's one-byte descriptors QEMU knows (`cpuid2_cache_descriptors`, from the Intel
/// SDM): `(descriptor, level, type, size, ways, line size)`.
const LEAF2_DESCRIPTORS: &[(u32, u32, CacheType, u32, u32, u32)] = {
    use CacheType::{Data as D, Instruction as I, Unified as U};
    &[
        (0x06, 1, I, 8 * KIB, 4, 32),
        (0x08, 1, I, 16 * KIB, 4, 32),
        (0x09, 1, I, 32 * KIB, 4, 64),
        (0x0a, 1, D, 8 * KIB, 2, 32),
        (0x0c, 1, D, 16 * KIB, 4, 32),
        (0x0d, 1, D, 16 * KIB, 4, 64),
        (0x0e, 1, D, 24 * KIB, 6, 64),
        (0x1d, 2, U, 128 * KIB, 2, 64),
        (0x21, 2, U, 256 * KIB, 8, 64),
        (0x24, 2, U, MIB, 16, 64),
        (0x2c, 1, D, 32 * KIB, 8, 64),
        (0x30, 1, I, 32 * KIB, 8, 64),
        (0x41, 2, U, 128 * KIB, 4, 32),
        (0x42, 2, U, 256 * KIB, 4, 32),
        (0x43, 2, U, 512 * KIB, 4, 32),
        (0x44, 2, U, MIB, 4, 32),
        (0x45, 2, U, 2 * MIB, 4, 32),
        (0x46, 3, U, 4 * MIB, 4, 64),
        (0x47, 3, U, 8 * MIB, 8, 64),
        (0x48, 2, U, 3 * MIB, 12, 64),
        (0x4a, 3, U, 6 * MIB, 12, 64),
        (0x4b, 3, U, 8 * MIB, 16, 64),
        (0x4c, 3, U, 12 * MIB, 12, 64),
        (0x4d, 3, U, 16 * MIB, 16, 64),
        (0x4e, 2, U, 6 * MIB, 24, 64),
        (0x60, 1, D, 16 * KIB, 8, 64),
        (0x66, 1, D, 8 * KIB, 4, 64),
        (0x67, 1, D, 16 * KIB, 4, 64),
        (0x68, 1, D, 32 * KIB, 4, 64),
        (0x78, 2, U, MIB, 4, 64),
        (0x7d, 2, U, 2 * MIB, 8, 64),
        (0x7f, 2, U, 512 * KIB, 2, 64),
        (0x80, 2, U, 512 * KIB, 8, 64),
        (0x82, 2, U, 256 * KIB, 8, 32),
        (0x83, 2, U, 512 * KIB, 8, 32),
        (0x84, 2, U, MIB, 8, 32),
        (0x85, 2, U, 2 * MIB, 8, 32),
        (0x86, 2, U, 512 * KIB, 4, 64),
        (0x87, 2, U, MIB, 8, 64),
        (0xd0, 3, U, 512 * KIB, 4, 64),
        (0xd1, 3, U, MIB, 4, 64),
        (0xd2, 3, U, 2 * MIB, 4, 64),
        (0xd6, 3, U, MIB, 8, 64),
        (0xd7, 3, U, 2 * MIB, 8, 64),
        (0xd8, 3, U, 4 * MIB, 8, 64),
        (0xdc, 3, U, 3 * MIB / 2, 12, 64),
        (0xdd, 3, U, 3 * MIB, 12, 64),
        (0xde, 3, U, 6 * MIB, 12, 64),
        (0xe2, 3, U, 2 * MIB, 16, 64),
        (0xe3, 3, U, 4 * MIB, 16, 64),
        (0xe4, 3, U, 8 * MIB, 16, 64),
        (0xea, 3, U, 12 * MIB, 24, 64),
        (0xeb, 3, U, 18 * MIB, 24, 64),
        (0xec, 3, U, 24 * MIB, 24, 64),
    ]
};

/// "Use leaf 4": the descriptor of a cache leaf 2 has none for.
const DESCRIPTOR_UNAVAILABLE: u32 = 0xff;

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
    /// QEMU's `cpuid2_cache_descriptor`.
    fn leaf2_descriptor(&self) -> u32 {
        LEAF2_DESCRIPTORS
            .iter()
            .find(|&&(_, level, kind, size, ways, line)| {
                (level, kind, size, ways, line)
                    == (
                        self.level,
                        self.kind,
                        self.size,
                        self.associativity,
                        self.line_size,
                    )
            })
            .map_or(DESCRIPTOR_UNAVAILABLE, |d| d.0)
    }
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

/// Leaf 2 (QEMU's `cpu_x86_cpuid` case 2): one call, a descriptor byte per cache.
pub(crate) fn leaf_2(set: &CacheSet, l3_cache: bool) -> kvm_cpuid_entry2 {
    let [l1d, l1i, l2, l3] = set.cpuid2;
    let ecx = if l3_cache { l3.leaf2_descriptor() } else { 0 };
    let edx =
        (l1d.leaf2_descriptor() << 16) | (l1i.leaf2_descriptor() << 8) | l2.leaf2_descriptor();
    entry(2, 0, [1, 0, ecx, edx], false)
}

/// Leaf 4's subleaves, the terminating null one included (QEMU's case 4).
pub(crate) fn leaf_4(set: &CacheSet, topo: CacheTopology, l3_cache: bool) -> Vec<kvm_cpuid_entry2> {
    let [l1d, l1i, l2, l3] = set.cpuid4;
    let mut caches = vec![(l1d, 1), (l1i, 1), (l2, topo.threads)];
    if l3_cache {
        caches.push((l3, 1 << topo.package_bits));
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
pub(crate) fn leaf_8000_0005(set: &CacheSet) -> kvm_cpuid_entry2 {
    let [l1d, l1i, _, _] = set.amd;
    let regs = [
        L1_TLB_2M,
        L1_TLB_4K,
        l1d.leaf_8000_0005(),
        l1i.leaf_8000_0005(),
    ];
    entry(0x8000_0005, 0, regs, false)
}

/// Leaf 0x80000006: L2 TLBs, the AMD L2 and L3 (QEMU's `encode_cache_cpuid80000006`).
pub(crate) fn leaf_8000_0006(set: &CacheSet, l3_cache: bool) -> kvm_cpuid_entry2 {
    let [_, _, l2, l3] = set.amd;
    let ecx = ((l2.size / KIB) << 16)
        | (amd_assoc(l2.associativity) << 12)
        | (l2.lines_per_tag << 8)
        | l2.line_size;
    let edx = if l3_cache {
        ((l3.size / (512 * KIB)) << 18)
            | (amd_assoc(l3.associativity) << 12)
            | (l3.lines_per_tag << 8)
            | l3.line_size
    } else {
        0
    };
    entry(0x8000_0006, 0, [L2_TLB_2M, L2_TLB_4K, ecx, edx], false)
}

/// Leaf 0x8000001D's subleaves (AMD's leaf 4), the null one included (QEMU's
/// `encode_cache_cpuid8000001d` over its AMD caches, one node per package). QEMU lists
/// the L3 here even with `l3-cache=off`.
pub(crate) fn leaf_8000_001d(set: &CacheSet, topo: CacheTopology) -> Vec<kvm_cpuid_entry2> {
    let caches = set.amd;
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
    /// CPUID, read through isa-debugcon), except leaf 0x8000001D, which is past this Intel
    /// host's xlevel: its values follow QEMU's encode_cache_cpuid8000001d by hand.
    #[test]
    fn legacy_leaves_are_qemus() {
        let topo = CacheTopology {
            cores: 2,
            threads: 2,
            package_bits: 2,
        };
        let legacy = cache_set(None);
        assert_eq!(regs(&leaf_2(legacy, true)), [1, 0, 0x4d, 0x002c_307d]);
        let leaf4: Vec<_> = leaf_4(legacy, topo, true).iter().map(regs).collect();
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
            regs(&leaf_8000_0005(legacy)),
            [0x01ff_01ff, 0x01ff_01ff, 0x4002_0140, 0x4002_0140]
        );
        assert_eq!(
            regs(&leaf_8000_0006(legacy, true)),
            [0, 0x4200_4200, 0x0200_8140, 0x0080_8140]
        );
        let amd: Vec<_> = leaf_8000_001d(legacy, topo).iter().map(regs).collect();
        assert_eq!(amd[0], [0x4121, 0x0040_003f, 0x1ff, 1]);
        assert_eq!(amd[3], [0xc163, 0x03c0_003f, 0x3fff, 6]);
        assert_eq!(amd[4], [0; 4]);
        // l3-cache=off: no L3 anywhere.
        assert_eq!(leaf_2(legacy, false).ecx, 0);
        assert_eq!(leaf_4(legacy, topo, false).len(), 4);
        assert_eq!(leaf_8000_0006(legacy, false).edx, 0);
    }

    /// What QEMU 7.2 gave `-cpu EPYC` (Intel host vendor) and `-cpu EPYC-Milan` guests with
    /// `-smp 4,threads=2` under KVM: leaf 2 has no descriptor for EPYC's 64 KiB 4-way L1i
    /// or Milan's 32 MiB L3 (0xff).
    #[test]
    fn epyc_leaves_are_qemus() {
        let topo = CacheTopology {
            cores: 2,
            threads: 2,
            package_bits: 2,
        };
        let epyc = cache_set(Some(ModelCache::Epyc));
        assert_eq!(regs(&leaf_2(epyc, true)), [1, 0, 0x4b, 0x002c_ff80]);
        let leaf4: Vec<_> = leaf_4(epyc, topo, true).iter().map(regs).collect();
        assert_eq!(
            leaf4,
            [
                [0x0400_0121, 0x01c0_003f, 0x3f, 1],
                [0x0400_0122, 0x00c0_003f, 0xff, 1],
                [0x0400_4043, 0x01c0_003f, 0x3ff, 0],
                [0x0400_c163, 0x03c0_003f, 0x1fff, 6],
                [0; 4],
            ]
        );
        assert_eq!(
            regs(&leaf_8000_0005(epyc)),
            [0x01ff_01ff, 0x01ff_01ff, 0x2008_0140, 0x4004_0140]
        );
        assert_eq!(
            regs(&leaf_8000_0006(epyc, true)),
            [0, 0x4200_4200, 0x0200_6140, 0x0040_8140]
        );
        let amd: Vec<_> = leaf_8000_001d(epyc, topo).iter().map(regs).collect();
        assert_eq!(amd[1], [0x4122, 0x00c0_003f, 0xff, 1]);
        assert_eq!(amd[2], [0x4043, 0x01c0_003f, 0x3ff, 0]);
        let milan = cache_set(Some(ModelCache::EpycMilan));
        assert_eq!(regs(&leaf_2(milan, true)), [1, 0, 0xff, 0x002c_3080]);
        assert_eq!(leaf_8000_0006(milan, true).edx, 0x0100_8140);
        // Later versions drop complex L3 indexing (EDX bit 2).
        let milan_v2 = cache_set(Some(ModelCache::EpycMilanV2));
        assert_eq!(leaf_4(milan_v2, topo, true)[3].edx, 2);
    }
}
