//! The migration stream (QEMU's `migration/savevm.c` and `ram.c`, in qomvm's own format):
//! what a paused VM is, written to any byte sink (a socket, a file, a pipe) and read back
//! into a freshly built VM of the same configuration.
//!
//! The stream is a magic line, then records of `tag, length (u64 LE), payload`:
//! - `CONFIG` (JSON): the machine type, the RAM ranges, the CPU count and every device
//!   that has state, by QOM path and type. The destination compares it with its own
//!   machine first and names the first difference.
//! - `RAM` (binary, any number): pages as `address | ZERO` (8 bytes) for a page of zeroes,
//!   or `address` then its 4096 bytes.
//! - `STATE` (JSON): the accelerator's VM section, one section per CPU, one per device.
//! - `END`.
//! - With multifd (`crate::core::multifd`), RAM goes over the other channels and the
//!   configuration names them (`multifd`: the channel count and the migration's UUID);
//!   `MULTIFD_SYNC` (a u64, the sync's number) ends each pre-copy pass.
//!
//! Every section carries a version and named fields (`crate::core::vmstate`).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use qom::ObjectRef;
use serde_json::{json, Value};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::core::machine::machine_state;
use crate::core::qdev::device_impl;
use crate::core::vmstate::{VmStateError, VmStateSection};

/// The stream's first bytes.
pub const MAGIC: &[u8; 16] = b"QOMVM-MIGRATE-1\n";
const TAG_CONFIG: u8 = 1;
const TAG_RAM: u8 = 2;
const TAG_STATE: u8 = 3;
const TAG_END: u8 = 4;
/// RAM kept at a fixed place of a file, each page at its own offset (QEMU's `mapped-ram`):
/// the payload says where; the state follows it there.
const TAG_MAPPED_RAM: u8 = 5;
/// Where a mapped RAM area starts in its file: a multiple of this, so any host page size
/// (and 2 MiB huge pages) can map it.
const MAPPED_RAM_ALIGN: u64 = 2 << 20;
/// The end of a pass over the multifd channels (QEMU's `RAM_SAVE_FLAG_MULTIFD_FLUSH`): the
/// destination applies every channel's pages up to here before it goes on.
const TAG_MULTIFD_SYNC: u8 = 6;
/// The page size of the RAM records.
pub const PAGE_SIZE: u64 = crate::core::dirty_log::PAGE_SIZE;
/// Marks a zero page in a RAM record's address word.
const ZERO_PAGE: u64 = 1;
/// Pages per RAM record.
const PAGES_PER_RECORD: u64 = 256;
/// The largest record a destination accepts (a RAM record of data pages, with room).
const MAX_RECORD: u64 = PAGES_PER_RECORD * (PAGE_SIZE + 8) + 4096;
/// The largest state record: device sections can carry device memory (a VGA's video
/// memory, up to 512 MiB, as hex), so more room; the payload is read as it arrives, so a
/// damaged length costs no more memory than the stream really holds.
const MAX_STATE_RECORD: u64 = 2 << 30;

/// Why a VM could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A device or the accelerator cannot be migrated.
    #[error(transparent)]
    State(#[from] VmStateError),
    /// A device's section did not load.
    #[error("error while loading state for instance 0x0 of device '{path}': {source}")]
    Device {
        /// The device's QOM path.
        path: String,
        /// Why.
        source: VmStateError,
    },
    /// The stream and this VM's configuration differ.
    #[error("{0}. Make sure that your current VM setup matches your saved VM setup")]
    Mismatch(String),
    /// Not a qomvm migration stream, or a damaged one.
    #[error("invalid migration stream: {0}")]
    Stream(String),
    /// The channel failed.
    #[error("{0}")]
    Io(String),
    /// Cancelled by `migrate_cancel`.
    #[error("migration was cancelled")]
    Cancelled,
    /// The multifd channels failed, or the two sides disagree on them.
    #[error("{0}")]
    Multifd(String),
}

impl From<std::io::Error> for MigrationError {
    fn from(e: std::io::Error) -> Self {
        MigrationError::Io(crate::core::os_error::strerror(&e))
    }
}

