//! Process set-up of QEMU's `os-posix.c`: `-daemonize` (`os_daemonize`,
//! `os_setup_post`) and `-pidfile` (`qemu_write_pidfile`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Errors of daemonizing and of the pid file, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum OsError {
    /// `pipe`, `fork` or `setsid` failed.
    #[error("-daemonize: {what}: {source}")]
    Daemonize {
        /// The call that failed.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The pid file cannot be opened.
    #[error("cannot create PID file: Cannot open pid file: {0}")]
    PidOpen(io::Error),
    /// Another process holds the pid file's lock (another instance runs).
    #[error("cannot create PID file: Cannot lock pid file: {0}")]
    PidLock(io::Error),
    /// The pid cannot be written.
    #[error("cannot create PID file: Failed to write PID file: {0}")]
    PidWrite(io::Error),
}

fn daemonize_error(what: &'static str) -> OsError {
    OsError::Daemonize {
        what,
        source: io::Error::last_os_error(),
    }
}

/// The write end of the pipe the waiting parent reads: one 0 byte once the VM is ready.
pub struct DaemonPipe(OwnedFd);

/// QEMU's `os_daemonize`: forks; the parent waits for the daemon to report start-up and
/// exits 0 if it succeeded, 1 if it failed (the daemon printed why on the stderr they
/// share). Returns in the daemon: a second child, in a new session, so it can never
/// reacquire a terminal. Must run before any thread starts (a fork keeps only the caller).
pub fn os_daemonize() -> Result<DaemonPipe, OsError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(daemonize_error("pipe"));
    }
    // SAFETY: pipe2 returned two open descriptors that nothing else owns.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (see above), so fork is sound.
    match unsafe { libc::fork() } {
        -1 => return Err(daemonize_error("fork")),
        0 => {}
        _ => {
            drop(write_end);
            let mut status = [1u8];
            let mut pipe = File::from(read_end);
            let ready = loop {
                match pipe.read(&mut status) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // Only a 0 byte means the daemon is up; EOF means it died.
                    result => break matches!(result, Ok(1)) && status[0] == 0,
                }
            };
            std::process::exit(if ready { 0 } else { 1 });
        }
    }
    drop(read_end);
    // SAFETY: setsid has no memory-safety preconditions.
    if unsafe { libc::setsid() } < 0 {
        return Err(daemonize_error("setsid"));
    }
    // SAFETY: still single-threaded.
    match unsafe { libc::fork() } {
        -1 => return Err(daemonize_error("fork")),
        0 => {}
        // The session leader exits; its child, the daemon, reports to the first parent.
        _ => std::process::exit(0),
    }
    // SAFETY: umask and signal dispositions have no memory-safety preconditions.
    unsafe {
        libc::umask(0o027);
        libc::signal(libc::SIGTSTP, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
    }
    Ok(DaemonPipe(write_end))
}

impl DaemonPipe {
    /// QEMU's `os_setup_post`: start-up succeeded, so leave the starting directory, put
    /// /dev/null on stdin, stdout and stderr, and let the parent exit 0.
    pub fn ready(self) {
        let _ = std::env::set_current_dir("/");
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            for fd in 0..=2 {
                // SAFETY: dup2 onto the standard descriptors, which this process owns.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        // The script launcher was forked with the starting terminal's descriptors: it
        // lets them go too, or whoever waits for their end (the caller of -daemonize
        // reading its output) would wait for ever.
        if let Err(e) = ::net::launcher::detach_stdio() {
            log::debug!("script launcher: {e}");
        }
        let mut pipe = File::from(self.0);
        let _ = pipe.write_all(&[0]);
    }
}

/// The pid file of this process, held until exit: every way out ([`exit`]) removes it, as
/// QEMU's exit notifier `qemu_unlink_pidfile` does (a SIGTERM that comes while start-up
/// finishes ends the process before the main loop returns).
static PIDFILE: std::sync::Mutex<Option<PidFile>> = std::sync::Mutex::new(None);

/// Holds `pidfile` until the process exits.
pub fn hold_pidfile(pidfile: PidFile) {
    *PIDFILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(pidfile);
}

/// QEMU's exit notifiers, then `exit(code)`: the only way qomvm ends once the pid file
/// is written.
pub fn exit(code: i32) -> ! {
    let held = PIDFILE.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(pidfile) = held {
        pidfile.remove();
    }
    std::process::exit(code)
}

/// A pid file this process wrote and holds locked; removed at exit ([`PidFile::remove`]).
pub struct PidFile {
    path: PathBuf,
    file: File,
}

/// QEMU's `qemu_write_pidfile`: creates `path`, takes its lock (so a second instance with
/// the same pid file fails) and writes the pid.
pub fn write_pidfile(path: &Path) -> Result<PidFile, OsError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(OsError::PidOpen)?;
    // SAFETY: lockf on a descriptor we own.
    if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } < 0 {
        return Err(OsError::PidLock(io::Error::last_os_error()));
    }
    file.set_len(0).map_err(OsError::PidWrite)?;
    writeln!(file, "{}", std::process::id()).map_err(OsError::PidWrite)?;
    Ok(PidFile {
        path: path.to_path_buf(),
        file,
    })
}

impl PidFile {
    /// QEMU's `qemu_unlink_pidfile` at exit: removes the file if it is still ours.
    pub fn remove(self) {
        use std::os::unix::fs::MetadataExt;
        let ours = match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(on_disk), Ok(held)) => on_disk.ino() == held.ino() && on_disk.dev() == held.dev(),
            _ => false,
        };
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_holds_the_pid_is_locked_and_removed() {
        let path = std::env::temp_dir().join(format!("qomvm-pidfile-{}", std::process::id()));
        let pidfile = write_pidfile(&path).unwrap();
        // lockf locks are per process: a child sees the lock held.
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: the child only calls async-signal-safe functions before _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: open/lockf/_exit are async-signal-safe.
            unsafe {
                let fd = libc::open(c.as_ptr(), libc::O_WRONLY);
                libc::_exit(if libc::lockf(fd, libc::F_TLOCK, 0) < 0 {
                    7
                } else {
                    0
                });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(
            libc::WEXITSTATUS(status),
            7,
            "the child could not take the lock"
        );
        // Read it only now: closing any descriptor of the file drops a process's lockf
        // locks (POSIX record locks), as the child's check needs ours held.
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        pidfile.remove();
        assert!(!path.exists());
    }
}
