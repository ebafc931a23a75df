//! `virtio-blk-pci` (QEMU's `hw/virtio/virtio-blk-pci.c`): a virtio block device on the
//! virtio-pci transport, with QEMU's properties (`drive`, `serial`, `num-queues`,
//! `queue-size`, `iothread`, ...). The seed's
//! `-device virtio-blk-pci,scsi=off,bus=pci.0,addr=0x4,drive=drive-virtio-disk0,id=virtio-disk0,bootindex=1`
//! is accepted as written.

use std::sync::Arc;

use qom::{type_init, Prop, Size};

use crate::block::virtio_blk::{VirtioBlk, VirtioBlkConf};
use crate::core::iothread::iothread_context;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::services::MachineServices;
use crate::pci::pci::PciDeviceImpl;
use crate::virtio::virtio::{device_id, VirtioDevice};
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};

/// QEMU's `TYPE_VIRTIO_BLK_PCI`.
pub const TYPE_VIRTIO_BLK_PCI: &str = "virtio-blk-pci";

/// QEMU's `VIRTQUEUE_MAX_SIZE`.
const VIRTQUEUE_MAX_SIZE: u16 = 1024;
/// QEMU's `VIRTIO_QUEUE_MAX` bounds `num-queues`.
const VIRTIO_QUEUE_MAX: u16 = 1024;
/// `num-queues` unset: one per vCPU (QEMU's `VIRTIO_BLK_AUTO_NUM_QUEUES`).
const AUTO_NUM_QUEUES: u16 = u16::MAX;

/// QEMU's `VirtIOBlkPCI` with the `virtio-blk-device` properties it aliases.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_BLK_PCI)]
pub struct VirtioBlkPci {
    #[parent]
    parent: VirtioPciProxy,
    #[property(desc = "Node name or ID of a block device to use as a backend")]
    drive: Prop<Option<String>>,
    #[property(desc = "Serial number GET_ID reports (at most 20 bytes are used)")]
    serial: Prop<Option<String>>,
    #[property(name = "num-queues", default = AUTO_NUM_QUEUES, desc = "Request queues (default: one per vCPU)")]
    num_queues: Prop<u16>,
    #[property(name = "queue-size", default = 256, desc = "Size of each request queue")]
    queue_size: Prop<u16>,
    #[property(name = "logical_block_size", default = Size(512), desc = "Logical block size of the disk")]
    logical_block_size: Prop<Size>,
    #[property(name = "physical_block_size", default = Size(512), desc = "Physical block size of the disk")]
    physical_block_size: Prop<Size>,
    #[property(default = true, desc = "Offer DISCARD requests")]
    discard: Prop<bool>,
    #[property(name = "write-zeroes", default = true, desc = "Offer WRITE_ZEROES requests")]
    write_zeroes: Prop<bool>,
    #[property(name = "config-wce", default = true, desc = "Let the driver switch the write cache")]
    config_wce: Prop<bool>,
    #[property(desc = "ID of the iothread serving requests (default: the main loop)")]
    iothread: Prop<Option<String>>,
    #[property(default = -1, desc = "Boot order of the disk (firmware)")]
    bootindex: Prop<i32>,
    #[property(default = false, desc = "SCSI passthrough (not with virtio 1.x)")]
    scsi: Prop<bool>,
}

type_init!(VirtioBlkPci);

/// Errors of `virtio-blk-pci`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioBlkError {
    /// No `drive=`.
    #[error("drive property not set")]
    NoDrive,
    /// `drive=` names no block backend.
    #[error("Property 'virtio-blk-device.drive' can't find value '{0}'")]
    DriveNotFound(String),
    /// `drive=` names a drive without a medium.
    #[error("Device needs media, but drive is empty")]
    NoMedium,
    /// `drive=` is attached to another device (the block layer's words, QEMU 7.2's).
    #[error("{0}")]
    DriveInUse(String),
    /// `iothread=` names no iothread.
    #[error("Property 'virtio-blk-device.iothread' can't find value '{0}'")]
    IothreadNotFound(String),
    /// The main loop could not start.
    #[error("cannot start the main event loop: {0}")]
    NoEventLoop(String),
    /// `num-queues=0`.
    #[error("num-queues property must be larger than 0")]
    NoQueues,
    /// Too many queues.
    #[error("num-queues property must be at most {VIRTIO_QUEUE_MAX}")]
    TooManyQueues,
    /// A queue size that is not a power of two or too large.
    #[error("invalid queue-size property ({0}), must be a power of 2 (max {VIRTQUEUE_MAX_SIZE})")]
    QueueSize(u16),
    /// Queues too small for a request.
    #[error("queue-size property must be larger than 2")]
    QueueTooSmall,
    /// `scsi=on`.
    #[error("Please set scsi=off for virtio-blk devices in order to use virtio 1.0")]
    Scsi,
    /// A block size that is not a power of two in 512..=2 MiB.
    #[error("Property virtio-blk-device.{name} doesn't take value {value} (must be a power of 2 between 512 and 2097152)")]
    BlockSize {
        /// The property.
        name: &'static str,
        /// Its value.
        value: u64,
    },
    /// The physical block is smaller than the logical one.
    #[error("physical_block_size ({physical}) must not be smaller than logical_block_size ({logical})")]
    PhysicalSmaller {
        /// `physical_block_size`.
        physical: u64,
        /// `logical_block_size`.
        logical: u64,
    },
}

