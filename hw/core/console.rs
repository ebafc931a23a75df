//! Graphic consoles (QEMU's `ui/console.c`: `graphic_console_init`, `QemuConsole`,
//! `DisplaySurface`, `qemu_console_lookup_by_index`/`_by_device`): a display device
//! registers one console per head with the machine; monitors (`screendump`) and, later,
//! the VNC server ask a console for its current picture.

use std::sync::Arc;

use parking_lot::Mutex;
use qom::{ObjectRef, WeakObjectRef};

/// A picture: `width` x `height` pixels, each `0x00RRGGBB`, row after row (QEMU's
/// `DisplaySurface` in `PIXMAN_x8r8g8b8`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Surface {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The pixels.
    pub pixels: Vec<u32>,
}

impl Surface {
    /// A black surface.
    pub fn new(width: u32, height: u32) -> Surface {
        Surface {
            width,
            height,
            pixels: vec![0; width as usize * height as usize],
        }
    }

    /// Row `y`.
    pub fn row(&self, y: u32) -> &[u32] {
        let w = self.width as usize;
        &self.pixels[y as usize * w..(y as usize + 1) * w]
    }

    /// Row `y`, to draw into.
    pub fn row_mut(&mut self, y: u32) -> &mut [u32] {
        let w = self.width as usize;
        &mut self.pixels[y as usize * w..(y as usize + 1) * w]
    }

    /// Draws one row of a character cell at (`x`, `y`) (QEMU's `vga_draw_glyph8/9/16`):
    /// the 8 bits of `bits`, most significant first, in `fg` where set and `bg` where not;
    /// a 9-pixel cell repeats bit 0 in its ninth column if `dup9` (line-drawing
    /// characters) and has `bg` there otherwise; a 16-pixel cell doubles each bit. Pixels
    /// outside the surface are not drawn.
    #[allow(clippy::too_many_arguments)]
    pub fn put_glyph_row(&mut self, x: u32, y: u32, bits: u8, cw: u32, dup9: bool, fg: u32, bg: u32) {
        if y >= self.height {
            return;
        }
        let width = self.width;
        let row = self.row_mut(y);
        let mut put = |dx: u32, on: bool| {
            if x + dx < width {
                row[(x + dx) as usize] = if on { fg } else { bg };
            }
        };
        for i in 0..8 {
            let on = bits & (0x80 >> i) != 0;
            if cw == 16 {
                put(2 * i, on);
                put(2 * i + 1, on);
            } else {
                put(i, on);
            }
        }
        if cw == 9 {
            put(8, dup9 && bits & 1 != 0);
        }
    }
}

/// What a display device does for its console (QEMU's `GraphicHwOps::gfx_update`): the
/// picture it shows now.
pub trait GraphicHwOps: Send + Sync {
    /// Renders the device's current picture.
    fn gfx_update(&self) -> Surface;
}

/// A graphic console: one head of a display device (QEMU's `QemuConsole`).
pub struct QemuConsole {
    index: u32,
    head: u32,
    device: WeakObjectRef,
    hw: Arc<dyn GraphicHwOps>,
}

impl QemuConsole {
    /// The console's number, in the order consoles were made.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device's head it shows.
    pub fn head(&self) -> u32 {
        self.head
    }

    /// The device it belongs to, while it exists.
    pub fn device(&self) -> Option<ObjectRef> {
        self.device.upgrade()
    }

    /// The picture now (QEMU's `graphic_hw_update` then `qemu_console_surface`).
    pub fn update(&self) -> Surface {
        self.hw.gfx_update()
    }
}

/// A machine's consoles (QEMU's `consoles` list).
#[derive(Default)]
pub struct ConsoleList {
    consoles: Mutex<Vec<Arc<QemuConsole>>>,
    next_index: Mutex<u32>,
}

impl ConsoleList {
    /// Adds a console for `head` of `device` (QEMU's `graphic_console_init`).
    pub fn add(&self, device: &ObjectRef, head: u32, hw: Arc<dyn GraphicHwOps>) -> Arc<QemuConsole> {
        let mut next = self.next_index.lock();
        let console = Arc::new(QemuConsole {
            index: *next,
            head,
            device: device.downgrade(),
            hw,
        });
        *next += 1;
        self.consoles.lock().push(console.clone());
        console
    }

    /// Removes `console` (its device is going away).
    pub fn remove(&self, console: &Arc<QemuConsole>) {
        self.consoles.lock().retain(|c| !Arc::ptr_eq(c, console));
    }

    /// The first graphic console (QEMU's `qemu_console_lookup_by_index(0)`).
    pub fn first(&self) -> Option<Arc<QemuConsole>> {
        self.consoles.lock().first().cloned()
    }

    /// The console showing `head` of `device` (QEMU's `qemu_console_lookup_by_device`).
    pub fn by_device(&self, device: &ObjectRef, head: u32) -> Option<Arc<QemuConsole>> {
        self.consoles
            .lock()
            .iter()
            .find(|c| c.head == head && c.device().is_some_and(|d| Arc::ptr_eq(&d, device)))
            .cloned()
    }

    /// Every console.
    pub fn all(&self) -> Vec<Arc<QemuConsole>> {
        self.consoles.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyph_rows_of_8_9_and_16_pixels() {
        let mut s = Surface::new(40, 1);
        s.put_glyph_row(0, 0, 0b1000_0001, 8, false, 1, 2);
        assert_eq!(s.row(0)[..8], [1, 2, 2, 2, 2, 2, 2, 1]);
        s.put_glyph_row(8, 0, 0b0000_0001, 9, true, 1, 2);
        assert_eq!(s.row(0)[15..17], [1, 1]);
        s.put_glyph_row(8, 0, 0b0000_0001, 9, false, 1, 2);
        assert_eq!(s.row(0)[15..17], [1, 2]);
        s.put_glyph_row(17, 0, 0b1100_0000, 16, false, 1, 2);
        assert_eq!(s.row(0)[17..23], [1, 1, 1, 1, 2, 2]);
        // Past the right edge and the bottom: clipped.
        s.put_glyph_row(36, 0, 0xff, 8, false, 3, 3);
        s.put_glyph_row(0, 5, 0xff, 8, false, 3, 3);
        assert_eq!(s.row(0)[39], 3);
    }
}
