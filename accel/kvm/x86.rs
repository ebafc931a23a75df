//! x86 vCPU set-up under KVM (QEMU's `target/i386/kvm/kvm.c`: `kvm_arch_init_vcpu`,
//! `kvm_put_msrs`) and QEMU's `info registers` dump.

use std::fmt::Write as _;

use hw::core::machine::{machine_state, SmpConfig};
use hw::i386::x86_cpu::{Reg, X86Cpu, FEATURES};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use qom::Object;

use crate::kvm::kvm_all::{ioctl_error, KvmError, KvmVm};

fn reg_mut(entry: &mut kvm_bindings::kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

fn reg_name(reg: Reg) -> &'static str {
    match reg {
        Reg::Eax => "EAX",
        Reg::Ebx => "EBX",
        Reg::Ecx => "ECX",
        Reg::Edx => "EDX",
    }
}

/// Leaves whose feature bits a named model controls completely.
const FEATURE_LEAVES: &[(u32, Reg)] = &[
    (1, Reg::Ecx),
    (1, Reg::Edx),
    (7, Reg::Ebx),
    (0x8000_0001, Reg::Ecx),
    (0x8000_0001, Reg::Edx),
];

fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// QEMU's `x86_cpu_filter_features` + `cpu_x86_cpuid`: KVM's supported CPUID, filtered by
/// the model and the command line, with the vCPU's identity and topology.
pub(crate) fn build_cpuid(vm: &KvmVm, cpu: &Object, smp: SmpConfig) -> CpuId {
    let mut cpuid = vm.supported_cpuid.clone();
    let supported = vm.supported_cpuid.clone();
    let x86 = cpu.downcast::<X86Cpu>();
    let model = x86.and_then(X86Cpu::model);
    let passthrough = model.is_none_or(|m| m.passthrough);
    let overrides = x86.map(X86Cpu::feature_overrides).unwrap_or_default();
    let supported_bit = |leaf: u32, reg: Reg, bit: u8| {
        supported.as_slice().iter().any(|e| {
            e.function == leaf && e.index == 0 && {
                let mut e = *e;
                *reg_mut(&mut e, reg) & (1 << bit) != 0
            }
        })
    };
    for entry in cpuid.as_mut_slice() {
        if !passthrough && entry.index == 0 {
            for &(leaf, reg) in FEATURE_LEAVES {
                if entry.function == leaf {
                    *reg_mut(entry, reg) = 0;
                }
            }
        }
    }
    let mut wanted: Vec<(&'static hw::i386::x86_cpu::Feature, bool)> = Vec::new();
    if let Some(m) = model.filter(|m| !m.passthrough) {
        for name in m.features {
            if let Some(f) = FEATURES.iter().find(|f| f.name == *name) {
                wanted.push((f, true));
            }
        }
    }
    wanted.extend(overrides);
    for (feature, on) in wanted {
        // The hypervisor bit is the VMM's to set, whatever KVM lists (QEMU sets it too).
        let supported_here =
            feature.name == "hypervisor" || supported_bit(feature.leaf, feature.reg, feature.bit);
        // One warning per feature per VM, not one per vCPU.
        if on && !supported_here && vm.warned_features.lock().insert(feature.name) {
            eprintln!(
                "qomvm: warning: host doesn't support requested feature: CPUID.{:02X}H:{}.{} [bit {}]",
                feature.leaf,
                reg_name(feature.reg),
                feature.name,
                feature.bit
            );
        }
        for entry in cpuid.as_mut_slice() {
            if entry.function == feature.leaf && entry.index == feature.subleaf {
                let r = reg_mut(entry, feature.reg);
                if on && supported_here {
                    *r |= 1 << feature.bit;
                } else if !on {
                    *r &= !(1 << feature.bit);
                }
            }
        }
    }

    let vendor = x86
        .and_then(X86Cpu::vendor)
        .filter(|v| v.len() == 12)
        .or_else(|| model.and_then(|m| m.vendor).map(str::to_string));
    let apic_id = x86.map_or(0, X86Cpu::apic_id);
    let threads_per_socket = smp.cores * smp.threads;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0 | 0x8000_0000 => {
                if let Some(v) = &vendor {
                    let b = v.as_bytes();
                    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                    entry.ebx = word(0);
                    entry.edx = word(4);
                    entry.ecx = word(8);
                }
            }
            1 => {
                if let Some(m) = model.filter(|m| !m.passthrough) {
                    let (family, ext_family) = if m.family > 0x0f {
                        (0x0f, m.family - 0x0f)
                    } else {
                        (m.family, 0)
                    };
                    entry.eax = m.stepping
                        | ((m.model & 0xf) << 4)
                        | (family << 8)
                        | ((m.model >> 4) << 16)
                        | (ext_family << 20);
                }
                entry.ebx = (apic_id << 24) | ((threads_per_socket & 0xff) << 16) | (8 << 8);
                if threads_per_socket > 1 {
                    entry.edx |= 1 << 28;
                } else {
                    entry.edx &= !(1 << 28);
                }
            }
            4 => {
                entry.eax = (entry.eax & 0x3ff) | ((smp.cores.saturating_sub(1) & 0x3f) << 26);
            }
            0xb => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = bits_for(smp.threads);
                        entry.ebx = smp.threads;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = bits_for(smp.threads) + bits_for(smp.cores);
                        entry.ebx = threads_per_socket;
                        entry.ecx = (2 << 8) | 1;
                    }
                    i => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = i;
                    }
                }
            }
            0x8000_0002..=0x8000_0004 => {
                if let Some(id) = model.and_then(|m| m.model_id) {
                    let mut brand = [0u8; 48];
                    let n = id.len().min(47);
                    brand[..n].copy_from_slice(&id.as_bytes()[..n]);
                    let off = (entry.function - 0x8000_0002) as usize * 16;
                    let word = |i: usize| {
                        u32::from_le_bytes([
                            brand[off + i],
                            brand[off + i + 1],
                            brand[off + i + 2],
                            brand[off + i + 3],
                        ])
                    };
                    entry.eax = word(0);
                    entry.ebx = word(4);
                    entry.ecx = word(8);
                    entry.edx = word(12);
                }
            }
            _ => {}
        }
    }
    cpuid
}

