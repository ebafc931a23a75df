//! The VNC server (QEMU's `ui/vnc.c`): `-vnc HOST:DISPLAY[,to=N]` (or `-display vnc=...`)
//! listens on port 5900 + DISPLAY (the first free one up to 5900 + N with `to=`) and
//! serves the first graphic console over RFB 3.8 (3.3 and 3.7 clients too), without
//! authentication or with VNC Authentication (`password=on`, `password-secret=ID`, the
//! password set with QMP `set_password`; `auth.rs`): raw and ZRLE rectangles, the desktop-size pseudo-encoding, keyboard and
//! pointer input into the machine's input devices (`input.rs`), QEMU's extended key
//! events.
//!
//! Every client has a thread of its own, which reads its messages and writes its updates
//! with blocking calls and holds no lock while it does: a client that stops reading stalls
//! only its own thread, never the guest, the monitor or the other clients. A thread renders
//! the console when its client has asked for an update, at most every
//! [`REFRESH_INTERVAL`], and sends the 64x64 tiles that differ from what it sent last.
//!
//! `query-vnc`, HMP `info vnc` and the `VNC_CONNECTED`, `VNC_INITIALIZED` and
//! `VNC_DISCONNECTED` events say who is connected.

pub mod auth;
pub mod input;
pub mod keymap;
pub mod keysyms;
pub mod rfb;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hw::core::console::{ConsoleUpdate, Surface};
use hw::core::services::MachineServices;
use parking_lot::Mutex;
use serde_json::{json, Value};

use rfb::{encoding, PixelFormat, Rect, ZrleEncoder};

/// How often a client that asked for updates gets the screen's changes (QEMU's
/// `VNC_REFRESH_INTERVAL_BASE`).
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(30);
/// The first display's port.
const VNC_PORT_BASE: u16 = 5900;
/// QEMU's `VNC_MAX_WIDTH` and `VNC_MAX_HEIGHT`: the largest screen a client is shown.
const VNC_MAX_WIDTH: u32 = 2560;
const VNC_MAX_HEIGHT: u32 = 2048;
/// Tiles compared between updates.
const TILE: u32 = 64;
/// The longest cut text a client may send (QEMU takes up to 1 MiB); more ends the
/// connection.
const MAX_CUT_TEXT: u32 = 1 << 20;

/// What `-vnc` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VncConfig {
    /// The address to listen on; empty: every IPv4 address.
    pub host: String,
    /// The first port to try (5900 + display).
    pub port: u16,
    /// The last port to try (`to=`).
    pub last_port: u16,
    /// The sharing policy (QEMU's `share=`).
    pub share: SharePolicy,
    /// `password=on`: VNC Authentication, refused until a password is set.
    pub password: bool,
    /// `password-secret=ID`: VNC Authentication with the `secret` object ID's value.
    pub password_secret: Option<String>,
    /// The display's name for the monitor's `display` arguments (QEMU's `id=`).
    pub id: String,
}

/// QEMU's `VncSharePolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharePolicy {
    /// A client asking for exclusive access disconnects the others (QEMU's default).
    AllowExclusive,
    /// Every client shares the display, whatever it asks.
    ForceShared,
    /// Clients' wishes are ignored: like `force-shared` here.
    Ignore,
}

/// Why `-vnc` cannot be used, in QEMU's words where QEMU has them.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VncOptionError {
    /// Not `HOST:DISPLAY` or `none`.
    #[error("Failed to parse VNC display '{0}': expected [host]:display")]
    Address(String),
    /// A display number that is no port.
    #[error("Failed to parse VNC display '{0}': display number must be 0-59635")]
    Display(String),
    /// A key `-vnc` does not take.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A value of the wrong kind.
    #[error("Parameter '{key}' expects {what}")]
    BadValue {
        /// The key.
        key: String,
        /// What it takes.
        what: &'static str,
    },
    /// QEMU features qomvm does not have.
    #[error("VNC {0} is not supported by qomvm")]
    Unsupported(String),
    /// Both `password` and `password-secret`.
    #[error("'password' flag is redundant with 'password-secret'")]
    PasswordRedundant,
    /// `audiodev=` names no `-audiodev`.
    #[error("Audiodev '{0}' not found")]
    AudiodevNotFound(String),
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum VncError {
    /// No port of the range could be bound.
    #[error("Failed to start VNC server: {host}:{first}-{last}: {reason}")]
    Listen {
        /// The address.
        host: String,
        /// The first port tried.
        first: u16,
        /// The last.
        last: u16,
        /// The last failure.
        reason: String,
    },
    /// The listener thread cannot be started.
    #[error("Failed to start VNC server: {0}")]
    Thread(std::io::Error),
    /// `password-secret=` names no usable secret.
    #[error(transparent)]
    Secret(#[from] hw::crypto::secret::SecretLookupError),
}

/// Why `set_password` or `expire_password` did nothing, in QEMU's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    /// No display of that id (or no `-vnc` at all).
    #[error("Could not set password")]
    NoDisplay,
    /// The display was started without `password=on` (QEMU also prints
    /// [`PASSWORD_HINT`] on a human monitor).
    #[error("Could not set password")]
    NotEnabled,
    /// `expire_password` on no display.
    #[error("Could not set password expire time")]
    NoDisplayToExpire,
}

