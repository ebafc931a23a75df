//! The virtio console device with its ports (QEMU's `hw/char/virtio-serial-bus.c`): up to
//! `max_ports` ports on the bus `virtio-serial-bus`, each a pair of queues (receive, then
//! transmit; port 0 has queues 0 and 1, port N queues 2N+2 and 2N+3), and with
//! `VIRTIO_CONSOLE_F_MULTIPORT` the control queues 2 (to the guest) and 3 (from it), on
//! which the two sides announce ports (`PORT_ADD`, `PORT_NAME`, `CONSOLE_PORT`) and their
//! opening and closing (`PORT_OPEN`). The ports themselves are devices on the bus
//! (`virtserialport`, `virtconsole`: `hw/char/virtio_console.rs`), each with a chardev.
//!
//! Queues are served on the machine's main loop (the driver's kicks) and on the chardev's
//! thread (its input); the device's one lock orders them. Input waits in the port while
//! the guest has no buffers or has not opened the port, up to [`PENDING_MAX`] bytes; past
//! that the chardev's reader waits too, so a fast host never loses bytes (QEMU stops
//! reading the chardev instead).

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use qom::type_init;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use crate::core::bus::BusState;
use crate::core::accel_ops::EventFd;
use crate::core::chardev::CharBackend;
use crate::core::dirty_log::DirtyTracker;
use crate::core::iothread::{AioContext, AioHandlerId, Interest};
use crate::core::qapi_event::{self, json};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::virtio::virtio::{
    bit, device_id, drain_kick, feature, mark_chain_written, read_config_bytes, ActivateError,
    Activation, QueuePosition, RateLimitedLog, RingError, VirtioDevice, VirtioTransport,
};

/// QEMU's `TYPE_VIRTIO_SERIAL_BUS`.
pub const TYPE_VIRTIO_SERIAL_BUS: &str = "virtio-serial-bus";

/// Feature bits (virtio 1.2, 5.3.3).
pub mod console_feature {
    /// Several ports, with the control queues.
    pub const MULTIPORT: u32 = 1;
    /// The emergency write register in the configuration space.
    pub const EMERG_WRITE: u32 = 2;
}

/// Control message events (virtio 1.2, 5.3.6.2).
mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const DEVICE_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

/// QEMU's queue sizes: 128 for ports, 32 for the control queues.
const PORT_QUEUE_SIZE: u16 = 128;
const CONTROL_QUEUE_SIZE: u16 = 32;
/// The control queues' indices.
const CONTROL_RX: u16 = 2;
const CONTROL_TX: u16 = 3;
/// Bytes of a port's input kept while the guest takes none.
pub const PENDING_MAX: usize = 64 * 1024;
/// Control messages kept while the guest gives no buffers for them.
const CONTROL_PENDING_MAX: usize = 1024;
/// Most bytes of one control message read (a `PORT_NAME` from the guest is not one).
const CONTROL_MAX: usize = 4096;

/// Guest errors of every virtio-serial device share one log budget.
static GUEST_ERRORS: std::sync::LazyLock<RateLimitedLog> =
    std::sync::LazyLock::new(RateLimitedLog::default);

/// The receive queue of port `id`.
fn rx_queue(id: u32) -> u16 {
    if id == 0 {
        0
    } else {
        (2 * id + 2) as u16
    }
}

/// The port whose queue `index` is (`None`: a control queue).
fn port_of_queue(index: u16) -> Option<u32> {
    match index {
        0 | 1 => Some(0),
        CONTROL_RX | CONTROL_TX => None,
        i => Some(u32::from(i - 2) / 2),
    }
}

/// A port as the device sees it (QEMU's `VirtIOSerialPort`).
pub struct SerialPort {
    /// Its number (`nr`).
    pub id: u32,
    /// `name=`, which the guest sees in `/sys/class/virtio-ports/*/name`.
    pub name: Option<String>,
    /// A console (`virtconsole`): open on the host side whatever its chardev does.
    pub is_console: bool,
    /// The device's id, for `VSERPORT_CHANGE`.
    pub qdev_id: Option<String>,
    /// Its backend, if it has one.
    pub chardev: Option<Arc<dyn CharBackend>>,
    state: Mutex<PortState>,
    /// Signalled when input was taken, for a reader waiting for room.
    room: Condvar,
    /// The port's device went: nothing waits for it any more.
    gone: AtomicBool,
}

#[derive(Default)]
struct PortState {
    guest_connected: bool,
    host_connected: bool,
    /// The host side as the guest was last told it (`None`: not yet, since its reset).
    announced: Option<bool>,
    /// Output waits for the chardev to take more.
    throttled: bool,
    /// Input not yet in the guest's buffers.
    pending: VecDeque<u8>,
}

