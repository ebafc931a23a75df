//! QMP and HMP over raw sockets and pipes, on `-M none -accel qtest` (and `-M pc` where a
//! board matters): QEMU's greeting and negotiation, the exact error replies, garbage,
//! oversized messages, abrupt disconnects, several clients at once, events, and the HMP
//! front ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running qomvm with a QMP socket; killed on drop.
struct Vm {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Vm {
    fn start(extra: &[&str]) -> Vm {
        Vm::start_program(env!("CARGO_BIN_EXE_qomvm"), extra)
    }

    /// `program` (qomvm, or QEMU to compare with) with a QMP socket and `extra`.
    fn start_program(program: &str, extra: &[&str]) -> Vm {
        let dir = std::env::temp_dir().join(format!(
            "qomvm-qmp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let qmp = format!("unix:{},server=on,wait=off", sock.display());
        let mut args = vec!["-qmp", &qmp];
        if !extra.contains(&"-M") {
            args.extend(["-M", "none"]);
        }
        if !extra.contains(&"-accel") {
            args.extend(["-accel", "qtest"]);
        }
        args.extend(extra);
        let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
        let child = Command::new(program)
            .args(&args)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("qomvm starts");
        Vm { child, dir, sock }
    }

    fn connect_raw(&self) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    return s;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "no QMP socket: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// A client past the greeting, not negotiated.
    fn client(&self) -> Client {
        let mut c = Client::new(self.connect_raw());
        let greeting = c.recv();
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        c
    }

    /// A negotiated client.
    fn negotiated(&self) -> Client {
        let mut c = self.client();
        assert_eq!(c.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
        c
    }

    /// What qomvm wrote to stderr so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "qomvm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Client {
    writer: Box<dyn Write>,
    reader: BufReader<Box<dyn Read>>,
    events: Vec<Value>,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        let reader: Box<dyn Read> = Box::new(stream.try_clone().unwrap());
        Client {
            writer: Box::new(stream),
            reader: BufReader::new(reader),
            events: Vec::new(),
        }
    }

    fn from_parts(reader: Box<dyn Read>, writer: Box<dyn Write>) -> Client {
        Client {
            writer,
            reader: BufReader::new(reader),
            events: Vec::new(),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
        self.writer.flush().unwrap();
    }

    fn recv_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("a reply");
        assert!(n > 0, "the server closed the connection");
        assert!(line.ends_with("\r\n"), "QMP lines end with CR LF: {line:?}");
        line
    }

    /// The next message, events included.
    fn recv(&mut self) -> Value {
        let line = self.recv_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The next reply; events on the way are kept.
    fn reply(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        self.send_raw(msg.to_string().as_bytes());
        self.reply()
    }

    /// The next event called `name`, kept or still to come (others on the way are kept).
    fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.recv();
            if v["event"] == name {
                return v;
            }
            assert!(v.get("event").is_some(), "expected event {name}, got {v}");
            self.events.push(v);
        }
    }
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

#[test]
fn greeting_and_negotiation_are_qemus() {
    let vm = Vm::start(&[]);
    let mut c = Client::new(vm.connect_raw());
    let greeting = c.recv_line();
    // QEMU 7.2's interface level; qomvm's own version in `package`.
    assert_eq!(
        greeting,
        format!(
            "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"package\": \"qomvm {}\"}}, \"capabilities\": [\"oob\"]}}}}\r\n",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(
        c.cmd("query-status", json!({})),
        error(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    assert_eq!(
        c.cmd("qmp_capabilities", json!({"enable": ["bogus"]})),
        error(
            "GenericError",
            "Parameter 'enable' does not accept value 'bogus'"
        )
    );
    c.send_raw(b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}, \"id\": \"neg\"}");
    assert_eq!(c.recv_line(), "{\"return\": {}, \"id\": \"neg\"}\r\n");
    assert_eq!(
        c.cmd("qmp_capabilities", json!({})),
        error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    // With oob enabled, exec-oob is accepted as a key but no command allows it.
    c.send_raw(b"{\"exec-oob\": \"query-status\", \"id\": 7}");
    assert_eq!(
        c.reply(),
        json!({"error": {"class": "GenericError", "desc": "The command query-status does not support OOB"}, "id": 7})
    );
    assert_eq!(
        c.cmd("query-version", json!({})),
        json!({"return": {"qemu": {"micro": 0, "minor": 2, "major": 7},
            "package": format!("qomvm {}", env!("CARGO_PKG_VERSION"))}})
    );
}

#[test]
fn malformed_requests_get_qemus_errors_and_the_session_goes_on() {
    let vm = Vm::start(&[]);
    let mut c = vm.negotiated();
    let cases: &[(&[u8], &str)] = &[
        (b"{\"execute\": }", "JSON parse error, expecting value"),
        (b"{1: 2}", "JSON parse error, key is not a string in object"),
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b"\"hello\"", "QMP input must be a JSON object"),
        (b"{\"arguments\": {}}", "QMP input lacks member 'execute'"),
        (
            b"{\"execute\": 1}",
            "QMP input member 'execute' must be a string",
        ),
        (
            b"{\"execute\": \"stop\", \"arguments\": []}",
            "QMP input member 'arguments' must be an object",
        ),
        (
            b"{\"execute\": \"stop\", \"bogus\": 1}",
            "QMP input member 'bogus' is unexpected",
        ),
    ];
    for (input, desc) in cases {
        c.send_raw(input);
        assert_eq!(c.reply(), error("GenericError", desc), "for {input:?}");
    }
    // Not valid UTF-8, then a stray closer: errors too.
    c.send_raw(b"{\"execute\": \"\xff\xfe\"}");
    assert_eq!(c.reply()["error"]["class"], "GenericError");
    c.send_raw(b"}");
    assert_eq!(c.reply()["error"]["class"], "GenericError");
    // Two requests in one write, split across writes, without newlines.
    c.send_raw(b"{\"execute\": \"query-name\", \"id\": 1}{\"execute\": \"query-n");
    c.send_raw(b"ame\", \"id\": 2}");
    assert_eq!(c.reply(), json!({"return": {}, "id": 1}));
    assert_eq!(c.reply(), json!({"return": {}, "id": 2}));
}

#[test]
fn unknown_commands_and_bad_arguments_are_refused_with_the_id() {
    let vm = Vm::start(&[]);
    let mut c = vm.negotiated();
    c.send_raw(b"{\"execute\": \"no-such-command\", \"id\": {\"nested\": [1]}}");
    assert_eq!(
        c.reply(),
        json!({"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}, "id": {"nested": [1]}})
    );
    assert_eq!(
        c.cmd("qom-get", json!({"path": "/machine"})),
        error("GenericError", "Parameter 'property' is missing")
    );
    assert_eq!(
        c.cmd("qom-get", json!({"path": 1, "property": "type"})),
        error(
            "GenericError",
            "Invalid parameter type for 'path', expected: string"
        )
    );
    assert_eq!(
        c.cmd("query-status", json!({"verbose": true})),
        error("GenericError", "Parameter 'verbose' is unexpected")
    );
    assert_eq!(
        c.cmd(
            "qom-get",
            json!({"path": "/machine/nothing", "property": "type"})
        ),
        error("DeviceNotFound", "Device '/machine/nothing' not found")
    );
    assert_eq!(
        c.cmd(
            "qom-get",
            json!({"path": "/machine", "property": "nothing"})
        ),
        error("GenericError", "Property 'none-machine.nothing' not found")
    );
    assert_eq!(
        c.cmd("system_powerdown", json!({}))["error"]["class"],
        "GenericError",
        "the none machine has no power button"
    );
}

#[test]
fn an_oversized_message_is_refused_and_skipped() {
    let vm = Vm::start(&[]);
    let mut c = vm.negotiated();
    let mut big = b"{\"execute\": \"qom-get\", \"arguments\": {\"path\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 2 << 20));
    big.extend(b"\", \"property\": \"type\"}}");
    c.send_raw(&big);
    let reply = c.reply();
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    assert!(
        reply["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error, message exceeds"),
        "{reply}"
    );
    // The rest of the big message was skipped: the next request is understood.
    assert_eq!(
        c.cmd("qom-get", json!({"path": "/machine", "property": "type"})),
        json!({"return": "none-machine"})
    );
}

#[test]
fn abrupt_disconnects_affect_neither_the_vm_nor_other_clients() {
    let vm = Vm::start(&[]);
    let mut survivor = vm.negotiated();
    for _ in 0..5 {
        // Half a request, then gone.
        let mut s = vm.connect_raw();
        s.write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-sta")
            .unwrap();
        drop(s);
        // Gone before reading the greeting.
        drop(vm.connect_raw());
        // Gone in the middle of a reply stream.
        let mut c = vm.negotiated();
        c.send_raw(b"{\"execute\": \"query-commands\"}{\"execute\": \"query-commands\"}");
        drop(c);
    }
    assert_eq!(
        survivor.cmd("query-status", json!({})),
        json!({"return": {"status": "running", "singlestep": false, "running": true}})
    );
    // Events still reach the survivor.
    assert_eq!(survivor.cmd("stop", json!({})), json!({"return": {}}));
    survivor.event("STOP");
}

#[test]
fn two_clients_share_the_vm_and_both_get_events() {
    let vm = Vm::start(&[]);
    let mut a = vm.negotiated();
    let mut b = vm.negotiated();
    // A client still negotiating gets no events.
    let mut pending = vm.client();
    assert_eq!(a.cmd("stop", json!({})), json!({"return": {}}));
    a.event("STOP");
    b.event("STOP");
    assert_eq!(
        b.cmd("query-status", json!({}))["return"]["status"],
        "paused"
    );
    // stop again: nothing changes, no event.
    assert_eq!(b.cmd("stop", json!({})), json!({"return": {}}));
    assert_eq!(b.cmd("cont", json!({})), json!({"return": {}}));
    let resume = a.event("RESUME");
    assert!(resume["timestamp"]["seconds"].as_u64().unwrap() > 0);
    assert!(resume["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    b.event("RESUME");
    assert!(
        a.events.is_empty() && b.events.is_empty(),
        "no event for the second stop"
    );
    assert_eq!(
        pending.cmd("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
    assert_eq!(
        pending.cmd("query-status", json!({}))["return"]["running"],
        true
    );
    assert!(
        pending.events.is_empty(),
        "events before negotiation are not sent"
    );
}

#[test]
fn quit_replies_reports_shutdown_and_exits_cleanly() {
    let mut vm = Vm::start(&[]);
    let mut a = vm.negotiated();
    let mut b = vm.negotiated();
    c_quit(&mut a);
    let shutdown = b.event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(vm.wait_exit(), 0);
    assert!(!vm.sock.exists(), "the socket is removed at exit");
}

fn c_quit(c: &mut Client) {
    assert_eq!(c.cmd("quit", json!({})), json!({"return": {}}));
}

/// QEMU's `qemu_system_killed`: SIGTERM, SIGINT and SIGHUP each end the VM, even under
/// `-no-shutdown`: clients see `SHUTDOWN` with reason `host-signal`, qomvm names the signal
/// and its sender in QEMU's words, and exits with status 0.
#[test]
fn host_signals_shut_the_vm_down_cleanly() {
    let me = std::env::args().next().unwrap();
    for (signal, number) in [(libc::SIGTERM, 15), (libc::SIGINT, 2), (libc::SIGHUP, 1)] {
        let mut vm = Vm::start(&["-M", "pc", "-no-shutdown"]);
        let mut c = vm.negotiated();
        // SAFETY: kill() with the pid of our own child.
        assert_eq!(unsafe { libc::kill(vm.child.id() as i32, signal) }, 0);
        let shutdown = c.event("SHUTDOWN");
        assert_eq!(
            shutdown["data"],
            json!({"guest": false, "reason": "host-signal"}),
            "signal {number}"
        );
        assert_eq!(vm.wait_exit(), 0, "signal {number}: {}", vm.stderr());
        let line = format!(
            "qomvm: terminating on signal {number} from pid {} ({me})",
            std::process::id()
        );
        assert!(
            vm.stderr().contains(&line),
            "no '{line}' in:\n{}",
            vm.stderr()
        );
    }
}

#[test]
fn start_paused_then_cont_and_reset() {
    let vm = Vm::start(&["-S"]);
    let mut c = vm.negotiated();
    assert_eq!(
        c.cmd("query-status", json!({}))["return"],
        json!({"status": "prelaunch", "singlestep": false, "running": false})
    );
    assert_eq!(c.cmd("cont", json!({})), json!({"return": {}}));
    c.event("RESUME");
    assert_eq!(c.cmd("system_reset", json!({})), json!({"return": {}}));
    let reset = c.event("RESET");
    assert_eq!(
        reset["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    assert_eq!(
        c.cmd("query-status", json!({}))["return"]["status"],
        "running"
    );
}

#[test]
fn no_reboot_turns_system_reset_into_a_shutdown() {
    let mut vm = Vm::start(&["-no-reboot"]);
    let mut c = vm.negotiated();
    assert_eq!(c.cmd("system_reset", json!({})), json!({"return": {}}));
    let shutdown = c.event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    assert_eq!(vm.wait_exit(), 0);
}

#[test]
fn qom_commands_list_get_and_set() {
    let vm = Vm::start(&["-name", "guest=qmp-test", "-m", "16M"]);
    let mut c = vm.negotiated();
    let list = c.cmd("qom-list", json!({"path": "/machine"}))["return"].clone();
    let list = list.as_array().unwrap();
    assert!(list.contains(&json!({"name": "type", "type": "str"})));
    assert!(list.contains(&json!({"name": "peripheral", "type": "child<container>"})));
    assert_eq!(
        c.cmd(
            "qom-get",
            json!({"path": "/machine", "property": "graphics"})
        ),
        json!({"return": true})
    );
    assert_eq!(
        c.cmd(
            "qom-set",
            json!({"path": "/machine", "property": "graphics", "value": false})
        ),
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd(
            "qom-get",
            json!({"path": "/machine", "property": "graphics"})
        ),
        json!({"return": false})
    );
    assert_eq!(
        c.cmd(
            "qom-set",
            json!({"path": "/machine", "property": "graphics", "value": "yes"})
        ),
        error(
            "GenericError",
            "Invalid parameter type for 'graphics', expected: boolean"
        )
    );
    assert_eq!(
        c.cmd("query-name", json!({})),
        json!({"return": {"name": "qmp-test"}})
    );
    assert_eq!(
        c.cmd("query-kvm", json!({})),
        json!({"return": {"enabled": false, "present": true}})
    );
    let types = c.cmd(
        "qom-list-types",
        json!({"implements": "machine", "abstract": true}),
    )["return"]
        .clone();
    let types = types.as_array().unwrap();
    assert!(types.contains(&json!({"name": "machine", "abstract": true, "parent": "object"})));
    assert!(types.contains(&json!({"name": "none-machine", "parent": "machine"})));
    let concrete = c.cmd("qom-list-types", json!({"implements": "machine"}))["return"].clone();
    assert!(!concrete
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "machine"));
    let props = c.cmd(
        "device-list-properties",
        json!({"typename": "isa-debug-exit"}),
    )["return"]
        .clone();
    assert!(props.as_array().unwrap().contains(&json!({
        "name": "iobase", "type": "uint16", "description": "First I/O port", "default-value": 1281
    })));
    assert!(!props
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "realized"));
    assert_eq!(
        c.cmd("device-list-properties", json!({"typename": "device"})),
        error(
            "GenericError",
            "Parameter 'typename' expects non-abstract device type"
        )
    );
    assert_eq!(
        c.cmd("device-list-properties", json!({"typename": "nothing"})),
        error("DeviceNotFound", "Device 'nothing' not found")
    );
    let machine_props =
        c.cmd("qom-list-properties", json!({"typename": "none-machine"}))["return"].clone();
    assert!(machine_props
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "unattached" && p["type"] == "child<container>"));
    let commands = c.cmd("query-commands", json!({}))["return"].clone();
    for name in [
        "qmp_capabilities",
        "query-version",
        "query-status",
        "qom-list",
        "qom-get",
        "qom-set",
        "stop",
        "cont",
        "quit",
        "human-monitor-command",
    ] {
        assert!(
            commands
                .as_array()
                .unwrap()
                .contains(&json!({"name": name})),
            "query-commands lists {name}"
        );
    }
    let machines = c.cmd("query-machines", json!({}))["return"].clone();
    assert!(machines
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "none" && m["cpu-max"] == 1 && m["acpi"] == false));
}

#[test]
fn the_pc_board_has_cpus_and_a_power_button() {
    let vm = Vm::start(&["-M", "pc", "-smp", "2"]);
    let mut c = vm.negotiated();
    let cpus = c.cmd("query-cpus-fast", json!({}))["return"].clone();
    let cpus = cpus.as_array().unwrap();
    assert_eq!(cpus.len(), 2);
    assert_eq!(cpus[1]["cpu-index"], 1);
    assert_eq!(cpus[1]["target"], "x86_64");
    assert_eq!(
        cpus[1]["props"],
        // QEMU 7.2 -M pc -smp 2: two cores of one socket.
        json!({"core-id": 1, "thread-id": 0, "socket-id": 0})
    );
    let path = cpus[1]["qom-path"].as_str().unwrap().to_string();
    assert_eq!(
        c.cmd("qom-get", json!({"path": path, "property": "type"})),
        json!({"return": "qemu64-x86_64-cpu"})
    );
    let defs = c.cmd("query-cpu-definitions", json!({}))["return"].clone();
    let qemu64 = defs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "qemu64")
        .expect("qemu64 is listed");
    assert_eq!(qemu64["typename"], "qemu64-x86_64-cpu");
    assert_eq!(qemu64["alias-of"], "qemu64-v1");
    assert_eq!(qemu64["static"], false);
    assert_eq!(qemu64["migration-safe"], true);
    assert_eq!(qemu64["deprecated"], false);
    assert!(qemu64["unavailable-features"].is_array());
    assert_eq!(c.cmd("system_powerdown", json!({})), json!({"return": {}}));
    c.event("POWERDOWN");
    let hmp = |c: &mut Client, line: &str| {
        c.cmd("human-monitor-command", json!({"command-line": line}))["return"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let tree = hmp(&mut c, "info qom-tree");
    assert!(
        tree.starts_with("/machine (pc-i440fx-10.0-machine)\r\n")
            && tree.contains("\r\n  /i440fx (i440FX-pcihost)\r\n"),
        "{tree}"
    );
    assert!(
        tree.contains("\r\n    /device[0] (qemu64-x86_64-cpu)\r\n"),
        "{tree}"
    );
    let qtree = hmp(&mut c, "info qtree");
    assert!(
        qtree.starts_with("bus: main-system-bus\r\n  type System\r\n"),
        "{qtree}"
    );
    assert!(
        qtree.contains("      bus: pci.0\r\n        type PCI\r\n"),
        "{qtree}"
    );
    assert!(
        qtree.contains("        dev: PIIX4_PM, id \"\"\r\n          addr = \"01.3\"\r\n"),
        "{qtree}"
    );
    let mtree = hmp(&mut c, "info mtree");
    assert!(
        mtree.contains(
            "address-space: I/O\r\n  0000000000000000-000000000000ffff (prio 0, i/o): io\r\n"
        ),
        "{mtree}"
    );
    assert!(
        mtree.contains("    0000000000000600-000000000000063f (prio 0, i/o): acpi-pm\r\n"),
        "{mtree}"
    );
    assert!(
        mtree.contains("    0000000000000000-0000000007ffffff (prio 0, ram): ram\r\n"),
        "{mtree}"
    );
    assert_eq!(
        hmp(&mut c, "info cpus"),
        "* CPU #0: thread_id=0\r\n  CPU #1: thread_id=0\r\n"
    );
    assert_eq!(
        c.cmd(
            "human-monitor-command",
            json!({"command-line": "info cpus", "cpu-index": 1})
        )["return"],
        "  CPU #0: thread_id=0\r\n* CPU #1: thread_id=0\r\n"
    );
    assert_eq!(
        hmp(&mut c, "info registers"),
        "Error: the qtest accelerator runs no guest code: there is no CPU register state to show\r\n"
    );
    assert_eq!(
        hmp(&mut c, "x /2wx 0x1000"),
        "Error: the qtest accelerator runs no guest code: there is no CPU register state to show\r\n"
    );
    // Ports, as QEMU's `o` and `i` (RTC status register D: valid RAM and time).
    assert_eq!(hmp(&mut c, "o /b 0x70 0x0d"), "");
    assert_eq!(hmp(&mut c, "i /b 0x71"), "portb[0x0071] = 0x80\r\n");
    assert_eq!(hmp(&mut c, "i /b 0x70 0x0d"), "portb[0x0071] = 0x80\r\n");
    // Port 0x10000 wraps to 0: the DMA controller's channel 0 address, read through its
    // flip-flop (QEMU's pc answers the same).
    assert_eq!(hmp(&mut c, "i /h 0x10000"), "portw[0x0000] = 0x0000\r\n");
    assert_eq!(hmp(&mut c, "cpu 1"), "");
    assert_eq!(hmp(&mut c, "cpu 9"), "invalid CPU index\r\n");
    assert_eq!(hmp(&mut c, "qom-get /machine/pm addr"), "\"01.3\"\r\n");
    assert_eq!(hmp(&mut c, "bogus"), "unknown command: 'bogus'\r\n");
}

#[test]
fn qmp_over_tcp_on_loopback() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(["-M", "none", "-accel", "qtest", "-qmp", &addr])
        .env("RUST_LOG", "off")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no QMP port: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut c = Client::from_parts(Box::new(stream.try_clone().unwrap()), Box::new(stream));
    assert!(c.recv().get("QMP").is_some());
    assert_eq!(c.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
    c_quit(&mut c);
    assert!(child.wait().unwrap().success());
}

#[test]
fn non_loopback_tcp_is_refused() {
    let o = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args([
            "-M",
            "none",
            "-accel",
            "qtest",
            "-qmp",
            "tcp:0.0.0.0:4444,server=on,wait=off",
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "qomvm: -qmp tcp:0.0.0.0:4444,server=on,wait=off: the monitor only listens on loopback addresses (127.0.0.1, ::1, localhost), not '0.0.0.0'\n"
    );
}

#[test]
fn qmp_on_stdio() {
    // On pc, the default serial port would also read stdin: it goes without a terminal
    // when a monitor has stdio, as QEMU's default serial never takes it then.
    for machine in ["none", "pc"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
            .args(["-M", machine, "-accel", "qtest", "-qmp", "stdio"])
            .env("RUST_LOG", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut c = Client::from_parts(Box::new(stdout), Box::new(stdin));
        // stdio is no socket: QEMU offers no oob there.
        assert_eq!(c.recv()["QMP"]["capabilities"], json!([]));
        assert_eq!(
            c.cmd("qmp_capabilities", json!({"enable": ["oob"]})),
            error("GenericError", "Capability oob not available")
        );
        assert_eq!(c.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
        assert_eq!(c.cmd("stop", json!({})), json!({"return": {}}));
        c.event("STOP");
        c_quit(&mut c);
        assert!(child.wait().unwrap().success(), "-M {machine}");
    }
}

#[test]
fn hmp_on_stdio() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args([
            "-M", "none", "-accel", "qtest", "-monitor", "stdio", "-name", "hmp-test",
        ])
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"info status\nstop\ninfo status\ninfo name\nqom-list /machine/peripheral\nqom-get /machine type\ninfo qom-tree\ncont\ninfo status\nquit\n")
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        out,
        "qomvm 0.1.0 monitor - type 'help' for more information\r\n\
         (qemu) VM status: running\r\n\
         (qemu) (qemu) VM status: paused\r\n\
         (qemu) hmp-test\r\n\
         (qemu) type (str)\r\n\
         (qemu) \"none-machine\"\r\n\
         (qemu) /machine (none-machine)\r\n  /peripheral (container)\r\n  /peripheral-anon (container)\r\n  /unattached (container)\r\n\
         (qemu) (qemu) VM status: running\r\n\
         (qemu) "
    );
}

#[test]
fn stdio_cannot_serve_two_monitors() {
    let o = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args([
            "-M", "none", "-accel", "qtest", "-monitor", "stdio", "-qmp", "stdio",
        ])
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "qomvm: cannot use stdio by multiple character devices\n"
    );
}

#[test]
fn on_kvm_cpus_report_their_vcpu_threads_and_registers() {
    if !kvm_usable() {
        return;
    }
    // -S: the vCPU thread exists but runs no code (this machine has no firmware).
    let vm = Vm::start(&["-accel", "kvm", "-cpu", "qemu64", "-m", "16M", "-S"]);
    let mut c = vm.negotiated();
    assert_eq!(
        c.cmd("query-kvm", json!({})),
        json!({"return": {"enabled": true, "present": true}})
    );
    let cpus = c.cmd("query-cpus-fast", json!({}))["return"].clone();
    let tid = cpus[0]["thread-id"].as_u64().unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", vm.child.id()))
        .expect("thread-id is a thread of qomvm");
    assert_eq!(comm.trim(), "CPU 0/KVM");
    let regs = c.cmd(
        "human-monitor-command",
        json!({"command-line": "info registers"}),
    )["return"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(regs.contains("EIP=0000fff0"), "the reset vector: {regs}");
    assert!(regs.contains("CS =f000 ffff0000"), "{regs}");
    // Paging is off at reset: virtual is physical, for `x` and `gva2gpa` alike.
    let hmp = |c: &mut Client, line: &str| {
        c.cmd("human-monitor-command", json!({"command-line": line}))["return"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(hmp(&mut c, "gva2gpa 0x12345"), "gpa: 0x12345\r\n");
    assert_eq!(
        hmp(&mut c, "x /2wx 0x1000"),
        "0000000000001000: 0x00000000 0x00000000\r\n"
    );
    assert_eq!(hmp(&mut c, "x /2wx 0x1000"), hmp(&mut c, "xp /2wx 0x1000"));
}

#[test]
fn a_client_that_stops_reading_is_dropped_without_harm() {
    let vm = Vm::start(&[]);
    let mut other = vm.negotiated();
    let mut hog = vm.negotiated();
    // 8000 replies of ~5 KB, none read while sending: more than the server queues for one
    // client (16 MiB) once the socket buffers are full.
    const REQUESTS: usize = 8000;
    let request = b"{\"execute\": \"qom-list-properties\", \"arguments\": {\"typename\": \"qemu64-x86_64-cpu\"}}";
    if let Err(e) = hog.writer.write_all(&request.repeat(REQUESTS)) {
        // The server may hang up while we are still writing.
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
    // The VM and the other client carry on meanwhile.
    assert_eq!(
        other.cmd("query-status", json!({}))["return"]["status"],
        "running"
    );
    assert_eq!(other.cmd("stop", json!({})), json!({"return": {}}));
    other.event("STOP");
    // The hog was cut off: its stream ends before all its replies.
    let mut replies = 0;
    let mut line = String::new();
    while hog.reader.read_line(&mut line).unwrap_or(0) > 0 {
        replies += 1;
        line.clear();
    }
    assert!(replies < REQUESTS, "all {replies} replies were delivered");
}

/// The name of host thread `tid` of process `pid` (`comm`, at most 15 bytes).
fn thread_name(pid: u32, tid: i64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

#[test]
fn iothreads_come_from_the_command_line_and_object_add_and_go_with_object_del() {
    let vm = Vm::start(&[
        "-object",
        "iothread,id=io0",
        "-object",
        r#"{"qom-type":"iothread","id":"io1","poll-max-ns":0}"#,
    ]);
    let pid = vm.child.id();
    let mut c = vm.negotiated();
    let list = c.cmd("query-iothreads", json!({}))["return"].clone();
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "{list:?}");
    let tid0 = list[0]["thread-id"].as_i64().unwrap();
    assert_eq!(
        list[0],
        json!({"id": "io0", "thread-id": tid0, "poll-max-ns": 32768, "poll-grow": 0,
               "poll-shrink": 0, "aio-max-batch": 0})
    );
    assert_eq!(list[1]["poll-max-ns"], 0);
    assert_eq!(thread_name(pid, tid0), "IO io0");
    assert_eq!(
        c.cmd(
            "qom-get",
            json!({"path": "/objects/io0", "property": "type"})
        ),
        json!({"return": "iothread"})
    );

    assert_eq!(
        c.cmd(
            "object-add",
            json!({"qom-type": "iothread", "id": "io2", "poll-grow": 2, "aio-max-batch": 8})
        ),
        json!({"return": {}})
    );
    let list = c.cmd("query-iothreads", json!({}))["return"].clone();
    let io2 = list.as_array().unwrap().last().unwrap().clone();
    assert_eq!(io2["id"], "io2");
    assert_eq!(io2["poll-grow"], 2);
    assert_eq!(io2["aio-max-batch"], 8);
    let tid2 = io2["thread-id"].as_i64().unwrap();
    assert_eq!(thread_name(pid, tid2), "IO io2");

    let hmp = c.cmd(
        "human-monitor-command",
        json!({"command-line": "info iothreads"}),
    );
    assert_eq!(
        hmp["return"]
            .as_str()
            .unwrap()
            .split("\r\n")
            .take(6)
            .collect::<Vec<_>>(),
        vec![
            "io0:".to_string(),
            format!("  thread_id={tid0}"),
            "  poll-max-ns=32768".to_string(),
            "  poll-grow=0".to_string(),
            "  poll-shrink=0".to_string(),
            "  aio-max-batch=0".to_string(),
        ]
    );

    for (args, desc) in [
        (
            json!({"qom-type": "iothread", "id": "io0"}),
            "attempt to add duplicate property 'io0' to object (type 'container')",
        ),
        (
            json!({"qom-type": "foo", "id": "x"}),
            "Parameter 'qom-type' does not accept value 'foo'",
        ),
        (
            json!({"qom-type": "container", "id": "x"}),
            "Parameter 'qom-type' does not accept value 'container'",
        ),
        (json!({"qom-type": "iothread"}), "Parameter 'id' is missing"),
        (
            json!({"qom-type": "iothread", "id": "x", "bogus": 1}),
            "Parameter 'bogus' is unexpected",
        ),
        (
            json!({"qom-type": "iothread", "id": "x", "poll-max-ns": "1"}),
            "Invalid parameter type for 'poll-max-ns', expected: integer",
        ),
        (
            json!({"qom-type": "iothread", "id": "x", "poll-max-ns": -1}),
            "poll-max-ns value must be in range [0, 9223372036854775807]",
        ),
        (
            json!({"qom-type": "iothread", "id": "9x"}),
            "Parameter 'id' expects an identifier",
        ),
    ] {
        assert_eq!(
            c.cmd("object-add", args.clone()),
            error("GenericError", desc),
            "{args}"
        );
    }
    // A failed object-add leaves nothing behind.
    assert_eq!(
        c.cmd("query-iothreads", json!({}))["return"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    assert_eq!(
        c.cmd("object-del", json!({"id": "io2"})),
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd("object-del", json!({"id": "io2"})),
        error("GenericError", "object 'io2' not found")
    );
    let ids: Vec<Value> = c.cmd("query-iothreads", json!({}))["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("io0"), json!("io1")]);
    // Its thread has ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    while thread_name(pid, tid2) == "IO io2" {
        assert!(
            Instant::now() < deadline,
            "IO io2 still runs after object-del"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // HMP's object_add/object_del take -object's syntax.
    let hmp = |c: &mut Client, line: &str| {
        c.cmd("human-monitor-command", json!({"command-line": line}))["return"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(hmp(&mut c, "object_add iothread,id=io3,poll-shrink=4"), "");
    assert!(hmp(&mut c, "info iothreads").contains("io3:\r\n"));
    assert_eq!(
        hmp(&mut c, "object_add bogus,id=io4"),
        "Error: Parameter 'qom-type' does not accept value 'bogus'\r\n"
    );
    assert_eq!(hmp(&mut c, "object_del io3"), "");
    assert!(!hmp(&mut c, "info iothreads").contains("io3:"));
}

/// An HMP command's output through `human-monitor-command`.
fn hmp_line(c: &mut Client, line: &str) -> String {
    let reply = c.cmd("human-monitor-command", json!({"command-line": line}));
    reply["return"]
        .as_str()
        .unwrap_or_else(|| panic!("{line}: {reply}"))
        .to_string()
}

/// The `info` commands built on QMP queries print what QEMU 7.2 prints for the same
/// machine (`-M pc -S -nodefaults` with these devices under QEMU's TCG gave every
/// expected string here), and `help info` lists them as QEMU's does.
#[test]
fn hmp_info_queries_print_qemus_lines() {
    let vm = Vm::start(&[
        "-M",
        "pc",
        "-S",
        "-nodefaults",
        "-m",
        "256",
        "-uuid",
        "12345678-9abc-def0-1234-56789abcdef0",
        "-chardev",
        "null,id=n0",
        "-device",
        "virtio-keyboard-pci",
        "-device",
        "piix3-usb-uhci",
        "-device",
        "usb-tablet",
        "-device",
        "virtio-tablet-pci",
        "-device",
        "usb-mouse",
        "-device",
        "virtio-mouse-pci",
    ]);
    let mut c = vm.negotiated();
    assert_eq!(
        hmp_line(&mut c, "info uuid"),
        "12345678-9abc-def0-1234-56789abcdef0\r\n"
    );
    // QEMU lists chardevs in its hash table's order: compare the lines as a set.
    let mut chardevs: Vec<String> = hmp_line(&mut c, "info chardev")
        .split_inclusive("\r\n")
        .map(str::to_string)
        .collect();
    chardevs.sort();
    assert_eq!(
        chardevs,
        vec![
            format!(
                "compat_monitor0: filename=unix:{},server=on\r\n",
                vm.sock.display()
            ),
            "n0: filename=null\r\n".to_string(),
        ]
    );
    assert_eq!(
        hmp_line(&mut c, "info memory_size_summary"),
        "base memory: 268435456\r\nplugged memory: 0\r\n"
    );
    assert_eq!(
        c.cmd("query-memory-size-summary", json!({})),
        json!({"return": {"base-memory": 268435456u64, "plugged-memory": 0}})
    );
    // Handler numbers count keyboards too (the PS/2 keyboard is #1, the virtio keyboard
    // #3); the PS/2 mouse gets the events until a guest driver takes another pointer.
    assert_eq!(
        hmp_line(&mut c, "info mice"),
        "  Mouse #7: QEMU Virtio Mouse\r\n\
         \x20 Mouse #6: QEMU HID Mouse\r\n\
         \x20 Mouse #5: QEMU Virtio Tablet (absolute)\r\n\
         \x20 Mouse #4: QEMU HID Tablet (absolute)\r\n\
         * Mouse #2: QEMU PS/2 Mouse\r\n"
    );
    assert_eq!(
        c.cmd("query-mice", json!({})),
        json!({"return": [
            {"index": 7, "name": "QEMU Virtio Mouse", "current": false, "absolute": false},
            {"index": 6, "name": "QEMU HID Mouse", "current": false, "absolute": false},
            {"index": 5, "name": "QEMU Virtio Tablet", "current": false, "absolute": true},
            {"index": 4, "name": "QEMU HID Tablet", "current": false, "absolute": true},
            {"index": 2, "name": "QEMU PS/2 Mouse", "current": true, "absolute": false},
        ]})
    );
    // qomvm keeps two of QEMU's capabilities and three of its parameters: their lines
    // are QEMU's, in QEMU's order.
    assert_eq!(
        hmp_line(&mut c, "info migrate_capabilities"),
        "events: off\r\nmultifd: off\r\n"
    );
    let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
    assert_eq!(
        c.cmd("migrate-set-capabilities", caps),
        json!({"return": {}})
    );
    assert_eq!(
        hmp_line(&mut c, "info migrate_capabilities"),
        "events: on\r\nmultifd: off\r\n"
    );
    assert_eq!(
        hmp_line(&mut c, "info migrate_parameters"),
        "max-bandwidth: 134217728 bytes/second\r\n\
         downtime-limit: 300 ms\r\n\
         multifd-channels: 2\r\n"
    );
    // qomvm's machines cannot hot-plug CPUs: QEMU's answer for such a machine (-M none).
    assert_eq!(
        hmp_line(&mut c, "info hotpluggable-cpus"),
        "Error: The feature 'query-hotpluggable-cpus' is not enabled\r\n"
    );
    // qtest runs no guest code: no paging state to walk.
    assert!(hmp_line(&mut c, "info tlb").starts_with("Error: the qtest accelerator"));
    assert!(hmp_line(&mut c, "info mem").starts_with("Error: the qtest accelerator"));
    // Nor local APIC or interrupt controller state: qomvm's are KVM's in-kernel ones.
    // QEMU's words for a CPU without APIC state, and for a controller it cannot show.
    assert_eq!(
        hmp_line(&mut c, "info lapic"),
        "local apic state not available\r\n"
    );
    assert_eq!(
        hmp_line(&mut c, "info lapic 0"),
        "local apic state not available\r\n"
    );
    assert_eq!(hmp_line(&mut c, "info lapic 1"), "No CPU available\r\n");
    assert_eq!(
        hmp_line(&mut c, "info pic"),
        "Interrupt controller information not available: the qtest accelerator does not \
         support in-kernel interrupt controllers.\r\n"
    );

    // `help info`: QEMU's lines, sorted by name as QEMU sorts them (`-` before `_`).
    let help = hmp_line(&mut c, "help info");
    let names: Vec<&str> = help
        .lines()
        .map(|l| l.strip_prefix("info ").unwrap().split(' ').next().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "help info is sorted");
    for line in [
        "info chardev  -- show the character devices\r\n",
        "info hotpluggable-cpus  -- Show information about hotpluggable CPUs\r\n",
        "info lapic [apic-id] -- show local apic state (apic-id: local apic to read, default \
         is which of current CPU)\r\n",
        "info mem  -- show the active virtual memory mappings\r\n",
        "info pic  -- show PIC state\r\n",
        "info memory_size_summary  -- show the amount of initially allocated and present \
         hotpluggable (if enabled) memory in bytes.\r\n",
        "info mice  -- show which guest mouse is receiving events\r\n",
        "info migrate  -- show migration status\r\n",
        "info migrate_capabilities  -- show current migration capabilities\r\n",
        "info migrate_parameters  -- show current migration parameters\r\n",
        "info tlb  -- show virtual to physical memory mappings\r\n",
        "info uuid  -- show the current VM UUID\r\n",
    ] {
        assert!(help.contains(line), "{line:?} in:\n{help}");
    }
    let at = |name: &str| names.iter().position(|n| *n == name).unwrap();
    assert!(at("mem") < at("memory_size_summary") && at("memory_size_summary") < at("mice"));
    assert!(at("migrate") < at("migrate_capabilities"));
    assert_eq!(
        hmp_line(&mut c, "help info uuid"),
        "info uuid  -- show the current VM UUID\r\n"
    );
}

/// Without a CPU or a mouse, as QEMU 7.2 says on `-M none`.
#[test]
fn hmp_info_on_an_empty_machine() {
    let vm = Vm::start(&[]);
    let mut c = vm.negotiated();
    assert_eq!(hmp_line(&mut c, "info tlb"), "No CPU available\r\n");
    assert_eq!(hmp_line(&mut c, "info mem"), "No CPU available\r\n");
    assert_eq!(hmp_line(&mut c, "info lapic"), "No CPU available\r\n");
    // No interrupt controller: QEMU prints nothing on `-M none`.
    assert_eq!(hmp_line(&mut c, "info pic"), "");
    assert_eq!(
        hmp_line(&mut c, "info mice"),
        "No mouse devices connected\r\n"
    );
    assert_eq!(c.cmd("query-mice", json!({})), json!({"return": []}));
    assert_eq!(
        hmp_line(&mut c, "info uuid"),
        "00000000-0000-0000-0000-000000000000\r\n"
    );
}

/// A multiboot (a.out kludge) kernel loaded at 1 MiB that turns on long mode paging with
/// CR3 = 0x101000 and halts. Its tables: the first 2 MiB identity-mapped by a large page
/// (the kernel runs there), a page table with three 4 KiB pages of different rights at
/// 0x200000, and a 1 GiB global page at the top of the address space. With
/// `self_mapped`, every PML4 entry but the first points back at the PML4 (a guest may
/// write that): each level of a walk under them reads the PML4 again, some 2^36 mappings
/// in all.
fn paging_kernel(self_mapped: bool) -> Vec<u8> {
    const BASE: u32 = 0x10_0000;
    const MAGIC: u32 = 0x1bad_b002;
    const FLAGS: u32 = 1 << 16;
    let mut image = vec![0u8; 0x6000];
    let header = [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC).wrapping_sub(FLAGS),
        BASE,        // header_addr
        BASE,        // load_addr
        0,           // load_end_addr: the whole file
        0,           // bss_end_addr
        BASE + 0x20, // entry
    ];
    for (i, w) in header.iter().enumerate() {
        image[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    let code: &[u8] = &[
        0xfa, // cli
        0xb8, 0x00, 0x10, 0x10, 0x00, // mov eax, 0x101000
        0x0f, 0x22, 0xd8, // mov cr3, eax
        0x0f, 0x20, 0xe0, // mov eax, cr4
        0x83, 0xc8, 0x20, // or eax, CR4.PAE
        0x0f, 0x22, 0xe0, // mov cr4, eax
        0xb9, 0x80, 0x00, 0x00, 0xc0, // mov ecx, EFER
        0x0f, 0x32, // rdmsr
        0x0d, 0x00, 0x01, 0x00, 0x00, // or eax, EFER.LME
        0x0f, 0x30, // wrmsr
        0x0f, 0x20, 0xc0, // mov eax, cr0
        0x0d, 0x00, 0x00, 0x00, 0x80, // or eax, CR0.PG
        0x0f, 0x22, 0xc0, // mov cr0, eax
        0xf4, // 1: hlt
        0xeb, 0xfd, // jmp 1b
    ];
    image[0x20..0x20 + code.len()].copy_from_slice(code);
    let mut entry = |table: usize, index: usize, value: u64| {
        let at = table + index * 8;
        image[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    entry(0x1000, 0, 0x10_2007); // PML4[0] -> PDPT 0x102000, user
    entry(0x1000, 511, 0x10_5003); // PML4[511] -> PDPT 0x105000
    entry(0x2000, 0, 0x10_3007); // PDPT[0] -> PD 0x103000
    entry(0x3000, 0, 0xa3); // PD[0]: 2 MiB at 0, writable, accessed
    entry(0x3000, 1, 0x10_4007); // PD[1] -> PT 0x104000
    entry(0x4000, 0, 0x30_0067); // 0x200000 -> 0x300000: user, writable, dirty
    entry(0x4000, 1, (1 << 63) | 0x30_1025); // 0x201000 -> 0x301000: user, NX
    entry(0x4000, 5, 0x30_5019); // 0x205000 -> 0x305000: PCD, PWT, read-only
    entry(0x5000, 511, 0x4000_0183); // 1 GiB at 0x40000000, global
    if self_mapped {
        for i in 1..512 {
            entry(0x1000, i, 0x10_1007);
        }
    }
    image
}

/// Starts `paging_kernel(self_mapped)` on KVM and waits until it turned paging on and
/// the VM is stopped; `None` (after a skip) without a usable /dev/kvm.
fn paging_guest(self_mapped: bool) -> Option<(Vm, Client)> {
    if !kvm_usable() {
        return None;
    }
    let kernel = std::env::temp_dir().join(format!(
        "qomvm-paging-kernel-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&kernel, paging_kernel(self_mapped)).unwrap();
    let vm = Vm::start(&[
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-nodefaults",
        "-m",
        "16M",
        "-kernel",
        kernel.to_str().unwrap(),
    ]);
    let mut c = vm.negotiated();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Before the kernel turns paging on, and after: the option ROM boots it.
    while !hmp_line(&mut c, "info registers").contains("CR0=8") {
        assert!(
            Instant::now() < deadline,
            "the kernel never turned paging on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&kernel);
    assert_eq!(c.cmd("stop", json!({})), json!({"return": {}}));
    Some((vm, c))
}

/// `info tlb` and `info mem` walk the current CPU's page tables from its CR3: a long-mode
/// guest's mappings, printed as QEMU 7.2 prints them for the same kernel (on KVM here,
/// and under TCG).
#[test]
fn on_kvm_info_tlb_and_info_mem_walk_the_guests_page_tables() {
    let Some((_vm, mut c)) = paging_guest(false) else {
        return;
    };
    assert_eq!(
        hmp_line(&mut c, "info tlb"),
        "0000000000000000: 0000000000000000 --P-A---W\r\n\
         0000000000200000: 0000000000300000 ---DA--UW\r\n\
         0000000000201000: 0000000000301000 X---A--U-\r\n\
         0000000000205000: 0000000000305000 -----CT--\r\n\
         ffffffffc0000000: 0000000040000000 -GP-----W\r\n"
    );
    assert_eq!(
        hmp_line(&mut c, "info mem"),
        "0000000000000000-0000000000200000 0000000000200000 -rw\r\n\
         0000000000200000-0000000000201000 0000000000001000 urw\r\n\
         0000000000201000-0000000000202000 0000000000001000 ur-\r\n\
         0000000000205000-0000000000206000 0000000000001000 -r-\r\n\
         ffffffffc0000000-0001000000000000 0000000040000000 -rw\r\n"
    );
    // `gva2gpa` and `x` walk the tables as QEMU's debug walk does (QEMU 7.2 on KVM gave
    // these lines for this kernel): presence only, so the NX page (its bit 63 reserved
    // without EFER.NXE) and the 1 GiB page (reserved on qemu64, which lacks pdpe1gb)
    // translate although the CPU itself (and KVM_TRANSLATE) would refuse them.
    assert_eq!(hmp_line(&mut c, "gva2gpa 0x200234"), "gpa: 0x300234\r\n");
    assert_eq!(hmp_line(&mut c, "gva2gpa 0x201234"), "gpa: 0x301234\r\n");
    assert_eq!(
        hmp_line(&mut c, "gva2gpa 0xffffffffc0001234"),
        "gpa: 0x40001234\r\n"
    );
    assert_eq!(
        hmp_line(&mut c, "gva2gpa 0xffffffffffffffff"),
        "gpa: 0x7fffffff\r\n"
    );
    assert_eq!(hmp_line(&mut c, "gva2gpa 0x202000"), "Unmapped\r\n");
    assert_eq!(hmp_line(&mut c, "gva2gpa 0x8000000000000"), "Unmapped\r\n");
    assert_eq!(
        hmp_line(&mut c, "x /2wx 0x201000"),
        "0000000000201000: 0x00000000 0x00000000\r\n"
    );
    // The kernel's own code, read through the 2 MiB page and physically.
    assert_eq!(
        hmp_line(&mut c, "x /4bx 0x100020"),
        "0000000000100020: 0xfa 0xb8 0x00 0x10\r\n"
    );
    // The 1 GiB page's frame is beyond the guest's 16 MiB: nothing to read there, through
    // the page or physically (QEMU 7.2's lines).
    assert_eq!(
        hmp_line(&mut c, "x /2wx 0xffffffffc0001000"),
        "ffffffffc0001000: Cannot access memory\r\n"
    );
    assert_eq!(
        hmp_line(&mut c, "xp /2wx 0x40001000"),
        "0000000040001000: Cannot access memory\r\n"
    );
}

/// A guest whose PML4 points back at itself from 511 entries maps some 2^36 pages:
/// `info tlb` stops after `MAX_LINES` lines (and `info mem` after reading `MAX_TABLES`
/// tables) with a last line that says so, in seconds, and the monitor goes on answering.
#[test]
fn on_kvm_info_tlb_of_a_self_mapped_pml4_is_bounded() {
    let Some((_vm, mut c)) = paging_guest(true) else {
        return;
    };
    let started = Instant::now();
    let tlb = hmp_line(&mut c, "info tlb");
    let lines: Vec<&str> = tlb.split_terminator("\r\n").collect();
    assert_eq!(
        lines.len(),
        (1 << 17) + 1,
        "{:?}",
        &lines[lines.len().saturating_sub(3)..]
    );
    assert_eq!(
        lines[..4],
        [
            "0000000000000000: 0000000000000000 --P-A---W",
            "0000000000200000: 0000000000300000 ---DA--UW",
            "0000000000201000: 0000000000301000 X---A--U-",
            "0000000000205000: 0000000000305000 -----CT--",
        ]
    );
    // Under PML4[1], PML4[0]'s tables serve as lower levels: its PD is a page table there,
    // whose entries (the 2 MiB page's, the page table's) are 4 KiB pages.
    assert_eq!(lines[4], "0000008000000000: 0000000000000000 ----A---W");
    assert_eq!(lines[5], "0000008000001000: 0000000000104000 -------UW");
    assert_eq!(
        lines[1 << 17],
        "(info tlb stopped after 131072 lines: qomvm prints at most that many at once)"
    );
    // `info mem` merges the mappings into fewer lines, but has as many tables to read.
    let mem = hmp_line(&mut c, "info mem");
    assert!(
        mem.starts_with(
            "0000000000000000-0000000000200000 0000000000200000 -rw\r\n\
             0000000000200000-0000000000201000 0000000000001000 urw\r\n\
             0000000000201000-0000000000202000 0000000000001000 ur-\r\n\
             0000000000205000-0000000000206000 0000000000001000 -r-\r\n\
             0000008000000000-0000008000001000 0000000000001000 -rw\r\n"
        ),
        "{mem}"
    );
    assert!(
        mem.ends_with(
            "\r\n(info mem stopped after reading 65536 page tables: qomvm walks at most that \
             many at once)\r\n"
        ),
        "{mem}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the walks took {:?}",
        started.elapsed()
    );
    assert_eq!(
        c.cmd("query-status", json!({}))["return"]["status"],
        json!("paused")
    );
}

/// `info lapic` and `info pic` show KVM's local APIC (KVM_GET_LAPIC, read on the vCPU's
/// thread) and in-kernel i8259 pair and IOAPIC (KVM_GET_IRQCHIP) in QEMU's format: the
/// state the kernel and its firmware left, in lines QEMU 7.2 prints for such state.
#[test]
fn on_kvm_info_lapic_and_info_pic_show_the_in_kernel_state() {
    let Some((_vm, mut c)) = paging_guest(false) else {
        return;
    };
    let lapic = hmp_line(&mut c, "info lapic");
    let lines: Vec<&str> = lapic.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 17, "{lapic}");
    assert_eq!(lines[0], "dumping local APIC state for CPU 0 ");
    assert_eq!(lines[1], "");
    for (i, name) in ["LVT0", "LVT1", "LVTPC", "LVTERR", "LVTTHMR", "LVTT"]
        .iter()
        .enumerate()
    {
        assert!(
            lines[2 + i].starts_with(&format!("{name}\t 0x")),
            "{}",
            lines[2 + i]
        );
    }
    // The kernel never touched these: reset values.
    assert_eq!(
        lines[4],
        "LVTPC\t 0x00010000 active-hi edge  masked                      Fixed  (vec 0)"
    );
    assert_eq!(
        lines[7],
        "LVTT\t 0x00010000 active-hi edge  masked         one-shot     Fixed  (vec 0)"
    );
    assert_eq!(
        lines[8],
        "Timer\t DCR=0x0 (divide by 2) initial_count = 0 current_count = 0"
    );
    assert!(lines[9].starts_with("SPIV\t 0x"), "{}", lines[9]);
    assert!(lines[10].starts_with("ICR\t 0x"), "{}", lines[10]);
    assert!(lines[11].starts_with("ICR2\t 0x"), "{}", lines[11]);
    assert_eq!(lines[12], "ESR\t 0x00000000");
    assert_eq!(lines[13], "ISR\t (none)");
    assert_eq!(lines[15], "");
    assert!(
        lines[16].starts_with("APR 0x00 TPR 0x00 DFR 0x0f LDR 0x"),
        "{}",
        lines[16]
    );
    // By APIC ID: CPU 0's is 0; there is no other.
    assert_eq!(hmp_line(&mut c, "info lapic 0"), lapic);
    assert_eq!(hmp_line(&mut c, "info lapic 1"), "No CPU available\r\n");

    let pic = hmp_line(&mut c, "info pic");
    let lines: Vec<&str> = pic.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 29, "{pic}");
    assert_eq!(lines[0], "ioapic0: ver=0x11 id=0x00 sel=0x00");
    for (pin, line) in lines[1..25].iter().enumerate() {
        assert!(line.starts_with(&format!("  pin {pin:<2} 0x")), "{line}");
    }
    assert!(lines[25].starts_with("  IRR      "), "{}", lines[25]);
    assert!(lines[26].starts_with("  Remote IRR "), "{}", lines[26]);
    assert!(lines[27].starts_with("pic1: irr="), "{}", lines[27]);
    assert!(lines[28].starts_with("pic0: irr="), "{}", lines[28]);
}

/// At `-S` (reset state, nothing run) qomvm's `info pic` is QEMU 7.2's, line for line,
/// and so is its `info lapic` but for LINT0 and LINT1, which qomvm's reset wires as
/// firmware would (QEMU leaves that to SeaBIOS).
#[test]
fn on_kvm_info_lapic_and_info_pic_at_reset_match_qemu() {
    if !kvm_usable() {
        return;
    }
    if !qemu_installed() {
        return;
    }
    let args = [
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-cpu",
        "qemu64",
        "-S",
        "-nodefaults",
        "-m",
        "16M",
        "-smp",
        "2",
        "-display",
        "none",
    ];
    let qemu = Vm::start_program("qemu-system-x86_64", &args);
    let mut theirs = qemu.negotiated();
    let ours_vm = Vm::start(&args);
    let mut ours = ours_vm.negotiated();
    // Both reset the PIT's channel 0 to mode 3: its first IRQ 0 edge shows in the master
    // PIC's IRR about 55 ms after the reset.
    std::thread::sleep(Duration::from_millis(200));
    let pic = hmp_line(&mut theirs, "info pic");
    assert!(pic.starts_with("ioapic0: "), "QEMU's: {pic}");
    assert!(pic.contains("pic0: irr=01 "), "QEMU's: {pic}");
    assert_eq!(hmp_line(&mut ours, "info pic"), pic);
    let theirs_lapic = hmp_line(&mut theirs, "info lapic");
    let ours_lapic = hmp_line(&mut ours, "info lapic");
    let without_lint = |text: &str| -> Vec<String> {
        text.split_terminator("\r\n")
            .filter(|l| !l.starts_with("LVT0\t") && !l.starts_with("LVT1\t"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(without_lint(&ours_lapic), without_lint(&theirs_lapic));
    assert_eq!(without_lint(&ours_lapic).len(), 15);
    for text in [&ours_lapic, &theirs_lapic] {
        assert_eq!(text.matches("LVT0\t 0x").count(), 1, "{text}");
        assert_eq!(text.matches("LVT1\t 0x").count(), 1, "{text}");
    }
    // The second CPU's, by APIC ID.
    let ours_ap = hmp_line(&mut ours, "info lapic 1");
    assert!(
        ours_ap.starts_with("dumping local APIC state for CPU 1 \r\n"),
        "{ours_ap}"
    );
    assert_eq!(
        without_lint(&ours_ap),
        without_lint(&hmp_line(&mut theirs, "info lapic 1"))
    );
    assert_eq!(
        hmp_line(&mut ours, "info lapic 7"),
        hmp_line(&mut theirs, "info lapic 7")
    );
}

/// A BIOS that, on its first boot only (a CMOS byte remembers), programs what a machine
/// reset must undo: both PICs initialised (vector bases 0x20/0x28, masks, ELCR), the PIT's
/// channel 0 as a one-shot, an IOAPIC pin unmasked (through big real mode: DS, as PVM
/// does not emulate loading FS there); then halts with interrupts off.
fn interrupt_controller_bios() -> Vec<u8> {
    const GDT_AT: usize = 0xe000;
    let mut code: Vec<u8> = vec![0xfa]; // cli
                                        // mov al, 0x4f; out 0x70, al; in al, 0x71; cmp al, 0xa5; jne first (skip the jmp)
    code.extend([0xb0, 0x4f, 0xe6, 0x70, 0xe4, 0x71, 0x3c, 0xa5, 0x75, 0x03]);
    let park_jump = code.len();
    code.extend([0xe9, 0x00, 0x00]); // jmp park (patched)
                                     // mov al, 0x4f; out 0x70, al; mov al, 0xa5; out 0x71, al
    code.extend([0xb0, 0x4f, 0xe6, 0x70, 0xb0, 0xa5, 0xe6, 0x71]);
    let outs: [(u8, u8); 13] = [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xfb),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0xa1, 0xfe),
        // The PIT's channel 0: mode 0, count 0xffff (one IRQ 0 edge, 55 ms on).
        (0x43, 0x30),
        (0x40, 0xff),
        (0x40, 0xff),
    ];
    for (port, value) in outs {
        code.extend([0xb0, value, 0xe6, port]); // mov al, value; out port, al
    }
    // ELCR: IRQs 9-11 level-triggered. mov dx, 0x4d1; mov al, 0x0e; out dx, al
    code.extend([0xba, 0xd1, 0x04, 0xb0, 0x0e, 0xee]);
    // Big real mode: lgdt [cs:GDT_AT + 24]; PE on; ds = flat data; PE off.
    code.extend([0x2e, 0x0f, 0x01, 0x16]);
    code.extend(((GDT_AT + 24) as u16).to_le_bytes());
    code.extend([0x0f, 0x20, 0xc0, 0x0c, 0x01, 0x0f, 0x22, 0xc0]);
    code.extend([0xbb, 0x10, 0x00, 0x8e, 0xdb]); // mov bx, 0x10; mov ds, bx
    code.extend([0x24, 0xfe, 0x0f, 0x22, 0xc0]); // and al, 0xfe; mov cr0, eax
                                                 // mov edi, 0xfec00000; mov dword [edi], 0x1a (pin 5's low word);
                                                 // mov dword [edi+0x10], 0x35 (vector 0x35, unmasked, edge)
    code.extend([0x66, 0xbf, 0x00, 0x00, 0xc0, 0xfe]);
    code.extend([0x67, 0x66, 0xc7, 0x07, 0x1a, 0, 0, 0]);
    code.extend([0x67, 0x66, 0xc7, 0x47, 0x10, 0x35, 0, 0, 0]);
    let park = code.len();
    code.extend([0xf4, 0xeb, 0xfd]); // park: hlt; jmp park
    let rel = (park as i32 - (park_jump as i32 + 3)) as i16;
    code[park_jump + 1..park_jump + 3].copy_from_slice(&rel.to_le_bytes());
    let mut bios = bios_image(&code);
    // Accessed bits set: the CPU would otherwise write them into the ROM.
    let gdt: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, entry) in gdt.iter().enumerate() {
        bios[GDT_AT + 8 * i..GDT_AT + 8 * i + 8].copy_from_slice(&entry.to_le_bytes());
    }
    // The pseudo-descriptor: limit, then the GDT's physical address (BIOS at 0xf0000).
    bios[GDT_AT + 24..GDT_AT + 26].copy_from_slice(&23u16.to_le_bytes());
    bios[GDT_AT + 26..GDT_AT + 30].copy_from_slice(&(0xf_0000u32 + GDT_AT as u32).to_le_bytes());
    bios
}

/// `system_reset` puts the in-kernel PICs, IOAPIC and PIT back in QEMU's reset state:
/// after a firmware programmed them (and not again after the reset), qomvm's `info pic`
/// is QEMU 7.2's, line for line, before and after the reset.
#[test]
fn on_kvm_system_reset_resets_the_pics_ioapic_and_pit_as_qemu() {
    if !kvm_usable() {
        return;
    }
    if !qemu_installed() {
        return;
    }
    let (dir, args) = bios_vm_args("intc-reset", &interrupt_controller_bios());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qemu = Vm::start_program("qemu-system-x86_64", &args);
    let mut theirs = qemu.negotiated();
    let ours_vm = Vm::start(&args);
    let mut ours = ours_vm.negotiated();
    // The firmware's work, once both have done it (and the PIT's one-shot has fired).
    let programmed = |c: &mut Client, who: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pic = hmp_line(c, "info pic");
            if pic.contains("imr=fb") && pic.contains("vec=53") {
                std::thread::sleep(Duration::from_millis(200));
                return hmp_line(c, "info pic");
            }
            assert!(
                Instant::now() < deadline,
                "{who}: the firmware never ran: {pic}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let before = programmed(&mut theirs, "QEMU");
    assert!(before.contains("elcr=0e"), "QEMU's: {before}");
    assert_eq!(programmed(&mut ours, "qomvm"), before, "before the reset");
    for c in [&mut theirs, &mut ours] {
        let r = c.cmd("system_reset", json!({}));
        assert!(r.get("return").is_some(), "{r}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = hmp_line(&mut theirs, "info pic");
    assert!(
        after.contains("pic0: irr=01 imr=00 isr=00 hprio=0 irq_base=00"),
        "QEMU's: {after}"
    );
    assert!(!after.contains("vec=53"), "QEMU's: {after}");
    assert_eq!(hmp_line(&mut ours, "info pic"), after, "after the reset");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A BIOS that counts IRQ 0 in the word at 0x500: the local APIC off, the PIC at vector
/// base 0x20 with only IRQ 0 unmasked, the PIT's channel 0 at 1 kHz (mode 2), interrupts on, `hlt` for ever.
fn pit_tick_counter_bios() -> Vec<u8> {
    const HANDLER: u16 = 0x100;
    let mut code: Vec<u8> = vec![0xfa, 0x31, 0xc0, 0x8e, 0xd8]; // cli; xor ax, ax; mov ds, ax
    code.extend([0xc7, 0x06, 0x00, 0x05, 0x00, 0x00]); // mov word [0x500], 0
    code.extend([0xc7, 0x06, 0x80, 0x00]); // mov word [0x80], HANDLER (IVT entry 0x20)
    code.extend(HANDLER.to_le_bytes());
    code.extend([0xc7, 0x06, 0x82, 0x00, 0x00, 0xf0]); // mov word [0x82], 0xf000
    code.extend([0x8e, 0xd0, 0xbc, 0x00, 0x70]); // mov ss, ax; mov sp, 0x7000
                                                 // The local APIC off (IA32_APIC_BASE bit 11), so the PIC's interrupts reach the CPU
                                                 // whatever LINT0 says (QEMU leaves it masked for firmware to set).
                                                 // mov ecx, 0x1b; rdmsr; and ax, 0xf7ff; wrmsr
    code.extend([
        0x66, 0xb9, 0x1b, 0x00, 0x00, 0x00, 0x0f, 0x32, 0x25, 0xff, 0xf7, 0x0f, 0x30,
    ]);
    let outs: [(u8, u8); 13] = [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xfe),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0xa1, 0xff),
        // Channel 0, low then high byte, mode 2: 1193 (0x4a9) ticks of 1.193 MHz.
        (0x43, 0x34),
        (0x40, 0xa9),
        (0x40, 0x04),
    ];
    for (port, value) in outs {
        code.extend([0xb0, value, 0xe6, port]);
    }
    code.extend([0xfb, 0xf4, 0xeb, 0xfd]); // sti; 1: hlt; jmp 1b
    let mut bios = bios_image(&code);
    // inc word [0x500]; push ax; mov al, 0x20; out 0x20, al (EOI); pop ax; iret
    let handler = [
        0xff, 0x06, 0x00, 0x05, 0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf,
    ];
    bios[HANDLER as usize..HANDLER as usize + handler.len()].copy_from_slice(&handler);
    bios
}

/// A 64 KiB BIOS (mapped at 0xf0000): `code` at its start, where the reset vector jumps
/// (`jmp far f000:0000`).
fn bios_image(code: &[u8]) -> Vec<u8> {
    let mut bios = vec![0xffu8; 0x1_0000];
    bios[..code.len()].copy_from_slice(code);
    bios[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    bios
}

/// A VM stopped for a while and continued gets no burst of the PIT ticks its timer
/// counted meanwhile (KVM re-injects missed ticks one by one as the guest acknowledges
/// them): the PIT starts its period afresh when the VM runs again, as QEMU's `kvm-pit`
/// does. Checked on QEMU 7.2 and qomvm: a guest counting a 1 kHz IRQ 0 sees about 300
/// ticks in the 300 ms after `cont`, not the 2000 of the stop on top.
#[test]
fn on_kvm_a_continued_vm_gets_no_burst_of_pit_ticks_missed_while_stopped() {
    if !kvm_usable() {
        return;
    }
    let (dir, args) = bios_vm_args("pit-cont", &pit_tick_counter_bios());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qemu_installed = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    let mut vmms = vec![("qomvm", env!("CARGO_BIN_EXE_qomvm"))];
    if qemu_installed {
        vmms.push(("QEMU", "qemu-system-x86_64"));
    }
    for (who, program) in vmms {
        let vm = Vm::start_program(program, &args);
        let mut c = vm.negotiated();
        let file = dir.join(format!("{who}.ticks"));
        let ticks = |c: &mut Client| -> u16 {
            let r = c.cmd(
                "pmemsave",
                json!({"val": 0x500, "size": 2, "filename": file.to_str().unwrap()}),
            );
            assert!(r.get("return").is_some(), "{who}: {r}");
            let bytes = std::fs::read(&file).unwrap();
            u16::from_le_bytes([bytes[0], bytes[1]])
        };
        // Ticking before the stop.
        let deadline = Instant::now() + Duration::from_secs(20);
        while ticks(&mut c) < 50 {
            assert!(
                Instant::now() < deadline,
                "{who}: no IRQ 0 reached the guest"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(c.cmd("stop", json!({})).get("return").is_some());
        let at_stop = ticks(&mut c);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(ticks(&mut c), at_stop, "{who}: ticks while stopped");
        assert!(c.cmd("cont", json!({})).get("return").is_some());
        std::thread::sleep(Duration::from_millis(300));
        assert!(c.cmd("stop", json!({})).get("return").is_some());
        let after = ticks(&mut c).wrapping_sub(at_stop);
        assert!(
            (50..1000).contains(&after),
            "{who}: {after} ticks in the 300 ms after cont (a burst of those missed while stopped?)"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A QAPI `int` argument of 2^63 or more (a JSON number only a uint64 holds) is refused
/// as QEMU 7.2 refuses it, not read as 0 or as absent: `pmemsave` from address 0, a
/// balloon target of 0 bytes, an unfiltered dump.
#[test]
fn integers_beyond_int64_are_refused_as_qemu_refuses_them() {
    if !qemu_installed() {
        return;
    }
    let common = [
        "-M",
        "pc",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "16M",
    ];
    let (qemu, ours_vm) = qemu_and_qomvm(&common);
    let (mut theirs, mut ours) = (qemu.negotiated(), ours_vm.negotiated());
    let big = json!(9_223_372_036_854_775_808u64);
    let file = std::env::temp_dir().join(format!("qomvm-bigint-{}", std::process::id()));
    let file = file.to_str().unwrap();
    for (command, args) in [
        (
            "pmemsave",
            json!({"val": big, "size": 16, "filename": file}),
        ),
        ("pmemsave", json!({"val": 0, "size": big, "filename": file})),
        (
            "memsave",
            json!({"val": 0, "size": 16, "filename": file, "cpu-index": big}),
        ),
        (
            "dump-guest-memory",
            json!({"paging": false, "protocol": format!("file:{file}"), "begin": big, "length": 4096}),
        ),
        ("balloon", json!({"value": big})),
        (
            "human-monitor-command",
            json!({"command-line": "info status", "cpu-index": big}),
        ),
        ("remove-fd", json!({"fdset-id": big})),
        ("screendump", json!({"filename": file, "head": big})),
        (
            "block_set_io_throttle",
            json!({"device": "nosuch", "bps": big, "bps_rd": 0,
            "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}),
        ),
        ("block_resize", json!({"device": "nosuch", "size": big})),
        (
            "send-key",
            json!({"keys": [{"type": "qcode", "data": "a"}], "hold-time": big}),
        ),
        ("input-send-event", json!({"events": [], "head": big})),
    ] {
        assert_eq!(
            ours.cmd(command, args.clone()),
            theirs.cmd(command, args.clone()),
            "{command} {args}"
        );
    }
    let _ = std::fs::remove_file(file);
}

/// The machine queries libvirt asks at start-up answer as QEMU 7.2's for the same machine:
/// `query-current-machine` (whether `virsh dompmsuspend` may use S3), `query-acpi-ospm-
/// status` (refused without ACPI), `query-memory-devices`; `query-chardev-backends` lists
/// only backends QEMU has too.
#[test]
fn machine_queries_answer_as_qemus() {
    if !qemu_installed() {
        return;
    }
    for machine in ["pc", "pc,acpi=off", "none"] {
        let common = ["-M", machine, "-S", "-nodefaults", "-display", "none"];
        let (qemu, ours_vm) = qemu_and_qomvm(&common);
        let (mut theirs, mut ours) = (qemu.negotiated(), ours_vm.negotiated());
        for query in [
            "query-current-machine",
            "query-acpi-ospm-status",
            "query-memory-devices",
        ] {
            assert_eq!(
                ours.cmd(query, json!({})),
                theirs.cmd(query, json!({})),
                "{query} on -M {machine}"
            );
        }
        let names = |c: &mut Client| -> Vec<String> {
            c.cmd("query-chardev-backends", json!({}))["return"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        };
        let qemus = names(&mut theirs);
        for name in names(&mut ours) {
            assert!(
                qemus.contains(&name),
                "{name} is not one of QEMU's {qemus:?}"
            );
        }
    }
}

/// Whether /dev/kvm can be opened read-write; if not, the calling test skips, saying why.
fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            test_support::skip::skip_kvm(format!("/dev/kvm not usable: {e}"));
            false
        }
    }
}

/// Whether QEMU is installed; if not, the calling test skips, saying why.
/// QEMU on TCG and qomvm on qtest with the same `common` arguments.
fn qemu_and_qomvm(common: &[&str]) -> (Vm, Vm) {
    (
        Vm::start_program("qemu-system-x86_64", &[common, &["-accel", "tcg"]].concat()),
        Vm::start(&[common, &["-accel", "qtest"]].concat()),
    )
}

fn qemu_installed() -> bool {
    let installed = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    if !installed {
        test_support::skip::skip("qemu-system-x86_64 (package qemu-system-x86) is not installed");
    }
    installed
}

/// `bios` written into a directory of its own (`name`), and the arguments of a small pc
/// on KVM that runs it: the same for QEMU and qomvm.
fn bios_vm_args(name: &str, bios: &[u8]) -> (std::path::PathBuf, Vec<String>) {
    let dir = std::env::temp_dir().join(format!("qomvm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bios.bin");
    std::fs::write(&path, bios).unwrap();
    let mut args: Vec<String> = [
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-cpu",
        "qemu64",
        "-nodefaults",
        "-m",
        "16M",
        "-display",
        "none",
        "-bios",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(path.display().to_string());
    (dir, args)
}
