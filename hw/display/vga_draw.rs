//! Rendering the VGA into an RGB surface (QEMU's `vga_update_display` with
//! `vga_draw_text`, `vga_draw_graphic`, `vga_draw_blank` and the line and glyph helpers of
//! `vga-helpers.h`): text modes from the font in plane 2 with the cursor and the 16-colour
//! palette through the attribute controller and the DAC, planar 16-colour and CGA 4-colour
//! modes, the 256-colour mode 13h, and VBE framebuffers of 8, 15, 16, 24 and 32 bits per
//! pixel (either byte order).
//!
//! Each render reads the registers once and video memory line by line. [`render`] draws
//! everything; [`refresh`] (the console's) keeps the last picture and redraws only the
//! scan lines whose video memory pages were written since (QEMU's `DIRTY_MEMORY_VGA`):
//! the vCPUs' writes from the accelerator's dirty log, the VMM's from [`Vram`]'s own
//! bits. A new mode, palette, start address or line length redraws all (QEMU's
//! `full_update`); a text screen is redrawn whole when any page was written. Unlike QEMU,
//! the text cursor does not blink: it is drawn whenever it is on, so a screendump does not
//! depend on the moment.

use std::ops::Range;
use std::sync::Arc;

use crate::core::console::{Redraw, Surface};
use crate::display::vga::{
    att, crtc, gfx, plane_mask, seq, vbe, VgaCommon, VgaRegs, Vram, VRAM_PAGE_SIZE,
};

/// QEMU's `CH_ATTR_SIZE`: text screens of more cells are not drawn.
const MAX_TEXT_CELLS: u32 = 160 * 100;
/// The most pixels a surface gets (a 16384 x 4096 screen); taller screens are cut, as
/// nothing shows 256 MiB images.
const MAX_PIXELS: u64 = 1 << 26;

/// QEMU's `c6_to_8`: a 6-bit DAC value widened to 8 bits.
pub fn c6_to_8(v: u8) -> u8 {
    let v = v & 0x3f;
    let b = v & 1;
    (v << 2) | (b << 1) | b
}

/// A surface pixel (0xRRGGBB).
pub fn rgb(r: u8, g: u8, b: u8) -> u32 {
    (u32::from(r) << 16) | (u32::from(g) << 8) | u32::from(b)
}

/// QEMU's `update_palette16`: the 16 attribute palette entries through the colour select
/// register and the DAC.
fn palette16(r: &VgaRegs) -> [u32; 16] {
    let mut out = [0u32; 16];
    for (i, entry) in out.iter_mut().enumerate() {
        let v = r.ar[i];
        let v = if r.ar[att::MODE] & 0x80 != 0 {
            ((r.ar[att::COLOR_PAGE] & 0xf) << 4) | (v & 0xf)
        } else {
            ((r.ar[att::COLOR_PAGE] & 0xc) << 4) | (v & 0x3f)
        };
        let at = usize::from(v) * 3;
        *entry = rgb(
            c6_to_8(r.palette[at]),
            c6_to_8(r.palette[at + 1]),
            c6_to_8(r.palette[at + 2]),
        );
    }
    out
}

/// QEMU's `update_palette256`: the DAC, 6 or 8 bits per component.
fn palette256(r: &VgaRegs) -> Vec<u32> {
    r.palette
        .chunks(3)
        .map(|c| {
            if r.dac_8bit {
                rgb(c[0], c[1], c[2])
            } else {
                rgb(c6_to_8(c[0]), c6_to_8(c[1]), c6_to_8(c[2]))
            }
        })
        .collect()
}

/// What a VGA with extensions changes in the drawing (QEMU's `VGACommonState` hooks
/// `get_bpp`, `get_params`, `get_resolution` and `cursor_draw_line`): the std VGA answers
/// from its VBE registers ([`StdVgaDraw`]), the Cirrus from its extended registers.
pub trait DrawHooks {
    /// Bits per pixel of the graphic modes with shift control 2 and up; 0 for the VGA's
    /// 256-colour mode (each pixel twice).
    fn bpp(&self, r: &VgaRegs) -> u32;
    /// Bytes per line, start address (in dwords), line compare.
    fn offsets(&self, r: &VgaRegs) -> (u32, u32, u32);
    /// Width and height in pixels of the graphic modes.
    fn resolution(&self, r: &VgaRegs) -> (u32, u32);
    /// Draws a hardware cursor over scan line `y` (already drawn in `line`).
    fn draw_cursor_line(&self, _vram: &Vram, _y: u32, _line: &mut [u32]) {}
}

/// The std VGA's answers: VBE modes, else the VGA registers.
pub struct StdVgaDraw;

impl DrawHooks for StdVgaDraw {
    fn bpp(&self, r: &VgaRegs) -> u32 {
        if r.vbe_enabled() {
            u32::from(r.vbe_regs[vbe::INDEX_BPP])
        } else {
            0
        }
    }

