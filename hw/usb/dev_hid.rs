//! `usb-tablet`, `usb-mouse` and `usb-kbd` (QEMU's `hw/usb/dev-hid.c` and `hw/input/hid.c`):
//! USB human interface devices fed by the host's input (the VNC client's pointer and
//! keys, QMP's `input-send-event`). The tablet reports absolute positions, so the guest's
//! pointer follows the client's exactly (what virt-manager and OpenStack consoles add
//! it for); the mouse and keyboard speak the boot protocols firmware understands too.
//!
//! Each device queues up to 16 input events; the guest's polls of the interrupt endpoint
//! take them one report at a time and are NAKed while there is nothing new (or, with an
//! idle rate set, answered again with the current state once it expires).

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};

use crate::core::input::{button, InputHandlerId, KeyboardHandler, MouseHandler, TabletHandler};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::usb::desc::{config_attr, ep_type, Descriptors, DeviceIdentity, Endpoint, Interface};
use crate::usb::usb_bus::{pid, AttachedDevice, ControlRequest, Stall, TokenResult, UsbDevice, UsbFunction};

/// Events a device holds for the guest (QEMU's `QUEUE_LENGTH`).
const QUEUE_LENGTH: usize = 16;

/// HID class requests.
mod hid_request {
    pub const GET_REPORT: (u8, u8) = (0xa1, 0x01);
    pub const GET_IDLE: (u8, u8) = (0xa1, 0x02);
    pub const GET_PROTOCOL: (u8, u8) = (0xa1, 0x03);
    pub const SET_REPORT: (u8, u8) = (0x21, 0x09);
    pub const SET_IDLE: (u8, u8) = (0x21, 0x0a);
    pub const SET_PROTOCOL: (u8, u8) = (0x21, 0x0b);
    /// `GET_DESCRIPTOR` addressed to the interface: the HID and report descriptors.
    pub const GET_INTERFACE_DESCRIPTOR: (u8, u8) = (0x81, 0x06);
}

/// Class descriptor types.
const HID_DESCRIPTOR: u8 = 0x21;
const REPORT_DESCRIPTOR: u8 = 0x22;

/// A relative mouse with three buttons and a wheel.
const MOUSE_REPORT_DESCRIPTOR: &[u8] = &[
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x02, // Usage (Mouse)
    0xa1, 0x01, // Collection (Application)
    0x09, 0x01, //   Usage (Pointer)
    0xa1, 0x00, //   Collection (Physical)
    0x05, 0x09, //     Usage Page (Button)
    0x19, 0x01, //     Usage Minimum (1)
    0x29, 0x03, //     Usage Maximum (3)
    0x15, 0x00, //     Logical Minimum (0)
    0x25, 0x01, //     Logical Maximum (1)
    0x95, 0x03, //     Report Count (3)
    0x75, 0x01, //     Report Size (1)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x95, 0x01, //     Report Count (1)
    0x75, 0x05, //     Report Size (5)
    0x81, 0x01, //     Input (Constant)
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x30, //     Usage (X)
    0x09, 0x31, //     Usage (Y)
    0x09, 0x38, //     Usage (Wheel)
    0x15, 0x81, //     Logical Minimum (-127)
    0x25, 0x7f, //     Logical Maximum (127)
    0x75, 0x08, //     Report Size (8)
    0x95, 0x03, //     Report Count (3)
    0x81, 0x06, //     Input (Data, Variable, Relative)
    0xc0, //       End Collection
    0xc0, //     End Collection
];

