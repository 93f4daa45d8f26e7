//! The types of the HTTP API (requests and responses) and their validation, one file per
//! resource, each with its validation beside its types and its tests at its end. The OpenAPI
//! document is generated from these, so they are the single description of the wire format.
//! Requests reject unknown fields: a typo must fail loudly, not be silently ignored.
//!
//! This file holds the error body and the checks that several resources share (names,
//! images, environments, labels, quoting).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};

mod audit;
mod egress;
mod exec;
mod files;
mod groups;
mod identity;
mod images;
mod keys;
mod nodes;
mod policy;
mod ports;
mod processes;
mod sandboxes;
mod secrets;
mod shell;
mod snapshots;
mod system;

pub use audit::*;
pub use egress::*;
pub use exec::*;
pub use files::*;
pub use groups::*;
pub use identity::*;
pub use images::*;
pub use keys::*;
pub use moat_vm::Tier;
pub use nodes::*;
pub use policy::*;
pub use ports::*;
pub use processes::*;
pub use sandboxes::*;
pub use secrets::*;
pub use shell::*;
pub use snapshots::*;
pub use system::*;

/// `{"error": {"code", "message"}}`: the body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable and machine-readable: bad_request (the request is not what the OpenAPI
    /// document allows), unauthorized, forbidden, policy_denied, not_found,
    /// method_not_allowed, conflict, payload_too_large, unprocessable (allowed by the
    /// document, refused by a rule it cannot state), too_many_requests, rate_limited,
    /// other_node (a forwarded request reached a node that does not run the sandbox: the
    /// message names the node that does and its URL),
    /// unavailable, bad_gateway (the sandbox's agent failed, or its node could not be
    /// reached), no_space, internal.
    pub code: String,
    /// For people: what was wrong and, for bad input, what is allowed.
    pub message: String,
    /// `policy_denied` only: why the group's policy refused the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub findings: Option<Vec<moat_policy::Finding>>,
    /// `policy_denied` only: the version of the policy that refused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
}

impl ErrorDetail {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ErrorDetail {
        ErrorDetail {
            code: code.into(),
            message: message.into(),
            findings: None,
            policy_version: None,
        }
    }
}

pub(crate) const DAY: u64 = 86_400;

/// The 502 of every operation that talks to a sandbox's agent.
pub const AGENT_FAILED: &str = "The sandbox's agent did not answer, or broke the protocol: its \
    `health` says so, and the daemon reconnects or fails it";

pub const MAX_ENV: usize = 256;
pub const MAX_LABELS: usize = 64;
pub const MAX_IMAGE_LEN: usize = 512;

/// Group names: lowercase letters, digits and '-', 1–63 chars, not starting or ending with '-'
/// (a DNS label, so a name can later appear in host names and paths without escaping).
/// [`validate_name`]'s rule as an ECMA-262 pattern, for the OpenAPI document (with lengths 1–63).
pub const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$";

pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid {what} {}: allowed are 1–63 lowercase letters, digits and '-', not \
             starting or ending with '-'",
            quote(name)
        )))
    }
}

/// [`validate_image`]'s characters as a pattern: no control characters and no white space
/// (Unicode's White_Space, as `char::is_whitespace`).
const IMAGE_PATTERN: &str =
    "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]+$";

fn image_string() -> utoipa::openapi::ObjectBuilder {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(IMAGE_PATTERN))
        .min_length(Some(1))
        .max_length(Some(MAX_IMAGE_LEN))
}

/// The schema of a group's `image`: what [`validate_image`] allows.
pub fn image_schema() -> utoipa::openapi::Object {
    image_string()
        .description(Some(
            "Image name or sha256 digest: 1–512 characters without spaces or control \
             characters",
        ))
        .examples([serde_json::json!("base")])
        .build()
}

/// An optional `image` (null: the default). A `oneOf` rather than a type list: with a type
/// list, schemathesis sends `null` where it meant a string the schema refuses.
pub fn optional_image_schema() -> utoipa::openapi::Schema {
    utoipa::openapi::schema::OneOfBuilder::new()
        .item(
            utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::Null),
        )
        .item(image_string())
        .description(Some(
            "Image name or sha256 digest (1–512 characters without spaces or control \
             characters); default: the group's image",
        ))
        .build()
        .into()
}

/// An optional name checked by [`validate_name`] (a snapshot's, say), or null.
pub fn optional_name_schema() -> utoipa::openapi::schema::OneOfBuilder {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(NAME_PATTERN))
                .min_length(Some(1))
                .max_length(Some(63)),
        )
}

pub(crate) fn validate_image(img: &str) -> Result<()> {
    if img.is_empty()
        || img.chars().count() > MAX_IMAGE_LEN
        || img.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return bad(format!(
            "invalid image {}: expected an image name or digest of 1–{MAX_IMAGE_LEN} \
             characters without spaces",
            quote(img)
        ));
    }
    Ok(())
}

