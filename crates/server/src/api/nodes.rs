//! Nodes: the daemons that share one store (docs/FLEET.md). Each holds a lease on its row;
//! the others mark it `lost` when the lease ends unrenewed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// It holds its lease and takes new sandboxes.
    Ready,
    /// It holds its lease and takes no new sandboxes (`POST /v1/nodes/{node}/drain`).
    Draining,
    /// Its lease ended unrenewed: another node marked it and its running sandboxes lost. It
    /// comes back `ready` (or `draining`) with a new epoch when it takes a lease again.
    Lost,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        [NodeState::Ready, NodeState::Draining, NodeState::Lost]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

/// A node as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// `moat serve --node-name` (default: the host name).
    pub name: String,
    /// How other nodes and clients reach its API (`--advertise-url`).
    pub advertise_url: String,
    /// How its VMs run: `kvm` or `tcg`.
    pub accelerator: String,
    /// `--node-label k=v`.
    #[schema(schema_with = super::labels_schema)]
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    /// Grows each time the node takes its lease; the node's writes are fenced by it.
    pub epoch: u64,
    /// `--lease-s`: how long a lease lasts unrenewed.
    pub lease_s: u64,
    /// When the lease ends unless renewed (RFC 3339, UTC; the database's clock).
    pub lease_expires_at: String,
    /// When the node took its current lease.
    pub acquired_at: String,
    /// When another node marked it `lost`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_at: Option<String>,
    /// Why it was marked `lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_reason: Option<String>,
    pub capacity: NodeCapacity,
    /// As of its last lease renewal.
    pub used: NodeUse,
    /// The id of its sealing key (`MOAT_HOME/secrets.key`), as of its last lease renewal: a
    /// MAC of a fixed label under the key, which names it without revealing it. Every node
    /// of a fleet has the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing_key_id: Option<String>,
    /// The id of the key in its `MOAT_HOME/secrets.key.next`, the one a rotation
    /// (`POST /v1/sealing-key/rotate`) switches to; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sealing_key_id: Option<String>,
}

/// `POST /v1/sealing-key/rotate`: what the rotation re-sealed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SealingKeyRotation {
    /// The key every value is sealed with now (each node's former `secrets.key.next`).
    pub key_id: String,
    /// The key that sealed them before; no node needs it any more.
    pub previous_key_id: String,
    /// Group secrets re-sealed.
    pub secrets: u64,
    /// Identity signing keys re-sealed.
    pub signing_keys: u64,
}

/// What a node's sandboxes may hold together.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeCapacity {
    /// Tier memory, MiB (`--max-memory-mib`, or from the host's memory).
    pub memory_mib: u64,
    /// vCPUs (the host's CPUs times `--cpu-overcommit`).
    pub vcpus: f64,
}

/// What a node's sandboxes and pool VMs hold.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeUse {
    pub memory_mib: u64,
    pub vcpus: f64,
    /// Sandboxes it runs (running or parked), pool VMs included.
    pub sandboxes: u64,
}

/// `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeList {
    pub nodes: Vec<Node>,
}
