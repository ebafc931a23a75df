//! virtio devices independent of their transport (QEMU's `hw/virtio/virtio.c`): the
//! status and feature bits, the [`VirtioDevice`] trait a device implements (QEMU's
//! `VirtioDeviceClass`), and the ring errors that make a device need a reset.
//!
//! A transport (virtio-pci) owns the registers the driver programs. When the driver sets
//! `DRIVER_OK` it hands the device its configured rings ([`ActiveQueue`]), each with the
//! eventfd the driver's notifications signal, and a [`VirtioTransport`] to interrupt the
//! driver through. Devices process rings on an I/O thread, never on a vCPU thread.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::core::accel_ops::EventFd;
use crate::core::dirty_log::DirtyTracker;
use crate::core::vmstate::{VmStateError, VmStateSection};
pub use crate::core::log_limit::RateLimitedLog;

/// A used ring whose elements go to the driver in groups it must see whole: a mergeable
/// receive frame's buffers, whose first says how many follow (the driver takes them all
/// as soon as it sees the first, and drops the frame if any is missing). `Queue::add_used`
/// publishes each element on its own; this writes a group's elements, then moves the used
/// index once, as QEMU's `virtqueue_fill` and `virtqueue_flush` do. A queue used through it
/// takes its notification decisions from it too ([`UsedGroups::needs_notification`]),
/// since `Queue::needs_notification` counts only what `add_used` added.
#[derive(Debug)]
pub struct UsedGroups {
    /// The used index when the driver was last considered for an interrupt.
    signalled: Wrapping<u16>,
}

impl UsedGroups {
    /// Starts at `queue`'s used index.
    pub fn new(queue: &Queue) -> Self {
        UsedGroups {
            signalled: Wrapping(queue.next_used()),
        }
    }

