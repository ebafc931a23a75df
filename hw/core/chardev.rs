//! Character device backends (QEMU's `chardev/`): where a serial port's output goes and its
//! input comes from.
//!
//! A frontend (a UART) writes bytes with [`CharBackend::write`] and installs a receiver with
//! [`CharBackend::set_receiver`]; a backend that has input (stdio's stdin, a test's
//! [`Ringbuf::inject`]) hands it to that receiver. Backends stack: a backend may wrap
//! another and install its own receiver on it, which filters the bytes before passing them
//! on. That is how QEMU's `mux` chardev (the Ctrl-A escapes of `-nographic`) sits between
//! stdin and the serial port, and how a filter can be added here without touching the
//! stdin reader or the UART.
//!
//! Backends by `-serial` spelling ([`parse_serial_spec`]): `stdio`, `null`, `pty`,
//! `file:PATH`, `chardev:ID`, and `none` (no serial port). `-chardev` spellings
//! ([`parse_chardev_opts`]): `stdio`, `null`, `file,path=P[,append=on]` (`P` may be
//! `/dev/fdset/N`, [`crate::core::fdset`]), `ringbuf[,size=N]`, `pty`
//! ([`crate::core::char_pty`]), each with `id=ID`; they go into a registry by id
//! ([`chardev_add`], [`chardev_find`]) that the `chardev` property of `isa-serial` reads.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use parking_lot::Mutex;

/// What a frontend installs to receive a backend's input. It is called on the backend's
/// thread (stdio's reader thread), with the bytes in the order they arrived.
pub type CharReceiver = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What a frontend installs to hear a backend open (`true`) or close.
pub type OpenNotifier = Arc<dyn Fn(bool) + Send + Sync>;

/// What a frontend installs to hear that a backend can take output again.
pub type RoomNotifier = Arc<dyn Fn() + Send + Sync>;

/// A character backend (QEMU's `Chardev`): a sink for the frontend's output and, for the
/// backends that have one, a source of input.
pub trait CharBackend: Send + Sync {
    /// Sends `data` out. Backends do not fail towards the guest: an error (a closed
    /// stdout, a full disk) loses the bytes, as a UART's line would.
    fn write(&self, data: &[u8]);

    /// Installs (or with `None` removes) the receiver that gets this backend's input.
    /// Backends without input ignore it.
    fn set_receiver(&self, receiver: Option<CharReceiver>) {
        let _ = receiver;
    }

    /// Whether the backend is open (QEMU's `be_open`): a socket while a peer is
    /// connected; the others always.
    fn is_open(&self) -> bool {
        true
    }

    /// Installs (or with `None` removes) what is told when the backend opens or closes
    /// (QEMU's `CHR_EVENT_OPENED`/`CLOSED`). Backends that never change ignore it.
    fn set_open_notifier(&self, notifier: Option<OpenNotifier>) {
        let _ = notifier;
    }

    /// Bytes the backend takes now without dropping any (`usize::MAX`: any write).
    fn write_room(&self) -> usize {
        usize::MAX
    }

    /// Installs (or with `None` removes) what is told when a backend that had no room
    /// has some again. Backends that always have room ignore it.
    fn set_room_notifier(&self, notifier: Option<RoomNotifier>) {
        let _ = notifier;
    }

    /// Whether the frontend has the backend open (QEMU's `fe_open`, `query-chardev`'s
    /// `frontend-open`): a virtio serial port while the guest has it open; other
    /// frontends always.
    fn frontend_open(&self) -> bool {
        true
    }

    /// The frontend opened or closed the backend (QEMU's `qemu_chr_fe_set_open`).
    /// Backends that do not report it ignore it.
    fn set_frontend_open(&self, open: bool) {
        let _ = open;
    }

    /// The driver name (`stdio`, `file`, `null`, `ringbuf`, `pty`), as `info chardev`
    /// shows it.
    fn driver(&self) -> &'static str;

    /// QEMU's `filename` of the chardev (`query-chardev`): where it leads, e.g.
    /// `pty:/dev/pts/3`, which libvirt reads to find a domain's console.
    fn filename(&self) -> String {
        self.driver().to_string()
    }
}

