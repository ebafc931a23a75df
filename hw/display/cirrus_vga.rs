//! `cirrus-vga` (QEMU's `hw/display/cirrus_vga.c`): the Cirrus Logic CLGD 5446 on PCI,
//! 1013:00b8, class 0300, as QEMU emulates it: enough for SeaBIOS's `vgabios-cirrus.bin`
//! (which uses the VGA text modes), Linux's `cirrus` DRM driver and older `cirrusfb`.
//!
//! On top of the VGA core (`vga.rs`) it has QEMU's extended registers:
//!
//! - the sequencer: SR6 unlocks the extensions (0x12 reads back 0x12, anything else
//!   0x0f), SR7 selects the extended modes and their depth (8, 16, 24 or 32 bits; 15 or 16
//!   at "16 bits" from the hidden DAC), SR10-13 the hardware cursor (position, with the
//!   low bits of x and y in the index register's top bits, and pattern), SR17 where the
//!   blitter's registers appear in memory, and scratch and clock registers that read back;
//! - the graphics controller: GR0/GR1 as 8-bit colours (the VGA keeps 4 bits), GR5's
//!   write modes 4 and 5 (colour expansion of CPU writes), GR9/GRA the two banks of the
//!   0xa0000 window (4 or 16 KiB granularity, GRB), GR10-15 wider colours, GR20-39 the
//!   BitBLT engine (`cirrus_blit.rs`);
//! - the CRT controller: CR19-1D (extended start address and pitch bits, interlace), CR24
//!   and CR26 (attribute controller read-back), CR27 the chip ID, 0xb8;
//! - the hidden DAC register: the fifth of consecutive reads of 0x3c6 returns it, a write
//!   after four reads sets it; SR12 bit 1 switches 0x3c9 to the cursor's 16 colours.
//!
//! Its PCI face: BAR 0, 32 MiB prefetchable, is video memory (`vgamem_mb`, 4 MiB by
//! default; the chip addresses 4 MiB of it) at 0 with the blitter's registers in its
//! last 256 bytes when SR17 asks, and the system-to-video blit aperture at 16 MiB; BAR 1,
//! 4 KiB, has the VGA ports 0x3c0-0x3df at 0 and the blitter's registers at 0x100 (what
//! Linux uses); the expansion ROM BAR `vgabios-cirrus.bin`. QEMU's comment "XXX: add byte
//! swapping apertures" stands there too: there are none. BAR 0 is served by handlers (no
//! accelerator slot): the window over it changes meaning with SR17, GRB and the blitter,
//! as QEMU's `cirrus_update_memory_access` remaps it.
//!
//! Guest misbehaviour (blits out of range, unknown blit kinds) is logged rate-limited and
//! ignored.

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{type_init, Prop};

use crate::core::console::{GraphicHwOps, QemuConsole, Surface};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::display::cirrus_blit::{Blit, BlitRegs, Engine, Started, SystemToVideo};
use crate::display::vga::{VgaCommon, VgaRegs, Vram, VGA_IO_BASE, VGA_IO_SIZE, VGA_LOWMEM_BASE, VGA_LOWMEM_SIZE};
use crate::display::vga_draw::{self, DrawHooks};
use crate::display::vga_pci::PCI_CLASS_DISPLAY_VGA;
use crate::pci::pci::{BarKind, PciDevice, PciDeviceImpl};

/// QEMU's `TYPE_PCI_CIRRUS_VGA`.
pub const TYPE_CIRRUS_VGA: &str = "cirrus-vga";
/// QEMU's `PCI_VENDOR_ID_CIRRUS`.
pub const PCI_VENDOR_ID_CIRRUS: u16 = 0x1013;
/// QEMU's `CIRRUS_ID_CLGD5446`: the PCI device ID and CR27.
pub const CIRRUS_ID_CLGD5446: u8 = 0xb8;

/// Video memory the 5446 addresses, whatever `vgamem_mb` is (QEMU's `real_vram_size`).
const CIRRUS_ADDRESSED_VRAM: u64 = 4 << 20;
/// BAR 0: the linear framebuffer at 0, the blit aperture at 16 MiB.
const LINEAR_BAR_SIZE: u64 = 32 << 20;
const BLIT_APERTURE_OFFSET: u64 = 16 << 20;
const BLIT_APERTURE_SIZE: u64 = 4 << 20;
/// BAR 1 (QEMU's `CIRRUS_PNPMMIO_SIZE`): ports 0x3c0.. at 0, the blitter at 0x100.
const MMIO_BAR_SIZE: u64 = 0x1000;
const MMIO_BLT_OFFSET: u64 = 0x100;

/// Sequencer bits (QEMU's `CIRRUS_SR7_*`, `CIRRUS_CURSOR_*`, `CIRRUS_MMIO_*`).
mod sr {
    /// SR7: extended (SVGA) modes.
    pub const SR7_SVGA: u8 = 0x01;
    /// SR7: the depth.
    pub const SR7_BPP_MASK: u8 = 0x0e;
    /// SR12: the hardware cursor shows.
    pub const CURSOR_SHOW: u8 = 0x01;
    /// SR12: 0x3c9 reaches the cursor's palette.
    pub const CURSOR_HIDDEN_PEL: u8 = 0x02;
    /// SR12: a 64x64 cursor (else 32x32).
    pub const CURSOR_LARGE: u8 = 0x04;
    /// SR17: the blitter's registers appear in memory...
    pub const MMIO_ENABLE: u8 = 0x04;
    /// SR17: ... at the end of the linear framebuffer (else at 0xb8000).
    pub const MMIO_USE_PCIADDR: u8 = 0x40;
}

/// GRB bits (QEMU's `CIRRUS_BANKING_*`) and GR31's (`CIRRUS_BLT_*`).
mod gr {
    /// GRB: two banks (GR9 at 0xa0000, GRA at 0xa8000), else one of 64 KiB.
    pub const BANKING_DUAL: u8 = 0x01;
    /// GRB: addresses are multiplied by 8 (8-byte colour expansion granularity).
    pub const BY8_ADDRESSING: u8 = 0x02;
    /// GRB: write modes 4 and 5 expand.
    pub const EXTENDED_WRITE_MODES: u8 = 0x04;
    /// GRB: 16 KiB bank granularity (else 4 KiB).
    pub const BANKING_16K: u8 = 0x20;
    /// GRB: with `EXTENDED_WRITE_MODES`, 16-bit pixels and addresses multiplied by 16.
    pub const BY16: u8 = 0x14;
    /// GR31: a blit is running.
    pub const BLT_BUSY: u8 = 0x01;
    /// GR31: start a blit.
    pub const BLT_START: u8 = 0x02;
    /// GR31: reset the blitter.
    pub const BLT_RESET: u8 = 0x04;
    /// GR31: QEMU clears it with the others.
    pub const BLT_FIFOUSED: u8 = 0x10;
    /// GR31: writing GR2A starts a blit.
    pub const BLT_AUTOSTART: u8 = 0x80;
}

