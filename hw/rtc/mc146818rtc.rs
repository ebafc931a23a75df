//! `mc146818rtc`, the PC's real-time clock and CMOS memory (QEMU's
//! `hw/rtc/mc146818rtc.c`).
//!
//! Ports 0x70 (index; bit 7 is the NMI mask, which is not modelled and is dropped) and 0x71
//! (data). The clock runs on the clock `-rtc clock=` chose (the host's UTC time by
//! default) plus an offset that starts where `-rtc base=` says and that the guest changes
//! by setting the time, which QMP clients learn from `RTC_CHANGE` (`hw/core/rtc_clock.rs`). Time registers read in BCD or binary (register B's DM bit) and 24- or
//! 12-hour format (bit 1), and the year is kept relative to `base_year` with the century in
//! CMOS byte 0x32, as QEMU does.
//!
//! Simplifications: register A's update-in-progress bit is never set (a reader never has
//! to wait, and never reads a torn time because each read of a time register computes it
//! whole); the divider bits are stored, and a divider held in reset stops the clock as SET
//! does. Update-ended, alarm and periodic interrupts are delivered on IRQ 8 by a timer
//! thread started when the guest first enables one of them; the flags are also set when
//! register C is read without interrupts, as the hardware sets them whatever register B
//! says (the periodic flag only while PIE is set, as in QEMU).
//!
//! The board fills the memory-size bytes with [`Mc146818Rtc::set_memory_size`] (QEMU's
//! `pc_cmos_init`) and other CMOS bytes with [`Mc146818Rtc::set_memory`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use qom::{
    type_init, ClassInitFor, ObjectClass, ObjectRef, Prop, Property, PropertyKind, StateAccessor, Typed, Value,
};

use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::irq::IrqLine;
use crate::core::qapi_event;
use crate::core::rtc_clock::{self, Tm};
use crate::core::qdev_properties::LostTickPolicy;
use crate::core::runstate::{self, WakeupReason};
use crate::core::services::MachineServices;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{
    qdev_new_typed, qdev_realize, DeviceCategory, DeviceContext, DeviceImpl, QdevError,
    RealizeError,
};
use crate::isa::isa_bus::{IsaDevice, ISA_NUM_IRQS};

/// QEMU's `TYPE_MC146818_RTC`.
pub const TYPE_MC146818_RTC: &str = "mc146818rtc";

/// CMOS byte the firmware reads after a reset to tell a resume from a boot (the
/// "shutdown status").
pub const CMOS_RESET_CODE: u8 = 0x0f;
/// [`CMOS_RESET_CODE`] value meaning "resume from S3" (set as the guest goes to sleep).
pub const CMOS_RESET_S3_RESUME: u8 = 0xfe;
/// Size of the CMOS memory, registers included.
pub const CMOS_SIZE: usize = 128;
/// Owed periodic ticks re-injected on register C reads between two ticks (QEMU's
/// `RTC_REINJECT_ON_ACK_COUNT`).
const REINJECT_ON_ACK: u32 = 20;

// Register indexes.
/// Seconds.
pub const RTC_SECONDS: u8 = 0;
/// Seconds alarm.
pub const RTC_SECONDS_ALARM: u8 = 1;
/// Minutes.
pub const RTC_MINUTES: u8 = 2;
/// Minutes alarm.
pub const RTC_MINUTES_ALARM: u8 = 3;
/// Hours (bit 7: PM in 12-hour mode).
pub const RTC_HOURS: u8 = 4;
/// Hours alarm.
pub const RTC_HOURS_ALARM: u8 = 5;
/// Day of the week, 1 = Sunday.
pub const RTC_DAY_OF_WEEK: u8 = 6;
/// Day of the month.
pub const RTC_DAY_OF_MONTH: u8 = 7;
/// Month, 1-12.
pub const RTC_MONTH: u8 = 8;
/// Year within the century (relative to `base_year`).
pub const RTC_YEAR: u8 = 9;
/// Register A: update in progress, divider, periodic rate.
pub const RTC_REG_A: u8 = 10;
/// Register B: SET, interrupt enables, data mode, 24-hour mode.
pub const RTC_REG_B: u8 = 11;
/// Register C: interrupt flags (read-only, cleared by reading).
pub const RTC_REG_C: u8 = 12;
/// Register D: valid RAM and time (read-only).
pub const RTC_REG_D: u8 = 13;
/// The century byte (IBM AT; the one ACPI's FADT names).
pub const RTC_CENTURY: u8 = 0x32;
/// The PS/2 century byte; writes to it go to [`RTC_CENTURY`], as in QEMU.
pub const RTC_IBM_PS2_CENTURY_BYTE: u8 = 0x37;

/// Register B: the clock is stopped for setting.
pub const REG_B_SET: u8 = 0x80;
/// Register B: periodic interrupt enable.
pub const REG_B_PIE: u8 = 0x40;
/// Register B: alarm interrupt enable.
pub const REG_B_AIE: u8 = 0x20;
/// Register B: update-ended interrupt enable.
pub const REG_B_UIE: u8 = 0x10;
/// Register B: square wave enable.
pub const REG_B_SQWE: u8 = 0x08;
/// Register B: binary (not BCD) data mode.
pub const REG_B_DM: u8 = 0x04;
/// Register B: 24-hour mode.
pub const REG_B_24H: u8 = 0x02;

/// Register C: an enabled interrupt is pending.
pub const REG_C_IRQF: u8 = 0x80;
/// Register C: periodic interrupt flag.
pub const REG_C_PF: u8 = 0x40;
/// Register C: alarm flag.
pub const REG_C_AF: u8 = 0x20;
/// Register C: update-ended flag.
pub const REG_C_UF: u8 = 0x10;
const REG_C_MASK: u8 = REG_C_PF | REG_C_AF | REG_C_UF;

/// Register D: the battery is good, time and RAM are valid.
pub const REG_D_VRT: u8 = 0x80;

/// Register A's divider bits: 0x20 is the 32.768 kHz time base; above, the chain is held in
/// reset.
const REG_A_DV: u8 = 0x70;
const REG_A_RATE: u8 = 0x0f;

const NANOS_PER_SEC: i64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// The thread that delivers interrupts sleeps at most this long, so it notices when the
/// device is gone.
const TIMER_MAX_SLEEP: Duration = Duration::from_secs(1);

/// The RTC's clock in nanoseconds (`-rtc clock=`'s; host UTC time by default).
pub type RtcClock = Arc<dyn Fn() -> i64 + Send + Sync>;

fn host_clock() -> RtcClock {
    Arc::new(rtc_clock::host_utc_ns)
}

struct RtcState {
    cmos: [u8; CMOS_SIZE],
    index: u8,
    /// QEMU's `base_year` after realize: 2000 counts as 0, so that the year register holds
    /// the year within the century and the century byte the century.
    base_year: i64,
    /// Guest time minus host time, nanoseconds.
    offset: i64,
    clock: RtcClock,
    /// The last guest second the flags were brought up to.
    last_sec: i64,
    /// Host time of the next periodic tick while PIE is set.
    next_periodic: Option<i64>,
    /// `lost_tick_policy=slew`: periodic ticks the guest missed are re-injected.
    slew: bool,
    /// Missed periodic ticks still to re-inject (QEMU's `irq_coalesced`).
    coalesced: u32,
    /// Re-injections on register C reads since the last tick (QEMU's
    /// `irq_reinject_on_ack_count`).
    reinjected_on_ack: u32,
    /// Host time of the next catch-up tick while ticks are owed.
    next_catch_up: Option<i64>,
    irq: IrqLine,
    level: bool,
    /// The guest set the time: `RTC_CHANGE`'s offset, to send outside the lock.
    changed: Option<i64>,
    /// Whether `clock` is the host's UTC clock, which the migration stream's offset is
    /// from.
    host_utc_clock: bool,
}

