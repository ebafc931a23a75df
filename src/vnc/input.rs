//! A VNC client's keyboard and pointer (QEMU's `do_key_event`, `pointer_event` in
//! `ui/vnc.c`): keysyms become key numbers through the keymap, QEMU's extended key events
//! carry the number itself, and pointer positions go to a tablet as they are (scaled to
//! the screen) or become the relative motion a mouse reports. Keys a client still holds are released when it goes.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use hw::core::input::{button, scale_axis};
use hw::core::services::MachineServices;

use super::keymap::{Keymap, DEFAULT_LAYOUT};

/// The layout, loaded on first use; `None` if it could not be (said once).
fn keymap() -> Option<&'static Keymap> {
    static KEYMAP: OnceLock<Option<Keymap>> = OnceLock::new();
    KEYMAP
        .get_or_init(|| match Keymap::load(DEFAULT_LAYOUT) {
            Ok(map) => Some(map),
            Err(e) => {
                log::warn!("vnc: {e}; keys arrive only from clients that send key codes");
                None
            }
        })
        .as_ref()
}

/// One client's input state.
pub struct ClientInput {
    services: Arc<MachineServices>,
    held: BTreeSet<u16>,
    last: Option<(u16, u16)>,
    /// The screen size the last position was on.
    size: (u32, u32),
    buttons: u8,
}

impl ClientInput {
    /// A client's input into `services`' devices.
    pub fn new(services: Arc<MachineServices>) -> ClientInput {
        ClientInput {
            services,
            held: BTreeSet::new(),
            last: None,
            size: (0, 0),
            buttons: 0,
        }
    }

    fn key(&mut self, qnum: u16, down: bool) {
        if down {
            self.held.insert(qnum);
        } else if !self.held.remove(&qnum) {
            // A release of a key this client never pressed (it was pressed before the
            // client connected, or the layout changed): nothing to release.
            return;
        }
        self.services.input().send_key(qnum, down);
    }

    /// `KeyEvent`: `keysym` went down or up.
    pub fn keysym(&mut self, keysym: u32, down: bool) {
        match keymap().and_then(|m| m.key_number(keysym)) {
            Some(qnum) => self.key(qnum, down),
            None => log::debug!("vnc: keysym 0x{keysym:x} has no key in the layout"),
        }
    }

    /// QEMU's extended key event: `keycode` is QEMU's key number; without one (0), the
    /// keysym decides.
    pub fn keycode(&mut self, keycode: u32, keysym: u32, down: bool) {
        match u16::try_from(keycode) {
            Ok(qnum) if qnum != 0 => self.key(qnum, down),
            _ => self.keysym(keysym, down),
        }
    }

    /// `PointerEvent`: the buttons in `mask` (1 left, 2 middle, 4 right, 8 and 16 the
    /// wheel) held at (`x`, `y`) of a screen `size` (width, height) pixels large.
    pub fn pointer(&mut self, mask: u8, x: u16, y: u16, size: (u32, u32)) {
        let (dx, dy) = match self.last {
            Some((lx, ly)) => (i32::from(x) - i32::from(lx), i32::from(y) - i32::from(ly)),
            None => (0, 0),
        };
        self.last = Some((x, y));
        self.size = size;
        let mut buttons = 0;
        for (bit, b) in [(1, button::LEFT), (2, button::MIDDLE), (4, button::RIGHT)] {
            if mask & bit != 0 {
                buttons |= b;
            }
        }
        let dz = match mask & 0x18 {
            0x08 => -1,
            0x10 => 1,
            _ => 0,
        };
        if dx == 0 && dy == 0 && dz == 0 && buttons == self.buttons {
            return;
        }
        self.buttons = buttons;
        let input = self.services.input();
        if input.is_absolute() {
            let (ax, ay) = (scale_axis(x.into(), size.0), scale_axis(y.into(), size.1));
            input.send_position(ax, ay, dz, buttons);
        } else {
            input.send_motion(dx, dy, dz, buttons);
        }
    }
}

impl Drop for ClientInput {
    /// QEMU's `qkbd_state_lift_all_keys`: a client that goes leaves no key down.
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        for qnum in held {
            self.services.input().send_key(qnum, false);
        }
        if self.buttons != 0 {
            let input = self.services.input();
            match self.last {
                Some((x, y)) if input.is_absolute() => {
                    let (w, h) = self.size;
                    input.send_position(scale_axis(x.into(), w), scale_axis(y.into(), h), 0, 0);
                }
                _ => input.send_motion(0, 0, 0, 0),
            }
        }
    }
}