impl SerialPort {
    /// A port numbered `id` over `chardev`.
    pub fn new(
        id: u32,
        name: Option<String>,
        is_console: bool,
        qdev_id: Option<String>,
        chardev: Option<Arc<dyn CharBackend>>,
    ) -> Arc<SerialPort> {
        // QEMU's virtconsole_realize: a console is open from the start; a serial port is
        // open while its chardev is (a client on a socket).
        let host_connected = chardev
            .as_ref()
            .is_some_and(|c| is_console || c.is_open());
        Arc::new(SerialPort {
            id,
            name,
            is_console,
            qdev_id,
            chardev,
            state: Mutex::new(PortState {
                host_connected,
                ..PortState::default()
            }),
            room: Condvar::new(),
            gone: AtomicBool::new(false),
        })
    }

    /// Whether the guest opened the port.
    pub fn guest_connected(&self) -> bool {
        self.state.lock().guest_connected
    }

    /// The guest opened or closed the port (QEMU's `set_guest_connected`).
    fn set_guest_connected(&self, open: bool) {
        let changed = {
            let mut st = self.state.lock();
            std::mem::replace(&mut st.guest_connected, open) != open
        };
        // QEMU's virtconsole: the chardev's frontend is open while the guest's port is
        // (libvirt reads it in query-chardev before it connects to a guest agent).
        if !self.is_console {
            if let Some(chardev) = &self.chardev {
                chardev.set_frontend_open(open);
            }
        }
        if changed {
            if let Some(id) = &self.qdev_id {
                qapi_event::emit("VSERPORT_CHANGE", Some(json!({"id": id, "open": open})));
            }
        }
    }
}

/// QEMU's `VirtIOSerialBus`: where the ports plug in (`<id>.0`), holding the device.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_SERIAL_BUS)]
pub struct VirtioSerialBus {
    #[parent]
    parent: BusState,
    serial: OnceLock<Weak<VirtioSerial>>,
}

type_init!(VirtioSerialBus);

impl VirtioSerialBus {
    /// Connects the bus to its device (at the device's realize).
    pub fn set_serial(&self, serial: &Arc<VirtioSerial>) {
        let _ = self.serial.set(Arc::downgrade(serial));
    }

    /// The device, while it lives.
    pub fn serial(&self) -> Option<Arc<VirtioSerial>> {
        self.serial.get().and_then(Weak::upgrade)
    }
}

/// Errors of plugging a port, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// `nr=` of a port that exists.
    #[error("virtio-serial-bus: A port already exists at id {0}")]
    IdInUse(u32),
    /// `name=` of a port that exists (on any device).
    #[error("virtio-serial-bus: A port already exists by name {0}")]
    NameInUse(String),
    /// Every number is taken.
    #[error("virtio-serial-bus: Maximum port limit for this device reached")]
    Full,
    /// `nr=` beyond `max_ports`.
    #[error("virtio-serial-bus: Out-of-range port id specified, max. allowed: {0}")]
    OutOfRange(u32),
    /// `nr=0` for a `virtserialport`.
    #[error("Port number 0 on virtio-serial devices reserved for virtconsole devices for backward compatibility.")]
    PortZeroReserved,
    /// The bus has no device behind it.
    #[error("virtio-serial-bus: the bus has no device")]
    NoDevice,
}

/// Every device's port names: QEMU refuses a name any port of any device has.
static PORT_NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// QEMU's `VirtIOSerial`.
pub struct VirtioSerial {
    me: Weak<VirtioSerial>,
    max_ports: u32,
    emergency_write: bool,
    context: Arc<AioContext>,
    ports: Mutex<BTreeMap<u32, Arc<SerialPort>>>,
    /// The guest sent `DEVICE_READY`: ports plugged later are announced at once.
    device_ready: AtomicBool,
    handlers: Mutex<Vec<AioHandlerId>>,
    running: Mutex<Option<Arc<Running>>>,
    /// Control messages not yet sent when the device stopped, and those made while it
    /// stood still (a port plugged into a paused VM).
    parked_control: Mutex<VecDeque<Vec<u8>>>,
    /// The stopped device had negotiated `MULTIPORT` (control messages are kept for it).
    parked_multiport: AtomicBool,
}

