//! PIIX4 power management (QEMU's `hw/acpi/piix4.c`, `PIIX4_PM` at 00:01.3): the ACPI
//! PM1a event and control registers and the PM timer at I/O base 0x600, the SCI on IRQ 9,
//! the power button, and the sleep states through SLP_EN (QEMU's `acpi_pm1_cnt_write`):
//! SLP_TYP 0 is soft off (S5), 1 is suspend to RAM (S3), `s4_val` is S4 (`SUSPEND_DISK`,
//! then off). `disable_s3`/`disable_s4` only leave `\_S3`/`\_S4` out of the DSDT, as in
//! QEMU (libvirt passes `-global PIIX4_PM.disable_s3=1`); a guest that writes the type
//! anyway still sleeps. PM1_EN.RTC_EN lets the RTC alarm wake the machine; a wake-up
//! latches WAK_STS and the status of its cause (QEMU's `acpi_notify_wakeup`).
//!
//! It is also the PCI bus's hotplug handler (QEMU's `acpi-root-pci-hotplug`): the GPE0
//! block at 0xafe0 and ACPI PCI hotplug ([`crate::acpi::pcihp`]) tell the guest of devices
//! plugged in and asked out while it runs.

use crate::core::vmstate::{VmStateError, VmStateSection};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use qom::{type_init, Prop};

use crate::acpi::pcihp::{AcpiPciHp, ACPI_PCIHP_ADDR, ACPI_PCIHP_SIZE};
use crate::core::bus::BusState;
use crate::core::hotplug::{HotplugError, HotplugHandler};
use crate::core::irq::{GsiRouter, IrqLine};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::log_limit::RateLimitedLog;
use crate::core::runstate::{RunRequest, WakeupReason};
use crate::core::services::MachineServices;
use crate::core::timer::VmClock;
use crate::pci::pci::{config, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's `TYPE_PIIX4_PM`.
pub const TYPE_PIIX4_PM: &str = "PIIX4_PM";
/// Where firmware puts the PM registers on a PC (QEMU's SeaBIOS and our ACPI tables).
pub const PM_IO_BASE: u16 = 0x600;
/// The SCI's ISA IRQ.
pub const SCI_IRQ: u32 = 9;
/// The GPE0 block (QEMU's `GPE_BASE`): two bytes of status, two of enable.
pub const GPE0_BASE: u16 = 0xafe0;
/// Its length (QEMU's `GPE_LEN`).
pub const GPE0_LEN: u8 = 4;

/// PM1 status/enable bits.
const PM1_TMR: u16 = 1 << 0;
const PM1_GBL: u16 = 1 << 5;
const PM1_PWRBTN: u16 = 1 << 8;
const PM1_RTC: u16 = 1 << 10;
/// PM1 status: the machine woke from a sleep state.
const PM1_STS_WAK: u16 = 1 << 15;
/// The events that raise the SCI when enabled (QEMU's `ACPI_BITMASK_PM1_COMMON_ENABLED`).
const PM1_COMMON_ENABLED: u16 = PM1_TMR | PM1_GBL | PM1_PWRBTN | PM1_RTC;
/// PM1 control bits.
const PM1_CNT_SCI_EN: u16 = 1 << 0;
const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// SLP_TYP value the DSDT's `\_S5` names (QEMU's PIIX4 uses 0 for soft off).
pub const SLP_TYP_S5: u16 = 0;
/// SLP_TYP value the DSDT's `\_S3` names (QEMU's: 1).
pub const SLP_TYP_S3: u16 = 1;

/// Guest misuse of the PM block, logged with a budget.
static GUEST_ERRORS: RateLimitedLog = RateLimitedLog::new(5);
/// The ACPI PM timer runs at 3.579545 MHz.
const PM_TIMER_HZ: u128 = 3_579_545;

struct PmRegs {
    sts: u16,
    en: u16,
    cnt: u16,
    /// GPE0 status (write one to clear) and enable, a bit per event.
    gpe_sts: u16,
    gpe_en: u16,
}

/// The PM register block.
struct Pm {
    regs: Mutex<PmRegs>,
    /// The machine's virtual clock time when the PM timer read 0 (moved back on a
    /// migration's destination so the timer goes on from where it was): it stands still
    /// while the VM is stopped, as QEMU's does.
    start_ns: Mutex<u64>,
    clock: Arc<VmClock>,
    sci: IrqLine,
    machine: Weak<MachineServices>,
    /// SLP_TYP of S4 (the `s4_val` property).
    s4_val: u16,
}

impl Pm {
    /// QEMU's `acpi_update_sci`: a PM1 event or a GPE0 event, each enabled.
    fn update_sci(&self, regs: &PmRegs) {
        self.sci.set(
            regs.sts & regs.en & PM1_COMMON_ENABLED != 0 || regs.gpe_sts & regs.gpe_en != 0,
        );
    }

    /// QEMU's `acpi_send_gpe_event`: latches GPE0 status `bits`.
    fn gpe_event(&self, bits: u16) {
        let mut regs = self.regs.lock();
        regs.gpe_sts |= bits;
        self.update_sci(&regs);
    }

    /// Virtual clock nanoseconds since the timer read 0.
    fn elapsed_ns(&self) -> u64 {
        self.clock.now_ns().wrapping_sub(*self.start_ns.lock())
    }

    fn timer(&self) -> u32 {
        let ticks = u128::from(self.elapsed_ns()) * PM_TIMER_HZ / 1_000_000_000;
        (ticks & 0x00ff_ffff) as u32
    }
}

impl MemoryRegionOps for Pm {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let regs = self.regs.lock();
        let value: u64 = match offset {
            0 => u64::from(regs.sts) | (u64::from(regs.en) << 16),
            1 => u64::from(regs.sts >> 8),
            2 => regs.en.into(),
            3 => u64::from(regs.en >> 8),
            4 => regs.cnt.into(),
            5 => u64::from(regs.cnt >> 8),
            8..=11 => u64::from(self.timer()) >> (8 * (offset - 8)),
            _ => 0,
        };
        value & (u64::MAX >> (64 - 8 * size.min(8)))
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let mut regs = self.regs.lock();
        match (offset, size) {
            // PM1_STS bits are write-one-to-clear; a dword write also sets PM1_EN.
            (0, 4) => {
                regs.sts &= !(value as u16);
                self.write_en(&mut regs, (value >> 16) as u16);
            }
            (0, _) => regs.sts &= !(value as u16),
            (2, _) => self.write_en(&mut regs, value as u16),
            (4, _) => {
                let cnt = value as u16;
                regs.cnt = cnt & !PM1_CNT_SLP_EN;
                if cnt & PM1_CNT_SLP_EN != 0 {
                    self.sleep((cnt >> 10) & 7);
                }
            }
            _ => {}
        }
        self.update_sci(&regs);
    }
}

