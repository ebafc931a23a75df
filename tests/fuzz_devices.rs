//! Device fuzzing over QEMU's qtest protocol (issue 19, item 5; QEMU's `generic-fuzz` is
//! the idea): a pc machine with a selection of devices plugged, their BARs programmed, then
//! random port, MMIO, PCI configuration and DMA-triggering sequences (virtqueues of random
//! descriptors, then a kick). After each case qomvm must still answer within a bound and
//! not have exited; at the end SIGTERM must end it with status 0.
//!
//! `QOMVM_FUZZ_SEED=N` and `QOMVM_FUZZ_ITERATIONS=N` (0: for ever) run it by hand.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use test_support::fuzz::{FuzzRun, Rng};

/// How long one request may take before the case counts as a hang.
const REPLY_BOUND: Duration = Duration::from_secs(10);
/// Guest RAM (`-m 64`).
const RAM_SIZE: u64 = 64 << 20;
/// Where the DMA sequences put their rings and buffers.
const RING_AREA: u64 = 0x10_0000;
const BUFFER_AREA: u64 = 0x20_0000;
const BUFFER_AREA_SIZE: u64 = 0x1_0000;

/// Ports of the pc board's own devices, where random accesses are worth more.
const BOARD_PORTS: &[(u16, u16)] = &[
    (0x20, 2),
    (0x40, 4),
    (0x60, 1),
    (0x64, 1),
    (0x70, 2),
    (0x80, 1),
    (0x92, 1),
    (0xa0, 2),
    (0xe0, 0x10),
    (0x2f8, 8),
    (0x3f8, 8),
    (0x4d0, 2),
    (0x505, 1),
    (0x510, 12),
    (0x600, 0x40),
    (0xb000, 0x40),
    (0xcf8, 8),
];

struct Qtest {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    dir: std::path::PathBuf,
    /// The requests of the current case, printed when it fails.
    log: Vec<String>,
    case: u64,
    seed: u64,
}

impl Qtest {
    fn start() -> Qtest {
        let dir = std::env::temp_dir().join(format!("qomvm-fuzz-devices-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let sock = dir.join("qtest.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
            .args([
                "-M",
                "pc",
                "-m",
                "64",
                "-display",
                "none",
                "-qtest-log",
                "none",
            ])
            .arg("-qtest")
            .arg(format!("unix:{}", sock.display()))
            // A guest power-off or panic pauses it instead of ending qomvm: a fuzzer may
            // ask for either, and both are a VM's ordinary life.
            .args(["-no-shutdown", "-action", "panic=none"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
            .args(["-device", "virtio-blk-pci,drive=d0"])
            .args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ])
            .args(["-device", "virtio-rng-pci", "-device", "virtio-balloon-pci"])
            .args(["-device", "pvpanic", "-device", "pvpanic-pci"])
            .args(["-device", "pc-testdev", "-device", "pci-testdev"])
            .args(["-device", "scratch"])
            .env("RUST_LOG", "off")
            .current_dir(&dir)
            .stdin(Stdio::null())
            // The serial ports' output (random bytes) is not the test's.
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "qomvm never connected");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(REPLY_BOUND)).unwrap();
        Qtest {
            child,
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            dir,
            log: Vec::new(),
            case: 0,
            seed: 0,
        }
    }