impl RtcState {
    fn new(clock: RtcClock) -> Self {
        let mut s = RtcState {
            cmos: [0; CMOS_SIZE],
            index: 0,
            base_year: 0,
            offset: 0,
            clock,
            last_sec: 0,
            next_periodic: None,
            slew: false,
            coalesced: 0,
            reinjected_on_ack: 0,
            next_catch_up: None,
            irq: IrqLine::disconnected(),
            level: false,
            changed: None,
            host_utc_clock: true,
        };
        s.cmos[RTC_REG_A as usize] = 0x26;
        s.cmos[RTC_REG_B as usize] = REG_B_24H;
        s.cmos[RTC_REG_D as usize] = REG_D_VRT;
        s.last_sec = s.guest_secs();
        s.update_time();
        s
    }

    fn reg(&self, r: u8) -> u8 {
        self.cmos[r as usize]
    }

    fn binary(&self) -> bool {
        self.reg(RTC_REG_B) & REG_B_DM != 0
    }

    fn rtc_to_bcd(&self, v: i64) -> u8 {
        if self.binary() {
            v as u8
        } else {
            (((v / 10) << 4) | (v % 10)) as u8
        }
    }

    fn rtc_from_bcd(&self, v: u8) -> i64 {
        if self.binary() {
            v.into()
        } else {
            i64::from(v >> 4) * 10 + i64::from(v & 0x0f)
        }
    }

    /// Whether the clock advances: not stopped for setting, divider not in reset.
    fn running(&self) -> bool {
        self.reg(RTC_REG_B) & REG_B_SET == 0 && self.reg(RTC_REG_A) & REG_A_DV <= 0x20
    }

    fn host_ns(&self) -> i64 {
        (self.clock)()
    }

    /// The guest's time minus the host's UTC time, what the migration stream carries
    /// whatever clock either side's RTC runs on; `now` is the RTC clock's time.
    fn offset_from_host_utc(&self, now: i64) -> i64 {
        if self.host_utc_clock {
            return self.offset;
        }
        now.saturating_add(self.offset)
            .saturating_sub(rtc_clock::host_utc_ns())
    }

    /// The inverse of [`RtcState::offset_from_host_utc`]: the offset from this RTC's
    /// clock of a migrated one.
    fn offset_to_clock(&self, from_host_utc: i64, now: i64) -> i64 {
        if self.host_utc_clock {
            return from_host_utc;
        }
        from_host_utc
            .saturating_add(rtc_clock::host_utc_ns())
            .saturating_sub(now)
    }

    fn guest_secs(&self) -> i64 {
        self.host_ns()
            .saturating_add(self.offset)
            .div_euclid(NANOS_PER_SEC)
    }

    /// QEMU's `rtc_set_cmos`: the time registers from a time.
    fn set_cmos(&mut self, tm: Tm) {
        let h24 = self.reg(RTC_REG_B) & REG_B_24H != 0;
        let hours = if h24 {
            self.rtc_to_bcd(tm.hour)
        } else {
            let h = if tm.hour % 12 == 0 { 12 } else { tm.hour % 12 };
            self.rtc_to_bcd(h) | if tm.hour >= 12 { 0x80 } else { 0 }
        };
        let year = tm.year - self.base_year;
        let values = [
            (RTC_SECONDS, self.rtc_to_bcd(tm.sec)),
            (RTC_MINUTES, self.rtc_to_bcd(tm.min)),
            (RTC_HOURS, hours),
            (RTC_DAY_OF_WEEK, self.rtc_to_bcd(tm.wday + 1)),
            (RTC_DAY_OF_MONTH, self.rtc_to_bcd(tm.mday)),
            (RTC_MONTH, self.rtc_to_bcd(tm.mon)),
            (RTC_YEAR, self.rtc_to_bcd(year.rem_euclid(100))),
            (RTC_CENTURY, self.rtc_to_bcd(year.div_euclid(100))),
        ];
        for (r, v) in values {
            self.cmos[r as usize] = v;
        }
    }

    /// QEMU's `rtc_get_time`: the time the registers hold.
    fn get_time(&self) -> Tm {
        let raw_hours = self.reg(RTC_HOURS);
        let mut hour = self.rtc_from_bcd(raw_hours & 0x7f);
        if self.reg(RTC_REG_B) & REG_B_24H == 0 {
            hour %= 12;
            if raw_hours & 0x80 != 0 {
                hour += 12;
            }
        }
        Tm {
            sec: self.rtc_from_bcd(self.reg(RTC_SECONDS)),
            min: self.rtc_from_bcd(self.reg(RTC_MINUTES)),
            hour,
            wday: self.rtc_from_bcd(self.reg(RTC_DAY_OF_WEEK)) - 1,
            mday: self.rtc_from_bcd(self.reg(RTC_DAY_OF_MONTH)),
            mon: self.rtc_from_bcd(self.reg(RTC_MONTH)),
            year: self.rtc_from_bcd(self.reg(RTC_YEAR))
                + self.base_year
                + self.rtc_from_bcd(self.reg(RTC_CENTURY)) * 100,
        }
    }

    /// QEMU's `rtc_update_time`: the registers from the clock, unless stopped.
    fn update_time(&mut self) {
        if self.running() {
            self.set_cmos(Tm::from_secs(self.guest_secs()));
        }
    }

    /// QEMU's `rtc_set_time`: the clock from the registers (the guest set the time), and
    /// the `RTC_CHANGE` event's offset for the caller to send once the lock is gone.
    fn set_time(&mut self) {
        let tm = self.get_time();
        let guest = tm.to_secs().saturating_mul(NANOS_PER_SEC);
        // Saturating: a guest may write any year and century (found by the device fuzzer).
        self.offset = guest.saturating_sub(self.host_ns());
        self.last_sec = self.guest_secs();
        self.changed = Some(rtc_clock::timedate_diff(tm));
    }

    /// Whether an alarm register matches a value (0xC0-0xFF is "don't care").
    fn alarm_field_matches(&self, alarm: u8, value: i64) -> bool {
        alarm & 0xc0 == 0xc0 || self.rtc_from_bcd(alarm) == value
    }

    fn alarm_matches(&self, tod: i64) -> bool {
        let hour = tod / 3600;
        let alarm_hour = self.reg(RTC_HOURS_ALARM);
        let hour_matches = if alarm_hour & 0xc0 == 0xc0 {
            true
        } else if self.reg(RTC_REG_B) & REG_B_24H != 0 {
            self.rtc_from_bcd(alarm_hour) == hour
        } else {
            let mut h = self.rtc_from_bcd(alarm_hour & 0x7f) % 12;
            if alarm_hour & 0x80 != 0 {
                h += 12;
            }
            h == hour
        };
        hour_matches
            && self.alarm_field_matches(self.reg(RTC_MINUTES_ALARM), tod / 60 % 60)
            && self.alarm_field_matches(self.reg(RTC_SECONDS_ALARM), tod % 60)
    }

