//! The virtio SCSI host adapter (QEMU's `hw/scsi/virtio-scsi.c`): its request queues
//! carry SCSI commands to the logical units on its bus (`scsi-hd`), its control queue
//! task management and asynchronous-notification requests, and its event queue tells
//! the driver of units plugged in or taken out while it runs (`VIRTIO_SCSI_F_HOTPLUG`).
//!
//! Queues are served on the adapter's event loop (an `-object iothread` or the main
//! loop): a lone command runs there, commands in numbers on the adapter's thread pool
//! (QEMU's `aio=threads`), each completing into the used ring under the ring's lock. A
//! task management function, a reset, a stop and an unplug wait for the commands on the
//! pool, so none is left to abort and every command taken has its used entry.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use crate::core::accel_ops::EventFd;
use crate::core::dirty_log::DirtyTracker;
use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::thread_pool::{InFlight, ThreadPool};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::scsi::scsi_bus::{Dispatch, ScsiAddress, ScsiBusInfo, ScsiData, ScsiLuns, ScsiOutcome, Sense};
use crate::virtio::virtio::{
    bit, chain_slices, device_id, drain_kick, feature, mark_chain_written, read_config_bytes, ActivateError, Activation,
    QueuePosition, RateLimitedLog, RingError, VirtioDevice, VirtioTransport,
};

/// Feature bits (virtio 1.2, 5.6.3).
const F_HOTPLUG: u32 = 1;
/// `VIRTIO_SCSI_F_CHANGE`: the driver hears of units' changed parameters.
const F_CHANGE: u32 = 2;

/// The adapter's addressing (QEMU's `virtio_scsi_scsi_info`).
pub const BUS_INFO: ScsiBusInfo = ScsiBusInfo {
    max_channel: 0,
    max_target: 255,
    max_lun: 16383,
};

/// Queue indices: control, event, then the request queues.
const CONTROL: u16 = 0;
const EVENT: u16 = 1;
const FIRST_REQUEST: u16 = 2;

/// The driver's defaults for the sizes it may change in the configuration.
const SENSE_SIZE: u32 = 96;
const CDB_SIZE: u32 = 32;
/// The event structure: event, lun, reason.
const EVENT_SIZE: u32 = 16;
/// `struct virtio_scsi_config`.
const CONFIG_SIZE: usize = 0x24;

/// Request header without its CDB: lun, tag, task attribute, priority, crn.
const REQ_HEADER: usize = 8 + 8 + 3;
/// Response header without its sense: sense_len, resid, status_qualifier, status, response.
const RESP_HEADER: usize = 4 + 4 + 2 + 1 + 1;

/// Response codes (virtio 1.2, 5.6.6.1).
mod response {
    pub const OK: u8 = 0;
    pub const OVERRUN: u8 = 1;
    pub const BAD_TARGET: u8 = 3;
    pub const FUNCTION_REJECTED: u8 = 11;
    pub const INCORRECT_LUN: u8 = 12;
}

/// Control request types and task management functions.
mod ctrl {
    pub const TMF: u32 = 0;
    pub const AN_QUERY: u32 = 1;
    pub const AN_SUBSCRIBE: u32 = 2;
    pub const ABORT_TASK: u32 = 0;
    pub const ABORT_TASK_SET: u32 = 1;
    pub const CLEAR_TASK_SET: u32 = 3;
    pub const I_T_NEXUS_RESET: u32 = 4;
    pub const LOGICAL_UNIT_RESET: u32 = 5;
    pub const QUERY_TASK: u32 = 6;
    pub const QUERY_TASK_SET: u32 = 7;
}

/// Events (virtio 1.2, 5.6.6.3).
mod event {
    pub const NO_EVENT: u32 = 0;
    pub const TRANSPORT_RESET: u32 = 1;
    pub const PARAM_CHANGE: u32 = 3;
    pub const EVENTS_MISSED: u32 = 0x8000_0000;
    pub const REASON_RESCAN: u32 = 1;
    pub const REASON_REMOVED: u32 = 2;
}