    /// Sends `request`, returns its reply; a missing reply (qomvm died or hung) fails the
    /// test with the case's requests.
    fn cmd(&mut self, request: String) -> String {
        let mut shown = request.clone();
        shown.truncate(200);
        self.log.push(shown);
        if let Err(e) = writeln!(self.writer, "{request}") {
            self.fail(&format!("cannot send: {e}"));
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => self.fail("qomvm closed the connection"),
            Ok(_) => line.trim_end().to_string(),
            Err(e) => self.fail(&format!("no reply within {REPLY_BOUND:?}: {e}")),
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        let status = self.child.try_wait().ok().flatten();
        // By hand: QOMVM_FUZZ_STACKS=FILE writes every qomvm thread's stack there (gdb) on
        // a failure, which is what a hang needs.
        if let Ok(file) = std::env::var("QOMVM_FUZZ_STACKS") {
            let pid = self.child.id().to_string();
            if let Ok(out) = std::fs::File::create(file) {
                let _ = Command::new("gdb")
                    .args(["-p", &pid, "-batch", "-ex", "thread apply all bt"])
                    .stdout(out)
                    .status();
            }
        }
        let _ = self.child.kill();
        let tail = self.log.len().saturating_sub(60);
        panic!(
            "case {} (seed {:#x}): {why} (qomvm exit status: {status:?}); the case's last \
             requests:\n{}",
            self.case,
            self.seed,
            self.log[tail..].join("\n")
        );
    }

    fn value(&mut self, request: String) -> u64 {
        let reply = self.cmd(request.clone());
        reply
            .strip_prefix("OK 0x")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or_else(|| self.fail(&format!("{request}: {reply}")))
    }

    fn pci_address(devfn: u32, reg: u32) -> u32 {
        0x8000_0000 | (devfn << 8) | (reg & 0xfc)
    }

    fn pci_read32(&mut self, devfn: u32, reg: u32) -> u32 {
        self.cmd(format!("outl 0xcf8 {:#x}", Self::pci_address(devfn, reg)));
        self.value("inl 0xcfc".into()) as u32
    }

    fn pci_write32(&mut self, devfn: u32, reg: u32, value: u32) {
        self.cmd(format!("outl 0xcf8 {:#x}", Self::pci_address(devfn, reg)));
        self.cmd(format!("outl 0xcfc {value:#x}"));
    }

    /// qomvm answers and has not exited.
    fn check_alive(&mut self) {
        let reply = self.cmd("endianness".into());
        if reply != "OK little" {
            self.fail(&format!("endianness: {reply}"));
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.fail(&format!("qomvm exited: {status}"));
        }
    }
}

impl Drop for Qtest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PCI function found on bus 0, with the BARs the fuzzer gave it.
#[derive(Debug)]
struct PciFunction {
    devfn: u32,
    vendor_device: u32,
    /// (is I/O, base, size)
    bars: Vec<(bool, u64, u64)>,
}

impl PciFunction {
    /// A legacy virtio device's I/O BAR 0 (QEMU's pc virtio-pci devices are transitional).
    fn virtio_legacy_io(&self) -> Option<u16> {
        let vendor = self.vendor_device & 0xffff;
        let device = self.vendor_device >> 16;
        if vendor != 0x1af4 || !(0x1000..0x1040).contains(&device) {
            return None;
        }
        self.bars.iter().find(|b| b.0).map(|b| b.1 as u16)
    }
}

/// Enumerates bus 0, sizes every BAR and gives it an address (I/O from 0xc000, memory from
/// 0xe0000000), and enables I/O, memory and bus mastering, as firmware would.
fn program_bars(qt: &mut Qtest) -> Vec<PciFunction> {
    let mut functions = Vec::new();
    let mut next_io: u64 = 0xc000;
    let mut next_mem: u64 = 0xe000_0000;
    for devfn in 0..256 {
        let id = qt.pci_read32(devfn, 0);
        if id & 0xffff == 0xffff || id == 0 {
            continue;
        }
        let mut bars = Vec::new();
        let mut bar = 0;
        while bar < 6 {
            let reg = 0x10 + 4 * bar;
            qt.pci_write32(devfn, reg, 0xffff_ffff);
            let probe = qt.pci_read32(devfn, reg);
            if probe == 0 || probe == 0xffff_ffff {
                bar += 1;
                continue;
            }
            if probe & 1 == 1 {
                let size = u64::from((!(probe & !3) & 0xffff) + 1);
                next_io = next_io.div_ceil(size) * size;
                qt.pci_write32(devfn, reg, next_io as u32);
                bars.push((true, next_io, size));
                next_io += size;
                bar += 1;
            } else {
                let is_64 = probe & 6 == 4;
                let size = u64::from((!(probe & !0xf)).wrapping_add(1)).max(16);
                next_mem = next_mem.div_ceil(size) * size;
                qt.pci_write32(devfn, reg, next_mem as u32);
                if is_64 {
                    qt.pci_write32(devfn, reg + 4, 0);
                }
                bars.push((false, next_mem, size));
                next_mem += size;
                bar += if is_64 { 2 } else { 1 };
            }
        }
        let command = qt.pci_read32(devfn, 4);
        qt.pci_write32(devfn, 4, (command & 0xffff_0000) | 7);
        functions.push(PciFunction {
            devfn,
            vendor_device: id,
            bars,
        });
    }
    functions
}

fn random_port(rng: &mut Rng, functions: &[PciFunction]) -> u16 {
    match rng.below(4) {
        0 => rng.below(0x1_0000) as u16,
        1 => {
            let (base, len) = *rng.pick(BOARD_PORTS);
            base + rng.below(u64::from(len)) as u16
        }
        _ => {
            let io: Vec<_> = functions
                .iter()
                .flat_map(|f| f.bars.iter().filter(|b| b.0))
                .collect();
            if io.is_empty() {
                return rng.below(0x1_0000) as u16;
            }
            let (_, base, size) = **rng.pick(&io);
            (base + rng.below(size)) as u16
        }
    }
}

fn random_mmio_address(rng: &mut Rng, functions: &[PciFunction]) -> u64 {
    match rng.below(6) {
        // The PCI hole, the I/O APIC, HPET, the local APIC and the BIOS.
        0 => 0xe000_0000 + rng.below(0x2000_0000),
        1 => *rng.pick(&[0xfec0_0000, 0xfed0_0000, 0xfee0_0000, 0xfffc_0000]) + rng.below(0x400),
        2 => rng.below(RAM_SIZE),
        _ => {
            let mem: Vec<_> = functions
                .iter()
                .flat_map(|f| f.bars.iter().filter(|b| !b.0))
                .collect();
            if mem.is_empty() {
                return 0xe000_0000 + rng.below(0x1000_0000);
            }
            let (_, base, size) = **rng.pick(&mem);
            base + rng.below(size)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A virtqueue of random descriptors behind a legacy virtio device, then a kick: the
/// device's DMA path on a hostile ring (chains out of range, loops, indirect tables, zero
/// and huge lengths, random request headers in the buffers).
fn dma_sequence(qt: &mut Qtest, rng: &mut Rng, io: u16) {
    // Buffers full of random bytes: request headers, frames, anything.
    let data = rng.bytes(4096);
    let at = BUFFER_AREA + rng.below(BUFFER_AREA_SIZE / 4096) * 4096;
    qt.cmd(format!("write {at:#x} {:#x} {}", data.len(), hex(&data)));

    let queue = rng.below(4) as u16;
    qt.cmd(format!("outw {:#x} {queue:#x}", io + 0x0e));
    let size = qt.value(format!("inw {:#x}", io + 0x0c)) as u64;
    if size == 0 || size > 1024 {
        return;
    }
    let ring = RING_AREA + rng.below(8) * 0x1_0000;
    let mut descriptors = Vec::with_capacity(16 * size as usize);
    for _ in 0..size {
        let addr = match rng.below(8) {
            0 => rng.interesting_u64(),
            1 => RAM_SIZE - rng.below(64),
            _ => BUFFER_AREA + rng.below(BUFFER_AREA_SIZE),
        };
        let len = match rng.below(6) {
            0 => 0,
            1 => rng.interesting_u64() as u32,
            _ => rng.below(4096) as u32,
        };
        // NEXT, WRITE, INDIRECT in any mix.
        let flags = rng.below(8) as u16;
        let next = if rng.one_in(8) {
            rng.next_u32() as u16
        } else {
            rng.below(size) as u16
        };
        descriptors.extend_from_slice(&addr.to_le_bytes());
        descriptors.extend_from_slice(&len.to_le_bytes());
        descriptors.extend_from_slice(&flags.to_le_bytes());
        descriptors.extend_from_slice(&next.to_le_bytes());
    }
    qt.cmd(format!(
        "write {ring:#x} {:#x} {}",
        descriptors.len(),
        hex(&descriptors)
    ));
    // The available ring: flags, idx, then heads.
    let avail = ring + 16 * size;
    let idx: u16 = if rng.one_in(6) {
        rng.next_u32() as u16
    } else {
        1 + rng.below(size.min(8)) as u16
    };
    let mut ring_bytes = vec![0u8, 0];
    ring_bytes.extend_from_slice(&idx.to_le_bytes());
    for _ in 0..size.min(8) {
        let head = if rng.one_in(8) {
            rng.next_u32() as u16
        } else {
            rng.below(size) as u16
        };
        ring_bytes.extend_from_slice(&head.to_le_bytes());
    }
    qt.cmd(format!(
        "write {avail:#x} {:#x} {}",
        ring_bytes.len(),
        hex(&ring_bytes)
    ));

    if rng.one_in(4) {
        // Start from a reset device now and then.
        qt.cmd(format!("outb {:#x} 0", io + 0x12));
    }
    qt.cmd(format!("outb {:#x} 3", io + 0x12));
    let features = qt.value(format!("inl {:#x}", io)) as u32;
    let wanted = if rng.one_in(4) {
        rng.next_u32()
    } else {
        features & rng.next_u32()
    };
    qt.cmd(format!("outl {:#x} {wanted:#x}", io + 0x04));
    qt.cmd(format!("outl {:#x} {:#x}", io + 0x08, ring >> 12));
    qt.cmd(format!("outb {:#x} 7", io + 0x12));
    for _ in 0..=rng.below(3) {
        qt.cmd(format!("outw {:#x} {queue:#x}", io + 0x10));
    }
    // The ISR (read clears it), and sometimes the device's status after the kick.
    qt.cmd(format!("inb {:#x}", io + 0x13));
    if rng.one_in(2) {
        qt.cmd(format!("inb {:#x}", io + 0x12));
    }
}

fn random_access(qt: &mut Qtest, rng: &mut Rng, functions: &[PciFunction]) {
    const OUT: [&str; 3] = ["outb", "outw", "outl"];
    const IN: [&str; 3] = ["inb", "inw", "inl"];
    const WRITE: [&str; 4] = ["writeb", "writew", "writel", "writeq"];
    const READ: [&str; 4] = ["readb", "readw", "readl", "readq"];
    match rng.below(20) {
        0..=4 => {
            let port = random_port(rng, functions);
            let value = rng.interesting_u64() as u32;
            qt.cmd(format!("{} {port:#x} {value:#x}", rng.pick(&OUT)));
        }
        5..=7 => {
            let port = random_port(rng, functions);
            qt.cmd(format!("{} {port:#x}", rng.pick(&IN)));
        }
        8..=11 => {
            let addr = random_mmio_address(rng, functions);
            let value = rng.interesting_u64();
            let op = rng.pick(&WRITE);
            let value = match *op {
                "writeb" => value & 0xff,
                "writew" => value & 0xffff,
                "writel" => value & 0xffff_ffff,
                _ => value,
            };
            qt.cmd(format!("{op} {addr:#x} {value:#x}"));
        }
        12..=13 => {
            let addr = random_mmio_address(rng, functions);
            qt.cmd(format!("{} {addr:#x}", rng.pick(&READ)));
        }
        14..=16 => {
            // PCI configuration: mostly the functions that exist, any register (BARs,
            // command, capabilities: MSI-X, virtio's), any width.
            let devfn = if rng.one_in(8) || functions.is_empty() {
                rng.below(256) as u32
            } else {
                rng.pick(functions).devfn
            };
            let reg = rng.below(256) as u32;
            qt.cmd(format!("outl 0xcf8 {:#x}", Qtest::pci_address(devfn, reg)));
            let port = 0xcfc + (reg & 3);
            let value = rng.interesting_u64() as u32;
            if rng.one_in(3) {
                qt.cmd(format!("{} {port:#x}", rng.pick(&IN)));
            } else {
                qt.cmd(format!("{} {port:#x} {value:#x}", rng.pick(&OUT)));
            }
        }
        17 => {
            let ns = rng.below(10_000_000);
            qt.cmd(format!("clock_step {ns}"));
        }
        _ => {
            let virtio: Vec<u16> = functions
                .iter()
                .filter_map(|f| f.virtio_legacy_io())
                .collect();
            if !virtio.is_empty() {
                let io = *rng.pick(&virtio);
                dma_sequence(qt, rng, io);
            }
        }
    }
}

#[test]
fn random_port_mmio_pci_and_dma_sequences_leave_qomvm_answering() {
    let run = FuzzRun::from_env(0x1951_0005, 1500);
    let started = Instant::now();
    let mut qt = Qtest::start();
    qt.seed = run.seed;
    let functions = program_bars(&mut qt);
    let names: Vec<String> = functions
        .iter()
        .map(|f| {
            format!(
                "{:02x}.{} {:08x}",
                f.devfn >> 3,
                f.devfn & 7,
                f.vendor_device
            )
        })
        .collect();
    // The plugged devices are there: virtio-blk, -net, -balloon, -rng (legacy ids), and
    // their BARs have addresses.
    for device in [0x1001_1af4u32, 0x1000_1af4, 0x1002_1af4, 0x1005_1af4] {
        assert!(
            functions
                .iter()
                .any(|f| f.vendor_device == device && !f.bars.is_empty()),
            "{device:08x} not found: {names:?}"
        );
    }
    let mut cases = 0;
    for case in run.cases() {
        let mut rng = run.rng_for(case);
        qt.log.clear();
        qt.case = case;
        // Some cases program the BARs again: a machine reset or random configuration
        // writes may have moved or disabled them.
        let functions = if rng.one_in(25) {
            program_bars(&mut qt)
        } else {
            functions
                .iter()
                .map(|f| PciFunction {
                    bars: f.bars.clone(),
                    ..*f
                })
                .collect()
        };
        for _ in 0..32 {
            random_access(&mut qt, &mut rng, &functions);
        }
        qt.check_alive();
        cases += 1;
    }
    // SIGTERM ends the VM as QEMU does, with status 0.
    // SAFETY: kill(2) of our own child, which has not been waited for.
    assert_eq!(
        unsafe { libc::kill(qt.child.id() as i32, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = qt.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "qomvm ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "SIGTERM after the fuzzing");
    println!(
        "{cases} cases (seed {:#x}) in {:.1} s on {names:?}",
        run.seed,
        started.elapsed().as_secs_f64()
    );
}
