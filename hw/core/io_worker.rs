//! A thread that makes block I/O calls for a device whose registers answer at once (QEMU's
//! floppy controller reads and writes its sectors synchronously, inside the guest's port
//! access). A vCPU thread, whose sandbox has no block I/O calls, hands the call to the
//! worker and waits for it; any other thread makes the call itself.
//!
//! The worker is started where the device is realized (a thread inherits its creator's
//! sandbox list, and the machine's thread may do block I/O). A call waits on the disk and
//! on nothing else: the caller may hold the device's own lock while it waits.

use std::sync::mpsc;

use parking_lot::Mutex;

type Job = Box<dyn FnOnce() + Send>;

/// A worker thread for block I/O calls.
pub struct IoWorker {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl IoWorker {
    /// Starts the worker, named `name`; it ends when the `IoWorker` is dropped.
    pub fn spawn(name: &str) -> std::io::Result<IoWorker> {
        let (jobs, queue) = mpsc::channel::<Job>();
        crate::core::thread::builder(name).spawn(move || {
            for job in queue {
                // A panicking call drops its reply: the caller sees `None`.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })?;
        Ok(IoWorker {
            jobs: Mutex::new(jobs),
        })
    }

    /// Makes `call` here if this thread may do block I/O, else on the worker, waiting for
    /// it; `None` if the worker is gone or the call panicked.
    pub fn run<T: Send + 'static>(&self, call: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        if crate::core::sandbox::thread_may_block_io() {
            return Some(call());
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = reply.send(call());
        });
        self.jobs.lock().send(job).ok()?;
        answer.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::sandbox::{enter, ThreadKind};

    #[test]
    fn a_vcpu_threads_calls_run_on_the_worker_and_others_run_in_place() {
        let worker = Arc::new(IoWorker::spawn("io-worker-test").unwrap());
        let here = std::thread::current().name().map(String::from);
        let name = || std::thread::current().name().map(String::from);
        assert_eq!(worker.run(name), Some(here));
        let w = worker.clone();
        let on_vcpu = std::thread::spawn(move || {
            enter(ThreadKind::Vcpu);
            let name = w.run(|| std::thread::current().name().map(String::from));
            let panicked = w.run(|| -> u8 { panic!("a call that panics") });
            (name, panicked)
        })
        .join()
        .unwrap();
        assert_eq!(on_vcpu, (Some(Some("io-worker-test".to_string())), None));
    }
}
