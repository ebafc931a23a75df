//! One libslirp stack on its own thread.
//!
//! libslirp's `Slirp` is single-threaded (the crate's `Context` is not `Send`), and QEMU
//! drives it from its main loop. Here a thread owns it and runs the same loop QEMU's
//! `net_slirp_poll_notify` takes part in: `slirp_pollfds_fill`, `poll(2)` with slirp's
//! timeout, `slirp_pollfds_poll`, and the timers slirp asked for.
//!
//! Frames cross between that thread and the NIC's I/O thread through two bounded queues:
//! - guest to slirp: [`SlirpQueue::send`] queues the frame and wakes the thread through an
//!   eventfd; the thread hands each one to `slirp_input`. Sending never blocks: at
//!   [`QUEUE_LEN`] frames (or [`QUEUE_BYTES`]) the newest is dropped.
//! - slirp to guest: slirp's `send_packet` callback queues the frame; an eventfd, the
//!   queue's [`NetQueue::rx_fd`], is readable exactly while the queue is not empty. When
//!   the guest does not read, the newest frame is dropped at [`QUEUE_LEN`] frames, as
//!   QEMU's `qemu_net_queue_append` does.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use libslirp::{Context, Handler, PollEvents};
use parking_lot::Mutex;
use vm_memory::VolatileSlice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{Hostfwd, UserConfig};
use crate::{NetError, NetQueue};

/// Frames a queue holds before it drops the newest (QEMU's `nq_maxlen`).
pub const QUEUE_LEN: usize = 10000;

/// Bytes the guest-to-slirp queue holds before it drops the newest: a guest sending
/// 64 KiB frames while the thread is busy must not pin 640 MB.
pub const QUEUE_BYTES: usize = QUEUE_LEN * super::MAX_FRAME_LEN;

/// State shared by the slirp thread and the NIC side.
struct Shared {
    /// Frames for the guest.
    rx: Mutex<VecDeque<Vec<u8>>>,
    /// Readable while `rx` is not empty (written and drained under `rx`'s lock).
    rx_event: EventFd,
    /// Frames from the guest, for `slirp_input`, and their bytes.
    tx: Mutex<(VecDeque<Vec<u8>>, usize)>,
    /// Wakes the slirp thread: frames in `tx`, or a command.
    wake: EventFd,
    /// Frames dropped because the guest did not read.
    rx_dropped: AtomicU64,
    /// Frames dropped because the slirp thread did not keep up.
    tx_dropped: AtomicU64,
}

impl Shared {
    fn wake(&self) {
        // An eventfd write fails only when its counter would overflow, and then it is
        // readable anyway.
        let _ = self.wake.write(1);
    }
}

/// A request for the slirp thread, answered through its channel.
enum Command {
    AddHostfwd(Hostfwd, mpsc::Sender<bool>),
    RemoveHostfwd(bool, Ipv4Addr, u16, mpsc::Sender<bool>),
    ConnectionInfo(mpsc::Sender<String>),
}

/// The handle of a running stack: its thread and the queues.
pub struct Stack {
    shared: Arc<Shared>,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    queue: Arc<SlirpQueue>,
}

