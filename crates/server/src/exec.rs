//! Exec in a sandbox for the API: the request merged with the image's config (the same merge
//! as `moat run`), then the output collected (bounded) or streamed as NDJSON.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use moat_protocol::ErrorKind;
use moat_vm::agent::{Exec, ExecEvent};

use crate::api::{self, ErrorDetail, ExecExit, ExecResult};
use crate::error::{Error, Result};
use crate::sandboxes::Running;

/// The most of stdout (and of stderr) a collected exec returns; beyond it, stream.
pub const MAX_OUTPUT: usize = 16 * 1024 * 1024;

/// The guest's request: argv as validated, env = image < sandbox < exec, cwd and user
/// defaulting to the image's.
pub fn guest_request(
    req: &api::ExecRequest,
    argv: Vec<String>,
    sandbox_env: &std::collections::BTreeMap<String, String>,
    run: &Running,
) -> moat_protocol::ExecRequest {
    let pairs = |m: &std::collections::BTreeMap<String, String>| -> Vec<(String, String)> {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let (sb_env, exec_env) = (pairs(sandbox_env), pairs(&req.env));
    moat_protocol::ExecRequest {
        argv,
        env: run.config.merged_env([&sb_env[..], &exec_env[..]]),
        cwd: req.cwd.clone().or_else(|| run.config.working_dir.clone()),
        user: req.user.clone().or_else(|| run.config.user.clone()),
        stdin: req.stdin.is_some(),
        timeout_ms: req.timeout_ms(),
        pty: None,
    }
}

/// How an exec that could not start ends: a missing command is an exit of 127 with the
/// message on stderr, as in a shell and in `moat run`; anything else is an error.
pub(crate) enum Start {
    Started(Exec),
    NotFound(String),
}

pub(crate) async fn start(
    run: &Running,
    request: moat_protocol::ExecRequest,
    stdin: Option<String>,
) -> Result<Start> {
    match run.sandbox()?.agent().exec(request).await {
        Ok(mut exec) => {
            // Taken only when there is input: a PTY exec's caller writes its own.
            if let Some((input, tx)) = stdin.and_then(|i| exec.take_stdin().map(|tx| (i, tx))) {
                // A task: a process that does not read its stdin must not block its output.
                tokio::spawn(async move {
                    for chunk in input.as_bytes().chunks(64 * 1024) {
                        if tx.write(chunk).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.close().await;
                });
            }
            Ok(Start::Started(exec))
        }
        Err(moat_vm::Error::Guest {
            kind: ErrorKind::CommandNotFound,
            message,
        }) => Ok(Start::NotFound(message)),
        Err(e) => Err(Error::vm("exec")(e)),
    }
}

pub(crate) fn exit(status: moat_vm::agent::ExitStatus) -> ExecExit {
    ExecExit {
        exit_code: status.shell_code(),
        signal: status.signal,
        timed_out: status.timed_out,
    }
}

/// Runs the exec to its end and returns its whole output (at most [`MAX_OUTPUT`] each); a
/// delete of the sandbox ends it with a 409.
pub async fn collect(
    run: Running,
    request: moat_protocol::ExecRequest,
    stdin: Option<String>,
) -> Result<ExecResult> {
    run.unless_deleted(collect_on(&run, request, stdin)).await
}

async fn collect_on(
    run: &Running,
    request: moat_protocol::ExecRequest,
    stdin: Option<String>,
) -> Result<ExecResult> {
    let mut exec = match start(run, request, stdin).await? {
        Start::Started(e) => e,
        Start::NotFound(m) => {
            return Ok(ExecResult {
                exit_code: 127,
                signal: None,
                timed_out: false,
                stdout: String::new(),
                stderr: format!("{m}\n"),
            })
        }
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        let ev = exec.next().await.map_err(Error::vm("exec"))?;
        let (buf, name, data) = match ev {
            ExecEvent::Stdout(d) => (&mut out, "stdout", d),
            ExecEvent::Stderr(d) => (&mut err, "stderr", d),
            ExecEvent::Exit(status) => {
                let e = exit(status);
                return Ok(ExecResult {
                    exit_code: e.exit_code,
                    signal: e.signal,
                    timed_out: e.timed_out,
                    stdout: String::from_utf8_lossy(&out).into_owned(),
                    stderr: String::from_utf8_lossy(&err).into_owned(),
                });
            }
        };
        if buf.len() + data.len() > MAX_OUTPUT {
            // Dropping the exec kills the process tree.
            return Err(Error::PayloadTooLarge(format!(
                "the command wrote more than {MAX_OUTPUT} bytes to {name}; it was killed. \
                 Stream its output instead (Accept: application/x-ndjson)"
            )));
        }
        buf.extend_from_slice(&data);
    }
}

/// Streams the exec as NDJSON lines ([`api::ExecEvent`]) as output arrives. The exec (and the
/// hold on the sandbox) lives in a task that ends when the process does, the client goes, or
/// the sandbox is deleted (then the last line is an `error` with code `conflict`).
/// `exited` runs when the command's exit is known (not when the client or the sandbox goes
/// first), for the exec-duration metric.
pub async fn stream(
    run: Running,
    request: moat_protocol::ExecRequest,
    stdin: Option<String>,
    exited: impl FnOnce() + Send + 'static,
) -> Result<Response> {
    let started = start(&run, request, stdin).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let send = |ev: api::ExecEvent| {
            let tx = tx.clone();
            async move {
                let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                line.push(b'\n');
                tx.send(Bytes::from(line)).await.is_ok()
            }
        };
        let mut exec = match started {
            Start::Started(e) => e,
            Start::NotFound(m) => {
                let _ = send(api::ExecEvent::Stderr(format!("{m}\n"))).await;
                let _ = send(api::ExecEvent::Exit(ExecExit {
                    exit_code: 127,
                    signal: None,
                    timed_out: false,
                }))
                .await;
                return;
            }
        };
        let (mut out, mut err) = (Utf8Stream::default(), Utf8Stream::default());
        loop {
            // A client that went away ends the exec even while the command is silent: its
            // hold on the sandbox would otherwise keep a delete or suspend waiting.
            let next = tokio::select! {
                ev = exec.next() => ev,
                _ = tx.closed() => return,
                () = run.deleted() => {
                    let e = crate::sandboxes::deleted_error();
                    let (_, code) = e.status_and_code();
                    let _ = send(api::ExecEvent::Error(ErrorDetail::new(code, e.to_string())))
                    .await;
                    return;
                }
            };
            let ev = match next {
                Ok(ExecEvent::Stdout(d)) => api::ExecEvent::Stdout(out.push(&d)),
                Ok(ExecEvent::Stderr(d)) => api::ExecEvent::Stderr(err.push(&d)),
                Ok(ExecEvent::Exit(status)) => {
                    exited();
                    for (s, mk) in [
                        (
                            out.finish(),
                            api::ExecEvent::Stdout as fn(String) -> api::ExecEvent,
                        ),
                        (err.finish(), api::ExecEvent::Stderr),
                    ] {
                        if !s.is_empty() && !send(mk(s)).await {
                            return;
                        }
                    }
                    let _ = send(api::ExecEvent::Exit(exit(status))).await;
                    return;
                }
                Err(e) => {
                    let e = Error::vm("exec")(e);
                    tracing::warn!(error = %e, "streamed exec broke off");
                    let (_, code) = e.status_and_code();
                    let _ = send(api::ExecEvent::Error(ErrorDetail::new(
                        code,
                        "the exec broke off; see the moat serve log",
                    )))
                    .await;
                    return;
                }
            };
            let empty = matches!(&ev, api::ExecEvent::Stdout(s) | api::ExecEvent::Stderr(s) if s.is_empty());
            // A client that went away ends the exec (dropping it kills the process tree).
            if !empty && !send(ev).await {
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

/// Decodes a byte stream as UTF-8 chunk by chunk without breaking a character that straddles
/// two chunks; invalid bytes become U+FFFD.
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(good));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &bad[n..];
                        }
                        // An incomplete character at the end: wait for the next chunk.
                        None => {
                            rest = bad;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_across_chunks() {
        let mut u = Utf8Stream::default();
        let s = "aé€😀".as_bytes();
        let mut out = String::new();
        for b in s {
            out.push_str(&u.push(&[*b]));
        }
        out.push_str(&u.finish());
        assert_eq!(out, "aé€😀");
        let mut u = Utf8Stream::default();
        assert_eq!(u.push(b"a\xffb\xe2\x82"), "a\u{fffd}b");
        assert_eq!(u.finish(), "\u{fffd}");
    }
}
