//! Host input into the machine (QEMU's `ui/input.c`): user interfaces (the VNC server)
//! send key and pointer events; the machine's input devices (the i8042's PS/2 keyboard
//! and mouse) register as their handlers. Keys travel as QEMU's key numbers ("qnum":
//! the PC's scancode set 1 code, `0x80` added for the codes that follow an `0xe0`
//! prefix), the numbering of QEMU's keymaps.

use std::sync::Arc;

use parking_lot::Mutex;

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
/// the PS/2 mouse).
pub trait MouseHandler: Send + Sync {
    /// The pointer moved by (`dx`, `dy`) (right and down positive), the wheel by `dz`
    /// (down positive), with `buttons` (a [`button`] mask) held.
    fn motion(&self, dx: i32, dy: i32, dz: i32, buttons: u8);
}

/// The machine's input handlers: the last registered of each kind gets the events
/// (QEMU's handler list, most recent first).
#[derive(Default)]
pub struct InputHandlers {
    keyboard: Mutex<Option<Arc<dyn KeyboardHandler>>>,
    mouse: Mutex<Option<Arc<dyn MouseHandler>>>,
}

impl InputHandlers {
    /// Makes `handler` the keyboard.
    pub fn register_keyboard(&self, handler: Arc<dyn KeyboardHandler>) {
        *self.keyboard.lock() = Some(handler);
    }

    /// Makes `handler` the mouse.
    pub fn register_mouse(&self, handler: Arc<dyn MouseHandler>) {
        *self.mouse.lock() = Some(handler);
    }

    /// QEMU's `qemu_input_event_send_key_number`: nothing happens without a keyboard.
    pub fn send_key(&self, qnum: u16, down: bool) {
        let handler = self.keyboard.lock().clone();
        if let Some(h) = handler {
            h.key(qnum, down);
        }
    }

    /// Relative pointer motion for the mouse, if there is one.
    pub fn send_motion(&self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        let handler = self.mouse.lock().clone();
        if let Some(h) = handler {
            h.motion(dx, dy, dz, buttons);
        }
    }

    /// Whether a keyboard is registered.
    pub fn has_keyboard(&self) -> bool {
        self.keyboard.lock().is_some()
    }
}
