//! Guests for the migration tests and benchmark (issue 18).

use crate::elf::{Elf32Kernel, PF_R, PF_W, PF_X};
use crate::guest::{Asm, Cond, EAX, EBX, ECX, EDI, EDX, ESI};

const LOAD: u32 = 0x10_0000;
const COM1: u16 = 0x3f8;
/// The dense area: 4096 dwords.
const DENSE: u32 = 0x30_0000;
const DENSE_DWORDS: u32 = 4096;
/// The sparse area: one dword at the start of each of 1024 pages.
const SPARSE: u32 = 0x80_0000;
const SPARSE_PAGES: u32 = 1024;

/// Where the VGA guest keeps its framebuffer's address.
const FB_BASE_VAR: u32 = 0x2f_f000;
/// The framebuffer area: one dword at the start of each of 1024 pages (4 MiB).
const FB_PAGES: u32 = 1024;

/// The counting guest: fills 16 KiB and one dword of each of 1024 pages spread over 4 MiB
/// with known values, keeps their sum in a register, and forever bumps one word of each
/// area by its counter, recomputes the full sum and prints `COUNTER ok` (8 hex digits) on
/// COM1, or `COUNTER BAD` if the memory no longer adds up. Needs 16 MiB of RAM.
pub fn migration_kernel() -> Vec<u8> {
    counting_kernel(false)
}

/// The counting guest with a third area in video memory: the std VGA's framebuffer at
/// 00:02.0 (BAR 0, which the guest reads from PCI configuration space and enables), one
/// dword of each of its first 1024 pages. Its writes go straight to video memory through
/// the accelerator, during a migration's passes too; a destination whose video memory
/// differs from the source's prints `BAD`. Without a framebuffer there it prints
/// `no framebuffer` and halts.
pub fn vga_migration_kernel() -> Vec<u8> {
    counting_kernel(true)
}

