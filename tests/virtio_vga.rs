//! `virtio-vga` (`-vga virtio`, `-device virtio-vga`): the 2D virtio GPU and a standard VGA
//! in one PCI function, on the pc board under the qtest accelerator.
//!
//! - a qomvm process (`-vga virtio`): the PCI header (1af4:1050 revision 1, class 0300,
//!   subsystem 1af4:1100, INTA), the BARs sized by all-ones probing (BAR 0: 8 MiB of video
//!   memory, 32-bit prefetchable; BAR 2: 16 KiB, the VGA's registers in front of the
//!   virtio 1.0 structures; BAR 4: MSI-X; no I/O BAR), the virtio capabilities' layout
//!   (common configuration at 0x1000 and ISR at 0x1800, 2 KiB each, device configuration
//!   at 0x2000, notifications at 0x3000 with a multiplier of 4, a PCI_CFG window) and the
//!   ROM BAR carrying `vgabios-virtio.bin`; a VBE mode set through BAR 2's registers and
//!   a picture written through BAR 0 that `screendump` shows as written;
//! - machines in this process: the VGA and VBE registers through the legacy ports, the
//!   0xa0000 window and BAR 2's front (0x400, 0x500, 0x600) agreeing; the virtio GPU
//!   driven through BAR 2 by the tests' virtio-gpu driver ([`test_support::virtio_gpu`],
//!   shared with `tests/virtio_gpu.rs`: features, queues, GET_DISPLAY_INFO);
//!   neither half disturbing the other's registers; the hand-over of output 0 (the VGA
//!   until the driver first sets a scanout, the GPU's scanout from then on, even once
//!   disabled, the VGA again after a virtio reset or a system reset); the properties
//!   virtio-gpu-pci has (max_outputs, xres/yres, edid, max_hostmem);
//! - the command line: `-vga virtio` and `-device virtio-vga` instead of the pc's std VGA,
//!   max_outputs=17 refused, `device_add`/`device_del` refused (not hot-pluggable);
//! - migration in one section: a VBE picture, then an enabled GPU showing a resource, move
//!   to a second machine, which shows the same; after a virtio reset there it shows the
//!   VGA state that moved; a GPU enabled and then with its scanout disabled still holds
//!   output 0 on the destination (QEMU migrates `enable`).
//!
//! Expected values come from QEMU 7.2 (`hw/display/virtio-vga.c`, `virtio-gpu.c`,
//! `virtio-gpu-base.c`, `vga-pci.c`, `hw/virtio/virtio-pci.c`), not from the device's code.
//! SeaBIOS's banner on `-vga virtio` (KVM) is in `tests/vga.rs`.

use std::sync::Arc;

use hw::core::console::Surface;
use hw::core::machine::machine_state;
use hw::core::memory::AddressSpace;
use hw::core::migration::{device_states, load_vm, save_vm, Progress};
use hw::core::runstate::{vm_start, vm_stop, RunStatus, ShutdownCause};
use qom::ObjectRef;
use serde_json::{json, Value};
use test_support::fuzz_qtest::{hex, program_bars, Qtest};
use test_support::qtest::{qomvm_pc_qom_tree, qomvm_pc_stderr, with_deadline};
use test_support::vga_text::Image;
use test_support::virtio::{PciConfig, VirtioPciDevice, ACKNOWLEDGE, DRIVER};
use test_support::virtio_gpu::{
    assert_picture, command, console, le32, pattern, solid, try_pc_with, Code, Gpu, B8G8R8X8, CMD,
    ERR_INVALID_RESOURCE_ID, ERR_OUT_OF_MEMORY, F_EDID, F_VIRGL, GET_DISPLAY_INFO, GET_EDID,
    OK_DISPLAY_INFO, OK_EDID, OK_NODATA, RESP, VERSION_1, WAIT,
};

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
const VGABIOS_VIRTIO: &str = "/usr/share/seabios/vgabios-virtio.bin";

/// 1af4:1050, the virtio 1.0 GPU's IDs.
const IDS: u32 = 0x1050_1af4;
/// 00:02.0, where `-vga virtio` puts it (and the in-process machines too).
const DEVFN: u32 = 2 << 3;
/// Video memory: QEMU's fixed 8 MiB for virtio-vga.
const VRAM: u64 = 8 << 20;

/// BAR 2's front: the VGA ports 0x3c0-0x3df, the VBE registers, QEMU's extended ones.
const MMIO_VGA: u64 = 0x400;
const MMIO_VBE: u64 = 0x500;
const MMIO_QEXT: u64 = 0x600;
/// The virtio structures after it (QEMU's virtio-vga layout).
const COMMON: u64 = 0x1000;
const ISR: u64 = 0x1800;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;

/// Whether `s` is `w` x `h` showing `image`.
fn shows(s: &Surface, w: u32, h: u32, image: impl Fn(u32, u32) -> u32) -> bool {
    (s.width, s.height) == (w, h)
        && (0..h).all(|y| (0..w).all(|x| s.pixels[(y * w + x) as usize] == image(x, y)))
}

/// The VBE picture the tests put on the VGA: 64 x 48 (the GPU's resources are other sizes,
/// so a console showing the wrong one shows at once).
const VGA_W: u32 = 64;
const VGA_H: u32 = 48;

/// A pc (128 MiB) on qtest with `virtio-vga,addr=02.0,props...`, its BARs assigned, running.
struct Board {
    machine: ObjectRef,
    dev: ObjectRef,
    config: PciConfig,
    io: Arc<AddressSpace>,
    mem: Arc<AddressSpace>,
    /// BAR 0 and BAR 2.
    fb: u64,
    mmio: u64,
}

fn try_board(props: &[(&str, &str)]) -> Result<Board, String> {
    let (machine, dev) = try_pc_with("virtio-vga", "02.0", props)?;
    let ms = machine_state(&machine).unwrap();
    vm_start(ms).unwrap();
    let config = PciConfig::new(&machine, DEVFN);
    let fb = u64::from(config.read(0x10, 4) & !0xf);
    let mmio = u64::from(config.read(0x18, 4) & !0xf);
    assert!(
        fb != 0 && mmio != 0,
        "BARs 0 and 2 assigned: {fb:#x} {mmio:#x}"
    );
    Ok(Board {
        io: ms.system_io().clone(),
        mem: ms.system_memory().clone(),
        machine,
        dev,
        config,
        fb,
        mmio,
    })
}

