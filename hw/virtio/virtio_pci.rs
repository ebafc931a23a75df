//! The virtio-pci transport (QEMU's `hw/virtio/virtio-pci.c`): the abstract `virtio-pci`
//! PCI device that carries one virtio device.
//!
//! As on QEMU's pc machine, a device is transitional by default: BAR 0 holds the legacy
//! (virtio 0.9.5) I/O registers, BAR 1 the MSI-X table and PBA, BAR 4 the virtio 1.x
//! ("modern") structures that vendor capabilities point to: common configuration at
//! 0x0000, ISR at 0x1000, device configuration at 0x2000, notifications at 0x3000 (queue
//! n at 4 * n). Notifications are ioeventfds, so a kick costs the vCPU no exit to
//! userspace; interrupts are MSI-X vectors through irqfd, or INTx with the ISR register.
//!
//! A subtype (`virtio-blk-pci`) implements [`VirtioPciImpl`] to build its
//! [`VirtioDevice`] from its properties at realize.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::{type_init, ClassInitFor, ImplCast, Object, ObjectClass, Prop};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::core::memory::{MemoryRegion, MemoryRegionOps, RegionEventFd};
use crate::core::qdev::{DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::ChangeHandlerId;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::qdev_properties::OnOffAuto;
use crate::core::services::MachineServices;
use crate::pci::msix::Msix;
use crate::pci::pci::{
    pci_device_class_use_ops_of, BarKind, IntxPin, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE,
};
use crate::virtio::virtio::{
    bit, feature, feature_word, status, ActiveQueue, Activation, IrqfdSink, QueuePosition,
    RateLimitedLog, VirtioDevice, VirtioTransport, VIRTIO_NO_VECTOR,
};

use crate::core::accel_ops::EventFd;

/// QEMU's `TYPE_VIRTIO_PCI`.
pub const TYPE_VIRTIO_PCI: &str = "virtio-pci";

/// Red Hat's PCI vendor ID, which every virtio device uses.
pub const PCI_VENDOR_ID_REDHAT_QUMRANET: u16 = 0x1af4;
/// Device IDs of virtio 1.x-only devices start here (plus the virtio device ID).
const PCI_DEVICE_ID_VIRTIO_MODERN_BASE: u16 = 0x1040;

/// The legacy I/O BAR.
const LEGACY_BAR: usize = 0;
/// The MSI-X BAR of [`ModernLayout::DEFAULT`] (tests).
#[cfg(test)]
const MSIX_BAR: u8 = 1;
/// The modern BAR of [`ModernLayout::DEFAULT`] (tests).
#[cfg(test)]
const MODERN_BAR: usize = 4;

/// Offsets of the structures in the modern BAR, each 4 KiB (QEMU's layout).
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const REGION_SIZE: u64 = 0x1000;
const MODERN_BAR_SIZE: u64 = 0x4000;

/// Where a device's MSI-X table and virtio 1.x structures are (QEMU's
/// `msix_bar_idx`/`modern_mem_bar_idx` and the regions' offsets and sizes in
/// `VirtIOPCIProxy`). The BAR is [`MODERN_BAR_SIZE`] long; the device configuration and
/// the notifications take 4 KiB each at 0x2000 and 0x3000 in every layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModernLayout {
    /// The BAR of the modern structures.
    pub bar: u8,
    /// The BAR of the MSI-X table and PBA.
    pub msix_bar: u8,
    /// Common configuration: offset and size.
    pub common: (u64, u64),
    /// The ISR: offset and size.
    pub isr: (u64, u64),
}

impl ModernLayout {
    /// QEMU's for every device but the VGAs: MSI-X in BAR 1, the structures in BAR 4 at
    /// 0x0000 (common), 0x1000 (ISR), 0x2000, 0x3000.
    pub const DEFAULT: ModernLayout = ModernLayout {
        bar: 4,
        msix_bar: 1,
        common: (COMMON_OFFSET, REGION_SIZE),
        isr: (ISR_OFFSET, REGION_SIZE),
    };

    /// QEMU's `virtio_vga_base_realize`: the structures in BAR 2, where a std VGA has its
    /// registers, moved to the BAR's end with common configuration and ISR halved (2 KiB
    /// each at 0x1000 and 0x1800), so the first 4 KiB are free for the VGA's; MSI-X in
    /// BAR 4.
    pub const VGA: ModernLayout = ModernLayout {
        bar: 2,
        msix_bar: 4,
        common: (0x1000, REGION_SIZE / 2),
        isr: (0x1800, REGION_SIZE / 2),
    };
}

/// Bytes between two queues' notification addresses.
const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// Vendor capability types (virtio 1.2, 4.1.4).
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
/// `VIRTIO_PCI_CAP_PCI_CFG`: a window onto the modern BAR through configuration space,
/// for drivers that cannot map it (firmware in 32-bit mode, and iPXE, which refuses a
/// device without it).
const CAP_PCI_CFG: u8 = 5;
/// Where in that capability the BAR, offset, length and data window are.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;
/// PCI capability ID of vendor-specific capabilities.
const PCI_CAP_ID_VNDR: u8 = 0x09;

/// `struct virtio_pci_common_cfg` offsets.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_AVAIL_LO: u64 = 0x28;
    pub const QUEUE_AVAIL_HI: u64 = 0x2c;
    pub const QUEUE_USED_LO: u64 = 0x30;
    pub const QUEUE_USED_HI: u64 = 0x34;
}

/// Legacy (virtio 0.9.5) I/O register offsets.
mod legacy {
    pub const HOST_FEATURES: u64 = 0x00;
    pub const GUEST_FEATURES: u64 = 0x04;
    pub const QUEUE_PFN: u64 = 0x08;
    pub const QUEUE_NUM: u64 = 0x0c;
    pub const QUEUE_SEL: u64 = 0x0e;
    pub const QUEUE_NOTIFY: u64 = 0x10;
    pub const STATUS: u64 = 0x12;
    pub const ISR: u64 = 0x13;
    /// With MSI-X enabled only.
    pub const MSI_CONFIG_VECTOR: u64 = 0x14;
    /// With MSI-X enabled only.
    pub const MSI_QUEUE_VECTOR: u64 = 0x16;
    /// Device configuration without MSI-X.
    pub const CONFIG: u64 = 0x14;
    /// Device configuration with MSI-X.
    pub const CONFIG_MSIX: u64 = 0x18;
    /// Legacy rings are laid out with this alignment from the page number.
    pub const VRING_ALIGN: u64 = 4096;
    pub const PFN_SHIFT: u32 = 12;
}

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Errors of `virtio-pci` devices, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// Both modes disabled.
    #[error("device cannot work as neither modern nor legacy mode is enabled")]
    NoMode,
    /// More vectors than MSI-X allows.
    #[error("vectors={0} is out of range (at most 2048)")]
    TooManyVectors(u32),
}

