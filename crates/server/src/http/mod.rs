//! The HTTP API: the router and the OpenAPI document, assembled from one module per resource.
//!
//! - `state`: [`AppState`], what every handler gets;
//! - `extract`: the caller's principal, JSON bodies, path and query parameters;
//! - `access`: which key may see and do what;
//! - `routes/<resource>.rs`: the handlers of one resource, its route table and its part of
//!   the OpenAPI document (`Doc`), so that adding an endpoint touches that one file.
//!
//! Route modules import from `state`, `extract` and `access` (and from `api`, `store`,
//! `error` and the daemon's logic), never from each other or from this file.

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::Uri;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{self, ErrorBody};
use crate::error::Error;

pub mod access;
pub mod extract;
pub mod forward;
mod place;
mod routes;
pub mod state;

pub use extract::{ApiJson, MAX_BODY};
pub use state::AppState;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/openapi.json", get(openapi))
        .merge(routes::system::router())
        .merge(routes::groups::router())
        .merge(routes::sandboxes::router())
        .merge(routes::exec::router())
        .merge(routes::files::router())
        .merge(routes::processes::router())
        .merge(routes::shell::router())
        .merge(routes::snapshots::router())
        .merge(routes::egress::router())
        .merge(routes::ports::router())
        .merge(routes::images::router())
        .merge(routes::keys::router())
        .merge(routes::policy::router())
        .merge(routes::ui::router())
        .merge(routes::identity::router())
        .merge(routes::secrets::router())
        .merge(routes::audit::router())
        .merge(routes::nodes::router())
        .merge(routes::internal::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            forward::forward,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), audit))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state.clone());
    routes::mcp::mount(api, state)
}

/// The whole OpenAPI document: this file's part (info, security, the error body and
/// `/openapi.json`) and every route module's `Doc`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    for part in [
        routes::system::Doc::openapi(),
        routes::groups::Doc::openapi(),
        routes::sandboxes::Doc::openapi(),
        routes::exec::Doc::openapi(),
        routes::files::Doc::openapi(),
        routes::processes::Doc::openapi(),
        routes::shell::Doc::openapi(),
        routes::snapshots::Doc::openapi(),
        routes::egress::Doc::openapi(),
        routes::ports::Doc::openapi(),
        routes::images::Doc::openapi(),
        routes::keys::Doc::openapi(),
        routes::policy::Doc::openapi(),
        routes::identity::Doc::openapi(),
        routes::secrets::Doc::openapi(),
        routes::audit::Doc::openapi(),
        routes::nodes::Doc::openapi(),
    ] {
        doc.merge(part);
    }
    unique_operation_ids(&mut doc);
    constrain_path_parameters(&mut doc);
    bound_integers(&mut doc);
    document_rate_limit(&mut doc);
    document_forwarding(&mut doc);
    doc
}

/// Every operation that only the sandbox's node answers is forwarded to it by the others
/// (`forward.rs`): its 421, 502 and 503 say so, written here from the same rule the
/// forwarding follows, so that the document cannot miss a route.
fn document_forwarding(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    const CASES: [(&str, &str); 3] = [
        (
            "421",
            "A request another node forwarded (it carries `X-Moat-Forwarded-By`) for a sandbox \
             this node does not run: never forwarded twice (the message names the sandbox's \
             node and its URL)",
        ),
        (
            "502",
            "The node that runs the sandbox could not be reached from the node that received \
             the request (the message names it, its URL and why)",
        ),
        (
            "503",
            "The node that runs the sandbox was lost (its lease expired; the message says \
             why), or the store is unavailable",
        ),
    ];
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, op) in operations_mut(item) {
            if !forward::owner_only(method == "get", path) {
                continue;
            }
            for (status, text) in CASES {
                match op.responses.responses.get_mut(status) {
                    Some(RefOr::T(r)) if status == "421" || r.description.trim().is_empty() => {
                        r.description = text.to_string()
                    }
                    Some(RefOr::T(r)) => {
                        r.description =
                            format!("{}. Or: {text}", r.description.trim_end_matches('.'))
                    }
                    Some(RefOr::Ref(_)) => {}
                    None => {
                        op.responses
                            .responses
                            .insert(status.to_string(), error_response(text).into());
                    }
                }
            }
        }
    }
}

/// Gives every integer of a body or answer without a bound of its own the bounds of its
/// format (`uint16`, `int64`, …: what utoipa writes for the Rust type, with its
/// `non_strict_integers`; `uint64` up to what SQLite holds), so the document says which
/// numbers fit: a body with `{"version": 1e38}` is then refused by the schema, as serde
/// refuses it, instead of being allowed by the document and refused by the server.
fn bound_integers(doc: &mut utoipa::openapi::OpenApi) {
    if let Some(components) = doc.components.as_mut() {
        for schema in components.schemas.values_mut() {
            bound_ref(schema);
        }
    }
}

