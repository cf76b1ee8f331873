//! Secret values (RunGen keys, caller tokens) that must never be printed.
//!
//! `Debug` and `Display` show a short fingerprint (the first 8 hex digits of
//! the SHA-256 of the value), which is enough to tell two keys apart in logs
//! and in `GET /config` without revealing either.

use sha2::{Digest, Sha256};
use std::fmt;

/// A secret string. The value is only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw value. Call sites are the few places that must send it (the
    /// upstream request header); grep for `expose` to audit them.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `sha256:` followed by the first 8 hex digits of the value's SHA-256.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }
}

/// The fingerprint format shared by secrets and token hashes.
pub fn fingerprint(value: &[u8]) -> String {
    let digest = Sha256::digest(value);
    format!("sha256:{}", &hex::encode(digest)[..8])
}

/// SHA-256 of a caller token, the form in which the gateway knows tokens.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.fingerprint())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// A fresh random caller token (256 bits, URL-safe) and its SHA-256 hex.
pub fn new_token() -> (String, String) {
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token = format!("rgw_{}", hex::encode(raw));
    let digest = hex::encode(token_digest(token.as_bytes()));
    (token, digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("super-secret-canary-value");
        assert!(!format!("{s:?}").contains("canary"));
        assert!(!format!("{s}").contains("canary"));
        assert!(format!("{s}").starts_with("sha256:"));
        assert_eq!(format!("{s}").len(), "sha256:".len() + 8);
    }

    #[test]
    fn new_tokens_are_distinct_and_hash_matches() {
        let (t1, h1) = new_token();
        let (t2, _) = new_token();
        assert_ne!(t1, t2);
        // 256 bits of entropy = 64 hex digits after the prefix.
        assert_eq!(t1.len(), 4 + 64);
        assert_eq!(h1, hex::encode(token_digest(t1.as_bytes())));
    }
}
