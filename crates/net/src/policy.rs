//! A sandbox group's egress policy: the stored spec (what the API accepts, backwards compatible
//! with the first `{"host", "ports"}` rules), its validation, and the compiled matcher the stack
//! asks for every DNS answer and every new flow.
//!
//! Semantics: rules are tried in order and the first that matches decides; if none matches,
//! `default` decides. A rule names either a host (`api.example.com`, or `*.example.com` for its
//! sub-domains but not `example.com` itself) or an IPv4 `cidr` for connections to raw addresses;
//! names and addresses never match each other's rules, so an allowed name cannot be reached by
//! its address and a CIDR rule does not make a name resolve. The floor (`floor.rs`) is applied
//! before any of this and no rule opens it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::floor::{self, Floor};
use crate::transform::{Compiled, Placeholder, Secret, Transform, Values};
use crate::{Error, Result};

pub const MAX_RULES: usize = 256;
pub const MAX_PORTS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = EgressAction)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = EgressProtocol)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

fn deny() -> Action {
    Action::Deny
}

fn allow() -> Action {
    Action::Allow
}

/// The group's `egress` spec as stored and returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressSpec {
    /// What happens to a connection or name no rule matches.
    #[serde(default = "deny")]
    pub default: Action,
    /// Tried in order; the first that matches decides (at most 256).
    #[serde(default)]
    #[schema(max_items = 256)]
    pub rules: Vec<EgressRule>,
}

impl Default for EgressSpec {
    fn default() -> Self {
        EgressSpec {
            default: Action::Deny,
            rules: Vec::new(),
        }
    }
}

/// One rule: a host pattern or a network, optional ports and protocol, allow or deny.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// An exact lowercase host name, or `*.suffix` for the names under suffix (not suffix
    /// itself). Exactly one of `host` and `cidr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "*.pypi.org")]
    pub host: Option<String>,
    /// An IPv4 network (`203.0.113.0/24`, or one address) for connections to raw addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "203.0.113.0/24")]
    pub cidr: Option<String>,
    /// Ports 1–65535 (at most 64); empty means every port.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default = "allow")]
    pub action: Action,
    /// Headers the stack sets on this host's HTTPS requests (host rules with `allow` and
    /// `"ports": [443]` only; the stack then terminates the guest's TLS with the group's CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
}

/// What a rule matches, normalised.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Exact(String),
    /// `*.suffix`, stored as ".suffix" so that a plain `ends_with` keeps the dot.
    Under(String),
    Cidr(Ipv4Net),
}

impl Target {
    /// True if every destination `other` matches, this matches too.
    fn covers(&self, other: &Target) -> bool {
        match (self, other) {
            (Target::Exact(a), Target::Exact(b)) => a == b,
            (Target::Under(s), Target::Exact(b)) => b.ends_with(s.as_str()),
            (Target::Under(s), Target::Under(t)) => t.ends_with(s.as_str()),
            (Target::Cidr(a), Target::Cidr(b)) => a.contains(b),
            _ => false,
        }
    }

    fn matches_name(&self, name: &str) -> bool {
        match self {
            Target::Exact(a) => a == name,
            Target::Under(s) => name.ends_with(s.as_str()),
            Target::Cidr(_) => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    target: Target,
    /// Sorted; empty means every port.
    ports: Vec<u16>,
    protocol: Protocol,
    action: Action,
    transform: Option<Arc<Compiled>>,
}

impl Rule {
    fn port_matches(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.binary_search(&port).is_ok()
    }

    fn ports_cover(&self, other: &Rule) -> bool {
        self.ports.is_empty()
            || (!other.ports.is_empty()
                && other
                    .ports
                    .iter()
                    .all(|p| self.ports.binary_search(p).is_ok()))
    }
}

/// One decision: allow or deny, which rule made it (an index into `rules`, `None` for the
/// default or a check outside the rules), and a reason a person can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub rule: Option<usize>,
    pub reason: String,
}

impl Decision {
    pub fn deny(reason: impl Into<String>) -> Decision {
        Decision {
            allow: false,
            rule: None,
            reason: reason.into(),
        }
    }
}

/// A validated, compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    spec: EgressSpec,
    default: Action,
    rules: Vec<Rule>,
    values: Values,
}

