//! `scratch`: one 32-bit register at an ISA port, kept across reads (the README's example).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use qom::{type_init, Prop};

use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::isa::isa_bus::IsaDevice;

#[derive(Default)]
struct Register(AtomicU32);

impl MemoryRegionOps for Register {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        self.0.load(Ordering::Relaxed).into()
    }
    fn write(&self, _offset: u64, value: u64, _size: u32) {
        self.0.store(value as u32, Ordering::Relaxed);
    }
}

#[derive(qom::Object)]
#[qom(name = "scratch")]
struct Scratch {
    #[parent]
    parent: IsaDevice,
    #[property(default = 0x520, desc = "I/O port")]
    iobase: Prop<u16>,
    register: Arc<Register>,
}

type_init!(Scratch);

impl DeviceImpl for Scratch {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
    const DESCRIPTION: Option<&'static str> = Some("a scratch register");

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let region = MemoryRegion::new_io("scratch", 4, self.register.clone());
        self.register_ioport(ctx, region, self.iobase.get())
    }
}