impl Pm {
    /// QEMU's `acpi_pm1_evt_write_en`: the RTC alarm may wake the machine while RTC_EN is
    /// set.
    fn write_en(&self, regs: &mut PmRegs, en: u16) {
        regs.en = en;
        if let Some(machine) = self.machine.upgrade() {
            machine.vm().wakeup_enable(WakeupReason::Rtc, en & PM1_RTC != 0);
        }
    }

    /// SLP_EN with sleep type `slp_typ` (QEMU's `acpi_pm1_cnt_write`).
    fn sleep(&self, slp_typ: u16) {
        let Some(machine) = self.machine.upgrade() else {
            return;
        };
        match slp_typ {
            SLP_TYP_S5 => machine.request(RunRequest::GuestShutdown),
            SLP_TYP_S3 => machine.request(RunRequest::Suspend),
            t if t == self.s4_val => {
                crate::core::qapi_event::emit("SUSPEND_DISK", None);
                machine.request(RunRequest::GuestShutdown);
            }
            _ => {
                if GUEST_ERRORS.allow() {
                    log::warn!("PIIX4_PM: SLP_EN with sleep type {slp_typ}, which no \\_Sx names; ignored");
                }
            }
        }
    }

    /// QEMU's `acpi_notify_wakeup`: WAK_STS and the status of what woke the machine (for
    /// a wake-up from the monitor, the power button's, as QEMU pretends).
    fn wakeup(&self, reason: WakeupReason) {
        let mut regs = self.regs.lock();
        regs.sts |= PM1_STS_WAK
            | match reason {
                WakeupReason::Rtc => PM1_RTC,
                WakeupReason::Other => PM1_PWRBTN,
            };
        self.update_sci(&regs);
    }