/// Errors of creating and finding character backends, worded as QEMU words them.
#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    /// The driver name is no backend QEMU knows.
    #[error("'{0}' is not a valid char driver name")]
    UnknownDriver(String),
    /// A backend QEMU has that qomvm does not implement.
    #[error("char driver '{0}' is not supported by qomvm")]
    Unsupported(String),
    /// `file:` without a path.
    #[error("chardev: file: no filename given")]
    NoFilename,
    /// The output file cannot be opened.
    #[error("Could not open '{path}': {source}", path = .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A second stdio backend while one exists: stdin cannot be shared.
    #[error("cannot use stdio by multiple character devices")]
    StdioInUse,
    /// A pseudo-terminal cannot be created.
    #[error(transparent)]
    Pty(#[from] crate::core::char_pty::PtyError),
    /// `-chardev` without `id=`.
    #[error("Parameter 'id' is missing")]
    MissingId,
    /// `-chardev` with an id already registered.
    #[error("Duplicate ID '{0}' for chardev")]
    DuplicateId(String),
    /// `-serial chardev:ID` naming no registered backend.
    #[error("chardev: '{0}' not found")]
    NotFound(String),
    /// A `-chardev` option the driver does not have.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A socket chardev's options, or its socket.
    #[error(transparent)]
    Socket(#[from] crate::core::char_socket::SocketError),
    /// A `-chardev` option value that does not parse.
    #[error("Parameter '{name}' expects {expected}")]
    InvalidValue {
        /// The option.
        name: String,
        /// What it accepts.
        expected: &'static str,
    },
    /// A second frontend for a chardev that is not a mux (QEMU's `qemu_chr_fe_init`).
    #[error("Device '{0}' is in use")]
    InUse(String),
}

/// QEMU's `null` chardev: output is discarded, there is never input.
#[derive(Debug, Default)]
pub struct NullBackend;

impl CharBackend for NullBackend {
    fn write(&self, _data: &[u8]) {}

    fn driver(&self) -> &'static str {
        "null"
    }
}

/// QEMU's `file` chardev: output goes to a file, truncated when opened unless `append`
/// (QEMU's `append=on`); there is no input.
#[derive(Debug)]
pub struct FileBackend {
    file: Mutex<File>,
    path: PathBuf,
}

