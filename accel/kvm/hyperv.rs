//! Hyper-V enlightenments on KVM (QEMU's `target/i386/kvm/kvm.c`: `hyperv_enabled`,
//! `get_supported_hv_cpuid` and its `_legacy` fallback, `kvm_hyperv_expand_features`,
//! `hyperv_fill_cpuids`, `hyperv_init_vcpu`, `kvm_hv_handle_exit`).
//!
//! The `hv-*` properties (`hw/i386/x86_cpu_hyperv.rs`) are checked against what the kernel
//! offers (`KVM_GET_SUPPORTED_HV_CPUID`, or the `KVM_CAP_HYPERV*` capabilities and the
//! MSR list on older kernels); the guest then gets leaves 0x40000000..0x40000005 (and
//! 0x4000000A for `hv-evmcs`) and KVM's own signature moves to 0x40000100, as in QEMU.
//!
//! One difference from QEMU: when the kernel has no `KVM_CAP_HYPERV` at all, QEMU
//! silently drops every `hv-*` option (its `hyperv_enabled` is false); qomvm refuses an
//! explicitly requested enlightenment there with QEMU's "is not supported by kernel" line
//! instead of starting a guest without it. `hv-passthrough` (everything the kernel
//! supports) is accepted and gives nothing, as in QEMU.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;

use hw::i386::x86_cpu::Reg;
use hw::i386::x86_cpu_hyperv::{
    hv_feature, HypervOptions, DEFAULT_EVMCS_VERSION, HV_ACCESS_FREQUENCY_MSRS,
    HV_ACCESS_REENLIGHTENMENTS_CONTROL, HV_APIC_ACCESS_AVAILABLE, HV_APIC_ACCESS_RECOMMENDED,
    HV_CLUSTER_IPI_RECOMMENDED, HV_CPUID_ENLIGHTMENT_INFO, HV_CPUID_FEATURES,
    HV_CPUID_IMPLEMENT_LIMITS, HV_CPUID_INTERFACE, HV_CPUID_NESTED_FEATURES,
    HV_CPUID_VENDOR_AND_MAX_FUNCTIONS, HV_CPUID_VERSION, HV_CPU_DYNAMIC_PARTITIONING_AVAILABLE,
    HV_ENLIGHTENED_VMCS_RECOMMENDED, HV_EX_PROCESSOR_MASKS_RECOMMENDED, HV_FEATURES,
    HV_FREQUENCY_MSRS_AVAILABLE, HV_GUEST_CRASH_MSR_AVAILABLE, HV_HYPERCALL_AVAILABLE,
    HV_POST_MESSAGES, HV_REFERENCE_TSC_AVAILABLE, HV_RELAXED_TIMING_RECOMMENDED,
    HV_REMOTE_TLB_FLUSH_RECOMMENDED, HV_RESET_AVAILABLE, HV_SIGNAL_EVENTS, HV_SYNIC_AVAILABLE,
    HV_SYNTIMERS_AVAILABLE, HV_TIME_REF_COUNT_AVAILABLE, HV_VP_INDEX_AVAILABLE,
    HV_VP_RUNTIME_AVAILABLE,
};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_enable_cap, kvm_msr_entry, Msrs, KVM_CAP_HYPERV, KVM_CAP_HYPERV_CPUID,
    KVM_CAP_HYPERV_ENLIGHTENED_VMCS, KVM_CAP_HYPERV_SEND_IPI, KVM_CAP_HYPERV_SYNIC2,
    KVM_CAP_HYPERV_TIME, KVM_CAP_HYPERV_TLBFLUSH, KVM_CAP_HYPERV_VP_INDEX,
};
use kvm_ioctls::{Kvm, VcpuFd};

use hw::core::os_error::errno_text;

/// Where KVM's signature leaves go when Hyper-V's take 0x40000000 (QEMU's
/// `KVM_CPUID_SIGNATURE_NEXT`).
pub const KVM_CPUID_SIGNATURE_NEXT: u32 = 0x4000_0100;

/// `Microsoft Hv`, QEMU's default `hv-vendor-id`.
const HV_VENDOR: &[u8; 12] = b"Microsoft Hv";
/// `Hv#1`: the interface signature.
const HV_INTERFACE_SIGNATURE: u32 = 0x3123_7648;
/// QEMU's default `hv-version-id-build` (Windows Server 2016).
const HV_VERSION_BUILD: u32 = 0x3839;
/// QEMU's default `hv-version-id-major`.
const HV_VERSION_MAJOR: u32 = 0x000A;
/// QEMU's `x-hv-max-vps` default (-1).
const HV_MAX_VPS: u32 = 0xFFFF_FFFF;
/// QEMU's `hyperv_limits[0]`: 64.
const HV_LIMITS: [u32; 3] = [64, 0, 0];

