//! Graphic consoles (QEMU's `ui/console.c`: `graphic_console_init`, `QemuConsole`,
//! `DisplaySurface`, `qemu_console_lookup_by_index`/`_by_device`): a display device
//! registers one console per head with the machine; monitors (`screendump`) and the VNC
//! server ask a console for its current picture.
//!
//! A console keeps the last picture and, per row, the generation in which it last
//! changed (QEMU's `dpy_gfx_update` rectangles, as rows): a device that knows what
//! changed redraws only that ([`GraphicHwOps::gfx_refresh`]), and each viewer asks what
//! changed since the generation it has, so several viewers share one render.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// What a refresh changed in a console's picture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redraw {
    /// Nothing.
    Nothing,
    /// Everything (a new mode, palette or start address: QEMU's `full_update`).
    Full,
    /// These rows only.
    Rows(Vec<Range<u32>>),
}

/// What a display device does for its console (QEMU's `GraphicHwOps::gfx_update`).
pub trait GraphicHwOps: Send + Sync {
    /// Renders the device's current picture.
    fn gfx_update(&self) -> Surface;

    /// Puts the display in the 80x25 colour text mode a VGA BIOS leaves, with `font` (256
    /// glyphs of 16 rows), as firmware would before a kernel starts (the board does it in
    /// the firmware's place under a direct kernel boot); false where the display has no
    /// such mode.
    fn set_bios_text_mode(&self, _font: &[u8]) -> bool {
        false
    }

    /// Brings `surface` (the picture of the previous call) up to date and says what
    /// changed; a device without dirty tracking renders it all.
    fn gfx_refresh(&self, surface: &mut Arc<Surface>) -> Redraw {
        *surface = Arc::new(self.gfx_update());
        Redraw::Full
    }
}

/// A console's picture and what changed in it (see [`QemuConsole::refresh`]).
#[derive(Clone, Debug)]
pub struct ConsoleUpdate {
    /// The picture now; unchanged pixels are shared with earlier updates.
    pub surface: Arc<Surface>,
    /// Its generation, to ask about the next changes.
    pub generation: u64,
    /// The rows that changed since the generation asked about (all rows if none was).
    pub changed_rows: Vec<Range<u32>>,
}

/// The last picture and each row's generation.
struct ConsoleState {
    surface: Arc<Surface>,
    generation: u64,
    row_generation: Vec<u64>,
}

/// A graphic console: one head of a display device (QEMU's `QemuConsole`).
pub struct QemuConsole {
    index: u32,
    head: u32,
    device: WeakObjectRef,
    hw: Arc<dyn GraphicHwOps>,
    /// Held across a render, so viewers refreshing at once render once each in turn.
    state: Mutex<ConsoleState>,
    /// Rows the device reported redrawn, in all (tests: an idle screen redraws none).
    rows_redrawn: AtomicU64,
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

    /// See [`GraphicHwOps::set_bios_text_mode`].
    pub fn set_bios_text_mode(&self, font: &[u8]) -> bool {
        self.hw.set_bios_text_mode(font)
    }

    /// The picture now (QEMU's `graphic_hw_update` then `qemu_console_surface`).
    pub fn update(&self) -> Surface {
        (*self.refresh(None).surface).clone()
    }

    /// Refreshes the picture and says which rows changed since generation `since` (all of
    /// them for `None`, or when the size changed).
    pub fn refresh(&self, since: Option<u64>) -> ConsoleUpdate {
        let mut state = self.state.lock();
        let before = (state.surface.width, state.surface.height);
        let mut redraw = self.hw.gfx_refresh(&mut state.surface);
        let (width, height) = (state.surface.width, state.surface.height);
        if (width, height) != before || state.row_generation.len() != height as usize {
            redraw = Redraw::Full;
            state.row_generation = vec![0; height as usize];
        }
        let redrawn = match &redraw {
            Redraw::Nothing => 0,
            Redraw::Full => u64::from(height),
            Redraw::Rows(rows) => rows.iter().map(|r| u64::from(r.end - r.start)).sum(),
        };
        if redraw != Redraw::Nothing {
            state.generation += 1;
            let generation = state.generation;
            match redraw {
                Redraw::Rows(rows) => {
                    for r in rows {
                        let end = r.end.min(height) as usize;
                        let start = (r.start as usize).min(end);
                        state.row_generation[start..end].fill(generation);
                    }
                }
                _ => state.row_generation.fill(generation),
            }
        }
        self.rows_redrawn.fetch_add(redrawn, Ordering::Relaxed);
        let mut changed_rows: Vec<Range<u32>> = Vec::new();
        for (y, g) in state.row_generation.iter().enumerate() {
            if since.is_none_or(|s| *g > s) {
                let y = y as u32;
                match changed_rows.last_mut() {
                    Some(last) if last.end == y => last.end = y + 1,
                    _ => changed_rows.push(y..y + 1),
                }
            }
        }
        ConsoleUpdate {
            surface: state.surface.clone(),
            generation: state.generation,
            changed_rows,
        }
    }

    /// Rows the device redrew so far, in all refreshes.
    pub fn rows_redrawn(&self) -> u64 {
        self.rows_redrawn.load(Ordering::Relaxed)
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
            state: Mutex::new(ConsoleState {
                surface: Arc::new(Surface::new(0, 0)),
                generation: 0,
                row_generation: Vec::new(),
            }),
            rows_redrawn: AtomicU64::new(0),
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
// Row ranges are what is compared here, one range as often as several.
#[allow(clippy::single_range_in_vec_init)]
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

    /// A device that reports the rows it is told to.
    struct Scripted(Mutex<Vec<Redraw>>);

    impl GraphicHwOps for Scripted {
        fn gfx_update(&self) -> Surface {
            Surface::new(4, 10)
        }
        fn gfx_refresh(&self, surface: &mut Arc<Surface>) -> Redraw {
            if surface.width == 0 {
                *surface = Arc::new(self.gfx_update());
            }
            self.0.lock().remove(0)
        }
    }

    #[test]
    fn viewers_see_the_rows_changed_since_their_generation() {
        let list = ConsoleList::default();
        let device = qom::object_new("container").unwrap();
        let script = vec![Redraw::Full, Redraw::Rows(vec![2..4]), Redraw::Nothing, Redraw::Rows(vec![7..8])];
        let console = list.add(&device, 0, Arc::new(Scripted(Mutex::new(script))));
        let first = console.refresh(None);
        assert_eq!(first.changed_rows, [0..10]);
        let second = console.refresh(Some(first.generation));
        assert_eq!(second.changed_rows, [2..4]);
        // Nothing new: a viewer that has the last generation sees no change, an older one
        // still sees what it missed.
        let third = console.refresh(Some(second.generation));
        assert!(third.changed_rows.is_empty());
        let fourth = console.refresh(Some(first.generation));
        assert_eq!(fourth.changed_rows, [2..4, 7..8]);
        assert_eq!(console.rows_redrawn(), 10 + 2 + 1);
    }
}