    /// QEMU's `vga_get_params`.
    fn offsets(&self, r: &VgaRegs) -> (u32, u32, u32) {
        if r.vbe_enabled() {
            (r.vbe_line_offset, r.vbe_start_addr, 65535)
        } else {
            vga_offsets(r)
        }
    }

    /// QEMU's `vga_get_resolution`.
    fn resolution(&self, r: &VgaRegs) -> (u32, u32) {
        if r.vbe_enabled() {
            (
                u32::from(r.vbe_regs[vbe::INDEX_XRES]),
                u32::from(r.vbe_regs[vbe::INDEX_YRES]),
            )
        } else {
            ((u32::from(r.cr[crtc::H_DISP]) + 1) * 8, vertical_display_end(r))
        }
    }
}

/// The VGA registers' bytes per line, start address (in dwords) and line compare.
pub fn vga_offsets(r: &VgaRegs) -> (u32, u32, u32) {
    let line_offset = u32::from(r.cr[crtc::OFFSET]) << 3;
    let start = u32::from(r.cr[crtc::START_LO]) | (u32::from(r.cr[crtc::START_HI]) << 8);
    (line_offset, start, line_compare(r))
}

/// The line compare value from CR18 and its overflow bits.
pub fn line_compare(r: &VgaRegs) -> u32 {
    u32::from(r.cr[crtc::LINE_COMPARE])
        | ((u32::from(r.cr[crtc::OVERFLOW]) & 0x10) << 4)
        | ((u32::from(r.cr[crtc::MAX_SCAN]) & 0x40) << 3)
}

/// The vertical display end + 1 from CR12 and the overflow bits.
pub fn vertical_display_end(r: &VgaRegs) -> u32 {
    (u32::from(r.cr[crtc::V_DISP_END])
        | ((u32::from(r.cr[crtc::OVERFLOW]) & 0x02) << 7)
        | ((u32::from(r.cr[crtc::OVERFLOW]) & 0x40) << 3))
        + 1
}

/// Renders the std VGA as it would show now (QEMU's `vga_update_display`, always a full
/// update).
pub fn render(vga: &VgaCommon) -> Surface {
    render_with(vga, &StdVgaDraw)
}

/// Renders a VGA whose extensions `hooks` describe.
pub fn render_with(vga: &VgaCommon, hooks: &dyn DrawHooks) -> Surface {
    let regs = vga.regs.lock().clone();
    let mut display = vga.display.lock();
    let drawn = if regs.ar_index & att::PAS == 0 {
        None
    } else if regs.gr[gfx::MISC] & 0x01 == 0 {
        draw_text(&regs, &vga.vram, hooks)
    } else {
        Some(draw_graphic(&regs, &vga.vram, hooks))
    };
    match drawn {
        Some(surface) => {
            display.width = surface.width;
            display.height = surface.height;
            surface
        }
        None => Surface::new(display.width, display.height),
    }
}

/// What a picture was drawn from; when it changes everything is redrawn.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FrameKey {
    /// Black, at the last size.
    Blank(u32, u32),
    /// A text screen: the registers it depends on.
    Text(Vec<u8>),
    /// A graphic mode's layout and palette.
    Graphic(GraphicLayout),
}

/// What [`refresh`] keeps between calls (QEMU's `last_*` fields of `VGACommonState`).
#[derive(Debug, Default)]
pub struct RenderCache {
    key: Option<FrameKey>,
    /// Scan lines drawn by [`refresh`] so far (an idle screen draws none).
    pub lines_drawn: u64,
}

/// The registers a text screen is drawn from (not the indices, the DAC's state or the
/// status the guest polls, which change nothing on the screen).
fn text_key(r: &VgaRegs) -> Vec<u8> {
    let mut key = Vec::with_capacity(512 + r.palette.len());
    key.extend_from_slice(&r.cr);
    key.extend_from_slice(&r.ar);
    key.extend_from_slice(&r.gr);
    key.extend_from_slice(&r.sr);
    key.extend_from_slice(&r.sr_vbe);
    key.extend_from_slice(&r.palette);
    key.extend_from_slice(&[r.msr, u8::from(r.dac_8bit)]);
    key
}

