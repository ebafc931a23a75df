//! Direct Linux boot (QEMU's `x86_load_linux` in `hw/i386/x86-common.c`), entering the
//! kernel in 64-bit mode as Firecracker and cloud-hypervisor do rather than through
//! real-mode setup code: the kernel (bzImage or ELF `vmlinux`) is loaded with linux-loader,
//! the zero page, command line, initrd, GDT and identity page tables are written to guest
//! RAM, and the returned [`X86BootState`] starts the boot CPU at the 64-bit entry point.
//! An ELF kernel with a PVH note (Xen's `PHYS32_ENTRY`, which Linux has with `CONFIG_PVH`)
//! is entered through it instead, as QEMU does: 32-bit protected mode, paging off, EBX the
//! `hvm_start_info` (command line, initrd as module 0, memory map, RSDP) in the zero page's
//! place; PVH has no screen information, so such a kernel starts without its VGA console.
//!
//! Guest memory used (all below 1 MiB except the kernel and the initrd):
//!
//! | address | what |
//! | --- | --- |
//! | `0x500..0x520` | GDT: null, code64 (`0x08`), data (`0x10`), TSS (`0x18`) |
//! | `0x520..0x528` | IDT (empty; the kernel installs its own) |
//! | `0x7000..0x8000` | zero page (`struct boot_params`), passed in RSI; or PVH's start info (`0x7000`), module list (`0x7040`), memory map (`0x7080..`), passed in EBX |
//! | `0x8000..0x8ff0` | boot stack (RSP = RBP = `0x8ff0`) |
//! | `0x9000`, `0xa000`, `0xb000` | PML4, PDPT, PD: identity map of the first GiB, 2 MiB pages |
//! | `0x20000..` | command line, NUL-terminated |
//! | `0x100000..` | bzImage protected-mode code (entry `0x100200`); ELF segments at their `p_paddr` |
//! | below the top of RAM under 4 GiB | initrd, page aligned, under `initrd_addr_max` |

use std::fs::File;
use std::io::{self, Read};
use std::mem::size_of;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, screen_info, setup_header, CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH, XLF_KERNEL_64,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::i386::e820::{E820Entry, E820Kind, EBDA_START, FOUR_GIB, HIGH_MEMORY_START};
use crate::i386::x86_cpu::X86BootState;

/// The GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// The (empty) IDT.
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial RSP and RBP.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory (512 2 MiB pages: the first GiB).
pub const PDE_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Where a bzImage's protected-mode code is loaded.
pub const KERNEL_LOAD_ADDR: u64 = HIGH_MEMORY_START;
/// Offset of the 64-bit entry point (`startup_64`) in a bzImage's protected-mode code.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Selectors of the boot GDT (Firecracker's layout).
pub const BOOT_CS: u16 = 0x08;
/// Data selector of the boot GDT.
pub const BOOT_DS: u16 = 0x10;
/// TSS selector of the boot GDT.
pub const BOOT_TSS: u16 = 0x18;

/// `"HdrS"`, the setup header's magic.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Offset of the setup header in a bzImage and in the zero page.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of `acpi_rsdp_addr` in the zero page (boot protocol 2.14).
const ACPI_RSDP_ADDR_OFFSET: u64 = 0x70;
/// `initrd_addr_max` of kernels older than boot protocol 2.03.
const OLD_INITRD_ADDR_MAX: u32 = 0x37ff_ffff;
/// Linux's x86 `COMMAND_LINE_SIZE` less the NUL, for ELF kernels (no header to ask).
const ELF_CMDLINE_MAX: u32 = 2047;
/// `initrd_addr_max` assumed for ELF kernels: what every x86-64 bzImage declares.
const ELF_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;
/// Boot protocol 2.12: `xloadflags` and its `XLF_KERNEL_64` (the 64-bit entry point).
const PROTOCOL_64BIT_ENTRY: u16 = 0x020c;

const PAGE_SIZE: u64 = 0x1000;

