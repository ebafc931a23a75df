//! PCI (QEMU's `hw/pci/pci.c`): the `PCI` bus, the abstract `pci-device` with its 256-byte
//! configuration space, BARs that the guest (or the board, standing in for firmware)
//! programs, and INTx lines routed to ISA IRQs.

use std::sync::Arc;

use parking_lot::Mutex;
use vm_memory::{Bytes, VolatileMemory};
use qom::{
    type_init, ClassInitFor, Error, Object, ObjectClass, Prop, Property, PropertyKind, PropertyType,
    StateAccessor,
    Typed, Value, WeakObjectRef,
};

use crate::core::bus::BusState;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::irq::{IrqHandler, IrqLine};
use crate::core::memory::{AddressSpace, MemoryRegion, MemoryRegionOps, RamBacking};
use crate::core::qdev::{
    device_class_add_property, device_class_init, DeviceCategory, DeviceContext, DeviceImpl, DeviceMethods, DeviceState,
    RealizeError,
};

/// QEMU's `TYPE_PCI_BUS`.
pub const TYPE_PCI_BUS: &str = "PCI";
/// QEMU's `TYPE_PCI_DEVICE`.
pub const TYPE_PCI_DEVICE: &str = "pci-device";
/// QEMU's `INTERFACE_CONVENTIONAL_PCI_DEVICE`: a device on a conventional (not PCI Express)
/// bus; every PCI device of the pc board is one.
pub const INTERFACE_CONVENTIONAL_PCI_DEVICE: &str = "conventional-pci-device";

type_init! {
    name: INTERFACE_CONVENTIONAL_PCI_DEVICE,
    parent: Some(qom::TYPE_INTERFACE),
    abstract_: true,
}

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
    /// Offset of the first capability.
    pub const CAPABILITY_LIST: usize = 0x34;
    /// Status: the device has a capability list.
    pub const STATUS_CAP_LIST: u16 = 0x10;
    /// Command: INTx disabled.
    pub const COMMAND_INTX_DISABLE: u16 = 0x400;
    /// Cache line size (for memory-write-and-invalidate; Linux's `pci_set_mwi` writes it
    /// and fails when it does not read back).
    pub const CACHE_LINE_SIZE: usize = 0x0c;
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
    /// Expansion ROM base address (bit 0: decoding enabled).
    pub const ROM_ADDRESS: usize = 0x30;
    /// Expansion ROM base address: the enable bit.
    pub const ROM_ADDRESS_ENABLE: u32 = 0x1;
    /// Header type bit: multi-function device.
    pub const HEADER_MULTI_FUNCTION: u8 = 0x80;
}

/// Number of BARs of a type 0 header.
pub const PCI_NUM_BARS: usize = 6;
/// QEMU's `PCI_ROM_SLOT`: the expansion ROM's region, after the six BARs.
pub const PCI_ROM_SLOT: usize = 6;
/// BARs and the expansion ROM.
pub const PCI_NUM_REGIONS: usize = 7;

/// QEMU's default subsystem vendor (`PCI_SUBVENDOR_ID_REDHAT_QUMRANET`).
const PCI_SUBVENDOR_ID_REDHAT_QUMRANET: u16 = 0x1af4;
/// QEMU's default subsystem (`PCI_SUBDEVICE_ID_QEMU`).
const PCI_SUBDEVICE_ID_QEMU: u16 = 0x1100;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 32-bit prefetchable memory (QEMU's `PCI_BASE_ADDRESS_MEM_PREFETCH`): a framebuffer.
    Mem32Prefetch,
    /// 64-bit memory (`PCI_BASE_ADDRESS_MEM_TYPE_64`): the BAR takes the next one's dword
    /// for its upper half (registers, as QEMU's xHCI has them).
    Mem64,
    /// 64-bit prefetchable memory (shared memory, large windows).
    Mem64Prefetch,
}

impl BarKind {
    /// Whether the BAR decodes memory (not ports).
    pub fn is_memory(self) -> bool {
        self != BarKind::Io
    }

    /// Whether it is prefetchable memory.
    pub fn is_prefetch(self) -> bool {
        matches!(self, BarKind::Mem32Prefetch | BarKind::Mem64Prefetch)
    }

    /// Whether it is a 64-bit BAR.
    pub fn is_64bit(self) -> bool {
        matches!(self, BarKind::Mem64 | BarKind::Mem64Prefetch)
    }
}

/// The configuration-space offset of region `index` (a BAR, or the expansion ROM).
fn region_offset(index: usize) -> usize {
    if index == PCI_ROM_SLOT {
        config::ROM_ADDRESS
    } else {
        config::BAR0 + 4 * index
    }
}

/// QEMU's `PCIDeviceClass`: the header a PCI device type presents, derived from its
/// [`PciDeviceImpl`].
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
    /// The option ROM the device carries unless `romfile=` says otherwise (QEMU's
    /// `PCIDeviceClass::romfile`), a name searched in the data directories.
    pub romfile: Option<&'static str>,
    /// The device's PCI methods, as a trait object.
    pci: Option<PciDeviceCast>,
}

/// Casts an object of a PCI device type to its [`PciDeviceOps`].
type PciDeviceCast = qom::ImplCast<dyn PciDeviceOps>;

/// A PCI device type: QEMU's `PCIDeviceClass` constants and methods as a trait.
pub trait PciDeviceImpl: DeviceImpl {
    /// Vendor ID.
    const VENDOR_ID: u16 = 0;
    /// Device ID.
    const DEVICE_ID: u16 = 0;
    /// Revision.
    const REVISION: u8 = 0;
    /// Class and sub-class.
    const CLASS_ID: u16 = 0;
    /// Programming interface.
    const PROG_IF: u8 = 0;
    /// Subsystem vendor ID.
    const SUBSYSTEM_VENDOR_ID: u16 = 0;
    /// Subsystem ID.
    const SUBSYSTEM_ID: u16 = 0;
    /// Whether function 0 of a multi-function device.
    const MULTIFUNCTION: bool = false;
    /// INTx pin used (0 none, 1 INTA .. 4 INTD).
    const INTERRUPT_PIN: u8 = 0;
    /// The default option ROM (QEMU's `PCIDeviceClass::romfile`).
    const ROMFILE: Option<&'static str> = None;

    /// QEMU's `PCIDeviceClass::realize`: the device's own realize, run once it has a devfn
    /// and its configuration header is set up.
    fn pci_realize(&self, _ctx: &DeviceContext) -> Result<(), RealizeError> {
        Ok(())
    }
    /// QEMU's `PCIDeviceClass::config_write`, after the generic code has applied a guest
    /// write of `len` bytes at `addr`.
    fn config_write(&self, _addr: usize, _val: u32, _len: usize) {}
    /// QEMU's `PCIDeviceClass::config_read`, before the generic read of `len` bytes at
    /// `addr` by the guest: a device whose configuration bytes mirror other state (a
    /// window onto a BAR) refreshes them here.
    fn config_read(&self, _addr: usize, _len: usize) {}
}

/// The dynamically dispatched half of [`PciDeviceImpl`] (its constants live in the class).
pub trait PciDeviceOps: Send + Sync {
    /// [`PciDeviceImpl::pci_realize`].
    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError>;
    /// [`PciDeviceImpl::config_write`].
    fn config_write(&self, addr: usize, val: u32, len: usize);
    /// [`PciDeviceImpl::config_read`].
    fn config_read(&self, addr: usize, len: usize);
}

