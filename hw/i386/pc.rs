//! PC board pieces that are not QOM devices in QEMU either (QEMU's `hw/i386/pc.c`): the
//! POST-code port 0x80, the FPU error port 0xf0, port 92's fast reset, and the older
//! machine versions' compat properties.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::core::machine_compat::{CompatProp, MachineVersion};
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

/// What older pc machines undo of later CPU and board defaults (QEMU's `pc_compat_X_Y`
/// arrays in `hw/i386/pc.c`), newest first, restricted to the properties qomvm has (see
/// [`crate::core::machine_compat`]). QEMU's `min-level`/`min-xlevel` entries and its
/// migration and Hyper-V version flags are not modelled and left out.
pub const PC_COMPAT: &[(MachineVersion, &[CompatProp])] = &[
    (
        (6, 0),
        &[
            ("qemu64-x86_64-cpu", "family", "6"),
            ("qemu64-x86_64-cpu", "model", "6"),
            ("qemu64-x86_64-cpu", "stepping", "3"),
        ],
    ),
    ((5, 1), &[("x86_64-cpu", "kvm-msi-ext-dest-id", "off")]),
    (
        (3, 1),
        &[
            ("Opteron_G3-x86_64-cpu", "rdtscp", "off"),
            ("Opteron_G4-x86_64-cpu", "rdtscp", "off"),
            ("Opteron_G4-x86_64-cpu", "npt", "off"),
            ("Opteron_G4-x86_64-cpu", "nrip-save", "off"),
            ("Opteron_G5-x86_64-cpu", "rdtscp", "off"),
            ("Opteron_G5-x86_64-cpu", "npt", "off"),
            ("Opteron_G5-x86_64-cpu", "nrip-save", "off"),
            ("EPYC-x86_64-cpu", "npt", "off"),
            ("EPYC-x86_64-cpu", "nrip-save", "off"),
            ("EPYC-IBPB-x86_64-cpu", "npt", "off"),
            ("EPYC-IBPB-x86_64-cpu", "nrip-save", "off"),
            ("Skylake-Client-x86_64-cpu", "mpx", "on"),
            ("Skylake-Client-IBRS-x86_64-cpu", "mpx", "on"),
            ("Skylake-Server-x86_64-cpu", "mpx", "on"),
            ("Skylake-Server-IBRS-x86_64-cpu", "mpx", "on"),
            ("Cascadelake-Server-x86_64-cpu", "mpx", "on"),
            ("Icelake-Server-x86_64-cpu", "mpx", "on"),
            ("Cascadelake-Server-x86_64-cpu", "stepping", "5"),
        ],
    ),
    (
        (3, 0),
        &[
            ("Skylake-Server-x86_64-cpu", "pku", "off"),
            ("Skylake-Server-IBRS-x86_64-cpu", "pku", "off"),
        ],
    ),
    (
        (2, 12),
        &[
            ("x86_64-cpu", "topoext", "off"),
            ("EPYC-x86_64-cpu", "xlevel", "0x8000000a"),
            ("EPYC-IBPB-x86_64-cpu", "xlevel", "0x8000000a"),
        ],
    ),
    ((2, 11), &[("Skylake-Server-x86_64-cpu", "clflushopt", "off")]),
    ((2, 8), &[("Haswell-x86_64-cpu", "stepping", "1")]),
    (
        (2, 7),
        &[
            ("x86_64-cpu", "l3-cache", "off"),
            ("Opteron_G3-x86_64-cpu", "family", "15"),
            ("Opteron_G3-x86_64-cpu", "model", "6"),
            ("Opteron_G3-x86_64-cpu", "stepping", "1"),
        ],
    ),
    (
        (2, 4),
        &[
            ("qemu64-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.4.0"),
            ("qemu32-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.4.0"),
            ("athlon-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.4.0"),
            ("Haswell-x86_64-cpu", "abm", "off"),
            ("Haswell-noTSX-x86_64-cpu", "abm", "off"),
            ("Broadwell-x86_64-cpu", "abm", "off"),
            ("Broadwell-noTSX-x86_64-cpu", "abm", "off"),
            ("host-x86_64-cpu", "host-cache-info", "on"),
            ("x86_64-cpu", "check", "off"),
            ("qemu64-x86_64-cpu", "sse4a", "on"),
            ("qemu64-x86_64-cpu", "abm", "on"),
            ("qemu64-x86_64-cpu", "popcnt", "on"),
            ("qemu32-x86_64-cpu", "popcnt", "on"),
            ("Opteron_G2-x86_64-cpu", "rdtscp", "on"),
            ("Opteron_G3-x86_64-cpu", "rdtscp", "on"),
            ("Opteron_G4-x86_64-cpu", "rdtscp", "on"),
            ("Opteron_G5-x86_64-cpu", "rdtscp", "on"),
        ],
    ),
    (
        (2, 3),
        &[
            ("qemu64-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.3.0"),
            ("qemu32-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.3.0"),
            ("athlon-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.3.0"),
            ("x86_64-cpu", "arat", "off"),
        ],
    ),
    (
        (2, 2),
        &[
            ("qemu64-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.2.0"),
            ("qemu32-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.2.0"),
            ("athlon-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.2.0"),
            ("kvm64-x86_64-cpu", "vme", "off"),
            ("kvm32-x86_64-cpu", "vme", "off"),
            ("Conroe-x86_64-cpu", "vme", "off"),
            ("Penryn-x86_64-cpu", "vme", "off"),
            ("Nehalem-x86_64-cpu", "vme", "off"),
            ("Westmere-x86_64-cpu", "vme", "off"),
            ("SandyBridge-x86_64-cpu", "vme", "off"),
            ("Haswell-x86_64-cpu", "vme", "off"),
            ("Broadwell-x86_64-cpu", "vme", "off"),
            ("Opteron_G1-x86_64-cpu", "vme", "off"),
            ("Opteron_G2-x86_64-cpu", "vme", "off"),
            ("Opteron_G3-x86_64-cpu", "vme", "off"),
            ("Opteron_G4-x86_64-cpu", "vme", "off"),
            ("Opteron_G5-x86_64-cpu", "vme", "off"),
            ("Haswell-x86_64-cpu", "f16c", "off"),
            ("Haswell-x86_64-cpu", "rdrand", "off"),
            ("Broadwell-x86_64-cpu", "f16c", "off"),
            ("Broadwell-x86_64-cpu", "rdrand", "off"),
        ],
    ),
    (
        (2, 1),
        &[
            ("qemu64-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.1.0"),
            ("qemu32-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.1.0"),
            ("athlon-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.1.0"),
            ("coreduo-x86_64-cpu", "vmx", "on"),
            ("core2duo-x86_64-cpu", "vmx", "on"),
        ],
    ),
    (
        (2, 0),
        &[
            ("qemu64-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.0.0"),
            ("qemu32-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.0.0"),
            ("athlon-x86_64-cpu", "model-id", "QEMU Virtual CPU version 2.0.0"),
            ("virtio-net-pci", "guest_announce", "off"),
        ],
    ),
];