    /// QEMU's `piix4_pm_reset` of the PM1 registers: status and enables cleared (the RTC
    /// alarm no longer wakes), SCI_EN kept set as there is no SMI handshake.
    fn reset(&self) {
        let mut regs = self.regs.lock();
        regs.sts = 0;
        self.write_en(&mut regs, 0);
        regs.cnt = PM1_CNT_SCI_EN;
        regs.gpe_sts = 0;
        regs.gpe_en = 0;
        self.update_sci(&regs);
    }

    /// QEMU's `acpi_pm1_evt_power_down`: latches the power button status and updates the
    /// SCI.
    fn power_button(&self) {
        let mut regs = self.regs.lock();
        regs.sts |= PM1_PWRBTN;
        self.update_sci(&regs);
    }
}

/// The GPE0 block's registers (QEMU's `acpi_gpe_ioport_readb`/`writeb`), a byte at a
/// time: status bytes first, then enable bytes.
struct Gpe0(Arc<Pm>);

impl MemoryRegionOps for Gpe0 {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let regs = self.0.regs.lock();
        let bytes = [regs.gpe_sts.to_le_bytes(), regs.gpe_en.to_le_bytes()].concat();
        (0..size.min(8) as usize)
            .map(|i| bytes.get(offset as usize + i).copied().unwrap_or(0))
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(b))
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let mut regs = self.0.regs.lock();
        for i in 0..u64::from(size.min(8)) {
            let byte = (value >> (8 * i)) as u8;
            match offset + i {
                n @ 0..=1 => regs.gpe_sts &= !(u16::from(byte) << (8 * n)),
                n @ 2..=3 => {
                    let shift = 8 * (n - 2);
                    regs.gpe_en = (regs.gpe_en & !(0xff << shift)) | (u16::from(byte) << shift);
                }
                _ => {}
            }
        }
        self.0.update_sci(&regs);
    }
}

/// QEMU's `PIIX4PMState`: the register block, once realized.
#[derive(qom::Object)]
#[qom(name = TYPE_PIIX4_PM, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE], implements = [dyn HotplugHandler])]
pub struct Piix4Pm {
    #[parent]
    parent: PciDevice,
    #[property(default = 0, desc = "Leave \\_S3 (suspend to RAM) out of the DSDT")]
    disable_s3: Prop<u8>,
    #[property(default = 0, desc = "Leave \\_S4 (suspend to disk) out of the DSDT")]
    disable_s4: Prop<u8>,
    #[property(default = 2, desc = "SLP_TYP of S4")]
    s4_val: Prop<u8>,
    #[property(name = "acpi-root-pci-hotplug", default = true, desc = "ACPI hotplug of devices on the root PCI bus")]
    root_pci_hotplug: Prop<bool>,
    #[property(name = "acpi-pci-hotplug-with-bridge-support", default = true, desc = "ACPI hotplug behind PCI bridges (the machine has none)")]
    bridge_pci_hotplug: Prop<bool>,
    pm: Mutex<Option<Arc<Pm>>>,
    pcihp: Mutex<Option<Arc<AcpiPciHp>>>,
}

type_init!(Piix4Pm);

impl Piix4Pm {
    /// Presses the ACPI power button (QEMU's `acpi_pm1_evt_power_down`): the guest gets an
    /// SCI and, if it listens, powers off. Returns `false` if the device is not realized.
    pub fn power_button(&self) -> bool {
        let Some(pm) = self.pm.lock().clone() else {
            return false;
        };
        pm.power_button();
        true
    }

    /// Whether the DSDT leaves out `\_S3` (`disable_s3`).
    pub fn s3_disabled(&self) -> bool {
        self.disable_s3.get() != 0
    }

    /// Whether the DSDT leaves out `\_S4` (`disable_s4`).
    pub fn s4_disabled(&self) -> bool {
        self.disable_s4.get() != 0
    }

    /// Whether devices on the root PCI bus can be plugged in and out while the guest
    /// runs (`acpi-root-pci-hotplug`): the DSDT then describes the slots.
    pub fn root_pci_hotplug(&self) -> bool {
        self.root_pci_hotplug.get()
    }

    /// SLP_TYP of S4 (`s4_val`).
    pub fn s4_val(&self) -> u8 {
        self.s4_val.get()
    }

