//! The KVM accelerator (QEMU's `accel/kvm/kvm-all.c`): `kvm_init` opens `/dev/kvm`, checks
//! the API and the capabilities qomvm relies on, creates the VM with its in-kernel irqchip
//! (the PIT comes later, from the board's `kvm-pit`), and maps guest RAM as memory slots. Its [`AccelOps`] start one thread per vCPU
//! and route interrupts and eventfds (`kvm_irq.rs`).

use hw::core::vmstate::{VmStateError, VmStateSection};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use hw::core::accel_ops::{
    AccelIrqError, AccelOps, CpuDumpError, CpuDumpRegisters, DisplayLogError, EventFd, IoEventAddr,
    IoEventSpace, IrqchipState, LocalApicState, MsiMessage, PagingRegisters, RamBlock, SlotId,
};
use hw::core::machine::MachineState;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use qom::{type_init, Error, ObjectRef, WeakObjectRef};

use crate::accel_system::{AccelError, AccelImpl, AccelState};
use crate::kvm::kvm_cpus::VcpuSet;
use crate::kvm::kvm_irq::KvmIrq;
pub(crate) use hw::core::os_error::errno_text;

/// QEMU's `TYPE_KVM_ACCEL`.
pub const TYPE_KVM_ACCEL: &str = "kvm-accel";

/// KVM's stable API version.
const KVM_API_VERSION: i32 = 12;
/// Where QEMU puts the identity map and, one page above it, the TSS (`kvm_arch_init`).
const IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
const TSS_ADDR: usize = 0xfeff_d000;

/// Capabilities qomvm cannot run without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// KVM failures, worded as QEMU words them.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("Could not access KVM kernel module: {0}")]
    Open(String),
    /// The kernel speaks another API.
    #[error("kvm version not supported: expected {KVM_API_VERSION}, got {0}")]
    ApiVersion(i32),
    /// A capability qomvm needs is missing.
    #[error("kvm does not support {0}, which qomvm requires")]
    MissingCap(&'static str),
    /// An ioctl failed.
    #[error("{what}: {reason}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// `strerror` of the errno.
        reason: String,
    },
    /// `enforce`: the host lacks features the CPU model asks for (each was warned about).
    #[error("Host doesn't support requested features")]
    MissingFeatures,
    /// The Hyper-V enlightenments asked for cannot be set up.
    #[error(transparent)]
    Hyperv(#[from] super::hyperv::HypervError),
}

impl From<KvmError> for AccelError {
    fn from(e: KvmError) -> Self {
        AccelError::Other(Box::new(e))
    }
}

pub(crate) fn ioctl_error(what: &'static str, e: kvm_ioctls::Error) -> KvmError {
    KvmError::Ioctl {
        what,
        reason: errno_text(e.errno()),
    }
}

/// A vCPU started in parallel mode: its index and the channel its thread reports on.
pub(crate) type StartedVcpu = (u32, std::sync::mpsc::Receiver<Result<(), KvmError>>);