/// Hyper-V MSRs (`hyperv-proto.h`) that QEMU resets, or checks, for the guest.
const HV_X64_MSR_GUEST_OS_ID: u32 = 0x4000_0000;
const HV_X64_MSR_HYPERCALL: u32 = 0x4000_0001;
const HV_X64_MSR_VP_INDEX: u32 = 0x4000_0002;
const HV_X64_MSR_RESET: u32 = 0x4000_0003;
const HV_X64_MSR_VP_RUNTIME: u32 = 0x4000_0010;
const HV_X64_MSR_REFERENCE_TSC: u32 = 0x4000_0021;
const HV_X64_MSR_TSC_FREQUENCY: u32 = 0x4000_0022;
const HV_X64_MSR_APIC_ASSIST_PAGE: u32 = 0x4000_0073;
const HV_X64_MSR_SCONTROL: u32 = 0x4000_0080;
const HV_X64_MSR_SIEFP: u32 = 0x4000_0082;
const HV_X64_MSR_SIMP: u32 = 0x4000_0083;
const HV_X64_MSR_SINT0: u32 = 0x4000_0090;
const HV_X64_MSR_STIMER0_CONFIG: u32 = 0x4000_00B0;
const HV_X64_MSR_CRASH_CTL: u32 = 0x4000_0105;
const HV_X64_MSR_REENLIGHTENMENT_CONTROL: u32 = 0x4000_0106;
const HV_X64_MSR_TSC_EMULATION_CONTROL: u32 = 0x4000_0107;
const HV_X64_MSR_TSC_EMULATION_STATUS: u32 = 0x4000_0108;
/// `HV_SINT_MASKED`: a SINT's reset value.
const HV_SINT_MASKED: u64 = 1 << 16;

/// Hypercall codes and statuses of the hypercalls KVM hands to the VMM.
const HV_POST_MESSAGE: u64 = 0x005c;
const HV_SIGNAL_EVENT: u64 = 0x005d;
const HV_STATUS_INVALID_HYPERCALL_CODE: u64 = 2;
const HV_STATUS_INVALID_CONNECTION_ID: u64 = 18;

/// Hyper-V set-up failures, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum HypervError {
    /// The kernel cannot give an enlightenment that was asked for.
    #[error("Hyper-V {0} is not supported by kernel")]
    NotSupported(&'static str),
    /// An enlightenment was asked for without one it needs.
    #[error("Hyper-V {0} requires Hyper-V {1}")]
    Requires(&'static str, &'static str),
    /// `KVM_GET_SUPPORTED_HV_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_HV_CPUID failed: {0}")]
    SupportedCpuid(String),
    /// `KVM_ENABLE_CAP(KVM_CAP_HYPERV_SYNIC2)` failed.
    #[error("failed to turn on HyperV SynIC in KVM: {0}")]
    Synic(String),
    /// The kernel's VP index of a vCPU is not its CPU index and cannot be set.
    #[error("kernel's vp_index != QEMU's vp_index")]
    VpIndex,
    /// Writing the Hyper-V MSRs failed.
    #[error("KVM_SET_MSRS (Hyper-V): {0}")]
    Msrs(String),
}

/// What the kernel offers: the Hyper-V leaves of `KVM_GET_SUPPORTED_HV_CPUID`, or their
/// reconstruction from capabilities (QEMU's `get_supported_hv_cpuid_legacy`).
#[derive(Clone, Debug, Default)]
pub struct HvSupported {
    leaves: Vec<(u32, [u32; 4])>,
}

impl HvSupported {
    /// From `(leaf, [eax, ebx, ecx, edx])` pairs.
    pub fn from_leaves(leaves: Vec<(u32, [u32; 4])>) -> Self {
        HvSupported { leaves }
    }

    /// One register of one leaf (0 when the kernel does not report the leaf).
    pub fn get(&self, leaf: u32, reg: Reg) -> u32 {
        self.leaves
            .iter()
            .find(|(l, _)| *l == leaf)
            .map_or(0, |(_, r)| match reg {
                Reg::Eax => r[0],
                Reg::Ebx => r[1],
                Reg::Ecx => r[2],
                Reg::Edx => r[3],
            })
    }

