//! The `pc-i440fx` machine (QEMU's `hw/i386/pc_piix.c`): `pc_init1` builds the CPUs from
//! `-smp`, RAM below and above 4 GiB around the PCI hole, the i440FX host bridge and `pci.0`,
//! PIIX3 with the ISA bus, PIIX4 power management with ACPI, and the PC's ISA devices.

use qom::{type_init, Error, Object, ObjectClass, ObjectRef, Property};

use crate::core::cpu::machine_create_cpus;
use crate::core::machine::{machine_class_mut, machine_state, MachineError, TYPE_MACHINE};
use crate::core::qdev::{qdev_new, qdev_realize, QdevError};
use crate::i386::e820::{pc_e820_table, pc_ram_split};
use crate::i386::pc::pc_basic_ports_init;
use crate::pci_host::i440fx::{TYPE_I440FX_PCI_DEVICE, TYPE_I440FX_PCI_HOST_BRIDGE};

/// QEMU's `TYPE_X86_MACHINE`.
pub const TYPE_X86_MACHINE: &str = "x86-machine";
/// QEMU's `TYPE_PC_MACHINE`.
pub const TYPE_PC_MACHINE: &str = "generic-pc-machine";
/// The current i440FX machine version.
pub const TYPE_PC_I440FX_MACHINE: &str = "pc-i440fx-10.0-machine";

const X86_MACHINE_PROPERTIES: &[Property] = &[
    Property::bool("acpi", true, "Enable ACPI"),
    Property::bool("pit", true, "Enable i8254 PIT"),
    Property::bool("hpet", false, "Enable the HPET (not emulated: only off is accepted)"),
    Property::enumeration(
        "kernel-irqchip",
        "OnOffSplit",
        &["on", "off", "split"],
        "on",
        "Configure KVM in-kernel irqchip",
    ),
    Property::enumeration("smm", "OnOffAuto", &["on", "off", "auto"], "auto", "Enable SMM"),
    Property::enumeration("vmport", "OnOffAuto", &["on", "off", "auto"], "auto", "Enable vmport"),
];

fn x86_machine_class_init(class: &mut ObjectClass) {
    for p in X86_MACHINE_PROPERTIES {
        class.add_property(p.clone());
    }
}

type_init! {
    name: TYPE_X86_MACHINE,
    parent: Some(TYPE_MACHINE),
    abstract_: true,
    class_init: Some(x86_machine_class_init),
}

fn pc_machine_class_init(class: &mut ObjectClass) {
    let mc = machine_class_mut(class);
    mc.default_cpu_type = Some("qemu64-x86_64-cpu");
    mc.max_cpus = 255;
}

type_init! {
    name: TYPE_PC_MACHINE,
    parent: Some(TYPE_X86_MACHINE),
    abstract_: true,
    class_init: Some(pc_machine_class_init),
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
}

