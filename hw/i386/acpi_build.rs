//! ACPI tables for the pc machine (QEMU's `hw/i386/acpi-build.c`, as SeaBIOS would install
//! them, but written straight into guest RAM): RSDP, XSDT, FADT with FACS, MADT and a DSDT.
//!
//! All tables live in `0xe0000..0xf0000` ([`ACPI_TABLES_START`]..[`ACPI_TABLES_END`]),
//! which `e820::pc_e820_table` reports reserved (with the F-segment, `0xe0000..0x100000`):
//!
//! | address | table |
//! | --- | --- |
//! | `0xe0000` | RSDP (revision 2, 36 bytes; Linux finds it scanning `0xe0000..0xfffff`) |
//! | `0xe0040` | FACS (64 bytes, 64-byte aligned) |
//! | `0xe0080` | DSDT, then FADT, MADT and XSDT, each 16-byte aligned |
//!
//! The platform is a legacy (not hardware-reduced) PC with a PIIX4-style PM block at
//! `pm_io_base`: PM1a_EVT (4 bytes: status, enable) at `+0`, PM1a_CNT (2 bytes) at `+4`,
//! the 24-bit PM timer (4 bytes) at `+8`. The FADT has no SMI command port, so the OS
//! takes the platform as already in ACPI mode (PM1a_CNT should read back with SCI_EN, bit 0,
//! set). No GPE block.
//!
//! Power off: `\_S5_` is `Package { 0, 0, 0, 0 }` (QEMU's value for PIIX4): Linux writes
//! `SLP_TYP = 0 | SLP_EN (bit 13)` to PM1a_CNT. Sleep: `\_S3_` is `Package { 1, 1, 0, 0 }`
//! and `\_S4_` `Package { s4_val, s4_val, 0, 0 }`, each unless PIIX4 PM's `disable_s3`/
//! `disable_s4` says otherwise (QEMU's `build_dsdt`). Waking from S3, the board starts the
//! boot CPU at the FACS's `firmware_waking_vector` ([`FACS_ADDR`] +
//! [`FACS_WAKING_VECTOR`]), as SeaBIOS does.
//!
//! With an ISA `pvpanic`, `\_SB.PEVT` (`QEMU0001`, its port in `_CRS`) lets Linux's pvpanic
//! driver find it (QEMU puts it under `\_SB.PCI0.ISA`, a scope this DSDT does not have). Reset: FADT reset register, I/O port 0xcf9,
//! value 0x06.
//!
//! The DSDT declares the processors (`\_SB.Cxxx`, `ACPI0007`, `_UID` = CPU index, matching
//! the MADT's processor UIDs), `\_S5_` and the PCI host bridge `\_SB.PCI0` (`PNP0A03`):
//! its `_CRS` gives bus 0..255, the configuration ports, the I/O windows around them, the
//! VGA window and the 32- and 64-bit PCI holes; its `_PRT` routes INTA..INTD of every slot
//! to the GSI of the PIIX3 PIRQ line it is swizzled to, and the MADT makes those GSIs level
//! triggered, active high (QEMU's overrides for IRQs 5, 9, 10, 11), so Linux scans PCI and
//! routes its interrupts. The ISA devices are described as QEMU's `build_aml` hooks do
//! (directly under `\_SB`, as this DSDT has no `PCI0.ISA` scope): the i8042's keyboard
//! (`\_SB.KBD_`, `PNP0303`) and mouse (`\_SB.MOU_`, `PNP0F13`; SeaBIOS drives a PS/2
//! keyboard only when the DSDT has one), the CMOS RTC (`\_SB.RTC_`, `PNP0B00`) and each
//! ISA serial port (`\_SB.COMn`, `PNP0501`), which OSes that do not probe legacy ports
//! (Windows) need.

use acpi_tables::aml::{
    Acquire, AddressSpace as AmlAddressSpace, AddressSpaceCacheable, And, Arg, BufferData, Device, EISAName,
    Field, FieldAccessType, Memory32Fixed, FieldEntry, FieldLockRule, FieldUpdateRule, If, Method, MethodCall,
    Mutex as AmlMutex, Name, Notify, OpRegion, OpRegionSpace, Package, Path, Release,
    ResourceTemplate, Return, Scope, ShiftLeft, Store, IO, ZERO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// First byte of the ACPI table area.
pub const ACPI_TABLES_START: u64 = 0xe0000;
/// One past the ACPI table area.
pub const ACPI_TABLES_END: u64 = 0xf0000;
/// Where the RSDP is.
pub const RSDP_ADDR: u64 = ACPI_TABLES_START;
/// The local APICs' MMIO base.
pub const LOCAL_APIC_ADDR: u32 = 0xfee0_0000;
/// The I/O APIC's MMIO base.
pub const IO_APIC_ADDR: u32 = 0xfec0_0000;
/// The I/O APIC's ID (QEMU's `ACPI_BUILD_IOAPIC_ID`, KVM's in-kernel IOAPIC reset value).
pub const IO_APIC_ID: u8 = 0;
/// The reset register's port (the PIIX3 reset control register).
pub const RESET_PORT: u16 = 0xcf9;
/// The value the OS writes to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x06;
/// `SLP_TYP` of S5 in `\_S5_` (what Linux puts in PM1a_CNT bits 10..12 to power off).
pub const S5_SLP_TYP: u8 = 0;
/// `SLP_TYP` of S3 in `\_S3_`.
pub const S3_SLP_TYP: u8 = 1;
/// Where the FACS is.
pub const FACS_ADDR: u64 = RSDP_ADDR + 0x40;
/// Offset of `firmware_waking_vector` (32 bits) in the FACS.
pub const FACS_WAKING_VECTOR: u64 = 12;

const OEM_ID: [u8; 6] = *b"QOMVM ";
const OEM_TABLE_ID: [u8; 8] = *b"QOMVMPC ";
const OEM_REVISION: u32 = 1;

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs present at start.
    pub cpus: u32,
    /// Their APIC IDs, by CPU index (`apic_id_from_index`); `cpus` of them.
    pub apic_ids: Vec<u32>,
    /// Base of the PM I/O block (QEMU's PIIX4 PM: 0x600).
    pub pm_io_base: u16,
    /// The SCI's ISA IRQ (9).
    pub sci_irq: u8,
    /// The 32-bit PCI memory window `[start, end)`: from the end of RAM below 4 GiB to the
    /// I/O APIC (QEMU's `pci_hole`).
    pub pci_hole: (u64, u64),
    /// The 64-bit PCI memory window `[start, end)` above RAM (QEMU's `pci_hole64`); empty
    /// when `start == end`.
    pub pci_hole64: (u64, u64),
    /// The ISA IRQs PIIX3's PIRQA..PIRQD are routed to: INTx pin `p` (0 = INTA) of slot `s`
    /// uses PIRQ `(p + s) % 4`, the swizzle of QEMU's pc board.
    pub pirq_irqs: [u32; 4],
    /// Whether `\_S3_` is declared (PIIX4 PM's `disable_s3` clear).
    pub s3: bool,
    /// `\_S4_`'s SLP_TYP, if declared (`s4_val`, unless `disable_s4`).
    pub s4: Option<u8>,
    /// The ISA `pvpanic` port, if the machine has one.
    pub pvpanic_port: Option<u16>,
    /// Whether the machine has an i8042 (its keyboard and mouse are then described).
    pub i8042: bool,
    /// The CMOS RTC's first port and ISA IRQ, if the machine has one.
    pub rtc: Option<(u16, u8)>,
    /// The ISA serial ports' first ports and ISA IRQs, by COM index (0 = COM1).
    pub serial_ports: Vec<Option<(u16, u8)>>,
    /// The ISA parallel ports' first ports and ISA IRQs, by LPT index (0 = LPT1).
    pub parallel_ports: Vec<Option<(u16, u8)>>,
    /// The ISA floppy controller, if the machine has one.
    pub fdc: Option<crate::block::fdc_isa::FdcAcpi>,
    /// The GPE0 block's port and length, if the PM device has one.
    pub gpe0_blk: Option<(u16, u8)>,
    /// ACPI PCI hotplug of the root bus (`acpi-root-pci-hotplug`): the register block's
    /// port and the slots described as hotpluggable (a bit per slot), or `None`.
    pub pci_hotplug: Option<(u16, u32)>,
    /// The HPET's register block address and event timer block ID (its capabilities'
    /// low half), if the machine has one.
    pub hpet: Option<(u64, u32)>,
}

