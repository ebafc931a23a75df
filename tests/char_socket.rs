//! Serial ports over sockets (QEMU's socket chardev), end to end through qomvm on the qtest
//! accelerator: `-serial unix:PATH,server=on,wait=off`, `-chardev socket` as a TCP server
//! on loopback and as a Unix client, bytes both ways through the UART's registers, what
//! `query-chardev` says, and `wait=on` holding start-up until a client connects.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use test_support::fuzz_qtest::Qtest;
use test_support::qmp::QmpClient;

/// The COM ports' data registers, in `-serial` order.
const COM: [u16; 3] = [0x3f8, 0x2f8, 0x3e8];

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

/// Sends `byte` out of the UART at `base` until `read` sees it: output before the peer
/// connected is dropped, as QEMU drops it.
fn until_received(qt: &mut Qtest, base: u16, byte: u8, mut read: impl FnMut() -> Option<u8>) {
    let end = deadline();
    loop {
        qt.cmd(format!("outb {base:#x} {byte:#x}"));
        if read() == Some(byte) {
            return;
        }
        assert!(
            Instant::now() < end,
            "UART {base:#x}: {byte:#x} never arrived"
        );
    }
}

/// The bytes the guest reads from the UART at `base` until `n` arrived.
fn uart_read(qt: &mut Qtest, base: u16, n: usize) -> Vec<u8> {
    let end = deadline();
    let mut got = Vec::new();
    while got.len() < n {
        if qt.value(format!("inb {:#x}", base + 5)) & 1 != 0 {
            got.push(qt.value(format!("inb {base:#x}")) as u8);
            continue;
        }
        assert!(Instant::now() < end, "UART {base:#x}: only {got:?} arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

fn read_byte(stream: &mut impl Read) -> Option<u8> {
    let mut b = [0u8; 1];
    match stream.read(&mut b) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

#[test]
fn serial_ports_talk_over_unix_and_tcp_sockets_both_ways() {
    // A free loopback port (the test's own listener, closed again), and a Unix listener
    // the third port connects out to.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut scratch = std::path::PathBuf::new();
    let mut client_listener = None;
    let mut qt = Qtest::start(env!("CARGO_BIN_EXE_qomvm"), "qomvm-char-socket", |dir| {
        scratch = dir.to_path_buf();
        let listener = UnixListener::bind(dir.join("client.sock")).unwrap();
        client_listener = Some(listener);
        [
            "-serial".to_string(),
            format!(
                "unix:{},server=on,wait=off",
                dir.join("com1.sock").display()
            ),
            "-chardev".to_string(),
            format!("socket,id=com2,host=127.0.0.1,port={port},server=on,wait=off,nodelay=on"),
            "-serial".to_string(),
            "chardev:com2".to_string(),
            "-chardev".to_string(),
            format!("socket,id=com3,path={}", dir.join("client.sock").display()),
            "-serial".to_string(),
            "chardev:com3".to_string(),
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
        ]
        .to_vec()
    });
    let mut qmp = QmpClient::connect(&scratch.join("qmp.sock"));
    let filenames = |qmp: &mut QmpClient| {
        let r = qmp.execute("query-chardev", json!({}));
        r["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["label"].as_str().unwrap().to_string(),
                    c["filename"].as_str().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = filenames(&mut qmp);
    let com1 = format!(
        "disconnected:unix:{},server=on",
        scratch.join("com1.sock").display()
    );
    assert!(before.iter().any(|(_, f)| *f == com1), "{before:?}");
    let com2 = format!("disconnected:tcp:127.0.0.1:{port},server=on");
    assert!(
        before.iter().any(|(l, f)| l == "com2" && *f == com2),
        "{before:?}"
    );

    // COM1: a Unix server.
    let mut unix = UnixStream::connect(scratch.join("com1.sock")).unwrap();
    unix.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    until_received(&mut qt, COM[0], b'U', || read_byte(&mut unix));
    unix.write_all(b"typed").unwrap();
    assert_eq!(uart_read(&mut qt, COM[0], 5), b"typed");

    // COM2: a TCP server on loopback.
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    until_received(&mut qt, COM[1], b'T', || read_byte(&mut tcp));
    let after = filenames(&mut qmp);
    let local = tcp.local_addr().unwrap();
    assert!(
        after.iter().any(
            |(l, f)| l == "com2" && *f == format!("tcp:127.0.0.1:{port},server=on <-> {local}")
        ),
        "{after:?}"
    );
    tcp.write_all(b"net").unwrap();
    assert_eq!(uart_read(&mut qt, COM[1], 3), b"net");

    // COM3: qomvm connected out at start-up.
    let (mut out, _) = client_listener.take().unwrap().accept().unwrap();
    out.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    until_received(&mut qt, COM[2], b'C', || read_byte(&mut out));
    out.write_all(b"in").unwrap();
    assert_eq!(uart_read(&mut qt, COM[2], 2), b"in");

    // A client that leaves is replaced by the next one.
    drop(unix);
    let mut again = UnixStream::connect(scratch.join("com1.sock")).unwrap();
    again
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    until_received(&mut qt, COM[0], b'2', || read_byte(&mut again));
    qt.check_alive();
}

#[test]
fn wait_on_holds_start_up_until_a_client_connects() {
    let dir = std::env::temp_dir().join(format!("qomvm-char-socket-wait-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("com1.sock");
    let qmp_sock = dir.join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(["-M", "pc", "-accel", "qtest", "-display", "none", "-S"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .arg("-serial")
        .arg(format!("unix:{},server=on", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert_eq!(
        line,
        format!(
            "qomvm: -serial unix:{},server=on: info: QEMU waiting for connection on: disconnected:unix:{},server=on\n",
            sock.display(),
            sock.display()
        )
    );
    // Nothing past the chardev yet: no monitor socket.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!qmp_sock.exists(), "start-up went on without a client");
    assert!(child.try_wait().unwrap().is_none());
    let _client = UnixStream::connect(&sock).unwrap();
    let mut qmp = QmpClient::connect(&qmp_sock);
    assert_eq!(
        qmp.execute("query-status", json!({}))["return"]["status"],
        "prelaunch"
    );
    qmp.execute("quit", json!({}));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
