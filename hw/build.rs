//! Discovers the device files under `hw/<category>/` so that adding a device is dropping one
//! file: no `mod` list, registry table or match arm is edited anywhere.
//!
//! Every `hw/<dir>/<file>.rs` becomes module `<dir>::<file>` (dashes become underscores, as
//! `hw/isa/isa_bus.rs` -> `isa::isa_bus`). The files that call `type_init!` are listed too,
//! so that the start-up self-check can prove none of their registrations was lost at link
//! time.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

fn module_name(name: &str) -> String {
    let mut m: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if m.starts_with(|c: char| c.is_ascii_digit()) {
        m.insert(0, '_');
    }
    m
}

fn main() {
    // Read when the script runs, not when it was compiled: a build script binary reused
    // from another checkout of the workspace (a shared or seeded target directory) would
    // otherwise list that checkout's files.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest_dir);
    println!("cargo:rerun-if-changed={}", root.display());
    let mut dirs: Vec<_> = fs::read_dir(root)
        .expect("hw/ is readable")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.') && name != "target"
        })
        .collect();
    dirs.sort();

    let mut modules = String::new();
    let mut registering = Vec::new();
    for dir in dirs {
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<_> = fs::read_dir(&dir)
            .expect("hw/<category>/ is readable")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .collect();
        if files.is_empty() {
            continue;
        }
        files.sort();
        let dir_name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 directory name");
        writeln!(modules, "/// The files of `hw/{dir_name}/`.").unwrap();
        writeln!(modules, "pub mod {} {{", module_name(dir_name)).unwrap();
        for file in files {
            println!("cargo:rerun-if-changed={}", file.display());
            let stem = file
                .file_stem()
                .and_then(|n| n.to_str())
                .expect("UTF-8 file name");
            let source = fs::read_to_string(&file).expect("device file is readable");
            if source.contains("type_init!") {
                registering.push(format!("hw/{dir_name}/{stem}.rs"));
            }
            writeln!(modules, "    #[path = {:?}]", file.display().to_string()).unwrap();
            // QEMU names files after their directory (hw/pci/pci.c); so do we.
            if module_name(stem) == module_name(dir_name) {
                writeln!(modules, "    #[allow(clippy::module_inception)]").unwrap();
            }
            writeln!(modules, "    pub mod {};", module_name(stem)).unwrap();
        }
        modules.push_str("}\n");
    }
    writeln!(
        modules,
        "/// The files under `hw/` that register QOM types (found by the build script).\n\
         pub const REGISTERING_FILES: &[&str] = &{registering:?};"
    )
    .unwrap();
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    fs::write(Path::new(&out).join("modules.rs"), modules).expect("OUT_DIR is writable");
}
