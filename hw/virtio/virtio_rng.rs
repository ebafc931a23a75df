//! The virtio entropy device (QEMU's `hw/virtio/virtio-rng.c`): one queue of
//! device-writable buffers that the device fills from an `rng-backend`, at most
//! `max-bytes` bytes every `period` milliseconds. Buffers are filled on an I/O thread (the
//! machine's main loop), never on a vCPU thread; a backend that has no bytes ready is
//! waited for there, not blocked on.
//!
//! Rate limiting is QEMU's token bucket: the first request of a period starts the period's
//! timer; bytes served take from the quota; when the timer fires the quota is full again
//! and the next request starts the next period.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};
use vm_memory::GuestMemoryMmap;

use crate::backends::rng::EntropySource;
use crate::core::dirty_log::DirtyTracker;
use crate::core::iothread::{AioContext, AioHandlerId, Interest};
use crate::core::timer::DeviceTimer;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::virtio::virtio::{
    bit, device_id, drain_kick, feature, mark_chain_written, ActivateError, Activation,
    QueuePosition, RateLimitedLog, RingError, VirtioDevice, VirtioTransport,
};

/// QEMU's queue size for virtio-rng.
const QUEUE_SIZE: u16 = 8;
/// Most bytes put in one buffer at a time: a guest's huge buffer costs time, not memory.
const MAX_CHUNK: usize = 64 * 1024;

/// How the transport configured the device.
pub struct VirtioRngConf {
    /// The backend's opened source.
    pub source: Arc<dyn EntropySource>,
    /// `max-bytes`: bytes per period.
    pub max_bytes: u64,
    /// `period`, in milliseconds (non-zero).
    pub period_ms: u32,
    /// Where buffers are filled.
    pub context: Arc<AioContext>,
}

/// QEMU's rate limit (`quota_remaining`, `activate_timer`, `check_rate_limit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    max_bytes: i64,
    quota_remaining: i64,
    activate_timer: bool,
}

impl RateLimit {
    /// A full bucket of `max_bytes` (QEMU refuses values above `i64::MAX` at realize).
    pub fn new(max_bytes: u64) -> Self {
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        RateLimit {
            max_bytes,
            quota_remaining: max_bytes,
            activate_timer: true,
        }
    }

    /// A request starts: whether it starts a period (its timer must be armed).
    pub fn start_request(&mut self) -> bool {
        std::mem::replace(&mut self.activate_timer, false)
    }

    /// The bytes a request may take now (QEMU caps a request at `u32::MAX`).
    pub fn quota(&self) -> u64 {
        u64::try_from(self.quota_remaining)
            .unwrap_or(0)
            .min(u64::from(u32::MAX))
    }

    /// `n` bytes were served.
    pub fn consume(&mut self, n: u64) {
        self.quota_remaining = self
            .quota_remaining
            .saturating_sub(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The period's timer fired (QEMU's `check_rate_limit`, before it serves).
    pub fn refill(&mut self) {
        self.quota_remaining = self.max_bytes;
    }

    /// After the refill's requests: the next request starts a new period.
    pub fn period_over(&mut self) {
        self.activate_timer = true;
    }

    /// What is left of this period's quota, exactly (for migration).
    pub fn remaining(&self) -> i64 {
        self.quota_remaining
    }

    /// Sets what is left of this period's quota (a migration's destination).
    pub fn set_remaining(&mut self, remaining: i64) {
        self.quota_remaining = remaining.min(self.max_bytes);
    }

    /// Whether a period runs (its timer armed by a request).
    pub fn period_running(&self) -> bool {
        !self.activate_timer
    }
}

/// Guest errors of every virtio-rng device share one log budget.
static GUEST_ERRORS: std::sync::LazyLock<RateLimitedLog> =
    std::sync::LazyLock::new(RateLimitedLog::default);

/// QEMU's `VirtIORNG`.
pub struct VirtioRng {
    conf: VirtioRngConf,
    /// The bucket outlives driver resets, as QEMU's does: a reset does not refill it.
    rate: Arc<Mutex<RateLimit>>,
    timer: Arc<DeviceTimer>,
    handlers: Mutex<Vec<AioHandlerId>>,
    /// The running device, while activated: parking reads its ring from here.
    running: Mutex<Option<Arc<Running>>>,
}

impl VirtioRng {
    /// A device over `conf`.
    pub fn new(conf: VirtioRngConf) -> io::Result<Self> {
        Ok(VirtioRng {
            rate: Arc::new(Mutex::new(RateLimit::new(conf.max_bytes))),
            conf,
            timer: Arc::new(DeviceTimer::new()?),
            handlers: Mutex::new(Vec::new()),
            running: Mutex::new(None),
        })
    }

