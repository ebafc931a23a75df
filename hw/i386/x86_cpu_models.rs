//! The named x86 CPU models (QEMU's `builtin_x86_defs` and `x86_register_cpudef_types`):
//! the shape of a table entry, and the registration of one QOM type per model, per version
//! and per alias, all served by one `class_init` that reads its entry from `class_data`.
//!
//! The tables are data, one file per vendor: `x86_cpu_models_intel.rs`, `_amd.rs`,
//! `_other.rs`. A version lists what it changes from the previous one, as QEMU's
//! `X86CPUVersionDefinition::props` do; `Skylake-Server` is an alias of the version the
//! machine picks (version 1 on `pc`, as QEMU's `default_cpu_version`), `Skylake-Server-IBRS`
//! an alias of a fixed version.
//!
//! Only CPUID feature words are modelled: what QEMU's entries set in its MSR-based words
//! (`FEAT_ARCH_CAPABILITIES`' `rdctl-no`, `mds-no`, `sbdr-ssdp-no`...,
//! `FEAT_CORE_CAPABILITY`, the `vmx-*` controls), `avx10-version` and the cache-info
//! tables are left out, so a version made only of those (`SapphireRapids-v2`) lists no
//! properties.

use qom::{ObjectClass, TypeInfo};

use super::x86_cpu::{x86_cpu_model_class_init, X86CpuModel, TYPE_X86_CPU, X86_CPU_SUFFIX};
use super::{x86_cpu_models_amd, x86_cpu_models_intel, x86_cpu_models_other};

/// One model of a table (QEMU's `X86CPUDefinition`): its version 1.
#[derive(Debug)]
pub struct X86CpuDefinition {
    /// Base name (`Skylake-Server`).
    pub name: &'static str,
    /// CPUID vendor string.
    pub vendor: &'static str,
    /// CPUID family.
    pub family: u32,
    /// CPUID model.
    pub model: u32,
    /// CPUID stepping.
    pub stepping: u32,
    /// Highest basic leaf.
    pub level: u32,
    /// Highest extended leaf.
    pub xlevel: u32,
    /// Brand string (leaves 0x80000002..4).
    pub model_id: &'static str,
    /// The CPUID feature names the model has.
    pub features: &'static [&'static str],
    /// Versions, 1 first.
    pub versions: &'static [X86CpuVersion],
}

/// One version of a model (QEMU's `X86CPUVersionDefinition`).
#[derive(Debug)]
pub struct X86CpuVersion {
    /// The `-vN` number.
    pub version: u32,
    /// Another name for this version (`Skylake-Server-IBRS`).
    pub alias: Option<&'static str>,
    /// What the version changes, shown in `-cpu help` as `[note]`.
    pub note: Option<&'static str>,
    /// Property changes from the previous version: features `on`/`off`, `model-id`,
    /// `family`, `model`, `stepping`, `level`, `xlevel`, `vendor`.
    pub props: &'static [(&'static str, &'static str)],
}

/// A model's own cache description (QEMU's `CPUCaches` of a definition or version); models
/// without one show QEMU's fixed "legacy" caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelCache {
    /// `epyc_cache_info` (EPYC, Dhyana).
    Epyc,
    /// `epyc_v4_cache_info`: EPYC's without complex L3 indexing.
    EpycV4,
    /// `epyc_rome_cache_info`.
    EpycRome,
    /// `epyc_rome_v3_cache_info`.
    EpycRomeV3,
    /// `epyc_milan_cache_info`.
    EpycMilan,
    /// `epyc_milan_v2_cache_info`.
    EpycMilanV2,
    /// `epyc_genoa_cache_info`.
    EpycGenoa,
}

