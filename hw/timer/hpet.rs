//! `hpet`, the High Precision Event Timer (QEMU's `hw/timer/hpet.c`; Intel's IA-PC HPET
//! specification 1.0a): a 64-bit main counter at 100 MHz and three (up to 32) comparators,
//! 1 KiB of registers at 0xfed00000 that the ACPI `HPET` table points to.
//!
//! Each comparator fires once or periodically, edge- or level-triggered, on an I/O APIC
//! input its route selects (the board says which in `hpet-intcap`: the i440FX's pc offers
//! GSI 2 only), or as an MSI (`msi=on`, its FSB route). In legacy replacement mode timer 0
//! takes IRQ 0 and timer 1 IRQ 8: the in-kernel PIT stops ticking and the RTC's interrupt,
//! which the board routes through the HPET, is held back until the mode ends.
//!
//! The counter follows the VM's clock ([`VmClock`]): it stands still while the VM is
//! stopped, as QEMU's virtual clock does. Comparators fire from [`VirtualTimer`]s on the main
//! loop; a periodic timer fires at most once a microsecond, as in QEMU.

use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};

use crate::core::accel_ops::{AccelOpsRef, MsiMessage};
use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::irq::{GsiRouter, IrqHandler, IrqLine};
use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::{AddressSpace, MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, DeviceState, RealizeError};
use crate::core::runstate::ChangeHandlerId;
use crate::core::services::MachineServices;
use crate::core::timer::{VirtualTimer, VmClock};
use crate::core::vmstate::{VmStateError, VmStateSection};

/// QEMU's `TYPE_HPET`.
pub const TYPE_HPET: &str = "hpet";
/// Where the pc maps the registers (QEMU's `HPET_BASE`).
pub const HPET_BASE: u64 = 0xfed0_0000;
/// Size of the register block.
pub const HPET_LEN: u64 = 0x400;
/// The counter's period in femtoseconds: 10 ns, 100 MHz (QEMU's `HPET_CLK_PERIOD`).
pub const HPET_CLK_PERIOD_FS: u64 = 10_000_000;
const FS_PER_NS: u64 = 1_000_000;
/// Fewest comparators (`timers`).
pub const HPET_MIN_TIMERS: u8 = 3;
/// Most comparators.
pub const HPET_MAX_TIMERS: u8 = 32;
/// Legacy input of the PIT's IRQ 0.
pub const HPET_LEGACY_PIT_INT: u32 = 0;
/// Legacy input of the RTC's IRQ 8.
pub const HPET_LEGACY_RTC_INT: u32 = 1;
/// The I/O APIC inputs a route can reach (`IOAPIC_NUM_PINS`).
const NUM_GSI: u32 = 24;
const RTC_ISA_IRQ: u32 = 8;
/// A periodic timer's shortest interval between interrupts (QEMU's clamp).
const MIN_PERIOD_NS: u64 = 1_000;

/// General capabilities: revision 1, 64-bit counter (COUNT_SIZE_CAP), legacy replacement
/// route capable (LEG_RT_CAP), vendor 0x8086; the timer count and period are added.
const CAP_BASE: u64 = 0x8086_a001;
const CAP_NUM_TIM_SHIFT: u32 = 8;

// Register offsets.
const REG_ID: u64 = 0x000;
const REG_CFG: u64 = 0x010;
const REG_STATUS: u64 = 0x020;
const REG_COUNTER: u64 = 0x0f0;
const REG_TIMERS: u64 = 0x100;
const TIMER_STRIDE: u64 = 0x20;
const TN_CFG: u64 = 0x00;
const TN_CMP: u64 = 0x08;
const TN_ROUTE: u64 = 0x10;

/// General configuration: the counter runs and timers interrupt.
const CFG_ENABLE: u64 = 0x001;
/// General configuration: legacy replacement route.
const CFG_LEGACY: u64 = 0x002;
const CFG_WRITE_MASK: u64 = 0x003;

