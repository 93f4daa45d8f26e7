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
    self, ApiKey, ApiKeyList, CreateApiKey, CreateSandbox, Created, CreatedApiKey, ErrorBody,
    ExecEvent, ExecExit, ExecRequest, ExecResult, Group, GroupList, GroupSpec, Health, Role,
    Sandbox, SandboxList, SandboxState,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::sandboxes::Manager;
use crate::store::{self, Principal, Store};

/// Request bodies above this are refused with 413 before they are read in full.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// The sandbox manager, or why this daemon has none yet (being prepared, failed, no
    /// agent): the group and key routes still work, the sandbox routes answer 503 with why.
    pub sandboxes: Arc<crate::readiness::Sandboxes>,
    /// Image imports in progress.
    pub operations: Arc<crate::images::Operations>,
}

impl AppState {
    pub(crate) fn manager(&self) -> Result<Arc<Manager>> {
        self.sandboxes.manager()
    }
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
        .route(
            "/v1/sandbox-groups/{group}/sandboxes",
            get(list_sandboxes).post(create_sandbox),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/exec",
            axum::routing::post(exec_sandbox),
        )
        // Uploads stream to the guest and are not bounded by MAX_BODY.
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/files",
            get(crate::files::get_file)
                .put(crate::files::put_file)
                .delete(crate::files::delete_file)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/files/list",
            get(crate::files::list_files),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/processes",
            get(crate::procs::list_processes).post(crate::procs::start_process),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/kill",
            axum::routing::post(crate::procs::kill_process),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/wait",
            axum::routing::post(crate::procs::wait_process),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/logs",
            get(crate::procs::process_logs),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/shell",
            get(crate::shell::shell),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/suspend",
            axum::routing::post(suspend_sandbox),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/resume",
            axum::routing::post(resume_sandbox),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/snapshots",
            axum::routing::post(crate::snapshots::create_snapshot),
        )
        .route(
            "/v1/sandbox-groups/{group}/snapshots",
            get(crate::snapshots::list_snapshots),
        )
        .route(
            "/v1/sandbox-groups/{group}/snapshots/{name}",
            get(crate::snapshots::get_snapshot).delete(crate::snapshots::delete_snapshot),
        )
        .route(
            "/v1/images",
            get(crate::images::list_images).post(crate::images::import_image),
        )
        .route(
            "/v1/images/{name}",
            get(crate::images::get_image).delete(crate::images::delete_image),
        )
        .route("/v1/operations/{id}", get(crate::images::get_operation))
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

pub(crate) fn query<T: DeserializeOwned>(uri: &Uri) -> Result<T> {
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

pub(crate) fn require_use(p: &Principal) -> Result<()> {
    if p.role >= Role::User {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "a {} key may only read sandboxes; a user, owner or admin key may create, use and \
             delete them",
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
    responses((status = 200, description = "The daemon answers; `sandboxes` says whether \
        sandboxes can run yet", body = Health)))]
async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        sandboxes: state.sandboxes.health(),
    })
}

#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text exposition format", body = String,
        content_type = "text/plain; version=0.0.4")))]
