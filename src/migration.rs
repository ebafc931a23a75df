//! Migration and snapshots (QEMU's `migration/migration.c`): QMP's `migrate` sends the VM
//! over a channel (`unix:`, `tcp:`, `file:`, `exec:`), `-incoming` (or `-incoming defer`
//! plus `migrate-incoming`) receives it into a freshly built VM of the same configuration,
//! `query-migrate` reports progress, `migrate_cancel` stops a migration, and `MIGRATION`
//! events report each status change when the `events` capability is on.
//!
//! The source stops the guest, writes the stream (`hw::core::migration`: configuration, all
//! of RAM with zero pages as such, then the accelerator's, the CPUs' and the devices'
//! state) and stays paused in `postmigrate`, or resumes the guest if the migration failed.
//! The destination loads the stream before its vCPUs first run, then starts the guest
//! unless `-S` was given. A mismatched configuration or a device that cannot move is an
//! error naming it.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hw::core::machine::machine_state;
use hw::core::migration::{self as stream, MigrationError, MultifdConfig, Progress};
use hw::core::multifd::{self, Socket};
use hw::core::runstate::{self, RunStatus};
use parking_lot::Mutex;
use qom::ObjectRef;
use serde_json::{json, Value};

/// QEMU's `MigrationStatus` values qomvm goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration yet.
    None,
    /// Opening the channel.
    Setup,
    /// Sending or receiving.
    Active,
    /// Done.
    Completed,
    /// Failed (`error-desc` says why).
    Failed,
    /// `migrate_cancel` was asked.
    Cancelling,
    /// Cancelled.
    Cancelled,
}

impl MigrationStatus {
    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
        }
    }

    fn in_progress(self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Cancelling
        )
    }
}

/// QEMU's `MigrationStatus` enum, for the schema.
pub const MIGRATION_STATUS_VALUES: &[&str] = &[
    "none",
    "setup",
    "cancelling",
    "cancelled",
    "active",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover",
    "completed",
    "failed",
    "colo",
    "pre-switchover",
    "device",
    "wait-unplug",
];

/// One migration (outgoing or incoming) and its figures.
struct State {
    status: MigrationStatus,
    progress: Progress,
    started: Option<Instant>,
    setup_ms: u64,
    total_ms: Option<u64>,
    downtime_ms: Option<u64>,
    error: Option<String>,
    /// `-incoming defer`: `migrate-incoming` may be run (once).
    deferred_incoming: bool,
    /// The destination starts the guest once loaded (no `-S`).
    autostart: bool,
    /// The migration is this VM's incoming one.
    incoming: bool,
    /// The incoming channel's URI is a socket (`unix:`, `tcp:`), over which multifd can
    /// run (QEMU's `migrate_multi_channels_is_allowed`); `None` before it is known.
    incoming_multichannel: Option<bool>,
}

/// `migrate-set-parameters`' values (QEMU's defaults).
#[derive(Clone, Copy, Debug)]
struct Parameters {
    downtime_limit_ms: u64,
    max_bandwidth: u64,
    multifd_channels: u64,
}

static STATE: Mutex<State> = Mutex::new(State {
    status: MigrationStatus::None,
    progress: Progress {
        transferred: 0,
        normal_pages: 0,
        zero_pages: 0,
        total_ram: 0,
        remaining: 0,
        passes: 0,
        dirty_pages_rate: 0,
    },
    started: None,
    setup_ms: 0,
    total_ms: None,
    downtime_ms: None,
    error: None,
    deferred_incoming: false,
    autostart: true,
    incoming: false,
    incoming_multichannel: None,
});

static PARAMETERS: Mutex<Parameters> = Mutex::new(Parameters {
    downtime_limit_ms: 300,
    max_bandwidth: 128 << 20,
    multifd_channels: 2,
});

/// Set by `migrate_cancel`: the sending thread stops at its next write.
static CANCEL: AtomicBool = AtomicBool::new(false);

/// Whether `MIGRATION` events are sent (the `events` capability).
pub static EVENTS: AtomicBool = AtomicBool::new(false);

/// Whether RAM goes over `multifd-channels` more connections (the `multifd` capability).
static MULTIFD: AtomicBool = AtomicBool::new(false);

/// The migration capabilities qomvm has (QEMU's `MigrationCapability`): `events`
/// (libvirt turns it on for every domain) and `multifd`.
pub const CAPABILITIES: &[&str] = &["events", "multifd"];

fn capability_flag(name: &str) -> Option<&'static AtomicBool> {
    match name {
        "events" => Some(&EVENTS),
        "multifd" => Some(&MULTIFD),
        _ => None,
    }
}

/// QMP `query-migrate-capabilities`.
pub fn capabilities() -> Value {
    CAPABILITIES
        .iter()
        .map(|&c| {
            let on = capability_flag(c).is_some_and(|f| f.load(Ordering::Relaxed));
            json!({"capability": c, "state": on})
        })
        .collect()
}

