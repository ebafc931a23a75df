//! The std VGA (`-device VGA`, `-vga std`, the pc's default display) and `screendump`.
//!
//! - over qtest: the PCI header and BARs, the VGA registers through the legacy ports and
//!   the MMIO BAR, the VBE registers (clamping of modes that do not fit), the linear
//!   framebuffer and the ROM BAR carrying `vgabios-stdvga.bin`;
//! - a text screen set up by hand (mode 3 registers, the 8x16 font of the VGA BIOS loaded
//!   into plane 2, characters and attributes at 0xb8000, a DAC palette) whose QMP
//!   screendump is compared pixel by pixel with what the font and palette say, and a
//!   VBE 32 bpp framebuffer written through BAR 0 and dumped as PNG;
//! - on KVM: SeaBIOS runs the VGA BIOS from the ROM BAR and its banner and "No bootable
//!   device." are read back from a screendump (cells matched against the BIOS's font),
//!   with `-device VGA`, with the default VGA of `-M pc`, and with `rombar=0` (the VGA
//!   BIOS then comes through fw_cfg's `vgaroms/`);
//! - the command line: `-vga` types and errors, the default VGA and what turns it off,
//!   `romfile=` errors, screendump errors;
//! - migration (issue 18): machines in this process on the qtest accelerator move a text
//!   screen, then a VBE mode, through the real stream and show the same pictures; a VGA
//!   with other video memory refuses the stream; and `migrate` to a file with
//!   `-incoming` in a second qomvm gives the same `screendump`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use test_support::fuzz_qtest::{hex, program_bars, PciFunction, Qtest};
use test_support::qmp::QmpClient;
use test_support::qtest::qomvm_pc_stderr;
use test_support::vga_text::{rom_font, Image};

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
const VGABIOS: &str = "/usr/share/seabios/vgabios-stdvga.bin";
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

fn vgabios_or_skip() -> Option<Vec<u8>> {
    test_support::skip::read_or_skip(VGABIOS, "seabios")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qomvm-vga-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
fn qtest_with_qmp(name: &str, extra: &[&str]) -> (Qtest, QmpClient, PathBuf) {
    Qtest::start_with_qmp(QOMVM, name, extra)
}

/// What the tests reach the VGA through: a qomvm process over qtest, or a machine in
/// this process (the migration tests).
trait GuestIo {
    fn out(&mut self, port: u16, value: u16, size: u32);
    fn input(&mut self, port: u16, size: u32) -> u16;
    /// Writes `data` at guest-physical `addr`.
    fn write_mem(&mut self, addr: u64, data: &[u8]);
    /// Reads `len` bytes at guest-physical `addr`.
    fn read_mem(&mut self, addr: u64, len: usize) -> Vec<u8>;
}

impl GuestIo for Qtest {
    fn out(&mut self, port: u16, value: u16, size: u32) {
        let op = if size == 1 { "outb" } else { "outw" };
        assert_eq!(self.cmd(format!("{op} 0x{port:x} 0x{value:x}")), "OK");
    }
    fn input(&mut self, port: u16, size: u32) -> u16 {
        let op = if size == 1 { "inb" } else { "inw" };
        self.value(format!("{op} 0x{port:x}")) as u16
    }
    fn write_mem(&mut self, addr: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(2048).enumerate() {
            let at = addr + i as u64 * 2048;
            let request = format!("write 0x{at:x} 0x{:x} {}", chunk.len(), hex(chunk));
            assert_eq!(self.cmd(request), "OK");
        }
    }
    fn read_mem(&mut self, addr: u64, len: usize) -> Vec<u8> {
        let reply = self.cmd(format!("read 0x{addr:x} 0x{len:x}"));
        let digits = reply.strip_prefix("OK 0x").expect("a read reply");
        (0..len)
            .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }
}

fn outb(qt: &mut impl GuestIo, port: u16, value: u8) {
    qt.out(port, value.into(), 1);
}

fn inb(qt: &mut impl GuestIo, port: u16) -> u8 {
    qt.input(port, 1) as u8
}

fn outw(qt: &mut impl GuestIo, port: u16, value: u16) {
    qt.out(port, value, 2);
}

fn inw(qt: &mut impl GuestIo, port: u16) -> u16 {
    qt.input(port, 2)
}

fn vbe_set(qt: &mut impl GuestIo, index: u16, value: u16) {
    outw(qt, 0x1ce, index);
    outw(qt, 0x1cf, value);
}

fn vbe_get(qt: &mut impl GuestIo, index: u16) -> u16 {
    outw(qt, 0x1ce, index);
    inw(qt, 0x1cf)
}

fn the_vga(functions: &[PciFunction]) -> &PciFunction {
    functions
        .iter()
        .find(|f| f.vendor_device == 0x1111_1234)
        .expect("a 1234:1111 function")
}

#[test]
fn the_default_vga_has_qemus_header_bars_and_rom() {
    let Some(rom) = vgabios_or_skip() else { return };
    let (mut qt, _qmp, _dir) = qtest_with_qmp("header", &[]);
    // QEMU's pc: the std VGA at 00:02.0, before any -device.
    let devfn = 2 << 3;
    assert_eq!(qt.pci_read32(devfn, 0), 0x1111_1234);
    assert_eq!(
        qt.pci_read32(devfn, 8),
        0x0300_0002,
        "class VGA, revision 2 (qext)"
    );
    assert_eq!(
        qt.pci_read32(devfn, 0x2c),
        0x1100_1af4,
        "QEMU's subsystem IDs"
    );
    // BAR 0: 16 MiB prefetchable; BAR 2: 4 KiB; ROM: the VGA BIOS's size rounded up.
    qt.pci_write32(devfn, 0x10, 0xffff_ffff);
    assert_eq!(qt.pci_read32(devfn, 0x10), 0xff00_0008);
    qt.pci_write32(devfn, 0x18, 0xffff_ffff);
    assert_eq!(qt.pci_read32(devfn, 0x18), 0xffff_f000);
    qt.pci_write32(devfn, 0x30, 0xffff_ffff);
    let rom_size = (rom.len() as u32).next_power_of_two();
    assert_eq!(qt.pci_read32(devfn, 0x30), !(rom_size - 1) | 1);

    let functions = program_bars(&mut qt);
    let (fb, fb_size) = (the_vga(&functions).bars[0].1, the_vga(&functions).bars[0].2);
    // The ROM BAR decodes once enabled, with the image (and 0xff past it).
    qt.pci_write32(devfn, 0x30, 0xd000_0001);
    let head = qt.cmd(format!("read 0xd0000000 0x{:x}", rom.len()));
    assert_eq!(head, format!("OK {}", hex(&rom)));
    assert_eq!(
        qt.value(format!("readb 0x{:x}", 0xd000_0000u64 + rom.len() as u64)),
        0xff
    );
    qt.pci_write32(devfn, 0x30, 0xd000_0000);
    assert_eq!(
        qt.value("readw 0xd0000000".into()),
        0xffff,
        "ROM decoding off"
    );

    // The framebuffer BAR is video memory: what VBE mode 13h-style chain-4 writes at
    // 0xa0000 put there is read back through BAR 0.
    assert_eq!(fb_size, 16 << 20);
    outb(&mut qt, 0x3c4, 4);
    outb(&mut qt, 0x3c5, 0x08);
    outb(&mut qt, 0x3c4, 2);
    outb(&mut qt, 0x3c5, 0x0f);
    outb(&mut qt, 0x3ce, 6);
    outb(&mut qt, 0x3cf, 0x05);
    assert_eq!(qt.cmd("writel 0xa0010 0x11223344".into()), "OK");
    assert_eq!(qt.value(format!("readl 0x{:x}", fb + 0x10)), 0x1122_3344);
    assert_eq!(qt.cmd(format!("writeb 0x{:x} 0x99", fb + 0x13)), "OK");
    assert_eq!(qt.value("readl 0xa0010".into()), 0x9922_3344);
}

#[test]
fn vga_and_vbe_registers_through_the_ports_and_the_mmio_bar() {
    if vgabios_or_skip().is_none() {
        return;
    }
    let (mut qt, _qmp, _dir) = qtest_with_qmp("regs", &[]);
    let functions = program_bars(&mut qt);
    let mmio = the_vga(&functions).bars[1].1;

    // Colour mode; a CRTC register by index/data, then through the MMIO BAR's mirror of
    // 0x3c0-0x3df as one 16-bit write (index first).
    outb(&mut qt, 0x3c2, 0x67);
    assert_eq!(inb(&mut qt, 0x3cc), 0x67);
    outb(&mut qt, 0x3d4, 0x0e);
    outb(&mut qt, 0x3d5, 0x12);
    assert_eq!(inb(&mut qt, 0x3d5), 0x12);
    assert_eq!(
        inb(&mut qt, 0x3b5),
        0xff,
        "mono CRTC ports off in colour mode"
    );
    assert_eq!(
        qt.cmd(format!("writew 0x{:x} 0x340f", mmio + 0x400 + 0x14)),
        "OK"
    );
    outb(&mut qt, 0x3d4, 0x0f);
    assert_eq!(inb(&mut qt, 0x3d5), 0x34);
    assert_eq!(qt.value(format!("readb 0x{:x}", mmio + 0x400 + 0x15)), 0x34);
    // The DAC: three writes per entry, reads in the same order.
    outb(&mut qt, 0x3c8, 7);
    for c in [0x3f, 0x20, 0x01] {
        outb(&mut qt, 0x3c9, c);
    }
    outb(&mut qt, 0x3c7, 7);
    assert_eq!(
        [
            inb(&mut qt, 0x3c9),
            inb(&mut qt, 0x3c9),
            inb(&mut qt, 0x3c9)
        ],
        [0x3f, 0x20, 0x01]
    );

    // VBE: the ID, video memory in 64 KiB units, capabilities.
    assert_eq!(vbe_get(&mut qt, 0), 0xb0c5);
    vbe_set(&mut qt, 0, 0x1234);
    assert_eq!(vbe_get(&mut qt, 0), 0xb0c5, "only known IDs are taken");
    assert_eq!(vbe_get(&mut qt, 0xa), 256);
    vbe_set(&mut qt, 4, 0x02);
    assert_eq!(vbe_get(&mut qt, 1), 16000, "GETCAPS: max x");
    assert_eq!(vbe_get(&mut qt, 2), 12000);
    assert_eq!(vbe_get(&mut qt, 3), 32);
    vbe_set(&mut qt, 4, 0);
    // A mode too big for 16 MiB is cut to what fits; bad depths become 8.
    vbe_set(&mut qt, 1, 4096);
    vbe_set(&mut qt, 2, 4096);
    vbe_set(&mut qt, 3, 32);
    vbe_set(&mut qt, 4, 0x41);
    assert_eq!(vbe_get(&mut qt, 2), 1024, "16 MiB / (4096 * 4) lines");
    assert_eq!(vbe_get(&mut qt, 7), 1024, "virtual height");
    vbe_set(&mut qt, 3, 7);
    assert_eq!(vbe_get(&mut qt, 3), 8);
    vbe_set(&mut qt, 1, 0xffff);
    assert_eq!(vbe_get(&mut qt, 1), 16000);
    // The same registers flat in the MMIO BAR at 0x500 + 2 * index.
    assert_eq!(qt.value(format!("readw 0x{:x}", mmio + 0x500 + 2)), 16000);
    assert_eq!(
        qt.cmd(format!("writew 0x{:x} 0x280", mmio + 0x500 + 2)),
        "OK"
    );
    assert_eq!(vbe_get(&mut qt, 1), 0x280);
    // QEMU's extended registers: size 8, little-endian framebuffer, switchable.
    assert_eq!(qt.value(format!("readl 0x{:x}", mmio + 0x600)), 8);
    assert_eq!(qt.value(format!("readl 0x{:x}", mmio + 0x604)), 0x1e1e_1e1e);
    assert_eq!(
        qt.cmd(format!("writel 0x{:x} 0xbebebebe", mmio + 0x604)),
        "OK"
    );
    assert_eq!(qt.value(format!("readl 0x{:x}", mmio + 0x604)), 0xbebe_bebe);
    // Anything anywhere: the VGA survives.
    let mut x = 0x9e37_79b9u32;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        match x % 4 {
            0 => outb(&mut qt, 0x3b0 + (x >> 8) as u16 % 0x30, (x >> 16) as u8),
            1 => outw(&mut qt, 0x1ce + (x >> 8) as u16 % 3, (x >> 12) as u16),
            2 => {
                let addr = 0xa0000 + u64::from(x >> 4) % 0x20000;
                assert_eq!(qt.cmd(format!("writeb 0x{addr:x} 0x{:x}", x >> 24)), "OK");
            }
            _ => {
                let addr = mmio + u64::from(x >> 4) % 0x1000;
                assert_eq!(qt.cmd(format!("writew 0x{addr:x} 0x{:x}", x >> 16)), "OK");
            }
        }
    }
    qt.check_alive();
}

