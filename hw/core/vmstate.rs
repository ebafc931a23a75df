//! Device state for snapshots and migration (QEMU's VMState, `migration/vmstate.c`): each
//! device that can move saves a [`VmStateSection`], a version and its fields by name, and
//! loads one back, checking the version and finding every field it needs by name. The
//! stream carries the sections by QOM path, so a newer qomvm reads an older stream field by
//! field, and anything missing or mismatched is a clear error, never a guest with the wrong
//! state.
//!
//! A device type opts in with [`DeviceImpl::save_state`]/[`DeviceImpl::load_state`]
//! (`crate::core::qdev`); the default is "cannot migrate", not "nothing to save": a device
//! that was never taught to move blocks migration (QEMU's `unmigratable`), so a new device
//! cannot silently lose its state.
//!
//! [`DeviceImpl::save_state`]: crate::core::qdev::DeviceImpl::save_state
//! [`DeviceImpl::load_state`]: crate::core::qdev::DeviceImpl::load_state

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

/// Why a section could not be saved or loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmStateError {
    /// The device type cannot be migrated (QEMU's message for an unmigratable device).
    #[error("State blocked by non-migratable device '{0}'")]
    Unmigratable(String),
    /// A device's migration blocker, in its own words (QEMU's `migrate_add_blocker`).
    #[error("{0}")]
    Blocked(String),
    /// A field the loading device needs is not in the section.
    #[error("field '{0}' is missing")]
    MissingField(String),
    /// A field that does not decode as the device expects.
    #[error("field '{field}': {reason}")]
    BadField {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A section newer than this qomvm knows, or older than it can read.
    #[error("version {got} is not between {min} and {max}")]
    Version {
        /// The section's version.
        got: u32,
        /// The oldest this qomvm reads.
        min: u32,
        /// The newest.
        max: u32,
    },
    /// The saved configuration differs from the loading device's.
    #[error("{0}")]
    Mismatch(String),
    /// The accelerator or a host call failed while saving or loading.
    #[error("{0}")]
    Host(String),
}

/// One device's saved state: a version and named fields (JSON values; byte blobs as hex).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmStateSection {
    /// The layout version the saving device wrote.
    pub version: u32,
    /// The fields, by name.
    pub fields: Map<String, Value>,
}

impl VmStateSection {
    /// An empty section of `version`.
    pub fn new(version: u32) -> Self {
        VmStateSection {
            version,
            fields: Map::new(),
        }
    }

    /// Adds field `name`.
    pub fn with(mut self, name: &str, value: impl Serialize) -> Self {
        self.put(name, value);
        self
    }

    /// Sets field `name`.
    pub fn put(&mut self, name: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.fields.insert(name.to_string(), value);
    }

    /// Adds field `name`, bytes as a hex string (compact and exact).
    pub fn with_bytes(mut self, name: &str, bytes: &[u8]) -> Self {
        self.put_bytes(name, bytes);
        self
    }

    /// Sets field `name` to `bytes`, as hex. Blobs can be megabytes (a VGA's video
    /// memory, saved while the guest is stopped), so this is a table lookup per byte.
    pub fn put_bytes(&mut self, name: &str, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            hex.push(char::from(DIGITS[usize::from(b >> 4)]));
            hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        self.fields.insert(name.to_string(), Value::String(hex));
    }

