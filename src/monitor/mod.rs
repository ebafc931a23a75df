//! The monitors (QEMU's `monitor/`): QMP, the JSON protocol for programs (`-qmp`), and HMP,
//! the human monitor (`-monitor`).
//!
//! The files depend on each other one way only, lowest first (a unit test below checks
//! that their imports form no cycle):
//!
//! * [`json`]: QMP's JSON framing and spelling;
//! * [`chardev`]: the sockets and stdio the monitors listen on, one thread per client;
//! * [`qapi`]: what commands run with and answer in: the VM, the command context, QMP
//!   errors, declared arguments and their checks;
//! * [`info`]: what both monitors report about the VM (status, KVM, CPUs, QOM values);
//! * [`client`]: what every client shares: its output queue, the event registry, the
//!   dispatch gate, deferred main-loop requests;
//! * [`schema`]: `query-qmp-schema`, generated from the command and event tables;
//! * [`qmp_cmds`]: the QMP commands;
//! * [`qmp`]: the QMP session (greeting, capabilities negotiation, dispatch);
//! * [`x86_paging`]: the page-table walks of HMP's `info tlb` and `info mem`;
//! * [`hmp`]: the HMP commands, callable from any front end ([`hmp::hmp_execute`]);
//! * this file: the set-up that wires them together. QMP's `human-monitor-command`
//!   reaches HMP through the [`qapi::HumanMonitorFn`] it installs in the [`qapi::VmContext`].
//!
//! Run-state changes (`stop`, `cont`, resets, power-down) go through
//! `hw::core::runstate`, which the main loop and tests use too; its events reach every
//! negotiated QMP client through [`client::broadcast_event`].

pub mod chardev;
pub mod client;
pub mod cpu_model;
pub mod fds;
pub mod hmp;
pub mod info;
pub mod json;
pub mod qapi;
pub mod qmp;
pub mod qmp_block;
pub mod qmp_char;
pub mod qmp_cmds;
pub mod qmp_device;
pub mod qmp_input;
pub mod qmp_pci;
pub mod schema;
pub mod x86_intc;
pub mod x86_paging;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hw::core::runstate::RunRequest;
use hw::core::runstate::VmEvent;
use parking_lot::Mutex;
use qom::ObjectRef;

use crate::options::{split_opts, OptionError, Options};
use client::{broadcast_event, flush_clients, open_dispatch, vm_event_message};
use qapi::{CommandCtx, Deferred, VmContext};

/// Unix socket paths to remove at exit.
static SOCKET_PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// QEMU's `-name`: `-name NAME` or `-name guest=NAME,...`.
fn guest_name(opts: &Options) -> Option<String> {
    let name = opts.name.as_ref()?;
    split_opts(&name.value, Some("guest"))
        .into_iter()
        .find(|(k, _)| k == "guest")
        .and_then(|(_, v)| v)
}

/// The VM as the commands of `opts`' monitors see it, `human-monitor-command` included.
fn vm_context(machine: &ObjectRef, opts: &Options) -> Arc<VmContext> {
    Arc::new(VmContext {
        machine: machine.clone(),
        name: guest_name(opts),
        // -uuid or -smbios type=1,uuid=, as vl resolved it.
        uuid: hw::core::machine::machine_state(machine)
            .and_then(|ms| ms.uuid())
            .unwrap_or_default(),
        human_monitor: hmp::human_monitor_command,
    })
}

/// A `-mon` option (QEMU's `monitor_parse_opts`): the chardev it serves and its mode.
struct MonOption {
    /// The `-chardev` id.
    chardev: String,
    /// `mode=control`: QMP; `readline` (the default): HMP.
    control: bool,
}

/// Errors of `-mon`.
#[derive(Debug, thiserror::Error)]
enum MonError {
    /// No `chardev=`.
    #[error("Parameter 'chardev' is missing")]
    MissingChardev,
    /// A `mode` other than `control` and `readline`.
    #[error("unknown monitor mode \"{0}\"")]
    UnknownMode(String),
    /// `pretty=on`: qomvm's QMP writes one message per line only.
    #[error("pretty=on is not supported by qomvm")]
    Pretty,
    /// An unknown key.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
}

