//! The virtio memory balloon (QEMU's `hw/virtio/virtio-balloon.c`): the host asks the
//! guest for `num_pages` 4 KiB pages; the driver posts the frame numbers it gave up on the
//! inflate queue (their memory goes back to the host with `MADV_DONTNEED`) and those it
//! takes back on the deflate queue, then writes `actual`. The stats queue carries the
//! guest's memory statistics, polled every `guest-stats-polling-interval` seconds.
//!
//! The queues are served on the machine's main loop, never on a vCPU thread. Frame numbers
//! outside guest RAM are logged (rate-limited) and ignored, as QEMU ignores them.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use virtio_queue::{Queue, QueueT, Reader};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::core::balloon::{Balloon, BalloonHandler};
use crate::core::dirty_log::DirtyTracker;
use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::timer::DeviceTimer;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::virtio::virtio::{
    bit, device_id, drain_kick, feature, next_chain, read_config_bytes, ActivateError, Activation, QueuePosition,
    RateLimitedLog, RingError, VirtioDevice, VirtioTransport,
};

/// Feature bits (virtio 1.2, 5.5.3).
pub mod balloon_feature {
    /// The guest tells the host before using deflated pages (not offered, as QEMU).
    pub const MUST_TELL_HOST: u32 = 0;
    /// The stats queue.
    pub const STATS_VQ: u32 = 1;
    /// The guest deflates when it runs out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// The guest reports the value it poisons free pages with.
    pub const PAGE_POISON: u32 = 4;
}

/// Pages are 4 KiB whatever the host's page size (QEMU's `VIRTIO_BALLOON_PFN_SHIFT`).
pub const PFN_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PFN_SHIFT;
/// QEMU's queue size for the three queues.
const QUEUE_SIZE: u16 = 128;
const INFLATE: u16 = 0;
const DEFLATE: u16 = 1;
const STATS: u16 = 2;
/// Bytes of frame numbers read at a time.
const PFN_CHUNK: usize = 4096;

/// QEMU's `balloon_stat_names`, indexed by tag.
pub const STAT_NAMES: [&str; 10] = [
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
];

/// Guest errors of every balloon share one log budget.
static GUEST_ERRORS: std::sync::LazyLock<RateLimitedLog> =
    std::sync::LazyLock::new(RateLimitedLog::default);

/// Errors of `guest-stats-polling-interval`, in QEMU's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatsError {
    /// A negative interval.
    #[error("timer value must be greater than zero")]
    Negative,
    /// More than `u32::MAX` seconds.
    #[error("timer value is too big")]
    TooBig,
}

/// The guest's statistics and their polling (QEMU's `stats`, `stats_last_update`,
/// `stats_poll_interval`, `stats_timer`), shared by the device and its QOM properties.
#[derive(Default)]
pub struct BalloonStats {
    inner: Mutex<StatsInner>,
    /// Created when the device is realized.
    timer: OnceLock<Arc<DeviceTimer>>,
}

struct StatsInner {
    values: [u64; STAT_NAMES.len()],
    last_update: i64,
    poll_interval: i64,
}

impl Default for StatsInner {
    fn default() -> Self {
        StatsInner {
            values: [u64::MAX; STAT_NAMES.len()],
            last_update: 0,
            poll_interval: 0,
        }
    }
}

impl BalloonStats {
    /// `guest-stats-polling-interval`, in seconds (0: no polling).
    pub fn poll_interval(&self) -> i64 {
        self.inner.lock().poll_interval
    }

    /// QEMU's `balloon_stats_set_poll_interval`.
    pub fn set_poll_interval(&self, value: i64) -> Result<(), StatsError> {
        if value < 0 {
            return Err(StatsError::Negative);
        }
        if value > i64::from(u32::MAX) {
            return Err(StatsError::TooBig);
        }
        let mut inner = self.inner.lock();
        if value == inner.poll_interval {
            return Ok(());
        }
        inner.poll_interval = value;
        if let Some(timer) = self.timer.get() {
            let result = if value == 0 {
                timer.disarm()
            } else {
                timer.arm(Duration::from_secs(value as u64))
            };
            if let Err(e) = result {
                log::error!("virtio-balloon: cannot set the stats timer: {e}");
            }
        }
        Ok(())
    }

