//! The RFB protocol's pixels and rectangles (RFC 6143; QEMU's `ui/vnc.c` pixel
//! conversion, `ui/vnc-enc-zrle.c`): a client's pixel format, raw rectangles, and ZRLE
//! rectangles (64x64 tiles, solid, packed-palette or raw, through one zlib stream per
//! client).

use std::io::Write;

use flate2::{Compress, Compression, FlushCompress};
use hw::core::console::Surface;

/// Encodings (RFC 6143 7.7, QEMU's `VNC_ENCODING_*`).
pub mod encoding {
    /// Raw pixels.
    pub const RAW: i32 = 0;
    /// ZRLE: zlib-compressed run-length tiles.
    pub const ZRLE: i32 = 16;
    /// Pseudo-encoding: the client follows changes of the framebuffer's size.
    pub const DESKTOP_SIZE: i32 = -223;
    /// Pseudo-encoding: QEMU's extended key events (raw keycodes with the keysym).
    pub const QEMU_EXTENDED_KEY_EVENT: i32 = -258;
}

/// A client's pixel format (RFC 6143 7.4): how the server writes a pixel for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelFormat {
    /// Bits per pixel: 8, 16 or 32.
    pub bits_per_pixel: u8,
    /// Useful bits.
    pub depth: u8,
    /// Multi-byte pixels are big-endian.
    pub big_endian: bool,
    /// True colour (colour maps are not supported).
    pub true_colour: bool,
    /// Largest red value.
    pub red_max: u16,
    /// Largest green value.
    pub green_max: u16,
    /// Largest blue value.
    pub blue_max: u16,
    /// Red's shift.
    pub red_shift: u8,
    /// Green's shift.
    pub green_shift: u8,
    /// Blue's shift.
    pub blue_shift: u8,
}

/// Why a client's pixel format cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PixelFormatError {
    /// A depth other than 8, 16 or 32 bits per pixel.
    #[error("{0} bits per pixel is not supported (8, 16 or 32)")]
    BitsPerPixel(u8),
    /// Colour-map (palette) formats.
    #[error("colour-map pixel formats are not supported")]
    ColourMap,
    /// A shift that puts a colour outside the pixel.
    #[error("a colour shifted by {0} does not fit {1} bits per pixel")]
    Shift(u8, u8),
}

impl PixelFormat {
    /// The server's own format, announced in `ServerInit` (QEMU's default): 32 bits,
    /// depth 24, little-endian `0x00RRGGBB`.
    pub const NATIVE: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// The format's 16 bytes on the wire.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    /// A client's `SetPixelFormat`, checked.
    pub fn from_bytes(b: &[u8; 16]) -> Result<PixelFormat, PixelFormatError> {
        let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let pf = PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: be16(4),
            green_max: be16(6),
            blue_max: be16(8),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        };
        if !matches!(pf.bits_per_pixel, 8 | 16 | 32) {
            return Err(PixelFormatError::BitsPerPixel(pf.bits_per_pixel));
        }
        if !pf.true_colour {
            return Err(PixelFormatError::ColourMap);
        }
        for shift in [pf.red_shift, pf.green_shift, pf.blue_shift] {
            if shift >= pf.bits_per_pixel {
                return Err(PixelFormatError::Shift(shift, pf.bits_per_pixel));
            }
        }
        Ok(pf)
    }

    /// Bytes per pixel.
    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// `0x00RRGGBB` as this format's pixel value.
    pub fn pixel(&self, rgb: u32) -> u32 {
        let scale = |v: u32, max: u16| (v * u32::from(max) + 127) / 255;
        let (r, g, b) = ((rgb >> 16) & 0xff, (rgb >> 8) & 0xff, rgb & 0xff);
        (scale(r, self.red_max) << self.red_shift)
            | (scale(g, self.green_max) << self.green_shift)
            | (scale(b, self.blue_max) << self.blue_shift)
    }

    /// Appends `rgb` as a pixel of this format.
    pub fn put(&self, out: &mut Vec<u8>, rgb: u32) {
        let v = self.pixel(rgb);
        match (self.bits_per_pixel, self.big_endian) {
            (8, _) => out.push(v as u8),
            (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&v.to_le_bytes()),
            (_, true) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }

    /// ZRLE's compact pixel (`CPIXEL`): a 32-bit true-colour format whose colours all fit
    /// in its three least (or most) significant bytes is sent as those three bytes.
    fn put_cpixel(&self, out: &mut Vec<u8>, rgb: u32) {
        if self.bits_per_pixel != 32 || self.depth > 24 {
            return self.put(out, rgb);
        }
        let mask = (u32::from(self.red_max) << self.red_shift)
            | (u32::from(self.green_max) << self.green_shift)
            | (u32::from(self.blue_max) << self.blue_shift);
        let v = self.pixel(rgb).to_le_bytes();
        let (fits_low, fits_high) = (mask & 0xff00_0000 == 0, mask & 0xff == 0);
        match (fits_low, fits_high, self.big_endian) {
            // The three bytes that carry colour, in the client's byte order.
            (true, _, false) => out.extend_from_slice(&v[..3]),
            (true, _, true) => out.extend_from_slice(&[v[2], v[1], v[0]]),
            (false, true, false) => out.extend_from_slice(&v[1..]),
            (false, true, true) => out.extend_from_slice(&[v[3], v[2], v[1]]),
            _ => self.put(out, rgb),
        }
    }
}

