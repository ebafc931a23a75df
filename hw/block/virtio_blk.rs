//! The virtio block device (QEMU's `hw/block/virtio-blk.c`): requests from the driver's
//! queues served by a [`BlockBackend`] (raw or qcow2 through the block layer), on an I/O
//! thread. Transports (`virtio-blk-pci`) build it from their properties.
//!
//! Each queue's ring is owned by its handler on the I/O thread: the vCPU's notification
//! is an eventfd, and nothing else touches the ring while the device runs.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use block::{BlockBackend, IoType};
use parking_lot::Mutex;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::core::dirty_log::DirtyTracker;
use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::thread_pool::{InFlight, ThreadPool};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::virtio::virtio::{
    bit, device_id, drain_kick, feature, mark_chain_written, read_config_bytes, ActivateError, Activation,
    QueuePosition, RateLimitedLog, RingError, VirtioDevice, VirtioTransport,
};

/// Feature bits (virtio 1.2, 5.2.3).
mod blk_feature {
    pub const SEG_MAX: u32 = 2;
    pub const GEOMETRY: u32 = 4;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const TOPOLOGY: u32 = 10;
    pub const CONFIG_WCE: u32 = 11;
    pub const MQ: u32 = 12;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
}

/// Request types.
mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status bytes.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Bytes of the serial number GET_ID returns.
const ID_BYTES: usize = 20;
/// Sectors are 512 bytes whatever the logical block size.
const SECTOR_SHIFT: u32 = 9;
/// QEMU's `BDRV_REQUEST_MAX_SECTORS`: the largest discard or write-zeroes request.
const MAX_REQUEST_SECTORS: u32 = 0x3f_ffff;
/// Bytes copied between guest memory and the image at a time: a guest's huge descriptor
/// costs time, never memory.
const BOUNCE_BYTES: usize = 256 * 1024;
/// Worker threads of a device's pool (QEMU's thread pool default `max_threads`).
const POOL_THREADS: usize = 64;
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
const CONFIG_SIZE: usize = 0x3c;

/// How the transport configured the device (its properties, resolved).
#[derive(Clone)]
pub struct VirtioBlkConf {
    /// The drive.
    pub backend: Arc<BlockBackend>,
    /// GET_ID's answer (`serial=`), at most 20 bytes are returned.
    pub serial: Option<String>,
    /// Request queues.
    pub num_queues: u16,
    /// Each queue's maximum size.
    pub queue_size: u16,
    /// `logical_block_size`.
    pub logical_block_size: u32,
    /// `physical_block_size`.
    pub physical_block_size: u32,
    /// Offer DISCARD.
    pub discard: bool,
    /// Offer WRITE_ZEROES.
    pub write_zeroes: bool,
    /// Offer CONFIG_WCE (the driver may switch the write cache off).
    pub config_wce: bool,
    /// Where requests are served: an `-object iothread` or the main loop.
    pub context: Arc<AioContext>,
}

/// QEMU's `VirtIOBlock`.
pub struct VirtioBlk {
    conf: VirtioBlkConf,
    features: u64,
    /// The configuration's `writeback` byte: off means every write is flushed.
    writeback: Arc<AtomicBool>,
    handlers: Mutex<Vec<AioHandlerId>>,
    /// QEMU's `aio=threads` pool: requests wait on the disk here, several at a time.
    pool: ThreadPool,
    in_flight: Arc<InFlight>,
    /// The queues while the device runs: parking reads where they stand.
    workers: Mutex<Vec<Arc<QueueWorker>>>,
}

impl VirtioBlk {
    /// A device over `conf`.
    pub fn new(conf: VirtioBlkConf) -> Self {
        let mut features = bit(blk_feature::SEG_MAX)
            | bit(blk_feature::GEOMETRY)
            | bit(blk_feature::BLK_SIZE)
            | bit(blk_feature::TOPOLOGY)
            | bit(blk_feature::FLUSH)
            | bit(feature::RING_INDIRECT_DESC)
            | bit(feature::RING_EVENT_IDX)
            | bit(feature::NOTIFY_ON_EMPTY)
            | bit(feature::ANY_LAYOUT);
        if conf.config_wce {
            features |= bit(blk_feature::CONFIG_WCE);
        }
        if conf.backend.is_read_only() {
            features |= bit(blk_feature::RO);
        }
        if conf.num_queues > 1 {
            features |= bit(blk_feature::MQ);
        }
        if conf.discard {
            features |= bit(blk_feature::DISCARD);
        }
        if conf.write_zeroes {
            features |= bit(blk_feature::WRITE_ZEROES);
        }
        let writeback = conf.backend.options().cache.writeback();
        VirtioBlk {
            conf,
            features,
            writeback: Arc::new(AtomicBool::new(writeback)),
            handlers: Mutex::new(Vec::new()),
            pool: ThreadPool::new("worker", POOL_THREADS),
            in_flight: Arc::new(InFlight::default()),
            workers: Mutex::new(Vec::new()),
        }
    }

