//! x86 vCPU set-up under KVM (QEMU's `target/i386/kvm/kvm.c`: `kvm_arch_init_vcpu`,
//! `kvm_put_msrs`) and QEMU's `info registers` dump.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::OnceLock;

use hw::core::accel_ops::{CpuDumpRegisters, DumpSegment};
use hw::core::machine::{machine_state, SmpConfig};
use hw::i386::x86_cpu::{
    expand_features, feature_bits, features, Feature, IdentityOverrides, Reg, X86Cpu, X86CpuModel,
};
use hw::i386::x86_cpu_features::{FeatureWord, FEATURE_WORDS};

use super::cpuid_cache;
use super::hyperv::{self, HypervSetup};
pub use kvm_bindings::CpuId;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use qom::Object;

use hw::core::os_error::errno_text;

use crate::kvm::kvm_all::{ioctl_error, KvmError, KvmVm};

fn reg_mut(entry: &mut kvm_bindings::kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

fn reg_of(entry: &kvm_bindings::kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Reg::Eax => entry.eax,
        Reg::Ebx => entry.ebx,
        Reg::Ecx => entry.ecx,
        Reg::Edx => entry.edx,
    }
}

fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The value of a feature word in a CPUID table (0 when the leaf is absent).
fn word_value(cpuid: &CpuId, word: &FeatureWord) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == word.leaf && e.index == word.subleaf.unwrap_or(0))
        .map_or(0, |e| reg_of(e, word.reg))
}

/// Whether the accelerator can give the guest `feature`. The hypervisor bit is the VMM's
/// to set, whatever KVM lists (QEMU sets it too).
pub fn feature_supported(supported: &CpuId, feature: &Feature) -> bool {
    feature.name == "hypervisor" || word_value(supported, feature.word) & (1 << feature.bit) != 0
}

/// KVM's supported CPUID of this host (`KVM_GET_SUPPORTED_CPUID` on `/dev/kvm`), for the
/// monitor's model queries; read once.
pub fn host_supported_cpuid() -> Result<&'static CpuId, KvmError> {
    static HOST: OnceLock<Result<CpuId, String>> = OnceLock::new();
    HOST.get_or_init(|| {
        let kvm = Kvm::new().map_err(|e| errno_text(e.errno()))?;
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| errno_text(e.errno()))
    })
    .as_ref()
    .map_err(|reason| KvmError::Open(reason.clone()))
}

/// Features whose value a migration cannot carry to another host (QEMU's
/// `unmigratable_flags`): the TSC's invariance belongs to the host's clock.
const UNMIGRATABLE: &[&str] = &["invtsc"];

/// Features a model may have whatever KVM reports (QEMU's kvm_arch_get_supported_cpuid:
/// TOPOEXT only describes leaves the VMM builds), which `max`/`host` never turn on by
/// themselves (its `no_autoenable_flags`).
const VMM_PROVIDED: &[&str] = &["topoext"];

