//! The character backends a monitor listens on (the part of QEMU's `chardev/` the
//! `-qmp`/`-monitor` shorthands reach): `stdio`, `unix:PATH,server=on[,wait=off]` and
//! `tcp:127.0.0.1:PORT,server=on[,wait=off]`.
//!
//! Each accepted connection is handed to the monitor's session function on a thread of its
//! own, so a slow or broken client never holds up another or the VM. TCP listens on
//! loopback addresses only: the monitor has no authentication.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hw::core::char_socket::{self, SocketSpec, SocketTarget};

use crate::options::split_opts;

/// Most clients connected at once over all sockets; more are accepted and closed at once.
pub const MAX_CLIENTS: usize = 64;

static CLIENTS: AtomicUsize = AtomicUsize::new(0);

/// Where a monitor talks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The process's stdin and stdout.
    Stdio,
    /// A Unix socket server at the path.
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// `wait=on`: start-up waits for the first client.
        wait: bool,
    },
    /// A TCP server on a loopback address.
    Tcp {
        /// The address to listen on.
        addr: SocketAddr,
        /// `wait=on`: start-up waits for the first client.
        wait: bool,
    },
    /// A listening Unix socket inherited as descriptor `fd` (`-chardev socket,fd=N,server=on`,
    /// as libvirt passes its monitor socket).
    UnixFd {
        /// The descriptor.
        fd: RawFd,
        /// `wait=on`: start-up waits for the first client.
        wait: bool,
    },
    /// `none`: no monitor.
    Null,
}

/// Errors of parsing and opening a backend.
#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    /// A backend qomvm does not have.
    #[error("'{0}' is not a supported monitor backend (use stdio, unix:PATH,server=on or tcp:127.0.0.1:PORT,server=on)")]
    Unsupported(String),
    /// A socket without `server=on`: qomvm does not connect out.
    #[error("only server sockets are supported: add server=on")]
    NotServer,
    /// A TCP address that is not loopback.
    #[error(
        "the monitor only listens on loopback addresses (127.0.0.1, ::1, localhost), not '{0}'"
    )]
    NotLoopback(String),
    /// The socket's options, as the socket chardev parses them, or its bind.
    #[error(transparent)]
    Socket(#[from] hw::core::char_socket::SocketError),
    /// `-chardev socket` without `id=`.
    #[error("Parameter 'id' is missing")]
    MissingId,
}

/// Parses the `-qmp`/`-monitor` argument.
pub fn parse(spec: &str) -> Result<Backend, ChardevError> {
    if spec == "stdio" {
        return Ok(Backend::Stdio);
    }
    if spec == "none" {
        return Ok(Backend::Null);
    }
    let (kind, rest) = spec
        .split_once(':')
        .ok_or_else(|| ChardevError::Unsupported(spec.to_string()))?;
    if !matches!(kind, "unix" | "tcp") {
        return Err(ChardevError::Unsupported(spec.to_string()));
    }
    monitor_backend(char_socket::parse_shorthand(
        kind,
        split_opts(rest, Some("path")),
    )?)
}

/// Parses a `-chardev socket,...` that a `-mon` serves: `id=`, `path=P`, `host=`+`port=`
/// or `fd=N` (an inherited listening socket), `server=on`, `wait=`. Returns the id and the
/// backend.
pub fn parse_chardev_socket(spec: &str) -> Result<(String, Backend), ChardevError> {
    let mut items = split_opts(spec, Some("backend")).into_iter();
    match items.next() {
        Some((_, Some(kind))) if kind == "socket" => {}
        _ => return Err(ChardevError::Unsupported(spec.to_string())),
    }
    let (id, rest) = char_socket::split_id(items);
    let id = id.ok_or(ChardevError::MissingId)?;
    Ok((id, monitor_backend(char_socket::parse_chardev(rest)?)?))
}

/// A socket a monitor may serve: a server, on a Unix socket or a loopback address (the
/// monitor has no authentication).
fn monitor_backend(spec: SocketSpec) -> Result<Backend, ChardevError> {
    if !spec.server {
        return Err(ChardevError::NotServer);
    }
    let wait = spec.wait;
    Ok(match spec.target {
        SocketTarget::Unix(path) => Backend::Unix { path, wait },
        SocketTarget::Fd(fd) => Backend::UnixFd { fd, wait },
        SocketTarget::Tcp(host, port) => {
            let ip = match host.as_str() {
                "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
                _ => host
                    .parse::<IpAddr>()
                    .map_err(|_| ChardevError::NotLoopback(host.clone()))?,
            };
            if !ip.is_loopback() {
                return Err(ChardevError::NotLoopback(host));
            }
            Backend::Tcp {
                addr: SocketAddr::new(ip, port),
                wait,
            }
        }
    })
}

/// The monitors' character devices (label, QEMU's `filename` spelling), for
/// `query-chardev`.
static MONITOR_CHARDEVS: parking_lot::Mutex<Vec<(String, String)>> =
    parking_lot::Mutex::new(Vec::new());

