//! `isa-fdc`, the floppy controller on the ISA bus (QEMU's `hw/block/fdc-isa.c`): ports
//! 0x3f1-0x3f5 and 0x3f7, IRQ 6, DMA channel 2, and a `floppy-bus.0` for its `floppy`
//! drives. QEMU's pc always has one; `-fda`/`-drive if=floppy` put drives on it, and so
//! does `-device floppy`.

use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::{type_init, Prop};

use crate::block::fdc::{Fdc, FdcVmState, FloppyBus, FloppyDriveType, MAX_FD, TYPE_FLOPPY_BUS};
use crate::core::bus::qbus_new;
use crate::core::io_worker::IoWorker;
use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::ChangeHandlerId;
use crate::core::timer::VirtualTimer;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::isa::isa_bus::{IsaDevice, ISA_NUM_IRQS};

/// QEMU's `TYPE_ISA_FDC`.
pub const TYPE_ISA_FDC: &str = "isa-fdc";

/// The ports' byte registers: base+1..+5 and base+7 (base+6 is the IDE's 0x3f6).
struct FdcPorts {
    fdc: Arc<Fdc>,
    /// The region's first port's register number (1 or 7).
    first: u64,
}

impl MemoryRegionOps for FdcPorts {
    fn read(&self, offset: u64, size: u32) -> u64 {
        (0..u64::from(size.min(8))).fold(0, |value, i| {
            value | u64::from(self.fdc.read(self.first + offset + i)) << (8 * i)
        })
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        for i in 0..u64::from(size.min(8)) {
            self.fdc.write(self.first + offset + i, (value >> (8 * i)) as u8);
        }
    }
}

/// Errors of `isa-fdc`, in QEMU's words where it has them.
#[derive(Debug, thiserror::Error)]
pub enum IsaFdcError {
    /// `fallback=auto`.
    #[error("Cannot choose a fallback FDrive type of 'auto'")]
    FallbackAuto,
    /// A DMA channel the bus has no controller for.
    #[error("ISA controller does not support DMA")]
    NoDma,
    /// `dma` past channel 7.
    #[error("isa-fdc: DMA channel {0} is invalid (the ISA bus has 8)")]
    BadDma(u32),
    /// `iobase` whose ports do not fit below 0x10000.
    #[error("isa-fdc: iobase 0x{0:x} is out of the I/O space")]
    BadIobase(u32),
    /// `irq` past the ISA bus's 16 lines.
    #[error("isa-fdc: IRQ {0} is invalid (the ISA bus has {ISA_NUM_IRQS})")]
    BadIrq(u32),
    /// The host refused a timer or an event-loop registration.
    #[error("isa-fdc: {0}")]
    Host(std::io::Error),
}

/// The controller's registrations on the main loop and the run state.
struct Handlers {
    aio: Arc<AioContext>,
    fds: Vec<AioHandlerId>,
    change: ChangeHandlerId,
}

/// What `isa-fdc` tells the board's ACPI tables (QEMU's `build_fdc_aml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdcAcpi {
    /// The controller's base port (its ports are base+2..+5 and base+7).
    pub iobase: u16,
    /// Its ISA IRQ.
    pub irq: u8,
    /// Its DMA channel.
    pub dma: u8,
    /// Each drive's type, where a drive is present.
    pub drives: [Option<FloppyDriveType>; MAX_FD],
}

/// QEMU's `FDCtrlISABus`.
#[derive(qom::Object)]
#[qom(name = TYPE_ISA_FDC)]
pub struct IsaFdc {
    #[parent]
    parent: IsaDevice,
    #[property(default = 0x3f0u32, desc = "I/O port base")]
    iobase: Prop<u32>,
    #[property(default = 6u32, desc = "ISA IRQ")]
    irq: Prop<u32>,
    #[property(default = 2u32, desc = "ISA DMA channel (4294967295: none)")]
    dma: Prop<u32>,
    #[property(name = "fdtypeA", default = FloppyDriveType::Auto, desc = "FDC drive type, 144/288/120/none/auto")]
    fdtype_a: Prop<FloppyDriveType>,
    #[property(name = "fdtypeB", default = FloppyDriveType::Auto, desc = "FDC drive type, 144/288/120/none/auto")]
    fdtype_b: Prop<FloppyDriveType>,
    #[property(default = FloppyDriveType::Type288, desc = "FDC drive type, 144/288/120/none/auto")]
    fallback: Prop<FloppyDriveType>,
    #[property(name = "bootindexA", default = -1, desc = "Boot order of drive A (firmware)")]
    bootindex_a: Prop<i32>,
    #[property(name = "bootindexB", default = -1, desc = "Boot order of drive B (firmware)")]
    bootindex_b: Prop<i32>,
    fdc: OnceLock<Arc<Fdc>>,
    handlers: Mutex<Option<Handlers>>,
}

type_init!(IsaFdc);

impl IsaFdc {
    /// The controller, once realized.
    pub fn fdc(&self) -> Option<&Arc<Fdc>> {
        self.fdc.get()
    }

