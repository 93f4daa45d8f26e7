//! `GET …/sandboxes/{id}/egress` and `GET /v1/sandbox-groups/{group}/egress`: the egress audit
//! (every DNS answer and connection the sandboxes' network stacks decided), from the store.
//! Any key that sees the group may read it; it works while sandboxes are unavailable too.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::Uri;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::{
    EgressEvent, EgressEvents, EgressKind, EgressVerdict, ErrorBody, GroupEgressQuery,
    SandboxEgressQuery,
};
use crate::error::Result;
use crate::http::access::{visible_group, visible_sandbox};
use crate::http::extract::{path_param, query};
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/egress",
            get(sandbox_egress),
        )
        .route("/v1/sandbox-groups/{group}/egress", get(group_egress))
}

#[derive(OpenApi)]
#[openapi(
    paths(sandbox_egress, group_egress),
    components(schemas(EgressEvent, EgressEvents, EgressKind, EgressVerdict))
)]
pub(in crate::http) struct Doc;

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/egress", tag = "egress",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        SandboxEgressQuery),
    responses(
        (status = 200, description = "The sandbox's audit events, oldest first", body = EgressEvents),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such sandbox (a deleted one's events are in the \
            group's audit)", body = ErrorBody)))]
async fn sandbox_egress(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
) -> Result<Json<EgressEvents>> {
    let (group, id) = path_param(params)?;
    let row = visible_sandbox(&state, &p, &group, &id).await?;
    let q: SandboxEgressQuery = query(&uri)?;
    let filter = q.filter(&row.group, Some(row.id))?;
    let items = state.store.list_egress_events(filter).await?;
    Ok(Json(EgressEvents { items }))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/egress", tag = "egress",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"), GroupEgressQuery),
    responses(
        (status = 200, description = "The group's audit events, oldest first", body = EgressEvents),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn group_egress(
    State(state): State<AppState>,
    p: Principal,
    group: std::result::Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<EgressEvents>> {
    let group = path_param(group)?;
    let g = visible_group(&state, &p, &group).await?;
    let q: GroupEgressQuery = query(&uri)?;
    let items = state.store.list_egress_events(q.filter(&g.name)?).await?;
    Ok(Json(EgressEvents { items }))
}