/// QMP `migrate-set-capabilities` (QEMU's `qmp_migrate_set_capabilities` and
/// `migrate_caps_check`): `changes` are names from [`CAPABILITIES`], applied together
/// or not at all.
pub fn set_capabilities(changes: &[(&str, bool)]) -> Result<(), MigrateError> {
    let st = STATE.lock();
    // A destination may still set them while it listens (before a source connected).
    let listening = st.incoming && st.status == MigrationStatus::Setup;
    if st.status.in_progress() && !listening {
        return Err(MigrateError::InProgress);
    }
    let multifd = changes.iter().any(|&(c, on)| c == "multifd" && on);
    if multifd && st.incoming_multichannel == Some(false) {
        return Err(MigrateError::MultifdProtocol);
    }
    drop(st);
    for &(name, on) in changes {
        if let Some(flag) = capability_flag(name) {
            flag.store(on, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Sockets of the running migration, which `migrate_cancel` shuts down so that no read
/// or write stays blocked.
static CANCEL_SOCKETS: Mutex<Vec<Socket>> = Mutex::new(Vec::new());

/// Why `migrate` or `migrate-incoming` was refused at once.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Another migration is in progress.
    #[error("There's a migration process in progress")]
    InProgress,
    /// A scheme qomvm does not know.
    #[error("unknown migration protocol: {0}")]
    UnknownProtocol(String),
    /// QEMU's `dump_migration_blocker`.
    #[error("Live migration disabled: dump-guest-memory in progress")]
    DumpInProgress,
    /// Something blocks migrating this VM.
    #[error(transparent)]
    Blocked(#[from] MigrationError),
    /// `migrate-incoming` without `-incoming defer`.
    #[error("'-incoming' was not specified on the command line")]
    NotDeferred,
    /// The channel could not be opened.
    #[error("{0}")]
    Channel(String),
    /// `multifd` with a URI that is not a socket (QEMU 7.2's `multifd_save_setup`).
    #[error("multifd is not supported by current protocol")]
    MultifdProtocol,
}

/// Whether multifd can run over URIs of `scheme` (QEMU's `uri_supports_multi_channels`).
fn multichannel(scheme: &str) -> bool {
    matches!(scheme, "unix" | "tcp")
}

/// Connects to `unix:`/`tcp:` address `rest`.
fn connect(scheme: &str, rest: &str) -> std::io::Result<Socket> {
    Ok(match scheme {
        "unix" => Socket::Unix(UnixStream::connect(rest)?),
        _ => Socket::Tcp(TcpStream::connect(rest)?),
    })
}

fn set_status(status: MigrationStatus) {
    STATE.lock().status = status;
    if EVENTS.load(Ordering::Relaxed) {
        hw::core::qapi_event::emit("MIGRATION", Some(json!({"status": status.name()})));
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Takes the descriptor a monitor client named with `getfd` (`fd:NAME`).
pub type NamedFds<'a> = &'a dyn Fn(&str) -> Option<std::os::fd::OwnedFd>;

/// `exec:` runs a shell, which qomvm's seccomp sandbox (inherited across `execve`) would
/// kill at its first call outside qomvm's list: refused clearly instead.
fn check_exec(scheme: &str) -> Result<(), MigrateError> {
    if scheme == "exec" && hw::core::sandbox::is_installed() {
        return Err(MigrateError::Channel(
            "exec: migration runs a command, which qomvm's sandbox would kill: use -sandbox off, or a unix:, tcp:, file: or fd: channel".into(),
        ));
    }
    Ok(())
}

/// `SCHEME:REST` of a migration URI, `exec:` checked against the sandbox.
fn split_uri(uri: &str) -> Result<(&str, &str), MigrateError> {
    let (scheme, rest) = uri
        .split_once(':')
        .ok_or_else(|| MigrateError::UnknownProtocol(uri.into()))?;
    check_exec(scheme)?;
    Ok((scheme, rest))
}

/// A channel error: what failed, and the host's words for why.
fn failed(what: String, e: std::io::Error) -> MigrateError {
    MigrateError::Channel(format!("{what}: {}", hw::core::os_error::strerror(&e)))
}

/// The sending end of a migration, and for `file:` the file itself, whose RAM goes at
/// fixed offsets ([`stream::MappedRam`]) so a restore can map it.
struct Outgoing {
    channel: Box<dyn Write + Send>,
    mapped: Option<std::fs::File>,
    /// A `unix:`/`tcp:` channel's scheme and address, where multifd channels connect too.
    address: Option<(String, String)>,
}

/// Opens the sending end of `uri`.
fn open_outgoing(uri: &str, named: NamedFds) -> Result<Outgoing, MigrateError> {
    let (scheme, rest) = split_uri(uri)?;
    if scheme == "file" {
        let file = std::fs::File::create(rest)
            .map_err(|e| failed(format!("Could not open '{rest}'"), e))?;
        let mapped = file
            .try_clone()
            .map_err(|e| failed(format!("Could not open '{rest}'"), e))?;
        return Ok(Outgoing {
            channel: Box::new(file),
            mapped: Some(mapped),
            address: None,
        });
    }
    if multichannel(scheme) {
        let socket = connect(scheme, rest)
            .map_err(|e| failed(format!("Failed to connect to '{rest}'"), e))?;
        if let Ok(clone) = socket.try_clone() {
            CANCEL_SOCKETS.lock().push(clone);
        }
        return Ok(Outgoing {
            channel: Box::new(socket),
            mapped: None,
            address: Some((scheme.to_string(), rest.to_string())),
        });
    }
    let channel: Box<dyn Write + Send> = match scheme {
        "fd" => Box::new(fd_channel(rest, named)?),
        "exec" => {
            let child = Command::new("/bin/sh")
                .args(["-c", rest])
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| failed(format!("Failed to run '{rest}'"), e))?;
            Box::new(child.stdin.expect("piped"))
        }
        _ => return Err(MigrateError::UnknownProtocol(uri.into())),
    };
    Ok(Outgoing {
        channel,
        mapped: None,
        address: None,
    })
}

/// `fd:NAME` (a descriptor `getfd` named, as libvirt's `virsh save` passes its file) or
/// `fd:N` (one the caller left open, as libvirt's restore passes it).
fn fd_channel(text: &str, named: NamedFds) -> Result<std::fs::File, MigrateError> {
    if !text.starts_with(|c: char| c.is_ascii_digit()) {
        return named(text).map(std::fs::File::from).ok_or_else(|| {
            MigrateError::Channel(format!("File descriptor named '{text}' has not been found"))
        });
    }
    inherited_fd(text)
}

/// `fd:N`: a descriptor the caller left open for qomvm. Taken over (duplicated, so the
/// number may be reused).
fn inherited_fd(text: &str) -> Result<std::fs::File, MigrateError> {
    use std::os::fd::{AsFd, BorrowedFd};
    let fd: i32 = text.parse().map_err(|_| {
        MigrateError::Channel(format!("File descriptor named '{text}' has not been found"))
    })?;
    // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(MigrateError::Channel(format!(
            "File descriptor named '{text}' has not been found"
        )));
    }
    // SAFETY: `fd` is open (checked above) and stays open while the borrow lives; the
    // owned copy is a new descriptor.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned = borrowed.as_fd().try_clone_to_owned().map_err(|e| {
        MigrateError::Channel(format!("fd:{fd}: {}", hw::core::os_error::strerror(&e)))
    })?;
    Ok(std::fs::File::from(owned))
}