impl<T: PciDeviceImpl> PciDeviceOps for T {
    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        PciDeviceImpl::pci_realize(self, ctx)
    }
    fn config_write(&self, addr: usize, val: u32, len: usize) {
        PciDeviceImpl::config_write(self, addr, val, len)
    }
    fn config_read(&self, addr: usize, len: usize) {
        PciDeviceImpl::config_read(self, addr, len)
    }
}

fn as_pci_device<T: PciDeviceImpl>(obj: &Object) -> Option<&(dyn PciDeviceOps + 'static)> {
    obj.cast::<T>().map(|d| d as &dyn PciDeviceOps)
}

/// Makes the objects of the class being built reach the PCI methods of their ancestor
/// `B` instead of their own: an abstract base that implements `pci_realize` and
/// `config_write` for all its subclasses (QEMU's `virtio_pci_class_init` setting
/// `k->realize` and `k->config_write`) calls this in its `ClassInitFor`.
pub fn pci_device_class_use_ops_of<B: PciDeviceImpl>(class: &mut ObjectClass) {
    if let Some(pc) = class.get_mut::<PciDeviceClass>() {
        pc.pci = Some(as_pci_device::<B>);
    }
}

/// The PCI methods of `obj`, if it is a PCI device.
pub fn pci_device_impl(obj: &Object) -> Option<&dyn PciDeviceOps> {
    obj.class()
        .get::<PciDeviceClass>()
        .and_then(|pc| pc.pci?(obj))
}

/// `pci-device`'s class_init of each PCI device type: the device class, and the header
/// values from the impl.
impl<T: PciDeviceImpl> ClassInitFor<T> for PciDevice {
    fn class_init(class: &mut ObjectClass) {
        device_class_init::<T>(class);
        class.insert(PciDeviceClass {
            vendor_id: T::VENDOR_ID,
            device_id: T::DEVICE_ID,
            revision: T::REVISION,
            class_id: T::CLASS_ID,
            prog_if: T::PROG_IF,
            subsystem_vendor_id: T::SUBSYSTEM_VENDOR_ID,
            subsystem_id: T::SUBSYSTEM_ID,
            multifunction: T::MULTIFUNCTION,
            interrupt_pin: T::INTERRUPT_PIN,
            romfile: T::ROMFILE,
            pci: Some(as_pci_device::<T>),
        });
    }
}

struct Bar {
    kind: BarKind,
    region: Arc<MemoryRegion>,
    /// Where it is mapped now, if it is.
    mapped_at: Option<u64>,
}

/// The configuration space and the bits of it the guest may change.
struct ConfigSpace {
    bytes: [u8; 256],
    wmask: [u8; 256],
    /// Where the next capability goes (capabilities follow the 64-byte header).
    next_capability: usize,
    /// The last capability added, whose next pointer links a new one.
    last_capability: Option<usize>,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        ConfigSpace {
            bytes: [0; 256],
            wmask: [0; 256],
            next_capability: 0x40,
            last_capability: None,
        }
    }
}

/// `romfile=`: QEMU tells an unset property (the class's ROM) from an empty one (no ROM).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RomFile {
    /// Not given: the device class's ROM, if it has one.
    #[default]
    ClassDefault,
    /// `romfile=` (empty): no option ROM.
    NoRom,
    /// A file name searched in the firmware directories, or a path.
    File(String),
}

impl PropertyType for RomFile {
    const KIND: PropertyKind = PropertyKind::Str;
    fn to_value(&self) -> Value {
        match self {
            RomFile::File(file) => Value::Str(file.clone()),
            RomFile::ClassDefault | RomFile::NoRom => Value::Str(String::new()),
        }
    }
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Str(s) if s.is_empty() => Some(RomFile::NoRom),
            Value::Str(s) => Some(RomFile::File(s)),
            _ => None,
        }
    }
    fn default_value(&self) -> Option<Value> {
        None
    }
}

/// QEMU's `PCIDevice`: configuration space, write mask, BARs, the option ROM and the INTx
/// line.
#[derive(qom::Object)]
#[qom(name = TYPE_PCI_DEVICE, abstract, class_level)]
pub struct PciDevice {
    #[parent]
    parent: DeviceState,
    #[property(desc = "Option ROM image: a file name searched in the firmware directories, or a path (empty: none)")]
    romfile: Prop<RomFile>,
    #[property(default = u32::MAX, desc = "ROM BAR size in bytes (all ones: the image's, rounded up to a power of two)")]
    romsize: Prop<u32>,
    #[property(default = 1, desc = "Expose the option ROM through the ROM BAR (0: hand it to the firmware through fw_cfg)")]
    rombar: Prop<u32>,
    /// slot << 3 | function: as `addr=` gives it, or as realize takes it.
    devfn: Mutex<Option<u8>>,
    config: Mutex<ConfigSpace>,
    bars: Mutex<[Option<Bar>; PCI_NUM_REGIONS]>,
    /// An option ROM for the firmware's fw_cfg (`rombar=0`), which the board publishes.
    fw_cfg_rom: Mutex<Option<FwCfgRom>>,
    /// The option ROM's image as loaded (ROM BAR or fw_cfg), for what the board does in
    /// the firmware's place (the VGA BIOS's font under a direct kernel boot).
    option_rom: Mutex<Option<OptionRom>>,
    intx: Arc<IntxPin>,
}

/// Says once per file that a class's default option ROM is missing, with the Debian
/// package that has it.
fn warn_missing_class_rom(file: &str, type_name: &str) {
    static WARNED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut warned = WARNED.lock();
    if warned.iter().any(|f| f == file) {
        return;
    }
    warned.push(file.to_string());
    let package = if file.starts_with("vgabios") { "seabios" } else { "ipxe-qemu" };
    qom::error_report!(
        "warning: failed to find romfile \"{file}\": {type_name} has no option ROM (Debian package {package})"
    );
}

/// An option ROM handed to the firmware as a fw_cfg file instead of a ROM BAR (QEMU's
/// `rom_add_vga`/`rom_add_option` for `rombar=0`).
#[derive(Clone, Debug)]
pub struct FwCfgRom {
    /// The fw_cfg file name: `vgaroms/NAME` for a display controller, else `genroms/NAME`.
    pub name: String,
    /// The image.
    pub data: Arc<[u8]>,
}

/// A device's INTx pin: the line the host bridge routed it to and the level the device
/// drives (QEMU's `irq_state`). Only changes reach the line, which other devices may share
/// (the router counts them). Handlers on I/O threads hold it to interrupt.
#[derive(Default)]
pub struct IntxPin {
    state: Mutex<(IrqLine, bool)>,
}

impl IntxPin {
    /// Drives the pin to `level` (QEMU's `pci_set_irq`).
    pub fn set(&self, level: bool) {
        let mut state = self.state.lock();
        if state.1 != level {
            state.1 = level;
            state.0.set(level);
        }
    }

    fn connect(&self, line: IrqLine) {
        self.state.lock().0 = line;
    }