    /// Removes the kick handlers (waiting for one that runs, and the request it serves
    /// itself), then waits for the requests on the pool: every popped request has its
    /// used entry. Returns the queues that ran.
    fn stop(&self) -> Vec<Arc<QueueWorker>> {
        // QEMU's blk_drain: requests already on the pool finish before the rings go, past
        // any I/O limits; lifted first, for a kick handler serving a request itself.
        let _lifted = self.conf.backend.lift_limits();
        let handlers = std::mem::take(&mut *self.handlers.lock());
        for id in handlers {
            self.conf.context.remove_fd(id);
        }
        self.in_flight.drain();
        std::mem::take(&mut *self.workers.lock())
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let c = &self.conf;
        let mut b = [0u8; CONFIG_SIZE];
        let sectors = c.backend.size() >> SECTOR_SHIFT;
        b[0x00..0x08].copy_from_slice(&sectors.to_le_bytes());
        // size_max (0x08) is not offered; seg_max as QEMU's seg-max-adjust sets it.
        b[0x0c..0x10].copy_from_slice(&u32::from(c.queue_size.saturating_sub(2)).to_le_bytes());
        // Geometry: 16 heads, 63 sectors per track, as firmware would guess.
        let cylinders = (sectors / (16 * 63)).min(u64::from(u16::MAX)) as u16;
        b[0x10..0x12].copy_from_slice(&cylinders.to_le_bytes());
        b[0x12] = 16;
        b[0x13] = 63;
        b[0x14..0x18].copy_from_slice(&c.logical_block_size.to_le_bytes());
        let physical_exp = (c.physical_block_size / c.logical_block_size.max(1))
            .max(1)
            .trailing_zeros();
        b[0x18] = physical_exp as u8;
        b[0x20] = u8::from(self.writeback.load(Ordering::Relaxed));
        b[0x22..0x24].copy_from_slice(&c.num_queues.to_le_bytes());
        let align = (c.logical_block_size >> SECTOR_SHIFT).max(1);
        b[0x24..0x28].copy_from_slice(&MAX_REQUEST_SECTORS.to_le_bytes());
        b[0x28..0x2c].copy_from_slice(&1u32.to_le_bytes());
        b[0x2c..0x30].copy_from_slice(&align.to_le_bytes());
        b[0x30..0x34].copy_from_slice(&MAX_REQUEST_SECTORS.to_le_bytes());
        b[0x34..0x38].copy_from_slice(&1u32.to_le_bytes());
        b[0x38] = 1;
        b
    }
}

impl VirtioBlk {
    /// Lets the drive be resized (`block_resize`): the new capacity is in the
    /// configuration at once, and a running driver gets a configuration change interrupt
    /// (QEMU's `virtio_blk_resize`).
    pub fn watch_resize(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        self.conf.backend.set_resize_handler(Some(Arc::new(move || {
            let Some(blk) = weak.upgrade() else { return };
            let transport = blk.workers.lock().first().map(|w| w.transport.clone());
            if let Some(transport) = transport {
                transport.signal_config();
            }
        })));
    }
}