/// Environment keys as a shell allows them; values without NUL.
pub(crate) fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<()> {
    if env.len() > MAX_ENV {
        return bad(format!(
            "too many {field} variables ({}): at most {MAX_ENV}",
            env.len()
        ));
    }
    for (k, v) in env {
        let key_ok = !k.is_empty()
            && k.len() <= 256
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return bad(format!(
                "invalid {field} key {}: letters, digits and '_', not starting with a digit",
                quote(k)
            ));
        }
        if v.contains('\0') {
            return bad(format!(
                "invalid {field} value of {k}: it contains a NUL byte"
            ));
        }
    }
    Ok(())
}

/// An environment variable's name, as [`validate_env`] checks it (a pattern for the document).
const ENV_KEY_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]{0,255}$";
/// A label's name (and a non-empty value), as `label_name_ok` checks it.
const LABEL_NAME: &str = "[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?";
/// One label of a label key's DNS-subdomain prefix.
const DNS_LABEL: &str = "[a-z0-9]([a-z0-9-]*[a-z0-9])?";

/// [`validate_label_key`] as a pattern, unanchored (the prefix's limit of 253 characters is
/// in the description: a pattern cannot count across its labels).
fn label_key_pattern() -> String {
    format!("({DNS_LABEL}(\\.{DNS_LABEL})*/)?{LABEL_NAME}")
}

fn label_value_pattern() -> String {
    format!("({LABEL_NAME})?")
}

fn string_schema(pattern: String) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(pattern))
        .build()
}

/// A map's values, each of `schema`.
fn values(
    schema: utoipa::openapi::Object,
) -> utoipa::openapi::schema::AdditionalProperties<utoipa::openapi::Schema> {
    utoipa::openapi::schema::AdditionalProperties::RefOr(utoipa::openapi::RefOr::T(
        utoipa::openapi::Schema::Object(schema),
    ))
}

/// The schema of every `env` map: what [`validate_env`] allows.
pub fn env_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Object)
        .description(Some(format!(
            "Environment variables: at most {MAX_ENV}; names of letters, digits and '_', not \
             starting with a digit (1–256 characters); values without NUL"
        )))
        .property_names(Some(string_schema(ENV_KEY_PATTERN.to_string())))
        .additional_properties(Some(values(string_schema("^[^\\x00]*$".to_string()))))
        .max_properties(Some(MAX_ENV))
        .build()
}

/// The schema of every `labels` map: what [`validate_labels`] allows.
pub fn labels_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Object)
        .description(Some(format!(
            "Kubernetes-style labels, at most {MAX_LABELS}: keys [prefix/]name, the prefix a \
             lowercase DNS subdomain of at most 253 characters, the name 1–63 letters, digits, \
             '-', '_' and '.', starting and ending with a letter or digit; values the same as a \
             name, or empty"
        )))
        .property_names(Some(string_schema(format!("^{}$", label_key_pattern()))))
        .additional_properties(Some(values(string_schema(format!(
            "^{}$",
            label_value_pattern()
        )))))
        .max_properties(Some(MAX_LABELS))
        .build()
}

/// The schema of a label selector (`?labels=`): what [`parse_selector`] allows.
pub fn selector_schema() -> utoipa::openapi::Object {
    let pair = format!("{}={}", label_key_pattern(), label_value_pattern());
    string_schema(format!("^({pair})?(,({pair})?)*$"))
}

pub(crate) fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return bad(format!(
            "too many labels ({}): at most {MAX_LABELS}",
            labels.len()
        ));
    }
    for (k, v) in labels {
        validate_label_key(k)
            .map_err(|m| Error::BadRequest(format!("invalid label key {}: {m}", quote(k))))?;
        validate_label_value(v).map_err(|m| {
            Error::BadRequest(format!(
                "invalid value {} of label {}: {m}",
                quote(v),
                quote(k)
            ))
        })?;
    }
    Ok(())
}

pub(crate) fn bad<T>(m: String) -> Result<T> {
    Err(Error::BadRequest(m))
}

/// Unix seconds → RFC 3339 UTC (`2024-01-02T03:04:05Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An `http://` or `https://` URL with a host, printable, without a query or fragment: the
/// base other URLs are built on (`--issuer-url`, `--advertise-url`).
pub fn is_http_base_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| {
        !r.is_empty()
            && !r.starts_with('/')
            && r.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
    })
}

/// A user-supplied string shown in an error message, quoted and cut so that a huge or
/// multi-line value cannot flood the message.
pub fn quote(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX).collect();
        format!("{:?}…", cut)
    } else {
        format!("{s:?}")
    }
}

/// Kubernetes label keys: an optional DNS-subdomain prefix and '/', then a name of ≤ 63
/// characters, alphanumeric at both ends, with '-', '_' and '.' inside.
pub fn validate_label_key(k: &str) -> std::result::Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(
                "the prefix before '/' must be a lowercase DNS subdomain of at most 253 \
                        characters"
                    .to_string(),
            );
        }
    }
    if name.is_empty() || !label_name_ok(name) {
        return Err(
            "expected [prefix/]name, name 1–63 characters of letters, digits, '-', '_' \
                    and '.', starting and ending with a letter or digit"
                .to_string(),
        );
    }
    Ok(())
}

