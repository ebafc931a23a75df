//! The VGA core (QEMU's `hw/display/vga.c`, `VGACommonState`): the registers behind ports
//! 0x3b0-0x3df (attribute controller, sequencer, DAC, graphics controller, CRT
//! controller), the 0xa0000-0xbffff memory window with its chain-4, odd/even and planar
//! (latched, four write modes, two read modes) accesses, and the Bochs VBE "DISPI"
//! interface (index 0x1ce, data 0x1cf/0x1d0) that sets linear framebuffer modes of 4 to 32
//! bits per pixel. `vga_pci.rs` puts it on the PCI bus as QEMU's `VGA`; `vga_draw.rs`
//! renders it.
//!
//! Video memory keeps QEMU's layout: byte `4 * offset + plane` is byte `offset` of plane
//! `plane`, so planar and text modes see four planes and chain-4 and VBE modes see one
//! linear buffer. Every value a guest writes is accepted: registers keep the bits that
//! exist, VBE registers are clamped to modes that fit the memory (QEMU's
//! `vbe_fixup_regs`), and accesses outside video memory read as all ones and are dropped.

use std::sync::Arc;

use parking_lot::Mutex;
use vm_memory::{Bytes, VolatileMemory};

use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::MemoryRegionOps;
use crate::core::vmstate::{VmStateError, VmStateSection};

/// VBE register indices (QEMU's `VBE_DISPI_INDEX_*`).
pub mod vbe {
    /// Interface version (`VBE_DISPI_ID0`..`ID5`).
    pub const INDEX_ID: usize = 0x0;
    /// Horizontal resolution.
    pub const INDEX_XRES: usize = 0x1;
    /// Vertical resolution.
    pub const INDEX_YRES: usize = 0x2;
    /// Bits per pixel.
    pub const INDEX_BPP: usize = 0x3;
    /// Enable flags.
    pub const INDEX_ENABLE: usize = 0x4;
    /// 64 KiB bank of the 0xa0000 window.
    pub const INDEX_BANK: usize = 0x5;
    /// Virtual (line) width in pixels.
    pub const INDEX_VIRT_WIDTH: usize = 0x6;
    /// Virtual height (read-only: what fits in video memory).
    pub const INDEX_VIRT_HEIGHT: usize = 0x7;
    /// Display start, x.
    pub const INDEX_X_OFFSET: usize = 0x8;
    /// Display start, y.
    pub const INDEX_Y_OFFSET: usize = 0x9;
    /// Number of registers.
    pub const INDEX_NB: usize = 0xa;
    /// Video memory size in 64 KiB units (read-only; QEMU's extension).
    pub const INDEX_VIDEO_MEMORY_64K: usize = 0xa;

    /// The newest interface version (`VBE_DISPI_ID5`); `0xb0c0`..`0xb0c5` are accepted.
    pub const ID5: u16 = 0xb0c5;
    /// `ENABLE`: the VBE mode is on.
    pub const ENABLED: u16 = 0x01;
    /// `ENABLE`: reads of XRES/YRES/BPP return the maxima.
    pub const GETCAPS: u16 = 0x02;
    /// `ENABLE`: 8-bit DAC.
    pub const DAC_8BIT: u16 = 0x20;
    /// `ENABLE`: linear framebuffer (informative; the BAR always decodes).
    pub const LFB_ENABLED: u16 = 0x40;
    /// `ENABLE`: keep video memory when enabling.
    pub const NOCLEARMEM: u16 = 0x80;
    /// Largest horizontal resolution (QEMU's `VBE_DISPI_MAX_XRES`).
    pub const MAX_XRES: u16 = 16000;
    /// Largest vertical resolution.
    pub const MAX_YRES: u16 = 12000;
    /// Largest depth.
    pub const MAX_BPP: u16 = 32;
}

/// Sequencer register numbers.
pub mod seq {
    /// Clocking mode (bit 0: 8-dot characters, bit 3: half dot clock).
    pub const CLOCK_MODE: usize = 1;
    /// Map (plane write) mask.
    pub const PLANE_WRITE: usize = 2;
    /// Character map select.
    pub const CHARACTER_MAP: usize = 3;
    /// Memory mode (bit 2: odd/even disabled, bit 3: chain 4).
    pub const MEMORY_MODE: usize = 4;
    /// Memory mode: chain 4.
    pub const CHAIN4: u8 = 0x08;
}

/// Graphics controller register numbers.
pub mod gfx {
    /// Set/reset value.
    pub const SR_VALUE: usize = 0;
    /// Enable set/reset.
    pub const SR_ENABLE: usize = 1;
    /// Color compare.
    pub const COMPARE_VALUE: usize = 2;
    /// Data rotate and function select.
    pub const DATA_ROTATE: usize = 3;
    /// Read map select.
    pub const PLANE_READ: usize = 4;
    /// Mode (write mode, read mode, odd/even, shift control).
    pub const MODE: usize = 5;
    /// Miscellaneous (bit 0: graphics, bits 2-3: memory map).
    pub const MISC: usize = 6;
    /// Color don't care.
    pub const COMPARE_MASK: usize = 7;
    /// Bit mask.
    pub const BIT_MASK: usize = 8;
}

/// CRT controller register numbers.
pub mod crtc {
    /// Horizontal display end (characters - 1).
    pub const H_DISP: usize = 0x01;
    /// Overflow.
    pub const OVERFLOW: usize = 0x07;
    /// Maximum scan line (bits 0-4), line compare bit 9 (bit 6), double scan (bit 7).
    pub const MAX_SCAN: usize = 0x09;
    /// Cursor start (bit 5: cursor off).
    pub const CURSOR_START: usize = 0x0a;
    /// Cursor end.
    pub const CURSOR_END: usize = 0x0b;
    /// Start address, high byte.
    pub const START_HI: usize = 0x0c;
    /// Start address, low byte.
    pub const START_LO: usize = 0x0d;
    /// Cursor location, high byte.
    pub const CURSOR_HI: usize = 0x0e;
    /// Cursor location, low byte.
    pub const CURSOR_LO: usize = 0x0f;
    /// Vertical retrace end (bit 7: CR0-CR7 write protect).
    pub const V_SYNC_END: usize = 0x11;
    /// Vertical display end (low 8 bits).
    pub const V_DISP_END: usize = 0x12;
    /// Offset (line pitch in words... of 8 bytes of video memory).
    pub const OFFSET: usize = 0x13;
    /// Mode control.
    pub const MODE: usize = 0x17;
    /// Line compare (low 8 bits).
    pub const LINE_COMPARE: usize = 0x18;
}

/// Attribute controller register numbers.
pub mod att {
    /// Mode control.
    pub const MODE: usize = 0x10;
    /// Color plane enable.
    pub const PLANE_ENABLE: usize = 0x12;
    /// Color select.
    pub const COLOR_PAGE: usize = 0x14;
    /// Registers 0x00-0x14 exist.
    pub const COUNT: usize = 0x15;
    /// The index register's palette address source bit: display enabled.
    pub const PAS: u8 = 0x20;
}

/// Bits the sequencer and graphics registers keep (QEMU's `sr_mask`, `gr_mask`).
const SR_MASK: [u8; 8] = [0x03, 0x3d, 0x0f, 0x3f, 0x0e, 0x00, 0x00, 0xff];
const GR_MASK: [u8; 16] = [
    0x0f, 0x0f, 0x0f, 0x1f, 0x03, 0x7b, 0x0f, 0x0f, 0xff, 0, 0, 0, 0, 0, 0, 0,
];

/// Input status 1: display enable / vertical retrace, toggled on each read so that
/// polling loops end (QEMU's `vga_dumb_retrace`).
const ST01_DISP_ENABLE: u8 = 0x01;
const ST01_V_RETRACE: u8 = 0x08;

/// The unit in which video memory travels in a migration (only pages that are not all
/// zeroes go) and of its dirty tracking (the accelerator's page).
pub const VRAM_PAGE_SIZE: u64 = 4096;

/// `mask16[n]`: each of the four plane bytes all ones where bit `plane` of `n` is set.
pub fn plane_mask(n: u8) -> u32 {
    (0..4).fold(0u32, |m, p| if n & (1 << p) != 0 { m | (0xff << (8 * p)) } else { m })
}

/// Video memory: anonymous host memory the guest reaches through the linear framebuffer
/// BAR (mapped straight into the guest where the accelerator can) and the devices's
/// handlers. The guest may write it at any moment; readers copy what they need.
pub struct Vram {
    region: vm_memory::MmapRegion<()>,
    size: u64,
    /// Pages the VMM wrote (the legacy window, the BAR's handlers where no slot maps it,
    /// clears and loads), one bit per [`VRAM_PAGE_SIZE`]: QEMU's `DIRTY_MEMORY_VGA` for
    /// writes the accelerator's dirty log cannot see.
    vmm_dirty: Box<[std::sync::atomic::AtomicU64]>,
}

/// Why video memory cannot be allocated.
#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {size} bytes of video memory: {reason}")]
pub struct VramError {
    size: u64,
    reason: String,
}