/// The VM: QEMU's `KVMState`.
pub struct KvmVm {
    pub(crate) vm: VmFd,
    /// `KVM_GET_SUPPORTED_CPUID`, read on a thread of its own from VM creation on (it
    /// takes about 0.7 ms on PVM); see [`KvmVm::supported_cpuid`].
    supported_cpuid: hw::core::deferred::Deferred<Result<CpuId, String>>,
    pub(crate) msr_index_list: Vec<u32>,
    next_slot: AtomicU32,
    /// Slots [`AccelOps::unmap_slot`] gave back, reused before new numbers: the PAM
    /// registers move shadow RAM slots at every firmware boot.
    free_slots: parking_lot::Mutex<Vec<u32>>,
    /// `KVM_CAP_READONLY_MEM`: ROM and write-protected shadow RAM need it.
    readonly_mem: bool,
    pub(crate) machine: WeakObjectRef,
    pub(crate) vcpus: VcpuSet,
    /// While the board creates its CPUs in parallel: the vCPUs started, with the channel
    /// each reports on.
    pub(crate) vcpus_in_parallel: parking_lot::Mutex<Option<Vec<StartedVcpu>>>,
    /// GSI routing, irqfd and ioeventfd (`kvm_irq.rs`).
    /// The in-kernel irqchip's routing, once [`KvmVm::irqchip`] created it.
    irq: std::sync::OnceLock<KvmIrq>,
    /// Held while the irqchip is created, so that only one thread creates it.
    irqchip_creation: parking_lot::Mutex<()>,
    /// Every memory slot as KVM has it (dirty logging re-registers them with the flag).
    slots: parking_lot::Mutex<std::collections::BTreeMap<u32, kvm_userspace_memory_region>>,
    /// Dirty logging is on: slots added meanwhile get the flag too.
    dirty_logging: std::sync::atomic::AtomicBool,
    /// Host memory a display wants the vCPUs' writes to (video memory), with the pages
    /// written that the display has not taken yet. Lock order: `slots`, then this, then
    /// `migration_dirty`.
    display_logs: parking_lot::Mutex<Vec<DisplayLog>>,
    /// Pages a display's read of KVM's log found while a migration logs too: KVM clears
    /// its log when read, so each reader keeps the other's share (QEMU's per-client
    /// bitmaps).
    migration_dirty: parking_lot::Mutex<Vec<u64>>,
    /// Whether `KVM_CREATE_PIT2` made a PIT (its state is then saved with the VM's).
    has_pit: std::sync::atomic::AtomicBool,
    /// Held across a read-modify-write of the PIT's state (the HPET's legacy switch on a
    /// vCPU thread, a reset or a restart on the main thread).
    pit_update: parking_lot::Mutex<()>,
    /// kvmclock as it stood when the VM stopped, set again when it runs (QEMU's
    /// `kvmclock` device): guest time stands still while the VM does, as the virtual
    /// clock's HPET and PM timer do.
    stopped_clock: parking_lot::Mutex<Option<u64>>,
    /// `KVM_CAP_COALESCED_MMIO`: the ring's page offset in a vCPU's mapping, 0 without.
    coalesced_page: u32,
    /// `KVM_CAP_COALESCED_PIO`: ports can be coalesced too.
    coalesced_pio: bool,
    /// The ring of coalesced writes, mapped by the first vCPU created.
    pub(crate) coalesced_ring: std::sync::OnceLock<crate::kvm::kvm_coalesced::CoalescedRing>,
    /// CPU states loaded for a migration, taken by each vCPU at its next reset.
    pub(crate) incoming_cpu_state:
        parking_lot::Mutex<std::collections::BTreeMap<u32, hw::core::vmstate::VmStateSection>>,
    /// CPUID features already warned about (QEMU warns once).
    pub(crate) warned_features: parking_lot::Mutex<std::collections::BTreeSet<&'static str>>,
    this: Weak<KvmVm>,
}