/// What QEMU's human monitor prints before "Could not set password" on a display without
/// password authentication.
pub const PASSWORD_HINT: &str =
    "If you want use passwords please enable password auth using '-vnc ${dpy},password'.";

/// The security types of RFC 6143 7.1.2 that qomvm offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthType {
    /// 1: None.
    None,
    /// 2: VNC Authentication.
    Vnc,
}

impl AuthType {
    /// The wire value.
    fn number(self) -> u8 {
        match self {
            AuthType::None => 1,
            AuthType::Vnc => 2,
        }
    }

    /// QEMU's `vnc_auth_name`, as `query-vnc` and `info vnc` show it.
    fn name(self) -> &'static str {
        match self {
            AuthType::None => "none",
            AuthType::Vnc => "vnc",
        }
    }
}

/// Parses `-vnc`'s value (or `-display vnc=`'s): `[HOST]:DISPLAY[,to=N][,share=...]`
/// (`[::1]:1` for IPv6), or `none` (`Ok(None)`: a server that does not listen, as QEMU's).
pub fn parse_vnc_option(text: &str) -> Result<Option<VncConfig>, VncOptionError> {
    let items = hw::core::qemu_opts::split_commas(text);
    let Some((address, options)) = items.split_first() else {
        return Err(VncOptionError::Address(String::new()));
    };
    let mut config = if address == "none" {
        None
    } else {
        let (host, display) = address
            .rsplit_once(':')
            .ok_or_else(|| VncOptionError::Address(address.clone()))?;
        if host == "unix" || address.starts_with("unix:") {
            return Err(VncOptionError::Unsupported("on a Unix socket".into()));
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let display: u16 = display
            .parse()
            .ok()
            .filter(|d| *d <= u16::MAX - VNC_PORT_BASE)
            .ok_or_else(|| VncOptionError::Display(address.clone()))?;
        let port = VNC_PORT_BASE + display;
        Some(VncConfig {
            host: host.to_string(),
            port,
            last_port: port,
            share: SharePolicy::AllowExclusive,
            password: false,
            password_secret: None,
            id: "default".into(),
        })
    };
    let mut password_given = false;
    for item in options {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item.as_str(), None),
        };
        let bad = |what| VncOptionError::BadValue {
            key: key.to_string(),
            what,
        };
        let on_off = |v: Option<&str>| match v {
            None | Some("on") => Ok(true),
            Some("off") => Ok(false),
            Some(_) => Err(bad("'on' or 'off'")),
        };
        match key {
            "to" => {
                let to: u16 = value
                    .and_then(|v| v.parse().ok())
                    .filter(|t| *t <= u16::MAX - VNC_PORT_BASE)
                    .ok_or_else(|| bad("a display number"))?;
                if let Some(c) = config.as_mut() {
                    c.last_port = (VNC_PORT_BASE + to).max(c.port);
                }
            }
            "share" => {
                let policy = match value {
                    Some("allow-exclusive") => SharePolicy::AllowExclusive,
                    Some("force-shared") => SharePolicy::ForceShared,
                    Some("ignore") => SharePolicy::Ignore,
                    _ => return Err(bad("'allow-exclusive', 'force-shared' or 'ignore'")),
                };
                if let Some(c) = config.as_mut() {
                    c.share = policy;
                }
            }
            // IPv4 is what an empty host listens on; an explicit family just agrees.
            "ipv4" | "ipv6" => {
                on_off(value)?;
            }
            "password" => {
                password_given = true;
                let on = on_off(value)?;
                if let Some(c) = config.as_mut() {
                    c.password = on;
                }
            }
            "password-secret" => {
                let id = value
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| bad("a secret's id"))?;
                if let Some(c) = config.as_mut() {
                    c.password_secret = Some(id.to_string());
                }
            }
            "id" => {
                let id = value
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| bad("an id"))?;
                if let Some(c) = config.as_mut() {
                    c.id = id.to_string();
                }
            }
            // The backend for QEMU's audio pseudo-encoding, which qomvm's server does not
            // offer (clients that ask get no audio messages); it must exist, as in QEMU's
            // vnc_display_open, even for `-vnc none`.
            "audiodev" => {
                let id = value.unwrap_or("on");
                if crate::audio::audio_state_by_name(id).is_none() {
                    return Err(VncOptionError::AudiodevNotFound(id.to_string()));
                }
            }
            "sasl" | "tls-creds" | "websocket" | "reverse" | "tls-authz" | "sasl-authz" => {
                if on_off(value).unwrap_or(true) {
                    return Err(VncOptionError::Unsupported(format!("'{key}'")));
                }
            }
            // Accepted as QEMU takes them; they change nothing qomvm does.
            "lossy" | "non-adaptive" | "lock-key-sync" | "key-delay-ms" | "display"
            | "connections" => {}
            _ => return Err(VncOptionError::InvalidParameter(key.to_string())),
        }
    }
    if let Some(c) = config.as_mut() {
        if c.password_secret.is_some() {
            // QEMU's vnc_display_open: the secret implies the flag, and both is an error.
            if password_given {
                return Err(VncOptionError::PasswordRedundant);
            }
            c.password = true;
        }
    }
    Ok(config)
}