/// Why the tables could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// No CPUs to describe.
    #[error("ACPI tables need at least one CPU")]
    NoCpus,
    /// `apic_ids` does not have one entry per CPU.
    #[error("ACPI tables: {cpus} CPUs but {apic_ids} APIC IDs")]
    CpuCountMismatch {
        /// `cpus`.
        cpus: u32,
        /// `apic_ids.len()`.
        apic_ids: usize,
    },
    /// The tables outgrow their area.
    #[error("ACPI tables need {size} bytes, {room} are reserved for them at {ACPI_TABLES_START:#x}")]
    TooLarge {
        /// Bytes needed.
        size: u64,
        /// Bytes available.
        room: u64,
    },
    /// The firmware's linker/loader commands could not be encoded.
    #[error(transparent)]
    Loader(#[from] crate::acpi::bios_linker_loader::LoaderError),
    /// A write to guest RAM failed (no RAM at the table area).
    #[error("cannot write the ACPI {table} to guest memory at {addr:#x}: {reason}")]
    GuestMemory {
        /// Table signature.
        table: &'static str,
        /// Its address.
        addr: u64,
        /// vm-memory's error.
        reason: String,
    },
}

/// AML already encoded, to sit among other terms.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// `Scope(\_SB) { Device(PCI0) }`, the i440FX host bridge (QEMU's `build_dsdt` for pc):
/// bus 0, the configuration ports, the I/O and memory windows BARs may use, and `_PRT`, the
/// GSI each slot's INTA..INTD reaches (the PIRQ routing PIIX3 is left with).
fn build_pci_host_bridge(cfg: &AcpiConfig) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A03"));
    let adr = Name::new(Path::new("_ADR"), &0u8);
    let uid = Name::new(Path::new("_UID"), &0u8);
    let bus = AmlAddressSpace::new_bus_number(0u16, 0xffu16);
    let config_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AmlAddressSpace::new_io(0u16, 0x0cf7u16, None);
    let io_high = AmlAddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let vga = AmlAddressSpace::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        0x000a_0000u32,
        0x000b_ffffu32,
        None,
    );
    let hole = AmlAddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        cfg.pci_hole.0 as u32,
        (cfg.pci_hole.1 - 1) as u32,
        None,
    );
    let hole64 = AmlAddressSpace::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        cfg.pci_hole64.0,
        cfg.pci_hole64.1.saturating_sub(1),
        None,
    );
    let mut windows: Vec<&dyn Aml> =
        vec![&bus, &config_ports, &io_low, &io_high, &vga, &hole];
    if cfg.pci_hole64.1 > cfg.pci_hole64.0 {
        windows.push(&hole64);
    }
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(windows));

    // One entry per slot and pin: Address (slot << 16 | 0xffff: any function), Pin,
    // Source (0: no link device, Source Index is a GSI), Source Index.
    let routes: Vec<(u32, u8, u8, u32)> = (0..32u32)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| {
                let pirq = (usize::from(pin) + slot as usize) % 4;
                ((slot << 16) | 0xffff, pin, 0u8, cfg.pirq_irqs[pirq])
            })
        })
        .collect();
    let entries: Vec<Package> = routes
        .iter()
        .map(|(addr, pin, source, gsi)| Package::new(vec![addr as &dyn Aml, pin, source, gsi]))
        .collect();
    let prt = Name::new(
        Path::new("_PRT"),
        &Package::new(entries.iter().map(|e| e as &dyn Aml).collect()),
    );
    let pci0 = Device::new(Path::new("PCI0"), vec![&hid, &adr, &uid, &crs, &prt]);
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&pci0]))
}

/// ACPI PCI hotplug of the root bus (QEMU's `build_piix4_pci_hotplug` and the slots of
/// `build_append_pci_bus_devices`): in `\_SB.PCI0`, the register block at `base`, `PCEJ`
/// (eject a slot), a device `Sxx` with `_SUN` and `_EJ0` per hotpluggable slot, `DVNT`
/// (notify the slots whose bits are set) and `PCNT` (device check for PCIU, eject request
/// for PCID); `\_GPE._E01` runs `PCNT` when the block raises GPE0 bit 1.
fn build_pci_hotplug(base: u16, slots: u32) -> Vec<u8> {
    let dword_field = |region: &str, names: &[&str]| {
        Field::new(
            Path::new(region),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            names
                .iter()
                .map(|n| FieldEntry::Named(n.as_bytes().try_into().expect("4-byte names"), 32))
                .collect(),
        )
    };
    let (up_port, ej_port, sel_port) = (u32::from(base), u32::from(base) + 8, u32::from(base) + 0x10);
    let pcst = OpRegion::new(Path::new("PCST"), OpRegionSpace::SystemIO, &up_port, &8u8);
    let pcst_fields = dword_field("PCST", &["PCIU", "PCID"]);
    let sej = OpRegion::new(Path::new("SEJ_"), OpRegionSpace::SystemIO, &ej_port, &4u8);
    let sej_fields = dword_field("SEJ_", &["B0EJ"]);
    let bnmr = OpRegion::new(Path::new("BNMR"), OpRegionSpace::SystemIO, &sel_port, &4u8);
    let bnmr_fields = dword_field("BNMR", &["BNUM"]);
    let blck = AmlMutex::new(Path::new("BLCK"), 0);
    let pcej = RawAml(aml_bytes(&Method::new(
        Path::new("PCEJ"),
        2,
        false,
        vec![
            &Acquire::new(Path::new("BLCK"), 0xffff),
            &Store::new(&Path::new("BNUM"), &Arg(0)),
            &Store::new(&Path::new("B0EJ"), &ShiftLeft::new(&ZERO, &1u8, &Arg(1))),
            &Release::new(Path::new("BLCK")),
            &Return::new(&0u8),
        ],
    )));
    let bsel = Name::new(Path::new("BSEL"), &crate::acpi::pcihp::ROOT_BSEL);
    let slot_list: Vec<u32> = (0..32).filter(|s| slots & (1 << s) != 0).collect();
    let names: Vec<String> = slot_list
        .iter()
        .map(|slot| format!("S{:02X}_", slot << 3))
        .collect();
    let suns: Vec<Name> = slot_list
        .iter()
        .map(|slot| Name::new(Path::new("_SUN"), slot))
        .collect();
    let adrs: Vec<Name> = slot_list
        .iter()
        .map(|slot| Name::new(Path::new("_ADR"), &(slot << 16)))
        .collect();
    let ej0 = RawAml(aml_bytes(&Method::new(
        Path::new("_EJ0"),
        1,
        false,
        vec![&MethodCall::new(
            Path::new("PCEJ"),
            vec![&Path::new("BSEL"), &Path::new("_SUN")],
        )],
    )));
    let devices: Vec<Device> = (0..slot_list.len())
        .map(|i| Device::new(Path::new(&names[i]), vec![&suns[i], &adrs[i], &ej0]))
        .collect();
    let masks: Vec<u32> = slot_list.iter().map(|slot| 1 << slot).collect();
    let tests: Vec<And> = masks.iter().map(|m| And::new(&ZERO, &Arg(0), m)).collect();
    let paths: Vec<Path> = names.iter().map(|n| Path::new(n)).collect();
    let notifies: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &Arg(1))).collect();
    let ifs: Vec<If> = (0..slot_list.len())
        .map(|i| If::new(&tests[i], vec![&notifies[i]]))
        .collect();
    let dvnt = Method::new(
        Path::new("DVNT"),
        2,
        false,
        ifs.iter().map(|i| i as &dyn Aml).collect(),
    );
    let pcnt = RawAml(aml_bytes(&Method::new(
        Path::new("PCNT"),
        0,
        false,
        vec![
            &Store::new(&Path::new("BNUM"), &Path::new("BSEL")),
            &MethodCall::new(Path::new("DVNT"), vec![&Path::new("PCIU"), &1u8]),
            &MethodCall::new(Path::new("DVNT"), vec![&Path::new("PCID"), &3u8]),
        ],
    )));
    let mut children: Vec<&dyn Aml> = vec![
        &pcst,
        &pcst_fields,
        &sej,
        &sej_fields,
        &bnmr,
        &bnmr_fields,
        &blck,
        &pcej,
        &bsel,
    ];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    children.push(&dvnt);
    children.push(&pcnt);
    let mut out = aml_bytes(&Scope::new(Path::new("\\_SB_.PCI0"), children));
    out.extend(aml_bytes(&Scope::new(
        Path::new("\\_GPE"),
        vec![&Method::new(
            Path::new("_E01"),
            0,
            false,
            vec![
                &Acquire::new(Path::new("\\_SB_.PCI0.BLCK"), 0xffff),
                &MethodCall::new(Path::new("\\_SB_.PCI0.PCNT"), vec![]),
                &Release::new(Path::new("\\_SB_.PCI0.BLCK")),
            ],
        )],
    )));
    out
}

