//! The virtio input device (QEMU's `hw/input/virtio-input.c` and `virtio-input-hid.c`):
//! a keyboard, a mouse or a tablet that speaks Linux's evdev events. The device fills
//! the driver's event-queue buffers with 8-byte events (type, code, value), a report at a
//! time ending in `SYN_REPORT`, and takes LED changes from the status queue. The driver
//! learns what the device is through the configuration space: it writes a `select` and
//! `subsel` and reads back the name, the IDs, the event bits or an axis's range.
//!
//! Events come from the machine's input (`hw/core/input.rs`: the VNC server, QMP's
//! `send-key` and `input-send-event`) on the sender's thread and go into the ring there,
//! never on a vCPU thread. As QEMU's, the device takes input only while its driver runs
//! (`DRIVER_OK` to reset): a keyboard then gets the keys, a pointer goes first among the
//! pointers; a report that does not fit the buffers the driver posted is dropped whole.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use crate::core::dirty_log::DirtyTracker;
use crate::core::input::{button, InputHandlerId, InputHandlers, KeyboardHandler, MouseHandler, TabletHandler, ABS_MAX};
use crate::core::services::MachineServices;
use crate::core::iothread::{AioContext, AioHandlerId, Interest};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::virtio::virtio::{
    bit, drain_kick, feature, mark_chain_written, next_chain, ActivateError, Activation, QueuePosition, RateLimitedLog,
    RingError, VirtioDevice, VirtioTransport,
};

/// The virtio device ID of input devices.
pub const VIRTIO_ID_INPUT: u16 = 18;
/// QEMU's queue size for both queues.
const QUEUE_SIZE: u16 = 64;
const EVENTQ: u16 = 0;
const STATUSQ: u16 = 1;
/// One event: le16 type, le16 code, le32 value.
const EVENT_SIZE: usize = 8;
/// The configuration's header: select, subsel, size, five reserved bytes.
const CONFIG_HEADER: usize = 8;
/// The configuration's union: a string, a bitmap, an axis's range or the IDs.
const CONFIG_PAYLOAD: usize = 128;

/// `select` values (the virtio spec's `VIRTIO_INPUT_CFG_*`).
pub mod cfg {
    /// The device's name.
    pub const ID_NAME: u8 = 0x01;
    /// Its serial number (the `serial` property).
    pub const ID_SERIAL: u8 = 0x02;
    /// Bus type, vendor, product and version.
    pub const ID_DEVIDS: u8 = 0x03;
    /// Input properties (`INPUT_PROP_*`).
    pub const PROP_BITS: u8 = 0x10;
    /// The codes of event type `subsel`.
    pub const EV_BITS: u8 = 0x11;
    /// The range of absolute axis `subsel`.
    pub const ABS_INFO: u8 = 0x12;
}

/// Linux's event types and codes (`linux/input-event-codes.h`).
pub mod evdev {
    /// Report boundaries.
    pub const EV_SYN: u16 = 0x00;
    /// Keys and buttons.
    pub const EV_KEY: u16 = 0x01;
    /// Relative axes.
    pub const EV_REL: u16 = 0x02;
    /// Absolute axes.
    pub const EV_ABS: u16 = 0x03;
    /// LEDs.
    pub const EV_LED: u16 = 0x11;
    /// Autorepeat.
    pub const EV_REP: u16 = 0x14;
    /// The end of a report.
    pub const SYN_REPORT: u16 = 0;
    /// The pointer's X motion.
    pub const REL_X: u16 = 0x00;
    /// The pointer's Y motion.
    pub const REL_Y: u16 = 0x01;
    /// The wheel.
    pub const REL_WHEEL: u16 = 0x08;
    /// The absolute X position.
    pub const ABS_X: u16 = 0x00;
    /// The absolute Y position.
    pub const ABS_Y: u16 = 0x01;
    /// Buttons.
    pub const BTN_LEFT: u16 = 0x110;
    /// The right button.
    pub const BTN_RIGHT: u16 = 0x111;
    /// The middle button.
    pub const BTN_MIDDLE: u16 = 0x112;
    /// The side button.
    pub const BTN_SIDE: u16 = 0x113;
    /// The extra button.
    pub const BTN_EXTRA: u16 = 0x114;
    /// The wheel as a button, down.
    pub const BTN_GEAR_DOWN: u16 = 0x150;
    /// The wheel as a button, up.
    pub const BTN_GEAR_UP: u16 = 0x151;
    /// Num Lock's LED.
    pub const LED_NUML: u16 = 0;
    /// Caps Lock's LED.
    pub const LED_CAPSL: u16 = 1;
    /// Scroll Lock's LED.
    pub const LED_SCROLLL: u16 = 2;
    /// `BUS_VIRTUAL`.
    pub const BUS_VIRTUAL: u16 = 0x06;
}

