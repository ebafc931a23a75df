//! The `pc-i440fx` machine (QEMU's `hw/i386/pc_piix.c`): `pc_init1` builds the CPUs from
//! `-smp`, RAM below and above 4 GiB around the PCI hole, the i440FX host bridge and `pci.0`,
//! PIIX3 with the ISA bus, PIIX4 power management with ACPI, and the PC's ISA devices.

use std::sync::Arc;

use qom::{type_init, ObjectClass, ObjectRef, Prop, TypeInfo, Typed};

use crate::core::cpu::machine_start_cpus;
use crate::core::machine::{MachineError, MachineImpl, MachineState};
use crate::core::machine_compat::MachineVersion;
use crate::core::qdev::{qdev_new, qdev_realize, QdevError};
use crate::core::services::MachineServices;
use crate::i386::e820::{pc_e820_table, pc_ram_split};
use crate::i386::pc::pc_basic_ports_init;
use crate::i386::x86_cpu::{X86BootState, X86Cpu};
use crate::pci_host::i440fx::{TYPE_I440FX_PCI_DEVICE, TYPE_I440FX_PCI_HOST_BRIDGE};

/// Size of the 64-bit PCI window above RAM (QEMU's i440FX `pci-hole64-size` default).
const PCI_HOLE64_SIZE: u64 = 1 << 31;

/// QEMU's `TYPE_X86_MACHINE`.
pub const TYPE_X86_MACHINE: &str = "x86-machine";
/// QEMU's `TYPE_PC_MACHINE`.
pub const TYPE_PC_MACHINE: &str = "generic-pc-machine";
/// The current i440FX machine version (`pc`).
pub const TYPE_PC_I440FX_MACHINE: &str = "pc-i440fx-10.0-machine";
/// The i440FX board every version type instantiates (abstract: QEMU's versions derive from
/// `TYPE_PC_MACHINE` each with its own options; here they share one board and differ in
/// their class).
pub const TYPE_PC_I440FX_BOARD: &str = "pc-i440fx-machine";

qom::qom_enum! {
    /// QAPI's `OnOffSplit` (`kernel-irqchip`).
    pub enum OnOffSplit("OnOffSplit") {
        /// In-kernel.
        On = "on",
        /// In user space.
        Off = "off",
        /// Split.
        Split = "split",
    }
}

pub use crate::core::qdev_properties::OnOffAuto;

/// QEMU's `X86MachineState`: the x86 machine options.
#[derive(qom::Object)]
#[qom(name = TYPE_X86_MACHINE, abstract)]
pub struct X86MachineState {
    #[parent]
    parent: MachineState,
    #[property(default = true, desc = "Enable ACPI")]
    acpi: Prop<bool>,
    #[property(default = true, desc = "Enable i8254 PIT")]
    pit: Prop<bool>,
    #[property(default = true, desc = "Enable the HPET")]
    hpet: Prop<bool>,
    #[property(name = "kernel-irqchip", default = "on", desc = "Configure KVM in-kernel irqchip")]
    kernel_irqchip: Prop<OnOffSplit>,
    #[property(default = "auto", desc = "Enable SMM")]
    smm: Prop<OnOffAuto>,
    #[property(default = "auto", desc = "Enable vmport")]
    vmport: Prop<OnOffAuto>,
}

type_init!(X86MachineState);

impl MachineImpl for X86MachineState {}

impl X86MachineState {
    /// The `hpet` property: the board has an HPET.
    pub fn hpet_enabled(&self) -> bool {
        self.hpet.get()
    }

    /// Refuses what the board cannot do (QEMU would build it).
    fn check_unsupported(&self) -> Result<(), MachineError> {
        let unsupported = |what: &str| Err(MachineError::Unsupported(what.to_string()));
        let irqchip = self.kernel_irqchip.get();
        if irqchip != OnOffSplit::On {
            return unsupported(&format!(
                "kernel-irqchip={} is not supported: qomvm always uses KVM's in-kernel irqchip",
                qom::QomEnum::name(irqchip)
            ));
        }
        if self.smm.get() == OnOffAuto::On {
            return unsupported("smm=on is not supported");
        }
        if self.vmport.get() == OnOffAuto::On {
            return unsupported("vmport=on is not supported");
        }
        Ok(())
    }
}

/// QEMU's `PCMachineState`.
#[derive(qom::Object)]
#[qom(name = TYPE_PC_MACHINE, abstract)]
pub struct PcMachineState {
    #[parent]
    parent: X86MachineState,
}

type_init!(PcMachineState);

impl MachineImpl for PcMachineState {}

/// Where a directly booted kernel finds the SMBIOS anchor (the F segment's start, above
/// the ACPI tables' E segment).
const SMBIOS_ANCHOR_ADDR: u64 = 0xf0000;

/// The i440FX board; `pc-i440fx-X.Y` ([`pc_i440fx_register_versions`]) are its types, and
/// `pc-i440fx-10.0` (`pc`) is the default machine.
#[derive(qom::Object)]
#[qom(name = TYPE_PC_I440FX_BOARD, abstract)]
pub struct PcI440fxMachine {
    #[parent]
    parent: PcMachineState,
    /// The RTC's CMOS, where the S3 resume mark is.
    rtc: parking_lot::Mutex<Option<Arc<crate::rtc::mc146818rtc::Rtc>>>,
    /// Set when the machine boots firmware (no `-kernel`): the firmware then owns the
    /// ACPI tables and the S3 resume path, and the BSP starts at the reset vector.
    firmware_boot: std::sync::atomic::AtomicBool,
    /// `-boot once=` is in the CMOS: the next reset puts `order=` back (QEMU's
    /// `restore_boot_order`).
    boot_once_pending: std::sync::atomic::AtomicBool,
    /// A kernel was loaded directly (`-kernel`, Linux or Multiboot): the board sets up
    /// the text screen the firmware would have, once the devices exist.
    direct_kernel: std::sync::atomic::AtomicBool,
    /// That kernel is Linux, entered so: where the RSDP goes, and whether a zero page can
    /// say the screen is there.
    linux_entry: std::sync::OnceLock<crate::i386::x86_linux::LinuxEntry>,
}

type_init!(PcI440fxMachine {
    class_init: Some(pc_i440fx_machine_class_init),
});

static MACHINE_RTC_TIME: qom::StateAccessor<PcI440fxMachine> = qom::StateAccessor {
    get: |machine, _| {
        let time = machine.rtc_time().map(crate::rtc::mc146818rtc::rtc_time_text);
        qom::Value::Str(time.unwrap_or_default())
    },
    set: None,
};

/// QEMU's `rtc-time` alias on the machine (`qom-get /machine rtc-time`).
fn pc_i440fx_machine_class_init(class: &mut qom::ObjectClass) {
    <PcMachineState as qom::ClassInitFor<PcI440fxMachine>>::class_init(class);
    class.add_property(qom::Property::state(
        "rtc-time",
        crate::rtc::mc146818rtc::RTC_TIME_KIND,
        "The time the RTC's registers hold",
        &MACHINE_RTC_TIME,
    ));
}

impl PcI440fxMachine {
    /// The RTC's `rtc-time`, once the board has its RTC.
    pub fn rtc_time(&self) -> Option<crate::core::rtc_clock::Tm> {
        self.rtc.lock().as_ref().map(|rtc| rtc.rtc_time())
    }
}

impl MachineImpl for PcI440fxMachine {
    const DESC: &'static str = PC_I440FX_DESC;
    const MAX_CPUS: u32 = 255;
    const DEFAULT_CPU_TYPE: Option<&'static str> = Some("qemu64-x86_64-cpu");
    /// QEMU's pc: the std VGA unless `-vga`, `-nodefaults` or a display `-device` says
    /// otherwise.
    const DEFAULT_DISPLAY: Option<&'static str> = Some("std");
    const BLOCK_DEFAULT_TYPE: &'static str = "ide";
    const DEFAULT_NIC: Option<&'static str> = Some(crate::net::e1000::TYPE_E1000);
    const HAS_PARALLEL: bool = true;
    const HAS_FLOPPY: bool = true;
    /// piix3-ide's `ide.0` and `ide.1`.
    const IDE_BUSES: u32 = 2;
    const HAS_USB: bool = true;
    const SMP_DIES_SUPPORTED: bool = true;

