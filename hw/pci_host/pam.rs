//! The Programmable Attribute Map of the i440FX (QEMU's `hw/pci-host/pam.c`): 13 segments
//! of 0xc0000-0xfffff, each switched by two bits of the host bridge's configuration
//! registers 0x59-0x5f between the PCI bus (where the firmware's `isa-bios` copy shows at
//! 0xe0000-0xfffff) and the RAM under it. Firmware copies itself to that RAM ("shadow
//! RAM") and then write-protects it; SeaBIOS writes 0x33 (RAM) then 0x11 (read-only RAM).
//!
//! Each segment is an accelerator slot, moved as the registers change: RAM, read-only
//! RAM, or the read-only ROM. What a slot does not serve (writes to a read-only slot, any
//! access where there is no slot, or a vCPU running while a slot is being moved) exits to
//! the `pam` region here, which applies the segment's mode itself.

use std::sync::Arc;

use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::core::accel_ops::{AccelOpsRef, RamBlock, SlotId};
use crate::core::memory::{MemoryError, MemoryRegion, MemoryRegionOps};
use crate::core::services::MachineServices;

/// What the PCI bus shows at the top of 0xc0000-0xfffff in PAM mode 0: the board's
/// firmware copy (QEMU's `isa-bios`), from [`IsaBios::base`] to 1 MiB.
pub trait IsaBios: Send + Sync {
    /// Its first address (0xe0000 for a firmware of 128 KiB or more).
    fn base(&self) -> u64;
    /// The host address of its byte at guest address `addr`, for the accelerator's slots.
    fn host_addr(&self, addr: u64) -> u64;
    /// Reads `size` bytes (up to 8) at guest address `addr`, little-endian.
    fn read(&self, addr: u64, size: u32) -> u64;
}

/// First address the PAM decodes.
pub const PAM_START: u64 = 0xc_0000;
/// One past the last.
pub const PAM_END: u64 = 0x10_0000;
/// The i440FX's first PAM register (QEMU's `I440FX_PAM`).
pub const I440FX_PAM: usize = 0x59;
/// Its PAM registers.
pub const I440FX_PAM_SIZE: usize = 7;
/// Segments: 0xf0000 (64 KiB), then 12 of 16 KiB from 0xc0000.
pub const PAM_SEGMENTS: usize = 13;

/// A segment's mode, the two attribute bits of its register nibble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PamMode {
    /// 0: reads and writes go to the PCI bus (the ROM's copy at 0xe0000-0xfffff).
    Pci,
    /// 1 (RE): reads from RAM, writes dropped.
    ReadOnly,
    /// 2 (WE): reads from the PCI bus, writes to RAM.
    WriteOnly,
    /// 3: RAM.
    Ram,
}

impl PamMode {
    fn from_bits(bits: u8) -> Self {
        match bits & 3 {
            0 => PamMode::Pci,
            1 => PamMode::ReadOnly,
            2 => PamMode::WriteOnly,
            _ => PamMode::Ram,
        }
    }
    fn reads_ram(self) -> bool {
        matches!(self, PamMode::ReadOnly | PamMode::Ram)
    }
    fn writes_ram(self) -> bool {
        matches!(self, PamMode::WriteOnly | PamMode::Ram)
    }
}

/// Segment `i`'s first address and size (QEMU's `init_pam` calls in `i440fx_init`).
pub fn pam_segment(i: usize) -> (u64, u64) {
    if i == 0 {
        (0xf_0000, 0x1_0000)
    } else {
        (PAM_START + (i as u64 - 1) * 0x4000, 0x4000)
    }
}

/// The segment of address `addr` in 0xc0000-0xfffff.
fn segment_of(addr: u64) -> usize {
    if addr >= 0xf_0000 {
        0
    } else {
        1 + ((addr - PAM_START) / 0x4000) as usize
    }
}

/// The modes the registers 0x59-0x5f select (QEMU's `i440fx_update_memory_mappings`:
/// segment 0 is the high nibble of 0x59, segment i the low (odd i) or high (even i)
/// nibble of 0x59 + ceil(i / 2)).
pub fn pam_modes(regs: &[u8; I440FX_PAM_SIZE]) -> [PamMode; PAM_SEGMENTS] {
    std::array::from_fn(|i| {
        let reg = regs[i.div_ceil(2)];
        let shift = if i % 2 == 1 { 0 } else { 4 };
        PamMode::from_bits(reg >> shift)
    })
}

struct Segment {
    mode: PamMode,
    slot: Option<SlotId>,
}

struct PamState {
    ram: Arc<GuestMemoryMmap>,
    /// Writes through the `pam` region bypass KVM's dirty log.
    dirty: Arc<crate::core::dirty_log::DirtyTracker>,
    rom: Arc<dyn IsaBios>,
    segments: Mutex<Vec<Segment>>,
}

/// The PAM of one i440FX, over the machine's low RAM and firmware ROM.
pub struct Pam {
    state: Arc<PamState>,
    accel: AccelOpsRef,
}