/// The receiving end of `uri`, set up at once (so the source can connect as soon as
/// qomvm is up); `accept` waits for the source.
enum Incoming {
    Unix(UnixListener, String),
    Tcp(TcpListener),
    /// A regular file (`file:`, or `fd:` naming one): read without a buffer, so a mapped
    /// RAM area can be mapped and skipped.
    File(std::fs::File),
    Reader(Box<dyn Read + Send>),
}

/// What a migration's destination reads: a stream, or a file.
enum IncomingChannel {
    Stream(Box<dyn Read + Send>),
    File(std::fs::File),
}

impl Incoming {
    fn open(uri: &str, named: NamedFds) -> Result<Incoming, MigrateError> {
        let (scheme, rest) = split_uri(uri)?;
        Ok(match scheme {
            "unix" => {
                let _ = std::fs::remove_file(rest);
                let l = UnixListener::bind(rest)
                    .map_err(|e| failed(format!("Failed to bind socket '{rest}'"), e))?;
                Incoming::Unix(l, rest.to_string())
            }
            "tcp" => Incoming::Tcp(
                TcpListener::bind(rest)
                    .map_err(|e| failed(format!("Failed to bind socket '{rest}'"), e))?,
            ),
            "file" => Incoming::File(
                std::fs::File::open(rest)
                    .map_err(|e| failed(format!("Could not open '{rest}'"), e))?,
            ),
            "fd" => {
                let file = fd_channel(rest, named)?;
                if file.metadata().is_ok_and(|m| m.is_file()) {
                    Incoming::File(file)
                } else {
                    Incoming::Reader(Box::new(file))
                }
            }
            "exec" => {
                let child = Command::new("/bin/sh")
                    .args(["-c", rest])
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|e| failed(format!("Failed to run '{rest}'"), e))?;
                Incoming::Reader(Box::new(child.stdout.expect("piped")))
            }
            _ => return Err(MigrateError::UnknownProtocol(uri.into())),
        })
    }

    fn accept(self) -> std::io::Result<IncomingChannel> {
        Ok(match self {
            Incoming::Unix(l, path) => {
                let (s, _) = l.accept()?;
                let _ = std::fs::remove_file(path);
                IncomingChannel::Stream(Box::new(s))
            }
            Incoming::Tcp(l) => IncomingChannel::Stream(Box::new(l.accept()?.0)),
            Incoming::File(f) => IncomingChannel::File(f),
            Incoming::Reader(r) => IncomingChannel::Stream(r),
        })
    }
}

/// A writer that `migrate_cancel` stops.
struct Cancellable<W>(W);

impl<W: Write> Write for Cancellable<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if CANCEL.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("migration was cancelled"));
        }
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// QMP `migrate`: checks that the VM can move, then sends it from a thread.
pub fn migrate(machine: &ObjectRef, uri: &str, named: NamedFds) -> Result<(), MigrateError> {
    // Until `setup`: a dump (or migration) starting meanwhile sees this migration, or
    // this one the dump.
    let gate = crate::dump::start_gate();
    {
        let st = STATE.lock();
        if st.status.in_progress() {
            return Err(MigrateError::InProgress);
        }
    }
    if crate::dump::is_active() {
        return Err(MigrateError::DumpInProgress);
    }
    // QEMU 7.2 fails such a migration at its setup; refused before it starts here.
    let multifd_channels = if MULTIFD.load(Ordering::Relaxed) {
        let scheme = uri.split_once(':').map_or("", |(s, _)| s);
        if !multichannel(scheme) {
            return Err(MigrateError::MultifdProtocol);
        }
        Some(PARAMETERS.lock().multifd_channels as u8)
    } else {
        None
    };
    stream::check_migratable(machine)?;
    let started = Instant::now();
    {
        let mut st = STATE.lock();
        st.incoming = false;
        st.progress = Progress::default();
        st.started = Some(started);
        st.total_ms = None;
        st.downtime_ms = None;
        st.error = None;
    }
    CANCEL.store(false, Ordering::Relaxed);
    set_status(MigrationStatus::Setup);
    drop(gate);
    let channel = match open_outgoing(uri, named) {
        Ok(c) => c,
        Err(e) => {
            STATE.lock().error = Some(e.to_string());
            set_status(MigrationStatus::Failed);
            return Err(e);
        }
    };
    let machine = machine.clone();
    std::thread::Builder::new()
        .name("live_migration".into())
        .spawn(move || outgoing(&machine, channel, multifd_channels, started))
        .map_err(|e| MigrateError::Channel(e.to_string()))?;
    Ok(())
}

