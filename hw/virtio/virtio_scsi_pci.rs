//! `virtio-scsi-pci` (QEMU's `hw/virtio/virtio-scsi-pci.c`): the virtio SCSI host adapter
//! on the virtio-pci transport, with its bus `<id>.0` for `scsi-hd` units, as libvirt
//! writes it for `<controller type='scsi' model='virtio-scsi'>`:
//! `-device virtio-scsi-pci,id=scsi0,bus=pci.0,addr=0x5`. Units plug in and out while
//! the guest runs; the adapter's event queue tells the driver.

use std::sync::{Arc, OnceLock};

use qom::{type_init, Prop};

use crate::core::bus::{qbus_new, BusState};
use crate::core::hotplug::{HotplugError, HotplugHandler};
use crate::core::iothread::iothread_context;
use crate::core::qdev::{qdev_unplug_complete, DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::PciDeviceImpl;
use crate::scsi::scsi_bus::{ScsiBus, ScsiDevice, ScsiLuns, TYPE_SCSI_BUS};
use crate::scsi::virtio_scsi::{VirtioScsi, VirtioScsiConf, BUS_INFO};
use crate::virtio::virtio::{device_id, VirtioDevice};
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};

/// QEMU's `TYPE_VIRTIO_SCSI_PCI`.
pub const TYPE_VIRTIO_SCSI_PCI: &str = "virtio-scsi-pci";

/// QEMU's `VIRTQUEUE_MAX_SIZE`.
const VIRTQUEUE_MAX_SIZE: u16 = 1024;
/// QEMU's `VIRTIO_QUEUE_MAX` less the control and event queues.
const MAX_REQUEST_QUEUES: u16 = 1024 - 2;
/// `num_queues` unset: one per vCPU (QEMU's `VIRTIO_SCSI_AUTO_NUM_QUEUES`).
const AUTO_NUM_QUEUES: u16 = u16::MAX;

/// QEMU's `VirtIOSCSIPCI` with the `virtio-scsi-device` properties it aliases.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_SCSI_PCI, implements = [dyn HotplugHandler])]
pub struct VirtioScsiPci {
    #[parent]
    parent: VirtioPciProxy,
    #[property(name = "num_queues", default = AUTO_NUM_QUEUES, desc = "Request queues (default: one per vCPU)")]
    num_queues: Prop<u16>,
    #[property(name = "virtqueue_size", default = 256, desc = "Size of each queue")]
    virtqueue_size: Prop<u16>,
    #[property(default = 0xffffu32, desc = "Largest transfer in sectors the driver should send")]
    max_sectors: Prop<u32>,
    #[property(default = 128u32, desc = "Commands the driver may queue per LUN")]
    cmd_per_lun: Prop<u32>,
    #[property(default = true, desc = "Tell the driver of units plugged in or out")]
    hotplug: Prop<bool>,
    #[property(name = "param_change", default = true, desc = "Tell the driver of units whose parameters changed")]
    param_change: Prop<bool>,
    #[property(desc = "ID of the iothread serving requests (default: the main loop)")]
    iothread: Prop<Option<String>>,
    scsi: OnceLock<Arc<VirtioScsi>>,
}

type_init!(VirtioScsiPci);

/// Errors of `virtio-scsi-pci`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioScsiError {
    /// `num_queues=0` or too many.
    #[error("Invalid number of queues (= {0}), must be a positive integer less than {MAX_REQUEST_QUEUES}.")]
    NumQueues(u16),
    /// A queue size that is not a power of two, or too large.
    #[error("Invalid virtqueue_size (= {0}), must be a power of 2 between 4 and {VIRTQUEUE_MAX_SIZE}")]
    QueueSize(u16),
    /// `iothread=` names no iothread.
    #[error("Property 'virtio-scsi-device.iothread' can't find value '{0}'")]
    IothreadNotFound(String),
    /// The event loop or the bus could not be made.
    #[error("{0}")]
    Internal(String),
}

impl DeviceImpl for VirtioScsiPci {
    const CATEGORY: DeviceCategory = DeviceCategory::Storage;
    const DESCRIPTION: Option<&'static str> = Some("Virtio SCSI host adapter (PCI)");