    /// The type of drive `unit` (QEMU's `isa_fdc_get_drive_type`).
    pub fn drive_type(&self, unit: usize) -> FloppyDriveType {
        self.fdc
            .get()
            .map_or(FloppyDriveType::None, |f| f.drive_type(unit))
    }

    /// What the DSDT says of the controller, once realized.
    pub fn acpi(&self) -> Option<FdcAcpi> {
        self.fdc.get()?;
        let drive = |unit| Some(self.drive_type(unit)).filter(|t| *t != FloppyDriveType::None);
        Some(FdcAcpi {
            iobase: u16::try_from(self.iobase.get()).ok()?,
            irq: u8::try_from(self.irq.get()).ok()?,
            dma: u8::try_from(self.dma.get()).ok()?,
            drives: [drive(0), drive(1)],
        })
    }

    /// The firmware boot entries of the controller's drives (QEMU's `bootindexA`,
    /// `bootindexB`): `(index, fdc@03f0/floppy@N)`, below the ISA bridge's path.
    pub fn boot_entries(&self) -> Vec<(i32, String)> {
        let iobase = self.iobase.get();
        [self.bootindex_a.get(), self.bootindex_b.get()]
            .into_iter()
            .enumerate()
            .filter(|(_, index)| *index >= 0)
            .map(|(unit, index)| (index, format!("fdc@{iobase:04x}/floppy@{unit}")))
            .collect()
    }
}

impl DeviceImpl for IsaFdc {
    const CATEGORY: DeviceCategory = DeviceCategory::Storage;
    const DESCRIPTION: Option<&'static str> = Some("virtual floppy controller");

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let err = |e: IsaFdcError| RealizeError::device(e);
        let services = ctx.machine()?.clone();
        let iobase = self.iobase.get();
        let base = u16::try_from(iobase)
            .ok()
            .filter(|&b| u32::from(b) + 8 <= 0x1_0000)
            .ok_or(err(IsaFdcError::BadIobase(iobase)))?;
        let irq = self.irq.get();
        if irq as usize >= ISA_NUM_IRQS {
            return Err(err(IsaFdcError::BadIrq(irq)));
        }
        let fallback = self.fallback.get();
        if fallback == FloppyDriveType::Auto {
            return Err(err(IsaFdcError::FallbackAuto));
        }
        let host = |e: std::io::Error| err(IsaFdcError::Host(e));
        let timer = VirtualTimer::new(services.vm().clock().clone()).map_err(host)?;
        let worker = IoWorker::spawn("fdc-io").map_err(host)?;
        let fdc = Fdc::create(timer, worker);
        fdc.set_fallback(fallback);
        fdc.set_irq(self.parent.irq(ctx, irq as usize));
        match self.dma.get() {
            u32::MAX => {}
            chan if chan > 7 => return Err(err(IsaFdcError::BadDma(chan))),
            chan => {
                let dma = self
                    .parent
                    .dma(ctx, chan as usize)
                    .ok_or(err(IsaFdcError::NoDma))?;
                fdc.set_dma(dma, chan as usize);
            }
        }
        fdc.reset();
        for (first, len, at) in [(1, 5, base + 1), (7, 1, base + 7)] {
            let ops = Arc::new(FdcPorts { fdc: fdc.clone(), first });
            self.register_ioport(ctx, MemoryRegion::new_io("fdc", len, ops), at)?;
        }
        let bus = qbus_new(TYPE_FLOPPY_BUS, ctx.object(), "floppy-bus.0", &services)?;
        if let Some(bus) = bus.downcast::<FloppyBus>() {
            bus.set_fdc(fdc.clone());
        }
        let aio = services.try_main_context().map_err(host)?;
        let weak: Weak<Fdc> = Arc::downgrade(&fdc);
        let mut ids = Vec::new();
        if let Some(fd) = fdc.timer_fd() {
            let weak = weak.clone();
            let expired = move || {
                if let Some(fdc) = weak.upgrade() {
                    fdc.timer_expired();
                }
            };
            ids.push(aio.add_fd(fd, Box::new(expired)).map_err(host)?);
        }
        let change = services.vm().add_change_handler(
            0,
            Arc::new(move |running, _| {
                if let Some(fdc) = weak.upgrade() {
                    fdc.run_state_changed(running);
                }
            }),
        );
        *self.handlers.lock() = Some(Handlers { aio, fds: ids, change });
        let _ = self.fdc.set(fdc);
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some(h) = self.handlers.lock().take() {
            for id in h.fds {
                h.aio.remove_fd(id);
            }
            if let Ok(services) = ctx.machine() {
                services.vm().remove_change_handler(h.change);
            }
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn reset(&self) {
        if let Some(fdc) = self.fdc.get() {
            fdc.reset();
        }
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let fdc = self.fdc.get().ok_or_else(not_realized)?;
        Ok(VmStateSection::new(2).with("fdc", fdc.save()))
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(2, 2)?;
        let saved: FdcVmState = state.get("fdc")?;
        let fdc = self.fdc.get().ok_or_else(not_realized)?;
        fdc.load(saved).map_err(VmStateError::Mismatch)
    }
}

fn not_realized() -> VmStateError {
    VmStateError::Mismatch("isa-fdc is not realized".to_string())
}
