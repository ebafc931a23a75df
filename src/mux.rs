//! QEMU's character multiplexer escapes (`chardev/char-mux.c`) on the `-nographic` console:
//! Ctrl-A x quits, Ctrl-A h prints help, Ctrl-A a sends a Ctrl-A, Ctrl-A c switches between
//! the guest's serial port and the human monitor. Everything else reaches whichever has
//! the focus unchanged.

use std::sync::{Arc, OnceLock};

use hw::core::chardev::{CharBackend, CharReceiver};
use hw::core::machine::machine_state;
use hw::core::runstate::RunRequest;
use parking_lot::Mutex;
use qom::WeakObjectRef;

const CTRL_A: u8 = 0x01;

/// The monitor Ctrl-A c switches to, installed once the monitors exist.
static CONSOLE_MONITOR: OnceLock<crate::monitor::ConsoleMonitor> = OnceLock::new();

/// Installs the monitor the console switches to.
pub fn set_console_monitor(monitor: crate::monitor::ConsoleMonitor) {
    let _ = CONSOLE_MONITOR.set(monitor);
}

/// Where console input goes.
#[derive(Default)]
struct Focus {
    /// The previous byte was Ctrl-A.
    escaped: bool,
    /// The monitor has the focus; `line` is what was typed so far.
    monitor: bool,
    line: Vec<u8>,
}

/// Line editing for the console monitor: echo, backspace, Enter runs the line.
fn monitor_input(console: &dyn CharBackend, focus: &mut Focus, b: u8) {
    match b {
        b'\r' | b'\n' => {
            console.write(b"\r\n");
            let line = String::from_utf8_lossy(&std::mem::take(&mut focus.line)).into_owned();
            if let Some(monitor) = CONSOLE_MONITOR.get() {
                let output = monitor(&line).replace('\n', "\r\n");
                console.write(output.as_bytes());
            }
            console.write(b"(qemu) ");
        }
        0x7f | 0x08 if focus.line.pop().is_some() => console.write(b"\x08 \x08"),
        0x20..=0x7e if focus.line.len() < 4096 => {
            focus.line.push(b);
            console.write(&[b]);
        }
        _ => {}
    }
}

/// The console backend wrapped with the escape handling.
pub struct MuxBackend {
    inner: Arc<dyn CharBackend>,
    machine: WeakObjectRef,
}

impl MuxBackend {
    pub fn new(inner: Arc<dyn CharBackend>, machine: WeakObjectRef) -> Arc<Self> {
        Arc::new(MuxBackend { inner, machine })
    }
}

const HELP: &str = "\r\nC-a h    print this help\r\nC-a x    exit emulator\r\nC-a c    switch between console and monitor\r\nC-a C-a  sends C-a\r\n";

impl CharBackend for MuxBackend {
    fn write(&self, data: &[u8]) {
        self.inner.write(data);
    }

    fn set_receiver(&self, receiver: Option<CharReceiver>) {
        let Some(frontend) = receiver else {
            self.inner.set_receiver(None);
            return;
        };
        let focus = Arc::new(Mutex::new(Focus::default()));
        let console = self.inner.clone();
        let machine = self.machine.clone();
        let filter: CharReceiver = Arc::new(move |bytes: &[u8]| {
            let mut pass = Vec::with_capacity(bytes.len());
            let mut focus = focus.lock();
            for &b in bytes {
                if !focus.escaped {
                    if b == CTRL_A {
                        focus.escaped = true;
                    } else if focus.monitor {
                        monitor_input(&*console, &mut focus, b);
                    } else {
                        pass.push(b);
                    }
                    continue;
                }
                focus.escaped = false;
                match b {
                    b'x' => {
                        console.write(b"qomvm: Terminated\r\n");
                        if let Some(ms) = machine.upgrade().as_deref().and_then(machine_state) {
                            ms.run_state().request(RunRequest::HostQuit);
                        }
                    }
                    b'h' | b'?' => console.write(HELP.as_bytes()),
                    b'c' if CONSOLE_MONITOR.get().is_some() => {
                        focus.monitor = !focus.monitor;
                        focus.line.clear();
                        if focus.monitor {
                            let banner = format!(
                                "\r\nqomvm {} monitor - type 'help' for more information\r\n(qemu) ",
                                env!("CARGO_PKG_VERSION")
                            );
                            console.write(banner.as_bytes());
                        } else {
                            console.write(b"\r\n");
                        }
                    }
                    b'c' => console.write(b"\r\nqomvm: no monitor on this console\r\n"),
                    CTRL_A | b'a' => pass.push(CTRL_A),
                    other => {
                        pass.push(CTRL_A);
                        pass.push(other);
                    }
                }
            }
            drop(focus);
            if !pass.is_empty() {
                frontend(&pass);
            }
        });
        self.inner.set_receiver(Some(filter));
    }

    fn driver(&self) -> &'static str {
        "mux"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hw::core::chardev::Ringbuf;

    #[test]
    fn escapes_are_handled_and_other_bytes_pass() {
        hw::init().unwrap();
        let machine = qom::object_new("none-machine").unwrap();
        let ring = Arc::new(Ringbuf::new(4096));
        let mux = MuxBackend::new(ring.clone(), machine.downgrade());
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        mux.set_receiver(Some(Arc::new(move |b: &[u8]| {
            sink.lock().extend_from_slice(b)
        })));
        ring.inject(b"ls\x01\x01\x01qx");
        assert_eq!(*got.lock(), b"ls\x01\x01qx");
        ring.inject(b"\x01h");
        assert!(String::from_utf8_lossy(&ring.take()).contains("C-a x    exit emulator"));
        ring.inject(b"\x01x");
        let ms = machine_state(&machine).unwrap();
        assert_eq!(ms.run_state().take(), Some(RunRequest::HostQuit));

        // Ctrl-A c: lines go to the monitor, with echo and backspace; again: back.
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        set_console_monitor(Arc::new(move |line: &str| {
            seen.lock().push(line.to_string());
            format!("ran {line}\n")
        }));
        ring.take();
        got.lock().clear();
        ring.inject(b"\x01cinfo x\x7fstatus\r");
        assert_eq!(*lines.lock(), ["info status"]);
        let screen = String::from_utf8_lossy(&ring.take()).into_owned();
        assert!(screen.contains("(qemu) "), "{screen}");
        assert!(screen.contains("ran info status\r\n(qemu) "), "{screen}");
        assert!(got.lock().is_empty(), "the guest saw monitor input");
        ring.inject(b"\x01cls");
        assert_eq!(*got.lock(), b"ls");
    }
}
