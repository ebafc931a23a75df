//! The dependency direction of `hw/` (issue 10): `hw/core` imports no device folder and no
//! board; device folders import no board (`hw/i386`); no two files of `hw/` import each
//! other, directly or through others; likewise among the monitor's files in `src/monitor/`.
//! Crate-level direction (`qom` <- `hw` <- `accel` <- `qomvm`) is Cargo's to enforce.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// `hw/<dir>/<file>.rs` -> the module paths (`dir::file`) it names with `crate::`.
fn hw_imports() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("hw");
    let mut graph = BTreeMap::new();
    for dir in fs::read_dir(&root).unwrap().filter_map(Result::ok) {
        if !dir.file_type().unwrap().is_dir() {
            continue;
        }
        let dir_name = dir.file_name().to_string_lossy().replace('-', "_");
        for file in fs::read_dir(dir.path()).unwrap().filter_map(Result::ok) {
            let path = file.path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let stem = path
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .replace('-', "_");
            let source = fs::read_to_string(&path).unwrap();
            graph.insert(format!("{dir_name}::{stem}"), crate_paths(&source));
        }
    }
    graph
}

/// Every `crate::a::b` (and `crate::a::{b, c}`) outside comments, as `a::b`.
fn crate_paths(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let dir: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let after = &rest[dir.len()..];
            let Some(after) = after.strip_prefix("::") else {
                continue;
            };
            if let Some(group) = after.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let file: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !file.is_empty() {
                        found.insert(format!("{dir}::{file}"));
                    }
                }
            } else {
                let file: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.insert(format!("{dir}::{file}"));
            }
        }
    }
    found
}

fn dir_of(module: &str) -> &str {
    module.split("::").next().unwrap_or("")
}

fn violations(graph: &Graph) -> Vec<String> {
    let mut bad = Vec::new();
    for (file, imports) in graph {
        for import in imports.iter().filter(|i| graph.contains_key(*i)) {
            let (from, to) = (dir_of(file), dir_of(import));
            if from == "core" && to != "core" {
                bad.push(format!(
                    "hw/core must not import a device or board: {file} -> {import}"
                ));
            }
            if from != "core" && from != "i386" && to == "i386" {
                bad.push(format!(
                    "devices must not import a board: {file} -> {import}"
                ));
            }
        }
    }
    bad
}

/// File -> the files it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

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
            if next != node && graph.contains_key(next) {
                if let Some(cycle) = visit(next, graph, path, done) {
                    return Some(cycle);
                }
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

#[test]
fn hw_imports_point_one_way() {
    let graph = hw_imports();
    assert!(graph.contains_key("core::qdev") && graph.contains_key("misc::debugexit"));
    let bad = violations(&graph);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle among hw/ files: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_checks_catch_back_imports_and_cycles() {
    let mut graph = BTreeMap::new();
    graph.insert(
        "core::machine".to_string(),
        crate_paths(
            "use crate::core::{qdev, runstate};\nuse crate::char::serial::X; // crate::i386::pc",
        ),
    );
    graph.insert("core::qdev".to_string(), BTreeSet::new());
    graph.insert(
        "core::runstate".to_string(),
        crate_paths("let m = crate::core::machine::f();"),
    );
    graph.insert(
        "char::serial".to_string(),
        crate_paths("use crate::i386::pc::Y;"),
    );
    graph.insert("i386::pc".to_string(), BTreeSet::new());
    let bad = violations(&graph);
    assert_eq!(
        bad,
        [
            "devices must not import a board: char::serial -> i386::pc",
            "hw/core must not import a device or board: core::machine -> char::serial",
        ]
    );
    assert_eq!(
        find_cycle(&graph).map(|c| c.join(" -> ")).as_deref(),
        Some("core::machine -> core::runstate -> core::machine")
    );
}

mod monitor {
    //! The layering of the qomvm binary's monitor (`src/monitor/`): whatever a file imports
    //! from another (`crate::monitor::X`, or `super::X` at file level), the imports form no
    //! cycle, and no file imports the wiring in `mod.rs`.

    use super::{find_cycle, Graph};
    use std::collections::BTreeSet;

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