/// How the transport configured the adapter (its properties, resolved).
pub struct VirtioScsiConf {
    /// Request queues.
    pub num_queues: u16,
    /// Each queue's maximum size.
    pub queue_size: u16,
    /// Largest transfer in 512-byte sectors the driver should send.
    pub max_sectors: u32,
    /// Commands the driver may queue per LUN.
    pub cmd_per_lun: u32,
    /// Offer `VIRTIO_SCSI_F_HOTPLUG`.
    pub hotplug: bool,
    /// Offer `VIRTIO_SCSI_F_CHANGE` (`param_change`).
    pub param_change: bool,
    /// Where requests are served.
    pub context: Arc<AioContext>,
}

/// QEMU's `VirtIOSCSI`.
pub struct VirtioScsi {
    conf: VirtioScsiConf,
    luns: Arc<ScsiLuns>,
    /// The driver-writable `sense_size` and `cdb_size`.
    sizes: Mutex<(u32, u32)>,
    handlers: Mutex<Vec<AioHandlerId>>,
    running: Mutex<Option<Arc<Running>>>,
    /// An event found no buffer, or came while the device was stopped: the driver is
    /// told `EVENTS_MISSED` with the next event or buffer (kept across a stop and a
    /// migration).
    events_dropped: Arc<AtomicBool>,
    /// The features of a driver whose device is stopped (parked), not reset.
    parked_features: Mutex<Option<u64>>,
    /// QEMU's `aio=threads` pool: commands wait on the disk here, several at a time.
    pool: ThreadPool,
    in_flight: Arc<InFlight>,
}

/// Guest errors of every virtio-scsi adapter share one log budget.
static GUEST_ERRORS: std::sync::LazyLock<RateLimitedLog> = std::sync::LazyLock::new(RateLimitedLog::default);

type Chain = DescriptorChain<Arc<GuestMemoryMmap>>;

fn chain_error(e: impl std::fmt::Display) -> RingError {
    RingError::Chain(e.to_string())
}

impl VirtioScsi {
    /// An adapter over `conf`, addressing the units in `luns`.
    pub fn new(conf: VirtioScsiConf, luns: Arc<ScsiLuns>) -> Self {
        let in_flight = Arc::new(InFlight::default());
        // A unit that leaves waits for the loop's pass (commands being taken) and for the
        // commands on the pool; then none runs on it. The wait is on the loop, which takes
        // no new commands meanwhile: a guest cannot keep it going.
        let (context, waited) = (conf.context.clone(), in_flight.clone());
        luns.set_drain(Box::new(move || {
            let waited = waited.clone();
            context.run_sync(Box::new(move || waited.drain()));
        }));
        VirtioScsi {
            conf,
            luns,
            sizes: Mutex::new((SENSE_SIZE, CDB_SIZE)),
            handlers: Mutex::new(Vec::new()),
            running: Mutex::new(None),
            events_dropped: Arc::new(AtomicBool::new(false)),
            parked_features: Mutex::new(None),
            pool: ThreadPool::new("worker", POOL_THREADS),
            in_flight,
        }
    }

    /// Removes the handlers and waits for the commands on the pool: every command taken
    /// has its used entry.
    fn stop(&self) -> Option<Arc<Running>> {
        // Lifted first, for a kick handler serving a command itself.
        let _lifted = self.luns.lift_limits();
        self.conf.context.remove_fds(&self.handlers);
        self.in_flight.drain();
        self.running.lock().take()
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let c = &self.conf;
        let (sense_size, cdb_size) = *self.sizes.lock();
        let mut b = [0u8; CONFIG_SIZE];
        b[0x00..0x04].copy_from_slice(&u32::from(c.num_queues).to_le_bytes());
        // seg_max as QEMU's seg_max_adjust sets it.
        b[0x04..0x08].copy_from_slice(&u32::from(c.queue_size.saturating_sub(2)).to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&c.max_sectors.to_le_bytes());
        b[0x0c..0x10].copy_from_slice(&c.cmd_per_lun.to_le_bytes());
        b[0x10..0x14].copy_from_slice(&EVENT_SIZE.to_le_bytes());
        b[0x14..0x18].copy_from_slice(&sense_size.to_le_bytes());
        b[0x18..0x1c].copy_from_slice(&cdb_size.to_le_bytes());
        b[0x1c..0x1e].copy_from_slice(&(BUS_INFO.max_channel as u16).to_le_bytes());
        b[0x1e..0x20].copy_from_slice(&(BUS_INFO.max_target as u16).to_le_bytes());
        b[0x20..0x24].copy_from_slice(&BUS_INFO.max_lun.to_le_bytes());
        b
    }

