//! The CPU model queries (QEMU's `target/i386/cpu-sysemu.c`): `query-cpu-definitions`
//! with what each model lacks on this host, and `query-cpu-model-expansion`, `static`
//! (as `base` plus every feature) and `full` (every property).

use std::collections::BTreeSet;

use accel::kvm::x86::{filtered_features, host_supported_cpuid, CpuId};
use hw::core::cpu::TYPE_CPU;
use hw::i386::x86_cpu::{
    expand_features, feature_names, X86Cpu, X86CpuClass, X86CpuModel, X86_CPU_SUFFIX,
};
use qom::{ObjectClass, ObjectRef};
use serde_json::{json, Map, Value};

use crate::monitor::qapi::{CommandCtx, QmpError};

fn x86_model(class: &ObjectClass) -> Option<&'static X86CpuModel> {
    class.get::<X86CpuClass>()?.model
}

/// What a named model asks for that this host's KVM cannot give, once per name, in
/// feature-word order (QEMU's `x86_cpu_class_check_missing_features`).
fn unavailable_features(model: &X86CpuModel, host: &CpuId) -> Vec<&'static str> {
    let (_, missing) = filtered_features(Some(model), &[], true, host);
    let mut seen = BTreeSet::new();
    missing
        .into_iter()
        .map(|f| f.name)
        .filter(|n| seen.insert(*n))
        .collect()
}

/// `query-cpu-definitions`.
pub fn query_cpu_definitions(_: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    let host = host_supported_cpuid().ok();
    Ok(qom::object_class_get_list(Some(TYPE_CPU), false)
        .into_iter()
        .filter_map(|class| {
            let model = x86_model(class)?;
            let mut def = json!({
                "name": model.name,
                "typename": class.name(),
                "static": model.is_static(),
                "migration-safe": model.migration_safe(),
                "deprecated": false,
            });
            if let Some(host) = host {
                def["unavailable-features"] = unavailable_features(model, host).into();
            }
            if let Some(of) = model.alias_of {
                def["alias-of"] = of.into();
            }
            Some(def)
        })
        .collect())
}

/// The model's CPU object with the `props` of a `CpuModelInfo` applied.
fn model_object(info: &Map<String, Value>) -> Result<(ObjectRef, &'static X86CpuModel), QmpError> {
    let name = info
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::MissingParameter("name".into()))?;
    let not_found = || QmpError::BadInput(format!("CPU model '{name}' not found"));
    let class = qom::object_class_by_name(&format!("{name}{X86_CPU_SUFFIX}"))
        .filter(|c| !c.is_abstract())
        .ok_or_else(not_found)?;
    let model = x86_model(class).ok_or_else(not_found)?;
    let cpu = qom::Object::new_with_class(class).map_err(|e| QmpError::BadInput(e.to_string()))?;
    match info.get("props") {
        None => {}
        Some(Value::Object(props)) => {
            for (key, value) in props {
                let prop = cpu.find_property(key).ok_or_else(|| {
                    QmpError::BadInput(
                        qom::Error::PropertyNotFound {
                            type_name: cpu.type_name().to_string(),
                            name: key.clone(),
                        }
                        .to_string(),
                    )
                })?;
                let value = crate::monitor::info::value_from_json(&prop, value)?;
                cpu.property_set(key, value)
                    .map_err(|e| QmpError::BadInput(e.to_string()))?;
            }
        }
        Some(_) => {
            return Err(QmpError::InvalidParameterType {
                name: "props".into(),
                expected: "object",
            })
        }
    }
    Ok((cpu, model))
}

/// A CPUID identity register's value on this host, for `max` and `host`.
fn host_leaf(host: &CpuId, leaf: u32) -> Option<[u32; 4]> {
    host.as_slice()
        .iter()
        .find(|e| e.function == leaf && e.index == 0)
        .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
}

