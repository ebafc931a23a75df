//! VNC Authentication (RFC 6143 7.2.2, QEMU's `start_auth_vnc` and
//! `protocol_client_auth_vnc`): the server sends a random 16-byte challenge, the client
//! sends it back DES-encrypted with the password, and the server compares.
//!
//! The key is the password's first 8 bytes, zero padded, with each byte's bits reversed:
//! the original VNC's `d3des.c` numbers key bits the other way round from FIPS 46-3, so
//! a standard DES ([`des`], RustCrypto) needs the reversed key to agree with every client.

use des::cipher::{BlockCipherEncrypt, KeyInit};

/// The challenge's size (QEMU's `VNC_AUTH_CHALLENGE_SIZE`).
pub const CHALLENGE_SIZE: usize = 16;

/// "Never" for [`PasswordState::expires`] (QEMU's `TIME_MAX`).
pub const NEVER: i64 = i64::MAX;

/// Why a client's response was refused; the client is told only that it failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthFailure {
    /// `password=on` and no `set_password` yet: QEMU refuses everyone.
    #[error("password is not set")]
    NotSet,
    /// `expire_password` passed.
    #[error("password is expired")]
    Expired,
    /// The response is not the challenge encrypted with the password.
    #[error("mismatched password")]
    Mismatch,
}

/// A display's password and when it expires (QEMU's `VncDisplay::password`, `expires`).
#[derive(Clone, Debug)]
pub struct PasswordState {
    password: Option<Vec<u8>>,
    /// Seconds since the epoch after which every authentication fails.
    expires: i64,
}

impl PasswordState {
    /// A display with `password` (from `password-secret=`) or none yet.
    pub fn new(password: Option<Vec<u8>>) -> PasswordState {
        PasswordState {
            password,
            expires: NEVER,
        }
    }

    /// `set_password`: the expiry time stays as it was, as in QEMU.
    pub fn set(&mut self, password: &[u8]) {
        self.password = Some(password.to_vec());
    }

    /// `expire_password`: seconds since the epoch ([`NEVER`] for never).
    pub fn expire_at(&mut self, when: i64) {
        self.expires = when;
    }

    /// Checks a client's `response` to `challenge` at time `now` (seconds since the
    /// epoch).
    pub fn check(
        &self,
        challenge: &[u8; CHALLENGE_SIZE],
        response: &[u8; CHALLENGE_SIZE],
        now: i64,
    ) -> Result<(), AuthFailure> {
        let password = self.password.as_deref().ok_or(AuthFailure::NotSet)?;
        if self.expires < now {
            return Err(AuthFailure::Expired);
        }
        let expected = encrypt_challenge(password, challenge);
        // Every byte is compared, so the time taken says nothing about where they differ.
        let differences = expected
            .iter()
            .zip(response)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if differences == 0 {
            Ok(())
        } else {
            Err(AuthFailure::Mismatch)
        }
    }
}

/// The DES key VNC derives from a password: its first 8 bytes (up to a NUL, as QEMU's
/// `strlen`), zero padded, each byte's bits reversed.
pub fn des_key(password: &[u8]) -> [u8; 8] {
    let len = password
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(password.len());
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(&password[..len]) {
        *k = p.reverse_bits();
    }
    key
}

/// Encrypts `data` (whole 8-byte blocks, ECB) with DES under `key` as given.
pub fn des_ecb_encrypt(key: [u8; 8], data: &mut [u8]) {
    let cipher = des::Des::new(&key.into());
    for block in data.chunks_exact_mut(8) {
        let mut b: [u8; 8] = block.try_into().expect("8-byte chunks");
        let mut array = b.into();
        cipher.encrypt_block(&mut array);
        b = array.into();
        block.copy_from_slice(&b);
    }
}

/// What a client with `password` answers to `challenge`.
pub fn encrypt_challenge(
    password: &[u8],
    challenge: &[u8; CHALLENGE_SIZE],
) -> [u8; CHALLENGE_SIZE] {
    let mut response = *challenge;
    des_ecb_encrypt(des_key(password), &mut response);
    response
}