/// `\_SB.PEVT`, the ISA pvpanic device (QEMU's `build_pvpanic_isa_aml`, without the
/// `RDPT`/`WRPT` methods no OS driver calls).
fn build_pvpanic(port: u16) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"QEMU0001");
    let io = IO::new(port, port, 1, 1);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io]));
    // Present, enabled, functioning; not shown in the UI.
    let sta = Name::new(Path::new("_STA"), &0x0bu8);
    let dev = Device::new(Path::new("PEVT"), vec![&hid, &crs, &sta]);
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&dev]))
}

/// `\_SB.RTC_` (`PNP0B00`), the CMOS RTC (QEMU's `rtc_build_aml`: eight ports claimed,
/// as on PC chipsets, though only the first two answer; IRQ 8). Linux's rtc_cmos then
/// binds to it as a PNP device.
fn build_rtc(base: u16, irq: u8) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0B00"));
    let io = IO::new(base, base, 1, 8);
    let irq = IrqNoFlags(irq);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &irq]));
    let dev = Device::new(Path::new("RTC_"), vec![&hid, &crs]);
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&dev]))
}

/// `\_SB.COMn` (`PNP0501`, `_UID` n) for each ISA serial port (QEMU's
/// `serial_isa_build_aml`): how OSes that do not probe legacy ports (Windows) find them.
fn build_serial_ports(ports: &[Option<(u16, u8)>]) -> Vec<u8> {
    build_isa_ports(ports, "PNP0501", "COM", 0)
}

/// `\_SB.LPTn` (`PNP0400`, `_UID` n) for each ISA parallel port (QEMU's
/// `parallel_isa_build_aml`).
fn build_parallel_ports(ports: &[Option<(u16, u8)>]) -> Vec<u8> {
    build_isa_ports(ports, "PNP0400", "LPT", 8)
}

/// A device `\_SB.{prefix}n` of `hid` (`_UID` n, present) for each of eight-port ISA
/// `ports` (index n - 1): its ports (aligned to `align`) and IRQ.
fn build_isa_ports(ports: &[Option<(u16, u8)>], hid: &str, prefix: &str, align: u8) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new(hid));
    let sta = Name::new(Path::new("_STA"), &0x0fu8);
    let mut out = Vec::new();
    for (index, (base, irq)) in ports
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| (i, p)))
    {
        let number = index as u8 + 1;
        let uid = Name::new(Path::new("_UID"), &number);
        let io = IO::new(base, base, align, 8);
        let irq = IrqNoFlags(irq);
        let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &irq]));
        let name = format!("{prefix}{number}");
        let dev = Device::new(Path::new(&name), vec![&hid, &uid, &sta, &crs]);
        out.extend(aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&dev])));
    }
    out
}

/// `\_SB.FDC0` (`PNP0700`), the floppy controller (QEMU's `build_fdc_aml`): its ports,
/// IRQ and DMA channel, `_FDE` (which drives are present) and a `FLPA`/`FLPB` with the
/// drive's `_FDI` (its limits, and the parameters SeaBIOS reports for INT 13h AH=08h)
/// for each drive.
fn build_fdc(fdc: &crate::block::fdc_isa::FdcAcpi) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0700"));
    let ctl = IO::new(fdc.iobase + 2, fdc.iobase + 2, 0, 4);
    let dir = IO::new(fdc.iobase + 7, fdc.iobase + 7, 0, 1);
    let irq = IrqNoFlags(fdc.irq);
    let dma = Dma8(fdc.dma);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&ctl, &dir, &irq, &dma]));
    // Drives 0-3 present (1) or not (0), then the tape: 2, never present.
    let mut fde = Vec::with_capacity(20);
    for unit in 0..4 {
        let present = fdc.drives.get(unit).is_some_and(Option::is_some);
        fde.extend_from_slice(&u32::from(present).to_le_bytes());
    }
    fde.extend_from_slice(&2u32.to_le_bytes());
    let fde = Name::new(Path::new("_FDE"), &BufferData::new(fde));
    let drives: Vec<Vec<u8>> = fdc
        .drives
        .iter()
        .enumerate()
        .filter_map(|(unit, t)| t.map(|t| (unit, t)))
        .map(|(unit, t)| {
            let (c, h, s) = t.max_chs();
            let values: [u8; 16] = [
                unit as u8, t.cmos(), c, s, h,
                // disk_specify_1/2, motor wait, sector size, EOT, gap, DTL, format gap,
                // fill byte, head settle, motor start: SeaBIOS's constants.
                0xaf, 0x02, 0x25, 0x02, 0x12, 0x1b, 0xff, 0x6c, 0xf6, 0x0f, 0x08,
            ];
            let fdi = Package::new(values.iter().map(|v| v as &dyn Aml).collect());
            let adr = Name::new(Path::new("_ADR"), &(unit as u8));
            let fdi = Name::new(Path::new("_FDI"), &fdi);
            let name = format!("FLP{}", (b'A' + unit as u8) as char);
            aml_bytes(&Device::new(Path::new(&name), vec![&adr, &fdi]))
        })
        .collect();
    let raw: Vec<RawAml> = drives.into_iter().map(RawAml).collect();
    let mut children: Vec<&dyn Aml> = vec![&hid, &crs];
    children.extend(raw.iter().map(|r| r as &dyn Aml));
    children.push(&fde);
    let dev = Device::new(Path::new("FDC0"), children);
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&dev]))
}

/// A DMA descriptor of an 8-bit ISA channel (ACPI's `DMA (Compatibility, NotBusMaster,
/// Transfer8)`); `acpi_tables` has none.
struct Dma8(u8);

impl Aml for Dma8 {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        // Small resource item 0x05 (DMA), 2 bytes: the channel mask and the flags (all
        // zero: compatibility timing, not a bus master, 8-bit transfers).
        sink.byte(0x2a);
        sink.byte(1u8 << (self.0 & 7));
        sink.byte(0);
    }
}

/// A small IRQ descriptor without flags (ACPI's `IRQNoFlags`: edge triggered, active
/// high), as QEMU describes the i8042's interrupts; `acpi_tables` has only the extended
/// form.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        // Small resource item 0x04 (IRQ), 2 bytes: the IRQ mask.
        sink.byte(0x22);
        sink.word(1u16 << (self.0 & 15));
    }
}

/// `\_SB.KBD_` (`PNP0303`: ports 0x60 and 0x64, IRQ 1) and `\_SB.MOU_` (`PNP0F13`: IRQ
/// 12), the i8042's keyboard and mouse (QEMU's `i8042_build_aml`, under `\_SB.PCI0.ISA`
/// there). SeaBIOS sets its PS/2 keyboard up only when the DSDT has a `PNP0303`, and
/// Linux's i8042 driver finds the controller through them.
fn build_i8042() -> Vec<u8> {
    let sta = Name::new(Path::new("_STA"), &0x0fu8);
    let kbd_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0303"));
    let data = IO::new(0x60, 0x60, 1, 1);
    let cmd = IO::new(0x64, 0x64, 1, 1);
    let irq1 = IrqNoFlags(1);
    let kbd_crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&data, &cmd, &irq1]),
    );
    let kbd = Device::new(Path::new("KBD_"), vec![&kbd_hid, &sta, &kbd_crs]);
    let mou_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0F13"));
    let irq12 = IrqNoFlags(12);
    let mou_crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&irq12]));
    let mou = Device::new(Path::new("MOU_"), vec![&mou_hid, &sta, &mou_crs]);
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&kbd, &mou]))
}

