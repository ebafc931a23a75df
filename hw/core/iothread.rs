//! Event-loop threads: QEMU's `AioContext` (`util/async.c`, `util/aio-posix.c`) and the
//! user-creatable `iothread` object (`iothread.c`).
//!
//! An [`AioContext`] is a thread waiting in `epoll_wait` on the descriptors handed to
//! [`AioContext::add_fd`], running each one's handler on that thread while the descriptor is
//! readable (level-triggered, as QEMU's `aio_set_fd_handler`). Devices put their I/O there,
//! never on vCPU threads: a virtqueue's ioeventfd becomes readable when the guest kicks, and
//! the handler processes the queue. Each `-object iothread,id=ID` owns one (thread `IO ID`);
//! devices without `iothread=` use the machine's main context
//! ([`MachineServices::main_context`](crate::core::services::MachineServices::main_context),
//! thread `main-loop`).
//!
//! Lock order: a context's table lock is never held while a handler runs; a handler's own
//! lock is held while it runs, and [`AioContext::remove_fd`] takes it to wait for a running
//! call. So a handler may add or remove handlers (its own included) and call
//! [`AioContext::run_sync`], but code that removes a handler from another thread must not
//! hold a lock that handler takes, as in QEMU.
//!
//! Handlers must not capture an `Arc` of their own context (the loop would keep itself
//! alive); they hold a `Weak` if they need it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle, ThreadId};

use parking_lot::Mutex;
use qom::{ObjectBase, Prop, UserCreatable};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// QEMU's `TYPE_IOTHREAD`.
pub const TYPE_IOTHREAD: &str = "iothread";

/// QEMU's `IOTHREAD_POLL_MAX_NS_DEFAULT` on Linux: adaptive polling up to 32 µs.
pub const IOTHREAD_POLL_MAX_NS_DEFAULT: i64 = 32768;

/// The epoll data of the context's own wake-up eventfd; handler ids start at 1.
const WAKE: u64 = 0;

/// Which readiness of a descriptor runs its handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

impl Interest {
    /// Readable only (the common case).
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };
    /// Readable or writable.
    pub const READ_WRITE: Interest = Interest {
        read: true,
        write: true,
    };
    /// Nothing: the handler stays registered but does not run.
    pub const NONE: Interest = Interest {
        read: false,
        write: false,
    };

    fn events(self) -> EventSet {
        let mut events = EventSet::empty();
        if self.read {
            events |= EventSet::IN;
        }
        if self.write {
            events |= EventSet::OUT;
        }
        events
    }
}

/// A handler registered with [`AioContext::add_fd`], for [`AioContext::remove_fd`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AioHandlerId(u64);

type Handler = Box<dyn FnMut() + Send>;
type BottomHalf = Box<dyn FnOnce() + Send>;

/// One registered descriptor. The loop holds `handler`'s lock while it runs the handler,
/// so a remover on another thread that takes it waits for the call to end.
struct Slot {
    fd: RawFd,
    removed: AtomicBool,
    handler: Mutex<Option<Handler>>,
}

#[derive(Default)]
struct Table {
    handlers: HashMap<u64, Arc<Slot>>,
    next_id: u64,
    /// `run_sync` closures waiting for the loop (QEMU's one-shot bottom halves).
    bottom_halves: VecDeque<BottomHalf>,
    /// A stop was asked for: the loop ends at its next wake-up.
    stopping: bool,
    /// The loop has ended: nothing will run on its thread any more.
    exited: bool,
}

/// What the loop thread and the handles share.
struct Shared {
    name: String,
    epoll: Epoll,
    wake: EventFd,
    table: Mutex<Table>,
    /// The id of the handler the loop is running, `WAKE` when none.
    running: AtomicU64,
    /// The loop thread's Rust id, set before [`AioContext::new`] returns.
    thread: OnceLock<ThreadId>,
}

impl Shared {
    fn kick(&self) {
        // The counter saturates only after 2^64-2 unread kicks; one pending kick suffices.
        if let Err(e) = self.wake.write(1) {
            if e.kind() != io::ErrorKind::WouldBlock {
                log::error!("{}: cannot wake the event loop: {e}", self.name);
            }
        }
    }

    fn on_loop_thread(&self) -> bool {
        self.thread.get() == Some(&thread::current().id())
    }

