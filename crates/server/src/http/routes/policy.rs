//! `/v1/sandbox-groups/{group}/policy…`: a group's policy (read, apply a new version, list
//! versions), the dry run, the decisions log and the replay of recorded requests against a
//! candidate. The gate itself is `crate::policy`, called by the exec, process and shell routes.
//!
//! Roles: reading the policy and the dry run need visibility of the group; applying a policy,
//! reading decisions (they hold what callers ran) and replaying need an owner or admin key.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use moat_policy::log::Verdict;
use utoipa::OpenApi;

use crate::api::{
    CheckRequest, Decision, DecisionList, DecisionQuery, ErrorBody, Finding, LogAnchor, LogEntry,
    Mode, Policy, PolicyCheck, PolicyVersion, PolicyVersionList, ReplayChange, ReplayRequest,
    ReplayResult, RollbackRequest, Rule,
};
use crate::error::{Error, Result};
use crate::http::access::{require_manage, visible_group};
use crate::http::extract::{path_param, query, ApiJson};
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/sandbox-groups/{group}/policy",
            get(get_policy).put(put_policy),
        )
        .route(
            "/v1/sandbox-groups/{group}/policy/versions",
            get(list_versions),
        )
        .route("/v1/sandbox-groups/{group}/policy/check", post(check))
        .route(
            "/v1/sandbox-groups/{group}/policy/decisions",
            get(list_decisions),
        )
        .route("/v1/sandbox-groups/{group}/policy/replay", post(replay))
        .route("/v1/sandbox-groups/{group}/policy/rollback", post(rollback))
}

#[derive(OpenApi)]
#[openapi(
    paths(
        get_policy,
        put_policy,
        list_versions,
        check,
        list_decisions,
        replay,
        rollback
    ),
    components(schemas(
        PolicyVersion,
        PolicyVersionList,
        Policy,
        moat_policy::Commands,
        moat_policy::CodePolicy,
        moat_policy::Family,
        moat_policy::Limits,
        moat_policy::Tests,
        Mode,
        CheckRequest,
        PolicyCheck,
        Finding,
        Rule,
        Decision,
        DecisionList,
        LogAnchor,
        LogEntry,
        Verdict,
        ReplayRequest,
        ReplayResult,
        ReplayChange,
        RollbackRequest
    ))
)]
pub(in crate::http) struct Doc;

type GroupParam = std::result::Result<Path<String>, PathRejection>;

