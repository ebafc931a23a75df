//! Multiboot loading: images built here (an ELF32 kernel linked at a virtual address, an
//! a.out-kludge binary), loaded with `multiboot_load`, checked in guest RAM, and run on KVM
//! where the kernel reports what it found at entry through ports (skipped, with the reason
//! printed, where `/dev/kvm` is not usable).

use guest::{Asm, EAX, EBX, EDI, ESI};
use hw::core::machine::machine_state;
use hw::core::runstate::RunRequest;
use hw::i386::e820::{pc_e820_table, E820Entry, E820Kind};
use hw::i386::multiboot::*;
use hw::nvram::fw_cfg::{fw_cfg_init_io_dma, FW_CFG_DMA_IO_BASE, FW_CFG_IO_BASE};
use test_support::elf::{Elf32Kernel, CODE_OFF, PF_R, PF_X};
use test_support::{guest, require_kvm, vm};
use vm::{TestVm, EXIT_PORT, RECORD_PORT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the ELF kernel's segment goes, and the address it is linked at.
const PADDR: u32 = 0x10_0000;
const VADDR: u32 = 0xc010_0000;
/// File offset of the ELF kernel's data.
const DATA_OFF: usize = 0x800;
const BSS_SIZE: u32 = 0x1000;

const KERNEL_PATH: &str = "/boot/test.elf";
const APPEND: &str = "console=ttyS0 quiet";

fn mb_header(flags: u32) -> [u32; 3] {
    [
        MULTIBOOT_HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC)
            .wrapping_sub(flags),
    ]
}

/// An ELF32 executable whose one segment (the whole file plus `BSS_SIZE` of BSS) is linked
/// at `vaddr` and loaded at `PADDR`; entry at the code.
fn elf32(vaddr: u32, code: &[u8], data: &[u8]) -> Vec<u8> {
    Elf32Kernel {
        vaddr,
        paddr: PADDR,
        flags: PF_R | PF_X,
        bss: BSS_SIZE,
        data_off: DATA_OFF,
        code,
        data,
    }
    .build()
}

/// Guest-physical addresses of the ELF kernel's data: a DMA descriptor, its target, a word
/// of BSS.
const DMA_DESC: u32 = PADDR + DATA_OFF as u32;
const DMA_TARGET: u32 = DMA_DESC + 16;
const BSS_PROBE: u32 = DMA_DESC + 0x20 + 0x400;

