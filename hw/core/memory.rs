//! Address spaces and memory regions: QEMU's `system/memory.c`, reduced to what a KVM VMM
//! dispatches to.
//!
//! An [`AddressSpace`] (`system-io`, `system-memory`) holds the regions devices map into it.
//! The map is read-mostly: vCPU threads dispatch through an immutable [`FlatView`] loaded
//! with one atomic operation (QEMU's RCU flatview), and a change builds a new view and swaps
//! it in. No lock is taken on the access path; devices lock their own state.

use std::fmt;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::core::accel_ops::{AccelOpsRef, EventFd, IoEventAddr, IoEventSpace, RamBlock, SlotId};
use crate::core::log_limit::RateLimitedLog;

/// A device's handlers for accesses to one of its regions (QEMU's `MemoryRegionOps`).
///
/// `offset` is relative to the start of the region; `size` is 1, 2, 4 or 8 bytes. Handlers
/// take `&self`: they run on vCPU threads and lock what they change.
pub trait MemoryRegionOps: Send + Sync {
    /// Reads `size` bytes at `offset`.
    fn read(&self, offset: u64, size: u32) -> u64;
    /// Writes the low `size` bytes of `value` at `offset`.
    fn write(&self, offset: u64, value: u64, size: u32);
}

/// A write to a region that signals an eventfd inside the accelerator, without an exit
/// to userspace, wherever the region is mapped (QEMU's `memory_region_add_eventfd`).
///
/// The region's handler must signal `fd` itself for the same write: it still runs where
/// the accelerator has no ioeventfds (qtest), or before one is registered.
#[derive(Clone)]
pub struct RegionEventFd {
    /// Offset of the watched write in the region.
    pub offset: u64,
    /// Width of the write in bytes, or 0 for any width.
    pub len: u32,
    /// Only writes of this value signal; `None` matches every value.
    pub datamatch: Option<u64>,
    /// The eventfd to signal.
    pub fd: Arc<EventFd>,
}

/// Host memory behind a region, which the accelerator maps straight into the guest where
/// it can (QEMU's `memory_region_init_ram` for a device: a framebuffer): the guest's
/// accesses then never leave it. The region's handlers serve the same memory where it
/// cannot (qtest) or before it is mapped.
pub struct RamBacking {
    /// Host address of the memory.
    pub host_addr: u64,
    /// What keeps the memory alive: the region holds it as long as it may be mapped.
    pub owner: Arc<dyn std::any::Any + Send + Sync>,
}

/// A named range of guest addresses served by a device.
pub struct MemoryRegion {
    name: String,
    size: u64,
    ops: Arc<dyn MemoryRegionOps>,
    eventfds: Vec<RegionEventFd>,
    ram: Option<RamBacking>,
    /// The backing is ROM: the accelerator maps it read-only and the guest's writes go to
    /// the handlers (which drop them).
    readonly: bool,
    /// Offsets whose writes the accelerator may buffer (QEMU's coalesced MMIO).
    coalesced: Option<std::ops::Range<u64>>,
    /// Reads return memory and have no side effect (see [`MemoryRegion::is_memory`]).
    memory_like: bool,
}

impl MemoryRegion {
    /// A region of `size` bytes served by `ops` (QEMU's `memory_region_init_io`).
    pub fn new_io(name: impl Into<String>, size: u64, ops: Arc<dyn MemoryRegionOps>) -> Arc<Self> {
        Self::new_io_with_eventfds(name, size, ops, Vec::new())
    }

    /// A region whose writes listed in `eventfds` go to eventfds (ioeventfd) where the
    /// accelerator supports it.
    pub fn new_io_with_eventfds(
        name: impl Into<String>,
        size: u64,
        ops: Arc<dyn MemoryRegionOps>,
        eventfds: Vec<RegionEventFd>,
    ) -> Arc<Self> {
        Arc::new(MemoryRegion {
            eventfds,
            ..Self::plain(name.into(), size, ops)
        })
    }

    /// The fields of a region with nothing but handlers.
    fn plain(name: String, size: u64, ops: Arc<dyn MemoryRegionOps>) -> MemoryRegion {
        MemoryRegion {
            name,
            size,
            ops,
            eventfds: Vec::new(),
            ram: None,
            readonly: false,
            coalesced: None,
            memory_like: false,
        }
    }

