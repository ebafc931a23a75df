//! Coalesced MMIO and PIO (QEMU's `kvm_coalesce_mmio_region` and
//! `kvm_flush_coalesced_mmio_buffer`): KVM stores the guest's writes to registered zones
//! in a ring page shared with the VMM instead of exiting for each, and the VMM hands them
//! to the address spaces later, in order. A VGA text console clearing its screen then
//! costs a few exits instead of thousands.
//!
//! The ring is one page per VM, mapped through a vCPU's file descriptor. It is drained
//! before every exit a vCPU handles (the guest's buffered writes come before the access
//! that exited) and by readers outside the vCPUs ([`CoalescedRing::drain`] from
//! `AccelOps::flush_coalesced_io`).

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring};

/// Entries in the ring page (the kernel's `KVM_COALESCED_MMIO_MAX`).
const RING_ENTRIES: u32 = ((PAGE_SIZE - std::mem::size_of::<kvm_coalesced_mmio_ring>())
    / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
const PAGE_SIZE: usize = 4096;

/// The VM's ring of buffered writes.
pub struct CoalescedRing {
    ring: *mut kvm_coalesced_mmio_ring,
    /// One drainer at a time: entries must reach the devices in the guest's order.
    drain: parking_lot::Mutex<()>,
}

// SAFETY: the page stays mapped as long as the ring exists; the kernel writes entries and `last`, this side reads them and writes `first`, through
// atomics and volatile reads, with `drain` serialising the readers.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring through vCPU `vcpu`'s descriptor, at page `page_offset` of it
    /// (`KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)`).
    pub fn map(vcpu: &impl AsRawFd, page_offset: u32) -> std::io::Result<CoalescedRing> {
        // SAFETY: a fresh shared read-write mapping of one page of the vCPU's file at the
        // offset KVM documents for the ring; nothing else is at the address returned.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (page_offset as usize * PAGE_SIZE) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CoalescedRing {
            ring: ptr.cast(),
            drain: parking_lot::Mutex::new(()),
        })
    }

    fn first(&self) -> &AtomicU32 {
        // SAFETY: `first` is an aligned u32 in the mapped page; AtomicU32 has its layout.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.ring).first)) }
    }

    fn last(&self) -> &AtomicU32 {
        // SAFETY: as in `first`.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.ring).last)) }
    }

    /// Whether writes are waiting: the vCPUs' check after each exit.
    #[inline]
    pub fn pending(&self) -> bool {
        self.first().load(Ordering::Relaxed) != self.last().load(Ordering::Acquire)
    }

    /// Hands every write buffered so far to `write(pio, addr, data)`, oldest first. Writes
    /// the guest adds meanwhile wait for the next call, so a busy guest cannot keep a
    /// drainer here.
    pub fn drain(&self, mut write: impl FnMut(bool, u64, &[u8])) {
        if !self.pending() {
            return;
        }
        let _one = self.drain.lock();
        let end = self.last().load(Ordering::Acquire);
        let mut first = self.first().load(Ordering::Relaxed);
        // The kernel keeps both indices below RING_ENTRIES; a bad value ends the drain.
        while first != end && first < RING_ENTRIES && end < RING_ENTRIES {
            // SAFETY: `first` indexes the page's entry array (checked above); the kernel
            // filled the entry before publishing `last` (acquire above).
            let entry = unsafe {
                std::ptr::read_volatile(
                    std::ptr::addr_of!((*self.ring).coalesced_mmio)
                        .cast::<kvm_coalesced_mmio>()
                        .add(first as usize),
                )
            };
            let len = (entry.len as usize).min(entry.data.len());
            // SAFETY: `pio` shares a u32 with `pad`, which the kernel sets either way.
            let pio = unsafe { entry.__bindgen_anon_1.pio } == 1;
            write(pio, entry.phys_addr, &entry.data[..len]);
            first = (first + 1) % RING_ENTRIES;
            self.first().store(first, Ordering::Release);
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: the page `map` mapped; nothing refers to it once the ring is dropped.
        unsafe { libc::munmap(self.ring.cast(), PAGE_SIZE) };
    }
}