/// The ELF kernel: reports what Multiboot handed it, reads fw_cfg through both interfaces,
/// and exits with 0x42.
fn elf_kernel() -> Vec<u8> {
    let mut a = Asm::flat32();
    a.out_eax(RECORD_PORT); // magic
    a.mov(EAX, EBX).out_eax(RECORD_PORT); // info address
    a.load(EAX, EBX, 0).out_eax(RECORD_PORT); // flags
    a.load(EAX, EBX, 4).out_eax(RECORD_PORT); // mem_lower
    a.load(EAX, EBX, 8).out_eax(RECORD_PORT); // mem_upper
    a.load(ESI, EBX, 16)
        .load_byte(EAX, ESI, 0)
        .out_eax(RECORD_PORT); // cmdline[0]
    a.load_byte(EAX, ESI, KERNEL_PATH.len() as i8 + 1)
        .out_eax(RECORD_PORT); // first byte of the -append text
    a.load(EAX, EBX, 20).out_eax(RECORD_PORT); // mods_count
    a.load(ESI, EBX, 24)
        .load(EDI, ESI, 0)
        .load(EAX, EDI, 0)
        .out_eax(RECORD_PORT); // the module's first 4 bytes
    a.load(EAX, ESI, 4)
        .sub_load(EAX, ESI, 0)
        .out_eax(RECORD_PORT); // its length
    a.load(EDI, ESI, 8)
        .load_byte(EAX, EDI, 0)
        .out_eax(RECORD_PORT); // its string[0]
    a.load(EAX, EBX, 44).out_eax(RECORD_PORT); // mmap_length
    a.load(EDI, EBX, 48).load(EAX, EDI, 20).out_eax(RECORD_PORT); // type of the first mmap entry
    a.mov_eax_sreg(1).out_eax(RECORD_PORT); // CS
    a.mov_eax_sreg(3).out_eax(RECORD_PORT); // DS
    a.load_eax_abs(BSS_PROBE).out_eax(RECORD_PORT); // BSS
                                                    // fw_cfg, traditional: select the signature, read 4 bytes.
    a.mov_imm(EAX, 0).out_ax(FW_CFG_IO_BASE);
    for _ in 0..4 {
        a.in_al(FW_CFG_IO_BASE + 1).out_al(RECORD_PORT);
    }
    // fw_cfg, DMA: the descriptor's address as two big-endian halves.
    a.mov_imm(EAX, 0).out_eax(FW_CFG_DMA_IO_BASE);
    a.mov_imm(EAX, DMA_DESC.swap_bytes())
        .out_eax(FW_CFG_DMA_IO_BASE + 4);
    a.load_eax_abs(DMA_DESC).out_eax(RECORD_PORT); // control after the transfer
    a.load_eax_abs(DMA_TARGET).out_eax(RECORD_PORT); // FW_CFG_ID as read by DMA
    a.exit(EXIT_PORT, 0x42);

    // FWCfgDmaAccess: select FW_CFG_ID (1) and read 4 bytes into DMA_TARGET.
    let mut data = Vec::new();
    data.extend_from_slice(&((1u32 << 16) | 0x08 | 0x02).to_be_bytes());
    data.extend_from_slice(&4u32.to_be_bytes());
    data.extend_from_slice(&u64::from(DMA_TARGET).to_be_bytes());
    data.extend_from_slice(&[0xee; 16]);
    elf32(VADDR, &a.finish(), &data)
}

const MODULE: &[u8] = b"MOD1: a module of some forty-odd bytes.";
const MODULE_CMDLINE: &str = "/tmp/mod1.bin arg=1";

fn load_elf_kernel(
    ram: &GuestMemoryMmap,
    ram_size: u64,
) -> Result<hw::i386::x86_cpu::X86BootState, MultibootError> {
    multiboot_load(
        ram,
        ram_size,
        KERNEL_PATH,
        &elf_kernel(),
        APPEND,
        &[(MODULE_CMDLINE, MODULE), ("second", b"2")],
        &pc_e820_table(ram_size, 0),
    )
}

fn read32(ram: &GuestMemoryMmap, addr: u64) -> u32 {
    ram.read_obj::<u32>(GuestAddress(addr)).unwrap()
}

fn read_cstr(ram: &GuestMemoryMmap, addr: u64) -> String {
    let mut s = Vec::new();
    for a in addr.. {
        let b: u8 = ram.read_obj(GuestAddress(a)).unwrap();
        if b == 0 {
            break;
        }
        s.push(b);
    }
    String::from_utf8(s).unwrap()
}