/// Brings `surface` (what the previous call returned) up to date. `guest_writes` are the
/// offsets of the video memory pages the vCPUs wrote since the previous call (the
/// accelerator's dirty log), `None` when the accelerator cannot say: then all is redrawn.
pub fn refresh(
    vga: &VgaCommon,
    cache: &mut RenderCache,
    guest_writes: Option<&[u64]>,
    surface: &mut Arc<Surface>,
) -> Redraw {
    let regs = vga.regs.lock().clone();
    let pages = vga.vram.size().div_ceil(VRAM_PAGE_SIZE);
    let mut dirty = vec![0u64; pages.div_ceil(64) as usize];
    vga.vram.take_dirty(&mut dirty);
    for offset in guest_writes.unwrap_or_default() {
        let page = offset / VRAM_PAGE_SIZE;
        if page < pages {
            dirty[(page / 64) as usize] |= 1 << (page % 64);
        }
    }
    let any_dirty = guest_writes.is_none() || dirty.iter().any(|w| *w != 0);
    let graphic = regs.ar_index & att::PAS != 0 && regs.gr[gfx::MISC] & 0x01 != 0;
    if graphic {
        let layout = graphic_layout(&regs, &StdVgaDraw);
        let key = Some(FrameKey::Graphic(layout.clone()));
        let same_size = (surface.width, surface.height) == (layout.disp_width, layout.height);
        let mut display = vga.display.lock();
        (display.width, display.height) = (layout.disp_width, layout.height);
        if cache.key == key && same_size && guest_writes.is_some() {
            if !any_dirty {
                return Redraw::Nothing;
            }
            let size = vga.vram.size();
            let target = Arc::make_mut(surface);
            let rows = draw_graphic_lines(&regs, &vga.vram, &StdVgaDraw, &layout, target, |addr, len| {
                touches_dirty_page(&dirty, size, addr, len)
            });
            cache.lines_drawn += rows.iter().map(|r| u64::from(r.end - r.start)).sum::<u64>();
            return if rows.is_empty() {
                Redraw::Nothing
            } else {
                Redraw::Rows(rows)
            };
        }
        let mut fresh = Surface::new(layout.disp_width, layout.height);
        draw_graphic_lines(&regs, &vga.vram, &StdVgaDraw, &layout, &mut fresh, |_, _| true);
        cache.lines_drawn += u64::from(layout.height);
        cache.key = key;
        *surface = Arc::new(fresh);
        return Redraw::Full;
    }
    if regs.ar_index & att::PAS != 0 {
        let key = Some(FrameKey::Text(text_key(&regs)));
        if cache.key == key && !any_dirty {
            return Redraw::Nothing;
        }
        if let Some(text) = draw_text(&regs, &vga.vram, &StdVgaDraw) {
            let mut display = vga.display.lock();
            (display.width, display.height) = (text.width, text.height);
            cache.lines_drawn += u64::from(text.height);
            cache.key = key;
            *surface = Arc::new(text);
            return Redraw::Full;
        }
    }
    let display = *vga.display.lock();
    let key = Some(FrameKey::Blank(display.width, display.height));
    if cache.key == key && (surface.width, surface.height) == (display.width, display.height) {
        return Redraw::Nothing;
    }
    cache.key = key;
    *surface = Arc::new(Surface::new(display.width, display.height));
    Redraw::Full
}

/// Whether `len` bytes of video memory (of `size` bytes) from `addr`, wrapping at its
/// end, touch a page set in `dirty`.
fn touches_dirty_page(dirty: &[u64], size: u64, addr: u64, len: usize) -> bool {
    let mut at = addr & (size - 1);
    let mut left = len as u64;
    while left > 0 {
        let page = at / VRAM_PAGE_SIZE;
        if dirty[(page / 64) as usize] & (1 << (page % 64)) != 0 {
            return true;
        }
        let step = (VRAM_PAGE_SIZE - at % VRAM_PAGE_SIZE).min(left);
        left -= step;
        at = (at + step) & (size - 1);
    }
    false
}

