//! A value computed on a thread of its own while start-up goes on, and waited for where it
//! is first needed: work that would otherwise sit on the path to the guest's first
//! instruction (KVM's supported CPUID, the sandbox's filters).

use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

/// A value a thread is computing.
pub struct Deferred<T> {
    value: OnceLock<Option<T>>,
    thread: Mutex<Option<JoinHandle<T>>>,
}

impl<T: Send + 'static> Deferred<T> {
    /// Starts `work` on a thread named `name`.
    pub fn spawn(
        name: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<Deferred<T>> {
        // The thread stack size of the vCPUs (which start after these end): glibc hands a
        // finished thread's stack to a later thread that asks for up to 4x less.
        let thread = crate::core::thread::builder(name).spawn(work)?;
        Ok(Deferred {
            value: OnceLock::new(),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The value, once the thread has it; `None` if the thread panicked.
    pub fn get(&self) -> Option<&T> {
        self.value.get_or_init(|| self.join()).as_ref()
    }

    /// The value, owned; `None` if the thread panicked.
    pub fn into_inner(mut self) -> Option<T> {
        match self.value.take() {
            Some(value) => value,
            None => self.join(),
        }
    }

    fn join(&self) -> Option<T> {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        thread.join().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_is_the_threads_whichever_way_it_is_read() {
        let shared = Deferred::spawn("deferred-test", || 6 * 7).unwrap();
        assert_eq!(shared.get(), Some(&42));
        assert_eq!(shared.get(), Some(&42));
        assert_eq!(shared.into_inner(), Some(42));
        let owned = Deferred::spawn("deferred-test", || String::from("x")).unwrap();
        assert_eq!(owned.into_inner().as_deref(), Some("x"));
    }

    #[test]
    fn a_panicking_thread_gives_none() {
        let failed: Deferred<u32> =
            Deferred::spawn("deferred-test", || panic!("on purpose")).unwrap();
        assert_eq!(failed.get(), None);
    }
}
