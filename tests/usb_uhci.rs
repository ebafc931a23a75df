//! `piix3-usb-uhci` with `usb-tablet` and `usb-kbd` on the pc board under the qtest
//! accelerator, driven by the test's own UHCI driver (frame list, queue head and transfer
//! descriptors in guest memory, as Linux's uhci-hcd lays them out): the function's
//! identity, port status and reset, enumeration through control transfers, reports for
//! host input through the interrupt endpoint, frames stopping with the VM, migration of
//! the registers, and schedules that loop, point outside RAM or hold illegal TDs, which
//! must halt the controller as the hardware would and never hang or panic qomvm.

use std::time::{Duration, Instant};

use hw::core::input::button;
use hw::core::machine::machine_state;
use hw::core::qdev::{device_impl, qdev_realize};
use hw::core::runstate::{self, RunStatus};
use qom::ObjectRef;
use test_support::usb::{self, bot, desc, hid, setup, UsbDevice};
use test_support::virtio::PciConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DEVFN: u32 = 5 << 3;
const FRAME_LIST: u64 = 0x10_0000;
const QH: u64 = 0x10_1000;
const TDS: u64 = 0x10_2000;
const BUFFERS: u64 = 0x11_0000;
const WAIT: Duration = Duration::from_secs(10);

/// Registers.
const USBCMD: u64 = 0x00;
const USBSTS: u64 = 0x02;
const USBINTR: u64 = 0x04;
const FRNUM: u64 = 0x06;
const FLBASEADD: u64 = 0x08;
const PORTSC1: u64 = 0x10;

const CMD_RS: u64 = 1;
const CMD_HCRESET: u64 = 2;
const STS_USBINT: u64 = 1;
const STS_USBERR: u64 = 2;
const STS_HSE: u64 = 8;
const STS_HCPE: u64 = 0x10;
const STS_HALTED: u64 = 0x20;

const TD_ACTIVE: u32 = 1 << 23;
const TD_STALL: u32 = 1 << 22;
const TD_NAK: u32 = 1 << 19;
const TD_TIMEOUT: u32 = 1 << 18;
const TD_IOC: u32 = 1 << 24;
const TD_ERRORS: u32 = 3 << 27;
const LINK_TERM: u32 = 1;
const LINK_QH: u32 = 2;
const LINK_DEPTH: u32 = 4;

const SETUP: u8 = 0x2d;
const IN: u8 = 0x69;
const OUT: u8 = 0xe1;

/// A pc machine on qtest with `piix3-usb-uhci,id=ID` at 05.0 and each (driver, props) on
/// its bus, started.
fn pc_with_usb(id: &str, devices: &[UsbDevice]) -> ObjectRef {
    usb::pc_with_hc("piix3-usb-uhci", id, &[], devices)
}

/// [`pc_with_usb`] with a tablet on port 1 and a keyboard on port 2.
fn pc_with_uhci(id: &str) -> ObjectRef {
    pc_with_usb(id, &usb::TABLET_KBD)
}

/// The test's UHCI driver: one queue head on every frame, its element the transfer under
/// way.
struct Driver {
    machine: ObjectRef,
    mem: GuestMemoryMmap,
    io_base: u64,
    next_td: u64,
}

#[derive(Clone, Copy)]
struct Td {
    pid: u8,
    addr: u8,
    ep: u8,
    toggle: bool,
    len: usize,
    buffer: u64,
    ioc: bool,
}

/// The SETUP TD of a control transfer to `addr`, its packet at `BUFFERS`.
fn setup_td(addr: u8) -> Td {
    Td {
        pid: SETUP,
        addr,
        ep: 0,
        toggle: false,
        len: 8,
        buffer: BUFFERS,
        ioc: false,
    }
}

/// A TD's token: PID, device address, endpoint, data toggle and MaxLen (`len` - 1, 0x7ff
/// for none).
fn token(pid: u8, addr: u8, ep: u8, toggle: bool, len: usize) -> u32 {
    let maxlen = (len as u32).wrapping_sub(1) & 0x7ff;
    u32::from(pid)
        | u32::from(addr) << 8
        | u32::from(ep) << 15
        | u32::from(toggle) << 19
        | maxlen << 21
}

impl Driver {
    /// The driver of the controller at I/O port `io_base` of `machine`, as set up already.
    fn new(machine: &ObjectRef, io_base: u64) -> Driver {
        Driver {
            machine: machine.clone(),
            mem: usb::guest_ram(machine),
            io_base,
            next_td: TDS,
        }
    }

    fn start(machine: &ObjectRef) -> Driver {
        let pci = PciConfig::new(machine, DEVFN);
        // BAR 4 where the board put it; I/O and bus master on.
        let io_base = u64::from(pci.read(0x20, 4) & !3);
        assert_ne!(io_base, 0, "BAR 4 assigned");
        pci.write(0x04, 0x5, 2);
        let d = Driver::new(machine, io_base);
        d.write(USBCMD, CMD_HCRESET, 2);
        d.lay_out_schedule();
        d.write(FLBASEADD, FRAME_LIST, 4);
        d.write(FRNUM, 0, 2);
        d.write(USBINTR, 0xf, 2);
        d.write(USBCMD, CMD_RS, 2);
        d
    }

    /// The frame list, every entry on the one queue head, the queue empty.
    fn lay_out_schedule(&self) {
        for f in 0..1024u64 {
            let entry = GuestAddress(FRAME_LIST + 4 * f);
            self.mem
                .write_obj((QH as u32 | LINK_QH).to_le(), entry)
                .unwrap();
        }
        self.mem
            .write_obj(LINK_TERM.to_le(), GuestAddress(QH))
            .unwrap();
        self.set_element(LINK_TERM);
    }

