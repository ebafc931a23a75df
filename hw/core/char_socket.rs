//! The socket chardev (QEMU's `chardev/char-socket.c`): a serial port (or any frontend)
//! over a Unix or TCP stream socket, as a server that waits for one client at a time or
//! as a client that connects at start-up. Spellings: `-serial unix:PATH,server=on,wait=off`,
//! `-serial tcp:HOST:PORT[,server=on][,wait=off][,nodelay=on]` and `-chardev socket,id=ID,
//! path=PATH|host=HOST,port=PORT|fd=N[,server=on][,wait=off]` (`fd=`: a listening socket
//! the caller passed, as libvirt does).
//!
//! A server accepts the next client only once the previous one left, as QEMU does; while
//! no client is connected the frontend's output is dropped (QEMU's `tcp_chr_write`). Input
//! goes to the frontend's receiver from the connection's reader thread. The monitor's own
//! sockets (`src/monitor/chardev.rs`) share the parsing and the inherited-descriptor check.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex};

use crate::core::log_limit::RateLimitedLog;

/// Where input goes (`chardev::CharReceiver`, spelled out so that this file does not
/// import `chardev`, which opens sockets through it).
pub type Receiver = Arc<dyn Fn(&[u8]) + Send + Sync>;
/// What hears the peer come (`true`) and go (`chardev::OpenNotifier`).
pub type Notifier = Arc<dyn Fn(bool) + Send + Sync>;
/// What hears that output can be queued again (`chardev::RoomNotifier`).
pub type RoomNotifier = Arc<dyn Fn() + Send + Sync>;

/// Errors of socket chardevs, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// An option the socket does not take.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// An option value that does not parse.
    #[error("Parameter '{name}' expects {expected}")]
    InvalidValue {
        /// The option.
        name: String,
        /// What it accepts.
        expected: &'static str,
    },
    /// `fd=` that is not a number or not an open descriptor.
    #[error("Could not use file descriptor '{0}': not an open descriptor")]
    BadFd(String),
    /// `fd=` naming a descriptor that is not a listening Unix socket.
    #[error("file descriptor {0} is not a listening Unix socket")]
    NotListeningSocket(RawFd),
    /// No address, or more than one.
    #[error("chardev: socket: exactly one of 'path', 'host'/'port' and 'fd' is required")]
    SocketAddress,
    /// A server socket could not be made.
    #[error("Failed to bind socket to {what}: {reason}")]
    Bind {
        /// The path or address.
        what: String,
        /// The OS error.
        reason: String,
    },
    /// A client socket could not connect.
    #[error("Failed to connect to '{what}': {reason}")]
    Connect {
        /// The path or address.
        what: String,
        /// The OS error.
        reason: String,
    },
}

/// QemuOpts' boolean.
fn parse_bool_opt(key: &str, value: Option<&str>) -> Result<bool, SocketError> {
    crate::core::qemu_opts::parse_on_off(value).ok_or_else(|| SocketError::InvalidValue {
        name: key.to_string(),
        expected: "'on' or 'off'",
    })
}

/// Output dropped for a peer that does not read, logged at a limited rate.
static DROPPED: std::sync::LazyLock<RateLimitedLog> = std::sync::LazyLock::new(RateLimitedLog::default);

/// Where a socket chardev listens or connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketTarget {
    /// A Unix socket at a path.
    Unix(PathBuf),
    /// A TCP host (empty: every address) and port.
    Tcp(String, u16),
    /// An inherited listening Unix socket (`fd=N`).
    Fd(RawFd),
}

/// A socket chardev's options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketSpec {
    /// Where.
    pub target: SocketTarget,
    /// `server=on`: listen (else connect).
    pub server: bool,
    /// `wait=on` (a server's default): start-up waits for the first client.
    pub wait: bool,
    /// `nodelay=on`: TCP_NODELAY.
    pub nodelay: bool,
}