    /// The periodic interrupt's period (register A's rate), in nanoseconds.
    fn periodic_period_ns(&self) -> Option<i64> {
        let mut rate = self.reg(RTC_REG_A) & REG_A_RATE;
        if rate == 0 || self.reg(RTC_REG_B) & REG_B_PIE == 0 {
            return None;
        }
        // Rates 1 and 2 give the same as 8 and 9 on a 32.768 kHz time base.
        if rate <= 2 {
            rate += 7;
        }
        Some((NANOS_PER_SEC << (rate - 1)) / 32_768)
    }

    /// Brings the flags of register C up to now: UF once a second passed, AF if the alarm
    /// time passed, PF if a period passed; IRQF and the line if an enabled one is set.
    /// Returns whether the alarm went off with its interrupt enabled, which wakes a
    /// sleeping machine (QEMU's `rtc_update_timer`).
    fn advance(&mut self) -> bool {
        let mut alarm = false;
        let now_sec = self.guest_secs();
        if !self.running() {
            self.last_sec = now_sec;
        } else if now_sec > self.last_sec {
            let mut flags = REG_C_UF;
            // The alarm matches a time of day; past a day's worth of seconds every valid
            // alarm matched once.
            let span = (now_sec - self.last_sec).min(SECS_PER_DAY);
            if (1..=span).any(|i| self.alarm_matches((now_sec - span + i).rem_euclid(SECS_PER_DAY)))
            {
                flags |= REG_C_AF;
                alarm = self.reg(RTC_REG_B) & REG_B_AIE != 0;
            }
            self.cmos[RTC_REG_C as usize] |= flags;
            self.last_sec = now_sec;
        }
        match self.periodic_period_ns() {
            Some(period) => {
                let now = self.host_ns();
                let next = *self.next_periodic.get_or_insert(now + period);
                if now >= next {
                    let ticks = (now - next) / period + 1;
                    self.next_periodic = Some(next + ticks * period);
                    if self.slew {
                        self.slewed_ticks(ticks, period, now);
                    } else {
                        // Missed ticks are one interrupt (lost_tick_policy=discard).
                        self.cmos[RTC_REG_C as usize] |= REG_C_PF;
                    }
                }
                if self.slew {
                    self.catch_up(period, now);
                }
            }
            None => {
                self.next_periodic = None;
                self.coalesced = 0;
                self.next_catch_up = None;
            }
        }
        self.update_irq();
        alarm
    }

    /// `ticks` periodic ticks came due under `lost_tick_policy=slew` (QEMU's
    /// `rtc_periodic_timer`): one interrupts unless the guest has not taken the last one
    /// yet (the line is still up: KVM would report it coalesced); the rest are owed.
    fn slewed_ticks(&mut self, ticks: i64, period: i64, now: i64) {
        self.reinjected_on_ack = 0;
        let delivered = !self.level;
        self.cmos[RTC_REG_C as usize] |= REG_C_PF;
        let owed = u32::try_from(ticks - i64::from(delivered)).unwrap_or(u32::MAX);
        if owed > 0 {
            self.coalesced = self.coalesced.saturating_add(owed);
            self.plan_catch_up(period, now);
        }
    }

    /// The next catch-up tick: a period split in 2 to 8 as more ticks are owed (QEMU's
    /// `rtc_coalesced_timer_update`).
    fn plan_catch_up(&mut self, period: i64, now: i64) {
        self.next_catch_up = (self.coalesced > 0)
            .then(|| now + period / (i64::from(self.coalesced.min(7)) + 1));
    }

    /// Delivers an owed tick when the catch-up timer is due and the guest took the last
    /// interrupt (QEMU's `rtc_coalesced_timer`).
    fn catch_up(&mut self, period: i64, now: i64) {
        let Some(due) = self.next_catch_up else {
            return;
        };
        if now < due {
            return;
        }
        if self.coalesced > 0 && !self.level {
            self.cmos[RTC_REG_C as usize] |= REG_C_PF;
            self.coalesced -= 1;
        }
        self.plan_catch_up(period, now);
    }

    /// Register C was read (the guest took the interrupt): an owed tick interrupts again at
    /// once, up to [`REINJECT_ON_ACK`] times between two ticks (QEMU's read of register C
    /// under slew).
    fn reinject_on_ack(&mut self) {
        if self.coalesced == 0
            || self.reg(RTC_REG_B) & REG_B_PIE == 0
            || self.reinjected_on_ack >= REINJECT_ON_ACK
        {
            return;
        }
        self.reinjected_on_ack += 1;
        self.cmos[RTC_REG_C as usize] |= REG_C_PF;
        self.coalesced -= 1;
        if let Some(period) = self.periodic_period_ns() {
            let now = self.host_ns();
            self.plan_catch_up(period, now);
        }
    }

    /// IRQF and the line follow the flags of the enabled interrupts.
    fn update_irq(&mut self) {
        let c = self.reg(RTC_REG_C);
        let pending = c & self.reg(RTC_REG_B) & REG_C_MASK != 0;
        if pending {
            self.cmos[RTC_REG_C as usize] |= REG_C_IRQF;
        } else {
            self.cmos[RTC_REG_C as usize] &= !REG_C_IRQF;
        }
        if pending != self.level {
            self.level = pending;
            self.irq.set(pending);
        }
    }

    /// How long until the next interrupt could be due, if any is enabled.
    fn next_event_in(&self) -> Option<Duration> {
        let b = self.reg(RTC_REG_B);
        let mut next: Option<i64> = None;
        if b & (REG_B_UIE | REG_B_AIE) != 0 && self.running() {
            let guest_ns = self.host_ns().saturating_add(self.offset);
            // The next second's boundary, without overflow near the end of time.
            next = Some(NANOS_PER_SEC - guest_ns.rem_euclid(NANOS_PER_SEC));
        }
        for p in [self.next_periodic, self.next_catch_up].into_iter().flatten() {
            let in_ns = (p - self.host_ns()).max(0);
            next = Some(next.map_or(in_ns, |n| n.min(in_ns)));
        }
        next.map(|ns| Duration::from_nanos(ns.max(0) as u64))
    }

    fn read_data(&mut self) -> u8 {
        let index = self.index;
        match index {
            RTC_SECONDS | RTC_MINUTES | RTC_HOURS | RTC_DAY_OF_WEEK | RTC_DAY_OF_MONTH
            | RTC_MONTH | RTC_YEAR | RTC_CENTURY => {
                self.update_time();
                self.reg(index)
            }
            // UIP is never set (see the file comment).
            RTC_REG_A => self.reg(RTC_REG_A),
            RTC_REG_C => {
                self.advance();
                let c = self.reg(RTC_REG_C);
                self.cmos[RTC_REG_C as usize] = 0;
                self.update_irq();
                if self.slew {
                    self.reinject_on_ack();
                    self.update_irq();
                }
                c
            }
            _ => self.reg(index),
        }
    }