/// A fresh challenge from the kernel's random source.
pub fn random_challenge() -> std::io::Result<[u8; CHALLENGE_SIZE]> {
    let mut challenge = [0u8; CHALLENGE_SIZE];
    let mut filled = 0;
    while filled < CHALLENGE_SIZE {
        let rest = &mut challenge[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which is valid
        // and exclusively borrowed for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(challenge)
}

/// `expire_password`'s `time` (QEMU's `qmp_expire_password`): `now`, `never`, `+N`
/// seconds from `now_secs`, or N seconds since the epoch. `None` for anything else.
pub fn parse_expire_time(text: &str, now_secs: i64) -> Option<i64> {
    match text {
        "now" => Some(0),
        "never" => Some(NEVER),
        _ => {
            let (base, digits) = match text.strip_prefix('+') {
                Some(rest) => (now_secs, rest),
                None => (0, text),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u64 = digits.parse().ok()?;
            Some(base.saturating_add(i64::try_from(n).unwrap_or(NEVER)))
        }
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(NEVER))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS 81 / the classic worked example: key 0123456789abcdef.
    #[test]
    fn des_is_the_standard_one() {
        let key = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        let mut block = *b"Now is t";
        des_ecb_encrypt(key, &mut block);
        assert_eq!(block, [0x3f, 0xa4, 0x0e, 0x8a, 0x98, 0x4d, 0x48, 0x15]);
        // FIPS 46-3 / NBS validation: key 133457799bbcdff1.
        let key = [0x13, 0x34, 0x57, 0x79, 0x9b, 0xbc, 0xdf, 0xf1];
        let mut block = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        des_ecb_encrypt(key, &mut block);
        assert_eq!(block, [0x85, 0xe8, 0x13, 0x54, 0x0f, 0x0a, 0xb4, 0x05]);
    }

    /// vncpasswd's file for "password" is dbd83cfd727a1458: the password encrypted with
    /// the fixed key 23 82 107 6 35 78 88 7 through d3des, i.e. with the bits reversed.
    #[test]
    fn key_bits_are_reversed_as_d3des_takes_them() {
        let fixed = des_key(&[23, 82, 107, 6, 35, 78, 88, 7]);
        let mut block = *b"password";
        des_ecb_encrypt(fixed, &mut block);
        assert_eq!(block, [0xdb, 0xd8, 0x3c, 0xfd, 0x72, 0x7a, 0x14, 0x58]);
    }

    #[test]
    fn passwords_are_checked_truncated_and_expire() {
        let challenge: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        let mut state = PasswordState::new(None);
        let right = encrypt_challenge(b"secret", &challenge);
        assert_eq!(
            state.check(&challenge, &right, 100),
            Err(AuthFailure::NotSet)
        );
        state.set(b"secret");
        assert_eq!(state.check(&challenge, &right, 100), Ok(()));
        let wrong = encrypt_challenge(b"secreT", &challenge);
        assert_eq!(
            state.check(&challenge, &wrong, 100),
            Err(AuthFailure::Mismatch)
        );
        // Only 8 bytes count.
        state.set(b"12345678-ignored");
        let short = encrypt_challenge(b"12345678", &challenge);
        assert_eq!(state.check(&challenge, &short, 100), Ok(()));
        state.expire_at(99);
        assert_eq!(
            state.check(&challenge, &short, 100),
            Err(AuthFailure::Expired)
        );
        state.expire_at(100);
        assert_eq!(state.check(&challenge, &short, 100), Ok(()));
    }

    #[test]
    fn expire_times_are_qemus() {
        assert_eq!(parse_expire_time("now", 50), Some(0));
        assert_eq!(parse_expire_time("never", 50), Some(NEVER));
        assert_eq!(parse_expire_time("+10", 50), Some(60));
        assert_eq!(parse_expire_time("1700000000", 50), Some(1_700_000_000));
        assert_eq!(parse_expire_time("+", 50), None);
        assert_eq!(parse_expire_time("soon", 50), None);
        assert_eq!(parse_expire_time("", 50), None);
        assert_eq!(parse_expire_time("99999999999999999999", 50), None);
    }

    #[test]
    fn challenges_differ() {
        assert_ne!(random_challenge().unwrap(), random_challenge().unwrap());
    }
}
