//! `rng-builtin` (QEMU's `backends/rng-builtin.c`): entropy from the host kernel's
//! `getrandom(2)`, with no file to open. `virtio-rng` creates one when `rng=` is not given.

use std::io;
use std::sync::Arc;

use qom::{type_init, UserCreatable};

use crate::backends::rng::{EntropySource, RngBackend};

/// QEMU's `TYPE_RNG_BUILTIN`.
pub const TYPE_RNG_BUILTIN: &str = "rng-builtin";

/// QEMU's `RngBuiltin`.
#[derive(qom::Object)]
#[qom(name = TYPE_RNG_BUILTIN, implements = [dyn qom::UserCreatable])]
pub struct RngBuiltin {
    #[parent]
    parent: RngBackend,
}

type_init!(RngBuiltin);

impl UserCreatable for RngBuiltin {
    fn complete(&self) -> Result<(), qom::Error> {
        self.parent.set_source(Arc::new(GetRandom));
        Ok(())
    }
}

/// `getrandom(2)`; once the kernel's pool is initialised (at boot) it never blocks.
pub struct GetRandom;

impl EntropySource for GetRandom {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
            let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getrandom_fills_buffers() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        assert_eq!(GetRandom.read(&mut a).unwrap(), 64);
        assert_eq!(GetRandom.read(&mut b).unwrap(), 64);
        assert_ne!(a, b);
    }
}
