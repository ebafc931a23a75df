//! What boards and CPUs need from an accelerator (QEMU's `AccelOpsClass` and the KVM memory
//! listener): start a CPU's thread, map guest RAM, start, pause and stop the vCPUs.
//!
//! `hw` sits below `accel` in the dependency order, so it sees the accelerator only through
//! this trait; the accelerator chosen by `configure_accelerators` installs its
//! implementation in the machine.

use std::sync::Arc;

use qom::{Error, ObjectRef};

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
}

/// The accelerator's operations (QEMU's `AccelOpsClass`).
pub trait AccelOps: Send + Sync {
    /// Maps a RAM block into the guest (QEMU's `kvm_region_add`).
    fn map_ram(&self, block: RamBlock) -> Result<(), Error>;
    /// Creates the thread that runs `cpu` and waits until it reports created (QEMU's
    /// `create_vcpu_thread`, `qemu_init_vcpu`). The vCPU does not run guest code until
    /// [`AccelOps::vm_start`].
    fn create_vcpu_thread(&self, cpu: &ObjectRef) -> Result<(), Error>;
    /// Sets the level of interrupt controller input (GSI) `gsi` (QEMU's `kvm_set_irq`).
    fn set_irq(&self, gsi: u32, level: bool);
    /// Whether the in-kernel PIT re-injects ticks the guest missed (`kvm-pit`'s
    /// `lost_tick_policy`: delay re-injects, discard drops).
    fn set_pit_reinject(&self, reinject: bool) -> Result<(), Error>;
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
    /// CPU `index`'s registers in QEMU's `info registers` layout, read on the CPU's own
    /// thread between two runs (QEMU's `run_on_cpu` + `cpu_dump_state`).
    fn cpu_dump_state(&self, index: u32) -> Result<String, CpuDumpError> {
        Err(CpuDumpError::NoThread(index))
    }
    /// The accelerator as `Any`, for tests that look at a particular accelerator's state.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A shared handle to the accelerator's operations.
pub type AccelOpsRef = Arc<dyn AccelOps>;