    fn init(&self) -> Result<(), MachineError> {
        self.pc_init1()
    }

    /// QEMU's `pc_machine_done`: what firmware would do before the guest runs.
    fn machine_done(&self) -> Result<(), MachineError> {
        // Firmware enumerates the bus and assigns the BARs itself (sizing them with
        // decoding off); BARs already decoding would map over the ROM as it sizes them.
        if !self.boots_firmware() {
            if let Some(bus) = self.object().child("i440fx").and_then(|h| h.child("pci.0")) {
                crate::pci::pci::pci_assign_bars(&bus);
                for (_, dev) in crate::pci::pci::pci_bus_devices(&bus) {
                    if let Some(ide) = dev.object().cast::<crate::ide::piix::Piix3Ide>() {
                        ide.firmware_setup();
                    }
                }
            }
        }
        // QEMU's pc_cmos_init, at machine done: the floppy drives (`-device floppy` ones
        // too) in the CMOS.
        self.cmos_init_floppy();
        // QEMU's pvpanic-isa tells firmware its port.
        if let (Some(port), Some(fw_cfg)) = (
            self.isa_pvpanic_port(),
            crate::nvram::fw_cfg::fw_cfg_find(&self.object()),
        ) {
            fw_cfg
                .add_file("etc/pvpanic-port", port.to_le_bytes().to_vec())
                .map_err(MachineError::board)?;
        }
        self.smbios_setup()?;
        self.option_roms_to_fw_cfg()?;
        // The displays exist now (`-device` ones too).
        self.set_up_text_console()?;
        // QEMU's fw_cfg `bootorder`, whatever boots (firmware reads it; a qtest driver
        // may too).
        if let Some(fw_cfg) = crate::nvram::fw_cfg::fw_cfg_find(&self.object()) {
            fw_cfg
                .add_file("bootorder", self.boot_order())
                .map_err(MachineError::board)?;
        }
        if self.boots_firmware() {
            return self.firmware_acpi_setup();
        }
        self.acpi_setup()
    }

    /// QEMU's `pc_machine_reset`: reload what firmware would load again, or, waking from
    /// S3, do what SeaBIOS's resume path does instead (see [`PcI440fxMachine::s3_resume`]).
    fn reset(&self) -> Result<(), MachineError> {
        if self.boot_once_pending.swap(false, std::sync::atomic::Ordering::AcqRel) {
            if let Some(rtc) = self.rtc.lock().clone() {
                set_boot_dev(&rtc, &self.boot_order_letters(false)).map_err(MachineError::board)?;
            }
        }
        if self.boots_firmware() {
            // The firmware resumes from S3 and places its tables itself: every CPU goes
            // back to the reset vector, and the PCI functions come back with decoding off
            // and their BARs cleared for the firmware to assign again (QEMU's
            // `pci_do_device_reset`).
            if let Some(bus) = self.object().child("i440fx").and_then(|h| h.child("pci.0")) {
                for (_, dev) in crate::pci::pci::pci_bus_devices(&bus) {
                    dev.write_config(crate::pci::pci::config::COMMAND, 0, 2);
                    for bar in 0..crate::pci::pci::PCI_NUM_BARS {
                        dev.write_config(crate::pci::pci::config::BAR0 + 4 * bar, 0, 4);
                    }
                    dev.write_config(crate::pci::pci::config::ROM_ADDRESS, 0, 4);
                }
            }
            return self.load_kernel();
        }
        if self.s3_resume() {
            return Ok(());
        }
        self.load_kernel()?;
        self.acpi_setup()
    }
}

