//! The ISA bus (QEMU's `hw/isa/isa-bus.c`): ISA devices register their ports in the
//! machine's `system-io` address space through it, and take its 16 IRQ lines.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use qom::{type_init, Object, ObjectRef, Typed};

use crate::core::bus::{qbus_new, BusState};
use crate::core::irq::IrqLine;
use crate::core::memory::{AddressSpace, MemoryRegion};
use crate::core::qdev::{DeviceContext, DeviceImpl, DeviceState, RealizeError};
use crate::core::services::MachineServices;

/// QEMU's `TYPE_ISA_BUS`.
pub const TYPE_ISA_BUS: &str = "ISA";
/// QEMU's `TYPE_ISA_DEVICE`.
pub const TYPE_ISA_DEVICE: &str = "isa-device";

/// Number of ISA interrupt lines.
pub const ISA_NUM_IRQS: usize = 16;

/// QEMU's `ISABus`: its IRQ lines (the board connects them to the interrupt controller);
/// ports go to the machine's I/O space.
#[derive(qom::Object)]
#[qom(name = TYPE_ISA_BUS)]
pub struct IsaBus {
    #[parent]
    parent: BusState,
    irqs: Mutex<Vec<IrqLine>>,
    /// The DMA controllers of channels 0-3 and 4-7 (QEMU's `ISABus.dma`).
    dma: Mutex<[Option<Arc<dyn IsaDma>>; 2]>,
}

type_init!(IsaBus);

impl IsaBus {
    /// QEMU's `isa_bus_register_input_irqs`.
    pub fn set_irqs(&self, irqs: Vec<IrqLine>) {
        *self.irqs.lock() = irqs;
    }

    /// ISA IRQ `n`; a disconnected line where the board connected none.
    pub fn irq(&self, n: usize) -> IrqLine {
        self.irqs.lock().get(n).cloned().unwrap_or_default()
    }

    /// QEMU's `isa_bus_dma`: the controllers of the 8-bit (0-3) and 16-bit (4-7) channels.
    pub fn set_dma(&self, dma8: Arc<dyn IsaDma>, dma16: Arc<dyn IsaDma>) {
        *self.dma.lock() = [Some(dma8), Some(dma16)];
    }

    /// QEMU's `isa_bus_get_dma`: the controller of DMA channel `nchan`, if the board has one.
    pub fn dma(&self, nchan: usize) -> Option<Arc<dyn IsaDma>> {
        self.dma.lock()[usize::from(nchan > 3)].clone()
    }

    fn io(&self) -> Option<&Arc<AddressSpace>> {
        self.services().map(|s| s.system_io())
    }
}

/// A device on an ISA DMA channel (QEMU's `DMA_transfer_handler`): the controller serves
/// its request by calling [`IsaDmaClient::dma_transfer`] with the block's position so far
/// and its length (the count register's, in bytes); the device moves what it can through
/// [`IsaDma::read_memory`]/[`IsaDma::write_memory`] and returns the new position.
pub trait IsaDmaClient: Send + Sync {
    /// Moves bytes of channel `nchan`'s block from `pos` towards `len`; returns the new
    /// position.
    fn dma_transfer(&self, nchan: usize, pos: u32, len: u32) -> u32;
}

/// An ISA DMA controller as its devices see it (QEMU's `IsaDma` interface).
pub trait IsaDma: Send + Sync {
    /// Connects `client` to channel `nchan` (QEMU's `register_channel`).
    fn register_channel(&self, nchan: usize, client: Weak<dyn IsaDmaClient>);
    /// The device asks for service (raises DREQ); an unmasked channel is served at once.
    /// The caller must not hold a lock its `dma_transfer` takes.
    fn hold_dreq(&self, nchan: usize);
    /// The device's request ends (drops DREQ).
    fn release_dreq(&self, nchan: usize);
    /// Copies `buf.len()` bytes of the channel's block from guest memory, from byte `pos`
    /// of the block on; returns the count copied.
    fn read_memory(&self, nchan: usize, buf: &mut [u8], pos: u32) -> usize;
    /// Copies `buf` into the channel's block in guest memory at byte `pos`; returns the
    /// count copied.
    fn write_memory(&self, nchan: usize, buf: &[u8], pos: u32) -> usize;
}