/// The blitter's registers in memory (QEMU's `CIRRUS_MMIO_*`): offset and GR number.
const BLT_MMIO_REGS: [(u8, u8); 31] = [
    (0x00, 0x00),
    (0x01, 0x10),
    (0x02, 0x12),
    (0x03, 0x14),
    (0x04, 0x01),
    (0x05, 0x11),
    (0x06, 0x13),
    (0x07, 0x15),
    (0x08, 0x20),
    (0x09, 0x21),
    (0x0a, 0x22),
    (0x0b, 0x23),
    (0x0c, 0x24),
    (0x0d, 0x25),
    (0x0e, 0x26),
    (0x0f, 0x27),
    (0x10, 0x28),
    (0x11, 0x29),
    (0x12, 0x2a),
    (0x14, 0x2c),
    (0x15, 0x2d),
    (0x16, 0x2e),
    (0x17, 0x2f),
    (0x18, 0x30),
    (0x1a, 0x32),
    (0x1b, 0x33),
    (0x1c, 0x34),
    (0x1d, 0x35),
    (0x20, 0x38),
    (0x21, 0x39),
    (0x40, 0x31),
];

fn blt_register(offset: u64) -> Option<usize> {
    BLT_MMIO_REGS
        .iter()
        .find(|(at, _)| u64::from(*at) == offset)
        .map(|(_, gr)| usize::from(*gr))
}

/// The Cirrus registers the VGA core lacks (QEMU keeps them in `VGACommonState`'s 256
/// entry arrays and `CirrusVGAState`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CirrusRegs {
    /// The sequencer index, all 8 bits (SR10/SR11 take the cursor's low bits from it).
    pub sr_index: u8,
    /// SR5-SR1F (SR0-4 are the core's).
    pub sr: [u8; 0x20],
    /// The graphics controller index, all 8 bits.
    pub gr_index: u8,
    /// GR9-GR39 (GR0-8 are the core's, GR0/1 with 4 bits).
    pub gr: [u8; 0x40],
    /// GR0 as written (QEMU's `cirrus_shadow_gr0`).
    pub shadow_gr0: u8,
    /// GR1 as written.
    pub shadow_gr1: u8,
    /// Consecutive reads of 0x3c6 (QEMU's `cirrus_hidden_dac_lockindex`).
    pub hidden_dac_lock: u8,
    /// The hidden DAC register (16-bit colour format).
    pub hidden_dac: u8,
    /// The cursor's 16 colours.
    pub hidden_palette: [u8; 48],
    /// Hardware cursor x.
    pub cursor_x: u32,
    /// Hardware cursor y.
    pub cursor_y: u32,
}

impl CirrusRegs {
    /// QEMU's `cirrus_reset` for the 5446: 4 MiB, PCI, fastest memory.
    pub fn reset() -> Self {
        let mut sr = [0u8; 0x20];
        let mut gr = [0u8; 0x40];
        sr[0x06] = 0x0f;
        sr[0x1f] = 0x2d;
        sr[0x0f] = 0x98;
        sr[0x17] = 0x20;
        sr[0x15] = 0x04;
        gr[0x18] = 0x0f;
        CirrusRegs {
            sr_index: 0,
            sr,
            gr_index: 0,
            gr,
            shadow_gr0: 0,
            shadow_gr1: 0,
            hidden_dac_lock: 5,
            hidden_dac: 0,
            hidden_palette: [0; 48],
            cursor_x: 0,
            cursor_y: 0,
        }
    }

    /// QEMU's `cirrus_get_bpp`: 0 outside the extended modes.
    pub fn bpp(&self) -> u32 {
        if self.sr[7] & sr::SR7_SVGA == 0 {
            return 0;
        }
        let bpp16 = if self.hidden_dac & 0x0f == 1 { 16 } else { 15 };
        match self.sr[7] & sr::SR7_BPP_MASK {
            0x02 | 0x06 => bpp16,
            0x04 => 24,
            0x08 => 32,
            _ => 8,
        }
    }

    /// QEMU's `cirrus_update_bank_ptr`: where bank `index` of the window starts in video
    /// memory and how much of it exists.
    fn bank(&self, index: usize, vram_size: u64) -> (u64, u64) {
        let grb = self.gr[0x0b];
        let reg = if grb & gr::BANKING_DUAL != 0 {
            self.gr[0x09 + index]
        } else {
            self.gr[0x09]
        };
        let shift = if grb & gr::BANKING_16K != 0 { 14 } else { 12 };
        let mut offset = u64::from(reg) << shift;
        let mut limit = vram_size.saturating_sub(offset);
        if grb & gr::BANKING_DUAL == 0 && index != 0 {
            // One 64 KiB bank: its second half.
            if limit > 0x8000 {
                offset += 0x8000;
                limit -= 0x8000;
            } else {
                limit = 0;
            }
        }
        if limit > 0 {
            (offset, limit)
        } else {
            (0, 0)
        }
    }

    /// The address multiplier of GRB (colour expansion writes 8 or 16 bytes a byte).
    fn address_shift(&self) -> u32 {
        let grb = self.gr[0x0b];
        if grb & gr::BY16 == gr::BY16 {
            4
        } else if grb & gr::BY8_ADDRESSING != 0 {
            3
        } else {
            0
        }
    }
}

/// Registers and the blit waiting for its source.
struct CirrusState {
    regs: CirrusRegs,
    transfer: Option<SystemToVideo>,
}

/// The Cirrus on top of the VGA core: what its ports, windows and BARs reach.
///
/// Lock order: `state`, then the core's `regs`.
pub struct CirrusVga {
    /// The VGA core (its registers and video memory).
    pub vga: Arc<VgaCommon>,
    state: Mutex<CirrusState>,
    /// Mask of the addresses the chip reaches (QEMU's `cirrus_addr_mask`).
    addr_mask: u32,
    /// Whether the BitBLT engine runs (`blitter` property).
    blitter: bool,
}

impl CirrusVga {
    /// A Cirrus with `vram` (at least 4 MiB, a power of two), in its reset state.
    pub fn new(vram: Arc<Vram>, blitter: bool) -> Arc<CirrusVga> {
        let addr_mask = (vram.size().min(CIRRUS_ADDRESSED_VRAM) - 1) as u32;
        let cirrus = CirrusVga {
            vga: VgaCommon::new(vram),
            state: Mutex::new(CirrusState {
                regs: CirrusRegs::reset(),
                transfer: None,
            }),
            addr_mask,
            blitter,
        };
        cirrus.reset();
        Arc::new(cirrus)
    }

    /// QEMU's `cirrus_reset`: the VGA's reset, then the Cirrus defaults.
    pub fn reset(&self) {
        let mut st = self.state.lock();
        self.vga.reset();
        st.regs = CirrusRegs::reset();
        st.transfer = None;
        self.vga.regs.lock().cr[0x27] = CIRRUS_ID_CLGD5446;
    }