/// QEMU's `vga_draw_text`.
fn draw_text(r: &VgaRegs, vram: &Vram, hooks: &dyn DrawHooks) -> Option<Surface> {
    let map = r.sr(seq::CHARACTER_MAP);
    let font_offset = |select: u8| u64::from(select) * 8192 * 4 + 2;
    let font_bases = [
        font_offset(((map >> 4) & 1) | ((map << 1) & 6)),
        font_offset(((map >> 5) & 1) | ((map >> 1) & 6)),
    ];
    let (line_offset, start_addr, line_compare) = hooks.offsets(r);
    let cheight = u32::from(r.cr[crtc::MAX_SCAN] & 0x1f) + 1;
    let clock = r.sr(seq::CLOCK_MODE);
    let cw: u32 = if clock & 0x08 != 0 {
        16
    } else if clock & 0x01 != 0 {
        8
    } else {
        9
    };
    let width = u32::from(r.cr[crtc::H_DISP]) + 1;
    let height = if r.cr[6] == 100 {
        // QEMU's CGA 160x100x16 case.
        100
    } else {
        vertical_display_end(r) / cheight
    };
    let cells = width * height;
    if cells <= 1 || cells > MAX_TEXT_CELLS {
        return None;
    }
    let palette = palette16(r);
    let mut surface = Surface::new(width * cw, height * cheight);
    // The two character sets: 256 glyphs of 32 rows, one byte in every fourth.
    let fonts: Vec<Vec<u8>> = font_bases
        .iter()
        .map(|base| {
            let mut font = vec![0u8; 256 * 32 * 4];
            vram.read_wrapping(*base, &mut font);
            font
        })
        .collect();
    let cursor_on = r.cr[crtc::CURSOR_START] & 0x20 == 0;
    let cursor_addr =
        ((u64::from(r.cr[crtc::CURSOR_HI]) << 8) | u64::from(r.cr[crtc::CURSOR_LO])) * 4;
    let dup9_enabled = r.ar[att::MODE] & 0x04 != 0;
    let mut offset = u64::from(start_addr) * 4;
    let mut line = 0u32;
    let mut row = vec![0u8; width as usize * 4];
    for cy in 0..height {
        vram.read_wrapping(offset, &mut row);
        for cx in 0..width {
            let at = cx as usize * 4;
            let (ch, attr) = (row[at], row[at + 1]);
            let font = &fonts[usize::from((attr >> 3) & 1)];
            let glyph = |line: u32| font[usize::from(ch) * 128 + line as usize * 4];
            let fg = palette[usize::from(attr & 0x0f)];
            let bg = palette[usize::from(attr >> 4)];
            let dup9 = cw == 9 && dup9_enabled && (0xb0..=0xdf).contains(&ch);
            let (x0, y0) = (cx * cw, cy * cheight);
            for gy in 0..cheight {
                surface.put_glyph_row(x0, y0 + gy, glyph(gy), cw, dup9, fg, bg);
            }
            let here = (offset + u64::from(cx) * 4) & (vram.size() - 1);
            if cursor_on && here == cursor_addr & (vram.size() - 1) {
                let start = u32::from(r.cr[crtc::CURSOR_START] & 0x1f);
                let last = u32::from(r.cr[crtc::CURSOR_END] & 0x1f).min(cheight - 1);
                if last >= start && start < cheight {
                    for gy in start..=last {
                        surface.put_glyph_row(x0, y0 + gy, 0xff, cw, true, fg, bg);
                    }
                }
            }
        }
        let next = line + cheight;
        offset += u64::from(line_offset);
        if line < line_compare && next >= line_compare {
            offset = 0;
        }
        line = next;
    }
    Some(surface)
}

/// How one scan line of memory becomes pixels (QEMU's `vga_draw_line*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineFormat {
    /// CGA 4 colours: 2 bits a pixel, planes 0 and 1 interleaved (`line2`, `line2d2`).
    Cga { doubled: bool },
    /// 16 colours from the four planes (`line4`, `line4d2`).
    Planar { doubled: bool },
    /// 256 colours, each pixel twice (mode 13h: `line8d2`).
    Chain4,
    /// VBE 8 bits a pixel through the DAC.
    Indexed8,
    /// VBE 15-bit RGB.
    Rgb15,
    /// VBE 16-bit RGB.
    Rgb16,
    /// VBE 24-bit RGB.
    Rgb24,
    /// VBE 32-bit xRGB.
    Rgb32,
}

impl LineFormat {
    /// Bytes of video memory one line of `width` pixels takes.
    fn bytes(self, width: u32) -> usize {
        let w = width as usize;
        match self {
            LineFormat::Cga { .. } | LineFormat::Planar { .. } | LineFormat::Chain4 => (w >> 3) * 4,
            LineFormat::Indexed8 => w,
            LineFormat::Rgb15 | LineFormat::Rgb16 => w * 2,
            LineFormat::Rgb24 => w * 3,
            LineFormat::Rgb32 => w * 4,
        }
    }
}

/// Spreads the 8 bits of `b` into the 8 nibbles of a word (QEMU's `expand4`): bit j to bit
/// 4j.
fn expand4(b: u8) -> u32 {
    (0..8).fold(0, |v, j| v | (u32::from((b >> j) & 1) << (4 * j)))
}

/// Spreads the four 2-bit fields of `b` into four nibbles (QEMU's `expand2`).
fn expand2(b: u8) -> u32 {
    (0..4).fold(0, |v, j| v | (u32::from((b >> (2 * j)) & 3) << (4 * j)))
}