impl KvmVm {
    /// QEMU's `kvm_init`.
    fn new(machine: &ObjectRef) -> Result<Arc<KvmVm>, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Open(errno_text(e.errno())))?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(KvmError::ApiVersion(version));
        }
        for &(cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let readonly_mem = kvm.check_extension(Cap::ReadonlyMem);
        let coalesced_page =
            u32::try_from(kvm.check_extension_int(Cap::CoalescedMmio)).unwrap_or(0);
        let coalesced_pio = coalesced_page != 0 && kvm.check_extension(Cap::CoalescedPio);
        let vm = kvm
            .create_vm()
            .map_err(|e| ioctl_error("KVM_CREATE_VM", e))?;
        // kvm_arch_init: the real-mode TSS and identity map live in a hole below the BIOS.
        vm.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(|e| ioctl_error("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.set_tss_address(TSS_ADDR)
            .map_err(|e| ioctl_error("KVM_SET_TSS_ADDR", e))?;
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(|e| ioctl_error("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .to_vec();
        // While the board is built; the first vCPU waits for it.
        let supported_cpuid = hw::core::deferred::Deferred::spawn("kvm-cpuid", move || {
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| errno_text(e.errno()))
        })
        .map_err(|e| KvmError::Ioctl {
            what: "KVM_GET_SUPPORTED_CPUID",
            reason: e.to_string(),
        })?;
        Ok(Arc::new_cyclic(|this| KvmVm {
            vm,
            supported_cpuid,
            msr_index_list,
            next_slot: AtomicU32::new(0),
            free_slots: parking_lot::Mutex::new(Vec::new()),
            readonly_mem,
            machine: machine.downgrade(),
            vcpus: VcpuSet::default(),
            vcpus_in_parallel: parking_lot::Mutex::new(None),
            irq: std::sync::OnceLock::new(),
            irqchip_creation: parking_lot::Mutex::new(()),
            warned_features: parking_lot::Mutex::new(std::collections::BTreeSet::new()),
            has_pit: std::sync::atomic::AtomicBool::new(false),
            pit_update: parking_lot::Mutex::new(()),
            stopped_clock: parking_lot::Mutex::new(None),
            slots: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
            dirty_logging: std::sync::atomic::AtomicBool::new(false),
            display_logs: parking_lot::Mutex::new(Vec::new()),
            migration_dirty: parking_lot::Mutex::new(Vec::new()),
            incoming_cpu_state: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
            coalesced_page,
            coalesced_pio,
            coalesced_ring: std::sync::OnceLock::new(),
            this: this.clone(),
        }))
    }

    /// What KVM can give a guest's CPUID (`KVM_GET_SUPPORTED_CPUID`), once its reader
    /// thread has it.
    pub(crate) fn supported_cpuid(&self) -> Result<&CpuId, KvmError> {
        let error = |reason: &str| KvmError::Ioctl {
            what: "KVM_GET_SUPPORTED_CPUID",
            reason: reason.to_string(),
        };
        match self.supported_cpuid.get() {
            Some(Ok(cpuid)) => Ok(cpuid),
            Some(Err(reason)) => Err(error(reason)),
            None => Err(error("its reader thread panicked")),
        }
    }

    /// The in-kernel irqchip (PIC, IOAPIC, LAPICs) and its pc routing table, created on
    /// first use (QEMU creates it in `kvm_init`): creating it registers devices on KVM's
    /// I/O buses, and a memory slot changed within a few milliseconds of such a
    /// registration waits that long for the grace period it started (about 5 ms measured on
    /// PVM, every time). Boards map their RAM and ROMs before they create vCPUs, and the
    /// first vCPU (or PIT, or interrupt) creates the irqchip after them.
    pub(crate) fn irqchip(&self) -> Result<&KvmIrq, KvmError> {
        if let Some(irq) = self.irq.get() {
            return Ok(irq);
        }
        let _creating = self.irqchip_creation.lock();
        if let Some(irq) = self.irq.get() {
            return Ok(irq);
        }
        self.vm
            .create_irq_chip()
            .map_err(|e| ioctl_error("KVM_CREATE_IRQCHIP", e))?;
        Ok(self.irq.get_or_init(|| KvmIrq::new(&self.vm)))
    }

    /// [`KvmVm::irqchip`] for the interrupt paths, with their error type.
    fn irq(&self) -> Result<&KvmIrq, AccelIrqError> {
        self.irqchip().map_err(|e| match e {
            KvmError::Ioctl { what, reason } => AccelIrqError::Failed { what, reason },
            other => AccelIrqError::Failed {
                what: "KVM_CREATE_IRQCHIP",
                reason: other.to_string(),
            },
        })
    }

    /// The dirty-logging flag for a writable slot over host memory `[host, host + size)`:
    /// on while a migration logs, or when a display's memory is in it.
    fn log_flag(&self, host: u64, size: u64, displays: &[DisplayLog]) -> u32 {
        if self.dirty_logging.load(Ordering::Relaxed)
            || displays.iter().any(|d| d.overlaps(host, size))
        {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    /// Reads and clears KVM's log of `slot`, handing each written page to the displays
    /// whose memory it is and, while a migration logs, to `migration`.
    fn sync_slot(
        &self,
        slot: u32,
        region: &kvm_userspace_memory_region,
        displays: &mut [DisplayLog],
        mut migration: Option<&mut Vec<u64>>,
    ) -> Result<(), String> {
        let bitmap = self
            .vm
            .get_dirty_log(slot, region.memory_size as usize)
            .map_err(|e| format!("KVM_GET_DIRTY_LOG: {}", errno_text(e.errno())))?;
        for (word_index, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let offset = (word_index as u64 * 64 + bit) * PAGE_SIZE;
                if let Some(pages) = migration.as_deref_mut() {
                    pages.push(region.guest_phys_addr + offset);
                }
                for display in displays.iter_mut() {
                    display.mark(region.userspace_addr + offset);
                }
            }
        }
        Ok(())
    }

    /// Maps the ring of coalesced writes through `vcpu`, the first time a vCPU is created.
    pub(crate) fn map_coalesced_ring(&self, vcpu: &kvm_ioctls::VcpuFd) -> Result<(), KvmError> {
        if self.coalesced_page == 0 || self.coalesced_ring.get().is_some() {
            return Ok(());
        }
        let ring = crate::kvm::kvm_coalesced::CoalescedRing::map(vcpu, self.coalesced_page)
            .map_err(|e| KvmError::Ioctl {
                what: "mapping the coalesced MMIO ring",
                reason: e.to_string(),
            })?;
        // Another vCPU's mapping won: this one is unmapped when dropped.
        let _ = self.coalesced_ring.set(ring);
        Ok(())
    }

    /// A strong reference to this VM (vCPU threads hold one).
    pub(crate) fn arc(&self) -> Arc<KvmVm> {
        self.this.upgrade().expect("a VM in use is alive")
    }
}

impl KvmVm {
    /// `KVM_(UN)REGISTER_COALESCED_MMIO` of `len` bytes at `addr`.
    fn coalesced_zone(
        &self,
        space: IoEventSpace,
        addr: u64,
        len: u64,
        add: bool,
    ) -> Result<(), AccelIrqError> {
        let unsupported = |what| AccelIrqError::Unsupported { accel: "kvm", what };
        if self.coalesced_page == 0 {
            return Err(unsupported("coalesced MMIO"));
        }
        let at = match space {
            IoEventSpace::Pio if !self.coalesced_pio => return Err(unsupported("coalesced PIO")),
            IoEventSpace::Pio => kvm_ioctls::IoEventAddress::Pio(addr),
            IoEventSpace::Mmio => kvm_ioctls::IoEventAddress::Mmio(addr),
        };
        let size = u32::try_from(len).map_err(|_| AccelIrqError::Failed {
            what: "KVM_REGISTER_COALESCED_MMIO",
            reason: format!("{len} bytes is too large a zone"),
        })?;
        let (what, result) = if add {
            (
                "KVM_REGISTER_COALESCED_MMIO",
                self.vm.register_coalesced_mmio(at, size),
            )
        } else {
            (
                "KVM_UNREGISTER_COALESCED_MMIO",
                self.vm.unregister_coalesced_mmio(at, size),
            )
        };
        result.map_err(|e| AccelIrqError::Failed {
            what,
            reason: errno_text(e.errno()),
        })
    }
}

impl KvmVm {
    /// Changes the in-kernel PIT's state with `f` (`KVM_GET_PIT2`, `KVM_SET_PIT2`); without
    /// a PIT, nothing.
    fn update_pit(&self, f: impl FnOnce(&mut kvm_bindings::kvm_pit_state2)) -> Result<(), Error> {
        if !self.has_pit.load(Ordering::Relaxed) {
            return Ok(());
        }
        let _update = self.pit_update.lock();
        let mut pit = self
            .vm
            .get_pit2()
            .map_err(|e| Error::other(ioctl_error("KVM_GET_PIT2", e)))?;
        f(&mut pit);
        self.vm
            .set_pit2(&pit)
            .map_err(|e| Error::other(ioctl_error("KVM_SET_PIT2", e)))
    }

    /// Runs `f` on CPU `index`'s thread between two runs, for the monitor (QEMU's
    /// `run_on_cpu`), waiting at most two seconds.
    fn inspect_cpu<R: Send + 'static>(
        &self,
        index: u32,
        f: impl FnOnce(&mut kvm_ioctls::VcpuFd) -> R + Send + 'static,
    ) -> Result<R, CpuDumpError> {
        const TIMEOUT_MS: u64 = 2000;
        if !self.vcpus.has_thread(index) {
            return Err(CpuDumpError::NoThread(index));
        }
        self.vcpus
            .run_on_cpu(index, std::time::Duration::from_millis(TIMEOUT_MS), f)
            .ok_or(CpuDumpError::Timeout(index, TIMEOUT_MS))
    }
}

impl AccelOps for KvmVm {
    fn map_ram(&self, block: RamBlock) -> Result<(), Error> {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        // Under the slot table's lock, so a concurrent set_dirty_log sees this slot or
        // this slot sees its flag.
        let mut slots = self.slots.lock();
        let region = kvm_userspace_memory_region {
            slot,
            flags: self.log_flag(block.host_addr, block.size, &self.display_logs.lock()),
            guest_phys_addr: block.guest_addr,
            memory_size: block.size,
            userspace_addr: block.host_addr,
        };
        // SAFETY: the host range belongs to a guest memory region the machine owns for the
        // rest of the process (RAM is never unmapped), so KVM never sees freed memory.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| Error::other(ioctl_error("KVM_SET_USER_MEMORY_REGION", e)))?;
        slots.insert(slot, region);
        Ok(())
    }

    fn map_slot(&self, block: RamBlock, readonly: bool) -> Result<SlotId, Error> {
        if readonly && !self.readonly_mem {
            return Err(Error::other(KvmError::MissingCap("KVM_CAP_READONLY_MEM")));
        }
        let slot = self
            .free_slots
            .lock()
            .pop()
            .unwrap_or_else(|| self.next_slot.fetch_add(1, Ordering::Relaxed));
        // As in map_ram: the flag is read under the slot table's lock.
        let mut slots = self.slots.lock();
        let region = kvm_userspace_memory_region {
            slot,
            flags: if readonly {
                KVM_MEM_READONLY
            } else {
                self.log_flag(block.host_addr, block.size, &self.display_logs.lock())
            },
            guest_phys_addr: block.guest_addr,
            memory_size: block.size,
            userspace_addr: block.host_addr,
        };
        // SAFETY: the host range belongs to memory the machine owns for the rest of the
        // process (ROM and RAM are never freed, only unmapped from the guest).
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => {
                slots.insert(slot, region);
                Ok(SlotId(slot))
            }
            Err(e) => {
                self.free_slots.lock().push(slot);
                Err(Error::other(ioctl_error("KVM_SET_USER_MEMORY_REGION", e)))
            }
        }
    }

    fn unmap_slot(&self, slot: SlotId) -> Result<(), Error> {
        // What the vCPUs wrote there last goes to its readers before the log goes.
        let mut slots = self.slots.lock();
        if let Some(old) = slots
            .get(&slot.0)
            .filter(|r| r.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
        {
            let mut displays = self.display_logs.lock();
            let mut migration = self.migration_dirty.lock();
            let logging = self.dirty_logging.load(Ordering::Relaxed);
            if let Err(e) = self.sync_slot(
                slot.0,
                old,
                &mut displays,
                logging.then_some(&mut *migration),
            ) {
                log::warn!("slot {}: {e}", slot.0);
            }
        }
        // A slot of size 0 deletes it.
        let region = kvm_userspace_memory_region {
            slot: slot.0,
            ..Default::default()
        };
        // SAFETY: deleting a slot gives KVM no host memory to access.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| Error::other(ioctl_error("KVM_SET_USER_MEMORY_REGION", e)))?;
        self.free_slots.lock().push(slot.0);
        slots.remove(&slot.0);
        Ok(())
    }

    fn create_vcpu_thread(&self, cpu: &ObjectRef) -> Result<(), Error> {
        crate::kvm::kvm_cpus::start_vcpu_thread(&self.arc(), cpu).map_err(Error::other)
    }

    fn create_vcpus_in_parallel(&self) {
        self.vcpus_in_parallel.lock().get_or_insert_with(Vec::new);
    }

    fn wait_vcpus_created(&self) -> Result<(), Error> {
        crate::kvm::kvm_cpus::wait_vcpus_created(self).map_err(Error::other)
    }

    fn set_irq(&self, gsi: u32, level: bool) {
        if let Err(e) = self.irqchip() {
            log::warn!("KVM_IRQ_LINE {gsi}: {e}");
            return;
        }
        if let Err(e) = self.vm.set_irq_line(gsi, level) {
            log::warn!("KVM_IRQ_LINE {gsi}: {}", errno_text(e.errno()));
        }
    }

    fn set_pit_hpet_legacy(&self, legacy: bool) -> Result<(), Error> {
        self.update_pit(|pit| {
            if legacy {
                pit.flags |= kvm_bindings::KVM_PIT_FLAGS_HPET_LEGACY;
            } else {
                pit.flags &= !kvm_bindings::KVM_PIT_FLAGS_HPET_LEGACY;
            }
        })
    }

    fn reset_irqchip(&self) -> Result<(), Error> {
        if self.irq.get().is_none() {
            return Ok(());
        }
        crate::kvm::kvm_state::reset_irqchip(&self.vm)
            .map_err(|e| Error::other(ioctl_error("KVM_SET_IRQCHIP", e)))
    }

    fn reset_pit(&self) -> Result<(), Error> {
        self.update_pit(|pit| {
            for (i, channel) in pit.channels.iter_mut().enumerate() {
                *channel = kvm_bindings::kvm_pit_channel_state {
                    count: 0x1_0000,
                    mode: 3,
                    gate: u8::from(i != 2),
                    ..Default::default()
                };
            }
        })
    }

    fn reload_pit(&self) -> Result<(), Error> {
        // KVM_SET_PIT2 re-arms channel 0 from now and clears its re-injection count.
        self.update_pit(|_| {})
    }

    fn create_in_kernel_pit(&self, reinject: bool) -> Result<(), Error> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.irqchip().map_err(Error::other)?;
        self.vm
            .create_pit2(pit)
            .map_err(|e| Error::other(ioctl_error("KVM_CREATE_PIT2", e)))?;
        // KVM_REINJECT_CONTROL, which kvm-ioctls does not wrap: _IO(KVMIO, 0x71).
        const KVM_REINJECT_CONTROL: libc::c_ulong = 0xae71;
        let control = kvm_bindings::kvm_reinject_control {
            pit_reinject: u8::from(reinject),
            ..Default::default()
        };
        use std::os::unix::io::AsRawFd;
        // SAFETY: the fd is this VM's, the argument points to a kvm_reinject_control that
        // lives across the call, and the ioctl only reads it.
        let ret = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_REINJECT_CONTROL, &control) };
        if ret < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(Error::other(KvmError::Ioctl {
                what: "KVM_REINJECT_CONTROL",
                reason: errno_text(errno),
            }));
        }
        self.has_pit.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn vm_start(&self) {
        self.vcpus.start();
    }

    fn pause_all(&self) {
        self.vcpus.pause();
    }

    fn resume_all(&self) {
        self.vcpus.resume();
    }

    fn reset_vcpus(&self) {
        self.vcpus.reset();
    }

    /// A kick makes each vCPU leave KVM_RUN, and an interrupted vCPU refreshes its views.
    fn refresh_vcpu_views(&self) {
        self.vcpus.kick_all();
    }

    fn shutdown(&self) {
        self.vcpus.stop();
    }

    fn inject_nmi(&self) -> Result<(), AccelIrqError> {
        const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
        let results = self
            .vcpus
            .run_on_all_cpus(TIMEOUT, crate::kvm::x86::inject_external_nmi);
        // QEMU reports a lost NMI and goes on with the other CPUs; so does this, then says
        // which were lost.
        let lost: Vec<String> = results
            .into_iter()
            .filter_map(|(index, r)| match r {
                Some(Ok(_)) => None,
                Some(Err(errno)) => Some(format!("CPU {index}: {}", errno_text(errno))),
                None => Some(format!("CPU {index}: no answer within {TIMEOUT:?}")),
            })
            .collect();
        if lost.is_empty() {
            Ok(())
        } else {
            Err(AccelIrqError::Failed {
                what: "KVM_NMI",
                reason: format!("NMI lost ({})", lost.join(", ")),
            })
        }
    }

    fn cpu_dump_state(&self, index: u32) -> Result<String, CpuDumpError> {
        self.inspect_cpu(index, |vcpu| crate::kvm::x86::register_dump(vcpu))
    }

    fn cpu_dump_registers(&self, index: u32) -> Result<CpuDumpRegisters, CpuDumpError> {
        self.inspect_cpu(index, |vcpu| crate::kvm::x86::dump_registers(vcpu))?
            .map_err(CpuDumpError::Failed)
    }

    fn paging_registers(&self, index: u32) -> Result<PagingRegisters, CpuDumpError> {
        self.inspect_cpu(index, |vcpu| {
            vcpu.get_sregs().ok().map(|s| PagingRegisters {
                cr0: s.cr0,
                cr3: s.cr3,
                cr4: s.cr4,
                efer: s.efer,
            })
        })?
        .ok_or(CpuDumpError::NoThread(index))
    }

    fn local_apic_state(&self, index: u32) -> Result<LocalApicState, CpuDumpError> {
        self.inspect_cpu(index, |vcpu| crate::kvm::x86::local_apic_state(vcpu))?
            .map_err(CpuDumpError::Failed)
    }

    fn irqchip_state(&self) -> Result<Option<IrqchipState>, AccelIrqError> {
        // Only a machine that made the irqchip has one to show (`-M none` has none).
        if self.irq.get().is_none() {
            return Ok(None);
        }
        crate::kvm::kvm_state::irqchip_state(&self.vm).map(Some)
    }

    fn save_cpu_state(&self, index: u32) -> Result<VmStateSection, VmStateError> {
        const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
        if !self.vcpus.has_thread(index) {
            return Err(VmStateError::Host(format!("CPU {index} has no thread")));
        }
        let msrs = self.msr_index_list.clone();
        self.vcpus
            .run_on_cpu(index, TIMEOUT, move |vcpu| {
                crate::kvm::kvm_state::save_cpu_state(vcpu, &msrs)
            })
            .ok_or_else(|| {
                VmStateError::Host(format!("CPU {index} did not answer within {TIMEOUT:?}"))
            })?
    }

    fn load_cpu_state(&self, index: u32, state: VmStateSection) -> Result<(), VmStateError> {
        self.incoming_cpu_state.lock().insert(index, state);
        Ok(())
    }

    fn set_dirty_log(&self, on: bool) -> Result<(), VmStateError> {
        let mut slots = self.slots.lock();
        let displays = self.display_logs.lock();
        self.dirty_logging.store(on, Ordering::Relaxed);
        self.migration_dirty.lock().clear();
        for region in slots.values_mut() {
            if region.flags & KVM_MEM_READONLY != 0 {
                continue;
            }
            // A display's slot keeps logging (and its log) whatever the migration does.
            let flags = self.log_flag(region.userspace_addr, region.memory_size, &displays);
            if flags == region.flags {
                continue;
            }
            region.flags = flags;
            // SAFETY: the same host memory as the slot already has; only the flag changes.
            unsafe { self.vm.set_user_memory_region(*region) }.map_err(|e| {
                VmStateError::Host(format!(
                    "KVM_SET_USER_MEMORY_REGION: {}",
                    errno_text(e.errno())
                ))
            })?;
        }
        Ok(())
    }

    fn dirty_pages(&self) -> Result<Vec<u64>, VmStateError> {
        let slots = self.slots.lock();
        let mut displays = self.display_logs.lock();
        let mut pages = std::mem::take(&mut *self.migration_dirty.lock());
        for (slot, region) in slots.iter() {
            if region.flags & KVM_MEM_LOG_DIRTY_PAGES == 0 {
                continue;
            }
            self.sync_slot(*slot, region, &mut displays, Some(&mut pages))
                .map_err(VmStateError::Host)?;
        }
        // A page a display's read found may have been written again since.
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }

    fn log_display_memory(&self, host_addr: u64, size: u64) -> Result<(), DisplayLogError> {
        let mut slots = self.slots.lock();
        let mut displays = self.display_logs.lock();
        if displays
            .iter()
            .any(|d| d.host_addr == host_addr && d.size == size)
        {
            return Ok(());
        }
        displays.push(DisplayLog::new(host_addr, size));
        for region in slots.values_mut() {
            let flags = self.log_flag(region.userspace_addr, region.memory_size, &displays);
            if region.flags & KVM_MEM_READONLY != 0 || flags == region.flags {
                continue;
            }
            region.flags = flags;
            // SAFETY: the same host memory as the slot already has; only the flag changes.
            unsafe { self.vm.set_user_memory_region(*region) }.map_err(|e| {
                DisplayLogError::Host(format!(
                    "KVM_SET_USER_MEMORY_REGION: {}",
                    errno_text(e.errno())
                ))
            })?;
        }
        Ok(())
    }

    fn display_dirty_pages(&self, host_addr: u64, size: u64) -> Result<Vec<u64>, DisplayLogError> {
        let slots = self.slots.lock();
        let mut displays = self.display_logs.lock();
        let mut migration = self.migration_dirty.lock();
        let logging = self.dirty_logging.load(Ordering::Relaxed);
        for (slot, region) in slots.iter() {
            let over_display = host_addr < region.userspace_addr + region.memory_size
                && region.userspace_addr < host_addr + size;
            if region.flags & KVM_MEM_LOG_DIRTY_PAGES == 0 || !over_display {
                continue;
            }
            self.sync_slot(
                *slot,
                region,
                &mut displays,
                logging.then_some(&mut *migration),
            )
            .map_err(DisplayLogError::Host)?;
        }
        let display = displays
            .iter_mut()
            .find(|d| d.host_addr == host_addr && d.size == size)
            .ok_or_else(|| DisplayLogError::Host("the display's memory is not logged".into()))?;
        Ok(display.take())
    }

    fn save_vm_state(&self) -> Result<VmStateSection, VmStateError> {
        self.irqchip()
            .map_err(|e| VmStateError::Host(e.to_string()))?;
        let mut s =
            crate::kvm::kvm_state::save_vm_state(&self.vm, self.has_pit.load(Ordering::Relaxed))?;
        // A stopped VM's time is where it stopped (QEMU's kvmclock_pre_save).
        if let Some(clock) = *self.stopped_clock.lock() {
            s.put("clock", clock);
        }
        Ok(s)
    }

    fn load_vm_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.irqchip()
            .map_err(|e| VmStateError::Host(e.to_string()))?;
        // The loaded clock is where the VM goes on from when it runs (QEMU's kvmclock keeps
        // it until then): time before that start does not count.
        *self.stopped_clock.lock() = Some(state.get("clock")?);
        crate::kvm::kvm_state::load_vm_state(&self.vm, self.has_pit.load(Ordering::Relaxed), state)
    }

    fn send_msi(&self, msg: MsiMessage) -> Result<(), AccelIrqError> {
        self.irq()?.send_msi(&self.vm, msg)
    }

    fn add_msi_route(&self, msg: MsiMessage) -> Result<u32, AccelIrqError> {
        self.irq()?.add_msi_route(&self.vm, msg)
    }

    fn update_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), AccelIrqError> {
        self.irq()?.update_msi_route(&self.vm, gsi, msg)
    }

    fn release_msi_route(&self, gsi: u32) {
        if let Some(irq) = self.irq.get() {
            irq.release_msi_route(&self.vm, gsi);
        }
    }

    fn add_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelIrqError> {
        self.irq()?.irqfd(&self.vm, fd, gsi, true)
    }

    fn remove_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelIrqError> {
        self.irq()?.irqfd(&self.vm, fd, gsi, false)
    }

    fn add_ioeventfd(&self, at: IoEventAddr, fd: &EventFd) -> Result<(), AccelIrqError> {
        self.irq()?.ioeventfd(&self.vm, at, fd, true)
    }

    fn remove_ioeventfd(&self, at: IoEventAddr, fd: &EventFd) -> Result<(), AccelIrqError> {
        self.irq()?.ioeventfd(&self.vm, at, fd, false)
    }

    fn add_coalesced_io(
        &self,
        space: IoEventSpace,
        addr: u64,
        len: u64,
    ) -> Result<(), AccelIrqError> {
        self.coalesced_zone(space, addr, len, true)
    }

    fn remove_coalesced_io(
        &self,
        space: IoEventSpace,
        addr: u64,
        len: u64,
    ) -> Result<(), AccelIrqError> {
        self.coalesced_zone(space, addr, len, false)
    }

    fn flush_coalesced_io(&self) {
        let Some(ring) = self.coalesced_ring.get().filter(|r| r.pending()) else {
            return;
        };
        let Some(machine) = self.machine.upgrade() else {
            return;
        };
        let Some(ms) = hw::core::machine::machine_state(&machine) else {
            return;
        };
        let (io, memory) = (ms.system_io(), ms.system_memory());
        ring.drain(|pio, addr, data| {
            if pio {
                io.write_bytes(addr, data);
            } else {
                memory.write_bytes(addr, data);
            }
        });
    }

    fn name(&self) -> &'static str {
        "kvm"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// QEMU's `KVMState` as a QOM type: `-accel kvm`.
