//! Exec: the request (argv or a shell command line, checked here), its collected result and
//! the events of a streamed exec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bad, quote, validate_env, ErrorDetail, DAY};
use crate::error::{Error, Result};

pub const MAX_ARGV: usize = 4096;

/// `POST …/sandboxes/{id}/exec`: exactly one of `argv` and `command`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExecRequest {
    /// Program and arguments, run as given (no image entrypoint, as `docker exec`); `argv[0]`
    /// is looked up in PATH when it has no '/'.
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
    /// Given to the process as its standard input (then closed); without it stdin is empty.
    pub stdin: Option<String>,
    /// Kill the process and everything it started after this many seconds (0 < t ≤ 604800).
    #[schema(exclusive_minimum = 0, maximum = 604800)]
    pub timeout_s: Option<f64>,
}

/// How an exec ended, with its whole output.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    /// As a shell reports it: the code, 128+N after signal N, 124 after the timeout, 127 when
    /// the command does not exist.
    pub exit_code: i32,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Decoded as UTF-8; invalid bytes become U+FFFD.
    pub stdout: String,
    pub stderr: String,
}

/// The end of a streamed exec: `{"exit": ExecExit}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecExit {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

/// One line of a streamed exec (`Accept: application/x-ndjson`): `{"stdout": "…"}`,
/// `{"stderr": "…"}` as output is produced, then one `{"exit": {…}}`; `{"error": {…}}` if the
/// exec broke off.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecEvent {
    Stdout(String),
    Stderr(String),
    Exit(ExecExit),
    Error(ErrorDetail),
}

impl ExecRequest {
    /// The argv to run. Validates everything else too.
    pub fn validate(&self) -> Result<Vec<String>> {
        let argv = match (&self.argv, &self.command) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(Error::Unprocessable(
                    "give exactly one of \"argv\" (a list) and \"command\" (a shell \
                     command line)"
                        .to_string(),
                ))
            }
            (Some(argv), None) => {
                if argv.is_empty() || argv.len() > MAX_ARGV {
                    return bad(format!(
                        "invalid argv: expected 1–{MAX_ARGV} strings, got {}",
                        argv.len()
                    ));
                }
                if argv[0].is_empty() {
                    return bad("invalid argv: argv[0] is empty".to_string());
                }
                argv.clone()
            }
            (None, Some(c)) => {
                if c.trim().is_empty() {
                    return bad("invalid command: it is empty".to_string());
                }
                vec!["/bin/sh".into(), "-c".into(), c.clone()]
            }
        };
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            return bad(format!("invalid argv[{i}]: it contains a NUL byte"));
        }
        validate_env("env", &self.env)?;
        if let Some(w) = &self.cwd {
            if !w.starts_with('/') || w.contains('\0') {
                return bad(format!(
                    "invalid cwd {}: it must be an absolute path inside the sandbox",
                    quote(w)
                ));
            }
        }
        if let Some(u) = &self.user {
            if !moat_protocol::valid_user_spec(u) {
                return bad(format!(
                    "invalid user {}: use a name or uid, optionally followed by :group",
                    quote(u)
                ));
            }
        }
        if let Some(t) = self.timeout_s {
            if !(t.is_finite() && t > 0.0 && t <= 7.0 * DAY as f64) {
                return bad(format!(
                    "invalid timeout_s {t}: give a number of seconds above 0, at most {}",
                    7 * DAY
                ));
            }
        }
        Ok(argv)
    }

    pub fn timeout_ms(&self) -> Option<u64> {
        self.timeout_s.map(|t| (t * 1000.0).ceil() as u64)
    }
}

impl crate::http::extract::Checked for ExecRequest {
    fn check(&self) -> Result<()> {
        self.validate().map(drop)
    }
}