/// Errors of setting up the PAM.
#[derive(Debug, thiserror::Error)]
pub enum PamError {
    /// RAM does not reach 1 MiB, so there is nothing to shadow.
    #[error("firmware boot needs at least 1 MiB of RAM")]
    NoShadowRam,
    /// No accelerator to map slots with.
    #[error("no accelerator is initialised")]
    NoAccelerator,
    /// The accelerator refused a slot.
    #[error("PAM: {0}")]
    Slot(qom::Error),
    /// The `pam` region overlaps another.
    #[error(transparent)]
    Region(#[from] MemoryError),
}

impl Pam {
    /// Maps the 13 segments in their reset mode (all PCI: the CPU sees the ROM's copy)
    /// and the `pam` region that serves what the slots do not.
    pub fn new(services: &MachineServices, rom: Arc<dyn IsaBios>) -> Result<Self, PamError> {
        let ram = services.ram();
        ram.get_host_address(GuestAddress(PAM_END - 1))
            .map_err(|_| PamError::NoShadowRam)?;
        let accel = services.accel_ops().ok_or(PamError::NoAccelerator)?.clone();
        let state = Arc::new(PamState {
            ram,
            dirty: services.dirty_tracker().clone(),
            rom,
            segments: Mutex::new(Vec::new()),
        });
        let pam = Pam { state, accel };
        {
            let mut segments = pam.state.segments.lock();
            for i in 0..PAM_SEGMENTS {
                let slot = pam.map_segment(i, PamMode::Pci)?;
                segments.push(Segment {
                    mode: PamMode::Pci,
                    slot,
                });
            }
        }
        services.system_memory().map(
            PAM_START,
            MemoryRegion::new_io_memory("pam", PAM_END - PAM_START, pam.state.clone()),
        )?;
        Ok(pam)
    }

    /// The slot segment `i` needs in `mode`, if any: RAM (writable or not), or the
    /// ROM's copy where the PCI bus shows it.
    fn map_segment(&self, i: usize, mode: PamMode) -> Result<Option<SlotId>, PamError> {
        let (start, size) = pam_segment(i);
        let block = if mode.reads_ram() {
            let host = self
                .state
                .ram
                .get_host_address(GuestAddress(start))
                .map_err(|_| PamError::NoShadowRam)?;
            RamBlock {
                guest_addr: start,
                size,
                host_addr: host as u64,
            }
        } else if start >= self.state.rom.base() {
            RamBlock {
                guest_addr: start,
                size,
                host_addr: self.state.rom.host_addr(start),
            }
        } else {
            // An empty PCI bus: no slot, the `pam` region reads all ones.
            return Ok(None);
        };
        // Only mode 3 lets the guest write the slot; other writes exit to the region.
        let readonly = mode != PamMode::Ram;
        self.accel
            .map_slot(block, readonly)
            .map(Some)
            .map_err(PamError::Slot)
    }

    /// Applies the registers 0x59-0x5f: moves the slots of the segments whose mode
    /// changed. A vCPU touching a segment in between exits to the `pam` region, which
    /// already has the new mode.
    pub fn update(&self, regs: &[u8; I440FX_PAM_SIZE]) {
        let modes = pam_modes(regs);
        let mut segments = self.state.segments.lock();
        for (i, (seg, mode)) in segments.iter_mut().zip(modes).enumerate() {
            if seg.mode == mode {
                continue;
            }
            seg.mode = mode;
            if let Some(slot) = seg.slot.take() {
                if let Err(e) = self.accel.unmap_slot(slot) {
                    log::error!("PAM segment 0x{:x}: {e}", pam_segment(i).0);
                }
            }
            match self.map_segment(i, mode) {
                Ok(slot) => seg.slot = slot,
                Err(e) => log::error!("PAM segment 0x{:x}: {e}", pam_segment(i).0),
            }
        }
    }
}

impl PamState {
    fn mode(&self, addr: u64) -> PamMode {
        self.segments
            .lock()
            .get(segment_of(addr))
            .map_or(PamMode::Pci, |s| s.mode)
    }
}

impl MemoryRegionOps for PamState {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let addr = PAM_START + offset;
        let mode = self.mode(addr);
        if mode.reads_ram() {
            let mut buf = [0u8; 8];
            let len = (size as usize).min(8);
            let _ = self.ram.read_slice(&mut buf[..len], GuestAddress(addr));
            u64::from_le_bytes(buf)
        } else if addr >= self.rom.base() {
            self.rom.read(addr, size)
        } else {
            u64::MAX >> (64 - 8 * size.min(8))
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let addr = PAM_START + offset;
        if self.mode(addr).writes_ram() {
            let len = (size as usize).min(8);
            let _ = self
                .ram
                .write_slice(&value.to_le_bytes()[..len], GuestAddress(addr));
            self.dirty.mark(addr, len as u64);
        }
        // Otherwise the write goes to the PCI bus, where nothing decodes it (ROM).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_select_segments_as_qemu_does() {
        let mut regs = [0u8; I440FX_PAM_SIZE];
        assert!(pam_modes(&regs).iter().all(|&m| m == PamMode::Pci));
        // 0x59's high nibble is 0xf0000; its low nibble is reserved.
        regs[0] = 0x31;
        // 0x5a: 0xc0000 (low nibble), 0xc4000 (high).
        regs[1] = 0x21;
        // 0x5f: 0xe8000, 0xec000.
        regs[6] = 0x13;
        let modes = pam_modes(&regs);
        assert_eq!(modes[0], PamMode::Ram);
        assert_eq!(modes[1], PamMode::ReadOnly);
        assert_eq!(modes[2], PamMode::WriteOnly);
        assert_eq!(modes[11], PamMode::Ram);
        assert_eq!(modes[12], PamMode::ReadOnly);
        assert_eq!(pam_segment(11), (0xe_8000, 0x4000));
        assert_eq!(pam_segment(12), (0xe_c000, 0x4000));
        assert_eq!(segment_of(0xe_c123), 12);
        assert_eq!(segment_of(0xf_ffff), 0);
        assert_eq!(segment_of(0xc_0000), 1);
    }
}
