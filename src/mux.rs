//! QEMU's character multiplexer escapes (`chardev/char-mux.c`) on the `-nographic` console:
//! Ctrl-A x quits, Ctrl-A h prints help, Ctrl-A a sends a Ctrl-A, Ctrl-A c switches to the
//! monitor once there is one. Everything else reaches the guest unchanged.

use std::sync::Arc;

use hw::char::chardev::{CharBackend, CharReceiver};
use hw::core::machine::{machine_state, RunRequest};
use parking_lot::Mutex;
use qom::WeakObjectRef;

const CTRL_A: u8 = 0x01;

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
        let escaped = Arc::new(Mutex::new(false));
        let console = self.inner.clone();
        let machine = self.machine.clone();
        let filter: CharReceiver = Arc::new(move |bytes: &[u8]| {
            let mut pass = Vec::with_capacity(bytes.len());
            let mut escaped = escaped.lock();
            for &b in bytes {
                if !*escaped {
                    if b == CTRL_A {
                        *escaped = true;
                    } else {
                        pass.push(b);
                    }
                    continue;
                }
                *escaped = false;
                match b {
                    b'x' => {
                        console.write(b"qomvm: Terminated\r\n");
                        if let Some(ms) = machine.upgrade().as_deref().and_then(machine_state) {
                            ms.run_state().request(RunRequest::HostQuit);
                        }
                    }
                    b'h' | b'?' => console.write(HELP.as_bytes()),
                    b'c' => console.write(b"\r\nqomvm: no monitor on this console\r\n"),
                    CTRL_A | b'a' => pass.push(CTRL_A),
                    other => {
                        pass.push(CTRL_A);
                        pass.push(other);
                    }
                }
            }
            drop(escaped);
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
    use hw::char::chardev::Ringbuf;

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
    }
}