fn board(props: &[(&str, &str)]) -> Board {
    try_board(props).unwrap()
}

impl Board {
    fn outb(&self, port: u16, value: u8) {
        self.io.write(port.into(), value.into(), 1);
    }

    fn inb(&self, port: u16) -> u8 {
        self.io.read(port.into(), 1) as u8
    }

    fn vbe_set(&self, index: u16, value: u16) {
        self.io.write(0x1ce, index.into(), 2);
        self.io.write(0x1cf, value.into(), 2);
    }

    fn vbe_get(&self, index: u16) -> u16 {
        self.io.write(0x1ce, index.into(), 2);
        self.io.read(0x1cf, 2) as u16
    }

    /// BAR 2 at `offset`.
    fn bar2_read(&self, offset: u64, size: u32) -> u64 {
        self.mem.read(self.mmio + offset, size)
    }

    fn bar2_write(&self, offset: u64, value: u64, size: u32) {
        self.mem.write(self.mmio + offset, value, size)
    }

    /// VGA port `port` in BAR 2's mirror of 0x3c0-0x3df.
    fn vga_port(port: u16) -> u64 {
        MMIO_VGA + u64::from(port - 0x3c0)
    }

    /// A `w` x `h` 32 bpp VBE mode with a linear framebuffer, through the ports.
    fn vbe_mode(&self, w: u16, h: u16) {
        for (index, value) in [(4, 0), (1, w), (2, h), (3, 32), (4, 0x41)] {
            self.vbe_set(index, value);
        }
        self.outb(0x3c0, 0x20);
    }

    /// Writes `image` (`w` x `h`, 32 bpp: bytes B, G, R, X) at BAR 0 + `offset`.
    fn draw(&self, offset: u64, w: u32, h: u32, image: impl Fn(u32, u32) -> u32) {
        for y in 0..h {
            for x in 0..w {
                let at = self.fb + offset + 4 * u64::from(y * w + x);
                self.mem.write(at, u64::from(image(x, y)), 4);
            }
        }
    }

    fn console(&self, head: u32) -> Arc<hw::core::console::QemuConsole> {
        console(&self.machine, &self.dev, head)
    }

    /// The console of `head`, as `screendump` would see it now.
    fn screen(&self, head: u32) -> Surface {
        self.console(head).update()
    }

    /// The stream `migrate` sends, the machine stopped first.
    fn stream(&self) -> Vec<u8> {
        vm_stop(
            machine_state(&self.machine).unwrap(),
            RunStatus::FinishMigrate,
        )
        .unwrap();
        let mut out = Vec::new();
        save_vm(&self.machine, &mut out, &mut Progress::default()).unwrap();
        out
    }

    /// A new machine (virtio-vga with `props`) that loaded this one's stream and runs.
    fn migrate(&self, props: &[(&str, &str)]) -> Result<Board, String> {
        let stream = self.stream();
        let dst = board(props);
        let ms = machine_state(&dst.machine).unwrap();
        vm_stop(ms, RunStatus::InMigrate).unwrap();
        load_vm(&dst.machine, &mut stream.as_slice(), None).map_err(|e| e.to_string())?;
        vm_start(ms).unwrap();
        Ok(dst)
    }

    /// The driver, started (from a reset) on this board's GPU.
    fn gpu(&self) -> Gpu {
        Gpu::start(&self.machine, &self.dev, DEVFN)
    }

    /// `gpu`, its rings where they were, on this board it moved to.
    fn moved(&self, gpu: Gpu) -> Gpu {
        gpu.moved_to(&self.machine, &self.dev)
    }
}

// ---------------------------------------------------------------------------------------
// A qomvm process.

fn rom_or_skip() -> Option<Vec<u8>> {
    test_support::skip::read_or_skip(VGABIOS_VIRTIO, "seabios")
}

fn cfg8(qt: &mut Qtest, reg: u32) -> u32 {
    (qt.pci_read32(DEVFN, reg & !3) >> (8 * (reg & 3))) & 0xff
}

/// The capabilities as (id, offset).
fn capabilities(qt: &mut Qtest) -> Vec<(u32, u32)> {
    let mut caps = Vec::new();
    let mut at = cfg8(qt, 0x34) & 0xfc;
    while at != 0 && caps.len() < 48 {
        caps.push((cfg8(qt, at), at));
        at = cfg8(qt, at + 1) & 0xfc;
    }
    caps
}

/// What a BAR register reads after all ones were written to it (then put back).
fn probe_bar(qt: &mut Qtest, reg: u32) -> u32 {
    let old = qt.pci_read32(DEVFN, reg);
    qt.pci_write32(DEVFN, reg, 0xffff_ffff);
    let probe = qt.pci_read32(DEVFN, reg);
    qt.pci_write32(DEVFN, reg, old);
    probe
}