    /// Tells a running driver that the unit at `addr` was plugged in (`removed`: taken
    /// out), as QEMU's `virtio_scsi_push_event` with `TRANSPORT_RESET`. A driver that
    /// did not take `VIRTIO_SCSI_F_HOTPLUG`, or none, learns of it at its next scan.
    pub fn notify_hotplug(&self, addr: ScsiAddress, removed: bool) {
        let Some(running) = self.running.lock().clone() else {
            // A stopped device's driver hears of it as a missed event when it runs again.
            if self.parked_features.lock().is_some_and(|f| f & bit(F_HOTPLUG) != 0) {
                self.events_dropped.store(true, Ordering::Release);
            }
            return;
        };
        if running.features & bit(F_HOTPLUG) == 0 {
            return;
        }
        let reason = if removed { event::REASON_REMOVED } else { event::REASON_RESCAN };
        running.push_event(event::TRANSPORT_RESET, Some(addr), reason);
    }

    /// Tells a running driver that took `VIRTIO_SCSI_F_CHANGE` that the unit at `addr`
    /// reported `sense` (QEMU's `virtio_scsi_change`: a `PARAM_CHANGE` event whose reason
    /// is the sense's ASC and ASCQ). Linux rescans the unit on it.
    pub fn notify_change(&self, addr: ScsiAddress, sense: Sense) {
        let Some(running) = self.running.lock().clone() else { return };
        if running.features & bit(F_CHANGE) == 0 {
            return;
        }
        let reason = u32::from(sense.asc) | u32::from(sense.ascq) << 8;
        running.push_event(event::PARAM_CHANGE, Some(addr), reason);
    }
}

impl VirtioDevice for VirtioScsi {
    fn device_type(&self) -> u16 {
        device_id::SCSI
    }