/// What a save moved, for `query-migrate`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Bytes written to the channel.
    pub transferred: u64,
    /// Pages sent with their data.
    pub normal_pages: u64,
    /// Pages sent as zero pages.
    pub zero_pages: u64,
    /// Guest RAM in bytes.
    pub total_ram: u64,
    /// Bytes of RAM still to send (dirty since the last pass).
    pub remaining: u64,
    /// Passes over the dirty log so far (QEMU's `dirty-sync-count`).
    pub passes: u64,
    /// Pages the guest (and the VMM's own writers) dirtied per second between the last
    /// two reads of the dirty log (QEMU's `dirty-pages-rate`).
    pub dirty_pages_rate: u64,
}

/// The devices under `machine` that are realized, by canonical path (CPUs included: their
/// registers travel in the accelerator's CPU sections, their device sections are empty).
fn devices(machine: &ObjectRef) -> Vec<(String, ObjectRef)> {
    crate::core::qdev::qdev_realized_devices(machine)
}

/// Every device's section, or the first device that cannot be migrated (QEMU's
/// migration blockers, checked before anything is sent).
pub fn device_states(machine: &ObjectRef) -> Result<BTreeMap<String, (String, VmStateSection)>, MigrationError> {
    let mut out = BTreeMap::new();
    for (path, dev) in devices(machine) {
        let Some(imp) = device_impl(&dev) else { continue };
        let section = imp.save_state()?;
        out.insert(path, (dev.type_name().to_string(), section));
    }
    Ok(out)
}

/// Fails with the first thing that blocks migrating `machine`: a device that cannot move,
/// or an accelerator without migration support.
pub fn check_migratable(machine: &ObjectRef) -> Result<(), MigrationError> {
    // The devices' blockers first, as QEMU's blocker list comes before any state.
    for (_, dev) in devices(machine) {
        if let Some(why) = device_impl(&dev).and_then(|d| d.migration_blocker()) {
            return Err(VmStateError::Blocked(why).into());
        }
    }
    device_states(machine)?;
    let ms = machine_state(machine).ok_or_else(|| MigrationError::Stream("not a machine".into()))?;
    if let Some(ops) = ms.accel_ops() {
        ops.save_vm_state()?;
    }
    Ok(())
}

fn ram_ranges(machine: &ObjectRef) -> Vec<(u64, u64)> {
    let Some(ms) = machine_state(machine) else {
        return Vec::new();
    };
    ms.ram()
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// Keeps the pages of `pages` that are guest RAM. The accelerator's dirty log covers every
/// writable slot, device memory mapped into the guest too (a VGA's framebuffer BAR); that
/// memory travels in its device's section, not in RAM records.
pub fn retain_ram_pages(machine: &ObjectRef, pages: &mut Vec<u64>) {
    let ranges = ram_ranges(machine);
    pages.retain(|page| {
        ranges
            .iter()
            .any(|&(start, len)| (start..start + len).contains(page))
    });
}

fn config(machine: &ObjectRef, devices: &BTreeMap<String, (String, VmStateSection)>) -> Value {
    let cpus = machine_state(machine).map_or(0, |ms| ms.cpus().len());
    json!({
        "machine": machine.type_name(),
        "ram": ram_ranges(machine),
        "cpus": cpus,
        "devices": devices.iter().map(|(p, (t, _))| json!({"path": p, "type": t})).collect::<Vec<_>>(),
    })
}

/// The multifd channels a stream's RAM goes over, as its configuration record names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultifdConfig {
    /// How many (`multifd-channels`).
    pub channels: u8,
    /// The migration's UUID, which each channel's header repeats.
    pub uuid: crate::core::uuid::Uuid,
}

impl MultifdConfig {
    fn to_json(self) -> Value {
        json!({"channels": self.channels, "uuid": self.uuid.to_string()})
    }

    fn from_json(v: &Value) -> Result<MultifdConfig, MigrationError> {
        let bad = || MigrationError::Stream(format!("multifd configuration {v}"));
        let channels = v["channels"]
            .as_u64()
            .filter(|n| (1..=255).contains(n))
            .ok_or_else(bad)? as u8;
        let uuid = v["uuid"].as_str().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        Ok(MultifdConfig { channels, uuid })
    }
}

/// The destination's multifd channels (`src/migration.rs` accepts them; QEMU's
/// `multifd_load_setup` and `multifd_recv_sync_main`).
pub trait IncomingMultifd {
    /// The configuration record names the channels: accept them and start receiving.
    fn start(&mut self, config: MultifdConfig) -> Result<(), MigrationError>;
    /// The main stream's sync `n`: every channel's pages before it are applied first.
    fn sync(&mut self, n: u64) -> Result<(), MigrationError>;
    /// The end, after the last sync: the channels close; returns the bytes they carried.
    fn finish(&mut self) -> u64;
}

