//! Keyboard layouts (QEMU's `ui/keymaps.c`): QEMU's keymap files
//! (`/usr/share/qemu/keymaps/LANG`, lines `KEYSYM-NAME KEYNUMBER [modifiers...]`,
//! `include OTHER`) map the X11 keysyms a VNC client sends to QEMU's key numbers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::keysyms::KEYSYMS;

/// Where QEMU's keymaps are installed (Debian's `qemu-system-data`).
pub const KEYMAP_DIR: &str = "/usr/share/qemu/keymaps";
/// The layout VNC uses without `-k` (QEMU's default).
pub const DEFAULT_LAYOUT: &str = "en-us";
/// Includes nest at most this deep.
const MAX_INCLUDE_DEPTH: u32 = 8;

/// Why a keymap cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeymapError {
    /// The file is missing or unreadable.
    #[error("could not read keymap file: '{path}': {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A layout name that is no file name.
    #[error("invalid keymap name '{0}'")]
    BadName(String),
    /// Includes that go on too deep (a loop).
    #[error("keymap '{0}': includes nest too deep")]
    TooDeep(String),
}

/// A layout: the key number of each keysym (the first line that names it wins).
#[derive(Debug, Default)]
pub struct Keymap {
    keys: HashMap<u32, u16>,
}

/// The keysym called `name`: a name of X11's tables, `U` + hex (a Unicode character) or
/// `0x` + hex.
pub fn keysym_by_name(name: &str) -> Option<u32> {
    if let Ok(i) = KEYSYMS.binary_search_by(|(n, _)| (*n).cmp(name)) {
        return Some(KEYSYMS[i].1);
    }
    if let Some(hex) = name.strip_prefix("0x") {
        return u32::from_str_radix(hex, 16).ok();
    }
    let hex = name
        .strip_prefix('U')
        .filter(|h| (4..=6).contains(&h.len()))?;
    let code = u32::from_str_radix(hex, 16).ok()?;
    // X11 gives Latin-1 characters their own keysyms; the rest are 0x1000000 + code.
    Some(if code < 0x100 {
        code
    } else {
        0x0100_0000 + code
    })
}

impl Keymap {
    /// Loads layout `name` from [`KEYMAP_DIR`].
    pub fn load(name: &str) -> Result<Keymap, KeymapError> {
        Self::load_from(Path::new(KEYMAP_DIR), name)
    }

    /// Loads layout `name` from `dir` (its includes from there too).
    pub fn load_from(dir: &Path, name: &str) -> Result<Keymap, KeymapError> {
        let mut map = Keymap::default();
        map.add_file(dir, name, 0)?;
        Ok(map)
    }

    fn add_file(&mut self, dir: &Path, name: &str, depth: u32) -> Result<(), KeymapError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(KeymapError::BadName(name.to_string()));
        }
        if depth > MAX_INCLUDE_DEPTH {
            return Err(KeymapError::TooDeep(name.to_string()));
        }
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| KeymapError::Read {
            path: path.clone(),
            reason: hw::core::os_error::strerror(&e),
        })?;
        let text = String::from_utf8_lossy(&bytes);
        self.add_text(&text, |included, map| {
            map.add_file(dir, included, depth + 1)
        })
    }

    /// Adds the lines of a keymap; `include` lines go to `include`.
    fn add_text(
        &mut self,
        text: &str,
        mut include: impl FnMut(&str, &mut Keymap) -> Result<(), KeymapError>,
    ) -> Result<(), KeymapError> {
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if first.starts_with('#') {
                continue;
            }
            match first {
                "include" => {
                    if let Some(other) = words.next() {
                        include(other, self)?;
                    }
                }
                // QEMU's "map 0x..." lines name the layout's X keyboard map: nothing to do.
                "map" => {}
                name => {
                    let number = words
                        .next()
                        .and_then(|n| n.strip_prefix("0x"))
                        .and_then(|n| u16::from_str_radix(n, 16).ok());
                    match (keysym_by_name(name), number) {
                        (Some(sym), Some(num)) => {
                            self.keys.entry(sym).or_insert(num);
                        }
                        _ => log::debug!("keymap: line '{line}' not understood"),
                    }
                }
            }
        }
        Ok(())
    }

    /// The key number of `keysym`, if the layout has it. A lower-case letter the layout
    /// lacks falls back to its capital (clients send either with Shift).
    pub fn key_number(&self, keysym: u32) -> Option<u16> {
        self.keys.get(&keysym).copied().or_else(|| {
            let upper_or_lower = match keysym {
                0x41..=0x5a => keysym + 0x20,
                0x61..=0x7a => keysym - 0x20,
                _ => return None,
            };
            self.keys.get(&upper_or_lower).copied()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_through_the_table_unicode_and_hex() {
        assert_eq!(keysym_by_name("a"), Some(0x61));
        assert_eq!(keysym_by_name("Return"), Some(0xff0d));
        assert_eq!(keysym_by_name("Shift_L"), Some(0xffe1));
        assert_eq!(keysym_by_name("U20AC"), Some(0x0100_20ac));
        assert_eq!(keysym_by_name("U00E9"), Some(0xe9));
        assert_eq!(keysym_by_name("0x010000d7"), Some(0x0100_00d7));
        assert_eq!(keysym_by_name("NoSuchKey"), None);
        assert!(KEYSYMS.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
    }

    #[test]
    fn lines_includes_and_first_wins() {
        let mut map = Keymap::default();
        let text = "# comment\nmap 0x409\ninclude common\na 0x1e\nA 0x1e shift\nexclam 0x02 shift\nbogus\n";
        map.add_text(text, |name, m| {
            assert_eq!(name, "common");
            m.add_text("Return 0x1c\na 0x99\n", |_, _| unreachable!())
        })
        .unwrap();
        assert_eq!(map.key_number(0xff0d), Some(0x1c));
        assert_eq!(
            map.key_number(0x61),
            Some(0x99),
            "the included line came first"
        );
        assert_eq!(map.key_number(0x41), Some(0x1e));
        assert_eq!(map.key_number(0x21), Some(0x02));
        assert_eq!(map.key_number(0x42), None);
    }

    #[test]
    fn qemus_en_us_layout_when_installed() {
        let Ok(map) = Keymap::load(DEFAULT_LAYOUT) else {
            eprintln!(
                "skipped: {KEYMAP_DIR}/{DEFAULT_LAYOUT} is missing (package qemu-system-data)"
            );
            return;
        };
        for (sym, num) in [
            (0x61, 0x1e),
            (0x41, 0x1e),
            (0xff0d, 0x1c),
            (0xffe1, 0x2a),
            (0xff52, 0xc8),
            (0x20, 0x39),
        ] {
            assert_eq!(map.key_number(sym), Some(num), "keysym 0x{sym:x}");
        }
        assert!(matches!(
            Keymap::load("../etc"),
            Err(KeymapError::BadName(_))
        ));
        assert!(matches!(
            Keymap::load("xx-none"),
            Err(KeymapError::Read { .. })
        ));
    }
}
