//! One-shot timers for devices' event loops (what QEMU's `timer_new_ms` and `timer_mod`
//! give a device): a non-blocking `timerfd` the device registers on its
//! [`AioContext`](crate::core::iothread::AioContext), whose handler runs when it expires.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A one-shot monotonic timer as a descriptor that turns readable when it expires.
#[derive(Debug)]
pub struct DeviceTimer {
    fd: OwnedFd,
}

impl DeviceTimer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Self> {
        // SAFETY: no memory is passed; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DeviceTimer { fd })
    }

    fn set(&self, after: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec for the call; the old value is not asked for.
        let ret = unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Expires once `after` from now (at least a nanosecond: zero would disarm), replacing
    /// any earlier expiry (QEMU's `timer_mod`).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        self.set(after.max(Duration::from_nanos(1)))
    }

    /// Cancels the expiry (QEMU's `timer_del`); a pending expiration is dropped.
    pub fn disarm(&self) -> io::Result<()> {
        self.set(Duration::ZERO)
    }

    /// Consumes an expiration; returns whether there was one. Never blocks.
    pub fn take_expired(&self) -> bool {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count`, which is 8 bytes long.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        n == 8 && count > 0
    }
}

/// QEMU's `QEMU_CLOCK_VIRTUAL`: nanoseconds that advance while the VM runs and stand
/// still while it is stopped (`-S`, `stop`, a migration's last pass), so guest-visible
/// counters do not jump over a pause. The machine's is `VmState::clock`, which the run
/// state starts and stops.
#[derive(Debug)]
pub struct VmClock {
    origin: std::time::Instant,
    state: parking_lot::Mutex<VmClockState>,
}

#[derive(Debug)]
struct VmClockState {
    /// Host nanoseconds (since `origin`) spent stopped, which the clock leaves out.
    stopped_total: u64,
    /// Host nanoseconds (since `origin`) when the clock stopped, while it is stopped.
    stopped_at: Option<u64>,
}

impl Default for VmClock {
    /// Stopped at zero, as a VM before it starts.
    fn default() -> Self {
        VmClock::new(false)
    }
}

impl VmClock {
    /// A clock at zero, running or stopped.
    pub fn new(running: bool) -> Self {
        VmClock {
            origin: std::time::Instant::now(),
            state: parking_lot::Mutex::new(VmClockState {
                stopped_total: 0,
                stopped_at: (!running).then_some(0),
            }),
        }
    }

    fn host_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The clock's nanoseconds.
    pub fn now_ns(&self) -> u64 {
        let s = self.state.lock();
        let host = s.stopped_at.unwrap_or_else(|| self.host_ns());
        host.saturating_sub(s.stopped_total)
    }

    /// Whether the clock advances.
    pub fn is_running(&self) -> bool {
        self.state.lock().stopped_at.is_none()
    }

    /// Stops or restarts the clock (the VM stopped or runs again); repeating either is a
    /// no-op.
    pub fn set_running(&self, running: bool) {
        let mut s = self.state.lock();
        match (running, s.stopped_at) {
            (true, Some(at)) => {
                let host = self.host_ns();
                s.stopped_total = s.stopped_total.saturating_add(host.saturating_sub(at));
                s.stopped_at = None;
            }
            (false, None) => s.stopped_at = Some(self.host_ns()),
            _ => {}
        }
    }
}

impl AsRawFd for DeviceTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_expires_once_and_can_be_cancelled() {
        let t = DeviceTimer::new().unwrap();
        assert!(!t.take_expired());
        t.arm(Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(t.take_expired());
        assert!(!t.take_expired());
        t.arm(Duration::from_millis(1)).unwrap();
        t.disarm().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.take_expired());
    }

    #[test]
    fn the_vm_clock_stands_still_while_stopped() {
        let clock = VmClock::new(false);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.now_ns(), 0, "stopped from the start");
        clock.set_running(true);
        std::thread::sleep(Duration::from_millis(5));
        let ran = clock.now_ns();
        assert!(ran >= 5_000_000, "{ran}");
        clock.set_running(false);
        clock.set_running(false);
        let stopped = clock.now_ns();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.now_ns(), stopped);
        clock.set_running(true);
        let resumed = clock.now_ns();
        assert!(resumed >= stopped && resumed < stopped + 15_000_000, "{stopped} {resumed}");
    }
}
