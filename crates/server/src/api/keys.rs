//! API keys: roles, the create request (checked here) and the key as listed or created.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bad, quote, validate_name};
use crate::error::Result;

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
    /// For people: 1–64 printable characters.
    pub name: String,
    pub role: Role,
    /// Groups the key may see; required (non-empty) unless the role is admin, which sees all
    /// groups and takes none.
    #[serde(default)]
    pub groups: Vec<String>,
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
                return bad("an admin key sees every group: give it no groups".to_string())
            }
            Role::Admin => {}
            _ if self.groups.is_empty() => {
                return bad(format!(
                    "a {} key needs at least one group in \"groups\"",
                    self.role.as_str()
                ))
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
        Ok(())
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
        };
        k(Role::Admin, &[]).validate().unwrap();
        k(Role::User, &["a"]).validate().unwrap();
        assert!(k(Role::Admin, &["a"]).validate().is_err());
        assert!(k(Role::Reader, &[]).validate().is_err());
        assert!(k(Role::Owner, &["Bad"]).validate().is_err());
        let mut x = k(Role::User, &["a"]);
        x.name = "".into();
        assert!(x.validate().is_err());
    }
}