impl Drop for VirtioBlk {
    fn drop(&mut self) {
        self.conf.backend.detach_dev();
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u16 {
        device_id::BLOCK
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.conf.queue_size; usize::from(self.conf.num_queues)]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE.
        if offset == 0x20 && self.conf.config_wce {
            if let Some(&value) = data.first() {
                self.writeback.store(value != 0, Ordering::Relaxed);
            }
        }
    }

    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            transport,
            features,
            dirty,
        } = activation;
        let mut handlers = self.handlers.lock();
        for q in queues {
            let kick = q.kick.clone();
            let worker = Arc::new(QueueWorker {
                index: q.index,
                queue: Mutex::new(q.queue),
                mem: mem.clone(),
                dirty: dirty.clone(),
                transport: transport.clone(),
                broken: AtomicBool::new(false),
                requests: Requests {
                    backend: self.conf.backend.clone(),
                    serial: self.conf.serial.clone(),
                    discard: features & bit(blk_feature::DISCARD) != 0,
                    write_zeroes: features & bit(blk_feature::WRITE_ZEROES) != 0,
                    logical_block_size: u64::from(self.conf.logical_block_size),
                    writeback: self.writeback.clone(),
                },
                pool: self.pool.clone(),
                in_flight: self.in_flight.clone(),
                on_pool: AtomicUsize::new(0),
                deferred: AtomicUsize::new(0),
                outstanding: Default::default(),
            });
            self.workers.lock().push(worker.clone());
            let handler = Box::new(move || {
                drain_kick(&kick);
                worker.kick();
            });
            match self.conf.context.add_fd(q.kick.as_raw_fd(), handler) {
                Ok(id) => handlers.push(id),
                Err(e) => {
                    drop(handlers);
                    self.reset();
                    return Err(ActivateError::Io {
                        device: "virtio-blk",
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    fn reset(&self) {
        self.stop();
        self.writeback
            .store(self.conf.backend.options().cache.writeback(), Ordering::Relaxed);
    }

    /// Requests are drained, not carried: each popped one completes before the device
    /// stops (QEMU keeps a list only for `werror=stop`, which this device lacks). The
    /// driver's `writeback` choice stays.
    fn park(&self) -> Option<Vec<QueuePosition>> {
        let workers = self.stop();
        Some(
            workers
                .iter()
                .map(|w| QueuePosition::of(w.index, &w.queue.lock(), 0))
                .collect(),
        )
    }

    /// The driver's write-cache choice; the image's size and the queue count must be the
    /// same on both sides (a guest would see its disk change under it).
    fn save_device(&self, section: &mut VmStateSection) -> Result<(), VmStateError> {
        section.put("blk.writeback", self.writeback.load(Ordering::Relaxed));
        section.put("blk.capacity", self.conf.backend.size());
        section.put("blk.num_queues", self.conf.num_queues);
        Ok(())
    }

    fn load_device(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let capacity: u64 = section.get("blk.capacity")?;
        if capacity != self.conf.backend.size() {
            return Err(VmStateError::Mismatch(format!(
                "virtio-blk: disk of {capacity} bytes saved, this one has {}",
                self.conf.backend.size()
            )));
        }
        let queues: u16 = section.get("blk.num_queues")?;
        if queues != self.conf.num_queues {
            return Err(VmStateError::Mismatch(format!(
                "virtio-blk: {queues} queues saved, this device has {}",
                self.conf.num_queues
            )));
        }
        self.writeback
            .store(section.get("blk.writeback")?, Ordering::Relaxed);
        Ok(())
    }
}

/// A request's buffers as guest-memory slices, so data moves between the image and the
/// guest with no copy of ours: device-readable ones (header, then OUT data) and
/// device-writable ones (IN data, then the status byte). `None` from `new` when a buffer
/// spans two memory regions; the request then goes through a bounce buffer.
struct GuestSg<'m> {
    readable: Vec<VolatileSlice<'m>>,
    writable: Vec<VolatileSlice<'m>>,
}

impl<'m> GuestSg<'m> {
    fn new(mem: &'m GuestMemoryMmap, chain: &Chain) -> Option<Self> {
        let mut sg = GuestSg {
            readable: Vec::new(),
            writable: Vec::new(),
        };
        for desc in chain.clone() {
            let slice = mem.get_slice(desc.addr(), desc.len() as usize).ok()?;
            if desc.is_write_only() {
                sg.writable.push(slice);
            } else {
                sg.readable.push(slice);
            }
        }
        Some(sg)
    }

    /// OUT data: the readable bytes after the 16-byte header.
    fn out_data(&self) -> Option<Vec<VolatileSlice<'m>>> {
        let mut skip = 16usize;
        let mut data = Vec::with_capacity(self.readable.len());
        for s in &self.readable {
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            data.push(s.offset(skip).ok()?);
            skip = 0;
        }
        (skip == 0).then_some(data)
    }

    /// IN data: the writable bytes before the status byte, the last writable byte
    /// whichever buffer holds it (empty buffers after it included: QEMU's
    /// `iov_discard_back`).
    fn in_data(&self) -> Option<Vec<VolatileSlice<'m>>> {
        let mut data = self.writable.clone();
        while let Some(last) = data.pop() {
            if !last.is_empty() {
                if last.len() > 1 {
                    data.push(last.subslice(0, last.len() - 1).ok()?);
                }
                return Some(data);
            }
        }
        None
    }
}

/// A request as it travels to a pool thread: the chain holds guest memory alive.
type Chain = DescriptorChain<Arc<GuestMemoryMmap>>;

/// One queue: its ring (locked while taking requests and while completing one) and what
/// serving its requests needs. Its kick handler runs on the device's I/O thread.
struct QueueWorker {
    index: u16,
    queue: Mutex<Queue>,
    mem: Arc<GuestMemoryMmap>,
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    broken: AtomicBool,
    requests: Requests,
    pool: ThreadPool,
    in_flight: Arc<InFlight>,
    /// This queue's requests on the pool now.
    on_pool: AtomicUsize,
    /// Completions since the last interrupt decision.
    deferred: AtomicUsize,
    /// Requests taken and not yet used: at most the ring's size.
    outstanding: crate::virtio::virtio::Outstanding,
}

/// Most completions from the pool before an interrupt is considered anyway.
const NOTIFY_BATCH: usize = 8;

/// Serves requests: the drive and the negotiated options.
struct Requests {
    backend: Arc<BlockBackend>,
    serial: Option<String>,
    discard: bool,
    write_zeroes: bool,
    logical_block_size: u64,
    writeback: Arc<AtomicBool>,
}

fn chain_error(e: impl std::fmt::Display) -> RingError {
    RingError::Chain(e.to_string())
}

/// Guest errors of every virtio-blk device share one log budget.
static GUEST_ERRORS: std::sync::LazyLock<RateLimitedLog> =
    std::sync::LazyLock::new(RateLimitedLog::default);

thread_local! {
    /// Each thread's buffer between guest memory and the image.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl QueueWorker {
    /// The kick handler: takes every available request. A lone request with nothing in
    /// flight is served here (no hand-off latency); several go to the pool, so they wait
    /// on the disk together (QEMU's `aio=threads`).
    fn kick(self: &Arc<Self>) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut chains = match self.pop_all() {
            Ok(chains) => chains,
            Err(e) => return self.fail(e),
        };
        // Under I/O limits a request may wait: all go to the pool, so the event loop
        // (and what else it serves) never waits for the limits.
        let throttled = self.requests.backend.is_throttled();
        if chains.len() == 1 && self.in_flight.is_idle() && !throttled {
            if let Some(chain) = chains.pop() {
                self.serve_and_complete(chain, false);
            }
            return;
        }
        // The pool takes all but one; this thread serves the last itself rather than wait.
        self.on_pool.fetch_add(chains.len(), Ordering::AcqRel);
        let last = if throttled { None } else { chains.pop() };
        for chain in chains {
            self.in_flight.begin();
            let worker = Arc::clone(self);
            self.pool.submit(Box::new(move || {
                worker.serve_and_complete(chain, true);
                worker.in_flight.end();
            }));
        }
        if let Some(chain) = last {
            self.serve_and_complete(chain, true);
        }
    }

    /// Takes every available chain, until the ring stays empty with notifications on.
    fn pop_all(&self) -> Result<Vec<Chain>, RingError> {
        let mem = &*self.mem;
        let mut queue = self.queue.lock();
        let mut chains = Vec::new();
        loop {
            queue.disable_notification(mem)?;
            // `iter` checks the avail index against the ring size on every call: a guest
            // that moves it by more than the ring holds gets an error, not a long loop.
            while let Some(chain) = queue.iter(self.mem.clone())?.next() {
                self.outstanding.take(queue.size())?;
                chains.push(chain);
            }
            if !queue.enable_notification(mem)? {
                return Ok(chains);
            }
        }
    }

    fn serve_and_complete(&self, chain: Chain, pooled: bool) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let head = chain.head_index();
        let written = chain.clone();
        let served = self.requests.serve(&self.mem, chain);
        mark_chain_written(&self.dirty, &written);
        match served {
            Ok(len) => self.complete(head, len, pooled),
            Err(e) => self.fail(e),
        }
    }

    /// Puts a served request in the used ring and interrupts if the driver wants it. A
    /// request from the pool interrupts only as the last of those running or every
    /// `NOTIFY_BATCH` completions: one interrupt covers the batch (QEMU batches per event
    /// loop iteration), and a steady stream still gets interrupts.
    fn complete(&self, head: u16, len: u32, pooled: bool) {
        let mem = &*self.mem;
        let notify = {
            let mut queue = self.queue.lock();
            let batch_done = !pooled || {
                let others = self.on_pool.fetch_sub(1, Ordering::AcqRel) > 1;
                let deferred = self.deferred.fetch_add(1, Ordering::AcqRel) + 1;
                // Under I/O limits the others may wait for seconds: each completion
                // interrupts.
                !others || deferred >= NOTIFY_BATCH || self.requests.backend.is_throttled()
            };
            queue.add_used(mem, head, len).and_then(|()| {
                self.outstanding.used();
                if batch_done {
                    self.deferred.store(0, Ordering::Release);
                    queue.needs_notification(mem)
                } else {
                    Ok(false)
                }
            })
        };
        match notify {
            Ok(true) => self.transport.signal_used_queue(self.index),
            Ok(false) => {}
            Err(e) => self.fail(e.into()),
        }
    }

    fn fail(&self, e: RingError) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            let index = self.index;
            GUEST_ERRORS.warn(|| format!("virtio-blk: queue {index}: {e}: device needs reset"));
            self.transport.mark_broken();
        }
    }
}

