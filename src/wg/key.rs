//! WireGuard keys as `wg` writes them: 32 bytes in base64 (44 characters,
//! one `=`). A private key is held so that it never prints: no `Display`,
//! a `Debug` that says it is hidden, and its bytes wiped on drop.

use base64::Engine as _;
use zeroize::Zeroize as _;

/// Bytes in a key.
pub const KEY_LEN: usize = 32;

/// Decodes a key in `wg`'s form; the error says what is wrong without
/// repeating the text (which may be a private key).
fn decode(s: &str, what: &str) -> Result<[u8; KEY_LEN], String> {
    let s = s.trim();
    let bad =
        || format!("{what} is not a key: 32 bytes in base64 (44 characters, as wg genkey writes)");
    if s.len() != 44 || !s.ends_with('=') {
        return Err(bad());
    }
    let mut out = [0u8; KEY_LEN];
    match base64::engine::general_purpose::STANDARD.decode_slice(s, &mut out) {
        Ok(KEY_LEN) => Ok(out),
        _ => {
            out.zeroize();
            Err(bad())
        }
    }
}

fn encode(bytes: &[u8; KEY_LEN]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A public key: printable, comparable, hashable (peers are found by it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey, String> {
        decode(s, "the public key").map(PublicKey)
    }

    /// The key for the Noise handshake.
    pub fn to_x25519(self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&encode(&self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A secret of 32 bytes (a private or preshared key): never printed,
/// wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; KEY_LEN]);

impl Secret {
    /// Parses a secret; `what` names it in the error ("PrivateKey").
    pub fn parse(s: &str, what: &str) -> Result<Secret, String> {
        decode(s, what).map(Secret)
    }

    /// A fresh private key, as `wg genkey` makes it: 32 random bytes from
    /// the kernel, clamped for Curve25519 (RFC 7748, section 5).
    pub fn generate() -> std::io::Result<Secret> {
        use std::io::Read as _;
        let mut k = [0u8; KEY_LEN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
        k[0] &= 248;
        k[31] = (k[31] & 127) | 64;
        Ok(Secret(k))
    }

    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A secret of these bytes (the userspace API's hex form, decoded).
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Secret {
        Secret(b)
    }

    /// The private key for the Noise handshake.
    pub fn to_x25519(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }

    /// The public key of this private key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.to_x25519()).to_bytes())
    }

    /// The key in `wg`'s form, for `tunfwd genkey` only.
    pub fn to_base64(&self) -> String {
        encode(&self.0)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_ones_are_refused_without_echo() {
        let k = Secret::generate().unwrap();
        assert_eq!(k.bytes()[0] & 7, 0, "clamped");
        assert_eq!(k.bytes()[31] & 0xc0, 0x40, "clamped");
        let again = Secret::parse(&k.to_base64(), "PrivateKey").unwrap();
        assert_eq!(again.public_key(), k.public_key());
        assert_eq!(format!("{k:?}"), "Secret(hidden)");
        let p = k.public_key();
        assert_eq!(PublicKey::parse(&p.to_string()).unwrap(), p);
        // RFC 7748 6.1: Alice's private key and its public key.
        let alice = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let alice_pub = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ];
        assert_eq!(Secret(alice).public_key().0, alice_pub);
        let secret_text = k.to_base64();
        for bad in [
            "",
            "abc",
            &secret_text[..43],
            &format!("{}A", &secret_text[..43]),
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=",
        ] {
            let e = Secret::parse(bad, "PrivateKey").unwrap_err();
            assert!(e.starts_with("PrivateKey is not a key"), "{e}");
            assert!(!e.contains(&secret_text[..20]), "the error repeats no key");
        }
        // 43 characters carry 258 bits: the last one's two low bits must
        // be zero. One with them set is not a key.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = p.to_string().into_bytes();
        let at = ALPHABET.iter().position(|&c| c == s[42]).unwrap();
        s[42] = ALPHABET[at | 1];
        assert!(PublicKey::parse(std::str::from_utf8(&s).unwrap()).is_err());
    }
}