/// `\_SB.HPET` (`PNP0103`), the HPET's register block (QEMU's `build_hpet_aml`, with a
/// constant `_STA`: the block is there whenever it is described). Linux finds the timer
/// through the `HPET` table; the device claims the block's addresses.
fn build_hpet_device(base: u64) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0103"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    let sta = Name::new(Path::new("_STA"), &0x0fu8);
    let block = Memory32Fixed::new(false, base as u32, HPET_BLOCK_LEN);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&block]));
    let dev = Device::new(Path::new("HPET"), vec![&hid, &uid, &sta, &crs]);
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&dev]))
}

/// Size of the HPET's register block.
const HPET_BLOCK_LEN: u32 = 0x400;

/// The `HPET` table (revision 1; QEMU's `build_hpet`): the timer block's ID and address,
/// HPET number 0, no minimum periodic tick, no page protection.
fn build_hpet_table(base: u64, block_id: u32) -> Vec<u8> {
    let mut hpet = Sdt::new(*b"HPET", 56, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    hpet.write_u32(36, block_id);
    // Generic address: system memory, 64-bit address at 44.
    hpet.write_u8(40, 0);
    hpet.write_u64(44, base);
    hpet.as_slice().to_vec()
}

/// The DSDT: the sleep states, processors, the PCI host bridge and ISA devices.
fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let state = |name: &str, slp_typ: u8| {
        aml_bytes(&Name::new(
            Path::new(name),
            &Package::new(vec![&slp_typ, &slp_typ, &0u8, &0u8]),
        ))
    };
    let hid = Name::new(Path::new("_HID"), &"ACPI0007");
    let uids: Vec<Name> = (0..cfg.cpus)
        .map(|i| Name::new(Path::new("_UID"), &i))
        .collect();
    let cpus: Vec<Device> = uids
        .iter()
        .enumerate()
        .map(|(i, uid)| {
            Device::new(
                Path::new(&format!("C{i:03X}")),
                vec![&hid as &dyn Aml, uid as &dyn Aml],
            )
        })
        .collect();
    let sb = Scope::new(
        Path::new("\\_SB_"),
        cpus.iter().map(|d| d as &dyn Aml).collect(),
    );
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    if cfg.s3 {
        dsdt.append_slice(&state("_S3_", S3_SLP_TYP));
    }
    if let Some(s4) = cfg.s4 {
        dsdt.append_slice(&state("_S4_", s4));
    }
    dsdt.append_slice(&state("_S5_", S5_SLP_TYP));
    dsdt.append_slice(&aml_bytes(&sb));
    dsdt.append_slice(&build_pci_host_bridge(cfg));
    if let Some((base, slots)) = cfg.pci_hotplug {
        dsdt.append_slice(&build_pci_hotplug(base, slots));
    }
    if let Some(port) = cfg.pvpanic_port {
        dsdt.append_slice(&build_pvpanic(port));
    }
    if cfg.i8042 {
        dsdt.append_slice(&build_i8042());
    }
    if let Some((base, irq)) = cfg.rtc {
        dsdt.append_slice(&build_rtc(base, irq));
    }
    dsdt.append_slice(&build_serial_ports(&cfg.serial_ports));
    dsdt.append_slice(&build_parallel_ports(&cfg.parallel_ports));
    if let Some(fdc) = &cfg.fdc {
        dsdt.append_slice(&build_fdc(fdc));
    }
    if let Some((base, _)) = cfg.hpet {
        dsdt.append_slice(&build_hpet_device(base));
    }
    dsdt.as_slice().to_vec()
}

/// The FADT (revision 6.5) of a legacy PC with the PM block at `pm_io_base`.
fn build_fadt(cfg: &AcpiConfig, facs: u64, dsdt: u64) -> Vec<u8> {
    let io = |bits: u8, access: AccessSize, port: u64| {
        GAS::new(AddressSpace::SystemIo, bits, 0, access, port)
    };
    let base = u64::from(cfg.pm_io_base);
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_32(facs as u32)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::RtcS4)
        .flag(Flags::ResetRegSup);
    // Both DSDT pointers, equal (old parsers read the 32-bit one).
    fadt.dsdt = (dsdt as u32).into();
    fadt.sci_int = u16::from(cfg.sci_irq).into();
    fadt.pm1a_evt_blk = u32::from(cfg.pm_io_base).into();
    fadt.pm1a_cnt_blk = (u32::from(cfg.pm_io_base) + 4).into();
    fadt.pm_tmr_blk = (u32::from(cfg.pm_io_base) + 8).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.pm_tmr_len = 4;
    // C2 and C3 not supported: only C1 (HLT).
    fadt.p_lvl2_lat = 0xfff.into();
    fadt.p_lvl3_lat = 0xfff.into();
    // The CMOS century register.
    fadt.century = 0x32;
    // IA-PC boot architecture: LEGACY_DEVICES | 8042 (as QEMU's pc).
    fadt.iapc_boot_arch = 0x0003.into();
    fadt.reset_reg = io(8, AccessSize::ByteAccess, u64::from(RESET_PORT));
    fadt.reset_value = RESET_VALUE;
    fadt.x_pm1a_evt_blk = io(32, AccessSize::Undefined, base);
    fadt.x_pm1a_cnt_blk = io(16, AccessSize::Undefined, base + 4);
    fadt.x_pm_tmr_blk = io(32, AccessSize::Undefined, base + 8);
    if let Some((gpe0, len)) = cfg.gpe0_blk {
        fadt.gpe0_blk = u32::from(gpe0).into();
        fadt.gpe0_blk_len = len;
        fadt.x_gpe0_blk = io(len * 8, AccessSize::Undefined, u64::from(gpe0));
    }
    aml_bytes(&fadt.finalize())
}