impl Policy {
    /// Validates `spec`; errors name the field (`egress.rules[2].host`) and what is allowed.
    pub fn new(spec: EgressSpec) -> Result<Policy> {
        if spec.rules.len() > MAX_RULES {
            return invalid(
                "egress.rules",
                format!("{} rules: at most {MAX_RULES}", spec.rules.len()),
            );
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(spec.rules.len());
        for (i, r) in spec.rules.iter().enumerate() {
            let rule = compile_rule(i, r)?;
            if let Some(j) = rules.iter().position(|e| {
                e.protocol == rule.protocol && e.target.covers(&rule.target) && e.ports_cover(&rule)
            }) {
                return invalid(
                    &format!("egress.rules[{i}]"),
                    format!(
                        "this rule can never match: egress.rules[{j}] comes first and matches \
                         everything it would (put the narrower rule first)"
                    ),
                );
            }
            rules.push(rule);
        }
        Ok(Policy {
            default: spec.default,
            spec,
            rules,
            values: Values::default(),
        })
    }

    /// The policy with the values its transforms' placeholders stand for: `secrets` for
    /// `${secret:…}`, tokens from `minter` for `${identity:…}`.
    pub fn with_values(
        mut self,
        secrets: BTreeMap<String, Secret>,
        minter: Option<crate::control::Minter>,
    ) -> Policy {
        self.values = Values::new(secrets, minter);
        self
    }

    pub fn spec(&self) -> &EgressSpec {
        &self.spec
    }

    /// The transform of rule `rule`, if it has one.
    pub fn transform(&self, rule: usize) -> Option<&Arc<Compiled>> {
        self.rules.get(rule)?.transform.as_ref()
    }

    /// Whether any rule transforms requests (the stack then needs its interception CA).
    pub fn transforms(&self) -> bool {
        self.rules.iter().any(|r| r.transform.is_some())
    }

    /// Every placeholder the transforms use, with the field it is in.
    pub fn placeholders(&self) -> Vec<(String, Placeholder)> {
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            if let Some(t) = &r.transform {
                for (name, tpl) in &t.headers {
                    for p in tpl.placeholders() {
                        out.push((
                            format!("egress.rules[{i}].transform.headers.{name}"),
                            p.clone(),
                        ));
                    }
                }
            }
        }
        out
    }

    /// What the transforms' placeholders resolve to.
    pub fn values(&self) -> &Values {
        &self.values
    }

    /// The decision for a connection to `name` (already normalised by [`normalize_name`]).
    /// The floor's port check applies; its address check is for the addresses the name
    /// resolves to.
    pub fn decide_name(&self, name: &str, port: u16, protocol: Protocol) -> Decision {
        if let Some(why) = Floor::port(port, protocol) {
            return Decision::deny(format!("floor: {why}"));
        }
        self.first_match(|t| t.matches_name(name), port, protocol)
    }

    /// The decision for a connection to a raw address: floor first, then the CIDR rules.
    pub fn decide_addr(
        &self,
        floor: &Floor,
        ip: Ipv4Addr,
        port: u16,
        protocol: Protocol,
    ) -> Decision {
        if let Some(why) = floor.address(ip.into()) {
            return Decision::deny(format!("floor: {why}"));
        }
        if let Some(why) = Floor::port(port, protocol) {
            return Decision::deny(format!("floor: {why}"));
        }
        self.first_match(
            |t| matches!(t, Target::Cidr(n) if n.contains(&ip)),
            port,
            protocol,
        )
    }

