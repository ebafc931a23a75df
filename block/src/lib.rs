//! qomvm's block layer (QEMU's `block/` and `block/block-backend.c`): images opened through
//! the `imago` crate (raw and qcow2, with qcow2 backing chains), QEMU-compatible image
//! locks, and [`BlockBackend`], the handle devices do I/O through.
//!
//! It sits below the devices: it knows nothing of QOM, the machine or the command line.
//! `src/blockdev.rs` turns `-drive`/`-blockdev` into [`OpenOptions`] and adds the result
//! to the table here ([`add_backend`]), where devices and the monitor find it.

pub mod lock;
mod qcow2_l2;
pub mod throttle;

use std::fs::File as StdFile;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use imago::file::File;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions};
use parking_lot::{Mutex, RwLock};
use vm_memory::VolatileSlice;

use lock::{
    ImageLock, PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED,
};

/// A block-layer error, with QEMU's wording.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image (or a backing file) could not be opened.
    #[error("Could not open '{path}': {reason}")]
    Open {
        /// The path.
        path: String,
        /// strerror's text.
        reason: String,
    },
    /// Another process holds a conflicting lock; QEMU's message and hint.
    #[error("{what}\nIs another process using the image [{path}]?")]
    Locked {
        /// `Failed to get "write" lock`...
        what: String,
        /// The image.
        path: String,
    },
    /// A write to a read-only backend.
    #[error("Block node is read-only")]
    ReadOnly,
    /// A request past the end of the image.
    #[error("Request out of range: {offset} + {len} > {size}")]
    OutOfRange {
        /// Where it starts.
        offset: u64,
        /// How long it is.
        len: u64,
        /// The image's size.
        size: u64,
    },
    /// Something imago or the image refuses (an unknown backing format...).
    #[error("{0}")]
    Invalid(String),
    /// A reference (`file=NODE`, `backing=NODE`) to a node that does not exist (QEMU's
    /// `bdrv_lookup_bs`).
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NodeNotFound(String),
    /// The backing chain could not be opened.
    #[error("Could not open backing file: {0}")]
    Backing(Box<BlockError>),
    /// A node that another node already uses as its child, and which it does not share
    /// (QEMU's permission conflict; qomvm gives each node one user).
    #[error(transparent)]
    Conflict(Box<PermissionConflict>),
    /// A node a `-drive` (or a device) uses, asked for as another node's child.
    #[error("Node '{0}' is in use and cannot become another node's child")]
    InUse(String),
    /// A resize of an image opened read-only (QEMU's `bdrv_co_truncate`).
    #[error("Image is read-only")]
    ImageReadOnly,
    /// A device that does not let its drive change size uses the node (QEMU's permission
    /// conflict over `resize`, which floppy and CD drives do not share).
    #[error("Permission conflict on node '{node}': permissions 'resize' are both required by an unnamed block device (uses node '{node}' as 'root' child) and unshared by block device '{user}' (uses node '{node}' as 'root' child).")]
    ResizeConflict {
        /// The node to resize.
        node: String,
        /// The backend name or device that holds it.
        user: String,
    },
    /// `aio=native` without O_DIRECT (QEMU's file-posix check).
    #[error("aio=native was specified, but it requires cache.direct=on, which was not specified.")]
    AioNativeNeedsDirect,
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// QEMU's permission conflict between two users of a node.
#[derive(Debug, thiserror::Error)]
#[error("Permission conflict on node '{node}': permissions '{perms}' are both required by node '{user}' (uses node '{node}' as '{role}' child) and unshared by node '{new_user}' (uses node '{node}' as '{new_role}' child).")]
pub struct PermissionConflict {
    /// The node asked for.
    pub node: String,
    /// The permissions its user holds (`write, resize`).
    pub perms: String,
    /// The node using it.
    pub user: String,
    /// As which child (`file`, `backing`).
    pub role: &'static str,
    /// The node that asks for it.
    pub new_user: String,
    /// As which child.
    pub new_role: &'static str,
}

/// strerror's text of an I/O error, without Rust's ` (os error N)`.
pub fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl BlockError {
    /// QEMU's `Could not open 'PATH': REASON`.
    pub fn open(path: &Path, e: io::Error) -> Self {
        BlockError::Open {
            path: path.display().to_string(),
            reason: strerror(&e),
        }
    }
}

/// An image format (QEMU's format drivers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `raw`.
    Raw,
    /// `qcow2`.
    Qcow2,
}

impl Format {
    /// The driver's name (`drv` in QMP).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// The format for a driver name.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

/// QEMU's `cache=` modes: `(writeback, direct, no_flush)` of QMP's `BlockdevCacheInfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `none`: O_DIRECT, writeback.
    None,
    /// `writeback` (the default).
    #[default]
    Writeback,
    /// `writethrough`: each write is flushed.
    Writethrough,
    /// `directsync`: O_DIRECT and each write flushed.
    Directsync,
    /// `unsafe`: flushes are ignored.
    Unsafe,
}

impl CacheMode {
    /// The `cache=` value names, in QEMU's order.
    pub const NAMES: &'static [&'static str] =
        &["none", "writeback", "writethrough", "directsync", "unsafe"];

    /// Parses a `cache=` value.
    pub fn from_name(name: &str) -> Option<CacheMode> {
        Some(match name {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }
    /// Whether writes complete before reaching stable storage.
    pub fn writeback(self) -> bool {
        !matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
    /// Whether the host page cache is bypassed (O_DIRECT).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
    /// Whether flushes are ignored.
    pub fn no_flush(self) -> bool {
        self == CacheMode::Unsafe
    }
}

/// `discard=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// `ignore` (the default): discard requests do nothing.
    #[default]
    Ignore,
    /// `unmap`: discard requests free space in the image.
    Unmap,
}

/// `detect-zeroes=`: whether writes of zeroes become zero writes (QEMU's
/// `BlockdevDetectZeroesOptions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// `off` (the default): written as they are.
    #[default]
    Off,
    /// `on`: a buffer of zeroes is written as `write_zeroes` (qcow2 zero clusters).
    On,
    /// `unmap`: as `on`, and the range is discarded too where `discard=unmap` allows it.
    Unmap,
}

impl DetectZeroes {
    /// The value names, in QEMU's order.
    pub const NAMES: &'static [&'static str] = &["off", "on", "unmap"];

    /// Parses a `detect-zeroes=` value.
    pub fn from_name(name: &str) -> Option<DetectZeroes> {
        Some(match name {
            "off" => DetectZeroes::Off,
            "on" => DetectZeroes::On,
            "unmap" => DetectZeroes::Unmap,
            _ => return None,
        })
    }

    /// The name QMP reports (`detect_zeroes`).
    pub fn name(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// `backing=` of a qcow2 node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum BackingOption {
    /// Not given: the backing file the image's header names, if any.
    #[default]
    FromImage,
    /// `"backing": null`: no backing image (unallocated clusters read as zeroes).
    Null,
    /// `backing=NODE`: an existing node, which becomes this node's backing child.
    Node(String),
}

/// `aio=`: how I/O is submitted. qomvm's I/O is synchronous on its I/O threads whatever is
/// chosen; the value is kept for what QEMU reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AioMode {
    /// `threads` (the default).
    #[default]
    Threads,
    /// `native` (Linux AIO).
    Native,
    /// `io_uring`.
    IoUring,
}

