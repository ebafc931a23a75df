//! The host terminal under `-nographic`: raw mode so every key (Ctrl-C included) goes to
//! the guest, restored on every way out (normal exit, error, panic, signal).

use std::sync::Mutex;

/// The terminal settings to restore, if raw mode is on.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin's terminal in raw mode if stdin is a terminal; does nothing otherwise.
pub fn enter_raw_mode() {
    // SAFETY: isatty and tcgetattr only read the descriptor's state into a zeroed termios
    // that lives across the calls.
    unsafe {
        if libc::isatty(libc::STDIN_FILENO) != 1 {
            return;
        }
        let mut saved: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
            return;
        }
        let mut raw = saved;
        libc::cfmakeraw(&mut raw);
        // Keep output processing so guest "\n" still returns the carriage on the host.
        raw.c_oflag |= libc::OPOST;
        if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) == 0 {
            *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        }
    }
    install_signal_restore();
}

/// Restores the terminal settings saved by [`enter_raw_mode`]. Safe to call many times.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(saved) = saved {
        // SAFETY: tcsetattr reads the termios saved from this same terminal.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &saved);
        }
    }
}

/// [`restore`] for signal handlers: only async-signal-safe calls (no waiting for the lock:
/// a thread interrupted while holding it leaves the terminal as it is).
pub fn restore_from_signal() {
    if let Ok(mut saved) = SAVED.try_lock() {
        if let Some(saved) = saved.take() {
            // SAFETY: as in `restore`; tcsetattr is async-signal-safe.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &saved);
            }
        }
    }
}

extern "C" fn restore_and_die(signal: libc::c_int) {
    // Only async-signal-safe calls: tcsetattr, then re-raise with the default action.
    restore_from_signal();
    // SAFETY: restoring the default disposition and re-raising are async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// SIGQUIT keeps its default action (a core dump), with the terminal restored first;
/// SIGTERM, SIGINT and SIGHUP are a shutdown (`signals.rs`), and a panic restores it
/// through the panic hook (`main.rs`).
fn install_signal_restore() {
    for signal in [libc::SIGQUIT] {
        // SAFETY: the handler only makes async-signal-safe calls.
        unsafe {
            libc::signal(signal, restore_and_die as *const () as libc::sighandler_t);
        }
    }
}