    /// QEMU's `hyperv_feature_supported`: every CPUID bit of the enlightenment is offered.
    pub fn supports(&self, name: &str) -> bool {
        hv_feature(name).is_some_and(|f| {
            f.flags
                .iter()
                .all(|&(leaf, reg, bits)| self.get(leaf, reg) & bits == bits)
        })
    }
}

/// Whether this host's KVM has Hyper-V emulation at all (`KVM_CAP_HYPERV`).
pub fn kernel_has_hyperv() -> bool {
    Kvm::new().is_ok_and(|kvm| kvm.check_extension_raw(KVM_CAP_HYPERV.into()) > 0)
}

/// The kernel's Hyper-V support for `vcpu`, or `None` when it has no `KVM_CAP_HYPERV`
/// (QEMU's `hyperv_enabled` is then false).
pub(crate) fn host_support(
    vcpu: &VcpuFd,
    msr_index_list: &[u32],
) -> Result<Option<HvSupported>, HypervError> {
    let kvm = Kvm::new().map_err(|e| HypervError::SupportedCpuid(errno_text(e.errno())))?;
    let cap = |c: u32| kvm.check_extension_raw(c.into()) > 0;
    if !cap(KVM_CAP_HYPERV) {
        return Ok(None);
    }
    if cap(KVM_CAP_HYPERV_CPUID) {
        let mut leaves = supported_hv_cpuid(vcpu)?;
        // KVM sets the eVMCS bit only once the capability is enabled; QEMU sets it early.
        if cap(KVM_CAP_HYPERV_ENLIGHTENED_VMCS) {
            for (leaf, regs) in leaves.iter_mut() {
                if *leaf == HV_CPUID_ENLIGHTMENT_INFO {
                    regs[0] |= HV_ENLIGHTENED_VMCS_RECOMMENDED;
                }
            }
        }
        return Ok(Some(HvSupported { leaves }));
    }
    // QEMU's get_supported_hv_cpuid_legacy: capabilities and the MSR list.
    let msr = |m: u32| msr_index_list.contains(&m);
    let mut feat = [0u32; 4];
    let mut recomm = [0u32; 4];
    feat[0] |= HV_HYPERCALL_AVAILABLE | HV_APIC_ACCESS_AVAILABLE;
    feat[3] |= HV_CPU_DYNAMIC_PARTITIONING_AVAILABLE;
    recomm[0] |= HV_RELAXED_TIMING_RECOMMENDED | HV_APIC_ACCESS_RECOMMENDED;
    if cap(KVM_CAP_HYPERV_TIME) {
        feat[0] |= HV_TIME_REF_COUNT_AVAILABLE | HV_REFERENCE_TSC_AVAILABLE;
    }
    if msr(HV_X64_MSR_TSC_FREQUENCY) {
        feat[0] |= HV_ACCESS_FREQUENCY_MSRS;
        feat[3] |= HV_FREQUENCY_MSRS_AVAILABLE;
    }
    if msr(HV_X64_MSR_CRASH_CTL) {
        feat[3] |= HV_GUEST_CRASH_MSR_AVAILABLE;
    }
    if msr(HV_X64_MSR_REENLIGHTENMENT_CONTROL) {
        feat[0] |= HV_ACCESS_REENLIGHTENMENTS_CONTROL;
    }
    if msr(HV_X64_MSR_RESET) {
        feat[0] |= HV_RESET_AVAILABLE;
    }
    if msr(HV_X64_MSR_VP_INDEX) {
        feat[0] |= HV_VP_INDEX_AVAILABLE;
    }
    if msr(HV_X64_MSR_VP_RUNTIME) {
        feat[0] |= HV_VP_RUNTIME_AVAILABLE;
    }
    if msr(HV_X64_MSR_SCONTROL) && cap(KVM_CAP_HYPERV_SYNIC2) {
        feat[0] |= HV_SYNIC_AVAILABLE;
    }
    if msr(HV_X64_MSR_STIMER0_CONFIG) {
        feat[0] |= HV_SYNTIMERS_AVAILABLE;
    }
    if cap(KVM_CAP_HYPERV_TLBFLUSH) {
        recomm[0] |= HV_REMOTE_TLB_FLUSH_RECOMMENDED | HV_EX_PROCESSOR_MASKS_RECOMMENDED;
    }
    if cap(KVM_CAP_HYPERV_ENLIGHTENED_VMCS) {
        recomm[0] |= HV_ENLIGHTENED_VMCS_RECOMMENDED;
    }
    if cap(KVM_CAP_HYPERV_SEND_IPI) {
        recomm[0] |= HV_CLUSTER_IPI_RECOMMENDED | HV_EX_PROCESSOR_MASKS_RECOMMENDED;
    }
    Ok(Some(HvSupported {
        leaves: vec![
            (HV_CPUID_FEATURES, feat),
            (HV_CPUID_ENLIGHTMENT_INFO, recomm),
        ],
    }))
}

