//! `isa-debug-exit` (QEMU's `hw/misc/debugexit.c`): a write of value v to its port ends
//! qomvm with exit status `(v << 1) | 1`. Test kernels use it to report their result.

use std::sync::Arc;

use qom::{type_init, Error, Object, ObjectClass, Property, WeakObjectRef};

use crate::core::machine::{machine_of, machine_state, RunRequest};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{device_class_mut, device_class_set_props, DeviceCategory, DeviceMethods};
use crate::isa::isa_bus::{isa_register_ioport, TYPE_ISA_DEVICE};

/// QEMU's `TYPE_ISA_DEBUG_EXIT_DEVICE`.
pub const TYPE_ISA_DEBUG_EXIT: &str = "isa-debug-exit";

const PROPERTIES: &[Property] = &[
    Property::uint("iobase", 16, 0x501, "First I/O port"),
    Property::uint("iosize", 16, 0x02, "Number of I/O ports"),
];

/// The port handler: posts the exit request to the machine.
struct DebugExitPort {
    machine: WeakObjectRef,
}

impl MemoryRegionOps for DebugExitPort {
    fn read(&self, _offset: u64, size: u32) -> u64 {
        // QEMU's debugexit reads as 0 (no read handler returns the bus default of zeros).
        let _ = size;
        0
    }

    fn write(&self, _offset: u64, value: u64, size: u32) {
        let mask = if size >= 8 { u64::MAX } else { (1u64 << (size * 8)) - 1 };
        // The exit status is an int: the guest's value shifted left, low bit set, truncated
        // to 32 bits as C's exit() would see it.
        let status = (((value & mask) << 1) | 1) as u32 as i32;
        if let Some(machine) = self.machine.upgrade() {
            if let Some(ms) = machine_state(&machine) {
                ms.run_state().request(RunRequest::DebugExit(status));
            }
        }
    }
}

/// Realize errors of `isa-debug-exit`.
#[derive(Debug, thiserror::Error)]
enum DebugExitError {
    #[error("isa-debug-exit: not part of a machine")]
    NoMachine,
    #[error("isa-debug-exit: iosize must be at least 1")]
    NoPorts,
}

fn debug_exit_realize(dev: &Object) -> Result<(), Error> {
    let iobase = dev.prop_uint("iobase")? as u16;
    let iosize = dev.prop_uint("iosize")?;
    if iosize == 0 {
        return Err(Error::other(DebugExitError::NoPorts));
    }
    let machine = machine_of(dev)
        .or_else(|| dev.parent_bus().and_then(|b| machine_of(&b)))
        .ok_or_else(|| Error::other(DebugExitError::NoMachine))?;
    let port = Arc::new(DebugExitPort {
        machine: machine.downgrade(),
    });
    let region = MemoryRegion::new_io(TYPE_ISA_DEBUG_EXIT, iosize, port);
    isa_register_ioport(dev, region, iobase).map_err(Error::other)
}

fn debug_exit_class_init(class: &mut ObjectClass) {
    device_class_set_props(class, PROPERTIES);
    let dc = device_class_mut(class);
    dc.realize = Some(debug_exit_realize);
    dc.category = DeviceCategory::Misc;
}

type_init! {
    name: TYPE_ISA_DEBUG_EXIT,
    parent: Some(TYPE_ISA_DEVICE),
    class_init: Some(debug_exit_class_init),
}