/// Passes over the dirty log before the guest is stopped whatever remains (QEMU's
/// default has no cap but throttles the guest; qomvm stops it).
const MAX_PASSES: u64 = 30;

fn outgoing(
    machine: &ObjectRef,
    channel: Outgoing,
    multifd_channels: Option<u8>,
    started: Instant,
) {
    let Some(ms) = machine_state(machine) else {
        return;
    };
    STATE.lock().setup_ms = elapsed_ms(started);
    set_status(MigrationStatus::Active);
    let was_running = ms.services().vm().is_running();
    let mut w = BufWriter::with_capacity(1 << 20, Cancellable(channel.channel));
    let multifd = channel
        .address
        .zip(multifd_channels)
        .map(|((scheme, address), channels)| OutgoingMultifd {
            scheme,
            address,
            channels,
        });
    let result = send(machine, &mut w, was_running, channel.mapped, multifd);
    drop(w);
    CANCEL_SOCKETS.lock().clear();
    // Measured before the slots lose their logging flag (slow for big slots on some
    // hosts), which the guest, now stopped or elsewhere, does not wait for.
    let done = Instant::now();
    if let Some(ops) = ms.accel_ops() {
        let _ = ops.set_dirty_log(false);
    }
    let _ = ms.services().dirty_tracker().set_active(false);
    let mut st_error = None;
    match result {
        Ok(stopped) => {
            ms.services()
                .vm()
                .set_migration_status(RunStatus::PostMigrate);
            let mut st = STATE.lock();
            st.downtime_ms = Some(done.duration_since(stopped).as_millis() as u64);
            st.total_ms = Some(done.duration_since(started).as_millis() as u64);
            st.progress.remaining = 0;
            drop(st);
            set_status(MigrationStatus::Completed);
        }
        Err(e) => {
            let cancelled = CANCEL.load(Ordering::Relaxed);
            // QEMU resumes a source whose migration failed, its images taken back.
            if let Err(e) = block::activate_all() {
                log::error!("migration failed and the images cannot be taken back: {e}");
            }
            if was_running {
                ms.services().vm().set_migration_status(RunStatus::Paused);
                let _ = runstate::vm_start(ms);
            }
            STATE.lock().total_ms = Some(elapsed_ms(started));
            if cancelled {
                set_status(MigrationStatus::Cancelled);
            } else {
                st_error = Some(e.to_string());
            }
        }
    }
    if let Some(e) = st_error {
        log::warn!("migration failed: {e}");
        STATE.lock().error = Some(e);
        set_status(MigrationStatus::Failed);
    }
}

