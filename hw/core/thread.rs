//! Threads that come in numbers (one per vCPU, the thread pool's workers, I/O threads):
//! named, with a stack one page short of 2 MiB.
//!
//! Rust's default thread stack is 2 MiB. On a host whose transparent huge pages are set
//! to `always` (Debian's kernels), such a stack that the kernel happens to place on a
//! 2 MiB boundary is backed by one huge page at its first touch: 2 MiB resident for a
//! thread that uses a few KiB. Seen in the nested rig: a `-smp 64 -m 64G` start held two
//! such vCPU stacks, 4 MiB of its 13.8 MiB peak RSS, in every one of five starts. A
//! mapping smaller than 2 MiB never holds an aligned 2 MiB range. glibc keeps the stacks
//! of finished threads and gives one to a new thread that asks for up to 4x less, so the
//! threads that end before the vCPUs start (`deferred.rs`'s) use this size too.

/// The stack size of [`builder`]'s threads.
pub const STACK_SIZE: usize = 2 * 1024 * 1024 - 4096;

/// A thread builder with `name` and a [`STACK_SIZE`] stack.
pub fn builder(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(STACK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_get_the_name_and_a_stack_under_2_mib() {
        const CHILD: &str = "QOMVM_THREAD_STACK_CHILD";
        if std::env::var_os(CHILD).is_none() {
            // In a fresh process: this one's finished test threads left 2 MiB stacks in
            // glibc's cache, which a new thread may be given (see above).
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "core::thread::tests::threads_get_the_name_and_a_stack_under_2_mib",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "{text}");
            return;
        }
        let (name, stack) = builder("worker 7")
            .spawn(|| {
                let name = std::thread::current().name().map(str::to_string);
                // SAFETY: pthread_getattr_np fills an attribute object we own and destroy.
                let stack = unsafe {
                    let mut attr: libc::pthread_attr_t = std::mem::zeroed();
                    assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
                    let mut size = 0usize;
                    libc::pthread_attr_getstacksize(&attr, &mut size);
                    libc::pthread_attr_destroy(&mut attr);
                    size
                };
                (name, stack)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(name.as_deref(), Some("worker 7"));
        assert!(stack < 2 * 1024 * 1024, "stack of {stack} bytes");
    }
}