#[test]
fn the_header_bars_capabilities_and_rom_are_qemus() {
    let Some(rom) = rom_or_skip() else { return };
    let (mut qt, _qmp, _dir) =
        Qtest::start_with_qmp(QOMVM, "qomvm-virtio-vga-header", &["-vga", "virtio"]);
    assert_eq!(qt.pci_read32(DEVFN, 0), IDS, "00:02.0 is the virtio GPU");
    assert_eq!(
        qt.pci_read32(DEVFN, 0x08),
        0x0300_0001,
        "class VGA (0300, prog-if 00), revision 1"
    );
    assert_eq!(qt.pci_read32(DEVFN, 0x2c), 0x1100_1af4, "subsystem");
    assert_eq!(cfg8(&mut qt, 0x3d), 1, "INTA");
    assert_ne!(
        qt.pci_read32(DEVFN, 0x04) & (0x10 << 16),
        0,
        "a capability list"
    );

    // The BARs, sized as firmware sizes them.
    assert_eq!(
        probe_bar(&mut qt, 0x10),
        0xff80_0008,
        "BAR 0: 8 MiB, 32-bit, prefetchable"
    );
    assert_eq!(probe_bar(&mut qt, 0x14), 0, "no BAR 1");
    // QEMU 7.2 registers the modern virtio BAR 64-bit prefetchable (0xffffc00c, BAR 3 its
    // upper half); qomvm's virtio-pci transport makes every modern BAR 32-bit and
    // non-prefetchable (a known difference, the same for every virtio-pci device).
    assert_eq!(
        probe_bar(&mut qt, 0x18),
        0xffff_c000,
        "BAR 2: 16 KiB memory"
    );
    assert_eq!(probe_bar(&mut qt, 0x1c), 0, "no BAR 3");
    assert_eq!(
        probe_bar(&mut qt, 0x20),
        0xffff_f000,
        "BAR 4: MSI-X, 4 KiB memory"
    );
    assert_eq!(probe_bar(&mut qt, 0x24), 0, "no BAR 5: no legacy I/O BAR");
    let rom_size = (rom.len() as u32).next_power_of_two();
    assert_eq!(
        probe_bar(&mut qt, 0x30),
        !(rom_size - 1) | 1,
        "the ROM BAR: the VGA BIOS's size rounded up"
    );

    // The capabilities: MSI-X (3 vectors, table and PBA in BAR 4) and the five virtio ones.
    let caps = capabilities(&mut qt);
    let msix: Vec<u32> = caps.iter().filter(|c| c.0 == 0x11).map(|c| c.1).collect();
    assert_eq!(msix.len(), 1, "one MSI-X capability: {caps:x?}");
    let msix = msix[0];
    assert_eq!(
        (qt.pci_read32(DEVFN, msix) >> 16) & 0x7ff,
        2,
        "3 vectors (table size - 1)"
    );
    assert_eq!(
        qt.pci_read32(DEVFN, msix + 4),
        4,
        "the table: BIR 4, offset 0"
    );
    assert_eq!(
        qt.pci_read32(DEVFN, msix + 8),
        0x800 | 4,
        "the PBA: BIR 4, offset 0x800"
    );
    let mut virtio: Vec<[u32; 6]> = caps
        .iter()
        .filter(|c| c.0 == 0x09)
        .map(|&(_, at)| {
            let cfg_type = cfg8(&mut qt, at + 3);
            let multiplier = if cfg_type == 2 {
                qt.pci_read32(DEVFN, at + 16)
            } else {
                0
            };
            [
                cfg_type,
                cfg8(&mut qt, at + 2),
                cfg8(&mut qt, at + 4),
                qt.pci_read32(DEVFN, at + 8),
                qt.pci_read32(DEVFN, at + 12),
                multiplier,
            ]
        })
        .collect();
    virtio.sort();
    // The device configuration's length: QEMU 7.2 says its region's, 0x1000; qomvm's
    // transport (every virtio-pci device) says the configuration's size. Both cover
    // virtio_gpu_config's 16 bytes, which is what a driver needs.
    let device_len = virtio.iter().find(|c| c[0] == 4).map_or(0, |c| c[4]);
    assert!(
        (16..=0x1000).contains(&device_len),
        "the device configuration's length {device_len:#x}"
    );
    // [type, cap_len, bar, offset, length, notify_off_multiplier]
    assert_eq!(
        virtio,
        [
            [1, 16, 2, 0x1000, 0x800, 0],
            [2, 20, 2, 0x3000, 0x1000, 4],
            [3, 16, 2, 0x1800, 0x800, 0],
            [4, 16, 2, 0x2000, device_len, 0],
            [5, 20, 0, 0, 0, 0],
        ],
        "common, notify, ISR, device, PCI_CFG: QEMU's virtio-vga layout in BAR 2"
    );

    // As firmware assigns them: BARs 0, 2 and 4, memory all.
    let functions = program_bars(&mut qt);
    let f = functions
        .iter()
        .find(|f| f.devfn == DEVFN)
        .expect("the function at 00:02.0");
    let sizes: Vec<(bool, u64)> = f.bars.iter().map(|b| (b.0, b.2)).collect();
    assert_eq!(sizes, [(false, VRAM), (false, 0x4000), (false, 0x1000)]);
    let mmio = f.bars[1].1;
    assert_eq!(
        qt.value(format!("readw {:#x}", mmio + MMIO_VBE)),
        0xb0c5,
        "VBE's ID at BAR 2 + 0x500"
    );
    assert_eq!(
        qt.value(format!("readb {:#x}", mmio + COMMON + 0x12)),
        2,
        "num_queues at BAR 2 + 0x1000 + 0x12"
    );

    // The ROM BAR decodes once enabled, with the VGA BIOS.
    qt.pci_write32(DEVFN, 0x30, 0xd000_0001);
    assert!(
        qt.read_bytes(0xd000_0000, rom.len()) == rom,
        "the ROM BAR holds {VGABIOS_VIRTIO}"
    );
    qt.pci_write32(DEVFN, 0x30, 0xd000_0000);
    assert_eq!(
        qt.value("readw 0xd0000000".into()),
        0xffff,
        "ROM decoding off"
    );
    qt.check_alive();
}

/// Through the qomvm process: a 64x48 32 bpp VBE mode set through BAR 2's VBE registers,
/// a picture written through BAR 0, a `screendump` showing it as written (the GPU's driver
/// never ran, so output 0 is the VGA's).
#[test]
fn a_vbe_mode_set_through_bar2_dumps_as_written() {
    let (mut qt, mut qmp, dir) =
        Qtest::start_with_qmp(QOMVM, "qomvm-virtio-vga-dump", &["-vga", "virtio"]);
    let functions = program_bars(&mut qt);
    let f = functions
        .iter()
        .find(|f| f.vendor_device == IDS)
        .expect("a 1af4:1050 function");
    let (fb, mmio) = (f.bars[0].1, f.bars[1].1);
    assert_eq!(
        qt.value(format!("readw {:#x}", mmio + MMIO_VBE + 2 * 0xa)),
        VRAM >> 16,
        "video memory in 64 KiB units"
    );
    for (index, value) in [(4u64, 0u64), (1, 64), (2, 48), (3, 32), (4, 0x41)] {
        let at = mmio + MMIO_VBE + 2 * index;
        assert_eq!(qt.cmd(format!("writew {at:#x} {value:#x}")), "OK");
    }
    assert_eq!(
        qt.cmd(format!("writeb {:#x} 0x20", mmio + Board::vga_port(0x3c0))),
        "OK"
    );
    let image = pattern(3);
    for y in 0..48u32 {
        let line: Vec<u8> = (0..64u32)
            .flat_map(|x| {
                let [_, r, g, b] = image(x, y).to_be_bytes();
                [b, g, r, 0]
            })
            .collect();
        let at = fb + u64::from(y) * 256;
        let request = format!("write {at:#x} {:#x} {}", line.len(), hex(&line));
        assert_eq!(qt.cmd(request), "OK");
    }
    let dump = dir.join("vbe.ppm");
    let reply = qmp.execute("screendump", json!({"filename": dump.to_str().unwrap()}));
    assert_eq!(reply, json!({"return": {}}));
    let shot = Image::read_ppm(&dump);
    assert_eq!((shot.width, shot.height), (64, 48));
    for y in 0..48 {
        for x in 0..64 {
            let [_, r, g, b] = image(x as u32, y as u32).to_be_bytes();
            assert_eq!(shot.pixel(x, y), [r, g, b], "pixel ({x}, {y})");
        }
    }
    qt.check_alive();
}

