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
    /// While it drains: how moving its running sandboxes to other nodes goes (live
    /// migration). Absent when it is not draining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainProgress>,
    /// The id of its sealing key (`MOAT_HOME/secrets.key`), as of its last lease renewal: a
    /// MAC of a fixed label under the key, which names it without revealing it. Every node
    /// of a fleet has the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing_key_id: Option<String>,
    /// The id of the key in its `MOAT_HOME/secrets.key.next`, the one a rotation
    /// (`POST /v1/sealing-key/rotate`) switches to; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sealing_key_id: Option<String>,
    /// Started with `--shared-dir`: its suspends are on the fleet's shared storage, so
    /// another node takes them over when it is lost or drains.
    pub shared_storage: bool,
    /// Its suspended sandboxes whose files are on its own disk (suspended without
    /// `--shared-dir`): no other node can resume them while it is lost; a drain sends them
    /// to another node with their files.
    pub suspended_local: u64,
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

/// A draining node moving its running sandboxes away, one at a time, by live migration
/// (docs/FLEET.md). A sandbox that cannot be moved keeps running where it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainProgress {
    /// Running sandboxes still on the node, those that could not be moved included.
    pub running_left: u64,
    /// Sandboxes moved to another node since the drain began.
    pub moved: Vec<DrainMove>,
    /// The sandbox being moved now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<String>,
    /// Sandboxes that could not be moved (they run on here), and why.
    pub failed: Vec<DrainFailure>,
    /// Every running sandbox was moved or tried.
    pub done: bool,
}

/// A sandbox a drain moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainMove {
    pub sandbox: String,
    /// The node it runs on now.
    pub node: String,
    /// From QEMU stopping the guest on the old node to the hand-over (the destination's
    /// last load, its check of the guest, the commit). The guest's own processes stand still
    /// for part of it: they run on the new node during its check. 0 for a suspended
    /// sandbox, sent with its files.
    pub pause_ms: u64,
    /// From the start of the move to the hand-over. Requests for the sandbox wait this long
    /// at most (its agent answers none while the migration runs); those still waiting when it
    /// moved are answered 503, to be sent again.
    pub total_ms: u64,
    /// How its disk travelled: `top`, only its own layer (the new node has the same
    /// template, snapshot or suspend file under it), or `full`, the whole disk (it has not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSync>,
}

/// How a live migration sends the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskSync {
    /// Only the sandbox's own layer: the new node has the file under it.
    Top,
    /// The whole disk, into one with no backing file: the new node lacks the file under
    /// the sandbox's layer, or has another one under that name.
    Full,
}

impl DiskSync {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskSync::Top => "top",
            DiskSync::Full => "full",
        }
    }
}

/// A sandbox a drain could not move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainFailure {
    pub sandbox: String,
    pub reason: String,
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