    /// `guest-stats`: each statistic by name (`u64::MAX` for those the guest did not
    /// report) and the time of the last update in seconds since the epoch (0: never).
    pub fn guest_stats(&self) -> (Vec<(&'static str, u64)>, i64) {
        let inner = self.inner.lock();
        let stats = STAT_NAMES
            .iter()
            .zip(inner.values)
            .map(|(&n, v)| (n, v))
            .collect();
        (stats, inner.last_update)
    }

    /// Arms the timer for the next poll, if polling is on.
    fn rearm(&self) {
        let interval = self.poll_interval();
        if let (true, Some(timer)) = (interval > 0, self.timer.get()) {
            if let Err(e) = timer.arm(Duration::from_secs(interval as u64)) {
                log::error!("virtio-balloon: cannot arm the stats timer: {e}");
            }
        }
    }

    /// A stats buffer arrived: `records` are the driver's `{le16 tag; le64 val}` entries.
    fn update(&self, records: &[u8]) {
        let mut inner = self.inner.lock();
        // Stale values go: a guest may report fewer statistics than it used to.
        inner.values = [u64::MAX; STAT_NAMES.len()];
        for r in records.chunks_exact(10) {
            let tag = usize::from(u16::from_le_bytes([r[0], r[1]]));
            let mut val = [0u8; 8];
            val.copy_from_slice(&r[2..10]);
            if let Some(slot) = inner.values.get_mut(tag) {
                *slot = u64::from_le_bytes(val);
            }
        }
        inner.last_update = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
    }
}

/// How the transport configured the device.
pub struct VirtioBalloonConf {
    /// Offer `DEFLATE_ON_OOM` (`deflate-on-oom`).
    pub deflate_on_oom: bool,
    /// Offer `PAGE_POISON` (`page-poison`).
    pub page_poison: bool,
    /// The machine's balloon slot.
    pub balloon: Arc<Balloon>,
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// Where the queues are served.
    pub context: Arc<AioContext>,
    /// The statistics the proxy's properties read.
    pub stats: Arc<BalloonStats>,
}

/// `struct virtio_balloon_config` as the driver sees it.
#[derive(Default)]
struct Config {
    num_pages: u32,
    actual: u32,
    poison_val: u32,
}

/// What the monitor's balloon slot and the queue handlers share.
struct Shared {
    config: Mutex<Config>,
    /// Set while the driver runs the device (config interrupts need `DRIVER_OK`).
    transport: Mutex<Option<Arc<dyn VirtioTransport>>>,
    ram_size: u64,
    balloon: Arc<Balloon>,
}

impl BalloonHandler for Shared {
    /// QEMU's `virtio_balloon_to_target`.
    fn to_target(&self, target: u64) {
        let target = target.min(self.ram_size);
        if target == 0 {
            return;
        }
        let pages = (self.ram_size - target) >> PFN_SHIFT;
        self.config.lock().num_pages = u32::try_from(pages).unwrap_or(u32::MAX);
        let transport = self.transport.lock().clone();
        if let Some(t) = transport {
            t.signal_config();
        }
    }

    /// QEMU's `virtio_balloon_stat`.
    fn actual(&self) -> u64 {
        let pages = u64::from(self.config.lock().actual);
        self.ram_size.saturating_sub(pages << PFN_SHIFT)
    }
}

/// QEMU's `VirtIOBalloon`.
pub struct VirtioBalloon {
    conf: VirtioBalloonConf,
    shared: Arc<Shared>,
    timer: Arc<DeviceTimer>,
    handlers: Mutex<Vec<AioHandlerId>>,
    /// The device while it runs: parking reads its rings from here.
    running: Mutex<Option<Arc<Running>>>,
}

/// Why a balloon cannot be realized, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioBalloonError {
    /// A second balloon in the machine.
    #[error("Only one balloon device is supported")]
    OnlyOne,
    /// The stats timer could not be created.
    #[error("cannot create the stats timer: {0}")]
    Timer(std::io::Error),
}

