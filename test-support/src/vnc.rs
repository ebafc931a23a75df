//! VNC Authentication as clients do it (RFC 6143 7.2.2): the DES response to the server's
//! challenge, and the password files of `vncpasswd`, which `vncsnapshot -passwd` and other
//! clients read.

/// The key vncpasswd encrypts password files with (VNC's `fixedkey`), as d3des takes keys:
/// each byte's bits reversed.
const VNCPASSWD_KEY: [u8; 8] = [23, 82, 107, 6, 35, 78, 88, 7];

/// DES in ECB mode over whole 8-byte blocks.
pub fn des_ecb(key: [u8; 8], data: &[u8]) -> Vec<u8> {
    use des::cipher::{BlockCipherEncrypt, KeyInit};
    let cipher = des::Des::new(&key.into());
    data.chunks_exact(8)
        .flat_map(|b| {
            let mut block = <[u8; 8]>::try_from(b).unwrap().into();
            cipher.encrypt_block(&mut block);
            <[u8; 8]>::from(block)
        })
        .collect()
}

/// The response to a 16-byte challenge: the challenge DES-encrypted with the password's
/// first 8 bytes (zero padded), each byte's bits reversed (d3des's key order).
pub fn vnc_auth_response(password: &[u8], challenge: &[u8]) -> Vec<u8> {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    des_ecb(key, challenge)
}

/// A `vncpasswd` file for `password`: its first 8 bytes, zero padded, DES-encrypted with
/// the fixed key.
pub fn vncpasswd_file(password: &[u8]) -> Vec<u8> {
    let mut plain = [0u8; 8];
    let n = password.len().min(8);
    plain[..n].copy_from_slice(&password[..n]);
    des_ecb(VNCPASSWD_KEY.map(u8::reverse_bits), &plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS 81's DES example, and a password file `vncpasswd` wrote for "password"
    /// (the first 8 bytes of `printf 'password\n' | vncpasswd -f`).
    #[test]
    fn des_and_vncpasswd_files() {
        let key = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        assert_eq!(
            des_ecb(key, b"Now is t"),
            [0x3f, 0xa4, 0x0e, 0x8a, 0x98, 0x4d, 0x48, 0x15]
        );
        assert_eq!(
            vncpasswd_file(b"password"),
            [0xdb, 0xd8, 0x3c, 0xfd, 0x72, 0x7a, 0x14, 0x58]
        );
    }
}
