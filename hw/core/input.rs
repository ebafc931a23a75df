//! Host input into the machine (QEMU's `ui/input.c`): user interfaces (the VNC server) and
//! the monitor (`input-send-event`, `send-key`) send key and pointer events; the machine's
//! input devices (the i8042's PS/2 keyboard and mouse, the USB HID devices) register as
//! their handlers. Keys travel as QEMU's key numbers ("qnum": the PC's scancode set 1
//! code, `0x80` added for the codes that follow an `0xe0` prefix), the numbering of QEMU's
//! keymaps. Pointers are relative (a mouse) or absolute (a tablet, whose axes run from 0 to
//! [`ABS_MAX`] across the screen).

use std::sync::Arc;

use parking_lot::Mutex;

/// The largest absolute coordinate (QEMU's `INPUT_EVENT_ABS_MAX`): the screen's far edge.
pub const ABS_MAX: u16 = 0x7fff;

/// A device that takes key presses (QEMU's `QemuInputHandler` with `INPUT_EVENT_MASK_KEY`).
pub trait KeyboardHandler: Send + Sync {
    /// Key `qnum` went down or up.
    fn key(&self, qnum: u16, down: bool);
}

/// Pointer buttons, as a bit mask.
pub mod button {
    /// The left button.
    pub const LEFT: u8 = 1;
    /// The middle button.
    pub const MIDDLE: u8 = 2;
    /// The right button.
    pub const RIGHT: u8 = 4;
}

/// A device that takes relative pointer motion (QEMU's `INPUT_EVENT_MASK_REL` handlers:
/// the PS/2 mouse, `usb-mouse`).
pub trait MouseHandler: Send + Sync {
    /// The pointer moved by (`dx`, `dy`) (right and down positive), the wheel by `dz`
    /// (down positive), with `buttons` (a [`button`] mask) held.
    fn motion(&self, dx: i32, dy: i32, dz: i32, buttons: u8);
}

/// A device that takes absolute pointer positions (QEMU's `INPUT_EVENT_MASK_ABS`
/// handlers: `usb-tablet`).
pub trait TabletHandler: Send + Sync {
    /// The pointer is at (`x`, `y`), each 0..=[`ABS_MAX`], the wheel moved by `dz` (down
    /// positive), with `buttons` held.
    fn position(&self, x: u16, y: u16, dz: i32, buttons: u8);
}

/// Identifies a registered handler, to activate or unregister it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputHandlerId(u64);

/// Keyboards, newest last: the newest gets the keys (a keyboard is active from the
/// start, as QEMU activates USB keyboards at once); unregistering it hands them back.
struct HandlerList<T: ?Sized> {
    handlers: Mutex<Vec<(InputHandlerId, Arc<T>)>>,
}

impl<T: ?Sized> Default for HandlerList<T> {
    fn default() -> Self {
        HandlerList {
            handlers: Mutex::new(Vec::new()),
        }
    }
}

impl<T: ?Sized> HandlerList<T> {
    fn push(&self, id: InputHandlerId, handler: Arc<T>) {
        self.handlers.lock().push((id, handler));
    }

    fn remove(&self, id: InputHandlerId) {
        self.handlers.lock().retain(|(i, _)| *i != id);
    }

    /// The handler that gets the events, taken out of the lock so it can be called freely.
    fn current(&self) -> Option<Arc<T>> {
        self.handlers.lock().last().map(|(_, h)| Arc::clone(h))
    }
}

/// A pointing device: relative or absolute.
#[derive(Clone)]
enum Pointer {
    Mouse(Arc<dyn MouseHandler>),
    Tablet(Arc<dyn TabletHandler>),
}

/// A registered pointer: its id, its handler's name (QEMU's `QemuInputHandler.name`,
/// which `query-mice` shows) and the device.
type PointerEntry = (InputHandlerId, &'static str, Pointer);

/// One pointer as QMP's `query-mice` lists it (QEMU's `MouseInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MouseInfo {
    /// The handler's number, counted from 1 over every input handler registered.
    pub index: u64,
    /// The handler's name (`QEMU PS/2 Mouse`, `QEMU HID Tablet`...).
    pub name: &'static str,
    /// Whether it gets the pointer events (the first pointer).
    pub current: bool,
    /// Whether it takes absolute positions (a tablet).
    pub absolute: bool,
}

