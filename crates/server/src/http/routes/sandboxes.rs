//! `/v1/sandbox-groups/{group}/sandboxes[/{id}]`: create (from the image or as forks of a
//! snapshot), list, read and delete sandboxes, and suspend and resume them.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::api::{self, CreateSandbox, Created, ErrorBody, Sandbox, SandboxList};
use crate::error::{Error, Result};
use crate::http::access::{
    local_sandbox, require_use, shown_to, visible_group, visible_sandbox, visible_snapshot,
};
use crate::http::extract::{path_param, query, ApiJson};
use crate::http::state::AppState;
use crate::http::{forward, place};
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/sandbox-groups/{group}/sandboxes",
            get(list_sandboxes).post(create_sandbox),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/suspend",
            post(suspend_sandbox),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/resume",
            post(resume_sandbox),
        )
}

#[derive(OpenApi)]
#[openapi(
    paths(
        create_sandbox,
        list_sandboxes,
        get_sandbox,
        delete_sandbox,
        suspend_sandbox,
        resume_sandbox
    ),
    components(schemas(
        Sandbox,
        SandboxList,
        api::SandboxState,
        api::SandboxHealth,
        api::AgentHealth,
        CreateSandbox,
        Created
    ))
)]
pub(in crate::http) struct Doc;

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    request_body = CreateSandbox,
    responses(
        (status = 201, description = "Created and running: one Sandbox, or with `count` \
            `{\"sandboxes\": [Sandbox, …]}`", body = Created),
        (status = 400, body = ErrorBody), (status = 422, description = "`from_snapshot` with `image` or `tier`, `count` without \
            `from_snapshot`, or an image this daemon does not have",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such group, or no such snapshot in it", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 429, description = "No node the group may run on has room for it (memory \
            or vCPUs); the message says what it needs and what is free", body = ErrorBody),
        (status = 500, body = ErrorBody),
        (status = 502, description = "The node it was placed on could not be reached, nor \
            any other", body = ErrorBody),
        (status = 503, description = "Sandboxes cannot run yet, the store is unreachable, or \
            no node may take it: none has the group's `placement.node_labels`, or those that \
            have are draining or lost (the message names each), or the node it was placed \
            on could not pull its image by digest, or `from_snapshot` names a snapshot whose \
            files this node cannot read (on another node's disk, or on shared storage this \
            node lacks)",
            body = ErrorBody)))]
