//! Multiboot (version 1) kernel loading, as QEMU's `hw/i386/multiboot.c` does for `-kernel`
//! with a Multiboot image: kvm-unit-tests and many small test kernels are Multiboot ELF32
//! files.
//!
//! The kernel must carry a Multiboot header (magic 0x1BADB002, flags, checksum making the
//! sum 0) 4-byte aligned in its first 8192 bytes. Without flag bit 16 the image is an ELF32
//! file: its `PT_LOAD` segments are loaded at their physical addresses (`p_paddr`), the
//! bytes between `p_filesz` and `p_memsz` are zeroed, and the entry is `e_entry` (translated
//! to a physical address when it lies in an executable segment whose `p_vaddr` differs from
//! its `p_paddr`, as QEMU's ELF loader does). With bit 16 (the "a.out kludge") the header's
//! `header_addr`, `load_addr`, `load_end_addr`, `bss_end_addr` and `entry_addr` say where
//! the file goes, whatever its format; QEMU's checks and messages are kept. x86-64 ELF files
//! without the a.out kludge are refused, as QEMU refuses them.
//!
//! # Where the loader puts things
//!
//! * `0x9000..0xa000` ([`MULTIBOOT_INFO_ADDR`]), below 1 MiB as in QEMU (whose option ROM
//!   builds the info at 0x9000): the Multiboot information structure (at 0x9000, 0x80
//!   bytes reserved), the boot loader name (0x9080), the GDT the entry segments come from
//!   (0x90c0: null, 0x08 flat 32-bit code, 0x10 flat 32-bit data, like QEMU's
//!   `multiboot.S`), and the memory map (from 0x9100, at most [`MULTIBOOT_MAX_E820`]
//!   entries). A kernel whose load range overlaps this page is refused.
//! * From the first page boundary after the kernel's highest address, as QEMU lays out its
//!   `mb_buf`: the module list (16 bytes per module), the kernel command line and the
//!   module strings (NUL-terminated); then each module, page-aligned, in order.
//!
//! Everything must lie in usable (type 1) RAM of the memory map, below 4 GiB.
//!
//! # The information structure
//!
//! Flags MEM | BOOTDEV | CMDLINE | MODS | MMAP | LOADER_NAME (0x24f), as QEMU sets them.
//! `mem_lower` = 640, `mem_upper` = KiB of usable RAM from 1 MiB to the first hole (QEMU:
//! below-4G RAM minus 1 MiB), `boot_device` = 0x8000ffff, `cmdline` = "<kernel path>
//! <append>" (QEMU passes the file name first), `mods` = one entry per module (start, end
//! exclusive, string = the module's command line: QEMU's `-initrd "file args,file2"`
//! entries, see [`multiboot_split_initrd`]), the memory map in e820 format (each entry
//! preceded by its size, 20), and the boot loader name "qomvm".
//!
//! # Entry state (the [`X86BootState`] returned)
//!
//! 32-bit protected mode, paging off: CR0 = PE | ET (0x11), CR4 = 0, EFER = 0; CS = 0x08
//! (flat 4 GiB code, 32-bit), DS = ES = FS = GS = SS = 0x10 (flat 4 GiB data), all as KVM
//! segment registers matching the GDT written at 0x90c0; EAX = 0x2BADB002, EBX = the info
//! address, EIP = the entry, ESP = 0x9000 (Multiboot leaves it undefined; this is just
//! below the info), EFLAGS = 0x2 (interrupts off). IDTR = base 0, limit 0x3ff (the real-mode
//! table QEMU's option ROM leaves). The local APIC is enabled at 0xfee00000 with the BSP
//! flag (`apic_base` = 0xfee00900): the state is meant for the boot CPU only; other CPUs
//! keep their reset state and wait for INIT/SIPI.

