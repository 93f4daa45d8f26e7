//! Sandbox groups: a group's spec (image, tier, warm pool, lifecycle timers, egress policy,
//! network limits, labels, workload identity) with its defaults and bounds, and the group as
//! returned. The egress policy is `moat_net::EgressSpec` itself, validated by
//! `moat_net::Policy`, and the network limits `moat_net::control::LimitsSpec`, validated by the
//! stack's own check: the daemon stores, checks and sends to each sandbox's network stack one
//! type, by one set of rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bad, validate_image, validate_labels, IdentitySpec, Tier, DAY};
use crate::error::{Error, Result};

pub use moat_net::control::LimitsSpec;
pub use moat_net::{EgressRule, EgressSpec};

pub const MAX_POOL: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    #[default]
    Suspend,
    Delete,
}

/// A sandbox group's settings. Every field is optional in a request; the stored and returned
/// spec has every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSpec {
    /// Default image (name or sha256 digest) of the group's sandboxes.
    #[schema(schema_with = super::image_schema)]
    pub image: String,
    pub tier: Tier,
    pub pool: PoolSpec,
    pub lifecycle: LifecycleSpec,
    pub egress: EgressSpec,
    /// Per-sandbox network limits; an absent field has its default. A `PUT` applies them to
    /// running sandboxes too.
    pub network_limits: LimitsSpec,
    /// Kubernetes-style labels (at most 64).
    #[schema(schema_with = super::labels_schema)]
    pub labels: BTreeMap<String, String>,
    pub identity: IdentitySpec,
    pub placement: PlacementSpec,
}

impl Default for GroupSpec {
    fn default() -> Self {
        GroupSpec {
            image: "base".to_string(),
            tier: Tier::default(),
            pool: PoolSpec::default(),
            lifecycle: LifecycleSpec::default(),
            egress: EgressSpec::default(),
            network_limits: LimitsSpec::default(),
            labels: BTreeMap::new(),
            identity: IdentitySpec::default(),
            placement: PlacementSpec::default(),
        }
    }
}

/// Which nodes of a fleet run the group's sandboxes and warm pool (docs/FLEET.md,
/// "Placement").
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSpec {
    /// Only nodes with every one of these labels (`moat serve --node-label`) run the group's
    /// sandboxes; empty: any node.
    #[schema(schema_with = super::labels_schema)]
    pub node_labels: BTreeMap<String, String>,
    pub strategy: PlacementStrategy,
}

/// How a create picks among the nodes that fit: `spread` the one with the smallest share of
/// its memory in use, `pack` the one with the largest share that still has room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PlacementStrategy {
    #[default]
    Spread,
    Pack,
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
    #[schema(minimum = 1, maximum = 604800)]
    pub idle_timeout_s: Option<u64>,
    pub on_idle: OnIdle,
    /// Seconds a suspended sandbox is kept before it is deleted (1 s – 90 days; default 7 days).
    #[schema(minimum = 1, maximum = 7776000)]
    pub suspended_ttl_s: Option<u64>,
    /// Upper bound on a sandbox's whole life, after which it is deleted (1 s – 365 days;
    /// default none).
    #[schema(minimum = 1, maximum = 31536000)]
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
        validate_egress(&self.egress)?;
        validate_network_limits(&self.network_limits)?;
        validate_labels(&self.labels)?;
        self.identity.validate()?;
        validate_labels(&self.placement.node_labels)
            .map_err(|e| Error::BadRequest(format!("invalid placement.node_labels: {e}")))?;
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

/// The egress policy, by the rules the network stack applies (`moat_net::Policy`): the error
/// names the field (`egress.rules[2].host`) and what is allowed. A 422: these rules (a host
/// that is a public suffix, a rule that can never match, exactly one of host and cidr) are
/// beyond what the document's schema can state.
pub fn validate_egress(spec: &EgressSpec) -> Result<()> {
    moat_net::Policy::new(spec.clone())
        .map(|_| ())
        .map_err(|e| Error::Unprocessable(e.to_string()))
}

/// The network limits, by the stack's own bounds; the error names the field
/// (`network_limits.bandwidth`) and what is allowed.
pub fn validate_network_limits(spec: &LimitsSpec) -> Result<()> {
    match spec.validate() {
        Ok(_) => Ok(()),
        // The stack names its fields `limits.…`; in a group they are `network_limits.…`.
        Err(moat_net::Error::Invalid { field, message }) => {
            bad(format!("invalid network_{field}: {message}"))
        }
        Err(e) => bad(e.to_string()),
    }
}

