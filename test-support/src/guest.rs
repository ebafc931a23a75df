//! Tiny x86 test guests, assembled by hand (no external assembler). Depends on `std` only.
//!
//! # Register state the VMM must set (all three modes)
//!
//! Every image starts in **real mode** at [`GuestImage::entry`] and switches
//! to its target mode by itself (`lgdt`, `CR0.PE`, far jump; for long mode
//! also `CR4.PAE`, `CR3`, `EFER.LME` via `wrmsr`, `CR0.PG`). The VMM sets
//! only the usual real-mode start state, identical for every [`Mode`]:
//!
//! * copy [`GuestImage::bytes`] to guest-physical [`GuestImage::load_addr`];
//! * `CS.selector = 0`, `CS.base = 0` (limit 0xffff, 16-bit code: the KVM
//!   reset values), `RIP = entry`, `RFLAGS = 0x2`;
//! * `CR0.PE = 0`, `CR0.PG = 0`, `EFER = 0` (reset values).
//!
//! The image loads `DS`/`ES`/`SS`/`SP` itself, so the other segment
//! registers and general-purpose registers do not matter.
//!
//! For [`Mode::Long64`] the vCPU's CPUID (`KVM_SET_CPUID2`) must advertise
//! long mode (leaf 0x8000_0001 EDX bit 29), otherwise KVM refuses
//! `EFER.LME` and the `wrmsr` raises #GP (which ends in a triple fault).
//! Passing KVM's supported CPUID (`KVM_GET_SUPPORTED_CPUID`) is enough.
//!
//! # Memory layout
//!
//! `load_addr` is [`LOAD_ADDR`] (0x8000). From there: code, then the GDT,
//! the pseudo-descriptors and the data areas (`rep outsb` sources,
//! `rep insb` buffers), then, for [`Mode::Long64`] only, 4 KiB-aligned page
//! tables (PML4, PDPT and four page directories: 24 KiB) that identity-map
//! the first 4 GiB with 2 MiB pages. Everything lies below 64 KiB for small
//! op lists (asserted where real-mode addressing needs it), so 1 MiB of
//! guest RAM is plenty; MMIO addresses in the ops must not be backed by
//! RAM (e.g. the 0xfe00_0000 region).
//!
//! GDT: 0x08 = flat 32-bit code, 0x10 = flat 32-bit data (4 GiB limit),
//! 0x18 = 64-bit code.
//!
//! In [`Mode::Real`], if the op list touches MMIO, the prologue switches to
//! "big real mode" (PE on, `DS`/`ES` loaded with the flat 4 GiB selector,
//! PE off again): the CPU stays in real mode (CR0.PE = 0) but 32-bit
//! addresses (`[edi]`) reach 0xfe00_0000.

/// Where every image is loaded (and where execution starts).
pub const LOAD_ADDR: u64 = 0x8000;

/// GDT selectors used by the images.
pub const SEL_CODE32: u16 = 0x08;
/// Flat 4 GiB data selector.
pub const SEL_DATA32: u16 = 0x10;
/// 64-bit code selector.
pub const SEL_CODE64: u16 = 0x18;

/// The CPU mode the ops run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 16-bit real mode (CR0.PE = 0), flat with all segments 0.
    Real,
    /// 32-bit protected mode, flat segments, no paging.
    Protected32,
    /// 64-bit long mode, first 4 GiB identity-mapped with 2 MiB pages.
    Long64,
}

/// A loadable guest image.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Guest-physical address where `bytes` must be copied.
    pub load_addr: u64,
    /// Code + data (+ GDT + page tables) laid out from `load_addr`.
    pub bytes: Vec<u8>,
    /// The mode the ops run in (the image always *starts* in real mode).
    pub mode: Mode,
    /// Where execution starts (real mode, CS = 0, so RIP = entry).
    pub entry: u64,
    /// The isa-debug-exit style port written (one byte: the exit code)
    /// after the ops.
    pub exit_port: u16,
    /// Guest-physical address of each `rep insb` buffer, in op order.
    pub ins_buffers: Vec<u64>,
}

/// What the guest does, in order, before exiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `mov dx, port; mov al, value; out dx, al`
    OutB { port: u16, value: u8 },
    /// `mov dx, port; mov ax, value; out dx, ax`
    OutW { port: u16, value: u16 },
    /// `mov dx, port; mov eax, value; out dx, eax`
    OutL { port: u16, value: u32 },
    /// `mov dx, port; in al, dx` (result discarded)
    InB { port: u16 },
    /// `mov dx, port; in ax, dx` (result discarded)
    InW { port: u16 },
    /// `mov dx, port; in eax, dx` (result discarded)
    InL { port: u16 },
    /// `mov dx, port; mov esi, data; mov ecx, len; cld; rep outsb`
    /// (`data` is placed in the image).
    OutsB { port: u16, data: Vec<u8> },
    /// `mov dx, port; mov edi, buf; mov ecx, count; cld; rep insb` into a
    /// zeroed buffer in the image (see [`GuestImage::ins_buffers`]).
    InsB { port: u16, count: u16 },
    /// `mov edi, addr; mov eax, value; mov [edi], eax`
    MmioWriteL { addr: u32, value: u32 },
    /// `mov edi, addr; mov eax, [edi]` (result discarded)
    MmioReadL { addr: u32 },
    /// `mov dx, from; in al, dx; mov dx, to; out dx, al`
    EchoInB { from: u16, to: u16 },
    /// `mov dx, port; xor eax, eax; 1: out dx, al; jmp 1b` (never ends;
    /// ops after it are unreachable).
    Loop { port: u16 },
    /// `mov edi, addr; xor eax, eax; 1: mov [edi], eax; jmp 1b` (never ends).
    MmioLoop { addr: u32 },
    /// `hlt` (continues with the next op if the vCPU is woken up).
    Hlt,
    /// `1: jmp 1b`: runs on without ever exiting (ops after it are unreachable).
    Spin,
    /// `lidt [zero_idtr]; ud2`: #UD cannot be delivered (IDT limit 0),
    /// neither can the #GP nor the #DF, so the CPU shuts down.
    ///
    /// In [`Mode::Real`] the fault is raised after setting CR0.PE
    /// (`lidt [zero_idtr]; mov eax, cr0; or al, 1; mov cr0, eax; ud2`):
    /// KVM's real-mode interrupt emulation ignores the IDT limit and would
    /// vector through IVT entry 6 instead of shutting down.
    TripleFault,
}