/// A rectangle of the framebuffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    /// Left edge.
    pub x: u16,
    /// Top edge.
    pub y: u16,
    /// Width.
    pub w: u16,
    /// Height.
    pub h: u16,
}

impl Rect {
    /// The rectangle header of a `FramebufferUpdate` (RFC 6143 7.6.1).
    pub fn header(&self, out: &mut Vec<u8>, encoding: i32) {
        for v in [self.x, self.y, self.w, self.h] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&encoding.to_be_bytes());
    }

    /// The part of this rectangle inside a `width` x `height` surface.
    pub fn clip(&self, width: u32, height: u32) -> Option<Rect> {
        let x1 = (u32::from(self.x) + u32::from(self.w)).min(width);
        let y1 = (u32::from(self.y) + u32::from(self.h)).min(height);
        let (x0, y0) = (u32::from(self.x), u32::from(self.y));
        (x0 < x1 && y0 < y1).then(|| Rect {
            x: self.x,
            y: self.y,
            w: (x1 - x0) as u16,
            h: (y1 - y0) as u16,
        })
    }
}

/// Appends `rect` of `surface` as raw pixels of `pf` (header included).
pub fn encode_raw(out: &mut Vec<u8>, surface: &Surface, rect: Rect, pf: &PixelFormat) {
    rect.header(out, encoding::RAW);
    out.reserve(usize::from(rect.w) * usize::from(rect.h) * pf.bytes_per_pixel());
    for y in rect.y..rect.y + rect.h {
        let row = surface.row(u32::from(y));
        for &rgb in &row[usize::from(rect.x)..usize::from(rect.x + rect.w)] {
            pf.put(out, rgb);
        }
    }
}

/// ZRLE's tiles are 64x64 pixels.
const ZRLE_TILE: u16 = 64;

/// One client's ZRLE state: the zlib stream lives as long as the connection (RFC 6143
/// 7.7.6), so each rectangle is compressed against what came before.
pub struct ZrleEncoder {
    zlib: Compress,
}

impl Default for ZrleEncoder {
    fn default() -> Self {
        ZrleEncoder {
            zlib: Compress::new(Compression::new(6), true),
        }
    }
}

