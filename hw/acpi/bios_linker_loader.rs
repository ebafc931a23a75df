//! QEMU's BIOS linker/loader (`hw/acpi/bios-linker-loader.c`): the `etc/table-loader`
//! fw_cfg file, a list of 128-byte commands that tell the firmware to allocate guest
//! memory for other fw_cfg files (`etc/acpi/tables`, `etc/acpi/rsdp`), patch the pointers
//! between them once it knows where they landed, and fix the checksums the patches broke.
//! SeaBIOS (`romfile_loader_execute`) and OVMF run these commands.

/// fw_cfg file names in commands are NUL-padded to this size (QEMU's
/// `BIOS_LINKER_LOADER_FILESZ`, `FW_CFG_MAX_FILE_PATH`).
pub const LOADER_FILESZ: usize = 56;
/// Every command is this long.
pub const LOADER_ENTRY_SIZE: usize = 128;

const COMMAND_ALLOCATE: u32 = 0x1;
const COMMAND_ADD_POINTER: u32 = 0x2;
const COMMAND_ADD_CHECKSUM: u32 = 0x3;

/// Where the firmware allocates a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocZone {
    /// Anywhere in RAM the firmware reserves (QEMU's `BIOS_LINKER_LOADER_ALLOC_ZONE_HIGH`).
    High = 1,
    /// In the 0xe0000-0xfffff F segment, where the RSDP must be found by scanning.
    Fseg = 2,
}

/// A command that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoaderError {
    /// A file name longer than fw_cfg's.
    #[error("table-loader: file name '{0}' is longer than {max} bytes", max = LOADER_FILESZ - 1)]
    NameTooLong(String),
    /// A pointer width other than 1, 2, 4 or 8 bytes.
    #[error("table-loader: pointer size {0} is not 1, 2, 4 or 8")]
    PointerSize(u8),
}

/// The commands of one `etc/table-loader` (QEMU's `BIOSLinker`).
#[derive(Debug, Default)]
pub struct BiosLinker {
    cmds: Vec<u8>,
}

fn name_field(name: &str) -> Result<[u8; LOADER_FILESZ], LoaderError> {
    if name.len() >= LOADER_FILESZ {
        return Err(LoaderError::NameTooLong(name.to_string()));
    }
    let mut field = [0u8; LOADER_FILESZ];
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(field)
}

impl BiosLinker {
    fn push(&mut self, command: u32, body: &[u8]) {
        let mut entry = [0u8; LOADER_ENTRY_SIZE];
        entry[..4].copy_from_slice(&command.to_le_bytes());
        entry[4..4 + body.len()].copy_from_slice(body);
        self.cmds.extend_from_slice(&entry);
    }

    /// QEMU's `bios_linker_loader_alloc`: the firmware allocates `file`, `align`-byte
    /// aligned, in `zone`, and loads it there.
    pub fn alloc(&mut self, file: &str, align: u32, zone: AllocZone) -> Result<(), LoaderError> {
        let mut body = name_field(file)?.to_vec();
        body.extend_from_slice(&align.to_le_bytes());
        body.push(zone as u8);
        self.push(COMMAND_ALLOCATE, &body);
        Ok(())
    }

    /// QEMU's `bios_linker_loader_add_pointer`: adds the address where `src_file` was
    /// loaded to the `size`-byte little-endian value at `dst_offset` in `dst_file` (which
    /// holds the offset of the pointed-to data within `src_file`).
    pub fn add_pointer(
        &mut self,
        dst_file: &str,
        dst_offset: u32,
        size: u8,
        src_file: &str,
    ) -> Result<(), LoaderError> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(LoaderError::PointerSize(size));
        }
        let mut body = name_field(dst_file)?.to_vec();
        body.extend_from_slice(&name_field(src_file)?);
        body.extend_from_slice(&dst_offset.to_le_bytes());
        body.push(size);
        self.push(COMMAND_ADD_POINTER, &body);
        Ok(())
    }

    /// QEMU's `bios_linker_loader_add_checksum`: the firmware subtracts the byte sum of
    /// `file[start..start + length]` from the checksum byte at `checksum_offset`, so the
    /// range sums to 0 again after the pointers in it were patched.
    pub fn add_checksum(
        &mut self,
        file: &str,
        start: u32,
        length: u32,
        checksum_offset: u32,
    ) -> Result<(), LoaderError> {
        let mut body = name_field(file)?.to_vec();
        body.extend_from_slice(&checksum_offset.to_le_bytes());
        body.extend_from_slice(&start.to_le_bytes());
        body.extend_from_slice(&length.to_le_bytes());
        self.push(COMMAND_ADD_CHECKSUM, &body);
        Ok(())
    }

    /// The `etc/table-loader` contents.
    pub fn into_bytes(self) -> Vec<u8> {
        self.cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_qemus_layout() {
        let mut linker = BiosLinker::default();
        linker.alloc("etc/acpi/rsdp", 16, AllocZone::Fseg).unwrap();
        linker
            .add_pointer("etc/acpi/rsdp", 24, 8, "etc/acpi/tables")
            .unwrap();
        linker.add_checksum("etc/acpi/rsdp", 0, 20, 8).unwrap();
        let b = linker.into_bytes();
        assert_eq!(b.len(), 3 * LOADER_ENTRY_SIZE);
        assert_eq!(&b[0..4], &[1, 0, 0, 0]);
        assert_eq!(&b[4..17], b"etc/acpi/rsdp");
        assert_eq!(&b[60..64], &16u32.to_le_bytes());
        assert_eq!(b[64], 2);
        let p = &b[128..256];
        assert_eq!(&p[0..4], &[2, 0, 0, 0]);
        assert_eq!(&p[60..75], b"etc/acpi/tables");
        assert_eq!(&p[116..120], &24u32.to_le_bytes());
        assert_eq!(p[120], 8);
        let c = &b[256..384];
        assert_eq!(&c[0..4], &[3, 0, 0, 0]);
        assert_eq!(&c[60..64], &8u32.to_le_bytes());
        assert_eq!(&c[64..68], &0u32.to_le_bytes());
        assert_eq!(&c[68..72], &20u32.to_le_bytes());
        assert!(linker_errors_are_refused());
    }

    fn linker_errors_are_refused() -> bool {
        let mut linker = BiosLinker::default();
        let long = "x".repeat(LOADER_FILESZ);
        matches!(linker.alloc(&long, 1, AllocZone::High), Err(LoaderError::NameTooLong(_)))
            && matches!(
                linker.add_pointer("a", 0, 3, "b"),
                Err(LoaderError::PointerSize(3))
            )
    }
}
