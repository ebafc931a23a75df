//! qomvm's block layer (QEMU's `block/` and `block/block-backend.c`): images opened through
//! the `imago` crate (raw and qcow2, with qcow2 backing chains), QEMU-compatible image
//! locks, and [`BlockBackend`], the handle devices do I/O through.
//!
//! It sits below the devices: it knows nothing of QOM, the machine or the command line.
//! `src/blockdev.rs` turns `-drive`/`-blockdev` into [`OpenOptions`] and adds the result
//! to the table here ([`add_backend`]), where devices and the monitor find it.

pub mod lock;

use std::fs::File as StdFile;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use imago::file::File;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions};
use parking_lot::{Mutex, RwLock};

use lock::{ImageLock, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED};

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
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
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
    /// `cache=`.
    pub cache: CacheMode,
    /// `discard=`.
    pub discard: DiscardMode,
    /// `aio=`.
    pub aio: AioMode,
    /// The node is the file itself (QEMU's `driver=file`, no format layer on it): raw
    /// data, reported as driver `file`.
    pub protocol_only: bool,
    /// The name of the file node under the format node (`file.node-name`); `None` gets an
    /// automatic one.
    pub file_node_name: Option<String>,
}

impl OpenOptions {
    /// Read-write, writeback, the format probed.
    pub fn new(filename: impl Into<PathBuf>) -> Self {
        OpenOptions {
            filename: filename.into(),
            format: None,
            read_only: false,
            cache: CacheMode::default(),
            discard: DiscardMode::default(),
            aio: AioMode::default(),
            protocol_only: false,
            file_node_name: None,
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

/// QEMU's `bdrv_default_perms_for_cow`: a backing file is read, and others may read it or
/// write without changing it.
const BACKING_PERMS: (u32, u32) = (
    PERM_CONSISTENT_READ,
    PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
);

/// Opens `path` in `format` (read-only backing layers included) and locks every file.
fn open_image(
    path: &Path,
    format: Format,
    writable: bool,
    storage: &StorageOpenOptions,
    perms: (u32, u32),
    names: (String, String),
) -> Result<OpenedImage, BlockError> {
    let (node_name, file_node_name) = names;
    let mut locks = vec![ImageLock::acquire(path, perms.0, perms.1)?];
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
            let mut backing = None;
            let mut full_backing_filename = None;
            if let Some(name) = &backing_filename {
                let full = match Path::new(name) {
                    p if p.is_absolute() => p.to_path_buf(),
                    p => path.parent().unwrap_or(Path::new("")).join(p),
                };
                let bformat = match backing_format.as_deref() {
                    Some(f) => Format::from_name(f)
                        .ok_or_else(|| BlockError::Invalid(format!("Unknown driver '{f}'")))?,
                    None => probe(&full)?,
                };
                let below = open_image(
                    &full,
                    bformat,
                    false,
                    &storage.clone().write(false),
                    BACKING_PERMS,
                    (auto_node_name(), auto_node_name()),
                )?;
                locks.extend(below.locks);
                qcow2.set_backing(Some(below.access));
                full_backing_filename = Some(full.display().to_string());
                backing = Some(Box::new(below.info));
            }
            let access = FormatAccess::new(qcow2);
            let info = ImageInfo {
                node_name,
                file_node_name,
                filename,
                format,
                virtual_size: access.size(),
                backing_filename,
                full_backing_filename,
                backing_format,
                backing,
            };
            Ok(OpenedImage {
                access,
                info,
                locks,
            })
        }
    }
}

/// A handle devices do I/O through (QEMU's `BlockBackend` with its root node).
pub struct BlockBackend {
    id: String,
    node_name: String,
    opts: OpenOptions,
    /// Raw was guessed, not asked for: writes to sector 0 may not make it look like another
    /// format (QEMU's `raw_probe` restriction).
    probed_raw: bool,
    info: ImageInfo,
    /// imago's access; discard needs it exclusively.
    access: RwLock<FormatAccess<File>>,
    _locks: Vec<ImageLock>,
    /// The device using the backend (its QOM path), as QEMU's `blk_attach_dev`.
    attached: Mutex<Option<String>>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("id", &self.id)
            .field("node_name", &self.node_name)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// QEMU's automatic node names, `#block123`.
static NODE_COUNTER: AtomicU32 = AtomicU32::new(1);

/// A fresh automatic node name.
pub fn auto_node_name() -> String {
    format!("#block{:03}", NODE_COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl BlockBackend {
    /// Opens an image. `id` is the backend's name (`-drive id=`, empty for a `-blockdev`
    /// node), `node_name` its root node's. Returns the image's locks' and open's errors
    /// with QEMU's text. If the format is probed as raw, `warn` gets QEMU's warning.
    pub fn open(
        id: &str,
        node_name: &str,
        opts: OpenOptions,
        warn: impl FnOnce(&str),
    ) -> Result<BlockBackend, BlockError> {
        let path = opts.filename.clone();
        // QEMU opens the file before locking it, so a missing file is reported as such.
        std::fs::metadata(&path).map_err(|e| BlockError::open(&path, e))?;
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
        let storage = StorageOpenOptions::new()
            .write(!opts.read_only)
            .direct(opts.cache.direct());
        let image = open_image(
            &path,
            format,
            !opts.read_only,
            &storage,
            top_perms(format, opts.read_only),
            (
                node_name.to_string(),
                opts.file_node_name.clone().unwrap_or_else(auto_node_name),
            ),
        )?;
        Ok(BlockBackend {
            id: id.to_string(),
            node_name: node_name.to_string(),
            opts: OpenOptions {
                format: Some(format),
                ..opts
            },
            probed_raw,
            info: image.info,
            access: RwLock::new(image.access),
            _locks: image.locks,
            attached: Mutex::new(None),
        })
    }

    /// Attaches the device at QOM path `device` (QEMU's `blk_attach_dev`); false if
    /// another device has the backend already.
    pub fn attach_device(&self, device: Option<String>) -> bool {
        let mut attached = self.attached.lock();
        if attached.is_some() {
            return false;
        }
        *attached = Some(device.unwrap_or_default());
        true
    }

    /// Detaches the device (QEMU's `blk_detach_dev`), at unplug.
    pub fn detach_device(&self) {
        *self.attached.lock() = None;
    }

    /// The QOM path of the device using the backend (`query-block`'s `qdev`).
    pub fn attached_device(&self) -> Option<String> {
        self.attached.lock().clone()
    }

    /// The backend's name (`-drive id=`); empty for a `-blockdev` node.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The root node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
    /// The options it was opened with (the format resolved).
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

    fn check_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.opts.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.check_range(offset, buf.len() as u64)?;
        self.access.read().read(buf, offset)?;
        Ok(())
    }

    /// Writes `buf` at `offset`; under writethrough caching, flushes too.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if self.probed_raw && offset == 0 && buf.len() >= 4 && buf[..4] == QCOW2_MAGIC {
            return Err(BlockError::Io(io::Error::from_raw_os_error(libc::EPERM)));
        }
        self.access.read().write(buf, offset)?;
        self.write_done()
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.access.read().write_zeroes(offset, len)?;
        self.write_done()
    }