/// An absolute pointer over 0..=0x7fff on both axes, three buttons and a wheel.
const TABLET_REPORT_DESCRIPTOR: &[u8] = &[
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x02, // Usage (Mouse)
    0xa1, 0x01, // Collection (Application)
    0x09, 0x01, //   Usage (Pointer)
    0xa1, 0x00, //   Collection (Physical)
    0x05, 0x09, //     Usage Page (Button)
    0x19, 0x01, //     Usage Minimum (1)
    0x29, 0x03, //     Usage Maximum (3)
    0x15, 0x00, //     Logical Minimum (0)
    0x25, 0x01, //     Logical Maximum (1)
    0x95, 0x03, //     Report Count (3)
    0x75, 0x01, //     Report Size (1)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x95, 0x01, //     Report Count (1)
    0x75, 0x05, //     Report Size (5)
    0x81, 0x01, //     Input (Constant)
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x30, //     Usage (X)
    0x09, 0x31, //     Usage (Y)
    0x15, 0x00, //     Logical Minimum (0)
    0x26, 0xff, 0x7f, // Logical Maximum (0x7fff)
    0x35, 0x00, //     Physical Minimum (0)
    0x46, 0xff, 0x7f, // Physical Maximum (0x7fff)
    0x75, 0x10, //     Report Size (16)
    0x95, 0x02, //     Report Count (2)
    0x81, 0x02, //     Input (Data, Variable, Absolute)
    0x05, 0x01, //     Usage Page (Generic Desktop)
    0x09, 0x38, //     Usage (Wheel)
    0x15, 0x81, //     Logical Minimum (-127)
    0x25, 0x7f, //     Logical Maximum (127)
    0x35, 0x00, //     Physical Minimum (the logical ones)
    0x45, 0x00, //     Physical Maximum
    0x75, 0x08, //     Report Size (8)
    0x95, 0x01, //     Report Count (1)
    0x81, 0x06, //     Input (Data, Variable, Relative)
    0xc0, //       End Collection
    0xc0, //     End Collection
];

/// The boot keyboard of the HID specification (appendix B.1): modifiers, a reserved byte,
/// six keys; five LEDs out.
const KEYBOARD_REPORT_DESCRIPTOR: &[u8] = &[
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x06, // Usage (Keyboard)
    0xa1, 0x01, // Collection (Application)
    0x75, 0x01, //   Report Size (1)
    0x95, 0x08, //   Report Count (8)
    0x05, 0x07, //   Usage Page (Key Codes)
    0x19, 0xe0, //   Usage Minimum (224)
    0x29, 0xe7, //   Usage Maximum (231)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0x01, //   Logical Maximum (1)
    0x81, 0x02, //   Input (Data, Variable, Absolute): the modifiers
    0x95, 0x01, //   Report Count (1)
    0x75, 0x08, //   Report Size (8)
    0x81, 0x01, //   Input (Constant): reserved
    0x95, 0x05, //   Report Count (5)
    0x75, 0x01, //   Report Size (1)
    0x05, 0x08, //   Usage Page (LEDs)
    0x19, 0x01, //   Usage Minimum (1)
    0x29, 0x05, //   Usage Maximum (5)
    0x91, 0x02, //   Output (Data, Variable, Absolute): the LEDs
    0x95, 0x01, //   Report Count (1)
    0x75, 0x03, //   Report Size (3)
    0x91, 0x01, //   Output (Constant): padding
    0x95, 0x06, //   Report Count (6)
    0x75, 0x08, //   Report Size (8)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0xff, //   Logical Maximum (255)
    0x05, 0x07, //   Usage Page (Key Codes)
    0x19, 0x00, //   Usage Minimum (0)
    0x29, 0xff, //   Usage Maximum (255)
    0x81, 0x00, //   Input (Data, Array): the keys
    0xc0, //     End Collection
];

/// Which device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum HidKind {
    Mouse,
    Tablet,
    Keyboard,
}

impl HidKind {
    fn report_descriptor(self) -> &'static [u8] {
        match self {
            HidKind::Mouse => MOUSE_REPORT_DESCRIPTOR,
            HidKind::Tablet => TABLET_REPORT_DESCRIPTOR,
            HidKind::Keyboard => KEYBOARD_REPORT_DESCRIPTOR,
        }
    }

    /// QEMU's product strings and serial numbers.
    fn product(self) -> (&'static str, &'static str) {
        match self {
            HidKind::Mouse => ("QEMU USB Mouse", "89126"),
            HidKind::Tablet => ("QEMU USB Tablet", "28754"),
            HidKind::Keyboard => ("QEMU USB Keyboard", "68284"),
        }
    }

    /// Interface subclass and protocol: the boot mouse and keyboard; a tablet has none.
    fn interface_class(self) -> (u8, u8, u8) {
        match self {
            HidKind::Mouse => (3, 1, 2),
            HidKind::Tablet => (3, 0, 0),
            HidKind::Keyboard => (3, 1, 1),
        }
    }
}