/// Timer configuration bits.
const TN_TYPE_LEVEL: u64 = 0x002;
const TN_ENABLE: u64 = 0x004;
const TN_PERIODIC: u64 = 0x008;
const TN_PERIODIC_CAP: u64 = 0x010;
const TN_SIZE_CAP: u64 = 0x020;
const TN_SETVAL: u64 = 0x040;
const TN_32BIT: u64 = 0x100;
const TN_INT_ROUTE_MASK: u64 = 0x3e00;
const TN_INT_ROUTE_SHIFT: u32 = 9;
const TN_FSB_ENABLE: u64 = 0x4000;
const TN_FSB_CAP: u64 = 0x8000;
const TN_CFG_WRITE_MASK: u64 = 0x7f4e;
const TN_INT_ROUTE_CAP_SHIFT: u32 = 32;

fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * u128::from(HPET_CLK_PERIOD_FS) / u128::from(FS_PER_NS)) as u64
}

fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(FS_PER_NS) / u128::from(HPET_CLK_PERIOD_FS)) as u64
}

/// Replaces bits `shift..shift + len` of `old` with `value`'s low bits (QEMU's
/// `deposit64`).
fn deposit(old: u64, shift: u32, len: u32, value: u64) -> u64 {
    let mask = if len >= 64 { u64::MAX } else { ((1u64 << len) - 1) << shift };
    (old & !mask) | ((value << shift) & mask)
}

/// Whether tick `a` comes after tick `b` on the wrapping 64-bit counter.
fn after(a: u64, b: u64) -> bool {
    (b.wrapping_sub(a) as i64) < 0
}

/// One comparator's registers and hidden state.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Timer {
    config: u64,
    cmp: u64,
    fsb: u64,
    /// The period a periodic timer adds to its comparator.
    period: u64,
    /// The comparator extended to the counter's 64 bits (a 32-bit timer's next match).
    cmp64: u64,
    /// A 32-bit one-shot timer is armed for the counter's wrap, then for its match.
    wrap: bool,
    /// When it was last armed for, clock nanoseconds (the periodic clamp).
    last_ns: u64,
}

impl Timer {
    fn reset(capabilities: u64) -> Timer {
        Timer {
            config: capabilities,
            cmp: u64::MAX,
            ..Timer::default()
        }
    }

    fn enabled(&self) -> bool {
        self.config & TN_ENABLE != 0
    }

    fn periodic(&self) -> bool {
        self.config & TN_PERIODIC != 0
    }

    fn is_32bit(&self) -> bool {
        self.config & TN_32BIT != 0
    }

    fn fsb_route(&self) -> bool {
        self.config & TN_FSB_ENABLE != 0
    }

    fn level(&self) -> bool {
        self.config & TN_TYPE_LEVEL != 0
    }

    /// QEMU's `hpet_calculate_cmp64`: a 32-bit timer's comparator as the next tick
    /// whose low half matches it.
    fn cmp64_from(&self, cur_tick: u64, target: u64) -> u64 {
        if self.is_32bit() {
            let result = (cur_tick & !0xffff_ffff) | (target & 0xffff_ffff);
            if result < cur_tick {
                result.wrapping_add(1 << 32)
            } else {
                result
            }
        } else {
            target
        }
    }
}

/// The registers and counter, under the device's one lock.
#[derive(Debug)]
struct State {
    config: u64,
    isr: u64,
    /// The counter while it is halted; where it restarts.
    counter: u64,
    /// While it runs: the counter was `base_ticks` at clock time `base_ns` (QEMU keeps an
    /// offset in nanoseconds, which wraps for counters above 2^64 / 10).
    base_ticks: u64,
    base_ns: u64,
    /// The RTC's IRQ 8 level, held while legacy mode owns IRQ 8.
    rtc_irq_level: bool,
    /// Whether the in-kernel PIT was told to stop (legacy mode).
    pit_stopped: bool,
    timers: Vec<Timer>,
}

impl State {
    fn enabled(&self) -> bool {
        self.config & CFG_ENABLE != 0
    }

    fn legacy(&self) -> bool {
        self.config & CFG_LEGACY != 0
    }
}