    /// QEMU's fw_cfg file `etc/system-states`, for firmware: one byte per S0..S5, the
    /// SLP_TYP in the low bits and bit 7 set where the state is enabled.
    pub fn system_states(&self) -> [u8; 6] {
        let mut states = [128, 0, 0, 129, 128, 128];
        states[3] = 1 | (u8::from(!self.s3_disabled()) << 7);
        states[4] = self.s4_val() | (u8::from(!self.s4_disabled()) << 7);
        states
    }
}

impl DeviceImpl for Piix4Pm {
    const DESCRIPTION: Option<&'static str> = Some("PM");
    const CATEGORY: DeviceCategory = DeviceCategory::Bridge;
    const USER_CREATABLE: bool = false;
    const HOTPLUGGABLE: bool = false;

    fn reset(&self) {
        DeviceImpl::reset(&self.parent);
        if let Some(pm) = self.pm.lock().clone() {
            pm.reset();
        }
        let pcihp = self.pcihp.lock().clone();
        if let Some(hp) = pcihp {
            hp.reset();
        }
    }

    /// QEMU's `vmstate_acpi`: the configuration space, PM1 status/enable/control and the
    /// PM timer's age.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(2);
        self.parent.save_pci_state(&mut s);
        let pm = self.pm.lock().clone().ok_or_else(|| VmStateError::Host("PIIX4_PM is not realized".into()))?;
        let regs = pm.regs.lock();
        s.put("pm1_sts", regs.sts);
        s.put("pm1_en", regs.en);
        s.put("pm1_cnt", regs.cnt);
        s.put("timer_ns", pm.elapsed_ns());
        s.put("gpe_sts", regs.gpe_sts);
        s.put("gpe_en", regs.gpe_en);
        drop(regs);
        if let Some(hp) = self.pcihp.lock().as_ref() {
            hp.save_state(&mut s);
        }
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        // Version 1 (before the GPE0 block and PCI hotplug) loads with both idle.
        state.check_version(1, 2)?;
        self.parent.load_pci_state(state)?;
        let pm = self.pm.lock().clone().ok_or_else(|| VmStateError::Host("PIIX4_PM is not realized".into()))?;
        let timer_ns: u64 = state.get("timer_ns")?;
        let mut regs = pm.regs.lock();
        regs.sts = state.get("pm1_sts")?;
        regs.en = state.get("pm1_en")?;
        regs.cnt = state.get("pm1_cnt")?;
        if state.version >= 2 {
            regs.gpe_sts = state.get("gpe_sts")?;
            regs.gpe_en = state.get("gpe_en")?;
            if let Some(hp) = self.pcihp.lock().as_ref() {
                hp.load_state(state)?;
            }
        } else {
            regs.gpe_sts = 0;
            regs.gpe_en = 0;
        }
        *pm.start_ns.lock() = pm.clock.now_ns().wrapping_sub(timer_ns);
        pm.update_sci(&regs);
        Ok(())
    }
}