use evdev::*;

/// Which device it is (QEMU's three `virtio-input-hid` types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HidKind {
    /// `virtio-keyboard`.
    Keyboard,
    /// `virtio-mouse`.
    Mouse,
    /// `virtio-tablet`.
    Tablet,
}

/// The buttons QEMU 7.2 gives a pointer (`keymap_button`).
const POINTER_BUTTONS: [u16; 7] = [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_GEAR_UP, BTN_GEAR_DOWN, BTN_SIDE, BTN_EXTRA];

/// QEMU's key numbers (the PC's scancode set 1, 0x80 added after an 0xe0 prefix) as Linux
/// key codes. Set 1 codes 0x01-0x53 are Linux's own numbers; the rest are listed.
pub fn qnum_to_linux(qnum: u16) -> Option<u16> {
    let code = match qnum {
        0x01..=0x53 => qnum,
        0x54 => 99,  // SysRq
        0x56 => 86,  // 102nd key (< >)
        0x57 => 87,  // F11
        0x58 => 88,  // F12
        0x59 => 117, // keypad =
        0x70 => 93,  // Katakana/Hiragana
        0x73 => 89,  // Ro
        0x79 => 92,  // Henkan
        0x7b => 94,  // Muhenkan
        0x7d => 124, // Yen
        0x7e => 121, // keypad ,
        0x9c => 96,  // keypad Enter
        0x9d => 97,  // right Ctrl
        0xa0 => 113, // mute
        0xae => 114, // volume down
        0xb0 => 115, // volume up
        0xb5 => 98,  // keypad /
        0xb7 => 99,  // Print Screen (Linux's SysRq key)
        0xb8 => 100, // right Alt
        0xc6 => 119, // Pause
        0xc7 => 102, // Home
        0xc8 => 103, // Up
        0xc9 => 104, // Page Up
        0xcb => 105, // Left
        0xcd => 106, // Right
        0xcf => 107, // End
        0xd0 => 108, // Down
        0xd1 => 109, // Page Down
        0xd2 => 110, // Insert
        0xd3 => 111, // Delete
        0xdb => 125, // left Meta
        0xdc => 126, // right Meta
        0xdd => 127, // Menu (Compose)
        0xde => 116, // Power
        0x71 => 123, // Hanja (lang2)
        0x72 => 122, // Hangeul (lang1)
        0x90 => 165, // previous track
        0x99 => 163, // next track
        0xa1 => 140, // calculator
        0xa2 => 164, // play/pause
        0xa4 => 166, // stop (media)
        0xb2 => 172, // browser home
        0xdf => 142, // sleep
        0xe3 => 143, // wake
        0xe5 => 217, // browser search
        0xe6 => 156, // browser favourites
        0xe7 => 173, // browser refresh
        0xe8 => 128, // browser stop
        0xe9 => 159, // browser forward
        0xea => 158, // browser back
        0xeb => 157, // my computer
        0xec => 155, // mail
        0xed => 226, // media select
        _ => return None,
    };
    Some(code)
}

/// One configuration entry (QEMU's `virtio_input_config`): what a (select, subsel) pair
/// reads.
#[derive(Clone)]
struct ConfigEntry {
    select: u8,
    subsel: u8,
    payload: Vec<u8>,
}

impl ConfigEntry {
    fn new(select: u8, subsel: u8, payload: Vec<u8>) -> Self {
        ConfigEntry { select, subsel, payload }
    }