/// The machine's input handlers.
///
/// Pointers are QEMU's handler list: a new one goes last and a device moves first when
/// its guest driver starts using it (QEMU's `qemu_input_handler_activate`: the USB
/// tablet's first poll). Motion goes to the first mouse, positions to the first tablet,
/// and a user interface sends positions when the first pointer is a tablet. So the PS/2
/// mouse keeps working under firmware and installers that never drive the tablet.
#[derive(Default)]
pub struct InputHandlers {
    next_id: std::sync::atomic::AtomicU64,
    keyboard: HandlerList<dyn KeyboardHandler>,
    pointers: Mutex<Vec<PointerEntry>>,
    /// The pointer as last sent: buttons held, absolute position.
    pointer: Mutex<(u8, u16, u16)>,
}

impl InputHandlers {
    /// A new handler's id: 1, 2, ... over keyboards and pointers alike, as QEMU numbers
    /// its handlers (`query-mice`'s `index`).
    fn new_id(&self) -> InputHandlerId {
        InputHandlerId(
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
        )
    }

    /// An id for a handler registered later with [`InputHandlers::register_keyboard_as`]:
    /// a device that numbers its handler when it is created, as QEMU's do, but takes the
    /// keys only while its driver runs.
    pub fn reserve_id(&self) -> InputHandlerId {
        self.new_id()
    }

    /// Makes `handler` the keyboard.
    pub fn register_keyboard(&self, handler: Arc<dyn KeyboardHandler>) -> InputHandlerId {
        let id = self.new_id();
        self.keyboard.push(id, handler);
        id
    }

    /// Makes `handler` the keyboard under an id from [`InputHandlers::reserve_id`].
    pub fn register_keyboard_as(&self, id: InputHandlerId, handler: Arc<dyn KeyboardHandler>) {
        self.keyboard.remove(id);
        self.keyboard.push(id, handler);
    }

    /// Adds a relative pointer named `name`, after the others until
    /// [`InputHandlers::activate`].
    pub fn register_mouse(
        &self,
        name: &'static str,
        handler: Arc<dyn MouseHandler>,
    ) -> InputHandlerId {
        let id = self.new_id();
        self.pointers
            .lock()
            .push((id, name, Pointer::Mouse(handler)));
        id
    }

    /// Adds an absolute pointer named `name`, after the others until
    /// [`InputHandlers::activate`].
    pub fn register_tablet(
        &self,
        name: &'static str,
        handler: Arc<dyn TabletHandler>,
    ) -> InputHandlerId {
        let id = self.new_id();
        self.pointers
            .lock()
            .push((id, name, Pointer::Tablet(handler)));
        id
    }

    /// QEMU's `qmp_query_mice`: the pointers, the last in line first, the current one (the
    /// first in line) marked.
    pub fn mice(&self) -> Vec<MouseInfo> {
        let pointers = self.pointers.lock();
        pointers
            .iter()
            .enumerate()
            .rev()
            .map(|(at, (id, name, p))| MouseInfo {
                index: id.0,
                name,
                current: at == 0,
                absolute: matches!(p, Pointer::Tablet(_)),
            })
            .collect()
    }

    /// QEMU's `qemu_input_handler_activate`: the pointer `id` goes first.
    pub fn activate(&self, id: InputHandlerId) {
        let mut pointers = self.pointers.lock();
        if let Some(at) = pointers.iter().position(|(i, _, _)| *i == id) {
            let entry = pointers.remove(at);
            pointers.insert(0, entry);
        }
    }

    /// QEMU's `qemu_input_handler_deactivate`: the pointer `id` goes last (its driver
    /// stopped using it).
    pub fn deactivate(&self, id: InputHandlerId) {
        let mut pointers = self.pointers.lock();
        if let Some(at) = pointers.iter().position(|(i, _, _)| *i == id) {
            let entry = pointers.remove(at);
            pointers.push(entry);
        }
    }

    /// Takes back a registration (a device that goes).
    pub fn unregister(&self, id: InputHandlerId) {
        self.keyboard.remove(id);
        self.pointers.lock().retain(|(i, _, _)| *i != id);
    }

    /// QEMU's `qemu_input_event_send_key_number`: nothing happens without a keyboard.
    pub fn send_key(&self, qnum: u16, down: bool) {
        if let Some(h) = self.keyboard.current() {
            h.key(qnum, down);
        }
    }

    fn first_mouse(&self) -> Option<Arc<dyn MouseHandler>> {
        self.pointers.lock().iter().find_map(|(_, _, p)| match p {
            Pointer::Mouse(m) => Some(Arc::clone(m)),
            Pointer::Tablet(_) => None,
        })
    }

    fn first_tablet(&self) -> Option<Arc<dyn TabletHandler>> {
        self.pointers.lock().iter().find_map(|(_, _, p)| match p {
            Pointer::Tablet(t) => Some(Arc::clone(t)),
            Pointer::Mouse(_) => None,
        })
    }