impl VirtioBalloon {
    /// A device over `conf`, registered as the machine's balloon.
    pub fn new(conf: VirtioBalloonConf) -> Result<Arc<Self>, VirtioBalloonError> {
        let timer = Arc::new(DeviceTimer::new().map_err(VirtioBalloonError::Timer)?);
        let _ = conf.stats.timer.set(timer.clone());
        let shared = Arc::new(Shared {
            config: Mutex::default(),
            transport: Mutex::new(None),
            ram_size: conf.ram_size,
            balloon: conf.balloon.clone(),
        });
        let handler: Arc<dyn BalloonHandler> = shared.clone();
        let weak: Weak<dyn BalloonHandler> = Arc::downgrade(&handler);
        conf.balloon
            .add_handler(weak)
            .map_err(|_| VirtioBalloonError::OnlyOne)?;
        // An interval set before realize starts polling now.
        conf.stats.rearm();
        Ok(Arc::new(VirtioBalloon {
            conf,
            shared,
            timer,
            handlers: Mutex::new(Vec::new()),
            running: Mutex::new(None),
        }))
    }

    /// Removes the handlers (waiting for one that runs) and returns the device that ran.
    fn stop(&self) -> Option<Arc<Running>> {
        self.conf.context.remove_fds(&self.handlers);
        self.running.lock().take()
    }

    fn config_bytes(&self) -> [u8; 16] {
        let c = self.shared.config.lock();
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&c.num_pages.to_le_bytes());
        b[4..8].copy_from_slice(&c.actual.to_le_bytes());
        b[12..16].copy_from_slice(&c.poison_val.to_le_bytes());
        b
    }
}

impl Drop for VirtioBalloon {
    fn drop(&mut self) {
        let handler: Arc<dyn BalloonHandler> = self.shared.clone();
        self.conf.balloon.remove_handler(&Arc::downgrade(&handler));
    }
}

impl VirtioDevice for VirtioBalloon {
    fn device_type(&self) -> u16 {
        device_id::BALLOON
    }