    /// A copy of the extended registers.
    pub fn regs(&self) -> CirrusRegs {
        self.state.lock().regs.clone()
    }

    fn vram_size(&self) -> u64 {
        u64::from(self.addr_mask) + 1
    }

    /// QEMU's `cirrus_vga_ioport_read` for one byte port.
    pub fn ioport_read(&self, port: u16) -> u8 {
        let mut st = self.state.lock();
        let mut r = self.vga.regs.lock();
        if r.ignores_port(port) {
            return 0xff;
        }
        let c = &mut st.regs;
        match port {
            0x3c4 => c.sr_index,
            0x3c5 => read_sr(c, &r),
            0x3c6 => {
                c.hidden_dac_lock = c.hidden_dac_lock.wrapping_add(1);
                if c.hidden_dac_lock == 5 {
                    c.hidden_dac_lock = 0;
                    c.hidden_dac
                } else {
                    0xff
                }
            }
            0x3c8 => {
                c.hidden_dac_lock = 0;
                r.ioport_read(port)
            }
            0x3c9 if c.sr[0x12] & sr::CURSOR_HIDDEN_PEL != 0 => {
                let sub = usize::from(r.dac_sub_index.min(2));
                let value = c.hidden_palette[usize::from(r.dac_read_index & 0x0f) * 3 + sub];
                r.dac_sub_index += 1;
                if r.dac_sub_index >= 3 {
                    r.dac_sub_index = 0;
                    r.dac_read_index = r.dac_read_index.wrapping_add(1);
                }
                value
            }
            0x3ce => c.gr_index,
            0x3cf => read_gr(c, &r, c.gr_index),
            0x3b5 | 0x3d5 => read_cr(&r),
            _ => r.ioport_read(port),
        }
    }

    /// QEMU's `cirrus_vga_ioport_write` for one byte port.
    pub fn ioport_write(&self, port: u16, val: u8) {
        let mut st = self.state.lock();
        let mut r = self.vga.regs.lock();
        if r.ignores_port(port) {
            return;
        }
        match port {
            0x3c4 => {
                st.regs.sr_index = val;
                r.ioport_write(port, val);
            }
            0x3c5 => write_sr(&mut st.regs, &mut r, val),
            0x3c6 => {
                if st.regs.hidden_dac_lock == 4 {
                    st.regs.hidden_dac = val;
                }
                st.regs.hidden_dac_lock = 0;
            }
            0x3c9 if st.regs.sr[0x12] & sr::CURSOR_HIDDEN_PEL != 0 => {
                let sub = usize::from(r.dac_sub_index.min(2));
                r.dac_cache[sub] = val;
                r.dac_sub_index = sub as u8 + 1;
                if r.dac_sub_index == 3 {
                    let at = usize::from(r.dac_write_index & 0x0f) * 3;
                    st.regs.hidden_palette[at..at + 3].copy_from_slice(&r.dac_cache);
                    r.dac_sub_index = 0;
                    r.dac_write_index = r.dac_write_index.wrapping_add(1);
                }
            }
            0x3ce => {
                st.regs.gr_index = val;
                r.ioport_write(port, val);
            }
            0x3cf => {
                let index = st.regs.gr_index;
                self.write_gr(&mut st, &mut r, index, val);
            }
            0x3b5 | 0x3d5 => match r.cr_index {
                0x00..=0x18 => r.ioport_write(port, val),
                index @ 0x19..=0x1d => r.cr[usize::from(index)] = val,
                // Read-only (CR22, CR24, CR26, CR27) or absent.
                _ => {}
            },
            _ => r.ioport_write(port, val),
        }
    }

    /// QEMU's `cirrus_vga_write_gr`.
    fn write_gr(&self, st: &mut CirrusState, r: &mut VgaRegs, index: u8, val: u8) {
        let c = &mut st.regs;
        let i = usize::from(index);
        match index {
            0x00..=0x04 | 0x06..=0x08 => {
                if index == 0 {
                    c.shadow_gr0 = val;
                } else if index == 1 {
                    c.shadow_gr1 = val;
                }
                r.ioport_write(0x3ce, index);
                r.ioport_write(0x3cf, val);
            }
            // Bit 2 is the Cirrus write modes 4 and 5.
            0x05 => r.gr[5] = val & 0x7f,
            0x09..=0x0b
            | 0x10..=0x15
            | 0x20
            | 0x22
            | 0x24
            | 0x26
            | 0x28
            | 0x29
            | 0x2c
            | 0x2d
            | 0x2f
            | 0x30
            | 0x32..=0x35
            | 0x38
            | 0x39 => c.gr[i] = val,
            0x21 | 0x23 | 0x25 | 0x27 => c.gr[i] = val & 0x1f,
            0x2a => {
                c.gr[i] = val & 0x3f;
                if c.gr[0x31] & gr::BLT_AUTOSTART != 0 {
                    self.blit_start(st);
                }
            }
            0x2e => c.gr[i] = val & 0x3f,
            0x31 => {
                let old = c.gr[0x31];
                c.gr[0x31] = val;
                if old & gr::BLT_RESET != 0 && val & gr::BLT_RESET == 0 {
                    blit_reset(st);
                } else if old & gr::BLT_START == 0 && val & gr::BLT_START != 0 {
                    self.blit_start(st);
                }
            }
            _ => {}
        }
    }

    /// QEMU's `cirrus_bitblt_start`: runs a blit, or sets it up to take its source from
    /// the guest's writes; refusals are logged.
    fn blit_start(&self, st: &mut CirrusState) {
        if !self.blitter {
            blit_reset(st);
            return;
        }
        st.regs.gr[0x31] |= gr::BLT_BUSY;
        let blit = Blit::from_regs(
            &BlitRegs {
                gr0: st.regs.shadow_gr0,
                gr1: st.regs.shadow_gr1,
                gr: &st.regs.gr,
            },
            self.addr_mask,
        );
        let engine = self.engine();
        match engine.start(blit, st.regs.bpp()) {
            Ok(Started::Done) => blit_reset(st),
            Ok(Started::WaitingForSource(transfer)) => st.transfer = Some(transfer),
            Err(e) => {
                self.vga.guest_error(|| format!("{TYPE_CIRRUS_VGA}: blit refused: {e}"));
                blit_reset(st);
            }
        }
    }