/// Mode 3 as the VGA BIOS sets it (80x25, 9x16 cells), programmed port by port.
fn set_text_mode(qt: &mut impl GuestIo) {
    outb(qt, 0x3c2, 0x67);
    for (i, v) in [0x03u8, 0x00, 0x03, 0x00, 0x02].iter().enumerate() {
        outb(qt, 0x3c4, i as u8);
        outb(qt, 0x3c5, *v);
    }
    outb(qt, 0x3d4, 0x11);
    outb(qt, 0x3d5, 0x0e);
    let crtc = [
        0x5fu8, 0x4f, 0x50, 0x82, 0x55, 0x81, 0xbf, 0x1f, 0x00, 0x4f, 0x0d, 0x0e, 0x00, 0x00, 0x00,
        0x00, 0x9c, 0x8e, 0x8f, 0x28, 0x1f, 0x96, 0xb9, 0xa3, 0xff,
    ];
    for (i, v) in crtc.iter().enumerate() {
        outb(qt, 0x3d4, i as u8);
        outb(qt, 0x3d5, *v);
    }
    for (i, v) in [0u8, 0, 0, 0, 0, 0x10, 0x0e, 0x0f, 0xff].iter().enumerate() {
        outb(qt, 0x3ce, i as u8);
        outb(qt, 0x3cf, *v);
    }
    inb(qt, 0x3da);
    let attr = [
        0x00u8, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e,
        0x3f, 0x0c, 0x00, 0x0f, 0x08, 0x00,
    ];
    for (i, v) in attr.iter().enumerate() {
        outb(qt, 0x3c0, i as u8);
        outb(qt, 0x3c0, *v);
    }
    // The EGA palette in the DAC.
    outb(qt, 0x3c8, 0);
    for i in 0u8..64 {
        let c = |hi: u8, lo: u8| (((i >> hi) & 1) * 0x2a) + (((i >> lo) & 1) * 0x15);
        for v in [c(2, 5), c(1, 4), c(0, 3)] {
            outb(qt, 0x3c9, v);
        }
    }
    outb(qt, 0x3c0, 0x20);
}

/// Loads `font` (16 rows a glyph) into plane 2, as the VGA BIOS does.
fn load_font(qt: &mut impl GuestIo, font: &[u8]) {
    outb(qt, 0x3c4, 2);
    outb(qt, 0x3c5, 0x04);
    outb(qt, 0x3c4, 4);
    outb(qt, 0x3c5, 0x07);
    outb(qt, 0x3ce, 4);
    outb(qt, 0x3cf, 0x02);
    outb(qt, 0x3ce, 5);
    outb(qt, 0x3cf, 0x00);
    outb(qt, 0x3ce, 6);
    outb(qt, 0x3cf, 0x04);
    let mut glyphs = Vec::with_capacity(256 * 32);
    for g in font.chunks(16) {
        glyphs.extend_from_slice(g);
        glyphs.extend_from_slice(&[0; 16]);
    }
    qt.write_mem(0xa0000, &glyphs);
    outb(qt, 0x3c4, 2);
    outb(qt, 0x3c5, 0x03);
    outb(qt, 0x3c4, 4);
    outb(qt, 0x3c5, 0x02);
    outb(qt, 0x3ce, 4);
    outb(qt, 0x3cf, 0x00);
    outb(qt, 0x3ce, 5);
    outb(qt, 0x3cf, 0x10);
    outb(qt, 0x3ce, 6);
    outb(qt, 0x3cf, 0x0e);
}

