//! The PIIX3 IDE function driven register by register over QEMU's qtest protocol (the idea
//! of QEMU's `tests/qtest/ide-test.c`): bus-master DMA reads and writes of an `-hda` image
//! through a PRD table in guest memory, LBA48 PIO, the bus master's rules (no memory
//! without bus mastering, a PRD table too short for the command), an ATAPI INQUIRY and
//! READ(10) of a `-cdrom`, and `query-block` of both drives.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use test_support::fuzz_qtest::{hex, Qtest};
use test_support::qmp::QmpClient;

/// 00:01.1.
const IDE_DEVFN: u32 = 1 << 3 | 1;
/// Where the test puts BAR 4 (the bus-master registers).
const BMDMA: u16 = 0xc000;
/// The primary channel's command block and control port.
const CMD: u16 = 0x1f0;
const CTRL: u16 = 0x3f6;
/// The secondary channel's (the `-cdrom`).
const CMD2: u16 = 0x170;
/// A PRD table and the buffers in guest memory.
const PRD: u64 = 0x1000;
const BUF: u64 = 0x10_0000;

/// Status bits.
const BSY: u64 = 0x80;
const DRDY: u64 = 0x40;
const DRQ: u64 = 0x08;
const ERR: u64 = 0x01;
/// Bus-master status bits.
const BM_ACTIVE: u64 = 0x01;
const BM_INT: u64 = 0x04;

/// Sector `lba`'s contents in the test's images: its number in every 8 bytes.
fn sector(lba: u64) -> Vec<u8> {
    (0..64).flat_map(|_| lba.to_le_bytes()).collect()
}

struct Ide {
    qt: Qtest,
    /// The scratch directory: the images and the QMP socket.
    dir: PathBuf,
}