/// The features a CPU ends up with on this accelerator: a named model's requested
/// features, or everything KVM supports for `max`/`host` (minus `-feat`), and the
/// requested features the host lacks (QEMU's `x86_cpu_filter_features`).
pub fn filtered_features(
    model: Option<&X86CpuModel>,
    overrides: &[(&'static str, bool)],
    migratable: bool,
    supported: &CpuId,
) -> (BTreeSet<&'static str>, Vec<&'static Feature>) {
    let requested = match model {
        Some(m) if m.passthrough() => {
            // What a migration can keep (QEMU's `migratable=on`, the default); `+invtsc`
            // or `migratable=off` adds it back.
            let all = features()
                .iter()
                .filter(|f| {
                    feature_supported(supported, f)
                        && (!migratable || !UNMIGRATABLE.contains(&f.name))
                        && !VMM_PROVIDED.contains(&f.name)
                })
                .map(|f| f.name)
                .collect();
            expand_features(all, overrides)
        }
        Some(m) => expand_features(m.features.clone(), overrides),
        None => expand_features(BTreeSet::new(), overrides),
    };
    let mut missing = Vec::new();
    let mut granted = BTreeSet::new();
    for name in requested {
        let mut all_bits = true;
        for f in feature_bits(name) {
            if !feature_supported(supported, f) && !VMM_PROVIDED.contains(&f.name) {
                all_bits = false;
                missing.push(f);
            }
        }
        if all_bits {
            granted.insert(name);
        }
    }
    // In QEMU's order: word by word, bit by bit.
    let position = |f: &Feature| FEATURE_WORDS.iter().position(|w| w.id == f.word.id);
    missing.sort_by_key(|f| (position(f), f.bit));
    (granted, missing)
}

/// QEMU's `x86_cpu_adjust_feat_level` (with `full-cpuid-auto-level`): the lowest basic and
/// extended limits that reach every leaf a requested feature lives in, so a model version
/// that adds a leaf-0x80000021 feature (`EPYC-Milan-v2`) raises its `xlevel`.
fn min_levels(model: &X86CpuModel, overrides: &[(&'static str, bool)]) -> (u32, u32) {
    let requested = expand_features(model.features.clone(), overrides);
    let mut level = 0;
    let mut xlevel = 0;
    for f in requested.iter().flat_map(|name| feature_bits(name)) {
        let leaf = f.word.leaf;
        if (0x8000_0000..0xC000_0000).contains(&leaf) {
            xlevel = xlevel.max(leaf);
        } else if leaf < 0x4000_0000 {
            level = level.max(leaf);
        }
    }
    (level, xlevel)
}

/// Bits of leaf 1 EDX that AMD CPUs repeat in leaf 0x80000001 EDX (QEMU's
/// `CPUID_EXT2_AMD_ALIASES`).
const AMD_ALIASES: u32 = 0x0183_F3FF;

/// A CPU's configuration as `build_cpuid` reads it.
struct CpuConfig {
    model: Option<&'static X86CpuModel>,
    overrides: Vec<(&'static str, bool)>,
    identity: IdentityOverrides,
    vendor: Option<String>,
    apic_id: u32,
    phys_bits: u32,
    host_phys_bits: bool,
    l3_cache: bool,
    host_cache_info: bool,
    migratable: bool,
    check: bool,
    enforce: bool,
    kvm_leaves: bool,
}

impl CpuConfig {
    fn of(cpu: &Object) -> Self {
        let x86 = cpu.downcast::<X86Cpu>();
        CpuConfig {
            model: x86.and_then(X86Cpu::model),
            overrides: x86.map(X86Cpu::feature_overrides).unwrap_or_default(),
            identity: x86.map(X86Cpu::identity_overrides).unwrap_or_default(),
            // Under KVM a model keeps the host's vendor unless `vendor=` is given (QEMU's
            // host_cpu_instance_init): guests use SYSENTER or SYSCALL in compatibility
            // mode by vendor, and the host's CPU only runs its own vendor's.
            vendor: x86.and_then(X86Cpu::vendor).filter(|v| v.len() == 12),
            apic_id: x86.map_or(0, X86Cpu::apic_id),
            phys_bits: x86.map_or(0, X86Cpu::phys_bits),
            host_phys_bits: x86.is_some_and(X86Cpu::host_phys_bits),
            l3_cache: x86.is_none_or(X86Cpu::l3_cache),
            host_cache_info: x86.is_some_and(X86Cpu::host_cache_info),
            migratable: x86.is_none_or(X86Cpu::migratable),
            check: x86.is_none_or(X86Cpu::check),
            enforce: x86.is_some_and(X86Cpu::enforce),
            kvm_leaves: x86.is_none_or(X86Cpu::kvm_leaves),
        }
    }
}

/// The guest physical address width when neither `phys-bits` nor `host-phys-bits` is
/// given (QEMU's `TCG_PHYS_ADDR_BITS`, which its KVM named models use too).
const DEFAULT_PHYS_BITS: u32 = 40;

/// QEMU's `x86_cpu_filter_features` + `cpu_x86_cpuid`: KVM's supported CPUID, filtered by
/// the model and the command line, with the vCPU's identity and topology. Features the
/// host lacks are warned about (`check`) or refuse the CPU (`enforce`).
pub(crate) fn build_cpuid(
    vm: &KvmVm,
    cpu: &Object,
    smp: SmpConfig,
    hyperv: Option<&HypervSetup>,
) -> Result<CpuId, KvmError> {
    let supported = vm.supported_cpuid()?;
    let cfg = CpuConfig::of(cpu);
    let model = cfg.model;
    let passthrough = model.is_none_or(|m| m.passthrough());
    let (granted, missing) = filtered_features(model, &cfg.overrides, cfg.migratable, supported);
    if cfg.check || cfg.enforce {
        for f in &missing {
            // One warning per feature per VM, not one per vCPU.
            if vm.warned_features.lock().insert(f.name) {
                qom::error_report!(
                    "warning: host doesn't support requested feature: {}",
                    f.describe()
                );
            }
        }
    }
    if cfg.enforce && !missing.is_empty() {
        return Err(KvmError::MissingFeatures);
    }

    let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = supported.as_slice().to_vec();
    // Every named word takes exactly the granted bits: a named model's words are the
    // model's; for max/host that is KVM's bits minus what -feat took away.
    for word in FEATURE_WORDS {
        let mut value = 0;
        for f in features().iter().filter(|f| f.word.id == word.id) {
            if granted.contains(f.name) {
                value |= 1 << f.bit;
            }
        }
        for entry in entries.iter_mut() {
            if entry.function == word.leaf && entry.index == word.subleaf.unwrap_or(0) {
                let r = reg_mut(entry, word.reg);
                if passthrough {
                    // Keep KVM's unnamed bits; named ones as granted.
                    let named: u32 = word
                        .names
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| !n.is_empty())
                        .fold(0, |m, (bit, _)| m | (1 << bit));
                    *r = (*r & !named) | value;
                } else {
                    *r = value;
                }
            }
        }
    }
    let vendor = guest_vendor(&cfg, &entries);
    let amd = vendor == *b"AuthenticAMD";
    // AMD's 0x80000001 EDX repeats leaf 1's bits (QEMU's realize, after filtering, for every
    // model with an AMD vendor, host and max included).
    if amd {
        let leaf1_edx = entries
            .iter()
            .find(|e| e.function == 1)
            .map_or(0, |e| e.edx);
        for e in entries.iter_mut().filter(|e| e.function == 0x8000_0001) {
            e.edx = (e.edx & !AMD_ALIASES) | (leaf1_edx & AMD_ALIASES);
        }
    }

    // A named model's limits (xlevel 0: no extended leaves, as on a Pentium III), raised to
    // the leaves its requested features live in; max and host keep KVM's.
    let (min_level, min_xlevel) = match model.filter(|m| !m.passthrough()) {
        Some(m) => min_levels(m, &cfg.overrides),
        None => (0, 0),
    };
    let level = cfg.identity.level.or(model
        .filter(|m| !m.passthrough())
        .map(|m| m.level.max(min_level)));
    let xlevel = cfg.identity.xlevel.or(model
        .filter(|m| !m.passthrough())
        .map(|m| m.xlevel.max(min_xlevel)));
    entries.retain(|e| {
        let f = e.function;
        let basic_ok = f >= 0x4000_0000 || level.is_none_or(|l| f <= l);
        let ext_ok = !(0x8000_0000..0xC000_0000).contains(&f) || xlevel.is_none_or(|x| f <= x);
        // kvm=off: no KVM signature and no paravirtual leaves (QEMU's `expose_kvm`).
        let kvm_ok = cfg.kvm_leaves || !(0x4000_0000..0x4000_0100).contains(&f);
        basic_ok && ext_ok && kvm_ok
    });
    if let Some(setup) = hyperv {
        hyperv::place_leaves(&mut entries, setup);
    }

    let host_phys = entries
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(DEFAULT_PHYS_BITS, |e| e.eax & 0xff);
    let phys_bits = if cfg.phys_bits != 0 {
        cfg.phys_bits
    } else if cfg.host_phys_bits || passthrough {
        host_phys
    } else {
        DEFAULT_PHYS_BITS
    };
    let family = cfg
        .identity
        .family
        .or(model.filter(|m| !m.passthrough()).map(|m| m.family));
    let model_number = cfg
        .identity
        .model
        .or(model.filter(|m| !m.passthrough()).map(|m| m.model));
    let stepping = cfg
        .identity
        .stepping
        .or(model.filter(|m| !m.passthrough()).map(|m| m.stepping));
    let model_id = cfg
        .identity
        .model_id
        .clone()
        .or_else(|| model.and_then(|m| m.model_id).map(str::to_string))
        // host and max show the host's brand (QEMU's host_cpu_max_instance_init), which
        // KVM does not always report.
        .or_else(|| passthrough.then(host_brand).flatten());
    let threads_per_socket = smp.cores * smp.threads;
    let intel = vendor == *b"GenuineIntel";
    let la57 = granted.contains("la57");
    let long_mode = granted.contains("lm");
    // Leaf 7's subleaf count follows the features asked for, before the host filtered
    // them (QEMU's cpuid_level_func7 from x86_cpu_expand_features).
    let requested: BTreeSet<&'static str> = granted
        .iter()
        .copied()
        .chain(missing.iter().map(|f| f.name))
        .collect();
    for entry in entries.iter_mut() {
        match entry.function {
            // 0x80000000 repeats the vendor, as QEMU's does (KVM gives zeros on Intel).
            0 | 0x8000_0000 => {
                let word = |i: usize| {
                    u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]])
                };
                entry.ebx = word(0);
                entry.edx = word(4);
                entry.ecx = word(8);
                match (entry.function, level, xlevel) {
                    (0, Some(l), _) => entry.eax = l,
                    (0x8000_0000, _, Some(x)) => entry.eax = x,
                    _ => {}
                }
            }
            1 => {
                let mut eax = entry.eax;
                let old_family = ((eax >> 8) & 0xf) + ((eax >> 20) & 0xff);
                let old_model = ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4);
                let f = family.unwrap_or(old_family);
                let m = model_number.unwrap_or(old_model);
                let s = stepping.unwrap_or(eax & 0xf);
                if family.is_some() || model_number.is_some() || stepping.is_some() {
                    let (base_family, ext_family) =
                        if f > 0x0f { (0x0f, f - 0x0f) } else { (f, 0) };
                    eax = (s & 0xf)
                        | ((m & 0xf) << 4)
                        | (base_family << 8)
                        | (((m >> 4) & 0xf) << 16)
                        | ((ext_family & 0xff) << 20);
                }
                entry.eax = eax;
                // The logical processor count only for more than one (QEMU's rule).
                entry.ebx = (cfg.apic_id << 24) | (8 << 8);
                if threads_per_socket > 1 {
                    entry.ebx |= (threads_per_socket & 0xff) << 16;
                    entry.edx |= 1 << 28;
                } else {
                    entry.edx &= !(1 << 28);
                }
            }
            // The highest subleaf of leaf 7 a named model's features use (QEMU's
            // cpuid_level_func7), not the host's.
            7 if entry.index == 0 => entry.eax = leaf7_max_subleaf(&requested),
            // Host's cache leaves (host-cache-info=on): the host's package, never passed on.
            4 if entry.eax & 0x1f != 0 => {
                entry.eax = (entry.eax & 0x3ff_ffff) | ((smp.cores.saturating_sub(1) & 0x3f) << 26);
            }
            0x8000_0002..=0x8000_0004 => {
                if let Some(id) = &model_id {
                    let mut brand = [0u8; 48];
                    let n = id.len().min(47);
                    brand[..n].copy_from_slice(&id.as_bytes()[..n]);
                    let off = (entry.function - 0x8000_0002) as usize * 16;
                    let word = |i: usize| {
                        u32::from_le_bytes([
                            brand[off + i],
                            brand[off + i + 1],
                            brand[off + i + 2],
                            brand[off + i + 3],
                        ])
                    };
                    entry.eax = word(0);
                    entry.ebx = word(4);
                    entry.ecx = word(8);
                    entry.edx = word(12);
                }
            }
            // Linux takes a non-Intel package's core count from 0x8000_0008 and, without
            // CmpLegacy, reads leaf 1's logical count as threads: both describe this
            // topology, not the host's (QEMU's cpu_x86_cpuid).
            0x8000_0001 if threads_per_socket > 1 && !intel => entry.ecx |= 1 << 1,
            0x8000_0008 => {
                // Linear address bits follow lm and la57, not the host (QEMU's rule).
                let virt_bits = match (long_mode, la57) {
                    (false, _) => 0,
                    (true, false) => 48,
                    (true, true) => 57,
                };
                entry.eax = (phys_bits & 0xff) | (virt_bits << 8);
                entry.ecx = if threads_per_socket > 1 {
                    ((bits_for(smp.threads) + bits_for(smp.cores)) << 12) | (threads_per_socket - 1)
                } else {
                    0
                };
            }
            _ => {}
        }
    }
    set_topology_and_cache_leaves(&mut entries, &cfg, smp, model, amd);
    CpuId::from_entries(&entries).map_err(|_| KvmError::Ioctl {
        what: "KVM_SET_CPUID2",
        reason: "too many CPUID entries".into(),
    })
}