impl SocketSpec {
    /// QEMU's `filename` of the chardev before a client connects (`query-chardev`).
    pub fn describe(&self) -> String {
        let server = if self.server { ",server=on" } else { "" };
        match &self.target {
            SocketTarget::Unix(path) => format!("unix:{}{server}", path.display()),
            SocketTarget::Tcp(host, port) => format!("tcp:{host}:{port}{server}"),
            SocketTarget::Fd(_) => format!("unix:{server}"),
        }
    }
}

/// The flags every spelling takes: `server`, `wait` (`nowait`), `nodelay`. Returns
/// whether `key` was one of them.
fn apply_flag(spec: &mut SocketSpec, key: &str, value: Option<&str>) -> Result<bool, SocketError> {
    match key {
        "server" => spec.server = parse_bool_opt(key, value)?,
        "wait" => spec.wait = parse_bool_opt(key, value)?,
        "nowait" => spec.wait = false,
        "nodelay" => spec.nodelay = parse_bool_opt(key, value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn bad_address(text: &str) -> SocketError {
    SocketError::InvalidValue {
        name: text.to_string(),
        expected: "HOST:PORT",
    }
}

/// `-serial`'s and `-qmp`'s shorthand: `unix:PATH,...` or `tcp:HOST:PORT,...` (`kind` and
/// what follows its colon, split into options, the address first).
pub fn parse_shorthand(
    kind: &str,
    items: Vec<(String, Option<String>)>,
) -> Result<SocketSpec, SocketError> {
    let mut items = items.into_iter();
    let address = items.next().and_then(|(_, v)| v).unwrap_or_default();
    let target = match kind {
        "unix" => SocketTarget::Unix(PathBuf::from(address)),
        "tcp" => {
            let (host, port) = address.rsplit_once(':').ok_or_else(|| bad_address(&address))?;
            let port = port.parse().map_err(|_| bad_address(&address))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            SocketTarget::Tcp(host.to_string(), port)
        }
        other => return Err(SocketError::InvalidParameter(other.to_string())),
    };
    let mut spec = SocketSpec {
        target,
        server: false,
        wait: true,
        nodelay: false,
    };
    for (key, value) in items {
        if !apply_flag(&mut spec, &key, value.as_deref())? {
            return Err(SocketError::InvalidParameter(key));
        }
    }
    Ok(spec)
}

/// A `-chardev`'s `id=` (the last one given; `None` if none or empty) and its other
/// options.
pub fn split_id(
    items: impl IntoIterator<Item = (String, Option<String>)>,
) -> (Option<String>, Vec<(String, Option<String>)>) {
    let (ids, rest): (Vec<_>, Vec<_>) = items.into_iter().partition(|(k, _)| k == "id");
    let id = ids.into_iter().last().and_then(|(_, v)| v).filter(|i| !i.is_empty());
    (id, rest)
}

/// `-chardev socket`'s options after the backend name, `id=` already taken out:
/// `path=`, `host=`+`port=` or `fd=`, and the flags.
pub fn parse_chardev(items: Vec<(String, Option<String>)>) -> Result<SocketSpec, SocketError> {
    let (mut path, mut host, mut port, mut fd) = (None, None, None, None);
    let mut spec = SocketSpec {
        target: SocketTarget::Fd(-1),
        server: false,
        wait: true,
        nodelay: false,
    };
    for (key, value) in items {
        if apply_flag(&mut spec, &key, value.as_deref())? {
            continue;
        }
        match key.as_str() {
            "path" => path = value,
            "host" => host = value,
            "port" => port = value,
            "fd" => fd = value,
            // QEMU's telnet and TLS wrappers are not there.
            _ => return Err(SocketError::InvalidParameter(key)),
        }
    }
    spec.target = match (path, host, port, fd) {
        (Some(path), None, None, None) => SocketTarget::Unix(PathBuf::from(path)),
        (None, host, Some(port), None) => SocketTarget::Tcp(
            host.unwrap_or_default(),
            port.parse().map_err(|_| SocketError::InvalidValue {
                name: "port".into(),
                expected: "a port number",
            })?,
        ),
        (None, None, None, Some(fd)) => SocketTarget::Fd(inherited_listener(&fd)?),
        _ => return Err(SocketError::SocketAddress),
    };
    Ok(spec)
}

/// Checks that `text` names an open descriptor holding a listening Unix socket (`fd=`).
pub fn inherited_listener(text: &str) -> Result<RawFd, SocketError> {
    let fd: RawFd = text
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| SocketError::BadFd(text.to_string()))?;
    // SAFETY: F_GETFD only reads the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(SocketError::BadFd(text.to_string()));
    }
    // SAFETY: a zeroed sockaddr_storage with its length is what getsockname fills.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes of the given size.
    let named = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut len) } == 0;
    let mut listening: libc::c_int = 0;
    let mut optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `listening` and `optlen` are valid for writes of the given size.
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &mut optlen,
        )
    } == 0;
    if !(named && got && listening != 0 && i32::from(addr.ss_family) == libc::AF_UNIX) {
        return Err(SocketError::NotListeningSocket(fd));
    }
    Ok(fd)
}

