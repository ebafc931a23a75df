//! `pvpanic` (QEMU's `hw/misc/pvpanic-isa.c`): the pvpanic register at an ISA port (0x505),
//! described in the DSDT as `QEMU0001` so that Linux's pvpanic driver finds it. A guest
//! write of 1 reports a panic: `GUEST_PANICKED` and the `-action panic=` action.

use std::sync::Arc;

use qom::{type_init, Prop};

use crate::core::memory::MemoryRegion;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::isa::isa_bus::IsaDevice;
use crate::misc::pvpanic::{PvPanic, PVPANIC_EVENTS};

/// QEMU's `TYPE_PVPANIC_ISA_DEVICE`.
pub const TYPE_PVPANIC_ISA: &str = "pvpanic";

/// QEMU's `PVPanicISAState`.
#[derive(qom::Object)]
#[qom(name = TYPE_PVPANIC_ISA)]
pub struct PvPanicIsa {
    #[parent]
    parent: IsaDevice,
    #[property(default = 0x505, desc = "I/O port")]
    ioport: Prop<u16>,
    #[property(default = PVPANIC_EVENTS, desc = "Events reported: 1 panicked, 2 crash loaded")]
    events: Prop<u8>,
}

type_init!(PvPanicIsa);

impl PvPanicIsa {
    /// The `ioport` property (the board describes it in the DSDT).
    pub fn ioport(&self) -> u16 {
        self.ioport.get()
    }
}

impl DeviceImpl for PvPanicIsa {
    // Its register reports events and keeps nothing.
    const STATELESS: bool = true;
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let register = Arc::new(PvPanic {
            events: self.events.get(),
            machine: Arc::downgrade(ctx.machine()?),
        });
        let region = MemoryRegion::new_io("pvpanic", 1, register);
        self.register_ioport(ctx, region, self.ioport.get())
    }
}
