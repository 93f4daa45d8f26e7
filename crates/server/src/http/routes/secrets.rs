//! `/v1/sandbox-groups/{group}/secrets[/{name}]`: a group's secrets, the values its egress
//! transforms inject (`${secret:NAME}`). Owner and admin keys set and delete them; any key
//! that sees the group lists their names and times. No endpoint ever returns a value. A set
//! or delete reaches the group's running sandboxes' network stacks before the answer: a
//! deleted secret's requests are refused from then on (fail closed).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::{self, ErrorBody, SecretInfo, SecretList, SetSecret};
use crate::error::{Error, Result};
use crate::http::access::{require_manage, visible_group};
use crate::http::extract::{path_param, ApiJson};
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/sandbox-groups/{group}/secrets", get(list_secrets))
        .route(
            "/v1/sandbox-groups/{group}/secrets/{name}",
            put(put_secret).delete(delete_secret),
        )
}

#[derive(OpenApi)]
#[openapi(
    paths(list_secrets, put_secret, delete_secret),
    components(schemas(SetSecret, SecretInfo, SecretList))
)]
pub(in crate::http) struct Doc;

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/secrets", tag = "secrets",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    responses(
        (status = 200, description = "The group's secrets by name: names and times only",
            body = SecretList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn list_secrets(
    State(state): State<AppState>,
    p: Principal,
    group: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<SecretList>> {
    let group = path_param(group)?;
    let g = visible_group(&state, &p, &group).await?;
    let secrets = state.store.list_secrets(&g.name).await?;
    Ok(Json(SecretList { secrets }))
}

#[utoipa::path(put, path = "/v1/sandbox-groups/{group}/secrets/{name}", tag = "secrets",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("name" = String, Path, description = "Secret name: 1–63 of [a-z0-9_-], starting \
            with a letter or digit")),
    request_body = SetSecret,
    responses(
        (status = 201, description = "Created (the answer never holds the value)", body = SecretInfo),
        (status = 200, description = "Replaced; the group's running sandboxes use the new \
            value before this answer", body = SecretInfo),
        (status = 400, description = "A bad name or value", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an owner or admin key", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The group has 64 secrets already", body = ErrorBody),
        (status = 413, body = ErrorBody)))]
async fn put_secret(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    ApiJson(req): ApiJson<SetSecret>,
) -> Result<Response> {
    let (group, name) = path_param(params)?;
    let g = visible_group(&state, &p, &group).await?;
    require_manage(&p)?;
    api::validate_secret_name(&name)?;
    let value = req.into_secret()?;
    let (info, created) = state.store.put_secret(&g.name, &name, value).await?;
    if let Some(mgr) = state.sandboxes.ready() {
        mgr.update_egress(&g.name).await;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)).into_response())
}

#[utoipa::path(delete, path = "/v1/sandbox-groups/{group}/secrets/{name}", tag = "secrets",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("name" = String, Path, description = "Secret name")),
    responses(
        (status = 204, description = "Deleted; the group's running sandboxes' requests that \
            need it are refused from before this answer"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such group or secret", body = ErrorBody)))]
async fn delete_secret(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode> {
    let (group, name) = path_param(params)?;
    let g = visible_group(&state, &p, &group).await?;
    require_manage(&p)?;
    api::validate_secret_name(&name)?;
    if !state.store.delete_secret(&g.name, &name).await? {
        return Err(Error::NotFound(format!(
            "group {} has no secret {}",
            api::quote(&g.name),
            api::quote(&name)
        )));
    }
    if let Some(mgr) = state.sandboxes.ready() {
        mgr.update_egress(&g.name).await;
    }
    Ok(StatusCode::NO_CONTENT)
}