    /// Lowers the pin and cuts it from its line (QEMU's `pci_device_deassert_intx` at
    /// unrealize): an unplugged device holds no shared interrupt up, and later calls go
    /// nowhere.
    fn disconnect(&self) {
        // One lock: a completion racing the unplug cannot raise the line in between.
        let mut state = self.state.lock();
        if state.1 {
            state.1 = false;
            state.0.set(false);
        }
        state.0 = IrqLine::disconnected();
    }
}

type_init!(PciDevice {
    class_init: Some(pci_device_base_class_init),
});

/// `addr`: the devfn, read and written in QEMU's `slot[.function]` notation.
static PCI_ADDR: StateAccessor<PciDevice> = StateAccessor {
    get: |dev, _| {
        Value::Str(
            dev.devfn()
                .map_or_else(String::new, |d| format!("{:02x}.{}", d >> 3, d & 7)),
        )
    },
    set: Some(PciDevice::set_addr),
};

/// The abstract `pci-device` class: the device class and the `addr` property every PCI
/// device has.
fn pci_device_base_class_init(class: &mut ObjectClass) {
    // `addr` first, then the ROM properties, in QEMU's order (`info qtree` shows it).
    device_class_add_property(
        class,
        Property::state(
        "addr",
        PropertyKind::Str,
            "Slot and optional function number, example: 06.0 or 06",
            &PCI_ADDR,
        ),
    );
    <PciDevice as ClassInitFor<PciDevice>>::class_init(class);
}

/// Computes the INTx line of a device being realized on the bus (the host bridge's
/// routing, QEMU's `pci_bus_irqs`); it may set the device's interrupt line register, as
/// firmware would.
pub type PciIrqRoute = fn(bus: &PciBus, dev: &PciDevice, pin: u8) -> IrqLine;

/// QEMU's `PCIBus`: which device sits at each devfn, and how INTx pins reach the interrupt
/// controller. BARs map into the address spaces of the bus's services.
#[derive(qom::Object)]
#[qom(name = TYPE_PCI_BUS)]
pub struct PciBus {
    #[parent]
    parent: BusState,
    devices: Mutex<Vec<(u8, WeakObjectRef)>>,
    route: Mutex<Option<PciIrqRoute>>,
    /// Where routed INTx lines go (QEMU's `pci_bus_irqs` `set_irq`): the host bridge's
    /// interrupt router, which ORs the devices sharing a line.
    irq_handler: Mutex<Option<Arc<dyn IrqHandler>>>,
}

type_init!(PciBus);

impl PciBus {
    /// Sets how INTx is routed (QEMU's `pci_bus_map_irqs`).
    pub fn set_route(&self, route: PciIrqRoute) {
        *self.route.lock() = Some(route);
    }

    /// Sets the handler routed INTx lines reach (QEMU's `pci_bus_irqs`).
    pub fn set_irq_handler(&self, handler: Arc<dyn IrqHandler>) {
        *self.irq_handler.lock() = Some(handler);
    }

    /// The handler routed INTx lines reach, if the host bridge set one.
    pub fn irq_handler(&self) -> Option<Arc<dyn IrqHandler>> {
        self.irq_handler.lock().clone()
    }

    /// The device at `devfn`.
    pub fn find_device(&self, devfn: u8) -> Option<Typed<PciDevice>> {
        let obj = self
            .devices
            .lock()
            .iter()
            .find(|(d, _)| *d == devfn)
            .and_then(|(_, w)| w.upgrade())?;
        Typed::new(obj)
    }

    /// Every device, by devfn.
    pub fn devices(&self) -> Vec<(u8, Typed<PciDevice>)> {
        let mut list: Vec<_> = self
            .devices
            .lock()
            .iter()
            .filter_map(|(d, w)| Some((*d, Typed::new(w.upgrade()?)?)))
            .collect();
        list.sort_by_key(|(d, _)| *d);
        list
    }

    /// The I/O and memory spaces BARs map into: the machine's.
    fn spaces(&self) -> Option<(Arc<AddressSpace>, Arc<AddressSpace>)> {
        self.services()
            .map(|s| (s.system_io().clone(), s.system_memory().clone()))
    }
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
    /// A hotplugged function of a slot whose function 0 is there: the guest would never
    /// see it (QEMU's `do_pci_register_device`).
    #[error("PCI: slot {slot} function 0 already occupied by {function0}, new func {driver} cannot be exposed to guest.")]
    Function0Occupied {
        /// Slot.
        slot: u8,
        /// Function 0's type.
        function0: String,
        /// The new device's type.
        driver: String,
    },
    /// A malformed `addr=`.
    #[error("Parameter 'addr' expects a PCI address 'slot[.function]', got '{0}'")]
    BadAddr(String),
    /// No room left for a capability.
    #[error("PCI capability 0x{id:02x} of '{driver}': no room for {size} bytes in the configuration space")]
    NoCapabilitySpace {
        /// Capability ID.
        id: u8,
        /// The device.
        driver: String,
        /// Its size.
        size: usize,
    },
    /// `romfile=` names nothing readable.
    #[error("failed to find romfile \"{0}\"")]
    RomNotFound(String),
    /// `romfile=` names an empty file.
    #[error("romfile \"{0}\" is empty")]
    RomEmpty(String),
    /// `romfile=` names a file of more than 2 GiB.
    #[error("romfile \"{0}\" too large (size cannot exceed 2 GiB)")]
    RomTooLarge(String),
    /// Reading the image failed (QEMU's `load_image_size` error).
    #[error("failed to load romfile \"{0}\"")]
    RomLoad(String),
    /// No host memory for the ROM BAR.
    #[error("romfile \"{file}\": cannot allocate the ROM: {reason}")]
    RomAllocation {
        /// `romfile=`.
        file: String,
        /// Why.
        reason: String,
    },
    /// `romfile=` larger than `romsize=`.
    #[error("romfile \"{file}\" ({size} bytes) is too large for ROM size {romsize}")]
    RomSize {
        /// The image.
        file: String,
        /// Its size.
        size: u64,
        /// `romsize=`.
        romsize: u32,
    },
    /// `romsize=` not a power of two.
    #[error("ROM size {0} is not a power of two")]
    RomSizeNotPowerOfTwo(u32),
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
    /// A 64-bit BAR in the last slot, or over another BAR.
    #[error("PCI BAR {bar} of '{driver}': a 64-bit BAR needs the next BAR's slot too")]
    Bar64NoRoom {
        /// The BAR.
        bar: usize,
        /// The device.
        driver: String,
    },
}

/// Sets how INTx is routed on `bus`, a `PCI` bus the host bridge created with `qbus_new`
/// (its BARs go to the address spaces of the services it was created with).
pub fn pci_bus_init(bus: &Object, route: PciIrqRoute) {
    if let Some(st) = bus.cast::<PciBus>() {
        st.set_route(route);
    }
}

/// The device at `devfn` of `bus`.
pub fn pci_find_device(bus: &Object, devfn: u8) -> Option<Typed<PciDevice>> {
    bus.cast::<PciBus>()?.find_device(devfn)
}

/// Every device on `bus`, by devfn.
pub fn pci_bus_devices(bus: &Object) -> Vec<(u8, Typed<PciDevice>)> {
    bus.cast::<PciBus>()
        .map(PciBus::devices)
        .unwrap_or_default()
}

