//! The CPUID feature words and their bit names (QEMU's `feature_word_info` in
//! `target/i386/cpu.c`): which leaf, subleaf and register each word is, and the name QEMU
//! gives each bit. Data only; `x86_cpu.rs` turns it into properties and `-cpu` names.

use super::x86_cpu::Reg;

/// One 32-bit CPUID feature word: where it lives and the names of its bits.
#[derive(Debug)]
pub struct FeatureWord {
    /// QEMU's name of the word (`FEAT_1_ECX`), for messages and listings.
    pub id: &'static str,
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// CPUID subleaf (ECX input), for leaves that take one.
    pub subleaf: Option<u32>,
    /// Output register.
    pub reg: Reg,
    /// Bit names, bit 0 first; `""` for bits without a name.
    pub names: [&'static str; 32],
}

/// Every CPUID feature word QEMU names, in QEMU's order.
#[rustfmt::skip]
pub static FEATURE_WORDS: &[FeatureWord] = &[
    FeatureWord { id: "FEAT_1_EDX", leaf: 1, subleaf: None, reg: Reg::Edx, names: [
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce",
        "cx8", "apic", "", "sep", "mtrr", "pge", "mca", "cmov",
        "pat", "pse36", "pn", "clflush", "", "ds", "acpi", "mmx",
        "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe",
    ] },
    FeatureWord { id: "FEAT_1_ECX", leaf: 1, subleaf: None, reg: Reg::Ecx, names: [
        "pni", "pclmulqdq", "dtes64", "monitor", "ds-cpl", "vmx", "smx", "est",
        "tm2", "ssse3", "cid", "", "fma", "cx16", "xtpr", "pdcm",
        "", "pcid", "dca", "sse4.1", "sse4.2", "x2apic", "movbe", "popcnt",
        "tsc-deadline", "aes", "xsave", "", "avx", "f16c", "rdrand", "hypervisor",
    ] },
    FeatureWord { id: "FEAT_8000_0001_EDX", leaf: 0x8000_0001, subleaf: None, reg: Reg::Edx, names: [
        "", "", "", "", "", "", "", "",
        "", "", "", "syscall", "", "", "", "",
        "", "", "", "", "nx", "", "mmxext", "",
        "", "fxsr-opt", "pdpe1gb", "rdtscp", "", "lm", "3dnowext", "3dnow",
    ] },
    FeatureWord { id: "FEAT_8000_0001_ECX", leaf: 0x8000_0001, subleaf: None, reg: Reg::Ecx, names: [
        "lahf-lm", "cmp-legacy", "svm", "extapic", "cr8legacy", "abm", "sse4a", "misalignsse",
        "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", "", "lwp",
        "fma4", "tce", "", "nodeid-msr", "", "tbm", "topoext", "perfctr-core",
        "perfctr-nb", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_C000_0001_EDX", leaf: 0xC000_0001, subleaf: None, reg: Reg::Edx, names: [
        "", "", "xstore", "xstore-en", "", "", "xcrypt", "xcrypt-en",
        "ace2", "ace2-en", "phe", "phe-en", "pmm", "pmm-en", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    // KVM's paravirtual features (KVM_CPUID_FEATURES); `kvmclock` names bits 0 and 3.
    FeatureWord { id: "FEAT_KVM", leaf: 0x4000_0001, subleaf: None, reg: Reg::Eax, names: [
        "kvmclock", "kvm-nopiodelay", "kvm-mmu", "kvmclock", "kvm-asyncpf", "kvm-steal-time", "kvm-pv-eoi", "kvm-pv-unhalt",
        "", "kvm-pv-tlb-flush", "kvm-asyncpf-vmexit", "kvm-pv-ipi", "kvm-poll-control", "kvm-pv-sched-yield", "kvm-asyncpf-int", "kvm-msi-ext-dest-id",
        "", "", "", "", "", "", "", "",
        "kvmclock-stable-bit", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_KVM_HINTS", leaf: 0x4000_0001, subleaf: None, reg: Reg::Edx, names: [
        "kvm-hint-dedicated", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_SVM", leaf: 0x8000_000A, subleaf: None, reg: Reg::Edx, names: [
        "npt", "lbrv", "svm-lock", "nrip-save", "tsc-scale", "vmcb-clean", "flushbyasid", "decodeassists",
        "", "", "pause-filter", "", "pfthreshold", "avic", "", "v-vmsave-vmload",
        "vgif", "", "", "", "", "", "", "",
        "", "vnmi", "", "", "svme-addr-chk", "", "", "",
    ] },
    FeatureWord { id: "FEAT_7_0_EBX", leaf: 7, subleaf: Some(0), reg: Reg::Ebx, names: [
        "fsgsbase", "tsc-adjust", "sgx", "bmi1", "hle", "avx2", "fdp-excptn-only", "smep",
        "bmi2", "erms", "invpcid", "rtm", "", "zero-fcs-fds", "mpx", "",
        "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "pcommit", "clflushopt",
        "clwb", "intel-pt", "avx512pf", "avx512er", "avx512cd", "sha-ni", "avx512bw", "avx512vl",
    ] },
    FeatureWord { id: "FEAT_7_0_ECX", leaf: 7, subleaf: Some(0), reg: Reg::Ecx, names: [
        "", "avx512vbmi", "umip", "pku", "", "waitpkg", "avx512vbmi2", "",
        "gfni", "vaes", "vpclmulqdq", "avx512vnni", "avx512bitalg", "", "avx512-vpopcntdq", "",
        "la57", "", "", "", "", "", "rdpid", "",
        "bus-lock-detect", "cldemote", "", "movdiri", "movdir64b", "", "sgxlc", "pks",
    ] },
    FeatureWord { id: "FEAT_7_0_EDX", leaf: 7, subleaf: Some(0), reg: Reg::Edx, names: [
        "", "", "avx512-4vnniw", "avx512-4fmaps", "fsrm", "", "", "",
        "avx512-vp2intersect", "", "md-clear", "", "", "", "serialize", "",
        "tsx-ldtrk", "", "", "arch-lbr", "", "", "amx-bf16", "avx512-fp16",
        "amx-tile", "amx-int8", "spec-ctrl", "stibp", "flush-l1d", "arch-capabilities", "core-capability", "ssbd",
    ] },
    FeatureWord { id: "FEAT_7_1_EAX", leaf: 7, subleaf: Some(1), reg: Reg::Eax, names: [
        "sha512", "sm3", "sm4", "", "avx-vnni", "avx512-bf16", "", "cmpccxadd",
        "", "", "fzrm", "fsrs", "fsrc", "", "", "",
        "", "fred", "lkgs", "wrmsrns", "", "amx-fp16", "", "avx-ifma",
        "", "", "lam", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_7_1_EDX", leaf: 7, subleaf: Some(1), reg: Reg::Edx, names: [
        "", "", "", "", "avx-vnni-int8", "avx-ne-convert", "", "",
        "amx-complex", "", "avx-vnni-int16", "", "", "", "prefetchiti", "",
        "", "", "", "avx10", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_7_2_EDX", leaf: 7, subleaf: Some(2), reg: Reg::Edx, names: [
        "intel-psfd", "ipred-ctrl", "rrsba-ctrl", "ddpd-u", "bhi-ctrl", "mcdt-no", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_24_0_EBX", leaf: 0x24, subleaf: Some(0), reg: Reg::Ebx, names: [
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "avx10-128", "avx10-256", "avx10-512", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_8000_0007_EDX", leaf: 0x8000_0007, subleaf: None, reg: Reg::Edx, names: [
        "", "", "", "", "", "", "", "",
        "invtsc", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_8000_0007_EBX", leaf: 0x8000_0007, subleaf: None, reg: Reg::Ebx, names: [
        "overflow-recov", "succor", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_8000_0008_EBX", leaf: 0x8000_0008, subleaf: None, reg: Reg::Ebx, names: [
        "clzero", "", "xsaveerptr", "", "", "", "", "",
        "", "wbnoinvd", "", "", "ibpb", "", "ibrs", "amd-stibp",
        "", "stibp-always-on", "", "", "", "", "", "",
        "amd-ssbd", "virt-ssbd", "amd-no-ssb", "", "amd-psfd", "", "", "",
    ] },
    FeatureWord { id: "FEAT_8000_0021_EAX", leaf: 0x8000_0021, subleaf: None, reg: Reg::Eax, names: [
        "no-nested-data-bp", "", "lfence-always-serializing", "", "", "", "null-sel-clr-base", "",
        "auto-ibrs", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "eraps", "", "", "sbpb", "ibpb-brtype", "srso-no", "srso-user-kernel-no", "",
    ] },
    FeatureWord { id: "FEAT_8000_0022_EAX", leaf: 0x8000_0022, subleaf: None, reg: Reg::Eax, names: [
        "perfmon-v2", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_XSAVE", leaf: 0xD, subleaf: Some(1), reg: Reg::Eax, names: [
        "xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_6_EAX", leaf: 6, subleaf: None, reg: Reg::Eax, names: [
        "", "", "arat", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_14_0_ECX", leaf: 0x14, subleaf: Some(0), reg: Reg::Ecx, names: [
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "intel-pt-lip",
    ] },
    FeatureWord { id: "FEAT_SGX_12_0_EAX", leaf: 0x12, subleaf: Some(0), reg: Reg::Eax, names: [
        "sgx1", "sgx2", "", "", "", "", "", "",
        "", "", "", "sgx-edeccssa", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_SGX_12_0_EBX", leaf: 0x12, subleaf: Some(0), reg: Reg::Ebx, names: [
        "sgx-exinfo", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    FeatureWord { id: "FEAT_SGX_12_1_EAX", leaf: 0x12, subleaf: Some(1), reg: Reg::Eax, names: [
        "", "sgx-debug", "sgx-mode64", "", "sgx-provisionkey", "sgx-tokenkey", "", "sgx-kss",
        "", "", "sgx-aex-notify", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
];

/// Old spellings QEMU still accepts, and the name each stands for
/// (`x86_cpu_register_feature_bit_props`' aliases and `feat2prop`'s legacy names).
pub const FEATURE_ALIASES: &[(&str, &str)] = &[
    ("sse3", "pni"),
    ("pclmuldq", "pclmulqdq"),
    ("sse4-1", "sse4.1"),
    ("sse4-2", "sse4.2"),
    ("xd", "nx"),
    ("ffxsr", "fxsr-opt"),
    ("i64", "lm"),
];

