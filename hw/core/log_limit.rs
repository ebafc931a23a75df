//! Rate-limited logging of what a guest controls (QEMU's `qemu_log_mask(LOG_GUEST_ERROR,
//! ...)` and `LOG_UNIMP`, with a budget): a guest that misuses a device in a loop gets a few
//! lines a second and a count of the rest, never a flooded log or a slowed VMM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Lines allowed per second by [`RateLimitedLog::new`]'s callers that do not choose.
pub const DEFAULT_LINES_PER_SECOND: u32 = 10;

/// A log budget: at most `per_second` lines a second; the suppressed ones are counted and
/// reported when the next second's first line goes out, at the level of the most severe
/// of them (lines a default log level hides do not surface as a count either: firmware
/// probing absent ports is routine).
pub struct RateLimitedLog {
    per_second: u32,
    window: Mutex<(Option<Instant>, u32)>,
    suppressed: AtomicU64,
    /// Whether a suppressed line was a warning.
    suppressed_warning: AtomicBool,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new(DEFAULT_LINES_PER_SECOND)
    }
}

impl RateLimitedLog {
    /// A budget of `per_second` lines a second.
    pub const fn new(per_second: u32) -> Self {
        RateLimitedLog {
            per_second,
            window: Mutex::new((None, 0)),
            suppressed: AtomicU64::new(0),
            suppressed_warning: AtomicBool::new(false),
        }
    }

    /// Whether one more warning fits this second's budget; counts it as suppressed if not.
    #[cold]
    pub fn allow(&self) -> bool {
        self.allow_at(log::Level::Warn)
    }

    /// Whether one more line at `level` fits this second's budget; counts it as suppressed
    /// if not.
    fn allow_at(&self, level: log::Level) -> bool {
        let mut window = self.window.lock();
        let now = Instant::now();
        match window.0 {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {
                if window.1 >= self.per_second {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    if level <= log::Level::Warn {
                        self.suppressed_warning.store(true, Ordering::Relaxed);
                    }
                    return false;
                }
                window.1 += 1;
            }
            _ => {
                *window = (Some(now), 1);
                let n = self.suppressed.swap(0, Ordering::Relaxed);
                let level = if self.suppressed_warning.swap(false, Ordering::Relaxed) {
                    log::Level::Warn
                } else {
                    log::Level::Info
                };
                if n > 0 {
                    log::log!(level, "{n} more guest-caused messages were not logged");
                }
            }
        }
        true
    }

    /// Logs `message()` as a warning if the budget allows.
    #[cold]
    pub fn warn(&self, message: impl FnOnce() -> String) {
        if self.allow() {
            log::warn!("{}", message());
        }
    }

    /// Logs `message()` at info level if the budget allows.
    #[cold]
    pub fn info(&self, message: impl FnOnce() -> String) {
        if self.allow_at(log::Level::Info) {
            log::info!("{}", message());
        }
    }

    /// How many lines were suppressed since the last report.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gets_the_budget_and_a_count() {
        let log = RateLimitedLog::new(5);
        let allowed = (0..100).filter(|_| log.allow()).count();
        assert_eq!(allowed, 5);
        assert_eq!(log.suppressed(), 95);
    }
}
