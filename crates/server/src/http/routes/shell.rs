//! The interactive shell: a PTY exec in a sandbox carried over a WebSocket.
//!
//! Binary messages are raw terminal bytes (client → server: the terminal's input; server →
//! client: its output). Text messages are JSON control messages: the client sends
//! `{"type":"resize","cols":N,"rows":N}`; the server ends with
//! `{"type":"exit","exit_code":N,"signal":S|null}` and a normal close.
//!
//! The session holds the sandbox (`Manager::running`) for its whole life, so a suspended
//! sandbox is resumed first and a suspend waits for the shell to end. Dropping the exec kills
//! the guest's process tree: that is what happens whenever the client goes away.

use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::Uri;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use moat_vm::agent::{Exec, ExecEvent};
use serde::Deserialize;
use tokio::sync::mpsc;
use utoipa::OpenApi;

use crate::api::{self, ErrorBody, ExecRequest, ShellExit};
use crate::error::{Error, Result};
use crate::exec::{start, Start};
use crate::http::access::{local_sandbox, require_policy, require_use};
use crate::http::extract::{path_param, query, ShellPrincipal, SHELL_PROTOCOL};
use crate::http::state::AppState;
use crate::sandboxes::Running;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new().route(
        "/v1/sandbox-groups/{group}/sandboxes/{id}/shell",
        get(shell),
    )
}

#[derive(OpenApi)]
#[openapi(paths(shell), components(schemas(ShellExit)))]
pub(in crate::http) struct Doc;

/// Terminal sizes allowed, in character cells, for both dimensions.
pub const MAX_CELLS: u16 = 1000;

/// The largest WebSocket message a client may send (a paste larger than this must be split).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Input messages queued for the guest before the server stops reading from the client:
/// at most `INPUT_QUEUE × MAX_MESSAGE` bytes are buffered per session.
const INPUT_QUEUE: usize = 16;
/// How long the server waits for the client's close frame after its own.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What runs when the request names no command: bash as a login shell where the image has it,
/// else `sh -l`.
const DEFAULT_SHELL: &str = "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShellQuery {
    cols: Option<String>,
    rows: Option<String>,
    command: Option<String>,
    user: Option<String>,
    cwd: Option<String>,
    term: Option<String>,
}

/// A control message from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Control {
    Resize { cols: u16, rows: u16 },
}

fn cells(what: &str, v: Option<&str>) -> Result<u16> {
    let v = v.ok_or_else(|| {
        Error::BadRequest(format!(
            "missing {what}: give the terminal's size as ?cols=N&rows=N (1–{MAX_CELLS})"
        ))
    })?;
    match v.parse::<u16>() {
        Ok(n) if (1..=MAX_CELLS).contains(&n) => Ok(n),
        _ => Err(Error::BadRequest(format!(
            "invalid {what} {}: expected a whole number from 1 to {MAX_CELLS}",
            api::quote(v)
        ))),
    }
}

fn check_size(cols: u16, rows: u16) -> std::result::Result<(), String> {
    if (1..=MAX_CELLS).contains(&cols) && (1..=MAX_CELLS).contains(&rows) {
        Ok(())
    } else {
        Err(format!(
            "invalid resize to {cols}x{rows}: cols and rows must be 1–{MAX_CELLS}"
        ))
    }
}