    /// Removes the I/O handlers (waiting for one that runs) and returns the device that
    /// ran, if it did.
    fn stop(&self) -> Option<Arc<Running>> {
        self.conf.context.remove_fds(&self.handlers);
        self.running.lock().take()
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u16 {
        device_id::RNG
    }

    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        bit(feature::RING_INDIRECT_DESC)
            | bit(feature::RING_EVENT_IDX)
            | bit(feature::NOTIFY_ON_EMPTY)
            | bit(feature::ANY_LAYOUT)
    }

    fn config_size(&self) -> usize {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            transport,
            dirty,
            ..
        } = activation;
        let Some(q) = queues.into_iter().find(|q| q.index == 0) else {
            return Err(ActivateError::BadQueues {
                device: "virtio-rng",
                reason: "the request queue is not enabled".into(),
            });
        };
        let io_error = |e: io::Error| ActivateError::Io {
            device: "virtio-rng",
            reason: e.to_string(),
        };
        // Its own copy of the backend's descriptor: several devices may share a backend on
        // one event loop, and epoll takes each descriptor once.
        let wait_fd = match self.conf.source.wait_fd() {
            // SAFETY: the backend keeps its descriptor open while `source` lives, and the
            // borrow ends with the clone.
            Some(fd) => Some(unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(io_error)?),
            None => None,
        };
        let running = Arc::new(Running {
            mem,
            dirty,
            transport,
            source: self.conf.source.clone(),
            period: Duration::from_millis(self.conf.period_ms.into()),
            timer: self.timer.clone(),
            rate: self.rate.clone(),
            context: Arc::downgrade(&self.conf.context),
            state: Mutex::new(RunState {
                queue: q.queue,
                broken: false,
                wait_id: None,
                buf: Vec::new(),
            }),
            wait_fd,
        });
        let mut handlers = self.handlers.lock();
        let ctx = &self.conf.context;
        let kick = q.kick.clone();
        let on_kick = running.clone();
        let add = |fd, interest, handler| ctx.add_fd_with(fd, interest, handler);
        let result = (|| -> io::Result<()> {
            handlers.push(add(
                q.kick.as_raw_fd(),
                Interest::READ,
                Box::new(move || {
                    drain_kick(&kick);
                    on_kick.process();
                }),
            )?);
            let on_timer = running.clone();
            handlers.push(add(
                self.timer.as_raw_fd(),
                Interest::READ,
                Box::new(move || on_timer.period_elapsed()),
            )?);
            if let Some(fd) = &running.wait_fd {
                let on_ready = running.clone();
                match add(
                    fd.as_raw_fd(),
                    Interest::NONE,
                    Box::new(move || on_ready.source_ready()),
                ) {
                    Ok(id) => {
                        handlers.push(id);
                        running.state.lock().wait_id = Some(id);
                    }
                    // A regular file: epoll refuses it, and reading it never waits.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            drop(handlers);
            self.reset();
            return Err(io_error(e));
        }
        *self.running.lock() = Some(running);
        Ok(())
    }

    fn reset(&self) {
        self.stop();
    }

    /// Every buffer is filled or given back as it is popped (`fill`), so nothing is in
    /// flight once the handlers are gone. The rate limit's period goes on: its timer
    /// refills the quota when the device runs again.
    fn park(&self) -> Option<Vec<QueuePosition>> {
        let running = self.stop()?;
        let st = running.state.lock();
        Some(vec![QueuePosition::of(0, &st.queue, 0)])
    }

    /// What is left of the period's quota and whether a period runs (QEMU restarts the
    /// bucket instead, which lets a guest draw up to twice `max-bytes` across a migration).
    fn save_device(&self, section: &mut VmStateSection) -> Result<(), VmStateError> {
        let rate = self.rate.lock();
        section.put("rng.quota_remaining", rate.remaining());
        section.put("rng.period_running", rate.period_running());
        Ok(())
    }

    fn load_device(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let quota: i64 = section.get("rng.quota_remaining")?;
        let period_running: bool = section.get("rng.period_running")?;
        let mut rate = self.rate.lock();
        rate.set_remaining(quota);
        if period_running {
            // The period's remaining time is not known here: a whole one, the stricter.
            rate.start_request();
            if let Err(e) = self.timer.arm(Duration::from_millis(self.conf.period_ms.into())) {
                return Err(VmStateError::Host(format!("virtio-rng: cannot arm its timer: {e}")));
            }
        }
        Ok(())
    }
}

/// The device while the driver runs it. Its handlers run on the device's event loop.
struct Running {
    mem: Arc<GuestMemoryMmap>,
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    source: Arc<dyn EntropySource>,
    period: Duration,
    timer: Arc<DeviceTimer>,
    rate: Arc<Mutex<RateLimit>>,
    /// Handlers must not keep their own loop alive.
    context: Weak<AioContext>,
    state: Mutex<RunState>,
    wait_fd: Option<OwnedFd>,
}

struct RunState {
    queue: Queue,
    broken: bool,
    /// The handler of the backend's descriptor, enabled while bytes are awaited.
    wait_id: Option<AioHandlerId>,
    buf: Vec<u8>,
}

/// Why serving stopped.
enum Stop {
    /// No buffers left (notifications are on again).
    Empty,
    /// The period's quota is spent: the timer resumes.
    Quota,
    /// The backend has nothing ready: its descriptor resumes.
    Waiting,
    /// The backend failed or ran dry: the next kick retries.
    Source,
}

impl Running {
    /// The driver's kick (QEMU's `handle_input` -> `virtio_rng_process`).
    fn process(&self) {
        let mut st = self.state.lock();
        self.serve(&mut st);
    }

    /// The rate-limit timer (QEMU's `check_rate_limit`).
    fn period_elapsed(&self) {
        if !self.timer.take_expired() {
            return;
        }
        let mut st = self.state.lock();
        self.rate.lock().refill();
        self.serve(&mut st);
        self.rate.lock().period_over();
        // QEMU's chr_read asks again when buffers are left: that starts the next period.
        if self.has_pending(&mut st) {
            self.serve(&mut st);
        }
    }

    /// The backend's descriptor turned readable.
    fn source_ready(&self) {
        let mut st = self.state.lock();
        self.set_waiting(&mut st, false);
        self.serve(&mut st);
    }

    fn set_waiting(&self, st: &mut RunState, waiting: bool) {
        if let (Some(id), Some(ctx)) = (st.wait_id, self.context.upgrade()) {
            let interest = if waiting { Interest::READ } else { Interest::NONE };
            if let Err(e) = ctx.set_interest(id, interest) {
                log::error!("virtio-rng: cannot wait for the backend: {e}");
            }
        }
    }

    fn has_pending(&self, st: &mut RunState) -> bool {
        st.queue
            .avail_idx(&*self.mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != st.queue.next_avail())
    }

    /// Fills buffers while there are some, quota is left and the backend has bytes.
    fn serve(&self, st: &mut RunState) {
        if st.broken {
            return;
        }
        let mut used = false;
        let outcome = self.fill(st, &mut used);
        let notify = outcome.and_then(|stop| {
            if !matches!(stop, Stop::Empty) {
                // Let the driver's kicks through while the device waits.
                st.queue.enable_notification(&*self.mem)?;
            }
            if let Stop::Waiting = stop {
                self.set_waiting(st, true);
            }
            Ok(used && st.queue.needs_notification(&*self.mem)?)
        });
        match notify {
            Ok(true) => self.transport.signal_used_queue(0),
            Ok(false) => {}
            Err(e) => self.fail(st, e.into()),
        }
    }

    fn fill(&self, st: &mut RunState, used: &mut bool) -> Result<Stop, virtio_queue::Error> {
        let mem = &*self.mem;
        st.queue.disable_notification(mem)?;
        loop {
            {
                let mut rate = self.rate.lock();
                if rate.start_request() {
                    if let Err(e) = self.timer.arm(self.period) {
                        log::error!("virtio-rng: cannot arm the rate-limit timer: {e}");
                    }
                }
                if rate.quota() == 0 {
                    return Ok(Stop::Quota);
                }
            }
            let Some(chain) = st.queue.iter(self.mem.clone())?.next() else {
                if st.queue.enable_notification(mem)? {
                    continue;
                }
                return Ok(Stop::Empty);
            };
            let head = chain.head_index();
            let written = chain.clone();
            let mut writer = match Writer::new(mem, chain) {
                Ok(w) => w,
                Err(e) => {
                    self.fail(st, RingError::Chain(e.to_string()));
                    return Ok(Stop::Source);
                }
            };
            let quota = self.rate.lock().quota();
            let want = writer
                .available_bytes()
                .min(MAX_CHUNK)
                .min(usize::try_from(quota).unwrap_or(usize::MAX));
            let mut got = 0;
            if want > 0 {
                st.buf.resize(want, 0);
                match self.source.read(&mut st.buf[..want]) {
                    Ok(0) => {
                        st.queue.go_to_previous_position();
                        GUEST_ERRORS.warn(|| "virtio-rng: the entropy backend ran dry".into());
                        return Ok(Stop::Source);
                    }
                    Ok(n) => got = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        st.queue.go_to_previous_position();
                        return Ok(Stop::Waiting);
                    }
                    Err(e) => {
                        st.queue.go_to_previous_position();
                        GUEST_ERRORS.warn(|| format!("virtio-rng: reading the entropy backend: {e}"));
                        return Ok(Stop::Source);
                    }
                }
                let wrote = writer.write_all(&st.buf[..got]);
                mark_chain_written(&self.dirty, &written);
                if wrote.is_err() {
                    self.fail(st, RingError::Chain("cannot write the buffer".into()));
                    return Ok(Stop::Source);
                }
            }
            self.rate.lock().consume(got as u64);
            st.queue.add_used(mem, head, got as u32)?;
            *used = true;
        }
    }

    fn fail(&self, st: &mut RunState, e: RingError) {
        if !st.broken {
            st.broken = true;
            GUEST_ERRORS.warn(|| format!("virtio-rng: queue 0: {e}: device needs reset"));
            self.transport.mark_broken();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_is_qemus() {
        let mut r = RateLimit::new(100);
        assert!(r.start_request(), "the first request starts the period");
        assert_eq!(r.quota(), 100);
        r.consume(60);
        assert!(!r.start_request(), "later ones in the period do not");
        assert_eq!(r.quota(), 40);
        r.consume(40);
        assert_eq!(r.quota(), 0);
        r.refill();
        assert!(!r.start_request(), "the refill's own requests start nothing");
        assert_eq!(r.quota(), 100);
        r.period_over();
        assert!(r.start_request());
        // Overdraft stays owed (QEMU's quota_remaining goes negative).
        r.consume(150);
        assert_eq!(r.quota(), 0);
        // QEMU's default of i64::MAX bytes is capped at u32::MAX per request.
        let r = RateLimit::new(i64::MAX as u64);
        assert_eq!(r.quota(), u64::from(u32::MAX));
        assert_eq!(RateLimit::new(0).quota(), 0, "max-bytes=0 serves nothing");
    }
}
