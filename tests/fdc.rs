//! The pc's floppy controller (`isa-fdc`, QEMU 7.2's hw/block/fdc.c and fdc-isa.c) and the
//! ISA DMA controller it moves data through (`i8257`, hw/dma/i8257.c), driven register by
//! register over QEMU's qtest protocol: what QEMU's tests/qtest/fdc-test.c covers (CMOS,
//! the disk-change line, SEEK, RELATIVE SEEK, SENSE INTERRUPT, READ ID, VERIFY, non-DMA
//! reads, media change through QMP, garbage to every port), plus DMA reads and writes on
//! channel 2 checked in guest memory, in the image file and in the DMA controller's
//! registers, IRQ 6, write protection, drive types picked from image sizes, `query-block`
//! and the command line's refusals.
//!
//! Every scenario runs twice: on QEMU 7.2 itself (`qemu-system-x86_64` from Debian, when
//! installed; that QEMU has no qtest accelerator, so its CPU runs a BIOS that only halts)
//! and on qomvm. The QEMU run is the reference: a scenario QEMU 7.2 fails is a wrong
//! scenario. Where QEMU 7.2's behaviour is a quirk a later QEMU changed, the scenario says
//! so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::fuzz_qtest::{hex, Qtest};
use test_support::qmp::QmpClient;

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");
const QEMU: &str = "qemu-system-x86_64";

/// The controller's registers (offsets from 0x3f0).
const FDC: u16 = 0x3f0;
const SRA: u16 = FDC;
const SRB: u16 = FDC + 1;
const DOR: u16 = FDC + 2;
const TDR: u16 = FDC + 3;
const MSR: u16 = FDC + 4;
const DSR: u16 = FDC + 4;
const FIFO: u16 = FDC + 5;
const DIR: u16 = FDC + 7;
const CCR: u16 = FDC + 7;

/// MSR bits.
const BUSY: u8 = 0x10;
const NONDMA: u8 = 0x20;
const DIO: u8 = 0x40;
const RQM: u8 = 0x80;
/// DIR's disk-change bit.
const DSKCHG: u8 = 0x80;

/// Commands (fdc-test.c's values: READ and VERIFY with the MT, MFM and SK bits).
const CMD_SPECIFY: u8 = 0x03;
const CMD_SENSE_DRIVE: u8 = 0x04;
const CMD_SENSE_INT: u8 = 0x08;
const CMD_READ_ID: u8 = 0x0a;
const CMD_DUMPREG: u8 = 0x0e;
const CMD_SEEK: u8 = 0x0f;
const CMD_VERSION: u8 = 0x10;
const CMD_VERIFY: u8 = 0x16;
const CMD_PART_ID: u8 = 0x18;
const CMD_READ_MT: u8 = 0xe6;
const CMD_RELATIVE_SEEK_OUT: u8 = 0x8f;
const CMD_RELATIVE_SEEK_IN: u8 = 0xcf;
/// READ and WRITE DATA with MFM only (one side, no multi-track).
const CMD_READ: u8 = 0x46;
const CMD_WRITE: u8 = 0x45;

const FLOPPY_IRQ: u32 = 6;
const SECTOR: usize = 512;
/// A 1.44 MB diskette: 80 cylinders, 2 heads, 18 sectors.
const SECTORS_144: usize = 2880;

/// The first DMA controller's channel 2 registers.
const DMA_ADDR2: u16 = 0x04;
const DMA_COUNT2: u16 = 0x05;
const DMA_STATUS: u16 = 0x08;
const DMA_REQUEST: u16 = 0x09;
const DMA_MASK1: u16 = 0x0a;
const DMA_MODE: u16 = 0x0b;
const DMA_FLIPFLOP: u16 = 0x0c;
const DMA_PAGE2: u16 = 0x81;
/// Single mode, address increment, no auto-init, channel 2: device to memory (the
/// 8237's "write transfer") and memory to device ("read transfer").
const DMA_MODE_TO_MEMORY: u8 = 0x46;
const DMA_MODE_FROM_MEMORY: u8 = 0x4a;

/// How long a level, a DMA transfer or a READ ID (20 ms of virtual time) may take.
const PATIENCE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Qemu,
    Qomvm,
}

impl Vmm {
    fn binary(self) -> &'static str {
        match self {
            Vmm::Qemu => QEMU,
            Vmm::Qomvm => QOMVM,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::Qomvm => "qomvm",
        }
    }
}

/// QEMU is installed; else the test says why it skips.
fn qemu_installed() -> bool {
    let found = std::process::Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        test_support::skip::skip(
            "qemu-system-x86_64 (package qemu-system-x86) is not installed: no QEMU 7.2 reference run",
        );
    }
    found
}