impl Stack {
    /// Starts a stack for `config` on a thread called `name`, with the config's host
    /// forwarding rules applied; QEMU's errors when a rule cannot be set up.
    pub fn start(name: &str, config: UserConfig) -> Result<Stack, NetError> {
        let eventfd = |what: &str| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| NetError::Io {
                what: format!("slirp: could not create the {what} eventfd"),
                source,
            })
        };
        let shared = Arc::new(Shared {
            rx: Mutex::new(VecDeque::new()),
            rx_event: eventfd("receive")?,
            tx: Mutex::new((VecDeque::new(), 0)),
            wake: eventfd("wake-up")?,
            rx_dropped: AtomicU64::new(0),
            tx_dropped: AtomicU64::new(0),
        });
        let (commands, command_rx) = mpsc::channel();
        let (started_tx, started_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(config, thread_shared, command_rx, started_tx))
            .map_err(|source| NetError::Io {
                what: "slirp: could not start its thread".to_string(),
                source,
            })?;
        let started = started_rx.recv().unwrap_or_else(|_| {
            Err(NetError::invalid(
                "slirp: the user-mode network stack failed to start",
            ))
        });
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        let queue = Arc::new(SlirpQueue {
            shared: Arc::clone(&shared),
        });
        Ok(Stack {
            shared,
            commands: Mutex::new(Some(commands)),
            thread: Mutex::new(Some(thread)),
            queue,
        })
    }

    /// The queue pair a NIC uses.
    pub fn queue(&self) -> Arc<SlirpQueue> {
        Arc::clone(&self.queue)
    }

    /// Runs `make(reply)` on the slirp thread and waits for its answer; `None` once the
    /// stack has stopped.
    fn call<T>(&self, make: impl FnOnce(mpsc::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        self.commands.lock().as_ref()?.send(make(tx)).ok()?;
        self.shared.wake();
        rx.recv().ok()
    }

    /// `slirp_add_hostfwd`; false when slirp refused (the port is taken, the address is
    /// not the host's) or the stack has stopped.
    pub fn add_hostfwd(&self, fwd: Hostfwd) -> bool {
        self.call(|r| Command::AddHostfwd(fwd, r)).unwrap_or(false)
    }

    /// `slirp_remove_hostfwd`; false when no such rule exists.
    pub fn remove_hostfwd(&self, udp: bool, addr: Ipv4Addr, port: u16) -> bool {
        self.call(|r| Command::RemoveHostfwd(udp, addr, port, r))
            .unwrap_or(false)
    }

    /// `slirp_connection_info`: `info usernet`'s table.
    pub fn connection_info(&self) -> String {
        self.call(Command::ConnectionInfo).unwrap_or_default()
    }

    /// Frames dropped so far: (towards the guest, from the guest).
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.shared.rx_dropped.load(Ordering::Relaxed),
            self.shared.tx_dropped.load(Ordering::Relaxed),
        )
    }

    /// Stops the thread (closing slirp's sockets and listeners) and waits for it.
    pub fn stop(&self) {
        // Dropping the sender is the thread's signal to stop.
        drop(self.commands.lock().take());
        self.shared.wake();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The NIC's side of a stack (its only queue pair).
pub struct SlirpQueue {
    shared: Arc<Shared>,
}

impl NetQueue for SlirpQueue {
    fn rx_fd(&self) -> RawFd {
        self.shared.rx_event.as_raw_fd()
    }

    fn tx_fd(&self) -> Option<RawFd> {
        None
    }

    fn receive(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let frame = {
            let mut rx = self.shared.rx.lock();
            let frame = rx.pop_front();
            if rx.is_empty() {
                // Not readable any more; the producer writes under the same lock, so
                // no wake-up is lost.
                let _ = self.shared.rx_event.read();
            }
            frame
        };
        let frame = frame.ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        // Like readv(2) on a tap: what does not fit is lost.
        let mut done = 0;
        for buf in bufs {
            if done == frame.len() {
                break;
            }
            let n = buf.len().min(frame.len() - done);
            buf.copy_from(&frame[done..done + n]);
            done += n;
        }
        Ok(done)
    }

    fn send(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let mut frame = vec![0u8; len];
        let mut off = 0;
        for buf in bufs {
            off += buf.copy_to(&mut frame[off..]);
        }
        {
            let mut tx = self.shared.tx.lock();
            let (frames, bytes) = &mut *tx;
            if frames.len() >= QUEUE_LEN || *bytes + len > QUEUE_BYTES {
                self.shared.tx_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(len);
            }
            frames.push_back(frame);
            *bytes += len;
        }
        self.shared.wake();
        Ok(len)
    }
}

/// A timer slirp asked for (`timer_new`); fired by the loop once its time has come.
struct Timer {
    /// Expiry in ms of [`SlirpHandler::clock_get_ns`]'s clock; `None` when disarmed.
    expire_ms: Cell<Option<i64>>,
    callback: RefCell<Box<dyn FnMut()>>,
}

/// libslirp's callbacks (QEMU's `slirp_cb`).
struct SlirpHandler {
    shared: Arc<Shared>,
    epoch: Instant,
    timers: Rc<RefCell<Vec<Weak<Timer>>>>,
}

fn now_ns(epoch: Instant) -> i64 {
    i64::try_from(epoch.elapsed().as_nanos()).unwrap_or(i64::MAX)
}

impl Handler for SlirpHandler {
    type Timer = Rc<Timer>;

    fn clock_get_ns(&mut self) -> i64 {
        now_ns(self.epoch)
    }

    fn send_packet(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rx = self.shared.rx.lock();
        if rx.len() >= QUEUE_LEN {
            self.shared.rx_dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            if rx.is_empty() {
                let _ = self.shared.rx_event.write(1);
            }
            rx.push_back(buf.to_vec());
        }
        Ok(buf.len())
    }

    fn register_poll_fd(&mut self, _fd: RawFd) {}

    fn unregister_poll_fd(&mut self, _fd: RawFd) {}

    fn guest_error(&mut self, msg: &str) {
        // QEMU: qemu_log_mask(LOG_GUEST_ERROR, ...).
        log::debug!("slirp: guest error: {msg}");
    }

    fn notify(&mut self) {
        // slirp calls this from inside the loop's own calls; the loop refills its poll
        // set after every round anyway.
    }

    fn timer_new(&mut self, func: Box<dyn FnMut()>) -> Box<Rc<Timer>> {
        let timer = Rc::new(Timer {
            expire_ms: Cell::new(None),
            callback: RefCell::new(func),
        });
        self.timers.borrow_mut().push(Rc::downgrade(&timer));
        Box::new(timer)
    }

    fn timer_mod(&mut self, timer: &mut Box<Rc<Timer>>, expire_time: i64) {
        timer.expire_ms.set(Some(expire_time));
    }

    fn timer_free(&mut self, timer: Box<Rc<Timer>>) {
        drop(timer);
        self.timers.borrow_mut().retain(|t| t.strong_count() > 0);
    }
}

/// The C strings `slirp_new` reads (it copies them).
struct CConfig {
    hostname: Option<CString>,
    domainname: Option<CString>,
    tftp: Option<CString>,
    bootfile: Option<CString>,
    tftp_server_name: Option<CString>,
    dnssearch: Vec<CString>,
}

fn cstring(s: &Option<String>) -> Option<CString> {
    // UserConfig::parse refused NULs.
    s.as_ref().and_then(|s| CString::new(s.as_str()).ok())
}

fn c_ptr(s: &Option<CString>) -> *const libc::c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// The slirp thread: creates the stack, applies the forwarding rules, reports, loops.
fn run(
    config: UserConfig,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    started: mpsc::Sender<Result<(), NetError>>,
) {
    let strings = CConfig {
        hostname: cstring(&config.hostname),
        domainname: cstring(&config.domainname),
        tftp: cstring(&config.tftp),
        bootfile: cstring(&config.bootfile),
        tftp_server_name: cstring(&config.tftp_server_name),
        dnssearch: config
            .dnssearch
            .iter()
            .filter_map(|s| CString::new(s.as_str()).ok())
            .collect(),
    };
    let mut dnssearch: Vec<*const libc::c_char> =
        strings.dnssearch.iter().map(|s| s.as_ptr()).collect();
    dnssearch.push(std::ptr::null());
    let cfg = libslirp_sys::SlirpConfig {
        // Version 3: the callbacks the crate fills end before version 4's
        // `init_completed`/`timer_new_opaque`, which slirp would read from a version 4
        // config. (Version 4's only config field, disable_dhcp, is not an option.)
        version: 3,
        restricted: i32::from(config.restrict),
        in_enabled: config.ipv4,
        vnetwork: config.net.into(),
        vnetmask: config.mask.into(),
        vhost: config.host.into(),
        in6_enabled: config.ipv6,
        vprefix_addr6: config.prefix6.into(),
        vprefix_len: config.prefix6_len,
        vhost6: config.host6.into(),
        vhostname: c_ptr(&strings.hostname),
        tftp_server_name: c_ptr(&strings.tftp_server_name),
        tftp_path: c_ptr(&strings.tftp),
        bootfile: c_ptr(&strings.bootfile),
        vdhcp_start: config.dhcp_start.into(),
        vnameserver: config.dns.into(),
        vnameserver6: config.dns6.into(),
        vdnssearch: if config.dnssearch.is_empty() {
            std::ptr::null_mut()
        } else {
            dnssearch.as_mut_ptr()
        },
        vdomainname: c_ptr(&strings.domainname),
        // 0: libslirp's defaults, IF_MTU_DEFAULT and IF_MRU_DEFAULT (1500).
        if_mtu: 0,
        if_mru: 0,
        disable_host_loopback: false,
        enable_emu: false,
        outbound_addr: std::ptr::null(),
        outbound_addr6: std::ptr::null(),
        disable_dns: false,
        disable_dhcp: false,
    };
    let timers = Rc::new(RefCell::new(Vec::new()));
    let epoch = Instant::now();
    let handler = SlirpHandler {
        shared: Arc::clone(&shared),
        epoch,
        timers: Rc::clone(&timers),
    };
    let ctx = Context::new_with_config(&cfg, handler);
    drop(strings);

    for (rule, fwd) in &config.hostfwd {
        if !add_hostfwd(&ctx, *fwd) {
            let _ = started.send(Err(NetError::invalid(format!(
                "Could not set up host forwarding rule '{rule}'"
            ))));
            return;
        }
    }
    if started.send(Ok(())).is_err() {
        return;
    }

    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    loop {
        // Requests, then the guest's frames.
        loop {
            match commands.try_recv() {
                Ok(Command::AddHostfwd(fwd, reply)) => {
                    let _ = reply.send(add_hostfwd(&ctx, fwd));
                }
                Ok(Command::RemoveHostfwd(udp, addr, port, reply)) => {
                    // SAFETY: the context is live on this, its only, thread.
                    let r = unsafe {
                        libslirp_sys::slirp_remove_hostfwd(
                            ctx.inner.context,
                            i32::from(udp),
                            addr.into(),
                            i32::from(port),
                        )
                    };
                    let _ = reply.send(r == 0);
                }
                Ok(Command::ConnectionInfo(reply)) => {
                    let _ = reply.send(connection_info(&ctx));
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        let (frames, _) = std::mem::take(&mut *shared.tx.lock());
        for frame in frames {
            ctx.input(&frame);
        }

        // Timers whose time has come.
        let now_ms = now_ns(epoch) / 1_000_000;
        let due: Vec<Rc<Timer>> = {
            let mut list = timers.borrow_mut();
            list.retain(|t| t.strong_count() > 0);
            list.iter()
                .filter_map(Weak::upgrade)
                .filter(|t| t.expire_ms.get().is_some_and(|e| e <= now_ms))
                .collect()
        };
        for t in due {
            t.expire_ms.set(None);
            (t.callback.borrow_mut())();
        }
        let next_timer = timers
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|t| t.expire_ms.get())
            .min();

        let mut timeout: u32 = match next_timer {
            Some(e) => u32::try_from((e - now_ms).max(0)).unwrap_or(u32::MAX),
            None => u32::MAX,
        };
        pollfds.clear();
        pollfds.push(libc::pollfd {
            fd: shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        ctx.pollfds_fill(&mut timeout, |fd, events| {
            pollfds.push(libc::pollfd {
                fd,
                events: to_poll(events),
                revents: 0,
            });
            i32::try_from(pollfds.len() - 1).unwrap_or(i32::MAX)
        });
        // slirp caps the timeout at a second.
        let timeout = i32::try_from(timeout).unwrap_or(1000);
        // SAFETY: `pollfds` is a live array of `pollfds.len()` pollfd structures.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, timeout) };
        if n > 0 && pollfds[0].revents & libc::POLLIN != 0 {
            let _ = shared.wake.read();
        }
        ctx.pollfds_poll(n < 0, |idx| {
            usize::try_from(idx)
                .ok()
                .and_then(|i| pollfds.get(i))
                .map_or(PollEvents::empty(), |p| from_poll(p.revents))
        });
    }
}

fn add_hostfwd(ctx: &Context<SlirpHandler>, fwd: Hostfwd) -> bool {
    // SAFETY: the context is live on this, its only, thread; slirp copies the addresses.
    let r = unsafe {
        libslirp_sys::slirp_add_hostfwd(
            ctx.inner.context,
            i32::from(fwd.udp),
            fwd.host_addr.into(),
            i32::from(fwd.host_port),
            fwd.guest_addr.into(),
            i32::from(fwd.guest_port),
        )
    };
    r == 0
}

fn connection_info(ctx: &Context<SlirpHandler>) -> String {
    // The crate's `connection_info` never frees slirp's string; this one does.
    // SAFETY: the context is live on this, its only, thread.
    let p = unsafe { libslirp_sys::slirp_connection_info(ctx.inner.context) };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: slirp returned a NUL-terminated string it allocated with g_malloc.
    let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: g_free is free(3) since GLib 2.46; `p` is not used again.
    unsafe { libc::free(p.cast()) };
    text
}

fn to_poll(events: PollEvents) -> libc::c_short {
    let mut r = 0;
    if events.has_in() {
        r |= libc::POLLIN;
    }
    if events.has_out() {
        r |= libc::POLLOUT;
    }
    if events.has_pri() {
        r |= libc::POLLPRI;
    }
    if events.has_err() {
        r |= libc::POLLERR;
    }
    if events.has_hup() {
        r |= libc::POLLHUP;
    }
    r
}

fn from_poll(revents: libc::c_short) -> PollEvents {
    let mut r = PollEvents::empty();
    for (bit, ev) in [
        (libc::POLLIN, PollEvents::poll_in()),
        (libc::POLLOUT, PollEvents::poll_out()),
        (libc::POLLPRI, PollEvents::poll_pri()),
        (libc::POLLERR, PollEvents::poll_err()),
        (libc::POLLHUP, PollEvents::poll_hup()),
    ] {
        if revents & bit != 0 {
            r |= ev;
        }
    }
    r
}