    /// Writes the register `index` selects; returns whether the interrupt timer must
    /// re-plan.
    fn write_data(&mut self, data: u8) -> bool {
        let index = self.index;
        match index {
            RTC_SECONDS_ALARM | RTC_MINUTES_ALARM | RTC_HOURS_ALARM => {
                self.cmos[index as usize] = data;
                true
            }
            RTC_SECONDS
            | RTC_MINUTES
            | RTC_HOURS
            | RTC_DAY_OF_WEEK
            | RTC_DAY_OF_MONTH
            | RTC_MONTH
            | RTC_YEAR
            | RTC_CENTURY
            | RTC_IBM_PS2_CENTURY_BYTE => {
                let index = if index == RTC_IBM_PS2_CENTURY_BYTE {
                    RTC_CENTURY
                } else {
                    index
                };
                if self.running() {
                    // The other registers must hold the current time before this one
                    // changes it.
                    self.update_time();
                    self.cmos[index as usize] = data;
                    self.set_time();
                } else {
                    self.cmos[index as usize] = data;
                }
                true
            }
            RTC_REG_A => {
                let was_running = self.running();
                if was_running {
                    self.update_time();
                }
                // UIP is read-only.
                let old_period = self.periodic_period_ns();
                self.cmos[RTC_REG_A as usize] = data & 0x7f;
                // Owed ticks keep their time at a new rate (QEMU's periodic_timer_update).
                if let (Some(old), Some(new)) = (old_period, self.periodic_period_ns()) {
                    let owed = i64::from(self.coalesced) * old / new;
                    self.coalesced = u32::try_from(owed).unwrap_or(u32::MAX);
                }
                if !was_running && self.running() {
                    self.set_time();
                }
                self.next_periodic = None;
                self.advance();
                true
            }
            RTC_REG_B => {
                let was_running = self.running();
                let mut data = data;
                if data & REG_B_SET != 0 {
                    if was_running {
                        // Latch the time being stopped.
                        self.update_time();
                    }
                    // Setting SET clears UIE (MC146818 data sheet).
                    data &= !REG_B_UIE;
                }
                let old = self.reg(RTC_REG_B);
                self.cmos[RTC_REG_B as usize] = data;
                if !was_running && self.running() {
                    self.set_time();
                } else if (old ^ data) & (REG_B_DM | REG_B_24H) != 0 && self.running() {
                    self.update_time();
                }
                if (old ^ data) & REG_B_PIE != 0 {
                    self.next_periodic = None;
                }
                // A flag already set when its interrupt is enabled interrupts at once.
                self.advance();
                true
            }
            // Read-only.
            RTC_REG_C | RTC_REG_D => false,
            _ => {
                self.cmos[index as usize] = data;
                false
            }
        }
    }

    /// QEMU's `rtc_reset_enter`: interrupts off and flags cleared; the time and CMOS stay
    /// (byte 0x0f keeps an S3 resume marker 0xfe).
    fn reset(&mut self) {
        if self.cmos[CMOS_RESET_CODE as usize] != CMOS_RESET_S3_RESUME {
            self.cmos[CMOS_RESET_CODE as usize] = 0;
        }
        self.cmos[RTC_REG_B as usize] &= !(REG_B_PIE | REG_B_AIE | REG_B_SQWE);
        self.cmos[RTC_REG_C as usize] &= !(REG_C_UF | REG_C_IRQF | REG_C_PF | REG_C_AF);
        self.next_periodic = None;
        self.coalesced = 0;
        self.reinjected_on_ack = 0;
        self.next_catch_up = None;
        self.update_irq();
    }
}

/// The RTC's state and port handler, shared with its interrupt thread.
pub struct Rtc {
    state: Mutex<RtcState>,
    wake: Condvar,
    timer_started: AtomicBool,
    /// The machine an alarm wakes from S3.
    machine: std::sync::OnceLock<Weak<MachineServices>>,
    /// The device's QOM path, which `RTC_CHANGE` names.
    qom_path: std::sync::OnceLock<String>,
}

impl Default for Rtc {
    fn default() -> Self {
        Rtc::with_clock(host_clock())
    }
}

impl Rtc {
    /// An RTC on `clock` (host UTC nanoseconds; tests pass a fixed clock).
    pub fn with_clock(clock: RtcClock) -> Self {
        Rtc {
            state: Mutex::new(RtcState::new(clock)),
            wake: Condvar::new(),
            timer_started: AtomicBool::new(false),
            machine: std::sync::OnceLock::new(),
            qom_path: std::sync::OnceLock::new(),
        }
    }

    /// Sets the base year (QEMU's `base_year`; 2000 means the year register holds the year
    /// within the century) and reloads the time registers.
    pub fn set_base_year(&self, base_year: i64) {
        let mut s = self.state.lock();
        s.base_year = if base_year == 2000 { 0 } else { base_year };
        s.update_time();
    }

    /// Connects IRQ 8.
    pub fn set_irq(&self, irq: IrqLine) {
        let mut s = self.state.lock();
        s.irq = irq;
        let level = s.level;
        s.irq.set(level);
    }

    /// `lost_tick_policy=slew` (on) or `discard` (off).
    pub fn set_slew(&self, slew: bool) {
        self.state.lock().slew = slew;
    }

    /// Periodic ticks owed to the guest under `lost_tick_policy=slew`.
    pub fn coalesced_ticks(&self) -> u32 {
        self.state.lock().coalesced
    }

    /// QEMU's `rtc_set_date_from_host`: runs the RTC on `clock` (the one `-rtc clock=`
    /// chose), starting from the time `-rtc base=` gives.
    pub fn set_date_from_host(&self, clock: RtcClock) {
        let mut s = self.state.lock();
        let now = clock();
        // Whole seconds from the base, keeping the clock's phase within the second (an RTC
        // on the host's UTC clock ticks with it).
        let start = rtc_clock::start_time(now);
        s.offset = start
            .saturating_sub(now.div_euclid(NANOS_PER_SEC))
            .saturating_mul(NANOS_PER_SEC);
        s.clock = clock;
        s.host_utc_clock = rtc_clock::rtc_clock_type() == rtc_clock::RtcClockType::Host;
        s.last_sec = s.guest_secs();
        s.update_time();
    }

    /// Replaces the clock (tests).
    pub fn set_clock(&self, clock: RtcClock) {
        let mut s = self.state.lock();
        s.clock = clock;
        s.last_sec = s.guest_secs();
        s.update_time();
    }

    /// QEMU's `mc146818rtc_set_cmos_data`: byte `addr` of CMOS memory (`addr` < 128).
    pub fn set_memory(&self, addr: u8, val: u8) {
        if let Some(b) = self.state.lock().cmos.get_mut(addr as usize) {
            *b = val;
        }
    }

    /// QEMU's `mc146818rtc_get_cmos_data` (raw, without updating the time).
    pub fn get_memory(&self, addr: u8) -> u8 {
        self.state
            .lock()
            .cmos
            .get(addr as usize)
            .copied()
            .unwrap_or(0)
    }

    /// QEMU's `rtc_get_tm`: the time the registers hold, brought up to date (the
    /// `date` property, the machine's `rtc-time`).
    pub fn rtc_time(&self) -> Tm {
        let mut s = self.state.lock();
        s.update_time();
        s.get_time()
    }