    /// The transport's and the device's state (see `VirtioPciProxy::save_virtio_state`).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_virtio_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_virtio_state(state)
    }
}

/// QEMU's `virtio_scsi_hotplug` and `virtio_scsi_hotunplug`: a unit plugged while the
/// guest runs is announced on the event queue; one unplugged goes at once, announced too.
impl HotplugHandler for VirtioScsiPci {
    fn plug(&self, dev: &qom::Object, hotplugged: bool) -> Result<(), HotplugError> {
        if hotplugged {
            if let (Some(scsi), Some(addr)) = (self.scsi.get(), dev.downcast::<ScsiDevice>().and_then(ScsiDevice::address)) {
                scsi.notify_hotplug(addr, false);
            }
        }
        Ok(())
    }

    fn unplug_request(&self, dev: &qom::Object) -> Result<(), HotplugError> {
        let addr = dev.downcast::<ScsiDevice>().and_then(ScsiDevice::address);
        qdev_unplug_complete(dev);
        if let (Some(scsi), Some(addr)) = (self.scsi.get(), addr) {
            scsi.notify_hotplug(addr, true);
        }
        Ok(())
    }
}

impl PciDeviceImpl for VirtioScsiPci {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    /// Transitional virtio-scsi; a modern-only device presents 0x1048.
    const DEVICE_ID: u16 = 0x1004;
    /// Mass storage, SCSI controller.
    const CLASS_ID: u16 = 0x0100;
    const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    const SUBSYSTEM_ID: u16 = device_id::SCSI;
    const INTERRUPT_PIN: u8 = 1;
}

impl VirtioPciImpl for VirtioScsiPci {
    /// QEMU's `virtio_scsi_device_realize`: the adapter and its bus, `<id>.0`.
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let services = ctx.machine()?;
        let err = RealizeError::device;
        let num_queues = match self.num_queues.get() {
            AUTO_NUM_QUEUES => services.cpu_count().clamp(1, u32::from(MAX_REQUEST_QUEUES)) as u16,
            n if n == 0 || n > MAX_REQUEST_QUEUES => return Err(err(VirtioScsiError::NumQueues(n))),
            n => n,
        };
        let queue_size = self.virtqueue_size.get();
        if !queue_size.is_power_of_two() || !(4..=VIRTQUEUE_MAX_SIZE).contains(&queue_size) {
            return Err(err(VirtioScsiError::QueueSize(queue_size)));
        }
        let internal = |e: String| err(VirtioScsiError::Internal(e));
        let context = match self.iothread.get() {
            Some(id) => iothread_context(&id).ok_or(err(VirtioScsiError::IothreadNotFound(id)))?,
            None => services.try_main_context().map_err(|e| internal(e.to_string()))?,
        };
        let luns = Arc::new(ScsiLuns::default());
        let scsi = Arc::new(VirtioScsi::new(
            VirtioScsiConf {
                num_queues,
                queue_size,
                max_sectors: self.max_sectors.get(),
                cmd_per_lun: self.cmd_per_lun.get(),
                hotplug: self.hotplug.get(),
                param_change: self.param_change.get(),
                context,
            },
            luns.clone(),
        ));
        let bus_name = crate::scsi::scsi_bus::scsi_bus_name(self.parent.id());
        let bus = qbus_new(TYPE_SCSI_BUS, ctx.object(), &bus_name, services).map_err(|e| internal(e.to_string()))?;
        if let Some(bus) = bus.downcast::<ScsiBus>() {
            bus.set_adapter(BUS_INFO, &luns);
        }
        if let Some(bus) = bus.downcast::<BusState>() {
            bus.set_hotplug_handler(Some(ctx.object()));
        }
        let weak = Arc::downgrade(&scsi);
        luns.set_change(Box::new(move |addr, sense| {
            if let Some(scsi) = weak.upgrade() {
                scsi.notify_change(addr, sense);
            }
        }));
        let _ = self.scsi.set(scsi.clone());
        Ok(scsi)
    }
}
