//! `isa-serial`, the PC's 16550A UART (QEMU's `hw/char/serial.c` + `serial-isa.c`).
//!
//! The register model is vm-superio's `Serial`; this file puts it on the ISA bus, turns its
//! interrupt conditions into a level on an ISA IRQ line, sends its output to a character
//! backend and feeds it the backend's input.
//!
//! `index` picks the COM port defaults as QEMU's `isa-serial` does: COM1..COM4 at
//! 0x3f8/0x2f8/0x3e8/0x2e8 on IRQ 4/3/4/3, unless `iobase`/`irq` are given. Without
//! `index` a port takes the lowest index no other port on its bus has.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use qom::{
    type_init, ClassInitFor, Error, ObjectClass, ObjectRef, Prop, Property, PropertyKind,
    StateAccessor, Typed, Value,
};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::core::chardev::{chardev_claim, chardev_release, CharBackend, ChardevError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::irq::IrqLine;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{
    device_class_add_property, qdev_new_typed, qdev_realize, DeviceCategory, DeviceContext,
    DeviceImpl, QdevError,
    RealizeError,
};
use crate::isa::isa_bus::{isa_free_index, IsaDevice, ISA_NUM_IRQS};

/// QEMU's `TYPE_ISA_SERIAL`.
pub const TYPE_ISA_SERIAL: &str = "isa-serial";

/// QEMU's `MAX_ISA_SERIAL_PORTS`.
pub const MAX_ISA_SERIAL_PORTS: usize = 4;
/// COM1..COM4 port bases (QEMU's `isa_serial_io`).
pub const ISA_SERIAL_IO: [u16; MAX_ISA_SERIAL_PORTS] = [0x3f8, 0x2f8, 0x3e8, 0x2e8];
/// COM1..COM4 IRQs (QEMU's `isa_serial_irq`).
pub const ISA_SERIAL_IRQ: [u32; MAX_ISA_SERIAL_PORTS] = [4, 3, 4, 3];

/// The UART's eight registers.
const SERIAL_REGION_SIZE: u64 = 8;

// Register offsets and bits the interrupt level depends on (16550A data sheet).
const RBR_THR: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;

/// Input kept beyond the UART's 64-byte FIFO until the guest drains it, so a paste is not
/// cut to 64 bytes; past this, input is dropped.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// vm-superio's interrupt hook. It is told only of new interrupts, never of their
/// acknowledgement, so the line's level is computed from the registers after each access
/// instead ([`SerialInner::update_irq`]); this hook has nothing to do.
struct LevelFromRegisters;

impl Trigger for LevelFromRegisters {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// The UART's output: the backend, or nowhere (an unconnected frontend drops its bytes, as
/// QEMU's `qemu_chr_fe_write` does).
#[derive(Default)]
struct BackendWriter(Option<Arc<dyn CharBackend>>);

impl io::Write for BackendWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(backend) = &self.0 {
            backend.write(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Uart = Serial<LevelFromRegisters, NoEvents, BackendWriter>;

struct SerialInner {
    uart: Uart,
    /// Input the FIFO had no room for.
    pending: VecDeque<u8>,
    irq: IrqLine,
    level: bool,
    dropped_input: bool,
}

impl SerialInner {
    /// Moves pending input into the FIFO as far as it has room.
    fn fill_fifo(&mut self) {
        let n = self.uart.fifo_capacity().min(self.pending.len());
        if n == 0 {
            return;
        }
        let bytes: Vec<u8> = self.pending.drain(..n).collect();
        // In loopback mode the UART takes nothing from the line: keep what it refused.
        let taken = self.uart.enqueue_raw_bytes(&bytes).unwrap_or(0);
        for &b in bytes[taken..].iter().rev() {
            self.pending.push_front(b);
        }
    }

    /// Sets the line to whether an enabled interrupt is pending, as QEMU's
    /// `serial_update_irq` does: the line is a level, high until the guest acknowledges
    /// (reads IIR or drains RBR) or masks the interrupt in IER.
    fn update_irq(&mut self) {
        let state = self.uart.state();
        let iir = state.interrupt_identification;
        let ier = state.interrupt_enable;
        let level = (iir & IIR_THRE != 0 && ier & IER_THRE != 0)
            || (iir & IIR_RDA != 0 && ier & IER_RDA != 0);
        if level != self.level {
            self.level = level;
            self.irq.set(level);
        }
    }
}

/// A 16550A UART's state and port handlers, shared by its port region and its backend's
/// receiver.
pub struct SerialPort {
    inner: Mutex<SerialInner>,
}

impl Default for SerialPort {
    fn default() -> Self {
        SerialPort {
            inner: Mutex::new(SerialInner {
                uart: Serial::new(LevelFromRegisters, BackendWriter::default()),
                pending: VecDeque::new(),
                irq: IrqLine::disconnected(),
                level: false,
                dropped_input: false,
            }),
        }
    }
}

impl SerialPort {
    /// Connects the interrupt output.
    pub fn set_irq(&self, irq: IrqLine) {
        let mut inner = self.inner.lock();
        inner.irq = irq;
        let level = inner.level;
        inner.irq.set(level);
    }

    /// Input from the backend: into the FIFO, the rest kept until the guest reads.
    pub fn receive(&self, data: &[u8]) {
        let mut inner = self.inner.lock();
        let room = MAX_PENDING_INPUT.saturating_sub(inner.pending.len());
        if data.len() > room && !inner.dropped_input {
            inner.dropped_input = true;
            log::warn!("serial: the guest does not read its input; dropping input");
        }
        inner.pending.extend(&data[..data.len().min(room)]);
        inner.fill_fifo();
        inner.update_irq();
    }

    /// The backend output goes to.
    pub fn backend(&self) -> Option<Arc<dyn CharBackend>> {
        self.inner.lock().uart.writer().0.clone()
    }

    /// Back to the power-on state (QEMU's `serial_reset`): registers, FIFO and pending
    /// input cleared, the interrupt lowered; the backend stays.
    pub fn reset(&self) {
        let mut inner = self.inner.lock();
        let writer = BackendWriter(inner.uart.writer().0.clone());
        inner.uart = Serial::new(LevelFromRegisters, writer);
        inner.pending.clear();
        inner.dropped_input = false;
        inner.update_irq();
    }

    /// QEMU's `vmstate_serial`: the registers, the FIFO, the input not yet in it.
    fn save_state(&self) -> VmStateSection {
        let inner = self.inner.lock();
        let st = inner.uart.state();
        VmStateSection::new(1)
            .with("dll", st.baud_divisor_low)
            .with("dlm", st.baud_divisor_high)
            .with("ier", st.interrupt_enable)
            .with("iir", st.interrupt_identification)
            .with("lcr", st.line_control)
            .with("lsr", st.line_status)
            .with("mcr", st.modem_control)
            .with("msr", st.modem_status)
            .with("scr", st.scratch)
            .with_bytes("fifo", &st.in_buffer)
            .with_bytes("pending", &inner.pending.iter().copied().collect::<Vec<u8>>())
    }

    fn load_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        s.check_version(1, 1)?;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.get("dll")?,
            baud_divisor_high: s.get("dlm")?,
            interrupt_enable: s.get("ier")?,
            interrupt_identification: s.get("iir")?,
            line_control: s.get("lcr")?,
            line_status: s.get("lsr")?,
            modem_control: s.get("mcr")?,
            modem_status: s.get("msr")?,
            scratch: s.get("scr")?,
            in_buffer: s.get_bytes("fifo")?,
        };
        let pending = s.get_bytes("pending")?;
        let mut inner = self.inner.lock();
        let writer = BackendWriter(inner.uart.writer().0.clone());
        inner.uart = Serial::from_state(&state, LevelFromRegisters, NoEvents, writer)
            .map_err(|e| VmStateError::BadField {
                field: "fifo".into(),
                reason: format!("{e:?}"),
            })?;
        inner.pending = pending.into();
        inner.update_irq();
        Ok(())
    }

    fn read_byte(inner: &mut SerialInner, offset: u64) -> u8 {
        let value = inner.uart.read(offset as u8);
        // Reading RBR makes room in the FIFO and may acknowledge RDA; reading IIR
        // acknowledges what it reports.
        if offset == RBR_THR || offset == IIR {
            if offset == RBR_THR {
                inner.fill_fifo();
            }
            inner.update_irq();
        }
        value
    }

    fn write_byte(inner: &mut SerialInner, offset: u64, value: u8) {
        // The backend does not fail towards the guest (BackendWriter never errors), and the
        // trigger is infallible, so there is no error to handle.
        let _ = inner.uart.write(offset as u8, value);
        if offset == RBR_THR || offset == IER || offset == 4 {
            // THR writes and IER changes raise or mask interrupts; MCR may leave loopback,
            // letting pending input into the FIFO.
            inner.fill_fifo();
            inner.update_irq();
        }
    }
}

impl MemoryRegionOps for SerialPort {
    fn read(&self, offset: u64, size: u32) -> u64 {
        // The UART's registers are bytes: a wider access is split into byte accesses, as
        // QEMU does for `serial_io_ops` (max_access_size 1).
        let mut inner = self.inner.lock();
        let mut value = 0u64;
        for i in 0..u64::from(size.min(8)) {
            let byte = if offset + i < SERIAL_REGION_SIZE {
                Self::read_byte(&mut inner, offset + i)
            } else {
                0xff
            };
            value |= u64::from(byte) << (8 * i);
        }
        value
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let mut inner = self.inner.lock();
        for i in 0..u64::from(size.min(8)) {
            if offset + i < SERIAL_REGION_SIZE {
                Self::write_byte(&mut inner, offset + i, (value >> (8 * i)) as u8);
            }
        }
    }
}

/// The COM port settings the `index`, `iobase` and `irq` properties write: `None` until
/// set, so that `iobase` and `irq` follow `index` and `index` can default to the lowest
/// free one at realize.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SerialConfig {
    index: Option<u32>,
    iobase: Option<u32>,
    irq: Option<u32>,
}

impl SerialConfig {
    fn index_or_default(&self) -> usize {
        self.index.unwrap_or(0) as usize
    }

    fn iobase(&self) -> u32 {
        self.iobase.unwrap_or_else(|| {
            ISA_SERIAL_IO
                .get(self.index_or_default())
                .map_or(0, |&io| io.into())
        })
    }

    fn irq(&self) -> u32 {
        self.irq.unwrap_or_else(|| {
            ISA_SERIAL_IRQ
                .get(self.index_or_default())
                .copied()
                .unwrap_or(0)
        })
    }
}

/// QEMU's `ISASerialState`: the COM port settings, the backend's id and the UART.
#[derive(qom::Object)]
#[qom(name = TYPE_ISA_SERIAL, class_level)]
pub struct IsaSerial {
    #[parent]
    parent: IsaDevice,
    #[property(desc = "ID of a chardev to use as a backend")]
    chardev: Prop<Option<String>>,
    config: Mutex<SerialConfig>,
    port: Arc<SerialPort>,
}

type_init!(IsaSerial {
    class_init: Some(<IsaSerial as ClassInitFor<IsaSerial>>::class_init),
});

impl IsaSerial {
    /// The UART.
    pub fn port(&self) -> &Arc<SerialPort> {
        &self.port
    }

    /// Connects the UART to `backend` (QEMU's `qdev_prop_set_chr` for `-serial`): its
    /// output goes there and its input comes from there. `None` disconnects. Works before
    /// or after realize; a `chardev` property, if set, replaces it at realize.
    pub fn set_backend(&self, backend: Option<Arc<dyn CharBackend>>) {
        attach_backend(&self.port, backend);
    }

    /// The COM index, first port and ISA IRQ the port was realized with (what the
    /// board's ACPI tables describe); `None` before realize.
    pub fn com_port(&self) -> Option<(u32, u16, u8)> {
        if !self.is_realized() {
            return None;
        }
        let config = self.config.lock();
        Some((
            config.index?,
            u16::try_from(config.iobase()).ok()?,
            u8::try_from(config.irq()).ok()?,
        ))
    }

    /// The lowest COM index no other realized `isa-serial` on the device's bus has (QEMU
    /// counts ports process-wide; per bus keeps machines independent).
    fn free_index(&self, ctx: &DeviceContext) -> Result<u32, RealizeError> {
        isa_free_index::<IsaSerial>(ctx, MAX_ISA_SERIAL_PORTS as u32, |s| s.config.lock().index)?
            .ok_or(RealizeError::device(SerialError::TooManyPorts))
    }
}

/// `index`, `iobase` and `irq` read as what realize will use until set (qdev refuses
/// writes once the device is realized).
fn set_config(
    serial: &IsaSerial,
    _prop: &Property,
    value: Value,
    field: fn(&mut SerialConfig) -> &mut Option<u32>,
) -> Result<(), Error> {
    // The property kind (uint32) was validated before the setter runs.
    if let Value::Uint(v) = value {
        *field(&mut serial.config.lock()) = Some(v as u32);
    }
    Ok(())
}

static INDEX: StateAccessor<IsaSerial> = StateAccessor {
    get: |s, _| Value::Uint(s.config.lock().index_or_default() as u64),
    set: Some(|s, prop, value| set_config(s, prop, value, |c| &mut c.index)),
};

static IOBASE: StateAccessor<IsaSerial> = StateAccessor {
    get: |s, _| Value::Uint(s.config.lock().iobase().into()),
    set: Some(|s, prop, value| set_config(s, prop, value, |c| &mut c.iobase)),
};

static IRQ: StateAccessor<IsaSerial> = StateAccessor {
    get: |s, _| Value::Uint(s.config.lock().irq().into()),
    set: Some(|s, prop, value| set_config(s, prop, value, |c| &mut c.irq)),
};

/// `isa-serial`'s class: the ISA device class, with `index`, `iobase` and `irq`, which read
/// as the COM port default of `index` until set, so they are computed from the state
/// rather than bound to a field (a field cannot tell "unset" from a value).
impl<T: DeviceImpl> ClassInitFor<T> for IsaSerial {
    fn class_init(class: &mut ObjectClass) {
        <IsaDevice as ClassInitFor<T>>::class_init(class);
        device_class_add_property(class, Property::state(
            "index",
            PropertyKind::Uint(32),
            "COM port number (0-3): picks the default iobase and irq; default: the lowest free",
            &INDEX,
        ));
        device_class_add_property(class, Property::state(
            "iobase",
            PropertyKind::Uint(32),
            "I/O port base (default: 0x3f8, 0x2f8, 0x3e8, 0x2e8 by index)",
            &IOBASE,
        ));
        device_class_add_property(class, Property::state(
            "irq",
            PropertyKind::Uint(32),
            "ISA IRQ (default: 4, 3, 4, 3 by index)",
            &IRQ,
        ));
    }
}

/// Errors of `isa-serial`.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// `index` past COM4, or a fifth port.
    #[error("Max. supported number of ISA serial ports is {MAX_ISA_SERIAL_PORTS}.")]
    TooManyPorts,
    /// `iobase` whose eight ports do not fit below 0x10000.
    #[error("isa-serial: iobase 0x{0:x} is out of the I/O space")]
    BadIobase(u32),
    /// `irq` past the ISA bus's 16 lines.
    #[error("isa-serial: IRQ {0} is invalid (the ISA bus has {ISA_NUM_IRQS})")]
    BadIrq(u32),
    /// `chardev=` naming no registered backend.
    // QEMU's isa-serial forwards `chardev` to its inner `serial`, which names itself.
    #[error("Property 'serial.chardev' can't find value '{0}'")]
    ChardevNotFound(String),
    /// `chardev=` naming a backend another device has.
    #[error("Property 'serial.chardev' can't take value '{0}': Device '{0}' is in use")]
    ChardevInUse(String),
}

