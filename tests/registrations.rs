//! Registrations survive linking, and every file under `hw/` that registers a type shows
//! up in the type table: the drop-in discovery works.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_startup_self_check_passes() {
    let table = accel::init().expect("no registration was lost");
    assert!(table.len() > 10);
}

#[test]
fn every_registering_file_under_hw_is_in_the_type_table() {
    let table = accel::init().unwrap();
    let hw = Path::new(env!("CARGO_MANIFEST_DIR")).join("hw");
    let mut files = Vec::new();
    rust_files(&hw, &mut files);
    let mut checked = 0;
    for file in files {
        let name = file.file_name().unwrap();
        if name == "build.rs" || name == "lib.rs" {
            continue;
        }
        let source = std::fs::read_to_string(&file).unwrap();
        if !source.contains("type_init!") {
            continue;
        }
        let relative = file
            .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")))
            .unwrap();
        let relative = relative.to_string_lossy().replace('\\', "/");
        assert!(
            table.types().any(|t| t
                .info()
                .location
                .file
                .replace('\\', "/")
                .ends_with(&relative)),
            "{relative} registers types but none is in the table"
        );
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} registering files found");
}

#[test]
fn listed_type_names_resolve_to_their_registering_file() {
    let table = accel::init().unwrap();
    let debug_exit = table.lookup("isa-debug-exit").unwrap();
    assert!(debug_exit
        .info()
        .location
        .file
        .ends_with("hw/misc/debugexit.rs"));
    let qtest = table.lookup("qtest-accel").unwrap();
    assert!(qtest.info().location.file.ends_with("qtest.rs"));
}