use crate::i386::e820::{pc_e820_table, E820Entry, E820Kind};
use kvm_bindings::{kvm_dtable, kvm_segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::i386::x86_cpu::X86BootState;

/// The header magic.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1bad_b002;
/// What EAX holds at the kernel's entry.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must end within this many bytes of the file's start.
pub const MULTIBOOT_SEARCH: usize = 8192;
/// How much of a kernel file [`is_multiboot`] needs: the search area and a header at its
/// end with every field.
pub const MULTIBOOT_HEADER_AREA: u64 = MULTIBOOT_SEARCH as u64 + 48;
/// Header flag: modules must be page-aligned (they always are here).
pub const MULTIBOOT_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: the kernel wants memory information (always given).
pub const MULTIBOOT_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: the kernel wants video mode information (not supported, as in QEMU).
pub const MULTIBOOT_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the a.out kludge (load addresses in the header).
pub const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;

/// Info flag: `mem_lower`, `mem_upper`.
pub const MULTIBOOT_INFO_MEMORY: u32 = 1 << 0;
/// Info flag: `boot_device`.
pub const MULTIBOOT_INFO_BOOTDEV: u32 = 1 << 1;
/// Info flag: `cmdline`.
pub const MULTIBOOT_INFO_CMDLINE: u32 = 1 << 2;
/// Info flag: `mods_count`, `mods_addr`.
pub const MULTIBOOT_INFO_MODS: u32 = 1 << 3;
/// Info flag: `mmap_length`, `mmap_addr`.
pub const MULTIBOOT_INFO_MEM_MAP: u32 = 1 << 6;
/// Info flag: `boot_loader_name`.
pub const MULTIBOOT_INFO_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Guest-physical address of the information structure (and start of the loader's page).
pub const MULTIBOOT_INFO_ADDR: u64 = 0x9000;
/// Guest-physical address of the boot loader name.
pub const MULTIBOOT_LOADER_NAME_ADDR: u64 = 0x9080;
/// Guest-physical address of the GDT (3 entries).
pub const MULTIBOOT_GDT_ADDR: u64 = 0x90c0;
/// Guest-physical address of the memory map.
pub const MULTIBOOT_MMAP_ADDR: u64 = 0x9100;
/// End of the loader's page.
const MULTIBOOT_AREA_END: u64 = 0xa000;
/// Most memory-map entries that fit in the loader's page.
pub const MULTIBOOT_MAX_E820: usize = ((MULTIBOOT_AREA_END - MULTIBOOT_MMAP_ADDR) / 24) as usize;
/// Code selector at entry.
pub const MULTIBOOT_CODE_SELECTOR: u16 = 0x08;
/// Data selector at entry.
pub const MULTIBOOT_DATA_SELECTOR: u16 = 0x10;
/// The boot loader name given to the kernel.
pub const MULTIBOOT_LOADER_NAME: &str = "qomvm";
/// QEMU's `boot_device` value.
pub const MULTIBOOT_BOOT_DEVICE: u32 = 0x8000_ffff;

/// Offsets in the information structure.
const MBI_FLAGS: usize = 0;
const MBI_MEM_LOWER: usize = 4;
const MBI_MEM_UPPER: usize = 8;
const MBI_BOOT_DEVICE: usize = 12;
const MBI_CMDLINE: usize = 16;
const MBI_MODS_COUNT: usize = 20;
const MBI_MODS_ADDR: usize = 24;
const MBI_MMAP_LENGTH: usize = 44;
const MBI_MMAP_ADDR: usize = 48;
const MBI_BOOT_LOADER_NAME: usize = 64;
const MBI_SIZE: usize = 0x80;
const MB_MOD_SIZE: u64 = 16;
const PAGE_SIZE: u64 = 0x1000;
const FOUR_GIB: u64 = 1 << 32;

/// Splits QEMU's Multiboot `-initrd` argument into modules: entries are separated by `,`
/// (`,,` is a literal comma); each entry is the module's command line, and its first word is
/// the file to load. Returns `(path, cmdline)` pairs.
pub fn multiboot_split_initrd(arg: &str) -> Vec<(String, String)> {
    crate::core::qemu_opts::split_commas(arg)
        .into_iter()
        .filter(|e| !e.is_empty())
        .map(|cmdline| {
            let path = cmdline.split(' ').next().unwrap_or("").to_string();
            (path, cmdline)
        })
        .collect()
}

/// Errors of loading a Multiboot kernel.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    /// No valid Multiboot header: the caller tries another format (Linux).
    #[error("not a Multiboot kernel")]
    NotMultiboot,
    /// The file ends before something its headers describe.
    #[error("Multiboot kernel is truncated: {0}")]
    Truncated(&'static str),
    /// An ELF file qomvm cannot load.
    #[error("Error while loading elf kernel: {0}")]
    BadElf(&'static str),
    /// A 64-bit ELF without the a.out kludge (QEMU's message).
    #[error("Cannot load x86-64 image, give a 32bit one.")]
    Elf64,
    /// Bad a.out-kludge addresses (QEMU's messages: "invalid load_addr address"...).
    #[error("{0}")]
    BadAoutHeader(&'static str),
    /// A part of the kernel outside usable RAM below 4 GiB.
    #[error("kernel segment at 0x{addr:x} (0x{size:x} bytes) is outside usable RAM")]
    SegmentOutsideRam {
        /// First address.
        addr: u64,
        /// Size in bytes.
        size: u64,
    },
    /// The kernel overlaps the page the loader keeps for the boot information.
    #[error("kernel segment at 0x{addr:x} (0x{size:x} bytes) overlaps the Multiboot info at 0x{info:x}", info = MULTIBOOT_INFO_ADDR)]
    Overlap {
        /// First address.
        addr: u64,
        /// Size in bytes.
        size: u64,
    },
    /// A module does not fit in RAM after the kernel.
    #[error("initrd '{name}' ({size} bytes) does not fit in RAM below 0x{limit:x}")]
    InitrdTooLarge {
        /// The module's command line.
        name: String,
        /// Its size.
        size: u64,
        /// End of the usable RAM it had to fit in.
        limit: u64,
    },
    /// The module list and command lines do not fit in RAM after the kernel.
    #[error("Multiboot command lines ({0} bytes) do not fit in RAM")]
    NoSpace(u64),
    /// More memory-map entries than fit in the loader's page.
    #[error("memory map of {0} entries is too large (at most {MULTIBOOT_MAX_E820})")]
    TooManyE820(usize),
    /// Writing guest memory failed.
    #[error("cannot write the Multiboot kernel to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A parsed Multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootHeader {
    /// File offset of the magic.
    pub offset: usize,
    /// Header flags.
    pub flags: u32,
    /// a.out kludge fields (`header_addr`, `load_addr`, `load_end_addr`, `bss_end_addr`,
    /// `entry_addr`), when flag bit 16 is set.
    pub aout: Option<[u32; 5]>,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Finds the Multiboot header: the first 4-byte aligned magic in the first 8192 bytes whose
/// checksum is right. `NotMultiboot` when there is none; `Truncated` when the a.out-kludge
/// fields run past the end of the file.
pub fn multiboot_find_header(kernel: &[u8]) -> Result<MultibootHeader, MultibootError> {
    let limit = kernel.len().min(MULTIBOOT_SEARCH);
    let offset = (0..limit.saturating_sub(11))
        .step_by(4)
        .find(|&i| {
            let magic = le32(kernel, i).unwrap_or(0);
            let flags = le32(kernel, i + 4).unwrap_or(0);
            let checksum = le32(kernel, i + 8).unwrap_or(0);
            magic == MULTIBOOT_HEADER_MAGIC
                && magic.wrapping_add(flags).wrapping_add(checksum) == 0
        })
        .ok_or(MultibootError::NotMultiboot)?;
    let flags = le32(kernel, offset + 4).ok_or(MultibootError::NotMultiboot)?;
    let aout = if flags & MULTIBOOT_AOUT_KLUDGE != 0 {
        let mut fields = [0u32; 5];
        for (i, f) in fields.iter_mut().enumerate() {
            *f = le32(kernel, offset + 12 + 4 * i)
                .ok_or(MultibootError::Truncated("a.out kludge fields"))?;
        }
        Some(fields)
    } else {
        None
    };
    Ok(MultibootHeader {
        offset,
        flags,
        aout,
    })
}

/// Whether `kernel` has a Multiboot header (QEMU tries Multiboot before Linux).
pub fn is_multiboot(kernel: &[u8]) -> bool {
    multiboot_find_header(kernel).is_ok()
}

/// A piece of the kernel to put in guest memory: file bytes then zeros.
struct Chunk<'a> {
    addr: u64,
    data: &'a [u8],
    zeros: u64,
}

impl Chunk<'_> {
    fn size(&self) -> u64 {
        self.data.len() as u64 + self.zeros
    }
}

/// The kernel image laid out: its chunks, the end of its highest one, and its entry.
struct KernelLayout<'a> {
    chunks: Vec<Chunk<'a>>,
    entry: u32,
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const EM_X86_64: u16 = 62;

fn elf_layout(kernel: &[u8]) -> Result<KernelLayout<'_>, MultibootError> {
    if kernel.get(..4) != Some(b"\x7fELF") {
        return Err(MultibootError::BadElf("not an ELF file (and no a.out kludge)"));
    }
    let class = *kernel.get(4).ok_or(MultibootError::Truncated("ELF header"))?;
    let machine = le16(kernel, 18).ok_or(MultibootError::Truncated("ELF header"))?;
    if machine == EM_X86_64 || class == 2 {
        return Err(MultibootError::Elf64);
    }
    if class != 1 {
        return Err(MultibootError::BadElf("unknown ELF class"));
    }
    if kernel.get(5) != Some(&1) {
        return Err(MultibootError::BadElf("not little-endian"));
    }
    let (Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (
        le32(kernel, 24),
        le32(kernel, 28),
        le16(kernel, 42),
        le16(kernel, 44),
    ) else {
        return Err(MultibootError::Truncated("ELF header"));
    };
    if usize::from(phentsize) < 32 {
        return Err(MultibootError::BadElf("program header entries too small"));
    }
    let mut chunks = Vec::new();
    let mut entry_phys = entry;
    for i in 0..usize::from(phnum) {
        let at = (phoff as usize)
            .checked_add(i * usize::from(phentsize))
            .ok_or(MultibootError::Truncated("program headers"))?;
        let field = |n: usize| le32(kernel, at + 4 * n).ok_or(MultibootError::Truncated("program headers"));
        let (p_type, p_offset, p_vaddr, p_paddr) = (field(0)?, field(1)?, field(2)?, field(3)?);
        let (p_filesz, p_memsz, p_flags) = (field(4)?, field(5)?, field(6)?);
        if p_type != PT_LOAD || p_memsz == 0 {
            continue;
        }
        if p_filesz > p_memsz {
            return Err(MultibootError::BadElf("segment file size exceeds its memory size"));
        }
        let data = kernel
            .get(p_offset as usize..p_offset as usize + p_filesz as usize)
            .ok_or(MultibootError::Truncated("segment data"))?;
        // The ELF entry is virtual; QEMU's loader translates it within the executable
        // segment that holds it.
        if p_vaddr != p_paddr
            && p_flags & PF_X != 0
            && entry >= p_vaddr
            && u64::from(entry) < u64::from(p_vaddr) + u64::from(p_filesz)
        {
            entry_phys = entry - p_vaddr + p_paddr;
        }
        chunks.push(Chunk {
            addr: u64::from(p_paddr),
            data,
            zeros: u64::from(p_memsz - p_filesz),
        });
    }
    if chunks.is_empty() {
        return Err(MultibootError::BadElf("no loadable segment"));
    }
    Ok(KernelLayout {
        chunks,
        entry: entry_phys,
    })
}

/// QEMU's a.out-kludge checks and layout.
fn aout_layout<'a>(
    kernel: &'a [u8],
    header: &MultibootHeader,
    fields: [u32; 5],
) -> Result<KernelLayout<'a>, MultibootError> {
    let [header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr] = fields;
    let offset = header.offset as u64;
    if header_addr < load_addr {
        return Err(MultibootError::BadAoutHeader("invalid load_addr address"));
    }
    if u64::from(header_addr - load_addr) > offset {
        return Err(MultibootError::BadAoutHeader("invalid header_addr address"));
    }
    let text_offset = offset - u64::from(header_addr - load_addr);
    let load_size = if load_end_addr != 0 {
        if load_end_addr < load_addr {
            return Err(MultibootError::BadAoutHeader("invalid load_end_addr address"));
        }
        u64::from(load_end_addr - load_addr)
    } else {
        (kernel.len() as u64)
            .checked_sub(text_offset)
            .ok_or(MultibootError::BadAoutHeader("invalid kernel_file_size"))?
    };
    if load_size > u64::from(u32::MAX - load_addr) {
        return Err(MultibootError::BadAoutHeader("kernel does not fit in address space"));
    }
    let kernel_size = if bss_end_addr != 0 {
        if u64::from(bss_end_addr) < u64::from(load_addr) + load_size {
            return Err(MultibootError::BadAoutHeader("invalid bss_end_addr address"));
        }
        u64::from(bss_end_addr - load_addr)
    } else {
        load_size
    };
    let data = kernel
        .get(text_offset as usize..(text_offset + load_size) as usize)
        .ok_or(MultibootError::Truncated("a.out load range runs past the end of the file"))?;
    Ok(KernelLayout {
        chunks: vec![Chunk {
            addr: u64::from(load_addr),
            data,
            zeros: kernel_size - load_size,
        }],
        entry: entry_addr,
    })
}

fn usable(e820: &[E820Entry], addr: u64, size: u64) -> bool {
    let Some(end) = addr.checked_add(size) else { return false };
    end <= FOUR_GIB
        && e820
            .iter()
            .any(|e| e.kind == E820Kind::Ram && e.addr <= addr && end <= e.end())
}

/// The end of the usable RAM entry holding `addr` (below 4 GiB).
fn usable_end(e820: &[E820Entry], addr: u64) -> u64 {
    e820.iter()
        .find(|e| e.kind == E820Kind::Ram && e.addr <= addr && addr < e.end())
        .map_or(0, |e| e.end().min(FOUR_GIB))
}

fn align_page(addr: u64) -> u64 {
    (addr + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

fn write_zeros(ram: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), MultibootError> {
    let zeros = [0u8; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        ram.write_slice(&zeros[..n as usize], GuestAddress(addr + done))?;
        done += n;
    }
    Ok(())
}

/// A flat 4 GiB segment of `type_` (0xb: code, 0x3: data) as KVM wants it.
fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The entry state (see the module docs).
fn entry_state(entry: u32) -> X86BootState {
    let mut state = X86BootState::with_segments(
        flat_segment(MULTIBOOT_CODE_SELECTOR, 0xb),
        flat_segment(MULTIBOOT_DATA_SELECTOR, 0x3),
        kvm_dtable {
            base: MULTIBOOT_GDT_ADDR,
            limit: 3 * 8 - 1,
            ..Default::default()
        },
        kvm_dtable {
            base: 0,
            limit: 0x3ff,
            ..Default::default()
        },
        0x11,
    );
    state.regs.rax = u64::from(MULTIBOOT_BOOTLOADER_MAGIC);
    state.regs.rbx = MULTIBOOT_INFO_ADDR;
    state.regs.rip = u64::from(entry);
    state.regs.rsp = MULTIBOOT_INFO_ADDR;
    state
}

/// Loads a Multiboot kernel as QEMU's `load_multiboot` does (see the module docs) and returns
/// the boot CPU's entry state.
///
/// * `ram`, `ram_size`: guest RAM; `e820`: the machine's memory map (the board's, or
///   [`pc_e820_table`]); an empty slice means `pc_e820_table(ram_size, 0)` (all RAM below
///   4 GiB, no PCI hole).
/// * `kernel_path`, `kernel`: the `-kernel` file name (it starts the kernel command line)
///   and its bytes; `cmdline`: the `-append` text.
/// * `modules`: `(cmdline, bytes)` per module: the module string the kernel sees (QEMU:
///   the `-initrd` entry, file name and arguments) and the file's contents.
///
/// Returns [`MultibootError::NotMultiboot`], having written nothing, when the kernel has no
/// Multiboot header. Every check is done before guest memory is written.
pub fn multiboot_load(
    ram: &GuestMemoryMmap,
    ram_size: u64,
    kernel_path: &str,
    kernel: &[u8],
    cmdline: &str,
    modules: &[(&str, &[u8])],
    e820: &[E820Entry],
) -> Result<X86BootState, MultibootError> {
    let header = multiboot_find_header(kernel)?;
    let default_map;
    let e820 = if e820.is_empty() {
        default_map = pc_e820_table(ram_size.min(FOUR_GIB), 0);
        &default_map[..]
    } else {
        e820
    };
    if e820.len() > MULTIBOOT_MAX_E820 {
        return Err(MultibootError::TooManyE820(e820.len()));
    }
    if header.flags & MULTIBOOT_VIDEO_MODE != 0 {
        // QEMU: "multiboot knows VBE. we don't."
        log::warn!("multiboot: the kernel asks for a video mode; none is set up");
    }
    let layout = match header.aout {
        Some(fields) => aout_layout(kernel, &header, fields)?,
        None => elf_layout(kernel)?,
    };
    let mut kernel_end = 0u64;
    for c in &layout.chunks {
        let size = c.size();
        if !usable(e820, c.addr, size) {
            return Err(MultibootError::SegmentOutsideRam { addr: c.addr, size });
        }
        if c.addr < MULTIBOOT_AREA_END && MULTIBOOT_INFO_ADDR < c.addr + size {
            return Err(MultibootError::Overlap { addr: c.addr, size });
        }
        kernel_end = kernel_end.max(c.addr + size);
    }

    // After the kernel: module list, command lines, then the modules.
    let kernel_cmdline = format!("{kernel_path} {cmdline}");
    let mods_addr = align_page(kernel_end);
    let cmdline_addr = mods_addr + MB_MOD_SIZE * modules.len() as u64;
    let strings_len = kernel_cmdline.len() as u64
        + 1
        + modules.iter().map(|(name, _)| name.len() as u64 + 1).sum::<u64>();
    let limit = usable_end(e820, mods_addr.max(kernel_end.saturating_sub(1)));
    let strings_end = cmdline_addr + strings_len;
    if strings_end > limit {
        return Err(MultibootError::NoSpace(strings_end - mods_addr));
    }
    let mut module_addrs = Vec::with_capacity(modules.len());
    let mut next = align_page(strings_end);
    for (name, data) in modules {
        let size = data.len() as u64;
        let fits = matches!(next.checked_add(size), Some(end) if end <= limit);
        if !fits {
            return Err(MultibootError::InitrdTooLarge {
                name: name.to_string(),
                size,
                limit,
            });
        }
        module_addrs.push(next);
        next = align_page(next + size);
    }

    // Checks done: write.
    for c in &layout.chunks {
        ram.write_slice(c.data, GuestAddress(c.addr))?;
        write_zeros(ram, c.addr + c.data.len() as u64, c.zeros)?;
    }
    let mut strings = Vec::with_capacity(strings_len as usize);
    strings.extend_from_slice(kernel_cmdline.as_bytes());
    strings.push(0);
    let mut mod_list = Vec::with_capacity(modules.len() * MB_MOD_SIZE as usize);
    for ((name, data), addr) in modules.iter().zip(&module_addrs) {
        let string_addr = cmdline_addr + strings.len() as u64;
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
        ram.write_slice(data, GuestAddress(*addr))?;
        for v in [*addr, addr + data.len() as u64, string_addr, 0] {
            mod_list.extend_from_slice(&(v as u32).to_le_bytes());
        }
    }
    ram.write_slice(&mod_list, GuestAddress(mods_addr))?;
    ram.write_slice(&strings, GuestAddress(cmdline_addr))?;

    let mut mmap = Vec::with_capacity(e820.len() * 24);
    for e in e820 {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    ram.write_slice(&mmap, GuestAddress(MULTIBOOT_MMAP_ADDR))?;

    let mut name = MULTIBOOT_LOADER_NAME.as_bytes().to_vec();
    name.push(0);
    ram.write_slice(&name, GuestAddress(MULTIBOOT_LOADER_NAME_ADDR))?;

    let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    let gdt: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write_slice(&gdt, GuestAddress(MULTIBOOT_GDT_ADDR))?;

    let mem_upper = usable_end(e820, 0x10_0000).saturating_sub(0x10_0000) / 1024;
    let mut info = [0u8; MBI_SIZE];
    let mut put = |at: usize, v: u32| info[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(
        MBI_FLAGS,
        MULTIBOOT_INFO_MEMORY
            | MULTIBOOT_INFO_BOOTDEV
            | MULTIBOOT_INFO_CMDLINE
            | MULTIBOOT_INFO_MODS
            | MULTIBOOT_INFO_MEM_MAP
            | MULTIBOOT_INFO_BOOT_LOADER_NAME,
    );
    put(MBI_MEM_LOWER, 640);
    put(MBI_MEM_UPPER, mem_upper as u32);
    put(MBI_BOOT_DEVICE, MULTIBOOT_BOOT_DEVICE);
    put(MBI_CMDLINE, cmdline_addr as u32);
    put(MBI_MODS_COUNT, modules.len() as u32);
    put(MBI_MODS_ADDR, mods_addr as u32);
    put(MBI_MMAP_LENGTH, mmap.len() as u32);
    put(MBI_MMAP_ADDR, MULTIBOOT_MMAP_ADDR as u32);
    put(MBI_BOOT_LOADER_NAME, MULTIBOOT_LOADER_NAME_ADDR as u32);
    ram.write_slice(&info, GuestAddress(MULTIBOOT_INFO_ADDR))?;

    Ok(entry_state(layout.entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        for v in [
            MULTIBOOT_HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC).wrapping_sub(flags),
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn the_header_is_found_aligned_within_8_kib_with_its_checksum() {
        let mut k = vec![0u8; 64];
        k.extend(header(0));
        assert_eq!(multiboot_find_header(&k).unwrap().offset, 64);

        let mut unaligned = vec![0u8; 66];
        unaligned.extend(header(0));
        assert!(matches!(
            multiboot_find_header(&unaligned),
            Err(MultibootError::NotMultiboot)
        ));

        let mut bad_sum = vec![0u8; 4];
        bad_sum.extend(header(0));
        bad_sum[12] ^= 1;
        assert!(matches!(
            multiboot_find_header(&bad_sum),
            Err(MultibootError::NotMultiboot)
        ));

        let mut too_far = vec![0u8; MULTIBOOT_SEARCH];
        too_far.extend(header(0));
        assert!(!is_multiboot(&too_far));
        // Ending exactly at 8192 is fine.
        let mut last = vec![0u8; MULTIBOOT_SEARCH - 12];
        last.extend(header(0));
        assert!(is_multiboot(&last));

        assert!(!is_multiboot(b"MZ"));
        assert!(!is_multiboot(&[]));
    }

    #[test]
    fn a_truncated_aout_header_is_an_error_not_a_miss() {
        let mut k = header(MULTIBOOT_AOUT_KLUDGE);
        k.extend_from_slice(&[0; 8]);
        assert!(matches!(
            multiboot_find_header(&k),
            Err(MultibootError::Truncated(_))
        ));
    }

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn load(k: &[u8]) -> Result<X86BootState, MultibootError> {
        multiboot_load(&ram(), 4 << 20, "k", k, "", &[], &[])
    }

    #[test]
    fn bad_images_are_refused_with_qemus_reasons() {
        // No a.out kludge and not ELF.
        let mut k = header(0);
        k.extend_from_slice(&[0; 32]);
        assert!(matches!(load(&k), Err(MultibootError::BadElf(_))));

        // A 64-bit ELF.
        let mut elf64 = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
        elf64.resize(18, 0);
        elf64.extend_from_slice(&EM_X86_64.to_le_bytes());
        elf64.resize(64, 0);
        elf64.extend(header(0));
        let err = load(&elf64).unwrap_err();
        assert_eq!(err.to_string(), "Cannot load x86-64 image, give a 32bit one.");

        // A truncated ELF32 header.
        let mut elf32 = vec![0x7f, b'E', b'L', b'F', 1, 1, 1, 0];
        elf32.extend(header(0));
        assert!(matches!(load(&elf32), Err(MultibootError::Truncated(_))));

        // a.out: header_addr below load_addr.
        let aout = |fields: [u32; 5], pad: usize| {
            let mut k = header(MULTIBOOT_AOUT_KLUDGE);
            for f in fields {
                k.extend_from_slice(&f.to_le_bytes());
            }
            k.resize(k.len() + pad, 0x90);
            k
        };
        let err = load(&aout([0x10_0000, 0x10_0010, 0, 0, 0x10_0000], 16)).unwrap_err();
        assert_eq!(err.to_string(), "invalid load_addr address");
        let err = load(&aout([0x10_0010, 0x10_0000, 0, 0, 0x10_0000], 16)).unwrap_err();
        assert_eq!(err.to_string(), "invalid header_addr address");
        let err = load(&aout([0x10_0000, 0x10_0000, 0xf_0000, 0, 0], 16)).unwrap_err();
        assert_eq!(err.to_string(), "invalid load_end_addr address");
        let err = load(&aout([0x10_0000, 0x10_0000, 0x10_0020, 0x10_0010, 0], 16)).unwrap_err();
        assert_eq!(err.to_string(), "invalid bss_end_addr address");
        // load_end past the end of the file.
        assert!(matches!(
            load(&aout([0x10_0000, 0x10_0000, 0x10_1000, 0, 0x10_0000], 16)),
            Err(MultibootError::Truncated(_))
        ));
        // Beyond RAM (4 MiB) and in the loader's page.
        assert!(matches!(
            load(&aout([0x80_0000, 0x80_0000, 0, 0, 0x80_0000], 16)),
            Err(MultibootError::SegmentOutsideRam { .. })
        ));
        assert!(matches!(
            load(&aout([0x9000, 0x9000, 0, 0, 0x9000], 16)),
            Err(MultibootError::Overlap { .. })
        ));
        // A BSS reaching into the EBDA.
        assert!(matches!(
            load(&aout([0x9_0000, 0x9_0000, 0, 0xa_0000, 0x9_0000], 16)),
            Err(MultibootError::SegmentOutsideRam { .. })
        ));
        // Fine.
        assert!(load(&aout([0x10_0000, 0x10_0000, 0, 0, 0x10_0000], 16)).is_ok());
    }

    #[test]
    fn initrd_entries_split_like_qemu() {
        assert_eq!(
            multiboot_split_initrd("a.bin arg1 arg2,b.bin,,c x"),
            vec![
                ("a.bin".to_string(), "a.bin arg1 arg2".to_string()),
                ("b.bin,c".to_string(), "b.bin,c x".to_string()),
            ]
        );
        assert!(multiboot_split_initrd("").is_empty());
    }
}
