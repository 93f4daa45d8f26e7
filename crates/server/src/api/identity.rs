//! Workload identity on the wire: a group's `identity` settings with their bounds, the admin
//! token request and answer, the identity audit, the signing keys as listed, and the two
//! issuer documents relying parties fetch (OIDC discovery and the JWKS). docs/IDENTITY.md.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{bad, quote};
use crate::error::{Error, Result};

/// Token lifetimes, seconds: the default, and the bounds of `identity.ttl_s`.
pub const DEFAULT_TOKEN_TTL_S: u64 = 600;
pub const MIN_TOKEN_TTL_S: u64 = 60;
pub const MAX_TOKEN_TTL_S: u64 = 3600;
/// Audiences a group may allow at most, and the longest one.
pub const MAX_AUDIENCES: usize = 20;
pub const MAX_AUDIENCE_LEN: usize = 512;

/// What a token's `sub` names: the group's identity (the default: one principal for every
/// sandbox of the group, the only form Entra can federate, since it matches subjects
/// exactly), or each sandbox (`…:sandbox:<sandbox_uid>`, for AWS/GCP/Vault policies that
/// want per-instance principals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdentitySubject {
    #[default]
    Group,
    Sandbox,
}

/// A group's workload identity: whether its sandboxes may get signed tokens (JWT, RS256)
/// from this daemon's OIDC issuer, for which audiences, how long they last, and whether guest
/// code may fetch them itself. Only owner and admin keys may change it (adding an audience
/// widens what the group's sandboxes can act as).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySpec {
    /// Off by default: nothing mints tokens for the group's sandboxes.
    pub enabled: bool,
    /// Described in `audiences_schema`.
    #[schema(schema_with = audiences_schema)]
    pub audiences: Vec<String>,
    /// Lifetime of a token, seconds (60–3600; default 600). A request may ask for less.
    #[schema(minimum = 60, maximum = 3600)]
    pub ttl_s: u64,
    pub subject: IdentitySubject,
    /// Whether code in the guest may fetch tokens itself (an endpoint served by the sandbox's
    /// host-side network stack). Off by default: anything running in the sandbox could then
    /// act as the group's identity until the token expires.
    pub in_guest: bool,
}

impl Default for IdentitySpec {
    fn default() -> Self {
        IdentitySpec {
            enabled: false,
            audiences: Vec::new(),
            ttl_s: DEFAULT_TOKEN_TTL_S,
            subject: IdentitySubject::Group,
            in_guest: false,
        }
    }
}

impl IdentitySpec {
    pub fn validate(&self) -> Result<()> {
        if !(MIN_TOKEN_TTL_S..=MAX_TOKEN_TTL_S).contains(&self.ttl_s) {
            return bad(format!(
                "invalid identity.ttl_s {}: allowed is {MIN_TOKEN_TTL_S}–{MAX_TOKEN_TTL_S} seconds",
                self.ttl_s
            ));
        }
        if self.audiences.len() > MAX_AUDIENCES {
            return bad(format!(
                "invalid identity.audiences: {} entries, at most {MAX_AUDIENCES} are allowed",
                self.audiences.len()
            ));
        }
        for (i, a) in self.audiences.iter().enumerate() {
            validate_audience(a)
                .or_else(|m| bad(format!("invalid identity.audiences[{i}] {}: {m}", quote(a))))?;
            if self.audiences[..i].contains(a) {
                return bad(format!(
                    "invalid identity.audiences[{i}] {}: listed twice",
                    quote(a)
                ));
            }
        }
        // Rules between fields, which the document's schema cannot state: 422.
        if self.enabled && self.audiences.is_empty() {
            return Err(Error::Unprocessable(
                "identity.enabled needs at least one entry in identity.audiences (tokens \
                 are only minted for an allowed audience)"
                    .to_string(),
            ));
        }
        if self.in_guest && !self.enabled {
            return Err(Error::Unprocessable(
                "identity.in_guest needs identity.enabled".to_string(),
            ));
        }
        Ok(())
    }
}

/// `IdentitySpec.audiences`: what [`IdentitySpec::validate`] allows of the list itself.
fn audiences_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[\\x21-\\x7e]+$"))
                .min_length(Some(1))
                .max_length(Some(MAX_AUDIENCE_LEN)),
        )
        .max_items(Some(MAX_AUDIENCES))
        .unique_items(true)
        .description(Some(
            "The audiences a token may be asked for (exact strings, e.g. `sts.amazonaws.com`, \
             `api://AzureADTokenExchange`); each token carries exactly one. At most 20, each \
             1–512 printable ASCII characters without spaces; at least one when enabled.",
        ))
        .build()
}

/// An audience as a token may carry it: 1–512 printable ASCII characters, no spaces (they are
/// URIs or plain identifiers at every relying party).
pub fn validate_audience(a: &str) -> std::result::Result<(), String> {
    if a.is_empty() || a.len() > MAX_AUDIENCE_LEN || !a.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "allowed are 1–{MAX_AUDIENCE_LEN} printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

/// `POST …/sandboxes/{id}/identity/token`: a token for one audience (admin debugging).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// One of the group's `identity.audiences`.
    #[schema(example = "sts.amazonaws.com")]
    pub audience: String,
    /// Shorter than the group's `identity.ttl_s` if given (60 s at least).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 60, maximum = 3600)]
    pub ttl_s: Option<u64>,
}