/// QEMU's `set_pci_devfn`: slot and function in hex (`strtoul` base 16, so an optional
/// `0x`), as libvirt writes them (`addr=0x1.0x2`).
fn parse_addr(text: &str) -> Option<u8> {
    let hex = |s: &str| {
        let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
        u8::from_str_radix(digits, 16).ok().filter(|_| !digits.starts_with('+'))
    };
    let (slot, function) = text.split_once('.').unwrap_or((text, "0"));
    let slot = hex(slot).filter(|s| *s < 32)?;
    let function = hex(function).filter(|f| *f < 8)?;
    Some((slot << 3) | function)
}

impl DeviceImpl for PciDevice {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
    const BUS_TYPE: Option<&'static str> = Some(TYPE_PCI_BUS);

    /// QEMU's `pci_qdev_realize`: takes a devfn on the bus, fills the configuration header
    /// from the class, connects INTx, then runs the device's own realize.
    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let bus: &PciBus = ctx.bus_state()?;
        let dev = ctx.object();
        let driver = ctx.type_name();
        let pc = dev
            .class()
            .get::<PciDeviceClass>()
            .cloned()
            .unwrap_or_default();
        let requested = self.devfn();
        let devfn = {
            let mut devices = bus.devices.lock();
            devices.retain(|(_, w)| w.strong_count() > 0);
            let devfn = match requested {
                Some(devfn) => {
                    if let Some((_, other)) = devices.iter().find(|(d, _)| *d == devfn) {
                        // QEMU names the other device's type and id ("(null)" without).
                        let other = other.upgrade().map_or("?".into(), |o| {
                            let id = o.device_id().unwrap_or_else(|| "(null)".into());
                            format!("{},id={id}", o.type_name())
                        });
                        return Err(RealizeError::device(PciError::SlotInUse {
                            slot: devfn >> 3,
                            function: devfn & 7,
                            driver: driver.into(),
                            other,
                        }));
                    }
                    let hotplugged = dev
                        .downcast::<crate::core::qdev::DeviceState>()
                        .is_some_and(|st| st.is_hotplugged());
                    if hotplugged && devfn & 7 != 0 {
                        if let Some((_, f0)) = devices.iter().find(|(d, _)| *d == devfn & !7) {
                            let function0 = f0
                                .upgrade()
                                .map_or("?".into(), |o| o.type_name().to_string());
                            return Err(RealizeError::device(PciError::Function0Occupied {
                                slot: devfn >> 3,
                                function0,
                                driver: driver.into(),
                            }));
                        }
                    }
                    devfn
                }
                None => (0u8..32)
                    .map(|slot| slot << 3)
                    .find(|d| !devices.iter().any(|(x, _)| *x == *d))
                    .ok_or_else(|| RealizeError::device(PciError::BusFull(driver.into())))?,
            };
            devices.push((devfn, dev.downgrade()));
            devfn
        };
        *self.devfn.lock() = Some(devfn);
        {
            let mut space = self.config.lock();
            let ConfigSpace {
                bytes: c, wmask: w, ..
            } = &mut *space;
            c[config::VENDOR_ID..config::VENDOR_ID + 2]
                .copy_from_slice(&pc.vendor_id.to_le_bytes());
            c[config::DEVICE_ID..config::DEVICE_ID + 2]
                .copy_from_slice(&pc.device_id.to_le_bytes());
            c[config::REVISION] = pc.revision;
            c[config::PROG_IF] = pc.prog_if;
            c[config::CLASS..config::CLASS + 2].copy_from_slice(&pc.class_id.to_le_bytes());
            c[config::HEADER_TYPE] = if pc.multifunction {
                config::HEADER_MULTI_FUNCTION
            } else {
                0
            };
            // A type that names no subsystem gets QEMU's (`pci_set_default_subsystem_id`:
            // Red Hat, QEMU).
            let (sub_vendor, sub_id) = match (pc.subsystem_vendor_id, pc.subsystem_id) {
                (0, 0) => (PCI_SUBVENDOR_ID_REDHAT_QUMRANET, PCI_SUBDEVICE_ID_QEMU),
                ids => ids,
            };
            c[config::SUBSYSTEM_VENDOR_ID..config::SUBSYSTEM_VENDOR_ID + 2]
                .copy_from_slice(&sub_vendor.to_le_bytes());
            c[config::SUBSYSTEM_ID..config::SUBSYSTEM_ID + 2]
                .copy_from_slice(&sub_id.to_le_bytes());
            c[config::INTERRUPT_PIN] = pc.interrupt_pin;
            // The guest may change the command register's I/O, memory, bus-master and
            // interrupt-disable bits, the cache line size and the interrupt line (QEMU's
            // `pci_init_wmask`).
            w[config::COMMAND] = 0x07;
            w[config::COMMAND + 1] = 0x04;
            w[config::CACHE_LINE_SIZE] = 0xff;
            w[config::INTERRUPT_LINE] = 0xff;
        }
        if pc.interrupt_pin > 0 {
            let route = *bus.route.lock();
            if let Some(route) = route {
                self.intx.connect(route(bus, self, pc.interrupt_pin));
            }
        }
        let romsize = self.romsize.get();
        if romsize != u32::MAX && !romsize.is_power_of_two() {
            return Err(RealizeError::device(PciError::RomSizeNotPowerOfTwo(romsize)));
        }
        // The ROM first (QEMU loads it after the device's realize): a missing file then
        // fails before the device has claimed anything. A class ROM takes the device's
        // IDs once its realize has set them (a modern-only virtio device changes its own).
        let class_rom = self.add_option_rom(pc.romfile, pc.class_id)?;
        if let Some(pci) = pc.pci.and_then(|cast| cast(dev)) {
            pci.pci_realize(ctx)?;
        }
        if class_rom {
            self.patch_option_rom_ids();
        }
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        self.intx.disconnect();
        let bus = ctx.bus_state::<PciBus>().ok();
        let spaces = bus.and_then(PciBus::spaces);
        for bar in self.bars.lock().iter_mut().flatten() {
            if bar.mapped_at.take().is_some() {
                if let Some((io, memory)) = &spaces {
                    let space = if bar.kind == BarKind::Io { io } else { memory };
                    space.unmap(&bar.region);
                }
            }
        }
        if let (Some(bus), Some(devfn)) = (bus, self.devfn()) {
            bus.devices.lock().retain(|(d, _)| *d != devfn);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }
}

impl PciDeviceImpl for PciDevice {}

impl PciDevice {
    /// The device's devfn (slot << 3 | function), once realized (QEMU's `pci_get_devfn`).
    pub fn devfn(&self) -> Option<u8> {
        *self.devfn.lock()
    }

    /// The `addr` setter: refused once realized, as qdev properties are.
    fn set_addr(&self, _prop: &Property, value: Value) -> Result<(), Error> {
        let Value::Str(text) = value else {
            return Ok(());
        };
        let devfn =
            parse_addr(&text).ok_or_else(|| Error::other(PciError::BadAddr(text.clone())))?;
        *self.devfn.lock() = Some(devfn);
        Ok(())
    }

