//! `AppState`: what every handler gets: the store, the metrics, the sandbox manager (or why
//! there is none), the image operations in progress, the policy gate the identity issuer and the
//! rate limits.

use std::sync::Arc;

use crate::error::Result;
use crate::identity::Issuer;
use crate::images::Operations;
use crate::metrics::Metrics;
use crate::policy::Gate;
use crate::ratelimit::Limiter;
use crate::readiness::Sandboxes;
use crate::sandboxes::Manager;
use crate::store::Store;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// The sandbox manager, or why this daemon has none yet (being prepared, failed, no
    /// agent): the group and key routes still work, the sandbox routes answer 503 with why.
    pub sandboxes: Arc<Sandboxes>,
    /// Image imports in progress.
    pub operations: Arc<Operations>,
    /// The policy gate: how requests are checked against group policies.
    pub policy: Arc<Gate>,
    /// The workload-identity issuer: its keys, its documents, and token mints.
    pub identity: Arc<Issuer>,
    /// Per-key rate limits.
    pub limiter: Arc<Limiter>,
    /// Audit log entries kept (`moat serve --audit-retention`); the oldest go first.
    pub audit_retention: u64,
    /// Cancelled when the daemon stops: long-lived connections (MCP sessions) end then, so
    /// that the graceful shutdown does not wait for them.
    pub stopping: moat_mcp::CancellationToken,
    /// Sends requests for sandboxes of other nodes to them.
    pub forwarder: Arc<super::forward::Forwarder>,
    /// Live migrations arriving from other nodes, and the node credentials seen.
    pub migrations: Arc<crate::migrate::Arrivals>,
}

impl AppState {
    pub(crate) fn manager(&self) -> Result<Arc<Manager>> {
        self.sandboxes.manager()
    }
}