/// One queued pointer state: a position (tablet) or motion to report (mouse).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PointerEvent {
    x: i32,
    y: i32,
    dz: i32,
    /// HID button bits: 1 left, 2 right, 4 middle.
    buttons: u8,
}

/// What the device holds (QEMU's `HIDState`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct HidState {
    /// 0 boot protocol, 1 report protocol.
    protocol: u8,
    /// Idle rate in 4 ms units (0: report only changes).
    idle: u8,
    pointer: VecDeque<PointerEvent>,
    /// The last position reported (tablet), the buttons held.
    current: PointerEvent,
    /// Key numbers pressed (bit 15 set: released), in order.
    keys: VecDeque<u16>,
    modifiers: u8,
    /// Keys down, as HID usages.
    pressed: Vec<u8>,
    leds: u8,
    #[serde(skip)]
    last_report: Option<Instant>,
}

impl Default for HidState {
    fn default() -> Self {
        HidState {
            protocol: 1,
            idle: 0,
            pointer: VecDeque::new(),
            current: PointerEvent::default(),
            keys: VecDeque::new(),
            modifiers: 0,
            pressed: Vec::new(),
            leds: 0,
            last_report: None,
        }
    }
}

/// A HID device's model.
struct Hid {
    kind: HidKind,
    descriptors: Descriptors,
    state: Mutex<HidState>,
    attached: OnceLock<Weak<AttachedDevice>>,
    /// Puts the pointer first among the machine's (QEMU's `hid_pointer_activate`), once
    /// the guest's driver uses it.
    activate: OnceLock<Box<dyn Fn() + Send + Sync>>,
    activated: std::sync::atomic::AtomicBool,
}

fn hid_buttons(buttons: u8) -> u8 {
    let mut b = 0;
    for (ours, hid) in [(button::LEFT, 1), (button::RIGHT, 2), (button::MIDDLE, 4)] {
        if buttons & ours != 0 {
            b |= hid;
        }
    }
    b
}