/// Records a monitor's chardev for `query-chardev`.
pub fn register_monitor_chardev(label: &str, backend: &Backend) {
    let filename = match backend {
        Backend::Stdio => "stdio".to_string(),
        Backend::Unix { path, .. } => format!("unix:{},server=on", path.display()),
        Backend::Tcp { addr, .. } => format!("tcp:{addr},server=on"),
        Backend::UnixFd { .. } => "unix:,server=on".to_string(),
        Backend::Null => return,
    };
    MONITOR_CHARDEVS.lock().push((label.to_string(), filename));
}

/// The monitors' chardevs (label, filename).
pub fn monitor_chardevs() -> Vec<(String, String)> {
    MONITOR_CHARDEVS.lock().clone()
}

/// One client's byte streams.
pub struct Connection {
    /// What the client sends.
    pub reader: Box<dyn Read + Send>,
    /// Where replies go.
    pub writer: Box<dyn Write + Send>,
    /// Ends the connection from any thread (unblocks the reader).
    pub shutdown: Arc<dyn Fn() + Send + Sync>,
    /// Whether the backend is a socket (QMP offers `oob` on sockets only, as QEMU does).
    pub is_socket: bool,
    /// Descriptors the client passed (Unix sockets only), for `getfd`.
    pub fds: Option<crate::monitor::fds::FdQueue>,
}

/// Runs a monitor's sessions: `session` is called once per connection, on a thread of its
/// own.
pub type Session = Arc<dyn Fn(Connection) + Send + Sync>;

/// A listening socket a monitor serves: Unix or TCP, which differ only in these.
trait Listener: Send + 'static {
    /// An accepted connection.
    type Stream: Read + Write + Send + Sync + 'static;

    /// Waits for the next client.
    fn accept_stream(&self) -> io::Result<Self::Stream>;
    /// Another handle on `stream`.
    fn clone_stream(stream: &Self::Stream) -> io::Result<Self::Stream>;
    /// Ends `stream` both ways.
    fn shutdown(stream: &Self::Stream);
    /// Sets up an accepted `stream`.
    fn configure(_stream: &Self::Stream) {}
    /// The reading half of `stream`, and where descriptors the client passes go.
    fn reader(
        stream: Self::Stream,
    ) -> (Box<dyn Read + Send>, Option<crate::monitor::fds::FdQueue>) {
        (Box::new(stream), None)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    fn accept_stream(&self) -> io::Result<UnixStream> {
        self.accept().map(|(stream, _)| stream)
    }
    fn clone_stream(stream: &UnixStream) -> io::Result<UnixStream> {
        stream.try_clone()
    }
    fn shutdown(stream: &UnixStream) {
        let _ = stream.shutdown(Shutdown::Both);
    }
    fn reader(stream: UnixStream) -> (Box<dyn Read + Send>, Option<crate::monitor::fds::FdQueue>) {
        let fds = crate::monitor::fds::FdQueue::default();
        (
            Box::new(crate::monitor::fds::ScmReader::new(stream, fds.clone())),
            Some(fds),
        )
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    fn accept_stream(&self) -> io::Result<TcpStream> {
        self.accept().map(|(stream, _)| stream)
    }
    fn clone_stream(stream: &TcpStream) -> io::Result<TcpStream> {
        stream.try_clone()
    }
    fn shutdown(stream: &TcpStream) {
        let _ = stream.shutdown(Shutdown::Both);
    }
    fn configure(stream: &TcpStream) {
        let _ = stream.set_nodelay(true);
    }
}

/// The [`Connection`] of an accepted socket.
fn connection<L: Listener>(stream: L::Stream) -> io::Result<Connection> {
    L::configure(&stream);
    let (reader, fds) = L::reader(L::clone_stream(&stream)?);
    let closer = L::clone_stream(&stream)?;
    Ok(Connection {
        reader,
        writer: Box::new(stream),
        shutdown: Arc::new(move || L::shutdown(&closer)),
        is_socket: true,
        fds,
    })
}

/// Starts `session` on a new thread for `conn`, counting it against [`MAX_CLIENTS`].
fn spawn_session(name: &str, session: &Session, conn: Connection) {
    if CLIENTS.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        CLIENTS.fetch_sub(1, Ordering::AcqRel);
        log::warn!("{name}: too many monitor clients; connection refused");
        (conn.shutdown)();
        return;
    }
    let session = session.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("{name} client"))
        .spawn(move || {
            session(conn);
            CLIENTS.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        CLIENTS.fetch_sub(1, Ordering::AcqRel);
        log::warn!("{name}: cannot start a session thread: {e}");
    }
}

/// An open backend: what the monitor must clean up at exit.
pub struct Listening {
    /// The Unix socket path to remove at exit.
    pub unix_path: Option<PathBuf>,
}

