//! Machines on the qtest accelerator, driven from the test with no guest code: a `none`
//! machine with an ISA bus, built outside the process's `/machine` so tests can run side
//! by side, and helpers to plug devices into it.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use accel::qtest::QtestOps;
use hw::core::irq::{GsiRouter, IrqLine};
use hw::core::machine::machine_state;
use hw::core::qdev::{qdev_new, qdev_realize};
use hw::isa::isa_bus::{isa_bus_new, isa_bus_set_irqs, ISA_NUM_IRQS};
use qom::{container_get, ObjectRef};

/// A `none` machine on qtest with an ISA bus (`isa.0`, on the machine's `system-io`) whose
/// IRQ lines go to the accelerator's GSIs. Returns the machine and the bus.
pub fn machine_with_isa_bus() -> (ObjectRef, ObjectRef) {
    hw::init().expect("registrations are intact");
    accel::init().expect("registrations are intact");
    let machine = qom::object_new("none-machine").unwrap();
    let qtest = accel::accel_find("qtest").unwrap();
    accel::accel_init_machine(qtest, &machine).unwrap();
    let services = machine_state(&machine).unwrap().services().clone();
    let bus = isa_bus_new(&machine, "isa.0", &services).unwrap();
    let router = GsiRouter::new(&services);
    let lines = (0..ISA_NUM_IRQS as u32)
        .map(|n| IrqLine::new(router.clone(), n))
        .collect();
    isa_bus_set_irqs(&bus, lines);
    (machine, bus)
}

/// QEMU's `-M pc` (`pc-i440fx-10.0`) on the qtest accelerator with `ram_size` bytes of
/// RAM, its board built (`pc_init1`), devices still to add before
/// `machine_creation_done`.
pub fn pc_on_qtest(ram_size: u64) -> ObjectRef {
    accel::init().expect("registrations are intact");
    let machine = qom::object_new("pc-i440fx-10.0-machine").unwrap();
    machine_state(&machine).unwrap().set_ram_size(ram_size);
    let qtest = accel::accel_find("qtest").unwrap();
    accel::accel_init_machine(qtest, &machine).unwrap();
    hw::core::machine::machine_run_board_init(&machine).unwrap();
    machine
}

/// A `driver` device with `props` set, a child of the machine's `peripheral-anon`, not
/// realized.
pub fn new_dev(machine: &ObjectRef, driver: &str, props: &[(&str, &str)]) -> ObjectRef {
    let dev = qdev_new(driver).unwrap();
    for (k, v) in props {
        dev.property_parse(k, v).unwrap();
    }
    container_get(machine, "peripheral-anon")
        .add_child("device[*]", &dev)
        .unwrap();
    dev
}

/// [`new_dev`], realized on `bus` (as `-device driver,props...`).
pub fn plug(
    machine: &ObjectRef,
    bus: &ObjectRef,
    driver: &str,
    props: &[(&str, &str)],
) -> ObjectRef {
    let dev = new_dev(machine, driver, props);
    qdev_realize(&dev, Some(bus)).unwrap();
    dev
}

/// `-device driver,props...` on the pc's `pci.0` (a `pc_on_qtest` machine): the device, or
/// the error text of a property or of realize.
pub fn try_plug_pci(
    machine: &ObjectRef,
    driver: &str,
    props: &[(&str, &str)],
) -> Result<ObjectRef, String> {
    let bus = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let dev = qdev_new(driver).unwrap();
    for (k, v) in props {
        dev.property_parse(k, v).map_err(|e| e.to_string())?;
    }
    container_get(machine, "peripheral-anon")
        .add_child("device[*]", &dev)
        .unwrap();
    qdev_realize(&dev, Some(&bus)).map_err(|e| e.to_string())?;
    Ok(dev)
}

/// The level of the qtest accelerator's GSI `gsi`.
pub fn irq_level(machine: &ObjectRef, gsi: u32) -> bool {
    machine_state(machine)
        .unwrap()
        .accel_ops()
        .unwrap()
        .as_any()
        .downcast_ref::<QtestOps>()
        .expect("the qtest accelerator")
        .irq_level(gsi)
}

/// Runs the qomvm binary `bin` as `-M pc -accel qtest -display none -nodefaults ARGS -S
/// -qmp stdio`, quitting through QMP once it is up: returns its exit status and stderr
/// (a qomvm that refused its options has exited with its one-line error).
pub fn qomvm_pc_quit(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    qomvm_pc_quit_env(bin, args, &[])
}

/// The pc machine on the qtest accelerator, with nothing a test did not ask for.
const PC_ON_QTEST: [&str; 7] = [
    "-M",
    "pc",
    "-accel",
    "qtest",
    "-display",
    "none",
    "-nodefaults",
];