    /// Points the queue head's element at `link` (a TD's address, or `LINK_TERM`).
    fn set_element(&self, link: u32) {
        self.mem
            .write_obj(link.to_le(), GuestAddress(QH + 4))
            .unwrap();
    }

    /// Empties the queue so nothing runs again, and lets the frame under way end.
    fn take_queue_down(&self) {
        self.set_element(LINK_TERM);
        std::thread::sleep(Duration::from_millis(3));
    }

    /// Writes a TD's four words (link, control and status, token, buffer) at `td`.
    fn write_td(&self, td: u64, words: [u32; 4]) {
        for (k, v) in words.iter().enumerate() {
            self.mem
                .write_obj(v.to_le(), GuestAddress(td + 4 * k as u64))
                .unwrap();
        }
    }

    /// The control and status word of the TD at `td`.
    fn td_status(&self, td: u64) -> u32 {
        self.mem.read_obj::<u32>(GuestAddress(td + 4)).unwrap()
    }

    /// FRNUM, and FRNUM again after `pause`.
    fn frames_across(&self, pause: Duration) -> (u64, u64) {
        let before = self.read(FRNUM, 2);
        std::thread::sleep(pause);
        (before, self.read(FRNUM, 2))
    }

    fn io(&self) -> std::sync::Arc<hw::core::memory::AddressSpace> {
        machine_state(&self.machine).unwrap().system_io().clone()
    }

    fn read(&self, reg: u64, size: u32) -> u64 {
        self.io().read(self.io_base + reg, size)
    }

    fn write(&self, reg: u64, value: u64, size: u32) {
        self.io().write(self.io_base + reg, value, size)
    }

    fn reset_port(&self, port: u64) {
        let reg = PORTSC1 + 2 * (port - 1);
        self.write(reg, 0x200, 2);
        self.write(reg, 0, 2);
        self.write(reg, 0x0004 | 0x000a, 2); // enable; clear the change bits
    }

