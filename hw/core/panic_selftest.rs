//! Debug builds only: `QOMVM_PANIC_SELFTEST=main|vcpu|iothread` makes the first thread of
//! that kind panic where it starts its work, so that `tests/panics.rs` can see the panic
//! policy (`src/main.rs`) end qomvm with status 101 whatever thread panicked. Release
//! builds do not read the variable.

/// Panics if this is a debug build and `QOMVM_PANIC_SELFTEST` names `thread_kind`.
pub fn panic_if_asked(thread_kind: &str) {
    if cfg!(debug_assertions)
        && std::env::var("QOMVM_PANIC_SELFTEST").is_ok_and(|wanted| wanted == thread_kind)
    {
        panic!("QOMVM_PANIC_SELFTEST: the {thread_kind} thread panics as asked");
    }
}