/// The EGA colour of attribute nibble `n` (the palette `set_text_mode` loads).
fn ega(n: u8) -> [u8; 3] {
    let index = [
        0u8, 1, 2, 3, 4, 5, 0x14, 7, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e, 0x3f,
    ][usize::from(n)];
    let c = |hi: u8, lo: u8| (((index >> hi) & 1) * 0x2a) + (((index >> lo) & 1) * 0x15);
    let widen = |v: u8| (v << 2) | ((v & 1) << 1) | (v & 1);
    [widen(c(2, 5)), widen(c(1, 4)), widen(c(0, 3))]
}

/// QEMU's EDID region at the start of the MMIO BAR (`edid=on` by default): a valid EDID
/// 1.4 block, "QEMU Monitor" preferring 1280x800 or `xres` x `yres`, as Linux's
/// bochs-drm reads it; none under `edid=off`.
#[test]
fn the_mmio_bar_starts_with_the_edid() {
    let preferred = |e: &[u8]| {
        let d = &e[54..72];
        (
            u32::from(d[2]) | (u32::from(d[4] >> 4) << 8),
            u32::from(d[5]) | (u32::from(d[7] >> 4) << 8),
        )
    };
    for (name, extra, mode) in [
        ("edid-default", &[][..], Some((1280, 800))),
        (
            "edid-1024",
            &["-global", "VGA.xres=1024", "-global", "VGA.yres=768"][..],
            Some((1024, 768)),
        ),
        ("edid-off", &["-global", "VGA.edid=off"][..], None),
    ] {
        let (mut qt, _qmp, _dir) = qtest_with_qmp(name, extra);
        let functions = program_bars(&mut qt);
        let mmio = the_vga(&functions).bars[1].1;
        let e = qt.read_mem(mmio, 256);
        match mode {
            Some(mode) => {
                assert_eq!(
                    &e[..8],
                    &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0],
                    "{name}: the header"
                );
                assert_eq!(
                    e[..128].iter().fold(0u8, |a, b| a.wrapping_add(*b)),
                    0,
                    "{name}: the checksum"
                );
                assert_eq!((e[18], e[19]), (1, 4), "{name}: EDID 1.4");
                assert_eq!(preferred(&e), mode, "{name}: the preferred timing");
                assert_eq!(&e[77..89], b"QEMU Monitor", "{name}");
                // Read-only: a write changes nothing.
                assert_eq!(qt.cmd(format!("writeb 0x{mmio:x} 0x12")), "OK");
                assert_eq!(qt.read_mem(mmio, 1), [0], "{name}");
                // The VGA registers after it are still there.
                assert_eq!(qt.value(format!("readl 0x{:x}", mmio + 0x600)), 8, "{name}");
            }
            None => assert!(e.iter().all(|b| *b == 0xff), "{name}: no EDID, {e:x?}"),
        }
    }
}