impl Hid {
    fn new(kind: HidKind, usb_version: u32, serial: Option<String>) -> Hid {
        let (product, default_serial) = kind.product();
        let report = kind.report_descriptor();
        let [rl, rh] = (report.len() as u16).to_le_bytes();
        let descriptors = Descriptors::new(
            DeviceIdentity {
                vendor: 0x0627,
                product: 0x0001,
                bcd_device: 0,
                bcd_usb: if usb_version >= 2 { 0x0200 } else { 0x0100 },
                strings: [
                    "QEMU".into(),
                    product.into(),
                    serial.unwrap_or_else(|| default_serial.into()),
                ],
            },
            config_attr::REMOTE_WAKEUP,
            100,
            &[Interface {
                class: kind.interface_class(),
                class_descriptors: vec![9, HID_DESCRIPTOR, 0x11, 0x01, 0, 1, REPORT_DESCRIPTOR, rl, rh],
                endpoints: vec![Endpoint {
                    address: 0x81,
                    kind: ep_type::INTERRUPT,
                    max_packet: 8,
                    interval: 10,
                }],
            }],
        );
        Hid {
            kind,
            descriptors,
            state: Mutex::new(HidState::default()),
            attached: OnceLock::new(),
            activate: OnceLock::new(),
            activated: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The guest's driver polls or sets an idle rate: a pointer starts getting the
    /// host's events.
    fn driver_uses_it(&self) {
        if !self.activated.swap(true, std::sync::atomic::Ordering::AcqRel) {
            if let Some(activate) = self.activate.get() {
                activate();
            }
        }
    }

    /// Tells a suspended host there is input (remote wakeup).
    fn wakeup(&self) {
        if let Some(dev) = self.attached.get().and_then(Weak::upgrade) {
            dev.wakeup();
        }
    }

    /// QEMU's `hid_pointer_event` and `hid_pointer_sync`: an event joins the last queued
    /// one while the buttons stay the same, else takes a new slot (the last slot when
    /// the queue is full).
    fn pointer_event(&self, ev: PointerEvent, relative: bool) {
        let mut st = self.state.lock();
        let join = st.pointer.back().is_some_and(|last| last.buttons == ev.buttons) || st.pointer.len() == QUEUE_LENGTH;
        match st.pointer.back_mut() {
            Some(last) if join => {
                if relative {
                    last.x = last.x.saturating_add(ev.x);
                    last.y = last.y.saturating_add(ev.y);
                } else {
                    last.x = ev.x;
                    last.y = ev.y;
                }
                last.dz = last.dz.saturating_add(ev.dz);
                last.buttons = ev.buttons;
            }
            _ => st.pointer.push_back(ev),
        }
        drop(st);
        self.wakeup();
    }

    /// Whether an idle rate says the current state is due again.
    fn idle_due(st: &HidState) -> bool {
        st.idle != 0
            && st
                .last_report
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(4 * u64::from(st.idle)))
    }

    /// The next report, or `None` when there is nothing to say (NAK). `always` answers
    /// with the current state when nothing changed (GET_REPORT).
    fn poll(&self, always: bool) -> Option<Vec<u8>> {
        let mut st = self.state.lock();
        let report = match self.kind {
            HidKind::Keyboard => {
                if let Some(key) = st.keys.pop_front() {
                    st.process_key(key);
                } else if !always && !Self::idle_due(&st) {
                    return None;
                }
                st.keyboard_report()
            }
            HidKind::Mouse | HidKind::Tablet => {
                let ev = match st.pointer.front().copied() {
                    Some(ev) => ev,
                    None if always || Self::idle_due(&st) => PointerEvent {
                        x: if self.kind == HidKind::Tablet { st.current.x } else { 0 },
                        y: if self.kind == HidKind::Tablet { st.current.y } else { 0 },
                        dz: 0,
                        buttons: st.current.buttons,
                    },
                    None => return None,
                };
                let clamp = |v: i32| v.clamp(-127, 127);
                let (dx, dy, dz) = (clamp(ev.x), clamp(ev.y), clamp(ev.dz));
                if let Some(front) = st.pointer.front_mut() {
                    // Motion beyond a report's range stays queued for the next.
                    if self.kind == HidKind::Mouse {
                        front.x -= dx;
                        front.y -= dy;
                    }
                    front.dz -= dz;
                    if (self.kind == HidKind::Tablet || (front.x == 0 && front.y == 0)) && front.dz == 0 {
                        st.pointer.pop_front();
                    }
                }
                st.current.buttons = ev.buttons;
                // The wheel counts up (away from the user) where ours counts down.
                let wheel = (-dz) as i8 as u8;
                if self.kind == HidKind::Tablet {
                    st.current.x = ev.x;
                    st.current.y = ev.y;
                    let [xl, xh] = (ev.x as u16).to_le_bytes();
                    let [yl, yh] = (ev.y as u16).to_le_bytes();
                    vec![ev.buttons, xl, xh, yl, yh, wheel]
                } else {
                    vec![ev.buttons, dx as i8 as u8, dy as i8 as u8, wheel]
                }
            }
        };
        st.last_report = Some(Instant::now());
        Some(report)
    }

    fn key_event(&self, qnum: u16, down: bool) {
        if qnum > 0xff {
            log::debug!("usb-kbd: key number {qnum:#x} out of range, dropped");
            return;
        }
        let mut st = self.state.lock();
        if st.keys.len() >= QUEUE_LENGTH {
            // Full: a press is dropped, its release cancels it; a release of a key
            // already reported still goes (a key must not stay down), up to twice the
            // queue.
            if down {
                log::debug!("usb-kbd: queue full, key {qnum:#x} dropped");
                return;
            }
            if let Some(at) = st.keys.iter().rposition(|&k| k == qnum) {
                st.keys.remove(at);
                return;
            }
            if st.keys.len() >= 2 * QUEUE_LENGTH {
                return;
            }
        }
        st.keys.push_back(qnum | if down { 0 } else { 0x8000 });
        drop(st);
        self.wakeup();
    }
}

impl HidState {
    /// QEMU's `hid_keyboard_process_keycode`: one queued key into the modifiers or the
    /// keys held.
    fn process_key(&mut self, key: u16) {
        let down = key & 0x8000 == 0;
        let Some(usage) = hid_usage(key & 0x7fff) else {
            return;
        };
        if (0xe0..=0xe7).contains(&usage) {
            let bit = 1 << (usage - 0xe0);
            if down {
                self.modifiers |= bit;
            } else {
                self.modifiers &= !bit;
            }
        } else if down {
            if !self.pressed.contains(&usage) {
                self.pressed.push(usage);
            }
        } else {
            self.pressed.retain(|&u| u != usage);
        }
    }