impl VirtioSerial {
    /// A device with room for `max_ports` ports, served on `context`.
    pub fn new(max_ports: u32, emergency_write: bool, context: Arc<AioContext>) -> Arc<Self> {
        Arc::new_cyclic(|me| VirtioSerial {
            me: me.clone(),
            max_ports,
            emergency_write,
            context,
            ports: Mutex::new(BTreeMap::new()),
            device_ready: AtomicBool::new(false),
            handlers: Mutex::new(Vec::new()),
            running: Mutex::new(None),
            parked_control: Mutex::new(VecDeque::new()),
            parked_multiport: AtomicBool::new(false),
        })
    }

    /// The number `nr` asks for (`u32::MAX`: the first free one; port 0 only for the
    /// first console), checked as QEMU's `virtser_port_device_realize` checks it.
    pub fn assign_id(&self, nr: u32, is_console: bool, name: Option<&str>) -> Result<u32, PortError> {
        let ports = self.ports.lock();
        if nr != u32::MAX && ports.contains_key(&nr) {
            return Err(PortError::IdInUse(nr));
        }
        if let Some(name) = name {
            if PORT_NAMES.lock().iter().any(|n| n == name) {
                return Err(PortError::NameInUse(name.to_string()));
            }
        }
        let id = match nr {
            u32::MAX if is_console && !ports.contains_key(&0) => 0,
            // Number 0 is kept for a console (QEMU marks it used at start).
            u32::MAX => (1..self.max_ports)
                .find(|id| !ports.contains_key(id))
                .ok_or(PortError::Full)?,
            nr => nr,
        };
        if id >= self.max_ports {
            return Err(PortError::OutOfRange(self.max_ports - 1));
        }
        if id == 0 && !is_console {
            return Err(PortError::PortZeroReserved);
        }
        Ok(id)
    }

    /// Plugs `port` (QEMU's `virtser_port_device_plug`): it receives its chardev's input
    /// from now on, and a guest that is up hears of it.
    pub fn add_port(self: &Arc<Self>, port: Arc<SerialPort>) {
        if let Some(name) = &port.name {
            PORT_NAMES.lock().push(name.clone());
        }
        self.ports.lock().insert(port.id, port.clone());
        // PORT_ADD first: a guest drops messages about ports it does not know.
        if self.device_ready.load(Ordering::SeqCst) {
            self.send_control(port.id, event::DEVICE_ADD, 1, &[]);
        }
        if let Some(chardev) = &port.chardev {
            let weak = Arc::downgrade(self);
            let target = Arc::downgrade(&port);
            chardev.set_receiver(Some(Arc::new(move |bytes: &[u8]| {
                if let (Some(dev), Some(port)) = (weak.upgrade(), target.upgrade()) {
                    dev.host_input(&port, bytes);
                }
            })));
            if !port.is_console {
                chardev.set_frontend_open(port.guest_connected());
                let weak = Arc::downgrade(self);
                let target = Arc::downgrade(&port);
                chardev.set_open_notifier(Some(Arc::new(move |open| {
                    if let (Some(dev), Some(port)) = (weak.upgrade(), target.upgrade()) {
                        dev.host_open(&port, open);
                    }
                })));
                let weak = Arc::downgrade(self);
                let target = Arc::downgrade(&port);
                chardev.set_room_notifier(Some(Arc::new(move || {
                    if let (Some(dev), Some(port)) = (weak.upgrade(), target.upgrade()) {
                        dev.host_room(&port);
                    }
                })));
                // A peer that came between the port's making and the notifier.
                self.host_open(&port, chardev.is_open());
            }
        }
    }

    /// Unplugs the port numbered `id`.
    pub fn remove_port(&self, id: u32) {
        let Some(port) = self.ports.lock().remove(&id) else {
            return;
        };
        port.gone.store(true, Ordering::SeqCst);
        port.room.notify_all();
        if let Some(chardev) = &port.chardev {
            chardev.set_receiver(None);
            chardev.set_open_notifier(None);
            chardev.set_room_notifier(None);
        }
        if let Some(name) = &port.name {
            PORT_NAMES.lock().retain(|n| n != name);
        }
        // QEMU's remove_port: what the guest still queued for the port is dropped (its
        // queue's handler finds no port), and a guest that is up hears it went.
        if let Some(running) = self.running() {
            running.wake(rx_queue(id) + 1);
        }
        if self.device_ready.load(Ordering::SeqCst) {
            self.send_control(id, event::DEVICE_REMOVE, 1, &[]);
        }
    }

    fn port(&self, id: u32) -> Option<Arc<SerialPort>> {
        self.ports.lock().get(&id).cloned()
    }

    fn running(&self) -> Option<Arc<Running>> {
        self.running.lock().clone()
    }