    /// A bitmap with the given bits set (QEMU's `virtio_input_extend_config`).
    fn bitmap(select: u8, subsel: u8, bits: impl IntoIterator<Item = u16>) -> Self {
        let mut map = Vec::new();
        for b in bits {
            let byte = usize::from(b / 8);
            if map.len() <= byte {
                map.resize(byte + 1, 0);
            }
            map[byte] |= 1 << (b % 8);
        }
        ConfigEntry::new(select, subsel, map)
    }

    /// An axis's range: min, max, fuzz, flat, res (le32 each).
    fn abs_info(axis: u16, min: u32, max: u32) -> Self {
        let mut payload = Vec::with_capacity(20);
        for v in [min, max, 0, 0, 0] {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        ConfigEntry::new(cfg::ABS_INFO, axis as u8, payload)
    }
}

/// QEMU's configuration lists of the three devices: the pointers' v2 ones (a wheel axis, IDs
/// of version 2) whatever `wheel-axis` says, as QEMU 7.2 picks them in `instance_init`,
/// before the property is set.
fn config_entries(kind: HidKind, serial: Option<&str>) -> Vec<ConfigEntry> {
    let wheel_axis = true;
    let (name, product) = match kind {
        HidKind::Keyboard => ("QEMU Virtio Keyboard", 1u16),
        HidKind::Mouse => ("QEMU Virtio Mouse", 2),
        HidKind::Tablet => ("QEMU Virtio Tablet", 3),
    };
    let version: u16 = if kind != HidKind::Keyboard && wheel_axis { 2 } else { 1 };
    // QEMU's size is the name's sizeof, its NUL included.
    let mut name_bytes = name.as_bytes().to_vec();
    name_bytes.push(0);
    let mut ids = Vec::with_capacity(8);
    for v in [BUS_VIRTUAL, 0x0627, product, version] {
        ids.extend_from_slice(&v.to_le_bytes());
    }
    let mut entries = vec![
        ConfigEntry::new(cfg::ID_NAME, 0, name_bytes),
        ConfigEntry::new(cfg::ID_DEVIDS, 0, ids),
    ];
    match kind {
        HidKind::Keyboard => {
            entries.push(ConfigEntry::new(cfg::EV_BITS, EV_REP as u8, vec![0]));
            entries.push(ConfigEntry::bitmap(cfg::EV_BITS, EV_LED as u8, [LED_NUML, LED_CAPSL, LED_SCROLLL]));
            entries.push(ConfigEntry::bitmap(cfg::EV_BITS, EV_KEY as u8, (0..0x100).filter_map(qnum_to_linux)));
        }
        HidKind::Mouse => {
            let rel = [REL_X, REL_Y].into_iter().chain(wheel_axis.then_some(REL_WHEEL));
            entries.push(ConfigEntry::bitmap(cfg::EV_BITS, EV_REL as u8, rel));
            entries.push(ConfigEntry::bitmap(cfg::EV_BITS, EV_KEY as u8, POINTER_BUTTONS));
        }
        HidKind::Tablet => {
            entries.push(ConfigEntry::bitmap(cfg::EV_BITS, EV_ABS as u8, [ABS_X, ABS_Y]));
            if wheel_axis {
                // QEMU's v2 bitmap: two bytes, REL_WHEEL in the second.
                entries.push(ConfigEntry::new(cfg::EV_BITS, EV_REL as u8, vec![0, 1 << (REL_WHEEL - 8)]));
            }
            entries.push(ConfigEntry::abs_info(ABS_X, 0, ABS_MAX.into()));
            entries.push(ConfigEntry::abs_info(ABS_Y, 0, ABS_MAX.into()));
            entries.push(ConfigEntry::bitmap(cfg::EV_BITS, EV_KEY as u8, POINTER_BUTTONS));
        }
    }
    if let Some(serial) = serial {
        // QEMU's snprintf into the 128-byte string: at most 127 bytes.
        let bytes = serial.as_bytes();
        entries.push(ConfigEntry::new(cfg::ID_SERIAL, 0, bytes[..bytes.len().min(CONFIG_PAYLOAD - 1)].to_vec()));
    }
    entries
}

/// How the transport configured the device.
pub struct VirtioInputConf {
    /// Keyboard, mouse or tablet.
    pub kind: HidKind,
    /// `wheel-axis` (pointers): the wheel as `REL_WHEEL` rather than gear buttons.
    pub wheel_axis: bool,
    /// `serial`.
    pub serial: Option<String>,
    /// The machine, whose input the device takes events from.
    pub machine: Weak<MachineServices>,
    /// Where the status queue is served.
    pub context: Arc<AioContext>,
}

/// Guest errors of every virtio-input device share one log budget.
static GUEST_ERRORS: std::sync::LazyLock<RateLimitedLog> = std::sync::LazyLock::new(RateLimitedLog::default);

/// QEMU's `VirtIOInputHID`.
pub struct VirtioInput {
    kind: HidKind,
    wheel_axis: bool,
    entries: Vec<ConfigEntry>,
    /// QEMU's `cfg_size`: the header and the largest payload.
    config_size: usize,
    /// The driver's `select` and `subsel`.
    selected: Mutex<(u8, u8)>,
    machine: Weak<MachineServices>,
    context: Arc<AioContext>,
    /// Itself, for the handler it registers as a keyboard when its driver starts.
    this: Weak<VirtioInput>,
    /// The registration with the machine's input, from [`VirtioInput::register`] (QEMU's
    /// realize) until the device goes: a pointer's, or the id a keyboard takes the keys
    /// under while its driver runs; and whether the driver runs (a pointer is first).
    input_id: Mutex<Option<InputHandlerId>>,
    active: Mutex<bool>,
    /// The LEDs the guest lit (Num, Caps, Scroll Lock as bits 0-2): kept, shown nowhere.
    leds: Arc<Mutex<u8>>,
    /// The buttons of the last pointer report, to send only changes.
    buttons: Mutex<u8>,
    status_handler: Mutex<Vec<AioHandlerId>>,
    /// The running device, while its driver runs it.
    running: Mutex<Option<Arc<Running>>>,
}

impl VirtioInput {
    /// A device over `conf`; [`VirtioInput::register`] then registers it with the machine's
    /// input.
    pub fn new(conf: VirtioInputConf) -> Arc<Self> {
        let entries = config_entries(conf.kind, conf.serial.as_deref());
        let config_size = CONFIG_HEADER + entries.iter().map(|e| e.payload.len()).max().unwrap_or(0);
        Arc::new_cyclic(|this| VirtioInput {
            kind: conf.kind,
            wheel_axis: conf.wheel_axis,
            entries,
            config_size,
            selected: Mutex::new((0, 0)),
            machine: conf.machine,
            context: conf.context,
            this: this.clone(),
            input_id: Mutex::new(None),
            active: Mutex::new(false),
            leds: Arc::new(Mutex::new(0)),
            buttons: Mutex::new(0),
            status_handler: Mutex::new(Vec::new()),
            running: Mutex::new(None),
        })
    }

