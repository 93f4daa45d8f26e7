//! Sandbox groups: a group's spec (image, tier, warm pool, lifecycle timers, egress rules,
//! labels) with its defaults and bounds, and the group as returned.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bad, quote, validate_image, validate_labels, Tier, DAY};
use crate::error::{Error, Result};

pub const MAX_EGRESS_RULES: usize = 256;
pub const MAX_PORTS: usize = 64;
pub const MAX_POOL: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    #[default]
    Suspend,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    #[default]
    Deny,
    Allow,
}

/// A sandbox group's settings. Every field is optional in a request; the stored and returned
/// spec has every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSpec {
    /// Default image (name or sha256 digest) of the group's sandboxes.
    #[schema(example = "base")]
    pub image: String,
    pub tier: Tier,
    pub pool: PoolSpec,
    pub lifecycle: LifecycleSpec,
    pub egress: EgressSpec,
    /// Kubernetes-style labels (at most 64).
    pub labels: BTreeMap<String, String>,
}

impl Default for GroupSpec {
    fn default() -> Self {
        GroupSpec {
            image: "base".to_string(),
            tier: Tier::default(),
            pool: PoolSpec::default(),
            lifecycle: LifecycleSpec::default(),
            egress: EgressSpec::default(),
            labels: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSpec {
    /// Ready sandboxes kept warm for this group, 0–64.
    #[schema(maximum = 64)]
    pub size: u32,
}

/// Timers of a group's sandboxes. `null` means "never".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleSpec {
    /// Seconds without exec, file or shell activity and without a running background
    /// process before `on_idle` applies (1 s – 7 days; default 300).
    pub idle_timeout_s: Option<u64>,
    pub on_idle: OnIdle,
    /// Seconds a suspended sandbox is kept before it is deleted (1 s – 90 days; default 7 days).
    pub suspended_ttl_s: Option<u64>,
    /// Upper bound on a sandbox's whole life, after which it is deleted (1 s – 365 days;
    /// default none).
    pub max_lifetime_s: Option<u64>,
}

impl Default for LifecycleSpec {
    fn default() -> Self {
        LifecycleSpec {
            idle_timeout_s: Some(300),
            on_idle: OnIdle::Suspend,
            suspended_ttl_s: Some(7 * DAY),
            max_lifetime_s: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EgressSpec {
    /// What happens to a connection no rule allows.
    pub default: EgressDefault,
    /// Allowed destinations (at most 256 rules).
    pub rules: Vec<EgressRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// An exact host name (`api.example.com`) or a suffix pattern (`*.example.com`, which
    /// matches sub-domains, not `example.com` itself). Lowercase.
    #[schema(example = "*.pypi.org")]
    pub host: String,
    /// Allowed ports, 1–65535 (at most 64); empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A sandbox group as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub spec: GroupSpec,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub status: GroupStatus,
}

/// What the group has right now: read from the daemon when it answers, not stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupStatus {
    /// Ready VMs in the group's warm pool: `spec.pool.size` once it is full, fewer while it
    /// refills after hand-overs.
    pub pool_ready: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupList {
    pub groups: Vec<Group>,
}

impl GroupSpec {
    pub fn validate(&self) -> Result<()> {
        validate_image(&self.image)?;
        if self.pool.size > MAX_POOL {
            return bad(format!(
                "invalid pool.size {}: allowed is 0–{MAX_POOL}",
                self.pool.size
            ));
        }
        let l = &self.lifecycle;
        // From 1 s: timers are honoured to within a second, and short ones are how tests and
        // throw-away sandboxes use them.
        check_range("lifecycle.idle_timeout_s", l.idle_timeout_s, 1, 7 * DAY)?;
        check_range("lifecycle.suspended_ttl_s", l.suspended_ttl_s, 1, 90 * DAY)?;
        check_range("lifecycle.max_lifetime_s", l.max_lifetime_s, 1, 365 * DAY)?;
        if self.egress.rules.len() > MAX_EGRESS_RULES {
            return bad(format!(
                "too many egress.rules ({}): at most {MAX_EGRESS_RULES}",
                self.egress.rules.len()
            ));
        }
        for (i, rule) in self.egress.rules.iter().enumerate() {
            validate_host_pattern(&rule.host)
                .map_err(|m| Error::BadRequest(format!("invalid egress.rules[{i}].host: {m}")))?;
            if rule.ports.len() > MAX_PORTS {
                return bad(format!(
                    "too many egress.rules[{i}].ports ({}): at most {MAX_PORTS}",
                    rule.ports.len()
                ));
            }
            if rule.ports.contains(&0) {
                return bad(format!(
                    "invalid egress.rules[{i}].ports: port 0; allowed are 1–65535 (an empty \
                     list allows every port)"
                ));
            }
        }
        validate_labels(&self.labels)?;
        Ok(())
    }
}

fn check_range(field: &str, v: Option<u64>, min: u64, max: u64) -> Result<()> {
    match v {
        Some(x) if x < min || x > max => bad(format!(
            "invalid {field} {x}: allowed is {min}–{max} seconds, or null for never"
        )),
        _ => Ok(()),
    }
}

/// `exact.host.name` or `*.suffix`: lowercase DNS labels, ≤ 253 characters in all.
pub fn validate_host_pattern(p: &str) -> std::result::Result<(), String> {
    let allowed = "expected an exact host name (\"api.example.com\") or \"*.\" and a domain \
                   (\"*.example.com\"): lowercase letters, digits, '-' and '.'";
    let name = p.strip_prefix("*.").unwrap_or(p);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{}: {allowed}", quote(p)));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("{}: {allowed}", quote(p)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        for ok in [
            "example.com",
            "*.example.com",
            "localhost",
            "a-1.b2.io",
            "*.io",
        ] {
            validate_host_pattern(ok).unwrap();
        }
        for bad in [
            "",
            "*",
            "*.",
            "**.a.com",
            "a.*.com",
            "*a.com",
            "Example.com",
            "a..b",
            "-a.com",
            "a.com.",
            "a b.com",
            "a.com:443",
            "http://a.com",
        ] {
            assert!(validate_host_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_defaults_and_bounds() {
        let s: GroupSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(s, GroupSpec::default());
        s.validate().unwrap();
        // explicit null means "never"
        let s: GroupSpec =
            serde_json::from_str(r#"{"lifecycle": {"idle_timeout_s": null}}"#).unwrap();
        assert_eq!(s.lifecycle.idle_timeout_s, None);
        assert_eq!(s.lifecycle.suspended_ttl_s, Some(7 * DAY));
        s.validate().unwrap();

        let e = serde_json::from_str::<GroupSpec>(r#"{"imgae": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `imgae`") && e.contains("`image`"),
            "{e}"
        );
        let e = serde_json::from_str::<GroupSpec>(r#"{"tier": "huge"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`xs`") && e.contains("`xl`"), "{e}");

        let mut s = GroupSpec::default();
        s.pool.size = 65;
        assert!(s.validate().unwrap_err().to_string().contains("0–64"));
        let mut s = GroupSpec::default();
        s.lifecycle.idle_timeout_s = Some(0);
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout_s"));
        let mut s = GroupSpec::default();
        s.egress.rules.push(EgressRule {
            host: "x.com".into(),
            ports: vec![0],
        });
        assert!(s.validate().unwrap_err().to_string().contains("port 0"));
        let mut s = GroupSpec::default();
        s.labels.insert("ok".into(), "bad value".into());
        assert!(s.validate().unwrap_err().to_string().contains("label"));
        let s = GroupSpec {
            image: "a b".into(),
            ..Default::default()
        };
        assert!(s.validate().is_err());
    }
}