    /// Bytes from a port's chardev (its reader thread): kept in the port; the event loop
    /// puts them in the guest's buffers. Waits while the port holds [`PENDING_MAX`] bytes.
    fn host_input(&self, port: &Arc<SerialPort>, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            {
                let mut st = port.state.lock();
                while st.pending.len() >= PENDING_MAX && !port.gone.load(Ordering::SeqCst) {
                    port.room.wait_for(&mut st, Duration::from_millis(100));
                }
                if port.gone.load(Ordering::SeqCst) {
                    return;
                }
                let n = bytes.len().min(PENDING_MAX - st.pending.len());
                st.pending.extend(&bytes[..n]);
                bytes = &bytes[n..];
            }
            if let Some(running) = self.running() {
                running.wake(rx_queue(port.id));
            }
        }
    }

    /// The chardev's peer came or went (QEMU's `virtio_serial_open`/`_close`): what the
    /// old peer sent and the guest did not take goes with it.
    fn host_open(&self, port: &Arc<SerialPort>, open: bool) {
        {
            let mut st = port.state.lock();
            st.host_connected = open;
            if !open {
                st.pending.clear();
                st.throttled = false;
            }
        }
        port.room.notify_all();
        self.announce_host(port);
    }

    /// The chardev can take output again: a held transmit queue goes on.
    fn host_room(&self, port: &SerialPort) {
        if port.state.lock().throttled {
            if let Some(running) = self.running() {
                running.wake(rx_queue(port.id) + 1);
            }
        }
    }

    /// Tells the guest the port's host side, if it last heard otherwise (QEMU sends
    /// PORT_OPEN as the chardev opens and closes; a change while the device stood still
    /// is sent when it runs again).
    fn announce_host(&self, port: &SerialPort) {
        if !self.device_ready.load(Ordering::SeqCst) {
            return;
        }
        let Some(running) = self.running().filter(|r| r.multiport) else {
            return;
        };
        let open = {
            let mut st = port.state.lock();
            if st.announced == Some(st.host_connected) {
                return;
            }
            st.announced = Some(st.host_connected);
            st.host_connected
        };
        running.queue_control(control_msg(port.id, event::PORT_OPEN, u16::from(open), &[]));
    }

    /// Queues a control message for the guest (QEMU's `send_control_event`): only with
    /// `MULTIPORT`, sent when the guest has a buffer for it.
    fn send_control(&self, id: u32, event: u16, value: u16, extra: &[u8]) {
        match self.running() {
            Some(running) if running.multiport => {
                running.queue_control(control_msg(id, event, value, extra));
            }
            Some(_) => {}
            // Stopped with the VM: kept for its next run, as QEMU writes them whatever
            // the run state.
            None if self.parked_multiport.load(Ordering::SeqCst) => {
                let mut parked = self.parked_control.lock();
                if parked.len() < CONTROL_PENDING_MAX {
                    parked.push_back(control_msg(id, event, value, extra));
                }
            }
            None => {}
        }
    }

    /// A control message from the guest (QEMU's `handle_control_message`).
    fn control_message(&self, msg: &[u8]) {
        let Some(header) = msg.get(..8) else {
            GUEST_ERRORS.warn(|| format!("virtio-serial: a control message of {} bytes", msg.len()));
            return;
        };
        let id = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let event = u16::from_le_bytes([header[4], header[5]]);
        let value = u16::from_le_bytes([header[6], header[7]]);
        if event == event::DEVICE_READY {
            if value == 0 {
                GUEST_ERRORS.warn(|| "virtio-serial: the guest failed to initialize the device".into());
                return;
            }
            self.device_ready.store(true, Ordering::SeqCst);
            let ids: Vec<u32> = self.ports.lock().keys().copied().collect();
            for id in ids {
                self.send_control(id, event::DEVICE_ADD, 1, &[]);
            }
            return;
        }
        let Some(port) = self.port(id) else {
            GUEST_ERRORS.warn(|| format!("virtio-serial: invalid port {id} (nonexistent) in a control message"));
            return;
        };
        match event {
            event::PORT_READY => {
                if value == 0 {
                    GUEST_ERRORS.warn(|| format!("virtio-serial: the guest failed to initialize port {id}"));
                    return;
                }
                if port.is_console {
                    self.send_control(id, event::CONSOLE_PORT, 1, &[]);
                }
                if let Some(name) = &port.name {
                    let mut bytes = name.as_bytes().to_vec();
                    bytes.push(0);
                    self.send_control(id, event::PORT_NAME, 1, &bytes);
                }
                // The guest takes a port as closed until told: PORT_OPEN only if open.
                let open = {
                    let mut st = port.state.lock();
                    st.announced = Some(st.host_connected);
                    st.host_connected
                };
                if open {
                    self.send_control(id, event::PORT_OPEN, 1, &[]);
                }
            }
            event::PORT_OPEN => {
                port.set_guest_connected(value != 0);
                if value != 0 {
                    if let Some(running) = self.running() {
                        running.wake(rx_queue(id));
                    }
                }
            }
            _ => {}
        }
    }

    /// Removes the handlers (waiting for one that runs), and the running device: no ring
    /// is touched after this returns.
    fn stop(&self) -> Option<Arc<Running>> {
        self.context.remove_fds(&self.handlers);
        self.running.lock().take()
    }
}

