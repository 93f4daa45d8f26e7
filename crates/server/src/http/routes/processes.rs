//! Background processes of a sandbox through the API: start, list, kill, wait and logs. The
//! guest's agent keeps the processes and their output (the newest 1 MiB of each stream), so
//! they outlive the request that started them, a daemon restart and a suspend.
//!
//! Roles: starting and killing need a user, owner or admin key, as exec does; listing, logs
//! and waiting change nothing and need only visibility of the group (reader and up).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use moat_protocol::ErrorKind;
use serde::Deserialize;
use utoipa::OpenApi;

use crate::api::{
    self, rfc3339, ErrorBody, ExecExit, ExecRequest, KillProcess, Process, ProcessExit,
    ProcessList, ProcessLogs, ProcessStarted, StartProcess, DEFAULT_WAIT_S, MAX_WAIT_S,
};
use crate::error::{Error, Result};
use crate::http::access::{local_sandbox, require_policy, require_use, running_sandbox};
use crate::http::extract::{path_param, query, ApiJson, MAX_BODY};
use crate::http::state::AppState;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/processes",
            get(list_processes).post(start_process),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/kill",
            post(kill_process),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/wait",
            post(wait_process),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/logs",
            get(process_logs),
        )
}

#[derive(OpenApi)]
#[openapi(
    paths(
        start_process,
        list_processes,
        kill_process,
        wait_process,
        process_logs
    ),
    components(schemas(
        StartProcess,
        ProcessStarted,
        Process,
        ProcessExit,
        ProcessList,
        ProcessLogs,
        KillProcess
    ))
)]
pub(in crate::http) struct Doc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout_s: Option<f64>,
}

type Params3 = std::result::Result<Path<(String, String, String)>, PathRejection>;
type Params2 = std::result::Result<Path<(String, String)>, PathRejection>;

/// The sandbox and the process id of a `…/processes/{pid_id}/…` path; an id the guest could
/// never have given is the same 404 as an unknown one.
fn proc_params(params: Params3) -> Result<(String, String, String)> {
    let (group, id, proc) = path_param(params)?;
    let digits = proc.strip_prefix('p').unwrap_or("");
    if !(1..=20).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(no_proc(&proc, &id));
    }
    Ok((group, id, proc))
}

fn no_proc(proc: &str, sandbox: &str) -> Error {
    Error::NotFound(format!(
        "no process {} in sandbox {}",
        api::quote(proc),
        api::quote(sandbox)
    ))
}