/// Writes the record that ends a pass over the multifd channels: sync `n`.
pub fn write_multifd_sync(w: &mut impl Write, n: u64) -> Result<u64, MigrationError> {
    write_record(w, TAG_MULTIFD_SYNC, &n.to_le_bytes())
}

fn write_record(w: &mut impl Write, tag: u8, payload: &[u8]) -> Result<u64, MigrationError> {
    w.write_all(&[tag])?;
    w.write_all(&(payload.len() as u64).to_le_bytes())?;
    w.write_all(payload)?;
    Ok(9 + payload.len() as u64)
}

/// Sends the pages of `ranges` (all of guest RAM, or the dirty part of it) in RAM records.
pub fn send_pages(
    machine: &ObjectRef,
    pages: impl Iterator<Item = u64>,
    w: &mut impl Write,
    progress: &mut Progress,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), MigrationError> {
    let ms = machine_state(machine).ok_or_else(|| MigrationError::Stream("not a machine".into()))?;
    let ram = ms.ram();
    let mut record = Vec::with_capacity((PAGES_PER_RECORD * (PAGE_SIZE + 8)) as usize);
    let mut in_record = 0;
    for_each_page(&ram, pages, cancelled, |addr, data| {
        match data {
            None => {
                record.extend_from_slice(&(addr | ZERO_PAGE).to_le_bytes());
                progress.zero_pages += 1;
            }
            Some(page) => {
                record.extend_from_slice(&addr.to_le_bytes());
                record.extend_from_slice(page);
                progress.normal_pages += 1;
            }
        }
        in_record += 1;
        if in_record == PAGES_PER_RECORD {
            progress.transferred += write_record(w, TAG_RAM, &record)?;
            record.clear();
            in_record = 0;
        }
        Ok(())
    })?;
    if in_record > 0 {
        progress.transferred += write_record(w, TAG_RAM, &record)?;
    }
    Ok(())
}

/// Calls `f` with each of `pages` and its contents, `None` for a zero page, a record's
/// worth at a time (checking `cancelled` between). A page of anonymous RAM the host never
/// populated is known to be zero without reading it (see [`unpopulated_pages`]): reading
/// would make the host map it, a fault per page, which is most of an idle guest's
/// migration otherwise.
pub(crate) fn for_each_page(
    ram: &vm_memory::GuestMemoryMmap,
    pages: impl Iterator<Item = u64>,
    cancelled: &dyn Fn() -> bool,
    mut f: impl FnMut(u64, Option<&[u8]>) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    let mut pages = pages.peekable();
    let mut chunk = Vec::with_capacity(PAGES_PER_RECORD as usize);
    let mut page = vec![0u8; PAGE_SIZE as usize];
    while pages.peek().is_some() {
        if cancelled() {
            return Err(MigrationError::Cancelled);
        }
        chunk.clear();
        chunk.extend(pages.by_ref().take(PAGES_PER_RECORD as usize));
        let untouched = unpopulated_pages(ram, &chunk);
        for (i, &addr) in chunk.iter().enumerate() {
            if untouched.as_ref().is_some_and(|u| u[i]) {
                f(addr, None)?;
                continue;
            }
            let host = ram
                .get_host_address(GuestAddress(addr))
                .map_err(|e| MigrationError::Stream(format!("reading guest page {addr:#x}: {e}")))?;
            // SAFETY: RAM regions are whole pages, so the page at `host` lies in one
            // mapping, which `ram` keeps; `page` is a page long. A vCPU may write the page
            // meanwhile (as in QEMU's save_normal_page): the dirty log then has it sent
            // again. One memcpy and one memcmp, not byte loops (a debug build in the
            // nested rig ran pre-copy 30 times slower than QEMU with them).
            unsafe { std::ptr::copy_nonoverlapping(host, page.as_mut_ptr(), PAGE_SIZE as usize) };
            if page[..] == ZEROS[..] {
                f(addr, None)?;
            } else {
                f(addr, Some(&page))?;
            }
        }
    }
    Ok(())
}

/// A zero page to compare with.
static ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// `/proc/self/pagemap`, once; `None` where it cannot be opened (a sandbox), and pages
/// are then read.
static PAGEMAP: std::sync::LazyLock<Option<std::fs::File>> =
    std::sync::LazyLock::new(|| std::fs::File::open("/proc/self/pagemap").ok());

