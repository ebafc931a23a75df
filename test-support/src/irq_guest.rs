//! A guest that waits for interrupts on a [`TestVm`]: flat 32-bit protected mode, an IDT
//! whose every vector writes its number to [`MARK_PORT`], the local APIC software-enabled,
//! the PIC initialised (vectors 0x60-0x6f, only the IRQs the test asks for unmasked), the
//! I/O APIC pins the test asks for programmed (edge, fixed, to APIC ID 0). Once set up it
//! writes 1 to [`READY_PORT`] and idles in `sti; hlt`.
//!
//! Handlers do not `iret`: they reset the stack and jump back to the idle loop, whose `sti`
//! takes the next interrupt. Under PVM the guest's protected-mode code goes through KVM's
//! instruction emulator, which handles `iret` in real mode only; the vCPU stalled on it.
//!
//! Tests raise MSIs, irqfds or legacy GSIs from the host and read back which vectors the
//! guest took with [`wait_marks`].

use std::time::{Duration, Instant};

use hw::i386::x86_cpu::X86BootState;
use kvm_bindings::{kvm_dtable, kvm_segment};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::{Asm, EAX, ESP};
use crate::vm::{TestVm, RECORD_PORT};

/// Written with 1 once the guest waits for interrupts.
pub const READY_PORT: u16 = RECORD_PORT;
/// Written with the vector of each interrupt taken.
pub const MARK_PORT: u16 = RECORD_PORT + 1;
/// Vector base of the PIC master (IRQ n is vector 0x60 + n).
pub const PIC_VECTOR_BASE: u8 = 0x60;

const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x1000;
const CODE_ADDR: u64 = 0x1_0000;
/// `1: sti; hlt; jmp 1b`
const IDLE_ADDR: u64 = 0x1_8000;
const IDLE_LOOP: [u8; 4] = [0xfb, 0xf4, 0xeb, 0xfc];
const HANDLERS_ADDR: u64 = 0x2_0000;
/// Bytes per vector handler.
const HANDLER_SIZE: u64 = 0x40;
const STACK_TOP: u64 = 0x7000;
const LAPIC_SVR: u32 = 0xfee0_00f0;
const LAPIC_EOI: u32 = 0xfee0_00b0;
const LAPIC_LVT_LINT1: u32 = 0xfee0_0360;
/// An LVT entry delivering NMIs, unmasked.
const LVT_DM_NMI: u32 = 4 << 8;
const IOAPIC_REGSEL: u32 = 0xfec0_0000;
const IOAPIC_WIN: u32 = 0xfec0_0010;

/// What the guest sets up besides the local APIC.
#[derive(Clone, Debug, Default)]
pub struct IrqGuestConfig {
    /// I/O APIC pins to unmask, each with its vector.
    pub ioapic: Vec<(u8, u8)>,
    /// PIC master IRQs to unmask (bit n = IRQ n); all others stay masked.
    pub pic_unmasked: u8,
    /// LVT LINT1 as an unmasked NMI (what Linux sets on its boot CPU); else its reset
    /// value, masked.
    pub lint1_nmi: bool,
}

/// The handler of `vector`: `mov dx, MARK_PORT; mov al, vector; out dx, al`, EOI to the
/// local APIC and the PIC master, then back to the idle loop on a fresh stack.
fn handler(vector: u8) -> Vec<u8> {
    let mut a = Asm::flat32();
    a.mov_dx(MARK_PORT).mov_al(vector).out_dx_al();
    a.mov_imm(EAX, 0).store_abs(LAPIC_EOI, EAX);
    a.mov_al(0x20).out_al(0x20);
    a.mov_imm(ESP, STACK_TOP as u32);
    a.mov_imm(EAX, IDLE_ADDR as u32).emit(&[0xff, 0xe0]); // jmp eax
    let code = a.finish();
    assert!(code.len() as u64 <= HANDLER_SIZE);
    code
}

