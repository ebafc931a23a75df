//! `virtio-serial-pci` (QEMU's `hw/virtio/virtio-serial-pci.c`): the virtio console device
//! with its port bus on the virtio-pci transport, as libvirt writes it for a guest agent
//! channel: `-device virtio-serial-pci,id=virtio-serial0,bus=pci.0,addr=0x5` and then
//! `-device virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,
//! name=org.qemu.guest_agent.0`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use qom::{type_init, Prop};

use crate::core::bus::qbus_new;
use crate::core::hotplug::{HotplugError, HotplugHandler};
use crate::core::qdev::{qdev_unplug_complete, DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::PciDeviceImpl;
use crate::virtio::virtio::{device_id, VirtioDevice};
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};
use crate::virtio::virtio_serial::{VirtioSerial, VirtioSerialBus, TYPE_VIRTIO_SERIAL_BUS};

/// QEMU's `TYPE_VIRTIO_SERIAL_PCI`.
pub const TYPE_VIRTIO_SERIAL_PCI: &str = "virtio-serial-pci";

/// QEMU's `VirtIOSerialPCI` with the `virtio-serial-device` properties it aliases.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_SERIAL_PCI, implements = [dyn HotplugHandler])]
pub struct VirtioSerialPci {
    #[parent]
    parent: VirtioPciProxy,
    #[property(default = 31u32, desc = "Most ports the device takes (1 to 511)")]
    max_ports: Prop<u32>,
    #[property(name = "emergency-write", default = true, desc = "Offer the emergency write register")]
    emergency_write: Prop<bool>,
    serial: OnceLock<Arc<VirtioSerial>>,
}

type_init!(VirtioSerialPci);

/// QEMU's `VIRTIO_QUEUE_MAX / 2 - 1`: two queues a port, and the control pair.
const MAX_PORTS: u32 = 511;

/// QEMU numbers the buses of devices without an id `virtio-serial-bus.N`.
static AUTOMATIC_BUS_IDS: AtomicU32 = AtomicU32::new(0);

/// Errors of `virtio-serial-pci`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioSerialError {
    /// `max_ports=0`.
    #[error("Maximum number of serial ports not specified")]
    NoPorts,
    /// More ports than virtio's 1024 queues allow.
    #[error("maximum ports supported: {MAX_PORTS}")]
    TooManyPorts,
    /// The event loop or the bus could not be made.
    #[error("{0}")]
    Internal(String),
}

impl DeviceImpl for VirtioSerialPci {
    const CATEGORY: DeviceCategory = DeviceCategory::Input;
    const DESCRIPTION: Option<&'static str> = Some("Virtio serial (PCI)");

    /// The transport's and the device's state (see `VirtioPciProxy::save_virtio_state`).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_virtio_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_virtio_state(state)
    }
}

/// QEMU's `virtser_port_device_plug` and `qdev_simple_device_unplug_cb`: a port's realize
/// already announced it (`PORT_ADD`); unplugging one removes it at once (`PORT_REMOVE`).
impl HotplugHandler for VirtioSerialPci {
    /// Only ports plug into the bus (its type says so).
    fn plug(&self, _dev: &qom::Object, _hotplugged: bool) -> Result<(), HotplugError> {
        Ok(())
    }

    fn unplug_request(&self, dev: &qom::Object) -> Result<(), HotplugError> {
        qdev_unplug_complete(dev);
        Ok(())
    }
}

impl PciDeviceImpl for VirtioSerialPci {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    /// Transitional virtio console (QEMU's `PCI_DEVICE_ID_VIRTIO_CONSOLE`).
    const DEVICE_ID: u16 = 0x1003;
    /// QEMU's `PCI_CLASS_COMMUNICATION_OTHER`.
    const CLASS_ID: u16 = 0x0780;
    const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    const SUBSYSTEM_ID: u16 = device_id::CONSOLE;
    const INTERRUPT_PIN: u8 = 1;
}

impl VirtioPciImpl for VirtioSerialPci {
    /// QEMU's `virtio_serial_device_realize`: the device and its port bus, `<id>.0`.
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let services = ctx.machine()?;
        let max_ports = self.max_ports.get();
        if max_ports == 0 {
            return Err(RealizeError::device(VirtioSerialError::NoPorts));
        }
        if max_ports > MAX_PORTS {
            return Err(RealizeError::device(VirtioSerialError::TooManyPorts));
        }
        let internal = |e: String| RealizeError::device(VirtioSerialError::Internal(e));
        let context = services.try_main_context().map_err(|e| internal(e.to_string()))?;
        let serial = VirtioSerial::new(max_ports, self.emergency_write.get(), context);
        let bus_name = match self.parent.id() {
            Some(id) => format!("{id}.0"),
            None => format!(
                "{TYPE_VIRTIO_SERIAL_BUS}.{}",
                AUTOMATIC_BUS_IDS.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let bus = qbus_new(TYPE_VIRTIO_SERIAL_BUS, ctx.object(), &bus_name, services)
            .map_err(|e| internal(e.to_string()))?;
        if let Some(bus) = bus.downcast::<VirtioSerialBus>() {
            bus.set_serial(&serial);
        }
        // QEMU's virtio_serial_device_realize: the device plugs ports into its own bus,
        // while the guest runs too.
        if let Some(bus) = bus.downcast::<crate::core::bus::BusState>() {
            bus.set_hotplug_handler(Some(ctx.object()));
        }
        let _ = self.serial.set(serial.clone());
        Ok(serial)
    }

    /// QEMU: one vector per port plus one.
    fn default_vectors(&self, _device: &dyn VirtioDevice) -> u32 {
        self.max_ports.get() + 1
    }
}