    fn type_name(&self) -> &'static str {
        self.try_object()
            .map_or(TYPE_PCI_DEVICE, |obj| obj.type_name())
    }

    /// QEMU's `pci_register_bar`: `region` becomes BAR `index`; the guest sizes and places
    /// it through the configuration space.
    pub fn register_bar(
        &self,
        index: usize,
        kind: BarKind,
        region: Arc<MemoryRegion>,
    ) -> Result<(), RealizeError> {
        let size = region.size().max(if kind == BarKind::Io { 4 } else { 16 });
        if !size.is_power_of_two() {
            return Err(RealizeError::device(PciError::BarSize {
                bar: index,
                driver: self.type_name().into(),
                size,
            }));
        }
        let offset = region_offset(index);
        let (flags, mask) = match kind {
            _ if index == PCI_ROM_SLOT => (0x0u32, (!(size as u32 - 1) & !0x7ff) | config::ROM_ADDRESS_ENABLE),
            BarKind::Io => (0x1u32, !(size as u32 - 1) & !0x3),
            BarKind::Mem32 => (0x0u32, !(size as u32 - 1) & !0xf),
            BarKind::Mem32Prefetch => (0x8u32, !(size as u32 - 1) & !0xf),
            BarKind::Mem64 => (0x4u32, !(size - 1) as u32 & !0xf),
            BarKind::Mem64Prefetch => (0xcu32, !(size - 1) as u32 & !0xf),
        };
        let upper_half_of_previous =
            index > 0 && index != PCI_ROM_SLOT && self.bars.lock()[index - 1].as_ref().is_some_and(|b| b.kind.is_64bit());
        if upper_half_of_previous {
            return Err(RealizeError::device(PciError::Bar64NoRoom { bar: index - 1, driver: self.type_name().into() }));
        }
        if kind.is_64bit() && (index + 1 >= PCI_NUM_BARS || self.bars.lock()[index + 1].is_some()) {
            return Err(RealizeError::device(PciError::Bar64NoRoom { bar: index, driver: self.type_name().into() }));
        }
        {
            let mut space = self.config.lock();
            space.bytes[offset..offset + 4].copy_from_slice(&flags.to_le_bytes());
            space.wmask[offset..offset + 4].copy_from_slice(&mask.to_le_bytes());
            if kind.is_64bit() {
                // The upper dword: the size's upper bits, writable above it.
                let high = ((!(size - 1)) >> 32) as u32;
                space.bytes[offset + 4..offset + 8].fill(0);
                space.wmask[offset + 4..offset + 8].copy_from_slice(&high.to_le_bytes());
            }
        }
        self.bars.lock()[index] = Some(Bar {
            kind,
            region,
            mapped_at: None,
        });
        Ok(())
    }

    /// The address BAR `index` (or the expansion ROM, [`PCI_ROM_SLOT`]) decodes now (from
    /// the configuration space).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bars = self.bars.lock();
        let bar = bars.get(index)?.as_ref()?;
        let raw = self.raw_region(index);
        Some(match bar.kind {
            _ if index == PCI_ROM_SLOT => u64::from(raw & !0x7ff),
            BarKind::Io => u64::from(raw & !0x3),
            BarKind::Mem32 | BarKind::Mem32Prefetch => u64::from(raw & !0xf),
            BarKind::Mem64 | BarKind::Mem64Prefetch => u64::from(raw & !0xf) | u64::from(self.raw_region(index + 1)) << 32,
        })
    }

    /// The raw configuration dword of region `index`.
    fn raw_region(&self, index: usize) -> u32 {
        let offset = region_offset(index);
        let c = &self.config.lock().bytes;
        u32::from_le_bytes([c[offset], c[offset + 1], c[offset + 2], c[offset + 3]])
    }

    /// The regions the device has, with where each is mapped now (QEMU's
    /// `qmp_query_pci_regions`): `(index, kind, mapped address, size)`.
    pub fn regions(&self) -> Vec<(usize, BarKind, Option<u64>, u64)> {
        self.bars
            .lock()
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (i, b.kind, b.mapped_at, b.region.size())))
            .collect()
    }

    /// The size of region `index`, if the device has it.
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        let bars = self.bars.lock();
        Some(bars.get(index)?.as_ref()?.region.size())
    }

    /// QEMU's `pci_add_option_rom`: loads `romfile=` (or the class's default ROM) into the
    /// expansion ROM BAR, or with `rombar=0` keeps it for the firmware's fw_cfg. Returns
    /// whether it loaded the class's ROM, whose IDs [`Self::patch_option_rom_ids`] sets.
    fn add_option_rom(&self, class_rom: Option<&'static str>, class_id: u16) -> Result<bool, RealizeError> {
        let (file, is_default_rom) = match self.romfile.get() {
            RomFile::File(file) => (file, false),
            RomFile::NoRom => return Ok(false),
            RomFile::ClassDefault => match class_rom {
                Some(file) => (file.to_string(), true),
                None => return Ok(false),
            },
        };
        let path = crate::core::datadir::resolve_data_file(&file);
        let size = std::fs::metadata(&path).ok().filter(|m| !m.is_dir()).map(|m| m.len());
        let Some(size) = size else {
            if is_default_rom {
                // QEMU fails here, but its packages always carry the class ROMs; qomvm's
                // users may lack one, and the card works without it (the firmware only
                // cannot boot from it).
                warn_missing_class_rom(&file, self.type_name());
                return Ok(false);
            }
            return Err(RealizeError::device(PciError::RomNotFound(file)));
        };
        if size == 0 {
            return Err(RealizeError::device(PciError::RomEmpty(file)));
        }
        if size > 2 << 30 {
            return Err(RealizeError::device(PciError::RomTooLarge(file)));
        }
        let romsize = self.romsize.get();
        let bar_size = if romsize != u32::MAX {
            if size > u64::from(romsize) {
                return Err(RealizeError::device(PciError::RomSize { file, size, romsize }));
            }
            u64::from(romsize)
        } else {
            size.next_power_of_two()
        };
        if self.rombar.get() != 0 {
            // Straight into the BAR's memory: on the start-up path, a network card's ROM
            // copied through buffers cost a few tenths of a millisecond.
            let name = format!("{}.rom", self.type_name());
            let rom = RomBar::load(&path, size as usize, bar_size).map_err(|e| {
                RealizeError::device(match e {
                    RomLoadError::Open => PciError::RomNotFound(file),
                    RomLoadError::Read => PciError::RomLoad(file),
                    RomLoadError::Map(reason) => PciError::RomAllocation { file, reason },
                })
            })?;
            *self.option_rom.lock() = Some(OptionRom::Bar(rom.clone(), size as usize));
            let backing = RamBacking {
                host_addr: rom.host_addr(),
                owner: rom.clone(),
            };
            let region = MemoryRegion::new_rom_device(name, bar_size, rom, backing);
            self.register_bar(PCI_ROM_SLOT, BarKind::Mem32, region)?;
            return Ok(is_default_rom);
        }
        let data: Arc<[u8]> = std::fs::read(&path)
            .map_err(|_| RealizeError::device(PciError::RomNotFound(file.clone())))?
            .into();
        *self.option_rom.lock() = Some(OptionRom::Image(data.clone()));
        let base = path.file_name().map_or(file.clone(), |n| n.to_string_lossy().into_owned());
        let dir = if class_id == 0x0300 { "vgaroms" } else { "genroms" };
        *self.fw_cfg_rom.lock() = Some(FwCfgRom {
            name: format!("{dir}/{base}"),
            data,
        });
        Ok(is_default_rom)
    }

    /// QEMU's `pci_patch_ids` for a class's ROM: its PCI data structure names the device's
    /// vendor and device IDs (one image serves several devices).
    fn patch_option_rom_ids(&self) {
        let (vendor, device) = (
            self.read_config(config::VENDOR_ID, 2) as u16,
            self.read_config(config::DEVICE_ID, 2) as u16,
        );
        match self.option_rom.lock().as_mut() {
            Some(OptionRom::Bar(rom, size)) => rom.patch_ids(*size, vendor, device),
            Some(OptionRom::Image(data)) => {
                let mut patched = data.to_vec();
                patch_rom_ids(&mut patched, vendor, device);
                *data = patched.into();
                if let Some(fw_cfg) = self.fw_cfg_rom.lock().as_mut() {
                    fw_cfg.data = data.clone();
                }
            }
            None => {}
        }
    }

    /// The option ROM's image (`romfile=` or the class's), wherever it went, if any.
    pub fn option_rom(&self) -> Option<Arc<[u8]>> {
        match self.option_rom.lock().as_ref()? {
            OptionRom::Image(data) => Some(data.clone()),
            OptionRom::Bar(rom, size) => Some(rom.image(*size).into()),
        }
    }

    /// The option ROM the firmware should find in fw_cfg (`rombar=0`), if any.
    pub fn fw_cfg_rom(&self) -> Option<FwCfgRom> {
        self.fw_cfg_rom.lock().clone()
    }

    /// Re-maps the BARs after a configuration change (QEMU's `pci_update_mappings`).
    fn update_mappings(&self) {
        let Some(bus) = self.parent_bus() else { return };
        let Some((io, memory)) = bus.cast::<PciBus>().and_then(PciBus::spaces) else {
            return;
        };
        let command = {
            let c = &self.config.lock().bytes;
            u16::from_le_bytes([c[config::COMMAND], c[config::COMMAND + 1]])
        };
        for index in 0..PCI_NUM_REGIONS {
            let Some(addr) = self.bar_address(index) else {
                continue;
            };
            let rom_enabled =
                index != PCI_ROM_SLOT || self.raw_region(index) & config::ROM_ADDRESS_ENABLE != 0;
            let mut bars = self.bars.lock();
            let Some(bar) = bars[index].as_mut() else {
                continue;
            };
            let (enabled, space) = match bar.kind {
                BarKind::Io => (command & config::COMMAND_IO != 0, &io),
                BarKind::Mem32 | BarKind::Mem32Prefetch | BarKind::Mem64 | BarKind::Mem64Prefetch => {
                    (command & config::COMMAND_MEMORY != 0 && rom_enabled, &memory)
                }
            };
            let size = bar.region.size();
            // An address of 0, or one whose range wraps or is the sizing pattern, is unmapped:
            // for a memory BAR that is any range reaching 0xffffffff (QEMU's
            // `pci_bar_address`), which a BAR being sized with decoding on (iPXE does) shows.
            let fits = match bar.kind {
                BarKind::Io => addr + size <= 0x1_0000,
                // Below the 52 bits of physical address x86 allows; all ones (sizing) wraps.
                BarKind::Mem64 | BarKind::Mem64Prefetch => addr.checked_add(size).is_some_and(|end| end <= 1u64 << 52),
                _ => addr + size < 1u64 << 32,
            };
            let wanted = (enabled && addr != 0 && fits).then_some(addr);
            if wanted == bar.mapped_at {
                continue;
            }
            if bar.mapped_at.take().is_some() {
                space.unmap(&bar.region);
            }
            if let Some(addr) = wanted {
                match space.map(addr, bar.region.clone()) {
                    Ok(()) => bar.mapped_at = Some(addr),
                    Err(e) => log::warn!("{}: BAR {index}: {e}", self.type_name()),
                }
            }
        }
    }

    /// QEMU's `pci_default_read_config`: `len` (1, 2 or 4) bytes at `addr`, little-endian.
    pub fn read_config(&self, addr: usize, len: usize) -> u32 {
        if addr + len > 256 {
            return u32::MAX;
        }
        let c = &self.config.lock().bytes;
        let mut bytes = [0u8; 4];
        bytes[..len].copy_from_slice(&c[addr..addr + len]);
        u32::from_le_bytes(bytes)
    }

    /// A guest's configuration read (QEMU's `pci_host_config_read_common`): the type's
    /// [`PciDeviceImpl::config_read`], then the bytes.
    pub fn guest_read_config(&self, addr: usize, len: usize) -> u32 {
        if addr + len <= 256 {
            if let Some(obj) = self.try_object() {
                if let Some(pci) = pci_device_impl(&obj) {
                    pci.config_read(addr, len);
                }
            }
        }
        self.read_config(addr, len)
    }

    /// A guest's configuration write (QEMU's `pci_host_config_write_common`): writes the
    /// bits the write mask allows (`pci_default_write_config`), updates BAR mappings, then
    /// calls the type's [`PciDeviceImpl::config_write`].
    pub fn write_config(&self, addr: usize, value: u32, len: usize) {
        if addr + len > 256 {
            return;
        }
        {
            let mut space = self.config.lock();
            let ConfigSpace {
                bytes: c, wmask: w, ..
            } = &mut *space;
            for (i, byte) in value.to_le_bytes()[..len].iter().enumerate() {
                let a = addr + i;
                c[a] = (c[a] & !w[a]) | (byte & w[a]);
            }
        }
        let touches_bars = (addr < config::BAR0 + 4 * PCI_NUM_BARS && addr + len > config::COMMAND)
            || (addr < config::ROM_ADDRESS + 4 && addr + len > config::ROM_ADDRESS);
        if touches_bars {
            self.update_mappings();
        }
        if let Some(obj) = self.try_object() {
            if let Some(pci) = pci_device_impl(&obj) {
                pci.config_write(addr, value, len);
            }
        }
    }

    /// QEMU's `pci_add_capability`: reserves `size` bytes (at least 2, dword aligned) for
    /// capability `id`, links it into the capability list and returns its offset. The
    /// caller fills the body and sets its write mask.
    pub fn add_capability(&self, id: u8, size: usize) -> Result<usize, RealizeError> {
        let mut space = self.config.lock();
        let offset = space.next_capability;
        if size < 2 || offset + size > 256 {
            return Err(RealizeError::device(PciError::NoCapabilitySpace {
                id,
                driver: self.type_name().into(),
                size,
            }));
        }
        space.next_capability = (offset + size).next_multiple_of(4);
        let link = space
            .last_capability
            .map_or(config::CAPABILITY_LIST, |prev| prev + 1);
        space.bytes[link] = offset as u8;
        space.last_capability = Some(offset);
        space.bytes[offset] = id;
        space.bytes[offset + 1] = 0;
        let status = u16::from_le_bytes([space.bytes[config::STATUS], space.bytes[config::STATUS + 1]])
            | config::STATUS_CAP_LIST;
        space.bytes[config::STATUS..config::STATUS + 2].copy_from_slice(&status.to_le_bytes());
        Ok(offset)
    }

    /// Puts the next capability at `offset` (or later, if that is taken), as QEMU's devices
    /// that pass a capability's offset place it (`msix_init(..., 0x90)`).
    pub fn place_next_capability_at(&self, offset: usize) {
        let mut space = self.config.lock();
        space.next_capability = space.next_capability.max(offset.next_multiple_of(4));
    }

    /// Sets bytes of the configuration space directly (device set-up, not guest writes).
    pub fn config_set(&self, addr: usize, bytes: &[u8]) {
        self.config.lock().bytes[addr..addr + bytes.len()].copy_from_slice(bytes);
    }

    /// Lets the guest write `mask` bits of configuration byte `addr` (QEMU's `wmask`).
    pub fn config_set_wmask(&self, addr: usize, mask: u8) {
        self.config.lock().wmask[addr] = mask;
    }

    /// Sets the device's INTx level (QEMU's `pci_set_irq`). Only changes reach the line,
    /// which other devices may share.
    pub fn set_irq(&self, level: bool) {
        self.intx.set(level);
    }

    /// The device's INTx pin, for handlers that interrupt from other threads.
    pub fn intx(&self) -> Arc<IntxPin> {
        self.intx.clone()
    }

    /// QEMU's `vmstate_pci_device`: the configuration space and the INTx level, as fields
    /// of the device's own section.
    pub fn save_pci_state(&self, section: &mut VmStateSection) {
        section.put_bytes("pci_config", &self.config.lock().bytes);
        section.put("pci_irq_level", self.intx.state.lock().1);
    }

    /// Loads [`PciDevice::save_pci_state`]'s fields: the configuration space (the BARs are
    /// re-mapped from it), then the INTx level.
    pub fn load_pci_state(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let bytes: [u8; 256] = section.get_array("pci_config")?;
        let level: bool = section.get("pci_irq_level")?;
        let saved_ids = &bytes[..4];
        let ids = self.config.lock().bytes[..4].to_vec();
        if saved_ids != ids.as_slice() {
            return Err(VmStateError::Mismatch(format!(
                "PCI vendor/device {:02x?} in the stream, {:02x?} here",
                saved_ids, ids
            )));
        }
        self.config.lock().bytes = bytes;
        self.update_mappings();
        self.intx.set(level);
        Ok(())
    }
}