    fn name(&self) -> &'static str {
        "virtio-balloon"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        let mut f = bit(balloon_feature::STATS_VQ)
            | bit(feature::RING_INDIRECT_DESC)
            | bit(feature::RING_EVENT_IDX)
            | bit(feature::NOTIFY_ON_EMPTY)
            | bit(feature::ANY_LAYOUT);
        if self.conf.deflate_on_oom {
            f |= bit(balloon_feature::DEFLATE_ON_OOM);
        }
        if self.conf.page_poison {
            f |= bit(balloon_feature::PAGE_POISON);
        }
        f
    }

    /// QEMU's `virtio_balloon_config_size`: up to `poison_val` with page-poison.
    fn config_size(&self) -> usize {
        if self.conf.page_poison {
            16
        } else {
            8
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        read_config_bytes(&config[..self.config_size()], offset, data);
    }

    /// QEMU's `virtio_balloon_set_config`: `actual` (and `poison_val`) are the driver's.
    fn write_config(&self, offset: u64, data: &[u8]) {
        let mut bytes = self.config_bytes();
        let size = self.config_size();
        for (i, &b) in data.iter().enumerate() {
            match usize::try_from(offset).ok().map(|o| o + i) {
                Some(at @ 4..8) => bytes[at] = b,
                Some(at @ 12..16) if at < size => bytes[at] = b,
                _ => {}
            }
        }
        let changed = {
            let mut c = self.shared.config.lock();
            let actual = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            c.poison_val = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
            std::mem::replace(&mut c.actual, actual) != actual
        };
        if changed {
            self.shared.balloon.changed(self.shared.actual());
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
        let mut rings: [Option<Queue>; 3] = [None, None, None];
        let mut kicks = Vec::new();
        for q in queues {
            if let Some(slot) = rings.get_mut(usize::from(q.index)) {
                *slot = Some(q.queue);
                kicks.push((q.index, q.kick));
            }
        }
        let running = Arc::new(Running {
            mem,
            dirty,
            transport: transport.clone(),
            stats_negotiated: features & bit(balloon_feature::STATS_VQ) != 0,
            stats: self.conf.stats.clone(),
            timer: self.timer.clone(),
            state: Mutex::new(RunState {
                rings,
                broken: false,
                stats_elem: None,
            }),
        });
        *self.shared.transport.lock() = Some(transport);
        let mut handlers = self.handlers.lock();
        let ctx = &self.conf.context;
        let mut result = Ok(());
        for (index, kick) in kicks {
            let r = running.clone();
            let fd = kick.as_raw_fd();
            let handler = Box::new(move || {
                drain_kick(&kick);
                r.kick(index);
            });
            match ctx.add_fd(fd, handler) {
                Ok(id) => handlers.push(id),
                Err(e) => result = Err(e),
            }
        }
        let r = running.clone();
        match ctx.add_fd(self.timer.as_raw_fd(), Box::new(move || r.poll_stats())) {
            Ok(id) => handlers.push(id),
            Err(e) => result = Err(e),
        }
        drop(handlers);
        if let Err(e) = result {
            self.reset();
            return Err(ActivateError::Io {
                device: "virtio-balloon",
                reason: e.to_string(),
            });
        }
        *self.running.lock() = Some(running);
        Ok(())
    }

    /// QEMU's `virtio_balloon_device_reset`: the held stats buffer is dropped; the
    /// balloon's size stays as the last driver left it.
    fn reset(&self) {
        *self.shared.transport.lock() = None;
        self.stop();
        self.shared.config.lock().poison_val = 0;
    }

    /// Inflate and deflate buffers are used as they are popped; the stats buffer the
    /// device holds is given back (QEMU's `virtqueue_rewind` in its save), and the next
    /// run pops it again. Config interrupts (a new target) still reach the driver.
    fn park(&self) -> Option<Vec<QueuePosition>> {
        let running = self.stop()?;
        let st = running.state.lock();
        let positions = st
            .rings
            .iter()
            .enumerate()
            .filter_map(|(index, ring)| {
                let held = u16::from(index == usize::from(STATS) && st.stats_elem.is_some());
                ring.as_ref().map(|q| QueuePosition::of(index as u16, q, held))
            })
            .collect();
        Some(positions)
    }

    /// QEMU's `vmstate_virtio_balloon_device`: the target, the size the driver reports
    /// and the poison value.
    fn save_device(&self, section: &mut VmStateSection) -> Result<(), VmStateError> {
        let c = self.shared.config.lock();
        section.put("balloon.num_pages", c.num_pages);
        section.put("balloon.actual", c.actual);
        section.put("balloon.poison_val", c.poison_val);
        Ok(())
    }

    fn load_device(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let mut c = self.shared.config.lock();
        c.num_pages = section.get("balloon.num_pages")?;
        c.actual = section.get("balloon.actual")?;
        c.poison_val = section.get("balloon.poison_val")?;
        Ok(())
    }
}

/// The device while the driver runs it; its handlers run on the device's event loop.
struct Running {
    mem: Arc<GuestMemoryMmap>,
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    stats_negotiated: bool,
    stats: Arc<BalloonStats>,
    timer: Arc<DeviceTimer>,
    state: Mutex<RunState>,
}

struct RunState {
    rings: [Option<Queue>; 3],
    broken: bool,
    /// The stats buffer the device holds until the next poll (QEMU's `stats_vq_elem`).
    stats_elem: Option<u16>,
}

impl Running {
    fn kick(&self, index: u16) {
        let mut st = self.state.lock();
        if st.broken {
            return;
        }
        let result = match index {
            INFLATE | DEFLATE => self.handle_pages(&mut st, index),
            STATS => self.receive_stats(&mut st),
            _ => Ok(()),
        };
        if let Err(e) = result {
            st.broken = true;
            GUEST_ERRORS.warn(|| format!("virtio-balloon: queue {index}: {e}: device needs reset"));
            self.transport.mark_broken();
        }
    }

    /// QEMU's `virtio_balloon_handle_output`: each buffer is a list of le32 frame numbers.
    fn handle_pages(&self, st: &mut RunState, index: u16) -> Result<(), RingError> {
        let mem = &*self.mem;
        let Some(queue) = st.rings[usize::from(index)].as_mut() else {
            return Ok(());
        };
        let advice = if index == INFLATE {
            libc::MADV_DONTNEED
        } else {
            libc::MADV_WILLNEED
        };
        let mut used = false;
        queue.disable_notification(mem)?;
        while let Some(chain) = next_chain(queue, &self.mem)? {
            let head = chain.head_index();
            let mut reader =
                Reader::new(mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
            // A buffer names each guest page at most once, so a longer one is malformed:
            // without this bound one descriptor of guest RAM full of frame numbers made
            // millions of madvise calls while the driver's reset waited for the handler.
            let frames = (reader.available_bytes() / 4) as u64;
            let guest_pages: u64 = mem.iter().map(|r| r.len() / PAGE).sum();
            if frames > guest_pages {
                return Err(RingError::Chain(format!(
                    "a buffer of {frames} frame numbers, more than the guest's {guest_pages} pages"
                )));
            }
            let mut buf = [0u8; PFN_CHUNK];
            // Consecutive frames are advised together: one system call per run; a frame
            // already in the run (repeated) is not advised again.
            let mut run: Option<(u64, u64)> = None;
            loop {
                let n = reader.available_bytes().min(PFN_CHUNK) & !3;
                if n == 0 {
                    break;
                }
                reader
                    .read_exact(&mut buf[..n])
                    .map_err(|e| RingError::Chain(e.to_string()))?;
                for pfn in buf[..n].chunks_exact(4) {
                    let pa = u64::from(u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]])) << PFN_SHIFT;
                    match run {
                        Some((start, len)) if start + len == pa => run = Some((start, len + PAGE)),
                        Some((start, len)) if (start..start + len).contains(&pa) => {}
                        Some((start, len)) => {
                            self.advise(start, len, advice);
                            run = Some((pa, PAGE));
                        }
                        None => run = Some((pa, PAGE)),
                    }
                }
            }
            if let Some((start, len)) = run {
                self.advise(start, len, advice);
            }
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        if used && queue.needs_notification(mem)? {
            self.transport.signal_used_queue(index);
        }
        Ok(())
    }

    /// Gives `len` bytes of guest RAM at `pa` back to the host (inflate) or asks for them
    /// early (deflate). A range that is not all RAM of one region goes page by page;
    /// pages outside RAM are ignored.
    fn advise(&self, pa: u64, len: u64, advice: libc::c_int) {
        let Ok(size) = usize::try_from(len) else {
            return;
        };
        match self.mem.get_slice(GuestAddress(pa), size) {
            Ok(slice) => {
                let ptr = slice.ptr_guard_mut().as_ptr();
                // SAFETY: `ptr..ptr + size` lies inside one guest RAM mapping, which `self.mem`
                // keeps mapped; the guest gave these pages up (inflate), so dropping their
                // contents is what the balloon protocol allows: they read back as zeros.
                // WILLNEED only reads ahead.
                let ret = unsafe { libc::madvise(ptr.cast(), size, advice) };
                if advice == libc::MADV_DONTNEED {
                    // The pages now read as zeros with no write KVM could log: a
                    // migration's destination must not keep its older copy.
                    self.dirty.mark(pa, len);
                }
                if ret != 0 {
                    let e = std::io::Error::last_os_error();
                    GUEST_ERRORS.warn(|| format!("virtio-balloon: madvise at 0x{pa:x}: {e}"));
                }
            }
            Err(_) if len > PAGE => {
                for page in (0..len / PAGE).map(|i| pa + i * PAGE) {
                    self.advise(page, PAGE, advice);
                }
            }
            Err(_) => {
                GUEST_ERRORS.warn(|| format!("virtio-balloon: page 0x{pa:x} is not guest RAM, ignored"));
            }
        }
    }

    /// QEMU's `virtio_balloon_receive_stats`: the device keeps the buffer until it polls.
    fn receive_stats(&self, st: &mut RunState) -> Result<(), RingError> {
        let mem = &*self.mem;
        let Some(queue) = st.rings[STATS as usize].as_mut() else {
            return Ok(());
        };
        let mut received = false;
        queue.disable_notification(mem)?;
        while let Some(chain) = next_chain(queue, &self.mem)? {
            if let Some(old) = st.stats_elem.take() {
                // Only a driver that breaks the protocol posts a second buffer.
                queue.add_used(mem, old, 0)?;
                self.transport.signal_used_queue(STATS);
            }
            let head = chain.head_index();
            let mut reader =
                Reader::new(mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
            // At most one record per tag is kept; anything past a page is ignored.
            let n = reader.available_bytes().min(PFN_CHUNK);
            let mut records = vec![0u8; n - n % 10];
            reader
                .read_exact(&mut records)
                .map_err(|e| RingError::Chain(e.to_string()))?;
            self.stats.update(&records);
            st.stats_elem = Some(head);
            received = true;
        }
        if received {
            self.stats.rearm();
        }
        Ok(())
    }

    /// QEMU's `balloon_stats_poll_cb`: hands the held buffer back, so the driver refills it.
    fn poll_stats(&self) {
        if !self.timer.take_expired() {
            return;
        }
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if st.broken {
            return;
        }
        let (Some(head), true) = (st.stats_elem, self.stats_negotiated) else {
            self.stats.rearm();
            return;
        };
        let mem = &*self.mem;
        let Some(queue) = st.rings[STATS as usize].as_mut() else {
            return;
        };
        st.stats_elem = None;
        if let Err(e) = queue.add_used(mem, head, 0) {
            st.broken = true;
            GUEST_ERRORS.warn(|| format!("virtio-balloon: queue {STATS}: {e}: device needs reset"));
            self.transport.mark_broken();
            return;
        }
        self.transport.signal_used_queue(STATS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_records_and_the_interval_follow_qemu() {
        let s = BalloonStats::default();
        let (stats, last) = s.guest_stats();
        assert_eq!(last, 0);
        assert!(stats.iter().all(|&(_, v)| v == u64::MAX));
        let mut records = Vec::new();
        for (tag, val) in [(4u16, 1000u64), (5, 2000), (77, 5)] {
            records.extend_from_slice(&tag.to_le_bytes());
            records.extend_from_slice(&val.to_le_bytes());
        }
        s.update(&records);
        let (stats, last) = s.guest_stats();
        assert!(last > 0);
        assert_eq!(stats[4], ("stat-free-memory", 1000));
        assert_eq!(stats[5], ("stat-total-memory", 2000));
        assert_eq!(stats[0].1, u64::MAX, "unreported stays -1");
        assert_eq!(s.set_poll_interval(-1), Err(StatsError::Negative));
        assert_eq!(
            s.set_poll_interval(1 << 32).unwrap_err().to_string(),
            "timer value is too big"
        );
        s.set_poll_interval(2).unwrap();
        assert_eq!(s.poll_interval(), 2);
    }
}
