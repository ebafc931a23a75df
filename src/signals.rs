//! Host signals that end the VM (QEMU's `os_setup_signal_handling`, `termsig_handler`,
//! `qemu_system_killed` and `qemu_kill_report`).
//!
//! SIGTERM, SIGINT and SIGHUP are blocked in every thread (the mask is set in `main`
//! before any thread starts, so all inherit it) and taken by one thread with
//! `sigwaitinfo`: no code runs in signal context. Once the main loop runs, a signal is a
//! shutdown request (`SHUTDOWN` with `"reason": "host-signal"`, disks flushed, the
//! terminal restored, exit status 0, even under `-no-shutdown`, as in QEMU); the main loop
//! prints `qomvm: terminating on signal 15 from pid N (PROCESS)`. Before it runs, nothing
//! of the guest needs saving: the same line is printed and the process exits at once.
//! Child processes (tap scripts) start with an empty mask (Rust's `Command` clears it).

use std::sync::{Mutex, OnceLock};

/// A termination signal received: which, and from whom (`pid` 0: the kernel or the
/// terminal, as for Ctrl-C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Killed {
    /// The signal number.
    pub signal: i32,
    /// The sender's process id (`si_pid`).
    pub pid: i32,
}

const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The first signal received (later ones change nothing).
static KILLED: OnceLock<Killed> = OnceLock::new();

/// What a signal does once the main loop runs: posts the shutdown request.
type OnTermination = Box<dyn Fn() + Send>;
static ON_TERMINATION: Mutex<Option<OnTermination>> = Mutex::new(None);

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks the termination signals in the calling thread (and so in every thread it
/// starts) and starts the thread that waits for them. Called first thing in `main`.
pub fn setup() {
    let set = termination_set();
    // SAFETY: pthread_sigmask reads a valid set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        log::warn!(
            "cannot block termination signals: {}",
            std::io::Error::from_raw_os_error(rc)
        );
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("signal".into())
        .spawn(move || loop {
            // SAFETY: sigwaitinfo fills a siginfo_t we own, for signals blocked here.
            let (signal, info) = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                (libc::sigwaitinfo(&set, &mut info), info)
            };
            if signal < 0 {
                continue; // EINTR
            }
            // SAFETY: for signals sent by kill()/Ctrl-C, si_pid is the valid union member.
            let pid = unsafe { info.si_pid() };
            killed(Killed { signal, pid });
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the signal thread: {e}");
    }
}

fn killed(k: Killed) {
    if KILLED.set(k).is_err() {
        return; // a shutdown is already under way
    }
    let hook = ON_TERMINATION.lock().unwrap_or_else(|e| e.into_inner());
    match &*hook {
        Some(request_shutdown) => request_shutdown(),
        None => {
            // Still starting: no guest state to save.
            kill_report();
            crate::term::restore();
            crate::os_posix::exit(0);
        }
    }
}

/// From now on a signal calls `request_shutdown` (the main loop's shutdown request); a
/// signal that came before is handled at once.
pub fn on_termination(request_shutdown: OnTermination) {
    let mut hook = ON_TERMINATION.lock().unwrap_or_else(|e| e.into_inner());
    if KILLED.get().is_some() {
        request_shutdown();
    }
    *hook = Some(request_shutdown);
}

/// QEMU's `qemu_kill_report`: says which signal ended the VM and who sent it.
pub fn kill_report() {
    if let Some(k) = KILLED.get() {
        qom::error_report!("{}", report_line(*k, process_name(k.pid).as_deref()));
    }
}

fn report_line(k: Killed, sender: Option<&str>) -> String {
    if k.pid == 0 {
        // Ctrl-C at the terminal: no process to name.
        return format!("terminating on signal {}", k.signal);
    }
    format!(
        "terminating on signal {} from pid {} ({})",
        k.signal,
        k.pid,
        sender.unwrap_or("<unknown process>")
    )
}

/// QEMU's `qemu_get_pid_name`: the sender's `argv[0]`.
fn process_name(pid: i32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = cmdline.split(|&b| b == 0).next()?;
    (!first.is_empty()).then(|| String::from_utf8_lossy(first).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_qemus() {
        let k = Killed {
            signal: 15,
            pid: 309,
        };
        assert_eq!(
            report_line(k, Some("timeout")),
            "terminating on signal 15 from pid 309 (timeout)"
        );
        assert_eq!(
            report_line(k, None),
            "terminating on signal 15 from pid 309 (<unknown process>)"
        );
        assert_eq!(
            report_line(Killed { signal: 2, pid: 0 }, None),
            "terminating on signal 2"
        );
    }

    #[test]
    fn a_process_is_named_by_its_argv0() {
        let me = std::process::id() as i32;
        assert_eq!(process_name(me), std::env::args().next());
    }
}
