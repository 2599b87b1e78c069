//! CHAP with MD5 (RFC 1994 as profiled by RFC 7143 §12.1.3), one-way and mutual.
//!
//! The response to a challenge is `MD5(identifier || secret || challenge)`. The target sends
//! `CHAP_A`, `CHAP_I`, `CHAP_C`; the initiator answers `CHAP_N`, `CHAP_R` and, for mutual CHAP,
//! its own `CHAP_I` and `CHAP_C`, which the target answers with its `CHAP_N` and `CHAP_R`.

use md5::{Digest, Md5};

/// CHAP algorithm number for MD5 (RFC 7143 §12.1.3).
pub const ALGORITHM_MD5: u32 = 5;

/// A CHAP user name and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The CHAP name (`CHAP_N`).
    pub user: String,
    /// The shared secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The CHAP response to `challenge` with identifier `id` and `secret`.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compare two responses without an early exit.
pub fn responses_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_a_hand_computed_vector() {
        // MD5(0x01 || "secret" || 0x00 0x01 0x02 0x03), computed independently with
        // `printf '\x01secret\x00\x01\x02\x03' | md5sum`.
        let r = response(1, b"secret", &[0, 1, 2, 3]);
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "e82cb2ed1efe04893c9cf73d4dd12e2d");
    }

    #[test]
    fn equality_is_exact() {
        assert!(responses_equal(&[1, 2], &[1, 2]));
        assert!(!responses_equal(&[1, 2], &[1, 3]));
        assert!(!responses_equal(&[1, 2], &[1, 2, 3]));
    }

    #[test]
    fn debug_hides_the_secret() {
        let c = Credentials {
            user: "u".into(),
            secret: b"topsecret".to_vec(),
        };
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