/// A connected client, as the monitor sees it.
struct ClientHandle {
    id: u64,
    peer: SocketAddr,
    /// A clone of the socket, to end the connection from another thread.
    stream: TcpStream,
}

/// The running server (QEMU's `VncDisplay`).
pub struct VncServer {
    /// The bound address; `None` for `-vnc none`.
    local: Option<SocketAddr>,
    share: SharePolicy,
    services: Arc<MachineServices>,
    clients: Mutex<Vec<Arc<ClientHandle>>>,
    next_id: AtomicU64,
    name: String,
    /// The display's id (QEMU's `id=`, `default` unless given).
    id: String,
    /// What clients must do before they see the screen.
    auth: AuthType,
    /// The password and its expiry, read by every authenticating client and written by
    /// the monitor.
    password: Mutex<auth::PasswordState>,
}

static SERVER: OnceLock<Arc<VncServer>> = OnceLock::new();

/// QEMU's `vnc_display_open`: binds the first free port of `config` (or nothing for
/// `None`) and starts accepting clients. The machine must have a graphic console.
pub fn vnc_display_init(
    services: &Arc<MachineServices>,
    config: Option<&VncConfig>,
    name: Option<&str>,
) -> Result<(), VncError> {
    let name = name.unwrap_or("QEMU").to_string();
    let Some(config) = config else {
        let server = VncServer {
            local: None,
            share: SharePolicy::AllowExclusive,
            services: services.clone(),
            clients: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            name,
            id: "default".into(),
            auth: AuthType::None,
            password: Mutex::new(auth::PasswordState::new(None)),
        };
        let _ = SERVER.set(Arc::new(server));
        return Ok(());
    };
    // QEMU's vnc_display_open reads the secret once, when the display opens.
    let password = match &config.password_secret {
        Some(id) => Some(hw::crypto::secret::qcrypto_secret_lookup_as_utf8(id)?.into_bytes()),
        None => None,
    };
    let auth = if config.password {
        AuthType::Vnc
    } else {
        AuthType::None
    };
    let host = if config.host.is_empty() {
        "0.0.0.0"
    } else {
        config.host.as_str()
    };
    let mut last_error = String::new();
    let mut listener = None;
    for port in config.port..=config.last_port {
        match TcpListener::bind((host, port)) {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(e) => last_error = hw::core::os_error::strerror(&e),
        }
    }
    let listener = listener.ok_or_else(|| VncError::Listen {
        host: host.to_string(),
        first: config.port,
        last: config.last_port,
        reason: last_error,
    })?;
    let server = Arc::new(VncServer {
        local: listener.local_addr().ok(),
        share: config.share,
        services: services.clone(),
        clients: Mutex::new(Vec::new()),
        next_id: AtomicU64::new(0),
        name,
        id: config.id.clone(),
        auth,
        password: Mutex::new(auth::PasswordState::new(password)),
    });
    let _ = SERVER.set(server.clone());
    std::thread::Builder::new()
        .name("vnc".into())
        .spawn(move || server.accept_loop(listener))
        .map_err(VncError::Thread)?;
    Ok(())
}

/// `query-vnc` (QEMU's `qmp_query_vnc`): the server and its clients.
pub fn query_vnc() -> Value {
    let Some(server) = SERVER.get() else {
        return json!({"enabled": false});
    };
    let Some(local) = server.local else {
        return json!({"enabled": false});
    };
    let mut info = basic_info(&local);
    let clients: Vec<Value> = server
        .clients
        .lock()
        .iter()
        .map(|c| basic_info(&c.peer))
        .collect();
    let map = info.as_object_mut().expect("an object");
    map.remove("websocket");
    map.insert("enabled".into(), json!(true));
    map.insert("auth".into(), json!(server.auth.name()));
    map.insert("clients".into(), Value::Array(clients));
    let mut ordered = serde_json::Map::new();
    for key in ["enabled", "host", "family", "service", "auth", "clients"] {
        if let Some(v) = map.remove(key) {
            ordered.insert(key.to_string(), v);
        }
    }
    Value::Object(ordered)
}