/// MSRs set for boot (as Firecracker and QEMU's reset do), limited to those KVM lists in
/// `KVM_GET_MSR_INDEX_LIST`: hosts differ, and QEMU aborts on a missing one.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

/// MSRs already warned about: one warning per MSR, not per vCPU.
static WARNED_MSRS: parking_lot::Mutex<std::collections::BTreeSet<u32>> =
    parking_lot::Mutex::new(std::collections::BTreeSet::new());

/// QEMU's `kvm_arch_init_vcpu`: CPUID. The rest of the vCPU's state is set by
/// [`reset_vcpu`], which runs before its first `KVM_RUN` and after each system reset.
pub(crate) fn init_vcpu(vm: &KvmVm, cpu: &Object, vcpu: &mut VcpuFd) -> Result<(), KvmError> {
    let smp = vm
        .machine
        .upgrade()
        .and_then(|m| machine_state(&m).map(|ms| ms.smp()))
        .unwrap_or_default();
    let cpuid = build_cpuid(vm, cpu, smp);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| ioctl_error("KVM_SET_CPUID2", e))
}

/// The CPUID `KVM_SET_CPUID2` gives `cpu` of a machine on KVM (what [`init_vcpu`] sets), or
/// `None` when the machine is not on KVM. For benchmarks that build a raw KVM VM configured
/// like qomvm's.
pub fn vcpu_cpuid(machine: &Object, cpu: &Object) -> Option<CpuId> {
    let ms = machine_state(machine)?;
    let ops = ms.accel_ops()?;
    let vm = ops.as_any().downcast_ref::<KvmVm>()?;
    Some(build_cpuid(vm, cpu, ms.smp()))
}