/// Draws `width` pixels (twice that when doubled) of `data` into `out`.
fn draw_line(
    format: LineFormat,
    r: &VgaRegs,
    data: &[u8],
    width: u32,
    pal16: &[u32; 16],
    pal256: &[u32],
    out: &mut Vec<u32>,
) {
    let planes = plane_mask(r.ar[att::PLANE_ENABLE] & 0x0f);
    let be = r.big_endian_fb;
    match format {
        LineFormat::Cga { doubled } | LineFormat::Planar { doubled } => {
            for dword in data.chunks_exact(4) {
                let d = u32::from_le_bytes([dword[0], dword[1], dword[2], dword[3]]) & planes;
                let plane = |p: u32| (d >> (8 * p)) as u8;
                let mut put = |v: u32, count: u32| {
                    for k in (0..count).rev() {
                        let px = pal16[((v >> (4 * k)) & 0xf) as usize];
                        out.push(px);
                        if doubled {
                            out.push(px);
                        }
                    }
                };
                if matches!(format, LineFormat::Cga { .. }) {
                    put(expand2(plane(0)) | (expand2(plane(2)) << 2), 4);
                    put(expand2(plane(1)) | (expand2(plane(3)) << 2), 4);
                } else {
                    let v = expand4(plane(0))
                        | (expand4(plane(1)) << 1)
                        | (expand4(plane(2)) << 2)
                        | (expand4(plane(3)) << 3);
                    put(v, 8);
                }
            }
        }
        LineFormat::Chain4 => {
            for b in data {
                let px = pal256[usize::from(*b)];
                out.push(px);
                out.push(px);
            }
        }
        LineFormat::Indexed8 => out.extend(data.iter().map(|b| pal256[usize::from(*b)])),
        LineFormat::Rgb15 | LineFormat::Rgb16 => {
            for p in data.chunks_exact(2) {
                let v = u32::from(if be {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    u16::from_le_bytes([p[0], p[1]])
                });
                out.push(if format == LineFormat::Rgb15 {
                    rgb(((v >> 7) & 0xf8) as u8, ((v >> 2) & 0xf8) as u8, ((v << 3) & 0xf8) as u8)
                } else {
                    rgb(((v >> 8) & 0xf8) as u8, ((v >> 3) & 0xfc) as u8, ((v << 3) & 0xf8) as u8)
                });
            }
        }
        LineFormat::Rgb24 => {
            for p in data.chunks_exact(3) {
                out.push(if be { rgb(p[0], p[1], p[2]) } else { rgb(p[2], p[1], p[0]) });
            }
        }
        LineFormat::Rgb32 => {
            for p in data.chunks_exact(4) {
                out.push(if be { rgb(p[1], p[2], p[3]) } else { rgb(p[2], p[1], p[0]) });
            }
        }
    }
    let _ = width;
}

/// How a graphic mode lays video memory out on the screen, and its colours: what
/// [`refresh`] compares to decide on a full redraw.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GraphicLayout {
    line_offset: u32,
    start_addr: u32,
    line_compare: u32,
    /// Pixels a line of memory holds.
    width: u32,
    /// Pixels shown per line (twice `width` for half-clock modes).
    disp_width: u32,
    height: u32,
    multi_scan: u32,
    format: LineFormat,
    cr_mode: u8,
    plane_enable: u8,
    big_endian: bool,
    pal16: [u32; 16],
    pal256: Vec<u32>,
}

/// QEMU's `vga_draw_graphic` up to its line loop, with the extensions `hooks` describe.
fn graphic_layout(r: &VgaRegs, hooks: &dyn DrawHooks) -> GraphicLayout {
    let (line_offset, start_addr, line_compare) = hooks.offsets(r);
    let (width, mut height) = hooks.resolution(r);
    let shift_control = (r.gr[gfx::MODE] >> 5) & 3;
    let double_scan = u32::from(r.cr[crtc::MAX_SCAN] >> 7);
    let multi_scan = if shift_control != 1 {
        ((u32::from(r.cr[crtc::MAX_SCAN] & 0x1f) + 1) << double_scan) - 1
    } else {
        double_scan
    };
    let half_clock = r.sr(seq::CLOCK_MODE) & 0x08 != 0;
    let depth = hooks.bpp(r);
    let format = match shift_control {
        0 => LineFormat::Planar { doubled: half_clock },
        1 => LineFormat::Cga { doubled: half_clock },
        _ => match depth {
            8 => LineFormat::Indexed8,
            15 => LineFormat::Rgb15,
            16 => LineFormat::Rgb16,
            24 => LineFormat::Rgb24,
            32 => LineFormat::Rgb32,
            _ => LineFormat::Chain4,
        },
    };
    let disp_width = if shift_control <= 1 && half_clock {
        width * 2
    } else {
        width
    };
    if u64::from(disp_width) * u64::from(height) > MAX_PIXELS {
        height = (MAX_PIXELS / u64::from(disp_width.max(1))) as u32;
    }
    // Direct colour does not go through the palettes: leaving them out spares a full
    // redraw when the guest programs the DAC.
    let paletted = !matches!(
        format,
        LineFormat::Rgb15 | LineFormat::Rgb16 | LineFormat::Rgb24 | LineFormat::Rgb32
    );
    GraphicLayout {
        line_offset,
        start_addr,
        line_compare,
        width,
        disp_width,
        height,
        multi_scan,
        format,
        cr_mode: r.cr[crtc::MODE],
        plane_enable: r.ar[att::PLANE_ENABLE],
        big_endian: r.big_endian_fb,
        pal16: if paletted { palette16(r) } else { [0; 16] },
        pal256: if paletted { palette256(r) } else { Vec::new() },
    }
}

/// QEMU's `vga_draw_graphic`: the whole screen into a new surface.
fn draw_graphic(r: &VgaRegs, vram: &Vram, hooks: &dyn DrawHooks) -> Surface {
    let layout = graphic_layout(r, hooks);
    let mut surface = Surface::new(layout.disp_width, layout.height);
    draw_graphic_lines(r, vram, hooks, &layout, &mut surface, |_, _| true);
    surface
}

