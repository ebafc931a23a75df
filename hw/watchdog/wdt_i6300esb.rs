//! `i6300esb`, the Intel 6300ESB watchdog (QEMU's `hw/watchdog/wdt_i6300esb.c`): the PCI
//! watchdog libvirt's `<watchdog model='i6300esb'>` and OpenStack's `hw:watchdog_action`
//! give a guest.
//!
//! Two stages count down in turn from their preloads (20 bits; a tick is 2^15 PCI clocks
//! of 30 ns, or 2^5 with the 1 MHz scale): the first would interrupt the guest (QEMU does
//! not, nor does qomvm), the second performs the machine's watchdog action (`-action
//! watchdog=`, default reset) unless the guest turned reboots off, resets the watchdog and
//! sets the "previous reboot" flag. The guest's driver reloads it through the memory BAR
//! after the unlock sequence (0x80, 0x86 to the reload register); the configuration
//! space's 0x60 (scale, reboot) and 0x68 (enable, free-run, lock) set it up.
//!
//! The countdown runs on the VM's virtual clock, as QEMU's: not while the VM is stopped.

use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::type_init;
use serde::{Deserialize, Serialize};

use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::{watchdog_perform_action, ChangeHandlerId};
use crate::core::services::MachineServices;
use crate::core::timer::VirtualTimer;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::{BarKind, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's type name.
pub const TYPE_I6300ESB: &str = "i6300esb";

/// Configuration register: reboot off, 1 MHz scale, stage-1 interrupt type.
const ESB_CONFIG_REG: usize = 0x60;
/// Lock register: free-run, enable, lock.
const ESB_LOCK_REG: usize = 0x68;

// BAR 0 registers.
const ESB_TIMER1_REG: u64 = 0x00;
const ESB_TIMER2_REG: u64 = 0x04;
const ESB_RELOAD_REG: u64 = 0x0c;
const BAR_SIZE: u64 = 0x10;

const ESB_WDT_FUNC: u8 = 0x04;
const ESB_WDT_ENABLE: u8 = 0x02;
const ESB_WDT_LOCK: u8 = 0x01;
/// Set: no reboot when the second stage ends.
const ESB_WDT_REBOOT: u16 = 0x20;
/// Set: the 1 MHz scale.
const ESB_WDT_FREQ: u16 = 0x04;
const ESB_WDT_INTTYPE: u16 = 0x03;
/// The reload register's "ping".
const ESB_WDT_RELOAD: u16 = 0x100;
/// The previous-reboot flag is bit 9; Linux's driver uses bit 12, so QEMU answers and
/// clears both.
const ESB_WDT_TIMEOUT: u16 = 0x200;
const ESB_WDT_TIMEOUT_LINUX: u16 = 0x1000;
const ESB_UNLOCK1: u64 = 0x80;
const ESB_UNLOCK2: u64 = 0x86;

/// Nanoseconds per PCI clock (33 MHz).
const PCI_CLOCK_NS: u64 = 30;
const PRELOAD_MASK: u32 = 0xf_ffff;
/// The shortest stage.
const MIN_STAGE_NS: u64 = 1_000;

/// The watchdog's registers and countdown state (QEMU's `I6300State`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct State {
    reboot_enabled: bool,
    /// The 1 MHz scale (else 1 kHz).
    clock_1mhz: bool,
    int_type: u8,
    free_run: bool,
    locked: bool,
    enabled: bool,
    timer1_preload: u32,
    timer2_preload: u32,
    stage: u8,
    /// 0 locked, 1 after 0x80, 2 after 0x86: the next write goes through.
    unlock_state: u8,
    previous_reboot_flag: bool,
}

impl State {
    /// QEMU's `i6300esb_reset` (the previous-reboot flag survives it).
    fn reset(previous_reboot_flag: bool) -> State {
        State {
            reboot_enabled: true,
            clock_1mhz: false,
            int_type: 0,
            free_run: false,
            locked: false,
            enabled: false,
            timer1_preload: PRELOAD_MASK,
            timer2_preload: PRELOAD_MASK,
            stage: 1,
            unlock_state: 0,
            previous_reboot_flag,
        }
    }