/// How to open one image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The image's path.
    pub filename: PathBuf,
    /// Its format; `None` probes (qcow2 by its magic, raw otherwise).
    pub format: Option<Format>,
    /// `readonly=on`.
    pub read_only: bool,
    /// `auto-read-only=on` on a `driver=file` node without `read-only`: it opens read-only,
    /// and a format node over it that writes opens it for writing (QEMU's file-posix
    /// takes the write permission only when a parent asks for it).
    pub auto_read_only: bool,
    /// `cache=`.
    pub cache: CacheMode,
    /// `discard=`.
    pub discard: DiscardMode,
    /// `aio=`.
    pub aio: AioMode,
    /// `detect-zeroes=`.
    pub detect_zeroes: DetectZeroes,
    /// `file=NODE`: the file child is an existing `driver=file` node, whose filename,
    /// `aio` and `cache.direct` the image is opened with; `filename` is then ignored.
    pub file_ref: Option<String>,
    /// `backing=`.
    pub backing: BackingOption,
    /// The node is the file itself (QEMU's `driver=file`, no format layer on it): raw
    /// data, reported as driver `file`.
    pub protocol_only: bool,
    /// The name of the file node under the format node (`file.node-name`); `None` gets an
    /// automatic one.
    pub file_node_name: Option<String>,
    /// The file's `locking=` (on and auto lock; off neither locks nor checks locks).
    pub locking: bool,
}

impl OpenOptions {
    /// Read-write, writeback, the format probed.
    pub fn new(filename: impl Into<PathBuf>) -> Self {
        OpenOptions {
            filename: filename.into(),
            format: None,
            read_only: false,
            auto_read_only: false,
            cache: CacheMode::default(),
            discard: DiscardMode::default(),
            aio: AioMode::default(),
            detect_zeroes: DetectZeroes::default(),
            file_ref: None,
            backing: BackingOption::default(),
            protocol_only: false,
            file_node_name: None,
            locking: true,
        }
    }
}

/// One image of a chain as QMP's `ImageInfo` describes it.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// The format node's name.
    pub node_name: String,
    /// The name of the file node under it.
    pub file_node_name: String,
    /// The path it was opened by.
    pub filename: String,
    /// Its format.
    pub format: Format,
    /// Its guest-visible size.
    pub virtual_size: u64,
    /// Its backing file as the header names it.
    pub backing_filename: Option<String>,
    /// The backing file's path as opened.
    pub full_backing_filename: Option<String>,
    /// The backing file's format as the header names it.
    pub backing_format: Option<String>,
    /// The backing image.
    pub backing: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    /// How many backing images lie below this one.
    pub fn backing_depth(&self) -> u64 {
        self.backing.as_ref().map_or(0, |b| 1 + b.backing_depth())
    }
}

/// The qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// QEMU's `raw_probe`/`qcow2_probe`: qcow2 by its magic, raw otherwise.
fn probe(path: &Path) -> Result<Format, BlockError> {
    let mut head = [0u8; 4];
    let mut f = StdFile::open(path).map_err(|e| BlockError::open(path, e))?;
    let n = f.read(&mut head).map_err(|e| BlockError::open(path, e))?;
    Ok(if n == 4 && head == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// An opened image: the imago chain and the locks its files hold.
struct OpenedImage {
    access: FormatAccess<File>,
    info: ImageInfo,
    locks: Vec<ImageLock>,
    /// A `backing=NODE` node this image took: its name and how to open it again.
    taken_backing: Option<(String, OpenOptions)>,
}

/// QEMU's permissions for a guest device's image (`blkconf_apply_backend_options`), and
/// those its format layer adds on the file (`bdrv_default_perms_for_storage`: metadata
/// writes and growth).
fn top_perms(format: Format, read_only: bool) -> (u32, u32) {
    let mut perm = PERM_CONSISTENT_READ;
    if !read_only {
        perm |= PERM_WRITE;
        if format == Format::Qcow2 {
            perm |= PERM_RESIZE;
        }
    }
    (perm, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED)
}

/// An inactive image claims no permission and shares all: the active side goes on
/// writing (QEMU's `bdrv_inactivate_recurse` drops the permissions).
const INACTIVE_PERMS: (u32, u32) = (0, PERM_ALL);

/// QEMU's `bdrv_default_perms_for_cow`: a backing file is read, and others may read it or
/// write without changing it.
const BACKING_PERMS: (u32, u32) = (
    PERM_CONSISTENT_READ,
    PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
);

/// Opens `path` in `format` (read-only backing layers included) and locks every file with
/// `perms` (`(perm, shared)`), writable if they include write; `top_lock`, if given, is
/// the lock to change to them rather than a new one.
/// `backing` is the node's `backing=` option (qcow2 only); layers below the top take the
/// backing their header names.
fn open_image(
    path: &Path,
    format: Format,
    storage: &StorageOpenOptions,
    perms: (u32, u32),
    names: (String, String),
    backing: &BackingOption,
    top_lock: Option<ImageLock>,
) -> Result<OpenedImage, BlockError> {
    let (node_name, file_node_name) = names;
    // Opened for writing exactly when it takes the write permission.
    let writable = perms.0 & PERM_WRITE != 0;
    let top_lock = match top_lock {
        Some(lock) => {
            lock.update(path, perms.0, perms.1)?;
            lock
        }
        None => ImageLock::acquire(path, perms.0, perms.1)?,
    };
    let mut locks = vec![top_lock];
    let open_err = |e: io::Error| BlockError::open(path, e);
    let filename = path.display().to_string();
    match format {
        Format::Raw => {
            let raw = Raw::<File>::builder_path(path)
                .write(writable)
                .storage_open_options(storage.clone())
                .open(PermissiveImplicitOpenGate::default())
                .map_err(open_err)?;
            let access = FormatAccess::new(raw);
            let info = ImageInfo {
                node_name,
                file_node_name,
                filename,
                format,
                virtual_size: access.size(),
                backing_filename: None,
                full_backing_filename: None,
                backing_format: None,
                backing: None,
            };
            Ok(OpenedImage {
                access,
                info,
                locks,
                taken_backing: None,
            })
        }
        Format::Qcow2 => {
            // The backing chain is opened here rather than by imago, so that each layer
            // takes its locks and is described for the monitor.
            let mut qcow2 = Qcow2::<File>::builder_path(path)
                .write(writable)
                .storage_open_options(storage.clone())
                .backing(None)
                .open(PermissiveImplicitOpenGate::default())
                .map_err(open_err)?;
            let backing_filename = qcow2.implicit_backing_file().cloned();
            let backing_format = qcow2.implicit_backing_format().cloned();
            let below = match (backing, &backing_filename) {
                (BackingOption::Null, _) | (BackingOption::FromImage, None) => None,
                (BackingOption::FromImage, Some(name)) => {
                    let full = match Path::new(name) {
                        p if p.is_absolute() => p.to_path_buf(),
                        p => path.parent().unwrap_or(Path::new("")).join(p),
                    };
                    let bformat = match backing_format.as_deref() {
                        Some(f) => Format::from_name(f)
                            .ok_or_else(|| BlockError::Invalid(format!("Unknown driver '{f}'")))?,
                        None => probe(&full)?,
                    };
                    Some(open_image(
                        &full,
                        bformat,
                        &storage.clone().write(false),
                        BACKING_PERMS,
                        (auto_node_name(), auto_node_name()),
                        &BackingOption::FromImage,
                        None,
                    )?)
                }
                // Taken only now that the top image opened, so a failure above leaves the
                // node where it was.
                (BackingOption::Node(name), _) => Some(
                    take_node_for_backing(name, &node_name)
                        .map_err(|e| BlockError::Backing(Box::new(e)))?,
                ),
            };
            let mut full_backing_filename = None;
            let mut backing_info = None;
            let mut taken_backing = None;
            if let Some(mut below) = below {
                if matches!(backing, BackingOption::Node(_)) {
                    taken_backing = below.taken_backing.take();
                }
                locks.extend(below.locks);
                qcow2.set_backing(Some(below.access));
                full_backing_filename = Some(below.info.filename.clone());
                backing_info = Some(Box::new(below.info));
            }
            let access = FormatAccess::new(qcow2);
            if writable {
                let added = qcow2_l2::prepare_l2_tables(&access, path).map_err(open_err)?;
                if added > 0 {
                    log::debug!("{filename}: {added} L2 tables prepared before use");
                }
            }
            let info = ImageInfo {
                node_name,
                file_node_name,
                filename,
                format,
                virtual_size: access.size(),
                backing_filename,
                full_backing_filename,
                backing_format,
                backing: backing_info,
            };
            Ok(OpenedImage {
                access,
                info,
                locks,
                taken_backing,
            })
        }
    }
}

/// A request type, as QEMU's I/O accounting counts them (`BlockAcctType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes (zero writes included).
    Write,
    /// Flushes.
    Flush,
    /// Discards.
    Unmap,
}

/// The counters of one request type (QEMU's `BlockAcctStats` arrays).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoTypeStats {
    /// Bytes of the requests that succeeded.
    pub bytes: u64,
    /// Requests that succeeded.
    pub operations: u64,
    /// Requests that failed with an I/O error.
    pub failed: u64,
    /// Requests refused as invalid (out of range, a write to a read-only node).
    pub invalid: u64,
    /// Time spent in the requests that succeeded (and in failed ones, with
    /// `account_failed`), in ns.
    pub total_time_ns: u64,
    /// Requests merged into others (qomvm merges none).
    pub merged: u64,
}

