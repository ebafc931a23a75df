//! What KVM holds of a VM, saved and loaded for snapshots and migration (QEMU's
//! `kvm_arch_get_registers`/`kvm_arch_put_registers`, `kvm_get_clock`, the in-kernel
//! irqchip and PIT's `kvm_*_get`/`_put`).
//!
//! A vCPU's section: the general and system registers, the extended (XSAVE) state and
//! XCRs, the MSRs KVM lists as saveable, the local APIC page, pending events, the MP state
//! and debug registers, each by name, the KVM structures as their bytes (the ABI is
//! stable). The VM's section: the PIC pair and the IOAPIC, the PIT, and the kvmclock.

use hw::core::vmstate::{pod_bytes, pod_from_bytes, VmStateError, VmStateSection};
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::kvm::kvm_all::errno_text;

/// The vCPU section's layout version.
const CPU_STATE_VERSION: u32 = 1;
/// The VM section's.
const VM_STATE_VERSION: u32 = 1;

/// MSRs KVM reports as saveable that are not state to carry: the TSC is carried as
/// `IA32_TSC` below, first, as QEMU puts it before the others.
const MSR_IA32_TSC: u32 = 0x10;
/// Put after the local APIC (QEMU's `kvm_put_tscdeadline_msr`): KVM drops a deadline
/// written while the APIC timer is not in TSC-deadline mode, which it is not until the
/// APIC state is loaded, and loading that state stops the timer.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

fn host(what: &str, e: kvm_ioctls::Error) -> VmStateError {
    VmStateError::Host(format!("{what}: {}", errno_text(e.errno())))
}

fn put_pod<T: Copy>(section: &mut VmStateSection, name: &str, value: &T) {
    // SAFETY: every T passed here is a #[repr(C)] KVM ABI structure of plain integers.
    section.put_bytes(name, &unsafe { pod_bytes(value) });
}

fn get_pod<T: Copy>(section: &VmStateSection, name: &str) -> Result<T, VmStateError> {
    let bytes = section.get_bytes(name)?;
    let len = bytes.len();
    // SAFETY: as in put_pod; any byte pattern is a valid value of these structures (KVM
    // checks what it is given).
    unsafe { pod_from_bytes(&bytes) }.ok_or_else(|| VmStateError::BadField {
        field: name.to_string(),
        reason: format!("{len} bytes, expected {}", std::mem::size_of::<T>()),
    })
}

/// Reads every MSR of `indices` that this vCPU has, one at a time (KVM stops a batch at
/// the first it refuses).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for &index in indices {
        let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if let Ok(1) = vcpu.get_msrs(&mut msrs) {
            out.push((index, msrs.as_slice()[0].data));
        }
    }
    out
}

/// CPU state as KVM holds it, read on the vCPU's thread while it is paused.
pub fn save_cpu_state(
    vcpu: &VcpuFd,
    msr_index_list: &[u32],
) -> Result<VmStateSection, VmStateError> {
    let mut s = VmStateSection::new(CPU_STATE_VERSION);
    put_pod(
        &mut s,
        "regs",
        &vcpu.get_regs().map_err(|e| host("KVM_GET_REGS", e))?,
    );
    put_pod(
        &mut s,
        "sregs",
        &vcpu.get_sregs().map_err(|e| host("KVM_GET_SREGS", e))?,
    );
    // The legacy 4 KiB XSAVE area (kvm_xsave's variable tail is for AMX, which qomvm's
    // CPU models do not enable).
    let xsave = vcpu.get_xsave().map_err(|e| host("KVM_GET_XSAVE", e))?;
    put_pod(&mut s, "xsave", &xsave.region);
    put_pod(
        &mut s,
        "xcrs",
        &vcpu.get_xcrs().map_err(|e| host("KVM_GET_XCRS", e))?,
    );
    put_pod(
        &mut s,
        "lapic",
        &vcpu.get_lapic().map_err(|e| host("KVM_GET_LAPIC", e))?,
    );
    let events = vcpu
        .get_vcpu_events()
        .map_err(|e| host("KVM_GET_VCPU_EVENTS", e))?;
    put_pod(&mut s, "events", &events);
    let mp = vcpu
        .get_mp_state()
        .map_err(|e| host("KVM_GET_MP_STATE", e))?;
    put_pod(&mut s, "mp_state", &mp);
    let debug = vcpu
        .get_debug_regs()
        .map_err(|e| host("KVM_GET_DEBUGREGS", e))?;
    put_pod(&mut s, "debugregs", &debug);
    let mut indices = vec![MSR_IA32_TSC];
    indices.extend(
        msr_index_list
            .iter()
            .copied()
            .filter(|&i| i != MSR_IA32_TSC),
    );
    let msrs: Vec<(String, u64)> = read_msrs(vcpu, &indices)
        .into_iter()
        .map(|(i, v)| (format!("{i:#x}"), v))
        .collect();
    s.put("msrs", msrs);
    Ok(s)
}