    /// Whether moat's DNS answers `name`: yes if some port and protocol exists on which a
    /// connection to it would be allowed. The decision returned names the rule that opens it
    /// (or the default), or says why nothing does.
    pub fn decide_dns(&self, name: &str) -> Decision {
        // A deny rule without ports closes its protocol for this name; one with ports leaves
        // the other ports open, so it does not stop the answer.
        let mut closed = [false, false];
        // The first deny rule that closed a protocol: what the audit names if nothing opens.
        let mut closer = None;
        let slot = |p: Protocol| p as usize;
        for (i, r) in self.rules.iter().enumerate() {
            if !r.target.matches_name(name) || closed[slot(r.protocol)] {
                continue;
            }
            match r.action {
                Action::Allow => {
                    // TCP 25 alone is floor-denied: such a rule opens nothing.
                    if r.protocol == Protocol::Tcp && r.ports == [floor::SMTP_PORT] {
                        continue;
                    }
                    return Decision {
                        allow: true,
                        rule: Some(i),
                        reason: "rule".into(),
                    };
                }
                Action::Deny if r.ports.is_empty() => {
                    closed[slot(r.protocol)] = true;
                    closer.get_or_insert(i);
                    if closed == [true, true] {
                        return Decision {
                            allow: false,
                            rule: Some(i),
                            reason: "rule".into(),
                        };
                    }
                }
                Action::Deny => {}
            }
        }
        match self.default {
            Action::Allow => Decision {
                allow: true,
                rule: None,
                reason: "default allow".into(),
            },
            Action::Deny if closer.is_some() => Decision {
                allow: false,
                rule: closer,
                reason: "rule".into(),
            },
            Action::Deny => Decision::deny("no rule allows this name (default deny)"),
        }
    }

    fn first_match(
        &self,
        target: impl Fn(&Target) -> bool,
        port: u16,
        protocol: Protocol,
    ) -> Decision {
        for (i, r) in self.rules.iter().enumerate() {
            if r.protocol == protocol && r.port_matches(port) && target(&r.target) {
                return Decision {
                    allow: r.action == Action::Allow,
                    rule: Some(i),
                    reason: "rule".into(),
                };
            }
        }
        match self.default {
            Action::Allow => Decision {
                allow: true,
                rule: None,
                reason: "default allow".into(),
            },
            Action::Deny => Decision::deny("no rule matched (default deny)"),
        }
    }
}

fn invalid<T>(field: &str, message: String) -> Result<T> {
    Err(Error::Invalid {
        field: field.to_string(),
        message,
    })
}

fn compile_rule(i: usize, r: &EgressRule) -> Result<Rule> {
    let field = |f: &str| format!("egress.rules[{i}]{f}");
    let target =
        match (&r.host, &r.cidr) {
            (Some(_), Some(_)) | (None, None) => return invalid(
                &field(""),
                "give exactly one of \"host\" (a name or *.suffix) and \"cidr\" (an IPv4 network)"
                    .into(),
            ),
            (Some(h), None) => host_target(h).map_err(|m| Error::Invalid {
                field: field(".host"),
                message: m,
            })?,
            (None, Some(c)) => cidr_target(c).map_err(|m| Error::Invalid {
                field: field(".cidr"),
                message: m,
            })?,
        };
    if r.ports.len() > MAX_PORTS {
        return invalid(
            &field(".ports"),
            format!("{} ports: at most {MAX_PORTS}", r.ports.len()),
        );
    }
    if r.ports.contains(&0) {
        return invalid(
            &field(".ports"),
            "port 0; allowed are 1–65535 (an empty list means every port)".into(),
        );
    }
    let mut ports = r.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    if r.action == Action::Allow && r.protocol == Protocol::Tcp && ports == [floor::SMTP_PORT] {
        return invalid(
            &field(".ports"),
            "this rule can never match: TCP port 25 (SMTP) is always denied".into(),
        );
    }
    if let Target::Cidr(net) = target {
        if let Some(why) = floor::range_containing(net) {
            return invalid(
                &field(".cidr"),
                format!("this rule can never match: {net} is in the always-deny floor ({why})"),
            );
        }
    }
    let transform = match &r.transform {
        None => None,
        Some(t) => Some(Arc::new(compile_transform(&field, r, &target, &ports, t)?)),
    };
    Ok(Rule {
        target,
        ports,
        protocol: r.protocol,
        action: r.action,
        transform,
    })
}