impl Requests {
    /// Serves one request; returns the bytes written into the chain (data and status).
    fn serve(&self, mem: &GuestMemoryMmap, chain: Chain) -> Result<u32, RingError> {
        let sg = GuestSg::new(mem, &chain);
        let mut reader = Reader::new(mem, chain.clone()).map_err(chain_error)?;
        let mut writer = Writer::new(mem, chain).map_err(chain_error)?;
        let mut header = [0u8; 16];
        reader
            .read_exact(&mut header)
            .map_err(|_| chain_error("request header missing"))?;
        let writable = writer.available_bytes();
        if writable == 0 {
            return Err(chain_error("request status byte missing"));
        }
        let mut status_writer = writer.split_at(writable - 1).map_err(chain_error)?;
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let (status, data_written) = match kind {
            req::IN => match sg.as_ref().and_then(|sg| sg.in_data()) {
                Some(data) => self.read_sg(sector, &data),
                None => self.read(sector, &mut writer),
            },
            req::OUT => match sg.as_ref().and_then(|sg| sg.out_data()) {
                Some(data) => (self.write_sg(sector, &data), 0),
                None => (self.write(sector, &mut reader), 0),
            },
            req::FLUSH => (self.flush(), 0),
            req::GET_ID => self.get_id(&mut writer),
            req::DISCARD if self.discard => (self.discard_or_zero(&mut reader, true), 0),
            req::WRITE_ZEROES if self.write_zeroes => {
                (self.discard_or_zero(&mut reader, false), 0)
            }
            _ => (S_UNSUPP, 0),
        };
        status_writer
            .write_all(&[status])
            .map_err(|_| chain_error("cannot write the status byte"))?;
        Ok(data_written + 1)
    }

