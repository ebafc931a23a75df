//! The abstract entropy backend (QEMU's `backends/rng.c`): `rng-backend`, the type
//! `virtio-rng`'s `rng=` links to. Its subtypes (`rng-random`, `rng-builtin`) are
//! user-creatable objects (`-object rng-random,id=rng0,filename=/dev/urandom`); completing
//! one opens its [`EntropySource`], which devices read from their I/O thread.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, OnceLock};

use qom::{type_init, ObjectBase, UserCreatable};

/// QEMU's `TYPE_RNG_BACKEND`.
pub const TYPE_RNG_BACKEND: &str = "rng-backend";

/// Where a backend's bytes come from.
pub trait EntropySource: Send + Sync {
    /// Reads up to `buf.len()` bytes without blocking. `ErrorKind::WouldBlock` when none
    /// are ready: the caller waits for [`EntropySource::wait_fd`] to become readable.
    /// `Ok(0)` means the source is exhausted (a regular file at its end).
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// A descriptor that turns readable when bytes are ready; `None` if reads never wait.
    fn wait_fd(&self) -> Option<RawFd> {
        None
    }
}

/// QEMU's `RngBackend`: the opened source, set by the subtype's `complete`.
#[derive(qom::Object)]
#[qom(name = TYPE_RNG_BACKEND, abstract, implements = [dyn qom::UserCreatable])]
pub struct RngBackend {
    #[parent]
    parent: ObjectBase,
    source: OnceLock<Arc<dyn EntropySource>>,
}

type_init!(RngBackend);

impl UserCreatable for RngBackend {}

impl RngBackend {
    /// The source, once the backend is opened (completed).
    pub fn source(&self) -> Option<Arc<dyn EntropySource>> {
        self.source.get().cloned()
    }

    /// Called by a subtype's `complete` (QEMU's `RngBackendClass::opened`).
    pub fn set_source(&self, source: Arc<dyn EntropySource>) {
        let _ = self.source.set(source);
    }
}
