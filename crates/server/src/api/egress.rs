//! The egress audit as the API returns it (one item per decision of a sandbox's network stack:
//! a DNS answer, a connection when it ends) and the queries that filter it.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{bad, quote};
use crate::error::Result;

pub const DEFAULT_AUDIT_LIMIT: u32 = 100;
pub const MAX_AUDIT_LIMIT: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EgressKind {
    Dns,
    Tcp,
    Udp,
    /// A request of an intercepted flow: a transform's injection or a refusal.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EgressVerdict {
    Allow,
    Deny,
}

impl EgressVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            EgressVerdict::Allow => "allow",
            EgressVerdict::Deny => "deny",
        }
    }
}

/// One decision on the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressEvent {
    /// Increases with every event the daemon stores: `after` in a query continues from it.
    pub id: u64,
    /// RFC 3339, UTC, milliseconds: when the stack decided (a connection: when it ended).
    pub time: String,
    pub sandbox: String,
    pub kind: EgressKind,
    /// The host name the guest asked for or connected to (by moat's DNS answer).
    pub name: Option<String>,
    /// The destination address the guest used (DNS: the address moat answered).
    pub address: Option<String>,
    pub port: Option<u16>,
    pub verdict: EgressVerdict,
    /// The index in the group's `egress.rules` of the rule that decided; null for the default
    /// and for checks outside the rules (the floor, TLS SNI or HTTP Host, limits).
    pub rule: Option<u32>,
    /// Why, for a person: `rule`, `no rule matched (default deny)`, `floor: …`, `policy
    /// update: …`, `limit: …`.
    pub reason: String,
    /// Guest to host.
    pub bytes_sent: u64,
    /// Host to guest.
    pub bytes_received: u64,
    pub duration_ms: u64,
}

/// A page of audit events, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressEvents {
    pub items: Vec<EgressEvent>,
}

/// `GET …/sandboxes/{id}/egress`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SandboxEgressQuery {
    /// Only events with this verdict.
    pub verdict: Option<EgressVerdict>,
    /// Only events at or after this time (RFC 3339, UTC: `2026-11-30T15:04:05Z`, fractions
    /// allowed).
    #[param(schema_with = since_schema)]
    pub since: Option<String>,
    /// Only events after this `id`, the oldest first (to follow the audit); without it, the
    /// newest `limit` events.
    pub after: Option<u64>,
    /// Events at most, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// `GET /v1/sandbox-groups/{group}/egress`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GroupEgressQuery {
    /// Only events of this sandbox (`sb-` and 12 hex digits; deleted sandboxes included).
    #[param(pattern = "^sb-[0-9a-f]{12}$")]
    pub sandbox: Option<String>,
    /// Only events with this verdict.
    pub verdict: Option<EgressVerdict>,
    /// Only events at or after this time (RFC 3339, UTC).
    #[param(schema_with = since_schema)]
    pub since: Option<String>,
    /// Only events after this `id`, the oldest first; without it, the newest `limit` events.
    pub after: Option<u64>,
    /// Events at most, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A validated audit query, as the store runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressFilter {
    pub group: String,
    pub sandbox: Option<String>,
    pub verdict: Option<EgressVerdict>,
    /// Unix milliseconds.
    pub since_ms: Option<i64>,
    pub after: Option<u64>,
    pub limit: u32,
}

impl GroupEgressQuery {
    pub fn filter(self, group: &str) -> Result<EgressFilter> {
        if let Some(s) = &self.sandbox {
            validate_sandbox_id(s)?;
        }
        SandboxEgressQuery {
            verdict: self.verdict,
            since: self.since,
            after: self.after,
            limit: self.limit,
        }
        .filter(group, self.sandbox)
    }
}

impl SandboxEgressQuery {
    pub fn filter(self, group: &str, sandbox: Option<String>) -> Result<EgressFilter> {
        let limit = self.limit.unwrap_or(DEFAULT_AUDIT_LIMIT);
        if !(1..=MAX_AUDIT_LIMIT).contains(&limit) {
            return bad(format!(
                "invalid limit {limit}: allowed is 1–{MAX_AUDIT_LIMIT}"
            ));
        }
        let since_ms = match &self.since {
            Some(s) => Some(parse_rfc3339_ms(s).ok_or_else(|| {
                crate::error::Error::BadRequest(format!(
                    "invalid since {}: expected an RFC 3339 UTC time like \
                     2026-11-30T15:04:05Z or 2026-11-30T15:04:05.123Z",
                    quote(s)
                ))
            })?),
            None => None,
        };
        Ok(EgressFilter {
            group: group.to_string(),
            sandbox,
            verdict: self.verdict,
            since_ms,
            after: self.after,
            limit,
        })
    }
}

