//! The Cirrus CLGD 54xx BitBLT engine (QEMU's blitter in `hw/display/cirrus_vga.c` with
//! `cirrus_vga_rop.h` and `cirrus_vga_rop2.h`): video-to-video copies (forwards and
//! backwards, with 8/16-bit transparency), pattern fills, colour expansion (opaque and
//! transparent, from a bitmap or an 8x8 pattern), solid fills, and system-to-video blits
//! whose source the guest writes through the memory window, a byte at a time.
//!
//! QEMU's blitter had many CVEs (CVE-2014-8106, CVE-2017-2615, CVE-2017-2620,
//! CVE-2017-7980...): a guest chose addresses and pitches that made it copy outside video
//! memory. Here every blit is checked before it runs ([`region_fits`], with 64-bit
//! arithmetic that cannot overflow), a blit that does not fit is refused with a
//! [`BlitError`] the device logs, and every byte the engine then touches goes through
//! [`Vram`]'s bounds-checked accessors at an address masked to the video memory the
//! chip addresses, so even an engine bug cannot reach outside it.

use crate::display::vga::Vram;

/// GR30, the blit mode (QEMU's `CIRRUS_BLTMODE_*`).
pub mod mode {
    /// Addresses go down (the blit starts at its last byte).
    pub const BACKWARDS: u8 = 0x01;
    /// The destination is system memory (video-to-system).
    pub const MEMSYSDEST: u8 = 0x02;
    /// The source is system memory: the guest writes it through the memory window.
    pub const MEMSYSSRC: u8 = 0x04;
    /// Transparency: pixels of the transparent colour (copies) or 0 bits (colour
    /// expansion) leave the destination alone.
    pub const TRANSPARENTCOMP: u8 = 0x08;
    /// The source is an 8x8 pattern.
    pub const PATTERNCOPY: u8 = 0x40;
    /// The source is a bitmap, 1 bit per pixel, expanded to the foreground and
    /// background colours.
    pub const COLOREXPAND: u8 = 0x80;
    /// Bits 4-5: bytes per pixel - 1.
    pub const PIXELWIDTHMASK: u8 = 0x30;
}

/// GR33, the extended blit mode (QEMU's `CIRRUS_BLTMODEEXT_*`).
pub mod mode_ext {
    /// With pattern colour expansion: fill with the foreground colour.
    pub const SOLIDFILL: u8 = 0x04;
    /// Colour expansion with transparency draws the 0 bits, in the background colour.
    pub const COLOREXPINV: u8 = 0x02;
    /// System-to-video colour expansion: each line's bits padded to 32.
    pub const DWORDGRANULARITY: u8 = 0x01;
}

/// The line buffer of system-to-video blits (QEMU's `CIRRUS_BLTBUFSIZE`): no blit may be
/// wider.
pub const BLT_BUF_SIZE: usize = 2048 * 4;

/// Why a blit was refused (the guest asked for something that does not fit or that the
/// engine does not do); the device logs it, rate-limited, and the blit ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlitError {
    /// A region of the blit reaches outside video memory.
    #[error("{what} of {width} bytes x {height} lines at 0x{addr:x}, pitch {pitch}, reaches outside {size} bytes of video memory")]
    OutOfRange {
        /// "destination", "source" or "pattern".
        what: &'static str,
        /// Start address.
        addr: u32,
        /// Line pitch (negative for backwards blits).
        pitch: i32,
        /// Bytes per line.
        width: u32,
        /// Lines.
        height: u32,
        /// Video memory the blitter addresses.
        size: u64,
    },
    /// Wider than the line buffer.
    #[error("blit width of {0} bytes is more than the blitter's {BLT_BUF_SIZE}")]
    TooWide(u32),
    /// Both source and destination in system memory.
    #[error("system-to-system blits do not exist")]
    SystemToSystem,
    /// Video-to-system blits (QEMU does not implement them either).
    #[error("video-to-system blits are not implemented")]
    VideoToSystem,
    /// Transparent copies of 24 or 32-bit pixels.
    #[error("transparent copies need 8 or 16 bits per pixel, not {0}")]
    TransparentDepth(u32),
}

