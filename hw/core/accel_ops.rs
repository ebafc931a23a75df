//! What boards and CPUs need from an accelerator (QEMU's `AccelOpsClass` and the KVM memory
//! listener): start a CPU's thread, map guest RAM, start, pause and stop the vCPUs.
//!
//! `hw` sits below `accel` in the dependency order, so it sees the accelerator only through
//! this trait; the accelerator chosen by `configure_accelerators` installs its
//! implementation in the machine.

use crate::core::vmstate::{VmStateError, VmStateSection};
use std::sync::Arc;

use qom::{Error, ObjectRef};
pub use vmm_sys_util::eventfd::EventFd;

/// A block of guest RAM the accelerator must make visible to the guest.
#[derive(Clone, Copy, Debug)]
pub struct RamBlock {
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host address of the mapping (it lives as long as the machine).
    pub host_addr: u64,
}

/// A memory slot mapped with [`AccelOps::map_slot`], to move or remove later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotId(pub u32);

/// An accelerator without removable or read-only memory slots.
#[derive(Debug, thiserror::Error)]
#[error("the {0} accelerator cannot map firmware memory")]
pub struct NoSlots(&'static str);

/// Why a CPU's registers cannot be shown (`info registers`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuDumpError {
    /// The accelerator keeps no register state.
    #[error("the {0} accelerator runs no guest code: there is no CPU register state to show")]
    NoRegisters(&'static str),
    /// The CPU has no vCPU thread that could read its registers.
    #[error("CPU {0} has no vCPU thread")]
    NoThread(u32),
    /// The vCPU thread did not answer in time.
    #[error("CPU {0} did not answer within {1} ms")]
    Timeout(u32, u64),
    /// The accelerator refused to read the state.
    #[error("{0}")]
    Failed(String),
}

/// A local APIC's registers, for the monitor's `info lapic` (QEMU's `APICCommonState` as
/// `kvm_get_apic_state` fills it from `KVM_GET_LAPIC`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalApicState {
    /// The 1 KiB register page in the xAPIC MMIO layout: register `0xN0` at byte `0xN0`,
    /// 32 bits little-endian, as `KVM_GET_LAPIC` returns it (the timer's current count
    /// included).
    pub regs: Vec<u8>,
    /// CPUID.01H:ECX.x2APIC as the guest sees it: QEMU reads ICR destinations by it.
    pub x2apic_cpuid: bool,
}

impl LocalApicState {
    /// The 32-bit register at MMIO offset `offset` (0 outside the page).
    pub fn reg(&self, offset: usize) -> u32 {
        self.regs
            .get(offset..offset + 4)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
}

/// One i8259's state as `info pic` prints it (QEMU's `PICCommonState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PicState {
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// The rotation's lowest-priority offset (`hprio`).
    pub priority_add: u8,
    /// The vector of IRQ 0 (ICW2).
    pub irq_base: u8,
    /// OCW3's register select: 1 reads the ISR.
    pub read_reg_select: u8,
    /// Edge/level control register.
    pub elcr: u8,
    /// Special fully nested mode (ICW4).
    pub special_fully_nested_mode: u8,
}

/// The IOAPIC's state as `info pic` prints it (QEMU's `IOAPICCommonState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoapicState {
    /// The version register's version (0x11 for KVM's).
    pub version: u8,
    /// The IOAPIC ID.
    pub id: u8,
    /// The register select register.
    pub ioregsel: u32,
    /// The pins whose interrupt is requested.
    pub irr: u32,
    /// The 24 redirection table entries.
    pub redirtbl: [u64; 24],
}

/// The interrupt controllers the accelerator models (`info pic`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqchipState {
    /// The master i8259 (IRQs 0-7).
    pub master: PicState,
    /// The slave i8259 (IRQs 8-15).
    pub slave: PicState,
    /// The IOAPIC.
    pub ioapic: IoapicState,
}

/// A segment register as a guest core dump records it (QEMU's `SegmentCache`, whose
/// `flags` hold the descriptor's attribute bits where its second dword has them: type at
/// bit 8, S 12, DPL 13-14, P 15, AVL 20, L 21, D/B 22, G 23; 0 for an unusable segment).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpSegment {
    /// The selector.
    pub selector: u16,
    /// The limit, in bytes.
    pub limit: u32,
    /// The attribute bits.
    pub flags: u32,
    /// The base address.
    pub base: u64,
}

