//! `memory-backend-file` (QEMU's `backends/hostmem-file.c`): memory mapped from a file
//! (`-object memory-backend-file,id=mem0,size=64M,mem-path=/dev/hugepages,share=on`). A
//! directory as `mem-path` gets an unnamed file inside it, removed when unmapped, as
//! QEMU's `qemu_ram_alloc_from_file` makes one there and unlinks it.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;

use qom::{type_init, Prop, UserCreatable};

use crate::backends::hostmem::HostMemoryBackend;

/// QEMU's `TYPE_MEMORY_BACKEND_FILE`.
pub const TYPE_MEMORY_BACKEND_FILE: &str = "memory-backend-file";

/// QEMU's `HostMemoryBackendFile`.
#[derive(qom::Object)]
#[qom(name = TYPE_MEMORY_BACKEND_FILE, implements = [dyn qom::UserCreatable])]
pub struct MemoryBackendFile {
    #[parent]
    parent: HostMemoryBackend,
    #[property(name = "mem-path", desc = "File to map (or directory to create one in)")]
    mem_path: Prop<Option<String>>,
    #[property(default = false, desc = "Map the file read-only")]
    readonly: Prop<bool>,
}

type_init!(MemoryBackendFile);

/// Why a file backend cannot map its file, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum HostMemFileError {
    /// No `mem-path`.
    #[error("mem-path property not set")]
    NoPath,
    /// `readonly=on`: qomvm maps backends writable only.
    #[error("readonly=on is not supported by qomvm's memory-backend-file")]
    ReadOnly,
    /// The file cannot be opened or sized.
    #[error("can't open backing store {path} for guest RAM: {source}")]
    Open {
        /// `mem-path`.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl UserCreatable for MemoryBackendFile {
    /// QEMU's `host_memory_backend_can_be_deleted`: not while a device maps it.
    fn can_be_deleted(&self) -> bool {
        !self.parent.is_mapped()
    }

    /// QEMU's `file_backend_memory_alloc`.
    fn complete(&self) -> Result<(), qom::Error> {
        let path = self
            .mem_path
            .get()
            .ok_or_else(|| qom::Error::other(HostMemFileError::NoPath))?;
        if self.readonly.get() {
            return Err(qom::Error::other(HostMemFileError::ReadOnly));
        }
        let size = self.parent.checked_size().map_err(qom::Error::other)?;
        let open_error = |source| {
            qom::Error::other(HostMemFileError::Open {
                path: path.clone(),
                source,
            })
        };
        let is_dir = std::fs::metadata(&path).is_ok_and(|m| m.is_dir());
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if is_dir {
            options.custom_flags(libc::O_TMPFILE).mode(0o600);
        } else {
            options.create(true).mode(0o600);
        }
        let file = options.open(&path).map_err(open_error)?;
        // A file smaller than the backend grows to its size, as QEMU's file_ram_alloc does.
        let len = file.metadata().map_err(open_error)?.len();
        if len < size as u64 {
            file.set_len(size as u64).map_err(open_error)?;
        }
        // The mapping keeps the file's pages; the descriptor is not needed after mmap.
        self.parent
            .map_memory(Some(file.as_fd()))
            .map_err(qom::Error::other)
    }
}
