//! What the monitors report about the VM, for QMP's `query-*`/`qom-*` commands and HMP's
//! `info`/`qom-*` commands alike (the parts of QEMU's `qmp_query_*` that HMP calls too):
//! version, run status, KVM, the CPUs, QOM paths and property values.

use hw::core::cpu::CpuState;
use hw::core::runstate::RunStatus;
use hw::i386::x86_cpu::X86Cpu;
use qom::{object_get_root, resolve_path, Value as QomValue};
use serde_json::{json, Value};

use crate::monitor::qapi::{CommandCtx, QmpError};

/// QEMU's `query-version` value.
pub fn version_info() -> Value {
    let part = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "qemu": {
            "micro": part(env!("CARGO_PKG_VERSION_PATCH")),
            "minor": part(env!("CARGO_PKG_VERSION_MINOR")),
            "major": part(env!("CARGO_PKG_VERSION_MAJOR")),
        },
        "package": "qomvm",
    })
}

/// `query-status`'s value (also `info status`'s source).
pub fn status_info(ctx: &CommandCtx) -> Value {
    let status = ctx.vm.machine_state().vm_state().status();
    json!({
        "status": status.name(),
        "singlestep": false,
        "running": status == RunStatus::Running,
    })
}

/// `query-kvm`: `enabled` if the VM runs on KVM, `present` if this build has the KVM
/// accelerator (QEMU's meaning: compiled in, not "/dev/kvm is usable").
pub fn kvm_info(ctx: &CommandCtx) -> (bool, bool) {
    let enabled = ctx
        .vm
        .machine_state()
        .accel()
        .is_some_and(|a| a.type_name() == "kvm-accel");
    (enabled, accel::accel_find("kvm").is_some())
}

/// One CPU of `query-cpus-fast`: index, QOM path, host thread id.
pub struct CpuInfo {
    /// `cpu-index`.
    pub index: u32,
    /// `qom-path`.
    pub qom_path: String,
    /// The `CPU n/KVM` thread's id (0 when no vCPU thread runs, as under qtest).
    pub thread_id: u32,
}

/// The machine's CPUs.
pub fn cpu_infos(ctx: &CommandCtx) -> Vec<CpuInfo> {
    ctx.vm
        .machine_state()
        .cpus()
        .iter()
        .map(|cpu| CpuInfo {
            index: cpu.downcast::<CpuState>().map_or(0, CpuState::index),
            qom_path: cpu.canonical_path().unwrap_or_default(),
            thread_id: cpu.downcast::<X86Cpu>().map_or(0, X86Cpu::thread_id),
        })
        .collect()
}

/// Resolves a QOM path as QMP does (absolute or partial, from the root).
pub fn resolve(path: &str) -> Result<qom::ObjectRef, QmpError> {
    resolve_path(&object_get_root(), path).map_err(QmpError::from)
}

/// A property value as QMP shows it: links and children as their paths.
pub fn value_to_json(v: &QomValue) -> Value {
    match v {
        QomValue::Bool(b) => (*b).into(),
        QomValue::Int(i) => (*i).into(),
        QomValue::Uint(u) => (*u).into(),
        QomValue::Str(s) => s.clone().into(),
        QomValue::Link(None) => "".into(),
        QomValue::Link(Some(o)) => o.canonical_path().unwrap_or_default().into(),
    }
}
