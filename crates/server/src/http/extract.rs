//! Extractors: the caller's [`Principal`] from its API key, JSON bodies, path and query
//! parameters. Every rejection becomes an [`Error`], so it has the one error shape.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode, Uri};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use super::state::AppState;
use crate::error::{Error, Result};
use crate::store::{Authenticated, Principal};

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
        let p = authenticate(state, &key).await?;
        if let Some(slot) = parts.extensions.get::<AuditKey>() {
            slot.set(&p.key_id);
        }
        Ok(p)
    }
}

/// Where the `Principal` extractor leaves the key id of the call, for the audit middleware.
#[derive(Clone, Default)]
pub struct AuditKey(Arc<Mutex<Option<String>>>);

impl AuditKey {
    fn set(&self, key_id: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(key_id.to_string());
    }

    pub(crate) fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The key's principal, if it is known, unexpired and within its rate limit.
async fn authenticate(state: &AppState, key: &str) -> Result<Principal> {
    let p = match state.store.authenticate(key).await? {
        Authenticated::Key(p) => p,
        Authenticated::Expired { key_id, at } => {
            return Err(Error::Unauthorized(format!(
                "API key {key_id} expired at {}; an admin can renew it with `moat api-key \
                 rotate {key_id} --expires-in DURATION`",
                crate::api::rfc3339(at)
            )))
        }
        Authenticated::Unknown => {
            return Err(Error::Unauthorized(
                "invalid or deleted API key (or its secret was rotated)".to_string(),
            ))
        }
    };
    if let Err(wait) = state.limiter.take(&p.key_id, p.rate_limit) {
        let limit = p.rate_limit.or(state.limiter.default_limit());
        return Err(Error::RateLimited {
            message: format!(
                "API key {} is over its rate limit{}; retry after the Retry-After seconds",
                p.key_id,
                limit.map_or(String::new(), |l| format!(
                    " ({} requests a second, bursts of {})",
                    l.per_s, l.burst
                ))
            ),
            retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
        });
    }
    Ok(p)
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
            (Some(key), None) => {
                let p = authenticate(state, key).await?;
                if let Some(slot) = parts.extensions.get::<AuditKey>() {
                    slot.set(&p.key_id);
                }
                Ok(ShellPrincipal(p))
            }
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

/// A JSON body, parsed with our own messages (serde's say which field was wrong and which are
/// allowed), then checked against `T`'s schema in the OpenAPI document: whatever the document
/// forbids is refused here, so the server is never laxer than what clients are told (serde
/// alone takes a struct as a JSON array too, so `[null, null]` made a sandbox). The
/// Content-Type is not required: the body is always JSON.
///
/// A body the schema refuses is a 400 with the type's own words when its [`Checked::check`]
/// refuses it too ("invalid label key …: expected [prefix/]name, …"), else with the schema's
/// ("at /labels: … does not match …"). What the schema allows and the type's checks refuse
/// is the handler's to answer (422: a rule the document cannot state).
pub struct ApiJson<T>(pub T);

/// A request body's own checks, for the messages of [`ApiJson`]: the schema decides whether a
/// body is refused here, these only say why in the words of the rule that refused it.
pub trait Checked {
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

// Bodies whose schema says all there is to say (a secret's value is never quoted, so its
// schema's masked message is the one wanted).
impl Checked for crate::api::CheckRequest {}
impl Checked for crate::api::CreateSnapshot {}
impl Checked for crate::api::ExposePort {}
impl Checked for moat_policy::Policy {}
impl Checked for crate::api::ReplayRequest {}
impl Checked for crate::api::RollbackRequest {}
impl Checked for crate::api::RotateApiKey {}
impl Checked for crate::api::SetSecret {}
impl Checked for crate::api::TokenRequest {}

impl<S: Send + Sync, T: DeserializeOwned + ToSchema + Checked> FromRequest<S> for ApiJson<T> {
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
        let value: T = serde_json::from_slice(&bytes)
            .map_err(|e| Error::BadRequest(format!("invalid request body: {e}")))?;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::BadRequest(format!("invalid request body: {e}")))?;
        if let Err(schema) = check_schema(&T::name(), &json) {
            return Err(match value.check() {
                Err(own @ Error::BadRequest(_)) => own,
                _ => schema,
            });
        }
        Ok(ApiJson(value))
    }
}

/// The compiled schema of each request body, by component name, made on first use.
static BODY_SCHEMAS: LazyLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> =
    LazyLock::new(Default::default);

/// Checks `body` against the component schema `name` of the OpenAPI document.
pub(crate) fn check_schema(name: &str, body: &serde_json::Value) -> Result<()> {
    let validator = {
        let mut cache = BODY_SCHEMAS.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(name) {
            Some(v) => v.clone(),
            None => {
                let v = Arc::new(compile(name)?);
                cache.insert(name.to_string(), v.clone());
                v
            }
        }
    };
    let mut errors = Vec::new();
    for e in validator.iter_errors(body).take(3) {
        describe(&e, &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid request body (see the {name} schema in /openapi.json): {}",
            errors.join("; ")
        )))
    }
}

/// What is wrong, where, without the value itself (a body may carry a secret): the branch
/// that failed of a `oneOf`/`anyOf` (an optional field is "null or X": the null branch's
/// type error says nothing), else the error with its value masked.
fn describe(e: &jsonschema::ValidationError<'_>, out: &mut Vec<String>) {
    use jsonschema::error::ValidationErrorKind as Kind;
    if let Kind::OneOfNotValid { context } | Kind::AnyOf { context } = &e.kind {
        let inner: Vec<_> = context
            .iter()
            .flatten()
            .filter(|c| !matches!(c.kind, Kind::Type { .. }))
            .collect();
        if !inner.is_empty() {
            for c in inner {
                describe(c, out);
            }
            return;
        }
    }
    let at = e.instance_path.to_string();
    let what = e.masked_with("the value").to_string();
    out.push(if at.is_empty() {
        what
    } else {
        format!("at {at}: {what}")
    });
}

fn compile(name: &str) -> Result<jsonschema::Validator> {
    let doc = serde_json::to_value(super::openapi_document())
        .map_err(|e| Error::Internal(format!("the OpenAPI document: {e}")))?;
    let components = &doc["components"];
    if components["schemas"][name].is_null() {
        return Err(Error::Internal(format!(
            "the request body schema {name} is not in the OpenAPI document"
        )));
    }
    let root = serde_json::json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": components,
    });
    jsonschema::validator_for(&root)
        .map_err(|e| Error::Internal(format!("the schema {name} does not compile: {e}")))
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
