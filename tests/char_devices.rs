//! The PC's character and legacy ISA devices (`isa-serial`, `i8042`, `mc146818rtc`) on the
//! qtest accelerator: created through qdev, driven through the machine's `system-io`, their
//! interrupts seen as the accelerator's GSI levels.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw::char::serial::{serial_isa_init, IsaSerial};
use hw::core::chardev::{chardev_add, parse_serial_spec, Ringbuf};
use hw::core::machine::{machine_state, MachineState};
use hw::core::qdev::{qdev_realize, DeviceMethods};
use hw::core::runstate::RunRequest;
use hw::rtc::mc146818rtc::{mc146818_rtc_init, Mc146818Rtc};
use qom::ObjectRef;
use qom::Typed;
use test_support::qtest::{irq_level, machine_with_isa_bus, new_dev, plug};

fn ms(machine: &ObjectRef) -> &MachineState {
    machine_state(machine).unwrap()
}

fn plug_err(machine: &ObjectRef, bus: &ObjectRef, driver: &str, props: &[(&str, &str)]) -> String {
    let dev = new_dev(machine, driver, props);
    qdev_realize(&dev, Some(bus)).unwrap_err().to_string()
}

fn port_bases(machine: &ObjectRef) -> Vec<(u64, String)> {
    ms(machine)
        .system_io()
        .flat_view()
        .ranges()
        .iter()
        .map(|r| (r.start(), r.region().name().to_string()))
        .collect()
}

// ----- isa-debugcon -----

#[test]
fn debugcon_prints_byte_writes_and_reads_back_its_value() {
    let (machine, bus) = machine_with_isa_bus();
    let ring = Arc::new(Ringbuf::default());
    chardev_add("char-devices-debugcon", ring.clone()).unwrap();
    plug(
        &machine,
        &bus,
        "isa-debugcon",
        &[("iobase", "0x402"), ("chardev", "char-devices-debugcon")],
    );
    let io = ms(&machine).system_io().clone();
    for b in b"SeaBIOS" {
        io.write(0x402, u64::from(*b), 1);
    }
    // As under QEMU with KVM (checked with its guests): a wider access is split into
    // bytes at successive ports, so only the low byte reaches the port.
    io.write(0x402, 0x4142_4344, 4);
    assert_eq!(ring.contents(), b"SeaBIOSD");
    // Firmware detects the port by reading back 0xe9.
    assert_eq!(io.read(0x402, 1), 0xe9);
    assert_eq!(io.read(0x402, 4), 0xffff_ffe9);
    assert_eq!(
        plug_err(&machine, &bus, "isa-debugcon", &[]),
        "Can't create debugcon device, empty char device"
    );
    assert_eq!(
        plug_err(&machine, &bus, "isa-debugcon", &[("chardev", "nosuch")]),
        "Property 'isa-debugcon.chardev' can't find value 'nosuch'"
    );
}

// ----- isa-serial -----

#[test]
fn serial_transmits_to_its_backend_and_interrupts_on_irq_4() {
    let (machine, bus) = machine_with_isa_bus();
    let dev = plug(&machine, &bus, "isa-serial", &[]);
    let ring = Arc::new(Ringbuf::default());
    Typed::<IsaSerial>::new(dev.clone())
        .unwrap()
        .set_backend(Some(ring.clone()));
    let io = ms(&machine).system_io().clone();

    assert_eq!(io.read(0x3fd, 1) & 0x60, 0x60, "THRE and TEMT");
    for b in b"COM1" {
        io.write(0x3f8, u64::from(*b), 1);
    }
    assert_eq!(ring.contents(), b"COM1");
    assert!(!irq_level(&machine, 4));

    io.write(0x3f9, 0x02, 1);
    assert!(irq_level(&machine, 4), "THR empty with ETBEI set");
    assert_eq!(io.read(0x3fa, 1) & 0x0f, 0x02);
    assert!(!irq_level(&machine, 4), "IIR read acknowledges");

    io.write(0x3f9, 0x01, 1);
    ring.inject(b"k");
    assert!(irq_level(&machine, 4), "received data with ERBFI set");
    assert_eq!(io.read(0x3fd, 1) & 0x01, 0x01, "DR");
    assert_eq!(io.read(0x3f8, 1), u64::from(b'k'));
    assert_eq!(io.read(0x3fd, 1) & 0x01, 0x00);
    assert!(!irq_level(&machine, 4));

    // Divisor latch: 115200 baud.
    io.write(0x3fb, 0x83, 1);
    io.write(0x3f8, 0x01, 1);
    io.write(0x3f9, 0x00, 1);
    assert_eq!(io.read(0x3f8, 1), 0x01);
    io.write(0x3fb, 0x03, 1);
    assert_eq!(ring.contents(), b"COM1", "divisor writes are not output");

    dev.reset();
    assert_eq!(io.read(0x3f9, 1), 0, "reset clears IER");
}