    /// A region served by `ops` whose reads return RAM or ROM without side effects (the
    /// i440FX's PAM, which picks between the shadow RAM and the firmware's copy): what
    /// QEMU models as aliases of RAM and ROM regions, which a guest core dump includes.
    pub fn new_io_memory(
        name: impl Into<String>,
        size: u64,
        ops: Arc<dyn MemoryRegionOps>,
    ) -> Arc<Self> {
        Arc::new(MemoryRegion {
            memory_like: true,
            ..Self::plain(name.into(), size, ops)
        })
    }

    /// A region whose writes to the offsets `coalesced` the accelerator may buffer and
    /// hand to `ops` later, in order (QEMU's `memory_region_add_coalescing`): for memory
    /// and registers whose writes have no effect until read back or drawn (VGA memory,
    /// an index register). The vCPUs hand them over before any access they exit for.
    pub fn new_io_coalesced(
        name: impl Into<String>,
        size: u64,
        ops: Arc<dyn MemoryRegionOps>,
        coalesced: std::ops::Range<u64>,
    ) -> Arc<Self> {
        Arc::new(MemoryRegion {
            coalesced: Some(coalesced.start.min(size)..coalesced.end.min(size)),
            ..Self::plain(name.into(), size, ops)
        })
    }

    /// A region backed by `size` bytes of host memory (`ram`), mapped into the guest
    /// directly where the accelerator can; `ops` must read and write that same memory.
    pub fn new_ram_device(
        name: impl Into<String>,
        size: u64,
        ops: Arc<dyn MemoryRegionOps>,
        ram: RamBacking,
    ) -> Arc<Self> {
        Arc::new(Self::backed(name.into(), size, ops, ram, false))
    }

    /// A ROM backed by `size` bytes of host memory (`ram`), mapped into the guest read-only
    /// where the accelerator can (QEMU's `memory_region_init_rom`): the guest's reads never
    /// leave it, its writes reach `ops`, which must read that same memory and drop writes.
    pub fn new_rom_device(
        name: impl Into<String>,
        size: u64,
        ops: Arc<dyn MemoryRegionOps>,
        ram: RamBacking,
    ) -> Arc<Self> {
        Arc::new(Self::backed(name.into(), size, ops, ram, true))
    }

    fn backed(
        name: String,
        size: u64,
        ops: Arc<dyn MemoryRegionOps>,
        ram: RamBacking,
        readonly: bool,
    ) -> MemoryRegion {
        MemoryRegion {
            ram: Some(ram),
            readonly,
            ..Self::plain(name, size, ops)
        }
    }

    /// The region's ioeventfds.
    pub fn eventfds(&self) -> &[RegionEventFd] {
        &self.eventfds
    }

    /// The region's name, for `info mtree`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The region's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the region is memory (RAM, ROM, or a selection of them): reading it has no
    /// side effect, so a guest core dump includes it (QEMU's `memory_region_is_ram` for
    /// `guest_phys_blocks`), where device registers are left out.
    pub fn is_memory(&self) -> bool {
        self.ram.is_some() || self.memory_like
    }
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Errors from changing an address space's map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// The new region overlaps one already mapped.
    #[error("{space}: region '{name}' at 0x{start:x}..0x{end:x} overlaps '{other}' at 0x{other_start:x}..0x{other_end:x}")]
    Overlap {
        /// The address space.
        space: String,
        /// The new region.
        name: String,
        /// Its first address.
        start: u64,
        /// One past its last address.
        end: u64,
        /// The region in the way.
        other: String,
        /// Its first address.
        other_start: u64,
        /// One past its last address.
        other_end: u64,
    },
    /// The region would extend past the end of the address space.
    #[error("{space}: region '{name}' at 0x{start:x} (size 0x{size:x}) does not fit in the address space")]
    OutOfRange {
        /// The address space.
        space: String,
        /// The region.
        name: String,
        /// Its first address.
        start: u64,
        /// Its size.
        size: u64,
    },
    /// An empty region.
    #[error("{space}: region '{name}' has size 0")]
    Empty {
        /// The address space.
        space: String,
        /// The region.
        name: String,
    },
}

/// One mapped region in a flat view.
#[derive(Clone)]
pub struct FlatRange {
    start: u64,
    /// Last address (inclusive), so a range may end at `u64::MAX`.
    last: u64,
    region: Arc<MemoryRegion>,
}

