//! Extractors: the caller's [`Principal`] from its API key, JSON bodies, path and query
//! parameters. Every rejection becomes an [`Error`], so it has the one error shape.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode, Uri};
use serde::de::DeserializeOwned;

use super::state::AppState;
use crate::error::{Error, Result};
use crate::store::Principal;

/// Request bodies above this are refused with 413 before they are read in full.
pub const MAX_BODY: usize = 1024 * 1024;

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
        authenticate(state, &key).await
    }
}

async fn authenticate(state: &AppState, key: &str) -> Result<Principal> {
    state
        .store
        .authenticate(key)
        .await?
        .ok_or_else(|| Error::Unauthorized("invalid or deleted API key".to_string()))
}

/// The WebSocket subprotocol the shell answers with when a client offers it.
pub const SHELL_PROTOCOL: &str = "moat.shell.v1";
/// A subprotocol that carries an API key: this prefix, then the key.
pub const KEY_PROTOCOL_PREFIX: &str = "moat.key.";

/// The caller of the shell WebSocket. A browser's WebSocket cannot send an Authorization
/// header, only subprotocols, so here the key may also come as the subprotocol
/// `moat.key.<key>` (offered beside [`SHELL_PROTOCOL`], which the server selects: the key is
/// never echoed). Only the shell takes it: the port proxy passes headers on to the guest,
/// which must never see a key.
pub struct ShellPrincipal(pub Principal);

impl FromRequestParts<AppState> for ShellPrincipal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return Principal::from_request_parts(parts, state)
                .await
                .map(ShellPrincipal);
        }
        let offered = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        let mut keys = offered.filter_map(|p| p.strip_prefix(KEY_PROTOCOL_PREFIX));
        match (keys.next(), keys.next()) {
            (Some(key), None) => authenticate(state, key).await.map(ShellPrincipal),
            (Some(_), Some(_)) => Err(Error::Unauthorized(format!(
                "more than one {KEY_PROTOCOL_PREFIX}<API key> subprotocol: offer one"
            ))),
            (None, _) => Err(Error::Unauthorized(format!(
                "missing \"Authorization: Bearer <API key>\" header (a browser offers the \
                 subprotocols {SHELL_PROTOCOL} and {KEY_PROTOCOL_PREFIX}<API key> instead)"
            ))),
        }
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

/// A path parameter (or a tuple of them); `Path`'s own rejection becomes a 400 in our shape.
pub(crate) fn path_param<T>(p: std::result::Result<Path<T>, PathRejection>) -> Result<T> {
    p.map(|Path(v)| v)
        .map_err(|e| Error::BadRequest(format!("invalid path: {}", e.body_text())))
}

pub(crate) fn query<T: DeserializeOwned>(uri: &Uri) -> Result<T> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| Error::BadRequest(format!("invalid query: {}", e.body_text())))
}
