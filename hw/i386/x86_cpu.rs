//! x86 CPU models (QEMU's `target/i386/cpu.c`): the abstract `x86_64-cpu`, the models
//! `qemu64`, `max` and `host`, CPUID feature names, and `-cpu MODEL,+feat,-feat,prop=value`.
//!
//! The model says which features the guest should see; the accelerator intersects that with
//! what it supports (`KVM_GET_SUPPORTED_CPUID`) when it creates the vCPU.

use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_regs, kvm_sregs};
use parking_lot::Mutex;
use qom::{
    type_init, ClassInitFor, Error, ObjectClass, ObjectRef, Prop, Property, PropertyKind,
    StateAccessor, Value,
};

use crate::core::cpu::{CpuImpl, CpuState};
use crate::core::machine::SmpConfig;
use crate::core::qdev::{DeviceContext, DeviceImpl, RealizeError};

/// QEMU's `TYPE_X86_CPU` for a 64-bit target.
pub const TYPE_X86_CPU: &str = "x86_64-cpu";
/// Suffix of model type names (`qemu64-x86_64-cpu`).
pub const X86_CPU_SUFFIX: &str = "-x86_64-cpu";

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One named CPUID feature bit.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    /// QEMU's name (`x2apic`, `sse4.2`).
    pub name: &'static str,
    /// CPUID leaf.
    pub leaf: u32,
    /// CPUID subleaf.
    pub subleaf: u32,
    /// Register.
    pub reg: Reg,
    /// Bit.
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf: 0,
        reg,
        bit,
    }
}

/// The feature bits qomvm knows by name, with QEMU's names.
pub const FEATURES: &[Feature] = &[
    f("fpu", 1, Reg::Edx, 0),
    f("vme", 1, Reg::Edx, 1),
    f("de", 1, Reg::Edx, 2),
    f("pse", 1, Reg::Edx, 3),
    f("tsc", 1, Reg::Edx, 4),
    f("msr", 1, Reg::Edx, 5),
    f("pae", 1, Reg::Edx, 6),
    f("mce", 1, Reg::Edx, 7),
    f("cx8", 1, Reg::Edx, 8),
    f("apic", 1, Reg::Edx, 9),
    f("sep", 1, Reg::Edx, 11),
    f("mtrr", 1, Reg::Edx, 12),
    f("pge", 1, Reg::Edx, 13),
    f("mca", 1, Reg::Edx, 14),
    f("cmov", 1, Reg::Edx, 15),
    f("pat", 1, Reg::Edx, 16),
    f("pse36", 1, Reg::Edx, 17),
    f("clflush", 1, Reg::Edx, 19),
    f("mmx", 1, Reg::Edx, 23),
    f("fxsr", 1, Reg::Edx, 24),
    f("sse", 1, Reg::Edx, 25),
    f("sse2", 1, Reg::Edx, 26),
    f("ss", 1, Reg::Edx, 27),
    f("ht", 1, Reg::Edx, 28),
    f("pni", 1, Reg::Ecx, 0),
    f("pclmulqdq", 1, Reg::Ecx, 1),
    f("monitor", 1, Reg::Ecx, 3),
    f("vmx", 1, Reg::Ecx, 5),
    f("ssse3", 1, Reg::Ecx, 9),
    f("fma", 1, Reg::Ecx, 12),
    f("cx16", 1, Reg::Ecx, 13),
    f("pcid", 1, Reg::Ecx, 17),
    f("sse4.1", 1, Reg::Ecx, 19),
    f("sse4.2", 1, Reg::Ecx, 20),
    f("x2apic", 1, Reg::Ecx, 21),
    f("movbe", 1, Reg::Ecx, 22),
    f("popcnt", 1, Reg::Ecx, 23),
    f("tsc-deadline", 1, Reg::Ecx, 24),
    f("aes", 1, Reg::Ecx, 25),
    f("xsave", 1, Reg::Ecx, 26),
    f("avx", 1, Reg::Ecx, 28),
    f("f16c", 1, Reg::Ecx, 29),
    f("rdrand", 1, Reg::Ecx, 30),
    f("hypervisor", 1, Reg::Ecx, 31),
    f("fsgsbase", 7, Reg::Ebx, 0),
    f("bmi1", 7, Reg::Ebx, 3),
    f("avx2", 7, Reg::Ebx, 5),
    f("smep", 7, Reg::Ebx, 7),
    f("bmi2", 7, Reg::Ebx, 8),
    f("erms", 7, Reg::Ebx, 9),
    f("invpcid", 7, Reg::Ebx, 10),
    f("rdseed", 7, Reg::Ebx, 18),
    f("adx", 7, Reg::Ebx, 19),
    f("smap", 7, Reg::Ebx, 20),
    f("syscall", 0x8000_0001, Reg::Edx, 11),
    f("nx", 0x8000_0001, Reg::Edx, 20),
    f("pdpe1gb", 0x8000_0001, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, Reg::Edx, 27),
    f("lm", 0x8000_0001, Reg::Edx, 29),
    f("lahf_lm", 0x8000_0001, Reg::Ecx, 0),
    f("svm", 0x8000_0001, Reg::Ecx, 2),
    f("abm", 0x8000_0001, Reg::Ecx, 5),
    f("sse4a", 0x8000_0001, Reg::Ecx, 6),
    f("3dnowprefetch", 0x8000_0001, Reg::Ecx, 8),
];