    fn name(&self) -> &'static str {
        "virtio-scsi"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.conf.queue_size; usize::from(FIRST_REQUEST + self.conf.num_queues)]
    }

    fn device_features(&self) -> u64 {
        let mut features = bit(feature::RING_INDIRECT_DESC)
            | bit(feature::RING_EVENT_IDX)
            | bit(feature::NOTIFY_ON_EMPTY)
            | bit(feature::ANY_LAYOUT);
        if self.conf.hotplug {
            features |= bit(F_HOTPLUG);
        }
        if self.conf.param_change {
            features |= bit(F_CHANGE);
        }
        features
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    /// `sense_size` and `cdb_size` are the driver's to set; values beyond what the
    /// request layout can carry (QEMU's limits: 65535 and 255) are ignored.
    fn write_config(&self, offset: u64, data: &[u8]) {
        let mut config = self.config_bytes();
        let Some(end) = (offset as usize).checked_add(data.len()) else {
            return;
        };
        if offset < 0x14 || end > 0x1c {
            return;
        }
        config[offset as usize..end].copy_from_slice(data);
        let le = |at: usize| u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]]);
        let (sense_size, cdb_size) = (le(0x14), le(0x18));
        if sense_size < 65536 && cdb_size < 256 {
            *self.sizes.lock() = (sense_size, cdb_size);
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
        let (sense_size, cdb_size) = *self.sizes.lock();
        let mut kicks = Vec::new();
        let mut event_queue = None;
        let mut served = Vec::new();
        let mut event_kick = None;
        for q in queues {
            if q.index == EVENT {
                event_kick = Some(q.kick.clone());
            }
            kicks.push((q.index, q.kick.clone()));
            match q.index {
                EVENT => event_queue = Some(q.queue),
                index => served.push(ServedQueue {
                    index,
                    queue: Mutex::new(q.queue),
                    kick: q.kick.clone(),
                    outstanding: Default::default(),
                }),
            }
        }
        let running = Arc::new(Running {
            mem,
            dirty,
            transport,
            features,
            luns: self.luns.clone(),
            sense_size: sense_size as usize,
            cdb_size: cdb_size as usize,
            queues: served,
            events: Mutex::new(event_queue),
            events_dropped: self.events_dropped.clone(),
            pool: self.pool.clone(),
            drive_pools: Mutex::new(HashMap::new()),
            in_flight: self.in_flight.clone(),
            broken: AtomicBool::new(false),
        });
        *self.running.lock() = Some(running.clone());
        let mut handlers = self.handlers.lock();
        for (index, kick) in kicks {
            let on_kick = running.clone();
            let fd = kick.as_raw_fd();
            let handler = Box::new(move || {
                drain_kick(&kick);
                on_kick.process(index);
            });
            match self.conf.context.add_fd(fd, handler) {
                Ok(id) => handlers.push(id),
                Err(e) => {
                    drop(handlers);
                    self.reset();
                    return Err(ActivateError::Io {
                        device: "virtio-scsi",
                        reason: e.to_string(),
                    });
                }
            }
        }
        drop(handlers);
        *self.parked_features.lock() = None;
        // What was missed while the device was stopped goes out from the event queue's
        // handler on the loop: not here, under the transport's lock, which a broken ring
        // would take again to mark the device.
        if running.events_dropped.load(Ordering::Acquire) {
            if let Some(kick) = &event_kick {
                let _ = kick.write(1);
            }
        }
        Ok(())
    }

    /// QEMU's `virtio_scsi_reset`: the queues stop, the units are reset, the driver's
    /// sizes go back to their defaults, missed events are forgotten.
    fn reset(&self) {
        self.stop();
        self.luns.reset_all();
        *self.sizes.lock() = (SENSE_SIZE, CDB_SIZE);
        *self.parked_features.lock() = None;
        self.events_dropped.store(false, Ordering::Release);
    }

    /// Every command completes in its handler, so nothing is in flight once they are
    /// removed; the event queue keeps its buffers where the driver put them.
    fn park(&self) -> Option<Vec<QueuePosition>> {
        let running = self.stop()?;
        *self.parked_features.lock() = Some(running.features);
        let mut positions: Vec<QueuePosition> = running
            .queues
            .iter()
            .map(|q| QueuePosition::of(q.index, &q.queue.lock(), 0))
            .collect();
        if let Some(q) = &*running.events.lock() {
            positions.push(QueuePosition::of(EVENT, q, 0));
        }
        positions.sort_by_key(|p| p.index);
        Some(positions)
    }

    fn save_device(&self, section: &mut VmStateSection) -> Result<(), VmStateError> {
        let (sense_size, cdb_size) = *self.sizes.lock();
        section.put("scsi.sense_size", sense_size);
        section.put("scsi.cdb_size", cdb_size);
        section.put("scsi.num_queues", self.conf.num_queues);
        section.put("scsi.events_dropped", self.events_dropped.load(Ordering::Acquire));
        Ok(())
    }

    fn load_device(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let queues: u16 = section.get("scsi.num_queues")?;
        if queues != self.conf.num_queues {
            return Err(VmStateError::Mismatch(format!(
                "virtio-scsi: {queues} request queues saved, this device has {}",
                self.conf.num_queues
            )));
        }
        let (sense_size, cdb_size): (u32, u32) = (section.get("scsi.sense_size")?, section.get("scsi.cdb_size")?);
        if sense_size >= 65536 || cdb_size >= 256 {
            return Err(VmStateError::Mismatch(format!(
                "virtio-scsi: sense size {sense_size} or CDB size {cdb_size} out of range"
            )));
        }
        *self.sizes.lock() = (sense_size, cdb_size);
        self.events_dropped
            .store(section.get("scsi.events_dropped")?, Ordering::Release);
        Ok(())
    }
}

