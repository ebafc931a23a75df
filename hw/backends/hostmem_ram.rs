//! `memory-backend-ram` (QEMU's `backends/hostmem-ram.c`): anonymous memory
//! (`-object memory-backend-ram,id=ram0,size=64M`).

use qom::{type_init, UserCreatable};

use crate::backends::hostmem::HostMemoryBackend;

/// QEMU's `TYPE_MEMORY_BACKEND_RAM`.
pub const TYPE_MEMORY_BACKEND_RAM: &str = "memory-backend-ram";

/// QEMU's `memory-backend-ram`.
#[derive(qom::Object)]
#[qom(name = TYPE_MEMORY_BACKEND_RAM, implements = [dyn qom::UserCreatable])]
pub struct MemoryBackendRam {
    #[parent]
    parent: HostMemoryBackend,
}

type_init!(MemoryBackendRam);

impl UserCreatable for MemoryBackendRam {
    /// QEMU's `host_memory_backend_can_be_deleted`: not while a device maps it.
    fn can_be_deleted(&self) -> bool {
        !self.parent.is_mapped()
    }

    /// QEMU's `ram_backend_memory_alloc`.
    fn complete(&self) -> Result<(), qom::Error> {
        self.parent.map_memory(None).map_err(qom::Error::other)
    }
}