    /// Relative pointer motion for the first mouse, if there is one.
    pub fn send_motion(&self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        self.pointer.lock().0 = buttons;
        if let Some(h) = self.first_mouse() {
            h.motion(dx, dy, dz, buttons);
        }
    }

    /// An absolute position for the first tablet, if there is one; coordinates beyond
    /// [`ABS_MAX`] are the far edge.
    pub fn send_position(&self, x: u16, y: u16, dz: i32, buttons: u8) {
        let (x, y) = (x.min(ABS_MAX), y.min(ABS_MAX));
        *self.pointer.lock() = (buttons, x, y);
        if let Some(h) = self.first_tablet() {
            h.position(x, y, dz, buttons);
        }
    }

    /// The pointer as last sent: the buttons held and the absolute position, for input
    /// that changes only some of it (QMP's `input-send-event`).
    pub fn pointer_state(&self) -> (u8, u16, u16) {
        *self.pointer.lock()
    }

    /// Whether a keyboard is registered.
    pub fn has_keyboard(&self) -> bool {
        self.keyboard.current().is_some()
    }

    /// QEMU's `qemu_input_is_absolute`: whether the first pointer is a tablet, so a user
    /// interface should send positions rather than motion.
    pub fn is_absolute(&self) -> bool {
        matches!(
            self.pointers.lock().first(),
            Some((_, _, Pointer::Tablet(_)))
        )
    }
}

/// Scales a screen coordinate `v` of an axis `size` pixels long to 0..=[`ABS_MAX`] (QEMU's
/// `qemu_input_scale_axis`).
pub fn scale_axis(v: u32, size: u32) -> u16 {
    if size <= 1 {
        return 0;
    }
    let v = u64::from(v.min(size - 1));
    (v * u64::from(ABS_MAX) / u64::from(size - 1)) as u16
}

/// QEMU's `QKeyCode` names (QMP's `qcode` keys, HMP's `sendkey`) and their key numbers
/// (QEMU's `qemu_input_map_qcode_to_qnum`).
const QCODES: &[(&str, u16)] = &[
    ("esc", 0x01), ("1", 0x02), ("2", 0x03), ("3", 0x04), ("4", 0x05), ("5", 0x06),
    ("6", 0x07), ("7", 0x08), ("8", 0x09), ("9", 0x0a), ("0", 0x0b), ("minus", 0x0c),
    ("equal", 0x0d), ("backspace", 0x0e), ("tab", 0x0f), ("q", 0x10), ("w", 0x11),
    ("e", 0x12), ("r", 0x13), ("t", 0x14), ("y", 0x15), ("u", 0x16), ("i", 0x17),
    ("o", 0x18), ("p", 0x19), ("bracket_left", 0x1a), ("bracket_right", 0x1b),
    ("ret", 0x1c), ("ctrl", 0x1d), ("a", 0x1e), ("s", 0x1f), ("d", 0x20), ("f", 0x21),
    ("g", 0x22), ("h", 0x23), ("j", 0x24), ("k", 0x25), ("l", 0x26), ("semicolon", 0x27),
    ("apostrophe", 0x28), ("grave_accent", 0x29), ("shift", 0x2a), ("backslash", 0x2b),
    ("z", 0x2c), ("x", 0x2d), ("c", 0x2e), ("v", 0x2f), ("b", 0x30), ("n", 0x31),
    ("m", 0x32), ("comma", 0x33), ("dot", 0x34), ("slash", 0x35), ("shift_r", 0x36),
    ("kp_multiply", 0x37), ("alt", 0x38), ("spc", 0x39), ("caps_lock", 0x3a), ("f1", 0x3b),
    ("f2", 0x3c), ("f3", 0x3d), ("f4", 0x3e), ("f5", 0x3f), ("f6", 0x40), ("f7", 0x41),
    ("f8", 0x42), ("f9", 0x43), ("f10", 0x44), ("num_lock", 0x45), ("scroll_lock", 0x46),
    ("kp_7", 0x47), ("kp_8", 0x48), ("kp_9", 0x49), ("kp_subtract", 0x4a), ("kp_4", 0x4b),
    ("kp_5", 0x4c), ("kp_6", 0x4d), ("kp_add", 0x4e), ("kp_1", 0x4f), ("kp_2", 0x50),
    ("kp_3", 0x51), ("kp_0", 0x52), ("kp_decimal", 0x53), ("sysrq", 0x54), ("less", 0x56),
    ("f11", 0x57), ("f12", 0x58), ("kp_equals", 0x59), ("hiragana", 0x70), ("ro", 0x73),
    ("henkan", 0x79), ("muhenkan", 0x7b), ("yen", 0x7d), ("kp_comma", 0x7e),
    ("kp_enter", 0x9c), ("ctrl_r", 0x9d), ("audiomute", 0xa0), ("volumedown", 0xae),
    ("volumeup", 0xb0), ("kp_divide", 0xb5), ("print", 0xb7), ("alt_r", 0xb8),
    ("pause", 0xc6), ("home", 0xc7), ("up", 0xc8), ("pgup", 0xc9), ("left", 0xcb),
    ("right", 0xcd), ("end", 0xcf), ("down", 0xd0), ("pgdn", 0xd1), ("insert", 0xd2),
    ("delete", 0xd3), ("meta_l", 0xdb), ("meta_r", 0xdc), ("menu", 0xdd), ("power", 0xde),
];

