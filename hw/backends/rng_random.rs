//! `rng-random` (QEMU's `backends/rng-random.c`): entropy read from a file, by default
//! `/dev/urandom` (`-object rng-random,id=rng0,filename=/dev/hwrng`). The file is opened
//! non-blocking when the object completes; a device waits for it to turn readable on its
//! I/O thread, never blocking there.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use qom::{type_init, Prop, UserCreatable};

use crate::backends::rng::{EntropySource, RngBackend};

/// QEMU's `TYPE_RNG_RANDOM`.
pub const TYPE_RNG_RANDOM: &str = "rng-random";

/// QEMU's `RngRandom`.
#[derive(qom::Object)]
#[qom(name = TYPE_RNG_RANDOM, implements = [dyn qom::UserCreatable])]
pub struct RngRandom {
    #[parent]
    parent: RngBackend,
    #[property(default = "/dev/urandom", desc = "File to read entropy from")]
    filename: Prop<String>,
}

type_init!(RngRandom);

/// Why an `rng-random` cannot open, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum RngRandomError {
    /// The file cannot be opened (QEMU's `error_setg_file_open`).
    #[error("Could not open '{0}': {1}")]
    Open(String, String),
}

impl UserCreatable for RngRandom {
    /// QEMU's `rng_random_opened`.
    fn complete(&self) -> Result<(), qom::Error> {
        let filename = self.filename.get();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&filename)
            .map_err(|e| {
                qom::Error::other(RngRandomError::Open(filename.clone(), strerror(&e)))
            })?;
        self.parent.set_source(Arc::new(RandomFile(file)));
        Ok(())
    }
}

/// `strerror` of an OS error, without Rust's " (os error N)".
fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The opened file.
struct RandomFile(File);

impl EntropySource for RandomFile {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.0).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_strerror() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(strerror(&e), "No such file or directory");
    }
}
