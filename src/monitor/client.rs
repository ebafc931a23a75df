//! What every monitor client shares, whichever protocol it speaks (QEMU's
//! `monitor/monitor.c`): its output queue and writer thread, the registry of clients that
//! events go to, the gate that holds commands until start-up has run, and the deferred
//! main-loop requests carried out once a reply is on its way.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hw::core::runstate::RunRequest;
use hw::core::runstate::VmEvent;
use parking_lot::{Condvar, Mutex};
use serde_json::{json, Map, Value};

use crate::monitor::json;
use crate::monitor::qapi::{Deferred, VmContext};

/// Most bytes of replies and events queued for one client; a client that lets more pile
/// up (it stopped reading) is disconnected, so it cannot hold memory or the VM.
pub const MAX_QUEUED: usize = 16 << 20;

/// Performs a deferred action; `outbox` is the client's, flushed first for `quit`.
pub fn run_deferred(vm: &VmContext, action: Deferred, outbox: &Outbox) {
    let request = match action {
        Deferred::Quit => {
            outbox.flush(Duration::from_secs(1));
            RunRequest::HostQuit
        }
        Deferred::Reset => RunRequest::HostReset,
    };
    vm.machine_state().run_state().request(request);
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<String>,
    bytes: usize,
    closed: bool,
    /// Negotiated QMP clients get events.
    events: bool,
}

/// One client's outgoing text, written by a thread of its own, so that whoever sends
/// (a command's reply, an event from the main loop) never blocks on the client's socket.
pub struct Outbox {
    state: Mutex<OutboxState>,
    changed: Condvar,
    shutdown: Arc<dyn Fn() + Send + Sync>,
}

impl Outbox {
    /// An outbox whose `shutdown` ends the client's connection.
    pub fn new(shutdown: Arc<dyn Fn() + Send + Sync>) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState::default()),
            changed: Condvar::new(),
            shutdown,
        })
    }

    /// Queues `text`; `false` if the client is gone. A client with more than
    /// [`MAX_QUEUED`] bytes waiting is disconnected.
    pub fn send(&self, text: String) -> bool {
        self.send_then(text, false)
    }

    /// Queues `text`, and with `enable_events` lets events follow it: atomically, so that
    /// no event overtakes the `qmp_capabilities` reply and none emitted after the client
    /// saw that reply is missed.
    pub fn send_then(&self, text: String, enable_events: bool) -> bool {
        let mut st = self.state.lock();
        st.events |= enable_events;
        if st.closed {
            return false;
        }
        if st.bytes + text.len() > MAX_QUEUED {
            drop(st);
            log::warn!("monitor: a client stopped reading its replies; disconnecting it");
            self.close();
            return false;
        }
        st.bytes += text.len();
        st.queue.push_back(text);
        self.changed.notify_all();
        true
    }

    /// Ends the connection: the writer stops, the reader's next read fails.
    pub fn close(&self) {
        {
            let mut st = self.state.lock();
            st.closed = true;
            st.queue.clear();
            st.bytes = 0;
            self.changed.notify_all();
        }
        (self.shutdown)();
    }

    fn wants_events(&self) -> bool {
        let st = self.state.lock();
        st.events && !st.closed
    }

    /// Waits until everything queued is written, the client is gone, or `timeout` passed.
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while !st.closed && st.bytes > 0 {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return;
            }
        }
    }

    /// The writer thread's loop: writes what is queued until the outbox is closed or a
    /// write fails. A text is dequeued (and counted as written) only once written.
    pub fn run_writer(&self, mut writer: Box<dyn Write + Send>) {
        loop {
            let text = {
                let mut st = self.state.lock();
                loop {
                    if st.closed {
                        return;
                    }
                    if let Some(t) = st.queue.front() {
                        break t.clone();
                    }
                    self.changed.wait(&mut st);
                }
            };
            let ok = writer
                .write_all(text.as_bytes())
                .and_then(|()| writer.flush())
                .is_ok();
            let mut st = self.state.lock();
            if !ok {
                st.closed = true;
                st.queue.clear();
                st.bytes = 0;
                self.changed.notify_all();
                drop(st);
                (self.shutdown)();
                return;
            }
            if !st.closed {
                st.queue.pop_front();
                st.bytes -= text.len();
            }
            self.changed.notify_all();
        }
    }
}