/// Whether each of `pages` (ascending) is anonymous RAM the host has neither populated
/// nor swapped out, so it reads as zero: one `/proc/self/pagemap` read over their span
/// (bit 63: present, bit 62: swapped). `None` when not known that way (see
/// [`host_span`], or no pagemap).
fn unpopulated_pages(ram: &vm_memory::GuestMemoryMmap, pages: &[u64]) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let (start, span) = host_span(ram, pages)?;
    let pagemap = PAGEMAP.as_ref()?;
    let mut entries = vec![0u8; span * 8];
    let at = (start as u64 / PAGE_SIZE) * 8;
    pagemap.read_exact_at(&mut entries, at).ok()?;
    let first = pages[0];
    Some(
        pages
            .iter()
            .map(|&p| {
                let i = ((p - first) / PAGE_SIZE) as usize * 8;
                let e = u64::from_le_bytes(entries[i..i + 8].try_into().expect("8 bytes"));
                e & (3 << 62) == 0
            })
            .collect(),
    )
}

/// Guest RAM written into a file at fixed offsets (a `file:` migration, what `virsh save`
/// with a path or a snapshot writes): each page of RAM range `i` at `base` plus the
/// lengths of the ranges before it. Zero pages of the first pass are holes; pages
/// written again in later passes overwrite their place. A restore maps the area instead
/// of reading it (see [`load_vm`]), so it costs nothing per page until the guest
/// touches one.
pub struct MappedRam {
    file: std::fs::File,
    base: u64,
    ranges: Vec<(u64, u64)>,
}

impl MappedRam {
    /// Starts the area after the stream so far (`w`, on `file`'s open file description):
    /// a record saying where it is, then a hole as large as guest RAM.
    pub fn begin(
        machine: &ObjectRef,
        file: std::fs::File,
        w: &mut impl Write,
        progress: &mut Progress,
    ) -> Result<MappedRam, MigrationError> {
        let ranges = ram_ranges(machine);
        let size: u64 = ranges.iter().map(|r| r.1).sum();
        // The record is a few dozen bytes: the area starts at the next boundary past it.
        let base = (progress.transferred + 4096).next_multiple_of(MAPPED_RAM_ALIGN);
        let payload = json!({"base": base, "size": size}).to_string();
        progress.transferred += write_record(w, TAG_MAPPED_RAM, payload.as_bytes())?;
        w.flush()?;
        file.set_len(base + size)?;
        Ok(MappedRam { file, base, ranges })
    }

    /// Where guest page `addr` goes in the file.
    fn offset_of(&self, addr: u64) -> Option<u64> {
        let mut offset = self.base;
        for &(start, len) in &self.ranges {
            if (start..start + len).contains(&addr) {
                return Some(offset + (addr - start));
            }
            offset += len;
        }
        None
    }

    /// Writes `pages` at their places. `first_pass`: the area is a hole, so zero pages
    /// are left out.
    pub fn send_pages(
        &self,
        machine: &ObjectRef,
        pages: impl Iterator<Item = u64>,
        progress: &mut Progress,
        first_pass: bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), MigrationError> {
        use std::os::unix::fs::FileExt;
        let ms = machine_state(machine).ok_or_else(|| MigrationError::Stream("not a machine".into()))?;
        let ram = ms.ram();
        let zeros = vec![0u8; PAGE_SIZE as usize];
        for_each_page(&ram, pages, cancelled, |addr, data| {
            match data {
                None => {
                    progress.zero_pages += 1;
                    if first_pass {
                        return Ok(());
                    }
                }
                Some(_) => progress.normal_pages += 1,
            }
            let at = self
                .offset_of(addr)
                .ok_or_else(|| MigrationError::Stream(format!("page {addr:#x} is not guest RAM")))?;
            self.file.write_all_at(data.unwrap_or(&zeros), at)?;
            progress.transferred += PAGE_SIZE;
            Ok(())
        })
    }

    /// Ends the area: what `w` writes next (the state) goes after it.
    pub fn finish(&self, w: &mut impl Write) -> Result<(), MigrationError> {
        use std::io::Seek;
        w.flush()?;
        let size: u64 = self.ranges.iter().map(|r| r.1).sum();
        (&self.file).seek(std::io::SeekFrom::Start(self.base + size))?;
        Ok(())
    }
}

