//! `/v1/api-keys[/{id}[/rotate]]`: list, create, show, rotate and delete API keys (admin keys
//! only).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::{
    ApiKey, ApiKeyList, CreateApiKey, CreatedApiKey, ErrorBody, RateLimit, RotateApiKey,
};
use crate::error::Result;
use crate::http::access::require_admin;
use crate::http::extract::{path_param, ApiJson};
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/api-keys", get(list_keys).post(create_key))
        .route("/v1/api-keys/{id}", get(get_key).delete(delete_key))
        .route("/v1/api-keys/{id}/rotate", post(rotate_key))
}

#[derive(OpenApi)]
#[openapi(
    paths(list_keys, create_key, get_key, rotate_key, delete_key),
    components(schemas(
        ApiKey,
        ApiKeyList,
        CreateApiKey,
        CreatedApiKey,
        RateLimit,
        RotateApiKey
    ))
)]
pub(in crate::http) struct Doc;

#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys",
    security(("bearer" = [])),
    responses(
        (status = 200, body = ApiKeyList),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn list_keys(State(state): State<AppState>, p: Principal) -> Result<Json<ApiKeyList>> {
    require_admin(&p)?;
    let api_keys = state.store.list_keys().await?;
    Ok(Json(ApiKeyList { api_keys }))
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys",
    security(("bearer" = [])),
    request_body = CreateApiKey,
    responses(
        (status = 201, description = "Created; `key` is shown only in this answer", body = CreatedApiKey),
        (status = 400, body = ErrorBody), (status = 422, description = "An admin key with groups, or another role without",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn create_key(
    State(state): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>)> {
    require_admin(&p)?;
    req.validate()?;
    let created = state.store.create_key(&req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/v1/api-keys/{id}", tag = "api-keys",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Key id (not the secret)")),
    responses(
        (status = 200, body = ApiKey),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn get_key(
    State(state): State<AppState>,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<ApiKey>> {
    let id = path_param(id)?;
    require_admin(&p)?;
    Ok(Json(state.store.get_key(&id).await?))
}

#[utoipa::path(post, path = "/v1/api-keys/{id}/rotate", tag = "api-keys",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Key id (not the secret)")),
    request_body = RotateApiKey,
    responses(
        (status = 200, description = "The new secret, shown only in this answer; the old \
            one stopped working when this answer was sent (no overlap: to switch without a \
            gap, create a second key, move to it, then delete the first)", body = CreatedApiKey),
        (status = 400, description = "A bad expiry, or none for a key that has expired", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn rotate_key(
    State(state): State<AppState>,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<RotateApiKey>,
) -> Result<Json<CreatedApiKey>> {
    let id = path_param(id)?;
    require_admin(&p)?;
    Ok(Json(state.store.rotate_key(&id, &req).await?))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "api-keys",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Key id (not the secret)")),
    responses(
        (status = 204, description = "Deleted; the key stops working at once"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The last admin key", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn delete_key(
    State(state): State<AppState>,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<StatusCode> {
    let id = path_param(id)?;
    require_admin(&p)?;
    state.store.delete_key(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
