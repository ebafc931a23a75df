//! The virtio-gpu driver shared by the tests of QEMU's 2D virtio GPU on the pc board under
//! qtest (`tests/virtio_gpu.rs`: `virtio-gpu-pci`; `tests/virtio_vga.rs`: `virtio-vga`): the
//! machine with the device, the control commands, formats and response types of virtio 1.2
//! (5.7 "GPU Device"), the guest memory the driver lays its rings and buffers out in, a
//! driver built on [`virtio`](crate::virtio) that makes resources and shows them as Linux's
//! virtio-gpu driver does, and the pictures the tests draw and check on the consoles.
//! Each test file keeps only its device's own registers and checks.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw::core::console::{QemuConsole, Surface};
use hw::core::machine::{machine_creation_done, machine_state};
use qom::ObjectRef;
use vm_memory::{Bytes, GuestAddress};

use crate::virtio::{SplitRing, VirtioPciDevice, NEEDS_RESET};

/// VIRTIO_F_VERSION_1.
pub const VERSION_1: u64 = 1 << 32;
/// VIRTIO_GPU_F_VIRGL: 3D commands.
pub const F_VIRGL: u64 = 1 << 0;
/// VIRTIO_GPU_F_EDID: GET_EDID.
pub const F_EDID: u64 = 1 << 1;
/// VIRTIO_GPU_F_RESOURCE_BLOB: blob resources.
pub const F_RESOURCE_BLOB: u64 = 1 << 3;
/// How long a chain may take to complete.
pub const WAIT: Duration = Duration::from_secs(10);
/// The pc's memory in [`try_pc_with`]: room for the layout below.
pub const RAM: u64 = 128 << 20;

/// The control queue's ring (64 entries), in guest memory.
pub const CTRL_RING: u64 = 0x10_0000;
/// The cursor queue's ring (16 entries).
pub const CURSOR_RING: u64 = 0x14_0000;
/// Where the driver writes a command.
pub const CMD: u64 = 0x20_0000;
/// Where the driver writes RESOURCE_ATTACH_BACKING's entries.
pub const ENTRIES: u64 = 0x21_0000;
/// The response buffer.
pub const RESP: u64 = 0x28_0000;
/// Resource `id`'s backing is at `BACKING + id * 4 MiB` ([`backing`]).
pub const BACKING: u64 = 0x100_0000;

// Control commands (virtio 1.2, 5.7.6.7).
/// VIRTIO_GPU_CMD_GET_DISPLAY_INFO.
pub const GET_DISPLAY_INFO: u32 = 0x100;
/// VIRTIO_GPU_CMD_RESOURCE_CREATE_2D.
pub const RESOURCE_CREATE_2D: u32 = 0x101;
/// VIRTIO_GPU_CMD_RESOURCE_UNREF.
pub const RESOURCE_UNREF: u32 = 0x102;
/// VIRTIO_GPU_CMD_SET_SCANOUT.
pub const SET_SCANOUT: u32 = 0x103;
/// VIRTIO_GPU_CMD_RESOURCE_FLUSH.
pub const RESOURCE_FLUSH: u32 = 0x104;
/// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D.
pub const TRANSFER_TO_HOST_2D: u32 = 0x105;
/// VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING.
pub const RESOURCE_ATTACH_BACKING: u32 = 0x106;
/// VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING.
pub const RESOURCE_DETACH_BACKING: u32 = 0x107;
/// VIRTIO_GPU_CMD_GET_CAPSET_INFO.
pub const GET_CAPSET_INFO: u32 = 0x108;
/// VIRTIO_GPU_CMD_GET_EDID.
pub const GET_EDID: u32 = 0x10a;
/// VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB.
pub const RESOURCE_CREATE_BLOB: u32 = 0x10c;
/// VIRTIO_GPU_CMD_SET_SCANOUT_BLOB.
pub const SET_SCANOUT_BLOB: u32 = 0x10d;
/// VIRTIO_GPU_CMD_CTX_CREATE (3D).
pub const CTX_CREATE: u32 = 0x200;
/// VIRTIO_GPU_CMD_UPDATE_CURSOR (cursor queue).
pub const UPDATE_CURSOR: u32 = 0x300;
/// VIRTIO_GPU_CMD_MOVE_CURSOR (cursor queue).
pub const MOVE_CURSOR: u32 = 0x301;
/// VIRTIO_GPU_FLAG_FENCE in a control header's flags.
pub const FLAG_FENCE: u32 = 1;

