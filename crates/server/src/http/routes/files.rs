//! Files of a sandbox through the API: upload, download, list and delete, all resolved inside
//! the guest by its agent (so `..` cannot leave the guest's root). Bodies stream both ways:
//! neither an upload nor a download is ever held whole in the daemon's memory.
//!
//! Roles: reading and listing need only visibility of the group (reader and up); writing and
//! deleting need a user, owner or admin key, as exec does.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use moat_protocol::{ErrorKind, FileKind};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::api::{self, entry, ErrorBody, FileEntry, FileList, FileWritten, MAX_PATH};
use crate::error::{Error, Result};
use crate::http::access::{local_sandbox, require_policy, require_use, running_sandbox};
use crate::http::extract::{path_param, query};
use crate::http::state::AppState;
use crate::sandboxes::Running;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        // Uploads stream to the guest and are not bounded by MAX_BODY.
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/files",
            get(get_file)
                .put(put_file)
                .delete(delete_file)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/files/list",
            get(list_files),
        )
}

#[derive(OpenApi)]
#[openapi(
    paths(put_file, get_file, list_files, delete_file),
    components(schemas(FileWritten, FileList, FileEntry, api::EntryKind))
)]
pub(in crate::http) struct Doc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutQuery {
    path: String,
    mode: Option<String>,
    #[serde(default)]
    parents: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

/// A path the guest will resolve: absolute, without NUL, at most [`MAX_PATH`] bytes.
fn validate_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::BadRequest(format!(
            "path {} must be absolute (start with '/')",
            api::quote(path)
        )));
    }
    if path.contains('\0') {
        return Err(Error::BadRequest("path must not contain NUL".to_string()));
    }
    if path.len() > MAX_PATH {
        return Err(Error::BadRequest(format!(
            "path is {} bytes long; at most {MAX_PATH} are allowed",
            path.len()
        )));
    }
    Ok(())
}

/// "0644" / "644" / "0o644" → 0o644: 1–4 octal digits (the document's pattern).
fn parse_mode(s: &str) -> Result<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    Some(digits)
        .filter(|d| (1..=4).contains(&d.len()) && d.bytes().all(|b| matches!(b, b'0'..=b'7')))
        .and_then(|d| u32::from_str_radix(d, 8).ok())
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "mode {} must be octal permission bits, 0000 to 7777 (e.g. 0644)",
                api::quote(s)
            ))
        })
}

/// The one mapping of a file operation's failure to an API error. What the guest refused maps
/// by its kind; an agent that did not answer or broke the protocol is a 502 (as for every
/// sandbox request), and the rest is ours (500, details in the log).
pub fn file_error(op: &str, path: &str, e: moat_vm::Error) -> Error {
    let moat_vm::Error::Guest { kind, message } = e else {
        return Error::Vm {
            context: format!("{op} {}", api::quote(path)),
            source: e,
        };
    };
    let m = format!("{op} {}: {message}", api::quote(path));
    match kind {
        ErrorKind::NotFound => Error::NotFound(m),
        ErrorKind::PermissionDenied => Error::Forbidden(m),
        ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty => Error::Conflict(m),
        ErrorKind::NoSpace => Error::InsufficientStorage(m),
        ErrorKind::IsADirectory
        | ErrorKind::NotADirectory
        | ErrorKind::InvalidInput
        | ErrorKind::CommandNotFound
        | ErrorKind::UnknownUser
        | ErrorKind::Timeout
        | ErrorKind::Other => Error::BadRequest(m),
    }
}

/// The sandbox's row and a hold on its VM (the manager resumes a suspended one).
async fn open(
    state: &AppState,
    p: &Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    write: bool,
) -> Result<(String, Running)> {
    let (group, id) = path_param(params)?;
    let run = running_sandbox(state, p, &group, &id, write).await?;
    Ok((format!("/v1/sandbox-groups/{group}/sandboxes/{id}"), run))
}

/// The request body as an `AsyncRead`. A body that breaks off is a read error, never an end
/// of file: the guest must not commit a truncated upload.
struct BodyReader<S> {
    stream: S,
    chunk: Bytes,
}

impl<S, E> tokio::io::AsyncRead for BodyReader<S>
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.chunk.is_empty() {
            match self.stream.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(b))) => self.chunk = b,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(std::io::Error::other(format!(
                        "the request body broke off: {e}"
                    ))))
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        let part = self.chunk.split_to(n);
        buf.put_slice(&part);
        Poll::Ready(Ok(()))
    }
}

