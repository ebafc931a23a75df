//! PCI (QEMU's `hw/pci/pci.c`): the `PCI` bus, the abstract `pci-device` with its 256-byte
//! configuration space, BARs that the guest (or the board, standing in for firmware)
//! programs, and INTx lines routed to ISA IRQs.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use qom::{type_init, Error, Object, ObjectClass, ObjectRef, Property, PropertyKind, Value, WeakObjectRef};

use crate::core::bus::TYPE_BUS;
use crate::core::irq::IrqLine;
use crate::core::memory::{AddressSpace, MemoryRegion};
use crate::core::qdev::{device_class_mut, DeviceCategory, DeviceMethods, RealizeFn, TYPE_DEVICE};

/// QEMU's `TYPE_PCI_BUS`.
pub const TYPE_PCI_BUS: &str = "PCI";
/// QEMU's `TYPE_PCI_DEVICE`.
pub const TYPE_PCI_DEVICE: &str = "pci-device";

/// Offsets in the configuration space header.
pub mod config {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: usize = 0x02;
    /// Command register.
    pub const COMMAND: usize = 0x04;
    /// Status register.
    pub const STATUS: usize = 0x06;
    /// Revision ID.
    pub const REVISION: usize = 0x08;
    /// Programming interface.
    pub const PROG_IF: usize = 0x09;
    /// Sub-class and class (16 bits).
    pub const CLASS: usize = 0x0a;
    /// Header type.
    pub const HEADER_TYPE: usize = 0x0e;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Interrupt line (the IRQ firmware routed INTx to).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (1 = INTA).
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// Command: I/O space enable.
    pub const COMMAND_IO: u16 = 0x1;
    /// Command: memory space enable.
    pub const COMMAND_MEMORY: u16 = 0x2;
    /// Command: bus master enable.
    pub const COMMAND_MASTER: u16 = 0x4;
    /// Header type bit: multi-function device.
    pub const HEADER_MULTI_FUNCTION: u8 = 0x80;
}

/// Number of BARs of a type 0 header.
pub const PCI_NUM_BARS: usize = 6;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mem32,
}

/// The class data of PCI devices (QEMU's `PCIDeviceClass`).
#[derive(Clone, Debug, Default)]
pub struct PciDeviceClass {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision.
    pub revision: u8,
    /// Class and sub-class (`0x0600` host bridge, `0x0601` ISA bridge, `0x00ff` other).
    pub class_id: u16,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Whether the device is a function of a multi-function device's function 0.
    pub multifunction: bool,
    /// INTx pin used (0 none, 1 INTA .. 4 INTD).
    pub interrupt_pin: u8,
    /// The device's own realize, run after the configuration header is set up.
    pub realize: Option<RealizeFn>,
    /// Called after a configuration write the generic code has applied.
    pub config_write: Option<fn(&Object, usize, u32, usize)>,
}

struct Bar {
    kind: BarKind,
    region: Arc<MemoryRegion>,
    /// Where it is mapped now, if it is.
    mapped_at: Option<u64>,
}

/// QEMU's `PCIDevice`: configuration space, write mask and BARs.
pub struct PciDevice {
    config: Mutex<[u8; 256]>,
    /// Bits the guest may change.
    wmask: Mutex<[u8; 256]>,
    devfn: AtomicI32,
    bars: Mutex<[Option<Bar>; PCI_NUM_BARS]>,
    irq: Mutex<IrqLine>,
}

impl Default for PciDevice {
    fn default() -> Self {
        PciDevice {
            config: Mutex::new([0; 256]),
            wmask: Mutex::new([0; 256]),
            devfn: AtomicI32::new(-1),
            bars: Mutex::new(Default::default()),
            irq: Mutex::new(IrqLine::disconnected()),
        }
    }
}

/// Computes the INTx line of a device: QEMU's `pci_set_irq` through the bus's routing.
pub type PciIrqRoute = fn(bus: &Object, devfn: u8, pin: u8) -> IrqLine;

/// QEMU's `PCIBus`: where BARs are mapped, which device sits at each devfn, and how INTx
/// pins reach the interrupt controller.
#[derive(Default)]
pub struct PciBus {
    io: Mutex<Option<Arc<AddressSpace>>>,
    memory: Mutex<Option<Arc<AddressSpace>>>,
    devices: Mutex<Vec<(u8, WeakObjectRef)>>,
    route: Mutex<Option<PciIrqRoute>>,
}