/// A control message: port id, event, value, then `extra`.
fn control_msg(id: u32, event: u16, value: u16, extra: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(8 + extra.len());
    msg.extend_from_slice(&id.to_le_bytes());
    msg.extend_from_slice(&event.to_le_bytes());
    msg.extend_from_slice(&value.to_le_bytes());
    msg.extend_from_slice(extra);
    msg
}

impl VirtioDevice for VirtioSerial {
    fn device_type(&self) -> u16 {
        device_id::CONSOLE
    }

    fn name(&self) -> &'static str {
        "virtio-serial"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        (0..2 * (self.max_ports + 1))
            .map(|i| match i as u16 {
                CONTROL_RX | CONTROL_TX => CONTROL_QUEUE_SIZE,
                _ => PORT_QUEUE_SIZE,
            })
            .collect()
    }

    fn device_features(&self) -> u64 {
        let mut features = bit(feature::RING_INDIRECT_DESC)
            | bit(feature::RING_EVENT_IDX)
            | bit(feature::NOTIFY_ON_EMPTY)
            | bit(feature::ANY_LAYOUT);
        if self.max_ports > 1 {
            features |= bit(console_feature::MULTIPORT);
        }
        if self.emergency_write {
            features |= bit(console_feature::EMERG_WRITE);
        }
        features
    }

    fn config_size(&self) -> usize {
        12
    }

    /// `cols`, `rows` (0: unknown), `max_nr_ports`, `emerg_wr` (reads 0).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&self.max_ports.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    /// The emergency write register: a character out of the first console whose host side
    /// is open (QEMU's `set_config`), before the driver is up.
    fn write_config(&self, offset: u64, data: &[u8]) {
        if !self.emergency_write || offset != 8 || data.first().is_none_or(|&c| c == 0) {
            return;
        }
        let console = self
            .ports
            .lock()
            .values()
            .find(|p| p.is_console && p.state.lock().host_connected)
            .cloned();
        if let Some(chardev) = console.and_then(|p| p.chardev.clone()) {
            chardev.write(&data[..1]);
        }
    }

    /// Starts the handlers; the rings themselves are first touched on the event loop
    /// (the transport holds its lock here, which a ring error would take again).
    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            transport,
            features,
            dirty,
        } = activation;
        let multiport = features & bit(console_feature::MULTIPORT) != 0;
        let kicks: BTreeMap<u16, Arc<EventFd>> =
            queues.iter().map(|q| (q.index, q.kick.clone())).collect();
        let running = Arc::new(Running {
            mem,
            dirty,
            transport,
            multiport,
            kicks: kicks.clone(),
            state: Mutex::new(RunState {
                queues: queues.into_iter().map(|q| (q.index, q.queue)).collect(),
                broken: false,
                control_out: std::mem::take(&mut *self.parked_control.lock()),
            }),
        });
        let mut handlers = self.handlers.lock();
        let result = (|| -> io::Result<()> {
            for (&index, kick) in &kicks {
                let on_kick = running.clone();
                let device = self.me.clone();
                let kick = kick.clone();
                let kick_fd = kick.as_raw_fd();
                handlers.push(self.context.add_fd_with(
                    kick_fd,
                    Interest::READ,
                    Box::new(move || {
                        drain_kick(&kick);
                        on_kick.kicked(index, &device);
                    }),
                )?);
            }
            Ok(())
        })();
        drop(handlers);
        if let Err(e) = result {
            self.stop();
            return Err(ActivateError::Io {
                device: "virtio-serial",
                reason: e.to_string(),
            });
        }
        *self.running.lock() = Some(running.clone());
        // A guest without MULTIPORT cannot say it opened port 0: it is open once the driver
        // is up (QEMU's set_status).
        if !multiport {
            if let Some(port) = self.port(0) {
                port.set_guest_connected(true);
            }
        }
        // Host sides that changed while the device stood still, control messages kept,
        // input that waited: all on the event loop.
        self.parked_multiport.store(false, Ordering::SeqCst);
        let ports: Vec<Arc<SerialPort>> = self.ports.lock().values().cloned().collect();
        for port in &ports {
            self.announce_host(port);
        }
        // Every queue: the ports' input and output that waited, and what the guest left
        // for a port unplugged meanwhile (its handler drops it).
        for &index in kicks.keys() {
            running.wake(index);
        }
        Ok(())
    }

    /// QEMU's `vser_reset` and `guest_reset`: the guest's side of every port closes, and
    /// what it was told is forgotten.
    fn reset(&self) {
        self.stop();
        self.device_ready.store(false, Ordering::SeqCst);
        self.parked_multiport.store(false, Ordering::SeqCst);
        self.parked_control.lock().clear();
        let ports: Vec<Arc<SerialPort>> = self.ports.lock().values().cloned().collect();
        for port in ports {
            {
                let mut st = port.state.lock();
                st.announced = None;
                st.throttled = false;
            }
            port.set_guest_connected(false);
        }
    }

    /// Every buffer is used as it is popped (a held one is given back), so nothing is in
    /// flight once the handlers are gone; control messages not yet sent are kept for the
    /// next run.
    fn park(&self) -> Option<Vec<QueuePosition>> {
        let running = self.stop()?;
        let st = running.state.lock();
        let positions = st
            .queues
            .iter()
            .map(|(&index, q)| QueuePosition::of(index, q, 0))
            .collect();
        // Messages made between the stop and here follow the ones not yet sent.
        let mut parked = self.parked_control.lock();
        let later: Vec<Vec<u8>> = parked.drain(..).collect();
        parked.extend(st.control_out.iter().cloned());
        parked.extend(later);
        self.parked_multiport.store(running.multiport, Ordering::SeqCst);
        Some(positions)
    }

    /// Whether the guest is up, each port's two sides as the guest knows them, and the
    /// control messages not yet sent (QEMU saves the same, less the ports' numbering,
    /// which both sides' command lines give).
    fn save_device(&self, section: &mut VmStateSection) -> Result<(), VmStateError> {
        section.put("serial.device_ready", self.device_ready.load(Ordering::SeqCst));
        let ports: Vec<(u32, bool, Option<bool>)> = self
            .ports
            .lock()
            .values()
            .map(|p| {
                let st = p.state.lock();
                (p.id, st.guest_connected, st.announced)
            })
            .collect();
        section.put("serial.ports", ports);
        let control: Vec<Vec<u8>> = self.parked_control.lock().iter().cloned().collect();
        section.put("serial.control_out", control);
        Ok(())
    }

    /// QEMU's `virtio_serial_load_device` and its post-load: the guest's sides are
    /// reported again (VSERPORT_CHANGE, frontend-open), and a host side that differs from
    /// what the guest knew is announced when the device runs.
    fn load_device(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let ready: bool = section.get("serial.device_ready")?;
        let ports: Vec<(u32, bool, Option<bool>)> = section.get("serial.ports")?;
        let control: Vec<Vec<u8>> = section.get("serial.control_out")?;
        if control.len() > CONTROL_PENDING_MAX || control.iter().any(|m| m.len() > CONTROL_MAX) {
            return Err(VmStateError::Mismatch(
                "virtio-serial: too many or too long control messages".into(),
            ));
        }
        let mut loaded = Vec::new();
        for (id, guest, announced) in ports {
            let Some(port) = self.port(id) else {
                return Err(VmStateError::Mismatch(format!(
                    "virtio-serial: port {id} is not on this side's command line"
                )));
            };
            loaded.push((port, guest, announced));
        }
        for (port, guest, announced) in loaded {
            port.state.lock().announced = announced;
            port.set_guest_connected(guest);
        }
        self.device_ready.store(ready, Ordering::SeqCst);
        *self.parked_control.lock() = control.into();
        Ok(())
    }
}