/// Why a kernel could not be loaded. The display text is the reason in
/// `qomvm: could not load kernel 'PATH': REASON`.
#[derive(Debug, thiserror::Error)]
pub enum LinuxLoadError {
    /// The kernel file cannot be opened.
    #[error("{}", crate::core::os_error::strerror(.0))]
    Open(io::Error),
    /// The kernel file cannot be read.
    #[error("read error: {}", crate::core::os_error::strerror(.0))]
    Read(io::Error),
    /// Neither a bzImage nor an ELF file.
    #[error("not a Linux bzImage or ELF kernel")]
    NotAKernel,
    /// The file is shorter than its own header says.
    #[error("the kernel image is truncated: {size} bytes, its header describes {expected}")]
    Truncated {
        /// File size.
        size: u64,
        /// Bytes the header describes.
        expected: u64,
    },
    /// A bzImage without the 64-bit entry point (a 32-bit or pre-2.12 kernel).
    #[error("the bzImage has no 64-bit entry point (boot protocol {}.{:02}; qomvm needs 2.12 or later with XLF_KERNEL_64, as built by x86-64 kernels since 3.8)", .0 >> 8, .0 & 0xff)]
    No64BitEntry(u16),
    /// An ELF file that is not a loadable x86-64 kernel.
    #[error("unsupported ELF kernel: {0}")]
    UnsupportedElf(String),
    /// The kernel does not fit in RAM below 4 GiB.
    #[error("the kernel does not fit in guest RAM: it needs memory up to {end:#x}, RAM below 4 GiB ends at {ram_end:#x}")]
    KernelTooLarge {
        /// End of the kernel image in guest memory.
        end: u64,
        /// End of RAM below 4 GiB.
        ram_end: u64,
    },
    /// linux-loader refused the image for a reason not caught above.
    #[error("{0}")]
    Loader(String),
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is too long: {len} bytes, this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("the kernel command line contains a NUL character")]
    CmdlineNul,
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd '{}': {}", .path.display(), crate::core::os_error::strerror(.source))]
    Initrd {
        /// The initrd file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The initrd does not fit between the kernel and the top of RAM (or `initrd_addr_max`).
    #[error("initrd is too large: {size} bytes, at most {max} fit below {limit:#x}")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// The room there is.
        max: u64,
        /// The highest end address allowed: top of RAM below 4 GiB or the kernel's limit.
        limit: u64,
    },
    /// More E820 entries than the zero page holds.
    #[error("too many E820 entries: {0}, the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")]
    TooManyE820Entries(usize),
    /// The E820 map has no RAM at 1 MiB or below 640 KiB.
    #[error("guest RAM is too small: {0}")]
    RamTooSmall(String),
    /// A write to guest memory failed.
    #[error("cannot write {what} to guest memory at {addr:#x}: {reason}")]
    GuestMemory {
        /// The structure being written.
        what: &'static str,
        /// Its guest address.
        addr: u64,
        /// vm-memory's error.
        reason: String,
    },
}


/// What the kernel-specific part of loading found out.
struct LoadedKernel {
    /// RIP.
    entry: u64,
    /// First byte above the loaded image (and the memory the kernel unpacks into).
    initrd_floor: u64,
    /// The setup header for the zero page.
    hdr: setup_header,
    /// Longest command line the kernel takes, without the NUL.
    cmdline_max: u32,
    /// Highest address the initrd may occupy.
    initrd_addr_max: u32,
    /// An ELF kernel's PVH entry point (its `XEN_ELFNOTE_PHYS32_ENTRY` note).
    pvh_entry: Option<u64>,
}

/// How a loaded Linux is entered, which says where later boot information goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxEntry {
    /// The 64-bit entry with a zero page (`struct boot_params`) at [`ZERO_PAGE_ADDR`].
    ZeroPage,
    /// The PVH entry with `hvm_start_info` at [`ZERO_PAGE_ADDR`].
    Pvh,
}

/// A loaded Linux kernel: the boot CPU's start state and how it is entered.
#[derive(Debug)]
pub struct LoadedLinux {
    /// The boot CPU's registers.
    pub state: X86BootState,
    /// The boot protocol.
    pub entry: LinuxEntry,
}

