//! The human monitor (QEMU's `monitor/hmp.c`, `monitor/hmp-cmds.c` and the `info`
//! commands of `qom/qom-hmp-cmds.c`, `system/qdev-monitor.c`, `system/memory.c`).
//!
//! [`hmp_execute`] runs one command line and returns its output; `-monitor`, QMP's
//! `human-monitor-command` and a console multiplexer can all call it. The output uses `\n`;
//! front ends that talk to a terminal or a QMP client turn it into `\r\n`, as QEMU's
//! monitor does.

use std::fmt::Write as _;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use hw::core::bus::{bus_children, TYPE_BUS};
use hw::core::cpu::{CpuState, TYPE_CPU};
use hw::core::qdev::{DeviceMethods, TYPE_DEVICE};
use hw::core::runstate::{self, RunStatus};
use qom::{object_get_root, resolve_path, Object, ObjectRef, PropertyKind, Value as QomValue};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::monitor::chardev::Connection;
use crate::monitor::client::{register_client, run_deferred, spawn_writer, wait_dispatch, Outbox};
use crate::monitor::info::{cpu_infos, kvm_info, resolve, status_info, value_to_json};
use crate::monitor::json;
use crate::monitor::qapi::{CommandCtx, Deferred, QmpError, VmContext};
use crate::monitor::qmp_cmds;

/// A human monitor's own state: the CPU `info registers` shows (QEMU's `mon_cpu`).
#[derive(Clone, Debug, Default)]
pub struct HmpState {
    cpu_index: u32,
}

impl HmpState {
    /// Selects the current CPU (QEMU's `monitor_set_cpu`).
    pub fn set_cpu(&mut self, ctx: &CommandCtx, index: i64) -> Result<(), String> {
        let exists = cpu_infos(ctx).iter().any(|c| i64::from(c.index) == index);
        if !exists {
            return Err("Parameter 'cpu-index' expects a CPU number".to_string());
        }
        self.cpu_index = index as u32;
        Ok(())
    }
}

type HmpFn = fn(&CommandCtx, &mut HmpState, &[&str], &mut String) -> Result<(), QmpError>;

/// One HMP command: its names (`cont|c`), parameters and help line.
struct HmpCommand {
    names: &'static str,
    params: &'static str,
    help: &'static str,
    run: HmpFn,
}

impl HmpCommand {
    fn matches(&self, name: &str) -> bool {
        self.names.split('|').any(|n| n == name)
    }
}