// ---------------------------------------------------------------------------------------
// Machines in this process.

#[test]
fn vga_and_vbe_registers_agree_through_the_ports_the_window_and_bar2() {
    with_deadline("virtio-vga-regs", || {
        let b = board(&[]);
        let port = Board::vga_port;
        // The miscellaneous output register: written at one, read at the other.
        b.outb(0x3c2, 0x67);
        assert_eq!(b.inb(0x3cc), 0x67);
        assert_eq!(b.bar2_read(port(0x3cc), 1), 0x67, "BAR 2 + 0x40c");
        b.bar2_write(port(0x3c2), 0x27, 1);
        assert_eq!(b.inb(0x3cc), 0x27, "written through BAR 2 + 0x402");
        b.outb(0x3c2, 0x67);
        // A CRTC register by index and data through the ports, and through BAR 2 as one
        // 16-bit write (index first).
        b.outb(0x3d4, 0x0e);
        b.outb(0x3d5, 0x12);
        b.bar2_write(port(0x3d4), 0x0e, 1);
        assert_eq!(b.bar2_read(port(0x3d5), 1), 0x12);
        b.bar2_write(port(0x3d4), 0x340f, 2);
        b.outb(0x3d4, 0x0f);
        assert_eq!(b.inb(0x3d5), 0x34);
        // Colour mode: the mono CRTC ports float; mono mode: the other way round.
        assert_eq!(b.inb(0x3b5), 0xff, "0x3b5 in colour mode");
        b.outb(0x3c2, 0x66);
        b.outb(0x3b4, 0x0f);
        assert_eq!(b.inb(0x3b5), 0x34, "the CRTC at 0x3b4/0x3b5 in mono mode");
        assert_eq!(b.inb(0x3d5), 0xff, "0x3d5 in mono mode");
        b.outb(0x3c2, 0x67);
        // The DAC: written through BAR 2, read back through the ports.
        b.bar2_write(port(0x3c8), 7, 1);
        for c in [0x3f, 0x20, 0x01] {
            b.bar2_write(port(0x3c9), c, 1);
        }
        b.outb(0x3c7, 7);
        assert_eq!(
            [b.inb(0x3c9), b.inb(0x3c9), b.inb(0x3c9)],
            [0x3f, 0x20, 0x01]
        );

        // VBE: the ID, 8 MiB of video memory, at the ports and at BAR 2 + 0x500 + 2n.
        assert_eq!(b.vbe_get(0), 0xb0c5);
        assert_eq!(b.bar2_read(MMIO_VBE, 2), 0xb0c5);
        assert_eq!(b.vbe_get(0xa), (VRAM >> 16) as u16, "8 MiB in 64 KiB units");
        assert_eq!(b.bar2_read(MMIO_VBE + 2 * 0xa, 2), VRAM >> 16);
        b.bar2_write(MMIO_VBE + 2, 0x280, 2);
        assert_eq!(b.vbe_get(1), 0x280, "XRES written through BAR 2");
        b.vbe_set(2, 0x1e0);
        assert_eq!(
            b.bar2_read(MMIO_VBE + 4, 2),
            0x1e0,
            "YRES read through BAR 2"
        );
        // A mode too big for 8 MiB is cut to what fits.
        for (index, value) in [(1, 4096), (2, 4096), (3, 32), (4, 0x41)] {
            b.bar2_write(MMIO_VBE + 2 * index, value, 2);
        }
        assert_eq!(b.vbe_get(2), 512, "8 MiB / (4096 * 4) lines");
        assert_eq!(b.bar2_read(MMIO_VBE + 2 * 7, 2), 512, "virtual height");
        b.vbe_set(4, 0);
        // QEMU's extended registers: their size, a little-endian framebuffer.
        assert_eq!(b.bar2_read(MMIO_QEXT, 4), 8);
        assert_eq!(b.bar2_read(MMIO_QEXT + 4, 4), 0x1e1e_1e1e);

        // The 0xa0000 window is the video memory behind BAR 0 (chain-4 mode 13h style).
        b.outb(0x3c4, 4);
        b.outb(0x3c5, 0x08);
        b.outb(0x3c4, 2);
        b.outb(0x3c5, 0x0f);
        b.outb(0x3ce, 6);
        b.outb(0x3cf, 0x05);
        b.mem.write(0xa0010, 0x1122_3344, 4);
        assert_eq!(b.mem.read(b.fb + 0x10, 4), 0x1122_3344);
        b.mem.write(b.fb + 0x13, 0x99, 1);
        assert_eq!(b.mem.read(0xa0010, 4), 0x9922_3344);

        // A 64x48 32 bpp mode set through BAR 2, a picture through BAR 0: output 0 shows
        // it as written.
        for (index, value) in [(4, 0), (1, 64), (2, 48), (3, 32), (4, 0x41)] {
            b.bar2_write(MMIO_VBE + 2 * index, value, 2);
        }
        b.bar2_write(port(0x3c0), 0x20, 1);
        b.draw(0, VGA_W, VGA_H, pattern(1));
        assert_picture(&b.screen(0), VGA_W, VGA_H, pattern(1), "the VBE mode");
        // One pixel through the window (bank 0): the VGA's picture changes there.
        b.mem.write(0xa0000 + 4 * (10 * 64 + 20), 0x00ab_cdef, 4);
        let s = b.screen(0);
        assert_eq!(s.pixels[10 * 64 + 20], 0xab_cdef, "written at 0xa0000");
        assert_eq!(s.pixels[10 * 64 + 21], pattern(1)(21, 10));
    });
}