/// A transform is for names reached over HTTPS (plain HTTP only with an explicit upgrade),
/// so that the stack can check the name in the guest's TLS handshake and the secret never
/// travels in the clear.
fn compile_transform(
    field: &dyn Fn(&str) -> String,
    r: &EgressRule,
    target: &Target,
    ports: &[u16],
    t: &Transform,
) -> Result<Compiled> {
    let f = field(".transform");
    if matches!(target, Target::Cidr(_)) {
        return invalid(&f, "only host rules can transform requests (the stack checks the name in the guest's TLS handshake)".into());
    }
    if r.action != Action::Allow || r.protocol != Protocol::Tcp {
        return invalid(&f, "only tcp allow rules can transform requests".into());
    }
    let c = Compiled::new(t).map_err(|(sub, message)| Error::Invalid {
        field: format!("{f}{sub}"),
        message,
    })?;
    let allowed: &[u16] = if c.upgrade_to_https {
        &[80, 443]
    } else {
        &[443]
    };
    if ports.is_empty() || ports.iter().any(|p| !allowed.contains(p)) {
        let message = if ports.contains(&80) {
            "port 80 is plain HTTP: the secret would travel in the clear; set \
             \"upgrade_to_https\": true to send those requests upstream as HTTPS, or use 443"
                .to_string()
        } else {
            format!(
                "a rule with a transform needs \"ports\": [443]{}: requests are transformed \
                 on HTTPS only",
                if c.upgrade_to_https {
                    " (and 80, upgraded)"
                } else {
                    ""
                }
            )
        };
        return invalid(&field(".ports"), message);
    }
    Ok(c)
}

fn host_target(h: &str) -> std::result::Result<Target, String> {
    if h == "*" {
        return Err(
            "a bare \"*\" would match every name: use \"default\": \"allow\" instead".into(),
        );
    }
    if let Some(suffix) = h.strip_prefix("*.") {
        check_name(suffix).map_err(|m| format!("{}: {m}", quote(h)))?;
        if let Some(s) = psl::suffix(suffix.as_bytes()) {
            if s.is_known() && s.as_bytes() == suffix.as_bytes() {
                return Err(format!(
                    "{} would match names anyone can register ({suffix} is a public suffix): \
                     name the hosts or a domain you trust, e.g. *.example.{suffix}",
                    quote(h)
                ));
            }
        }
        return Ok(Target::Under(format!(".{suffix}")));
    }
    if h.contains('*') {
        return Err(format!(
            "{}: a wildcard is allowed only as a leading \"*.\" (as in *.example.com)",
            quote(h)
        ));
    }
    check_name(h).map_err(|m| format!("{}: {m}", quote(h)))?;
    Ok(Target::Exact(h.to_string()))
}

/// Rule names: lowercase ASCII host names, internationalised ones in their punycode form.
fn check_name(h: &str) -> std::result::Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err("a host name has 1–253 characters".into());
    }
    if !h.is_ascii() {
        return Err("give an internationalised name in its punycode form (xn--…)".into());
    }
    if h.ends_with('.') {
        return Err("leave out the trailing dot".into());
    }
    for label in h.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(
                "expected dot-separated labels of 1–63 lowercase letters, digits and '-', not \
                 starting or ending with '-'"
                    .into(),
            );
        }
    }
    Ok(())
}

fn cidr_target(c: &str) -> std::result::Result<Target, String> {
    if c.contains(':') {
        return Err(format!(
            "{}: IPv6 is not supported (sandboxes have no IPv6)",
            quote(c)
        ));
    }
    let net: Ipv4Net = match c.parse::<Ipv4Net>() {
        Ok(n) => n,
        Err(_) => match c.parse::<Ipv4Addr>() {
            Ok(a) => Ipv4Net::from(a),
            Err(_) => {
                return Err(format!(
                    "{}: expected an IPv4 network like 203.0.113.0/24 or one address",
                    quote(c)
                ))
            }
        },
    };
    if net.network() != net.addr() {
        return Err(format!(
            "{}: has bits set after the prefix; did you mean {}?",
            quote(c),
            net.trunc()
        ));
    }
    Ok(Target::Cidr(net))
}