/// `KVM_GET_SUPPORTED_HV_CPUID` on the vCPU (`_IOWR(KVMIO, 0xc1, struct kvm_cpuid2)`).
fn supported_hv_cpuid(vcpu: &VcpuFd) -> Result<Vec<(u32, [u32; 4])>, HypervError> {
    /// `struct kvm_cpuid2` with room for more leaves than KVM reports (11 today).
    #[repr(C)]
    struct Cpuid2 {
        nent: u32,
        padding: u32,
        entries: [kvm_cpuid_entry2; 64],
    }
    const KVM_GET_SUPPORTED_HV_CPUID: libc::c_ulong = 0xC008_AEC1;
    let mut buf = Cpuid2 {
        nent: 64,
        padding: 0,
        entries: [kvm_cpuid_entry2::default(); 64],
    };
    // SAFETY: the ioctl reads `nent` and writes at most that many entries into `buf`,
    // which is a `struct kvm_cpuid2` followed by 64 entries and outlives the call.
    let r = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_SUPPORTED_HV_CPUID, &mut buf) };
    if r < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(HypervError::SupportedCpuid(errno_text(errno)));
    }
    let n = (buf.nent as usize).min(buf.entries.len());
    Ok(buf.entries[..n]
        .iter()
        .map(|e| (e.function, [e.eax, e.ebx, e.ecx, e.edx]))
        .collect())
}

/// The guest's Hyper-V configuration after QEMU's `kvm_hyperv_expand_features`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HypervSetup {
    /// The enlightenments the guest gets.
    pub features: BTreeSet<&'static str>,
    spinlocks: u32,
    vendor: [u32; 3],
    interface: [u32; 4],
    version: [u32; 4],
    max_vps: u32,
    limits: [u32; 3],
}

impl HypervSetup {
    /// Whether the guest gets `name`.
    pub fn has(&self, name: &str) -> bool {
        self.features.contains(name)
    }
}

/// QEMU's `kvm_hyperv_expand_features`: `hv-passthrough` takes what the kernel offers
/// (identity included); otherwise every requested enlightenment must be offered and have
/// its dependencies. `None` when nothing Hyper-V is on.
pub fn expand(
    opts: &HypervOptions,
    host: Option<&HvSupported>,
) -> Result<Option<HypervSetup>, HypervError> {
    if !opts.requested() {
        return Ok(None);
    }
    let Some(host) = host else {
        // No KVM_CAP_HYPERV: see the module documentation.
        if let Some(f) = HV_FEATURES.iter().find(|f| opts.features.contains(f.name)) {
            return Err(HypervError::NotSupported(f.desc));
        }
        if opts.spinlocks != hw::i386::x86_cpu_hyperv::HYPERV_SPINLOCK_NEVER_NOTIFY {
            return Err(HypervError::NotSupported("spinlock retries (hv-spinlocks)"));
        }
        return Ok(None);
    };
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut setup = HypervSetup {
        features: BTreeSet::new(),
        spinlocks: opts.spinlocks,
        vendor: [
            word(&HV_VENDOR[0..4]),
            word(&HV_VENDOR[4..8]),
            word(&HV_VENDOR[8..12]),
        ],
        interface: [HV_INTERFACE_SIGNATURE, 0, 0, 0],
        version: [HV_VERSION_BUILD, HV_VERSION_MAJOR << 16, 0, 0],
        max_vps: HV_MAX_VPS,
        limits: HV_LIMITS,
    };
    if opts.passthrough {
        let leaf = |l: u32| [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx].map(|r| host.get(l, r));
        let v = leaf(HV_CPUID_VENDOR_AND_MAX_FUNCTIONS);
        setup.vendor = [v[1], v[2], v[3]];
        setup.interface = leaf(HV_CPUID_INTERFACE);
        setup.version = leaf(HV_CPUID_VERSION);
        let limits = leaf(HV_CPUID_IMPLEMENT_LIMITS);
        setup.max_vps = limits[0];
        setup.limits = [limits[1], limits[2], limits[3]];
        setup.spinlocks = host.get(HV_CPUID_ENLIGHTMENT_INFO, Reg::Ebx);
        setup.features = HV_FEATURES
            .iter()
            .filter(|f| host.supports(f.name))
            .map(|f| f.name)
            .collect();
    } else {
        for f in HV_FEATURES
            .iter()
            .filter(|f| opts.features.contains(f.name))
        {
            if !host.supports(f.name) {
                return Err(HypervError::NotSupported(f.desc));
            }
            if let Some(dep) = f.dependencies.iter().find(|d| !opts.features.contains(*d)) {
                let dep = hv_feature(dep).map_or(*dep, |d| d.desc);
                return Err(HypervError::Requires(f.desc, dep));
            }
        }
        setup.features = opts.features.clone();
    }
    // Not in QEMU's table: the SynIC needs VP indexes.
    if setup.has("hv-synic") && !setup.has("hv-vpindex") {
        let desc = |n: &str| hv_feature(n).map_or("", |f| f.desc);
        return Err(HypervError::Requires(desc("hv-synic"), desc("hv-vpindex")));
    }
    Ok(Some(setup))
}

