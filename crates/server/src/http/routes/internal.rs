//! Node-to-node routes of live migration (`crate::migrate`, docs/FLEET.md): they take only a
//! node credential (`X-Moat-Node-Credential`, made with the fleet's shared `secrets.key`),
//! never an API key, and are not in the OpenAPI document: no client can call them, and an
//! SDK method for them would be one no key could use. They stay as strict as the public
//! routes: every body and credential is checked, and anything else is refused with why.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::api::{self, quote, NodeState};
use crate::error::{Error, Result};
use crate::http::state::AppState;
use crate::{migrate, transfer};

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/migrations/{id}", post(offer))
        .route("/internal/v1/migrations/{id}/{step}", post(step))
        .route("/internal/v1/suspended/{id}/files/{name}", post(file))
        .route("/internal/v1/suspended/{id}/{step}", post(transfer_step))
}

/// The sending node, if `headers` carry a credential of a live node of this fleet for
/// `purpose` of sandbox `id` with `body`.
async fn sender(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    purpose: &str,
    body: &[u8],
) -> Result<String> {
    sender_of_digest(state, headers, id, purpose, &migrate::sha256_hex(body)).await
}

/// [`sender`] for a body given by its SHA-256 (hex): a streamed file.
async fn sender_of_digest(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    purpose: &str,
    body_sha256: &str,
) -> Result<String> {
    let me = state.store.node_name().ok_or_else(|| {
        Error::Unavailable("this daemon is not a node: it takes no migrations".into())
    })?;
    let credential = headers
        .get(migrate::CREDENTIAL)
        .map(|v| v.to_str().unwrap_or(""));
    let key = state.store.node_key()?;
    let from = state
        .migrations
        .check_digest(&key, credential, &me, id, purpose, body_sha256)?;
    match state.store.get_node(&from).await? {
        Some(n) if n.state != NodeState::Lost => Ok(from),
        _ => Err(Error::Unauthorized(format!(
            "node-to-node route: node {} is not a live node of this fleet",
            quote(&from)
        ))),
    }
}

fn check_id(id: &str) -> Result<()> {
    let ok = id.len() <= 64
        && !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid sandbox id {}: lowercase letters, digits and '-', at most 64",
            api::quote(id)
        )))
    }
}

/// `POST /internal/v1/migrations/{id}`: the offer (JSON: the runtime's manifest and the
/// sandbox's identity); the answer says how the disk must travel (`disk`: `top` or `full`).
async fn offer(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    check_id(&id)?;
    let from = sender(&state, &headers, &id, "offer", &body).await?;
    let accepted = migrate::offered(&state, &from, &id, &body).await?;
    Ok((StatusCode::CREATED, axum::Json(accepted)).into_response())
}

/// `POST /internal/v1/migrations/{id}/{memory,disk}` (upgraded to the raw stream) and
/// `…/{commit,abort}` (the source's last word).
async fn step(
    State(state): State<AppState>,
    Path((id, step)): Path<(String, String)>,
    mut req: Request,
) -> Result<Response> {
    check_id(&id)?;
    match step.as_str() {
        "memory" | "disk" => {
            let from = sender(&state, req.headers(), &id, &step, b"").await?;
            let upgrade = req
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(migrate::UPGRADE));
            if !upgrade {
                return Err(Error::BadRequest(format!(
                    "this route upgrades to a raw stream: send \"Connection: Upgrade\" and \
                     \"Upgrade: {}\"",
                    migrate::UPGRADE
                )));
            }
            if !migrate::expects_streams(&state, &from, &id) {
                return Err(Error::Conflict(format!(
                    "no migration of sandbox {id} from node {} waits for its streams here",
                    quote(&from)
                )));
            }
            let upgraded = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(io) = upgraded.await {
                    migrate::stream_arrived(&state, &from, &id, &step, io);
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, migrate::UPGRADE)
                .body(Body::empty())
                .map_err(|e| Error::Internal(e.to_string()))
        }
        "commit" | "abort" => {
            let from = sender(&state, req.headers(), &id, &step, b"").await?;
            let parked_ms = migrate::asked(&state, &from, &id, step == "commit").await?;
            Ok(axum::Json(serde_json::json!({ "parked_ms": parked_ms })).into_response())
        }
        other => Err(Error::NotFound(format!(
            "no migration step {}: memory, disk, commit or abort",
            quote(other)
        ))),
    }
}

/// `POST /internal/v1/suspended/{id}/files/{name}`: one file of a suspended sandbox sent
/// with its files (`crate::transfer`), streamed; its SHA-256 in `X-Moat-Body-Sha256`,
/// which the credential covers and the written file must have.
async fn file(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    check_id(&id)?;
    let sha = req
        .headers()
        .get(transfer::BODY_SHA256)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "a file sent to this node needs its SHA-256 as 64 hex digits in {}",
                transfer::BODY_SHA256
            ))
        })?;
    let step = transfer::file_step(&name);
    let from = sender_of_digest(&state, req.headers(), &id, &step, &sha).await?;
    transfer::receive_file(&state, &from, &id, &name, &sha, req.into_body()).await?;
    Ok(StatusCode::CREATED.into_response())
}

/// `POST /internal/v1/suspended/{id}/{land,abort}`: the sending node's last word.
async fn transfer_step(
    State(state): State<AppState>,
    Path((id, step)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    check_id(&id)?;
    let land = match step.as_str() {
        "land" => true,
        "abort" => false,
        other => {
            return Err(Error::NotFound(format!(
                "no transfer step {}: files/NAME, land or abort",
                quote(other)
            )))
        }
    };
    let from = sender(&state, &headers, &id, &step, b"").await?;
    transfer::finish(&state, &from, &id, land).await?;
    Ok(StatusCode::OK.into_response())
}