/// A name as the guest sent it, made comparable with rules: lowercase, no trailing dot.
/// `None` for what cannot be a host name (so it matches nothing and is never sent upstream).
pub fn normalize_name(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(n)
}

fn quote(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() > MAX {
        format!("{:?}…", s.chars().take(MAX).collect::<String>())
    } else {
        format!("{s:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(v: serde_json::Value) -> Policy {
        Policy::new(serde_json::from_value(v).unwrap()).unwrap()
    }

    fn error(v: serde_json::Value) -> String {
        Policy::new(serde_json::from_value(v).unwrap())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn old_stored_specs_still_parse_with_the_same_meaning() {
        let p =
            policy(json!({"default": "deny", "rules": [{"host": "*.pypi.org", "ports": [443]}]}));
        assert!(p.decide_name("files.pypi.org", 443, Protocol::Tcp).allow);
        assert!(!p.decide_name("files.pypi.org", 80, Protocol::Tcp).allow);
        assert!(
            !p.decide_name("pypi.org", 443, Protocol::Tcp).allow,
            "*.x is not x"
        );
        let p = policy(json!({}));
        assert!(
            !p.decide_name("a.com", 443, Protocol::Tcp).allow,
            "default is deny"
        );
        // Filled-in defaults are written back out.
        let v = serde_json::to_value(p.spec()).unwrap();
        assert_eq!(v, json!({"default": "deny", "rules": []}));
        let r: EgressRule = serde_json::from_value(json!({"host": "a.com"})).unwrap();
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            json!({"host": "a.com", "ports": [], "protocol": "tcp", "action": "allow"})
        );
    }

    #[test]
    fn openapi_schema_names_every_field() {
        use utoipa::{PartialSchema, ToSchema};
        assert_eq!(EgressRule::name(), "EgressRule");
        assert_eq!(Action::name(), "EgressAction");
        let rule = serde_json::to_value(EgressRule::schema()).unwrap();
        for field in ["host", "cidr", "ports", "protocol", "action", "transform"] {
            assert!(rule["properties"].get(field).is_some(), "{field}: {rule}");
        }
        let spec = serde_json::to_value(EgressSpec::schema()).unwrap();
        assert!(
            spec["properties"].get("default").is_some()
                && spec["properties"].get("rules").is_some()
        );
        // As strict as validation where a schema can say it.
        assert_eq!(spec["properties"]["rules"]["maxItems"], MAX_RULES);
        assert_eq!(rule["properties"]["ports"]["maxItems"], MAX_PORTS);
        assert_eq!(spec["additionalProperties"], false);
        assert_eq!(rule["additionalProperties"], false);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_value::<EgressSpec>(
            json!({"rules": [{"host": "a.com", "port": 1}]})
        )
        .is_err());
        assert!(serde_json::from_value::<EgressSpec>(json!({"default": "maybe"})).is_err());
        assert!(serde_json::from_value::<EgressSpec>(
            json!({"rules": [{"host": "a.com", "protocol": "icmp"}]})
        )
        .is_err());
    }

    #[test]
    fn first_match_wins_and_explicit_deny_beats_a_later_wildcard() {
        let p = policy(json!({"rules": [
            {"host": "evil.example.com", "action": "deny"},
            {"host": "*.example.com"},
        ]}));
        let d = p.decide_name("evil.example.com", 443, Protocol::Tcp);
        assert_eq!((d.allow, d.rule), (false, Some(0)));
        let d = p.decide_dns("evil.example.com");
        assert_eq!(
            (d.allow, d.rule),
            (false, Some(0)),
            "the audit names the deny rule"
        );
        let d = p.decide_name("good.example.com", 443, Protocol::Tcp);
        assert_eq!((d.allow, d.rule), (true, Some(1)));
        assert!(!p.decide_dns("evil.example.com").allow);
        assert!(p.decide_dns("good.example.com").allow);
        // Look-alikes do not match the wildcard.
        for n in [
            "example.com",
            "badexample.com",
            "example.com.evil.net",
            "xexample.com",
        ] {
            assert!(!p.decide_name(n, 443, Protocol::Tcp).allow, "{n}");
            assert!(!p.decide_dns(n).allow, "{n}");
        }
    }

    #[test]
    fn default_allow_with_deny_rules() {
        let p = policy(json!({"default": "allow", "rules": [
            {"host": "*.blocked.com", "action": "deny"},
            {"cidr": "203.0.113.0/24", "action": "deny"},
        ]}));
        assert!(p.decide_name("a.com", 1234, Protocol::Tcp).allow);
        assert!(!p.decide_name("x.blocked.com", 443, Protocol::Tcp).allow);
        assert!(
            p.decide_dns("x.blocked.com").allow,
            "udp is still open by default"
        );
        let f = Floor::new(vec![]);
        assert!(
            !p.decide_addr(&f, "203.0.113.9".parse().unwrap(), 443, Protocol::Tcp)
                .allow
        );
        assert!(
            p.decide_addr(&f, "198.51.100.1".parse().unwrap(), 443, Protocol::Tcp)
                .allow
        );
        // Default allow never opens the floor or SMTP.
        assert!(
            !p.decide_addr(&f, "10.0.0.1".parse().unwrap(), 443, Protocol::Tcp)
                .allow
        );
        assert!(
            !p.decide_addr(&f, "169.254.169.254".parse().unwrap(), 80, Protocol::Tcp)
                .allow
        );
        assert!(!p.decide_name("mail.a.com", 25, Protocol::Tcp).allow);
    }

    #[test]
    fn dns_answer_needs_an_open_port_somewhere() {
        let p = policy(json!({"default": "allow", "rules": [
            {"host": "a.com", "action": "deny"},
            {"host": "a.com", "protocol": "udp", "action": "deny"},
            {"host": "b.com", "ports": [80], "action": "deny"},
        ]}));
        assert!(!p.decide_dns("a.com").allow, "every protocol closed");
        assert!(p.decide_dns("b.com").allow, "other ports of b.com are open");
        let p = policy(json!({"rules": [{"host": "a.com", "ports": [8443]}]}));
        assert!(p.decide_dns("a.com").allow);
        assert!(!p.decide_name("a.com", 443, Protocol::Tcp).allow);
        assert!(
            !p.decide_name("a.com", 8443, Protocol::Udp).allow,
            "protocol defaults to tcp"
        );
    }

    #[test]
    fn names_and_addresses_never_match_each_others_rules() {
        let p = policy(json!({"rules": [{"cidr": "203.0.113.0/24"}, {"host": "a.com"}]}));
        let f = Floor::new(vec![]);
        assert!(
            p.decide_addr(&f, "203.0.113.5".parse().unwrap(), 22, Protocol::Tcp)
                .allow
        );
        assert!(
            !p.decide_addr(&f, "203.0.114.5".parse().unwrap(), 22, Protocol::Tcp)
                .allow
        );
        assert!(!p.decide_name("203.0.113.5", 22, Protocol::Tcp).allow);
        assert!(!p.decide_dns("203.0.113.5").allow);
    }

    #[test]
    fn the_floor_beats_every_rule() {
        let p = policy(
            json!({"default": "allow", "rules": [{"cidr": "0.0.0.0/0"}, {"host": "a.com", "ports": [25, 443]}]}),
        );
        let f = Floor::new(vec!["198.51.100.7".parse().unwrap()]);
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "100.64.1.1",
            "224.0.0.1",
            "198.51.100.7",
        ] {
            let d = p.decide_addr(&f, ip.parse().unwrap(), 443, Protocol::Tcp);
            assert!(!d.allow && d.reason.starts_with("floor"), "{ip}: {d:?}");
        }
        assert!(!p.decide_name("a.com", 25, Protocol::Tcp).allow);
        assert!(
            !p.decide_addr(&f, "8.8.8.8".parse().unwrap(), 25, Protocol::Tcp)
                .allow
        );
        assert!(
            p.decide_addr(&f, "8.8.8.8".parse().unwrap(), 53, Protocol::Udp)
                .allow,
            "default allow covers udp"
        );
    }

    #[test]
    fn validation_errors_say_what_is_wrong() {
        let cases = [
            (
                json!({"rules": [{"host": "*"}]}),
                "egress.rules[0].host",
                "\"default\": \"allow\"",
            ),
            (
                json!({"rules": [{"host": "*.com"}]}),
                "egress.rules[0].host",
                "public suffix",
            ),
            (
                json!({"rules": [{"host": "*.co.uk"}]}),
                "egress.rules[0].host",
                "public suffix",
            ),
            (
                json!({"rules": [{"host": "*.github.io"}]}),
                "egress.rules[0].host",
                "public suffix",
            ),
            (
                json!({"rules": [{"host": "a.*.com"}]}),
                "egress.rules[0].host",
                "leading",
            ),
            (
                json!({"rules": [{"host": "*a.com"}]}),
                "egress.rules[0].host",
                "leading",
            ),
            (
                json!({"rules": [{"host": "A.com"}]}),
                "egress.rules[0].host",
                "lowercase",
            ),
            (
                json!({"rules": [{"host": "a.com."}]}),
                "egress.rules[0].host",
                "trailing dot",
            ),
            (
                json!({"rules": [{"host": "bücher.de"}]}),
                "egress.rules[0].host",
                "punycode",
            ),
            (
                json!({"rules": [{"host": "a.com:443"}]}),
                "egress.rules[0].host",
                "labels",
            ),
            (
                json!({"rules": [{"host": "a.com", "cidr": "1.2.3.4"}]}),
                "egress.rules[0]",
                "exactly one",
            ),
            (
                json!({"rules": [{"ports": [443]}]}),
                "egress.rules[0]",
                "exactly one",
            ),
            (
                json!({"rules": [{"cidr": "10.0.0.0/8"}]}),
                "egress.rules[0].cidr",
                "floor",
            ),
            (
                json!({"rules": [{"cidr": "169.254.169.254"}]}),
                "egress.rules[0].cidr",
                "metadata",
            ),
            (
                json!({"rules": [{"cidr": "1.2.3.4/16"}]}),
                "egress.rules[0].cidr",
                "1.2.0.0/16",
            ),
            (
                json!({"rules": [{"cidr": "2001:db8::/32"}]}),
                "egress.rules[0].cidr",
                "IPv6",
            ),
            (
                json!({"rules": [{"cidr": "example.com"}]}),
                "egress.rules[0].cidr",
                "IPv4 network",
            ),
            (
                json!({"rules": [{"host": "a.com", "ports": [0]}]}),
                "egress.rules[0].ports",
                "port 0",
            ),
            (
                json!({"rules": [{"host": "a.com", "ports": [25]}]}),
                "egress.rules[0].ports",
                "never match",
            ),
            (
                json!({"rules": [{"host": "*.a.com"}, {"host": "b.a.com", "action": "deny"}]}),
                "egress.rules[1]",
                "rules[0]",
            ),
            (
                json!({"rules": [{"host": "*.a.com"}, {"host": "*.b.a.com"}]}),
                "egress.rules[1]",
                "rules[0]",
            ),
            (
                json!({"rules": [{"host": "a.com"}, {"host": "a.com", "ports": [443]}]}),
                "egress.rules[1]",
                "never match",
            ),
            (
                json!({"rules": [{"host": "a.com", "ports": [80, 443]}, {"host": "a.com", "ports": [443]}]}),
                "egress.rules[1]",
                "never match",
            ),
            (
                json!({"rules": [{"cidr": "203.0.113.0/24"}, {"cidr": "203.0.113.128/25"}]}),
                "egress.rules[1]",
                "never match",
            ),
        ];
        for (spec, field, hint) in cases {
            let e = error(spec.clone());
            assert!(e.contains(field) && e.contains(hint), "{spec}: {e}");
        }
        let many: Vec<_> = (0..257)
            .map(|i| json!({"host": format!("h{i}.com")}))
            .collect();
        assert!(error(json!({"rules": many})).contains("at most 256"));
    }

    #[test]
    fn transforms_are_for_https_host_rules() {
        let t = json!({"headers": {"Authorization": "Bearer ${secret:openai}"}});
        let p = policy(json!({"rules": [
            {"host": "api.openai.com", "ports": [443], "transform": t},
            {"host": "plain.example.com", "ports": [80, 443],
             "transform": {"headers": {"X-Key": "${secret:k}"}, "upgrade_to_https": true}},
            {"host": "other.com"},
        ]}));
        assert!(p.transforms());
        assert!(p.transform(0).is_some() && p.transform(2).is_none());
        let names: Vec<_> = p
            .placeholders()
            .into_iter()
            .map(|(f, p)| (f, p.to_string()))
            .collect();
        assert_eq!(
            names[0],
            (
                "egress.rules[0].transform.headers.authorization".to_string(),
                "${secret:openai}".to_string()
            )
        );
        // Stored and returned as given; a rule without one has no field.
        let v = serde_json::to_value(p.spec()).unwrap();
        assert_eq!(v["rules"][0]["transform"]["headers"], t["headers"]);
        assert!(v["rules"][2].get("transform").is_none());
        for (rule, field, hint) in [
            (
                json!({"cidr": "203.0.113.0/24", "ports": [443], "transform": t}),
                "egress.rules[0].transform",
                "host rules",
            ),
            (
                json!({"host": "a.com", "ports": [443], "action": "deny", "transform": t}),
                "egress.rules[0].transform",
                "allow",
            ),
            (
                json!({"host": "a.com", "transform": t}),
                "egress.rules[0].ports",
                "[443]",
            ),
            (
                json!({"host": "a.com", "ports": [8443], "transform": t}),
                "egress.rules[0].ports",
                "[443]",
            ),
            (
                json!({"host": "a.com", "ports": [80], "transform": t}),
                "egress.rules[0].ports",
                "upgrade_to_https",
            ),
            (
                json!({"host": "a.com", "ports": [443], "transform": {"headers": {"A": "${x:y}"}}}),
                "egress.rules[0].transform.headers[\"A\"]",
                "not a placeholder",
            ),
        ] {
            let e = error(json!({"rules": [rule.clone()]}));
            assert!(e.contains(field) && e.contains(hint), "{rule}: {e}");
        }
        let p = policy(json!({"rules": [{"host": "a.com", "ports": [443], "transform": t}]}));
        assert!(!format!(
            "{:?}",
            p.clone().with_values(
                [("openai".to_string(), Secret::new("sk-x".into()))].into(),
                None
            )
        )
        .contains("sk-x"));
    }

    #[test]
    fn rules_that_only_look_shadowed_are_accepted() {
        for spec in [
            // Narrower first: both can match.
            json!({"rules": [{"host": "b.a.com", "action": "deny"}, {"host": "*.a.com"}]}),
            // The wildcard does not cover its apex.
            json!({"rules": [{"host": "*.a.com"}, {"host": "a.com"}]}),
            // Different protocol or ports.
            json!({"rules": [{"host": "a.com"}, {"host": "a.com", "protocol": "udp"}]}),
            json!({"rules": [{"host": "a.com", "ports": [443]}, {"host": "a.com"}]}),
            json!({"rules": [{"host": "a.com", "ports": [443]}, {"host": "a.com", "ports": [443, 80]}]}),
            json!({"rules": [{"cidr": "203.0.113.128/25"}, {"cidr": "203.0.113.0/24"}]}),
            // Private, unlisted suffixes are the operator's to trust.
            json!({"rules": [{"host": "*.internal"}, {"host": "*.example.com"}, {"host": "*.corp.example"}]}),
            // 0.0.0.0/0 overlaps the floor but also reaches public addresses.
            json!({"rules": [{"cidr": "0.0.0.0/0", "ports": [22]}]}),
        ] {
            Policy::new(serde_json::from_value(spec.clone()).unwrap())
                .unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
    }

    #[test]
    fn guest_names_are_normalised() {
        assert_eq!(
            normalize_name("API.Example.COM.").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            normalize_name("_dmarc.a.com").as_deref(),
            Some("_dmarc.a.com")
        );
        for bad in [
            "",
            ".",
            "a..b",
            "a b.com",
            "a.com\0",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            assert_eq!(normalize_name(bad), None, "{bad:?}");
        }
    }
}