    /// The guest's current time, seconds since the epoch.
    pub fn guest_time(&self) -> i64 {
        self.state.lock().guest_secs()
    }

    /// Back to reset state (interrupts off; time and CMOS kept).
    pub fn reset(&self) {
        self.state.lock().reset();
    }

    /// QEMU's `vmstate_rtc`: CMOS memory, the index, the guest clock's offset from the
    /// host's UTC time, the flags' progress, the periodic timer (relative to now) and the
    /// IRQ level; an RTC on the VM's or the monotonic clock also sends the guest's time,
    /// where it goes on from on the destination (as QEMU's, whose virtual clock migrates
    /// and whose `clock=rt` RTC reloads from its registers), not moved on by the time the
    /// move took.
    pub fn save_state(&self) -> VmStateSection {
        let s = self.state.lock();
        let now = s.host_ns();
        let guest_ns = (!s.host_utc_clock).then(|| now.saturating_add(s.offset));
        VmStateSection::new(3)
            .with_bytes("cmos", &s.cmos)
            .with("index", s.index)
            .with("offset_ns", s.offset_from_host_utc(now))
            .with("last_sec", s.last_sec)
            .with("periodic_in_ns", s.next_periodic.map(|t| t.saturating_sub(now)))
            .with("irq_level", s.level)
            // Version 2.
            .with("irq_coalesced", s.coalesced)
            .with("reinjected_on_ack", s.reinjected_on_ack)
            .with("catch_up_in_ns", s.next_catch_up.map(|t| t.saturating_sub(now)))
            // Version 3.
            .with("own_clock_guest_ns", guest_ns)
    }

    /// Loads [`Rtc::save_state`]'s section; the interrupt thread picks the timers up.
    pub fn load_state(self: &Arc<Self>, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 3)?;
        let cmos: [u8; CMOS_SIZE] = state.get_array("cmos")?;
        let periodic: Option<i64> = state.get("periodic_in_ns")?;
        let mut s = self.state.lock();
        s.cmos = cmos;
        s.index = state.get("index")?;
        let now = s.host_ns();
        let own_clock_guest: Option<i64> = if state.version >= 3 {
            state.get("own_clock_guest_ns")?
        } else {
            None
        };
        s.offset = match own_clock_guest {
            Some(guest) if !s.host_utc_clock => guest.saturating_sub(now),
            _ => s.offset_to_clock(state.get("offset_ns")?, now),
        };
        s.last_sec = state.get("last_sec")?;
        s.next_periodic = periodic.map(|p| now.saturating_add(p));
        // Version 2 added the slew policy's owed ticks.
        if state.version >= 2 {
            s.coalesced = state.get("irq_coalesced")?;
            s.reinjected_on_ack = state.get("reinjected_on_ack")?;
            let catch_up: Option<i64> = state.get("catch_up_in_ns")?;
            s.next_catch_up = catch_up.map(|c| now.saturating_add(c));
        }
        s.level = !state.get::<bool>("irq_level")?;
        s.update_irq();
        let wants_timer = s.next_event_in().is_some();
        drop(s);
        if wants_timer {
            self.start_timer();
        }
        self.wake.notify_all();
        Ok(())
    }

    /// Reads port `offset` (0 index, 1 data).
    pub fn read_port(&self, offset: u64) -> u8 {
        if offset & 1 == 0 {
            // The index register is write-only.
            return 0xff;
        }
        self.state.lock().read_data()
    }

    /// Writes port `offset` (0 index, 1 data).
    pub fn write_port(self: &Arc<Self>, offset: u64, val: u8) {
        let mut s = self.state.lock();
        if offset & 1 == 0 {
            // Bit 7 masks NMIs on a PC; there is no NMI source to mask here.
            s.index = val & 0x7f;
            return;
        }
        let replan = s.write_data(val);
        let changed = s.changed.take();
        let wants_timer = replan && s.next_event_in().is_some();
        drop(s);
        // libvirt moves a variable clock's adjustment by the offset.
        if let Some(offset) = changed {
            let path = self.qom_path.get().cloned().unwrap_or_default();
            qapi_event::emit("RTC_CHANGE", Some(qapi_event::json!({ "offset": offset, "qom-path": path })));
        }
        if replan {
            if wants_timer {
                self.start_timer();
            }
            self.wake.notify_all();
        }
    }

    /// The alarm went off with AIE set: wakes the machine if it sleeps and PM1_EN.RTC_EN
    /// allows it (QEMU's `qemu_system_wakeup_request(QEMU_WAKEUP_REASON_RTC)`).
    fn wake_machine(&self) {
        if let Some(machine) = self.machine.get().and_then(Weak::upgrade) {
            // Refused unless the guest sleeps, which is the common case: nothing to do.
            let _ = runstate::qemu_system_wakeup_request(machine.vm(), WakeupReason::Rtc);
        }
    }

    /// Sets the CMOS resume mark as the guest goes to sleep (QEMU's `rtc_notify_suspend`).
    fn notify_suspend(&self) {
        self.state.lock().cmos[CMOS_RESET_CODE as usize] = CMOS_RESET_S3_RESUME;
    }

    /// Starts the interrupt thread once. It holds the RTC weakly and ends when the device
    /// is gone.
    fn start_timer(self: &Arc<Self>) {
        if self.timer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("mc146818rtc".into())
            .spawn(move || rtc_timer_thread(weak));
        if let Err(err) = spawned {
            log::error!("mc146818rtc: cannot start the interrupt timer: {err}");
        }
    }
}

fn rtc_timer_thread(rtc: Weak<Rtc>) {
    while let Some(rtc) = rtc.upgrade() {
        let mut s = rtc.state.lock();
        if s.advance() {
            // Outside the RTC's lock: a wake-up resets the machine, RTC included.
            drop(s);
            rtc.wake_machine();
            continue;
        }
        let sleep = s
            .next_event_in()
            .unwrap_or(TIMER_MAX_SLEEP)
            .min(TIMER_MAX_SLEEP);
        // A register write wakes the thread early to re-plan.
        rtc.wake.wait_until(&mut s, Instant::now() + sleep);
    }
}

struct RtcPort(Arc<Rtc>);

impl MemoryRegionOps for RtcPort {
    fn read(&self, offset: u64, size: u32) -> u64 {
        // Byte registers; a wider access is split, as QEMU's `cmos_ops` (max_access_size 1).
        let mut value = 0;
        for i in 0..u64::from(size.min(8)) {
            let byte = if offset + i < 2 {
                self.0.read_port(offset + i)
            } else {
                0xff
            };
            value |= u64::from(byte) << (8 * i);
        }
        value
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        for i in 0..u64::from(size.min(8)) {
            if offset + i < 2 {
                self.0.write_port(offset + i, (value >> (8 * i)) as u8);
            }
        }
    }
}