const COMMANDS: &[HmpCommand] = &[
    HmpCommand {
        names: "balloon",
        params: "target",
        help: "request VM to change its memory allocation (in MB)",
        run: balloon,
    },
    HmpCommand {
        names: "cont|c",
        params: "",
        help: "resume emulation",
        run: |ctx, _, _, _| super::qmp_cmds::qmp_cont(ctx, &Default::default()).map(drop),
    },
    HmpCommand {
        names: "change",
        params: "device [-f] filename [format [read-only-mode]]",
        help: "change a removable medium, optional format, use -f to force the operation",
        run: |_, _, args, _| {
            let mut args: Vec<&str> = args.to_vec();
            args.retain(|a| *a != "-f");
            let device = args.first().ok_or_else(|| missing("device"))?;
            let filename = args.get(1).ok_or_else(|| missing("target"))?;
            let mut qmp_args = serde_json::Map::new();
            qmp_args.insert("device".into(), (*device).into());
            qmp_args.insert("filename".into(), (*filename).into());
            if let Some(format) = args.get(2) {
                qmp_args.insert("format".into(), (*format).into());
            }
            if let Some(mode) = args.get(3) {
                if !super::qmp_block::READ_ONLY_MODE.values.contains(mode) {
                    return Err(QmpError::BadInput(format!(
                        "invalid parameter value: {mode}"
                    )));
                }
                qmp_args.insert("read-only-mode".into(), (*mode).into());
            }
            super::qmp_block::qmp_blockdev_change_medium(&qmp_args).map(drop)
        },
    },
    HmpCommand {
        names: "block_resize",
        params: "device size",
        help: "resize a block image",
        run: |_, _, args, out| {
            let device = args.first().ok_or_else(|| missing("device"))?;
            // QEMU's 'o' argument (`qemu_strtosz_MiB`): a bare number is MiB.
            let size = args.get(1).and_then(|s| {
                let bare = s.trim().chars().all(|c| c.is_ascii_digit() || c == '.');
                let text = if bare { format!("{s}M") } else { s.to_string() };
                qom::parse_size(&text).filter(|&n| n <= i64::MAX as u64)
            });
            let Some(size) = size else {
                out.push_str("invalid size\nTry \"help block_resize\" for more information\n");
                return Ok(());
            };
            let mut qmp_args = serde_json::Map::new();
            qmp_args.insert("device".into(), (*device).into());
            qmp_args.insert("size".into(), size.into());
            super::qmp_block::qmp_block_resize(&qmp_args).map(drop)
        },
    },
    HmpCommand {
        names: "block_set_io_throttle",
        params: "device bps bps_rd bps_wr iops iops_rd iops_wr",
        help: "change I/O throttle limits for a block drive",
        run: |_, _, args, out| {
            let names = ["device", "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"];
            let mut qmp_args = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let Some(text) = args.get(i) else {
                    return Err(missing(name));
                };
                if i == 0 {
                    // QEMU's hmp: a name no drive has is a device id.
                    let key = if block::backends().iter().any(|b| b.id() == *text)
                        || block::is_empty_drive(text)
                    {
                        "device"
                    } else {
                        "id"
                    };
                    qmp_args.insert(key.into(), (*text).into());
                    continue;
                }
                let Ok(value) = text.parse::<i64>() else {
                    out.push_str("invalid char in expression\nTry \"help block_set_io_throttle\" for more information\n");
                    return Ok(());
                };
                qmp_args.insert((*name).into(), value.into());
            }
            super::qmp_block::qmp_block_set_io_throttle(&qmp_args).map(drop)
        },
    },
    HmpCommand {
        names: "eject",
        params: "[-f] device",
        help: "eject a removable medium (use -f to force it)",
        run: |_, _, args, _| {
            let force = args.contains(&"-f");
            let device = args
                .iter()
                .find(|a| **a != "-f")
                .ok_or_else(|| missing("device"))?;
            let mut qmp_args = serde_json::Map::new();
            qmp_args.insert("device".into(), (*device).into());
            qmp_args.insert("force".into(), force.into());
            super::qmp_block::qmp_eject(&qmp_args).map(drop)
        },
    },
    HmpCommand {
        names: "help|?",
        params: "[cmd]",
        help: "show the help",
        run: help,
    },
    HmpCommand {
        names: "info",
        params: "[subcommand]",
        help: "show various information about the system state",
        run: info,
    },
    HmpCommand {
        names: "screendump",
        params: "filename [-f format] [device [head]]",
        help: "save screen from head 'head' of display device 'device'in specified format 'format' as image 'filename'.Currently only 'png' and 'ppm' formats are supported.",
        run: screendump,
    },
    HmpCommand {
        names: "set_password",
        params: "protocol password [-d display] [action-if-connected]",
        help: "set spice/vnc password",
        run: set_password,
    },
    HmpCommand {
        names: "expire_password",
        params: "protocol time [-d display]",
        help: "set spice/vnc password expire-time",
        run: expire_password,
    },
    HmpCommand {
        names: "chardev-add",
        params: "args",
        help: "add chardev",
        run: |_, _, args, _| crate::monitor::qmp_char::hmp_chardev_add(&args.join(" ")),
    },
    HmpCommand {
        names: "chardev-remove",
        params: "id",
        help: "remove chardev",
        run: |_, _, args, _| {
            let id = args.first().ok_or_else(|| missing("id"))?;
            crate::monitor::qmp_char::remove(id)
        },
    },
    HmpCommand {
        names: "device_add",
        params: "driver[,prop=value][,...]",
        help: "add device, like -device on the command line",
        run: |ctx, _, args, out| {
            let text = args.join(" ");
            let items = crate::options::split_opts_or_json(&text, "driver")
                .map_err(|e| QmpError::BadInput(e.to_string()))?;
            // QEMU's qdev_device_help: `device_add help`, `device_add DRIVER,help`.
            let driver = items.first().and_then(|(_, v)| v.clone()).unwrap_or_default();
            if matches!(driver.as_str(), "help" | "?") {
                out.push_str(&crate::help::devices());
                return Ok(());
            }
            if items.iter().skip(1).any(|(k, _)| k == "help" || k == "?") {
                let class = hw::core::qdev::device_type(&driver)
                    .map_err(|e| QmpError::Failed(e.to_string()))?;
                out.push_str(&crate::help::device_properties(class));
                return Ok(());
            }
            crate::monitor::qmp_device::device_add(&ctx.vm.machine, items)?;
            Ok(())
        },
    },
    HmpCommand {
        names: "device_del",
        params: "device",
        help: "remove device",
        run: |ctx, _, args, _| {
            let id = args.first().ok_or_else(|| missing("id"))?;
            crate::monitor::qmp_device::device_del(&ctx.vm.machine, id)
        },
    },
    HmpCommand {
        names: "netdev_add",
        params: "[user|tap],id=str[,prop=value][,...]",
        help: "add host network device",
        run: |_, _, args, _| {
            let text = args.join(" ");
            let pairs = crate::options::split_opts(&text, Some("type"));
            ::net::netdev_add(&pairs).map_err(|e| QmpError::BadInput(e.to_string()))
        },
    },
    HmpCommand {
        names: "netdev_del",
        params: "id",
        help: "remove host network device",
        run: |_, _, args, _| {
            let id = args.first().ok_or_else(|| missing("id"))?;
            crate::net::qmp_netdev_del(id).map_err(|_| QmpError::DeviceNotFound(id.to_string()))
        },
    },
    HmpCommand {
        names: "hostfwd_add",
        params: "[netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport",
        help: "redirect TCP or UDP connections from host to guest (requires -net user)",
        run: |_, _, args, out| {
            let (id, rule) = match args {
                [rule] => (None, *rule),
                [id, rule, ..] => (Some(*id), *rule),
                [] => return Err(missing("arg1")),
            };
            if let Err(e) = ::net::slirp::hostfwd_add(id, rule) {
                out.push_str(&e);
                out.push('\n');
            }
            Ok(())
        },
    },
    HmpCommand {
        names: "hostfwd_remove",
        params: "[netdev_id] [tcp|udp]:[hostaddr]:hostport",
        help: "remove host-to-guest TCP or UDP redirection",
        run: |_, _, args, out| {
            let (id, rule) = match args {
                [rule] => (None, *rule),
                [id, rule, ..] => (Some(*id), *rule),
                [] => return Err(missing("arg1")),
            };
            match ::net::slirp::hostfwd_remove(id, rule) {
                Ok(text) | Err(text) => {
                    out.push_str(&text);
                    out.push('\n');
                }
            }
            Ok(())
        },
    },
    HmpCommand {
        names: "migrate",
        params: "[-d] uri",
        help: "migrate to URI (using -d to not wait for completion)",
        run: |ctx, _, args, _| {
            // The command returns at once either way (QEMU's -d).
            let uri = args
                .iter()
                .find(|a| **a != "-d")
                .ok_or_else(|| missing("uri"))?;
            crate::migration::migrate(&ctx.vm.machine, uri, &crate::monitor::fds::take)?;
            Ok(())
        },
    },
    HmpCommand {
        names: "memsave",
        params: "addr size file",
        help: "save to disk virtual memory dump starting at 'addr' of size 'size'",
        run: |ctx, hmp, args, _| {
            // QEMU's hmp_memsave: through the monitor's current CPU.
            let (addr, size, file) = save_args(args)?;
            run_qmp(
                ctx,
                "memsave",
                serde_json::json!({"val": addr, "size": size, "filename": file, "cpu-index": hmp.cpu_index}),
            )
        },
    },
    HmpCommand {
        names: "pmemsave",
        params: "addr size file",
        help: "save to disk physical memory dump starting at 'addr' of size 'size'",
        run: |ctx, _, args, _| {
            let (addr, size, file) = save_args(args)?;
            run_qmp(
                ctx,
                "pmemsave",
                serde_json::json!({"val": addr, "size": size, "filename": file}),
            )
        },
    },
    HmpCommand {
        names: "dump-guest-memory",
        params: "[-p] [-d] [-z|-l|-s|-w] filename [begin length]",
        help: "dump guest memory into file 'filename'",
        run: dump_guest_memory,
    },
    HmpCommand {
        names: "migrate_cancel",
        params: "",
        help: "cancel the current VM migration",
        run: |_, _, _, _| {
            crate::migration::cancel();
            Ok(())
        },
    },
    HmpCommand {
        names: "set_link",
        params: "name on|off",
        help: "change the link status of a network adapter",
        run: |_, _, args, _| {
            let name = args.first().ok_or_else(|| missing("name"))?;
            let up = match args.get(1).copied() {
                Some("on") => true,
                Some("off") => false,
                _ => {
                    return Err(QmpError::BadInput(
                        "Parameter 'up' expects 'on' or 'off'".into(),
                    ))
                }
            };
            crate::net::qmp_set_link(name, up)
                .map_err(|_| QmpError::DeviceNotFound(name.to_string()))
        },
    },
    HmpCommand {
        names: "object_add",
        params: "[qom-type=]type,id=str[,prop=value][,...]",
        help: "create QOM object",
        run: object_add,
    },
    HmpCommand {
        names: "object_del",
        params: "id",
        help: "destroy QOM object",
        run: object_del,
    },
    HmpCommand {
        names: "qom-get",
        params: "path property",
        help: "print QOM property",
        run: qom_get,
    },
    HmpCommand {
        names: "qom-list",
        params: "[path]",
        help: "list QOM properties",
        run: qom_list,
    },
    HmpCommand {
        names: "qom-set",
        params: "[-j] path property value",
        help: "set QOM property (-j: the value is JSON)",
        run: qom_set,
    },
    HmpCommand {
        names: "quit|q",
        params: "",
        help: "quit the emulator",
        run: |ctx, _, _, _| {
            ctx.deferred.set(Some(Deferred::Quit));
            Ok(())
        },
    },
    HmpCommand {
        names: "xp",
        params: "/fmt addr",
        help: "physical memory dump starting at 'addr'",
        run: xp,
    },
    HmpCommand {
        names: "x",
        params: "/fmt addr",
        help: "virtual memory dump starting at 'addr'",
        run: x,
    },
    HmpCommand {
        names: "gva2gpa",
        params: "addr",
        help: "print the guest physical address corresponding to a guest virtual address",
        run: gva2gpa,
    },
    HmpCommand {
        names: "i",
        params: "/fmt addr",
        help: "I/O port read",
        run: ioport_read,
    },
    HmpCommand {
        names: "o",
        params: "/fmt addr value",
        help: "I/O port write",
        run: ioport_write,
    },
    HmpCommand {
        names: "cpu",
        params: "index",
        help: "set the default CPU",
        run: cpu,
    },
    HmpCommand {
        names: "nmi",
        params: "",
        help: "inject an NMI",
        run: |ctx, _, _, _| {
            crate::monitor::qmp_cmds::qmp_inject_nmi(ctx, &serde_json::Map::new())?;
            Ok(())
        },
    },
    HmpCommand {
        names: "stop|s",
        params: "",
        help: "stop emulation",
        run: |ctx, _, _, _| {
            Ok(runstate::vm_stop(
                ctx.vm.machine_state(),
                RunStatus::Paused,
            )?)
        },
    },
    HmpCommand {
        names: "system_powerdown",
        params: "",
        help: "send system power down event",
        run: |ctx, _, _, _| Ok(runstate::qemu_system_powerdown(ctx.vm.machine_state())?),
    },
    HmpCommand {
        names: "system_reset",
        params: "",
        help: "reset the system",
        run: |ctx, _, _, _| {
            ctx.deferred.set(Some(Deferred::Reset));
            Ok(())
        },
    },
    HmpCommand {
        names: "system_wakeup",
        params: "",
        help: "wakeup guest from suspend",
        run: |ctx, _, _, _| Ok(runstate::qmp_system_wakeup(ctx.vm.machine_state())?),
    },
];

