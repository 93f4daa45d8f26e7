//! Governance: a group's policy and its versions, the dry run, the decisions log and the
//! replay of recorded requests against a candidate policy. The policy, the request checked and
//! the decision are moat-policy's own types (docs/POLICY.md), so the daemon, the CLI's offline
//! checker and this API share one definition.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::bad;
use crate::error::Result;
pub use moat_policy::log::{LogAnchor, LogEntry, Verdict};
pub use moat_policy::{CheckRequest, Decision, Finding, Mode, Policy, Rule};

/// The most decisions one page of `GET …/policy/decisions` returns.
pub const MAX_DECISIONS_PAGE: u32 = 1000;
/// Decisions per page when the query gives no `limit`.
pub const DEFAULT_DECISIONS_PAGE: u32 = 100;
/// The most recorded requests one replay checks again (each is a check in a worker process).
pub const MAX_REPLAY: u32 = 500;
/// Requests a replay checks when the body gives no `limit`.
pub const DEFAULT_REPLAY: u32 = 100;

/// A version of a group's policy. A group that never had one answers version 0: an empty
/// policy, whose mode is `off`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyVersion {
    pub group: String,
    /// 1, 2, …: every change makes a new version; 0 means no policy was ever applied.
    pub version: u64,
    pub policy: Policy,
    /// SHA-256 (hex) of the policy as stored (JSON); null for version 0.
    pub sha256: Option<String>,
    /// Id of the API key that applied it; null for version 0.
    pub author: Option<String>,
    /// RFC 3339, UTC; null for version 0.
    pub created_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyVersionList {
    /// Oldest first.
    pub items: Vec<PolicyVersion>,
}

/// The answer of a dry run (`POST …/policy/check`): what the group's policy in force decides
/// about the request. Nothing runs and nothing is recorded.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyCheck {
    /// Whether the request would run: false only in `enforce` mode with findings.
    pub allowed: bool,
    pub mode: Mode,
    /// Why it would be refused (in `audit` mode: why `enforce` would refuse it).
    pub findings: Vec<Finding>,
    pub policy_version: u64,
}

/// `POST …/policy/rollback`: make an earlier version the one in force again. The history is
/// append-only, so this makes a new version whose policy is version `version`'s.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The version to go back to (1 or more; it must exist for this group name).
    pub version: u64,
}

/// `GET …/policy/decisions` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionQuery {
    /// Only decisions with this verdict: allow, deny or audit.
    pub verdict: Option<String>,
    /// Only decisions made at or after this time, in unix seconds.
    pub since: Option<String>,
    /// Only entries numbered above this one (the previous page's `next`).
    pub after: Option<String>,
    /// At most this many, 1–1000 (default 100).
    pub limit: Option<String>,
}

/// A checked [`DecisionQuery`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionFilter {
    pub verdict: Option<Verdict>,
    pub since: Option<i64>,
    pub after: u64,
    pub limit: u32,
}

impl DecisionQuery {
    pub fn validate(&self) -> Result<DecisionFilter> {
        let verdict = match self.verdict.as_deref() {
            None => None,
            Some("allow") => Some(Verdict::Allow),
            Some("deny") => Some(Verdict::Deny),
            Some("audit") => Some(Verdict::Audit),
            Some(v) => {
                return bad(format!(
                    "invalid verdict {}: use allow, deny or audit",
                    super::quote(v)
                ))
            }
        };
        let number = |what: &str, v: &Option<String>| -> Result<Option<u64>> {
            match v {
                None => Ok(None),
                Some(s) => match s.parse::<u64>() {
                    Ok(n) if n <= i64::MAX as u64 => Ok(Some(n)),
                    _ => bad(format!(
                        "invalid {what} {}: expected a whole number",
                        super::quote(s)
                    )),
                },
            }
        };
        let since = number("since (unix seconds)", &self.since)?.map(|s| s as i64);
        let after = number("after (an entry number)", &self.after)?.unwrap_or(0);
        let limit = match number("limit", &self.limit)? {
            None => DEFAULT_DECISIONS_PAGE,
            Some(n) if (1..=u64::from(MAX_DECISIONS_PAGE)).contains(&n) => n as u32,
            Some(n) => return bad(format!("invalid limit {n}: give 1–{MAX_DECISIONS_PAGE}")),
        };
        Ok(DecisionFilter {
            verdict,
            since,
            after,
            limit,
        })
    }
}

/// A page of the decisions log, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionList {
    pub items: Vec<LogEntry>,
    /// Where the log starts when old entries were pruned (`moat serve
    /// --policy-decisions-retention`): the first entry kept chains to this hash. Null when
    /// nothing was ever pruned.
    #[serde(default)]
    pub pruned: Option<LogAnchor>,
    /// Pass as `after` for the next page; null on the last page.
    pub next: Option<u64>,
}

/// `POST …/policy/replay`: a candidate policy, checked against the newest recorded requests.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    pub policy: Policy,
    /// How many of the newest decisions to replay, 1–500 (default 100).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

impl ReplayRequest {
    pub fn limit(&self) -> Result<u32> {
        match self.limit {
            None => Ok(DEFAULT_REPLAY),
            Some(n) if (1..=MAX_REPLAY).contains(&n) => Ok(n),
            Some(n) => bad(format!("invalid limit {n}: give 1–{MAX_REPLAY}")),
        }
    }
}

/// A recorded request the candidate decides differently. Both sides are compared as
/// `enforce` would decide (refused when there are findings), whatever the modes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayChange {
    /// The entry's number in the decisions log.
    pub n: u64,
    pub at: String,
    pub request: CheckRequest,
    /// Whether the recorded decision refused it, or would have in `enforce` mode.
    pub was_refused: bool,
    pub now_refused: bool,
    /// The candidate's findings (empty when it would now run).
    pub findings: Vec<Finding>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayResult {
    /// Recorded requests checked again.
    pub checked: u64,
    /// Those the candidate decides differently, oldest first.
    pub changed: Vec<ReplayChange>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(
        verdict: Option<&str>,
        since: Option<&str>,
        after: Option<&str>,
        limit: Option<&str>,
    ) -> DecisionQuery {
        DecisionQuery {
            verdict: verdict.map(str::to_string),
            since: since.map(str::to_string),
            after: after.map(str::to_string),
            limit: limit.map(str::to_string),
        }
    }

    #[test]
    fn decision_queries_are_checked() {
        let f = q(Some("deny"), Some("1700000000"), Some("7"), Some("5"))
            .validate()
            .unwrap();
        assert_eq!(
            f,
            DecisionFilter {
                verdict: Some(Verdict::Deny),
                since: Some(1_700_000_000),
                after: 7,
                limit: 5
            }
        );
        assert_eq!(q(None, None, None, None).validate().unwrap().limit, 100);
        for (bad_q, needle) in [
            (q(Some("refused"), None, None, None), "allow, deny or audit"),
            (q(None, Some("yesterday"), None, None), "since"),
            (q(None, None, Some("-1"), None), "after"),
            (q(None, None, None, Some("0")), "1–1000"),
            (q(None, None, None, Some("1001")), "1–1000"),
        ] {
            let e = bad_q.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn replay_limits_are_bounded() {
        let r = |limit| ReplayRequest {
            policy: Policy::default(),
            limit,
        };
        assert_eq!(r(None).limit().unwrap(), 100);
        assert_eq!(r(Some(500)).limit().unwrap(), 500);
        assert!(r(Some(0)).limit().is_err());
        assert!(r(Some(501)).limit().is_err());
    }
}