/// The MADT: one local APIC (or x2APIC) per CPU, the I/O APIC, interrupt source overrides
/// for IRQ0 and the SCI, LINT1 as NMI.
fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut x2apic = false;
    for (uid, &apic_id) in cfg.apic_ids.iter().enumerate() {
        if apic_id < 0xff && uid < 0xff {
            // Processor Local APIC: type, length, processor UID, APIC ID, flags (enabled).
            entries.extend_from_slice(&[0, 8, uid as u8, apic_id as u8, 1, 0, 0, 0]);
        } else {
            // Processor Local x2APIC: type, length, reserved, x2APIC ID, flags, UID.
            x2apic = true;
            entries.extend_from_slice(&[9, 16, 0, 0]);
            entries.extend_from_slice(&apic_id.to_le_bytes());
            entries.extend_from_slice(&1u32.to_le_bytes());
            entries.extend_from_slice(&(uid as u32).to_le_bytes());
        }
    }
    // I/O APIC: type, length, ID, reserved, address, GSI base.
    entries.extend_from_slice(&[1, 12, IO_APIC_ID, 0]);
    entries.extend_from_slice(&IO_APIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt Source Overrides: type, length, bus (ISA), source IRQ, GSI, flags.
    let iso = |entries: &mut Vec<u8>, irq: u8, gsi: u32, flags: u16| {
        entries.extend_from_slice(&[2, 10, 0, irq]);
        entries.extend_from_slice(&gsi.to_le_bytes());
        entries.extend_from_slice(&flags.to_le_bytes());
    };
    // The PIT's IRQ0 is wired to pin 2; flags 0 = conforms to the ISA bus (edge, high).
    iso(&mut entries, 0, 2, 0);
    // The SCI: level triggered (bits 2-3 = 3), active high (bits 0-1 = 1).
    iso(
        &mut entries,
        cfg.sci_irq,
        u32::from(cfg.sci_irq),
        0x000d,
    );
    // PCI interrupts: level triggered, active high on KVM's I/O APIC (QEMU's overrides for
    // PCI_ISA_IRQ_MASK).
    let mut pci_irqs: Vec<u32> = cfg.pirq_irqs.to_vec();
    pci_irqs.sort_unstable();
    pci_irqs.dedup();
    for irq in pci_irqs.into_iter().filter(|&i| i != u32::from(cfg.sci_irq) && i < 16) {
        iso(&mut entries, irq as u8, irq, 0x000d);
    }
    // Local APIC NMI: type, length, all processors, flags (conforms), LINT1.
    entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    if x2apic {
        // Local x2APIC NMI: type, length, flags, all processors, LINT1, reserved.
        entries.extend_from_slice(&[0x0a, 12, 0, 0]);
        entries.extend_from_slice(&u32::MAX.to_le_bytes());
        entries.extend_from_slice(&[1, 0, 0, 0]);
    }

    let mut madt = Sdt::new(*b"APIC", 44, 3, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LOCAL_APIC_ADDR);
    // PCAT_COMPAT: dual 8259s are present (Linux masks them when it uses the I/O APIC).
    madt.write_u32(40, 1);
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

impl AcpiConfig {
    /// One APIC ID per CPU, and at least one CPU.
    fn check(&self) -> Result<(), AcpiError> {
        if self.apic_ids.len() != self.cpus as usize {
            return Err(AcpiError::CpuCountMismatch {
                cpus: self.cpus,
                apic_ids: self.apic_ids.len(),
            });
        }
        if self.cpus == 0 {
            return Err(AcpiError::NoCpus);
        }
        Ok(())
    }
}

/// Builds the pc machine's ACPI tables into `ram` at [`ACPI_TABLES_START`] and returns the
/// RSDP's address ([`RSDP_ADDR`]).
pub fn build_acpi_tables(ram: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    cfg.check()?;

    let facs_addr = FACS_ADDR;
    let dsdt_addr = facs_addr + 0x40;
    let facs = aml_bytes(&FACS::new());
    let dsdt = build_dsdt(cfg);
    let fadt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let fadt = build_fadt(cfg, facs_addr, dsdt_addr);
    let madt_addr = align16(fadt_addr + fadt.len() as u64);
    let madt = build_madt(cfg);
    let hpet = cfg.hpet.map(|(base, id)| build_hpet_table(base, id));
    let hpet_addr = align16(madt_addr + madt.len() as u64);
    let xsdt_addr = align16(hpet_addr + hpet.as_ref().map_or(0, |t| t.len() as u64));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if hpet.is_some() {
        xsdt.add_entry(hpet_addr);
    }
    let xsdt = aml_bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            size: end - ACPI_TABLES_START,
            room: ACPI_TABLES_END - ACPI_TABLES_START,
        });
    }
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (table, addr, bytes) in [
        ("RSDP", RSDP_ADDR, &rsdp),
        ("FACS", facs_addr, &facs),
        ("DSDT", dsdt_addr, &dsdt),
        ("FADT", fadt_addr, &fadt),
        ("MADT", madt_addr, &madt),
        ("HPET", hpet_addr, hpet.as_ref().unwrap_or(&Vec::new())),
        ("XSDT", xsdt_addr, &xsdt),
    ] {
        ram.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::GuestMemory {
                table,
                addr,
                reason: e.to_string(),
            })?;
    }
    Ok(RSDP_ADDR)
}

/// fw_cfg file of the tables firmware places (QEMU's `ACPI_BUILD_TABLE_FILE`).
pub const ACPI_BUILD_TABLE_FILE: &str = "etc/acpi/tables";
/// fw_cfg file of the RSDP (QEMU's `ACPI_BUILD_RSDP_FILE`).
pub const ACPI_BUILD_RSDP_FILE: &str = "etc/acpi/rsdp";
/// fw_cfg file of the linker/loader commands (QEMU's `ACPI_BUILD_LOADER_FILE`).
pub const ACPI_BUILD_LOADER_FILE: &str = "etc/table-loader";

/// The tables for firmware to place (QEMU's `acpi_build` into `AcpiBuildTables`): the
/// same tables as [`build_acpi_tables`] writes for direct boot, with every pointer an
/// offset into [`ACPI_BUILD_TABLE_FILE`] that the loader commands relocate.
#[derive(Debug)]
pub struct FirmwareAcpiTables {
    /// `etc/acpi/tables`: FACS, DSDT, FADT, MADT, XSDT.
    pub tables: Vec<u8>,
    /// `etc/acpi/rsdp`.
    pub rsdp: Vec<u8>,
    /// `etc/table-loader`.
    pub loader: Vec<u8>,
}

/// Builds the tables for firmware's linker/loader (SeaBIOS allocates `etc/acpi/tables`
/// in high memory and the RSDP in the F segment, then patches and checksums them).
pub fn build_firmware_acpi_tables(cfg: &AcpiConfig) -> Result<FirmwareAcpiTables, AcpiError> {
    use crate::acpi::bios_linker_loader::{AllocZone, BiosLinker};
    cfg.check()?;
    const TABLES: &str = ACPI_BUILD_TABLE_FILE;
    const RSDP: &str = ACPI_BUILD_RSDP_FILE;
    // The FACS first: the blob is allocated 64-byte aligned, as the FACS must be.
    let facs_offset = 0u64;
    let mut tables = aml_bytes(&FACS::new());
    let place = |tables: &mut Vec<u8>, table: &[u8]| {
        tables.resize(tables.len().next_multiple_of(16), 0);
        let offset = tables.len() as u64;
        tables.extend_from_slice(table);
        offset
    };
    let dsdt_offset = place(&mut tables, &build_dsdt(cfg));
    let fadt = build_fadt(cfg, facs_offset, dsdt_offset);
    let fadt_len = fadt.len() as u32;
    let fadt_offset = place(&mut tables, &fadt);
    let madt_offset = place(&mut tables, &build_madt(cfg));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_offset);
    xsdt.add_entry(madt_offset);
    if let Some((base, id)) = cfg.hpet {
        xsdt.add_entry(place(&mut tables, &build_hpet_table(base, id)));
    }
    let entries = xsdt_entry_count(cfg);
    let xsdt = aml_bytes(&xsdt);
    let xsdt_len = xsdt.len() as u32;
    let xsdt_offset = place(&mut tables, &xsdt);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_offset));

    let mut linker = BiosLinker::default();
    linker.alloc(TABLES, 64, AllocZone::High)?;
    let fadt_at = fadt_offset as u32;
    // FADT: FIRMWARE_CTRL (36), DSDT (40), X_DSDT (140).
    linker.add_pointer(TABLES, fadt_at + 36, 4, TABLES)?;
    linker.add_pointer(TABLES, fadt_at + 40, 4, TABLES)?;
    linker.add_pointer(TABLES, fadt_at + 140, 8, TABLES)?;
    linker.add_checksum(TABLES, fadt_at, fadt_len, fadt_at + 9)?;
    let xsdt_at = xsdt_offset as u32;
    for entry in 0..entries {
        linker.add_pointer(TABLES, xsdt_at + 36 + 8 * entry, 8, TABLES)?;
    }
    linker.add_checksum(TABLES, xsdt_at, xsdt_len, xsdt_at + 9)?;
    // The RSDP: found by scanning the F segment, pointing at the XSDT; its checksum
    // covers the first 20 bytes, its extended checksum all 36.
    linker.alloc(RSDP, 16, AllocZone::Fseg)?;
    linker.add_pointer(RSDP, 24, 8, TABLES)?;
    linker.add_checksum(RSDP, 0, 20, 8)?;
    linker.add_checksum(RSDP, 0, 36, 32)?;
    Ok(FirmwareAcpiTables {
        tables,
        rsdp,
        loader: linker.into_bytes(),
    })
}

/// The XSDT's entries: FADT, MADT, and the HPET table if there is one.
fn xsdt_entry_count(cfg: &AcpiConfig) -> u32 {
    2 + u32::from(cfg.hpet.is_some())
}