/// The leaves QEMU builds itself rather than take from KVM: the extended topology (leaf
/// 0xB: SMT and core levels; 0x1F, the die level, only for more than one die, which
/// qomvm does not make), the caches (QEMU's fixed ones unless `host-cache-info=on`), and
/// 0x80000001 EAX, the leaf-1 signature.
fn set_topology_and_cache_leaves(
    entries: &mut Vec<kvm_bindings::kvm_cpuid_entry2>,
    cfg: &CpuConfig,
    smp: SmpConfig,
    model: Option<&X86CpuModel>,
    amd: bool,
) {
    let level = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let xlevel = entries
        .iter()
        .find(|e| e.function == 0x8000_0000)
        .map_or(0, |e| e.eax);
    let leaf1_eax = entries
        .iter()
        .find(|e| e.function == 1)
        .map_or(0, |e| e.eax);
    for e in entries.iter_mut().filter(|e| e.function == 0x8000_0001) {
        // No brand ID or package type (an AMD host's KVM passes its own).
        (e.eax, e.ebx) = (leaf1_eax, 0);
    }
    let topo = cpuid_cache::CacheTopology {
        cores: smp.cores,
        threads: smp.threads,
        package_bits: bits_for(smp.threads) + bits_for(smp.cores),
    };
    // QEMU's caches (the model's own or its legacy ones) unless host-cache-info=on.
    let own_caches = !cfg.host_cache_info;
    let caches = cpuid_cache::cache_set(model.and_then(|m| m.cache));
    let mut built = Vec::new();
    if level >= 0xb {
        built.extend(extended_topology(cfg.apic_id, smp));
    }
    if xlevel >= 0x8000_001e {
        built.push(amd_topology(cfg.apic_id, smp));
    }
    if own_caches {
        // QEMU's x-vendor-cpuid-only (on since 6.1): AMD guests get no leaves 2 and 4.
        if level >= 2 {
            built.push(if amd {
                kvm_bindings::kvm_cpuid_entry2 {
                    function: 2,
                    ..Default::default()
                }
            } else {
                cpuid_cache::leaf_2(caches, cfg.l3_cache)
            });
        }
        if level >= 4 && !amd {
            built.extend(cpuid_cache::leaf_4(caches, topo, cfg.l3_cache));
        }
        if xlevel >= 0x8000_0005 {
            built.push(cpuid_cache::leaf_8000_0005(caches));
        }
        if xlevel >= 0x8000_0006 {
            built.push(cpuid_cache::leaf_8000_0006(caches, cfg.l3_cache));
        }
        if xlevel >= 0x8000_001d {
            built.extend(cpuid_cache::leaf_8000_001d(caches, topo));
        }
    }
    // Leaf 7's subleaves past the highest its EAX announces are not given (QEMU's
    // kvm_arch_init_vcpu lists only those).
    let leaf7_max = entries
        .iter()
        .find(|e| e.function == 7 && e.index == 0)
        .map_or(0, |e| e.eax);
    entries.retain(|e| e.function != 7 || e.index <= leaf7_max);
    // MONITOR/MWAIT (QEMU's `cpu->mwait` without cpu-pm): line sizes unknown,
    // interrupts break MWAIT and MWAIT's extensions are enumerated.
    for e in entries.iter_mut().filter(|e| e.function == 5) {
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 3, 0);
    }
    let replaced = |f: u32| {
        f == 0xb
            || f == 0x1f
            || f == 0x8000_001e
            || (own_caches && matches!(f, 2 | 4 | 0x8000_0005 | 0x8000_0006 | 0x8000_001d))
    };
    entries.retain(|e| !replaced(e.function));
    entries.extend(built);
}

