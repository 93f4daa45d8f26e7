//! `/v1/audit`: the audit log of mutating API calls (admin keys only). The recording itself is
//! the router's `audit` middleware (`http/mod.rs`).

use axum::extract::State;
use axum::http::Uri;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::{AuditEvent, AuditList, AuditQuery, ErrorBody};
use crate::error::Result;
use crate::http::access::require_admin;
use crate::http::extract::query;
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list_audit))
}

#[derive(OpenApi)]
#[openapi(paths(list_audit), components(schemas(AuditEvent, AuditList)))]
pub(in crate::http) struct Doc;

#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    security(("bearer" = [])),
    params(
        ("since" = Option<u64>, Query, description = "Only calls at or after this time, unix \
            seconds", maximum = 1_000_000_000_000_u64),
        ("after" = Option<u64>, Query, description = "Only entries numbered above this (the \
            previous page's next)", maximum = 9_007_199_254_740_992_u64),
        ("key" = Option<String>, Query, description = "Only calls made with this API key id",
            min_length = 1, max_length = 64),
        ("group" = Option<String>, Query, description = "Only calls on this sandbox group",
            min_length = 1, max_length = 63, pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"),
        ("limit" = Option<u32>, Query, description = "1–1000, default 100", minimum = 1,
            maximum = 1000)),
    responses(
        (status = 200, description = "A page of the audit log, oldest first: every POST, PUT \
            and DELETE of the API (the port proxy's traffic aside), with its key, route, \
            path, status and request id; never a body", body = AuditList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn list_audit(
    State(state): State<AppState>,
    p: Principal,
    uri: Uri,
) -> Result<Json<AuditList>> {
    require_admin(&p)?;
    let q: AuditQuery = query(&uri)?;
    q.validate()?;
    let (events, more) = state.store.list_audit_events(q).await?;
    let next = if more {
        events.last().map(|e| e.n)
    } else {
        None
    };
    Ok(Json(AuditList { events, next }))
}
