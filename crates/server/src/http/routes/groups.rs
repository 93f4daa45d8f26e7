//! `/v1/sandbox-groups[/{group}]`: list, read, create or update (PUT) and delete groups.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::api::{self, ErrorBody, Group, GroupList, GroupSpec};
use crate::error::{Error, Result};
use crate::http::access::{no_group, require_manage, require_visible};
use crate::http::extract::{path_param, query, ApiJson};
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/sandbox-groups", get(list_groups))
        .route(
            "/v1/sandbox-groups/{group}",
            get(get_group).put(put_group).delete(delete_group),
        )
}

#[derive(OpenApi)]
#[openapi(
    paths(list_groups, get_group, put_group, delete_group),
    components(schemas(Group, api::GroupStatus, GroupList, GroupSpec))
)]
pub(in crate::http) struct Doc;

#[utoipa::path(get, path = "/v1/sandbox-groups", tag = "groups",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The groups this key may see", body = GroupList),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_groups(State(state): State<AppState>, p: Principal) -> Result<Json<GroupList>> {
    let groups = state.store.list_groups().await?;
    Ok(Json(GroupList {
        groups: groups
            .into_iter()
            .filter(|g| p.sees(&g.name))
            .map(|g| with_status(&state, g))
            .collect(),
    }))
}

/// `group` with its live status filled in.
fn with_status(state: &AppState, mut group: Group) -> Group {
    if let Some(mgr) = state.sandboxes.ready() {
        group.status.pool_ready = mgr.pool_ready_in(&group.name) as u32;
    }
    group
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
    state
        .store
        .get_group(&name)
        .await?
        .map(|g| Json(with_status(&state, g)))
        .ok_or_else(|| no_group(&name))
}

#[utoipa::path(put, path = "/v1/sandbox-groups/{group}", tag = "groups",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name: 1–63 of [a-z0-9-], not starting or ending with '-'")),
    request_body = GroupSpec,
    responses(
        (status = 201, description = "Created", body = Group),
        (status = 200, description = "Updated (or unchanged); the group's running sandboxes \
            apply its egress policy before this answer", body = Group),
        (status = 400, body = ErrorBody), (status = 422, description = "The egress policy breaks a rule of the network stack, or a \
            transform names a secret the group does not have or an identity audience it does \
            not allow (the message names the rule and the field)",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
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
    check_placeholders(&state, &name, &spec).await?;
    let (group, created) = state.store.put_group(&name, &spec).await?;
    // The pool grows, shrinks or is rebuilt for a new image or tier in the background; the
    // running sandboxes' stacks have the new egress policy before the answer.
    if let Some(mgr) = state.sandboxes.ready() {
        mgr.refill(&group.name);
        mgr.update_egress(&group.name).await;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(with_status(&state, group))).into_response())
}

/// Every `${secret:NAME}` of the egress transforms names a secret the group has, and no
/// `${identity:…}` is used yet. A secret deleted later is not checked here: the stacks then
/// refuse the requests that need it.
async fn check_placeholders(state: &AppState, group: &str, spec: &GroupSpec) -> Result<()> {
    let policy = moat_net::Policy::new(spec.egress.clone())
        .map_err(|e| Error::Unprocessable(e.to_string()))?;
    let uses = policy.placeholders();
    if uses.is_empty() {
        return Ok(());
    }
    // Identity placeholders are checked against the spec itself; secrets against the store.
    let have = state.store.list_secrets(group).await?;
    for (field, p) in uses {
        match &p {
            moat_net::transform::Placeholder::Identity(aud) => {
                let id = &spec.identity;
                if !id.enabled || !id.audiences.iter().any(|a| a == aud) {
                    return Err(Error::Unprocessable(format!(
                        "{field} uses {p}, but the group's identity does not allow audience \
                         {}: set identity.enabled and list it in identity.audiences",
                        api::quote(aud)
                    )));
                }
            }
            moat_net::transform::Placeholder::Secret(n) => {
                if !have.iter().any(|s| s.name == *n) {
                    return Err(Error::Unprocessable(format!(
                        "{field} uses {p}, but group {} has no secret {}: set it first \
                         (PUT /v1/sandbox-groups/{group}/secrets/{n}; a new group needs \
                         creating without the transform first)",
                        api::quote(group),
                        api::quote(n)
                    )));
                }
            }
        }
    }
    Ok(())
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
        ("force" = Option<bool>, Query, description = "Also delete the group's sandboxes and \
            snapshots")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The group still has sandboxes or snapshots", body = ErrorBody),
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
    if q.force {
        // This node's VMs go first; the store then deletes every row with the group, and the
        // other nodes end their VMs whose rows are gone at their next lease renewal.
        if let Some(mgr) = state.sandboxes.ready() {
            let me = state.store.node_name();
            let rows = state.store.list_sandboxes(Some(&name)).await?;
            for row in rows.into_iter().filter(|r| r.node == me) {
                mgr.delete(&row.id).await?;
            }
        }
    }
    state.store.delete_group(&name, q.force).await?;
    if let Some(mgr) = state.sandboxes.ready() {
        mgr.remove_group_ca(&name);
    }
    // Its pool's rows went with it; its VMs and its snapshots go now.
    if let Some(mgr) = state.sandboxes.ready() {
        mgr.drain_pool(&name).await;
        let homes = mgr.snapshot_homes();
        tokio::task::spawn_blocking(move || {
            for home in homes {
                crate::snapshots::remove_group_dirs(&home, &name);
            }
        })
        .await
        .map_err(Error::task("removing the group's snapshots"))?;
    }
    Ok(StatusCode::NO_CONTENT)
}