    /// The boot report: modifiers, reserved, six keys (all 0x01, "rollover", when more
    /// are held).
    fn keyboard_report(&self) -> Vec<u8> {
        let mut report = vec![self.modifiers, 0, 0, 0, 0, 0, 0, 0];
        if self.pressed.len() > 6 {
            report[2..].fill(0x01);
        } else {
            report[2..2 + self.pressed.len()].copy_from_slice(&self.pressed);
        }
        report
    }
}

/// A key number (the PC's scancode set 1, 0x80 added for 0xe0-prefixed codes) as a HID
/// keyboard usage (HID Usage Tables, page 7).
fn hid_usage(qnum: u16) -> Option<u8> {
    const PLAIN: [u8; 0x80] = {
        let mut t = [0u8; 0x80];
        let pairs: &[(usize, u8)] = &[
            (0x01, 0x29), (0x02, 0x1e), (0x03, 0x1f), (0x04, 0x20), (0x05, 0x21), (0x06, 0x22),
            (0x07, 0x23), (0x08, 0x24), (0x09, 0x25), (0x0a, 0x26), (0x0b, 0x27), (0x0c, 0x2d),
            (0x0d, 0x2e), (0x0e, 0x2a), (0x0f, 0x2b), (0x10, 0x14), (0x11, 0x1a), (0x12, 0x08),
            (0x13, 0x15), (0x14, 0x17), (0x15, 0x1c), (0x16, 0x18), (0x17, 0x0c), (0x18, 0x12),
            (0x19, 0x13), (0x1a, 0x2f), (0x1b, 0x30), (0x1c, 0x28), (0x1d, 0xe0), (0x1e, 0x04),
            (0x1f, 0x16), (0x20, 0x07), (0x21, 0x09), (0x22, 0x0a), (0x23, 0x0b), (0x24, 0x0d),
            (0x25, 0x0e), (0x26, 0x0f), (0x27, 0x33), (0x28, 0x34), (0x29, 0x35), (0x2a, 0xe1),
            (0x2b, 0x31), (0x2c, 0x1d), (0x2d, 0x1b), (0x2e, 0x06), (0x2f, 0x19), (0x30, 0x05),
            (0x31, 0x11), (0x32, 0x10), (0x33, 0x36), (0x34, 0x37), (0x35, 0x38), (0x36, 0xe5),
            (0x37, 0x55), (0x38, 0xe2), (0x39, 0x2c), (0x3a, 0x39), (0x3b, 0x3a), (0x3c, 0x3b),
            (0x3d, 0x3c), (0x3e, 0x3d), (0x3f, 0x3e), (0x40, 0x3f), (0x41, 0x40), (0x42, 0x41),
            (0x43, 0x42), (0x44, 0x43), (0x45, 0x53), (0x46, 0x47), (0x47, 0x5f), (0x48, 0x60),
            (0x49, 0x61), (0x4a, 0x56), (0x4b, 0x5c), (0x4c, 0x5d), (0x4d, 0x5e), (0x4e, 0x57),
            (0x4f, 0x59), (0x50, 0x5a), (0x51, 0x5b), (0x52, 0x62), (0x53, 0x63), (0x54, 0x46),
            (0x56, 0x64), (0x57, 0x44), (0x58, 0x45), (0x59, 0x67), (0x70, 0x88), (0x73, 0x87),
            (0x79, 0x8a), (0x7b, 0x8b), (0x7d, 0x89), (0x7e, 0x85),
        ];
        let mut i = 0;
        while i < pairs.len() {
            t[pairs[i].0] = pairs[i].1;
            i += 1;
        }
        t
    };
    let usage = match qnum {
        0..=0x7f => PLAIN[usize::from(qnum)],
        0x9c => 0x58, // keypad Enter
        0x9d => 0xe4, // right Ctrl
        0xa0 => 0x7f, // mute
        0xae => 0x81, // volume down
        0xb0 => 0x80, // volume up
        0xb5 => 0x54, // keypad /
        0xb7 => 0x46, // Print Screen
        0xb8 => 0xe6, // right Alt
        0xc6 => 0x48, // Pause
        0xc7 => 0x4a, // Home
        0xc8 => 0x52, // Up
        0xc9 => 0x4b, // Page Up
        0xcb => 0x50, // Left
        0xcd => 0x4f, // Right
        0xcf => 0x4d, // End
        0xd0 => 0x51, // Down
        0xd1 => 0x4e, // Page Down
        0xd2 => 0x49, // Insert
        0xd3 => 0x4c, // Delete
        0xdb => 0xe3, // left GUI
        0xdc => 0xe7, // right GUI
        0xdd => 0x65, // Menu
        0xde => 0x66, // Power
        _ => 0,
    };
    (usage != 0).then_some(usage)
}

impl UsbFunction for Hid {
    fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    fn control(&self, req: &ControlRequest, data: &[u8]) -> Result<Vec<u8>, Stall> {
        match req.kind() {
            hid_request::GET_INTERFACE_DESCRIPTOR => match (req.value >> 8) as u8 {
                REPORT_DESCRIPTOR => Ok(self.kind.report_descriptor().to_vec()),
                HID_DESCRIPTOR => Ok(self.descriptors.config[18..27].to_vec()),
                _ => Err(Stall),
            },
            hid_request::GET_REPORT => Ok(self.poll(true).unwrap_or_default()),
            hid_request::SET_REPORT if self.kind == HidKind::Keyboard => {
                // The LEDs the guest lights (Caps Lock...): kept, shown nowhere.
                if let Some(&leds) = data.first() {
                    self.state.lock().leds = leds;
                }
                Ok(Vec::new())
            }
            hid_request::GET_IDLE => Ok(vec![self.state.lock().idle]),
            hid_request::SET_IDLE => {
                self.driver_uses_it();
                let mut st = self.state.lock();
                st.idle = (req.value >> 8) as u8;
                st.last_report = Some(Instant::now());
                Ok(Vec::new())
            }
            hid_request::GET_PROTOCOL => Ok(vec![self.state.lock().protocol]),
            hid_request::SET_PROTOCOL => {
                self.state.lock().protocol = (req.value & 1) as u8;
                Ok(Vec::new())
            }
            _ => Err(Stall),
        }
    }