/// The next available chain of `q`, or `None` once the ring is empty, with the driver's
/// notifications on again (with `EVENT_IDX` the driver kicks only past `avail_event`).
fn pop(
    q: &mut Queue,
    mem: &Arc<GuestMemoryMmap>,
) -> Result<Option<virtio_queue::DescriptorChain<Arc<GuestMemoryMmap>>>, virtio_queue::Error> {
    loop {
        if let Some(chain) = q.iter(mem.clone())?.next() {
            return Ok(Some(chain));
        }
        if !q.enable_notification(&**mem)? {
            return Ok(None);
        }
    }
}

/// Most bytes of one chain of output taken whole (Linux writes at most 32 KiB a chain);
/// the rest of a longer one is dropped.
const OUTPUT_CHAIN_MAX: usize = 1 << 20;

/// The device while the driver runs it. Its rings are served only by its handlers on the
/// event loop; other threads wake them through the queues' eventfds.
struct Running {
    mem: Arc<GuestMemoryMmap>,
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    multiport: bool,
    kicks: BTreeMap<u16, Arc<EventFd>>,
    state: Mutex<RunState>,
}

struct RunState {
    queues: BTreeMap<u16, Queue>,
    broken: bool,
    /// Control messages for the guest, waiting for its buffers.
    control_out: VecDeque<Vec<u8>>,
}