/// Binds the Unix socket `path`, replacing a socket an earlier run left there (never
/// another kind of file), as QEMU does.
pub fn bind_unix(path: &std::path::Path) -> Result<UnixListener, SocketError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|e| bind_error(&path.display().to_string(), &e))
}

/// QEMU's `Failed to bind socket` error.
pub fn bind_error(what: &str, e: &io::Error) -> SocketError {
    SocketError::Bind {
        what: what.to_string(),
        reason: crate::core::os_error::strerror(e),
    }
}

/// A connected stream, Unix or TCP.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(data),
            Stream::Tcp(s) => s.write_all(data),
        }
    }

    /// QEMU's `<-> PEER` part of a connected TCP chardev's filename.
    fn peer(&self) -> Option<String> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.to_string()),
            Stream::Unix(_) => None,
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self, nodelay: bool) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                let _ = s.set_nodelay(nodelay);
                Stream::Tcp(s)
            }
        })
    }
}

/// Output waiting for the writer thread; past this, output is dropped (a peer that
/// stopped reading must not stall the frontend, a vCPU or an event loop).
const OUTPUT_MAX: usize = 1 << 20;

/// The socket chardev.
pub struct SocketBackend {
    spec: SocketSpec,
    receiver: Mutex<Option<Receiver>>,
    notifier: Mutex<Option<Notifier>>,
    room_notifier: Mutex<Option<RoomNotifier>>,
    /// The connected client (server) or server (client); `None` while there is none.
    peer: Mutex<Option<Stream>>,
    /// Output for the peer, written by the writer thread.
    output: Mutex<Output>,
    output_ready: Condvar,
    /// `query-chardev`'s `frontend-open`.
    frontend_open: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Output {
    bytes: VecDeque<u8>,
    closed: bool,
    /// Bumped at each disconnection: a chunk taken for one peer never goes to the next.
    generation: u64,
}

impl Drop for SocketBackend {
    fn drop(&mut self) {
        self.output.lock().closed = true;
        self.output_ready.notify_all();
    }
}

impl SocketBackend {
    /// Listens (waiting for the first client with `wait=on`) or connects, and starts the
    /// thread that reads the connection and, for a server, accepts the next one.
    pub fn open(spec: SocketSpec) -> Result<Arc<SocketBackend>, SocketError> {
        let backend = Arc::new(SocketBackend {
            spec: spec.clone(),
            receiver: Mutex::new(None),
            notifier: Mutex::new(None),
            room_notifier: Mutex::new(None),
            peer: Mutex::new(None),
            output: Mutex::new(Output::default()),
            output_ready: Condvar::new(),
            frontend_open: std::sync::atomic::AtomicBool::new(true),
        });
        let weak = Arc::downgrade(&backend);
        let writer = weak.clone();
        spawn("the writer", move || write_output(&writer))?;
        let what = match &spec.target {
            SocketTarget::Unix(path) => path.display().to_string(),
            SocketTarget::Tcp(host, port) => format!("{host}:{port}"),
            SocketTarget::Fd(fd) => format!("fd {fd}"),
        };
        if !spec.server {
            let stream = match &spec.target {
                SocketTarget::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
                SocketTarget::Tcp(host, port) => TcpStream::connect((host.as_str(), *port))
                    .inspect(|s| {
                        let _ = s.set_nodelay(spec.nodelay);
                    })
                    .map(Stream::Tcp),
                SocketTarget::Fd(_) => return Err(SocketError::SocketAddress),
            }
            .map_err(|e| SocketError::Connect {
                what: what.clone(),
                reason: crate::core::os_error::strerror(&e),
            })?;
            let reader = stream.try_clone().map_err(|e| bind_error(&what, &e))?;
            backend.connected(stream);
            spawn(&what, move || {
                serve_connection(&weak, reader);
            })?;
            return Ok(backend);
        }
        let listener = match &spec.target {
            SocketTarget::Unix(path) => Listener::Unix(bind_unix(path)?),
            SocketTarget::Tcp(host, port) => {
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                let addr = (host, *port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| bad_address(&what))?;
                Listener::Tcp(TcpListener::bind(addr).map_err(|e| bind_error(&what, &e))?)
            }
            SocketTarget::Fd(fd) => {
                // SAFETY: parse_chardev checked that `fd` is an open listening socket,
                // inherited for this chardev, which owns it from here on.
                let listener = unsafe { UnixListener::from_raw_fd(*fd) };
                // SAFETY: FD_CLOEXEC on a descriptor we own: tap scripts must not inherit it.
                unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                Listener::Unix(listener)
            }
        };
        let first = if spec.wait {
            qom::error_report!(
                "info: QEMU waiting for connection on: disconnected:{}",
                spec.describe()
            );
            Some(
                listener
                    .accept(spec.nodelay)
                    .map_err(|e| bind_error(&what, &e))?,
            )
        } else {
            None
        };
        spawn(&what, move || {
            let mut next = first;
            loop {
                let stream = match next.take() {
                    Some(s) => s,
                    None => match listener.accept(spec.nodelay) {
                        Ok(s) => s,
                        Err(e) => {
                            log::warn!("chardev socket: accept: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            continue;
                        }
                    },
                };
                let Some(backend) = weak.upgrade() else {
                    return;
                };
                let reader = match stream.try_clone() {
                    Ok(r) => r,
                    Err(e) => {
                        log::warn!("chardev socket: {e}");
                        continue;
                    }
                };
                backend.connected(stream);
                drop(backend);
                if !serve_connection(&weak, reader) {
                    return;
                }
            }
        })?;
        Ok(backend)
    }
}

/// Starts a thread of the socket's.
fn spawn(what: &str, f: impl FnOnce() + Send + 'static) -> Result<(), SocketError> {
    std::thread::Builder::new()
        .name("chardev socket".into())
        .spawn(move || {
            f();
        })
        .map(drop)
        .map_err(|e| bind_error(what, &e))
}

/// Hands what the peer sends to the frontend until it hangs up, then forgets the
/// connection. Returns false once the backend is gone.
fn serve_connection(backend: &Weak<SocketBackend>, mut reader: Stream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(b) = backend.upgrade() else {
            return false;
        };
        let receiver = b.receiver.lock().clone();
        if let Some(receiver) = receiver {
            receiver(&buf[..n]);
        }
    }
    let Some(b) = backend.upgrade() else {
        return false;
    };
    b.disconnected();
    true
}

/// The writer thread: hands queued output to the peer, blocking here rather than in
/// the frontend.
fn write_output(backend: &Weak<SocketBackend>) {
    loop {
        let Some(b) = backend.upgrade() else {
            return;
        };
        let (chunk, generation): (Vec<u8>, u64) = {
            let mut out = b.output.lock();
            while out.bytes.is_empty() && !out.closed {
                // Wakes now and then so a dropped backend ends the thread.
                if b.output_ready
                    .wait_for(&mut out, std::time::Duration::from_millis(500))
                    .timed_out()
                {
                    break;
                }
            }
            if out.closed {
                return;
            }
            let n = out.bytes.len().min(64 * 1024);
            (out.bytes.drain(..n).collect(), out.generation)
        };
        if chunk.is_empty() {
            continue;
        }
        let stream = {
            let peer = b.peer.lock();
            // The peer the chunk was queued for, if it is still there.
            if b.output.lock().generation == generation {
                peer.as_ref().and_then(|s| s.try_clone().ok())
            } else {
                None
            }
        };
        let room_notifier = b.room_notifier.lock().clone();
        // Not kept across the write: the backend may go meanwhile.
        drop(b);
        if let Some(mut stream) = stream {
            if stream.write_all(&chunk).is_err() {
                // The peer is gone: its reader sees it too and moves on.
                stream.shutdown();
            }
        }
        if let Some(notify) = room_notifier {
            notify();
        }
    }
}

impl SocketBackend {
    /// A peer connected: the frontend hears of it.
    fn connected(&self, stream: Stream) {
        *self.peer.lock() = Some(stream);
        let notifier = self.notifier.lock().clone();
        if let Some(notifier) = notifier {
            notifier(true);
        }
    }