/// The device's working half, shared with its MMIO region, timers and run-state handler.
struct HpetCore {
    state: Mutex<State>,
    /// General capabilities and the counter's period (register 0).
    capability: u64,
    /// What every timer's configuration register reports in its capability bits.
    timer_caps: u64,
    msi: bool,
    /// The machine's virtual clock.
    clock: Arc<VmClock>,
    /// Each comparator's timer on that clock.
    timers: Vec<VirtualTimer>,
    /// GSIs 0-23.
    gsi: Vec<IrqLine>,
    accel: Arc<OnceLock<AccelOpsRef>>,
    log: RateLimitedLog,
}

impl HpetCore {
    fn ticks(&self, s: &State) -> u64 {
        let elapsed = self.clock.now_ns().saturating_sub(s.base_ns);
        s.base_ticks.wrapping_add(ns_to_ticks(elapsed))
    }

    /// The counter starts (or goes on) from `counter` now.
    fn restart_counter(&self, s: &mut State, counter: u64) {
        s.base_ticks = counter;
        s.base_ns = self.clock.now_ns();
    }

    fn counter(&self, s: &State) -> u64 {
        if s.enabled() {
            self.ticks(s)
        } else {
            s.counter
        }
    }

    fn gsi_line(&self, route: u32) -> Option<&IrqLine> {
        let line = self.gsi.get(route as usize);
        if line.is_none() {
            self.log.warn(|| format!("hpet: interrupt route {route} reaches no I/O APIC input"));
        }
        line
    }

    fn set_gsi(&self, route: u32, level: bool) {
        if let Some(line) = self.gsi_line(route) {
            line.set(level);
        }
    }

    /// QEMU's `update_irq`: raises (`set`) or lowers timer `n`'s interrupt.
    fn update_irq(&self, s: &mut State, n: usize, set: bool) {
        let t = s.timers[n];
        let route = if n <= 1 && s.legacy() {
            if n == 0 {
                0
            } else {
                RTC_ISA_IRQ
            }
        } else {
            ((t.config & TN_INT_ROUTE_MASK) >> TN_INT_ROUTE_SHIFT) as u32
        };
        let mask = 1u64 << n;
        if set && t.level() {
            // A disabled timer still sets its status bit (the specification's words).
            s.isr |= mask;
        } else {
            s.isr &= !mask;
        }
        if set && t.enabled() && s.enabled() {
            if t.fsb_route() {
                self.send_msi(t.fsb);
            } else if t.level() {
                self.set_gsi(route, true);
            } else if let Some(line) = self.gsi_line(route) {
                line.pulse();
            }
        } else if !t.fsb_route() {
            self.set_gsi(route, false);
        }
    }

    /// The FSB route's message: a dword `data` written to `address`, an MSI when that is
    /// the local APICs' window (QEMU writes any other address as memory; a guest that
    /// routes its timer there is broken, and the write is dropped).
    fn send_msi(&self, fsb: u64) {
        let msg = MsiMessage {
            address: fsb >> 32,
            data: fsb as u32,
        };
        if msg.address & !0xf_ffff != 0xfee0_0000 {
            self.log.warn(|| format!("hpet: FSB write to {:#x} is no MSI: dropped", msg.address));
            return;
        }
        if let Some(ops) = self.accel.get() {
            if let Err(e) = ops.send_msi(msg) {
                self.log.warn(|| format!("hpet: FSB interrupt {msg:?} not delivered: {e}"));
            }
        }
    }

    /// QEMU's `hpet_arm`: timer `n` fires when the counter reaches `tick`; at once if it
    /// already has (QEMU's behaviour for a comparator behind the counter).
    fn arm(&self, s: &mut State, n: usize, tick: u64) {
        let ahead = tick.wrapping_sub(self.ticks(s)) as i64;
        let now = self.clock.now_ns();
        let mut ns = if ahead > 0 {
            now.saturating_add(ticks_to_ns(ahead as u64))
        } else {
            now
        };
        let t = &mut s.timers[n];
        if t.periodic() && ns.wrapping_sub(t.last_ns) < MIN_PERIOD_NS {
            ns = t.last_ns.wrapping_add(MIN_PERIOD_NS);
        }
        t.last_ns = ns;
        if let Err(e) = self.timers[n].arm_at(ns) {
            self.log.warn(|| format!("hpet: cannot arm timer {n}: {e}"));
        }
    }

