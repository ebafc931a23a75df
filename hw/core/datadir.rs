//! Where firmware and option ROM images are found (QEMU's `qemu_find_file` with
//! `QEMU_FILE_TYPE_BIOS` over its data directories): Debian installs SeaBIOS's images in
//! /usr/share/seabios and links them from /usr/share/qemu, and iPXE's network boot ROMs in
//! /usr/lib/ipxe/qemu (Debian's QEMU has all three on its firmware path).

use std::path::{Path, PathBuf};

/// The directories searched, in order.
pub const DATA_DIRS: &[&str] = &["/usr/share/seabios", "/usr/share/qemu", "/usr/lib/ipxe/qemu"];

/// `name` in the data directories, if it is a bare file name found there (QEMU searches
/// only names without a directory part).
pub fn find_data_file(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    DATA_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// QEMU's lookup of a `romfile=`/`-bios` name: a file in the data directories, else the
/// name itself as a path.
pub fn resolve_data_file(name: &str) -> PathBuf {
    find_data_file(name).unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_not_searched_and_bare_names_fall_back_to_themselves() {
        assert_eq!(find_data_file("/etc/passwd"), None);
        assert_eq!(find_data_file(""), None);
        assert_eq!(resolve_data_file("no-such-rom.bin"), PathBuf::from("no-such-rom.bin"));
        assert_eq!(resolve_data_file("./x/y.bin"), PathBuf::from("./x/y.bin"));
    }
}