    /// Unregisters `id`; returns its slot if it was registered.
    fn unregister(&self, id: u64) -> Option<Arc<Slot>> {
        let slot = self.table.lock().handlers.remove(&id)?;
        // A descriptor closed already left the epoll set by itself.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, slot.fd, EpollEvent::default());
        slot.removed.store(true, Ordering::SeqCst);
        Some(slot)
    }

    /// Runs handler `id` once, if it is still registered.
    fn dispatch(&self, id: u64) {
        let Some(slot) = self.table.lock().handlers.get(&id).cloned() else {
            return;
        };
        let mut guard = slot.handler.lock();
        let Some(handler) = guard.as_mut() else {
            return;
        };
        if slot.removed.load(Ordering::SeqCst) {
            return;
        }
        self.running.store(id, Ordering::SeqCst);
        let outcome = catch_unwind(AssertUnwindSafe(handler));
        self.running.store(WAKE, Ordering::SeqCst);
        if outcome.is_err() {
            // The panic message is printed by the panic hook; a handler that panicked
            // would likely panic again on the same readable descriptor.
            log::error!(
                "{}: the handler of fd {} panicked; it is removed",
                self.name,
                slot.fd
            );
            drop(guard);
            self.unregister(id);
            guard = slot.handler.lock();
        }
        if slot.removed.load(Ordering::SeqCst) {
            // Removed by itself (or by a handler it called): dropped here, after the call.
            let handler = guard.take();
            drop(guard);
            drop(handler);
        }
    }

    /// The loop: wait, run handlers of readable descriptors, run bottom halves, until a
    /// stop is asked for.
    fn run(&self) {
        crate::core::panic_selftest::panic_if_asked("iothread");
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("{}: epoll_wait failed, the event loop ends: {e}", self.name);
                    break;
                }
            };
            // The event loop's list goes on before any handler runs once the sandbox is
            // installed.
            crate::core::sandbox::enter(crate::core::sandbox::ThreadKind::IoThread);
            for event in &events[..n] {
                match event.data() {
                    WAKE => {
                        // Non-blocking: a concurrent reader may have emptied it.
                        let _ = self.wake.read();
                    }
                    id => self.dispatch(id),
                }
            }
            let bottom_halves = std::mem::take(&mut self.table.lock().bottom_halves);
            for bh in bottom_halves {
                bh();
            }
            if self.table.lock().stopping {
                break;
            }
        }
        // Whatever was queued before `exited` is set runs here; later `run_sync` calls run
        // on their caller.
        let (bottom_halves, handlers) = {
            let mut table = self.table.lock();
            table.exited = true;
            (
                std::mem::take(&mut table.bottom_halves),
                std::mem::take(&mut table.handlers),
            )
        };
        for bh in bottom_halves {
            bh();
        }
        for slot in handlers.into_values() {
            slot.removed.store(true, Ordering::SeqCst);
            let handler = slot.handler.lock().take();
            drop(handler);
        }
    }
}

/// QEMU's `AioContext`: an event-loop thread running handlers when their fds are readable.
pub struct AioContext {
    shared: Arc<Shared>,
    /// The loop thread's host thread id.
    tid: i32,
    join: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AioContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioContext")
            .field("name", &self.shared.name)
            .field("thread_id", &self.tid)
            .finish_non_exhaustive()
    }
}