/// Every page of guest RAM.
pub fn all_pages(machine: &ObjectRef) -> impl Iterator<Item = u64> {
    ram_ranges(machine)
        .into_iter()
        .flat_map(|(start, len)| (0..len / PAGE_SIZE).map(move |i| start + i * PAGE_SIZE))
}

/// The start of a stream: magic and configuration (naming the `multifd` channels RAM
/// goes over, if any). Checks that every device can move.
pub fn send_header(
    machine: &ObjectRef,
    w: &mut impl Write,
    progress: &mut Progress,
    multifd: Option<MultifdConfig>,
) -> Result<(), MigrationError> {
    let devices = device_states(machine)?;
    w.write_all(MAGIC)?;
    progress.transferred += MAGIC.len() as u64;
    let mut config = config(machine, &devices);
    if let Some(m) = multifd {
        config["multifd"] = m.to_json();
    }
    let config = config.to_string();
    progress.transferred += write_record(w, TAG_CONFIG, config.as_bytes())?;
    progress.total_ram = ram_ranges(machine).iter().map(|r| r.1).sum();
    Ok(())
}

/// The end of a stream, with the VM paused: the accelerator's, the CPUs' and the devices'
/// sections, then `END`.
pub fn send_state(machine: &ObjectRef, w: &mut impl Write, progress: &mut Progress) -> Result<(), MigrationError> {
    let ms = machine_state(machine).ok_or_else(|| MigrationError::Stream("not a machine".into()))?;
    let ops = ms
        .accel_ops()
        .ok_or_else(|| MigrationError::Stream("no accelerator".into()))?;
    let accel = ops.save_vm_state()?;
    let cpus = (0..ms.cpus().len() as u32)
        .map(|i| ops.save_cpu_state(i).map(|s| s.to_json()))
        .collect::<Result<Vec<_>, _>>()?;
    let devices: serde_json::Map<String, Value> = device_states(machine)?
        .into_iter()
        .map(|(path, (_, section))| (path, section.to_json()))
        .collect();
    let state = json!({"accel": accel.to_json(), "cpus": cpus, "devices": devices}).to_string();
    progress.transferred += write_record(w, TAG_STATE, state.as_bytes())?;
    progress.transferred += write_record(w, TAG_END, &[])?;
    w.flush()?;
    Ok(())
}

/// A whole stream of a paused VM: configuration, all RAM, state.
pub fn save_vm(machine: &ObjectRef, w: &mut impl Write, progress: &mut Progress) -> Result<(), MigrationError> {
    send_header(machine, w, progress, None)?;
    send_pages(machine, all_pages(machine), w, progress, &|| false)?;
    send_state(machine, w, progress)
}

fn read_record(r: &mut impl Read) -> Result<(u8, Vec<u8>), MigrationError> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            MigrationError::Stream("the stream ended early".into())
        } else {
            e.into()
        }
    })?;
    let len = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
    let max = if head[0] == TAG_STATE {
        MAX_STATE_RECORD
    } else {
        MAX_RECORD
    };
    if len > max {
        return Err(MigrationError::Stream(format!("a record of {len} bytes")));
    }
    let mut payload = Vec::with_capacity(len.min(MAX_RECORD) as usize);
    let ended = || MigrationError::Stream("the stream ended inside a record".into());
    r.take(len).read_to_end(&mut payload).map_err(|_| ended())?;
    if payload.len() as u64 != len {
        return Err(ended());
    }
    Ok((head[0], payload))
}

