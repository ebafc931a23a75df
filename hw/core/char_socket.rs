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

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::core::chardev::{parse_bool_opt, CharBackend, CharReceiver, ChardevError};

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
fn apply_flag(spec: &mut SocketSpec, key: &str, value: Option<&str>) -> Result<bool, ChardevError> {
    match key {
        "server" => spec.server = parse_bool_opt(key, value)?,
        "wait" => spec.wait = parse_bool_opt(key, value)?,
        "nowait" => spec.wait = false,
        "nodelay" => spec.nodelay = parse_bool_opt(key, value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn bad_address(text: &str) -> ChardevError {
    ChardevError::InvalidValue {
        name: text.to_string(),
        expected: "HOST:PORT",
    }
}

/// `-serial`'s and `-qmp`'s shorthand: `unix:PATH,...` or `tcp:HOST:PORT,...` (`kind` and
/// what follows its colon, split into options, the address first).
pub fn parse_shorthand(
    kind: &str,
    items: Vec<(String, Option<String>)>,
) -> Result<SocketSpec, ChardevError> {
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
        other => return Err(ChardevError::UnknownDriver(other.to_string())),
    };
    let mut spec = SocketSpec {
        target,
        server: false,
        wait: true,
        nodelay: false,
    };
    for (key, value) in items {
        if !apply_flag(&mut spec, &key, value.as_deref())? {
            return Err(ChardevError::InvalidParameter(key));
        }
    }
    Ok(spec)
}

/// `-chardev socket`'s options after the backend name, `id=` already taken out:
/// `path=`, `host=`+`port=` or `fd=`, and the flags.
pub fn parse_chardev(items: Vec<(String, Option<String>)>) -> Result<SocketSpec, ChardevError> {
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
            _ => return Err(ChardevError::InvalidParameter(key)),
        }
    }
    spec.target = match (path, host, port, fd) {
        (Some(path), None, None, None) => SocketTarget::Unix(PathBuf::from(path)),
        (None, host, Some(port), None) => SocketTarget::Tcp(
            host.unwrap_or_default(),
            port.parse().map_err(|_| ChardevError::InvalidValue {
                name: "port".into(),
                expected: "a port number",
            })?,
        ),
        (None, None, None, Some(fd)) => SocketTarget::Fd(inherited_listener(&fd)?),
        _ => return Err(ChardevError::SocketAddress),
    };
    Ok(spec)
}

/// Checks that `text` names an open descriptor holding a listening Unix socket (`fd=`).
pub fn inherited_listener(text: &str) -> Result<RawFd, ChardevError> {
    let fd: RawFd = text
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| ChardevError::BadFd(text.to_string()))?;
    // SAFETY: F_GETFD only reads the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ChardevError::BadFd(text.to_string()));
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
        return Err(ChardevError::NotListeningSocket(fd));
    }
    Ok(fd)
}

/// Binds the Unix socket `path`, replacing a socket an earlier run left there (never
/// another kind of file), as QEMU does.
pub fn bind_unix(path: &std::path::Path) -> Result<UnixListener, ChardevError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|e| bind_error(&path.display().to_string(), &e))
}

/// QEMU's `Failed to bind socket` error.
pub fn bind_error(what: &str, e: &io::Error) -> ChardevError {
    ChardevError::Bind {
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

/// The socket chardev.
pub struct SocketBackend {
    spec: SocketSpec,
    receiver: Mutex<Option<CharReceiver>>,
    /// The connected client (server) or server (client); `None` while there is none.
    peer: Mutex<Option<Stream>>,
}

impl SocketBackend {
    /// Listens (waiting for the first client with `wait=on`) or connects, and starts the
    /// thread that reads the connection and, for a server, accepts the next one.
    pub fn open(spec: SocketSpec) -> Result<Arc<SocketBackend>, ChardevError> {
        let backend = Arc::new(SocketBackend {
            spec: spec.clone(),
            receiver: Mutex::new(None),
            peer: Mutex::new(None),
        });
        let weak = Arc::downgrade(&backend);
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
                SocketTarget::Fd(_) => return Err(ChardevError::SocketAddress),
            }
            .map_err(|e| ChardevError::Connect {
                what: what.clone(),
                reason: crate::core::os_error::strerror(&e),
            })?;
            let reader = stream.try_clone().map_err(|e| bind_error(&what, &e))?;
            *backend.peer.lock() = Some(stream);
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
                *backend.peer.lock() = Some(stream);
                drop(backend);
                if !serve_connection(&weak, reader) {
                    return;
                }
            }
        })?;
        Ok(backend)
    }
}

/// Starts the thread that serves the socket.
fn spawn(what: &str, f: impl FnOnce() + Send + 'static) -> Result<(), ChardevError> {
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
    if let Some(peer) = b.peer.lock().take() {
        peer.shutdown();
    }
    true
}

impl CharBackend for SocketBackend {
    fn write(&self, data: &[u8]) {
        let mut peer = self.peer.lock();
        let failed = peer.as_mut().is_some_and(|s| s.write_all(data).is_err());
        if failed {
            // The peer is gone: the reader thread sees it too and moves on.
            if let Some(s) = peer.take() {
                s.shutdown();
            }
        }
    }

    fn set_receiver(&self, receiver: Option<CharReceiver>) {
        *self.receiver.lock() = receiver;
    }

    fn driver(&self) -> &'static str {
        "socket"
    }

    fn filename(&self) -> String {
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
            Err(ChardevError::SocketAddress)
        ));
        assert!(matches!(
            parse_chardev(items("fd=1")),
            Err(ChardevError::BadFd(_))
        ));
        assert!(matches!(
            parse_chardev(items("path=/a,telnet=on")),
            Err(ChardevError::InvalidParameter(_))
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