const INFO_COMMANDS: &[HmpCommand] = &[
    HmpCommand {
        names: "balloon",
        params: "",
        help: "show balloon information",
        run: info_balloon,
    },
    HmpCommand {
        names: "block",
        params: "[-n] [device]",
        help: "show info of one block device or all block devices (-n: named nodes)",
        run: info_block,
    },
    HmpCommand {
        names: "blockstats",
        params: "",
        help: "show block device statistics",
        run: info_blockstats,
    },
    HmpCommand {
        names: "cpus",
        params: "",
        help: "show infos for each CPU",
        run: info_cpus,
    },
    HmpCommand {
        names: "network",
        params: "",
        help: "show the network state",
        run: |_, _, _, out| {
            out.push_str(&crate::net::info_network());
            Ok(())
        },
    },
    HmpCommand {
        names: "pci",
        params: "",
        help: "show PCI info",
        run: |ctx, _, _, out| {
            crate::monitor::qmp_pci::info_pci(&ctx.vm.machine, out);
            Ok(())
        },
    },
    HmpCommand {
        names: "usb",
        params: "",
        help: "show guest USB devices",
        run: |ctx, _, _, out| {
            out.push_str(&hw::usb::usb_bus::info_usb(&ctx.vm.machine));
            Ok(())
        },
    },
    HmpCommand {
        names: "usernet",
        params: "",
        help: "show user network stack connection states",
        run: |_, _, _, out| {
            out.push_str(&::net::slirp::usernet_info());
            Ok(())
        },
    },
    HmpCommand {
        names: "iothreads",
        params: "",
        help: "show iothreads",
        run: info_iothreads,
    },
    HmpCommand {
        names: "kvm",
        params: "",
        help: "show KVM information",
        run: info_kvm,
    },
    HmpCommand {
        names: "mtree",
        params: "",
        help: "show memory tree",
        run: info_mtree,
    },
    HmpCommand {
        names: "dump",
        params: "",
        help: "Display the latest dump status",
        run: |_, _, _, out| {
            // QEMU's hmp_info_dump.
            let q = crate::dump::query();
            let status = q["status"].as_str().unwrap_or_default();
            let _ = writeln!(out, "Status: {status}");
            let total = q["total"].as_u64().unwrap_or(0);
            if status == "active" && total != 0 {
                let done = q["completed"].as_u64().unwrap_or(0);
                let _ = writeln!(out, "Finished: {:.2} %", 100.0 * done as f64 / total as f64);
            }
            Ok(())
        },
    },
    HmpCommand {
        names: "migrate",
        params: "",
        help: "show migration status",
        run: info_migrate,
    },
    HmpCommand {
        names: "name",
        params: "",
        help: "show the current VM name",
        run: info_name,
    },
    HmpCommand {
        names: "qom-tree",
        params: "[path]",
        help: "show QOM composition tree",
        run: info_qom_tree,
    },
    HmpCommand {
        names: "qtree",
        params: "",
        help: "show device tree",
        run: info_qtree,
    },
    HmpCommand {
        names: "registers",
        params: "[-a]",
        help: "show the cpu registers (-a: all CPUs)",
        run: info_registers,
    },
    HmpCommand {
        names: "status",
        params: "",
        help: "show the current VM status (running|paused)",
        run: info_status,
    },
    HmpCommand {
        names: "vnc",
        params: "",
        help: "show the vnc server status",
        run: |_, _, _, out| {
            crate::vnc::info_vnc(out);
            Ok(())
        },
    },
    HmpCommand {
        names: "version",
        params: "",
        help: "show the version of QEMU",
        run: info_version,
    },
    HmpCommand {
        names: "chardev",
        params: "",
        help: "show the character devices",
        run: info_chardev,
    },
    HmpCommand {
        names: "hotpluggable-cpus",
        params: "",
        help: "Show information about hotpluggable CPUs",
        run: info_hotpluggable_cpus,
    },
    HmpCommand {
        names: "lapic",
        params: "[apic-id]",
        help: "show local apic state (apic-id: local apic to read, default is which of current CPU)",
        run: info_lapic,
    },
    HmpCommand {
        names: "mem",
        params: "",
        help: "show the active virtual memory mappings",
        run: info_mem,
    },
    HmpCommand {
        names: "pic",
        params: "",
        help: "show PIC state",
        run: info_pic,
    },
    HmpCommand {
        names: "memory_size_summary",
        params: "",
        help: "show the amount of initially allocated and present hotpluggable (if enabled) memory in bytes.",
        run: info_memory_size_summary,
    },
    HmpCommand {
        names: "mice",
        params: "",
        help: "show which guest mouse is receiving events",
        run: info_mice,
    },
    HmpCommand {
        names: "migrate_capabilities",
        params: "",
        help: "show current migration capabilities",
        run: info_migrate_capabilities,
    },
    HmpCommand {
        names: "migrate_parameters",
        params: "",
        help: "show current migration parameters",
        run: info_migrate_parameters,
    },
    HmpCommand {
        names: "tlb",
        params: "",
        help: "show virtual to physical memory mappings",
        run: info_tlb,
    },
    HmpCommand {
        names: "uuid",
        params: "",
        help: "show the current VM UUID",
        run: info_uuid,
    },
];

/// QMP's `human-monitor-command` (a [`HumanMonitorFn`]): runs `line` in a monitor of its
/// own, on CPU `cpu_index` if given.
///
/// [`HumanMonitorFn`]: crate::monitor::qapi::HumanMonitorFn
pub fn human_monitor_command(
    ctx: &CommandCtx,
    cpu_index: Option<i64>,
    line: &str,
) -> Result<String, QmpError> {
    let mut hmp = HmpState::default();
    if let Some(index) = cpu_index {
        hmp.set_cpu(ctx, index).map_err(QmpError::BadInput)?;
    }
    Ok(hmp_execute(ctx, &mut hmp, line))
}

/// Runs one HMP command line and returns what it prints (QEMU's `handle_hmp_command`).
/// A `quit` is left in `ctx.deferred` for the caller to carry out after showing the output.
pub fn hmp_execute(ctx: &CommandCtx, hmp: &mut HmpState, line: &str) -> String {
    let mut words: Vec<&str> = line.split_whitespace().collect();
    let mut out = String::new();
    // A command's name ends at a '/' too (`xp/2wx addr`), as QEMU's parser reads it.
    if let Some(at) = words.first().and_then(|w| w.find('/')).filter(|&at| at > 0) {
        let first = words[0];
        words.splice(0..1, [&first[..at], &first[at..]]);
    }
    let Some((&name, args)) = words.split_first() else {
        return out;
    };
    match COMMANDS.iter().find(|c| c.matches(name)) {
        Some(cmd) => {
            if let Err(e) = (cmd.run)(ctx, hmp, args, &mut out) {
                let _ = writeln!(out, "Error: {e}");
            }
        }
        None => {
            let _ = writeln!(out, "unknown command: '{name}'");
        }
    }
    out
}

/// QEMU's `hmp_screendump`: `filename [-f format] [device [head]]`.
fn screendump(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    _: &mut String,
) -> Result<(), QmpError> {
    let mut format = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if *arg == "-f" {
            format = Some(*it.next().ok_or_else(|| missing("format"))?);
        } else {
            rest.push(*arg);
        }
    }
    let filename = rest.first().ok_or_else(|| missing("filename"))?;
    if let Some(f) = format.filter(|f| !crate::ui::IMAGE_FORMATS.contains(f)) {
        return Err(QmpError::InvalidEnumValue {
            name: "format".into(),
            value: f.to_string(),
        });
    }
    let head = match rest.get(2) {
        Some(h) => Some(
            h.parse::<i64>()
                .map_err(|_| QmpError::BadInput(format!("'{h}' is not a number")))?,
        ),
        None => None,
    };
    crate::ui::screendump(
        ctx.vm.machine_state(),
        filename,
        rest.get(1).copied(),
        head,
        format,
    )
    .map_err(|e| match e {
        crate::ui::ScreendumpError::DeviceNotFound(id) => QmpError::DeviceNotFound(id),
        other => QmpError::Failed(other.to_string()),
    })
}

/// QEMU's `help_cmd`: the commands sorted by name (`compare_mon_cmd`), each as
/// `NAME PARAMS -- HELP` (two spaces when it takes no parameters).
fn help_lines(prefix: &str, list: &[HmpCommand], only: Option<&str>, out: &mut String) {
    let mut sorted: Vec<&HmpCommand> = list
        .iter()
        .filter(|c| only.is_none_or(|n| c.matches(n)))
        .collect();
    sorted.sort_by(|a, b| a.names.cmp(b.names));
    for c in sorted {
        let _ = writeln!(out, "{prefix}{} {} -- {}", c.names, c.params, c.help);
    }
}

fn help(_: &CommandCtx, _: &mut HmpState, args: &[&str], out: &mut String) -> Result<(), QmpError> {
    match args {
        [] => help_lines("", COMMANDS, None, out),
        ["info", rest @ ..] => help_lines("info ", INFO_COMMANDS, rest.first().copied(), out),
        [name, ..] => {
            if COMMANDS.iter().any(|c| c.matches(name)) {
                help_lines("", COMMANDS, Some(name), out);
            } else {
                let _ = writeln!(out, "unknown command: '{name}'");
            }
        }
    }
    Ok(())
}

fn info(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let Some((&sub, rest)) = args.split_first() else {
        help_lines("info ", INFO_COMMANDS, None, out);
        return Ok(());
    };
    match INFO_COMMANDS.iter().find(|c| c.matches(sub)) {
        Some(cmd) => (cmd.run)(ctx, hmp, rest, out),
        None => {
            let _ = writeln!(out, "unknown command: 'info {sub}'");
            Ok(())
        }
    }
}

fn info_status(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let status = ctx.vm.machine_state().vm_state().status();
    let running = status_info(ctx)["running"].as_bool().unwrap_or(false);
    let _ = write!(
        out,
        "VM status: {}",
        if running { "running" } else { "paused" }
    );
    if !running && status != RunStatus::Paused {
        let _ = write!(out, " ({})", status.name());
    }
    out.push('\n');
    Ok(())
}

fn info_cpus(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    for cpu in cpu_infos(ctx) {
        let mark = if cpu.index == hmp.cpu_index { '*' } else { ' ' };
        let _ = writeln!(
            out,
            "{mark} CPU #{}: thread_id={}",
            cpu.index, cpu.thread_id
        );
    }
    Ok(())
}

/// QEMU's `print_block_info`: `ID (node): FILE (drv[, read-only])`, the device using a
/// backend (`info` is query-block's entry, absent for `-n`), a removable medium's tray,
/// then the details; a drive without a medium is `ID: [not inserted]`.
fn print_block_info(
    out: &mut String,
    info: Option<&serde_json::Value>,
    inserted: &serde_json::Value,
) {
    let node = inserted["node-name"].as_str().unwrap_or_default();
    match info.and_then(|i| i["device"].as_str()) {
        Some(id) if inserted.is_null() => {
            let _ = writeln!(out, "{id}: [not inserted]");
        }
        Some(id) => {
            let _ = write!(out, "{id} ({node})");
        }
        None => out.push_str(node),
    }
    if !inserted.is_null() {
        print_inserted_line(out, inserted);
    }
    if let Some(qdev) = info.and_then(|i| i["qdev"].as_str()) {
        let _ = writeln!(out, "    Attached to:      {qdev}");
    }
    if let Some(info) = info.filter(|i| i["removable"] == true) {
        let _ = writeln!(
            out,
            "    Removable device: {}locked, tray {}",
            if info["locked"] == true { "" } else { "not " },
            if info["tray_open"] == true {
                "open"
            } else {
                "closed"
            }
        );
    }
    if inserted.is_null() {
        return;
    }
    print_block_details(out, inserted);
}