async fn metrics(State(state): State<AppState>) -> Result<Response> {
    let (groups, keys, by_state) = state
        .store
        .call(|c| {
            let g: i64 = c.query_row("SELECT COUNT(*) FROM sandbox_groups", [], |r| r.get(0))?;
            let k: i64 = c.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
            let mut stmt =
                c.prepare_cached("SELECT state, COUNT(*) FROM sandboxes GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let by_state = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((g, k, by_state))
        })
        .await?;
    let one = |v: i64| vec![(vec![], v as f64)];
    // Every state, zero included, so that a dashboard's series exist from the start.
    let states = SandboxState::ALL
        .iter()
        .map(|s| {
            let n = by_state
                .iter()
                .find(|(name, _)| name == s.as_str())
                .map_or(0, |(_, n)| *n);
            (vec![("state", s.as_str().to_string())], n as f64)
        })
        .collect();
    let mut gauges: Vec<crate::metrics::Gauge<'_>> = vec![
        (
            "moat_sandbox_groups",
            "Sandbox groups in the store.",
            one(groups),
        ),
        ("moat_api_keys", "API keys in the store.", one(keys)),
        ("moat_sandboxes", "Sandboxes by state.", states),
    ];
    if let Some(mgr) = state.sandboxes.ready() {
        let pools = mgr
            .pool_ready()
            .into_iter()
            .map(|(g, n)| (vec![("group", g)], n as f64))
            .collect();
        gauges.push((
            "moat_pool_ready",
            "Ready VMs in each group's warm pool.",
            pools,
        ));
        let u = mgr.usage();
        gauges.push((
            "moat_memory_mib",
            "Memory held by running, starting and pooled VMs (used), and the daemon's limit.",
            vec![
                (vec![("kind", "used".to_string())], u.memory_mib as f64),
                (
                    vec![("kind", "limit".to_string())],
                    u.limits.memory_mib as f64,
                ),
            ],
        ));
        gauges.push((
            "moat_vcpus",
            "vCPUs held by running, starting and pooled VMs (used), and the daemon's limit \
             (host CPUs × the overcommit ratio).",
            vec![
                (
                    vec![("kind", "used".to_string())],
                    u.millicpus as f64 / 1000.0,
                ),
                (
                    vec![("kind", "limit".to_string())],
                    u.limits.millicpus as f64 / 1000.0,
                ),
            ],
        ));
    }
    let text = state.metrics.render(&gauges);
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
    let n = name.clone();
    state
        .store
        .call(move |c| store::get_group(c, &n))
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
    // The pool grows, shrinks or is rebuilt for a new image or tier in the background.
    if let Some(mgr) = state.sandboxes.ready() {
        mgr.refill(&group.name);
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(with_status(&state, group))).into_response())
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
        // The VMs go first; the store then deletes the rows with the group.
        if let Some(mgr) = state.sandboxes.ready() {
            let n = name.clone();
            let rows = state
                .store
                .call(move |c| store::list_sandboxes(c, Some(&n)))
                .await?;
            for row in rows {
                mgr.delete(&row.id).await?;
            }
        }
    }
    let n = name.clone();
    state
        .store
        .call(move |c| store::delete_group(c, &n, q.force))
        .await?;
    // Its pool's rows went with it; its VMs and its snapshots go now.
    if let Some(mgr) = state.sandboxes.ready() {
        mgr.drain_pool(&name).await;
        let home = mgr.runtime().home.clone();
        tokio::task::spawn_blocking(move || crate::snapshots::remove_group_dirs(&home, &name))
            .await
            .map_err(|e| Error::Internal(format!("removing the group's snapshots: {e}")))?;
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---- sandboxes ----

/// The two path parameters of a sandbox route.
pub(crate) fn sandbox_params(
    p: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String)> {
    p.map(|Path(v)| v)
        .map_err(|e| Error::BadRequest(format!("invalid path: {}", e.body_text())))
}

/// The group, if the key may see it (else the same 404 as for a missing group).
pub(crate) async fn visible_group(state: &AppState, p: &Principal, name: &str) -> Result<Group> {
    api::validate_name("group name", name)?;
    require_visible(p, name)?;
    let n = name.to_string();
    state
        .store
        .call(move |c| store::get_group(c, &n))
        .await?
        .ok_or_else(|| no_group(name))
}

/// The row of sandbox `id` of `group`: 404 for one of another group, as for a missing one.
pub(crate) async fn visible_sandbox(
    state: &AppState,
    p: &Principal,
    group: &str,
    id: &str,
) -> Result<Sandbox> {
    api::validate_name("group name", group)?;
    require_visible(p, group)?;
    let no_sandbox = || {
        Error::NotFound(format!(
            "no sandbox {} in group {}",
            api::quote(id),
            api::quote(group)
        ))
    };
    if id.len() > 64 {
        return Err(no_sandbox());
    }
    let i = id.to_string();
    match state.store.call(move |c| store::get_sandbox(c, &i)).await? {
        Some(sb) if sb.group == group => Ok(sb),
        _ => Err(no_sandbox()),
    }
}

/// A hold on sandbox `id` of `group` for a data-plane route (files, processes): visibility
/// first, then the role (`use_`: the route changes something, so readers are refused), then
/// the manager's `running`, which resumes a suspended sandbox.
pub(crate) async fn running_sandbox(
    state: &AppState,
    p: &Principal,
    group: &str,
    id: &str,
    use_: bool,
) -> Result<crate::sandboxes::Running> {
    let row = visible_sandbox(state, p, group, id).await?;
    if use_ {
        require_use(p)?;
    }
    state.manager()?.running(&row).await
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    request_body = CreateSandbox,
    responses(
        (status = 201, description = "Created and running: one Sandbox, or with `count` \
            `{\"sandboxes\": [Sandbox, …]}`", body = Created),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such group, or no such snapshot in it", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 429, description = "The host has no room for it (memory or vCPUs); the \
            message says what it needs and what is free", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create_sandbox(
    State(state): State<AppState>,
    p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<(StatusCode, Json<Created>)> {
    let name = path_param(name)?;
    let group = visible_group(&state, &p, &name).await?;
    require_use(&p)?;
    req.validate()?;
    let mgr = state.manager()?;
    let Some(from) = req.from_snapshot.clone() else {
        let sb = mgr.create(&group, req).await?;
        return Ok((StatusCode::CREATED, Json(Created::One(sb))));
    };
    let snap = crate::snapshots::visible_snapshot(&state, &p, &name, &from).await?;
    let dir = crate::snapshots::dir(&mgr.runtime().home, &name, &from);
    let many = req.count.is_some();
    let mut forks = mgr.fork(&group, &snap, dir, req).await?;
    let body = match forks.pop() {
        Some(one) if !many => Created::One(one),
        last => Created::Many(SandboxList {
            sandboxes: forks.into_iter().chain(last).collect(),
        }),
    };
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListSandboxesQuery {
    labels: Option<String>,
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("labels" = Option<String>, Query,
            description = "Label selector: key=value[,key=value…]; every pair must match")),
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
    let rows = state
        .store
        .call(move |c| store::list_sandboxes(c, Some(&name)))
        .await?;
    Ok(Json(SandboxList {
        sandboxes: rows
            .into_iter()
            .filter(|s| crate::sandboxes::matches(&s.labels, &selector))
            .map(|s| shown_to(&p, s))
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
    let (group, id) = sandbox_params(params)?;
    let sb = visible_sandbox(&state, &p, &group, &id).await?;
    Ok(Json(shown_to(&p, sb)))
}

/// A sandbox as `p` may see it: `env` often carries credentials, so a reader gets the
/// variables' names only.
fn shown_to(p: &Principal, mut sb: Sandbox) -> Sandbox {
    if p.role == Role::Reader {
        for v in sb.env.values_mut() {
            *v = "<redacted>".to_string();
        }
    }
    sb
}

#[utoipa::path(delete, path = "/v1/sandbox-groups/{group}/sandboxes/{id}", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 204, description = "Its VM is destroyed and its row removed"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn delete_sandbox(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode> {
    let (group, id) = sandbox_params(params)?;
    let row = visible_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    state.manager()?.delete(&row.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/exec", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "The command ran (whatever its exit code). With \
            `Accept: application/x-ndjson`, one ExecEvent per line as output is produced.",
            content(
                (ExecResult = "application/json"),
                (ExecEvent = "application/x-ndjson"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 413, description = "The request body, or the command's output (16 MiB \
            each of stdout and stderr), is too large", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn exec_sandbox(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Response> {
    let (group, id) = sandbox_params(params)?;
    let row = visible_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let argv = req.validate()?;
    let t0 = Instant::now();
    let run = state.manager()?.running(&row).await?;
    let request = crate::exec::guest_request(&req, argv, &row.env, &run);
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"));
    if streaming {
        let metrics = state.metrics.clone();
        crate::exec::stream(run, request, req.stdin, move || {
            metrics.observe_op(crate::metrics::EXEC, &[], t0.elapsed())
        })
        .await
    } else {
        let result = crate::exec::collect(run, request, req.stdin).await?;
        state
            .metrics
            .observe_op(crate::metrics::EXEC, &[], t0.elapsed());
        Ok(Json(result).into_response())
    }
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/suspend", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
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
    let (group, id) = sandbox_params(params)?;
    let row = visible_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    state.manager()?.suspend(&row.id).await.map(Json)
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/resume", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Running again (or it already was), processes and files \
            as they were", body = Sandbox),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, description = "The host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is creating, deleting or failed", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn resume_sandbox(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Sandbox>> {
    let (group, id) = sandbox_params(params)?;
    let row = visible_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    state.manager()?.resume(&row.id).await.map(Json)
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
    info(title = "moat", description = "moatd: sandbox groups, sandboxes and API keys. Errors are always \
        {\"error\": {\"code\", \"message\"}}."),
    paths(healthz, metrics, openapi, list_groups, get_group, put_group, delete_group,
        create_sandbox, list_sandboxes, get_sandbox, delete_sandbox, exec_sandbox,
        crate::files::put_file, crate::files::get_file, crate::files::list_files,
        crate::files::delete_file,
        crate::procs::start_process, crate::procs::list_processes, crate::procs::kill_process,
        crate::procs::wait_process, crate::procs::process_logs,
        suspend_sandbox, resume_sandbox,
        crate::snapshots::create_snapshot, crate::snapshots::list_snapshots,
        crate::snapshots::get_snapshot, crate::snapshots::delete_snapshot,
        crate::shell::shell,
        crate::images::import_image, crate::images::get_operation, crate::images::list_images,
        crate::images::get_image, crate::images::delete_image,
        list_keys, create_key, delete_key),
    components(schemas(ErrorBody, Group, api::GroupStatus, GroupList, GroupSpec, ApiKey, ApiKeyList, CreateApiKey,
        CreatedApiKey, Health, Sandbox, SandboxList, SandboxState, CreateSandbox, ExecRequest,
        ExecResult, ExecEvent, ExecExit, crate::files::FileWritten, crate::files::FileList,
        crate::files::FileEntry, crate::files::EntryKind, crate::procs::StartProcess,
        crate::procs::ProcessStarted, crate::procs::Process, crate::procs::ProcessExit,
        crate::procs::ProcessList, crate::procs::ProcessLogs, crate::procs::KillProcess,
        Created, api::CreateSnapshot, api::Snapshot, api::SnapshotList,
        crate::shell::ShellExit, crate::images::ImportImage, crate::images::Image,
        crate::images::ImageList, crate::images::Operation, crate::images::OperationState,
        crate::images::OperationProgress, crate::readiness::SandboxesHealth,
        crate::readiness::SandboxesState, crate::prepare::Step)),
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