/// A backend's I/O statistics (QMP's `BlockDeviceStats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Reads.
    pub rd: IoTypeStats,
    /// Writes.
    pub wr: IoTypeStats,
    /// Flushes.
    pub flush: IoTypeStats,
    /// Discards.
    pub unmap: IoTypeStats,
    /// The end of the highest write (or discard) so far, in bytes.
    pub wr_highest_offset: u64,
    /// Time since the last request, in ns; `None` before the first.
    pub idle_time_ns: Option<u64>,
    /// Whether invalid requests count as accesses (QEMU's `stats-account-invalid`).
    pub account_invalid: bool,
    /// Whether failed requests count their time (QEMU's `stats-account-failed`).
    pub account_failed: bool,
}

/// What the `file` protocol node itself saw (QMP's `BlockStatsSpecificFile`, and the file
/// node's `wr_highest_offset`). Only raw images have their data there byte for byte; for
/// qcow2 the format's own writes to the file are not counted and these stay zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStats {
    /// `discard-nb-ok`.
    pub discard_nb_ok: u64,
    /// `discard-nb-failed`.
    pub discard_nb_failed: u64,
    /// `discard-bytes-ok`.
    pub discard_bytes_ok: u64,
    /// The end of the highest write to the file.
    pub wr_highest_offset: u64,
}

#[derive(Default)]
struct Acct {
    types: [IoTypeStats; 4],
    last_access: Option<Instant>,
    wr_highest_offset: u64,
    file: FileStats,
}

impl Acct {
    fn slot(&mut self, kind: IoType) -> &mut IoTypeStats {
        &mut self.types[kind as usize]
    }
}

/// [`BlockBackend::lift_limits`]'s guard: the limits apply again when it goes.
pub struct LimitsLifted(Arc<BlockBackend>);

