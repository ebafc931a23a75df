//! The pvpanic register both pvpanic devices expose (QEMU's `hw/misc/pvpanic.c`): a read
//! returns the events the device supports, a write reports events (bit 0: the guest
//! panicked, `GUEST_PANICKED` and the `-action panic=` action; bit 1: a crash kernel was
//! loaded, `GUEST_CRASHLOADED`). `pvpanic` (ISA) and `pvpanic-pci` put it on their bus.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Weak;

use crate::core::memory::MemoryRegionOps;
use crate::core::qapi_event::{emit, json};
use crate::core::runstate::RunRequest;
use crate::core::services::MachineServices;

/// The guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest loaded a crash kernel (kdump) and goes on.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// The events QEMU 7.2's pvpanic supports, the `events` property's default.
pub const PVPANIC_EVENTS: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// The register (QEMU's `PVPanicState`): 1-byte accesses.
pub struct PvPanic {
    /// What a read returns (the `events` property; QEMU takes any value).
    pub events: u8,
    /// The machine a panic is reported to.
    pub machine: Weak<MachineServices>,
}

/// QEMU logs an unknown event once per process.
static UNKNOWN_LOGGED: AtomicBool = AtomicBool::new(false);

impl PvPanic {
    /// QEMU's `handle_event`: a panic wins over a crash-loaded report in the same write.
    fn handle_event(&self, event: u8) {
        if event & !PVPANIC_EVENTS != 0 && !UNKNOWN_LOGGED.swap(true, Ordering::Relaxed) {
            log::warn!("pvpanic: unknown event {event:#x}");
        }
        if event & PVPANIC_PANICKED != 0 {
            if let Some(machine) = self.machine.upgrade() {
                machine.request(RunRequest::GuestPanic);
            }
        } else if event & PVPANIC_CRASH_LOADED != 0 {
            // QEMU's `qemu_system_guest_crashloaded`: the guest goes on.
            log::info!("pvpanic: guest crash loaded");
            emit("GUEST_CRASHLOADED", Some(json!({"action": "run"})));
        }
    }
}

impl MemoryRegionOps for PvPanic {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        self.events.into()
    }

    fn write(&self, _offset: u64, value: u64, _size: u32) {
        self.handle_event(value as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reads_the_events_and_a_panic_is_a_run_request() {
        let machine = Arc::new(MachineServices::default());
        let p = PvPanic {
            events: PVPANIC_EVENTS,
            machine: Arc::downgrade(&machine),
        };
        assert_eq!(p.read(0, 1), 3);
        p.write(0, u64::from(PVPANIC_CRASH_LOADED), 1);
        assert_eq!(machine.vm().requests().take(), None);
        p.write(0, 0x80, 1);
        assert_eq!(machine.vm().requests().take(), None, "unknown events are ignored");
        p.write(0, 3, 1);
        assert_eq!(machine.vm().requests().take(), Some(RunRequest::GuestPanic));
    }
}
