//! QEMU's qtest protocol (`system/qtest.c`) on `-qtest CHARDEV`: a line-based test driver
//! for the machine's buses, as QEMU's `libqtest` speaks it, so that test programs written
//! for QEMU drive qomvm unchanged.
//!
//! Requests, one per line, words separated by single spaces; numbers as C's `strtoul`
//! reads them (`0x` hex, leading `0` octal, else decimal):
//! `outb|outw|outl ADDR VALUE`, `inb|inw|inl ADDR` (`OK 0x%04x`), `writeb|w|l|q ADDR
//! VALUE`, `readb|w|l|q ADDR` (`OK 0x%016x`), `read ADDR SIZE` (`OK 0xHEX`), `write ADDR
//! SIZE 0xHEX`, `b64read ADDR SIZE`, `b64write ADDR SIZE B64`, `memset ADDR SIZE VALUE`,
//! `endianness`, `irq_intercept_in|out QOM-PATH`, `set_irq_in QOM-PATH NAME NUM LEVEL`,
//! `clock_step [NS]`, `clock_set NS`. Replies are `OK[ VALUE]` or `FAIL reason`; with an
//! interception on, `IRQ raise N` / `IRQ lower N` lines come whenever a level changes.
//!
//! Memory accesses go where the first CPU's would: guest RAM directly, everything else to
//! the system memory space's devices in accesses of up to 8 bytes (as QEMU splits them).
//! Interrupts: the pc board's lines all end at the accelerator's GSIs (the in-kernel
//! IOAPIC's inputs under KVM), so `ioapic` (or any path to the board's IOAPIC or the
//! machine) intercepts GSI levels, numbered as GSIs.
//!
//! Where qomvm differs, the reply says so in one `FAIL` line: its virtual clock runs in
//! host time while the VM runs (QEMU's qtest steps it), so `clock_step`/`clock_set` fail; only the interrupt
//! controller's inputs can be intercepted. Malformed requests, which QEMU's server
//! asserts on, get `FAIL` too: the protocol's input cannot end qomvm.
//!
//! `-qtest-log FILE` records the conversation as QEMU does (`[R +T] request`,
//! `[S +T] reply`); without it the log goes to stderr, as in QEMU; `none` turns it off.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use hw::core::machine::machine_state;
use hw::core::services::MachineServices;
use parking_lot::Mutex;
use qom::ObjectRef;

use crate::monitor::chardev::{self, Backend, Connection};

/// The largest `read`/`write`/`memset`/`b64*` a request may ask for: what a test needs,
/// and a bound on what a request can make qomvm allocate.
const MAX_TRANSFER: u64 = 64 << 20;

/// Why `-qtest` could not start.
#[derive(Debug, thiserror::Error)]
pub enum QtestError {
    /// QEMU's wording for a backend it cannot open.
    #[error("Failed to initialize device for qtest: \"{spec}\": {reason}")]
    Backend {
        /// The `-qtest` argument.
        spec: String,
        /// What went wrong.
        reason: String,
    },
    /// `-qtest-log` names a file that cannot be created.
    #[error("could not open qtest log {path}: {source}")]
    Log {
        /// The file.
        path: String,
        /// The error.
        source: io::Error,
    },
}

/// Where replies and interrupt lines go; shared with the interrupt listener.
type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

/// The log (QEMU's `qtest_log_fp`), with its start time.
struct Log {
    out: Mutex<Box<dyn Write + Send>>,
    start: Instant,
}

impl Log {
    fn line(&self, tag: char, text: &str) {
        let t = self.start.elapsed().as_secs_f64();
        let _ = write!(self.out.lock(), "[{tag} +{t:.6}] {text}");
    }
}

/// One protocol endpoint: the machine it drives and where its replies go.
struct Server {
    services: Arc<MachineServices>,
    machine: ObjectRef,
    writer: Writer,
    log: Option<Arc<Log>>,
    intercepting: Mutex<Option<ObjectRef>>,
}