impl AioContext {
    /// Spawns the loop thread (thread name as QEMU names it: "IO <id>" for iothreads, the
    /// main context "main-loop").
    pub fn new(name: &str) -> io::Result<Arc<AioContext>> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            epoll,
            wake,
            table: Mutex::new(Table {
                next_id: WAKE + 1,
                ..Table::default()
            }),
            running: AtomicU64::new(WAKE),
            thread: OnceLock::new(),
        });
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let looper = Arc::clone(&shared);
        let join = crate::core::thread::builder(name)
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                looper.run();
            })?;
        let _ = shared.thread.set(join.thread().id());
        let tid = tid_rx
            .recv()
            .map_err(|_| io::Error::other(format!("the event loop thread '{name}' died")))?;
        Ok(Arc::new(AioContext {
            shared,
            tid,
            join: Mutex::new(Some(join)),
        }))
    }

    /// The loop thread's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Runs `handler` on the loop thread whenever `fd` is readable (level-triggered),
    /// until removed. The caller keeps `fd` open until then.
    pub fn add_fd(&self, fd: RawFd, handler: Box<dyn FnMut() + Send>) -> io::Result<AioHandlerId> {
        self.add_fd_with(fd, Interest::READ, handler)
    }

    /// [`AioContext::add_fd`] for the events in `interest` (QEMU's `aio_set_fd_handler`
    /// with `io_read` and/or `io_write`). The handler runs when any of them is ready.
    pub fn add_fd_with(
        &self,
        fd: RawFd,
        interest: Interest,
        handler: Box<dyn FnMut() + Send>,
    ) -> io::Result<AioHandlerId> {
        let mut table = self.shared.table.lock();
        if table.stopping {
            return Err(io::Error::other(format!(
                "the event loop '{}' is stopped",
                self.shared.name
            )));
        }
        let id = table.next_id;
        // The table lock is held across the registration, so the loop cannot see an event
        // for an id it does not know yet; the loop never holds it while waiting.
        self.shared
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(interest.events(), id))?;
        table.next_id += 1;
        table.handlers.insert(
            id,
            Arc::new(Slot {
                fd,
                removed: AtomicBool::new(false),
                handler: Mutex::new(Some(handler)),
            }),
        );
        Ok(AioHandlerId(id))
    }

    /// Changes which events of a registered descriptor run its handler (a NIC waits for
    /// a full tap to drain by adding [`Interest::WRITE`], and drops it once it can send).
    pub fn set_interest(&self, id: AioHandlerId, interest: Interest) -> io::Result<()> {
        let table = self.shared.table.lock();
        let Some(slot) = table.handlers.get(&id.0) else {
            return Ok(());
        };
        self.shared.epoll.ctl(
            ControlOperation::Modify,
            slot.fd,
            EpollEvent::new(interest.events(), id.0),
        )
    }

    /// Removes a handler. When this returns the handler is not running and never runs
    /// again. Safe to call from inside a handler on the loop thread (no deadlock): a
    /// handler that removes itself is dropped once it returns.
    pub fn remove_fd(&self, id: AioHandlerId) {
        let Some(slot) = self.shared.unregister(id.0) else {
            return;
        };
        if self.shared.on_loop_thread() && self.shared.running.load(Ordering::SeqCst) == id.0 {
            // Its own call holds the handler's lock; the loop drops it after the call.
            return;
        }
        // Waits for a call in progress on the loop thread.
        let handler = slot.handler.lock().take();
        drop(handler);
    }

    /// Removes every handler in `handlers` and empties it (a device stopping its queues):
    /// when this returns none of them runs.
    pub fn remove_fds(&self, handlers: &parking_lot::Mutex<Vec<AioHandlerId>>) {
        for id in std::mem::take(&mut *handlers.lock()) {
            self.remove_fd(id);
        }
    }

    /// Runs `f` on the loop thread and waits until it has run (QEMU's
    /// `aio_wait_bh_oneshot`); runs it inline if called on the loop thread, or once the
    /// loop has ended. A panic in `f` is resumed in the caller.
    pub fn run_sync(&self, f: Box<dyn FnOnce() + Send>) {
        if self.shared.on_loop_thread() {
            f();
            return;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let bh: BottomHalf = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        });
        {
            let mut table = self.shared.table.lock();
            if table.exited {
                drop(table);
                bh();
            } else {
                table.bottom_halves.push_back(bh);
                drop(table);
                self.shared.kick();
            }
        }
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            // Every queued closure runs, at the latest when the loop ends.
            Err(_) => log::error!("{}: a run_sync closure was dropped", self.shared.name),
        }
    }

    /// The loop thread's host thread id (query-iothreads' thread-id).
    pub fn thread_id(&self) -> i32 {
        self.tid
    }

    /// Whether the caller runs on this context's loop thread.
    pub fn in_loop_thread(&self) -> bool {
        self.shared.on_loop_thread()
    }

    /// Ends the loop (QEMU's `iothread_stop`): handlers still registered are dropped and
    /// never run again; `add_fd` fails from now on. Waits for the thread to end unless
    /// called on it (then the loop ends when the current handler returns).
    pub fn stop(&self) {
        self.shared.table.lock().stopping = true;
        self.shared.kick();
        if self.shared.on_loop_thread() {
            return;
        }
        if let Some(join) = self.join.lock().take() {
            if join.join().is_err() {
                log::error!("{}: the event loop thread panicked", self.shared.name);
            }
        }
    }
}