impl FlatRange {
    /// First address.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// Last address, inclusive.
    pub fn last(&self) -> u64 {
        self.last
    }
    /// The region.
    pub fn region(&self) -> &Arc<MemoryRegion> {
        &self.region
    }
}

/// An immutable, sorted view of an address space's map (QEMU's `FlatView`).
#[derive(Clone, Default)]
pub struct FlatView {
    ranges: Vec<FlatRange>,
    /// `ranges[i].start`, packed so the binary search touches few cache lines.
    starts: Vec<u64>,
}

impl FlatView {
    fn from_ranges(ranges: Vec<FlatRange>) -> Self {
        let starts = ranges.iter().map(|r| r.start).collect();
        FlatView { ranges, starts }
    }

    /// The mapped ranges, by address.
    pub fn ranges(&self) -> &[FlatRange] {
        &self.ranges
    }

    #[inline]
    fn lookup(&self, addr: u64) -> Option<&FlatRange> {
        // The ranges are sorted and disjoint: the candidate is the last one starting at or
        // below `addr`.
        let i = self.starts.partition_point(|&start| start <= addr);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (addr <= r.last).then_some(r)
    }

    #[inline]
    fn read(&self, space: &AddressSpace, addr: u64, size: u32) -> u64 {
        match self.lookup(addr) {
            Some(r) => r.region.ops.read(addr - r.start, size),
            None => {
                space.unassigned.log(&space.name, "", addr, size, None);
                all_ones(size)
            }
        }
    }

    #[inline]
    fn write(&self, space: &AddressSpace, addr: u64, value: u64, size: u32) {
        match self.lookup(addr) {
            Some(r) => r.region.ops.write(addr - r.start, value, size),
            None => space.unassigned.log(&space.name, "", addr, size, Some(value)),
        }
    }
}

/// A vCPU's handle on an address space: it keeps the current flat view and checks with one
/// atomic load whether it is still current, so a dispatch touches no shared counter (QEMU's
/// vCPUs read the flatview under RCU for the same reason).
pub struct Dispatcher<'a> {
    space: &'a AddressSpace,
    view: arc_swap::Cache<&'a ArcSwap<FlatView>, Arc<FlatView>>,
}

impl Dispatcher<'_> {
    /// Takes the current view if the space changed, letting go of the one kept (and of
    /// the regions only it still held).
    pub fn refresh(&mut self) {
        self.view.load();
    }

    /// Dispatches a read (see [`AddressSpace::read`]).
    #[inline]
    pub fn read(&mut self, addr: u64, size: u32) -> u64 {
        let space = self.space;
        self.view.load().read(space, addr, size)
    }

    /// Dispatches a write (see [`AddressSpace::write`]).
    #[inline]
    pub fn write(&mut self, addr: u64, value: u64, size: u32) {
        let space = self.space;
        self.view.load().write(space, addr, value, size)
    }

    /// Reads `data.len()` bytes (1, 2, 4 or 8) little-endian, as a KVM exit hands them over.
    #[inline]
    pub fn read_bytes(&mut self, addr: u64, data: &mut [u8]) {
        let size = data.len().min(8);
        let value = self.read(addr, size as u32);
        data[..size].copy_from_slice(&value.to_le_bytes()[..size]);
    }

    /// Writes `data` (1, 2, 4 or 8 bytes, little-endian), as a KVM exit hands it over.
    #[inline]
    pub fn write_bytes(&mut self, addr: u64, data: &[u8]) {
        self.write(addr, le_value(data), data.len().min(8) as u32);
    }
}

#[inline]
fn le_value(data: &[u8]) -> u64 {
    let size = data.len().min(8);
    let mut buf = [0u8; 8];
    buf[..size].copy_from_slice(&data[..size]);
    u64::from_le_bytes(buf)
}

/// Logs accesses that hit no region, at most a few times per second, so a guest cannot
/// flood the log.
struct UnassignedLog(RateLimitedLog);

impl UnassignedLog {
    fn new() -> Self {
        UnassignedLog(RateLimitedLog::new(10))
    }

    #[cold]
    fn log(&self, space: &str, kind: &str, addr: u64, size: u32, value: Option<u64>) {
        self.0.info(|| match value {
            Some(v) => format!("{space}: unassigned{kind} write of 0x{v:x} ({size} bytes) at 0x{addr:x}, dropped"),
            None => format!("{space}: unassigned{kind} read ({size} bytes) at 0x{addr:x}, returning all ones"),
        });
    }
}