#[test]
fn serial_index_picks_the_com_port_defaults() {
    let (machine, bus) = machine_with_isa_bus();
    let com2 = new_dev(&machine, "isa-serial", &[("index", "1")]);
    assert_eq!(com2.prop_uint("iobase").unwrap(), 0x2f8);
    assert_eq!(com2.prop_uint("irq").unwrap(), 3);
    qdev_realize(&com2, Some(&bus)).unwrap();
    let com4 = plug(
        &machine,
        &bus,
        "isa-serial",
        &[("index", "3"), ("irq", "5")],
    );
    assert_eq!(com4.prop_uint("iobase").unwrap(), 0x2e8);
    assert_eq!(com4.prop_uint("irq").unwrap(), 5);
    // Without index: the lowest free one, COM1 then COM3.
    let com1 = plug(&machine, &bus, "isa-serial", &[]);
    let com3 = plug(&machine, &bus, "isa-serial", &[]);
    assert_eq!(com1.prop_uint("index").unwrap(), 0);
    assert_eq!(com3.prop_uint("index").unwrap(), 2);
    assert_eq!(com3.prop_uint("iobase").unwrap(), 0x3e8);
    let bases: Vec<u64> = port_bases(&machine).into_iter().map(|(b, _)| b).collect();
    assert_eq!(bases, [0x2e8, 0x2f8, 0x3e8, 0x3f8]);
    assert_eq!(
        plug_err(&machine, &bus, "isa-serial", &[]),
        "Max. supported number of ISA serial ports is 4."
    );
    assert_eq!(
        plug_err(&machine, &bus, "isa-serial", &[("index", "4")]),
        "Max. supported number of ISA serial ports is 4."
    );

    // An explicit iobase wins over the index.
    let (machine, bus) = machine_with_isa_bus();
    plug(
        &machine,
        &bus,
        "isa-serial",
        &[("index", "1"), ("iobase", "0x500")],
    );
    assert_eq!(port_bases(&machine), [(0x500, "serial".to_string())]);
}

#[test]
fn serial_chardev_property_names_a_registered_backend() {
    let (machine, bus) = machine_with_isa_bus();
    let ring = Arc::new(Ringbuf::default());
    chardev_add("char-devices-test-ring", ring.clone()).unwrap();
    plug(
        &machine,
        &bus,
        "isa-serial",
        &[("chardev", "char-devices-test-ring")],
    );
    ms(&machine).system_io().write(0x3f8, u64::from(b'z'), 1);
    assert_eq!(ring.contents(), b"z");
    assert!(ring.has_receiver());
    assert_eq!(
        plug_err(&machine, &bus, "isa-serial", &[("chardev", "nosuch")]),
        "Property 'serial.chardev' can't find value 'nosuch'"
    );
}

#[test]
fn serial_isa_init_builds_com_ports_for_the_board() {
    let (machine, bus) = machine_with_isa_bus();
    let null = parse_serial_spec("null").unwrap();
    let dev = serial_isa_init(&bus, 1, null).unwrap();
    assert!(dev.is_realized());
    assert_eq!(port_bases(&machine), [(0x2f8, "serial".to_string())]);
    assert_eq!(dev.port().backend().unwrap().driver(), "null");
    assert!(dev
        .object()
        .canonical_path()
        .unwrap()
        .contains("/unattached/"));
}

// ----- i8042 -----