/// Loads `-kernel`/`-initrd`/`-append` into RAM and gives CPU 0 the entry state (QEMU's
/// `x86_load_linux`, with the direct 64-bit entry instead of an option ROM). Runs at board
/// init and again at each reset, since the guest may have overwritten RAM.
fn pc_load_kernel(machine: &ObjectRef) -> Result<(), Error> {
    let ms = machine_state(machine).expect("machines have a MachineState");
    let kernel = machine.prop_str("kernel")?;
    let initrd = machine.prop_str("initrd")?;
    let append = machine.prop_str("append")?;
    if kernel.is_empty() {
        if !initrd.is_empty() {
            return Err(Error::other(PcLoadError::NeedsKernel("initrd")));
        }
        if !append.is_empty() {
            return Err(Error::other(PcLoadError::NeedsKernel("append")));
        }
        return Ok(());
    }
    let (below_4g, above_4g) = pc_ram_split(ms.ram_size());
    let e820 = pc_e820_table(below_4g, above_4g);
    let bytes = std::fs::read(&kernel).map_err(|e| {
        Error::other(PcLoadError::KernelFile {
            path: kernel.clone(),
            reason: crate::core::os_error::strerror(&e),
        })
    })?;
    // QEMU tries Multiboot first, then Linux.
    if crate::i386::multiboot::is_multiboot(&bytes) {
        let mut modules = Vec::new();
        for (path, cmdline) in crate::i386::multiboot::multiboot_split_initrd(&initrd) {
            let data = std::fs::read(&path).map_err(|e| {
                Error::other(PcLoadError::Module {
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
            &ms.ram(),
            ms.ram_size(),
            &kernel,
            &bytes,
            &append,
            &module_refs,
            &e820,
        )
        .map_err(|source| {
            Error::other(PcLoadError::Multiboot {
                path: kernel.clone(),
                source,
            })
        })?;
        set_bsp_boot_state(ms, state);
        return Ok(());
    }
    let initrd_path = (!initrd.is_empty()).then(|| std::path::Path::new(initrd.as_str()));
    let state = crate::i386::x86_linux::load_linux(
        &ms.ram(),
        std::path::Path::new(&kernel),
        initrd_path,
        &append,
        &e820,
    )
    .map_err(|source| {
        Error::other(PcLoadError::Kernel {
            path: kernel.clone(),
            source,
        })
    })?;
    set_bsp_boot_state(ms, state);
    Ok(())
}

/// Only CPU 0 gets the loader's state: the APs wait for the guest's INIT/SIPI.
fn set_bsp_boot_state(ms: &crate::core::machine::MachineState, state: crate::i386::x86_cpu::X86BootState) {
    if let Some(bsp) = ms.cpus().first() {
        if let Some(x86) = bsp.downcast::<crate::i386::x86_cpu::X86Cpu>() {
            x86.set_boot_state(state);
        }
    }
}


/// Builds the ACPI tables for the CPUs present, and tells a loaded Linux where they are.
fn pc_acpi_setup(machine: &ObjectRef) -> Result<(), Error> {
    if !machine.prop_bool("acpi")? {
        return Ok(());
    }
    let ms = machine_state(machine).expect("machines have a MachineState");
    let apic_ids: Vec<u32> = ms
        .cpus()
        .iter()
        .map(|c| c.prop_uint("apic-id").map(|v| v as u32))
        .collect::<Result<_, _>>()?;
    let cfg = crate::i386::acpi_build::AcpiConfig {
        cpus: apic_ids.len() as u32,
        apic_ids,
        pm_io_base: crate::acpi::piix4::PM_IO_BASE,
        sci_irq: crate::acpi::piix4::SCI_IRQ as u8,
    };
    let ram = ms.ram();
    let rsdp = crate::i386::acpi_build::build_acpi_tables(&ram, &cfg)
        .map_err(|e| Error::other(PcLoadError::Acpi(e)))?;
    if !machine.prop_str("kernel")?.is_empty() {
        crate::i386::x86_linux::set_acpi_rsdp_addr(&ram, rsdp).map_err(|source| {
            Error::other(PcLoadError::Kernel {
                path: machine.prop_str("kernel").unwrap_or_default(),
                source,
            })
        })?;
    }
    Ok(())
}

/// QEMU's `pc_machine_reset`: reload what firmware would load again.
fn pc_machine_reset(machine: &ObjectRef) -> Result<(), Error> {
    pc_load_kernel(machine)?;
    pc_acpi_setup(machine)
}

/// Refuses what the board cannot do, by property name (QEMU would build it).
fn check_unsupported(machine: &Object) -> Result<(), MachineError> {
    let unsupported = |what: &str| Err(MachineError::Unsupported(what.to_string()));
    if !machine.prop_bool("pit")? {
        return unsupported("pit=off is not supported: KVM's in-kernel PIT is always created");
    }
    match machine.prop_str("kernel-irqchip")?.as_str() {
        "on" => {}
        other => {
            return unsupported(&format!(
                "kernel-irqchip={other} is not supported: qomvm always uses KVM's in-kernel irqchip"
            ))
        }
    }
    if machine.prop_bool("hpet")? {
        return unsupported("hpet=on is not supported: qomvm has no HPET");
    }
    if machine.prop_str("smm")? == "on" {
        return unsupported("smm=on is not supported");
    }
    if machine.prop_str("vmport")? == "on" {
        return unsupported("vmport=on is not supported");
    }
    Ok(())
}

/// Creates, places and realizes a board device.
fn board_device(parent: &ObjectRef, name: &str, driver: &str, bus: Option<&ObjectRef>, props: &[(&str, &str)]) -> Result<ObjectRef, QdevError> {
    let dev = qdev_new(driver)?;
    for (k, v) in props {
        dev.property_parse(k, v)?;
    }
    parent.add_child(name, &dev)?;
    qdev_realize(&dev, bus)?;
    Ok(dev)
}

/// QEMU's `pc_init1`.
fn pc_init1(machine: &ObjectRef) -> Result<(), Error> {
    check_unsupported(machine).map_err(Error::other)?;
    let ms = machine_state(machine).expect("machines have a MachineState");

    machine_create_cpus(machine).map_err(Error::other)?;

    let (below_4g, above_4g) = pc_ram_split(ms.ram_size());
    ms.add_ram(0, below_4g).map_err(Error::other)?;
    if above_4g > 0 {
        ms.add_ram(1 << 32, above_4g).map_err(Error::other)?;
    }

    pc_basic_ports_init(machine)?;

    let host = board_device(machine, "i440fx", TYPE_I440FX_PCI_HOST_BRIDGE, None, &[]).map_err(Error::other)?;
    let pci_bus = host.child("pci.0").expect("the i440FX host bridge has pci.0");
    board_device(&host, "i440fx-device", TYPE_I440FX_PCI_DEVICE, Some(&pci_bus), &[("addr", "00.0")])
        .map_err(Error::other)?;
    let piix3 = board_device(machine, "piix3", crate::isa::piix::TYPE_PIIX3, Some(&pci_bus), &[("addr", "01.0")])
        .map_err(Error::other)?;
    let isa_bus = piix3.child("isa.0").expect("PIIX3 has isa.0");
    board_device(machine, "i8254", crate::timer::kvm_i8254::TYPE_KVM_PIT, Some(&isa_bus), &[])
        .map_err(Error::other)?;
    if machine.prop_bool("acpi")? {
        board_device(machine, "pm", crate::acpi::piix4::TYPE_PIIX4_PM, Some(&pci_bus), &[("addr", "01.3")])
            .map_err(Error::other)?;
    }

    // pc_basic_device_init: RTC with the CMOS memory size, keyboard controller, serial
    // ports for -serial.
    let rtc = crate::rtc::mc146818rtc::mc146818_rtc_init(&isa_bus, 2000).map_err(Error::other)?;
    crate::rtc::mc146818rtc::rtc_set_memory_size(&rtc, below_4g, above_4g).map_err(Error::other)?;
    board_device(machine, "i8042", crate::input::pckbd::TYPE_I8042, Some(&isa_bus), &[])
        .map_err(Error::other)?;
    for (index, backend) in ms.serial_hds().into_iter().enumerate() {
        if let Some(backend) = backend {
            crate::char::serial::serial_isa_init(&isa_bus, index as u32, Some(backend))
                .map_err(Error::other)?;
        }
    }

    // fw_cfg, as QEMU's x86 boards set it up (test kernels read the CPU count from it).
    let fw_cfg = crate::nvram::fw_cfg::fw_cfg_init_io_dma(
        machine,
        crate::nvram::fw_cfg::FW_CFG_IO_BASE,
        Some(crate::nvram::fw_cfg::FW_CFG_DMA_IO_BASE),
    )
    .map_err(Error::other)?;
    let smp = ms.smp();
    let max_apic_id = crate::i386::x86_cpu::apic_id_from_index(smp.max_cpus - 1, smp.cores, smp.threads);
    crate::nvram::fw_cfg::fw_cfg_add_i16(&fw_cfg, crate::nvram::fw_cfg::FW_CFG_MAX_CPUS, (max_apic_id + 1) as u16)
        .map_err(Error::other)?;
    let e820: Vec<u8> = pc_e820_table(below_4g, above_4g)
        .iter()
        .flat_map(|e| {
            let mut entry = e.addr.to_le_bytes().to_vec();
            entry.extend_from_slice(&e.size.to_le_bytes());
            entry.extend_from_slice(&(e.kind as u32).to_le_bytes());
            entry
        })
        .collect();
    crate::nvram::fw_cfg::fw_cfg_add_file(&fw_cfg, "etc/e820", e820).map_err(Error::other)?;

    pc_load_kernel(machine)
}

/// QEMU's `pc_machine_done`: what firmware would do before the guest runs.
fn pc_machine_done(machine: &ObjectRef) -> Result<(), Error> {
    if let Some(bus) = machine.child("i440fx").and_then(|h| h.child("pci.0")) {
        crate::pci::pci::pci_assign_bars(&bus);
    }
    pc_acpi_setup(machine)
}

fn pc_i440fx_machine_class_init(class: &mut ObjectClass) {
    let mc = machine_class_mut(class);
    mc.desc = "Standard PC (i440FX + PIIX, 1996)";
    mc.alias = Some("pc");
    mc.is_default = true;
    mc.init = Some(pc_init1);
    mc.machine_done = Some(pc_machine_done);
    mc.reset = Some(pc_machine_reset);
}

type_init! {
    name: TYPE_PC_I440FX_MACHINE,
    parent: Some(TYPE_PC_MACHINE),
    class_init: Some(pc_i440fx_machine_class_init),
}