/// QEMU's `qtest_server_init`: opens `spec` (`unix:PATH` connects, as libqtest listens;
/// `unix:PATH,server=on` listens; `stdio`) and serves the protocol on it.
pub fn qtest_init(spec: &str, log: Option<&str>, machine: &ObjectRef) -> Result<(), QtestError> {
    let backend_error = |reason: String| QtestError::Backend {
        spec: spec.to_string(),
        reason,
    };
    let log = match log {
        Some("none") => None,
        Some(path) => Some(
            Box::new(File::create(path).map_err(|source| QtestError::Log {
                path: path.to_string(),
                source,
            })?) as Box<dyn Write + Send>,
        ),
        None => Some(Box::new(io::stderr()) as Box<dyn Write + Send>),
    }
    .map(|out| {
        Arc::new(Log {
            out: Mutex::new(out),
            start: Instant::now(),
        })
    });
    let services = machine_state(machine)
        .ok_or_else(|| backend_error("no machine".into()))?
        .services()
        .clone();
    let start = {
        let machine = machine.clone();
        move |conn: Connection| {
            let server = Arc::new(Server {
                services: services.clone(),
                machine: machine.clone(),
                writer: Arc::new(Mutex::new(conn.writer)),
                log: log.clone(),
                intercepting: Mutex::new(None),
            });
            server.run(conn.reader);
        }
    };
    // libqtest listens and QEMU connects: a unix socket without server=on is a client.
    if let Some(path) = spec.strip_prefix("unix:").filter(|p| !p.contains(',')) {
        let stream = UnixStream::connect(path).map_err(|e| backend_error(e.to_string()))?;
        let reader = stream
            .try_clone()
            .map_err(|e| backend_error(e.to_string()))?;
        let shutdown_handle = stream
            .try_clone()
            .map_err(|e| backend_error(e.to_string()))?;
        let conn = Connection {
            reader: Box::new(reader),
            writer: Box::new(stream),
            shutdown: Arc::new(move || {
                let _ = shutdown_handle.shutdown(std::net::Shutdown::Both);
            }),
            is_socket: true,
            fds: None,
        };
        std::thread::Builder::new()
            .name("qtest".into())
            .spawn(move || start(conn))
            .map_err(|e| backend_error(e.to_string()))?;
        return Ok(());
    }
    let backend = chardev::parse(spec).map_err(|e| backend_error(e.to_string()))?;
    if backend == Backend::Null {
        return Err(backend_error(
            "qtest needs a character device to talk on".into(),
        ));
    }
    chardev::serve("qtest", &backend, Arc::new(start)).map_err(|e| backend_error(e.to_string()))?;
    Ok(())
}