    fn engine(&self) -> Engine<'_> {
        Engine {
            vram: &self.vga.vram,
            addr_mask: self.addr_mask,
        }
    }

    /// A byte of a system-to-video blit's source; false when no blit waits for one.
    fn feed_blit(&self, st: &mut CirrusState, byte: u8) -> bool {
        let Some(transfer) = st.transfer.as_mut() else {
            return false;
        };
        if self.engine().feed(transfer, byte) {
            blit_reset(st);
        }
        true
    }

    /// QEMU's `cirrus_mmio_blt_read`: a blitter register by its memory offset.
    fn blt_read(&self, st: &CirrusState, r: &VgaRegs, offset: u64) -> u8 {
        blt_register(offset).map_or(0xff, |i| read_gr(&st.regs, r, i as u8))
    }

    /// QEMU's `cirrus_mmio_blt_write`.
    fn blt_write(&self, st: &mut CirrusState, r: &mut VgaRegs, offset: u64, val: u8) {
        if let Some(i) = blt_register(offset) {
            self.write_gr(st, r, i as u8, val);
        }
    }

    /// QEMU's `cirrus_vga_mem_read`: a byte of the 0xa0000-0xbffff window.
    pub fn mem_read(&self, addr: u64) -> u8 {
        let st = self.state.lock();
        let mut r = self.vga.regs.lock();
        if st.regs.sr[7] & sr::SR7_SVGA == 0 {
            return r.mem_readb(&self.vga.vram, addr);
        }
        if addr < 0x10000 {
            match self.bank_address(&st.regs, addr) {
                Some(at) => self.vga.vram.read_u8(at),
                None => 0xff,
            }
        } else if (0x18000..0x18100).contains(&addr) && self.mmio_at_b8000(&st.regs) {
            self.blt_read(&st, &r, addr & 0xff)
        } else {
            0xff
        }
    }

    /// QEMU's `cirrus_vga_mem_write`.
    pub fn mem_write(&self, addr: u64, val: u8) {
        let mut st = self.state.lock();
        let mut r = self.vga.regs.lock();
        if st.regs.sr[7] & sr::SR7_SVGA == 0 {
            r.mem_writeb(&self.vga.vram, addr, val);
            return;
        }
        if addr < 0x10000 {
            if self.feed_blit(&mut st, val) {
                return;
            }
            if let Some(at) = self.bank_address(&st.regs, addr) {
                self.write_vram(&st.regs, &r, at, val);
            }
        } else if (0x18000..0x18100).contains(&addr) && self.mmio_at_b8000(&st.regs) {
            self.blt_write(&mut st, &mut r, addr & 0xff, val);
        }
    }

    fn mmio_at_b8000(&self, c: &CirrusRegs) -> bool {
        c.sr[0x17] & (sr::MMIO_ENABLE | sr::MMIO_USE_PCIADDR) == sr::MMIO_ENABLE
    }

    fn mmio_at_lfb_end(&self, c: &CirrusRegs) -> bool {
        c.sr[0x17] & (sr::MMIO_ENABLE | sr::MMIO_USE_PCIADDR) == sr::MMIO_ENABLE | sr::MMIO_USE_PCIADDR
    }

    /// The video memory address of window address `addr` (below 64 KiB) through the
    /// banks, or `None` past the end of a bank.
    fn bank_address(&self, c: &CirrusRegs, addr: u64) -> Option<u64> {
        let index = (addr >> 15) as usize & 1;
        let offset = addr & 0x7fff;
        let (base, limit) = c.bank(index, self.vram_size());
        (offset < limit).then(|| ((offset + base) << c.address_shift()) & u64::from(self.addr_mask))
    }

    /// A CPU write at video memory address `at`, through write modes 4 and 5 where GRB
    /// enables them (QEMU's `cirrus_mem_writeb_mode4and5_*`: each bit of the byte a pixel
    /// in the foreground colour, or with mode 5 the background colour for 0 bits).
    fn write_vram(&self, c: &CirrusRegs, r: &VgaRegs, at: u64, val: u8) {
        let vram = &self.vga.vram;
        let mode = r.gr[5] & 7;
        let grb = c.gr[0x0b];
        if !(4..=5).contains(&mode) || grb & gr::EXTENDED_WRITE_MODES == 0 {
            vram.write_u8(at, val);
            return;
        }
        let mask = u64::from(self.addr_mask);
        let wide = grb & gr::BY16 == gr::BY16;
        let (fg, bg) = (
            [c.shadow_gr1, c.gr[0x11]],
            [c.shadow_gr0, c.gr[0x10]],
        );
        let bytes = if wide { 2 } else { 1 };
        for x in 0..8u64 {
            let colour = if val & (0x80 >> x) != 0 {
                Some(fg)
            } else if mode == 5 {
                Some(bg)
            } else {
                None
            };
            if let Some(colour) = colour {
                for b in 0..bytes {
                    vram.write_u8((at + x * bytes + b) & mask, colour[b as usize]);
                }
            }
        }
    }

    /// QEMU's `cirrus_linear_read`: a byte of BAR 0's framebuffer part.
    fn linear_read(&self, addr: u64) -> u8 {
        let st = self.state.lock();
        let r = self.vga.regs.lock();
        let mask = u64::from(self.addr_mask);
        let addr = addr & mask;
        let mmio = mask + 1 - 256;
        if self.mmio_at_lfb_end(&st.regs) && addr & mmio == mmio {
            return self.blt_read(&st, &r, addr & 0xff);
        }
        self.vga.vram.read_u8((addr << st.regs.address_shift()) & mask)
    }

    /// QEMU's `cirrus_linear_write`.
    fn linear_write(&self, addr: u64, val: u8) {
        let mut st = self.state.lock();
        let mut r = self.vga.regs.lock();
        let mask = u64::from(self.addr_mask);
        let addr = addr & mask;
        let mmio = mask + 1 - 256;
        if self.mmio_at_lfb_end(&st.regs) && addr & mmio == mmio {
            self.blt_write(&mut st, &mut r, addr & 0xff, val);
        } else if !self.feed_blit(&mut st, val) {
            let at = (addr << st.regs.address_shift()) & mask;
            self.write_vram(&st.regs, &r, at, val);
        }
    }

    /// QEMU's `cirrus_linear_bitblt_write`: the aperture takes a blit's source only.
    fn aperture_write(&self, val: u8) {
        let mut st = self.state.lock();
        self.feed_blit(&mut st, val);
    }

    /// BAR 1 (QEMU's `cirrus_mmio_read`).
    fn mmio_read(&self, offset: u64) -> u8 {
        if offset >= MMIO_BLT_OFFSET {
            let st = self.state.lock();
            let r = self.vga.regs.lock();
            self.blt_read(&st, &r, offset - MMIO_BLT_OFFSET)
        } else {
            self.ioport_read(0x3c0 + offset as u16)
        }
    }

    /// BAR 1 (QEMU's `cirrus_mmio_write`).
    fn mmio_write(&self, offset: u64, val: u8) {
        if offset >= MMIO_BLT_OFFSET {
            let mut st = self.state.lock();
            let mut r = self.vga.regs.lock();
            self.blt_write(&mut st, &mut r, offset - MMIO_BLT_OFFSET, val);
        } else {
            self.ioport_write(0x3c0 + offset as u16, val);
        }
    }

    /// Renders the screen (the core's renderer with the Cirrus hooks).
    pub fn render(&self) -> Surface {
        let hooks = CirrusDraw {
            regs: self.regs(),
            vram_size: self.vram_size(),
        };
        vga_draw::render_with(&self.vga, &hooks)
    }

    /// The Cirrus part of the migration section (QEMU's `vmstate_cirrus_vga` fields the
    /// core's do not cover). A blit waiting for its source is not saved, as QEMU does not
    /// save it: it is lost.
    pub fn save_state(&self, s: &mut VmStateSection) {
        let c = self.regs();
        self.vga.save_state(s);
        s.put("cirrus_sr_index", c.sr_index);
        s.put_bytes("cirrus_sr", &c.sr);
        s.put("cirrus_gr_index", c.gr_index);
        s.put_bytes("cirrus_gr", &c.gr);
        s.put("cirrus_shadow_gr0", c.shadow_gr0);
        s.put("cirrus_shadow_gr1", c.shadow_gr1);
        s.put("cirrus_hidden_dac_lockindex", c.hidden_dac_lock);
        s.put("cirrus_hidden_dac_data", c.hidden_dac);
        s.put_bytes("cirrus_hidden_palette", &c.hidden_palette);
        s.put("hw_cursor_x", c.cursor_x);
        s.put("hw_cursor_y", c.cursor_y);
    }

    /// Loads what [`CirrusVga::save_state`] saved; nothing changes unless all loads.
    pub fn load_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        let c = CirrusRegs {
            sr_index: s.get("cirrus_sr_index")?,
            sr: s.get_array("cirrus_sr")?,
            gr_index: s.get("cirrus_gr_index")?,
            gr: s.get_array("cirrus_gr")?,
            shadow_gr0: s.get("cirrus_shadow_gr0")?,
            shadow_gr1: s.get("cirrus_shadow_gr1")?,
            hidden_dac_lock: s.get("cirrus_hidden_dac_lockindex")?,
            hidden_dac: s.get("cirrus_hidden_dac_data")?,
            hidden_palette: s.get_array("cirrus_hidden_palette")?,
            cursor_x: s.get("hw_cursor_x")?,
            cursor_y: s.get("hw_cursor_y")?,
        };
        let mut st = self.state.lock();
        self.vga.load_state(s)?;
        st.regs = c;
        // The blitter idles (QEMU's post-load keeps no blit either).
        blit_reset(&mut st);
        Ok(())
    }
}