// Formats, named by their bytes in memory.
/// VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM.
pub const B8G8R8A8: u32 = 1;
/// VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM: Linux's framebuffer format.
pub const B8G8R8X8: u32 = 2;
/// VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM.
pub const A8R8G8B8: u32 = 3;
/// VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM.
pub const X8R8G8B8: u32 = 4;
/// VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM.
pub const R8G8B8A8: u32 = 67;
/// VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM.
pub const X8B8G8R8: u32 = 68;
/// VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM.
pub const A8B8G8R8: u32 = 121;
/// VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM.
pub const R8G8B8X8: u32 = 134;
/// Every 32-bit format QEMU's 2D device takes.
pub const FORMATS: [u32; 8] = [
    B8G8R8A8, B8G8R8X8, A8R8G8B8, X8R8G8B8, R8G8B8A8, X8B8G8R8, A8B8G8R8, R8G8B8X8,
];

/// A response type, shown in hex.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Code(pub u32);

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// VIRTIO_GPU_RESP_OK_NODATA.
pub const OK_NODATA: Code = Code(0x1100);
/// VIRTIO_GPU_RESP_OK_DISPLAY_INFO.
pub const OK_DISPLAY_INFO: Code = Code(0x1101);
/// VIRTIO_GPU_RESP_OK_EDID.
pub const OK_EDID: Code = Code(0x1104);
/// VIRTIO_GPU_RESP_ERR_UNSPEC.
pub const ERR_UNSPEC: Code = Code(0x1200);
/// VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY.
pub const ERR_OUT_OF_MEMORY: Code = Code(0x1201);
/// VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID.
pub const ERR_INVALID_SCANOUT_ID: Code = Code(0x1202);
/// VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID.
pub const ERR_INVALID_RESOURCE_ID: Code = Code(0x1203);
/// VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER.
pub const ERR_INVALID_PARAMETER: Code = Code(0x1205);

/// x, y, width, height.
pub type Rect = [u32; 4];

/// A control header (no fence) followed by `words`.
pub fn command(ty: u32, words: &[u32]) -> Vec<u8> {
    fenced(ty, 0, 0, 0, words)
}

/// A control header with `flags`, `fence_id` and `ctx_id`, followed by `words`.
pub fn fenced(ty: u32, flags: u32, fence_id: u64, ctx_id: u32, words: &[u32]) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&ty.to_le_bytes());
    c.extend_from_slice(&flags.to_le_bytes());
    c.extend_from_slice(&fence_id.to_le_bytes());
    c.extend_from_slice(&ctx_id.to_le_bytes());
    c.extend_from_slice(&[0; 4]);
    for w in words {
        c.extend_from_slice(&w.to_le_bytes());
    }
    c
}

/// The little-endian `u32` at `at` of `b`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The little-endian `u64` at `at` of `b`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Where resource `id`'s backing is: [`BACKING`] + `id` * 4 MiB.
pub fn backing(id: u32) -> u64 {
    BACKING + u64::from(id) * 0x40_0000
}

/// The four bytes of `rgb` (0xRRGGBB) in `format`'s memory order, `filler` in its X or A
/// byte.
pub fn encode(format: u32, rgb: u32, filler: u8) -> [u8; 4] {
    let [_, r, g, b] = rgb.to_be_bytes();
    match format {
        B8G8R8A8 | B8G8R8X8 => [b, g, r, filler],
        A8R8G8B8 | X8R8G8B8 => [filler, r, g, b],
        R8G8B8A8 | R8G8B8X8 => [r, g, b, filler],
        X8B8G8R8 | A8B8G8R8 => [filler, b, g, r],
        _ => unreachable!("format {format}"),
    }
}

