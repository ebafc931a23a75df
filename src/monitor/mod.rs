//! The monitors (QEMU's `monitor/`): QMP, the JSON protocol for programs (`-qmp`), and HMP,
//! the human monitor (`-monitor`).
//!
//! The files depend on each other one way only, lowest first (a unit test below checks
//! that their imports form no cycle):
//!
//! * [`json`]: QMP's JSON framing and spelling;
//! * [`chardev`]: the sockets and stdio the monitors listen on, one thread per client;
//! * [`qapi`]: what commands run with and answer in: the VM, the command context, QMP
//!   errors, declared arguments and their checks;
//! * [`info`]: what both monitors report about the VM (status, KVM, CPUs, QOM values);
//! * [`client`]: what every client shares: its output queue, the event registry, the
//!   dispatch gate, deferred main-loop requests;
//! * [`qmp_cmds`]: the QMP commands;
//! * [`qmp`]: the QMP session (greeting, capabilities negotiation, dispatch);
//! * [`hmp`]: the HMP commands, callable from any front end ([`hmp::hmp_execute`]);
//! * this file: the set-up that wires them together. QMP's `human-monitor-command`
//!   reaches HMP through the [`qapi::HumanMonitorFn`] it installs in the [`qapi::VmContext`].
//!
//! Run-state changes (`stop`, `cont`, resets, power-down) go through
//! `hw::core::runstate`, which the main loop and tests use too; its events reach every
//! negotiated QMP client through [`client::broadcast_event`].

pub mod chardev;
pub mod client;
pub mod hmp;
pub mod info;
pub mod json;
pub mod qapi;
pub mod qmp;
pub mod qmp_cmds;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hw::core::runstate::RunRequest;
use hw::core::runstate::VmEvent;
use parking_lot::Mutex;
use qom::ObjectRef;

use crate::options::{split_opts, OptionError, Options};
use client::{broadcast_event, flush_clients, open_dispatch, vm_event_message};
use qapi::{CommandCtx, Deferred, VmContext};

/// Unix socket paths to remove at exit.
static SOCKET_PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// QEMU's `-name`: `-name NAME` or `-name guest=NAME,...`.
fn guest_name(opts: &Options) -> Option<String> {
    let name = opts.name.as_ref()?;
    split_opts(&name.value, Some("guest"))
        .into_iter()
        .find(|(k, _)| k == "guest")
        .and_then(|(_, v)| v)
}

/// The VM as the commands of `opts`' monitors see it, `human-monitor-command` included.
fn vm_context(machine: &ObjectRef, opts: &Options) -> Arc<VmContext> {
    Arc::new(VmContext {
        machine: machine.clone(),
        name: guest_name(opts),
        human_monitor: hmp::human_monitor_command,
    })
}

/// QEMU's monitor set-up in `qemu_create_late_backends`/`monitor_init_qmp`: opens every
/// `-qmp` and `-monitor` backend and starts serving. Run-state events go to the QMP
/// clients from here on.
pub fn monitor_init(machine: &ObjectRef, opts: &Options) -> Result<(), OptionError> {
    let vm = vm_context(machine, opts);
    vm.machine_state()
        .vm_state()
        .add_listener(Arc::new(|e: &VmEvent| {
            if *e == VmEvent::Resume {
                // The main loop started the vCPUs.
                open_dispatch();
            }
            broadcast_event(&vm_event_message(e))
        }));
    if opts.start_paused {
        open_dispatch();
    }

    let mut backends = Vec::new();
    for located in &opts.qmp {
        let backend = chardev::parse(&located.value).map_err(|e| located.error(e))?;
        backends.push((located, backend, true));
    }
    for located in &opts.monitor {
        let backend = chardev::parse(&located.value).map_err(|e| located.error(e))?;
        backends.push((located, backend, false));
    }
    let stdio_users = backends
        .iter()
        .filter(|(_, b, _)| *b == chardev::Backend::Stdio)
        .count();
    if stdio_users > 1 {
        return Err(OptionError::new(
            "",
            "cannot use stdio by multiple character devices",
        ));
    }
    for (located, backend, is_qmp) in backends {
        let session: chardev::Session = if is_qmp {
            let vm = vm.clone();
            Arc::new(move |conn| qmp::run_session(&vm, conn))
        } else {
            let vm = vm.clone();
            Arc::new(move |conn| hmp::run_session(&vm, conn))
        };
        let name = if is_qmp { "QMP" } else { "HMP" };
        let listening = chardev::serve(name, &backend, session).map_err(|e| located.error(e))?;
        if let Some(path) = listening.unix_path {
            SOCKET_PATHS.lock().push(path);
        }
    }
    Ok(())
}

/// QEMU's `monitor_cleanup` at exit: gives every client up to a second to receive what is
/// queued for it (the `quit` reply, the `SHUTDOWN` event), then removes the sockets.
pub fn monitor_cleanup() {
    flush_clients(Duration::from_secs(1));
    for path in SOCKET_PATHS.lock().drain(..) {
        let _ = std::fs::remove_file(path);
    }
}

/// The human monitor the `-nographic` console switches to with Ctrl-A c (QEMU's mux'd
/// `mon:stdio`): runs one command line and returns what to print.
pub type ConsoleMonitor = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// An HMP for the serial console: same commands as `-monitor`, its own current CPU.
pub fn console_monitor(machine: &ObjectRef, opts: &Options) -> ConsoleMonitor {
    let vm = vm_context(machine, opts);
    let hmp = Mutex::new(hmp::HmpState::default());
    Arc::new(move |line: &str| {
        let ctx = CommandCtx::new(&vm);
        let output = hmp::hmp_execute(&ctx, &mut hmp.lock(), line);
        match ctx.deferred.get() {
            Some(Deferred::Quit) => vm.machine_state().run_state().request(RunRequest::HostQuit),
            Some(Deferred::Reset) => vm
                .machine_state()
                .run_state()
                .request(RunRequest::HostReset),
            None => {}
        }
        output
    })
}