/// Waits for the output buffer as Linux's `i8042_wait_read` does, then reads it.
fn kbd_read(machine: &ObjectRef) -> Option<(u8, u8)> {
    let io = ms(machine).system_io();
    let status = io.read(0x64, 1) as u8;
    (status & 0x01 != 0).then(|| (status, io.read(0x60, 1) as u8))
}

fn kbd_command(machine: &ObjectRef, cmd: u8, arg: Option<u8>) -> Option<u8> {
    let io = ms(machine).system_io();
    io.write(0x64, cmd.into(), 1);
    if let Some(arg) = arg {
        io.write(0x60, arg.into(), 1);
    }
    kbd_read(machine).map(|(_, data)| data)
}

#[test]
fn i8042_probes_like_linux_expects() {
    let (machine, bus) = machine_with_isa_bus();
    plug(&machine, &bus, "i8042", &[]);
    assert_eq!(
        port_bases(&machine),
        [
            (0x60, "i8042-data".to_string()),
            (0x64, "i8042-cmd".to_string())
        ]
    );
    assert_eq!(kbd_read(&machine), None, "nothing to flush");
    assert_eq!(kbd_command(&machine, 0xaa, None), Some(0x55));
    assert_eq!(kbd_command(&machine, 0x20, None), Some(0x03));
    assert_eq!(kbd_command(&machine, 0x60, Some(0x47)), None);
    assert_eq!(kbd_command(&machine, 0x20, None), Some(0x47));
    assert_eq!(kbd_command(&machine, 0xab, None), Some(0x00));

    // AUX loopback comes back as mouse data, on IRQ 12 while MOUSE_INT is set.
    let io = ms(&machine).system_io().clone();
    io.write(0x64, 0xd3, 1);
    io.write(0x60, 0x5a, 1);
    assert!(irq_level(&machine, 12));
    assert!(!irq_level(&machine, 1));
    let (status, data) = kbd_read(&machine).unwrap();
    assert_eq!((status & 0x21, data), (0x21, 0x5a));
    assert!(!irq_level(&machine, 12));

    // The keyboard answers on IRQ 1.
    io.write(0x60, 0xf2, 1);
    assert!(irq_level(&machine, 1));
    let id: Vec<u8> = std::iter::from_fn(|| kbd_read(&machine).map(|r| r.1)).collect();
    assert_eq!(id, [0xfa, 0xab, 0x41], "translated ID with KCC set");
    assert!(!irq_level(&machine, 1));

    // With interrupts off in the command byte, data waits without an IRQ.
    kbd_command(&machine, 0x60, Some(0x44));
    io.write(0x60, 0xf4, 1);
    assert!(!irq_level(&machine, 1));
    assert_eq!(kbd_read(&machine).map(|r| r.1), Some(0xfa));
}

#[test]
fn i8042_fe_resets_the_machine() {
    let (machine, bus) = machine_with_isa_bus();
    plug(&machine, &bus, "i8042", &[]);
    let ms = ms(&machine);
    assert_eq!(ms.run_state().take(), None);
    ms.system_io().write(0x64, 0xfe, 1);
    assert_eq!(ms.run_state().take(), Some(RunRequest::GuestReset));
    // Writing the output port with bit 0 clear resets too.
    ms.system_io().write(0x64, 0xd1, 1);
    ms.system_io().write(0x60, 0x02, 1);
    assert_eq!(ms.run_state().take(), Some(RunRequest::GuestReset));
}

// ----- mc146818rtc -----

fn cmos(machine: &ObjectRef, index: u8) -> u8 {
    let io = ms(machine).system_io();
    io.write(0x70, index.into(), 1);
    io.read(0x71, 1) as u8
}