impl Drop for AioContext {
    /// The last handle stops the loop thread.
    fn drop(&mut self) {
        self.stop();
    }
}

/// QEMU's `IOThread`: `-object iothread,id=ID` and QMP's `object-add`. Completing it starts
/// its [`AioContext`], thread `IO ID`; `/objects/ID` keeps it until `object-del`.
#[derive(qom::Object)]
#[qom(name = TYPE_IOTHREAD, implements = [dyn qom::UserCreatable])]
pub struct IoThread {
    #[parent]
    parent: ObjectBase,
    #[property(
        name = "poll-max-ns",
        default = IOTHREAD_POLL_MAX_NS_DEFAULT,
        desc = "Maximum polling time in ns, 0 disables polling"
    )]
    poll_max_ns: Prop<i64>,
    #[property(
        name = "poll-grow",
        default = 0,
        desc = "Polling time growth factor, 0 selects the default"
    )]
    poll_grow: Prop<i64>,
    #[property(
        name = "poll-shrink",
        default = 0,
        desc = "Polling time shrink divisor, 0 selects the default"
    )]
    poll_shrink: Prop<i64>,
    #[property(
        name = "aio-max-batch",
        default = 0,
        desc = "Maximum number of requests in a batch for the AIO engine, 0 selects the default"
    )]
    aio_max_batch: Prop<i64>,
    ctx: OnceLock<Arc<AioContext>>,
}

qom::type_init!(IoThread);

/// The polling parameters of an iothread, as `query-iothreads` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoThreadParams {
    /// `poll-max-ns`.
    pub poll_max_ns: i64,
    /// `poll-grow`.
    pub poll_grow: i64,
    /// `poll-shrink`.
    pub poll_shrink: i64,
    /// `aio-max-batch`.
    pub aio_max_batch: i64,
}

impl IoThread {
    /// Its event loop, once completed.
    pub fn context(&self) -> Option<Arc<AioContext>> {
        self.ctx.get().cloned()
    }

    /// The tuning parameters (qomvm's loop does not poll; they are kept for QEMU's tools).
    pub fn params(&self) -> IoThreadParams {
        IoThreadParams {
            poll_max_ns: self.poll_max_ns.get(),
            poll_grow: self.poll_grow.get(),
            poll_shrink: self.poll_shrink.get(),
            aio_max_batch: self.aio_max_batch.get(),
        }
    }
}

impl UserCreatable for IoThread {
    /// QEMU's `iothread_complete`: checks the parameters, starts the thread `IO <id>`.
    fn complete(&self) -> Result<(), qom::Error> {
        for (name, value) in [
            ("poll-max-ns", self.poll_max_ns.get()),
            ("poll-grow", self.poll_grow.get()),
            ("poll-shrink", self.poll_shrink.get()),
            ("aio-max-batch", self.aio_max_batch.get()),
        ] {
            if value < 0 {
                return Err(qom::Error::other(IoThreadError::Range(name)));
            }
        }
        let obj = self.parent.object();
        let id = obj
            .name_in_parent()
            .map(|n| n.to_string())
            .unwrap_or_default();
        let ctx = AioContext::new(&format!("IO {id}"))
            .map_err(|e| qom::Error::other(IoThreadError::Start(e)))?;
        let _ = self.ctx.set(ctx);
        Ok(())
    }
}

/// An iothread that cannot complete, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum IoThreadError {
    /// A negative tuning parameter.
    #[error("{0} value must be in range [0, 9223372036854775807]")]
    Range(&'static str),
    /// The thread could not start.
    #[error("Failed to create AIO context: {0}")]
    Start(io::Error),
}

/// The event loop of `-object iothread,id=ID` (`/objects/ID`), if it exists.
pub fn iothread_context(id: &str) -> Option<Arc<AioContext>> {
    qom::object_get_objects_root()
        .child(id)?
        .cast::<IoThread>()?
        .context()
}