    fn with_input<R>(&self, f: impl FnOnce(&InputHandlers) -> R) -> Option<R> {
        self.machine.upgrade().map(|m| f(m.input()))
    }

    /// Registers with the machine's input, as QEMU's realize does: a pointer goes last in
    /// line (its driver's start moves it first), a keyboard takes its number now and the
    /// keys only while its driver runs. Either gets the next handler number then, which
    /// `query-mice` shows.
    pub fn register(&self) {
        let mut id = self.input_id.lock();
        if id.is_some() {
            return;
        }
        let handler = Arc::new(Handler(self.this.clone()));
        *id = self.with_input(|input| match self.kind {
            HidKind::Keyboard => input.reserve_id(),
            HidKind::Mouse => input.register_mouse("QEMU Virtio Mouse", handler),
            HidKind::Tablet => input.register_tablet("QEMU Virtio Tablet", handler),
        });
    }

    /// The LEDs the guest set (bit 0 Num Lock, 1 Caps Lock, 2 Scroll Lock).
    pub fn leds(&self) -> u8 {
        *self.leds.lock()
    }

    /// Unregisters from the machine's input (the device goes).
    pub fn unplug(&self) {
        self.stop();
        if let Some(id) = self.input_id.lock().take() {
            self.with_input(|input| input.unregister(id));
        }
    }

