//! The abstract host memory backend (QEMU's `backends/hostmem.c`): `memory-backend`, with
//! QEMU's common properties (`size`, `share`, `prealloc`, `dump`, `merge`). Its subtypes
//! (`memory-backend-ram`, `memory-backend-file`) are user-creatable objects; completing
//! one maps its memory, as QEMU allocates a backend's RAM block when the object completes.
//! A device that maps a backend's memory into the guest (`ivshmem-plain`'s `memdev`) marks
//! it mapped (QEMU's `host_memory_backend_set_mapped`): no second device takes it, and
//! `object-del` refuses it while the device lives. Guest RAM from a backend
//! (`-machine memory-backend=`, NUMA nodes, DIMMs) is not there yet.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use qom::{type_init, ObjectBase, Prop, Size, UserCreatable};

/// QEMU's `TYPE_MEMORY_BACKEND`.
pub const TYPE_MEMORY_BACKEND: &str = "memory-backend";

/// Why a backend cannot map its memory, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum HostMemError {
    /// `size` left at 0.
    #[error("can't create backend with size 0")]
    ZeroSize,
    /// `size` beyond the address space.
    #[error("backend size {0} does not fit in the address space")]
    TooLarge(u64),
    /// `mmap` failed.
    #[error("cannot set up guest memory '{id}': {source}")]
    Map {
        /// The object's id.
        id: String,
        /// Why.
        source: io::Error,
    },
    /// `prealloc=on` could not populate the pages.
    #[error("os_mem_prealloc: preallocating memory failed: {0}")]
    Prealloc(io::Error),
}

/// A mapping of a backend's memory, unmapped when dropped.
pub struct HostMemory {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing in it is tied to a
// thread.
unsafe impl Send for HostMemory {}
// SAFETY: as above; the value hands out only its address and length.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// Maps `len` bytes: anonymous memory without `fd`, else `fd`'s contents from offset
    /// 0; `MAP_SHARED` if `share`, else private copy-on-write.
    fn map(len: usize, share: bool, fd: Option<BorrowedFd<'_>>) -> io::Result<Self> {
        let mut flags = if share {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        if fd.is_none() {
            flags |= libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        }
        let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping at an address the kernel picks; no existing memory is
        // affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(HostMemory { addr, len })
    }

    /// The mapping's address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.cast()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: size 0 is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn advise(&self, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: advice on this value's own mapping; none used here changes contents.
        if unsafe { libc::madvise(self.addr, self.len, advice) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// QEMU's `os_mem_prealloc`: faults every page in now.
    fn prealloc(&self) -> io::Result<()> {
        if self.advise(libc::MADV_POPULATE_WRITE).is_ok() {
            return Ok(());
        }
        // Kernels before 5.14: touch each page, keeping its contents.
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        for offset in (0..self.len).step_by(page) {
            // SAFETY: `offset` is inside the mapping, which is readable and writable.
            unsafe {
                let p = self.as_ptr().add(offset);
                std::ptr::write_volatile(p, std::ptr::read_volatile(p));
            }
        }
        Ok(())
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping this value's own mapping, which nothing else refers to.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// QEMU's `HostMemoryBackend`.
#[derive(qom::Object)]
#[qom(name = TYPE_MEMORY_BACKEND, abstract, implements = [dyn qom::UserCreatable])]
pub struct HostMemoryBackend {
    #[parent]
    parent: ObjectBase,
    #[property(default = Size(0), desc = "Size of the memory region (ex: 500M)")]
    size: Prop<Size>,
    #[property(default = false, desc = "Mark the memory as private to QEMU or shared")]
    share: Prop<bool>,
    #[property(default = false, desc = "Preallocate memory")]
    prealloc: Prop<bool>,
    #[property(default = true, desc = "Set to 'off' to exclude from core dump")]
    dump: Prop<bool>,
    #[property(default = true, desc = "Mark memory as mergeable")]
    merge: Prop<bool>,
    memory: Mutex<Option<Arc<HostMemory>>>,
    /// A device maps the memory into the guest.
    mapped: AtomicBool,
}

type_init!(HostMemoryBackend);

impl UserCreatable for HostMemoryBackend {}

impl HostMemoryBackend {
    /// `size` in bytes, refused if 0 (QEMU's `host_memory_backend_memory_complete`).
    pub fn checked_size(&self) -> Result<usize, HostMemError> {
        let size = self.size.get().0;
        if size == 0 {
            return Err(HostMemError::ZeroSize);
        }
        usize::try_from(size).map_err(|_| HostMemError::TooLarge(size))
    }

    /// Whether the memory is shared (`share=on`).
    pub fn shared(&self) -> bool {
        self.share.get()
    }

    /// Maps the backend's memory (from `fd` for file backends) and applies `dump`,
    /// `merge` and `prealloc`: QEMU's `host_memory_backend_memory_complete`, called by a
    /// subtype's `complete`.
    pub fn map_memory(&self, fd: Option<BorrowedFd<'_>>) -> Result<(), HostMemError> {
        let len = self.checked_size()?;
        let memory = HostMemory::map(len, self.share.get(), fd).map_err(|source| {
            HostMemError::Map {
                id: self.object().canonical_path().unwrap_or_default(),
                source,
            }
        })?;
        // Advice, as QEMU gives it: a kernel without KSM refuses MADV_MERGEABLE, which
        // changes nothing else.
        if self.merge.get() {
            let _ = memory.advise(libc::MADV_MERGEABLE);
        }
        if !self.dump.get() {
            let _ = memory.advise(libc::MADV_DONTDUMP);
        }
        if self.prealloc.get() {
            memory.prealloc().map_err(HostMemError::Prealloc)?;
        }
        *self.memory.lock() = Some(Arc::new(memory));
        Ok(())
    }

    /// The memory, once completed; it stays mapped while a holder of it lives.
    pub fn memory(&self) -> Option<Arc<HostMemory>> {
        self.memory.lock().clone()
    }

    /// QEMU's `host_memory_backend_is_mapped`: a device maps it into the guest.
    pub fn is_mapped(&self) -> bool {
        self.mapped.load(Ordering::Acquire)
    }

    /// Marks it mapped unless it is already: whether this caller got it.
    pub fn claim(&self) -> bool {
        self.mapped
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// QEMU's `host_memory_backend_set_mapped`.
    pub fn set_mapped(&self, mapped: bool) {
        self.mapped.store(mapped, Ordering::Release);
    }

    /// The mapped memory's address and length, once completed.
    pub fn mapping(&self) -> Option<(*mut u8, usize)> {
        self.memory.lock().as_ref().map(|m| (m.as_ptr(), m.len()))
    }
}
