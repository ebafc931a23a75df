//! x86 CPUs (QEMU's `target/i386/cpu.c`): the abstract `x86_64-cpu`, the resolved model
//! each type instantiates (the tables of `x86_cpu_models*.rs`, and `max`, `host`, `base`),
//! CPUID feature names (`x86_cpu_features.rs`), and `-cpu MODEL,+feat,-feat,prop=value`.
//!
//! The model says which features the guest should see; the accelerator intersects that with
//! what it supports (`KVM_GET_SUPPORTED_CPUID`) when it creates the vCPU.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::LazyLock;

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use parking_lot::Mutex;
use qom::{
    type_init, ClassInitFor, Error, ObjectClass, ObjectRef, Prop, Property, PropertyKind,
    StateAccessor, Value,
};

use super::x86_cpu_features::{FeatureWord, FEATURE_ALIASES, FEATURE_WORDS};
use super::x86_cpu_hyperv::{hv_feature, HypervOptions, HV_FEATURES};
use super::x86_cpu_models::{model_cache, ModelCache, X86CpuModelEntry};
use crate::core::cpu::{CpuClass, CpuImpl, CpuState};
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
    /// The word it belongs to.
    pub word: &'static FeatureWord,
    /// Bit.
    pub bit: u8,
}

impl Feature {
    /// CPUID leaf.
    pub fn leaf(&self) -> u32 {
        self.word.leaf
    }
    /// CPUID subleaf (0 for leaves without one).
    pub fn subleaf(&self) -> u32 {
        self.word.subleaf.unwrap_or(0)
    }
    /// Output register.
    pub fn reg(&self) -> Reg {
        self.word.reg
    }
    /// QEMU's description of the bit in its warnings: `CPUID.01H:ECX.vmx [bit 5]`.
    pub fn describe(&self) -> String {
        let reg = match self.word.reg {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        };
        format!(
            "CPUID.{:02X}H:{reg}.{} [bit {}]",
            self.word.leaf, self.name, self.bit
        )
    }
}

/// Every named feature bit, word by word (`kvmclock` twice: it names two bits).
pub fn features() -> &'static [Feature] {
    static ALL: LazyLock<Vec<Feature>> = LazyLock::new(|| {
        FEATURE_WORDS
            .iter()
            .flat_map(|word| {
                word.names
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| !n.is_empty())
                    .map(move |(bit, name)| Feature {
                        name,
                        word,
                        bit: bit as u8,
                    })
            })
            .collect()
    });
    &ALL
}

/// The distinct feature names, sorted (`-cpu help`'s list and the bool properties).
pub fn feature_names() -> &'static [&'static str] {
    static NAMES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
        let set: BTreeSet<&'static str> = features().iter().map(|f| f.name).collect();
        set.into_iter().collect()
    });
    &NAMES
}

/// The bits a feature name stands for.
pub fn feature_bits(name: &str) -> impl Iterator<Item = &'static Feature> + '_ {
    features().iter().filter(move |f| f.name == name)
}

/// QEMU's spelling of a feature name as `-cpu` and properties accept it: `_` and `-` are
/// the same (`feat2prop`), and old names stand for their successors (`sse4_1`, `sse3`).
pub fn canonical_feature_name(name: &str) -> Option<&'static str> {
    let dashed = name.replace('_', "-");
    let target = FEATURE_ALIASES
        .iter()
        .find(|(alias, _)| *alias == dashed)
        .map_or(dashed.as_str(), |(_, to)| to);
    feature_names().iter().copied().find(|n| *n == target)
}

/// Looks a feature up by name (any accepted spelling); its first bit.
pub fn feature_by_name(name: &str) -> Option<&'static Feature> {
    canonical_feature_name(name).and_then(|n| feature_bits(n).next())
}

/// What kind of model a CPU type instantiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// A model of the tables: its features, whatever the host has.
    Named,
    /// `base`: no features, the starting point of static expansions.
    Base,
    /// `max`: everything the accelerator supports.
    Max,
    /// `host`: the host CPU as the accelerator can expose it.
    Host,
}

