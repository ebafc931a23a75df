//! `qemu-xhci` (QEMU 7.2's hw/usb/hcd-xhci.c, hcd-xhci-pci.c) on the pc board under the
//! qtest accelerator, driven by the test's own xHCI driver written from the xHCI 1.2
//! specification: DCBAA, a command ring, one event ring segment, device and input
//! contexts and transfer rings in guest memory, as Linux's xhci-hcd lays them out.
//!
//! The same driver and the same scenarios also run against QEMU 7.2 itself
//! (`qemu-system-x86_64 -qtest stdio`, when installed; its CPU held by a BIOS that only
//! halts, since this QEMU has no qtest accelerator), so what the tests expect is what QEMU
//! does, not what the device under test happens to do. Where QEMU 7.2 departs from the
//! xHCI specification (CRCR reads without CRR, a Command Ring Stopped event with pointer
//! 0, IMOD reset to 0) the tests check neither.
//!
//! Covered: the PCI function and its capability registers, ports and their status change
//! events, the commands and their completion codes, enumeration of usb-tablet, usb-kbd
//! and usb-storage through control transfers, interrupt and bulk transfers (short
//! packets, stalls and their recovery, Event Data TRBs, Link TRBs with Toggle Cycle),
//! interrupts (INTx and MSI-X), migration, hostile rings and contexts, the command line
//! and `info usb`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hw::core::machine::machine_state;
use hw::core::runstate::{self, RunStatus};
use qom::ObjectRef;
use serde_json::json;
use test_support::usb::bot::{self, BulkPipes};
use test_support::usb::{self, desc, hid, setup, UsbDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DEVFN: u32 = 5 << 3;
/// Where BAR 0 goes when nobody placed it (QEMU under qtest runs no firmware).
const BAR_DEFAULT: u64 = 0xfe80_0000;
const WAIT: Duration = Duration::from_secs(10);

/// Guest memory layout (128 MiB of RAM).
const DCBAA: u64 = 0x20_0000;
const CMD_RING: u64 = 0x21_0000;
const EV_RING: u64 = 0x22_0000;
const ERST: u64 = 0x22_f000;
const DEV_CTX: u64 = 0x30_0000;
const IN_CTX: u64 = 0x40_0000;
const TR_RINGS: u64 = 0x50_0000;
const BUFFERS: u64 = 0x100_0000;
/// TRBs in the command ring and in each transfer ring (the last one the Link TRB).
const RING_TRBS: u64 = 64;
const EV_TRBS: u64 = 256;

/// Operational registers (from CAPLENGTH 0x40).
const USBCMD: u64 = 0x40;
const USBSTS: u64 = 0x44;
const PAGESIZE: u64 = 0x48;
const DNCTRL: u64 = 0x54;
const CRCR: u64 = 0x58;
const DCBAAP: u64 = 0x70;
const CONFIG: u64 = 0x78;
const PORTSC: u64 = 0x440;
/// Runtime registers.
const MFINDEX: u64 = 0x1000;
const IMAN: u64 = 0x1020;
const IMOD: u64 = 0x1024;
const ERSTSZ: u64 = 0x1028;
const ERSTBA: u64 = 0x1030;
const ERDP: u64 = 0x1038;
const DOORBELL: u64 = 0x2000;

const CMD_RS: u32 = 1;
const CMD_HCRST: u32 = 2;
const CMD_INTE: u32 = 4;
const STS_HCH: u32 = 1;
const STS_HSE: u32 = 4;
const STS_EINT: u32 = 8;
const STS_CNR: u32 = 1 << 11;
const STS_HCE: u32 = 1 << 12;

const PORT_CCS: u32 = 1;
const PORT_PED: u32 = 2;
const PORT_PR: u32 = 1 << 4;
const PORT_PP: u32 = 1 << 9;
const PORT_CSC: u32 = 1 << 17;
const PORT_PRC: u32 = 1 << 21;
/// CSC, PEC, WRC, OCC, PRC, PLC, CEC.
const PORT_CHANGES: u32 = 0x00fe_0000;

/// TRB types.
const TRB_NORMAL: u32 = 1;
const TRB_SETUP: u32 = 2;
const TRB_DATA: u32 = 3;
const TRB_STATUS: u32 = 4;
const TRB_LINK: u32 = 6;
const TRB_EVENT_DATA: u32 = 7;
const TRB_ENABLE_SLOT: u32 = 9;
const TRB_DISABLE_SLOT: u32 = 10;
const TRB_ADDRESS_DEVICE: u32 = 11;
const TRB_CONFIGURE_EP: u32 = 12;
const TRB_EVALUATE_CONTEXT: u32 = 13;
const TRB_RESET_EP: u32 = 14;
const TRB_STOP_EP: u32 = 15;
const TRB_SET_TR_DEQ: u32 = 16;
const TRB_RESET_DEVICE: u32 = 17;
const TRB_NOOP_CMD: u32 = 23;
const EV_TRANSFER: u32 = 32;
const EV_COMMAND: u32 = 33;
const EV_PORT: u32 = 34;

/// TRB control bits.
const TRB_TC: u32 = 1 << 1;
const TRB_ISP: u32 = 1 << 2;
const TRB_CH: u32 = 1 << 4;
const TRB_IOC: u32 = 1 << 5;
const TRB_IDT: u32 = 1 << 6;
const TRB_BSR: u32 = 1 << 9;
const TRB_DC: u32 = 1 << 9;
const TRB_DIR_IN: u32 = 1 << 16;

/// Completion codes.
const CC_SUCCESS: u8 = 1;
const CC_TRB_ERROR: u8 = 5;
const CC_STALL: u8 = 6;
const CC_NO_SLOTS: u8 = 9;
const CC_SLOT_NOT_ENABLED: u8 = 11;
const CC_EP_NOT_ENABLED: u8 = 12;
const CC_SHORT_PACKET: u8 = 13;
const CC_CONTEXT_STATE: u8 = 19;
const CC_STOPPED: u8 = 26;

/// Endpoint context types and states.
const EP_CONTROL: u32 = 4;
const EP_BULK_OUT: u32 = 2;
const EP_BULK_IN: u32 = 6;
const EP_INT_IN: u32 = 7;
const EP_RUNNING: u32 = 1;
const EP_HALTED: u32 = 2;
const EP_STOPPED: u32 = 3;
/// Slot states.
const SLOT_DEFAULT: u32 = 1;
const SLOT_ADDRESSED: u32 = 2;
const SLOT_CONFIGURED: u32 = 3;

// ---------------------------------------------------------------------------------------
// The machine under the driver: qomvm in this process, or QEMU 7.2 over qtest.

trait Machine {
    fn mmio_read(&self, addr: u64, size: u32) -> u64;
    fn mmio_write(&self, addr: u64, value: u64, size: u32);
    fn io_read(&self, port: u64, size: u32) -> u64;
    fn io_write(&self, port: u64, value: u64, size: u32);
    fn mem_read(&self, addr: u64, len: usize) -> Vec<u8>;
    fn mem_write(&self, addr: u64, data: &[u8]);
    /// An absolute pointer position (0..0x7fff) with `buttons` (bit 0 left).
    fn pointer(&self, x: u16, y: u16, buttons: u8);
    /// A key by its QEMU number.
    fn key(&self, qnum: u16, down: bool);
    /// `info usb`.
    fn info_usb(&self) -> String;
    /// Which one it is, for messages.
    fn name(&self) -> &'static str;
}

/// qomvm in this process: a pc machine on the qtest accelerator.
struct Qomvm {
    machine: ObjectRef,
    mem: GuestMemoryMmap,
}

impl Qomvm {
    fn new(machine: &ObjectRef) -> Qomvm {
        Qomvm {
            machine: machine.clone(),
            mem: usb::guest_ram(machine),
        }
    }
}

impl Machine for Qomvm {
    fn mmio_read(&self, addr: u64, size: u32) -> u64 {
        machine_state(&self.machine)
            .unwrap()
            .system_memory()
            .read(addr, size)
    }
    fn mmio_write(&self, addr: u64, value: u64, size: u32) {
        machine_state(&self.machine)
            .unwrap()
            .system_memory()
            .write(addr, value, size)
    }
    fn io_read(&self, port: u64, size: u32) -> u64 {
        machine_state(&self.machine)
            .unwrap()
            .system_io()
            .read(port, size)
    }
    fn io_write(&self, port: u64, value: u64, size: u32) {
        machine_state(&self.machine)
            .unwrap()
            .system_io()
            .write(port, value, size)
    }
    fn mem_read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
    fn mem_write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
    fn pointer(&self, x: u16, y: u16, buttons: u8) {
        machine_state(&self.machine)
            .unwrap()
            .services()
            .input()
            .send_position(x, y, 0, buttons);
    }
    fn key(&self, qnum: u16, down: bool) {
        machine_state(&self.machine)
            .unwrap()
            .services()
            .input()
            .send_key(qnum, down);
    }
    fn info_usb(&self) -> String {
        hw::usb::usb_bus::info_usb(&self.machine)
    }
    fn name(&self) -> &'static str {
        "qomvm"
    }
}

/// QEMU 7.2 as `qemu-system-x86_64 -M pc -qtest stdio`, with QMP on a socket for input
/// and `info usb`.
struct Qemu {
    child: std::cell::RefCell<std::process::Child>,
    stdin: std::cell::RefCell<std::process::ChildStdin>,
    stdout: std::cell::RefCell<std::io::BufReader<std::process::ChildStdout>>,
    qmp: std::cell::RefCell<test_support::qmp::QmpClient>,
    dir: std::path::PathBuf,
}

impl Qemu {
    /// QEMU with `args` after the board's, or `None` (the test says so) where QEMU is
    /// not installed.
    fn start(tag: &str, args: &[&str]) -> Option<Qemu> {
        use std::process::{Command, Stdio};
        if Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            test_support::skip::skip(
                "qemu-system-x86_64 (package qemu-system-x86) is not installed: no comparison with QEMU 7.2",
            );
            return None;
        }
        let dir =
            std::env::temp_dir().join(format!("qomvm-qemu-xhci-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        // This QEMU has no qtest accelerator: the CPU runs (TCG), so a BIOS that only
        // halts keeps SeaBIOS from driving the controller behind the test's back.
        let mut bios = vec![0xf4u8; 0x1_0000];
        bios[0xfff0..0xfff4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
        let bios_path = dir.join("halt.bin");
        std::fs::write(&bios_path, bios).unwrap();
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "pc",
                "-m",
                "128M",
                "-display",
                "none",
                "-nodefaults",
                "-accel",
                "tcg",
            ])
            .arg("-bios")
            .arg(&bios_path)
            .args(["-qtest", "stdio", "-qtest-log", "/dev/null"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let qmp = test_support::qmp::QmpClient::connect(&sock);
        Some(Qemu {
            child: child.into(),
            stdin: stdin.into(),
            stdout: stdout.into(),
            qmp: qmp.into(),
            dir,
        })
    }

    fn cmd(&self, line: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin.borrow_mut(), "{line}").unwrap();
        let mut out = self.stdout.borrow_mut();
        loop {
            let mut reply = String::new();
            assert_ne!(out.read_line(&mut reply).unwrap(), 0, "QEMU went: {line}");
            let reply = reply.trim();
            if reply.starts_with("OK") {
                return reply.trim_start_matches("OK").trim().to_string();
            }
            assert!(
                !reply.starts_with("FAIL") && !reply.starts_with("ERR"),
                "{line}: {reply}"
            );
        }
    }

    fn num(&self, line: &str) -> u64 {
        let v = self.cmd(line);
        u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    }

    fn input(&self, events: serde_json::Value) {
        let r = self
            .qmp
            .borrow_mut()
            .execute("input-send-event", json!({ "events": events }));
        assert!(r.get("return").is_some(), "{r}");
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let mut child = self.child.borrow_mut();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Machine for Qemu {
    fn mmio_read(&self, addr: u64, size: u32) -> u64 {
        let op = ["readb", "readw", "", "readl"][size as usize - 1];
        self.num(&format!("{op} {addr:#x}"))
    }
    fn mmio_write(&self, addr: u64, value: u64, size: u32) {
        let op = ["writeb", "writew", "", "writel"][size as usize - 1];
        self.cmd(&format!("{op} {addr:#x} {value:#x}"));
    }
    fn io_read(&self, port: u64, size: u32) -> u64 {
        let op = ["inb", "inw", "", "inl"][size as usize - 1];
        self.num(&format!("{op} {port:#x}"))
    }
    fn io_write(&self, port: u64, value: u64, size: u32) {
        let op = ["outb", "outw", "", "outl"][size as usize - 1];
        self.cmd(&format!("{op} {port:#x} {value:#x}"));
    }
    fn mem_read(&self, addr: u64, len: usize) -> Vec<u8> {
        let hex = self.cmd(&format!("read {addr:#x} {len:#x}"));
        let hex = hex.trim_start_matches("0x");
        (0..len)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }
    fn mem_write(&self, addr: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        self.cmd(&format!("write {addr:#x} {:#x} 0x{hex}", data.len()));
    }
    fn pointer(&self, x: u16, y: u16, buttons: u8) {
        self.input(json!([
            {"type": "abs", "data": {"axis": "x", "value": x}},
            {"type": "abs", "data": {"axis": "y", "value": y}},
            {"type": "btn", "data": {"down": buttons & 1 != 0, "button": "left"}},
        ]));
    }
    fn key(&self, qnum: u16, down: bool) {
        self.input(json!([
            {"type": "key", "data": {"down": down, "key": {"type": "number", "data": qnum}}}
        ]));
    }
    fn info_usb(&self) -> String {
        let r = self
            .qmp
            .borrow_mut()
            .execute("human-monitor-command", json!({"command-line": "info usb"}));
        r["return"].as_str().unwrap().replace("\r\n", "\n")
    }
    fn name(&self) -> &'static str {
        "QEMU 7.2"
    }
}

// ---------------------------------------------------------------------------------------
// The driver.

#[derive(Clone, Copy, Debug, PartialEq)]
struct Trb {
    param: u64,
    status: u32,
    control: u32,
}

impl Trb {
    /// A TRB of type `kind` with `param`, `status` and the control bits `flags` (the cycle
    /// bit is the ring's to set).
    const fn new(kind: u32, param: u64, status: u32, flags: u32) -> Trb {
        Trb {
            param,
            status,
            control: kind << 10 | flags,
        }
    }
    /// A Setup Stage TRB for `setup` (immediate data) with Transfer Type `trt`.
    fn setup(setup: [u8; 8], trt: u32) -> Trb {
        Trb::new(TRB_SETUP, u64::from_le_bytes(setup), 8, TRB_IDT | trt << 16)
    }
    /// The TRB in the 16 bytes `b`, as it lies in memory.
    fn from_bytes(b: &[u8]) -> Trb {
        Trb {
            param: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            status: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            control: u32::from_le_bytes(b[12..16].try_into().unwrap()),
        }
    }
    /// The TRB as it lies in memory.
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.param.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.control.to_le_bytes());
        b
    }
    fn kind(&self) -> u32 {
        (self.control >> 10) & 0x3f
    }
    fn ccode(&self) -> u8 {
        (self.status >> 24) as u8
    }
    fn slot(&self) -> u8 {
        (self.control >> 24) as u8
    }
    fn epid(&self) -> u32 {
        (self.control >> 16) & 0x1f
    }
    /// A Transfer Event's residual length.
    fn residual(&self) -> u32 {
        self.status & 0xff_ffff
    }
}

/// A No Op command.
const NOOP: Trb = Trb::new(TRB_NOOP_CMD, 0, 0, 0);
/// A Setup Stage's Transfer Type for an IN data stage.
const TRT_IN: u32 = 3;

/// GET_DESCRIPTOR(device) of `len` bytes as one TD on EP0: the Setup Stage, an IN Data
/// Stage of `len` bytes at `buf` (with `data_flags`) and the Status Stage (IOC).
fn device_descriptor_td(buf: u64, len: u16, data_flags: u32) -> [Trb; 3] {
    [
        Trb::setup(setup::get_descriptor(desc::DEVICE, 0, len), TRT_IN),
        Trb::new(TRB_DATA, buf, u32::from(len), TRB_DIR_IN | data_flags),
        Trb::new(TRB_STATUS, 0, 0, TRB_IOC),
    ]
}

