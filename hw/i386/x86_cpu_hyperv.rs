//! Hyper-V enlightenments of x86 CPUs (QEMU's `hv-*` properties in `target/i386/cpu.c`
//! and its `kvm_hyperv_properties` table in `target/i386/kvm/kvm.c`): which CPUID bits of
//! the Hyper-V leaves each enlightenment sets, what it depends on, and the words QEMU
//! uses for it in messages. Data only; `accel/kvm/hyperv.rs` checks them against the
//! kernel and builds the leaves.

use std::collections::BTreeSet;

use super::x86_cpu::Reg;

/// Hypervisor vendor and highest Hyper-V leaf.
pub const HV_CPUID_VENDOR_AND_MAX_FUNCTIONS: u32 = 0x4000_0000;
/// Interface signature (`Hv#1`).
pub const HV_CPUID_INTERFACE: u32 = 0x4000_0001;
/// Hypervisor version.
pub const HV_CPUID_VERSION: u32 = 0x4000_0002;
/// Feature identification.
pub const HV_CPUID_FEATURES: u32 = 0x4000_0003;
/// Implementation recommendations (and the spinlock retry count in EBX).
pub const HV_CPUID_ENLIGHTMENT_INFO: u32 = 0x4000_0004;
/// Implementation limits.
pub const HV_CPUID_IMPLEMENT_LIMITS: u32 = 0x4000_0005;
/// Nested virtualization features (the eVMCS version range).
pub const HV_CPUID_NESTED_FEATURES: u32 = 0x4000_000A;

/// `HV_CPUID_FEATURES.EAX`: VP_RUNTIME MSR.
pub const HV_VP_RUNTIME_AVAILABLE: u32 = 1 << 0;
/// `HV_CPUID_FEATURES.EAX`: partition reference counter.
pub const HV_TIME_REF_COUNT_AVAILABLE: u32 = 1 << 1;
/// `HV_CPUID_FEATURES.EAX`: SynIC MSRs.
pub const HV_SYNIC_AVAILABLE: u32 = 1 << 2;
/// `HV_CPUID_FEATURES.EAX`: synthetic timer MSRs.
pub const HV_SYNTIMERS_AVAILABLE: u32 = 1 << 3;
/// `HV_CPUID_FEATURES.EAX`: APIC access MSRs.
pub const HV_APIC_ACCESS_AVAILABLE: u32 = 1 << 4;
/// `HV_CPUID_FEATURES.EAX`: hypercall MSRs.
pub const HV_HYPERCALL_AVAILABLE: u32 = 1 << 5;
/// `HV_CPUID_FEATURES.EAX`: VP_INDEX MSR.
pub const HV_VP_INDEX_AVAILABLE: u32 = 1 << 6;
/// `HV_CPUID_FEATURES.EAX`: reset MSR.
pub const HV_RESET_AVAILABLE: u32 = 1 << 7;
/// `HV_CPUID_FEATURES.EAX`: reference TSC page.
pub const HV_REFERENCE_TSC_AVAILABLE: u32 = 1 << 9;
/// `HV_CPUID_FEATURES.EAX`: TSC/APIC frequency MSRs.
pub const HV_ACCESS_FREQUENCY_MSRS: u32 = 1 << 11;
/// `HV_CPUID_FEATURES.EAX`: reenlightenment control MSRs.
pub const HV_ACCESS_REENLIGHTENMENTS_CONTROL: u32 = 1 << 13;
/// `HV_CPUID_FEATURES.EBX`: HvPostMessage.
pub const HV_POST_MESSAGES: u32 = 1 << 4;
/// `HV_CPUID_FEATURES.EBX`: HvSignalEvent.
pub const HV_SIGNAL_EVENTS: u32 = 1 << 5;
/// `HV_CPUID_FEATURES.EDX`: CPU hot-add (QEMU sets it for Windows' CPU hotplug).
pub const HV_CPU_DYNAMIC_PARTITIONING_AVAILABLE: u32 = 1 << 3;
/// `HV_CPUID_FEATURES.EDX`: frequency MSRs.
pub const HV_FREQUENCY_MSRS_AVAILABLE: u32 = 1 << 8;
/// `HV_CPUID_FEATURES.EDX`: crash MSRs.
pub const HV_GUEST_CRASH_MSR_AVAILABLE: u32 = 1 << 10;
/// `HV_CPUID_FEATURES.EDX`: direct-mode synthetic timers.
pub const HV_STIMER_DIRECT_MODE_AVAILABLE: u32 = 1 << 19;
/// `HV_CPUID_ENLIGHTMENT_INFO.EAX`: remote TLB flush hypercalls.
pub const HV_REMOTE_TLB_FLUSH_RECOMMENDED: u32 = 1 << 2;
/// `HV_CPUID_ENLIGHTMENT_INFO.EAX`: APIC access MSRs recommended.
pub const HV_APIC_ACCESS_RECOMMENDED: u32 = 1 << 3;
/// `HV_CPUID_ENLIGHTMENT_INFO.EAX`: relaxed timing.
pub const HV_RELAXED_TIMING_RECOMMENDED: u32 = 1 << 5;
/// `HV_CPUID_ENLIGHTMENT_INFO.EAX`: cluster IPI hypercalls.
pub const HV_CLUSTER_IPI_RECOMMENDED: u32 = 1 << 10;
/// `HV_CPUID_ENLIGHTMENT_INFO.EAX`: extended processor masks.
pub const HV_EX_PROCESSOR_MASKS_RECOMMENDED: u32 = 1 << 11;
/// `HV_CPUID_ENLIGHTMENT_INFO.EAX`: enlightened VMCS.
pub const HV_ENLIGHTENED_VMCS_RECOMMENDED: u32 = 1 << 14;