/// A picture that differs with `seed`, pixel (x, y) as 0xRRGGBB.
pub fn pattern(seed: u32) -> impl Fn(u32, u32) -> u32 + Copy {
    move |x, y| {
        let r = (x * 7 + seed * 31) & 0xff;
        let g = (y * 13 + seed * 17) & 0xff;
        let b = ((x ^ y) + seed * 5 + 0x40) & 0xff;
        r << 16 | g << 8 | b
    }
}

/// A picture of one colour, 0xRRGGBB.
pub fn solid(rgb: u32) -> impl Fn(u32, u32) -> u32 + Copy {
    move |_, _| rgb
}

/// Asserts `s` is `w` x `h` and shows `image`; names the first pixel that differs.
pub fn assert_picture(s: &Surface, w: u32, h: u32, image: impl Fn(u32, u32) -> u32, what: &str) {
    assert_eq!((s.width, s.height), (w, h), "{what}: the console's size");
    for y in 0..h {
        for x in 0..w {
            let got = s.pixels[(y * w + x) as usize];
            assert_eq!(
                got,
                image(x, y),
                "{what}: pixel ({x}, {y}) is {got:#08x}, expected {:#08x}",
                image(x, y)
            );
        }
    }
}

/// A pc ([`RAM`]) on qtest with `driver,addr=ADDR,props...` plugged, the machine created
/// (not started): the machine and the device, or the error text.
pub fn try_pc_with(
    driver: &str,
    addr: &str,
    props: &[(&str, &str)],
) -> Result<(ObjectRef, ObjectRef), String> {
    let machine = crate::qtest::pc_on_qtest(RAM);
    let props: Vec<_> = [("addr", addr)].iter().chain(props).copied().collect();
    let dev = crate::qtest::try_plug_pci(&machine, driver, &props)?;
    machine_creation_done(&machine).unwrap();
    Ok((machine, dev))
}

/// The console of `dev`'s `head` on `machine`.
pub fn console(machine: &ObjectRef, dev: &ObjectRef, head: u32) -> Arc<QemuConsole> {
    machine_state(machine)
        .unwrap()
        .services()
        .consoles()
        .by_device(dev, head)
        .unwrap_or_else(|| panic!("no console for head {head}"))
}

/// The driver: control queue of 64 entries at [`CTRL_RING`], cursor queue of 16 at
/// [`CURSOR_RING`], commands at [`CMD`] and responses at [`RESP`].
pub struct Gpu {
    /// The machine the device is on.
    pub machine: ObjectRef,
    /// The device, whose consoles [`Gpu::screen`] reads.
    pub dev: ObjectRef,
    /// Its PCI function and virtio structures.
    pub pci: VirtioPciDevice,
    /// The control queue.
    pub ctrl: SplitRing,
    /// The cursor queue.
    pub cursor: SplitRing,
    devfn: u32,
}

impl Gpu {
    /// Resets and negotiates (`VERSION_1`, and EDID when offered) the function at `devfn`
    /// of `machine` (the device `dev`), and starts both queues.
    pub fn start(machine: &ObjectRef, dev: &ObjectRef, devfn: u32) -> Gpu {
        let pci = VirtioPciDevice::probe(machine, devfn);
        assert!(pci.negotiate(VERSION_1 | (pci.device_features() & F_EDID)));
        let ctrl = SplitRing::new(CTRL_RING, 64);
        let cursor = SplitRing::new(CURSOR_RING, 16);
        ctrl.clear(&pci.mem);
        cursor.clear(&pci.mem);
        pci.setup_queue(0, &ctrl);
        pci.setup_queue(1, &cursor);
        pci.driver_ok();
        Gpu {
            machine: machine.clone(),
            dev: dev.clone(),
            pci,
            ctrl,
            cursor,
            devfn,
        }
    }