/// A producer ring (command or transfer): `RING_TRBS` TRBs, the last a Link back to the
/// start with Toggle Cycle.
#[derive(Clone, Copy, Debug)]
struct Ring {
    base: u64,
    idx: u64,
    cycle: bool,
}

impl Ring {
    fn new(base: u64) -> Ring {
        Ring {
            base,
            idx: 0,
            cycle: true,
        }
    }
}

/// What the driver knows of an enabled slot.
#[derive(Clone, Debug)]
struct Slot {
    port: u8,
    speed: u32,
    /// Transfer rings by DCI.
    rings: Vec<Option<Ring>>,
}

struct Driver {
    hw: Box<dyn Machine>,
    bar: u64,
    cmd: Ring,
    ev_idx: u64,
    ev_cycle: bool,
    /// Events read but not yet asked for.
    pending: VecDeque<Trb>,
    slots: Vec<Option<Slot>>,
}

impl Driver {
    /// Finds the function at 05.0, places BAR 0 if nobody did, turns on memory and bus
    /// mastering; nothing else.
    fn probe(hw: Box<dyn Machine>) -> Driver {
        let mut d = Driver {
            hw,
            bar: 0,
            cmd: Ring::new(CMD_RING),
            ev_idx: 0,
            ev_cycle: true,
            pending: VecDeque::new(),
            slots: vec![None; 256],
        };
        let mut bar = u64::from(d.cfg_read(0x10, 4) & !0xf) | u64::from(d.cfg_read(0x14, 4)) << 32;
        if bar == 0 {
            d.cfg_write(0x10, BAR_DEFAULT as u32, 4);
            d.cfg_write(0x14, 0, 4);
            bar = BAR_DEFAULT;
        }
        d.bar = bar;
        d.cfg_write(0x04, 0x6, 2);
        d
    }

    /// [`Driver::probe`], then a host controller reset and Linux's set-up: MaxSlotsEn,
    /// DCBAAP, the command ring, interrupter 0's event ring, interrupts enabled, running.
    fn start(hw: Box<dyn Machine>) -> Driver {
        let mut d = Driver::probe(hw);
        d.init();
        d
    }

    fn init(&mut self) {
        self.write(USBCMD, CMD_HCRST);
        self.wait_reg(USBCMD, CMD_HCRST, 0);
        self.wait_reg(USBSTS, STS_CNR, 0);
        self.cmd = Ring::new(CMD_RING);
        self.ev_idx = 0;
        self.ev_cycle = true;
        self.pending.clear();
        self.slots = vec![None; 256];
        self.zero(DCBAA, 0x1000);
        self.zero(CMD_RING, RING_TRBS as usize * 16);
        self.zero(EV_RING, EV_TRBS as usize * 16);
        let slots = self.read(0x04) & 0xff;
        self.write(CONFIG, slots);
        self.write64(DCBAAP, DCBAA);
        self.write64(CRCR, CMD_RING | 1);
        self.write_erst(ERST, EV_RING, EV_TRBS as u32);
        self.write(ERSTSZ, 1);
        self.write64(ERDP, EV_RING);
        self.write64(ERSTBA, ERST);
        self.write(IMOD, 0);
        self.write(IMAN, 2);
        self.run();
    }

    /// Run/Stop set (interrupts enabled): running.
    fn run(&self) {
        self.write(USBCMD, CMD_RS | CMD_INTE);
        self.wait_reg(USBSTS, STS_HCH, 0);
    }

    /// Run/Stop clear: halted.
    fn halt(&self) {
        self.write(USBCMD, 0);
        self.wait_reg(USBSTS, STS_HCH, STS_HCH);
    }

    /// An Event Ring Segment Table at `erst` of one segment: `size` TRBs at `ring`.
    fn write_erst(&self, erst: u64, ring: u64, size: u32) {
        let mut entry = [0u8; 16];
        entry[0..8].copy_from_slice(&ring.to_le_bytes());
        entry[8..12].copy_from_slice(&size.to_le_bytes());
        self.hw.mem_write(erst, &entry);
    }

    /// The offset of PCI capability `id`, or 0 (among the first 16).
    fn find_cap(&self, id: u32) -> u32 {
        let mut cap = self.cfg_read(0x34, 1) & 0xfc;
        for _ in 0..16 {
            if cap == 0 || self.cfg_read(cap, 1) == id {
                break;
            }
            cap = self.cfg_read(cap + 1, 1) & 0xfc;
        }
        cap
    }

    fn cfg_read(&self, reg: u32, size: u32) -> u32 {
        self.hw
            .io_write(0xcf8, u64::from(0x8000_0000 | DEVFN << 8 | (reg & 0xfc)), 4);
        self.hw.io_read(0xcfc + u64::from(reg & 3), size) as u32
    }

    fn cfg_write(&self, reg: u32, value: u32, size: u32) {
        self.hw
            .io_write(0xcf8, u64::from(0x8000_0000 | DEVFN << 8 | (reg & 0xfc)), 4);
        self.hw
            .io_write(0xcfc + u64::from(reg & 3), value.into(), size);
    }

    fn read(&self, reg: u64) -> u32 {
        self.hw.mmio_read(self.bar + reg, 4) as u32
    }

    fn write(&self, reg: u64, value: u32) {
        self.hw.mmio_write(self.bar + reg, value.into(), 4)
    }

    /// A 64-bit register as Linux's lo_hi_writeq writes it.
    fn write64(&self, reg: u64, value: u64) {
        self.write(reg, value as u32);
        self.write(reg + 4, (value >> 32) as u32);
    }