/// A PCI device type carrying a virtio device (QEMU's `VirtioPCIClass`).
pub trait VirtioPciImpl: PciDeviceImpl {
    /// Builds the virtio device from the proxy's properties (QEMU's
    /// `VirtioPCIClass::realize`, which realizes the `virtio-*-device` child).
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError>;
    /// The number of MSI-X vectors when `vectors` is not given (QEMU: one per queue plus
    /// one for configuration changes).
    fn default_vectors(&self, device: &dyn VirtioDevice) -> u32 {
        device.queue_max_sizes().len() as u32 + 1
    }
    /// QEMU's `virtio_pci_force_virtio_1`: the device has no legacy interface (virtio
    /// 1.0 devices such as virtio-input), whatever the bus.
    const FORCE_VIRTIO_1: bool = false;
    /// Where the MSI-X table and the modern structures are.
    const LAYOUT: ModernLayout = ModernLayout::DEFAULT;
    /// What answers in the modern BAR below the common configuration, where
    /// [`VirtioPciImpl::LAYOUT`] leaves room (virtio-vga's VGA registers); called after
    /// [`VirtioPciImpl::create_virtio_device`].
    fn modern_bar_front(&self) -> Option<Arc<dyn MemoryRegionOps>> {
        None
    }
}

/// The dynamically dispatched half of [`VirtioPciImpl`].
pub trait VirtioPciOps: Send + Sync {
    /// [`VirtioPciImpl::create_virtio_device`].
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError>;
    /// [`VirtioPciImpl::default_vectors`].
    fn default_vectors(&self, device: &dyn VirtioDevice) -> u32;
    /// [`VirtioPciImpl::FORCE_VIRTIO_1`].
    fn force_virtio_1(&self) -> bool;
    /// [`VirtioPciImpl::LAYOUT`].
    fn layout(&self) -> ModernLayout;
    /// [`VirtioPciImpl::modern_bar_front`].
    fn modern_bar_front(&self) -> Option<Arc<dyn MemoryRegionOps>>;
}

impl<T: VirtioPciImpl> VirtioPciOps for T {
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        VirtioPciImpl::create_virtio_device(self, ctx)
    }
    fn default_vectors(&self, device: &dyn VirtioDevice) -> u32 {
        VirtioPciImpl::default_vectors(self, device)
    }
    fn force_virtio_1(&self) -> bool {
        T::FORCE_VIRTIO_1
    }
    fn layout(&self) -> ModernLayout {
        T::LAYOUT
    }
    fn modern_bar_front(&self) -> Option<Arc<dyn MemoryRegionOps>> {
        VirtioPciImpl::modern_bar_front(self)
    }
}

/// QEMU's `VirtioPCIClass` level: how to reach the subtype's [`VirtioPciOps`].
#[derive(Clone, Default)]
pub struct VirtioPciClass {
    ops: Option<ImplCast<dyn VirtioPciOps>>,
}

fn as_virtio_pci<T: VirtioPciImpl>(obj: &Object) -> Option<&(dyn VirtioPciOps + 'static)> {
    obj.cast::<T>().map(|d| d as &dyn VirtioPciOps)
}

/// `virtio-pci`'s class_init of each subtype: the PCI class from the subtype's header
/// constants, with `pci_realize`/`config_write` served by `virtio-pci` itself.
impl<T: VirtioPciImpl> ClassInitFor<T> for VirtioPciProxy {
    fn class_init(class: &mut ObjectClass) {
        <PciDevice as ClassInitFor<T>>::class_init(class);
        pci_device_class_use_ops_of::<VirtioPciProxy>(class);
        class.insert(VirtioPciClass {
            ops: Some(as_virtio_pci::<T>),
        });
    }
}

/// QEMU's `VirtIOPCIProxy`.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_PCI, abstract, class_level, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct VirtioPciProxy {
    #[parent]
    parent: PciDevice,
    #[property(name = "disable-legacy", default = OnOffAuto::Auto, desc = "Disable the legacy (virtio 0.9.5) interface: auto keeps it on conventional PCI")]
    disable_legacy: Prop<OnOffAuto>,
    #[property(name = "disable-modern", default = false, desc = "Disable the virtio 1.x interface")]
    disable_modern: Prop<bool>,
    #[property(default = u32::MAX, desc = "MSI-X vectors (default: one per queue plus one)")]
    vectors: Prop<u32>,
    #[property(default = true, desc = "Use ioeventfd for queue notifications")]
    ioeventfd: Prop<bool>,
    transport: OnceLock<Arc<VirtioPciTransport>>,
    /// Parks the device at a VM stop and resumes it at a start.
    change_handler: OnceLock<ChangeHandlerId>,
    /// Where the `VIRTIO_PCI_CAP_PCI_CFG` capability is (modern devices).
    pci_cfg_cap: OnceLock<usize>,
}

type_init!(VirtioPciProxy {
    class_init: Some(virtio_pci_base_class_init),
});

fn virtio_pci_base_class_init(class: &mut ObjectClass) {
    <PciDevice as ClassInitFor<VirtioPciProxy>>::class_init(class);
}

impl DeviceImpl for VirtioPciProxy {
    fn reset(&self) {
        if let Some(t) = self.transport.get() {
            t.reset();
            // QEMU's pci_do_device_reset -> msix_reset: MSI-X off, vectors masked, routes
            // released (a guest-written status 0 resets only the virtio device).
            if let Some(msix) = &t.msix {
                msix.reset();
            }
        }
        DeviceImpl::reset(&self.parent);
    }