impl Ide {
    /// A pc with a 4 MiB raw disk as `-hda` (sectors as [`sector`] says) and a 1 MiB CD as
    /// `-cdrom` (each 2048-byte block filled with its number's low byte), BAR 4 at
    /// [`BMDMA`] and the function's I/O decoding on.
    fn start(name: &str, bus_master: bool) -> Ide {
        let mut scratch = PathBuf::new();
        let mut qt = Qtest::start(env!("CARGO_BIN_EXE_qomvm"), name, |dir| {
            scratch = dir.to_path_buf();
            let disk: Vec<u8> = (0..8192).flat_map(sector).collect();
            std::fs::write(dir.join("disk.raw"), disk).unwrap();
            let cd: Vec<u8> = (0..512u32).flat_map(|b| vec![b as u8; 2048]).collect();
            std::fs::write(dir.join("cd.iso"), cd).unwrap();
            let qmp = format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display());
            [
                "-drive",
                "file=disk.raw,format=raw,if=ide,index=0",
                "-drive",
                "file=cd.iso,format=raw,if=ide,index=2,media=cdrom",
                "-qmp",
                &qmp,
            ]
            .map(String::from)
            .to_vec()
        });
        qt.pci_write32(IDE_DEVFN, 0x20, u32::from(BMDMA) | 1);
        let command = if bus_master { 0x5 } else { 0x1 };
        qt.pci_write32(IDE_DEVFN, 0x04, command);
        Ide { qt, dir: scratch }
    }

    fn outb(&mut self, port: u16, value: u64) {
        self.qt.cmd(format!("outb {port:#x} {value:#x}"));
    }

    fn inb(&mut self, port: u16) -> u64 {
        self.qt.value(format!("inb {port:#x}"))
    }

    fn write_mem(&mut self, addr: u64, bytes: &[u8]) {
        self.qt
            .cmd(format!("write {addr:#x} {:#x} {}", bytes.len(), hex(bytes)));
    }

    fn read_mem(&mut self, addr: u64, len: usize) -> Vec<u8> {
        let reply = self.qt.cmd(format!("read {addr:#x} {len:#x}"));
        let digits = reply.strip_prefix("OK 0x").expect("a read's reply");
        (0..len)
            .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    /// One PRD entry per `(address, bytes)`, the last marked end of table, for the
    /// primary channel's bus master.
    fn prd_table(&mut self, entries: &[(u64, u32)]) {
        self.prd_table_for(BMDMA, entries);
    }

    /// [`Ide::prd_table`] for the bus master at `bm` (the secondary's is 8 bytes on).
    fn prd_table_for(&mut self, bm: u16, entries: &[(u64, u32)]) {
        let mut table = Vec::new();
        for (i, &(addr, len)) in entries.iter().enumerate() {
            table.extend_from_slice(&(addr as u32).to_le_bytes());
            table.extend_from_slice(&(len as u16).to_le_bytes());
            let eot: u16 = if i + 1 == entries.len() { 0x8000 } else { 0 };
            table.extend_from_slice(&eot.to_le_bytes());
        }
        self.write_mem(PRD, &table);
        self.qt.cmd(format!("outl {bm:#x} 0"));
        self.qt.cmd(format!("outl {:#x} {PRD:#x}", bm + 4));
    }

    /// Programs an LBA28 command on the primary master.
    fn lba28(&mut self, lba: u64, count: u64, command: u64) {
        self.outb(CMD + 6, 0xe0 | (lba >> 24 & 0xf));
        self.outb(CMD + 2, count);
        self.outb(CMD + 3, lba & 0xff);
        self.outb(CMD + 4, lba >> 8 & 0xff);
        self.outb(CMD + 5, lba >> 16 & 0xff);
        self.outb(CMD + 7, command);
    }

    /// Waits until `port`'s value has none of `busy` set; returns it.
    fn wait_clear(&mut self, port: u16, busy: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.inb(port);
            if v & busy == 0 {
                return v;
            }
            assert!(Instant::now() < deadline, "port {port:#x} stays {v:#x}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Starts the bus master (`to_memory`: a disk read) and waits for the command to end.
    fn run_dma(&mut self, to_memory: bool) -> (u64, u64) {
        self.outb(BMDMA, if to_memory { 0x09 } else { 0x01 });
        let status = self.wait_clear(CTRL, BSY);
        let bm = self.inb(BMDMA + 2);
        self.outb(BMDMA, 0);
        (status, bm)
    }
}

#[test]
fn dma_reads_and_writes_go_through_the_prd_table() {
    let mut ide = Ide::start("qomvm-ide-dma", true);
    // READ DMA of sectors 100-103 into two regions of guest memory.
    ide.prd_table(&[(BUF, 1024), (BUF + 0x8000, 1024)]);
    ide.lba28(100, 4, 0xc8);
    let (status, bm) = ide.run_dma(true);
    assert_eq!(status & (DRDY | DRQ | ERR), DRDY, "status {status:#x}");
    assert_eq!(bm & (BM_ACTIVE | BM_INT), BM_INT, "bus master {bm:#x}");
    let want: Vec<u8> = (100..104).flat_map(sector).collect();
    let mut got = ide.read_mem(BUF, 1024);
    got.extend(ide.read_mem(BUF + 0x8000, 1024));
    assert!(got == want, "sectors 100-103 as read: {:x?}...", &got[..16]);
    // The interrupt's bit clears when written back; reading status acknowledges.
    ide.outb(BMDMA + 2, BM_INT);
    assert_eq!(ide.inb(BMDMA + 2) & BM_INT, 0);
    assert_eq!(ide.inb(CMD + 7) & (DRDY | ERR), DRDY);
    // The task file points at the last sector moved.
    assert_eq!(ide.inb(CMD + 3), 103);

    // WRITE DMA of a pattern to sectors 200-201, read back by READ DMA.
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    ide.write_mem(BUF, &pattern);
    ide.prd_table(&[(BUF, 1024)]);
    ide.lba28(200, 2, 0xca);
    let (status, _) = ide.run_dma(false);
    assert_eq!(status & (DRDY | ERR), DRDY, "status {status:#x}");
    ide.write_mem(BUF + 0x4000, &[0; 1024]);
    ide.prd_table(&[(BUF + 0x4000, 1024)]);
    ide.lba28(200, 2, 0xc8);
    ide.run_dma(true);
    assert!(
        ide.read_mem(BUF + 0x4000, 1024) == pattern,
        "sectors 200-201 differ"
    );

    // A PRD table shorter than the command: the engine stops, no interrupt, no data.
    ide.outb(BMDMA + 2, BM_INT);
    ide.write_mem(BUF, &[0xee; 512]);
    ide.prd_table(&[(BUF, 512)]);
    ide.lba28(300, 4, 0xc8);
    let (_, bm) = ide.run_dma(true);
    assert_eq!(bm & (BM_ACTIVE | BM_INT), 0, "bus master {bm:#x}");
    assert!(
        ide.read_mem(BUF, 512) == [0xee; 512],
        "the short table moved data"
    );

    // A command past the disk's end aborts.
    ide.lba28(8190, 4, 0xc8);
    assert_eq!(ide.inb(CMD + 7) & ERR, ERR);
    assert_eq!(ide.inb(CMD + 1), 0x04, "ABRT");
}

#[test]
fn without_bus_mastering_dma_reaches_no_memory() {
    let mut ide = Ide::start("qomvm-ide-nomaster", false);
    ide.write_mem(BUF, &[0x5a; 512]);
    ide.prd_table(&[(BUF, 512)]);
    ide.lba28(1, 1, 0xc8);
    let (status, _) = ide.run_dma(true);
    assert_eq!(status & ERR, ERR, "status {status:#x}");
    assert!(
        ide.read_mem(BUF, 512) == [0x5a; 512],
        "DMA without bus mastering"
    );
}

#[test]
fn lba48_pio_reads_and_identify_describe_the_disk() {
    let mut ide = Ide::start("qomvm-ide-pio", true);
    ide.outb(CMD + 6, 0xa0);
    ide.outb(CMD + 7, 0xec);
    ide.wait_clear(CTRL, BSY);
    let words: Vec<u64> = (0..256)
        .map(|_| ide.qt.value(format!("inw {CMD:#x}")))
        .collect();
    assert_eq!(words[0], 0x0040);
    // 4 MiB: 8192 sectors in LBA28 and LBA48 words.
    assert_eq!((words[60], words[61]), (8192, 0));
    assert_eq!((words[100], words[101]), (8192, 0));
    let model: Vec<u8> = words[27..47]
        .iter()
        .flat_map(|w| (*w as u16).to_be_bytes())
        .collect();
    assert_eq!(String::from_utf8_lossy(&model).trim_end(), "QEMU HARDDISK");

    // READ SECTORS EXT: high-order bytes first, then the low ones.
    ide.outb(CMD + 6, 0x40);
    for (reg, high, low) in [(2, 0, 2), (3, 0, 0x10), (4, 0, 0x1f), (5, 0, 0)] {
        ide.outb(CMD + reg, high);
        ide.outb(CMD + reg, low);
    }
    ide.outb(CMD + 7, 0x24);
    for lba in [0x1f10u64, 0x1f11] {
        let status = ide.wait_clear(CTRL, BSY);
        assert_eq!(status & (DRQ | ERR), DRQ, "status {status:#x}");
        let data: Vec<u8> = (0..128)
            .flat_map(|_| (ide.qt.value(format!("inl {CMD:#x}")) as u32).to_le_bytes())
            .collect();
        assert!(
            data == sector(lba),
            "sector {lba:#x}: {:x?}...",
            &data[..16]
        );
    }
    assert_eq!(ide.inb(CMD + 7) & (DRQ | BSY), 0);
}

/// Sends an ATAPI packet on the secondary master by PIO; returns the reply.
fn atapi_pio(ide: &mut Ide, packet: [u8; 12]) -> (u64, Vec<u8>) {
    ide.outb(CMD2 + 6, 0xa0);
    ide.outb(CMD2 + 1, 0);
    ide.outb(CMD2 + 4, 0x00);
    ide.outb(CMD2 + 5, 0x80);
    ide.outb(CMD2 + 7, 0xa0);
    for pair in packet.chunks(2) {
        let word = u16::from_le_bytes([pair[0], pair[1]]);
        ide.qt.cmd(format!("outw {CMD2:#x} {word:#x}"));
    }
    let mut reply = Vec::new();
    loop {
        let status = ide.wait_clear(0x376, BSY);
        if status & DRQ == 0 {
            return (status, reply);
        }
        let n = ide.inb(CMD2 + 5) << 8 | ide.inb(CMD2 + 4);
        for _ in 0..n.div_ceil(2) {
            let w = ide.qt.value(format!("inw {CMD2:#x}")) as u16;
            reply.extend_from_slice(&w.to_le_bytes());
        }
    }
}

#[test]
fn the_cdrom_answers_atapi_packets() {
    let mut ide = Ide::start("qomvm-ide-atapi", true);
    // The ATAPI signature.
    assert_eq!((ide.inb(CMD2 + 4), ide.inb(CMD2 + 5)), (0x14, 0xeb));
    let (status, inquiry) = atapi_pio(&mut ide, [0x12, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(status & ERR, 0);
    assert_eq!(inquiry[0], 5, "a CD-ROM");
    assert_eq!(&inquiry[16..28], b"QEMU DVD-ROM");
    let (_, capacity) = atapi_pio(&mut ide, [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        capacity,
        [0, 0, 1, 0xff, 0, 0, 8, 0],
        "last block 511, 2048 bytes"
    );
    // READ(10) of blocks 7-9 by PIO, in pieces of at most the 0x8000-byte count.
    let (status, data) = atapi_pio(&mut ide, [0x28, 0, 0, 0, 0, 7, 0, 0, 3, 0, 0, 0]);
    assert_eq!(status & ERR, 0);
    let want: Vec<u8> = (7..10u8).flat_map(|b| vec![b; 2048]).collect();
    assert!(
        data == want,
        "PIO READ(10): {} bytes, {:x?}...",
        data.len(),
        &data[..data.len().min(16)]
    );
    // The same by DMA, through the secondary channel's bus master.
    ide.prd_table_for(BMDMA + 8, &[(BUF, 6144)]);
    ide.outb(CMD2 + 6, 0xa0);
    ide.outb(CMD2 + 1, 1);
    ide.outb(CMD2 + 7, 0xa0);
    for pair in [0x28u8, 0, 0, 0, 0, 20, 0, 0, 3, 0, 0, 0].chunks(2) {
        let word = u16::from_le_bytes([pair[0], pair[1]]);
        ide.qt.cmd(format!("outw {CMD2:#x} {word:#x}"));
    }
    ide.outb(BMDMA + 8, 0x09);
    let status = ide.wait_clear(0x376, BSY);
    assert_eq!(status & (ERR | DRQ), 0, "status {status:#x}");
    let want: Vec<u8> = (20..23u8).flat_map(|b| vec![b; 2048]).collect();
    let got = ide.read_mem(BUF, 6144);
    assert!(got == want, "DMA READ(10): {:x?}...", &got[..16]);
    // Past the medium: CHECK CONDITION, ILLEGAL REQUEST.
    let (status, _) = atapi_pio(&mut ide, [0x28, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(status & ERR, ERR);
    assert_eq!(ide.inb(CMD2 + 1) >> 4, 5);
}

#[test]
fn query_block_lists_the_disk_and_the_removable_cd() {
    let mut ide = Ide::start("qomvm-ide-qmp", true);
    let mut qmp = QmpClient::connect(&ide.dir.join("qmp.sock"));
    let blocks = qmp.execute("query-block", json!({}));
    let find = |id: &str| {
        blocks["return"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["device"] == id).cloned())
            .unwrap_or_else(|| panic!("no {id}: {blocks}"))
    };
    let hd = find("ide0-hd0");
    assert_eq!(hd["removable"], false, "{hd}");
    assert_eq!(hd["inserted"]["ro"], false, "{hd}");
    let cd = find("ide1-cd0");
    assert_eq!(cd["removable"], true, "{cd}");
    assert_eq!(cd["locked"], false, "{cd}");
    assert_eq!(cd["tray_open"], false, "{cd}");
    assert_eq!(cd["inserted"]["ro"], true, "{cd}");
    assert!(
        cd["qdev"]
            .as_str()
            .is_some_and(|q| q.starts_with("/machine/")),
        "{cd}"
    );
    // HMP shows the tray as QEMU does.
    let info = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "info block ide1-cd0"}),
    );
    let text = info["return"].as_str().unwrap_or_default();
    // A blank line first, as QEMU's: the drive is not the first of the list.
    assert!(text.starts_with("\r\nide1-cd0 (#block"), "{text}");
    assert!(
        text.contains("    Removable device: not locked, tray closed\r\n"),
        "{text}"
    );
    // PREVENT MEDIUM REMOVAL shows as locked.
    let (status, _) = atapi_pio(&mut ide, [0x1e, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(status & ERR, 0);
    let blocks = qmp.execute("query-block", json!({}));
    let cd = blocks["return"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["device"] == "ide1-cd0").cloned())
        .unwrap();
    assert_eq!(cd["locked"], true, "{cd}");
}

/// A software reset ends whatever the drives were doing: a PIO write half way through its
/// second block takes no more data, a DMA command waiting for the bus master never runs,
/// and the disk answers the next command. A CD's DEVICE RESET ends its PIO reply the same.
#[test]
fn resets_cancel_transfers_in_progress() {
    let mut ide = Ide::start("qomvm-ide-reset", true);
    ide.lba28(10, 2, 0x30);
    for _ in 0..256 + 100 {
        ide.wait_clear(CTRL, BSY);
        ide.qt.cmd(format!("outw {CMD:#x} 0x1234"));
    }
    ide.outb(CTRL, 0x04);
    ide.outb(CTRL, 0x00);
    assert_eq!(ide.wait_clear(CTRL, BSY) & (DRQ | ERR), 0);
    assert_eq!(ide.inb(CMD + 1), 0x01, "the diagnostic's code");
    for _ in 0..200 {
        ide.qt.cmd(format!("outw {CMD:#x} 0x5678"));
    }
    assert_eq!(ide.inb(CMD + 7) & DRQ, 0);

    // READ DMA issued, then the reset, then the bus master started: nothing moves.
    ide.write_mem(BUF, &[0x77; 512]);
    ide.prd_table(&[(BUF, 512)]);
    ide.lba28(5, 1, 0xc8);
    ide.outb(CTRL, 0x04);
    ide.outb(CTRL, 0x00);
    ide.outb(BMDMA + 2, BM_INT);
    ide.outb(BMDMA, 0x09);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ide.inb(BMDMA + 2) & BM_INT, 0);
    assert!(
        ide.read_mem(BUF, 512) == [0x77; 512],
        "a cancelled DMA moved data"
    );
    ide.outb(BMDMA, 0);

    // The disk works on: the first block was written, the second not.
    ide.prd_table(&[(BUF, 1024)]);
    ide.lba28(10, 2, 0xc8);
    let (status, _) = ide.run_dma(true);
    assert_eq!(status & (DRDY | ERR), DRDY, "status {status:#x}");
    let data = ide.read_mem(BUF, 1024);
    assert!(data[..512].chunks(2).all(|w| w == [0x34, 0x12]), "block 10");
    assert!(data[512..] == sector(11), "block 11 was written after all");

    // The CD: READ(10) of 3 blocks by PIO, a few words read, then DEVICE RESET.
    ide.outb(CMD2 + 6, 0xa0);
    ide.outb(CMD2 + 1, 0);
    ide.outb(CMD2 + 4, 0x00);
    ide.outb(CMD2 + 5, 0x08);
    ide.outb(CMD2 + 7, 0xa0);
    for pair in [0x28u8, 0, 0, 0, 0, 7, 0, 0, 3, 0, 0, 0].chunks(2) {
        let word = u16::from_le_bytes([pair[0], pair[1]]);
        ide.qt.cmd(format!("outw {CMD2:#x} {word:#x}"));
    }
    ide.wait_clear(0x376, BSY);
    for _ in 0..10 {
        ide.qt.cmd(format!("inw {CMD2:#x}"));
    }
    ide.outb(CMD2 + 7, 0x08);
    assert_eq!(ide.inb(CMD2 + 7), 0, "an ATAPI drive after DEVICE RESET");
    assert_eq!((ide.inb(CMD2 + 4), ide.inb(CMD2 + 5)), (0x14, 0xeb));
    assert_eq!(
        ide.qt.value(format!("inw {CMD2:#x}")),
        0,
        "no data after the reset"
    );
    let (status, inquiry) = atapi_pio(&mut ide, [0x12, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(status & ERR, 0);
    assert_eq!(inquiry.len(), 36);
}

/// A `stop` waits for the DMA transfer in flight but not for its drive's I/O limits
/// (QEMU's drain lifts them): with a read held back by a 64 bytes a second limit, the
/// stop answers at once and the transfer is done.
#[test]
fn a_stop_does_not_wait_out_a_transfers_io_limits() {
    let mut ide = Ide::start("qomvm-ide-throttle", true);
    let mut qmp = QmpClient::connect(&ide.dir.join("qmp.sock"));
    let limits = json!({"device": "ide0-hd0", "bps": 64, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0});
    qmp_ok(&mut qmp, "block_set_io_throttle", limits);
    // The first read fills the bucket for 8 seconds; the second waits for it.
    ide.prd_table(&[(BUF, 512)]);
    ide.lba28(16, 1, 0xc8);
    ide.run_dma(true);
    ide.prd_table(&[(BUF + 0x1000, 512)]);
    ide.lba28(17, 1, 0xc8);
    ide.outb(BMDMA, 0x09);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        ide.inb(CTRL) & BSY,
        BSY,
        "the second read waits for the limits"
    );
    let began = Instant::now();
    qmp_ok(&mut qmp, "stop", json!({}));
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the stop waited {took:?} for the limits"
    );
    assert_eq!(ide.inb(CTRL) & BSY, 0, "the transfer is done");
    assert!(ide.read_mem(BUF + 0x1000, 512) == sector(17));
}

/// The QMP command's error text, or `None` if it succeeded.
fn qmp_error(qmp: &mut QmpClient, name: &str, args: serde_json::Value) -> Option<String> {
    let reply = qmp.execute(name, args);
    if reply.get("return").is_some() {
        return None;
    }
    Some(
        reply["error"]["desc"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// Runs `name`, which must succeed.
fn qmp_ok(qmp: &mut QmpClient, name: &str, args: serde_json::Value) {
    assert_eq!(qmp_error(qmp, name, args.clone()), None, "{name} {args}");
}

/// query-block's entry of `device`.
fn block_info(qmp: &mut QmpClient, device: &str) -> serde_json::Value {
    let blocks = qmp.execute("query-block", json!({}));
    blocks["return"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["device"] == device).cloned())
        .unwrap_or_else(|| panic!("no {device}: {blocks}"))
}

/// The `DEVICE_TRAY_MOVED` events so far (as `tray-open` values), taken from the client.
fn tray_moves(qmp: &mut QmpClient) -> Vec<bool> {
    // An answered command delivers the events sent before it.
    qmp.execute("query-status", json!({}));
    let moves = qmp
        .events
        .iter()
        .filter(|e| e["event"] == "DEVICE_TRAY_MOVED")
        .map(|e| e["data"]["tray-open"].as_bool().unwrap())
        .collect();
    qmp.events.clear();
    moves
}

/// The sense key and additional sense code REQUEST SENSE reports.
fn request_sense(ide: &mut Ide) -> (u8, u8) {
    let (_, sense) = atapi_pio(ide, [0x03, 0, 0, 0, 18, 0, 0, 0, 0, 0, 0, 0]);
    (sense[2], sense[12])
}

/// GET EVENT STATUS NOTIFICATION's media event: (event code, media status).
fn media_event(ide: &mut Ide) -> (u8, u8) {
    let (_, e) = atapi_pio(ide, [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0, 0, 0]);
    (e[4], e[5])
}

/// Block `lba` of the CD by READ(10), once the drive is ready.
fn read_cd_block(ide: &mut Ide, lba: u8) -> Vec<u8> {
    let (status, data) = atapi_pio(ide, [0x28, 0, 0, 0, 0, lba, 0, 0, 1, 0, 0, 0]);
    assert_eq!(status & ERR, 0, "READ(10) of block {lba}");
    data
}

#[test]
fn the_cd_changes_as_qemus_does_through_eject_and_the_blockdev_medium_commands() {
    let mut ide = Ide::start("qomvm-ide-media", true);
    let other: Vec<u8> = (0..256u32)
        .flat_map(|b| vec![0x80 | b as u8; 2048])
        .collect();
    std::fs::write(ide.dir.join("other.iso"), other).unwrap();
    let mut qmp = QmpClient::connect(&ide.dir.join("qmp.sock"));
    let qdev = block_info(&mut qmp, "ide1-cd0")["qdev"]
        .as_str()
        .unwrap()
        .to_string();

    // Names that are wrong in QEMU's ways.
    let both = json!({"device": "ide1-cd0", "id": qdev});
    assert_eq!(
        qmp_error(&mut qmp, "eject", both).as_deref(),
        Some("Need exactly one of 'device' and 'id'")
    );
    assert_eq!(
        qmp_error(&mut qmp, "eject", json!({"device": "nope"})).as_deref(),
        Some("Device 'nope' not found")
    );
    assert_eq!(
        qmp_error(&mut qmp, "eject", json!({"device": "ide0-hd0"})).as_deref(),
        Some("Device 'ide0-hd0' is not removable")
    );
    assert_eq!(
        qmp_error(&mut qmp, "blockdev-remove-medium", json!({"id": qdev})),
        Some(format!("Tray of device '{qdev}' is not open"))
    );

    // The guest locks the medium in: eject asks it to let go, and only force opens it.
    let (status, _) = atapi_pio(&mut ide, [0x1e, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(status & ERR, 0);
    assert_eq!(
        qmp_error(&mut qmp, "eject", json!({"device": "ide1-cd0"})).as_deref(),
        Some("Device 'ide1-cd0' is locked and force was not specified, wait for tray to open and try again")
    );
    assert_eq!(
        media_event(&mut ide),
        (1, 2),
        "eject requested, medium present"
    );
    assert_eq!(media_event(&mut ide), (0, 2), "reported once");
    assert_eq!(tray_moves(&mut qmp), Vec::<bool>::new());
    qmp_ok(
        &mut qmp,
        "eject",
        json!({"device": "ide1-cd0", "force": true}),
    );
    assert_eq!(tray_moves(&mut qmp), [true]);
    let cd = block_info(&mut qmp, "ide1-cd0");
    assert_eq!(
        (&cd["tray_open"], &cd["locked"]),
        (&json!(true), &json!(false))
    );
    assert!(cd.get("inserted").is_none(), "{cd}");
    let (status, _) = atapi_pio(&mut ide, [0; 12]);
    assert_eq!(status & ERR, ERR);
    assert_eq!(
        request_sense(&mut ide),
        (2, 0x3a),
        "NOT READY, medium not present"
    );
    assert_eq!(media_event(&mut ide), (0, 1), "tray open");

    // libvirt's way: a node of its own, inserted into the open tray, which then closes.
    qmp_ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "other", "read-only": true,
               "file": {"driver": "file", "filename": ide.dir.join("other.iso")}}),
    );
    assert_eq!(
        qmp_error(
            &mut qmp,
            "blockdev-insert-medium",
            json!({"id": qdev, "node-name": "none"})
        )
        .as_deref(),
        Some("Node 'none' not found")
    );
    qmp_ok(
        &mut qmp,
        "blockdev-insert-medium",
        json!({"id": qdev, "node-name": "other"}),
    );
    assert_eq!(
        qmp_error(
            &mut qmp,
            "blockdev-insert-medium",
            json!({"id": qdev, "node-name": "other"})
        )
        .as_deref(),
        Some("Node 'other' is already in use")
    );
    qmp_ok(&mut qmp, "blockdev-close-tray", json!({"id": qdev}));
    assert_eq!(tray_moves(&mut qmp), [false]);
    let cd = block_info(&mut qmp, "ide1-cd0");
    assert_eq!(cd["inserted"]["node-name"], "other", "{cd}");
    assert_eq!(
        cd["inserted"]["file"],
        ide.dir.join("other.iso").to_str().unwrap(),
        "{cd}"
    );
    assert_eq!(
        qmp_error(&mut qmp, "blockdev-del", json!({"node-name": "other"})).as_deref(),
        Some("Node other is in use")
    );

    // The guest sees the change: a new-media event, then "not present" and "may have
    // changed" before its commands run again (QEMU's cdrom_changed).
    assert_eq!(media_event(&mut ide), (2, 2), "new medium");
    let (status, _) = atapi_pio(&mut ide, [0; 12]);
    assert_eq!(status & ERR, ERR);
    assert_eq!(request_sense(&mut ide), (2, 0x3a));
    let (status, _) = atapi_pio(&mut ide, [0; 12]);
    assert_eq!(status & ERR, ERR);
    assert_eq!(
        request_sense(&mut ide),
        (6, 0x28),
        "UNIT ATTENTION, medium changed"
    );
    assert_eq!(read_cd_block(&mut ide, 3), vec![0x83; 2048]);
    let (_, capacity) = atapi_pio(&mut ide, [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(capacity[..4], [0, 0, 0, 0xff], "last block 255");

    // blockdev-change-medium: the first image again, the monitor's node given back.
    let first = ide.dir.join("cd.iso");
    qmp_ok(
        &mut qmp,
        "blockdev-change-medium",
        json!({"device": "ide1-cd0", "filename": first, "format": "raw"}),
    );
    assert_eq!(tray_moves(&mut qmp), [true, false]);
    let cd = block_info(&mut qmp, "ide1-cd0");
    assert_eq!(cd["inserted"]["ro"], true, "a CD stays read-only: {cd}");
    assert!(
        cd["inserted"]["node-name"]
            .as_str()
            .unwrap()
            .starts_with("#block"),
        "{cd}"
    );
    atapi_pio(&mut ide, [0; 12]);
    atapi_pio(&mut ide, [0; 12]);
    // A unit attention holds every other command until REQUEST SENSE reports it.
    let (status, _) = atapi_pio(&mut ide, [0x28, 0, 0, 0, 0, 5, 0, 0, 1, 0, 0, 0]);
    // The error register: UNIT ATTENTION (6) in the sense key bits, which hold QEMU's MC_ERR
    // (0x20) too.
    assert_eq!((status & ERR, ide.inb(CMD2 + 1)), (ERR, 0x60));
    assert_eq!(request_sense(&mut ide), (6, 0x28));
    assert_eq!(read_cd_block(&mut ide, 5), vec![5; 2048]);
    qmp_ok(&mut qmp, "blockdev-del", json!({"node-name": "other"}));
    assert_eq!(
        qmp_error(&mut qmp, "blockdev-del", json!({"node-name": "other"})).as_deref(),
        Some("Failed to find node with node-name='other'")
    );
    let missing = ide.dir.join("missing.iso");
    assert_eq!(
        qmp_error(
            &mut qmp,
            "blockdev-change-medium",
            json!({"device": "ide1-cd0", "filename": missing, "format": "raw"})
        ),
        Some(format!(
            "Could not open '{}': No such file or directory",
            missing.display()
        ))
    );
    assert_eq!(
        tray_moves(&mut qmp),
        Vec::<bool>::new(),
        "a failed open moves nothing"
    );

    // The guest's own eject (START STOP UNIT) moves the tray with the medium in it.
    let (status, _) = atapi_pio(&mut ide, [0x1b, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(status & ERR, 0);
    assert_eq!(tray_moves(&mut qmp), [true]);
    let cd = block_info(&mut qmp, "ide1-cd0");
    assert_eq!(cd["tray_open"], true, "{cd}");
    assert!(cd.get("inserted").is_some(), "{cd}");

    // HMP's eject and change.
    let hmp = |qmp: &mut QmpClient, line: &str| {
        let r = qmp.execute("human-monitor-command", json!({"command-line": line}));
        r["return"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(hmp(&mut qmp, "eject ide1-cd0"), "");
    assert!(block_info(&mut qmp, "ide1-cd0").get("inserted").is_none());
    let line = format!(
        "change ide1-cd0 {} raw",
        ide.dir.join("other.iso").display()
    );
    assert_eq!(hmp(&mut qmp, &line), "");
    assert!(block_info(&mut qmp, "ide1-cd0").get("inserted").is_some());
    assert_eq!(tray_moves(&mut qmp), [false]);
}

#[test]
fn empty_cd_drives_are_named_and_take_a_medium() {
    let mut scratch = PathBuf::new();
    let _qt = Qtest::start(env!("CARGO_BIN_EXE_qomvm"), "qomvm-ide-empty-cd", |dir| {
        scratch = dir.to_path_buf();
        std::fs::write(dir.join("cd.iso"), vec![7u8; 4 * 2048]).unwrap();
        let qmp = format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display());
        [
            "-drive",
            "if=ide,index=2,media=cdrom",
            "-drive",
            "if=none,id=cd9,media=cdrom",
            "-device",
            "ide-cd,drive=cd9,bus=ide.1,unit=1,id=cdrom9",
            "-drive",
            "if=none,id=loose,file=cd.iso,format=raw,readonly=on",
            "-qmp",
            &qmp,
        ]
        .map(String::from)
        .to_vec()
    });
    let mut qmp = QmpClient::connect(&scratch.join("qmp.sock"));
    for (device, qdev) in [("ide1-cd0", None), ("cd9", Some("cdrom9"))] {
        let cd = block_info(&mut qmp, device);
        assert!(cd.get("inserted").is_none(), "{cd}");
        assert_eq!(cd["removable"], true, "{cd}");
        if let Some(qdev) = qdev {
            assert_eq!(cd["qdev"], qdev, "{cd}");
        }
        qmp_ok(
            &mut qmp,
            "blockdev-change-medium",
            json!({"device": device, "filename": scratch.join("cd.iso"), "format": "raw"}),
        );
        let cd = block_info(&mut qmp, device);
        assert_eq!(cd["inserted"]["image"]["virtual-size"], 4 * 2048, "{cd}");
    }
    assert_eq!(qmp_error(&mut qmp, "eject", json!({"id": "cdrom9"})), None);
    assert!(block_info(&mut qmp, "cd9").get("inserted").is_none());
    // A drive without a device takes a new medium, again and again.
    std::fs::write(scratch.join("big.iso"), vec![8u8; 8 * 2048]).unwrap();
    for (file, size) in [("big.iso", 8 * 2048), ("cd.iso", 4 * 2048)] {
        qmp_ok(
            &mut qmp,
            "blockdev-change-medium",
            json!({"device": "loose", "filename": scratch.join(file), "format": "raw"}),
        );
        let loose = block_info(&mut qmp, "loose");
        assert_eq!(loose["inserted"]["image"]["virtual-size"], size, "{loose}");
    }
    qmp_ok(&mut qmp, "eject", json!({"device": "loose"}));
    assert!(block_info(&mut qmp, "loose").get("inserted").is_none());
    // What is not a drive, or not an image.
    assert_eq!(
        qmp_error(&mut qmp, "eject", json!({"id": "/machine"})).as_deref(),
        Some("/machine is not a hotpluggable device")
    );
    assert_eq!(
        qmp_error(
            &mut qmp,
            "blockdev-change-medium",
            json!({"device": "cd9", "filename": scratch, "format": "raw"})
        ),
        Some(format!(
            "'file' driver requires '{}' to be a regular file",
            scratch.display()
        ))
    );
    let r = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "change cd9 cd.iso raw bogus"}),
    );
    assert_eq!(r["return"], "Error: invalid parameter value: bogus\r\n");
}

#[test]
fn nodes_added_at_run_time_are_deleted_as_qemu_deletes_them() {
    let ide = Ide::start("qomvm-ide-blockdev-del", true);
    let mut qmp = QmpClient::connect(&ide.dir.join("qmp.sock"));
    let iso = ide.dir.join("cd.iso");
    // libvirt's pair: a file node opened with auto-read-only, a format node over it.
    qmp_ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "file", "filename": iso, "node-name": "f1", "auto-read-only": true}),
    );
    qmp_ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt1", "read-only": true, "file": "f1"}),
    );
    assert_eq!(
        qmp_error(
            &mut qmp,
            "blockdev-add",
            json!({"driver": "raw", "node-name": "fmt1", "file": "f1"})
        )
        .as_deref(),
        Some("Duplicate nodes with node-name='fmt1'")
    );
    assert_eq!(
        qmp_error(
            &mut qmp,
            "blockdev-add",
            json!({"driver": "file", "node-name": "ide1-cd0", "filename": iso})
        )
        .as_deref(),
        Some("node-name=ide1-cd0 is conflicting with a device id")
    );
    assert_eq!(
        qmp_error(&mut qmp, "blockdev-del", json!({"node-name": "f1"})).as_deref(),
        Some("Block device f1 is in use")
    );
    let names = |qmp: &mut QmpClient| -> Vec<String> {
        let nodes = qmp.execute("query-named-block-nodes", json!({}));
        nodes["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(names(&mut qmp).contains(&"fmt1".to_string()));
    // Deleting the format node gives the file node back, which then goes too.
    qmp_ok(&mut qmp, "blockdev-del", json!({"node-name": "fmt1"}));
    let after = names(&mut qmp);
    assert!(!after.contains(&"fmt1".to_string()), "{after:?}");
    assert!(after.contains(&"f1".to_string()), "{after:?}");
    qmp_ok(&mut qmp, "blockdev-del", json!({"node-name": "f1"}));
    assert!(!names(&mut qmp).contains(&"f1".to_string()));
    // QEMU's node names.
    for (name, error) in [
        ("#block1".to_string(), "Invalid node-name: '#block1'"),
        (String::new(), "Invalid node-name: ''"),
        ("a/b".to_string(), "Invalid node-name: 'a/b'"),
        ("n".repeat(32), "Node name too long"),
    ] {
        let args = json!({"driver": "file", "filename": iso, "node-name": name});
        assert_eq!(
            qmp_error(&mut qmp, "blockdev-add", args).as_deref(),
            Some(error)
        );
    }
    // The file node comes back on the descriptor it had, whatever became of the path.
    qmp_ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "file", "filename": iso, "node-name": "f2", "read-only": true}),
    );
    qmp_ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt2", "read-only": true, "file": "f2"}),
    );
    let moved = ide.dir.join("moved.iso");
    std::fs::rename(&iso, &moved).unwrap();
    qmp_ok(&mut qmp, "blockdev-del", json!({"node-name": "fmt2"}));
    assert!(names(&mut qmp).contains(&"f2".to_string()));
    qmp_ok(&mut qmp, "blockdev-del", json!({"node-name": "f2"}));
    std::fs::rename(&moved, &iso).unwrap();
    // A backing node the top took is a node of its own again when the top goes.
    let base = ide.dir.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    qmp_ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "base", "read-only": true,
               "file": {"driver": "file", "filename": base, "node-name": "base-file"}}),
    );
    let top = ide.dir.join("top.qcow2");
    match std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top)
        .status()
    {
        Ok(made) if made.success() => {
            qmp_ok(
                &mut qmp,
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "top", "backing": "base",
                       "file": {"driver": "file", "filename": top}}),
            );
            assert_eq!(
                qmp_error(&mut qmp, "blockdev-del", json!({"node-name": "base"})).as_deref(),
                Some("Block device base is in use")
            );
            qmp_ok(&mut qmp, "blockdev-del", json!({"node-name": "top"}));
            assert!(names(&mut qmp).contains(&"base".to_string()));
        }
        other => test_support::skip::skip(format!("qemu-img create: {other:?}")),
    }
    qmp_ok(&mut qmp, "blockdev-del", json!({"node-name": "base"}));
    // A -drive's node is the drive's.
    let hd = block_info(&mut qmp, "ide0-hd0");
    let hd_node = hd["inserted"]["node-name"].as_str().unwrap().to_string();
    assert_eq!(
        qmp_error(&mut qmp, "blockdev-del", json!({"node-name": hd_node})),
        Some(format!("Node {hd_node} is in use"))
    );
}