impl FileBackend {
    /// Opens (creating it if needed) `path` for output.
    pub fn open(path: impl AsRef<Path>, append: bool) -> Result<Self, ChardevError> {
        let path = path.as_ref();
        if path.as_os_str().is_empty() {
            return Err(ChardevError::NoFilename);
        }
        let open_error = |source| ChardevError::Open {
            path: path.to_path_buf(),
            source,
        };
        // QEMU's qemu_open: /dev/fdset/N takes a descriptor the parent passed (-add-fd).
        let fdset = path.to_str().and_then(crate::core::fdset::fdset_id);
        let file = if let Some(set) = fdset {
            let set = set.map_err(|e| open_error(std::io::Error::other(e)))?;
            let flags = libc::O_WRONLY | if append { libc::O_APPEND } else { 0 };
            let file = crate::core::fdset::fdset_open(set, flags)
                .map_err(|e| open_error(std::io::Error::other(e)))?;
            if !append {
                file.set_len(0).map_err(open_error)?;
            }
            file
        } else {
            let mut options = OpenOptions::new();
            options.create(true);
            if append {
                options.append(true);
            } else {
                options.write(true).truncate(true);
            }
            options.open(path).map_err(open_error)?
        };
        Ok(FileBackend {
            file: Mutex::new(file),
            path: path.to_path_buf(),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl CharBackend for FileBackend {
    fn write(&self, data: &[u8]) {
        // Unbuffered, as QEMU's fd chardev: what the guest printed before a crash is in the
        // file.
        if let Err(err) = self.file.lock().write_all(data) {
            log::warn!("chardev file {}: {err}; output lost", self.path.display());
        }
    }

    fn driver(&self) -> &'static str {
        "file"
    }
}

/// Whether a [`StdioBackend`] exists (QEMU allows one: stdin cannot be shared).
static STDIO_IN_USE: AtomicBool = AtomicBool::new(false);

/// The process's stdin reader: one thread, started when the first receiver is installed,
/// feeding whatever receiver is current.
struct StdinReader {
    receiver: Mutex<Option<CharReceiver>>,
    started: Once,
}

static STDIN_READER: StdinReader = StdinReader {
    receiver: Mutex::new(None),
    started: Once::new(),
};

impl StdinReader {
    fn install(&'static self, receiver: Option<CharReceiver>) {
        let start = receiver.is_some();
        *self.receiver.lock() = receiver;
        if start {
            self.started.call_once(|| {
                let spawned = std::thread::Builder::new()
                    .name("chardev-stdin".into())
                    .spawn(move || self.run(io::stdin()));
                if let Err(err) = spawned {
                    log::error!("chardev stdio: cannot start the stdin reader: {err}");
                }
            });
        }
    }

    /// Reads until EOF or an error, handing each chunk to the current receiver. At EOF the
    /// thread ends and the VM goes on: a guest whose input was `</dev/null` keeps running,
    /// as under QEMU.
    fn run(&self, mut input: impl Read) {
        let mut buf = [0u8; 4096];
        loop {
            match input.read(&mut buf) {
                Ok(0) => {
                    log::debug!("chardev stdio: end of input; no more reads");
                    return;
                }
                Ok(n) => {
                    // Cloned out so the receiver runs without this lock: it takes the
                    // frontend's lock, and the frontend may be installing a receiver.
                    let receiver = self.receiver.lock().clone();
                    if let Some(receiver) = receiver {
                        receiver(&buf[..n]);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    log::warn!("chardev stdio: reading stdin: {err}; no more reads");
                    return;
                }
            }
        }
    }
}

/// QEMU's `stdio` chardev: output to stdout, input from stdin. Stdin is read by a thread
/// started when a frontend first installs a receiver; at end of input the thread stops and
/// the VM runs on. Terminal modes (raw input, Ctrl-A escapes) are not set here: `-nographic`
/// stacks a mux backend on this one.
#[derive(Debug)]
pub struct StdioBackend {
    _private: (),
}

impl StdioBackend {
    /// The stdio backend; refused while another exists.
    pub fn new() -> Result<Self, ChardevError> {
        if STDIO_IN_USE.swap(true, Ordering::AcqRel) {
            return Err(ChardevError::StdioInUse);
        }
        Ok(StdioBackend { _private: () })
    }
}

impl Drop for StdioBackend {
    fn drop(&mut self) {
        STDIN_READER.install(None);
        STDIO_IN_USE.store(false, Ordering::Release);
    }
}

impl CharBackend for StdioBackend {
    fn write(&self, data: &[u8]) {
        let mut out = io::stdout().lock();
        // A closed stdout (EPIPE: Rust ignores SIGPIPE) loses the output; the guest runs on.
        let _ = out.write_all(data).and_then(|()| out.flush());
    }

    fn set_receiver(&self, receiver: Option<CharReceiver>) {
        STDIN_READER.install(receiver);
    }

    fn driver(&self) -> &'static str {
        "stdio"
    }
}

/// QEMU's `ringbuf` chardev: keeps the last `size` bytes of output in memory, and takes
/// input from [`Ringbuf::inject`] (QEMU's `ringbuf-write`). Tests capture a UART's output
/// with it.
pub struct Ringbuf {
    data: Mutex<VecDeque<u8>>,
    size: usize,
    receiver: Mutex<Option<CharReceiver>>,
}

/// QEMU's default `ringbuf` size.
pub const RINGBUF_DEFAULT_SIZE: usize = 64 * 1024;

impl Ringbuf {
    /// A ring buffer keeping the last `size` bytes (at least one).
    pub fn new(size: usize) -> Self {
        Ringbuf {
            data: Mutex::new(VecDeque::new()),
            size: size.max(1),
            receiver: Mutex::new(None),
        }
    }

    /// The output kept so far, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().iter().copied().collect()
    }

    /// Takes the output kept so far (QEMU's `ringbuf-read`).
    pub fn take(&self) -> Vec<u8> {
        self.data.lock().drain(..).collect()
    }

    /// Feeds `data` to the frontend's receiver as input; dropped without one.
    pub fn inject(&self, data: &[u8]) {
        let receiver = self.receiver.lock().clone();
        if let Some(receiver) = receiver {
            receiver(data);
        }
    }

    /// Whether a frontend installed a receiver.
    pub fn has_receiver(&self) -> bool {
        self.receiver.lock().is_some()
    }
}

impl Default for Ringbuf {
    fn default() -> Self {
        Ringbuf::new(RINGBUF_DEFAULT_SIZE)
    }
}

impl CharBackend for Ringbuf {
    fn write(&self, data: &[u8]) {
        let mut buf = self.data.lock();
        buf.extend(data);
        let excess = buf.len().saturating_sub(self.size);
        buf.drain(..excess);
    }

    fn set_receiver(&self, receiver: Option<CharReceiver>) {
        *self.receiver.lock() = receiver;
    }

    fn driver(&self) -> &'static str {
        "ringbuf"
    }
}

impl CharBackend for crate::core::char_socket::SocketBackend {
    fn write(&self, data: &[u8]) {
        crate::core::char_socket::SocketBackend::write(self, data);
    }

