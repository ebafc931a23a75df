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
}