impl Vram {
    /// `size` bytes (a power of two) of zeroed memory.
    pub fn new(size: u64) -> Result<Arc<Vram>, VramError> {
        let err = |reason: String| VramError { size, reason };
        let len = usize::try_from(size).map_err(|e| err(e.to_string()))?;
        let region = vm_memory::MmapRegion::<()>::new(len).map_err(|e| err(e.to_string()))?;
        let words = size.div_ceil(VRAM_PAGE_SIZE).div_ceil(64) as usize;
        let vmm_dirty = (0..words).map(|_| Default::default()).collect();
        Ok(Arc::new(Vram {
            region,
            size,
            vmm_dirty,
        }))
    }

    /// Records that the VMM wrote `len` bytes at `offset` (QEMU's
    /// `memory_region_set_dirty`).
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let last = (offset + len - 1).min(self.size - 1) / VRAM_PAGE_SIZE;
        for page in offset / VRAM_PAGE_SIZE..=last {
            self.vmm_dirty[(page / 64) as usize]
                .fetch_or(1 << (page % 64), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Moves the VMM's dirty bits into `bitmap` (one bit per page, ORed) and clears them.
    pub fn take_dirty(&self, bitmap: &mut [u64]) {
        for (word, out) in self.vmm_dirty.iter().zip(bitmap.iter_mut()) {
            *out |= word.swap(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of the memory (it lives as long as this `Vram`).
    pub fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    fn slice(&self) -> vm_memory::VolatileSlice<'_, ()> {
        self.region.as_volatile_slice()
    }

    /// The byte at `offset`; all ones outside.
    pub fn read_u8(&self, offset: u64) -> u8 {
        self.read_obj::<u8>(offset).unwrap_or(0xff)
    }

    /// Writes the byte at `offset`; dropped outside.
    pub fn write_u8(&self, offset: u64, value: u8) {
        self.write_obj(offset, value);
    }

    /// The little-endian dword at `offset` (the four planes of plane offset `offset / 4`).
    pub fn read_u32(&self, offset: u64) -> u32 {
        self.read_obj::<u32>(offset).map_or(u32::MAX, u32::from_le)
    }

    /// Writes the little-endian dword at `offset`.
    pub fn write_u32(&self, offset: u64, value: u32) {
        self.write_obj(offset, value.to_le());
    }

    fn read_obj<T: vm_memory::ByteValued>(&self, offset: u64) -> Option<T> {
        let offset = usize::try_from(offset).ok()?;
        self.slice().read_obj::<T>(offset).ok()
    }

    fn write_obj<T: vm_memory::ByteValued>(&self, offset: u64, value: T) {
        if let Ok(at) = usize::try_from(offset) {
            if self.slice().write_obj(value, at).is_ok() {
                self.mark_dirty(offset, std::mem::size_of::<T>() as u64);
            }
        }
    }

    /// Copies `buf.len()` bytes from `offset`, wrapping at the end of video memory (QEMU's
    /// renderer reads through `vbe_size_mask`, so a start address near the end cannot
    /// reach past it).
    pub fn read_wrapping(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0;
        let mut at = offset & (self.size - 1);
        while done < buf.len() {
            let n = ((self.size - at) as usize).min(buf.len() - done);
            if self.slice().read_slice(&mut buf[done..done + n], at as usize).is_err() {
                buf[done..done + n].fill(0xff);
            }
            done += n;
            at = 0;
        }
    }

    /// The pages of [`VRAM_PAGE_SIZE`] bytes that hold anything but zeroes: their indices
    /// and their bytes, one after another. A text screen is a few pages of 16 MiB.
    pub fn nonzero_pages(&self) -> (Vec<u32>, Vec<u8>) {
        let mut pages = Vec::new();
        let mut data = Vec::new();
        let mut page = vec![0u8; VRAM_PAGE_SIZE as usize];
        for index in 0..self.size / VRAM_PAGE_SIZE {
            let at = index * VRAM_PAGE_SIZE;
            if self.slice().read_slice(&mut page, at as usize).is_err() {
                continue;
            }
            if page.iter().any(|&b| b != 0) {
                pages.push(index as u32);
                data.extend_from_slice(&page);
            }
        }
        (pages, data)
    }

    /// Makes video memory `pages` (indices) with `data` (their bytes, one after another)
    /// and zeroes elsewhere. Refuses, changing nothing, pages outside video memory or data
    /// of another length.
    pub fn load_pages(&self, pages: &[u32], data: &[u8]) -> Result<(), String> {
        let count = self.size / VRAM_PAGE_SIZE;
        if let Some(bad) = pages.iter().find(|&&p| u64::from(p) >= count) {
            return Err(format!("page {bad} is outside {count} pages of video memory"));
        }
        if data.len() as u64 != pages.len() as u64 * VRAM_PAGE_SIZE {
            return Err(format!(
                "{} bytes for {} pages of {VRAM_PAGE_SIZE} bytes",
                data.len(),
                pages.len()
            ));
        }
        self.zero_all();
        self.mark_dirty(0, self.size);
        for (index, bytes) in pages.iter().zip(data.chunks_exact(VRAM_PAGE_SIZE as usize)) {
            let at = u64::from(*index) * VRAM_PAGE_SIZE;
            let _ = self.slice().write_slice(bytes, at as usize);
        }
        Ok(())
    }

    /// Zeroes all of video memory: the host gets the pages back (`MADV_DONTNEED` on the
    /// private anonymous mapping reads back as zeroes, and the accelerator's slot over it
    /// follows), else they are written with zeroes.
    fn zero_all(&self) {
        // SAFETY: the range is exactly this region's own anonymous private mapping, which
        // lives as long as `self`; dropping its pages only makes them read as zeroes.
        let r = unsafe {
            libc::madvise(
                self.region.as_ptr().cast(),
                self.region.size(),
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            self.clear(self.size);
        }
    }

    /// Zeroes `len` bytes from 0 (a VBE mode set without `NOCLEARMEM`).
    pub fn clear(&self, len: u64) {
        let len = len.min(self.size) as usize;
        self.mark_dirty(0, len as u64);
        let zeroes = vec![0u8; 64 << 10];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeroes.len());
            let _ = self.slice().write_slice(&zeroes[..n], at);
            at += n;
        }
    }
}

/// The VGA's registers (QEMU's `VGACommonState` without the memory and the display side).
#[derive(Clone, Debug)]
pub struct VgaRegs {
    /// The four plane bytes the last planar read loaded.
    pub latch: u32,
    /// Sequencer index (0x3c4).
    pub sr_index: u8,
    /// Sequencer registers as the guest wrote them.
    pub sr: [u8; 8],
    /// The sequencer as VBE modes force it (QEMU's `sr_vbe`); reads show `sr`.
    pub sr_vbe: [u8; 8],
    /// Graphics controller index (0x3ce).
    pub gr_index: u8,
    /// Graphics controller registers.
    pub gr: [u8; 16],
    /// Attribute controller index, with the palette address source bit (0x3c0).
    pub ar_index: u8,
    /// Attribute controller registers.
    pub ar: [u8; 21],
    /// Whether the next write to 0x3c0 is data (not index).
    pub ar_flip_flop: bool,
    /// CRT controller index (0x3b4/0x3d4).
    pub cr_index: u8,
    /// CRT controller registers (any index is kept).
    pub cr: [u8; 256],
    /// Miscellaneous output register.
    pub msr: u8,
    /// Feature control register.
    pub fcr: u8,
    /// Input status 0.
    pub st00: u8,
    /// Input status 1.
    pub st01: u8,
    /// DAC state: 0 writing, 3 reading.
    pub dac_state: u8,
    /// Component (0-2) of the DAC entry being read or written.
    pub dac_sub_index: u8,
    /// DAC entry being read.
    pub dac_read_index: u8,
    /// DAC entry being written.
    pub dac_write_index: u8,
    /// Components written so far to the current DAC entry.
    pub dac_cache: [u8; 3],
    /// 8-bit DAC (VBE); 6 bits otherwise.
    pub dac_8bit: bool,
    /// 256 RGB entries.
    pub palette: [u8; 768],
    /// Video memory offset of the 0xa0000 window's bank (VBE).
    pub bank_offset: u32,
    /// VBE index (0x1ce).
    pub vbe_index: u16,
    /// VBE registers.
    pub vbe_regs: [u16; vbe::INDEX_NB],
    /// Display start in dwords (VBE).
    pub vbe_start_addr: u32,
    /// Bytes per line (VBE).
    pub vbe_line_offset: u32,
    /// Banks that exist: video memory / 64 KiB - 1.
    pub vbe_bank_mask: u32,
    /// The framebuffer is big-endian (QEMU's extended register 0x604).
    pub big_endian_fb: bool,
}

impl VgaRegs {
    /// The power-on state (QEMU's `vga_common_reset`) for `vram_size` bytes of memory.
    pub fn reset(vram_size: u64) -> Self {
        let mut vbe_regs = [0u16; vbe::INDEX_NB];
        vbe_regs[vbe::INDEX_ID] = vbe::ID5;
        VgaRegs {
            latch: 0,
            sr_index: 0,
            sr: [0; 8],
            sr_vbe: [0; 8],
            gr_index: 0,
            gr: [0; 16],
            ar_index: 0,
            ar: [0; 21],
            ar_flip_flop: false,
            cr_index: 0,
            cr: [0; 256],
            msr: 0,
            fcr: 0,
            st00: 0,
            st01: 0,
            dac_state: 0,
            dac_sub_index: 0,
            dac_read_index: 0,
            dac_write_index: 0,
            dac_cache: [0; 3],
            dac_8bit: false,
            palette: [0; 768],
            bank_offset: 0,
            vbe_index: 0,
            vbe_regs,
            vbe_start_addr: 0,
            vbe_line_offset: 0,
            vbe_bank_mask: ((vram_size >> 16) as u32).saturating_sub(1),
            big_endian_fb: false,
        }
    }

    /// Whether a VBE mode is on.
    pub fn vbe_enabled(&self) -> bool {
        self.vbe_regs[vbe::INDEX_ENABLE] & vbe::ENABLED != 0
    }

    /// Sequencer register `index` as memory accesses and the display see it.
    pub fn sr(&self, index: usize) -> u8 {
        if self.vbe_enabled() {
            self.sr_vbe[index]
        } else {
            self.sr[index]
        }
    }

    /// Whether the VGA ignores port `addr` now: not one of its ports, or of the register
    /// set (mono or color) the miscellaneous output register does not select (QEMU's
    /// `vga_ioport_invalid`).
    pub fn ignores_port(&self, addr: u16) -> bool {
        !is_vga_port(addr) || self.port_inactive(addr)
    }

    /// Whether port `addr` is of the other (mono or color) register set than the one
    /// the miscellaneous output register selects.
    fn port_inactive(&self, addr: u16) -> bool {
        if self.msr & 0x01 != 0 {
            (0x3b0..=0x3bf).contains(&addr)
        } else {
            (0x3d0..=0x3df).contains(&addr)
        }
    }

    /// QEMU's `vga_ioport_read` for one byte port.
    pub fn ioport_read(&mut self, addr: u16) -> u8 {
        if !is_vga_port(addr) || self.port_inactive(addr) {
            return 0xff;
        }
        match addr {
            0x3c0 => {
                if self.ar_flip_flop {
                    0
                } else {
                    self.ar_index
                }
            }
            0x3c1 => {
                let index = usize::from(self.ar_index & 0x1f);
                self.ar.get(index).copied().unwrap_or(0)
            }
            0x3c2 => self.st00,
            0x3c4 => self.sr_index,
            0x3c5 => self.sr[usize::from(self.sr_index & 7)],
            0x3c7 => self.dac_state,
            0x3c8 => self.dac_write_index,
            0x3c9 => {
                let at = usize::from(self.dac_read_index) * 3 + usize::from(self.dac_sub_index);
                let value = self.palette[at];
                self.dac_sub_index += 1;
                if self.dac_sub_index == 3 {
                    self.dac_sub_index = 0;
                    self.dac_read_index = self.dac_read_index.wrapping_add(1);
                }
                value
            }
            0x3ca => self.fcr,
            0x3cc => self.msr,
            0x3ce => self.gr_index,
            0x3cf => self.gr[usize::from(self.gr_index & 0x0f)],
            0x3b4 | 0x3d4 => self.cr_index,
            0x3b5 | 0x3d5 => self.cr[usize::from(self.cr_index)],
            0x3ba | 0x3da => {
                // Toggled on every read, so polling for either state ends.
                self.st01 ^= ST01_V_RETRACE | ST01_DISP_ENABLE;
                self.ar_flip_flop = false;
                self.st01
            }
            _ => 0,
        }
    }

    /// QEMU's `vga_ioport_write` for one byte port.
    pub fn ioport_write(&mut self, addr: u16, val: u8) {
        if !is_vga_port(addr) || self.port_inactive(addr) {
            return;
        }
        match addr {
            0x3c0 => {
                if !self.ar_flip_flop {
                    self.ar_index = val & 0x3f;
                } else {
                    let index = usize::from(self.ar_index & 0x1f);
                    match index {
                        0x00..=0x0f => self.ar[index] = val & 0x3f,
                        0x10 => self.ar[index] = val & !0x10,
                        0x11 => self.ar[index] = val,
                        0x12 => self.ar[index] = val & !0xc0,
                        0x13 | 0x14 => self.ar[index] = val & !0xf0,
                        _ => {}
                    }
                }
                self.ar_flip_flop = !self.ar_flip_flop;
            }
            0x3c2 => self.msr = val & !0x10,
            0x3c4 => self.sr_index = val & 7,
            0x3c5 => {
                let index = usize::from(self.sr_index & 7);
                self.sr[index] = val & SR_MASK[index];
                self.sr_vbe[index] = self.sr[index];
                self.vbe_update_vgaregs();
            }
            0x3c7 => {
                self.dac_read_index = val;
                self.dac_sub_index = 0;
                self.dac_state = 3;
            }
            0x3c8 => {
                self.dac_write_index = val;
                self.dac_sub_index = 0;
                self.dac_state = 0;
            }
            0x3c9 => {
                self.dac_cache[usize::from(self.dac_sub_index)] = val;
                self.dac_sub_index += 1;
                if self.dac_sub_index == 3 {
                    let at = usize::from(self.dac_write_index) * 3;
                    self.palette[at..at + 3].copy_from_slice(&self.dac_cache);
                    self.dac_sub_index = 0;
                    self.dac_write_index = self.dac_write_index.wrapping_add(1);
                }
            }
            0x3ce => self.gr_index = val & 0x0f,
            0x3cf => {
                let index = usize::from(self.gr_index & 0x0f);
                self.gr[index] = val & GR_MASK[index];
                self.vbe_update_vgaregs();
            }
            0x3b4 | 0x3d4 => self.cr_index = val,
            0x3b5 | 0x3d5 => {
                let index = usize::from(self.cr_index);
                // CR0-CR7 are write-protected by CR11 bit 7, except CR7's bit 4.
                if self.cr[crtc::V_SYNC_END] & 0x80 != 0 && index <= crtc::OVERFLOW {
                    if index == crtc::OVERFLOW {
                        self.cr[index] = (self.cr[index] & !0x10) | (val & 0x10);
                    }
                    return;
                }
                self.cr[index] = val;
                self.vbe_update_vgaregs();
            }
            0x3ba | 0x3da => self.fcr = val & 0x10,
            _ => {}
        }
    }

    /// QEMU's `vbe_fixup_regs`: brings the VBE registers to the nearest mode that fits
    /// video memory (`vbe_size` bytes), and derives the line length and start address.
    fn vbe_fixup_regs(&mut self, vbe_size: u64) {
        if !self.vbe_enabled() {
            return;
        }
        let r = &mut self.vbe_regs;
        let bits: u32 = match r[vbe::INDEX_BPP] {
            4 | 8 | 16 | 24 | 32 => u32::from(r[vbe::INDEX_BPP]),
            15 => 16,
            _ => {
                r[vbe::INDEX_BPP] = 8;
                8
            }
        };
        r[vbe::INDEX_XRES] &= !7;
        if r[vbe::INDEX_XRES] == 0 {
            r[vbe::INDEX_XRES] = 8;
        }
        r[vbe::INDEX_XRES] = r[vbe::INDEX_XRES].min(vbe::MAX_XRES);
        r[vbe::INDEX_VIRT_WIDTH] &= !7;
        r[vbe::INDEX_VIRT_WIDTH] = r[vbe::INDEX_VIRT_WIDTH]
            .min(vbe::MAX_XRES)
            .max(r[vbe::INDEX_XRES]);
        let linelength = u64::from(r[vbe::INDEX_VIRT_WIDTH]) * u64::from(bits) / 8;
        let maxy = (vbe_size / linelength.max(1)).max(1);
        if r[vbe::INDEX_YRES] == 0 {
            r[vbe::INDEX_YRES] = 1;
        }
        r[vbe::INDEX_YRES] = r[vbe::INDEX_YRES]
            .min(vbe::MAX_YRES)
            .min(maxy.min(u64::from(u16::MAX)) as u16);
        r[vbe::INDEX_X_OFFSET] = r[vbe::INDEX_X_OFFSET].min(vbe::MAX_XRES);
        r[vbe::INDEX_Y_OFFSET] = r[vbe::INDEX_Y_OFFSET].min(vbe::MAX_YRES);
        let yres = u64::from(r[vbe::INDEX_YRES]);
        let mut offset = u64::from(r[vbe::INDEX_X_OFFSET]) * u64::from(bits) / 8
            + u64::from(r[vbe::INDEX_Y_OFFSET]) * linelength;
        if offset + yres * linelength > vbe_size {
            r[vbe::INDEX_Y_OFFSET] = 0;
            offset = u64::from(r[vbe::INDEX_X_OFFSET]) * u64::from(bits) / 8;
            if offset + yres * linelength > vbe_size {
                r[vbe::INDEX_X_OFFSET] = 0;
                offset = 0;
            }
        }
        r[vbe::INDEX_VIRT_HEIGHT] = maxy.min(u64::from(u16::MAX)) as u16;
        self.vbe_line_offset = linelength as u32;
        self.vbe_start_addr = (offset / 4) as u32;
    }

    /// QEMU's `vbe_update_vgaregs`: while a VBE mode is on, the VGA registers that would
    /// change how memory is addressed and shown are held where the mode needs them.
    fn vbe_update_vgaregs(&mut self) {
        if !self.vbe_enabled() {
            return;
        }
        self.gr[gfx::MISC] = (self.gr[gfx::MISC] & !0x0c) | 0x04 | 0x01;
        self.cr[crtc::MODE] |= 3;
        self.cr[crtc::OFFSET] = (self.vbe_line_offset >> 3) as u8;
        self.cr[crtc::H_DISP] = ((self.vbe_regs[vbe::INDEX_XRES] >> 3) as u8).wrapping_sub(1);
        let h = self.vbe_regs[vbe::INDEX_YRES].wrapping_sub(1);
        self.cr[crtc::V_DISP_END] = h as u8;
        self.cr[crtc::OVERFLOW] = (self.cr[crtc::OVERFLOW] & !0x42)
            | (((h >> 7) & 0x02) as u8)
            | (((h >> 3) & 0x40) as u8);
        self.cr[crtc::LINE_COMPARE] = 0xff;
        self.cr[crtc::OVERFLOW] |= 0x10;
        self.cr[crtc::MAX_SCAN] |= 0x40;
        let shift_control = if self.vbe_regs[vbe::INDEX_BPP] == 4 {
            self.sr_vbe[seq::CLOCK_MODE] &= !8;
            0
        } else {
            self.sr_vbe[seq::MEMORY_MODE] |= seq::CHAIN4;
            self.sr_vbe[seq::PLANE_WRITE] |= 0x0f;
            2
        };
        self.gr[gfx::MODE] = (self.gr[gfx::MODE] & !0x60) | (shift_control << 5);
        self.cr[crtc::MAX_SCAN] &= !0x9f;
    }

    /// QEMU's `vbe_ioport_read_data`.
    pub fn vbe_read_data(&self, vbe_size: u64) -> u16 {
        let index = usize::from(self.vbe_index);
        if index < vbe::INDEX_NB {
            if self.vbe_regs[vbe::INDEX_ENABLE] & vbe::GETCAPS != 0 {
                match index {
                    vbe::INDEX_XRES => return vbe::MAX_XRES,
                    vbe::INDEX_YRES => return vbe::MAX_YRES,
                    vbe::INDEX_BPP => return vbe::MAX_BPP,
                    _ => {}
                }
            }
            self.vbe_regs[index]
        } else if index == vbe::INDEX_VIDEO_MEMORY_64K {
            (vbe_size >> 16).min(u64::from(u16::MAX)) as u16
        } else {
            0
        }
    }

    /// QEMU's `vbe_ioport_write_data`. Returns how many bytes of video memory to clear
    /// (a mode set without `NOCLEARMEM`).
    pub fn vbe_write_data(&mut self, val: u16, vbe_size: u64) -> u64 {
        let index = usize::from(self.vbe_index);
        match index {
            vbe::INDEX_ID if (0xb0c0..=0xb0c5).contains(&val) => self.vbe_regs[index] = val,
            vbe::INDEX_ID => {}
            vbe::INDEX_XRES
            | vbe::INDEX_YRES
            | vbe::INDEX_BPP
            | vbe::INDEX_VIRT_WIDTH
            | vbe::INDEX_X_OFFSET
            | vbe::INDEX_Y_OFFSET => {
                self.vbe_regs[index] = val;
                self.vbe_fixup_regs(vbe_size);
                self.vbe_update_vgaregs();
            }
            vbe::INDEX_BANK => {
                let mask = if self.vbe_regs[vbe::INDEX_BPP] == 4 {
                    self.vbe_bank_mask >> 2
                } else {
                    self.vbe_bank_mask
                };
                let val = u32::from(val) & mask;
                self.vbe_regs[index] = val as u16;
                self.bank_offset = val << 16;
            }
            vbe::INDEX_ENABLE => {
                let mut clear = 0;
                if val & vbe::ENABLED != 0 && !self.vbe_enabled() {
                    self.vbe_regs[vbe::INDEX_VIRT_WIDTH] = 0;
                    self.vbe_regs[vbe::INDEX_X_OFFSET] = 0;
                    self.vbe_regs[vbe::INDEX_Y_OFFSET] = 0;
                    self.vbe_regs[vbe::INDEX_ENABLE] |= vbe::ENABLED;
                    self.sr_vbe = self.sr;
                    self.vbe_fixup_regs(vbe_size);
                    self.vbe_update_vgaregs();
                    if val & vbe::NOCLEARMEM == 0 {
                        clear = u64::from(self.vbe_regs[vbe::INDEX_YRES])
                            * u64::from(self.vbe_line_offset);
                    }
                } else {
                    self.bank_offset = 0;
                }
                self.dac_8bit = val & vbe::DAC_8BIT != 0;
                self.vbe_regs[index] = val;
                return clear;
            }
            _ => {}
        }
        0
    }

    /// The video memory offset of window address `addr` (0..0x20000 from 0xa0000) under
    /// the graphics controller's memory map, or `None` where the map does not decode.
    fn window_offset(&self, addr: u64) -> Option<u64> {
        let addr = addr & 0x1ffff;
        match (self.gr[gfx::MISC] >> 2) & 3 {
            0 => Some(addr),
            1 => (addr < 0x10000).then(|| addr + u64::from(self.bank_offset)),
            2 => addr.checked_sub(0x10000).filter(|a| *a < 0x8000),
            _ => addr.checked_sub(0x18000).filter(|a| *a < 0x8000),
        }
    }

    /// QEMU's `vga_mem_readb`: a byte of the 0xa0000-0xbffff window.
    pub fn mem_readb(&mut self, vram: &Vram, addr: u64) -> u8 {
        let Some(addr) = self.window_offset(addr) else {
            return 0xff;
        };
        if self.sr(seq::MEMORY_MODE) & seq::CHAIN4 != 0 {
            vram.read_u8(addr)
        } else if self.gr[gfx::MODE] & 0x10 != 0 {
            // Odd/even (text modes): even addresses in planes 0/2, odd in 1/3.
            let plane = u64::from(self.gr[gfx::PLANE_READ] & 2) | (addr & 1);
            vram.read_u8(((addr & !1) << 1) | plane)
        } else {
            if addr * 4 >= vram.size() {
                return 0xff;
            }
            self.latch = vram.read_u32(addr * 4);
            if self.gr[gfx::MODE] & 0x08 == 0 {
                // Read mode 0: the selected plane.
                (self.latch >> (8 * (self.gr[gfx::PLANE_READ] & 3))) as u8
            } else {
                // Read mode 1: bits whose colour matches the compare value (in the planes
                // the don't-care mask keeps).
                let mut ret = (self.latch ^ plane_mask(self.gr[gfx::COMPARE_VALUE]))
                    & plane_mask(self.gr[gfx::COMPARE_MASK]);
                ret |= ret >> 16;
                ret |= ret >> 8;
                !(ret as u8)
            }
        }
    }

    /// QEMU's `vga_mem_writeb`: a byte into the 0xa0000-0xbffff window.
    pub fn mem_writeb(&mut self, vram: &Vram, addr: u64, val: u8) {
        let Some(addr) = self.window_offset(addr) else {
            return;
        };
        let plane_write = self.sr(seq::PLANE_WRITE);
        if self.sr(seq::MEMORY_MODE) & seq::CHAIN4 != 0 {
            if plane_write & (1 << (addr & 3)) != 0 {
                vram.write_u8(addr, val);
            }
        } else if self.gr[gfx::MODE] & 0x10 != 0 {
            let plane = u64::from(self.gr[gfx::PLANE_READ] & 2) | (addr & 1);
            if plane_write & (1 << plane) != 0 {
                vram.write_u8(((addr & !1) << 1) | plane, val);
            }
        } else {
            if addr * 4 >= vram.size() {
                return;
            }
            let rotate = |v: u8| v.rotate_right(u32::from(self.gr[gfx::DATA_ROTATE] & 7));
            let spread = |v: u8| u32::from(v) * 0x0101_0101;
            let (value, bit_mask) = match self.gr[gfx::MODE] & 3 {
                0 => {
                    let v = spread(rotate(val));
                    let set_mask = plane_mask(self.gr[gfx::SR_ENABLE]);
                    let v = (v & !set_mask) | (plane_mask(self.gr[gfx::SR_VALUE]) & set_mask);
                    (Some(v), self.gr[gfx::BIT_MASK])
                }
                // Write mode 1: the latches as they are.
                1 => (None, 0),
                2 => (Some(plane_mask(val & 0x0f)), self.gr[gfx::BIT_MASK]),
                _ => (
                    Some(plane_mask(self.gr[gfx::SR_VALUE])),
                    self.gr[gfx::BIT_MASK] & rotate(val),
                ),
            };
            let value = match value {
                None => self.latch,
                Some(v) => {
                    let v = match self.gr[gfx::DATA_ROTATE] >> 3 {
                        1 => v & self.latch,
                        2 => v | self.latch,
                        3 => v ^ self.latch,
                        _ => v,
                    };
                    let bits = spread(bit_mask);
                    (v & bits) | (self.latch & !bits)
                }
            };
            let write_mask = plane_mask(plane_write);
            let old = vram.read_u32(addr * 4);
            vram.write_u32(addr * 4, (old & !write_mask) | (value & write_mask));
        }
    }
}

/// The 8x16 font a VGA BIOS carries (SeaBIOS's `vgabios-*.bin` do): 256 glyphs of 16
/// rows, found by its 'A' and checked by the blank space and the full block (0xdb) every
/// such font has.
pub fn vga_bios_font(rom: &[u8]) -> Option<&[u8]> {
    const GLYPH_A: [u8; 16] = [
        0, 0, 0x10, 0x38, 0x6c, 0xc6, 0xc6, 0xfe, 0xc6, 0xc6, 0xc6, 0xc6, 0, 0, 0, 0,
    ];
    let glyph = |font: &[u8], ch: usize| font[ch * 16..ch * 16 + 16].to_vec();
    rom.windows(16)
        .enumerate()
        .filter(|(_, w)| *w == GLYPH_A)
        .filter_map(|(at, _)| {
            let base = at.checked_sub(0x41 * 16)?;
            rom.get(base..base + 256 * 16)
        })
        .find(|font| glyph(font, 0x20) == [0; 16] && glyph(font, 0xdb) == [0xff; 16])
}

/// Whether QEMU's VGA decodes port `addr` (QEMU's `vga_portio_list`: 0x3b4-0x3b5, 0x3ba,
/// 0x3c0-0x3cf, 0x3d4-0x3d5, 0x3da); the rest of 0x3b0-0x3df is not the VGA's.
pub fn is_vga_port(addr: u16) -> bool {
    matches!(addr, 0x3b4 | 0x3b5 | 0x3ba | 0x3c0..=0x3cf | 0x3d4 | 0x3d5 | 0x3da)
}

/// What the display last showed (QEMU's `last_scr_width`/`last_scr_height`): a blanked
/// VGA shows black at that size. A console starts at 640x480, as QEMU's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisplayState {
    /// Width of the last surface.
    pub width: u32,
    /// Height of the last surface.
    pub height: u32,
}

impl Default for DisplayState {
    fn default() -> Self {
        DisplayState {
            width: 640,
            height: 480,
        }
    }
}

/// The VGA as its register ports, memory window and VBE interface reach it: registers
/// behind one lock, video memory beside them.
pub struct VgaCommon {
    /// The registers.
    pub regs: Mutex<VgaRegs>,
    /// Video memory.
    pub vram: Arc<Vram>,
    /// Guest misuse (accesses of odd widths, VBE writes past the registers), rate-limited.
    log: RateLimitedLog,
    /// Where the display side keeps what it last showed.
    pub display: Mutex<DisplayState>,
}

impl VgaCommon {
    /// A VGA with `vram` as its memory, in its power-on state.
    pub fn new(vram: Arc<Vram>) -> Arc<VgaCommon> {
        Arc::new(VgaCommon {
            regs: Mutex::new(VgaRegs::reset(vram.size())),
            vram,
            log: RateLimitedLog::default(),
            display: Mutex::new(Default::default()),
        })
    }

    /// The VBE interface's memory: all of video memory (QEMU's `vbe_size`).
    pub fn vbe_size(&self) -> u64 {
        self.vram.size()
    }

    /// Back to the power-on state (video memory is kept, as QEMU keeps it).
    pub fn reset(&self) {
        *self.regs.lock() = VgaRegs::reset(self.vram.size());
        *self.display.lock() = Default::default();
    }

    /// Leaves the VGA as its BIOS leaves it after setting mode 3 (80x25 colour text, 9x16
    /// cells): the registers of that mode, `font` (256 glyphs of 16 rows) in plane 2, a
    /// blank screen of light grey on black and the cursor at the top left. A kernel booted
    /// without firmware then finds the text screen that QEMU's `-kernel` (SeaBIOS and the
    /// VGA BIOS) leaves it.
    pub fn set_bios_text_mode(&self, font: &[u8]) {
        let mut r = self.regs.lock();
        let mut out = |port: u16, value: u8| r.ioport_write(port, value);
        // Sequencer, then the CRTC (unlocked first), graphics controller, attribute
        // controller (its flip-flop reset by reading input status 1), as the BIOS's mode
        // table has them.
        out(0x3c2, 0x67);
        for (i, v) in [0x03u8, 0x00, 0x03, 0x00, 0x02].into_iter().enumerate() {
            out(0x3c4, i as u8);
            out(0x3c5, v);
        }
        out(0x3d4, 0x11);
        out(0x3d5, 0x0e);
        const CRTC: [u8; 25] = [
            0x5f, 0x4f, 0x50, 0x82, 0x55, 0x81, 0xbf, 0x1f, 0x00, 0x4f, 0x0d, 0x0e, 0x00, 0x00,
            0x00, 0x00, 0x9c, 0x8e, 0x8f, 0x28, 0x1f, 0x96, 0xb9, 0xa3, 0xff,
        ];
        for (i, v) in CRTC.into_iter().enumerate() {
            out(0x3d4, i as u8);
            out(0x3d5, v);
        }
        for (i, v) in [0u8, 0, 0, 0, 0, 0x10, 0x0e, 0x0f, 0xff].into_iter().enumerate() {
            out(0x3ce, i as u8);
            out(0x3cf, v);
        }
        const ATTR: [u8; 21] = [
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d,
            0x3e, 0x3f, 0x0c, 0x00, 0x0f, 0x08, 0x00,
        ];
        r.ioport_read(0x3da);
        let mut out = |port: u16, value: u8| r.ioport_write(port, value);
        for (i, v) in ATTR.into_iter().enumerate() {
            out(0x3c0, i as u8);
            out(0x3c0, v);
        }
        // The EGA palette in the first 64 DAC entries (6-bit components).
        out(0x3c8, 0);
        for i in 0u8..64 {
            let c = |hi: u8, lo: u8| ((i >> hi) & 1) * 0x2a + ((i >> lo) & 1) * 0x15;
            for v in [c(2, 5), c(1, 4), c(0, 3)] {
                out(0x3c9, v);
            }
        }
        out(0x3c0, 0x20);
        // The font into plane 2 (glyphs 32 bytes apart), through the window mapped at
        // 0xa0000 as the BIOS does it, then back to odd/even text access at 0xb8000.
        for (port, index, value) in [(0x3c4, 2, 0x04), (0x3c4, 4, 0x07), (0x3ce, 4, 0x02), (0x3ce, 5, 0x00), (0x3ce, 6, 0x04)] {
            out(port, index);
            out(port + 1, value);
        }
        for (glyph, rows) in font.chunks_exact(16).take(256).enumerate() {
            for (row, bits) in rows.iter().enumerate() {
                r.mem_writeb(&self.vram, (glyph * 32 + row) as u64, *bits);
            }
        }
        let mut out = |port: u16, value: u8| r.ioport_write(port, value);
        for (port, index, value) in [(0x3c4, 2, 0x03), (0x3c4, 4, 0x02), (0x3ce, 4, 0x00), (0x3ce, 5, 0x10), (0x3ce, 6, 0x0e)] {
            out(port, index);
            out(port + 1, value);
        }
        // A blank screen: space, light grey on black, over all 32 KiB of text memory.
        const TEXT_WINDOW: u64 = 0x18000;
        for cell in 0..0x4000u64 {
            r.mem_writeb(&self.vram, TEXT_WINDOW + cell * 2, b' ');
            r.mem_writeb(&self.vram, TEXT_WINDOW + cell * 2 + 1, 0x07);
        }
    }

    /// Writes VBE data register `index` (the bochs interface of the MMIO BAR).
    pub fn vbe_write(&self, index: u16, val: u16) {
        let clear = {
            let mut regs = self.regs.lock();
            regs.vbe_index = index;
            if usize::from(index) > vbe::INDEX_NB {
                self.log.warn(|| format!("VGA: write of 0x{val:x} to VBE register 0x{index:x}, which does not exist"));
            }
            regs.vbe_write_data(val, self.vbe_size())
        };
        if clear > 0 {
            self.vram.clear(clear);
        }
    }

    /// Reads VBE data register `index`.
    pub fn vbe_read(&self, index: u16) -> u16 {
        let mut regs = self.regs.lock();
        regs.vbe_index = index;
        regs.vbe_read_data(self.vbe_size())
    }

    /// Logs guest misuse, rate-limited.
    pub fn guest_error(&self, what: impl FnOnce() -> String) {
        self.log.warn(what);
    }

    /// QEMU's `vmstate_vga_common` (with its endianness subsection) and the `vga.vram`
    /// RAM block, as fields of the device's section: every register, the DAC and its
    /// palette, the latch, the VBE registers, and video memory as its pages that are not
    /// all zeroes (`vram_pages`, their indices, and `vram`, their bytes).
    ///
    /// Video memory goes here, in the downtime: it is not pre-copied with guest RAM yet
    /// (KVM's dirty log on the framebuffer slot would allow it). The guest writes the
    /// framebuffer straight through BAR 0's slot, but a migration's last save runs with
    /// the vCPUs stopped, so what is saved then is consistent.
    pub fn save_state(&self, s: &mut VmStateSection) {
        let r = self.regs.lock().clone();
        s.put("latch", r.latch);
        s.put("sr_index", r.sr_index);
        s.put_bytes("sr", &r.sr);
        s.put_bytes("sr_vbe", &r.sr_vbe);
        s.put("gr_index", r.gr_index);
        s.put_bytes("gr", &r.gr);
        s.put("ar_index", r.ar_index);
        s.put_bytes("ar", &r.ar);
        s.put("ar_flip_flop", r.ar_flip_flop);
        s.put("cr_index", r.cr_index);
        s.put_bytes("cr", &r.cr);
        s.put("msr", r.msr);
        s.put("fcr", r.fcr);
        s.put("st00", r.st00);
        s.put("st01", r.st01);
        s.put("dac_state", r.dac_state);
        s.put("dac_sub_index", r.dac_sub_index);
        s.put("dac_read_index", r.dac_read_index);
        s.put("dac_write_index", r.dac_write_index);
        s.put_bytes("dac_cache", &r.dac_cache);
        s.put("dac_8bit", r.dac_8bit);
        s.put_bytes("palette", &r.palette);
        s.put("bank_offset", r.bank_offset);
        s.put("vbe_index", r.vbe_index);
        s.put("vbe_regs", r.vbe_regs);
        s.put("vbe_start_addr", r.vbe_start_addr);
        s.put("vbe_line_offset", r.vbe_line_offset);
        s.put("big_endian_fb", r.big_endian_fb);
        s.put("vram_size", self.vram.size());
        let (pages, data) = self.vram.nonzero_pages();
        s.put("vram_pages", pages);
        s.put_bytes("vram", &data);
    }

    /// Loads what [`VgaCommon::save_state`] saved (QEMU's `vga_common_post_load` after
    /// it): video memory of another size is a mismatch; values the registers cannot hold
    /// are bad fields; nothing changes unless everything loads. The VBE mode is brought
    /// back through `vbe_fixup_regs` and `vbe_update_vgaregs`, so the display and the
    /// framebuffer show what they showed on the source.
    pub fn load_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        let size: u64 = s.get("vram_size")?;
        if size != self.vram.size() {
            return Err(VmStateError::Mismatch(format!(
                "VGA: {} MiB of video memory in the stream, {} MiB here (vgamem_mb)",
                size >> 20,
                self.vram.size() >> 20
            )));
        }
        let bad = |field: &str, reason: String| VmStateError::BadField {
            field: field.to_string(),
            reason,
        };
        let mut r = VgaRegs::reset(size);
        r.latch = s.get("latch")?;
        r.sr_index = s.get("sr_index")?;
        r.sr = s.get_array("sr")?;
        r.sr_vbe = s.get_array("sr_vbe")?;
        r.gr_index = s.get("gr_index")?;
        r.gr = s.get_array("gr")?;
        r.ar_index = s.get("ar_index")?;
        r.ar = s.get_array("ar")?;
        r.ar_flip_flop = s.get("ar_flip_flop")?;
        r.cr_index = s.get("cr_index")?;
        r.cr = s.get_array("cr")?;
        r.msr = s.get("msr")?;
        r.fcr = s.get("fcr")?;
        r.st00 = s.get("st00")?;
        r.st01 = s.get("st01")?;
        r.dac_state = s.get("dac_state")?;
        r.dac_sub_index = s.get("dac_sub_index")?;
        if r.dac_sub_index > 2 {
            return Err(bad("dac_sub_index", format!("{} is not a colour component (0-2)", r.dac_sub_index)));
        }
        r.dac_read_index = s.get("dac_read_index")?;
        r.dac_write_index = s.get("dac_write_index")?;
        r.dac_cache = s.get_array("dac_cache")?;
        r.dac_8bit = s.get("dac_8bit")?;
        r.palette = s.get_array("palette")?;
        r.bank_offset = s.get("bank_offset")?;
        if u64::from(r.bank_offset) >= size {
            return Err(bad("bank_offset", format!("{:#x} is past the video memory", r.bank_offset)));
        }
        r.vbe_index = s.get("vbe_index")?;
        r.vbe_regs = s.get("vbe_regs")?;
        r.vbe_start_addr = s.get("vbe_start_addr")?;
        r.vbe_line_offset = s.get("vbe_line_offset")?;
        r.big_endian_fb = s.get("big_endian_fb")?;
        let pages: Vec<u32> = s.get("vram_pages")?;
        let data = s.get_bytes("vram")?;
        // A saved mode is one the fix-up produced: doing it again changes nothing, and a
        // damaged stream cannot leave a mode that does not fit.
        r.vbe_fixup_regs(size);
        r.vbe_update_vgaregs();
        self.vram.load_pages(&pages, &data).map_err(|reason| bad("vram", reason))?;
        *self.regs.lock() = r;
        *self.display.lock() = Default::default();
        Ok(())
    }
}

/// Ports 0x3b0-0x3df (QEMU's `vga_portio_list`): accesses of 2 or 4 bytes go to
/// consecutive ports, lowest first, so an index and its data can be written at once.
pub struct VgaIoPorts(pub Arc<VgaCommon>);

/// The first port of [`VgaIoPorts`].
pub const VGA_IO_BASE: u16 = 0x3b0;
/// Ports [`VgaIoPorts`] covers.
pub const VGA_IO_SIZE: u64 = 0x30;

impl MemoryRegionOps for VgaIoPorts {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let mut regs = self.0.regs.lock();
        (0..u64::from(size.min(4))).fold(0, |v, i| {
            let port = VGA_IO_BASE as u64 + offset + i;
            let byte = u16::try_from(port).map_or(0xff, |p| regs.ioport_read(p));
            v | (u64::from(byte) << (8 * i))
        })
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        let mut regs = self.0.regs.lock();
        for i in 0..u64::from(size.min(4)) {
            if let Ok(port) = u16::try_from(VGA_IO_BASE as u64 + offset + i) {
                regs.ioport_write(port, (value >> (8 * i)) as u8);
            }
        }
    }
}