/// Maps a [`MappedRam`] area of `file` over guest RAM: anonymous RAM is replaced by a
/// private (copy-on-write) mapping of the file at the same host address, which the KVM
/// slots and vhost tables already name; RAM backed by a file of its own (shared memory
/// backends) keeps its mapping and gets the data copied.
fn map_ram(
    ram: &vm_memory::GuestMemoryMmap,
    file: &std::fs::File,
    base: u64,
    size: u64,
) -> Result<(), MigrationError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let total: u64 = ram.iter().map(|r| r.len()).sum();
    if size != total {
        return Err(MigrationError::Mismatch(format!(
            "Length mismatch: guest RAM: {size:#x} in != {total:#x}"
        )));
    }
    let end = base
        .checked_add(size)
        .ok_or_else(|| MigrationError::Stream("mapped RAM past the end of the file".into()))?;
    if file.metadata()?.len() < end || !base.is_multiple_of(PAGE_SIZE) {
        return Err(MigrationError::Stream("the file is shorter than its guest RAM".into()));
    }
    let mut offset = base;
    for region in ram.iter() {
        let len = region.len();
        let host = ram
            .get_host_address(region.start_addr())
            .map_err(|e| MigrationError::Stream(format!("guest RAM: {e}")))?;
        if region.file_offset().is_some() {
            // SAFETY: `host` is the start of this region's mapping of `len` bytes, which
            // `ram` keeps mapped; nothing else writes guest RAM while a stream loads.
            let dest = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
            file.read_exact_at(dest, offset)?;
        } else {
            // SAFETY: replaces exactly this region's anonymous mapping (page-aligned, `len`
            // bytes, kept by `ram`) with a private mapping of the file, readable and
            // writable as before; `offset` is page-aligned (checked above, `len` are
            // whole pages).
            let p = unsafe {
                libc::mmap(
                    host.cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        offset += len;
    }
    Ok(())
}

/// Loads one RAM record. A zero page is written only where the destination's page is not
/// zero already: pages the host never touched (most of a fresh VM's RAM, found with one
/// `mincore` per record) are skipped without reading them, which would make the host
/// fault each one in (QEMU's `ram_handle_zero` checks too).
fn load_pages(ram: &vm_memory::GuestMemoryMmap, payload: &[u8]) -> Result<(), MigrationError> {
    let mut zero_pages = Vec::new();
    let mut at = 0;
    while at + 8 <= payload.len() {
        let word = u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
        at += 8;
        let addr = word & !(PAGE_SIZE - 1);
        let bad = |e: String| MigrationError::Stream(format!("page {addr:#x}: {e}"));
        if word & ZERO_PAGE != 0 {
            zero_pages.push(addr);
        } else {
            let data = payload
                .get(at..at + PAGE_SIZE as usize)
                .ok_or_else(|| bad("truncated".into()))?;
            ram.write_slice(data, GuestAddress(addr))
                .map_err(|e| bad(e.to_string()))?;
            at += PAGE_SIZE as usize;
        }
    }
    load_zero_pages(ram, &zero_pages)
}

/// Makes `zero_pages` (ascending guest addresses) read as zeros, writing only those that
/// are not zero already (see [`load_pages`]).
pub(crate) fn load_zero_pages(
    ram: &vm_memory::GuestMemoryMmap,
    zero_pages: &[u64],
) -> Result<(), MigrationError> {
    let resident = resident_pages(ram, zero_pages);
    for (i, &addr) in zero_pages.iter().enumerate() {
        if resident.as_ref().is_some_and(|r| !r[i]) {
            continue;
        }
        let bad = |e: String| MigrationError::Stream(format!("page {addr:#x}: {e}"));
        let mut current = [0u8; PAGE_SIZE as usize];
        ram.read_slice(&mut current, GuestAddress(addr))
            .map_err(|e| bad(e.to_string()))?;
        if current.iter().any(|&b| b != 0) {
            ram.write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(addr))
                .map_err(|e| bad(e.to_string()))?;
        }
    }
    Ok(())
}

/// Where `pages` (ascending guest addresses) lie in one anonymous host mapping: its host
/// address and the span in pages. `None` when the span leaves one mapping, is large (a
/// sparse list of dirty pages), or is file-backed: only anonymous memory reads as zeroes
/// where it was never touched; a file's page that is not in the page cache still has its
/// data.
fn host_span(ram: &vm_memory::GuestMemoryMmap, pages: &[u64]) -> Option<(*mut u8, usize)> {
    let (&first, &last) = (pages.first()?, pages.last()?);
    if last < first {
        return None;
    }
    let span = ((last - first) / PAGE_SIZE + 1) as usize;
    if span > 4 * PAGES_PER_RECORD as usize {
        return None;
    }
    if ram.find_region(GuestAddress(first))?.file_offset().is_some() {
        return None;
    }
    let start = ram.get_host_address(GuestAddress(first)).ok()?;
    let end = ram.get_host_address(GuestAddress(last)).ok()?;
    if end as usize - start as usize != (span - 1) * PAGE_SIZE as usize {
        return None;
    }
    Some((start, span))
}

/// Whether each of `pages` (ascending guest addresses) is resident on the host, by one
/// `mincore` over their span; `None` where [`host_span`] says so.
fn resident_pages(ram: &vm_memory::GuestMemoryMmap, pages: &[u64]) -> Option<Vec<bool>> {
    let (start, span) = host_span(ram, pages)?;
    let first = pages[0];
    let mut vec = vec![0u8; span];
    // SAFETY: [start, start + span pages) is one mapping of guest RAM (checked above:
    // both ends translate and are as far apart as in the guest), and `vec` has a byte
    // per page.
    let ret = unsafe {
        libc::mincore(start.cast(), span * PAGE_SIZE as usize, vec.as_mut_ptr())
    };
    if ret != 0 {
        return None;
    }
    Some(
        pages
            .iter()
            .map(|&p| vec[((p - first) / PAGE_SIZE) as usize] & 1 != 0)
            .collect(),
    )
}

/// Compares the stream's configuration with `machine`'s, naming the first difference.
fn check_config(machine: &ObjectRef, theirs: &Value) -> Result<(), MigrationError> {
    let devices = device_states(machine)?;
    let ours = config(machine, &devices);
    let mismatch = |s: String| Err(MigrationError::Mismatch(s));
    if theirs["machine"] != ours["machine"] {
        return mismatch(format!(
            "Machine type mismatch: the stream has {}, this VM is {}",
            theirs["machine"], ours["machine"]
        ));
    }
    if theirs["ram"] != ours["ram"] {
        let size = |v: &Value| -> u64 {
            v.as_array()
                .map(|a| a.iter().filter_map(|r| r[1].as_u64()).sum())
                .unwrap_or(0)
        };
        return mismatch(format!(
            "Length mismatch: guest RAM: {:#x} in != {:#x}",
            size(&theirs["ram"]),
            size(&ours["ram"])
        ));
    }
    if theirs["cpus"] != ours["cpus"] {
        return mismatch(format!(
            "CPU count mismatch: the stream has {}, this VM has {}",
            theirs["cpus"], ours["cpus"]
        ));
    }
    let list = |v: &Value| -> BTreeMap<String, String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|d| {
                        (
                            d["path"].as_str().unwrap_or_default().to_string(),
                            d["type"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (theirs, ours) = (list(&theirs["devices"]), list(&ours["devices"]));
    if let Some((path, ty)) = theirs.iter().find(|(p, _)| !ours.contains_key(*p)) {
        return mismatch(format!("Unknown savevm section '{path}' ({ty}): this VM has no such device"));
    }
    if let Some((path, ty)) = ours.iter().find(|(p, _)| !theirs.contains_key(*p)) {
        return mismatch(format!("Device '{path}' ({ty}) is not in the stream"));
    }
    if let Some((path, ty)) = theirs.iter().find(|(p, t)| ours.get(*p) != Some(t)) {
        return mismatch(format!(
            "Device '{path}' is {} here but {ty} in the stream",
            ours[path]
        ));
    }
    Ok(())
}

/// Reads a whole stream into `machine` (built with the same configuration, not started):
/// RAM, then the accelerator's, the devices' and the CPUs' state. Returns the bytes read.
/// `file`: the stream is this file, read through `r` without a buffer; then a mapped RAM
/// area ([`MappedRam`]) is mapped into guest RAM copy-on-write, not read: pages come from
/// the file as the guest first touches them.
pub fn load_vm(machine: &ObjectRef, r: &mut impl Read, file: Option<&std::fs::File>) -> Result<u64, MigrationError> {
    load_vm_multifd(machine, r, file, None)
}

/// [`load_vm`] where the `multifd` capability is on: the configuration record must name
/// channels, which `multifd` accepts, and RAM comes over them.
pub fn load_vm_multifd(
    machine: &ObjectRef,
    r: &mut impl Read,
    file: Option<&std::fs::File>,
    mut multifd: Option<&mut dyn IncomingMultifd>,
) -> Result<u64, MigrationError> {
    let ms = machine_state(machine).ok_or_else(|| MigrationError::Stream("not a machine".into()))?;
    let mut magic = [0u8; 16];
    r.read_exact(&mut magic)
        .map_err(|_| MigrationError::Stream("no stream header".into()))?;
    if &magic != MAGIC {
        return Err(MigrationError::Stream("not a qomvm migration stream".into()));
    }
    let mut read = MAGIC.len() as u64;
    let ram = ms.ram();
    let mut configured = false;
    // Whether RAM comes over multifd channels, and whether the last record was their sync.
    let mut channels = false;
    let mut synced = false;
    loop {
        let (tag, payload) = read_record(r)?;
        read += 9 + payload.len() as u64;
        match tag {
            TAG_CONFIG => {
                let config: Value = serde_json::from_slice(&payload)
                    .map_err(|e| MigrationError::Stream(format!("configuration: {e}")))?;
                check_config(machine, &config)?;
                configured = true;
                match (config.get("multifd"), multifd.as_deref_mut()) {
                    (Some(m), Some(incoming)) => {
                        incoming.start(MultifdConfig::from_json(m)?)?;
                        channels = true;
                    }
                    (Some(m), None) => {
                        return Err(MigrationError::Multifd(format!(
                            "multifd: the source sends RAM over {} multifd channels, but the capability 'multifd' is off here: enable it with migrate-set-capabilities before migrate-incoming",
                            m["channels"]
                        )))
                    }
                    (None, Some(_)) => {
                        return Err(MigrationError::Multifd(
                            "multifd: the capability 'multifd' is on here, but the source sends RAM without it: enable it on both sides or on neither".into(),
                        ))
                    }
                    (None, None) => {}
                }
            }
            TAG_RAM if configured && !channels => load_pages(&ram, &payload)?,
            TAG_MULTIFD_SYNC if channels => {
                let n: [u8; 8] = payload
                    .as_slice()
                    .try_into()
                    .map_err(|_| MigrationError::Stream("a multifd sync record".into()))?;
                if let Some(incoming) = multifd.as_deref_mut() {
                    incoming.sync(u64::from_le_bytes(n))?;
                }
                synced = true;
                continue;
            }
            TAG_MAPPED_RAM if configured => {
                let file = file.ok_or_else(|| {
                    MigrationError::Stream("this stream keeps guest RAM in a file: restore it from a file".into())
                })?;
                let area: Value = serde_json::from_slice(&payload)
                    .map_err(|e| MigrationError::Stream(format!("mapped RAM: {e}")))?;
                let (Some(base), Some(size)) = (area["base"].as_u64(), area["size"].as_u64()) else {
                    return Err(MigrationError::Stream("mapped RAM: no base or size".into()));
                };
                map_ram(&ram, file, base, size)?;
                use std::io::Seek;
                let mut f = file;
                f.seek(std::io::SeekFrom::Start(base + size))?;
                read = base + size;
            }
            TAG_STATE if configured => {
                if channels {
                    if !synced {
                        return Err(MigrationError::Stream(
                            "the device state came before the last multifd sync".into(),
                        ));
                    }
                    // No channel writes guest RAM once the devices load.
                    if let Some(incoming) = multifd.as_deref_mut() {
                        read += incoming.finish();
                    }
                }
                let state: Value = serde_json::from_slice(&payload)
                    .map_err(|e| MigrationError::Stream(format!("state: {e}")))?;
                load_state(machine, &state)?;
            }
            TAG_END if configured => return Ok(read),
            _ => return Err(MigrationError::Stream(format!("unexpected record {tag}"))),
        }
        synced = false;
    }
}

fn load_state(machine: &ObjectRef, state: &Value) -> Result<(), MigrationError> {
    let ms = machine_state(machine).ok_or_else(|| MigrationError::Stream("not a machine".into()))?;
    let ops = ms
        .accel_ops()
        .ok_or_else(|| MigrationError::Stream("no accelerator".into()))?;
    let section = |v: &Value| VmStateSection::from_json(v).map_err(MigrationError::from);
    ops.load_vm_state(&section(&state["accel"])?)?;
    let saved_devices = state["devices"]
        .as_object()
        .ok_or_else(|| MigrationError::Stream("no device states".into()))?;
    for (path, dev) in devices(machine) {
        let saved = saved_devices
            .get(&path)
            .ok_or_else(|| MigrationError::Mismatch(format!("Device '{path}' is not in the stream")))?;
        let imp = device_impl(&dev).expect("listed devices are devices");
        imp.load_state(&section(saved)?)
            .map_err(|source| MigrationError::Device { path: path.clone(), source })?;
    }
    let cpus = state["cpus"]
        .as_array()
        .ok_or_else(|| MigrationError::Stream("no CPU states".into()))?;
    for (i, cpu) in cpus.iter().enumerate() {
        ops.load_cpu_state(i as u32, section(cpu)?)?;
    }
    Ok(())
}
