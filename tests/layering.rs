//! The dependency direction of `hw/` (issue 10): `hw/core` imports no device folder and no
//! board; device folders import no board (`hw/i386`); no two files of `hw/` import each
//! other, directly or through others. Crate-level direction (`qom` <- `hw` <- `accel` <-
//! `qomvm`) is Cargo's to enforce.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// `hw/<dir>/<file>.rs` -> the module paths (`dir::file`) it names with `crate::`.
fn hw_imports() -> BTreeMap<String, BTreeSet<String>> {
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

fn violations(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
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

/// A cycle among the files, as `a -> b -> a`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<String> {
        if let Some(pos) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle.join(" -> "));
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if next != node && graph.contains_key(next) {
                if let Some(cycle) = visit(next, graph, stack, done) {
                    return Some(cycle);
                }
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn hw_imports_point_one_way() {
    let graph = hw_imports();
    assert!(graph.contains_key("core::qdev") && graph.contains_key("misc::debugexit"));
    let bad = violations(&graph);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle among hw/ files: {cycle}");
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
        find_cycle(&graph).as_deref(),
        Some("core::machine -> core::runstate -> core::machine")
    );
}