/// A CPU model resolved for one type: a table entry at its version, or a special model
/// (QEMU's `X86CPUModel`).
#[derive(Debug)]
pub struct X86CpuModel {
    /// `-cpu` name.
    pub name: &'static str,
    /// `-cpu help` description.
    pub description: &'static str,
    /// Kind.
    pub kind: ModelKind,
    /// CPUID vendor string; `None` keeps the host's.
    pub vendor: Option<&'static str>,
    /// CPUID family.
    pub family: u32,
    /// CPUID model.
    pub model: u32,
    /// CPUID stepping.
    pub stepping: u32,
    /// Highest basic leaf; 0 keeps the accelerator's.
    pub level: u32,
    /// Highest extended leaf; 0 keeps the accelerator's.
    pub xlevel: u32,
    /// Brand string; `None` keeps the host's.
    pub model_id: Option<&'static str>,
    /// Names of the features the model turns on.
    pub features: BTreeSet<&'static str>,
    /// For an alias, the versioned name it stands for.
    pub alias_of: Option<&'static str>,
    /// An unversioned name whose version the machine picks.
    pub machine_alias: bool,
    /// The model's own caches, if it has them (else QEMU's legacy ones).
    pub cache: Option<ModelCache>,
}

/// What QEMU's KVM adds to every named model (`kvm_default_props`): paravirtual clocks and
/// EOI, x2APIC; and takes away: ACPI thermal control, MONITOR/MWAIT and SVM.
pub const KVM_DEFAULT_PROPS: &[(&str, bool)] = &[
    ("kvmclock", true),
    ("kvm-nopiodelay", true),
    ("kvm-asyncpf", true),
    ("kvm-steal-time", true),
    ("kvm-pv-eoi", true),
    ("kvmclock-stable-bit", true),
    ("x2apic", true),
    ("kvm-msi-ext-dest-id", false),
    ("acpi", false),
    ("monitor", false),
    ("svm", false),
];

/// Errors in a model table's version properties (a bad table is a bug; reported, not
/// panicked on, by the unit tests that load every model).
#[derive(Debug, thiserror::Error)]
pub enum ModelTableError {
    /// A version names a property that does not exist.
    #[error("CPU model {model}: unknown property '{name}'")]
    UnknownProperty {
        /// The versioned model.
        model: &'static str,
        /// The property.
        name: &'static str,
    },
    /// A version gives a property a value it cannot take.
    #[error("CPU model {model}: bad value '{value}' for '{name}'")]
    BadValue {
        /// The versioned model.
        model: &'static str,
        /// The property.
        name: &'static str,
        /// The value.
        value: &'static str,
    },
}

impl X86CpuModel {
    /// A model with nothing set, of `kind`.
    fn special(name: &'static str, description: &'static str, kind: ModelKind) -> Self {
        X86CpuModel {
            name,
            description,
            kind,
            vendor: None,
            family: 0,
            model: 0,
            stepping: 0,
            level: 0,
            xlevel: 0,
            model_id: None,
            features: BTreeSet::new(),
            alias_of: None,
            machine_alias: false,
            cache: None,
        }
    }

    /// QEMU's `x86_cpu_load_model` for a table entry: version 1, each later version's
    /// properties up to the entry's, then KVM's defaults.
    pub fn try_from_entry(entry: &X86CpuModelEntry) -> Result<Self, ModelTableError> {
        let def = entry.definition;
        let mut m = X86CpuModel {
            name: entry.name,
            description: def.model_id,
            kind: ModelKind::Named,
            vendor: Some(def.vendor),
            family: def.family,
            model: def.model,
            stepping: def.stepping,
            level: def.level,
            xlevel: def.xlevel,
            model_id: Some(def.model_id),
            features: def.features.iter().copied().collect(),
            alias_of: entry.alias_of,
            machine_alias: entry.machine_alias,
            cache: model_cache(def.name, entry.version),
        };
        let mut note = None;
        for version in def.versions.iter().take_while(|v| v.version <= entry.version) {
            for &(name, value) in version.props {
                m.apply_table_prop(entry.name, name, value)?;
            }
            note = version.note;
        }
        for &(name, on) in KVM_DEFAULT_PROPS {
            if on {
                m.features.insert(name);
            } else {
                m.features.remove(name);
            }
        }
        m.description = match (entry.machine_alias, entry.alias_of, note) {
            (true, _, _) => "(alias configured by machine type)",
            (false, Some(of), _) => leak(format!("(alias of {of})")),
            (false, None, Some(note)) => leak(format!("{} [{note}]", m.model_id.unwrap_or(""))),
            (false, None, None) => m.model_id.unwrap_or(""),
        };
        Ok(m)
    }