/// A control or request queue.
struct ServedQueue {
    index: u16,
    queue: Mutex<Queue>,
    /// The driver's notifications; the handler signals it itself to come back for more.
    kick: Arc<EventFd>,
    /// Commands taken and not yet used: at most the ring's size.
    outstanding: crate::virtio::virtio::Outstanding,
}

/// Commands a handler takes before it lets the event loop's other handlers run: a guest
/// that keeps its ring full must not keep the loop (shared with other devices by default)
/// to itself.
const COMMANDS_PER_PASS: usize = 64;
/// Worker threads of an adapter's pool (QEMU's thread pool default `max_threads`).
const POOL_THREADS: usize = 64;

/// The adapter while the driver runs it. Its handlers run on the adapter's event loop.
struct Running {
    mem: Arc<GuestMemoryMmap>,
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    features: u64,
    luns: Arc<ScsiLuns>,
    sense_size: usize,
    cdb_size: usize,
    /// The control and request queues.
    queues: Vec<ServedQueue>,
    /// The event queue, if the driver enabled it.
    events: Mutex<Option<Queue>>,
    /// Shared with the device (see `VirtioScsi::events_dropped`).
    events_dropped: Arc<AtomicBool>,
    pool: ThreadPool,
    /// Where commands to throttled units wait, a pool per drive (by address): a unit
    /// waiting for its limits holds up itself alone, and the units of one throttle group
    /// all reach the group's turns (QEMU queues such requests in their group without a
    /// thread; here each holds a worker).
    drive_pools: Mutex<HashMap<usize, ThreadPool>>,
    in_flight: Arc<InFlight>,
    broken: AtomicBool,
}

/// A virtio LUN field as an address: `None` for one that names no unit on this bus
/// (QEMU's `virtio_scsi_device_get`).
fn decode_lun(lun: &[u8; 8]) -> Option<ScsiAddress> {
    if lun[0] != 1 || (lun[2] != 0 && !(0x40..0x80).contains(&lun[2])) {
        return None;
    }
    Some(ScsiAddress {
        channel: 0,
        target: u32::from(lun[1]),
        lun: ((u32::from(lun[2]) << 8) | u32::from(lun[3])) & 0x3fff,
    })
}

/// The address as an event's LUN field: as REPORT LUNS lists it (flat space addressing
/// only from LUN 256), which is how Linux looks the unit up.
fn encode_lun(addr: ScsiAddress) -> [u8; 8] {
    let mut lun = [0u8; 8];
    lun[0] = 1;
    lun[1] = addr.target as u8;
    if addr.lun >= 256 {
        lun[2] = ((addr.lun >> 8) as u8) | 0x40;
    }
    lun[3] = addr.lun as u8;
    lun
}