    fn wait_reg(&self, reg: u64, mask: u32, value: u32) -> u32 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.read(reg);
            if v & mask == value {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: register {reg:#x} = {v:#x}, never {value:#x} under {mask:#x}",
                self.hw.name()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn zero(&self, addr: u64, len: usize) {
        self.hw.mem_write(addr, &vec![0u8; len]);
    }

    fn r32(&self, addr: u64) -> u32 {
        let b = self.hw.mem_read(addr, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn w32(&self, addr: u64, v: u32) {
        self.hw.mem_write(addr, &v.to_le_bytes());
    }

    fn w64(&self, addr: u64, v: u64) {
        self.hw.mem_write(addr, &v.to_le_bytes());
    }

    /// Writes `trb` at `addr` as it is (its cycle bit too).
    fn write_trb(&self, addr: u64, trb: Trb) {
        self.hw.mem_write(addr, &trb.bytes());
    }

    fn portsc(&self, port: u8) -> u32 {
        self.read(PORTSC + 0x10 * u64::from(port - 1))
    }

    /// Writes PORTSC keeping PP and leaving the RW1C and RW1S bits alone, then ORs `bits`.
    fn portsc_write(&self, port: u8, bits: u32) {
        self.write(PORTSC + 0x10 * u64::from(port - 1), PORT_PP | bits);
    }

    /// The xHCI port of the USB 2.0 protocol for USB port `bus_port` (as `port=` says),
    /// from the Supported Protocol capability.
    fn usb2_port(&self, bus_port: u8) -> u8 {
        let (offset, count) = self.protocol_ports(0x02);
        assert!(bus_port <= count);
        offset + bus_port - 1
    }

    /// The xHCI port where the device on USB port `bus_port` shows: its USB 2.0 port, or
    /// its USB 3.0 one for a SuperSpeed device (QEMU's usb-storage).
    fn port_of(&self, bus_port: u8) -> u8 {
        let usb2 = self.usb2_port(bus_port);
        if self.portsc(usb2) & PORT_CCS != 0 {
            return usb2;
        }
        let (offset, count) = self.protocol_ports(0x03);
        assert!(bus_port <= count);
        let usb3 = offset + bus_port - 1;
        assert_ne!(
            self.portsc(usb3) & PORT_CCS,
            0,
            "{}: nothing on USB port {bus_port}",
            self.hw.name()
        );
        usb3
    }

    /// The (first port, count) of the Supported Protocol capability of `major` revision.
    fn protocol_ports(&self, major: u32) -> (u8, u8) {
        let mut at = u64::from((self.read(0x10) >> 16) << 2);
        for _ in 0..16 {
            assert_ne!(at, 0, "no Supported Protocol capability for USB {major}");
            let head = self.read(at);
            if head & 0xff == 2 && head >> 24 == major {
                let ports = self.read(at + 8);
                return (ports as u8, (ports >> 8) as u8);
            }
            let next = u64::from((head >> 8) & 0xff) << 2;
            if next == 0 {
                break;
            }
            at += next;
        }
        panic!("no Supported Protocol capability for USB {major}");
    }

    /// Places `trb` on `ring` with the producer cycle, wrapping through the Link TRB.
    /// Returns its address.
    fn put(&self, ring: &mut Ring, mut trb: Trb) -> u64 {
        let addr = ring.base + 16 * ring.idx;
        trb.control = (trb.control & !1) | u32::from(ring.cycle);
        // The cycle bit last: the control dword after the rest.
        let b = trb.bytes();
        self.hw.mem_write(addr, &b[..12]);
        self.hw.mem_write(addr + 12, &b[12..]);
        ring.idx += 1;
        if ring.idx == RING_TRBS - 1 {
            let link = Trb::new(TRB_LINK, ring.base, 0, TRB_TC | u32::from(ring.cycle));
            self.write_trb(ring.base + 16 * ring.idx, link);
            ring.idx = 0;
            ring.cycle = !ring.cycle;
        }
        addr
    }

    /// The next event, if one is there within `patience`; ERDP follows (EHB cleared).
    fn next_event(&mut self, patience: Duration) -> Option<Trb> {
        if let Some(e) = self.pending.pop_front() {
            return Some(e);
        }
        let deadline = Instant::now() + patience;
        loop {
            let addr = EV_RING + 16 * self.ev_idx;
            let trb = Trb::from_bytes(&self.hw.mem_read(addr, 16));
            if trb.control & 1 == u32::from(self.ev_cycle) {
                self.ev_idx += 1;
                if self.ev_idx == EV_TRBS {
                    self.ev_idx = 0;
                    self.ev_cycle = !self.ev_cycle;
                }
                self.write64(ERDP, (EV_RING + 16 * self.ev_idx) | 8);
                return Some(trb);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The first event that `want` accepts within `patience`; the others stay pending.
    fn event_where(&mut self, patience: Duration, want: impl Fn(&Trb) -> bool) -> Option<Trb> {
        if let Some(i) = self.pending.iter().position(&want) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + patience;
        let mut skipped = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Some(e) if want(&e) => break Some(e),
                Some(e) => skipped.push(e),
                None => break None,
            }
        };
        for e in skipped.into_iter().rev() {
            self.pending.push_front(e);
        }
        found
    }

    /// Events of `kind` within `patience`, taken out.
    fn drain(&mut self, kind: u32, patience: Duration) -> Vec<Trb> {
        let mut out = Vec::new();
        while let Some(e) = self.event_where(patience, |e| e.kind() == kind) {
            out.push(e);
        }
        out
    }

    /// Queues a command and rings doorbell 0; returns the command TRB's address.
    fn post_command(&mut self, trb: Trb) -> u64 {
        let mut ring = self.cmd;
        let addr = self.put(&mut ring, trb);
        self.cmd = ring;
        self.write(DOORBELL, 0);
        addr
    }

    /// A command and its Command Completion Event.
    fn command(&mut self, trb: Trb) -> Trb {
        let addr = self.post_command(trb);
        let name = self.hw.name();
        self.event_where(WAIT, |e| e.kind() == EV_COMMAND && e.param == addr)
            .unwrap_or_else(|| {
                panic!(
                    "{name}: no completion for command type {} at {addr:#x}",
                    trb.control >> 10 & 0x3f
                )
            })
    }

    fn cmd_code(&mut self, kind: u32, param: u64, control: u32) -> u8 {
        self.command(Trb::new(kind, param, 0, control)).ccode()
    }

    fn noop(&mut self) -> u8 {
        self.cmd_code(TRB_NOOP_CMD, 0, 0)
    }

    /// A command of `kind` for endpoint `dci` (0: none) of `slot`: its completion code.
    fn ep_cmd(&mut self, kind: u32, slot: u8, dci: u32, param: u64) -> u8 {
        self.cmd_code(kind, param, u32::from(slot) << 24 | dci << 16)
    }

    fn disable_slot(&mut self, slot: u8) -> u8 {
        self.ep_cmd(TRB_DISABLE_SLOT, slot, 0, 0)
    }

    fn reset_device(&mut self, slot: u8) -> u8 {
        self.ep_cmd(TRB_RESET_DEVICE, slot, 0, 0)
    }

    fn stop_ep(&mut self, slot: u8, dci: u32) -> u8 {
        self.ep_cmd(TRB_STOP_EP, slot, dci, 0)
    }

    fn reset_ep(&mut self, slot: u8, dci: u32) -> u8 {
        self.ep_cmd(TRB_RESET_EP, slot, dci, 0)
    }

    /// Set TR Dequeue Pointer to `pointer` (with DCS in bit 0).
    fn set_tr_deq(&mut self, slot: u8, dci: u32, pointer: u64) -> u8 {
        self.ep_cmd(TRB_SET_TR_DEQ, slot, dci, pointer)
    }

    /// Moves the stopped endpoint (slot, dci) to a fresh ring at `base` (Set TR Dequeue,
    /// DCS 1) and the driver with it: the command's completion code.
    fn move_ring(&mut self, slot: u8, dci: u32, base: u64) -> u8 {
        self.zero(base, RING_TRBS as usize * 16);
        let cc = self.set_tr_deq(slot, dci, base | 1);
        self.set_ring(slot, dci, Ring::new(base));
        cc
    }

    /// Evaluate Context with `slot`'s input context.
    fn evaluate_context(&mut self, slot: u8) -> u8 {
        self.ep_cmd(TRB_EVALUATE_CONTEXT, slot, 0, Self::in_ctx(slot))
    }

    fn enable_slot(&mut self) -> Result<u8, u8> {
        let e = self.command(Trb::new(TRB_ENABLE_SLOT, 0, 0, 0));
        if e.ccode() == CC_SUCCESS {
            Ok(e.slot())
        } else {
            Err(e.ccode())
        }
    }

    fn out_ctx(slot: u8) -> u64 {
        DEV_CTX + 0x1000 * u64::from(slot)
    }

    fn in_ctx(slot: u8) -> u64 {
        IN_CTX + 0x1000 * u64::from(slot)
    }

    fn ring_base(slot: u8, dci: u32) -> u64 {
        TR_RINGS + 0x2_0000 * u64::from(slot) + 0x1000 * u64::from(dci)
    }

    /// Dword `dw` of context `index` (0 slot, 1 EP0, ...) of `slot`'s output context.
    fn ctx(&self, slot: u8, index: u32, dw: u64) -> u32 {
        self.r32(Self::out_ctx(slot) + 32 * u64::from(index) + 4 * dw)
    }

    fn slot_state(&self, slot: u8) -> u32 {
        self.ctx(slot, 0, 3) >> 27
    }

    fn ep_state(&self, slot: u8, dci: u32) -> u32 {
        self.ctx(slot, dci, 0) & 7
    }

    /// EP0's max packet size for a port speed (full 1, low 2, high 3, super 4).
    fn ep0_mps(speed: u32) -> u32 {
        match speed {
            2 => 8,
            4 => 512,
            _ => 64,
        }
    }

    /// Lays out `slot`'s output context (in the DCBAA), its input context for Address
    /// Device (slot and EP0 on `port`) and EP0's ring.
    fn prepare_address(&mut self, slot: u8, port: u8) {
        let speed = (self.portsc(port) >> 10) & 0xf;
        let out = Self::out_ctx(slot);
        let inp = Self::in_ctx(slot);
        self.zero(out, 0x1000);
        self.zero(inp, 0x1000);
        self.w64(DCBAA + 8 * u64::from(slot), out);
        let ring = Ring::new(Self::ring_base(slot, 1));
        self.zero(ring.base, RING_TRBS as usize * 16);
        self.w32(inp + 4, 0x3);
        self.w32(inp + 32, 1 << 27 | speed << 20);
        self.w32(inp + 32 + 4, u32::from(port) << 16);
        self.w32(
            inp + 64 + 4,
            Self::ep0_mps(speed) << 16 | EP_CONTROL << 3 | 3 << 1,
        );
        self.w64(inp + 64 + 8, ring.base | 1);
        let mut rings = vec![None; 32];
        rings[1] = Some(ring);
        self.slots[usize::from(slot)] = Some(Slot { port, speed, rings });
    }

    fn address_device(&mut self, slot: u8, bsr: bool) -> u8 {
        self.cmd_code(
            TRB_ADDRESS_DEVICE,
            Self::in_ctx(slot),
            u32::from(slot) << 24 | if bsr { TRB_BSR } else { 0 },
        )
    }

    /// Resets `port` (which must show a device) and clears its change bits; returns
    /// PORTSC after the reset.
    fn reset_port(&mut self, port: u8) -> u32 {
        self.portsc_write(port, PORT_PR);
        let sc = self.wait_port(port, PORT_PR | PORT_PRC, PORT_PRC);
        self.portsc_write(port, PORT_CHANGES);
        sc
    }

    fn wait_port(&self, port: u8, mask: u32, value: u32) -> u32 {
        self.wait_reg(PORTSC + 0x10 * u64::from(port - 1), mask, value)
    }

    /// The next Port Status Change Event (`what` it is for).
    fn port_event(&mut self, what: &str) -> Trb {
        let name = self.hw.name();
        self.event_where(WAIT, |e| e.kind() == EV_PORT)
            .unwrap_or_else(|| panic!("{name}: no Port Status Change Event {what}"))
    }

    /// Port reset, Enable Slot, Address Device (BSR 0): the slot.
    fn attach(&mut self, port: u8) -> u8 {
        self.reset_port(port);
        let slot = self.enable_slot().expect("Enable Slot");
        self.prepare_address(slot, port);
        let cc = self.address_device(slot, false);
        assert_eq!(cc, CC_SUCCESS, "{}: Address Device", self.hw.name());
        slot
    }

    fn ring(&self, slot: u8, dci: u32) -> Ring {
        self.slots[usize::from(slot)].as_ref().unwrap().rings[dci as usize]
            .expect("a ring for that endpoint")
    }

    fn set_ring(&mut self, slot: u8, dci: u32, ring: Ring) {
        self.slots[usize::from(slot)].as_mut().unwrap().rings[dci as usize] = Some(ring);
    }

    /// Queues `trbs` on (slot, dci) without ringing; returns their addresses.
    fn queue(&mut self, slot: u8, dci: u32, trbs: &[Trb]) -> Vec<u64> {
        let mut ring = self.ring(slot, dci);
        let addrs = trbs.iter().map(|t| self.put(&mut ring, *t)).collect();
        self.set_ring(slot, dci, ring);
        addrs
    }

    fn doorbell(&self, slot: u8, target: u32) {
        self.write(DOORBELL + 4 * u64::from(slot), target);
    }

    /// [`Driver::queue`], then the doorbell for (slot, dci): the TRBs' addresses.
    fn submit(&mut self, slot: u8, dci: u32, trbs: &[Trb]) -> Vec<u64> {
        let addrs = self.queue(slot, dci, trbs);
        self.doorbell(slot, dci);
        addrs
    }

    /// The Transfer Event for the TRB at `addr` within `patience`.
    fn transfer_event(&mut self, addr: u64, patience: Duration) -> Option<Trb> {
        self.event_where(patience, |e| e.kind() == EV_TRANSFER && e.param == addr)
    }

    /// A control transfer on EP0: Setup (IDT), a Data stage if wLength or `out` say so,
    /// Status with IOC. The data in, or the completion code that ended it.
    fn control(&mut self, slot: u8, setup: [u8; 8], out: &[u8]) -> Result<Vec<u8>, u8> {
        let length = u32::from(u16::from_le_bytes([setup[6], setup[7]]));
        let is_in = setup[0] & 0x80 != 0;
        let buf = BUFFERS + 0x10_000 * u64::from(slot);
        let data_len = if is_in { length } else { out.len() as u32 };
        let trt = match (data_len, is_in) {
            (0, _) => 0,
            (_, false) => 2,
            (_, true) => 3,
        };
        if !is_in {
            self.hw.mem_write(buf, out);
        }
        let mut trbs = vec![Trb::setup(setup, trt)];
        if data_len > 0 {
            let dir = if is_in { TRB_DIR_IN } else { 0 };
            trbs.push(Trb::new(TRB_DATA, buf, data_len, TRB_ISP | dir));
        }
        let status_in = data_len == 0 || !is_in;
        let dir = if status_in { TRB_DIR_IN } else { 0 };
        trbs.push(Trb::new(TRB_STATUS, 0, 0, TRB_IOC | dir));
        let addrs = self.submit(slot, 1, &trbs);
        let mut got = data_len;
        loop {
            let name = self.hw.name();
            let e = self
                .event_where(WAIT, |e| {
                    e.kind() == EV_TRANSFER && e.slot() == slot && addrs.contains(&e.param)
                })
                .unwrap_or_else(|| panic!("{name}: control transfer {setup:x?} never completed"));
            match e.ccode() {
                CC_SUCCESS if e.param == *addrs.last().unwrap() => break,
                CC_SHORT_PACKET if data_len > 0 && e.param == addrs[1] => {
                    got = data_len - e.residual();
                }
                CC_SUCCESS => {}
                cc => return Err(cc),
            }
        }
        Ok(if is_in {
            self.hw.mem_read(buf, got as usize)
        } else {
            Vec::new()
        })
    }

    fn get_descriptor(&mut self, slot: u8, kind: u8, index: u8, len: u16) -> Result<Vec<u8>, u8> {
        self.control(slot, setup::get_descriptor(kind, index, len), &[])
    }

    /// The device descriptor (18 bytes asked for) of the device on `slot`.
    fn device_descriptor(&mut self, slot: u8) -> Vec<u8> {
        let name = self.hw.name();
        self.get_descriptor(slot, desc::DEVICE, 0, 18)
            .unwrap_or_else(|cc| panic!("{name}: GET_DESCRIPTOR(device) on slot {slot}: {cc}"))
    }

    /// Configure Endpoint adding each (endpoint address, xHCI type, max packet size) with
    /// a fresh ring; SET_CONFIGURATION(1) first.
    fn configure(&mut self, slot: u8, eps: &[(u8, u32, u32)]) -> u8 {
        self.control(slot, setup::set_configuration(1), &[])
            .expect("SET_CONFIGURATION");
        self.configure_endpoints(slot, eps)
    }

    /// [`Driver::configure`] with the interrupt IN endpoint 1 of HID devices (`mps`
    /// bytes), which must succeed.
    fn configure_int_in(&mut self, slot: u8, mps: u32) {
        let cc = self.configure(slot, &[(0x81, EP_INT_IN, mps)]);
        assert_eq!(cc, CC_SUCCESS, "{}: Configure Endpoint", self.hw.name());
    }

    fn configure_endpoints(&mut self, slot: u8, eps: &[(u8, u32, u32)]) -> u8 {
        let inp = Self::in_ctx(slot);
        self.zero(inp, 0x1000);
        let info = self.slots[usize::from(slot)].clone().unwrap();
        let mut add = 1u32;
        let mut last = 1;
        for &(addr, kind, mps) in eps {
            let dci = u32::from(addr & 0xf) * 2 + u32::from(addr >> 7);
            add |= 1 << dci;
            last = last.max(dci);
            let ring = Ring::new(Self::ring_base(slot, dci));
            self.zero(ring.base, RING_TRBS as usize * 16);
            let ep = inp + 32 * u64::from(dci + 1);
            let interval = if kind == EP_INT_IN { 6 << 16 } else { 0 };
            self.w32(ep, interval);
            self.w32(ep + 4, mps << 16 | kind << 3 | 3 << 1);
            self.w64(ep + 8, ring.base | 1);
            self.w32(ep + 16, 8);
            self.set_ring(slot, dci, ring);
        }
        self.w32(inp + 4, add);
        self.w32(inp + 32, last << 27 | info.speed << 20);
        self.w32(inp + 36, u32::from(info.port) << 16);
        self.cmd_code(TRB_CONFIGURE_EP, inp, u32::from(slot) << 24)
    }

    /// One Normal TRB (IOC, ISP) of `len` bytes at `buf` on (slot, dci), rung; the TRB's
    /// address.
    fn normal(&mut self, slot: u8, dci: u32, buf: u64, len: u32) -> u64 {
        let trb = Trb::new(TRB_NORMAL, buf, len, TRB_IOC | TRB_ISP);
        self.submit(slot, dci, &[trb])[0]
    }

    /// An interrupt IN TRB of 8 bytes at `buf` on (slot, DCI 3) that no input answers
    /// within `patience` (NAKed): its address, the TRB left pending.
    fn nak_pending(&mut self, slot: u8, buf: u64, patience: Duration) -> u64 {
        let trb = self.normal(slot, 3, buf, 8);
        assert!(
            self.transfer_event(trb, patience).is_none(),
            "{}: NAK pending",
            self.hw.name()
        );
        trb
    }

    /// Moves the pointer to (x, y) with `buttons` and asserts that the tablet on `slot`
    /// reports just that: through the interrupt IN TRB `pending` (its address and buffer)
    /// where one is queued, else through a new poll. `what` names the occasion.
    fn assert_tablet_reports(
        &mut self,
        slot: u8,
        pending: Option<(u64, u64)>,
        (x, y, buttons): (u16, u16, u8),
        what: &str,
    ) {
        let who = self.hw.name();
        self.hw.pointer(x, y, buttons);
        let report = match pending {
            Some((trb, buf)) => self.wait_in(trb, buf, 8, WAIT).map_err(|_| ()),
            None => self.poll_in(slot, 3, 8, WAIT).map_err(|_| ()),
        }
        .unwrap_or_else(|()| panic!("{who}: no report {what}"));
        assert_eq!(
            report,
            hid::tablet_report(buttons, x, y, 0),
            "{who}: the report {what}"
        );
    }

    /// An interrupt IN poll of (slot, dci): the data if a report comes within
    /// `patience`. A TRB still pending is left queued (see [`Driver::wait_in`]).
    fn poll_in(
        &mut self,
        slot: u8,
        dci: u32,
        len: u32,
        patience: Duration,
    ) -> Result<Vec<u8>, u64> {
        let buf = BUFFERS + 0x10_000 * u64::from(slot) + 0x8000 + 0x100 * u64::from(dci);
        let addr = self.normal(slot, dci, buf, len);
        self.wait_in(addr, buf, len, patience)
    }

    fn wait_in(
        &mut self,
        addr: u64,
        buf: u64,
        len: u32,
        patience: Duration,
    ) -> Result<Vec<u8>, u64> {
        match self.transfer_event(addr, patience) {
            None => Err(addr),
            Some(e) => {
                assert!(
                    e.ccode() == CC_SUCCESS || e.ccode() == CC_SHORT_PACKET,
                    "{}: interrupt IN completed with {}",
                    self.hw.name(),
                    e.ccode()
                );
                Ok(self.hw.mem_read(buf, (len - e.residual()) as usize))
            }
        }
    }

    /// A bulk transfer of one Normal TRB; (completion code, bytes moved).
    fn bulk(&mut self, slot: u8, dci: u32, buf: u64, len: u32) -> (u8, u32) {
        let addr = self.normal(slot, dci, buf, len);
        let name = self.hw.name();
        let e = self
            .transfer_event(addr, WAIT)
            .unwrap_or_else(|| panic!("{name}: bulk transfer on DCI {dci} never completed"));
        (e.ccode(), len - e.residual())
    }
}

// ---------------------------------------------------------------------------------------
// Machines.

/// qomvm's pc on qtest with `qemu-xhci,id=ID` (and `props`) at 05.0 and `devices` on its
/// bus, started, and the driver started on it.
fn qomvm_xhci(id: &str, props: &[(&str, &str)], devices: &[UsbDevice]) -> (ObjectRef, Driver) {
    let m = usb::pc_with_hc("qemu-xhci", id, props, devices);
    let d = Driver::start(Box::new(Qomvm::new(&m)));
    (m, d)
}

/// QEMU 7.2 with `extra` arguments, qemu-xhci at 05.0 and `devices` on its bus (`-device
/// DRIVER,bus=xhci.0,PROPS`), the driver started on it; `None` where QEMU is not
/// installed.
fn qemu_xhci(tag: &str, extra: &[&str], devices: &[UsbDevice]) -> Option<Driver> {
    let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    args.extend(["-device".into(), "qemu-xhci,id=xhci,addr=05.0".into()]);
    for (driver, props) in devices {
        let props: String = props.iter().map(|(k, v)| format!(",{k}={v}")).collect();
        args.extend(["-device".into(), format!("{driver},bus=xhci.0{props}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let q = Qemu::start(tag, &args)?;
    Some(Driver::start(Box::new(q)))
}

/// Runs `body` on QEMU 7.2's controller with `devices`, where QEMU 7.2 is installed, and
/// on qomvm's: the expectations are QEMU's.
fn on_both_with(tag: &'static str, devices: &'static [UsbDevice<'static>], body: fn(&mut Driver)) {
    test_support::qtest::with_deadline(tag, move || {
        if let Some(mut q) = qemu_xhci(tag, &[], devices) {
            body(&mut q);
        }
        let (_m, mut d) = qomvm_xhci(tag, &[], devices);
        body(&mut d);
    });
}

/// [`on_both_with`] the tablet on port 1 and the keyboard on port 2.
fn on_both(tag: &'static str, body: fn(&mut Driver)) {
    on_both_with(tag, &usb::TABLET_KBD, body);
}

/// Asserts that `bad` is empty, listing the differences from QEMU 7.2 otherwise.
fn no_differences(who: &str, bad: &[String]) {
    assert!(
        bad.is_empty(),
        "{who}: {} differences from QEMU 7.2:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Scenarios (on either machine).

/// `assert_eq!` that notes the difference in `bad` and goes on, so one run names every
/// register that differs.
macro_rules! soft_eq {
    ($bad:ident, $left:expr, $right:expr, $($msg:tt)+) => {{
        let (l, r) = ($left, $right);
        if l != r {
            $bad.push(format!("{}: got {:#x?}, QEMU has {:#x?}", format!($($msg)+), l, r));
        }
    }};
    ($bad:ident, $left:expr, $right:expr $(,)?) => {
        soft_eq!($bad, $left, $right, "{}", stringify!($left))
    };
}

fn identity(d: &mut Driver) {
    let who = d.hw.name();
    let mut bad: Vec<String> = Vec::new();
    soft_eq!(bad, d.cfg_read(0, 4), 0x000d_1b36, "{who}: 1b36:000d");
    soft_eq!(
        bad,
        d.cfg_read(0x08, 4),
        0x0c03_3001,
        "{who}: class 0c0330, revision 1"
    );
    soft_eq!(
        bad,
        d.cfg_read(0x2c, 4),
        0x1100_1af4,
        "{who}: subsystem 1af4:1100"
    );
    soft_eq!(bad, d.cfg_read(0x3d, 1), 1, "{who}: INTA");
    soft_eq!(bad, d.cfg_read(0x60, 1), 0x30, "{who}: SBRN USB 3.0");
    soft_eq!(bad, d.cfg_read(0x61, 1), 0, "{who}: QEMU leaves FLADJ 0");
    assert_ne!(d.cfg_read(0x06, 2) & 0x10, 0, "{who}: a capability list");
    // BAR 0: 64-bit memory, not prefetchable, 16 KiB.
    let bar = d.cfg_read(0x10, 4);
    soft_eq!(bad, bar & 0xf, 0x4, "{who}: 64-bit non-prefetchable");
    d.cfg_write(0x04, 0, 2);
    d.cfg_write(0x10, 0xffff_ffff, 4);
    soft_eq!(bad, d.cfg_read(0x10, 4), 0xffff_c004, "{who}: 16 KiB");
    d.cfg_write(0x10, bar, 4);
    d.cfg_write(0x04, 0x6, 2);
    // The capabilities: MSI-X only (qemu-xhci's msi defaults to off), 16 vectors, table
    // at 0x3000 and PBA at 0x3800 of BAR 0.
    let mut caps = Vec::new();
    let mut at = d.cfg_read(0x34, 1) & 0xfc;
    while at != 0 && caps.len() < 16 {
        caps.push((d.cfg_read(at, 1), at));
        at = d.cfg_read(at + 1, 1) & 0xfc;
    }
    let ids: Vec<u32> = caps.iter().map(|c| c.0).collect();
    assert!(ids.contains(&0x11), "{who}: MSI-X in {caps:x?}");
    assert!(!ids.contains(&0x05), "{who}: no MSI by default: {caps:x?}");
    let msix = caps.iter().find(|c| c.0 == 0x11).unwrap().1;
    soft_eq!(bad, msix, 0x90, "{who}: MSI-X where QEMU puts it");
    soft_eq!(
        bad,
        d.cfg_read(msix + 2, 2) & 0x7ff,
        15,
        "{who}: 16 vectors"
    );
    soft_eq!(
        bad,
        d.cfg_read(msix + 4, 4),
        0x3000,
        "{who}: table in BAR 0 at 0x3000"
    );
    soft_eq!(
        bad,
        d.cfg_read(msix + 8, 4),
        0x3800,
        "{who}: PBA in BAR 0 at 0x3800"
    );

    // Capability registers.
    soft_eq!(
        bad,
        d.read(0),
        0x0100_0040,
        "{who}: CAPLENGTH 0x40, HCIVERSION 1.0"
    );
    soft_eq!(
        bad,
        d.read(0x04),
        8 << 24 | 16 << 8 | 64,
        "{who}: HCSPARAMS1"
    );
    soft_eq!(bad, d.read(0x08), 0xf, "{who}: HCSPARAMS2");
    soft_eq!(bad, d.read(0x0c), 0, "{who}: HCSPARAMS3");
    // QEMU 7.2 offers primary streams (MaxPSASize 7, `streams=on`); qomvm has none to
    // offer, so it says MaxPSASize 0, what QEMU says under `streams=off`.
    let hccparams1 = if who == "qomvm" {
        0x0008_0001
    } else {
        0x0008_7001
    };
    soft_eq!(
        bad,
        d.read(0x10),
        hccparams1,
        "{who}: HCCPARAMS1: AC64, MaxPSASize (7 with streams), xECP 0x20"
    );
    soft_eq!(bad, d.read(0x14), 0x2000, "{who}: DBOFF");
    soft_eq!(bad, d.read(0x18), 0x1000, "{who}: RTSOFF");
    soft_eq!(bad, d.read(0x1c), 0, "{who}: HCCPARAMS2");
    // Supported Protocol capabilities at 0x20 and 0x30: qemu-xhci puts the USB 3.0 ports
    // first (1-4), then the USB 2.0 ones (5-8).
    let ext: Vec<u32> = (0..8).map(|i| d.read(0x20 + 4 * i)).collect();
    soft_eq!(
        bad,
        ext,
        [
            0x0200_0402,
            0x2042_5355,
            0x0000_0405,
            0,
            0x0300_0002,
            0x2042_5355,
            0x0000_0401,
            0
        ],
        "{who}: USB 2.0 on ports 5-8, USB 3.0 on ports 1-4"
    );
    soft_eq!(bad, d.protocol_ports(2), (5, 4));
    soft_eq!(bad, d.protocol_ports(3), (1, 4));
    // Operational registers after the driver's set-up.
    soft_eq!(bad, d.read(PAGESIZE), 1, "{who}: 4 KiB pages");
    soft_eq!(
        bad,
        d.read(USBSTS) & (STS_HCH | STS_CNR | STS_HSE | STS_HCE),
        0,
        "{who}: running"
    );
    soft_eq!(bad, d.read(USBCMD), CMD_RS | CMD_INTE);
    soft_eq!(bad, d.read(CONFIG), 64);
    soft_eq!(bad, d.read(DCBAAP), DCBAA as u32);
    soft_eq!(bad, d.read(DCBAAP + 4), 0);
    d.write(DNCTRL, 0x1_0002);
    soft_eq!(bad, d.read(DNCTRL), 0x0002, "{who}: DNCTRL has 16 bits");
    soft_eq!(bad, d.read(ERSTSZ), 1);
    soft_eq!(bad, d.read(ERSTBA), ERST as u32);
    soft_eq!(bad, d.read(ERDP), EV_RING as u32);
    soft_eq!(bad, d.read(IMAN), 2, "{who}: IE");
    // The microframe index runs while the controller does.
    let m0 = d.read(MFINDEX);
    assert!(m0 < 0x4000);
    std::thread::sleep(Duration::from_millis(20));
    let m1 = d.read(MFINDEX);
    assert!(
        m1 < 0x4000 && m1 != m0,
        "{who}: MFINDEX runs: {m0:#x} {m1:#x}"
    );
    // A No Op command completes; doorbell registers read 0.
    let addr = d.post_command(NOOP);
    d.wait_reg(USBSTS, STS_EINT, STS_EINT);
    soft_eq!(bad, d.read(IMAN) & 1, 1, "{who}: IMAN.IP with an event");
    assert_ne!(
        d.read(ERDP) & 8,
        0,
        "{who}: EHB while the driver has not caught up"
    );
    let e = d.event_where(WAIT, |e| e.kind() == EV_COMMAND).unwrap();
    soft_eq!(
        bad,
        (e.param, e.ccode()),
        (addr, CC_SUCCESS),
        "{who}: No Op"
    );
    soft_eq!(
        bad,
        d.read(ERDP) & 8,
        0,
        "{who}: EHB cleared by the ERDP write"
    );
    soft_eq!(bad, d.read(DOORBELL), 0);
    d.write(USBSTS, STS_EINT);
    soft_eq!(
        bad,
        d.read(USBSTS) & STS_EINT,
        0,
        "{who}: EINT is write-1-to-clear"
    );
    // Run/Stop clear: halted; set again: running.
    d.halt();
    d.run();
    soft_eq!(bad, d.noop(), CC_SUCCESS);
    no_differences(who, &bad);
}

fn ports(d: &mut Driver) {
    let who = d.hw.name();
    let tablet = d.usb2_port(1);
    let kbd = d.usb2_port(2);
    // Every port powered; the devices connected on their USB 2.0 ports, which are
    // disabled until reset and polling; nothing on the USB 3.0 ports.
    for port in 1..=8u8 {
        let sc = d.portsc(port);
        assert_ne!(sc & PORT_PP, 0, "{who}: port {port} powered: {sc:#x}");
        let connected = port == tablet || port == kbd;
        assert_eq!(sc & PORT_CCS != 0, connected, "{who}: port {port}: {sc:#x}");
        assert_eq!(sc & PORT_PED, 0, "{who}: port {port} disabled: {sc:#x}");
        if connected {
            assert_ne!(sc & PORT_CSC, 0, "{who}: port {port} connect change");
            assert_eq!((sc >> 5) & 0xf, 7, "{who}: port {port} in Polling: {sc:#x}");
            let speed = (sc >> 10) & 0xf;
            assert!(
                speed == 1 || speed == 3,
                "{who}: port {port}: full or high speed: {sc:#x}"
            );
        } else {
            assert_eq!(
                (sc >> 5) & 0xf,
                5,
                "{who}: port {port} in RxDetect: {sc:#x}"
            );
        }
    }
    // Nothing beyond port 8 (reads are harmless).
    let _ = d.read(PORTSC + 0x10 * 8);
    // Clearing CSC: a write-1-to-clear bit; a write of 0 leaves it.
    d.portsc_write(tablet, 0);
    assert_ne!(d.portsc(tablet) & PORT_CSC, 0, "{who}: CSC stays for a 0");
    d.portsc_write(tablet, PORT_CSC);
    assert_eq!(d.portsc(tablet) & PORT_CHANGES, 0, "{who}: CSC cleared");
    // A port reset enables the port (U0) with PRC set and a Port Status Change Event.
    d.drain(EV_PORT, Duration::from_millis(20));
    d.portsc_write(tablet, PORT_PR);
    let sc = d.wait_port(tablet, PORT_PR | PORT_PRC, PORT_PRC);
    assert_eq!(
        sc & (PORT_CCS | PORT_PED),
        PORT_CCS | PORT_PED,
        "{who}: enabled: {sc:#x}"
    );
    assert_eq!((sc >> 5) & 0xf, 0, "{who}: U0 after the reset: {sc:#x}");
    let e = d.port_event("for the reset");
    assert_eq!(
        e.param >> 24,
        u64::from(tablet),
        "{who}: the port's number in the event"
    );
    assert_eq!(e.ccode(), CC_SUCCESS);
    d.portsc_write(tablet, PORT_PRC);
    assert_eq!(d.portsc(tablet) & PORT_CHANGES, 0, "{who}: PRC cleared");
    // A reset of an empty port does nothing.
    let empty = d.protocol_ports(3).0;
    d.portsc_write(empty, PORT_CSC | PORT_PR);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        d.portsc(empty) & (PORT_PED | PORT_PRC | PORT_CCS),
        0,
        "{who}: empty port {empty}"
    );
    // While halted, a port reset sets PRC but no event comes; USBSTS.PCD says so.
    d.halt();
    d.portsc_write(kbd, PORT_CSC | PORT_PR);
    d.wait_port(kbd, PORT_PRC, PORT_PRC);
    d.run();
    assert_eq!(d.noop(), CC_SUCCESS);
    assert!(
        d.drain(EV_PORT, Duration::from_millis(20)).is_empty(),
        "{who}: no event for a change while halted"
    );
    // Suspend and resume through PLS with LWS: U3, then U0 with PLC and an event.
    d.portsc_write(tablet, PORT_CHANGES);
    d.drain(EV_PORT, Duration::from_millis(20));
    d.portsc_write(tablet, 1 << 16 | 3 << 5);
    let sc = d.portsc(tablet);
    assert_eq!((sc >> 5) & 0xf, 3, "{who}: U3: {sc:#x}");
    d.portsc_write(tablet, 3 << 5);
    assert_eq!((d.portsc(tablet) >> 5) & 0xf, 3, "{who}: PLS needs LWS");
    d.portsc_write(tablet, 1 << 16);
    let sc = d.portsc(tablet);
    assert_eq!((sc >> 5) & 0xf, 0, "{who}: U0 again: {sc:#x}");
    assert_ne!(sc & 1 << 22, 0, "{who}: PLC: {sc:#x}");
    let e = d.port_event("for the resume");
    assert_eq!(e.param >> 24, u64::from(tablet));
    // HCRST brings the ports back to disabled, connect change set.
    d.init();
    let sc = d.portsc(tablet);
    assert_eq!(
        sc & (PORT_CCS | PORT_PED | PORT_CSC),
        PORT_CCS | PORT_CSC,
        "{who}: {sc:#x}"
    );
}

fn commands(d: &mut Driver) {
    let who = d.hw.name();
    let mut bad: Vec<String> = Vec::new();
    // Unknown and transfer-only TRB types on the command ring: TRB Error.
    for kind in [TRB_NORMAL, TRB_DATA, 31, 48, 63] {
        soft_eq!(
            bad,
            d.cmd_code(kind, 0, 0),
            CC_TRB_ERROR,
            "{who}: command type {kind}"
        );
    }
    // Slot ids out of range or not enabled.
    for (slot, cc) in [
        (0u8, CC_TRB_ERROR),
        (65, CC_TRB_ERROR),
        (255, CC_TRB_ERROR),
        (3, CC_SLOT_NOT_ENABLED),
    ] {
        soft_eq!(bad, d.disable_slot(slot), cc, "{who}: Disable Slot {slot}");
        soft_eq!(bad, d.reset_device(slot), cc, "{who}: Reset Device {slot}");
        soft_eq!(
            bad,
            d.stop_ep(slot, 1),
            cc,
            "{who}: Stop Endpoint on slot {slot}"
        );
    }
    // Enable Slot hands out 1, 2, ...; Disable Slot frees; the slot is reused.
    let a = d.enable_slot().unwrap();
    let b = d.enable_slot().unwrap();
    soft_eq!(bad, (a, b), (1, 2), "{who}: slots from 1");
    soft_eq!(bad, d.disable_slot(1), CC_SUCCESS);
    soft_eq!(bad, d.disable_slot(1), CC_SLOT_NOT_ENABLED);
    soft_eq!(bad, d.enable_slot(), Ok(1), "{who}: slot 1 again");
    // Configure Endpoint before Address Device: Context State Error.
    let tablet = d.usb2_port(1);
    d.reset_port(tablet);
    d.prepare_address(1, tablet);
    let inp = Driver::in_ctx(1);
    // (Add flags A0 and an endpoint: A1 is a TRB Error for Configure Endpoint.)
    d.w32(inp + 4, 0x9);
    d.w32(inp + 32 * 4 + 4, 8 << 16 | EP_INT_IN << 3 | 3 << 1);
    d.w64(inp + 32 * 4 + 8, Driver::ring_base(1, 3) | 1);
    soft_eq!(
        bad,
        d.cmd_code(TRB_CONFIGURE_EP, inp, 1 << 24),
        CC_CONTEXT_STATE,
        "{who}: Configure Endpoint on an enabled slot"
    );
    soft_eq!(
        bad,
        d.cmd_code(TRB_CONFIGURE_EP, inp, 1 << 24 | 2 << 24),
        CC_SLOT_NOT_ENABLED,
        "{who}: Configure Endpoint on slot 3"
    );
    d.w32(inp + 4, 0x3);
    d.w32(inp + 32 * 4 + 4, 0);
    // Address Device with an input context whose add flags are not A0|A1: TRB Error.
    d.w32(inp + 4, 0x7);
    soft_eq!(
        bad,
        d.address_device(1, false),
        CC_TRB_ERROR,
        "{who}: add flags 0x7"
    );
    d.w32(inp + 4, 0x3);
    // A root port that does not exist: TRB Error; one with no device: Transaction Error.
    // (QEMU finds no USB port with a device on port 8: TRB Error.)
    for (port, what) in [
        (9, "root port 9"),
        (0, "root port 0"),
        (d.usb2_port(4), "nobody on port 8"),
    ] {
        d.w32(inp + 36, u32::from(port) << 16);
        soft_eq!(
            bad,
            d.address_device(1, false),
            CC_TRB_ERROR,
            "{who}: {what}"
        );
    }
    d.w32(inp + 36, u32::from(tablet) << 16);
    // BSR: Default state, no address yet.
    soft_eq!(
        bad,
        d.address_device(1, true),
        CC_SUCCESS,
        "{who}: Address Device BSR"
    );
    soft_eq!(bad, d.slot_state(1), SLOT_DEFAULT, "{who}: Default");
    soft_eq!(
        bad,
        d.ctx(1, 0, 3) & 0xff,
        0,
        "{who}: address 0 in the Default state"
    );
    soft_eq!(bad, d.ep_state(1, 1), EP_RUNNING, "{who}: EP0 running");
    // The device answers at address 0 already.
    let dev = d
        .get_descriptor(1, desc::DEVICE, 0, 8)
        .expect("first 8 bytes in the Default state");
    soft_eq!(bad, &dev[..2], &[18, 1]);
    // Then without BSR: Addressed, with the address QEMU gives (the slot id).
    soft_eq!(
        bad,
        d.address_device(1, false),
        CC_SUCCESS,
        "{who}: Address Device"
    );
    soft_eq!(bad, d.slot_state(1), SLOT_ADDRESSED);
    soft_eq!(
        bad,
        d.ctx(1, 0, 3) & 0xff,
        1,
        "{who}: USB address 1 (the slot id)"
    );
    assert!(
        d.hw.info_usb().contains(".1, Port 1,"),
        "{who}: info usb shows the address: {}",
        d.hw.info_usb()
    );
    // The same device on a second slot: TRB Error.
    d.prepare_address(2, tablet);
    soft_eq!(
        bad,
        d.address_device(2, false),
        CC_TRB_ERROR,
        "{who}: one device, two slots"
    );
    // Evaluate Context: EP0's max packet size lands in the output context.
    d.zero(inp, 0x100);
    d.w32(inp + 4, 0x2);
    d.w32(inp + 64 + 4, 32 << 16 | EP_CONTROL << 3 | 3 << 1);
    soft_eq!(bad, d.evaluate_context(1), CC_SUCCESS);
    soft_eq!(bad, d.ctx(1, 1, 1) >> 16, 32, "{who}: EP0 MPS 32");
    // A0: the slot's Max Exit Latency and Interrupter Target.
    d.zero(inp, 0x100);
    d.w32(inp + 4, 0x1);
    d.w32(inp + 32 + 4, 0x1234);
    d.w32(inp + 32 + 8, 5 << 22);
    soft_eq!(bad, d.evaluate_context(1), CC_SUCCESS);
    soft_eq!(
        bad,
        d.ctx(1, 0, 1) & 0xffff,
        0x1234,
        "{who}: Max Exit Latency"
    );
    soft_eq!(bad, d.ctx(1, 0, 2) >> 22, 5, "{who}: Interrupter Target");
    soft_eq!(
        bad,
        d.ctx(1, 1, 1) >> 16,
        32,
        "{who}: EP0 untouched without A1"
    );
    d.w32(inp + 32 + 8, 0);
    soft_eq!(bad, d.evaluate_context(1), CC_SUCCESS);
    d.w32(inp, 0x4);
    soft_eq!(
        bad,
        d.evaluate_context(1),
        CC_TRB_ERROR,
        "{who}: Evaluate Context with drop flags"
    );
    // Reset Endpoint needs a halted endpoint; Set TR Dequeue a stopped one.
    soft_eq!(
        bad,
        d.reset_ep(1, 1),
        CC_CONTEXT_STATE,
        "{who}: Reset Endpoint on a running EP0"
    );
    let ring0 = Driver::ring_base(1, 1) + 0x200;
    soft_eq!(
        bad,
        d.set_tr_deq(1, 1, ring0 | 1),
        CC_CONTEXT_STATE,
        "{who}: Set TR Dequeue on a running EP0"
    );
    // Endpoint ids: 0 is a TRB Error, a disabled one EP Not Enabled.
    soft_eq!(bad, d.stop_ep(1, 0), CC_TRB_ERROR, "{who}: Stop EP 0");
    soft_eq!(bad, d.stop_ep(1, 5), CC_EP_NOT_ENABLED, "{who}: Stop EP 5");
    soft_eq!(bad, d.stop_ep(1, 1), CC_SUCCESS);
    soft_eq!(bad, d.ep_state(1, 1), EP_STOPPED, "{who}: EP0 stopped");
    // Set TR Dequeue to a fresh ring: the dequeue pointer and DCS in the context.
    soft_eq!(bad, d.move_ring(1, 1, ring0), CC_SUCCESS);
    soft_eq!(
        bad,
        u64::from(d.ctx(1, 1, 2)),
        ring0 | 1,
        "{who}: TR Dequeue in the context"
    );
    // A doorbell restarts the stopped endpoint.
    let dev = d.device_descriptor(1);
    soft_eq!(bad, dev.len(), 18);
    soft_eq!(
        bad,
        d.ep_state(1, 1),
        EP_RUNNING,
        "{who}: the doorbell restarted EP0"
    );
    // Configure Endpoint: the interrupt IN endpoint; the slot Configured.
    soft_eq!(bad, d.configure(1, &[(0x81, EP_INT_IN, 8)]), CC_SUCCESS);
    soft_eq!(bad, d.slot_state(1), SLOT_CONFIGURED, "{who}: Configured");
    soft_eq!(bad, d.ctx(1, 0, 0) >> 27, 3, "{who}: context entries 3");
    soft_eq!(bad, d.ep_state(1, 3), EP_RUNNING, "{who}: EP 1 IN running");
    // Drop flags: EP 1 IN dropped (Disabled in the output context), the slot stays
    // Configured.
    d.zero(inp, 0x100);
    d.w32(inp, 1 << 3);
    d.w32(inp + 4, 0x1);
    d.w32(inp + 32, 1 << 27);
    d.w32(inp + 36, u32::from(tablet) << 16);
    soft_eq!(
        bad,
        d.cmd_code(TRB_CONFIGURE_EP, inp, 1 << 24),
        CC_SUCCESS,
        "{who}: Configure Endpoint dropping EP 1 IN"
    );
    soft_eq!(bad, d.ep_state(1, 3), 0, "{who}: EP 1 IN disabled");
    soft_eq!(
        bad,
        d.stop_ep(1, 3),
        CC_EP_NOT_ENABLED,
        "{who}: a dropped endpoint"
    );
    d.w32(inp, 0x1);
    soft_eq!(
        bad,
        d.cmd_code(TRB_CONFIGURE_EP, inp, 1 << 24),
        CC_TRB_ERROR,
        "{who}: Configure Endpoint dropping the slot context"
    );
    soft_eq!(
        bad,
        d.configure_endpoints(1, &[(0x81, EP_INT_IN, 8)]),
        CC_SUCCESS
    );
    // Deconfigure: back to Addressed, the endpoint disabled.
    soft_eq!(
        bad,
        d.cmd_code(TRB_CONFIGURE_EP, 0, 1 << 24 | TRB_DC),
        CC_SUCCESS
    );
    soft_eq!(bad, d.slot_state(1), SLOT_ADDRESSED, "{who}: deconfigured");
    soft_eq!(
        bad,
        d.stop_ep(1, 3),
        CC_EP_NOT_ENABLED,
        "{who}: EP 1 IN gone"
    );
    // Reset Device: the Default state.
    soft_eq!(
        bad,
        d.configure_endpoints(1, &[(0x81, EP_INT_IN, 8)]),
        CC_SUCCESS
    );
    soft_eq!(bad, d.reset_device(1), CC_SUCCESS);
    soft_eq!(bad, d.slot_state(1), SLOT_DEFAULT, "{who}: Reset Device");
    soft_eq!(
        bad,
        d.stop_ep(1, 3),
        CC_EP_NOT_ENABLED,
        "{who}: Reset Device disables the endpoints"
    );
    // All 64 slots, then No Slots Available.
    d.disable_slot(2);
    let mut got = 1;
    loop {
        match d.enable_slot() {
            Ok(_) => got += 1,
            Err(cc) => {
                soft_eq!(bad, cc, CC_NO_SLOTS, "{who}: Enable Slot past 64");
                break;
            }
        }
        assert!(got <= 64, "{who}: more than 64 slots");
    }
    soft_eq!(bad, got, 64, "{who}: 64 slots");
    no_differences(who, &bad);
}

/// The tablet through enumeration: descriptors, configuration, reports.
fn tablet(d: &mut Driver) {
    let who = d.hw.name();
    let port = d.usb2_port(1);
    let slot = d.attach(port);
    let dev = d.device_descriptor(slot);
    assert_eq!(dev.len(), 18, "{who}");
    assert_eq!(&dev[..2], &[18, 1]);
    assert_eq!(desc::vendor(&dev), 0x0627, "{who}: QEMU's vendor");
    assert_eq!(desc::product(&dev), 0x0001, "{who}: the tablet");
    // A short answer: the whole configuration asked for with 255 bytes.
    let config = d
        .get_descriptor(slot, desc::CONFIGURATION, 0, 255)
        .expect("configuration descriptor");
    assert_eq!(
        config.len(),
        34,
        "{who}: 34 bytes, a short packet: {config:x?}"
    );
    assert_eq!(desc::interface_class(&config), [3, 0, 0], "{who}: HID");
    let ep = &config[9 + 9 + 9..];
    assert_eq!((ep[1], ep[2], ep[3]), (5, 0x81, 3), "{who}: interrupt IN 1");
    let mps = u32::from(u16::from_le_bytes([ep[4], ep[5]]));
    let product = d.get_descriptor(slot, desc::STRING, dev[15], 255).unwrap();
    assert_eq!(desc::string(&product), "QEMU USB Tablet");
    // A request the tablet does not know: Stall; EP0 halted until Reset Endpoint and Set
    // TR Dequeue.
    assert_eq!(
        d.control(slot, setup::get_descriptor(0x42, 0, 10), &[]),
        Err(CC_STALL),
        "{who}: a descriptor type nobody has"
    );
    assert_eq!(
        d.ep_state(slot, 1),
        EP_HALTED,
        "{who}: EP0 halted by the stall"
    );
    assert_eq!(d.reset_ep(slot, 1), CC_SUCCESS);
    assert_eq!(
        d.ep_state(slot, 1),
        EP_STOPPED,
        "{who}: Reset Endpoint stops it"
    );
    let ring = d.ring(slot, 1);
    let deq = ring.base + 16 * ring.idx;
    assert_eq!(
        d.set_tr_deq(slot, 1, deq | u64::from(ring.cycle)),
        CC_SUCCESS
    );
    assert!(
        d.control(slot, setup::set_idle(0), &[]).is_ok(),
        "{who}: SET_IDLE after recovery"
    );
    d.configure_int_in(slot, mps);
    // No input yet: the TRB stays pending; a move completes it with no new doorbell.
    let buf = BUFFERS + 0x80_0000;
    let trb = d.nak_pending(slot, buf, Duration::from_millis(50));
    d.assert_tablet_reports(slot, Some((trb, buf)), (0x4000, 0x2000, 1), "for a move");
    // The short packet's event says 2 bytes left over.
    d.assert_tablet_reports(slot, None, (0x7fff, 0, 0), "for the second move");
    assert!(
        d.poll_in(slot, 3, 8, Duration::from_millis(30)).is_err(),
        "{who}: nothing new"
    );
    // Stop Endpoint with that TRB pending: a Transfer Event with Stopped.
    let pending = d.ring(slot, 3);
    let pending_trb = pending.base + 16 * ((pending.idx + RING_TRBS - 2) % (RING_TRBS - 1));
    assert_eq!(d.stop_ep(slot, 3), CC_SUCCESS);
    let e = d
        .event_where(WAIT, |e| {
            e.kind() == EV_TRANSFER && e.slot() == slot && e.epid() == 3
        })
        .unwrap_or_else(|| panic!("{who}: no Stopped event for the pending TRB"));
    assert_eq!(e.ccode(), CC_STOPPED, "{who}: Stopped");
    assert_eq!(e.param, pending_trb, "{who}: for the pending TRB");
    assert_eq!(d.ep_state(slot, 3), EP_STOPPED);
}

/// Transfer ring mechanics on the tablet: Link TRBs with Toggle Cycle (many transfers
/// wrap the ring), chained TRBs with an Event Data TRB, and a TD that ends short.
fn transfer_rings(d: &mut Driver) {
    let who = d.hw.name();
    let port = d.usb2_port(1);
    let slot = d.attach(port);
    // 150 GET_DESCRIPTORs of 3 TRBs each wrap EP0's 63-TRB ring seven times.
    for i in 0..150 {
        let dev = d
            .get_descriptor(slot, desc::DEVICE, 0, 18)
            .unwrap_or_else(|cc| panic!("{who}: transfer {i}: {cc}"));
        assert_eq!(&dev[..2], &[18, 1], "{who}: transfer {i}");
    }
    // A data stage in two chained TRBs (8 + 10 bytes) and an Event Data TRB: the event
    // for it carries its parameter and the bytes moved (EDTLA).
    let buf = BUFFERS + 0x90_0000;
    d.zero(buf, 64);
    let trbs = [
        Trb::setup(setup::get_descriptor(desc::DEVICE, 0, 18), TRT_IN),
        Trb::new(TRB_DATA, buf, 8, TRB_CH | TRB_DIR_IN),
        Trb::new(TRB_NORMAL, buf + 8, 10, TRB_CH),
        Trb::new(TRB_EVENT_DATA, 0x1234_5678_9abc_def0, 0, TRB_IOC),
        Trb::new(TRB_STATUS, 0, 0, TRB_IOC),
    ];
    let addrs = d.submit(slot, 1, &trbs);
    let e = d
        .event_where(WAIT, |e| e.kind() == EV_TRANSFER && e.control & 4 != 0)
        .unwrap_or_else(|| panic!("{who}: no Event Data event"));
    assert_eq!(
        e.param, 0x1234_5678_9abc_def0,
        "{who}: the Event Data TRB's parameter"
    );
    assert_eq!(e.ccode(), CC_SUCCESS);
    assert_eq!(e.residual(), 18, "{who}: EDTLA 18");
    let e = d.transfer_event(addrs[4], WAIT).expect("the status stage");
    assert_eq!(e.ccode(), CC_SUCCESS);
    let dev = d.hw.mem_read(buf, 18);
    assert_eq!(&dev[..2], &[18, 1]);
    assert_eq!(desc::vendor(&dev), 0x0627, "{who}: across the chain");
    // A short data stage without ISP: no event for it, only for the status stage.
    let trbs = device_descriptor_td(buf, 64, 0);
    let addrs = d.submit(slot, 1, &trbs);
    let e = d.transfer_event(addrs[2], WAIT).expect("status stage");
    assert_eq!(e.ccode(), CC_SUCCESS, "{who}");
    assert!(
        d.transfer_event(addrs[1], Duration::from_millis(20))
            .is_none(),
        "{who}: no event for a short TRB without ISP or IOC"
    );
    // With ISP: Short Packet with the residual 64 - 18.
    assert_eq!(
        d.get_descriptor(slot, desc::DEVICE, 0, 64).unwrap().len(),
        18,
        "{who}"
    );
    let addrs = d.submit(slot, 1, &device_descriptor_td(buf, 64, TRB_ISP));
    let e = d
        .transfer_event(addrs[1], WAIT)
        .expect("a short packet event");
    assert_eq!((e.ccode(), e.residual()), (CC_SHORT_PACKET, 46), "{who}");
    assert_eq!(e.slot(), slot);
    assert_eq!(e.epid(), 1, "{who}: EP0 is DCI 1");
    d.transfer_event(addrs[2], WAIT).expect("status stage");
    // A data stage of two chained TRBs (8 + 56 bytes, ISP on both) for 18 bytes: one
    // Short Packet event, for the second, with its residual 46; none for the first.
    let trbs = [
        Trb::setup(setup::get_descriptor(desc::DEVICE, 0, 64), TRT_IN),
        Trb::new(TRB_DATA, buf, 8, TRB_DIR_IN | TRB_ISP | TRB_CH),
        Trb::new(TRB_NORMAL, buf + 8, 56, TRB_ISP),
        Trb::new(TRB_STATUS, 0, 0, TRB_IOC),
    ];
    let addrs = d.submit(slot, 1, &trbs);
    let e = d.transfer_event(addrs[3], WAIT).expect("status stage");
    assert_eq!(e.ccode(), CC_SUCCESS, "{who}");
    let e = d
        .transfer_event(addrs[2], Duration::from_millis(20))
        .unwrap_or_else(|| panic!("{who}: no Short Packet event for the second data TRB"));
    assert_eq!((e.ccode(), e.residual()), (CC_SHORT_PACKET, 46), "{who}");
    assert!(
        d.transfer_event(addrs[1], Duration::from_millis(20))
            .is_none(),
        "{who}: no event for the full first data TRB"
    );
    // A doorbell for a slot that is not enabled, or for a DCI with no endpoint, does
    // nothing; the controller carries on.
    d.doorbell(40, 1);
    d.doorbell(slot, 7);
    d.doorbell(slot, 0);
    assert_eq!(d.noop(), CC_SUCCESS, "{who}");
    assert_eq!(d.read(USBSTS) & (STS_HCH | STS_HSE | STS_HCE), 0, "{who}");
}

fn keyboard(d: &mut Driver) {
    let who = d.hw.name();
    let port = d.usb2_port(2);
    let slot = d.attach(port);
    let config = d.get_descriptor(slot, desc::CONFIGURATION, 0, 255).unwrap();
    assert_eq!(
        desc::interface_class(&config),
        [3, 1, 1],
        "{who}: boot keyboard"
    );
    let ep = &config[27..];
    let mps = u32::from(u16::from_le_bytes([ep[4], ep[5]]));
    d.configure_int_in(slot, mps);
    assert!(
        d.control(slot, setup::SET_PROTOCOL_BOOT, &[]).is_ok(),
        "{who}: SET_PROTOCOL boot"
    );
    assert!(
        d.control(slot, setup::SET_REPORT_OUTPUT, &[0x02]).is_ok(),
        "{who}: SET_REPORT"
    );
    let ctrl = hid::keyboard_report(hid::MOD_LEFT_CTRL, &[]);
    let buf = BUFFERS + 0xa0_0000;
    let trb = d.normal(slot, 3, buf, 8);
    d.hw.key(hid::QNUM_LEFT_CTRL, true);
    let r = d.wait_in(trb, buf, 8, WAIT).expect("Ctrl");
    assert_eq!(r, ctrl, "{who}");
    d.hw.key(hid::QNUM_A, true);
    let r = d.poll_in(slot, 3, 8, WAIT).expect("a");
    let ctrl_a = hid::keyboard_report(hid::MOD_LEFT_CTRL, &[hid::USAGE_A]);
    assert_eq!(r, ctrl_a, "{who}");
    d.hw.key(hid::QNUM_A, false);
    d.hw.key(hid::QNUM_LEFT_CTRL, false);
    let r = d.poll_in(slot, 3, 8, WAIT).expect("a up");
    assert_eq!(r, ctrl, "{who}");
    let r = d.poll_in(slot, 3, 8, WAIT).expect("Ctrl up");
    assert_eq!(r, hid::keyboard_report(0, &[]), "{who}");
}

/// MSI-X: with vector 0 masked an event leaves its pending bit set (and IP clear, as
/// QEMU's MSI-X raise does); unmasking delivers it.
fn msix(d: &mut Driver) {
    let who = d.hw.name();
    let cap = d.find_cap(0x11);
    assert_ne!(cap, 0, "{who}: an MSI-X capability");
    d.cfg_write(cap + 2, 0x8000, 2);
    assert_ne!(d.cfg_read(cap + 2, 2) & 0x8000, 0, "{who}: MSI-X on");
    // As Linux: MSI-X on first, then the interrupter enabled (QEMU uses the vector from
    // the IMAN write on).
    d.write(IMAN, 2);
    let table = d.bar + 0x3000;
    assert_eq!(
        d.hw.mmio_read(table + 12, 4) & 1,
        1,
        "{who}: vectors start masked"
    );
    d.hw.mmio_write(table, 0xfee0_0000, 4);
    d.hw.mmio_write(table + 8, 0x41, 4);
    assert_eq!(
        d.hw.mmio_read(d.bar + 0x3800, 4),
        0,
        "{who}: nothing pending"
    );
    assert_eq!(d.noop(), CC_SUCCESS);
    assert_eq!(
        d.hw.mmio_read(d.bar + 0x3800, 4) & 1,
        1,
        "{who}: vector 0 pending"
    );
    assert_eq!(
        d.read(IMAN) & 1,
        0,
        "{who}: IP clear once the message is sent (pending)"
    );
    d.hw.mmio_write(table + 12, 0, 4);
    assert_eq!(
        d.hw.mmio_read(d.bar + 0x3800, 4) & 1,
        0,
        "{who}: delivered on unmask"
    );
    assert_eq!(d.noop(), CC_SUCCESS);
    assert_eq!(
        d.hw.mmio_read(d.bar + 0x3800, 4) & 1,
        0,
        "{who}: sent at once unmasked"
    );
    d.cfg_write(cap + 2, 0, 2);
}

/// More than one event ring segment is beyond HCSPARAMS2's ERST Max (2^0): QEMU
/// declares a host controller error.
fn erst_too_big(d: &mut Driver) {
    let who = d.hw.name();
    assert_eq!(
        (d.read(0x08) >> 4) & 0xf,
        0,
        "{who}: ERST Max 0: one segment"
    );
    d.halt();
    d.write(ERSTSZ, 2);
    d.write64(ERSTBA, ERST);
    d.write(USBCMD, CMD_RS);
    // Whatever the device does with it, it answers and a reset recovers.
    let _ = d.read(USBSTS);
    d.init();
    assert_eq!(d.noop(), CC_SUCCESS, "{who}: after HCRST");
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn the_function_and_its_registers_are_qemus() {
    on_both("xhci-identity", identity);
}

#[test]
fn ports_show_connections_resets_and_status_change_events() {
    on_both("xhci-ports", ports);
}

#[test]
fn commands_complete_with_qemus_completion_codes() {
    on_both("xhci-commands", commands);
}

#[test]
fn a_tablet_enumerates_stalls_recovers_and_reports_the_pointer() {
    on_both("xhci-tablet", tablet);
}

#[test]
fn transfer_rings_wrap_chain_and_end_short() {
    on_both("xhci-rings", transfer_rings);
}

#[test]
fn a_keyboard_reports_keys() {
    on_both("xhci-kbd", keyboard);
}

#[test]
fn msix_vector_0_carries_the_events() {
    on_both("xhci-msix", msix);
}

#[test]
fn a_second_event_ring_segment_does_not_break_the_controller() {
    on_both("xhci-erst", erst_too_big);
}

/// INTx (MSI-X off): the line follows IMAN.IP while IMAN.IE and USBCMD.INTE are set; EHB
/// holds further interrupts until ERDP is written.
#[test]
fn intx_follows_iman_and_inte() {
    test_support::qtest::with_deadline("xhci-intx", || {
        let (m, mut d) = qomvm_xhci("xhci-intx", &[], &usb::TABLET_KBD);
        let gsi = d.cfg_read(0x3c, 1);
        assert_ne!(gsi, 0xff, "the board routed INTA");
        let line = || test_support::qtest::irq_level(&m, gsi);
        assert!(!line(), "quiet after start");
        let addr = d.post_command(NOOP);
        d.wait_reg(IMAN, 1, 1);
        assert!(line(), "INTx raised with IP");
        d.write(IMAN, 3);
        assert_eq!(d.read(IMAN), 2, "IP is write-1-to-clear");
        assert!(!line(), "INTx lowered with IP");
        let e = d.event_where(WAIT, |e| e.kind() == EV_COMMAND).unwrap();
        assert_eq!(e.param, addr);
        // INTE off: IP is set but the line stays low.
        d.write(USBCMD, CMD_RS);
        assert_eq!(d.noop(), CC_SUCCESS);
        assert_eq!(d.read(IMAN) & 1, 1, "IP without INTE");
        assert!(!line(), "no INTx without INTE");
        d.write(USBCMD, CMD_RS | CMD_INTE);
        assert!(line(), "INTE on with IP set raises the line");
        d.write(IMAN, 1);
        assert!(!line(), "IE clear: low");
        d.write(IMAN, 3);
        assert!(!line());
        // MSI-X on (the interrupter enabled after it, as Linux does): no INTx.
        let cap = d.find_cap(0x11);
        d.cfg_write(cap + 2, 0x8000, 2);
        d.write(IMAN, 3);
        assert_eq!(d.noop(), CC_SUCCESS);
        assert!(!line(), "no INTx with MSI-X on");
        d.cfg_write(cap + 2, 0, 2);
    });
}

/// usb-storage's bulk endpoints on `slot`: 1 IN (DCI 3) and 2 OUT (DCI 4).
struct Stick<'a> {
    d: &'a mut Driver,
    slot: u8,
}

impl BulkPipes for Stick<'_> {
    fn bulk_out(&mut self, data: &[u8]) {
        let buf = BUFFERS + 0xb0_0000;
        let len = data.len() as u32;
        self.d.hw.mem_write(buf, data);
        let moved = self.d.bulk(self.slot, 4, buf, len);
        assert_eq!(moved, (CC_SUCCESS, len), "{}: bulk OUT", self.d.hw.name());
    }
    fn bulk_in(&mut self, len: usize) -> Vec<u8> {
        let buf = BUFFERS + 0xb0_1000;
        let (cc, got) = self.d.bulk(self.slot, 3, buf, len as u32);
        assert!(
            cc == CC_SUCCESS || cc == CC_SHORT_PACKET,
            "{}: bulk IN: {cc}",
            self.d.hw.name()
        );
        self.d.hw.mem_read(buf, got as usize)
    }
}

impl Driver {
    /// One Bulk-Only command to the usb-storage on `slot`: the data in and the CSW's residue
    /// and status (see [`bot::command`]).
    fn bot(
        &mut self,
        slot: u8,
        tag: u32,
        cdb: &[u8],
        out: &[u8],
        in_len: u32,
    ) -> (Vec<u8>, u32, u8) {
        bot::command(&mut Stick { d: self, slot }, tag, cdb, out, in_len as usize)
    }
}

/// usb-storage on USB port 1 with an image of `content` at `image`: enumeration, SCSI over
/// the Bulk-Only Transport (a READ(10) through a chained TD among them), the write landing
/// in the image, a bad CBW's stall and its recovery.
fn storage(d: &mut Driver, content: &[u8], image: &std::path::Path) {
    let who = d.hw.name();
    let port = d.port_of(1);
    let slot = d.attach(port);
    let dev = d.device_descriptor(slot);
    assert_eq!(desc::vendor(&dev), 0x46f4, "{who}");
    let config = d.get_descriptor(slot, desc::CONFIGURATION, 0, 255).unwrap();
    assert_eq!(
        desc::interface_class(&config),
        [8, 6, 0x50],
        "{who}: mass storage, SCSI, BOT"
    );
    let eps: Vec<(u8, u32, u32)> = desc::endpoints(&config)
        .into_iter()
        .map(|(addr, _, mps)| {
            let kind = if addr & 0x80 != 0 {
                EP_BULK_IN
            } else {
                EP_BULK_OUT
            };
            (addr, kind, u32::from(mps))
        })
        .collect();
    assert_eq!(eps.len(), 2, "{who}: two bulk endpoints: {config:x?}");
    assert_eq!(d.configure(slot, &eps), CC_SUCCESS, "{who}");
    let (inquiry, _, status) = d.bot(slot, 1, &bot::inquiry(36), &[], 36);
    assert_eq!(status, 0);
    assert_eq!(&inquiry[8..16], b"QEMU    ", "{who}");
    // TEST UNIT READY until the power-on UNIT ATTENTION is taken (REQUEST SENSE).
    let mut ready = false;
    for tag in 10..14 {
        let (_, _, status) = d.bot(slot, tag, &bot::TEST_UNIT_READY, &[], 0);
        if status == 0 {
            ready = true;
            break;
        }
        let (sense, _, _) = d.bot(slot, tag + 100, &bot::request_sense(18), &[], 18);
        assert_eq!(sense[2] & 0xf, 6, "{who}: UNIT ATTENTION: {sense:x?}");
    }
    assert!(ready, "{who}: TEST UNIT READY");
    let (cap, residue, status) = d.bot(slot, 2, &bot::READ_CAPACITY_10, &[], 8);
    assert_eq!((residue, status), (0, 0), "{who}: READ CAPACITY");
    assert_eq!(
        u32::from_be_bytes([cap[0], cap[1], cap[2], cap[3]]),
        2047,
        "{who}: last LBA"
    );
    // READ(10) of 8 blocks in 8 chained Normal TRBs of 512 bytes, IOC on the last.
    let buf = BUFFERS + 0xb4_0000;
    Stick { d: &mut *d, slot }.bulk_out(&bot::cbw(30, 4096, true, &bot::read_10(5, 8)));
    d.zero(buf + 0x1000, 4096);
    let chain: Vec<Trb> = (0..8u64)
        .map(|i| {
            let flags = if i == 7 { TRB_IOC } else { TRB_CH };
            Trb::new(TRB_NORMAL, buf + 0x1000 + 512 * i, 512, flags)
        })
        .collect();
    let addrs = d.submit(slot, 3, &chain);
    let e = d
        .transfer_event(addrs[7], WAIT)
        .unwrap_or_else(|| panic!("{who}: the chained TD never completed"));
    assert_eq!(
        (e.ccode(), e.residual()),
        (CC_SUCCESS, 0),
        "{who}: chained TD"
    );
    assert!(
        d.hw.mem_read(buf + 0x1000, 4096) == content[5 * 512..13 * 512],
        "{who}: blocks 5-12 through the chain"
    );
    let csw = Stick { d: &mut *d, slot }.bulk_in(13);
    assert_eq!(bot::csw(&csw, 30).1, 0, "{who}: status");
    // READ(10) of 8 blocks (4 KiB in one TRB, many packets).
    let (data, residue, status) = d.bot(slot, 3, &bot::read_10(5, 8), &[], 4096);
    assert_eq!((residue, status), (0, 0), "{who}");
    assert!(
        data == content[5 * 512..13 * 512],
        "{who}: blocks 5-12 as in the image"
    );
    // WRITE(10) of block 9.
    let block = bot::written_block();
    let (_, residue, status) = d.bot(slot, 4, &bot::write_10(9, 1), &block, 0);
    assert_eq!((residue, status), (0, 0), "{who}");
    let (_, _, status) = d.bot(slot, 5, &bot::SYNCHRONIZE_CACHE_10, &[], 0);
    assert_eq!(status, 0, "{who}: SYNCHRONIZE CACHE");
    // A reply shorter than asked: the residue in the CSW; the data stage ends short (a
    // Short Packet event) or is padded (QEMU's usb-storage pads to the CBW's length).
    let (inquiry, residue, _) = d.bot(slot, 6, &bot::inquiry(36), &[], 64);
    assert_eq!(residue, 28, "{who}: residue");
    assert!(
        inquiry.len() == 36 || inquiry.len() == 64,
        "{who}: {} bytes",
        inquiry.len()
    );
    assert_eq!(&inquiry[8..16], b"QEMU    ", "{who}");
    // A CBW with a bad signature: the device stalls; the OUT endpoint halts (Stall
    // Error), a doorbell on it runs nothing; Reset Endpoint, Set TR Dequeue and
    // CLEAR_FEATURE(ENDPOINT_HALT) bring it back, and the next command works.
    let buf = BUFFERS + 0xb8_0000;
    d.hw.mem_write(buf, &[0x55u8; 31]);
    let (cc, _) = d.bulk(slot, 4, buf, 31);
    assert_eq!(cc, CC_STALL, "{who}: a bad CBW stalls");
    assert_eq!(d.ep_state(slot, 4), EP_HALTED, "{who}: bulk OUT halted");
    let queued = d.submit(slot, 4, &[Trb::new(TRB_NORMAL, buf, 31, TRB_IOC)])[0];
    assert!(
        d.transfer_event(queued, Duration::from_millis(30))
            .is_none(),
        "{who}: a halted endpoint runs nothing"
    );
    assert_eq!(d.reset_ep(slot, 4), CC_SUCCESS, "{who}: Reset Endpoint");
    assert_eq!(d.ep_state(slot, 4), EP_STOPPED, "{who}: stopped");
    let fresh = Driver::ring_base(slot, 4) + 0x800;
    assert_eq!(
        d.move_ring(slot, 4, fresh),
        CC_SUCCESS,
        "{who}: Set TR Dequeue"
    );
    d.control(slot, setup::clear_endpoint_halt(0x02), &[])
        .expect("CLEAR_FEATURE(ENDPOINT_HALT) on EP 2 OUT");
    let (inquiry, _, status) = d.bot(slot, 40, &bot::inquiry(36), &[], 36);
    assert_eq!(
        (status, &inquiry[8..16]),
        (0, &b"QEMU    "[..]),
        "{who}: after the stall"
    );
    assert_eq!(
        std::fs::read(image).unwrap()[9 * 512..10 * 512],
        block[..],
        "{who}: block 9 in the image"
    );
}

#[test]
fn a_usb_stick_reads_and_writes_its_image_over_bulk_only() {
    test_support::qtest::with_deadline("xhci-storage", || {
        let content = bot::stick_content();
        // QEMU 7.2 first, on an image of its own.
        let qpath = bot::stick_image("xhci-storage", "qemu.raw", &content);
        let drive = format!("if=none,id=stick,format=raw,file={}", qpath.display());
        let stick: [UsbDevice; 1] = [("usb-storage", &[("port", "1"), ("drive", "stick")])];
        if let Some(mut d) = qemu_xhci("storage", &["-drive", &drive], &stick) {
            storage(&mut d, &content, &qpath);
        }
        let path = bot::stick_image("xhci-storage", "stick.raw", &content);
        test_support::drives::add_raw_drive("xhci-stick0", &path, false, false);
        let stick: [UsbDevice; 1] = [("usb-storage", &[("drive", "xhci-stick0"), ("port", "1")])];
        let (_m, mut d) = qomvm_xhci("xhcis", &[], &stick);
        storage(&mut d, &content, &path);
    });
}

/// The controller's state, the slots and the endpoints (with a TRB pending on the
/// tablet's interrupt endpoint) move with a migration; the destination completes it when
/// the pointer moves there, and goes on with both rings.
#[test]
fn the_controller_and_its_slots_move_with_a_migration() {
    use hw::core::migration::{load_vm, save_vm, Progress};
    test_support::qtest::with_deadline("xhci-migration", || {
        let (src, mut d) = qomvm_xhci("xhcim", &[], &usb::TABLET_KBD);
        let port = d.usb2_port(1);
        let slot = d.attach(port);
        d.configure_int_in(slot, 8);
        assert_eq!(d.noop(), CC_SUCCESS);
        let buf = BUFFERS + 0xc0_0000;
        let trb = d.nak_pending(slot, buf, Duration::from_millis(30));
        let ms = machine_state(&src).unwrap();
        runstate::vm_stop(ms, RunStatus::FinishMigrate).unwrap();
        let mut stream = Vec::new();
        save_vm(&src, &mut stream, &mut Progress::default()).unwrap();

        let dst = usb::pc_with_hc_stopped("qemu-xhci", "xhcim", &[], &usb::TABLET_KBD);
        load_vm(&dst, &mut stream.as_slice(), None).unwrap();
        runstate::vm_start(machine_state(&dst).unwrap()).unwrap();
        // The driver goes on where it was, on the destination.
        d.hw = Box::new(Qomvm::new(&dst));
        assert_eq!(d.read(USBCMD), CMD_RS | CMD_INTE, "USBCMD moved");
        assert_eq!(d.read(USBSTS) & STS_HCH, 0, "running");
        assert_eq!(d.read(CONFIG), 64);
        assert_eq!(d.read(DCBAAP), DCBAA as u32);
        assert_eq!(d.read(ERSTBA), ERST as u32);
        assert_eq!(d.read(ERSTSZ), 1);
        assert_eq!(d.read(IMAN) & 2, 2);
        let sc = d.portsc(port);
        assert_eq!(
            sc & (PORT_CCS | PORT_PED),
            PORT_CCS | PORT_PED,
            "the port still enabled: {sc:#x}"
        );
        assert_eq!(d.slot_state(slot), SLOT_CONFIGURED);
        let pending = Some((trb, buf));
        d.assert_tablet_reports(slot, pending, (0x100, 0x200, 0), "on the destination");
        // The command ring and EP0 carry on where they were.
        assert_eq!(d.noop(), CC_SUCCESS, "the command ring after migration");
        let dev = d.device_descriptor(slot);
        assert_eq!(desc::vendor(&dev), 0x0627, "EP0 after migration");
        assert!(
            hw::usb::usb_bus::info_usb(&dst).contains(&format!(".{slot}, Port 1,")),
            "the tablet kept its address: {}",
            hw::usb::usb_bus::info_usb(&dst)
        );
    });
}

/// Hostile rings and contexts: nothing hangs or panics; each is refused with a completion
/// code, or ignored, or halts the controller with an error; afterwards a reset brings it
/// back.
#[test]
fn hostile_rings_and_contexts_never_hang_the_controller() {
    on_both("xhci-hostile", hostile);
}

fn hostile(d: &mut Driver) {
    let alive = |d: &mut Driver, what: &str| {
        let sts = d.read(USBSTS);
        let _ = d.read(PORTSC);
        d.init();
        assert_eq!(
            d.noop(),
            CC_SUCCESS,
            "{what}: the controller recovers (USBSTS was {sts:#x})"
        );
    };
    // A command ring of Link TRBs that point at themselves.
    for i in 0..4u64 {
        let at = CMD_RING + 16 * i;
        d.write_trb(at, Trb::new(TRB_LINK, at, 0, 1));
    }
    d.write(DOORBELL, 0);
    std::thread::sleep(Duration::from_millis(20));
    alive(d, "a looping command ring");
    // A command ring of No Ops that never ends (the Link back without Toggle Cycle).
    for i in 0..8u64 {
        let t = if i == 7 {
            Trb::new(TRB_LINK, CMD_RING, 0, 1)
        } else {
            Trb::new(TRB_NOOP_CMD, 0, 0, 1)
        };
        d.write_trb(CMD_RING + 16 * i, t);
    }
    d.write(DOORBELL, 0);
    std::thread::sleep(Duration::from_millis(50));
    alive(d, "an endless command ring");
    // A command ring outside RAM, and one in the middle of the MMIO hole.
    for base in [0xffff_ffff_f000u64, 0x1_0000_0000 - 0x2_0000, 0x4000_0000] {
        d.write64(CRCR, base | 1);
        d.write(DOORBELL, 0);
        std::thread::sleep(Duration::from_millis(10));
        alive(d, &format!("a command ring at {base:#x}"));
    }
    // An event ring outside RAM.
    d.halt();
    d.write_erst(ERST, 0xffff_ffff_0000, 16);
    d.write64(ERDP, 0xffff_ffff_0000);
    d.write64(ERSTBA, ERST);
    d.write(USBCMD, CMD_RS | CMD_INTE);
    d.post_command(NOOP);
    std::thread::sleep(Duration::from_millis(10));
    alive(d, "an event ring outside RAM");
    // ERDP outside the segment.
    d.write64(ERDP, EV_RING + 0x10_0000);
    d.post_command(NOOP);
    std::thread::sleep(Duration::from_millis(10));
    alive(d, "ERDP outside the event ring");
    // An input context outside RAM; a DCBAA entry outside RAM; a DCBAA outside RAM.
    let tablet = d.usb2_port(1);
    d.reset_port(tablet);
    let slot = d.enable_slot().unwrap();
    d.prepare_address(slot, tablet);
    let cc = d.cmd_code(TRB_ADDRESS_DEVICE, 0xffff_ffff_f000, u32::from(slot) << 24);
    assert_ne!(cc, CC_SUCCESS, "an input context outside RAM");
    d.w64(DCBAA + 8 * u64::from(slot), 0xffff_ffff_f000);
    d.address_device(slot, false);
    alive(d, "contexts outside RAM");
    d.write64(DCBAAP, 0xffff_ffff_f000);
    let slot = d.enable_slot().unwrap();
    d.address_device(slot, false);
    alive(d, "a DCBAA outside RAM");
    // EP0's transfer ring: Link TRBs only, then outside RAM.
    let slot = d.attach(tablet);
    let base = Driver::ring_base(slot, 1);
    for i in 0..4u64 {
        d.write_trb(
            base + 16 * i,
            Trb::new(TRB_LINK, base + 16 * ((i + 1) % 4), 0, 1),
        );
    }
    d.doorbell(slot, 1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        d.noop(),
        CC_SUCCESS,
        "commands go on beside a looping transfer ring"
    );
    assert_eq!(d.stop_ep(slot, 1), CC_SUCCESS);
    assert_eq!(d.move_ring(slot, 1, base + 0x800), CC_SUCCESS);
    let dev = d.device_descriptor(slot);
    assert_eq!(&dev[..2], &[18, 1], "EP0 on a sane ring again");
    assert_eq!(d.stop_ep(slot, 1), CC_SUCCESS);
    assert_eq!(
        d.set_tr_deq(slot, 1, 0xffff_ffff_f001),
        CC_SUCCESS,
        "Set TR Dequeue takes any pointer"
    );
    d.doorbell(slot, 1);
    std::thread::sleep(Duration::from_millis(10));
    // A Setup TRB without IDT, a Data TRB of 100 KiB and a TD with no Status stage.
    d.init();
    let slot = d.attach(tablet);
    let bad = [
        [
            Trb::new(TRB_SETUP, BUFFERS, 8, TRT_IN << 16 | TRB_IOC),
            Trb::new(TRB_STATUS, 0, 0, TRB_IOC),
        ],
        [
            Trb::setup(setup::get_descriptor(desc::DEVICE, 0, 0xffff), TRT_IN),
            Trb::new(TRB_DATA, 0x7ff_0000, 0x1_ffff, TRB_DIR_IN | TRB_IOC),
        ],
        [
            Trb::setup(setup::get_descriptor(desc::DEVICE, 0, 18), TRT_IN),
            Trb::new(TRB_NORMAL, BUFFERS, 18, TRB_IOC),
        ],
    ];
    for (i, td) in bad.iter().enumerate() {
        d.submit(slot, 1, td);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(d.read(0), 0x0100_0040, "bad TD {i}: registers answer");
    }
    alive(d, "bad control TDs");
    // Garbage on the command ring and on EP0's ring, seeded.
    let mut garbage = usb::Garbage::new();
    for round in 0..20 {
        let slot = d.attach(tablet);
        let mut cmds = garbage.bytes(RING_TRBS as usize * 16);
        let mut tds = garbage.bytes(RING_TRBS as usize * 16);
        for (i, t) in cmds.chunks_mut(16).zip(tds.chunks_mut(16)).enumerate() {
            // Cycle bit 1; pointers mostly into RAM near the rings; the slot id
            // mostly the real one.
            t.0[12] |= 1;
            t.1[12] |= 1;
            if i % 3 != 0 {
                t.0[15] = slot;
                let p = CMD_RING + u64::from(t.0[0] & 0x3f) * 16;
                t.0[0..8].copy_from_slice(&p.to_le_bytes());
                let p = Driver::ring_base(slot, 1) + u64::from(t.1[0] & 0x3f) * 16;
                t.1[0..8].copy_from_slice(&p.to_le_bytes());
                let len = u32::from(t.1[8]);
                t.1[8..12].copy_from_slice(&len.to_le_bytes());
            }
        }
        d.hw.mem_write(Driver::ring_base(slot, 1), &tds);
        d.doorbell(slot, 1);
        let ring = d.cmd;
        d.hw.mem_write(ring.base, &cmds);
        d.write(DOORBELL, 0);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(d.read(0), 0x0100_0040, "round {round}: registers answer");
        alive(d, &format!("garbage round {round}"));
    }
    // After all that, the tablet enumerates and reports.
    let slot = d.attach(tablet);
    d.configure_int_in(slot, 8);
    d.assert_tablet_reports(slot, None, (1, 2, 0), "after the abuse");
}

/// `p2` and `p3` shape HCSPARAMS1 and the protocol capabilities (USB 3.0 ports first),
/// each clamped to 15 as QEMU does; qomvm offers no streams (MaxPSASize 0). (qemu-xhci has no
/// `slots`, `intrs`, `msi` or `msix`: those are nec-usb-xhci's.)
#[test]
fn p2_p3_and_streams_shape_the_capabilities() {
    test_support::qtest::with_deadline("xhci-props", || {
        for (props, hcs1, usb3, usb2) in [
            (&[("p2", "2"), ("p3", "6")][..], 0x0800_1040, (1, 6), (7, 2)),
            (
                &[("p2", "15"), ("p3", "15")][..],
                0x1e00_1040,
                (1, 15),
                (16, 15),
            ),
            (&[("p2", "16")][..], 0x1300_1040, (1, 4), (5, 15)),
        ] {
            let (_m, d) = qomvm_xhci("xhcip", props, &[]);
            assert_eq!(d.read(0x04), hcs1, "{props:?}: HCSPARAMS1");
            assert_eq!(
                d.protocol_ports(3),
                usb3,
                "{props:?}: USB 3.0 ports (qemu-xhci has them first, as QEMU 7.2: 1-p3)"
            );
            assert_eq!(d.protocol_ports(2), usb2, "{props:?}: USB 2.0 ports");
            for p in 1..=(hcs1 >> 24) as u8 {
                assert_ne!(d.portsc(p) & PORT_PP, 0, "{props:?}: port {p} powered");
            }
        }
        // No streams to offer: MaxPSASize 0, QEMU's value under `streams=off` (a
        // `streams` property would promise what qomvm does not do).
        let (_m, d) = qomvm_xhci("xhcip", &[], &[]);
        assert_eq!(d.read(0x10), 0x0008_0001, "HCCPARAMS1 without streams");
    });
}

/// `info usb` as QEMU prints it for devices on the xHCI bus.
#[test]
fn info_usb_lists_the_devices_on_the_xhci_bus() {
    test_support::qtest::with_deadline("xhci-info-usb", || {
        let theirs = qemu_xhci("info", &[], &usb::TABLET_KBD).map(|d| d.hw.info_usb());
        let (_m, d) = qomvm_xhci("xhcii", &[], &usb::TABLET_KBD);
        let ours = d.hw.info_usb();
        for (who, text) in [("qomvm", Some(ours.clone())), ("QEMU 7.2", theirs)] {
            let Some(text) = text else { continue };
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "{who}: {text}");
            assert!(
                lines[0].starts_with("  Device ") && lines[0].contains(".0, Port 1, Speed "),
                "{who}: {text}"
            );
            assert!(
                lines[0].ends_with("Mb/s, Product QEMU USB Tablet"),
                "{who}: {text}"
            );
            assert!(
                lines[1].starts_with("  Device ") && lines[1].contains(".0, Port 2, Speed "),
                "{who}: {text}"
            );
            assert!(
                lines[1].ends_with("Mb/s, Product QEMU USB Keyboard"),
                "{who}: {text}"
            );
        }
        // The speed agrees with the port's.
        let speed = (d.portsc(d.usb2_port(1)) >> 10) & 0xf;
        let text = if speed == 3 {
            "Speed 480 Mb/s"
        } else {
            "Speed 12 Mb/s"
        };
        assert!(ours.contains(text), "PORTSC speed {speed}: {ours}");
    });
}

/// The command line: `-device qemu-xhci`, devices on its bus by port, QEMU's errors.
#[test]
fn qomvm_takes_xhci_options_and_refuses_bad_ones_in_qemus_words() {
    let bin = env!("CARGO_BIN_EXE_qomvm");
    usb::assert_accepted(
        bin,
        &[
            "-device",
            "qemu-xhci,id=xhci,p2=8,p3=8",
            "-device",
            "usb-tablet,bus=xhci.0,port=1",
            "-device",
            "usb-kbd,bus=xhci.0",
            "-device",
            "usb-mouse,bus=xhci.0,port=8",
        ],
        "",
    );
    usb::assert_accepted(
        bin,
        &["-device", "qemu-xhci", "-device", "usb-tablet"],
        "a USB device finds the xHCI bus by itself: ",
    );
    usb::assert_refused_as_qemu(
        bin,
        &[
            (
                &[
                    "-device",
                    "qemu-xhci,id=xhci",
                    "-device",
                    "usb-tablet,bus=xhci.0,port=5",
                ][..],
                "usb port 5 (bus xhci.0) not found (in use?)",
            ),
            (
                &[
                    "-device",
                    "qemu-xhci,id=xhci",
                    "-device",
                    "usb-tablet,bus=xhci.0,port=1",
                    "-device",
                    "usb-kbd,bus=xhci.0,port=1",
                ][..],
                "usb port 1 (bus xhci.0) not found (in use?)",
            ),
            (
                &["-device", "qemu-xhci,slots=8"][..],
                "Property 'qemu-xhci.slots' not found",
            ),
            (
                &["-device", "qemu-xhci,intrs=4"][..],
                "Property 'qemu-xhci.intrs' not found",
            ),
            (
                &["-device", "qemu-xhci,msix=off"][..],
                "Property 'qemu-xhci.msix' not found",
            ),
        ],
    );
}

/// Hundreds of commands wrap the command ring (Link with Toggle Cycle) and the event ring
/// (the consumer cycle flips); an event ring the driver does not empty never has an
/// unread event overwritten, and the controller goes on once ERDP moves.
fn event_ring_full(d: &mut Driver) {
    let who = d.hw.name();
    for i in 0..600 {
        assert_eq!(d.noop(), CC_SUCCESS, "{who}: No Op {i}");
    }
    // Now 300 commands with nobody reading events, in batches the 63-TRB command ring
    // holds, each once the controller has taken the last (seen in the event ring's memory
    // without moving ERDP).
    d.init();
    let count = |d: &Driver| {
        let ring = d.hw.mem_read(EV_RING, EV_TRBS as usize * 16);
        ring.chunks(16).filter(|b| b[12] & 1 == 1).count()
    };
    let mut first = 0;
    for batch in 0..5 {
        for i in 0..60 {
            let a = d.post_command(NOOP);
            if batch == 0 && i == 0 {
                first = a;
            }
        }
        // Until the controller has written what it will (no new event for 200 ms).
        let deadline = Instant::now() + WAIT;
        let mut seen = count(d);
        let mut since = Instant::now();
        while Instant::now() < deadline
            && seen < 60 * (batch + 1)
            && since.elapsed() < Duration::from_millis(200)
        {
            std::thread::sleep(Duration::from_millis(5));
            let n = count(d);
            if n != seen {
                seen = n;
                since = Instant::now();
            }
        }
    }
    let ring = d.hw.mem_read(EV_RING, EV_TRBS as usize * 16);
    let written: Vec<Trb> = ring.chunks(16).map(Trb::from_bytes).collect();
    assert_eq!(
        (written[0].kind(), written[0].param),
        (EV_COMMAND, first),
        "{who}: the first event is still the first command's"
    );
    let valid = written.iter().take_while(|t| t.control & 1 == 1).count();
    assert!(
        valid < EV_TRBS as usize,
        "{who}: the ring was filled up to the dequeue pointer ({valid} events)"
    );
    assert!(valid >= 200, "{who}: only {valid} events");
    for t in &written[..valid] {
        assert!(
            t.kind() == EV_COMMAND || (t.kind() == 37 && t.ccode() == 21),
            "{who}: a command completion or Event Ring Full: {t:x?}"
        );
    }
    // The driver catches up; the controller goes on (the rest of the completions, if it
    // kept them, then a new command's).
    let mut n = 0;
    while d.next_event(Duration::from_millis(20)).is_some() {
        n += 1;
        assert!(n < 1000, "{who}: events without end");
    }
    assert_eq!(
        d.read(USBSTS) & (STS_HCH | STS_HCE),
        0,
        "{who}: still running"
    );
    assert_eq!(
        d.noop(),
        CC_SUCCESS,
        "{who}: a command after the ring was full"
    );
}

#[test]
fn rings_wrap_and_a_full_event_ring_loses_nothing_unread() {
    on_both("xhci-evfull", event_ring_full);
}

/// A device unplugged from an addressed and configured slot: the port shows the
/// disconnection with a Port Status Change Event; transfers to it end with an error and
/// the controller goes on; a new device on the port enumerates.
#[test]
fn an_unplugged_device_leaves_its_port_and_slot_harmlessly() {
    test_support::qtest::with_deadline("xhci-unplug", || {
        let (m, mut d) = qomvm_xhci("xhciu", &[], &usb::TABLET_KBD);
        let port = d.usb2_port(1);
        let slot = d.attach(port);
        d.configure_int_in(slot, 8);
        let buf = BUFFERS + 0xd0_0000;
        let pending = d.normal(slot, 3, buf, 8);
        d.drain(EV_PORT, Duration::from_millis(20));
        usb::unplug_anon(&m, 0);
        let sc = d.portsc(port);
        assert_eq!(sc & (PORT_CCS | PORT_PED), 0, "gone: {sc:#x}");
        assert_ne!(sc & PORT_CSC, 0, "connect change: {sc:#x}");
        let e = d.port_event("for the unplug");
        assert_eq!(e.param >> 24, u64::from(port));
        d.portsc_write(port, PORT_CHANGES);
        // The pending TRB and a control transfer: whatever they end with, they end or
        // stay, and commands go on.
        let _ = d.transfer_event(pending, Duration::from_millis(50));
        let addrs = d.submit(slot, 1, &device_descriptor_td(buf, 18, 0));
        if let Some(e) = d.event_where(Duration::from_millis(200), |e| {
            e.kind() == EV_TRANSFER && addrs.contains(&e.param)
        }) {
            assert_ne!(e.ccode(), CC_SUCCESS, "a transfer to nobody: {e:x?}");
        }
        assert_eq!(d.noop(), CC_SUCCESS);
        assert_eq!(d.disable_slot(slot), CC_SUCCESS);
        // A mouse on the same USB port enumerates in a new slot.
        let bus = usb::hc_bus(&m, "xhciu");
        test_support::qtest::plug(&m, &bus, "usb-mouse", &[("port", "1")]);
        let sc = d.wait_port(port, PORT_CCS, PORT_CCS);
        assert_ne!(sc & PORT_CSC, 0, "{sc:#x}");
        d.port_event("for the plug");
        let slot = d.attach(port);
        let dev = d.device_descriptor(slot);
        assert_eq!(desc::product(&dev), 0x0001, "{dev:x?}");
        let product = d.get_descriptor(slot, desc::STRING, dev[15], 255).unwrap();
        assert_eq!(product[0] as usize, product.len());
    });
}

/// HCRST clears the operational and runtime registers; CRCR reads CRR while commands
/// run and a Command Abort stops the ring with a Command Ring Stopped event; USBCMD keeps
/// only its defined bits.
fn reset_and_command_ring_control(d: &mut Driver) {
    let who = d.hw.name();
    assert_eq!(d.noop(), CC_SUCCESS);
    // (QEMU 7.2 reads CRCR as crcr_low & ~0xe: CRR never shows, so it is not checked.)
    // Command Abort (CA, bit 2): the ring stops with a Command Ring Stopped event.
    d.write(CRCR, 4);
    d.write(CRCR + 4, 0);
    let e = d
        .event_where(WAIT, |e| e.kind() == EV_COMMAND && e.ccode() == 24)
        .unwrap_or_else(|| panic!("{who}: no Command Ring Stopped event"));
    // (QEMU 7.2 leaves the event's pointer 0; the spec has the stopped dequeue pointer.)
    assert_eq!(e.ccode(), 24, "{who}");
    // A new command ring pointer takes now; the doorbell runs it.
    let fresh = CMD_RING + 0x800;
    d.zero(fresh, RING_TRBS as usize * 16);
    d.write64(CRCR, fresh | 1);
    d.cmd = Ring::new(fresh);
    assert_eq!(d.noop(), CC_SUCCESS, "{who}: the new command ring");
    // USBCMD: QEMU keeps RS, HCRST, INTE, HSEE, EWE and EU3S.
    d.write(USBCMD, CMD_RS | CMD_INTE | 8 | 0x400 | 0x80);
    assert_eq!(
        d.read(USBCMD),
        CMD_RS | CMD_INTE | 8 | 0x400,
        "{who}: USBCMD"
    );
    d.write(USBCMD, CMD_RS | CMD_INTE);
    // HCRST: everything back to its reset value.
    d.write(USBCMD, CMD_HCRST);
    d.wait_reg(USBCMD, CMD_HCRST, 0);
    let regs = [
        (USBCMD, 0),
        (CRCR, 0),
        (DCBAAP, 0),
        (CONFIG, 0),
        (DNCTRL, 0),
        (IMAN, 0),
        (IMOD, 0),
        (ERSTSZ, 0),
        (ERSTBA, 0),
        (ERDP, 0),
    ];
    let got: Vec<(u64, u32)> = regs.iter().map(|&(r, _)| (r, d.read(r))).collect();
    assert_eq!(got, regs, "{who}: registers after HCRST");
    assert_eq!(
        d.read(USBSTS) & (STS_HCH | STS_EINT),
        STS_HCH,
        "{who}: halted"
    );
    d.init();
    assert_eq!(d.noop(), CC_SUCCESS);
}

#[test]
fn hcrst_crcr_and_command_abort_behave_as_qemus() {
    on_both("xhci-crcr", reset_and_command_ring_control);
}

/// A Transfer TRB's Interrupter Target sends its event to that interrupter's own event
/// ring (interrupter 1 here), not to interrupter 0's.
fn second_interrupter(d: &mut Driver) {
    let who = d.hw.name();
    let ring1 = EV_RING + 0x8000;
    let erst1 = ERST + 0x100;
    d.zero(ring1, 16 * 16);
    d.write_erst(erst1, ring1, 16);
    d.write(IMAN + 0x20, 2);
    d.write(ERSTSZ + 0x20, 1);
    d.write64(ERDP + 0x20, ring1);
    d.write64(ERSTBA + 0x20, erst1);
    assert_eq!(
        d.read(ERSTBA + 0x20),
        erst1 as u32,
        "{who}: interrupter 1's ERSTBA"
    );
    let port = d.usb2_port(1);
    let slot = d.attach(port);
    let buf = BUFFERS + 0xe0_0000;
    let mut trbs = device_descriptor_td(buf, 18, 0);
    // The status stage's Interrupter Target: 1.
    trbs[2].status = 1 << 22;
    let addrs = d.submit(slot, 1, &trbs);
    let deadline = Instant::now() + WAIT;
    let event = loop {
        let event = Trb::from_bytes(&d.hw.mem_read(ring1, 16));
        if event.control & 1 == 1 {
            break event;
        }
        assert!(
            Instant::now() < deadline,
            "{who}: no event on interrupter 1's ring"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(
        (event.kind(), event.param, event.ccode()),
        (EV_TRANSFER, addrs[2], CC_SUCCESS),
        "{who}: the status stage's event on interrupter 1"
    );
    assert_eq!(d.read(IMAN + 0x20) & 1, 1, "{who}: interrupter 1's IP");
    assert!(
        d.transfer_event(addrs[2], Duration::from_millis(30))
            .is_none(),
        "{who}: nothing on interrupter 0's ring for it"
    );
    assert_eq!(d.hw.mem_read(buf, 2), vec![18, 1]);
    // Interrupter 0 goes on.
    assert_eq!(d.noop(), CC_SUCCESS);
}

#[test]
fn an_interrupter_target_routes_events_to_that_interrupter() {
    on_both("xhci-intr1", second_interrupter);
}

/// Devices behind a usb-hub are reached through the slot context's route string: the
/// hub at route 0 on its root port, the tablet at route 1 and the keyboard at route 3
/// behind it; the tablet's reports reach its interrupt endpoint.
fn behind_a_hub(d: &mut Driver) {
    let who = d.hw.name();
    let port = d.port_of(1);
    d.reset_port(port);
    let speed = (d.portsc(port) >> 10) & 0xf;
    // Enable Slot and Address Device for the device at `route`: the slot and the
    // completion code.
    let address = |d: &mut Driver, route: u32| -> (u8, u8) {
        let slot = d.enable_slot().expect("Enable Slot");
        d.prepare_address(slot, port);
        d.w32(Driver::in_ctx(slot) + 32, 1 << 27 | speed << 20 | route);
        (slot, d.address_device(slot, false))
    };
    let enumerate = |d: &mut Driver, route: u32| -> u8 {
        let (slot, cc) = address(d, route);
        assert_eq!(cc, CC_SUCCESS, "{who}: Address Device at route {route:#x}");
        slot
    };
    let hub = enumerate(d, 0);
    let dev = d.device_descriptor(hub);
    assert_eq!(dev[4], 9, "{who}: the hub at route 0");
    let tablet = enumerate(d, 1);
    let dev = d.device_descriptor(tablet);
    assert_eq!(
        (desc::vendor(&dev), desc::product(&dev)),
        (0x0627, 0x0001),
        "{who}: the tablet at route 1"
    );
    let kbd = enumerate(d, 3);
    let config = d.get_descriptor(kbd, desc::CONFIGURATION, 0, 255).unwrap();
    assert_eq!(
        desc::interface_class(&config),
        [3, 1, 1],
        "{who}: the keyboard at route 3"
    );
    // Nobody at route 2: Address Device fails, nothing hangs.
    assert_ne!(address(d, 2).1, CC_SUCCESS, "{who}: route 2 is empty");
    // The tablet reports.
    d.configure_int_in(tablet, 8);
    let buf = BUFFERS + 0xf0_0000;
    let trb = d.nak_pending(tablet, buf, Duration::from_millis(30));
    let pending = Some((trb, buf));
    d.assert_tablet_reports(tablet, pending, (0x100, 0x200, 0), "from behind the hub");
}

#[test]
fn devices_behind_a_hub_are_reached_by_their_route_strings() {
    on_both_with("xhci-hub", &usb::HUB_TABLET_KBD, behind_a_hub);
}

/// Disable Slot with a TRB pending on the tablet's interrupt endpoint: the pointer moving
/// afterwards brings no event for the slot that went, and a new slot for the tablet
/// works.
fn disable_with_pending(d: &mut Driver) {
    let who = d.hw.name();
    let port = d.usb2_port(1);
    let slot = d.attach(port);
    d.configure_int_in(slot, 8);
    d.nak_pending(slot, BUFFERS + 0xf8_0000, Duration::from_millis(20));
    assert_eq!(
        d.disable_slot(slot),
        CC_SUCCESS,
        "{who}: Disable Slot with a TRB pending"
    );
    d.hw.pointer(0x300, 0x400, 0);
    std::thread::sleep(Duration::from_millis(30));
    assert!(
        d.event_where(Duration::from_millis(30), |e| e.kind() == EV_TRANSFER)
            .is_none_or(|e| e.ccode() != CC_SUCCESS && e.ccode() != CC_SHORT_PACKET),
        "{who}: a report for a disabled slot"
    );
    assert_eq!(d.noop(), CC_SUCCESS);
    let slot = d.attach(port);
    let dev = d.device_descriptor(slot);
    assert_eq!(desc::product(&dev), 1, "{who}");
    d.configure_int_in(slot, 8);
    d.assert_tablet_reports(slot, None, (0x500, 0x600, 0), "in the new slot");
}

#[test]
fn disabling_a_slot_with_a_pending_transfer_is_harmless() {
    on_both("xhci-disable", disable_with_pending);
}

/// ERDP written with EHB while events are still unread beyond it sets IMAN.IP again; once
/// the driver has caught up it stays clear.
fn erdp_reraises(d: &mut Driver) {
    let who = d.hw.name();
    let a = d.post_command(NOOP);
    let b = d.post_command(NOOP);
    // Both events written.
    let deadline = Instant::now() + WAIT;
    while d.hw.mem_read(EV_RING + 16 * (d.ev_idx + 1) + 12, 1)[0] & 1 != u8::from(d.ev_cycle) {
        assert!(Instant::now() < deadline, "{who}: two events");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.read(IMAN) & 1, 1, "{who}: IP");
    d.write(IMAN, 3);
    assert_eq!(d.read(IMAN) & 1, 0, "{who}: IP cleared");
    // Consume one: ERDP moves past it with EHB; one is left, so IP again.
    let e = d.next_event(WAIT).unwrap();
    assert_eq!(e.param, a);
    assert_eq!(
        d.read(IMAN) & 1,
        1,
        "{who}: IP again: an event is still unread"
    );
    d.write(IMAN, 3);
    let e = d.next_event(WAIT).unwrap();
    assert_eq!(e.param, b);
    assert_eq!(d.read(IMAN) & 1, 0, "{who}: caught up: IP stays clear");
    assert_eq!(d.read(ERDP) & 8, 0, "{who}: EHB clear");
}

#[test]
fn erdp_with_events_left_interrupts_again() {
    on_both("xhci-erdp", erdp_reraises);
}