    fn set_receiver(&self, receiver: Option<CharReceiver>) {
        crate::core::char_socket::SocketBackend::set_receiver(self, receiver);
    }

    fn is_open(&self) -> bool {
        crate::core::char_socket::SocketBackend::is_open(self)
    }

    fn set_open_notifier(&self, notifier: Option<OpenNotifier>) {
        crate::core::char_socket::SocketBackend::set_open_notifier(self, notifier);
    }

    fn write_room(&self) -> usize {
        crate::core::char_socket::SocketBackend::write_room(self)
    }

    fn set_room_notifier(&self, notifier: Option<RoomNotifier>) {
        crate::core::char_socket::SocketBackend::set_room_notifier(self, notifier);
    }

    fn frontend_open(&self) -> bool {
        crate::core::char_socket::SocketBackend::frontend_open(self)
    }

    fn set_frontend_open(&self, open: bool) {
        crate::core::char_socket::SocketBackend::set_frontend_open(self, open);
    }

    fn driver(&self) -> &'static str {
        "socket"
    }

    fn filename(&self) -> String {
        crate::core::char_socket::SocketBackend::filename(self)
    }
}

impl CharBackend for crate::core::char_pty::PtyBackend {
    fn write(&self, data: &[u8]) {
        self.write_out(data);
    }

    fn set_receiver(&self, receiver: Option<CharReceiver>) {
        self.set_input_receiver(receiver);
    }

    fn driver(&self) -> &'static str {
        "pty"
    }

    fn filename(&self) -> String {
        format!("pty:{}", self.path().display())
    }
}

/// A registered backend: its id, whether it takes several frontends (`mux=on`), and how
/// many it has.
struct Registered {
    id: String,
    backend: Arc<dyn CharBackend>,
    mux: bool,
    frontends: usize,
}

/// The character backends by id (QEMU's `/chardevs` container), for `-chardev id=` and the
/// `chardev` properties of frontends.
static CHARDEVS: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

/// Registers `backend` under `id` (QEMU's `qemu_chardev_add`).
pub fn chardev_add(id: &str, backend: Arc<dyn CharBackend>) -> Result<(), ChardevError> {
    chardev_add_mux(id, backend, false)
}

/// [`chardev_add`] of a backend that may have several frontends (`mux=on`).
pub fn chardev_add_mux(id: &str, backend: Arc<dyn CharBackend>, mux: bool) -> Result<(), ChardevError> {
    let mut chardevs = CHARDEVS.lock();
    if chardevs.iter().any(|c| c.id == id) {
        return Err(ChardevError::DuplicateId(id.to_string()));
    }
    chardevs.push(Registered {
        id: id.to_string(),
        backend,
        mux,
        frontends: 0,
    });
    Ok(())
}

/// The backend registered under `id` (QEMU's `qemu_chr_find`).
pub fn chardev_find(id: &str) -> Option<Arc<dyn CharBackend>> {
    CHARDEVS
        .lock()
        .iter()
        .find(|c| c.id == id)
        .map(|c| c.backend.clone())
}

