//! `/mcp`: the MCP server (`moat-mcp`) over MCP's streamable HTTP transport.
//!
//! Every request needs an API key, checked here like any route's (401 in the API's error
//! shape otherwise) before the MCP service sees it. The MCP server then calls this daemon's
//! own REST router in process with that key ([`InProcess`]): no network hop, no address to
//! know, and exactly the REST API's access checks, validation and errors for every tool. It is
//! not part of the OpenAPI document: its protocol is MCP's (JSON-RPC), described by the tools'
//! own JSON schemas (`tools/list`).

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use moat_mcp::daemon::{BoxFuture, Response as ApiResponse, Transport};
use tower::ServiceExt;

use crate::http::state::AppState;
use crate::store::Principal;

/// The REST router, called in process by the MCP server.
struct InProcess {
    api: Router,
}

impl Transport for InProcess {
    fn send(
        &self,
        request: axum::http::Request<Bytes>,
        limit: usize,
    ) -> BoxFuture<'_, moat_mcp::Result<ApiResponse>> {
        Box::pin(async move {
            let resp = self
                .api
                .clone()
                .oneshot(request.map(Body::from))
                .await
                .unwrap_or_else(|never| match never {});
            let status = resp.status();
            // Only a body over the limit fails here: the router's bodies are in memory.
            let body = axum::body::to_bytes(resp.into_body(), limit)
                .await
                .map_err(|_| moat_mcp::Error::TooLarge(limit))?;
            Ok(ApiResponse { status, body })
        })
    }
}

/// Adds `/mcp` to `api`, the daemon's REST router, whose routes the MCP server calls.
pub(in crate::http) fn mount(api: Router, state: AppState) -> Router {
    let transport = std::sync::Arc::new(InProcess { api: api.clone() });
    let service = moat_mcp::http_service(transport, state.stopping.clone());
    let mcp = Router::new()
        .route(
            "/mcp",
            any(move |State(state): State<AppState>, req: Request| {
                let service = service.clone();
                async move {
                    let (mut parts, body) = req.into_parts();
                    if let Err(e) = Principal::from_request_parts(&mut parts, &state).await {
                        return e.into_response();
                    }
                    let resp = service
                        .oneshot(Request::from_parts(parts, body))
                        .await
                        .unwrap_or_else(|never| match never {});
                    resp.map(Body::new)
                }
            }),
        )
        .with_state(state);
    api.merge(mcp)
}