/// Puts a saved CPU state back, in QEMU's order (`kvm_arch_put_registers`): registers,
/// XSAVE, XCRs, system registers, MSRs, MP state, local APIC, the TSC deadline, events,
/// debug registers.
pub fn load_cpu_state(vcpu: &VcpuFd, s: &VmStateSection) -> Result<(), VmStateError> {
    s.check_version(1, CPU_STATE_VERSION)?;
    let regs: kvm_regs = get_pod(s, "regs")?;
    let sregs: kvm_sregs = get_pod(s, "sregs")?;
    let xsave = kvm_xsave {
        region: get_pod(s, "xsave")?,
        ..Default::default()
    };
    let xcrs: kvm_xcrs = get_pod(s, "xcrs")?;
    let lapic: kvm_lapic_state = get_pod(s, "lapic")?;
    let events: kvm_vcpu_events = get_pod(s, "events")?;
    let mp_state: kvm_mp_state = get_pod(s, "mp_state")?;
    let debugregs: kvm_debugregs = get_pod(s, "debugregs")?;
    let msrs: Vec<(String, u64)> = s.get("msrs")?;
    let msrs: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|(index, data)| {
            let index = u32::from_str_radix(index.trim_start_matches("0x"), 16).map_err(|_| {
                VmStateError::BadField {
                    field: "msrs".into(),
                    reason: format!("bad MSR index {index}"),
                }
            })?;
            Ok(kvm_msr_entry {
                index,
                data: *data,
                ..Default::default()
            })
        })
        .collect::<Result<_, VmStateError>>()?;
    vcpu.set_regs(&regs).map_err(|e| host("KVM_SET_REGS", e))?;
    // SAFETY: the kvm_xsave was saved by KVM_GET_XSAVE of the same size; KVM checks it.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(|e| host("KVM_SET_XSAVE", e))?;
    // A host without XSAVE reports no XCRs and refuses to set any (QEMU checks
    // KVM_CAP_XCRS): nothing to put back then.
    if xcrs.nr_xcrs > 0 {
        vcpu.set_xcrs(&xcrs).map_err(|e| host("KVM_SET_XCRS", e))?;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| host("KVM_SET_SREGS", e))?;
    let (deadline, msrs): (Vec<_>, Vec<_>) = msrs
        .into_iter()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    put_msrs(vcpu, msrs)?;
    vcpu.set_mp_state(mp_state)
        .map_err(|e| host("KVM_SET_MP_STATE", e))?;
    vcpu.set_lapic(&lapic)
        .map_err(|e| host("KVM_SET_LAPIC", e))?;
    put_msrs(vcpu, deadline)?;
    vcpu.set_vcpu_events(&events)
        .map_err(|e| host("KVM_SET_VCPU_EVENTS", e))?;
    vcpu.set_debug_regs(&debugregs)
        .map_err(|e| host("KVM_SET_DEBUGREGS", e))?;
    Ok(())
}

/// Sets `msrs` one at a time: an MSR this host's KVM does not take is named, not
/// half-applied.
fn put_msrs(vcpu: &VcpuFd, msrs: Vec<kvm_msr_entry>) -> Result<(), VmStateError> {
    for entry in msrs {
        let batch =
            Msrs::from_entries(&[entry]).map_err(|_| VmStateError::Host("MSR list".into()))?;
        match vcpu.set_msrs(&batch) {
            Ok(1) => {}
            Ok(_) => {
                return Err(VmStateError::Mismatch(format!(
                    "this host's KVM refuses MSR {:#x} = {:#x}",
                    entry.index, entry.data
                )))
            }
            Err(e) => return Err(host("KVM_SET_MSRS", e)),
        }
    }
    Ok(())
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "pic_master"),
    (KVM_IRQCHIP_PIC_SLAVE, "pic_slave"),
    (KVM_IRQCHIP_IOAPIC, "ioapic"),
];

/// The version KVM's IOAPIC reports (QEMU's `kvm-ioapic` shows 0x11 too).
const KVM_IOAPIC_VERSION: u8 = 0x11;

