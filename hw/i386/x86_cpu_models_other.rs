//! x86 CPU models of other vendors (Hygon, Centaur): QEMU's `builtin_x86_defs` (`target/i386/cpu.c`) as data.
//!
//! Each version lists what it changes from the previous one; `x86_cpu_models.rs`
//! registers one QOM type per model, version and alias.

use super::x86_cpu_models::{X86CpuDefinition, X86CpuVersion};

/// The models, in `-cpu help` order.
#[rustfmt::skip]
pub const MODELS: &[X86CpuDefinition] = &[
    X86CpuDefinition {
        name: "Dhyana",
        vendor: "HygonGenuine",
        family: 24,
        model: 0,
        stepping: 1,
        level: 0xd,
        xlevel: 0x8000001e,
        model_id: "Hygon Dhyana Processor",
        features: &[
            "3dnowprefetch", "abm", "adx", "apic", "arat", "avx", "avx2", "bmi1", "bmi2",
            "clflush", "clflushopt", "cmov", "cr8legacy", "cx16", "cx8", "de", "f16c", "fma",
            "fpu", "fsgsbase", "fxsr", "fxsr-opt", "hypervisor", "ibpb", "lahf-lm", "lm", "mca",
            "mce", "misalignsse", "mmx", "mmxext", "monitor", "movbe", "msr", "mtrr", "npt",
            "nrip-save", "nx", "osvw", "pae", "pat", "pdpe1gb", "pge", "pni", "popcnt", "pse",
            "pse36", "rdrand", "rdseed", "rdtscp", "sep", "smap", "smep", "sse", "sse2",
            "sse4.1", "sse4.2", "sse4a", "ssse3", "svm", "syscall", "topoext", "tsc", "vme",
            "xgetbv1", "xsave", "xsavec", "xsaveopt",
        ],
        versions: &[
            X86CpuVersion { version: 1, alias: None, note: None, props: &[] },
            X86CpuVersion { version: 2, alias: None, note: Some("XSAVES"), props: &[("xsaves", "on")] },
        ],
    },
];
