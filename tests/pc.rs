//! The pc-i440fx board on the qtest accelerator: PCI configuration mechanism #1, the
//! functions pc_init1 plugs in, reset and power-off paths, and the RAM layout.

use hw::core::machine::{machine_run_board_init, machine_state};
use hw::core::runstate::RunRequest;
use qom::ObjectRef;

fn pc(ram: u64, cpus: u32) -> ObjectRef {
    accel::init().expect("registrations are intact");
    let machine = qom::object_new("pc-i440fx-10.0-machine").unwrap();
    let ms = machine_state(&machine).unwrap();
    ms.set_ram_size(ram);
    ms.set_smp(hw::core::machine::SmpConfig {
        cpus,
        sockets: cpus,
        cores: 1,
        threads: 1,
        max_cpus: cpus,
    });
    let qtest = accel::accel_find("qtest").unwrap();
    accel::accel_init_machine(qtest, &machine).unwrap();
    machine_run_board_init(&machine).unwrap();
    machine
}

fn config_read(machine: &ObjectRef, devfn: u32, reg: u32, size: u32) -> u64 {
    let io = machine_state(machine).unwrap().system_io().clone();
    io.write(
        0xcf8,
        u64::from(0x8000_0000 | (devfn << 8) | (reg & 0xfc)),
        4,
    );
    io.read(0xcfc + u64::from(reg & 3), size)
}

fn config_write(machine: &ObjectRef, devfn: u32, reg: u32, value: u64, size: u32) {
    let io = machine_state(machine).unwrap().system_io().clone();
    io.write(
        0xcf8,
        u64::from(0x8000_0000 | (devfn << 8) | (reg & 0xfc)),
        4,
    );
    io.write(0xcfc + u64::from(reg & 3), value, size);
}

fn qtest_irq(machine: &ObjectRef, gsi: u32) -> bool {
    let ops = machine_state(machine).unwrap().accel_ops().unwrap();
    ops.as_any()
        .downcast_ref::<accel::qtest::QtestOps>()
        .unwrap()
        .irq_level(gsi)
}

#[test]
fn the_board_has_qemus_pci_functions() {
    let m = pc(128 << 20, 1);
    assert_eq!(config_read(&m, 0, 0, 4), 0x1237_8086, "00.0 i440FX");
    assert_eq!(config_read(&m, 1 << 3, 0, 4), 0x7000_8086, "01.0 PIIX3");
    assert_eq!(
        config_read(&m, (1 << 3) | 3, 0, 4),
        0x7113_8086,
        "01.3 PIIX4_PM"
    );
    assert_eq!(config_read(&m, 1 << 3, 0x0a, 2), 0x0601, "ISA bridge class");
    assert_eq!(
        config_read(&m, 1 << 3, 0x0e, 1),
        0x80,
        "PIIX3 is multi-function"
    );
    // Sub-dword accesses at 0xcfd-0xcff reach the matching bytes.
    assert_eq!(config_read(&m, 0, 2, 2), 0x1237);
    assert_eq!(config_read(&m, 0, 3, 1), 0x12);
    assert_eq!(config_read(&m, 0, 1, 1), 0x80);
    // An empty slot floats.
    assert_eq!(config_read(&m, 5 << 3, 0, 4), 0xffff_ffff);
    // Without the enable bit nothing is selected.
    let io = machine_state(&m).unwrap().system_io().clone();
    io.write(0xcf8, 0, 4);
    assert_eq!(io.read(0xcfc, 4), 0xffff_ffff);
    assert_eq!(io.read(0xcf8, 4), 0);
}

#[test]
fn config_writes_respect_the_write_mask() {
    let m = pc(128 << 20, 1);
    config_write(&m, 0, 0, 0xdead_beef, 4);
    assert_eq!(config_read(&m, 0, 0, 4), 0x1237_8086, "IDs are read-only");
    config_write(&m, 1 << 3, 0x3c, 0x0b, 1);
    assert_eq!(
        config_read(&m, 1 << 3, 0x3c, 1),
        0x0b,
        "interrupt line is writable"
    );
    config_write(&m, 1 << 3, 0x04, 0x07, 2);
    assert_eq!(config_read(&m, 1 << 3, 0x04, 2), 0x07);
}

#[test]
fn reset_control_and_port_92_request_a_reset() {
    let m = pc(128 << 20, 1);
    let ms = machine_state(&m).unwrap();
    ms.system_io().write(0xcf9, 0x02, 1);
    assert_eq!(ms.run_state().take(), None, "bit 2 clear: no reset");
    ms.system_io().write(0xcf9, 0x06, 1);
    assert_eq!(ms.run_state().take(), Some(RunRequest::GuestReset));
    assert_eq!(ms.system_io().read(0x92, 1), 0x02, "A20 on");
    ms.system_io().write(0x92, 0x03, 1);
    assert_eq!(ms.run_state().take(), Some(RunRequest::GuestReset));
    // Port 0x80 takes POST codes quietly.
    ms.system_io().write(0x80, 0x55, 1);
    assert_eq!(ms.run_state().take(), None);
}

