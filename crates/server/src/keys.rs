//! API key secrets: `moat_` + 43 base62 characters (256 bits from the OS CSPRNG).
//! Only a SHA-256 of the key is stored: with 256 random bits a slow password hash adds nothing,
//! and a fast hash keeps every request's check cheap.

use rand::distributions::{Alphanumeric, DistString};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const KEY_PREFIX: &str = "moat_";
pub const KEY_BODY_LEN: usize = 43;
/// Characters after `moat_` kept in clear to recognise a key in listings (and to find its row).
pub const PUBLIC_LEN: usize = 8;

/// A new random key.
pub fn generate() -> String {
    // Alphanumeric samples uniformly from [A-Za-z0-9]; 43 × log2(62) ≈ 256 bits.
    let body = Alphanumeric.sample_string(&mut rand::rngs::OsRng, KEY_BODY_LEN);
    format!("{KEY_PREFIX}{body}")
}

/// Whether `key` has the form of a moat key.
pub fn well_formed(key: &str) -> bool {
    key.strip_prefix(KEY_PREFIX).is_some_and(|body| {
        body.len() == KEY_BODY_LEN && body.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

pub fn check_bootstrap(key: &str) -> Result<()> {
    if well_formed(key) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "MOAT_BOOTSTRAP_KEY must be \"{KEY_PREFIX}\" followed by {KEY_BODY_LEN} characters \
             of [A-Za-z0-9] (256 random bits), e.g. one printed by `moat api-key create`"
        )))
    }
}

/// The public part: `moat_` + the first 8 characters. Only call on a well-formed key.
pub fn public_prefix(key: &str) -> String {
    key.chars().take(KEY_PREFIX.len() + PUBLIC_LEN).collect()
}

pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A random row id for a key (not secret).
pub fn new_id() -> String {
    let b: [u8; 8] = rand::random();
    format!("key-{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(well_formed(&a) && well_formed(&b));
        assert_ne!(a, b);
        assert_eq!(a.len(), 48);
        assert_eq!(public_prefix(&a).len(), 13);
    }

    #[test]
    fn bootstrap_form_is_checked() {
        assert!(check_bootstrap(&generate()).is_ok());
        for bad in [
            "",
            "moat_",
            "moat_short",
            &format!("moat_{}", "!".repeat(43)),
        ] {
            assert!(check_bootstrap(bad).is_err());
        }
        assert!(check_bootstrap(&format!("xxxx_{}", "a".repeat(43))).is_err());
    }
}
