//! `virtio-balloon-pci` (QEMU's `hw/virtio/virtio-balloon-pci.c`): the memory balloon on
//! the virtio-pci transport. libvirt's `-device virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3`
//! is accepted as written. Besides the qdev properties (`deflate-on-oom`, `page-poison`),
//! the object has QEMU's `guest-stats-polling-interval` (seconds, settable at any time) and
//! `guest-stats` (read with `qom-get`).

use std::sync::Arc;

use qom::{type_init, ClassInitFor, ObjectClass, Prop, Property, PropertyKind, StateAccessor, Value};

use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::PciDeviceImpl;
use crate::virtio::virtio::{device_id, VirtioDevice};
use crate::virtio::virtio_balloon::{BalloonStats, VirtioBalloon, VirtioBalloonConf};
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};

/// QEMU's `TYPE_VIRTIO_BALLOON_PCI`.
pub const TYPE_VIRTIO_BALLOON_PCI: &str = "virtio-balloon-pci";

/// QEMU's `VirtIOBalloonPCI` with the `virtio-balloon-device` properties it aliases.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_BALLOON_PCI)]
pub struct VirtioBalloonPci {
    #[parent]
    parent: VirtioPciProxy,
    #[property(name = "deflate-on-oom", default = false, desc = "Let the guest deflate when it runs out of memory")]
    deflate_on_oom: Prop<bool>,
    #[property(name = "page-poison", default = true, desc = "Offer the page poison value")]
    page_poison: Prop<bool>,
    stats: Arc<BalloonStats>,
}

type_init!(VirtioBalloonPci {
    class_init: Some(virtio_balloon_pci_class_init),
});

static POLL_INTERVAL: StateAccessor<VirtioBalloonPci> = StateAccessor {
    get: |dev, _| Value::Int(dev.stats.poll_interval()),
    set: Some(|dev, _, value| {
        let Value::Int(v) = value else {
            return Ok(());
        };
        dev.stats.set_poll_interval(v).map_err(qom::Error::other)
    }),
};

static GUEST_STATS: StateAccessor<VirtioBalloonPci> = StateAccessor {
    // The structure itself is built by the monitor from `VirtioBalloonPci::stats`; a
    // property read through QOM's scalar values gets the time of the last update.
    get: |dev, _| Value::Int(dev.stats.guest_stats().1),
    set: None,
};

/// QEMU's `virtio_balloon_instance_init` adds the two object properties.
fn virtio_balloon_pci_class_init(class: &mut ObjectClass) {
    <VirtioPciProxy as ClassInitFor<VirtioBalloonPci>>::class_init(class);
    class.add_property(Property::state(
        "guest-stats-polling-interval",
        PropertyKind::Int(64),
        "Seconds between polls of the guest's statistics (0: none)",
        &POLL_INTERVAL,
    ));
    class.add_property(Property::state(
        "guest-stats",
        PropertyKind::Int(64),
        "The guest's memory statistics (qom-get)",
        &GUEST_STATS,
    ));
}

impl DeviceImpl for VirtioBalloonPci {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
    const DESCRIPTION: Option<&'static str> = Some("Virtio balloon (PCI)");

    /// The transport's and the device's state (see `VirtioPciProxy::save_virtio_state`).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_virtio_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_virtio_state(state)
    }
}

impl PciDeviceImpl for VirtioBalloonPci {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    /// Transitional virtio-balloon (QEMU's `PCI_DEVICE_ID_VIRTIO_BALLOON`).
    const DEVICE_ID: u16 = 0x1002;
    /// QEMU's `PCI_CLASS_OTHERS`.
    const CLASS_ID: u16 = 0x00ff;
    const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    const SUBSYSTEM_ID: u16 = device_id::BALLOON;
    const INTERRUPT_PIN: u8 = 1;
}

impl VirtioPciImpl for VirtioBalloonPci {
    /// QEMU's `virtio_balloon_device_realize`: registers the machine's balloon.
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let services = ctx.machine()?;
        let context = services.try_main_context().map_err(RealizeError::device)?;
        let device = VirtioBalloon::new(VirtioBalloonConf {
            deflate_on_oom: self.deflate_on_oom.get(),
            page_poison: self.page_poison.get(),
            balloon: services.balloon().clone(),
            ram_size: services.ram_size(),
            context,
            stats: self.stats.clone(),
        })
        .map_err(RealizeError::device)?;
        Ok(device)
    }
}

impl VirtioBalloonPci {
    /// The guest's statistics (`guest-stats`).
    pub fn stats(&self) -> &BalloonStats {
        &self.stats
    }
}