    /// The peer left: its unsent output goes, and the frontend hears of it.
    fn disconnected(&self) {
        let mut peer = self.peer.lock();
        if let Some(peer) = peer.take() {
            peer.shutdown();
        }
        {
            let mut out = self.output.lock();
            out.bytes.clear();
            out.generation += 1;
        }
        drop(peer);
        let notifier = self.notifier.lock().clone();
        if let Some(notifier) = notifier {
            notifier(false);
        }
    }
}

/// What `chardev` makes the socket's `CharBackend` of.
impl SocketBackend {
    /// Queues `data` for the peer (dropped without one).
    pub fn write(&self, data: &[u8]) {
        // Without a peer the bytes go nowhere, as QEMU's tcp_chr_write drops them.
        if self.peer.lock().is_none() {
            return;
        }
        let mut out = self.output.lock();
        // A write always fits an empty queue.
        if !out.bytes.is_empty() && out.bytes.len() + data.len() > OUTPUT_MAX {
            DROPPED.warn(|| {
                format!(
                    "chardev socket {}: the peer does not read; output dropped",
                    self.spec.describe()
                )
            });
            return;
        }
        out.bytes.extend(data);
        drop(out);
        self.output_ready.notify_one();
    }

    /// Installs the frontend's receiver.
    pub fn set_receiver(&self, receiver: Option<Receiver>) {
        *self.receiver.lock() = receiver;
    }