    /// The same driver, its rings where they were, on the machine it moved to (the device
    /// at the same address).
    pub fn moved_to(self, machine: &ObjectRef, dev: &ObjectRef) -> Gpu {
        Gpu {
            machine: machine.clone(),
            dev: dev.clone(),
            pci: VirtioPciDevice::probe(machine, self.devfn),
            ..self
        }
    }

    /// Writes `bytes` to guest memory at `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.pci.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut b = vec![0; len as usize];
        self.pci.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// Submits a chain on the control queue, and waits for its completion: its used
    /// length (completions of other chains, hostile ones left behind, are skipped).
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
        let head = u32::from(self.ctrl.add_chain(&self.pci.mem, bufs));
        self.pci.notify(0);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((_, len)) = self
                .ctrl
                .take_used(&self.pci.mem)
                .into_iter()
                .find(|&(id, _)| id == head)
            {
                return len;
            }
            assert!(
                Instant::now() < deadline,
                "control chain {head} never completed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends `cmd` (one readable buffer) with a writable buffer of `resp_len` bytes
    /// (filled with 0xee first); returns what the device wrote there (its used length).
    pub fn request(&mut self, cmd: &[u8], resp_len: u32) -> Vec<u8> {
        self.write(CMD, cmd);
        self.write(RESP, &vec![0xee; resp_len as usize]);
        let len = self.submit(&[(CMD, cmd.len() as u32, false), (RESP, resp_len, true)]);
        assert!(len <= resp_len, "used length {len} > buffer {resp_len}");
        self.read(RESP, len)
    }

    /// Sends `cmd` and returns the type of its (header-only) response.
    pub fn code(&mut self, cmd: &[u8]) -> Code {
        let resp = self.request(cmd, 24);
        assert_eq!(resp.len(), 24, "the response is a control header");
        Code(le32(&resp, 0))
    }

    /// GET_DISPLAY_INFO: the response type and (x, y, width, height, enabled, flags) of
    /// each of the 16 modes.
    pub fn display_info(&mut self) -> (Code, Vec<[u32; 6]>) {
        let resp = self.request(&command(GET_DISPLAY_INFO, &[]), 408);
        assert_eq!(resp.len(), 408, "virtio_gpu_resp_display_info is 408 bytes");
        let modes = (0..16)
            .map(|i| std::array::from_fn(|k| le32(&resp, 24 + 24 * i + 4 * k)))
            .collect();
        (Code(le32(&resp, 0)), modes)
    }

    /// RESOURCE_CREATE_2D.
    pub fn create(&mut self, id: u32, format: u32, w: u32, h: u32) -> Code {
        self.code(&command(RESOURCE_CREATE_2D, &[id, format, w, h]))
    }

    /// RESOURCE_UNREF.
    pub fn unref(&mut self, id: u32) -> Code {
        self.code(&command(RESOURCE_UNREF, &[id, 0]))
    }

    /// Attaches `entries` (address, length), the command and the entries in two readable
    /// buffers as Linux sends them.
    pub fn attach(&mut self, id: u32, entries: &[(u64, u32)]) -> Code {
        self.attach_raw(id, entries.len() as u32, entries)
    }

    /// Attaches with `nr_entries` in the command, whatever `entries` holds.
    pub fn attach_raw(&mut self, id: u32, nr_entries: u32, entries: &[(u64, u32)]) -> Code {
        let cmd = command(RESOURCE_ATTACH_BACKING, &[id, nr_entries]);
        let mut ents = Vec::new();
        for &(addr, len) in entries {
            ents.extend_from_slice(&addr.to_le_bytes());
            ents.extend_from_slice(&len.to_le_bytes());
            ents.extend_from_slice(&[0; 4]);
        }
        self.write(CMD, &cmd);
        self.write(ENTRIES, &ents);
        self.write(RESP, &[0xee; 24]);
        let mut bufs = vec![(CMD, cmd.len() as u32, false)];
        if !ents.is_empty() {
            bufs.push((ENTRIES, ents.len() as u32, false));
        }
        bufs.push((RESP, 24, true));
        assert_eq!(self.submit(&bufs), 24);
        Code(le32(&self.read(RESP, 24), 0))
    }

    /// RESOURCE_DETACH_BACKING.
    pub fn detach(&mut self, id: u32) -> Code {
        self.code(&command(RESOURCE_DETACH_BACKING, &[id, 0]))
    }

    /// TRANSFER_TO_HOST_2D of rectangle `r` from `offset` of the backing.
    pub fn transfer(&mut self, id: u32, r: Rect, offset: u64) -> Code {
        let [x, y, w, h] = r;
        let (lo, hi) = (offset as u32, (offset >> 32) as u32);
        self.code(&command(TRANSFER_TO_HOST_2D, &[x, y, w, h, lo, hi, id, 0]))
    }

    /// SET_SCANOUT: rectangle `r` of resource `id` (0: disabled) on `scanout`.
    pub fn set_scanout(&mut self, scanout: u32, id: u32, r: Rect) -> Code {
        let [x, y, w, h] = r;
        self.code(&command(SET_SCANOUT, &[x, y, w, h, scanout, id]))
    }

    /// RESOURCE_FLUSH of rectangle `r`.
    pub fn flush(&mut self, id: u32, r: Rect) -> Code {
        let [x, y, w, h] = r;
        self.code(&command(RESOURCE_FLUSH, &[x, y, w, h, id, 0]))
    }

    /// Writes `image` (w x h, stride w * 4) in `format` at `addr`, 0x77 in X/A bytes.
    pub fn fill(&self, addr: u64, format: u32, w: u32, h: u32, image: impl Fn(u32, u32) -> u32) {
        let mut bytes = Vec::with_capacity((w * h * 4) as usize);
        for y in 0..h {
            for x in 0..w {
                bytes.extend_from_slice(&encode(format, image(x, y), 0x77));
            }
        }
        self.write(addr, &bytes);
    }

    /// Resource `id` (w x h in `format`) backed at `backing(id)` holding `image`: created,
    /// attached and transferred whole, as Linux makes a framebuffer.
    pub fn resource(
        &mut self,
        id: u32,
        format: u32,
        w: u32,
        h: u32,
        image: impl Fn(u32, u32) -> u32,
    ) {
        self.fill(backing(id), format, w, h, image);
        assert_eq!(self.create(id, format, w, h), OK_NODATA, "create {id}");
        assert_eq!(
            self.attach(id, &[(backing(id), w * h * 4)]),
            OK_NODATA,
            "attach {id}"
        );
        assert_eq!(
            self.transfer(id, [0, 0, w, h], 0),
            OK_NODATA,
            "transfer {id}"
        );
    }

    /// [`Gpu::resource`] in B8G8R8X8, then set whole on `scanout` and flushed.
    pub fn show(&mut self, scanout: u32, id: u32, w: u32, h: u32, image: impl Fn(u32, u32) -> u32) {
        self.resource(id, B8G8R8X8, w, h, image);
        assert_eq!(self.set_scanout(scanout, id, [0, 0, w, h]), OK_NODATA);
        assert_eq!(self.flush(id, [0, 0, w, h]), OK_NODATA);
    }

    /// The console of `head`, as `screendump` would see it now.
    pub fn screen(&self, head: u32) -> Surface {
        self.console(head).update()
    }

    /// The console of `head`.
    pub fn console(&self, head: u32) -> Arc<QemuConsole> {
        console(&self.machine, &self.dev, head)
    }

    /// A cursor command on the cursor queue: its used length.
    pub fn cursor_cmd(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
        let head = u32::from(self.cursor.add_chain(&self.pci.mem, bufs));
        self.pci.notify(1);
        let used = self.pci.wait_used(&mut self.cursor, 1, WAIT);
        assert_eq!(
            used.len(),
            1,
            "the cursor queue did not give the buffer back"
        );
        assert_eq!(used[0].0, head);
        used[0].1
    }

    /// Waits until the device says it needs a reset.
    pub fn wait_broken(&self, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.pci.status() & NEEDS_RESET == 0 {
            assert!(
                Instant::now() < deadline,
                "{what}: DEVICE_NEEDS_RESET not set"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
