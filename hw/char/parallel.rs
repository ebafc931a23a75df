//! `isa-parallel`, the PC's parallel (printer) port (QEMU's `hw/char/parallel.c` in its
//! emulated mode, the one every chardev but a host parport gets): eight ports at 0x378,
//! 0x278 or 0x3bc by `index`, IRQ 7.
//!
//! A printer driver puts a byte on the data register and pulses STROBE in the control
//! register; the byte goes to the chardev on the strobe's rising edge. The status register
//! then shows the printer busy, and reading it twice walks it through ACK back to ready,
//! as QEMU's emulation does (no timing). With INTEN set, releasing the strobe raises the
//! IRQ until the status register is read.

use std::sync::Arc;

use parking_lot::Mutex;
use qom::{type_init, Prop, Typed};
use serde::{Deserialize, Serialize};

use crate::core::chardev::{chardev_claim, chardev_release, CharBackend, ChardevError};
use crate::core::irq::IrqLine;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{qdev_new_typed, qdev_realize, DeviceCategory, DeviceContext, DeviceImpl, QdevError, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::isa::isa_bus::{isa_free_index, IsaDevice, ISA_NUM_IRQS};

/// QEMU's `TYPE_ISA_PARALLEL`.
pub const TYPE_ISA_PARALLEL: &str = "isa-parallel";
/// Ports a machine can have (QEMU's `MAX_PARALLEL_PORTS`).
pub const MAX_PARALLEL_PORTS: usize = 3;
/// Each index's first port (LPT1-LPT3).
pub const ISA_PARALLEL_IO: [u16; MAX_PARALLEL_PORTS] = [0x378, 0x278, 0x3bc];
/// The ports' IRQ unless `irq` says otherwise.
pub const PARALLEL_IRQ: u32 = 7;
const REGION_SIZE: u64 = 8;
/// `index` and `iobase` unset (QEMU's -1).
const UNSET: u32 = u32::MAX;

const REG_DATA: u64 = 0;
const REG_STATUS: u64 = 1;
const REG_CONTROL: u64 = 2;

/// Status: not busy (the line is inverted).
const STS_BUSY: u8 = 0x80;
const STS_ACK: u8 = 0x40;
const STS_ONLINE: u8 = 0x10;
const STS_ERROR: u8 = 0x08;
const STS_TMOUT: u8 = 0x01;

/// Control: the data register reads the printer's lines (bidirectional mode).
const CTR_DIR: u8 = 0x20;
const CTR_INTEN: u8 = 0x10;
const CTR_SELECT: u8 = 0x08;
/// Low: the printer is held in reset.
const CTR_INIT: u8 = 0x04;
const CTR_STROBE: u8 = 0x01;
/// Bits 6 and 7 are not implemented and read as ones.
const CTR_UNUSED: u8 = 0xc0;

/// The registers (QEMU's `ParallelState`, the emulated mode's part).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Registers {
    /// The byte the guest wrote.
    dataw: u8,
    /// The byte the printer's lines would show (nothing drives them: all ones).
    datar: u8,
    status: u8,
    control: u8,
    irq_pending: bool,
}

impl Default for Registers {
    /// QEMU's `parallel_reset`.
    fn default() -> Self {
        Registers {
            datar: 0xff,
            dataw: 0xff,
            status: STS_BUSY | STS_ACK | STS_ONLINE | STS_ERROR | STS_TMOUT,
            control: CTR_SELECT | CTR_INIT | CTR_UNUSED,
            irq_pending: false,
        }
    }
}

/// The port: its registers under one lock, the line and the chardev.
#[derive(Default)]
struct ParallelPort {
    regs: Mutex<Registers>,
    irq: Mutex<IrqLine>,
    backend: Mutex<Option<Arc<dyn CharBackend>>>,
}

impl ParallelPort {
    fn update_irq(&self, regs: &Registers) {
        self.irq.lock().set(regs.irq_pending);
    }

    /// QEMU's `parallel_ioport_write_sw`.
    fn write_reg(&self, offset: u64, value: u8) {
        let mut regs = self.regs.lock();
        match offset {
            REG_DATA => regs.dataw = value,
            REG_CONTROL => {
                let value = value | CTR_UNUSED;
                if value & CTR_INIT == 0 {
                    // The printer is reset: ready, acknowledged, online, no error.
                    regs.status = STS_BUSY | STS_ACK | STS_ONLINE | STS_ERROR;
                } else if value & CTR_SELECT != 0 {
                    if value & CTR_STROBE != 0 {
                        regs.status &= !STS_BUSY;
                        // The strobe's rising edge latches the byte.
                        if regs.control & CTR_STROBE == 0 {
                            if let Some(backend) = self.backend.lock().as_ref() {
                                backend.write(&[regs.dataw]);
                            }
                        }
                    } else if regs.control & CTR_INTEN != 0 {
                        regs.irq_pending = true;
                    }
                }
                regs.control = value;
            }
            // The status register is read-only; the EPP registers belong to a host
            // parport's mode.
            _ => {}
        }
        self.update_irq(&regs);
    }

