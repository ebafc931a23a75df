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

/// `query-iothreads`: each `-object iothread` in creation order, with QEMU's members.
pub fn iothread_infos() -> Vec<Value> {
    hw::core::iothread::iothreads()
        .into_iter()
        .filter_map(|(id, obj)| {
            let io = obj.cast::<hw::core::iothread::IoThread>()?;
            let params = io.params();
            Some(json!({
                "id": id,
                "thread-id": io.context().map_or(0, |c| c.thread_id()),
                "poll-max-ns": params.poll_max_ns,
                "poll-grow": params.poll_grow,
                "poll-shrink": params.poll_shrink,
                "aio-max-batch": params.aio_max_batch,
            }))
        })
        .collect()
}

/// QMP's `ImageInfo` of one layer and those below it.
fn image_info_json(info: &block::ImageInfo) -> Value {
    let mut v = json!({
        "filename": info.filename,
        "format": info.format.name(),
    });
    if let Ok(meta) = std::fs::metadata(&info.filename) {
        use std::os::unix::fs::MetadataExt;
        v["actual-size"] = (meta.blocks() * 512).into();
    }
    v["virtual-size"] = info.virtual_size.into();
    if let Some(name) = &info.backing_filename {
        v["backing-filename"] = name.clone().into();
    }
    if let Some(full) = &info.full_backing_filename {
        v["full-backing-filename"] = full.clone().into();
    }
    if let Some(format) = &info.backing_format {
        v["backing-filename-format"] = format.clone().into();
    }
    if let Some(below) = &info.backing {
        v["backing-image"] = image_info_json(below);
    }
    v
}

/// QMP's `BlockDeviceInfo` of a node: `layer` of `backend`'s chain, `ro` as opened,
/// `drv` its driver.
fn block_device_info(
    backend: &block::BlockBackend,
    layer: &block::ImageInfo,
    node_name: &str,
    drv: &str,
    ro: bool,
    image: Value,
) -> Value {
    let cache = backend.options().cache;
    let mut v = json!({
        "file": layer.filename,
        "node-name": node_name,
        "ro": ro,
        "drv": drv,
    });
    if let Some(name) = layer.backing_filename.as_ref().filter(|_| drv != "file") {
        v["backing_file"] = name.clone().into();
    }
    let depth = if drv == "file" {
        0
    } else {
        layer.backing_depth()
    };
    v["backing_file_depth"] = depth.into();
    v["encrypted"] = false.into();
    v["detect_zeroes"] = "off".into();
    for key in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        v[key] = 0.into();
    }
    v["image"] = image;
    v["write_threshold"] = 0.into();
    v["cache"] = json!({
        "writeback": cache.writeback(),
        "direct": cache.direct(),
        "no-flush": cache.no_flush(),
    });
    v
}

/// The root node's `BlockDeviceInfo` (query-block's `inserted`).
fn inserted_info(backend: &block::BlockBackend) -> Value {
    let info = backend.image_info();
    let mut image = image_info_json(info);
    if backend.driver_name() == "file" {
        image["format"] = "file".into();
    }
    block_device_info(
        backend,
        info,
        backend.node_name(),
        backend.driver_name(),
        backend.is_read_only(),
        image,
    )
}

/// `query-block`: every named backend (`-drive`); a `-blockdev` node has a backend only
/// once a device uses it. `qdev` is left out while no device holds the drive.
pub fn block_infos() -> Vec<Value> {
    block::backends()
        .iter()
        .filter(|b| !b.id().is_empty())
        .map(|b| {
            json!({
                "device": b.id(),
                "locked": false,
                "removable": false,
                "inserted": inserted_info(b),
            })
        })
        .collect()
}

/// `query-named-block-nodes`: each backend's format nodes down its backing chain, each
/// with the `file` node under it.
pub fn named_block_nodes() -> Vec<Value> {
    let mut nodes = Vec::new();
    for b in block::backends() {
        if b.driver_name() == "file" {
            nodes.push(inserted_info(&b));
            continue;
        }
        let mut layer = Some(b.image_info());
        let mut ro = b.is_read_only();
        while let Some(info) = layer {
            let node_name = if std::ptr::eq(info, b.image_info()) {
                b.node_name().to_string()
            } else {
                info.node_name.clone()
            };
            nodes.push(block_device_info(
                &b,
                info,
                &node_name,
                info.format.name(),
                ro,
                image_info_json(info),
            ));
            let size = std::fs::metadata(&info.filename).map_or(0, |m| m.len());
            let mut file_image = json!({"filename": info.filename, "format": "file"});
            file_image["virtual-size"] = size.into();
            let file_info = block::ImageInfo {
                backing_filename: None,
                backing: None,
                ..info.clone()
            };
            nodes.push(block_device_info(
                &b,
                &file_info,
                &info.file_node_name,
                "file",
                ro,
                file_image,
            ));
            layer = info.backing.as_deref();
            ro = true;
        }
    }
    nodes
}
