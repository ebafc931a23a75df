//! ELF32 Multiboot v1 kernels, built by hand for the loader tests.
//!
//! File layout: the ELF header (52 bytes), one program header (32 bytes), the Multiboot
//! header at [`MB_HEADER_OFF`], the code (the entry point) at [`CODE_OFF`], the data at
//! [`Elf32Kernel::data_off`].

/// File offset of the Multiboot header.
pub const MB_HEADER_OFF: usize = 84;
/// File offset of the code, where execution starts.
pub const CODE_OFF: usize = 96;

/// `p_flags` bits.
pub const PF_X: u32 = 1;
/// Writable.
pub const PF_W: u32 = 2;
/// Readable.
pub const PF_R: u32 = 4;

/// The Multiboot v1 header magic (spelled out here, not taken from the loader under test).
const MULTIBOOT_HEADER_MAGIC: u32 = 0x1bad_b002;
/// Page-align modules + memory info.
const MULTIBOOT_HEADER_FLAGS: u32 = 0b11;

/// An i386 `ET_EXEC` with one `PT_LOAD` segment that holds the whole file (plus `bss`
/// bytes of BSS), and a Multiboot v1 header asking for page-aligned modules and memory
/// information. The entry point is the code: `vaddr + CODE_OFF`.
pub struct Elf32Kernel<'a> {
    /// The address the segment is linked at (`p_vaddr`).
    pub vaddr: u32,
    /// The address it is loaded at (`p_paddr`).
    pub paddr: u32,
    /// `p_flags` (`PF_R | PF_X`, ...).
    pub flags: u32,
    /// BSS bytes after the file (`p_memsz - p_filesz`).
    pub bss: u32,
    /// File offset of `data`; the code must fit between [`CODE_OFF`] and it.
    pub data_off: usize,
    pub code: &'a [u8],
    pub data: &'a [u8],
}

fn put32(f: &mut [u8], at: usize, v: u32) {
    f[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

impl Elf32Kernel<'_> {
    /// The file's bytes.
    pub fn build(&self) -> Vec<u8> {
        let (code, data, data_off) = (self.code, self.data, self.data_off);
        assert!(
            CODE_OFF + code.len() <= data_off,
            "code too long: {} bytes",
            code.len()
        );
        let mut f = vec![0u8; data_off + data.len()];
        f[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1]); // ELFCLASS32, LSB
        put16(&mut f, 16, 2); // ET_EXEC
        put16(&mut f, 18, 3); // EM_386
        put32(&mut f, 20, 1); // EV_CURRENT
        put32(&mut f, 24, self.vaddr + CODE_OFF as u32); // e_entry
        put32(&mut f, 28, 52); // e_phoff
        put16(&mut f, 40, 52); // e_ehsize
        put16(&mut f, 42, 32); // e_phentsize
        put16(&mut f, 44, 1); // e_phnum
        put16(&mut f, 46, 40); // e_shentsize
        let len = f.len() as u32;
        // PT_LOAD: p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align.
        let phdr = [
            1,
            0,
            self.vaddr,
            self.paddr,
            len,
            len + self.bss,
            self.flags,
            0x1000,
        ];
        let (magic, flags) = (MULTIBOOT_HEADER_MAGIC, MULTIBOOT_HEADER_FLAGS);
        let mb_header = [magic, flags, 0u32.wrapping_sub(magic).wrapping_sub(flags)];
        for (i, v) in phdr.into_iter().enumerate() {
            put32(&mut f, 52 + 4 * i, v);
        }
        for (i, v) in mb_header.into_iter().enumerate() {
            put32(&mut f, MB_HEADER_OFF + 4 * i, v);
        }
        f[CODE_OFF..CODE_OFF + code.len()].copy_from_slice(code);
        f[data_off..].copy_from_slice(data);
        f
    }
}

/// A 64-bit `ET_EXEC` for x86-64 with one `PT_LOAD` segment holding `code` at physical
/// (and virtual) address `paddr`, which is also the entry point: what the direct Linux
/// loader takes as an uncompressed kernel.
pub fn elf64_exec(code: &[u8], paddr: u64) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little endian
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut e[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&(PF_R | PF_X).to_le_bytes());
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(code);
    e
}