fn bound_ref(schema: &mut utoipa::openapi::RefOr<utoipa::openapi::Schema>) {
    if let utoipa::openapi::RefOr::T(s) = schema {
        bound_schema(s);
    }
}

fn bound_schema(schema: &mut utoipa::openapi::Schema) {
    use utoipa::openapi::schema::{
        AdditionalProperties, ArrayItems, KnownFormat, SchemaFormat, SchemaType, Type,
    };
    use utoipa::openapi::Schema;
    use utoipa::Number;
    match schema {
        Schema::Object(o) => {
            let integer = match &o.schema_type {
                SchemaType::Type(t) => *t == Type::Integer,
                SchemaType::Array(ts) => ts.contains(&Type::Integer),
                SchemaType::AnyValue => false,
            };
            let range = match &o.format {
                Some(SchemaFormat::KnownFormat(f)) => match f {
                    KnownFormat::Int8 => Some((i8::MIN as isize, i8::MAX as isize)),
                    KnownFormat::Int16 => Some((i16::MIN as isize, i16::MAX as isize)),
                    KnownFormat::Int32 => Some((i32::MIN as isize, i32::MAX as isize)),
                    KnownFormat::Int64 => Some((i64::MIN as isize, i64::MAX as isize)),
                    KnownFormat::UInt8 => Some((0, u8::MAX as isize)),
                    KnownFormat::UInt16 => Some((0, u16::MAX as isize)),
                    KnownFormat::UInt32 => Some((0, u32::MAX as isize)),
                    // What SQLite holds: a u64 the daemon keeps is stored as an i64.
                    KnownFormat::UInt64 => Some((0, i64::MAX as isize)),
                    _ => None,
                },
                _ => None,
            };
            if let (true, Some((min, max))) = (integer, range) {
                o.minimum.get_or_insert(Number::Int(min));
                o.maximum.get_or_insert(Number::Int(max));
            }
            for p in o.properties.values_mut() {
                bound_ref(p);
            }
            if let Some(AdditionalProperties::RefOr(a)) = o.additional_properties.as_deref_mut() {
                bound_ref(a);
            }
        }
        Schema::Array(a) => {
            if let ArrayItems::RefOrSchema(items) = &mut a.items {
                bound_ref(items);
            }
        }
        Schema::OneOf(x) => x.items.iter_mut().for_each(bound_ref),
        Schema::AllOf(x) => x.items.iter_mut().for_each(bound_ref),
        Schema::AnyOf(x) => x.items.iter_mut().for_each(bound_ref),
        _ => {}
    }
}

/// A documented error answer: `text`, with the `ErrorBody` every error has.
fn error_response(text: &str) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(text)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// Every operation that takes an API key may answer 429 when the key is over its rate limit
/// (checked with the key, before the operation's own work): said once here for all of them.
fn document_rate_limit(doc: &mut utoipa::openapi::OpenApi) {
    for item in doc.paths.paths.values_mut() {
        for (_, op) in operations_mut(item) {
            if op.security.is_none() || op.responses.responses.contains_key("429") {
                continue;
            }
            let resp = error_response(
                "The API key is over its rate limit; `Retry-After` says when to try again",
            );
            op.responses
                .responses
                .insert("429".to_string(), resp.into());
        }
    }
}

/// What the server checks of a path parameter before anything else, written into every
/// operation that takes it, so that generated clients know it: the rules live in `api` and
/// are stated here once instead of in each route's attributes.
fn constrain_path_parameters(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use utoipa::openapi::RefOr;
    let name = |pattern: &str| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(pattern))
            .min_length(Some(1))
            .max_length(Some(63))
            .build()
    };
    for (template, item) in doc.paths.paths.iter_mut() {
        for (_, op) in operations_mut(item) {
            for param in op.parameters.iter_mut().flatten() {
                if !matches!(param.parameter_in, utoipa::openapi::path::ParameterIn::Path) {
                    continue;
                }
                let rule = match param.name.as_str() {
                    "group" | "node" => name(api::NAME_PATTERN),
                    "name" if template.contains("/snapshots/") => name(api::NAME_PATTERN),
                    "name" if template.contains("/secrets/") => name(SECRET_NAME_PATTERN),
                    "name" if template.starts_with("/v1/images/") => ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some(api::IMAGE_NAME_PATTERN))
                        .min_length(Some(1))
                        .max_length(Some(api::MAX_IMAGE_NAME))
                        .build(),
                    "port" => ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1))
                        .maximum(Some(65535))
                        .build(),
                    _ => continue,
                };
                param.schema = Some(RefOr::T(rule.into()));
            }
        }
    }
}

