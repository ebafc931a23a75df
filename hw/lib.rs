//! qomvm's hardware: qdev, buses, machines, CPU models and devices, laid out as QEMU's
//! `hw/` tree. Each file registers its QOM types with `qom::type_init!`; the build script
//! finds the files, so adding a device is dropping a file into `hw/<category>/`.

#![deny(missing_docs)]

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// A registration the binary lost, or a type table that does not validate.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The type table is invalid.
    #[error(transparent)]
    Table(#[from] qom::Error),
    /// A file that calls `type_init!` has no type in the table: its registrations did not
    /// survive linking (see dtolnay/inventory#7 and rust-lang/rust#47384).
    #[error("types registered in {0} are missing from the type table: the binary lost them at link time (reference the `hw` crate with `hw::init()`)")]
    Lost(&'static str),
}

/// The start-up self-check: builds the type table and proves every file under `hw/` that
/// registers types is present in it. Binaries, tests and benches call it before anything
/// else; calling it also keeps this crate, and with it every registration, linked in.
pub fn init() -> Result<&'static qom::TypeTable, RegistrationError> {
    let table = qom::type_table()?;
    for file in REGISTERING_FILES {
        let present = table.types().any(|t| {
            let location = t.info().location.file.replace('\\', "/");
            location.ends_with(file) || location.ends_with(&file["hw/".len()..])
        });
        if !present {
            return Err(RegistrationError::Lost(file));
        }
    }
    Ok(table)
}
