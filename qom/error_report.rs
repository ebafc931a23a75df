//! QEMU's `util/error-report.c`, reduced to what qomvm prints: every message on stderr
//! starts with `qomvm: `, preceded by an ISO 8601 UTC timestamp under `-msg timestamp=on`
//! (libvirt passes it and reads the domain's log with the timestamps). It lives here, in
//! the lowest crate, so that every crate's messages go through it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static TIMESTAMPS: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The command-line option being acted on (QEMU's `loc_push`), for messages printed
    /// meanwhile.
    static LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `location` (`-serial unix:/p,server=on`) before every message this thread
/// prints meanwhile, as QEMU's messages carry the option they come from.
pub fn with_location<R>(location: &str, f: impl FnOnce() -> R) -> R {
    let outer = LOCATION.with(|l| l.replace(Some(location.to_string())));
    let r = f();
    LOCATION.with(|l| *l.borrow_mut() = outer);
    r
}

/// `-msg timestamp=on|off`.
pub fn set_timestamps(on: bool) {
    TIMESTAMPS.store(on, Ordering::Relaxed);
}

/// What precedes a message: `[TIMESTAMP ]qomvm: [LOCATION: ]`.
pub fn prefix() -> String {
    let location = LOCATION
        .with(|l| l.borrow().as_ref().map(|l| format!("{l}: ")))
        .unwrap_or_default();
    if !TIMESTAMPS.load(Ordering::Relaxed) {
        return format!("qomvm: {location}");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{} qomvm: {location}",
        iso8601(now.as_secs(), now.subsec_micros())
    )
}

/// The date of a day number since 1970-01-01: (year, month 1-12, day 1-31), proleptic
/// Gregorian (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `2026-12-01T20:51:40.310363Z` for `secs` since the epoch (QEMU's
/// `g_date_time_format_iso8601` in UTC, microseconds).
fn iso8601(secs: u64, micros: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// QEMU's `error_report`: prints `qomvm: MESSAGE` (with the `-msg` timestamp) on stderr.
#[macro_export]
macro_rules! error_report {
    ($($arg:tt)*) => {
        eprintln!("{}{}", $crate::error_report::prefix(), format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso8601_utc_with_microseconds() {
        assert_eq!(iso8601(0, 0), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29 13:45:56 UTC (a leap day).
        assert_eq!(iso8601(1_709_214_356, 42), "2024-02-29T13:45:56.000042Z");
        assert_eq!(prefix(), "qomvm: ");
    }
}
