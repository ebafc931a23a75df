//! `-rtc base=` and `clock=` (`hw/core/rtc_clock.rs`) and the `RTC_CHANGE` event, read
//! through the RTC's registers over QEMU's qtest protocol: a given date, the host's local
//! time (`TZ` set for qomvm), a clock that stands still while the VM is stopped, and what a
//! guest that sets its clock tells QMP clients (libvirt's `<clock offset='variable'>`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use test_support::fuzz_qtest::Qtest;
use test_support::qmp::QmpClient;

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
const WAIT: Duration = Duration::from_secs(10);

/// The date and time registers, decoded from BCD (the RTC's default format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RtcTime {
    year: u32,
    mon: u32,
    mday: u32,
    wday: u32,
    hour: u32,
    min: u32,
    sec: u32,
}

impl RtcTime {
    fn second_of_day(&self) -> u32 {
        self.hour * 3600 + self.min * 60 + self.sec
    }
}

fn bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

fn cmos(q: &mut Qtest, reg: u8) -> u8 {
    q.cmd(format!("outb 0x70 {reg:#x}"));
    q.value("inb 0x71".into()) as u8
}

fn set_cmos(q: &mut Qtest, reg: u8, val: u8) {
    q.cmd(format!("outb 0x70 {reg:#x}"));
    q.cmd(format!("outb 0x71 {val:#x}"));
}

/// Reads the time twice until both agree, so no read straddles a second.
fn read_time(q: &mut Qtest) -> RtcTime {
    let read = |q: &mut Qtest| RtcTime {
        sec: bcd(cmos(q, 0x00)),
        min: bcd(cmos(q, 0x02)),
        hour: bcd(cmos(q, 0x04)),
        wday: bcd(cmos(q, 0x06)),
        mday: bcd(cmos(q, 0x07)),
        mon: bcd(cmos(q, 0x08)),
        year: bcd(cmos(q, 0x32)) * 100 + bcd(cmos(q, 0x09)),
    };
    loop {
        let (a, b) = (read(q), read(q));
        if a == b {
            return a;
        }
    }
}

/// Writes the time registers as a guest sets its clock: SET, the fields, SET cleared.
fn write_time(q: &mut Qtest, t: RtcTime) {
    let to_bcd = |v: u32| (((v / 10) << 4) | (v % 10)) as u8;
    let reg_b = cmos(q, 0x0b);
    set_cmos(q, 0x0b, reg_b | 0x80);
    for (reg, v) in [
        (0x00, t.sec),
        (0x02, t.min),
        (0x04, t.hour),
        (0x07, t.mday),
        (0x08, t.mon),
    ] {
        set_cmos(q, reg, to_bcd(v));
    }
    set_cmos(q, 0x09, to_bcd(t.year % 100));
    set_cmos(q, 0x32, to_bcd(t.year / 100));
    set_cmos(q, 0x0b, reg_b & !0x80);
}