    /// The BARs go first, then the transport stops for good: a vCPU that still reaches it
    /// through an old view of the address spaces cannot start the device again.
    fn unrealize(&self, ctx: &DeviceContext) {
        if let (Some(id), Ok(services)) = (self.change_handler.get(), ctx.machine()) {
            services.vm().remove_change_handler(*id);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
        if let Some(t) = self.transport.get() {
            // Under the transport's lock: a status write in progress finishes (and its
            // activation is undone by the reset below); none starts the device after.
            {
                let _st = t.state.lock();
                t.unplugged.store(true, Ordering::SeqCst);
            }
            t.reset();
            if let Some(msix) = &t.msix {
                msix.reset();
            }
        }
    }
}

impl PciDeviceImpl for VirtioPciProxy {
    /// QEMU's `virtio_pci_realize` + `virtio_pci_device_plugged`.
    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let ops = ctx
            .object()
            .class()
            .get::<VirtioPciClass>()
            .and_then(|c| c.ops)
            .and_then(|cast| cast(ctx.object()))
            .ok_or_else(|| RealizeError::device(VirtioPciError::NoMode))?;
        let device = ops.create_virtio_device(ctx)?;
        // QEMU's virtio_pci_force_virtio_1 overrides both properties, whatever they say.
        let legacy = match self.disable_legacy.get() {
            _ if ops.force_virtio_1() => false,
            OnOffAuto::On => false,
            // Conventional PCI (the pc machine's bus) keeps the legacy interface.
            OnOffAuto::Off | OnOffAuto::Auto => true,
        };
        let modern = ops.force_virtio_1() || !self.disable_modern.get();
        if !legacy && !modern {
            return Err(RealizeError::device(VirtioPciError::NoMode));
        }
        let vectors = match self.vectors.get() {
            u32::MAX => ops.default_vectors(&*device),
            n if n > 2048 => return Err(RealizeError::device(VirtioPciError::TooManyVectors(n))),
            n => n,
        };
        let services = ctx.machine()?;
        let layout = ops.layout();
        let front = ops.modern_bar_front();
        if !legacy {
            let id = PCI_DEVICE_ID_VIRTIO_MODERN_BASE + device.device_type();
            self.config_set(crate::pci::pci::config::DEVICE_ID, &id.to_le_bytes());
            self.config_set(crate::pci::pci::config::REVISION, &[1]);
        }
        let msix = if vectors > 0 {
            Some(Msix::init_exclusive_bar(
                &self.parent,
                vectors as u16,
                layout.msix_bar,
                services,
            )?)
        } else {
            None
        };
        let queue_sizes = device.queue_max_sizes();
        let kicks = queue_sizes
            .iter()
            .map(|_| {
                EventFd::new(libc::EFD_NONBLOCK)
                    .map(Arc::new)
                    .map_err(RealizeError::device)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let transport = Arc::new_cyclic(|this| VirtioPciTransport {
            unplugged: AtomicBool::new(false),
            this: this.clone(),
            name: ctx.type_name(),
            device: device.clone(),
            services: Arc::downgrade(services),
            msix: msix.clone(),
            intx: self.intx(),
            modern,
            layout,
            front,
            state: Mutex::new(TransportState::new(&queue_sizes)),
            queue_vectors: queue_sizes.iter().map(|_| AtomicU16::new(VIRTIO_NO_VECTOR)).collect(),
            config_vector: AtomicU16::new(VIRTIO_NO_VECTOR),
            isr: AtomicU8::new(0),
            irqfd_sinks: Mutex::new(vec![None; queue_sizes.len()]),
            kicks,
            guest_errors: RateLimitedLog::default(),
        });
        if let Some(msix) = &msix {
            let this = Arc::downgrade(&transport);
            msix.set_vector_listener(Box::new(move |vector, fd| {
                if let Some(t) = this.upgrade() {
                    t.vector_gate_changed(vector, fd);
                }
            }));
        }
        let use_ioeventfd = self.ioeventfd.get();
        if legacy {
            let size = (legacy::CONFIG_MSIX + device.config_size() as u64).next_power_of_two();
            // Legacy drivers write the queue's index to one register.
            let eventfds = transport.notify_eventfds(use_ioeventfd, |q| RegionEventFd {
                offset: legacy::QUEUE_NOTIFY,
                len: 2,
                datamatch: Some(q),
                fd: Arc::clone(&transport.kicks[q as usize]),
            });
            let region = MemoryRegion::new_io_with_eventfds(
                "virtio-pci",
                size,
                Arc::new(LegacyBar(transport.clone())),
                eventfds,
            );
            self.register_bar(LEGACY_BAR, BarKind::Io, region)?;
        }
        if modern {
            // Modern ones write anything to the queue's own address.
            let eventfds = transport.notify_eventfds(use_ioeventfd, |q| RegionEventFd {
                offset: NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * q,
                len: 0,
                datamatch: None,
                fd: Arc::clone(&transport.kicks[q as usize]),
            });
            let region = MemoryRegion::new_io_with_eventfds(
                "virtio-pci-modern",
                MODERN_BAR_SIZE,
                Arc::new(ModernBar(transport.clone())),
                eventfds,
            );
            self.register_bar(layout.bar.into(), BarKind::Mem32, region)?;
            self.add_modern_capabilities(layout, device.config_size() as u32)?;
        }
        // QEMU's virtio_vmstate_change: a stopped VM's devices touch no guest memory, and
        // a migration's destination starts its devices from the loaded rings.
        let weak = Arc::downgrade(&transport);
        let handler = services.vm().add_change_handler(
            CHANGE_HANDLER_PRIORITY,
            Arc::new(move |running, _| {
                if let Some(t) = weak.upgrade() {
                    if running {
                        t.resume();
                    } else {
                        t.park();
                    }
                }
            }),
        );
        let _ = self.change_handler.set(handler);
        let _ = self.transport.set(transport);
        Ok(())
    }

    fn config_write(&self, addr: usize, val: u32, len: usize) {
        if let Some(t) = self.transport.get() {
            if let Some(msix) = &t.msix {
                msix.config_write(addr, val, len);
            }
            // QEMU's virtio_write_config: a write to the window's data goes to the modern
            // BAR at the capability's offset, with its length.
            if let Some((offset, size, data)) = self.pci_cfg_access(addr, len) {
                ModernBar(t.clone()).write(offset, u64::from(data), size);
            }
        }
    }

    fn config_read(&self, addr: usize, len: usize) {
        // QEMU's virtio_read_config: a read of the window's data reads the modern BAR.
        if let (Some(t), Some((offset, size, _))) = (self.transport.get(), self.pci_cfg_access(addr, len)) {
            let value = ModernBar(t.clone()).read(offset, size) as u32;
            if let Some(&cap) = self.pci_cfg_cap.get() {
                self.parent.config_set(cap + PCI_CFG_DATA, &value.to_le_bytes()[..size as usize]);
            }
        }
    }
}

impl VirtioPciProxy {
    /// If a guest access of `len` bytes at `addr` touches the `VIRTIO_PCI_CAP_PCI_CFG`
    /// data window and the capability names a length of 1, 2 or 4: the BAR offset, the
    /// length and the window's data as it stands.
    fn pci_cfg_access(&self, addr: usize, len: usize) -> Option<(u64, u32, u32)> {
        let cap = *self.pci_cfg_cap.get()?;
        let data = cap + PCI_CFG_DATA;
        if addr >= data + 4 || addr + len <= data {
            return None;
        }
        let offset = self.parent.read_config(cap + PCI_CFG_OFFSET, 4);
        let size = self.parent.read_config(cap + PCI_CFG_LENGTH, 4);
        matches!(size, 1 | 2 | 4).then(|| {
            let value = self.parent.read_config(data, size as usize);
            (u64::from(offset), size, value)
        })
    }