/// A blit as the graphics controller's registers describe it when it starts (QEMU's
/// `cirrus_bitblt_start`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blit {
    /// Bytes per line (GR20-21 + 1).
    pub width: u32,
    /// Lines (GR22-23 + 1).
    pub height: u32,
    /// Destination pitch (GR24-25), negated for backwards blits.
    pub dst_pitch: i32,
    /// Source pitch (GR26-27), negated for backwards blits.
    pub src_pitch: i32,
    /// Destination address (GR28-2A).
    pub dst_addr: u32,
    /// Source address (GR2C-2E).
    pub src_addr: u32,
    /// GR30 without the pixel width.
    pub mode: u8,
    /// GR33.
    pub mode_ext: u8,
    /// GR32, the raster operation.
    pub rop: u8,
    /// GR2F: pixels (or bytes at 24 bpp) to skip at the left of each line.
    pub skip_left: u8,
    /// Bytes per pixel, 1-4.
    pub pixel_width: u32,
    /// Foreground colour.
    pub fg: u32,
    /// Background colour.
    pub bg: u32,
    /// Transparent colour of copies (GR34-35).
    pub transparent: u16,
}

/// The blitter's registers: GR0 and GR1 as written (QEMU's shadow registers) and GR10-39.
pub struct BlitRegs<'a> {
    /// GR0 with all 8 bits (background colour, low byte).
    pub gr0: u8,
    /// GR1 with all 8 bits (foreground colour, low byte).
    pub gr1: u8,
    /// The graphics controller's registers, indexed by number (0x10-0x39 used).
    pub gr: &'a [u8; 0x40],
}

impl Blit {
    /// Reads a blit from the registers (QEMU's `cirrus_bitblt_start`, before it picks
    /// the operation), addresses masked with `addr_mask`.
    pub fn from_regs(r: &BlitRegs<'_>, addr_mask: u32) -> Blit {
        let gr = r.gr;
        let word = |lo: usize| u32::from(gr[lo]) | (u32::from(gr[lo + 1]) << 8);
        let triple = |lo: usize| word(lo) | (u32::from(gr[lo + 2]) << 16);
        let pixel_width = u32::from((gr[0x30] & mode::PIXELWIDTHMASK) >> 4) + 1;
        // Colours are the low bytes of GR0/GR1 and GR10-15 interleaved (QEMU's
        // `cirrus_bitblt_fgcol`/`bgcol`), as wide as a pixel.
        let colour = |low: u8, first: usize| {
            let all = u32::from(low)
                | (u32::from(gr[first]) << 8)
                | (u32::from(gr[first + 2]) << 16)
                | (u32::from(gr[first + 4]) << 24);
            match pixel_width {
                1 => all & 0xff,
                2 => all & 0xffff,
                3 => all & 0xff_ffff,
                _ => all,
            }
        };
        Blit {
            width: word(0x20) + 1,
            height: word(0x22) + 1,
            dst_pitch: word(0x24) as i32,
            src_pitch: word(0x26) as i32,
            dst_addr: triple(0x28) & addr_mask,
            src_addr: triple(0x2c) & addr_mask,
            mode: gr[0x30] & !mode::PIXELWIDTHMASK,
            mode_ext: gr[0x33],
            rop: gr[0x32],
            skip_left: gr[0x2f],
            pixel_width,
            fg: colour(r.gr1, 0x11),
            bg: colour(r.gr0, 0x10),
            transparent: u16::from(gr[0x34]) | (u16::from(gr[0x35]) << 8),
        }
    }
}

/// Whether `height` lines of `width` bytes, the first at `addr` and each `pitch` bytes
/// after the one before (backwards from `addr`, its last byte, for a negative pitch),
/// lie within `size` bytes (QEMU's `blit_region_is_unsafe`, negated). A zero pitch is
/// refused, as QEMU refuses it. The arithmetic saturates in 64 bits: a result that
/// would overflow is past any end.
pub fn region_fits(addr: u32, pitch: i32, width: u32, height: u32, size: u64) -> bool {
    if pitch == 0 || height == 0 || width == 0 {
        return false;
    }
    let Ok(size) = i64::try_from(size) else {
        return false;
    };
    let addr = i64::from(addr);
    let span = (i64::from(height) - 1).saturating_mul(i64::from(pitch));
    if pitch < 0 {
        // Lines run from addr - width + 1 to addr, the last one lowest.
        addr < size && addr.saturating_add(span).saturating_sub(i64::from(width)) >= -1
    } else {
        addr.saturating_add(span).saturating_add(i64::from(width)) <= size
    }
}