    fn data(&self, pid_code: u8, ep: u8, buf: &mut [u8]) -> TokenResult {
        if pid_code != pid::IN || ep != 1 {
            return TokenResult::Stall;
        }
        self.driver_uses_it();
        match self.poll(false) {
            Some(report) => {
                let n = report.len().min(buf.len());
                buf[..n].copy_from_slice(&report[..n]);
                TokenResult::Done(n)
            }
            None => TokenResult::Nak,
        }
    }

    fn reset(&self) {
        // QEMU's `hid_reset`: no queued input, no key down, report protocol, no idle rate.
        *self.state.lock() = HidState::default();
    }
}

impl TabletHandler for Hid {
    fn position(&self, x: u16, y: u16, dz: i32, buttons: u8) {
        let ev = PointerEvent {
            x: x.into(),
            y: y.into(),
            dz,
            buttons: hid_buttons(buttons),
        };
        self.pointer_event(ev, false);
    }
}

impl MouseHandler for Hid {
    fn motion(&self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        let ev = PointerEvent {
            x: dx,
            y: dy,
            dz,
            buttons: hid_buttons(buttons),
        };
        self.pointer_event(ev, true);
    }
}

impl KeyboardHandler for Hid {
    fn key(&self, qnum: u16, down: bool) {
        self.key_event(qnum, down);
    }
}

/// The part the three device types share: the model, its input registration.
#[derive(Default)]
struct HidDevice {
    hid: OnceLock<Arc<Hid>>,
    input: OnceLock<InputHandlerId>,
}

impl HidDevice {
    fn realize(&self, usb: &UsbDevice, ctx: &DeviceContext, kind: HidKind, usb_version: u32) -> Result<(), RealizeError> {
        if !(1..=2).contains(&usb_version) {
            return Err(RealizeError::device(HidError::UsbVersion(usb_version)));
        }
        let services = ctx.machine()?;
        let hid = Arc::new(Hid::new(kind, usb_version, usb.serial()));
        let attached = usb.attach_function(ctx, hid.clone(), kind.product().0)?;
        let _ = hid.attached.set(Arc::downgrade(&attached));
        let input = services.input();
        let id = match kind {
            HidKind::Tablet => input.register_tablet("QEMU HID Tablet", hid.clone()),
            HidKind::Mouse => input.register_mouse("QEMU HID Mouse", hid.clone()),
            HidKind::Keyboard => input.register_keyboard(hid.clone()),
        };
        if kind != HidKind::Keyboard {
            let machine = Arc::downgrade(services);
            let _ = hid.activate.set(Box::new(move || {
                if let Some(m) = machine.upgrade() {
                    m.input().activate(id);
                }
            }));
        }
        let _ = self.input.set(id);
        let _ = self.hid.set(hid);
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let (Some(id), Ok(services)) = (self.input.get(), ctx.machine()) {
            services.input().unregister(*id);
        }
    }