/// QEMU's `vga_draw_graphic` line loop: draws into `surface` (of the layout's size) the
/// lines for which `wanted(address, bytes)` of their video memory says so; returns the
/// rows drawn.
fn draw_graphic_lines(
    r: &VgaRegs,
    vram: &Vram,
    hooks: &dyn DrawHooks,
    layout: &GraphicLayout,
    surface: &mut Surface,
    mut wanted: impl FnMut(u64, usize) -> bool,
) -> Vec<Range<u32>> {
    let mut drawn: Vec<Range<u32>> = Vec::new();
    let mut data = vec![0u8; layout.format.bytes(layout.width)];
    let mut line = Vec::with_capacity(layout.disp_width as usize);
    let cr_mode = layout.cr_mode;
    let mut addr1 = u64::from(layout.start_addr) * 4;
    let mut y1 = 0u64;
    let mut multi_run = layout.multi_scan;
    for y in 0..layout.height {
        let mut addr = addr1;
        if cr_mode & 1 == 0 {
            // CGA compatibility: scan line bit 0 in address bit 13 (or 15).
            let shift = 14 + u64::from((cr_mode >> 6) & 1);
            addr = (addr & !(1 << shift)) | ((y1 & 1) << shift);
        }
        if cr_mode & 2 == 0 {
            addr = (addr & !0x8000) | ((y1 & 2) << 14);
        }
        if wanted(addr, data.len()) {
            vram.read_wrapping(addr, &mut data);
            line.clear();
            draw_line(
                layout.format,
                r,
                &data,
                layout.width,
                &layout.pal16,
                &layout.pal256,
                &mut line,
            );
            line.resize(layout.disp_width as usize, 0);
            hooks.draw_cursor_line(vram, y, &mut line);
            surface.row_mut(y).copy_from_slice(&line);
            match drawn.last_mut() {
                Some(last) if last.end == y => last.end = y + 1,
                _ => drawn.push(y..y + 1),
            }
        }
        if multi_run == 0 {
            let mask = u64::from((cr_mode & 3) ^ 3);
            if (y1 & mask) == mask {
                addr1 += u64::from(layout.line_offset);
            }
            y1 += 1;
            multi_run = layout.multi_scan;
        } else {
            multi_run -= 1;
        }
        if y == layout.line_compare {
            addr1 = 0;
        }
    }
    drawn
}