/// Where `id` is in the registry.
fn registered_at(chardevs: &[Registered], id: &str) -> Result<usize, ChardevError> {
    chardevs
        .iter()
        .position(|c| c.id == id)
        .ok_or_else(|| ChardevError::NotFound(id.to_string()))
}

/// A device takes `id` as its backend (QEMU's `qemu_chr_fe_init`): one frontend per
/// chardev unless it is a mux. Give it back with [`chardev_release`].
pub fn chardev_claim(id: &str) -> Result<Arc<dyn CharBackend>, ChardevError> {
    let mut chardevs = CHARDEVS.lock();
    let i = registered_at(&chardevs, id)?;
    let c = &mut chardevs[i];
    if c.frontends > 0 && !c.mux {
        return Err(ChardevError::InUse(id.to_string()));
    }
    c.frontends += 1;
    Ok(c.backend.clone())
}

/// A frontend of `backend` (registered under `id`) let it go (QEMU's `qemu_chr_fe_deinit`).
pub fn chardev_release(id: &str, backend: &Arc<dyn CharBackend>) {
    let mut chardevs = CHARDEVS.lock();
    if let Some(c) = chardevs
        .iter_mut()
        .find(|c| c.id == id && Arc::ptr_eq(&c.backend, backend))
    {
        c.frontends = c.frontends.saturating_sub(1);
    }
}

/// Whether a frontend uses `id` (QEMU's `qemu_chr_is_busy`).
pub fn chardev_is_busy(id: &str) -> bool {
    CHARDEVS
        .lock()
        .iter()
        .any(|c| c.id == id && c.frontends > 0)
}

/// Unregisters `id` if no frontend uses it (QEMU's `qmp_chardev_remove`), in one step: a
/// device cannot claim it in between.
pub fn chardev_remove_idle(id: &str) -> Result<Arc<dyn CharBackend>, ChardevError> {
    let mut chardevs = CHARDEVS.lock();
    let i = registered_at(&chardevs, id)?;
    if chardevs[i].frontends > 0 {
        return Err(ChardevError::InUse(id.to_string()));
    }
    Ok(chardevs.remove(i).backend)
}

/// The registered ids with their drivers, in registration order (`info chardev`).
pub fn chardev_list() -> Vec<(String, &'static str)> {
    CHARDEVS
        .lock()
        .iter()
        .map(|c| (c.id.clone(), c.backend.driver()))
        .collect()
}

/// Backends QEMU has that qomvm lacks, so their names get a clearer error than "not a
/// valid char driver name".
const QEMU_ONLY_DRIVERS: &[&str] = &[
    "vc",
    "pipe",
    "telnet",
    "websocket",
    "udp",
    "mon",
    "serial",
    "tty",
    "parallel",
    "parport",
    "msmouse",
    "wctablet",
    "braille",
    "testdev",
    "memory",
    "spicevmc",
    "spiceport",
    "qemu-vdagent",
    "dbus",
    "mux",
];

fn unknown_driver(name: &str) -> ChardevError {
    if QEMU_ONLY_DRIVERS.contains(&name) || name.starts_with("/dev/") || name.starts_with("COM") {
        ChardevError::Unsupported(name.to_string())
    } else {
        ChardevError::UnknownDriver(name.to_string())
    }
}