    fn save(&self, usb: &UsbDevice) -> VmStateSection {
        let mut s = VmStateSection::new(1);
        usb.save_core(&mut s);
        if let Some(hid) = self.hid.get() {
            s.put("hid", &*hid.state.lock());
        }
        s
    }

    fn load(&self, usb: &UsbDevice, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let mut hs: HidState = state.get("hid")?;
        if hs.pointer.len() > QUEUE_LENGTH || hs.keys.len() > 2 * QUEUE_LENGTH || hs.pressed.len() > 256 {
            return Err(VmStateError::BadField {
                field: "hid".into(),
                reason: "queue longer than the device's".into(),
            });
        }
        // Checked before anything is loaded: a bad section changes nothing.
        usb.load_core(state)?;
        hs.last_report = None;
        if let Some(hid) = self.hid.get() {
            *hid.state.lock() = hs;
        }
        Ok(())
    }
}

/// Why a HID device could not be realized.
#[derive(Debug, thiserror::Error)]
enum HidError {
    #[error("usb_version {0} is not supported (1 or 2)")]
    UsbVersion(u32),
}

/// Declares one of the three HID device types.
macro_rules! hid_device_type {
    ($ty:ident, $name:literal, $kind:expr, $desc:literal) => {
        #[doc = concat!("QEMU's `", $name, "`.")]
        #[derive(qom::Object)]
        #[qom(name = $name)]
        pub struct $ty {
            #[parent]
            parent: UsbDevice,
            #[property(name = "usb_version", default = 2u32, desc = "USB version the device reports (1 or 2)")]
            usb_version: Prop<u32>,
            hid: HidDevice,
        }

        type_init!($ty);

        impl DeviceImpl for $ty {
            const DESCRIPTION: Option<&'static str> = Some($desc);
            const CATEGORY: DeviceCategory = DeviceCategory::Input;

            fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
                self.hid.realize(&self.parent, ctx, $kind, self.usb_version.get())
            }

            fn unrealize(&self, ctx: &DeviceContext) {
                self.hid.unrealize(ctx);
                DeviceImpl::unrealize(&self.parent, ctx);
            }

            fn save_state(&self) -> Result<VmStateSection, VmStateError> {
                Ok(self.hid.save(&self.parent))
            }

            fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
                self.hid.load(&self.parent, state)
            }
        }
    };
}