/// QEMU's `hv_build_cpuid_leaf`: the bits of one register of one leaf that the guest's
/// enlightenments set.
fn build_leaf(setup: &HypervSetup, leaf: u32, reg: Reg) -> u32 {
    let mut r = HV_FEATURES
        .iter()
        .filter(|f| setup.has(f.name))
        .flat_map(|f| f.flags.iter())
        .filter(|&&(l, rg, _)| l == leaf && rg == reg)
        .fold(0, |acc, &(_, _, bits)| acc | bits);
    if leaf == HV_CPUID_NESTED_FEATURES && reg == Reg::Eax && setup.has("hv-evmcs") {
        r |= DEFAULT_EVMCS_VERSION;
    }
    r
}

/// QEMU's `hyperv_fill_cpuids`: the Hyper-V leaves, `(leaf, [eax, ebx, ecx, edx])`.
pub fn fill_cpuids(setup: &HypervSetup) -> Vec<(u32, [u32; 4])> {
    let nested_eax = build_leaf(setup, HV_CPUID_NESTED_FEATURES, Reg::Eax);
    let max = if nested_eax != 0 {
        HV_CPUID_NESTED_FEATURES
    } else {
        HV_CPUID_IMPLEMENT_LIMITS
    };
    let mut leaves = vec![
        (
            HV_CPUID_VENDOR_AND_MAX_FUNCTIONS,
            [max, setup.vendor[0], setup.vendor[1], setup.vendor[2]],
        ),
        (HV_CPUID_INTERFACE, setup.interface),
        (HV_CPUID_VERSION, setup.version),
    ];
    let mut features = [
        build_leaf(setup, HV_CPUID_FEATURES, Reg::Eax) | HV_HYPERCALL_AVAILABLE,
        build_leaf(setup, HV_CPUID_FEATURES, Reg::Ebx),
        0,
        build_leaf(setup, HV_CPUID_FEATURES, Reg::Edx) | HV_CPU_DYNAMIC_PARTITIONING_AVAILABLE,
    ];
    if setup.has("hv-synic") {
        // SynIC and VMBus devices need the message and event hypercalls.
        features[1] |= HV_POST_MESSAGES | HV_SIGNAL_EVENTS;
    }
    leaves.push((HV_CPUID_FEATURES, features));
    let mut info = build_leaf(setup, HV_CPUID_ENLIGHTMENT_INFO, Reg::Eax);
    if setup.has("hv-vapic") {
        info |= HV_APIC_ACCESS_RECOMMENDED;
    }
    leaves.push((HV_CPUID_ENLIGHTMENT_INFO, [info, setup.spinlocks, 0, 0]));
    leaves.push((
        HV_CPUID_IMPLEMENT_LIMITS,
        [
            setup.max_vps,
            setup.limits[0],
            setup.limits[1],
            setup.limits[2],
        ],
    ));
    if nested_eax != 0 {
        for leaf in HV_CPUID_IMPLEMENT_LIMITS + 1..HV_CPUID_NESTED_FEATURES {
            leaves.push((leaf, [0; 4]));
        }
        leaves.push((HV_CPUID_NESTED_FEATURES, [nested_eax, 0, 0, 0]));
    }
    leaves
}

