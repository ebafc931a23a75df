//! Runs the tap scripts (`script=`, `downscript=`) from a helper process forked when qomvm
//! starts, while it has one thread and no sandbox.
//!
//! A seccomp filter is inherited across `fork` and `exec`: a script that qomvm started
//! itself once its sandbox is installed (a `downscript` at exit, the `script` of a
//! `netdev_add`) would run under qomvm's allowlist and die on its first unusual call. The
//! launcher was forked before any filter, so what it starts runs unfiltered, as QEMU's
//! scripts do. `-sandbox spawn=deny` still forbids scripts: [`deny_spawn`] makes
//! [`run`] refuse them, as QEMU's `fork` would fail.
//!
//! Protocol, over a `SOCK_SEQPACKET` pair: a request is the program and its arguments,
//! each followed by a NUL; the reply is 5 bytes: 0 and the raw wait status, or 1 and the
//! `errno` of a program that could not be started. The launcher ends when qomvm's end
//! of the pair closes (qomvm exited, however it ended).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// qomvm's end of the pair, once the launcher runs.
static LAUNCHER: OnceLock<Mutex<OwnedFd>> = OnceLock::new();
static SPAWN_DENIED: AtomicBool = AtomicBool::new(false);

/// Largest request: arguments are a path and an interface name.
const MAX_REQUEST: usize = 8192;

/// Forks the launcher. Call it while the process has one thread (first thing in `main`):
/// the child then runs ordinary code safely. Where it cannot start, [`run`] starts
/// scripts directly.
pub fn start() -> io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two descriptors we pass.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are ours.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller guarantees one thread, so the child may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(ours);
            serve(theirs)
        }
        _ => {
            drop(theirs);
            let _ = LAUNCHER.set(Mutex::new(ours));
            Ok(())
        }
    }
}

/// `-sandbox spawn=deny`: scripts are refused from now on.
pub fn deny_spawn() {
    SPAWN_DENIED.store(true, Ordering::Release);
}

/// The request that has the launcher put /dev/null on its stdin, stdout and stderr (a
/// byte no program name starts with).
const DETACH_STDIO: &[u8] = b"\x01";

/// Has the launcher let go of the terminal it inherited (`-daemonize`'s `os_setup_post`
/// does the same for qomvm); scripts started later get /dev/null, as a daemon's do.
pub fn detach_stdio() -> io::Result<()> {
    let Some(launcher) = LAUNCHER.get() else {
        return Ok(());
    };
    let fd = launcher.lock().unwrap_or_else(|e| e.into_inner());
    send(&fd, DETACH_STDIO)?;
    let mut reply = [0u8; 5];
    recv(&fd, &mut reply)?;
    Ok(())
}

/// Runs `program args...` and waits: its raw wait status (0: exit status 0). The error of
/// a program that could not be started, or `PermissionDenied` under `spawn=deny`.
pub fn run(program: &str, args: &[&str]) -> io::Result<i32> {
    if SPAWN_DENIED.load(Ordering::Acquire) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the sandbox forbids starting processes (spawn=deny)",
        ));
    }
    let Some(launcher) = LAUNCHER.get() else {
        return Command::new(program)
            .args(args)
            .status()
            .map(|s| s.into_raw());
    };
    let mut request = Vec::new();
    for part in std::iter::once(program).chain(args.iter().copied()) {
        if part.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NUL in an argument",
            ));
        }
        request.extend_from_slice(part.as_bytes());
        request.push(0);
    }
    if request.len() > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "arguments too long",
        ));
    }
    let fd = launcher.lock().unwrap_or_else(|e| e.into_inner());
    send(&fd, &request)?;
    let mut reply = [0u8; 5];
    let n = recv(&fd, &mut reply)?;
    if n != reply.len() {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the script launcher is gone",
        ));
    }
    let value = i32::from_le_bytes([reply[1], reply[2], reply[3], reply[4]]);
    match reply[0] {
        0 => Ok(value),
        _ => Err(io::Error::from_raw_os_error(value)),
    }
}

fn send(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: send reads `bytes` from memory we own.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into memory we own.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The launcher's life: one request at a time until qomvm's end closes.
fn serve(fd: OwnedFd) -> ! {
    // Ctrl-C at the terminal reaches the whole process group: qomvm turns it into a
    // shutdown that still runs the downscripts through us, so we must outlive it.
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: setting a disposition to SIG_IGN.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    // Nothing of qomvm's but our socket and stdio stays open here: a descriptor whose
    // other end someone watches for EOF (-daemonize's start-up pipe) must close with qomvm.
    let keep = fd.as_raw_fd();
    let inherited: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for other in inherited.into_iter().filter(|&n| n > 2 && n != keep) {
        // SAFETY: closing descriptors this process inherited and will never use.
        unsafe { libc::close(other) };
    }
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let n = match recv(&fd, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if &buf[..n] == DETACH_STDIO {
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for std_fd in 0..=2 {
                    // SAFETY: dup2 onto our own standard descriptors.
                    unsafe { libc::dup2(null.as_raw_fd(), std_fd) };
                }
            }
            if send(&fd, &[0u8; 5]).is_err() {
                break;
            }
            continue;
        }
        let mut parts = buf[..n]
            .split(|&b| b == 0)
            .filter(|p| !p.is_empty())
            .map(OsStr::from_bytes);
        let reply = match parts.next() {
            None => (1u8, libc::EINVAL),
            Some(program) => {
                let mut command = Command::new(program);
                command.args(parts);
                // SAFETY: the closure runs in the forked child before exec and only
                // resets dispositions (async-signal-safe).
                unsafe {
                    command.pre_exec(|| {
                        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                            libc::signal(signal, libc::SIG_DFL);
                        }
                        Ok(())
                    });
                }
                match command.status() {
                    Ok(status) => (0u8, status.into_raw()),
                    Err(e) => (1u8, e.raw_os_error().unwrap_or(libc::EIO)),
                }
            }
        };
        let mut out = [0u8; 5];
        out[0] = reply.0;
        out[1..].copy_from_slice(&reply.1.to_le_bytes());
        if send(&fd, &out).is_err() {
            break;
        }
    }
    // SAFETY: _exit ends the launcher without running qomvm's exit handlers (the copies
    // it inherited at fork are not its own).
    unsafe { libc::_exit(0) }
}