type_init! {
    name: TYPE_PCI_BUS,
    parent: Some(TYPE_BUS),
    instance: Some(qom::InstanceSpec::of::<PciBus>()),
}

/// Errors of PCI devices.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// `addr=` already taken.
    #[error("PCI: slot {slot} function {function} not available for {driver}, in use by {other}")]
    SlotInUse {
        /// Slot.
        slot: u8,
        /// Function.
        function: u8,
        /// The new device.
        driver: String,
        /// The device already there.
        other: String,
    },
    /// No free slot.
    #[error("PCI: no slot/function available for {0}, all in use")]
    BusFull(String),
    /// The device is on no PCI bus.
    #[error("device '{0}' is not on a PCI bus")]
    NoBus(String),
    /// A malformed `addr=`.
    #[error("Parameter 'addr' expects a PCI address 'slot[.function]', got '{0}'")]
    BadAddr(String),
    /// A BAR whose size is not a power of two.
    #[error("PCI BAR {bar} of '{driver}': size 0x{size:x} is not a power of two")]
    BarSize {
        /// The BAR.
        bar: usize,
        /// The device.
        driver: String,
        /// The size.
        size: u64,
    },
}

/// QEMU's `pci_bus_new`-equivalent set-up: where the bus's BARs go and how INTx is routed.
pub fn pci_bus_init(bus: &Object, io: Arc<AddressSpace>, memory: Arc<AddressSpace>, route: PciIrqRoute) {
    let st = bus.downcast::<PciBus>().expect("PCI buses have a PciBus part");
    *st.io.lock() = Some(io);
    *st.memory.lock() = Some(memory);
    *st.route.lock() = Some(route);
}

/// The device at `devfn` of `bus`.
pub fn pci_find_device(bus: &Object, devfn: u8) -> Option<ObjectRef> {
    let st = bus.downcast::<PciBus>()?;
    let devices = st.devices.lock();
    devices
        .iter()
        .find(|(d, _)| *d == devfn)
        .and_then(|(_, w)| w.upgrade())
}

/// Every device on `bus`, by devfn.
pub fn pci_bus_devices(bus: &Object) -> Vec<(u8, ObjectRef)> {
    let Some(st) = bus.downcast::<PciBus>() else {
        return Vec::new();
    };
    let mut list: Vec<_> = st
        .devices
        .lock()
        .iter()
        .filter_map(|(d, w)| w.upgrade().map(|o| (*d, o)))
        .collect();
    list.sort_by_key(|(d, _)| *d);
    list
}

fn part(dev: &Object) -> &PciDevice {
    dev.downcast::<PciDevice>()
        .expect("PCI devices have a PciDevice part")
}

/// The device's devfn (slot << 3 | function), once realized.
pub fn pci_devfn(dev: &Object) -> Option<u8> {
    u8::try_from(part(dev).devfn.load(Ordering::Relaxed)).ok()
}

fn parse_addr(text: &str) -> Option<i32> {
    let (slot, function) = text.split_once('.').unwrap_or((text, "0"));
    let slot = slot.trim_start_matches("0x");
    let slot = u8::from_str_radix(slot, 16).ok().filter(|s| *s < 32)?;
    let function = function.parse::<u8>().ok().filter(|f| *f < 8)?;
    Some(i32::from((slot << 3) | function))
}

fn get_addr(obj: &Object, _: &Property) -> Result<Value, Error> {
    let devfn = part(obj).devfn.load(Ordering::Relaxed);
    Ok(Value::Str(if devfn < 0 {
        String::new()
    } else {
        format!("{:02x}.{}", devfn >> 3, devfn & 7)
    }))
}

fn set_addr(obj: &Object, _: &Property, value: Value) -> Result<(), Error> {
    let Value::Str(text) = value else {
        return Ok(());
    };
    let devfn = parse_addr(&text).ok_or_else(|| Error::other(PciError::BadAddr(text.clone())))?;
    part(obj).devfn.store(devfn, Ordering::Relaxed);
    Ok(())
}

fn check_not_realized(obj: &Object, prop: &Property) -> Result<(), Error> {
    if obj.is_realized() {
        return Err(Error::PropertyAfterRealize {
            name: prop.name.to_string(),
            device: obj
                .device_id()
                .map_or("anonymous device".into(), |id| format!("device '{id}'")),
            type_name: obj.type_name().to_string(),
        });
    }
    Ok(())
}

