//! The interactive shell (a WebSocket): its last message.

use serde::Serialize;
use utoipa::ToSchema;

/// The server's last message: how the command ended (as `exit_code` in exec).
#[derive(Debug, Serialize, ToSchema)]
pub struct ShellExit {
    /// Always "exit".
    #[serde(rename = "type")]
    pub kind: String,
    /// As a shell reports it: the code, 128+N after signal N, 127 when the command does not
    /// exist.
    pub exit_code: i32,
    pub signal: Option<i32>,
}
