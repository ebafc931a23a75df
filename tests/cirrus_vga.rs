//! The Cirrus CLGD 5446 (`-vga cirrus`, `-device cirrus-vga`) on the qtest accelerator:
//!
//! - the PCI header (1013:00b8, class 0300, QEMU's subsystem IDs), BAR 0 of 32 MiB,
//!   BAR 1 of 4 KiB and the ROM BAR carrying `vgabios-cirrus.bin`;
//! - the extension unlock (SR6), the chip ID (CR27), the hidden DAC, banked writes at
//!   0xa0000 landing where GR9/GRA/GRB say;
//! - 32 and 16 bpp modes set through BAR 1 the way Linux's `cirrus` DRM driver sets them,
//!   a picture written through BAR 0, and `screendump` showing it as written;
//! - the BitBLT engine through BAR 1: a rectangle copied, blits reaching outside video
//!   memory refused while the device goes on answering;
//! - the seed pair (`-vnc 127.0.0.1:12 -device cirrus-vga,id=video0,bus=pci.0,
//!   addr=0x2`) as it is, and a 16 bpp screen moved by `migrate` to a file and
//!   `-incoming`.
//!
//! SeaBIOS's banner on the Cirrus under KVM is in `tests/vga.rs`, beside the std VGA's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use test_support::fuzz_qtest::{hex, program_bars, PciFunction, Qtest};
use test_support::qmp::QmpClient;
use test_support::qtest::qomvm_pc_stderr;
use test_support::vga_text::Image;

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
const VGABIOS_CIRRUS: &str = "/usr/share/seabios/vgabios-cirrus.bin";

fn rom_or_skip() -> Option<Vec<u8>> {
    test_support::skip::read_or_skip(VGABIOS_CIRRUS, "seabios")
}
fn qtest_with_qmp(name: &str, extra: &[&str]) -> (Qtest, QmpClient, PathBuf) {
    Qtest::start_with_qmp(QOMVM, name, extra)
}

fn outb(qt: &mut Qtest, port: u16, value: u8) {
    assert_eq!(qt.cmd(format!("outb 0x{port:x} 0x{value:x}")), "OK");
}

fn inb(qt: &mut Qtest, port: u16) -> u8 {
    qt.value(format!("inb 0x{port:x}")) as u8
}

fn writeb(qt: &mut Qtest, addr: u64, value: u8) {
    assert_eq!(qt.cmd(format!("writeb 0x{addr:x} 0x{value:x}")), "OK");
}

fn readb(qt: &mut Qtest, addr: u64) -> u8 {
    qt.value(format!("readb 0x{addr:x}")) as u8
}

fn write_mem(qt: &mut Qtest, addr: u64, data: &[u8]) {
    for (i, chunk) in data.chunks(2048).enumerate() {
        let at = addr + i as u64 * 2048;
        let request = format!("write 0x{at:x} 0x{:x} {}", chunk.len(), hex(chunk));
        assert_eq!(qt.cmd(request), "OK");
    }
}