fn pci_device_class_init(class: &mut ObjectClass) {
    class.insert(PciDeviceClass::default());
    class.add_property(
        Property::custom(
            "addr",
            PropertyKind::Str,
            Some(get_addr),
            Some(set_addr),
            "Slot and optional function number, example: 06.0 or 06",
        )
        .with_check(check_not_realized),
    );
    let dc = device_class_mut(class);
    dc.bus_type = Some(TYPE_PCI_BUS);
    dc.realize = Some(pci_qdev_realize);
    dc.unrealize = Some(pci_qdev_unrealize);
    dc.category = DeviceCategory::Misc;
}

type_init! {
    name: TYPE_PCI_DEVICE,
    parent: Some(TYPE_DEVICE),
    abstract_: true,
    class_init: Some(pci_device_class_init),
    instance: Some(qom::InstanceSpec::of::<PciDevice>()),
}

/// QEMU's `pci_qdev_realize`: takes a devfn on the bus, fills the configuration header from
/// the class, connects INTx, then runs the device's own realize.
fn pci_qdev_realize(dev: &Object) -> Result<(), Error> {
    let bus = dev
        .parent_bus()
        .ok_or_else(|| Error::other(PciError::NoBus(dev.type_name().into())))?;
    let bus_state = bus
        .downcast::<PciBus>()
        .ok_or_else(|| Error::other(PciError::NoBus(dev.type_name().into())))?;
    let pc = dev
        .class()
        .get::<PciDeviceClass>()
        .cloned()
        .unwrap_or_default();
    let st = part(dev);
    let devfn = {
        let mut devices = bus_state.devices.lock();
        devices.retain(|(_, w)| w.strong_count() > 0);
        let requested = st.devfn.load(Ordering::Relaxed);
        let devfn = if requested >= 0 {
            let devfn = requested as u8;
            if let Some((_, other)) = devices.iter().find(|(d, _)| *d == devfn) {
                let other = other.upgrade().map_or("?".into(), |o| o.type_name().to_string());
                return Err(Error::other(PciError::SlotInUse {
                    slot: devfn >> 3,
                    function: devfn & 7,
                    driver: dev.type_name().into(),
                    other,
                }));
            }
            devfn
        } else {
            (0u8..32)
                .map(|slot| slot << 3)
                .find(|d| !devices.iter().any(|(x, _)| *x == *d))
                .ok_or_else(|| Error::other(PciError::BusFull(dev.type_name().into())))?
        };
        devices.push((devfn, dev.downgrade()));
        devfn
    };
    st.devfn.store(i32::from(devfn), Ordering::Relaxed);
    {
        let mut c = st.config.lock();
        let mut w = st.wmask.lock();
        c[config::VENDOR_ID..config::VENDOR_ID + 2].copy_from_slice(&pc.vendor_id.to_le_bytes());
        c[config::DEVICE_ID..config::DEVICE_ID + 2].copy_from_slice(&pc.device_id.to_le_bytes());
        c[config::REVISION] = pc.revision;
        c[config::PROG_IF] = pc.prog_if;
        c[config::CLASS..config::CLASS + 2].copy_from_slice(&pc.class_id.to_le_bytes());
        c[config::HEADER_TYPE] = if pc.multifunction {
            config::HEADER_MULTI_FUNCTION
        } else {
            0
        };
        c[config::SUBSYSTEM_VENDOR_ID..config::SUBSYSTEM_VENDOR_ID + 2]
            .copy_from_slice(&pc.subsystem_vendor_id.to_le_bytes());
        c[config::SUBSYSTEM_ID..config::SUBSYSTEM_ID + 2].copy_from_slice(&pc.subsystem_id.to_le_bytes());
        c[config::INTERRUPT_PIN] = pc.interrupt_pin;
        // The guest may change the command register's I/O, memory, bus-master and
        // interrupt-disable bits, and the interrupt line.
        w[config::COMMAND] = 0x07;
        w[config::COMMAND + 1] = 0x04;
        w[config::INTERRUPT_LINE] = 0xff;
    }
    if pc.interrupt_pin > 0 {
        if let Some(route) = *bus_state.route.lock() {
            let line = route(&bus, devfn, pc.interrupt_pin);
            *st.irq.lock() = line;
        }
    }
    if let Some(realize) = pc.realize {
        realize(dev)?;
    }
    Ok(())
}