#[test]
fn an_elf_kernel_its_modules_and_the_info_land_where_documented() {
    let ram_size = 8 << 20;
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram_size as usize)]).unwrap();
    // Garbage where the BSS goes: the loader must clear it.
    ram.write_slice(&vec![0xff; 0x10_0000], GuestAddress(0x10_0000))
        .unwrap();
    let state = load_elf_kernel(&ram, ram_size).unwrap();

    // Entry: e_entry is virtual; the loader translates it into the segment's physical range.
    assert_eq!(state.regs.rip, u64::from(PADDR) + CODE_OFF as u64);
    assert_eq!(state.regs.rax, 0x2bad_b002);
    assert_eq!(state.regs.rbx, MULTIBOOT_INFO_ADDR);
    assert_eq!(state.regs.rflags, 2);
    assert_eq!(state.sregs.cr0, 0x11);
    assert_eq!(state.sregs.cs.selector, MULTIBOOT_CODE_SELECTOR);
    assert_eq!(
        (state.sregs.cs.db, state.sregs.cs.g, state.sregs.cs.limit),
        (1, 1, 0xffff_ffff)
    );
    assert_eq!(state.sregs.ss.selector, MULTIBOOT_DATA_SELECTOR);
    assert_eq!(state.sregs.gdt.base, MULTIBOOT_GDT_ADDR);
    // The GDT in memory matches the segment registers.
    let mut gdt = [0u8; 24];
    ram.read_slice(&mut gdt, GuestAddress(MULTIBOOT_GDT_ADDR))
        .unwrap();
    assert_eq!(&gdt[8..16], &0x00cf_9a00_0000_ffffu64.to_le_bytes());
    assert_eq!(&gdt[16..24], &0x00cf_9200_0000_ffffu64.to_le_bytes());

    // The file is at PADDR, the BSS after it is zero.
    let kernel = elf_kernel();
    let mut loaded = vec![0u8; kernel.len()];
    ram.read_slice(&mut loaded, GuestAddress(PADDR.into()))
        .unwrap();
    assert_eq!(loaded, kernel);
    let kernel_end = u64::from(PADDR) + kernel.len() as u64 + u64::from(BSS_SIZE);
    let mut bss = vec![0xffu8; BSS_SIZE as usize];
    ram.read_slice(
        &mut bss,
        GuestAddress(u64::from(PADDR) + kernel.len() as u64),
    )
    .unwrap();
    assert!(bss.iter().all(|&b| b == 0));
    assert_eq!(
        read32(&ram, kernel_end),
        0xffff_ffff,
        "nothing past the BSS"
    );

    // The information structure.
    let info = MULTIBOOT_INFO_ADDR;
    assert_eq!(read32(&ram, info), 0x24f);
    assert_eq!(read32(&ram, info + 4), 640);
    assert_eq!(read32(&ram, info + 8), 7 * 1024);
    assert_eq!(read32(&ram, info + 12), 0x8000_ffff);
    assert_eq!(
        read_cstr(&ram, read32(&ram, info + 16).into()),
        "/boot/test.elf console=ttyS0 quiet"
    );
    assert_eq!(read_cstr(&ram, read32(&ram, info + 64).into()), "qomvm");

    // Module list right after the kernel, page-aligned; modules page-aligned after the
    // strings.
    assert_eq!(read32(&ram, info + 20), 2);
    let mods = u64::from(read32(&ram, info + 24));
    assert_eq!(mods, (kernel_end + 0xfff) & !0xfff);
    let (start, end) = (read32(&ram, mods), read32(&ram, mods + 4));
    assert_eq!(start % 4096, 0);
    assert!(u64::from(start) > mods);
    assert_eq!((end - start) as usize, MODULE.len());
    let mut m = vec![0u8; MODULE.len()];
    ram.read_slice(&mut m, GuestAddress(start.into())).unwrap();
    assert_eq!(m, MODULE);
    assert_eq!(
        read_cstr(&ram, read32(&ram, mods + 8).into()),
        MODULE_CMDLINE
    );
    let (start2, end2) = (read32(&ram, mods + 16), read32(&ram, mods + 20));
    assert_eq!(start2, start + 4096);
    assert_eq!(end2, start2 + 1);
    assert_eq!(read_cstr(&ram, read32(&ram, mods + 24).into()), "second");

    // The memory map, e820 entries each preceded by their size.
    let map = pc_e820_table(ram_size, 0);
    assert_eq!(read32(&ram, info + 44) as usize, 24 * map.len());
    let mmap = u64::from(read32(&ram, info + 48));
    assert_eq!(mmap, MULTIBOOT_MMAP_ADDR);
    for (i, e) in map.iter().enumerate() {
        let at = mmap + 24 * i as u64;
        assert_eq!(read32(&ram, at), 20);
        assert_eq!(ram.read_obj::<u64>(GuestAddress(at + 4)).unwrap(), e.addr);
        assert_eq!(ram.read_obj::<u64>(GuestAddress(at + 12)).unwrap(), e.size);
        assert_eq!(read32(&ram, at + 20), e.kind as u32);
    }
    assert_eq!(
        map[0],
        E820Entry {
            addr: 0,
            size: 0x9fc00,
            kind: E820Kind::Ram
        }
    );
    assert_eq!(
        map[3],
        E820Entry {
            addr: 0x10_0000,
            size: 7 << 20,
            kind: E820Kind::Ram
        }
    );
}