#[utoipa::path(put, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/files", tag = "files",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("path" = String, Query, description = "Absolute path in the guest (at most 4095 bytes)",
            pattern = "^/[^\\x00]*$", max_length = 4095),
        ("mode" = Option<String>, Query, description = "Octal permission bits, 0 to 7777 \
            (default: those of the file replaced, else 0644)", pattern = "^(0o)?[0-7]{1,4}$"),
        ("parents" = Option<bool>, Query, description = "Create missing parent directories")),
    request_body(content = String, content_type = "application/octet-stream",
        description = "The file's bytes, streamed; any size the guest's disk can hold"),
    responses(
        (status = 421, body = ErrorBody),
        (status = 201, description = "Created", body = FileWritten),
        (status = 200, description = "Replaced (atomically)", body = FileWritten),
        (status = 400, description = "Bad path or mode, or the path is a directory", body = ErrorBody),
        (status = 502, description = api::AGENT_FAILED,
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key, the guest refused, or the group's policy \
            (scan_uploads) refused a .py or .sh file (code policy_denied)", body = ErrorBody),
        (status = 404, description = "No such sandbox, or a parent directory is missing \
            (use parents=true)", body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody),
        (status = 507, description = "The guest's disk is full", body = ErrorBody)))]
async fn put_file(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
    body: Body,
) -> Result<Response> {
    let q: PutQuery = query(&uri)?;
    validate_path(&q.path)?;
    let mode = q.mode.as_deref().map(parse_mode).transpose()?;
    let (group, id) = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let body = scan_upload(&state, &p, &row, &q.path, body).await?;
    let run = state.manager()?.running(&row).await?;
    let agent = run.sandbox()?.agent();
    // Only to tell 201 from 200; the write itself replaces whatever is there atomically.
    let existed = agent.stat(&q.path).await.is_ok();
    let reader = BodyReader {
        stream: body.into_data_stream(),
        chunk: Bytes::new(),
    };
    let size = run
        .unless_deleted(async {
            agent
                .write_file(&q.path, mode, q.parents, reader)
                .await
                .map_err(|e| file_error("writing", &q.path, e))
        })
        .await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(FileWritten { path: q.path, size })).into_response())
}

/// The policy's `scan_uploads`: a `.py` or `.sh` upload is read (at most one chunk past the
/// analysis limit, which the check then refuses as `input.too-large`) and checked as code
/// before the sandbox is touched; the body then goes on to the guest unchanged.
async fn scan_upload(
    state: &AppState,
    p: &Principal,
    row: &api::Sandbox,
    path: &str,
    body: Body,
) -> Result<Body> {
    let python = path.ends_with(".py");
    if !python && !path.ends_with(".sh") {
        return Ok(body);
    }
    let scans = state
        .store
        .get_policy(&row.group)
        .await?
        .is_some_and(|v| v.policy.mode != api::Mode::Off && v.policy.scan_uploads);
    if !scans {
        return Ok(body);
    }
    let mut stream = body.into_data_stream();
    let mut head = Vec::new();
    while head.len() <= moat_policy::MAX_CODE_BYTES {
        match stream.next().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            Some(Err(e)) => {
                return Err(Error::BadRequest(format!(
                    "the request body broke off: {e}"
                )))
            }
            None => break,
        }
    }
    // Bytes that are not UTF-8 are not valid source: they stay visible to the parser as U+FFFD.
    let code = String::from_utf8_lossy(&head).into_owned();
    let request = if python {
        api::CheckRequest {
            python: Some(code),
            ..Default::default()
        }
    } else {
        api::CheckRequest {
            shell: Some(code),
            ..Default::default()
        }
    };
    require_policy(state, p, row, "upload", request).await?;
    let head = futures_util::stream::once(async move { Ok(Bytes::from(head)) });
    Ok(Body::from_stream(head.chain(stream)))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/files", tag = "files",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("path" = String, Query, description = "Absolute path of a file in the guest (at most 4095 bytes)",
            pattern = "^/[^\\x00]*$", max_length = 4095)),
    responses(
        (status = 200, description = "The file's bytes, streamed with chunked encoding (the \
            guest's reported size is not trusted); a guest error mid-way breaks the transfer.",
            body = String, content_type = "application/octet-stream"),
        (status = 400, description = "Bad path, or the path is a directory", body = ErrorBody),
        (status = 502, description = api::AGENT_FAILED,
            body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn get_file(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
) -> Result<Response> {
    let q: PathQuery = query(&uri)?;
    validate_path(&q.path)?;
    let (base, run) = open(&state, &p, params, false).await?;
    let reader = run
        .sandbox()?
        .agent()
        .read_file(&q.path)
        .await
        .map_err(|e| match e {
            moat_vm::Error::Guest {
                kind: ErrorKind::IsADirectory,
                ..
            } => Error::BadRequest(format!(
                "{} is a directory; list it with GET {base}/files/list?path=…",
                api::quote(&q.path)
            )),
            e => file_error("reading", &q.path, e),
        })?;
    let stat = reader.stat().clone();
    if stat.kind == FileKind::Dir {
        return Err(Error::BadRequest(format!(
            "{} is a directory; list it with GET {base}/files/list?path=…",
            api::quote(&q.path)
        )));
    }
    // Chunked, with no Content-Length: the size the guest reports is neither trusted nor
    // needed (`/proc` files report 0, a growing file more). A guest error mid-way ends the
    // body with an error, which the client sees as a broken transfer, never as a whole file.
    let path = q.path;
    let body =
        futures_util::stream::unfold((reader, run, false), move |(mut reader, run, done)| {
            let path = path.clone();
            async move {
                if done {
                    return None;
                }
                let chunk = tokio::select! {
                    c = reader.chunk() => c,
                    // The transfer breaks off: a client never sees a cut file as whole.
                    () = run.deleted() => {
                        return Some((
                            Err(std::io::Error::other(crate::sandboxes::deleted_error())),
                            (reader, run, true),
                        ))
                    }
                };
                match chunk {
                    Ok(Some(data)) => Some((Ok(Bytes::from(data)), (reader, run, false))),
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(path, error = %e, "file download broke off");
                        Some((
                            Err(std::io::Error::other(e.to_string())),
                            (reader, run, true),
                        ))
                    }
                }
            }
        });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream".to_string())],
        Body::from_stream(body),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/files/list", tag = "files",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("path" = String, Query, description = "Absolute path of a directory in the guest (at most 4095 bytes)",
            pattern = "^/[^\\x00]*$", max_length = 4095)),
    responses(
        (status = 200, description = "The directory's entries, sorted by name", body = FileList),
        (status = 400, description = "Bad path, or not a directory", body = ErrorBody),
        (status = 502, description = api::AGENT_FAILED,
            body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such sandbox or directory", body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_files(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
) -> Result<Json<FileList>> {
    let q: PathQuery = query(&uri)?;
    validate_path(&q.path)?;
    let (_, run) = open(&state, &p, params, false).await?;
    let mut entries: Vec<FileEntry> = run
        .sandbox()?
        .agent()
        .list(&q.path)
        .await
        .map_err(|e| file_error("listing", &q.path, e))?
        .into_iter()
        .map(|e| entry(e.name, &e.stat))
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(FileList {
        path: q.path,
        entries,
    }))
}