impl Drop for LimitsLifted {
    fn drop(&mut self) {
        self.0.limits_lifted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a device that lets its drive be resized does after a resize (tell the guest).
pub type ResizeHandler = std::sync::Arc<dyn Fn() + Send + Sync>;

/// A handle devices do I/O through (QEMU's `BlockBackend` with its root node).
///
/// Requests are synchronous, on the calling thread (a device's I/O thread), and counted
/// as QEMU's `block_acct_*` count them.
pub struct BlockBackend {
    /// QEMU's `BlockBackend` name: the `-drive` id, or the name of the CD drive's backend
    /// the node is the medium of; empty for a `-blockdev` node of its own.
    id: RwLock<String>,
    node_name: String,
    opts: OpenOptions,
    /// Raw was guessed, not asked for: writes to sector 0 may not make it look like another
    /// format (QEMU's `raw_probe` restriction).
    probed_raw: bool,
    info: ImageInfo,
    /// imago's access; discard needs it exclusively.
    access: RwLock<FormatAccess<File>>,
    locks: Mutex<Vec<ImageLock>>,
    /// QEMU's `BDRV_O_INACTIVE`: opened for a migration's destination, or handed over by
    /// its source. The image is open read-only and its locks claim nothing, so the other
    /// side keeps writing; [`BlockBackend::activate`] takes it over.
    inactive: AtomicBool,
    acct: Mutex<Acct>,
    /// The device using it (QEMU's `blk_attach_dev`), by its id or QOM path.
    attached: Mutex<Option<String>>,
    /// What the device does when the image changes size; a device without one does not
    /// let it change (QEMU's `BlockDevOps.resize_cb` and the `resize` permission).
    resize_handler: Mutex<Option<ResizeHandler>>,
    /// The throttle group whose I/O limits apply, if any (QEMU's
    /// `throttle_group_member`).
    throttle: Mutex<Option<Arc<throttle::ThrottleGroup>>>,
    /// Counts changes of `throttle`: a waiting request whose group changed goes.
    throttle_generation: AtomicU64,
    /// Drains in progress (QEMU's `io_limits_disabled`): requests then ignore the limits.
    limits_lifted: AtomicUsize,
    /// A `-drive` with an interface (`if=ide`, `if=virtio`) made its device itself.
    auto_connected: AtomicBool,
    /// Owned by the device's backend rather than the monitor (QEMU: a BDS opened by
    /// `blockdev-change-medium`): removing the medium closes it.
    blk_owned: AtomicBool,
    /// The `driver=file` node a `file=NODE` reference took, whole (its descriptor holds
    /// the image's locks): deleting this node (`blockdev-del`) gives it back.
    taken_file: Mutex<Option<Box<BlockBackend>>>,
    /// A node a `backing=NODE` reference took, as it was opened (its image became this
    /// node's backing chain): deleting this node opens it again under its name.
    taken_backing: Mutex<Option<Box<(String, OpenOptions)>>>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("id", &*self.id.read())
            .field("node_name", &self.node_name)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// QEMU's automatic node names, `#block123`.
static NODE_COUNTER: AtomicU32 = AtomicU32::new(1);

/// Whether images open inactive now (QEMU's `BDRV_O_INACTIVE` while in `inmigrate`).
static OPEN_INACTIVE: AtomicBool = AtomicBool::new(false);

/// Images opened from now on open inactive (`on`: the VM waits for an incoming
/// migration), or active again.
pub fn set_open_inactive(on: bool) {
    OPEN_INACTIVE.store(on, Ordering::SeqCst);
}

/// QEMU's `bdrv_activate_all`: every inactive image is taken over (reopened with its
/// locks), and images opened later are active. The first failure is returned.
pub fn activate_all() -> Result<(), BlockError> {
    set_open_inactive(false);
    backends().iter().try_for_each(|b| b.activate())
}

/// QEMU's `bdrv_inactivate_all`, at the end of an outgoing migration: every image is
/// flushed and gives up its write locks, so the destination can take it over.
pub fn inactivate_all() -> Result<(), BlockError> {
    backends().iter().try_for_each(|b| b.inactivate())
}

/// A fresh automatic node name.
pub fn auto_node_name() -> String {
    format!("#block{:03}", NODE_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Whether a failed request was refused before reaching the image (QEMU's "invalid").
fn is_invalid(e: &BlockError) -> bool {
    matches!(e, BlockError::OutOfRange { .. } | BlockError::ReadOnly)
}

impl BlockBackend {
    /// Opens an image. `id` is the backend's name (`-drive id=`, empty for a `-blockdev`
    /// node), `node_name` its root node's. Returns the image's locks' and open's errors
    /// with QEMU's text. If the format is probed as raw, `warn` gets QEMU's warning.
    ///
    /// A `file=NODE` reference takes that `driver=file` node out of the table: it becomes
    /// this node's file child (it is given back if the open fails). A `backing=NODE`
    /// reference does the same with the node that becomes the backing child.
    pub fn open(
        id: &str,
        node_name: &str,
        mut opts: OpenOptions,
        warn: impl FnOnce(&str),
    ) -> Result<BlockBackend, BlockError> {
        let Some(name) = opts.file_ref.clone() else {
            return Self::open_image_node(id, node_name, opts, warn, None);
        };
        let (index, mut file) = take_file_node(&name, node_name)?;
        if file.opts.read_only && !opts.read_only && !file.opts.auto_read_only {
            put_back(index, file);
            return Err(BlockError::ReadOnly);
        }
        opts.filename = file.opts.filename.clone();
        opts.aio = file.opts.aio;
        if file.opts.cache.direct() && !opts.cache.direct() {
            opts.cache = if opts.cache.writeback() {
                CacheMode::None
            } else {
                CacheMode::Directsync
            };
        }
        opts.file_node_name = Some(file.node_name.clone());
        // The format node locks the file through the file node's own open file
        // description, so the file is never unlocked in between.
        let lock = match file.locks.get_mut().first().map(ImageLock::try_clone) {
            Some(Ok(lock)) => Some(lock),
            Some(Err(e)) => {
                put_back(index, file);
                return Err(BlockError::Io(e));
            }
            None => None,
        };
        match Self::open_image_node(id, node_name, opts, warn, lock) {
            Ok(backend) => {
                *backend.taken_file.lock() = Some(Box::new(file));
                Ok(backend)
            }
            Err(e) => {
                // Back to the file node's own permissions, and back in the table.
                let (perm, shared) = top_perms(Format::Raw, file.opts.read_only);
                if let Some(lock) = file.locks.get_mut().first() {
                    if let Err(e) = lock.update(&file.opts.filename, perm, shared) {
                        log::warn!("node '{name}' keeps other locks: {e}");
                    }
                }
                put_back(index, file);
                Err(e)
            }
        }
    }

    fn open_image_node(
        id: &str,
        node_name: &str,
        opts: OpenOptions,
        warn: impl FnOnce(&str),
        top_lock: Option<ImageLock>,
    ) -> Result<BlockBackend, BlockError> {
        let path = opts.filename.clone();
        // QEMU opens the file before locking it, so a missing file is reported as such.
        let meta = std::fs::metadata(&path).map_err(|e| BlockError::open(&path, e))?;
        // QEMU's file driver (its host_device driver, for block devices, qomvm lacks).
        if !meta.is_file() {
            return Err(BlockError::Invalid(format!(
                "'file' driver requires '{}' to be a regular file",
                path.display()
            )));
        }
        // QEMU's raw_open_common: native AIO needs O_DIRECT.
        if opts.aio == AioMode::Native && !opts.cache.direct() {
            return Err(BlockError::AioNativeNeedsDirect);
        }
        let (format, probed_raw) = match opts.format {
            Some(f) => (f, false),
            None => {
                let f = probe(&path)?;
                if f == Format::Raw {
                    warn(&format!(
                        "Image format was not specified for '{}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.",
                        path.display()
                    ));
                }
                (f, f == Format::Raw)
            }
        };
        let inactive = OPEN_INACTIVE.load(Ordering::SeqCst);
        let storage = StorageOpenOptions::new()
            .write(!opts.read_only && !inactive)
            .direct(opts.cache.direct());
        let perms = if inactive {
            INACTIVE_PERMS
        } else {
            top_perms(format, opts.read_only)
        };
        // `locking=off`: the file's descriptor without locks, which stays so.
        let top_lock = match top_lock {
            None if !opts.locking => Some(ImageLock::acquire_if(&path, 0, PERM_ALL, false)?),
            lock => lock,
        };
        let image = open_image(
            &path,
            format,
            &storage,
            perms,
            (
                node_name.to_string(),
                opts.file_node_name.clone().unwrap_or_else(auto_node_name),
            ),
            &opts.backing,
            top_lock,
        )?;
        Ok(BlockBackend {
            id: RwLock::new(id.to_string()),
            node_name: node_name.to_string(),
            opts: OpenOptions {
                format: Some(format),
                file_node_name: Some(image.info.file_node_name.clone()),
                ..opts
            },
            probed_raw,
            info: image.info,
            access: RwLock::new(image.access),
            locks: Mutex::new(image.locks),
            inactive: AtomicBool::new(inactive),
            acct: Mutex::new(Acct::default()),
            attached: Mutex::new(None),
            resize_handler: Mutex::new(None),
            throttle: Mutex::new(None),
            throttle_generation: AtomicU64::new(0),
            limits_lifted: AtomicUsize::new(0),
            auto_connected: AtomicBool::new(false),
            blk_owned: AtomicBool::new(false),
            taken_file: Mutex::new(None),
            taken_backing: Mutex::new(image.taken_backing.map(Box::new)),
        })
    }

    /// The backend's name (`-drive id=`); empty for a `-blockdev` node.
    pub fn id(&self) -> String {
        self.id.read().clone()
    }

    /// Whether the backend is named `name` (never an empty name).
    fn has_id(&self, name: &str) -> bool {
        let id = self.id.read();
        !id.is_empty() && *id == name
    }

    /// Names the node after the drive it is the medium of (QEMU's `blk_insert_bs` into a
    /// named backend), or takes the name away again (`""`).
    pub fn set_id(&self, name: &str) {
        *self.id.write() = name.to_string();
    }
    /// The root node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
    /// The options it was opened with (the format and the file node's name resolved).
    pub fn options(&self) -> &OpenOptions {
        &self.opts
    }
    /// The image chain.
    pub fn image_info(&self) -> &ImageInfo {
        &self.info
    }
    /// The format.
    pub fn format(&self) -> Format {
        self.info.format
    }
    /// The root node's driver as QMP's `drv` names it: the format, or `file` for a
    /// `-blockdev driver=file` node.
    pub fn driver_name(&self) -> &'static str {
        if self.opts.protocol_only {
            "file"
        } else {
            self.info.format.name()
        }
    }
    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.opts.read_only
    }
    /// The guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        self.access.read().size()
    }

    /// QEMU's `blk_attach_dev`: records the device (its id, or QOM path) that uses this
    /// backend, which `query-block` and `query-blockstats` report as `qdev`. A backend has
    /// one device.
    pub fn attach_dev(&self, qdev: &str) -> Result<(), BlockError> {
        let mut attached = self.attached.lock();
        if attached.is_some() {
            let id = self.id();
            let name = if id.is_empty() { &self.node_name } else { &id };
            return Err(drive_in_use(
                name,
                self.auto_connected.load(Ordering::Relaxed),
            ));
        }
        *attached = Some(qdev.to_string());
        Ok(())
    }

    /// Marks the backend as its device's own medium (QEMU's BDS that only the device's
    /// `BlockBackend` holds): taking it out closes it.
    pub fn set_blk_owned(&self) {
        self.blk_owned.store(true, Ordering::Relaxed);
    }

    /// Whether taking the medium out closes it: a `-drive`'s image, or one opened for the
    /// device (`blockdev-change-medium`); a `-blockdev` node stays for `blockdev-del`.
    pub fn is_blk_owned(&self) -> bool {
        self.blk_owned.load(Ordering::Relaxed)
    }
    /// Marks the backend as a `-drive` whose interface made its device (QEMU's legacy
    /// `DriveInfo` with a type other than `IF_NONE`): another device's claim is refused
    /// with a hint.
    pub fn set_auto_connected(&self) {
        self.auto_connected.store(true, Ordering::Relaxed);
    }

    /// The attached device lets the image change size and wants `handler` called after
    /// each change (`None` when it goes: QEMU's `blk_set_dev_ops` with a `resize_cb`).
    pub fn set_resize_handler(&self, handler: Option<ResizeHandler>) {
        *self.resize_handler.lock() = handler;
    }

    /// QEMU's `block_resize` (`blk_co_truncate` through a new user that asks for the
    /// `resize` permission): the image grows or shrinks to `size` bytes, new space reading
    /// as zeroes; then the attached device hears of it. Refused for read-only images, for
    /// devices that do not share the permission (floppies, CDs) and, in qcow2, for sizes
    /// that are not a multiple of 512.
    pub fn truncate(&self, size: u64) -> Result<(), BlockError> {
        // QEMU asks for the permission first, then truncates (which checks read-only).
        let handler = {
            let attached = self.attached.lock();
            let handler = self.resize_handler.lock().clone();
            if let (Some(dev), None) = (attached.as_ref(), &handler) {
                let id = self.id();
                return Err(BlockError::ResizeConflict {
                    node: self.node_name.clone(),
                    user: if id.is_empty() { dev.clone() } else { id },
                });
            }
            handler
        };
        // QEMU's BDRV_MAX_LENGTH (INT64_MAX rounded down to a GiB), checked before
        // read-only as `bdrv_co_truncate` does.
        const MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);
        if size > MAX_LENGTH {
            return Err(BlockError::Invalid(format!(
                "offset({size}) exceeds maximum({MAX_LENGTH})"
            )));
        }
        if self.opts.read_only || self.is_inactive() {
            return Err(BlockError::ImageReadOnly);
        }
        if self.info.format == Format::Qcow2 && !size.is_multiple_of(512) {
            return Err(BlockError::Invalid(
                "The new size must be a multiple of 512".into(),
            ));
        }
        let resized = {
            let mut access = self.access.write();
            let current = access.size();
            let resized = if size > current {
                // A backing file longer than the old size must not show through.
                let mode = if self.info.backing.is_some() {
                    imago::format::PreallocateMode::Zero
                } else {
                    imago::format::PreallocateMode::None
                };
                access.resize_grow(size, mode)
            } else if size < current {
                access.resize_shrink(size)
            } else {
                Ok(())
            };
            resized.and_then(|()| access.flush())
        };
        // In QEMU's words: qcow2's L1 table limit, file-posix's ftruncate.
        resized.map_err(|e| match self.info.format {
            Format::Qcow2 if e.to_string().contains("L1 table would become too big") => {
                BlockError::Invalid("Failed to grow the L1 table: File too large".into())
            }
            Format::Raw => BlockError::Invalid(format!("Could not resize file: {}", strerror(&e))),
            _ => BlockError::Io(e),
        })?;
        if let Some(handler) = handler {
            handler();
        }
        Ok(())
    }

    /// QEMU's `blk_set_io_limits` after `blk_io_limits_enable`/`_update_group`: the backend
    /// joins throttle group `group` (if not in one, or `move_to` says so) and the group
    /// takes `config`.
    pub fn set_io_limits(&self, group: &str, move_to: bool, config: throttle::ThrottleConfig) {
        let mut current = self.throttle.lock();
        let (group, left) = match &*current {
            Some(g) if !move_to || g.name() == group => (g.clone(), None),
            old => (throttle::ThrottleGroup::get(group), old.clone()),
        };
        group.set_config(config);
        *current = Some(group);
        drop(current);
        if let Some(left) = left {
            self.throttle_generation.fetch_add(1, Ordering::SeqCst);
            left.wake_all();
        }
    }

    /// The throttle group the backend is in.
    pub fn throttle_group(&self) -> Option<Arc<throttle::ThrottleGroup>> {
        self.throttle.lock().clone()
    }

    /// Joins `group` under the limits the group has now (a drive's medium put back: in
    /// QEMU the drive never left the group, whose limits its other members may have
    /// changed meanwhile).
    pub fn join_throttle_group(&self, group: Arc<throttle::ThrottleGroup>) {
        let left = self.throttle.lock().replace(group);
        if let Some(left) = left {
            self.throttle_generation.fetch_add(1, Ordering::SeqCst);
            left.wake_all();
        }
    }

    /// QEMU's `blk_io_limits_disable`: the backend leaves its throttle group; its waiting
    /// requests go.
    pub fn disable_io_limits(&self) {
        let left = self.throttle.lock().take();
        self.throttle_generation.fetch_add(1, Ordering::SeqCst);
        if let Some(left) = left {
            left.wake_all();
        }
    }

    /// Lifts the I/O limits while the guard lives (a device waiting for its requests: a
    /// stop, a reset, a migration), so that waiting requests go at once (QEMU's drain sets
    /// `io_limits_disabled`).
    pub fn lift_limits(self: &Arc<Self>) -> LimitsLifted {
        self.limits_lifted.fetch_add(1, Ordering::SeqCst);
        let group = self.throttle.lock().clone();
        if let Some(group) = group {
            group.wake_all();
        }
        LimitsLifted(self.clone())
    }

    /// Whether I/O limits apply: a request may then wait, and devices issue it where
    /// waiting holds up nothing else (their thread pool, not their event loop).
    pub fn is_throttled(&self) -> bool {
        self.throttle.lock().is_some()
    }

    /// The throttle group and its limits, while the backend is in one.
    pub fn io_limits(&self) -> Option<(String, throttle::ThrottleConfig)> {
        let group = self.throttle.lock().clone()?;
        Some((group.name().to_string(), group.config()))
    }

    /// QEMU's `blk_detach_dev` (at unrealize): the device and its resize handler go.
    pub fn detach_dev(&self) {
        *self.attached.lock() = None;
        *self.resize_handler.lock() = None;
    }
    /// The device using it, if any.
    pub fn attached_dev(&self) -> Option<String> {
        self.attached.lock().clone()
    }

    /// The I/O statistics so far.
    pub fn stats(&self) -> BlockStats {
        let acct = self.acct.lock();
        let [rd, wr, flush, unmap] = acct.types;
        BlockStats {
            rd,
            wr,
            flush,
            unmap,
            wr_highest_offset: acct.wr_highest_offset,
            idle_time_ns: acct
                .last_access
                .map(|t| u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            account_invalid: true,
            account_failed: true,
        }
    }

    /// What the root's file node saw (see [`FileStats`]).
    pub fn file_stats(&self) -> FileStats {
        self.acct.lock().file
    }

    /// Counts a request a device refused before it reached the backend (QEMU's
    /// `block_acct_invalid`: a misaligned sector, a bad request type...).
    pub fn account_invalid(&self, kind: IoType) {
        let mut acct = self.acct.lock();
        acct.slot(kind).invalid += 1;
        acct.last_access = Some(Instant::now());
    }

    /// Runs request `f` of `kind` over `bytes` at `offset`, counting it.
    fn accounted(
        &self,
        kind: IoType,
        offset: u64,
        bytes: u64,
        f: impl FnOnce() -> Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        let start = Instant::now();
        // Reads and writes wait for the I/O limits (QEMU's throttle intercept), within
        // the request's time as QEMU accounts it.
        if matches!(kind, IoType::Read | IoType::Write) {
            let group = self.throttle.lock().clone();
            if let Some(group) = group {
                let generation = self.throttle_generation.load(Ordering::SeqCst);
                let member = self as *const BlockBackend as usize;
                group.intercept(member, kind == IoType::Write, bytes, || {
                    self.limits_lifted.load(Ordering::SeqCst) == 0
                        && self.throttle_generation.load(Ordering::SeqCst) == generation
                });
            }
        }
        let result = f();
        let now = Instant::now();
        let ns = u64::try_from(now.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
        let mut acct = self.acct.lock();
        match &result {
            Ok(()) => {
                let slot = acct.slot(kind);
                slot.bytes += bytes;
                slot.operations += 1;
                slot.total_time_ns += ns;
                if matches!(kind, IoType::Write) {
                    acct.wr_highest_offset = acct.wr_highest_offset.max(offset + bytes);
                    if self.format() == Format::Raw {
                        acct.file.wr_highest_offset =
                            acct.file.wr_highest_offset.max(offset + bytes);
                    }
                }
            }
            Err(e) if is_invalid(e) => acct.slot(kind).invalid += 1,
            Err(_) => {
                let slot = acct.slot(kind);
                slot.failed += 1;
                slot.total_time_ns += ns;
            }
        }
        acct.last_access = Some(now);
        result
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        // An inactive image is the other side's (a migration's): it must not change here.
        if self.opts.read_only || self.is_inactive() {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        self.accounted(IoType::Read, offset, len, || {
            self.check_range(offset, len)?;
            self.access.read().read(buf, offset)?;
            Ok(())
        })
    }

    /// Writes `buf` at `offset`; under writethrough caching, flushes too. With
    /// `detect-zeroes=on|unmap` a buffer of zeroes is written as zeroes (unmapped under
    /// `detect-zeroes=unmap` with `discard=unmap`), as QEMU's `bdrv_aligned_pwritev` does.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        self.accounted(IoType::Write, offset, len, || {
            self.write_checked(buf, offset)?;
            self.write_done()
        })
    }

    /// [`BlockBackend::write_at`]'s write, neither accounted nor flushed.
    fn write_checked(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        self.check_writable()?;
        self.check_range(offset, len)?;
        if self.probed_raw && offset == 0 && buf.len() >= 4 && buf[..4] == QCOW2_MAGIC {
            return Err(BlockError::Io(io::Error::from_raw_os_error(libc::EPERM)));
        }
        if self.opts.detect_zeroes != DetectZeroes::Off && buf.iter().all(|&b| b == 0) {
            self.zeroes(offset, len)?;
        } else {
            self.access.read().write(buf, offset)?;
        }
        Ok(())
    }

    /// Reads into guest memory, `bufs` in order, from `offset` (a device's scatter-gather
    /// list: no copy through a buffer of ours).
    pub fn readv_guest(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<(), BlockError> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.accounted(IoType::Read, offset, len, || {
            self.check_range(offset, len)?;
            let (vector, _guard) = IoVectorMut::from_volatile_slice(bufs);
            self.access.read().readv(vector, offset)?;
            Ok(())
        })
    }

    /// Writes guest memory, `bufs` in order, at `offset` (see [`BlockBackend::readv_guest`]).
    /// Where the data itself matters (zero detection, the probed-raw guard of sector 0) it
    /// goes through [`BlockBackend::write_at`].
    pub fn writev_guest(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<(), BlockError> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if self.opts.detect_zeroes != DetectZeroes::Off || (self.probed_raw && offset == 0) {
            // Copied in pieces: a guest's request (descriptors may repeat the same memory)
            // costs time, never its size in memory. One request for the statistics and
            // a write-through cache.
            const PIECE: usize = 1 << 20;
            return self.accounted(IoType::Write, offset, len, || {
                self.check_writable()?;
                self.check_range(offset, len)?;
                let mut data = vec![0u8; (len as usize).min(PIECE)];
                let (mut filled, mut written) = (0usize, 0u64);
                for b in bufs {
                    let mut from = 0;
                    while from < b.len() {
                        let n = (b.len() - from).min(data.len() - filled);
                        b.subslice(from, n)
                            .map_err(|e| BlockError::Io(io::Error::other(e.to_string())))?
                            .copy_to(&mut data[filled..filled + n]);
                        (from, filled) = (from + n, filled + n);
                        if filled == data.len() {
                            self.write_checked(&data, offset + written)?;
                            written += filled as u64;
                            filled = 0;
                        }
                    }
                }
                if filled > 0 {
                    self.write_checked(&data[..filled], offset + written)?;
                }
                self.write_done()
            });
        }
        self.accounted(IoType::Write, offset, len, || {
            self.check_writable()?;
            self.check_range(offset, len)?;
            let (vector, _guard) = IoVector::from_volatile_slice(bufs);
            self.access.read().writev(vector, offset)?;
            self.write_done()
        })
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.accounted(IoType::Write, offset, len, || {
            self.check_writable()?;
            self.check_range(offset, len)?;
            self.zeroes(offset, len)?;
            self.write_done()
        })
    }

    /// Makes the range read as zeroes: freed where `detect-zeroes=unmap` and
    /// `discard=unmap` allow it (QEMU's `BDRV_REQ_MAY_UNMAP`), else zero clusters or
    /// written zeroes.
    fn zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.opts.detect_zeroes == DetectZeroes::Unmap && self.opts.discard == DiscardMode::Unmap
        {
            self.access.write().discard_to_zero(offset, len)?;
        } else {
            self.access.read().write_zeroes(offset, len)?;
        }
        Ok(())
    }

    /// After a write: write-through caches (`cache=writethrough`/`directsync`) flush.
    fn write_done(&self) -> Result<(), BlockError> {
        if self.opts.cache.writeback() {
            return Ok(());
        }
        self.flush_image()
    }

    /// Discards `len` bytes at `offset` (reading them back gives zeroes or old data): a
    /// qcow2 frees its clusters, a raw file gets a hole. Does nothing, successfully, under
    /// `discard=ignore`, nor where the format cannot discard.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.accounted(IoType::Unmap, offset, len, || {
            self.check_writable()?;
            self.check_range(offset, len)?;
            if self.opts.discard == DiscardMode::Ignore {
                return Ok(());
            }
            let result = match self.access.write().discard_to_any(offset, len) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
                other => other,
            };
            if self.format() == Format::Raw {
                let mut acct = self.acct.lock();
                match &result {
                    Ok(()) => {
                        acct.file.discard_nb_ok += 1;
                        acct.file.discard_bytes_ok += len;
                    }
                    Err(_) => acct.file.discard_nb_failed += 1,
                }
            }
            Ok(result?)
        })
    }

    /// Whether the image is inactive (see [`set_open_inactive`]).
    pub fn is_inactive(&self) -> bool {
        self.inactive.load(Ordering::SeqCst)
    }

    /// QEMU's `bdrv_activate`: takes an inactive image over. It is opened again, on the
    /// same locked file description, with the permissions of an active one: metadata
    /// cached at the inactive open may predate the other side's last writes.
    pub fn activate(&self) -> Result<(), BlockError> {
        if !self.inactive.load(Ordering::SeqCst) {
            return Ok(());
        }
        let top_lock = self
            .locks
            .lock()
            .first()
            .map(ImageLock::try_clone)
            .transpose()
            .map_err(BlockError::Io)?;
        let storage = StorageOpenOptions::new()
            .write(!self.opts.read_only)
            .direct(self.opts.cache.direct());
        // A `backing=NODE` chain is opened again from the image's header: the same files,
        // read-only, so nothing cached there can be stale.
        let backing = match &self.opts.backing {
            BackingOption::Node(_) => BackingOption::FromImage,
            other => other.clone(),
        };
        let image = open_image(
            &self.opts.filename,
            self.info.format,
            &storage,
            top_perms(self.info.format, self.opts.read_only),
            (self.node_name.clone(), self.info.file_node_name.clone()),
            &backing,
            top_lock,
        )?;
        *self.access.write() = image.access;
        *self.locks.lock() = image.locks;
        self.inactive.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// QEMU's `bdrv_inactivate`: at the end of an outgoing migration, with the guest
    /// stopped, the image is flushed and its locks claim nothing any more, so the
    /// destination can activate it. [`BlockBackend::activate`] undoes it (a failed
    /// migration, `cont` after one).
    pub fn inactivate(&self) -> Result<(), BlockError> {
        if self.inactive.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.flush_image()?;
        if let Some(lock) = self.locks.lock().first() {
            lock.update(&self.opts.filename, INACTIVE_PERMS.0, INACTIVE_PERMS.1)?;
        }
        self.inactive.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Writes cached data and metadata to stable storage, unless `cache=unsafe`.
    pub fn flush(&self) -> Result<(), BlockError> {
        self.accounted(IoType::Flush, 0, 0, || self.flush_image())
    }

    fn flush_image(&self) -> Result<(), BlockError> {
        if self.opts.cache.no_flush() || self.opts.read_only || self.is_inactive() {
            return Ok(());
        }
        self.access.read().flush()?;
        Ok(())
    }
}

/// Every backend and named node, in creation order (QEMU's `blk_backends` and
/// `graph_bdrv_states`).
static BACKENDS: Mutex<Vec<Arc<BlockBackend>>> = Mutex::new(Vec::new());

/// QEMU's `blk_attach_dev` refusal: the drive `name` has a device (`auto`: the one its
/// `-drive` interface made).
fn drive_in_use(name: &str, auto: bool) -> BlockError {
    let why = if auto {
        "because it has been automatically connected to another device (did you need 'if=none' in the drive options?)"
    } else {
        "by another device"
    };
    BlockError::Invalid(format!("Drive '{name}' is already in use {why}"))
}

/// A named backend without a medium (QEMU's `BlockBackend` whose root is NULL): a
/// `-drive if=none,id=cd0,media=cdrom` without `file=`, or a CD drive's `-drive` once its
/// medium was taken out.
struct EmptyDrive {
    name: String,
    /// The device using it.
    attached: Option<String>,
    auto_connected: bool,
}

static EMPTY_DRIVES: Mutex<Vec<EmptyDrive>> = Mutex::new(Vec::new());

/// Adds the empty drive `name`, held by device `qdev` if given; a name in use is QEMU's
/// duplicate error.
pub fn add_empty_drive(name: &str, qdev: Option<&str>) -> Result<(), BlockError> {
    if name_in_use(name) {
        return Err(BlockError::Invalid(format!(
            "Duplicate ID '{name}' for drive"
        )));
    }
    EMPTY_DRIVES.lock().push(EmptyDrive {
        name: name.to_string(),
        attached: qdev.map(str::to_string),
        auto_connected: false,
    });
    Ok(())
}

/// Marks the empty drive `name` as made by its `-drive` interface (see
/// [`BlockBackend::set_auto_connected`]).
pub fn set_empty_drive_auto_connected(name: &str) {
    if let Some(d) = EMPTY_DRIVES.lock().iter_mut().find(|d| d.name == name) {
        d.auto_connected = true;
    }
}

/// Device `qdev` takes the empty drive `name`: `None` if there is no such drive, the
/// block layer's refusal if another device has it.
pub fn attach_empty_drive(name: &str, qdev: &str) -> Option<Result<(), BlockError>> {
    let mut all = EMPTY_DRIVES.lock();
    let d = all.iter_mut().find(|d| d.name == name)?;
    if d.attached.is_some() {
        return Some(Err(drive_in_use(name, d.auto_connected)));
    }
    d.attached = Some(qdev.to_string());
    Some(Ok(()))
}

/// The device using the empty drive `name` could not be made: the drive is free again.
pub fn detach_empty_drive(name: &str) {
    if let Some(d) = EMPTY_DRIVES.lock().iter_mut().find(|d| d.name == name) {
        d.attached = None;
    }
}

/// The empty drive `name` gets a medium (or its device goes): the name leaves the table
/// of empty drives.
pub fn remove_empty_drive(name: &str) {
    EMPTY_DRIVES.lock().retain(|d| d.name != name);
}

/// Whether `name` names a drive (QEMU's `blk_by_name`): a `-drive`, or the drive a
/// medium is in, or a drive without a medium.
pub fn is_drive_name(name: &str) -> bool {
    BACKENDS.lock().iter().any(|b| b.has_id(name)) || is_empty_drive(name)
}

/// Whether `name` is a drive without a medium.
pub fn is_empty_drive(name: &str) -> bool {
    EMPTY_DRIVES.lock().iter().any(|d| d.name == name)
}

/// The empty drives without a device (a device reports its own), by name.
pub fn unattached_empty_drives() -> Vec<String> {
    EMPTY_DRIVES
        .lock()
        .iter()
        .filter(|d| d.attached.is_none())
        .map(|d| d.name.clone())
        .collect()
}

/// Takes `backend` out of the table (a medium its device owned was removed): the image
/// closes when the last user lets go of it.
pub fn remove_backend(backend: &Arc<BlockBackend>) {
    BACKENDS.lock().retain(|b| !Arc::ptr_eq(b, backend));
}

/// `blockdev-del`'s refusals, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// No node of that name.
    #[error("Failed to find node with node-name='{0}'")]
    NotFound(String),
    /// A device uses it, or it is a `-drive`'s.
    #[error("Node {0} is in use")]
    HasBackend(String),
    /// Another node uses it as its child.
    #[error("Block device {0} is in use")]
    Referenced(String),
    /// Giving back the file node the deleted node had taken failed.
    #[error("Could not give back node '{0}': {1}")]
    GiveBack(String, BlockError),
}

