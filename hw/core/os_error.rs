//! Host errors worded as the C library words them (what QEMU prints): `strerror` text
//! without Rust's ` (os error N)` suffix.

/// The `strerror` text of an I/O error.
pub fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The `strerror` text of an errno value.
pub fn errno_text(errno: i32) -> String {
    strerror(&std::io::Error::from_raw_os_error(errno))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_suffix_is_dropped() {
        assert_eq!(super::errno_text(2), "No such file or directory");
    }
}
