//! The PC's system firmware (QEMU's `hw/i386/pc_sysfw.c`, its `-bios` path
//! `x86_bios_rom_init`): the image is ROM at the top of the 4 GiB space, where the CPU's
//! reset vector (0xfffffff0) lands, and its last 128 KiB also appear below 1 MiB
//! (`isa-bios`, 0xe0000-0xfffff), where the PAM registers decide whether the CPU sees it
//! or the shadow RAM there (see `pci_host::pam`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress};

use crate::core::accel_ops::RamBlock;
use crate::core::memory::{MemoryError, MemoryRegion, MemoryRegionOps};
use crate::core::services::MachineServices;

/// QEMU's default firmware for the PC: SeaBIOS built for 256 KiB.
pub const DEFAULT_BIOS: &str = "bios-256k.bin";

/// The largest image: the 16 MiB below 4 GiB that the PC decodes as firmware.
pub const MAX_BIOS_SIZE: u64 = 16 << 20;

/// Below 1 MiB the last 128 KiB at most of the image show (QEMU's `isa-bios`).
pub const ISA_BIOS_MAX: u64 = 128 << 10;

/// Why the firmware cannot be loaded: QEMU says "could not load PC BIOS" and why.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// No `-bios`, and the default image is in none of the usual places.
    #[error("could not load PC BIOS '{DEFAULT_BIOS}': not found in /usr/share/seabios or /usr/share/qemu (install Debian's 'seabios' package, or give -bios FILE)")]
    DefaultMissing,
    /// The file cannot be read.
    #[error("could not load PC BIOS '{path}': {reason}")]
    Read {
        /// The image.
        path: String,
        /// `strerror` of the failure.
        reason: String,
    },
    /// An empty file.
    #[error("could not load PC BIOS '{0}': the file is empty")]
    Empty(String),
    /// A size the PC's ROM cannot hold: not whole 64 KiB blocks (a truncated image).
    #[error("could not load PC BIOS '{path}': its size ({size} bytes) is not a multiple of 64 KiB (a truncated image?)")]
    NotBlocks {
        /// The image.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Larger than the ROM window below 4 GiB.
    #[error("could not load PC BIOS '{path}': its size ({size} bytes) is larger than the 16 MiB ROM window below 4 GiB")]
    TooLarge {
        /// The image.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The host would not give memory for the ROM.
    #[error("could not load PC BIOS '{path}': cannot allocate the ROM: {reason}")]
    Allocation {
        /// The image.
        path: String,
        /// Why.
        reason: String,
    },
    /// The accelerator refused to map the ROM.
    #[error("could not map PC BIOS '{path}': {source}")]
    Map {
        /// The image.
        path: String,
        /// Why.
        source: qom::Error,
    },
    /// The ROM's region overlaps another.
    #[error(transparent)]
    Region(#[from] MemoryError),
}

/// The firmware image as ROM: host memory the guest reads through read-only slots.
pub struct FirmwareRom {
    /// The image, mapped at the top of 4 GiB.
    region: GuestRegionMmap,
    size: u64,
}

impl FirmwareRom {
    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the image starts in the guest (it ends at 4 GiB).
    pub fn base(&self) -> u64 {
        (1u64 << 32) - self.size
    }

    /// The host address of the image's byte `offset`, for the accelerator's slots.
    pub fn host_addr(&self, offset: u64) -> u64 {
        self.region.as_ptr() as u64 + offset
    }

    /// Where the `isa-bios` copy below 1 MiB starts: 0xe0000, or higher for an image
    /// smaller than 128 KiB.
    pub fn isa_bios_base(&self) -> u64 {
        0x10_0000 - self.size.min(ISA_BIOS_MAX)
    }

    /// Reads `size` bytes (up to 8) at image offset `offset`, little-endian; all ones
    /// past the end.
    pub fn read(&self, offset: u64, size: u32) -> u64 {
        let mut buf = [0xffu8; 8];
        let len = (size as usize).min(8);
        let _ = self
            .region
            .read_slice(&mut buf[..len], MemoryRegionAddress(offset));
        u64::from_le_bytes(buf) & all_ones(size)
    }

    /// The image offset shown at guest address `addr` of the `isa-bios` copy: the copy
    /// is the image's last 128 KiB (or all of a smaller one).
    fn isa_offset(&self, addr: u64) -> u64 {
        addr - self.isa_bios_base() + (self.size - self.size.min(ISA_BIOS_MAX))
    }

    /// Reads the `isa-bios` copy at guest address `addr` (below 1 MiB).
    pub fn read_isa(&self, addr: u64, size: u32) -> u64 {
        self.read(self.isa_offset(addr), size)
    }
}

fn all_ones(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

impl crate::pci_host::pam::IsaBios for FirmwareRom {
    fn base(&self) -> u64 {
        self.isa_bios_base()
    }
    fn host_addr(&self, addr: u64) -> u64 {
        self.host_addr(self.isa_offset(addr))
    }
    fn read(&self, addr: u64, size: u32) -> u64 {
        self.read_isa(addr, size)
    }
}

/// The ROM's region at the top of 4 GiB: the accelerator serves reads from its read-only
/// slot, so only writes (dropped: it is ROM) and qtest's accesses come here.
struct RomOps(Arc<FirmwareRom>);

impl MemoryRegionOps for RomOps {
    fn read(&self, offset: u64, size: u32) -> u64 {
        self.0.read(offset, size)
    }
    fn write(&self, _offset: u64, _value: u64, _size: u32) {}
}

/// The image `-bios` names, or the default one searched where Debian installs it. A name
/// without a slash is also searched there, as QEMU searches its data directories.
pub fn find_firmware(bios: Option<&str>) -> Result<PathBuf, FirmwareError> {
    // Debian's `seabios` package (first) and QEMU's own data directory.
    let search = crate::core::datadir::find_data_file;
    match bios {
        None => search(DEFAULT_BIOS).ok_or(FirmwareError::DefaultMissing),
        Some(name) if !name.contains('/') && !Path::new(name).exists() => {
            Ok(search(name).unwrap_or_else(|| PathBuf::from(name)))
        }
        Some(name) => Ok(PathBuf::from(name)),
    }
}

/// Checks an image's size as the PC's ROM needs it.
pub fn check_firmware_size(path: &str, size: u64) -> Result<(), FirmwareError> {
    if size == 0 {
        return Err(FirmwareError::Empty(path.to_string()));
    }
    if !size.is_multiple_of(64 << 10) {
        return Err(FirmwareError::NotBlocks {
            path: path.to_string(),
            size,
        });
    }
    if size > MAX_BIOS_SIZE {
        return Err(FirmwareError::TooLarge {
            path: path.to_string(),
            size,
        });
    }
    Ok(())
}

/// QEMU's `x86_bios_rom_init`: reads the image and maps it read-only at the top of 4 GiB.
/// The copy below 1 MiB is the PAM's to map.
pub fn pc_system_firmware_init(
    services: &MachineServices,
    path: &Path,
) -> Result<Arc<FirmwareRom>, FirmwareError> {
    let name = path.display().to_string();
    let read_error = |e: &std::io::Error| FirmwareError::Read {
        path: name.clone(),
        reason: crate::core::os_error::strerror(e),
    };
    // Check the size before reading, so a huge file is not read just to be refused.
    let size = std::fs::metadata(path).map_err(|e| read_error(&e))?.len();
    check_firmware_size(&name, size)?;
    let bytes = std::fs::read(path).map_err(|e| read_error(&e))?;
    // The file may have changed in between: check what was read.
    check_firmware_size(&name, bytes.len() as u64)?;
    let size = bytes.len() as u64;
    let base = (1u64 << 32) - size;
    let region = GuestRegionMmap::from_range(GuestAddress(base), bytes.len(), None).map_err(|e| {
        FirmwareError::Allocation {
            path: name.clone(),
            reason: e.to_string(),
        }
    })?;
    region
        .write_slice(&bytes, MemoryRegionAddress(0))
        .map_err(|e| FirmwareError::Allocation {
            path: name.clone(),
            reason: e.to_string(),
        })?;
    let rom = Arc::new(FirmwareRom { region, size });
    let ops = services.accel_ops().ok_or_else(|| FirmwareError::Allocation {
        path: name.clone(),
        reason: "no accelerator is initialised".into(),
    })?;
    ops.map_slot(
        RamBlock {
            guest_addr: base,
            size,
            host_addr: rom.host_addr(0),
        },
        true,
    )
    .map_err(|source| FirmwareError::Map {
        path: name.clone(),
        source,
    })?;
    services
        .system_memory()
        .map(base, MemoryRegion::new_io_memory("pc.bios", size, Arc::new(RomOps(rom.clone()))))?;
    Ok(rom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_the_rom_cannot_hold_are_refused_in_one_line() {
        assert!(check_firmware_size("b", 256 << 10).is_ok());
        assert!(check_firmware_size("b", 64 << 10).is_ok());
        assert_eq!(
            check_firmware_size("b", 0).unwrap_err().to_string(),
            "could not load PC BIOS 'b': the file is empty"
        );
        assert!(matches!(
            check_firmware_size("b", (256 << 10) - 512),
            Err(FirmwareError::NotBlocks { .. })
        ));
        assert!(matches!(
            check_firmware_size("b", 32 << 20),
            Err(FirmwareError::TooLarge { .. })
        ));
        assert!(!FirmwareError::DefaultMissing.to_string().contains('\n'));
        assert!(FirmwareError::DefaultMissing.to_string().contains("'seabios'"));
    }
}
