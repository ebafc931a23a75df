//! `isa-debug-exit` (QEMU's `hw/misc/debugexit.c`): a write of value v to its port ends
//! qomvm with exit status `(v << 1) | 1`. Test kernels use it to report their result.

use std::sync::{Arc, Weak};

use qom::{type_init, Prop};

use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::RunRequest;
use crate::core::services::MachineServices;
use crate::isa::isa_bus::IsaDevice;

/// QEMU's `TYPE_ISA_DEBUG_EXIT_DEVICE`.
pub const TYPE_ISA_DEBUG_EXIT: &str = "isa-debug-exit";

/// QEMU's `ISADebugExitState`.
#[derive(qom::Object)]
#[qom(name = TYPE_ISA_DEBUG_EXIT)]
pub struct DebugExit {
    #[parent]
    parent: IsaDevice,
    #[property(default = 0x501, desc = "First I/O port")]
    iobase: Prop<u16>,
    #[property(default = 0x02, desc = "Number of I/O ports")]
    iosize: Prop<u16>,
}

type_init!(DebugExit);

/// The port handler: posts the exit request to the machine.
struct DebugExitPort {
    machine: Weak<MachineServices>,
}

impl MemoryRegionOps for DebugExitPort {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        // QEMU's debugexit reads as 0 (no read handler returns the bus default of zeros).
        0
    }

    fn write(&self, _offset: u64, value: u64, size: u32) {
        let mask = if size >= 8 { u64::MAX } else { (1u64 << (size * 8)) - 1 };
        // The exit status is an int: the guest's value shifted left, low bit set, truncated
        // to 32 bits as C's exit() would see it.
        let status = (((value & mask) << 1) | 1) as u32 as i32;
        if let Some(machine) = self.machine.upgrade() {
            machine.request(RunRequest::DebugExit(status));
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("isa-debug-exit: iosize must be at least 1")]
struct NoPorts;

impl DeviceImpl for DebugExit {
    // A write ends the process: nothing to keep.
    const STATELESS: bool = true;
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let iosize = self.iosize.get();
        if iosize == 0 {
            return Err(RealizeError::device(NoPorts));
        }
        let port = Arc::new(DebugExitPort {
            machine: Arc::downgrade(ctx.machine()?),
        });
        let region = MemoryRegion::new_io(TYPE_ISA_DEBUG_EXIT, iosize.into(), port);
        self.register_ioport(ctx, region, self.iobase.get())
    }
}