    /// QEMU's `parallel_ioport_read_sw`.
    fn read_reg(&self, offset: u64) -> u8 {
        let mut regs = self.regs.lock();
        match offset {
            REG_DATA if regs.control & CTR_DIR != 0 => regs.datar,
            REG_DATA => regs.dataw,
            REG_STATUS => {
                let value = regs.status;
                regs.irq_pending = false;
                // After a strobe the printer is busy; the next reads acknowledge the
                // byte and make it ready again.
                if regs.status & STS_BUSY == 0 && regs.control & CTR_STROBE == 0 {
                    if regs.status & STS_ACK != 0 {
                        regs.status &= !STS_ACK;
                    } else {
                        regs.status |= STS_ACK | STS_BUSY;
                    }
                }
                self.update_irq(&regs);
                value
            }
            REG_CONTROL => regs.control,
            _ => 0xff,
        }
    }
}

/// Byte ports: QEMU splits a 16-bit access into two; wider ones are invalid (all ones,
/// writes dropped) and touch no register.
impl MemoryRegionOps for ParallelPort {
    fn read(&self, offset: u64, size: u32) -> u64 {
        if size > 2 {
            return u64::MAX >> (64 - 8 * size.min(8));
        }
        (0..u64::from(size)).fold(0, |value, i| {
            let byte = if offset + i < REGION_SIZE {
                self.read_reg(offset + i)
            } else {
                0xff
            };
            value | u64::from(byte) << (8 * i)
        })
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        if size > 2 {
            return;
        }
        for i in 0..u64::from(size) {
            if offset + i < REGION_SIZE {
                self.write_reg(offset + i, (value >> (8 * i)) as u8);
            }
        }
    }
}

/// Errors of `isa-parallel`.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    /// `index` past LPT3, or a fourth port.
    #[error("Max. supported number of parallel ports is {MAX_PARALLEL_PORTS}.")]
    TooManyPorts,
    /// Neither `chardev` nor a board backend.
    #[error("Can't create parallel device, empty char device")]
    NoChardev,
    /// `iobase` whose eight ports do not fit below 0x10000.
    #[error("isa-parallel: iobase 0x{0:x} is out of the I/O space")]
    BadIobase(u32),
    /// `irq` past the ISA bus's 16 lines.
    #[error("isa-parallel: IRQ {0} is invalid (the ISA bus has {ISA_NUM_IRQS})")]
    BadIrq(u32),
    /// `chardev=` naming no registered backend.
    #[error("Property 'isa-parallel.chardev' can't find value '{0}'")]
    ChardevNotFound(String),
    /// `chardev=` naming a backend another device has.
    #[error("Property 'isa-parallel.chardev' can't take value '{0}': Device '{0}' is in use")]
    ChardevInUse(String),
}

/// QEMU's `ISAParallelState`.
#[derive(qom::Object)]
#[qom(name = TYPE_ISA_PARALLEL)]
pub struct IsaParallel {
    #[parent]
    parent: IsaDevice,
    #[property(default = UNSET, desc = "LPT port number (0-2): picks the default iobase; default: the lowest free")]
    index: Prop<u32>,
    #[property(default = UNSET, desc = "I/O port base (default: 0x378, 0x278, 0x3bc by index)")]
    iobase: Prop<u32>,
    #[property(default = PARALLEL_IRQ, desc = "ISA IRQ")]
    irq: Prop<u32>,
    #[property(desc = "ID of a chardev to use as a backend")]
    chardev: Prop<Option<String>>,
    port: Arc<ParallelPort>,
    /// The chardev `chardev=` claimed, released at unrealize.
    claimed: Mutex<Option<(String, Arc<dyn CharBackend>)>>,
}

type_init!(IsaParallel);

impl IsaParallel {
    /// Connects the port to `backend` (QEMU's `qdev_prop_set_chr` for `-parallel`); a
    /// `chardev` property, if set, replaces it at realize.
    pub fn set_backend(&self, backend: Option<Arc<dyn CharBackend>>) {
        *self.port.backend.lock() = backend;
    }

    /// The LPT index, first port and ISA IRQ the port was realized with (what the
    /// board's ACPI tables describe); `None` before realize.
    pub fn lpt_port(&self) -> Option<(u32, u16, u8)> {
        if !self.is_realized() {
            return None;
        }
        Some((
            self.index.get(),
            u16::try_from(self.iobase.get()).ok()?,
            u8::try_from(self.irq.get()).ok()?,
        ))
    }

    /// The lowest LPT index no other realized `isa-parallel` on the device's bus has.
    fn free_index(&self, ctx: &DeviceContext) -> Result<u32, RealizeError> {
        isa_free_index::<IsaParallel>(ctx, MAX_PARALLEL_PORTS as u32, |p| Some(p.index.get()))?
            .ok_or(RealizeError::device(ParallelError::TooManyPorts))
    }
}