#[cfg(test)]
mod tests {
    //! The layering of the monitor's files: whatever a file imports from another
    //! (`crate::monitor::X`, or `super::X` at file level), the imports form no cycle.

    use std::collections::{BTreeMap, BTreeSet};

    /// A file's name as the graph shows it: `qmp.rs`, `mod.rs`.
    type Graph = BTreeMap<String, BTreeSet<String>>;

    /// The monitor files `source` (the file `file` of `modules`) depends on: the modules
    /// its `crate::monitor::` and `super::` paths name (`super::super::` in a nested
    /// module), `mod.rs` for anything else they name (an item of that file), and for
    /// `mod.rs` the modules it declares.
    fn imports(file: &str, source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
        let target = |name: &str| {
            if modules.contains(name) {
                format!("{name}.rs")
            } else {
                "mod.rs".to_string()
            }
        };
        let mut found = BTreeSet::new();
        let mut nested = false;
        let mut code = String::new();
        for line in source.lines() {
            // Comments are left out: they may name any module.
            let line = line.split("//").next().unwrap_or_default();
            let decl = line.trim_start_matches("pub ").strip_prefix("mod ");
            if let Some(name) = decl.and_then(|d| d.strip_suffix(';')) {
                found.insert(target(name.trim()));
            }
            nested = if nested {
                line != "}"
            } else {
                decl.is_some_and(|d| d.ends_with('{'))
            };
            let parent = if nested { "super::super::" } else { "super::" };
            code += &line.replace(parent, "crate::monitor::");
            code.push('\n');
        }
        for (at, _) in code.match_indices("crate::monitor::") {
            let rest = code[at + "crate::monitor::".len()..].trim_start();
            if let Some(group) = rest.strip_prefix('{') {
                // `{a, b::{c, d}, self}`: the first name of each top-level item.
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && (c.is_alphabetic() || c == '_' || c == '*') => {
                            item_start = false;
                            let name: String = group[i..]
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect();
                            found.insert(target(&name));
                        }
                        _ => {}
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(target(&name));
                }
            }
        }
        found.remove(file);
        found
    }

    /// The import graph of `files` (name, source).
    fn import_graph(files: &[(String, String)]) -> Graph {
        let modules: BTreeSet<String> = files
            .iter()
            .filter_map(|(name, _)| name.strip_suffix(".rs"))
            .filter(|m| *m != "mod")
            .map(str::to_string)
            .collect();
        files
            .iter()
            .map(|(name, source)| (name.clone(), imports(name, source, &modules)))
            .collect()
    }

    /// A cycle of `graph`, as the files along it with the first repeated at the end.
    fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
        fn visit(
            node: &str,
            graph: &Graph,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|n| n == node) {
                let mut cycle = path[at..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            if done.contains(node) {
                return None;
            }
            path.push(node.to_string());
            for next in graph.get(node).into_iter().flatten() {
                if let Some(cycle) = visit(next, graph, path, done) {
                    return Some(cycle);
                }
            }
            path.pop();
            done.insert(node.to_string());
            None
        }
        let mut done = BTreeSet::new();
        graph
            .keys()
            .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
    }

    fn monitor_files() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/monitor");
        let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
            .expect("src/monitor is readable")
            .map(|entry| entry.expect("src/monitor is readable").path())
            .filter(|path| path.extension().is_some_and(|e| e == "rs"))
            .map(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let source = std::fs::read_to_string(&path).expect("monitor files are readable");
                (name, source)
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn monitor_files_import_each_other_one_way() {
        let files = monitor_files();
        assert!(files.len() > 5, "the monitor's files were not found");
        let graph = import_graph(&files);
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "import cycle among src/monitor files: {}\nimports: {graph:#?}",
                cycle.join(" -> ")
            );
        }
        // The wiring is on top: it reaches every file, and no file imports it.
        assert!(graph.values().all(|deps| !deps.contains("mod.rs")));
    }

    #[test]
    fn a_back_import_is_found() {
        let file = |name: &str, source: &str| (name.to_string(), source.to_string());
        let files = [
            file("mod.rs", "pub mod low;\npub mod high;\nfn f() { high::g(); }\n"),
            file("low.rs", "//! Not [`crate::monitor::high`].\nuse serde_json::Value;\n"),
            file(
                "high.rs",
                "use crate::monitor::{\n    low::{self, X},\n    Y,\n};\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
            ),
        ];
        let graph = import_graph(&files);
        assert_eq!(
            graph["mod.rs"],
            ["high.rs", "low.rs"].map(String::from).into()
        );
        assert_eq!(
            graph["high.rs"],
            ["low.rs", "mod.rs"].map(String::from).into()
        );
        assert!(graph["low.rs"].is_empty());
        assert_eq!(
            find_cycle(&graph),
            Some(["high.rs", "mod.rs", "high.rs"].map(String::from).to_vec())
        );

        let mut files = files;
        files[2].1 = "use crate::monitor::low;\n".into();
        files[1].1 = "use super::high::g;\n".into();
        assert_eq!(
            find_cycle(&import_graph(&files)),
            Some(["high.rs", "low.rs", "high.rs"].map(String::from).to_vec())
        );
        files[1].1 = "use std::io;\nmod nested {\n    use super::super::Y;\n}\n".into();
        assert_eq!(
            import_graph(&files)["low.rs"],
            ["mod.rs"].map(String::from).into()
        );
        files[1].1 = "use std::io;\nmod nested {\n    use super::*;\n}\n".into();
        assert_eq!(find_cycle(&import_graph(&files)), None);
    }
}