/// TERM as a terminal type name: letters, digits and `-+._`, at most 64.
fn check_term(t: &str) -> Result<()> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid term {}: expected a terminal type like xterm-256color (letters, digits, \
             '-', '+', '.', '_'; at most 64)",
            api::quote(t)
        )))
    }
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/shell", tag = "sandboxes",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("cols" = u16, Query, description = "Terminal width in cells, 1–1000"),
        ("rows" = u16, Query, description = "Terminal height in cells, 1–1000"),
        ("command" = Option<String>, Query, description = "A shell command line, run as \
            `/bin/sh -c COMMAND`; default: bash -l if the image has /bin/bash, else sh -l"),
        ("user" = Option<String>, Query, description = "Name or uid, optionally :group; \
            default: the image's user, else root"),
        ("cwd" = Option<String>, Query, description = "Absolute working directory"),
        ("term" = Option<String>, Query, description = "TERM; default xterm-256color")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 101, description = "Switching to the WebSocket protocol. Binary messages: \
            terminal bytes both ways. Text messages: JSON control; the client may send \
            {\"type\":\"resize\",\"cols\":N,\"rows\":N}; the server ends with one ShellExit \
            and a normal close. Closing the socket kills the command."),
        (status = 400, description = "Bad query, or not a WebSocket upgrade", body = ErrorBody),
        (status = 502, description = "The sandbox's agent did not answer, or broke the protocol (before the upgrade): its `health` says so, and the daemon reconnects or fails it",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key, or the group's policy refused the command \
            (code policy_denied, with findings and policy_version)", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The sandbox is not running (and cannot be resumed)",
            body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn shell(
    State(state): State<AppState>,
    ShellPrincipal(p): ShellPrincipal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
    ws: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let (group, id) = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let q: ShellQuery = query(&uri)?;
    let cols = cells("cols", q.cols.as_deref())?;
    let rows = cells("rows", q.rows.as_deref())?;
    let term = q.term.unwrap_or_else(|| "xterm-256color".to_string());
    check_term(&term)?;
    let req = ExecRequest {
        command: Some(q.command.unwrap_or_else(|| DEFAULT_SHELL.to_string())),
        cwd: q.cwd,
        user: q.user,
        env: [("TERM".to_string(), term)].into(),
        ..ExecRequest::default()
    };
    let argv = req.validate()?;
    let ws = ws.map_err(|e| {
        Error::BadRequest(format!(
            "this route is a WebSocket: send a GET with \"Connection: Upgrade\" and \
             \"Upgrade: websocket\" ({})",
            e.body_text()
        ))
    })?;
    // Before the upgrade, so a refusal is an ordinary JSON error. TERM is the daemon's (from
    // `term`, checked above), not an environment the caller sets.
    let mut checked = req.policy_request();
    checked.env.remove("TERM");
    require_policy(&state, &p, &row, "shell", checked).await?;
    let run = state.manager()?.running(&row).await?;
    let mut request = crate::exec::guest_request(&req, argv, &row.env, &run);
    request.pty = Some(moat_protocol::PtySize { rows, cols });
    let started = start(&run, request, None).await?;
    let sandbox = row.id;
    Ok(ws
        .protocols([SHELL_PROTOCOL])
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            match started {
                Start::Started(exec) => session(socket, run, exec, &sandbox).await,
                Start::NotFound(m) => {
                    drop(run);
                    let mut socket = socket;
                    let _ = socket
                        .send(Message::Binary(format!("{m}\r\n").into_bytes().into()))
                        .await;
                    finish(&mut socket, 127, None).await;
                }
            }
        }))
}

/// What the input task forwards to the guest, in order.
enum Input {
    Bytes(axum::body::Bytes),
    Resize { cols: u16, rows: u16 },
}