/// An address space (QEMU's `AddressSpace`): `system-io` for ports, `system-memory` for MMIO.
pub struct AddressSpace {
    name: String,
    /// Last valid address: 0xffff for ports, `u64::MAX` for memory.
    last: u64,
    view: ArcSwap<FlatView>,
    /// Serialises writers; readers never take it.
    update: Mutex<()>,
    unassigned: UnassignedLog,
    /// The accelerator that registers mapped regions' ioeventfds (QEMU's KVM memory
    /// listener's `eventfd_add`); empty until one is installed.
    accel: Arc<OnceLock<AccelOpsRef>>,
    /// The accelerator's slots of RAM-backed regions mapped here: region, slot.
    slots: Mutex<Vec<(Arc<MemoryRegion>, SlotId)>>,
}

impl fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressSpace")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The all-ones value a read of `size` bytes from nowhere returns.
#[inline]
fn all_ones(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

impl AddressSpace {
    /// An empty address space whose addresses run from 0 to `last`.
    pub fn new(name: impl Into<String>, last: u64) -> Self {
        AddressSpace {
            name: name.into(),
            last,
            view: ArcSwap::from_pointee(FlatView::default()),
            update: Mutex::new(()),
            unassigned: UnassignedLog::new(),
            accel: Arc::new(OnceLock::new()),
            slots: Mutex::new(Vec::new()),
        }
    }

    /// Registers the ioeventfds of regions mapped here with the accelerator installed in
    /// `slot` (the machine's, see `VmState::accel_slot`).
    pub fn with_accel(mut self, slot: Arc<OnceLock<AccelOpsRef>>) -> Self {
        self.accel = slot;
        self
    }

    fn io_event_space(&self) -> IoEventSpace {
        if self.last <= 0xffff {
            IoEventSpace::Pio
        } else {
            IoEventSpace::Mmio
        }
    }

    /// Adds or removes the ioeventfds of `region` mapped at `base`. A refusal only costs
    /// speed: the region's handler signals the eventfd itself.
    fn update_eventfds(&self, base: u64, region: &MemoryRegion, add: bool) {
        let Some(accel) = self.accel.get() else {
            return;
        };
        for e in &region.eventfds {
            let at = IoEventAddr {
                space: self.io_event_space(),
                addr: base + e.offset,
                len: e.len,
                datamatch: e.datamatch,
            };
            let result = if add {
                accel.add_ioeventfd(at, &e.fd)
            } else {
                accel.remove_ioeventfd(at, &e.fd)
            };
            if let Err(err) = result {
                log::debug!("{}: '{}' at 0x{:x}: {err}", self.name, region.name, at.addr);
            }
        }
    }

    /// Adds or removes the accelerator's buffering of the writes to `region`'s coalesced
    /// offsets when mapped at `base`. A refusal only costs speed.
    fn update_coalescing(&self, base: u64, region: &MemoryRegion, add: bool) {
        let (Some(range), Some(accel)) = (&region.coalesced, self.accel.get()) else {
            return;
        };
        if range.is_empty() {
            return;
        }
        let (addr, len) = (base + range.start, range.end - range.start);
        let result = if add {
            accel.add_coalesced_io(self.io_event_space(), addr, len)
        } else {
            accel.remove_coalesced_io(self.io_event_space(), addr, len)
        };
        if let Err(err) = result {
            log::debug!("{}: '{}' at 0x{addr:x}: {err}", self.name, region.name);
        }
    }

    /// Maps a RAM-backed region's memory into the guest at `base` through the
    /// accelerator (QEMU's KVM memory listener's `region_add` of a RAM region), read-only
    /// for a ROM. Refused (qtest, an address or size KVM will not take): the region's
    /// handlers serve it.
    fn add_slot(&self, base: u64, region: &Arc<MemoryRegion>) {
        let (Some(ram), Some(accel)) = (&region.ram, self.accel.get()) else {
            return;
        };
        if self.io_event_space() != IoEventSpace::Mmio {
            return;
        }
        let block = RamBlock {
            guest_addr: base,
            size: region.size,
            host_addr: ram.host_addr,
        };
        match accel.map_slot(block, region.readonly) {
            Ok(slot) => self.slots.lock().push((region.clone(), slot)),
            Err(e) => log::debug!("{}: '{}' at 0x{base:x} stays MMIO: {e}", self.name, region.name),
        }
    }

    /// Undoes [`AddressSpace::add_slot`] for every mapping of `region`.
    fn remove_slots(&self, region: &Arc<MemoryRegion>) {
        let Some(accel) = self.accel.get() else {
            return;
        };
        self.slots.lock().retain(|(r, slot)| {
            if !Arc::ptr_eq(r, region) {
                return true;
            }
            if let Err(e) = accel.unmap_slot(*slot) {
                log::warn!("{}: '{}': {e}", self.name, region.name);
            }
            false
        });
    }

    /// QEMU's `system-io`: 64 KiB of ports.
    pub fn new_io() -> Self {
        Self::new("system-io", 0xffff)
    }

    /// QEMU's `system-memory`: the full 64-bit physical address space.
    pub fn new_memory() -> Self {
        Self::new("system-memory", u64::MAX)
    }

    /// The address space's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Maps `region` at `base` (QEMU's `memory_region_add_subregion`). Overlaps are refused.
    pub fn map(&self, base: u64, region: Arc<MemoryRegion>) -> Result<(), MemoryError> {
        let _writer = self.update.lock();
        if region.size == 0 {
            return Err(MemoryError::Empty {
                space: self.name.clone(),
                name: region.name.clone(),
            });
        }
        let last = base
            .checked_add(region.size - 1)
            .filter(|&l| l <= self.last)
            .ok_or_else(|| MemoryError::OutOfRange {
                space: self.name.clone(),
                name: region.name.clone(),
                start: base,
                size: region.size,
            })?;
        let current = self.view.load();
        if let Some(other) = current
            .ranges
            .iter()
            .find(|r| r.start <= last && base <= r.last)
        {
            return Err(MemoryError::Overlap {
                space: self.name.clone(),
                name: region.name.clone(),
                start: base,
                end: last.wrapping_add(1),
                other: other.region.name.clone(),
                other_start: other.start,
                other_end: other.last.wrapping_add(1),
            });
        }
        let mut ranges = current.ranges.clone();
        let at = ranges.partition_point(|r| r.start < base);
        self.update_eventfds(base, &region, true);
        self.update_coalescing(base, &region, true);
        self.add_slot(base, &region);
        ranges.insert(
            at,
            FlatRange {
                start: base,
                last,
                region,
            },
        );
        self.view.store(Arc::new(FlatView::from_ranges(ranges)));
        Ok(())
    }

    /// Unmaps `region` wherever it is mapped (QEMU's `memory_region_del_subregion`).
    pub fn unmap(&self, region: &Arc<MemoryRegion>) {
        let _writer = self.update.lock();
        let mut ranges = self.view.load().ranges.clone();
        for r in ranges.iter().filter(|r| Arc::ptr_eq(&r.region, region)) {
            self.update_eventfds(r.start, region, false);
            self.update_coalescing(r.start, region, false);
        }
        self.remove_slots(region);
        ranges.retain(|r| !Arc::ptr_eq(&r.region, region));
        self.view.store(Arc::new(FlatView::from_ranges(ranges)));
    }

    /// Whether a region is mapped at `addr`: `Ok(last)` with the region's last address
    /// if so, else `Err(next)` with the first mapped address above `addr`, if any. Callers
    /// that reach RAM directly (qtest) let regions mapped over RAM win, as the guest sees
    /// them (the VGA window).
    pub fn mapping_at(&self, addr: u64) -> Result<u64, Option<u64>> {
        let view = self.view.load();
        if let Some(r) = view.lookup(addr) {
            return Ok(r.last);
        }
        let i = view.starts.partition_point(|&start| start <= addr);
        Err(view.starts.get(i).copied())
    }

    /// The current flat view (for `info mtree`).
    pub fn flat_view(&self) -> Arc<FlatView> {
        self.view.load_full()
    }

    /// A per-thread dispatcher for the vCPU hot path.
    pub fn dispatcher(&self) -> Dispatcher<'_> {
        Dispatcher {
            space: self,
            view: arc_swap::Cache::new(&self.view),
        }
    }

    /// Dispatches a read. Hits nothing: all ones, logged (rate-limited).
    #[inline]
    pub fn read(&self, addr: u64, size: u32) -> u64 {
        self.view.load().read(self, addr, size)
    }

    /// Dispatches a write. Hits nothing: dropped, logged (rate-limited).
    #[inline]
    pub fn write(&self, addr: u64, value: u64, size: u32) {
        self.view.load().write(self, addr, value, size)
    }

    /// Reads `data.len()` bytes (1, 2, 4 or 8) little-endian, as a KVM exit hands them over.
    #[inline]
    pub fn read_bytes(&self, addr: u64, data: &mut [u8]) {
        let size = data.len().min(8);
        let value = self.read(addr, size as u32);
        data[..size].copy_from_slice(&value.to_le_bytes()[..size]);
    }

    /// Writes `data` (1, 2, 4 or 8 bytes, little-endian), as a KVM exit hands it over.
    #[inline]
    pub fn write_bytes(&self, addr: u64, data: &[u8]) {
        self.write(addr, le_value(data), data.len().min(8) as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Scratch {
        value: AtomicU64,
    }

    impl MemoryRegionOps for Scratch {
        fn read(&self, offset: u64, _size: u32) -> u64 {
            self.value.load(Ordering::Relaxed) + offset
        }
        fn write(&self, _offset: u64, value: u64, _size: u32) {
            self.value.store(value, Ordering::Relaxed);
        }
    }

    #[test]
    fn dispatch_reaches_the_region_with_its_offset() {
        let space = AddressSpace::new_io();
        let dev = Arc::new(Scratch::default());
        space.map(0x3f8, MemoryRegion::new_io("serial", 8, dev.clone())).unwrap();
        space.write(0x3f8, 0x41, 1);
        assert_eq!(space.read(0x3fa, 1), 0x43);
        assert_eq!(space.read(0x400, 1), 0xff, "past the end reads all ones");
        assert_eq!(space.read(0x3f7, 2), 0xffff);
    }

    #[test]
    fn overlaps_and_out_of_range_are_refused() {
        let space = AddressSpace::new_io();
        let dev = Arc::new(Scratch::default());
        space.map(0x60, MemoryRegion::new_io("kbd", 1, dev.clone())).unwrap();
        space.map(0x64, MemoryRegion::new_io("kbd-cmd", 1, dev.clone())).unwrap();
        let err = space
            .map(0x62, MemoryRegion::new_io("other", 4, dev.clone()))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "system-io: region 'other' at 0x62..0x66 overlaps 'kbd-cmd' at 0x64..0x65"
        );
        assert!(matches!(
            space.map(0xfffe, MemoryRegion::new_io("big", 4, dev.clone())),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            space.map(0x10, MemoryRegion::new_io("empty", 0, dev)),
            Err(MemoryError::Empty { .. })
        ));
    }

    #[test]
    fn regions_reach_the_top_of_memory_and_unmap() {
        let space = AddressSpace::new_memory();
        let dev = Arc::new(Scratch::default());
        let top = MemoryRegion::new_io("top", 0x1000, dev);
        space.map(u64::MAX - 0xfff, top.clone()).unwrap();
        assert_eq!(space.read(u64::MAX, 8), 0xfff);
        space.unmap(&top);
        assert_eq!(space.read(u64::MAX, 4), 0xffff_ffff);
    }

    #[test]
    fn a_dispatcher_sees_map_changes() {
        let space = AddressSpace::new_io();
        let mut d = space.dispatcher();
        assert_eq!(d.read(0x70, 1), 0xff);
        let dev = Arc::new(Scratch::default());
        let region = MemoryRegion::new_io("rtc", 2, dev);
        space.map(0x70, region.clone()).unwrap();
        d.write(0x70, 5, 1);
        assert_eq!(d.read(0x71, 1), 6);
        space.unmap(&region);
        assert_eq!(d.read(0x71, 1), 0xff);
    }

    #[test]
    fn byte_slices_round_trip_little_endian() {
        let space = AddressSpace::new_memory();
        let dev = Arc::new(Scratch::default());
        space.map(0x1000, MemoryRegion::new_io("s", 0x10, dev)).unwrap();
        space.write_bytes(0x1000, &[0x34, 0x12]);
        let mut out = [0u8; 4];
        space.read_bytes(0x1000, &mut out);
        assert_eq!(out, [0x34, 0x12, 0, 0]);
    }
}