/// The highest leaf-7 subleaf holding one of `features`.
fn leaf7_max_subleaf(features_on: &BTreeSet<&'static str>) -> u32 {
    features()
        .iter()
        .filter(|f| f.leaf() == 7 && features_on.contains(f.name))
        .map(|f| f.subleaf())
        .max()
        .unwrap_or(0)
}

/// The host's brand string, from the `cpuid` instruction.
fn host_brand() -> Option<String> {
    let bytes: Vec<u8> = (0x8000_0002u32..=0x8000_0004)
        .flat_map(|leaf| {
            let r = std::arch::x86_64::__cpuid(leaf);
            [r.eax, r.ebx, r.ecx, r.edx]
        })
        .flat_map(u32::to_le_bytes)
        .take_while(|&b| b != 0)
        .collect();
    let brand = String::from_utf8_lossy(&bytes).into_owned();
    (!brand.is_empty()).then_some(brand)
}

/// Leaf 0x8000001E for one vCPU (QEMU's `encode_topo_cpuid8000001e`, one node per
/// package): its APIC ID, threads per core and core ID, and its package.
fn amd_topology(apic_id: u32, smp: SmpConfig) -> kvm_bindings::kvm_cpuid_entry2 {
    let smt_bits = bits_for(smp.threads);
    let core_bits = bits_for(smp.cores);
    let core_id = (apic_id >> smt_bits) & ((1 << core_bits) - 1);
    let package_id = apic_id >> (smt_bits + core_bits);
    kvm_bindings::kvm_cpuid_entry2 {
        function: 0x8000_001e,
        eax: apic_id,
        ebx: ((smp.threads.max(1) - 1) << 8) | core_id,
        // One die per package: the node ID is the package's (QEMU 5.0 and later).
        ecx: package_id & 0xff,
        ..Default::default()
    }
}