#[test]
fn mem_upper_stops_at_the_first_hole_and_modules_must_fit_below_it() {
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut map = pc_e820_table(3 << 20, 0);
    map.push(E820Entry {
        addr: 4 << 20,
        size: 4 << 20,
        kind: E820Kind::Ram,
    });
    multiboot_load(&ram, 8 << 20, "k", &elf_kernel(), "", &[], &map).unwrap();
    assert_eq!(read32(&ram, MULTIBOOT_INFO_ADDR + 8), 2048);

    let big = vec![0u8; 2 << 20];
    let err = multiboot_load(
        &ram,
        8 << 20,
        "k",
        &elf_kernel(),
        "",
        &[("big", &big)],
        &map,
    )
    .unwrap_err();
    assert!(
        matches!(err, MultibootError::InitrdTooLarge { ref name, .. } if name == "big"),
        "{err}"
    );
}

#[test]
fn out_of_ram_kernels_are_refused_and_untranslated_entries_kept() {
    // 1 MiB of RAM: the kernel at 1 MiB is outside it.
    let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let err = load_elf_kernel(&small, 1 << 20).unwrap_err();
    assert!(
        matches!(
            err,
            MultibootError::SegmentOutsideRam {
                addr: 0x10_0000,
                ..
            }
        ),
        "{err}"
    );

    // Linked at its load address: the entry is e_entry as is.
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let k = elf32(PADDR, &[0xf4], &[]);
    let state = multiboot_load(&ram, 4 << 20, "k", &k, "", &[], &[]).unwrap();
    assert_eq!(state.regs.rip, u64::from(PADDR) + CODE_OFF as u64);

    // A kernel without a header is not Multiboot, and nothing is written.
    let before = read32(&ram, MULTIBOOT_INFO_ADDR + 20);
    let err =
        multiboot_load(&ram, 4 << 20, "k", &[0u8; 4096], "", &[("m", b"x")], &[]).unwrap_err();
    assert!(matches!(err, MultibootError::NotMultiboot));
    assert_eq!(read32(&ram, MULTIBOOT_INFO_ADDR + 20), before);
}

