//! PC board pieces that are not QOM devices in QEMU either (QEMU's `hw/i386/pc.c`): the
//! POST-code port 0x80, the FPU error port 0xf0, and port 92's fast reset.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::core::memory::{MemoryError, MemoryRegion, MemoryRegionOps};
use crate::core::runstate::RunRequest;
use crate::core::services::MachineServices;

/// Port 0x80 (POST codes, and the classic I/O delay port): writes are dropped quietly,
/// reads return all ones, as on QEMU's `ioport80`.
struct PostPort;

impl MemoryRegionOps for PostPort {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        0xff
    }
    fn write(&self, _offset: u64, _value: u64, _size: u32) {}
}

/// Port 0xf0 (clears the FPU error latch): no FERR# is ever raised with KVM's FPU, so there
/// is nothing to clear.
struct FpuErrorPort;

impl MemoryRegionOps for FpuErrorPort {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        0xff
    }
    fn write(&self, _offset: u64, _value: u64, _size: u32) {}
}

/// Port 0x92, "system control port A": bit 0 is a fast reset, bit 1 the A20 gate (always on
/// for a KVM guest; its value is kept so the guest reads back what it wrote).
struct Port92 {
    machine: Weak<MachineServices>,
    value: Mutex<u8>,
}

impl MemoryRegionOps for Port92 {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        u64::from(*self.value.lock())
    }
    fn write(&self, _offset: u64, value: u64, _size: u32) {
        let value = value as u8;
        *self.value.lock() = value & !1;
        if value & 1 != 0 {
            if let Some(machine) = self.machine.upgrade() {
                machine.request(RunRequest::GuestReset);
            }
        }
    }
}

/// Maps the PC's miscellaneous ports into the machine's `system-io`.
pub fn pc_basic_ports_init(machine: &Arc<MachineServices>) -> Result<(), MemoryError> {
    let io = machine.system_io();
    io.map(0x80, MemoryRegion::new_io("ioport80", 1, Arc::new(PostPort)))?;
    io.map(0xf0, MemoryRegion::new_io("ioportF0", 1, Arc::new(FpuErrorPort)))?;
    let port92 = Port92 {
        machine: Arc::downgrade(machine),
        value: Mutex::new(0x02),
    };
    io.map(0x92, MemoryRegion::new_io("port92", 1, Arc::new(port92)))?;
    Ok(())
}