/// The one mapping of a process operation's failure: an unknown process is 404, a wait that
/// ran out 409, anything else the guest refused 400, the rest ours (500).
fn proc_error(op: &str, proc: &str, sandbox: &str, e: moat_vm::Error) -> Error {
    match e {
        moat_vm::Error::Guest {
            kind: ErrorKind::NotFound,
            ..
        } => no_proc(proc, sandbox),
        moat_vm::Error::Guest {
            kind: ErrorKind::Timeout,
            ..
        } => Error::Conflict(format!(
            "process {} is still running; wait again or kill it",
            api::quote(proc)
        )),
        e => Error::vm(op)(e),
    }
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/processes", tag = "processes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    request_body = StartProcess,
    responses(
        (status = 421, body = ErrorBody),
        (status = 201, description = "Started; it runs until it ends, is killed or times out",
            body = ProcessStarted),
        (status = 400, description = "Bad request, or the command or user does not exist",
            body = ErrorBody),
        (status = 422, description = "Not exactly one of `argv` and `command`",
            body = ErrorBody),
        (status = 502, description = crate::api::AGENT_FAILED,
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key, or the group's policy refused the request \
            (code policy_denied, with findings and policy_version)", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn start_process(
    State(state): State<AppState>,
    p: Principal,
    params: Params2,
    ApiJson(req): ApiJson<StartProcess>,
) -> Result<(StatusCode, Json<ProcessStarted>)> {
    let (group, id) = path_param(params)?;
    let req = ExecRequest::from(req);
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let argv = req.validate()?;
    require_policy(&state, &p, &row, "process", req.policy_request()).await?;
    let run = state.manager()?.running(&row).await?;
    let request = crate::exec::guest_request(&req, argv, &row.env, &run);
    let started = run
        .sandbox()?
        .agent()
        .proc_start(request)
        .await
        .map_err(Error::vm("start"))?;
    Ok((
        StatusCode::CREATED,
        Json(ProcessStarted {
            id: started.id,
            pid: started.pid,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/processes", tag = "processes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 200, body = ProcessList),
        (status = 400, body = ErrorBody), (status = 502, description = crate::api::AGENT_FAILED,
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_processes(
    State(state): State<AppState>,
    p: Principal,
    params: Params2,
) -> Result<Json<ProcessList>> {
    let (group, id) = path_param(params)?;
    let run = running_sandbox(&state, &p, &group, &id, false).await?;
    let procs = run
        .sandbox()?
        .agent()
        .proc_list()
        .await
        .map_err(Error::vm("list processes"))?;
    let processes = procs
        .into_iter()
        .map(|i| Process {
            id: i.id,
            pid: i.pid,
            argv: i.argv,
            running: i.running,
            exit: i.exit.map(|e| ProcessExit {
                code: e.code,
                signal: e.signal,
                timed_out: e.timed_out,
            }),
            started_at: rfc3339(i64::try_from(i.started_unix_ms / 1000).unwrap_or(i64::MAX)),
        })
        .collect();
    Ok(Json(ProcessList { processes }))
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/kill", tag = "processes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("pid_id" = String, Path, description = "Process id (`p1`, …)")),
    request_body(content = KillProcess, description = "Optional; default signal 15"),
    responses(
        (status = 421, body = ErrorBody),
        (status = 204, description = "Signalled (a process that already ended is left as it is)"),
        (status = 400, description = "Bad body or signal", body = ErrorBody),
        (status = 502, description = crate::api::AGENT_FAILED,
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key", body = ErrorBody),
        (status = 404, description = "No such sandbox or process", body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn kill_process(
    State(state): State<AppState>,
    p: Principal,
    params: Params3,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<StatusCode> {
    let (group, id, proc) = proc_params(params)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::PayloadTooLarge(format!(
                "the request body is larger than the limit of {} bytes",
                MAX_BODY
            ))
        } else {
            Error::BadRequest(format!("cannot read the request body: {}", e.body_text()))
        }
    })?;
    let req: KillProcess = if body.iter().all(u8::is_ascii_whitespace) {
        KillProcess::default()
    } else {
        let req = serde_json::from_slice(&body)
            .map_err(|e| Error::BadRequest(format!("invalid request body: {e}")))?;
        // As ApiJson does: the body may be left out, but one that is given is held to its
        // schema (serde alone takes `[]` for the struct).
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Error::BadRequest(format!("invalid request body: {e}")))?;
        crate::http::extract::check_schema("KillProcess", &value)?;
        req
    };
    let signal = req.signal.unwrap_or(15);
    if !(1..=64).contains(&signal) {
        return Err(Error::BadRequest(format!(
            "invalid signal {signal}: give a signal number from 1 to 64"
        )));
    }
    let run = running_sandbox(&state, &p, &group, &id, true).await?;
    run.sandbox()?
        .agent()
        .proc_kill(&proc, signal)
        .await
        .map_err(|e| proc_error("kill", &proc, &id, e))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/wait", tag = "processes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("pid_id" = String, Path, description = "Process id (`p1`, …)"),
        ("timeout_s" = Option<f64>, Query, description = "How long to wait, 0 to 300 seconds \
            (default 30); 0 only looks")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 200, description = "It has ended. `exit_code` as a shell reports it: the \
            code, 128+N after signal N, 124 after its timeout", body = ExecExit),
        (status = 400, description = "Bad timeout_s", body = ErrorBody),
        (status = 502, description = crate::api::AGENT_FAILED,
            body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such sandbox or process", body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "Still running after timeout_s, or the sandbox is not \
            running", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn wait_process(
    State(state): State<AppState>,
    p: Principal,
    params: Params3,
    uri: Uri,
) -> Result<Json<ExecExit>> {
    let (group, id, proc) = proc_params(params)?;
    let q: WaitQuery = query(&uri)?;
    let t = q.timeout_s.unwrap_or(DEFAULT_WAIT_S);
    if !(t.is_finite() && (0.0..=MAX_WAIT_S).contains(&t)) {
        return Err(Error::BadRequest(format!(
            "invalid timeout_s {t}: give a number of seconds from 0 to {MAX_WAIT_S}"
        )));
    }
    let run = running_sandbox(&state, &p, &group, &id, false).await?;
    let status = run
        .unless_deleted(async {
            run.sandbox()?
                .agent()
                .proc_wait(&proc, Duration::from_secs_f64(t))
                .await
                .map_err(|e| proc_error("wait", &proc, &id, e))
        })
        .await?;
    Ok(Json(crate::exec::exit(status)))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/processes/{pid_id}/logs", tag = "processes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("pid_id" = String, Path, description = "Process id (`p1`, …)")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 200, description = "The newest 1 MiB of each of its streams", body = ProcessLogs),
        (status = 400, body = ErrorBody), (status = 502, description = crate::api::AGENT_FAILED,
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such sandbox or process", body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn process_logs(
    State(state): State<AppState>,
    p: Principal,
    params: Params3,
) -> Result<Json<ProcessLogs>> {
    let (group, id, proc) = proc_params(params)?;
    let run = running_sandbox(&state, &p, &group, &id, false).await?;
    let logs = run
        .sandbox()?
        .agent()
        .proc_logs(&proc)
        .await
        .map_err(|e| proc_error("logs", &proc, &id, e))?;
    Ok(Json(ProcessLogs {
        stdout: String::from_utf8_lossy(&logs.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&logs.stderr).into_owned(),
    }))
}