    /// The configuration space's view of 0x60 and 0x68.
    fn config_reg(&self) -> u16 {
        (if self.reboot_enabled { 0 } else { ESB_WDT_REBOOT })
            | (if self.clock_1mhz { ESB_WDT_FREQ } else { 0 })
            | u16::from(self.int_type)
    }

    fn lock_reg(&self) -> u8 {
        (if self.free_run { ESB_WDT_FUNC } else { 0 })
            | (if self.locked { ESB_WDT_LOCK } else { 0 })
            | (if self.enabled { ESB_WDT_ENABLE } else { 0 })
    }

    /// Stage `stage`'s length in nanoseconds: at least a microsecond, so that a preload of
    /// 0 in free-running mode does not spin the main loop.
    fn stage_ns(&self, stage: u8) -> u64 {
        let preload = u64::from(if stage <= 1 { self.timer1_preload } else { self.timer2_preload });
        let clocks = preload << if self.clock_1mhz { 5 } else { 15 };
        (clocks * PCI_CLOCK_NS).max(MIN_STAGE_NS)
    }
}

/// The working half, shared with the BAR, the timer's handler and the run-state handler.
struct Watchdog {
    state: Mutex<State>,
    timer: VirtualTimer,
    services: Weak<MachineServices>,
    log: RateLimitedLog,
}

impl Watchdog {
    /// QEMU's `i6300esb_restart_timer`: counts stage `stage` down from its preload.
    fn restart(&self, s: &mut State, stage: u8) {
        if !s.enabled {
            return;
        }
        s.stage = stage;
        if let Err(e) = self.timer.arm_after(s.stage_ns(stage)) {
            self.log.warn(|| format!("i6300esb: cannot arm its timer: {e}"));
        }
    }

    fn disable(&self) {
        if let Err(e) = self.timer.cancel() {
            self.log.warn(|| format!("i6300esb: cannot disarm its timer: {e}"));
        }
    }

    fn reset(&self, s: &mut State) {
        self.disable();
        *s = State::reset(s.previous_reboot_flag);
    }

    /// QEMU's `i6300esb_timer_expired`.
    fn expired(&self) {
        // Under the lock: a ping cannot re-arm the timer between its expiry and this.
        let mut s = self.state.lock();
        match self.timer.take_due() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.log.warn(|| format!("i6300esb: its timer failed: {e}"));
                return;
            }
        }
        if s.stage == 1 {
            // QEMU does not interrupt the guest at the end of the first stage either.
            log::debug!("i6300esb: first stage over (interrupt type {})", s.int_type);
            self.restart(&mut s, 2);
            return;
        }
        if s.reboot_enabled {
            s.previous_reboot_flag = true;
            drop(s);
            // No lock held while the machine acts (it may press the power button, or stop
            // and reset through the main loop).
            if let Some(services) = self.services.upgrade() {
                watchdog_perform_action(services.vm());
            }
            s = self.state.lock();
            self.reset(&mut s);
        }
        if s.free_run {
            self.restart(&mut s, 1);
        }
    }

    fn config_write(&self, addr: usize, val: u32, len: usize) {
        let mut s = self.state.lock();
        match (addr, len) {
            (ESB_CONFIG_REG, 2) => {
                let val = val as u16;
                s.reboot_enabled = val & ESB_WDT_REBOOT == 0;
                s.clock_1mhz = val & ESB_WDT_FREQ != 0;
                s.int_type = (val & ESB_WDT_INTTYPE) as u8;
            }
            (ESB_LOCK_REG, 1) if !s.locked => {
                let val = val as u8;
                s.locked = val & ESB_WDT_LOCK != 0;
                s.free_run = val & ESB_WDT_FUNC != 0;
                let was_enabled = s.enabled;
                s.enabled = val & ESB_WDT_ENABLE != 0;
                if !was_enabled && s.enabled {
                    self.restart(&mut s, 1);
                } else if !s.enabled {
                    self.disable();
                }
            }
            _ => {}
        }
    }

    fn bar_read(&self, offset: u64, size: u32) -> u64 {
        let s = self.state.lock();
        if offset == ESB_RELOAD_REG && size == 2 && s.previous_reboot_flag {
            u64::from(ESB_WDT_TIMEOUT | ESB_WDT_TIMEOUT_LINUX)
        } else {
            0
        }
    }

    fn bar_write(&self, offset: u64, value: u64, size: u32) {
        let mut s = self.state.lock();
        if offset == ESB_RELOAD_REG && value == ESB_UNLOCK1 {
            s.unlock_state = 1;
            return;
        }
        if offset == ESB_RELOAD_REG && value == ESB_UNLOCK2 && s.unlock_state == 1 {
            s.unlock_state = 2;
            return;
        }
        // Bytes only unlock (QEMU's writeb).
        if size == 1 || s.unlock_state != 2 {
            return;
        }
        match (size, offset) {
            (2, ESB_RELOAD_REG) => {
                let value = value as u16;
                if value & ESB_WDT_RELOAD != 0 {
                    self.restart(&mut s, 1);
                }
                if value & (ESB_WDT_TIMEOUT | ESB_WDT_TIMEOUT_LINUX) != 0 {
                    s.previous_reboot_flag = false;
                }
            }
            (4, ESB_TIMER1_REG) => s.timer1_preload = value as u32 & PRELOAD_MASK,
            (4, ESB_TIMER2_REG) => s.timer2_preload = value as u32 & PRELOAD_MASK,
            _ => {}
        }
        s.unlock_state = 0;
    }
}