/// An x86 CPU's registers for a guest core dump (what QEMU's `target/i386/arch_dump.c`
/// writes: the ELF `NT_PRSTATUS` note and QEMU's own `QEMUCPUState` note).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuDumpRegisters {
    /// RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP, R8-R15, in that order.
    pub gprs: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CS, DS, ES, FS, GS, SS, in that order.
    pub segments: [DumpSegment; 6],
    /// The LDT register.
    pub ldt: DumpSegment,
    /// The task register.
    pub tr: DumpSegment,
    /// The GDT register (base and limit).
    pub gdt: DumpSegment,
    /// The IDT register (base and limit).
    pub idt: DumpSegment,
    /// CR0-CR4 (CR1 is 0).
    pub cr: [u64; 5],
    /// `IA32_KERNEL_GS_BASE`.
    pub kernel_gs_base: u64,
    /// EFER (LMA, bit 10, says whether the CPU is in long mode).
    pub efer: u64,
}

/// The registers that say how an x86 CPU translates virtual addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegisters {
    /// CR0 (PG is bit 31).
    pub cr0: u64,
    /// CR3: the top-level page table.
    pub cr3: u64,
    /// CR4 (PSE bit 4, PAE bit 5, LA57 bit 12).
    pub cr4: u64,
    /// EFER (LMA is bit 10).
    pub efer: u64,
}

/// A message-signalled interrupt as a device writes it (QEMU's `MSIMessage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address the device writes to (0xfee0_0000 + destination for x86 local APICs).
    pub address: u64,
    /// Data it writes (vector, delivery mode, trigger).
    pub data: u32,
}

/// Which address space an ioeventfd watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventSpace {
    /// I/O ports.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// A guest write the accelerator turns into an eventfd signal instead of an exit to
/// userspace (QEMU's `memory_region_add_eventfd`, `KVM_IOEVENTFD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoEventAddr {
    /// Port or physical address space.
    pub space: IoEventSpace,
    /// Guest address of the write.
    pub addr: u64,
    /// Width of the write in bytes (1, 2, 4, 8), or 0 for any width.
    pub len: u32,
    /// Only writes of this value signal; `None` matches every value.
    pub datamatch: Option<u64>,
}

