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

/// QEMU's `QEMUTimer` on `QEMU_CLOCK_VIRTUAL`: a deadline in the machine clock's
/// nanoseconds, kept on a host [`DeviceTimer`] while the VM runs and held while it is
/// stopped. The device registers it on its loop ([`AsRawFd`]), asks [`take_due`] there,
/// and passes its run-state changes on ([`run_state_changed`]).
///
/// [`take_due`]: VirtualTimer::take_due
/// [`run_state_changed`]: VirtualTimer::run_state_changed
#[derive(Debug)]
pub struct VirtualTimer {
    host: DeviceTimer,
    clock: std::sync::Arc<VmClock>,
    deadline: parking_lot::Mutex<Option<u64>>,
}

impl VirtualTimer {
    /// A timer on `clock`, not armed.
    pub fn new(clock: std::sync::Arc<VmClock>) -> io::Result<Self> {
        Ok(VirtualTimer {
            host: DeviceTimer::new()?,
            clock,
            deadline: parking_lot::Mutex::new(None),
        })
    }

    /// The clock's nanoseconds now.
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// When it fires, if armed.
    pub fn deadline(&self) -> Option<u64> {
        *self.deadline.lock()
    }

    fn start_host(&self, deadline: u64) -> io::Result<()> {
        self.host
            .arm(Duration::from_nanos(deadline.saturating_sub(self.clock.now_ns())))
    }

    /// Fires at clock time `deadline` (at once if that has passed), replacing any earlier
    /// deadline (QEMU's `timer_mod`).
    pub fn arm_at(&self, deadline: u64) -> io::Result<()> {
        let mut d = self.deadline.lock();
        *d = Some(deadline);
        if self.clock.is_running() {
            self.start_host(deadline)?;
        }
        Ok(())
    }

    /// Fires `ns` nanoseconds of VM time from now.
    pub fn arm_after(&self, ns: u64) -> io::Result<()> {
        self.arm_at(self.clock.now_ns().saturating_add(ns))
    }

    /// Disarms it (QEMU's `timer_del`).
    pub fn cancel(&self) -> io::Result<()> {
        let mut d = self.deadline.lock();
        *d = None;
        self.host.disarm()
    }

    /// For the loop's handler: whether the deadline has come, which disarms the timer. A
    /// host expiry that came before the deadline (it moved) is consumed and the host timer
    /// set again; one while the VM is stopped is consumed, and [`run_state_changed`] sets
    /// the host timer again when the VM runs.
    ///
    /// [`run_state_changed`]: VirtualTimer::run_state_changed
    pub fn take_due(&self) -> io::Result<bool> {
        if !self.host.take_expired() {
            return Ok(false);
        }
        let mut d = self.deadline.lock();
        let Some(deadline) = *d else {
            return Ok(false);
        };
        if !self.clock.is_running() {
            return Ok(false);
        }
        if self.clock.now_ns() < deadline {
            self.start_host(deadline)?;
            return Ok(false);
        }
        *d = None;
        Ok(true)
    }

    /// The VM stopped or runs again (its clock did, right before): the host timer
    /// follows.
    pub fn run_state_changed(&self, running: bool) -> io::Result<()> {
        let d = self.deadline.lock();
        match *d {
            Some(deadline) if running => self.start_host(deadline),
            _ => self.host.disarm(),
        }
    }
}

impl AsRawFd for VirtualTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.host.as_raw_fd()
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
    fn a_virtual_timer_holds_its_deadline_while_the_vm_is_stopped() {
        let clock = std::sync::Arc::new(VmClock::new(true));
        let t = VirtualTimer::new(clock.clone()).unwrap();
        t.arm_after(2_000_000).unwrap();
        clock.set_running(false);
        t.run_state_changed(false).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.take_due().unwrap(), "stopped: not due");
        clock.set_running(true);
        t.run_state_changed(true).unwrap();
        let start = std::time::Instant::now();
        while !t.take_due().unwrap() {
            assert!(start.elapsed() < Duration::from_secs(5), "never due");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(t.deadline(), None);
        // Moved later before the host timer fired: not due at the old time.
        t.arm_after(1_000_000).unwrap();
        t.arm_after(200_000_000).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.take_due().unwrap());
        t.cancel().unwrap();
        assert_eq!(t.deadline(), None);
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
