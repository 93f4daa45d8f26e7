//! Background processes in a sandbox: the start request (an exec without stdin), the
//! process as listed, its exit and its logs, and the kill request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ExecRequest;

/// The longest a wait may block, in seconds.
pub const MAX_WAIT_S: f64 = 300.0;

/// How long a wait blocks without `timeout_s`.
pub const DEFAULT_WAIT_S: f64 = 30.0;

/// `POST …/sandboxes/{id}/processes`: exactly one of `argv` and `command`. Validated and
/// merged with the image's and the sandbox's settings exactly as an exec (without stdin).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct StartProcess {
    /// Program and arguments, run as given; `argv[0]` is looked up in PATH when it has no '/'.
    pub argv: Option<Vec<String>>,
    /// A shell command line, run as `/bin/sh -c COMMAND`.
    pub command: Option<String>,
    /// Over the image's and the sandbox's environment.
    #[schema(schema_with = super::env_schema)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; default: the image's, else the user's home.
    pub cwd: Option<String>,
    /// Name or uid, optionally `:group`; default: the image's user, else root.
    pub user: Option<String>,
    /// Kill the process and everything it started after this many seconds (0 < t ≤ 604800).
    #[schema(exclusive_minimum = 0, maximum = 604800)]
    pub timeout_s: Option<f64>,
}

impl From<StartProcess> for ExecRequest {
    fn from(s: StartProcess) -> ExecRequest {
        ExecRequest {
            argv: s.argv,
            command: s.command,
            env: s.env,
            cwd: s.cwd,
            user: s.user,
            stdin: None,
            timeout_s: s.timeout_s,
        }
    }
}

/// A started background process.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessStarted {
    /// The sandbox's id for it (`p1`, `p2`, …), never reused while the sandbox lives.
    pub id: String,
    /// Its pid in the guest (informational).
    pub pid: u32,
}

/// How a background process ended.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessExit {
    /// The exit code, when it exited by itself.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Killed because its `timeout_s` ran out.
    pub timed_out: bool,
}

/// One background process.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub id: String,
    pub pid: u32,
    /// As started (the guest may shorten very long ones).
    pub argv: Vec<String>,
    pub running: bool,
    /// How it ended; null while it runs.
    pub exit: Option<ProcessExit>,
    /// RFC 3339 UTC.
    pub started_at: String,
}

/// The sandbox's background processes: the running ones and the newest finished ones, oldest
/// first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessList {
    pub processes: Vec<Process>,
}

/// What the guest kept of a process's output: the newest 1 MiB of each stream.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessLogs {
    /// Decoded as UTF-8; invalid bytes (or a character cut by the ring) become U+FFFD.
    pub stdout: String,
    pub stderr: String,
}

/// `POST …/processes/{pid_id}/kill`; the body may be omitted.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KillProcess {
    /// The signal to send to the process's group (1–64); default 15 (SIGTERM). 9 kills
    /// everything it started.
    #[schema(minimum = 1, maximum = 64)]
    pub signal: Option<i32>,
}

impl crate::http::extract::Checked for StartProcess {
    fn check(&self) -> crate::error::Result<()> {
        ExecRequest::from(self.clone()).validate().map(drop)
    }
}
