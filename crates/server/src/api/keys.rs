//! API keys: roles, the create request (checked here) and the key as listed or created.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bad, quote, validate_name};
use crate::error::{Error, Result};

/// `admin` manages everything, including API keys; `owner` manages its groups; `user` uses
/// sandboxes in its groups; `reader` reads its groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    User,
    Owner,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::User => "user",
            Role::Owner => "owner",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "reader" => Some(Role::Reader),
            "user" => Some(Role::User),
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// For people: 1–64 printable characters, not all of them spaces.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub name: String,
    pub role: Role,
    /// Groups the key may see; required (non-empty) unless the role is admin, which sees all
    /// groups and takes none.
    #[serde(default)]
    #[schema(schema_with = group_names)]
    pub groups: Vec<String>,
    /// The key stops working this many seconds from now (1 s – 10 years); absent: never.
    /// Relative, so that a client's clock cannot make a key that is born expired.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub expires_in_s: Option<u64>,
    /// This key's rate limit; absent: the daemon's (`moat serve --rate-limit`).
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// A token bucket: `per_s` requests a second on average, bursts of up to `burst`. Over it a
/// request is answered 429 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// 1–100000.
    #[schema(minimum = 1, maximum = 100_000)]
    pub per_s: u32,
    /// 1–100000.
    #[schema(minimum = 1, maximum = 100_000)]
    pub burst: u32,
}

/// The longest `expires_in_s`: ten years.
pub const MAX_EXPIRES_IN_S: u64 = 315_360_000;
/// The largest `per_s` and `burst` of a [`RateLimit`].
pub const MAX_RATE: u32 = 100_000;

/// A rotation: a new secret for the same key (id, role, groups, rate limit).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateApiKey {
    /// The new secret expires this many seconds from now (1 s – 10 years); absent: the key's
    /// expiry stays as it was (refused if that has passed: give a new one).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub expires_in_s: Option<u64>,
}

/// At most 64 group names ([`super::validate_name`]'s rule).
fn group_names() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(super::NAME_PATTERN))
                .min_length(Some(1))
                .max_length(Some(63)),
        )
        .max_items(Some(64))
        .build()
}

/// An API key as listed: never the secret itself.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    /// The first characters of the key (`moat_` + 8), to recognise it.
    pub prefix: String,
    pub created_at: String,
    /// RFC 3339, UTC; null: never. An expired key is refused with 401 until it is rotated.
    pub expires_at: Option<String>,
    /// RFC 3339, UTC, to within a minute (recorded at most once a minute); null: never used.
    pub last_used_at: Option<String>,
    /// When the secret was last rotated; null: never.
    pub rotated_at: Option<String>,
    /// This key's own rate limit; null: the daemon's.
    pub rate_limit: Option<RateLimit>,
}

/// The answer to a create: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatedApiKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    pub prefix: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub rate_limit: Option<RateLimit>,
    /// The secret, `moat_` + 43 base62 characters. Shown once; store it now.
    pub key: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKey>,
}

impl CreateApiKey {
    pub fn validate(&self) -> Result<()> {
        let n = self.name.trim();
        if n.is_empty() || self.name.chars().count() > 64 || self.name.chars().any(char::is_control)
        {
            return bad(format!(
                "invalid name {}: expected 1–64 printable characters",
                quote(&self.name)
            ));
        }
        match self.role {
            Role::Admin if !self.groups.is_empty() => {
                return Err(Error::Unprocessable(
                    "an admin key sees every group: give it no groups".to_string(),
                ))
            }
            Role::Admin => {}
            _ if self.groups.is_empty() => {
                return Err(Error::Unprocessable(format!(
                    "a {} key needs at least one group in \"groups\"",
                    self.role.as_str()
                )))
            }
            _ => {}
        }
        if self.groups.len() > 64 {
            return bad(format!(
                "too many groups ({}): at most 64",
                self.groups.len()
            ));
        }
        for g in &self.groups {
            validate_name("group name", g)?;
        }
        validate_expiry(self.expires_in_s)?;
        if let Some(r) = self.rate_limit {
            for (field, v) in [("per_s", r.per_s), ("burst", r.burst)] {
                if !(1..=MAX_RATE).contains(&v) {
                    return bad(format!(
                        "invalid rate_limit.{field} {v}: allowed is 1–{MAX_RATE}"
                    ));
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn validate_expiry(expires_in_s: Option<u64>) -> Result<()> {
    match expires_in_s {
        Some(s) if !(1..=MAX_EXPIRES_IN_S).contains(&s) => bad(format!(
            "invalid expires_in_s {s}: allowed is 1–{MAX_EXPIRES_IN_S} seconds (10 years), or \
             absent for never"
        )),
        _ => Ok(()),
    }
}

impl crate::http::extract::Checked for CreateApiKey {
    fn check(&self) -> Result<()> {
        self.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_requests() {
        let k = |role, groups: &[&str]| CreateApiKey {
            name: "ci".into(),
            role,
            groups: groups.iter().map(|s| s.to_string()).collect(),
            expires_in_s: None,
            rate_limit: None,
        };
        k(Role::Admin, &[]).validate().unwrap();
        k(Role::User, &["a"]).validate().unwrap();
        assert!(k(Role::Admin, &["a"]).validate().is_err());
        assert!(k(Role::Reader, &[]).validate().is_err());
        assert!(k(Role::Owner, &["Bad"]).validate().is_err());
        let mut x = k(Role::User, &["a"]);
        x.name = "".into();
        assert!(x.validate().is_err());
        let mut x = k(Role::User, &["a"]);
        x.expires_in_s = Some(0);
        assert!(x.validate().is_err());
        x.expires_in_s = Some(MAX_EXPIRES_IN_S + 1);
        assert!(x.validate().is_err());
        x.expires_in_s = Some(60);
        x.validate().unwrap();
        x.rate_limit = Some(RateLimit { per_s: 0, burst: 1 });
        assert!(x.validate().is_err());
        x.rate_limit = Some(RateLimit {
            per_s: 1,
            burst: MAX_RATE + 1,
        });
        assert!(x.validate().is_err());
    }
}