/// Opens `backend` and serves connections with `session` (`name` names the threads and the
/// messages). With `wait=on` this returns only after the first client connected, as QEMU
/// waits before starting the VM.
pub fn serve(name: &str, backend: &Backend, session: Session) -> Result<Listening, ChardevError> {
    let name = name.to_string();
    match backend {
        Backend::Null => Ok(Listening { unix_path: None }),
        Backend::Stdio => {
            let conn = Connection {
                reader: Box::new(io::stdin()),
                writer: Box::new(io::stdout()),
                // stdin cannot be unblocked; the process's exit ends the session.
                shutdown: Arc::new(|| {}),
                is_socket: false,
                fds: None,
            };
            spawn_session(&name, &session, conn);
            Ok(Listening { unix_path: None })
        }
        Backend::Unix { path, wait } => {
            let what = path.display().to_string();
            let listener = char_socket::bind_unix(path)?;
            listen(name, listener, "unix", &what, *wait, session)?;
            Ok(Listening {
                unix_path: Some(path.clone()),
            })
        }
        Backend::UnixFd { fd, wait } => {
            // SAFETY: parse_chardev_socket checked that `fd` is an open listening socket;
            // it was inherited for this monitor, which owns it from here on.
            let listener = unsafe { UnixListener::from_raw_fd(*fd) };
            // SAFETY: FD_CLOEXEC on a descriptor we own: children (tap scripts) must not
            // inherit the monitor.
            unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            let what = format!("fd {fd}");
            listen(name, listener, "unix", &what, *wait, session)?;
            Ok(Listening { unix_path: None })
        }
        Backend::Tcp { addr, wait } => {
            let what = addr.to_string();
            let listener = TcpListener::bind(addr).map_err(|e| bind_error(&what, e))?;
            listen(name, listener, "tcp", &what, *wait, session)?;
            Ok(Listening { unix_path: None })
        }
    }
}

fn bind_error(what: &str, e: io::Error) -> ChardevError {
    char_socket::bind_error(what, &e).into()
}

/// Serves a bound socket (`kind` `unix` or `tcp`, `what` its path or address):
/// with `wait`, accepts the first client before returning; every later one on a listener
/// thread.
fn listen<L: Listener>(
    name: String,
    listener: L,
    kind: &str,
    what: &str,
    wait: bool,
    session: Session,
) -> Result<(), ChardevError> {
    if wait {
        qom::error_report!(
            "info: QEMU waiting for connection on: disconnected:{kind}:{what},server=on"
        );
        let stream = listener.accept_stream().map_err(|e| bind_error(what, e))?;
        if let Ok(conn) = connection::<L>(stream) {
            spawn_session(&name, &session, conn);
        }
    }
    std::thread::Builder::new()
        .name(format!("{name} listener"))
        .spawn(move || loop {
            match listener.accept_stream().and_then(connection::<L>) {
                Ok(conn) => spawn_session(&name, &session, conn),
                Err(e) => log::warn!("{name}: accept: {e}"),
            }
        })
        .map_err(|e| bind_error(what, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_like_qemus_shorthands() {
        assert_eq!(parse("stdio").unwrap(), Backend::Stdio);
        assert_eq!(
            parse("unix:/tmp/q.sock,server=on,wait=off").unwrap(),
            Backend::Unix {
                path: "/tmp/q.sock".into(),
                wait: false
            }
        );
        assert_eq!(
            parse("unix:/tmp/q.sock,server,nowait").unwrap(),
            Backend::Unix {
                path: "/tmp/q.sock".into(),
                wait: false
            }
        );
        assert_eq!(
            parse("tcp:127.0.0.1:4444,server=on,wait=off").unwrap(),
            Backend::Tcp {
                addr: "127.0.0.1:4444".parse().unwrap(),
                wait: false
            }
        );
        assert_eq!(
            parse("tcp:localhost:4444,server=on").unwrap(),
            Backend::Tcp {
                addr: "127.0.0.1:4444".parse().unwrap(),
                wait: true
            }
        );
        assert!(parse("tcp:[::1]:4444,server=on").is_ok());
    }

    #[test]
    fn non_loopback_and_client_sockets_are_refused() {
        assert!(matches!(
            parse("tcp:0.0.0.0:4444,server=on"),
            Err(ChardevError::NotLoopback(_))
        ));
        assert!(matches!(
            parse("tcp::4444,server=on"),
            Err(ChardevError::NotLoopback(_))
        ));
        assert!(matches!(
            parse("unix:/tmp/q.sock"),
            Err(ChardevError::NotServer)
        ));
        assert!(matches!(parse("vc"), Err(ChardevError::Unsupported(_))));
        assert!(matches!(
            parse("unix:/tmp/q,server=on,bogus=1"),
            Err(ChardevError::Socket(
                hw::core::char_socket::SocketError::InvalidParameter(_)
            ))
        ));
    }
}