    /// Stops serving the rings: the status queue's handler goes, and once this returns no
    /// report is being written (the sender holds the ring's lock while it writes).
    fn stop(&self) -> Option<Arc<Running>> {
        self.context.remove_fds(&self.status_handler);
        let running = self.running.lock().take()?;
        running.state.lock().stopped = true;
        Some(running)
    }

    /// QEMU's `change_active`: while the driver runs, a keyboard takes the keys and a
    /// pointer goes first; at a driver reset the keyboard gives them back and the pointer
    /// goes last. A VM stop keeps both (input is dropped while the rings stand still).
    fn set_active(&self, active: bool) {
        let Some(id) = *self.input_id.lock() else {
            return;
        };
        let mut was_active = self.active.lock();
        if *was_active == active {
            return;
        }
        *was_active = active;
        self.with_input(|input| match (self.kind, active) {
            (HidKind::Keyboard, true) => {
                input.register_keyboard_as(id, Arc::new(Handler(self.this.clone())));
            }
            (HidKind::Keyboard, false) => input.unregister(id),
            (_, true) => input.activate(id),
            (_, false) => input.deactivate(id),
        });
    }

    /// Puts one report (its events and `SYN_REPORT`) in the event queue, or drops it whole
    /// when the driver has posted too few buffers (QEMU's `virtio_input_send`).
    fn send(&self, events: &[(u16, u16, i32)]) {
        let Some(running) = self.running.lock().clone() else {
            return;
        };
        running.send(events);
    }

    /// A pointer report: changed buttons, the motion or position, the wheel, `SYN_REPORT`.
    fn pointer_report(&self, axes: [(u16, u16, i32); 2], dz: i32, buttons: u8) {
        let mut events = Vec::with_capacity(8);
        let old = std::mem::replace(&mut *self.buttons.lock(), buttons);
        // In the order QEMU's user interfaces send them: buttons, the wheel, the axes.
        for (mask, code) in [(button::LEFT, BTN_LEFT), (button::MIDDLE, BTN_MIDDLE), (button::RIGHT, BTN_RIGHT)] {
            if (old ^ buttons) & mask != 0 {
                events.push((EV_KEY, code, i32::from(buttons & mask != 0)));
            }
        }
        // dz is positive downwards; QEMU's wheel-up is +1.
        for _ in 0..dz.unsigned_abs().min(16) {
            if self.wheel_axis {
                events.push((EV_REL, REL_WHEEL, if dz < 0 { 1 } else { -1 }));
            } else {
                let gear = if dz < 0 { BTN_GEAR_UP } else { BTN_GEAR_DOWN };
                events.push((EV_KEY, gear, 1));
                events.push((EV_KEY, gear, 0));
            }
        }
        for (ty, code, value) in axes {
            // Zero motion is no event (Linux drops it anyway).
            if ty == EV_ABS || value != 0 {
                events.push((ty, code, value));
            }
        }
        events.push((EV_SYN, SYN_REPORT, 0));
        self.send(&events);
    }
}

/// The device's side of the machine's input, held weakly: the input outlives devices.
struct Handler(Weak<VirtioInput>);

impl KeyboardHandler for Handler {
    fn key(&self, qnum: u16, down: bool) {
        let Some(dev) = self.0.upgrade() else { return };
        match qnum_to_linux(qnum) {
            Some(code) => dev.send(&[(EV_KEY, code, i32::from(down)), (EV_SYN, SYN_REPORT, 0)]),
            None if down => log::debug!("virtio-keyboard: unmapped key number {qnum:#x}"),
            None => {}
        }
    }
}

impl MouseHandler for Handler {
    fn motion(&self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        if let Some(dev) = self.0.upgrade() {
            dev.pointer_report([(EV_REL, REL_X, dx), (EV_REL, REL_Y, dy)], dz, buttons);
        }
    }
}

impl TabletHandler for Handler {
    fn position(&self, x: u16, y: u16, dz: i32, buttons: u8) {
        if let Some(dev) = self.0.upgrade() {
            dev.pointer_report([(EV_ABS, ABS_X, x.into()), (EV_ABS, ABS_Y, y.into())], dz, buttons);
        }
    }
}

impl VirtioDevice for VirtioInput {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_INPUT
    }

