//! The VNC server (issue 17): `-vnc` on a `pc` machine on the qtest accelerator, whose
//! std VGA shows a VBE picture the test writes through BAR 0.
//!
//! - a protocol-level client (RFB 3.8, raw and ZRLE, 32 and 16 bits per pixel, the
//!   desktop-size pseudo-encoding) sees exactly what `screendump` writes, then only the
//!   tiles that changed, then the new size of a new mode;
//! - a client that never reads stalls neither the guest (qtest), the monitor, nor a
//!   second client, which goes on getting updates;
//! - keys (keysyms through QEMU's en-us keymap, QEMU's extended key events) reach the
//!   i8042 as set 1 (translated) or set 2 scancodes, and pointer motion as PS/2 packets;
//! - `query-vnc`, HMP `info vnc`, the `VNC_*` events, `-vnc`'s and `-display vnc=`'s
//!   syntax (the seed's `-vnc 127.0.0.1:12`) and its errors;
//! - Debian's `vncsnapshot` (a real client) takes a picture that matches the screendump;
//! - VNC Authentication (`password=on` and QMP `set_password`, as libvirt does it,
//!   `password-secret=`): the right password sees the screen, a wrong one, none set yet
//!   or an expired one get a failed SecurityResult with its reason; the monitor's errors
//!   are QEMU's; `vncsnapshot -passwd` gets in.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flate2::{Decompress, FlushDecompress};
use serde_json::json;
use test_support::fuzz_qtest::{hex, program_bars, Qtest};
use test_support::qmp::QmpClient;
use test_support::vnc::{rfb_handshake, vnc_auth_response, vncpasswd_file, Refused};

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
const VGABIOS: &str = "/usr/share/seabios/vgabios-stdvga.bin";
const WAIT: Duration = Duration::from_secs(20);

fn vga_or_skip() -> bool {
    if Path::new(VGABIOS).exists() {
        return true;
    }
    test_support::skip::skip(format!("{VGABIOS} is missing (Debian package 'seabios')"));
    false
}

/// A qtest machine with `-vnc 127.0.0.1:0,to=99` (the first free display), QMP, and its
/// VNC port.
struct Vm {
    qt: Qtest,
    qmp: QmpClient,
    dir: PathBuf,
    port: u16,
    fb: u64,
}

impl Vm {
    fn start(name: &str) -> Vm {
        Vm::start_with(name, "", &[])
    }

    /// With `vnc_extra` appended to `-vnc`'s value and `extra` arguments.
    fn start_with(name: &str, vnc_extra: &str, extra: &[&str]) -> Vm {
        let vnc = format!("127.0.0.1:0,to=99{vnc_extra}");
        let mut args = vec!["-vnc", vnc.as_str()];
        args.extend_from_slice(extra);
        let (mut qt, mut qmp, dir) = Qtest::start_with_qmp(QOMVM, name, &args);
        let info = qmp.execute("query-vnc", json!({}));
        assert_eq!(info["return"]["enabled"], true, "{info}");
        let port: u16 = info["return"]["service"].as_str().unwrap().parse().unwrap();
        let functions = program_bars(&mut qt);
        let fb = functions
            .iter()
            .find(|f| f.vendor_device == 0x1111_1234)
            .expect("the std VGA")
            .bars[0]
            .1;
        Vm {
            qt,
            qmp,
            dir,
            port,
            fb,
        }
    }

    fn outw(&mut self, port: u16, value: u16) {
        assert_eq!(self.qt.cmd(format!("outw 0x{port:x} 0x{value:x}")), "OK");
    }

    /// A `width` x `height` 32 bpp VBE mode.
    fn vbe_mode(&mut self, width: u16, height: u16) {
        for (index, value) in [(4, 0), (1, width), (2, height), (3, 32), (4, 0x41)] {
            self.outw(0x1ce, index);
            self.outw(0x1cf, value);
        }
        assert_eq!(self.qt.cmd("outb 0x3c0 0x20".into()), "OK");
    }

    /// Fills (x, y, w, h) of a `width`-pixel-wide framebuffer with `f(x, y)`.
    fn paint(&mut self, width: u32, rect: (u32, u32, u32, u32), f: impl Fn(u32, u32) -> u32) {
        let (x0, y0, w, h) = rect;
        for y in y0..y0 + h {
            let line: Vec<u8> = (x0..x0 + w).flat_map(|x| f(x, y).to_le_bytes()).collect();
            let addr = self.fb + u64::from(y * width + x0) * 4;
            let request = format!("write 0x{addr:x} 0x{:x} {}", line.len(), hex(&line));
            assert_eq!(self.qt.cmd(request), "OK");
        }
    }

    /// The screendump as `0x00RRGGBB` pixels.
    fn screendump(&mut self) -> (u32, u32, Vec<u32>) {
        let path = self.dir.join("dump.ppm");
        let reply = self
            .qmp
            .execute("screendump", json!({"filename": path.to_str().unwrap()}));
        assert_eq!(reply, json!({"return": {}}));
        read_ppm(&path)
    }
}

fn read_ppm(path: &Path) -> (u32, u32, Vec<u32>) {
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
    let (w, h): (u32, u32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    let pixels = data[at + 1..]
        .chunks_exact(3)
        .map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2]))
        .collect::<Vec<_>>();
    assert_eq!(pixels.len(), (w * h) as usize);
    (w, h, pixels)
}