/// The `: FILE (drv[, read-only])` of a drive with a medium.
fn print_inserted_line(out: &mut String, inserted: &serde_json::Value) {
    let _ = writeln!(
        out,
        ": {} ({}{})",
        inserted["file"].as_str().unwrap_or_default(),
        inserted["drv"].as_str().unwrap_or_default(),
        if inserted["ro"] == true {
            ", read-only"
        } else {
            ""
        }
    );
}

/// The cache mode, backing file and the rest of a medium's lines.
fn print_block_details(out: &mut String, inserted: &serde_json::Value) {
    let cache = &inserted["cache"];
    let _ = writeln!(
        out,
        "    Cache mode:       {}{}{}",
        if cache["writeback"] == true {
            "writeback"
        } else {
            "writethrough"
        },
        if cache["direct"] == true {
            ", direct"
        } else {
            ""
        },
        if cache["no-flush"] == true {
            ", ignore flushes"
        } else {
            ""
        }
    );
    if let Some(backing) = inserted["backing_file"].as_str() {
        let _ = writeln!(
            out,
            "    Backing file:     {backing} (chain depth: {})",
            inserted["backing_file_depth"]
        );
    }
    let detect_zeroes = inserted["detect_zeroes"].as_str().unwrap_or("off");
    if detect_zeroes != "off" {
        let _ = writeln!(out, "    Detect zeroes:    {detect_zeroes}");
    }
    let n = |key: &str| inserted[key].as_u64().unwrap_or(0);
    if ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"]
        .iter()
        .any(|k| n(k) != 0)
    {
        let _ = writeln!(
            out,
            "    I/O throttling:   bps={} bps_rd={} bps_wr={} bps_max={} bps_rd_max={} bps_wr_max={} iops={} iops_rd={} iops_wr={} iops_max={} iops_rd_max={} iops_wr_max={} iops_size={} group={}",
            n("bps"),
            n("bps_rd"),
            n("bps_wr"),
            n("bps_max"),
            n("bps_rd_max"),
            n("bps_wr_max"),
            n("iops"),
            n("iops_rd"),
            n("iops_wr"),
            n("iops_max"),
            n("iops_rd_max"),
            n("iops_wr_max"),
            n("iops_size"),
            inserted["group"].as_str().unwrap_or_default()
        );
    }
}

/// QEMU's `info block`: the named backends (or, with `-n`, every node), a blank line
/// before each entry but the list's first (also when a device is picked out of it).
fn info_block(
    _: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let nodes = args.contains(&"-n");
    let device = args.iter().find(|a| !a.starts_with('-')).copied();
    if nodes {
        // QEMU 7.2's hmp_info_block returns before the node list when a name is given:
        // `info block -n NAME` prints nothing.
        if device.is_some() {
            return Ok(());
        }
        for (i, node) in crate::monitor::info::named_block_nodes().iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            print_block_info(out, None, node);
        }
        return Ok(());
    }
    for (i, info) in crate::monitor::info::block_infos().iter().enumerate() {
        if device.is_none_or(|d| info["device"] == d) {
            if i > 0 {
                out.push('\n');
            }
            print_block_info(out, Some(info), &info["inserted"]);
        }
    }
    Ok(())
}

/// QEMU's `hmp_balloon`: the target in MiB.
fn balloon(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let text = args.first().copied().unwrap_or("");
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16),
        None => text.parse::<i64>(),
    };
    let Ok(mib) = parsed else {
        match text
            .chars()
            .find(|c| !c.is_ascii_alphanumeric() || c.is_ascii_alphabetic())
        {
            None => out.push_str("unexpected end of expression\n"),
            Some(c) => {
                let _ = writeln!(out, "invalid char '{c}' in expression");
            }
        }
        out.push_str("Try \"help balloon\" for more information\n");
        return Ok(());
    };
    let target = mib.checked_mul(1 << 20).unwrap_or(i64::MIN);
    ctx.vm
        .machine_state()
        .services()
        .balloon()
        .set_target(target)?;
    Ok(())
}

