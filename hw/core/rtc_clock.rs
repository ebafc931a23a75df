//! The guest's calendar time as `-rtc base=` and `clock=` set it (QEMU's `softmmu/rtc.c`).
//!
//! `base=` says where the guest's clock starts: the host's UTC time (`utc`, the default),
//! its local time (`localtime`, for guests that keep the hardware clock in local time, as
//! Windows does), or a given date (`2006-06-17T16:01:21`, `2006-06-17`; libvirt's
//! `<clock offset='variable'>`). `clock=` says what moves it on: the host's time of day
//! (`host`), a monotonic clock that ignores the host's time being set (`rt`), or the
//! machine's virtual clock, which stands still while the VM is stopped (`vm`). The
//! settings are the process's, as QEMU's: `-rtc` options are merged and applied once,
//! before the machine is built.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use qom::error_report::civil_from_days;

use crate::core::timer::VmClock;

const NANOS_PER_SEC: i64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// What moves the guest's clock on (`-rtc clock=`, QEMU's `rtc_clock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RtcClockType {
    /// The host's time of day (`clock=host`, QEMU_CLOCK_HOST).
    Host,
    /// A monotonic host clock (`clock=rt`, QEMU_CLOCK_REALTIME).
    Realtime,
    /// The machine's virtual clock (`clock=vm`, QEMU_CLOCK_VIRTUAL).
    Virtual,
}

/// Where the guest's clock starts (`-rtc base=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RtcBase {
    Utc,
    LocalTime,
    /// A date given on the command line.
    Datetime,
}

#[derive(Debug)]
struct RtcConfig {
    clock: RtcClockType,
    base: RtcBase,
    /// Host UTC seconds when `-rtc` was applied, or the date `base=` gave.
    ref_start_datetime: i64,
    /// The monotonic clock's seconds when `-rtc` was applied.
    realtime_clock_offset: i64,
    /// Host seconds minus the given date, when `base=` gave one.
    host_datetime_offset: i64,
}

static CONFIG: Mutex<RtcConfig> = Mutex::new(RtcConfig {
    clock: RtcClockType::Host,
    base: RtcBase::Utc,
    ref_start_datetime: 0,
    realtime_clock_offset: 0,
    host_datetime_offset: 0,
});

/// `-rtc` values QEMU refuses.
#[derive(Debug, thiserror::Error)]
pub enum RtcOptionError {
    /// `base=` is neither `utc`, `localtime` nor a date.
    #[error("invalid datetime format; valid formats: '2006-06-17T16:01:21' or '2006-06-17'")]
    Datetime,
    /// `clock=` is not `host`, `rt` or `vm`.
    #[error("invalid option value '{0}'")]
    Clock(String),
}

/// A broken-down time, as the RTC's registers hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tm {
    /// 0-59 (60 where a leap second is written).
    pub sec: i64,
    /// 0-59.
    pub min: i64,
    /// 0-23.
    pub hour: i64,
    /// 0 = Sunday.
    pub wday: i64,
    /// 1-31.
    pub mday: i64,
    /// 1-12.
    pub mon: i64,
    /// The full year.
    pub year: i64,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Tm {
    /// `gmtime`: the broken-down time of seconds since the epoch.
    pub fn from_secs(secs: i64) -> Tm {
        let days = secs.div_euclid(SECS_PER_DAY);
        let tod = secs.rem_euclid(SECS_PER_DAY);
        let (year, mon, mday) = civil_from_days(days);
        Tm {
            sec: tod % 60,
            min: tod / 60 % 60,
            hour: tod / 3600,
            // 1970-01-01 was a Thursday.
            wday: (days + 4).rem_euclid(7),
            mday,
            mon,
            year,
        }
    }

    /// QEMU's `mktimegm`: seconds since the epoch of a broken-down UTC time. Fields out of
    /// range carry over (month 13 is January of the next year), as `mktime` does.
    pub fn to_secs(self) -> i64 {
        let months = self.year.saturating_mul(12).saturating_add(self.mon - 1);
        let (year, mon) = (months.div_euclid(12), months.rem_euclid(12) + 1);
        days_from_civil(year, mon, 1)
            .saturating_add(self.mday - 1)
            .saturating_mul(SECS_PER_DAY)
            .saturating_add(self.hour * 3600 + self.min * 60 + self.sec)
    }
}