impl ZrleEncoder {
    /// Appends `rect` of `surface` in ZRLE for `pf` (header, length, zlib data).
    pub fn encode(&mut self, out: &mut Vec<u8>, surface: &Surface, rect: Rect, pf: &PixelFormat) {
        let mut tiles = Vec::new();
        let mut ty = rect.y;
        while ty < rect.y + rect.h {
            let th = ZRLE_TILE.min(rect.y + rect.h - ty);
            let mut tx = rect.x;
            while tx < rect.x + rect.w {
                let tw = ZRLE_TILE.min(rect.x + rect.w - tx);
                encode_tile(
                    &mut tiles,
                    surface,
                    Rect {
                        x: tx,
                        y: ty,
                        w: tw,
                        h: th,
                    },
                    pf,
                );
                tx += tw;
            }
            ty += th;
        }
        let mut packed = Vec::with_capacity(tiles.len() / 2 + 64);
        let mut input = tiles.as_slice();
        loop {
            packed.reserve(input.len() / 2 + 1024);
            let before_in = self.zlib.total_in();
            // Appends to `packed`'s spare capacity; a sync flush ends the rectangle on a
            // byte boundary the client's inflater reaches.
            let status = self
                .zlib
                .compress_vec(input, &mut packed, FlushCompress::Sync);
            let taken = (self.zlib.total_in() - before_in) as usize;
            input = &input[taken..];
            match status {
                Ok(_) if input.is_empty() && packed.len() < packed.capacity() => break,
                Ok(_) => continue,
                Err(e) => {
                    // flate2 fails only on misuse; a rectangle lost is better than a panic.
                    log::error!("vnc: zlib: {e}");
                    break;
                }
            }
        }
        rect.header(out, encoding::ZRLE);
        out.extend_from_slice(&(packed.len() as u32).to_be_bytes());
        let _ = out.write_all(&packed);
    }
}