fn counting_kernel(framebuffer: bool) -> Vec<u8> {
    let mut a = Asm::flat32();
    if framebuffer {
        // The VGA's BAR 0 by configuration mechanism #1; memory decoding on.
        let found = a.label();
        a.mov_imm(EAX, 0x8000_1010)
            .mov_dx(0xcf8)
            .out_dx_eax()
            .mov_dx(0xcfc)
            .in_eax_dx()
            .and_imm(EAX, 0xffff_fff0)
            .store_abs(FB_BASE_VAR, EAX)
            .cmp_imm(EAX, 0)
            .jcc(Cond::Ne, found)
            .mov_dx(COM1);
        for &b in b"no framebuffer\n" {
            a.mov_al(b).out_dx_al();
        }
        a.hlt_loop();
        a.bind(found);
        a.mov_imm(EAX, 0x8000_1004)
            .mov_dx(0xcf8)
            .out_dx_eax()
            .mov_dx(0xcfc)
            .mov_imm(EAX, 0x3)
            .out_dx_eax();
    }
    // EBX: the running sum; EBP: the counter.
    a.xor(EBX, EBX)
        .mov_imm(EDI, DENSE)
        .mov_imm(EAX, 0x1234_5678);
    a.mov_imm(ECX, DENSE_DWORDS);
    let fill = a.here();
    a.store(EDI, 0, EAX)
        .emit(&[0x01, 0xc3]) // add ebx, eax
        .add_imm(EAX, 0x9e37_79b1)
        .add_imm(EDI, 4)
        .loop_back(fill);
    a.mov_imm(EDI, SPARSE).mov_imm(ECX, SPARSE_PAGES);
    let fill_sparse = a.here();
    a.store(EDI, 0, EAX)
        .emit(&[0x01, 0xc3]) // add ebx, eax
        .add_imm(EAX, 0x7f4a_7c15)
        .add_imm(EDI, 4096)
        .loop_back(fill_sparse);
    if framebuffer {
        a.load_abs(EDI, FB_BASE_VAR).mov_imm(ECX, FB_PAGES);
        let fill_fb = a.here();
        a.store(EDI, 0, EAX)
            .emit(&[0x01, 0xc3]) // add ebx, eax
            .add_imm(EAX, 0x2545_f491)
            .add_imm(EDI, 4096)
            .loop_back(fill_fb);
    }
    a.emit(&[0x31, 0xed]); // xor ebp, ebp
    let main = a.here();
    a.emit(&[0x45]); // inc ebp
                     // DENSE[n % 4096] += n; SPARSE page (n % 1024) += n; the sum grows by 2n.
    a.emit(&[0x89, 0xef]) // mov edi, ebp
        .and_imm(EDI, DENSE_DWORDS - 1)
        .emit(&[0xc1, 0xe7, 0x02]) // shl edi, 2
        .add_imm(EDI, DENSE)
        .emit(&[0x01, 0x2f]) // add [edi], ebp
        .emit(&[0x01, 0xeb]); // add ebx, ebp
    a.emit(&[0x89, 0xef]) // mov edi, ebp
        .and_imm(EDI, SPARSE_PAGES - 1)
        .emit(&[0xc1, 0xe7, 0x0c]) // shl edi, 12
        .add_imm(EDI, SPARSE)
        .emit(&[0x01, 0x2f]) // add [edi], ebp
        .emit(&[0x01, 0xeb]); // add ebx, ebp
    if framebuffer {
        // Framebuffer page (n % 1024) += n.
        a.emit(&[0x89, 0xef]) // mov edi, ebp
            .and_imm(EDI, FB_PAGES - 1)
            .emit(&[0xc1, 0xe7, 0x0c]) // shl edi, 12
            .load_abs(ESI, FB_BASE_VAR)
            .emit(&[0x01, 0xf7]) // add edi, esi
            .emit(&[0x01, 0x2f]) // add [edi], ebp
            .emit(&[0x01, 0xeb]); // add ebx, ebp
    }
    // EDX: the sum of the memory, now.
    a.xor(EDX, EDX)
        .mov_imm(ESI, DENSE)
        .mov_imm(ECX, DENSE_DWORDS);
    let sum = a.here();
    a.emit(&[0x03, 0x16]) // add edx, [esi]
        .add_imm(ESI, 4)
        .loop_back(sum);
    a.mov_imm(ESI, SPARSE).mov_imm(ECX, SPARSE_PAGES);
    let sum_sparse = a.here();
    a.emit(&[0x03, 0x16]) // add edx, [esi]
        .add_imm(ESI, 4096)
        .loop_back(sum_sparse);
    if framebuffer {
        a.load_abs(ESI, FB_BASE_VAR).mov_imm(ECX, FB_PAGES);
        let sum_fb = a.here();
        a.emit(&[0x03, 0x16]) // add edx, [esi]
            .add_imm(ESI, 4096)
            .loop_back(sum_fb);
    }
    // The counter in hex (`mov dx, port` below clobbers EDX: the sum waits in EDI).
    a.mov(EDI, EDX);
    a.emit(&[0x89, 0xee]) // mov esi, ebp
        .mov_imm(ECX, 8);
    let digit = a.here();
    let decimal = a.label();
    a.emit(&[0xc1, 0xc6, 0x04]) // rol esi, 4
        .mov(EAX, ESI)
        .and_imm(EAX, 0xf)
        .cmp_imm(EAX, 10)
        .jcc_short(Cond::B, decimal)
        .add_imm(EAX, u32::from(b'a' - b'0' - 10));
    a.bind(decimal);
    a.add_imm(EAX, u32::from(b'0'))
        .mov_dx(COM1)
        .out_dx_al()
        .loop_back(digit);
    let bad = a.label();
    a.cmp(EDI, EBX).jcc(Cond::Ne, bad);
    for &b in b" ok\n" {
        a.mov_al(b).out_dx_al();
    }
    a.jmp(main);
    a.bind(bad);
    for &b in b" BAD\n" {
        a.mov_al(b).out_dx_al();
    }
    a.jmp(main);
    elf(a)
}

/// The idle guest: prints `idle` on COM1, then halts for good (interrupts off), writing
/// nothing more: what an idle VM costs to migrate. Needs 2 MiB of RAM.
pub fn idle_kernel() -> Vec<u8> {
    let mut a = Asm::flat32();
    a.mov_dx(COM1);
    for &b in b"idle\n" {
        a.mov_al(b).out_dx_al();
    }
    a.hlt_loop();
    elf(a)
}

/// The Multiboot ELF of `code`, loaded and entered at 1 MiB.
fn elf(code: Asm) -> Vec<u8> {
    Elf32Kernel {
        vaddr: LOAD,
        paddr: LOAD,
        flags: PF_R | PF_W | PF_X,
        bss: 0,
        data_off: 0x400,
        code: &code.finish(),
        data: &[],
    }
    .build()
}