/// QEMU's `cirrus_bitblt_reset`: the blitter idle, a waiting blit dropped.
fn blit_reset(st: &mut CirrusState) {
    st.regs.gr[0x31] &= !(gr::BLT_START | gr::BLT_BUSY | gr::BLT_FIFOUSED);
    st.transfer = None;
}

/// QEMU's `cirrus_vga_read_sr`.
fn read_sr(c: &CirrusRegs, r: &VgaRegs) -> u8 {
    let index = c.sr_index;
    match index {
        0x00..=0x04 => r.sr[usize::from(index)],
        // The cursor position: the index's top 3 bits are x's (or y's) low bits.
        _ if index & 0x1f == 0x10 => c.sr[0x10],
        _ if index & 0x1f == 0x11 => c.sr[0x11],
        0x05..=0x1f => c.sr[usize::from(index)],
        _ => 0xff,
    }
}

/// QEMU's `cirrus_vga_write_sr`.
fn write_sr(c: &mut CirrusRegs, r: &mut VgaRegs, val: u8) {
    let index = c.sr_index;
    match index {
        0x00..=0x04 => r.ioport_write(0x3c5, val),
        // The unlock: 0x12 (in the bits that count) opens the extensions.
        0x06 => c.sr[6] = if val & 0x17 == 0x12 { 0x12 } else { 0x0f },
        _ if index & 0x1f == 0x10 => {
            c.sr[0x10] = val;
            c.cursor_x = (u32::from(val) << 3) | u32::from(index >> 5);
        }
        _ if index & 0x1f == 0x11 => {
            c.sr[0x11] = val;
            c.cursor_y = (u32::from(val) << 3) | u32::from(index >> 5);
        }
        0x07..=0x0f | 0x12..=0x16 | 0x18..=0x1f => c.sr[usize::from(index)] = val,
        0x17 => c.sr[0x17] = (c.sr[0x17] & 0x38) | (val & 0xc7),
        _ => {}
    }
}

/// QEMU's `cirrus_vga_read_gr`.
fn read_gr(c: &CirrusRegs, r: &VgaRegs, index: u8) -> u8 {
    match index {
        0x00 => c.shadow_gr0,
        0x01 => c.shadow_gr1,
        0x02..=0x08 => r.gr[usize::from(index)],
        0x09..=0x39 => c.gr[usize::from(index)],
        _ => 0xff,
    }
}

/// QEMU's `cirrus_vga_read_cr` for the current index.
fn read_cr(r: &VgaRegs) -> u8 {
    let index = r.cr_index;
    match index {
        0x00..=0x1d | 0x22 | 0x25 | 0x27 => r.cr[usize::from(index)],
        0x24 => u8::from(r.ar_flip_flop) << 7,
        0x26 => r.ar_index & 0x3f,
        _ => 0xff,
    }
}

/// The renderer's view of the Cirrus: its depth, pitch, start address and cursor.
struct CirrusDraw {
    regs: CirrusRegs,
    vram_size: u64,
}

impl DrawHooks for CirrusDraw {
    fn bpp(&self, _r: &VgaRegs) -> u32 {
        self.regs.bpp()
    }

    /// QEMU's `cirrus_get_params`: CR13 with CR1B bit 4 for the pitch, CR0C/0D with CR1B
    /// bits 0, 2, 3 and CR1D bit 7 for the start address.
    fn offsets(&self, r: &VgaRegs) -> (u32, u32, u32) {
        let cr = |i: usize| u32::from(r.cr[i]);
        let line_offset = (cr(0x13) | ((cr(0x1b) & 0x10) << 4)) << 3;
        let start = (cr(0x0c) << 8)
            | cr(0x0d)
            | ((cr(0x1b) & 0x01) << 16)
            | ((cr(0x1b) & 0x0c) << 15)
            | ((cr(0x1d) & 0x80) << 12);
        (line_offset, start, vga_draw::line_compare(r))
    }

    /// QEMU's `cirrus_get_resolution`, with interlace (CR1A bit 0) doubling the height.
    fn resolution(&self, r: &VgaRegs) -> (u32, u32) {
        let width = (u32::from(r.cr[0x01]) + 1) * 8;
        let height = vga_draw::vertical_display_end(r);
        let interlaced = r.cr[0x1a] & 0x01 != 0;
        (width, if interlaced { height * 2 } else { height })
    }

