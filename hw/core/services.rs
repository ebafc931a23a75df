//! What a machine hands to the devices it builds: its address spaces, guest RAM and run
//! control (QEMU's `get_system_memory()`, `get_system_io()`, `qemu_system_*_request` and
//! `current_accel()`, which C devices reach as globals).
//!
//! A device receives these at realize, from the bus it plugs into or from its board, and
//! keeps the handles it needs: it never walks the composition tree to find its machine.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::core::accel_ops::{AccelOpsRef, RamBlock};
use crate::core::balloon::Balloon;
use crate::core::iothread::AioContext;
use crate::core::memory::AddressSpace;
use crate::core::runstate::{RunRequest, VmState};

/// Errors of adding guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// RAM requested before an accelerator was initialised.
    #[error("no accelerator is initialised")]
    NoAccelerator,
    /// RAM larger than the host's address space.
    #[error("cannot set up guest memory: {0} bytes do not fit in the host's address space")]
    TooLarge(u64),
    /// The host refused the RAM mapping.
    #[error("cannot set up guest memory 'pc.ram': {0}")]
    Allocation(String),
    /// The accelerator refused the mapping.
    #[error(transparent)]
    Map(#[from] qom::Error),
}

/// One machine's shared services. Cheap to share: devices hold an `Arc` of it.
pub struct MachineServices {
    system_memory: Arc<AddressSpace>,
    system_io: Arc<AddressSpace>,
    ram: ArcSwap<GuestMemoryMmap>,
    vm: VmState,
    /// QEMU's `qemu_aio_context`, started on first use.
    main_context: OnceLock<Arc<AioContext>>,
    /// `-smp`'s CPU count, for devices that size themselves per vCPU (virtio-blk's
    /// `num-queues`).
    cpus: AtomicU32,
    /// The balloon device's slot (QEMU's `balloon_event_fn`).
    balloon: Arc<Balloon>,
    /// Guest RAM the VMM itself writes while a migration runs.
    dirty: Arc<crate::core::dirty_log::DirtyTracker>,
    /// The display devices' graphic consoles.
    consoles: crate::core::console::ConsoleList,
    /// The input devices, for host keyboard and pointer events.
    input: crate::core::input::InputHandlers,
    /// Guest RAM mapped at 2 MiB-aligned host addresses, unmapped with the machine.
    aligned_ram: parking_lot::Mutex<Vec<AlignedRam>>,
}

/// Host memory alignment of guest RAM (QEMU's `QEMU_VMALLOC_ALIGN` on x86-64): a 2 MiB
/// page of guest-physical memory then sits on a 2 MiB page of host memory, so
/// transparent huge pages can back it and KVM can map it with large pages.
const RAM_HOST_ALIGN: usize = 2 << 20;

