//! `moat mcp`: the MCP server on stdin/stdout, for agents that start their tools as
//! processes (desktop and CLI agents). It calls the daemon at MOAT_URL with MOAT_API_KEY; the
//! same server is on the daemon itself at `/mcp` (docs/MCP.md).

use anyhow::{anyhow, Result};
use clap::Args;

#[derive(Debug, Args)]
pub struct McpArgs {
    /// URL of the moat daemon.
    #[arg(long, env = "MOAT_URL", default_value = "http://127.0.0.1:7070")]
    url: String,
    /// API key (moat_…); the session's sandboxes are created with it.
    #[arg(long, env = "MOAT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Group of the session's sandbox, created on the first tool call that needs one
    /// (without it, the agent calls create_sandbox with a group first).
    #[arg(long, env = "MOAT_MCP_GROUP")]
    group: Option<String>,
}

/// Serves one session; its sandboxes (except kept ones) are deleted when stdin closes.
pub async fn run(args: McpArgs) -> Result<u8> {
    let key = args
        .api_key
        .filter(|k| !k.is_empty())
        .ok_or_else(|| anyhow!("moat mcp needs an API key: set MOAT_API_KEY (or --api-key)"))?;
    moat_mcp::serve_stdio(&args.url, key, args.group)
        .await
        .map_err(|e| anyhow!(e))?;
    Ok(0)
}