fn host_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The time of day in zone `tz` now, as the C library reads `TZ` (daylight-saving rules
/// included), through `date`.
fn zone_second_of_day(tz: &str) -> u32 {
    let out = std::process::Command::new("date")
        .arg("+%H %M %S")
        .env("TZ", tz)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<u32> = text
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    f[0] * 3600 + f[1] * 60 + f[2]
}

/// Start-up and reads may take this long on a busy machine.
const SLACK: u32 = 30;

/// Seconds since 16:01:21 on a clock started at 2006-06-17T16:01:21, checking the date.
fn since_base(t: RtcTime) -> u32 {
    assert_eq!((t.year, t.mon, t.mday), (2006, 6, 17), "{t:?}");
    t.second_of_day() - (16 * 3600 + 60 + 21)
}

/// Seconds between two times of day, the shorter way round midnight.
fn day_distance(a: u32, b: u32) -> u32 {
    let d = a.abs_diff(b);
    d.min(86_400 - d)
}

fn start(name: &str, env: &[(&str, &str)], args: &[&str]) -> (Qtest, QmpClient) {
    let (q, qmp, _) = Qtest::start_with_qmp_env(QOMVM, name, env, args);
    (q, qmp)
}

#[test]
fn a_given_date_starts_the_clock_there_and_it_runs_on() {
    let (mut q, mut qmp) = start("rtc-date", &[], &["-rtc", "base=2006-06-17T16:01:21"]);
    let t = read_time(&mut q);
    // 2006-06-17 was a Saturday (day 7, Sunday being 1).
    assert_eq!(t.wday, 7, "{t:?}");
    assert!(since_base(t) <= SLACK, "{t:?}");
    std::thread::sleep(Duration::from_millis(1500));
    let later = read_time(&mut q);
    assert!(
        later.second_of_day() > t.second_of_day(),
        "{t:?} then {later:?}"
    );
    // QMP reads the same time as QEMU's struct tm, through the machine's alias too.
    let tm = qmp.execute(
        "qom-get",
        json!({"path": "/machine", "property": "rtc-time"}),
    );
    let tm = &tm["return"];
    assert_eq!(
        [
            &tm["tm_year"],
            &tm["tm_mon"],
            &tm["tm_mday"],
            &tm["tm_hour"]
        ],
        [&json!(106), &json!(5), &json!(17), &json!(16)],
        "{tm}"
    );
    let props = qmp.execute("qom-list", json!({"path": "/machine"}));
    assert!(
        props["return"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "rtc-time", "type": "struct tm"})),
        "{props}"
    );
    q.check_alive();
    drop(q);
    // A date alone is that day's midnight.
    let (mut q, _qmp) = start("rtc-day", &[], &["-rtc", "base=2006-06-17"]);
    let t = read_time(&mut q);
    assert_eq!((t.year, t.mon, t.mday), (2006, 6, 17), "{t:?}");
    assert!(t.second_of_day() <= SLACK, "{t:?}");
    q.check_alive();
}

#[test]
fn base_localtime_is_the_hosts_zone_and_utc_is_not() {
    // POSIX zone strings need no zone files: UTC+5:30 (east is negative in TZ), and US
    // Eastern time with its daylight-saving rule.
    for tz in ["XYZ-5:30", "EST5EDT,M3.2.0,M11.1.0"] {
        let zone = [("TZ", tz)];
        let (mut q, _qmp) = start("rtc-local", &zone, &["-rtc", "base=localtime"]);
        let local = read_time(&mut q).second_of_day();
        let expected = zone_second_of_day(tz);
        assert!(
            day_distance(local, expected) <= SLACK,
            "{tz}: {local} against {expected}"
        );
        q.check_alive();
        drop(q);
        let (mut q, _qmp) = start("rtc-utc", &zone, &["-rtc", "base=utc"]);
        let utc = read_time(&mut q).second_of_day();
        let expected = host_secs().rem_euclid(86_400) as u32;
        assert!(
            day_distance(utc, expected) <= SLACK,
            "{tz}: {utc} against {expected}"
        );
        q.check_alive();
    }
}

/// Seconds the RTC moved on across a 2.5 s stop.
fn seconds_across_a_stop(q: &mut Qtest, qmp: &mut QmpClient) -> u32 {
    let before = read_time(q).second_of_day();
    assert_eq!(qmp.execute("stop", json!({})), json!({"return": {}}));
    std::thread::sleep(Duration::from_millis(2500));
    let after = read_time(q).second_of_day();
    assert_eq!(qmp.execute("cont", json!({})), json!({"return": {}}));
    day_distance(before, after)
}

#[test]
fn clock_vm_stands_still_while_the_vm_is_stopped() {
    let (mut q, mut qmp) = start(
        "rtc-vm",
        &[],
        &["-rtc", "base=2006-06-17T16:01:21,clock=vm"],
    );
    assert!(since_base(read_time(&mut q)) <= SLACK);
    assert!(seconds_across_a_stop(&mut q, &mut qmp) <= 1);
    // It runs again after cont.
    let before = read_time(&mut q).second_of_day();
    std::thread::sleep(Duration::from_millis(2100));
    let after = read_time(&mut q).second_of_day();
    assert!(day_distance(before, after) >= 1, "{before} then {after}");
    q.check_alive();
    drop(q);
    // The host's clock, and the monotonic one, run through a stop.
    for clock in ["clock=host", "clock=rt"] {
        let (mut q, mut qmp) = start("rtc-host", &[], &["-rtc", clock]);
        assert!(seconds_across_a_stop(&mut q, &mut qmp) >= 2, "{clock}");
        q.check_alive();
    }
}

