//! A blocking QMP client for tests: connects to a qomvm's `-qmp unix:PATH,server=on,wait=off`
//! socket (waiting for it to appear), negotiates, and runs commands; events that arrive
//! meanwhile are kept in order.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long to wait for the socket, and for any one message.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received so far, oldest first.
    pub events: Vec<Value>,
}

impl QmpClient {
    /// Connects to `socket` (retrying until it exists, up to [`QMP_TIMEOUT`]), reads the
    /// greeting and sends `qmp_capabilities`.
    pub fn connect(socket: &Path) -> QmpClient {
        let deadline = Instant::now() + QMP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no QMP socket {}: {e}",
                        socket.display()
                    );
                    // 1 ms: start-up benchmarks time the first answer through here.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        stream.set_read_timeout(Some(QMP_TIMEOUT)).unwrap();
        let mut client = QmpClient {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = client.recv();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        let reply = client.execute("qmp_capabilities", json!({}));
        assert_eq!(reply, json!({"return": {}}));
        client
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("a QMP message in time");
        assert!(
            n > 0,
            "qomvm closed the QMP connection; events: {:?}",
            self.events
        );
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    /// Runs `name` with `args`; returns the whole reply (`{"return": ...}` or
    /// `{"error": ...}`).
    pub fn execute(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args}).to_string();
        self.writer.write_all(msg.as_bytes()).unwrap();
        loop {
            let v = self.recv();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// The first event `name` (its whole message) received so far or within `timeout`
    /// (asking `query-status` every 10 ms meanwhile), taken out of `events`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Some(self.events.remove(i));
            }
            if Instant::now() >= deadline {
                return None;
            }
            self.execute("query-status", json!({}));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `query-migrate` every 5 ms until the migration leaves setup/active/cancelling
    /// (at most `timeout`); returns the last `query-migrate` reply.
    pub fn wait_migration(&mut self, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let info = self.execute("query-migrate", json!({}));
            let status = info["return"]["status"].as_str().unwrap_or("").to_string();
            if !matches!(status.as_str(), "setup" | "active" | "cancelling") {
                return info;
            }
            assert!(
                start.elapsed() < timeout,
                "migration still {status} after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `pmemsave` of `size` bytes at guest-physical `addr`, read back through a file in
    /// `dir`.
    pub fn read_guest(&mut self, dir: &Path, addr: u64, size: usize) -> Vec<u8> {
        let file = dir.join(format!("pmemsave-{addr:x}"));
        let reply = self.execute(
            "pmemsave",
            json!({"val": addr, "size": size, "filename": file.display().to_string()}),
        );
        assert_eq!(reply, json!({"return": {}}), "pmemsave {addr:#x}+{size:#x}");
        let bytes = std::fs::read(&file).unwrap();
        let _ = std::fs::remove_file(file);
        bytes
    }
}