    /// QEMU's `cirrus_cursor_draw_line`: the 32x32 or 64x64 two-plane pattern at the
    /// end of video memory, colours 0 and 15 of the hidden palette, plane bits 01 the
    /// inverse of the screen.
    fn draw_cursor_line(&self, vram: &Vram, y: u32, line: &mut [u32]) {
        let c = &self.regs;
        if c.sr[0x12] & sr::CURSOR_SHOW == 0 {
            return;
        }
        let large = c.sr[0x12] & sr::CURSOR_LARGE != 0;
        let size = if large { 64 } else { 32 };
        if y < c.cursor_y || y >= c.cursor_y + size {
            return;
        }
        let row = u64::from(y - c.cursor_y);
        let base = self.vram_size.saturating_sub(16 << 10);
        let (src, plane_offset) = if large {
            (base + u64::from(c.sr[0x13] & 0x3c) * 256 + row * 16, 8)
        } else {
            (base + u64::from(c.sr[0x13] & 0x3f) * 256 + row * 4, 128)
        };
        let colour = |entry: usize| {
            let p = &c.hidden_palette[entry * 3..entry * 3 + 3];
            vga_draw::rgb(vga_draw::c6_to_8(p[0]), vga_draw::c6_to_8(p[1]), vga_draw::c6_to_8(p[2]))
        };
        let (colour0, colour1) = (colour(0), colour(15));
        let bit = |plane: u64, x: u32| (vram.read_u8(plane + u64::from(x >> 3)) >> (7 - (x & 7))) & 1;
        let x1 = c.cursor_x as usize;
        for x in 0..size {
            let Some(pixel) = line.get_mut(x1 + x as usize) else {
                break;
            };
            match bit(src, x) | (bit(src + plane_offset, x) << 1) {
                1 => *pixel ^= 0xff_ffff,
                2 => *pixel = colour0,
                3 => *pixel = colour1,
                _ => {}
            }
        }
    }
}

/// Why a `cirrus-vga` cannot be realized.
#[derive(Debug, thiserror::Error)]
pub enum CirrusError {
    /// QEMU accepts 4 MiB (the real card's) and 8 or 16 for compatibility.
    #[error("Invalid cirrus_vga ram size '{0}'")]
    VramSize(u32),
}

/// QEMU's `PCICirrusVGAState` with its properties.
#[derive(qom::Object)]
#[qom(name = TYPE_CIRRUS_VGA)]
pub struct PciCirrusVga {
    #[parent]
    parent: PciDevice,
    #[property(name = "vgamem_mb", default = 4, desc = "Video memory in MiB (4, 8 or 16)")]
    vgamem_mb: Prop<u32>,
    #[property(default = true, desc = "on/off")]
    blitter: Prop<bool>,
    /// QEMU's choice of a global RAM block name for video memory; video memory travels
    /// in the device's section here, so it changes nothing.
    #[property(name = "global-vmstate", default = false, desc = "on/off")]
    global_vmstate: Prop<bool>,
    cirrus: OnceLock<Arc<CirrusVga>>,
    console: Mutex<Option<Arc<QemuConsole>>>,
    /// The legacy regions this device claimed, to give back at unrealize.
    legacy: crate::display::vga::LegacyVgaResources,
}

type_init!(PciCirrusVga);

/// The layout of [`PciCirrusVga`]'s section.
const CIRRUS_STATE_VERSION: u32 = 1;

impl DeviceImpl for PciCirrusVga {
    const CATEGORY: DeviceCategory = DeviceCategory::Display;
    const DESCRIPTION: Option<&'static str> = Some("Cirrus CLGD 54xx VGA");
    const HOTPLUGGABLE: bool = false;

    fn unrealize(&self, ctx: &DeviceContext) {
        self.legacy.release();
        if let (Some(console), Ok(services)) = (self.console.lock().take(), ctx.machine()) {
            services.consoles().remove(&console);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn reset(&self) {
        if let Some(cirrus) = self.cirrus.get() {
            cirrus.reset();
        }
        DeviceImpl::reset(&self.parent);
    }

    /// QEMU's `vmstate_pci_cirrus_vga`: the PCI device, the VGA's registers, the
    /// Cirrus registers and video memory, in one section.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let cirrus = self.realized()?;
        let mut s = VmStateSection::new(CIRRUS_STATE_VERSION);
        self.parent.save_pci_state(&mut s);
        s.put("blitter", self.blitter.get());
        cirrus.save_state(&mut s);
        Ok(s)
    }

    fn load_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        s.check_version(CIRRUS_STATE_VERSION, CIRRUS_STATE_VERSION)?;
        let cirrus = self.realized()?;
        let theirs: bool = s.get("blitter")?;
        if theirs != self.blitter.get() {
            let onoff = |b: bool| if b { "on" } else { "off" };
            return Err(VmStateError::Mismatch(format!(
                "{TYPE_CIRRUS_VGA}: blitter={} in the stream, blitter={} here",
                onoff(theirs),
                onoff(self.blitter.get())
            )));
        }
        cirrus.load_state(s)?;
        self.parent.load_pci_state(s)
    }
}

impl PciDeviceImpl for PciCirrusVga {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_CIRRUS;
    const DEVICE_ID: u16 = CIRRUS_ID_CLGD5446 as u16;
    const CLASS_ID: u16 = PCI_CLASS_DISPLAY_VGA;
    /// QEMU's default subsystem IDs (`pci_set_default_subsystem_id`).
    const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
    const SUBSYSTEM_ID: u16 = 0x1100;
    const ROMFILE: Option<&'static str> = Some("vgabios-cirrus.bin");

    /// QEMU's `pci_cirrus_vga_realize`.
    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let mb = self.vgamem_mb.get();
        if ![4, 8, 16].contains(&mb) {
            return Err(RealizeError::device(CirrusError::VramSize(mb)));
        }
        let vram = Vram::new(u64::from(mb) << 20).map_err(RealizeError::device)?;
        let cirrus = CirrusVga::new(vram, self.blitter.get());
        let _ = self.cirrus.set(cirrus.clone());

        // The legacy ports and window, as the std VGA claims them (a second VGA finds
        // them taken and works through its BARs).
        let legacy = [
            (
                services.system_io().clone(),
                u64::from(VGA_IO_BASE),
                MemoryRegion::new_io("cirrus-io", VGA_IO_SIZE, Arc::new(CirrusIo(cirrus.clone()))),
            ),
            (
                services.system_memory().clone(),
                VGA_LOWMEM_BASE,
                // Buffered writes, as QEMU's (`memory_region_set_coalescing`).
                MemoryRegion::new_io_coalesced(
                    "cirrus-low-memory",
                    VGA_LOWMEM_SIZE,
                    Arc::new(CirrusLowMem(cirrus.clone())),
                    0..VGA_LOWMEM_SIZE,
                ),
            ),
        ];
        self.legacy.claim(TYPE_CIRRUS_VGA, legacy)?;
        let linear = MemoryRegion::new_io(
            "cirrus-pci-bar0",
            LINEAR_BAR_SIZE,
            Arc::new(CirrusLinear(cirrus.clone())),
        );
        self.register_bar(0, BarKind::Mem32Prefetch, linear)?;
        let mmio = MemoryRegion::new_io("cirrus-mmio", MMIO_BAR_SIZE, Arc::new(CirrusMmio(cirrus.clone())));
        self.register_bar(1, BarKind::Mem32, mmio)?;
        let console = services
            .consoles()
            .add(ctx.object(), 0, Arc::new(CirrusConsole {
                cirrus,
                services: Arc::downgrade(services),
            }));
        *self.console.lock() = Some(console);
        Ok(())
    }
}