    /// The virtio 1.x vendor capabilities pointing into the modern BAR.
    fn add_modern_capabilities(&self, layout: ModernLayout, device_config_size: u32) -> Result<(), RealizeError> {
        let caps: [(u8, u64, u32); 4] = [
            (CAP_COMMON_CFG, layout.common.0, layout.common.1 as u32),
            (CAP_ISR_CFG, layout.isr.0, layout.isr.1 as u32),
            (CAP_DEVICE_CFG, DEVICE_OFFSET, device_config_size.max(1)),
            (CAP_NOTIFY_CFG, NOTIFY_OFFSET, REGION_SIZE as u32),
        ];
        for (cfg_type, offset, length) in caps {
            let size = if cfg_type == CAP_NOTIFY_CFG { 20 } else { 16 };
            let at = self.add_capability(PCI_CAP_ID_VNDR, size)?;
            let mut body = vec![size as u8, cfg_type, layout.bar, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&length.to_le_bytes());
            if cfg_type == CAP_NOTIFY_CFG {
                body.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
            }
            self.config_set(at + 2, &body);
        }
        // The window: its BAR, offset, length and data are the driver's to write.
        let at = self.add_capability(PCI_CAP_ID_VNDR, 20)?;
        self.config_set(at + 2, &[20, CAP_PCI_CFG]);
        for byte in [at + PCI_CFG_BAR].into_iter().chain(at + PCI_CFG_OFFSET..at + PCI_CFG_DATA + 4) {
            self.config_set_wmask(byte, 0xff);
        }
        let _ = self.pci_cfg_cap.set(at);
        Ok(())
    }

    /// The transport, once realized (tests look at its state).
    pub fn device_status(&self) -> Option<u8> {
        self.transport.get().map(|t| t.state.lock().status)
    }

    fn realized_transport(&self) -> Result<&Arc<VirtioPciTransport>, VmStateError> {
        self.transport
            .get()
            .ok_or_else(|| VmStateError::Host("virtio-pci device is not realized".into()))
    }

    /// What every virtio-pci device migrates (QEMU's `virtio_save` with
    /// `virtio_pci_save_config`/`save_queue`): the configuration space, MSI-X, the
    /// transport's registers, the queues with where a parked device stopped, then the
    /// device's own state. The subtypes' `save_state` call it.
    pub fn save_virtio_state(&self) -> Result<VmStateSection, VmStateError> {
        let t = self.realized_transport()?;
        let mut s = VmStateSection::new(1);
        // The device's blocker first: a running device that cannot migrate says so, by
        // its type's name as QEMU's blockers do.
        t.device.save_device(&mut s).map_err(|e| match e {
            VmStateError::Unmigratable(why) => {
                log::debug!("{}: {why}", t.name);
                VmStateError::Unmigratable(t.name.to_string())
            }
            other => other,
        })?;
        self.parent.save_pci_state(&mut s);
        if let Some(msix) = &t.msix {
            msix.save_state(&mut s);
        }
        let st = t.state.lock();
        s.put("status", st.status);
        s.put("driver_features", st.driver_features);
        s.put("device_feature_select", st.device_feature_select);
        s.put("driver_feature_select", st.driver_feature_select);
        s.put("queue_select", st.queue_select);
        s.put("config_generation", st.config_generation);
        s.put("queues", &st.queues);
        s.put("positions", &st.parked);
        s.put("isr", t.isr.load(Ordering::Acquire));
        s.put("config_vector", t.config_vector.load(Ordering::Acquire));
        let vectors: Vec<u16> = t.queue_vectors.iter().map(|v| v.load(Ordering::Acquire)).collect();
        s.put("queue_vectors", vectors);
        Ok(s)
    }

    /// Loads what [`VirtioPciProxy::save_virtio_state`] saved into a device that has not
    /// run (a migration's destination). The device stays parked until the VM starts. A
    /// saved configuration this device cannot have (other queues, features it does not
    /// offer, vectors it lacks) is a mismatch, as in QEMU's `virtio_load`.
    pub fn load_virtio_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        s.check_version(1, 1)?;
        let t = self.realized_transport()?;
        let name = t.name;
        let mismatch = |what: String| VmStateError::Mismatch(format!("{name}: {what}"));
        let queues: Vec<QueueConfig> = s.get("queues")?;
        let status: u8 = s.get("status")?;
        let driver_features: u64 = s.get("driver_features")?;
        let parked: Option<Vec<QueuePosition>> = s.get("positions")?;
        let config_vector: u16 = s.get("config_vector")?;
        let queue_vectors: Vec<u16> = s.get("queue_vectors")?;
        {
            let st = t.state.lock();
            if queues.len() != st.queues.len() || queue_vectors.len() != st.queues.len() {
                return Err(mismatch(format!(
                    "{} queues saved, the device has {}",
                    queues.len(),
                    st.queues.len()
                )));
            }
            for (i, (saved, ours)) in queues.iter().zip(&st.queues).enumerate() {
                if saved.max_size != ours.max_size || saved.size > ours.max_size {
                    return Err(mismatch(format!(
                        "queue {i}: size {} of {} saved, the device's maximum is {}",
                        saved.size, saved.max_size, ours.max_size
                    )));
                }
            }
        }
        let unsupported = driver_features & !t.offered_features();
        if unsupported != 0 {
            return Err(mismatch(format!("Features 0x{unsupported:x} unsupported")));
        }
        let count = t.msix.as_ref().map_or(0, |m| m.vector_count());
        for v in queue_vectors.iter().chain(std::iter::once(&config_vector)) {
            if *v != VIRTIO_NO_VECTOR && *v >= count {
                return Err(mismatch(format!("vector {v} saved, the device has {count}")));
            }
        }
        if status & status::DRIVER_OK != 0 && status & status::DEVICE_NEEDS_RESET == 0 && parked.is_none() {
            return Err(mismatch("saved while it was running".into()));
        }
        self.parent.load_pci_state(s)?;
        if let Some(msix) = &t.msix {
            msix.load_state(s)?;
        }
        t.device.reset();
        t.device.load_device(s)?;
        let mut st = t.state.lock();
        st.status = status;
        st.driver_features = driver_features;
        st.device_feature_select = s.get("device_feature_select")?;
        st.driver_feature_select = s.get("driver_feature_select")?;
        st.queue_select = s.get("queue_select")?;
        st.config_generation = s.get("config_generation")?;
        st.queues = queues;
        st.active = false;
        st.parked = parked;
        t.isr.store(s.get("isr")?, Ordering::Release);
        t.config_vector.store(config_vector, Ordering::Release);
        for (slot, v) in t.queue_vectors.iter().zip(queue_vectors) {
            slot.store(v, Ordering::Release);
        }
        drop(st);
        t.refresh_irqfd_sinks();
        Ok(())
    }
}

/// Where virtio-pci devices' run-state handlers run: above the block layer's flush
/// (priority 0), which must come after the disks' devices went quiet.
const CHANGE_HANDLER_PRIORITY: i32 = 10;

/// One queue's registers as the driver programs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// The registers behind the lock (vCPU threads write them; I/O threads never touch them).
struct TransportState {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    /// Whether the device runs (`DRIVER_OK` reached and activation succeeded).
    active: bool,
    /// A device stopped with the VM: where its queues stand, to continue from at the
    /// next start (here, or on a migration's destination).
    parked: Option<Vec<QueuePosition>>,
}

impl TransportState {
    fn new(sizes: &[u16]) -> Self {
        TransportState {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: sizes.iter().map(|&s| QueueConfig::new(s)).collect(),
            active: false,
            parked: None,
        }
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }
}

/// The transport's state, shared by the BAR handlers and the device's interrupts.
pub struct VirtioPciTransport {
    /// The device was unplugged: the driver can no longer start it.
    unplugged: AtomicBool,
    this: Weak<VirtioPciTransport>,
    name: &'static str,
    device: Arc<dyn VirtioDevice>,
    services: Weak<MachineServices>,
    msix: Option<Arc<Msix>>,
    intx: Arc<IntxPin>,
    modern: bool,
    layout: ModernLayout,
    /// [`VirtioPciImpl::modern_bar_front`].
    front: Option<Arc<dyn MemoryRegionOps>>,
    state: Mutex<TransportState>,
    /// MSI-X vector of each queue, read on every interrupt without the lock.
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    kicks: Vec<Arc<EventFd>>,
    /// Per queue, the device's sink for the queue's direct interrupt path (vhost's call
    /// eventfd). Locked after `Msix::state`, never before it.
    irqfd_sinks: Mutex<Vec<Option<IrqfdSink>>>,
    guest_errors: RateLimitedLog,
}

impl VirtioPciTransport {
    /// The ioeventfds of a notification region: `at(queue)` for each queue, or none
    /// (`ioeventfd=off`).
    fn notify_eventfds(&self, enabled: bool, at: impl Fn(u64) -> RegionEventFd) -> Vec<RegionEventFd> {
        if !enabled {
            return Vec::new();
        }
        (0..self.kicks.len() as u64).map(at).collect()
    }

    fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.is_enabled())
    }

    /// The features the device offers through this interface.
    fn offered_features(&self) -> u64 {
        let features = self.device.device_features();
        if self.modern {
            features | bit(feature::VERSION_1)
        } else {
            features & !bit(feature::VERSION_1)
        }
    }

    fn interrupt(&self, vector: &AtomicU16, isr_bit: u8) {
        if self.msix_enabled() {
            let v = vector.load(Ordering::Acquire);
            if let Some(msix) = &self.msix {
                msix.notify(v);
            }
        } else {
            self.isr.fetch_or(isr_bit, Ordering::AcqRel);
            self.intx.set(true);
        }
    }

    fn read_isr(&self) -> u8 {
        let isr = self.isr.swap(0, Ordering::AcqRel);
        if !self.msix_enabled() {
            self.intx.set(false);
        }
        isr
    }

    fn notify_queue(&self, queue: u64) {
        // Without ioeventfd (or before it is registered) the write lands here.
        if let Some(kick) = self.kicks.get(queue as usize) {
            let _ = kick.write(1);
        } else {
            self.guest_errors
                .warn(|| format!("{}: notification of nonexistent queue {queue}", self.name));
        }
    }

    /// QEMU's `virtio_reset`: stops the device, forgets the driver's set-up.
    fn reset(&self) {
        self.device.reset();
        for kick in &self.kicks {
            crate::virtio::virtio::drain_kick(kick);
        }
        let mut st = self.state.lock();
        let sizes: Vec<u16> = st.queues.iter().map(|q| q.max_size).collect();
        *st = TransportState::new(&sizes);
        for v in &self.queue_vectors {
            v.store(VIRTIO_NO_VECTOR, Ordering::Release);
        }
        self.config_vector.store(VIRTIO_NO_VECTOR, Ordering::Release);
        self.isr.store(0, Ordering::Release);
        self.intx.set(false);
        drop(st);
        self.refresh_irqfd_sinks();
    }

    fn set_status(&self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut st = self.state.lock();
        if self.unplugged.load(Ordering::SeqCst) {
            return;
        }
        let old = st.status;
        let mut value = value;
        if self.modern && value & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.offered_features();
            let accepted = st.driver_features;
            if accepted & !offered != 0 || accepted & bit(feature::VERSION_1) == 0 {
                // Virtio 1.2, 3.1.1: the device leaves FEATURES_OK clear to refuse.
                value &= !status::FEATURES_OK;
            }
        }
        st.status = value | (old & status::DEVICE_NEEDS_RESET);
        if value & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && !st.active {
            st.parked = None;
            self.activate(&mut st, &[]);
        }
    }

    /// `DRIVER_OK`, or a VM start after a stop: hands the configured queues to the device,
    /// each from its `positions` entry if it has one, else from the start.
    fn activate(&self, st: &mut TransportState, positions: &[QueuePosition]) {
        let Some(services) = self.services.upgrade() else {
            return;
        };
        let Some(this) = self.this.upgrade() else {
            return;
        };
        let mem = services.ram();
        let features = st.driver_features & self.offered_features();
        let mut queues = Vec::new();
        for (index, q) in st.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let built = (|| -> Result<Queue, virtio_queue::Error> {
                let mut queue = Queue::new(q.max_size)?;
                queue.try_set_size(q.size)?;
                queue.try_set_desc_table_address(GuestAddress(q.desc))?;
                queue.try_set_avail_ring_address(GuestAddress(q.avail))?;
                queue.try_set_used_ring_address(GuestAddress(q.used))?;
                queue.set_event_idx(features & bit(feature::RING_EVENT_IDX) != 0);
                if let Some(p) = positions.iter().find(|p| usize::from(p.index) == index) {
                    queue.set_next_avail(p.next_avail);
                    queue.set_next_used(p.next_used);
                }
                queue.set_ready(true);
                Ok(queue)
            })();
            let resumed_ok = |queue: &Queue| {
                positions.is_empty() || self.check_resumed_ring(index, queue, &mem)
            };
            match built {
                Ok(queue) if queue.is_valid(&*mem) && resumed_ok(&queue) => queues.push(ActiveQueue {
                    index: index as u16,
                    queue,
                    kick: self.kicks[index].clone(),
                }),
                Ok(_) => {
                    self.guest_errors.warn(|| {
                        format!("{}: queue {index}: rings outside guest memory", self.name)
                    });
                    self.mark_broken_locked(st);
                    return;
                }
                Err(e) => {
                    self.guest_errors
                        .warn(|| format!("{}: queue {index}: {e}", self.name));
                    self.mark_broken_locked(st);
                    return;
                }
            }
        }
        let activation = Activation {
            mem,
            queues,
            transport: this,
            features,
            dirty: services.dirty_tracker().clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => st.active = true,
            Err(e) => {
                log::error!("{}: {e}", self.name);
                self.mark_broken_locked(st);
            }
        }
    }

    /// QEMU's `virtio_load` checks of a ring resumed from saved positions: the driver has
    /// at most a ring's worth of requests beyond them, and the used index in guest memory
    /// is the one the device last wrote. A ring failing them is broken.
    fn check_resumed_ring(&self, index: usize, queue: &Queue, mem: &vm_memory::GuestMemoryMmap) -> bool {
        let avail = queue.avail_idx(mem, Ordering::Acquire).map(|i| i.0);
        let used = mem
            .read_obj::<u16>(GuestAddress(queue.used_ring().wrapping_add(2)))
            .map(u16::from_le);
        match (avail, used) {
            (Ok(avail), Ok(used)) => {
                let outstanding = avail.wrapping_sub(queue.next_avail());
                if outstanding > queue.size() {
                    self.guest_errors.warn(|| {
                        format!(
                            "{}: queue {index}: {outstanding} requests outstanding on a ring of {}",
                            self.name,
                            queue.size()
                        )
                    });
                    return false;
                }
                if used != queue.next_used() {
                    // Either a device write escaped dirty tracking or the guest wrote its
                    // used ring itself: the device goes on from the index it saved, and a
                    // hostile guest gets a log line, not a panic.
                    self.guest_errors.warn(|| {
                        format!(
                            "{}: queue {index}: used index {used} in guest memory, {} saved",
                            self.name,
                            queue.next_used()
                        )
                    });
                }
                true
            }
            _ => false,
        }
    }

    /// The VM stops: the device finishes its requests and stops, and the used rings it
    /// wrote are sent again by a running migration. A device that cannot stop keeps running.
    fn park(&self) {
        // Not under `state`: the device's I/O handlers, which park waits for, may take it
        // (`mark_broken`). vCPUs are stopped, so no driver write races with this.
        if !self.state.lock().active {
            return;
        }
        let Some(positions) = self.device.park() else {
            return;
        };
        let mut st = self.state.lock();
        if let Some(services) = self.services.upgrade() {
            let dirty = services.dirty_tracker();
            for p in &positions {
                if let Some(q) = st.queues.get(usize::from(p.index)) {
                    // flags, idx, the ring and avail_event.
                    dirty.mark(q.used, 6 + 8 * u64::from(q.size));
                }
            }
        }
        st.active = false;
        st.parked = Some(positions);
    }

    /// The VM starts: a parked device continues from where its queues stood. Its eventfds
    /// may have missed kicks and the driver an interrupt (a fresh destination has neither),
    /// so each queue is kicked and interrupted once; both are harmless when spurious.
    fn resume(&self) {
        let mut st = self.state.lock();
        let Some(positions) = st.parked.take() else {
            return;
        };
        if st.status & status::DRIVER_OK == 0 || st.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        self.activate(&mut st, &positions);
        if !st.active {
            return;
        }
        drop(st);
        for p in &positions {
            if let Some(kick) = self.kicks.get(usize::from(p.index)) {
                let _ = kick.write(1);
            }
            self.signal_used_queue(p.index);
        }
    }

    fn mark_broken_locked(&self, st: &mut TransportState) {
        if st.status & status::DEVICE_NEEDS_RESET == 0 {
            st.status |= status::DEVICE_NEEDS_RESET;
            st.config_generation = st.config_generation.wrapping_add(1);
            self.interrupt(&self.config_vector, ISR_CONFIG);
        }
    }

    fn set_vector(&self, target: &AtomicU16, vector: u16) -> u16 {
        // QEMU's virtio_pci: a vector the table does not have reads back as NO_VECTOR.
        let count = self.msix.as_ref().map_or(0, |m| m.vector_count());
        let vector = if vector < count { vector } else { VIRTIO_NO_VECTOR };
        target.store(vector, Ordering::Release);
        vector
    }

    /// Queue `queue`'s MSI-X vector is now `vector` (the caller holds no lock of ours).
    fn set_queue_vector(&self, queue: usize, vector: u16) {
        if let Some(v) = self.queue_vectors.get(queue) {
            self.set_vector(v, vector);
            self.refresh_irqfd_sink(queue);
        }
    }

    /// Tells every queue's sink its vector's current direct path.
    fn refresh_irqfd_sinks(&self) {
        for queue in 0..self.queue_vectors.len() {
            self.refresh_irqfd_sink(queue);
        }
    }

    /// Tells queue `queue`'s sink, if it has one, its vector's current direct path.
    fn refresh_irqfd_sink(&self, queue: usize) {
        let Some(msix) = &self.msix else { return };
        msix.with_vector_gates(|gate| {
            let sinks = self.irqfd_sinks.lock();
            if let (Some(Some(sink)), Some(v)) = (sinks.get(queue), self.queue_vectors.get(queue)) {
                sink(gate(v.load(Ordering::Acquire)).as_ref());
            }
        });
    }

    /// The MSI-X listener: `vector`'s direct path changed, so the queues on it follow.
    fn vector_gate_changed(&self, vector: u16, fd: Option<&Arc<EventFd>>) {
        let sinks = self.irqfd_sinks.lock();
        for (sink, v) in sinks.iter().zip(&self.queue_vectors) {
            if let Some(sink) = sink {
                if v.load(Ordering::Acquire) == vector {
                    sink(fd);
                }
            }
        }
    }

    fn common_read(&self, offset: u64, size: u32) -> u64 {
        let mut st = self.state.lock();
        let value: u64 = match offset {
            common::DEVICE_FEATURE_SELECT => st.device_feature_select.into(),
            common::DEVICE_FEATURE => {
                feature_word(self.offered_features(), st.device_feature_select).into()
            }
            common::DRIVER_FEATURE_SELECT => st.driver_feature_select.into(),
            common::DRIVER_FEATURE => {
                feature_word(st.driver_features, st.driver_feature_select).into()
            }
            common::MSIX_CONFIG => self.config_vector.load(Ordering::Acquire).into(),
            common::NUM_QUEUES => st.queues.len() as u64,
            common::DEVICE_STATUS => st.status.into(),
            common::CONFIG_GENERATION => st.config_generation.into(),
            common::QUEUE_SELECT => st.queue_select.into(),
            _ => {
                let select = usize::from(st.queue_select);
                let vector = self
                    .queue_vectors
                    .get(select)
                    .map_or(VIRTIO_NO_VECTOR, |v| v.load(Ordering::Acquire));
                let Some(q) = st.selected() else {
                    return 0;
                };
                match offset {
                    common::QUEUE_SIZE => q.size.into(),
                    common::QUEUE_MSIX_VECTOR => vector.into(),
                    common::QUEUE_ENABLE => u64::from(q.enabled),
                    common::QUEUE_NOTIFY_OFF => select as u64,
                    common::QUEUE_DESC_LO => q.desc & 0xffff_ffff,
                    common::QUEUE_DESC_HI => q.desc >> 32,
                    common::QUEUE_AVAIL_LO => q.avail & 0xffff_ffff,
                    common::QUEUE_AVAIL_HI => q.avail >> 32,
                    common::QUEUE_USED_LO => q.used & 0xffff_ffff,
                    common::QUEUE_USED_HI => q.used >> 32,
                    _ => 0,
                }
            }
        };
        if size == 8 && matches!(offset, common::QUEUE_DESC_LO | common::QUEUE_AVAIL_LO | common::QUEUE_USED_LO) {
            let q = st.selected().copied();
            return q.map_or(0, |q| match offset {
                common::QUEUE_DESC_LO => q.desc,
                common::QUEUE_AVAIL_LO => q.avail,
                _ => q.used,
            });
        }
        value
    }

    fn common_write(&self, offset: u64, value: u64, size: u32) {
        if offset == common::DEVICE_STATUS {
            self.set_status(value as u8);
            return;
        }
        let mut st = self.state.lock();
        match offset {
            common::DEVICE_FEATURE_SELECT => st.device_feature_select = value as u32,
            common::DRIVER_FEATURE_SELECT => st.driver_feature_select = value as u32,
            common::DRIVER_FEATURE => {
                if st.status & status::FEATURES_OK == 0 {
                    let shift = match st.driver_feature_select {
                        0 => 0,
                        1 => 32,
                        _ => return,
                    };
                    let mask = 0xffff_ffffu64 << shift;
                    st.driver_features = (st.driver_features & !mask) | ((value & 0xffff_ffff) << shift);
                }
            }
            common::MSIX_CONFIG => {
                self.set_vector(&self.config_vector, value as u16);
            }
            common::QUEUE_SELECT => st.queue_select = value as u16,
            _ => {
                let select = usize::from(st.queue_select);
                let active = st.active;
                if offset == common::QUEUE_MSIX_VECTOR {
                    drop(st);
                    self.set_queue_vector(select, value as u16);
                    return;
                }
                let Some(q) = st.selected() else {
                    return;
                };
                // Once the device runs, its rings stay as activated (virtio 1.2, 4.1.4.3.2:
                // the driver must not change them).
                if active {
                    return;
                }
                let set_lo = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_ffff);
                let set_hi = |old: u64| (old & 0xffff_ffff) | ((value & 0xffff_ffff) << 32);
                match (offset, size) {
                    (common::QUEUE_SIZE, _) => {
                        let requested = value as u16;
                        // Sizes are powers of two no larger than the maximum (split rings).
                        if requested.is_power_of_two() && requested <= q.max_size {
                            q.size = requested;
                        }
                    }
                    (common::QUEUE_ENABLE, _) => q.enabled = value & 1 != 0,
                    (common::QUEUE_DESC_LO, 8) => q.desc = value,
                    (common::QUEUE_AVAIL_LO, 8) => q.avail = value,
                    (common::QUEUE_USED_LO, 8) => q.used = value,
                    (common::QUEUE_DESC_LO, _) => q.desc = set_lo(q.desc),
                    (common::QUEUE_DESC_HI, _) => q.desc = set_hi(q.desc),
                    (common::QUEUE_AVAIL_LO, _) => q.avail = set_lo(q.avail),
                    (common::QUEUE_AVAIL_HI, _) => q.avail = set_hi(q.avail),
                    (common::QUEUE_USED_LO, _) => q.used = set_lo(q.used),
                    (common::QUEUE_USED_HI, _) => q.used = set_hi(q.used),
                    _ => {}
                }
            }
        }
    }

    fn device_config_read(&self, offset: u64, size: u32) -> u64 {
        let mut data = [0u8; 8];
        let size = (size as usize).min(8);
        self.device.read_config(offset, &mut data[..size]);
        u64::from_le_bytes(data)
    }

    fn device_config_write(&self, offset: u64, value: u64, size: u32) {
        let size = (size as usize).min(8);
        self.device.write_config(offset, &value.to_le_bytes()[..size]);
    }

    fn legacy_read(&self, offset: u64, size: u32) -> u64 {
        let config = if self.msix_enabled() {
            legacy::CONFIG_MSIX
        } else {
            legacy::CONFIG
        };
        if offset >= config {
            return self.device_config_read(offset - config, size);
        }
        let mut st = self.state.lock();
        match offset {
            legacy::HOST_FEATURES => feature_word(self.offered_features(), 0).into(),
            legacy::GUEST_FEATURES => feature_word(st.driver_features, 0).into(),
            legacy::QUEUE_PFN => st.selected().map_or(0, |q| q.desc >> legacy::PFN_SHIFT),
            legacy::QUEUE_NUM => st.selected().map_or(0, |q| q.max_size.into()),
            legacy::QUEUE_SEL => st.queue_select.into(),
            legacy::STATUS => st.status.into(),
            legacy::ISR => {
                drop(st);
                self.read_isr().into()
            }
            legacy::MSI_CONFIG_VECTOR => self.config_vector.load(Ordering::Acquire).into(),
            legacy::MSI_QUEUE_VECTOR => self
                .queue_vectors
                .get(usize::from(st.queue_select))
                .map_or(VIRTIO_NO_VECTOR, |v| v.load(Ordering::Acquire))
                .into(),
            _ => 0,
        }
    }

    fn legacy_write(&self, offset: u64, value: u64, size: u32) {
        let config = if self.msix_enabled() {
            legacy::CONFIG_MSIX
        } else {
            legacy::CONFIG
        };
        if offset >= config {
            self.device_config_write(offset - config, value, size);
            return;
        }
        match offset {
            legacy::QUEUE_NOTIFY => self.notify_queue(value & 0xffff),
            legacy::STATUS => self.set_status(value as u8),
            legacy::MSI_CONFIG_VECTOR => {
                self.set_vector(&self.config_vector, value as u16);
            }
            legacy::MSI_QUEUE_VECTOR => {
                let select = usize::from(self.state.lock().queue_select);
                self.set_queue_vector(select, value as u16);
            }
            legacy::GUEST_FEATURES => {
                let mut st = self.state.lock();
                if st.status & status::DRIVER_OK == 0 {
                    st.driver_features = value & 0xffff_ffff & self.offered_features();
                }
            }
            legacy::QUEUE_SEL => self.state.lock().queue_select = value as u16,
            legacy::QUEUE_PFN => {
                let pfn = value & 0xffff_ffff;
                if pfn == 0 {
                    // Writing 0 resets the device (virtio 0.9.5).
                    self.reset();
                    return;
                }
                let mut st = self.state.lock();
                if st.active {
                    return;
                }
                if let Some(q) = st.selected() {
                    let size = u64::from(q.max_size);
                    q.size = q.max_size;
                    q.desc = pfn << legacy::PFN_SHIFT;
                    q.avail = q.desc + 16 * size;
                    q.used = (q.avail + 4 + 2 * size + 2).next_multiple_of(legacy::VRING_ALIGN);
                    q.enabled = true;
                }
            }
            _ => {
                self.guest_errors.warn(|| {
                    format!(
                        "{}: write of 0x{value:x} to read-only legacy register 0x{offset:x}",
                        self.name
                    )
                });
            }
        }
    }
}