/// `sb-` and 12 lowercase hex digits.
fn validate_sandbox_id(s: &str) -> Result<()> {
    let ok = s.strip_prefix("sb-").is_some_and(|h| {
        h.len() == 12 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        bad(format!(
            "invalid sandbox {}: expected a sandbox id (sb- and 12 hex digits)",
            quote(s)
        ))
    }
}

/// What [`parse_rfc3339_ms`] accepts, as a pattern for the document: real dates (February
/// 29th in leap years only) and times, in UTC.
pub const RFC3339_UTC_PATTERN: &str = concat!(
    "^([0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)",
    "|02-(0[1-9]|1[0-9]|2[0-8]))",
    "|([0-9]{2}(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)-02-29)",
    "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?Z$"
);

fn since_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(RFC3339_UTC_PATTERN))
        .description(Some(
            "Only events at or after this time (RFC 3339, UTC: `2026-11-30T15:04:05Z`, \
             fractions allowed)",
        ))
        .build()
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` → Unix milliseconds; `None` for anything else (other
/// offsets included: the API speaks UTC).
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = s.get(19..)?;
    let millis = match rest.strip_suffix('Z')? {
        "" => 0,
        f => {
            let digits = f.strip_prefix('.')?;
            if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            let ms = format!("{digits:0<3}");
            ms[..3].parse::<i64>().ok()?
        }
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d < 1
        || d > days_in[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 59
    {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000) + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matcher for a pattern of the document, by the JSON Schema validator the server uses.
    fn matcher(pattern: &str) -> impl Fn(&str) -> bool {
        let v =
            jsonschema::validator_for(&serde_json::json!({"type": "string", "pattern": pattern}))
                .unwrap();
        move |s| v.is_valid(&serde_json::json!(s))
    }

    #[test]
    fn times_parse_strictly() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-11-30T15:04:05.123Z"),
            Some(1_796_051_045_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-30T15:04:05.1Z"),
            Some(1_796_051_045_100)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00Z"),
            Some(951_782_400_000)
        );
        // The daemon's own format round-trips.
        assert_eq!(
            parse_rfc3339_ms(&crate::api::rfc3339(1_796_051_045)),
            Some(1_796_051_045_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-11-30",
            "2026-11-30T15:04:05",
            "2026-11-30T15:04:05+01:00",
            "2026-11-30 15:04:05Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T15:04:05.Z",
            "2026-11-30T15:04:05.1234567890Z",
            "+026-11-30T15:04:05Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
        // The document's pattern says the same, on these and on every day of a few years.
        let pattern = matcher(RFC3339_UTC_PATTERN);
        for y in [1900, 2000, 2024, 2026] {
            for m in 1..=12 {
                for d in 1..=31 {
                    for t in ["T00:00:00Z", "T23:59:59.5Z", "T24:00:00Z", "T12:60:00Z"] {
                        let s = format!("{y:04}-{m:02}-{d:02}{t}");
                        assert_eq!(
                            pattern(&s),
                            parse_rfc3339_ms(&s).is_some(),
                            "{s}: the pattern and the parser disagree"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn queries_are_validated() {
        let q = |v: serde_json::Value| serde_json::from_value::<GroupEgressQuery>(v);
        let f = q(serde_json::json!({})).unwrap().filter("g").unwrap();
        assert_eq!(f.limit, DEFAULT_AUDIT_LIMIT);
        let f = q(
            serde_json::json!({"sandbox": "sb-0123456789ab", "verdict": "deny",
            "since": "2026-11-30T15:04:05Z", "after": 7, "limit": 1000}),
        )
        .unwrap()
        .filter("g")
        .unwrap();
        assert_eq!(f.sandbox.as_deref(), Some("sb-0123456789ab"));
        assert_eq!(f.verdict, Some(EgressVerdict::Deny));
        assert_eq!((f.after, f.limit), (Some(7), 1000));
        for (v, want) in [
            (serde_json::json!({"limit": 0}), "1–1000"),
            (serde_json::json!({"limit": 1001}), "1–1000"),
            (serde_json::json!({"since": "yesterday"}), "RFC 3339"),
            (serde_json::json!({"sandbox": "../x"}), "sb- and 12 hex"),
            (
                serde_json::json!({"sandbox": "sb-0123456789AB"}),
                "sb- and 12 hex",
            ),
        ] {
            let e = q(v.clone()).unwrap().filter("g").unwrap_err().to_string();
            assert!(e.contains(want), "{v}: {e}");
        }
        assert!(q(serde_json::json!({"verdict": "maybe"})).is_err());
        assert!(q(serde_json::json!({"sandboxes": "x"})).is_err());
    }
}
