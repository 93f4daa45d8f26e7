//! The audit log of mutating API calls, as `GET /v1/audit` returns it: who (key id), what
//! (method and route), on what (path and group), the outcome (status) and when. Never a body:
//! request bodies may hold secrets, so none is recorded.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bad, validate_name};
use crate::error::Result;

/// One mutating API call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// Increasing; pass the last one as `after` for the next page.
    pub n: u64,
    /// RFC 3339, UTC, to the millisecond.
    pub at: String,
    /// The API key's id; null when the call carried no valid key (a refused attempt).
    pub key_id: Option<String>,
    /// `METHOD /route/{template}`, e.g. `POST /v1/sandbox-groups/{group}/sandboxes`.
    pub action: String,
    /// The path called (no query string).
    pub target: String,
    /// The sandbox group the path names, if any.
    pub group: Option<String>,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The `X-Request-Id` of the answer, for matching a client's log to this entry.
    pub request_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditList {
    /// Oldest first.
    pub events: Vec<AuditEvent>,
    /// Pass as `after` for the next page; null on the last page.
    pub next: Option<u64>,
}

/// The query of `GET /v1/audit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub since: Option<u64>,
    pub after: Option<u64>,
    pub key: Option<String>,
    pub group: Option<String>,
    pub limit: Option<u32>,
}

/// The largest `since` (unix seconds) and `after`: what the document states (the largest
/// integers a JSON number carries exactly).
pub const MAX_SINCE: u64 = 1_000_000_000_000;
pub const MAX_AFTER: u64 = 9_007_199_254_740_992;

/// The most events one page returns.
pub const MAX_AUDIT_PAGE: u32 = 1000;

impl AuditQuery {
    pub fn validate(&self) -> Result<()> {
        if let Some(g) = &self.group {
            validate_name("group name", g)?;
        }
        if let Some(k) = &self.key {
            if k.is_empty() || k.len() > 64 {
                return bad(format!("invalid key id {}", super::quote(k)));
            }
        }
        if let Some(l) = self.limit {
            if !(1..=MAX_AUDIT_PAGE).contains(&l) {
                return bad(format!("invalid limit {l}: allowed is 1–{MAX_AUDIT_PAGE}"));
            }
        }
        if let Some(s) = self.since.filter(|s| *s > MAX_SINCE) {
            return bad(format!(
                "invalid since {s}: unix seconds, at most {MAX_SINCE}"
            ));
        }
        if let Some(a) = self.after.filter(|a| *a > MAX_AFTER) {
            return bad(format!("invalid after {a}: at most {MAX_AFTER}"));
        }
        Ok(())
    }
}