/// The policy in force, or version 0 (an empty policy: off) for a group that never had one.
async fn in_force(state: &AppState, group: &str) -> Result<PolicyVersion> {
    Ok(state
        .store
        .get_policy(group)
        .await?
        .unwrap_or_else(|| PolicyVersion {
            group: group.to_string(),
            version: 0,
            policy: Policy::default(),
            sha256: None,
            author: None,
            created_at: None,
        }))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/policy", tag = "policy",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    responses(
        (status = 200, description = "The policy in force (version 0: none was ever applied, \
            so it is off)", body = PolicyVersion),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn get_policy(
    State(state): State<AppState>,
    p: Principal,
    group: GroupParam,
) -> Result<Json<PolicyVersion>> {
    let group = path_param(group)?;
    visible_group(&state, &p, &group).await?;
    Ok(Json(in_force(&state, &group).await?))
}

#[utoipa::path(put, path = "/v1/sandbox-groups/{group}/policy", tag = "policy",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    request_body = Policy,
    responses(
        (status = 201, description = "Applied as a new version", body = PolicyVersion),
        (status = 200, description = "The same as the policy in force: no new version",
            body = PolicyVersion),
        (status = 400, description = "Not a policy object (see the schema)", body = ErrorBody),
        (status = 422, description = "A valid policy object whose rules do not compile, or \
            that contradicts its own `tests` (the message lists every problem and failing \
            example)", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an owner or admin key", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn put_policy(
    State(state): State<AppState>,
    p: Principal,
    group: GroupParam,
    ApiJson(policy): ApiJson<Policy>,
) -> Result<Response> {
    let group = path_param(group)?;
    visible_group(&state, &p, &group).await?;
    require_manage(&p)?;
    apply(&state, &p, &group, &policy, None).await
}

/// Validates `policy` (its examples decided in workers) and makes it the group's policy in
/// force: 201 with the new version, or 200 when it is the one in force already.
async fn apply(
    state: &AppState,
    p: &Principal,
    group: &str,
    policy: &Policy,
    rolled_back_to: Option<u64>,
) -> Result<Response> {
    state.policy.validate(policy).await?;
    let (version, created) = state.store.put_policy(group, policy, &p.key_id).await?;
    tracing::info!(
        group = %group,
        version = version.version,
        mode = %policy.mode,
        key = %p.key_id,
        created,
        rolled_back_to,
        "policy applied"
    );
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(version)).into_response())
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/policy/rollback", tag = "policy",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    request_body = RollbackRequest,
    responses(
        (status = 201, description = "A new version whose policy is the one of `version` \
            (the history stays append-only)", body = PolicyVersion),
        (status = 200, description = "Version `version`'s policy is the one in force \
            already: no new version", body = PolicyVersion),
        (status = 400, description = "Not a valid body, or the old version now contradicts \
            its own `tests`", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an owner or admin key", body = ErrorBody),
        (status = 404, description = "No such group, or no such version of its policy",
            body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn rollback(
    State(state): State<AppState>,
    p: Principal,
    group: GroupParam,
    ApiJson(req): ApiJson<RollbackRequest>,
) -> Result<Response> {
    let group = path_param(group)?;
    visible_group(&state, &p, &group).await?;
    require_manage(&p)?;
    let Some(old) = state.store.get_policy_version(&group, req.version).await? else {
        return Err(Error::NotFound(format!(
            "group {} has no policy version {}",
            crate::api::quote(&group),
            req.version
        )));
    };
    apply(&state, &p, &group, &old.policy, Some(req.version)).await
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/policy/versions", tag = "policy",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    responses(
        (status = 200, description = "Every version ever applied under this group name, \
            oldest first", body = PolicyVersionList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_versions(
    State(state): State<AppState>,
    p: Principal,
    group: GroupParam,
) -> Result<Json<PolicyVersionList>> {
    let group = path_param(group)?;
    visible_group(&state, &p, &group).await?;
    Ok(Json(PolicyVersionList {
        items: state.store.list_policy_versions(&group).await?,
    }))
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/policy/check", tag = "policy",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    request_body(content = CheckRequest, description = "An exec request (argv or command, \
        env, user, cwd, stdin, timeout_s), or {\"python\": CODE} or {\"shell\": CODE}"),
    responses(
        (status = 200, description = "What the policy in force decides; nothing runs and \
            nothing is recorded", body = PolicyCheck),
        (status = 400, body = ErrorBody), (status = 422, description = "Not exactly one of argv, command, python and shell, or another rule of a policy request",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, description = "This API key asked for too many dry runs (each starts \
            an analysis process): a burst of 20, then 5 a second; the message says when to \
            retry", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn check(
    State(state): State<AppState>,
    p: Principal,
    group: GroupParam,
    ApiJson(request): ApiJson<CheckRequest>,
) -> Result<Json<PolicyCheck>> {
    let group = path_param(group)?;
    visible_group(&state, &p, &group).await?;
    state.policy.admit_check(&p.key_id)?;
    request
        .validate()
        .map_err(|e| Error::Unprocessable(format!("invalid request to check: {e}")))?;
    let active = in_force(&state, &group).await?;
    let decision = state.policy.decide(&active.policy, &request).await;
    Ok(Json(PolicyCheck {
        allowed: decision.allowed,
        mode: decision.mode,
        findings: decision.findings,
        policy_version: active.version,
    }))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/policy/decisions", tag = "policy",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("verdict" = Option<Verdict>, Query, description = "allow, deny or audit (ran in \
            audit mode with findings)"),
        ("since" = Option<u64>, Query, description = "Only decisions at or after this time, \
            unix seconds", maximum = 9223372036854775807_u64),
        ("after" = Option<u64>, Query, description = "Only entries numbered above this (the \
            previous page's next)", maximum = 9223372036854775807_u64),
        ("limit" = Option<u32>, Query, description = "1–1000, default 100", minimum = 1,
            maximum = 1000)),
    responses(
        (status = 200, description = "A page of the group's hash-chained decisions log, \
            oldest first; `moat policy verify-log` checks the chain", body = DecisionList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "Not an owner or admin key", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_decisions(
    State(state): State<AppState>,
    p: Principal,
    group: GroupParam,
    uri: Uri,
) -> Result<Json<DecisionList>> {
    let group = path_param(group)?;
    visible_group(&state, &p, &group).await?;
    require_manage(&p)?;
    let q: DecisionQuery = query(&uri)?;
    let filter = q.validate()?;
    let (items, more, pruned) = state.store.list_decisions_anchored(&group, &filter).await?;
    let next = if more {
        items.last().map(|e| e.n)
    } else {
        None
    };
    Ok(Json(DecisionList {
        items,
        next,
        pruned,
    }))
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/policy/replay", tag = "policy",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "The newest recorded requests checked again under the \
            candidate (as `enforce` would decide); those it decides differently", body = ReplayResult),
        (status = 400, body = ErrorBody), (status = 422, description = "The policy does not compile or contradicts its own `tests` (the message lists every problem)",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an owner or admin key", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn replay(
    State(state): State<AppState>,
    p: Principal,
    group: GroupParam,
    ApiJson(req): ApiJson<ReplayRequest>,
) -> Result<Json<ReplayResult>> {
    let group = path_param(group)?;
    visible_group(&state, &p, &group).await?;
    require_manage(&p)?;
    let limit = req.limit()?;
    // The candidate's own examples are not run here: replay asks what it would change, and a
    // candidate that is still being written may not hold yet. Its fields must be valid.
    state
        .policy
        .validate(&Policy {
            tests: Default::default(),
            ..req.policy.clone()
        })
        .await?;
    let candidate = Policy {
        mode: Mode::Enforce,
        ..req.policy
    };
    let recorded = state.store.recent_decisions(&group, limit).await?;
    let mut changed = Vec::new();
    for entry in &recorded {
        let now = state.policy.decide(&candidate, &entry.request).await;
        let (was_refused, now_refused) = (
            !entry.decision.findings.is_empty(),
            !now.findings.is_empty(),
        );
        if was_refused != now_refused {
            changed.push(ReplayChange {
                n: entry.n,
                at: entry.at.clone(),
                request: entry.request.clone(),
                was_refused,
                now_refused,
                findings: now.findings,
            });
        }
    }
    Ok(Json(ReplayResult {
        checked: recorded.len() as u64,
        changed,
    }))
}