/// Leaf 0xB for one vCPU (QEMU's case 0xB): the SMT level, the core level, then an invalid
/// level that ends the list.
fn extended_topology(apic_id: u32, smp: SmpConfig) -> [kvm_bindings::kvm_cpuid_entry2; 3] {
    let level = |index: u32, shift: u32, count: u32, kind: u32| kvm_bindings::kvm_cpuid_entry2 {
        function: 0xb,
        index,
        flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: count & 0xffff,
        ecx: index | (kind << 8),
        edx: apic_id,
        ..Default::default()
    };
    let smt_bits = bits_for(smp.threads);
    [
        level(0, smt_bits, smp.threads, 1),
        level(
            1,
            smt_bits + bits_for(smp.cores),
            smp.cores * smp.threads,
            2,
        ),
        level(2, 0, 0, 0),
    ]
}

/// The vendor the guest sees: leaf 0's, as `vendor=` set it or KVM gave it.
fn guest_vendor(cfg: &CpuConfig, entries: &[kvm_bindings::kvm_cpuid_entry2]) -> [u8; 12] {
    let mut vendor = [0u8; 12];
    match &cfg.vendor {
        Some(v) => vendor.copy_from_slice(&v.as_bytes()[..12]),
        None => {
            if let Some(e) = entries.iter().find(|e| e.function == 0) {
                vendor[..4].copy_from_slice(&e.ebx.to_le_bytes());
                vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
                vendor[8..].copy_from_slice(&e.ecx.to_le_bytes());
            }
        }
    }
    vendor
}

/// MSRs set for boot (as Firecracker and QEMU's reset do), limited to those KVM lists in
/// `KVM_GET_MSR_INDEX_LIST`: hosts differ, and QEMU aborts on a missing one.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),       // IA32_SYSENTER_CS
    (0x175, 0),       // IA32_SYSENTER_ESP
    (0x176, 0),       // IA32_SYSENTER_EIP
    (0xc000_0081, 0), // STAR
    (0xc000_0082, 0), // LSTAR
    (0xc000_0083, 0), // CSTAR
    (0xc000_0084, 0), // SYSCALL_MASK
    (0xc000_0102, 0), // KERNEL_GS_BASE
    (0x10, 0),        // TSC
    (0x1a0, 1),       // IA32_MISC_ENABLE: fast strings
];

/// MTRRdefType: MTRRs enabled, write-back by default, as firmware leaves them (SeaBIOS,
/// Cloud Hypervisor's boot state). A guest that finds them off also turns off PAT, so
/// it has no write-combining mappings. KVM emulates the MTRRs for every vCPU but leaves
/// them out of `KVM_GET_MSR_INDEX_LIST`; QEMU sets them when CPUID offers MTRRs.
const MTRR_DEF_TYPE: (u32, u64) = (0x2ff, (1 << 11) | 6);

/// MSRs already warned about: one warning per MSR, not per vCPU.
static WARNED_MSRS: parking_lot::Mutex<std::collections::BTreeSet<u32>> =
    parking_lot::Mutex::new(std::collections::BTreeSet::new());

/// QEMU's `kvm_arch_init_vcpu`: the Hyper-V enlightenments (checked against the kernel),
/// CPUID, and Hyper-V's per-vCPU set-up. The rest of the vCPU's state is set by
/// [`reset_vcpu`], which runs before its first `KVM_RUN` and after each system reset.
/// Returns the Hyper-V configuration, which resets need.
pub(crate) fn init_vcpu(
    vm: &KvmVm,
    cpu: &Object,
    vcpu: &mut VcpuFd,
    index: u32,
) -> Result<Option<HypervSetup>, KvmError> {
    let smp = vm
        .machine
        .upgrade()
        .and_then(|m| machine_state(&m).map(|ms| ms.smp()))
        .unwrap_or_default();
    let opts = cpu
        .downcast::<X86Cpu>()
        .map(X86Cpu::hyperv_options)
        .unwrap_or_default();
    let hyperv = if opts.requested() {
        let host = hyperv::host_support(vcpu, &vm.msr_index_list)?;
        hyperv::expand(&opts, host.as_ref())?
    } else {
        None
    };
    let cpuid = build_cpuid(vm, cpu, smp, hyperv.as_ref())?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| ioctl_error("KVM_SET_CPUID2", e))?;
    if let Some(setup) = &hyperv {
        hyperv::init_vcpu(vcpu, setup, index)?;
    }
    Ok(hyperv)
}

/// The CPUID `KVM_SET_CPUID2` gives `cpu` of a machine on KVM (what [`init_vcpu`] sets), or
/// `None` when the machine is not on KVM or its CPU cannot run here (`enforce`). For
/// benchmarks that build a raw KVM VM configured like qomvm's (no Hyper-V leaves: their
/// CPU asks for none).
pub fn vcpu_cpuid(machine: &Object, cpu: &Object) -> Option<CpuId> {
    let ms = machine_state(machine)?;
    let ops = ms.accel_ops()?;
    let vm = ops.as_any().downcast_ref::<KvmVm>()?;
    build_cpuid(vm, cpu, ms.smp(), None).ok()
}

