//! RAM over several connections (QEMU's `migration/multifd.c`): with the `multifd`
//! capability the source opens `multifd-channels` more connections to the destination's
//! address, and guest pages travel over them in packets, each channel on its own thread,
//! while the main connection carries the configuration, the syncs, the device state and
//! the end.
//!
//! - Each channel opens with [`ChannelInit`] (QEMU's `MultiFDInit_t`): magic, version,
//!   the migration's UUID (also in the main stream's configuration record, so the
//!   destination can match the channels to it) and the channel's number.
//! - Then packets: a header (magic, version, flags, page count, packet number), the
//!   pages' guest addresses (a zero page has [`ZERO_PAGE`] set and no data), then the
//!   data of the other pages in order.
//! - A pre-copy pass ends with a sync (QEMU's `multifd_send_sync_main`): a packet with
//!   [`FLAG_SYNC`] on every channel, then a sync record on the main stream. A receiving
//!   channel stops after its sync packet until the main stream reaches the same sync and
//!   every channel has applied its pages, so a page sent again in a later pass can never
//!   be overwritten by its older copy from another channel.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::core::migration::{self, MigrationError, Progress, PAGE_SIZE};
use crate::core::uuid::Uuid;

/// The first word of a channel and of each packet (QEMU's `MULTIFD_MAGIC`).
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// The version of the channel header and the packets.
pub const MULTIFD_VERSION: u32 = 1;
/// Pages per packet: 512 KiB of data at most (QEMU's `MULTIFD_PACKET_SIZE`).
pub const PAGES_PER_PACKET: usize = 128;
/// A packet's flag: the last of a pass on this channel.
pub const FLAG_SYNC: u32 = 1;
/// Marks a zero page in a packet's address word.
pub const ZERO_PAGE: u64 = 1;
/// The bytes of [`ChannelInit`] on the wire.
pub const INIT_LEN: usize = 64;
/// The bytes of a packet's header.
const PACKET_HEADER_LEN: usize = 24;
/// Batches queued for the sending threads, per channel, before the migration thread waits.
const QUEUED_PER_CHANNEL: usize = 2;
/// How long the main stream waits at a sync for the channels: their sync packets were
/// sent before the main stream's sync record, so only the host's scheduling delays them.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a waiting migration thread looks at `migrate_cancel`.
const POLL: Duration = Duration::from_millis(100);

/// Whether the first four bytes of a connection are a multifd channel's (the main
/// stream starts with [`migration::MAGIC`]).
pub fn is_channel(first: &[u8; 4]) -> bool {
    u32::from_be_bytes(*first) == MULTIFD_MAGIC
}

/// A migration connection: multifd runs over sockets only (QEMU's
/// `migrate_multi_channels_is_allowed`). A clone can shut it down from another thread,
/// which ends a blocked read or write (a failure, `migrate_cancel`, the end).
#[derive(Debug)]
pub enum Socket {
    /// `unix:`.
    Unix(UnixStream),
    /// `tcp:`.
    Tcp(TcpStream),
}