/// QEMU's `qmp_blockdev_del`: deletes the monitor's node `name` and the inline nodes under
/// it; a node it took by reference (`file=NODE`, `backing=NODE`) is a node of its own
/// again. A node no drive or device uses is deleted even while a request still holds
/// it: the image closes when that lets go.
pub fn delete_node(name: &str) -> Result<(), DeleteError> {
    let node = {
        let mut all = BACKENDS.lock();
        let Some(i) = all.iter().position(|b| b.node_name == name) else {
            if child_user(&all, name).is_some() {
                return Err(DeleteError::Referenced(name.to_string()));
            }
            return Err(DeleteError::NotFound(name.to_string()));
        };
        let b = &all[i];
        if !b.id.read().is_empty() || b.attached_dev().is_some() {
            return Err(DeleteError::HasBackend(name.to_string()));
        }
        all.remove(i)
    };
    if let Err(e) = node.flush_image() {
        log::warn!("flushing '{name}' failed: {e}");
    }
    if let Some(file) = node.taken_file.lock().take() {
        // Back to the file node's own permissions, on the descriptor that held the locks
        // all along.
        let (perm, shared) = top_perms(Format::Raw, file.opts.read_only);
        if let Some(lock) = file.locks.lock().first() {
            if let Err(e) = lock.update(&file.opts.filename, perm, shared) {
                log::warn!("node '{}' keeps other locks: {e}", file.node_name);
            }
        }
        BACKENDS.lock().push(Arc::new(*file));
    }
    let backing = node.taken_backing.lock().take();
    // The chain's files and locks close before the backing node opens them again.
    drop(node);
    if let Some(backing) = backing {
        let (backing_name, opts) = *backing;
        let reopened = BlockBackend::open("", &backing_name, opts, |_| {})
            .map_err(|e| DeleteError::GiveBack(backing_name.clone(), e))?;
        add_backend(reopened).map_err(|e| DeleteError::GiveBack(backing_name, e))?;
    }
    Ok(())
}