/// Looks a feature up by QEMU's name (also `sse4_1` for `sse4.1`, `sse3` for `pni`).
pub fn feature_by_name(name: &str) -> Option<&'static Feature> {
    let canonical = match name {
        "sse3" => "pni",
        "sse4_1" => "sse4.1",
        "sse4_2" => "sse4.2",
        other => other,
    };
    FEATURES.iter().find(|f| f.name == canonical)
}

/// A CPU model (QEMU's `X86CPUDefinition`).
#[derive(Debug)]
pub struct X86CpuModel {
    /// `-cpu` name.
    pub name: &'static str,
    /// `-cpu help` description.
    pub description: &'static str,
    /// CPUID vendor string; `None` keeps the host's.
    pub vendor: Option<&'static str>,
    /// Family, model, stepping for CPUID leaf 1.
    pub family: u32,
    /// Model number.
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// Brand string (leaves 0x80000002..4); `None` keeps the host's.
    pub model_id: Option<&'static str>,
    /// Features of the model; ignored for pass-through models.
    pub features: &'static [&'static str],
    /// `max` and `host`: every feature the accelerator supports.
    pub passthrough: bool,
}

/// QEMU's `qemu64` (features of `builtin_x86_defs`, plus what QEMU's KVM defaults add:
/// `x2apic` and `hypervisor`, minus what they remove: `svm`, so that `-cpu qemu64` does
/// not warn on hosts without nested virtualisation).
pub const QEMU64: X86CpuModel = X86CpuModel {
    name: "qemu64",
    description: "QEMU Virtual CPU version 2.5+",
    vendor: Some("AuthenticAMD"),
    family: 15,
    model: 107,
    stepping: 1,
    model_id: Some("QEMU Virtual CPU version 2.5+"),
    features: &[
        "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge",
        "mca", "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "pni", "cx16",
        "lm", "syscall", "nx", "lahf_lm", "x2apic", "hypervisor",
    ],
    passthrough: false,
};

/// QEMU's `max`: everything the accelerator can give.
pub const MAX: X86CpuModel = X86CpuModel {
    name: "max",
    description: "Enables all features supported by the accelerator in the current host",
    vendor: None,
    family: 0,
    model: 0,
    stepping: 0,
    model_id: None,
    features: &[],
    passthrough: true,
};

/// QEMU's `host`: the host CPU as KVM can expose it.
pub const HOST: X86CpuModel = X86CpuModel {
    name: "host",
    description: "processor with all supported host features",
    vendor: None,
    family: 0,
    model: 0,
    stepping: 0,
    model_id: None,
    features: &[],
    passthrough: true,
};

/// The class level of x86 CPUs: the model the type instantiates.
#[derive(Clone, Debug)]
pub struct X86CpuClass {
    /// The model (`None` for the abstract type).
    pub model: Option<&'static X86CpuModel>,
}

/// An x86 CPU model type: QEMU's `X86CPUDefinition` registered as a class.
pub trait X86CpuModelImpl: CpuImpl {
    /// The model.
    const MODEL: &'static X86CpuModel;
}

/// The register state a loader wants a CPU to start with, instead of the reset state.
#[derive(Clone, Copy, Debug, Default)]
pub struct X86BootState {
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, descriptor tables.
    pub sregs: kvm_sregs,
}