impl Socket {
    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection both ways (errors ignored: it may be closed already).
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Bounds each read (`None`: reads wait as long as it takes).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(timeout),
            Socket::Tcp(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What opens a channel (QEMU's `MultiFDInit_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelInit {
    /// The migration's UUID, as the main stream's configuration has it.
    pub uuid: Uuid,
    /// The channel's number, from 0.
    pub id: u8,
}

impl ChannelInit {
    /// The header as sent: magic and version big-endian, as QEMU's, then the UUID, the
    /// number and zero padding.
    pub fn encode(&self) -> [u8; INIT_LEN] {
        let mut out = [0u8; INIT_LEN];
        out[0..4].copy_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&MULTIFD_VERSION.to_be_bytes());
        out[8..24].copy_from_slice(&self.uuid.0);
        out[24] = self.id;
        out
    }

    /// Reads the rest of a header whose first four bytes were `first` (already checked
    /// with [`is_channel`], or checked here).
    pub fn read(first: [u8; 4], r: &mut impl Read) -> Result<ChannelInit, MigrationError> {
        let mut buf = [0u8; INIT_LEN];
        buf[0..4].copy_from_slice(&first);
        r.read_exact(&mut buf[4..])
            .map_err(|e| MigrationError::Multifd(format!("multifd: reading a channel's header: {}", io_text(&e))))?;
        let word = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        if word(0) != MULTIFD_MAGIC {
            return Err(MigrationError::Multifd(format!(
                "multifd: received packet magic {:x} expected {MULTIFD_MAGIC:x}",
                word(0)
            )));
        }
        if word(4) != MULTIFD_VERSION {
            return Err(MigrationError::Multifd(format!(
                "multifd: received packet version {} expected {MULTIFD_VERSION}",
                word(4)
            )));
        }
        Ok(ChannelInit {
            uuid: Uuid(buf[8..24].try_into().expect("16 bytes")),
            id: buf[24],
        })
    }
}

fn io_text(e: &std::io::Error) -> String {
    crate::core::os_error::strerror(e)
}

/// What the sending threads counted (QEMU's per-channel `packets_sent`, `total_normal_pages`),
/// drained into the migration's [`Progress`] by its thread.
#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    normal_pages: AtomicU64,
    zero_pages: AtomicU64,
}

impl Counters {
    fn drain_into(&self, progress: &mut Progress) {
        progress.transferred += self.bytes.swap(0, Ordering::Relaxed);
        progress.normal_pages += self.normal_pages.swap(0, Ordering::Relaxed);
        progress.zero_pages += self.zero_pages.swap(0, Ordering::Relaxed);
    }
}

/// The sending threads' shared work.
#[derive(Debug, Default)]
struct SendState {
    /// Batches of page addresses not yet taken by a channel.
    queue: VecDeque<Vec<u64>>,
    /// Per channel: a sync packet is due once the queue is empty.
    sync_due: Vec<bool>,
    /// The threads end once the queue is empty.
    quit: bool,
    /// The first channel's failure.
    error: Option<String>,
}

#[derive(Debug)]
struct SendShared {
    state: Mutex<SendState>,
    /// Wakes the channels' threads (work, a sync, the end).
    work: Condvar,
    /// Wakes the migration thread (room in the queue, a sync sent, a failure).
    progress: Condvar,
    counters: Counters,
    /// Clones of the channels, to end blocked writes.
    sockets: Vec<Socket>,
}

impl SendShared {
    fn fail(&self, error: String) {
        let mut st = self.state.lock();
        if st.error.is_none() {
            st.error = Some(error);
        }
        st.quit = true;
        drop(st);
        self.work.notify_all();
        self.progress.notify_all();
        for s in &self.sockets {
            s.shutdown();
        }
    }
}

/// The source's channels (QEMU's `multifd_send_state`): [`Sender::send_pages`] queues
/// batches that whichever channel is free reads from guest RAM and sends;
/// [`Sender::sync`] ends a pass.
#[derive(Debug)]
pub struct Sender {
    shared: Arc<SendShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    syncs: u64,
}