#[test]
fn rtc_reads_bcd_or_binary_and_masks_the_nmi_bit() {
    let (machine, bus) = machine_with_isa_bus();
    let dev = plug(&machine, &bus, "mc146818rtc", &[]);
    assert_eq!(port_bases(&machine), [(0x70, "rtc".to_string())]);
    // 2024-02-29 13:45:56 UTC.
    Typed::<Mc146818Rtc>::new(dev.clone())
        .unwrap()
        .rtc()
        .set_clock(Arc::new(|| 1_709_214_356 * 1_000_000_000));
    assert_eq!(cmos(&machine, 0x00), 0x56);
    assert_eq!(cmos(&machine, 0x04), 0x13);
    assert_eq!(cmos(&machine, 0x09), 0x24);
    assert_eq!(cmos(&machine, 0x32), 0x20, "century byte");
    assert_eq!(
        cmos(&machine, 0x80 | 0x02),
        0x45,
        "the NMI mask bit is not part of the index"
    );
    assert_eq!(cmos(&machine, 0x0d), 0x80, "VRT");
    let io = ms(&machine).system_io();
    io.write(0x70, 0x0b, 1);
    io.write(0x71, 0x06, 1);
    assert_eq!(cmos(&machine, 0x00), 56);
    assert_eq!(cmos(&machine, 0x09), 24);
    assert_eq!(io.read(0x70, 1), 0xff, "the index port is write-only");
}

#[test]
fn rtc_irq_8_follows_register_c() {
    let (machine, bus) = machine_with_isa_bus();
    plug(&machine, &bus, "mc146818rtc", &[]);
    let io = ms(&machine).system_io().clone();
    io.write(0x70, 0x0b, 1);
    io.write(0x71, 0x12, 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !irq_level(&machine, 8) {
        assert!(
            Instant::now() < deadline,
            "no update-ended interrupt within 3 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(cmos(&machine, 0x0c) & 0x90, 0x90);
    io.write(0x70, 0x0b, 1);
    io.write(0x71, 0x02, 1);
    cmos(&machine, 0x0c);
    assert!(!irq_level(&machine, 8));
}

#[test]
fn rtc_cmos_memory_size_bytes_match_pc_cmos_init() {
    let (machine, bus) = machine_with_isa_bus();
    let dev = mc146818_rtc_init(&bus, 2000).unwrap();
    let bytes = |m: &ObjectRef| -> Vec<u8> {
        [
            0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5b, 0x5c, 0x5d,
        ]
        .iter()
        .map(|&i| cmos(m, i))
        .collect()
    };
    // -m 128M: 640 KiB base; 127 MiB extended, capped at 65535 KiB; 112 MiB above 16 MiB.
    dev.set_memory_size(128 << 20, 0);
    assert_eq!(
        bytes(&machine),
        [0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0x07, 0x00, 0x00, 0x00]
    );
    // -m 5G on pc: 3 GiB below 4 GiB, 2 GiB above.
    dev.set_memory_size(3 << 30, 2 << 30);
    assert_eq!(
        bytes(&machine),
        [0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0xbf, 0x00, 0x80, 0x00]
    );
    // Small guests: base memory below 640 KiB, nothing extended.
    dev.set_memory_size(512 << 10, 0);
    assert_eq!(bytes(&machine)[..8], [0x00, 0x02, 0, 0, 0, 0, 0, 0]);
}

// ----- stdio -----

/// Run by `stdio_feeds_the_uart_and_eof_does_not_end_the_vm` in a child process, with a
/// pipe on stdin: echoes what arrives through COM1 to stdout, after stdin's EOF.
#[test]
#[ignore = "run as a child process by stdio_feeds_the_uart_and_eof_does_not_end_the_vm"]
fn stdio_child() {
    if std::env::var_os("QOMVM_STDIO_CHILD").is_none() {
        return;
    }
    let (machine, bus) = machine_with_isa_bus();
    let dev = plug(&machine, &bus, "isa-serial", &[]);
    Typed::<IsaSerial>::new(dev.clone())
        .unwrap()
        .set_backend(parse_serial_spec("stdio").unwrap());
    let io = ms(&machine).system_io().clone();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.ends_with(b"\n") && Instant::now() < deadline {
        if io.read(0x3fd, 1) & 0x01 != 0 {
            got.push(io.read(0x3f8, 1) as u8);
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The parent closed stdin after its line: the reader saw EOF and the VM runs on.
    std::thread::sleep(Duration::from_millis(200));
    for b in b"echo:".iter().chain(&got).chain(b"still running\n") {
        io.write(0x3f8, u64::from(*b), 1);
    }
}

#[test]
fn stdio_feeds_the_uart_and_eof_does_not_end_the_vm() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stdio_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QOMVM_STDIO_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("echo:hello\nstill running\n"),
        "child printed: {stdout}"
    );
}
