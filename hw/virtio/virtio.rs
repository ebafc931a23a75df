//! virtio devices independent of their transport (QEMU's `hw/virtio/virtio.c`): the
//! status and feature bits, the [`VirtioDevice`] trait a device implements (QEMU's
//! `VirtioDeviceClass`), and the ring errors that make a device need a reset.
//!
//! A transport (virtio-pci) owns the registers the driver programs. When the driver sets
//! `DRIVER_OK` it hands the device its configured rings ([`ActiveQueue`]), each with the
//! eventfd the driver's notifications signal, and a [`VirtioTransport`] to interrupt the
//! driver through. Devices process rings on an I/O thread, never on a vCPU thread.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use crate::core::accel_ops::EventFd;
use crate::core::dirty_log::DirtyTracker;
use crate::core::vmstate::{VmStateError, VmStateSection};
pub use crate::core::log_limit::RateLimitedLog;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: the device may process queues.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Transport and ring feature bits (virtio 1.2, 6).
pub mod feature {
    /// Legacy: interrupt even when notifications are suppressed, once the ring is empty.
    pub const NOTIFY_ON_EMPTY: u32 = 24;
    /// Legacy: the device accepts any descriptor layout.
    pub const ANY_LAYOUT: u32 = 27;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event`/`avail_event` notification suppression.
    pub const RING_EVENT_IDX: u32 = 29;
    /// A virtio 1.x ("modern") device.
    pub const VERSION_1: u32 = 32;
}

/// The bit of feature `n`.
pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Device IDs (virtio 1.2, 5).
pub mod device_id {
    /// Network card.
    pub const NET: u16 = 1;
    /// Block device.
    pub const BLOCK: u16 = 2;
    /// Entropy source.
    pub const RNG: u16 = 4;
    /// Memory balloon.
    pub const BALLOON: u16 = 5;
}

/// QEMU's `VIRTIO_NO_VECTOR`: an interrupt that goes nowhere.
pub const VIRTIO_NO_VECTOR: u16 = 0xffff;

/// What the transport does for a device: interrupt the driver, or record that the device
/// needs a reset (QEMU's `virtio_notify`, `virtio_notify_config`, `virtio_error`).
pub trait VirtioTransport: Send + Sync {
    /// The device put buffers in used ring `queue`.
    fn signal_used_queue(&self, queue: u16);
    /// The device changed its configuration.
    fn signal_config(&self);
    /// The device cannot go on: sets `DEVICE_NEEDS_RESET` and tells the driver. The
    /// device stops processing until the driver resets it.
    fn mark_broken(&self);
    /// Offers `queue`'s interrupt as an eventfd a kernel worker can write itself (QEMU's
    /// guest notifiers with irqfd, as vhost uses them): `sink` is called with `Some(fd)`
    /// while a write of `fd` raises the queue's interrupt as `signal_used_queue` would,
    /// and with `None` while it does not (the worker's signals must then come through
    /// `signal_used_queue`); once when set, then at each change, until it is replaced or
    /// cleared (`None`). Calls are serialised; clearing waits for one in progress. A
    /// transport without such a path never calls it (this default).
    fn set_queue_irqfd_sink(&self, queue: u16, sink: Option<IrqfdSink>) {
        let _ = (queue, sink);
    }
}

/// What [`VirtioTransport::set_queue_irqfd_sink`] calls with a queue's direct interrupt
/// eventfd, or `None`.
pub type IrqfdSink = Arc<dyn Fn(Option<&Arc<EventFd>>) + Send + Sync>;

/// A ring the driver configured, handed to the device at activation.
pub struct ActiveQueue {
    /// The queue's index.
    pub index: u16,
    /// The ring, with the driver's addresses and negotiated size.
    pub queue: Queue,
    /// Signalled by the driver's notifications (ioeventfd, or the transport's handler).
    pub kick: Arc<EventFd>,
}

/// Everything a device needs to run once the driver is ready.
pub struct Activation {
    /// Guest memory the rings and buffers live in.
    pub mem: Arc<GuestMemoryMmap>,
    /// The enabled queues.
    pub queues: Vec<ActiveQueue>,
    /// Interrupts and error reporting.
    pub transport: Arc<dyn VirtioTransport>,
    /// The features the driver accepted.
    pub features: u64,
    /// Where the device records the guest memory it writes (buffers it fills), so a
    /// running migration sends those pages again.
    pub dirty: Arc<DirtyTracker>,
}

/// Where a ring stands when its device has stopped with nothing in flight: the next
/// available entry to pop and the next used entry to write (equal, as nothing is
/// popped and unfinished). A stopped device continues from here, in this process or on a
/// migration's destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    /// The queue's index.
    pub index: u16,
    /// The avail-ring index of the next request.
    pub next_avail: u16,
    /// The used-ring index of the next completion.
    pub next_used: u16,
}

impl QueuePosition {
    /// Where `queue` (number `index`) stands, its popped but unused entries (`unused`, the
    /// most recently popped ones) given back: the next run pops them again, as QEMU's
    /// `virtqueue_rewind` does.
    pub fn of(index: u16, queue: &Queue, unused: u16) -> Self {
        use virtio_queue::QueueT;
        QueuePosition {
            index,
            next_avail: queue.next_avail().wrapping_sub(unused),
            next_used: queue.next_used(),
        }
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled a queue the device cannot run without, or not one it needs.
    #[error("{device}: {reason}")]
    BadQueues {
        /// The device.
        device: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The device's I/O thread refused its handlers.
    #[error("{device}: cannot start its I/O handlers: {reason}")]
    Io {
        /// The device.
        device: &'static str,
        /// Why.
        reason: String,
    },
}

/// A virtio device (QEMU's `VirtioDeviceClass`), driven by a transport.
pub trait VirtioDevice: Send + Sync {
    /// Its virtio device ID ([`device_id`]).
    fn device_type(&self) -> u16;
    /// Its name in log lines (`virtio-blk`).
    fn name(&self) -> &'static str;
    /// The maximum size of each queue; their number is the device's queue count.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The features the device offers, ring and `VERSION_1` bits included.
    fn device_features(&self) -> u64;
    /// The size of its configuration space in bytes.
    fn config_size(&self) -> usize;
    /// Reads `data.len()` bytes of configuration at `offset` (past the end reads zeros).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A driver write to the configuration space (read-only fields ignore it).
    fn write_config(&self, _offset: u64, _data: &[u8]) {}
    /// Starts processing the driver's queues (`DRIVER_OK`).
    fn activate(&self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops processing (driver reset or device unplug). When it returns, no handler of
    /// the device runs and the queues are dropped.
    fn reset(&self);
    /// The VM stops (QEMU's `virtio_vmstate_change`): finishes or gives back every
    /// request, stops processing and returns where each active queue stands, keeping its
    /// own state; the transport activates it again from there when the VM runs. `None`:
    /// the device cannot stop this way and keeps running (it cannot migrate either).
    fn park(&self) -> Option<Vec<QueuePosition>> {
        None
    }
    /// The device's own state for a migration (its part of QEMU's `virtio_save`), put in
    /// the device's section. The default: the device cannot migrate.
    fn save_device(&self, _section: &mut VmStateSection) -> Result<(), VmStateError> {
        Err(VmStateError::Unmigratable(format!(
            "{} does not support migration yet",
            self.name()
        )))
    }
    /// Loads what [`VirtioDevice::save_device`] saved, into a device that is not
    /// running; the next activation uses it.
    fn load_device(&self, _section: &VmStateSection) -> Result<(), VmStateError> {
        Err(VmStateError::Unmigratable(format!(
            "{} does not support migration yet",
            self.name()
        )))
    }
}

/// Records that the device wrote the buffers of `chain` that the driver made writable
/// (all of them: marking more than was written costs a resend, missing a page a wrong
/// guest), for a running migration (QEMU's `dma_memory_unmap` with `access_len`).
pub fn mark_chain_written<M>(dirty: &DirtyTracker, chain: &DescriptorChain<M>)
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    if !dirty.is_active() {
        return;
    }
    for desc in chain.clone() {
        if desc.is_write_only() {
            dirty.mark(desc.addr().0, u64::from(desc.len()));
        }
    }
}

/// The low 32 feature bits a legacy driver sees, or bits 32..63 for select 1.
pub fn feature_word(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// A ring the guest broke: the error from `virtio-queue`, or the device's own finding.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The ring structures themselves are bad (avail index, memory).
    #[error("{0}")]
    Queue(#[from] virtio_queue::Error),
    /// A descriptor chain the device cannot use.
    #[error("{0}")]
    Chain(String),
}

/// Copies `data.len()` bytes of a device's configuration `config` from `offset`; bytes
/// past its end read as zero (what `VirtioDevice::read_config` does for most devices).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// Reads the eventfd's counter so a level-triggered loop does not spin on it.
pub fn drain_kick(kick: &EventFd) {
    // Non-blocking eventfds: EAGAIN when nothing is pending, which is fine.
    let _ = kick.read();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_words_split_the_64_bits() {
        let f = bit(feature::VERSION_1) | bit(feature::RING_EVENT_IDX) | 1;
        assert_eq!(feature_word(f, 0), (1 << 29) | 1);
        assert_eq!(feature_word(f, 1), 1);
        assert_eq!(feature_word(f, 2), 0);
    }
}