/// Why interrupt routing, irqfd or ioeventfd set-up failed. Callers fall back to
/// userspace delivery: the accelerator may simply not offer the fast path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccelIrqError {
    /// The accelerator has no such mechanism (qtest, or a missing KVM capability).
    #[error("the {accel} accelerator does not support {what}")]
    Unsupported {
        /// The accelerator.
        accel: &'static str,
        /// The mechanism.
        what: &'static str,
    },
    /// Every GSI is in use.
    #[error("no free GSI for an MSI route")]
    NoFreeGsi,
    /// The accelerator refused the request.
    #[error("{what}: {reason}")]
    Failed {
        /// The operation, e.g. `KVM_IRQFD`.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// The accelerator's operations (QEMU's `AccelOpsClass`).
pub trait AccelOps: Send + Sync {
    /// Maps a RAM block into the guest (QEMU's `kvm_region_add`).
    fn map_ram(&self, block: RamBlock) -> Result<(), Error>;
    /// Maps host memory into the guest as a slot that can be removed again, read-only if
    /// `readonly` (the guest's writes then exit as MMIO to the address space's regions):
    /// firmware ROM and the i440FX's shadow RAM, whose mappings the guest switches
    /// through the PAM registers (QEMU's KVM memory listener on ROM and alias regions).
    fn map_slot(&self, _block: RamBlock, _readonly: bool) -> Result<SlotId, Error> {
        Err(Error::other(NoSlots(self.name())))
    }
    /// Removes a slot [`AccelOps::map_slot`] made; its guest range then exits as MMIO.
    fn unmap_slot(&self, _slot: SlotId) -> Result<(), Error> {
        Err(Error::other(NoSlots(self.name())))
    }
    /// Creates the thread that runs `cpu` and waits until it reports created (QEMU's
    /// `create_vcpu_thread`, `qemu_init_vcpu`). The vCPU does not run guest code until
    /// [`AccelOps::vm_start`].
    fn create_vcpu_thread(&self, cpu: &ObjectRef) -> Result<(), Error>;
    /// From now until [`AccelOps::wait_vcpus_created`], [`AccelOps::create_vcpu_thread`]
    /// returns once the thread is started, without waiting for its report: the board's
    /// CPUs set themselves up in parallel (each vCPU costs a dozen ioctls).
    fn create_vcpus_in_parallel(&self) {}
    /// Waits for every vCPU started since [`AccelOps::create_vcpus_in_parallel`] to report
    /// created, and ends that mode; the failure of the lowest CPU index, if any.
    fn wait_vcpus_created(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Sets the level of interrupt controller input (GSI) `gsi` (QEMU's `kvm_set_irq`).
    fn set_irq(&self, gsi: u32, level: bool);
    /// Creates the in-kernel i8254 PIT (QEMU's `kvm_pit_realizefn`: `KVM_CREATE_PIT2`),
    /// which then decodes ports 0x40-0x43 and 0x61 itself, and says whether it re-injects
    /// ticks the guest missed (`kvm-pit`'s `lost_tick_policy`: delay re-injects, discard
    /// drops). A machine without `kvm-pit` (`-machine pit=off`) has no PIT.
    fn create_in_kernel_pit(&self, reinject: bool) -> Result<(), Error>;
    /// Puts the in-kernel interrupt controllers (PICs, IOAPIC) in QEMU's reset state, as
    /// the machine's reset does before its devices'; nothing without them.
    fn reset_irqchip(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Puts the in-kernel PIT in QEMU's reset state (`pit_reset_common`, then
    /// `kvm_pit_put`): every channel in mode 3 counting 65536, channel 2's gate low, so
    /// channel 0 raises IRQ 0 at 18.2 Hz until the guest programs it; the HPET-legacy
    /// flag stays. Without a PIT there is nothing to do.
    fn reset_pit(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Loads the in-kernel PIT's state into KVM again (QEMU's `kvm_pit_put` when the VM
    /// runs again): channel 0's period starts from now, and the ticks its timer counted
    /// while the VM was stopped, which KVM would re-inject at once, are dropped.
    fn reload_pit(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Stops (`true`) or restarts the in-kernel PIT's channel 0 interrupts while an HPET
    /// in legacy replacement mode takes IRQ 0 (QEMU's `kvm_pit_irq_control`:
    /// `KVM_PIT_FLAGS_HPET_LEGACY`). Without a PIT there is nothing to do.
    fn set_pit_hpet_legacy(&self, _legacy: bool) -> Result<(), Error> {
        Ok(())
    }
    /// Sends every CPU an NMI (QEMU's `nmi_monitor_handle` on x86: `KVM_NMI` on each
    /// vCPU), for the monitor's `inject-nmi` and `watchdog=inject-nmi`.
    fn inject_nmi(&self) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("NMI injection"))
    }
    /// Lets every vCPU run (QEMU's `vm_start` -> `resume_all_vcpus`).
    fn vm_start(&self);
    /// Stops every vCPU outside guest mode and waits until they are (QEMU's
    /// `pause_all_vcpus`).
    fn pause_all(&self);
    /// Resumes vCPUs paused by `pause_all`.
    fn resume_all(&self);
    /// Puts every vCPU back in its reset state (or its loader's start state) before it next
    /// runs. Call between `pause_all` and `resume_all`.
    fn reset_vcpus(&self);
    /// Ends every vCPU thread and waits for them (at exit).
    fn shutdown(&self);
    /// Makes every vCPU let go of the address-space views it keeps between exits (QEMU's
    /// RCU grace period): after a device is unplugged, nothing of it stays alive in a vCPU
    /// that happens not to exit. Does not wait.
    fn refresh_vcpu_views(&self) {}
    /// CPU `index`'s registers in QEMU's `info registers` layout, read on the CPU's own
    /// thread between two runs (QEMU's `run_on_cpu` + `cpu_dump_state`).
    fn cpu_dump_state(&self, index: u32) -> Result<String, CpuDumpError> {
        Err(CpuDumpError::NoThread(index))
    }
    /// CPU `index`'s registers for a guest core dump (`dump-guest-memory`), read on its own
    /// thread between two runs.
    fn cpu_dump_registers(&self, index: u32) -> Result<CpuDumpRegisters, CpuDumpError> {
        Err(CpuDumpError::NoThread(index))
    }
    /// CPU `index`'s paging registers (CR0, CR3, CR4, EFER), read on its own thread between
    /// two runs, for the monitor's page-table walks (`info mem`, `info tlb`).
    fn paging_registers(&self, index: u32) -> Result<PagingRegisters, CpuDumpError> {
        Err(CpuDumpError::NoThread(index))
    }
    /// CPU `index`'s local APIC, read on its own thread between two runs (QEMU's
    /// `cpu_synchronize_state` before `x86_cpu_dump_local_apic_state`).
    fn local_apic_state(&self, index: u32) -> Result<LocalApicState, CpuDumpError> {
        Err(CpuDumpError::NoThread(index))
    }
    /// The in-kernel i8259 pair and IOAPIC (`KVM_GET_IRQCHIP`), `None` while the machine
    /// has none (QEMU's `kvm_pic_get`, `kvm_ioapic_get`, for `info pic`).
    fn irqchip_state(&self) -> Result<Option<IrqchipState>, AccelIrqError> {
        Err(self.irq_unsupported("in-kernel interrupt controllers"))
    }
    /// Injects one MSI (QEMU's `kvm_send_msi`, `KVM_SIGNAL_MSI`): the userspace path of an
    /// MSI-X vector that has no irqfd.
    fn send_msi(&self, _msg: MsiMessage) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("MSI"))
    }
    /// Allocates a GSI that delivers `msg` (QEMU's `kvm_irqchip_add_msi_route` +
    /// `kvm_irqchip_commit_routes`).
    fn add_msi_route(&self, _msg: MsiMessage) -> Result<u32, AccelIrqError> {
        Err(self.irq_unsupported("MSI routes"))
    }
    /// Points GSI `gsi` (from [`AccelOps::add_msi_route`]) at a new message (QEMU's
    /// `kvm_irqchip_update_msi_route`), e.g. when the guest rewrites an MSI-X table entry.
    fn update_msi_route(&self, _gsi: u32, _msg: MsiMessage) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("MSI routes"))
    }
    /// Frees a GSI from [`AccelOps::add_msi_route`] (QEMU's `kvm_irqchip_release_virq`).
    fn release_msi_route(&self, _gsi: u32) {}
    /// Makes a write to `fd` raise `gsi` inside the accelerator (QEMU's
    /// `kvm_irqchip_add_irqfd_notifier_gsi`, `KVM_IRQFD`).
    fn add_irqfd(&self, _fd: &EventFd, _gsi: u32) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("irqfd"))
    }
    /// Undoes [`AccelOps::add_irqfd`].
    fn remove_irqfd(&self, _fd: &EventFd, _gsi: u32) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("irqfd"))
    }
    /// Makes guest writes matching `at` signal `fd` without leaving the vCPU
    /// (`KVM_IOEVENTFD`).
    fn add_ioeventfd(&self, _at: IoEventAddr, _fd: &EventFd) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("ioeventfd"))
    }
    /// Undoes [`AccelOps::add_ioeventfd`].
    fn remove_ioeventfd(&self, _at: IoEventAddr, _fd: &EventFd) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("ioeventfd"))
    }
    /// Lets the accelerator buffer the guest's writes to `len` bytes at `addr` instead of
    /// exiting for each (QEMU's coalesced MMIO and PIO, `memory_region_set_coalescing`):
    /// they reach the address space's regions in order, before the next access the VMM
    /// handles and whenever [`AccelOps::flush_coalesced_io`] runs. For regions whose
    /// writes only store data a later access or a display refresh looks at (VGA memory,
    /// the RTC's index port). A refusal only costs speed.
    fn add_coalesced_io(
        &self,
        _space: IoEventSpace,
        _addr: u64,
        _len: u64,
    ) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("coalesced I/O"))
    }
    /// Undoes [`AccelOps::add_coalesced_io`] (what is buffered stays in order).
    fn remove_coalesced_io(
        &self,
        _space: IoEventSpace,
        _addr: u64,
        _len: u64,
    ) -> Result<(), AccelIrqError> {
        Err(self.irq_unsupported("coalesced I/O"))
    }
    /// Hands the buffered writes to the address spaces' regions now (QEMU's
    /// `qemu_flush_coalesced_mmio_buffer`), for a reader outside the vCPUs: a display
    /// about to draw video memory.
    fn flush_coalesced_io(&self) {}
    /// CPU `index`'s state for a snapshot or migration (registers, MSRs, local APIC,
    /// pending events), read on its thread; call with the vCPUs paused.
    fn save_cpu_state(&self, _index: u32) -> Result<VmStateSection, VmStateError> {
        Err(VmStateError::Unmigratable(format!("{} CPU", self.name())))
    }
    /// Gives CPU `index` a saved state: the vCPU takes it instead of its reset state when
    /// it next goes through reset, which on a migration's destination is before its first
    /// instruction.
    fn load_cpu_state(&self, _index: u32, _state: VmStateSection) -> Result<(), VmStateError> {
        Err(VmStateError::Unmigratable(format!("{} CPU", self.name())))
    }
    /// Turns the logging of guest writes to RAM on or off (QEMU's `log_global_start`):
    /// while on, [`AccelOps::dirty_pages`] says which pages the vCPUs wrote.
    fn set_dirty_log(&self, _on: bool) -> Result<(), VmStateError> {
        Err(VmStateError::Unmigratable(format!("{} dirty logging", self.name())))
    }
    /// The guest-physical addresses of the pages written since the last call (or since
    /// logging started), and clears the log.
    fn dirty_pages(&self) -> Result<Vec<u64>, VmStateError> {
        Err(VmStateError::Unmigratable(format!("{} dirty logging", self.name())))
    }
    /// Logs the vCPUs' writes to the host memory `[host_addr, host_addr + size)` for a
    /// display, in every slot over it now or later, whatever a migration does with the
    /// log (QEMU's `memory_region_set_log(mr, true, DIRTY_MEMORY_VGA)`).
    fn log_display_memory(&self, _host_addr: u64, _size: u64) -> Result<(), DisplayLogError> {
        Err(DisplayLogError::Unsupported(self.name()))
    }
    /// The offsets from `host_addr` of the pages of memory logged with
    /// [`AccelOps::log_display_memory`] that the vCPUs wrote since the last call (QEMU's
    /// `memory_region_snapshot_and_clear_dirty` for `DIRTY_MEMORY_VGA`). A migration's
    /// [`AccelOps::dirty_pages`] does not take these from the display, nor the other way.
    fn display_dirty_pages(&self, _host_addr: u64, _size: u64) -> Result<Vec<u64>, DisplayLogError> {
        Err(DisplayLogError::Unsupported(self.name()))
    }
    /// The accelerator's own VM state (in-kernel interrupt controllers, PIT, clock); call
    /// with the vCPUs paused.
    fn save_vm_state(&self) -> Result<VmStateSection, VmStateError> {
        Err(VmStateError::Unmigratable(self.name().to_string()))
    }
    /// Loads [`AccelOps::save_vm_state`]'s section, before the vCPUs first run.
    fn load_vm_state(&self, _state: &VmStateSection) -> Result<(), VmStateError> {
        Err(VmStateError::Unmigratable(self.name().to_string()))
    }
    /// The accelerator's name for [`AccelIrqError::Unsupported`] (`kvm`, `qtest`).
    fn name(&self) -> &'static str {
        "unknown"
    }
    /// [`AccelIrqError::Unsupported`] for this accelerator.
    fn irq_unsupported(&self, what: &'static str) -> AccelIrqError {
        AccelIrqError::Unsupported {
            accel: self.name(),
            what,
        }
    }
    /// The accelerator as `Any`, for tests that look at a particular accelerator's state.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Why a display's memory cannot be dirty-logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DisplayLogError {
    /// The accelerator has no dirty log.
    #[error("the {0} accelerator cannot log a display's writes")]
    Unsupported(&'static str),
    /// The host refused.
    #[error("{0}")]
    Host(String),
}

/// A shared handle to the accelerator's operations.
pub type AccelOpsRef = Arc<dyn AccelOps>;