/// A flat a.out-kludge image loaded at `load`, header 8 bytes in, entry after the header.
fn aout_kernel(load: u32, code: &[u8], bss: u32) -> Vec<u8> {
    let mut f = vec![0x90u8; 8];
    let entry_off = 8 + 32;
    let len = (entry_off + code.len()) as u32;
    let fields = [
        load + 8,
        load,
        load + len,
        load + len + bss,
        load + entry_off as u32,
    ];
    for v in mb_header(MULTIBOOT_AOUT_KLUDGE | MULTIBOOT_MEMORY_INFO)
        .into_iter()
        .chain(fields)
    {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

fn aout_code() -> Vec<u8> {
    let mut a = Asm::flat32();
    a.out_eax(RECORD_PORT); // magic
    a.load(ESI, EBX, 16)
        .load_byte(EAX, ESI, 0)
        .out_eax(RECORD_PORT); // cmdline[0]
    a.load(EAX, EBX, 20).out_eax(RECORD_PORT); // mods_count
    a.mov_eax_sreg(1).out_eax(RECORD_PORT); // CS
    a.exit(EXIT_PORT, 0x43);
    a.finish()
}

#[test]
fn an_aout_kludge_image_loads_at_its_header_addresses_whatever_its_format() {
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    ram.write_slice(&[0xff; 0x2000], GuestAddress(0x20_0000))
        .unwrap();
    let k = aout_kernel(0x20_0000, &aout_code(), 0x100);
    let state = multiboot_load(&ram, 4 << 20, "a.out", &k, "x", &[], &[]).unwrap();
    assert_eq!(state.regs.rip, 0x20_0000 + 40);
    let mut got = vec![0u8; k.len() + 0x104];
    ram.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&got[..k.len()], &k[..]);
    assert!(
        got[k.len()..k.len() + 0x100].iter().all(|&b| b == 0),
        "BSS cleared"
    );
    assert_eq!(
        &got[k.len() + 0x100..],
        &[0xff; 4],
        "nothing past bss_end_addr"
    );

    // A 64-bit ELF with the a.out kludge is loaded as a flat image (QEMU allows this).
    let mut elf64 = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
    elf64.resize(18, 0);
    elf64.extend_from_slice(&62u16.to_le_bytes());
    elf64.resize(64, 0);
    let load = 0x30_0000u32;
    for v in mb_header(MULTIBOOT_AOUT_KLUDGE)
        .into_iter()
        .chain([load + 64, load, 0, 0, load + 100])
    {
        elf64.extend_from_slice(&v.to_le_bytes());
    }
    elf64.resize(128, 0xf4);
    let state = multiboot_load(&ram, 4 << 20, "k64", &elf64, "", &[], &[]).unwrap();
    assert_eq!(state.regs.rip, u64::from(load) + 100);
    assert_eq!(
        ram.read_obj::<u8>(GuestAddress(0x30_0004)).unwrap(),
        2,
        "ELF class byte"
    );
}

fn written_values(vm: &TestVm) -> Vec<u64> {
    vm.ports
        .log
        .lock()
        .iter()
        .filter(|(_, _, _, write)| *write)
        .map(|(_, v, _, _)| *v)
        .collect()
}

#[test]
fn an_elf_multiboot_kernel_runs_and_sees_the_info_and_fw_cfg() {
    require_kvm!();
    let ram_size = 4 << 20;
    let vm = TestVm::bare(1, "qemu64", ram_size);
    let ms = machine_state(&vm.machine).unwrap();
    fw_cfg_init_io_dma(ms, FW_CFG_IO_BASE, Some(FW_CFG_DMA_IO_BASE)).unwrap();
    ms.ram()
        .write_slice(&vec![0xff; 0x10_0000], GuestAddress(0x10_0000))
        .unwrap();
    let state = load_elf_kernel(&ms.ram(), ram_size).unwrap();
    vm.set_boot_state(0, state);
    assert_eq!(vm.run(), Some(RunRequest::DebugExit((0x42 << 1) | 1)));
    let q = |c: u8| u64::from(c);
    assert_eq!(
        written_values(&vm),
        vec![
            0x2bad_b002,
            MULTIBOOT_INFO_ADDR,
            0x24f,
            640,
            3 * 1024,
            q(b'/'),
            q(b'c'),
            2,
            u64::from(u32::from_le_bytes(*b"MOD1")),
            MODULE.len() as u64,
            q(b'/'),
            24 * pc_e820_table(ram_size, 0).len() as u64,
            u64::from(E820Kind::Ram as u32),
            u64::from(MULTIBOOT_CODE_SELECTOR),
            u64::from(MULTIBOOT_DATA_SELECTOR),
            0,
            q(b'Q'),
            q(b'E'),
            q(b'M'),
            q(b'U'),
            0,
            3,
        ]
    );
}

#[test]
fn an_aout_kludge_kernel_runs() {
    require_kvm!();
    let vm = TestVm::bare(1, "qemu64", 4 << 20);
    let ms = machine_state(&vm.machine).unwrap();
    let k = aout_kernel(0x20_0000, &aout_code(), 0x100);
    let state = multiboot_load(&ms.ram(), 4 << 20, "Kernel", &k, "", &[("m", b"x")], &[]).unwrap();
    vm.set_boot_state(0, state);
    assert_eq!(vm.run(), Some(RunRequest::DebugExit((0x43 << 1) | 1)));
    assert_eq!(
        written_values(&vm),
        vec![
            0x2bad_b002,
            u64::from(b'K'),
            1,
            u64::from(MULTIBOOT_CODE_SELECTOR)
        ]
    );
}
