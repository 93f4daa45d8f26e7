//! Snapshots: the create request and the snapshot as returned.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Tier;

/// `POST …/sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Unique in the group: 1–63 of [a-z0-9-], not starting or ending with '-'.
    #[schema(example = "after-setup")]
    pub name: String,
}

/// A named snapshot of a sandbox (memory and disk), scoped to a group. It does not depend on
/// its source sandbox: deleting that leaves the snapshot intact.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub name: String,
    pub group: String,
    /// Id of the sandbox it was taken from (which may since have been deleted).
    pub sandbox: String,
    /// Manifest digest of the image.
    pub image: String,
    pub tier: Tier,
    /// Bytes it takes on the host (memory image and disk layer).
    pub size_bytes: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}