/// Builds an image that switches to `mode`, runs `ops`, then does
/// `out exit_port, exit_code` (isa-debug-exit style) and loops on `hlt`.
pub fn build(mode: Mode, ops: &[Op], exit_port: u16, exit_code: u8) -> GuestImage {
    let mut a = Asm::real_mode(LOAD_ADDR);
    let uses_mmio = ops.iter().any(|op| {
        matches!(
            op,
            Op::MmioWriteL { .. } | Op::MmioReadL { .. } | Op::MmioLoop { .. }
        )
    });
    a.real_mode_prologue();
    match mode {
        Mode::Real => {
            if uses_mmio {
                a.enter_big_real_mode();
            }
        }
        Mode::Protected32 => a.enter_protected32(),
        Mode::Long64 => {
            a.enter_protected32();
            a.enter_long64();
        }
    }
    let mut ins_ids = Vec::new();
    for op in ops {
        if let Some(d) = a.op(op) {
            ins_ids.push(d);
        }
    }
    a.exit(exit_port, exit_code);
    let (mut image, addrs) = a.into_image(mode, exit_port);
    image.ins_buffers = ins_ids.iter().map(|d| addrs[d.0]).collect();
    image
}

/// An SMP test image (real mode): each vCPU reads its initial APIC ID
/// (`CPUID.1:EBX[31:24]`), does `out report_port, al` with it, and then
/// atomically increments a shared counter. The vCPU with APIC ID 0 then
/// waits until `ncpus` vCPUs have checked in and does
/// `out exit_port, exit_code`; every vCPU ends in a `hlt` loop.
///
/// All vCPUs start at the same entry with the real-mode state described in
/// the module docs (no SIPI trampoline). The APIC ID comes from CPUID, so
/// the VMM must put each vCPU's APIC ID into CPUID leaf 1 EBX[31:24] (as
/// QEMU does); KVM does not patch it. If every vCPU reads 0, every vCPU
/// waits for the counter and writes the exit port.
///
/// ```text
///     cli; xor ax, ax; mov ds, ax; mov es, ax; mov ss, ax; mov sp, LOAD_ADDR
///     mov eax, 1; cpuid; shr ebx, 24; mov al, bl
///     mov dx, report_port; out dx, al
///     lock inc byte [counter]
///     test bl, bl; jnz halt
/// spin: pause; cmp byte [counter], ncpus; jb spin
///     mov dx, exit_port; mov al, exit_code; out dx, al
/// halt: hlt; jmp halt
/// ```
pub fn smp_apic_id_reporter(
    report_port: u16,
    exit_port: u16,
    exit_code: u8,
    ncpus: u8,
) -> GuestImage {
    let mut a = Asm::real_mode(LOAD_ADDR);
    a.real_mode_prologue();
    let counter = a.data(vec![0], 1);
    a.mov_imm(EAX, 1).cpuid().shr_imm(EBX, 24).mov_al_bl();
    a.mov_dx(report_port).out_dx_al();
    // lock inc byte [counter]  (F0 FE /0 with disp16: FE 06 disp16)
    a.emit(&[0xf0, 0xfe, 0x06]);
    a.fixup_abs16(counter);
    let halt = a.label();
    a.emit(&[0x84, 0xdb]); // test bl, bl
    a.jcc_short(Cond::Ne, halt);
    let spin = a.here();
    a.pause();
    // cmp byte [counter], ncpus  (80 /7 ib with disp16: 80 3E disp16 ib)
    a.emit(&[0x80, 0x3e]);
    a.fixup_abs16(counter);
    a.emit(&[ncpus]);
    a.jcc_short(Cond::B, spin);
    a.mov_dx(exit_port).mov_al(exit_code).out_dx_al();
    a.bind(halt).hlt_loop();
    a.into_image(Mode::Real, exit_port).0
}

/// A real-mode image that executes `cpuid` for each `(leaf, subleaf)` and writes EAX,
/// EBX, ECX and EDX, in that order, as 32-bit `out`s to `report_port`, then
/// `out exit_port, exit_code`: what a guest sees of its CPU model.
///
/// ```text
///     mov eax, leaf; mov ecx, subleaf; cpuid; mov edi, edx
///     mov dx, report_port; out dx, eax
///     mov eax, ebx; out dx, eax; mov eax, ecx; out dx, eax; mov eax, edi; out dx, eax
/// ```
pub fn cpuid_reporter(
    queries: &[(u32, u32)],
    report_port: u16,
    exit_port: u16,
    exit_code: u8,
) -> GuestImage {
    let mut a = Asm::real_mode(LOAD_ADDR);
    a.real_mode_prologue();
    for &(leaf, subleaf) in queries {
        a.mov_imm(EAX, leaf)
            .mov_imm(ECX, subleaf)
            .cpuid()
            .mov(EDI, EDX);
        a.mov_dx(report_port).out_dx_eax();
        for reg in [EBX, ECX, EDI] {
            a.mov(EAX, reg).out_dx_eax();
        }
    }
    a.exit(exit_port, exit_code);
    a.into_image(Mode::Real, exit_port).0
}

// ---------------------------------------------------------------------------
// The assembler.

