//! What the monitors report about the VM, for QMP's `query-*`/`qom-*` commands and HMP's
//! `info`/`qom-*` commands alike (the parts of QEMU's `qmp_query_*` that HMP calls too):
//! version, run status, KVM, the CPUs, QOM paths and property values.

use hw::core::cpu::CpuState;
use hw::core::removable_media::RemovableMedia;
use hw::core::runstate::RunStatus;
use hw::i386::x86_cpu::X86Cpu;
use qom::{object_get_root, resolve_path, Property, PropertyKind, Value as QomValue};
use serde_json::{json, Value};

use crate::monitor::qapi::{CommandCtx, QmpError};

/// The QEMU release whose interface qomvm implements, as `query-version` reports it:
/// QEMU 7.2, the release qomvm's behaviour is compared against (Debian 12's
/// `qemu-system-x86_64`, which the tests and benchmarks run beside qomvm). Clients such as
/// libvirt (which needs at least 4.2.0) pick their command lines and QMP usage by this
/// number and by what `query-qmp-schema` and `qom-list-types` list; qomvm's own version
/// is in `package`. See docs/libvirt.md.
pub const QEMU_INTERFACE_VERSION: (u64, u64, u64) = (7, 2, 0);

/// QEMU's `query-version` value.
pub fn version_info() -> Value {
    let (major, minor, micro) = QEMU_INTERFACE_VERSION;
    json!({
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": format!("qomvm {}", env!("CARGO_PKG_VERSION")),
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
    limits: Option<&(String, block::throttle::ThrottleConfig)>,
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
    v["detect_zeroes"] = backend.options().detect_zeroes.name().into();
    use block::throttle::Bucket::*;
    // QEMU's order: the averages, the image, then what is set of the bursts, the
    // operation size and the group.
    let buckets = [
        ("bps", BpsTotal),
        ("bps_rd", BpsRead),
        ("bps_wr", BpsWrite),
        ("iops", OpsTotal),
        ("iops_rd", OpsRead),
        ("iops_wr", OpsWrite),
    ];
    for (key, bucket) in buckets {
        v[key] = limits.map_or(0, |(_, c)| c.bucket(bucket).avg).into();
    }
    v["image"] = image;
    if let Some((group, config)) = limits {
        for (key, bucket) in buckets {
            let max = config.bucket(bucket).max;
            if max != 0 {
                v[format!("{key}_max")] = max.into();
            }
        }
        for (key, bucket) in buckets {
            let b = config.bucket(bucket);
            if b.max != 0 {
                v[format!("{key}_max_length")] = b.burst_length.into();
            }
        }
        if config.op_size != 0 {
            v["iops_size"] = config.op_size.into();
        }
        v["group"] = group.clone().into();
    }
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
    // The size now (`block_resize` changes it), not at open.
    image["virtual-size"] = backend.size().into();
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
        backend.io_limits().as_ref(),
    )
}

/// The realized devices with removable media (CD drives), by their QOM path.
pub fn removable_devices() -> Vec<(String, qom::ObjectRef)> {
    let Ok(machine) = resolve_path(&object_get_root(), "/machine") else {
        return Vec::new();
    };
    hw::core::qdev::qdev_realized_devices(&machine)
        .into_iter()
        .filter(|(_, dev)| dev.interface::<dyn RemovableMedia>().is_some())
        .collect()
}

/// The device `qdev` (an id, under /machine/peripheral, or a QOM path) names.
pub fn device_by_qdev(qdev: &str) -> Option<qom::ObjectRef> {
    let path = match qdev.starts_with('/') {
        true => qdev.to_string(),
        false => format!("/machine/peripheral/{qdev}"),
    };
    resolve_path(&object_get_root(), &path).ok()
}

/// The device with removable media that uses `b`, if any.
fn removable_user(b: &block::BlockBackend) -> Option<qom::ObjectRef> {
    let dev = device_by_qdev(&b.attached_dev()?)?;
    dev.interface::<dyn RemovableMedia>()?;
    Some(dev)
}

/// query-block's entry of a drive with removable media: its tray, the guest's lock and
/// the medium, if one is in.
fn removable_info(media: &dyn RemovableMedia) -> Value {
    let mut v = json!({
        "device": media.blk_name(),
        "qdev": media.qdev_id(),
        "locked": media.is_medium_locked(),
        "removable": true,
    });
    if media.has_tray() {
        v["tray_open"] = media.is_tray_open().into();
    }
    if let Some(medium) = media.medium() {
        v["inserted"] = inserted_info(&medium);
    }
    v
}

/// `query-block`: every backend QEMU would have, in creation order: each `-drive`, each
/// `-blockdev` node a device uses, then CD drives without a medium (by their device) and
/// named drives without a medium or device.
pub fn block_infos() -> Vec<Value> {
    let mut infos = Vec::new();
    let mut listed = Vec::new();
    for b in block::backends().iter().filter(|b| has_blk(b)) {
        if let Some(dev) = removable_user(b) {
            if let Some(media) = dev.interface::<dyn RemovableMedia>() {
                infos.push(removable_info(media));
                listed.push(dev.clone());
            }
            continue;
        }
        let mut v = json!({"device": b.id()});
        let qdev = b.attached_dev();
        if let Some(qdev) = &qdev {
            v["qdev"] = qdev.clone().into();
        }
        // A backend without a device takes any medium (QEMU's blk_dev_has_removable_media).
        v["locked"] = false.into();
        v["removable"] = qdev.is_none().into();
        v["inserted"] = inserted_info(b);
        infos.push(v);
    }
    for (_, dev) in removable_devices() {
        if listed.iter().any(|l| std::ptr::eq(&**l, &*dev)) {
            continue;
        }
        if let Some(media) = dev.interface::<dyn RemovableMedia>() {
            infos.push(removable_info(media));
        }
    }
    for name in block::unattached_empty_drives() {
        infos.push(json!({"device": name, "locked": false, "removable": true}));
    }
    // QAPI's deprecated BlockInfo `type`, which QEMU 7.2 still fills in for every drive.
    for info in &mut infos {
        info["type"] = "unknown".into();
    }
    infos
}

/// Whether QEMU would have a `BlockBackend` for it: a `-drive`, or a node a device uses.
fn has_blk(b: &block::BlockBackend) -> bool {
    !b.id().is_empty() || b.attached_dev().is_some()
}

/// QMP's `BlockDeviceStats`, in QAPI's member order.
fn device_stats_json(s: &block::BlockStats) -> Value {
    let mut v = json!({
        "rd_bytes": s.rd.bytes,
        "wr_bytes": s.wr.bytes,
        "unmap_bytes": s.unmap.bytes,
        "rd_operations": s.rd.operations,
        "wr_operations": s.wr.operations,
        "flush_operations": s.flush.operations,
        "unmap_operations": s.unmap.operations,
        "rd_total_time_ns": s.rd.total_time_ns,
        "wr_total_time_ns": s.wr.total_time_ns,
        "flush_total_time_ns": s.flush.total_time_ns,
        "unmap_total_time_ns": s.unmap.total_time_ns,
        "wr_highest_offset": s.wr_highest_offset,
        "rd_merged": s.rd.merged,
        "wr_merged": s.wr.merged,
        "unmap_merged": s.unmap.merged,
    });
    if let Some(idle) = s.idle_time_ns {
        v["idle_time_ns"] = idle.into();
    }
    for (key, value) in [
        ("failed_rd_operations", s.rd.failed),
        ("failed_wr_operations", s.wr.failed),
        ("failed_flush_operations", s.flush.failed),
        ("failed_unmap_operations", s.unmap.failed),
        ("invalid_rd_operations", s.rd.invalid),
        ("invalid_wr_operations", s.wr.invalid),
        ("invalid_flush_operations", s.flush.invalid),
        ("invalid_unmap_operations", s.unmap.invalid),
    ] {
        v[key] = value.into();
    }
    v["account_invalid"] = s.account_invalid.into();
    v["account_failed"] = s.account_failed.into();
    v["timed_stats"] = json!([]);
    v
}

/// A node's own statistics (QEMU's `bdrv_query_bds_stats`): only the highest write is
/// kept per node; the request counters are the backend's.
fn node_stats_json(wr_highest_offset: u64) -> Value {
    device_stats_json(&block::BlockStats {
        wr_highest_offset,
        ..block::BlockStats::default()
    })
}

/// The `file` node's `driver-specific` statistics.
fn file_specific_json(f: &block::FileStats) -> Value {
    json!({
        "driver": "file",
        "discard-nb-ok": f.discard_nb_ok,
        "discard-nb-failed": f.discard_nb_failed,
        "discard-bytes-ok": f.discard_bytes_ok,
    })
}

/// The `BlockStats` of the file node of `layer` (what QEMU calls its `parent`).
fn file_node_stats(layer: &block::ImageInfo, file: &block::FileStats) -> Value {
    json!({
        "node-name": layer.file_node_name,
        "stats": node_stats_json(file.wr_highest_offset),
        "driver-specific": file_specific_json(file),
    })
}

/// The `BlockStats` of a backing layer and those below it (blk-level `backing`).
fn backing_stats(layer: &block::ImageInfo) -> Value {
    let mut v = json!({
        "node-name": layer.node_name,
        "stats": node_stats_json(0),
        "parent": file_node_stats(layer, &block::FileStats::default()),
    });
    if let Some(below) = &layer.backing {
        v["backing"] = backing_stats(below);
    }
    v
}

/// `query-blockstats`: each backend (`-drive`, or a node a device uses) with its I/O
/// statistics, its file node as `parent` and its backing chain; with `query-nodes`, every
/// named node with its own statistics instead.
pub fn block_stats(query_nodes: bool) -> Vec<Value> {
    let mut list = Vec::new();
    for b in block::backends() {
        let file = b.file_stats();
        let protocol = b.driver_name() == "file";
        if query_nodes {
            let top = b.image_info();
            if protocol {
                list.push(json!({
                    "node-name": b.node_name(),
                    "stats": node_stats_json(b.stats().wr_highest_offset),
                    "driver-specific": file_specific_json(&file),
                }));
                continue;
            }
            let mut layer = Some(top);
            while let Some(info) = layer {
                let is_top = std::ptr::eq(info, top);
                let (wr_highest, file) = if is_top {
                    (b.stats().wr_highest_offset, file)
                } else {
                    (0, block::FileStats::default())
                };
                list.push(json!({
                    "node-name": if is_top { b.node_name() } else { &info.node_name },
                    "stats": node_stats_json(wr_highest),
                    "parent": file_node_stats(info, &file),
                }));
                list.push(file_node_stats(info, &file));
                layer = info.backing.as_deref();
            }
            continue;
        }
        if !has_blk(&b) {
            continue;
        }
        let mut v = json!({"device": b.id()});
        if let Some(qdev) = b.attached_dev() {
            v["qdev"] = qdev.into();
        }
        v["node-name"] = b.node_name().into();
        v["stats"] = device_stats_json(&b.stats());
        if protocol {
            v["driver-specific"] = file_specific_json(&file);
        } else {
            v["parent"] = file_node_stats(b.image_info(), &file);
            if let Some(below) = &b.image_info().backing {
                v["backing"] = backing_stats(below);
            }
        }
        list.push(v);
    }
    list
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
            let top = std::ptr::eq(info, b.image_info());
            let node_name = if top {
                b.node_name().to_string()
            } else {
                info.node_name.clone()
            };
            let mut image = image_info_json(info);
            if top {
                image["virtual-size"] = b.size().into();
            }
            nodes.push(block_device_info(
                &b,
                info,
                &node_name,
                info.format.name(),
                ro,
                image,
                None,
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
                None,
            ));
            layer = info.backing.as_deref();
            ro = true;
        }
    }
    nodes
}