    fn name(&self) -> &'static str {
        "virtio-input"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        bit(feature::VERSION_1) | bit(feature::RING_INDIRECT_DESC) | bit(feature::RING_EVENT_IDX)
    }

    fn config_size(&self) -> usize {
        self.config_size
    }

    /// QEMU's `virtio_input_get_config`: the selected entry, or zeros (the header too)
    /// when there is none.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (select, subsel) = *self.selected.lock();
        let Some(entry) = self.entries.iter().find(|e| e.select == select && e.subsel == subsel) else {
            return;
        };
        let mut image = vec![0u8; self.config_size];
        image[0] = entry.select;
        image[1] = entry.subsel;
        image[2] = entry.payload.len() as u8;
        image[CONFIG_HEADER..CONFIG_HEADER + entry.payload.len()].copy_from_slice(&entry.payload);
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(image.len());
        let end = start.saturating_add(data.len()).min(image.len());
        data[..end - start].copy_from_slice(&image[start..end]);
    }

    /// `select` and `subsel` are the writable bytes.
    fn write_config(&self, offset: u64, data: &[u8]) {
        let mut selected = self.selected.lock();
        for (i, &b) in data.iter().enumerate() {
            match offset.saturating_add(i as u64) {
                0 => selected.0 = b,
                1 => selected.1 = b,
                _ => {}
            }
        }
    }

    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { mem, queues, transport, dirty, .. } = activation;
        let mut eventq = None;
        let mut statusq = None;
        for q in queues {
            match q.index {
                EVENTQ => eventq = Some(q),
                STATUSQ => statusq = Some(q),
                _ => {}
            }
        }
        let Some(eventq) = eventq else {
            return Err(ActivateError::BadQueues {
                device: "virtio-input",
                reason: "the event queue is not enabled".into(),
            });
        };
        let (statusq, status_kick) = match statusq {
            Some(q) => (Some(q.queue), Some(q.kick)),
            None => (None, None),
        };
        let running = Arc::new(Running {
            mem,
            dirty,
            transport,
            state: Mutex::new(RunState {
                eventq: eventq.queue,
                statusq,
                broken: false,
                stopped: false,
            }),
        });
        if let Some(kick) = status_kick {
            let on_kick = running.clone();
            let leds = Arc::downgrade(&self.leds);
            let id = self
                .context
                .add_fd_with(
                    std::os::fd::AsRawFd::as_raw_fd(&*kick.clone()),
                    Interest::READ,
                    Box::new(move || {
                        drain_kick(&kick);
                        on_kick.serve_status(&leds);
                    }),
                )
                .map_err(|e| ActivateError::Io { device: "virtio-input", reason: e.to_string() })?;
            self.status_handler.lock().push(id);
        }
        *self.running.lock() = Some(running);
        self.set_active(true);
        Ok(())
    }

    fn reset(&self) {
        self.stop();
        self.set_active(false);
        *self.buttons.lock() = 0;
    }

    /// Events are written as they come, so nothing is in flight: the rings stand where
    /// the last report left them. The device keeps its place in the machine's input.
    fn park(&self) -> Option<Vec<QueuePosition>> {
        let running = self.stop()?;
        let st = running.state.lock();
        let mut positions = vec![QueuePosition::of(EVENTQ, &st.eventq, 0)];
        if let Some(q) = &st.statusq {
            positions.push(QueuePosition::of(STATUSQ, q, 0));
        }
        Some(positions)
    }

    /// QEMU migrates nothing of its own either (`VIRTIO_INPUT_VM_VERSION` 1); the LEDs go
    /// along, which QEMU's UI keeps instead.
    fn save_device(&self, section: &mut VmStateSection) -> Result<(), VmStateError> {
        section.put("input.leds", *self.leds.lock());
        Ok(())
    }

    fn load_device(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        *self.leds.lock() = section.get("input.leds")?;
        Ok(())
    }
}

/// The device while its driver runs it.
struct Running {
    mem: Arc<GuestMemoryMmap>,
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    state: Mutex<RunState>,
}

struct RunState {
    eventq: Queue,
    statusq: Option<Queue>,
    broken: bool,
    /// The device stopped (reset, VM stop): a sender that took the device before must
    /// not write any more.
    stopped: bool,
}