impl crate::http::extract::Checked for GroupSpec {
    fn check(&self) -> Result<()> {
        self.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_limits_are_checked_by_the_stacks_bounds() {
        let check = |limits: serde_json::Value| {
            serde_json::from_value::<GroupSpec>(serde_json::json!({ "network_limits": limits }))
                .map_err(|e| e.to_string())
                .and_then(|s| s.validate().map_err(|e| e.to_string()))
        };
        check(serde_json::json!({})).unwrap();
        check(
            serde_json::json!({"max_flows": 16, "new_flows_per_s": 5, "dns_qps": 5,
            "bandwidth": 1048576}),
        )
        .unwrap();
        for (limits, want) in [
            (
                serde_json::json!({"bandwidth": 1000}),
                "invalid network_limits.bandwidth: 1000: allowed is 16384–100000000000 bytes \
                 per second, or absent for unlimited",
            ),
            (
                serde_json::json!({"max_flows": 0}),
                "invalid network_limits.max_flows: 0: allowed is 1–1024 flows",
            ),
            (
                serde_json::json!({"dns_qps": 20000}),
                "invalid network_limits.dns_qps: 20000: allowed is 1–10000 per second",
            ),
            (
                serde_json::json!({"bandwith": 1}),
                "unknown field `bandwith`",
            ),
            (serde_json::json!({"bandwidth": -1}), "invalid value"),
        ] {
            let e = check(limits).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn egress_is_checked_by_the_network_stacks_rules() {
        let bad = |egress: serde_json::Value| {
            serde_json::from_value::<GroupSpec>(serde_json::json!({ "egress": egress }))
                .map_err(|e| e.to_string())
                .and_then(|s| s.validate().map_err(|e| e.to_string()))
                .unwrap_err()
        };
        for (egress, want) in [
            (
                serde_json::json!({"rules": [{"host": "*"}]}),
                "egress.rules[0].host",
            ),
            (
                serde_json::json!({"rules": [{"host": "*.com"}]}),
                "public suffix",
            ),
            (
                serde_json::json!({"rules": [{"host": "a.com", "ports": [0]}]}),
                "port 0",
            ),
            (
                serde_json::json!({"rules": [{"cidr": "10.0.0.0/8"}]}),
                "floor",
            ),
            (
                serde_json::json!({"rules": [{"host": "*.a.com"}, {"host": "b.a.com"}]}),
                "never match",
            ),
            (
                serde_json::json!({"rules": [{"host": "a.com", "port": 1}]}),
                "unknown field",
            ),
            (serde_json::json!({"default": "maybe"}), "maybe"),
        ] {
            let e = bad(egress.clone());
            assert!(e.contains(want), "{egress}: {e}");
        }
        // The first stored shape (`{"host", "ports"}`) reads back with its meaning.
        let s: GroupSpec = serde_json::from_value(serde_json::json!({"egress": {
            "default": "deny", "rules": [{"host": "*.pypi.org", "ports": [443]}]}}))
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.egress.rules[0].host.as_deref(), Some("*.pypi.org"));
        assert_eq!(s.egress.rules[0].action, moat_net::Action::Allow);
        let s: GroupSpec = serde_json::from_value(serde_json::json!({"egress": {
            "default": "allow", "rules": [
                {"cidr": "203.0.113.0/24", "ports": [5432], "action": "deny"},
                {"host": "ntp.example.com", "protocol": "udp", "ports": [123]}]}}))
        .unwrap();
        s.validate().unwrap();
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
        s.labels.insert("ok".into(), "bad value".into());
        assert!(s.validate().unwrap_err().to_string().contains("label"));
        let s = GroupSpec {
            image: "a b".into(),
            ..Default::default()
        };
        assert!(s.validate().is_err());
    }

    #[test]
    fn placement_defaults_to_spread_on_any_node_and_checks_its_labels() {
        let s: GroupSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(s.placement.strategy, PlacementStrategy::Spread);
        assert!(s.placement.node_labels.is_empty());
        let s: GroupSpec = serde_json::from_str(
            r#"{"placement": {"node_labels": {"zone": "x"}, "strategy": "pack"}}"#,
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.placement.strategy, PlacementStrategy::Pack);
        let e = serde_json::from_str::<GroupSpec>(r#"{"placement": {"strategy": "random"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`spread`") && e.contains("`pack`"), "{e}");
        let e = serde_json::from_str::<GroupSpec>(r#"{"placement": {"labels": {}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `labels`"), "{e}");
        let s: GroupSpec =
            serde_json::from_str(r#"{"placement": {"node_labels": {"zone": "a b"}}}"#).unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("invalid placement.node_labels") && e.contains("zone"),
            "{e}"
        );
    }
}
