//! A qomvm process whose stdout (the serial console under `-serial stdio`) is collected as
//! it comes, for tests that watch a guest print; killed when dropped.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct ConsoleVm {
    pub child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    /// The thread copying stdout into `out`; joined once qomvm has exited, so that
    /// [`ConsoleVm::wait_exit`] returns with everything qomvm printed collected.
    reader: Option<std::thread::JoinHandle<()>>,
    timeout: Duration,
}

impl ConsoleVm {
    /// Starts `qomvm` with `args` (stdin closed, stderr inherited); waits at most
    /// `timeout` in [`ConsoleVm::wait_for`] and [`ConsoleVm::wait_exit`].
    pub fn start(qomvm: &str, args: &[&str], timeout: Duration) -> ConsoleVm {
        Self::start_in(qomvm, args, timeout, None)
    }

    /// [`ConsoleVm::start`] in directory `cwd` (files the monitor writes by relative
    /// name land there).
    pub fn start_in(
        qomvm: &str,
        args: &[&str],
        timeout: Duration,
        cwd: Option<&std::path::Path>,
    ) -> ConsoleVm {
        let mut command = Command::new(qomvm);
        if let Some(dir) = cwd {
            command.current_dir(dir);
        }
        let mut child = command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("QOMVM_CONSOLE_LOG").unwrap_or_else(|_| "off".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qomvm starts");
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        ConsoleVm {
            child,
            out,
            reader: Some(reader),
            timeout,
        }
    }

    /// Everything printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits until `done` holds for the console text; panics with the text on a timeout or
    /// if qomvm exits first.
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let start = Instant::now();
        loop {
            let text = self.text();
            if done(&text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread drain what is left.
                std::thread::sleep(Duration::from_millis(200));
                let text = self.text();
                assert!(
                    done(&text),
                    "qomvm exited ({status}) before {what}; console: {text:?}"
                );
                return;
            }
            assert!(
                start.elapsed() < self.timeout,
                "no {what} within {:?}; console: {text:?}",
                self.timeout
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every one of `wanted` shows on the console.
    pub fn wait_for(&mut self, wanted: &[&str]) {
        self.wait_until(&format!("{wanted:?}"), |text| {
            wanted.iter().all(|w| text.contains(w))
        });
    }

    /// Waits for qomvm to exit on its own; returns its exit code. Afterwards
    /// [`ConsoleVm::text`] holds all it printed.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // qomvm's end closed the pipe (unless a child it left holds it: then
                // give the reader a moment rather than wait for that child).
                if let Some(reader) = self.reader.take() {
                    let joined = Instant::now();
                    while !reader.is_finished() && joined.elapsed() < Duration::from_secs(2) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if reader.is_finished() {
                        let _ = reader.join();
                    }
                }
                return status.code();
            }
            assert!(
                start.elapsed() < self.timeout,
                "qomvm still running after {:?}; console: {:?}",
                self.timeout,
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ConsoleVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