/// How long a qomvm that should refuse its options or quit at once may take.
const EXIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for `child` (stderr piped) to end within [`EXIT_DEADLINE`], killing it and
/// panicking otherwise; returns its exit code and stderr.
fn wait_within_deadline(mut child: std::process::Child, what: &str) -> (Option<i32>, String) {
    use std::io::Read as _;
    let mut stderr = child.stderr.take().expect("stderr is piped");
    // Read as it comes, so a chatty qomvm cannot block on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = std::time::Instant::now() + EXIT_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("qomvm can be waited for") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qomvm {what} did not exit within {EXIT_DEADLINE:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    (status.code(), reader.join().unwrap_or_default())
}

/// Runs the qomvm binary `bin` as `-M pc -accel qtest -display none -nodefaults ARGS`,
/// which must refuse them: asserts exit status 1 (within a deadline) and returns stderr
/// (the one-line error).
pub fn qomvm_pc_refused(bin: &str, args: &[&str]) -> String {
    use std::process::{Command, Stdio};
    let child = Command::new(bin)
        .args(PC_ON_QTEST)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qomvm runs");
    let (code, stderr) = wait_within_deadline(child, &format!("{args:?}"));
    assert_eq!(code, Some(1), "{args:?}: {stderr}");
    stderr
}

/// Starts the qomvm binary `bin` with `args`, `RUST_LOG=off` (stderr holds only what qomvm
/// itself says), `stdin` and `stdout` as given and stderr piped.
fn spawn_without_logs(
    bin: &str,
    args: &[&str],
    stdin: std::process::Stdio,
    stdout: std::process::Stdio,
) -> std::process::Child {
    std::process::Command::new(bin)
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qomvm runs")
}

/// Runs the qomvm binary `bin` as `-M pc -accel qtest -display none -nodefaults -S ARGS`
/// (no monitor, `RUST_LOG=off`) for options it should refuse, until it exits within a
/// deadline: whether it succeeded, and its stderr without the trailing newline.
pub fn qomvm_pc_stderr(bin: &str, args: &[&str]) -> (bool, String) {
    use std::process::Stdio;
    let all = [&PC_ON_QTEST[..], &["-S"], args].concat();
    let child = spawn_without_logs(bin, &all, Stdio::null(), Stdio::null());
    let (code, stderr) = wait_within_deadline(child, &format!("{args:?}"));
    (code == Some(0), stderr.trim_end().to_string())
}

/// Runs the qomvm binary `bin` as `-M pc -accel qtest -display none -S -qmp stdio -serial
/// none ARGS` (its defaults kept, `RUST_LOG=off`), asks for `info qom-tree` through QMP
/// and quits: the whole QMP output, or the stderr of a qomvm that refused its options.
pub fn qomvm_pc_qom_tree(bin: &str, args: &[&str]) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    use std::process::Stdio;
    let base = ["-M", "pc", "-accel", "qtest", "-display", "none", "-S"];
    let qmp = ["-qmp", "stdio", "-serial", "none"];
    let all = [&base[..], &qmp, args].concat();
    let mut child = spawn_without_logs(bin, &all, Stdio::piped(), Stdio::piped());
    // A qomvm that refused its options has exited: the write may fail, which is fine.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(
            concat!(
                r#"{"execute":"qmp_capabilities"}"#,
                "\n",
                r#"{"execute":"human-monitor-command","arguments":{"command-line":"info qom-tree"}}"#,
                "\n",
                r#"{"execute":"quit"}"#,
                "\n",
            )
            .as_bytes(),
        );
    }
    // Read as it comes (a full pipe would block qomvm).
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let (code, stderr) = wait_within_deadline(child, &format!("{args:?}"));
    let stdout = reader.join().unwrap_or_default();
    if code != Some(0) {
        return Err(stderr.trim_end().to_string());
    }
    Ok(stdout)
}

/// [`qomvm_pc_quit`] with `envs` set.
pub fn qomvm_pc_quit_env(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin)
        .envs(envs.iter().copied())
        .args(PC_ON_QTEST)
        .args(args)
        .args(["-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qomvm runs");
    // A qomvm that refused its options has exited: the write may fail, which is fine.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    wait_within_deadline(child, &format!("{args:?}"))
}

/// How long a whole test may take before it counts as hung.
pub const TEST_DEADLINE: Duration = Duration::from_secs(180);

/// Runs `body` on a thread of its own and fails the test if it takes longer than
/// [`TEST_DEADLINE`]: a device that hangs fails its test instead of the whole run.
pub fn with_deadline(name: &str, body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            body();
            let _ = tx.send(());
        })
        .unwrap();
    match rx.recv_timeout(TEST_DEADLINE) {
        Ok(()) => handle.join().unwrap(),
        Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => {
            panic!("{name}: not done after {TEST_DEADLINE:?}: qomvm hangs")
        }
    }
}