/// What a rectangle of an update was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x: u16,
    y: u16,
    w: u16,
    h: u16,
    encoding: i32,
}

/// A test RFB client: it keeps the framebuffer as `0x00RRGGBB`, whatever the format on
/// the wire.
struct Client {
    s: TcpStream,
    width: u32,
    height: u32,
    name: String,
    fb: Vec<u32>,
    bpp16: bool,
    zlib: Decompress,
}

impl Client {
    fn connect(port: u16) -> Client {
        Client::try_connect(port, None).unwrap()
    }

    /// The handshake, with VNC Authentication when `password` is given.
    fn try_connect(port: u16, password: Option<&[u8]>) -> Result<Client, Refused> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let init = rfb_handshake(&mut s, password)?;
        let (width, height) = (init.width, init.height);
        assert_eq!(
            init.format,
            [32, 24, 0, 1],
            "32 bpp, depth 24, little-endian, true colour"
        );
        Ok(Client {
            s,
            width,
            height,
            name: init.name,
            fb: vec![0; (width * height) as usize],
            bpp16: false,
            zlib: Decompress::new(true),
        })
    }

    fn set_encodings(&mut self, encodings: &[i32]) {
        let mut msg = vec![2u8, 0];
        msg.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
        for e in encodings {
            msg.extend_from_slice(&e.to_be_bytes());
        }
        self.s.write_all(&msg).unwrap();
    }

    /// RGB565, big-endian.
    fn set_rgb565(&mut self) {
        let mut msg = vec![0u8, 0, 0, 0, 16, 16, 1, 1];
        for v in [31u16, 63, 31] {
            msg.extend_from_slice(&v.to_be_bytes());
        }
        msg.extend_from_slice(&[11, 5, 0, 0, 0, 0]);
        self.s.write_all(&msg).unwrap();
        self.bpp16 = true;
    }

    fn request(&mut self, incremental: bool) {
        let mut msg = vec![3u8, u8::from(incremental), 0, 0, 0, 0];
        msg.extend_from_slice(&(self.width as u16).to_be_bytes());
        msg.extend_from_slice(&(self.height as u16).to_be_bytes());
        self.s.write_all(&msg).unwrap();
    }

    fn key(&mut self, keysym: u32, down: bool) {
        let mut msg = vec![4u8, u8::from(down), 0, 0];
        msg.extend_from_slice(&keysym.to_be_bytes());
        self.s.write_all(&msg).unwrap();
    }

    fn ext_key(&mut self, keycode: u32, down: bool) {
        let mut msg = vec![255u8, 0];
        msg.extend_from_slice(&u16::from(down).to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes());
        msg.extend_from_slice(&keycode.to_be_bytes());
        self.s.write_all(&msg).unwrap();
    }

    fn pointer(&mut self, mask: u8, x: u16, y: u16) {
        let mut msg = vec![5u8, mask];
        msg.extend_from_slice(&x.to_be_bytes());
        msg.extend_from_slice(&y.to_be_bytes());
        self.s.write_all(&msg).unwrap();
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn pixel(&self, b: &[u8]) -> u32 {
        if self.bpp16 {
            let v = u32::from(u16::from_be_bytes([b[0], b[1]]));
            let (r, g, bl) = ((v >> 11) & 31, (v >> 5) & 63, v & 31);
            (r * 255 / 31) << 16 | (g * 255 / 63) << 8 | (bl * 255 / 31)
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], 0])
        }
    }

    /// Reads one `FramebufferUpdate` into the framebuffer; returns its rectangles.
    fn update(&mut self) -> Vec<Rect> {
        let head = self.read(4);
        assert_eq!(head[0], 0, "a FramebufferUpdate");
        let count = u16::from_be_bytes([head[2], head[3]]);
        let mut rects = Vec::new();
        for _ in 0..count {
            let h = self.read(12);
            let be = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
            let r = Rect {
                x: be(0),
                y: be(2),
                w: be(4),
                h: be(6),
                encoding: i32::from_be_bytes(h[8..12].try_into().unwrap()),
            };
            match r.encoding {
                0 => {
                    let bpp = if self.bpp16 { 2 } else { 4 };
                    let data = self.read(usize::from(r.w) * usize::from(r.h) * bpp);
                    let pixels: Vec<u32> = data.chunks_exact(bpp).map(|p| self.pixel(p)).collect();
                    self.blit(r, &pixels);
                }
                16 => {
                    let len = u32::from_be_bytes(self.read(4).try_into().unwrap()) as usize;
                    let data = self.read(len);
                    let pixels = self.zrle(&data, r);
                    self.blit(r, &pixels);
                }
                -223 => {
                    self.width = u32::from(r.w);
                    self.height = u32::from(r.h);
                    self.fb = vec![0; (self.width * self.height) as usize];
                }
                -258 => {}
                e => panic!("encoding {e}"),
            }
            rects.push(r);
        }
        rects
    }

    fn blit(&mut self, r: Rect, pixels: &[u32]) {
        for y in 0..usize::from(r.h) {
            for x in 0..usize::from(r.w) {
                let at = (usize::from(r.y) + y) * self.width as usize + usize::from(r.x) + x;
                self.fb[at] = pixels[y * usize::from(r.w) + x];
            }
        }
    }

    /// ZRLE with 3-byte CPIXELs (32 bpp) or 2-byte pixels (16 bpp).
    fn zrle(&mut self, data: &[u8], r: Rect) -> Vec<u32> {
        let mut plain = Vec::with_capacity(64 << 20);
        self.zlib
            .decompress_vec(data, &mut plain, FlushDecompress::Sync)
            .unwrap();
        let cp = if self.bpp16 { 2 } else { 3 };
        let mut at = 0;
        let mut out = vec![0u32; usize::from(r.w) * usize::from(r.h)];
        for ty in (0..r.h).step_by(64) {
            for tx in (0..r.w).step_by(64) {
                let (tw, th) = (64.min(r.w - tx), 64.min(r.h - ty));
                let kind = plain[at];
                at += 1;
                let cpixel = |at: &mut usize| {
                    let v = if cp == 2 {
                        self.pixel(&plain[*at..*at + 2])
                    } else {
                        u32::from_le_bytes([plain[*at], plain[*at + 1], plain[*at + 2], 0])
                    };
                    *at += cp;
                    v
                };
                let mut tile = Vec::with_capacity(usize::from(tw * th));
                match kind {
                    0 => (0..tw * th).for_each(|_| tile.push(cpixel(&mut at))),
                    1 => tile = vec![cpixel(&mut at); usize::from(tw * th)],
                    2..=16 => {
                        let palette: Vec<u32> = (0..kind).map(|_| cpixel(&mut at)).collect();
                        let bits =
                            [0, 0, 1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4][usize::from(kind)];
                        for _ in 0..th {
                            let row = &plain[at..at + (usize::from(tw) * bits).div_ceil(8)];
                            for x in 0..usize::from(tw) {
                                let bit = x * bits;
                                let v = (row[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                tile.push(palette[usize::from(v)]);
                            }
                            at += row.len();
                        }
                    }
                    k => panic!("ZRLE subencoding {k}"),
                }
                for y in 0..th {
                    for x in 0..tw {
                        out[usize::from(ty + y) * usize::from(r.w) + usize::from(tx + x)] =
                            tile[usize::from(y * tw + x)];
                    }
                }
            }
        }
        assert_eq!(at, plain.len());
        out
    }
}

/// The test picture: coloured blocks and a gradient.
fn picture(x: u32, y: u32) -> u32 {
    match (x / 40 + y / 30) % 4 {
        0 => 0x00c0_2040,
        1 => 0x0020_a0f0,
        2 => (x * 4) << 16 | (y * 3) << 8 | ((x ^ y) & 0xff),
        _ => 0x00ff_ffff,
    }
}

fn rgb565(p: u32) -> u32 {
    let (r, g, b) = ((p >> 16) & 0xff, (p >> 8) & 0xff, p & 0xff);
    let (r, g, b) = (
        (r * 31 + 127) / 255,
        (g * 63 + 127) / 255,
        (b * 31 + 127) / 255,
    );
    (r * 255 / 31) << 16 | (g * 255 / 63) << 8 | (b * 255 / 31)
}

#[test]
fn clients_see_the_screendump_then_the_changes_then_a_new_size() {
    if !vga_or_skip() {
        return;
    }
    let mut vm = Vm::start("vnc-screen");
    vm.vbe_mode(320, 200);
    vm.paint(320, (0, 0, 320, 200), picture);
    let (w, h, dump) = vm.screendump();
    assert_eq!((w, h), (320, 200));

    let mut raw = Client::connect(vm.port);
    assert_eq!((raw.width, raw.height), (320, 200));
    assert_eq!(raw.name, "QEMU");
    raw.set_encodings(&[0, -223]);
    raw.request(false);
    let rects = raw.update();
    assert_eq!(
        rects,
        [Rect {
            x: 0,
            y: 0,
            w: 320,
            h: 200,
            encoding: 0
        }]
    );
    assert!(raw.fb == dump, "raw update differs from the screendump");

    let mut zrle = Client::connect(vm.port);
    zrle.set_encodings(&[16, 0, -223]);
    zrle.request(false);
    assert_eq!(zrle.update()[0].encoding, 16);
    assert!(zrle.fb == dump, "ZRLE update differs from the screendump");

    let mut small = Client::connect(vm.port);
    small.set_rgb565();
    small.set_encodings(&[16, -223]);
    small.request(false);
    small.update();
    let want: Vec<u32> = dump.iter().map(|&p| rgb565(p)).collect();
    assert!(small.fb == want, "16 bpp ZRLE differs from the screendump");

    // A change inside one tile: an incremental request gets that tile alone.
    vm.paint(320, (70, 70, 10, 10), |_, _| 0x0012_3456);
    let (_, _, dump) = vm.screendump();
    for c in [&mut raw, &mut zrle] {
        c.request(true);
        let rects = c.update();
        assert_eq!(rects.len(), 1, "{rects:?}");
        assert_eq!(
            (rects[0].x, rects[0].y, rects[0].w, rects[0].h),
            (64, 64, 64, 64)
        );
        assert!(
            c.fb == dump,
            "incremental update differs from the screendump"
        );
    }
    // Nothing changed: an incremental request waits (no reply within a few refreshes).
    raw.request(true);
    raw.s
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(raw.s.read(&mut byte).is_err(), "an update without a change");
    raw.s.set_read_timeout(Some(WAIT)).unwrap();

    // A client that does not follow size changes keeps its 320x200.
    let mut fixed = Client::connect(vm.port);
    fixed.set_encodings(&[0]);
    fixed.request(false);
    fixed.update();

    // A new mode: the desktop-size rectangle, then all of the new screen.
    vm.vbe_mode(200, 120);
    vm.paint(200, (0, 0, 200, 120), |x, y| picture(y, x));
    let (w, h, dump) = vm.screendump();
    assert_eq!((w, h), (200, 120));
    // The switch goes through the registers one by one, so the client may see a size
    // on the way; it ends at the new mode's, announced by a desktop-size rectangle, and
    // the whole new picture.
    let deadline = Instant::now() + WAIT;
    let mut resized = false;
    loop {
        let rects = raw.update();
        resized |= rects.contains(&Rect {
            x: 0,
            y: 0,
            w: 200,
            h: 120,
            encoding: -223,
        });
        if resized && raw.fb == dump {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new mode never arrived whole"
        );
        raw.request(true);
    }
    assert_eq!((raw.width, raw.height), (200, 120));
    let deadline = Instant::now() + WAIT;
    loop {
        fixed.request(true);
        let rects = fixed.update();
        assert!(
            rects
                .iter()
                .all(|r| r.encoding == 0 && r.x + r.w <= 200 && r.y + r.h <= 120),
            "{rects:?}"
        );
        let seen: Vec<u32> = (0..120)
            .flat_map(|y| fixed.fb[y * 320..y * 320 + 200].to_vec())
            .collect();
        if seen == dump {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fixed-size client never got the new mode"
        );
    }
    assert_eq!((fixed.width, fixed.height), (320, 200));
    drop(raw);
    drop(fixed);
    drop(zrle);
    drop(small);
    let _ = std::fs::remove_dir_all(&vm.dir);
}

#[test]
fn a_client_that_never_reads_stalls_nobody_else() {
    if !vga_or_skip() {
        return;
    }
    let mut vm = Vm::start("vnc-stall");
    vm.vbe_mode(1024, 768);
    // The stalled client asks for full 3 MiB updates again and again and reads nothing:
    // the socket's buffers fill and its thread blocks in a write.
    let mut stalled = Client::connect(vm.port);
    stalled.set_encodings(&[0]);
    for _ in 0..64 {
        stalled.request(false);
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut live = Client::connect(vm.port);
    live.set_encodings(&[16]);
    live.request(false);
    live.update();
    for round in 0..10u32 {
        let started = Instant::now();
        vm.paint(1024, (round * 64, 100, 64, 64), |_, _| 0x0040_8000 + round);
        let info = vm.qmp.execute("query-vnc", json!({}));
        assert_eq!(
            info["return"]["clients"].as_array().unwrap().len(),
            2,
            "{info}"
        );
        live.request(true);
        let rects = live.update();
        assert!(!rects.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "round {round} took {:?}",
            started.elapsed()
        );
    }
    let (_, _, dump) = vm.screendump();
    assert!(live.fb == dump, "the live client's picture differs");
    // The guest ran on: qtest answers at once.
    vm.qt.check_alive();
    drop(stalled);
    drop(live);
    // Both go; the server forgets them.
    let deadline = Instant::now() + WAIT;
    loop {
        let info = vm.qmp.execute("query-vnc", json!({}));
        if info["return"]["clients"]
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            break;
        }
        assert!(Instant::now() < deadline, "clients left over: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&vm.dir);
}

impl Vm {
    fn outb(&mut self, port: u16, value: u8) {
        assert_eq!(self.qt.cmd(format!("outb 0x{port:x} 0x{value:x}")), "OK");
    }

    /// The bytes waiting in the i8042's output buffer, up to `max`, waiting up to `WAIT`
    /// for the first `want`.
    fn i8042_bytes(&mut self, want: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = Instant::now() + WAIT;
        while out.len() < want {
            assert!(
                Instant::now() < deadline,
                "i8042 sent {out:02x?}, wanted {want} bytes"
            );
            if self.qt.value("inb 0x64".into()) & 1 != 0 {
                out.push(self.qt.value("inb 0x60".into()) as u8);
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        out
    }

    /// Writes the i8042's command byte.
    fn i8042_mode(&mut self, mode: u8) {
        self.outb(0x64, 0x60);
        self.outb(0x60, mode);
    }
}

#[test]
fn keys_and_the_pointer_reach_the_i8042() {
    if !vga_or_skip() {
        return;
    }
    if !Path::new("/usr/share/qemu/keymaps/en-us").exists() {
        test_support::skip::skip("QEMU's keymaps are missing (Debian package 'qemu-system-data')");
        return;
    }
    let mut vm = Vm::start("vnc-input");
    let mut c = Client::connect(vm.port);
    // Translation on (firmware's and Linux's choice): set 1.
    vm.i8042_mode(0x61);
    c.key(0x61, true); // 'a'
    c.key(0x61, false);
    assert_eq!(vm.i8042_bytes(2), [0x1e, 0x9e]);
    c.key(0xffe1, true); // Shift_L, then 'A', as clients send a capital
    c.key(0x41, true);
    c.key(0x41, false);
    c.key(0xffe1, false);
    assert_eq!(vm.i8042_bytes(4), [0x2a, 0x1e, 0x9e, 0xaa]);
    c.key(0xff52, true); // Up: an extended key
    c.key(0xff52, false);
    assert_eq!(vm.i8042_bytes(4), [0xe0, 0x48, 0xe0, 0xc8]);
    // QEMU's extended key events carry the key number; the server acknowledges the
    // pseudo-encoding in an update.
    c.set_encodings(&[0, -258]);
    c.request(false);
    let rects = c.update();
    assert!(rects.iter().any(|r| r.encoding == -258), "{rects:?}");
    c.ext_key(0x9c, true); // keypad Enter
    c.ext_key(0x9c, false);
    assert_eq!(vm.i8042_bytes(4), [0xe0, 0x1c, 0xe0, 0x9c]);
    // Translation off: set 2, breaks as 0xf0 prefixes.
    vm.i8042_mode(0x21);
    c.key(0x61, true);
    c.key(0x61, false);
    assert_eq!(vm.i8042_bytes(3), [0x1c, 0xf0, 0x1c]);
    c.key(0xff52, true);
    c.key(0xff52, false);
    assert_eq!(vm.i8042_bytes(5), [0xe0, 0x75, 0xe0, 0xf0, 0x75]);

    // The mouse reports once enabled (0xd4 0xf4): 3-byte packets, y upwards.
    vm.outb(0x64, 0xd4);
    vm.outb(0x60, 0xf4);
    assert_eq!(vm.i8042_bytes(1), [0xfa]);
    c.pointer(0, 100, 100);
    c.pointer(1, 105, 97);
    assert_eq!(vm.i8042_bytes(3), [0x09, 5, 3]);
    c.pointer(0, 95, 107);
    assert_eq!(
        vm.i8042_bytes(3),
        [0x08 | 0x10 | 0x20, (-10i8) as u8, (-10i8) as u8]
    );
    // A key held when the client goes is released.
    c.key(0x62, true);
    assert_eq!(vm.i8042_bytes(1), [0x32]);
    drop(c);
    assert_eq!(vm.i8042_bytes(2), [0xf0, 0x32]);
    let _ = std::fs::remove_dir_all(&vm.dir);
}

#[test]
fn query_vnc_info_vnc_and_the_events() {
    if !vga_or_skip() {
        return;
    }
    let mut vm = Vm::start("vnc-info");
    let caps = vm.qmp.execute("query-vnc", json!({}));
    assert_eq!(
        caps["return"],
        json!({"enabled": true, "host": "127.0.0.1", "family": "ipv4",
               "service": vm.port.to_string(), "auth": "none", "clients": []})
    );
    let c = Client::connect(vm.port);
    let local = c.s.local_addr().unwrap();
    let info = vm.qmp.execute("query-vnc", json!({}));
    assert_eq!(
        info["return"]["clients"],
        json!([{"host": "127.0.0.1", "service": local.port().to_string(),
                "family": "ipv4", "websocket": false}])
    );
    let hmp = vm
        .qmp
        .execute("human-monitor-command", json!({"command-line": "info vnc"}));
    let text = hmp["return"].as_str().unwrap().replace("\r\n", "\n");
    assert_eq!(
        text,
        format!(
            "default:\n  Server: 127.0.0.1:{} (ipv4)\n    Auth: none (Sub: none)\n  \
             Client: 127.0.0.1:{} (ipv4)\n    x509_dname: none\n    sasl_username: none\n",
            vm.port,
            local.port()
        )
    );
    drop(c);
    let deadline = Instant::now() + WAIT;
    let names = loop {
        vm.qmp.execute("query-status", json!({}));
        let names: Vec<String> = vm
            .qmp
            .events
            .iter()
            .filter(|e| e["event"].as_str().is_some_and(|n| n.starts_with("VNC_")))
            .map(|e| e["event"].as_str().unwrap().to_string())
            .collect();
        if names.len() == 3 || Instant::now() > deadline {
            break names;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        names,
        ["VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED"]
    );
    let event = vm
        .qmp
        .events
        .iter()
        .find(|e| e["event"] == "VNC_CONNECTED")
        .unwrap();
    assert_eq!(
        event["data"],
        json!({
            "server": {"host": "127.0.0.1", "service": vm.port.to_string(), "family": "ipv4",
                       "websocket": false, "auth": "none"},
            "client": {"host": "127.0.0.1", "service": local.port().to_string(),
                       "family": "ipv4", "websocket": false}
        })
    );
    let _ = std::fs::remove_dir_all(&vm.dir);
}

/// qomvm with `args` that exits at once: its status and stderr.
fn qomvm_fails(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(QOMVM)
        .args(["-M", "pc", "-accel", "qtest", "-display", "none"])
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vnc_options_and_their_errors() {
    // The seed's spelling, verbatim: display 12 is port 5912.
    let dir = std::env::temp_dir().join(format!("qomvm-vnc-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");
    let free = std::net::TcpListener::bind("127.0.0.1:5912").is_ok();
    if free {
        let mut child = Command::new(QOMVM)
            .args([
                "-M",
                "pc",
                "-accel",
                "qtest",
                "-display",
                "none",
                "-vnc",
                "127.0.0.1:12",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut qmp = QmpClient::connect(&sock);
        let info = qmp.execute("query-vnc", json!({}));
        assert_eq!(info["return"]["service"], "5912", "{info}");
        let _ = qmp.execute("quit", json!({}));
        assert!(child.wait().unwrap().success());
    } else {
        eprintln!("port 5912 is taken: the seed's display is not tried");
    }
    // -display vnc=... is the same; -vnc none listens nowhere.
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(QOMVM)
        .args([
            "-M",
            "pc",
            "-accel",
            "qtest",
            "-display",
            "vnc=127.0.0.1:0,to=99",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut qmp = QmpClient::connect(&sock);
    let info = qmp.execute("query-vnc", json!({}));
    assert_eq!(info["return"]["enabled"], true, "{info}");
    let _ = qmp.execute("quit", json!({}));
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(QOMVM)
        .args([
            "-M", "pc", "-accel", "qtest", "-display", "none", "-vnc", "none",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut qmp = QmpClient::connect(&sock);
    assert_eq!(
        qmp.execute("query-vnc", json!({}))["return"],
        json!({"enabled": false})
    );
    let _ = qmp.execute("quit", json!({}));
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);

    for (args, message) in [
        (
            &["-vnc", "localhost"][..],
            "qomvm: -vnc localhost: Failed to parse VNC display 'localhost': expected [host]:display",
        ),
        (&["-vnc", ":1,frob=on"], "qomvm: -vnc :1,frob=on: Invalid parameter 'frob'"),
        (
            &["-vnc", ":1,sasl=on"],
            "qomvm: -vnc :1,sasl=on: VNC 'sasl' is not supported by qomvm",
        ),
        (
            &["-vnc", ":1,password=on,password-secret=s0"],
            "qomvm: -vnc :1,password=on,password-secret=s0: 'password' flag is redundant with 'password-secret'",
        ),
        (
            &["-vnc", "127.0.0.1:0,to=99,password-secret=s0"],
            "qomvm: -vnc 127.0.0.1:0,to=99,password-secret=s0: No secret with id 's0'",
        ),
        (
            &["-display", "vnc=:x"],
            "qomvm: -display vnc=:x: Failed to parse VNC display ':x': display number must be 0-59635",
        ),
    ] {
        let (code, stderr) = qomvm_fails(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), message, "{args:?}");
    }
    // A port that is taken: the server cannot start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    if port >= 5900 {
        let spec = format!("127.0.0.1:{}", port - 5900);
        let (code, stderr) = qomvm_fails(&["-vnc", &spec]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("Failed to start VNC server"), "{stderr}");
    }
}

/// Debian's `vncsnapshot` and `djpeg` (packages vncsnapshot, libjpeg-turbo-progs).
fn snapshot_tools() -> bool {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    if have("vncsnapshot") && have("djpeg") {
        return true;
    }
    test_support::skip::skip(
        "vncsnapshot and djpeg are needed (packages vncsnapshot, libjpeg-turbo-progs)",
    );
    false
}

#[test]
fn vncsnapshot_sees_the_screendump() {
    if !vga_or_skip() || !snapshot_tools() {
        return;
    }
    let mut vm = Vm::start("vnc-snapshot");
    vm.vbe_mode(320, 200);
    vm.paint(320, (0, 0, 320, 200), |x, y| match (x / 80, y / 50) {
        (0, _) => 0x00ff_0000,
        (1, _) => 0x0000_ff00,
        (2, 0 | 1) => 0x0000_00ff,
        _ => 0x00ff_ffff,
    });
    let (w, h, dump) = vm.screendump();
    let jpeg = vm.dir.join("snap.jpg");
    let display = format!("127.0.0.1::{}", vm.port);
    let status = Command::new("vncsnapshot")
        .args(["-quiet", "-quality", "95", &display, jpeg.to_str().unwrap()])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "vncsnapshot failed");
    let ppm = vm.dir.join("snap.ppm");
    let out = std::fs::File::create(&ppm).unwrap();
    let status = Command::new("djpeg")
        .arg(&jpeg)
        .stdout(out)
        .status()
        .unwrap();
    assert!(status.success());
    let (sw, sh, snap) = read_ppm(&ppm);
    assert_eq!((sw, sh), (w, h));
    // JPEG is lossy: each colour within a small distance, on average.
    let diff: u64 = snap
        .iter()
        .zip(&dump)
        .map(|(a, b)| {
            (0..3)
                .map(|i| u64::from(((a >> (8 * i)) & 0xff).abs_diff((b >> (8 * i)) & 0xff)))
                .sum::<u64>()
        })
        .sum();
    let mean = diff as f64 / (f64::from(w * h) * 3.0);
    assert!(mean < 4.0, "mean difference {mean}");
    let _ = std::fs::remove_dir_all(&vm.dir);
}

/// Whatever a client sends (a bad version, bad security type, unknown messages, absurd
/// formats and lengths, random bytes), only its own connection ends; the server goes on.
#[test]
fn garbage_from_clients_ends_only_their_connections() {
    if !vga_or_skip() {
        return;
    }
    let mut vm = Vm::start("vnc-garbage");
    let send = |port: u16, bytes: &[u8], handshake: bool| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink);
        if handshake {
            let _ = s.write_all(b"RFB 003.008\n\x01\x01");
            std::thread::sleep(Duration::from_millis(50));
            let _ = s.read(&mut sink);
        }
        let _ = s.write_all(bytes);
        // The server closes (or keeps waiting for more of a message): either way, no crash.
        let _ = s.read(&mut sink);
    };
    send(vm.port, b"GET / HTTP/1.1\r\n\r\n", false);
    send(vm.port, b"RFB 003.008\n\x02", false);
    send(vm.port, &[7, 1, 2, 3], true);
    send(
        vm.port,
        &[
            0, 0, 0, 0, 24, 24, 0, 0, 0, 0, 0, 0, 0, 0, 99, 0, 0, 0, 0, 0,
        ],
        true,
    );
    send(vm.port, &[6, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff], true);
    send(
        vm.port,
        &[3, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        true,
    );
    let mut x = 0x2545_f491u32;
    for _ in 0..20 {
        let bytes: Vec<u8> = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        send(vm.port, &bytes, true);
    }
    let mut c = Client::connect(vm.port);
    c.set_encodings(&[16]);
    c.request(false);
    c.update();
    vm.qt.check_alive();
    let _ = std::fs::remove_dir_all(&vm.dir);
}

/// libvirt's way: `-vnc 127.0.0.1:0,password=on`, then QMP `set_password`. Until then
/// nobody gets in; then the right password sees the screen and a wrong one is refused with
/// RFB 3.8's reason; `expire_password` ends it; the monitor's answers are QEMU 7.2's.
#[test]
fn vnc_authentication_with_set_password() {
    if !vga_or_skip() {
        return;
    }
    let mut vm = Vm::start_with("vnc-auth", ",password=on", &[]);
    vm.vbe_mode(64, 48);
    vm.paint(64, (0, 0, 64, 48), picture);
    let info = vm.qmp.execute("query-vnc", json!({}));
    assert_eq!(info["return"]["auth"], "vnc", "{info}");
    let failed = Err(Refused {
        result: 1,
        reason: "Authentication failed".into(),
    });
    // No password yet: every attempt fails, even the empty one.
    assert_eq!(Client::try_connect(vm.port, Some(b"")).map(|_| ()), failed);
    assert_eq!(
        vm.qmp.execute(
            "set_password",
            json!({"protocol": "vnc", "password": "s3cret-and-more"})
        ),
        json!({"return": {}})
    );
    // Only the first 8 bytes count, as in every VNC server.
    let mut c = Client::try_connect(vm.port, Some(b"s3cret-a")).unwrap();
    c.request(false);
    c.update();
    let (_, _, dump) = vm.screendump();
    assert_eq!(c.fb, dump);
    assert_eq!(
        Client::try_connect(vm.port, Some(b"s3cret")).map(|_| ()),
        failed
    );
    // RFB 3.3: the server names the type, the result has no reason.
    let mut s = TcpStream::connect(("127.0.0.1", vm.port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    s.write_all(b"RFB 003.003\n").unwrap();
    let mut head = [0u8; 20];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[..4], 2u32.to_be_bytes());
    s.write_all(&vnc_auth_response(b"s3cret-and-more", &head[4..]))
        .unwrap();
    let mut result = [0u8; 4];
    s.read_exact(&mut result).unwrap();
    assert_eq!(result, [0; 4]);
    drop(s);

    // Expiry: now, never, in the future, in the past.
    for (time, works) in [
        ("now", false),
        ("never", true),
        ("+3600", true),
        ("1", false),
    ] {
        assert_eq!(
            vm.qmp
                .execute("expire_password", json!({"protocol": "vnc", "time": time})),
            json!({"return": {}})
        );
        let got = Client::try_connect(vm.port, Some(b"s3cret-and-more")).map(|_| ());
        assert_eq!(got.is_ok(), works, "{time}: {got:?}");
    }
    let reply = vm.qmp.execute(
        "expire_password",
        json!({"protocol": "vnc", "time": "soon"}),
    );
    assert_eq!(
        reply["error"]["desc"],
        "Parameter 'time' doesn't take value 'soon'"
    );
    // HMP: set_password and expire_password; a new password works at once.
    let hmp = |vm: &mut Vm, line: &str| {
        vm.qmp
            .execute("human-monitor-command", json!({"command-line": line}))["return"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(hmp(&mut vm, "expire_password vnc never"), "");
    assert_eq!(hmp(&mut vm, "set_password vnc hmp-pw"), "");
    assert!(Client::try_connect(vm.port, Some(b"hmp-pw")).is_ok());
    assert_eq!(
        hmp(&mut vm, "set_password vnc x fail"),
        "Error: Invalid parameter 'connected'\r\n"
    );
    assert_eq!(
        vm.qmp
            .execute("change-vnc-password", json!({"password": "changed"})),
        json!({"return": {}})
    );
    assert!(Client::try_connect(vm.port, Some(b"changed")).is_ok());
    assert_eq!(
        Client::try_connect(vm.port, Some(b"hmp-pw")).map(|_| ()),
        failed
    );
    // QEMU 7.2's refusals.
    let reply = vm.qmp.execute(
        "set_password",
        json!({"protocol": "vnc", "password": "x", "connected": "disconnect"}),
    );
    assert_eq!(
        reply["error"],
        json!({"class": "GenericError", "desc": "Invalid parameter 'connected'"})
    );
    let reply = vm.qmp.execute(
        "set_password",
        json!({"protocol": "spice", "password": "x"}),
    );
    assert_eq!(
        reply["error"],
        json!({"class": "DeviceNotActive", "desc": "SPICE is not in use"})
    );
    let reply = vm.qmp.execute(
        "set_password",
        json!({"protocol": "vnc", "password": "x", "display": "nope"}),
    );
    assert_eq!(reply["error"]["desc"], "Could not set password");
    let reply = vm
        .qmp
        .execute("set_password", json!({"protocol": "rdp", "password": "x"}));
    assert_eq!(
        reply["error"]["desc"],
        "Parameter 'protocol' does not accept value 'rdp'"
    );
    assert!(hmp(&mut vm, "info vnc").contains("Auth: vnc (Sub: none)"));
    vm.qt.check_alive();
    let _ = std::fs::remove_dir_all(&vm.dir);
}

/// Without `password=on` there is nothing to set: QEMU's "Could not set password", and on
/// a human monitor its hint first.
#[test]
fn set_password_without_password_auth_is_refused() {
    if !vga_or_skip() {
        return;
    }
    let mut vm = Vm::start("vnc-no-auth");
    let reply = vm
        .qmp
        .execute("set_password", json!({"protocol": "vnc", "password": "x"}));
    assert_eq!(
        reply["error"],
        json!({"class": "GenericError", "desc": "Could not set password"})
    );
    let reply = vm
        .qmp
        .execute("change-vnc-password", json!({"password": "x"}));
    assert_eq!(reply["error"]["desc"], "Could not set password");
    let out = vm.qmp.execute(
        "human-monitor-command",
        json!({"command-line": "set_password vnc x"}),
    );
    assert_eq!(
        out["return"],
        "If you want use passwords please enable password auth using '-vnc ${dpy},password'.\r\nError: Could not set password\r\n"
    );
    // Expiry is accepted (QEMU sets it whatever the auth), and clients still need none.
    assert_eq!(
        vm.qmp
            .execute("expire_password", json!({"protocol": "vnc", "time": "now"})),
        json!({"return": {}})
    );
    assert_eq!(
        vm.qmp.execute("query-vnc", json!({}))["return"]["auth"],
        "none"
    );
    let mut c = Client::connect(vm.port);
    c.request(false);
    c.update();
    let _ = std::fs::remove_dir_all(&vm.dir);
}

/// `password-secret=` takes the password from a `secret` object, and is password=on.
#[test]
fn password_secret_sets_the_password() {
    if !vga_or_skip() {
        return;
    }
    let mut vm = Vm::start_with(
        "vnc-secret",
        ",password-secret=vncsec0",
        // "from-secret" in base64.
        &[
            "-object",
            "secret,id=vncsec0,data=ZnJvbS1zZWNyZXQ=,format=base64",
        ],
    );
    assert_eq!(
        vm.qmp.execute("query-vnc", json!({}))["return"]["auth"],
        "vnc"
    );
    let mut c = Client::try_connect(vm.port, Some(b"from-secret")).unwrap();
    c.request(false);
    c.update();
    assert!(Client::try_connect(vm.port, Some(b"other")).is_err());
    let _ = std::fs::remove_dir_all(&vm.dir);
}

/// `vncsnapshot -passwd FILE`: the file is vncpasswd's (`test_support::vnc::vncpasswd_file`).
#[test]
fn vncsnapshot_authenticates_with_a_password_file() {
    if !vga_or_skip() || !snapshot_tools() {
        return;
    }
    let mut vm = Vm::start_with("vnc-snapshot-auth", ",password=on", &[]);
    vm.vbe_mode(160, 100);
    vm.paint(160, (0, 0, 160, 100), |x, _| {
        if x < 80 {
            0x00ff_0000
        } else {
            0x0000_00ff
        }
    });
    assert_eq!(
        vm.qmp.execute(
            "set_password",
            json!({"protocol": "vnc", "password": "snap-pw", "connected": "keep"})
        ),
        json!({"return": {}})
    );
    let passwd = vm.dir.join("passwd");
    std::fs::write(&passwd, vncpasswd_file(b"snap-pw")).unwrap();
    let jpeg = vm.dir.join("snap.jpg");
    let display = format!("127.0.0.1::{}", vm.port);
    let snapshot = |passwd: &Path| {
        Command::new("vncsnapshot")
            .args(["-quiet", "-passwd", passwd.to_str().unwrap()])
            .args([&display, jpeg.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    assert!(snapshot(&passwd).success(), "vncsnapshot failed");
    let ppm = vm.dir.join("snap.ppm");
    let status = Command::new("djpeg")
        .arg(&jpeg)
        .stdout(std::fs::File::create(&ppm).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let (w, h, snap) = read_ppm(&ppm);
    assert_eq!((w, h), (160, 100));
    let red = snap[(50 * 160 + 20) as usize];
    let blue = snap[(50 * 160 + 140) as usize];
    assert!(red >> 16 > 0xe0 && red & 0xff < 0x20, "{red:06x}");
    assert!(blue & 0xff > 0xe0 && blue >> 16 < 0x20, "{blue:06x}");
    // A wrong password file: no picture.
    std::fs::write(&passwd, vncpasswd_file(b"wrong")).unwrap();
    assert!(!snapshot(&passwd).success());
    let _ = std::fs::remove_dir_all(&vm.dir);
}