fn set_boot_msrs(vm: &KvmVm, vcpu: &VcpuFd) -> Result<(), KvmError> {
    let has_mtrr = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .is_ok_and(|c| {
            c.as_slice()
                .iter()
                .any(|e| e.function == 1 && e.edx & (1 << 12) != 0)
        });
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .filter(|(index, _)| {
            let listed = vm.msr_index_list.contains(index);
            if !listed && WARNED_MSRS.lock().insert(*index) {
                qom::error_report!("warning: KVM does not list MSR 0x{index:x}; it is left unset");
            }
            listed
        })
        .chain(has_mtrr.then_some(&MTRR_DEF_TYPE))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Ioctl {
        what: "KVM_SET_MSRS",
        reason: "too many MSRs".into(),
    })?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| ioctl_error("KVM_SET_MSRS", e))?;
    if written != entries.len() {
        log::warn!(
            "KVM accepted {written} of {} boot MSRs (first refused: 0x{:x})",
            entries.len(),
            entries[written].index
        );
    }
    Ok(())
}

/// The LAPIC with LINT0 delivering the PIC's ExtINT and LINT1 NMIs, as a BIOS sets them.
fn lapic_with_lints(lapic: &kvm_bindings::kvm_lapic_state) -> kvm_bindings::kvm_lapic_state {
    let mut lapic = *lapic;
    let set_lvt = |regs: &mut [std::os::raw::c_char], offset: usize, mode: u32| {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    };
    set_lvt(&mut lapic.regs, 0x350, 0x7); // LINT0: ExtINT
    set_lvt(&mut lapic.regs, 0x360, 0x4); // LINT1: NMI
    lapic
}

/// The vCPU's state right after creation: the architectural reset state KVM gives it,
/// which a system reset restores.
pub(crate) struct PristineState {
    regs: kvm_bindings::kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    lapic: kvm_bindings::kvm_lapic_state,
    mp_state: kvm_bindings::kvm_mp_state,
    hyperv: Option<HypervSetup>,
}

impl PristineState {
    pub(crate) fn capture(vcpu: &VcpuFd, hyperv: Option<HypervSetup>) -> Result<Self, KvmError> {
        Ok(PristineState {
            hyperv,
            regs: vcpu
                .get_regs()
                .map_err(|e| ioctl_error("KVM_GET_REGS", e))?,
            sregs: vcpu
                .get_sregs()
                .map_err(|e| ioctl_error("KVM_GET_SREGS", e))?,
            lapic: vcpu
                .get_lapic()
                .map_err(|e| ioctl_error("KVM_GET_LAPIC", e))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(|e| ioctl_error("KVM_GET_MP_STATE", e))?,
        })
    }
}