/// QEMU's `ISADevice`: remembers the ports it mapped, to unmap them on unrealize.
#[derive(qom::Object)]
#[qom(name = TYPE_ISA_DEVICE, abstract)]
pub struct IsaDevice {
    #[parent]
    parent: DeviceState,
    ports: Mutex<Vec<(Arc<AddressSpace>, Arc<MemoryRegion>)>>,
}

type_init!(IsaDevice);

impl DeviceImpl for IsaDevice {
    const BUS_TYPE: Option<&'static str> = Some(TYPE_ISA_BUS);

    fn unrealize(&self, ctx: &DeviceContext) {
        for (io, region) in self.ports.lock().drain(..) {
            io.unmap(&region);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }
}

impl IsaDevice {
    /// QEMU's `isa_register_ioport`: maps `region` at port `base` of the device's bus.
    pub fn register_ioport(
        &self,
        ctx: &DeviceContext,
        region: Arc<MemoryRegion>,
        base: u16,
    ) -> Result<(), RealizeError> {
        let bus: &IsaBus = ctx.bus_state()?;
        let io = bus.io().ok_or(RealizeError::NoMachine(ctx.type_name()))?;
        io.map(base.into(), region.clone())?;
        self.ports.lock().push((io.clone(), region));
        Ok(())
    }

    /// QEMU's `isa_bus_get_dma`: the controller of DMA channel `nchan` on the device's bus.
    pub fn dma(&self, ctx: &DeviceContext, nchan: usize) -> Option<Arc<dyn IsaDma>> {
        ctx.bus_state::<IsaBus>().ok()?.dma(nchan)
    }

    /// QEMU's `isa_get_irq`: ISA IRQ `n` of the device's bus.
    pub fn irq(&self, ctx: &DeviceContext, n: usize) -> IrqLine {
        ctx.bus_state::<IsaBus>()
            .map(|bus| bus.irq(n))
            .unwrap_or_default()
    }
}

/// The lowest index below `max` that no other realized `T` on the ISA bus of the device
/// being realized (`ctx`) has, `index_of` reading a device's: a COM or LPT number. QEMU
/// counts ports process-wide; per bus keeps machines independent.
pub fn isa_free_index<T: qom::ObjectType>(
    ctx: &DeviceContext,
    max: u32,
    index_of: impl Fn(&Typed<T>) -> Option<u32>,
) -> Result<Option<u32>, RealizeError> {
    let bus: &IsaBus = ctx.bus_state()?;
    let used: Vec<u32> = bus
        .children()
        .into_iter()
        .filter(|c| !Arc::ptr_eq(c, ctx.object()))
        .filter(|c| crate::core::qdev::DeviceMethods::is_realized(&**c))
        .filter_map(Typed::<T>::new)
        .filter_map(|d| index_of(&d))
        .collect();
    Ok((0..max).find(|i| !used.contains(i)))
}

/// QEMU's `isa_bus_new`: an ISA bus named `name` under `parent`, whose ports go to the
/// machine's I/O space.
pub fn isa_bus_new(
    parent: &ObjectRef,
    name: &str,
    services: &Arc<MachineServices>,
) -> Result<ObjectRef, qom::Error> {
    qbus_new(TYPE_ISA_BUS, parent, name, services)
}

/// Connects the IRQ lines of the ISA bus `bus` (the board does, to the interrupt
/// controller).
pub fn isa_bus_set_irqs(bus: &Object, irqs: Vec<IrqLine>) {
    if let Some(bus) = bus.cast::<IsaBus>() {
        bus.set_irqs(irqs);
    }
}