/// `hv-spinlocks`' default: the guest never notifies (QEMU's
/// `HYPERV_SPINLOCK_NEVER_NOTIFY`).
pub const HYPERV_SPINLOCK_NEVER_NOTIFY: u32 = 0xFFFF_FFFF;
/// QEMU's `DEFAULT_EVMCS_VERSION`: eVMCS versions 1..1 in `HV_CPUID_NESTED_FEATURES.EAX`.
pub const DEFAULT_EVMCS_VERSION: u32 = (1 << 8) | 1;

/// One enlightenment (QEMU's `kvm_hyperv_properties` entry).
#[derive(Debug)]
pub struct HvFeature {
    /// The property (`hv-relaxed`).
    pub name: &'static str,
    /// QEMU's description, used in its messages (`relaxed timing (hv-relaxed)`).
    pub desc: &'static str,
    /// The CPUID bits it sets, which the kernel must offer: (leaf, register, bits).
    pub flags: &'static [(u32, Reg, u32)],
    /// Enlightenments it requires.
    pub dependencies: &'static [&'static str],
}

/// The enlightenments qomvm offers, in QEMU's `HYPERV_FEAT_*` order (the order of its
/// checks, so the first error is QEMU's).
pub static HV_FEATURES: &[HvFeature] = &[
    HvFeature {
        name: "hv-relaxed",
        desc: "relaxed timing (hv-relaxed)",
        flags: &[(HV_CPUID_ENLIGHTMENT_INFO, Reg::Eax, HV_RELAXED_TIMING_RECOMMENDED)],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-vapic",
        desc: "virtual APIC (hv-vapic)",
        flags: &[(HV_CPUID_FEATURES, Reg::Eax, HV_APIC_ACCESS_AVAILABLE)],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-time",
        desc: "clocksources (hv-time)",
        flags: &[(
            HV_CPUID_FEATURES,
            Reg::Eax,
            HV_TIME_REF_COUNT_AVAILABLE | HV_REFERENCE_TSC_AVAILABLE,
        )],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-crash",
        desc: "crash MSRs (hv-crash)",
        flags: &[(HV_CPUID_FEATURES, Reg::Edx, HV_GUEST_CRASH_MSR_AVAILABLE)],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-reset",
        desc: "reset MSR (hv-reset)",
        flags: &[(HV_CPUID_FEATURES, Reg::Eax, HV_RESET_AVAILABLE)],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-vpindex",
        desc: "VP_INDEX MSR (hv-vpindex)",
        flags: &[(HV_CPUID_FEATURES, Reg::Eax, HV_VP_INDEX_AVAILABLE)],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-runtime",
        desc: "VP_RUNTIME MSR (hv-runtime)",
        flags: &[(HV_CPUID_FEATURES, Reg::Eax, HV_VP_RUNTIME_AVAILABLE)],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-synic",
        desc: "synthetic interrupt controller (hv-synic)",
        flags: &[(HV_CPUID_FEATURES, Reg::Eax, HV_SYNIC_AVAILABLE)],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-stimer",
        desc: "synthetic timers (hv-stimer)",
        flags: &[(HV_CPUID_FEATURES, Reg::Eax, HV_SYNTIMERS_AVAILABLE)],
        dependencies: &["hv-synic", "hv-time"],
    },
    HvFeature {
        name: "hv-frequencies",
        desc: "frequency MSRs (hv-frequencies)",
        flags: &[
            (HV_CPUID_FEATURES, Reg::Eax, HV_ACCESS_FREQUENCY_MSRS),
            (HV_CPUID_FEATURES, Reg::Edx, HV_FREQUENCY_MSRS_AVAILABLE),
        ],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-reenlightenment",
        desc: "reenlightenment MSRs (hv-reenlightenment)",
        flags: &[(HV_CPUID_FEATURES, Reg::Eax, HV_ACCESS_REENLIGHTENMENTS_CONTROL)],
        dependencies: &[],
    },
    HvFeature {
        name: "hv-tlbflush",
        desc: "paravirtualized TLB flush (hv-tlbflush)",
        flags: &[(
            HV_CPUID_ENLIGHTMENT_INFO,
            Reg::Eax,
            HV_REMOTE_TLB_FLUSH_RECOMMENDED | HV_EX_PROCESSOR_MASKS_RECOMMENDED,
        )],
        dependencies: &["hv-vpindex"],
    },
    HvFeature {
        name: "hv-evmcs",
        desc: "enlightened VMCS (hv-evmcs)",
        flags: &[(HV_CPUID_ENLIGHTMENT_INFO, Reg::Eax, HV_ENLIGHTENED_VMCS_RECOMMENDED)],
        dependencies: &["hv-vapic"],
    },
    HvFeature {
        name: "hv-ipi",
        desc: "paravirtualized IPI (hv-ipi)",
        flags: &[(
            HV_CPUID_ENLIGHTMENT_INFO,
            Reg::Eax,
            HV_CLUSTER_IPI_RECOMMENDED | HV_EX_PROCESSOR_MASKS_RECOMMENDED,
        )],
        dependencies: &["hv-vpindex"],
    },
    HvFeature {
        name: "hv-stimer-direct",
        desc: "direct mode synthetic timers (hv-stimer-direct)",
        flags: &[(HV_CPUID_FEATURES, Reg::Edx, HV_STIMER_DIRECT_MODE_AVAILABLE)],
        dependencies: &["hv-stimer"],
    },
];

