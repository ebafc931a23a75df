//! A pool of worker threads for blocking calls (QEMU's `util/thread-pool.c`, behind
//! `aio=threads`): a device's event loop hands each request to the pool so that many
//! requests wait on the disk at once, and the loop itself never blocks on one.
//!
//! Threads start on demand up to the pool's limit and end after a while without work, as
//! QEMU's do.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send>;

/// How long an idle worker waits for work before it ends (QEMU: 10 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
    stopping: bool,
}

struct Inner {
    name: String,
    max_threads: usize,
    state: Mutex<State>,
    work: Condvar,
}

/// QEMU's `ThreadPool`. Dropping the last handle lets the workers finish the queued jobs
/// and end.
#[derive(Clone)]
pub struct ThreadPool {
    inner: Arc<Inner>,
}

impl ThreadPool {
    /// A pool of at most `max_threads` workers named `name` (at least one).
    pub fn new(name: &str, max_threads: usize) -> Self {
        ThreadPool {
            inner: Arc::new(Inner {
                name: name.to_string(),
                max_threads: max_threads.max(1),
                state: Mutex::new(State::default()),
                work: Condvar::new(),
            }),
        }
    }

    /// Queues `job` (QEMU's `thread_pool_submit`); starts a worker if none is idle and the
    /// limit allows. If the host cannot start a thread and none runs, the job runs here.
    pub fn submit(&self, job: Job) {
        let mut state = self.inner.state.lock();
        state.queue.push_back(job);
        if state.idle > 0 {
            self.inner.work.notify_one();
            return;
        }
        if state.threads >= self.inner.max_threads {
            return;
        }
        state.threads += 1;
        let inner = Arc::downgrade(&self.inner);
        let spawned = crate::core::thread::builder(self.inner.name.clone())
            .spawn(move || worker(inner));
        if let Err(e) = spawned {
            state.threads -= 1;
            if state.threads == 0 {
                log::warn!("{}: cannot start a worker thread ({e}): running inline", self.inner.name);
                let job = state.queue.pop_back();
                drop(state);
                if let Some(job) = job {
                    job();
                }
            }
        }
    }

    /// The number of worker threads running now.
    pub fn threads(&self) -> usize {
        self.inner.state.lock().threads
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Workers hold only weak references: they see the pool gone at their next wait.
        self.state.get_mut().stopping = true;
    }
}

fn worker(pool: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = pool.upgrade() else {
            return;
        };
        let job = {
            let mut state = inner.state.lock();
            loop {
                if let Some(job) = state.queue.pop_front() {
                    break Some(job);
                }
                if state.stopping {
                    break None;
                }
                state.idle += 1;
                let timed_out = inner.work.wait_for(&mut state, IDLE_TIMEOUT).timed_out();
                state.idle -= 1;
                if timed_out && state.queue.is_empty() {
                    break None;
                }
            }
        };
        let Some(job) = job else {
            inner.state.lock().threads -= 1;
            return;
        };
        // Drop the strong reference while the job runs: a job may outlive its pool.
        drop(inner);
        job();
    }
}

/// Jobs a device has on its pool: a reset, a stop or an unplug waits for them (QEMU's
/// `blk_drain`).
#[derive(Default)]
pub struct InFlight {
    count: Mutex<usize>,
    done: Condvar,
}

impl InFlight {
    /// A job was submitted.
    pub fn begin(&self) {
        *self.count.lock() += 1;
    }

    /// A job ended.
    pub fn end(&self) {
        let mut count = self.count.lock();
        *count -= 1;
        if *count == 0 {
            self.done.notify_all();
        }
    }

    /// Whether no job runs.
    pub fn is_idle(&self) -> bool {
        *self.count.lock() == 0
    }

    /// Waits until no job runs.
    pub fn drain(&self) {
        let mut count = self.count.lock();
        while *count > 0 {
            self.done.wait(&mut count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn jobs_run_concurrently_up_to_the_limit() {
        let pool = ThreadPool::new("test-pool", 4);
        let barrier = Arc::new(Barrier::new(5));
        for _ in 0..4 {
            let b = barrier.clone();
            // Each job waits for the others: this only ends if four run at once.
            pool.submit(Box::new(move || {
                b.wait();
            }));
        }
        barrier.wait();
        assert!(pool.threads() <= 4);
    }

    #[test]
    fn queued_jobs_all_run_with_one_thread() {
        let pool = ThreadPool::new("test-pool-1", 1);
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..100 {
            let d = done.clone();
            let tx = tx.clone();
            pool.submit(Box::new(move || {
                d.fetch_add(1, Ordering::SeqCst);
                if i == 99 {
                    tx.send(()).unwrap();
                }
            }));
        }
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 100);
        assert_eq!(pool.threads(), 1);
    }
}