/// The Bochs VBE ports (QEMU's `vbe_portio_list`): the index at 0x1ce, the data at 0x1cf
/// (x86) and 0x1d0, 16 bits wide.
pub struct VbePorts(pub Arc<VgaCommon>);

/// The index port.
pub const VBE_DISPI_IOPORT_INDEX: u16 = 0x1ce;
/// Ports [`VbePorts`] covers: 0x1ce-0x1d0.
pub const VBE_IO_SIZE: u64 = 3;

impl MemoryRegionOps for VbePorts {
    fn read(&self, offset: u64, _size: u32) -> u64 {
        if offset == 0 {
            u64::from(self.0.regs.lock().vbe_index)
        } else {
            let index = self.0.regs.lock().vbe_index;
            u64::from(self.0.vbe_read(index))
        }
    }
    fn write(&self, offset: u64, value: u64, _size: u32) {
        if offset == 0 {
            self.0.regs.lock().vbe_index = value as u16;
        } else {
            let index = self.0.regs.lock().vbe_index;
            self.0.vbe_write(index, value as u16);
        }
    }
}

/// The legacy VGA ports and window a PCI VGA claims (`vga-pci.c`, `cirrus_vga.c`), held
/// to give back at unrealize. A second VGA finds them taken (QEMU lets the later one
/// shadow the first; here the first keeps them) and works through its BARs only.
#[derive(Default)]
pub struct LegacyVgaResources(
    Mutex<Vec<(Arc<crate::core::memory::AddressSpace>, Arc<crate::core::memory::MemoryRegion>)>>,
);

