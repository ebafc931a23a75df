//! A client of QEMU's qtest protocol for the fuzz tests (`tests/fuzz_devices.rs`,
//! `tests/fuzz_virtqueues.rs`): qomvm connects to a socket the test listens on; a request
//! without a reply within the bound (a hang) or a closed connection (a panic, an exit)
//! fails the test with the case's last requests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one request may take before the case counts as a hang.
pub const REPLY_BOUND: Duration = Duration::from_secs(10);

pub struct Qtest {
    pub child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    dir: std::path::PathBuf,
    /// The requests of the current case, printed when it fails.
    pub log: Vec<String>,
    pub case: u64,
    pub seed: u64,
}

impl Qtest {
    /// [`Qtest::start`] with a QMP socket in the scratch directory and `extra` arguments:
    /// the machine, a client on its QMP socket, and the directory.
    pub fn start_with_qmp(
        qomvm: &str,
        name: &str,
        extra: &[&str],
    ) -> (Qtest, crate::qmp::QmpClient, std::path::PathBuf) {
        Qtest::start_with_qmp_env(qomvm, name, &[], extra)
    }

    /// [`Qtest::start_with_qmp`] with environment variables `env` set for qomvm (`TZ`).
    pub fn start_with_qmp_env(
        qomvm: &str,
        name: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> (Qtest, crate::qmp::QmpClient, std::path::PathBuf) {
        let mut dir = std::path::PathBuf::new();
        let qt = Qtest::start_env(qomvm, name, env, |d| {
            dir = d.to_path_buf();
            let mut args = vec![
                "-qmp".to_string(),
                format!("unix:{},server=on,wait=off", d.join("qmp.sock").display()),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            args
        });
        let qmp = crate::qmp::QmpClient::connect(&dir.join("qmp.sock"));
        (qt, qmp, dir)
    }

    /// Starts `qomvm` on `-M pc -m 64` with `-qtest` on a socket of a fresh scratch
    /// directory `name`, a guest power-off or panic pausing it (a fuzzer may ask for
    /// either, and both are a VM's ordinary life), plus the arguments `args` returns for
    /// that directory (where it may put images first).
    pub fn start(qomvm: &str, name: &str, args: impl FnOnce(&Path) -> Vec<String>) -> Qtest {
        Qtest::start_env(qomvm, name, &[], args)
    }

    /// [`Qtest::start`] with environment variables `env` set for qomvm.
    pub fn start_env(
        qomvm: &str,
        name: &str,
        env: &[(&str, &str)],
        args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Qtest {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qtest.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let extra = args(&dir);
        let mut child = Command::new(qomvm)
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
            .args(["-no-shutdown", "-action", "panic=none"])
            .args(extra)
            .env("RUST_LOG", "off")
            .envs(env.iter().copied())
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
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("qomvm exited ({status}) before connecting");
                    }
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
    pub fn cmd(&mut self, request: String) -> String {
        let mut shown = request.clone();
        shown.truncate(200);
        self.log.push(shown);
        if let Err(e) = writeln!(self.writer, "{request}") {
            self.fail(&format!("cannot send: {e}"));
        }
        self.next_line()
    }

    fn next_line(&mut self) -> String {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => self.fail("qomvm closed the connection"),
            Ok(_) => line.trim_end().to_string(),
            Err(e) => self.fail(&format!("no reply within {REPLY_BOUND:?}: {e}")),
        }
    }

    /// [`Qtest::cmd`] with interrupt interception on (`irq_intercept_in ioapic`): the
    /// reply, and the `IRQ raise N` / `IRQ lower N` lines that came before it.
    pub fn cmd_irqs(&mut self, request: String) -> (String, Vec<String>) {
        let mut irqs = Vec::new();
        let mut reply = self.cmd(request);
        while reply.starts_with("IRQ ") {
            irqs.push(reply);
            reply = self.next_line();
        }
        (reply, irqs)
    }

    /// Collects the `IRQ` lines that arrive (asking `endianness` every few milliseconds)
    /// until `enough` says so or `timeout` passes; returns them all.
    pub fn wait_irqs(
        &mut self,
        timeout: Duration,
        enough: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut all = Vec::new();
        loop {
            let (reply, irqs) = self.cmd_irqs("endianness".into());
            if reply != "OK little" {
                self.fail(&format!("endianness: {reply}"));
            }
            all.extend(irqs);
            if enough(&all) || Instant::now() >= deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn fail(&mut self, why: &str) -> ! {
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

    pub fn value(&mut self, request: String) -> u64 {
        let reply = self.cmd(request.clone());
        reply
            .strip_prefix("OK 0x")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or_else(|| self.fail(&format!("{request}: {reply}")))
    }

    /// `len` bytes of guest memory at `addr` (qtest's `read`).
    pub fn read_bytes(&mut self, addr: u64, len: usize) -> Vec<u8> {
        let reply = self.cmd(format!("read {addr:#x} {len:#x}"));
        let bytes = reply.strip_prefix("OK 0x").and_then(|hex| {
            (0..len)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()
        });
        bytes.unwrap_or_else(|| self.fail(&format!("read {addr:#x} {len:#x}: {reply}")))
    }

    /// Reads fw_cfg file `name` through the selector and data ports, as firmware does.
    pub fn fw_cfg_file(&mut self, name: &str) -> Option<Vec<u8>> {
        fw_cfg_file_with(name, |key, n| {
            self.cmd(format!("outw 0x510 {key:#x}"));
            (0..n)
                .map(|_| self.value("inb 0x511".into()) as u8)
                .collect()
        })
    }

    pub fn pci_address(devfn: u32, reg: u32) -> u32 {
        0x8000_0000 | (devfn << 8) | (reg & 0xfc)
    }

    pub fn pci_read32(&mut self, devfn: u32, reg: u32) -> u32 {
        self.cmd(format!("outl 0xcf8 {:#x}", Self::pci_address(devfn, reg)));
        self.value("inl 0xcfc".into()) as u32
    }

    pub fn pci_write32(&mut self, devfn: u32, reg: u32, value: u32) {
        self.cmd(format!("outl 0xcf8 {:#x}", Self::pci_address(devfn, reg)));
        self.cmd(format!("outl 0xcfc {value:#x}"));
    }

    /// qomvm answers and has not exited.
    pub fn check_alive(&mut self) {
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
pub struct PciFunction {
    pub devfn: u32,
    pub vendor_device: u32,
    /// (is I/O, base, size)
    pub bars: Vec<(bool, u64, u64)>,
}

impl PciFunction {
    /// A legacy virtio device's I/O BAR 0 (QEMU's pc virtio-pci devices are transitional).
    pub fn virtio_legacy_io(&self) -> Option<u16> {
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
pub fn program_bars(qt: &mut Qtest) -> Vec<PciFunction> {
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

/// `0x` and the bytes in hex, as qtest's `write` takes them.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Fw_cfg file `name`, found in the file directory (item 0x19) as firmware does, through
/// `read(key, n)`, which reads `n` bytes of item `key` (the selector and data ports).
pub fn fw_cfg_file_with(
    name: &str,
    mut read: impl FnMut(u16, usize) -> Vec<u8>,
) -> Option<Vec<u8>> {
    let count = u32::from_be_bytes(read(0x19, 4).try_into().ok()?) as usize;
    let dir = read(0x19, 4 + 64 * count);
    let (key, size) = dir[4..].chunks(64).find_map(|e| {
        let file = String::from_utf8_lossy(&e[8..])
            .trim_end_matches('\0')
            .to_string();
        (file == name).then(|| {
            let size = u32::from_be_bytes([e[0], e[1], e[2], e[3]]) as usize;
            (u16::from_be_bytes([e[4], e[5]]), size)
        })
    })?;
    Some(read(key, size))
}
