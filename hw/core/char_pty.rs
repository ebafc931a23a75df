//! QEMU's `pty` chardev (`chardev/char-pty.c`): a pseudo-terminal whose slave side
//! (`/dev/pts/N`) a user attaches to (`virsh console`, `screen`). Output goes to the master
//! side without ever blocking the frontend: while no one holds the slave open, or while
//! the reader lags, bytes beyond the terminal's buffer are dropped, as a UART's would be.
//! Input is read by a thread that waits for a slave to be opened.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// Where input goes (`chardev::CharReceiver`, spelled out so that this file does not
/// import `chardev`, which builds this backend).
pub type PtyReceiver = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Errors of opening a pseudo-terminal.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    /// `posix_openpt`, `grantpt`, `unlockpt` or `ptsname_r` failed.
    #[error("Failed to create PTY: {0}")]
    Create(io::Error),
}

fn last_error() -> PtyError {
    PtyError::Create(io::Error::last_os_error())
}

/// The master side of a pseudo-terminal, and the receiver its input goes to.
pub struct PtyBackend {
    master: File,
    path: PathBuf,
    receiver: Arc<Mutex<Option<PtyReceiver>>>,
}

impl std::fmt::Debug for PtyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtyBackend").field("path", &self.path).finish()
    }
}

impl PtyBackend {
    /// QEMU's `qemu_openpty_raw`: a new pseudo-terminal in raw mode, its slave closed
    /// until someone opens it.
    pub fn open() -> Result<Self, PtyError> {
        // SAFETY: posix_openpt has no memory-safety preconditions.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(last_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: grantpt/unlockpt on our master; ptsname_r writes at most `name.len()`
        // bytes, NUL included.
        unsafe {
            if libc::grantpt(fd) < 0 || libc::unlockpt(fd) < 0 {
                return Err(last_error());
            }
            if libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0 {
                return Err(last_error());
            }
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
        let path = PathBuf::from(
            unsafe { CStr::from_ptr(name.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        );
        set_raw(&path)?;
        // SAFETY: F_GETFL/F_SETFL on our descriptor: writes never block the frontend.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let backend = PtyBackend {
            master: File::from(master),
            path,
            receiver: Arc::new(Mutex::new(None)),
        };
        backend.start_reader()?;
        Ok(backend)
    }

    /// The slave's path (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the master until the backend is dropped, waiting while no slave is open
    /// (the master then reports HUP or EIO).
    fn start_reader(&self) -> Result<(), PtyError> {
        let master = self.master.try_clone().map_err(PtyError::Create)?;
        let receiver = Arc::downgrade(&self.receiver);
        std::thread::Builder::new()
            .name("chardev-pty".into())
            .spawn(move || {
                let mut master = master;
                let mut buf = [0u8; 4096];
                loop {
                    let Some(receiver) = receiver.upgrade() else {
                        return; // the backend is gone
                    };
                    let mut pfd = libc::pollfd {
                        fd: master.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let ready = unsafe { libc::poll(&mut pfd, 1, 200) };
                    if ready <= 0 || pfd.revents & libc::POLLIN == 0 {
                        if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                            // No slave open: look again later.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        continue;
                    }
                    match master.read(&mut buf) {
                        Ok(n) if n > 0 => {
                            let current = receiver.lock().clone();
                            if let Some(r) = current {
                                r(&buf[..n]);
                            }
                        }
                        _ => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
            .map_err(PtyError::Create)?;
        Ok(())
    }
}

/// Puts the slave `path` in raw mode (QEMU's `cfmakeraw` on the new terminal), then
/// closes it again.
fn set_raw(path: &Path) -> Result<(), PtyError> {
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open(path)
        .map_err(PtyError::Create)?;
    // SAFETY: a zeroed termios is valid storage for tcgetattr to fill.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: termios calls on our open slave with valid storage.
    unsafe {
        if libc::tcgetattr(slave.as_raw_fd(), &mut tio) < 0 {
            return Err(last_error());
        }
        libc::cfmakeraw(&mut tio);
        if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio) < 0 {
            return Err(last_error());
        }
    }
    Ok(())
}

/// `O_NOCTTY` for the slave: qomvm must not take it as its controlling terminal.
trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY)
    }
}

impl PtyBackend {
    /// Sends output to the terminal. Non-blocking: what does not fit (no reader, a full
    /// buffer) is lost.
    pub fn write_out(&self, data: &[u8]) {
        let _ = (&self.master).write(data);
    }

    /// Installs (or removes) the receiver of the terminal's input.
    pub fn set_input_receiver(&self, receiver: Option<PtyReceiver>) {
        *self.receiver.lock() = receiver;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_carries_output_to_its_slave_and_input_back() {
        let pty = PtyBackend::open().unwrap();
        assert!(pty.path().starts_with("/dev/pts"));
        // With no slave open, output is dropped without blocking.
        for _ in 0..1000 {
            pty.write_out(&[b'x'; 64]);
        }
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let tx = Mutex::new(tx);
        pty.set_input_receiver(Some(Arc::new(move |b: &[u8]| {
            let _ = tx.lock().send(b.to_vec());
        })));
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_noctty()
            .open(pty.path())
            .unwrap();
        slave.write_all(b"in").unwrap();
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, b"in");
    }
}