impl DeviceImpl for IsaSerial {
    // QEMU lists serial ports under "Input devices".
    const CATEGORY: DeviceCategory = DeviceCategory::Input;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let index = match self.config.lock().index {
            Some(i) => i,
            None => self.free_index(ctx)?,
        };
        if index as usize >= MAX_ISA_SERIAL_PORTS {
            return Err(RealizeError::device(SerialError::TooManyPorts));
        }
        let config = {
            let mut config = self.config.lock();
            config.index = Some(index);
            *config
        };
        let iobase = config.iobase();
        let iobase = u16::try_from(iobase)
            .ok()
            .filter(|&b| u64::from(b) + SERIAL_REGION_SIZE <= 0x1_0000)
            .ok_or(RealizeError::device(SerialError::BadIobase(iobase)))?;
        let irq = config.irq();
        if irq as usize >= ISA_NUM_IRQS {
            return Err(RealizeError::device(SerialError::BadIrq(irq)));
        }
        let claimed = match self.chardev.get() {
            Some(chardev) => {
                let backend = chardev_claim(&chardev).map_err(|e| {
                    RealizeError::device(match e {
                        ChardevError::InUse(_) => SerialError::ChardevInUse(chardev.clone()),
                        _ => SerialError::ChardevNotFound(chardev.clone()),
                    })
                })?;
                attach_backend(&self.port, Some(backend.clone()));
                Some((chardev, backend))
            }
            None => None,
        };
        self.port.set_irq(self.irq(ctx, irq as usize));
        let region = MemoryRegion::new_io("serial", SERIAL_REGION_SIZE, self.port.clone());
        self.register_ioport(ctx, region, iobase).inspect_err(|_| {
            if let Some((id, backend)) = &claimed {
                attach_backend(&self.port, None);
                chardev_release(id, backend);
            }
        })
    }

    fn reset(&self) {
        self.port.reset();
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        Ok(self.port.save_state())
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.port.load_state(state)
    }
}