    fn cancel(&self, n: usize) {
        if let Err(e) = self.timers[n].cancel() {
            self.log.warn(|| format!("hpet: cannot disarm timer {n}: {e}"));
        }
    }

    /// QEMU's `hpet_set_timer`: timer `n` is armed for its comparator (or, a 32-bit
    /// one-shot one, first for the counter's wrap).
    fn set_timer(&self, s: &mut State, n: usize) {
        let cur = self.ticks(s);
        let t = &mut s.timers[n];
        t.wrap = false;
        t.cmp64 = t.cmp64_from(cur, t.cmp);
        let next_wrap = (cur | 0xffff_ffff).wrapping_add(1);
        if t.is_32bit() && !t.periodic() && t.cmp64 > next_wrap {
            t.wrap = true;
            self.arm(s, n, next_wrap);
            return;
        }
        let at = s.timers[n].cmp64;
        self.arm(s, n, at);
    }

    /// QEMU's `hpet_del_timer`.
    fn del_timer(&self, s: &mut State, n: usize) {
        self.cancel(n);
        if s.isr & (1 << n) != 0 {
            // A level-triggered interrupt keeps its status bit; its line goes down.
            self.update_irq(s, n, true);
        }
    }

    /// QEMU's `hpet_timer`: timer `n`'s host timer expired.
    fn timer_expired(&self, n: usize) {
        // Under the lock: a register write cannot re-arm the timer between its expiry and
        // this handler.
        let mut s = self.state.lock();
        match self.timers[n].take_due() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.log.warn(|| format!("hpet: timer {n} failed: {e}"));
                return;
            }
        }
        let cur = self.ticks(&s);
        let t = s.timers[n];
        if t.periodic() && t.period != 0 {
            let mut cmp64 = t.cmp64;
            if !after(cmp64, cur) {
                // The match moves the comparator on by a period, and by as many more as
                // the counter is past (QEMU loops, and leaves a comparator equal to the
                // counter where it is, which fires it twice).
                let behind = cur.wrapping_sub(cmp64);
                let periods = behind / t.period + 1;
                cmp64 = cmp64.wrapping_add(periods.wrapping_mul(t.period));
            }
            let timer = &mut s.timers[n];
            timer.cmp64 = cmp64;
            timer.cmp = if timer.is_32bit() { cmp64 & 0xffff_ffff } else { cmp64 };
            self.arm(&mut s, n, cmp64);
        } else if t.wrap {
            s.timers[n].wrap = false;
            self.arm(&mut s, n, t.cmp64);
        }
        self.update_irq(&mut s, n, true);
    }

    /// Tells the in-kernel PIT to stop or tick again, when that changes.
    fn set_pit_stopped(&self, s: &mut State, stopped: bool) {
        if s.pit_stopped == stopped {
            return;
        }
        s.pit_stopped = stopped;
        if let Some(ops) = self.accel.get() {
            if let Err(e) = ops.set_pit_hpet_legacy(stopped) {
                self.log.warn(|| format!("hpet: cannot switch the PIT's IRQ 0: {e}"));
            }
        }
    }

    fn read_reg(&self, s: &State, reg: u64) -> u64 {
        if (REG_TIMERS..HPET_LEN).contains(&reg) {
            let n = ((reg - REG_TIMERS) / TIMER_STRIDE) as usize;
            let Some(t) = s.timers.get(n) else {
                return 0;
            };
            return match (reg - REG_TIMERS) % TIMER_STRIDE {
                TN_CFG => t.config,
                TN_CMP => t.cmp,
                TN_ROUTE => t.fsb,
                _ => 0,
            };
        }
        match reg {
            REG_ID => self.capability,
            REG_CFG => s.config,
            REG_STATUS => s.isr,
            REG_COUNTER => self.counter(s),
            _ => 0,
        }
    }

    fn write_timer(&self, s: &mut State, n: usize, reg: u64, shift: u32, len: u32, value: u64) {
        match reg {
            TN_CFG => {
                // The high half holds the capabilities.
                if shift != 0 {
                    return;
                }
                let old = s.timers[n].config;
                let mut mask = TN_CFG_WRITE_MASK;
                if !self.msi {
                    mask &= !TN_FSB_ENABLE;
                }
                let new = deposit(old, shift, len, value);
                let new = (new & mask) | (old & !mask);
                if old & TN_TYPE_LEVEL != 0 && new & TN_TYPE_LEVEL == 0 {
                    // Before the change: an FSB-routed timer would not lower its line.
                    self.update_irq(s, n, false);
                }
                s.timers[n].config = new;
                if old & TN_ENABLE == 0 && new & TN_ENABLE != 0 && s.isr & (1 << n) != 0 {
                    self.update_irq(s, n, true);
                }
                if new & TN_32BIT != 0 {
                    let t = &mut s.timers[n];
                    t.cmp &= 0xffff_ffff;
                    t.period &= 0xffff_ffff;
                }
                if s.enabled() {
                    self.set_timer(s, n);
                }
            }
            TN_CMP => {
                let (mut shift, mut len, mut value) = (shift, len, value);
                let t = &mut s.timers[n];
                if t.is_32bit() {
                    // The high half reads as zero and stays so.
                    if shift != 0 {
                        return;
                    }
                    (shift, len, value) = (0, 64, value & 0xffff_ffff);
                }
                if !t.periodic() || t.config & TN_SETVAL != 0 {
                    t.cmp = deposit(t.cmp, shift, len, value);
                }
                if t.periodic() {
                    t.period = deposit(t.period, shift, len, value);
                }
                t.config &= !TN_SETVAL;
                if s.enabled() {
                    self.set_timer(s, n);
                }
            }
            TN_ROUTE => {
                let t = &mut s.timers[n];
                t.fsb = deposit(t.fsb, shift, len, value);
            }
            _ => self.log.warn(|| format!("hpet: write to reserved timer register {reg:#x}")),
        }
    }

    fn write_config(&self, s: &mut State, shift: u32, len: u32, value: u64) {
        let old = s.config;
        let new = deposit(old, shift, len, value);
        let new = (new & CFG_WRITE_MASK) | (old & !CFG_WRITE_MASK);
        s.config = new;
        let activated = |bit: u64| old & bit == 0 && new & bit != 0;
        let deactivated = |bit: u64| old & bit != 0 && new & bit == 0;
        if activated(CFG_ENABLE) {
            let counter = s.counter;
            self.restart_counter(s, counter);
            for n in 0..s.timers.len() {
                if s.timers[n].enabled() && s.isr & (1 << n) != 0 {
                    self.update_irq(s, n, true);
                }
                self.set_timer(s, n);
            }
        } else if deactivated(CFG_ENABLE) {
            s.counter = self.ticks(s);
            for n in 0..s.timers.len() {
                self.del_timer(s, n);
            }
        }
        // The PIT's and the RTC's outputs are cut off in legacy mode.
        if activated(CFG_LEGACY) {
            self.set_pit_stopped(s, true);
            self.set_gsi(0, false);
            self.set_gsi(RTC_ISA_IRQ, false);
        } else if deactivated(CFG_LEGACY) {
            self.set_gsi(0, false);
            self.set_pit_stopped(s, false);
            self.set_gsi(RTC_ISA_IRQ, s.rtc_irq_level);
        }
    }

    fn write_reg(&self, s: &mut State, reg: u64, shift: u32, len: u32, value: u64) {
        if (REG_TIMERS..HPET_LEN).contains(&reg) {
            let n = ((reg - REG_TIMERS) / TIMER_STRIDE) as usize;
            if n < s.timers.len() {
                self.write_timer(s, n, (reg - REG_TIMERS) % TIMER_STRIDE, shift, len, value);
            } else {
                self.log.warn(|| format!("hpet: write to absent timer {n}"));
            }
            return;
        }
        match reg {
            REG_ID => {}
            REG_CFG => self.write_config(s, shift, len, value),
            REG_STATUS => {
                let cleared = (value << shift) & s.isr;
                for n in 0..s.timers.len() {
                    if cleared & (1 << n) != 0 {
                        self.update_irq(s, n, false);
                    }
                }
            }
            REG_COUNTER => {
                if s.enabled() {
                    self.log.warn(|| "hpet: counter written while it runs".to_string());
                }
                s.counter = deposit(s.counter, shift, len, value);
            }
            _ => self.log.warn(|| format!("hpet: write to reserved register {reg:#x}")),
        }
    }

    /// QEMU's `hpet_reset`.
    fn reset(&self) {
        let mut s = self.state.lock();
        for n in 0..s.timers.len() {
            self.cancel(n);
            if !s.timers[n].fsb_route() {
                self.update_irq(&mut s, n, false);
            }
            s.timers[n] = Timer::reset(self.timer_caps);
        }
        if s.legacy() {
            self.set_gsi(0, false);
        }
        self.set_pit_stopped(&mut s, false);
        s.config = 0;
        s.isr = 0;
        s.counter = 0;
        s.base_ticks = 0;
        s.base_ns = 0;
        // The RTC lowers its output on reset as well.
        s.rtc_irq_level = false;
    }

    /// The VM stopped or runs again (its clock did, right before): the host timers
    /// follow.
    fn run_state_changed(&self, running: bool) {
        let _s = self.state.lock();
        for (n, timer) in self.timers.iter().enumerate() {
            if let Err(e) = timer.run_state_changed(running) {
                self.log.warn(|| format!("hpet: timer {n}: {e}"));
            }
        }
    }
}

