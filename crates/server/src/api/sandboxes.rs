//! Sandboxes: their states, the create request (an image, or forks of a snapshot) and the
//! sandbox as returned, and label selectors.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    bad, quote, validate_env, validate_image, validate_label_key, validate_label_value,
    validate_labels, validate_name, Tier,
};
use crate::error::{Error, Result};

/// Where a sandbox is in its life. `failed` and `lost` come with a `reason`. `lost`: the node
/// that ran it stopped renewing its lease (it died or was cut off) while the sandbox ran;
/// deleting it is all that is left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Suspending,
    Suspended,
    Resuming,
    Deleting,
    Failed,
    Lost,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Suspending => "suspending",
            SandboxState::Suspended => "suspended",
            SandboxState::Resuming => "resuming",
            SandboxState::Deleting => "deleting",
            SandboxState::Failed => "failed",
            SandboxState::Lost => "lost",
        }
    }

    pub const ALL: [SandboxState; 8] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Suspending,
        SandboxState::Suspended,
        SandboxState::Resuming,
        SandboxState::Deleting,
        SandboxState::Failed,
        SandboxState::Lost,
    ];

    pub fn parse(s: &str) -> Option<SandboxState> {
        SandboxState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// `POST /v1/sandbox-groups/{group}/sandboxes`. Every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CreateSandbox {
    /// Image name or digest; default: the group's image.
    #[schema(schema_with = super::optional_image_schema)]
    pub image: Option<String>,
    /// Default: the group's tier.
    pub tier: Option<Tier>,
    /// Environment of every exec in the sandbox, over the image's (an exec's own `env` wins).
    #[schema(schema_with = super::env_schema)]
    pub env: BTreeMap<String, String>,
    /// Kubernetes-style labels, for `?labels=` selectors.
    #[schema(schema_with = super::labels_schema)]
    pub labels: BTreeMap<String, String>,
    /// Described in `from_snapshot_schema`.
    #[schema(schema_with = from_snapshot_schema)]
    pub from_snapshot: Option<String>,
    /// With `from_snapshot`: how many forks, 1–16; the answer is then `{"sandboxes": […]}`.
    /// Either all of them are created or none.
    #[schema(minimum = 1, maximum = 16)]
    pub count: Option<u32>,
}

fn from_snapshot_schema() -> utoipa::openapi::Schema {
    super::optional_name_schema()
        .description(Some(
            "Fork a snapshot of this group instead of starting the image: processes, memory \
             and files as they were, with fresh entropy, clock and hostname. Excludes `image` \
             and `tier` (the snapshot's are used).",
        ))
        .build()
        .into()
}

/// The most forks one create makes. Restores share the host's CPUs (each fork's QEMU loads a
/// ~100 MiB memory image; on a 2-core TCG host about 0.3 s of CPU each), so a larger burst
/// belongs in several requests or a warm pool.
pub const MAX_FORKS: u32 = 16;

/// A sandbox as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    /// `sb-` and 12 hex digits.
    pub id: String,
    pub group: String,
    pub state: SandboxState,
    /// Why the sandbox is `failed` or `lost`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node that runs it (`GET /v1/nodes/{node}`); absent only for a sandbox made before
    /// node mode that no node has claimed yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Manifest digest of the image it runs.
    pub image: String,
    pub tier: Tier,
    #[schema(schema_with = super::env_schema)]
    pub env: BTreeMap<String, String>,
    #[schema(schema_with = super::labels_schema)]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
    /// The end of the last exec, file or shell request (RFC 3339, UTC; recorded within a
    /// second or so); absent if there was none yet. The idle timer counts from this, or from
    /// the last resume or the creation if later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<String>,
    /// Whether its agent answers; present while the sandbox is running. An agent that stops
    /// answering (or breaks the protocol) is found within seconds; moat then starts a new
    /// session with it, and fails the sandbox (with the reason, its VM stopped) if that does
    /// not bring it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<SandboxHealth>,
}

/// The health of a running sandbox's agent (its channel to the host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxHealth {
    pub agent: AgentHealth,
    /// What was seen (`unresponsive` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when (RFC 3339, UTC; `unresponsive` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// `ok`: it answers. `unresponsive`: it did not answer, or broke the protocol; moat is
/// reconnecting, and requests meanwhile answer 502.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentHealth {
    Ok,
    Unresponsive,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

/// The answer to a create: one sandbox, or (with `count`) the list of forks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Created {
    One(Box<Sandbox>),
    Many(SandboxList),
}

impl CreateSandbox {
    pub fn validate(&self) -> Result<()> {
        if let Some(img) = &self.image {
            validate_image(img)?;
        }
        match (&self.from_snapshot, self.count) {
            (Some(name), count) => {
                validate_name("snapshot name", name)?;
                if self.image.is_some() || self.tier.is_some() {
                    return Err(Error::Unprocessable(
                        "from_snapshot excludes image and tier: a fork runs the snapshot's \
                         image and tier"
                            .to_string(),
                    ));
                }
                if let Some(n) = count {
                    if !(1..=MAX_FORKS).contains(&n) {
                        return Err(Error::BadRequest(format!(
                            "count must be 1–{MAX_FORKS}, got {n}"
                        )));
                    }
                }
            }
            (None, Some(_)) => {
                return Err(Error::Unprocessable(
                    "count is only allowed with from_snapshot (an N-way fork)".to_string(),
                ))
            }
            (None, None) => {}
        }
        validate_env("env", &self.env)?;
        validate_labels(&self.labels)
    }
}

/// Parses a label selector `k=v,k2=v2` (every pair must match; `k=` matches an empty value).
pub fn parse_selector(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return bad(format!(
                "invalid label selector {}: expected key=value[,key=value…]",
                quote(s)
            ));
        };
        validate_label_key(k)
            .map_err(|m| Error::BadRequest(format!("invalid selector key {}: {m}", quote(k))))?;
        validate_label_value(v)
            .map_err(|m| Error::BadRequest(format!("invalid selector value {}: {m}", quote(v))))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

impl crate::http::extract::Checked for CreateSandbox {
    fn check(&self) -> Result<()> {
        self.validate()
    }
}