    /// Adds `elems` (descriptor head, bytes written) to the used ring and makes them
    /// visible to the driver with one store of the used index.
    pub fn add<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        elems: &[(u16, u32)],
    ) -> Result<(), virtio_queue::Error> {
        let size = queue.size();
        let used_ring = GuestAddress(queue.used_ring());
        let start = Wrapping(queue.next_used());
        for (i, &(head, len)) in elems.iter().enumerate() {
            if head >= size {
                return Err(virtio_queue::Error::InvalidDescriptorIndex);
            }
            let slot = (start + Wrapping(i as u16)).0 % size;
            let addr = used_ring
                .checked_add(4 + 8 * u64::from(slot))
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            // virtq_used_elem: the head's id and the length, little-endian u32s.
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            mem.write_slice(&elem, addr)
                .map_err(virtio_queue::Error::GuestMemory)?;
        }
        let end = start + Wrapping(elems.len() as u16);
        queue.set_next_used(end.0);
        // Release: the elements are in place before the driver can see the index.
        let idx_addr = used_ring
            .checked_add(2)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.store(u16::to_le(end.0), idx_addr, Ordering::Release)
            .map_err(virtio_queue::Error::GuestMemory)
    }

    /// Whether the driver wants an interrupt for what was added since the last call: with
    /// `VIRTIO_RING_F_EVENT_IDX`, when the used index passed the driver's `used_event`
    /// (the kernel's `vring_need_event`); always without it, as `Queue::needs_notification`.
    pub fn needs_notification<M: GuestMemory>(
        &mut self,
        queue: &Queue,
        mem: &M,
    ) -> Result<bool, virtio_queue::Error> {
        // The used index is stored before `used_event` is read (the driver does the reverse).
        fence(Ordering::SeqCst);
        let new = Wrapping(queue.next_used());
        let old = std::mem::replace(&mut self.signalled, new);
        if !queue.event_idx_enabled() {
            return Ok(true);
        }
        let used_event_addr = GuestAddress(queue.avail_ring())
            .checked_add(4 + 2 * u64::from(queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let used_event = Wrapping(u16::from_le(
            mem.load(used_event_addr, Ordering::Relaxed)
                .map_err(virtio_queue::Error::GuestMemory)?,
        ));
        Ok(new - used_event - Wrapping(1) < new - old)
    }
}

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
    /// Console (virtio-serial).
    pub const CONSOLE: u16 = 3;
    /// Entropy source.
    pub const RNG: u16 = 4;
    /// Memory balloon.
    pub const BALLOON: u16 = 5;
    /// SCSI host adapter.
    pub const SCSI: u16 = 8;
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

/// The next chain the driver posted on `queue`, or `None` once the ring is empty with
/// notifications on again (QEMU's `virtqueue_pop` writing `avail_event`). Under
/// EVENT_IDX the driver kicks only where the device asked, so a device that pops without
/// this is kicked once and then never again. Call `disable_notification` before the first.
pub fn next_chain(
    queue: &mut Queue,
    mem: &Arc<GuestMemoryMmap>,
) -> Result<Option<DescriptorChain<Arc<GuestMemoryMmap>>>, RingError> {
    use virtio_queue::QueueOwnedT;
    loop {
        if let Some(chain) = queue.iter(mem.clone())?.next() {
            return Ok(Some(chain));
        }
        if !queue.enable_notification(&**mem)? {
            return Ok(None);
        }
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

/// The buffers of `chain` the device writes (`writable`) or reads, as slices of guest
/// memory, without their first `skip` bytes (a request's header or response): a device
/// moves data between them and an image with no copy. `None` when a buffer spans two
/// memory regions or lies outside guest memory (the caller copies through a buffer then).
pub fn chain_slices<'m>(
    mem: &'m GuestMemoryMmap,
    chain: &DescriptorChain<Arc<GuestMemoryMmap>>,
    writable: bool,
    mut skip: usize,
) -> Option<Vec<VolatileSlice<'m>>> {
    let mut slices = Vec::new();
    for desc in chain.clone().filter(|d| d.is_write_only() == writable) {
        let len = desc.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let addr = desc.addr().checked_add(skip as u64)?;
        slices.push(mem.get_slice(addr, len - skip).ok()?);
        skip = 0;
    }
    (skip == 0).then_some(slices)
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

/// Requests a device took from a ring and has not yet put in its used ring. Nothing in
/// the ring says a head is in use, so a driver can offer one again before the device used
/// it, without end: past the ring's size the device is broken (QEMU's "Virtqueue size
/// exceeded"), so a guest cannot pile up work that a stop or reset would wait for.
#[derive(Default)]
pub struct Outstanding(std::sync::atomic::AtomicUsize);

impl Outstanding {
    /// Counts one more request taken from a ring of `ring_size` entries.
    pub fn take(&self, ring_size: u16) -> Result<(), RingError> {
        use std::sync::atomic::Ordering;
        if self.0.fetch_add(1, Ordering::AcqRel) >= usize::from(ring_size) {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return Err(RingError::Chain("Virtqueue size exceeded".into()));
        }
        Ok(())
    }

    /// One request taken is in the used ring now.
    pub fn used(&self) {
        use std::sync::atomic::Ordering;
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
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
    use virtio_queue::QueueOwnedT;

    #[test]
    fn feature_words_split_the_64_bits() {
        let f = bit(feature::VERSION_1) | bit(feature::RING_EVENT_IDX) | 1;
        assert_eq!(feature_word(f, 0), (1 << 29) | 1);
        assert_eq!(feature_word(f, 1), 1);
        assert_eq!(feature_word(f, 2), 0);
    }

    /// A 16-entry ring at 0 (descriptors), 0x1000 (available), 0x2000 (used).
    fn ring(event_idx: bool) -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        (mem, q)
    }

    fn set_used_event(mem: &GuestMemoryMmap, value: u16) {
        mem.write_obj(value, GuestAddress(0x1000 + 4 + 2 * 16)).unwrap();
    }

    #[test]
    fn a_group_is_published_with_one_index_and_notifies_past_used_event() {
        let (mem, mut q) = ring(true);
        let mut used = UsedGroups::new(&q);
        set_used_event(&mem, 1);
        used.add(&mut q, &mem, &[(3, 100), (4, 200), (5, 50)]).unwrap();
        let idx: u16 = mem.read_obj(GuestAddress(0x2002)).unwrap();
        assert_eq!((idx, q.next_used()), (3, 3));
        let second: [u32; 2] = mem.read_obj(GuestAddress(0x2004 + 8)).unwrap();
        assert_eq!(second, [4, 200]);
        assert!(used.needs_notification(&q, &mem).unwrap(), "0..3 passed used_event 1");
        used.add(&mut q, &mem, &[(6, 10)]).unwrap();
        assert!(!used.needs_notification(&q, &mem).unwrap(), "3..4 did not pass it");
        set_used_event(&mem, 5);
        used.add(&mut q, &mem, &[(7, 10)]).unwrap();
        assert!(!used.needs_notification(&q, &mem).unwrap(), "4..5 did not reach 6");
        used.add(&mut q, &mem, &[(8, 10), (9, 10)]).unwrap();
        assert!(used.needs_notification(&q, &mem).unwrap(), "5..7 passed 5");
        assert!(
            used.add(&mut q, &mem, &[(16, 1)]).is_err(),
            "a head beyond the ring is refused"
        );
    }

    /// A chain of two device-readable and two device-writable buffers, as a request
    /// header, its data-out, a response header and its data-in.
    fn four_buffer_chain(mem: &Arc<GuestMemoryMmap>) -> DescriptorChain<Arc<GuestMemoryMmap>> {
        let (_, mut q) = ring(false);
        let descs: [(u64, u32, u16); 4] = [(0x3000, 20, 1), (0x4000, 100, 1), (0x5000, 12, 3), (0x6000, 300, 2)];
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let at = GuestAddress(16 * i as u64);
            mem.write_obj(*addr, at).unwrap();
            mem.write_obj(*len, at.unchecked_add(8)).unwrap();
            mem.write_obj(*flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(i as u16 + 1, at.unchecked_add(14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(0x1004)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x1002)).unwrap();
        let chain = q.iter(mem.clone()).unwrap().next().unwrap();
        chain
    }

    #[test]
    fn chain_slices_skip_headers_across_buffers() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let chain = four_buffer_chain(&mem);
        let out = chain_slices(&mem, &chain, false, 19).unwrap();
        let lens: Vec<usize> = out.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [1, 100], "the header's last byte, then the data-out buffer");
        assert_eq!(out[0].ptr_guard().as_ptr(), mem.get_slice(GuestAddress(0x3013), 1).unwrap().ptr_guard().as_ptr());
        let data_in = chain_slices(&mem, &chain, true, 16).unwrap();
        let lens: Vec<usize> = data_in.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [296], "a whole buffer skipped, then 4 bytes of the next");
        assert!(chain_slices(&mem, &chain, true, 400).is_none(), "more skipped than there is");
    }

    #[test]
    fn without_event_idx_every_check_notifies_and_indices_wrap() {
        let (mem, mut q) = ring(false);
        q.set_next_used(u16::MAX);
        let mut used = UsedGroups::new(&q);
        used.add(&mut q, &mem, &[(1, 1), (2, 2)]).unwrap();
        assert_eq!(q.next_used(), 1);
        let at_slot_0: [u32; 2] = mem.read_obj(GuestAddress(0x2004)).unwrap();
        assert_eq!(at_slot_0, [2, 2], "index 0xffff is slot 15, index 0 slot 0");
        assert!(used.needs_notification(&q, &mem).unwrap());
    }
}
