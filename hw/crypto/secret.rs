//! The `secret` object (QEMU's `crypto/secret.c`, `crypto/secret_common.c`): a named
//! value, given inline (`data=`) or read from a file (`file=`), raw or base64
//! (`format=`), loaded when the object completes. libvirt creates one per domain
//! (`masterKey0`) to encrypt the other secrets it passes; encrypted secrets (`keyid=`,
//! `iv=`) need AES, which qomvm does not have, and are refused in one line.

use parking_lot::Mutex;
use qom::{type_init, ObjectBase, Prop, UserCreatable};

/// QEMU's `TYPE_QCRYPTO_SECRET`.
pub const TYPE_QCRYPTO_SECRET: &str = "secret";

qom::qom_enum! {
    /// QAPI's `QCryptoSecretFormat`.
    pub enum SecretFormat("QCryptoSecretFormat") {
        /// The bytes as they are.
        Raw = "raw",
        /// Base64 text, decoded when loaded.
        Base64 = "base64",
    }
}

/// Why a secret cannot load, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Both or neither of `data` and `file`.
    #[error("'file' and 'data' are mutually exclusive")]
    DataAndFile,
    /// Neither `data` nor `file`.
    #[error("Either 'file' or 'data' must be provided")]
    NoData,
    /// `file=` cannot be read.
    #[error("Unable to read {0}: {1}")]
    Read(String, std::io::Error),
    /// `format=base64` text that is not base64.
    #[error("Unable to decode base64 data")]
    Base64,
    /// `keyid=`/`iv=`: the value is encrypted with another secret.
    #[error("encrypted secrets (keyid=, iv=) are not supported by qomvm")]
    Encrypted,
}

/// QEMU's `QCryptoSecret`.
#[derive(qom::Object)]
#[qom(name = TYPE_QCRYPTO_SECRET, implements = [dyn qom::UserCreatable])]
pub struct Secret {
    #[parent]
    parent: ObjectBase,
    #[property(desc = "Data of the secret")]
    data: Prop<Option<String>>,
    #[property(desc = "File to read the secret from")]
    file: Prop<Option<String>>,
    #[property(default = "raw", desc = "Format of the data or file")]
    format: Prop<SecretFormat>,
    #[property(desc = "ID of the secret that encrypts this one")]
    keyid: Prop<Option<String>>,
    #[property(desc = "Initialization vector of the encryption")]
    iv: Prop<Option<String>>,
    value: Mutex<Option<Vec<u8>>>,
}

type_init!(Secret);

impl UserCreatable for Secret {
    /// QEMU's `qcrypto_secret_load_data` + `qcrypto_secret_prop_set_loaded`.
    fn complete(&self) -> Result<(), qom::Error> {
        self.load().map_err(qom::Error::other)
    }
}

impl Secret {
    fn load(&self) -> Result<(), SecretError> {
        if self.keyid.get().is_some() || self.iv.get().is_some() {
            return Err(SecretError::Encrypted);
        }
        let raw = match (self.data.get(), self.file.get()) {
            (Some(_), Some(_)) => return Err(SecretError::DataAndFile),
            (Some(data), None) => data.into_bytes(),
            (None, Some(file)) => {
                std::fs::read(&file).map_err(|e| SecretError::Read(file.clone(), e))?
            }
            (None, None) => return Err(SecretError::NoData),
        };
        let value = match self.format.get() {
            SecretFormat::Raw => raw,
            SecretFormat::Base64 => base64_decode(&raw).ok_or(SecretError::Base64)?,
        };
        *self.value.lock() = Some(value);
        Ok(())
    }

    /// The secret's bytes, once loaded (QEMU's `qcrypto_secret_lookup`).
    pub fn value(&self) -> Option<Vec<u8>> {
        self.value.lock().clone()
    }
}

/// Why `password-secret=ID` and the like cannot use a secret, in QEMU's words
/// (`qcrypto_secret_lookup`, `qcrypto_secret_lookup_as_utf8`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretLookupError {
    /// No object of that id under `/objects`.
    #[error("No secret with id '{0}'")]
    NotFound(String),
    /// An object of another type.
    #[error("Object with id '{0}' is not a secret")]
    NotASecret(String),
    /// A secret that is not (yet) loaded.
    #[error("Secret with id '{0}' has no data")]
    NoData(String),
    /// Bytes that are not text.
    #[error("Data from secret {0} is not valid UTF-8")]
    NotUtf8(String),
}

/// QEMU's `qcrypto_secret_lookup`: the value of the `secret` object `id`.
pub fn qcrypto_secret_lookup(id: &str) -> Result<Vec<u8>, SecretLookupError> {
    let obj = qom::object_get_objects_root()
        .child(id)
        .ok_or_else(|| SecretLookupError::NotFound(id.to_string()))?;
    let secret = obj
        .downcast::<Secret>()
        .ok_or_else(|| SecretLookupError::NotASecret(id.to_string()))?;
    secret
        .value()
        .ok_or_else(|| SecretLookupError::NoData(id.to_string()))
}

/// QEMU's `qcrypto_secret_lookup_as_utf8`.
pub fn qcrypto_secret_lookup_as_utf8(id: &str) -> Result<String, SecretLookupError> {
    String::from_utf8(qcrypto_secret_lookup(id)?)
        .map_err(|_| SecretLookupError::NotUtf8(id.to_string()))
}

/// Standard base64 (RFC 4648, padded), as glib's `g_base64_decode` accepts it; ASCII
/// whitespace is skipped.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    let sextet = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let chars: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if !chars.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(chars.len() / 4 * 3);
    for (i, quad) in chars.chunks(4).enumerate() {
        let last = i == chars.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = n << 6 | sextet(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_padded_text_and_refuses_garbage() {
        assert_eq!(base64_decode(b"cW9tdm0=").unwrap(), b"qomvm");
        assert_eq!(base64_decode(b"cW9t\ndm0h").unwrap(), b"qomvm!");
        assert_eq!(base64_decode(b"cQ==").unwrap(), b"q");
        assert!(base64_decode(b"cQ=").is_none());
        assert!(base64_decode(b"c*==").is_none());
        assert!(base64_decode(b"cQ==cQ==").is_none());
    }
}