/// `moat_net::transform::check_secret_name` as a pattern (with lengths 1–63).
const SECRET_NAME_PATTERN: &str = "^[a-z0-9][a-z0-9_-]*$";

/// Gives each operation of a handler that serves several methods (the port proxy) an
/// `operationId` of its own, `<handler>_<method>`: OpenAPI requires them unique, and client
/// generators refuse a document where they are not.
fn unique_operation_ids(doc: &mut utoipa::openapi::OpenApi) {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for item in doc.paths.paths.values() {
        for op in operations(item) {
            if let Some(id) = &op.1.operation_id {
                *seen.entry(id.clone()).or_default() += 1;
            }
        }
    }
    for item in doc.paths.paths.values_mut() {
        for (method, op) in operations_mut(item) {
            if let Some(id) = op.operation_id.as_mut() {
                if seen.get(id.as_str()).is_some_and(|&n| n > 1) {
                    *id = format!("{id}_{method}");
                }
            }
        }
    }
}

fn operations(
    item: &utoipa::openapi::PathItem,
) -> impl Iterator<Item = (&'static str, &utoipa::openapi::path::Operation)> {
    [
        ("get", &item.get),
        ("put", &item.put),
        ("post", &item.post),
        ("delete", &item.delete),
        ("options", &item.options),
        ("head", &item.head),
        ("patch", &item.patch),
        ("trace", &item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| Some((m, op.as_ref()?)))
}

fn operations_mut(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = (&'static str, &mut utoipa::openapi::path::Operation)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| Some((m, op.as_mut()?)))
}

async fn not_found(uri: Uri) -> Error {
    Error::NotFound(format!(
        "no such endpoint {}; see /openapi.json",
        api::quote(uri.path())
    ))
}

async fn method_not_allowed(req: Request) -> Error {
    let e = Error::MethodNotAllowed(format!(
        "{} is not allowed on {}; see /openapi.json",
        req.method(),
        api::quote(req.uri().path())
    ));
    // Read the body the request came with (up to the limit of any body): a connection left
    // with unread request bytes is closed after the answer, sometimes without saying so, and
    // a client that reuses it then sees its next request dropped.
    let _ = axum::body::to_bytes(req.into_body(), MAX_BODY).await;
    e
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

/// The header that carries each answer's request id (also in the audit log).
pub const REQUEST_ID: &str = "x-request-id";

/// Gives every answer an `X-Request-Id`, and records each mutating call (POST, PUT, PATCH,
/// DELETE of a route of the API) in the audit log: the key that made it (set by the
/// `Principal` extractor into the [`extract::AuditKey`] slot), the route, the path, the
/// group, the status and the request id; never the body, which may hold secrets. The port
/// proxy's traffic is the sandbox's own, not a call on moat, and is not recorded.
async fn audit(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let request_id = format!("req-{}", hex::encode(rand::random::<[u8; 8]>()));
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let recorded = matches!(
        method,
        axum::http::Method::POST
            | axum::http::Method::PUT
            | axum::http::Method::PATCH
            | axum::http::Method::DELETE
    ) && route
        .as_deref()
        .is_some_and(|r| !r.contains("/ports/{port}/"));
    let slot = extract::AuditKey::default();
    req.extensions_mut().insert(slot.clone());
    let target: String = req.uri().path().chars().take(1024).collect();
    let mut resp = next.run(req).await;
    // The owner gave it its request id and recorded it.
    if resp.extensions().get::<forward::Forwarded>().is_some() {
        return resp;
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    if let (true, Some(route)) = (recorded, route) {
        let group = target
            .strip_prefix("/v1/sandbox-groups/")
            .and_then(|rest| rest.split('/').next())
            .filter(|g| api::validate_name("group", g).is_ok())
            .map(str::to_string);
        let event = crate::store::NewAuditEvent {
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            key_id: slot.get(),
            action: format!("{method} {route}"),
            target,
            group,
            status: resp.status().as_u16(),
            request_id,
        };
        // Written before the answer leaves, so that a call the client saw succeed is in the
        // log; a failure to write is logged, not turned into the call's failure.
        if let Err(e) = state
            .store
            .insert_audit_event(event, state.audit_retention)
            .await
        {
            tracing::error!(error = %e, "recording an API call in the audit log");
        }
    }
    resp
}

#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "This document (OpenAPI 3.1)")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_document())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "moat", description = "moatd: sandbox groups, sandboxes and API keys. Errors are always \
        {\"error\": {\"code\", \"message\"}}."),
    paths(openapi),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

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