#[test]
fn acpi_soft_off_and_the_power_button() {
    let m = pc(128 << 20, 1);
    let ms = machine_state(&m).unwrap();
    let io = ms.system_io().clone();
    assert_eq!(
        io.read(0x604, 2) & 1,
        1,
        "SCI_EN: the machine starts in ACPI mode"
    );
    // The PM timer runs on the VM's clock: still before the VM starts and while it is
    // stopped, as in QEMU.
    let t0 = io.read(0x608, 4);
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_eq!(io.read(0x608, 4), t0, "not started yet");
    hw::core::runstate::vm_start(ms).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let t1 = io.read(0x608, 4);
    assert_ne!(t1, t0, "the PM timer runs");
    hw::core::runstate::vm_stop(ms, hw::core::runstate::RunStatus::Paused).unwrap();
    let t2 = io.read(0x608, 4);
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_eq!(io.read(0x608, 4), t2, "stopped");
    // Power button: status latched, SCI only once enabled.
    let pm = m.child("pm").unwrap();
    assert!(qom::Typed::<hw::acpi::piix4::Piix4Pm>::new(pm)
        .unwrap()
        .power_button());
    assert_eq!(io.read(0x600, 2) & 0x100, 0x100);
    assert!(!qtest_irq(&m, 9));
    io.write(0x602, 0x100, 2);
    assert!(qtest_irq(&m, 9), "SCI raised on IRQ 9");
    io.write(0x600, 0x100, 2);
    assert!(!qtest_irq(&m, 9), "write-one-to-clear lowers it");
    // S5: SLP_TYP 0 with SLP_EN.
    io.write(0x604, 0x2001, 2);
    assert_eq!(ms.run_state().take(), Some(RunRequest::GuestShutdown));
}

#[test]
fn ram_above_4g_is_mapped_and_cpus_follow_smp() {
    let m = pc(5 << 30, 4);
    let ms = machine_state(&m).unwrap();
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let ram = ms.ram();
    let regions: Vec<(u64, u64)> = ram.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(regions, [(0, 3 << 30), (1 << 32, 2 << 30)]);
    // As QEMU maps RAM: each 2 MiB page of guest memory on a 2 MiB page of host memory
    // (huge pages can back it), and advised so.
    for r in ram.iter() {
        assert_eq!(
            r.as_ptr() as usize % (2 << 20),
            0,
            "RAM at {:#x}",
            r.start_addr().0
        );
    }
    // (A kernel built without transparent huge pages refuses the advice.)
    if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let host = ram.iter().nth(1).unwrap().as_ptr() as usize;
        let flags = smaps
            .split_inclusive("VmFlags:")
            .zip(smaps.split("VmFlags:").skip(1))
            .find(|(head, _)| head.contains(&format!("\n{host:x}-")))
            .map(|(_, flags)| flags.lines().next().unwrap_or(""))
            .expect("the RAM mapping in smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "VmFlags:{flags}"
        );
    }
    assert_eq!(ms.cpus().len(), 4);
    let apic_ids: Vec<u64> = ms
        .cpus()
        .iter()
        .map(|c| c.prop_uint("apic-id").unwrap())
        .collect();
    assert_eq!(apic_ids, [0, 1, 2, 3]);
    assert!(m.child("i440fx").unwrap().child("pci.0").is_some());
}

#[test]
fn pvpanic_pci_reports_a_panic_and_pvpanic_is_in_the_dsdt() {
    let m = pc(128 << 20, 1);
    let bus = m.child("i440fx").unwrap().child("pci.0").unwrap();
    let dev = hw::core::qdev::qdev_new("pvpanic-pci").unwrap();
    dev.property_parse("addr", "0x5").unwrap();
    m.add_child("pvpanic-pci", &dev).unwrap();
    hw::core::qdev::qdev_realize(&dev, Some(&bus)).unwrap();
    let isa = m.child("piix3").unwrap().child("isa.0").unwrap();
    let isa_dev = hw::core::qdev::qdev_new("pvpanic").unwrap();
    isa_dev.property_parse("ioport", "0x506").unwrap();
    m.add_child("pvpanic", &isa_dev).unwrap();
    hw::core::qdev::qdev_realize(&isa_dev, Some(&isa)).unwrap();
    hw::core::machine::machine_creation_done(&m).unwrap();

    assert_eq!(config_read(&m, 5 << 3, 0, 4), 0x0011_1b36);
    assert_eq!(
        config_read(&m, 5 << 3, 0x08, 4),
        0x0880_0001,
        "class, revision 1"
    );
    let bar0 = config_read(&m, 5 << 3, 0x10, 4);
    assert_eq!(bar0 & 0xf, 0, "32-bit memory BAR");
    let ms = machine_state(&m).unwrap();
    let mem = ms.system_memory().clone();
    assert_eq!(mem.read(bar0, 1), 3, "supported events");
    assert_eq!(ms.run_state().take(), None);
    mem.write(bar0, 1, 1);
    assert_eq!(ms.run_state().take(), Some(RunRequest::GuestPanic));
    let io = ms.system_io().clone();
    assert_eq!(io.read(0x506, 1), 3);
    io.write(0x506, 1, 1);
    assert_eq!(ms.run_state().take(), Some(RunRequest::GuestPanic));

    // Firmware learns the ISA one's port and the sleep states from fw_cfg, as in QEMU.
    let fw_cfg = hw::nvram::fw_cfg::fw_cfg_find(&m).unwrap();
    assert!(fw_cfg.file_key("etc/pvpanic-port").is_some());
    assert!(fw_cfg.file_key("etc/system-states").is_some());
    // The DSDT names the ISA one for Linux's driver: QEMU0001 with its port.
    let ram = ms.ram();
    let mut tables = vec![0u8; 0x10000];
    vm_memory::Bytes::read_slice(&*ram, &mut tables, vm_memory::GuestAddress(0xe0000)).unwrap();
    assert!(tables.windows(8).any(|w| w == b"QEMU0001"));
    assert!(tables
        .windows(8)
        .any(|w| w == [0x47, 0x01, 0x06, 0x05, 0x06, 0x05, 0x01, 0x01]));
}