    /// Bytes a write queues now without dropping (any, while the queue is empty).
    pub fn write_room(&self) -> usize {
        let out = self.output.lock();
        if out.bytes.is_empty() {
            usize::MAX
        } else {
            OUTPUT_MAX.saturating_sub(out.bytes.len())
        }
    }

    /// Installs what hears that output can be queued again.
    pub fn set_room_notifier(&self, notifier: Option<RoomNotifier>) {
        *self.room_notifier.lock() = notifier;
    }

    /// Whether a peer is connected.
    pub fn is_open(&self) -> bool {
        self.peer.lock().is_some()
    }

    /// Installs what hears the peer come and go.
    pub fn set_open_notifier(&self, notifier: Option<Notifier>) {
        *self.notifier.lock() = notifier;
    }

    /// `query-chardev`'s `frontend-open`.
    pub fn frontend_open(&self) -> bool {
        self.frontend_open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The frontend opened or closed the socket.
    pub fn set_frontend_open(&self, open: bool) {
        self.frontend_open
            .store(open, std::sync::atomic::Ordering::Relaxed);
    }

    /// QEMU's `filename`: the address, `disconnected:` before it without a peer.
    pub fn filename(&self) -> String {
        match self.peer.lock().as_ref() {
            None => format!("disconnected:{}", self.spec.describe()),
            Some(s) => match s.peer() {
                Some(peer) => format!("{} <-> {peer}", self.spec.describe()),
                None => self.spec.describe(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(text: &str) -> Vec<(String, Option<String>)> {
        crate::core::qemu_opts::split_commas(text)
            .into_iter()
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (item.to_string(), None),
            })
            .collect()
    }

    #[test]
    fn shorthands_and_chardev_options_parse_as_qemus() {
        let spec = parse_shorthand("unix", items("path=/tmp/s,server=on,wait=off")).unwrap();
        assert_eq!(spec.target, SocketTarget::Unix("/tmp/s".into()));
        assert!(spec.server && !spec.wait);
        let spec = parse_shorthand("tcp", items("a=127.0.0.1:4444,server,nowait,nodelay")).unwrap();
        assert_eq!(spec.target, SocketTarget::Tcp("127.0.0.1".into(), 4444));
        assert!(spec.server && !spec.wait && spec.nodelay);
        assert_eq!(spec.describe(), "tcp:127.0.0.1:4444,server=on");
        let spec = parse_shorthand("tcp", items("a=:5555")).unwrap();
        assert_eq!(spec.target, SocketTarget::Tcp(String::new(), 5555));
        assert!(!spec.server && spec.wait);
        assert!(parse_shorthand("tcp", items("a=nohost")).is_err());
        assert!(parse_shorthand("unix", items("a=/p,bogus=1")).is_err());
        let spec = parse_chardev(items("host=127.0.0.1,port=7,server=on,wait=off")).unwrap();
        assert_eq!(spec.target, SocketTarget::Tcp("127.0.0.1".into(), 7));
        assert!(matches!(
            parse_chardev(items("path=/a,port=7")),
            Err(SocketError::SocketAddress)
        ));
        assert!(matches!(
            parse_chardev(items("fd=1")),
            Err(SocketError::BadFd(_))
        ));
        assert!(matches!(
            parse_chardev(items("path=/a,telnet=on")),
            Err(SocketError::InvalidParameter(_))
        ));
    }

    #[test]
    fn a_server_serves_one_client_at_a_time_and_drops_output_without_one() {
        let dir = std::env::temp_dir().join(format!("qomvm-char-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let spec = parse_shorthand("unix", items(&format!("a={},server,nowait", path.display())))
            .unwrap();
        let backend = SocketBackend::open(spec).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        backend.set_receiver(Some(Arc::new(move |b: &[u8]| sink.lock().extend_from_slice(b))));
        backend.write(b"lost");
        assert!(backend.filename().starts_with("disconnected:unix:"));
        let mut client = UnixStream::connect(&path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while backend.filename().starts_with("disconnected") {
            assert!(std::time::Instant::now() < deadline, "never connected");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        backend.write(b"hello");
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        client.write_all(b"typed").unwrap();
        while got.lock().len() < 5 {
            assert!(std::time::Instant::now() < deadline, "no input");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(&*got.lock(), b"typed");
        // A second client is served once the first leaves.
        let mut second = UnixStream::connect(&path).unwrap();
        second
            .set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        drop(client);
        let mut one = [0u8; 1];
        loop {
            backend.write(b"2");
            if matches!(second.read(&mut one), Ok(1)) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the second client was never served");
        }
        assert_eq!(&one, b"2");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