    /// Queues `tds` (depth first) on the queue head and waits until the last is retired
    /// or one fails; returns each TD's control and status word.
    fn run(&mut self, tds: &[Td]) -> Vec<u32> {
        let first = self.next_td;
        let addrs: Vec<u64> = (0..tds.len() as u64).map(|i| first + 16 * i).collect();
        self.next_td = first + 16 * tds.len() as u64;
        if self.next_td > TDS + 0x8000 {
            self.next_td = TDS;
        }
        for (i, td) in tds.iter().enumerate() {
            let link = addrs
                .get(i + 1)
                .map_or(LINK_TERM, |&a| a as u32 | LINK_DEPTH);
            let ctrl = TD_ACTIVE | TD_ERRORS | if td.ioc { TD_IOC } else { 0 };
            let token = token(td.pid, td.addr, td.ep, td.toggle, td.len);
            self.write_td(addrs[i], [link, ctrl, token, td.buffer as u32]);
        }
        self.set_element(first as u32);
        let deadline = Instant::now() + WAIT;
        loop {
            let ctrls: Vec<u32> = addrs.iter().map(|&a| self.td_status(a)).collect();
            let failed = ctrls
                .iter()
                .any(|c| c & TD_ACTIVE == 0 && c & (TD_STALL | TD_TIMEOUT) != 0);
            if failed || ctrls.last().unwrap() & TD_ACTIVE == 0 {
                self.take_queue_down();
                return ctrls;
            }
            assert!(Instant::now() < deadline, "TDs still active: {ctrls:x?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A control transfer to `addr`: setup, data stage in 8-byte packets, status.
    /// Returns the IN data, or `None` if it stalled or timed out.
    fn control(&mut self, addr: u8, setup: [u8; 8], out: &[u8]) -> Option<Vec<u8>> {
        let length = usize::from(u16::from_le_bytes([setup[6], setup[7]]));
        let is_in = setup[0] & 0x80 != 0;
        self.mem.write_slice(&setup, GuestAddress(BUFFERS)).unwrap();
        let mut tds = vec![setup_td(addr)];
        let data = BUFFERS + 0x100;
        let data_len = if is_in { length } else { out.len() };
        if !is_in {
            self.mem.write_slice(out, GuestAddress(data)).unwrap();
        }
        for (i, at) in (0..data_len).step_by(8).enumerate() {
            let len = (data_len - at).min(8);
            let pid = if is_in { IN } else { OUT };
            tds.push(Td {
                pid,
                addr,
                ep: 0,
                toggle: i % 2 == 0,
                len,
                buffer: data + at as u64,
                ioc: false,
            });
        }
        let status = if is_in { OUT } else { IN };
        tds.push(Td {
            pid: status,
            addr,
            ep: 0,
            toggle: true,
            len: 0,
            buffer: 0,
            ioc: true,
        });
        let ctrls = self.run(&tds);
        if ctrls.iter().any(|c| c & (TD_STALL | TD_TIMEOUT) != 0) {
            return None;
        }
        let got: usize = ctrls[1..ctrls.len() - 1]
            .iter()
            .map(|c| ((c + 1) & 0x7ff) as usize)
            .sum();
        let mut buf = vec![0u8; got];
        self.mem.read_slice(&mut buf, GuestAddress(data)).unwrap();
        Some(buf)
    }

    /// A SETUP stage alone (`setup` to `addr`); returns its TD's control and status word.
    fn setup_stage(&mut self, addr: u8, setup: [u8; 8]) -> u32 {
        self.mem.write_slice(&setup, GuestAddress(BUFFERS)).unwrap();
        self.run(&[setup_td(addr)])[0]
    }

    fn get_descriptor(&mut self, addr: u8, kind: u8, index: u8, len: u16) -> Option<Vec<u8>> {
        self.control(addr, setup::get_descriptor(kind, index, len), &[])
    }

    /// Reset, address and configure the device on `port`, giving it `addr`.
    fn enumerate(&mut self, port: u64, addr: u8) -> Vec<u8> {
        self.reset_port(port);
        let device = self
            .get_descriptor(0, desc::DEVICE, 0, 18)
            .expect("device descriptor at address 0");
        self.control(0, setup::set_address(addr), &[])
            .expect("SET_ADDRESS");
        self.control(addr, setup::set_configuration(1), &[])
            .expect("SET_CONFIGURATION");
        device
    }

    /// One interrupt IN poll of endpoint 1 of `addr`: the report, or `None` if NAKed for
    /// `patience`.
    fn poll(&mut self, addr: u8, patience: Duration) -> Option<Vec<u8>> {
        let td = self.next_td;
        self.next_td += 16;
        let buffer = BUFFERS + 0x800;
        self.write_td(
            td,
            [
                LINK_TERM,
                TD_ACTIVE | TD_ERRORS | TD_IOC,
                token(IN, addr, 1, false, 8),
                buffer as u32,
            ],
        );
        self.set_element(td as u32);
        let deadline = Instant::now() + patience;
        loop {
            let ctrl = self.td_status(td);
            if ctrl & TD_ACTIVE == 0 {
                assert_eq!(ctrl & TD_STALL, 0, "interrupt endpoint stalled");
                let mut report = vec![0u8; ((ctrl + 1) & 0x7ff) as usize];
                self.mem
                    .read_slice(&mut report, GuestAddress(buffer))
                    .unwrap();
                return Some(report);
            }
            if Instant::now() > deadline {
                assert_ne!(ctrl & TD_NAK, 0, "a TD neither done nor NAKed");
                self.take_queue_down();
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `data` to bulk-out endpoint `ep` of `addr`, in 64-byte packets.
    fn bulk_out(&mut self, addr: u8, ep: u8, data: &[u8]) -> Vec<u32> {
        let at = BUFFERS + 0x1000;
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
        let tds: Vec<Td> = (0..data.len())
            .step_by(64)
            .enumerate()
            .map(|(i, off)| Td {
                pid: OUT,
                addr,
                ep,
                toggle: i % 2 == 1,
                len: (data.len() - off).min(64),
                buffer: at + off as u64,
                ioc: false,
            })
            .collect();
        self.run(&tds)
    }

    /// Up to `len` bytes from bulk-in endpoint `ep` of `addr`, ending at a short packet.
    fn bulk_in(&mut self, addr: u8, ep: u8, len: usize) -> Vec<u8> {
        let at = BUFFERS + 0x1000;
        let mut out = Vec::new();
        for (i, off) in (0..len).step_by(64).enumerate() {
            let want = (len - off).min(64);
            let ctrl = self.run(&[Td {
                pid: IN,
                addr,
                ep,
                toggle: i % 2 == 1,
                len: want,
                buffer: at,
                ioc: false,
            }])[0];
            assert_eq!(
                ctrl & (TD_STALL | TD_TIMEOUT),
                0,
                "bulk-in failed: {ctrl:#x}"
            );
            let got = ((ctrl + 1) & 0x7ff) as usize;
            let mut buf = vec![0u8; got];
            self.mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
            out.extend_from_slice(&buf);
            if got < want {
                break;
            }
        }
        out
    }

    /// One Bulk-Only command to the mass storage device at `addr` (bulk endpoints 1 IN
    /// and 2 OUT): the CBW, the data (`out`, or `in_len` bytes in), the CSW. Returns the
    /// data in and the CSW's residue and status.
    fn bot(
        &mut self,
        addr: u8,
        tag: u32,
        cdb: &[u8],
        out: &[u8],
        in_len: usize,
    ) -> (Vec<u8>, u32, u8) {
        bot::command(&mut Stick { d: self, addr }, tag, cdb, out, in_len)
    }

    fn wait_status(&self, bits: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let sts = self.read(USBSTS, 2);
            if sts & bits == bits {
                return sts;
            }
            assert!(
                Instant::now() < deadline,
                "USBSTS {sts:#x} never showed {bits:#x}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// usb-storage's bulk endpoints: 1 IN and 2 OUT of the device at `addr`.
struct Stick<'a> {
    d: &'a mut Driver,
    addr: u8,
}

impl bot::BulkPipes for Stick<'_> {
    fn bulk_out(&mut self, data: &[u8]) {
        self.d.bulk_out(self.addr, 2, data);
    }
    fn bulk_in(&mut self, len: usize) -> Vec<u8> {
        self.d.bulk_in(self.addr, 1, len)
    }
}

#[test]
fn the_function_identifies_as_the_piix3_uhci_with_two_ports() {
    let m = pc_with_uhci("usb-id");
    let pci = PciConfig::new(&m, DEVFN);
    assert_eq!(pci.read(0, 4), 0x7020_8086);
    assert_eq!(pci.read(0x08, 4) >> 8, 0x0c0300, "serial bus, USB, UHCI");
    assert_eq!(pci.read(0x3d, 1), 4, "INTD");
    assert_eq!(pci.read(0x60, 1), 0x10, "USB 1.0");
    let d = Driver::start(&m);
    assert_eq!(d.read(USBSTS, 2) & STS_HALTED, 0, "running");
    for port in 0..2 {
        let sc = d.read(PORTSC1 + 2 * port, 2);
        assert_eq!(
            sc & 0x83,
            0x83,
            "port {port}: connected, changed, bit 7 set: {sc:#x}"
        );
    }
    assert_eq!(d.read(PORTSC1 + 4, 2) & 0x80, 0, "no third port");
    // The frame number advances while running, and frames stop with the VM.
    let (f0, f1) = d.frames_across(Duration::from_millis(30));
    assert!(f1 != f0, "frames advance");
    let ms = machine_state(&m).unwrap();
    runstate::vm_stop(ms, RunStatus::Paused).unwrap();
    let (stopped, later) = d.frames_across(Duration::from_millis(30));
    assert_eq!(later, stopped, "no frames while the VM is stopped");
    runstate::vm_start(ms).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert!(d.read(FRNUM, 2) != stopped, "frames again once it runs");
    // Run/stop clear: halted at once.
    d.write(USBCMD, 0, 2);
    assert_ne!(d.read(USBSTS, 2) & STS_HALTED, 0);
    // FLBASEADD keeps its 4 KiB alignment; a byte write of SOFMOD lands.
    d.write(FLBASEADD, 0x1234_5678, 4);
    assert_eq!(d.read(FLBASEADD, 4), 0x1234_5000);
    d.write(0x0c, 0x3f, 1);
    assert_eq!(d.read(0x0c, 1), 0x3f);
}

#[test]
fn a_tablet_enumerates_and_reports_where_the_pointer_is() {
    let m = pc_with_uhci("usb-tab");
    let input = machine_state(&m).unwrap().services().input();
    assert!(
        !input.is_absolute(),
        "the PS/2 mouse until a driver uses the tablet"
    );
    let mut d = Driver::start(&m);
    let device = d.enumerate(1, 5);
    assert_eq!(&device[..2], &[18, 1]);
    assert_eq!(desc::vendor(&device), 0x0627, "QEMU's vendor");
    assert_eq!(desc::product(&device), 0x0001);
    d.write(USBSTS, 0xff, 2);
    let stage = d.setup_stage(0, setup::get_descriptor(desc::DEVICE, 0, 18));
    assert_eq!(
        stage & (TD_TIMEOUT | TD_STALL | TD_ACTIVE),
        TD_TIMEOUT,
        "nothing answers at address 0 any more"
    );
    assert_ne!(
        d.read(USBSTS, 2) & STS_USBERR,
        0,
        "the timeout is an error interrupt"
    );
    d.write(USBSTS, 0xff, 2);
    let config = d.get_descriptor(5, desc::CONFIGURATION, 0, 255).unwrap();
    assert_eq!(config.len(), 34);
    assert_eq!(
        desc::interface_class(&config),
        [3, 0, 0],
        "HID, no boot protocol"
    );
    let product = d.get_descriptor(5, desc::STRING, 2, 255).unwrap();
    assert_eq!(desc::string(&product), "QEMU USB Tablet");
    let report_len = u16::from_le_bytes([config[25], config[26]]);
    let report = d
        .control(
            5,
            setup::get_descriptor_from(1, desc::HID_REPORT, 0, report_len),
            &[],
        )
        .unwrap();
    assert_eq!(report.len(), usize::from(report_len));
    assert_eq!(&report[..4], &[0x05, 0x01, 0x09, 0x02]);
    assert!(
        d.control(5, setup::get_descriptor(desc::DEVICE_QUALIFIER, 0, 10), &[])
            .is_none(),
        "no device qualifier: stall"
    );
    assert!(
        d.control(5, setup::set_idle(0), &[]).is_some(),
        "SET_IDLE 0"
    );

    assert!(
        d.poll(5, Duration::from_millis(50)).is_none(),
        "no input: NAK"
    );
    assert!(
        input.is_absolute(),
        "the tablet takes positions once polled"
    );
    d.write(USBSTS, 0xff, 2);
    input.send_position(0x4000, 0x2000, 0, button::LEFT);
    assert_eq!(
        d.poll(5, WAIT).unwrap(),
        hid::tablet_report(1, 0x4000, 0x2000, 0)
    );
    assert_ne!(
        d.wait_status(STS_USBINT) & STS_USBINT,
        0,
        "IOC raised USBINT"
    );
    input.send_position(0x7fff, 0, 1, 0);
    assert_eq!(
        d.poll(5, WAIT).unwrap(),
        hid::tablet_report(0, 0x7fff, 0, -1),
        "wheel down is -1"
    );
    assert!(d.poll(5, Duration::from_millis(30)).is_none());
}

#[test]
fn a_keyboard_reports_keys_in_the_boot_format() {
    let m = pc_with_uhci("usb-kbd");
    let mut d = Driver::start(&m);
    d.enumerate(2, 7);
    let config = d.get_descriptor(7, desc::CONFIGURATION, 0, 255).unwrap();
    assert_eq!(desc::interface_class(&config), [3, 1, 1], "boot keyboard");
    assert!(
        d.control(7, setup::SET_PROTOCOL_BOOT, &[]).is_some(),
        "SET_PROTOCOL boot"
    );
    assert_eq!(d.control(7, setup::GET_PROTOCOL, &[]).unwrap(), vec![0]);
    assert!(
        d.control(7, setup::SET_REPORT_OUTPUT, &[0x02]).is_some(),
        "SET_REPORT: Caps Lock LED"
    );
    let input = machine_state(&m).unwrap().services().input();
    input.send_key(hid::QNUM_LEFT_CTRL, true);
    input.send_key(hid::QNUM_A, true);
    let ctrl = hid::MOD_LEFT_CTRL;
    assert_eq!(d.poll(7, WAIT).unwrap(), hid::keyboard_report(ctrl, &[]));
    let ctrl_a = hid::keyboard_report(ctrl, &[hid::USAGE_A]);
    assert_eq!(d.poll(7, WAIT).unwrap(), ctrl_a);
    assert!(d.poll(7, Duration::from_millis(30)).is_none());
    // An idle rate repeats the state unasked (SET_IDLE 4 x 4 ms).
    assert!(d.control(7, setup::set_idle(4), &[]).is_some());
    assert_eq!(d.poll(7, WAIT).unwrap(), ctrl_a);
}

/// `usb-storage` with a raw image: SCSI over the Bulk-Only Transport reads and writes
/// the image (checked in the file), a failed command's sense comes back through REQUEST
/// SENSE, and QEMU's error for a missing drive.
#[test]
fn a_usb_stick_reads_and_writes_its_image_over_bulk_only() {
    let content = bot::stick_content();
    let path = bot::stick_image("usb-storage", "stick.raw", &content);
    test_support::drives::add_raw_drive("usb-stick0", &path, false, false);
    let machine = pc_with_usb(
        "usbs",
        &[(
            "usb-storage",
            &[("drive", "usb-stick0"), ("serial", "S123")],
        )],
    );
    let mut d = Driver::start(&machine);
    let device = d.enumerate(1, 4);
    assert_eq!(desc::vendor(&device), 0x46f4);
    let serial = d.get_descriptor(4, desc::STRING, 3, 255).unwrap();
    assert_eq!(serial[2..], [b'S', 0, b'1', 0, b'2', 0, b'3', 0]);
    let config = d.get_descriptor(4, desc::CONFIGURATION, 0, 255).unwrap();
    assert_eq!(
        desc::interface_class(&config),
        [8, 6, 0x50],
        "mass storage, SCSI, Bulk-Only"
    );
    assert_eq!(
        d.control(4, setup::GET_MAX_LUN, &[]).unwrap(),
        vec![0],
        "one LUN"
    );

    let (inquiry, _, status) = d.bot(4, 1, &bot::inquiry(36), &[], 36);
    assert_eq!(status, 0);
    assert_eq!(&inquiry[8..16], b"QEMU    ");
    let (cap, residue, status) = d.bot(4, 2, &bot::READ_CAPACITY_10, &[], 8);
    assert_eq!((residue, status), (0, 0));
    assert_eq!(
        u32::from_be_bytes([cap[0], cap[1], cap[2], cap[3]]),
        2047,
        "last LBA"
    );
    // READ(10) of blocks 5-6 is the image's.
    let (data, residue, status) = d.bot(4, 3, &bot::read_10(5, 2), &[], 1024);
    assert_eq!((residue, status), (0, 0));
    assert_eq!(data, content[5 * 512..7 * 512]);
    // WRITE(10) of block 9 lands in the file.
    let block = bot::written_block();
    let (_, residue, status) = d.bot(4, 4, &bot::write_10(9, 1), &block, 0);
    assert_eq!((residue, status), (0, 0));
    let (_, _, status) = d.bot(4, 5, &bot::SYNCHRONIZE_CACHE_10, &[], 0);
    assert_eq!(status, 0, "SYNCHRONIZE CACHE");
    assert_eq!(std::fs::read(&path).unwrap()[9 * 512..10 * 512], block[..]);
    // A read past the end fails; REQUEST SENSE says why (ILLEGAL REQUEST, LBA out of range).
    let (_, residue, status) = d.bot(4, 6, &bot::read_10(0x1000, 1), &[], 512);
    assert_eq!((residue, status), (512, 1));
    let (sense, _, status) = d.bot(4, 7, &bot::request_sense(18), &[], 18);
    assert_eq!(status, 0);
    assert_eq!((sense[2] & 0xf, sense[12]), (5, 0x21));
    // A reply shorter than the host asked for: the residue is the difference.
    let (inquiry, residue, _) = d.bot(4, 8, &bot::inquiry(36), &[], 64);
    assert_eq!((inquiry.len(), residue), (36, 28));

    let bin = env!("CARGO_BIN_EXE_qomvm");
    let (code, stderr) =
        test_support::qtest::qomvm_pc_quit(bin, &["-usb", "-device", "usb-storage"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("-device usb-storage: drive property not set"),
        "{stderr}"
    );
}

/// A VM stop waits for the stick's command but not for its I/O limits (QEMU's drain
/// lifts them): with a read held back by a 512 bytes a second limit, `stop` comes back at
/// once, and the read is done when the VM runs again.
#[test]
fn a_stop_does_not_wait_out_the_sticks_io_limits() {
    use block::throttle::{Bucket, ThrottleConfig};
    use bot::BulkPipes;
    let content = bot::stick_content();
    let path = bot::stick_image("usb-storage", "throttled.raw", &content);
    let drive = test_support::drives::add_raw_drive("usb-stick-slow", &path, false, false);
    let machine = pc_with_usb("usbt", &[("usb-storage", &[("drive", "usb-stick-slow")])]);
    let mut d = Driver::start(&machine);
    d.enumerate(1, 4);
    let mut config = ThrottleConfig::default();
    config.bucket_mut(Bucket::BpsTotal).avg = 512;
    drive.set_io_limits("usb-stick-slow", false, config);
    // The first read fills the bucket for 16 seconds; the second waits for it.
    let (data, residue, status) = d.bot(4, 1, &bot::read_10(0, 16), &[], 16 * 512);
    assert_eq!((residue, status), (0, 0));
    assert_eq!(data, content[..16 * 512]);
    d.bulk_out(4, 2, &bot::cbw(2, 512, true, &bot::read_10(16, 1)));
    std::thread::sleep(Duration::from_millis(200));
    let ms = machine_state(&machine).unwrap();
    let began = Instant::now();
    runstate::vm_stop(ms, RunStatus::Paused).unwrap();
    let took = began.elapsed();
    runstate::vm_start(ms).unwrap();
    assert!(
        took < Duration::from_secs(2),
        "the stop waited {took:?} for the limits"
    );
    let mut stick = Stick { d: &mut d, addr: 4 };
    assert_eq!(stick.bulk_in(512), content[16 * 512..17 * 512]);
    assert_eq!(bot::csw(&stick.bulk_in(13), 2), (0, 0));
    drive.disable_io_limits();
}

#[test]
fn registers_and_devices_move_with_a_migration() {
    let m = pc_with_uhci("usb-mig");
    let mut d = Driver::start(&m);
    d.enumerate(1, 3);
    let save = |m: &ObjectRef, path: &[&str]| {
        let mut obj = m.clone();
        for p in path {
            obj = obj.child(p).unwrap();
        }
        (
            obj.clone(),
            device_impl(&obj).unwrap().save_state().unwrap(),
        )
    };
    let (_, hc) = save(&m, &["peripheral", "usb-mig"]);
    let (_, tablet) = save(&m, &["peripheral-anon", "device[0]"]);
    let m2 = pc_with_uhci("usb-mig");
    // The destination loads while stopped, as an incoming migration does.
    runstate::vm_stop(machine_state(&m2).unwrap(), RunStatus::Paused).unwrap();
    let (hc2, _) = save(&m2, &["peripheral", "usb-mig"]);
    let (tab2, _) = save(&m2, &["peripheral-anon", "device[0]"]);
    device_impl(&hc2).unwrap().load_state(&hc).unwrap();
    device_impl(&tab2).unwrap().load_state(&tablet).unwrap();
    let mut d2 = Driver::new(&m2, d.io_base);
    // The destination's guest memory has the schedule (a real migration moves RAM).
    d2.lay_out_schedule();
    runstate::vm_start(machine_state(&m2).unwrap()).unwrap();
    assert_eq!(d2.read(FLBASEADD, 4), FRAME_LIST);
    assert_eq!(d2.read(PORTSC1, 2) & 0x4, 0x4, "port 1 still enabled");
    assert_eq!(
        d2.get_descriptor(3, desc::DEVICE, 0, 18).unwrap()[..2],
        [18, 1],
        "the tablet kept its address"
    );
    machine_state(&m2)
        .unwrap()
        .services()
        .input()
        .send_position(1, 2, 0, 0);
    assert_eq!(
        d2.poll(3, WAIT).unwrap(),
        hid::tablet_report(0, 1, 2, 0),
        "and its configuration"
    );
    drop(d);
}

#[test]
fn hostile_schedules_halt_the_controller_and_never_hang() {
    let m = pc_with_uhci("usb-bad");
    let mut d = Driver::start(&m);
    // A queue head that links to itself with nothing in it: frames go on.
    d.mem
        .write_obj((QH as u32 | LINK_QH).to_le(), GuestAddress(QH))
        .unwrap();
    let (f0, f1) = d.frames_across(Duration::from_millis(30));
    assert_ne!(f1, f0, "a looping schedule does not stop the frames");
    d.mem
        .write_obj(LINK_TERM.to_le(), GuestAddress(QH))
        .unwrap();
    // A TD addressed to nobody times out; one asking for more than 1280 bytes is a
    // process error, which halts the controller.
    let lost = d.run(&[Td {
        pid: IN,
        addr: 99,
        ep: 1,
        toggle: false,
        len: 8,
        buffer: BUFFERS,
        ioc: false,
    }]);
    assert_ne!(lost[0] & TD_TIMEOUT, 0);
    let td = TDS + 0x4000;
    d.write_td(
        td,
        [
            LINK_TERM,
            TD_ACTIVE,
            token(IN, 0, 0, false, 0x601),
            BUFFERS as u32,
        ],
    );
    d.set_element(td as u32);
    d.wait_status(STS_HCPE | STS_HALTED);
    assert_eq!(d.read(USBCMD, 2) & CMD_RS, 0);
    // A frame list outside guest RAM is a host system error.
    d.write(USBSTS, 0xff, 2);
    d.write(FLBASEADD, 0xfff0_0000, 4);
    d.write(USBCMD, CMD_RS, 2);
    d.wait_status(STS_HSE | STS_HALTED);
    // Garbage everywhere: whatever it says, the controller keeps answering.
    let mut garbage = usb::Garbage::new();
    for round in 0..20 {
        let mut junk = garbage.bytes(0x3000);
        // Pointers into the junk, so the walk reads it.
        for w in junk.chunks_mut(4) {
            if w[0] & 3 == 0 {
                let p = 0x10_1000u32 + (u32::from(w[1]) << 4);
                w.copy_from_slice(&(p | u32::from(w[0] & 7)).to_le_bytes());
            }
        }
        d.mem.write_slice(&junk, GuestAddress(QH)).unwrap();
        d.write(USBCMD, CMD_HCRESET, 2);
        d.write(FLBASEADD, FRAME_LIST, 4);
        d.write(USBINTR, 0xf, 2);
        d.reset_port(1);
        d.reset_port(2);
        let f0 = d.read(FRNUM, 2);
        d.write(USBCMD, CMD_RS, 2);
        std::thread::sleep(Duration::from_millis(10));
        // The frames went on, or the controller halted with an error: a panic in the
        // frame walk would leave it running with the frame number stuck.
        let sts = d.read(USBSTS, 2);
        assert!(
            d.read(FRNUM, 2) != f0 || sts & (STS_HSE | STS_HCPE) != 0,
            "round {round}: frames stopped without an error (USBSTS {sts:#x})"
        );
    }
    // After all that, a clean schedule enumerates the tablet again.
    d.mem.write_slice(&[0u8; 0x3000], GuestAddress(QH)).unwrap();
    let mut d = Driver::start(&m);
    d.enumerate(1, 9);
    assert_eq!(
        d.get_descriptor(9, desc::DEVICE, 0, 18).unwrap()[..2],
        [18, 1]
    );
}

#[test]
fn qomvm_takes_usb_options_and_refuses_bad_ones_in_qemus_words() {
    let bin = env!("CARGO_BIN_EXE_qomvm");
    usb::assert_accepted(
        bin,
        &["-usb", "-usbdevice", "tablet", "-device", "usb-kbd,port=2"],
        "",
    );
    usb::assert_refused_as_qemu(
        bin,
        &[
            (
                &["-usbdevice", "braille"][..],
                "-usbdevice braille: usbdevice braille not found",
            ),
            (
                &["-usbdevice", "tablet:x"][..],
                "usbdevice tablet accepts no params",
            ),
            (
                &["-device", "usb-tablet"][..],
                "No 'usb-bus' bus found for device 'usb-tablet'",
            ),
            (
                &["-usb", "-device", "usb-tablet,port=3"][..],
                "usb port 3 (bus usb-bus.0) not found (in use?)",
            ),
            (
                &[
                    "-usb",
                    "-device",
                    "usb-tablet",
                    "-device",
                    "usb-mouse",
                    "-device",
                    "usb-kbd",
                ][..],
                "tried to attach usb device QEMU USB Keyboard to a bus with no free ports",
            ),
            (
                &["-usb", "-device", "usb-mouse,usb_version=3"][..],
                "usb_version 3 is not supported",
            ),
            (
                &["-usb", "-device", "usb-hub,ports=9"][..],
                "num_ports (9) out of range (1..8)",
            ),
            (
                &[
                    "-usb",
                    "-device",
                    "usb-hub,port=1",
                    "-device",
                    "usb-hub,port=1.1",
                    "-device",
                    "usb-hub,port=1.1.1",
                    "-device",
                    "usb-hub,port=1.1.1.1",
                    "-device",
                    "usb-hub,port=1.1.1.1.1",
                    "-device",
                    "usb-hub,port=1.1.1.1.1.1",
                ][..],
                "usb hub chain too deep",
            ),
        ],
    );
}

/// What Linux's uhci-hcd relies on beyond plain transfers: a short packet on an IN TD with
/// SPD stops its queue where it is (the element stays on it, the status TD does not run)
/// and interrupts; an inactive TD with IOC interrupts at the frame's end (the driver's
/// terminating TD); a device unplugged shows as a connect and enable change; a global
/// reset resets the devices (their address is 0 again).
#[test]
fn short_packets_idle_interrupts_unplug_and_global_reset_as_linux_expects() {
    let m = pc_with_uhci("usb-linux");
    let mut d = Driver::start(&m);
    d.enumerate(1, 6);
    // GET_DESCRIPTOR(device, 64 bytes): data TDs of 8 with SPD; the third gets 2 bytes.
    d.write(USBSTS, 0xff, 2);
    d.mem
        .write_slice(
            &setup::get_descriptor(desc::DEVICE, 0, 64),
            GuestAddress(BUFFERS),
        )
        .unwrap();
    let base = TDS + 0x6000;
    let td = |i: u64| base + 16 * i;
    let spd = 1u32 << 29;
    let mut words = vec![[
        td(1) as u32 | LINK_DEPTH,
        TD_ACTIVE | TD_ERRORS,
        token(SETUP, 6, 0, false, 8),
        BUFFERS as u32,
    ]];
    for i in 0..8u64 {
        words.push([
            td(i + 2) as u32 | LINK_DEPTH,
            TD_ACTIVE | TD_ERRORS | spd,
            token(IN, 6, 0, i % 2 == 0, 8),
            (BUFFERS + 0x100 + 8 * i) as u32,
        ]);
    }
    words.push([
        LINK_TERM,
        TD_ACTIVE | TD_ERRORS | TD_IOC,
        token(OUT, 6, 0, true, 0),
        0,
    ]);
    for (i, w) in words.into_iter().enumerate() {
        d.write_td(td(i as u64), w);
    }
    d.set_element(td(0) as u32);
    d.wait_status(STS_USBINT);
    std::thread::sleep(Duration::from_millis(5));
    let ctrl = |i: u64| d.td_status(td(i));
    assert_eq!(ctrl(3) & TD_ACTIVE, 0, "the short TD is retired");
    assert_eq!((ctrl(3) + 1) & 0x7ff, 2, "with 2 bytes");
    assert_ne!(ctrl(4) & TD_ACTIVE, 0, "the queue stopped there");
    assert_ne!(ctrl(9) & TD_ACTIVE, 0, "the status stage did not run");
    let element = d.mem.read_obj::<u32>(GuestAddress(QH + 4)).unwrap();
    assert_eq!(
        u64::from(element & !0xf),
        td(3),
        "the element stays on the short TD"
    );
    d.take_queue_down();

    // An inactive TD with IOC: an interrupt, nothing else.
    d.write(USBSTS, 0xff, 2);
    let idle = TDS + 0x7000;
    d.write_td(idle, [LINK_TERM, TD_IOC, token(IN, 99, 0, false, 1), 0]);
    d.set_element(idle as u32);
    d.wait_status(STS_USBINT);
    assert_eq!(
        d.read(USBSTS, 2) & STS_USBERR,
        0,
        "no transaction was tried"
    );
    d.set_element(LINK_TERM);

    // Unplugging the keyboard: port 2 says its connection and enable changed.
    d.reset_port(2);
    assert_eq!(d.read(PORTSC1 + 2, 2) & 0xf, 0x5, "connected and enabled");
    usb::unplug_anon(&m, 1);
    assert_eq!(
        d.read(PORTSC1 + 2, 2) & 0xf,
        0xa,
        "gone: connect and enable changed"
    );
    let usb = hw::usb::usb_bus::info_usb(&m);
    assert!(
        usb.contains("Product QEMU USB Tablet") && !usb.contains("Keyboard"),
        "{usb}"
    );

    // A global reset resets the devices: the tablet is at address 0 again.
    assert!(
        hw::usb::usb_bus::info_usb(&m).contains(".6, Port 1,"),
        "the tablet at address 6"
    );
    d.write(USBCMD, 4, 2);
    assert!(
        hw::usb::usb_bus::info_usb(&m).contains(".0, Port 1,"),
        "{}",
        hw::usb::usb_bus::info_usb(&m)
    );
    d.write(USBCMD, 0, 2);
    assert_ne!(d.read(USBSTS, 2) & STS_HALTED, 0);
}

/// `usb-hub` on port 1 with the tablet and the keyboard behind it ("1.1", "1.3"), as
/// libvirt places them with `<hub type='usb'/>`: the hub enumerates as a hub (its
/// descriptor, powered ports, connections in its status change bitmap); a port reset
/// through it enables the tablet, which then enumerates and reports at its own address;
/// `info usb` names the ports.
#[test]
fn devices_behind_a_hub_enumerate_through_its_ports() {
    let machine = pc_with_usb("usbh", &usb::HUB_TABLET_KBD);
    let busy = test_support::qtest::new_dev(&machine, "usb-mouse", &[("port", "1.3")]);
    let bus = usb::hc_bus(&machine, "usbh");
    assert_eq!(
        qdev_realize(&busy, Some(&bus)).unwrap_err().to_string(),
        "usb port 1.3 (bus usbh.0) not found (in use?)"
    );
    let usb = hw::usb::usb_bus::info_usb(&machine);
    assert!(
        usb.contains("Port 1, Speed 12 Mb/s, Product QEMU USB Hub"),
        "{usb}"
    );
    assert!(
        usb.contains("Port 1.1, Speed 12 Mb/s, Product QEMU USB Tablet"),
        "{usb}"
    );
    assert!(
        usb.contains("Port 1.3, Speed 12 Mb/s, Product QEMU USB Keyboard"),
        "{usb}"
    );

    let mut d = Driver::start(&machine);
    let device = d.enumerate(1, 2);
    assert_eq!(device[4], 9, "a hub");
    let hub_desc = d.control(2, setup::GET_HUB_DESCRIPTOR, &[]).unwrap();
    assert_eq!(&hub_desc[..3], &[11, 0x29, 8], "8 ports");
    let port_status = |d: &mut Driver, n: u8| {
        let s = d.control(2, setup::hub_port_status(n), &[]).unwrap();
        (
            u16::from_le_bytes([s[0], s[1]]),
            u16::from_le_bytes([s[2], s[3]]),
        )
    };
    assert_eq!(
        port_status(&mut d, 1),
        (0x0101, 0x0001),
        "powered, connected, changed"
    );
    assert_eq!(port_status(&mut d, 2), (0x0100, 0), "powered, empty");
    // The status change endpoint: ports 1 and 3 (bits 1 and 3).
    let hub_poll = d.poll(2, WAIT).unwrap();
    assert_eq!(hub_poll, vec![0x0a, 0]);
    // Nothing answers at address 0 before the hub's port is reset (disabled port).
    let stage = d.setup_stage(0, setup::get_descriptor(desc::DEVICE, 0, 18));
    assert_ne!(
        stage & TD_TIMEOUT,
        0,
        "the tablet's port is not enabled yet"
    );
    // Clear C_PORT_CONNECTION, SET_FEATURE(PORT_RESET) on port 1: enabled, C_PORT_RESET.
    d.control(
        2,
        setup::clear_port_feature(setup::C_PORT_CONNECTION, 1),
        &[],
    )
    .unwrap();
    d.control(2, setup::set_port_feature(setup::PORT_RESET, 1), &[])
        .unwrap();
    assert_eq!(port_status(&mut d, 1), (0x0103, 0x0010));
    let tablet = d
        .get_descriptor(0, desc::DEVICE, 0, 18)
        .expect("the tablet at address 0 behind the hub");
    assert_eq!(desc::vendor(&tablet), 0x0627);
    d.control(0, setup::set_address(3), &[]).unwrap();
    d.control(3, setup::set_configuration(1), &[]).unwrap();
    let input = machine_state(&machine).unwrap().services().input();
    assert!(d.poll(3, Duration::from_millis(30)).is_none());
    input.send_position(0x100, 0x200, 0, 0);
    assert_eq!(
        d.poll(3, WAIT).unwrap(),
        hid::tablet_report(0, 0x100, 0x200, 0)
    );
    // Unplugging the tablet shows on the hub's port, not the root's.
    usb::unplug_anon(&machine, 1);
    assert_eq!(
        port_status(&mut d, 1),
        (0x0100, 0x0013),
        "gone: connection and enable changed"
    );
    assert_eq!(d.read(PORTSC1, 2) & 0x0a, 0, "the root port saw nothing");
    // Unplugging the hub takes the keyboard behind it too.
    usb::unplug_anon(&machine, 0);
    let usb = hw::usb::usb_bus::info_usb(&machine);
    assert!(!usb.contains("Hub") && !usb.contains("Keyboard"), "{usb}");
    assert_ne!(d.read(PORTSC1, 2) & 0x02, 0, "the root port saw the hub go");
}
