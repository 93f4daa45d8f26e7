//! Group secrets as the API takes and shows them: a value goes in (`PUT`), only names and
//! times come out. Values are what egress transforms put in request headers
//! (`${secret:NAME}`), so they are checked as header text.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bad, quote};
use crate::error::Result;

/// Secrets a group may have.
pub const MAX_SECRETS: usize = 64;
pub const MAX_SECRET_LEN: usize = moat_net::transform::MAX_VALUE_LEN;

/// `PUT /v1/sandbox-groups/{group}/secrets/{name}`. Its `Debug` never shows the value.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// 1–8192 visible ASCII characters and spaces, not starting or ending with a space.
    /// Never returned by any endpoint.
    #[schema(
        min_length = 1,
        max_length = 8192,
        example = "sk-example",
        pattern = "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$"
    )]
    pub value: String,
}

impl std::fmt::Debug for SetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetSecret { value: <redacted> }")
    }
}

impl SetSecret {
    /// The value, checked; the error never quotes it.
    pub fn into_secret(self) -> Result<moat_net::Secret> {
        let v = moat_net::Secret::new(self.value);
        let s = v.expose();
        if s.is_empty() || s.len() > MAX_SECRET_LEN {
            return bad(format!(
                "invalid secret value: it has {} bytes; allowed are 1–{MAX_SECRET_LEN}",
                s.len()
            ));
        }
        if let Err(m) = moat_net::transform::check_header_text(s) {
            return bad(format!("invalid secret value: {m}"));
        }
        if s.starts_with(' ') || s.ends_with(' ') {
            return bad("invalid secret value: it starts or ends with a space".into());
        }
        Ok(v)
    }
}

/// A secret as listed: never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretInfo {
    pub name: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// When the value was last set.
    pub updated_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretList {
    pub secrets: Vec<SecretInfo>,
}

pub fn validate_secret_name(name: &str) -> Result<()> {
    moat_net::transform::check_secret_name(name)
        .or_else(|m| bad(format!("invalid secret name {}: {m}", quote(name))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_names_are_checked_without_echoing_the_value() {
        let set = |v: &str| SetSecret { value: v.into() }.into_secret();
        assert_eq!(set("sk-abc 123").unwrap().expose(), "sk-abc 123");
        for (v, want) in [
            ("", "1–8192"),
            ("line\nbreak-SECRETPART", "0x0a"),
            (" lead-SECRETPART", "space"),
            ("tail-SECRETPART ", "space"),
            ("ünïcode-SECRETPART", "0xc3"),
        ] {
            let e = set(v).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains("SECRETPART"), "{v:?}: {e}");
        }
        assert!(set(&"a".repeat(MAX_SECRET_LEN + 1)).is_err());
        let dbg = format!(
            "{:?}",
            SetSecret {
                value: "sk-hidden".into()
            }
        );
        assert!(!dbg.contains("sk-hidden"), "{dbg}");
        for ok in ["openai", "a", "gh_token-2"] {
            validate_secret_name(ok).unwrap();
        }
        for bad in ["", "A", "-a", "_a", "a.b", "a b", &"x".repeat(64)] {
            assert!(validate_secret_name(bad).is_err(), "{bad:?}");
        }
    }
}