/// The block devices of a `-M pc` qomvm on qtest started with `args` (QMP `query-block`
/// over stdio): each device's name and its medium's file, or qomvm's error.
fn default_block_devices(args: &[&str]) -> Result<Vec<(String, Option<String>)>, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args([
            "-M", "pc", "-accel", "qtest", "-display", "none", "-S", "-serial", "none", "-qmp",
            "stdio",
        ])
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // qomvm exits at `quit`, or at once when the command line is refused.
    let _ = writeln!(stdin, r#"{{"execute":"qmp_capabilities"}}"#);
    let _ = writeln!(stdin, r#"{{"execute":"query-block"}}"#);
    let _ = writeln!(stdin, r#"{{"execute":"quit"}}"#);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim_end().to_string());
    }
    let reply = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["return"].is_array())
        .unwrap_or_else(|| panic!("no query-block reply: {out:?}"));
    Ok(reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let file = b["inserted"]["file"].as_str().map(String::from);
            (b["device"].as_str().unwrap_or_default().to_string(), file)
        })
        .collect())
}

/// QEMU's `default_cdrom`: `-M pc` has an empty CD drive as the secondary master
/// (`ide1-cd0`) unless `-nodefaults`, a drive at index 2 (`-cdrom`, `-hdc`, `-drive
/// if=ide,index=2`) or a disk or CD `-device` says otherwise; its medium can be changed.
/// QEMU's `default_floppy` (`floppy0`, empty) comes after it, unless `-nodefaults`.
#[test]
fn the_pc_has_an_empty_cd_drive_unless_told_otherwise() {
    let cd = |file: Option<&str>| ("ide1-cd0".to_string(), file.map(String::from));
    let floppy = ("floppy0".to_string(), None);
    assert_eq!(
        default_block_devices(&[]),
        Ok(vec![cd(None), floppy.clone()])
    );
    assert_eq!(default_block_devices(&["-nodefaults"]), Ok(vec![]));
    let dir = std::env::temp_dir().join(format!("qomvm-default-cd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let iso = dir.join("cd.iso");
    std::fs::write(&iso, vec![0u8; 4 * 2048]).unwrap();
    let iso = iso.to_str().unwrap();
    assert_eq!(
        default_block_devices(&["-cdrom", iso]),
        Ok(vec![cd(Some(iso)), floppy.clone()])
    );
    let hdc = default_block_devices(&["-hdc", iso]).unwrap();
    assert_eq!(hdc.len(), 2, "{hdc:?}");
    assert_eq!(hdc[0].0, "ide1-hd0", "-hdc takes index 2: {hdc:?}");
    // A disk at another index: the CD is added beside it.
    let hda = default_block_devices(&["-hda", iso]).unwrap();
    let names: Vec<&str> = hda.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ide0-hd0", "ide1-cd0", "floppy0"]);
    for device in ["ide-cd", "ide-hd", "scsi-cd", "scsi-hd"] {
        let args = [
            "-drive",
            &format!(
                "if=none,id=d0,file={iso},format=raw,readonly={}",
                if device.ends_with("cd") { "on" } else { "off" }
            ),
            "-device",
            &format!("{device},drive=d0"),
        ];
        let got = default_block_devices(&args);
        if device.starts_with("scsi") {
            // No SCSI adapter: refused, but the CD is not what decides it.
            assert!(got.is_err(), "{device}: {got:?}");
            continue;
        }
        let names: Vec<String> = got.unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["d0", "floppy0"],
            "-device {device} turns the default CD off"
        );
    }
    // Its medium changes through HMP's `change`, as on QEMU.
    let mut scratch = PathBuf::new();
    let _qt = Qtest::start(env!("CARGO_BIN_EXE_qomvm"), "qomvm-ide-default-cd", |d| {
        scratch = d.to_path_buf();
        let qmp = format!("unix:{},server=on,wait=off", d.join("qmp.sock").display());
        vec!["-qmp".to_string(), qmp]
    });
    let mut qmp = QmpClient::connect(&scratch.join("qmp.sock"));
    let r = qmp.execute(
        "human-monitor-command",
        json!({"command-line": format!("change ide1-cd0 {iso}")}),
    );
    assert_eq!(r["return"], "", "{r}");
    assert_eq!(block_info(&mut qmp, "ide1-cd0")["inserted"]["file"], iso);
    let _ = std::fs::remove_dir_all(&dir);
}
