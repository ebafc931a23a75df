//! The `qomvm` binary: QEMU's `main` -> `qemu_init` -> main loop, in `vl.rs`.

mod blockdev;
mod help;
mod monitor;
mod mux;
mod net;
mod objects;
mod options;
mod qtest;
mod signals;
mod term;
mod vl;

fn main() {
    let _ = hw::core::machine::PROCESS_START.set(std::time::Instant::now());
    // While qomvm has one thread: the tap scripts' launcher (outside the sandbox to come).
    if let Err(e) = ::net::launcher::start() {
        log::debug!("no script launcher ({e}): scripts start directly");
    }
    // Before any thread starts, so that every thread inherits the blocked signals.
    signals::setup();
    panic_ends_the_process();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match vl::qemu_main(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("qomvm: {err}");
            1
        }
    };
    term::restore();
    std::process::exit(code);
}

/// Panic policy: a panic on any thread (vCPU, I/O, monitor) ends qomvm, after the usual
/// message, with the terminal restored and status 101. A half-done device or vCPU
/// operation leaves state no other thread should see, and a lock it held (parking_lot
/// locks are not poisoned) could leave another thread waiting for ever; so nothing is
/// left running. (The event loop's `catch_unwind` around handlers never gets to act in
/// the binary: this hook runs first.)
fn panic_ends_the_process() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        term::restore();
        eprintln!("qomvm: internal error: a panic ends the VM");
        std::process::exit(101);
    }));
}