/// QEMU's `hmp_info_migrate`: the status and the RAM figures of `query-migrate`.
fn info_migrate(
    _: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let info = crate::migration::query();
    let Some(status) = info["status"].as_str() else {
        return Ok(());
    };
    let _ = writeln!(out, "Migration status: {status}");
    let ms = |key: &str| info[key].as_u64();
    if let Some(t) = ms("total-time") {
        let _ = writeln!(out, "total time: {t} ms");
    }
    if let Some(d) = ms("downtime") {
        let _ = writeln!(out, "downtime: {d} ms");
    }
    if let Some(s) = ms("setup-time") {
        let _ = writeln!(out, "setup: {s} ms");
    }
    let ram = &info["ram"];
    let kib = |key: &str| ram[key].as_u64().unwrap_or(0) >> 10;
    let _ = writeln!(out, "transferred ram: {} kbytes", kib("transferred"));
    let _ = writeln!(
        out,
        "throughput: {:.2} mbps",
        ram["mbps"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(out, "remaining ram: {} kbytes", kib("remaining"));
    let _ = writeln!(out, "total ram: {} kbytes", kib("total"));
    let _ = writeln!(
        out,
        "duplicate: {} pages",
        ram["duplicate"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(out, "normal: {} pages", ram["normal"].as_u64().unwrap_or(0));
    let _ = writeln!(out, "normal bytes: {} kbytes", kib("normal-bytes"));
    let _ = writeln!(
        out,
        "dirty sync count: {}",
        ram["dirty-sync-count"].as_u64().unwrap_or(0)
    );
    if let Some(e) = info["error-desc"].as_str() {
        let _ = writeln!(out, "error description: {e}");
    }
    Ok(())
}

/// QEMU's `hmp_info_balloon`.
fn info_balloon(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let actual = ctx.vm.machine_state().services().balloon().actual()?;
    let _ = writeln!(out, "balloon: actual={}", actual >> 20);
    Ok(())
}

/// QEMU's `hmp_info_iothreads`.
fn info_iothreads(
    _: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    for info in crate::monitor::info::iothread_infos() {
        let _ = writeln!(out, "{}:", info["id"].as_str().unwrap_or_default());
        let _ = writeln!(out, "  thread_id={}", info["thread-id"]);
        for key in ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"] {
            let _ = writeln!(out, "  {key}={}", info[key]);
        }
    }
    Ok(())
}

/// QEMU's `hmp_object_add`: the argument is `-object`'s.
fn object_add(
    _: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let text = args.join(" ");
    match crate::objects::parse_str(&text).map_err(QmpError::BadInput)? {
        crate::objects::ObjectRequest::Help(listing) => out.push_str(&listing),
        crate::objects::ObjectRequest::Add(opts) => {
            crate::objects::object_add(&opts)?;
        }
    }
    Ok(())
}

/// QEMU's `hmp_object_del`.
fn object_del(
    _: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    _: &mut String,
) -> Result<(), QmpError> {
    let id = args.first().ok_or_else(|| missing("id"))?;
    qom::user_creatable_del(id)?;
    Ok(())
}

/// QEMU's `hmp_info_blockstats`: one line per backend.
fn info_blockstats(
    _: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    for entry in crate::monitor::info::block_stats(false) {
        let s = &entry["stats"];
        let _ = write!(out, "{}:", entry["device"].as_str().unwrap_or_default());
        for key in [
            "rd_bytes",
            "wr_bytes",
            "rd_operations",
            "wr_operations",
            "flush_operations",
            "wr_total_time_ns",
            "rd_total_time_ns",
            "flush_total_time_ns",
            "rd_merged",
            "wr_merged",
        ] {
            let _ = write!(out, " {key}={}", s[key].as_u64().unwrap_or(0));
        }
        let _ = writeln!(
            out,
            " idle_time_ns={}",
            s["idle_time_ns"].as_u64().unwrap_or(0)
        );
    }
    Ok(())
}

fn info_kvm(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let (enabled, present) = kvm_info(ctx);
    let state = match (present, enabled) {
        (false, _) => "not compiled",
        (true, true) => "enabled",
        (true, false) => "disabled",
    };
    let _ = writeln!(out, "kvm support: {state}");
    Ok(())
}

fn info_name(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    if let Some(name) = &ctx.vm.name {
        let _ = writeln!(out, "{name}");
    }
    Ok(())
}

fn info_version(
    _: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let _ = writeln!(out, "{} (qomvm)", env!("CARGO_PKG_VERSION"));
    Ok(())
}

fn info_registers(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let ms = ctx.vm.machine_state();
    let cpus: Vec<u32> = ms
        .cpus()
        .iter()
        .filter_map(|c| c.downcast::<CpuState>().map(CpuState::index))
        .collect();
    if cpus.is_empty() {
        out.push_str("No CPU available\n");
        return Ok(());
    }
    let Some(ops) = ms.accel_ops() else {
        out.push_str("No CPU available\n");
        return Ok(());
    };
    let all = args.contains(&"-a");
    let selected: Vec<u32> = if all { cpus } else { vec![hmp.cpu_index] };
    for index in selected {
        if all {
            let _ = writeln!(out, "\nCPU#{index}");
        }
        match ops.cpu_dump_state(index) {
            Ok(dump) => out.push_str(&dump),
            Err(e) => {
                let _ = writeln!(out, "Error: {e}");
            }
        }
    }
    Ok(())
}

/// Runs the QMP command `name` without arguments: the HMP `info` commands print what it
/// returns, as QEMU's call their `qmp_query_*`.
fn query(ctx: &CommandCtx, name: &str) -> Result<serde_json::Value, QmpError> {
    call_qmp(ctx, name, &serde_json::Map::new())
}

/// Runs the QMP command `name` with `args`.
fn call_qmp(
    ctx: &CommandCtx,
    name: &str,
    args: &serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Value, QmpError> {
    let cmd = qmp_cmds::COMMANDS
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| QmpError::CommandNotFound(name.to_string()))?;
    (cmd.run)(ctx, args)
}

/// QEMU's `hmp_info_chardev`: `LABEL: filename=FILENAME` per chardev.
fn info_chardev(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    for c in query(ctx, "query-chardev")?
        .as_array()
        .into_iter()
        .flatten()
    {
        let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        let _ = writeln!(out, "{}: filename={}", text("label"), text("filename"));
    }
    Ok(())
}

/// QEMU's `hmp_info_uuid`.
fn info_uuid(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let uuid = query(ctx, "query-uuid")?;
    let _ = writeln!(out, "{}", uuid["UUID"].as_str().unwrap_or_default());
    Ok(())
}

/// QEMU's `hmp_info_migrate_capabilities`: `NAME: on|off` per capability.
fn info_migrate_capabilities(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    for c in query(ctx, "query-migrate-capabilities")?
        .as_array()
        .into_iter()
        .flatten()
    {
        let on = if c["state"] == true { "on" } else { "off" };
        let _ = writeln!(
            out,
            "{}: {on}",
            c["capability"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// How `info migrate_parameters` shows a parameter.
enum ParamFormat {
    /// A number, then a unit (` ms`, ` bytes`...) or nothing.
    Number(&'static str),
    /// `on` or `off`.
    Bool,
    /// A string in single quotes.
    Quoted,
    /// An enum's name as it is.
    Name,
}

/// QEMU's `hmp_info_migrate_parameters`' order and formats.
const MIGRATE_PARAMETERS: &[(&str, ParamFormat)] = &[
    ("announce-initial", ParamFormat::Number(" ms")),
    ("announce-max", ParamFormat::Number(" ms")),
    ("announce-rounds", ParamFormat::Number("")),
    ("announce-step", ParamFormat::Number(" ms")),
    ("compress-level", ParamFormat::Number("")),
    ("compress-threads", ParamFormat::Number("")),
    ("compress-wait-thread", ParamFormat::Bool),
    ("decompress-threads", ParamFormat::Number("")),
    ("throttle-trigger-threshold", ParamFormat::Number("")),
    ("cpu-throttle-initial", ParamFormat::Number("")),
    ("cpu-throttle-increment", ParamFormat::Number("")),
    ("cpu-throttle-tailslow", ParamFormat::Bool),
    ("max-cpu-throttle", ParamFormat::Number("")),
    ("tls-creds", ParamFormat::Quoted),
    ("tls-hostname", ParamFormat::Quoted),
    ("max-bandwidth", ParamFormat::Number(" bytes/second")),
    ("downtime-limit", ParamFormat::Number(" ms")),
    ("x-checkpoint-delay", ParamFormat::Number(" ms")),
    ("block-incremental", ParamFormat::Bool),
    ("multifd-channels", ParamFormat::Number("")),
    ("multifd-compression", ParamFormat::Name),
    ("xbzrle-cache-size", ParamFormat::Number(" bytes")),
    ("max-postcopy-bandwidth", ParamFormat::Number("")),
    ("tls-authz", ParamFormat::Quoted),
];

/// QEMU's `hmp_info_migrate_parameters`: the parameters `query-migrate-parameters`
/// returns, in QEMU's order and formats (QEMU has them all; qomvm keeps fewer, and
/// shows those).
fn info_migrate_parameters(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let params = query(ctx, "query-migrate-parameters")?;
    for (name, format) in MIGRATE_PARAMETERS {
        let v = &params[*name];
        if v.is_null() {
            continue;
        }
        let _ = match format {
            ParamFormat::Number(unit) => writeln!(out, "{name}: {v}{unit}"),
            ParamFormat::Bool => writeln!(out, "{name}: {}", if *v == true { "on" } else { "off" }),
            ParamFormat::Quoted => writeln!(out, "{name}: '{}'", v.as_str().unwrap_or_default()),
            ParamFormat::Name => writeln!(out, "{name}: {}", v.as_str().unwrap_or_default()),
        };
    }
    Ok(())
}

/// QEMU's `hmp_hotpluggable_cpus`: each slot's type, vCPU count, QOM path (if plugged)
/// and instance properties; the error of a machine that cannot hot-plug CPUs.
fn info_hotpluggable_cpus(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let slots = query(ctx, "query-hotpluggable-cpus")?;
    out.push_str("Hotpluggable CPUs:\n");
    for slot in slots.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  type: \"{}\"",
            slot["type"].as_str().unwrap_or_default()
        );
        let _ = writeln!(out, "  vcpus_count: \"{}\"", slot["vcpus-count"]);
        if let Some(path) = slot["qom-path"].as_str() {
            let _ = writeln!(out, "  qom_path: \"{path}\"");
        }
        out.push_str("  CPUInstance Properties:\n");
        for prop in [
            "node-id",
            "socket-id",
            "die-id",
            "cluster-id",
            "core-id",
            "thread-id",
        ] {
            let v = &slot["props"][prop];
            if !v.is_null() {
                let _ = writeln!(out, "    {prop}: \"{v}\"");
            }
        }
    }
    Ok(())
}

/// QEMU's `hmp_info_memory_size_summary`.
fn info_memory_size_summary(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let info = query(ctx, "query-memory-size-summary")?;
    let _ = writeln!(out, "base memory: {}", info["base-memory"]);
    if !info["plugged-memory"].is_null() {
        let _ = writeln!(out, "plugged memory: {}", info["plugged-memory"]);
    }
    Ok(())
}

/// QEMU's `hmp_info_mice`: `* Mouse #N: NAME` for the mouse that gets the events,
/// `  Mouse #N: NAME` for the others, ` (absolute)` after a tablet.
fn info_mice(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let mice = query(ctx, "query-mice")?;
    let mice = mice.as_array().cloned().unwrap_or_default();
    if mice.is_empty() {
        out.push_str("No mouse devices connected\n");
    }
    for m in mice {
        let _ = writeln!(
            out,
            "{} Mouse #{}: {}{}",
            if m["current"] == true { '*' } else { ' ' },
            m["index"],
            m["name"].as_str().unwrap_or_default(),
            if m["absolute"] == true {
                " (absolute)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// The current CPU's paging registers and a reader of guest-physical memory for
/// `info tlb` and `info mem` (QEMU's `mon_get_cpu_env`); `None` once the reason it cannot
/// is printed.
fn page_walk(
    ctx: &CommandCtx,
    hmp: &HmpState,
    out: &mut String,
    walk: fn(&hw::core::accel_ops::PagingRegisters, crate::monitor::x86_paging::ReadPhys) -> String,
) {
    let ms = ctx.vm.machine_state();
    let Some(ops) = ms.accel_ops().filter(|_| !ms.cpus().is_empty()) else {
        out.push_str("No CPU available\n");
        return;
    };
    let regs = match ops.paging_registers(hmp.cpu_index) {
        Ok(regs) => regs,
        Err(e) => {
            let _ = writeln!(out, "Error: {e}");
            return;
        }
    };
    let read = crate::monitor::x86_paging::debug_reader(ms.services());
    out.push_str(&walk(&regs, &read));
}

/// QEMU's `hmp_info_local_apic`: the local APIC of the CPU whose APIC ID is given (QEMU's
/// `cpu_by_arch_id`), else of the current CPU.
fn info_lapic(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let ms = ctx.vm.machine_state();
    let index = if args.is_empty() {
        cpu_infos(ctx)
            .iter()
            .any(|c| c.index == hmp.cpu_index)
            .then_some(hmp.cpu_index)
    } else {
        let apic_id = int_arg(args, "apic-id")?;
        ms.cpus().iter().find_map(|c| {
            let cpu = c.downcast::<hw::i386::x86_cpu::X86Cpu>()?;
            let index = c.downcast::<CpuState>()?.index();
            (u64::from(cpu.apic_id()) == apic_id).then_some(index)
        })
    };
    let (Some(index), Some(ops)) = (index, ms.accel_ops()) else {
        out.push_str("No CPU available\n");
        return Ok(());
    };
    match ops.local_apic_state(index) {
        Ok(apic) => out.push_str(&crate::monitor::x86_intc::lapic_dump(index, &apic)),
        // What QEMU says of a CPU without local APIC state.
        Err(hw::core::accel_ops::CpuDumpError::NoRegisters(_)) => {
            out.push_str("local apic state not available\n");
        }
        Err(e) => {
            let _ = writeln!(out, "Error: {e}");
        }
    }
    Ok(())
}

/// QEMU's `hmp_info_pic`: every interrupt controller's state. qomvm's are the
/// accelerator's (KVM's in-kernel i8259 pair and IOAPIC, as QEMU's kvm-i8259 and
/// kvm-ioapic); a machine without them (`-M none`) prints nothing, as QEMU's does.
fn info_pic(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let ms = ctx.vm.machine_state();
    let Some(ops) = ms.accel_ops().filter(|_| !ms.cpus().is_empty()) else {
        return Ok(());
    };
    match ops.irqchip_state() {
        Ok(Some(state)) => out.push_str(&crate::monitor::x86_intc::pic_dump(&state)),
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(out, "Interrupt controller information not available: {e}.");
        }
    }
    Ok(())
}

/// QEMU's `hmp_info_tlb` (x86): every page the current CPU maps.
fn info_tlb(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    page_walk(ctx, hmp, out, crate::monitor::x86_paging::info_tlb);
    Ok(())
}

/// QEMU's `hmp_info_mem` (x86): the current CPU's mapped ranges and their protection.
fn info_mem(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    page_walk(ctx, hmp, out, crate::monitor::x86_paging::info_mem);
    Ok(())
}

/// QEMU's `info qom-tree`: `/name (type)`, children sorted by name, two spaces per level.
pub fn qom_tree(obj: &Object, indent: usize, out: &mut String) {
    let name = obj
        .name_in_parent()
        .map(|n| n.to_string())
        .unwrap_or_default();
    let _ = writeln!(out, "{:indent$}/{name} ({})", "", obj.type_name());
    let mut children = obj.children();
    children.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, child) in children {
        qom_tree(&child, indent + 2, out);
    }
}

fn info_qom_tree(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let obj = match args.first() {
        Some(path) => match resolve_path(&object_get_root(), path) {
            Ok(o) => o,
            Err(qom::Error::AmbiguousPath(_)) => {
                let _ = writeln!(out, "Warning: Path '{path}' is ambiguous.");
                return Ok(());
            }
            Err(_) => {
                let _ = writeln!(out, "Path '{path}' could not be resolved.");
                return Ok(());
            }
        },
        None => ctx.vm.machine.clone(),
    };
    qom_tree(&obj, 0, out);
    Ok(())
}

/// A size as QEMU's `size_to_str` prints it (`2 GiB`, `512 MiB`, `1.5 KiB`).
fn size_to_str(v: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = v as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {}", UNITS[unit])
}

/// A property value as `info qtree` prints it (QEMU's human string output).
fn human_value(kind: PropertyKind, v: &QomValue) -> String {
    match (kind, v) {
        (PropertyKind::Size, QomValue::Uint(u)) => format!("{u} ({})", size_to_str(*u)),
        (_, QomValue::Uint(u)) => format!("{u} (0x{u:x})"),
        (_, QomValue::Int(i)) => format!("{i} (0x{i:x})"),
        (_, QomValue::Bool(b)) => b.to_string(),
        (_, QomValue::Str(s)) => format!("\"{s}\""),
        (_, QomValue::Link(l)) => format!(
            "\"{}\"",
            l.as_ref()
                .and_then(|o| o.canonical_path())
                .unwrap_or_default()
        ),
    }
}

fn qtree_device(dev: &ObjectRef, indent: usize, out: &mut String) {
    let id = dev.device_id().unwrap_or_default();
    let _ = writeln!(out, "{:indent$}dev: {}, id \"{id}\"", "", dev.type_name());
    // The device's settable properties, as `-device DRIVER,help` lists them.
    const INTERNAL: &[&str] = &["type", "realized", "hotpluggable", "parent_bus"];
    for prop in dev.class().properties() {
        if INTERNAL.contains(&prop.name.as_ref())
            || !prop.is_settable()
            || matches!(prop.kind, PropertyKind::Child(_))
        {
            continue;
        }
        let Ok(value) = dev.property_get(&prop.name) else {
            continue;
        };
        let _ = writeln!(
            out,
            "{:w$}{} = {}",
            "",
            prop.name,
            human_value(prop.kind, &value),
            w = indent + 2
        );
    }
    for (_, child) in dev.children() {
        if child.is_a(TYPE_BUS) {
            qtree_bus(&child, indent + 2, out);
        }
    }
}

fn qtree_bus(bus: &ObjectRef, indent: usize, out: &mut String) {
    let name = bus
        .name_in_parent()
        .map(|n| n.to_string())
        .unwrap_or_default();
    let _ = writeln!(out, "{:indent$}bus: {name}", "");
    let _ = writeln!(out, "{:w$}type {}", "", bus.type_name(), w = indent + 2);
    for dev in bus_children(bus) {
        qtree_device(&dev, indent + 2, out);
    }
}

/// Realized devices on no bus (QEMU's sysbus devices), in tree order; CPUs are not on
/// the system bus in QEMU either.
fn busless_devices(obj: &ObjectRef, found: &mut Vec<ObjectRef>) {
    for (_, child) in obj.children() {
        if child.is_a(TYPE_DEVICE)
            && !child.is_a(TYPE_CPU)
            && child.is_realized()
            && child.parent_bus().is_none()
        {
            found.push(child.clone());
        }
        busless_devices(&child, found);
    }
}

/// QEMU's `info qtree`: the system bus, its devices with their properties, their buses.
pub fn qtree(machine: &ObjectRef, out: &mut String) {
    out.push_str("bus: main-system-bus\n  type System\n");
    let mut devices = Vec::new();
    busless_devices(machine, &mut devices);
    for dev in devices {
        qtree_device(&dev, 4, out);
    }
}

fn info_qtree(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    qtree(&ctx.vm.machine, out);
    Ok(())
}

/// QEMU's `info mtree`: each address space's root region and the regions mapped in it.
pub fn mtree(vm: &VmContext, out: &mut String) {
    let ms = vm.machine_state();
    let line = |out: &mut String, indent: usize, start: u64, last: u64, kind: &str, name: &str| {
        let _ = writeln!(
            out,
            "{:indent$}{start:016x}-{last:016x} (prio 0, {kind}): {name}",
            ""
        );
    };
    // (start, last, kind, name) of what is mapped, by address.
    let mut memory: Vec<(u64, u64, &str, String)> = ms
        .ram()
        .iter()
        .map(|r| {
            let start = r.start_addr().0;
            (start, start + (r.len() - 1), "ram", "ram".to_string())
        })
        .collect();
    for r in ms.system_memory().flat_view().ranges() {
        memory.push((r.start(), r.last(), "i/o", r.region().name().to_string()));
    }
    memory.sort_by_key(|m| m.0);
    out.push_str("address-space: memory\n");
    line(out, 2, 0, u64::MAX, "i/o", "system");
    for (start, last, kind, name) in &memory {
        line(out, 4, *start, *last, kind, name);
    }
    out.push_str("\naddress-space: I/O\n");
    line(out, 2, 0, 0xffff, "i/o", "io");
    for r in ms.system_io().flat_view().ranges() {
        line(out, 4, r.start(), r.last(), "i/o", r.region().name());
    }
    out.push('\n');
}

fn info_mtree(
    ctx: &CommandCtx,
    _: &mut HmpState,
    _: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    mtree(ctx.vm, out);
    Ok(())
}

fn qom_list(
    _: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let Some(path) = args.first() else {
        out.push_str("/\n");
        return Ok(());
    };
    for p in resolve(path)?.properties() {
        let _ = writeln!(out, "{} ({})", p.name, p.kind.type_name());
    }
    Ok(())
}

/// Splits `-d DISPLAY` out of an HMP command's words (QEMU's `display:-dV`).
fn display_flag<'a>(args: &[&'a str]) -> Result<(Option<&'a str>, Vec<&'a str>), QmpError> {
    let mut display = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if *arg == "-d" {
            display = Some(*it.next().ok_or_else(|| missing("display"))?);
        } else {
            rest.push(*arg);
        }
    }
    Ok((display, rest))
}

/// QEMU's `qapi_enum_parse` for an HMP word.
fn hmp_enum(value: &str, values: &[&str]) -> Result<(), QmpError> {
    if values.contains(&value) {
        Ok(())
    } else {
        Err(QmpError::Failed(format!("Invalid parameter '{value}'")))
    }
}

/// QEMU's `hmp_set_password`: `set_password vnc PASSWORD [-d DISPLAY] [keep|fail|disconnect]`.
fn set_password(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let (display, rest) = display_flag(args)?;
    let protocol = *rest.first().ok_or_else(|| missing("protocol"))?;
    let password = *rest.get(1).ok_or_else(|| missing("password"))?;
    let mut qmp_args = serde_json::Map::new();
    if let Some(connected) = rest.get(2) {
        hmp_enum(connected, qmp_cmds::SET_PASSWORD_ACTION.values)?;
        qmp_args.insert("connected".into(), (*connected).into());
    }
    hmp_enum(protocol, qmp_cmds::DISPLAY_PROTOCOL.values)?;
    qmp_args.insert("protocol".into(), protocol.into());
    qmp_args.insert("password".into(), password.into());
    if let Some(d) = display {
        qmp_args.insert("display".into(), d.into());
    }
    // QEMU's vnc_display_password prints a hint on a human monitor before the error.
    if protocol == "vnc"
        && qmp_args.get("connected").is_none_or(|c| c == "keep")
        && crate::vnc::password_auth_enabled(display) == Some(false)
    {
        let _ = writeln!(out, "{}", crate::vnc::PASSWORD_HINT);
    }
    qmp_cmds::qmp_set_password(ctx, &qmp_args).map(drop)
}

/// QEMU's `hmp_expire_password`: `expire_password vnc TIME [-d DISPLAY]`.
fn expire_password(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    _: &mut String,
) -> Result<(), QmpError> {
    let (display, rest) = display_flag(args)?;
    let protocol = *rest.first().ok_or_else(|| missing("protocol"))?;
    let time = *rest.get(1).ok_or_else(|| missing("time"))?;
    hmp_enum(protocol, qmp_cmds::DISPLAY_PROTOCOL.values)?;
    let mut qmp_args = serde_json::Map::new();
    qmp_args.insert("protocol".into(), protocol.into());
    qmp_args.insert("time".into(), time.into());
    if let Some(d) = display {
        qmp_args.insert("display".into(), d.into());
    }
    qmp_cmds::qmp_expire_password(ctx, &qmp_args).map(drop)
}

/// The most `xp` prints at once: a monitor command must not hold the monitor for long.
const XP_MAX_BYTES: u64 = 1 << 20;

/// `xp`'s format and unit size when a command gives none: QEMU's `last_format` and
/// `last_size`, the process's (every monitor and `human-monitor-command` share them); 0
/// before the first, hexadecimal words.
static XP_LAST: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A `/FMT` argument: the count, the format and the unit (QEMU's monitor parser for
/// `xp`, `x`, `i` and `o`); what is left out is the last command's (the unit also `i`'s
/// and `o`'s port width).
struct DumpFormat {
    count: u64,
    format: u8,
    size: u8,
}

/// Splits `[/FMT] ADDR ...` into the format and what follows it.
fn dump_format<'a>(args: &'a [&'a str]) -> Result<(DumpFormat, &'a [&'a str]), QmpError> {
    let (fmt, rest) = match args {
        [fmt, rest @ ..] if fmt.starts_with('/') => (&fmt[1..], rest),
        _ => ("", args),
    };
    let digits = fmt.bytes().take_while(u8::is_ascii_digit).count();
    let count: u64 = if digits == 0 {
        1
    } else {
        fmt[..digits].parse().unwrap_or(u64::MAX)
    };
    let [mut format, mut size] = XP_LAST
        .load(std::sync::atomic::Ordering::Relaxed)
        .to_le_bytes();
    for c in fmt[digits..].bytes() {
        match c {
            b'x' | b'd' | b'u' | b'o' | b'c' => format = c,
            b'b' => size = 1,
            b'h' => size = 2,
            b'w' => size = 4,
            // `L` is the target's long, 64 bits on x86-64.
            b'g' | b'L' => size = 8,
            b'i' => {
                return Err(QmpError::Failed(
                    "format 'i' (disassembly) is not supported by qomvm".into(),
                ))
            }
            _ => {
                return Err(QmpError::Failed(format!(
                    "invalid char in format: '{}'",
                    c as char
                )))
            }
        }
    }
    if format == 0 {
        format = b'x';
    }
    if size == 0 {
        size = 4;
    }
    XP_LAST.store(
        u16::from_le_bytes([format, size]),
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok((
        DumpFormat {
            count,
            format,
            size,
        },
        rest,
    ))
}

/// `memsave`'s and `pmemsave`'s `addr size file` (QEMU's `val:l,size:i,filename:s`).
fn save_args<'a>(args: &[&'a str]) -> Result<(i64, i64, &'a str), QmpError> {
    let addr = int_arg(args, "val")? as i64;
    let size = int_arg(args.get(1..).unwrap_or_default(), "size")? as i64;
    let file = args.get(2).ok_or_else(|| missing("filename"))?;
    Ok((addr, size, file))
}

/// Runs QMP command `name` with `args` for an HMP command that prints nothing on success.
fn run_qmp(ctx: &CommandCtx, name: &str, args: serde_json::Value) -> Result<(), QmpError> {
    let serde_json::Value::Object(map) = args else {
        return Err(QmpError::Failed(format!("{name}: arguments are no object")));
    };
    call_qmp(ctx, name, &map).map(|_| ())
}

/// QEMU's `hmp_dump_guest_memory`: `file:FILENAME`, the flags as QMP's `paging`,
/// `detach` and `format`, and `begin length` as a pair.
fn dump_guest_memory(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    _: &mut String,
) -> Result<(), QmpError> {
    let flags: Vec<&str> = args
        .iter()
        .copied()
        .take_while(|a| a.starts_with('-'))
        .collect();
    let rest = &args[flags.len()..];
    let formats: Vec<&str> = flags
        .iter()
        .filter_map(|f| match *f {
            "-z" => Some("kdump-zlib"),
            "-l" => Some("kdump-lzo"),
            "-s" => Some("kdump-snappy"),
            "-w" => Some("win-dmp"),
            _ => None,
        })
        .collect();
    if formats.len() > 1 {
        return Err(QmpError::Failed(
            "only one of '-z|-l|-s|-w' can be set".into(),
        ));
    }
    if let Some(bad) = flags
        .iter()
        .find(|f| !matches!(**f, "-p" | "-d" | "-z" | "-l" | "-s" | "-w"))
    {
        return Err(QmpError::Failed(format!("invalid option '{bad}'")));
    }
    let file = rest.first().ok_or_else(|| missing("filename"))?;
    let begin = match rest.get(1) {
        Some(_) => Some(int_arg(&rest[1..], "begin")?),
        None => None,
    };
    let length = match rest.get(2) {
        Some(_) => Some(int_arg(&rest[2..], "length")?),
        None => None,
    };
    let protocol = format!("file:{file}");
    let request = crate::dump::DumpRequest {
        protocol: &protocol,
        paging: flags.contains(&"-p"),
        begin,
        length,
        detach: flags.contains(&"-d"),
        format: Some(formats.first().copied().unwrap_or("elf")),
    };
    crate::dump::dump_guest_memory(&ctx.vm.machine, &request, &crate::monitor::fds::take)
        .map_err(|e| QmpError::Failed(e.to_string()))
}

/// An HMP integer argument (QEMU's `addr:i`/`addr:l`: decimal, `0x` hex or `0` octal).
fn int_arg(args: &[&str], name: &str) -> Result<u64, QmpError> {
    let text = args.first().ok_or_else(|| missing(name))?;
    crate::options::strtou64(text)
        .ok_or_else(|| QmpError::Failed(format!("invalid {name}: '{text}'")))
}

/// `xp /FMT ADDR`: guest-physical memory ([`memory_dump`]).
fn xp(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    memory_dump(ctx, hmp, args, out, false)
}

/// `x /FMT ADDR`: guest-virtual memory as the current CPU's paging maps it
/// ([`memory_dump`]).
fn x(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    memory_dump(ctx, hmp, args, out, true)
}

/// The monitor's current CPU's paging registers. QEMU's debug walks go over them (read on
/// the CPU's thread) and guest memory, not through the CPU's own translation: they ignore
/// reserved bits, as QEMU's do.
fn current_paging_registers(
    ctx: &CommandCtx,
    hmp: &HmpState,
) -> Result<hw::core::accel_ops::PagingRegisters, QmpError> {
    ctx.vm
        .machine_state()
        .accel_ops()
        .ok_or_else(|| QmpError::Failed("Can not dump without CPU".into()))?
        .paging_registers(hmp.cpu_index)
        .map_err(|e| QmpError::Failed(e.to_string()))
}

/// The guest-physical page of each virtual page from `addr` for `len` bytes, as the
/// monitor's current CPU maps them.
fn virtual_pages(
    ctx: &CommandCtx,
    hmp: &HmpState,
    addr: u64,
    len: u64,
) -> Result<Vec<(u64, Option<u64>)>, QmpError> {
    let ms = ctx.vm.machine_state();
    let first = addr & !PAGE_MASK;
    let count = ((addr & PAGE_MASK) + len).div_ceil(PAGE_MASK + 1);
    let regs = current_paging_registers(ctx, hmp)?;
    let read = crate::monitor::x86_paging::debug_reader(ms.services());
    Ok((0..count)
        .map(|i| {
            let page = first.wrapping_add(i * (PAGE_MASK + 1));
            (
                page,
                crate::monitor::x86_paging::translate_page(&regs, &read, page),
            )
        })
        .collect())
}

/// The offset bits of a 4 KiB page.
const PAGE_MASK: u64 = 0xfff;

/// QEMU's `memory_dump` for `xp` and `x`: FMT is a count, a format (`x` hex, `d` signed,
/// `u` unsigned, `o` octal, `c` characters) and a unit (`b`, `h`, `w`, `g`), in any
/// order after the count; what is left out is the last command's. A line that reaches
/// memory nothing maps (or, for `x`, a page the CPU does not map) ends the dump with
/// "Cannot access memory", as QEMU's does.
fn memory_dump(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    args: &[&str],
    out: &mut String,
    is_virtual: bool,
) -> Result<(), QmpError> {
    let (
        DumpFormat {
            count,
            format,
            size,
        },
        rest,
    ) = dump_format(args)?;
    let addr = int_arg(rest, "addr")?;
    // The length and the line width come from the unit, before `c` reads bytes: as QEMU's.
    let wanted = count.saturating_mul(u64::from(size));
    let mut len = wanted.min(XP_MAX_BYTES);
    let line_size = if size == 1 { 8 } else { 16 };
    let wsize = if format == b'c' { 1 } else { size };
    let bits = u32::from(wsize) * 8;
    let max_digits = match format {
        b'o' => bits.div_ceil(3),
        b'u' | b'd' => (bits * 10).div_ceil(33),
        _ => bits / 4,
    } as usize;
    let services = ctx.vm.machine_state().services();
    let regs = if is_virtual {
        Some(current_paging_registers(ctx, hmp)?)
    } else {
        None
    };
    let phys = crate::monitor::x86_paging::debug_reader(services);
    let assigned = |at: u64, len: u64| services.is_assigned(at, len);
    // Reads `buf.len()` bytes at `at` (virtual or physical), or says it cannot.
    let read = |at: u64, buf: &mut [u8]| -> bool {
        match &regs {
            Some(regs) => crate::monitor::x86_paging::read_virtual(regs, &phys, &assigned, at, buf),
            None if !assigned(at, buf.len() as u64) => false,
            None => {
                services.read_physical(at, buf);
                true
            }
        }
    };
    let mut at = addr;
    let mut buf = [0u8; 16];
    while len > 0 {
        let l = len.min(line_size) as usize;
        let _ = write!(out, "{at:016x}:");
        if !read(at, &mut buf[..l]) {
            out.push_str(" Cannot access memory\n");
            return Ok(());
        }
        for chunk in buf[..l].chunks(usize::from(wsize)) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            // QEMU loads the unit zero-extended: `d` differs from `u` only for 8-byte units.
            let v = u64::from_le_bytes(bytes);
            let _ = match format {
                // C's %#o: a leading 0 unless the value is 0.
                b'o' if v == 0 => write!(out, " {:>max_digits$}", 0),
                b'o' => write!(out, " {:>max_digits$}", format!("0{v:o}")),
                b'u' => write!(out, " {v:>max_digits$}"),
                b'd' => write!(out, " {:>max_digits$}", v as i64),
                // QEMU's monitor_printc.
                b'c' => match v as u8 {
                    b'\'' => write!(out, " '\\''"),
                    b'\\' => write!(out, " '\\\\'"),
                    b'\n' => write!(out, " '\\n'"),
                    b'\r' => write!(out, " '\\r'"),
                    c @ 0x20..=0x7e => write!(out, " '{}'", c as char),
                    c => write!(out, " '\\x{c:02x}'"),
                },
                _ => write!(out, " 0x{v:0max_digits$x}"),
            };
        }
        out.push('\n');
        at = at.wrapping_add(l as u64);
        len -= l as u64;
    }
    if wanted > XP_MAX_BYTES {
        let _ = writeln!(
            out,
            "(the first {XP_MAX_BYTES} bytes of {wanted}: qomvm prints at most that much at once)"
        );
    }
    Ok(())
}

/// QEMU's `hmp_gva2gpa`: where the current CPU maps a virtual address.
fn gva2gpa(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let addr = int_arg(args, "addr")?;
    let pages = virtual_pages(ctx, hmp, addr, 1)?;
    match pages.first().and_then(|(_, gpa)| *gpa) {
        Some(gpa) => {
            let _ = writeln!(out, "gpa: {:#x}", gpa + (addr & PAGE_MASK));
        }
        None => out.push_str("Unmapped\n"),
    }
    Ok(())
}

/// QEMU's `hmp_ioport_read`: `i /FMT PORT [INDEX]` reads a port of the FMT's unit (an
/// INDEX is written to PORT first and the data read from PORT + 1).
fn ioport_read(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let (DumpFormat { size, .. }, rest) = dump_format(args)?;
    let mut port = int_arg(rest, "addr")?;
    let io = ctx.vm.machine_state().system_io();
    if rest.len() > 1 {
        let index = int_arg(&rest[1..], "index")?;
        io.write(port & 0xffff, index & 0xff, 1);
        port += 1;
    }
    let port = port & 0xffff;
    let (suffix, width) = match size {
        2 => ('w', 2),
        4 | 8 => ('l', 4),
        _ => ('b', 1),
    };
    let value = io.read(port, width);
    let digits = width as usize * 2;
    let _ = writeln!(out, "port{suffix}[0x{port:04x}] = 0x{value:0digits$x}");
    Ok(())
}

/// QEMU's `hmp_ioport_write`: `o /FMT PORT VALUE` writes a port of the FMT's unit.
fn ioport_write(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    _: &mut String,
) -> Result<(), QmpError> {
    let (DumpFormat { size, .. }, rest) = dump_format(args)?;
    let port = int_arg(rest, "addr")? & 0xffff;
    let value = int_arg(rest.get(1..).unwrap_or_default(), "val")?;
    let width = match size {
        2 => 2,
        4 | 8 => 4,
        _ => 1,
    };
    ctx.vm.machine_state().system_io().write(port, value, width);
    Ok(())
}

/// QEMU's `cpu INDEX`: the CPU that `info registers`, `x` and `gva2gpa` use.
fn cpu(
    ctx: &CommandCtx,
    hmp: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let index = args.first().ok_or_else(|| missing("index"))?;
    match index.parse::<i64>() {
        Ok(index) if hmp.set_cpu(ctx, index).is_ok() => {}
        _ => out.push_str("invalid CPU index\n"),
    }
    Ok(())
}

fn missing(name: &str) -> QmpError {
    QmpError::MissingParameter(name.to_string())
}

fn qom_get(
    _: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    out: &mut String,
) -> Result<(), QmpError> {
    let path = args.first().ok_or_else(|| missing("path"))?;
    let property = args.get(1).ok_or_else(|| missing("property"))?;
    let value = resolve(path)?.property_get(property)?;
    let _ = writeln!(out, "{}", json::to_string(&value_to_json(&value)));
    Ok(())
}

fn qom_set(
    ctx: &CommandCtx,
    _: &mut HmpState,
    args: &[&str],
    _: &mut String,
) -> Result<(), QmpError> {
    let (as_json, args) = match args.split_first() {
        Some((&"-j", rest)) => (true, rest),
        _ => (false, args),
    };
    let path = args.first().ok_or_else(|| missing("path"))?;
    let property = args.get(1).ok_or_else(|| missing("property"))?;
    if args.len() < 3 {
        return Err(missing("value"));
    }
    let text = args[2..].join(" ");
    if as_json {
        let value = json::parse(text.as_bytes()).map_err(QmpError::BadInput)?;
        let mut qmp_args = serde_json::Map::new();
        qmp_args.insert("path".into(), (*path).into());
        qmp_args.insert("property".into(), (*property).into());
        qmp_args.insert("value".into(), value);
        let cmd = qmp_cmds::find_command("qom-set").expect("qom-set exists");
        (cmd.run)(ctx, &qmp_args)?;
    } else {
        resolve(path)?.property_parse(property, &text)?;
    }
    Ok(())
}

/// Longest command line a client may send; longer lines are refused whole.
const MAX_LINE: usize = 64 << 10;

/// Serves one HMP client (stdio or a socket) until it disconnects: banner, prompt, one
/// command per line.
pub fn run_session(vm: &Arc<VmContext>, conn: Connection) {
    let Connection {
        mut reader,
        writer,
        shutdown,
        ..
    } = conn;
    let outbox = Outbox::new(shutdown);
    spawn_writer("HMP", &outbox, writer);
    register_client(&outbox);
    let crlf = |s: &str| s.replace('\n', "\r\n");
    outbox.send(crlf(&format!(
        "qomvm {} monitor - type 'help' for more information\n(qemu) ",
        env!("CARGO_PKG_VERSION")
    )));
    let mut hmp = HmpState::default();
    let mut line: Vec<u8> = Vec::new();
    let mut too_long = false;
    let mut buf = vec![0u8; 4096];
    'read: loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for &b in &buf[..n] {
            if b != b'\n' {
                if line.len() < MAX_LINE {
                    line.push(b);
                } else {
                    too_long = true;
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            line.clear();
            wait_dispatch();
            let ctx = CommandCtx::new(vm);
            let output = if std::mem::take(&mut too_long) {
                format!("Error: command line longer than {MAX_LINE} bytes\n")
            } else {
                hmp_execute(&ctx, &mut hmp, &text)
            };
            let deferred = ctx.deferred.get();
            let prompt = if deferred == Some(Deferred::Quit) {
                ""
            } else {
                "(qemu) "
            };
            if !outbox.send(crlf(&format!("{output}{prompt}"))) {
                break 'read;
            }
            if let Some(action) = deferred {
                run_deferred(vm, action, &outbox);
            }
        }
    }
    outbox.flush(Duration::from_millis(100));
    outbox.close();
}
