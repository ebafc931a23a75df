//! What the USB tests (`tests/usb_uhci.rs`, `tests/usb_xhci.rs`) share, whichever host
//! controller their driver speaks to: a pc board on qtest with the controller at 05.0 and
//! devices on its bus ([`pc_with_hc`]), the standard, HID, hub and mass storage requests as
//! setup packets ([`setup`]), descriptor fields ([`desc`]), the reports of QEMU's tablet and
//! keyboard ([`hid`]), usb-storage's Bulk-Only Transport with the SCSI commands the tests
//! send ([`bot`]), the seeded garbage the hostile schedules are made of ([`Garbage`]) and
//! qomvm's command line as QEMU 7.2 takes or refuses it ([`assert_refused_as_qemu`]).

use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::qdev::{qdev_new, qdev_realize, qdev_unplug, DeviceMethods};
use hw::core::runstate;
use qom::ObjectRef;
use vm_memory::GuestMemoryMmap;

/// A USB device as `-device DRIVER,PROPS` on the controller's bus: (driver, props).
pub type UsbDevice<'a> = (&'a str, &'a [(&'a str, &'a str)]);

/// The tablet on port 1 and the keyboard on port 2.
pub const TABLET_KBD: [UsbDevice<'static>; 2] = [
    ("usb-tablet", &[("port", "1")]),
    ("usb-kbd", &[("port", "2")]),
];

/// A usb-hub on port 1 with the tablet behind it on its port 1 ("1.1") and the keyboard on
/// its port 3 ("1.3"), as libvirt places them with `<hub type='usb'/>`.
pub const HUB_TABLET_KBD: [UsbDevice<'static>; 3] = [
    ("usb-hub", &[("port", "1")]),
    ("usb-tablet", &[("port", "1.1")]),
    ("usb-kbd", &[("port", "1.3")]),
];

/// A pc machine on qtest (128 MiB) with the host controller `driver` (`id=ID`,
/// `addr=05.0` and `props`) and each of `devices` on its bus `<id>.0`, created but not
/// started (as an incoming migration's destination is).
pub fn pc_with_hc_stopped(
    driver: &str,
    id: &str,
    props: &[(&str, &str)],
    devices: &[UsbDevice],
) -> ObjectRef {
    let machine = crate::qtest::pc_on_qtest(128 << 20);
    let pci = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let hc = qdev_new(driver).unwrap();
    hc.property_parse("addr", "05.0").unwrap();
    for (k, v) in props {
        hc.property_parse(k, v).unwrap();
    }
    hc.set_device_id(Some(id.to_string()));
    qom::container_get(&machine, "peripheral")
        .add_child(id, &hc)
        .unwrap();
    qdev_realize(&hc, Some(&pci)).unwrap();
    let bus = hc
        .child(&format!("{id}.0"))
        .expect("the controller's bus <id>.0");
    for (driver, props) in devices {
        let dev = crate::qtest::new_dev(&machine, driver, props);
        qdev_realize(&dev, Some(&bus)).unwrap();
    }
    machine_creation_done(&machine).unwrap();
    machine
}

/// [`pc_with_hc_stopped`], started.
pub fn pc_with_hc(
    driver: &str,
    id: &str,
    props: &[(&str, &str)],
    devices: &[UsbDevice],
) -> ObjectRef {
    let machine = pc_with_hc_stopped(driver, id, props, devices);
    runstate::vm_start(machine_state(&machine).unwrap()).unwrap();
    machine
}

/// The bus `<id>.0` of the controller `id` (a [`pc_with_hc`] machine's).
pub fn hc_bus(machine: &ObjectRef, id: &str) -> ObjectRef {
    machine
        .child("peripheral")
        .unwrap()
        .child(id)
        .unwrap()
        .child(&format!("{id}.0"))
        .unwrap()
}

/// Unplugs the `n`th device added without an id (`peripheral-anon/device[n]`).
pub fn unplug_anon(machine: &ObjectRef, n: usize) {
    let dev = machine
        .child("peripheral-anon")
        .unwrap()
        .child(&format!("device[{n}]"))
        .unwrap();
    qdev_unplug(&dev).unwrap();
}