impl PciCirrusVga {
    /// The Cirrus, once realized.
    pub fn cirrus(&self) -> Option<&Arc<CirrusVga>> {
        self.cirrus.get()
    }

    fn realized(&self) -> Result<&Arc<CirrusVga>, VmStateError> {
        self.cirrus
            .get()
            .ok_or_else(|| VmStateError::Host(format!("{TYPE_CIRRUS_VGA} is not realized")))
    }
}

/// Splits an access into bytes, lowest address first (QEMU's regions of the Cirrus take
/// one byte at a time).
fn read_bytes(size: u32, mut byte: impl FnMut(u64) -> u8) -> u64 {
    (0..u64::from(size.min(8))).fold(0, |v, i| v | (u64::from(byte(i)) << (8 * i)))
}

fn write_bytes(value: u64, size: u32, mut byte: impl FnMut(u64, u8)) {
    for i in 0..u64::from(size.min(8)) {
        byte(i, (value >> (8 * i)) as u8);
    }
}

/// Ports 0x3b0-0x3df (QEMU's `cirrus-io`).
struct CirrusIo(Arc<CirrusVga>);

impl MemoryRegionOps for CirrusIo {
    fn read(&self, offset: u64, size: u32) -> u64 {
        read_bytes(size.min(4), |i| {
            u16::try_from(u64::from(VGA_IO_BASE) + offset + i).map_or(0xff, |p| self.0.ioport_read(p))
        })
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        write_bytes(value, size.min(4), |i, b| {
            if let Ok(port) = u16::try_from(u64::from(VGA_IO_BASE) + offset + i) {
                self.0.ioport_write(port, b);
            }
        });
    }
}

/// The 0xa0000-0xbffff window (QEMU's `cirrus-low-memory`).
struct CirrusLowMem(Arc<CirrusVga>);

impl MemoryRegionOps for CirrusLowMem {
    fn read(&self, offset: u64, size: u32) -> u64 {
        read_bytes(size, |i| self.0.mem_read((offset + i) & (VGA_LOWMEM_SIZE - 1)))
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        write_bytes(value, size, |i, b| self.0.mem_write((offset + i) & (VGA_LOWMEM_SIZE - 1), b));
    }
}

/// BAR 0: the linear framebuffer (`cirrus-linear-io`) and the blit aperture
/// (`cirrus-bitblt-mmio`); the rest reads all ones.
struct CirrusLinear(Arc<CirrusVga>);

impl MemoryRegionOps for CirrusLinear {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let vram_size = self.0.vga.vram.size();
        read_bytes(size, |i| {
            let at = offset + i;
            if at < vram_size {
                self.0.linear_read(at)
            } else {
                0xff
            }
        })
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        let vram_size = self.0.vga.vram.size();
        let aperture = BLIT_APERTURE_OFFSET..BLIT_APERTURE_OFFSET + BLIT_APERTURE_SIZE;
        write_bytes(value, size, |i, b| {
            let at = offset + i;
            if at < vram_size {
                self.0.linear_write(at, b);
            } else if aperture.contains(&at) {
                self.0.aperture_write(b);
            }
        });
    }
}

/// BAR 1 (QEMU's `cirrus-mmio`).
struct CirrusMmio(Arc<CirrusVga>);

impl MemoryRegionOps for CirrusMmio {
    fn read(&self, offset: u64, size: u32) -> u64 {
        read_bytes(size, |i| self.0.mmio_read(offset + i))
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        write_bytes(value, size, |i, b| self.0.mmio_write(offset + i, b));
    }
}

/// The console's view of the Cirrus.
struct CirrusConsole {
    cirrus: Arc<CirrusVga>,
    /// To apply the guest's buffered writes to the window before drawing.
    services: std::sync::Weak<crate::core::services::MachineServices>,
}

impl GraphicHwOps for CirrusConsole {
    fn set_bios_text_mode(&self, font: &[u8]) -> bool {
        self.cirrus.vga.set_bios_text_mode(font);
        true
    }

