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

/// What the server's ServerInit said.
#[derive(Debug)]
pub struct ServerInit {
    pub width: u32,
    pub height: u32,
    /// PIXEL_FORMAT's first four bytes: bits per pixel, depth, big-endian, true colour.
    pub format: [u8; 4],
    pub name: String,
}

/// A refused VNC Authentication: the SecurityResult and RFB 3.8's reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub result: u32,
    pub reason: String,
}

/// The client's half of an RFB 3.8 handshake on `s` (RFC 6143 7.1-7.3), shared: security
/// type None, or VNC Authentication with `password`; the server must offer exactly that
/// one type. Panics on anything else a test does not expect.
pub fn rfb_handshake<S: std::io::Read + std::io::Write>(
    s: &mut S,
    password: Option<&[u8]>,
) -> Result<ServerInit, Refused> {
    let mut version = [0u8; 12];
    s.read_exact(&mut version).unwrap();
    assert_eq!(&version, b"RFB 003.008\n");
    s.write_all(b"RFB 003.008\n").unwrap();
    let mut types = [0u8; 2];
    s.read_exact(&mut types).unwrap();
    match password {
        None => {
            assert_eq!(types, [1, 1], "one security type, None");
            s.write_all(&[1]).unwrap();
        }
        Some(password) => {
            assert_eq!(types, [1, 2], "one security type, VNC Authentication");
            s.write_all(&[2]).unwrap();
            let mut challenge = [0u8; 16];
            s.read_exact(&mut challenge).unwrap();
            s.write_all(&vnc_auth_response(password, &challenge))
                .unwrap();
        }
    }
    let mut result = [0u8; 4];
    s.read_exact(&mut result).unwrap();
    let result = u32::from_be_bytes(result);
    if result != 0 {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut reason = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut reason).unwrap();
        // Then the server closes.
        assert_eq!(s.read(&mut [0u8; 1]).unwrap_or(0), 0);
        return Err(Refused {
            result,
            reason: String::from_utf8(reason).unwrap(),
        });
    }
    s.write_all(&[1]).unwrap(); // shared
    let mut init = [0u8; 24];
    s.read_exact(&mut init).unwrap();
    let len = u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize;
    let mut name = vec![0u8; len];
    s.read_exact(&mut name).unwrap();
    Ok(ServerInit {
        width: u32::from(u16::from_be_bytes([init[0], init[1]])),
        height: u32::from(u16::from_be_bytes([init[2], init[3]])),
        format: init[4..8].try_into().unwrap(),
        name: String::from_utf8(name).unwrap(),
    })
}