/// The machine's guest RAM, as the controller reaches it.
pub fn guest_ram(machine: &ObjectRef) -> GuestMemoryMmap {
    machine_state(machine)
        .unwrap()
        .services()
        .ram()
        .as_ref()
        .clone()
}

/// Setup packets (USB 2.0 chapter 9, HID 1.11, the hub class and Bulk-Only).
pub mod setup {
    /// GET_DESCRIPTOR of `kind` and `index` from `recipient` (0 the device, 1 an
    /// interface), `len` bytes.
    pub const fn get_descriptor_from(recipient: u8, kind: u8, index: u8, len: u16) -> [u8; 8] {
        let [l, h] = len.to_le_bytes();
        [0x80 | recipient, 6, index, kind, 0, 0, l, h]
    }

    /// GET_DESCRIPTOR of `kind` and `index` from the device, `len` bytes.
    pub const fn get_descriptor(kind: u8, index: u8, len: u16) -> [u8; 8] {
        get_descriptor_from(0, kind, index, len)
    }

    pub const fn set_address(addr: u8) -> [u8; 8] {
        [0, 5, addr, 0, 0, 0, 0, 0]
    }

    pub const fn set_configuration(value: u8) -> [u8; 8] {
        [0, 9, value, 0, 0, 0, 0, 0]
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT) on endpoint address `ep`.
    pub const fn clear_endpoint_halt(ep: u8) -> [u8; 8] {
        [0x02, 1, 0, 0, ep, 0, 0, 0]
    }

    /// HID SET_IDLE with a duration of `duration` x 4 ms (0: only on change).
    pub const fn set_idle(duration: u8) -> [u8; 8] {
        [0x21, 0x0a, 0, duration, 0, 0, 0, 0]
    }

    /// HID SET_PROTOCOL(boot).
    pub const SET_PROTOCOL_BOOT: [u8; 8] = [0x21, 0x0b, 0, 0, 0, 0, 0, 0];
    /// HID GET_PROTOCOL: one byte, 0 for boot.
    pub const GET_PROTOCOL: [u8; 8] = [0xa1, 0x03, 0, 0, 0, 0, 1, 0];
    /// HID SET_REPORT of a one-byte output report (the keyboard's LEDs).
    pub const SET_REPORT_OUTPUT: [u8; 8] = [0x21, 0x09, 0, 2, 0, 0, 1, 0];
    /// Bulk-Only GET_MAX_LUN: one byte.
    pub const GET_MAX_LUN: [u8; 8] = [0xa1, 0xfe, 0, 0, 0, 0, 1, 0];
    /// The hub class's GET_DESCRIPTOR(hub), 16 bytes.
    pub const GET_HUB_DESCRIPTOR: [u8; 8] = [0xa0, 6, 0, 0x29, 0, 0, 16, 0];

    /// The hub class's GET_STATUS of port `port`: wPortStatus and wPortChange.
    pub const fn hub_port_status(port: u8) -> [u8; 8] {
        [0xa3, 0, 0, 0, port, 0, 4, 0]
    }

    /// The hub class's CLEAR_FEATURE(`feature`) on port `port`.
    pub const fn clear_port_feature(feature: u8, port: u8) -> [u8; 8] {
        [0x23, 1, feature, 0, port, 0, 0, 0]
    }

    /// The hub class's SET_FEATURE(`feature`) on port `port`.
    pub const fn set_port_feature(feature: u8, port: u8) -> [u8; 8] {
        [0x23, 3, feature, 0, port, 0, 0, 0]
    }

    /// Hub port features.
    pub const PORT_RESET: u8 = 4;
    pub const C_PORT_CONNECTION: u8 = 16;
}

/// Descriptor types and the fields the tests read.
pub mod desc {
    pub const DEVICE: u8 = 1;
    pub const CONFIGURATION: u8 = 2;
    pub const STRING: u8 = 3;
    pub const DEVICE_QUALIFIER: u8 = 6;
    pub const HID_REPORT: u8 = 0x22;

    /// A device descriptor's idVendor.
    pub fn vendor(device: &[u8]) -> u16 {
        u16::from_le_bytes([device[8], device[9]])
    }

