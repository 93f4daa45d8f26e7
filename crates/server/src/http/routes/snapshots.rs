//! `POST …/sandboxes/{id}/snapshots` (take one) and `/v1/sandbox-groups/{group}/snapshots`
//! (list, read, delete). How a snapshot is taken and kept is `crate::snapshots`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::{self, CreateSnapshot, ErrorBody, Snapshot, SnapshotList};
use crate::error::Result;
use crate::http::access::{local_sandbox, require_use, visible_group, visible_snapshot};
use crate::http::extract::{path_param, ApiJson};
use crate::http::state::AppState;
use crate::snapshots;
use crate::store::{Files, Principal};

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/snapshots",
            post(create_snapshot),
        )
        .route("/v1/sandbox-groups/{group}/snapshots", get(list_snapshots))
        .route(
            "/v1/sandbox-groups/{group}/snapshots/{name}",
            get(get_snapshot).delete(delete_snapshot),
        )
}

#[derive(OpenApi)]
#[openapi(
    paths(create_snapshot, list_snapshots, get_snapshot, delete_snapshot),
    components(schemas(CreateSnapshot, Snapshot, SnapshotList))
)]
pub(in crate::http) struct Doc;

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/snapshots", tag = "snapshots",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    request_body = CreateSnapshot,
    responses(
        (status = 421, body = ErrorBody),
        (status = 201, description = "Taken; the sandbox runs on (a suspended one is resumed \
            first)", body = Snapshot),
        (status = 400, description = "Bad name", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The name is taken in the group, or the sandbox is not \
            running or suspended", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create_snapshot(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    ApiJson(req): ApiJson<CreateSnapshot>,
) -> Result<(StatusCode, Json<Snapshot>)> {
    let (group, id) = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    api::validate_name("snapshot name", &req.name)?;
    let snap = state.manager()?.snapshot(&row, &req.name).await?;
    Ok((StatusCode::CREATED, Json(snap)))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/snapshots", tag = "snapshots",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    responses(
        (status = 200, description = "The group's snapshots, oldest first", body = SnapshotList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_snapshots(
    State(state): State<AppState>,
    p: Principal,
    group: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<SnapshotList>> {
    let group = path_param(group)?;
    visible_group(&state, &p, &group).await?;
    let snapshots = state.store.list_snapshots(Some(&group)).await?;
    Ok(Json(SnapshotList { snapshots }))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/snapshots/{name}", tag = "snapshots",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("name" = String, Path, description = "Snapshot name")),
    responses(
        (status = 200, body = Snapshot),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn get_snapshot(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Snapshot>> {
    let (group, name) = path_param(params)?;
    visible_snapshot(&state, &p, &group, &name).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/sandbox-groups/{group}/snapshots/{name}", tag = "snapshots",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("name" = String, Path, description = "Snapshot name")),
    responses(
        (status = 204, description = "Deleted; its forks are not affected"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn delete_snapshot(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode> {
    let (group, name) = path_param(params)?;
    let snap = visible_snapshot(&state, &p, &group, &name).await?;
    require_use(&p)?;
    let mgr = state.manager()?;
    let files = state.store.snapshot_files(&snap.group, &snap.name).await?;
    let home = mgr.files_home(files.map_or(Files::Local, |(f, _)| f));
    state.store.delete_snapshot(&snap.group, &snap.name).await?;
    // The row is gone first: a crash now leaves a directory that the next start removes.
    snapshots::remove(home, &snap.group, &snap.name).await?;
    Ok(StatusCode::NO_CONTENT)
}