async fn session(mut socket: WebSocket, run: Running, mut exec: Exec, sandbox: &str) {
    let Some(stdin) = exec.take_stdin() else {
        tracing::error!(sandbox, "a PTY exec without stdin");
        return;
    };
    // The input goes through a task with a bounded queue: a guest that does not read its
    // terminal must not stop its output from reaching the client (which could be what it
    // waits for), and a client that keeps typing stops being read once the queue is full.
    let (tx, mut rx) = mpsc::channel::<Input>(INPUT_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(input) = rx.recv().await {
            let r = match input {
                Input::Bytes(b) => stdin.write(&b).await,
                Input::Resize { cols, rows } => stdin.resize(rows, cols).await,
            };
            if r.is_err() {
                return;
            }
        }
    });
    let mut permit: Option<mpsc::OwnedPermit<Input>> = None;
    let mut input_gone = false;
    let outcome = loop {
        tokio::select! {
            p = tx.clone().reserve_owned(), if permit.is_none() && !input_gone => match p {
                Ok(p) => permit = Some(p),
                // The writer ended (the guest closed the input side): output may still come.
                Err(_) => input_gone = true,
            },
            msg = socket.recv(), if permit.is_some() => {
                let input = match msg {
                    Some(Ok(Message::Binary(b))) => Input::Bytes(b),
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(&t) {
                        Ok(Control::Resize { cols, rows }) => match check_size(cols, rows) {
                            Ok(()) => Input::Resize { cols, rows },
                            Err(why) => break Some(Err((close_code::POLICY, why))),
                        },
                        Err(e) => break Some(Err((close_code::POLICY, format!(
                            "invalid control message: {e}; expected \
                             {{\"type\":\"resize\",\"cols\":N,\"rows\":N}}"
                        )))),
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    // Closed, broken or gone: the client has left.
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break None,
                };
                if let Some(p) = permit.take() {
                    p.send(input);
                }
            },
            ev = exec.next() => match ev {
                Ok(ExecEvent::Stdout(d) | ExecEvent::Stderr(d)) => {
                    if socket.send(Message::Binary(d.into())).await.is_err() {
                        break None;
                    }
                }
                Ok(ExecEvent::Exit(status)) => break Some(Ok(status)),
                Err(e) => {
                    tracing::warn!(sandbox, error = %e, "shell broke off");
                    break Some(Err((
                        close_code::ERROR,
                        "the shell broke off; see the moat serve log".to_string(),
                    )));
                }
            },
            // A delete does not wait for a shell: it ends it.
            () = run.deleted() => {
                break Some(Err((close_code::AWAY, crate::sandboxes::deleted_error().to_string())))
            }
        }
    };
    writer.abort();
    // The guest's processes end with the exec, and the sandbox is let go, before the closing
    // handshake, which may wait on the client.
    drop(exec);
    drop(run);
    match outcome {
        Some(Ok(status)) => {
            let e = crate::exec::exit(status);
            finish(&mut socket, e.exit_code, e.signal).await;
        }
        Some(Err((code, why))) => close(&mut socket, code, &why).await,
        None => tracing::debug!(sandbox, "shell client left; its processes are killed"),
    }
}

/// Sends the exit message and a normal close.
async fn finish(socket: &mut WebSocket, exit_code: i32, signal: Option<i32>) {
    let exit = ShellExit {
        kind: "exit".to_string(),
        exit_code,
        signal,
    };
    let text = serde_json::to_string(&exit).unwrap_or_default();
    if socket.send(Message::Text(text.into())).await.is_ok() {
        close(socket, close_code::NORMAL, "").await;
    }
}

/// Sends a close frame and waits for the client's.
async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: truncate(reason).into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_ok() {
        await_close(socket).await;
    }
}

/// Waits a little for the client's answer to our close frame, discarding the input it still
/// sends meanwhile: a TCP connection closed with unread input is reset by the kernel, and the
/// reset can destroy the end of the output (the exit message) before the client reads it.
async fn await_close(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                return;
            }
        }
    })
    .await;
}

/// A close reason must fit in a control frame (125 bytes, 2 of them the code).
fn truncate(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > 123 {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_controls() {
        assert_eq!(cells("cols", Some("80")).unwrap(), 80);
        assert!(cells("cols", Some("0")).is_err());
        assert!(cells("cols", Some("1001")).is_err());
        assert!(cells("cols", Some("x")).is_err());
        assert!(cells("cols", None).is_err());
        assert!(check_size(1000, 1).is_ok());
        assert!(check_size(0, 1).is_err());
        assert!(check_term("xterm-256color").is_ok());
        assert!(check_term("a b").is_err());
        let c: Control = serde_json::from_str(r#"{"type":"resize","cols":3,"rows":4}"#).unwrap();
        assert!(matches!(c, Control::Resize { cols: 3, rows: 4 }));
        assert!(serde_json::from_str::<Control>(r#"{"type":"other"}"#).is_err());
        assert!(truncate(&"é".repeat(100)).len() <= 123);
    }
}