/// What an x86 CPU instance holds (QEMU's `X86CPU`).
#[derive(qom::Object)]
#[qom(name = TYPE_X86_CPU, abstract, class_level)]
pub struct X86Cpu {
    #[parent]
    parent: CpuState,
    #[property(desc = "CPUID vendor string (12 characters)")]
    vendor: Prop<Option<String>>,
    apic_id: AtomicU32,
    /// Features turned on or off on the command line, in order.
    overrides: Mutex<Vec<(&'static Feature, bool)>>,
    boot: Mutex<Option<X86BootState>>,
    thread_id: AtomicU32,
}

type_init!(X86Cpu {
    class_init: Some(x86_cpu_base_class_init),
});

impl X86Cpu {
    /// The `vendor=` string, if set.
    pub fn vendor(&self) -> Option<String> {
        self.vendor.get()
    }
    /// The local APIC ID.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }
    /// Features forced on (`true`) or off (`false`), in command-line order.
    pub fn feature_overrides(&self) -> Vec<(&'static Feature, bool)> {
        self.overrides.lock().clone()
    }
    /// Sets the state the CPU starts in (a kernel loader's entry state).
    pub fn set_boot_state(&self, state: X86BootState) {
        *self.boot.lock() = Some(state);
    }
    /// The loader's start state, if any.
    pub fn boot_state(&self) -> Option<X86BootState> {
        *self.boot.lock()
    }
    /// Records the host thread id of the vCPU thread (for `query-cpus-fast`).
    pub fn set_thread_id(&self, tid: u32) {
        self.thread_id.store(tid, Ordering::Relaxed);
    }
    /// The host thread id of the vCPU thread, 0 before it starts.
    pub fn thread_id(&self) -> u32 {
        self.thread_id.load(Ordering::Relaxed)
    }
    /// The model this CPU instantiates.
    pub fn model(&self) -> Option<&'static X86CpuModel> {
        self.try_object()?.class().get::<X86CpuClass>()?.model
    }
    /// Whether the model plus the command-line overrides turn `feature` on.
    pub fn feature_enabled(&self, feature: &str) -> bool {
        let forced = self
            .overrides
            .lock()
            .iter()
            .rev()
            .find(|(f, _)| f.name == feature)
            .map(|(_, on)| *on);
        let in_model = self
            .model()
            .is_some_and(|m| m.passthrough || m.features.contains(&feature));
        forced.unwrap_or(in_model)
    }
    /// The features the model plus overrides ask for (`-cpu help` and tests use it).
    pub fn requested_features(&self) -> Vec<&'static Feature> {
        FEATURES
            .iter()
            .filter(|f| self.feature_enabled(f.name))
            .collect()
    }
}

/// Realize errors of x86 CPUs.
#[derive(Debug, thiserror::Error)]
enum X86CpuError {
    #[error("property 'vendor' must be 12 characters, not '{0}'")]
    Vendor(String),
    #[error("CPU {0}: the machine has no accelerator to run it")]
    NoAccelerator(String),
}

impl DeviceImpl for X86Cpu {
    const DESCRIPTION: Option<&'static str> = Some("x86 CPU");

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        if let Some(vendor) = self.vendor.get().filter(|v| v.len() != 12) {
            return Err(RealizeError::device(X86CpuError::Vendor(vendor)));
        }
        let no_accel = || RealizeError::device(X86CpuError::NoAccelerator(ctx.type_name().into()));
        let ops = ctx.machine().map_err(|_| no_accel())?.accel_ops().ok_or_else(no_accel)?;
        // QEMU's qemu_init_vcpu: start the thread and wait until it reports created.
        ops.create_vcpu_thread(ctx.object())?;
        DeviceImpl::realize(&self.parent, ctx)
    }
}

impl CpuImpl for X86Cpu {
    fn set_topology(&self, index: u32, smp: &SmpConfig) {
        self.apic_id
            .store(apic_id_from_index(index, smp.cores, smp.threads), Ordering::Relaxed);
    }

    fn parse_features(&self, cpu: &ObjectRef, options: &str) -> Result<(), Error> {
        apply_cpu_options(cpu, options)
    }
}

static APIC_ID: StateAccessor<X86Cpu> = StateAccessor {
    get: |cpu, _| Value::Uint(cpu.apic_id().into()),
    set: Some(|cpu, _, value| {
        if let Value::Uint(v) = value {
            cpu.apic_id.store(v as u32, Ordering::Relaxed);
        }
        Ok(())
    }),
};

/// One bool property per CPUID feature name, as QEMU has.
static FEATURE: StateAccessor<X86Cpu> = StateAccessor {
    get: |cpu, prop| Value::Bool(cpu.feature_enabled(&prop.name)),
    set: Some(|cpu, prop, value| {
        let feature = feature_by_name(&prop.name).ok_or_else(|| Error::PropertyNotFound {
            type_name: TYPE_X86_CPU.to_string(),
            name: prop.name.to_string(),
        })?;
        if let Value::Bool(on) = value {
            cpu.overrides.lock().push((feature, on));
        }
        Ok(())
    }),
};

