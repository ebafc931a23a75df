//! The `qomvm` binary: QEMU's `main` -> `qemu_init` -> main loop, in `vl.rs`.

mod blockdev;
mod help;
mod monitor;
mod mux;
mod net;
mod objects;
mod options;
mod term;
mod vl;

fn main() {
    let _ = hw::core::machine::PROCESS_START.set(std::time::Instant::now());
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
