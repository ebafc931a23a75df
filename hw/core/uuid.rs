//! `-uuid` (QEMU's `qemu_uuid`, `util/uuid.c`): the VM's UUID, reported by `query-uuid`.

use std::fmt;

/// A UUID; all zeroes unless `-uuid` sets one, as in QEMU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Uuid(pub [u8; 16]);

/// QEMU's error for a malformed `-uuid`.
#[derive(Debug, thiserror::Error)]
#[error("Fail to parse UUID string. Wrong format.")]
pub struct UuidError;

impl std::str::FromStr for Uuid {
    type Err = UuidError;

    /// QEMU's `qemu_uuid_parse`: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hex digits of
    /// either case.
    fn from_str(text: &str) -> Result<Self, UuidError> {
        let bytes = text.as_bytes();
        if bytes.len() != 36 {
            return Err(UuidError);
        }
        let mut out = [0u8; 16];
        let mut digits = Vec::with_capacity(32);
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b != b'-' {
                    return Err(UuidError);
                }
            } else {
                digits.push((b as char).to_digit(16).ok_or(UuidError)? as u8);
            }
        }
        for (i, pair) in digits.chunks(2).enumerate() {
            out[i] = pair[0] << 4 | pair[1];
        }
        Ok(Uuid(out))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_round_trip_in_lower_case_and_bad_ones_are_refused() {
        let u: Uuid = "B90FF907-e156-421f-9c83-8e73ed8f0924".parse().unwrap();
        assert_eq!(u.to_string(), "b90ff907-e156-421f-9c83-8e73ed8f0924");
        assert_eq!(u.0[0], 0xb9);
        assert_eq!(
            Uuid::default().to_string(),
            "00000000-0000-0000-0000-000000000000"
        );
        for bad in [
            "",
            "b90ff907e156421f9c838e73ed8f0924",
            "g90ff907-e156-421f-9c83-8e73ed8f0924",
        ] {
            assert!(bad.parse::<Uuid>().is_err(), "{bad}");
        }
    }
}
