//! The QMP commands (QEMU's `monitor/qmp-cmds.c`, `qom/qom-qmp-cmds.c`,
//! `hw/core/machine-qmp-cmds.c`, `system/runstate.c`'s `qmp_*`). Replies have QEMU's
//! member names; optional members are left out where QEMU leaves them out.

use hw::core::machine::{machine_class, TYPE_MACHINE};
use hw::core::qdev::TYPE_DEVICE;
use hw::core::runstate::{self, RunStatus};
use qom::{ObjectClass, Property};
use serde_json::{json, Map, Value};

use crate::monitor::cpu_model::{query_cpu_definitions, query_cpu_model_expansion};
use crate::monitor::info::{
    block_infos, block_stats, cpu_infos, iothread_infos, kvm_info, named_block_nodes, resolve,
    status_info, value_from_json, value_to_json, version_info,
};
use crate::monitor::qapi::{
    Arg, ArgType, CommandCtx, Deferred, QmpCommand, QmpError, EVENTS, QMP_CAPABILITIES_ARGS,
};
use crate::monitor::qmp_block;

/// Every command after negotiation, in `query-commands` order.
pub const COMMANDS: &[QmpCommand] = &[
    QmpCommand {
        name: "qmp_capabilities",
        args: QMP_CAPABILITIES_ARGS,
        // Handled by the session; listed here for query-commands.
        run: |_, _| Err(QmpError::AlreadyNegotiated),
    },
    QmpCommand {
        name: "query-version",
        args: &[],
        run: |_, _| Ok(version_info()),
    },
    QmpCommand {
        name: "query-commands",
        args: &[],
        run: query_commands,
    },
    QmpCommand {
        name: "query-qmp-schema",
        args: &[],
        run: |_, _| Ok(crate::monitor::schema::introspect(COMMANDS, EVENTS)),
    },
    QmpCommand {
        name: "query-command-line-options",
        args: &[Arg::optional("option", ArgType::Str)],
        run: query_command_line_options,
    },
    QmpCommand {
        name: "query-uuid",
        args: &[],
        run: |ctx, _| Ok(json!({"UUID": ctx.vm.uuid.to_string()})),
    },
    QmpCommand {
        name: "query-fdsets",
        args: &[],
        run: query_fdsets,
    },
    QmpCommand {
        name: "query-chardev",
        args: &[],
        run: query_chardev,
    },
    QmpCommand {
        name: "query-migrate-capabilities",
        args: &[],
        run: query_migrate_capabilities,
    },
    QmpCommand {
        name: "migrate-set-capabilities",
        args: &[Arg::required("capabilities", ArgType::Any)],
        run: migrate_set_capabilities,
    },
    QmpCommand {
        name: "migrate",
        args: &[
            Arg::required("uri", ArgType::Str),
            Arg::optional("blk", ArgType::Bool),
            Arg::optional("inc", ArgType::Bool),
            Arg::optional("detach", ArgType::Bool),
            Arg::optional("resume", ArgType::Bool),
        ],
        run: qmp_migrate,
    },
    QmpCommand {
        name: "getfd",
        args: &[Arg::required("fdname", ArgType::Str)],
        run: |ctx, args| {
            let name = args
                .get("fdname")
                .and_then(Value::as_str)
                .unwrap_or_default();
            crate::monitor::fds::getfd(ctx.fds.as_ref(), name).map_err(QmpError::Failed)?;
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "add-fd",
        args: &[
            Arg::optional("fdset-id", ArgType::Int),
            Arg::optional("opaque", ArgType::Str),
        ],
        run: qmp_add_fd,
    },
    QmpCommand {
        name: "remove-fd",
        args: &[
            Arg::required("fdset-id", ArgType::Int),
            Arg::optional("fd", ArgType::Int),
        ],
        run: qmp_remove_fd,
    },
    QmpCommand {
        name: "closefd",
        args: &[Arg::required("fdname", ArgType::Str)],
        run: |_, args| {
            let name = args
                .get("fdname")
                .and_then(Value::as_str)
                .unwrap_or_default();
            crate::monitor::fds::closefd(name).map_err(QmpError::Failed)?;
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "migrate-incoming",
        args: &[Arg::required("uri", ArgType::Str)],
        run: qmp_migrate_incoming,
    },
    QmpCommand {
        name: "query-migrate",
        args: &[],
        run: |_, _| Ok(crate::migration::query()),
    },
    QmpCommand {
        name: "migrate_cancel",
        args: &[],
        run: |_, _| {
            crate::migration::cancel();
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "query-migrate-parameters",
        args: &[],
        run: |_, _| Ok(crate::migration::parameters()),
    },
    QmpCommand {
        name: "migrate-set-parameters",
        args: &[
            Arg::optional("downtime-limit", ArgType::Int),
            Arg::optional("max-bandwidth", ArgType::Int),
            Arg::optional("multifd-channels", ArgType::Int),
        ],
        run: |_, args| {
            crate::migration::set_parameters(args).map_err(QmpError::Failed)?;
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "query-tpm-models",
        args: &[],
        // No TPM front end exists.
        run: |_, _| Ok(json!([])),
    },
    QmpCommand {
        name: "query-tpm-types",
        args: &[],
        // No TPM backend exists.
        run: |_, _| Ok(json!([])),
    },
    QmpCommand {
        name: "query-sev-capabilities",
        args: &[],
        run: |_, _| Err(QmpError::BadInput("SEV is not available in qomvm".into())),
    },
    QmpCommand {
        name: "query-sgx-capabilities",
        args: &[],
        run: |_, _| Err(QmpError::BadInput("SGX is not available in qomvm".into())),
    },
    QmpCommand {
        name: "query-hotpluggable-cpus",
        args: &[],
        run: query_hotpluggable_cpus,
    },
    QmpCommand {
        name: "query-memory-size-summary",
        args: &[],
        run: query_memory_size_summary,
    },
    QmpCommand {
        name: "query-mice",
        args: &[],
        run: query_mice,
    },
    QmpCommand {
        name: "query-status",
        args: &[],
        run: query_status,
    },
    QmpCommand {
        name: "query-name",
        args: &[],
        run: query_name,
    },
    QmpCommand {
        name: "query-kvm",
        args: &[],
        run: query_kvm,
    },
    QmpCommand {
        name: "query-target",
        args: &[],
        run: |_, _| Ok(json!({"arch": "x86_64"})),
    },
    QmpCommand {
        name: "query-machines",
        args: &[],
        run: query_machines,
    },
    QmpCommand {
        name: "query-cpus-fast",
        args: &[],
        run: query_cpus_fast,
    },
    QmpCommand {
        name: "query-cpu-definitions",
        args: &[],
        run: query_cpu_definitions,
    },
    QmpCommand {
        name: "query-cpu-model-expansion",
        args: &[
            Arg::required("type", ArgType::Str),
            Arg::required("model", ArgType::Any),
        ],
        run: query_cpu_model_expansion,
    },
    QmpCommand {
        name: "query-block",
        args: &[],
        run: |_, _| Ok(block_infos().into()),
    },
    QmpCommand {
        name: "query-named-block-nodes",
        args: &[Arg::optional("flat", ArgType::Bool)],
        run: |_, _| Ok(named_block_nodes().into()),
    },
    QmpCommand {
        name: "query-blockstats",
        args: &[Arg::optional("query-nodes", ArgType::Bool)],
        run: |_, args| {
            let nodes = args
                .get("query-nodes")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            Ok(block_stats(nodes).into())
        },
    },
    QmpCommand {
        name: "blockdev-add",
        args: &[
            Arg::required("driver", ArgType::Str),
            Arg::optional("node-name", ArgType::Str),
            Arg::rest(),
        ],
        run: |_, args| qmp_block::qmp_blockdev_add(args),
    },
    QmpCommand {
        name: "blockdev-del",
        args: &[Arg::required("node-name", ArgType::Str)],
        run: |_, args| qmp_block::qmp_blockdev_del(args),
    },
    QmpCommand {
        name: "block_resize",
        args: &[
            Arg::optional("device", ArgType::Str),
            Arg::optional("node-name", ArgType::Str),
            Arg::required("size", ArgType::Int),
        ],
        run: |_, args| qmp_block::qmp_block_resize(args),
    },
    QmpCommand {
        name: "block_set_io_throttle",
        args: &[
            Arg::optional("device", ArgType::Str),
            Arg::optional("id", ArgType::Str),
            Arg::required("bps", ArgType::Int),
            Arg::required("bps_rd", ArgType::Int),
            Arg::required("bps_wr", ArgType::Int),
            Arg::required("iops", ArgType::Int),
            Arg::required("iops_rd", ArgType::Int),
            Arg::required("iops_wr", ArgType::Int),
            Arg::optional("bps_max", ArgType::Int),
            Arg::optional("bps_rd_max", ArgType::Int),
            Arg::optional("bps_wr_max", ArgType::Int),
            Arg::optional("iops_max", ArgType::Int),
            Arg::optional("iops_rd_max", ArgType::Int),
            Arg::optional("iops_wr_max", ArgType::Int),
            Arg::optional("bps_max_length", ArgType::Int),
            Arg::optional("bps_rd_max_length", ArgType::Int),
            Arg::optional("bps_wr_max_length", ArgType::Int),
            Arg::optional("iops_max_length", ArgType::Int),
            Arg::optional("iops_rd_max_length", ArgType::Int),
            Arg::optional("iops_wr_max_length", ArgType::Int),
            Arg::optional("iops_size", ArgType::Int),
            Arg::optional("group", ArgType::Str),
        ],
        run: |_, args| qmp_block::qmp_block_set_io_throttle(args),
    },
    QmpCommand {
        name: "eject",
        args: &[
            Arg::optional("device", ArgType::Str),
            Arg::optional("id", ArgType::Str),
            Arg::optional("force", ArgType::Bool),
        ],
        run: |_, args| qmp_block::qmp_eject(args),
    },
    QmpCommand {
        name: "blockdev-open-tray",
        args: &[
            Arg::optional("device", ArgType::Str),
            Arg::optional("id", ArgType::Str),
            Arg::optional("force", ArgType::Bool),
        ],
        run: |_, args| qmp_block::qmp_blockdev_open_tray(args),
    },
    QmpCommand {
        name: "blockdev-close-tray",
        args: &[
            Arg::optional("device", ArgType::Str),
            Arg::optional("id", ArgType::Str),
        ],
        run: |_, args| qmp_block::qmp_blockdev_close_tray(args),
    },
    QmpCommand {
        name: "blockdev-remove-medium",
        args: &[Arg::required("id", ArgType::Str)],
        run: |_, args| qmp_block::qmp_blockdev_remove_medium(args),
    },
    QmpCommand {
        name: "blockdev-insert-medium",
        args: &[
            Arg::required("id", ArgType::Str),
            Arg::required("node-name", ArgType::Str),
        ],
        run: |_, args| qmp_block::qmp_blockdev_insert_medium(args),
    },
    QmpCommand {
        name: "blockdev-change-medium",
        args: &[
            Arg::optional("device", ArgType::Str),
            Arg::optional("id", ArgType::Str),
            Arg::required("filename", ArgType::Str),
            Arg::optional("format", ArgType::Str),
            Arg::optional("read-only-mode", ArgType::Enum(&qmp_block::READ_ONLY_MODE)),
        ],
        run: |_, args| qmp_block::qmp_blockdev_change_medium(args),
    },
    QmpCommand {
        name: "query-iothreads",
        args: &[],
        run: |_, _| Ok(iothread_infos().into()),
    },
    QmpCommand {
        name: "chardev-add",
        args: &[
            Arg::required("id", ArgType::Str),
            Arg::required("backend", ArgType::Any),
        ],
        run: crate::monitor::qmp_char::qmp_chardev_add,
    },
    QmpCommand {
        name: "chardev-remove",
        args: &[Arg::required("id", ArgType::Str)],
        run: crate::monitor::qmp_char::qmp_chardev_remove,
    },
    QmpCommand {
        name: "device_add",
        args: &[
            Arg::required("driver", ArgType::Str),
            Arg::optional("bus", ArgType::Str),
            Arg::optional("id", ArgType::Str),
            Arg::rest(),
        ],
        run: crate::monitor::qmp_device::qmp_device_add,
    },
    QmpCommand {
        name: "device_del",
        args: &[Arg::required("id", ArgType::Str)],
        run: crate::monitor::qmp_device::qmp_device_del,
    },
    QmpCommand {
        name: "netdev_add",
        args: &[
            Arg::required("type", ArgType::Str),
            Arg::required("id", ArgType::Str),
            Arg::rest(),
        ],
        run: |_, args| {
            crate::net::qmp_netdev_add(args).map_err(QmpError::BadInput)?;
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "netdev_del",
        args: &[Arg::required("id", ArgType::Str)],
        run: |_, args| {
            let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
            crate::net::qmp_netdev_del(id).map_err(net_error)?;
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "set_link",
        args: &[
            Arg::required("name", ArgType::Str),
            Arg::required("up", ArgType::Bool),
        ],
        run: |_, args| {
            let name = args.get("name").and_then(Value::as_str).unwrap_or_default();
            let up = args.get("up").and_then(Value::as_bool).unwrap_or(true);
            crate::net::qmp_set_link(name, up).map_err(net_error)?;
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "announce-self",
        args: &[
            Arg::required("initial", ArgType::Int),
            Arg::required("max", ArgType::Int),
            Arg::required("rounds", ArgType::Int),
            Arg::required("step", ArgType::Int),
            Arg::optional("interfaces", ArgType::Any),
            Arg::optional("id", ArgType::Str),
        ],
        run: |_, args| {
            let num = |k: &str| args.get(k).and_then(Value::as_u64).unwrap_or(0);
            let interfaces = match args.get("interfaces") {
                None => None,
                Some(Value::Array(items)) => Some(
                    items
                        .iter()
                        .map(|i| {
                            i.as_str()
                                .map(str::to_string)
                                .ok_or(QmpError::InvalidParameterType {
                                    name: "interfaces".into(),
                                    expected: "string",
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                Some(_) => {
                    return Err(QmpError::InvalidParameterType {
                        name: "interfaces".into(),
                        expected: "array",
                    })
                }
            };
            crate::net::qmp_announce_self(
                num("initial"),
                num("max"),
                num("rounds"),
                num("step"),
                interfaces,
            );
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "query-rx-filter",
        args: &[Arg::optional("name", ArgType::Str)],
        run: |_, args| {
            let name = args.get("name").and_then(Value::as_str);
            Ok(crate::net::qmp_query_rx_filter(name)
                .map_err(net_error)?
                .into())
        },
    },
    QmpCommand {
        name: "balloon",
        args: &[Arg::required("value", ArgType::Int)],
        run: qmp_balloon,
    },
    QmpCommand {
        name: "query-pci",
        args: &[],
        run: |ctx, _| Ok(crate::monitor::qmp_pci::query_pci(&ctx.vm.machine)),
    },
    QmpCommand {
        name: "input-send-event",
        args: &[
            Arg::optional("device", ArgType::Str),
            Arg::optional("head", ArgType::Int),
            Arg::required("events", ArgType::Any),
        ],
        run: crate::monitor::qmp_input::input_send_event,
    },
    QmpCommand {
        name: "send-key",
        args: &[
            Arg::required("keys", ArgType::Any),
            Arg::optional("hold-time", ArgType::Int),
        ],
        run: crate::monitor::qmp_input::send_key,
    },
    QmpCommand {
        name: "query-balloon",
        args: &[],
        run: query_balloon,
    },
    QmpCommand {
        name: "object-add",
        args: &[
            Arg::required("qom-type", ArgType::Str),
            Arg::optional("id", ArgType::Str),
            Arg::rest(),
        ],
        run: object_add,
    },
    QmpCommand {
        name: "object-del",
        args: &[Arg::required("id", ArgType::Str)],
        run: object_del,
    },
    QmpCommand {
        name: "qom-list",
        args: &[Arg::required("path", ArgType::Str)],
        run: qom_list,
    },
    QmpCommand {
        name: "qom-get",
        args: &[
            Arg::required("path", ArgType::Str),
            Arg::required("property", ArgType::Str),
        ],
        run: qom_get,
    },
    QmpCommand {
        name: "qom-set",
        args: &[
            Arg::required("path", ArgType::Str),
            Arg::required("property", ArgType::Str),
            Arg::required("value", ArgType::Any),
        ],
        run: qom_set,
    },
    QmpCommand {
        name: "qom-list-types",
        args: &[
            Arg::optional("implements", ArgType::Str),
            Arg::optional("abstract", ArgType::Bool),
        ],
        run: qom_list_types,
    },
    QmpCommand {
        name: "qom-list-properties",
        args: &[Arg::required("typename", ArgType::Str)],
        run: qom_list_properties,
    },
    QmpCommand {
        name: "device-list-properties",
        args: &[Arg::required("typename", ArgType::Str)],
        run: device_list_properties,
    },
    QmpCommand {
        name: "stop",
        args: &[],
        run: qmp_stop,
    },
    QmpCommand {
        name: "cont",
        args: &[],
        run: qmp_cont,
    },
    QmpCommand {
        name: "system_reset",
        args: &[],
        run: qmp_system_reset,
    },
    QmpCommand {
        name: "system_powerdown",
        args: &[],
        run: qmp_system_powerdown,
    },
    QmpCommand {
        name: "query-current-machine",
        args: &[],
        run: |ctx, _| {
            let vm = ctx.vm.machine_state().vm_state();
            Ok(json!({"wakeup-suspend-support": vm.wakeup_supported()}))
        },
    },
    QmpCommand {
        // QEMU's: the OSPM status of ACPI hotplug slots (DIMMs, CPUs), of which qomvm's
        // machines have none; a machine without ACPI has no device to ask.
        name: "query-acpi-ospm-status",
        args: &[],
        run: |ctx, _| {
            if !ctx.vm.machine_state().vm_state().wakeup_supported() {
                return Err(QmpError::Failed(
                    "command is not supported, missing ACPI device".into(),
                ));
            }
            Ok(json!([]))
        },
    },
    QmpCommand {
        // No pc-dimm, nvdimm or virtio-mem devices: none plugged.
        name: "query-memory-devices",
        args: &[],
        run: |_, _| Ok(json!([])),
    },
    QmpCommand {
        // The -chardev and chardev-add backends qomvm has (QEMU lists its own, more).
        name: "query-chardev-backends",
        args: &[],
        run: |_, _| {
            let names = ["file", "null", "pty", "ringbuf", "socket", "stdio"];
            Ok(names
                .iter()
                .map(|n| json!({"name": n}))
                .collect::<Vec<_>>()
                .into())
        },
    },
    QmpCommand {
        name: "system_wakeup",
        args: &[],
        run: qmp_system_wakeup,
    },
    QmpCommand {
        name: "set-action",
        args: &[
            Arg::optional("reboot", ArgType::Str),
            Arg::optional("shutdown", ArgType::Str),
            Arg::optional("panic", ArgType::Str),
            Arg::optional("watchdog", ArgType::Str),
        ],
        run: qmp_set_action,
    },
    QmpCommand {
        name: "watchdog-set-action",
        args: &[Arg::required(
            "action",
            ArgType::Enum(&crate::monitor::qapi::WATCHDOG_ACTION),
        )],
        run: qmp_watchdog_set_action,
    },
    QmpCommand {
        name: "inject-nmi",
        args: &[],
        run: qmp_inject_nmi,
    },
    QmpCommand {
        name: "quit",
        args: &[],
        run: qmp_quit,
    },
    QmpCommand {
        name: "pmemsave",
        args: &[
            Arg::required("val", ArgType::Int),
            Arg::required("size", ArgType::Int),
            Arg::required("filename", ArgType::Str),
        ],
        run: qmp_pmemsave,
    },
    QmpCommand {
        name: "memsave",
        args: &[
            Arg::required("val", ArgType::Int),
            Arg::required("size", ArgType::Int),
            Arg::required("filename", ArgType::Str),
            Arg::optional("cpu-index", ArgType::Int),
        ],
        run: qmp_memsave,
    },
    QmpCommand {
        name: "dump-guest-memory",
        args: &[
            Arg::required("paging", ArgType::Bool),
            Arg::required("protocol", ArgType::Str),
            Arg::optional("detach", ArgType::Bool),
            Arg::optional("begin", ArgType::Int),
            Arg::optional("length", ArgType::Int),
            Arg::optional("format", ArgType::Enum(&DUMP_GUEST_MEMORY_FORMAT)),
        ],
        run: qmp_dump_guest_memory,
    },
    QmpCommand {
        name: "query-dump",
        args: &[],
        run: |_, _| Ok(crate::dump::query()),
    },
    QmpCommand {
        name: "query-dump-guest-memory-capability",
        args: &[],
        run: |_, _| Ok(json!({ "formats": crate::dump::FORMATS })),
    },
    QmpCommand {
        name: "query-vnc",
        args: &[],
        run: |_, _| Ok(crate::vnc::query_vnc()),
    },
    QmpCommand {
        name: "set_password",
        args: &[
            Arg::required("protocol", ArgType::Enum(&DISPLAY_PROTOCOL)),
            Arg::required("password", ArgType::Str),
            Arg::optional("connected", ArgType::Enum(&SET_PASSWORD_ACTION)),
            Arg::optional("display", ArgType::Str),
        ],
        run: qmp_set_password,
    },
    QmpCommand {
        name: "expire_password",
        args: &[
            Arg::required("protocol", ArgType::Enum(&DISPLAY_PROTOCOL)),
            Arg::required("time", ArgType::Str),
            Arg::optional("display", ArgType::Str),
        ],
        run: qmp_expire_password,
    },
    QmpCommand {
        name: "change-vnc-password",
        args: &[Arg::required("password", ArgType::Str)],
        run: |_, args| {
            crate::vnc::vnc_display_password(None, str_arg(args, "password"))
                .map_err(|e| QmpError::Failed(e.to_string()))?;
            Ok(json!({}))
        },
    },
    QmpCommand {
        name: "screendump",
        args: &[
            Arg::required("filename", ArgType::Str),
            Arg::optional("device", ArgType::Str),
            Arg::optional("head", ArgType::Int),
            Arg::optional("format", ArgType::Enum(&IMAGE_FORMAT)),
        ],
        run: qmp_screendump,
    },
    QmpCommand {
        name: "human-monitor-command",
        args: &[
            Arg::required("command-line", ArgType::Str),
            Arg::optional("cpu-index", ArgType::Int),
        ],
        run: human_monitor_command,
    },
];

/// The command called `name`.
pub fn find_command(name: &str) -> Option<&'static QmpCommand> {
    COMMANDS.iter().find(|c| c.name == name)
}

fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> &'a str {
    // check_args has verified the type of every declared argument.
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

fn query_commands(_: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    Ok(COMMANDS.iter().map(|c| json!({"name": c.name})).collect())
}

fn query_status(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    Ok(status_info(ctx))
}

fn query_name(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    Ok(match &ctx.vm.name {
        Some(name) => json!({"name": name}),
        None => json!({}),
    })
}

fn query_kvm(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    let (enabled, present) = kvm_info(ctx);
    Ok(json!({"enabled": enabled, "present": present}))
}

fn query_machines(_: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut list = Vec::new();
    for class in qom::object_class_get_list(Some(TYPE_MACHINE), false) {
        let Some(mc) = machine_class(class) else {
            continue;
        };
        let mut m = Map::new();
        m.insert("name".into(), mc.name.into());
        if let Some(alias) = mc.alias {
            m.insert("alias".into(), alias.into());
        }
        if mc.is_default {
            m.insert("is-default".into(), true.into());
        }
        m.insert("cpu-max".into(), mc.max_cpus.into());
        m.insert("hotpluggable-cpus".into(), false.into());
        m.insert("numa-mem-supported".into(), false.into());
        m.insert("deprecated".into(), mc.deprecation_reason.is_some().into());
        if let Some(cpu) = mc.default_cpu_type {
            m.insert("default-cpu-type".into(), cpu.into());
        }
        // QEMU: a machine "has ACPI" if its class has the `acpi` property.
        m.insert("acpi".into(), class.find_property("acpi").is_some().into());
        list.push(Value::Object(m));
    }
    Ok(Value::Array(list))
}

/// The topology ids of CPU `index` for `-smp` (socket, core, thread).
fn topology(ctx: &CommandCtx, index: u32) -> (u32, u32, u32) {
    let smp = ctx.vm.machine_state().smp();
    let threads = smp.threads.max(1);
    let cores = smp.cores.max(1);
    (
        index / (threads * cores),
        (index / threads) % cores,
        index % threads,
    )
}

fn query_cpus_fast(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    Ok(cpu_infos(ctx)
        .into_iter()
        .map(|c| {
            let (socket, core, thread) = topology(ctx, c.index);
            json!({
                "thread-id": c.thread_id,
                "props": {"core-id": core, "thread-id": thread, "socket-id": socket},
                "qom-path": c.qom_path,
                "cpu-index": c.index,
                "target": "x86_64",
            })
        })
        .collect())
}

fn qom_list(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let obj = resolve(str_arg(args, "path"))?;
    Ok(obj
        .properties()
        .iter()
        .map(|p| json!({"name": p.name, "type": p.kind.type_name()}))
        .collect())
}

fn qom_get(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let obj = resolve(str_arg(args, "path"))?;
    let property = str_arg(args, "property");
    if property == "guest-stats" {
        if let Some(stats) = guest_stats(&obj) {
            return Ok(stats);
        }
    }
    if property == "rtc-time" || property == "date" {
        if let Some(tm) = rtc_time(&obj, property) {
            return Ok(tm);
        }
    }
    Ok(value_to_json(&obj.property_get(property)?))
}

/// QEMU's RTC `date` and the machine's `rtc-time` alias of it, as a `struct tm`: years
/// since 1900, months from 0.
fn rtc_time(obj: &qom::Object, property: &str) -> Option<Value> {
    use hw::i386::pc_piix::PcI440fxMachine;
    use hw::rtc::mc146818rtc::Mc146818Rtc;
    let tm = match property {
        "date" => obj.cast::<Mc146818Rtc>()?.rtc().rtc_time(),
        _ => obj.cast::<PcI440fxMachine>()?.rtc_time()?,
    };
    Some(json!({
        "tm_year": tm.year - 1900,
        "tm_mon": tm.mon - 1,
        "tm_mday": tm.mday,
        "tm_hour": tm.hour,
        "tm_min": tm.min,
        "tm_sec": tm.sec,
    }))
}

/// QEMU's `balloon_stats_get_all`: the balloon's `guest-stats` structure, which QOM's
/// scalar values cannot carry.
fn guest_stats(obj: &qom::Object) -> Option<Value> {
    let dev = obj.cast::<hw::virtio::virtio_balloon_pci::VirtioBalloonPci>()?;
    let (stats, last_update) = dev.stats().guest_stats();
    let stats: Map<String, Value> = stats
        .into_iter()
        .map(|(name, v)| (name.to_string(), v.into()))
        .collect();
    Some(json!({"stats": stats, "last-update": last_update}))
}

/// QEMU's `qmp_pmemsave`: `size` bytes of guest-physical memory from `val` into a file
/// (what libvirt's `virDomainMemoryPeek` reads). As QEMU's `cpu_physical_memory_read`, the
/// bytes come as the first CPU would read them (`MachineServices::read_physical`): the VGA
/// window's text, not the RAM under it.
fn qmp_pmemsave(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let addr = crate::monitor::qapi::int_arg(args, "val")?.unwrap_or(0);
    let size = crate::monitor::qapi::int_arg(args, "size")?.unwrap_or(0);
    let filename = args.get("filename").and_then(Value::as_str).unwrap_or("");
    if addr < 0 || size < 0 || (addr as u64).checked_add(size as u64).is_none() {
        return Err(QmpError::Failed(format!(
            "Invalid addr 0x{addr:016x}/size {size} specified"
        )));
    }
    let services = ctx.vm.machine_state().services();
    save_memory(filename, addr as u64, size as u64, 64 << 10, |at, buf| {
        services.read_physical(at, buf);
        true
    })?;
    Ok(json!({}))
}

/// Writes `size` bytes from `addr` into a new file `filename`, `chunk` bytes at a time
/// through `read` (false: that chunk cannot be read, the command fails with QEMU's
/// "Invalid addr" after what came before it).
fn save_memory(
    filename: &str,
    addr: u64,
    size: u64,
    chunk: usize,
    mut read: impl FnMut(u64, &mut [u8]) -> bool,
) -> Result<(), QmpError> {
    let mut file = std::fs::File::create(filename).map_err(|e| {
        QmpError::Failed(format!(
            "Could not open '{filename}': {}",
            hw::core::os_error::strerror(&e)
        ))
    })?;
    // More than the file system can take would fail at ENOSPC anyway; failing first keeps
    // a huge request (8 PiB) from filling the host's disk and holding the monitor.
    if size > free_bytes(&file) {
        return Err(QmpError::Failed("An IO error has occurred".into()));
    }
    let mut buf = vec![0u8; chunk];
    let (mut at, mut left) = (addr, size);
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if !read(at, &mut buf[..n]) {
            return Err(QmpError::Failed(format!(
                "Invalid addr 0x{addr:016x}/size {size} specified"
            )));
        }
        std::io::Write::write_all(&mut file, &buf[..n])
            .map_err(|_| QmpError::Failed("An IO error has occurred".into()))?;
        at = at.wrapping_add(n as u64);
        left -= n as u64;
    }
    Ok(())
}

/// QEMU's `qmp_memsave`: `size` bytes of CPU `cpu-index`'s (default 0) virtual memory from
/// `val` into a file, 1 KiB at a time; where a chunk is not mapped the file keeps what
/// came before it and the command fails, as QEMU's.
fn qmp_memsave(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let addr = crate::monitor::qapi::int_arg(args, "val")?.unwrap_or(0);
    let size = crate::monitor::qapi::int_arg(args, "size")?.unwrap_or(0);
    let filename = str_arg(args, "filename");
    let cpu_index = crate::monitor::qapi::int_arg(args, "cpu-index")?.unwrap_or(0);
    let ms = ctx.vm.machine_state();
    let cpu_exists = ms.cpus().iter().any(|c| {
        c.downcast::<hw::core::cpu::CpuState>()
            .is_some_and(|c| i64::from(c.index()) == cpu_index)
    });
    if !cpu_exists {
        return Err(QmpError::Failed(
            "Parameter 'cpu-index' expects a CPU number".into(),
        ));
    }
    if size < 0 {
        return Err(QmpError::Failed(format!(
            "Invalid addr 0x{addr:016x}/size {size} specified"
        )));
    }
    let ops = ms
        .accel_ops()
        .ok_or_else(|| QmpError::Failed("No CPU available".into()))?;
    let regs = ops
        .paging_registers(cpu_index as u32)
        .map_err(|e| QmpError::Failed(e.to_string()))?;
    let services = ms.services();
    let read = crate::monitor::x86_paging::debug_reader(services);
    let assigned = |at: u64, len: u64| services.is_assigned(at, len);
    save_memory(filename, addr as u64, size as u64, 1024, |at, buf| {
        crate::monitor::x86_paging::read_virtual(&regs, &read, &assigned, at, buf)
    })?;
    Ok(json!({}))
}

/// The bytes an unprivileged writer may still put on `file`'s file system; unlimited for
/// what is not a regular file (`/dev/null`, a pipe: their file systems report no space).
fn free_bytes(file: &std::fs::File) -> u64 {
    use std::os::fd::AsRawFd;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return u64::MAX;
    }
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs fills `st` for a valid descriptor; it is read only on success.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return u64::MAX;
    }
    // SAFETY: initialised by the successful call above.
    let st = unsafe { st.assume_init() };
    st.f_bavail.saturating_mul(st.f_frsize)
}

/// QAPI's `DumpGuestMemoryFormat`.
pub const DUMP_GUEST_MEMORY_FORMAT: crate::monitor::qapi::QapiEnum =
    crate::monitor::qapi::QapiEnum {
        name: "DumpGuestMemoryFormat",
        values: &["elf", "kdump-zlib", "kdump-lzo", "kdump-snappy", "win-dmp"],
    };

/// QEMU's `qmp_dump_guest_memory` (`crate::dump`): `begin` and `length` are
/// guest-physical, `fd:NAME` names a descriptor passed with `getfd`.
fn qmp_dump_guest_memory(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let uint = |name: &str| -> Result<Option<u64>, QmpError> {
        match crate::monitor::qapi::int_arg(args, name)? {
            None => Ok(None),
            Some(v) => u64::try_from(v)
                .map(Some)
                .map_err(|_| QmpError::Failed(format!("Invalid parameter '{name}'"))),
        }
    };
    let request = crate::dump::DumpRequest {
        protocol: str_arg(args, "protocol"),
        paging: args.get("paging").and_then(Value::as_bool) == Some(true),
        begin: uint("begin")?,
        length: uint("length")?,
        detach: args.get("detach").and_then(Value::as_bool) == Some(true),
        format: args.get("format").and_then(Value::as_str),
    };
    crate::dump::dump_guest_memory(&ctx.vm.machine, &request, &crate::monitor::fds::take)
        .map_err(|e| QmpError::Failed(e.to_string()))?;
    Ok(json!({}))
}

/// QAPI's `DisplayProtocol`.
pub const DISPLAY_PROTOCOL: crate::monitor::qapi::QapiEnum = crate::monitor::qapi::QapiEnum {
    name: "DisplayProtocol",
    values: &["vnc", "spice"],
};

/// QAPI's `SetPasswordAction`.
pub const SET_PASSWORD_ACTION: crate::monitor::qapi::QapiEnum = crate::monitor::qapi::QapiEnum {
    name: "SetPasswordAction",
    values: &["keep", "fail", "disconnect"],
};

/// QEMU's `qmp_set_password` (7.2): VNC takes `connected=keep` only; there is no SPICE.
pub fn qmp_set_password(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    if str_arg(args, "protocol") == "spice" {
        return Err(QmpError::NotActive("SPICE is not in use"));
    }
    let connected = args.get("connected").and_then(Value::as_str);
    if connected.is_some_and(|c| c != "keep") {
        return Err(QmpError::InvalidParameter("connected"));
    }
    let display = args.get("display").and_then(Value::as_str);
    crate::vnc::vnc_display_password(display, str_arg(args, "password"))
        .map_err(|e| QmpError::Failed(e.to_string()))?;
    Ok(json!({}))
}

/// QEMU's `qmp_expire_password`: `now`, `never`, `+SECONDS` or seconds since the epoch.
pub fn qmp_expire_password(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let time = str_arg(args, "time");
    let when = crate::vnc::auth::parse_expire_time(time, crate::vnc::auth::now_secs())
        .ok_or_else(|| QmpError::Failed(format!("Parameter 'time' doesn't take value '{time}'")))?;
    if str_arg(args, "protocol") == "spice" {
        return Err(QmpError::NotActive("SPICE is not in use"));
    }
    let display = args.get("display").and_then(Value::as_str);
    crate::vnc::vnc_display_pw_expire(display, when)
        .map_err(|e| QmpError::Failed(e.to_string()))?;
    Ok(json!({}))
}

/// QAPI's `ImageFormat`.
pub const IMAGE_FORMAT: crate::monitor::qapi::QapiEnum = crate::monitor::qapi::QapiEnum {
    name: "ImageFormat",
    values: crate::ui::IMAGE_FORMATS,
};

/// QEMU's `qmp_screendump`.
fn qmp_screendump(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let device = args.get("device").and_then(Value::as_str);
    let head = crate::monitor::qapi::int_arg(args, "head")?;
    let format = args.get("format").and_then(Value::as_str);
    crate::ui::screendump(
        ctx.vm.machine_state(),
        str_arg(args, "filename"),
        device,
        head,
        format,
    )
    .map_err(|e| match e {
        crate::ui::ScreendumpError::DeviceNotFound(id) => QmpError::DeviceNotFound(id),
        other => QmpError::Failed(other.to_string()),
    })?;
    Ok(json!({}))
}

/// QEMU's `qmp_balloon`: `value` is the guest's target size in bytes.
fn qmp_balloon(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let value = crate::monitor::qapi::int_arg(args, "value")?.unwrap_or(0);
    ctx.vm
        .machine_state()
        .services()
        .balloon()
        .set_target(value)?;
    Ok(json!({}))
}

/// QEMU's `qmp_query_balloon`.
fn query_balloon(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    let actual = ctx.vm.machine_state().services().balloon().actual()?;
    Ok(json!({"actual": actual}))
}

fn qom_set(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let obj = resolve(str_arg(args, "path"))?;
    let name = str_arg(args, "property");
    let prop = obj
        .find_property(name)
        .ok_or_else(|| qom::Error::PropertyNotFound {
            type_name: obj.type_name().to_string(),
            name: name.to_string(),
        })?;
    let value = value_from_json(&prop, args.get("value").unwrap_or(&Value::Null))?;
    obj.property_set(name, value)?;
    Ok(json!({}))
}

fn qom_list_types(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let implements = args.get("implements").and_then(Value::as_str);
    let include_abstract = args
        .get("abstract")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(qom::object_class_get_list(implements, include_abstract)
        .into_iter()
        .map(|class| {
            let mut m = Map::new();
            m.insert("name".into(), class.name().into());
            if class.is_abstract() {
                m.insert("abstract".into(), true.into());
            }
            if let Some(parent) = class.parent() {
                m.insert("parent".into(), parent.name().into());
            }
            Value::Object(m)
        })
        .collect())
}

/// QEMU's `ObjectPropertyInfo`: name, type, description, default value.
fn property_info(p: &Property) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), p.name.to_string().into());
    m.insert("type".into(), p.kind.type_name().into());
    if !p.description.is_empty() {
        m.insert("description".into(), p.description.into());
    }
    if p.info().default.is_some() {
        m.insert("default-value".into(), value_to_json(&p.default_value()));
    }
    Value::Object(m)
}

/// The properties of `class`: an instance's for concrete types (so that properties added
/// at instance_init are listed, as QEMU does), the class's for abstract ones.
fn type_properties(class: &'static ObjectClass) -> Result<Vec<std::sync::Arc<Property>>, QmpError> {
    if class.is_abstract() {
        return Ok(class.properties().to_vec());
    }
    let obj = qom::Object::new_with_class(class)?;
    Ok(obj.properties())
}

fn qom_list_properties(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let name = str_arg(args, "typename");
    let class =
        qom::object_class_by_name(name).ok_or_else(|| QmpError::ClassNotFound(name.into()))?;
    Ok(type_properties(class)?
        .iter()
        .map(|p| property_info(p))
        .collect())
}

fn device_list_properties(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let name = str_arg(args, "typename");
    let class =
        qom::object_class_by_name(name).ok_or_else(|| QmpError::DeviceNotFound(name.into()))?;
    if !class.is_a(TYPE_DEVICE) || class.is_abstract() {
        return Err(QmpError::WrongType {
            name: "typename",
            expected: "non-abstract device type",
        });
    }
    // QEMU leaves out what every object and device has.
    const SKIP: &[&str] = &[
        "type",
        "realized",
        "hotpluggable",
        "hotplugged",
        "parent_bus",
    ];
    Ok(type_properties(class)?
        .iter()
        .filter(|p| !SKIP.contains(&p.name.as_ref()) && !p.name.starts_with("legacy-"))
        .map(|p| property_info(p))
        .collect())
}

/// QEMU's `qmp_object_add`: `qom-type` and `id`, then the type's own members, checked in
/// QAPI's order (the type first: only user-creatable types are values of `ObjectType`).
fn object_add(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let qom_type = str_arg(args, "qom-type");
    if crate::objects::check_qom_type(qom_type).is_err() {
        return Err(QmpError::InvalidEnumValue {
            name: "qom-type".into(),
            value: qom_type.into(),
        });
    }
    if !args.contains_key("id") {
        return Err(QmpError::MissingParameter("id".into()));
    }
    let opts = crate::objects::options_from_json(args).map_err(QmpError::BadInput)?;
    crate::objects::object_add(&opts)?;
    Ok(json!({}))
}

/// QEMU's `qmp_object_del`.
fn object_del(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    qom::user_creatable_del(str_arg(args, "id"))?;
    Ok(json!({}))
}

fn qmp_stop(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    runstate::vm_stop(ctx.vm.machine_state(), RunStatus::Paused)?;
    Ok(json!({}))
}

/// QEMU's `qmp_cont`: after a completed outgoing migration the images were handed to the
/// destination; they are taken back before the guest runs here again.
pub(crate) fn qmp_cont(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    block::activate_all().map_err(|e| QmpError::BadInput(e.to_string()))?;
    runstate::vm_start(ctx.vm.machine_state())?;
    Ok(json!({}))
}

fn qmp_system_reset(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    ctx.deferred.set(Some(Deferred::Reset));
    Ok(json!({}))
}

fn qmp_system_powerdown(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    runstate::qemu_system_powerdown(ctx.vm.machine_state())?;
    Ok(json!({}))
}

/// QEMU's `qmp_system_wakeup`.
fn qmp_system_wakeup(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    runstate::qmp_system_wakeup(ctx.vm.machine_state())?;
    Ok(json!({}))
}

/// QEMU's `qmp_set_action`: every value is checked before any is applied; `shutdown` last,
/// as QEMU does.
fn qmp_set_action(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let vm = ctx.vm.machine_state().vm_state();
    let mut actions = vm.actions();
    for name in ["reboot", "panic", "watchdog", "shutdown"] {
        if let Some(value) = args.get(name).and_then(Value::as_str) {
            actions
                .set(name, value)
                .map_err(|e| QmpError::BadInput(e.to_string()))?;
        }
    }
    vm.set_actions(actions);
    Ok(json!({}))
}

/// QEMU's `qmp_watchdog_set_action` (`set-action`'s `watchdog` alone).
fn qmp_watchdog_set_action(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let vm = ctx.vm.machine_state().vm_state();
    let mut actions = vm.actions();
    actions
        .set("watchdog", str_arg(args, "action"))
        .map_err(|e| QmpError::BadInput(e.to_string()))?;
    vm.set_actions(actions);
    Ok(json!({}))
}

/// QEMU's `qmp_inject_nmi`: an NMI to every CPU.
pub fn qmp_inject_nmi(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    let ops = ctx
        .vm
        .machine_state()
        .accel_ops()
        .ok_or(QmpError::NotActive("No accelerator"))?;
    ops.inject_nmi()
        .map_err(|e| QmpError::Failed(e.to_string()))?;
    Ok(json!({}))
}

fn qmp_quit(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    ctx.deferred.set(Some(Deferred::Quit));
    Ok(json!({}))
}

/// QEMU's `qmp_human_monitor_command`: through the HMP the monitor's set-up installed.
fn human_monitor_command(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let cpu_index = crate::monitor::qapi::int_arg(args, "cpu-index")?;
    let output = (ctx.vm.human_monitor)(ctx, cpu_index, str_arg(args, "command-line"))?;
    // The HMP monitor ends lines with CR LF, and so does its captured output.
    Ok(output.replace('\n', "\r\n").into())
}

/// QEMU's `qmp_query_command_line_options`: the options that take `key=value` lists, each
/// with the parameters its parser knows (an empty list: any, as QEMU's `-device`).
fn query_command_line_options(
    _: &CommandCtx,
    args: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let wanted = args.get("option").and_then(Value::as_str);
    let list: Vec<Value> = crate::options::COMMAND_LINE_OPTIONS
        .iter()
        .filter(|(name, _)| wanted.is_none_or(|w| w == *name))
        .map(|(name, params)| {
            let parameters: Vec<Value> = params
                .iter()
                .map(|(p, ty)| json!({"name": p, "type": ty}))
                .collect();
            json!({"option": name, "parameters": parameters})
        })
        .collect();
    if let (Some(w), true) = (wanted, list.is_empty()) {
        return Err(QmpError::BadInput(format!("invalid option name: {w}")));
    }
    Ok(list.into())
}

/// QEMU's `qmp_add_fd`: the descriptor the client sent with this command joins a set (the
/// one named, or the lowest free), for `/dev/fdset/N` paths (libvirt passes disks and logs
/// this way).
fn qmp_add_fd(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let fd = crate::monitor::fds::take_received(ctx.fds.as_ref())
        .ok_or_else(|| QmpError::Failed("No file descriptor supplied via SCM_RIGHTS".into()))?;
    let set = crate::monitor::qapi::int_arg(args, "fdset-id")?;
    if set.is_some_and(|s| s < 0) {
        return Err(QmpError::Failed(
            "Parameter 'fdset-id' expects a non-negative value".into(),
        ));
    }
    let opaque = args.get("opaque").and_then(Value::as_str).map(String::from);
    let (id, fd) = hw::core::fdset::fdset_add_received(set, fd, opaque);
    Ok(json!({"fdset-id": id, "fd": fd}))
}

/// QEMU's `qmp_remove_fd`.
fn qmp_remove_fd(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let set = crate::monitor::qapi::int_arg(args, "fdset-id")?.unwrap_or(-1);
    let fd = crate::monitor::qapi::int_arg(args, "fd")?;
    let member = fd.and_then(|fd| i32::try_from(fd).ok());
    if fd.is_some() && member.is_none() || !hw::core::fdset::fdset_remove(set, member) {
        let name = match fd {
            Some(fd) => format!("fdset-id:{set}, fd:{fd}"),
            None => format!("fdset-id:{set}"),
        };
        return Err(QmpError::Failed(format!(
            "File descriptor named '{name}' not found"
        )));
    }
    Ok(json!({}))
}

/// QEMU's `qmp_query_fdsets`: the descriptor sets of `-add-fd`.
fn query_fdsets(_: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    Ok(hw::core::fdset::fdset_list()
        .into_iter()
        .map(|set| {
            let fds: Vec<Value> = set
                .fds
                .into_iter()
                .map(|m| match m.opaque {
                    Some(opaque) => json!({"fd": m.fd, "opaque": opaque}),
                    None => json!({"fd": m.fd}),
                })
                .collect();
            json!({"fdset-id": set.id, "fds": fds})
        })
        .collect())
}

/// QEMU's `qmp_query_chardev`: every character backend, the monitors' sockets included.
fn query_chardev(_: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut list: Vec<Value> = hw::core::chardev::chardev_list()
        .into_iter()
        .filter_map(|(label, _)| {
            let chardev = hw::core::chardev::chardev_find(&label)?;
            Some(json!({
                "label": label,
                "filename": chardev.filename(),
                // QEMU: false without a frontend.
                "frontend-open": chardev.frontend_open() && hw::core::chardev::chardev_is_busy(&label),
            }))
        })
        .collect();
    list.extend(crate::monitor::chardev::monitor_chardevs().into_iter().map(
        |(label, filename)| json!({"label": label, "filename": filename, "frontend-open": true}),
    ));
    Ok(list.into())
}

/// QEMU's `qmp_migrate`: checks the VM can move, then sends it from a thread
/// (`crate::migration`).
fn qmp_migrate(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    for unsupported in ["blk", "inc", "resume"] {
        if args.get(unsupported).and_then(Value::as_bool) == Some(true) {
            return Err(QmpError::Failed(format!(
                "Parameter '{unsupported}' is not supported by qomvm's migration"
            )));
        }
    }
    let uri = args.get("uri").and_then(Value::as_str).unwrap_or_default();
    crate::migration::migrate(&ctx.vm.machine, uri, &crate::monitor::fds::take)?;
    Ok(json!({}))
}

/// QEMU's `qmp_migrate_incoming`, after `-incoming defer`.
fn qmp_migrate_incoming(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let uri = args.get("uri").and_then(Value::as_str).unwrap_or_default();
    crate::migration::migrate_incoming(&ctx.vm.machine, uri, &crate::monitor::fds::take)?;
    Ok(json!({}))
}

/// QEMU's `qmp_query_migrate_capabilities`.
fn query_migrate_capabilities(_: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    Ok(crate::migration::capabilities())
}

/// QEMU's `qmp_migrate_set_capabilities`: a list of `{capability, state}`, checked whole
/// before any is applied.
fn migrate_set_capabilities(_: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let Some(list) = args.get("capabilities").and_then(Value::as_array) else {
        return Err(QmpError::InvalidParameterType {
            name: "capabilities".into(),
            expected: "array",
        });
    };
    let mut changes = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let member = |name: &str| format!("capabilities[{i}].{name}");
        let capability = item
            .get("capability")
            .ok_or_else(|| QmpError::MissingParameter(member("capability")))?;
        let capability = capability
            .as_str()
            .ok_or_else(|| QmpError::InvalidParameterType {
                name: member("capability"),
                expected: "string",
            })?;
        let capability = crate::migration::CAPABILITIES
            .iter()
            .copied()
            .find(|c| *c == capability)
            .ok_or_else(|| QmpError::InvalidEnumValue {
                name: member("capability"),
                value: capability.into(),
            })?;
        let state = item
            .get("state")
            .ok_or_else(|| QmpError::MissingParameter(member("state")))?
            .as_bool()
            .ok_or_else(|| QmpError::InvalidParameterType {
                name: member("state"),
                expected: "boolean",
            })?;
        changes.push((capability, state));
    }
    crate::migration::set_capabilities(&changes)?;
    Ok(json!({}))
}

/// QEMU's `qmp_query_hotpluggable_cpus`: qomvm's machines cannot hot-plug CPUs (their
/// `query-machines` entries say `hotpluggable-cpus: false`), so it is QEMU's error for
/// such a machine.
fn query_hotpluggable_cpus(_: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    Err(QmpError::BadInput(
        "The feature 'query-hotpluggable-cpus' is not enabled".into(),
    ))
}

/// QEMU's `qmp_query_memory_size_summary`: the machine's RAM and the memory plugged into
/// it as devices (`pc-dimm` and the like), which qomvm has none of.
fn query_memory_size_summary(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    Ok(json!({
        "base-memory": ctx.vm.machine_state().ram_size(),
        "plugged-memory": 0,
    }))
}

/// QEMU's `qmp_query_mice`: the pointing devices' input handlers, the current one (which
/// gets the pointer events) last.
fn query_mice(ctx: &CommandCtx, _: &Map<String, Value>) -> Result<Value, QmpError> {
    let mice = ctx.vm.machine_state().services().input().mice();
    Ok(mice
        .iter()
        .map(|m| {
            json!({
                "index": m.index,
                "name": m.name,
                "current": m.current,
                "absolute": m.absolute,
            })
        })
        .collect())
}

/// A network command's error as QMP reports it.
fn net_error(e: crate::net::NetCommandError) -> QmpError {
    match e {
        crate::net::NetCommandError::NotFound(name) => QmpError::DeviceNotFound(name),
        crate::net::NetCommandError::Other(text) => QmpError::BadInput(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_held_to_their_file_systems_free_space() {
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        assert_eq!(free_bytes(&null), u64::MAX);
        let path = std::env::temp_dir().join(format!("qomvm-free-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(free_bytes(&file) < u64::MAX);
    }
}
