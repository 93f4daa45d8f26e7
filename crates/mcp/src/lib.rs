//! moat-mcp: moat as an MCP server, so that agents use sandboxes as tools without glue.
//!
//! The same server runs two ways: `moat mcp` speaks MCP on stdio (desktop and CLI agents)
//! and calls a daemon at MOAT_URL; the daemon serves it at `/mcp` over MCP's streamable HTTP
//! transport, calling its own router in process. Either way every tool call is a call of the
//! REST API with the session's API key ([`daemon`]), so the MCP server adds no access rules of
//! its own and cannot bypass one. Built on the official Rust MCP SDK (`rmcp`).

pub mod daemon;
pub mod error;
pub mod server;
pub mod session;

use std::sync::Arc;

use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServiceExt;
pub use tokio_util::sync::CancellationToken;

pub use daemon::{Daemon, HttpTransport, Transport};
pub use error::{Error, Result};
pub use server::MoatMcp;
pub use session::Session;

/// Serves one MCP session on stdin/stdout until the client closes stdin, then deletes the
/// sandboxes the session created (except those it was asked to keep).
pub async fn serve_stdio(
    url: &str,
    api_key: String,
    default_group: Option<String>,
) -> std::result::Result<(), String> {
    let transport: Arc<dyn Transport> = Arc::new(HttpTransport::new(url));
    let session = Session::new(transport, Some(api_key), Some(default_group));
    let server = MoatMcp::new(session.clone());
    let result = match server.serve(rmcp::transport::stdio()).await {
        Ok(running) => running
            .waiting()
            .await
            .map(drop)
            .map_err(|e| format!("the MCP session failed: {e}")),
        Err(e) => Err(format!("the MCP handshake failed: {e}")),
    };
    session.close().await;
    result
}

/// The streamable HTTP MCP service: one [`Session`] per MCP session, whose calls go to
/// `transport` with the key of the request that opened it. Every session ends (and deletes
/// its sandboxes) when `stop` is cancelled.
///
/// The caller authenticates requests before they reach it (the daemon's `/mcp` route does).
/// Host checks against DNS rebinding are off: a rebound page cannot send an API key.
pub fn http_service(
    transport: Arc<dyn Transport>,
    stop: CancellationToken,
) -> StreamableHttpService<MoatMcp, LocalSessionManager> {
    StreamableHttpService::new(
        move || Ok(MoatMcp::new(Session::new(transport.clone(), None, None))),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default()
            .disable_allowed_hosts()
            .with_cancellation_token(stop),
    )
}