hid_device_type!(UsbTablet, "usb-tablet", HidKind::Tablet, "QEMU USB Tablet");
hid_device_type!(UsbMouse, "usb-mouse", HidKind::Mouse, "QEMU USB Mouse");
hid_device_type!(UsbKbd, "usb-kbd", HidKind::Keyboard, "QEMU USB Keyboard");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mouse_motion_beyond_a_report_spreads_over_several() {
        let hid = Hid::new(HidKind::Mouse, 2, None);
        assert!(hid.poll(false).is_none(), "nothing to say: NAK");
        hid.motion(300, -5, 0, button::LEFT);
        assert_eq!(hid.poll(false).unwrap(), vec![1, 127, (-5i8) as u8, 0]);
        assert_eq!(hid.poll(false).unwrap(), vec![1, 127, 0, 0]);
        assert_eq!(hid.poll(false).unwrap(), vec![1, 46, 0, 0]);
        assert!(hid.poll(false).is_none());
    }

    #[test]
    fn tablet_positions_join_while_buttons_stay_and_the_wheel_counts_up() {
        let hid = Hid::new(HidKind::Tablet, 2, None);
        hid.position(100, 200, 0, 0);
        hid.position(0x7fff, 300, 1, 0);
        hid.position(0x7fff, 300, 0, button::RIGHT);
        assert_eq!(hid.poll(false).unwrap(), vec![0, 0xff, 0x7f, 0x2c, 0x01, 0xff]);
        assert_eq!(hid.poll(false).unwrap(), vec![2, 0xff, 0x7f, 0x2c, 0x01, 0]);
        assert!(hid.poll(false).is_none());
        assert_eq!(hid.poll(true).unwrap(), vec![2, 0xff, 0x7f, 0x2c, 0x01, 0], "GET_REPORT: the state");
    }

    #[test]
    fn keys_report_one_event_per_poll_with_modifiers_and_rollover() {
        let hid = Hid::new(HidKind::Keyboard, 2, None);
        hid.key(0x2a, true); // left shift
        hid.key(0x1e, true); // a
        hid.key(0x1e, false);
        assert_eq!(hid.poll(false).unwrap(), vec![0x02, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(hid.poll(false).unwrap(), vec![0x02, 0, 0x04, 0, 0, 0, 0, 0]);
        assert_eq!(hid.poll(false).unwrap(), vec![0x02, 0, 0, 0, 0, 0, 0, 0]);
        assert!(hid.poll(false).is_none());
        for k in [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0xc8] {
            hid.key(k, true);
        }
        let last = (0..7).map(|_| hid.poll(false).unwrap()).last().unwrap();
        assert_eq!(last, vec![0x02, 0, 1, 1, 1, 1, 1, 1]);
        assert_eq!(hid_usage(0xc8), Some(0x52));
        assert_eq!(hid_usage(0x7f), None);
    }

    #[test]
    fn the_hid_descriptor_sits_in_the_configuration_and_names_the_report() {
        for kind in [HidKind::Mouse, HidKind::Tablet, HidKind::Keyboard] {
            let hid = Hid::new(kind, 1, Some("s".into()));
            let d = &hid.descriptors.config[18..27];
            assert_eq!(d[1], HID_DESCRIPTOR);
            assert_eq!(usize::from(u16::from_le_bytes([d[7], d[8]])), kind.report_descriptor().len());
            assert_eq!(hid.descriptors.strings[2], "s");
        }
    }
}