impl Running {
    /// A kick of queue `index`: serves every available chain, then interrupts once.
    fn process(self: &Arc<Self>, index: u16) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        if index == EVENT {
            // Buffers arrived: an event that found none can be reported as missed now.
            if self.events_dropped.load(Ordering::Acquire) {
                self.push_event(event::NO_EVENT, None, 0);
            }
            return;
        }
        let Some(served) = self.queues.iter().find(|q| q.index == index) else {
            return;
        };
        let (mut chains, more) = match self.take(served) {
            Ok(taken) => taken,
            Err(e) => return self.fail(index, e),
        };
        if more {
            // The rest on the loop's next pass.
            let _ = served.kick.write(1);
        }
        // Control requests and a lone command with nothing in flight are served here (no
        // hand-off latency); commands in numbers go to the pool, so they wait on the disk
        // together.
        // Under I/O limits a command may wait: all go to the pool, so the event loop never
        // waits for the limits.
        let throttled = index != CONTROL && self.luns.any_throttled();
        if index == CONTROL || (chains.len() == 1 && self.in_flight.is_idle() && !throttled) {
            for chain in chains {
                self.serve_and_complete(served, chain);
            }
            return;
        }
        let last = if throttled { None } else { chains.pop() };
        for chain in chains {
            let pool = if throttled { self.pool_for(&chain) } else { self.pool.clone() };
            self.in_flight.begin();
            let running = Arc::clone(self);
            pool.submit(Box::new(move || {
                if let Some(served) = running.queues.iter().find(|q| q.index == index) {
                    running.serve_and_complete(served, chain);
                }
                running.in_flight.end();
            }));
        }
        if let Some(chain) = last {
            self.serve_and_complete(served, chain);
        }
    }

    /// The pool a command waits on: its throttled drive's, or the adapter's.
    fn pool_for(&self, chain: &Chain) -> ThreadPool {
        let drive = self
            .peek_lun(chain)
            .and_then(|lun| decode_lun(&lun))
            .and_then(|addr| self.luns.throttled_drive(addr));
        match drive {
            None => self.pool.clone(),
            Some(drive) => {
                let mut pools = self.drive_pools.lock();
                // Pools without workers hold nothing: those of drives gone (a medium
                // changed, a unit unplugged) go.
                pools.retain(|_, pool| pool.threads() > 0);
                pools
                    .entry(Arc::as_ptr(&drive) as usize)
                    .or_insert_with(|| ThreadPool::new("worker", POOL_THREADS))
                    .clone()
            }
        }
    }

    /// The LUN field a command's header starts with, if the chain holds one.
    fn peek_lun(&self, chain: &Chain) -> Option<[u8; 8]> {
        let mut reader = Reader::new(&*self.mem, chain.clone()).ok()?;
        let mut lun = [0u8; 8];
        reader.read_exact(&mut lun).ok()?;
        Some(lun)
    }

    /// Takes the available chains, at most [`COMMANDS_PER_PASS`], until the ring stays
    /// empty with notifications on; `true` with them if there may be more.
    fn take(&self, served: &ServedQueue) -> Result<(Vec<Chain>, bool), RingError> {
        let mem = &*self.mem;
        let mut queue = served.queue.lock();
        let mut chains = Vec::new();
        loop {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.iter(self.mem.clone())?.next() {
                served.outstanding.take(queue.size())?;
                chains.push(chain);
                if chains.len() == COMMANDS_PER_PASS {
                    return Ok((chains, true));
                }
            }
            if !queue.enable_notification(mem)? {
                return Ok((chains, false));
            }
        }
    }

    /// Serves one control request or command and puts it in the used ring.
    fn serve_and_complete(&self, served: &ServedQueue, chain: Chain) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let head = chain.head_index();
        let written = chain.clone();
        let len = if served.index == CONTROL {
            self.control(chain)
        } else {
            self.command(chain)
        };
        mark_chain_written(&self.dirty, &written);
        let mem = &*self.mem;
        let notify = len.and_then(|len| {
            let mut queue = served.queue.lock();
            queue.add_used(mem, head, len)?;
            served.outstanding.used();
            Ok(queue.needs_notification(mem)?)
        });
        match notify {
            Ok(true) => self.transport.signal_used_queue(served.index),
            Ok(false) => {}
            Err(e) => self.fail(served.index, e),
        }
    }

    fn fail(&self, index: u16, e: RingError) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            GUEST_ERRORS.warn(|| format!("virtio-scsi: queue {index}: {e}: device needs reset"));
            self.transport.mark_broken();
        }
    }

    /// One command request; returns the bytes written into the chain.
    fn command(&self, chain: Chain) -> Result<u32, RingError> {
        let mem = &*self.mem;
        let req_size = REQ_HEADER + self.cdb_size;
        let resp_size = RESP_HEADER + self.sense_size;
        let guest_out = chain_slices(mem, &chain, false, req_size);
        let guest_in = chain_slices(mem, &chain, true, resp_size);
        let mut reader = Reader::new(mem, chain.clone()).map_err(chain_error)?;
        let mut writer = Writer::new(mem, chain).map_err(chain_error)?;
        if reader.available_bytes() < req_size || writer.available_bytes() < resp_size {
            return Err(chain_error("bad request or response size"));
        }
        let mut header = vec![0u8; req_size];
        reader.read_exact(&mut header).map_err(chain_error)?;
        let mut data_in = writer.split_at(resp_size).map_err(chain_error)?;
        let lun: [u8; 8] = header[..8].try_into().unwrap_or_default();
        let cdb = &header[REQ_HEADER..];
        let data_in_len = data_in.available_bytes();
        let data_out_len = reader.available_bytes();
        let dispatch = match decode_lun(&lun) {
            None => Dispatch::NoTarget,
            Some(addr) => {
                let mut data = ScsiData {
                    data_out: &mut reader,
                    data_out_len,
                    data_in: &mut data_in,
                    data_in_len,
                    guest_out,
                    guest_in,
                };
                self.luns.execute(addr, cdb, &mut data)
            }
        };
        // The buffer the command's data went through, and what of it was not used.
        let buffer = if data_in_len > 0 { data_in_len } else { data_out_len };
        let mut resp = vec![0u8; resp_size];
        let mut sent = 0;
        match dispatch {
            Dispatch::NoTarget => resp[11] = response::BAD_TARGET,
            Dispatch::Done(ScsiOutcome::Overrun) => resp[11] = response::OVERRUN,
            Dispatch::Done(ScsiOutcome::Good { transferred }) => {
                let transferred = transferred.min(buffer);
                if data_in_len > 0 {
                    sent = transferred;
                }
                resp[4..8].copy_from_slice(&((buffer - transferred) as u32).to_le_bytes());
                resp[10] = crate::scsi::scsi_bus::status::GOOD;
                resp[11] = response::OK;
            }
            Dispatch::Done(ScsiOutcome::Check(sense)) => {
                let fixed = sense.fixed();
                let n = fixed.len().min(self.sense_size);
                resp[0..4].copy_from_slice(&(n as u32).to_le_bytes());
                resp[4..8].copy_from_slice(&(buffer as u32).to_le_bytes());
                resp[10] = crate::scsi::scsi_bus::status::CHECK_CONDITION;
                resp[11] = response::OK;
                resp[RESP_HEADER..RESP_HEADER + n].copy_from_slice(&fixed[..n]);
            }
        }
        writer.write_all(&resp).map_err(chain_error)?;
        Ok((resp_size + sent) as u32)
    }

    /// One control request (QEMU's `virtio_scsi_handle_ctrl_req`).
    fn control(&self, chain: Chain) -> Result<u32, RingError> {
        let mem = &*self.mem;
        let mut reader = Reader::new(mem, chain.clone()).map_err(chain_error)?;
        let mut writer = Writer::new(mem, chain).map_err(chain_error)?;
        let mut kind = [0u8; 4];
        reader.read_exact(&mut kind).map_err(|_| chain_error("control request without a type"))?;
        match u32::from_le_bytes(kind) {
            ctrl::TMF => {
                // subtype, lun, tag; the response is one byte.
                let mut req = [0u8; 20];
                reader.read_exact(&mut req).map_err(|_| chain_error("short task management request"))?;
                let subtype = u32::from_le_bytes(req[0..4].try_into().unwrap_or_default());
                let lun: [u8; 8] = req[4..12].try_into().unwrap_or_default();
                let code = self.task_management(subtype, &lun);
                writer.write_all(&[code]).map_err(|_| chain_error("no room for the response"))?;
                Ok(1)
            }
            ctrl::AN_QUERY | ctrl::AN_SUBSCRIBE => {
                // lun, event_requested; answers event_actual (none) and the response.
                let mut req = [0u8; 12];
                reader.read_exact(&mut req).map_err(|_| chain_error("short notification request"))?;
                writer
                    .write_all(&[0, 0, 0, 0, response::OK])
                    .map_err(|_| chain_error("no room for the response"))?;
                Ok(5)
            }
            // Completed with no answer, as QEMU does.
            _ => Ok(0),
        }
    }

    /// A task management function. Commands run to their end in their handler, so there
    /// is never a task to abort: the aborts complete at once.
    fn task_management(&self, subtype: u32, lun: &[u8; 8]) -> u8 {
        let Some(addr) = decode_lun(lun) else {
            return response::BAD_TARGET;
        };
        if !self.luns.has_target(addr.channel, addr.target) {
            return response::BAD_TARGET;
        }
        let unit = self.luns.find(addr);
        // Commands on the pool finish before the function is answered (past any I/O
        // limits): there is then no task left to abort, and a reset comes after them.
        let _lifted = self.luns.lift_limits();
        self.in_flight.drain();
        match subtype {
            ctrl::ABORT_TASK | ctrl::ABORT_TASK_SET | ctrl::CLEAR_TASK_SET | ctrl::QUERY_TASK
            | ctrl::QUERY_TASK_SET => {
                if unit.is_none() {
                    response::INCORRECT_LUN
                } else {
                    response::OK
                }
            }
            ctrl::LOGICAL_UNIT_RESET => match unit {
                Some(unit) => {
                    unit.reset();
                    response::OK
                }
                None => response::INCORRECT_LUN,
            },
            ctrl::I_T_NEXUS_RESET => {
                self.luns.reset_target(addr.channel, addr.target);
                response::OK
            }
            _ => response::FUNCTION_REJECTED,
        }
    }

    /// Puts an event in the driver's next event buffer, or records that one was missed.
    fn push_event(&self, kind: u32, addr: Option<ScsiAddress>, reason: u32) {
        let mem = &*self.mem;
        let mut events = self.events.lock();
        let Some(queue) = events.as_mut() else {
            self.events_dropped.store(true, Ordering::Release);
            return;
        };
        let result = (|| -> Result<bool, RingError> {
            let chain = queue.pop_descriptor_chain(self.mem.clone());
            // A kick for the next buffers: with event index, `avail_event` follows the
            // entries taken (a driver kicks only past it).
            queue.enable_notification(mem)?;
            let Some(chain) = chain else {
                self.events_dropped.store(true, Ordering::Release);
                return Ok(false);
            };
            let head = chain.head_index();
            let written = chain.clone();
            let mut writer = Writer::new(mem, chain).map_err(chain_error)?;
            let missed = match self.events_dropped.swap(false, Ordering::AcqRel) {
                true => event::EVENTS_MISSED,
                false => 0,
            };
            let mut ev = [0u8; EVENT_SIZE as usize];
            ev[0..4].copy_from_slice(&(kind | missed).to_le_bytes());
            if let Some(addr) = addr {
                ev[4..12].copy_from_slice(&encode_lun(addr));
            }
            ev[12..16].copy_from_slice(&reason.to_le_bytes());
            writer
                .write_all(&ev)
                .map_err(|_| chain_error("event buffer too small"))?;
            mark_chain_written(&self.dirty, &written);
            queue.add_used(mem, head, EVENT_SIZE)?;
            Ok(queue.needs_notification(mem)?)
        })();
        drop(events);
        match result {
            Ok(true) => self.transport.signal_used_queue(EVENT),
            Ok(false) => {}
            Err(e) => self.fail(EVENT, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luns_round_trip_through_the_virtio_format() {
        for (target, lun) in [(0, 0), (3, 1), (255, 16383)] {
            let addr = ScsiAddress { channel: 0, target, lun };
            assert_eq!(decode_lun(&encode_lun(addr)), Some(addr));
        }
        let low = encode_lun(ScsiAddress { channel: 0, target: 2, lun: 5 });
        assert_eq!(low, [1, 2, 0, 5, 0, 0, 0, 0], "peripheral addressing below LUN 256, as Linux reads it");
        let high = encode_lun(ScsiAddress { channel: 0, target: 2, lun: 300 });
        assert_eq!(high, [1, 2, 0x41, 0x2c, 0, 0, 0, 0], "flat space addressing from LUN 256");
        assert_eq!(decode_lun(&[0, 0, 0, 0, 0, 0, 0, 0]), None, "lun[0] must be 1");
        assert_eq!(decode_lun(&[1, 0, 0x80, 0, 0, 0, 0, 0]), None, "extended addressing");
        assert_eq!(
            decode_lun(&[1, 2, 0, 5, 0, 0, 0, 0]),
            Some(ScsiAddress { channel: 0, target: 2, lun: 5 }),
            "peripheral addressing of a LUN below 256"
        );
    }
}