/// Loads `kernel` (and `initrd`) into `ram` for a direct 64-bit boot with `cmdline` and the
/// E820 map `e820`, and returns the boot CPU's start state (QEMU's `x86_load_linux`).
///
/// bzImages must support the 64-bit boot protocol (2.12+, `XLF_KERNEL_64`); they are
/// entered at load address + 0x200. ELF `vmlinux` files are loaded at their physical
/// addresses and entered through their PVH note if they have one (see the module docs),
/// else at `e_entry` in 64-bit mode with a zero page.
///
/// Only the boot CPU gets this state; the others wait for INIT/SIPI. To hand Linux the
/// RSDP directly (boot protocol 2.14, or PVH's start info), call [`set_acpi_rsdp_addr`]
/// afterwards.
pub fn load_linux(
    ram: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    e820: &[E820Entry],
) -> Result<LoadedLinux, LinuxLoadError> {
    if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(LinuxLoadError::TooManyE820Entries(e820.len()));
    }
    let ram_top = high_ram_end(e820)?;

    let mut file = File::open(kernel).map_err(LinuxLoadError::Open)?;
    let size = file.metadata().map_err(LinuxLoadError::Read)?.len();
    let mut head = vec![0u8; size.min(4096) as usize];
    file.read_exact(&mut head).map_err(LinuxLoadError::Read)?;

    let loaded = if head.starts_with(b"\x7fELF") {
        load_elf(ram, &mut file, &head, size, ram_top)?
    } else if head.len() >= 0x206 && head[0x202..0x206] == HDRS_MAGIC.to_le_bytes() {
        load_bzimage(ram, &mut file, &head, size, ram_top)?
    } else {
        return Err(LinuxLoadError::NotAKernel);
    };

    // The command line, as given (QEMU copies the -append string unchanged).
    let max = (loaded.cmdline_max as usize).min((EBDA_START - CMDLINE_ADDR - 1) as usize);
    if cmdline.len() > max {
        return Err(LinuxLoadError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.contains('\0') {
        return Err(LinuxLoadError::CmdlineNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    write(ram, "the command line", CMDLINE_ADDR, &bytes)?;

    let (ramdisk_image, ramdisk_size) = match initrd {
        Some(path) => load_initrd(ram, path, &loaded, ram_top)?,
        None => (0, 0),
    };
    if let Some(entry) = loaded.pvh_entry {
        write_pvh_start_info(ram, e820, ramdisk_image, ramdisk_size)?;
        return Ok(LoadedLinux {
            state: pvh_boot_state(entry),
            entry: LinuxEntry::Pvh,
        });
    }

    let hdr = setup_header {
        type_of_loader: 0xff,
        loadflags: loaded.hdr.loadflags | CAN_USE_HEAP,
        heap_end_ptr: 0xfe00,
        cmd_line_ptr: CMDLINE_ADDR as u32,
        ramdisk_image,
        ramdisk_size,
        ..loaded.hdr
    };
    let mut params = boot_params {
        hdr,
        e820_entries: e820.len() as u8,
        ..Default::default()
    };
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    write(ram, "the zero page", ZERO_PAGE_ADDR, params.as_slice())?;

    setup_long_mode_tables(ram)?;
    Ok(LoadedLinux {
        state: boot_state(loaded.entry),
        entry: LinuxEntry::ZeroPage,
    })
}

/// Stores the ACPI RSDP address in the zero page (`boot_params.acpi_rsdp_addr`, boot protocol
/// 2.14) or PVH's start info (`rsdp_paddr`), so Linux need not scan the BIOS area. Call after
/// [`load_linux`], with the entry it returned.
pub fn set_acpi_rsdp_addr(
    ram: &GuestMemoryMmap,
    entry: LinuxEntry,
    rsdp: u64,
) -> Result<(), LinuxLoadError> {
    let addr = match entry {
        LinuxEntry::ZeroPage => ZERO_PAGE_ADDR + ACPI_RSDP_ADDR_OFFSET,
        LinuxEntry::Pvh => PVH_START_INFO_ADDR + PVH_RSDP_PADDR_OFFSET,
    };
    write(ram, "the RSDP address", addr, &rsdp.to_le_bytes())
}

/// Tells the kernel it starts on an 80x25 colour VGA text screen, the cursor at the top
/// left (`boot_params.screen_info`, which the kernel's real-mode setup fills from the
/// BIOS when firmware boots it): without it the kernel's VGA console stays off. Call
/// after [`load_linux`] for a [`LinuxEntry::ZeroPage`] kernel, once the display is in that
/// mode (PVH has no screen information: such a kernel starts on its dummy console, as on
/// QEMU).
pub fn set_vga_text_screen(ram: &GuestMemoryMmap) -> Result<(), LinuxLoadError> {
    let info = screen_info {
        orig_video_mode: 3,
        orig_video_cols: 80,
        orig_video_lines: 25,
        // `isVGA` and an EGA BX that is not 0x10 (int 10h AH=12h: colour, 256 KiB) are
        // what make vgacon take a VGA rather than a CGA.
        orig_video_isVGA: 1,
        orig_video_ega_bx: 0x0003,
        orig_video_points: 16,
        ..Default::default()
    };
    let mut params: boot_params = ram
        .read_obj(GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| LinuxLoadError::GuestMemory {
            what: "the zero page",
            addr: ZERO_PAGE_ADDR,
            reason: e.to_string(),
        })?;
    params.screen_info = info;
    write(ram, "the screen information", ZERO_PAGE_ADDR, params.as_slice())
}

/// End of the RAM range that holds the kernel (the one containing 1 MiB), capped at 4 GiB;
/// checks that conventional memory for the boot structures exists too.
fn high_ram_end(e820: &[E820Entry]) -> Result<u64, LinuxLoadError> {
    let ram = |addr: u64| {
        e820
            .iter()
            .find(|e| e.kind == E820Kind::Ram && e.addr <= addr && addr < e.end())
    };
    match ram(0) {
        Some(low) if low.end() > CMDLINE_ADDR => {}
        _ => {
            return Err(LinuxLoadError::RamTooSmall(format!(
                "the E820 map has no RAM at 0..{CMDLINE_ADDR:#x} for the boot structures"
            )))
        }
    }
    ram(KERNEL_LOAD_ADDR)
        .map(|e| e.end().min(FOUR_GIB))
        .ok_or_else(|| {
            LinuxLoadError::RamTooSmall(format!(
                "the E820 map has no RAM at {KERNEL_LOAD_ADDR:#x}, where the kernel is loaded"
            ))
        })
}

fn write(
    ram: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), LinuxLoadError> {
    ram.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| LinuxLoadError::GuestMemory {
            what,
            addr,
            reason: e.to_string(),
        })
}

fn loader_error(e: linux_loader::loader::Error) -> LinuxLoadError {
    LinuxLoadError::Loader(e.to_string())
}

fn load_bzimage(
    ram: &GuestMemoryMmap,
    file: &mut File,
    head: &[u8],
    size: u64,
    ram_top: u64,
) -> Result<LoadedKernel, LinuxLoadError> {
    let hdr_end = SETUP_HEADER_OFFSET + size_of::<setup_header>();
    if head.len() < hdr_end {
        return Err(LinuxLoadError::Truncated {
            size,
            expected: hdr_end as u64,
        });
    }
    let mut hdr = setup_header::default();
    hdr.as_mut_slice()
        .copy_from_slice(&head[SETUP_HEADER_OFFSET..hdr_end]);
    let version = hdr.version;
    if version < PROTOCOL_64BIT_ENTRY
        || hdr.xloadflags & XLF_KERNEL_64 == 0
        || hdr.loadflags & LOADED_HIGH == 0
    {
        return Err(LinuxLoadError::No64BitEntry(version));
    }
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let setup_size = (setup_sects + 1) * 512;
    // syssize counts 16-byte paragraphs of protected-mode code (exact since protocol 2.04);
    // allow for it being rounded up.
    let expected = setup_size + u64::from(hdr.syssize) * 16;
    if size < setup_size || size + 15 < expected {
        return Err(LinuxLoadError::Truncated { size, expected });
    }
    let end = KERNEL_LOAD_ADDR + (size - setup_size);
    if end > ram_top {
        return Err(LinuxLoadError::KernelTooLarge {
            end,
            ram_end: ram_top,
        });
    }

    let result = BzImage::load(
        ram,
        Some(GuestAddress(KERNEL_LOAD_ADDR)),
        file,
        Some(GuestAddress(KERNEL_LOAD_ADDR)),
    )
    .map_err(loader_error)?;
    let hdr = result.setup_header.unwrap_or(hdr);
    let load = KERNEL_LOAD_ADDR;
    // The decompressor copies itself into, and unpacks the kernel into, init_size bytes at
    // max(load address, pref_address) (LOAD_PHYSICAL_ADDR): keep the initrd out of them.
    let unpack_end = if version >= 0x020a {
        load.max(hdr.pref_address) + u64::from(hdr.init_size)
    } else {
        0
    };
    Ok(LoadedKernel {
        entry: load + BZIMAGE_64BIT_ENTRY_OFFSET,
        initrd_floor: result.kernel_end.max(unpack_end),
        hdr,
        cmdline_max: if version >= 0x0206 {
            hdr.cmdline_size
        } else {
            255
        },
        initrd_addr_max: if version >= 0x0203 {
            hdr.initrd_addr_max
        } else {
            OLD_INITRD_ADDR_MAX
        },
        pvh_entry: None,
    })
}

fn load_elf(
    ram: &GuestMemoryMmap,
    file: &mut File,
    head: &[u8],
    size: u64,
    ram_top: u64,
) -> Result<LoadedKernel, LinuxLoadError> {
    const EHDR_SIZE: usize = 64;
    const PHDR_SIZE: u64 = 56;
    const PT_LOAD: u32 = 1;
    const EM_X86_64: u16 = 62;
    if head.len() < EHDR_SIZE {
        return Err(LinuxLoadError::Truncated {
            size,
            expected: EHDR_SIZE as u64,
        });
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if head[4] != 2 || head[5] != 1 || u16_at(18) != EM_X86_64 {
        return Err(LinuxLoadError::UnsupportedElf(
            "not a 64-bit little-endian x86-64 ELF file".into(),
        ));
    }
    let phoff = u64_at(head, 32);
    let phentsize = u16_at(54);
    let phnum = u64::from(u16_at(56));
    if u64::from(phentsize) != PHDR_SIZE {
        return Err(LinuxLoadError::UnsupportedElf(format!(
            "program header entries of {phentsize} bytes"
        )));
    }
    let phdrs_end = phoff.saturating_add(phnum * PHDR_SIZE);
    if phdrs_end > size {
        return Err(LinuxLoadError::Truncated {
            size,
            expected: phdrs_end,
        });
    }
    let mut phdrs = vec![0u8; (phnum * PHDR_SIZE) as usize];
    read_at(file, phoff, &mut phdrs).map_err(LinuxLoadError::Read)?;
    let mut any_load = false;
    for ph in phdrs.chunks_exact(PHDR_SIZE as usize) {
        if u32_at(ph, 0) != PT_LOAD || u64_at(ph, 32) == 0 {
            continue;
        }
        any_load = true;
        let (offset, paddr, filesz, memsz) =
            (u64_at(ph, 8), u64_at(ph, 24), u64_at(ph, 32), u64_at(ph, 40));
        let file_end = offset.saturating_add(filesz);
        if file_end > size {
            return Err(LinuxLoadError::Truncated {
                size,
                expected: file_end,
            });
        }
        if paddr < KERNEL_LOAD_ADDR {
            return Err(LinuxLoadError::UnsupportedElf(format!(
                "a segment loads at {paddr:#x}, below 1 MiB"
            )));
        }
        let end = paddr.saturating_add(memsz.max(filesz));
        if end > ram_top {
            return Err(LinuxLoadError::KernelTooLarge {
                end,
                ram_end: ram_top,
            });
        }
    }
    if !any_load {
        return Err(LinuxLoadError::UnsupportedElf(
            "no loadable segment".into(),
        ));
    }

    let result = Elf::load(ram, None, file, Some(GuestAddress(KERNEL_LOAD_ADDR)))
        .map_err(loader_error)?;
    let hdr = setup_header {
        boot_flag: 0xaa55,
        header: HDRS_MAGIC,
        kernel_alignment: 0x0100_0000,
        ..Default::default()
    };
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Some(entry.0),
        _ => None,
    };
    Ok(LoadedKernel {
        entry: result.kernel_load.0,
        initrd_floor: result.kernel_end,
        hdr,
        cmdline_max: ELF_CMDLINE_MAX,
        initrd_addr_max: ELF_INITRD_ADDR_MAX,
        pvh_entry,
    })
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Loads the initrd page-aligned as high as it may go (QEMU: below `initrd_addr_max` and the
/// top of RAM under 4 GiB) and returns its `(address, size)`.
fn load_initrd(
    ram: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    ram_top: u64,
) -> Result<(u32, u32), LinuxLoadError> {
    let initrd_error = |source| LinuxLoadError::Initrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(initrd_error)?;
    let size = file.metadata().map_err(initrd_error)?.len();
    let limit = (u64::from(kernel.initrd_addr_max) + 1).min(ram_top);
    let floor = kernel.initrd_floor.next_multiple_of(PAGE_SIZE);
    let max = limit.saturating_sub(floor);
    if size > max {
        return Err(LinuxLoadError::InitrdTooLarge { size, max, limit });
    }
    let addr = (limit - size) & !(PAGE_SIZE - 1);
    ram.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => initrd_error(io),
            other => LinuxLoadError::GuestMemory {
                what: "the initrd",
                addr,
                reason: other.to_string(),
            },
        })?;
    // Both fit in 32 bits: the initrd lies below `limit`, which is at most 4 GiB.
    Ok((addr as u32, size as u32))
}

/// A GDT descriptor (Firecracker's `gdt_entry`).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment a descriptor loads (Firecracker's `kvm_segment_from_gdt`).
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

const GDT: [u64; 4] = [
    0,
    // code64: present, DPL 0, execute/read, accessed, L, G.
    gdt_entry(0xa09b, 0, 0xfffff),
    // data: present, read/write, accessed, D/B, G.
    gdt_entry(0xc093, 0, 0xfffff),
    // TSS: present, 64-bit busy TSS, G.
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Writes the GDT, IDT and identity-mapping page tables.
fn setup_long_mode_tables(ram: &GuestMemoryMmap) -> Result<(), LinuxLoadError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(ram, "the GDT", BOOT_GDT_ADDR, &gdt)?;
    write(ram, "the IDT", BOOT_IDT_ADDR, &0u64.to_le_bytes())?;
    // Present | writable.
    write(
        ram,
        "the PML4",
        PML4_ADDR,
        &(PDPTE_ADDR | 0x03).to_le_bytes(),
    )?;
    write(
        ram,
        "the PDPT",
        PDPTE_ADDR,
        &(PDE_ADDR | 0x03).to_le_bytes(),
    )?;
    // Present | writable | 2 MiB page.
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    write(ram, "the page directory", PDE_ADDR, &pd)
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// `IA32_APIC_BASE`: the default base, enabled, bootstrap processor.
const APIC_BASE_BSP: u64 = 0xfee0_0000 | (1 << 11) | (1 << 8);

/// PVH's `hvm_start_info`, in the page the zero page takes otherwise.
const PVH_START_INFO_ADDR: u64 = ZERO_PAGE_ADDR;
/// The initrd's `hvm_modlist_entry`.
const PVH_MODLIST_ADDR: u64 = ZERO_PAGE_ADDR + 0x40;
/// The memory map (`hvm_memmap_table_entry`s, at most E820_MAX_ENTRIES_ZEROPAGE of them,
/// ending below the boot stack).
const PVH_MEMMAP_ADDR: u64 = ZERO_PAGE_ADDR + 0x80;
/// `hvm_start_info.rsdp_paddr`.
const PVH_RSDP_PADDR_OFFSET: u64 = 32;
/// `XEN_HVM_START_MAGIC_VALUE`.
const PVH_START_MAGIC: u32 = 0x336e_c578;

/// Writes the PVH start info (QEMU's pvh.bin does this from fw_cfg): version 1 with the
/// command line, the initrd as module 0, and the E820 map; the RSDP comes with
/// [`set_acpi_rsdp_addr`].
fn write_pvh_start_info(
    ram: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd_addr: u32,
    initrd_size: u32,
) -> Result<(), LinuxLoadError> {
    let memmap: Vec<u8> = e820
        .iter()
        .flat_map(|e| {
            hvm_memmap_table_entry {
                addr: e.addr,
                size: e.size,
                type_: e.kind as u32,
                reserved: 0,
            }
            .as_slice()
            .to_vec()
        })
        .collect();
    write(ram, "the PVH memory map", PVH_MEMMAP_ADDR, &memmap)?;
    let nr_modules = u32::from(initrd_size != 0);
    if nr_modules != 0 {
        let module = hvm_modlist_entry {
            paddr: u64::from(initrd_addr),
            size: u64::from(initrd_size),
            ..Default::default()
        };
        write(ram, "the PVH module list", PVH_MODLIST_ADDR, module.as_slice())?;
    }
    let info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules,
        modlist_paddr: if nr_modules != 0 { PVH_MODLIST_ADDR } else { 0 },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        reserved: 0,
    };
    write(ram, "the PVH start info", PVH_START_INFO_ADDR, info.as_slice())?;
    let gdt: Vec<u8> = PVH_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(ram, "the GDT", BOOT_GDT_ADDR, &gdt)
}

/// The GDT of the PVH entry: as [`GDT`] with 32-bit code.
const PVH_GDT: [u64; 4] = [
    0,
    // code32: present, DPL 0, execute/read, accessed, D/B, G.
    gdt_entry(0xc09b, 0, 0xfffff),
    GDT[2],
    GDT[3],
];

/// The boot CPU's registers for the PVH entry at `entry`: 32-bit protected mode with flat
/// segments, paging off, EBX the start info's address (the PVH boot ABI).
fn pvh_boot_state(entry: u64) -> X86BootState {
    let mut state = boot_state(entry);
    state.sregs.cs = segment_from_gdt(PVH_GDT[1], 1);
    state.sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    state.sregs.cr3 = 0;
    state.sregs.cr4 = 0;
    state.sregs.efer = 0;
    state.regs = kvm_regs {
        rip: entry,
        rbx: PVH_START_INFO_ADDR,
        rflags: 2,
        ..Default::default()
    };
    state
}

/// The boot CPU's registers for the 64-bit entry at `entry`.
fn boot_state(entry: u64) -> X86BootState {
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    debug_assert_eq!(
        (code.selector, data.selector, tss.selector),
        (BOOT_CS, BOOT_DS, BOOT_TSS)
    );
    let sregs = kvm_sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        // KVM's reset LDT: usable, empty.
        ldt: kvm_segment {
            limit: 0xffff,
            type_: 2,
            present: 1,
            ..Default::default()
        },
        gdt: kvm_bindings::kvm_dtable {
            base: BOOT_GDT_ADDR,
            limit: (GDT.len() * 8 - 1) as u16,
            ..Default::default()
        },
        idt: kvm_bindings::kvm_dtable {
            base: BOOT_IDT_ADDR,
            limit: 7,
            ..Default::default()
        },
        cr0: X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
        cr3: PML4_ADDR,
        cr4: X86_CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        apic_base: APIC_BASE_BSP,
        ..Default::default()
    };
    let regs = kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE_ADDR,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rflags: 2,
        ..Default::default()
    };
    X86BootState { regs, sregs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::i386::e820::{pc_e820_table, pc_ram_split};
    use std::sync::atomic::{AtomicU32, Ordering};

    const MIB: u64 = 1 << 20;

    /// A file in the temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &[u8]) -> TempFile {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "qomvm-x86-linux-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
        fn sparse(len: u64) -> TempFile {
            let f = TempFile::new(b"");
            File::options()
                .write(true)
                .open(&f.0)
                .unwrap()
                .set_len(len)
                .unwrap();
            f
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn ram(size: u64) -> (GuestMemoryMmap, Vec<E820Entry>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let (lo, hi) = pc_ram_split(size);
        (mem, pc_e820_table(lo, hi))
    }

    /// Header fields of the fake bzImage that tests vary.
    struct Fake {
        version: u16,
        xloadflags: u16,
        initrd_addr_max: u32,
        cmdline_size: u32,
        payload: Vec<u8>,
        /// Bytes cut off the end of the file after syssize is computed.
        truncate: usize,
    }

    impl Default for Fake {
        fn default() -> Self {
            Fake {
                version: 0x020f,
                xloadflags: XLF_KERNEL_64 | 0x2,
                initrd_addr_max: 0x7fff_ffff,
                cmdline_size: 2047,
                payload: (0..8192u32).map(|i| (i * 7 % 251) as u8).collect(),
                truncate: 0,
            }
        }
    }

    /// A minimal bzImage: one setup sector after the boot sector, the header at 0x1f1, then
    /// the "protected-mode code".
    fn fake_bzimage(f: &Fake) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        let mut put = |off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
        put(0x1f1, &[setup_sects]);
        put(0x1f4, &(f.payload.len().div_ceil(16) as u32).to_le_bytes());
        put(0x1fe, &0xaa55u16.to_le_bytes());
        put(0x200, &[0xeb, 0x66]);
        put(0x202, b"HdrS");
        put(0x206, &f.version.to_le_bytes());
        put(0x211, &[LOADED_HIGH]);
        put(0x214, &0x10_0000u32.to_le_bytes());
        put(0x22c, &f.initrd_addr_max.to_le_bytes());
        put(0x230, &0x20_0000u32.to_le_bytes());
        put(0x234, &[1]);
        put(0x236, &f.xloadflags.to_le_bytes());
        put(0x238, &f.cmdline_size.to_le_bytes());
        put(0x258, &0x100_0000u64.to_le_bytes());
        put(0x260, &0x20_0000u32.to_le_bytes());
        img.extend_from_slice(&f.payload);
        img.truncate(img.len() - f.truncate);
        img
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    #[test]
    fn bzimage_fills_zero_page_and_enters_long_mode() {
        let (mem, e820) = ram(128 * MIB);
        let fake = Fake::default();
        let kernel = TempFile::new(&fake_bzimage(&fake));
        let initrd_data: Vec<u8> = (0..10_000u32).map(|i| (i % 13) as u8).collect();
        let initrd = TempFile::new(&initrd_data);
        let cmdline = "console=ttyS0 root=/dev/vda rw";
        let state = load_linux(&mem, &kernel.0, Some(&initrd.0), cmdline, &e820)
            .unwrap()
            .state;

        // The protected-mode code at 1 MiB.
        let mut loaded = vec![0u8; fake.payload.len()];
        mem.read_slice(&mut loaded, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(loaded, fake.payload);

        // The command line, NUL-terminated.
        let mut cl = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(cl[cmdline.len()], 0);

        let p = zero_page(&mem);
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!(hdr.setup_sects, 1);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(hdr.loadflags, LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!({ hdr.heap_end_ptr }, 0xfe00);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);

        // The initrd: page aligned, as high as RAM allows, intact.
        let (image, size) = ({ hdr.ramdisk_image }, { hdr.ramdisk_size });
        assert_eq!(size, 10_000);
        assert_eq!(u64::from(image), (128 * MIB - 10_000) & !0xfff);
        assert_eq!(image % 4096, 0);
        let mut rd = vec![0u8; size as usize];
        mem.read_slice(&mut rd, GuestAddress(u64::from(image)))
            .unwrap();
        assert_eq!(rd, initrd_data);

        // The E820 map.
        assert_eq!(usize::from(p.e820_entries), e820.len());
        for (slot, e) in p.e820_table.iter().zip(&e820) {
            assert_eq!(
                ({ slot.addr }, { slot.size }, { slot.r#type }),
                (e.addr, e.size, e.kind as u32)
            );
        }
        assert_eq!({ p.e820_table[e820.len()].size }, 0);
        assert_eq!(p.sentinel, 0);

        // Registers.
        let (r, s) = (state.regs, state.sregs);
        assert_eq!(r.rip, 0x10_0200);
        assert_eq!(r.rsi, ZERO_PAGE_ADDR);
        assert_eq!((r.rsp, r.rbp), (0x8ff0, 0x8ff0));
        assert_eq!(r.rflags, 2);
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cr4, 0x20);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.apic_base, 0xfee0_0900);
        assert_eq!(
            (s.cs.selector, s.cs.type_, s.cs.l, s.cs.db, s.cs.present, s.cs.s),
            (0x08, 0xb, 1, 0, 1, 1)
        );
        assert_eq!((s.cs.base, s.cs.limit, s.cs.g), (0, 0xffff_ffff, 1));
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(
                (seg.selector, seg.type_, seg.db, seg.present, seg.unusable),
                (0x10, 0x3, 1, 1, 0)
            );
        }
        assert_eq!((s.tr.selector, s.tr.type_, s.tr.s), (0x18, 0xb, 0));
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 31));
        assert_eq!((s.idt.base, s.idt.limit), (0x520, 7));

        // GDT and identity page tables in memory.
        let q = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(q(0x500), 0);
        assert_eq!(q(0x508), 0x00af_9b00_0000_ffff);
        assert_eq!(q(0x510), 0x00cf_9300_0000_ffff);
        assert_eq!(q(0x518), 0x008f_8b00_0000_ffff);
        assert_eq!(q(0x520), 0);
        assert_eq!(q(PML4_ADDR), 0xa003);
        assert_eq!(q(PDPTE_ADDR), 0xb003);
        assert_eq!(q(PDE_ADDR), 0x83);
        assert_eq!(q(PDE_ADDR + 8), 0x20_0083);
        assert_eq!(q(PDE_ADDR + 511 * 8), 0x3fe0_0083);
    }

    #[test]
    fn initrd_respects_initrd_addr_max_and_rsdp_is_recorded() {
        let (mem, e820) = ram(128 * MIB);
        let kernel = TempFile::new(&fake_bzimage(&Fake {
            initrd_addr_max: 0x3ff_ffff,
            ..Fake::default()
        }));
        let initrd = TempFile::new(&[0x5a; 5000]);
        load_linux(&mem, &kernel.0, Some(&initrd.0), "", &e820).unwrap();
        let hdr = zero_page(&mem).hdr;
        assert_eq!({ hdr.ramdisk_image }, (0x400_0000 - 5000) & !0xfff);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(CMDLINE_ADDR)).unwrap(), 0);
        assert_eq!({ hdr.ramdisk_size }, 5000);

        set_acpi_rsdp_addr(&mem, LinuxEntry::ZeroPage, 0xe0000).unwrap();
        assert_eq!({ zero_page(&mem).acpi_rsdp_addr }, 0xe0000);
    }

    /// An ELF64 kernel: one PT_LOAD at 16 MiB (file offset 0x1000, `hlt`s), entry at its
    /// start; with `pvh_entry`, also a PT_NOTE holding Xen's PHYS32_ENTRY note.
    fn test_elf(pvh_entry: Option<u32>) -> Vec<u8> {
        let mut elf = vec![0u8; 0x1000];
        elf[0..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little endian
        elf[6] = 1; // EV_CURRENT
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R|X
        elf[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
        elf[ph + 16..ph + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        elf[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_paddr
        elf[ph + 32..ph + 40].copy_from_slice(&0x100u64.to_le_bytes()); // p_filesz
        elf[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes()); // p_memsz
        elf.extend_from_slice(&[0xf4; 0x100]); // hlt
        if let Some(entry) = pvh_entry {
            elf[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
            let ph = 64 + 56;
            elf[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
            elf[ph + 8..ph + 16].copy_from_slice(&0x800u64.to_le_bytes()); // p_offset
            elf[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
            let note = 0x800;
            elf[note..note + 4].copy_from_slice(&4u32.to_le_bytes()); // n_namesz
            elf[note + 4..note + 8].copy_from_slice(&4u32.to_le_bytes()); // n_descsz
            elf[note + 8..note + 12].copy_from_slice(&18u32.to_le_bytes()); // PHYS32_ENTRY
            elf[note + 12..note + 16].copy_from_slice(b"Xen\0");
            elf[note + 16..note + 20].copy_from_slice(&entry.to_le_bytes());
        }
        elf
    }

    #[test]
    fn elf_kernel_with_a_pvh_note_is_entered_through_pvh() {
        let kernel = TempFile::new(&test_elf(Some(0x100_0040)));
        let (mem, e820) = ram(64 * MIB);
        let initrd = TempFile::new(&[1; 100]);
        let loaded = load_linux(&mem, &kernel.0, Some(&initrd.0), "quiet", &e820).unwrap();
        assert_eq!(loaded.entry, LinuxEntry::Pvh);
        let state = loaded.state;
        // 32-bit protected mode, paging off, EBX the start info.
        assert_eq!(state.regs.rip, 0x100_0040);
        assert_eq!(state.regs.rbx, PVH_START_INFO_ADDR);
        assert_eq!(state.sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((state.sregs.efer, state.sregs.cs.l, state.sregs.cs.db), (0, 0, 1));
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
        assert_eq!((info.magic, info.version), (PVH_START_MAGIC, 1));
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(info.memmap_entries as usize, e820.len());
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_ADDR + 24 * (e820.len() as u64 - 1)))
            .unwrap();
        let want = e820.last().unwrap();
        assert_eq!((last.addr, last.size, last.type_), (want.addr, want.size, want.kind as u32));
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 100);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(module.paddr)).unwrap(), 1);
        // The RSDP goes into the start info.
        set_acpi_rsdp_addr(&mem, LinuxEntry::Pvh, 0xe_0000).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
        assert_eq!((info.magic, info.rsdp_paddr), (PVH_START_MAGIC, 0xe_0000));
    }

    #[test]
    fn elf_kernel_gets_a_synthesized_header() {
        let elf = test_elf(None);
        let kernel = TempFile::new(&elf);
        let (mem, e820) = ram(64 * MIB);
        let initrd = TempFile::new(&[1; 100]);
        let loaded = load_linux(&mem, &kernel.0, Some(&initrd.0), "quiet", &e820).unwrap();
        assert_eq!(loaded.entry, LinuxEntry::ZeroPage);
        let state = loaded.state;
        assert_eq!(state.regs.rip, 0x100_0000);
        assert_eq!(state.regs.rsi, ZERO_PAGE_ADDR);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x100_00ff)).unwrap(),
            0xf4
        );
        let hdr = zero_page(&mem).hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.ramdisk_image }, (64 * MIB as u32 - 100) & !0xfff);
    }

    fn load_err(kernel: &Path, initrd: Option<&Path>, cmdline: &str, ram_mib: u64) -> String {
        let (mem, e820) = ram(ram_mib * MIB);
        load_linux(&mem, kernel, initrd, cmdline, &e820)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_are_worded_for_users() {
        let good = TempFile::new(&fake_bzimage(&Fake::default()));
        let missing = Path::new("/nonexistent/qomvm/bzImage");

        assert_eq!(
            load_err(missing, None, "", 128),
            "No such file or directory"
        );
        let text = TempFile::new(b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:/bin/sh\n");
        assert_eq!(
            load_err(&text.0, None, "", 128),
            "not a Linux bzImage or ELF kernel"
        );
        let empty = TempFile::new(b"");
        assert_eq!(
            load_err(&empty.0, None, "", 128),
            "not a Linux bzImage or ELF kernel"
        );

        let truncated = TempFile::new(&fake_bzimage(&Fake {
            truncate: 4096,
            ..Fake::default()
        }));
        assert_eq!(
            load_err(&truncated.0, None, "", 128),
            "the kernel image is truncated: 5120 bytes, its header describes 9216"
        );

        let i386 = TempFile::new(&fake_bzimage(&Fake {
            xloadflags: 0,
            ..Fake::default()
        }));
        assert!(load_err(&i386.0, None, "", 128)
            .starts_with("the bzImage has no 64-bit entry point (boot protocol 2.15;"));

        let big = TempFile::new(&fake_bzimage(&Fake {
            payload: vec![0; 2 * MIB as usize],
            ..Fake::default()
        }));
        assert_eq!(
            load_err(&big.0, None, "", 2),
            "the kernel does not fit in guest RAM: it needs memory up to 0x300000, RAM below 4 GiB ends at 0x200000"
        );

        assert_eq!(
            load_err(&good.0, Some(Path::new("/nonexistent/initrd.img")), "", 128),
            "cannot read initrd '/nonexistent/initrd.img': No such file or directory"
        );
        // 128 MiB of RAM, the kernel unpacks into 16..18 MiB: 110 MiB are left for the initrd.
        let huge = TempFile::sparse(120 * MIB);
        assert_eq!(
            load_err(&good.0, Some(&huge.0), "", 128),
            format!(
                "initrd is too large: {} bytes, at most {} fit below 0x8000000",
                120 * MIB,
                110 * MIB
            )
        );

        assert_eq!(
            load_err(&good.0, None, &"x".repeat(3000), 128),
            "the kernel command line is too long: 3000 bytes, this kernel accepts at most 2047"
        );
        let short = TempFile::new(&fake_bzimage(&Fake {
            cmdline_size: 10,
            ..Fake::default()
        }));
        assert!(load_err(&short.0, None, "console=ttyS0", 128).contains("at most 10"));
        assert_eq!(
            load_err(&good.0, None, "a\0b", 128),
            "the kernel command line contains a NUL character"
        );
    }

    #[test]
    fn too_many_e820_entries_and_missing_ram_are_refused() {
        let good = TempFile::new(&fake_bzimage(&Fake::default()));
        let (mem, _) = ram(16 * MIB);
        let many: Vec<E820Entry> = (0..129)
            .map(|i| E820Entry {
                addr: i * 0x1000,
                size: 0x1000,
                kind: E820Kind::Ram,
            })
            .collect();
        assert!(matches!(
            load_linux(&mem, &good.0, None, "", &many),
            Err(LinuxLoadError::TooManyE820Entries(129))
        ));
        let no_high = pc_e820_table(0x10_0000, 0);
        assert!(matches!(
            load_linux(&mem, &good.0, None, "", &no_high),
            Err(LinuxLoadError::RamTooSmall(_))
        ));
    }
}