pub fn validate_label_value(v: &str) -> std::result::Result<(), String> {
    if v.is_empty() || label_name_ok(v) {
        Ok(())
    } else {
        Err(
            "expected at most 63 characters of letters, digits, '-', '_' and '.', starting and \
             ending with a letter or digit (or empty)"
                .to_string(),
        )
    }
}

fn label_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() <= 63
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "team-a", "a1", &"x".repeat(63)] {
            validate_name("group name", ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"x".repeat(64)] {
            let e = validate_name("group name", bad).unwrap_err().to_string();
            assert!(e.contains("lowercase letters"), "{e}");
        }
    }

    #[test]
    fn labels() {
        for ok in ["app", "app.kubernetes.io/name", "a_b-c.d", "x/Y"] {
            validate_label_key(ok).unwrap();
        }
        for bad in ["", "/a", "a/", "-a", "a-", "A/b", "a/b/c", &"x".repeat(64)] {
            assert!(validate_label_key(bad).is_err(), "{bad}");
        }
        for ok in ["", "v1", "a.b_c-d"] {
            validate_label_value(ok).unwrap();
        }
        for bad in ["-v", "v ", "ü", &"x".repeat(64)] {
            assert!(validate_label_value(bad).is_err(), "{bad}");
        }
    }

    /// Whether `schema` (of the document) takes `value`, by the validator the server uses.
    fn takes(schema: utoipa::openapi::Object, value: serde_json::Value) -> bool {
        let schema = serde_json::to_value(schema).unwrap();
        jsonschema::validator_for(&schema).unwrap().is_valid(&value)
    }

    #[test]
    fn the_documents_label_env_and_selector_schemas_say_what_the_checks_do() {
        let keys = [
            "app",
            "app.kubernetes.io/name",
            "a_b-c.d",
            "x/Y",
            "",
            "/a",
            "a/",
            "-a",
            "a-",
            "A/b",
            "a/b/c",
            "a..b/c",
            "a.-b/c",
            "é",
            "a b",
            &"x".repeat(63),
            &"x".repeat(64),
        ];
        let values = [
            "",
            "v1",
            "a.b_c-d",
            "-v",
            "v ",
            "ü",
            &"x".repeat(63),
            &"x".repeat(64),
        ];
        for k in keys {
            let ok = validate_label_key(k).is_ok();
            assert_eq!(
                takes(labels_schema(), serde_json::json!({ k: "v" })),
                ok,
                "key {k:?}"
            );
            let sel = format!("{k}=v");
            assert_eq!(
                takes(selector_schema(), serde_json::json!(sel)),
                ok,
                "{sel:?}"
            );
        }
        for v in values {
            let ok = validate_label_value(v).is_ok();
            assert_eq!(
                takes(labels_schema(), serde_json::json!({ "k": v })),
                ok,
                "value {v:?}"
            );
            let sel = format!("a=b,k={v},,");
            let parsed = parse_selector(&sel).is_ok();
            assert_eq!(parsed, ok, "{sel:?}");
            assert_eq!(
                takes(selector_schema(), serde_json::json!(sel)),
                ok,
                "{sel:?}"
            );
        }
        for sel in ["", ",", "a", "a=b=c", "=b", "a=b,c"] {
            assert_eq!(
                takes(selector_schema(), serde_json::json!(sel)),
                parse_selector(sel).is_ok(),
                "{sel:?}"
            );
        }
        let too_many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(validate_labels(&too_many).is_err());
        assert!(!takes(labels_schema(), serde_json::json!(too_many)));

        for k in [
            "A",
            "_a",
            "a1",
            "PATH",
            "1a",
            "a-b",
            "",
            "a b",
            &"x".repeat(256),
            &"x".repeat(257),
        ] {
            let env = BTreeMap::from([(k.to_string(), "v".to_string())]);
            let ok = validate_env("env", &env).is_ok();
            assert_eq!(
                takes(env_schema(), serde_json::json!(env)),
                ok,
                "env key {k:?}"
            );
        }
        for v in ["", "x y", "a\0b"] {
            let env = BTreeMap::from([("K".to_string(), v.to_string())]);
            let ok = validate_env("env", &env).is_ok();
            assert_eq!(
                takes(env_schema(), serde_json::json!(env)),
                ok,
                "env value {v:?}"
            );
        }
    }

    #[test]
    fn the_documents_image_schema_says_what_the_check_does() {
        for img in [
            "base",
            "sha256:ab",
            "a b",
            "a\tb",
            "a\u{a0}b",
            "a\u{3000}b",
            "a\u{feff}b",
            "a\u{85}b",
            "a\u{7f}b",
            "é",
            "",
            &"x".repeat(512),
            &"x".repeat(513),
            &"é".repeat(512),
        ] {
            let ok = validate_image(img).is_ok();
            assert_eq!(takes(image_schema(), serde_json::json!(img)), ok, "{img:?}");
        }
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn quoting_is_bounded() {
        let q = quote(&"x".repeat(10_000));
        assert!(q.len() < 100);
    }
}