/// BAR 0.
struct Bar(Arc<Watchdog>);

impl MemoryRegionOps for Bar {
    fn read(&self, offset: u64, size: u32) -> u64 {
        self.0.bar_read(offset, size)
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        self.0.bar_write(offset, value, size);
    }
}

#[derive(Debug, thiserror::Error)]
enum I6300esbError {
    #[error("i6300esb: cannot create its timer: {0}")]
    Host(#[source] std::io::Error),
}

/// What realize set up, for unrealize.
struct Attachment {
    context: Arc<AioContext>,
    handler: AioHandlerId,
    change: ChangeHandlerId,
    services: Arc<MachineServices>,
}

/// QEMU's `I6300State`.
#[derive(qom::Object)]
#[qom(name = TYPE_I6300ESB, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct I6300esb {
    #[parent]
    parent: PciDevice,
    watchdog: OnceLock<Arc<Watchdog>>,
    attachment: Mutex<Option<Attachment>>,
}

type_init!(I6300esb);

impl DeviceImpl for I6300esb {
    const CATEGORY: DeviceCategory = DeviceCategory::Watchdog;
    const DESCRIPTION: Option<&'static str> = Some("Intel 6300ESB");

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some(a) = self.attachment.lock().take() {
            a.context.remove_fd(a.handler);
            a.services.vm().remove_change_handler(a.change);
        }
        if let Some(w) = self.watchdog.get() {
            w.disable();
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn reset(&self) {
        DeviceImpl::reset(&self.parent);
        if let Some(w) = self.watchdog.get() {
            let mut s = w.state.lock();
            w.reset(&mut s);
        }
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut section = VmStateSection::new(1);
        self.save_pci_state(&mut section);
        if let Some(w) = self.watchdog.get() {
            let s = w.state.lock();
            let fires_in = w.timer.deadline().map(|d| d.saturating_sub(w.timer.now_ns()));
            section.put("state", *s);
            section.put("fires_in_ns", fires_in);
        }
        Ok(section)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        self.load_pci_state(state)?;
        let Some(w) = self.watchdog.get() else {
            return Ok(());
        };
        let mut s = w.state.lock();
        *s = state.get("state")?;
        s.timer1_preload &= PRELOAD_MASK;
        s.timer2_preload &= PRELOAD_MASK;
        s.int_type &= ESB_WDT_INTTYPE as u8;
        s.stage = s.stage.clamp(1, 2);
        s.unlock_state = s.unlock_state.min(2);
        let fires_in: Option<u64> = state.get("fires_in_ns")?;
        let armed = match fires_in {
            Some(ns) => w.timer.arm_after(ns),
            None => w.timer.cancel(),
        };
        armed.map_err(|e| VmStateError::Host(format!("i6300esb: its timer: {e}")))
    }
}

impl PciDeviceImpl for I6300esb {
    const VENDOR_ID: u16 = 0x8086;
    /// QEMU's `PCI_DEVICE_ID_INTEL_ESB_9`.
    const DEVICE_ID: u16 = 0x25ab;
    /// `PCI_CLASS_SYSTEM_OTHER`.
    const CLASS_ID: u16 = 0x0880;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let err = |e| RealizeError::device(I6300esbError::Host(e));
        let timer = VirtualTimer::new(services.vm().clock().clone()).map_err(err)?;
        let watchdog = Arc::new(Watchdog {
            state: Mutex::new(State::reset(false)),
            timer,
            services: Arc::downgrade(services),
            log: RateLimitedLog::default(),
        });
        let context = services.try_main_context().map_err(err)?;
        let weak = Arc::downgrade(&watchdog);
        let handler = context
            .add_fd(
                std::os::fd::AsRawFd::as_raw_fd(&watchdog.timer),
                Box::new(move || {
                    if let Some(w) = weak.upgrade() {
                        w.expired();
                    }
                }),
            )
            .map_err(err)?;
        let weak = Arc::downgrade(&watchdog);
        let change = services.vm().add_change_handler(
            0,
            Arc::new(move |running, _| {
                if let Some(w) = weak.upgrade() {
                    if let Err(e) = w.timer.run_state_changed(running) {
                        w.log.warn(|| format!("i6300esb: its timer: {e}"));
                    }
                }
            }),
        );
        let bar = MemoryRegion::new_io("i6300esb", BAR_SIZE, Arc::new(Bar(watchdog.clone())));
        if let Err(e) = self.register_bar(0, BarKind::Mem32, bar) {
            context.remove_fd(handler);
            services.vm().remove_change_handler(change);
            return Err(e);
        }
        *self.attachment.lock() = Some(Attachment {
            context,
            handler,
            change,
            services: services.clone(),
        });
        let _ = self.watchdog.set(watchdog);
        Ok(())
    }