fn read_mem(qt: &mut Qtest, addr: u64, len: usize) -> Vec<u8> {
    let reply = qt.cmd(format!("read 0x{addr:x} 0x{len:x}"));
    let digits = reply.strip_prefix("OK 0x").expect("a read reply");
    (0..len)
        .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn the_cirrus(functions: &[PciFunction]) -> (u64, u64) {
    let f = functions
        .iter()
        .find(|f| f.vendor_device == 0x00b8_1013)
        .expect("a 1013:00b8 function");
    (f.bars[0].1, f.bars[1].1)
}

/// The registers as Linux's `cirrus` driver reaches them: BAR 1's mirror of 0x3c0-0x3df.
struct Mmio {
    base: u64,
}

impl Mmio {
    fn out(&self, qt: &mut Qtest, port: u16, value: u8) {
        writeb(qt, self.base + u64::from(port - 0x3c0), value);
    }
    fn inp(&self, qt: &mut Qtest, port: u16) -> u8 {
        readb(qt, self.base + u64::from(port - 0x3c0))
    }
    fn seq(&self, qt: &mut Qtest, index: u8, value: u8) {
        self.out(qt, 0x3c4, index);
        self.out(qt, 0x3c5, value);
    }
    fn crt(&self, qt: &mut Qtest, index: u8, value: u8) {
        self.out(qt, 0x3d4, index);
        self.out(qt, 0x3d5, value);
    }
    fn gfx(&self, qt: &mut Qtest, index: u8, value: u8) {
        self.out(qt, 0x3ce, index);
        self.out(qt, 0x3cf, value);
    }
    /// A blitter register at BAR 1 + 0x100 + `offset`.
    fn blt(&self, qt: &mut Qtest, offset: u64, value: u8) {
        writeb(qt, self.base + 0x100 + offset, value);
    }
}

/// Linux's `cirrus_mode_set`, `cirrus_format_set` and `cirrus_pitch_set` for a
/// `width` x `height` mode of `sr07`/`hdr` depth and `pitch` bytes a line, start at 0.
fn linux_mode_set(
    qt: &mut Qtest,
    m: &Mmio,
    width: u32,
    height: u32,
    sr07: u8,
    hdr: u8,
    pitch: u32,
) {
    let vdispend = height - 1;
    m.crt(qt, 0x11, 0x20);
    m.crt(qt, 0x00, ((width + 64) / 8 - 5) as u8);
    m.crt(qt, 0x01, (width / 8 - 1) as u8);
    m.crt(qt, 0x12, vdispend as u8);
    m.crt(qt, 0x09, 0x40);
    m.crt(
        qt,
        0x07,
        0x10 | if vdispend & 0x100 != 0 { 0x02 } else { 0 },
    );
    m.crt(qt, 0x1a, 0);
    m.crt(qt, 0x17, 0x03);
    m.out(qt, 0x3c4, 0x07);
    let old = m.inp(qt, 0x3c5);
    m.seq(qt, 0x07, (old & 0xe0) | sr07);
    m.gfx(qt, 0x05, 0x40);
    m.gfx(qt, 0x06, 0x01);
    // The hidden DAC: four reads of 0x3c6 unlock a write.
    for _ in 0..4 {
        m.inp(qt, 0x3c6);
    }
    m.out(qt, 0x3c6, hdr);
    m.crt(qt, 0x13, (pitch / 8) as u8);
    m.crt(
        qt,
        0x1b,
        0x22 | ((pitch >> 7) & 0x10) as u8 | ((pitch >> 6) & 0x40) as u8,
    );
    m.crt(qt, 0x0c, 0);
    m.crt(qt, 0x0d, 0);
    m.crt(qt, 0x1d, 0);
    // Unblank, as the driver does with outb(0x20, 0x3c0).
    outb(qt, 0x3c0, 0x20);
}

fn screendump(qmp: &mut QmpClient, dir: &Path, name: &str) -> Image {
    let file = dir.join(name);
    let reply = qmp.execute("screendump", json!({"filename": file.to_str().unwrap()}));
    assert_eq!(reply, json!({"return": {}}));
    Image::read_ppm(&file)
}

#[test]
fn the_cirrus_has_qemus_header_bars_and_rom() {
    let Some(rom) = rom_or_skip() else { return };
    let (mut qt, _qmp, dir) = qtest_with_qmp("cirrus-header", &["-vga", "cirrus"]);
    let devfn = 2 << 3;
    assert_eq!(qt.pci_read32(devfn, 0), 0x00b8_1013);
    assert_eq!(
        qt.pci_read32(devfn, 8),
        0x0300_0000,
        "class VGA, revision 0"
    );
    assert_eq!(
        qt.pci_read32(devfn, 0x2c),
        0x1100_1af4,
        "QEMU's subsystem IDs"
    );
    qt.pci_write32(devfn, 0x10, 0xffff_ffff);
    assert_eq!(
        qt.pci_read32(devfn, 0x10),
        0xfe00_0008,
        "32 MiB prefetchable"
    );
    qt.pci_write32(devfn, 0x14, 0xffff_ffff);
    assert_eq!(qt.pci_read32(devfn, 0x14), 0xffff_f000, "4 KiB");
    qt.pci_write32(devfn, 0x18, 0xffff_ffff);
    assert_eq!(qt.pci_read32(devfn, 0x18), 0, "no BAR 2");
    qt.pci_write32(devfn, 0x30, 0xffff_ffff);
    let rom_size = (rom.len() as u32).next_power_of_two();
    assert_eq!(qt.pci_read32(devfn, 0x30), !(rom_size - 1) | 1);
    program_bars(&mut qt);
    qt.pci_write32(devfn, 0x30, 0xd000_0001);
    let head = qt.cmd(format!("read 0xd0000000 0x{:x}", rom.len()));
    // The ROM's PCI data structure carries the device's IDs (patched when they differ).
    assert_eq!(&rom[..2], [0x55, 0xaa]);
    assert!(head.starts_with("OK 0x55aa"), "{}", &head[..20]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unlock_id_hidden_dac_and_banked_writes() {
    if rom_or_skip().is_none() {
        return;
    }
    let (mut qt, _qmp, dir) = qtest_with_qmp("cirrus-regs", &["-vga", "cirrus"]);
    let functions = program_bars(&mut qt);
    let (fb, _) = the_cirrus(&functions);
    outb(&mut qt, 0x3c4, 0x06);
    outb(&mut qt, 0x3c5, 0x12);
    assert_eq!(inb(&mut qt, 0x3c5), 0x12, "extensions unlocked");
    outb(&mut qt, 0x3c5, 0x00);
    assert_eq!(inb(&mut qt, 0x3c5), 0x0f, "locked again");
    outb(&mut qt, 0x3c5, 0x12);
    outb(&mut qt, 0x3c2, 0x67);
    outb(&mut qt, 0x3d4, 0x27);
    assert_eq!(inb(&mut qt, 0x3d5), 0xb8, "CLGD 5446");
    outb(&mut qt, 0x3c4, 0x0f);
    assert_eq!(inb(&mut qt, 0x3c5), 0x98, "SR0F as QEMU's reset");
    // The hidden DAC: a write of 0x3c6 (the BIOS's mask), four reads, the register.
    outb(&mut qt, 0x3c6, 0xff);
    for _ in 0..4 {
        assert_eq!(inb(&mut qt, 0x3c6), 0xff);
    }
    outb(&mut qt, 0x3c6, 0xc1);
    for _ in 0..4 {
        inb(&mut qt, 0x3c6);
    }
    assert_eq!(inb(&mut qt, 0x3c6), 0xc1);

    // Extended mode; bank 0 = GR9 x 4 KiB: 0xa0010 is video memory 0x10010.
    outb(&mut qt, 0x3c4, 0x07);
    outb(&mut qt, 0x3c5, 0x01);
    outb(&mut qt, 0x3ce, 0x09);
    outb(&mut qt, 0x3cf, 0x10);
    writeb(&mut qt, 0xa0010, 0x5a);
    assert_eq!(readb(&mut qt, fb + 0x1_0010), 0x5a);
    // 16 KiB granularity, dual banks: GRA's bank at 0xa8000.
    outb(&mut qt, 0x3ce, 0x0b);
    outb(&mut qt, 0x3cf, 0x21);
    outb(&mut qt, 0x3ce, 0x0a);
    outb(&mut qt, 0x3cf, 0x03);
    writeb(&mut qt, 0xa8004, 0xa5);
    assert_eq!(readb(&mut qt, fb + 3 * 0x4000 + 4), 0xa5);
    assert_eq!(readb(&mut qt, 0xa8004), 0xa5);
    writeb(&mut qt, 0xa0020, 0x33);
    assert_eq!(
        readb(&mut qt, fb + 0x10 * 0x4000 + 0x20),
        0x33,
        "GR9 in 16 KiB units"
    );
    // Back to VGA mode: the window is the VGA's again, with its own memory map (GR6 3:
    // 0xb8000-0xbffff only).
    outb(&mut qt, 0x3c4, 0x07);
    outb(&mut qt, 0x3c5, 0x00);
    outb(&mut qt, 0x3ce, 0x06);
    outb(&mut qt, 0x3cf, 0x0c);
    assert_eq!(readb(&mut qt, 0xa8004), 0xff, "not decoded by memory map 3");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn linux_style_32_and_16_bpp_modes_dump_as_written() {
    if rom_or_skip().is_none() {
        return;
    }
    let (mut qt, mut qmp, dir) = qtest_with_qmp("cirrus-modes", &["-vga", "cirrus"]);
    let functions = program_bars(&mut qt);
    let (fb, mmio) = the_cirrus(&functions);
    let m = Mmio { base: mmio };
    // What the VGA BIOS leaves: colour mode (the CRTC at 0x3d4) and the DAC mask
    // written, which readies the hidden DAC.
    outb(&mut qt, 0x3c2, 0x67);
    outb(&mut qt, 0x3c6, 0xff);

    // XRGB8888 (SR07 0x19, HDR 0xc5), 64x48, 256 bytes a line.
    linux_mode_set(&mut qt, &m, 64, 48, 0x19, 0xc5, 256);
    for y in 0..48u64 {
        let line: Vec<u8> = (0..64u64)
            .flat_map(|x| [(x ^ y) as u8, (5 * y) as u8, (4 * x) as u8, 0])
            .collect();
        write_mem(&mut qt, fb + y * 256, &line);
    }
    let image = screendump(&mut qmp, &dir, "32.ppm");
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

    // RGB565 (SR07 0x17, HDR 0xc1), 32x16, 64 bytes a line.
    linux_mode_set(&mut qt, &m, 32, 16, 0x17, 0xc1, 64);
    let rgb565 =
        |x: u64, y: u64| (((x & 0x1f) << 11) | (((y * 4) & 0x3f) << 5) | ((x + y) & 0x1f)) as u16;
    for y in 0..16u64 {
        let line: Vec<u8> = (0..32u64)
            .flat_map(|x| rgb565(x, y).to_le_bytes())
            .collect();
        write_mem(&mut qt, fb + y * 64, &line);
    }
    let image = screendump(&mut qmp, &dir, "16.ppm");
    assert_eq!((image.width, image.height), (32, 16));
    for y in 0..16u64 {
        for x in 0..32u64 {
            let v = rgb565(x, y);
            let expect = [
                ((v >> 8) & 0xf8) as u8,
                ((v >> 3) & 0xfc) as u8,
                ((v << 3) & 0xf8) as u8,
            ];
            assert_eq!(image.pixel(x as usize, y as usize), expect, "({x}, {y})");
        }
    }
    // The same bytes read as 15 bits once the hidden DAC says Sierra (0).
    for _ in 0..4 {
        m.inp(&mut qt, 0x3c6);
    }
    m.out(&mut qt, 0x3c6, 0xc0);
    let image = screendump(&mut qmp, &dir, "15.ppm");
    let v = rgb565(3, 2);
    assert_eq!(
        image.pixel(3, 2),
        [
            ((v >> 7) & 0xf8) as u8,
            ((v >> 2) & 0xf8) as u8,
            ((v << 3) & 0xf8) as u8
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sets the blitter's registers through BAR 1 and starts a plain forward copy (ROP
/// "source") of `width` x `height` bytes.
fn blit_copy(qt: &mut Qtest, m: &Mmio, width: u32, height: u32, pitch: u32, dst: u32, src: u32) {
    let w = width - 1;
    let h = height - 1;
    for (offset, value) in [
        (0x08, w as u8),
        (0x09, (w >> 8) as u8),
        (0x0a, h as u8),
        (0x0b, (h >> 8) as u8),
        (0x0c, pitch as u8),
        (0x0d, (pitch >> 8) as u8),
        (0x0e, pitch as u8),
        (0x0f, (pitch >> 8) as u8),
        (0x10, dst as u8),
        (0x11, (dst >> 8) as u8),
        (0x12, (dst >> 16) as u8),
        (0x14, src as u8),
        (0x15, (src >> 8) as u8),
        (0x16, (src >> 16) as u8),
        (0x18, 0x00),
        (0x1a, 0x0d),
        (0x40, 0x02),
    ] {
        m.blt(qt, offset, value);
    }
}

#[test]
fn a_blit_copies_a_rectangle_and_out_of_range_blits_are_refused() {
    if rom_or_skip().is_none() {
        return;
    }
    let (mut qt, _qmp, dir) = qtest_with_qmp("cirrus-blit", &["-vga", "cirrus"]);
    let functions = program_bars(&mut qt);
    let (fb, mmio) = the_cirrus(&functions);
    let m = Mmio { base: mmio };
    // A 16x4 rectangle of a 64-byte pitch at 0, copied to 0x2000.
    let source: Vec<u8> = (0..64 * 4).map(|i| (i * 7 + 1) as u8).collect();
    write_mem(&mut qt, fb, &source);
    blit_copy(&mut qt, &m, 16, 4, 64, 0x2000, 0);
    for y in 0..4usize {
        assert_eq!(
            read_mem(&mut qt, fb + 0x2000 + y as u64 * 64, 17),
            [&source[y * 64..y * 64 + 16], &[0][..]].concat(),
            "line {y}"
        );
    }
    assert_eq!(readb(&mut qt, mmio + 0x140) & 0x03, 0, "GR31: idle");

    // Hostile blits: past the end of the 4 MiB, from past it, a huge pitch, backwards
    // below 0. Each is refused; nothing around changes and the device goes on.
    let end = 4u32 << 20;
    write_mem(&mut qt, fb + u64::from(end) - 4, &[1, 2, 3, 4]);
    blit_copy(&mut qt, &m, 64, 2, 64, end - 64, 0);
    blit_copy(&mut qt, &m, 64, 1, 64, 0x3000, end - 8);
    blit_copy(&mut qt, &m, 2048, 0x400, 0x1fff, 0x4000, 0);
    for (offset, value) in [
        (0x18, 0x01),
        (0x10, 0x10),
        (0x11, 0),
        (0x12, 0),
        (0x40, 0x00),
        (0x40, 0x02),
    ] {
        m.blt(&mut qt, offset, value);
    }
    assert_eq!(read_mem(&mut qt, fb + u64::from(end) - 4, 4), [1, 2, 3, 4]);
    assert_eq!(read_mem(&mut qt, fb + 0x3000, 8), [0; 8]);
    assert_eq!(read_mem(&mut qt, fb + 0x4000, 8), [0; 8]);
    assert_eq!(
        readb(&mut qt, mmio + 0x140) & 0x03,
        0,
        "GR31: idle after refusals"
    );
    // Still a working device.
    blit_copy(&mut qt, &m, 4, 1, 64, 0x5000, 0);
    assert_eq!(read_mem(&mut qt, fb + 0x5000, 4), source[..4]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The seed command line pair, as it is, with `-nodefaults` (as libvirt writes
/// it) and on the `pc` with its defaults but no network (the display `-device` replaces the
/// default VGA).
#[test]
fn the_seed_pair_is_accepted_verbatim() {
    if rom_or_skip().is_none() {
        return;
    }
    let seed = [
        "-vnc",
        "127.0.0.1:12",
        "-device",
        "cirrus-vga,id=video0,bus=pci.0,addr=0x2",
    ];
    for defaults in [&["-nic", "none"][..], &["-nodefaults"][..]] {
        if std::net::TcpListener::bind(("127.0.0.1", 5912)).is_err() {
            test_support::skip::skip("port 5912 (VNC display 12) is taken on this host");
            return;
        }
        let args: Vec<&str> = defaults.iter().chain(seed.iter()).copied().collect();
        let (mut qt, mut qmp, dir) = qtest_with_qmp("cirrus-seed", &args);
        assert_eq!(qt.pci_read32(2 << 3, 0), 0x00b8_1013, "{args:?}");
        let functions = program_bars(&mut qt);
        assert!(
            functions.iter().all(|f| f.vendor_device != 0x1111_1234),
            "no std VGA beside it: {args:?}"
        );
        let vnc = qmp.execute("query-vnc", json!({}));
        assert_eq!(vnc["return"]["service"], "5912", "{vnc}");
        let reply = qmp.execute(
            "screendump",
            json!({"filename": dir.join("x.ppm").to_str().unwrap(), "device": "video0"}),
        );
        assert_eq!(reply, json!({"return": {}}));
        assert_eq!(qmp.execute("quit", json!({})), json!({"return": {}}));
        drop(qt);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// With every default, as in QEMU 7.2: the default card (e1000, created with the board)
/// took the first free slot, 2, as the default VGA gave way to the display `-device`.
#[test]
fn the_seed_display_on_slot_2_meets_the_default_card_there() {
    if rom_or_skip().is_none() {
        return;
    }
    let out = Command::new(QOMVM)
        .args(["-M", "pc", "-accel", "qtest", "-display", "none", "-S"])
        .args(["-device", "cirrus-vga,id=video0,bus=pci.0,addr=0x2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The last line (a card without its iPXE ROM says so first).
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().last(),
        Some("qomvm: -device cirrus-vga,id=video0,bus=pci.0,addr=0x2: PCI: slot 2 function 0 not available for cirrus-vga, in use by e1000,id=(null)")
    );
}

#[test]
fn vgamem_mb_is_4_8_or_16() {
    // No ROM (`romfile=`): the size check does not depend on Debian's seabios package.
    let (ok, stderr) = qomvm_pc_stderr(QOMVM, &["-device", "cirrus-vga,vgamem_mb=2,romfile="]);
    assert!(!ok);
    assert!(
        stderr.contains("Invalid cirrus_vga ram size '2'"),
        "{stderr}"
    );
}

/// A 16 bpp screen moves with `migrate` to a file and `-incoming`: the destination's
/// screendump is the source's, byte for byte, and its registers answer as the source's.
#[test]
fn a_16bpp_screen_is_the_same_after_migrate_and_incoming() {
    if rom_or_skip().is_none() {
        return;
    }
    let (mut qt, mut qmp, dir) = qtest_with_qmp("cirrus-mig-src", &["-vga", "cirrus"]);
    let functions = program_bars(&mut qt);
    let (fb, mmio) = the_cirrus(&functions);
    let m = Mmio { base: mmio };
    outb(&mut qt, 0x3c2, 0x67);
    outb(&mut qt, 0x3c6, 0xff);
    linux_mode_set(&mut qt, &m, 64, 32, 0x17, 0xc1, 128);
    let picture: Vec<u8> = (0..64u32 * 32)
        .flat_map(|i| ((i * 37) as u16).to_le_bytes())
        .collect();
    write_mem(&mut qt, fb, &picture);
    let before = screendump(&mut qmp, &dir, "before.ppm");
    assert_eq!((before.width, before.height), (64, 32));
    let state = dir.join("cirrus.state");
    let uri = format!("file:{}", state.display());
    assert_eq!(
        qmp.execute("migrate", json!({"uri": uri})),
        json!({"return": {}})
    );
    let info = qmp.wait_migration(Duration::from_secs(30));
    assert_eq!(info["return"]["status"], "completed", "{info}");

    let (mut dst, mut dst_qmp, dst_dir) =
        qtest_with_qmp("cirrus-mig-dst", &["-vga", "cirrus", "-incoming", &uri]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dst_qmp.execute("query-status", json!({}))["return"]["status"] != "running" {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = screendump(&mut dst_qmp, &dst_dir, "after.ppm");
    assert!(after.rgb == before.rgb, "the screendumps differ");
    // BARs as the source programmed them; the hidden DAC and SR7 came along.
    assert_eq!(read_mem(&mut dst, fb, 64), picture[..64]);
    outb(&mut dst, 0x3c4, 0x07);
    assert_eq!(inb(&mut dst, 0x3c5), 0x17);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dst_dir);
}