/// Pre-copy (QEMU's `migration_iteration_run`): with the guest running, all of RAM, then
/// the pages written meanwhile, pass after pass, until what is left would go within
/// `downtime-limit` at the rate of the last pass (or after [`MAX_PASSES`]); then the guest
/// stops, and the last dirty pages and the device state go. A paused guest goes in one
/// pass. Returns when the guest stopped.
fn send(
    machine: &ObjectRef,
    w: &mut impl Write,
    live: bool,
    mapped: Option<std::fs::File>,
    multifd: Option<OutgoingMultifd>,
) -> Result<Instant, MigrationError> {
    let ms =
        machine_state(machine).ok_or_else(|| MigrationError::Stream("not a machine".into()))?;
    let ops = ms
        .accel_ops()
        .ok_or_else(|| MigrationError::Stream("no accelerator".into()))?;
    let tracker = ms.services().dirty_tracker().clone();
    let mut progress = Progress::default();
    let cancelled = || CANCEL.load(Ordering::Relaxed);
    let config = multifd.as_ref().map(|m| MultifdConfig {
        channels: m.channels,
        uuid: random_uuid(),
    });
    stream::send_header(machine, w, &mut progress, config)?;
    let mut sender = match (&multifd, config) {
        (Some(m), Some(config)) => {
            // The destination reads the configuration before it accepts the channels.
            w.flush()?;
            Some(m.connect(ms.ram(), config, &mut progress)?)
        }
        _ => None,
    };
    let mapped = match mapped {
        Some(file) => Some(stream::MappedRam::begin(machine, file, w, &mut progress)?),
        None => None,
    };
    let mapped = mapped.as_ref();

    if live {
        ops.set_dirty_log(true)?;
        tracker
            .set_active(true)
            .map_err(|e| MigrationError::Io(e.to_string()))?;
        ops.dirty_pages()?;
    }
    // When the dirty log was last read: the dirty-page rate counts from there.
    let mut last_sync = Instant::now();
    let mut pending: Vec<u64> = Vec::new();
    let mut pass_started = Instant::now();
    let mut sent_before = progress.transferred;
    let mut throttle = Throttle::new(PARAMETERS.lock().max_bandwidth);
    send_ram(
        machine,
        RamSink::of(&sender, mapped),
        stream::all_pages(machine),
        w,
        &mut progress,
        true,
        Some(&mut throttle),
        &cancelled,
    )?;
    if let Some(s) = &mut sender {
        s.sync(w, &mut progress, &cancelled)?;
    }
    progress.passes = 1;
    STATE.lock().progress = progress;
    if live {
        loop {
            let rate = (progress.transferred - sent_before) as f64
                / pass_started.elapsed().as_secs_f64().max(1e-3);
            pending = ops.dirty_pages()?;
            pending.extend(tracker.take());
            pending.sort_unstable();
            pending.dedup();
            stream::retain_ram_pages(machine, &mut pending);
            let period = last_sync.elapsed().as_secs_f64().max(1e-3);
            last_sync = Instant::now();
            progress.dirty_pages_rate = (pending.len() as f64 / period) as u64;
            progress.remaining = pending.len() as u64 * stream::PAGE_SIZE;
            STATE.lock().progress = progress;
            let limit_s = PARAMETERS.lock().downtime_limit_ms as f64 / 1000.0;
            if progress.remaining as f64 / rate <= limit_s || progress.passes >= MAX_PASSES {
                break;
            }
            progress.passes += 1;
            if EVENTS.load(Ordering::Relaxed) {
                hw::core::qapi_event::emit(
                    "MIGRATION_PASS",
                    Some(json!({"pass": progress.passes})),
                );
            }
            pass_started = Instant::now();
            sent_before = progress.transferred;
            throttle.limit = PARAMETERS.lock().max_bandwidth;
            send_ram(
                machine,
                RamSink::of(&sender, mapped),
                pending.drain(..),
                w,
                &mut progress,
                false,
                Some(&mut throttle),
                &cancelled,
            )?;
            if let Some(s) = &mut sender {
                s.sync(w, &mut progress, &cancelled)?;
            }
        }
    }
    let stopped = Instant::now();
    runstate::vm_stop(ms, RunStatus::FinishMigrate)
        .map_err(|e| MigrationError::Io(e.to_string()))?;
    ms.services()
        .vm()
        .set_migration_status(RunStatus::FinishMigrate);
    log::debug!(target: "migration", "stopped after {} passes in {:?}", progress.passes, stopped.elapsed());
    if live {
        pending.extend(ops.dirty_pages()?);
        pending.extend(tracker.take());
        pending.sort_unstable();
        pending.dedup();
        stream::retain_ram_pages(machine, &mut pending);
        log::debug!(target: "migration", "{} last pages at {:?}", pending.len(), stopped.elapsed());
        send_ram(
            machine,
            RamSink::of(&sender, mapped),
            pending.into_iter(),
            w,
            &mut progress,
            false,
            None,
            &cancelled,
        )?;
    }
    // Every channel is flushed before the state goes (QEMU's multifd sync in
    // ram_save_complete), and closed.
    if let Some(mut s) = sender {
        // A paused guest went in one pass, whose sync is behind already.
        if live {
            s.sync(w, &mut progress, &cancelled)?;
        }
        s.finish(&mut progress)?;
    }
    // QEMU's migration_completion: the images go to the destination before the state does,
    // so it cannot take them over while this side still writes.
    block::inactivate_all().map_err(|e| MigrationError::Io(e.to_string()))?;
    if let Some(m) = mapped {
        m.finish(w)?;
    }
    log::debug!(target: "migration", "state at {:?}", stopped.elapsed());
    stream::send_state(machine, w, &mut progress)?;
    log::debug!(target: "migration", "done at {:?}", stopped.elapsed());
    STATE.lock().progress = progress;
    Ok(stopped)
}

/// QEMU's rate limit of a migration (`max-bandwidth`), in windows of at least 100 ms: the
/// sender sleeps until what it sent in the window was due at the limit. The last pass,
/// with the guest stopped, is not limited (QEMU's `migration_completion`).
struct Throttle {
    /// Bytes a second; 0: no limit.
    limit: u64,
    window: Instant,
    sent: u64,
}

impl Throttle {
    const WINDOW: Duration = Duration::from_millis(100);

    fn new(limit: u64) -> Self {
        Throttle {
            limit,
            window: Instant::now(),
            sent: 0,
        }
    }

    /// Counts `bytes` sent; waits until they were due at the limit's rate (a chunk larger
    /// than a window's budget waits for as many windows).
    fn account(&mut self, bytes: u64) {
        if self.limit == 0 {
            return;
        }
        self.sent += bytes;
        let due = Duration::from_secs_f64(self.sent as f64 / self.limit as f64);
        let elapsed = self.window.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        if self.window.elapsed() >= Self::WINDOW {
            self.window = Instant::now();
            self.sent = 0;
        }
    }
}

