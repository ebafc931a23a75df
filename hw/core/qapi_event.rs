//! Events devices send to monitor clients (QEMU's generated `qapi_event_send_*`):
//! `NIC_RX_FILTER_CHANGED`, `BALLOON_CHANGE`... A device calls [`emit`] with the event's
//! name and `data` members; the monitor installs the sink that timestamps and broadcasts
//! them. Without a monitor, events go nowhere, as in QEMU.

use std::sync::OnceLock;

pub use serde_json::{json, Value};

/// Receives every device event: its name and its `data` (`None` for events without
/// members).
pub type EventSink = Box<dyn Fn(&str, Option<Value>) + Send + Sync>;

static SINK: OnceLock<EventSink> = OnceLock::new();

/// Installs the monitor's sink (once; later calls are ignored).
pub fn set_sink(sink: EventSink) {
    let _ = SINK.set(sink);
}

/// Sends event `name` with `data` to the monitor's clients. Safe from any thread, with no
/// device lock needed by the sink.
pub fn emit(name: &str, data: Option<Value>) {
    if let Some(sink) = SINK.get() {
        sink(name, data);
    }
}