/// QEMU's `kvm_arch_init_vcpu` with Hyper-V on: KVM's leaves 0x40000000/0x40000001 move to
/// 0x40000100/0x40000101 (the signature leaf's EAX following), and Hyper-V's take their
/// place.
pub(crate) fn place_leaves(entries: &mut Vec<kvm_cpuid_entry2>, setup: &HypervSetup) {
    for e in entries.iter_mut() {
        if (0x4000_0000..0x4000_0100).contains(&e.function) {
            e.function += KVM_CPUID_SIGNATURE_NEXT - 0x4000_0000;
            if e.function == KVM_CPUID_SIGNATURE_NEXT {
                e.eax = KVM_CPUID_SIGNATURE_NEXT + 1;
            }
        }
    }
    for (function, [eax, ebx, ecx, edx]) in fill_cpuids(setup) {
        entries.push(kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        });
    }
}

/// QEMU's `hyperv_init_vcpu`: the SynIC (`KVM_CAP_HYPERV_SYNIC2`), the eVMCS capability,
/// and the VP index (set to the CPU index where the kernel allows, else checked).
pub(crate) fn init_vcpu(
    vcpu: &VcpuFd,
    setup: &HypervSetup,
    vp_index: u32,
) -> Result<(), HypervError> {
    let kvm = Kvm::new().map_err(|e| HypervError::SupportedCpuid(errno_text(e.errno())))?;
    if setup.has("hv-vpindex") {
        if kvm.check_extension_raw(KVM_CAP_HYPERV_VP_INDEX.into()) > 0 {
            write_msrs(vcpu, &[(HV_X64_MSR_VP_INDEX, vp_index.into())])?;
        } else {
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: HV_X64_MSR_VP_INDEX,
                ..Default::default()
            }])
            .map_err(|_| HypervError::VpIndex)?;
            let read = vcpu
                .get_msrs(&mut msrs)
                .map_err(|e| HypervError::Msrs(errno_text(e.errno())))?;
            if read != 1 || msrs.as_slice()[0].data != u64::from(vp_index) {
                return Err(HypervError::VpIndex);
            }
        }
    }
    if setup.has("hv-synic") {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_HYPERV_SYNIC2,
            ..Default::default()
        };
        vcpu.enable_cap(&cap)
            .map_err(|e| HypervError::Synic(errno_text(e.errno())))?;
    }
    if setup.has("hv-evmcs") {
        let mut version: u16 = 0;
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_HYPERV_ENLIGHTENED_VMCS,
            ..Default::default()
        };
        cap.args[0] = std::ptr::addr_of_mut!(version) as u64;
        let desc = hv_feature("hv-evmcs").map_or("", |f| f.desc);
        vcpu.enable_cap(&cap)
            .map_err(|_| HypervError::NotSupported(desc))?;
        // KVM must support eVMCS version 1, the one QEMU exposes.
        let (min, max) = (version & 0xff, version >> 8);
        if !(min <= 1 && max >= 1) {
            return Err(HypervError::NotSupported(desc));
        }
    }
    Ok(())
}

/// The Hyper-V MSRs a system reset returns to their reset values (QEMU's `x86_cpu_reset`
/// clears them and `kvm_put_msrs` writes them back): the hypercall page and guest OS id,
/// and each enlightenment's own.
pub(crate) fn reset_msrs(vcpu: &VcpuFd, setup: &HypervSetup) -> Result<(), HypervError> {
    let mut msrs = vec![(HV_X64_MSR_GUEST_OS_ID, 0), (HV_X64_MSR_HYPERCALL, 0)];
    if setup.has("hv-vapic") {
        msrs.push((HV_X64_MSR_APIC_ASSIST_PAGE, 0));
    }
    if setup.has("hv-time") {
        msrs.push((HV_X64_MSR_REFERENCE_TSC, 0));
    }
    if setup.has("hv-reenlightenment") {
        msrs.push((HV_X64_MSR_REENLIGHTENMENT_CONTROL, 0));
        msrs.push((HV_X64_MSR_TSC_EMULATION_CONTROL, 0));
        msrs.push((HV_X64_MSR_TSC_EMULATION_STATUS, 0));
    }
    if setup.has("hv-synic") {
        msrs.push((HV_X64_MSR_SCONTROL, 0));
        msrs.push((HV_X64_MSR_SIEFP, 0));
        msrs.push((HV_X64_MSR_SIMP, 0));
        msrs.extend((0..16).map(|i| (HV_X64_MSR_SINT0 + i, HV_SINT_MASKED)));
    }
    if setup.has("hv-stimer") {
        msrs.extend((0..8).map(|i| (HV_X64_MSR_STIMER0_CONFIG + i, 0)));
    }
    write_msrs(vcpu, &msrs)
}

fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), HypervError> {
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let list =
        Msrs::from_entries(&entries).map_err(|_| HypervError::Msrs("too many MSRs".into()))?;
    let written = vcpu
        .set_msrs(&list)
        .map_err(|e| HypervError::Msrs(errno_text(e.errno())))?;
    if written != entries.len() {
        return Err(HypervError::Msrs(format!(
            "MSR 0x{:x} refused",
            entries[written].index
        )));
    }
    Ok(())
}

/// QEMU's `kvm_hv_handle_exit` for a machine without VMBus devices: SynIC MSR writes need
/// nothing from the VMM (KVM keeps the SynIC), and the message and event hypercalls find
/// no connection; other hypercalls are unknown codes.
pub(crate) fn handle_exit(run: &mut kvm_bindings::kvm_run) {
    // SAFETY: the exit reason is KVM_EXIT_HYPERV, so `hyperv` is the member KVM filled in.
    let exit = unsafe { &mut run.__bindgen_anon_1.hyperv };
    if exit.type_ == kvm_bindings::KVM_EXIT_HYPERV_HCALL {
        // SAFETY: the exit type says `hcall` is the member in use.
        let hcall = unsafe { &mut exit.u.hcall };
        hcall.result = match hcall.input & 0xffff {
            HV_POST_MESSAGE | HV_SIGNAL_EVENT => HV_STATUS_INVALID_CONNECTION_ID,
            _ => HV_STATUS_INVALID_HYPERCALL_CODE,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(features: &[&'static str]) -> HypervOptions {
        HypervOptions {
            features: features.iter().copied().collect(),
            ..Default::default()
        }
    }

    /// A kernel offering every enlightenment of the table.
    fn full_host() -> HvSupported {
        let mut feat = [0u32; 4];
        let mut info = [0u32; 4];
        for f in HV_FEATURES {
            for &(leaf, reg, bits) in f.flags {
                let regs = if leaf == HV_CPUID_FEATURES {
                    &mut feat
                } else {
                    &mut info
                };
                regs[match reg {
                    Reg::Eax => 0,
                    Reg::Ebx => 1,
                    Reg::Ecx => 2,
                    Reg::Edx => 3,
                }] |= bits;
            }
        }
        info[1] = 0x1234;
        HvSupported::from_leaves(vec![
            (
                HV_CPUID_VENDOR_AND_MAX_FUNCTIONS,
                [0x4000_000A, 0x7263_694D, 0x666F_736F, 0x7648_2074],
            ),
            (HV_CPUID_FEATURES, feat),
            (HV_CPUID_ENLIGHTMENT_INFO, info),
        ])
    }

    #[test]
    fn missing_kernel_support_is_refused_in_qemus_words() {
        let relaxed_only = HvSupported::from_leaves(vec![(
            HV_CPUID_ENLIGHTMENT_INFO,
            [HV_RELAXED_TIMING_RECOMMENDED, 0, 0, 0],
        )]);
        let err = expand(&opts(&["hv-relaxed", "hv-time"]), Some(&relaxed_only)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Hyper-V clocksources (hv-time) is not supported by kernel"
        );
        let err = expand(&opts(&["hv-relaxed"]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Hyper-V relaxed timing (hv-relaxed) is not supported by kernel"
        );
        // hv-passthrough without kernel support gives nothing, as in QEMU.
        let pass = HypervOptions {
            passthrough: true,
            ..Default::default()
        };
        assert_eq!(expand(&pass, None).unwrap(), None);
        assert_eq!(expand(&HypervOptions::default(), None).unwrap(), None);
    }

    #[test]
    fn dependencies_are_checked() {
        let host = full_host();
        let err = expand(&opts(&["hv-stimer", "hv-synic", "hv-vpindex"]), Some(&host)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Hyper-V synthetic timers (hv-stimer) requires Hyper-V clocksources (hv-time)"
        );
        let err = expand(&opts(&["hv-synic"]), Some(&host)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Hyper-V synthetic interrupt controller (hv-synic) requires Hyper-V VP_INDEX MSR (hv-vpindex)"
        );
        let err = expand(&opts(&["hv-tlbflush"]), Some(&host)).unwrap_err();
        assert!(err
            .to_string()
            .ends_with("requires Hyper-V VP_INDEX MSR (hv-vpindex)"));
    }

    #[test]
    fn leaves_follow_qemus_layout() {
        let host = full_host();
        let mut o = opts(&[
            "hv-relaxed",
            "hv-vapic",
            "hv-time",
            "hv-vpindex",
            "hv-synic",
        ]);
        o.spinlocks = 0x1fff;
        let setup = expand(&o, Some(&host)).unwrap().unwrap();
        let leaves = fill_cpuids(&setup);
        let leaf = |l: u32| {
            leaves
                .iter()
                .find(|(f, _)| *f == l)
                .map(|(_, r)| *r)
                .unwrap()
        };
        let v = leaf(HV_CPUID_VENDOR_AND_MAX_FUNCTIONS);
        assert_eq!(v[0], HV_CPUID_IMPLEMENT_LIMITS);
        let vendor: Vec<u8> = v[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&vendor, b"Microsoft Hv");
        assert_eq!(leaf(HV_CPUID_INTERFACE), [0x3123_7648, 0, 0, 0]);
        assert_eq!(leaf(HV_CPUID_VERSION), [0x3839, 0xA << 16, 0, 0]);
        let f = leaf(HV_CPUID_FEATURES);
        assert_eq!(
            f[0],
            HV_HYPERCALL_AVAILABLE
                | HV_APIC_ACCESS_AVAILABLE
                | HV_TIME_REF_COUNT_AVAILABLE
                | HV_REFERENCE_TSC_AVAILABLE
                | HV_VP_INDEX_AVAILABLE
                | HV_SYNIC_AVAILABLE
        );
        assert_eq!(f[1], HV_POST_MESSAGES | HV_SIGNAL_EVENTS);
        assert_eq!(f[3], HV_CPU_DYNAMIC_PARTITIONING_AVAILABLE);
        assert_eq!(
            leaf(HV_CPUID_ENLIGHTMENT_INFO),
            [
                HV_RELAXED_TIMING_RECOMMENDED | HV_APIC_ACCESS_RECOMMENDED,
                0x1fff,
                0,
                0
            ]
        );
        assert_eq!(leaf(HV_CPUID_IMPLEMENT_LIMITS), [0xFFFF_FFFF, 64, 0, 0]);
        assert_eq!(leaves.len(), 6, "no nested leaf without hv-evmcs");

        // hv-evmcs adds the zeroed 0x40000006..9 and the nested leaf with eVMCS 1..1.
        let evmcs = expand(&opts(&["hv-vapic", "hv-evmcs"]), Some(&host))
            .unwrap()
            .unwrap();
        let leaves = fill_cpuids(&evmcs);
        assert_eq!(leaves[0].1[0], HV_CPUID_NESTED_FEATURES);
        assert_eq!(leaves.len(), 11);
        assert_eq!(
            leaves[10],
            (HV_CPUID_NESTED_FEATURES, [DEFAULT_EVMCS_VERSION, 0, 0, 0])
        );
    }

    #[test]
    fn passthrough_takes_the_kernels_features_and_identity() {
        let host = full_host();
        let pass = HypervOptions {
            passthrough: true,
            ..Default::default()
        };
        let setup = expand(&pass, Some(&host)).unwrap().unwrap();
        assert_eq!(setup.features.len(), HV_FEATURES.len());
        let leaves = fill_cpuids(&setup);
        let vendor: Vec<u8> = leaves[0].1[1..]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&vendor, b"Microsoft Hv");
        assert_eq!(leaves[4].1[1], 0x1234, "the kernel's spinlock count");
    }

    #[test]
    fn kvm_leaves_move_to_0x40000100() {
        let host = full_host();
        let setup = expand(&opts(&["hv-relaxed"]), Some(&host))
            .unwrap()
            .unwrap();
        let mut entries = vec![
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ebx: 0x4b4d_564b,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0x1,
                ..Default::default()
            },
        ];
        place_leaves(&mut entries, &setup);
        assert_eq!(
            (entries[0].function, entries[0].eax, entries[0].ebx),
            (0x4000_0100, 0x4000_0101, 0x4b4d_564b)
        );
        assert_eq!((entries[1].function, entries[1].eax), (0x4000_0101, 1));
        assert!(entries
            .iter()
            .any(|e| e.function == 0x4000_0000 && e.eax == HV_CPUID_IMPLEMENT_LIMITS));
    }
}