fn block_size(name: &'static str, value: u64) -> Result<u32, VirtioBlkError> {
    if value.is_power_of_two() && (512..=2 * 1024 * 1024).contains(&value) {
        Ok(value as u32)
    } else {
        Err(VirtioBlkError::BlockSize { name, value })
    }
}

impl DeviceImpl for VirtioBlkPci {
    const CATEGORY: DeviceCategory = DeviceCategory::Storage;
    const DESCRIPTION: Option<&'static str> = Some("Virtio block device (PCI)");

    /// The transport's and the device's state (see `VirtioPciProxy::save_virtio_state`).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_virtio_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_virtio_state(state)
    }

    /// QEMU's `virtio_blk_device_unrealize` with `blockdev_mark_auto_del`: a `-drive`
    /// (or `drive_add`) goes with its device; a `-blockdev` node stays for `blockdev-del`.
    fn unrealize(&self, ctx: &DeviceContext) {
        DeviceImpl::unrealize(&self.parent, ctx);
        let Some(backend) = self.drive.get().and_then(|name| block::find_backend(&name)) else {
            return;
        };
        backend.detach_dev();
        if backend.is_blk_owned() {
            block::remove_backend(&backend);
        }
    }
}

impl PciDeviceImpl for VirtioBlkPci {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    /// Transitional virtio-blk; a modern-only device presents 0x1042.
    const DEVICE_ID: u16 = 0x1001;
    /// Mass storage, SCSI controller (QEMU's `PCI_CLASS_STORAGE_SCSI`).
    const CLASS_ID: u16 = 0x0100;
    const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    const SUBSYSTEM_ID: u16 = device_id::BLOCK;
    const INTERRUPT_PIN: u8 = 1;
}

impl VirtioPciImpl for VirtioBlkPci {
    /// QEMU's `virtio_blk_device_realize`: checks the properties, claims the drive.
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let services = ctx.machine()?;
        let conf = self
            // QEMU attaches the drive to the proxy's `virtio-backend` child, whose path
            // query-block and query-blockstats report as `qdev` (libvirt finds a disk's
            // statistics by it).
            .conf(
                services,
                ctx.object()
                    .canonical_path()
                    .map(|p| format!("{p}/virtio-backend")),
            )
            .map_err(RealizeError::device)?;
        let blk = Arc::new(VirtioBlk::new(conf));
        blk.watch_resize();
        Ok(blk)
    }
}

impl VirtioBlkPci {
    fn conf(
        &self,
        services: &MachineServices,
        path: Option<String>,
    ) -> Result<VirtioBlkConf, VirtioBlkError> {
        if self.scsi.get() {
            return Err(VirtioBlkError::Scsi);
        }
        let drive = self.drive.get().ok_or(VirtioBlkError::NoDrive)?;
        let backend = block::find_backend(&drive).ok_or_else(|| match block::is_empty_drive(&drive) {
            true => VirtioBlkError::NoMedium,
            false => VirtioBlkError::DriveNotFound(drive.clone()),
        })?;
        let num_queues = match self.num_queues.get() {
            AUTO_NUM_QUEUES => services
                .cpu_count()
                .clamp(1, u32::from(VIRTIO_QUEUE_MAX)) as u16,
            0 => return Err(VirtioBlkError::NoQueues),
            n if n > VIRTIO_QUEUE_MAX => return Err(VirtioBlkError::TooManyQueues),
            n => n,
        };
        let queue_size = self.queue_size.get();
        if queue_size <= 2 {
            return Err(VirtioBlkError::QueueTooSmall);
        }
        if !queue_size.is_power_of_two() || queue_size > VIRTQUEUE_MAX_SIZE {
            return Err(VirtioBlkError::QueueSize(queue_size));
        }
        let logical = block_size("logical_block_size", self.logical_block_size.get().0)?;
        let physical = block_size("physical_block_size", self.physical_block_size.get().0)?;
        if physical < logical {
            return Err(VirtioBlkError::PhysicalSmaller {
                physical: physical.into(),
                logical: logical.into(),
            });
        }
        let context = match self.iothread.get() {
            Some(id) => iothread_context(&id).ok_or(VirtioBlkError::IothreadNotFound(id))?,
            None => services
                .try_main_context()
                .map_err(|e| VirtioBlkError::NoEventLoop(e.to_string()))?,
        };
        if let Err(e) = backend.attach_dev(&path.unwrap_or_default()) {
            return Err(VirtioBlkError::DriveInUse(e.to_string()));
        }
        Ok(VirtioBlkConf {
            backend,
            serial: self.serial.get(),
            num_queues,
            queue_size,
            logical_block_size: logical,
            physical_block_size: physical,
            discard: self.discard.get(),
            write_zeroes: self.write_zeroes.get(),
            config_wce: self.config_wce.get(),
            context,
        })
    }
}
