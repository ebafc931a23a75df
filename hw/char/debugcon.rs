//! `isa-debugcon` (QEMU's `hw/char/debugcon.c`): one I/O port whose byte writes go to a
//! character backend. SeaBIOS (port 0x402), OVMF and test kernels print their debug log
//! there; a read returns the `readback` byte, which is how firmware detects the port.

use std::sync::Arc;

use qom::{type_init, Prop};

use crate::core::chardev::{chardev_claim, chardev_release, CharBackend, ChardevError};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::isa::isa_bus::IsaDevice;

/// QEMU's `TYPE_ISA_DEBUGCON_DEVICE`.
pub const TYPE_ISA_DEBUGCON: &str = "isa-debugcon";

/// QEMU's `ISADebugconState`.
#[derive(qom::Object)]
#[qom(name = TYPE_ISA_DEBUGCON)]
pub struct IsaDebugcon {
    #[parent]
    parent: IsaDevice,
    #[property(default = 0xe9, desc = "I/O port")]
    iobase: Prop<u32>,
    #[property(desc = "ID of a chardev to use as a backend")]
    chardev: Prop<Option<String>>,
    #[property(default = 0xe9, desc = "Value a read of the port returns")]
    readback: Prop<u32>,
}

type_init!(IsaDebugcon);

/// The port: byte writes to the backend, byte reads of `readback`.
struct DebugconPort {
    backend: Arc<dyn CharBackend>,
    readback: u8,
}

impl MemoryRegionOps for DebugconPort {
    // The port takes byte accesses only; QEMU splits a wider port access into bytes at
    // successive ports, so an `outl` prints its low byte and an `inl` reads the readback
    // byte with the unassigned ports' 0xff above it.
    fn read(&self, _offset: u64, size: u32) -> u64 {
        let mask = u64::MAX >> (64 - 8 * size.clamp(1, 8));
        (u64::MAX << 8 | u64::from(self.readback)) & mask
    }

    fn write(&self, _offset: u64, value: u64, _size: u32) {
        self.backend.write(&[value as u8]);
    }
}

#[derive(Debug, thiserror::Error)]
enum DebugconError {
    #[error("Can't create debugcon device, empty char device")]
    NoChardev,
    #[error("Property '{TYPE_ISA_DEBUGCON}.chardev' can't find value '{0}'")]
    ChardevNotFound(String),
    #[error("Property '{TYPE_ISA_DEBUGCON}.chardev' can't take value '{0}': Device '{0}' is in use")]
    ChardevInUse(String),
    #[error("Property '{TYPE_ISA_DEBUGCON}.iobase': port {0:#x} is not an I/O port")]
    BadIobase(u32),
}

impl DeviceImpl for IsaDebugcon {
    // QEMU's debugcon has no migration state: it keeps nothing between accesses.
    const STATELESS: bool = true;
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let id = self
            .chardev
            .get()
            .ok_or(RealizeError::device(DebugconError::NoChardev))?;
        let iobase = self.iobase.get();
        let iobase = u16::try_from(iobase)
            .map_err(|_| RealizeError::device(DebugconError::BadIobase(iobase)))?;
        let backend = chardev_claim(&id).map_err(|e| {
            RealizeError::device(match e {
                ChardevError::InUse(_) => DebugconError::ChardevInUse(id.clone()),
                _ => DebugconError::ChardevNotFound(id.clone()),
            })
        })?;
        let port = Arc::new(DebugconPort {
            backend: backend.clone(),
            // QEMU's readback is a uint32 property read back through a 1-byte access.
            readback: self.readback.get() as u8,
        });
        let region = MemoryRegion::new_io(TYPE_ISA_DEBUGCON, 1, port);
        self.register_ioport(ctx, region, iobase).inspect_err(|_| {
            chardev_release(&id, &backend);
        })
    }
}