fn parse_mon(text: &str) -> Result<MonOption, MonError> {
    let mut chardev = None;
    let mut control = false;
    for (key, value) in split_opts(text, Some("chardev")) {
        match (key.as_str(), value.as_deref()) {
            ("chardev", Some(v)) => chardev = Some(v.to_string()),
            ("mode", Some("control")) => control = true,
            ("mode", Some("readline")) => control = false,
            ("mode", v) => return Err(MonError::UnknownMode(v.unwrap_or_default().into())),
            ("pretty", Some("on" | "yes" | "true") | None) => return Err(MonError::Pretty),
            ("pretty", _) | ("id", _) => {}
            (k, _) => return Err(MonError::InvalidParameter(k.into())),
        }
    }
    Ok(MonOption {
        chardev: chardev.ok_or(MonError::MissingChardev)?,
        control,
    })
}

/// QEMU's monitor set-up in `qemu_create_late_backends`/`monitor_init_qmp`: opens every
/// `-qmp` and `-monitor` backend and starts serving. Run-state events go to the QMP
/// clients from here on.
pub fn monitor_init(machine: &ObjectRef, opts: &Options) -> Result<(), OptionError> {
    let vm = vm_context(machine, opts);
    vm.machine_state()
        .vm_state()
        .add_listener(Arc::new(|e: &VmEvent| {
            if *e == VmEvent::Resume {
                // The main loop started the vCPUs.
                open_dispatch();
            }
            broadcast_event(&vm_event_message(e))
        }));
    hw::core::qapi_event::set_sink(Box::new(|name, data| match throttle_key(name, &data) {
        Some(key) => throttled_event(name, key, data, send_event),
        None => send_event(name, data),
    }));
    // With -S, or waiting for a migration stream, the vCPUs do not start first.
    if opts.start_paused || opts.incoming.is_some() {
        open_dispatch();
    }
    let mut backends = Vec::new();
    // QEMU labels the chardevs of -qmp/-monitor shorthands compat_monitorN.
    for located in &opts.qmp {
        let backend = chardev::parse(&located.value).map_err(|e| located.error(e))?;
        let label = format!("compat_monitor{}", backends.len());
        backends.push((located, label, backend, true));
    }
    for located in &opts.monitor {
        let backend = chardev::parse(&located.value).map_err(|e| located.error(e))?;
        let label = format!("compat_monitor{}", backends.len());
        backends.push((located, label, backend, false));
    }
    for located in &opts.mon {
        let mon = parse_mon(&located.value).map_err(|e| located.error(e))?;
        let backend = opts
            .chardev
            .iter()
            .find(|c| {
                split_opts(&c.value, Some("backend"))
                    .into_iter()
                    .any(|(k, v)| k == "id" && v.as_deref() == Some(mon.chardev.as_str()))
            })
            .map(|c| {
                chardev::parse_chardev_socket(&c.value)
                    .map(|(_, b)| b)
                    .map_err(|e| c.error(e))
            })
            .transpose()?
            .ok_or_else(|| located.error(format!("chardev \"{}\" not found", mon.chardev)))?;
        backends.push((located, mon.chardev, backend, mon.control));
    }
    let stdio_users = backends
        .iter()
        .filter(|(_, _, b, _)| *b == chardev::Backend::Stdio)
        .count();
    if opts.daemonize && stdio_users > 0 {
        return Err(OptionError::new("", "cannot use stdio with -daemonize"));
    }
    if stdio_users > 1 {
        return Err(OptionError::new(
            "",
            "cannot use stdio by multiple character devices",
        ));
    }
    for (located, label, backend, is_qmp) in backends {
        chardev::register_monitor_chardev(&label, &backend);
        let session: chardev::Session = if is_qmp {
            let vm = vm.clone();
            Arc::new(move |conn| qmp::run_session(&vm, conn))
        } else {
            let vm = vm.clone();
            Arc::new(move |conn| hmp::run_session(&vm, conn))
        };
        let name = if is_qmp { "QMP" } else { "HMP" };
        let listening = qom::error_report::with_location(&located.location(), || {
            chardev::serve(name, &backend, session)
        })
        .map_err(|e| located.error(e))?;
        if let Some(path) = listening.unix_path {
            SOCKET_PATHS.lock().push(path);
        }
    }
    Ok(())
}

/// QEMU's `monitor_cleanup` at exit: gives every client up to a second to receive what is
/// queued for it (the `quit` reply, the `SHUTDOWN` event), then removes the sockets.
pub fn monitor_cleanup() {
    flush_clients(Duration::from_secs(1));
    for path in SOCKET_PATHS.lock().drain(..) {
        let _ = std::fs::remove_file(path);
    }
}