/// The legacy inputs: the PIT's IRQ 0 (KVM's in-kernel PIT injects its own; an emulated
/// one would come here) and the RTC's IRQ 8, passed on unless legacy mode owns the line
/// (QEMU's `hpet_handle_legacy_irq`).
impl IrqHandler for HpetCore {
    fn set_irq(&self, n: u32, level: bool) {
        let mut s = self.state.lock();
        if n == HPET_LEGACY_PIT_INT {
            if !s.legacy() {
                self.set_gsi(0, level);
            }
        } else {
            s.rtc_irq_level = level;
            if !s.legacy() {
                self.set_gsi(RTC_ISA_IRQ, level);
            }
        }
    }
}

/// The register block: 32- and 64-bit aligned accesses (QEMU's `valid` sizes); others
/// read 0 and are dropped.
struct HpetMmio(Arc<HpetCore>);

impl HpetMmio {
    fn access(&self, offset: u64, size: u32) -> Option<(u64, u32, u32)> {
        if !matches!(size, 4 | 8) || !offset.is_multiple_of(u64::from(size)) {
            self.0
                .log
                .warn(|| format!("hpet: {size}-byte access at {offset:#x} ignored"));
            return None;
        }
        Some((offset & !7, ((offset & 4) * 8) as u32, size * 8))
    }
}