/// Adds an opened backend to the table; a duplicate id or node name is QEMU's error.
pub fn add_backend(backend: BlockBackend) -> Result<Arc<BlockBackend>, BlockError> {
    let mut all = BACKENDS.lock();
    let empty_names = EMPTY_DRIVES.lock();
    let id = backend.id();
    if !id.is_empty()
        && (all.iter().any(|b| b.has_id(&id)) || empty_names.iter().any(|d| d.name == id))
    {
        return Err(BlockError::Invalid(format!(
            "Duplicate ID '{id}' for drive"
        )));
    }
    if let Some(name) = node_names(&backend)
        .into_iter()
        .find(|n| all.iter().any(|b| node_names(b).contains(n)))
    {
        return Err(BlockError::Invalid(format!(
            "Duplicate nodes with node-name='{name}'"
        )));
    }
    if let Some(name) = node_names(&backend)
        .into_iter()
        .find(|n| empty_names.iter().any(|d| d.name == *n))
    {
        return Err(BlockError::Invalid(format!(
            "node-name={name} is conflicting with a device id"
        )));
    }
    drop(empty_names);
    let backend = Arc::new(backend);
    all.push(Arc::clone(&backend));
    Ok(backend)
}

/// The names of every node of a backend: each layer's format node and its file node.
fn node_names(b: &BlockBackend) -> Vec<String> {
    let mut names = vec![b.node_name.clone()];
    let mut layer = Some(&b.info);
    while let Some(info) = layer {
        if !b.opts.protocol_only {
            names.push(info.file_node_name.clone());
        }
        layer = info.backing.as_deref();
        if let Some(below) = layer {
            names.push(below.node_name.clone());
        }
    }
    names
}