/// Register numbers (ModRM encoding): EAX, or AX / RAX by the code size.
pub const EAX: u8 = 0;
/// ECX.
pub const ECX: u8 = 1;
/// EDX.
pub const EDX: u8 = 2;
/// EBX.
pub const EBX: u8 = 3;
/// ESP.
pub const ESP: u8 = 4;
/// EBP.
pub const EBP: u8 = 5;
/// ESI.
pub const ESI: u8 = 6;
/// EDI.
pub const EDI: u8 = 7;

/// A jump target, bound with [`Asm::bind`] (before or after the jumps to it).
#[derive(Clone, Copy, Debug)]
pub struct Label(usize);

/// Condition codes for [`Asm::jcc`] and [`Asm::jcc_short`] (the low nibble of `0F 8x` and
/// `7x`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// Below (unsigned `<`, CF = 1).
    B = 0x2,
    /// Above or equal (unsigned `>=`, CF = 0).
    Ae = 0x3,
    /// Equal / zero.
    E = 0x4,
    /// Not equal / not zero.
    Ne = 0x5,
}

/// The opposite condition.
impl std::ops::Not for Cond {
    type Output = Cond;

    fn not(self) -> Cond {
        match self {
            Cond::B => Cond::Ae,
            Cond::Ae => Cond::B,
            Cond::E => Cond::Ne,
            Cond::Ne => Cond::E,
        }
    }
}

/// Index of a data item placed after the code.
#[derive(Clone, Copy, Debug)]
struct DataId(usize);

/// Where something must be patched once the data is laid out.
#[derive(Clone, Copy, Debug)]
enum Target {
    Data(DataId),
    /// An absolute address known up front (code labels, page tables are
    /// resolved through `Data`).
    Code(usize),
}

/// The size of an absolute-address fixup.
#[derive(Clone, Copy, Debug)]
enum Width {
    Abs16,
    Abs32,
}

struct Fixup {
    at: usize,
    target: Target,
    width: Width,
}

/// A relative jump to a label: the displacement's offset and size (1 or 4 bytes).
struct Jump {
    at: usize,
    label: Label,
    size: usize,
}

/// A small x86 assembler for 16-, 32- and 64-bit code.
///
/// Two uses:
///
/// * [`build`] and [`smp_apic_id_reporter`] start from [`Asm::real_mode`]: the image
///   begins in real mode, switches modes itself (the code size follows), and keeps data,
///   the GDT and page tables after the code.
/// * [`Asm::flat32`] is code that a loader starts in flat 32-bit protected mode (no
///   prologue, no mode switch, e.g. a Multiboot kernel): the caller places the bytes from
///   [`Asm::finish`] and knows their address.
///
/// Instructions on 32-bit registers take an operand-size prefix (`66`) in 16-bit code,
/// memory operands an address-size prefix (`67`); in 64-bit code they stay 32-bit (the
/// result is zero-extended), as the images want. String instructions and `loop` use the
/// code's natural address size. Jumps to [`Label`]s are patched by [`Asm::finish`].
pub struct Asm {
    /// Guest address of the first byte (the data and absolute fixups depend on it).
    base: u64,
    /// Current code size: 16, 32 or 64.
    bits: u32,
    code: Vec<u8>,
    fixups: Vec<Fixup>,
    /// (bytes, alignment); laid out after the code in this order.
    data: Vec<(Vec<u8>, usize)>,
    gdtr: Option<DataId>,
    pml4: Option<DataId>,
    zero_idtr: Option<DataId>,
    /// Each label's code offset, once bound.
    labels: Vec<Option<usize>>,
    jumps: Vec<Jump>,
}

impl Asm {
    fn new(base: u64, bits: u32) -> Self {
        Asm {
            base,
            bits,
            code: Vec::new(),
            fixups: Vec::new(),
            data: Vec::new(),
            gdtr: None,
            pml4: None,
            zero_idtr: None,
            labels: Vec::new(),
            jumps: Vec::new(),
        }
    }

    /// 16-bit code loaded at `base`, where a vCPU starts in real mode.
    pub fn real_mode(base: u64) -> Self {
        Self::new(base, 16)
    }

    /// 32-bit code for a vCPU already in flat protected mode; the caller places the bytes.
    pub fn flat32() -> Self {
        Self::new(0, 32)
    }

    /// Raw bytes.
    pub fn emit(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }

    fn data(&mut self, bytes: Vec<u8>, align: usize) -> DataId {
        self.data.push((bytes, align));
        DataId(self.data.len() - 1)
    }

    fn fixup_abs16(&mut self, d: DataId) {
        self.fixups.push(Fixup {
            at: self.code.len(),
            target: Target::Data(d),
            width: Width::Abs16,
        });
        self.emit(&[0, 0]);
    }

    fn fixup_abs32(&mut self, t: Target) {
        self.fixups.push(Fixup {
            at: self.code.len(),
            target: t,
            width: Width::Abs32,
        });
        self.emit(&[0, 0, 0, 0]);
    }

    /// `66` operand-size prefix when a 32-bit operand is wanted in 16-bit code.
    fn osz32(&mut self) {
        if self.bits == 16 {
            self.emit(&[0x66]);
        }
    }

    /// `66` operand-size prefix when a 16-bit operand is wanted in 32/64-bit code.
    fn osz16(&mut self) {
        if self.bits != 16 {
            self.emit(&[0x66]);
        }
    }

    /// Address-size prefix `67` so that 16-bit code can use 32-bit addresses (`[edi]`).
    fn asz32(&mut self) {
        if self.bits == 16 {
            self.emit(&[0x67]);
        }
    }

    /// The prefixes of a 32-bit operation on a memory operand with a 32-bit address.
    fn mem32(&mut self) {
        self.asz32();
        self.osz32();
    }

    // ----- labels and jumps -----

    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the current position.
    pub fn bind(&mut self, l: Label) -> &mut Self {
        assert!(self.labels[l.0].is_none(), "label bound twice");
        self.labels[l.0] = Some(self.code.len());
        self
    }