impl Sender {
    /// Sends each channel's header and starts a thread per channel (`channels[i]` is
    /// channel `i`) reading pages of `ram`.
    pub fn start(
        ram: Arc<GuestMemoryMmap>,
        channels: Vec<Socket>,
        uuid: Uuid,
        progress: &mut Progress,
    ) -> Result<Sender, MigrationError> {
        let mut sockets = Vec::with_capacity(channels.len());
        for s in &channels {
            sockets.push(s.try_clone()?);
        }
        let shared = Arc::new(SendShared {
            state: Mutex::new(SendState {
                sync_due: vec![false; channels.len()],
                ..Default::default()
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            counters: Counters::default(),
            sockets,
        });
        let mut sender = Sender {
            shared: shared.clone(),
            threads: Vec::new(),
            syncs: 0,
        };
        for (id, mut socket) in channels.into_iter().enumerate() {
            let init = ChannelInit { uuid, id: id as u8 };
            socket
                .write_all(&init.encode())
                .map_err(|e| MigrationError::Multifd(format!("multifd: channel {id}: {}", io_text(&e))))?;
            progress.transferred += INIT_LEN as u64;
            let shared = shared.clone();
            let ram = ram.clone();
            let thread = std::thread::Builder::new()
                .name(format!("multifdsend_{id}"))
                .spawn(move || {
                    if let Err(e) = send_channel(&shared, id, &ram, socket) {
                        shared.fail(format!("multifd: channel {id}: {e}"));
                    }
                })?;
            sender.threads.push(thread);
        }
        Ok(sender)
    }

    /// Waits (in slices, for `migrate_cancel`) until `ready` holds for the shared state.
    fn wait_until(
        &self,
        cancelled: &dyn Fn() -> bool,
        mut ready: impl FnMut(&mut SendState) -> bool,
    ) -> Result<parking_lot::MutexGuard<'_, SendState>, MigrationError> {
        let mut st = self.shared.state.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(MigrationError::Multifd(e.clone()));
            }
            if cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if ready(&mut st) {
                return Ok(st);
            }
            self.shared.progress.wait_for(&mut st, POLL);
        }
    }

    /// Queues `pages` for the channels, a packet's worth per batch, waiting while the
    /// channels are busy; adds what they sent so far to `progress`.
    pub fn send_pages(
        &self,
        pages: impl Iterator<Item = u64>,
        progress: &mut Progress,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), MigrationError> {
        let room = QUEUED_PER_CHANNEL * self.threads.len().max(1);
        let mut pages = pages.peekable();
        while pages.peek().is_some() {
            let batch: Vec<u64> = pages.by_ref().take(PAGES_PER_PACKET).collect();
            let mut st = self.wait_until(cancelled, |st| st.queue.len() < room)?;
            st.queue.push_back(batch);
            drop(st);
            self.shared.work.notify_one();
        }
        self.shared.counters.drain_into(progress);
        Ok(())
    }

    /// Ends a pass (QEMU's `multifd_send_sync_main`): waits until every channel sent what
    /// was queued and then its sync packet, and writes the sync record to the main
    /// stream `w` (flushed: the destination's channels wait for it).
    pub fn sync(
        &mut self,
        w: &mut impl Write,
        progress: &mut Progress,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), MigrationError> {
        {
            let mut st = self.shared.state.lock();
            st.sync_due.iter_mut().for_each(|d| *d = true);
        }
        self.shared.work.notify_all();
        drop(self.wait_until(cancelled, |st| {
            st.queue.is_empty() && st.sync_due.iter().all(|d| !d)
        })?);
        self.syncs += 1;
        self.shared.counters.drain_into(progress);
        progress.transferred += migration::write_multifd_sync(w, self.syncs)?;
        w.flush()?;
        Ok(())
    }

    /// Ends the channels after the last sync: the threads finish and the connections
    /// close.
    pub fn finish(mut self, progress: &mut Progress) -> Result<(), MigrationError> {
        self.shared.state.lock().quit = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.shared.counters.drain_into(progress);
        match self.shared.state.lock().error.take() {
            Some(e) => Err(MigrationError::Multifd(e)),
            None => Ok(()),
        }
    }
}

