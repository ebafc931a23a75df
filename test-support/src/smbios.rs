//! Reading SMBIOS as a guest does: the `_SM_` anchor found in the F segment, then the
//! structures it points at, with their strings.

/// One structure: its type, handle, formatted bytes (header included) and strings.
#[derive(Clone, Debug)]
pub struct Structure {
    pub ty: u8,
    pub handle: u16,
    pub formatted: Vec<u8>,
    pub strings: Vec<String>,
}

impl Structure {
    /// The string a formatted-area byte at `offset` refers to (`None` for 0).
    pub fn string_at(&self, offset: usize) -> Option<&str> {
        let index = *self.formatted.get(offset)? as usize;
        index
            .checked_sub(1)
            .and_then(|i| self.strings.get(i))
            .map(String::as_str)
    }
}

/// The 2.x entry point: (offset in `segment`, table address, table length, structure count).
/// Checks both checksums; `None` when there is no valid anchor.
pub fn find_anchor(segment: &[u8]) -> Option<(usize, u32, u16, u16)> {
    (0..segment.len().saturating_sub(31))
        .step_by(16)
        .find_map(|at| {
            let ep = &segment[at..at + 31];
            if &ep[..4] != b"_SM_" || &ep[0x10..0x15] != b"_DMI_" {
                return None;
            }
            let len = ep[5] as usize;
            let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
            if len != 31 || sum(ep) != 0 || sum(&ep[0x10..31]) != 0 {
                return None;
            }
            let table_len = u16::from_le_bytes([ep[0x16], ep[0x17]]);
            let addr = u32::from_le_bytes([ep[0x18], ep[0x19], ep[0x1a], ep[0x1b]]);
            let count = u16::from_le_bytes([ep[0x1c], ep[0x1d]]);
            Some((at, addr, table_len, count))
        })
}

/// The structures in `tables`, up to and including type 127.
pub fn structures(tables: &[u8]) -> Vec<Structure> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= tables.len() {
        let (ty, len) = (tables[at], tables[at + 1] as usize);
        let handle = u16::from_le_bytes([tables[at + 2], tables[at + 3]]);
        let formatted = tables[at..(at + len).min(tables.len())].to_vec();
        let mut end = at + len;
        let mut strings = Vec::new();
        while end < tables.len() && tables[end] != 0 {
            let start = end;
            while end < tables.len() && tables[end] != 0 {
                end += 1;
            }
            strings.push(String::from_utf8_lossy(&tables[start..end]).into_owned());
            end += 1;
        }
        if strings.is_empty() {
            end += 1;
        }
        out.push(Structure {
            ty,
            handle,
            formatted,
            strings,
        });
        at = end + 1;
        if ty == 127 {
            break;
        }
    }
    out
}

/// A type 1 UUID as SMBIOS 2.6+ stores it, printed the usual way.
pub fn uuid_text(bytes: &[u8]) -> String {
    let mut b = bytes[..16].to_vec();
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}