/// The key number of a `QKeyCode` name, if it has one.
pub fn qcode_to_qnum(name: &str) -> Option<u16> {
    QCODES.iter().find(|(n, _)| *n == name).map(|&(_, q)| q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counter(AtomicU32);
    impl MouseHandler for Counter {
        fn motion(&self, _: i32, _: i32, _: i32, _: u8) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Tablet;
    impl TabletHandler for Tablet {
        fn position(&self, _: u16, _: u16, _: i32, _: u8) {}
    }

    #[test]
    fn a_pointer_gets_events_once_activated_until_it_goes() {
        let input = InputHandlers::default();
        let (ps2, usb) = (Arc::new(Counter(AtomicU32::new(0))), Arc::new(Counter(AtomicU32::new(0))));
        input.register_mouse("ps2", ps2.clone());
        let id = input.register_mouse("usb", usb.clone());
        input.send_motion(1, 0, 0, 0);
        input.activate(id);
        input.send_motion(1, 0, 0, 0);
        input.unregister(id);
        input.send_motion(1, 0, 0, 0);
        assert_eq!(ps2.0.load(Ordering::Relaxed), 2, "first and last");
        assert_eq!(usb.0.load(Ordering::Relaxed), 1, "once active");
        let tablet = input.register_tablet("tablet", Arc::new(Tablet));
        assert!(!input.is_absolute(), "a tablet nobody drives yet");
        input.activate(tablet);
        assert!(input.is_absolute());
    }

    #[test]
    fn mice_are_listed_as_qemus_query_mice_lists_them() {
        struct Keys;
        impl KeyboardHandler for Keys {
            fn key(&self, _: u16, _: bool) {}
        }
        let input = InputHandlers::default();
        let mouse = Arc::new(Counter(AtomicU32::new(0)));
        input.register_keyboard(Arc::new(Keys));
        input.register_mouse("QEMU PS/2 Mouse", mouse);
        let reserved = input.reserve_id();
        let tablet = input.register_tablet("QEMU HID Tablet", Arc::new(Tablet));
        let info = |index, name, current, absolute| MouseInfo {
            index,
            name,
            current,
            absolute,
        };
        // Numbered from 1 over every handler, the last in line first.
        assert_eq!(
            input.mice(),
            vec![
                info(4, "QEMU HID Tablet", false, true),
                info(2, "QEMU PS/2 Mouse", true, false),
            ]
        );
        input.activate(tablet);
        assert_eq!(
            input.mice(),
            vec![
                info(2, "QEMU PS/2 Mouse", false, false),
                info(4, "QEMU HID Tablet", true, true),
            ]
        );
        input.register_keyboard_as(reserved, Arc::new(Keys));
        input.unregister(reserved);
        assert!(input.has_keyboard(), "the first keyboard stays");
        input.unregister(tablet);
        assert_eq!(input.mice(), vec![info(2, "QEMU PS/2 Mouse", true, false)]);
    }

    #[test]
    fn qcodes_name_their_scancodes() {
        assert_eq!(qcode_to_qnum("ctrl"), Some(0x1d));
        assert_eq!(qcode_to_qnum("delete"), Some(0xd3));
        assert_eq!(qcode_to_qnum("nosuchkey"), None);
        let mut qnums: Vec<u16> = QCODES.iter().map(|&(_, q)| q).collect();
        qnums.sort_unstable();
        qnums.dedup();
        assert_eq!(qnums.len(), QCODES.len(), "one name per key");
    }

    #[test]
    fn axes_scale_to_the_far_edge() {
        assert_eq!(scale_axis(0, 640), 0);
        assert_eq!(scale_axis(639, 640), ABS_MAX);
        assert_eq!(scale_axis(5000, 640), ABS_MAX);
        assert_eq!(scale_axis(3, 1), 0);
    }
}