    /// A new label bound here (a loop top).
    pub fn here(&mut self) -> Label {
        let l = self.label();
        self.bind(l);
        l
    }

    fn rel(&mut self, label: Label, size: usize) {
        self.jumps.push(Jump {
            at: self.code.len(),
            label,
            size,
        });
        self.code.resize(self.code.len() + size, 0);
    }

    fn assert_not_16(&self) {
        assert_ne!(self.bits, 16, "rel32 jumps need 32- or 64-bit code");
    }

    /// `jcc rel32` = `0F 80+cc cd`
    pub fn jcc(&mut self, cc: Cond, l: Label) -> &mut Self {
        self.assert_not_16();
        self.emit(&[0x0f, 0x80 | cc as u8]);
        self.rel(l, 4);
        self
    }

    /// `jmp rel32` = `E9 cd`
    pub fn jmp(&mut self, l: Label) -> &mut Self {
        self.assert_not_16();
        self.emit(&[0xe9]);
        self.rel(l, 4);
        self
    }

    /// `jcc rel8` = `70+cc cb`
    pub fn jcc_short(&mut self, cc: Cond, l: Label) -> &mut Self {
        self.emit(&[0x70 | cc as u8]);
        self.rel(l, 1);
        self
    }

    /// `jmp rel8` = `EB cb`
    pub fn jmp_short(&mut self, l: Label) -> &mut Self {
        self.emit(&[0xeb]);
        self.rel(l, 1);
        self
    }

    /// `loop rel8` = `E2 cb` (decrements (E)CX, jumps while it is not 0).
    pub fn loop_back(&mut self, l: Label) -> &mut Self {
        self.emit(&[0xe2]);
        self.rel(l, 1);
        self
    }

    // ----- moves and arithmetic -----

    /// `mov r32, imm32` = `[66] B8+r id` (zero-extends to 64 bits in long mode)
    pub fn mov_imm(&mut self, r: u8, imm: u32) -> &mut Self {
        self.osz32();
        self.emit(&[0xb8 + r]);
        self.emit(&imm.to_le_bytes())
    }

    /// `mov ax, imm16` = `[66] B8 iw`
    pub fn mov_ax_imm16(&mut self, v: u16) -> &mut Self {
        self.osz16();
        self.emit(&[0xb8]);
        self.emit(&v.to_le_bytes())
    }

    /// `mov al, imm8` = `B0 ib`
    pub fn mov_al(&mut self, imm: u8) -> &mut Self {
        self.emit(&[0xb0, imm])
    }

    /// `mov bl, imm8` = `B3 ib`
    pub fn mov_bl(&mut self, imm: u8) -> &mut Self {
        self.emit(&[0xb3, imm])
    }

    /// `mov al, bl` = `88 D8`
    pub fn mov_al_bl(&mut self) -> &mut Self {
        self.emit(&[0x88, 0xd8])
    }

    /// `op dst, src` (mod 11) with a 32-bit operand.
    fn alu_rr(&mut self, opcode: u8, dst: u8, src: u8) -> &mut Self {
        self.osz32();
        self.emit(&[opcode, 0xc0 | (src << 3) | dst])
    }

    /// `mov dst, src` = `89 /r` (mod 11)
    pub fn mov(&mut self, dst: u8, src: u8) -> &mut Self {
        self.alu_rr(0x89, dst, src)
    }

    /// `cmp dst, src` = `39 /r` (mod 11)
    pub fn cmp(&mut self, dst: u8, src: u8) -> &mut Self {
        self.alu_rr(0x39, dst, src)
    }

    /// `sub dst, src` = `29 /r` (mod 11)
    pub fn sub(&mut self, dst: u8, src: u8) -> &mut Self {
        self.alu_rr(0x29, dst, src)
    }

    /// `xor dst, src` = `31 /r` (mod 11)
    pub fn xor(&mut self, dst: u8, src: u8) -> &mut Self {
        self.alu_rr(0x31, dst, src)
    }

    fn alu_imm(&mut self, ext: u8, r: u8, imm: u32) -> &mut Self {
        self.osz32();
        self.emit(&[0x81, 0xc0 | (ext << 3) | r]);
        self.emit(&imm.to_le_bytes())
    }

    /// `add r, imm32` = `81 /0 id`
    pub fn add_imm(&mut self, r: u8, imm: u32) -> &mut Self {
        self.alu_imm(0, r, imm)
    }

    /// `or r, imm32` = `81 /1 id`
    pub fn or_imm(&mut self, r: u8, imm: u32) -> &mut Self {
        self.alu_imm(1, r, imm)
    }

    /// `and r, imm32` = `81 /4 id`
    pub fn and_imm(&mut self, r: u8, imm: u32) -> &mut Self {
        self.alu_imm(4, r, imm)
    }

    /// `sub r, imm32` = `81 /5 id`
    pub fn sub_imm(&mut self, r: u8, imm: u32) -> &mut Self {
        self.alu_imm(5, r, imm)
    }

    /// `cmp r, imm32` = `81 /7 id`
    pub fn cmp_imm(&mut self, r: u8, imm: u32) -> &mut Self {
        self.alu_imm(7, r, imm)
    }

    /// `shr r, n` = `C1 /5 ib`
    pub fn shr_imm(&mut self, r: u8, n: u8) -> &mut Self {
        self.osz32();
        self.emit(&[0xc1, 0xe8 | r, n])
    }

    /// `ror r, n` = `C1 /1 ib`
    pub fn ror_imm(&mut self, r: u8, n: u8) -> &mut Self {
        self.osz32();
        self.emit(&[0xc1, 0xc8 | r, n])
    }

    /// `cmp al, imm8` = `3C ib`
    pub fn cmp_al(&mut self, imm: u8) -> &mut Self {
        self.emit(&[0x3c, imm])
    }