#[utoipa::path(delete, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/files", tag = "files",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("path" = String, Query, description = "Absolute path in the guest (at most 4095 bytes)",
            pattern = "^/[^\\x00]*$", max_length = 4095),
        ("recursive" = Option<bool>, Query, description = "Also a non-empty directory, \
            with everything in it (symlinks are removed, never followed)")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody), (status = 502, description = api::AGENT_FAILED,
            body = ErrorBody),
        (status = 422, description = "The path is the guest's root directory",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key, the guest refused, or the group's policy \
            (scan_uploads) refused a .py or .sh file (code policy_denied)", body = ErrorBody),
        (status = 404, description = "No such sandbox or path", body = ErrorBody),
        (status = 429, description = "The sandbox is suspended and the host has no room to resume it", body = ErrorBody),
        (status = 409, description = "A non-empty directory without recursive=true, or \
            the sandbox is not running", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn delete_file(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
) -> Result<StatusCode> {
    let q: DeleteQuery = query(&uri)?;
    validate_path(&q.path)?;
    let (group, id) = path_param(params)?;
    // A malformed request (400) before one the document allows but this rule refuses (422).
    api::validate_name("group name", &group)?;
    if q.path.trim_end_matches('/').is_empty() {
        return Err(Error::Unprocessable(
            "refusing to delete the guest's root directory".to_string(),
        ));
    }
    let run = running_sandbox(&state, &p, &group, &id, true).await?;
    run.sandbox()?
        .agent()
        .remove(&q.path, q.recursive)
        .await
        .map_err(|e| file_error("deleting", &q.path, e))?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_modes() {
        assert!(validate_path("/a/../b").is_ok());
        assert!(validate_path("a").is_err());
        assert!(validate_path("/a\0b").is_err());
        assert!(validate_path(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
        assert_eq!(parse_mode("0644").ok(), Some(0o644));
        assert_eq!(parse_mode("0o4755").ok(), Some(0o4755));
        assert!(parse_mode("0888").is_err());
        assert!(parse_mode("17777").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("+644").is_err());
        assert!(parse_mode("00644").is_err());
    }

    #[test]
    fn guest_kinds_map_to_statuses() {
        let st = |kind| {
            file_error(
                "x",
                "/p",
                moat_vm::Error::Guest {
                    kind,
                    message: "m".into(),
                },
            )
            .status_and_code()
            .0
            .as_u16()
        };
        assert_eq!(st(ErrorKind::NotFound), 404);
        assert_eq!(st(ErrorKind::PermissionDenied), 403);
        assert_eq!(st(ErrorKind::IsADirectory), 400);
        assert_eq!(st(ErrorKind::NotADirectory), 400);
        assert_eq!(st(ErrorKind::InvalidInput), 400);
        assert_eq!(st(ErrorKind::AlreadyExists), 409);
        assert_eq!(st(ErrorKind::DirectoryNotEmpty), 409);
        assert_eq!(st(ErrorKind::NoSpace), 507);
    }

    #[tokio::test]
    async fn body_reader_errors_instead_of_eof() {
        use tokio::io::AsyncReadExt;
        let parts: Vec<std::result::Result<Bytes, String>> =
            vec![Ok(Bytes::from_static(b"abc")), Err("gone".into())];
        let mut r = BodyReader {
            stream: futures_util::stream::iter(parts),
            chunk: Bytes::new(),
        };
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).await.is_err());
        assert_eq!(out, b"abc");
    }
}