/// HMP `info vnc` (QEMU's `hmp_info_vnc`).
pub fn info_vnc(out: &mut String) {
    use std::fmt::Write as _;
    let Some(server) = SERVER.get() else {
        out.push_str("None\n");
        return;
    };
    out.push_str("default:\n");
    match server.local {
        Some(local) => {
            let _ = writeln!(
                out,
                "  Server: {}:{} ({})",
                host_of(&local),
                local.port(),
                family_of(&local)
            );
            let _ = writeln!(out, "    Auth: {} (Sub: none)", server.auth.name());
        }
        None => out.push_str("  not started\n"),
    }
    for c in server.clients.lock().iter() {
        let _ = writeln!(
            out,
            "  Client: {}:{} ({})",
            host_of(&c.peer),
            c.peer.port(),
            family_of(&c.peer)
        );
        out.push_str("    x509_dname: none\n    sasl_username: none\n");
    }
}

/// The display `id` names, or the first (QEMU's `vnc_display_find`).
fn find_display(id: Option<&str>) -> Option<&'static Arc<VncServer>> {
    SERVER.get().filter(|s| id.is_none_or(|id| id == s.id))
}

/// Whether the display `id` names (or the first) asks for a password; `None` without
/// one.
pub fn password_auth_enabled(display: Option<&str>) -> Option<bool> {
    find_display(display).map(|s| s.auth == AuthType::Vnc)
}

/// QEMU's `vnc_display_password` (QMP `set_password`, `change-vnc-password`): the new
/// password for clients that authenticate from now on; connected clients stay.
pub fn vnc_display_password(display: Option<&str>, password: &str) -> Result<(), PasswordError> {
    let server = find_display(display).ok_or(PasswordError::NoDisplay)?;
    if server.auth == AuthType::None {
        return Err(PasswordError::NotEnabled);
    }
    server.password.lock().set(password.as_bytes());
    Ok(())
}

/// QEMU's `vnc_display_pw_expire` (QMP `expire_password`): after `when` (seconds since
/// the epoch, [`auth::NEVER`] for never) every authentication fails.
pub fn vnc_display_pw_expire(display: Option<&str>, when: i64) -> Result<(), PasswordError> {
    let server = find_display(display).ok_or(PasswordError::NoDisplayToExpire)?;
    server.password.lock().expire_at(when);
    Ok(())
}

fn host_of(addr: &SocketAddr) -> String {
    addr.ip().to_string()
}