#[test]
fn a_text_screen_dumps_as_the_font_and_palette_draw_it() {
    let Some(rom) = vgabios_or_skip() else { return };
    let font = rom_font(&rom);
    let (mut qt, mut qmp, dir) = qtest_with_qmp("text", &[]);
    set_text_mode(&mut qt);
    load_font(&mut qt, &font);
    // Row 0: a line of text in light grey on blue; row 24: every attribute colour pair
    // on 'Q' and a line-drawing character (its ninth column repeats the eighth).
    let line = b"qomvm VGA text: The quick brown fox jumps over the lazy dog 0123456789 !@#$%";
    let mut cells = Vec::new();
    for c in line {
        cells.extend_from_slice(&[*c, 0x17]);
    }
    assert_eq!(
        qt.cmd(format!("write 0xb8000 0x{:x} {}", cells.len(), hex(&cells))),
        "OK"
    );
    let mut bottom = Vec::new();
    for attr in 0u8..80 {
        let ch = if attr == 79 { 0xc4 } else { b'Q' };
        bottom.extend_from_slice(&[ch, attr.wrapping_mul(37)]);
    }
    assert_eq!(
        qt.cmd(format!(
            "write 0xb8f00 0x{:x} {}",
            bottom.len(),
            hex(&bottom)
        )),
        "OK"
    );
    // The cursor (mode 3: scan lines 13-14) on row 1, column 3, a blank in yellow on red.
    assert_eq!(qt.cmd("write 0xb80a6 0x2 0x204e".into()), "OK");
    outb(&mut qt, 0x3d4, 0x0e);
    outb(&mut qt, 0x3d5, 0x00);
    outb(&mut qt, 0x3d4, 0x0f);
    outb(&mut qt, 0x3d5, 83);
    let dump = dir.join("text.ppm");
    let reply = qmp.execute("screendump", json!({"filename": dump.to_str().unwrap()}));
    assert_eq!(reply, json!({"return": {}}));
    let image = Image::read_ppm(&dump);
    assert_eq!((image.width, image.height), (720, 400));

    let mut cells_seen = 0;
    for row in 0..25usize {
        for col in 0..80usize {
            let (ch, attr) = if row == 0 && col < line.len() {
                (line[col], 0x17)
            } else if row == 24 {
                (bottom[col * 2], bottom[col * 2 + 1])
            } else if (row, col) == (1, 3) {
                (b' ', 0x4e)
            } else {
                (0, 0)
            };
            let (fg, bg) = (ega(attr & 0xf), ega(attr >> 4));
            for y in 0..16 {
                let cursor = (row, col) == (1, 3) && (13..=14).contains(&y);
                let bits = if cursor {
                    0xff
                } else {
                    font[usize::from(ch) * 16 + y]
                };
                for x in 0..9 {
                    let on = if x < 8 {
                        bits & (0x80 >> x) != 0
                    } else {
                        // Line drawing (0xb0-0xdf) repeats column 8 (AR10 bit 2 is set);
                        // so does the cursor.
                        ((0xb0..=0xdf).contains(&ch) || cursor) && bits & 1 != 0
                    };
                    let want = if on { fg } else { bg };
                    let got = image.pixel(col * 9 + x, row * 16 + y);
                    assert_eq!(
                        got,
                        want,
                        "cell ({col}, {row}) '{}' pixel ({x}, {y})",
                        char::from(ch)
                    );
                }
            }
            cells_seen += 1;
        }
    }
    assert_eq!(cells_seen, 2000);
    let row0: String = image.text(&font, ega(1))[0]
        .chars()
        .take(line.len())
        .collect();
    assert_eq!(row0, String::from_utf8_lossy(line));

    // HMP's screendump writes the same picture; PNG has the same size.
    let hmp_dump = dir.join("hmp.ppm");
    let reply = qmp.execute(
        "human-monitor-command",
        json!({"command-line": format!("screendump {}", hmp_dump.display())}),
    );
    assert_eq!(reply, json!({"return": ""}));
    assert_eq!(
        std::fs::read(&hmp_dump).unwrap(),
        std::fs::read(&dump).unwrap()
    );
    let png_dump = dir.join("text.png");
    let reply = qmp.execute(
        "screendump",
        json!({"filename": png_dump.to_str().unwrap(), "format": "png"}),
    );
    assert_eq!(reply, json!({"return": {}}));
    let png = std::fs::read(&png_dump).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 720);
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 400);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vbe_framebuffer_written_through_bar0_dumps_as_written() {
    if vgabios_or_skip().is_none() {
        return;
    }
    let (mut qt, mut qmp, dir) = qtest_with_qmp("vbe", &[]);
    let functions = program_bars(&mut qt);
    let fb = the_vga(&functions).bars[0].1;
    vbe_set(&mut qt, 1, 64);
    vbe_set(&mut qt, 2, 48);
    vbe_set(&mut qt, 3, 32);
    vbe_set(&mut qt, 4, 0x41);
    outb(&mut qt, 0x3c0, 0x20);
    // A diagonal gradient: pixel (x, y) = (4x, 5y, x ^ y).
    for y in 0..48u64 {
        let line: Vec<u8> = (0..64u64)
            .flat_map(|x| [(x ^ y) as u8, (5 * y) as u8, (4 * x) as u8, 0])
            .collect();
        let addr = fb + y * 64 * 4;
        assert_eq!(
            qt.cmd(format!(
                "write 0x{addr:x} 0x{:x} {}",
                line.len(),
                hex(&line)
            )),
            "OK"
        );
    }
    let dump = dir.join("vbe.ppm");
    let reply = qmp.execute("screendump", json!({"filename": dump.to_str().unwrap()}));
    assert_eq!(reply, json!({"return": {}}));
    let image = Image::read_ppm(&dump);
    assert_eq!((image.width, image.height), (64, 48));
    for y in 0..48usize {
        for x in 0..64usize {
            assert_eq!(
                image.pixel(x, y),
                [(4 * x) as u8, (5 * y) as u8, (x ^ y) as u8],
                "({x}, {y})"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn screendump_errors_are_qemus() {
    let (_qt, mut qmp, dir) = qtest_with_qmp("errors", &["-device", "isa-debug-exit,id=dbg"]);
    let err = |v: Value| (v["error"]["class"].clone(), v["error"]["desc"].clone());
    let file = dir.join("x.ppm");
    let f = file.to_str().unwrap();
    assert_eq!(
        err(qmp.execute("screendump", json!({"filename": "/nonexistent/x.ppm"}))),
        (
            json!("GenericError"),
            json!("failed to open file '/nonexistent/x.ppm': No such file or directory")
        )
    );
    assert_eq!(
        err(qmp.execute("screendump", json!({"filename": f, "head": 1}))),
        (
            json!("GenericError"),
            json!("'head' must be specified together with 'device'")
        )
    );
    assert_eq!(
        err(qmp.execute("screendump", json!({"filename": f, "device": "nope"}))),
        (json!("DeviceNotFound"), json!("Device 'nope' not found"))
    );
    assert_eq!(
        err(qmp.execute("screendump", json!({"filename": f, "device": "dbg"}))),
        (
            json!("GenericError"),
            json!("Device dbg (head 0) is not bound to a QemuConsole")
        )
    );
    assert_eq!(
        err(qmp.execute("screendump", json!({"filename": f, "format": "jpg"}))),
        (
            json!("GenericError"),
            json!("Parameter 'format' does not accept value 'jpg'")
        )
    );
    // Before the guest sets a mode the VGA is blank: black, 640x480, as QEMU's.
    assert_eq!(
        qmp.execute("screendump", json!({"filename": f})),
        json!({"return": {}})
    );
    let image = Image::read_ppm(&file);
    assert_eq!((image.width, image.height), (640, 480));
    assert!(image.rgb.iter().all(|b| *b == 0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_display_there_is_no_console() {
    let (_qt, mut qmp, dir) = qtest_with_qmp("nodisplay", &["-vga", "none"]);
    let f = dir.join("x.ppm");
    let reply = qmp.execute("screendump", json!({"filename": f.to_str().unwrap()}));
    assert_eq!(
        reply["error"]["desc"],
        json!("There is no console to take a screendump from")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// How many `VGA` devices qomvm on qtest with `args` has (from `info qom-tree`), or its
/// error.
fn vga_count(args: &[&str]) -> Result<usize, String> {
    let tree = test_support::qtest::qomvm_pc_qom_tree(QOMVM, args)?;
    Ok(tree.matches("(VGA)").count())
}

#[test]
fn the_pc_has_a_std_vga_unless_told_otherwise() {
    assert_eq!(vga_count(&[]), Ok(1), "default display");
    assert_eq!(
        vga_count(&["-nographic"]),
        Ok(1),
        "QEMU 7.2 keeps it under -nographic"
    );
    assert_eq!(vga_count(&["-vga", "std"]), Ok(1));
    assert_eq!(vga_count(&["-vga", "std,retrace=dumb"]), Ok(1));
    assert_eq!(vga_count(&["-vga", "none"]), Ok(0));
    assert_eq!(vga_count(&["-nodefaults"]), Ok(0));
    assert_eq!(
        vga_count(&["-device", "VGA"]),
        Ok(1),
        "a display -device replaces it"
    );
    assert_eq!(
        vga_count(&[
            "-nodefaults",
            "-device",
            r#"{"driver":"VGA","id":"video0"}"#
        ]),
        Ok(1)
    );
    assert_eq!(
        vga_count(&["-vga", "std", "-device", "VGA"]),
        Ok(2),
        "-vga and -device: both"
    );
    assert_eq!(
        vga_count(&["-vga", "none", "-vga", "std"]),
        Ok(1),
        "the last -vga wins"
    );
    assert_eq!(
        vga_count(&["-vga", "foo"]),
        Err("qomvm: unknown vga type: foo".into())
    );
    assert_eq!(
        vga_count(&["-vga", "cirrus"]),
        Ok(0),
        "the Cirrus instead of the std VGA"
    );
    assert_eq!(vga_count(&["-vga", "cirrus", "-vga", "std"]), Ok(1));
    assert_eq!(
        vga_count(&["-vga", "qxl"]),
        Err("qomvm: QXL VGA not available".into())
    );
    assert_eq!(
        vga_count(&["-vga", "stdx"]),
        Err("qomvm: unknown vga type: stdx".into())
    );
}

#[test]
fn vga_help_and_romfile_errors() {
    let out = Command::new(QOMVM).args(["-vga", "help"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "none                 no graphic card\nstd                  standard VGA (default)\ncirrus               Cirrus VGA\nvirtio               Virtio VGA\n"
    );
    let dir = scratch("rom");
    let empty = dir.join("empty.rom");
    std::fs::write(&empty, b"").unwrap();
    let e = empty.display();
    assert_eq!(
        qomvm_pc_stderr(QOMVM, &["-device", "VGA,romfile=/nonexistent.bin"]),
        (false, "qomvm: -device VGA,romfile=/nonexistent.bin: failed to find romfile \"/nonexistent.bin\"".into())
    );
    assert_eq!(
        qomvm_pc_stderr(QOMVM, &["-device", &format!("VGA,romfile={e}")]),
        (
            false,
            format!("qomvm: -device VGA,romfile={e}: romfile \"{e}\" is empty")
        )
    );
    let big = dir.join("big.rom");
    std::fs::write(&big, vec![0u8; 5000]).unwrap();
    let b = big.display();
    assert_eq!(
        qomvm_pc_stderr(QOMVM, &["-device", &format!("VGA,romfile={b},romsize=4096")]),
        (false, format!("qomvm: -device VGA,romfile={b},romsize=4096: romfile \"{b}\" (5000 bytes) is too large for ROM size 4096"))
    );
    // No ROM at all, or other sizes of memory: fine.
    assert_eq!(
        vga_count(&["-nodefaults", "-device", "VGA,romfile=,vgamem_mb=3"]),
        Ok(1)
    );
    assert_eq!(
        vga_count(&["-nodefaults", "-device", "VGA,vgamem_mb=0,mmio=off"]),
        Ok(1)
    );
    assert_eq!(
        vga_count(&["-nodefaults", "-device", "VGA,vgamem_mb=4096,rombar=0"]),
        Ok(1)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn kvm_or_skip() -> bool {
    if let Some(reason) = test_support::vm::kvm_unusable() {
        test_support::skip::skip_kvm(reason);
        return false;
    }
    true
}

/// The 80x25 text screen as `screendump` shows it (read with `font`), taken every 100 ms
/// until `done` says so or `tries` run out: the last one.
fn text_screen_until(
    qmp: &mut QmpClient,
    dir: &Path,
    font: &[u8],
    tries: u32,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let dump = dir.join("screen.ppm");
    let mut lines = Vec::new();
    for _ in 0..tries {
        let reply = qmp.execute("screendump", json!({"filename": dump.to_str().unwrap()}));
        assert_eq!(reply, json!({"return": {}}));
        let image = Image::read_ppm(&dump);
        assert_eq!(
            (image.width, image.height),
            (720, 400),
            "80x25 text, 9x16 cells"
        );
        lines = image.text(font, [0, 0, 0]);
        if done(&lines) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    lines
}

/// SeaBIOS boots with the VGA given by `display` on KVM until it finds nothing to boot;
/// the screendump shows its banner, read cell by cell with the VGA BIOS's font.
fn seabios_banner_on_the_screen(name: &str, display: &[&str]) {
    if !kvm_or_skip() {
        return;
    }
    if !Path::new(SEABIOS).is_file() {
        test_support::skip::skip(format!("{SEABIOS} is missing (Debian package 'seabios')"));
        return;
    }
    let Some(rom) = vgabios_or_skip() else { return };
    let font = rom_font(&rom);
    let dir = scratch(name);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut args = vec![
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nographic",
        "-serial",
        "stdio",
        // No default card: with no disk SeaBIOS would boot its iPXE ROM, whose
        // protected-mode code faults on PVM (under QEMU too).
        "-nic",
        "none",
    ];
    args.extend_from_slice(display);
    args.extend_from_slice(&["-qmp", &qmp_arg]);
    let mut vm = test_support::console::ConsoleVm::start(QOMVM, &args, Duration::from_secs(120));
    vm.wait_for(&["No bootable device."]);
    let mut qmp = QmpClient::connect(&sock);
    // The VGA BIOS may still be drawing what the serial console already shows.
    let lines = text_screen_until(&mut qmp, &dir, &font, 50, |lines| {
        lines.iter().any(|l| l.contains("No bootable device."))
    });
    assert!(
        lines[0].starts_with("SeaBIOS (version "),
        "screen: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l == "No bootable device."),
        "screen: {lines:#?}"
    );
    let _ = qmp.execute("quit", json!({}));
    let _ = vm.wait_exit();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seabios_shows_its_banner_on_device_vga() {
    seabios_banner_on_the_screen(
        "kvm-device",
        &["-nodefaults", "-device", "VGA,id=video0,bus=pci.0,addr=0x2"],
    );
}

#[test]
fn seabios_shows_its_banner_on_the_default_vga() {
    seabios_banner_on_the_screen("kvm-default", &[]);
}

#[test]
fn seabios_shows_its_banner_on_vga_cirrus() {
    seabios_banner_on_the_screen("kvm-cirrus", &["-vga", "cirrus"]);
}

/// The issue's seed pair's device on KVM: SeaBIOS runs `vgabios-cirrus.bin` from its ROM BAR.
#[test]
fn seabios_shows_its_banner_on_device_cirrus_vga() {
    seabios_banner_on_the_screen(
        "kvm-cirrus-device",
        &[
            "-nodefaults",
            "-device",
            "cirrus-vga,id=video0,bus=pci.0,addr=0x2",
        ],
    );
}

/// virtio-vga: SeaBIOS runs `vgabios-virtio.bin`, which finds the VGA's registers at
/// the start of BAR 2, before the virtio structures.
#[test]
fn seabios_shows_its_banner_on_vga_virtio() {
    seabios_banner_on_the_screen("kvm-virtio", &["-vga", "virtio"]);
}

#[test]
fn seabios_runs_the_vga_bios_from_fw_cfg_under_rombar_0() {
    seabios_banner_on_the_screen("kvm-rombar0", &["-nodefaults", "-device", "VGA,rombar=0"]);
}

/// Where the in-process machines' VGA BARs are programmed.
const LOCAL_FB: u64 = 0xe000_0000;
const LOCAL_MMIO: u64 = 0xe100_0000;
/// The VGA's path in [`local_pc`]'s machines (not added under the root: paths start at it).
const LOCAL_VGA: &str = "/peripheral-anon/device[0]";

/// A `pc` machine in this process, on the qtest accelerator, with a std VGA at 00:02.0
/// (with `props`, e.g. `vgamem_mb=16`) whose BARs are programmed as firmware would; the migration tests move
/// one machine's state into another through the real stream.
struct Local {
    machine: qom::ObjectRef,
    io: std::sync::Arc<hw::core::memory::AddressSpace>,
    mem: std::sync::Arc<hw::core::memory::AddressSpace>,
}

impl GuestIo for Local {
    fn out(&mut self, port: u16, value: u16, size: u32) {
        self.io.write(port.into(), value.into(), size);
    }
    fn input(&mut self, port: u16, size: u32) -> u16 {
        self.io.read(port.into(), size) as u16
    }
    fn write_mem(&mut self, addr: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.mem.write(addr + i as u64, (*b).into(), 1);
        }
    }
    fn read_mem(&mut self, addr: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| self.mem.read(addr + i, 1) as u8)
            .collect()
    }
}

fn local_pc(props: &str) -> Local {
    use hw::core::machine::{machine_creation_done, machine_run_board_init, machine_state};
    accel::init().expect("registrations are intact");
    let machine = qom::object_new("pc-i440fx-10.0-machine").unwrap();
    let ms = machine_state(&machine).unwrap();
    ms.set_ram_size(64 << 20);
    let qtest = accel::accel_find("qtest").unwrap();
    accel::accel_init_machine(qtest, &machine).unwrap();
    machine_run_board_init(&machine).unwrap();
    let bus = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let vga = hw::core::qdev::qdev_new("VGA").unwrap();
    vga.property_parse("addr", "02.0").unwrap();
    for prop in props.split(',') {
        let (name, value) = prop.split_once('=').unwrap();
        vga.property_parse(name, value).unwrap();
    }
    machine
        .child("peripheral-anon")
        .unwrap()
        .add_child("device[*]", &vga)
        .unwrap();
    hw::core::qdev::qdev_realize(&vga, Some(&bus)).unwrap();
    machine_creation_done(&machine).unwrap();
    let config = test_support::virtio::PciConfig::new(&machine, 2 << 3);
    config.write(0x10, LOCAL_FB as u32, 4);
    config.write(0x18, LOCAL_MMIO as u32, 4);
    config.write(0x04, 0x3, 2);
    hw::core::runstate::vm_start(ms).unwrap();
    Local {
        io: ms.system_io().clone(),
        mem: ms.system_memory().clone(),
        machine,
    }
}

impl Local {
    /// What `screendump` would write: the first console's picture now.
    fn screen(&self) -> hw::core::console::Surface {
        let ms = hw::core::machine::machine_state(&self.machine).unwrap();
        ms.services()
            .consoles()
            .first()
            .expect("a console")
            .update()
    }

    /// The stream `migrate` sends once the machine stopped.
    fn stream(&self) -> Vec<u8> {
        use hw::core::runstate::{vm_stop, RunStatus};
        let ms = hw::core::machine::machine_state(&self.machine).unwrap();
        vm_stop(ms, RunStatus::FinishMigrate).unwrap();
        let mut out = Vec::new();
        hw::core::migration::save_vm(&self.machine, &mut out, &mut Default::default()).unwrap();
        out
    }

    /// A new machine (its VGA with `props`) that loaded this one's stream and runs.
    fn migrate(&self, props: &str) -> Result<Local, hw::core::migration::MigrationError> {
        let stream = self.stream();
        let dst = local_pc(props);
        let ms = hw::core::machine::machine_state(&dst.machine).unwrap();
        hw::core::runstate::vm_stop(ms, hw::core::runstate::RunStatus::InMigrate).unwrap();
        hw::core::migration::load_vm(&dst.machine, &mut stream.as_slice(), None)?;
        hw::core::runstate::vm_start(ms).unwrap();
        Ok(dst)
    }

    /// The VGA's section as the stream carries it.
    fn vga_section(&self) -> hw::core::vmstate::VmStateSection {
        let mut states = hw::core::migration::device_states(&self.machine).unwrap();
        let (kind, section) = states.remove(LOCAL_VGA).expect("the VGA has a section");
        assert_eq!(kind, "VGA");
        section
    }
}

fn same_screen(a: &hw::core::console::Surface, b: &hw::core::console::Surface, what: &str) {
    assert_eq!((a.width, a.height), (b.width, b.height), "{what}: size");
    let differ = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(differ, 0, "{what}: {differ} pixels differ");
}

/// Issue 18 for the VGA: a text screen (font, characters, palette, cursor) moves to a
/// second machine, which then sets a VBE mode with a display offset and a picture in
/// the framebuffer BAR and moves to a third. Each destination shows what its source
/// showed, reads the same registers, goes on from a half-written DAC entry, and has the
/// same video memory behind the window and BAR 0. A text screen's section carries the
/// few pages that hold something, not 16 MiB.
#[test]
fn the_vga_moves_with_its_screen_registers_and_video_memory() {
    let Some(rom) = vgabios_or_skip() else { return };
    let font = rom_font(&rom);
    let mut src = local_pc("vgamem_mb=16");
    set_text_mode(&mut src);
    load_font(&mut src, &font);
    let mut cells = Vec::new();
    for c in b"moved by qomvm" {
        cells.extend_from_slice(&[*c, 0x1e]);
    }
    src.write_mem(0xb8000 + 160 * 3, &cells);
    outb(&mut src, 0x3d4, 0x0e);
    outb(&mut src, 0x3d5, 0x01);
    outb(&mut src, 0x3d4, 0x0f);
    outb(&mut src, 0x3d5, 0x05);
    // Palette entry 0x30 half written: one of its three components.
    outb(&mut src, 0x3c8, 0x30);
    outb(&mut src, 0x3c9, 0x11);
    let text_screen = src.screen();
    assert_eq!((text_screen.width, text_screen.height), (720, 400));

    let section = src.vga_section();
    let pages: Vec<u32> = section.get("vram_pages").unwrap();
    assert!(
        !pages.is_empty() && pages.len() <= 8,
        "a text screen with its font is at most 8 pages: {pages:?}"
    );
    assert_eq!(section.get::<u64>("vram_size").unwrap(), 16 << 20);

    let mut dst = src.migrate("vgamem_mb=16").unwrap();
    same_screen(&dst.screen(), &text_screen, "text screen");
    assert_eq!(inb(&mut dst, 0x3cc), 0x67);
    outb(&mut dst, 0x3d4, 0x0f);
    assert_eq!(inb(&mut dst, 0x3d5), 0x05, "cursor location");
    assert_eq!(dst.read_mem(0xb8000 + 160 * 3, cells.len()), cells);
    outb(&mut dst, 0x3c9, 0x22);
    outb(&mut dst, 0x3c9, 0x33);
    outb(&mut dst, 0x3c7, 0x30);
    let entry = [
        inb(&mut dst, 0x3c9),
        inb(&mut dst, 0x3c9),
        inb(&mut dst, 0x3c9),
    ];
    assert_eq!(entry, [0x11, 0x22, 0x33], "the DAC went on with its entry");

    // A 64x48 32 bpp VBE mode shown from line 8 of a picture written through BAR 0.
    vbe_set(&mut dst, 1, 64);
    vbe_set(&mut dst, 2, 48);
    vbe_set(&mut dst, 3, 32);
    vbe_set(&mut dst, 4, 0x41);
    vbe_set(&mut dst, 9, 8);
    outb(&mut dst, 0x3c0, 0x20);
    let picture: Vec<u8> = (0..56u64 * 64)
        .flat_map(|i| {
            let (x, y) = (i % 64, i / 64);
            [(x ^ y) as u8, (5 * y) as u8, (4 * x) as u8, 0]
        })
        .collect();
    dst.write_mem(LOCAL_FB, &picture);
    let vbe_screen = dst.screen();
    assert_eq!((vbe_screen.width, vbe_screen.height), (64, 48));
    assert_eq!(
        vbe_screen.pixels[0],
        ((8 * 5) << 8) | 8,
        "line 8 at the top"
    );
    let registers: Vec<u16> = (0..10).map(|i| vbe_get(&mut dst, i)).collect();

    let mut dst2 = dst.migrate("vgamem_mb=16").unwrap();
    same_screen(&dst2.screen(), &vbe_screen, "VBE screen");
    let moved: Vec<u16> = (0..10).map(|i| vbe_get(&mut dst2, i)).collect();
    assert_eq!(moved, registers, "VBE registers");
    let yres = dst2.read_mem(LOCAL_MMIO + 0x500 + 2 * 2, 2);
    assert_eq!(yres, [48, 0], "YRES through the MMIO BAR");
    assert_eq!(
        dst2.read_mem(LOCAL_FB, picture.len()),
        picture,
        "the framebuffer through BAR 0"
    );
}

/// A destination whose VGA has other video memory, or lacks the MMIO BAR or QEMU's
/// extended registers the source had, refuses the section, naming the difference.
#[test]
fn a_vga_configured_otherwise_refuses_the_stream() {
    if vgabios_or_skip().is_none() {
        return;
    }
    let src = local_pc("vgamem_mb=16");
    for (props, why) in [
        (
            "vgamem_mb=8",
            "VGA: 16 MiB of video memory in the stream, 8 MiB here (vgamem_mb)",
        ),
        ("mmio=off", "VGA: mmio=on in the stream, mmio=off here"),
        (
            "qemu-extended-regs=off",
            "VGA: qemu-extended-regs=on in the stream, qemu-extended-regs=off here",
        ),
    ] {
        let err = src.migrate(props).err().expect(props);
        assert!(
            matches!(err, hw::core::migration::MigrationError::Device { .. }),
            "{props}: {err}"
        );
        assert_eq!(
            err.to_string(),
            format!("error while loading state for instance 0x0 of device '{LOCAL_VGA}': {why}"),
            "{props}"
        );
    }
}

/// The same through the monitor: `migrate` to a file, a second qomvm restores it with
/// `-incoming`, and its `screendump` is the source's, byte for byte. The file holds the
/// text screen's few pages, not all of video memory.
#[test]
fn a_text_screen_is_the_same_after_migrate_and_incoming() {
    let Some(rom) = vgabios_or_skip() else { return };
    let font = rom_font(&rom);
    let (mut qt, mut qmp, dir) = qtest_with_qmp("mig-src", &[]);
    set_text_mode(&mut qt);
    load_font(&mut qt, &font);
    let mut cells = Vec::new();
    for c in b"screendump after -incoming" {
        cells.extend_from_slice(&[*c, 0x4f]);
    }
    qt.write_mem(0xb8000 + 160 * 10, &cells);
    let before = dir.join("before.ppm");
    let reply = qmp.execute("screendump", json!({"filename": before.to_str().unwrap()}));
    assert_eq!(reply, json!({"return": {}}));
    let state = dir.join("vga.state");
    let uri = format!("file:{}", state.display());
    assert_eq!(
        qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let info = qmp.wait_migration(Duration::from_secs(30));
    assert_eq!(info["return"]["status"], "completed", "{info}");
    use std::os::unix::fs::MetadataExt;
    let stored = std::fs::metadata(&state).unwrap().blocks() * 512;
    assert!(stored < 2 << 20, "{stored} bytes stored for a text screen");

    let (mut dst, mut dst_qmp, dst_dir) = qtest_with_qmp("mig-dst", &["-incoming", &uri]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dst_qmp.execute("query-status", json!({}))["return"]["status"] != "running" {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = dst_dir.join("after.ppm");
    let reply = dst_qmp.execute("screendump", json!({"filename": after.to_str().unwrap()}));
    assert_eq!(reply, json!({"return": {}}));
    assert!(
        std::fs::read(&after).unwrap() == std::fs::read(&before).unwrap(),
        "the screendumps differ"
    );
    let image = Image::read_ppm(&after);
    let row: String = image.text(&font, ega(4))[10].chars().take(26).collect();
    assert_eq!(row, "screendump after -incoming");
    assert_eq!(inb(&mut dst, 0x3cc), 0x67);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dst_dir);
}

/// SeaBIOS with `-boot menu=on` on KVM shows "Press ESC for boot menu."; `press` types
/// Escape (given QMP and the VNC port); the menu must open.
fn seabios_boot_menu_opens(name: &str, extra: &[&str], press: impl FnOnce(&mut QmpClient, u16)) {
    if !kvm_or_skip() {
        return;
    }
    if !Path::new(SEABIOS).is_file() || !Path::new("/usr/share/qemu/keymaps/en-us").exists() {
        test_support::skip::skip(
            "SeaBIOS and QEMU's keymaps are needed (seabios, qemu-system-data)",
        );
        return;
    }
    let Some(rom) = vgabios_or_skip() else { return };
    let font = rom_font(&rom);
    let dir = scratch(name);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut child = Command::new(QOMVM)
        .args(["-M", "pc", "-accel", "kvm", "-m", "128", "-display", "none"])
        .args(["-serial", "null", "-boot", "menu=on,splash-time=60000"])
        .args(["-vnc", "127.0.0.1:0,to=99", "-qmp", &qmp_arg])
        .args(extra)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut qmp = QmpClient::connect(&sock);
    let port: u16 = qmp.execute("query-vnc", json!({}))["return"]["service"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let dump = dir.join("screen.ppm");
    let mut screen = |qmp: &mut QmpClient| {
        let reply = qmp.execute("screendump", json!({"filename": dump.to_str().unwrap()}));
        assert_eq!(reply, json!({"return": {}}));
        Image::read_ppm(&dump).text(&font, [0, 0, 0])
    };
    let wait_for =
        |qmp: &mut QmpClient, screen: &mut dyn FnMut(&mut QmpClient) -> Vec<String>, line: &str| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let lines = screen(qmp);
                if lines.iter().any(|l| l == line) {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no '{line}' on {lines:#?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        };
    wait_for(&mut qmp, &mut screen, "Press ESC for boot menu.");
    press(&mut qmp, port);
    wait_for(&mut qmp, &mut screen, "Select boot device:");
    let _ = qmp.execute("quit", json!({}));
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 17: a key typed over VNC reaches the guest: Escape sent by a VNC client (keysym
/// 0xff1b through QEMU's en-us keymap, the i8042 translating it to set 1, SeaBIOS's PS/2
/// keyboard driver, which it sets up because the DSDT describes the keyboard) opens
/// SeaBIOS's boot menu.
#[test]
fn escape_typed_over_vnc_opens_seabios_boot_menu() {
    use std::io::Write;
    seabios_boot_menu_opens("vnc-esc", &[], |_, port| {
        let mut vnc = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        vnc.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        test_support::vnc::rfb_handshake(&mut vnc, None).unwrap();
        for down in [1u8, 0] {
            vnc.write_all(&[4, down, 0, 0, 0, 0, 0xff, 0x1b]).unwrap();
        }
    });
}

/// The same Escape on a USB keyboard: SeaBIOS's UHCI driver finds `usb-kbd` on `-usb`'s
/// controller, and QMP's `send-key` (the newest keyboard, the USB one, takes it) opens
/// the menu through the HID boot protocol.
#[test]
fn escape_on_a_usb_keyboard_opens_seabios_boot_menu() {
    seabios_boot_menu_opens("usb-esc", &["-usb", "-device", "usb-kbd"], send_escape);
}

/// QMP's `send-key` of Escape, held 200 ms (the newest keyboard, a USB one where there is
/// one, takes it). SeaBIOS set its USB keyboard up before the prompt (its USB setup ends
/// before the boot menu), so a key it did not read through the controller would be lost.
fn send_escape(qmp: &mut QmpClient, _: u16) {
    let reply = qmp.execute(
        "send-key",
        json!({"keys": [{"type": "qcode", "data": "esc"}], "hold-time": 200}),
    );
    assert_eq!(reply, json!({"return": {}}));
}

/// The same through `qemu-xhci`: SeaBIOS's xHCI driver enables a slot, addresses the
/// keyboard, configures its interrupt endpoint and polls it through the transfer ring.
#[test]
fn escape_on_a_usb_keyboard_behind_xhci_opens_seabios_boot_menu() {
    seabios_boot_menu_opens(
        "xhci-esc",
        &[
            "-device",
            "qemu-xhci,id=xhci",
            "-device",
            "usb-kbd,bus=xhci.0",
        ],
        send_escape,
    );
}

/// The keyboard behind a `usb-hub` on `qemu-xhci`: SeaBIOS addresses it through the
/// hub by its route string.
#[test]
fn escape_on_a_usb_keyboard_behind_a_hub_on_xhci_opens_seabios_boot_menu() {
    seabios_boot_menu_opens(
        "xhci-hub-esc",
        &[
            "-device",
            "qemu-xhci,id=xhci",
            "-device",
            "usb-hub,bus=xhci.0,port=2",
            "-device",
            "usb-kbd,bus=xhci.0,port=2.3",
        ],
        send_escape,
    );
}

/// On KVM the framebuffer's slot logs the vCPUs' writes for the display (QEMU's
/// `DIRTY_MEMORY_VGA`) beside a migration's log: a guest that writes one pixel on line
/// 100 and one on line 300 of a 640x480x32 VBE screen makes the console redraw only the
/// lines of those two pages, and the migration's dirty pages have both too, whichever of
/// the two reads KVM's log first. An idle screen redraws nothing.
#[test]
fn guest_writes_redraw_only_their_lines_on_kvm() {
    use test_support::guest::{self, Mode, Op};
    use vm_memory::{Bytes, GuestAddress};
    if !kvm_or_skip() {
        return;
    }
    let line = |y: u64| LOCAL_FB + y * 2560 + 40;
    let image = guest::build(
        Mode::Protected32,
        &[
            Op::MmioWriteL {
                addr: line(100) as u32,
                value: 0x00ff_00ff,
            },
            Op::MmioWriteL {
                addr: line(300) as u32,
                value: 0x0000_ff00,
            },
        ],
        test_support::vm::EXIT_PORT,
        0,
    );
    use hw::core::machine::{machine_creation_done, machine_run_board_init, machine_state};
    accel::init().expect("registrations are intact");
    let machine = qom::object_new("pc-i440fx-10.0-machine").unwrap();
    let ms = machine_state(&machine).unwrap();
    ms.set_ram_size(64 << 20);
    accel::accel_init_machine(accel::accel_find("kvm").unwrap(), &machine).unwrap();
    machine_run_board_init(&machine).unwrap();
    let bus = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let vga = hw::core::qdev::qdev_new("VGA").unwrap();
    vga.property_parse("addr", "02.0").unwrap();
    machine
        .child("peripheral-anon")
        .unwrap()
        .add_child("device[*]", &vga)
        .unwrap();
    hw::core::qdev::qdev_realize(&vga, Some(&bus)).unwrap();
    machine_creation_done(&machine).unwrap();
    let config = test_support::virtio::PciConfig::new(&machine, 2 << 3);
    config.write(0x10, LOCAL_FB as u32, 4);
    config.write(0x04, 0x3, 2);
    let io = ms.system_io().clone();
    for (index, value) in [(4u64, 0u64), (1, 640), (2, 480), (3, 32), (4, 0x41)] {
        io.write(0x1ce, index, 2);
        io.write(0x1cf, value, 2);
    }
    io.write(0x3c0, 0x20, 1);
    ms.ram()
        .write_slice(&image.bytes, GuestAddress(image.load_addr))
        .unwrap();
    ms.cpus()[0]
        .downcast::<hw::i386::x86_cpu::X86Cpu>()
        .unwrap()
        .set_boot_state(test_support::vm::real_mode_boot_state(&image));

    let console = ms.services().consoles().first().expect("a console");
    let first = console.refresh(None);
    assert_eq!((first.surface.width, first.surface.height), (640, 480));
    // Idle: nothing is redrawn, nothing reported.
    let idle = console.rows_redrawn();
    let again = console.refresh(Some(first.generation));
    assert!(again.changed_rows.is_empty());
    assert_eq!(console.rows_redrawn(), idle);

    let ops = ms.accel_ops().unwrap().clone();
    ops.set_dirty_log(true).unwrap();
    ops.dirty_pages().unwrap();
    hw::core::runstate::vm_start(ms).unwrap();
    let pages = [line(100) & !0xfff, line(300) & !0xfff];
    let mut rows = std::collections::BTreeSet::new();
    let mut migrated = std::collections::BTreeSet::new();
    let mut generation = again.generation;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The display and the migration take turns reading: neither takes the other's pages.
    let seen_by_both = |rows: &std::collections::BTreeSet<u32>,
                        migrated: &std::collections::BTreeSet<u64>| {
        rows.contains(&100) && rows.contains(&300) && pages.iter().all(|p| migrated.contains(p))
    };
    while !seen_by_both(&rows, &migrated) {
        assert!(
            std::time::Instant::now() < deadline,
            "rows {rows:?}, migrated {:x?}",
            migrated
                .iter()
                .filter(|p| **p >= LOCAL_FB)
                .collect::<Vec<_>>()
        );
        let update = console.refresh(Some(generation));
        generation = update.generation;
        rows.extend(update.changed_rows.into_iter().flatten());
        migrated.extend(ops.dirty_pages().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Only the lines of the two pages written: 99-100 and 299-300.
    assert!(
        rows.iter().all(|y| [99, 100, 299, 300].contains(y)),
        "{rows:?}"
    );
    assert!(console.rows_redrawn() - idle <= 4);
    let screen = console.update();
    assert_eq!(screen.row(100)[10], 0x00ff_00ff);
    assert_eq!(screen.row(300)[10], 0x0000_ff00);
    ops.set_dirty_log(false).unwrap();
    ops.shutdown();
}

/// A 64-bit ELF kernel whose code checks the zero page's `screen_info` (RSI points at
/// it) for 80x25 colour VGA text and writes `VGA-TEXT-OK` to the text memory's second
/// row, or `BAD`
/// when the screen information is not that; then halts.
fn text_screen_kernel() -> Vec<u8> {
    const ENTRY: u64 = 0x10_0000;
    let mut c: Vec<u8> = Vec::new();
    let mut bad_jumps = Vec::new();
    // cmp byte [rsi+OFFSET], VALUE; jne bad (rel32): mode 3, 80 columns, 25 lines, isVGA.
    for (offset, value) in [(0x06u8, 3u8), (0x07, 80), (0x0e, 25), (0x0f, 1)] {
        c.extend_from_slice(&[0x80, 0x7e, offset, value, 0x0f, 0x85, 0, 0, 0, 0]);
        bad_jumps.push(c.len() - 4);
    }
    let write = |c: &mut Vec<u8>, text: &[u8]| {
        for (i, ch) in text.iter().enumerate() {
            // mov word [0xb8000 + 160 + 2i], 0x0700 | ch: the second row (the first has
            // the cursor, where the BIOS leaves it)
            c.extend_from_slice(&[0x66, 0xc7, 0x04, 0x25]);
            c.extend_from_slice(&(0xb80a0u32 + 2 * i as u32).to_le_bytes());
            c.extend_from_slice(&[*ch, 0x07]);
        }
        // hlt; jmp back to it
        c.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    };
    write(&mut c, b"VGA-TEXT-OK");
    let bad = c.len();
    write(&mut c, b"BAD");
    for at in bad_jumps {
        let rel = (bad - (at + 4)) as u32;
        c[at..at + 4].copy_from_slice(&rel.to_le_bytes());
    }
    test_support::elf::elf64_exec(&c, ENTRY)
}

/// Without firmware, qomvm does for `-kernel` what SeaBIOS and the VGA BIOS do for QEMU's:
/// the display in 80x25 text mode with the VGA BIOS's font, and the zero page saying so
/// (else Linux's VGA console stays off). The kernel's text shows in the screendump.
fn a_direct_kernel_boot_finds_vga_text(name: &str, display: &[&str], image: Vec<u8>) {
    if !kvm_or_skip() {
        return;
    }
    let Some(rom) = vgabios_or_skip() else { return };
    let font = rom_font(&rom);
    let dir = scratch(name);
    let kernel = dir.join("kernel.elf");
    std::fs::write(&kernel, image).unwrap();
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut args = vec!["-M", "pc", "-accel", "kvm", "-m", "64", "-display", "none"];
    args.extend_from_slice(display);
    args.extend_from_slice(&["-kernel", kernel.to_str().unwrap(), "-qmp", &qmp_arg]);
    let child = Command::new(QOMVM)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qmp = QmpClient::connect(&sock);
    // The kernel writes a character at a time: wait for the whole line.
    let lines = text_screen_until(&mut qmp, &dir, &font, 100, |lines| {
        lines[1] == "VGA-TEXT-OK" || lines[1] == "BAD"
    });
    let _ = qmp.execute("quit", json!({}));
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        lines[1],
        "VGA-TEXT-OK",
        "screen: {lines:#?}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first row holds only the cursor (drawn over a blank cell: no glyph matches it).
    assert!(
        lines[0] == "?" && lines[2..].iter().all(|l| l.is_empty()),
        "a blank screen besides: {lines:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_direct_kernel_boot_finds_the_std_vga_in_text_mode() {
    a_direct_kernel_boot_finds_vga_text("direct-std", &[], text_screen_kernel());
}

#[test]
fn a_direct_kernel_boot_finds_the_cirrus_vga_in_text_mode() {
    a_direct_kernel_boot_finds_vga_text(
        "direct-cirrus",
        &[
            // Slot 2 is free only without the default card (as in QEMU).
            "-nic",
            "none",
            "-vga",
            "none",
            "-device",
            "cirrus-vga,id=video0,bus=pci.0,addr=0x2",
        ],
        text_screen_kernel(),
    );
}

/// A Multiboot kernel (32-bit protected mode, no zero page) that writes `VGA-TEXT-OK` to
/// the text memory's second row and halts.
fn multiboot_text_kernel() -> Vec<u8> {
    use test_support::elf::{Elf32Kernel, PF_R, PF_W, PF_X};
    let mut code: Vec<u8> = Vec::new();
    for (i, ch) in b"VGA-TEXT-OK".iter().enumerate() {
        // mov word [0xb80a0 + 2i], 0x0700 | ch
        code.extend_from_slice(&[0x66, 0xc7, 0x05]);
        code.extend_from_slice(&(0xb80a0u32 + 2 * i as u32).to_le_bytes());
        code.extend_from_slice(&[*ch, 0x07]);
    }
    // hlt; jmp back to it
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    Elf32Kernel {
        vaddr: 0x10_0000,
        paddr: 0x10_0000,
        flags: PF_R | PF_W | PF_X,
        bss: 0,
        data_off: 0x200,
        code: &code,
        data: b"",
    }
    .build()
}

/// QEMU's VGA BIOS sets text mode for every `-kernel`, Multiboot ones too.
#[test]
fn a_multiboot_kernel_finds_the_vga_in_text_mode() {
    a_direct_kernel_boot_finds_vga_text("direct-multiboot", &[], multiboot_text_kernel());
}