fn set_boot_msrs(vm: &KvmVm, vcpu: &VcpuFd) -> Result<(), KvmError> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .filter(|(index, _)| {
            let listed = vm.msr_index_list.contains(index);
            if !listed && WARNED_MSRS.lock().insert(*index) {
                eprintln!("qomvm: warning: KVM does not list MSR 0x{index:x}; it is left unset");
            }
            listed
        })
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Ioctl {
        what: "KVM_SET_MSRS",
        reason: "too many MSRs".into(),
    })?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| ioctl_error("KVM_SET_MSRS", e))?;
    if written != entries.len() {
        log::warn!(
            "KVM accepted {written} of {} boot MSRs (first refused: 0x{:x})",
            entries.len(),
            entries[written].index
        );
    }
    Ok(())
}

/// The LAPIC with LINT0 delivering the PIC's ExtINT and LINT1 NMIs, as a BIOS sets them.
fn lapic_with_lints(lapic: &kvm_bindings::kvm_lapic_state) -> kvm_bindings::kvm_lapic_state {
    let mut lapic = *lapic;
    let set_lvt = |regs: &mut [std::os::raw::c_char], offset: usize, mode: u32| {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    };
    set_lvt(&mut lapic.regs, 0x350, 0x7); // LINT0: ExtINT
    set_lvt(&mut lapic.regs, 0x360, 0x4); // LINT1: NMI
    lapic
}

/// The vCPU's state right after creation: the architectural reset state KVM gives it,
/// which a system reset restores.
pub(crate) struct PristineState {
    regs: kvm_bindings::kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    lapic: kvm_bindings::kvm_lapic_state,
    mp_state: kvm_bindings::kvm_mp_state,
}

impl PristineState {
    pub(crate) fn capture(vcpu: &VcpuFd) -> Result<Self, KvmError> {
        Ok(PristineState {
            regs: vcpu
                .get_regs()
                .map_err(|e| ioctl_error("KVM_GET_REGS", e))?,
            sregs: vcpu
                .get_sregs()
                .map_err(|e| ioctl_error("KVM_GET_SREGS", e))?,
            lapic: vcpu
                .get_lapic()
                .map_err(|e| ioctl_error("KVM_GET_LAPIC", e))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(|e| ioctl_error("KVM_GET_MP_STATE", e))?,
        })
    }
}

