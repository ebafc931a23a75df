//! QMP fuzzing (issue 19, item 5): every command of `query-commands` with arguments made
//! from `query-qmp-schema` (right and wrong types, missing and extra members), random JSON
//! documents, byte-level mutations of valid commands, huge and deeply nested documents, and
//! disconnects in the middle of a document. qomvm must answer each complete document with a
//! reply or a QMP error, keep the connection, and answer `query-status` after every case.
//!
//! `QOMVM_FUZZ_SEED=N` and `QOMVM_FUZZ_ITERATIONS=N` (0: for ever) run it by hand.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use test_support::fuzz::{FuzzRun, Rng};

/// How long a reply may take before the case counts as a hang.
const REPLY_BOUND: Duration = Duration::from_secs(15);

/// Commands that end qomvm by design.
const ENDS_QOMVM: &[&str] = &["quit"];

struct Vm {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Vm {
    fn start() -> Vm {
        let dir = std::env::temp_dir().join(format!("qomvm-fuzz-qmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
        let sock = dir.join("qmp.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
            .args([
                "-M", "pc", "-accel", "qtest", "-m", "64", "-display", "none",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(["-no-shutdown", "-action", "panic=none"])
            .args(["-drive", "file=disk.raw,format=raw,if=none,id=d0"])
            .args(["-device", "virtio-blk-pci,drive=d0,id=blk0"])
            .args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,id=net0",
            ])
            .args(["-object", "iothread,id=io0"])
            .env("RUST_LOG", "off")
            // Files a command writes (screendump, memsave...) land here.
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Vm { child, dir, sock }
    }

    fn connect(&mut self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("qomvm exited ({status}) before its QMP socket was there");
                    }
                    assert!(Instant::now() < deadline, "no QMP socket: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        stream.set_read_timeout(Some(REPLY_BOUND)).unwrap();
        let mut client = Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = client.recv().expect("a greeting");
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        client
            .send(b"{\"execute\":\"qmp_capabilities\"}\n")
            .unwrap();
        let reply = client.reply().expect("qmp_capabilities answered");
        assert_eq!(reply, json!({"return": {}}));
        client
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
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    fn recv(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("qomvm closed the connection".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line}")),
            Err(e) => Err(format!("no reply within {REPLY_BOUND:?}: {e}")),
        }
    }

    /// The next reply (`return` or `error`), past events.
    fn reply(&mut self) -> Result<Value, String> {
        loop {
            let message = self.recv()?;
            if message.get("return").is_some() || message.get("error").is_some() {
                return Ok(message);
            }
            if message.get("event").is_none() {
                return Err(format!("neither a reply nor an event: {message}"));
            }
        }
    }
}

/// Argument types from `query-qmp-schema`, by name.
struct Schema {
    types: HashMap<String, Value>,
    /// Command name -> its argument type's name.
    commands: HashMap<String, String>,
}

impl Schema {
    fn new(entries: &[Value]) -> Schema {
        let mut types = HashMap::new();
        let mut commands = HashMap::new();
        for entry in entries {
            let name = entry["name"].as_str().unwrap_or_default().to_string();
            if entry["meta-type"] == "command" {
                if let Some(arg) = entry["arg-type"].as_str() {
                    commands.insert(name.clone(), arg.to_string());
                }
            }
            types.insert(name, entry.clone());
        }
        Schema { types, commands }
    }

    /// A value for type `name`: mostly of the right shape, sometimes anything.
    fn value(&self, rng: &mut Rng, name: &str, depth: u32) -> Value {
        if rng.one_in(12) || depth > 4 {
            return random_json(rng, 2);
        }
        let Some(info) = self.types.get(name) else {
            return random_json(rng, 2);
        };
        match info["meta-type"].as_str().unwrap_or_default() {
            "builtin" => match info["json-type"].as_str().unwrap_or_default() {
                "string" => Value::String(random_string(rng)),
                "int" => json!(random_int(rng)),
                "number" => json!(random_int(rng) as f64 / 3.0),
                "boolean" => json!(rng.one_in(2)),
                "null" => Value::Null,
                _ => random_json(rng, 2),
            },
            "enum" => {
                let values: Vec<String> = info["values"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .or_else(|| {
                        info["members"].as_array().map(|m| {
                            m.iter()
                                .filter_map(|m| m["name"].as_str().map(String::from))
                                .collect()
                        })
                    })
                    .unwrap_or_default();
                if values.is_empty() || rng.one_in(8) {
                    Value::String(random_string(rng))
                } else {
                    Value::String(rng.pick(&values).clone())
                }
            }
            "array" => {
                let element = info["element-type"].as_str().unwrap_or_default();
                let n = rng.below(4);
                Value::Array(
                    (0..n)
                        .map(|_| self.value(rng, element, depth + 1))
                        .collect(),
                )
            }
            "alternate" => {
                let members = info["members"].as_array().cloned().unwrap_or_default();
                if members.is_empty() {
                    return random_json(rng, 2);
                }
                let member = rng.pick(&members).clone();
                self.value(rng, member["type"].as_str().unwrap_or_default(), depth + 1)
            }
            "object" => self.object(rng, name, depth),
            _ => random_json(rng, 2),
        }
    }

    /// An object of type `name`: each member present or not, an unknown member now and then.
    fn object(&self, rng: &mut Rng, name: &str, depth: u32) -> Value {
        let mut map = Map::new();
        let Some(info) = self.types.get(name) else {
            return Value::Object(map);
        };
        let mut members = info["members"].as_array().cloned().unwrap_or_default();
        // The variant members of a union: of some branch, whichever the tag says.
        if let Some(variants) = info["variants"].as_array() {
            if !variants.is_empty() {
                let variant = rng.pick(variants).clone();
                if let Some(inner) = self.types.get(variant["type"].as_str().unwrap_or_default()) {
                    members.extend(inner["members"].as_array().cloned().unwrap_or_default());
                }
                if let (Some(tag), Some(case)) = (info["tag"].as_str(), variant["case"].as_str()) {
                    map.insert(tag.to_string(), Value::String(case.to_string()));
                }
            }
        }
        for member in members {
            let member_name = member["name"].as_str().unwrap_or_default().to_string();
            let optional = member.get("default").is_some();
            if map.contains_key(&member_name) || (optional && rng.one_in(2)) || rng.one_in(20) {
                continue;
            }
            let value = if member_name == "filename" {
                // Files a command writes (pmemsave) stay in the scratch directory: qomvm
                // may run as root, and a random "/x" would land in /.
                let names = ["out.bin", "disk.raw", "missing/out.bin", "", "/dev/null"];
                Value::String(rng.pick(&names).to_string())
            } else if member_name == "protocol" {
                // dump-guest-memory's target, likewise kept in the scratch directory.
                let targets = ["file:out.core", "file:missing/x", "fd:none", "tcp:x", ""];
                Value::String(rng.pick(&targets).to_string())
            } else {
                self.value(rng, member["type"].as_str().unwrap_or_default(), depth + 1)
            };
            map.insert(member_name, value);
        }
        if rng.one_in(10) {
            map.insert(random_string(rng), random_json(rng, 2));
        }
        Value::Object(map)
    }
}

fn random_int(rng: &mut Rng) -> i64 {
    match rng.below(4) {
        0 => -(rng.below(1000) as i64),
        1 => rng.interesting_u64() as i64,
        _ => rng.below(4096) as i64,
    }
}

/// Strings a command might do something with: the VM's ids, paths in the scratch
/// directory, empty, long, odd characters.
fn random_string(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => String::new(),
        1 => rng
            .pick(&[
                "d0",
                "blk0",
                "n0",
                "net0",
                "io0",
                "/machine",
                "/machine/peripheral/blk0",
            ])
            .to_string(),
        2 => "x".repeat(rng.below(70_000) as usize),
        3 => "\u{0}\u{1f}\u{7f}é\u{fffd}\"\\/".to_string(),
        4 => rng
            .pick(&["disk.raw", "out.img", "/dev/null", "..", "."])
            .to_string(),
        _ => {
            let n = 1 + rng.below(12) as usize;
            (0..n)
                .map(|_| *rng.pick(b"abcdefghijklmnopqrstuvwxyz0123456789-_.,=:/ ") as char)
                .collect()
        }
    }
}

/// Any JSON value, up to `depth` levels of nesting.
fn random_json(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.one_in(2)),
        2 => json!(random_int(rng)),
        3 => json!(rng.next_u64() as f64 * 1e-10),
        4 => Value::String(random_string(rng)),
        5 => Value::Array(
            (0..rng.below(5))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut map = Map::new();
            for _ in 0..rng.below(5) {
                let key = if rng.one_in(2) {
                    rng.pick(&["execute", "arguments", "id", "exec-oob", "control"])
                        .to_string()
                } else {
                    random_string(rng)
                };
                map.insert(key, random_json(rng, depth - 1));
            }
            Value::Object(map)
        }
    }
}

/// A document qomvm must answer, or `None` for bytes that may not be one whole document
/// (sent, then the connection is dropped).
enum Input {
    Document(Vec<u8>),
    Garbage(Vec<u8>),
}

fn make_input(rng: &mut Rng, schema: &Schema, commands: &[String], case: u64) -> Input {
    // The first cases walk every command once; then any kind of input.
    let kind = if (case as usize) < commands.len() {
        0
    } else {
        rng.below(16)
    };
    match kind {
        0..=7 => {
            let name = if (case as usize) < commands.len() {
                commands[case as usize].clone()
            } else {
                rng.pick(commands).clone()
            };
            let mut request = Map::new();
            request.insert("execute".into(), Value::String(name.clone()));
            let arguments = match schema.commands.get(&name) {
                Some(arg_type) => schema.object(rng, arg_type, 0),
                None => random_json(rng, 2),
            };
            let arguments = if name == "human-monitor-command" {
                // HMP's `q` and `quit` end qomvm by design; anything else goes.
                let mut line = random_string(rng);
                if matches!(line.split_whitespace().next(), Some("q" | "quit")) {
                    line.insert(0, '#');
                }
                let line = rng
                    .pick(&[
                        line.as_str(),
                        "info qtree",
                        "info mtree",
                        "info pci",
                        "info block",
                    ])
                    .to_string();
                json!({ "command-line": line })
            } else {
                arguments
            };
            if !rng.one_in(8) {
                request.insert("arguments".into(), arguments);
            }
            if rng.one_in(2) {
                request.insert("id".into(), random_json(rng, 1));
            }
            Input::Document(serde_json::to_vec(&Value::Object(request)).unwrap())
        }
        8..=9 => Input::Document(serde_json::to_vec(&random_json(rng, 4)).unwrap()),
        10..=12 => {
            // A valid command, mutated: a document if it still parses.
            let name = rng.pick(commands).clone();
            let base =
                serde_json::to_vec(&json!({"execute": name, "arguments": {"id": "d0"}})).unwrap();
            let mutated = rng.mutate(&base);
            let ends = matches!(
                serde_json::from_slice::<Value>(&mutated),
                Ok(Value::Object(ref o)) if o.get("execute").and_then(Value::as_str).is_some_and(|c| ENDS_QOMVM.contains(&c))
            );
            if ends {
                Input::Document(b"{}".to_vec())
            } else if serde_json::from_slice::<Value>(&mutated).is_ok() {
                Input::Document(mutated)
            } else {
                Input::Garbage(mutated)
            }
        }
        13 => {
            // Deep nesting, as an argument and as the document.
            let depth = *rng.pick(&[64, 200, 1000, 20_000, 300_000]);
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let doc = if rng.one_in(2) {
                format!("{{\"execute\":\"query-status\",\"arguments\":{{\"x\":{nested}}}}}")
            } else {
                nested
            };
            Input::Document(doc.into_bytes())
        }
        14 => {
            // Huge: a long string, many members, or past the message limit.
            let doc = match rng.below(3) {
                0 => json!({"execute": "query-status", "arguments": {"x": "y".repeat(900_000)}}),
                1 => {
                    let members: Map<String, Value> =
                        (0..50_000).map(|i| (format!("k{i}"), json!(i))).collect();
                    json!({"execute": "qom-list", "arguments": Value::Object(members)})
                }
                _ => json!({"execute": "query-status", "id": "z".repeat(3 << 20)}),
            };
            Input::Document(serde_json::to_vec(&doc).unwrap())
        }
        _ => {
            let len = rng.below(512) as usize;
            Input::Garbage(rng.bytes(len))
        }
    }
}

#[test]
fn every_command_random_and_broken_documents_get_a_reply_and_keep_qomvm_alive() {
    let run = FuzzRun::from_env(0x1951_0050, 500);
    let started = Instant::now();
    let mut vm = Vm::start();
    let mut client = vm.connect();
    client.send(b"{\"execute\":\"query-commands\"}\n").unwrap();
    let commands: Vec<String> = client.reply().unwrap()["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .filter(|c| !ENDS_QOMVM.contains(&c.as_str()))
        .collect();
    client
        .send(b"{\"execute\":\"query-qmp-schema\"}\n")
        .unwrap();
    let schema = Schema::new(client.reply().unwrap()["return"].as_array().unwrap());
    assert!(commands.len() > 20, "{commands:?}");
    let mut replies = 0;
    let mut errors = 0;
    let mut reconnects = 0;
    for case in run.cases() {
        let mut rng = run.rng_for(case);
        let input = make_input(&mut rng, &schema, &commands, case);
        let shown =
            |bytes: &[u8]| String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).to_string();
        let context = |what: &str, bytes: &[u8], why: String| {
            format!(
                "case {case} (seed {:#x}), {what} {}: {why}",
                run.seed,
                shown(bytes)
            )
        };
        match input {
            Input::Document(mut doc) => {
                doc.push(b'\n');
                if let Err(e) = client.send(&doc) {
                    panic!("{}", context("sending", &doc, e.to_string()));
                }
                match client.reply() {
                    Ok(reply) if reply.get("error").is_some() => errors += 1,
                    Ok(_) => replies += 1,
                    Err(why) => panic!("{}", context("no reply to", &doc, why)),
                }
            }
            Input::Garbage(bytes) => {
                // Whatever it makes of it, the connection goes away in the middle.
                let _ = client.send(&bytes);
                drop(client);
                client = vm.connect();
                reconnects += 1;
            }
        }
        let check = format!("{{\"execute\":\"query-status\",\"id\":\"alive-{case}\"}}\n");
        if let Err(e) = client.send(check.as_bytes()) {
            panic!("case {case} (seed {:#x}): {e}", run.seed);
        }
        loop {
            match client.reply() {
                Ok(reply) if reply["id"] == format!("alive-{case}") => {
                    assert!(reply.get("return").is_some(), "case {case}: {reply}");
                    break;
                }
                Ok(_) => {}
                Err(why) => panic!("case {case} (seed {:#x}): query-status: {why}", run.seed),
            }
        }
        if let Ok(Some(status)) = vm.child.try_wait() {
            panic!("case {case} (seed {:#x}): qomvm exited: {status}", run.seed);
        }
    }
    println!(
        "{} commands; {replies} returns, {errors} errors, {reconnects} reconnections (seed {:#x}) in {:.1} s",
        commands.len(),
        run.seed,
        started.elapsed().as_secs_f64()
    );
}