/// Parses a `-serial` value (QEMU's `qemu_chr_parse_compat` + `serial_parse`): `stdio`,
/// `null`, `pty`, `file:PATH`, `chardev:ID`, or `none`, which means no serial port (`Ok(None)`).
/// The caller prefixes the error with `-serial SPEC: `, as QEMU's location reporting does.
pub fn parse_serial_spec(spec: &str) -> Result<Option<Arc<dyn CharBackend>>, ChardevError> {
    if spec == "none" {
        return Ok(None);
    }
    if let Some(path) = spec.strip_prefix("file:") {
        return Ok(Some(Arc::new(FileBackend::open(path, false)?)));
    }
    if let Some(id) = spec.strip_prefix("chardev:") {
        return chardev_find(id)
            .map(Some)
            .ok_or_else(|| ChardevError::NotFound(id.to_string()));
    }
    if let Some((kind @ ("unix" | "tcp"), rest)) = spec.split_once(':') {
        let items = std::iter::once(("addr".to_string(), Some(first_opt(rest))))
            .chain(split_opts(rest).into_iter().skip(1))
            .collect();
        let socket = crate::core::char_socket::parse_shorthand(kind, items)?;
        return Ok(Some(crate::core::char_socket::SocketBackend::open(socket)?));
    }
    match spec {
        "stdio" => Ok(Some(Arc::new(StdioBackend::new()?))),
        "null" => Ok(Some(Arc::new(NullBackend))),
        "pty" => Ok(Some(Arc::new(crate::core::char_pty::PtyBackend::open()?))),
        _ => {
            // `tcp:host:port`, `mon:stdio`: the driver is what precedes the first colon.
            let driver = spec.split_once(':').map_or(spec, |(d, _)| d);
            Err(unknown_driver(driver))
        }
    }
}

/// The first item of an option string, whole (a path or address may hold `=`).
fn first_opt(spec: &str) -> String {
    crate::core::qemu_opts::split_commas(spec)
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// Splits `a=b,c=d` into pairs; `,,` is a literal comma, as in QEMU's option syntax.
fn split_opts(spec: &str) -> Vec<(String, Option<String>)> {
    crate::core::qemu_opts::split_commas(spec)
        .into_iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (item, None),
        })
        .collect()
}

/// QemuOpts' boolean (a bare key means `on`).
fn parse_bool_opt(name: &str, value: Option<&str>) -> Result<bool, ChardevError> {
    crate::core::qemu_opts::parse_on_off(value).ok_or_else(|| ChardevError::InvalidValue {
        name: name.to_string(),
        expected: "'on' or 'off'",
    })
}

/// A `-chardev` made: its id, the backend, and whether it takes several frontends.
pub struct NewChardev {
    /// `id=`.
    pub id: String,
    /// The backend.
    pub backend: Arc<dyn CharBackend>,
    /// `mux=on`: several frontends share it (qomvm does not multiplex their input: the
    /// last to attach receives it).
    pub mux: bool,
}

impl NewChardev {
    /// Registers it ([`chardev_add_mux`]).
    pub fn register(self) -> Result<(), ChardevError> {
        chardev_add_mux(&self.id, self.backend, self.mux)
    }
}

