//! The `qomvm` binary: QEMU's `main` -> `qemu_init` -> main loop, in `vl.rs`.

mod audio;
mod blockdev;
mod dump;
mod help;
mod migration;
mod monitor;
mod mux;
mod net;
mod objects;
mod options;
mod os_posix;
mod qtest;
mod signals;
mod term;
mod ui;

mod vl;
mod vnc;

fn main() {
    let _ = hw::core::machine::PROCESS_START.set(std::time::Instant::now());
    let opts = match options::args_from_os(std::env::args_os().skip(1))
        .and_then(|args| options::parse(&args))
    {
        Ok(opts) => opts,
        Err(err) => {
            qom::error_report!("{err}");
            std::process::exit(1);
        }
    };
    // -daemonize forks before any thread starts: a child keeps only the forking thread.
    let daemon = if opts.daemonize && !opts.help && !opts.version {
        match os_posix::os_daemonize() {
            Ok(pipe) => Some(pipe),
            Err(err) => {
                qom::error_report!("{err}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };
    // While qomvm has one thread (and after -daemonize's fork, so that the daemon is its
    // parent): the tap scripts' launcher, outside the sandbox to come.
    if let Err(e) = ::net::launcher::start() {
        log::debug!("no script launcher ({e}): scripts start directly");
    }
    // Before any thread starts, so that every thread inherits the blocked signals.
    signals::setup();
    panic_ends_the_process();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let code = match vl::qemu_main(opts, daemon) {
        Ok(code) => code,
        Err(err) => {
            qom::error_report!("{err}");
            1
        }
    };
    term::restore();
    os_posix::exit(code);
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
        qom::error_report!("internal error: a panic ends the VM");
        os_posix::exit(101);
    }));
}