    /// A device descriptor's idProduct.
    pub fn product(device: &[u8]) -> u16 {
        u16::from_le_bytes([device[10], device[11]])
    }

    /// The first interface's (class, subclass, protocol), the interface descriptor right
    /// after the configuration's.
    pub fn interface_class(config: &[u8]) -> [u8; 3] {
        config[9 + 5..9 + 8].try_into().unwrap()
    }

    /// The endpoints of a whole configuration, in order: (address, attributes,
    /// wMaxPacketSize).
    pub fn endpoints(config: &[u8]) -> Vec<(u8, u8, u16)> {
        let mut eps = Vec::new();
        let mut at = 0;
        while at + 2 <= config.len() && config[at] >= 2 {
            let e = &config[at..(at + usize::from(config[at])).min(config.len())];
            if e[1] == 5 && e.len() >= 7 {
                eps.push((e[2], e[3], u16::from_le_bytes([e[4], e[5]])));
            }
            at += usize::from(config[at]);
        }
        eps
    }

    /// A string descriptor's text (UTF-16LE after the length and type).
    pub fn string(descriptor: &[u8]) -> String {
        char::decode_utf16(
            descriptor[2..]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        )
        .map(Result::unwrap)
        .collect()
    }
}

/// The input reports of QEMU's usb-tablet and usb-kbd (boot protocol), and the QEMU key
/// numbers the tests press.
pub mod hid {
    /// usb-tablet's report: buttons (bit 0 left), the absolute x and y (0..=0x7fff,
    /// little-endian) and the wheel.
    pub fn tablet_report(buttons: u8, x: u16, y: u16, wheel: i8) -> Vec<u8> {
        let [xl, xh] = x.to_le_bytes();
        let [yl, yh] = y.to_le_bytes();
        vec![buttons, xl, xh, yl, yh, wheel as u8]
    }

    /// A boot keyboard report: the modifier bits, a reserved byte and the usage codes of up
    /// to six keys down.
    pub fn keyboard_report(modifiers: u8, keys: &[u8]) -> Vec<u8> {
        let mut report = vec![modifiers, 0, 0, 0, 0, 0, 0, 0];
        report[2..2 + keys.len()].copy_from_slice(keys);
        report
    }

    /// The left Ctrl modifier bit.
    pub const MOD_LEFT_CTRL: u8 = 0x01;
    /// The usage code of `a`.
    pub const USAGE_A: u8 = 0x04;
    /// QEMU's numbers (`qnum`) of the left Ctrl and `a` keys.
    pub const QNUM_LEFT_CTRL: u16 = 0x1d;
    pub const QNUM_A: u16 = 0x1e;
}

/// usb-storage's Bulk-Only Transport: the CBW, the CSW, one command through whatever bulk
/// pipes the controller's driver has, the SCSI commands the tests send, and the image they
/// read and write.
pub mod bot {
    use std::path::PathBuf;

    /// A Command Block Wrapper of `tag` for `cdb`, announcing `data_len` bytes (in or out).
    pub fn cbw(tag: u32, data_len: u32, data_in: bool, cdb: &[u8]) -> Vec<u8> {
        let mut cbw = vec![0u8; 31];
        cbw[0..4].copy_from_slice(b"USBC");
        cbw[4..8].copy_from_slice(&tag.to_le_bytes());
        cbw[8..12].copy_from_slice(&data_len.to_le_bytes());
        cbw[12] = if data_in { 0x80 } else { 0 };
        cbw[14] = cdb.len() as u8;
        cbw[15..15 + cdb.len()].copy_from_slice(cdb);
        cbw
    }

    /// Checks a Command Status Wrapper (13 bytes, its signature, `tag`); returns its
    /// residue and status.
    pub fn csw(csw: &[u8], tag: u32) -> (u32, u8) {
        assert_eq!(csw.len(), 13, "a CSW is 13 bytes: {csw:x?}");
        assert_eq!(&csw[0..4], b"USBS", "{csw:x?}");
        assert_eq!(u32::from_le_bytes([csw[4], csw[5], csw[6], csw[7]]), tag);
        (
            u32::from_le_bytes([csw[8], csw[9], csw[10], csw[11]]),
            csw[12],
        )
    }