impl Drop for Sender {
    /// A migration that failed or was cancelled: the channels are shut down, so no thread
    /// stays blocked in a write, and the threads are joined.
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.shared.fail("the migration ended".into());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One channel's thread: takes batches (or its sync), reads the pages and sends packets.
fn send_channel(
    shared: &SendShared,
    id: usize,
    ram: &GuestMemoryMmap,
    mut socket: Socket,
) -> Result<(), String> {
    let mut packet_num = 0u64;
    let mut addrs = Vec::with_capacity(PAGES_PER_PACKET * 8 + PACKET_HEADER_LEN);
    let mut data = Vec::with_capacity(PAGES_PER_PACKET * PAGE_SIZE as usize);
    let stop = || shared.state.lock().error.is_some();
    loop {
        let job = {
            let mut st = shared.state.lock();
            loop {
                if st.error.is_some() {
                    return Ok(());
                }
                if let Some(batch) = st.queue.pop_front() {
                    break Some(batch);
                }
                if st.sync_due[id] {
                    break None;
                }
                if st.quit {
                    return Ok(());
                }
                shared.work.wait(&mut st);
            }
        };
        // A slot is free: the migration thread may queue the next batch.
        shared.progress.notify_all();
        addrs.clear();
        data.clear();
        let (flags, pages, normal, zero) = match &job {
            Some(batch) => {
                let (mut normal, mut zero) = (0u64, 0u64);
                addrs.resize(PACKET_HEADER_LEN, 0);
                migration::for_each_page(ram, batch.iter().copied(), &stop, |addr, page| {
                    match page {
                        None => {
                            addrs.extend_from_slice(&(addr | ZERO_PAGE).to_le_bytes());
                            zero += 1;
                        }
                        Some(page) => {
                            addrs.extend_from_slice(&addr.to_le_bytes());
                            data.extend_from_slice(page);
                            normal += 1;
                        }
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
                (0, batch.len() as u32, normal, zero)
            }
            None => {
                addrs.resize(PACKET_HEADER_LEN, 0);
                (FLAG_SYNC, 0, 0, 0)
            }
        };
        addrs[0..4].copy_from_slice(&MULTIFD_MAGIC.to_le_bytes());
        addrs[4..8].copy_from_slice(&MULTIFD_VERSION.to_le_bytes());
        addrs[8..12].copy_from_slice(&flags.to_le_bytes());
        addrs[12..16].copy_from_slice(&pages.to_le_bytes());
        addrs[16..24].copy_from_slice(&packet_num.to_le_bytes());
        packet_num += 1;
        socket
            .write_all(&addrs)
            .and_then(|()| socket.write_all(&data))
            .map_err(|e| io_text(&e))?;
        let c = &shared.counters;
        c.bytes
            .fetch_add((addrs.len() + data.len()) as u64, Ordering::Relaxed);
        c.normal_pages.fetch_add(normal, Ordering::Relaxed);
        c.zero_pages.fetch_add(zero, Ordering::Relaxed);
        if job.is_none() {
            shared.state.lock().sync_due[id] = false;
            shared.progress.notify_all();
        }
    }
}

/// Where the destination's channels stand (QEMU's `multifd_recv_state`).
#[derive(Debug, Default)]
struct RecvState {
    /// Sync packets each channel has applied.
    reached: Vec<u64>,
    /// The sync the main stream has passed: a channel past it waits.
    released: u64,
    /// Channels whose source closed them.
    closed: Vec<bool>,
    /// The first failure.
    error: Option<String>,
    /// The stream is done (or failed): the threads end.
    finished: bool,
}

#[derive(Debug)]
struct RecvShared {
    state: Mutex<RecvState>,
    cond: Condvar,
    bytes: AtomicU64,
    /// The channels and the main stream, to end blocked reads at a failure or the end.
    sockets: Vec<Socket>,
}

impl RecvShared {
    /// A failure anywhere ends the load: every connection is shut down, so the main
    /// stream's read stops too and reports it.
    fn fail(&self, error: String) {
        let mut st = self.state.lock();
        if st.error.is_none() {
            st.error = Some(error);
        }
        st.finished = true;
        drop(st);
        self.cond.notify_all();
        for s in &self.sockets {
            s.shutdown();
        }
    }
}

/// The destination's channels: a thread per channel applies packets to guest RAM;
/// [`Receiver::sync`] is the main stream's side of a sync.
#[derive(Debug)]
pub struct Receiver {
    shared: Arc<RecvShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts a thread per channel (`channels[i]` is channel `i`, its header read).
    /// `main` is a handle on the main stream, shut down if a channel fails.
    pub fn start(
        ram: Arc<GuestMemoryMmap>,
        channels: Vec<Socket>,
        main: Option<Socket>,
    ) -> Result<Receiver, MigrationError> {
        let mut sockets = Vec::with_capacity(channels.len() + 1);
        for s in &channels {
            sockets.push(s.try_clone()?);
        }
        sockets.extend(main);
        let n = channels.len();
        let shared = Arc::new(RecvShared {
            state: Mutex::new(RecvState {
                reached: vec![0; n],
                closed: vec![false; n],
                ..Default::default()
            }),
            cond: Condvar::new(),
            bytes: AtomicU64::new(INIT_LEN as u64 * n as u64),
            sockets,
        });
        let mut threads = Vec::with_capacity(n);
        for (id, socket) in channels.into_iter().enumerate() {
            let shared = shared.clone();
            let ram = ram.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("multifdrecv_{id}"))
                    .spawn(move || {
                        if let Err(e) = recv_channel(&shared, id, &ram, socket) {
                            if !shared.state.lock().finished {
                                shared.fail(e.to_string());
                            }
                        }
                    })?,
            );
        }
        Ok(Receiver { shared, threads })
    }

    /// The main stream's sync record `n` (QEMU's `multifd_recv_sync_main`): waits until
    /// every channel has applied its pages up to its `n`th sync packet, then lets them go
    /// on with the next pass.
    pub fn sync(&self, n: u64) -> Result<(), MigrationError> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut st = self.shared.state.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(MigrationError::Multifd(e.clone()));
            }
            if let Some(id) = (0..st.reached.len()).find(|&i| st.reached[i] > n) {
                return Err(MigrationError::Multifd(format!(
                    "multifd: channel {id} is past sync {n}"
                )));
            }
            let behind = (0..st.reached.len()).find(|&i| st.reached[i] < n);
            let Some(id) = behind else { break };
            if st.closed[id] {
                return Err(MigrationError::Multifd(format!(
                    "multifd: channel {id} was closed before sync {n}"
                )));
            }
            if self.shared.cond.wait_until(&mut st, deadline).timed_out() {
                return Err(MigrationError::Multifd(format!(
                    "multifd: channel {id} did not reach sync {n} within {} s",
                    SYNC_TIMEOUT.as_secs()
                )));
            }
        }
        st.released = n;
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// The channels' failure, if one failed (the main stream's own error is then only
    /// its consequence).
    pub fn error(&self) -> Option<String> {
        self.shared.state.lock().error.clone()
    }