/// Starts the writer thread of `outbox`.
pub fn spawn_writer(name: &str, outbox: &Arc<Outbox>, writer: Box<dyn Write + Send>) {
    let ob = outbox.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("{name} writer"))
        .spawn(move || ob.run_writer(writer));
    if spawned.is_err() {
        outbox.close();
    }
}

/// Whether commands may run: QEMU dispatches monitor commands from its main loop, so
/// none runs before start-up has started the vCPUs (or left them stopped for `-S`). A
/// client that connects early gets its greeting, and its first command waits here.
static DISPATCH_OPEN: Mutex<bool> = Mutex::new(false);
static DISPATCH_OPENED: Condvar = Condvar::new();

/// Lets commands run: the vCPUs started, or start-up left them stopped for `-S`.
pub fn open_dispatch() {
    *DISPATCH_OPEN.lock() = true;
    DISPATCH_OPENED.notify_all();
}

/// Waits until commands may run.
pub fn wait_dispatch() {
    let mut open = DISPATCH_OPEN.lock();
    while !*open {
        DISPATCH_OPENED.wait(&mut open);
    }
}

/// Every QMP client, for events and for the flush at exit.
static CLIENTS: Mutex<Vec<Weak<Outbox>>> = Mutex::new(Vec::new());
/// Unix socket paths to remove at exit.
/// Records a client.
pub fn register_client(outbox: &Arc<Outbox>) {
    let mut clients = CLIENTS.lock();
    clients.retain(|c| c.strong_count() > 0);
    clients.push(Arc::downgrade(outbox));
}

fn live_clients() -> Vec<Arc<Outbox>> {
    CLIENTS.lock().iter().filter_map(Weak::upgrade).collect()
}

/// QEMU's event timestamp: wall-clock seconds and microseconds.
fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

/// The QMP form of an event: `{"event": NAME, "data": {...}, "timestamp": {...}}`
/// (`data` only for events that have members).
pub fn event_message(name: &str, data: Option<Value>) -> Value {
    // query-qmp-schema describes the events of qapi::EVENTS: an event sent without being
    // declared there is a bug of its sender.
    debug_assert!(
        crate::monitor::qapi::EVENTS.iter().any(|e| e.name == name),
        "event {name} is not declared in qapi::EVENTS"
    );
    let mut msg = Map::new();
    msg.insert("event".into(), name.into());
    if let Some(data) = data {
        msg.insert("data".into(), data);
    }
    msg.insert("timestamp".into(), timestamp());
    Value::Object(msg)
}

/// The QAPI event for a run-state event.
pub fn vm_event_message(event: &VmEvent) -> Value {
    match event {
        VmEvent::Stop => event_message("STOP", None),
        VmEvent::Resume => event_message("RESUME", None),
        VmEvent::Powerdown => event_message("POWERDOWN", None),
        VmEvent::Reset(cause) => event_message(
            "RESET",
            Some(json!({"guest": cause.is_guest(), "reason": cause.name()})),
        ),
        VmEvent::Shutdown(cause) => event_message(
            "SHUTDOWN",
            Some(json!({"guest": cause.is_guest(), "reason": cause.name()})),
        ),
        VmEvent::Suspend => event_message("SUSPEND", None),
        VmEvent::Wakeup => event_message("WAKEUP", None),
        // pvpanic reports no panic information (QEMU's `info` member is left out).
        VmEvent::GuestPanicked(action) => {
            event_message("GUEST_PANICKED", Some(json!({"action": action.name()})))
        }
    }
}

/// Sends an event to every negotiated QMP client (QEMU's `monitor_qapi_event_emit`).
pub fn broadcast_event(msg: &Value) {
    let line = format!("{}\r\n", json::to_string(msg));
    for client in live_clients() {
        if client.wants_events() {
            client.send(line.clone());
        }
    }
}

/// Gives every client up to `timeout` in all to receive what is queued for it.
pub fn flush_clients(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for client in live_clients() {
        client.flush(deadline.saturating_duration_since(Instant::now()));
    }
}