#[derive(qom::Object)]
#[qom(name = TYPE_KVM_ACCEL)]
pub struct KvmAccel {
    #[parent]
    parent: AccelState,
}

type_init!(KvmAccel);

impl AccelImpl for KvmAccel {
    fn init_machine(&self, machine: &MachineState) -> Result<(), AccelError> {
        let vm = KvmVm::new(&machine.object())?;
        let weak = Arc::downgrade(&vm);
        machine
            .set_accel_ops(vm)
            .map_err(|e| AccelError::Other(Box::new(e)))?;
        machine.services().vm().add_change_handler(
            0,
            Arc::new(move |running, status| {
                if let Some(vm) = weak.upgrade() {
                    vm.kvmclock_follow_run_state(running, status);
                }
            }),
        );
        Ok(())
    }
}

impl KvmVm {
    /// QEMU's `kvmclock_vm_state_change`: the clock is read when the VM stops and set
    /// back when it runs again. A migration's final stop keeps the clock running: the
    /// stream takes it as it is when saved, so the downtime counts (QEMU's
    /// `kvmclock_pre_save` reads it again unless the VM was paused).
    fn kvmclock_follow_run_state(&self, running: bool, status: hw::core::runstate::RunStatus) {
        if !running && status == hw::core::runstate::RunStatus::FinishMigrate {
            return;
        }
        let mut stopped = self.stopped_clock.lock();
        if running {
            if let Some(clock) = stopped.take() {
                let data = kvm_bindings::kvm_clock_data {
                    clock,
                    ..Default::default()
                };
                if let Err(e) = self.vm.set_clock(&data) {
                    log::warn!("KVM_SET_CLOCK: {e}: guest time jumps over the stop");
                }
                // KVM_KVMCLOCK_CTRL: the guest's kvmclock tells it the vCPUs were stopped
                // by the host, so its soft-lockup watchdog does not fire over the pause.
                // A guest without kvmclock refuses it (EINVAL), as QEMU ignores.
                drop(stopped);
                let _ = self
                    .vcpus
                    .run_on_all_cpus(std::time::Duration::from_secs(1), |vcpu| {
                        vcpu.kvmclock_ctrl()
                    });
            }
        } else if stopped.is_none() {
            match self.vm.get_clock() {
                Ok(data) => *stopped = Some(data.clock),
                Err(e) => log::warn!("KVM_GET_CLOCK: {e}: guest time runs on while stopped"),
            }
        }
    }
}