impl MemoryRegionOps for HpetMmio {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let Some((reg, shift, len)) = self.access(offset, size) else {
            return 0;
        };
        let s = self.0.state.lock();
        let value = self.0.read_reg(&s, reg) >> shift;
        if len >= 64 {
            value
        } else {
            value & ((1 << len) - 1)
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let Some((reg, shift, len)) = self.access(offset, size) else {
            return;
        };
        let mut s = self.0.state.lock();
        self.0.write_reg(&mut s, reg, shift, len, value);
    }
}

/// The migrated state (QEMU's `vmstate_hpet`: registers, the counter as it stood, each
/// timer with what the host timer still had to run).
#[derive(Serialize, Deserialize)]
struct SavedTimer {
    regs: Timer,
    /// Clock nanoseconds until it fires.
    fires_in_ns: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
enum HpetError {
    #[error("hpet: cannot create its timers: {0}")]
    Host(#[source] std::io::Error),
}

/// What realize set up, for unrealize.
struct Attachment {
    memory: Arc<AddressSpace>,
    region: Arc<MemoryRegion>,
    context: Arc<AioContext>,
    handlers: Vec<AioHandlerId>,
    change: ChangeHandlerId,
    services: Arc<MachineServices>,
}

/// QEMU's `HPETState`.
#[derive(qom::Object)]
#[qom(name = TYPE_HPET)]
pub struct Hpet {
    #[parent]
    parent: DeviceState,
    #[property(name = "timers", default = HPET_MIN_TIMERS, desc = "Number of comparators (3-32)")]
    num_timers: Prop<u8>,
    #[property(default = false, desc = "Offer FSB (MSI) interrupt delivery")]
    msi: Prop<bool>,
    #[property(name = "hpet-intcap", default = 0, desc = "I/O APIC inputs the timers may route to (bit mask)")]
    intcap: Prop<u32>,
    core: OnceLock<Arc<HpetCore>>,
    attachment: Mutex<Option<Attachment>>,
}

type_init!(Hpet);

impl Hpet {
    /// The handler of the legacy inputs ([`HPET_LEGACY_PIT_INT`], [`HPET_LEGACY_RTC_INT`]),
    /// once realized: the board connects the RTC's IRQ 8 here (QEMU's
    /// `qdev_get_gpio_in(hpet, HPET_LEGACY_RTC_INT)`).
    pub fn legacy_irq(&self, n: u32) -> Option<IrqLine> {
        let core: Arc<dyn IrqHandler> = self.core.get()?.clone();
        Some(IrqLine::new(core, n))
    }