/// Why [`RomBar::load`] failed.
#[derive(Debug)]
enum RomLoadError {
    /// The file cannot be opened.
    Open,
    /// Reading it failed.
    Read,
    /// No memory for the BAR.
    Map(String),
}

/// Where a device's option ROM went: kept as read, for the firmware's fw_cfg, or in the
/// ROM BAR's memory with the image's size.
enum OptionRom {
    Image(Arc<[u8]>),
    Bar(Arc<RomBar>, usize),
}

/// The expansion ROM's contents (QEMU's `pdev->rom`, a ROM region): the image padded with
/// 0xff to the BAR's size, in host memory the accelerator maps into the guest read-only, so
/// the firmware copying the ROM out (a read per dword) does not exit for each read. The
/// handlers serve the same bytes where it cannot, and drop writes.
struct RomBar(vm_memory::MmapRegion<()>);

impl RomBar {
    /// The BAR's memory with the `size` bytes of the image at `path` read straight in and
    /// 0xff after.
    /// A file that shrank since its size was taken fills what it has (QEMU's
    /// `load_image_size` takes a short read too).
    fn load(path: &std::path::Path, size: usize, bar_size: u64) -> Result<Arc<RomBar>, RomLoadError> {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|_| RomLoadError::Open)?;
        let len = usize::try_from(bar_size).map_err(|e| RomLoadError::Map(e.to_string()))?;
        let region = vm_memory::MmapRegion::<()>::new(len).map_err(|e| RomLoadError::Map(e.to_string()))?;
        // SAFETY: the mapping was just made, is `len` bytes long and nothing else refers to
        // it until this function returns it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), len) };
        let size = size.min(len);
        let mut read = 0;
        while read < size {
            match file.read(&mut bytes[read..size]) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(RomLoadError::Read),
            }
        }
        bytes[read..].fill(0xff);
        Ok(Arc::new(RomBar(region)))
    }

    /// [`patch_rom_ids`] on the image's first `size` bytes, in place: only its header and
    /// PCI data structure are read and written back.
    fn patch_ids(&self, size: usize, vendor: u16, device: u16) {
        let slice = self.0.as_volatile_slice();
        let mut header = [0u8; 0x1a];
        if size < header.len() || slice.read_slice(&mut header, 0).is_err() {
            return;
        }
        let pcir = usize::from(u16::from_le_bytes([header[0x18], header[0x19]]));
        let mut prefix = vec![0u8; (pcir + 9).max(header.len()).min(size)];
        if slice.read_slice(&mut prefix, 0).is_ok() {
            patch_rom_ids(&mut prefix, vendor, device);
            let _ = slice.write_slice(&prefix, 0);
        }
    }

    /// The first `size` bytes (the image as loaded).
    fn image(&self, size: usize) -> Vec<u8> {
        let mut image = vec![0u8; size.min(self.0.size())];
        let _ = self.0.as_volatile_slice().read_slice(&mut image, 0);
        image
    }

    fn host_addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
}