impl PciDeviceImpl for Piix4Pm {
    const VENDOR_ID: u16 = 0x8086;
    const DEVICE_ID: u16 = 0x7113;
    const REVISION: u8 = 0x03;
    const CLASS_ID: u16 = 0x0680;
    /// QEMU's piix4_pm_realize: pin A (the SCI is wired to IRQ 9, not through INTx).
    const INTERRUPT_PIN: u8 = 1;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let pm = Arc::new(Pm {
            regs: Mutex::new(PmRegs {
                sts: 0,
                en: 0,
                // No SMI handshake exists without firmware: the machine starts in ACPI mode.
                cnt: PM1_CNT_SCI_EN,
                gpe_sts: 0,
                gpe_en: 0,
            }),
            start_ns: Mutex::new(services.vm().clock().now_ns()),
            clock: services.vm().clock().clone(),
            sci: IrqLine::new(GsiRouter::new(services), SCI_IRQ),
            machine: Arc::downgrade(services),
            s4_val: self.s4_val.get().into(),
        });
        // PMBA (0x40) and PMREGMISC (0x80) as firmware programs them.
        self.config_set(0x40, &u32::from(PM_IO_BASE | 1).to_le_bytes());
        self.config_set(0x80, &[1]);
        // DEVACTB's APMC_EN (bit 25, byte 0x5b bit 1): QEMU's piix4_reset marks SMM as
        // already set up when the machine has none, so SeaBIOS does not raise an SMI
        // and wait forever for an SMM handler to answer on port 0xb3.
        self.config_set(0x5b, &[0x02]);
        self.config_set(config::INTERRUPT_LINE, &[SCI_IRQ as u8]);
        services.system_io().map(
            PM_IO_BASE.into(),
            MemoryRegion::new_io("acpi-pm", 0x40, pm.clone()),
        )?;
        services.system_io().map(
            GPE0_BASE.into(),
            MemoryRegion::new_io("acpi-gpe0", GPE0_LEN.into(), Arc::new(Gpe0(pm.clone()))),
        )?;
        *self.pm.lock() = Some(pm.clone());
        // QEMU's piix4_pm_realize with `acpi-root-pci-hotplug`: the PM block plugs devices
        // into its own bus.
        if let (true, Some(bus)) = (self.root_pci_hotplug.get(), ctx.bus()) {
            let events: Weak<Pm> = Arc::downgrade(&pm);
            let pcihp = AcpiPciHp::new(
                bus,
                Box::new(move |bits| {
                    if let Some(pm) = events.upgrade() {
                        pm.gpe_event(bits);
                    }
                }),
            );
            services.system_io().map(
                ACPI_PCIHP_ADDR.into(),
                MemoryRegion::new_io("acpi-pci-hotplug", ACPI_PCIHP_SIZE, pcihp.clone()),
            )?;
            *self.pcihp.lock() = Some(pcihp);
            if let Some(bus_state) = bus.downcast::<BusState>() {
                bus_state.set_hotplug_handler(Some(ctx.object()));
            }
        }
        // The power button is the machine's powerdown notifier (`system_powerdown`).
        let button: Weak<Pm> = Arc::downgrade(&pm);
        services.vm().add_powerdown_notifier(Arc::new(move || {
            if let Some(pm) = button.upgrade() {
                pm.power_button();
            }
        }));
        // The machine can sleep (QEMU's pc registers wake-up support whatever disable_s3
        // says), and a wake-up shows in PM1_STS.
        let waking: Weak<Pm> = Arc::downgrade(&pm);
        services.vm().register_wakeup_support();
        services.vm().add_wakeup_notifier(Arc::new(move |reason| {
            if let Some(pm) = waking.upgrade() {
                pm.wakeup(reason);
            }
        }));
        pm.reset();
        Ok(())
    }
}

/// QEMU's `piix4_device_plug_cb` and `piix4_device_unplug_request_cb` for PCI devices.
impl HotplugHandler for Piix4Pm {
    fn plug(&self, dev: &qom::Object, hotplugged: bool) -> Result<(), HotplugError> {
        let pcihp = self.pcihp.lock().clone();
        match pcihp {
            Some(hp) if dev.cast::<PciDevice>().is_some() => {
                hp.plug(dev, hotplugged);
                Ok(())
            }
            _ => Err(HotplugError::Unsupported(format!(
                "acpi: device plug request for not supported device type: {}",
                dev.type_name()
            ))),
        }
    }

