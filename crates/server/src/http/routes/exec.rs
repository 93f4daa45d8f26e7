//! `POST …/sandboxes/{id}/exec`: run a command and answer with its whole output, or stream
//! it as NDJSON (`Accept: application/x-ndjson`). The running is `crate::exec`.

use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::api::{ErrorBody, ExecEvent, ExecExit, ExecRequest, ExecResult};
use crate::error::Result;
use crate::http::access::{local_sandbox, require_policy, require_use};
use crate::http::extract::{path_param, ApiJson};
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new().route(
        "/v1/sandbox-groups/{group}/sandboxes/{id}/exec",
        post(exec_sandbox),
    )
}

#[derive(OpenApi)]
#[openapi(
    paths(exec_sandbox),
    components(schemas(ExecRequest, ExecResult, ExecEvent, ExecExit))
)]
pub(in crate::http) struct Doc;

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/exec", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    request_body = ExecRequest,
    responses(
        (status = 421, body = ErrorBody),
        (status = 200, description = "The command ran (whatever its exit code). With \
            `Accept: application/x-ndjson`, one ExecEvent per line as output is produced.",
            content(
                (ExecResult = "application/json"),
                (ExecEvent = "application/x-ndjson"))),
        (status = 400, body = ErrorBody), (status = 422, description = "Not exactly one of `argv` and `command`",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key, or the group's policy refused the request \
            (code policy_denied, with findings and policy_version)", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 413, description = "The request body, or the command's output (16 MiB \
            each of stdout and stderr), is too large", body = ErrorBody),
        (status = 500, body = ErrorBody),
        (status = 502, description = crate::api::AGENT_FAILED, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn exec_sandbox(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Response> {
    let (group, id) = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let argv = req.validate()?;
    require_policy(&state, &p, &row, "exec", req.policy_request()).await?;
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