/// Every iothread under `/objects`, in creation order, with its id.
pub fn iothreads() -> Vec<(String, qom::ObjectRef)> {
    qom::object_get_objects_root()
        .children()
        .into_iter()
        .filter(|(_, obj)| obj.cast::<IoThread>().is_some())
        .map(|(name, obj)| (name.to_string(), obj))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    fn eventfd() -> Arc<EventFd> {
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    /// Waits up to five seconds for `cond`.
    fn wait_for(cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            thread::sleep(Duration::from_millis(2));
        }
        cond()
    }

    #[test]
    fn handlers_run_on_the_loop_thread() {
        let ctx = AioContext::new("IO test0").unwrap();
        let efd = eventfd();
        let (tx, rx) = mpsc::channel();
        let reader = Arc::clone(&efd);
        ctx.add_fd(
            efd.as_raw_fd(),
            Box::new(move || {
                let _ = reader.read();
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let _ = tx.send((thread::current().name().map(str::to_string), tid));
            }),
        )
        .unwrap();
        efd.write(1).unwrap();
        let (name, tid) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(name.as_deref(), Some("IO test0"));
        assert_eq!(tid, ctx.thread_id());
        assert_ne!(tid, std::process::id() as i32);
    }

    #[test]
    fn handlers_are_level_triggered() {
        let ctx = AioContext::new("IO level").unwrap();
        let efd = eventfd();
        let calls = Arc::new(AtomicUsize::new(0));
        let (reader, counter) = (Arc::clone(&efd), Arc::clone(&calls));
        ctx.add_fd(
            efd.as_raw_fd(),
            Box::new(move || {
                // Consumes the counter only from the third call on: until then the fd stays
                // readable, so the handler runs again without a new write.
                if counter.fetch_add(1, Ordering::SeqCst) >= 2 {
                    let _ = reader.read();
                }
            }),
        )
        .unwrap();
        efd.write(1).unwrap();
        assert!(wait_for(|| calls.load(Ordering::SeqCst) >= 3));
        thread::sleep(Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), 3, "drained: no further calls");
        efd.write(1).unwrap();
        assert!(wait_for(|| calls.load(Ordering::SeqCst) == 4));
    }

    #[test]
    fn remove_from_another_thread_waits_for_a_running_handler() {
        let ctx = AioContext::new("IO remove").unwrap();
        let efd = eventfd();
        let running = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let (reader, r, f, c) = (
            Arc::clone(&efd),
            Arc::clone(&running),
            Arc::clone(&finished),
            Arc::clone(&calls),
        );
        let id = ctx
            .add_fd(
                efd.as_raw_fd(),
                Box::new(move || {
                    let _ = reader.read();
                    c.fetch_add(1, Ordering::SeqCst);
                    r.store(true, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(200));
                    f.store(true, Ordering::SeqCst);
                }),
            )
            .unwrap();
        efd.write(1).unwrap();
        assert!(wait_for(|| running.load(Ordering::SeqCst)));
        ctx.remove_fd(id);
        assert!(
            finished.load(Ordering::SeqCst),
            "remove_fd returned while the handler ran"
        );
        efd.write(1).unwrap();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "never runs again");
        // Removing twice is harmless.
        ctx.remove_fd(id);
    }

    #[test]
    fn a_handler_may_remove_itself() {
        let ctx = AioContext::new("IO self").unwrap();
        let efd = eventfd();
        let calls = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicBool::new(false));
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let id_cell: Arc<OnceLock<AioHandlerId>> = Arc::new(OnceLock::new());
        let weak = Arc::downgrade(&ctx);
        let (c, ids, guard) = (
            Arc::clone(&calls),
            Arc::clone(&id_cell),
            OnDrop(Arc::clone(&dropped)),
        );
        let id = ctx
            .add_fd(
                efd.as_raw_fd(),
                Box::new(move || {
                    let _keep = &guard;
                    c.fetch_add(1, Ordering::SeqCst);
                    // Not read: without the removal this would run forever.
                    if let (Some(ctx), Some(id)) = (weak.upgrade(), ids.get()) {
                        ctx.remove_fd(*id);
                    }
                }),
            )
            .unwrap();
        id_cell.set(id).unwrap();
        efd.write(1).unwrap();
        assert!(wait_for(|| dropped.load(Ordering::SeqCst)));
        thread::sleep(Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn run_sync_runs_on_the_loop_thread_and_waits() {
        let ctx = AioContext::new("IO sync").unwrap();
        let (tx, rx) = mpsc::channel();
        let inner = Arc::clone(&ctx);
        ctx.run_sync(Box::new(move || {
            let name = thread::current().name().map(str::to_string);
            // Nested on the loop thread: runs inline, no deadlock.
            let (tx2, rx2) = mpsc::channel();
            inner.run_sync(Box::new(move || tx2.send(7).unwrap()));
            let _ = tx.send((name, rx2.try_recv().ok()));
        }));
        // It has run by the time run_sync returned.
        let (name, nested) = rx.try_recv().unwrap();
        assert_eq!(name.as_deref(), Some("IO sync"));
        assert_eq!(nested, Some(7));
    }

    #[test]
    fn a_panicking_handler_is_removed_and_the_loop_goes_on() {
        let ctx = AioContext::new("IO panic").unwrap();
        let efd = eventfd();
        ctx.add_fd(efd.as_raw_fd(), Box::new(|| panic!("handler bug")))
            .unwrap();
        efd.write(1).unwrap();
        // The loop survives: run_sync still completes.
        let (tx, rx) = mpsc::channel();
        ctx.run_sync(Box::new(move || tx.send(()).unwrap()));
        rx.try_recv().unwrap();
    }

    #[test]
    fn dropping_the_last_handle_stops_the_thread() {
        let ctx = AioContext::new("IO drop").unwrap();
        let tid = ctx.thread_id();
        let task = format!("/proc/self/task/{tid}");
        assert!(std::path::Path::new(&task).exists());
        let efd = eventfd();
        let dropped = Arc::new(AtomicBool::new(false));
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = OnDrop(Arc::clone(&dropped));
        ctx.add_fd(
            efd.as_raw_fd(),
            Box::new(move || {
                let _keep = &guard;
            }),
        )
        .unwrap();
        drop(ctx);
        // The kernel reaps the joined thread's task right after its exit.
        assert!(
            wait_for(|| !std::path::Path::new(&task).exists()),
            "the thread has ended"
        );
        assert!(dropped.load(Ordering::SeqCst), "handlers are dropped");
    }

    #[test]
    fn a_stopped_context_refuses_handlers_and_runs_closures_inline() {
        let ctx = AioContext::new("IO stopped").unwrap();
        ctx.stop();
        let efd = eventfd();
        assert!(ctx.add_fd(efd.as_raw_fd(), Box::new(|| {})).is_err());
        let (tx, rx) = mpsc::channel();
        ctx.run_sync(Box::new(move || tx.send(()).unwrap()));
        rx.try_recv().unwrap();
    }

    #[test]
    fn iothread_objects_start_a_named_loop() {
        crate::init().unwrap();
        let obj = qom::user_creatable_add_type(TYPE_IOTHREAD, "iot-unit0", |obj| {
            obj.property_parse("poll-grow", "2")
        })
        .unwrap();
        let ctx = iothread_context("iot-unit0").expect("completed iothreads have a context");
        assert_eq!(ctx.name(), "IO iot-unit0");
        let io = obj.cast::<IoThread>().unwrap();
        assert_eq!(
            io.params(),
            IoThreadParams {
                poll_max_ns: 32768,
                poll_grow: 2,
                poll_shrink: 0,
                aio_max_batch: 0
            }
        );
        let e = qom::user_creatable_add_type(TYPE_IOTHREAD, "iot-unit1", |obj| {
            obj.property_parse("poll-max-ns", "-1")
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "poll-max-ns value must be in range [0, 9223372036854775807]"
        );
        assert!(qom::object_get_objects_root().child("iot-unit1").is_none());
        let e = qom::user_creatable_add_type(TYPE_IOTHREAD, "iot-unit0", |_| Ok(())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "attempt to add duplicate property 'iot-unit0' to object (type 'container')"
        );
        let tid = ctx.thread_id();
        drop(ctx);
        drop(obj);
        qom::user_creatable_del("iot-unit0").unwrap();
        assert!(iothread_context("iot-unit0").is_none());
        assert!(
            wait_for(|| !std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()),
            "object-del ends the thread once nothing uses it"
        );
    }
}