async fn create_sandbox(
    State(state): State<AppState>,
    p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<Response> {
    let name = path_param(name)?;
    let group = visible_group(&state, &p, &name).await?;
    require_use(&p)?;
    req.validate()?;
    // Forks start from a snapshot in this node's home, and a create another node placed here
    // is never placed again.
    let placed = req.from_snapshot.is_some() || headers.contains_key(forward::FORWARDED_BY);
    let me = state.store.node_name();
    let (Some(me), false) = (me, placed) else {
        return create_here(&state, &p, &group, req).await;
    };
    let mut last = None;
    let tier = req.tier.unwrap_or(group.spec.tier);
    let (targets, first) = place::targets(&state, &group, &req, &me).await?;
    let mut first = Some(first);
    for target in targets {
        // Counted as placing there until its answer came (the first one already is).
        let _placing = first.take().unwrap_or_else(|| {
            let node = target.as_ref().map_or(me.as_str(), |n| n.name.as_str());
            state.store.placing(node, tier)
        });
        let (answer, refused) = match target {
            None => match create_here(&state, &p, &group, req.clone()).await {
                Err(e) if place::refusal(e.status_and_code().0) => (e.into_response(), true),
                done => return done,
            },
            Some(node) => {
                let answer = place::forward(&state, &me, &node, &name, &uri, &headers, &req).await;
                let refused = place::refusal(answer.status());
                (answer, refused)
            }
        };
        if !refused {
            return Ok(answer);
        }
        last = Some(answer);
    }
    last.ok_or_else(|| Error::Internal("placement gave no node to try".into()))
}

/// Creates the sandbox (or the snapshot's forks) on this node.
async fn create_here(
    state: &AppState,
    p: &Principal,
    group: &api::Group,
    req: CreateSandbox,
) -> Result<Response> {
    if state.store.draining().await? {
        return Err(Error::Unavailable(format!(
            "node {} is draining: it takes no new sandboxes (create them through another node, \
             GET /v1/nodes, or undrain it: moat node undrain)",
            state.store.node_name().unwrap_or_default()
        )));
    }
    let mgr = state.manager()?;
    let Some(from) = req.from_snapshot.clone() else {
        let sb = mgr.create(group, req).await?;
        let body = Created::One(Box::new(shown_to(state, p, sb)));
        return Ok((StatusCode::CREATED, Json(body)).into_response());
    };
    let name = &group.name;
    let snap = visible_snapshot(state, p, name, &from).await?;
    let dir = mgr.snapshot_dir(name, &from).await?;
    let many = req.count.is_some();
    let mut forks: Vec<Sandbox> = mgr
        .fork(group, &snap, dir, req)
        .await?
        .into_iter()
        .map(|sb| shown_to(state, p, sb))
        .collect();
    let body = match forks.pop() {
        Some(one) if !many => Created::One(Box::new(one)),
        last => Created::Many(SandboxList {
            sandboxes: forks.into_iter().chain(last).collect(),
        }),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListSandboxesQuery {
    /// Label selector: key=value[,key=value…]; every pair must match (`key=` matches an
    /// empty value).
    #[param(schema_with = api::selector_schema)]
    labels: Option<String>,
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"), ListSandboxesQuery),
    responses(
        (status = 200, body = SandboxList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_sandboxes(
    State(state): State<AppState>,
    p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<SandboxList>> {
    let name = path_param(name)?;
    let q: ListSandboxesQuery = query(&uri)?;
    let selector = api::parse_selector(q.labels.as_deref().unwrap_or(""))?;
    visible_group(&state, &p, &name).await?;
    let rows = state.store.list_sandboxes(Some(&name)).await?;
    Ok(Json(SandboxList {
        sandboxes: rows
            .into_iter()
            .filter(|s| crate::sandboxes::matches(&s.labels, &selector))
            .map(|s| shown_to(&state, &p, s))
            .collect(),
    }))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, body = Sandbox),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn get_sandbox(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Sandbox>> {
    let (group, id) = path_param(params)?;
    let sb = visible_sandbox(&state, &p, &group, &id).await?;
    Ok(Json(shown_to(&state, &p, sb)))
}

#[utoipa::path(delete, path = "/v1/sandbox-groups/{group}/sandboxes/{id}", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 204, description = "Its VM is destroyed and its row removed"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn delete_sandbox(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode> {
    let (group, id) = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    state.manager()?.delete(&row.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/suspend", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 200, description = "Suspended (or it was already): its VM has ended, its \
            memory and disk are saved", body = Sandbox),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The sandbox is creating, deleting or failed", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn suspend_sandbox(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Sandbox>> {
    let (group, id) = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    state.manager()?.suspend(&row.id).await.map(Json)
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/resume", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 200, description = "Running again (or it already was), processes and files \
            as they were", body = Sandbox),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, description = "The host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is creating, deleting or failed, or another \
            node took it over first", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, description = "The sandbox is \
            suspended on a lost node and its files are on that node's disk (the message says \
            so), or this node has no --shared-dir to take it over", body = ErrorBody)))]
async fn resume_sandbox(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Sandbox>> {
    let (group, id) = path_param(params)?;
    let seen = visible_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let mgr = state.manager()?;
    // A suspended sandbox of a lost node moves here when its files are on shared storage.
    let row = match mgr.take_over_for_resume(&seen).await? {
        Some(row) => row,
        None => local_sandbox(&state, &p, &group, &id).await?,
    };
    let sb = mgr.resume(&row.id).await?;
    Ok(Json(shown_to(&state, &p, sb)))
}