/// The abstract `x86_64-cpu` class: `apic-id`, `vendor` and the feature flags.
fn x86_cpu_base_class_init(class: &mut ObjectClass) {
    <CpuState as ClassInitFor<X86Cpu>>::class_init(class);
    class.insert(X86CpuClass { model: None });
    class.add_property(Property::state(
        "apic-id",
        PropertyKind::Uint(32),
        "Local APIC ID",
        &APIC_ID,
    ));
    for feature in FEATURES {
        class.add_property(Property::state(
            feature.name,
            PropertyKind::Bool,
            "CPUID feature",
            &FEATURE,
        ));
    }
}

/// Each model type's class: the x86 CPU class with its model.
impl<T: X86CpuModelImpl> ClassInitFor<T> for X86Cpu {
    fn class_init(class: &mut ObjectClass) {
        <CpuState as ClassInitFor<T>>::class_init(class);
        class.insert(X86CpuClass {
            model: Some(T::MODEL),
        });
    }
}

/// Declares the QOM type of a CPU model: `<name>-x86_64-cpu` (QEMU's
/// `x86_register_cpudef_types`).
macro_rules! x86_cpu_model {
    ($ty:ident, $type_name:literal, $model:path) => {
        #[doc = concat!("The `", $type_name, "` model type.")]
        #[derive(qom::Object)]
        #[qom(name = $type_name)]
        pub struct $ty {
            #[parent]
            parent: X86Cpu,
        }

        impl DeviceImpl for $ty {}

        impl CpuImpl for $ty {
            const MODEL_NAME: &'static str = $model.name;
            const MODEL_DESCRIPTION: Option<&'static str> = Some($model.description);

            fn set_topology(&self, index: u32, smp: &SmpConfig) {
                CpuImpl::set_topology(&self.parent, index, smp)
            }

            fn parse_features(&self, cpu: &ObjectRef, options: &str) -> Result<(), Error> {
                CpuImpl::parse_features(&self.parent, cpu, options)
            }
        }

        impl X86CpuModelImpl for $ty {
            const MODEL: &'static X86CpuModel = &$model;
        }

        type_init!($ty);
    };
}

x86_cpu_model!(Qemu64X86Cpu, "qemu64-x86_64-cpu", QEMU64);
x86_cpu_model!(MaxX86Cpu, "max-x86_64-cpu", MAX);
x86_cpu_model!(HostX86Cpu, "host-x86_64-cpu", HOST);

/// Applies `-cpu MODEL,+feat,-feat,feat=on,prop=value` (everything after the model) to a
/// CPU before realize (QEMU's `x86_cpu_parse_featurestr`).
pub fn apply_cpu_options(cpu: &qom::Object, options: &str) -> Result<(), Error> {
    for item in options.split(',').filter(|s| !s.is_empty()) {
        let (name, value) = if let Some(feat) = item.strip_prefix('+') {
            (feat, "on")
        } else if let Some(feat) = item.strip_prefix('-') {
            (feat, "off")
        } else if let Some((k, v)) = item.split_once('=') {
            (k, v)
        } else {
            (item, "on")
        };
        let name = feature_by_name(name).map_or(name, |f| f.name);
        cpu.property_parse(name, value)?;
    }
    Ok(())
}

/// x86 APIC ID of CPU `index` for a topology, as QEMU's `x86_apicid_from_cpu_idx`: thread,
/// core and socket fields each as wide as their count needs.
pub fn apic_id_from_index(index: u32, cores: u32, threads: u32) -> u32 {
    let bits = |n: u32| if n <= 1 { 0 } else { 32 - (n - 1).leading_zeros() };
    let thread_bits = bits(threads);
    let core_bits = bits(cores);
    let thread = index % threads;
    let core = (index / threads) % cores;
    let socket = index / (threads * cores);
    (socket << (core_bits + thread_bits)) | (core << thread_bits) | thread
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_follow_qemus_topology_encoding() {
        assert_eq!(apic_id_from_index(3, 1, 1), 3);
        // 3 cores need 2 bits: socket 1 starts at 4.
        assert_eq!(apic_id_from_index(3, 3, 1), 4);
        assert_eq!(apic_id_from_index(5, 2, 2), 5);
        assert_eq!(apic_id_from_index(2, 1, 2), 2);
    }

    #[test]
    fn feature_aliases_resolve() {
        assert_eq!(feature_by_name("sse4_2").unwrap().name, "sse4.2");
        assert_eq!(feature_by_name("sse3").unwrap().name, "pni");
        assert!(feature_by_name("warp-drive").is_none());
    }
}