/// Whether a backend id or any node name is taken.
pub fn name_in_use(name: &str) -> bool {
    BACKENDS
        .lock()
        .iter()
        .any(|b| b.has_id(name) || node_names(b).iter().any(|n| n == name))
        || EMPTY_DRIVES.lock().iter().any(|d| d.name == name)
}

/// Lifts every backend's I/O limits while the guards live (QEMU's `bdrv_drain_all_begin`,
/// as far as limits go): a VM stop or reset waits for requests in flight, and a vCPU that
/// waits for one, not for the limits.
pub fn lift_all_limits() -> Vec<LimitsLifted> {
    backends().iter().map(|b| b.lift_limits()).collect()
}

/// Every backend, in creation order.
pub fn backends() -> Vec<Arc<BlockBackend>> {
    BACKENDS.lock().clone()
}

/// The backend with that id or root node name (what a device's `drive=` names).
pub fn find_backend(name: &str) -> Option<Arc<BlockBackend>> {
    BACKENDS
        .lock()
        .iter()
        .find(|b| b.has_id(name) || b.node_name == name)
        .cloned()
}

/// The node that uses node `name` as a child, and as which (for QEMU's permission
/// conflict message).
fn child_user(all: &[Arc<BlockBackend>], name: &str) -> Option<(String, &'static str, String)> {
    for b in all {
        let mut layer = Some(&b.info);
        let mut layer_name = b.node_name.clone();
        let mut writable = !b.opts.read_only;
        while let Some(info) = layer {
            let perms = match (writable, info.format) {
                (true, Format::Qcow2) => "write, resize",
                (true, Format::Raw) => "write",
                (false, _) => "consistent read",
            };
            if !b.opts.protocol_only && info.file_node_name == name {
                return Some((layer_name, "file", perms.to_string()));
            }
            if let Some(below) = info.backing.as_deref() {
                if below.node_name == name {
                    return Some((layer_name, "backing", "consistent read".to_string()));
                }
                layer_name = below.node_name.clone();
            }
            layer = info.backing.as_deref();
            writable = false;
        }
    }
    None
}