#[cfg(test)]
// Row ranges are what is compared here, one range as often as several.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::core::memory::MemoryRegionOps;
    use crate::display::vga::{VbePorts, VgaCommon, VgaIoPorts, VgaLowMem, Vram};

    fn vga() -> std::sync::Arc<VgaCommon> {
        VgaCommon::new(Vram::new(1 << 20).unwrap())
    }

    #[test]
    fn a_blanked_vga_is_black_at_the_last_size() {
        let v = vga();
        let s = render(&v);
        assert_eq!((s.width, s.height), (640, 480));
        assert!(s.pixels.iter().all(|p| *p == 0));
    }

    #[test]
    fn six_bit_dac_values_widen_as_qemu_widens_them() {
        assert_eq!(c6_to_8(0x3f), 0xff);
        assert_eq!(c6_to_8(0x2a), 0xa8);
        assert_eq!(c6_to_8(0x15), 0x57);
        assert_eq!(c6_to_8(0), 0);
    }

    /// A 2x2 text screen with one 8x2 glyph: each pixel comes from the glyph's bits in
    /// plane 2, the attribute's colours through the palette, and the cursor.
    #[test]
    fn text_cells_come_from_the_font_in_plane_2() {
        let v = vga();
        {
            let mut r = v.regs.lock();
            r.ar_index = att::PAS;
            r.sr[seq::CLOCK_MODE] = 0x01; // 8-dot characters
            r.cr[crtc::H_DISP] = 1; // 2 columns
            r.cr[crtc::MAX_SCAN] = 1; // 2 scan lines a row
            r.cr[crtc::V_DISP_END] = 3; // 4 lines: 2 rows
            r.cr[crtc::OFFSET] = 1; // 8 bytes a row = 2 cells
            r.cr[crtc::CURSOR_START] = 0x20; // cursor off
            r.cr[crtc::LINE_COMPARE] = 0xff;
            r.cr[crtc::OVERFLOW] = 0x10;
            for i in 0..16 {
                r.ar[i] = i as u8;
            }
            r.palette[3..6].copy_from_slice(&[0x3f, 0, 0]); // 1: red
            r.palette[6..9].copy_from_slice(&[0, 0x3f, 0]); // 2: green
        }
        // Glyph 'A': rows 0b1000_0001 and 0b0101_0101.
        v.vram.write_u8((0x41 * 32) * 4 + 2, 0x81);
        v.vram.write_u8((0x41 * 32 + 1) * 4 + 2, 0x55);
        // Cell (1, 0): 'A' in red on green.
        v.vram.write_u8(4, 0x41);
        v.vram.write_u8(5, 0x21);
        let s = render(&v);
        assert_eq!((s.width, s.height), (16, 4));
        let (red, green) = (0xff0000, 0x00ff00);
        let row0: Vec<u32> = s.row(0)[8..16].to_vec();
        assert_eq!(row0, [red, green, green, green, green, green, green, red]);
        let row1: Vec<u32> = s.row(1)[8..16].to_vec();
        assert_eq!(row1, [green, red, green, red, green, red, green, red]);
        assert!(s.row(0)[..8].iter().all(|p| *p == 0), "cell 0: glyph 0 in black");
        // Cursor on cell 1, lines 1-1: that line all foreground.
        {
            let mut r = v.regs.lock();
            r.cr[crtc::CURSOR_START] = 1;
            r.cr[crtc::CURSOR_END] = 1;
            r.cr[crtc::CURSOR_LO] = 1;
        }
        let s = render(&v);
        assert!(s.row(1)[8..16].iter().all(|p| *p == red));
        assert_eq!(s.row(0)[8], red);
        assert_eq!(s.row(0)[9], green);
    }

    #[test]
    fn vbe_framebuffers_of_every_depth() {
        for (bpp, bytes, expect) in [
            (8u16, vec![1u8], 0x00ff_0000u32),
            (15, 0x7c00u16.to_le_bytes().to_vec(), 0xf8_0000),
            (16, 0x07e0u16.to_le_bytes().to_vec(), 0x00_fc00),
            (24, vec![0x11, 0x22, 0x33], 0x33_2211),
            (32, vec![0x11, 0x22, 0x33, 0x00], 0x33_2211),
        ] {
            let v = vga();
            v.regs.lock().palette[3..6].copy_from_slice(&[0x3f, 0, 0]);
            v.vbe_write(vbe::INDEX_XRES as u16, 16);
            v.vbe_write(vbe::INDEX_YRES as u16, 8);
            v.vbe_write(vbe::INDEX_BPP as u16, bpp);
            v.vbe_write(vbe::INDEX_ENABLE as u16, vbe::ENABLED);
            v.regs.lock().ar_index = att::PAS;
            let pitch = 16 * u64::from(bpp.div_ceil(8));
            for (i, b) in bytes.iter().enumerate() {
                v.vram.write_u8(pitch * 3 + bytes.len() as u64 * 2 + i as u64, *b);
            }
            let s = render(&v);
            assert_eq!((s.width, s.height), (16, 8), "{bpp} bpp");
            assert_eq!(s.row(3)[2], expect, "{bpp} bpp");
            assert_eq!(s.row(3)[1], 0, "{bpp} bpp");
        }
    }

    /// A 640x480 32 bpp VBE mode.
    fn vbe_640x480(v: &VgaCommon) {
        v.vbe_write(vbe::INDEX_XRES as u16, 640);
        v.vbe_write(vbe::INDEX_YRES as u16, 480);
        v.vbe_write(vbe::INDEX_BPP as u16, 32);
        v.vbe_write(vbe::INDEX_ENABLE as u16, vbe::ENABLED);
        v.regs.lock().ar_index = att::PAS;
    }

    #[test]
    fn an_idle_screen_redraws_nothing_and_a_write_its_lines() {
        let v = VgaCommon::new(Vram::new(4 << 20).unwrap());
        vbe_640x480(&v);
        let mut cache = RenderCache::default();
        let mut surface = Arc::new(Surface::new(0, 0));
        assert_eq!(refresh(&v, &mut cache, Some(&[]), &mut surface), Redraw::Full);
        assert_eq!(cache.lines_drawn, 480);
        // Idle: no line drawn, however often.
        for _ in 0..3 {
            assert_eq!(refresh(&v, &mut cache, Some(&[]), &mut surface), Redraw::Nothing);
        }
        assert_eq!(cache.lines_drawn, 480);
        // The VMM writes a pixel of line 100 (2560 bytes a line): its page holds the end
        // of line 99 too.
        v.vram.write_u32(100 * 2560 + 40, 0x00ab_cdef);
        assert_eq!(
            refresh(&v, &mut cache, Some(&[]), &mut surface),
            Redraw::Rows(vec![99..101])
        );
        assert_eq!(cache.lines_drawn, 482);
        assert_eq!(surface.row(100)[10], 0x00ab_cdef);
        // A vCPU's write, as the accelerator's log reports it: the page at 0x40000.
        assert_eq!(
            refresh(&v, &mut cache, Some(&[0x40000]), &mut surface),
            Redraw::Rows(vec![102..104])
        );
        // Without a log everything is drawn; a new start address too.
        assert_eq!(refresh(&v, &mut cache, None, &mut surface), Redraw::Full);
        v.vbe_write(vbe::INDEX_Y_OFFSET as u16, 1);
        assert_eq!(refresh(&v, &mut cache, Some(&[]), &mut surface), Redraw::Full);
        assert_eq!(*surface, render(&v));
    }

    #[test]
    fn an_idle_text_screen_redraws_nothing() {
        let v = vga();
        {
            let mut r = v.regs.lock();
            r.ar_index = att::PAS;
            r.cr[crtc::H_DISP] = 79;
            r.cr[crtc::V_DISP_END] = 0x8f;
            r.cr[crtc::OVERFLOW] = 0x1f;
            r.cr[crtc::MAX_SCAN] = 15;
            r.cr[crtc::OFFSET] = 40;
        }
        let mut cache = RenderCache::default();
        let mut surface = Arc::new(Surface::new(0, 0));
        assert_eq!(refresh(&v, &mut cache, Some(&[]), &mut surface), Redraw::Full);
        let drawn = cache.lines_drawn;
        assert_eq!(refresh(&v, &mut cache, Some(&[]), &mut surface), Redraw::Nothing);
        // The guest polls the status register: nothing on the screen changes.
        v.regs.lock().ioport_read(0x3da);
        assert_eq!(refresh(&v, &mut cache, Some(&[]), &mut surface), Redraw::Nothing);
        assert_eq!(cache.lines_drawn, drawn);
        v.vram.write_u8(0, b'A');
        assert_eq!(refresh(&v, &mut cache, Some(&[]), &mut surface), Redraw::Full);
    }

    #[test]
    fn mode_13h_doubles_pixels_and_lines() {
        let v = vga();
        {
            let mut r = v.regs.lock();
            r.ar_index = att::PAS;
            r.gr[gfx::MISC] = 0x05;
            r.gr[gfx::MODE] = 0x40;
            r.sr[seq::MEMORY_MODE] = 0x0e;
            r.cr[crtc::H_DISP] = 0x4f;
            r.cr[crtc::V_DISP_END] = 0x8f;
            r.cr[crtc::OVERFLOW] = 0x1f;
            r.cr[crtc::MAX_SCAN] = 0x41;
            r.cr[crtc::OFFSET] = 0x28;
            r.cr[crtc::MODE] = 0xa3;
            r.cr[crtc::LINE_COMPARE] = 0xff;
            r.ar[att::MODE] = 0x41;
            r.palette[7 * 3..7 * 3 + 3].copy_from_slice(&[0x3f, 0x3f, 0x3f]);
        }
        // Pixel (5, 1) of 320x200.
        v.vram.write_u8(320 + 5, 7);
        let s = render(&v);
        assert_eq!((s.width, s.height), (640, 400));
        for (x, y) in [(10, 2), (11, 2), (10, 3), (11, 3)] {
            assert_eq!(s.row(y)[x], 0xffffff, "({x}, {y})");
        }
        assert_eq!(s.row(2)[12], 0);
        assert_eq!(s.row(1)[10], 0);
    }

    #[test]
    fn planar_16_colour_mode_combines_the_planes() {
        let v = vga();
        {
            let mut r = v.regs.lock();
            r.ar_index = att::PAS;
            r.gr[gfx::MISC] = 0x05;
            r.cr[crtc::H_DISP] = 0x4f;
            r.cr[crtc::V_DISP_END] = 0xdf;
            r.cr[crtc::OVERFLOW] = 0x3e;
            r.cr[crtc::OFFSET] = 0x28;
            r.cr[crtc::MODE] = 0xe3;
            r.cr[crtc::LINE_COMPARE] = 0xff;
            r.ar[att::PLANE_ENABLE] = 0x0f;
            for i in 0..16 {
                r.ar[i] = i as u8;
            }
            r.palette[9 * 3..9 * 3 + 3].copy_from_slice(&[0, 0, 0x3f]);
        }
        // Leftmost pixel of line 0: colour 9 = planes 0 and 3.
        v.vram.write_u32(0, 0x8000_0080);
        let s = render(&v);
        assert_eq!((s.width, s.height), (640, 480));
        assert_eq!(s.row(0)[0], 0x0000ff);
        assert_eq!(s.row(0)[1], 0);
    }

    #[test]
    fn any_value_at_any_port_or_address_is_harmless() {
        let v = vga();
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let ports = VgaIoPorts(v.clone());
        let vbe_ports = VbePorts(v.clone());
        let lowmem = VgaLowMem(v.clone());
        for _ in 0..200_000 {
            let r = next();
            let size = [1, 2, 4][(r % 3) as usize];
            let value = u64::from(next());
            match r % 5 {
                0 => ports.write(u64::from(next() % 0x30), value, size),
                1 => {
                    ports.read(u64::from(next() % 0x30), size);
                }
                2 => vbe_ports.write(u64::from(next() % 3), value, size),
                3 => lowmem.write(u64::from(next() % 0x20000), value, size),
                _ => {
                    lowmem.read(u64::from(next() % 0x20000), size);
                }
            }
            if r % 1000 == 0 {
                render(&v);
            }
        }
    }
}