/// QEMU's `kvm_arch_reset_vcpu` + `x86_cpu_reset`: the reset state (boot MSRs, FPU, LAPIC
/// with LINT0/LINT1 wired as firmware does), then a loader's start state if there is one,
/// which also makes the vCPU runnable; without one an AP waits for INIT/SIPI again.
pub(crate) fn reset_vcpu(
    vm: &KvmVm,
    cpu: &Object,
    vcpu: &mut VcpuFd,
    pristine: &PristineState,
) -> Result<(), KvmError> {
    set_boot_msrs(vm, vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| ioctl_error("KVM_SET_FPU", e))?;
    vcpu.set_lapic(&lapic_with_lints(&pristine.lapic))
        .map_err(|e| ioctl_error("KVM_SET_LAPIC", e))?;
    let (regs, sregs, mp_state) = match cpu.downcast::<X86Cpu>().and_then(X86Cpu::boot_state) {
        Some(state) => (
            state.regs,
            state.sregs,
            kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            },
        ),
        None => (pristine.regs, pristine.sregs, pristine.mp_state),
    };
    vcpu.set_sregs(&sregs)
        .map_err(|e| ioctl_error("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| ioctl_error("KVM_SET_REGS", e))?;
    vcpu.set_mp_state(mp_state)
        .map_err(|e| ioctl_error("KVM_SET_MP_STATE", e))?;
    Ok(())
}

fn segment_line(out: &mut String, name: &str, s: &kvm_segment, long: bool) {
    let flags = (u32::from(s.type_) << 8)
        | (u32::from(s.s) << 12)
        | (u32::from(s.dpl) << 13)
        | (u32::from(s.present) << 15)
        | (u32::from(s.avl) << 20)
        | (u32::from(s.l) << 21)
        | (u32::from(s.db) << 22)
        | (u32::from(s.g) << 23);
    if long {
        let _ = writeln!(
            out,
            "{name:<3}={:04x} {:016x} {:08x} {flags:08x}",
            s.selector, s.base, s.limit
        );
    } else {
        let _ = writeln!(
            out,
            "{name:<3}={:04x} {:08x} {:08x} {flags:08x}",
            s.selector, s.base, s.limit
        );
    }
}

/// The vCPU's registers in the layout of QEMU's `info registers` (`x86_cpu_dump_state`).
pub(crate) fn register_dump(vcpu: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "(registers unavailable)\n".to_string();
    };
    let long = s.efer & (1 << 10) != 0;
    let mut out = String::new();
    let fl = r.rflags;
    let flag = |bit: u32, c: char| if fl & (1 << bit) != 0 { c } else { '-' };
    let flags: String = [
        flag(11, 'O'),
        flag(10, 'D'),
        flag(7, 'S'),
        flag(6, 'Z'),
        flag(4, 'A'),
        flag(2, 'P'),
        flag(0, 'C'),
    ]
    .iter()
    .collect();
    let cpl = s.cs.dpl;
    if long {
        let _ = writeln!(
            out,
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
            r.rax, r.rbx, r.rcx, r.rdx
        );
        let _ = writeln!(
            out,
            "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
            r.rsi, r.rdi, r.rbp, r.rsp
        );
        let _ = writeln!(
            out,
            "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
            r.r8, r.r9, r.r10, r.r11
        );
        let _ = writeln!(
            out,
            "R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
            r.r12, r.r13, r.r14, r.r15
        );
        let _ = writeln!(out, "RIP={:016x} RFL={:08x} [{flags}] CPL={cpl}", r.rip, fl);
    } else {
        let _ = writeln!(
            out,
            "EAX={:08x} EBX={:08x} ECX={:08x} EDX={:08x}",
            r.rax as u32, r.rbx as u32, r.rcx as u32, r.rdx as u32
        );
        let _ = writeln!(
            out,
            "ESI={:08x} EDI={:08x} EBP={:08x} ESP={:08x}",
            r.rsi as u32, r.rdi as u32, r.rbp as u32, r.rsp as u32
        );
        let _ = writeln!(
            out,
            "EIP={:08x} EFL={:08x} [{flags}] CPL={cpl}",
            r.rip as u32, fl as u32
        );
    }
    for (name, seg) in [
        ("ES", &s.es),
        ("CS", &s.cs),
        ("SS", &s.ss),
        ("DS", &s.ds),
        ("FS", &s.fs),
        ("GS", &s.gs),
        ("LDT", &s.ldt),
        ("TR", &s.tr),
    ] {
        segment_line(&mut out, name, seg, long);
    }
    if long {
        let _ = writeln!(out, "GDT=     {:016x} {:08x}", s.gdt.base, s.gdt.limit);
        let _ = writeln!(out, "IDT=     {:016x} {:08x}", s.idt.base, s.idt.limit);
        let _ = writeln!(
            out,
            "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}",
            s.cr0, s.cr2, s.cr3, s.cr4
        );
    } else {
        let _ = writeln!(out, "GDT=     {:08x} {:08x}", s.gdt.base, s.gdt.limit);
        let _ = writeln!(out, "IDT=     {:08x} {:08x}", s.idt.base, s.idt.limit);
        let _ = writeln!(
            out,
            "CR0={:08x} CR2={:08x} CR3={:08x} CR4={:08x}",
            s.cr0, s.cr2 as u32, s.cr3 as u32, s.cr4
        );
    }
    let _ = writeln!(out, "EFER={:016x}", s.efer);
    out
}