fn attach_backend(port: &Arc<SerialPort>, backend: Option<Arc<dyn CharBackend>>) {
    let old = std::mem::replace(&mut port.inner.lock().uart.writer_mut().0, backend.clone());
    if let Some(old) = old {
        if !backend.as_ref().is_some_and(|b| Arc::ptr_eq(b, &old)) {
            old.set_receiver(None);
        }
    }
    if let Some(backend) = backend {
        // Weak: the backend holds the receiver and the UART holds the backend.
        let weak: Weak<SerialPort> = Arc::downgrade(port);
        backend.set_receiver(Some(Arc::new(move |data: &[u8]| {
            if let Some(port) = weak.upgrade() {
                port.receive(data);
            }
        })));
    }
}

/// QEMU's `serial_isa_init`: an `isa-serial` for COM`index + 1` on `bus`, connected to
/// `backend`, realized (an orphan goes under `/machine/unattached`, as a board's devices
/// do).
pub fn serial_isa_init(
    bus: &ObjectRef,
    index: u32,
    backend: Option<Arc<dyn CharBackend>>,
) -> Result<Typed<IsaSerial>, QdevError> {
    let dev = qdev_new_typed::<IsaSerial>()?;
    dev.config.lock().index = Some(index);
    dev.set_backend(backend);
    qdev_realize(dev.object(), Some(bus))?;
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::chardev::Ringbuf;
    use crate::core::irq::IrqHandler;

    const LSR: u64 = 5;
    const LCR: u64 = 3;
    const LSR_DR: u64 = 0x01;
    const LSR_THRE: u64 = 0x20;
    const LSR_TEMT: u64 = 0x40;

    #[derive(Default)]
    struct Pin(Mutex<Vec<bool>>);

    impl IrqHandler for Pin {
        fn set_irq(&self, _n: u32, level: bool) {
            self.0.lock().push(level);
        }
    }

    impl Pin {
        fn level(&self) -> bool {
            self.0.lock().last().copied().unwrap_or(false)
        }
    }

    fn uart() -> (Arc<SerialPort>, Arc<Ringbuf>, Arc<Pin>) {
        let port = Arc::new(SerialPort::default());
        let ring = Arc::new(Ringbuf::default());
        attach_backend(&port, Some(ring.clone()));
        let pin = Arc::new(Pin::default());
        port.set_irq(IrqLine::new(pin.clone(), 4));
        (port, ring, pin)
    }

    #[test]
    fn thr_writes_reach_the_backend_and_the_transmitter_is_always_empty() {
        let (port, ring, _) = uart();
        assert_eq!(
            port.read(LSR, 1) & (LSR_THRE | LSR_TEMT),
            LSR_THRE | LSR_TEMT
        );
        for b in b"hi\n" {
            port.write(RBR_THR, u64::from(*b), 1);
        }
        assert_eq!(ring.contents(), b"hi\n");
        assert_eq!(
            port.read(LSR, 1) & (LSR_THRE | LSR_TEMT),
            LSR_THRE | LSR_TEMT
        );
        // A 2-byte write is two byte writes: THR then IER.
        port.write(RBR_THR, u64::from(b'!'), 2);
        assert_eq!(ring.contents(), b"hi\n!");
    }

    #[test]
    fn dlab_switches_offsets_0_and_1_to_the_divisor_latch() {
        let (port, ring, _) = uart();
        port.write(LCR, 0x83, 1);
        port.write(RBR_THR, 0x01, 1);
        port.write(IER, 0x00, 1);
        assert_eq!(port.read(RBR_THR, 1), 0x01);
        assert_eq!(port.read(IER, 1), 0x00);
        assert!(ring.contents().is_empty(), "divisor writes are not output");
        port.write(LCR, 0x03, 1);
        assert_eq!(port.read(LCR, 1), 0x03);
        port.write(RBR_THR, u64::from(b'x'), 1);
        assert_eq!(ring.contents(), b"x");
    }

    #[test]
    fn thr_empty_interrupt_is_a_level_until_iir_is_read_or_masked() {
        let (port, _, pin) = uart();
        port.write(RBR_THR, u64::from(b'a'), 1);
        assert!(!pin.level(), "no interrupt while IER is clear");
        port.write(IER, u64::from(IER_THRE), 1);
        assert!(pin.level(), "enabling THRE with THR empty raises the line");
        assert_eq!(port.read(IIR, 1) & 0x0f, u64::from(IIR_THRE));
        assert!(!pin.level(), "reading IIR acknowledges THRE");
        assert_eq!(port.read(IIR, 1) & 0x0f, 0x01, "nothing pending");
        port.write(RBR_THR, u64::from(b'b'), 1);
        assert!(pin.level(), "the next byte written empties THR again");
        port.write(IER, 0, 1);
        assert!(!pin.level(), "masking the interrupt lowers the line");
    }

    #[test]
    fn input_fills_rbr_sets_dr_and_interrupts_when_enabled() {
        let (port, ring, pin) = uart();
        port.write(IER, u64::from(IER_RDA), 1);
        assert!(!pin.level());
        ring.inject(b"ok");
        assert!(pin.level());
        assert_eq!(port.read(LSR, 1) & LSR_DR, LSR_DR);
        assert_eq!(port.read(RBR_THR, 1), u64::from(b'o'));
        assert_eq!(port.read(LSR, 1) & LSR_DR, LSR_DR);
        assert_eq!(port.read(RBR_THR, 1), u64::from(b'k'));
        assert_eq!(port.read(LSR, 1) & LSR_DR, 0);
        assert!(!pin.level(), "drained");
    }

    #[test]
    fn input_beyond_the_fifo_waits_for_the_guest() {
        let (port, ring, _) = uart();
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        ring.inject(&input);
        let mut got = Vec::new();
        while port.read(LSR, 1) & LSR_DR != 0 {
            got.push(port.read(RBR_THR, 1) as u8);
        }
        assert_eq!(got, input);
    }

    #[test]
    fn reset_clears_registers_but_keeps_the_backend() {
        let (port, ring, pin) = uart();
        port.write(IER, u64::from(IER_THRE), 1);
        ring.inject(b"zz");
        assert!(pin.level());
        port.reset();
        assert!(!pin.level());
        assert_eq!(port.read(IER, 1), 0);
        assert_eq!(port.read(LSR, 1) & LSR_DR, 0);
        port.write(RBR_THR, u64::from(b'k'), 1);
        assert_eq!(ring.contents(), b"k");
        assert!(ring.has_receiver());
    }
}