/// QEMU's `MC146818RtcState`: the RTC and its properties.
#[derive(qom::Object)]
#[qom(name = TYPE_MC146818_RTC)]
pub struct Mc146818Rtc {
    #[parent]
    parent: IsaDevice,
    // QEMU's default is 1980, with the PC board passing 2000; every qomvm board is a PC,
    // so 2000 is the default here.
    #[property(default = 2000, desc = "Year the year register counts from")]
    base_year: Prop<i32>,
    #[property(default = 0x70, desc = "I/O port base")]
    iobase: Prop<u16>,
    #[property(default = 8, desc = "ISA IRQ")]
    irq: Prop<u8>,
    #[property(
        default = "discard",
        desc = "Missed periodic ticks: dropped (discard) or caught up with (slew)"
    )]
    lost_tick_policy: Prop<LostTickPolicy>,
    rtc: Arc<Rtc>,
}

type_init!(Mc146818Rtc {
    class_init: Some(mc146818rtc_class_init),
});

/// `date`'s scalar stand-in, for the places that print properties as text (the
/// monitor's `qom-get` returns QEMU's `struct tm`, [`Rtc::rtc_time`]).
pub fn rtc_time_text(tm: Tm) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        tm.year, tm.mon, tm.mday, tm.hour, tm.min, tm.sec
    )
}

static RTC_TIME: StateAccessor<Mc146818Rtc> = StateAccessor {
    get: |dev, _| Value::Str(rtc_time_text(dev.rtc.rtc_time())),
    set: None,
};

/// The QAPI type of `date` and the machine's `rtc-time`.
pub const RTC_TIME_KIND: PropertyKind = PropertyKind::Struct("struct tm");

/// QEMU's `rtc_realizefn` adds `date`, the time in the registers (the machine's
/// `rtc-time` reads it).
fn mc146818rtc_class_init(class: &mut ObjectClass) {
    <IsaDevice as ClassInitFor<Mc146818Rtc>>::class_init(class);
    class.add_property(Property::state("date", RTC_TIME_KIND, "The time the RTC's registers hold", &RTC_TIME));
}

/// Errors of `mc146818rtc`.
#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    /// `lost_tick_policy=delay` (QEMU's RTC drops or slews, never delays).
    #[error("Invalid lost tick policy.")]
    LostTickPolicy,
    /// `irq` past the ISA bus's lines.
    #[error("Maximum value for \"irq\" is: {}", ISA_NUM_IRQS - 1)]
    BadIrq,
}

impl Mc146818Rtc {
    /// The first port and ISA IRQ (what the board's ACPI tables describe).
    pub fn resources(&self) -> (u16, u8) {
        (self.iobase.get(), self.irq.get())
    }
}