/// KVM's page, the unit of its dirty log.
const PAGE_SIZE: u64 = 4096;

/// A display's memory and the pages of it the vCPUs wrote (QEMU's `DIRTY_MEMORY_VGA`
/// bitmap).
#[derive(Debug)]
struct DisplayLog {
    host_addr: u64,
    size: u64,
    /// One bit per page.
    dirty: Vec<u64>,
}

impl DisplayLog {
    fn new(host_addr: u64, size: u64) -> DisplayLog {
        DisplayLog {
            host_addr,
            size,
            dirty: vec![0; size.div_ceil(PAGE_SIZE).div_ceil(64) as usize],
        }
    }

    fn overlaps(&self, host: u64, size: u64) -> bool {
        host < self.host_addr + self.size && self.host_addr < host + size
    }

    /// Notes a write to the page at host address `host`, if it is this display's.
    fn mark(&mut self, host: u64) {
        if (self.host_addr..self.host_addr + self.size).contains(&host) {
            let page = (host - self.host_addr) / PAGE_SIZE;
            self.dirty[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// The written pages' offsets; clears them.
    fn take(&mut self) -> Vec<u64> {
        let mut offsets = Vec::new();
        for (i, word) in self.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                offsets.push((i as u64 * 64 + bit) * PAGE_SIZE);
            }
        }
        offsets
    }
}