/// QEMU's raster operations (GR32): the new destination from the old one and the source,
/// or `None` for the no-op (and the codes QEMU treats as it).
fn raster(rop: u8, d: u32, s: u32) -> Option<u32> {
    Some(match rop {
        0x00 => 0,
        0x05 => s & d,
        0x09 => s & !d,
        0x0b => !d,
        0x0d => s,
        0x0e => !0,
        0x50 => !s & d,
        0x59 => s ^ d,
        0x6d => s | d,
        0x90 => !s | !d,
        0x95 => !(s ^ d),
        0xad => s | !d,
        0xd0 => !s,
        0xd6 => !s | d,
        0xda => !s & !d,
        _ => return None,
    })
}

/// Where a blit's source bytes come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// Video memory, addresses masked.
    Video(&'a Vram, u32),
    /// The system-to-video line buffer (QEMU's `cirrus_bltbuf`), indices wrapped.
    Buffer(&'a [u8; BLT_BUF_SIZE]),
}

impl Source<'_> {
    fn byte(&self, addr: u32) -> u8 {
        match self {
            Source::Video(vram, mask) => vram.read_u8(u64::from(addr & mask)),
            Source::Buffer(buf) => buf[addr as usize & (BLT_BUF_SIZE - 1)],
        }
    }

    /// A little-endian value of `bytes` bytes at `addr` rounded down to a multiple of
    /// `align` (QEMU's `cirrus_src16`/`cirrus_src32`).
    fn value(&self, addr: u32, bytes: u32, align: u32) -> u32 {
        let at = addr & !(align - 1);
        (0..bytes).fold(0, |v, i| v | (u32::from(self.byte(at.wrapping_add(i))) << (8 * i)))
    }
}

/// The destination: video memory with the raster operation, every address masked.
struct Dest<'a> {
    vram: &'a Vram,
    mask: u32,
    rop: u8,
}

impl Dest<'_> {
    fn read(&self, at: u32, bytes: u32) -> u32 {
        (0..bytes).fold(0, |v, i| {
            v | (u32::from(self.vram.read_u8(u64::from((at + i) & self.mask))) << (8 * i))
        })
    }

    fn write(&self, at: u32, bytes: u32, v: u32) {
        for i in 0..bytes {
            self.vram.write_u8(u64::from((at + i) & self.mask), (v >> (8 * i)) as u8);
        }
    }

    /// Applies the raster operation to `bytes` bytes at `at` (aligned to them); with
    /// `transparent`, a result equal to it is not written.
    fn rop(&self, at: u32, bytes: u32, src: u32, transparent: Option<u32>) {
        let at = at & self.mask & !(bytes - 1);
        let width_mask = if bytes == 4 { u32::MAX } else { (1 << (8 * bytes)) - 1 };
        let Some(v) = raster(self.rop, self.read(at, bytes), src) else {
            return;
        };
        let v = v & width_mask;
        if transparent != Some(v) {
            self.write(at, bytes, v);
        }
    }

    /// QEMU's `PUTPIXEL`: one pixel of `bytes` bytes; 24-bit pixels as three bytes.
    fn put_pixel(&self, at: u32, bytes: u32, colour: u32) {
        if bytes == 3 {
            for i in 0..3 {
                self.rop(at.wrapping_add(i), 1, colour >> (8 * i), None);
            }
        } else {
            self.rop(at, bytes, colour, None);
        }
    }
}

/// What a blit does with its source (QEMU's choice of `cirrus_rop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    /// Fill with the foreground colour.
    SolidFill,
    /// A bitmap expanded to the colours.
    ColourExpand { transparent: bool },
    /// An 8x8 bit pattern expanded to the colours.
    PatternColourExpand { transparent: bool },
    /// An 8x8 pixel pattern.
    PatternFill,
    /// A copy, byte by byte (pixel by pixel when transparent).
    Copy { backwards: bool, transparent: bool },
}

/// A blit whose source the guest is still writing (QEMU's `cirrus_srcptr` state): each
/// full line of the buffer is drawn as it arrives.
pub struct SystemToVideo {
    blit: Blit,
    operation: Operation,
    buf: Box<[u8; BLT_BUF_SIZE]>,
    filled: usize,
    line_len: usize,
    remaining: i64,
}