impl MemoryRegionOps for RomBar {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let mut bytes = [0xffu8; 8];
        let n = size.min(8) as usize;
        if let Ok(offset) = usize::try_from(offset) {
            // The part inside the BAR; bytes past its end stay all ones.
            let inside = self.0.size().saturating_sub(offset).min(n);
            let _ = self.0.as_volatile_slice().read_slice(&mut bytes[..inside], offset);
        }
        let value = u64::from_le_bytes(bytes);
        if size >= 8 {
            value
        } else {
            value & ((1u64 << (8 * size)) - 1)
        }
    }
    fn write(&self, _offset: u64, _value: u64, _size: u32) {}
}

/// QEMU's `pci_patch_ids`: a default option ROM's PCI data structure ("PCIR") is made to
/// name the device's vendor and device IDs, and byte 6 (the etherboot checksum byte) is
/// adjusted so the image's byte sum does not change. Anything that is not a valid ROM
/// (no 0x55aa signature, no PCIR inside the image) is left alone.
fn patch_rom_ids(rom: &mut [u8], vendor: u16, device: u16) {
    if rom.len() < 0x1a || rom[0] != 0x55 || rom[1] != 0xaa {
        return;
    }
    let pcir = usize::from(u16::from_le_bytes([rom[0x18], rom[0x19]]));
    if pcir + 8 >= rom.len() || &rom[pcir..pcir + 4] != b"PCIR" {
        return;
    }
    for (at, id) in [(pcir + 4, vendor), (pcir + 6, device)] {
        let old = u16::from_le_bytes([rom[at], rom[at + 1]]);
        if old == id {
            continue;
        }
        let [o0, o1] = old.to_le_bytes();
        let [n0, n1] = id.to_le_bytes();
        rom[6] = rom[6]
            .wrapping_add(o0)
            .wrapping_add(o1)
            .wrapping_sub(n0)
            .wrapping_sub(n1);
        rom[at..at + 2].copy_from_slice(&id.to_le_bytes());
    }
}

/// Where firmware would place BARs: I/O from 0xc000, 32-bit memory from 0xfe000000 (both
/// in the PCI holes of the pc machine); BARs of 1 MiB and more (framebuffers) go below
/// 0xfe000000, each naturally aligned, down to 0xe0000000, the lowest the pc's RAM below
/// 4 GiB ends.
const BAR_IO_BASE: u64 = 0xc000;
const BAR_IO_LIMIT: u64 = 0x1_0000;
const BAR_MEM_BASE: u64 = 0xfe00_0000;
const BAR_MEM_LIMIT: u64 = 0xfec0_0000;
const BAR_LARGE_MEM_FLOOR: u64 = 0xe000_0000;
const BAR_LARGE: u64 = 1 << 20;