/// The human monitor the `-nographic` console switches to with Ctrl-A c (QEMU's mux'd
/// `mon:stdio`): runs one command line and returns what to print.
pub type ConsoleMonitor = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// An HMP for the serial console: same commands as `-monitor`, its own current CPU.
pub fn console_monitor(machine: &ObjectRef, opts: &Options) -> ConsoleMonitor {
    let vm = vm_context(machine, opts);
    let hmp = Mutex::new(hmp::HmpState::default());
    Arc::new(move |line: &str| {
        let ctx = CommandCtx::new(&vm);
        let output = hmp::hmp_execute(&ctx, &mut hmp.lock(), line);
        match ctx.deferred.get() {
            Some(Deferred::Quit) => vm.machine_state().run_state().request(RunRequest::HostQuit),
            Some(Deferred::Reset) => vm
                .machine_state()
                .run_state()
                .request(RunRequest::HostReset),
            None => {}
        }
        output
    })
}

/// QEMU's `monitor_qapi_event_conf`: events a guest can cause at any rate go out at most
/// once a second per key; within the second the latest one waits and goes at its end.
const THROTTLE_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The key an event is throttled by, if it is (`VSERPORT_CHANGE`: its port's id;
/// `BALLOON_CHANGE`, `WATCHDOG`: one for the machine).
fn throttle_key(name: &str, data: &Option<serde_json::Value>) -> Option<String> {
    match name {
        "BALLOON_CHANGE" | "WATCHDOG" | "RTC_CHANGE" => Some(String::new()),
        "VSERPORT_CHANGE" => Some(
            data.as_ref()
                .and_then(|d| d["id"].as_str())
                .unwrap_or_default()
                .to_string(),
        ),
        _ => None,
    }
}

#[derive(Default)]
struct ThrottleSlot {
    last: Option<std::time::Instant>,
    /// The event waiting for the period's end.
    pending: Option<Option<serde_json::Value>>,
}

static THROTTLED: parking_lot::Mutex<std::collections::BTreeMap<(String, String), ThrottleSlot>> =
    parking_lot::Mutex::new(std::collections::BTreeMap::new());

/// Sends a device's event to every QMP client.
fn send_event(name: &str, data: Option<serde_json::Value>) {
    broadcast_event(&client::event_message(name, data))
}

/// Sends event `name` (throttled by `key`) through `send` now, or at the end of its
/// period.
fn throttled_event(
    name: &str,
    key: String,
    data: Option<serde_json::Value>,
    send: fn(&str, Option<serde_json::Value>),
) {
    let now = std::time::Instant::now();
    let slot_key = (name.to_string(), key);
    let mut all = THROTTLED.lock();
    let slot = all.entry(slot_key.clone()).or_default();
    let due = slot
        .last
        .is_none_or(|last| now.duration_since(last) >= THROTTLE_PERIOD);
    if due && slot.pending.is_none() {
        slot.last = Some(now);
        drop(all);
        send(name, data);
        return;
    }
    let scheduled = slot.pending.is_some();
    slot.pending = Some(data);
    if scheduled {
        return;
    }
    let wait = slot.last.map_or(std::time::Duration::ZERO, |last| {
        THROTTLE_PERIOD.saturating_sub(now.duration_since(last))
    });
    drop(all);
    let spawned = std::thread::Builder::new()
        .name("event throttle".into())
        .spawn(move || {
            std::thread::sleep(wait);
            let data = {
                let mut all = THROTTLED.lock();
                let Some(slot) = all.get_mut(&slot_key) else {
                    return;
                };
                slot.last = Some(std::time::Instant::now());
                slot.pending.take()
            };
            if let Some(data) = data {
                send(&slot_key.0, data);
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot delay a {name} event: {e}");
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    static SENT: parking_lot::Mutex<Vec<serde_json::Value>> = parking_lot::Mutex::new(Vec::new());

    fn collect(_: &str, data: Option<serde_json::Value>) {
        SENT.lock().push(data.unwrap_or_default());
    }

    #[test]
    fn a_burst_sends_its_first_event_now_and_its_last_at_the_seconds_end() {
        let port = |id: &str, open: bool| Some(serde_json::json!({"id": id, "open": open}));
        for (id, open) in [("a", true), ("a", false), ("a", true), ("b", true)] {
            let data = port(id, open);
            let key = throttle_key("VSERPORT_CHANGE", &data).unwrap();
            throttled_event("TEST_THROTTLE", key, data, collect);
        }
        // Port a's first and port b's (another key) at once; a's last two wait.
        assert_eq!(
            *SENT.lock(),
            [port("a", true).unwrap(), port("b", true).unwrap()]
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while SENT.lock().len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the held event never went"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Only the latest of the held ones.
        assert_eq!(SENT.lock()[2..], [port("a", true).unwrap()]);
    }
}