    fn gfx_update(&self) -> Surface {
        if let Some(services) = self.services.upgrade() {
            services.flush_coalesced_io();
        }
        self.cirrus.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cirrus() -> Arc<CirrusVga> {
        CirrusVga::new(Vram::new(4 << 20).unwrap(), true)
    }

    fn outb(c: &CirrusVga, port: u16, v: u8) {
        c.ioport_write(port, v);
    }

    fn inb(c: &CirrusVga, port: u16) -> u8 {
        c.ioport_read(port)
    }

    fn sr(c: &CirrusVga, index: u8, v: u8) {
        outb(c, 0x3c4, index);
        outb(c, 0x3c5, v);
    }

    fn gr(c: &CirrusVga, index: u8, v: u8) {
        outb(c, 0x3ce, index);
        outb(c, 0x3cf, v);
    }

    #[test]
    fn unlock_id_and_the_hidden_dac() {
        let c = cirrus();
        sr(&c, 6, 0x12);
        assert_eq!(inb(&c, 0x3c5), 0x12);
        sr(&c, 6, 0x55);
        assert_eq!(inb(&c, 0x3c5), 0x0f);
        outb(&c, 0x3c2, 0x01);
        outb(&c, 0x3d4, 0x27);
        assert_eq!(inb(&c, 0x3d5), 0xb8);
        // A write to 0x3c6 (the BIOS's DAC mask) resets the read count.
        outb(&c, 0x3c6, 0xff);
        for _ in 0..4 {
            assert_eq!(inb(&c, 0x3c6), 0xff);
        }
        outb(&c, 0x3c6, 0xc1);
        for _ in 0..4 {
            inb(&c, 0x3c6);
        }
        assert_eq!(inb(&c, 0x3c6), 0xc1, "the fifth read");
        assert_eq!(c.regs().hidden_dac, 0xc1);
    }

    #[test]
    fn banks_of_4k_and_16k_map_the_window() {
        let c = cirrus();
        sr(&c, 7, 0x01);
        gr(&c, 0x09, 3);
        c.mem_write(0x10, 0xaa);
        assert_eq!(c.vga.vram.read_u8(3 * 4096 + 0x10), 0xaa);
        gr(&c, 0x0b, gr::BANKING_16K);
        c.mem_write(0x8010, 0xbb);
        assert_eq!(c.vga.vram.read_u8(3 * 16384 + 0x8010), 0xbb, "single bank: 64 KiB");
        gr(&c, 0x0b, gr::BANKING_16K | gr::BANKING_DUAL);
        gr(&c, 0x0a, 1);
        c.mem_write(0x8020, 0xcc);
        assert_eq!(c.vga.vram.read_u8(16384 + 0x20), 0xcc, "dual: GRA at 0xa8000");
        assert_eq!(c.mem_read(0x8020), 0xcc);
        // The last bank has 16 KiB left: past them the window reads all ones and drops
        // writes.
        gr(&c, 0x0a, 0xff);
        c.mem_write(0x8000 + 0x3fff, 0x77);
        assert_eq!(c.vga.vram.read_u8((4 << 20) - 1), 0x77);
        assert_eq!(c.mem_read(0x8000 + 0x5000), 0xff);
        c.mem_write(0x8000 + 0x5000, 1);
    }

    #[test]
    fn write_mode_5_expands_bytes_to_pixels() {
        let c = cirrus();
        sr(&c, 7, 0x01);
        gr(&c, 0x0b, gr::EXTENDED_WRITE_MODES);
        gr(&c, 0x05, 0x05);
        gr(&c, 0x00, 0x20);
        gr(&c, 0x01, 0x41);
        assert_eq!(inb(&c, 0x3cf), 0x41, "GR1 keeps 8 bits");
        c.mem_write(0x100, 0b1000_0001);
        let px: Vec<u8> = (0x100..0x108).map(|a| c.vga.vram.read_u8(a)).collect();
        assert_eq!(px, [0x41, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x41]);
    }

    #[test]
    fn the_cursor_position_takes_low_bits_from_the_index() {
        let c = cirrus();
        sr(&c, 0xb0, 10);
        assert_eq!(c.regs().cursor_x, 10 * 8 + 5);
        outb(&c, 0x3c4, 0x10);
        assert_eq!(inb(&c, 0x3c5), 10);
    }

    #[test]
    fn a_blit_through_the_mmio_bar_copies_and_an_out_of_range_one_is_refused() {
        let c = cirrus();
        for i in 0..16u64 {
            c.vga.vram.write_u8(i, i as u8 + 1);
        }
        let regs = |c: &CirrusVga, width: u16, dst: u32, src: u32| {
            let w = |off: u64, v: u8| c.mmio_write(MMIO_BLT_OFFSET + off, v);
            w(0x08, (width - 1) as u8);
            w(0x09, ((width - 1) >> 8) as u8);
            w(0x0a, 0);
            w(0x0b, 0);
            w(0x0c, 16);
            w(0x0e, 16);
            for i in 0..3 {
                w(0x10 + i, (dst >> (8 * i)) as u8);
                w(0x14 + i, (src >> (8 * i)) as u8);
            }
            w(0x18, 0);
            w(0x1a, 0x0d);
            w(0x40, gr::BLT_START);
        };
        regs(&c, 16, 0x1000, 0);
        let copied: Vec<u8> = (0x1000..0x1010).map(|a| c.vga.vram.read_u8(a)).collect();
        assert_eq!(copied, (1..=16).collect::<Vec<u8>>());
        assert_eq!(c.mmio_read(MMIO_BLT_OFFSET + 0x40) & gr::BLT_START, 0, "idle again");
        // 16 bytes from 4 MiB - 8: outside.
        regs(&c, 16, 0x2000, 0x3f_fff8);
        assert_eq!(c.vga.vram.read_u8(0x2000), 0, "refused");
        assert_eq!(c.mmio_read(MMIO_BLT_OFFSET + 0x40) & gr::BLT_BUSY, 0);
    }

    #[test]
    fn a_32bpp_mode_renders_from_the_pitch_and_start_registers() {
        let c = cirrus();
        outb(&c, 0x3c2, 0x01);
        let cr = |i: u8, v: u8| {
            outb(&c, 0x3d4, i);
            outb(&c, 0x3d5, v);
        };
        cr(0x11, 0x20);
        cr(0x01, 16 / 8 - 1);
        cr(0x12, 8 - 1);
        cr(0x09, 0x40);
        cr(0x07, 0x10);
        cr(0x17, 0x03);
        cr(0x13, 16 * 4 / 8);
        cr(0x1b, 0x22);
        cr(0x0d, 4);
        sr(&c, 7, 0x19);
        gr(&c, 0x05, 0x40);
        gr(&c, 0x06, 0x01);
        outb(&c, 0x3c0, 0x20);
        // Start address 4 dwords = byte 16: pixel (0, 0) at 16, (1, 2) at 16 + 2 * 64 + 4.
        c.vga.vram.write_u32(16, 0x00ff_0000);
        c.vga.vram.write_u32(16 + 2 * 64 + 4, 0x0000_ff00);
        let s = c.render();
        assert_eq!((s.width, s.height), (16, 8));
        assert_eq!(s.row(0)[0], 0xff_0000);
        assert_eq!(s.row(2)[1], 0x00_ff00);
    }

    #[test]
    fn state_round_trips() {
        let c = cirrus();
        sr(&c, 6, 0x12);
        sr(&c, 7, 0x17);
        gr(&c, 0x09, 7);
        c.vga.vram.write_u8(0x1234, 9);
        let mut s = VmStateSection::new(1);
        c.save_state(&mut s);
        let s = VmStateSection::from_json(&s.to_json()).unwrap();
        let d = cirrus();
        d.load_state(&s).unwrap();
        assert_eq!(d.regs(), c.regs());
        assert_eq!(d.vga.vram.read_u8(0x1234), 9);
    }

    #[test]
    fn any_value_at_any_port_window_or_bar_is_harmless() {
        let c = cirrus();
        let mut x = 0x2545_f491u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let io = CirrusIo(c.clone());
        let low = CirrusLowMem(c.clone());
        let lfb = CirrusLinear(c.clone());
        let mmio = CirrusMmio(c.clone());
        for n in 0..200_000u32 {
            let r = next();
            let size = [1, 2, 4][(r % 3) as usize];
            let v = u64::from(next());
            match r % 8 {
                0 | 1 => io.write(u64::from(next() % 0x30), v, size),
                2 => {
                    io.read(u64::from(next() % 0x30), size);
                }
                3 => low.write(u64::from(next() % 0x20000), v, size),
                4 => {
                    low.read(u64::from(next() % 0x20000), size);
                }
                5 => lfb.write(u64::from(next()) % LINEAR_BAR_SIZE, v, size),
                6 => mmio.write(u64::from(next() % 0x1000), v, size),
                _ => {
                    mmio.read(u64::from(next() % 0x1000), size);
                }
            }
            if n % 20_000 == 0 {
                c.render();
            }
        }
    }
}