fn family_of(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

/// QAPI's `VncBasicInfo`.
fn basic_info(addr: &SocketAddr) -> Value {
    json!({
        "host": host_of(addr),
        "service": addr.port().to_string(),
        "family": family_of(addr),
        "websocket": false,
    })
}

impl VncServer {
    /// QAPI's `VncServerInfo` for events.
    fn server_info(&self) -> Value {
        let mut info = self.local.as_ref().map_or_else(|| json!({}), basic_info);
        if let Some(map) = info.as_object_mut() {
            map.insert("auth".into(), json!(self.auth.name()));
        }
        info
    }

    fn event(&self, name: &str, peer: &SocketAddr) {
        hw::core::qapi_event::emit(
            name,
            Some(json!({"server": self.server_info(), "client": basic_info(peer)})),
        );
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("vnc: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let (Ok(peer), Ok(handle_stream)) = (stream.peer_addr(), stream.try_clone()) else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handle = Arc::new(ClientHandle {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                peer,
                stream: handle_stream,
            });
            self.clients.lock().push(handle.clone());
            self.event("VNC_CONNECTED", &peer);
            let server = self.clone();
            let spawned = std::thread::Builder::new()
                .name("vnc client".into())
                .spawn(move || {
                    let mut client = Client::new(&server, stream, handle.clone());
                    if let Err(e) = client.run() {
                        log::debug!("vnc: client {}: {e}", handle.peer);
                    }
                    server.disconnected(&handle);
                });
            if let Err(e) = spawned {
                log::warn!("vnc: cannot serve {peer}: {e}");
            }
        }
    }

    fn disconnected(&self, handle: &Arc<ClientHandle>) {
        let _ = handle.stream.shutdown(Shutdown::Both);
        self.clients.lock().retain(|c| c.id != handle.id);
        self.event("VNC_DISCONNECTED", &handle.peer);
    }

    /// A client asked for the display alone: the others go (QEMU's `allow-exclusive`).
    fn make_exclusive(&self, id: u64) {
        if self.share != SharePolicy::AllowExclusive {
            return;
        }
        let others: Vec<Arc<ClientHandle>> = self
            .clients
            .lock()
            .iter()
            .filter(|c| c.id != id)
            .cloned()
            .collect();
        for other in others {
            let _ = other.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client said something RFB does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// VNC Authentication failed (the client was told).
    #[error("authentication failed: {0}")]
    Auth(#[from] auth::AuthFailure),
}

/// One connection's state (QEMU's `VncState`).
struct Client {
    server: Arc<VncServer>,
    stream: TcpStream,
    handle: Arc<ClientHandle>,
    pf: PixelFormat,
    zrle: bool,
    desktop_size: bool,
    ext_key_events: bool,
    ext_key_acked: bool,
    zrle_encoder: ZrleEncoder,
    /// The update the client asked for and has not had: incremental, and where.
    pending: Option<(bool, Rect)>,
    /// What the client has on its screen (at the server's size then).
    shown: Option<Arc<Surface>>,
    /// The console's generation `shown` is up to date with, outside the rows changed
    /// since.
    generation: Option<u64>,
    /// The size the client's screen has.
    client_size: (u32, u32),
    last_refresh: Instant,
    input: input::ClientInput,
}

impl Client {
    fn new(server: &Arc<VncServer>, stream: TcpStream, handle: Arc<ClientHandle>) -> Client {
        Client {
            input: input::ClientInput::new(server.services.clone()),
            server: server.clone(),
            stream,
            handle,
            pf: PixelFormat::NATIVE,
            zrle: false,
            desktop_size: false,
            ext_key_events: false,
            ext_key_acked: false,
            zrle_encoder: ZrleEncoder::default(),
            pending: None,
            shown: None,
            generation: None,
            client_size: (0, 0),
            last_refresh: Instant::now(),
        }
    }

    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, ClientError> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn read_u8(&mut self) -> Result<u8, ClientError> {
        Ok(self.read_exact(1)?[0])
    }

    fn protocol(what: impl Into<String>) -> ClientError {
        ClientError::Protocol(what.into())
    }

    /// The handshake (RFC 6143 7.1-7.3), then messages until the client goes.
    fn run(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(b"RFB 003.008\n")?;
        let version = self.read_exact(12)?;
        let minor = parse_version(&version).ok_or_else(|| {
            Self::protocol(format!(
                "bad version {:?}",
                String::from_utf8_lossy(&version)
            ))
        })?;
        self.security(minor)?;
        let shared = self.read_u8()? != 0;
        if !shared {
            self.server.make_exclusive(self.handle.id);
        }
        let surface = self.render(None).surface;
        let mut init = Vec::new();
        init.extend_from_slice(&(surface.width as u16).to_be_bytes());
        init.extend_from_slice(&(surface.height as u16).to_be_bytes());
        init.extend_from_slice(&self.pf.to_bytes());
        init.extend_from_slice(&(self.server.name.len() as u32).to_be_bytes());
        init.extend_from_slice(self.server.name.as_bytes());
        self.stream.write_all(&init)?;
        // Nothing shown yet: the first update is whole, incremental or not.
        self.shown = None;
        self.client_size = (surface.width, surface.height);
        self.server.event("VNC_INITIALIZED", &self.handle.peer);
        loop {
            let wait = match self.pending {
                Some(_) => REFRESH_INTERVAL.saturating_sub(self.last_refresh.elapsed()),
                None => Duration::from_secs(1),
            };
            if readable(&self.stream, wait)? {
                self.message()?;
            }
            if self.pending.is_some() && self.last_refresh.elapsed() >= REFRESH_INTERVAL {
                self.last_refresh = Instant::now();
                self.update()?;
            }
        }
    }

    /// Security negotiation (RFC 6143 7.1.2, 7.1.3, 7.2; QEMU's `protocol_client_auth`):
    /// the one type the display has, then its authentication and the result.
    fn security(&mut self, minor: u32) -> Result<(), ClientError> {
        let auth = self.server.auth;
        if minor >= 7 {
            self.stream.write_all(&[1, auth.number()])?;
            let chosen = self.read_u8()?;
            if chosen != auth.number() {
                if minor >= 8 {
                    self.security_failed(minor, "Unsupported security type")?;
                }
                return Err(Self::protocol(format!("security type {chosen}")));
            }
        } else {
            // 3.3: the server decides.
            self.stream
                .write_all(&u32::from(auth.number()).to_be_bytes())?;
        }
        match auth {
            AuthType::None => {
                // RFB 3.8 reports the result of None too; 3.3 and 3.7 go straight on.
                if minor >= 8 {
                    self.stream.write_all(&0u32.to_be_bytes())?;
                }
                Ok(())
            }
            AuthType::Vnc => {
                let challenge = auth::random_challenge()?;
                self.stream.write_all(&challenge)?;
                let response: [u8; auth::CHALLENGE_SIZE] = self
                    .read_exact(auth::CHALLENGE_SIZE)?
                    .try_into()
                    .expect("16 bytes");
                // The lock is held for the comparison only, never across a read or write.
                let verdict =
                    self.server
                        .password
                        .lock()
                        .check(&challenge, &response, auth::now_secs());
                match verdict {
                    Ok(()) => {
                        self.stream.write_all(&0u32.to_be_bytes())?;
                        Ok(())
                    }
                    Err(failure) => {
                        self.security_failed(minor, "Authentication failed")?;
                        Err(failure.into())
                    }
                }
            }
        }
    }

    /// A failed SecurityResult; RFB 3.8 adds the reason (QEMU's `authentication_failed`,
    /// whose string, unlike RFC 6143's, also carries its C terminator: left out here).
    fn security_failed(&mut self, minor: u32, reason: &str) -> Result<(), ClientError> {
        let mut msg = 1u32.to_be_bytes().to_vec();
        if minor >= 8 {
            msg.extend_from_slice(&(reason.len() as u32).to_be_bytes());
            msg.extend_from_slice(reason.as_bytes());
        }
        self.stream.write_all(&msg)?;
        Ok(())
    }

    /// One client message (RFC 6143 7.5 and QEMU's message 255).
    fn message(&mut self) -> Result<(), ClientError> {
        let kind = self.read_u8()?;
        match kind {
            0 => {
                let b = self.read_exact(19)?;
                let bytes: [u8; 16] = b[3..].try_into().expect("16 bytes");
                self.pf =
                    PixelFormat::from_bytes(&bytes).map_err(|e| Self::protocol(e.to_string()))?;
                // Everything is sent again in the new format.
                self.shown = None;
            }
            2 => {
                let b = self.read_exact(3)?;
                let count = usize::from(u16::from_be_bytes([b[1], b[2]]));
                let list = self.read_exact(4 * count)?;
                self.zrle = false;
                self.desktop_size = false;
                self.ext_key_events = false;
                for e in list.chunks_exact(4) {
                    match i32::from_be_bytes(e.try_into().expect("4 bytes")) {
                        encoding::ZRLE => self.zrle = true,
                        encoding::DESKTOP_SIZE => self.desktop_size = true,
                        encoding::QEMU_EXTENDED_KEY_EVENT => self.ext_key_events = true,
                        _ => {}
                    }
                }
                self.ext_key_acked = false;
            }
            3 => {
                let b = self.read_exact(9)?;
                let be = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                let rect = Rect {
                    x: be(1),
                    y: be(3),
                    w: be(5),
                    h: be(7),
                };
                let incremental = b[0] != 0;
                // A full request wins over an incremental one not yet served.
                let incremental = incremental && self.pending.is_none_or(|(i, _)| i);
                self.pending = Some((incremental, rect));
            }
            4 => {
                let b = self.read_exact(7)?;
                let keysym = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                self.input.keysym(keysym, b[0] != 0);
            }
            5 => {
                let b = self.read_exact(5)?;
                let x = u16::from_be_bytes([b[1], b[2]]);
                let y = u16::from_be_bytes([b[3], b[4]]);
                self.input.pointer(b[0], x, y, self.client_size);
            }
            6 => {
                let b = self.read_exact(7)?;
                // A negative length is the extended clipboard's: its absolute value.
                let len = i32::from_be_bytes([b[3], b[4], b[5], b[6]]).unsigned_abs();
                if len > MAX_CUT_TEXT {
                    return Err(Self::protocol(format!("cut text of {len} bytes")));
                }
                let mut left = len as usize;
                let mut sink = [0u8; 4096];
                while left > 0 {
                    let n = left.min(sink.len());
                    self.stream.read_exact(&mut sink[..n])?;
                    left -= n;
                }
            }
            255 => {
                let sub = self.read_u8()?;
                if sub != 0 {
                    return Err(Self::protocol(format!("QEMU client message {sub}")));
                }
                let b = self.read_exact(10)?;
                let down = u16::from_be_bytes([b[0], b[1]]) != 0;
                let keysym = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
                let keycode = u32::from_be_bytes([b[6], b[7], b[8], b[9]]);
                self.input.keycode(keycode, keysym, down);
            }
            _ => return Err(Self::protocol(format!("message type {kind}"))),
        }
        Ok(())
    }

    /// The first console's picture and the rows changed since generation `since`; a
    /// machine without a display device shows a black 640x480 screen (QEMU shows a text
    /// console there). A picture larger than QEMU's `VNC_MAX_WIDTH` x `VNC_MAX_HEIGHT`
    /// (a guest's virtio-gpu scanout can be) shows its top left corner of that size.
    fn render(&self, since: Option<u64>) -> ConsoleUpdate {
        let mut update = self.render_whole(since);
        let (width, height) = (update.surface.width, update.surface.height);
        if width > VNC_MAX_WIDTH || height > VNC_MAX_HEIGHT {
            let (w, h) = (width.min(VNC_MAX_WIDTH), height.min(VNC_MAX_HEIGHT));
            let mut corner = Surface::new(w, h);
            for y in 0..h {
                corner
                    .row_mut(y)
                    .copy_from_slice(&update.surface.row(y)[..w as usize]);
            }
            update.surface = Arc::new(corner);
            update.changed_rows = update
                .changed_rows
                .into_iter()
                .filter(|r| r.start < h)
                .map(|r| r.start..r.end.min(h))
                .collect();
        }
        update
    }

    fn render_whole(&self, since: Option<u64>) -> ConsoleUpdate {
        match self.server.services.consoles().first() {
            Some(console) => console.refresh(since),
            None => ConsoleUpdate {
                surface: Arc::new(Surface::new(640, 480)),
                generation: 0,
                changed_rows: if since.is_some() {
                    Vec::new()
                } else {
                    std::iter::once(0..480).collect()
                },
            },
        }
    }

    /// Answers the pending update request with what changed (or everything asked for).
    fn update(&mut self) -> Result<(), ClientError> {
        let Some((incremental, asked)) = self.pending else {
            return Ok(());
        };
        let since = self.shown.as_ref().and(self.generation);
        let ConsoleUpdate {
            surface,
            generation,
            changed_rows,
        } = self.render(since);
        let mut out = vec![0u8, 0, 0, 0];
        let mut rects: u16 = 0;
        if self.ext_key_events && !self.ext_key_acked {
            Rect {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            }
            .header(&mut out, encoding::QEMU_EXTENDED_KEY_EVENT);
            rects += 1;
            self.ext_key_acked = true;
        }
        if self.client_size != (surface.width, surface.height) && self.desktop_size {
            Rect {
                x: 0,
                y: 0,
                w: surface.width as u16,
                h: surface.height as u16,
            }
            .header(&mut out, encoding::DESKTOP_SIZE);
            rects += 1;
            self.client_size = (surface.width, surface.height);
        }
        // What the client can show: its screen's size, which without the desktop-size
        // pseudo-encoding stays the one it was told at the start.
        let (cw, ch) = (
            surface.width.min(self.client_size.0),
            surface.height.min(self.client_size.1),
        );
        let same_size = self
            .shown
            .as_ref()
            .is_some_and(|s| (s.width, s.height) == (surface.width, surface.height));
        let changed = match (&self.shown, incremental && same_size) {
            // Only the rows the console says changed are compared.
            (Some(shown), true) => changed_tiles(shown, &surface, cw, ch, &changed_rows),
            _ => {
                let wanted = if incremental {
                    full_rect(cw, ch)
                } else {
                    asked
                };
                wanted.clip(cw, ch).into_iter().collect()
            }
        };
        if changed.is_empty() && rects == 0 {
            if incremental && same_size {
                // Nothing differs in the changed rows: the client is up to date.
                self.shown = Some(surface);
                self.generation = Some(generation);
            }
            return Ok(());
        }
        for r in &changed {
            if self.zrle {
                self.zrle_encoder.encode(&mut out, &surface, *r, &self.pf);
            } else {
                rfb::encode_raw(&mut out, &surface, *r, &self.pf);
            }
        }
        rects = rects.saturating_add(u16::try_from(changed.len()).unwrap_or(u16::MAX));
        out[2..4].copy_from_slice(&rects.to_be_bytes());
        // Outside every lock: a client that does not read stalls here alone.
        self.stream.write_all(&out)?;
        self.shown = match self.shown.take() {
            // A part asked for again: the rest of the client's screen is as it was, so
            // the generation stays, and rows changed since are compared next time.
            Some(mut shown) if !incremental && same_size => {
                let picture = Arc::make_mut(&mut shown);
                for r in &changed {
                    copy_rect(picture, &surface, *r);
                }
                Some(shown)
            }
            _ => {
                self.generation = Some(generation);
                Some(surface)
            }
        };
        self.pending = None;
        Ok(())
    }
}

/// Copies `rect` of `from` into `to` (both at least that large).
fn copy_rect(to: &mut Surface, from: &Surface, rect: Rect) {
    let xs = usize::from(rect.x)..usize::from(rect.x) + usize::from(rect.w);
    for y in u32::from(rect.y)..u32::from(rect.y) + u32::from(rect.h) {
        to.row_mut(y)[xs.clone()].copy_from_slice(&from.row(y)[xs.clone()]);
    }
}

fn full_rect(width: u32, height: u32) -> Rect {
    Rect {
        x: 0,
        y: 0,
        w: width.min(u32::from(u16::MAX)) as u16,
        h: height.min(u32::from(u16::MAX)) as u16,
    }
}

/// The tiles of `now` (within `width` x `height`) that differ from `before`, each row of
/// tiles merged into runs; only tiles across `rows` (the rows that may have changed) are
/// compared.
fn changed_tiles(
    before: &Surface,
    now: &Surface,
    width: u32,
    height: u32,
    rows: &[std::ops::Range<u32>],
) -> Vec<Rect> {
    let mut rects = Vec::new();
    let width = width.min(before.width);
    let height = height.min(before.height);
    for ty in (0..height).step_by(TILE as usize) {
        let th = TILE.min(height - ty);
        if !rows.iter().any(|r| r.start < ty + th && ty < r.end) {
            continue;
        }
        let mut run: Option<(u32, u32)> = None;
        for tx in (0..width).step_by(TILE as usize) {
            let tw = TILE.min(width - tx);
            let differs = (ty..ty + th).any(|y| {
                let range = tx as usize..(tx + tw) as usize;
                before.row(y)[range.clone()] != now.row(y)[range]
            });
            run = match (run, differs) {
                (None, true) => Some((tx, tw)),
                (Some((x, w)), true) => Some((x, w + tw)),
                (Some((x, w)), false) => {
                    rects.push(Rect {
                        x: x as u16,
                        y: ty as u16,
                        w: w as u16,
                        h: th as u16,
                    });
                    None
                }
                (None, false) => None,
            };
        }
        if let Some((x, w)) = run {
            rects.push(Rect {
                x: x as u16,
                y: ty as u16,
                w: w as u16,
                h: th as u16,
            });
        }
    }
    rects
}

/// The minor version of a client's `RFB 003.00x\n`: 3.3 (and the 3.4-3.6 and Apple's
/// 3.889 variants, which speak it), 3.7, or 3.8 for anything newer.
fn parse_version(v: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(v).ok()?;
    let rest = text.strip_prefix("RFB ")?.strip_suffix('\n')?;
    let (major, minor) = rest.split_once('.')?;
    let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
    match (major, minor) {
        (3, 7) => Some(7),
        (3, 8..=888) | (3, 890..) => Some(8),
        (3, _) => Some(3),
        (4.., _) => Some(8),
        _ => None,
    }
}

/// Waits up to `timeout` for `stream` to have data (or to be closed).
fn readable(stream: &TcpStream, timeout: Duration) -> std::io::Result<bool> {
    let mut fds = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one pollfd, valid for the call; the descriptor is the stream's own.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0)
}

#[cfg(test)]
// Row ranges are what is compared here, one range as often as several.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn vnc_options_are_qemus() {
        let c = parse_vnc_option("127.0.0.1:12").unwrap().unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.last_port),
            ("127.0.0.1", 5912, 5912)
        );
        let c = parse_vnc_option(":1,to=5").unwrap().unwrap();
        assert_eq!((c.host.as_str(), c.port, c.last_port), ("", 5901, 5905));
        let c = parse_vnc_option("[::1]:0,share=force-shared")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.host.as_str(), c.share),
            ("::1", SharePolicy::ForceShared)
        );
        assert_eq!(parse_vnc_option("none"), Ok(None));
        assert_eq!(
            parse_vnc_option("localhost"),
            Err(VncOptionError::Address("localhost".into()))
        );
        assert_eq!(
            parse_vnc_option(":x"),
            Err(VncOptionError::Display(":x".into()))
        );
        assert_eq!(
            parse_vnc_option(":1,frob=2"),
            Err(VncOptionError::InvalidParameter("frob".into()))
        );
        let c = parse_vnc_option("127.0.0.1:0,password=on")
            .unwrap()
            .unwrap();
        assert!(c.password && c.password_secret.is_none());
        let c = parse_vnc_option(":1,password").unwrap().unwrap();
        assert!(c.password);
        assert!(
            !parse_vnc_option(":1,password=off")
                .unwrap()
                .unwrap()
                .password
        );
        let c = parse_vnc_option(":1,password-secret=vncsec0,id=vnc1")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.password, c.password_secret.as_deref(), c.id.as_str()),
            (true, Some("vncsec0"), "vnc1")
        );
        assert_eq!(
            parse_vnc_option(":1,password=on,password-secret=s"),
            Err(VncOptionError::PasswordRedundant)
        );
        // libvirt's `-vnc 127.0.0.1:0,audiodev=audio1`: the backend must exist.
        assert_eq!(
            parse_vnc_option("none,audiodev=vnc-test-audio"),
            Err(VncOptionError::AudiodevNotFound("vnc-test-audio".into()))
        );
        let dev = crate::audio::audio_parse_option("none,id=vnc-test-audio").unwrap();
        crate::audio::audio_init_audiodevs(&[dev]).unwrap();
        assert!(parse_vnc_option(":1,password=on,audiodev=vnc-test-audio").is_ok());
        assert!(matches!(
            parse_vnc_option(":1,password=maybe"),
            Err(VncOptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse_vnc_option(":1,sasl=on"),
            Err(VncOptionError::Unsupported(_))
        ));
        assert!(parse_vnc_option(":70000").is_err());
    }

    #[test]
    fn client_versions() {
        assert_eq!(parse_version(b"RFB 003.008\n"), Some(8));
        assert_eq!(parse_version(b"RFB 003.007\n"), Some(7));
        assert_eq!(parse_version(b"RFB 003.003\n"), Some(3));
        assert_eq!(parse_version(b"RFB 003.889\n"), Some(3));
        assert_eq!(parse_version(b"RFB 003.x08\n"), None);
        assert_eq!(parse_version(b"HTTP/1.1 200"), None);
    }

    #[test]
    fn changed_tiles_merge_along_rows() {
        let before = Surface::new(200, 100);
        let mut now = before.clone();
        now.row_mut(5)[70] = 1;
        now.row_mut(5)[130] = 1;
        now.row_mut(90)[10] = 1;
        assert_eq!(
            changed_tiles(&before, &now, 200, 100, &[0..100]),
            [
                Rect {
                    x: 64,
                    y: 0,
                    w: 128,
                    h: 64
                },
                Rect {
                    x: 0,
                    y: 64,
                    w: 64,
                    h: 36
                }
            ]
        );
        // Rows the console says did not change are not looked at.
        assert_eq!(changed_tiles(&before, &now, 200, 100, &[64..70]).len(), 1);
        assert!(changed_tiles(&before, &now, 200, 100, &[]).is_empty());
    }
}