    /// [`Self::try_from_entry`] for the class_init of a registered table type; the unit
    /// tests load every entry, so a bad table never reaches a running binary.
    pub fn from_entry(entry: &X86CpuModelEntry) -> Self {
        Self::try_from_entry(entry).unwrap_or_else(|e| panic!("{e}"))
    }

    fn apply_table_prop(
        &mut self,
        model: &'static str,
        name: &'static str,
        value: &'static str,
    ) -> Result<(), ModelTableError> {
        let bad = || ModelTableError::BadValue { model, name, value };
        let number = || parse_u32(value).ok_or_else(bad);
        match name {
            "family" => self.family = number()?,
            "model" => self.model = number()?,
            "stepping" => self.stepping = number()?,
            "level" => self.level = number()?,
            "xlevel" => self.xlevel = number()?,
            "model-id" => self.model_id = Some(value),
            "vendor" => self.vendor = Some(value),
            _ => {
                let feature = canonical_feature_name(name)
                    .ok_or(ModelTableError::UnknownProperty { model, name })?;
                match value {
                    "on" => self.features.insert(feature),
                    "off" => self.features.remove(feature),
                    _ => return Err(bad()),
                };
            }
        }
        Ok(())
    }

    /// Whether the guest gets everything the accelerator supports (`max`, `host`).
    pub fn passthrough(&self) -> bool {
        matches!(self.kind, ModelKind::Max | ModelKind::Host)
    }
    /// QEMU's `static`: the model never changes with QEMU's version or the machine.
    pub fn is_static(&self) -> bool {
        self.kind == ModelKind::Base
    }
    /// QEMU's `migration-safe`: the same on any host that can run it.
    pub fn migration_safe(&self) -> bool {
        !self.passthrough()
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The class level of x86 CPUs: the model the type instantiates.
#[derive(Clone, Debug)]
pub struct X86CpuClass {
    /// The model (`None` for the abstract type).
    pub model: Option<&'static X86CpuModel>,
}

/// The register state a loader wants a CPU to start with, instead of the reset state.
#[derive(Clone, Copy, Debug, Default)]
pub struct X86BootState {
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, descriptor tables.
    pub sregs: kvm_sregs,
}

impl X86BootState {
    /// A loader's entry state: `code` in CS, `data` in DS, ES, FS, GS and SS, the reset
    /// values of TR and LDT, the given descriptor tables and CR0, the local APIC enabled
    /// as the boot processor's, RFLAGS with only its fixed bit; RIP and the rest of the
    /// general registers are the caller's.
    pub fn with_segments(
        code: kvm_segment,
        data: kvm_segment,
        gdt: kvm_dtable,
        idt: kvm_dtable,
        cr0: u64,
    ) -> Self {
        let mut state = X86BootState::default();
        state.regs.rflags = 0x2;
        state.sregs = kvm_sregs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: kvm_segment {
                limit: 0xffff,
                type_: 0xb,
                present: 1,
                ..Default::default()
            },
            ldt: kvm_segment {
                limit: 0xffff,
                type_: 0x2,
                present: 1,
                ..Default::default()
            },
            gdt,
            idt,
            cr0,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        state
    }
}

/// Decimal or `0x` hex, as QEMU's integer properties take it.
fn parse_u32(text: &str) -> Option<u32> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// CPUID identity values set on the command line (`family=`, `level=`...); unset ones are
/// the model's.
#[derive(Clone, Debug, Default)]
pub struct IdentityOverrides {
    /// `family=`.
    pub family: Option<u32>,
    /// `model=`.
    pub model: Option<u32>,
    /// `stepping=`.
    pub stepping: Option<u32>,
    /// `level=`.
    pub level: Option<u32>,
    /// `xlevel=`.
    pub xlevel: Option<u32>,
    /// `model-id=`.
    pub model_id: Option<String>,
}

/// What an x86 CPU instance holds (QEMU's `X86CPU`).
#[derive(qom::Object)]
#[qom(name = TYPE_X86_CPU, abstract, class_level)]
pub struct X86Cpu {
    #[parent]
    parent: CpuState,
    #[property(desc = "CPUID vendor string (12 characters)")]
    vendor: Prop<Option<String>>,
    #[property(name = "phys-bits", default = 0, desc = "Guest physical address bits (0: the default)")]
    phys_bits: Prop<u32>,
    #[property(name = "host-phys-bits", default = false, desc = "Use the host's physical address bits")]
    host_phys_bits: Prop<bool>,
    #[property(name = "l3-cache", default = true, desc = "Show an L3 cache in CPUID")]
    l3_cache: Prop<bool>,
    #[property(name = "host-cache-info", default = false, desc = "Show the host's caches in CPUID")]
    host_cache_info: Prop<bool>,
    #[property(default = true, desc = "Warn about requested features the host lacks")]
    check: Prop<bool>,
    #[property(default = false, desc = "Refuse to start when the host lacks a requested feature")]
    enforce: Prop<bool>,
    #[property(default = true, desc = "Only migratable features (host and max)")]
    migratable: Prop<bool>,
    #[property(default = true, desc = "Show the KVM signature leaves to the guest")]
    kvm: Prop<bool>,
    apic_id: AtomicU32,
    /// Features turned on or off on the command line, in order.
    overrides: Mutex<Vec<(&'static str, bool)>>,
    identity: Mutex<IdentityOverrides>,
    hyperv: Mutex<HypervOptions>,
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
    /// `vendor=`, else the model's (`None`: the host's): the vendor without KVM. Under KVM
    /// a named model shows the host's unless `vendor=` is given (QEMU's
    /// `host_cpu_instance_init`; accel/kvm/x86.rs and the model expansion do that).
    pub fn effective_vendor(&self) -> Option<String> {
        self.vendor
            .get()
            .or_else(|| self.model().and_then(|m| m.vendor).map(str::to_string))
    }
    /// `phys-bits=` (0: unset).
    pub fn phys_bits(&self) -> u32 {
        self.phys_bits.get()
    }
    /// `host-phys-bits=`, on by default for `host`.
    pub fn host_phys_bits(&self) -> bool {
        self.host_phys_bits.get() || self.model().is_some_and(|m| m.kind == ModelKind::Host)
    }
    /// `l3-cache=`.
    pub fn l3_cache(&self) -> bool {
        self.l3_cache.get()
    }
    /// `host-cache-info=`: the host's cache leaves instead of QEMU's fixed ones.
    pub fn host_cache_info(&self) -> bool {
        self.host_cache_info.get()
    }
    /// `check=`: warn about requested features the host lacks.
    pub fn check(&self) -> bool {
        self.check.get()
    }
    /// `enforce=`: refuse to start instead.
    pub fn enforce(&self) -> bool {
        self.enforce.get()
    }
    /// `migratable=`.
    pub fn migratable(&self) -> bool {
        self.migratable.get()
    }
    /// `kvm=`: whether the guest sees the KVM leaves.
    pub fn kvm_leaves(&self) -> bool {
        self.kvm.get()
    }
    /// The Hyper-V enlightenments asked for (`hv-*`).
    pub fn hyperv_options(&self) -> HypervOptions {
        self.hyperv.lock().clone()
    }
    /// The identity values set on the command line.
    pub fn identity_overrides(&self) -> IdentityOverrides {
        self.identity.lock().clone()
    }
    /// The local APIC ID.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }
    /// Features forced on (`true`) or off (`false`), in command-line order.
    pub fn feature_overrides(&self) -> Vec<(&'static str, bool)> {
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
    /// Whether the model plus the command-line overrides turn `feature` on (for `max` and
    /// `host`, whether it is forced on: the rest depends on the accelerator).
    pub fn feature_enabled(&self, feature: &str) -> bool {
        let forced = self
            .overrides
            .lock()
            .iter()
            .rev()
            .find(|(f, _)| *f == feature)
            .map(|(_, on)| *on);
        forced.unwrap_or_else(|| self.model().is_some_and(|m| m.features.contains(feature)))
    }
    /// CPUID leaf 1's EAX (family, model, stepping) and EDX (feature bits), as SMBIOS's
    /// processor ID carries them (QEMU's `smbios_set_cpuid`, from the first CPU): the
    /// model's with the command line's overrides, or for `host` and `max` the host's.
    pub fn cpuid_version_and_features(&self) -> (u32, u32) {
        let model = self.model();
        if model.is_none_or(|m| matches!(m.kind, ModelKind::Host | ModelKind::Max)) {
            #[cfg(target_arch = "x86_64")]
            {
                let leaf1 = std::arch::x86_64::__cpuid(1);
                return (leaf1.eax, leaf1.edx);
            }
            #[cfg(not(target_arch = "x86_64"))]
            return (0, 0);
        }
        let ids = self.identity_overrides();
        let m = model.expect("checked above");
        let family = ids.family.unwrap_or(m.family);
        let model_number = ids.model.unwrap_or(m.model);
        let stepping = ids.stepping.unwrap_or(m.stepping);
        // QEMU's x86_cpuid_version_set_family/_model/_stepping.
        let mut version = (stepping & 0xf) | (model_number & 0xf) << 4 | (model_number >> 4 & 0xf) << 16;
        version |= if family > 0x0f {
            0xf00 | (family - 0x0f) << 20
        } else {
            family << 8
        };
        let edx = self
            .requested_features()
            .into_iter()
            .flat_map(feature_bits)
            .filter(|f| f.leaf() == 1 && f.reg() == Reg::Edx)
            .fold(0u32, |acc, f| acc | 1 << f.bit);
        (version, edx)
    }
    /// The features a named model plus the overrides ask for, with QEMU's
    /// `feature_dependencies` applied.
    pub fn requested_features(&self) -> BTreeSet<&'static str> {
        let model = self.model();
        let base = model.map(|m| m.features.clone()).unwrap_or_default();
        expand_features(base, &self.feature_overrides())
    }
}

/// A model's features with overrides applied in order, then QEMU's feature dependencies:
/// a feature whose parent is off goes too (`svm` off takes the SVM leaf, `sgx` its
/// leaves, `intel-pt` leaf 0x14, `lm` `fred`).
pub fn expand_features(
    mut set: BTreeSet<&'static str>,
    overrides: &[(&'static str, bool)],
) -> BTreeSet<&'static str> {
    for &(name, on) in overrides {
        if on {
            set.insert(name);
        } else {
            set.remove(name);
        }
    }
    for &(parent, words, extra) in FEATURE_DEPENDENCIES {
        if !set.contains(parent) {
            for f in features() {
                if words.contains(&f.word.id) || extra.contains(&f.name) {
                    set.remove(f.name);
                }
            }
        }
    }
    set
}

/// QEMU's `feature_dependencies`: (parent feature, dependent words, dependent features).
const FEATURE_DEPENDENCIES: &[(&str, &[&str], &[&str])] = &[
    ("svm", &["FEAT_SVM"], &[]),
    ("intel-pt", &["FEAT_14_0_ECX"], &[]),
    (
        "sgx",
        &["FEAT_SGX_12_0_EAX", "FEAT_SGX_12_0_EBX", "FEAT_SGX_12_1_EAX"],
        &["sgxlc"],
    ),
    ("lm", &[], &["fred"]),
    ("lkgs", &[], &["fred"]),
    ("wrmsrns", &[], &["fred"]),
    ("avx10", &["FEAT_24_0_EBX"], &[]),
];

/// Realize errors of x86 CPUs.
#[derive(Debug, thiserror::Error)]
enum X86CpuError {
    #[error("property 'vendor' must be 12 characters, not '{0}'")]
    Vendor(String),
    #[error("CPU {0}: the machine has no accelerator to run it")]
    NoAccelerator(String),
}

impl DeviceImpl for X86Cpu {
    // Registers, MSRs and LAPIC travel in the accelerator's CPU sections.
    const STATELESS: bool = true;
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
        let name = canonical_feature_name(&prop.name).ok_or_else(|| Error::PropertyNotFound {
            type_name: TYPE_X86_CPU.to_string(),
            name: prop.name.to_string(),
        })?;
        if let Value::Bool(on) = value {
            cpu.overrides.lock().push((name, on));
        }
        Ok(())
    }),
};

/// The Hyper-V properties (QEMU's `hv-*` in `x86_cpu_properties`): one bool per
/// enlightenment, `hv-passthrough`, and `hv-spinlocks`.
static HYPERV: StateAccessor<X86Cpu> = StateAccessor {
    get: |cpu, prop| {
        let hv = cpu.hyperv.lock();
        match prop.name.as_ref() {
            "hv-spinlocks" => Value::Uint(hv.spinlocks.into()),
            "hv-passthrough" => Value::Bool(hv.passthrough),
            name => Value::Bool(hv.features.contains(name)),
        }
    },
    set: Some(|cpu, prop, value| {
        let mut hv = cpu.hyperv.lock();
        match (prop.name.as_ref(), value) {
            // A 32-bit property: the value was range-checked when parsed.
            ("hv-spinlocks", Value::Uint(v)) => hv.spinlocks = v as u32,
            ("hv-passthrough", Value::Bool(on)) => hv.passthrough = on,
            (name, Value::Bool(on)) => {
                if let Some(f) = hv_feature(name) {
                    if on {
                        hv.features.insert(f.name);
                    } else {
                        hv.features.remove(f.name);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }),
};

/// The CPUID identity properties: reading gives the model's value unless set.
static IDENTITY: StateAccessor<X86Cpu> = StateAccessor {
    get: |cpu, prop| {
        let ids = cpu.identity.lock();
        let model = cpu.model();
        let pick = |set: Option<u32>, of_model: fn(&X86CpuModel) -> u32| {
            Value::Uint(set.or(model.map(of_model)).unwrap_or(0).into())
        };
        match prop.name.as_ref() {
            "family" => pick(ids.family, |m| m.family),
            "model" => pick(ids.model, |m| m.model),
            "stepping" => pick(ids.stepping, |m| m.stepping),
            "level" => pick(ids.level, |m| m.level),
            "xlevel" => pick(ids.xlevel, |m| m.xlevel),
            _ => Value::Str(
                ids.model_id
                    .clone()
                    .or_else(|| model.and_then(|m| m.model_id).map(str::to_string))
                    .unwrap_or_default(),
            ),
        }
    },
    set: Some(|cpu, prop, value| {
        let mut ids = cpu.identity.lock();
        match (prop.name.as_ref(), value) {
            ("family", Value::Uint(v)) => ids.family = Some(v as u32),
            ("model", Value::Uint(v)) => ids.model = Some(v as u32),
            ("stepping", Value::Uint(v)) => ids.stepping = Some(v as u32),
            ("level", Value::Uint(v)) => ids.level = Some(v as u32),
            ("xlevel", Value::Uint(v)) => ids.xlevel = Some(v as u32),
            ("model-id", Value::Str(s)) => ids.model_id = Some(s),
            _ => {}
        }
        Ok(())
    }),
};

/// The abstract `x86_64-cpu` class: `apic-id`, the CPUID identity and the feature flags.
fn x86_cpu_base_class_init(class: &mut ObjectClass) {
    <CpuState as ClassInitFor<X86Cpu>>::class_init(class);
    class.insert(X86CpuClass { model: None });
    class.add_property(Property::state(
        "apic-id",
        PropertyKind::Uint(32),
        "Local APIC ID",
        &APIC_ID,
    ));
    for (name, kind, desc) in [
        ("family", PropertyKind::Uint(32), "CPUID family"),
        ("model", PropertyKind::Uint(32), "CPUID model"),
        ("stepping", PropertyKind::Uint(32), "CPUID stepping"),
        ("level", PropertyKind::Uint(32), "Highest CPUID basic leaf"),
        ("xlevel", PropertyKind::Uint(32), "Highest CPUID extended leaf"),
        ("model-id", PropertyKind::Str, "CPUID brand string"),
    ] {
        class.add_property(Property::state(name, kind, desc, &IDENTITY));
    }
    for name in feature_names() {
        class.add_property(Property::state(
            name,
            PropertyKind::Bool,
            "CPUID feature",
            &FEATURE,
        ));
    }
    for f in HV_FEATURES {
        class.add_property(Property::state(f.name, PropertyKind::Bool, f.desc, &HYPERV));
    }
    class.add_property(Property::state(
        "hv-passthrough",
        PropertyKind::Bool,
        "Every Hyper-V enlightenment the kernel supports",
        &HYPERV,
    ));
    class.add_property(Property::state(
        "hv-spinlocks",
        PropertyKind::Uint(32),
        "Hyper-V spinlock retries before notifying the hypervisor",
        &HYPERV,
    ));
}

/// The class of a model type: the x86 CPU class with its model (QEMU's
/// `x86_cpu_cpudef_class_init`), shared by every model.
pub fn x86_cpu_model_class_init(class: &mut ObjectClass, model: X86CpuModel) {
    let model: &'static X86CpuModel = Box::leak(Box::new(model));
    class.insert(X86CpuClass { model: Some(model) });
    if let Some(cc) = class.get_mut::<CpuClass>() {
        cc.model_name = model.name;
        cc.model_description = Some(model.description);
    }
}

fn max_class_init(class: &mut ObjectClass) {
    x86_cpu_model_class_init(
        class,
        X86CpuModel::special(
            "max",
            "Enables all features supported by the accelerator in the current host",
            ModelKind::Max,
        ),
    );
}

fn host_class_init(class: &mut ObjectClass) {
    x86_cpu_model_class_init(
        class,
        X86CpuModel::special(
            "host",
            "processor with all supported host features ",
            ModelKind::Host,
        ),
    );
}

fn base_class_init(class: &mut ObjectClass) {
    x86_cpu_model_class_init(
        class,
        X86CpuModel::special(
            "base",
            "base CPU model type with no features enabled",
            ModelKind::Base,
        ),
    );
}

type_init! {
    name: "max-x86_64-cpu",
    parent: Some(TYPE_X86_CPU),
    class_init: Some(max_class_init),
}
type_init! {
    name: "host-x86_64-cpu",
    parent: Some("max-x86_64-cpu"),
    class_init: Some(host_class_init),
}
type_init! {
    name: "base-x86_64-cpu",
    parent: Some(TYPE_X86_CPU),
    class_init: Some(base_class_init),
}

/// Applies `-cpu MODEL,+feat,-feat,feat=on,prop=value` (everything after the model) to a
/// CPU before realize (QEMU's `x86_cpu_parse_featurestr`): `_` and `-` spell the same
/// name, a bare `feat` is `feat=on`, and `+feat`/`-feat` apply after the rest, `-` last.
pub fn apply_cpu_options(cpu: &qom::Object, options: &str) -> Result<(), Error> {
    let mut plus = Vec::new();
    let mut minus = Vec::new();
    for item in options.split(',').filter(|s| !s.is_empty()) {
        let bare = item.trim_start_matches(['+', '-']);
        let bare = bare.split_once('=').map_or(bare, |(name, _)| name);
        if let Some(&bare) = OS_CONTROLLED_BITS.iter().find(|b| **b == bare) {
            // Older QEMU took these names (the seed command lines carry `+osxsave`); the
            // guest's CR4 sets them and KVM computes them, so a request cannot change them.
            // Warned once: the options are parsed again for each CPU.
            static WARNED: Mutex<BTreeSet<&str>> = Mutex::new(BTreeSet::new());
            if !WARNED.lock().insert(bare) {
                continue;
            }
            qom::error_report!(
                "warning: CPUID feature '{bare}' follows the guest's CR4, not the CPU model; ignored"
            );
            continue;
        }
        if let Some(feat) = item.strip_prefix('+') {
            plus.push(feat);
            continue;
        }
        if let Some(feat) = item.strip_prefix('-') {
            minus.push(feat);
            continue;
        }
        let (name, value) = item.split_once('=').unwrap_or((item, "on"));
        let name = property_name(name);
        // QEMU has host-cache-info on host and max only.
        let passthrough = cpu
            .downcast::<X86Cpu>()
            .and_then(X86Cpu::model)
            .is_none_or(|m| m.passthrough());
        if name == "host-cache-info" && !passthrough {
            return Err(Error::PropertyNotFound {
                type_name: cpu.type_name().to_string(),
                name,
            });
        }
        cpu.property_parse(&name, value)?;
    }
    for (feats, value) in [(plus, "on"), (minus, "off")] {
        for feat in feats {
            cpu.property_parse(&property_name(feat), value)?;
        }
    }
    Ok(())
}

/// CPUID bits that mirror a CR4 bit the guest OS sets (leaf 1 ECX bit 27, leaf 7 ECX bit
/// 4): QEMU leaves them unnamed.
const OS_CONTROLLED_BITS: &[&str] = &["osxsave", "ospke"];

/// QEMU's `feat2prop` and legacy names: the property a `-cpu` option name sets.
fn property_name(name: &str) -> String {
    if let Some(feature) = canonical_feature_name(name) {
        return feature.to_string();
    }
    match name.replace('_', "-").as_str() {
        hv if hv.starts_with("hv-") => hv.into(),
        "model-id" => "model-id".into(),
        "phys-bits" => "phys-bits".into(),
        "host-phys-bits" => "host-phys-bits".into(),
        "l3-cache" => "l3-cache".into(),
        "host-cache-info" => "host-cache-info".into(),
        _ => name.to_string(),
    }
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
        assert_eq!(canonical_feature_name("lahf_lm"), Some("lahf-lm"));
        assert_eq!(canonical_feature_name("kvm_pv_eoi"), Some("kvm-pv-eoi"));
        assert!(feature_by_name("warp-drive").is_none());
        let ds_cpl = feature_by_name("ds_cpl").unwrap();
        assert_eq!(ds_cpl.describe(), "CPUID.01H:ECX.ds-cpl [bit 4]");
        assert_eq!(
            feature_by_name("smep").unwrap().describe(),
            "CPUID.07H:EBX.smep [bit 7]"
        );
        assert_eq!(feature_bits("kvmclock").map(|f| f.bit).collect::<Vec<_>>(), [0, 3]);
    }

    fn table_model(name: &str) -> X86CpuModel {
        let entry = crate::i386::x86_cpu_models::model_entries()
            .into_iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} is in the tables"));
        X86CpuModel::try_from_entry(&entry).unwrap()
    }

    #[test]
    fn every_table_entry_loads() {
        let entries = crate::i386::x86_cpu_models::model_entries();
        assert!(entries.len() > 120, "{} entries", entries.len());
        for entry in &entries {
            let model = X86CpuModel::try_from_entry(entry).unwrap();
            for f in &model.features {
                assert!(feature_bits(f).next().is_some(), "{}: {f}", entry.name);
            }
        }
    }

    #[test]
    fn versions_apply_their_properties_in_order() {
        let v1 = table_model("Skylake-Server-v1");
        let v3 = table_model("Skylake-Server-v3");
        assert_eq!((v1.family, v1.model, v1.vendor), (6, 85, Some("GenuineIntel")));
        assert!(v1.features.contains("hle") && v1.features.contains("avx512f"));
        assert!(!v3.features.contains("hle") && v3.features.contains("spec-ctrl"));
        let alias = table_model("Skylake-Server-noTSX-IBRS");
        assert_eq!(alias.alias_of, Some("Skylake-Server-v3"));
        assert_eq!(alias.features, v3.features);
        assert_eq!(alias.description, "(alias of Skylake-Server-v3)");
        let plain = table_model("Skylake-Server");
        assert_eq!(plain.features, v1.features);
        assert!(plain.machine_alias);
        let epyc = table_model("EPYC-v1");
        assert_eq!(epyc.vendor, Some("AuthenticAMD"));
        // QEMU's KVM defaults: x2apic on, svm off (and its leaf with it, at expansion).
        assert!(epyc.features.contains("x2apic") && !epyc.features.contains("svm"));
        let expanded = expand_features(epyc.features.clone(), &[]);
        assert!(!expanded.contains("npt"));
        let with_svm = expand_features(epyc.features.clone(), &[("svm", true)]);
        assert!(with_svm.contains("npt"));
    }
}