#[test]
fn a_guest_setting_its_clock_sends_rtc_change_with_the_offset() {
    let (mut q, mut qmp) = start("rtc-change", &[], &["-rtc", "base=2006-06-17T16:01:21"]);
    // No event until the guest sets the time.
    let t = read_time(&mut q);
    assert!(qmp
        .wait_event("RTC_CHANGE", Duration::from_millis(300))
        .is_none());
    // A year on: the offset is from the given date moved on by the time since the start.
    write_time(&mut q, RtcTime { year: 2007, ..t });
    let event = qmp.wait_event("RTC_CHANGE", WAIT).expect("RTC_CHANGE");
    let offset = event["data"]["offset"].as_i64().unwrap();
    assert!(
        (365 * 86_400 - 3..=365 * 86_400 + 1).contains(&offset),
        "{event}"
    );
    assert_eq!(read_time(&mut q).year, 2007);
    // The event names the RTC, whose `date` QMP reads.
    let path = event["data"]["qom-path"].as_str().unwrap();
    assert!(path.starts_with("/machine/"), "{event}");
    let date = qmp.execute("qom-get", json!({"path": path, "property": "date"}));
    assert_eq!(date["return"]["tm_year"], json!(107), "{date}");
    // As QEMU's, the event is throttled to one a second: of three quick changes the
    // first goes out at once and the last one after the period.
    std::thread::sleep(Duration::from_millis(1200));
    let t = read_time(&mut q);
    write_time(&mut q, RtcTime { year: 2008, ..t });
    write_time(&mut q, RtcTime { year: 2009, ..t });
    write_time(&mut q, RtcTime { year: 2010, ..t });
    let first = qmp.wait_event("RTC_CHANGE", WAIT).expect("RTC_CHANGE");
    let last = qmp.wait_event("RTC_CHANGE", WAIT).expect("RTC_CHANGE");
    let years = |e: &serde_json::Value| e["data"]["offset"].as_i64().unwrap() / (365 * 86_400);
    assert_eq!((years(&first), years(&last)), (2, 4), "{first} {last}");
    assert!(qmp
        .wait_event("RTC_CHANGE", Duration::from_millis(1500))
        .is_none());
    q.check_alive();
}

#[test]
fn under_base_localtime_a_guest_writing_its_local_time_back_changes_nothing() {
    let tz = "XYZ-5:30";
    let zone = [("TZ", tz)];
    for (base, expected) in [("base=localtime", 0), ("base=utc", 5 * 3600 + 1800)] {
        let (mut q, mut qmp) = start("rtc-change-local", &zone, &["-rtc", base]);
        // The guest's idea of the local time, written back as Windows keeps it; not in
        // the seconds around local midnight, where the date read would not match it.
        let (t, local) = loop {
            let t = read_time(&mut q);
            let local = zone_second_of_day(tz);
            if (SLACK..86_400 - SLACK).contains(&local) {
                break (t, local);
            }
            std::thread::sleep(Duration::from_secs(u64::from(SLACK)));
        };
        let hms = RtcTime {
            hour: local / 3600,
            min: local / 60 % 60,
            sec: local % 60,
            ..t
        };
        // Under base=utc the date is UTC's, a day behind the local one after 18:30 UTC.
        let expected = if base == "base=utc" && local < t.second_of_day() {
            expected - 86_400
        } else {
            expected
        };
        write_time(&mut q, hms);
        let event = qmp.wait_event("RTC_CHANGE", WAIT).expect("RTC_CHANGE");
        let offset = event["data"]["offset"].as_i64().unwrap();
        assert!((offset - expected).abs() <= 3, "{base}: {event}");
        q.check_alive();
    }
}