fn pci_qdev_unrealize(dev: &Object) {
    let st = part(dev);
    let bus = dev.parent_bus();
    let spaces = bus.as_ref().and_then(|b| b.downcast::<PciBus>()).map(|b| {
        (b.io.lock().clone(), b.memory.lock().clone())
    });
    for bar in st.bars.lock().iter_mut().flatten() {
        if bar.mapped_at.take().is_some() {
            if let Some((io, memory)) = &spaces {
                let space = if bar.kind == BarKind::Io { io } else { memory };
                if let Some(space) = space {
                    space.unmap(&bar.region);
                }
            }
        }
    }
    if let (Some(bus), Some(devfn)) = (bus, pci_devfn(dev)) {
        if let Some(b) = bus.downcast::<PciBus>() {
            b.devices.lock().retain(|(d, _)| *d != devfn);
        }
    }
}

/// QEMU's `pci_register_bar`: `region` becomes BAR `index`; the guest sizes and places it
/// through the configuration space.
pub fn pci_register_bar(dev: &Object, index: usize, kind: BarKind, region: Arc<MemoryRegion>) -> Result<(), Error> {
    let size = region.size().max(if kind == BarKind::Io { 4 } else { 16 });
    if !size.is_power_of_two() {
        return Err(Error::other(PciError::BarSize {
            bar: index,
            driver: dev.type_name().into(),
            size,
        }));
    }
    let st = part(dev);
    let offset = config::BAR0 + 4 * index;
    let (flags, mask) = match kind {
        BarKind::Io => (0x1u32, !(size as u32 - 1) & !0x3),
        BarKind::Mem32 => (0x0u32, !(size as u32 - 1) & !0xf),
    };
    st.config.lock()[offset..offset + 4].copy_from_slice(&flags.to_le_bytes());
    st.wmask.lock()[offset..offset + 4].copy_from_slice(&mask.to_le_bytes());
    st.bars.lock()[index] = Some(Bar {
        kind,
        region,
        mapped_at: None,
    });
    Ok(())
}

/// The address BAR `index` decodes now (from the configuration space).
pub fn pci_bar_address(dev: &Object, index: usize) -> Option<u64> {
    let st = part(dev);
    let bars = st.bars.lock();
    let bar = bars.get(index)?.as_ref()?;
    let offset = config::BAR0 + 4 * index;
    let c = st.config.lock();
    let raw = u32::from_le_bytes([c[offset], c[offset + 1], c[offset + 2], c[offset + 3]]);
    Some(u64::from(match bar.kind {
        BarKind::Io => raw & !0x3,
        BarKind::Mem32 => raw & !0xf,
    }))
}

/// Re-maps the BARs after a configuration change (QEMU's `pci_update_mappings`).
fn update_mappings(dev: &Object) {
    let st = part(dev);
    let Some(bus) = dev.parent_bus() else { return };
    let Some(bus_state) = bus.downcast::<PciBus>() else {
        return;
    };
    let io = bus_state.io.lock().clone();
    let memory = bus_state.memory.lock().clone();
    let command = {
        let c = st.config.lock();
        u16::from_le_bytes([c[config::COMMAND], c[config::COMMAND + 1]])
    };
    for index in 0..PCI_NUM_BARS {
        let Some(addr) = pci_bar_address(dev, index) else { continue };
        let mut bars = st.bars.lock();
        let Some(bar) = bars[index].as_mut() else { continue };
        let (enabled, space) = match bar.kind {
            BarKind::Io => (command & config::COMMAND_IO != 0, &io),
            BarKind::Mem32 => (command & config::COMMAND_MEMORY != 0, &memory),
        };
        let size = bar.region.size();
        // An address of 0, or one whose range wraps or is the sizing pattern, is unmapped.
        let limit = if bar.kind == BarKind::Io { 0x1_0000 } else { 1u64 << 32 };
        let wanted = (enabled && addr != 0 && addr + size <= limit).then_some(addr);
        if wanted == bar.mapped_at {
            continue;
        }
        let Some(space) = space else { continue };
        if bar.mapped_at.take().is_some() {
            space.unmap(&bar.region);
        }
        if let Some(addr) = wanted {
            match space.map(addr, bar.region.clone()) {
                Ok(()) => bar.mapped_at = Some(addr),
                Err(e) => log::warn!("{}: BAR {index}: {e}", dev.type_name()),
            }
        }
    }
}

