//! Reading a VGA text screen from a picture of it (a `screendump`, a VNC client's
//! snapshot): cell by cell against the VGA BIOS's own font.

use std::path::Path;

/// The VGA BIOS's 8x16 font (256 glyphs of 16 rows), found by its 'A'.
pub fn rom_font(rom: &[u8]) -> Vec<u8> {
    let a = [
        0, 0, 0x10, 0x38, 0x6c, 0xc6, 0xc6, 0xfe, 0xc6, 0xc6, 0xc6, 0xc6, 0, 0, 0, 0,
    ];
    let at = rom
        .windows(16)
        .position(|w| w == a)
        .expect("the VGA BIOS carries an 8x16 font");
    let base = at - 0x41 * 16;
    rom[base..base + 256 * 16].to_vec()
}

/// A decoded PPM: width, height, RGB bytes.
pub struct Image {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// RGB bytes, row by row.
    pub rgb: Vec<u8>,
}

impl Image {
    /// Reads a binary PPM (P6, 8 bits a component).
    pub fn read_ppm(path: &Path) -> Image {
        let data = std::fs::read(path).unwrap();
        let mut fields = Vec::new();
        let mut at = 0;
        while fields.len() < 4 {
            while data[at].is_ascii_whitespace() {
                at += 1;
            }
            let start = at;
            while !data[at].is_ascii_whitespace() {
                at += 1;
            }
            fields.push(String::from_utf8(data[start..at].to_vec()).unwrap());
        }
        assert_eq!(fields[0], "P6");
        assert_eq!(fields[3], "255");
        let (width, height) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
        let rgb = data[at + 1..].to_vec();
        assert_eq!(rgb.len(), width * height * 3, "PPM size");
        Image { width, height, rgb }
    }

    /// The RGB of a pixel.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// Reads a 9x16-cell text screen by matching each cell's first 8 columns (set where
    /// not the background `bg`) against the font; '?' where nothing matches.
    pub fn text(&self, font: &[u8], bg: [u8; 3]) -> Vec<String> {
        let mut glyphs = std::collections::HashMap::new();
        // Printable ASCII wins where glyphs coincide (space and 0x00, 0xff).
        for ch in (0u8..=255).rev() {
            glyphs.insert(
                font[usize::from(ch) * 16..usize::from(ch) * 16 + 16].to_vec(),
                ch,
            );
        }
        for ch in 0x20u8..0x7f {
            glyphs.insert(
                font[usize::from(ch) * 16..usize::from(ch) * 16 + 16].to_vec(),
                ch,
            );
        }
        (0..self.height / 16)
            .map(|row| {
                (0..self.width / 9)
                    .map(|col| {
                        let cell: Vec<u8> = (0..16)
                            .map(|line| {
                                (0..8).fold(0u8, |bits, x| {
                                    let lit = self.pixel(col * 9 + x, row * 16 + line) != bg;
                                    bits | (u8::from(lit) << (7 - x))
                                })
                            })
                            .collect();
                        glyphs.get(&cell).map_or('?', |c| char::from(*c))
                    })
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect()
    }
}

/// The mean difference per colour component between two pictures of the same size (a
/// lossy JPEG of a screen against the screen).
pub fn mean_difference(a: &Image, b: &Image) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height), "picture sizes");
    let sum: u64 = a
        .rgb
        .iter()
        .zip(&b.rgb)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    sum as f64 / a.rgb.len().max(1) as f64
}