/// Removes the unused standalone node `name` from the table, for `new_user` to use as
/// its `role` child.
fn take_node(
    name: &str,
    new_user: &str,
    role: &'static str,
) -> Result<(usize, BlockBackend), BlockError> {
    let mut all = BACKENDS.lock();
    let Some(i) = all
        .iter()
        .position(|b| b.node_name == name || b.has_id(name))
    else {
        return Err(match child_user(&all, name) {
            Some((user, user_role, perms)) => BlockError::Conflict(Box::new(PermissionConflict {
                node: name.to_string(),
                perms,
                user,
                role: user_role,
                new_user: new_user.to_string(),
                new_role: role,
            })),
            None => BlockError::NodeNotFound(name.to_string()),
        });
    };
    // A -drive's root, or a node a device holds, stays where it is.
    if !all[i].id.read().is_empty()
        || Arc::strong_count(&all[i]) > 1
        || all[i].attached_dev().is_some()
    {
        return Err(BlockError::InUse(name.to_string()));
    }
    let node = all.remove(i);
    match Arc::try_unwrap(node) {
        Ok(node) => Ok((i, node)),
        Err(node) => {
            all.insert(i, node);
            Err(BlockError::InUse(name.to_string()))
        }
    }
}

/// Puts a taken node back where it was in the table.
fn put_back(index: usize, node: BlockBackend) {
    let mut all = BACKENDS.lock();
    let index = index.min(all.len());
    all.insert(index, Arc::new(node));
}

/// `file=NODE`: takes the `driver=file` node `name` (with its index in the table); the
/// format node opens the file again, under the same locks.
fn take_file_node(name: &str, new_user: &str) -> Result<(usize, BlockBackend), BlockError> {
    let (index, node) = take_node(name, new_user, "file")?;
    if !node.opts.protocol_only {
        let driver = node.driver_name();
        put_back(index, node);
        return Err(BlockError::Invalid(format!(
            "Node '{name}' is a '{driver}' node: qomvm opens formats on 'file' nodes only"
        )));
    }
    Ok((index, node))
}

/// `backing=NODE`: takes node `name` whole (its image, its own chain, its locks) as the
/// backing image of `new_user`. Its top file's locks become a backing file's (read,
/// shared with writers that keep the data).
fn take_node_for_backing(name: &str, new_user: &str) -> Result<OpenedImage, BlockError> {
    let (index, mut node) = take_node(name, new_user, "backing")?;
    // In place, on the same open file description: never unlocked in between.
    if let Some(lock) = node.locks.get_mut().first() {
        if let Err(e) = lock.update(&node.opts.filename, BACKING_PERMS.0, BACKING_PERMS.1) {
            put_back(index, node);
            return Err(e);
        }
    }
    // To open it again when its user goes: from its file, under its node names (a file
    // node it had taken by reference comes back as its inline file node).
    let mut reopen = node.opts.clone();
    reopen.file_ref = None;
    let BlockBackend {
        node_name,
        mut info,
        access,
        locks,
        ..
    } = node;
    info.node_name = node_name.clone();
    Ok(OpenedImage {
        access: access.into_inner(),
        info,
        locks: locks.into_inner(),
        taken_backing: Some((node_name, reopen)),
    })
}

/// Flushes and closes every backend (at exit), releasing the locks.
pub fn close_all() {
    let all = std::mem::take(&mut *BACKENDS.lock());
    for b in all {
        if let Err(e) = b.flush_image() {
            log::warn!("flushing '{}' failed: {e}", b.node_name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `detect-zeroes`, guest data is copied before it is written: in pieces, across
    /// the slices' boundaries, zero pieces written as zeroes, the rest as they are.
    #[test]
    fn guest_writes_with_detect_zeroes_go_in_pieces() {
        let dir = std::env::temp_dir().join(format!("qomvm-block-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dz.raw");
        // Non-zero everywhere: a piece not written would show.
        std::fs::write(&path, vec![0xeeu8; 8 << 20]).unwrap();
        let mut opts = OpenOptions::new(&path);
        opts.format = Some(Format::Raw);
        opts.detect_zeroes = DetectZeroes::On;
        let backend = BlockBackend::open("dz", &auto_node_name(), opts, |_| {}).unwrap();
        // Three slices of 700 KiB: data, zeroes, data (2.1 MiB, three 1 MiB pieces).
        let mut parts: Vec<Vec<u8>> = vec![
            (0..700 * 1024).map(|i| (i % 251) as u8 | 1).collect(),
            vec![0; 700 * 1024],
            (0..700 * 1024).map(|i| (i % 13) as u8 | 0x80).collect(),
        ];
        let expected: Vec<u8> = parts.concat();
        let slices: Vec<VolatileSlice<'_>> = parts
            .iter_mut()
            .map(|p| VolatileSlice::from(&mut p[..]))
            .collect();
        backend.writev_guest(&slices, 4096).unwrap();
        let mut back = vec![0u8; expected.len()];
        backend.read_at(&mut back, 4096).unwrap();
        assert!(back == expected, "the data read back differs");
        assert_eq!(
            backend.stats().wr.operations,
            1,
            "one request, whatever its pieces"
        );
        assert!(
            backend.writev_guest(&slices, (8 << 20) - 4096).is_err(),
            "past the end: refused before anything is written"
        );
        let mut tail = vec![0u8; 4096];
        backend.read_at(&mut tail, (8 << 20) - 4096).unwrap();
        assert!(
            tail.iter().all(|&b| b == 0xee),
            "the refused request wrote nothing"
        );
    }
}