/// QEMU's `pci_default_read_config`: `len` (1, 2 or 4) bytes at `addr`, little-endian.
pub fn pci_config_read(dev: &Object, addr: usize, len: usize) -> u32 {
    if addr + len > 256 {
        return u32::MAX;
    }
    let c = part(dev).config.lock();
    let mut bytes = [0u8; 4];
    bytes[..len].copy_from_slice(&c[addr..addr + len]);
    u32::from_le_bytes(bytes)
}

/// QEMU's `pci_default_write_config`: writes the bits the write mask allows, then updates
/// BAR mappings and calls the class's hook.
pub fn pci_config_write(dev: &Object, addr: usize, value: u32, len: usize) {
    if addr + len > 256 {
        return;
    }
    let st = part(dev);
    {
        let mut c = st.config.lock();
        let w = st.wmask.lock();
        for (i, byte) in value.to_le_bytes()[..len].iter().enumerate() {
            let a = addr + i;
            c[a] = (c[a] & !w[a]) | (byte & w[a]);
        }
    }
    let touches_bars = addr < config::BAR0 + 4 * PCI_NUM_BARS && addr + len > config::COMMAND;
    if touches_bars {
        update_mappings(dev);
    }
    if let Some(hook) = dev.class().get::<PciDeviceClass>().and_then(|c| c.config_write) {
        hook(dev, addr, value, len);
    }
}

/// Sets bytes of the configuration space directly (device set-up, not guest writes).
pub fn pci_config_set(dev: &Object, addr: usize, bytes: &[u8]) {
    part(dev).config.lock()[addr..addr + bytes.len()].copy_from_slice(bytes);
}

/// Lets the guest write `mask` bits of configuration byte `addr` (QEMU's `wmask`).
pub fn pci_config_set_wmask(dev: &Object, addr: usize, mask: u8) {
    part(dev).wmask.lock()[addr] = mask;
}

/// Sets the device's INTx level (QEMU's `pci_set_irq`).
pub fn pci_set_irq(dev: &Object, level: bool) {
    part(dev).irq.lock().set(level);
}

/// Where firmware would place BARs: I/O from 0xc000, 32-bit memory from 0xfe000000 (both
/// in the PCI holes of the pc machine).
const BAR_IO_BASE: u64 = 0xc000;
const BAR_IO_LIMIT: u64 = 0x1_0000;
const BAR_MEM_BASE: u64 = 0xfe00_0000;
const BAR_MEM_LIMIT: u64 = 0xfec0_0000;

/// Assigns every BAR on `bus` an address and enables decoding, as firmware does before
/// the guest starts (test kernels do not program BARs; Linux keeps what it finds).
pub fn pci_assign_bars(bus: &Object) {
    let mut next_io = BAR_IO_BASE;
    let mut next_mem = BAR_MEM_BASE;
    for (_, dev) in pci_bus_devices(bus) {
        let st = part(&dev);
        let sizes: Vec<(usize, BarKind, u64)> = st
            .bars
            .lock()
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (i, b.kind, b.region.size())))
            .collect();
        if sizes.is_empty() {
            continue;
        }
        let mut command = 0u16;
        for (index, kind, size) in sizes {
            let (next, limit, flag) = match kind {
                BarKind::Io => (&mut next_io, BAR_IO_LIMIT, config::COMMAND_IO),
                BarKind::Mem32 => (&mut next_mem, BAR_MEM_LIMIT, config::COMMAND_MEMORY),
            };
            let size = size.max(if kind == BarKind::Io { 4 } else { 16 });
            let addr = next.next_multiple_of(size);
            if addr + size > limit {
                log::warn!("{}: no room for BAR {index} (0x{size:x} bytes)", dev.type_name());
                continue;
            }
            *next = addr + size;
            let offset = config::BAR0 + 4 * index;
            let flags = pci_config_read(&dev, offset, 4) & if kind == BarKind::Io { 0x3 } else { 0xf };
            pci_config_set(&dev, offset, &(addr as u32 | flags).to_le_bytes());
            command |= flag;
        }
        let current = pci_config_read(&dev, config::COMMAND, 2) as u16;
        pci_config_write(&dev, config::COMMAND, u32::from(current | command), 2);
    }
}