    fn config_write(&self, addr: usize, val: u32, len: usize) {
        if let Some(w) = self.watchdog.get() {
            w.config_write(addr, val, len);
        }
    }

    /// 0x60 and 0x68 read the watchdog's state (QEMU's `i6300esb_config_read`).
    fn config_read(&self, addr: usize, len: usize) {
        let Some(w) = self.watchdog.get() else {
            return;
        };
        let s = *w.state.lock();
        if addr < ESB_CONFIG_REG + 2 && addr + len > ESB_CONFIG_REG {
            self.config_set(ESB_CONFIG_REG, &s.config_reg().to_le_bytes());
        }
        if addr <= ESB_LOCK_REG && addr + len > ESB_LOCK_REG {
            self.config_set(ESB_LOCK_REG, &[s.lock_reg()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_last_their_preload_in_pci_clocks() {
        let mut s = State::reset(false);
        // Linux's default 30 s heartbeat: preload 30 << 9 in each stage, 1 kHz scale.
        s.timer1_preload = 30 << 9;
        s.timer2_preload = 30 << 9;
        assert_eq!(s.stage_ns(1), (30u64 << 9 << 15) * 30);
        assert_eq!(s.stage_ns(2), s.stage_ns(1));
        s.clock_1mhz = true;
        s.timer2_preload = 1;
        assert_eq!(s.stage_ns(2), 1_000, "32 clocks of 30 ns, raised to a microsecond");
        s.timer2_preload = 2;
        assert_eq!(s.stage_ns(2), 64 * 30);
        // The largest preload at the slow scale: about 1000 s, no overflow.
        s.clock_1mhz = false;
        s.timer1_preload = PRELOAD_MASK;
        assert_eq!(s.stage_ns(1), (u64::from(PRELOAD_MASK) << 15) * 30);
    }

    #[test]
    fn configuration_registers_read_back_the_state() {
        let mut s = State::reset(false);
        assert_eq!((s.config_reg(), s.lock_reg()), (0, 0));
        s.reboot_enabled = false;
        s.clock_1mhz = true;
        s.enabled = true;
        s.free_run = true;
        assert_eq!((s.config_reg(), s.lock_reg()), (0x24, 0x06));
    }
}