/// Parses a `-chardev DRIVER,id=ID[,...]` value into a new backend (QEMU's
/// `qemu_chr_new_from_opts`); register it with [`NewChardev::register`]. Drivers: `stdio`,
/// `null`, `file` (`path=`, `append=on|off`), `ringbuf` (`size=`), `pty`, `socket`.
pub fn parse_chardev_opts(spec: &str) -> Result<NewChardev, ChardevError> {
    let mut opts = split_opts(spec).into_iter();
    let driver = match opts.next() {
        Some((key, None)) => key,
        Some((key, Some(value))) if key == "backend" => value,
        _ => return Err(ChardevError::InvalidParameter(spec.to_string())),
    };
    if driver == "socket" {
        let (id, rest) = crate::core::char_socket::split_id(opts);
        let id = id.ok_or(ChardevError::MissingId)?;
        let socket = crate::core::char_socket::parse_chardev(rest)?;
        return Ok(NewChardev {
            id,
            backend: crate::core::char_socket::SocketBackend::open(socket)?,
            mux: false,
        });
    }
    let mut id = None;
    let mut mux = false;
    let mut path = None;
    let mut append = false;
    let mut size = RINGBUF_DEFAULT_SIZE;
    for (key, value) in opts {
        match (key.as_str(), driver.as_str()) {
            ("id", _) => id = value,
            ("path", "file") => path = value,
            ("append", "file") => append = parse_bool_opt("append", value.as_deref())?,
            ("size", "ringbuf") => {
                size = value
                    .as_deref()
                    .and_then(qom::parse_size)
                    .and_then(|s| usize::try_from(s).ok())
                    .filter(|s| s.is_power_of_two())
                    .ok_or(ChardevError::InvalidValue {
                        name: "size".into(),
                        expected: "a power of two",
                    })?;
            }
            ("mux", _) => mux = parse_bool_opt("mux", value.as_deref())?,
            // QEMU's options for every backend that mean nothing without a terminal or log.
            ("signal", "stdio") | ("logfile", _) | ("logappend", _) => {
                log::warn!("-chardev {driver}: option '{key}' is ignored by qomvm");
            }
            _ => return Err(ChardevError::InvalidParameter(key)),
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or(ChardevError::MissingId)?;
    let backend: Arc<dyn CharBackend> = match driver.as_str() {
        "stdio" => Arc::new(StdioBackend::new()?),
        "null" => Arc::new(NullBackend),
        "file" => Arc::new(FileBackend::open(path.unwrap_or_default(), append)?),
        "ringbuf" => Arc::new(Ringbuf::new(size)),
        "pty" => Arc::new(crate::core::char_pty::PtyBackend::open()?),
        other => return Err(unknown_driver(other)),
    };
    Ok(NewChardev { id, backend, mux })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(spec: &str) -> String {
        match parse_serial_spec(spec) {
            Ok(_) => panic!("'{spec}' parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn serial_specs_parse_as_qemu_does() {
        assert!(parse_serial_spec("none").unwrap().is_none());
        assert_eq!(parse_serial_spec("null").unwrap().unwrap().driver(), "null");
        assert_eq!(err("foo"), "'foo' is not a valid char driver name");
        assert_eq!(
            err("tcp:127.0.0.1:1"),
            "Failed to connect to '127.0.0.1:1': Connection refused"
        );
        assert_eq!(
            err("udp:127.0.0.1:4444"),
            "char driver 'udp' is not supported by qomvm"
        );
        assert_eq!(
            err("mon:stdio"),
            "char driver 'mon' is not supported by qomvm"
        );
        assert_eq!(err("file:"), "chardev: file: no filename given");
        assert_eq!(err("chardev:nosuch"), "chardev: 'nosuch' not found");
        let e = err("file:/nonexistent-dir/out.txt");
        assert!(
            e.starts_with("Could not open '/nonexistent-dir/out.txt': "),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn a_chardev_has_one_frontend_unless_it_is_a_mux() {
        chardev_add("claim-one", Arc::new(NullBackend)).unwrap();
        let backend = chardev_claim("claim-one").unwrap();
        assert!(chardev_is_busy("claim-one"));
        assert_eq!(
            chardev_claim("claim-one").err().unwrap().to_string(),
            "Device 'claim-one' is in use"
        );
        assert_eq!(
            chardev_remove_idle("claim-one").err().unwrap().to_string(),
            "Device 'claim-one' is in use"
        );
        chardev_release("claim-one", &backend);
        assert!(!chardev_is_busy("claim-one"));
        assert!(chardev_remove_idle("claim-one").is_ok());
        assert!(matches!(chardev_claim("claim-one"), Err(ChardevError::NotFound(_))));
        let NewChardev { id, backend, mux } = parse_chardev_opts("null,id=claim-mux,mux=on").unwrap();
        assert!(mux);
        chardev_add_mux(&id, backend, mux).unwrap();
        let (a, b) = (chardev_claim("claim-mux").unwrap(), chardev_claim("claim-mux").unwrap());
        chardev_release("claim-mux", &a);
        assert!(chardev_is_busy("claim-mux"), "one frontend is left");
        chardev_release("claim-mux", &b);
        assert!(!chardev_is_busy("claim-mux"));
        assert!(chardev_remove_idle("claim-mux").is_ok());
    }

    #[test]
    fn stdio_is_exclusive() {
        let first = parse_serial_spec("stdio").unwrap().unwrap();
        assert_eq!(first.driver(), "stdio");
        assert_eq!(
            err("stdio"),
            "cannot use stdio by multiple character devices"
        );
        drop(first);
        let again = parse_serial_spec("stdio").unwrap();
        assert!(again.is_some());
    }

    #[test]
    fn file_backend_truncates_unless_appending() {
        let dir = std::env::temp_dir().join(format!("qomvm-chardev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        std::fs::write(&path, "old contents that must go").unwrap();
        let spec = format!("file:{}", path.display());
        let backend = parse_serial_spec(&spec).unwrap().unwrap();
        backend.write(b"hello ");
        backend.write(b"world");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello world");
        drop(backend);
        let NewChardev { id, backend: appending, .. } =
            parse_chardev_opts(&format!("file,id=f0,path={},append=on", path.display())).unwrap();
        assert_eq!(id, "f0");
        appending.write(b"!");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello world!");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chardev_opts_and_the_registry() {
        let NewChardev { id, backend, .. } = parse_chardev_opts("ringbuf,id=test-ring,size=16").unwrap();
        assert_eq!(backend.driver(), "ringbuf");
        chardev_add(&id, backend).unwrap();
        assert_eq!(
            chardev_add("test-ring", Arc::new(NullBackend))
                .unwrap_err()
                .to_string(),
            "Duplicate ID 'test-ring' for chardev"
        );
        let found = parse_serial_spec("chardev:test-ring").unwrap().unwrap();
        assert_eq!(found.driver(), "ringbuf");
        assert!(chardev_list()
            .iter()
            .any(|(i, d)| i == "test-ring" && *d == "ringbuf"));
        assert!(chardev_remove_idle("test-ring").is_ok());
        assert!(chardev_find("test-ring").is_none());

        let e = |s: &str| parse_chardev_opts(s).err().unwrap().to_string();
        assert_eq!(e("null"), "Parameter 'id' is missing");
        assert_eq!(e("null,id=n,path=x"), "Invalid parameter 'path'");
        assert_eq!(e("bogus,id=b"), "'bogus' is not a valid char driver name");
        assert_eq!(
            e("ringbuf,id=r,size=3"),
            "Parameter 'size' expects a power of two"
        );
        assert_eq!(e("file,id=f"), "chardev: file: no filename given");
    }

    #[test]
    fn ringbuf_keeps_the_tail_and_feeds_input() {
        let ring = Ringbuf::new(4);
        ring.write(b"abcdef");
        assert_eq!(ring.contents(), b"cdef");
        assert_eq!(ring.take(), b"cdef");
        assert!(ring.contents().is_empty());
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        ring.inject(b"dropped: no receiver yet");
        ring.set_receiver(Some(Arc::new(move |d: &[u8]| {
            sink.lock().extend_from_slice(d)
        })));
        ring.inject(b"hi");
        assert_eq!(*got.lock(), b"hi");
    }

    /// A backend stacked on another, filtering its input as QEMU's mux does with the
    /// Ctrl-A escapes: it installs its own receiver on the inner backend.
    struct DropCtrlA {
        inner: Arc<dyn CharBackend>,
    }

    impl CharBackend for DropCtrlA {
        fn write(&self, data: &[u8]) {
            self.inner.write(data);
        }

        fn set_receiver(&self, receiver: Option<CharReceiver>) {
            self.inner
                .set_receiver(receiver.map(|frontend| -> CharReceiver {
                    Arc::new(move |data: &[u8]| {
                        let kept: Vec<u8> = data.iter().copied().filter(|&b| b != 0x01).collect();
                        frontend(&kept);
                    })
                }));
        }

        fn driver(&self) -> &'static str {
            "mux"
        }
    }

    #[test]
    fn a_filter_stacks_between_a_backend_and_the_frontend() {
        let ring = Arc::new(Ringbuf::default());
        let mux = DropCtrlA {
            inner: ring.clone(),
        };
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        mux.set_receiver(Some(Arc::new(move |d: &[u8]| {
            sink.lock().extend_from_slice(d)
        })));
        ring.inject(b"a\x01x");
        mux.write(b"out");
        assert_eq!(*got.lock(), b"ax");
        assert_eq!(ring.contents(), b"out");
    }

    #[test]
    fn the_stdin_reader_stops_at_eof_and_feeds_the_current_receiver() {
        let reader = StdinReader {
            receiver: Mutex::new(None),
            started: Once::new(),
        };
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        *reader.receiver.lock() = Some(Arc::new(move |d: &[u8]| sink.lock().extend_from_slice(d)));
        // Returns at EOF instead of looping or ending anything else.
        reader.run(&b"typed input"[..]);
        assert_eq!(*got.lock(), b"typed input");
    }
}