/// QEMU's `kvm_arch_reset_vcpu` + `x86_cpu_reset`: the reset state (boot MSRs, FPU, LAPIC
/// with LINT0/LINT1 wired as firmware does), then a loader's start state if there is one,
/// which also makes the vCPU runnable; without one an AP waits for INIT/SIPI again.
pub(crate) fn reset_vcpu(
    vm: &KvmVm,
    cpu: &Object,
    vcpu: &mut VcpuFd,
    pristine: &PristineState,
) -> Result<(), KvmError> {
    set_boot_msrs(vm, vcpu)?;
    if let Some(setup) = &pristine.hyperv {
        hyperv::reset_msrs(vcpu, setup)?;
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| ioctl_error("KVM_SET_FPU", e))?;
    vcpu.set_lapic(&lapic_with_lints(&pristine.lapic))
        .map_err(|e| ioctl_error("KVM_SET_LAPIC", e))?;
    let (regs, sregs, mp_state) = match cpu.downcast::<X86Cpu>().and_then(X86Cpu::boot_state) {
        Some(state) => (
            state.regs,
            state.sregs,
            kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            },
        ),
        None => {
            // x86_cpu_reset: EDX holds the CPU's family, model and stepping (CPUID.01H:EAX).
            let mut regs = pristine.regs;
            if let Some(x86) = cpu.downcast::<X86Cpu>() {
                regs.rdx = u64::from(x86.cpuid_version_and_features().0);
            }
            (regs, pristine.sregs, pristine.mp_state)
        }
    };
    vcpu.set_sregs(&sregs)
        .map_err(|e| ioctl_error("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| ioctl_error("KVM_SET_REGS", e))?;
    vcpu.set_mp_state(mp_state)
        .map_err(|e| ioctl_error("KVM_SET_MP_STATE", e))?;
    Ok(())
}

fn segment_line(out: &mut String, name: &str, s: &kvm_segment, long: bool) {
    let flags = dump_segment(s).flags;
    if long {
        let _ = writeln!(
            out,
            "{name:<3}={:04x} {:016x} {:08x} {flags:08x}",
            s.selector, s.base, s.limit
        );
    } else {
        let _ = writeln!(
            out,
            "{name:<3}={:04x} {:08x} {:08x} {flags:08x}",
            s.selector, s.base, s.limit
        );
    }
}

/// The register dump for a triple fault. On AMD, KVM puts the vCPU through INIT before it
/// reports `KVM_EXIT_SHUTDOWN` (the VMCB is undefined after a shutdown intercept), so what
/// it returns is the reset state, not the faulting one: say so rather than let a reader
/// chase a fault at the reset vector.
pub(crate) fn shutdown_register_dump(vcpu: &VcpuFd) -> String {
    let mut dump = register_dump(vcpu);
    let reinitialised = matches!(
        (vcpu.get_regs(), vcpu.get_sregs()),
        (Ok(r), Ok(s)) if at_reset_vector(&r, &s)
    );
    if reinitialised {
        dump.push_str(
            "(KVM re-initialised the vCPU when it reported the shutdown, as it does on AMD: \
             these are its INIT registers, not the faulting ones)\n",
        );
    }
    dump
}

/// Whether the vCPU is at the reset vector as INIT leaves it (CS f000 based at
/// 0xffff0000, IP 0xfff0): a guest's own code cannot be there with that CS base, which only
/// a reset or INIT loads.
fn at_reset_vector(regs: &kvm_bindings::kvm_regs, sregs: &kvm_bindings::kvm_sregs) -> bool {
    regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 && sregs.cs.base == 0xffff_0000
}

/// The vCPU's registers in the layout of QEMU's `info registers` (`x86_cpu_dump_state`).
pub(crate) fn register_dump(vcpu: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "(registers unavailable)\n".to_string();
    };
    let long = s.efer & (1 << 10) != 0;
    let mut out = String::new();
    let fl = r.rflags;
    let flag = |bit: u32, c: char| if fl & (1 << bit) != 0 { c } else { '-' };
    let flags: String = [
        flag(11, 'O'),
        flag(10, 'D'),
        flag(7, 'S'),
        flag(6, 'Z'),
        flag(4, 'A'),
        flag(2, 'P'),
        flag(0, 'C'),
    ]
    .iter()
    .collect();
    let cpl = s.cs.dpl;
    if long {
        let _ = writeln!(
            out,
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
            r.rax, r.rbx, r.rcx, r.rdx
        );
        let _ = writeln!(
            out,
            "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
            r.rsi, r.rdi, r.rbp, r.rsp
        );
        let _ = writeln!(
            out,
            "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
            r.r8, r.r9, r.r10, r.r11
        );
        let _ = writeln!(
            out,
            "R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
            r.r12, r.r13, r.r14, r.r15
        );
        let _ = writeln!(out, "RIP={:016x} RFL={:08x} [{flags}] CPL={cpl}", r.rip, fl);
    } else {
        let _ = writeln!(
            out,
            "EAX={:08x} EBX={:08x} ECX={:08x} EDX={:08x}",
            r.rax as u32, r.rbx as u32, r.rcx as u32, r.rdx as u32
        );
        let _ = writeln!(
            out,
            "ESI={:08x} EDI={:08x} EBP={:08x} ESP={:08x}",
            r.rsi as u32, r.rdi as u32, r.rbp as u32, r.rsp as u32
        );
        let _ = writeln!(
            out,
            "EIP={:08x} EFL={:08x} [{flags}] CPL={cpl}",
            r.rip as u32, fl as u32
        );
    }
    for (name, seg) in [
        ("ES", &s.es),
        ("CS", &s.cs),
        ("SS", &s.ss),
        ("DS", &s.ds),
        ("FS", &s.fs),
        ("GS", &s.gs),
        ("LDT", &s.ldt),
        ("TR", &s.tr),
    ] {
        segment_line(&mut out, name, seg, long);
    }
    if long {
        let _ = writeln!(out, "GDT=     {:016x} {:08x}", s.gdt.base, s.gdt.limit);
        let _ = writeln!(out, "IDT=     {:016x} {:08x}", s.idt.base, s.idt.limit);
        let _ = writeln!(
            out,
            "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}",
            s.cr0, s.cr2, s.cr3, s.cr4
        );
    } else {
        let _ = writeln!(out, "GDT=     {:08x} {:08x}", s.gdt.base, s.gdt.limit);
        let _ = writeln!(out, "IDT=     {:08x} {:08x}", s.idt.base, s.idt.limit);
        let _ = writeln!(
            out,
            "CR0={:08x} CR2={:08x} CR3={:08x} CR4={:08x}",
            s.cr0, s.cr2 as u32, s.cr3 as u32, s.cr4
        );
    }
    let _ = writeln!(out, "EFER={:016x}", s.efer);
    out
}

/// `IA32_APIC_BASE` and its global enable bit.
const MSR_IA32_APICBASE: u32 = 0x1b;
const APICBASE_ENABLE: u64 = 1 << 11;
/// The local APIC's LVT LINT1 register, its mask bit and its NMI delivery mode.
const APIC_LVT_LINT1: usize = 0x360;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_DM_NMI: u32 = 4;

/// QEMU's x86 `nmi_monitor_handle` for one CPU, on its thread: a CPU whose local APIC is
/// enabled takes an external NMI only through LINT1 programmed as an unmasked NMI
/// (`kvm_apic_external_nmi`; Linux sets that on the boot CPU only), one whose APIC is
/// disabled takes it directly. Returns whether `KVM_NMI` was issued, or its errno.
pub(crate) fn inject_external_nmi(vcpu: &mut VcpuFd) -> Result<bool, i32> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_APICBASE,
        ..Default::default()
    }])
    .map_err(|_| libc::EINVAL)?;
    let apic_enabled = match vcpu.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice()[0].data & APICBASE_ENABLE != 0,
        Ok(_) => return Err(libc::EINVAL),
        Err(e) => return Err(e.errno()),
    };
    if apic_enabled {
        let lapic = vcpu.get_lapic().map_err(|e| e.errno())?;
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[APIC_LVT_LINT1 + i] as u8);
        let lvt = u32::from_le_bytes(bytes);
        if lvt & APIC_LVT_MASKED != 0 || (lvt >> 8) & 7 != APIC_DM_NMI {
            return Ok(false);
        }
    }
    vcpu.nmi().map_err(|e| e.errno())?;
    Ok(true)
}