#[test]
fn pit_off_has_no_pit_device() {
    let m = pc(128 << 20, 1);
    assert!(m.child("i8254").is_some());
    accel::init().expect("registrations are intact");
    let machine = qom::object_new("pc-i440fx-10.0-machine").unwrap();
    machine.property_parse("pit", "off").unwrap();
    let ms = machine_state(&machine).unwrap();
    ms.set_ram_size(16 << 20);
    ms.set_smp(hw::core::machine::SmpConfig::default());
    let qtest = accel::accel_find("qtest").unwrap();
    accel::accel_init_machine(qtest, &machine).unwrap();
    machine_run_board_init(&machine).unwrap();
    assert!(machine.child("i8254").is_none());
}

#[test]
fn pci_testdev_gets_its_bars_and_counts_test_writes() {
    let m = pc(128 << 20, 1);
    let bus = m.child("i440fx").unwrap().child("pci.0").unwrap();
    let dev = hw::core::qdev::qdev_new("pci-testdev").unwrap();
    dev.property_parse("addr", "0x4").unwrap();
    m.add_child("testdev", &dev).unwrap();
    hw::core::qdev::qdev_realize(&dev, Some(&bus)).unwrap();
    hw::core::machine::machine_creation_done(&m).unwrap();

    assert_eq!(config_read(&m, 4 << 3, 0, 4), 0x0005_1b36);
    let bar0 = config_read(&m, 4 << 3, 0x10, 4);
    let bar1 = config_read(&m, 4 << 3, 0x14, 4);
    assert_eq!(bar0, 0xfe00_0000, "memory BAR assigned");
    // 0xc000 went to piix3-ide's bus-master BAR (00:01.1), before 00:04.0's.
    assert_eq!(bar1, 0xc101, "I/O BAR assigned (bit 0: I/O)");
    // And both IDE channels decode, as SeaBIOS leaves them (Linux's ata_piix needs it).
    assert_eq!(config_read(&m, 1 << 3 | 1, 0x40, 4), 0x8000_8000, "IDETIM");
    assert_eq!(config_read(&m, 4 << 3, 0x04, 2) & 3, 3, "decoding enabled");

    let ms = machine_state(&m).unwrap();
    let mem = ms.system_memory().clone();
    // Select test 2 and read its header: width, offset, data, count, name.
    mem.write(0xfe00_0000, 2, 1);
    assert_eq!(mem.read(0xfe00_0000, 1), 2);
    let offset = mem.read(0xfe00_0004, 4);
    let data = mem.read(0xfe00_0008, 4);
    let name: Vec<u8> = (0..17)
        .map(|i| mem.read(0xfe00_0010 + i, 1) as u8)
        .collect();
    assert_eq!(&name, b"datamatch-eventfd");
    mem.write(0xfe00_0000 + offset, data, 4);
    mem.write(0xfe00_0000 + offset, data ^ 1, 4);
    assert_eq!(
        mem.read(0xfe00_000c, 4),
        1,
        "only the matching write counts"
    );
    // The I/O BAR works the same way.
    let io = ms.system_io().clone();
    io.write(0xc100, 0, 1);
    let offset = io.read(0xc104, 4);
    io.write(0xc100 + offset, 0, 4);
    assert_eq!(io.read(0xc10c, 4), 1);

    // The guest can move a BAR: the old address stops decoding.
    config_write(&m, 4 << 3, 0x10, 0xfe10_0000, 4);
    assert_eq!(mem.read(0xfe00_000c, 4), 0xffff_ffff);
    assert_eq!(mem.read(0xfe10_000c, 4), 1);
}