fn main_code(config: &IrqGuestConfig) -> Vec<u8> {
    let mut a = Asm::flat32();
    // Local APIC: software enable, spurious vector 0xff.
    a.load_eax_abs(LAPIC_SVR)
        .or_imm(EAX, 0x1ff)
        .store_abs(LAPIC_SVR, EAX);
    // PIC: ICW1 (edge, cascade, ICW4), ICW2 (vector base), ICW3, ICW4 (8086), OCW1 (masks).
    for (port, value) in [
        (0x20, 0x11),
        (0x21, PIC_VECTOR_BASE),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, PIC_VECTOR_BASE + 8),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, !config.pic_unmasked),
        (0xa1, 0xff),
    ] {
        a.mov_al(value).out_al(port);
    }
    // I/O APIC redirection entries: low dword (vector, fixed, physical, edge, high,
    // unmasked), high dword (destination APIC ID 0).
    for &(pin, vector) in &config.ioapic {
        let index = 0x10 + 2 * u32::from(pin);
        a.mov_imm(EAX, index).store_abs(IOAPIC_REGSEL, EAX);
        a.mov_imm(EAX, u32::from(vector)).store_abs(IOAPIC_WIN, EAX);
        a.mov_imm(EAX, index + 1).store_abs(IOAPIC_REGSEL, EAX);
        a.mov_imm(EAX, 0).store_abs(IOAPIC_WIN, EAX);
    }
    if config.lint1_nmi {
        a.mov_imm(EAX, LVT_DM_NMI).store_abs(LAPIC_LVT_LINT1, EAX);
    }
    a.mov_al(1).out_al(READY_PORT);
    a.mov_imm(EAX, IDLE_ADDR as u32).emit(&[0xff, 0xe0]); // jmp eax
    a.finish()
}

/// Flat 32-bit protected mode at `entry`, with the guest's GDT and IDT and the local APIC
/// enabled (as a loader leaves the boot CPU).
fn flat32_state(entry: u64) -> X86BootState {
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    let mut state = X86BootState::with_segments(
        flat(0x08, 0xb),
        flat(0x10, 0x3),
        kvm_dtable {
            base: GDT_ADDR,
            limit: 3 * 8 - 1,
            ..Default::default()
        },
        kvm_dtable {
            base: IDT_ADDR,
            limit: 256 * 8 - 1,
            ..Default::default()
        },
        0x11,
    );
    state.regs.rip = entry;
    state.regs.rsp = STACK_TOP;
    state
}

/// Loads the guest into CPU 0 of `vm` (a [`TestVm::bare`] with at least 1 MiB of RAM). The
/// test starts the vCPUs (`vm_start`) and waits with [`wait_ready`].
pub fn load(vm: &TestVm, config: &IrqGuestConfig) {
    let ms = hw::core::machine::machine_state(&vm.machine).unwrap();
    let ram = ms.ram();
    let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    let gdt: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write_slice(&gdt, GuestAddress(GDT_ADDR)).unwrap();
    let mut idt = Vec::with_capacity(256 * 8);
    for vector in 0..=255u8 {
        let at = HANDLERS_ADDR + u64::from(vector) * HANDLER_SIZE;
        ram.write_slice(&handler(vector), GuestAddress(at)).unwrap();
        // 32-bit interrupt gate: offset 15..0, selector, 0, type 0x8e, offset 31..16.
        idt.extend_from_slice(&(at as u16).to_le_bytes());
        idt.extend_from_slice(&0x08u16.to_le_bytes());
        idt.extend_from_slice(&[0, 0x8e]);
        idt.extend_from_slice(&((at >> 16) as u16).to_le_bytes());
    }
    ram.write_slice(&idt, GuestAddress(IDT_ADDR)).unwrap();
    ram.write_slice(&main_code(config), GuestAddress(CODE_ADDR))
        .unwrap();
    ram.write_slice(&IDLE_LOOP, GuestAddress(IDLE_ADDR))
        .unwrap();
    vm.set_boot_state(0, flat32_state(CODE_ADDR));
}

fn writes_to(vm: &TestVm, port: u16) -> Vec<u8> {
    let offset = u64::from(port - RECORD_PORT);
    vm.ports
        .log
        .lock()
        .iter()
        .filter(|(o, _, _, write)| *write && *o == offset)
        .map(|(_, v, _, _)| *v as u8)
        .collect()
}

/// Waits until the guest has set up and idles; false after 20 seconds.
pub fn wait_ready(vm: &TestVm) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while writes_to(vm, READY_PORT).is_empty() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// The vectors the guest took so far, once there are at least `count` (or after
/// `timeout`, whatever arrived).
pub fn wait_marks(vm: &TestVm, count: usize, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    loop {
        let marks = writes_to(vm, MARK_PORT);
        if marks.len() >= count || Instant::now() > deadline {
            return marks;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