/// The virtio half works through BAR 2: QEMU's 2D GPU behind it.
#[test]
fn the_virtio_gpu_is_driven_through_bar2() {
    with_deadline("virtio-vga-gpu", || {
        let b = board(&[]);
        let pci = VirtioPciDevice::probe(&b.machine, DEVFN);
        let features = pci.device_features();
        assert_ne!(features & VERSION_1, 0, "VERSION_1");
        assert_ne!(features & F_EDID, 0, "edid is on by default");
        assert_eq!(features & F_VIRGL, 0, "no virgl");
        assert_eq!(pci.num_queues(), 2);
        assert_eq!(
            b.bar2_read(COMMON + 0x12, 2),
            2,
            "num_queues at BAR 2 + 0x1012"
        );
        for (q, size) in [(0u64, 64), (1, 16)] {
            pci.common_write(0x16, q, 2);
            assert_eq!(pci.common_read(0x18, 2), size, "queue {q}'s size");
        }
        // events_read, events_clear, num_scanouts, num_capsets, at BAR 2 + 0x2000.
        let config: Vec<u64> = (0..4).map(|i| b.bar2_read(DEVICE_CFG + 4 * i, 4)).collect();
        assert_eq!(config, [0, 0, 1, 0]);

        // The VIRTIO_PCI_CAP_PCI_CFG window reaches the same structures: BAR 2, offsets as
        // in the capabilities (0x1000 + 0x12: num_queues; 0x2000 + 8: num_scanouts).
        let window = b
            .config
            .capabilities()
            .into_iter()
            .filter(|&(id, _)| id == 0x09)
            .map(|(_, at)| at)
            .find(|&at| b.config.read(at + 3, 1) == 5)
            .expect("a VIRTIO_PCI_CAP_PCI_CFG capability");
        let through_window = |offset: u32, len: u32| {
            b.config.write(window + 4, 2, 1);
            b.config.write(window + 8, offset, 4);
            b.config.write(window + 12, len, 4);
            b.config.read(window + 16, len)
        };
        assert_eq!(
            through_window(0x1012, 2),
            2,
            "num_queues through the window"
        );
        assert_eq!(
            through_window(0x2008, 4),
            1,
            "num_scanouts through the window"
        );
        through_window(0x1014, 1);
        b.config.write(window + 16, u32::from(ACKNOWLEDGE), 1);
        assert_eq!(
            pci.status(),
            ACKNOWLEDGE,
            "status written through the window"
        );

        let mut gpu = b.gpu();
        let (code, modes) = gpu.display_info();
        assert_eq!(code, OK_DISPLAY_INFO);
        assert_eq!(
            modes[0],
            [0, 0, 1280, 800, 1, 0],
            "output 0: 1280x800, enabled"
        );
        assert!(modes[1..].iter().all(|m| *m == [0; 6]), "{modes:?}");
        let edid = gpu.request(&command(GET_EDID, &[0, 0]), 1056);
        assert_eq!(Code(le32(&edid, 0)), OK_EDID);
        assert_eq!(edid[32..40], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        // Completions raise the legacy interrupt: ISR bit 0 at BAR 2 + 0x1800, read once.
        assert_eq!(b.bar2_read(ISR, 1) & 1, 1);
        assert_eq!(b.bar2_read(ISR, 1), 0, "reading the ISR clears it");
        // A notification written at BAR 2 + 0x3000 by hand (queue 0's offset is 0).
        for q in [1u64, 0] {
            pci.common_write(0x16, q, 2);
            assert_eq!(pci.common_read(0x1e, 2), q, "queue {q}'s notify_off");
        }
        gpu.write(CMD, &command(GET_DISPLAY_INFO, &[]));
        let head = gpu
            .ctrl
            .add_chain(&gpu.pci.mem, &[(CMD, 24, false), (RESP, 408, true)]);
        b.bar2_write(NOTIFY, 0, 2);
        let used = gpu.pci.wait_used(&mut gpu.ctrl, 1, WAIT);
        assert_eq!(used, [(u32::from(head), 408)]);
        gpu.show(0, 1, 40, 30, pattern(4));
        assert_picture(&b.screen(0), 40, 30, pattern(4), "a resource on output 0");
    });
}

/// Output 0 is the VGA until the driver first sets a scanout; from then on the GPU's,
/// even with the scanout disabled again, until a virtio reset (QEMU's `enable`).
#[test]
fn the_gpu_takes_output_0_at_its_first_scanout_and_gives_it_back_at_reset() {
    with_deadline("virtio-vga-handover", || {
        let b = board(&[]);
        b.vbe_mode(VGA_W as u16, VGA_H as u16);
        b.draw(0, VGA_W, VGA_H, pattern(1));
        let vga = b.screen(0);
        assert_picture(&vga, VGA_W, VGA_H, pattern(1), "the VGA before the driver");

        // A driver that runs, makes resources, fails to set one or disables the
        // (disabled) scanout has not taken the screen.
        let mut gpu = b.gpu();
        assert_picture(&b.screen(0), VGA_W, VGA_H, pattern(1), "DRIVER_OK");
        gpu.resource(1, B8G8R8X8, 32, 24, solid(0x12_3456));
        assert_eq!(
            gpu.set_scanout(0, 99, [0, 0, 32, 24]),
            ERR_INVALID_RESOURCE_ID
        );
        assert_eq!(gpu.set_scanout(0, 0, [0, 0, 0, 0]), OK_NODATA);
        assert_eq!(gpu.flush(1, [0, 0, 32, 24]), OK_NODATA);
        assert_picture(&b.screen(0), VGA_W, VGA_H, pattern(1), "no scanout set yet");
        // The VGA is live meanwhile.
        b.draw(0, VGA_W, 1, solid(0x00_ff00));
        let s = b.screen(0);
        assert_eq!(s.pixels[5], 0x00_ff00, "the VGA goes on drawing");
        b.draw(0, VGA_W, VGA_H, pattern(1));

        // The first scanout set: the resource, pixel for pixel.
        let before = b.console(0).refresh(None).generation;
        assert_eq!(gpu.set_scanout(0, 1, [0, 0, 32, 24]), OK_NODATA);
        assert_eq!(gpu.flush(1, [0, 0, 32, 24]), OK_NODATA);
        assert_picture(&b.screen(0), 32, 24, solid(0x12_3456), "the GPU's scanout");
        assert!(b.console(0).refresh(Some(before)).generation > before);
        gpu.show(0, 2, 40, 30, pattern(2));
        assert_picture(&b.screen(0), 40, 30, pattern(2), "another resource");
        // The VGA drawing meanwhile does not show.
        b.draw(0, VGA_W, VGA_H, pattern(5));
        assert_picture(&b.screen(0), 40, 30, pattern(2), "the VGA drew underneath");

        // Disabled: still not the VGA (QEMU keeps `enable` until reset).
        assert_eq!(gpu.set_scanout(0, 0, [0, 0, 0, 0]), OK_NODATA);
        let disabled = b.screen(0);
        assert!(
            !shows(&disabled, VGA_W, VGA_H, pattern(5)),
            "a disabled scanout after enabling must not give output 0 back to the VGA"
        );
        assert!(
            !shows(&disabled, 40, 30, pattern(2)),
            "nor keep showing the resource"
        );

        // A virtio reset (status 0): the VGA, with what it drew meanwhile, redrawn whole.
        let gen = b.console(0).refresh(None).generation;
        gpu.pci.set_status(0);
        assert_eq!(gpu.pci.status(), 0);
        let update = b.console(0).refresh(Some(gen));
        let every_row = std::iter::once(0..VGA_H).collect::<Vec<_>>();
        assert_eq!(
            update.changed_rows, every_row,
            "the switch redraws every row"
        );
        assert_picture(
            &update.surface,
            VGA_W,
            VGA_H,
            pattern(5),
            "the VGA after the virtio reset",
        );
        assert_eq!(b.vbe_get(4), 0x41, "a virtio reset leaves the VGA alone");

        // The driver again: the GPU again, its old resources gone.
        let mut gpu = b.gpu();
        assert_picture(&b.screen(0), VGA_W, VGA_H, pattern(5), "DRIVER_OK again");
        assert_eq!(gpu.flush(2, [0, 0, 40, 30]), ERR_INVALID_RESOURCE_ID);
        gpu.show(0, 3, 24, 16, pattern(3));
        assert_picture(&b.screen(0), 24, 16, pattern(3), "the GPU again");

        // A system reset resets both: the VGA shows, in the mode the guest sets next.
        let ms = machine_state(&b.machine).unwrap();
        hw::core::runstate::qemu_system_reset(ms, ShutdownCause::GuestReset);
        // What firmware does after a reset: the BARs where they were, decoding on.
        b.config.write(0x10, b.fb as u32, 4);
        b.config.write(0x18, b.mmio as u32, 4);
        b.config.write(0x04, 0x7, 2);
        assert_eq!(b.vbe_get(4), 0, "VBE off after a system reset");
        b.vbe_mode(VGA_W as u16, VGA_H as u16);
        b.draw(0, VGA_W, VGA_H, pattern(6));
        assert_picture(
            &b.screen(0),
            VGA_W,
            VGA_H,
            pattern(6),
            "the VGA after a system reset",
        );
    });
}

/// BAR 2 holds both: VGA writes at its front leave the virtio common configuration as the
/// driver set it, and the driver's writes leave the VGA's registers.
#[test]
fn vga_registers_and_virtio_configuration_do_not_disturb_each_other() {
    with_deadline("virtio-vga-isolation", || {
        let b = board(&[]);
        let pci = VirtioPciDevice::probe(&b.machine, DEVFN);
        pci.set_status(0);
        pci.set_status(ACKNOWLEDGE | DRIVER);
        pci.common_write(0x08, 1, 4);
        pci.common_write(0x0c, 1, 4);
        pci.common_write(0x16, 1, 2);
        pci.common_write(0x20, 0x1234_5000, 8);
        let common = |b: &Board| -> Vec<u64> {
            [
                (0x08, 4),
                (0x12, 2),
                (0x14, 1),
                (0x16, 2),
                (0x18, 2),
                (0x20, 8),
            ]
            .iter()
            .map(|&(o, s)| b.bar2_read(COMMON + o, s))
            .collect()
        };
        let set = common(&b);
        assert_eq!(
            set,
            [1, 2, u64::from(ACKNOWLEDGE | DRIVER), 1, 16, 0x1234_5000],
            "driver_feature_select, num_queues, status, queue_select, size, desc"
        );

        // Colour mode (the CRTC at 0x3d4/0x3d5).
        b.outb(0x3c2, 0x67);
        // The VGA through BAR 2's front: every VBE register, the VGA ports, the extended
        // registers, and the gap up to the common configuration.
        for (index, value) in [
            (4, 0),
            (1, 320),
            (2, 200),
            (3, 16),
            (5, 1),
            (6, 400),
            (8, 3),
            (9, 5),
        ] {
            b.bar2_write(MMIO_VBE + 2 * index, value, 2);
        }
        b.bar2_write(Board::vga_port(0x3d4), 0x5a0c, 2);
        b.bar2_write(Board::vga_port(0x3c4), 0x0f02, 2);
        b.bar2_write(MMIO_QEXT + 4, 0x1e1e_1e1e, 4);
        for off in (0x620..0x1000).step_by(0x20) {
            b.bar2_write(off, 0xa5a5, 2);
        }
        assert_eq!(
            common(&b),
            set,
            "the common configuration after the VGA's writes"
        );
        assert_eq!(pci.device_config(8, 4), 1, "num_scanouts");
        assert_eq!(pci.status(), ACKNOWLEDGE | DRIVER);

        // The driver's writes everywhere in the common configuration, the ISR, the device
        // configuration and the notifications: the VGA's registers stay.
        let vbe: Vec<u16> = (0..10).map(|i| b.vbe_get(i)).collect();
        assert_eq!(vbe[1..4], [320, 200, 16], "{vbe:?}");
        b.outb(0x3d4, 0x0c);
        let crtc = b.inb(0x3d5);
        assert_eq!(crtc, 0x5a);
        for q in 0..2u64 {
            pci.common_write(0x16, q, 2);
            pci.common_write(0x18, 8, 2);
            pci.common_write(0x1a, 0xffff, 2);
            pci.common_write(0x20, 0xdead_b000, 8);
            pci.common_write(0x28, 0xdead_c000, 8);
            pci.common_write(0x30, 0xdead_d000, 8);
        }
        pci.common_write(0x10, 0xffff, 2);
        pci.common_write(0x00, 1, 4);
        b.bar2_read(ISR, 1);
        pci.write_device_config(4, 0xffff_ffff, 4);
        pci.set_status(0);
        let after: Vec<u16> = (0..10).map(|i| b.vbe_get(i)).collect();
        assert_eq!(after, vbe, "the VBE registers after the driver's writes");
        let through_bar2: Vec<u16> = (0..10)
            .map(|i| b.bar2_read(MMIO_VBE + 2 * i, 2) as u16)
            .collect();
        assert_eq!(through_bar2, vbe, "the same through BAR 2");
        b.outb(0x3d4, 0x0c);
        assert_eq!(b.inb(0x3d5), crtc);
        b.outb(0x3c4, 0x02);
        assert_eq!(b.inb(0x3c5), 0x0f, "the sequencer's map mask");
        assert_eq!(b.bar2_read(MMIO_QEXT, 4), 8);
        assert_eq!(b.bar2_read(MMIO_QEXT + 4, 4), 0x1e1e_1e1e);
        // And the virtio half still works from a reset.
        let mut gpu = b.gpu();
        assert_eq!(gpu.display_info().0, OK_DISPLAY_INFO);
    });
}

/// virtio-gpu-pci's properties, on virtio-vga.
#[test]
fn the_properties_are_virtio_gpu_pcis() {
    with_deadline("virtio-vga-props", || {
        // Two outputs: output 1 is a plain GPU console, never the VGA.
        let b = board(&[("max_outputs", "2")]);
        b.vbe_mode(VGA_W as u16, VGA_H as u16);
        b.draw(0, VGA_W, VGA_H, pattern(1));
        assert_picture(&b.screen(0), VGA_W, VGA_H, pattern(1), "output 0");
        assert!(
            !shows(&b.screen(1), VGA_W, VGA_H, pattern(1)),
            "output 1 is not the VGA"
        );
        let mut gpu = b.gpu();
        assert_eq!(gpu.pci.device_config(8, 4), 2, "num_scanouts");
        let (_, modes) = gpu.display_info();
        assert_eq!(modes[0], [0, 0, 1280, 800, 1, 0]);
        assert_eq!(modes[1], [0; 6], "only output 0 starts enabled");
        gpu.show(1, 1, 32, 16, pattern(2));
        assert_picture(&b.screen(1), 32, 16, pattern(2), "output 1");
        gpu.show(0, 2, 16, 32, pattern(3));
        assert_picture(&b.screen(0), 16, 32, pattern(3), "output 0");
        assert_picture(&b.screen(1), 32, 16, pattern(2), "output 1 kept");

        let b = board(&[("xres", "1024"), ("yres", "768"), ("edid", "off")]);
        let mut gpu = b.gpu();
        assert_eq!(gpu.pci.device_features() & F_EDID, 0, "edid=off");
        assert_eq!(gpu.display_info().1[0], [0, 0, 1024, 768, 1, 0]);

        let b = board(&[("max_hostmem", "1M")]);
        let mut gpu = b.gpu();
        assert_eq!(
            gpu.create(1, B8G8R8X8, 1024, 1024),
            ERR_OUT_OF_MEMORY,
            "4 MiB of 1"
        );
        assert_eq!(gpu.create(2, B8G8R8X8, 256, 128), OK_NODATA);

        let err = try_board(&[("max_outputs", "17")])
            .err()
            .expect("17 outputs");
        assert!(err.contains("invalid max_outputs > 16"), "{err}");
        assert!(try_board(&[("max_outputs", "16")]).is_ok());
    });
}

// ---------------------------------------------------------------------------------------
// The command line.

/// How many virtio-vga and std VGA devices qomvm with `args` has.
fn displays(args: &[&str]) -> Result<(usize, usize), String> {
    let tree = qomvm_pc_qom_tree(QOMVM, args)?;
    Ok((
        tree.matches("(virtio-vga)").count(),
        tree.matches("(VGA)").count(),
    ))
}

#[test]
fn vga_virtio_and_device_virtio_vga_replace_the_std_vga() {
    assert_eq!(displays(&[]), Ok((0, 1)), "the pc's default std VGA");
    assert_eq!(displays(&["-vga", "virtio"]), Ok((1, 0)), "-vga virtio");
    assert_eq!(
        displays(&["-device", "virtio-vga"]),
        Ok((1, 0)),
        "a display -device replaces the default VGA"
    );
    assert_eq!(
        displays(&["-nodefaults", "-device", "virtio-vga,id=video0"]),
        Ok((1, 0))
    );
    assert_eq!(
        displays(&["-vga", "virtio", "-vga", "std"]),
        Ok((0, 1)),
        "the last -vga wins"
    );
    assert_eq!(displays(&["-vga", "std", "-vga", "virtio"]), Ok((1, 0)));
    assert_eq!(displays(&["-vga", "none"]), Ok((0, 0)));
}

#[test]
fn max_outputs_over_16_is_refused_in_qemus_words() {
    let (ok, stderr) = qomvm_pc_stderr(QOMVM, &["-device", "virtio-vga,max_outputs=17"]);
    assert!(!ok);
    assert_eq!(
        stderr,
        "qomvm: -device virtio-vga,max_outputs=17: invalid max_outputs > 16"
    );
    assert_eq!(
        displays(&["-nodefaults", "-device", "virtio-vga,max_outputs=16"]),
        Ok((1, 0))
    );
}

fn error_text(reply: &Value) -> String {
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
        .to_string()
}

/// QEMU 7.2: virtio-vga is not hot-pluggable: `device_add` and `device_del` on a running
/// machine are refused, and the refused device claims nothing (the legacy VGA ports still
/// answer as the cold-plugged one's).
#[test]
fn virtio_vga_is_not_hotpluggable() {
    let (mut qt, mut qmp, _dir) = Qtest::start_with_qmp(
        QOMVM,
        "qomvm-virtio-vga-hotplug",
        &["-nodefaults", "-device", "virtio-vga,id=video0"],
    );
    assert_eq!(
        qmp.execute("query-status", json!({}))["return"]["status"],
        "running"
    );
    let reply = qmp.execute(
        "device_add",
        json!({"driver": "virtio-vga", "id": "video1"}),
    );
    assert_eq!(
        error_text(&reply),
        "Device 'virtio-vga' does not support hotplugging"
    );
    let reply = qmp.execute("device_del", json!({"id": "video0"}));
    assert_eq!(
        error_text(&reply),
        "Device 'virtio-vga' does not support hotplugging"
    );
    let peripheral: Vec<String> = qmp.execute("qom-list", json!({"path": "/machine/peripheral"}))
        ["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    assert!(peripheral.contains(&"video0".to_string()), "{peripheral:?}");
    assert!(
        !peripheral.contains(&"video1".to_string()),
        "{peripheral:?}"
    );
    // The cold-plugged one still owns the legacy ports: its 8 MiB.
    assert_eq!(qt.cmd("outw 0x1ce 0xa".into()), "OK");
    assert_eq!(qt.value("inw 0x1cf".into()), VRAM >> 16);
    // Only one function answers.
    let found = (0..32u32)
        .filter(|slot| qt.pci_read32(slot << 3, 0) == IDS)
        .count();
    assert_eq!(found, 1);
    // A std VGA refused the same way, for comparison of the words.
    let reply = qmp.execute("device_add", json!({"driver": "VGA"}));
    assert_eq!(
        error_text(&reply),
        "Device 'VGA' does not support hotplugging"
    );
    qt.check_alive();
}

// ---------------------------------------------------------------------------------------
// Migration.

/// The state moves in one section: the device's, with the VGA's video memory in it.
#[test]
fn a_vbe_picture_moves_in_one_section() {
    with_deadline("virtio-vga-migrate-vbe", || {
        let src = board(&[]);
        src.vbe_mode(VGA_W as u16, VGA_H as u16);
        src.vbe_set(9, 2);
        src.draw(0, VGA_W, VGA_H + 2, pattern(1));
        // The driver has made a resource but set no scanout: the VGA shows.
        let mut gpu = src.gpu();
        gpu.resource(1, B8G8R8X8, 32, 24, pattern(2));
        let screen = src.screen(0);
        assert_picture(&screen, VGA_W, VGA_H, |x, y| pattern(1)(x, y + 2), "source");

        let states = device_states(&src.machine).unwrap();
        let ours: Vec<_> = states
            .iter()
            .filter(|(_, (kind, _))| kind == "virtio-vga")
            .collect();
        assert_eq!(ours.len(), 1, "one virtio-vga section");
        let (path, (_, section)) = ours[0];
        assert_eq!(
            section.get::<u64>("vram_size").unwrap(),
            VRAM,
            "the VGA's video memory is in the device's section"
        );
        let below: Vec<&String> = states
            .keys()
            .filter(|p| p.starts_with(&format!("{path}/")))
            .collect();
        assert!(
            below.is_empty(),
            "no other section for its parts: {below:?}"
        );
        let vbe: Vec<u16> = (0..10).map(|i| src.vbe_get(i)).collect();

        let dst = src.migrate(&[]).unwrap();
        assert_eq!(dst.screen(0), screen, "the destination's output 0");
        let moved: Vec<u16> = (0..10).map(|i| dst.vbe_get(i)).collect();
        assert_eq!(moved, vbe, "the VBE registers");
        assert_eq!(
            dst.bar2_read(MMIO_VBE + 2 * 2, 2),
            u64::from(VGA_H),
            "YRES in BAR 2"
        );
        assert_eq!(
            dst.mem.read(dst.fb + 4 * 64 * 10 + 12, 4),
            u64::from(pattern(1)(3, 10))
        );
        // The resource moved too: shown on the destination, the GPU takes the screen.
        let mut gpu = dst.moved(gpu);
        assert_eq!(gpu.set_scanout(0, 1, [0, 0, 32, 24]), OK_NODATA);
        assert_eq!(gpu.flush(1, [0, 0, 32, 24]), OK_NODATA);
        assert_picture(&dst.screen(0), 32, 24, pattern(2), "the moved resource");

        // max_outputs must match.
        let other = board(&[]);
        other.vbe_mode(VGA_W as u16, VGA_H as u16);
        assert!(
            other.migrate(&[("max_outputs", "2")]).is_err(),
            "1 output, 2 here"
        );
    });
}

/// An enabled GPU moves enabled: the destination shows the resource; a virtio reset there
/// gives output 0 back to the VGA state that moved beneath it.
#[test]
fn an_enabled_gpu_moves_and_gives_the_screen_back_to_the_moved_vga_at_reset() {
    with_deadline("virtio-vga-migrate-gpu", || {
        let src = board(&[]);
        src.vbe_mode(VGA_W as u16, VGA_H as u16);
        src.draw(0, VGA_W, VGA_H, pattern(1));
        let mut gpu = src.gpu();
        gpu.show(0, 1, 40, 30, pattern(2));
        // The VGA draws on beneath the GPU's picture.
        src.draw(0, VGA_W, VGA_H, pattern(7));
        assert_picture(&src.screen(0), 40, 30, pattern(2), "source");

        let dst = src.migrate(&[]).unwrap();
        assert_picture(&dst.screen(0), 40, 30, pattern(2), "destination");
        let gpu = dst.moved(gpu);
        gpu.pci.set_status(0);
        assert_picture(
            &dst.screen(0),
            VGA_W,
            VGA_H,
            pattern(7),
            "the moved VGA after a virtio reset on the destination",
        );
        let mut gpu = dst.gpu();
        gpu.show(0, 2, 24, 16, pattern(3));
        assert_picture(&dst.screen(0), 24, 16, pattern(3), "the GPU again");
    });
}

/// QEMU migrates `enable` (`vmstate_virtio_gpu_scanouts`' first field): a GPU that was
/// enabled and then disabled its scanout still holds output 0 on the destination; the VGA
/// comes back only at a reset.
#[test]
fn an_enabled_gpu_with_its_scanout_disabled_stays_enabled_across_a_migration() {
    with_deadline("virtio-vga-migrate-disabled", || {
        let src = board(&[]);
        src.vbe_mode(VGA_W as u16, VGA_H as u16);
        src.draw(0, VGA_W, VGA_H, pattern(1));
        assert_picture(&src.screen(0), VGA_W, VGA_H, pattern(1), "the VGA");
        let mut gpu = src.gpu();
        gpu.show(0, 1, 40, 30, pattern(2));
        assert_eq!(gpu.set_scanout(0, 0, [0, 0, 0, 0]), OK_NODATA);
        assert!(
            !shows(&src.screen(0), VGA_W, VGA_H, pattern(1)),
            "the source keeps the VGA off"
        );

        let dst = src.migrate(&[]).unwrap();
        assert!(
            !shows(&dst.screen(0), VGA_W, VGA_H, pattern(1)),
            "the destination gave output 0 back to the VGA; QEMU 7.2 migrates `enable`, so \
             an enabled GPU with a disabled scanout keeps it"
        );
        let gpu = dst.moved(gpu);
        gpu.pci.set_status(0);
        assert_picture(&dst.screen(0), VGA_W, VGA_H, pattern(1), "after a reset");
    });
}