impl DeviceImpl for Mc146818Rtc {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let irq = self.irq.get();
        if usize::from(irq) >= ISA_NUM_IRQS {
            return Err(RealizeError::device(RtcError::BadIrq));
        }
        match self.lost_tick_policy.get() {
            LostTickPolicy::Discard => self.rtc.set_slew(false),
            LostTickPolicy::Slew => self.rtc.set_slew(true),
            LostTickPolicy::Delay => return Err(RealizeError::device(RtcError::LostTickPolicy)),
        }
        self.rtc.set_base_year(self.base_year.get().into());
        self.rtc.set_irq(self.parent.irq(ctx, irq.into()));
        let services = ctx.machine()?;
        if let Some(path) = ctx.object().canonical_path() {
            let _ = self.rtc.qom_path.set(path);
        }
        self.rtc.set_date_from_host(rtc_clock::rtc_clock(services.vm().clock()));
        let _ = self.rtc.machine.set(Arc::downgrade(services));
        let rtc = Arc::downgrade(&self.rtc);
        services.vm().add_suspend_notifier(Arc::new(move || {
            if let Some(rtc) = rtc.upgrade() {
                rtc.notify_suspend();
            }
        }));
        // Index writes only select a register for the next data access, which flushes
        // them: buffered, as QEMU's (coalesced PIO).
        let region = MemoryRegion::new_io_coalesced("rtc", 2, Arc::new(RtcPort(self.rtc.clone())), 0..1);
        self.register_ioport(ctx, region, self.iobase.get())
    }

    fn reset(&self) {
        self.rtc.reset();
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        Ok(self.rtc.save_state())
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.rtc.load_state(state)
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

impl Mc146818Rtc {
    /// The RTC (its clock, ports and CMOS memory).
    pub fn rtc(&self) -> &Arc<Rtc> {
        &self.rtc
    }

    /// QEMU's `mc146818rtc_set_cmos_data`: writes CMOS byte `addr`.
    pub fn set_memory(&self, addr: u8, val: u8) {
        self.rtc.set_memory(addr, val);
    }

    /// QEMU's `mc146818rtc_get_cmos_data`: reads CMOS byte `addr`.
    pub fn get_memory(&self, addr: u8) -> u8 {
        self.rtc.get_memory(addr)
    }

    /// The memory-size bytes of QEMU's `pc_cmos_init`, for `below_4g` bytes of RAM under
    /// 4 GiB and `above_4g` above: base memory in KiB (at most 640) at 0x15/0x16, extended
    /// memory above 1 MiB in KiB (at most 65535) at 0x17/0x18 and 0x30/0x31, memory above
    /// 16 MiB in 64 KiB units (at most 0xffff) at 0x34/0x35, memory above 4 GiB in 64 KiB
    /// units at 0x5b-0x5d.
    pub fn set_memory_size(&self, below_4g: u64, above_4g: u64) {
        let rtc = &self.rtc;
        let set16 = |lo: u8, val: u64| {
            rtc.set_memory(lo, val as u8);
            rtc.set_memory(lo + 1, (val >> 8) as u8);
        };
        set16(0x15, (below_4g / KIB).min(640));
        let extended = (below_4g.saturating_sub(MIB) / KIB).min(0xffff);
        set16(0x17, extended);
        set16(0x30, extended);
        set16(
            0x34,
            (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff),
        );
        let high = above_4g / (64 * KIB);
        rtc.set_memory(0x5b, high as u8);
        rtc.set_memory(0x5c, (high >> 8) as u8);
        rtc.set_memory(0x5d, (high >> 16) as u8);
    }
}

/// QEMU's `mc146818_rtc_init`: an RTC on `bus` counting years from `base_year` (the PC
/// passes 2000), realized (an orphan goes under `/machine/unattached`, as a board's
/// devices do).
pub fn mc146818_rtc_init(bus: &ObjectRef, base_year: i32) -> Result<Typed<Mc146818Rtc>, QdevError> {
    let dev = qdev_new_typed::<Mc146818Rtc>()?;
    dev.base_year.set(base_year);
    qdev_realize(dev.object(), Some(bus))?;
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::irq::IrqHandler;
    use std::sync::atomic::AtomicI64;

    /// 2024-02-29 13:45:56 UTC, a Thursday.
    const T0: i64 = 1_709_214_356;

    fn fixed_clock(secs: i64) -> (RtcClock, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(secs * NANOS_PER_SEC));
        let n = now.clone();
        (Arc::new(move || n.load(Ordering::SeqCst)), now)
    }

    fn rtc_at(secs: i64) -> (Arc<Rtc>, Arc<AtomicI64>) {
        let (clock, now) = fixed_clock(secs);
        let rtc = Arc::new(Rtc::with_clock(clock));
        rtc.set_base_year(2000);
        (rtc, now)
    }

    fn read(rtc: &Arc<Rtc>, reg: u8) -> u8 {
        rtc.write_port(0, reg);
        rtc.read_port(1)
    }

    fn write(rtc: &Arc<Rtc>, reg: u8, val: u8) {
        rtc.write_port(0, reg);
        rtc.write_port(1, val);
    }

    /// An RTC on a clock other than the host's (`-rtc clock=vm|rt`) migrates its time of
    /// day, not its offset from a clock the destination's differs from, and goes on from
    /// there however long the move took; to an RTC on the host's clock it goes as the
    /// offset from the host's time.
    #[test]
    fn an_rtc_on_its_own_clock_migrates_its_time_not_its_offset() {
        let (src, _) = rtc_at(1_000);
        src.state.lock().host_utc_clock = false;
        src.state.lock().offset = T0 * NANOS_PER_SEC - 1_000 * NANOS_PER_SEC;
        assert_eq!(src.guest_time(), T0);
        let section = src.save_state();
        // The destination's clock reads something else entirely.
        let (dst, _) = rtc_at(5);
        dst.state.lock().host_utc_clock = false;
        dst.load_state(&section).unwrap();
        assert_eq!(dst.guest_time(), T0);
        // An RTC on the host's clock takes the guest's offset from the host's time (the
        // host's time moves between the two reads: at most a second here).
        let (dst, _) = rtc_at(0);
        dst.state.lock().clock = host_clock();
        dst.load_state(&section).unwrap();
        assert!((dst.guest_time() - T0).abs() <= 1, "{}", dst.guest_time());
        // On the host's clock the offset goes as it is.
        let (src, _) = rtc_at(T0);
        src.state.lock().offset = 3_600 * NANOS_PER_SEC;
        let (dst, _) = rtc_at(T0);
        dst.load_state(&src.save_state()).unwrap();
        assert_eq!(dst.guest_time(), T0 + 3_600);
    }

    /// Found by `tests/fuzz_devices.rs`: the guest setting a time far from the host's
    /// overflowed the clock offset (a panic ends qomvm).
    #[test]
    fn any_year_and_century_the_guest_writes_keep_the_clock_going() {
        for host in [-9_000_000_000, 0, T0, 9_000_000_000] {
            let (rtc, now) = rtc_at(host);
            write(&rtc, RTC_REG_B, REG_B_24H | REG_B_DM);
            for (reg, val) in [(RTC_CENTURY, 0xff), (RTC_YEAR, 0xff), (RTC_MONTH, 0)] {
                write(&rtc, reg, val);
            }
            now.fetch_add(NANOS_PER_SEC, Ordering::SeqCst);
            let _ = read(&rtc, RTC_SECONDS);
            // Update and alarm interrupts plan the next second from that time.
            write(&rtc, RTC_REG_B, REG_B_24H | REG_B_DM | REG_B_UIE | REG_B_AIE);
            let _ = read(&rtc, RTC_REG_C);
            // At the end of time (the fuzzer's guest got there), too.
            rtc.state.lock().offset = i64::MAX;
            assert!(rtc.state.lock().next_event_in().is_some());
            write(&rtc, RTC_CENTURY, 0);
            let _ = read(&rtc, RTC_YEAR);
        }
    }

    #[test]
    fn calendar_conversions_round_trip() {
        let tm = Tm::from_secs(T0);
        assert_eq!(
            tm,
            Tm {
                sec: 56,
                min: 45,
                hour: 13,
                wday: 4,
                mday: 29,
                mon: 2,
                year: 2024
            }
        );
        assert_eq!(tm.to_secs(), T0);
        assert_eq!(Tm::from_secs(0).year, 1970);
        for secs in [0, 951_782_400, 4_107_542_399, -86_400] {
            assert_eq!(Tm::from_secs(secs).to_secs(), secs);
        }
    }

    #[test]
    fn time_reads_in_bcd_by_default_and_binary_with_dm() {
        let (rtc, _) = rtc_at(T0);
        assert_eq!(read(&rtc, RTC_REG_B), REG_B_24H);
        assert_eq!(read(&rtc, RTC_SECONDS), 0x56);
        assert_eq!(read(&rtc, RTC_MINUTES), 0x45);
        assert_eq!(read(&rtc, RTC_HOURS), 0x13);
        assert_eq!(read(&rtc, RTC_DAY_OF_WEEK), 5);
        assert_eq!(read(&rtc, RTC_DAY_OF_MONTH), 0x29);
        assert_eq!(read(&rtc, RTC_MONTH), 0x02);
        assert_eq!(read(&rtc, RTC_YEAR), 0x24);
        assert_eq!(read(&rtc, RTC_CENTURY), 0x20);
        write(&rtc, RTC_REG_B, REG_B_24H | REG_B_DM);
        assert_eq!(read(&rtc, RTC_SECONDS), 56);
        assert_eq!(read(&rtc, RTC_MINUTES), 45);
        assert_eq!(read(&rtc, RTC_HOURS), 13);
        assert_eq!(read(&rtc, RTC_YEAR), 24);
        assert_eq!(read(&rtc, RTC_CENTURY), 20);
    }

    #[test]
    fn twelve_hour_mode_sets_the_pm_bit() {
        let (rtc, _) = rtc_at(T0);
        write(&rtc, RTC_REG_B, 0);
        assert_eq!(read(&rtc, RTC_HOURS), 0x80 | 0x01);
        let (rtc, _) = rtc_at(T0 - 13 * 3600);
        write(&rtc, RTC_REG_B, 0);
        assert_eq!(read(&rtc, RTC_HOURS), 0x12, "00:45 is 12 AM");
    }

    #[test]
    fn the_clock_follows_the_host_and_the_guest_can_set_it() {
        let (rtc, now) = rtc_at(T0);
        now.fetch_add(5 * NANOS_PER_SEC, Ordering::SeqCst);
        assert_eq!(read(&rtc, RTC_SECONDS), 0x01);
        assert_eq!(read(&rtc, RTC_MINUTES), 0x46);
        // Stop, set 1999-12-31 23:59:58, restart.
        write(&rtc, RTC_REG_B, REG_B_SET | REG_B_24H);
        for (r, v) in [
            (RTC_SECONDS, 0x58),
            (RTC_MINUTES, 0x59),
            (RTC_HOURS, 0x23),
            (RTC_DAY_OF_MONTH, 0x31),
            (RTC_MONTH, 0x12),
            (RTC_YEAR, 0x99),
            (RTC_IBM_PS2_CENTURY_BYTE, 0x19),
        ] {
            write(&rtc, r, v);
        }
        now.fetch_add(10 * NANOS_PER_SEC, Ordering::SeqCst);
        assert_eq!(read(&rtc, RTC_SECONDS), 0x58, "stopped while SET");
        write(&rtc, RTC_REG_B, REG_B_24H);
        now.fetch_add(3 * NANOS_PER_SEC, Ordering::SeqCst);
        assert_eq!(read(&rtc, RTC_SECONDS), 0x01);
        assert_eq!(read(&rtc, RTC_YEAR), 0x00);
        assert_eq!(read(&rtc, RTC_CENTURY), 0x20);
        assert_eq!(read(&rtc, RTC_MONTH), 0x01);
        assert_eq!(rtc.guest_time(), 946_684_801);
    }

    #[test]
    fn index_port_drops_the_nmi_bit_and_reads_ff() {
        let (rtc, _) = rtc_at(T0);
        rtc.set_memory(0x40, 0x5a);
        rtc.write_port(0, 0x80 | 0x40);
        assert_eq!(rtc.read_port(1), 0x5a);
        rtc.write_port(0, 0x80 | RTC_SECONDS);
        assert_eq!(rtc.read_port(1), 0x56);
        assert_eq!(rtc.read_port(0), 0xff);
    }

    #[test]
    fn registers_a_c_d() {
        let (rtc, now) = rtc_at(T0);
        assert_eq!(read(&rtc, RTC_REG_A), 0x26);
        write(&rtc, RTC_REG_A, 0xa6);
        assert_eq!(read(&rtc, RTC_REG_A), 0x26, "UIP is read-only");
        assert_eq!(read(&rtc, RTC_REG_D), REG_D_VRT);
        write(&rtc, RTC_REG_D, 0);
        assert_eq!(read(&rtc, RTC_REG_D), REG_D_VRT);
        assert_eq!(read(&rtc, RTC_REG_C), 0);
        now.fetch_add(NANOS_PER_SEC, Ordering::SeqCst);
        assert_eq!(
            read(&rtc, RTC_REG_C),
            REG_C_UF,
            "a second passed; UIE is off"
        );
        assert_eq!(read(&rtc, RTC_REG_C), 0, "reading C clears it");
    }

    #[derive(Default)]
    struct Pin(Mutex<bool>);

    impl IrqHandler for Pin {
        fn set_irq(&self, _n: u32, level: bool) {
            *self.0.lock() = level;
        }
    }

    #[test]
    fn enabled_flags_raise_irq_8_until_c_is_read() {
        let (rtc, now) = rtc_at(T0);
        let pin = Arc::new(Pin::default());
        rtc.set_irq(IrqLine::new(pin.clone(), 8));
        // Alarm at 13:46:00.
        write(&rtc, RTC_SECONDS_ALARM, 0x00);
        write(&rtc, RTC_MINUTES_ALARM, 0x46);
        write(&rtc, RTC_HOURS_ALARM, 0xc0);
        now.fetch_add(10 * NANOS_PER_SEC, Ordering::SeqCst);
        // The flags are set; enabling AIE interrupts at once.
        write(&rtc, RTC_REG_B, REG_B_24H | REG_B_AIE);
        assert!(*pin.0.lock());
        assert_eq!(read(&rtc, RTC_REG_C), REG_C_IRQF | REG_C_AF | REG_C_UF);
        assert!(!*pin.0.lock());
        write(&rtc, RTC_REG_B, REG_B_24H);
    }

    #[test]
    fn update_interrupts_come_from_the_timer_thread() {
        // The host clock: the thread waits for real second boundaries.
        let rtc = Arc::new(Rtc::default());
        let pin = Arc::new(Pin::default());
        rtc.set_irq(IrqLine::new(pin.clone(), 8));
        write(&rtc, RTC_REG_B, REG_B_24H | REG_B_UIE);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !*pin.0.lock() {
            assert!(Instant::now() < deadline, "no update interrupt within 3 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_ne!(read(&rtc, RTC_REG_C) & (REG_C_IRQF | REG_C_UF), 0);
        write(&rtc, RTC_REG_B, REG_B_24H);
    }

    /// 1024 Hz, register A's reset rate.
    const PERIOD_1024HZ: i64 = NANOS_PER_SEC / 1024;

    /// An RTC at 1024 Hz with PIE, its line on a pin.
    fn periodic_rtc(slew: bool) -> (Arc<Rtc>, Arc<AtomicI64>, Arc<Pin>) {
        let (rtc, now) = rtc_at(T0);
        rtc.set_slew(slew);
        let pin = Arc::new(Pin::default());
        rtc.set_irq(IrqLine::new(pin.clone(), 8));
        write(&rtc, RTC_REG_B, REG_B_24H | REG_B_PIE);
        (rtc, now, pin)
    }

    /// Ticks that came while the guest had not taken the last interrupt (the line still
    /// up) are owed under slew and re-injected as the guest reads register C, as QEMU's
    /// RTC with `-rtc driftfix=slew` does; under discard they are gone.
    #[test]
    fn slew_reinjects_the_ticks_a_guest_missed_on_ack() {
        for slew in [false, true] {
            let (rtc, now, pin) = periodic_rtc(slew);
            now.fetch_add(PERIOD_1024HZ + 1, Ordering::SeqCst);
            // Four more ticks before the guest looks.
            now.fetch_add(4 * PERIOD_1024HZ, Ordering::SeqCst);
            assert_eq!(read(&rtc, RTC_REG_C), REG_C_IRQF | REG_C_PF, "slew {slew}");
            assert_eq!(rtc.coalesced_ticks(), if slew { 3 } else { 0 });
            assert_eq!(*pin.0.lock(), slew, "an owed tick interrupts at once");
            let mut taken = 1;
            while read(&rtc, RTC_REG_C) & REG_C_PF != 0 {
                taken += 1;
            }
            assert_eq!(taken, if slew { 5 } else { 1 }, "slew {slew}");
            assert!(!*pin.0.lock());
            write(&rtc, RTC_REG_B, REG_B_24H);
        }
    }

    /// Past QEMU's 20 re-injections between two ticks, owed ticks come from the catch-up
    /// timer, which splits a period in up to 8 while the line is down.
    #[test]
    fn slew_catches_up_on_a_faster_timer_past_the_ack_limit() {
        let (rtc, now, pin) = periodic_rtc(true);
        now.fetch_add(PERIOD_1024HZ + 1, Ordering::SeqCst);
        now.fetch_add(30 * PERIOD_1024HZ, Ordering::SeqCst);
        let mut taken = 0;
        while read(&rtc, RTC_REG_C) & REG_C_PF != 0 {
            taken += 1;
        }
        // The tick that interrupted, then 20 re-injections.
        assert_eq!(taken, 21);
        assert_eq!(rtc.coalesced_ticks(), 10);
        assert!(!*pin.0.lock());
        now.fetch_add(PERIOD_1024HZ / 8 + 1, Ordering::SeqCst);
        assert_eq!(read(&rtc, RTC_REG_C) & REG_C_PF, REG_C_PF);
        assert_eq!(rtc.coalesced_ticks(), 9);
        // Turning the periodic interrupt off forgets what is owed.
        write(&rtc, RTC_REG_B, REG_B_24H);
        read(&rtc, RTC_REG_C);
        assert_eq!(rtc.coalesced_ticks(), 0);
    }

    #[test]
    fn periodic_interrupt_needs_pie_and_a_rate() {
        let (rtc, now) = rtc_at(T0);
        // 0x26: 1024 Hz.
        write(&rtc, RTC_REG_B, REG_B_24H | REG_B_PIE);
        now.fetch_add(2 * NANOS_PER_SEC / 1024, Ordering::SeqCst);
        assert_eq!(read(&rtc, RTC_REG_C) & REG_C_PF, REG_C_PF);
        write(&rtc, RTC_REG_B, REG_B_24H);
        now.fetch_add(NANOS_PER_SEC / 100, Ordering::SeqCst);
        assert_eq!(read(&rtc, RTC_REG_C) & REG_C_PF, 0);
    }
}