    /// `test al, imm8` = `A8 ib`
    pub fn test_al(&mut self, imm: u8) -> &mut Self {
        self.emit(&[0xa8, imm])
    }

    /// `xor eax, eax; mov ax, sreg` (`31 C0`, `66 8C /r`; sreg 1 = CS, 2 = SS, 3 = DS)
    pub fn mov_eax_sreg(&mut self, sreg: u8) -> &mut Self {
        self.xor(EAX, EAX);
        self.osz16();
        self.emit(&[0x8c, 0xc0 | (sreg << 3)])
    }

    // ----- memory -----

    /// A ModRM byte for `[base+disp8]`.
    fn modrm_disp8(&mut self, reg: u8, base: u8, disp: i8) -> &mut Self {
        assert_ne!(base, ESP, "[esp+disp] needs a SIB byte");
        self.emit(&[0x40 | (reg << 3) | base, disp as u8])
    }

    /// A ModRM byte (and SIB in 64-bit code, where mod 00 rm 101 is RIP-relative) for the
    /// absolute address `[addr]`.
    fn modrm_abs(&mut self, reg: u8, addr: u32) -> &mut Self {
        if self.bits == 64 {
            self.emit(&[(reg << 3) | 4, 0x25]);
        } else {
            self.emit(&[(reg << 3) | 5]);
        }
        self.emit(&addr.to_le_bytes())
    }

    /// `mov dst, [base+disp8]` = `8B /r`
    pub fn load(&mut self, dst: u8, base: u8, disp: i8) -> &mut Self {
        self.mem32();
        self.emit(&[0x8b]);
        self.modrm_disp8(dst, base, disp)
    }

    /// `sub dst, [base+disp8]` = `2B /r`
    pub fn sub_load(&mut self, dst: u8, base: u8, disp: i8) -> &mut Self {
        self.mem32();
        self.emit(&[0x2b]);
        self.modrm_disp8(dst, base, disp)
    }

    /// `movzx dst, byte [base+disp8]` = `0F B6 /r`
    pub fn load_byte(&mut self, dst: u8, base: u8, disp: i8) -> &mut Self {
        self.mem32();
        self.emit(&[0x0f, 0xb6]);
        self.modrm_disp8(dst, base, disp)
    }

    /// `mov [base+disp8], src` = `89 /r`
    pub fn store(&mut self, base: u8, disp: i8, src: u8) -> &mut Self {
        self.mem32();
        self.emit(&[0x89]);
        self.modrm_disp8(src, base, disp)
    }

    /// `mov [base+index], src` = `89 /r` with a SIB byte (scale 1, no displacement;
    /// `base` must not be EBP).
    pub fn store_indexed(&mut self, base: u8, index: u8, src: u8) -> &mut Self {
        assert!(base != EBP && index != ESP);
        self.mem32();
        self.emit(&[0x89, (src << 3) | 4, (index << 3) | base])
    }

    /// `mov dst, [addr]` = `8B /r` (absolute disp32)
    pub fn load_abs(&mut self, dst: u8, addr: u32) -> &mut Self {
        self.mem32();
        self.emit(&[0x8b]);
        self.modrm_abs(dst, addr)
    }

    /// `mov eax, [addr]` = `A1 id` (`8B /r` in 64-bit code, where `A1` takes a 64-bit
    /// address)
    pub fn load_eax_abs(&mut self, addr: u32) -> &mut Self {
        if self.bits == 64 {
            return self.load_abs(EAX, addr);
        }
        self.mem32();
        self.emit(&[0xa1]);
        self.emit(&addr.to_le_bytes())
    }

    /// `mov [addr], src` = `89 /r` (absolute disp32)
    pub fn store_abs(&mut self, addr: u32, src: u8) -> &mut Self {
        self.mem32();
        self.emit(&[0x89]);
        self.modrm_abs(src, addr)
    }

    /// `cmp byte [addr], imm8` = `80 /7 ib` (absolute disp32)
    pub fn cmp_byte_abs(&mut self, addr: u32, imm: u8) -> &mut Self {
        self.asz32();
        self.emit(&[0x80]);
        self.modrm_abs(7, addr);
        self.emit(&[imm])
    }

    /// `mov [edi], eax` = `89 07` (`[rdi]` in long mode)
    fn store_eax_edi(&mut self) -> &mut Self {
        self.mem32();
        self.emit(&[0x89, 0x07])
    }

    /// `mov eax, [edi]` = `8B 07` (`[rdi]` in long mode)
    fn load_eax_edi(&mut self) -> &mut Self {
        self.mem32();
        self.emit(&[0x8b, 0x07])
    }

    /// `cld; rep movsb` (`FC F3 A4`): copies (E)CX bytes from [(E)SI] to [(E)DI].
    pub fn rep_movsb(&mut self) -> &mut Self {
        self.emit(&[0xfc, 0xf3, 0xa4])
    }

    /// `cld; repe cmpsb` (`FC F3 A6`): ZF = 1 if the (E)CX bytes at [(E)SI] and [(E)DI]
    /// are equal ((E)CX must not be 0).
    pub fn repe_cmpsb(&mut self) -> &mut Self {
        self.emit(&[0xfc, 0xf3, 0xa6])
    }

    /// `lodsb` (`AC`): AL = [(E)SI], (E)SI += 1 (DF = 0).
    pub fn lodsb(&mut self) -> &mut Self {
        self.emit(&[0xac])
    }

    // ----- ports -----