impl VirtioTransport for VirtioPciTransport {
    fn signal_used_queue(&self, queue: u16) {
        if let Some(v) = self.queue_vectors.get(usize::from(queue)) {
            self.interrupt(v, ISR_QUEUE);
        }
    }

    fn signal_config(&self) {
        {
            let mut st = self.state.lock();
            st.config_generation = st.config_generation.wrapping_add(1);
        }
        self.interrupt(&self.config_vector, ISR_CONFIG);
    }

    fn mark_broken(&self) {
        let mut st = self.state.lock();
        self.mark_broken_locked(&mut st);
    }

    fn set_queue_irqfd_sink(&self, queue: u16, sink: Option<IrqfdSink>) {
        let queue = usize::from(queue);
        let set = sink.is_some();
        if let Some(slot) = self.irqfd_sinks.lock().get_mut(queue) {
            *slot = sink;
        }
        if set {
            self.refresh_irqfd_sink(queue);
        }
    }
}

/// BAR 0: the legacy registers.
struct LegacyBar(Arc<VirtioPciTransport>);

impl MemoryRegionOps for LegacyBar {
    fn read(&self, offset: u64, size: u32) -> u64 {
        self.0.legacy_read(offset, size)
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        self.0.legacy_write(offset, value, size)
    }
}