/// Which models and versions bring their own caches: `(model, first version, caches)`; a
/// later version keeps an earlier one's (QEMU's `x86_cpu_get_versioned_cache_info`).
const MODEL_CACHES: &[(&str, u32, ModelCache)] = &[
    ("EPYC", 1, ModelCache::Epyc),
    ("EPYC", 4, ModelCache::EpycV4),
    ("EPYC-Rome", 1, ModelCache::EpycRome),
    ("EPYC-Rome", 3, ModelCache::EpycRomeV3),
    ("EPYC-Milan", 1, ModelCache::EpycMilan),
    ("EPYC-Milan", 2, ModelCache::EpycMilanV2),
    ("EPYC-Genoa", 1, ModelCache::EpycGenoa),
    ("Dhyana", 1, ModelCache::Epyc),
];

/// The caches version `version` of model `name` describes, if its own.
pub fn model_cache(name: &str, version: u32) -> Option<ModelCache> {
    MODEL_CACHES
        .iter()
        .filter(|(model, first, _)| *model == name && *first <= version)
        .map(|(_, _, cache)| *cache)
        .next_back()
}

/// Which table entry a registered model type instantiates (its `class_data`).
#[derive(Debug)]
pub struct X86CpuModelEntry {
    /// The `-cpu` name (`Skylake-Server-v4`, `Skylake-Server`, `Skylake-Server-IBRS`).
    pub name: &'static str,
    /// The model.
    pub definition: &'static X86CpuDefinition,
    /// The version it resolves to.
    pub version: u32,
    /// For an alias, the versioned name it stands for.
    pub alias_of: Option<&'static str>,
    /// An unversioned name: the machine type picks its version.
    pub machine_alias: bool,
}

/// The version a machine gives an unversioned model name (QEMU's pc machines:
/// `default_cpu_version = 1`).
pub const DEFAULT_CPU_VERSION: u32 = 1;

/// Every model of every vendor's table.
pub fn all_definitions() -> impl Iterator<Item = &'static X86CpuDefinition> {
    x86_cpu_models_intel::MODELS
        .iter()
        .chain(x86_cpu_models_amd::MODELS)
        .chain(x86_cpu_models_other::MODELS)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The table's entries: each model's unversioned name, each version and each alias.
pub(crate) fn model_entries() -> Vec<X86CpuModelEntry> {
    let mut entries = Vec::new();
    for def in all_definitions() {
        let versioned = |v: u32| leak(format!("{}-v{v}", def.name));
        entries.push(X86CpuModelEntry {
            name: def.name,
            definition: def,
            version: DEFAULT_CPU_VERSION,
            alias_of: Some(versioned(DEFAULT_CPU_VERSION)),
            machine_alias: true,
        });
        for version in def.versions {
            let name = versioned(version.version);
            entries.push(X86CpuModelEntry {
                name,
                definition: def,
                version: version.version,
                alias_of: None,
                machine_alias: false,
            });
            if let Some(alias) = version.alias {
                entries.push(X86CpuModelEntry {
                    name: alias,
                    definition: def,
                    version: version.version,
                    alias_of: Some(name),
                    machine_alias: false,
                });
            }
        }
    }
    entries
}

/// QEMU's `x86_register_cpudef_types`: one `<name>-x86_64-cpu` type per entry, each a
/// direct child of `x86_64-cpu` whose class reads the entry.
fn x86_register_cpudef_types() -> Vec<TypeInfo> {
    model_entries()
        .into_iter()
        .map(|entry| {
            let entry: &'static X86CpuModelEntry = Box::leak(Box::new(entry));
            TypeInfo {
                name: leak(format!("{}{X86_CPU_SUFFIX}", entry.name)),
                parent: Some(TYPE_X86_CPU),
                class_init: Some(x86_cpu_table_class_init),
                class_data: Some(entry),
                ..TypeInfo::DEFAULT
            }
        })
        .collect()
}

qom::type_init!(fn x86_register_cpudef_types);

fn x86_cpu_table_class_init(class: &mut ObjectClass) {
    let entry = class
        .class_data::<X86CpuModelEntry>()
        .expect("every table type is registered with its entry");
    x86_cpu_model_class_init(class, X86CpuModel::from_entry(entry));
}