impl DeviceImpl for IsaParallel {
    // QEMU lists parallel ports under "Input devices", as serial ports.
    const CATEGORY: DeviceCategory = DeviceCategory::Input;
    const DESCRIPTION: Option<&'static str> = Some("ISA parallel port");

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let err = |e: ParallelError| RealizeError::device(e);
        let index = match self.index.get() {
            UNSET => self.free_index(ctx)?,
            i => i,
        };
        let Some(&default_io) = ISA_PARALLEL_IO.get(index as usize) else {
            return Err(err(ParallelError::TooManyPorts));
        };
        let iobase = match self.iobase.get() {
            UNSET => u32::from(default_io),
            b => b,
        };
        let base = u16::try_from(iobase)
            .ok()
            .filter(|&b| u64::from(b) + REGION_SIZE <= 0x1_0000)
            .ok_or(err(ParallelError::BadIobase(iobase)))?;
        let irq = self.irq.get();
        if irq as usize >= ISA_NUM_IRQS {
            return Err(err(ParallelError::BadIrq(irq)));
        }
        let claimed = match self.chardev.get() {
            Some(id) => {
                let backend = chardev_claim(&id).map_err(|e| {
                    err(match e {
                        ChardevError::InUse(_) => ParallelError::ChardevInUse(id.clone()),
                        _ => ParallelError::ChardevNotFound(id.clone()),
                    })
                })?;
                self.set_backend(Some(backend.clone()));
                Some((id, backend))
            }
            None if self.port.backend.lock().is_some() => None,
            None => return Err(err(ParallelError::NoChardev)),
        };
        *self.port.irq.lock() = self.parent.irq(ctx, irq as usize);
        let region = MemoryRegion::new_io("parallel", REGION_SIZE, self.port.clone());
        if let Err(e) = self.register_ioport(ctx, region, base) {
            if let Some((id, backend)) = &claimed {
                self.set_backend(None);
                chardev_release(id, backend);
            }
            return Err(e);
        }
        // As QEMU's realize, the properties then say what the port uses.
        self.index.set(index);
        self.iobase.set(iobase);
        *self.claimed.lock() = claimed;
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some((id, backend)) = self.claimed.lock().take() {
            self.set_backend(None);
            chardev_release(&id, &backend);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn reset(&self) {
        let mut regs = self.port.regs.lock();
        *regs = Registers::default();
        self.port.update_irq(&regs);
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        Ok(VmStateSection::new(1).with("registers", *self.port.regs.lock()))
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let mut regs = self.port.regs.lock();
        *regs = state.get("registers")?;
        self.port.update_irq(&regs);
        Ok(())
    }
}

/// QEMU's `isa_parallel_init`: an `isa-parallel` for LPT`index + 1` on `bus`, connected to
/// `backend`, realized (an orphan goes under `/machine/unattached`, as a board's devices
/// do).
pub fn parallel_isa_init(
    bus: &qom::ObjectRef,
    index: u32,
    backend: Arc<dyn CharBackend>,
) -> Result<Typed<IsaParallel>, QdevError> {
    let dev = qdev_new_typed::<IsaParallel>()?;
    dev.index.set(index);
    dev.set_backend(Some(backend));
    qdev_realize(dev.object(), Some(bus))?;
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Sink(Mutex<Vec<u8>>);

    impl CharBackend for Sink {
        fn write(&self, data: &[u8]) {
            self.0.lock().extend_from_slice(data);
        }

        fn driver(&self) -> &'static str {
            "ringbuf"
        }
    }

    #[test]
    fn a_strobed_byte_goes_out_and_the_status_walks_back_to_ready() {
        let port = ParallelPort::default();
        let sink = Arc::new(Sink::default());
        *port.backend.lock() = Some(sink.clone());
        assert_eq!(port.read_reg(REG_STATUS), 0xd9, "reset: ready, acked, online");
        assert_eq!(port.read_reg(REG_CONTROL), 0xcc);
        for &b in b"hi" {
            port.write_reg(REG_DATA, b);
            port.write_reg(REG_CONTROL, CTR_SELECT | CTR_INIT | CTR_STROBE);
            port.write_reg(REG_CONTROL, CTR_SELECT | CTR_INIT);
            // Busy after the strobe; then acknowledged; then ready.
            assert_eq!(port.read_reg(REG_STATUS) & (STS_BUSY | STS_ACK), STS_ACK);
            assert_eq!(port.read_reg(REG_STATUS) & (STS_BUSY | STS_ACK), 0);
            assert_eq!(port.read_reg(REG_STATUS) & (STS_BUSY | STS_ACK), STS_BUSY | STS_ACK);
        }
        // A new strobe sends the byte again; holding it sends nothing more.
        port.write_reg(REG_CONTROL, CTR_SELECT | CTR_INIT | CTR_STROBE);
        port.write_reg(REG_CONTROL, CTR_SELECT | CTR_INIT | CTR_STROBE);
        assert_eq!(&sink.0.lock()[..], b"hii");
        assert_eq!(port.read_reg(REG_DATA), b'i');
        port.write_reg(REG_CONTROL, CTR_DIR | CTR_SELECT | CTR_INIT);
        assert_eq!(port.read_reg(REG_DATA), 0xff, "nothing drives the lines");
    }
}