    /// The bulk endpoints of a mass storage device, as a controller's driver moves data on
    /// them (each checking its own completion).
    pub trait BulkPipes {
        /// Sends all of `data` on the bulk OUT endpoint.
        fn bulk_out(&mut self, data: &[u8]);
        /// Up to `len` bytes from the bulk IN endpoint, ending early at a short packet.
        fn bulk_in(&mut self, len: usize) -> Vec<u8>;
    }

    /// One Bulk-Only command: the CBW, the data (`out`, or `in_len` bytes in), the CSW.
    /// Returns the data in and the CSW's residue and status.
    pub fn command(
        pipes: &mut impl BulkPipes,
        tag: u32,
        cdb: &[u8],
        out: &[u8],
        in_len: usize,
    ) -> (Vec<u8>, u32, u8) {
        let data_len = if out.is_empty() { in_len } else { out.len() };
        pipes.bulk_out(&cbw(tag, data_len as u32, in_len > 0, cdb));
        let data = if in_len > 0 {
            pipes.bulk_in(in_len)
        } else {
            if !out.is_empty() {
                pipes.bulk_out(out);
            }
            Vec::new()
        };
        let (residue, status) = csw(&pipes.bulk_in(13), tag);
        (data, residue, status)
    }

    /// INQUIRY of `len` bytes.
    pub const fn inquiry(len: u8) -> [u8; 6] {
        [0x12, 0, 0, 0, len, 0]
    }
    pub const TEST_UNIT_READY: [u8; 6] = [0; 6];
    /// REQUEST SENSE of `len` bytes.
    pub const fn request_sense(len: u8) -> [u8; 6] {
        [0x03, 0, 0, 0, len, 0]
    }
    pub const READ_CAPACITY_10: [u8; 10] = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    pub const SYNCHRONIZE_CACHE_10: [u8; 10] = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    /// READ(10) of `blocks` from `lba`.
    pub const fn read_10(lba: u32, blocks: u16) -> [u8; 10] {
        rw_10(0x28, lba, blocks)
    }

    /// WRITE(10) of `blocks` at `lba`.
    pub const fn write_10(lba: u32, blocks: u16) -> [u8; 10] {
        rw_10(0x2a, lba, blocks)
    }

    const fn rw_10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
        let [a, b, c, d] = lba.to_be_bytes();
        let [h, l] = blocks.to_be_bytes();
        [op, 0, a, b, c, d, 0, h, l, 0]
    }

    /// The size of the stick's image: 2048 blocks of 512 bytes.
    pub const STICK_SIZE: usize = 1 << 20;

    /// What the stick's image holds: each byte its block number XOR its offset.
    pub fn stick_content() -> Vec<u8> {
        (0..STICK_SIZE)
            .map(|i| (i / 512) as u8 ^ (i as u8))
            .collect()
    }

    /// An image file `name` in `suite`'s scratch folder holding `content`.
    pub fn stick_image(suite: &str, name: &str, content: &[u8]) -> PathBuf {
        let path = crate::drives::temp_image(suite, name, content.len() as u64);
        std::fs::write(&path, content).unwrap();
        path
    }

    /// The block the tests write (block 9), unlike anything in [`stick_content`].
    pub fn written_block() -> Vec<u8> {
        (0..512).map(|i| (i * 7) as u8).collect()
    }
}

/// The seeded garbage (xorshift64, a fixed seed) the hostile-schedule tests fill rings and
/// schedules with: the same bytes on every run.
pub struct Garbage(u64);

impl Garbage {
    pub fn new() -> Self {
        Garbage(0x2545_f491_4f6c_dd1d)
    }

    /// The next `len` bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
}