/// Errors of loading the guest's kernel and firmware tables.
#[derive(Debug, thiserror::Error)]
pub enum PcLoadError {
    /// `-kernel` could not be loaded as Linux.
    #[error("could not load kernel '{path}': {source}")]
    Kernel {
        /// The `-kernel` path.
        path: String,
        /// Why.
        source: crate::i386::x86_linux::LinuxLoadError,
    },
    /// `-kernel` could not be read.
    #[error("could not load kernel '{path}': {reason}")]
    KernelFile {
        /// The `-kernel` path.
        path: String,
        /// `strerror` of the failure.
        reason: String,
    },
    /// `-kernel` is a Multiboot image that could not be loaded.
    #[error("could not load kernel '{path}': {source}")]
    Multiboot {
        /// The `-kernel` path.
        path: String,
        /// Why.
        source: crate::i386::multiboot::MultibootError,
    },
    /// A Multiboot module (`-initrd` entry) could not be read.
    #[error("Failed to get image size of {path}: {reason}")]
    Module {
        /// The module's path.
        path: String,
        /// `strerror` of the failure.
        reason: String,
    },
    /// `-initrd` or `-append` without `-kernel`.
    #[error("-{0} only allowed with -kernel option")]
    NeedsKernel(&'static str),
    /// The ACPI tables could not be built.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] crate::i386::acpi_build::AcpiError),
    /// The SMBIOS tables do not fit between their anchor and 1 MiB.
    #[error("SMBIOS tables too large ({0} bytes) for the F segment")]
    SmbiosTooLarge(usize),
    /// The SMBIOS tables could not be written to guest RAM.
    #[error("SMBIOS tables: {0}")]
    SmbiosWrite(String),
    /// The firmware image could not be loaded.
    #[error(transparent)]
    Firmware(#[from] crate::i386::pc_sysfw::FirmwareError),
    /// The i440FX's shadow RAM could not be set up.
    #[error(transparent)]
    Pam(#[from] crate::pci_host::pam::PamError),
    /// `-kernel` through the firmware needs its linuxboot option ROM.
    #[error("-kernel with -bios is not supported yet")]
    KernelWithBios,
}


impl PcI440fxMachine {
    /// The class of the version this machine is.
    fn machine_class(&self) -> &crate::core::machine::MachineClass {
        crate::core::machine::machine_class(self.object().class())
            .expect("machines have a MachineClass")
    }

    /// QEMU's `rom_add_vga`/`rom_add_option` for PCI devices with `rombar=0`: their
    /// option ROMs go to the firmware as fw_cfg files (`vgaroms/...`, `genroms/...`).
    fn option_roms_to_fw_cfg(&self) -> Result<(), MachineError> {
        let Some(bus) = self.object().child("i440fx").and_then(|h| h.child("pci.0")) else {
            return Ok(());
        };
        let Some(fw_cfg) = crate::nvram::fw_cfg::fw_cfg_find(&self.object()) else {
            return Ok(());
        };
        for (_, dev) in crate::pci::pci::pci_bus_devices(&bus) {
            if let Some(rom) = dev.fw_cfg_rom() {
                fw_cfg
                    .add_file(&rom.name, rom.data.to_vec())
                    .map_err(MachineError::board)?;
            }
        }
        Ok(())
    }

    /// The firmware's S3 resume (SeaBIOS's `handle_resume`/`s3_resume`), as there is no
    /// firmware yet: if CMOS byte 0x0f holds the resume mark 0xfe (the RTC sets it as the
    /// guest goes to sleep), clear it and, if the guest put a waking vector in the FACS
    /// (`firmware_waking_vector`), start CPU 0 there in real mode (CS = vector >> 4,
    /// IP = vector & 0xf, the ACPI specification's real-mode entry) with RAM, the kernel and
    /// the ACPI tables left as the guest had them. Returns `false` for a cold reset (no mark,
    /// or no vector: SeaBIOS then boots normally).
    fn s3_resume(&self) -> bool {
        let Some(rtc) = self.rtc.lock().clone() else {
            return false;
        };
        if rtc.get_memory(crate::rtc::mc146818rtc::CMOS_RESET_CODE)
            != crate::rtc::mc146818rtc::CMOS_RESET_S3_RESUME
        {
            return false;
        }
        rtc.set_memory(crate::rtc::mc146818rtc::CMOS_RESET_CODE, 0);
        if !self.acpi.get() {
            return false;
        }
        use vm_memory::Bytes;
        let vector: u32 = self
            .ram()
            .read_obj(vm_memory::GuestAddress(
                crate::i386::acpi_build::FACS_ADDR + crate::i386::acpi_build::FACS_WAKING_VECTOR,
            ))
            .unwrap_or(0);
        if vector == 0 {
            log::info!("S3 resume: no waking vector set in the FACS; booting");
            return false;
        }
        self.set_bsp_boot_state(real_mode_entry_state(vector));
        true
    }

    /// Loads `-kernel`/`-initrd`/`-append` into RAM and gives CPU 0 the entry state (QEMU's
    /// `x86_load_linux`, with the direct 64-bit entry instead of an option ROM). Runs at
    /// board init and again at each reset, since the guest may have overwritten RAM.
    fn load_kernel(&self) -> Result<(), MachineError> {
        let initrd = self.initrd().unwrap_or_default();
        let append = self.append().unwrap_or_default();
        let Some(kernel) = self.kernel() else {
            if self.boots_firmware() {
                // QEMU's x86_cpu_reset: the BSP fetches its first instruction at
                // 0xfffffff0, in the firmware's ROM.
                self.set_bsp_boot_state(reset_vector_state());
            }
            if !initrd.is_empty() {
                return Err(MachineError::board(PcLoadError::NeedsKernel("initrd")));
            }
            if !append.is_empty() {
                return Err(MachineError::board(PcLoadError::NeedsKernel("append")));
            }
            return Ok(());
        };
        let (below_4g, above_4g) = pc_ram_split(self.ram_size());
        let e820 = pc_e820_table(below_4g, above_4g);
        let file_error = |e: std::io::Error| {
            MachineError::board(PcLoadError::KernelFile {
                path: kernel.clone(),
                reason: crate::core::os_error::strerror(&e),
            })
        };
        // QEMU tries Multiboot first, then Linux. The Multiboot header is in the first
        // 8 KiB: only a Multiboot kernel is read whole here (a Linux loader reads its own).
        let mut head = Vec::new();
        {
            use std::io::Read;
            std::fs::File::open(&kernel)
                .and_then(|f| f.take(crate::i386::multiboot::MULTIBOOT_HEADER_AREA).read_to_end(&mut head))
                .map_err(file_error)?;
        }
        if crate::i386::multiboot::is_multiboot(&head) {
            let bytes = std::fs::read(&kernel).map_err(file_error)?;
            let mut modules = Vec::new();
            for (path, cmdline) in crate::i386::multiboot::multiboot_split_initrd(&initrd) {
                let data = std::fs::read(&path).map_err(|e| {
                    MachineError::board(PcLoadError::Module {
                        path: path.clone(),
                        reason: crate::core::os_error::strerror(&e),
                    })
                })?;
                modules.push((cmdline, data));
            }
            let module_refs: Vec<(&str, &[u8])> = modules
                .iter()
                .map(|(c, d)| (c.as_str(), d.as_slice()))
                .collect();
            let state = crate::i386::multiboot::multiboot_load(
                &self.ram(),
                self.ram_size(),
                &kernel,
                &bytes,
                &append,
                &module_refs,
                &e820,
            )
            .map_err(|source| {
                MachineError::board(PcLoadError::Multiboot {
                    path: kernel.clone(),
                    source,
                })
            })?;
            self.direct_kernel
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.set_up_text_console()?;
            self.set_bsp_boot_state(state);
            return Ok(());
        }
        let initrd_path = (!initrd.is_empty()).then(|| std::path::Path::new(initrd.as_str()));
        let loaded = crate::i386::x86_linux::load_linux(
            &self.ram(),
            std::path::Path::new(&kernel),
            initrd_path,
            &append,
            &e820,
        )
        .map_err(|source| {
            MachineError::board(PcLoadError::Kernel {
                path: kernel.clone(),
                source,
            })
        })?;
        self.direct_kernel
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // (set once: the board loads the kernel once, at init)
        let _ = self.linux_entry.set(loaded.entry);
        self.set_up_text_console()?;
        self.set_bsp_boot_state(loaded.state);
        Ok(())
    }

    /// Does what SeaBIOS and the VGA BIOS have done when QEMU's `-kernel` starts a kernel
    /// (Linux or Multiboot): the first display in 80x25 text mode with the VGA BIOS's font
    /// (found in the display's option ROM), and for Linux the zero page saying so. Nothing
    /// where there is no such display or font (or before the devices exist): the kernel
    /// then has no VGA console, as without a VGA BIOS.
    fn set_up_text_console(&self) -> Result<(), MachineError> {
        if !self.direct_kernel.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let Some(console) = self.services().consoles().first() else {
            return Ok(());
        };
        let rom = console
            .device()
            .and_then(|d| d.cast::<crate::pci::pci::PciDevice>().and_then(|p| p.option_rom()));
        let Some(font) = rom.as_deref().and_then(crate::display::vga::vga_bios_font) else {
            return Ok(());
        };
        if !console.set_bios_text_mode(font)
            || self.linux_entry.get() != Some(&crate::i386::x86_linux::LinuxEntry::ZeroPage)
        {
            return Ok(());
        }
        crate::i386::x86_linux::set_vga_text_screen(&self.ram()).map_err(|source| {
            MachineError::board(PcLoadError::Kernel {
                path: self.kernel().unwrap_or_default(),
                source,
            })
        })
    }

    fn boots_firmware(&self) -> bool {
        self.firmware_boot.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The firmware to boot, if the machine boots firmware: without `-kernel`, `-bios` or
    /// the default SeaBIOS image. `-kernel` and `-bios` together would need the
    /// firmware's linuxboot option ROM.
    ///
    /// Under qtest no guest code runs, so without `-bios` nothing would execute the
    /// default firmware: those machines keep the plain layout (RAM to 1 MiB, BARs
    /// assigned by the board) that the device tests drive, and need no SeaBIOS installed.
    fn firmware_path(&self) -> Result<Option<std::path::PathBuf>, PcLoadError> {
        let qtest = self.accel_ops().is_some_and(|a| a.name() == "qtest");
        match (self.kernel(), self.firmware()) {
            (Some(_), Some(_)) => Err(PcLoadError::KernelWithBios),
            (Some(_), None) => Ok(None),
            (None, None) if qtest => Ok(None),
            (None, bios) => Ok(Some(crate::i386::pc_sysfw::find_firmware(bios.as_deref())?)),
        }
    }

    /// What QEMU's `pc_cmos_init` stores for the firmware beyond the memory sizes and the
    /// boot order: the CPU count and the equipment byte.
    fn firmware_cmos(&self, rtc: &crate::rtc::mc146818rtc::Rtc) {
        rtc.set_memory(0x5f, (self.smp().cpus.saturating_sub(1)) as u8);
        // FPU present, PS/2 mouse installed.
        rtc.set_memory(0x14, 0x02 | 0x04);
    }

    /// The boot device letters: `once=` (if `first_boot` and given), else `order=`, else
    /// the pc's default "cad" (disk, floppy, CD-ROM).
    fn boot_order_letters(&self, first_boot: bool) -> String {
        let boot = self.boot_config();
        let once = boot.once.filter(|_| first_boot);
        once.or(boot.order).unwrap_or_else(|| "cad".to_string())
    }

    /// The fw_cfg items SeaBIOS reads (QEMU's `fw_cfg_arch_create`, `pc_machine_done`).
    fn firmware_fw_cfg(
        &self,
        fw_cfg: &crate::nvram::fw_cfg::FwCfgIo,
        below_4g: u64,
        above_4g: u64,
    ) -> Result<(), crate::nvram::fw_cfg::FwCfgError> {
        use crate::nvram::fw_cfg::{FW_CFG_BOOT_MENU, FW_CFG_IRQ0_OVERRIDE, FW_CFG_NOGRAPHIC, FW_CFG_NUMA};
        // Under -nographic SeaBIOS then adds etc/sercon-port = 0x3f8 itself and prints on
        // COM1 (paravirt.c: qemu_cfg_init), as it does under QEMU, which sets no such file.
        fw_cfg.add_i16(FW_CFG_NOGRAPHIC, u16::from(!self.graphics()))?;
        let boot = self.boot_config();
        fw_cfg.add_i16(FW_CFG_BOOT_MENU, u16::from(boot.menu == Some(true)))?;
        // The in-kernel IOAPIC has the PIT on pin 2 (interrupt source override 0 -> 2).
        fw_cfg.add_i32(FW_CFG_IRQ0_OVERRIDE, 1)?;
        // No NUMA nodes: the node count, then one node word per CPU.
        let cpus = self.smp().max_cpus as usize;
        fw_cfg.add_bytes(FW_CFG_NUMA, vec![0u8; 8 * (1 + cpus)])?;
        // QEMU's fw_cfg_reboot: ms before SeaBIOS reboots when nothing boots, -1 never.
        let reboot_timeout = boot.reboot_timeout.unwrap_or(-1) as i32;
        fw_cfg.add_file("etc/boot-fail-wait", reboot_timeout.to_le_bytes().to_vec())?;
        // QEMU's fw_cfg_bootsplash: the menu's wait only when given (SeaBIOS's default is
        // 2.5 s), and the splash picture under the name its format asks for.
        if let Some(ms) = boot.splash_time {
            fw_cfg.add_file("etc/boot-menu-wait", (ms as u16).to_le_bytes().to_vec())?;
        }
        if let Some(path) = &boot.splash {
            match boot_splash(path) {
                Ok((name, data)) => {
                    fw_cfg.add_file(name, data)?;
                }
                // QEMU reports it and boots on without a splash.
                Err(e) => qom::error_report!("{e}"),
            }
        }
        fw_cfg.add_file("etc/e820", firmware_e820(below_4g, above_4g))?;
        Ok(())
    }

    /// QEMU's `get_boot_devices_list`: the `bootorder` file, the OpenFirmware paths of the
    /// devices with a `bootindex`, lowest first, one a line, NUL-terminated, and `HALT`
    /// last under `-boot strict=on`. SeaBIOS matches them by prefix against the devices
    /// it finds ("/pci@i0cf8/*@2"); without one, its CMOS order applies.
    fn boot_order(&self) -> Vec<u8> {
        let Some(bus) = self.object().child("i440fx").and_then(|h| h.child("pci.0")) else {
            return Vec::new();
        };
        let mut entries: Vec<(i32, String)> = crate::pci::pci::pci_bus_devices(&bus)
            .into_iter()
            .flat_map(|(devfn, dev)| {
                let path = pci_fw_dev_path(devfn, &dev);
                // Devices with a boot index: the PCI function itself, or the drives on
                // its buses (an IDE controller's `drive@0/disk@1`).
                let drives = dev.object().children().into_iter().flat_map(|(_, bus)| {
                    crate::core::bus::bus_children(&bus).into_iter().flat_map(|drive| {
                        if let Some(usb) = drive.downcast::<crate::usb::usb_bus::UsbDevice>() {
                            return usb_boot_entries(&path, usb, &drive);
                        }
                        // The ISA bridge's floppy controller: `isa@1/fdc@03f0/floppy@0`.
                        if let Some(fdc) = drive.downcast::<crate::block::fdc_isa::IsaFdc>() {
                            return fdc
                                .boot_entries()
                                .into_iter()
                                .map(|(index, below)| (index, format!("{path}/{below}")))
                                .collect();
                        }
                        let below = if let Some(ide) = drive.downcast::<crate::ide::ide_dev::IdeDevice>() {
                            ide.fw_dev_path()
                        } else {
                            drive.downcast::<crate::scsi::scsi_bus::ScsiDevice>().and_then(|d| d.fw_dev_path("disk"))
                        };
                        below
                            .zip(bootindex(&drive))
                            .map(|(below, index)| (index, format!("{path}/{below}")))
                            .into_iter()
                            .collect()
                    })
                });
                bootindex(dev.object())
                    .map(|index| (index, path.clone()))
                    .into_iter()
                    .chain(drives.collect::<Vec<_>>())
            })
            .collect();
        entries.sort();
        let mut paths: Vec<String> = entries.into_iter().map(|(_, path)| path).collect();
        if self.boot_strict() {
            paths.push("HALT".to_string());
        }
        let mut list = paths.join("\n").into_bytes();
        if !list.is_empty() {
            list.push(0);
        }
        list
    }

    /// Only CPU 0 gets the loader's state: the APs wait for the guest's INIT/SIPI.
    fn set_bsp_boot_state(&self, state: X86BootState) {
        if let Some(bsp) = self.cpus().into_iter().next().and_then(Typed::<X86Cpu>::new) {
            bsp.set_boot_state(state);
        }
    }

    /// QEMU's `fw_cfg_build_smbios`: firmware gets the SMBIOS tables and their anchor
    /// through fw_cfg and places them itself; a kernel booted directly finds the anchor in
    /// the F segment (reserved in its e820 map), with the tables right after it.
    fn smbios_setup(&self) -> Result<(), MachineError> {
        use crate::smbios::smbios::{SmbiosConfig, SmbiosMachine};
        let options = self.smbios_options();
        let config = SmbiosConfig::from_options(options.iter().map(String::as_str))
            .map_err(MachineError::board)?;
        let (below_4g, above_4g) = pc_ram_split(self.ram_size());
        let mut memory_areas = vec![(0, below_4g)];
        if above_4g > 0 {
            memory_areas.push((1 << 32, above_4g));
        }
        let smp = self.smp();
        let cpuid = self
            .cpus()
            .into_iter()
            .find_map(Typed::<X86Cpu>::new)
            .map(|cpu| cpu.cpuid_version_and_features())
            .unwrap_or_default();
        let machine = SmbiosMachine {
            manufacturer: "QEMU".into(),
            // QEMU's smbios_set_defaults: the machine type's description and name.
            product: self.machine_class().desc.into(),
            version: self.machine_class().name.into(),
            uuid: self.uuid(),
            sockets: smp.sockets,
            cores: smp.cores,
            threads: smp.threads,
            cpuid,
            ram_size: self.ram_size(),
            memory_areas,
        };
        let tables = config.build(&machine).map_err(MachineError::board)?;
        if self.boots_firmware() {
            if let Some(fw_cfg) = crate::nvram::fw_cfg::fw_cfg_find(&self.object()) {
                fw_cfg
                    .add_file("etc/smbios/smbios-tables", tables.tables.clone())
                    .map_err(MachineError::board)?;
                fw_cfg
                    .add_file("etc/smbios/smbios-anchor", tables.anchor(0))
                    .map_err(MachineError::board)?;
            }
            return Ok(());
        }
        // The anchor on a 16-byte boundary (Linux scans in 16-byte steps), the tables after it.
        let table_addr = SMBIOS_ANCHOR_ADDR + 0x20;
        if table_addr + tables.tables.len() as u64 > 0x10_0000 {
            return Err(MachineError::board(PcLoadError::SmbiosTooLarge(tables.tables.len())));
        }
        let ram = self.ram();
        use vm_memory::{Bytes, GuestAddress};
        ram.write_slice(&tables.anchor(table_addr as u32), GuestAddress(SMBIOS_ANCHOR_ADDR))
            .and_then(|()| ram.write_slice(&tables.tables, GuestAddress(table_addr)))
            .map_err(|e| MachineError::board(PcLoadError::SmbiosWrite(e.to_string())))?;
        Ok(())
    }

    /// QEMU's `acpi_setup` for firmware: the tables go to fw_cfg with the linker/loader
    /// commands that let the firmware place them in memory it reserves.
    fn firmware_acpi_setup(&self) -> Result<(), MachineError> {
        if !self.acpi.get() {
            return Ok(());
        }
        let Some(fw_cfg) = crate::nvram::fw_cfg::fw_cfg_find(&self.object()) else {
            return Ok(());
        };
        let fw = crate::i386::acpi_build::build_firmware_acpi_tables(&self.acpi_config())
            .map_err(|e| MachineError::board(PcLoadError::Acpi(e)))?;
        use crate::i386::acpi_build::{ACPI_BUILD_LOADER_FILE, ACPI_BUILD_RSDP_FILE, ACPI_BUILD_TABLE_FILE};
        fw_cfg
            .add_file(ACPI_BUILD_TABLE_FILE, fw.tables)
            .map_err(MachineError::board)?;
        fw_cfg
            .add_file(ACPI_BUILD_RSDP_FILE, fw.rsdp)
            .map_err(MachineError::board)?;
        fw_cfg
            .add_file(ACPI_BUILD_LOADER_FILE, fw.loader)
            .map_err(MachineError::board)?;
        Ok(())
    }

    /// Builds the ACPI tables for the CPUs present, and tells a loaded Linux where they are.
    fn acpi_setup(&self) -> Result<(), MachineError> {
        if !self.acpi.get() {
            return Ok(());
        }
        let cfg = self.acpi_config();
        let ram = self.ram();
        let rsdp = crate::i386::acpi_build::build_acpi_tables(&ram, &cfg)
            .map_err(|e| MachineError::board(PcLoadError::Acpi(e)))?;
        if let (Some(kernel), Some(&entry)) = (self.kernel(), self.linux_entry.get()) {
            crate::i386::x86_linux::set_acpi_rsdp_addr(&ram, entry, rsdp).map_err(|source| {
                MachineError::board(PcLoadError::Kernel {
                    path: kernel,
                    source,
                })
            })?;
        }
        Ok(())
    }

    /// What the ACPI tables describe: the CPUs present, the PM block, the PCI windows.
    fn acpi_config(&self) -> crate::i386::acpi_build::AcpiConfig {
        let pm = self
            .object()
            .child("pm")
            .and_then(Typed::<crate::acpi::piix4::Piix4Pm>::new);
        let (below_4g, above_4g) = pc_ram_split(self.ram_size());
        // The 64-bit window starts on the first GiB boundary above RAM, as QEMU's does.
        let hole64_start = ((1u64 << 32) + above_4g).next_multiple_of(1 << 30);
        let apic_ids: Vec<u32> = self
            .cpus()
            .into_iter()
            .filter_map(Typed::<X86Cpu>::new)
            .map(|cpu| cpu.apic_id())
            .collect();
        crate::i386::acpi_build::AcpiConfig {
            cpus: apic_ids.len() as u32,
            apic_ids,
            pm_io_base: crate::acpi::piix4::PM_IO_BASE,
            sci_irq: crate::acpi::piix4::SCI_IRQ as u8,
            pci_hole: (below_4g, u64::from(crate::i386::acpi_build::IO_APIC_ADDR)),
            pci_hole64: (hole64_start, hole64_start + PCI_HOLE64_SIZE),
            pirq_irqs: crate::pci_host::i440fx::PIRQ_IRQS,
            s3: pm.as_ref().is_some_and(|pm| !pm.s3_disabled()),
            s4: pm.as_ref().filter(|pm| !pm.s4_disabled()).map(|pm| pm.s4_val()),
            pvpanic_port: self.isa_pvpanic_port(),
            // The board always has one (QEMU's `i8042` machine property is not here).
            i8042: true,
            rtc: self
                .isa_devices()
                .into_iter()
                .find_map(Typed::<crate::rtc::mc146818rtc::Mc146818Rtc>::new)
                .map(|rtc| rtc.resources()),
            serial_ports: self.isa_serial_ports(),
            parallel_ports: self.isa_parallel_ports(),
            fdc: self.isa_fdc().and_then(|fdc| fdc.acpi()),
            gpe0_blk: pm.is_some().then_some((
                crate::acpi::piix4::GPE0_BASE,
                crate::acpi::piix4::GPE0_LEN,
            )),
            pci_hotplug: pm
                .as_ref()
                .filter(|pm| pm.root_pci_hotplug())
                .map(|_| (crate::acpi::pcihp::ACPI_PCIHP_ADDR, self.pci_hotplug_slots())),
            hpet: self.hpet().and_then(|h| h.block_id()).map(|id| (crate::timer::hpet::HPET_BASE, id)),
        }
    }

    /// The board's HPET, if it has one.
    fn hpet(&self) -> Option<Typed<crate::timer::hpet::Hpet>> {
        self.object()
            .child("unattached")?
            .children()
            .into_iter()
            .find_map(|(_, dev)| Typed::<crate::timer::hpet::Hpet>::new(dev))
    }

    /// The root bus's slots the DSDT describes as hotpluggable: all but those holding a
    /// device that cannot be unplugged (QEMU's `build_append_pci_bus_devices`).
    fn pci_hotplug_slots(&self) -> u32 {
        let Some(bus) = self.object().child("i440fx").and_then(|h| h.child("pci.0")) else {
            return 0;
        };
        crate::pci::pci::pci_bus_devices(&bus)
            .into_iter()
            .filter(|(_, dev)| {
                !crate::core::qdev::device_class(dev.object().class())
                    .is_some_and(|dc| dc.hotpluggable)
            })
            .fold(u32::MAX, |slots, (devfn, _)| slots & !(1 << (devfn >> 3)))
    }

    /// The devices on `isa.0`.
    fn isa_devices(&self) -> Vec<ObjectRef> {
        self.object()
            .child("piix3")
            .and_then(|piix3| piix3.child("isa.0"))
            .map(|isa| crate::core::bus::bus_children(&isa))
            .unwrap_or_default()
    }

    /// The machine's `isa-fdc`, if it has one.
    fn isa_fdc(&self) -> Option<Typed<crate::block::fdc_isa::IsaFdc>> {
        self.isa_devices()
            .into_iter()
            .find_map(Typed::<crate::block::fdc_isa::IsaFdc>::new)
    }

    /// QEMU's `pc_cmos_init_floppy`: the drive types in CMOS 0x10 (A: high nibble) and
    /// the drive count in the equipment byte (0x14: bit 0 "boot from floppy", bits 6-7
    /// the count less one).
    fn cmos_init_floppy(&self) {
        let Some(rtc) = self.rtc.lock().clone() else {
            return;
        };
        let types = self
            .isa_fdc()
            .map(|fdc| [fdc.drive_type(0), fdc.drive_type(1)])
            .unwrap_or([crate::block::fdc::FloppyDriveType::None; 2]);
        rtc.set_memory(0x10, (types[0].cmos() << 4) | types[1].cmos());
        let present = types
            .iter()
            .filter(|t| **t != crate::block::fdc::FloppyDriveType::None)
            .count();
        let equipment = rtc.get_memory(0x14);
        let drives = match present {
            0 => 0,
            1 => 0x01,
            _ => 0x41,
        };
        rtc.set_memory(0x14, equipment | drives);
    }

    /// The realized `isa-serial` ports' first ports and IRQs, by COM index.
    fn isa_serial_ports(&self) -> Vec<Option<(u16, u8)>> {
        let mut ports = Vec::new();
        for (index, base, irq) in self
            .isa_devices()
            .into_iter()
            .filter_map(|d| Typed::<crate::char::serial::IsaSerial>::new(d)?.com_port())
        {
            let index = index as usize;
            if ports.len() <= index {
                ports.resize(index + 1, None);
            }
            ports[index] = Some((base, irq));
        }
        ports
    }

    /// The realized `isa-parallel` ports' first ports and IRQs, by LPT index.
    fn isa_parallel_ports(&self) -> Vec<Option<(u16, u8)>> {
        let mut ports = Vec::new();
        for (index, base, irq) in self
            .isa_devices()
            .into_iter()
            .filter_map(|d| Typed::<crate::char::parallel::IsaParallel>::new(d)?.lpt_port())
        {
            let index = index as usize;
            if ports.len() <= index {
                ports.resize(index + 1, None);
            }
            ports[index] = Some((base, irq));
        }
        ports
    }

    /// The port of the ISA `pvpanic` on `isa.0`, if there is one.
    fn isa_pvpanic_port(&self) -> Option<u16> {
        self.isa_devices()
            .into_iter()
            .find_map(Typed::<crate::misc::pvpanic_isa::PvPanicIsa>::new)
            .map(|p| p.ioport())
    }

    /// QEMU's `pc_init1`.
    fn pc_init1(&self) -> Result<(), MachineError> {
        use crate::core::machine::startup_phase as hw_startup_phase;
        hw_startup_phase("board start");
        self.check_unsupported()?;
        let machine = self.object();
        let services = self.services();

        let firmware = self.firmware_path().map_err(MachineError::board)?;
        self.firmware_boot
            .store(firmware.is_some(), std::sync::atomic::Ordering::Relaxed);

        let (below_4g, above_4g) = pc_ram_split(self.ram_size());
        if firmware.is_some() {
            if below_4g < crate::pci_host::pam::PAM_END {
                return Err(MachineError::board(PcLoadError::Pam(
                    crate::pci_host::pam::PamError::NoShadowRam,
                )));
            }
            // The PAM maps 0xc0000-0xfffff segment by segment; 0xa0000-0xbffff is the
            // PCI bus's (the VGA window), as the i440FX decodes it with SMRAM closed.
            self.add_ram_except(
                0,
                below_4g,
                Some(VGA_WINDOW.start..crate::pci_host::pam::PAM_END),
            )?;
        } else {
            self.add_ram_except(0, below_4g, Some(VGA_WINDOW))?;
        }
        if above_4g > 0 {
            self.add_ram(1 << 32, above_4g)?;
        }

        pc_basic_ports_init(services).map_err(MachineError::board)?;

        let host = board_device(&machine, "i440fx", TYPE_I440FX_PCI_HOST_BRIDGE, Bus::None(services), &[])?;
        let pci_bus = host.child("pci.0").ok_or(BoardError::MissingBus("i440fx", "pci.0"))?;
        let i440fx = board_device(&host, "i440fx-device", TYPE_I440FX_PCI_DEVICE, Bus::On(&pci_bus), &[("addr", "00.0")])?;
        if let Some(path) = &firmware {
            let board = |e: PcLoadError| MachineError::board(e);
            let rom = crate::i386::pc_sysfw::pc_system_firmware_init(services, path)
                .map_err(|e| board(e.into()))?;
            let pam = crate::pci_host::pam::Pam::new(services, rom).map_err(|e| board(e.into()))?;
            if let Some(i440fx) = i440fx.cast::<crate::pci_host::i440fx::I440fx>() {
                i440fx.set_pam(pam);
            }
        }
        // The CPUs come after the memory map (QEMU's pc_init1 creates them first): on KVM
        // the first vCPU creates the in-kernel irqchip, after which changing a memory slot
        // costs milliseconds for a while (see accel/kvm's `KvmVm::irqchip`).
        hw_startup_phase("board memory");
        // The vCPUs set themselves up while the devices are made; `machine_creation_done`
        // waits for them. Whatever needs the in-kernel irqchip creates it or waits for it.
        machine_start_cpus(self).map_err(MachineError::board)?;
        hw_startup_phase("board cpus");
        let piix3 = board_device(&machine, "piix3", crate::isa::piix::TYPE_PIIX3, Bus::On(&pci_bus), &[("addr", "01.0")])?;
        let isa_bus = piix3.child("isa.0").ok_or(BoardError::MissingBus("piix3", "isa.0"))?;
        // pc_init1: the PIIX3's IDE function, whose buses take the -drive if=ide drives.
        let unattached = machine
            .child("unattached")
            .ok_or(BoardError::MissingBus("machine", "unattached"))?;
        board_device(&unattached, "device[*]", crate::ide::piix::TYPE_PIIX3_IDE, Bus::On(&pci_bus), &[("addr", "01.1")])?;
        // pc_init1 with usb=on (-usb, -usbdevice): the PIIX3's UHCI function.
        if self.usb() {
            board_device(&unattached, "device[*]", crate::usb::hcd_uhci::TYPE_PIIX3_USB_UHCI, Bus::On(&pci_bus), &[("addr", "01.2")])?;
        }
        // QEMU's KVM pc: with pit=off there is no PIT at all (ports 0x40-0x43 float).
        if self.pit.get() {
            board_device(&machine, "i8254", crate::timer::kvm_i8254::TYPE_KVM_PIT, Bus::On(&isa_bus), &[])?;
        }
        if self.acpi.get() {
            board_device(&machine, "pm", crate::acpi::piix4::TYPE_PIIX4_PM, Bus::On(&pci_bus), &[("addr", "01.3")])?;
        }
        // QEMU's pc_vga_init: the `-vga` device, on the first free slot (00:02.0).
        if let Some(driver) = self.vga_interface() {
            board_device(&unattached, "device[*]", driver, Bus::On(&pci_bus), &[])?;
        }

        // pc_basic_device_init: RTC with the CMOS memory size, keyboard controller, serial
        // ports for -serial.
        let rtc = crate::rtc::mc146818rtc::mc146818_rtc_init(&isa_bus, 2000)?;
        // i8257_dma_init: the two DMA controllers, without the high page registers.
        crate::dma::i8257::i8257_dma_init(&isa_bus, false)?;
        rtc.set_memory_size(below_4g, above_4g);
        // The boot order is checked and stored whatever boots, as QEMU's pc_cmos_init does:
        // `-boot once=` (until the first reset), else `order=`, else "cad".
        let once = self.boot_config().once.is_some();
        set_boot_dev(rtc.rtc(), &self.boot_order_letters(once)).map_err(MachineError::board)?;
        self.boot_once_pending.store(once, std::sync::atomic::Ordering::Release);
        if firmware.is_some() {
            self.firmware_cmos(rtc.rtc());
        }
        *self.rtc.lock() = Some(rtc.rtc().clone());
        // pc_basic_device_init: the HPET (the i440FX's pc offers its timers GSI 2 only,
        // unless -global chose), and the RTC's IRQ 8 rerouted through it for its legacy
        // replacement mode.
        if self.hpet_enabled() {
            let hpet = board_device_with(&unattached, "device[*]", crate::timer::hpet::TYPE_HPET, Bus::None(services), |dev| {
                if dev.property_print("hpet-intcap").is_ok_and(|v| v == "0") {
                    dev.property_parse("hpet-intcap", "4")?;
                }
                Ok(())
            })?;
            if let Some(line) = hpet
                .cast::<crate::timer::hpet::Hpet>()
                .and_then(|h| h.legacy_irq(crate::timer::hpet::HPET_LEGACY_RTC_INT))
            {
                rtc.rtc().set_irq(line);
            }
        }
        board_device(&machine, "i8042", crate::input::pckbd::TYPE_I8042, Bus::On(&isa_bus), &[])?;
        for (index, backend) in self.serial_hds().into_iter().enumerate() {
            if let Some(backend) = backend {
                crate::char::serial::serial_isa_init(&isa_bus, index as u32, Some(backend))?;
            }
        }
        // pc_superio_init: a parallel port for each -parallel.
        for (index, backend) in self.parallel_hds().into_iter().enumerate() {
            if let Some(backend) = backend {
                crate::char::parallel::parallel_isa_init(&isa_bus, index as u32, backend)?;
            }
        }
        // pc_superio_init: the floppy controller, which the i440FX's pc always has (its
        // drives, from -fda and -drive if=floppy, come with the board's devices).
        board_device(&unattached, "device[*]", crate::block::fdc_isa::TYPE_ISA_FDC, Bus::On(&isa_bus), &[])?;

        // fw_cfg, as QEMU's x86 boards set it up (test kernels read the CPU count from it).
        let fw_cfg = crate::nvram::fw_cfg::fw_cfg_init_io_dma(
            self,
            crate::nvram::fw_cfg::FW_CFG_IO_BASE,
            Some(crate::nvram::fw_cfg::FW_CFG_DMA_IO_BASE),
        )?;
        let smp = self.smp();
        let max_apic_id =
            crate::i386::x86_cpu::apic_id_from_index(smp.max_cpus - 1, smp.cores, smp.threads);
        fw_cfg
            .add_i16(crate::nvram::fw_cfg::FW_CFG_MAX_CPUS, (max_apic_id + 1) as u16)
            .map_err(MachineError::board)?;
        let e820 = e820_bytes(&pc_e820_table(below_4g, above_4g));
        if firmware.is_some() {
            self.firmware_fw_cfg(&fw_cfg, below_4g, above_4g)
                .map_err(MachineError::board)?;
        } else {
            fw_cfg.add_file("etc/e820", e820).map_err(MachineError::board)?;
        }
        if let Some(pm) = machine
            .child("pm")
            .and_then(Typed::<crate::acpi::piix4::Piix4Pm>::new)
        {
            fw_cfg
                .add_file("etc/system-states", pm.system_states().to_vec())
                .map_err(MachineError::board)?;
        }

        self.load_kernel()
    }
}

/// QEMU's `usb_get_fw_dev_path` for a USB mass storage device, then its SCSI disk:
/// `hub@H/` for each hub on the way (port "1.3": `hub@1/storage@3`), then
/// `storage@PORT/channel@0/disk@0,0`, under the controller's path, what SeaBIOS looks for
/// (`bootprio_find_usb`).
fn usb_boot_entries(controller: &str, usb: &crate::usb::usb_bus::UsbDevice, dev: &qom::Object) -> Vec<(i32, String)> {
    let Some(path) = usb.port_path() else {
        return Vec::new();
    };
    let Some(ports) = path.split('.').map(|n| n.parse::<u32>().ok()).collect::<Option<Vec<u32>>>() else {
        return Vec::new();
    };
    let Some((last, hubs)) = ports.split_last() else {
        return Vec::new();
    };
    let hubs: String = hubs.iter().map(|h| format!("hub@{h:x}/")).collect();
    let port = format!("{hubs}storage@{last:x}");
    dev.children()
        .into_iter()
        .flat_map(|(_, bus)| crate::core::bus::bus_children(&bus))
        .filter_map(|disk| {
            let below = disk.downcast::<crate::scsi::scsi_bus::ScsiDevice>()?.fw_dev_path("disk")?;
            Some((bootindex(&disk)?, format!("{controller}/{port}/{below}")))
        })
        .collect()
}

/// A device's `bootindex`, if it has one set.
fn bootindex(dev: &qom::Object) -> Option<i32> {
    let index: i32 = dev.property_print("bootindex").ok()?.parse().ok()?;
    (index >= 0).then_some(index)
}

/// The legacy VGA window: never RAM to the guest (QEMU's i440FX sends it to the PCI bus
/// while SMRAM is closed), so a VGA's memory (or nothing: all ones) answers there.
const VGA_WINDOW: std::ops::Range<u64> = 0xa_0000..0xc_0000;

/// The state of a CPU entering real mode at `vector` (the ACPI waking vector's real-mode
/// form: CS = vector >> 4, IP = vector & 0xf), otherwise as after INIT, with its local
/// APIC enabled as the boot processor's.
fn real_mode_entry_state(vector: u32) -> X86BootState {
    use kvm_bindings::{kvm_dtable, kvm_segment};
    let segment = |selector: u16, type_: u8| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    };
    let real_mode_table = kvm_dtable {
        limit: 0xffff,
        ..Default::default()
    };
    let mut state = X86BootState::with_segments(
        segment((vector >> 4) as u16, 0xb),
        segment(0, 0x3),
        real_mode_table,
        real_mode_table,
        0x6000_0010,
    );
    state.regs.rip = u64::from(vector & 0xf);
    state
}

/// QEMU's `pcibus_get_fw_dev_path` under the i440FX (`/pci@i0cf8`): the class's
/// OpenFirmware name (`pci_dev_fw_name`), `@slot[,function]`, and for a virtio disk its
/// `disk@0,0` (a SCSI disk's `channel@0/disk@T,L` follows its adapter's path).
fn pci_fw_dev_path(devfn: u8, dev: &crate::pci::pci::PciDevice) -> String {
    let class = dev.read_config(0x0a, 2) as u16;
    let name = match class {
        0x0100 => "scsi".to_string(),
        0x0101 => "ide".to_string(),
        0x0106 => "sata".to_string(),
        0x0200 => "ethernet".to_string(),
        0x0601 => "isa".to_string(),
        0x0c03 => "usb".to_string(),
        _ => format!("pci{:x},{:x}", dev.read_config(0, 2), dev.read_config(2, 2)),
    };
    let (slot, function) = (devfn >> 3, devfn & 7);
    let mut path = format!("/pci@i0cf8/{name}@{slot:x}");
    if function != 0 {
        path.push_str(&format!(",{function:x}"));
    }
    if dev.object().type_name() == "virtio-blk-pci" {
        path.push_str("/disk@0,0");
    }
    path
}

/// The architectural reset state of the boot processor (QEMU's `x86_cpu_reset`): real
/// mode with CS = 0xf000 based at 0xffff0000 and IP = 0xfff0, so the first fetch is at
/// 0xfffffff0, the firmware's reset vector; the local APIC enabled as the BSP's.
fn reset_vector_state() -> X86BootState {
    let mut state = real_mode_entry_state(0);
    state.sregs.cs.selector = 0xf000;
    state.sregs.cs.base = 0xffff_0000;
    state.regs.rip = 0xfff0;
    state
}

/// QEMU's `etc/e820` for firmware (`e820_add_entry` in `pc_memory_init` and the KVM
/// identity map's reservation): RAM as one range below 4 GiB, one above, in QEMU's packed
/// layout (address, length, type), 20 bytes each. The firmware carves out its own areas.
fn firmware_e820(below_4g: u64, above_4g: u64) -> Vec<u8> {
    use crate::i386::e820::{E820Entry, E820Kind};
    let mut table = vec![E820Entry {
        addr: 0,
        size: below_4g,
        kind: E820Kind::Ram,
    }];
    table.extend(
        pc_e820_table(below_4g, above_4g)
            .into_iter()
            .filter(|e| e.addr >= 1 << 32 || (e.kind != E820Kind::Ram && e.addr >= below_4g)),
    );
    e820_bytes(&table)
}

/// Where a board device plugs in: a bus, or none (it then takes the machine's services
/// from the board).
enum Bus<'a> {
    On(&'a ObjectRef),
    None(&'a Arc<MachineServices>),
}

/// Board wiring the devices did not provide.
#[derive(Debug, thiserror::Error)]
enum BoardError {
    #[error("{0} has no bus {1}")]
    MissingBus(&'static str, &'static str),
}

impl From<BoardError> for MachineError {
    fn from(err: BoardError) -> Self {
        MachineError::board(err)
    }
}

/// Creates, places and realizes a board device.
fn board_device(
    parent: &ObjectRef,
    name: &str,
    driver: &str,
    bus: Bus,
    props: &[(&str, &str)],
) -> Result<ObjectRef, QdevError> {
    board_device_with(parent, name, driver, bus, |dev| {
        for (k, v) in props {
            dev.property_parse(k, v)?;
        }
        Ok(())
    })
}

/// [`board_device`] with `setup` run on the new device (its `-global`s applied) before
/// it is realized.
fn board_device_with(
    parent: &ObjectRef,
    name: &str,
    driver: &str,
    bus: Bus,
    setup: impl FnOnce(&ObjectRef) -> Result<(), QdevError>,
) -> Result<ObjectRef, QdevError> {
    let dev = qdev_new(driver)?;
    setup(&dev)?;
    parent.add_child(name, &dev)?;
    let bus = match bus {
        Bus::On(bus) => Some(bus),
        Bus::None(services) => {
            if let Some(state) = Typed::<crate::core::qdev::DeviceState>::new(dev.clone()) {
                state.set_services(services);
            }
            None
        }
    };
    qdev_realize(&dev, bus)?;
    Ok(dev)
}

/// Errors of the pc's boot device letters (QEMU's `set_boot_dev`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootDevError {
    /// More than the CMOS holds.
    #[error("Too many boot devices for PC")]
    TooMany,
    /// A letter the pc's firmware has no device class for.
    #[error("Invalid boot device for PC: '{0}'")]
    Invalid(char),
}

/// QEMU's `set_boot_dev`: up to three devices as CMOS nibbles (1 floppy, 2 disk, 3
/// CD-ROM, 4 network) in 0x3d and 0x38, with the floppy boot signature check on.
fn set_boot_dev(rtc: &crate::rtc::mc146818rtc::Rtc, devices: &str) -> Result<(), BootDevError> {
    let nibbles = boot_dev_nibbles(devices)?;
    rtc.set_memory(0x3d, (nibbles[1] << 4) | nibbles[0]);
    rtc.set_memory(0x38, nibbles[2] << 4);
    Ok(())
}

fn boot_dev_nibbles(devices: &str) -> Result<[u8; 3], BootDevError> {
    if devices.chars().count() > 3 {
        return Err(BootDevError::TooMany);
    }
    let mut nibbles = [0u8; 3];
    for (nibble, c) in nibbles.iter_mut().zip(devices.chars()) {
        *nibble = match c {
            'a' | 'b' => 1,
            'c' => 2,
            'd' => 3,
            'n' => 4,
            _ => return Err(BootDevError::Invalid(c)),
        };
    }
    Ok(nibbles)
}

/// `-boot splash=FILE` for the firmware: `bootsplash.jpg` or `bootsplash.bmp` by the
/// file's signature (QEMU's `fw_cfg_bootsplash`), or why not, in QEMU's words.
fn boot_splash(path: &str) -> Result<(&'static str, Vec<u8>), String> {
    let data = std::fs::read(path).map_err(|_| format!("failed to find file '{path}'"))?;
    match data.get(..2) {
        Some([0xff, 0xd8]) => Ok(("bootsplash.jpg", data)),
        Some(b"BM") => Ok(("bootsplash.bmp", data)),
        Some(head) => Err(format!(
            "'{path}' not jpeg/bmp file,head:0x{:x}",
            u16::from_be_bytes([head[0], head[1]])
        )),
        None => Err(format!("failed to read splash file '{path}'")),
    }
}

/// E820 entries as fw_cfg carries them (QEMU's `struct e820_entry`: address, length, type,
/// little-endian).
fn e820_bytes(entries: &[crate::i386::e820::E820Entry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| {
            let mut entry = e.addr.to_le_bytes().to_vec();
            entry.extend_from_slice(&e.size.to_le_bytes());
            entry.extend_from_slice(&(e.kind as u32).to_le_bytes());
            entry
        })
        .collect()
}

/// What QEMU's i440FX machine types say of themselves.
const PC_I440FX_DESC: &str = "Standard PC (i440FX + PIIX, 1996)";

/// QEMU's versions of the i440FX machine, oldest first; the last is `pc`. 2.0 to 2.3 are
/// QEMU 7.2's (later QEMUs dropped them), kept for the guests created on them.
const PC_I440FX_VERSIONS: &[MachineVersion] = &[
    (2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (2, 5), (2, 6), (2, 7), (2, 8), (2, 9), (2, 10),
    (2, 11), (2, 12), (3, 0), (3, 1), (4, 0), (4, 1), (4, 2), (5, 0), (5, 1), (5, 2), (6, 0),
    (6, 1), (6, 2), (7, 0), (7, 1), (7, 2), (8, 0), (8, 1), (8, 2), (9, 0), (9, 1), (9, 2),
    (10, 0),
];

/// QEMU 10.0 deprecates machine types more than three years old (`MACHINE_VER_DEPRECATION`):
/// 7.0 and older.
const PC_I440FX_DEPRECATED_UP_TO: MachineVersion = (7, 0);

/// Ubuntu's i440FX machine types (its QEMU packages' `define-ubuntu-machine-types`): each
/// is an upstream version under the release's name, as OpenStack on Ubuntu writes them
/// (`-machine pc-i440fx-trusty`). Codename, release, the version it is.
const UBUNTU_PC_I440FX: &[(&str, &str, MachineVersion)] = &[
    ("trusty", "14.04", (2, 0)),
    ("xenial", "16.04", (2, 5)),
    ("yakkety", "16.10", (2, 6)),
    ("zesty", "17.04", (2, 8)),
    ("artful", "17.10", (2, 10)),
    ("bionic", "18.04", (2, 11)),
    ("cosmic", "18.10", (2, 12)),
    ("disco", "19.04", (3, 1)),
    ("eoan", "19.10", (4, 0)),
    ("focal", "20.04", (4, 2)),
    ("groovy", "20.10", (5, 0)),
    ("hirsute", "21.04", (5, 2)),
    ("impish", "21.10", (6, 0)),
    ("jammy", "22.04", (6, 2)),
    ("kinetic", "22.10", (7, 0)),
    ("lunar", "23.04", (7, 2)),
    ("mantic", "23.10", (8, 0)),
    ("noble", "24.04", (8, 2)),
    ("oracular", "24.10", (9, 0)),
    ("plucky", "25.04", (9, 2)),
    ("questing", "25.10", (10, 0)),
];

/// One registered i440FX machine type (its `class_data`).
#[derive(Debug)]
struct PcI440fxVersion {
    /// The `-M` name (`pc-i440fx-7.2`, `pc-i440fx-trusty`).
    name: &'static str,
    /// `-machine help`'s description (and SMBIOS's product name).
    desc: &'static str,
    /// The upstream version whose compat properties it has.
    version: MachineVersion,
    /// The newest: alias `pc`, the default machine.
    latest: bool,
    /// QEMU's deprecation of old versions (Ubuntu's names are Ubuntu's to retire).
    deprecated: bool,
}

/// Registers `pc-i440fx-X.Y` for every version and Ubuntu's names (QEMU's
/// `DEFINE_I440FX_MACHINE`), all instances of the one board.
fn pc_i440fx_register_versions() -> Vec<TypeInfo> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let upstream = PC_I440FX_VERSIONS.iter().map(|&(major, minor)| PcI440fxVersion {
        name: leak(format!("pc-i440fx-{major}.{minor}")),
        desc: PC_I440FX_DESC,
        version: (major, minor),
        latest: Some(&(major, minor)) == PC_I440FX_VERSIONS.last(),
        deprecated: (major, minor) <= PC_I440FX_DEPRECATED_UP_TO,
    });
    let ubuntu = UBUNTU_PC_I440FX.iter().map(|&(codename, release, version)| PcI440fxVersion {
        name: leak(format!("pc-i440fx-{codename}")),
        desc: leak(format!("Ubuntu {release} PC (i440FX + PIIX, 1996)")),
        version,
        latest: false,
        deprecated: false,
    });
    upstream
        .chain(ubuntu)
        .map(|entry| {
            let entry: &'static PcI440fxVersion = Box::leak(Box::new(entry));
            TypeInfo {
                name: leak(format!("{}{}", entry.name, crate::core::machine::TYPE_MACHINE_SUFFIX)),
                parent: Some(TYPE_PC_I440FX_BOARD),
                class_init: Some(pc_i440fx_version_class_init),
                class_data: Some(entry),
                ..TypeInfo::DEFAULT
            }
        })
        .collect()
}

qom::type_init!(fn pc_i440fx_register_versions);

/// A version's class: the board's, under the version's name, with its compat properties.
fn pc_i440fx_version_class_init(class: &mut ObjectClass) {
    let entry = class
        .class_data::<PcI440fxVersion>()
        .expect("every i440FX version type is registered with its entry");
    let mc = class
        .get_mut::<crate::core::machine::MachineClass>()
        .expect("the board's class has a MachineClass");
    mc.name = entry.name;
    mc.desc = entry.desc;
    mc.alias = entry.latest.then_some("pc");
    mc.is_default = entry.latest;
    mc.compat_props = crate::core::machine_compat::compat_props_for(
        entry.version,
        &[
            crate::core::machine_compat::HW_COMPAT,
            crate::i386::pc::PC_COMPAT,
        ],
    );
    mc.deprecation_reason = entry
        .deprecated
        .then_some("machines more than 3 years old are subject to deletion after 6 years");
    // QEMU 2.1 and older had no default display of their own: the Cirrus VGA.
    if entry.version <= (2, 1) {
        mc.default_display = Some("cirrus");
    }
}

#[cfg(test)]
mod boot_dev_tests {
    use super::*;

    #[test]
    fn boot_letters_become_qemus_cmos_nibbles() {
        assert_eq!(boot_dev_nibbles("cad"), Ok([2, 1, 3]));
        assert_eq!(boot_dev_nibbles("n"), Ok([4, 0, 0]));
        assert_eq!(boot_dev_nibbles("abcd"), Err(BootDevError::TooMany));
        assert_eq!(boot_dev_nibbles("e"), Err(BootDevError::Invalid('e')));
    }
}