    /// Checks a request of `len` bytes at `sector` fits the disk and its block size; one
    /// that does not is counted as invalid (QEMU's `block_acct_invalid`).
    fn in_range(&self, kind: IoType, sector: u64, len: u64) -> Option<u64> {
        let valid = sector.checked_mul(1 << SECTOR_SHIFT).filter(|&offset| {
            let aligned = offset.is_multiple_of(self.logical_block_size)
                && len.is_multiple_of(self.logical_block_size);
            let end = offset.checked_add(len);
            aligned && end.is_some_and(|end| end <= self.backend.size())
        });
        if valid.is_none() {
            self.backend.account_invalid(kind);
        }
        valid
    }

    /// IN straight into guest memory.
    fn read_sg(&self, sector: u64, data: &[VolatileSlice<'_>]) -> (u8, u32) {
        let len: u64 = data.iter().map(|b| b.len() as u64).sum();
        let Some(offset) = self.in_range(IoType::Read, sector, len) else {
            return (S_IOERR, 0);
        };
        match self.backend.readv_guest(data, offset) {
            Ok(()) => (S_OK, len as u32),
            Err(e) => {
                log::debug!("virtio-blk: read at {offset}: {e}");
                (S_IOERR, 0)
            }
        }
    }

    /// OUT straight from guest memory.
    fn write_sg(&self, sector: u64, data: &[VolatileSlice<'_>]) -> u8 {
        if self.backend.is_read_only() {
            return S_IOERR;
        }
        let len: u64 = data.iter().map(|b| b.len() as u64).sum();
        let Some(offset) = self.in_range(IoType::Write, sector, len) else {
            return S_IOERR;
        };
        if let Err(e) = self.backend.writev_guest(data, offset) {
            log::debug!("virtio-blk: write at {offset}: {e}");
            return S_IOERR;
        }
        if !self.writeback.load(Ordering::Relaxed) {
            return self.flush();
        }
        S_OK
    }

    /// IN through a bounce buffer (a descriptor that spans two memory regions).
    fn read(&self, sector: u64, writer: &mut Writer<'_, ()>) -> (u8, u32) {
        let len = writer.available_bytes();
        let Some(offset) = self.in_range(IoType::Read, sector, len as u64) else {
            return (S_IOERR, 0);
        };
        let result = BOUNCE.with_borrow_mut(|bounce| {
            bounce.resize(len.min(BOUNCE_BYTES), 0);
            let mut done = 0;
            while done < len {
                let buf = &mut bounce[..(len - done).min(BOUNCE_BYTES)];
                let at = offset + done as u64;
                if let Err(e) = self.backend.read_at(buf, at) {
                    log::debug!("virtio-blk: read at {at}: {e}");
                    return Err(done);
                }
                if writer.write_all(buf).is_err() {
                    return Err(done);
                }
                done += buf.len();
            }
            Ok(())
        });
        match result {
            Ok(()) => (S_OK, len as u32),
            Err(done) => (S_IOERR, done as u32),
        }
    }

    /// OUT through a bounce buffer (a descriptor that spans two memory regions).
    fn write(&self, sector: u64, reader: &mut Reader<'_, ()>) -> u8 {
        if self.backend.is_read_only() {
            return S_IOERR;
        }
        let len = reader.available_bytes();
        let Some(offset) = self.in_range(IoType::Write, sector, len as u64) else {
            return S_IOERR;
        };
        let written = BOUNCE.with_borrow_mut(|bounce| {
            bounce.resize(len.min(BOUNCE_BYTES), 0);
            let mut done = 0;
            while done < len {
                let buf = &mut bounce[..(len - done).min(BOUNCE_BYTES)];
                let at = offset + done as u64;
                if reader.read_exact(buf).is_err() {
                    return false;
                }
                if let Err(e) = self.backend.write_at(buf, at) {
                    log::debug!("virtio-blk: write at {at}: {e}");
                    return false;
                }
                done += buf.len();
            }
            true
        });
        if !written {
            return S_IOERR;
        }
        if !self.writeback.load(Ordering::Relaxed) {
            return self.flush();
        }
        S_OK
    }

    fn flush(&self) -> u8 {
        match self.backend.flush() {
            Ok(()) => S_OK,
            Err(e) => {
                log::debug!("virtio-blk: flush: {e}");
                S_IOERR
            }
        }
    }

    fn get_id(&self, writer: &mut Writer<'_, ()>) -> (u8, u32) {
        let mut id = [0u8; ID_BYTES];
        if let Some(serial) = &self.serial {
            let bytes = serial.as_bytes();
            let n = bytes.len().min(ID_BYTES);
            id[..n].copy_from_slice(&bytes[..n]);
        }
        let n = writer.available_bytes().min(ID_BYTES);
        match writer.write_all(&id[..n]) {
            Ok(()) => (S_OK, n as u32),
            Err(_) => (S_IOERR, 0),
        }
    }

    /// DISCARD (`discard`) or WRITE_ZEROES: one segment of `{sector, num_sectors, flags}`.
    fn discard_or_zero(&self, reader: &mut Reader<'_, ()>, discard: bool) -> u8 {
        const SEGMENT: usize = 16;
        const FLAG_UNMAP: u32 = 1;
        if reader.available_bytes() != SEGMENT {
            // More than the one segment the configuration allows, or a torn one.
            return S_UNSUPP;
        }
        let mut seg = [0u8; SEGMENT];
        if reader.read_exact(&mut seg).is_err() {
            return S_IOERR;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        if sectors > MAX_REQUEST_SECTORS || (discard && flags != 0) || flags & !FLAG_UNMAP != 0 {
            return S_UNSUPP;
        }
        if self.backend.is_read_only() {
            return S_IOERR;
        }
        let len = u64::from(sectors) << SECTOR_SHIFT;
        let kind = if discard { IoType::Unmap } else { IoType::Write };
        let Some(offset) = self.in_range(kind, sector, len) else {
            return S_IOERR;
        };
        let result = if discard {
            self.backend.discard(offset, len)
        } else {
            self.backend.write_zeroes(offset, len)
        };
        match result {
            Ok(()) => S_OK,
            Err(e) => {
                log::debug!("virtio-blk: {} at {offset}: {e}", if discard { "discard" } else { "write-zeroes" });
                S_IOERR
            }
        }
    }
}