impl Default for Garbage {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs qomvm (`bin`, the pc on qtest, quitting through QMP) with `args`, which it must
/// take: asserts it exits 0, saying `what` otherwise.
pub fn assert_accepted(bin: &str, args: &[&str], what: &str) {
    let (code, stderr) = crate::qtest::qomvm_pc_quit(bin, args);
    assert_eq!(code, Some(0), "{what}{stderr}");
}

/// Runs qomvm (`bin`, the pc on qtest) with each case's arguments, which QEMU 7.2 refuses
/// with the case's error: asserts qomvm exits 1 with that error as its one line of stderr,
/// naming every case where it does not.
pub fn assert_refused_as_qemu(bin: &str, cases: &[(&[&str], &str)]) {
    let mut bad = Vec::new();
    for (args, error) in cases {
        let (code, stderr) = crate::qtest::qomvm_pc_quit(bin, args);
        if code != Some(1) || !stderr.contains(error) || stderr.lines().count() != 1 {
            bad.push(format!(
                "{args:?}: exit {code:?}, stderr {stderr:?}; QEMU 7.2 exits 1 with {error:?}"
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_packets_are_the_bytes_on_the_wire() {
        assert_eq!(
            setup::get_descriptor(desc::DEVICE, 0, 18),
            [0x80, 6, 0, 1, 0, 0, 18, 0]
        );
        assert_eq!(
            setup::get_descriptor_from(1, desc::HID_REPORT, 0, 0x134),
            [0x81, 6, 0, 0x22, 0, 0, 0x34, 1]
        );
        assert_eq!(setup::set_idle(4), [0x21, 0x0a, 0, 4, 0, 0, 0, 0]);
        assert_eq!(
            setup::clear_port_feature(setup::C_PORT_CONNECTION, 1),
            [0x23, 1, 16, 0, 1, 0, 0, 0]
        );
    }

    #[test]
    fn scsi_commands_and_wrappers() {
        assert_eq!(bot::read_10(5, 8), [0x28, 0, 0, 0, 0, 5, 0, 0, 8, 0]);
        assert_eq!(bot::read_10(4096, 1), [0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0]);
        assert_eq!(bot::write_10(9, 1), [0x2a, 0, 0, 0, 0, 9, 0, 0, 1, 0]);
        let cbw = bot::cbw(7, 36, true, &bot::inquiry(36));
        assert_eq!(&cbw[..16], b"USBC\x07\0\0\0\x24\0\0\0\x80\0\x06\x12");
        assert_eq!(cbw.len(), 31);
        let mut csw = b"USBS\x07\0\0\0\x1c\0\0\0\x01".to_vec();
        assert_eq!(bot::csw(&csw, 7), (28, 1));
        csw.push(0);
        assert!(std::panic::catch_unwind(|| bot::csw(&csw, 7)).is_err());
    }

    #[test]
    fn reports_and_descriptors() {
        assert_eq!(
            hid::tablet_report(1, 0x4000, 0x2000, 0),
            [1, 0x00, 0x40, 0x00, 0x20, 0]
        );
        assert_eq!(
            hid::tablet_report(0, 0x7fff, 0, -1),
            [0, 0xff, 0x7f, 0, 0, 0xff]
        );
        assert_eq!(
            hid::keyboard_report(hid::MOD_LEFT_CTRL, &[hid::USAGE_A]),
            [1, 0, 4, 0, 0, 0, 0, 0]
        );
        assert_eq!(desc::string(&[8, 3, b'Q', 0, b'E', 0, b'M', 0]), "QEM");
        let config = [
            9, 2, 32, 0, 1, 1, 0, 0x80, 50, // configuration
            9, 4, 0, 0, 2, 8, 6, 0x50, 0, // interface: mass storage, SCSI, BOT
            7, 5, 0x81, 2, 0, 2, 0, // bulk IN 1, 512
            7, 5, 0x02, 2, 0x40, 0, 0, // bulk OUT 2, 64
        ];
        assert_eq!(desc::interface_class(&config), [8, 6, 0x50]);
        assert_eq!(desc::endpoints(&config), [(0x81, 2, 512), (0x02, 2, 64)]);
    }

    #[test]
    fn garbage_is_the_same_every_time() {
        let mut g = Garbage::new();
        let a = g.bytes(64);
        assert_ne!(a, g.bytes(64));
        assert_eq!(Garbage::new().bytes(64), a);
    }
}