/// A minted token and what it says (the same values as its claims).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityToken {
    /// The JWT (RS256): a bearer credential until `expires_at`.
    pub token: String,
    pub token_type: String,
    pub audience: String,
    pub subject: String,
    pub issuer: String,
    pub jti: String,
    /// The signing key (`kid` of the JWS header).
    pub kid: String,
    /// Unix seconds.
    pub expires_on: i64,
    /// RFC 3339, UTC.
    pub expires_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdentityOutcome {
    Minted,
    Refused,
}

/// How a token was asked for: `api` (an admin's debug request), `endpoint` (guest code, from
/// the in-guest endpoint), `egress` (the network stack, to inject at egress).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdentityDelivery {
    Api,
    Endpoint,
    Egress,
}

impl IdentityDelivery {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityDelivery::Api => "api",
            IdentityDelivery::Endpoint => "endpoint",
            IdentityDelivery::Egress => "egress",
        }
    }
}

/// One mint or refusal. Never the token itself: `jti` joins it with relying parties' logs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityEvent {
    /// Increasing: `?after=` pages on it.
    pub id: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub sandbox: String,
    pub outcome: IdentityOutcome,
    pub delivery: IdentityDelivery,
    pub audience: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_on: Option<i64>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The API key that asked (`api` delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityEvents {
    pub items: Vec<IdentityEvent>,
}

/// `GET /v1/sandbox-groups/{group}/identity/events`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct IdentityEventsQuery {
    /// Only this sandbox's events.
    pub sandbox: Option<String>,
    /// Only events after this id (oldest first then); else the newest, oldest first.
    pub after: Option<u64>,
    /// At most this many (1–1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

impl IdentityEventsQuery {
    pub fn limit(&self) -> Result<u32> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=1000) => Ok(n),
            Some(n) => bad(format!("invalid limit {n}: allowed is 1–1000")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Published in the JWKS, not signing yet: the next key.
    Pending,
    /// Signing.
    Active,
    /// Published until every token it signed has expired, no longer signing.
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Active => "active",
            KeyState::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Option<KeyState> {
        [KeyState::Pending, KeyState::Active, KeyState::Retired]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// A signing key as listed (its public half is in the JWKS; the private half never leaves
/// `MOAT_HOME/identity/keys`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityKey {
    /// RFC 7638 thumbprint.
    pub kid: String,
    pub state: KeyState,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<String>,
    /// Retired keys: when it leaves the JWKS (every token it signed has expired by then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_after: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityKeys {
    /// The issuer URL (`iss` of every token).
    pub issuer: String,
    pub keys: Vec<IdentityKey>,
}

/// An RSA public key as a JWK (RFC 7517).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Jwk {
    pub kty: String,
    #[serde(rename = "use")]
    pub use_: String,
    pub alg: String,
    pub kid: String,
    /// Modulus, base64url.
    pub n: String,
    /// Exponent, base64url.
    pub e: String,
}

/// `GET /.well-known/jwks.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// `GET /.well-known/openid-configuration`: the part of OIDC discovery relying parties read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OpenIdConfiguration {
    pub issuer: String,
    pub jwks_uri: String,
    pub response_types_supported: Vec<String>,
    pub subject_types_supported: Vec<String>,
    pub id_token_signing_alg_values_supported: Vec<String>,
    pub claims_supported: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(v: serde_json::Value) -> String {
        serde_json::from_value::<IdentitySpec>(v)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map_err(|e| e.to_string()))
            .unwrap_err()
    }

    #[test]
    fn defaults_are_off_and_bounds_hold() {
        let s: IdentitySpec = serde_json::from_str("{}").unwrap();
        assert_eq!(s, IdentitySpec::default());
        assert!(!s.enabled && !s.in_guest && s.ttl_s == 600);
        s.validate().unwrap();
        let ok: IdentitySpec = serde_json::from_value(serde_json::json!({
            "enabled": true, "audiences": ["sts.amazonaws.com", "api://AzureADTokenExchange"],
            "ttl_s": 3600, "subject": "sandbox"}))
        .unwrap();
        ok.validate().unwrap();
        IdentitySpec {
            in_guest: true,
            ..ok.clone()
        }
        .validate()
        .unwrap();
        for (v, want) in [
            (serde_json::json!({"ttl_s": 59}), "60–3600"),
            (serde_json::json!({"ttl_s": 3601}), "60–3600"),
            (serde_json::json!({"enabled": true}), "at least one"),
            (
                serde_json::json!({"in_guest": true}),
                "needs identity.enabled",
            ),
            (serde_json::json!({"audiences": [""]}), "audiences[0]"),
            (serde_json::json!({"audiences": ["a b"]}), "without spaces"),
            (serde_json::json!({"audiences": ["x", "x"]}), "twice"),
            (serde_json::json!({"audiences": ["é"]}), "printable ASCII"),
            (serde_json::json!({"subject": "user"}), "`group`"),
            (serde_json::json!({"audience": ["a"]}), "unknown field"),
        ] {
            let e = err(v.clone());
            assert!(e.contains(want), "{v}: {e}");
        }
        let many: Vec<String> = (0..21).map(|i| format!("a{i}")).collect();
        assert!(err(serde_json::json!({ "audiences": many })).contains("at most 20"));
    }
}