    /// The general capabilities' low half, which the ACPI table repeats (its event timer
    /// block ID).
    pub fn block_id(&self) -> Option<u32> {
        self.core.get().map(|c| c.capability as u32)
    }
}

impl DeviceImpl for Hpet {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
    const DESCRIPTION: Option<&'static str> = Some("High Precision Event Timer");
    // A board device (a sysbus device in QEMU).
    const USER_CREATABLE: bool = false;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let count = self.num_timers.get().clamp(HPET_MIN_TIMERS, HPET_MAX_TIMERS);
        let intcap = self.intcap.get();
        if intcap == 0 {
            log::warn!("Hpet's intcap not initialized");
        }
        let msi = self.msi.get();
        let timer_caps = TN_PERIODIC_CAP
            | TN_SIZE_CAP
            | if msi { TN_FSB_CAP } else { 0 }
            | u64::from(intcap) << TN_INT_ROUTE_CAP_SHIFT;
        let clock = services.vm().clock().clone();
        let timers = (0..count)
            .map(|_| VirtualTimer::new(clock.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RealizeError::device(HpetError::Host(e)))?;
        let router = GsiRouter::new(services);
        let core = Arc::new(HpetCore {
            state: Mutex::new(State {
                config: 0,
                isr: 0,
                counter: 0,
                base_ticks: 0,
                base_ns: 0,
                rtc_irq_level: false,
                pit_stopped: false,
                timers: vec![Timer::reset(timer_caps); usize::from(count)],
            }),
            capability: CAP_BASE
                | u64::from(count - 1) << CAP_NUM_TIM_SHIFT
                | HPET_CLK_PERIOD_FS << 32,
            timer_caps,
            msi,
            clock,
            timers,
            gsi: (0..NUM_GSI).map(|n| IrqLine::new(router.clone(), n)).collect(),
            accel: services.vm().accel_slot(),
            log: RateLimitedLog::default(),
        });
        let context = services
            .try_main_context()
            .map_err(|e| RealizeError::device(HpetError::Host(e)))?;
        let weak = Arc::downgrade(&core);
        let mut handlers = Vec::new();
        for n in 0..usize::from(count) {
            let w: Weak<HpetCore> = weak.clone();
            match context.add_fd(
                std::os::fd::AsRawFd::as_raw_fd(&core.timers[n]),
                Box::new(move || {
                    if let Some(core) = w.upgrade() {
                        core.timer_expired(n);
                    }
                }),
            ) {
                Ok(id) => handlers.push(id),
                Err(e) => {
                    for id in handlers {
                        context.remove_fd(id);
                    }
                    return Err(RealizeError::device(HpetError::Host(e)));
                }
            }
        }
        let region = MemoryRegion::new_io("hpet", HPET_LEN, Arc::new(HpetMmio(core.clone())));
        let memory = services.system_memory().clone();
        if let Err(e) = memory.map(HPET_BASE, region.clone()) {
            for id in handlers {
                context.remove_fd(id);
            }
            return Err(e.into());
        }
        let w = weak.clone();
        let change = services.vm().add_change_handler(
            0,
            Arc::new(move |running, _| {
                if let Some(core) = w.upgrade() {
                    core.run_state_changed(running);
                }
            }),
        );
        *self.attachment.lock() = Some(Attachment {
            memory,
            region,
            context,
            handlers,
            change,
            services: services.clone(),
        });
        let _ = self.core.set(core);
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some(a) = self.attachment.lock().take() {
            a.memory.unmap(&a.region);
            for id in a.handlers {
                a.context.remove_fd(id);
            }
            a.services.vm().remove_change_handler(a.change);
        }
        if let Some(core) = self.core.get() {
            core.reset();
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn reset(&self) {
        if let Some(core) = self.core.get() {
            core.reset();
        }
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let Some(core) = self.core.get() else {
            return Ok(VmStateSection::new(1));
        };
        let s = core.state.lock();
        let now = core.clock.now_ns();
        let timers: Vec<SavedTimer> = s
            .timers
            .iter()
            .zip(&core.timers)
            .map(|(t, timer)| SavedTimer {
                regs: *t,
                fires_in_ns: timer.deadline().map(|d| d.saturating_sub(now)),
            })
            .collect();
        Ok(VmStateSection::new(1)
            .with("config", s.config)
            .with("isr", s.isr)
            .with("counter", core.counter(&s))
            .with("rtc_irq_level", s.rtc_irq_level)
            .with("timers", timers))
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let Some(core) = self.core.get() else {
            return Ok(());
        };
        let saved: Vec<SavedTimer> = state.get("timers")?;
        let mut s = core.state.lock();
        if saved.len() != s.timers.len() {
            return Err(VmStateError::Mismatch(format!(
                "the saved HPET has {} timers, this one {}",
                saved.len(),
                s.timers.len()
            )));
        }
        s.config = state.get::<u64>("config")? & CFG_WRITE_MASK;
        s.isr = state.get::<u64>("isr")? & ((1u64 << saved.len()) - 1);
        s.counter = state.get("counter")?;
        s.rtc_irq_level = state.get("rtc_irq_level")?;
        let counter = s.counter;
        core.restart_counter(&mut s, counter);
        // KVM's PIT state, flags included, comes with the accelerator's own section.
        s.pit_stopped = s.legacy();
        for (n, t) in saved.into_iter().enumerate() {
            // The capability bits are this device's, whatever the stream says.
            let mut writable = TN_CFG_WRITE_MASK;
            if !core.msi {
                writable &= !TN_FSB_ENABLE;
            }
            s.timers[n] = Timer {
                config: (t.regs.config & writable) | core.timer_caps,
                // The periodic clamp counts from this clock's times.
                last_ns: 0,
                ..t.regs
            };
            let armed = match t.fires_in_ns {
                Some(ns) => core.timers[n].arm_after(ns),
                None => core.timers[n].cancel(),
            };
            armed.map_err(|e| VmStateError::Host(format!("hpet: timer {n}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deposit_replaces_the_addressed_half() {
        assert_eq!(deposit(0x1111_2222_3333_4444, 32, 32, 0xaaaa_bbbb), 0xaaaa_bbbb_3333_4444);
        assert_eq!(deposit(0x1111_2222_3333_4444, 0, 32, 0xffff_aaaa_bbbb), 0x1111_2222_aaaa_bbbb);
        assert_eq!(deposit(1, 0, 64, 7), 7);
    }

    #[test]
    fn ticks_are_ten_nanoseconds() {
        assert_eq!(ns_to_ticks(1_000), 100);
        assert_eq!(ticks_to_ns(100), 1_000);
        // Far-off comparators wrap instead of overflowing.
        let _ = ticks_to_ns(u64::MAX);
    }

    #[test]
    fn a_32bit_comparator_matches_the_next_tick_with_its_low_half() {
        let t = Timer {
            config: TN_32BIT,
            ..Timer::default()
        };
        assert_eq!(t.cmp64_from(0x1_0000_1000, 0x2000), 0x1_0000_2000);
        assert_eq!(t.cmp64_from(0x1_0000_1000, 0x0800), 0x2_0000_0800);
        let t = Timer::default();
        assert_eq!(t.cmp64_from(0x1_0000_1000, 0x0800), 0x0800);
    }

    #[test]
    fn after_compares_on_the_wrapping_counter() {
        assert!(after(5, 4));
        assert!(!after(4, 4));
        assert!(after(1, u64::MAX));
    }
}