    /// `mov dx, imm16` = `[66] BA iw`
    pub fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.osz16();
        self.emit(&[0xba]);
        self.emit(&port.to_le_bytes())
    }

    /// `out dx, al` (`EE`), DX already loaded.
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.emit(&[0xee])
    }

    /// `out dx, ax` (`[66] EF`), DX already loaded.
    pub fn out_dx_ax(&mut self) -> &mut Self {
        self.osz16();
        self.emit(&[0xef])
    }

    /// `out dx, eax` (`[66] EF`), DX already loaded.
    pub fn out_dx_eax(&mut self) -> &mut Self {
        self.osz32();
        self.emit(&[0xef])
    }

    /// `in al, dx` (`EC`), DX already loaded.
    pub fn in_al_dx(&mut self) -> &mut Self {
        self.emit(&[0xec])
    }

    /// `in ax, dx` (`[66] ED`), DX already loaded.
    pub fn in_ax_dx(&mut self) -> &mut Self {
        self.osz16();
        self.emit(&[0xed])
    }

    /// `in eax, dx` (`[66] ED`), DX already loaded.
    pub fn in_eax_dx(&mut self) -> &mut Self {
        self.osz32();
        self.emit(&[0xed])
    }

    /// `mov dx, port; out dx, al`
    pub fn out_al(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port).out_dx_al()
    }

    /// `mov dx, port; out dx, ax`
    pub fn out_ax(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port).out_dx_ax()
    }

    /// `mov dx, port; out dx, eax`
    pub fn out_eax(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port).out_dx_eax()
    }

    /// `mov dx, port; in al, dx`
    pub fn in_al(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port).in_al_dx()
    }

    /// `mov dx, port; in eax, dx`
    pub fn in_eax(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port).in_eax_dx()
    }

    /// `mov dx, port; mov al, code; out dx, al; 1: hlt; jmp 1b`: an isa-debug-exit style
    /// exit.
    pub fn exit(&mut self, port: u16, code: u8) -> &mut Self {
        self.mov_dx(port).mov_al(code).out_dx_al().hlt_loop()
    }

    // ----- system -----

    /// `1: hlt; jmp 1b` (`F4 EB FD`)
    pub fn hlt_loop(&mut self) -> &mut Self {
        let top = self.here();
        self.emit(&[0xf4]);
        self.jmp_short(top)
    }

    /// `pause` (`F3 90`)
    pub fn pause(&mut self) -> &mut Self {
        self.emit(&[0xf3, 0x90])
    }

    /// `cpuid` (`0F A2`)
    pub fn cpuid(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0xa2])
    }

    /// `rdtsc` (`0F 31`): EDX:EAX = TSC.
    pub fn rdtsc(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x31])
    }

    /// `rdmsr` (`0F 32`): EDX:EAX = MSR[ECX].
    pub fn rdmsr(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x32])
    }

    /// `wrmsr` (`0F 30`): MSR[ECX] = EDX:EAX.
    pub fn wrmsr(&mut self) -> &mut Self {
        self.emit(&[0x0f, 0x30])
    }

    // ----- what the guest images are made of -----

    /// `mov (e)si/(e)di/(e)cx, imm` with the natural register width for
    /// string instructions: 16-bit `BE|BF|B9 iw` in real mode, 32-bit
    /// `BE|BF|B9 id` otherwise (zero-extended to 64 bits in long mode).
    fn mov_strreg(&mut self, opcode: u8, t: Target) {
        self.emit(&[opcode]);
        if self.bits == 16 {
            let Target::Data(d) = t else { unreachable!() };
            self.fixup_abs16(d);
        } else {
            self.fixup_abs32(t);
        }
    }

    fn mov_strreg_imm(&mut self, opcode: u8, v: u32) {
        self.emit(&[opcode]);
        if self.bits == 16 {
            self.emit(&u16::try_from(v).expect("16-bit count").to_le_bytes());
        } else {
            self.emit(&v.to_le_bytes());
        }
    }

    /// ```text
    /// cli                  ; FA
    /// xor ax, ax           ; 31 C0
    /// mov ds, ax           ; 8E D8
    /// mov es, ax           ; 8E C0
    /// mov ss, ax           ; 8E D0
    /// mov sp, LOAD_ADDR    ; BC iw   (stack grows down below the image)
    /// ```
    fn real_mode_prologue(&mut self) {
        assert_eq!(self.bits, 16);
        self.emit(&[0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc]);
        self.emit(&(self.base as u16).to_le_bytes());
    }

    /// The GDT and its pseudo-descriptor (shared by all mode switches).
    fn gdtr(&mut self) -> DataId {
        if let Some(d) = self.gdtr {
            return d;
        }
        let gdt: [u64; 4] = [
            0,
            0x00cf_9a00_0000_ffff, // 0x08: code, base 0, limit 4G, D=1
            0x00cf_9200_0000_ffff, // 0x10: data, base 0, limit 4G, B=1
            0x00af_9a00_0000_ffff, // 0x18: code, L=1, D=0
        ];
        let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
        let gdt = self.data(bytes, 8);
        // Pseudo-descriptor: limit (2 bytes) + base (4 bytes); the base is
        // patched in `finish` (the data layout is not known yet).
        let gdtr = self.data(vec![(4 * 8 - 1) as u8, 0, 0, 0, 0, 0], 8);
        self.gdtr = Some(gdtr);
        debug_assert_eq!(gdt.0 + 1, gdtr.0);
        gdtr
    }

    /// ```text
    /// lgdt [gdtr]          ; 0F 01 16 disp16
    /// mov eax, cr0         ; 0F 20 C0
    /// or al, 1             ; 0C 01
    /// mov cr0, eax         ; 0F 22 C0
    /// ```
    fn lgdt_and_set_pe(&mut self) {
        let gdtr = self.gdtr();
        self.emit(&[0x0f, 0x01, 0x16]);
        self.fixup_abs16(gdtr);
        self.emit(&[0x0f, 0x20, 0xc0, 0x0c, 0x01, 0x0f, 0x22, 0xc0]);
    }

    /// Big real mode: DS and ES get a 4 GiB limit, CR0.PE ends up 0.
    ///
    /// ```text
    /// lgdt [gdtr]; mov eax, cr0; or al, 1; mov cr0, eax
    /// mov bx, 0x10         ; BB 10 00
    /// mov ds, bx           ; 8E DB
    /// mov es, bx           ; 8E C3
    /// and al, 0xfe         ; 24 FE
    /// mov cr0, eax         ; 0F 22 C0
    /// xor bx, bx           ; 31 DB   (selectors back to 0: base 0, the
    /// mov ds, bx           ; 8E DB    cached 4 GiB limit is kept)
    /// mov es, bx           ; 8E C3
    /// ```
    fn enter_big_real_mode(&mut self) {
        self.lgdt_and_set_pe();
        self.emit(&[0xbb, 0x10, 0x00, 0x8e, 0xdb, 0x8e, 0xc3]);
        self.emit(&[0x24, 0xfe, 0x0f, 0x22, 0xc0]);
        self.emit(&[0x31, 0xdb, 0x8e, 0xdb, 0x8e, 0xc3]);
    }

    /// ```text
    /// lgdt [gdtr]; mov eax, cr0; or al, 1; mov cr0, eax
    /// jmp dword 0x08:pm32  ; 66 EA id iw
    /// pm32:                ; [bits 32]
    /// mov ax, 0x10         ; 66 B8 10 00
    /// mov ds, ax           ; 8E D8
    /// mov es, ax           ; 8E C0
    /// mov ss, ax           ; 8E D0
    /// mov esp, LOAD_ADDR   ; BC id
    /// ```
    fn enter_protected32(&mut self) {
        self.lgdt_and_set_pe();
        self.emit(&[0x66, 0xea]);
        let target = self.code.len() + 6;
        self.fixup_abs32(Target::Code(target));
        self.emit(&SEL_CODE32.to_le_bytes());
        debug_assert_eq!(self.code.len(), target);
        self.bits = 32;
        self.emit(&[0x66, 0xb8]);
        self.emit(&SEL_DATA32.to_le_bytes());
        self.emit(&[0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc]);
        self.emit(&(self.base as u32).to_le_bytes());
    }

    /// From 32-bit protected mode, with host-built page tables:
    ///
    /// ```text
    /// mov eax, cr4         ; 0F 20 E0
    /// or al, 0x20          ; 0C 20        CR4.PAE
    /// mov cr4, eax         ; 0F 22 E0
    /// mov eax, pml4        ; B8 id
    /// mov cr3, eax         ; 0F 22 D8
    /// mov ecx, 0xc0000080  ; B9 80 00 00 C0   IA32_EFER
    /// rdmsr                ; 0F 32
    /// or ah, 1             ; 80 CC 01     EFER.LME (bit 8)
    /// wrmsr                ; 0F 30
    /// mov eax, cr0         ; 0F 20 C0
    /// or eax, 0x80000000   ; 0D 00 00 00 80   CR0.PG
    /// mov cr0, eax         ; 0F 22 C0
    /// jmp 0x18:lm64        ; EA id iw
    /// lm64:                ; [bits 64]
    /// ```
    fn enter_long64(&mut self) {
        let pml4 = self.page_tables();
        self.emit(&[0x0f, 0x20, 0xe0, 0x0c, 0x20, 0x0f, 0x22, 0xe0, 0xb8]);
        self.fixup_abs32(Target::Data(pml4));
        self.emit(&[0x0f, 0x22, 0xd8]);
        self.emit(&[
            0xb9, 0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0x80, 0xcc, 0x01, 0x0f, 0x30,
        ]);
        self.emit(&[
            0x0f, 0x20, 0xc0, 0x0d, 0x00, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0,
        ]);
        self.emit(&[0xea]);
        let target = self.code.len() + 6;
        self.fixup_abs32(Target::Code(target));
        self.emit(&SEL_CODE64.to_le_bytes());
        debug_assert_eq!(self.code.len(), target);
        self.bits = 64;
    }

    /// PML4, PDPT and 4 page directories, contiguous and 4 KiB-aligned;
    /// the table pointers are patched in `finish` once the address is
    /// known. Returns the PML4's data id.
    fn page_tables(&mut self) -> DataId {
        let d = self.data(vec![0; 6 * 4096], 4096);
        self.pml4 = Some(d);
        d
    }

    fn zero_idtr(&mut self) -> DataId {
        if let Some(d) = self.zero_idtr {
            return d;
        }
        // limit 0, base 0 (10 bytes: enough for the 64-bit form).
        let d = self.data(vec![0; 10], 8);
        self.zero_idtr = Some(d);
        d
    }

    /// Emits one op; returns the data id of a `rep insb` buffer (resolved
    /// to an address by the caller after `into_image`).
    fn op(&mut self, op: &Op) -> Option<DataId> {
        match *op {
            Op::OutB { port, value } => {
                self.mov_dx(port).mov_al(value).out_dx_al();
            }
            Op::OutW { port, value } => {
                self.mov_dx(port).mov_ax_imm16(value).out_dx_ax();
            }
            Op::OutL { port, value } => {
                self.mov_dx(port).mov_imm(EAX, value).out_dx_eax();
            }
            Op::InB { port } => {
                self.in_al(port);
            }
            Op::InW { port } => {
                self.mov_dx(port).in_ax_dx();
            }
            Op::InL { port } => {
                self.in_eax(port);
            }
            Op::OutsB { port, ref data } => {
                let len = u32::try_from(data.len()).expect("outsb length");
                let d = self.data(data.clone(), 1);
                self.mov_dx(port);
                self.mov_strreg(0xbe, Target::Data(d)); // mov (e)si, data
                self.mov_strreg_imm(0xb9, len); // mov (e)cx, len
                self.emit(&[0xfc, 0xf3, 0x6e]); // cld ; rep outsb
            }
            Op::InsB { port, count } => {
                let d = self.data(vec![0; usize::from(count)], 1);
                self.mov_dx(port);
                self.mov_strreg(0xbf, Target::Data(d)); // mov (e)di, buf
                self.mov_strreg_imm(0xb9, u32::from(count)); // mov (e)cx, count
                self.emit(&[0xfc, 0xf3, 0x6c]); // cld ; rep insb
                return Some(d);
            }
            Op::MmioWriteL { addr, value } => {
                self.mov_imm(EDI, addr).mov_imm(EAX, value).store_eax_edi();
            }
            Op::MmioReadL { addr } => {
                self.mov_imm(EDI, addr).load_eax_edi();
            }
            Op::EchoInB { from, to } => {
                self.in_al(from).out_al(to);
            }
            Op::Loop { port } => {
                self.mov_dx(port);
                self.emit(&[0x31, 0xc0]); // xor eax, eax (xor ax, ax in real mode)
                let top = self.here();
                self.out_dx_al().jmp_short(top);
            }
            Op::MmioLoop { addr } => {
                self.mov_imm(EDI, addr);
                self.emit(&[0x31, 0xc0]); // xor eax, eax (xor ax, ax in real mode)
                let top = self.here();
                self.store_eax_edi().jmp_short(top);
            }
            Op::Hlt => {
                self.emit(&[0xf4]);
            }
            Op::Spin => {
                let top = self.here();
                self.jmp_short(top);
            }
            Op::TripleFault => {
                let idtr = self.zero_idtr();
                match self.bits {
                    // lidt [disp16]   ; 0F 01 1E disp16
                    // (real mode: then mov eax, cr0; or al, 1; mov cr0, eax
                    //  = 0F 20 C0 0C 01 0F 22 C0, see `Op::TripleFault`)
                    16 => {
                        self.emit(&[0x0f, 0x01, 0x1e]);
                        self.fixup_abs16(idtr);
                        self.emit(&[0x0f, 0x20, 0xc0, 0x0c, 0x01, 0x0f, 0x22, 0xc0]);
                    }
                    // lidt [disp32]   ; 0F 01 1D disp32
                    32 => {
                        self.emit(&[0x0f, 0x01, 0x1d]);
                        self.fixup_abs32(Target::Data(idtr));
                    }
                    // lidt [disp32]   ; 0F 01 1C 25 disp32 (SIB, no base: absolute)
                    _ => {
                        self.emit(&[0x0f, 0x01, 0x1c, 0x25]);
                        self.fixup_abs32(Target::Data(idtr));
                    }
                }
                self.emit(&[0x0f, 0x0b]); // ud2
            }
        }
        None
    }

    /// The code with every jump patched (data, if any, laid out after it): what
    /// [`Asm::flat32`] code is placed from.
    pub fn finish(self) -> Vec<u8> {
        self.link().0
    }

    /// The linked bytes as an image that starts at its first byte.
    fn into_image(self, mode: Mode, exit_port: u16) -> (GuestImage, Vec<u64>) {
        let load_addr = self.base;
        let (bytes, addrs) = self.link();
        let image = GuestImage {
            load_addr,
            bytes,
            mode,
            entry: load_addr,
            exit_port,
            ins_buffers: Vec::new(),
        };
        (image, addrs)
    }

    /// Lays out the data after the code, patches the jumps, the fixups and the tables.
    /// Returns the bytes and the address of every data item.
    fn link(mut self) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = std::mem::take(&mut self.code);
        for j in &self.jumps {
            let target = self.labels[j.label.0].expect("jump to an unbound label");
            let rel = target as i64 - (j.at + j.size) as i64;
            match j.size {
                1 => bytes[j.at] = i8::try_from(rel).expect("short jump out of range") as u8,
                _ => bytes[j.at..j.at + 4].copy_from_slice(&(rel as i32).to_le_bytes()),
            }
        }
        let mut addrs = Vec::with_capacity(self.data.len());
        for (d, align) in &self.data {
            while !bytes.len().is_multiple_of(*align) {
                bytes.push(0);
            }
            addrs.push(self.base + bytes.len() as u64);
            bytes.extend_from_slice(d);
        }
        let off = |addr: u64| (addr - self.base) as usize;
        for f in &self.fixups {
            let addr = match f.target {
                Target::Data(d) => addrs[d.0],
                Target::Code(c) => self.base + c as u64,
            };
            match f.width {
                Width::Abs16 => {
                    let v = u16::try_from(addr).expect("real-mode address above 64 KiB");
                    bytes[f.at..f.at + 2].copy_from_slice(&v.to_le_bytes());
                }
                Width::Abs32 => {
                    let v = u32::try_from(addr).expect("address above 4 GiB");
                    bytes[f.at..f.at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        if let Some(gdtr) = self.gdtr {
            let gdt_addr = addrs[gdtr.0 - 1] as u32;
            let at = off(addrs[gdtr.0]) + 2;
            bytes[at..at + 4].copy_from_slice(&gdt_addr.to_le_bytes());
        }
        if let Some(pml4) = self.pml4 {
            let pml4_addr = addrs[pml4.0];
            let at = off(pml4_addr);
            let pdpt = pml4_addr + 0x1000;
            // PML4[0] -> PDPT (present, writable).
            bytes[at..at + 8].copy_from_slice(&(pdpt | 0x3).to_le_bytes());
            for i in 0..4u64 {
                let pd = pml4_addr + 0x2000 + i * 0x1000;
                // PDPT[i] -> PD i (present, writable).
                let e = off(pdpt) + i as usize * 8;
                bytes[e..e + 8].copy_from_slice(&(pd | 0x3).to_le_bytes());
                for j in 0..512u64 {
                    // PD i [j]: 2 MiB page (present, writable, PS).
                    let page = ((i * 512 + j) << 21) | 0x83;
                    let e = off(pd) + j as usize * 8;
                    bytes[e..e + 8].copy_from_slice(&page.to_le_bytes());
                }
            }
        }
        (bytes, addrs)
    }
}