impl LegacyVgaResources {
    /// Maps each `(space, base, region)`; one already taken is left to its owner (with a
    /// warning naming `device`), any other failure is returned.
    pub fn claim(
        &self,
        device: &str,
        regions: impl IntoIterator<
            Item = (
                Arc<crate::core::memory::AddressSpace>,
                u64,
                Arc<crate::core::memory::MemoryRegion>,
            ),
        >,
    ) -> Result<(), crate::core::memory::MemoryError> {
        use crate::core::memory::MemoryError;
        for (space, base, region) in regions {
            match space.map(base, region.clone()) {
                Ok(()) => self.0.lock().push((space, region)),
                Err(e @ MemoryError::Overlap { .. }) => {
                    log::warn!("{device}: legacy VGA resources taken, BARs only: {e}")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Unmaps what [`LegacyVgaResources::claim`] mapped.
    pub fn release(&self) {
        for (space, region) in self.0.lock().drain(..) {
            space.unmap(&region);
        }
    }
}

/// The legacy memory window, 0xa0000-0xbffff (QEMU's `vga-lowmem`): wider accesses are
/// split into bytes, lowest address first.
pub struct VgaLowMem(pub Arc<VgaCommon>);

/// Where the window starts.
pub const VGA_LOWMEM_BASE: u64 = 0xa0000;
/// Its size.
pub const VGA_LOWMEM_SIZE: u64 = 0x20000;

impl MemoryRegionOps for VgaLowMem {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let mut regs = self.0.regs.lock();
        (0..u64::from(size.min(8))).fold(0, |v, i| {
            v | (u64::from(regs.mem_readb(&self.0.vram, offset + i)) << (8 * i))
        })
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        let mut regs = self.0.regs.lock();
        for i in 0..u64::from(size.min(8)) {
            regs.mem_writeb(&self.0.vram, offset + i, (value >> (8 * i)) as u8);
        }
    }
}

/// The linear framebuffer as MMIO: where the accelerator does not map video memory into
/// the guest (qtest) or before it does, accesses come here.
pub struct VramOps(pub Arc<Vram>);

impl MemoryRegionOps for VramOps {
    fn read(&self, offset: u64, size: u32) -> u64 {
        (0..u64::from(size.min(8))).fold(0, |v, i| v | (u64::from(self.0.read_u8(offset + i)) << (8 * i)))
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        for i in 0..u64::from(size.min(8)) {
            self.0.write_u8(offset + i, (value >> (8 * i)) as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vga() -> Arc<VgaCommon> {
        VgaCommon::new(Vram::new(1 << 20).unwrap())
    }

    fn outb(v: &VgaCommon, port: u16, val: u8) {
        v.regs.lock().ioport_write(port, val);
    }

    fn inb(v: &VgaCommon, port: u16) -> u8 {
        v.regs.lock().ioport_read(port)
    }

    #[test]
    fn indexed_registers_keep_the_bits_that_exist() {
        let v = vga();
        outb(&v, 0x3c4, 0xff);
        assert_eq!(inb(&v, 0x3c4), 7, "sequencer index has 3 bits");
        outb(&v, 0x3c5, 0xff);
        assert_eq!(inb(&v, 0x3c5), 0xff, "SR7 keeps all");
        outb(&v, 0x3c4, 1);
        outb(&v, 0x3c5, 0xff);
        assert_eq!(inb(&v, 0x3c5), 0x3d);
        outb(&v, 0x3ce, 5);
        outb(&v, 0x3cf, 0xff);
        assert_eq!(inb(&v, 0x3cf), 0x7b);
        outb(&v, 0x3c2, 0xff);
        assert_eq!(inb(&v, 0x3cc), 0xef);
    }

    #[test]
    fn the_crtc_follows_the_mono_or_color_select_and_its_write_protect() {
        let v = vga();
        // Mono after reset: 0x3d4 is not decoded.
        outb(&v, 0x3d4, 0x0e);
        assert_eq!(inb(&v, 0x3d4), 0xff);
        outb(&v, 0x3b4, 0x0e);
        outb(&v, 0x3b5, 0x12);
        assert_eq!(inb(&v, 0x3b5), 0x12);
        outb(&v, 0x3c2, 0x01);
        assert_eq!(inb(&v, 0x3b5), 0xff, "mono ports off in color mode");
        outb(&v, 0x3d4, 0x11);
        outb(&v, 0x3d5, 0x80);
        outb(&v, 0x3d4, 0x01);
        outb(&v, 0x3d5, 0x4f);
        assert_eq!(inb(&v, 0x3d5), 0, "CR1 protected");
        outb(&v, 0x3d4, 0x07);
        outb(&v, 0x3d5, 0xff);
        assert_eq!(inb(&v, 0x3d5), 0x10, "CR7 bit 4 stays writable");
    }

    #[test]
    fn the_attribute_controller_flips_between_index_and_data() {
        let v = vga();
        inb(&v, 0x3da);
        outb(&v, 0x3c0, 0x21);
        outb(&v, 0x3c0, 0xff);
        assert_eq!(inb(&v, 0x3c1), 0x3f);
        assert_eq!(inb(&v, 0x3c0), 0x21);
        outb(&v, 0x3c0, 0x10);
        outb(&v, 0x3c0, 0xff);
        assert_eq!(inb(&v, 0x3c1), 0xef);
        let a = inb(&v, 0x3ba);
        let b = inb(&v, 0x3ba);
        assert_eq!(a ^ b, 0x09, "retrace and display-enable toggle");
    }

    #[test]
    fn the_dac_writes_and_reads_triplets() {
        let v = vga();
        outb(&v, 0x3c8, 5);
        for c in [1, 2, 3, 4, 5, 6] {
            outb(&v, 0x3c9, c);
        }
        outb(&v, 0x3c7, 5);
        let read: Vec<u8> = (0..6).map(|_| inb(&v, 0x3c9)).collect();
        assert_eq!(read, [1, 2, 3, 4, 5, 6]);
        assert_eq!(inb(&v, 0x3c7), 3);
        outb(&v, 0x3c8, 0xff);
        for _ in 0..6 {
            outb(&v, 0x3c9, 9);
        }
        assert_eq!(v.regs.lock().palette[0], 9, "the index wraps to entry 0");
    }

    #[test]
    fn text_mode_writes_land_in_planes_0_and_1_and_fonts_in_plane_2() {
        let v = vga();
        let mut r = v.regs.lock();
        // Text mode: odd/even, memory map 3 (0xb8000).
        r.gr[gfx::MODE] = 0x10;
        r.gr[gfx::MISC] = 0x0e;
        r.sr[seq::PLANE_WRITE] = 0x03;
        r.mem_writeb(&v.vram, 0x18000, b'A');
        r.mem_writeb(&v.vram, 0x18001, 0x1f);
        assert_eq!(v.vram.read_u8(0), b'A');
        assert_eq!(v.vram.read_u8(1), 0x1f);
        assert_eq!(r.mem_readb(&v.vram, 0x18001), 0x1f);
        assert_eq!(r.mem_readb(&v.vram, 0x0), 0xff, "0xa0000 not decoded by map 3");
        // Font loading: plane 2 only, sequential, map 1 (0xa0000, 64 KiB).
        r.gr[gfx::MODE] = 0x00;
        r.gr[gfx::MISC] = 0x04;
        r.sr[seq::PLANE_WRITE] = 0x04;
        r.sr[seq::MEMORY_MODE] = 0x06;
        r.gr[gfx::BIT_MASK] = 0xff;
        r.mem_writeb(&v.vram, 0x41 * 32 + 3, 0x7e);
        assert_eq!(v.vram.read_u8((0x41 * 32 + 3) * 4 + 2), 0x7e);
        assert_eq!(v.vram.read_u8((0x41 * 32 + 3) * 4), 0, "other planes untouched");
    }

    #[test]
    fn planar_write_modes_and_read_modes() {
        let v = vga();
        let mut r = v.regs.lock();
        r.gr[gfx::MISC] = 0x05;
        r.sr[seq::PLANE_WRITE] = 0x0f;
        r.sr[seq::MEMORY_MODE] = 0x06;
        r.gr[gfx::BIT_MASK] = 0xff;
        // Write mode 0 with set/reset on planes 0 and 2 (value 0b0101).
        r.gr[gfx::SR_ENABLE] = 0x0f;
        r.gr[gfx::SR_VALUE] = 0x05;
        r.mem_writeb(&v.vram, 10, 0);
        assert_eq!(v.vram.read_u32(40), 0x00ff_00ff);
        // Read mode 1: colour 5 everywhere matches.
        r.gr[gfx::MODE] = 0x08;
        r.gr[gfx::COMPARE_VALUE] = 0x05;
        r.gr[gfx::COMPARE_MASK] = 0x0f;
        assert_eq!(r.mem_readb(&v.vram, 10), 0xff);
        r.gr[gfx::COMPARE_VALUE] = 0x04;
        assert_eq!(r.mem_readb(&v.vram, 10), 0x00);
        // Write mode 1 copies the latches (loaded by the read above) elsewhere.
        r.gr[gfx::MODE] = 0x01;
        r.mem_writeb(&v.vram, 11, 0);
        assert_eq!(v.vram.read_u32(44), 0x00ff_00ff);
        // Write mode 2: colour 0b1010 under bit mask 0xf0, rest from the latches.
        r.gr[gfx::MODE] = 0x02;
        r.gr[gfx::BIT_MASK] = 0xf0;
        r.mem_writeb(&v.vram, 11, 0x0a);
        assert_eq!(v.vram.read_u32(44), 0xf00f_f00f);
        // Write mode 3: set/reset colour through rotated data & bit mask.
        r.gr[gfx::MODE] = 0x03;
        r.gr[gfx::BIT_MASK] = 0xff;
        r.gr[gfx::SR_VALUE] = 0x0f;
        r.mem_readb(&v.vram, 12);
        r.mem_writeb(&v.vram, 12, 0x81);
        assert_eq!(v.vram.read_u32(48), 0x8181_8181);
        // Function select XOR against the latches.
        r.gr[gfx::MODE] = 0x00;
        r.gr[gfx::SR_ENABLE] = 0;
        r.gr[gfx::DATA_ROTATE] = 0x18;
        r.mem_readb(&v.vram, 12);
        r.mem_writeb(&v.vram, 12, 0xff);
        assert_eq!(v.vram.read_u32(48), 0x7e7e_7e7e);
        // Read mode 0 picks the plane.
        r.gr[gfx::MODE] = 0x00;
        r.gr[gfx::PLANE_READ] = 3;
        assert_eq!(r.mem_readb(&v.vram, 11), 0xf0);
    }

    #[test]
    fn chain4_and_banked_vbe_windows() {
        let v = vga();
        let mut r = v.regs.lock();
        r.sr[seq::MEMORY_MODE] = seq::CHAIN4;
        r.sr[seq::PLANE_WRITE] = 0x0f;
        r.gr[gfx::MISC] = 0x05;
        r.mem_writeb(&v.vram, 321, 7);
        assert_eq!(v.vram.read_u8(321), 7);
        r.sr[seq::PLANE_WRITE] = 0x0d;
        r.mem_writeb(&v.vram, 321, 9);
        assert_eq!(v.vram.read_u8(321), 7, "plane 1 masked");
        r.vbe_regs[vbe::INDEX_BPP] = 8;
        r.vbe_write_data(3, 1 << 20);
        assert_eq!(r.bank_offset, 0, "bank written with a zero index: ID register");
        r.vbe_index = vbe::INDEX_BANK as u16;
        r.vbe_write_data(0xffff, 1 << 20);
        assert_eq!(r.bank_offset, 15 << 16, "bank clamped to the memory");
        r.gr[gfx::MISC] = 0x05;
        r.sr[seq::PLANE_WRITE] = 0x0f;
        r.mem_writeb(&v.vram, 5, 0x42);
        assert_eq!(v.vram.read_u8((15 << 16) + 5), 0x42);
    }

    #[test]
    fn vbe_modes_are_clamped_to_what_fits() {
        let v = vga();
        let set = |index: usize, val: u16| v.vbe_write(index as u16, val);
        set(vbe::INDEX_XRES, 1024);
        set(vbe::INDEX_YRES, 768);
        set(vbe::INDEX_BPP, 32);
        set(vbe::INDEX_ENABLE, vbe::ENABLED | vbe::LFB_ENABLED);
        let r = v.regs.lock().clone();
        // 1 MiB holds 256 lines of 1024 pixels at 32 bpp.
        assert_eq!(r.vbe_regs[vbe::INDEX_YRES], 256);
        assert_eq!(r.vbe_regs[vbe::INDEX_VIRT_HEIGHT], 256);
        assert_eq!(r.vbe_line_offset, 4096);
        assert_eq!(r.sr(seq::MEMORY_MODE) & seq::CHAIN4, seq::CHAIN4);
        assert_eq!(r.sr[seq::MEMORY_MODE], 0, "reads show the guest's value");
        set(vbe::INDEX_BPP, 13);
        assert_eq!(v.vbe_read(vbe::INDEX_BPP as u16), 8, "odd depths become 8");
        set(vbe::INDEX_XRES, 0xffff);
        assert_eq!(v.vbe_read(vbe::INDEX_XRES as u16), vbe::MAX_XRES);
        set(vbe::INDEX_XRES, 3);
        assert_eq!(v.vbe_read(vbe::INDEX_XRES as u16), 8);
        set(vbe::INDEX_Y_OFFSET, 12000);
        assert_eq!(v.vbe_read(vbe::INDEX_Y_OFFSET as u16), 0, "offset past memory");
        assert_eq!(v.vbe_read(vbe::INDEX_VIDEO_MEMORY_64K as u16), 16);
        assert_eq!(v.vbe_read(0x7fff), 0);
        v.vbe_write(0x7fff, 1);
        set(vbe::INDEX_ENABLE, vbe::GETCAPS);
        assert_eq!(v.vbe_read(vbe::INDEX_XRES as u16), vbe::MAX_XRES);
        assert_eq!(v.vbe_read(vbe::INDEX_BPP as u16), 32);
    }

    /// A VGA with some of everything: palette entries, a half-written DAC triplet, a
    /// latch, text in planes 0/1, and a VBE mode with a display offset.
    fn busy_vga() -> Arc<VgaCommon> {
        let v = vga();
        outb(&v, 0x3c2, 0x67);
        outb(&v, 0x3c8, 7);
        for c in [10, 20, 30, 40] {
            outb(&v, 0x3c9, c);
        }
        outb(&v, 0x3d4, crtc::CURSOR_LO as u8);
        outb(&v, 0x3d5, 0x50);
        {
            let mut r = v.regs.lock();
            r.latch = 0x1234_5678;
            r.gr[gfx::MODE] = 0x10;
            r.gr[gfx::MISC] = 0x0e;
            r.sr[seq::PLANE_WRITE] = 0x03;
            r.mem_writeb(&v.vram, 0x18000, b'Q');
            r.mem_writeb(&v.vram, 0x18001, 0x1e);
        }
        v.vram.write_u8(0xf_0000, 0x99);
        v.vbe_write(vbe::INDEX_XRES as u16, 320);
        v.vbe_write(vbe::INDEX_YRES as u16, 200);
        v.vbe_write(vbe::INDEX_BPP as u16, 32);
        v.vbe_write(vbe::INDEX_ENABLE as u16, vbe::ENABLED | vbe::NOCLEARMEM | vbe::DAC_8BIT);
        v.vbe_write(vbe::INDEX_Y_OFFSET as u16, 2);
        v
    }

    #[test]
    fn registers_palette_and_video_memory_move_in_a_section() {
        let src = busy_vga();
        let mut s = VmStateSection::new(1);
        src.save_state(&mut s);
        let pages: Vec<u32> = s.get("vram_pages").unwrap();
        assert_eq!(pages, [0, 0xf_0000 / 4096], "only the pages with data");
        assert_eq!(s.get_bytes("vram").unwrap().len(), 2 * 4096);
        // Through the stream's JSON, into a VGA whose memory holds something else.
        let s = VmStateSection::from_json(&s.to_json()).unwrap();
        let dst = vga();
        dst.vram.write_u8(0x8_0000, 0x77);
        dst.load_state(&s).unwrap();
        let (a, b) = (src.regs.lock().clone(), dst.regs.lock().clone());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_eq!(dst.vram.read_u8(0x8_0000), 0, "memory not in the stream is zero");
        assert_eq!(dst.vram.read_u8(0xf_0000), 0x99);
        assert_eq!(dst.vram.read_u8(0), b'Q');
        assert_eq!(dst.vram.read_u8(1), 0x1e);
        assert_eq!(dst.vbe_read(vbe::INDEX_Y_OFFSET as u16), 2);
        assert_eq!(dst.regs.lock().vbe_start_addr, 2 * 320);
        // The DAC goes on with the triplet it was in the middle of.
        outb(&dst, 0x3c9, 50);
        outb(&dst, 0x3c9, 60);
        assert_eq!(dst.regs.lock().palette[8 * 3..9 * 3], [40, 50, 60]);
    }

    #[test]
    fn a_section_that_does_not_fit_is_refused_and_changes_nothing() {
        let mut s = VmStateSection::new(1);
        busy_vga().save_state(&mut s);
        let other = VgaCommon::new(Vram::new(2 << 20).unwrap());
        assert_eq!(
            other.load_state(&s).unwrap_err().to_string(),
            "VGA: 1 MiB of video memory in the stream, 2 MiB here (vgamem_mb)"
        );
        let dst = vga();
        dst.vram.write_u8(5, 5);
        let broken = |field: &str, value: serde_json::Value| {
            let mut bad = s.clone();
            bad.fields.insert(field.to_string(), value);
            bad
        };
        for (field, value) in [
            ("dac_sub_index", serde_json::json!(3)),
            ("bank_offset", serde_json::json!(1 << 20)),
            ("vram_pages", serde_json::json!([0, 256])),
            ("vram_pages", serde_json::json!([0])),
            ("sr", serde_json::json!("00")),
            ("cr", serde_json::json!(7)),
        ] {
            let err = dst.load_state(&broken(field, value.clone())).unwrap_err();
            assert!(matches!(err, VmStateError::BadField { .. }), "{field}={value}: {err}");
            assert_eq!(dst.vram.read_u8(5), 5, "{field}={value} changed memory");
            assert!(!dst.regs.lock().vbe_enabled(), "{field}={value} changed registers");
        }
        let mut missing = s.clone();
        missing.fields.remove("palette");
        assert_eq!(
            dst.load_state(&missing),
            Err(VmStateError::MissingField("palette".into()))
        );
    }

    #[test]
    fn enabling_vbe_clears_the_screen_unless_asked_not_to() {
        let v = vga();
        v.vram.write_u8(100, 0x55);
        v.vbe_write(vbe::INDEX_XRES as u16, 64);
        v.vbe_write(vbe::INDEX_YRES as u16, 64);
        v.vbe_write(vbe::INDEX_ENABLE as u16, vbe::ENABLED | vbe::NOCLEARMEM);
        assert_eq!(v.vram.read_u8(100), 0x55);
        v.vbe_write(vbe::INDEX_ENABLE as u16, 0);
        v.vbe_write(vbe::INDEX_ENABLE as u16, vbe::ENABLED);
        assert_eq!(v.vram.read_u8(100), 0);
    }
}