/// The host's vendor, family, model, stepping and brand, as `max`/`host` show them.
fn host_identity(host: &CpuId) -> Map<String, Value> {
    let mut props = Map::new();
    if let Some([_, ebx, ecx, edx]) = host_leaf(host, 0) {
        let bytes: Vec<u8> = [ebx, edx, ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        props.insert(
            "vendor".into(),
            String::from_utf8_lossy(&bytes).into_owned().into(),
        );
    }
    if let Some([eax, ..]) = host_leaf(host, 1) {
        let family = ((eax >> 8) & 0xf)
            + if (eax >> 8) & 0xf == 0xf {
                (eax >> 20) & 0xff
            } else {
                0
            };
        let model = ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4);
        props.insert("family".into(), family.into());
        props.insert("model".into(), model.into());
        props.insert("stepping".into(), (eax & 0xf).into());
    }
    let brand: Vec<u8> = (0x8000_0002..=0x8000_0004)
        .filter_map(|leaf| host_leaf(host, leaf))
        .flat_map(|regs| regs.into_iter().flat_map(u32::to_le_bytes))
        .take_while(|&b| b != 0)
        .collect();
    props.insert(
        "model-id".into(),
        String::from_utf8_lossy(&brand).trim().to_string().into(),
    );
    props
}

/// `query-cpu-model-expansion`.
pub fn query_cpu_model_expansion(
    ctx: &CommandCtx,
    args: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let kind = args.get("type").and_then(Value::as_str).unwrap_or_default();
    if !matches!(kind, "static" | "full") {
        return Err(QmpError::InvalidEnumValue {
            name: "type".into(),
            value: kind.into(),
        });
    }
    let info = match args.get("model") {
        Some(Value::Object(info)) => info,
        _ => {
            return Err(QmpError::InvalidParameterType {
                name: "model".into(),
                expected: "object",
            })
        }
    };
    let (cpu, model) = model_object(info)?;
    let x86 = cpu
        .downcast::<X86Cpu>()
        .ok_or_else(|| QmpError::BadInput("not an x86 CPU".into()))?;
    let overrides = x86.feature_overrides();
    let mut props = Map::new();
    let enabled: BTreeSet<&'static str> = if model.passthrough() {
        let host = host_supported_cpuid().map_err(|e| QmpError::BadInput(e.to_string()))?;
        props.extend(host_identity(host));
        let (granted, _) = filtered_features(Some(model), &overrides, x86.migratable(), host);
        granted
    } else {
        for name in ["vendor", "family", "model", "stepping", "model-id"] {
            let value = cpu
                .property_get(name)
                .map_err(|e| QmpError::BadInput(e.to_string()))?;
            props.insert(name.into(), crate::monitor::info::value_to_json(&value));
        }
        // Under KVM a model takes the host's vendor unless vendor= is given (QEMU's
        // host_cpu_instance_init); other accelerators keep the model's.
        let on_kvm = ctx
            .vm
            .machine_state()
            .accel_ops()
            .is_some_and(|ops| ops.name() == "kvm");
        let host_vendor = on_kvm
            .then(host_supported_cpuid)
            .and_then(Result::ok)
            .and_then(|host| host_identity(host).remove("vendor"));
        match (x86.vendor(), host_vendor) {
            (Some(vendor), _) => {
                props.insert("vendor".into(), vendor.into());
            }
            (None, Some(host)) => {
                props.insert("vendor".into(), host);
            }
            (None, None) => {
                if let Some(vendor) = x86.effective_vendor() {
                    props.insert("vendor".into(), vendor.into());
                }
            }
        }
        expand_features(model.features.clone(), &overrides)
    };
    for name in feature_names() {
        props.insert((*name).into(), enabled.contains(name).into());
    }
    let name = if kind == "static" {
        "base"
    } else {
        for prop in [
            "level",
            "xlevel",
            "phys-bits",
            "host-phys-bits",
            "l3-cache",
            "check",
            "enforce",
            "migratable",
            "kvm",
        ] {
            let value = cpu
                .property_get(prop)
                .map_err(|e| QmpError::BadInput(e.to_string()))?;
            props.insert(prop.into(), crate::monitor::info::value_to_json(&value));
        }
        if model.passthrough() {
            // QEMU has host-cache-info on host and max only.
            let value = cpu
                .property_get("host-cache-info")
                .map_err(|e| QmpError::BadInput(e.to_string()))?;
            props.insert(
                "host-cache-info".into(),
                crate::monitor::info::value_to_json(&value),
            );
            let host = host_supported_cpuid().map_err(|e| QmpError::BadInput(e.to_string()))?;
            for (prop, leaf) in [("level", 0), ("xlevel", 0x8000_0000)] {
                if let Some([eax, ..]) = host_leaf(host, leaf) {
                    props.insert(prop.into(), eax.into());
                }
            }
        }
        model.name
    };
    Ok(json!({"model": {"name": name, "props": props}}))
}