/// One ZRLE tile: solid (one colour), packed palette (2-16 colours) or raw, whichever the
/// tile's colours allow (RFC 6143 7.7.6).
fn encode_tile(out: &mut Vec<u8>, surface: &Surface, tile: Rect, pf: &PixelFormat) {
    let mut palette: Vec<u32> = Vec::with_capacity(16);
    let mut fits = true;
    'scan: for y in tile.y..tile.y + tile.h {
        let row = surface.row(u32::from(y));
        for &rgb in &row[usize::from(tile.x)..usize::from(tile.x + tile.w)] {
            if !palette.contains(&rgb) {
                if palette.len() == 16 {
                    fits = false;
                    break 'scan;
                }
                palette.push(rgb);
            }
        }
    }
    if fits && palette.len() == 1 {
        out.push(1);
        pf.put_cpixel(out, palette[0]);
        return;
    }
    if !fits {
        out.push(0);
        for y in tile.y..tile.y + tile.h {
            let row = surface.row(u32::from(y));
            for &rgb in &row[usize::from(tile.x)..usize::from(tile.x + tile.w)] {
                pf.put_cpixel(out, rgb);
            }
        }
        return;
    }
    out.push(palette.len() as u8);
    for &rgb in &palette {
        pf.put_cpixel(out, rgb);
    }
    let bits = match palette.len() {
        2 => 1,
        3 | 4 => 2,
        _ => 4,
    };
    for y in tile.y..tile.y + tile.h {
        let row = surface.row(u32::from(y));
        let (mut byte, mut used) = (0u8, 0);
        for &rgb in &row[usize::from(tile.x)..usize::from(tile.x + tile.w)] {
            let index = palette.iter().position(|&c| c == rgb).unwrap_or(0) as u8;
            byte = (byte << bits) | index;
            used += bits;
            if used == 8 {
                out.push(byte);
                (byte, used) = (0, 0);
            }
        }
        if used > 0 {
            // Rows end on a byte boundary, the indices in its high bits.
            out.push(byte << (8 - used));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn surface(width: u32, height: u32, f: impl Fn(u32, u32) -> u32) -> Surface {
        let mut s = Surface::new(width, height);
        for y in 0..height {
            for x in 0..width {
                s.row_mut(y)[x as usize] = f(x, y);
            }
        }
        s
    }

    #[test]
    fn pixel_formats_scale_shift_and_order() {
        let rgb565 = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: true,
            true_colour: true,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        };
        let mut out = Vec::new();
        rgb565.put(&mut out, 0xff_80_00);
        assert_eq!(out, (31u16 << 11 | 32 << 5).to_be_bytes());
        assert_eq!(PixelFormat::from_bytes(&rgb565.to_bytes()), Ok(rgb565));
        let mut bad = PixelFormat::NATIVE.to_bytes();
        bad[0] = 24;
        assert_eq!(
            PixelFormat::from_bytes(&bad),
            Err(PixelFormatError::BitsPerPixel(24))
        );
        let mut bad = PixelFormat::NATIVE.to_bytes();
        bad[3] = 0;
        assert_eq!(
            PixelFormat::from_bytes(&bad),
            Err(PixelFormatError::ColourMap)
        );
        let mut bad = PixelFormat::NATIVE.to_bytes();
        bad[10] = 40;
        assert!(PixelFormat::from_bytes(&bad).is_err());
    }

    /// A ZRLE decoder of the three subencodings the encoder writes.
    fn decode_zrle(data: &[u8], rect: Rect, zlib: &mut Decompress) -> Vec<u32> {
        let mut plain = Vec::with_capacity(1 << 20);
        zlib.decompress_vec(data, &mut plain, FlushDecompress::Sync)
            .unwrap();
        let mut at = 0;
        let mut take = |n: usize| {
            let s = plain[at..at + n].to_vec();
            at += n;
            s
        };
        let cpixel = |b: Vec<u8>| u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16;
        let mut pixels = vec![0u32; usize::from(rect.w) * usize::from(rect.h)];
        for ty in (0..rect.h).step_by(64) {
            for tx in (0..rect.w).step_by(64) {
                let (tw, th) = (64.min(rect.w - tx), 64.min(rect.h - ty));
                let kind = take(1)[0];
                let mut tile = Vec::new();
                match kind {
                    0 => (0..tw * th).for_each(|_| tile.push(cpixel(take(3)))),
                    1 => tile = vec![cpixel(take(3)); usize::from(tw * th)],
                    2..=16 => {
                        let palette: Vec<u32> = (0..kind).map(|_| cpixel(take(3))).collect();
                        let bits = match kind {
                            2 => 1,
                            3 | 4 => 2,
                            _ => 4,
                        };
                        for _ in 0..th {
                            let bytes = take((usize::from(tw) * bits).div_ceil(8));
                            for x in 0..usize::from(tw) {
                                let bit = x * bits;
                                let v =
                                    (bytes[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                tile.push(palette[usize::from(v)]);
                            }
                        }
                    }
                    _ => panic!("subencoding {kind}"),
                }
                for y in 0..th {
                    for x in 0..tw {
                        pixels[usize::from(ty + y) * usize::from(rect.w) + usize::from(tx + x)] =
                            tile[usize::from(y * tw + x)];
                    }
                }
            }
        }
        assert_eq!(at, plain.len(), "trailing data");
        pixels
    }

    #[test]
    fn zrle_rectangles_decode_to_the_surface() {
        // Solid, two-colour, five-colour and many-colour regions; a rectangle not a
        // multiple of 64 and not at the origin.
        let s = surface(300, 150, |x, y| match (x / 64, y / 64) {
            (0, _) => 0x102030,
            (1, _) => {
                if (x + y) % 3 == 0 {
                    0xffffff
                } else {
                    0x0000aa
                }
            }
            (2, _) => [0x11, 0x22, 0x33, 0x44, 0x55][(x % 5) as usize] << 8,
            _ => x * 7919 + y * 104729,
        });
        let mut enc = ZrleEncoder::default();
        let mut zlib = Decompress::new(true);
        for rect in [
            Rect {
                x: 0,
                y: 0,
                w: 300,
                h: 150,
            },
            Rect {
                x: 5,
                y: 7,
                w: 200,
                h: 70,
            },
        ] {
            let mut out = Vec::new();
            enc.encode(&mut out, &s, rect, &PixelFormat::NATIVE);
            assert_eq!(&out[8..12], &16i32.to_be_bytes());
            let len = u32::from_be_bytes(out[12..16].try_into().unwrap()) as usize;
            assert_eq!(out.len(), 16 + len);
            let pixels = decode_zrle(&out[16..], rect, &mut zlib);
            for y in 0..rect.h {
                for x in 0..rect.w {
                    assert_eq!(
                        pixels[usize::from(y) * usize::from(rect.w) + usize::from(x)],
                        s.row(u32::from(rect.y + y))[usize::from(rect.x + x)] & 0xffffff,
                        "({x}, {y}) of {rect:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn rects_clip_to_the_surface() {
        let r = Rect {
            x: 10,
            y: 10,
            w: 100,
            h: 100,
        };
        assert_eq!(
            r.clip(50, 200),
            Some(Rect {
                x: 10,
                y: 10,
                w: 40,
                h: 100
            })
        );
        assert_eq!(r.clip(10, 200), None);
    }
}
