//! Workload identity over HTTP: the issuer documents relying parties fetch
//! (`/.well-known/openid-configuration`, `/.well-known/jwks.json`: unauthenticated, cacheable),
//! the signing keys (admin: list, rotate), a token for one sandbox (owner and admin keys only:
//! debugging a federation setup), and a group's identity audit.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::Role;
use crate::api::{
    ErrorBody, IdentityDelivery, IdentityEvent, IdentityEvents, IdentityEventsQuery, IdentityKey,
    IdentityKeys, IdentityOutcome, IdentitySpec, IdentitySubject, IdentityToken, Jwk, Jwks,
    KeyState, OpenIdConfiguration, TokenRequest,
};
use crate::error::Error;
use crate::error::Result;
use crate::http::access::{require_manage, visible_group, visible_sandbox};
use crate::http::extract::{path_param, query, ApiJson};
use crate::http::state::AppState;
use crate::identity::{MintRequest, CACHE_CONTROL};
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/.well-known/jwks.json", get(jwks))
        .route("/v1/identity/keys", get(list_signing_keys))
        .route("/v1/identity/keys/rotate", post(rotate_signing_keys))
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/identity/token",
            post(mint_identity_token),
        )
        .route(
            "/v1/sandbox-groups/{group}/identity/events",
            get(identity_events),
        )
}

#[derive(OpenApi)]
#[openapi(
    paths(
        openid_configuration,
        jwks,
        list_signing_keys,
        rotate_signing_keys,
        mint_identity_token,
        identity_events
    ),
    components(schemas(
        IdentitySpec,
        IdentitySubject,
        TokenRequest,
        IdentityToken,
        IdentityEvent,
        IdentityEvents,
        IdentityOutcome,
        IdentityDelivery,
        IdentityKey,
        IdentityKeys,
        KeyState,
        Jwk,
        Jwks,
        OpenIdConfiguration
    ))
)]
pub(in crate::http) struct Doc;

/// The signing keys serve every group: only an admin key may see or rotate them.
fn require_key_admin(p: &Principal) -> Result<()> {
    if p.role == Role::Admin {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "only an admin key may manage the identity signing keys (this one is {})",
            p.role.as_str()
        )))
    }
}

fn cacheable<T: serde::Serialize>(body: T) -> Response {
    ([(header::CACHE_CONTROL, CACHE_CONTROL)], Json(body)).into_response()
}

#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "identity",
    responses((status = 200, description = "OIDC discovery of this daemon's issuer \
        (unauthenticated, Cache-Control: public, max-age=300)", body = OpenIdConfiguration)))]
async fn openid_configuration(State(state): State<AppState>) -> Response {
    cacheable(state.identity.discovery())
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "identity",
    responses((status = 200, description = "The issuer's public keys: the pending one, the \
        active one and retired ones until their tokens expired (unauthenticated, cacheable)",
        body = Jwks)))]
async fn jwks(State(state): State<AppState>) -> Response {
    cacheable(state.identity.jwks())
}

#[utoipa::path(get, path = "/v1/identity/keys", tag = "identity",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The signing keys and their states", body = IdentityKeys),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody)))]
async fn list_signing_keys(
    State(state): State<AppState>,
    p: Principal,
) -> Result<Json<IdentityKeys>> {
    require_key_admin(&p)?;
    Ok(Json(state.identity.keys()))
}

#[utoipa::path(post, path = "/v1/identity/keys/rotate", tag = "identity",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Rotated: the pending key signs, the active one retired, a \
            new pending key is published", body = IdentityKeys),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody)))]
async fn rotate_signing_keys(
    State(state): State<AppState>,
    p: Principal,
) -> Result<Json<IdentityKeys>> {
    require_key_admin(&p)?;
    Ok(Json(state.identity.rotate().await?))
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/identity/token",
    tag = "identity", security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    request_body = TokenRequest,
    responses(
        (status = 200, description = "A token for the sandbox (audited without its value)",
            body = IdentityToken),
        (status = 400, description = "A bad audience or ttl_s", body = ErrorBody),
        (status = 422, description = "A ttl_s above the group's identity.ttl_s",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an owner or admin key, identity not enabled, or an \
            audience the group does not allow", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody)))]
async fn mint_identity_token(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Json<IdentityToken>> {
    let (group, id) = path_param(params)?;
    let row = visible_sandbox(&state, &p, &group, &id).await?;
    // Anyone holding the token acts as the group's identity: users may run code that could
    // fetch one in the guest if the group allows it, but handing one out is an owner's call.
    require_manage(&p)?;
    let token = state
        .identity
        .mint(MintRequest {
            group: row.group,
            sandbox: row.id,
            audience: req.audience,
            ttl_s: req.ttl_s,
            delivery: IdentityDelivery::Api,
            key_id: Some(p.key_id),
        })
        .await?;
    Ok(Json(token))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/identity/events", tag = "identity",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"), IdentityEventsQuery),
    responses(
        (status = 200, description = "Mints and refusals, oldest first (never a token)",
            body = IdentityEvents),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn identity_events(
    State(state): State<AppState>,
    p: Principal,
    group: std::result::Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<IdentityEvents>> {
    let group = path_param(group)?;
    let g = visible_group(&state, &p, &group).await?;
    let q: IdentityEventsQuery = query(&uri)?;
    let limit = q.limit()?;
    let items = state
        .store
        .list_identity_events(&g.name, q.sandbox, q.after, limit)
        .await?;
    Ok(Json(IdentityEvents { items }))
}
