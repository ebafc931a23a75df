//! QEMU's qtest protocol on `-qtest unix:PATH` (qomvm connects to a socket the test
//! listens on, as with QEMU's libqtest): port and memory accesses, bulk transfers in hex and
//! base64, interrupt interception, and QEMU's replies to what qomvm lacks or cannot parse.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Qtest {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    dir: std::path::PathBuf,
}

impl Qtest {
    fn start(name: &str) -> Qtest {
        let dir = std::env::temp_dir().join(format!("qomvm-qtest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qtest.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
            .args(["-M", "pc", "-display", "none", "-qtest-log", "none"])
            .arg("-qtest")
            .arg(format!("unix:{}", sock.display()))
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // qomvm connects once the machine is built; a qomvm that failed never does.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
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
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Qtest {
            child,
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            dir,
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a reply");
        line.trim_end_matches('\n').to_string()
    }

    /// Sends `request`; returns the reply and the interrupt lines that came before it.
    fn cmd(&mut self, request: &str) -> (String, Vec<String>) {
        writeln!(self.writer, "{request}").unwrap();
        let mut irqs = Vec::new();
        loop {
            let line = self.line();
            if line.starts_with("IRQ ") {
                irqs.push(line);
            } else {
                return (line, irqs);
            }
        }
    }

    fn ok(&mut self, request: &str) -> String {
        let (reply, _) = self.cmd(request);
        assert!(reply.starts_with("OK"), "{request}: {reply}");
        reply
    }
}

impl Drop for Qtest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn ports_memory_and_transfers_answer_as_qemus_server_does() {
    let mut q = Qtest::start("ports");
    assert_eq!(q.ok("endianness"), "OK little");
    // The i440FX host bridge's vendor and device ID through the PCI configuration ports.
    q.ok("outl 0xcf8 0x80000000");
    assert_eq!(q.ok("inl 0xcfc"), "OK 0x12378086");
    q.ok("writel 0x1000 0xdeadbeef");
    assert_eq!(q.ok("readl 0x1000"), "OK 0x00000000deadbeef");
    assert_eq!(q.ok("readb 0x1000"), "OK 0x00000000000000ef");
    assert_eq!(q.ok("readw 4098"), "OK 0x000000000000dead");
    q.ok("writeq 0x1008 01234");
    assert_eq!(q.ok("readq 0x1008"), "OK 0x000000000000029c");
    q.ok("write 0x2000 4 0x01020304");
    assert_eq!(q.ok("read 0x2000 4"), "OK 0x01020304");
    assert_eq!(q.ok("b64read 0x2000 4"), "OK AQIDBA==");
    // Short data is zero-filled.
    q.ok("write 0x2000 4 0xff");
    assert_eq!(q.ok("read 0x2000 4"), "OK 0xff000000");
    q.ok("b64write 0x3000 3 Zm9v");
    assert_eq!(q.ok("read 0x3000 3"), "OK 0x666f6f");
    q.ok("memset 0x4000 4 0xaa");
    q.ok("memset 0x4000 0 0x55");
    assert_eq!(q.ok("read 0x4000 4"), "OK 0xaaaaaaaa");
    // Nothing at the local APIC's address without a vCPU: all ones, as unassigned memory.
    assert_eq!(q.ok("readq 0xfee00000"), "OK 0xffffffffffffffff");
}

#[test]
fn interrupts_are_intercepted_at_the_ioapic() {
    let mut q = Qtest::start("irq");
    assert_eq!(q.cmd("irq_intercept_in ioapic").0, "OK");
    assert_eq!(q.cmd("irq_intercept_in ioapic").0, "OK");
    // The COM1 UART raises IRQ 4 when its transmitter-empty interrupt is enabled, and
    // lowers it when the guest reads the interrupt identification register.
    let (reply, irqs) = q.cmd("outb 0x3f9 0x02");
    assert_eq!(
        (reply.as_str(), irqs),
        ("OK", vec!["IRQ raise 4".to_string()])
    );
    let (reply, irqs) = q.cmd("inb 0x3fa");
    assert_eq!(reply, "OK 0x00c2");
    assert_eq!(irqs, vec!["IRQ lower 4".to_string()]);
    assert_eq!(
        q.cmd("set_irq_in ioapic unnamed-gpio-in 9 1"),
        ("OK".to_string(), vec!["IRQ raise 9".to_string()])
    );
    assert_eq!(
        q.cmd("irq_intercept_in /machine/nowhere").0,
        "FAIL Unknown device"
    );
    assert_eq!(
        q.cmd("irq_intercept_out /machine/unattached").0,
        "FAIL No intercepts installed: qomvm intercepts the interrupt controller's inputs only"
    );
}

#[test]
fn what_qomvm_lacks_or_cannot_parse_fails_in_one_line() {
    let mut q = Qtest::start("errors");
    for (request, reply) in [
        ("bogus 1 2", "FAIL Unknown command 'bogus'"),
        ("outb", "FAIL 'outb' needs more arguments"),
        ("outb 0x10000 1", "FAIL port 0x10000 is beyond 0xffff"),
        ("readl zz", "FAIL 'zz' is not a number"),
        ("read 0 0", "FAIL a read of 0 bytes"),
        ("write 0x1000 4 0", "ERR invalid argument size"),
        (
            "clock_step",
            "FAIL clock_step: qomvm's virtual clock runs in host time and cannot be stepped",
        ),
        (
            "read 0 0x40000000",
            "FAIL 1073741824 bytes is more than qtest transfers at once (67108864)",
        ),
    ] {
        assert_eq!(q.cmd(request).0, reply, "{request}");
    }
    // The session goes on.
    assert_eq!(q.ok("endianness"), "OK little");
}