/// The modern BAR (BAR 4 or, for the VGAs, 2): the structures of its [`ModernLayout`].
struct ModernBar(Arc<VirtioPciTransport>);

impl MemoryRegionOps for ModernBar {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let t = &self.0;
        let (common, isr) = (t.layout.common, t.layout.isr);
        match offset {
            o if o < common.0 => t.front.as_ref().map_or(0, |f| f.read(o, size)),
            o if o < common.0 + common.1 => t.common_read(o - common.0, size),
            o if o == isr.0 => t.read_isr().into(),
            DEVICE_OFFSET..NOTIFY_OFFSET => t.device_config_read(offset - DEVICE_OFFSET, size),
            _ => 0,
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let t = &self.0;
        let common = t.layout.common;
        match offset {
            o if o < common.0 => {
                if let Some(front) = &t.front {
                    front.write(o, value, size)
                }
            }
            o if o < common.0 + common.1 => t.common_write(o - common.0, value, size),
            DEVICE_OFFSET..NOTIFY_OFFSET => {
                t.device_config_write(offset - DEVICE_OFFSET, value, size)
            }
            NOTIFY_OFFSET..MODERN_BAR_SIZE => {
                let rel = offset - NOTIFY_OFFSET;
                if rel.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) {
                    t.notify_queue(rel / u64::from(NOTIFY_OFF_MULTIPLIER));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::accel_ops::MsiMessage;
    use crate::core::bus::qbus_new;
    use crate::core::qdev::{qdev_new, qdev_realize};
    use crate::pci::msix::tests::RecordingOps;
    use crate::pci::msix::{PCI_MSIX_ENTRY_SIZE, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE};
    use crate::pci::pci::{pci_assign_bars, TYPE_PCI_BUS};
    use std::os::fd::AsRawFd;

    /// What the queue's sink was told, in order (`Some`: the eventfd's raw descriptor).
    type Told = Arc<Mutex<Vec<Option<i32>>>>;

    /// A queue's direct interrupt path follows both its vector's mask and the guest's
    /// choice of vector: a sink hears the vector's irqfd eventfd (the one KVM reads) once
    /// the queue is on an unmasked vector, `None` when the vector is masked or the queue
    /// moves to a masked one or to none, and nothing once cleared.
    #[test]
    fn a_queues_irqfd_sink_follows_its_vector() {
        let ops = Arc::new(RecordingOps::default());
        let services = Arc::new(MachineServices::default());
        services.vm().set_accel_ops(ops.clone()).unwrap();
        let parent = qom::object_new(qom::TYPE_CONTAINER).unwrap();
        let bus = qbus_new(TYPE_PCI_BUS, &parent, "pci.0", &services).unwrap();
        let dev = qdev_new("virtio-rng-pci").unwrap();
        dev.property_parse("disable-legacy", "on").unwrap();
        qdev_realize(&dev, Some(&bus)).unwrap();
        pci_assign_bars(&bus);
        let proxy = dev.cast::<VirtioPciProxy>().unwrap();
        let t = Arc::clone(proxy.transport.get().unwrap());
        let msix = Arc::clone(t.msix.as_ref().unwrap());
        let pci = dev.cast::<PciDevice>().unwrap();
        let mem = services.system_memory();
        let table = pci.bar_address(MSIX_BAR.into()).unwrap();
        let common = pci.bar_address(MODERN_BAR).unwrap() + COMMON_OFFSET;
        let set_masked = |v: u64, masked: bool| {
            mem.write(table + v * PCI_MSIX_ENTRY_SIZE + 12, u64::from(masked), 4);
        };
        let set_queue_vector = |v: u16| {
            mem.write(common + common::QUEUE_SELECT, 0, 2);
            mem.write(common + common::QUEUE_MSIX_VECTOR, u64::from(v), 2);
        };
        for v in 0..2u64 {
            mem.write(table + v * PCI_MSIX_ENTRY_SIZE, 0xfee0_0000, 8);
            mem.write(table + v * PCI_MSIX_ENTRY_SIZE + 8, 0x40 + v, 4);
        }
        let control = msix.capability() + PCI_MSIX_FLAGS;
        pci.write_config(control, u32::from(PCI_MSIX_FLAGS_ENABLE), 2);
        msix.config_write(control, u32::from(PCI_MSIX_FLAGS_ENABLE), 2);

        let told: Told = Arc::default();
        let log = Arc::clone(&told);
        t.set_queue_irqfd_sink(
            0,
            Some(Arc::new(move |fd: Option<&Arc<EventFd>>| {
                log.lock().push(fd.map(|f| f.as_raw_fd()))
            })),
        );
        let take = || std::mem::take(&mut *told.lock());
        assert_eq!(take(), [None], "told at once: no vector yet");
        set_masked(1, false);
        assert_eq!(take(), [], "vector 1 is not the queue's yet");
        set_queue_vector(1);
        let told_fd = take();
        let [Some(fd)] = told_fd[..] else {
            panic!("{told_fd:?}")
        };
        // The eventfd is vector 1's irqfd: a write raises its MSI.
        let gsi = ops
            .gsi_of(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41,
            })
            .unwrap();
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to an eventfd the transport keeps open.
        assert_eq!(unsafe { libc::write(fd, one.as_ptr().cast(), 8) }, 8);
        assert_eq!(ops.fired(gsi), 1);
        set_masked(1, true);
        assert_eq!(take(), [None]);
        set_masked(1, false);
        assert_eq!(take(), [Some(fd)]);
        // To a masked vector, to none, and back.
        set_queue_vector(0);
        assert_eq!(take(), [None]);
        set_queue_vector(VIRTIO_NO_VECTOR);
        assert_eq!(take(), [None]);
        set_queue_vector(1);
        assert_eq!(take(), [Some(fd)]);
        // MSI-X off: INTx, through signal_used_queue.
        pci.write_config(control, 0, 2);
        msix.config_write(control, 0, 2);
        assert_eq!(take(), [None]);
        pci.write_config(control, u32::from(PCI_MSIX_FLAGS_ENABLE), 2);
        msix.config_write(control, u32::from(PCI_MSIX_FLAGS_ENABLE), 2);
        assert_eq!(take().len(), 1);
        // Cleared: silence.
        t.set_queue_irqfd_sink(0, None);
        set_masked(1, true);
        set_queue_vector(0);
        assert_eq!(take(), []);
    }
}