impl Server {
    fn run(self: Arc<Self>, reader: Box<dyn io::Read + Send>) {
        let mut lines = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                break; // a request cut short by the end of the stream
            }
            line.pop();
            let text = String::from_utf8_lossy(&line);
            let words: Vec<&str> = text.split(' ').collect();
            if let Some(log) = &self.log {
                log.line('R', &format!("{text}\n"));
            }
            let reply = self.process(&words);
            self.send(&reply);
        }
    }

    fn send(&self, text: &str) {
        if let Some(log) = &self.log {
            log.line('S', text);
        }
        let mut w = self.writer.lock();
        let _ = w.write_all(text.as_bytes());
        let _ = w.flush();
    }

    /// One request's reply, newline included.
    fn process(self: &Arc<Self>, words: &[&str]) -> String {
        match self.command(words) {
            Ok(reply) => reply,
            Err(reason) => format!("FAIL {reason}\n"),
        }
    }

    fn command(self: &Arc<Self>, words: &[&str]) -> Result<String, String> {
        let arg = |i: usize| -> Result<&str, String> {
            words
                .get(i)
                .copied()
                .filter(|w| !w.is_empty())
                .ok_or_else(|| format!("'{}' needs more arguments", words[0]))
        };
        let num = |i: usize| -> Result<u64, String> {
            let w = arg(i)?;
            crate::options::strtou64(w).ok_or_else(|| format!("'{w}' is not a number"))
        };
        let io = self.services.system_io();
        match words[0] {
            "outb" | "outw" | "outl" => {
                let (addr, value) = (port(num(1)?)?, num(2)?);
                io.write(addr, value, access_size(words[0], 3)?);
                Ok("OK\n".into())
            }
            "inb" | "inw" | "inl" => {
                let addr = port(num(1)?)?;
                let value = io.read(addr, access_size(words[0], 2)?);
                Ok(format!("OK 0x{value:04x}\n"))
            }
            "writeb" | "writew" | "writel" | "writeq" => {
                let (addr, value) = (num(1)?, num(2)?);
                let size = access_size(words[0], 5)? as usize;
                self.services
                    .write_physical(addr, &value.to_le_bytes()[..size]);
                Ok("OK\n".into())
            }
            "readb" | "readw" | "readl" | "readq" => {
                let addr = num(1)?;
                let size = access_size(words[0], 4)? as usize;
                let mut bytes = [0u8; 8];
                self.services.read_physical(addr, &mut bytes[..size]);
                Ok(format!("OK 0x{:016x}\n", u64::from_le_bytes(bytes)))
            }
            "read" | "b64read" => {
                let (addr, len) = (num(1)?, transfer_len(num(2)?)?);
                if len == 0 {
                    return Err("a read of 0 bytes".into());
                }
                let mut data = vec![0u8; len];
                self.services.read_physical(addr, &mut data);
                Ok(if words[0] == "read" {
                    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
                    format!("OK 0x{hex}\n")
                } else {
                    format!("OK {}\n", base64_encode(&data))
                })
            }
            "write" => {
                let (addr, len) = (num(1)?, transfer_len(num(2)?)?);
                let hex = arg(3)?;
                if hex.len() < 3 {
                    return Ok("ERR invalid argument size\n".into());
                }
                // Missing digits read as zeros, as QEMU's server fills them.
                let digits = hex.as_bytes().get(2..).unwrap_or_default();
                let data: Vec<u8> = (0..len)
                    .map(|i| {
                        let nib = |j: usize| digits.get(j).and_then(|&c| (c as char).to_digit(16));
                        match (nib(2 * i), nib(2 * i + 1)) {
                            (Some(h), Some(l)) => (h << 4 | l) as u8,
                            _ => 0,
                        }
                    })
                    .collect();
                self.services.write_physical(addr, &data);
                Ok("OK\n".into())
            }
            "b64write" => {
                let (addr, len) = (num(1)?, transfer_len(num(2)?)?);
                let text = arg(3)?;
                if text.len() < 3 {
                    return Ok("ERR invalid argument size\n".into());
                }
                let mut data = base64_decode(text).ok_or("invalid base64 data")?;
                data.resize(len, 0);
                self.services.write_physical(addr, &data);
                Ok("OK\n".into())
            }
            "memset" => {
                let (addr, len, value) = (num(1)?, transfer_len(num(2)?)?, num(3)?);
                if len > 0 {
                    self.services.write_physical(addr, &vec![value as u8; len]);
                }
                Ok("OK\n".into())
            }
            "endianness" => Ok("OK little\n".into()),
            "irq_intercept_in" | "irq_intercept_out" => self.intercept(arg(1)?),
            "set_irq_in" => {
                let path = arg(1)?;
                let (_name, line, level) = (arg(2)?, num(3)?, num(4)?);
                self.interrupt_controller(path)?;
                let ops = self
                    .services
                    .accel_ops()
                    .ok_or("the machine has no accelerator")?;
                ops.set_irq(u32::try_from(line).map_err(|_| "no such line")?, level != 0);
                Ok("OK\n".into())
            }
            "clock_step" | "clock_set" => Err(format!(
                "{}: qomvm's virtual clock runs in host time and cannot be stepped",
                words[0]
            )),
            other => Err(format!("Unknown command '{other}'")),
        }
    }

    /// `irq_intercept_in/out PATH`: from now on every GSI level change is reported.
    fn intercept(self: &Arc<Self>, path: &str) -> Result<String, String> {
        let dev = self.interrupt_controller(path)?;
        let mut current = self.intercepting.lock();
        if let Some(existing) = &*current {
            return if Arc::ptr_eq(existing, &dev) {
                Ok("OK\n".into())
            } else {
                Err("IRQ intercept already enabled".into())
            };
        }
        let ops = self
            .services
            .accel_ops()
            .ok_or("the machine has no accelerator")?;
        let qtest = ops
            .as_any()
            .downcast_ref::<accel::qtest::QtestOps>()
            .ok_or(
                "No intercepts installed: interrupts can be intercepted under -accel qtest only",
            )?;
        let writer = Arc::clone(&self.writer);
        let log = self.log.clone();
        qtest.set_irq_listener(Box::new(move |gsi, level| {
            let line = format!("IRQ {} {gsi}\n", if level { "raise" } else { "lower" });
            if let Some(log) = &log {
                log.line('S', &line);
            }
            let mut w = writer.lock();
            let _ = w.write_all(line.as_bytes());
            let _ = w.flush();
        }));
        *current = Some(dev);
        Ok("OK\n".into())
    }

    /// The object at `path`, which must be where the board's interrupts end: an IOAPIC or
    /// the machine itself.
    fn interrupt_controller(&self, path: &str) -> Result<ObjectRef, String> {
        // QEMU's pc has its IOAPIC at /machine/ioapic; qomvm's is KVM's in-kernel one, with
        // no object of its own: its inputs are the machine's GSIs.
        if matches!(path, "ioapic" | "/machine/ioapic") {
            return Ok(self.machine.clone());
        }
        let root = qom::object_get_root();
        let dev = qom::resolve_path(&root, path).map_err(|_| "Unknown device".to_string())?;
        let is_ioapic = dev.type_name().contains("ioapic") || path.ends_with("ioapic");
        if is_ioapic || Arc::ptr_eq(&dev, &self.machine) {
            Ok(dev)
        } else {
            Err(
                "No intercepts installed: qomvm intercepts the interrupt controller's inputs only"
                    .into(),
            )
        }
    }
}