/// A JSON value for a property of `kind`, with the visitor's type errors (`qom-set`, and
/// the properties of `query-cpu-model-expansion`'s models).
pub(crate) fn value_from_json(prop: &Property, v: &Value) -> Result<QomValue, QmpError> {
    let wrong = |expected: &'static str| QmpError::InvalidParameterType {
        name: prop.name.to_string(),
        expected,
    };
    Ok(match prop.kind {
        PropertyKind::Bool => QomValue::Bool(v.as_bool().ok_or_else(|| wrong("boolean"))?),
        PropertyKind::Uint(_) | PropertyKind::Size => {
            QomValue::Uint(v.as_u64().ok_or_else(|| wrong("uint64"))?)
        }
        PropertyKind::Int(_) => QomValue::Int(v.as_i64().ok_or_else(|| wrong("integer"))?),
        PropertyKind::Str
        | PropertyKind::Enum(..)
        | PropertyKind::Child(_)
        | PropertyKind::Struct(_) => {
            QomValue::Str(v.as_str().ok_or_else(|| wrong("string"))?.to_string())
        }
        PropertyKind::Link(_) => {
            let path = v.as_str().ok_or_else(|| wrong("string"))?;
            if path.is_empty() {
                QomValue::Link(None)
            } else {
                QomValue::Link(Some(resolve(path)?))
            }
        }
    })
}
