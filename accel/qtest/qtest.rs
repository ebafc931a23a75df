//! The `qtest` accelerator (QEMU's `accel/qtest/qtest.c`): runs no guest code. The machine
//! and its devices are built as usual, RAM is allocated but seen by no vCPU, interrupt
//! levels are recorded, and tests drive the buses directly, so device models are tested on
//! every machine, with or without `/dev/kvm`.

use std::sync::Arc;

use hw::core::accel_ops::{
    AccelOps, CpuDumpError, CpuDumpRegisters, DisplayLogError, LocalApicState, PagingRegisters,
    RamBlock, SlotId,
};
use hw::core::machine::MachineState;
use hw::core::vmstate::{VmStateError, VmStateSection};
use parking_lot::Mutex;
use qom::{type_init, Error, ObjectRef};

use crate::accel_system::{AccelError, AccelImpl, AccelState};

/// QEMU's `TYPE_QTEST_ACCEL`.
pub const TYPE_QTEST_ACCEL: &str = "qtest-accel";

/// Told of every change of a GSI's level: `(gsi, level)`.
pub type IrqListener = Box<dyn Fn(u32, bool) + Send + Sync>;

/// The qtest accelerator's operations: no vCPU runs; interrupt levels are kept for tests,
/// and changes go to the qtest protocol's interception (`irq_intercept_in ioapic`).
#[derive(Default)]
pub struct QtestOps {
    irq_levels: Mutex<Vec<bool>>,
    listener: Mutex<Option<IrqListener>>,
}

impl QtestOps {
    /// Reports every later change of a GSI's level to `listener` (one listener: a new one
    /// replaces the old).
    pub fn set_irq_listener(&self, listener: IrqListener) {
        *self.listener.lock() = Some(listener);
    }

    /// The level of GSI `gsi` as devices last set it.
    pub fn irq_level(&self, gsi: u32) -> bool {
        self.irq_levels
            .lock()
            .get(gsi as usize)
            .copied()
            .unwrap_or(false)
    }
}

impl AccelOps for QtestOps {
    fn map_ram(&self, _block: RamBlock) -> Result<(), Error> {
        Ok(())
    }
    // No guest code runs: the address space's regions serve qtest's accesses.
    fn map_slot(&self, _block: RamBlock, _readonly: bool) -> Result<SlotId, Error> {
        Ok(SlotId(0))
    }
    fn unmap_slot(&self, _slot: SlotId) -> Result<(), Error> {
        Ok(())
    }
    fn create_vcpu_thread(&self, _cpu: &ObjectRef) -> Result<(), Error> {
        // No guest code runs under qtest, so a CPU needs no thread.
        Ok(())
    }
    fn set_irq(&self, gsi: u32, level: bool) {
        let mut levels = self.irq_levels.lock();
        let i = gsi as usize;
        if levels.len() <= i {
            levels.resize(i + 1, false);
        }
        let changed = levels[i] != level;
        levels[i] = level;
        drop(levels);
        if changed {
            if let Some(listener) = &*self.listener.lock() {
                listener(gsi, level);
            }
        }
    }
    fn create_in_kernel_pit(&self, _reinject: bool) -> Result<(), Error> {
        // qtest has no in-kernel devices: the PIT's QOM face exists, no timer runs.
        Ok(())
    }
    fn vm_start(&self) {}
    fn pause_all(&self) {}
    fn resume_all(&self) {}
    fn reset_vcpus(&self) {}
    fn shutdown(&self) {}
    fn cpu_dump_state(&self, _index: u32) -> Result<String, CpuDumpError> {
        Err(CpuDumpError::NoRegisters("qtest"))
    }
    fn cpu_dump_registers(&self, _index: u32) -> Result<CpuDumpRegisters, CpuDumpError> {
        Err(CpuDumpError::NoRegisters("qtest"))
    }
    fn paging_registers(&self, _index: u32) -> Result<PagingRegisters, CpuDumpError> {
        Err(CpuDumpError::NoRegisters("qtest"))
    }
    fn local_apic_state(&self, _index: u32) -> Result<LocalApicState, CpuDumpError> {
        Err(CpuDumpError::NoRegisters("qtest"))
    }
    fn name(&self) -> &'static str {
        "qtest"
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    // A qtest machine migrates its devices and RAM: no guest code runs, so its CPUs and
    // the accelerator hold no state, and no vCPU writes memory behind the devices' backs.
    fn save_cpu_state(&self, _index: u32) -> Result<VmStateSection, VmStateError> {
        Ok(VmStateSection::new(1))
    }
    fn load_cpu_state(&self, _index: u32, state: VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)
    }
    fn set_dirty_log(&self, _on: bool) -> Result<(), VmStateError> {
        Ok(())
    }
    fn dirty_pages(&self) -> Result<Vec<u64>, VmStateError> {
        Ok(Vec::new())
    }
    // No vCPU writes memory: every write goes through the devices, which track their own.
    fn log_display_memory(&self, _host_addr: u64, _size: u64) -> Result<(), DisplayLogError> {
        Ok(())
    }
    fn display_dirty_pages(
        &self,
        _host_addr: u64,
        _size: u64,
    ) -> Result<Vec<u64>, DisplayLogError> {
        Ok(Vec::new())
    }
    fn save_vm_state(&self) -> Result<VmStateSection, VmStateError> {
        Ok(VmStateSection::new(1))
    }
    fn load_vm_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)
    }
}

/// `-accel qtest`: runs no guest code, for device tests.
#[derive(qom::Object)]
#[qom(name = TYPE_QTEST_ACCEL)]
pub struct QtestAccel {
    #[parent]
    parent: AccelState,
}

type_init!(QtestAccel);

impl AccelImpl for QtestAccel {
    fn init_machine(&self, machine: &MachineState) -> Result<(), AccelError> {
        machine
            .set_accel_ops(Arc::new(QtestOps::default()))
            .map_err(|e| AccelError::Other(Box::new(e)))
    }
}