/// A BIOS that only halts (cli; hlt; jmp $-1 at the reset vector): QEMU's CPU runs (TCG)
/// but touches nothing.
fn halt_bios() -> Vec<u8> {
    let mut bios = vec![0xf4u8; 0x1_0000];
    bios[0xfff0..0xfff4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    bios
}

/// The test image's sector `lba`: its number, then bytes that differ from sector to
/// sector.
fn sector(lba: usize) -> Vec<u8> {
    (0..SECTOR)
        .map(|i| match i {
            0 => lba as u8,
            1 => (lba >> 8) as u8,
            _ => (lba * 31 + i * 7 + 0x5a) as u8,
        })
        .collect()
}

/// An image of `sectors` sectors, each as [`sector`] says.
fn image(sectors: usize) -> Vec<u8> {
    (0..sectors).flat_map(sector).collect()
}

/// The LBA of cylinder `c`, head `h`, sector `s` on a 2-headed, 18-sector diskette.
fn lba(c: usize, h: usize, s: usize) -> usize {
    (c * 2 + h) * 18 + s - 1
}

/// One machine under test: a pc with qtest on a socket, QMP on another, and its scratch
/// directory (the current directory of the process, so images are named relatively).
struct Vm {
    qt: Qtest,
    qmp: QmpClient,
    dir: PathBuf,
    vmm: Vmm,
    /// IRQ 6's level as the `IRQ` lines said so far.
    irq: bool,
}

impl Vm {
    /// Starts `vmm` on `-M pc -m 64` with `files` written to its scratch directory first,
    /// `args` after the board's and IRQ interception on.
    fn start(vmm: Vmm, name: &str, files: &[(&str, Vec<u8>)], args: &[&str]) -> Vm {
        let mut dir = PathBuf::new();
        let qt = Qtest::start(
            vmm.binary(),
            &format!("qomvm-fdc-{name}-{}", vmm.tag()),
            |d| {
                dir = d.to_path_buf();
                for (file, bytes) in files {
                    std::fs::write(d.join(file), bytes).unwrap();
                }
                let mut all: Vec<String> = Vec::new();
                if vmm == Vmm::Qemu {
                    std::fs::write(d.join("halt.bin"), halt_bios()).unwrap();
                    all.extend(["-accel", "tcg", "-bios", "halt.bin"].map(String::from));
                }
                all.push("-qmp".into());
                all.push(format!(
                    "unix:{},server=on,wait=off",
                    d.join("qmp.sock").display()
                ));
                all.extend(args.iter().map(|a| a.to_string()));
                all
            },
        );
        let qmp = QmpClient::connect(&dir.join("qmp.sock"));
        let mut vm = Vm {
            qt,
            qmp,
            dir,
            vmm,
            irq: false,
        };
        assert_eq!(vm.cmd("irq_intercept_in ioapic"), "");
        vm
    }

    /// Sends a qtest request; returns what follows `OK` (the `IRQ` lines before it update
    /// [`Vm::irq`]). A `FAIL` fails the test.
    fn cmd(&mut self, request: &str) -> String {
        let (reply, irqs) = self.qt.cmd_irqs(request.to_string());
        self.note_irqs(&irqs);
        match reply.strip_prefix("OK") {
            Some(rest) => rest.trim().to_string(),
            None => self.qt.fail(&format!("{request}: {reply}")),
        }
    }

    fn note_irqs(&mut self, irqs: &[String]) {
        for line in irqs {
            if line == &format!("IRQ raise {FLOPPY_IRQ}") {
                self.irq = true;
            } else if line == &format!("IRQ lower {FLOPPY_IRQ}") {
                self.irq = false;
            }
        }
    }

    fn value(&mut self, request: &str) -> u64 {
        let v = self.cmd(request);
        u64::from_str_radix(v.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("{request}: {v}"))
    }

    fn inb(&mut self, port: u16) -> u8 {
        self.value(&format!("inb {port:#x}")) as u8
    }

    fn outb(&mut self, port: u16, value: u8) {
        self.cmd(&format!("outb {port:#x} {value:#x}"));
    }

    fn read_mem(&mut self, addr: u64, len: usize) -> Vec<u8> {
        let v = self.cmd(&format!("read {addr:#x} {len:#x}"));
        let digits = v.trim_start_matches("0x");
        (0..len)
            .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    fn write_mem(&mut self, addr: u64, bytes: &[u8]) {
        self.cmd(&format!(
            "write {addr:#x} {:#x} {}",
            bytes.len(),
            hex(bytes)
        ));
    }

    /// IRQ 6 now, after the `IRQ` lines that came before a round trip.
    fn irq_now(&mut self) -> bool {
        self.cmd("endianness");
        self.irq
    }

    /// Waits up to [`PATIENCE`] for IRQ 6 to be at `level`.
    fn expect_irq(&mut self, level: bool, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        while self.irq_now() != level {
            assert!(
                Instant::now() < deadline,
                "{:?}: IRQ 6 stays {} {what}",
                self.vmm,
                if level { "low" } else { "high" }
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// IRQ 6 is low now (a lagging raise would only make this pass).
    fn expect_no_irq(&mut self, what: &str) {
        assert!(!self.irq_now(), "{:?}: IRQ 6 is raised {what}", self.vmm);
    }

    /// fdc-test.c's `floppy_send`: the controller wants a byte (RQM, not DIO).
    fn send(&mut self, byte: u8) {
        let msr = self.inb(MSR);
        assert_eq!(
            msr & (RQM | DIO),
            RQM,
            "{:?}: MSR {msr:#x} before command byte {byte:#x}",
            self.vmm
        );
        self.outb(FIFO, byte);
    }

    /// fdc-test.c's `floppy_recv`: the controller has a byte (RQM and DIO).
    fn recv(&mut self) -> u8 {
        let msr = self.inb(MSR);
        assert_eq!(
            msr & (RQM | DIO),
            RQM | DIO,
            "{:?}: MSR {msr:#x} before a result byte",
            self.vmm
        );
        self.inb(FIFO)
    }

    fn command(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.send(b);
        }
    }

    /// The 7 result bytes of a data command (ST0 ST1 ST2 C H R N); the interrupt stays
    /// raised until the last one is read, which lowers it.
    fn result7(&mut self) -> [u8; 7] {
        let mut r = [0; 7];
        for (i, byte) in r.iter_mut().enumerate() {
            if i == 6 {
                assert!(
                    self.irq_now(),
                    "{:?}: IRQ 6 fell before the last result byte",
                    self.vmm
                );
            }
            *byte = self.recv();
        }
        self.expect_irq(false, "after the last result byte");
        let msr = self.inb(MSR);
        assert_eq!(
            msr & (RQM | DIO | BUSY),
            RQM,
            "{:?}: MSR {msr:#x} after the result phase",
            self.vmm
        );
        r
    }

    /// fdc-test.c's `ack_irq`: SENSE INTERRUPT STATUS while IRQ 6 is raised, which lowers
    /// it; returns (ST0, present cylinder).
    fn ack_irq(&mut self) -> (u8, u8) {
        self.expect_irq(true, "before SENSE INTERRUPT STATUS");
        self.send(CMD_SENSE_INT);
        let st0 = self.recv();
        let pcn = self.recv();
        self.expect_irq(false, "after SENSE INTERRUPT STATUS");
        (st0, pcn)
    }

    /// SEEK drive 0, head `head`, to `cyl`, acknowledged.
    fn seek(&mut self, head: u8, cyl: u8) -> (u8, u8) {
        self.send(CMD_SEEK);
        self.send(head << 2);
        self.expect_no_irq("before SEEK's last byte");
        self.send(cyl);
        self.ack_irq()
    }

    fn dir(&mut self) -> u8 {
        self.inb(DIR) & DSKCHG
    }

    fn cmos(&mut self, reg: u8) -> u8 {
        self.outb(0x70, reg);
        self.inb(0x71)
    }

    /// `n` bytes of fw_cfg item `key` through the selector (0x510) and data (0x511)
    /// ports. Not [`Qtest::fw_cfg_file`]: that one wants every reply to be the `OK`, but
    /// with interception on, QEMU's TCG PIT raises IRQ 0 whenever it likes, and its `IRQ`
    /// lines come before a reply; [`Vm::cmd`] takes them.
    fn fw_cfg_read(&mut self, key: u16, n: usize) -> Vec<u8> {
        self.cmd(&format!("outw 0x510 {key:#x}"));
        (0..n).map(|_| self.inb(0x511)).collect()
    }

    /// fw_cfg file `name`, found in the file directory (item 0x19) as firmware does.
    fn fw_cfg_file(&mut self, name: &str) -> Option<Vec<u8>> {
        test_support::fuzz_qtest::fw_cfg_file_with(name, |key, n| self.fw_cfg_read(key, n))
    }

    fn qmp(&mut self, name: &str, args: Value) -> Value {
        self.qmp.execute(name, args)
    }

    fn qmp_ok(&mut self, name: &str, args: Value) {
        let r = self.qmp(name, args.clone());
        assert_eq!(r, json!({"return": {}}), "{:?}: {name} {args}", self.vmm);
    }

    /// `blockdev-change-medium` of floppy0 to `file` (raw).
    fn insert(&mut self, file: &str) {
        self.qmp_ok(
            "blockdev-change-medium",
            json!({"device": "floppy0", "filename": file, "format": "raw"}),
        );
    }

    fn eject(&mut self) {
        self.qmp_ok("eject", json!({"device": "floppy0"}));
    }

    /// Programs DMA channel 2 for `len` bytes at `addr` (below 16 MiB) in `mode`, and
    /// unmasks it.
    fn dma_program(&mut self, mode: u8, addr: u32, len: u16) {
        self.outb(DMA_MASK1, 0x04 | 2);
        self.outb(DMA_FLIPFLOP, 0);
        self.outb(DMA_MODE, mode);
        self.outb(DMA_ADDR2, addr as u8);
        self.outb(DMA_ADDR2, (addr >> 8) as u8);
        self.outb(DMA_PAGE2, (addr >> 16) as u8);
        self.outb(DMA_FLIPFLOP, 0);
        let count = len - 1;
        self.outb(DMA_COUNT2, count as u8);
        self.outb(DMA_COUNT2, (count >> 8) as u8);
        self.outb(DMA_MASK1, 2);
    }

    /// A 16-bit channel 2 register, low byte first.
    fn dma_word(&mut self, port: u16) -> u16 {
        self.outb(DMA_FLIPFLOP, 0);
        let lo = self.inb(port) as u16;
        let hi = self.inb(port) as u16;
        hi << 8 | lo
    }

    /// Waits for the end of a DMA command: IRQ 6 and the result phase.
    fn wait_result_phase(&mut self, what: &str) {
        self.expect_irq(true, what);
        let msr = self.inb(MSR);
        assert_eq!(msr, RQM | DIO | BUSY, "{:?}: MSR {msr:#x} {what}", self.vmm);
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// Runs `scenario` on `vmm` under a deadline; QEMU's run skips where QEMU is missing.
fn run(vmm: Vmm, name: &'static str, scenario: fn(Vmm)) {
    if vmm == Vmm::Qemu && !qemu_installed() {
        return;
    }
    test_support::qtest::with_deadline(&format!("fdc::{name}::{}", vmm.tag()), move || {
        scenario(vmm)
    });
}

/// Each scenario as two tests, `NAME::qemu` (the reference) and `NAME::qomvm`.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn qemu() {
                super::run(super::Vmm::Qemu, stringify!($name), super::$name);
            }
            #[test]
            fn qomvm() {
                super::run(super::Vmm::Qomvm, stringify!($name), super::$name);
            }
        }
    )*};
}

scenarios!(
    cmos,
    no_media_on_start,
    read_without_media,
    media_change,
    sense_interrupt,
    relative_seek,
    read_id,
    read_id_without_media,
    read_no_dma_1,
    read_no_dma_18,
    read_no_dma_19,
    verify,
    media_insert,
    controller_reset,
    fuzz_registers,
    cve_reproducers,
    dma_read,
    dma_write,
    write_protected,
    drive_types,
    query_block,
    boot_index,
    migration,
    dma_registers,
    refusals,
    generic_refusals,
);

/// The two i8257s' registers as a driver sees them: page registers (the pc has no high
/// page registers at 0x480: QEMU's pc_basic_device_init asks i8257_dma_init for none),
/// address and count read back through the flip-flop (the 16-bit controller's in
/// words), the mask register (read at base+9, as i8257_read_cont does), master reset,
/// software requests, and a status register whose terminal-count bits clear on reading.
fn dma_registers(vmm: Vmm) {
    let mut vm = Vm::start(vmm, "dma-regs", &[], &["-nodefaults"]);
    // Page registers: channels 2, 3, 1, 0 at 0x81-0x83 and 0x87; 5, 6, 7, 4 (the second
    // controller's 1, 2, 3, 0) at 0x89-0x8b and 0x8f.
    let pages = [0x81u16, 0x82, 0x83, 0x87, 0x89, 0x8a, 0x8b, 0x8f];
    for (i, &port) in pages.iter().enumerate() {
        vm.outb(port, 0x10 + i as u8);
    }
    for (i, &port) in pages.iter().enumerate() {
        assert_eq!(
            vm.inb(port),
            0x10 + i as u8,
            "{vmm:?}: page register {port:#x}"
        );
    }
    for port in [0x84u16, 0x85, 0x86, 0x8c, 0x8d, 0x8e, 0x481, 0x482, 0x489] {
        vm.outb(port, 0x5a);
        assert_eq!(
            vm.inb(port),
            0xff,
            "{vmm:?}: port {port:#x} is no DMA register"
        );
    }
    // After a master clear every channel is masked.
    vm.outb(0x0d, 0);
    vm.outb(0xda, 0);
    assert_eq!(
        vm.inb(DMA_REQUEST),
        0xff,
        "{vmm:?}: first controller's mask"
    );
    assert_eq!(vm.inb(0xd2), 0xff, "{vmm:?}: second controller's mask");
    // Single mask bits, then all at once.
    vm.outb(DMA_MASK1, 0x01);
    vm.outb(DMA_MASK1, 0x03);
    assert_eq!(vm.inb(DMA_REQUEST), 0xf5);
    vm.outb(0x0f, 0x0a);
    assert_eq!(vm.inb(DMA_REQUEST), 0x0a);
    vm.outb(0x0e, 0);
    assert_eq!(vm.inb(DMA_REQUEST), 0x00);
    vm.outb(0xdc, 0);
    assert_eq!(vm.inb(0xd2), 0x00);
    // Channel 1's address and count read back as written, low byte first.
    vm.outb(DMA_FLIPFLOP, 0);
    vm.outb(0x02, 0x34);
    vm.outb(0x02, 0x12);
    vm.outb(0x03, 0xff);
    vm.outb(0x03, 0x01);
    vm.outb(DMA_FLIPFLOP, 0);
    assert_eq!((vm.inb(0x02), vm.inb(0x02)), (0x34, 0x12));
    assert_eq!((vm.inb(0x03), vm.inb(0x03)), (0xff, 0x01));
    // The flip-flop carries on from where the last access left it.
    vm.outb(DMA_FLIPFLOP, 0);
    vm.inb(0x02);
    assert_eq!(vm.inb(0x03), 0x01, "{vmm:?}: the flip-flop's second access");
    // The 16-bit controller: channel 5's registers at 0xc4/0xc6, in words.
    vm.outb(0xd8, 0);
    vm.outb(0xc4, 0x78);
    vm.outb(0xc4, 0x56);
    vm.outb(0xc6, 0x00);
    vm.outb(0xc6, 0x10);
    vm.outb(0xd8, 0);
    assert_eq!((vm.inb(0xc4), vm.inb(0xc4)), (0x78, 0x56));
    assert_eq!((vm.inb(0xc6), vm.inb(0xc6)), (0x00, 0x10));
    // A software request on channel 3 (no device) shows in the status register until
    // withdrawn; nothing reaches terminal count.
    vm.outb(0x09, 0x04 | 3);
    assert_eq!(
        vm.inb(DMA_STATUS),
        0x80,
        "{vmm:?}: status with channel 3 requesting"
    );
    vm.outb(0x09, 3);
    assert_eq!(vm.inb(DMA_STATUS), 0x00);
    // Unsupported command bits (memory to memory) are refused: nothing changes.
    vm.outb(0x08, 0x01);
    assert_eq!(vm.inb(DMA_STATUS), 0x00);
    vm.qt.check_alive();
}

/// The controller's and channel 2's state moves with a migration: a pending seek
/// interrupt, the heads' cylinders, the disk-change line (QEMU's fdrive/media_changed
/// subsection), the DMA channel's registers; the destination reads on.
fn migration(vmm: Vmm) {
    let files = [("fd.img", image(SECTORS_144))];
    let fda = ["-drive", "if=floppy,file=fd.img,format=raw"];
    let mut src = Vm::start(vmm, "mig-src", &files, &fda);
    src.seek(1, 9);
    assert_eq!(src.dir(), 0);
    // SPECIFY: timers 0xa and 0x3, DMA kept on (DUMPREG: 0x0a, 0x3 << 1 | 1).
    src.command(&[CMD_SPECIFY, 0xa0, 0x06]);
    src.send(CMD_SEEK);
    src.send(1 << 2);
    src.send(12);
    src.expect_irq(true, "after SEEK");
    src.dma_program(DMA_MODE_TO_MEMORY, DMA_BUF, 512);
    let mut dst = migrate(vmm, src, "mig-dst", &fda);
    // The seek's interrupt is still pending (the line's level itself is the interrupt
    // controller's state, which no IRQ message reports after a load).
    dst.send(CMD_SENSE_INT);
    assert_eq!(dst.recv(), 0x20, "{vmm:?}: ST0 of the pending seek");
    assert_eq!(dst.recv(), 12, "{vmm:?}: the seek's cylinder");
    dst.send(CMD_SENSE_INT);
    assert_eq!(dst.recv(), 0x80, "{vmm:?}: nothing else pending");
    assert_eq!(dst.dir(), 0, "{vmm:?}: the disk-change line");
    dst.send(CMD_DUMPREG);
    let regs: Vec<u8> = (0..10).map(|_| dst.recv()).collect();
    assert_eq!(regs[..6], [12, 0, 0, 0, 0x0a, 0x07], "{vmm:?}: DUMPREG");
    // Channel 2 as programmed.
    assert_eq!(dst.dma_word(DMA_ADDR2), DMA_BUF as u16);
    assert_eq!(dst.dma_word(DMA_COUNT2), 511);
    assert_eq!(dst.inb(DMA_PAGE2), (DMA_BUF >> 16) as u8);
    // READ ID finds head 1 on cylinder 12.
    let r = read_id_cmd(&mut dst, 1);
    assert_eq!((r[0], r[3], r[4]), (0x04, 12, 1), "{vmm:?}: {r:x?}");
    // And a DMA read through the migrated channel.
    dst.command(&[CMD_READ, 0x04, 12, 1, 7, 2, 7, 0x1b, 0xff]);
    dst.wait_result_phase("after READ on the destination");
    dst.result7();
    assert!(dst.read_mem(DMA_BUF as u64, 512) == sector(lba(12, 1, 7)));
    assert_eq!(dst.inb(DMA_STATUS), 0x04);
}

/// Migrates `src` (its image `fd.img`, `fda` its drive options) to a new VM `name`, once
/// the destination runs.
fn migrate(vmm: Vmm, mut src: Vm, name: &str, fda: &[&str]) -> Vm {
    let state = src.path("fdc.state");
    let uri = match vmm {
        // QEMU 7.2 has no file: migration.
        Vmm::Qemu => format!("exec:cat > {}", state.display()),
        Vmm::Qomvm => format!("file:{}", state.display()),
    };
    src.qmp_ok("migrate", json!({"uri": uri}));
    let info = src.qmp.wait_migration(Duration::from_secs(30));
    assert_eq!(info["return"]["status"], "completed", "{vmm:?}: {info}");
    let image_now = std::fs::read(src.path("fd.img")).unwrap();
    let incoming = match vmm {
        Vmm::Qemu => format!("exec:cat {}", state.display()),
        Vmm::Qomvm => format!("file:{}", state.display()),
    };
    let mut dst = Vm::start(
        vmm,
        name,
        &[("fd.img", image_now)],
        &[fda, &["-incoming", &incoming]].concat(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while dst.qmp("query-status", json!({}))["return"]["status"] != "running" {
        assert!(
            Instant::now() < deadline,
            "{vmm:?}: the destination never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    dst
}

/// A DMA read that waits on a masked channel when the VM migrates goes on at the
/// destination: the request (the status register's DREQ bit) moves with the DMA
/// controller, the command's phase with the floppy controller, and unmasking the
/// channel there moves the sectors. qomvm only: QEMU 7.2's "dma" section has no status
/// register, so its destination forgets the request and the command waits for ever.
#[test]
fn a_dma_read_pending_at_migration_completes_on_the_destination() {
    run(
        Vmm::Qomvm,
        "migration_with_dma_pending",
        migration_with_dma_pending,
    );
}

fn migration_with_dma_pending(vmm: Vmm) {
    let files = [("fd.img", image(SECTORS_144))];
    let fda = ["-drive", "if=floppy,file=fd.img,format=raw"];
    let mut src = Vm::start(vmm, "migdma-src", &files, &fda);
    src.seek(0, 3);
    src.dma_program(DMA_MODE_TO_MEMORY, DMA_BUF, 1024);
    src.outb(DMA_MASK1, 0x04 | 2);
    src.command(&[CMD_READ, 0x00, 3, 0, 4, 2, 5, 0x1b, 0xff]);
    // Waiting for the channel: no RQM, channel 2's request bit up.
    assert_eq!(src.inb(MSR) & RQM, 0, "{vmm:?}: RQM during the DMA command");
    assert_eq!(
        src.inb(DMA_STATUS),
        0x40,
        "{vmm:?}: DMA status before the migration"
    );
    src.expect_no_irq("with the channel masked");
    let mut dst = migrate(vmm, src, "migdma-dst", &fda);
    dst.write_mem(DMA_BUF as u64, &[0xee; 1024]);
    assert_eq!(dst.inb(MSR) & RQM, 0, "{vmm:?}: RQM on the destination");
    assert_eq!(
        dst.inb(DMA_STATUS),
        0x40,
        "{vmm:?}: DMA status on the destination"
    );
    dst.outb(DMA_MASK1, 2);
    dst.wait_result_phase("after unmasking on the destination");
    let r = dst.result7();
    assert_eq!(r[0], 0x20, "{vmm:?}: ST0 of {r:x?} (EOT reached: seek end)");
    let want: Vec<u8> = [lba(3, 0, 4), lba(3, 0, 5)]
        .iter()
        .flat_map(|&l| sector(l))
        .collect();
    assert!(
        dst.read_mem(DMA_BUF as u64, 1024) == want,
        "{vmm:?}: the destination's buffer"
    );
    assert_eq!(dst.inb(DMA_STATUS), 0x04, "{vmm:?}: terminal count");
}

/// With no DMA channel (`isa-fdc.dma=-1`), a command issued with DMA on (the reset's
/// DOR) moves its data through the FIFO instead of waiting for a channel that cannot
/// come. qomvm only: QEMU 7.2 dereferences the missing channel there.
#[test]
fn without_a_dma_channel_a_dma_read_goes_through_the_fifo() {
    run(Vmm::Qomvm, "no_dma_channel", |vmm| {
        let mut vm = Vm::start(
            vmm,
            "no-dma-chan",
            &[("fd.img", image(SECTORS_144))],
            &[
                "-drive",
                "if=floppy,file=fd.img,format=raw",
                "-global",
                "isa-fdc.dma=4294967295",
            ],
        );
        // The reset leaves DMA off without a channel; SPECIFY turns it on (ND clear).
        assert_eq!(vm.inb(DOR) & 0x08, 0, "DMA after reset");
        vm.command(&[CMD_SPECIFY, 0xa0, 0x06]);
        assert_eq!(vm.inb(DOR) & 0x08, 0x08, "DMA after SPECIFY");
        vm.seek(0, 1);
        vm.command(&[CMD_READ, 0x00, 1, 0, 2, 2, 2, 0x1b, 0xff]);
        let msr = vm.inb(MSR);
        assert_eq!(msr, BUSY | NONDMA | DIO | RQM, "MSR {msr:#x}");
        let data: Vec<u8> = (0..SECTOR).map(|_| vm.inb(FIFO)).collect();
        assert!(
            data == sector(lba(1, 0, 2)),
            "the sector read through the FIFO"
        );
        let r = vm.result7();
        assert_eq!(r[0] & 0xc0, 0, "ST0 of {r:x?}");
    });
}

/// bootindexA/bootindexB put the drives in fw_cfg's `bootorder` by their firmware path.
fn boot_index(vmm: Vmm) {
    let mut vm = Vm::start(
        vmm,
        "bootindex",
        &[("a.img", image(SECTORS_144)), ("b.img", image(SECTORS_144))],
        &[
            "-drive",
            "if=floppy,file=a.img,format=raw",
            "-drive",
            "if=floppy,file=b.img,format=raw",
            "-global",
            "isa-fdc.bootindexA=2",
            "-global",
            "isa-fdc.bootindexB=1",
        ],
    );
    let order = vm.fw_cfg_file("bootorder").unwrap_or_default();
    let order = String::from_utf8_lossy(&order).into_owned();
    assert_eq!(
        order, "/pci@i0cf8/isa@1/fdc@03f0/floppy@1\n/pci@i0cf8/isa@1/fdc@03f0/floppy@0\0",
        "{vmm:?}"
    );
}

/// An empty floppy0 of its own (the default pc has one too, which `no_media_on_start`
/// and `cmos` check; here the scenarios do not depend on it).
const EMPTY_DRIVE: [&str; 2] = ["-drive", "if=floppy"];

/// A pc with a 1.44 MB image of [`sector`]s as `-fda`.
fn with_fda(vmm: Vmm, name: &str) -> Vm {
    Vm::start(
        vmm,
        name,
        &[("fd.img", image(SECTORS_144))],
        &["-drive", "if=floppy,file=fd.img,format=raw"],
    )
}

/// fdc-test.c's `cmos`: the drive types in CMOS 0x10 (QEMU's pc_cmos_init_floppy), with
/// the equipment byte's floppy bits (0x14: bit 0 a drive, bits 6-7 the count less one).
fn cmos(vmm: Vmm) {
    // The default empty floppy0 (no -nodefaults) falls back to a 2.88 MB drive.
    let mut vm = Vm::start(vmm, "cmos-default", &[], &[]);
    assert_eq!(vm.cmos(0x10), 0x50, "{vmm:?}: an empty default drive");
    assert_eq!(vm.cmos(0x14) & 0xc1, 0x01);
    drop(vm);
    let mut vm = with_fda(vmm, "cmos-fda");
    assert_eq!(vm.cmos(0x10), 0x40, "{vmm:?}: -fda of 1.44 MB");
    assert_eq!(vm.cmos(0x14) & 0xc1, 0x01);
    drop(vm);
    let img = image(SECTORS_144);
    let mut vm = Vm::start(
        vmm,
        "cmos-two",
        &[
            ("a.img", img.clone()),
            ("b.img", img[..1_474_560 / 2].to_vec()),
        ],
        &["-fda", "a.img", "-fdb", "b.img"],
    );
    // B: holds 720 kB, which a 1.44 MB drive reads first.
    assert_eq!(vm.cmos(0x10), 0x44, "{vmm:?}: -fda and -fdb");
    assert_eq!(vm.cmos(0x14) & 0xc1, 0x41);
    drop(vm);
    let mut vm = Vm::start(vmm, "cmos-none", &[], &["-nodefaults"]);
    assert_eq!(vm.cmos(0x10), 0x00, "{vmm:?}: -nodefaults");
    assert_eq!(vm.cmos(0x14) & 0xc1, 0x00);
    // The controller is there all the same.
    assert_eq!(vm.inb(MSR), RQM);
}

/// fdc-test.c's `no_media_on_start`: an empty drive's disk-change line stays set, even
/// across a step.
fn no_media_on_start(vmm: Vmm) {
    // The default pc's empty drive (vl.c's default_drive(default_floppy, ...)), as
    // fdc-test.c starts QEMU, and an explicit one.
    for (name, args) in [("no-media", &[][..]), ("no-media-drive", &EMPTY_DRIVE[..])] {
        let mut vm = Vm::start(vmm, name, &[], args);
        let r = vm.qmp("query-block", json!({}));
        let floppy0 = r["return"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["device"] == "floppy0")
            .cloned();
        let floppy0 = floppy0.unwrap_or_else(|| panic!("{vmm:?} {args:?}: no floppy0 in {r}"));
        assert!(floppy0.get("inserted").is_none(), "{vmm:?}: {floppy0}");
        assert_eq!(vm.dir(), DSKCHG);
        assert_eq!(vm.dir(), DSKCHG);
        // An empty drive seeks (fd_empty_seek_hack: 255 tracks).
        assert_eq!(vm.seek(0, 1), (0x20, 1), "{vmm:?} {args:?}");
        assert_eq!(vm.dir(), DSKCHG);
        assert_eq!(vm.dir(), DSKCHG);
    }
}

/// Sends fdc-test.c's 9-byte read-style command (drive 0, C0 H0 R1 N2, EOT 1) and returns
/// the MSR it settles on.
fn send_read_command(vm: &mut Vm, cmd: u8) {
    vm.send(cmd);
    vm.send(0);
    vm.expect_no_irq("after the drive byte");
    vm.command(&[0, 0, 1, 2, 1, 0x1b, 0xff]);
}

/// fdc-test.c's `read_without_media`: READ on an empty drive ends at once, abnormally.
fn read_without_media(vmm: Vmm) {
    let mut vm = Vm::start(vmm, "read-no-media", &[], &EMPTY_DRIVE);
    send_read_command(&mut vm, CMD_READ_MT);
    vm.wait_result_phase("after READ on an empty drive");
    let r = vm.result7();
    assert_eq!(r[0], 0x40, "{vmm:?}: ST0 of {r:x?}");
}

/// fdc-test.c's `media_insert` (a fresh machine): a medium put in keeps the disk-change
/// line set until a step to another track.
fn media_insert(vmm: Vmm) {
    let mut vm = Vm::start(
        vmm,
        "insert",
        &[("fd.img", image(SECTORS_144))],
        &EMPTY_DRIVE,
    );
    check_insert(&mut vm);
}

fn check_insert(vm: &mut Vm) {
    vm.insert("fd.img");
    assert_eq!(vm.dir(), DSKCHG);
    assert_eq!(vm.dir(), DSKCHG);
    vm.seek(0, 0);
    assert_eq!(vm.dir(), DSKCHG, "{:?}: a seek to the same track", vm.vmm);
    assert_eq!(vm.dir(), DSKCHG);
    vm.seek(0, 1);
    assert_eq!(vm.dir(), 0, "{:?}: a step with a medium in", vm.vmm);
    assert_eq!(vm.dir(), 0);
}

/// fdc-test.c's `media_change`: after an eject the line is set and no step clears it.
fn media_change(vmm: Vmm) {
    let mut vm = Vm::start(
        vmm,
        "change",
        &[("fd.img", image(SECTORS_144))],
        &EMPTY_DRIVE,
    );
    check_insert(&mut vm);
    vm.eject();
    assert_eq!(vm.dir(), DSKCHG);
    assert_eq!(vm.dir(), DSKCHG);
    vm.seek(0, 0);
    assert_eq!(vm.dir(), DSKCHG);
    vm.seek(0, 1);
    assert_eq!(vm.dir(), DSKCHG);
    assert_eq!(vm.dir(), DSKCHG);
    // The medium goes back in with the HMP-style `change`, through the QMP passthrough.
    let r = vm.qmp(
        "human-monitor-command",
        json!({"command-line": "change floppy0 fd.img raw"}),
    );
    assert_eq!(r, json!({"return": ""}), "{vmm:?}: HMP change");
    assert_eq!(vm.dir(), DSKCHG);
    vm.seek(0, 3);
    assert_eq!(vm.dir(), 0);
}

/// fdc-test.c's `sense_interrupt`: with nothing pending SENSE INTERRUPT STATUS is an
/// invalid command (one byte, 0x80); after a SEEK it reports seek end (0x20) and the
/// cylinder.
fn sense_interrupt(vmm: Vmm) {
    let mut vm = Vm::start(vmm, "sense-int", &[], &EMPTY_DRIVE);
    vm.send(CMD_SENSE_INT);
    assert_eq!(vm.recv(), 0x80);
    assert_eq!(vm.inb(MSR), RQM, "{vmm:?}: one result byte only");
    vm.send(CMD_SEEK);
    vm.send(0);
    vm.expect_no_irq("before SEEK's last byte");
    vm.send(0);
    vm.expect_irq(true, "after SEEK");
    vm.send(CMD_SENSE_INT);
    assert_eq!(vm.recv(), 0x20);
    assert_eq!(vm.recv(), 0);
    vm.expect_irq(false, "after SENSE INTERRUPT STATUS");
    // Drive 1 (none on this machine) and head 1 in the seek: ST0 names the drive, not
    // the head, and a missing drive's head stays at cylinder 0 (fd_seek: track past
    // max_track, 0 without a drive).
    vm.send(CMD_SEEK);
    vm.send(1 << 2 | 1);
    vm.send(5);
    let (st0, pcn) = vm.ack_irq();
    assert_eq!((st0, pcn), (0x21, 0), "{vmm:?}: SEEK of drive 1");
}

/// fdc-test.c's `relative_seek`.
fn relative_seek(vmm: Vmm) {
    let mut vm = Vm::start(vmm, "rel-seek", &[], &EMPTY_DRIVE);
    vm.seek(0, 0);
    vm.send(CMD_RELATIVE_SEEK_IN);
    vm.send(0);
    vm.expect_no_irq("before the last byte");
    vm.send(1);
    assert_eq!(vm.ack_irq(), (0x20, 1));
    vm.send(CMD_RELATIVE_SEEK_OUT);
    vm.send(0);
    vm.send(1);
    assert_eq!(vm.ack_irq(), (0x20, 0));
    // Out past track 0 stops at 0.
    vm.seek(0, 3);
    vm.send(CMD_RELATIVE_SEEK_OUT);
    vm.send(0);
    vm.send(10);
    assert_eq!(vm.ack_irq().1, 0);
}

/// READ ID on drive 0, head `head`: waits for the result (QEMU answers after 20 ms of
/// virtual time) and returns the 7 bytes.
fn read_id_cmd(vm: &mut Vm, head: u8) -> [u8; 7] {
    vm.send(CMD_READ_ID);
    vm.expect_no_irq("after READ ID's command byte");
    vm.send(head << 2);
    let msr = vm.inb(MSR);
    if !vm.irq_now() {
        assert_eq!(msr & (BUSY | RQM), BUSY, "{:?}: MSR {msr:#x}", vm.vmm);
    }
    vm.wait_result_phase("after READ ID");
    vm.result7()
}

/// fdc-test.c's `read_id`: READ ID reports the head's cylinder and head.
fn read_id(vmm: Vmm) {
    let mut vm = with_fda(vmm, "read-id");
    vm.seek(0, 0);
    let r = read_id_cmd(&mut vm, 0);
    assert_eq!((r[0], r[3], r[4], r[6]), (0, 0, 0, 2), "{vmm:?}: {r:x?}");
    vm.seek(1, 8);
    let r = read_id_cmd(&mut vm, 1);
    assert_eq!((r[0], r[3], r[4], r[6]), (0x04, 8, 1, 2), "{vmm:?}: {r:x?}");
    // The sector number turns as the diskette does: 1..=18.
    assert!((1..=18).contains(&r[5]), "{vmm:?}: sector {}", r[5]);
}

/// READ ID on an empty drive. QEMU 7.2 answers it as if a diskette spun (ST0 0, no
/// missing address mark): fdctrl_result_timer only compares the data rate (both 500
/// kbit/s on an empty drive). Later QEMUs fail it (fdc-test.c's `read_id_no_media`).
fn read_id_without_media(vmm: Vmm) {
    let mut vm = Vm::start(vmm, "read-id-empty", &[], &EMPTY_DRIVE);
    let r = read_id_cmd(&mut vm, 0);
    assert_eq!((r[0], r[1], r[2]), (0, 0, 0), "{vmm:?}: {r:x?}");
}

/// fdc-test.c's `read_no_dma_N`: READ with MT (both sides) of sectors 1..=`eot` at C0 with
/// DMA off in the DOR, byte by byte through the FIFO; returns ST0, having checked the bytes
/// against the image and the interrupt at the end of the execution phase.
fn read_no_dma(vmm: Vmm, name: &str, eot: u8, expected_st0: u8, sectors: &[usize]) {
    let mut vm = with_fda(vmm, name);
    let dor = vm.inb(DOR);
    vm.outb(DOR, dor & !0x08);
    vm.seek(0, 0);
    vm.send(CMD_READ_MT);
    vm.send(0);
    vm.expect_no_irq("after the drive byte");
    vm.command(&[0, 0, 1, 2, eot, 0x1b, 0xff]);
    let msr = vm.inb(MSR);
    assert_eq!(msr, BUSY | NONDMA | DIO | RQM, "{vmm:?}: MSR {msr:#x}");
    // Non-DMA mode raises the interrupt when the data is ready.
    assert!(vm.irq_now(), "{vmm:?}: no IRQ for the data");
    let len = SECTOR * 2 * eot as usize;
    let mut data = Vec::with_capacity(len);
    for _ in 0..len {
        let msr = vm.inb(MSR);
        assert_eq!(
            msr & (BUSY | RQM | DIO),
            BUSY | RQM | DIO,
            "{vmm:?}: MSR {msr:#x}"
        );
        data.push(vm.inb(FIFO));
    }
    let want: Vec<u8> = sectors.iter().flat_map(|&l| sector(l)).collect();
    assert_eq!(data.len(), want.len());
    for (i, (got, want)) in data.chunks(SECTOR).zip(want.chunks(SECTOR)).enumerate() {
        assert!(
            got == want,
            "{vmm:?}: sector {i} of the read is LBA {}, not LBA {}",
            got[0] as usize | (got[1] as usize) << 8,
            want[0] as usize | (want[1] as usize) << 8
        );
    }
    let msr = vm.inb(MSR);
    assert_eq!(msr & (BUSY | RQM | DIO), BUSY | RQM | DIO);
    assert!(vm.irq_now(), "{vmm:?}: no IRQ for the result");
    let r = vm.result7();
    assert_eq!(r[0], expected_st0, "{vmm:?}: ST0 of {r:x?}");
}

fn read_no_dma_1(vmm: Vmm) {
    // With MT, EOT 1: sector 1 of side 0, then sector 1 of side 1; ends on head 1.
    read_no_dma(vmm, "nodma-1", 1, 0x04, &[lba(0, 0, 1), lba(0, 1, 1)]);
}

fn read_no_dma_18(vmm: Vmm) {
    let sectors: Vec<usize> = (0..36).collect();
    read_no_dma(vmm, "nodma-18", 18, 0x04, &sectors);
}

fn read_no_dma_19(vmm: Vmm) {
    // EOT past the track's 18 sectors: both sides of C0, then on to C1 (seek end, 0x20).
    let sectors: Vec<usize> = (0..38).collect();
    read_no_dma(vmm, "nodma-19", 19, 0x20, &sectors);
}

/// fdc-test.c's `verify` (an empty drive: abnormal end), and VERIFY of a diskette, which
/// needs no DMA channel set up.
fn verify(vmm: Vmm) {
    let mut vm = Vm::start(vmm, "verify-empty", &[], &EMPTY_DRIVE);
    send_read_command(&mut vm, CMD_VERIFY);
    vm.wait_result_phase("after VERIFY");
    let r = vm.result7();
    assert_eq!(r[0], 0x40, "{vmm:?}: {r:x?}");
    drop(vm);
    let mut vm = with_fda(vmm, "verify");
    vm.seek(0, 0);
    send_read_command(&mut vm, CMD_VERIFY);
    vm.wait_result_phase("after VERIFY");
    let r = vm.result7();
    // Sector 1 is EOT: the controller moves on to C1 R1 (seek end).
    assert_eq!(r, [0x20, 0, 0, 1, 0, 1, 2], "{vmm:?}: {r:x?}");
    // Nothing moved on channel 2.
    assert_eq!(vm.inb(DMA_STATUS) & 0x04, 0);
}

/// A reset through the DOR raises the interrupt and leaves four SENSE INTERRUPT STATUS
/// answers (0xc0..0xc3, drive polling); VERSION, PART ID, DUMPREG, SENSE DRIVE STATUS and
/// SPECIFY as QEMU answers them; the DSR's software reset; the registers' reset values.
fn controller_reset(vmm: Vmm) {
    let mut vm = with_fda(vmm, "reset");
    // Reset values: DOR nRESET|DMAEN, SRB 0xc0, TDR 0, DIR set. Status register A is
    // not decoded on ISA (fdc-isa.c's fdc_portio_list starts at offset 1): 0x3f0 reads
    // as nothing.
    assert_eq!(vm.inb(DOR), 0x0c);
    assert_eq!(vm.inb(SRB), 0xc0);
    assert_eq!(vm.inb(SRA), 0xff);
    assert_eq!(vm.inb(TDR), 0);
    assert_eq!(vm.inb(MSR), RQM);
    assert_eq!(vm.dir(), DSKCHG);
    vm.outb(DOR, 0x08);
    vm.expect_no_irq("in reset");
    vm.outb(DOR, 0x1c);
    vm.expect_irq(true, "after leaving reset");
    // Leaving reset resets SRB after the DOR write set its motor bit (fdctrl_write_dor
    // then fdctrl_reset); the next DOR write sets it.
    assert_eq!(vm.inb(SRB), 0xc0, "{vmm:?}: SRB after reset");
    vm.outb(DOR, 0x1c);
    assert_eq!(vm.inb(SRB), 0xc1, "{vmm:?}: SRB with motor 0 on");
    for n in 0..4 {
        vm.send(CMD_SENSE_INT);
        assert_eq!(vm.recv(), 0xc0 + n, "{vmm:?}: SENSE INTERRUPT {n}");
        assert_eq!(vm.recv(), 0);
        vm.expect_irq(false, "after the first SENSE INTERRUPT");
    }
    vm.send(CMD_SENSE_INT);
    assert_eq!(vm.recv(), 0x80);
    vm.send(CMD_VERSION);
    assert_eq!(vm.recv(), 0x90);
    vm.send(CMD_PART_ID);
    assert_eq!(vm.recv(), 0x41);
    vm.seek(0, 7);
    vm.send(CMD_DUMPREG);
    let regs: Vec<u8> = (0..10).map(|_| vm.recv()).collect();
    // Cylinders of drives 0-1 (and 0, 0), the timers (0) with DMA on (bit 0), 18 sectors
    // (the 1.44 MB medium), no lock or perpendicular mode, EIS|EFIFO, precompensation 0.
    assert_eq!(regs, [7, 0, 0, 0, 0, 1, 18, 0, 0x60, 0], "{vmm:?}: DUMPREG");
    // SPECIFY: step rate 0xd, head unload 0xf; head load 1, non-DMA: DOR loses DMAEN.
    vm.command(&[CMD_SPECIFY, 0xdf, 0x03]);
    assert_eq!(vm.inb(MSR), RQM, "{vmm:?}: SPECIFY has no result");
    assert_eq!(vm.inb(DOR) & 0x08, 0);
    vm.send(CMD_DUMPREG);
    let regs: Vec<u8> = (0..10).map(|_| vm.recv()).collect();
    assert_eq!(regs[4..6], [0x0d, 0x02], "{vmm:?}: DUMPREG after SPECIFY");
    // SENSE DRIVE STATUS: head 1, drive 0, not track 0, writable: 0x28 | 0x04.
    vm.command(&[CMD_SENSE_DRIVE, 0x04]);
    assert_eq!(vm.recv(), 0x2c);
    vm.seek(0, 0);
    vm.command(&[CMD_SENSE_DRIVE, 0x00]);
    assert_eq!(vm.recv(), 0x38);
    // A software reset through the DSR: an interrupt, and DMA back on.
    vm.outb(DSR, 0x80);
    vm.expect_irq(true, "after the DSR reset");
    assert_eq!(vm.inb(DOR), 0x0c, "{vmm:?}: DOR after the DSR reset");
    assert_eq!(vm.ack_irq().0, 0xc0);
    // The CCR's rate bits: 250 kbit/s does not read a 500 kbit/s diskette.
    vm.outb(CCR, 0x02);
    vm.dma_program(DMA_MODE_TO_MEMORY, 0x3_0000, 512);
    vm.command(&[CMD_READ, 0, 0, 0, 1, 2, 1, 0x1b, 0xff]);
    vm.wait_result_phase("after READ at the wrong rate");
    let r = vm.result7();
    assert_eq!((r[0], r[1]), (0x40, 0x01), "{vmm:?}: {r:x?}");
    vm.outb(CCR, 0x00);
}

/// fdc-test.c's `fuzz_registers`: random bytes to every port of the controller (and the
/// DMA controller's), each followed by a read; the machine keeps answering, and the
/// controller works after a reset.
fn fuzz_registers(vmm: Vmm) {
    let mut vm = with_fda(vmm, "fuzz");
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000 {
        let r = next();
        let value = (r >> 8) as u8;
        let port = if i < 2000 {
            FDC + (r % 8) as u16
        } else {
            // The DMA controller: channel 2's registers, the commands, page register 0x81.
            [
                0x04, 0x05, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x81,
            ][(r % 11) as usize]
        };
        // Keep the DMA channel's page below guest RAM's 64 MiB.
        let value = if port == DMA_PAGE2 {
            value & 0x3f
        } else {
            value
        };
        if port != 0x3f6 {
            vm.outb(port, value);
            vm.inb(port);
        }
    }
    vm.qt.check_alive();
    // Reset both controllers, then the FDC answers VERSION.
    vm.outb(0x0d, 0);
    vm.outb(DOR, 0x00);
    vm.outb(DOR, 0x0c);
    for _ in 0..4 {
        vm.send(CMD_SENSE_INT);
        vm.recv();
        vm.recv();
    }
    vm.send(CMD_VERSION);
    assert_eq!(vm.recv(), 0x90);
}

/// fdc-test.c's CVE-2021-20196 reproducer (a command for a drive that is not there) and
/// CVE-2021-3507's (a DMA transfer past the FIFO; fdc-test.c's image is snapshot=on, a
/// copy does as well here), word and dword writes split into byte ports as ISA does.
fn cve_reproducers(vmm: Vmm) {
    let mut vm = Vm::start(
        vmm,
        "cve-20196",
        &[],
        &["-nodefaults", "-drive", "if=floppy"],
    );
    for (op, port, value) in [
        ("outw", 0x3f4, 0x0500),
        ("outb", 0x3f5, 0x00),
        ("outb", 0x3f5, 0x00),
        ("outw", 0x3f4, 0x0000),
        ("outb", 0x3f5, 0x00),
        ("outw", 0x3f1, 0x0400),
        ("outw", 0x3f4, 0x0000),
        ("outw", 0x3f4, 0x0000),
        ("outb", 0x3f5, 0x00),
        ("outb", 0x3f5, 0x01),
        ("outw", 0x3f1, 0x0500),
        ("outb", 0x3f5, 0x00),
    ] {
        vm.cmd(&format!("{op} {port:#x} {value:#x}"));
    }
    vm.qt.check_alive();
    drop(vm);
    let mut vm = Vm::start(
        vmm,
        "cve-3507",
        &[("fd.img", image(SECTORS_144))],
        &["-nodefaults", "-drive", "if=floppy,file=fd.img,format=raw"],
    );
    vm.cmd("outl 0x9 0x0a0206");
    for value in [
        0x1600, 0x0000, 0x0000, 0x0000, 0x0200, 0x0200, 0x0000, 0x0000, 0x0000,
    ] {
        vm.cmd(&format!("outw 0x3f4 {value:#x}"));
    }
    vm.qt.check_alive();
    // snapshot=on: the image is as it was.
    let file = std::fs::read(vm.path("fd.img")).unwrap();
    assert!(
        file == image(SECTORS_144),
        "{vmm:?}: snapshot=on wrote the image"
    );
}

/// Where DMA buffers go: page 3, offset 0x0100.
const DMA_BUF: u32 = 0x3_0100;

/// READ DATA through DMA channel 2 into guest memory: the data, the interrupt, the result
/// bytes, and channel 2's registers after terminal count.
fn dma_read(vmm: Vmm) {
    let mut vm = with_fda(vmm, "dma-read");
    vm.write_mem(DMA_BUF as u64, &[0xee; 2048]);
    vm.seek(1, 2);
    vm.dma_program(DMA_MODE_TO_MEMORY, DMA_BUF, 1024);
    // Before the command: no terminal count, no request.
    assert_eq!(vm.inb(DMA_STATUS), 0);
    // C2 H1 R5, EOT 6: two sectors.
    vm.command(&[CMD_READ, 0x04, 2, 1, 5, 2, 6, 0x1b, 0xff]);
    vm.wait_result_phase("after READ through DMA");
    let got = vm.read_mem(DMA_BUF as u64, 1024);
    let want: Vec<u8> = [lba(2, 1, 5), lba(2, 1, 6)]
        .iter()
        .flat_map(|&l| sector(l))
        .collect();
    assert!(got == want, "{vmm:?}: the buffer holds {:x?}...", &got[..8]);
    assert_eq!(vm.read_mem(DMA_BUF as u64 + 1024, 16), [0xee; 16]);
    let r = vm.result7();
    // Sector 6 was EOT: the position moves on to C3 R1 (seek end), on head 1.
    assert_eq!(r, [0x24, 0, 0, 3, 1, 1, 2], "{vmm:?}: {r:x?}");
    // Channel 2 reached terminal count (status bit 2, its request gone), which reading
    // the status clears; the count register reads 0xffff, the address register where
    // the transfer stopped; i8257 reads the mask register at base+9.
    assert_eq!(vm.inb(DMA_STATUS), 0x04, "{vmm:?}: DMA status");
    assert_eq!(vm.inb(DMA_STATUS), 0x00, "{vmm:?}: DMA status read twice");
    assert_eq!(vm.dma_word(DMA_COUNT2), 0xffff, "{vmm:?}: DMA count");
    assert_eq!(
        vm.dma_word(DMA_ADDR2),
        (DMA_BUF as u16).wrapping_add(1024),
        "{vmm:?}: DMA address"
    );
    assert_eq!(vm.inb(DMA_PAGE2), 3);
    assert_eq!(vm.inb(DMA_REQUEST), 0xfb, "{vmm:?}: DMA mask");

    // A channel programmed for less than the command moves what it can: one sector of
    // two, and the controller ends the command there.
    vm.write_mem(DMA_BUF as u64, &[0xee; 1024]);
    vm.dma_program(DMA_MODE_TO_MEMORY, DMA_BUF, 512);
    vm.command(&[CMD_READ, 0x00, 0, 0, 1, 2, 2, 0x1b, 0xff]);
    vm.wait_result_phase("after a short DMA read");
    assert!(vm.read_mem(DMA_BUF as u64, 512) == sector(lba(0, 0, 1)));
    assert_eq!(vm.read_mem(DMA_BUF as u64 + 512, 16), [0xee; 16]);
    let r = vm.result7();
    assert_eq!(r, [0x20, 0, 0, 0, 0, 2, 2], "{vmm:?}: {r:x?}");
    assert_eq!(vm.inb(DMA_STATUS), 0x04);

    // A masked channel moves nothing until unmasked.
    vm.dma_program(DMA_MODE_TO_MEMORY, DMA_BUF, 512);
    vm.outb(DMA_MASK1, 0x04 | 2);
    vm.command(&[CMD_READ, 0x00, 0, 0, 3, 2, 3, 0x1b, 0xff]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.inb(MSR) & RQM, 0, "{vmm:?}: the command waits for DMA");
    assert!(!vm.irq_now());
    // The request shows in the status register.
    assert_eq!(vm.inb(DMA_STATUS), 0x40, "{vmm:?}: DMA status with DREQ");
    vm.outb(DMA_MASK1, 2);
    vm.wait_result_phase("after unmasking");
    assert!(vm.read_mem(DMA_BUF as u64, 512) == sector(lba(0, 0, 3)));
    let r = vm.result7();
    assert_eq!(r[..3], [0x20, 0, 0], "{vmm:?}: {r:x?}");
}

/// WRITE DATA through DMA channel 2 from guest memory: the image file has the bytes
/// afterwards, and they read back.
fn dma_write(vmm: Vmm) {
    let mut vm = with_fda(vmm, "dma-write");
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 7) as u8).collect();
    vm.write_mem(DMA_BUF as u64, &pattern);
    vm.seek(0, 5);
    vm.dma_program(DMA_MODE_FROM_MEMORY, DMA_BUF, 1024);
    // C5 H0 R17, EOT 18.
    vm.command(&[CMD_WRITE, 0x00, 5, 0, 17, 2, 18, 0x1b, 0xff]);
    vm.wait_result_phase("after WRITE through DMA");
    let r = vm.result7();
    assert_eq!(r, [0x20, 0, 0, 6, 0, 1, 2], "{vmm:?}: {r:x?}");
    assert_eq!(vm.inb(DMA_STATUS), 0x04);
    assert_eq!(vm.dma_word(DMA_COUNT2), 0xffff);
    let file = std::fs::read(vm.path("fd.img")).unwrap();
    let at = lba(5, 0, 17) * SECTOR;
    assert!(
        file[at..at + 1024] == pattern[..],
        "{vmm:?}: the image holds {:x?}...",
        &file[at..at + 8]
    );
    // The neighbours are untouched.
    assert!(file[at - SECTOR..at] == sector(lba(5, 0, 16)));
    assert!(file[at + 1024..at + 1024 + SECTOR] == sector(lba(5, 1, 1)));
    assert_eq!(file.len(), SECTORS_144 * SECTOR);
    // Read back through DMA.
    vm.write_mem(DMA_BUF as u64, &[0; 1024]);
    vm.dma_program(DMA_MODE_TO_MEMORY, DMA_BUF, 1024);
    vm.command(&[CMD_READ, 0x00, 5, 0, 17, 2, 18, 0x1b, 0xff]);
    vm.wait_result_phase("after reading back");
    vm.result7();
    assert!(vm.read_mem(DMA_BUF as u64, 1024) == pattern);
    // qemu-img agrees the image is still a raw 1.44 MB one.
    if let Ok(out) = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(vm.path("fd.img"))
        .output()
    {
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["virtual-size"], 1_474_560);
    }
}

/// A read-only diskette: WRITE ends with "not writable" and leaves the image alone;
/// SENSE DRIVE STATUS shows write protection.
fn write_protected(vmm: Vmm) {
    let mut vm = Vm::start(
        vmm,
        "ro",
        &[("fd.img", image(SECTORS_144))],
        &["-drive", "if=floppy,file=fd.img,format=raw,readonly=on"],
    );
    vm.command(&[CMD_SENSE_DRIVE, 0x00]);
    assert_eq!(vm.recv() & 0x40, 0x40, "{vmm:?}: write protect");
    vm.seek(0, 0);
    vm.write_mem(DMA_BUF as u64, &[0xab; 512]);
    vm.dma_program(DMA_MODE_FROM_MEMORY, DMA_BUF, 512);
    vm.command(&[CMD_WRITE, 0x00, 0, 0, 1, 2, 1, 0x1b, 0xff]);
    vm.wait_result_phase("after WRITE to a read-only diskette");
    let r = vm.result7();
    assert_eq!((r[0], r[1], r[2]), (0x60, 0x02, 0x00), "{vmm:?}: {r:x?}");
    let file = std::fs::read(vm.path("fd.img")).unwrap();
    assert!(file[..SECTOR] == sector(0));
}

/// The drive type (CMOS 0x10's high nibble) picked from the image's size, as fdc.c's
/// pick_geometry does for drive-type=auto, from `-device floppy,drive-type=`, and from
/// the controller's `fallback` for a size no format has.
fn drive_types(vmm: Vmm) {
    let cases: &[(usize, &[&str], u8)] = &[
        (2880, &[], 0x40), // 1.44 MB
        (5760, &[], 0x50), // 2.88 MB
        (2400, &[], 0x20), // 1.2 MB 5.25"
        (1440, &[], 0x40), // 720 kB: a 1.44 MB drive's format comes first
        (720, &[], 0x20),  // 360 kB 5.25"
        (3360, &[], 0x40), // 1.68 MB (DMF, 21 sectors)
        (200, &[], 0x50),  // no format: the fallback, 2.88 MB
        (200, &["fallback=144"], 0x40),
        (2880, &["drive-type=120"], 0x20),
        (2880, &["drive-type=288"], 0x50),
        (2880, &["drive-type=none"], 0x00),
    ];
    for (i, (sectors, opts, want)) in cases.iter().enumerate() {
        let mut args = vec![
            "-drive".to_string(),
            "if=none,id=fd,file=fd.img,format=raw".to_string(),
        ];
        let mut device = "floppy,unit=0,drive=fd".to_string();
        for opt in opts.iter() {
            if let Some(f) = opt.strip_prefix("fallback=") {
                args.extend(["-global".to_string(), format!("isa-fdc.fallback={f}")]);
            } else {
                device.push(',');
                device.push_str(opt);
            }
        }
        args.extend(["-device".to_string(), device]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut vm = Vm::start(
            vmm,
            &format!("types-{i}"),
            &[("fd.img", image(*sectors))],
            &[&["-nodefaults"], &args[..]].concat(),
        );
        assert_eq!(
            vm.cmos(0x10),
            *want,
            "{vmm:?}: {sectors} sectors with {opts:?}"
        );
    }
    // fdtypeA/fdtypeB are accepted but change nothing in QEMU 7.2: they typed the drives
    // of driveA/driveB (fdctrl_connect_drives), gone since QEMU 6.0; -drive if=floppy's
    // drives are drive-type=auto (fdctrl_init_drives).
    let mut vm = Vm::start(
        vmm,
        "types-fdtype",
        &[("fd.img", image(SECTORS_144))],
        &[
            "-drive",
            "if=floppy,file=fd.img,format=raw",
            "-global",
            "isa-fdc.fdtypeA=120",
        ],
    );
    assert_eq!(vm.cmos(0x10), 0x40, "{vmm:?}: fdtypeA=120");
    drop(vm);
    // A -global for isa-fdc (like a -device floppy) takes the default empty floppy0 away
    // (vl.c's default_list: "isa-fdc" and "floppy" clear default_floppy): no drive.
    let mut vm = Vm::start(
        vmm,
        "types-global",
        &[],
        &["-global", "isa-fdc.fallback=144"],
    );
    assert_eq!(vm.cmos(0x10), 0x00, "{vmm:?}: -global isa-fdc.fallback=144");
    let r = vm.qmp("query-block", json!({}));
    assert!(
        !r["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["device"] == "floppy0"),
        "{vmm:?}: {r}"
    );
    drop(vm);
    // An empty drive takes the fallback type.
    let mut vm = Vm::start(
        vmm,
        "types-fallback",
        &[],
        &["-global", "isa-fdc.fallback=144", "-device", "floppy"],
    );
    assert_eq!(vm.cmos(0x10), 0x40, "{vmm:?}: empty drive, fallback=144");
    // -fdb alone: the default empty floppy0 is drive A all the same (vl.c's
    // add_default_drive at index 0), a 2.88 MB drive by the fallback.
    drop(vm);
    // -drive if=floppy,index=1: drive B, with the default empty drive A.
    let mut vm = Vm::start(
        vmm,
        "types-index1",
        &[("fd.img", image(2400))],
        &["-drive", "if=floppy,index=1,file=fd.img,format=raw"],
    );
    assert_eq!(vm.cmos(0x10), 0x52, "{vmm:?}: index=1");
    drop(vm);
    // -device floppy,unit=1 alone: drive B only, one drive in the equipment byte.
    let mut vm = Vm::start(
        vmm,
        "types-unit1",
        &[("fd.img", image(SECTORS_144))],
        &[
            "-nodefaults",
            "-drive",
            "if=none,id=d,file=fd.img,format=raw",
            "-device",
            "floppy,unit=1,drive=d",
        ],
    );
    assert_eq!(vm.cmos(0x10), 0x04, "{vmm:?}: unit=1");
    assert_eq!(vm.cmos(0x14) & 0xc1, 0x01);
    drop(vm);
    let mut vm = Vm::start(
        vmm,
        "types-fdb",
        &[("fd.img", image(SECTORS_144))],
        &["-fdb", "fd.img"],
    );
    assert_eq!(vm.cmos(0x10), 0x54, "{vmm:?}: -fdb only");
    assert_eq!(vm.cmos(0x14) & 0xc1, 0x41);
}

/// `query-block`'s floppy0: removable, unlocked, no tray; the medium and its removal.
fn query_block(vmm: Vmm) {
    let mut vm = with_fda(vmm, "query-block");
    let floppy = |vm: &mut Vm| -> Value {
        let r = vm.qmp("query-block", json!({}));
        r["return"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["device"] == "floppy0")
            .cloned()
            .unwrap_or_else(|| panic!("{vmm:?}: no floppy0 in {r}"))
    };
    let b = floppy(&mut vm);
    assert_eq!(b["removable"], true, "{vmm:?}: {b}");
    assert_eq!(b["locked"], false, "{vmm:?}: {b}");
    assert!(
        b.get("tray_open").is_none(),
        "{vmm:?}: a floppy has no tray: {b}"
    );
    assert_eq!(b["inserted"]["ro"], false, "{vmm:?}: {b}");
    assert_eq!(b["inserted"]["drv"], "raw", "{vmm:?}: {b}");
    assert_eq!(b["inserted"]["file"], "fd.img", "{vmm:?}: {b}");
    assert_eq!(b["inserted"]["removable"], Value::Null);
    assert_eq!(
        b["inserted"]["image"]["virtual-size"], 1_474_560,
        "{vmm:?}: {b}"
    );
    let qdev = b["qdev"].as_str().unwrap_or_default();
    assert!(qdev.starts_with("/machine/"), "{vmm:?}: qdev {qdev:?}");
    let legacy_type = b["type"].clone();
    vm.eject();
    let b = floppy(&mut vm);
    assert!(b.get("inserted").is_none(), "{vmm:?}: after eject: {b}");
    assert_eq!(b["removable"], true);
    vm.insert("fd.img");
    let b = floppy(&mut vm);
    assert_eq!(b["inserted"]["file"], "fd.img", "{vmm:?}: {b}");
    // A floppy device of its own, with an id: the medium is reached through the id.
    drop(vm);
    let mut vm = Vm::start(
        vmm,
        "query-block-id",
        &[("fd.img", image(SECTORS_144))],
        &["-nodefaults", "-device", "floppy,id=fd0"],
    );
    let r = vm.qmp("query-block", json!({}));
    let list = r["return"].as_array().unwrap();
    let b = list
        .iter()
        .find(|b| b["qdev"] == "fd0")
        .unwrap_or_else(|| panic!("{vmm:?}: no fd0 in {r}"));
    assert_eq!(b["device"], "", "{vmm:?}: {b}");
    assert_eq!(b["removable"], true, "{vmm:?}: {b}");
    assert!(b.get("inserted").is_none(), "{vmm:?}: {b}");
    vm.qmp_ok(
        "blockdev-change-medium",
        json!({"id": "fd0", "filename": "fd.img", "format": "raw"}),
    );
    let r = vm.qmp("query-block", json!({}));
    let b = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == "fd0")
        .cloned()
        .unwrap();
    assert_eq!(b["inserted"]["file"], "fd.img", "{vmm:?}: {b}");
    // The medium reads.
    vm.seek(0, 1);
    assert_eq!(vm.dir(), 0);
    vm.dma_program(DMA_MODE_TO_MEMORY, DMA_BUF, 512);
    vm.command(&[CMD_READ, 0x00, 1, 0, 1, 2, 1, 0x1b, 0xff]);
    vm.wait_result_phase("after READ");
    vm.result7();
    assert!(vm.read_mem(DMA_BUF as u64, 512) == sector(lba(1, 0, 1)));
    // QEMU 7.2's BlockInfo still has the deprecated "type", always "unknown" (every
    // drive's, not only the floppy's).
    assert_eq!(legacy_type, "unknown", "{vmm:?}: query-block's \"type\"");
}

/// Runs `vmm` on `-M pc -display none -nodefaults -S ARGS` in `dir` (which it must
/// refuse): its stderr's last line, with the program's name as `PROG`.
fn refused(vmm: Vmm, dir: &Path, args: &[&str]) -> String {
    refused_lines(vmm, dir, args).0
}

/// [`refused`], and how many lines the error took on stderr.
fn refused_lines(vmm: Vmm, dir: &Path, args: &[&str]) -> (String, usize) {
    use std::io::Read as _;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(vmm.binary());
    cmd.args(["-M", "pc", "-display", "none", "-nodefaults", "-S"]);
    match vmm {
        Vmm::Qemu => cmd.args(["-accel", "tcg", "-bios", "halt.bin"]),
        Vmm::Qomvm => cmd.args(["-accel", "qtest"]),
    };
    let mut child = cmd
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{vmm:?} accepted {args:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = reader.join().unwrap();
    assert_eq!(status.code(), Some(1), "{vmm:?} {args:?}: {text}");
    let lines = text.trim_end().lines().count();
    let last = text
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let prog = match vmm {
        Vmm::Qemu => "qemu-system-x86_64: ",
        Vmm::Qomvm => "qomvm: ",
    };
    let last = match last.strip_prefix(prog) {
        Some(rest) => format!("PROG: {rest}"),
        None => last,
    };
    (last, lines)
}

/// Floppy configurations QEMU 7.2 refuses, with its one-line errors (blockdev.c's
/// drive_new and drive_check_orphaned, fdc.c's floppy_drive_realize and
/// fdctrl_realize_common, the qdev property setters).
fn refusals(vmm: Vmm) {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "-drive",
                "if=floppy,file=a.img,format=raw",
                "-drive",
                "if=floppy,file=b.img,format=raw,index=0",
            ],
            "PROG: -drive if=floppy,file=b.img,format=raw,index=0: drive with bus=0, unit=0 (index=0) exists",
        ),
        (
            &["-drive", "if=floppy,file=a.img,format=raw,index=2"],
            "PROG: -drive if=floppy,file=a.img,format=raw,index=2: machine type does not support if=floppy,bus=0,unit=2",
        ),
        (
            &[
                "-drive",
                "if=none,id=d,file=a.img,format=raw",
                "-device",
                "floppy,unit=2,drive=d",
            ],
            "PROG: -device floppy,unit=2,drive=d: Can't create floppy unit 2, bus supports only 2 units",
        ),
        (
            &[
                "-drive",
                "if=floppy,file=a.img,format=raw",
                "-drive",
                "if=none,id=d,file=b.img,format=raw",
                "-device",
                "floppy,unit=0,drive=d",
            ],
            "PROG: -device floppy,unit=0,drive=d: Floppy unit 0 is in use",
        ),
        (
            &["-device", "floppy,drive=nope"],
            "PROG: -device floppy,drive=nope: Property 'floppy.drive' can't find value 'nope'",
        ),
        (
            &["-device", "floppy,drive-type=bogus"],
            "PROG: -device floppy,drive-type=bogus: Parameter 'drive-type' does not accept value 'bogus'",
        ),
        (
            &[
                "-drive",
                "if=floppy,file=a.img,format=raw",
                "-device",
                "floppy,drive=floppy0",
            ],
            "PROG: -device floppy,drive=floppy0: Drive 'floppy0' is already in use because it has been automatically connected to another device (did you need 'if=none' in the drive options?)",
        ),
        (
            &["-global", "isa-fdc.fallback=auto", "-device", "floppy"],
            "PROG: Cannot choose a fallback FDrive type of 'auto'",
        ),
        (
            &[
                "-drive",
                "if=none,id=d,file=a.img,format=raw",
                "-device",
                "floppy,drive=d,logical_block_size=4096,physical_block_size=4096",
            ],
            "PROG: -device floppy,drive=d,logical_block_size=4096,physical_block_size=4096: Physical and logical block size must be 512 for floppy",
        ),
        (
            &["-fda", "nonexistent.img"],
            "PROG: -fda nonexistent.img: Could not open 'nonexistent.img': No such file or directory",
        ),
    ];
    check_refusals(vmm, "refusals", cases);
}

/// A fresh scratch directory for refusals: the halting BIOS and two 1.44 MB images,
/// `a.img` and `b.img`.
fn refusal_dir(vmm: Vmm, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "qomvm-fdc-{name}-{}-{}",
        vmm.tag(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("halt.bin"), halt_bios()).unwrap();
    std::fs::write(dir.join("a.img"), image(SECTORS_144)).unwrap();
    std::fs::write(dir.join("b.img"), image(SECTORS_144)).unwrap();
    dir
}

/// Runs every case of `cases` in a [`refusal_dir`]; fails with every line that differs
/// from what the case wants.
fn check_refusals(vmm: Vmm, name: &str, cases: &[(&[&str], &str)]) {
    let dir = refusal_dir(vmm, name);
    let mut wrong = Vec::new();
    for (args, want) in cases {
        let got = refused(vmm, &dir, args);
        if got != *want {
            wrong.push(format!("{args:?}:\n  got  {got}\n  want {want}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(wrong.is_empty(), "{vmm:?}:\n{}", wrong.join("\n"));
}

/// Refusals of floppy options that go through QEMU's generic code: blockdev.c's
/// drive_new ("werror/rerror is not supported by this bus type": only IDE, SCSI, virtio
/// and none take them; an if=none drive's reach floppy_drive_realize's check), and
/// qdev_prop_set_globals ("can't apply global ...", at device creation, with no option
/// location).
///
/// qomvm words every one of these differently, for reasons that are its generic
/// command line's and not the floppy's (known gaps): its block layer has no werror/rerror
/// at all, so `-drive` refuses the keys themselves ("Invalid parameter 'werror'", before
/// any bus or device sees them), and it checks `-global` eagerly, when parsing the
/// option ("-global isa-fdc.driveA=d: Property 'isa-fdc.driveA' not found") rather than
/// when creating the device. So each case holds QEMU 7.2 to its exact line, and qomvm
/// only to what both do: exit status 1 and a single-line error naming the key or
/// property refused.
fn generic_refusals(vmm: Vmm) {
    // (arguments, QEMU 7.2's error, what any refusal of them must name)
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["-drive", "if=floppy,file=a.img,format=raw,werror=stop"],
            "PROG: -drive if=floppy,file=a.img,format=raw,werror=stop: werror is not supported by this bus type",
            "werror",
        ),
        (
            &["-drive", "if=floppy,file=a.img,format=raw,rerror=stop"],
            "PROG: -drive if=floppy,file=a.img,format=raw,rerror=stop: rerror is not supported by this bus type",
            "rerror",
        ),
        // floppy_drive_realize's own check, which needs -drive to take werror/rerror.
        (
            &[
                "-drive",
                "if=none,id=d,file=a.img,format=raw,werror=stop",
                "-device",
                "floppy,drive=d",
            ],
            "PROG: -device floppy,drive=d: fdc doesn't support drive option werror",
            "werror",
        ),
        (
            &[
                "-drive",
                "if=none,id=d,file=a.img,format=raw,rerror=stop",
                "-device",
                "floppy,drive=d",
            ],
            "PROG: -device floppy,drive=d: fdc doesn't support drive option rerror",
            "rerror",
        ),
        // QEMU 7.2's isa-fdc has no driveA/driveB (gone since QEMU 6.0: -device floppy).
        (
            &[
                "-drive",
                "if=none,id=d,file=a.img,format=raw",
                "-global",
                "isa-fdc.driveA=d",
            ],
            "PROG: can't apply global isa-fdc.driveA=d: Property 'isa-fdc.driveA' not found",
            "isa-fdc.driveA",
        ),
    ];
    let dir = refusal_dir(vmm, "generic-refusals");
    let mut wrong = Vec::new();
    for (args, qemu_says, key) in cases {
        let (got, lines) = refused_lines(vmm, &dir, args);
        if lines != 1 || !got.starts_with("PROG: ") || !got.contains(key) {
            wrong.push(format!(
                "{args:?}:\n  got  {got} ({lines} lines)\n  want one line naming {key}"
            ));
        } else if vmm == Vmm::Qemu && got != *qemu_says {
            wrong.push(format!("{args:?}:\n  got  {got}\n  want {qemu_says}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(wrong.is_empty(), "{vmm:?}:\n{}", wrong.join("\n"));
}