/// An aligned RAM mapping (see [`map_aligned_ram`]): the region does not own it (vm-memory
/// unmaps only mappings it made), so this does, once nothing else holds the region.
struct AlignedRam {
    region: Arc<GuestRegionMmap>,
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: `addr`/`len` name a mapping only this value unmaps; nothing in it is tied to a
// thread.
unsafe impl Send for AlignedRam {}

impl Drop for AlignedRam {
    fn drop(&mut self) {
        // Still in use elsewhere (a device thread outliving its machine): left mapped.
        if Arc::strong_count(&self.region) == 1 {
            // SAFETY: the last reference to the region is ours, so nothing can reach the
            // memory any more; the range is the mapping map_aligned_ram made.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }
}

/// Maps `len` bytes of anonymous memory for guest RAM at a [`RAM_HOST_ALIGN`]-aligned
/// host address (QEMU's `qemu_ram_mmap`), without reserving swap: untouched RAM costs
/// nothing.
fn map_aligned_ram(guest_addr: u64, len: usize) -> Result<AlignedRam, RamError> {
    let total = len
        .checked_add(RAM_HOST_ALIGN)
        .ok_or(RamError::TooLarge(len as u64))?;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh mapping at an address the kernel picks; nothing else is affected.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(RamError::Allocation(std::io::Error::last_os_error().to_string()));
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(RAM_HOST_ALIGN);
    let (head, tail) = (aligned - start, start + total - (aligned + len));
    // SAFETY: both ranges are the parts of the fresh mapping outside [aligned, +len).
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    let addr = aligned as *mut libc::c_void;
    // SAFETY: [aligned, aligned + len) is mapped read-write above and stays mapped until
    // the AlignedRam returned (its only owner) is dropped with nothing else holding it.
    let mapping = unsafe {
        vm_memory::mmap::MmapRegionBuilder::new(len)
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .with_raw_mmap_pointer(addr.cast())
            .build()
    };
    let unmap = || {
        // SAFETY: the aligned mapping made above, which nothing refers to on this path.
        unsafe { libc::munmap(addr, len) };
    };
    let mapping = mapping.map_err(|e| {
        unmap();
        RamError::Allocation(e.to_string())
    })?;
    let Some(region) = GuestRegionMmap::new(mapping, GuestAddress(guest_addr)) else {
        unmap();
        return Err(RamError::TooLarge(len as u64));
    };
    Ok(AlignedRam {
        region: Arc::new(region),
        addr,
        len,
    })
}

impl Default for MachineServices {
    fn default() -> Self {
        let vm = VmState::default();
        MachineServices {
            system_memory: Arc::new(AddressSpace::new_memory().with_accel(vm.accel_slot())),
            system_io: Arc::new(AddressSpace::new_io().with_accel(vm.accel_slot())),
            ram: ArcSwap::from_pointee(GuestMemoryMmap::default()),
            vm,
            main_context: OnceLock::new(),
            cpus: AtomicU32::new(1),
            balloon: Arc::default(),
            dirty: Arc::default(),
            consoles: Default::default(),
            input: Default::default(),
            aligned_ram: Default::default(),
        }
    }
}

impl AsRef<VmState> for MachineServices {
    fn as_ref(&self) -> &VmState {
        &self.vm
    }
}

impl MachineServices {
    /// QEMU's `get_system_memory()`.
    pub fn system_memory(&self) -> &Arc<AddressSpace> {
        &self.system_memory
    }

    /// QEMU's `get_system_io()`.
    pub fn system_io(&self) -> &Arc<AddressSpace> {
        &self.system_io
    }

    /// Guest RAM as mapped so far, for loaders and devices that read or write it.
    pub fn ram(&self) -> Arc<GuestMemoryMmap> {
        self.ram.load_full()
    }

    /// Reads guest-physical memory as the first CPU would (QEMU's
    /// `cpu_physical_memory_read`): RAM directly, a device region mapped over RAM (the VGA
    /// window) or elsewhere through its handlers, in the widest accesses the alignment
    /// allows; nothing mapped reads as all ones.
    pub fn read_physical(&self, addr: u64, out: &mut [u8]) {
        // Device memory shows the guest's writes the accelerator still buffers.
        self.flush_coalesced_io();
        let ram = self.ram();
        let mut done = 0usize;
        while done < out.len() {
            let a = addr.wrapping_add(done as u64);
            let left = out.len() - done;
            let n = match ram_span(&ram, &self.system_memory, a, left) {
                Some(n) => {
                    if ram
                        .read_slice(&mut out[done..done + n], GuestAddress(a))
                        .is_err()
                    {
                        out[done..done + n].fill(0xff);
                    }
                    n
                }
                None => match self.system_memory.mapping_at(a) {
                    Ok(_) => {
                        let n = device_access_size(a, left);
                        let mut bytes = [0u8; 8];
                        self.system_memory.read_bytes(a, &mut bytes[..n]);
                        out[done..done + n].copy_from_slice(&bytes[..n]);
                        n
                    }
                    // Nothing there up to the next region or RAM: all ones at once (a
                    // monitor's read of gigabytes of hole must not take minutes).
                    Err(next_mmio) => {
                        let next_ram = ram
                            .iter()
                            .map(|r| r.start_addr().0)
                            .filter(|&s| s > a)
                            .min();
                        let end = [next_mmio, next_ram]
                            .into_iter()
                            .flatten()
                            .min()
                            .map_or(u64::MAX, |e| e);
                        let n = left.min(usize::try_from(end - a).unwrap_or(usize::MAX)).max(1);
                        out[done..done + n].fill(0xff);
                        n
                    }
                },
            };
            done += n;
        }
    }

    /// The guest-physical ranges that hold memory as the CPU sees it, `(start, end)` by
    /// address (QEMU's `guest_phys_blocks_append`, what a guest core dump covers): RAM
    /// where no region is mapped over it, and every region that is memory (ROM, a RAM
    /// BAR, the PAM's window); device registers (the VGA window) are left out.
    pub fn guest_phys_blocks(&self) -> Vec<(u64, u64)> {
        let view = self.system_memory.flat_view();
        let mut blocks: Vec<(u64, u64, bool)> = Vec::new();
        for region in self.ram().iter() {
            let mut at = region.start_addr().0;
            let end = at + region.len();
            for r in view.ranges() {
                let (start, stop) = (r.start(), r.last().saturating_add(1));
                if stop <= at || start >= end {
                    continue;
                }
                if start > at {
                    blocks.push((at, start, true));
                }
                at = stop.min(end);
            }
            if at < end {
                blocks.push((at, end, true));
            }
        }
        for r in view.ranges().iter().filter(|r| r.region().is_memory()) {
            blocks.push((r.start(), r.last().saturating_add(1), false));
        }
        blocks.sort_unstable();
        // Pieces of RAM that touch are one block, as QEMU joins host-contiguous ones.
        let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(blocks.len());
        for b in blocks {
            match merged.last_mut() {
                Some(last) if last.2 && b.2 && last.1 == b.0 => last.1 = b.1,
                _ => merged.push(b),
            }
        }
        merged.into_iter().map(|(s, e, _)| (s, e)).collect()
    }

    /// Whether every byte of `[addr, addr + len)` is RAM or a mapped region (a device,
    /// a ROM): QEMU's `address_space_read` fails on a byte that is neither, and its
    /// monitor then says "Cannot access memory".
    pub fn is_assigned(&self, addr: u64, len: u64) -> bool {
        let ram = self.ram();
        let end = u128::from(addr) + u128::from(len);
        let mut at = u128::from(addr);
        while at < end {
            // Past the top of the address space nothing is mapped.
            let Ok(a) = u64::try_from(at) else {
                return false;
            };
            let last = match self.system_memory.mapping_at(a) {
                Ok(last) => last,
                Err(next_mmio) => match ram.find_region(GuestAddress(a)) {
                    Some(region) => {
                        let ram_last = region.last_addr().0;
                        next_mmio.map_or(ram_last, |next| ram_last.min(next - 1))
                    }
                    None => return false,
                },
            };
            at = u128::from(last) + 1;
        }
        true
    }

    /// Writes guest-physical memory as the first CPU would (QEMU's
    /// `cpu_physical_memory_write`; see [`Self::read_physical`]).
    pub fn write_physical(&self, addr: u64, data: &[u8]) {
        // The guest's buffered writes came first.
        self.flush_coalesced_io();
        let ram = self.ram();
        let mut done = 0usize;
        while done < data.len() {
            let a = addr.wrapping_add(done as u64);
            let left = data.len() - done;
            let n = match ram_span(&ram, &self.system_memory, a, left) {
                Some(n) => {
                    let _ = ram.write_slice(&data[done..done + n], GuestAddress(a));
                    n
                }
                None => {
                    let n = device_access_size(a, left);
                    self.system_memory.write_bytes(a, &data[done..done + n]);
                    n
                }
            };
            done += n;
        }
    }

    /// Where devices that write guest RAM themselves (DMA: fw_cfg, the PAM's write-through)
    /// record what they wrote, so a running migration sends it again: KVM's dirty log
    /// sees only the vCPUs' writes.
    pub fn dirty_tracker(&self) -> &Arc<crate::core::dirty_log::DirtyTracker> {
        &self.dirty
    }

    /// The graphic consoles of the machine's display devices (QEMU's console list).
    pub fn consoles(&self) -> &crate::core::console::ConsoleList {
        &self.consoles
    }

    /// The machine's keyboard and mouse, for host input (QEMU's input handlers).
    pub fn input(&self) -> &crate::core::input::InputHandlers {
        &self.input
    }
    /// The number of vCPUs the machine starts with (`-smp`).
    pub fn cpu_count(&self) -> u32 {
        self.cpus.load(Ordering::Relaxed)
    }

    /// Records `-smp`'s CPU count (the machine does, with its topology).
    pub fn set_cpu_count(&self, cpus: u32) {
        self.cpus.store(cpus.max(1), Ordering::Relaxed);
    }

    /// The run status, events, power button and run-request mailbox.
    pub fn vm(&self) -> &VmState {
        &self.vm
    }

    /// QEMU's `qemu_get_aio_context()`: the machine's main event loop, thread `main-loop`,
    /// started on first use. Devices without `iothread=` run their I/O there, never on
    /// vCPU threads. Fails only if the host cannot start a thread or create an epoll
    /// descriptor.
    pub fn try_main_context(&self) -> std::io::Result<Arc<AioContext>> {
        if let Some(ctx) = self.main_context.get() {
            return Ok(Arc::clone(ctx));
        }
        let ctx = AioContext::new("main-loop")?;
        // Two threads racing here: the loser's context is dropped, its thread ends.
        Ok(Arc::clone(self.main_context.get_or_init(|| ctx)))
    }

    /// [`MachineServices::try_main_context`] for callers that cannot report an error.
    ///
    /// # Panics
    /// If the host cannot start the thread (out of threads or descriptors); realize
    /// functions use `try_main_context` and fail instead.
    pub fn main_context(&self) -> Arc<AioContext> {
        match self.try_main_context() {
            Ok(ctx) => ctx,
            Err(e) => panic!("cannot start the main event loop: {e}"),
        }
    }

    /// The machine's balloon: the device registers here, the monitors ask it.
    pub fn balloon(&self) -> &Arc<Balloon> {
        &self.balloon
    }

    /// The size of guest RAM in bytes (QEMU's `get_current_ram_size`).
    pub fn ram_size(&self) -> u64 {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.ram().iter().map(|r| r.len()).sum()
    }

    /// Posts a run request: reset, shutdown, `isa-debug-exit`'s status.
    pub fn request(&self, request: RunRequest) {
        self.vm.request(request);
    }

    /// The accelerator's operations, once one is initialised.
    #[inline]
    pub fn accel_ops(&self) -> Option<&AccelOpsRef> {
        self.vm.accel_ops()
    }

    /// Hands the guest's buffered (coalesced) writes to the devices now, for a display
    /// about to draw what they wrote (see [`AccelOps::flush_coalesced_io`]).
    pub fn flush_coalesced_io(&self) {
        if let Some(ops) = self.accel_ops() {
            ops.flush_coalesced_io();
        }
    }

    /// Allocates `size` bytes of guest RAM at `guest_addr` and maps it through the
    /// accelerator (QEMU's `memory_region_add_subregion` of a RAM region).
    pub fn add_ram(&self, guest_addr: u64, size: u64) -> Result<(), RamError> {
        self.add_ram_except(guest_addr, size, None)
    }

    /// [`MachineServices::add_ram`], leaving the guest addresses in `hole` out of the
    /// accelerator's mapping: the i440FX's shadow RAM below 1 MiB is mapped segment by
    /// segment as the PAM registers say (see `pci_host::pam`).
    pub fn add_ram_except(
        &self,
        guest_addr: u64,
        size: u64,
        hole: Option<std::ops::Range<u64>>,
    ) -> Result<(), RamError> {
        let ops = self.accel_ops().ok_or(RamError::NoAccelerator)?;
        let len = usize::try_from(size).map_err(|_| RamError::TooLarge(size))?;
        let region = if len >= RAM_HOST_ALIGN {
            let ram = map_aligned_ram(guest_addr, len)?;
            let region = ram.region.clone();
            self.aligned_ram.lock().push(ram);
            region
        } else {
            let region = GuestRegionMmap::from_range(GuestAddress(guest_addr), len, None)
                .map_err(|e| RamError::Allocation(e.to_string()))?;
            Arc::new(region)
        };
        let host_addr = region.as_ptr() as u64;
        let next = self
            .ram()
            .insert_region(region)
            .map_err(|e| RamError::Allocation(e.to_string()))?;
        self.ram.store(Arc::new(next));
        let end = guest_addr + size;
        let pieces = match hole {
            Some(h) if h.start >= guest_addr && h.end <= end => {
                vec![(guest_addr, h.start), (h.end, end)]
            }
            _ => vec![(guest_addr, end)],
        };
        for (start, stop) in pieces.into_iter().filter(|(a, b)| a < b) {
            ops.map_ram(RamBlock {
                guest_addr: start,
                size: stop - start,
                host_addr: host_addr + (start - guest_addr),
            })?;
        }
        Ok(())
    }
}

/// How many of `len` bytes at `addr` are in one RAM region, if `addr` is RAM and no
/// device region is mapped over it (the VGA window below 1 MiB is the VGA's, not RAM's).
fn ram_span(ram: &GuestMemoryMmap, mmio: &AddressSpace, addr: u64, len: usize) -> Option<usize> {
    let next_mmio = match mmio.mapping_at(addr) {
        Ok(_) => return None,
        Err(next) => next,
    };
    let region = ram.find_region(GuestAddress(addr))?;
    let offset = addr - region.start_addr().0;
    let mut n = len.min((region.len() - offset) as usize);
    if let Some(next) = next_mmio {
        n = n.min(usize::try_from(next - addr).unwrap_or(usize::MAX));
    }
    Some(n)
}

/// The size of the next device access: the largest of 8, 4, 2, 1 that `addr` is aligned
/// to and that `left` covers (QEMU's `memory_access_size`, for devices that take any).
fn device_access_size(addr: u64, left: usize) -> usize {
    [8usize, 4, 2, 1]
        .into_iter()
        .find(|&n| n <= left && addr.is_multiple_of(n as u64))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_accesses_are_split_by_alignment() {
        assert_eq!(super::device_access_size(0x1000, 16), 8);
        assert_eq!(super::device_access_size(0x1004, 16), 4);
        assert_eq!(super::device_access_size(0x1001, 16), 1);
        assert_eq!(super::device_access_size(0x1000, 3), 2);
    }

    use super::*;

    #[test]
    fn the_main_context_is_created_once_per_machine() {
        let services = MachineServices::default();
        let a = services.main_context();
        let b = services.main_context();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.name(), "main-loop");
        let other = MachineServices::default();
        assert!(!Arc::ptr_eq(&a, &other.main_context()));
    }
}