    /// Field `name`, decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T, VmStateError> {
        let value = self
            .fields
            .get(name)
            .ok_or_else(|| VmStateError::MissingField(name.to_string()))?;
        serde_json::from_value(value.clone()).map_err(|e| VmStateError::BadField {
            field: name.to_string(),
            reason: e.to_string(),
        })
    }

    /// Field `name`, written by [`VmStateSection::put_bytes`]. Anything but pairs of hex
    /// digits is a bad field (read without copying the text first).
    pub fn get_bytes(&self, name: &str) -> Result<Vec<u8>, VmStateError> {
        let bad = |reason: &str| VmStateError::BadField {
            field: name.to_string(),
            reason: reason.to_string(),
        };
        let text = self
            .fields
            .get(name)
            .ok_or_else(|| VmStateError::MissingField(name.to_string()))?
            .as_str()
            .ok_or_else(|| bad("not a string of hex digits"))?
            .as_bytes();
        if !text.len().is_multiple_of(2) {
            return Err(bad("odd number of hex digits"));
        }
        let nibble = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
        text.chunks_exact(2)
            .map(|pair| match (nibble(pair[0]), nibble(pair[1])) {
                (Some(hi), Some(lo)) => Ok((hi << 4) | lo),
                _ => Err(bad("not hex")),
            })
            .collect()
    }

    /// Field `name` as exactly `N` bytes.
    pub fn get_array<const N: usize>(&self, name: &str) -> Result<[u8; N], VmStateError> {
        let bytes = self.get_bytes(name)?;
        let len = bytes.len();
        bytes.try_into().map_err(|_| VmStateError::BadField {
            field: name.to_string(),
            reason: format!("{len} bytes, expected {N}"),
        })
    }

    /// Refuses a section whose version is outside `min..=max`.
    pub fn check_version(&self, min: u32, max: u32) -> Result<(), VmStateError> {
        if (min..=max).contains(&self.version) {
            Ok(())
        } else {
            Err(VmStateError::Version {
                got: self.version,
                min,
                max,
            })
        }
    }

    /// The section as JSON (the stream's encoding).
    pub fn to_json(&self) -> Value {
        serde_json::json!({"version": self.version, "fields": self.fields})
    }

    /// A section from [`VmStateSection::to_json`]'s form.
    pub fn from_json(value: &Value) -> Result<Self, VmStateError> {
        let version = value
            .get("version")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| VmStateError::MissingField("version".into()))?;
        let fields = value
            .get("fields")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| VmStateError::MissingField("fields".into()))?;
        Ok(VmStateSection { version, fields })
    }
}

/// The plain-old-data bytes of `value` (a `#[repr(C)]` KVM structure or the like).
///
/// # Safety
/// `T` must be plain data: no pointers, references or padding that matters, valid for any
/// byte pattern (the KVM ABI structures are).
pub unsafe fn pod_bytes<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: the caller vouches that T is plain data; the slice covers exactly `value`.
    unsafe { std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
}

/// A `T` from bytes [`pod_bytes`] made; `None` if the length differs.
///
/// # Safety
/// As for [`pod_bytes`]: every byte pattern of the right size must be a valid `T`.
pub unsafe fn pod_from_bytes<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length matches and the caller vouches any bytes are a valid T;
    // read_unaligned copes with the Vec's alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_missing_ones_are_named() {
        let s = VmStateSection::new(2)
            .with("lcr", 3u8)
            .with_bytes("cmos", &[0, 0xff, 0x10]);
        let back = VmStateSection::from_json(&s.to_json()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.get::<u8>("lcr"), Ok(3));
        assert_eq!(back.get_bytes("cmos"), Ok(vec![0, 0xff, 0x10]));
        assert_eq!(
            back.get::<u8>("ier"),
            Err(VmStateError::MissingField("ier".into()))
        );
        assert!(back.get::<u8>("cmos").is_err());
        // Not hex, a character of several bytes where a digit should be, not a string:
        // errors, never a panic.
        let mut bad = VmStateSection::new(1);
        bad.put("a", "0g");
        bad.put("b", "0\u{e9}1");
        bad.put("c", 12);
        for field in ["a", "b", "c"] {
            assert!(
                matches!(bad.get_bytes(field), Err(VmStateError::BadField { .. })),
                "{field}"
            );
        }
        let all: Vec<u8> = (0..=255).collect();
        let s = VmStateSection::new(1).with_bytes("all", &all);
        assert_eq!(s.fields["all"].as_str().unwrap().len(), 512);
        assert_eq!(s.get_bytes("all"), Ok(all));
        assert!(back.check_version(1, 2).is_ok());
        assert_eq!(
            back.check_version(3, 4).unwrap_err().to_string(),
            "version 2 is not between 3 and 4"
        );
    }
}