impl Running {
    fn send(&self, events: &[(u16, u16, i32)]) {
        let mut st = self.state.lock();
        if st.broken || st.stopped {
            return;
        }
        match self.write_events(&mut st, events) {
            Ok(true) => self.transport.signal_used_queue(EVENTQ),
            Ok(false) => {}
            Err(e) => self.fail(&mut st, EVENTQ, e),
        }
    }

    /// Whether the driver should hear of it.
    fn write_events(&self, st: &mut RunState, events: &[(u16, u16, i32)]) -> Result<bool, RingError> {
        let mem = &*self.mem;
        let avail = st.eventq.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
        let posted = avail.0.wrapping_sub(st.eventq.next_avail());
        if usize::from(posted) < events.len() {
            // An ordinary moment for a busy guest (QEMU only traces it).
            log::debug!("virtio-input: the event queue is full, a report dropped");
            return Ok(false);
        }
        for &(ty, code, value) in events {
            let Some(chain) = st.eventq.iter(self.mem.clone())?.next() else {
                break;
            };
            let head = chain.head_index();
            let written = chain.clone();
            let mut writer = Writer::new(mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
            let mut event = [0u8; EVENT_SIZE];
            event[0..2].copy_from_slice(&ty.to_le_bytes());
            event[2..4].copy_from_slice(&code.to_le_bytes());
            event[4..8].copy_from_slice(&value.to_le_bytes());
            // A short buffer takes what fits, as QEMU's iov_from_buf.
            let len = writer.available_bytes().min(EVENT_SIZE);
            std::io::Write::write_all(&mut writer, &event[..len])
                .map_err(|_| RingError::Chain("cannot write the event".into()))?;
            mark_chain_written(&self.dirty, &written);
            st.eventq.add_used(mem, head, len as u32)?;
        }
        Ok(st.eventq.needs_notification(mem)?)
    }

    /// The driver's status reports (QEMU's `virtio_input_handle_sts`): LED changes.
    fn serve_status(&self, leds: &Weak<Mutex<u8>>) {
        let mut st = self.state.lock();
        if st.broken || st.stopped {
            return;
        }
        let result = (|| -> Result<bool, RingError> {
            let mem = &*self.mem;
            let Some(q) = st.statusq.as_mut() else { return Ok(false) };
            let mut used = false;
            q.disable_notification(mem)?;
            while let Some(chain) = next_chain(q, &self.mem)? {
                let head = chain.head_index();
                let mut reader = Reader::new(mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
                let mut event = [0u8; EVENT_SIZE];
                let len = reader.available_bytes().min(EVENT_SIZE);
                std::io::Read::read_exact(&mut reader, &mut event[..len])
                    .map_err(|_| RingError::Chain("cannot read the status event".into()))?;
                let ty = u16::from_le_bytes([event[0], event[1]]);
                let code = u16::from_le_bytes([event[2], event[3]]);
                let value = u32::from_le_bytes([event[4], event[5], event[6], event[7]]);
                match (ty, leds.upgrade()) {
                    (EV_LED, Some(leds)) if code <= LED_SCROLLL => {
                        let mut l = leds.lock();
                        if value != 0 {
                            *l |= 1 << code;
                        } else {
                            *l &= !(1 << code);
                        }
                    }
                    (EV_LED, _) => {}
                    _ => GUEST_ERRORS.warn(|| format!("virtio-input: unknown status event type {ty}")),
                }
                // QEMU reports the bytes it read as the used length.
                q.add_used(mem, head, len as u32)?;
                used = true;
            }
            Ok(used && q.needs_notification(mem)?)
        })();
        match result {
            Ok(true) => self.transport.signal_used_queue(STATUSQ),
            Ok(false) => {}
            Err(e) => self.fail(&mut st, STATUSQ, e),
        }
    }

    fn fail(&self, st: &mut RunState, queue: u16, e: RingError) {
        if !st.broken {
            st.broken = true;
            GUEST_ERRORS.warn(|| format!("virtio-input: queue {queue}: {e}: device needs reset"));
            self.transport.mark_broken();
        }
    }
}