impl Running {
    /// Runs queue `index`'s handler on the event loop.
    fn wake(&self, index: u16) {
        if let Some(kick) = self.kicks.get(&index) {
            let _ = kick.write(1);
        }
    }

    /// Queue `index` was notified (by the driver, or woken).
    fn kicked(&self, index: u16, device: &Weak<VirtioSerial>) {
        let Some(device) = device.upgrade() else {
            return;
        };
        match (index, port_of_queue(index)) {
            (CONTROL_RX, _) => self.flush_control(),
            (CONTROL_TX, _) => {
                for msg in self.take_control_messages() {
                    device.control_message(&msg);
                }
            }
            (i, Some(id)) if i % 2 == 0 => {
                if let Some(port) = device.port(id) {
                    self.fill_port(&port);
                }
            }
            (_, Some(id)) => self.flush_output(&device, id),
            (_, None) => {}
        }
    }

    /// Marks the device broken (QEMU's `virtio_error`).
    fn fail(&self, st: &mut RunState, index: u16, e: RingError) {
        if !st.broken {
            st.broken = true;
            GUEST_ERRORS.warn(|| format!("virtio-serial: queue {index}: {e}: device needs reset"));
            self.transport.mark_broken();
        }
    }

    /// Interrupts the driver for queue `index` if it wants it.
    fn notify(&self, st: &mut RunState, index: u16) {
        let Some(q) = st.queues.get_mut(&index) else {
            return;
        };
        match q.needs_notification(&*self.mem) {
            Ok(true) => self.transport.signal_used_queue(index),
            Ok(false) => {}
            Err(e) => self.fail(st, index, e.into()),
        }
    }

    /// Queues a control message; a port's PORT_OPEN replaces one not yet sent (only its
    /// last state matters), so a peer coming and going cannot fill the queue.
    fn queue_control(&self, msg: Vec<u8>) {
        {
            let mut st = self.state.lock();
            if msg.get(4..6) == Some(&event::PORT_OPEN.to_le_bytes()[..]) {
                st.control_out
                    .retain(|m| m.get(..6) != msg.get(..6));
            }
            if st.control_out.len() >= CONTROL_PENDING_MAX {
                GUEST_ERRORS.warn(|| "virtio-serial: the guest takes no control messages; one dropped".into());
                return;
            }
            st.control_out.push_back(msg);
        }
        self.wake(CONTROL_RX);
    }