/// The access size a command's letter at `index` names (`b`, `w`, `l`, `q`).
fn access_size(command: &str, index: usize) -> Result<u32, String> {
    match command.as_bytes().get(index) {
        Some(b'b') => Ok(1),
        Some(b'w') => Ok(2),
        Some(b'l') => Ok(4),
        Some(b'q') => Ok(8),
        _ => Err(format!("Unknown command '{command}'")),
    }
}

fn port(addr: u64) -> Result<u64, String> {
    if addr > 0xffff {
        return Err(format!("port 0x{addr:x} is beyond 0xffff"));
    }
    Ok(addr)
}

fn transfer_len(len: u64) -> Result<usize, String> {
    if len > MAX_TRANSFER {
        return Err(format!(
            "{len} bytes is more than qtest transfers at once ({MAX_TRANSFER})"
        ));
    }
    Ok(len as usize)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        if c == b'=' {
            break;
        }
        let v = BASE64.iter().position(|&b| b == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_strtoul_reads_them() {
        assert_eq!(crate::options::strtou64("0x3f8"), Some(0x3f8));
        assert_eq!(crate::options::strtou64("010"), Some(8));
        assert_eq!(crate::options::strtou64("0"), Some(0));
        assert_eq!(crate::options::strtou64("42"), Some(42));
        assert_eq!(crate::options::strtou64("-1"), Some(u64::MAX));
        assert_eq!(crate::options::strtou64("0xg"), None);
        assert_eq!(crate::options::strtou64(""), None);
    }

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\x00\xff\x10qomvm"] {
            assert_eq!(base64_decode(&base64_encode(data)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert!(base64_decode("Zm9v!").is_none());
    }
}