/// The host's UTC time, nanoseconds since the epoch.
pub fn host_utc_ns() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec
        .saturating_mul(NANOS_PER_SEC)
        .saturating_add(ts.tv_nsec)
}

/// Seconds east of UTC of the host's local time at `secs` (the `TZ` environment variable
/// or the system's zone, daylight saving included).
fn local_utc_offset(secs: i64) -> i64 {
    let t = secs as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value; localtime_r only writes it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

/// `mktime`: the UTC seconds of a broken-down local time, daylight saving worked out
/// from the zone.
fn local_to_utc(tm: Tm) -> i64 {
    let wall = tm.to_secs();
    // The zone's offset at the wall time read as UTC, then at the instant that gives: two
    // steps settle on the right side of a daylight-saving change, as mktime's search does.
    let first = wall - local_utc_offset(wall);
    wall - local_utc_offset(first)
}

/// QEMU's `configure_rtc`: applies the merged `-rtc` options' `base=` and `clock=`
/// (`driftfix=` is the RTC's own property). Without `-rtc` the defaults hold: host time,
/// UTC.
pub fn configure_rtc(base: Option<&str>, clock: Option<&str>) -> Result<(), RtcOptionError> {
    let now = host_utc_ns().div_euclid(NANOS_PER_SEC);
    let mut config = RtcConfig {
        clock: RtcClockType::Host,
        base: RtcBase::Utc,
        ref_start_datetime: now,
        realtime_clock_offset: monotonic_ns().div_euclid(NANOS_PER_SEC),
        host_datetime_offset: 0,
    };
    // In QEMU's order: the base, then the clock.
    match base {
        None | Some("utc") => {}
        Some("localtime") => config.base = RtcBase::LocalTime,
        Some(date) => {
            let start = parse_datetime(date).ok_or(RtcOptionError::Datetime)?;
            config.base = RtcBase::Datetime;
            config.host_datetime_offset = now - start;
            config.ref_start_datetime = start;
        }
    }
    config.clock = match clock {
        None | Some("host") => RtcClockType::Host,
        Some("rt") => RtcClockType::Realtime,
        Some("vm") => RtcClockType::Virtual,
        Some(other) => return Err(RtcOptionError::Clock(other.to_string())),
    };
    *CONFIG.lock() = config;
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS` or `YYYY-MM-DD` (midnight), read as QEMU's `sscanf` patterns
/// read them: numbers of any width with an optional sign, anything after a full match
/// ignored (so `2006-06-17T16:01` is that day's midnight, as in QEMU); fields out of range
/// carry over as in `mktime`.
fn parse_datetime(text: &str) -> Option<i64> {
    let fields = scan_ints(text, &['-', '-', 'T', ':', ':']);
    let [year, mon, mday, rest @ ..] = fields.as_slice() else {
        return None;
    };
    let [hour, min, sec] = match rest {
        [hour, min, sec] => [*hour, *min, *sec],
        _ => [0, 0, 0],
    };
    Some(Tm { sec, min, hour, wday: 0, mday: *mday, mon: *mon, year: *year }.to_secs())
}

/// `sscanf(text, "%d<s0>%d<s1>...")` with the separators `seps`: the numbers converted
/// before the first mismatch. A number is `int`-sized, as `%d`'s; a larger one ends the scan.
fn scan_ints(text: &str, seps: &[char]) -> Vec<i64> {
    let mut values = Vec::with_capacity(seps.len() + 1);
    let mut rest = text;
    for sep in std::iter::once(None).chain(seps.iter().map(Some)) {
        if let Some(&sep) = sep {
            match rest.strip_prefix(sep) {
                Some(r) => rest = r,
                None => break,
            }
        }
        let trimmed = rest.trim_start();
        let sign_len = usize::from(trimmed.starts_with(['-', '+']));
        let digits = trimmed[sign_len..].bytes().take_while(u8::is_ascii_digit).count();
        let Ok(value) = trimmed[..sign_len + digits].parse::<i32>() else {
            break;
        };
        values.push(i64::from(value));
        rest = &trimmed[sign_len + digits..];
    }
    values
}

/// The configured clock (QEMU's `rtc_clock`).
pub fn rtc_clock_type() -> RtcClockType {
    CONFIG.lock().clock
}

/// The RTC's clock in nanoseconds: the one `-rtc clock=` chose, the virtual one being
/// `vm_clock`.
pub fn rtc_clock(vm_clock: &Arc<VmClock>) -> Arc<dyn Fn() -> i64 + Send + Sync> {
    match rtc_clock_type() {
        RtcClockType::Host => Arc::new(host_utc_ns),
        RtcClockType::Realtime => Arc::new(monotonic_ns),
        RtcClockType::Virtual => {
            let vm_clock = vm_clock.clone();
            Arc::new(move || i64::try_from(vm_clock.now_ns()).unwrap_or(i64::MAX))
        }
    }
}

/// QEMU's `qemu_ref_timedate`: UTC seconds the guest's clock stands at, before `base=`'s
/// zone, when `clock` reads `clock_ns`.
fn ref_timedate(config: &RtcConfig, clock: RtcClockType, clock_ns: i64) -> i64 {
    let secs = clock_ns.div_euclid(NANOS_PER_SEC);
    match clock {
        RtcClockType::Realtime => secs - config.realtime_clock_offset + config.ref_start_datetime,
        RtcClockType::Virtual => secs + config.ref_start_datetime,
        RtcClockType::Host if config.base == RtcBase::Datetime => secs - config.host_datetime_offset,
        RtcClockType::Host => secs,
    }
}

/// QEMU's `rtc_set_date_from_host` through `qemu_get_timedate`: the seconds the RTC's
/// registers start at (local wall time read as UTC under `base=localtime`) when the
/// configured clock reads `clock_ns`.
pub fn start_time(clock_ns: i64) -> i64 {
    let config = CONFIG.lock();
    let secs = ref_timedate(&config, config.clock, clock_ns);
    match config.base {
        RtcBase::LocalTime => secs + local_utc_offset(secs),
        RtcBase::Utc | RtcBase::Datetime => secs,
    }
}

/// QEMU's `qemu_timedate_diff`: how far the time the guest wrote to its RTC is from the
/// host's (or, with a `base=` date, from that date moved on by the time since the start),
/// in seconds. The `RTC_CHANGE` event's `offset`.
pub fn timedate_diff(tm: Tm) -> i64 {
    let config = CONFIG.lock();
    let guest = match config.base {
        RtcBase::LocalTime => local_to_utc(tm),
        RtcBase::Utc | RtcBase::Datetime => tm.to_secs(),
    };
    guest.saturating_sub(ref_timedate(&config, RtcClockType::Host, host_utc_ns()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_as_qemu_reads_them() {
        assert_eq!(parse_datetime("2006-06-17T16:01:21"), Some(1_150_560_081));
        assert_eq!(parse_datetime("2006-06-17"), Some(1_150_502_400));
        assert_eq!(parse_datetime("1970-01-01T00:00:00"), Some(0));
        // Out-of-range fields carry over, as mktime's do.
        assert_eq!(parse_datetime("2006-13-01"), parse_datetime("2007-01-01"));
        assert_eq!(parse_datetime("2006-06-17T24:00:00"), parse_datetime("2006-06-18"));
        // What follows a date that is not a whole time is ignored, as by QEMU's sscanf.
        assert_eq!(parse_datetime("2006-06-17T16:01"), parse_datetime("2006-06-17"));
        assert_eq!(parse_datetime("2006-06-17 junk"), parse_datetime("2006-06-17"));
        assert_eq!(parse_datetime(" 2006-+06- 17"), parse_datetime("2006-06-17"));
        for bad in ["", "now", "2006-06", "2006/06/17", "x-1-1", "2006-06-x", "99999999999-01-01"] {
            assert_eq!(parse_datetime(bad), None, "{bad}");
        }
    }

    #[test]
    fn broken_down_times_round_trip() {
        for secs in [0, 951_782_400, 1_150_560_081, 4_102_444_800, -86_400] {
            assert_eq!(Tm::from_secs(secs).to_secs(), secs);
        }
        // 2000-02-29 was a Tuesday.
        let tm = Tm::from_secs(951_782_400);
        assert_eq!((tm.year, tm.mon, tm.mday, tm.wday), (2000, 2, 29, 2));
    }
}