    /// After a write: write-through caches (`cache=writethrough`/`directsync`) flush.
    fn write_done(&self) -> Result<(), BlockError> {
        if self.opts.cache.writeback() {
            return Ok(());
        }
        self.flush()
    }

    /// Discards `len` bytes at `offset` (reading them back gives zeroes or old data). Does
    /// nothing under `discard=ignore`, nor where the format cannot discard.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if self.opts.discard == DiscardMode::Ignore {
            return Ok(());
        }
        match self.access.write().discard_to_any(offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => Ok(other?),
        }
    }

    /// Writes cached data and metadata to stable storage, unless `cache=unsafe`.
    pub fn flush(&self) -> Result<(), BlockError> {
        if self.opts.cache.no_flush() || self.opts.read_only {
            return Ok(());
        }
        self.access.read().flush()?;
        Ok(())
    }
}

/// Every backend and named node, in creation order (QEMU's `blk_backends` and
/// `graph_bdrv_states`).
static BACKENDS: Mutex<Vec<Arc<BlockBackend>>> = Mutex::new(Vec::new());

/// Adds an opened backend to the table; a duplicate id or node name is QEMU's error.
pub fn add_backend(backend: BlockBackend) -> Result<Arc<BlockBackend>, BlockError> {
    let mut all = BACKENDS.lock();
    if !backend.id.is_empty() && all.iter().any(|b| b.id == backend.id) {
        return Err(BlockError::Invalid(format!(
            "Duplicate ID '{}' for drive",
            backend.id
        )));
    }
    if all.iter().any(|b| b.node_name == backend.node_name) {
        return Err(BlockError::Invalid(format!(
            "Duplicate nodes with node-name='{}'",
            backend.node_name
        )));
    }
    let backend = Arc::new(backend);
    all.push(Arc::clone(&backend));
    Ok(backend)
}

/// Whether a backend id or node name is taken.
pub fn name_in_use(name: &str) -> bool {
    find_backend(name).is_some()
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
        .find(|b| (!b.id.is_empty() && b.id == name) || b.node_name == name)
        .cloned()
}

/// Flushes and closes every backend (at exit), releasing the locks.
pub fn close_all() {
    let all = std::mem::take(&mut *BACKENDS.lock());
    for b in all {
        if let Err(e) = b.flush() {
            log::warn!("flushing '{}' failed: {e}", b.node_name);
        }
    }
}