/// Assigns every BAR on `bus` an address and enables decoding, as firmware does before
/// the guest starts (test kernels do not program BARs; Linux keeps what it finds). An
/// expansion ROM gets an address with its decoding left off, as firmware leaves it after
/// running it.
pub fn pci_assign_bars(bus: &Object) {
    let mut next_io = BAR_IO_BASE;
    let mut next_mem = BAR_MEM_BASE;
    let mut large_top = BAR_MEM_BASE;
    for (_, dev) in pci_bus_devices(bus) {
        let sizes: Vec<(usize, BarKind, u64)> = dev
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
            let size = size.max(if kind == BarKind::Io { 4 } else { 16 });
            let addr = if kind == BarKind::Io {
                let addr = next_io.next_multiple_of(size);
                (addr + size <= BAR_IO_LIMIT).then(|| {
                    next_io = addr + size;
                    addr
                })
            } else if size >= BAR_LARGE {
                let addr = large_top.saturating_sub(size) & !(size - 1);
                (addr >= BAR_LARGE_MEM_FLOOR).then(|| {
                    large_top = addr;
                    addr
                })
            } else {
                let addr = next_mem.next_multiple_of(size);
                (addr + size <= BAR_MEM_LIMIT).then(|| {
                    next_mem = addr + size;
                    addr
                })
            };
            let Some(addr) = addr else {
                log::warn!(
                    "{}: no room for BAR {index} (0x{size:x} bytes)",
                    dev.object().type_name()
                );
                continue;
            };
            let offset = region_offset(index);
            let flags = match kind {
                _ if index == PCI_ROM_SLOT => 0,
                BarKind::Io => dev.read_config(offset, 4) & 0x3,
                _ => dev.read_config(offset, 4) & 0xf,
            };
            dev.config_set(offset, &(addr as u32 | flags).to_le_bytes());
            if kind.is_64bit() {
                dev.config_set(offset + 4, &((addr >> 32) as u32).to_le_bytes());
            }
            command |= if kind == BarKind::Io {
                config::COMMAND_IO
            } else {
                config::COMMAND_MEMORY
            };
        }
        let current = dev.read_config(config::COMMAND, 2) as u16;
        dev.write_config(config::COMMAND, u32::from(current | command), 2);
    }
}

#[cfg(test)]
mod rom_tests {
    use super::*;

    fn rom_with_pcir(vendor: u16, device: u16) -> Vec<u8> {
        let mut rom = vec![0u8; 512];
        rom[0] = 0x55;
        rom[1] = 0xaa;
        rom[0x18] = 0x40;
        rom[0x40..0x44].copy_from_slice(b"PCIR");
        rom[0x44..0x46].copy_from_slice(&vendor.to_le_bytes());
        rom[0x46..0x48].copy_from_slice(&device.to_le_bytes());
        rom[6] = 0x33;
        rom
    }

    fn sum(rom: &[u8]) -> u8 {
        rom.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn default_roms_name_the_device_and_keep_their_checksum() {
        let mut rom = rom_with_pcir(0x1013, 0x00b8);
        let before = sum(&rom);
        patch_rom_ids(&mut rom, 0x1234, 0x1111);
        assert_eq!(&rom[0x44..0x48], &[0x34, 0x12, 0x11, 0x11]);
        assert_eq!(sum(&rom), before);
    }

    #[test]
    fn images_without_a_pci_header_are_left_alone() {
        let mut rom = vec![0u8; 64];
        patch_rom_ids(&mut rom, 1, 2);
        assert!(rom.iter().all(|b| *b == 0));
        let mut rom = rom_with_pcir(1, 2);
        rom[0x18] = 0xff;
        rom[0x19] = 0x01;
        let copy = rom.clone();
        patch_rom_ids(&mut rom, 3, 4);
        assert_eq!(rom, copy, "PCIR offset outside the image");
    }

    #[test]
    fn the_rom_bar_reads_the_image_and_all_ones_past_it() {
        let dir = std::env::temp_dir().join(format!("qomvm-rombar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = |bytes: &[u8]| -> std::path::PathBuf {
            let path = dir.join(format!("{}.rom", bytes.len()));
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let rom = RomBar::load(&image(&[0x55, 0xaa, 0x10]), 3, 4096).unwrap();
        assert_eq!(rom.read(0, 2), 0xaa55);
        assert_eq!(rom.read(1, 4), 0xffff_10aa);
        assert_eq!(rom.read(4092, 4), 0xffff_ffff);
        assert_eq!(rom.image(3), [0x55, 0xaa, 0x10]);
        let full = RomBar::load(&image(&[0x11, 0x22, 0x33, 0x44]), 4, 4).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(full.read(2, 4), 0xffff_4433, "a read across the end keeps its inside bytes");
        assert_eq!(rom.read(4096, 1), 0xff);
        assert_eq!(rom.read(u64::MAX, 1), 0xff);
        // The accelerator maps this memory: it holds the padded image too.
        // SAFETY: 4096 bytes of the ROM's own mapping, alive as long as `rom`.
        let mapped = unsafe { std::slice::from_raw_parts(rom.host_addr() as *const u8, 4096) };
        assert_eq!(&mapped[..4], &[0x55, 0xaa, 0x10, 0xff]);
        assert!(mapped[3..].iter().all(|b| *b == 0xff));
        rom.write(0, 0, 1);
        assert_eq!(rom.read(0, 1), 0x55);
    }

    #[test]
    fn a_class_rom_in_the_bar_takes_the_devices_ids_in_place() {
        let mut image = vec![0u8; 0x100];
        image[..2].copy_from_slice(&[0x55, 0xaa]);
        image[0x18] = 0x40;
        image[0x40..0x48].copy_from_slice(b"PCIR\xf4\x1a\x00\x10");
        let path = std::env::temp_dir().join(format!("qomvm-rombar-ids-{}.rom", std::process::id()));
        std::fs::write(&path, &image).unwrap();
        let rom = RomBar::load(&path, image.len(), 0x100).unwrap();
        let _ = std::fs::remove_file(&path);
        rom.patch_ids(image.len(), 0x1af4, 0x1041);
        let mut expected = image.clone();
        patch_rom_ids(&mut expected, 0x1af4, 0x1041);
        assert_eq!(rom.image(image.len()), expected);
        assert_eq!(rom.read(0x46, 2), 0x1041);
        assert_ne!(rom.read(6, 1), 0, "the checksum byte makes up for the new id");
    }
}

#[cfg(test)]
mod addr_tests {
    use super::parse_addr;

    #[test]
    fn addresses_are_hex_with_or_without_0x_as_libvirt_writes_them() {
        assert_eq!(parse_addr("0x1.0x2"), Some(1 << 3 | 2));
        assert_eq!(parse_addr("1f.7"), Some(31 << 3 | 7));
        assert_eq!(parse_addr("0x3"), Some(3 << 3));
        assert_eq!(parse_addr("05.0"), Some(5 << 3));
        for bad in ["20", "1.8", "zz", "", "1.", "+1", "0x"] {
            assert_eq!(parse_addr(bad), None, "{bad}");
        }
    }
}
