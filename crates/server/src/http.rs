//! The HTTP API: routes, authentication, body parsing, and the OpenAPI document generated from
//! the handlers' annotations and the types in `api`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{
    self, ApiKey, ApiKeyList, CreateApiKey, CreatedApiKey, ErrorBody, Group, GroupList, GroupSpec,
    Health, Role,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::{self, Principal, Store};

/// Request bodies above this are refused with 413 before they are read in full.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/sandbox-groups", get(list_groups))
        .route(
            "/v1/sandbox-groups/{group}",
            get(get_group).put(put_group).delete(delete_group),
        )
        .route("/v1/api-keys", get(list_keys).post(create_key))
        .route("/v1/api-keys/{id}", axum::routing::delete(delete_key))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn not_found(uri: Uri) -> Error {
    Error::NotFound(format!(
        "no such endpoint {}; see /openapi.json",
        api::quote(uri.path())
    ))
}

async fn method_not_allowed(req: Request) -> Error {
    Error::MethodNotAllowed(format!(
        "{} is not allowed on {}; see /openapi.json",
        req.method(),
        api::quote(req.uri().path())
    ))
}

/// Counts every request by route template and status, and times it.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |m| m.as_str().to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .observe(&route, resp.status().as_u16(), start.elapsed());
    resp
}

// ---- extractors: every rejection becomes an `Error`, so it has the one error shape ----

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(Error::Unauthorized(
                "missing \"Authorization: Bearer <API key>\" header (the CLI reads MOAT_API_KEY)"
                    .to_string(),
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Error::Unauthorized(
                    "the Authorization header must be \"Bearer <API key>\"".to_string(),
                )
            })?
            .to_string();
        state
            .store
            .call(move |c| store::authenticate(c, &key))
            .await?
            .ok_or_else(|| Error::Unauthorized("invalid or deleted API key".to_string()))
    }
}

/// A JSON body parsed with our own messages (serde's say which field was wrong and which are
/// allowed). The Content-Type is not required: the body is always JSON.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::PayloadTooLarge(format!(
                    "the request body is larger than the limit of {MAX_BODY} bytes"
                ))
            } else {
                Error::BadRequest(format!("cannot read the request body: {}", e.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| Error::BadRequest(format!("invalid request body: {e}")))
    }
}

fn path_param(p: std::result::Result<Path<String>, PathRejection>) -> Result<String> {
    p.map(|Path(s)| s)
        .map_err(|e| Error::BadRequest(format!("invalid path: {}", e.body_text())))
}

fn query<T: DeserializeOwned>(uri: &Uri) -> Result<T> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| Error::BadRequest(format!("invalid query: {}", e.body_text())))
}

// ---- access rules ----

/// The same answer for "does not exist" and "exists but is not yours", so that a key learns
/// nothing about groups outside its scope.
fn no_group(name: &str) -> Error {
    Error::NotFound(format!("no sandbox group {}", api::quote(name)))
}

fn require_visible(p: &Principal, name: &str) -> Result<()> {
    if p.sees(name) {
        Ok(())
    } else {
        Err(no_group(name))
    }
}

fn require_manage(p: &Principal) -> Result<()> {
    if p.role >= Role::Owner {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "a {} key may not change sandbox groups; an owner or admin key may",
            p.role.as_str()
        )))
    }
}

fn require_admin(p: &Principal) -> Result<()> {
    if p.role == Role::Admin {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "only an admin key may manage API keys (this one is {})",
            p.role.as_str()
        )))
    }
}

// ---- handlers ----

#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "The daemon answers", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text exposition format", body = String,
        content_type = "text/plain; version=0.0.4")))]
async fn metrics(State(state): State<AppState>) -> Result<Response> {
    let (groups, keys) = state
        .store
        .call(|c| {
            let g: i64 = c.query_row("SELECT COUNT(*) FROM sandbox_groups", [], |r| r.get(0))?;
            let k: i64 = c.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
            Ok((g, k))
        })
        .await?;
    let text = state.metrics.render(&[
        (
            "moat_sandbox_groups",
            "Sandbox groups in the store.",
            groups,
        ),
        ("moat_api_keys", "API keys in the store.", keys),
    ]);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "This document (OpenAPI 3.1)")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[utoipa::path(get, path = "/v1/sandbox-groups", tag = "groups",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The groups this key may see", body = GroupList),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_groups(State(state): State<AppState>, p: Principal) -> Result<Json<GroupList>> {
    let groups = state.store.call(|c| store::list_groups(c)).await?;
    Ok(Json(GroupList {
        groups: groups.into_iter().filter(|g| p.sees(&g.name)).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}", tag = "groups",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    responses(
        (status = 200, body = Group),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "No such group, or not visible to this key", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn get_group(
    State(state): State<AppState>,
    p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Group>> {
    let name = path_param(name)?;
    api::validate_name("group name", &name)?;
    require_visible(&p, &name)?;
    let n = name.clone();
    state
        .store
        .call(move |c| store::get_group(c, &n))
        .await?
        .map(Json)
        .ok_or_else(|| no_group(&name))
}

#[utoipa::path(put, path = "/v1/sandbox-groups/{group}", tag = "groups",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name: 1–63 of [a-z0-9-], not starting or ending with '-'")),
    request_body = GroupSpec,
    responses(
        (status = 201, description = "Created", body = Group),
        (status = 200, description = "Updated (or unchanged)", body = Group),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn put_group(
    State(state): State<AppState>,
    p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
    ApiJson(spec): ApiJson<GroupSpec>,
) -> Result<Response> {
    let name = path_param(name)?;
    api::validate_name("group name", &name)?;
    require_visible(&p, &name)?;
    require_manage(&p)?;
    spec.validate()?;
    let (group, created) = state
        .store
        .call(move |c| store::put_group(c, &name, &spec))
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(group)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteGroupQuery {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/sandbox-groups/{group}", tag = "groups",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("force" = Option<bool>, Query, description = "Also delete the group's sandboxes")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The group still has sandboxes", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn delete_group(
    State(state): State<AppState>,
    p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<StatusCode> {
    let name = path_param(name)?;
    api::validate_name("group name", &name)?;
    require_visible(&p, &name)?;
    require_manage(&p)?;
    let q: DeleteGroupQuery = query(&uri)?;
    state
        .store
        .call(move |c| store::delete_group(c, &name, q.force))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys",
    security(("bearer" = [])),
    responses(
        (status = 200, body = ApiKeyList),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn list_keys(State(state): State<AppState>, p: Principal) -> Result<Json<ApiKeyList>> {
    require_admin(&p)?;
    let api_keys = state.store.call(|c| store::list_keys(c)).await?;
    Ok(Json(ApiKeyList { api_keys }))
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys",
    security(("bearer" = [])),
    request_body = CreateApiKey,
    responses(
        (status = 201, description = "Created; `key` is shown only in this answer", body = CreatedApiKey),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn create_key(
    State(state): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<CreateApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>)> {
    require_admin(&p)?;
    req.validate()?;
    let created = state
        .store
        .call(move |c| store::create_key(c, &req))
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
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
    state.store.call(move |c| store::delete_key(c, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "moat", description = "moatd: sandbox groups and API keys. Errors are always \
        {\"error\": {\"code\", \"message\"}}."),
    paths(healthz, metrics, openapi, list_groups, get_group, put_group, delete_group,
        list_keys, create_key, delete_key),
    components(schemas(ErrorBody, Group, GroupList, GroupSpec, ApiKey, ApiKeyList, CreateApiKey,
        CreatedApiKey, Health)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key: moat_ + 43 base62 characters"))
                    .build(),
            ),
        );
    }
}