/// The in-kernel PICs and IOAPIC as `info pic` prints them (QEMU's `kvm_pic_get` and
/// `kvm_ioapic_get`).
pub(crate) fn irqchip_state(
    vm: &VmFd,
) -> Result<hw::core::accel_ops::IrqchipState, hw::core::accel_ops::AccelIrqError> {
    use hw::core::accel_ops::{AccelIrqError, IoapicState, IrqchipState, PicState};
    let get = |id: u32| {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(|e| AccelIrqError::Failed {
                what: "KVM_GET_IRQCHIP",
                reason: errno_text(e.errno()),
            })
            .map(|()| chip)
    };
    let pic = |id: u32| {
        get(id).map(|chip| {
            // SAFETY: KVM filled the union's PIC member for a PIC chip id.
            let p = unsafe { chip.chip.pic };
            PicState {
                irr: p.irr,
                imr: p.imr,
                isr: p.isr,
                priority_add: p.priority_add,
                irq_base: p.irq_base,
                read_reg_select: p.read_reg_select,
                elcr: p.elcr,
                special_fully_nested_mode: p.special_fully_nested_mode,
            }
        })
    };
    let master = pic(KVM_IRQCHIP_PIC_MASTER)?;
    let slave = pic(KVM_IRQCHIP_PIC_SLAVE)?;
    let chip = get(KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: KVM filled the union's IOAPIC member for the IOAPIC chip id.
    let io = unsafe { chip.chip.ioapic };
    let ioapic = IoapicState {
        version: KVM_IOAPIC_VERSION,
        id: io.id as u8,
        ioregsel: io.ioregsel,
        irr: io.irr,
        redirtbl: std::array::from_fn(|i| {
            // SAFETY: both members are plain bits; every pattern is a valid `bits`.
            unsafe { io.redirtbl[i].bits }
        }),
    };
    Ok(IrqchipState {
        master,
        slave,
        ioapic,
    })
}

/// Puts the in-kernel PICs and IOAPIC in QEMU's reset state (`kvm_pic_reset`,
/// `kvm_ioapic_reset`): the PICs uninitialised, unmasked, vector base 0 and every line
/// edge-triggered (ELCR 0, so no request survives), the IOAPIC with ID 0, no request and
/// every pin masked. KVM keeps them across a vCPU reset; a machine reset must not.
pub(crate) fn reset_irqchip(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    for (id, _) in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)?;
        if id == KVM_IRQCHIP_IOAPIC {
            // SAFETY: KVM filled the union's IOAPIC member for the IOAPIC chip id, and
            // every bit pattern is valid for it.
            let io = unsafe { &mut chip.chip.ioapic };
            io.id = 0;
            io.ioregsel = 0;
            io.irr = 0;
            for entry in &mut io.redirtbl {
                entry.bits = 1 << 16;
            }
        } else {
            // SAFETY: as above, the PIC member for a PIC chip id.
            let pic = unsafe { &mut chip.chip.pic };
            let elcr_mask = pic.elcr_mask;
            *pic = kvm_bindings::kvm_pic_state {
                elcr_mask,
                ..Default::default()
            };
        }
        vm.set_irqchip(&chip)?;
    }
    Ok(())
}

/// The in-kernel PICs and IOAPIC, the PIT if there is one, and the kvmclock.
pub(crate) fn save_vm_state(vm: &VmFd, has_pit: bool) -> Result<VmStateSection, VmStateError> {
    let mut s = VmStateSection::new(VM_STATE_VERSION);
    for (id, name) in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(|e| host("KVM_GET_IRQCHIP", e))?;
        put_pod(&mut s, name, &chip);
    }
    s.put("has_pit", has_pit);
    if has_pit {
        let pit = vm.get_pit2().map_err(|e| host("KVM_GET_PIT2", e))?;
        put_pod(&mut s, "pit", &pit);
    }
    let clock = vm.get_clock().map_err(|e| host("KVM_GET_CLOCK", e))?;
    s.put("clock", clock.clock);
    Ok(s)
}

/// Loads [`save_vm_state`]'s section (before any vCPU runs).
pub(crate) fn load_vm_state(
    vm: &VmFd,
    has_pit: bool,
    s: &VmStateSection,
) -> Result<(), VmStateError> {
    s.check_version(1, VM_STATE_VERSION)?;
    let saved_pit: bool = s.get("has_pit")?;
    if saved_pit != has_pit {
        return Err(VmStateError::Mismatch(format!(
            "the saved machine {} a PIT, this one {}",
            if saved_pit { "has" } else { "has no" },
            if has_pit { "has" } else { "has none" }
        )));
    }
    for (_, name) in CHIPS {
        let chip: kvm_irqchip = get_pod(s, name)?;
        vm.set_irqchip(&chip)
            .map_err(|e| host("KVM_SET_IRQCHIP", e))?;
    }
    if has_pit {
        let pit: kvm_pit_state2 = get_pod(s, "pit")?;
        vm.set_pit2(&pit).map_err(|e| host("KVM_SET_PIT2", e))?;
    }
    let clock = kvm_clock_data {
        clock: s.get("clock")?,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(|e| host("KVM_SET_CLOCK", e))?;
    Ok(())
}
