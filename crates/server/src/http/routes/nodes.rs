//! The nodes sharing this daemon's store (docs/FLEET.md): list and show (any key), drain and
//! undrain (admin keys); and the one secret they share, the sealing key, rotated (admin).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::{
    self, DiskSync, DrainFailure, DrainMove, DrainProgress, ErrorBody, Node, NodeCapacity,
    NodeList, NodeState, NodeUse, Role, SealingKeyRotation,
};
use crate::error::{Error, Result};
use crate::http::extract::path_param;
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", get(get_node))
        .route("/v1/nodes/{node}/drain", post(drain_node))
        .route("/v1/nodes/{node}/undrain", post(undrain_node))
        .route("/v1/sealing-key/rotate", post(rotate_sealing_key))
}

#[derive(OpenApi)]
#[openapi(
    paths(list_nodes, get_node, drain_node, undrain_node, rotate_sealing_key),
    components(schemas(
        Node,
        NodeList,
        NodeState,
        NodeCapacity,
        NodeUse,
        DrainProgress,
        DrainMove,
        DiskSync,
        DrainFailure,
        SealingKeyRotation
    ))
)]
pub(in crate::http) struct Doc;

fn no_node(name: &str) -> Error {
    Error::NotFound(format!("no node {}", api::quote(name)))
}

#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every node of the store, by name", body = NodeList),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_nodes(State(state): State<AppState>, _p: Principal) -> Result<Json<NodeList>> {
    Ok(Json(NodeList {
        nodes: state.store.list_nodes().await?,
    }))
}

#[utoipa::path(get, path = "/v1/nodes/{node}", tag = "nodes",
    security(("bearer" = [])),
    params(("node" = String, Path, description = "Node name")),
    responses(
        (status = 200, body = Node),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn get_node(
    State(state): State<AppState>,
    _p: Principal,
    params: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Node>> {
    let name = path_param(params)?;
    api::validate_name("node name", &name)?;
    state
        .store
        .get_node(&name)
        .await?
        .map(Json)
        .ok_or_else(|| no_node(&name))
}

fn require_node_admin(p: &Principal) -> Result<()> {
    if p.role == Role::Admin {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "only an admin key may drain or undrain nodes (this one is {})",
            p.role.as_str()
        )))
    }
}

async fn set_draining(
    state: &AppState,
    p: &Principal,
    params: std::result::Result<Path<String>, PathRejection>,
    draining: bool,
) -> Result<Json<Node>> {
    let name = path_param(params)?;
    api::validate_name("node name", &name)?;
    require_node_admin(p)?;
    let node = state
        .store
        .set_node_draining(&name, draining)
        .await?
        .ok_or_else(|| no_node(&name))?;
    tracing::info!(node = %name, draining, "node drain changed");
    Ok(Json(node))
}

#[utoipa::path(post, path = "/v1/nodes/{node}/drain", tag = "nodes",
    security(("bearer" = [])),
    params(("node" = String, Path, description = "Node name")),
    responses(
        (status = 200, description = "Draining (or it already was): it takes no new \
            sandboxes and moves its running ones to other ready nodes by live migration, one \
            at a time (see `drain` of the node)", body = Node),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn drain_node(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Node>> {
    set_draining(&state, &p, params, true).await
}

#[utoipa::path(post, path = "/v1/nodes/{node}/undrain", tag = "nodes",
    security(("bearer" = [])),
    params(("node" = String, Path, description = "Node name")),
    responses(
        (status = 200, description = "Ready again (or it already was); a lost node stays \
            lost until it takes its lease again", body = Node),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn undrain_node(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Node>> {
    set_draining(&state, &p, params, false).await
}

#[utoipa::path(post, path = "/v1/sealing-key/rotate", tag = "nodes",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every group secret and identity signing key is sealed \
            with the key each node holds as `MOAT_HOME/secrets.key.next`; this node uses it \
            now, the others from their next lease renewal", body = SealingKeyRotation),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "This node has no next key, or a node that is not lost \
            does not hold the same one (named), or the store was rotated already",
            body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn rotate_sealing_key(
    State(state): State<AppState>,
    p: Principal,
) -> Result<Json<SealingKeyRotation>> {
    if p.role != Role::Admin {
        return Err(Error::Forbidden(format!(
            "only an admin key may rotate the sealing key (this one is {})",
            p.role.as_str()
        )));
    }
    let done = state.store.rotate_sealing_key().await?;
    tracing::warn!(key = %done.key_id, previous = %done.previous_key_id,
        secrets = done.secrets, signing_keys = done.signing_keys, "sealing key rotated");
    Ok(Json(done))
}
