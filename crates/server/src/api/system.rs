//! `/healthz`: the daemon answers, and whether its sandboxes can run yet.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::prepare::Step;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Always "ok" when the daemon answers.
    pub status: String,
    pub version: String,
    /// Whether sandboxes can run yet: a daemon on a fresh MOAT_HOME prepares them first.
    pub sandboxes: SandboxesHealth,
    /// Whether QEMU and the network stacks run jailed, and what the host offers the jail
    /// (namespaces, seccomp, cgroup version), e.g. `on: uids 1600000000.., namespaces
    /// mnt/pid/ipc/uts/net, seccomp, cgroup v2` or `off (MOAT_NO_JAIL=1)`. Absent until the
    /// sandbox runtime is ready (the same line is in the log, `moat -v serve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<String>,
}

/// Whether sandboxes can run (`/healthz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxesState {
    /// The sandbox routes work.
    Ready,
    /// The daemon is installing what sandboxes need (see `step`).
    Preparing,
    /// The last preparation failed (see `message`); it is tried again in `retry_after_s`.
    Failed,
    /// Sandboxes cannot work and the daemon will not prepare them (see `message`).
    Unavailable,
}

/// The sandboxes part of `/healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxesHealth {
    pub state: SandboxesState,
    /// For people: what the daemon is doing, or what went wrong and what to do.
    pub message: String,
    /// The preparation step running (`preparing`) or that failed (`failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    /// Preparation steps finished, of `steps_total`.
    pub steps_done: u32,
    pub steps_total: u32,
    /// The preparation attempt running (`preparing`) or that failed (`failed`); 0 otherwise.
    pub attempt: u32,
    /// Seconds until the next attempt (`failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}