/// `IA32_KERNEL_GS_BASE`, which `SWAPGS` exchanges with GS's base.
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// QEMU's `get_seg` (`target/i386/kvm/kvm.c`): a KVM segment in `SegmentCache` terms.
fn dump_segment(seg: &kvm_segment) -> DumpSegment {
    let flags = if seg.unusable != 0 {
        0
    } else {
        u32::from(seg.type_) << 8
            | u32::from(seg.s) << 12
            | u32::from(seg.dpl) << 13
            | u32::from(seg.present) << 15
            | u32::from(seg.avl) << 20
            | u32::from(seg.l) << 21
            | u32::from(seg.db) << 22
            | u32::from(seg.g) << 23
    };
    DumpSegment {
        selector: seg.selector,
        limit: seg.limit,
        flags,
        base: seg.base,
    }
}

/// The vCPU's registers for a guest core dump, on its thread.
pub(crate) fn dump_registers(vcpu: &VcpuFd) -> Result<CpuDumpRegisters, String> {
    let r = vcpu
        .get_regs()
        .map_err(|e| format!("KVM_GET_REGS: {}", errno_text(e.errno())))?;
    let s = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {}", errno_text(e.errno())))?;
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KERNEL_GS_BASE,
        ..Default::default()
    }])
    .map_err(|e| format!("KVM_GET_MSRS: {e:?}"))?;
    let kernel_gs_base = match vcpu.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice()[0].data,
        Ok(_) => 0,
        Err(e) => return Err(format!("KVM_GET_MSRS: {}", errno_text(e.errno()))),
    };
    let table = |base: u64, limit: u16| DumpSegment {
        limit: u32::from(limit),
        base,
        ..DumpSegment::default()
    };
    Ok(CpuDumpRegisters {
        gprs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
        segments: [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss].map(dump_segment),
        ldt: dump_segment(&s.ldt),
        tr: dump_segment(&s.tr),
        gdt: table(s.gdt.base, s.gdt.limit),
        idt: table(s.idt.base, s.idt.limit),
        cr: [s.cr0, 0, s.cr2, s.cr3, s.cr4],
        kernel_gs_base,
        efer: s.efer,
    })
}

/// CPUID.01H:ECX.x2APIC.
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;

/// The vCPU's local APIC for `info lapic`, on its thread: `KVM_GET_LAPIC` (whose page
/// carries the timer's current count) and whether the CPUID it runs with shows x2APIC.
pub(crate) fn local_apic_state(
    vcpu: &VcpuFd,
) -> Result<hw::core::accel_ops::LocalApicState, String> {
    let lapic = vcpu
        .get_lapic()
        .map_err(|e| format!("KVM_GET_LAPIC: {}", errno_text(e.errno())))?;
    let x2apic_cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).is_ok_and(|c| {
        c.as_slice()
            .iter()
            .any(|e| e.function == 1 && e.ecx & CPUID_1_ECX_X2APIC != 0)
    });
    Ok(hw::core::accel_ops::LocalApicState {
        regs: lapic.regs.iter().map(|&b| b as u8).collect(),
        x2apic_cpuid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leaves 0xB and 0x8000001E of the last CPU of `-smp 8,sockets=2,threads=2` (APIC ID
    /// 7: thread 1 of core 1 of package 1), as QEMU 7.2's cpu_x86_cpuid gives them.
    #[test]
    fn topology_leaves_locate_a_cpu_in_its_package() {
        let smp = SmpConfig {
            cpus: 8,
            sockets: 2,
            cores: 2,
            threads: 2,
            max_cpus: 8,
        };
        let apic_id = hw::i386::x86_cpu::apic_id_from_index(7, 2, 2);
        assert_eq!(apic_id, 7);
        let amd = amd_topology(apic_id, smp);
        assert_eq!([amd.eax, amd.ebx, amd.ecx, amd.edx], [7, 0x101, 1, 0]);
        let [smt, core, end] = extended_topology(apic_id, smp);
        assert_eq!([smt.eax, smt.ebx, smt.ecx, smt.edx], [1, 2, 0x100, 7]);
        assert_eq!([core.eax, core.ebx, core.ecx, core.edx], [2, 4, 0x201, 7]);
        assert_eq!([end.eax, end.ebx, end.ecx, end.edx], [0, 0, 2, 7]);
    }

    fn state(
        rip: u64,
        selector: u16,
        base: u64,
    ) -> (kvm_bindings::kvm_regs, kvm_bindings::kvm_sregs) {
        let regs = kvm_bindings::kvm_regs {
            rip,
            ..Default::default()
        };
        let mut sregs = kvm_bindings::kvm_sregs::default();
        sregs.cs.selector = selector;
        sregs.cs.base = base;
        (regs, sregs)
    }

    #[test]
    fn only_the_init_state_counts_as_the_reset_vector() {
        let (r, s) = state(0xfff0, 0xf000, 0xffff_0000);
        assert!(at_reset_vector(&r, &s));
        // A far jump to f000:fff0 loads the real-mode base, not the reset one.
        let (r, s) = state(0xfff0, 0xf000, 0xf_0000);
        assert!(!at_reset_vector(&r, &s));
        let (r, s) = state(0xfff1, 0xf000, 0xffff_0000);
        assert!(!at_reset_vector(&r, &s));
    }
}