    /// Ends the channels (after the last sync, before the device state loads, so no
    /// channel writes guest RAM after it): returns the bytes they received.
    pub fn finish(&mut self) -> u64 {
        self.shared.state.lock().finished = true;
        self.shared.cond.notify_all();
        for s in &self.shared.sockets[..self.threads.len()] {
            s.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.shared.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.finish();
        }
    }
}

/// One channel's thread: reads packets and writes their pages to guest RAM; at a sync
/// packet, waits for the main stream.
fn recv_channel(
    shared: &RecvShared,
    id: usize,
    ram: &GuestMemoryMmap,
    mut socket: Socket,
) -> Result<(), MigrationError> {
    let mut header = [0u8; PACKET_HEADER_LEN];
    let mut addrs = vec![0u8; PAGES_PER_PACKET * 8];
    let mut data = vec![0u8; PAGES_PER_PACKET * PAGE_SIZE as usize];
    let mut expected_num = 0u64;
    let bad = |text: String| MigrationError::Multifd(format!("multifd: channel {id}: {text}"));
    loop {
        match read_full(&mut socket, &mut header) {
            Ok(true) => {}
            // The source closes its channels after the last sync.
            Ok(false) => {
                shared.state.lock().closed[id] = true;
                shared.cond.notify_all();
                return Ok(());
            }
            Err(e) => return Err(bad(io_text(&e))),
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        if word(0) != MULTIFD_MAGIC {
            return Err(MigrationError::Multifd(format!(
                "multifd: received packet magic {:x} expected {MULTIFD_MAGIC:x}",
                word(0)
            )));
        }
        if word(4) != MULTIFD_VERSION {
            return Err(MigrationError::Multifd(format!(
                "multifd: received packet version {} expected {MULTIFD_VERSION}",
                word(4)
            )));
        }
        let flags = word(8);
        if flags & !FLAG_SYNC != 0 {
            return Err(bad(format!("unknown packet flags {flags:#x}")));
        }
        let pages = word(12) as usize;
        if pages > PAGES_PER_PACKET {
            return Err(MigrationError::Multifd(format!(
                "multifd: received packet with {pages} pages and expected maximum pages are {PAGES_PER_PACKET}"
            )));
        }
        let num = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
        if num != expected_num {
            return Err(bad(format!("packet {num} where {expected_num} was due")));
        }
        expected_num += 1;
        let addrs = &mut addrs[..pages * 8];
        socket.read_exact(addrs).map_err(|e| bad(io_text(&e)))?;
        let words: Vec<u64> = addrs
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if let Some(w) = words.iter().find(|&&w| w & (PAGE_SIZE - 1) & !ZERO_PAGE != 0) {
            return Err(bad(format!("page address {w:#x} is not page-aligned")));
        }
        let normal: Vec<u64> = words.iter().copied().filter(|w| w & ZERO_PAGE == 0).collect();
        let zero: Vec<u64> = words
            .iter()
            .filter(|&&w| w & ZERO_PAGE != 0)
            .map(|w| w & !ZERO_PAGE)
            .collect();
        let data = &mut data[..normal.len() * PAGE_SIZE as usize];
        socket.read_exact(data).map_err(|e| bad(io_text(&e)))?;
        for (addr, page) in normal.iter().zip(data.chunks_exact(PAGE_SIZE as usize)) {
            ram.write_slice(page, GuestAddress(*addr))
                .map_err(|e| bad(format!("page {addr:#x}: {e}")))?;
        }
        migration::load_zero_pages(ram, &zero)?;
        shared.bytes.fetch_add(
            (PACKET_HEADER_LEN + addrs.len() + data.len()) as u64,
            Ordering::Relaxed,
        );
        if flags & FLAG_SYNC != 0 {
            let mut st = shared.state.lock();
            st.reached[id] += 1;
            let mine = st.reached[id];
            shared.cond.notify_all();
            // No wait bound: the main stream releases, fails or finishes, and a failure
            // anywhere finishes.
            while st.released < mine && !st.finished {
                shared.cond.wait(&mut st);
            }
            if st.finished {
                return Ok(());
            }
        }
    }
}

/// Fills `buf`; `Ok(false)` if the stream ended before its first byte.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_header_round_trips_and_a_bad_one_is_named() {
        let init = ChannelInit {
            uuid: Uuid([7; 16]),
            id: 3,
        };
        let bytes = init.encode();
        assert!(is_channel(bytes[..4].try_into().unwrap()));
        let first: [u8; 4] = bytes[..4].try_into().unwrap();
        assert_eq!(ChannelInit::read(first, &mut &bytes[4..]).unwrap(), init);
        let mut old = bytes;
        old[7] = 9;
        let err = ChannelInit::read(first, &mut &old[4..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "multifd: received packet version 9 expected 1"
        );
        assert!(!is_channel(b"QOMV"));
    }

    fn ram() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    fn pairs(n: usize) -> (Vec<Socket>, Vec<Socket>) {
        (0..n)
            .map(|_| {
                let (a, b) = UnixStream::pair().unwrap();
                (Socket::Unix(a), Socket::Unix(b))
            })
            .unzip()
    }

    /// Two passes over three channels: data pages, zero pages (the destination's stale
    /// data cleared), a page rewritten between the passes arrives in its newer version,
    /// and both sides count the same bytes.
    #[test]
    fn pages_cross_the_channels_pass_after_pass() {
        let (src, dst) = (ram(), ram());
        let (ours, theirs) = pairs(3);
        let uuid = Uuid([1; 16]);
        let mut progress = Progress::default();
        let mut sender = Sender::start(src.clone(), ours, uuid, &mut progress).unwrap();
        let channels = theirs
            .into_iter()
            .map(|mut s| {
                let mut first = [0u8; 4];
                s.read_exact(&mut first).unwrap();
                assert_eq!(ChannelInit::read(first, &mut s).unwrap().uuid, uuid);
                s
            })
            .collect();
        let mut receiver = Receiver::start(dst.clone(), channels, None).unwrap();
        let pages: Vec<u64> = (0..256).map(|i| i * PAGE_SIZE).collect();
        for &p in &pages[..200] {
            src.write_obj(p | 0x55, GuestAddress(p + 8)).unwrap();
        }
        // Stale data where the source has zeros.
        dst.write_obj(0xdead_u64, GuestAddress(255 * PAGE_SIZE)).unwrap();
        let mut main = Vec::new();
        let never = || false;
        sender.send_pages(pages.iter().copied(), &mut progress, &never).unwrap();
        sender.sync(&mut main, &mut progress, &never).unwrap();
        receiver.sync(1).unwrap();
        src.write_obj(0x77_u64, GuestAddress(5 * PAGE_SIZE + 8)).unwrap();
        sender.send_pages([5 * PAGE_SIZE].into_iter(), &mut progress, &never).unwrap();
        sender.sync(&mut main, &mut progress, &never).unwrap();
        receiver.sync(2).unwrap();
        sender.finish(&mut progress).unwrap();
        let received = receiver.finish();
        assert_eq!(progress.normal_pages, 201);
        assert_eq!(progress.zero_pages, 56);
        // The main stream's two sync records are counted there.
        assert_eq!(progress.transferred, received + 2 * (9 + 8));
        for &p in &pages[..200] {
            let want = if p == 5 * PAGE_SIZE { 0x77 } else { p | 0x55 };
            assert_eq!(dst.read_obj::<u64>(GuestAddress(p + 8)).unwrap(), want);
        }
        assert_eq!(dst.read_obj::<u64>(GuestAddress(255 * PAGE_SIZE)).unwrap(), 0);
    }

    /// A damaged packet fails the load with one line and ends the channels; nothing
    /// panics or waits for ever.
    #[test]
    fn a_bad_packet_is_an_error() {
        let (mut ours, theirs) = pairs(1);
        let receiver = Receiver::start(ram(), theirs, None).unwrap();
        let mut header = [0u8; PACKET_HEADER_LEN];
        header[0..4].copy_from_slice(&MULTIFD_MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&MULTIFD_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&1000u32.to_le_bytes());
        ours[0].write_all(&header).unwrap();
        let err = receiver.sync(1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "multifd: received packet with 1000 pages and expected maximum pages are 128"
        );
        // A page outside guest RAM.
        let (mut ours, theirs) = pairs(1);
        let receiver = Receiver::start(ram(), theirs, None).unwrap();
        header[12..16].copy_from_slice(&1u32.to_le_bytes());
        ours[0].write_all(&header).unwrap();
        ours[0].write_all(&(1u64 << 40 | ZERO_PAGE).to_le_bytes()).unwrap();
        let err = receiver.sync(1).unwrap_err();
        assert!(err.to_string().contains("0x10000000000"), "{err}");
        // The source closing a channel early.
        let (ours, theirs) = pairs(2);
        let receiver = Receiver::start(ram(), theirs, None).unwrap();
        drop(ours);
        let err = receiver.sync(1).unwrap_err();
        assert!(err.to_string().contains("was closed before sync 1"), "{err}");
    }
}
