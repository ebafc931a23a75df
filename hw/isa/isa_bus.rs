//! The ISA bus (QEMU's `hw/isa/isa-bus.c`): ISA devices register their ports in the
//! machine's `system-io` address space through it, and take its 16 IRQ lines.

use std::sync::Arc;

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

    fn io(&self) -> Option<&Arc<AddressSpace>> {
        self.services().map(|s| s.system_io())
    }
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