    fn unplug_request(&self, dev: &qom::Object) -> Result<(), HotplugError> {
        let pcihp = self.pcihp.lock().clone();
        match pcihp {
            Some(hp) if dev.cast::<PciDevice>().is_some() => {
                hp.unplug_request(dev);
                Ok(())
            }
            _ => Err(HotplugError::Unsupported(format!(
                "acpi: device unplug request for not supported device type: {}",
                dev.type_name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bus::qbus_new;
    use crate::core::qdev::{qdev_new_typed, qdev_realize};
    use crate::pci::pci::TYPE_PCI_BUS;

    #[test]
    fn soft_off_and_the_power_button() {
        let services = Arc::new(MachineServices::default());
        let host = qom::object_new(qom::TYPE_CONTAINER).unwrap();
        let bus = qbus_new(TYPE_PCI_BUS, &host, "pci.0", &services).unwrap();
        let pm = qdev_new_typed::<Piix4Pm>().unwrap();
        assert!(!pm.power_button(), "not realized");
        pm.object().property_parse("addr", "01.3").unwrap();
        qdev_realize(pm.object(), Some(&bus)).unwrap();
        assert_eq!(pm.read_config(0, 4), 0x7113_8086);
        assert_eq!(pm.read_config(config::INTERRUPT_LINE, 1), SCI_IRQ);
        let io = services.system_io();
        assert_eq!(io.read(0x604, 2) & 1, 1, "SCI_EN");
        assert!(services.vm().has_power_button());
        assert!(pm.power_button());
        assert_eq!(io.read(0x600, 2) & 0x100, 0x100);
        io.write(0x604, 0x2001, 2);
        assert_eq!(
            services.vm().requests().take(),
            Some(RunRequest::GuestShutdown)
        );
    }

    /// A PIIX4_PM realized at 01.3 of a bus of its own with `props`: the services it
    /// maps into, the device, and its bus.
    fn realized_pm(props: &[(&str, &str)]) -> (Arc<MachineServices>, qom::Typed<Piix4Pm>, qom::ObjectRef) {
        let services = Arc::new(MachineServices::default());
        let host = qom::object_new(qom::TYPE_CONTAINER).unwrap();
        let bus = qbus_new(TYPE_PCI_BUS, &host, "pci.0", &services).unwrap();
        let pm = qdev_new_typed::<Piix4Pm>().unwrap();
        pm.object().property_parse("addr", "01.3").unwrap();
        for (k, v) in props {
            pm.object().property_parse(k, v).unwrap();
        }
        qdev_realize(pm.object(), Some(&bus)).unwrap();
        (services, pm, bus)
    }

    #[test]
    fn the_gpe0_block_raises_the_sci_and_migrates_with_the_hotplug_state() {
        let (services, pm, _bus) = realized_pm(&[]);
        let io = services.system_io();
        io.write(u64::from(GPE0_BASE) + 2, 0x2, 1);
        pm.pm.lock().clone().unwrap().gpe_event(0x2);
        assert_eq!(io.read(GPE0_BASE.into(), 2), 0x2);
        assert_eq!(io.read(u64::from(GPE0_BASE) + 2, 2), 0x2, "GPE0_EN reads back");
        let saved = pm.save_state().unwrap();
        assert_eq!(saved.version, 2);
        // Write one to clear.
        io.write(GPE0_BASE.into(), 0x2, 1);
        assert_eq!(io.read(GPE0_BASE.into(), 2), 0);
        pm.load_state(&saved).unwrap();
        assert_eq!(io.read(GPE0_BASE.into(), 2), 0x2, "the pending event came back");
        // A stream from before the GPE0 block loads with it idle.
        let mut old = saved.clone();
        old.version = 1;
        for field in ["gpe_sts", "gpe_en", "pcihp_up", "pcihp_down", "pcihp_select"] {
            old.fields.remove(field);
        }
        pm.load_state(&old).unwrap();
        assert_eq!(io.read(GPE0_BASE.into(), 2), 0);
    }

    #[test]
    fn sleep_types_and_wake_status() {
        let (services, pm, _bus) = realized_pm(&[("s4_val", "5")]);
        assert!(!pm.s3_disabled());
        assert_eq!(pm.system_states(), [128, 0, 0, 129, 133, 128]);
        let io = services.system_io();
        let requests = services.vm().requests();
        // S3: SLP_TYP 1.
        io.write(0x604, (1 << 10) | 0x2001, 2);
        assert_eq!(requests.take(), Some(RunRequest::Suspend));
        assert_eq!(io.read(0x604, 2), (1 << 10) | 1, "SLP_EN reads as 0");
        // S4 at s4_val, an unnamed type is ignored.
        io.write(0x604, (5 << 10) | 0x2001, 2);
        assert_eq!(requests.take(), Some(RunRequest::GuestShutdown));
        io.write(0x604, (6 << 10) | 0x2001, 2);
        assert_eq!(requests.take(), None);
        // RTC_EN raises the SCI for RTC_STS, and a wake-up by the RTC latches both bits.
        io.write(0x602, PM1_RTC.into(), 2);
        let p = pm.pm.lock().clone().unwrap();
        p.wakeup(WakeupReason::Rtc);
        assert_eq!(io.read(0x600, 2), u64::from(PM1_STS_WAK | PM1_RTC));
        io.write(0x600, 0xffff, 2);
        assert_eq!(io.read(0x600, 2), 0, "write one to clear");
        p.wakeup(WakeupReason::Other);
        assert_eq!(io.read(0x600, 2), u64::from(PM1_STS_WAK | PM1_PWRBTN));
        DeviceImpl::reset(&*pm);
        assert_eq!(io.read(0x600, 4), 0, "status and enables cleared");
    }
}