impl std::fmt::Debug for SystemToVideo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemToVideo")
            .field("blit", &self.blit)
            .field("filled", &self.filled)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

/// What starting a blit led to.
#[derive(Debug)]
pub enum Started {
    /// It ran to its end.
    Done,
    /// It waits for its source through the memory window.
    WaitingForSource(SystemToVideo),
}

/// The engine over video memory: `addr_mask` + 1 bytes are what the chip addresses
/// (a power of two no larger than `vram`).
pub struct Engine<'a> {
    /// Video memory.
    pub vram: &'a Vram,
    /// Mask of the addresses the blitter reaches.
    pub addr_mask: u32,
}

impl Engine<'_> {
    fn size(&self) -> u64 {
        u64::from(self.addr_mask) + 1
    }

    fn check(&self, what: &'static str, addr: u32, pitch: i32, b: &Blit) -> Result<(), BlitError> {
        if region_fits(addr, pitch, b.width, b.height, self.size()) {
            Ok(())
        } else {
            Err(BlitError::OutOfRange {
                what,
                addr,
                pitch,
                width: b.width,
                height: b.height,
                size: self.size(),
            })
        }
    }

    /// Starts `blit` (QEMU's `cirrus_bitblt_start` from the operation's choice on);
    /// `display_bpp` sizes a pattern in video memory. A blit that would reach outside
    /// video memory, or that the engine does not do, is refused before it touches
    /// anything.
    pub fn start(&self, mut blit: Blit, display_bpp: u32) -> Result<Started, BlitError> {
        if blit.width as usize > BLT_BUF_SIZE {
            return Err(BlitError::TooWide(blit.width));
        }
        let m = blit.mode;
        if m & (mode::MEMSYSSRC | mode::MEMSYSDEST) == mode::MEMSYSSRC | mode::MEMSYSDEST {
            return Err(BlitError::SystemToSystem);
        }
        let kinds = mode::MEMSYSDEST | mode::TRANSPARENTCOMP | mode::PATTERNCOPY | mode::COLOREXPAND;
        let transparent = m & mode::TRANSPARENTCOMP != 0;
        let operation = if blit.mode_ext & mode_ext::SOLIDFILL != 0
            && m & kinds == mode::PATTERNCOPY | mode::COLOREXPAND
        {
            Operation::SolidFill
        } else if m & (mode::COLOREXPAND | mode::PATTERNCOPY) == mode::COLOREXPAND {
            Operation::ColourExpand { transparent }
        } else if m & mode::PATTERNCOPY != 0 {
            if m & mode::COLOREXPAND != 0 {
                Operation::PatternColourExpand { transparent }
            } else {
                Operation::PatternFill
            }
        } else {
            if transparent && blit.pixel_width > 2 {
                return Err(BlitError::TransparentDepth(blit.pixel_width * 8));
            }
            let backwards = m & mode::BACKWARDS != 0;
            if backwards {
                blit.dst_pitch = -blit.dst_pitch;
                blit.src_pitch = -blit.src_pitch;
            }
            Operation::Copy {
                backwards,
                transparent,
            }
        };
        self.check("destination", blit.dst_addr, blit.dst_pitch, &blit)?;
        if operation == Operation::SolidFill {
            let source = Source::Video(self.vram, self.addr_mask);
            self.run(&blit, operation, source, blit.src_addr, blit.dst_addr, blit.height);
            return Ok(Started::Done);
        }
        if m & mode::MEMSYSSRC != 0 {
            return Ok(Started::WaitingForSource(self.system_to_video(blit, operation)));
        }
        if m & mode::MEMSYSDEST != 0 {
            return Err(BlitError::VideoToSystem);
        }
        let source = Source::Video(self.vram, self.addr_mask);
        if matches!(operation, Operation::PatternFill | Operation::PatternColourExpand { .. }) {
            // QEMU's `cirrus_bitblt_common_patterncopy`: the pattern is aligned to its
            // size, which the display depth gives.
            let size: u32 = match display_bpp {
                8 => 64,
                15 | 16 => 128,
                _ => 256,
            };
            blit.src_addr &= !(size - 1);
            if u64::from(blit.src_addr) + u64::from(size) > self.size() {
                return Err(BlitError::OutOfRange {
                    what: "pattern",
                    addr: blit.src_addr,
                    pitch: 0,
                    width: size,
                    height: 1,
                    size: self.size(),
                });
            }
        } else {
            self.check("source", blit.src_addr, blit.src_pitch, &blit)?;
        }
        self.run(&blit, operation, source, blit.src_addr, blit.dst_addr, blit.height);
        Ok(Started::Done)
    }

    /// QEMU's `cirrus_bitblt_cputovideo`: how many bytes a line of source takes.
    fn system_to_video(&self, blit: Blit, operation: Operation) -> SystemToVideo {
        let colour_expand = blit.mode & mode::COLOREXPAND != 0;
        let (line_len, total) = if blit.mode & mode::PATTERNCOPY != 0 {
            // The whole pattern, then the blit runs.
            let len = if colour_expand { 8 } else { 8 * 8 * blit.pixel_width as usize };
            (len, len as i64)
        } else {
            let len = if colour_expand {
                let pixels = (blit.width / blit.pixel_width) as usize;
                if blit.mode_ext & mode_ext::DWORDGRANULARITY != 0 {
                    // Each line's bits padded to a dword. (QEMU counts the dwords as
                    // bytes here, a quarter of what the guest sends.)
                    pixels.div_ceil(32) * 4
                } else {
                    pixels.div_ceil(8)
                }
            } else {
                // Lines of bytes padded to a dword.
                (blit.width as usize + 3) & !3
            };
            (len, len as i64 * i64::from(blit.height))
        };
        SystemToVideo {
            blit,
            operation,
            buf: Box::new([0; BLT_BUF_SIZE]),
            filled: 0,
            line_len: line_len.clamp(1, BLT_BUF_SIZE),
            remaining: total,
        }
    }

    /// Takes the next byte of a system-to-video blit's source (QEMU's
    /// `cirrus_bitblt_cputovideo_next`); true once the blit is complete.
    pub fn feed(&self, t: &mut SystemToVideo, byte: u8) -> bool {
        t.buf[t.filled] = byte;
        t.filled += 1;
        if t.filled < t.line_len {
            return false;
        }
        t.filled = 0;
        let source = Source::Buffer(&t.buf);
        if t.blit.mode & mode::PATTERNCOPY != 0 {
            // The pattern is all there: the whole blit at once.
            self.run(&t.blit, t.operation, source, 0, t.blit.dst_addr, t.blit.height);
            return true;
        }
        // One line from the buffer's start.
        self.run(&t.blit, t.operation, source, 0, t.blit.dst_addr, 1);
        t.blit.dst_addr = t.blit.dst_addr.wrapping_add_signed(t.blit.dst_pitch);
        t.remaining -= t.line_len as i64;
        t.remaining <= 0
    }

    /// Runs `height` lines of `operation` from `dst`, the source from `src_base` (QEMU's
    /// rop functions; a pattern's first line is still `b.src_addr`'s low bits).
    fn run(&self, b: &Blit, operation: Operation, src: Source<'_>, src_base: u32, dst: u32, height: u32) {
        let d = Dest {
            vram: self.vram,
            mask: self.addr_mask,
            rop: b.rop,
        };
        let pw = b.pixel_width;
        let step = pw as usize;
        match operation {
            Operation::SolidFill => {
                let mut line = dst;
                for _ in 0..height {
                    for x in (0..b.width).step_by(step) {
                        d.put_pixel(line.wrapping_add(x), pw, b.fg);
                    }
                    line = line.wrapping_add_signed(b.dst_pitch);
                }
            }
            Operation::PatternFill => {
                let skip = if pw == 3 {
                    u32::from(b.skip_left & 0x1f)
                } else {
                    u32::from(b.skip_left & 7) * pw
                };
                let pattern_pitch = match pw {
                    1 => 8,
                    2 => 16,
                    _ => 32,
                };
                let mut pattern_y = b.src_addr & 7;
                let mut line = dst;
                for _ in 0..height {
                    let row = src_base.wrapping_add(pattern_y * pattern_pitch);
                    let mut pattern_x = skip;
                    for x in (skip..b.width).step_by(step) {
                        let colour = match pw {
                            1 => {
                                let c = u32::from(src.byte(row.wrapping_add(pattern_x)));
                                pattern_x = (pattern_x + 1) & 7;
                                c
                            }
                            2 => {
                                let c = src.value(row.wrapping_add(pattern_x), 2, 2);
                                pattern_x = (pattern_x + 2) & 15;
                                c
                            }
                            3 => {
                                let c = src.value(row.wrapping_add(pattern_x * 3), 3, 1);
                                pattern_x = (pattern_x + 1) & 7;
                                c
                            }
                            _ => {
                                let c = src.value(row.wrapping_add(pattern_x), 4, 4);
                                pattern_x = (pattern_x + 4) & 31;
                                c
                            }
                        };
                        d.put_pixel(line.wrapping_add(x), pw, colour);
                    }
                    pattern_y = (pattern_y + 1) & 7;
                    line = line.wrapping_add_signed(b.dst_pitch);
                }
            }
            Operation::ColourExpand { transparent } | Operation::PatternColourExpand { transparent } => {
                let pattern = matches!(operation, Operation::PatternColourExpand { .. });
                // QEMU's transparent variants count the skip in bytes at 24 bpp.
                let (src_skip, dst_skip) = if transparent && pw == 3 {
                    let bytes = u32::from(b.skip_left & 0x1f);
                    (bytes / 3, bytes)
                } else {
                    let pixels = u32::from(b.skip_left & 7);
                    (pixels, pixels * pw)
                };
                let inverted = transparent && b.mode_ext & mode_ext::COLOREXPINV != 0;
                let flip = if inverted { 0xff } else { 0 };
                let colour_of = |bit: bool| {
                    if transparent {
                        bit.then_some(if inverted { b.bg } else { b.fg })
                    } else {
                        Some(if bit { b.fg } else { b.bg })
                    }
                };
                let mut pattern_y = b.src_addr & 7;
                let mut next_src = src_base;
                let mut line = dst;
                for _ in 0..height {
                    let mut bits;
                    let mut bit;
                    if pattern {
                        bits = src.byte(src_base.wrapping_add(pattern_y)) ^ flip;
                        bit = 7 - src_skip;
                    } else {
                        bits = src.byte(next_src) ^ flip;
                        next_src = next_src.wrapping_add(1);
                        bit = 7u32.wrapping_sub(src_skip);
                    }
                    for x in (dst_skip..b.width).step_by(step) {
                        if !pattern && bit > 7 {
                            bits = src.byte(next_src) ^ flip;
                            next_src = next_src.wrapping_add(1);
                            bit = 7;
                        }
                        if let Some(colour) = colour_of(bits >> bit & 1 != 0) {
                            d.put_pixel(line.wrapping_add(x), pw, colour);
                        }
                        bit = if pattern { bit.wrapping_sub(1) & 7 } else { bit.wrapping_sub(1) };
                    }
                    pattern_y = (pattern_y + 1) & 7;
                    line = line.wrapping_add_signed(b.dst_pitch);
                }
            }
            Operation::Copy {
                backwards,
                transparent,
            } => {
                // Transparent copies go pixel by pixel (8 or 16 bits), others byte by byte.
                let unit = if transparent { pw } else { 1 };
                let transparent_colour = transparent.then_some(u32::from(b.transparent) & if unit == 1 { 0xff } else { 0xffff });
                let signed_unit = unit as i32;
                let (dst_gap, src_gap, dir) = if backwards {
                    (b.dst_pitch + b.width as i32, b.src_pitch + b.width as i32, -signed_unit)
                } else {
                    let gaps = (b.dst_pitch - b.width as i32, b.src_pitch - b.width as i32);
                    // QEMU refuses overlapping lines going forwards.
                    if height > 1 && (gaps.0 < 0 || gaps.1 < 0) {
                        return;
                    }
                    (gaps.0, gaps.1, signed_unit)
                };
                let (mut at, mut from) = (dst, src_base);
                for _ in 0..height {
                    for _ in (0..b.width).step_by(unit as usize) {
                        d.rop(at, unit, src.value(from, unit, unit), transparent_colour);
                        at = at.wrapping_add_signed(dir);
                        from = from.wrapping_add_signed(dir);
                    }
                    at = at.wrapping_add_signed(dst_gap);
                    from = from.wrapping_add_signed(src_gap);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 << 10;

    fn engine(vram: &Vram) -> Engine<'_> {
        Engine {
            vram,
            addr_mask: (vram.size() - 1) as u32,
        }
    }

    fn blit(width: u32, height: u32, dst: u32, dst_pitch: i32) -> Blit {
        Blit {
            width,
            height,
            dst_pitch,
            src_pitch: dst_pitch,
            dst_addr: dst,
            src_addr: 0,
            mode: 0,
            mode_ext: 0,
            rop: 0x0d,
            skip_left: 0,
            pixel_width: 1,
            fg: 0,
            bg: 0,
            transparent: 0,
        }
    }

    #[test]
    fn regions_fit_exactly_up_to_the_end_of_video_memory() {
        // 4 lines of 16 bytes, 32 apart: the last byte is at 3 * 32 + 15.
        assert!(region_fits(0, 32, 16, 4, 3 * 32 + 16));
        assert!(!region_fits(0, 32, 16, 4, 3 * 32 + 15));
        assert!(region_fits(1000, 32, 16, 1, 1016));
        assert!(!region_fits(1001, 32, 16, 1, 1016));
        // Backwards from the last byte: the lowest byte is addr - 3 * 32 - 15.
        assert!(region_fits(3 * 32 + 15, -32, 16, 4, SIZE));
        assert!(!region_fits(3 * 32 + 14, -32, 16, 4, SIZE));
        assert!(!region_fits(SIZE as u32, -32, 16, 1, SIZE), "start past the end");
        assert!(!region_fits(0, 0, 16, 1, SIZE), "QEMU refuses a zero pitch");
        assert!(!region_fits(0, 16, 0, 1, SIZE));
        assert!(!region_fits(0, 16, 16, 0, SIZE));
    }

    #[test]
    fn extreme_values_neither_overflow_nor_fit() {
        for (addr, pitch, width, height) in [
            (u32::MAX, i32::MAX, u32::MAX, u32::MAX),
            (u32::MAX, i32::MIN, u32::MAX, u32::MAX),
            (0, i32::MIN, 1, 2),
            (0, -1, u32::MAX, 1),
            (0x3f_ffff, 0x1fff, 0x2000, 0x2000),
            (0, 1, 1, u32::MAX),
            (u32::MAX, 1, 1, 1),
        ] {
            assert!(!region_fits(addr, pitch, width, height, 4 << 20), "{addr:#x} {pitch} {width} {height}");
        }
        assert!(!region_fits(0, 1, 1, 1, u64::MAX), "a size past i64 is refused");
    }

    #[test]
    fn a_forward_copy_moves_a_rectangle() {
        let vram = Vram::new(SIZE).unwrap();
        for i in 0..4u32 {
            for x in 0..8u32 {
                vram.write_u8(u64::from(i * 64 + x), (i * 16 + x) as u8);
            }
        }
        let mut b = blit(8, 4, 1024, 64);
        b.src_addr = 0;
        assert!(matches!(engine(&vram).start(b, 8), Ok(Started::Done)));
        for i in 0..4u32 {
            for x in 0..8u32 {
                assert_eq!(vram.read_u8(u64::from(1024 + i * 64 + x)), (i * 16 + x) as u8);
            }
            assert_eq!(vram.read_u8(u64::from(1024 + i * 64 + 8)), 0, "only the rectangle");
        }
    }

    #[test]
    fn a_backward_copy_handles_overlap_downwards() {
        let vram = Vram::new(SIZE).unwrap();
        for x in 0..16u64 {
            vram.write_u8(x, x as u8 + 1);
        }
        // Move bytes 0..16 to 4..20, starting at the last byte of each.
        let mut b = blit(16, 1, 19, 32);
        b.src_addr = 15;
        b.mode = mode::BACKWARDS;
        engine(&vram).start(b, 8).unwrap();
        let moved: Vec<u8> = (4..20).map(|x| vram.read_u8(x)).collect();
        assert_eq!(moved, (1..=16).collect::<Vec<u8>>());
    }

    #[test]
    fn out_of_range_blits_are_refused_and_touch_nothing() {
        let vram = Vram::new(SIZE).unwrap();
        vram.write_u8(SIZE - 1, 0x5a);
        let e = engine(&vram);
        // Destination past the end by one line.
        let b = blit(64, 2, (SIZE - 64) as u32, 64);
        assert!(matches!(e.start(b, 8), Err(BlitError::OutOfRange { what: "destination", .. })));
        // Source past the end.
        let mut b = blit(64, 1, 0, 64);
        b.src_addr = (SIZE - 10) as u32;
        assert!(matches!(e.start(b, 8), Err(BlitError::OutOfRange { what: "source", .. })));
        // Backwards below 0.
        let mut b = blit(64, 2, 10, 64);
        b.mode = mode::BACKWARDS;
        b.src_addr = (SIZE - 1) as u32;
        assert!(matches!(e.start(b, 8), Err(BlitError::OutOfRange { .. })));
        // Wider than the line buffer, and system-to-system.
        assert_eq!(e.start(blit(8193, 1, 0, 8193), 8).unwrap_err(), BlitError::TooWide(8193));
        let mut b = blit(8, 1, 0, 8);
        b.mode = mode::MEMSYSSRC | mode::MEMSYSDEST;
        assert_eq!(e.start(b, 8).unwrap_err(), BlitError::SystemToSystem);
        assert_eq!(vram.read_u8(SIZE - 1), 0x5a);
        assert!((0..SIZE - 1).all(|a| vram.read_u8(a) == 0), "nothing written");
    }

    #[test]
    fn solid_fill_and_colour_expansion_use_the_colours() {
        let vram = Vram::new(SIZE).unwrap();
        let e = engine(&vram);
        let mut b = blit(8, 2, 0, 16);
        b.mode = mode::PATTERNCOPY | mode::COLOREXPAND;
        b.mode_ext = mode_ext::SOLIDFILL;
        b.pixel_width = 2;
        b.fg = 0xabcd;
        e.start(b, 16).unwrap();
        assert_eq!(vram.read_u32(16), 0xabcd_abcd);
        assert_eq!(vram.read_u8(8), 0);
        // Opaque colour expansion of 0b1010_0000 from video memory at 0x100.
        vram.write_u8(0x100, 0xa0);
        let mut b = blit(4, 1, 0x200, 16);
        b.src_addr = 0x100;
        b.mode = mode::COLOREXPAND;
        b.fg = 0x11;
        b.bg = 0x22;
        e.start(b, 8).unwrap();
        let line: Vec<u8> = (0x200..0x204).map(|a| vram.read_u8(a)).collect();
        assert_eq!(line, [0x11, 0x22, 0x11, 0x22]);
    }

    #[test]
    fn system_to_video_draws_each_line_as_it_arrives() {
        let vram = Vram::new(SIZE).unwrap();
        let e = engine(&vram);
        let mut b = blit(6, 2, 0x40, 32);
        b.mode = mode::MEMSYSSRC;
        let Ok(Started::WaitingForSource(mut t)) = e.start(b, 8) else {
            panic!("waits for its source")
        };
        // Lines of 6 bytes go as 8 (dword padded).
        let done: Vec<bool> = (1..=16u8).map(|v| e.feed(&mut t, v)).collect();
        assert_eq!(done.iter().filter(|d| **d).count(), 1);
        assert!(done[15]);
        let first: Vec<u8> = (0x40..0x46).map(|a| vram.read_u8(a)).collect();
        assert_eq!(first, [1, 2, 3, 4, 5, 6]);
        let second: Vec<u8> = (0x60..0x66).map(|a| vram.read_u8(a)).collect();
        assert_eq!(second, [9, 10, 11, 12, 13, 14]);
        assert_eq!(vram.read_u8(0x46), 0);
    }

    #[test]
    fn random_blits_never_panic_nor_leave_video_memory() {
        let vram = Vram::new(SIZE).unwrap();
        let e = engine(&vram);
        let mut x = 0x9e37_79b9u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..3000 {
            let mut gr = [0u8; 0x40];
            for g in gr.iter_mut() {
                *g = next() as u8;
            }
            // Keep most blits small enough to run quickly.
            gr[0x21] &= 0x01;
            gr[0x23] &= 0x01;
            let regs = BlitRegs {
                gr0: next() as u8,
                gr1: next() as u8,
                gr: &gr,
            };
            let b = Blit::from_regs(&regs, e.addr_mask);
            if let Ok(Started::WaitingForSource(mut t)) = e.start(b, [0, 8, 16, 24, 32][(next() % 5) as usize]) {
                for _ in 0..(next() % 4096) {
                    if e.feed(&mut t, next() as u8) {
                        break;
                    }
                }
            }
        }
    }
}