/// The enlightenment named `name` (`hv-relaxed`).
pub fn hv_feature(name: &str) -> Option<&'static HvFeature> {
    HV_FEATURES.iter().find(|f| f.name == name)
}

/// What `-cpu ...,hv-*` asked for (QEMU's `hyperv_features`, `hyperv_spinlock_attempts`,
/// `hyperv_passthrough`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HypervOptions {
    /// The enlightenments turned on, by property name.
    pub features: BTreeSet<&'static str>,
    /// `hv-spinlocks=` (the retry count in `HV_CPUID_ENLIGHTMENT_INFO.EBX`).
    pub spinlocks: u32,
    /// `hv-passthrough`: everything the kernel supports.
    pub passthrough: bool,
}

impl Default for HypervOptions {
    fn default() -> Self {
        HypervOptions {
            features: BTreeSet::new(),
            spinlocks: HYPERV_SPINLOCK_NEVER_NOTIFY,
            passthrough: false,
        }
    }
}

impl HypervOptions {
    /// Whether anything Hyper-V was asked for (QEMU's `hyperv_enabled`, less its kernel
    /// check).
    pub fn requested(&self) -> bool {
        self.spinlocks != HYPERV_SPINLOCK_NEVER_NOTIFY
            || !self.features.is_empty()
            || self.passthrough
    }
}