fn align16(addr: u64) -> u64 {
    addr.next_multiple_of(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::i386::x86_cpu::apic_id_from_index;

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn config(cpus: u32, cores: u32) -> AcpiConfig {
        AcpiConfig {
            cpus,
            apic_ids: (0..cpus).map(|i| apic_id_from_index(i, cores, 1)).collect(),
            pm_io_base: 0x600,
            sci_irq: 9,
            pci_hole: (0x0800_0000, 0xfec0_0000),
            pci_hole64: (0x1_0000_0000, 0x1_8000_0000),
            pirq_irqs: [10, 10, 11, 11],
            s3: true,
            s4: Some(2),
            pvpanic_port: None,
            i8042: true,
            rtc: Some((0x70, 8)),
            serial_ports: vec![Some((0x3f8, 4)), None, Some((0x3e8, 4))],
            parallel_ports: vec![Some((0x378, 7))],
            fdc: None,
            gpe0_blk: Some((0xafe0, 4)),
            pci_hotplug: Some((0xae00, !0b111)),
            hpet: Some((0xfed0_0000, 0x8086_a201)),
        }
    }

    fn bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// A table by address, its checksum checked.
    fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let head = bytes(mem, addr, 36);
        assert_eq!(&head[..4], signature, "table at {addr:#x}");
        let t = bytes(mem, addr, u32_at(&head, 4) as usize);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(signature));
        t
    }

    /// Linux's `acpi_find_root_pointer`: "RSD PTR " on a 16-byte boundary in the BIOS area.
    fn find_rsdp(mem: &GuestMemoryMmap) -> u64 {
        let area = bytes(mem, 0xe0000, 0x20000);
        (0..area.len())
            .step_by(16)
            .find(|&o| &area[o..o + 8] == b"RSD PTR " && sum(&area[o..o + 20]) == 0)
            .map(|o| 0xe0000 + o as u64)
            .expect("an RSDP in 0xe0000..0x100000")
    }

    struct Tables {
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
        facs: Vec<u8>,
        hpet: Option<Vec<u8>>,
    }

    fn walk(mem: &GuestMemoryMmap) -> Tables {
        let rsdp_addr = find_rsdp(mem);
        let rsdp = bytes(mem, rsdp_addr, 36);
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36);
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        let xsdt = table(mem, u64_at(&rsdp, 24), b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert!(matches!(entries.len(), 2 | 3), "{entries:x?}");
        let fadt = table(mem, entries[0], b"FACP");
        let madt = table(mem, entries[1], b"APIC");
        let hpet = entries.get(2).map(|&at| table(mem, at, b"HPET"));
        let dsdt_addr = u64_at(&fadt, 140);
        assert_eq!(u64::from(u32_at(&fadt, 40)), dsdt_addr, "DSDT and X_DSDT agree");
        let dsdt = table(mem, dsdt_addr, b"DSDT");
        let facs = bytes(mem, u64::from(u32_at(&fadt, 36)), 64);
        for &addr in [rsdp_addr, u64_at(&rsdp, 24), dsdt_addr].iter().chain(&entries) {
            assert!((ACPI_TABLES_START..ACPI_TABLES_END).contains(&addr));
        }
        Tables {
            fadt,
            madt,
            dsdt,
            facs,
            hpet,
        }
    }

    /// The MADT's entries as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut o = 44;
        while o < madt.len() {
            let len = madt[o + 1] as usize;
            out.push((madt[o], madt[o..o + len].to_vec()));
            o += len;
        }
        assert_eq!(o, madt.len());
        out
    }

    /// Runs `etc/table-loader` as SeaBIOS's `romfile_loader_execute` does, placing the
    /// RSDP at 0xe0000 and the tables at 0xe1000, and writes the result into `mem`.
    fn run_loader(mem: &GuestMemoryMmap, fw: &FirmwareAcpiTables) {
        let name = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8(b[..end].to_vec()).unwrap()
        };
        let mut files: std::collections::BTreeMap<String, (u64, Vec<u8>)> = Default::default();
        for cmd in fw.loader.chunks(128) {
            match u32_at(cmd, 0) {
                1 => {
                    let file = name(&cmd[4..60]);
                    let (base, data) = match file.as_str() {
                        ACPI_BUILD_TABLE_FILE => (0xe1000, fw.tables.clone()),
                        ACPI_BUILD_RSDP_FILE => (0xe0000, fw.rsdp.clone()),
                        other => panic!("allocate of unknown file {other}"),
                    };
                    assert_eq!(base % u64::from(u32_at(cmd, 60)), 0);
                    files.insert(file, (base, data));
                }
                2 => {
                    let src_base = files[&name(&cmd[60..116])].0;
                    let (offset, size) = (u32_at(cmd, 116) as usize, cmd[120] as usize);
                    let dst = &mut files.get_mut(&name(&cmd[4..60])).unwrap().1;
                    let mut value = [0u8; 8];
                    value[..size].copy_from_slice(&dst[offset..offset + size]);
                    let patched = u64::from_le_bytes(value) + src_base;
                    dst[offset..offset + size].copy_from_slice(&patched.to_le_bytes()[..size]);
                }
                3 => {
                    let data = &mut files.get_mut(&name(&cmd[4..60])).unwrap().1;
                    let (at, start, len) = (
                        u32_at(cmd, 60) as usize,
                        u32_at(cmd, 64) as usize,
                        u32_at(cmd, 68) as usize,
                    );
                    let s = sum(&data[start..start + len]);
                    data[at] = data[at].wrapping_sub(s);
                }
                other => panic!("unknown loader command {other}"),
            }
        }
        for (base, data) in files.values() {
            mem.write_slice(data, GuestAddress(*base)).unwrap();
        }
    }

    #[test]
    fn firmware_places_the_same_tables_through_the_loader() {
        let cfg = config(4, 3);
        let direct = ram();
        build_acpi_tables(&direct, &cfg).unwrap();
        let expected = walk(&direct);
        let mem = ram();
        let fw = build_firmware_acpi_tables(&cfg).unwrap();
        run_loader(&mem, &fw);
        assert_eq!(find_rsdp(&mem), 0xe0000);
        let t = walk(&mem);
        assert_eq!(t.madt, expected.madt);
        assert_eq!(t.dsdt, expected.dsdt);
        assert_eq!(t.hpet, expected.hpet);
        assert!(t.hpet.is_some());
        assert_eq!(&t.facs[..4], b"FACS");
        assert_eq!(u32_at(&t.fadt, 36), 0xe1000, "FACS first, 64-byte aligned");
        assert_eq!(&t.fadt[10..16], b"QOMVM ");
    }

    #[test]
    fn tables_are_found_and_checksummed() {
        let mem = ram();
        let cfg = config(4, 3);
        let rsdp = build_acpi_tables(&mem, &cfg).unwrap();
        assert_eq!(rsdp, 0xe0000);
        assert_eq!(find_rsdp(&mem), rsdp);
        let t = walk(&mem);
        assert_eq!(t.fadt[8], 6, "FADT revision");
        assert_eq!(t.fadt.len(), 276);
        assert_eq!(&t.facs[..4], b"FACS");
        assert_eq!(u32_at(&t.facs, 4), 64);
        assert_eq!(u32_at(&t.fadt, 36) % 64, 0, "FACS 64-byte aligned");
    }

    #[test]
    fn fadt_describes_the_pm_block() {
        let mem = ram();
        let cfg = AcpiConfig {
            pm_io_base: 0xb000,
            ..config(1, 1)
        };
        build_acpi_tables(&mem, &cfg).unwrap();
        let f = walk(&mem).fadt;
        assert_eq!(u16_at(&f, 46), 9, "SCI_INT");
        assert_eq!(u32_at(&f, 48), 0, "no SMI_CMD: already in ACPI mode");
        assert_eq!(u32_at(&f, 56), 0xb000, "PM1a_EVT_BLK");
        assert_eq!(u32_at(&f, 64), 0xb004, "PM1a_CNT_BLK");
        assert_eq!(u32_at(&f, 76), 0xb008, "PM_TMR_BLK");
        assert_eq!(&f[88..92], &[4, 2, 0, 4], "PM1_EVT/PM1_CNT/PM2_CNT/PM_TMR lengths");
        assert_eq!(u16_at(&f, 109), 3, "IAPC_BOOT_ARCH: legacy devices, 8042");
        let flags = u32_at(&f, 112);
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED_ACPI");
        assert_eq!(flags & (1 << 8), 0, "24-bit PM timer");
        // RESET_REG: system I/O, 8 bits, byte access, port 0xcf9; value 6.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&f, 120), 0xcf9);
        assert_eq!(f[128], 6);
        // X_PM1a_EVT_BLK, X_PM1a_CNT_BLK, X_PM_TMR_BLK: system I/O GAS at the same ports.
        assert_eq!((f[148], f[149], u64_at(&f, 152)), (1, 32, 0xb000));
        assert_eq!((f[172], f[173], u64_at(&f, 176)), (1, 16, 0xb004));
        assert_eq!((f[208], f[209], u64_at(&f, 212)), (1, 32, 0xb008));
    }

    #[test]
    fn madt_lists_each_cpu_and_the_io_apic() {
        let mem = ram();
        let cfg = config(6, 3);
        assert_eq!(cfg.apic_ids, [0, 1, 2, 4, 5, 6]);
        build_acpi_tables(&mem, &cfg).unwrap();
        let madt = walk(&mem).madt;
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        let entries = madt_entries(&madt);
        let lapics: Vec<(u8, u8, u32)> = entries
            .iter()
            .filter(|(t, _)| *t == 0)
            .map(|(_, e)| (e[2], e[3], u32_at(e, 4)))
            .collect();
        assert_eq!(
            lapics,
            cfg.apic_ids
                .iter()
                .enumerate()
                .map(|(i, &id)| (i as u8, id as u8, 1))
                .collect::<Vec<_>>()
        );
        let ioapic: Vec<_> = entries.iter().filter(|(t, _)| *t == 1).collect();
        assert_eq!(ioapic.len(), 1);
        let e = &ioapic[0].1;
        assert_eq!((e[2], u32_at(e, 4), u32_at(e, 8)), (0, 0xfec0_0000, 0));
        let isos: Vec<(u8, u32, u16)> = entries
            .iter()
            .filter(|(t, _)| *t == 2)
            .map(|(_, e)| (e[3], u32_at(e, 4), u16_at(e, 8)))
            .collect();
        assert_eq!(isos, [(0, 2, 0), (9, 9, 0xd), (10, 10, 0xd), (11, 11, 0xd)]);
        let nmis: Vec<_> = entries.iter().filter(|(t, _)| *t == 4).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!(nmis[0].1, [4, 6, 0xff, 0, 0, 1]);
        assert!(entries.iter().all(|(t, _)| *t != 9), "no x2APIC entries");
    }

    #[test]
    fn large_apic_ids_use_x2apic_entries() {
        let mem = ram();
        let cfg = config(300, 1);
        build_acpi_tables(&mem, &cfg).unwrap();
        let t = walk(&mem);
        let entries = madt_entries(&t.madt);
        assert_eq!(entries.iter().filter(|(t, _)| *t == 0).count(), 255);
        let x2: Vec<(u32, u32)> = entries
            .iter()
            .filter(|(t, _)| *t == 9)
            .map(|(_, e)| (u32_at(e, 4), u32_at(e, 12)))
            .collect();
        assert_eq!(x2.len(), 45);
        assert_eq!(x2[0], (255, 255));
        assert_eq!(x2[44], (299, 299));
        assert_eq!(entries.iter().filter(|(t, _)| *t == 0x0a).count(), 1);
        // Every CPU has a processor device.
        assert!(t.dsdt.windows(4).any(|w| w == b"C12B"));
    }

    #[test]
    fn dsdt_describes_the_pci_host_bridge_windows_and_routing() {
        let mem = ram();
        build_acpi_tables(&mem, &config(1, 1)).unwrap();
        let dsdt = walk(&mem).dsdt;
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"_PRT") && has(b"_CRS"));
        // _HID: EISAID("PNP0A03") as a DWordConst.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x03]), "PNP0A03");
        // WordBusNumber 0..0xff; WordIO 0xd00..0xffff (type 1, length 0xf300).
        assert!(has(&[0x88, 0x0d, 0x00, 0x02]), "bus number window");
        assert!(has(&[0x00, 0x0d, 0xff, 0xff, 0x00, 0x00, 0x00, 0xf3]), "high I/O window");
        // The 32-bit hole as a DWordMemory from its start to just below the I/O APIC.
        assert!(has(
            &[0x00, 0x00, 0x00, 0x08, 0xff, 0xff, 0xbf, 0xfe][..]
        ));
        // Slot 4 INTA: Package(4) { 0x0004FFFF, Zero, Zero, 10 }; slot 1 INTD: PIRQA (10).
        assert!(has(&[0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x04, 0x00, 0x00, 0x00, 0x0a, 0x0a]));
        assert!(has(&[0x12, 0x0c, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x0a, 0x03, 0x00, 0x0a, 0x0a]));
    }

    #[test]
    fn dsdt_has_s5_and_processors() {
        let mem = ram();
        build_acpi_tables(&mem, &config(2, 1)).unwrap();
        let dsdt = walk(&mem).dsdt;
        assert_eq!(dsdt[8], 2, "DSDT revision 2: 64-bit integers");
        let at = dsdt
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ in the DSDT");
        // NameOp, \_S5_ at the root, Package(4) { Zero, Zero, Zero, Zero }.
        assert_eq!(dsdt[at - 1], 0x08);
        assert_eq!(&dsdt[at + 4..at + 11], &[0x12, 0x06, 4, 0, 0, 0, 0]);
        for name in [&b"_SB_"[..], b"C000", b"C001", b"ACPI0007", b"_UID"] {
            assert!(dsdt.windows(name.len()).any(|w| w == name));
        }
        assert!(!dsdt.windows(4).any(|w| w == b"C002"));
        // \_S3_ = Package(4) { One, One, Zero, Zero }, \_S4_ with s4_val 2; no pvpanic.
        let at = dsdt.windows(4).position(|w| w == b"_S3_").expect("_S3_");
        assert_eq!(&dsdt[at + 4..at + 11], &[0x12, 0x06, 4, 1, 1, 0, 0]);
        let at = dsdt.windows(4).position(|w| w == b"_S4_").expect("_S4_");
        assert_eq!(&dsdt[at + 4..at + 13], &[0x12, 0x08, 4, 0x0a, 2, 0x0a, 2, 0, 0]);
        assert!(!dsdt.windows(8).any(|w| w == b"QEMU0001"));
    }

    #[test]
    fn pci_hotplug_slots_and_the_gpe0_block_are_described_only_when_on() {
        let has = |dsdt: &[u8], name: &[u8]| dsdt.windows(name.len()).any(|w| w == name);
        let mem = ram();
        build_acpi_tables(&mem, &config(1, 1)).unwrap();
        let tables = walk(&mem);
        for name in [&b"PCEJ"[..], b"PCNT", b"DVNT", b"_E01", b"B0EJ", b"S18_", b"SF8_"] {
            assert!(has(&tables.dsdt, name), "{}", String::from_utf8_lossy(name));
        }
        // Slots 0..2 (host bridge, PIIX3, VGA) are left out.
        for name in [&b"S00_"[..], b"S08_", b"S10_"] {
            assert!(!has(&tables.dsdt, name), "{}", String::from_utf8_lossy(name));
        }
        assert_eq!(u32_at(&tables.fadt, 80), 0xafe0, "GPE0_BLK");
        assert_eq!(tables.fadt[92], 4, "GPE0_BLK_LEN");

        let mem = ram();
        let off = AcpiConfig { pci_hotplug: None, gpe0_blk: None, ..config(1, 1) };
        build_acpi_tables(&mem, &off).unwrap();
        let tables = walk(&mem);
        assert!(!has(&tables.dsdt, b"PCEJ") && !has(&tables.dsdt, b"_E01"));
        assert_eq!(u32_at(&tables.fadt, 80), 0);
    }

    #[test]
    fn disable_s3_and_s4_leave_them_out_and_pvpanic_is_described() {
        let mem = ram();
        let cfg = AcpiConfig {
            s3: false,
            s4: None,
            pvpanic_port: Some(0x505),
            ..config(1, 1)
        };
        build_acpi_tables(&mem, &cfg).unwrap();
        let dsdt = walk(&mem).dsdt;
        assert!(!dsdt.windows(4).any(|w| w == b"_S3_"));
        assert!(!dsdt.windows(4).any(|w| w == b"_S4_"));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"QEMU0001"));
        // IO(Decode16, 0x505, 0x505, 1, 1).
        assert!(dsdt
            .windows(8)
            .any(|w| w == [0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]));
    }

    #[test]
    fn the_floppy_controller_and_its_drive_are_described() {
        let mem = ram();
        let has = |dsdt: &[u8], needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        build_acpi_tables(&mem, &config(1, 1)).unwrap();
        assert!(!has(&walk(&mem).dsdt, b"FDC0"), "no controller, no FDC0");
        let fdc = crate::block::fdc_isa::FdcAcpi {
            iobase: 0x3f0,
            irq: 6,
            dma: 2,
            drives: [Some(crate::block::fdc::FloppyDriveType::Type144), None],
        };
        build_acpi_tables(&mem, &AcpiConfig { fdc: Some(fdc), ..config(1, 1) }).unwrap();
        let dsdt = walk(&mem).dsdt;
        // EISAID("PNP0700"); IO(Decode16, 0x3f2, 0x3f2, 0, 4); IO(.., 0x3f7, .., 1);
        // IRQNoFlags() {6}; DMA(Compatibility, NotBusMaster, Transfer8) {2}.
        assert!(has(&dsdt, &[0x0c, 0x41, 0xd0, 0x07, 0x00]), "PNP0700");
        assert!(has(&dsdt, &[0x47, 0x01, 0xf2, 0x03, 0xf2, 0x03, 0x00, 0x04]));
        assert!(has(&dsdt, &[0x47, 0x01, 0xf7, 0x03, 0xf7, 0x03, 0x00, 0x01]));
        assert!(has(&dsdt, &[0x22, 0x40, 0x00, 0x2a, 0x04, 0x00]), "IRQ 6, DMA 2");
        assert!(has(&dsdt, b"FLPA") && !has(&dsdt, b"FLPB"));
        // _FDE: drive A present, B..D not, the tape never.
        let fde: Vec<u8> = [1u32, 0, 0, 0, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(has(&dsdt, &fde), "_FDE");
        // ACPICA's disassembler reads the table as an OS would.
        if std::path::Path::new("/usr/bin/iasl").exists() {
            let dir = std::env::temp_dir().join(format!("qomvm-fdc-iasl-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("dsdt.dat"), &dsdt).unwrap();
            let out = std::process::Command::new("iasl")
                .args(["-d", "dsdt.dat"])
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            for line in [
                "Device (FDC0)",
                "EisaId (\"PNP0700\")",
                "IRQNoFlags ()",
                "DMA (Compatibility, NotBusMaster, Transfer8, )",
                "Device (FLPA)",
                "Name (_FDI, Package (0x10)",
                "Name (_FDE, Buffer (0x14)",
            ] {
                assert!(dsl.contains(line), "{line} in:\n{dsl}");
            }
        }
    }

    #[test]
    fn the_rtc_and_the_serial_ports_are_described() {
        let mem = ram();
        let has = |dsdt: &[u8], needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        build_acpi_tables(
            &mem,
            &AcpiConfig {
                rtc: None,
                serial_ports: Vec::new(),
                ..config(1, 1)
            },
        )
        .unwrap();
        let dsdt = walk(&mem).dsdt;
        assert!(!has(&dsdt, b"RTC_") && !has(&dsdt, b"COM"));
        build_acpi_tables(&mem, &config(1, 1)).unwrap();
        let dsdt = walk(&mem).dsdt;
        // EISAID("PNP0B00"); IO(Decode16, 0x70, 0x70, 1, 8), IRQNoFlags() {8}.
        assert!(has(&dsdt, &[0x0c, 0x41, 0xd0, 0x0b, 0x00]), "PNP0B00");
        assert!(has(
            &dsdt,
            &[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x08, 0x22, 0x00, 0x01]
        ));
        // COM1 and COM3 (the config has no COM2), each PNP0501 with its _UID and ports.
        assert!(has(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), "PNP0501");
        assert!(has(&dsdt, b"COM1") && has(&dsdt, b"COM3") && !has(&dsdt, b"COM2"));
        // _UID 3: NameOp "_UID" BytePrefix 3.
        assert!(has(&dsdt, &[0x08, b'_', b'U', b'I', b'D', 0x0a, 0x03]));
        // IO(Decode16, 0x3f8, 0x3f8, 0, 8), IRQNoFlags() {4}.
        assert!(has(
            &dsdt,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08, 0x22, 0x10, 0x00]
        ));
    }

    #[test]
    fn the_hpet_has_its_table_and_device() {
        let mem = ram();
        let has = |dsdt: &[u8], needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        build_acpi_tables(&mem, &config(1, 1)).unwrap();
        let t = walk(&mem);
        let hpet = t.hpet.expect("an HPET table");
        assert_eq!(hpet.len(), 56);
        assert_eq!(hpet[8], 1, "revision");
        assert_eq!(u32_at(&hpet, 36), 0x8086_a201, "event timer block ID");
        assert_eq!(&hpet[40..44], &[0, 0, 0, 0], "system memory");
        assert_eq!(u64_at(&hpet, 44), 0xfed0_0000);
        assert_eq!(&hpet[52..56], &[0, 0, 0, 0], "number, minimum tick, protection");
        // EISAID("PNP0103"); Memory32Fixed(ReadOnly, 0xfed00000, 0x400).
        assert!(has(&t.dsdt, &[0x0c, 0x41, 0xd0, 0x01, 0x03]), "PNP0103");
        assert!(has(
            &t.dsdt,
            &[0x86, 0x09, 0x00, 0x00, 0x00, 0x00, 0xd0, 0xfe, 0x00, 0x04, 0x00, 0x00]
        ));
        build_acpi_tables(&mem, &AcpiConfig { hpet: None, ..config(1, 1) }).unwrap();
        let t = walk(&mem);
        assert!(t.hpet.is_none() && !has(&t.dsdt, b"HPET"));
    }

    #[test]
    fn the_i8042_keyboard_and_mouse_are_described() {
        let mem = ram();
        build_acpi_tables(&mem, &AcpiConfig { i8042: false, ..config(1, 1) }).unwrap();
        let has = |dsdt: &[u8], needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(!has(&walk(&mem).dsdt, b"KBD_"));
        build_acpi_tables(&mem, &config(1, 1)).unwrap();
        let dsdt = walk(&mem).dsdt;
        for name in [&b"KBD_"[..], b"MOU_"] {
            assert!(has(&dsdt, name));
        }
        // EISAID("PNP0303") and ("PNP0F13") as DWordConsts.
        assert!(has(&dsdt, &[0x0c, 0x41, 0xd0, 0x03, 0x03]), "PNP0303");
        assert!(has(&dsdt, &[0x0c, 0x41, 0xd0, 0x0f, 0x13]), "PNP0F13");
        // IO(Decode16, 0x60, 0x60, 1, 1), IO(0x64), IRQNoFlags() {1}; IRQNoFlags() {12}.
        assert!(has(
            &dsdt,
            &[
                0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01, 0x47, 0x01, 0x64, 0x00, 0x64,
                0x00, 0x01, 0x01, 0x22, 0x02, 0x00
            ]
        ));
        assert!(has(&dsdt, &[0x22, 0x00, 0x10, 0x79]), "IRQ 12, then the end tag");
    }

    #[test]
    fn bad_configs_are_refused() {
        let mem = ram();
        let mut cfg = config(2, 1);
        cfg.apic_ids.pop();
        assert_eq!(
            build_acpi_tables(&mem, &cfg).unwrap_err().to_string(),
            "ACPI tables: 2 CPUs but 1 APIC IDs"
        );
        assert!(matches!(
            build_acpi_tables(&mem, &config(0, 1)),
            Err(AcpiError::NoCpus)
        ));
        // No RAM at the table area.
        let high = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 1 << 20)]).unwrap();
        assert!(build_acpi_tables(&high, &config(1, 1))
            .unwrap_err()
            .to_string()
            .starts_with("cannot write the ACPI RSDP to guest memory at 0xe0000"));
    }
}