/// Where a pass's pages go.
enum RamSink<'a> {
    /// RAM records in the stream.
    Stream,
    /// Their places in a `file:` (mapped-ram).
    Mapped(&'a stream::MappedRam),
    /// The multifd channels.
    Multifd(&'a multifd::Sender),
}

impl<'a> RamSink<'a> {
    fn of(sender: &'a Option<multifd::Sender>, mapped: Option<&'a stream::MappedRam>) -> Self {
        match (sender, mapped) {
            (Some(s), _) => RamSink::Multifd(s),
            (None, Some(m)) => RamSink::Mapped(m),
            (None, None) => RamSink::Stream,
        }
    }
}

/// The source's multifd channels to be: `channels` more connections to `address`.
struct OutgoingMultifd {
    scheme: String,
    address: String,
    channels: u8,
}

impl OutgoingMultifd {
    /// Connects the channels (each sends its header) and starts their threads.
    fn connect(
        &self,
        ram: std::sync::Arc<vm_memory::GuestMemoryMmap>,
        config: MultifdConfig,
        progress: &mut Progress,
    ) -> Result<multifd::Sender, MigrationError> {
        let mut sockets = Vec::with_capacity(self.channels as usize);
        for id in 0..self.channels {
            let socket = connect(&self.scheme, &self.address).map_err(|e| {
                MigrationError::Multifd(format!(
                    "multifd: channel {id}: Failed to connect to '{}': {}",
                    self.address,
                    hw::core::os_error::strerror(&e)
                ))
            })?;
            if let Ok(clone) = socket.try_clone() {
                CANCEL_SOCKETS.lock().push(clone);
            }
            sockets.push(socket);
        }
        multifd::Sender::start(ram, sockets, config.uuid, progress)
    }
}

/// A UUID for one migration, which its multifd channels carry so the destination knows
/// them (random, version 4).
fn random_uuid() -> hw::core::uuid::Uuid {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Uniqueness only guards against a stray connection: the time will do.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    hw::core::uuid::Uuid(bytes)
}

/// Sends `pages` in the stream, over the multifd channels, or writes them at their
/// places of a mapped file, at most as fast as `throttle` allows (`None`: as fast as
/// possible).
#[allow(clippy::too_many_arguments)]
fn send_ram(
    machine: &ObjectRef,
    sink: RamSink,
    pages: impl Iterator<Item = u64>,
    w: &mut impl Write,
    progress: &mut Progress,
    first_pass: bool,
    mut throttle: Option<&mut Throttle>,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), MigrationError> {
    /// Pages between two looks at the rate limit: 4 MiB at most.
    const CHUNK: usize = 1024;
    let mut pages = pages.peekable();
    while pages.peek().is_some() {
        let chunk = pages.by_ref().take(CHUNK);
        let before = progress.transferred;
        match sink {
            RamSink::Mapped(m) => m.send_pages(machine, chunk, progress, first_pass, cancelled)?,
            RamSink::Multifd(s) => s.send_pages(chunk, progress, cancelled)?,
            RamSink::Stream => stream::send_pages(machine, chunk, w, progress, cancelled)?,
        }
        if let Some(t) = throttle.as_deref_mut() {
            t.account(progress.transferred - before);
        }
    }
    Ok(())
}

/// `-incoming URI` (at start-up, `autostart` without `-S`): the VM waits in `inmigrate`
/// and the stream is read from a thread. `-incoming defer` only marks the VM as waiting.
pub fn incoming_at_startup(
    machine: &ObjectRef,
    uri: &str,
    autostart: bool,
) -> Result<(), MigrateError> {
    let ms = machine_state(machine).expect("machines have a MachineState");
    ms.services()
        .vm()
        .set_migration_status(RunStatus::InMigrate);
    STATE.lock().autostart = autostart;
    if uri == "defer" {
        STATE.lock().deferred_incoming = true;
        return Ok(());
    }
    start_incoming(machine, uri, &|_| None)
}

/// QMP `migrate-incoming`, after `-incoming defer`.
pub fn migrate_incoming(
    machine: &ObjectRef,
    uri: &str,
    named: NamedFds,
) -> Result<(), MigrateError> {
    {
        let mut st = STATE.lock();
        if !st.deferred_incoming {
            return Err(MigrateError::NotDeferred);
        }
        st.deferred_incoming = false;
    }
    // QEMU's qmp_migrate_incoming: a URI that failed may be followed by another.
    start_incoming(machine, uri, named).inspect_err(|_| STATE.lock().deferred_incoming = true)
}

fn start_incoming(machine: &ObjectRef, uri: &str, named: NamedFds) -> Result<(), MigrateError> {
    let socket = multichannel(uri.split_once(':').map_or("", |(s, _)| s));
    // QEMU 7.2's multifd_load_setup.
    if MULTIFD.load(Ordering::Relaxed) && !socket {
        return Err(MigrateError::MultifdProtocol);
    }
    let channel = Incoming::open(uri, named)?;
    {
        let mut st = STATE.lock();
        st.started = Some(Instant::now());
        st.error = None;
        st.incoming = true;
        st.incoming_multichannel = Some(socket);
    }
    set_status(MigrationStatus::Setup);
    let machine = machine.clone();
    std::thread::Builder::new()
        .name("incoming_migration".into())
        .spawn(move || incoming(&machine, channel))
        .map_err(|e| MigrateError::Channel(e.to_string()))?;
    Ok(())
}

fn incoming(machine: &ObjectRef, channel: Incoming) {
    let Some(ms) = machine_state(machine) else {
        return;
    };
    let result = match channel {
        // The capability is read when the source connects (QEMU's migration_incoming_setup).
        Incoming::Unix(l, path) if MULTIFD.load(Ordering::Relaxed) => {
            incoming_multifd(machine, Listener::Unix(l, path))
        }
        Incoming::Tcp(l) if MULTIFD.load(Ordering::Relaxed) => {
            incoming_multifd(machine, Listener::Tcp(l))
        }
        channel => incoming_single(machine, channel),
    };
    let result = result.and_then(|bytes| {
        // QEMU's process_incoming_migration_bh: the source gave the images up.
        block::activate_all().map_err(|e| MigrationError::Io(e.to_string()))?;
        Ok(bytes)
    });
    match result {
        Ok(bytes) => {
            {
                let mut st = STATE.lock();
                st.progress.transferred = bytes;
                st.total_ms = st.started.map(elapsed_ms);
            }
            set_status(MigrationStatus::Completed);
            ms.services().vm().set_migration_status(RunStatus::Paused);
            if STATE.lock().autostart {
                ms.services()
                    .vm()
                    .set_migration_status(RunStatus::InMigrate);
                let _ = runstate::vm_start(ms);
            }
            // QEMU's process_incoming_migration_bh: the NICs tell the network where they
            // are now (the guest announces itself where it can, else RARP frames), with
            // QEMU's default announce parameters.
            crate::net::qmp_announce_self(50, 550, 5, 100, None);
        }
        Err(e) => {
            // QEMU's process_incoming_migration_co: the destination cannot run a guest
            // it only half loaded.
            qom::error_report!("load of migration failed: {e}");
            set_status(MigrationStatus::Failed);
            crate::os_posix::exit(1);
        }
    }
}

/// An incoming migration over one channel.
fn incoming_single(machine: &ObjectRef, channel: Incoming) -> Result<u64, MigrationError> {
    channel
        .accept()
        .map_err(MigrationError::from)
        .and_then(|r| {
            set_status(MigrationStatus::Active);
            match r {
                IncomingChannel::Stream(r) => {
                    stream::load_vm(machine, &mut BufReader::with_capacity(1 << 20, r), None)
                }
                IncomingChannel::File(f) => stream::load_vm(machine, &mut &f, Some(&f)),
            }
        })
}

/// An incoming migration with the `multifd` capability: the main channel, then the
/// channels its configuration names.
fn incoming_multifd(machine: &ObjectRef, listener: Listener) -> Result<u64, MigrationError> {
    let ms =
        machine_state(machine).ok_or_else(|| MigrationError::Stream("not a machine".into()))?;
    let mut acceptor = ChannelAcceptor {
        listener: Some(listener),
        early: Vec::new(),
        ram: ms.ram(),
        main: None,
        receiver: None,
    };
    let (first, main) = acceptor.accept_main()?;
    acceptor.main = main.try_clone().ok();
    set_status(MigrationStatus::Active);
    let mut r = BufReader::with_capacity(1 << 20, std::io::Read::chain(&first[..], main));
    let result = stream::load_vm_multifd(machine, &mut r, None, Some(&mut acceptor));
    // A channel's failure shut the main stream down: its error is the cause.
    match (result, acceptor.receiver.as_ref().and_then(|r| r.error())) {
        (Err(_), Some(channel_error)) => Err(MigrationError::Multifd(channel_error)),
        (result, _) => result,
    }
}

/// A `unix:` or `tcp:` destination's listening socket.
enum Listener {
    Unix(UnixListener, String),
    Tcp(TcpListener),
}

impl Listener {
    /// The next connection, waiting at most `timeout` (`None`: as long as it takes).
    fn accept(&self, timeout: Option<Duration>) -> Result<Socket, MigrationError> {
        use std::os::fd::AsRawFd;
        if let Some(timeout) = timeout {
            let fd = match self {
                Listener::Unix(l, _) => l.as_raw_fd(),
                Listener::Tcp(l) => l.as_raw_fd(),
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, for the length given.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n == 0 {
                return Err(MigrationError::Multifd(format!(
                    "multifd: the source did not connect all its channels within {} s",
                    timeout.as_secs()
                )));
            }
            if n < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        Ok(match self {
            Listener::Unix(l, _) => Socket::Unix(l.accept()?.0),
            Listener::Tcp(l) => Socket::Tcp(l.accept()?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How long a connection may take to say what it is.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source may take to connect its channels once its configuration is read.
const CHANNELS_TIMEOUT: Duration = Duration::from_secs(30);

/// The first bytes of a new connection, read within [`HANDSHAKE_TIMEOUT`].
fn first_bytes(socket: &mut Socket) -> Result<[u8; 4], MigrationError> {
    let mut first = [0u8; 4];
    socket.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    socket.read_exact(&mut first).map_err(|e| {
        MigrationError::Multifd(format!(
            "multifd: a new connection: {}",
            hw::core::os_error::strerror(&e)
        ))
    })?;
    Ok(first)
}

/// Puts a channel of this migration (its `init` checked against `config`) in its slot.
fn place(
    channels: &mut [Option<Socket>],
    config: MultifdConfig,
    init: multifd::ChannelInit,
    socket: Socket,
) -> Result<(), MigrationError> {
    if init.uuid != config.uuid {
        return Err(MigrationError::Multifd(format!(
            "multifd: received uuid '{}' and expected uuid '{}' for channel {}",
            init.uuid, config.uuid, init.id
        )));
    }
    let count = channels.len();
    let slot = channels.get_mut(init.id as usize).ok_or_else(|| {
        MigrationError::Multifd(format!(
            "multifd: received channel id {} is greater than number of channels {count}",
            init.id
        ))
    })?;
    if slot.is_some() {
        return Err(MigrationError::Multifd(format!(
            "multifd: channel {} connected twice",
            init.id
        )));
    }
    *slot = Some(socket);
    Ok(())
}

/// The destination's side of multifd: sorts the connections into the main channel and
/// the multifd channels (by their first bytes, whatever order they come in), checks the
/// channels belong to this migration and runs their receiver.
struct ChannelAcceptor {
    listener: Option<Listener>,
    /// Channels that connected before the main channel.
    early: Vec<(multifd::ChannelInit, Socket)>,
    ram: std::sync::Arc<vm_memory::GuestMemoryMmap>,
    main: Option<Socket>,
    receiver: Option<multifd::Receiver>,
}

impl ChannelAcceptor {
    /// Waits for the source's main channel; returns it with its first bytes.
    fn accept_main(&mut self) -> Result<([u8; 4], Socket), MigrationError> {
        let listener = self.listener.as_ref().expect("listening");
        loop {
            let mut socket = listener.accept(None)?;
            let first = first_bytes(&mut socket)?;
            if multifd::is_channel(&first) {
                let init = multifd::ChannelInit::read(first, &mut socket)?;
                if self.early.len() >= 255 {
                    return Err(MigrationError::Multifd(
                        "multifd: more than 255 channels before the main one".into(),
                    ));
                }
                self.early.push((init, socket));
                continue;
            }
            socket.set_read_timeout(None)?;
            return Ok((first, socket));
        }
    }
}

impl stream::IncomingMultifd for ChannelAcceptor {
    fn start(&mut self, config: MultifdConfig) -> Result<(), MigrationError> {
        let count = config.channels as usize;
        let mut channels: Vec<Option<Socket>> = (0..count).map(|_| None).collect();
        for (init, socket) in std::mem::take(&mut self.early) {
            place(&mut channels, config, init, socket)?;
        }
        let deadline = Instant::now() + CHANNELS_TIMEOUT;
        let listener = self.listener.as_ref().expect("listening");
        let mut waiting = count - channels.iter().filter(|c| c.is_some()).count();
        while waiting > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut socket = listener.accept(Some(left.max(Duration::from_millis(1))))?;
            let first = first_bytes(&mut socket)?;
            if !multifd::is_channel(&first) {
                return Err(MigrationError::Multifd(
                    "multifd: a second main channel connected".into(),
                ));
            }
            let init = multifd::ChannelInit::read(first, &mut socket)?;
            socket.set_read_timeout(None)?;
            place(&mut channels, config, init, socket)?;
            waiting -= 1;
        }
        // Every channel is here: the socket can go.
        self.listener = None;
        let sockets = channels.into_iter().map(|c| c.expect("placed")).collect();
        let main = self.main.take();
        self.receiver = Some(multifd::Receiver::start(self.ram.clone(), sockets, main)?);
        Ok(())
    }

    fn sync(&mut self, n: u64) -> Result<(), MigrationError> {
        match &self.receiver {
            Some(r) => r.sync(n),
            None => Err(MigrationError::Stream(
                "a multifd sync without channels".into(),
            )),
        }
    }

    fn finish(&mut self) -> u64 {
        self.receiver.as_mut().map_or(0, |r| r.finish())
    }
}

/// QEMU's `migration_is_idle`: no outgoing migration is under way.
pub fn is_idle() -> bool {
    !STATE.lock().status.in_progress()
}

/// QMP `migrate_cancel`.
pub fn cancel() {
    if STATE.lock().status.in_progress() {
        CANCEL.store(true, Ordering::Relaxed);
        set_status(MigrationStatus::Cancelling);
        // A write blocked on a full socket would not look at CANCEL.
        for s in CANCEL_SOCKETS.lock().iter() {
            s.shutdown();
        }
    }
}

/// QMP `query-migrate` (QEMU's `MigrationInfo`): nothing before the first migration.
pub fn query() -> Value {
    let st = STATE.lock();
    if st.status == MigrationStatus::None {
        return json!({});
    }
    let mut info = json!({"status": st.status.name()});
    let p = st.progress;
    let total = st
        .total_ms
        .or_else(|| st.started.map(elapsed_ms))
        .unwrap_or(0);
    let sent_pages = p.normal_pages + p.zero_pages;
    let remaining = if p.passes == 0 {
        p.total_ram.saturating_sub(sent_pages * stream::PAGE_SIZE)
    } else {
        p.remaining
    };
    let mbps = if total > 0 {
        p.transferred as f64 * 8.0 / 1e6 / (total as f64 / 1000.0)
    } else {
        0.0
    };
    info["total-time"] = json!(total);
    info["setup-time"] = json!(st.setup_ms);
    if let Some(d) = st.downtime_ms {
        info["downtime"] = json!(d);
    }
    info["ram"] = json!({
        "transferred": p.transferred,
        "remaining": if st.status == MigrationStatus::Completed { 0 } else { remaining },
        "total": p.total_ram,
        "duplicate": p.zero_pages,
        "normal": p.normal_pages,
        "normal-bytes": p.normal_pages * stream::PAGE_SIZE,
        "dirty-sync-count": p.passes,
        "mbps": mbps,
        "page-size": stream::PAGE_SIZE,
        "dirty-pages-rate": p.dirty_pages_rate,
    });
    if let Some(e) = &st.error {
        info["error-desc"] = json!(e);
    }
    info
}

/// QMP `query-migrate-parameters`.
pub fn parameters() -> Value {
    let p = *PARAMETERS.lock();
    json!({
        "downtime-limit": p.downtime_limit_ms,
        "max-bandwidth": p.max_bandwidth,
        "multifd-channels": p.multifd_channels,
    })
}

/// QMP `migrate-set-parameters`: the values qomvm keeps (others are refused by the
/// command's argument list).
pub fn set_parameters(args: &serde_json::Map<String, Value>) -> Result<(), String> {
    let mut p = PARAMETERS.lock();
    let mut next = *p;
    if let Some(v) = args.get("downtime-limit").and_then(Value::as_i64) {
        if !(0..=2_000_000).contains(&v) {
            return Err(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds"
                    .into(),
            );
        }
        next.downtime_limit_ms = v as u64;
    }
    if let Some(v) = args.get("max-bandwidth").and_then(Value::as_i64) {
        if v < 0 {
            return Err("Parameter 'max_bandwidth' expects an integer in the range of 0 to 18446744073709551615 bytes/second".into());
        }
        next.max_bandwidth = v as u64;
    }
    if let Some(v) = args.get("multifd-channels").and_then(Value::as_i64) {
        if !(1..=255).contains(&v) {
            return Err("Parameter 'multifd-channels' expects a value between 1 and 255".into());
        }
        next.multifd_channels = v as u64;
    }
    *p = next;
    Ok(())
}