    /// Puts waiting control messages in the guest's control buffers.
    fn flush_control(&self) {
        let mut st = self.state.lock();
        if st.broken || st.control_out.is_empty() {
            return;
        }
        let mut used = false;
        let result = (|| -> Result<(), RingError> {
            while let Some(msg) = st.control_out.front().cloned() {
                let Some(q) = st.queues.get_mut(&CONTROL_RX) else {
                    return Ok(());
                };
                let Some(chain) = pop(q, &self.mem)? else {
                    return Ok(());
                };
                let head = chain.head_index();
                let written = chain.clone();
                let mut writer = Writer::new(&*self.mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
                if writer.available_bytes() < msg.len() {
                    return Err(RingError::Chain(format!(
                        "a control buffer of {} bytes for a {}-byte message",
                        writer.available_bytes(),
                        msg.len()
                    )));
                }
                writer.write_all(&msg).map_err(|e| RingError::Chain(e.to_string()))?;
                mark_chain_written(&self.dirty, &written);
                q.add_used(&*self.mem, head, msg.len() as u32)?;
                used = true;
                st.control_out.pop_front();
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.fail(&mut st, CONTROL_RX, e);
        }
        if used {
            self.notify(&mut st, CONTROL_RX);
        }
    }

    /// The guest's control messages, read out of its buffers.
    fn take_control_messages(&self) -> Vec<Vec<u8>> {
        let mut st = self.state.lock();
        if st.broken {
            return Vec::new();
        }
        let mut msgs = Vec::new();
        let result = (|| -> Result<(), RingError> {
            let Some(q) = st.queues.get_mut(&CONTROL_TX) else {
                return Ok(());
            };
            while let Some(chain) = pop(q, &self.mem)? {
                let head = chain.head_index();
                let mut reader = Reader::new(&*self.mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
                let mut msg = vec![0u8; reader.available_bytes().min(CONTROL_MAX)];
                reader.read_exact(&mut msg).map_err(|e| RingError::Chain(e.to_string()))?;
                q.add_used(&*self.mem, head, 0)?;
                msgs.push(msg);
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.fail(&mut st, CONTROL_TX, e);
        }
        if !msgs.is_empty() {
            self.notify(&mut st, CONTROL_TX);
        }
        msgs
    }

    /// Moves a port's waiting input into the guest's receive buffers, if it may have it.
    fn fill_port(&self, port: &SerialPort) {
        let index = rx_queue(port.id);
        let mut st = self.state.lock();
        if st.broken || (!self.multiport && port.id != 0) {
            return;
        }
        let mut used = false;
        let result = (|| -> Result<(), RingError> {
            let Some(q) = st.queues.get_mut(&index) else {
                return Ok(());
            };
            let mut ps = port.state.lock();
            // QEMU's virtio_serial_guest_ready: with MULTIPORT, only into an open port.
            if self.multiport && !ps.guest_connected {
                return Ok(());
            }
            while !ps.pending.is_empty() {
                let Some(chain) = pop(q, &self.mem)? else {
                    break;
                };
                let head = chain.head_index();
                let written = chain.clone();
                let mut writer = Writer::new(&*self.mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
                let n = writer.available_bytes().min(ps.pending.len());
                let (a, b) = ps.pending.as_slices();
                let first = n.min(a.len());
                writer.write_all(&a[..first]).map_err(|e| RingError::Chain(e.to_string()))?;
                writer.write_all(&b[..n - first]).map_err(|e| RingError::Chain(e.to_string()))?;
                mark_chain_written(&self.dirty, &written);
                ps.pending.drain(..n);
                q.add_used(&*self.mem, head, n as u32)?;
                used = true;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.fail(&mut st, index, e);
        }
        if used {
            port.room.notify_all();
            self.notify(&mut st, index);
        }
    }

    /// The guest's output on port `id`: to its chardev while the host side is open,
    /// otherwise dropped (QEMU's `handle_output`). A serial port's chardev that cannot
    /// take a chain now holds the queue until it can (QEMU's throttling); a console's
    /// output goes whatever the chardev does with it.
    fn flush_output(&self, device: &VirtioSerial, id: u32) {
        let index = rx_queue(id) + 1;
        let port = device.port(id);
        let mut st = self.state.lock();
        if st.broken {
            return;
        }
        let mut used = false;
        let result = (|| -> Result<(), RingError> {
            let Some(q) = st.queues.get_mut(&index) else {
                return Ok(());
            };
            while let Some(chain) = pop(q, &self.mem)? {
                let head = chain.head_index();
                let mut reader = Reader::new(&*self.mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
                let sink = port
                    .as_ref()
                    .filter(|p| p.state.lock().host_connected)
                    .and_then(|p| Some((p, p.chardev.clone()?)));
                if let Some((p, chardev)) = sink {
                    let len = reader.available_bytes();
                    if !p.is_console && len > chardev.write_room() {
                        q.go_to_previous_position();
                        p.state.lock().throttled = true;
                        // Room may have come meanwhile: look again then.
                        if len <= chardev.write_room() {
                            self.wake(index);
                        }
                        return Ok(());
                    }
                    p.state.lock().throttled = false;
                    let mut data = vec![0u8; len.min(OUTPUT_CHAIN_MAX)];
                    reader.read_exact(&mut data).map_err(|e| RingError::Chain(e.to_string()))?;
                    if len > OUTPUT_CHAIN_MAX {
                        GUEST_ERRORS.warn(|| format!("virtio-serial: port {id}: a chain of {len} bytes cut to {OUTPUT_CHAIN_MAX}"));
                    }
                    chardev.write(&data);
                }
                q.add_used(&*self.mem, head, 0)?;
                used = true;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.fail(&mut st, index, e);
        }
        if used {
            self.notify(&mut st, index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_pair_up_per_port_after_the_control_pair() {
        assert_eq!((rx_queue(0), rx_queue(1), rx_queue(31)), (0, 4, 64));
        assert_eq!(port_of_queue(0), Some(0));
        assert_eq!(port_of_queue(1), Some(0));
        assert_eq!(port_of_queue(2), None);
        assert_eq!(port_of_queue(3), None);
        assert_eq!(port_of_queue(4), Some(1));
        assert_eq!(port_of_queue(5), Some(1));
        assert_eq!(port_of_queue(65), Some(31));
    }
}
