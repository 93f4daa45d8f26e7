//! Port exposure: `…/sandboxes/{id}/ports` (expose, list, read, close), the proxy under
//! `…/ports/{port}/…` that carries HTTP and WebSocket requests to an exposed guest port, and
//! `…/port-forward/{port}`, an HTTP upgrade to a raw TCP stream to any guest port (what
//! `moat sandbox port-forward` uses).
//!
//! Every connection to the guest goes through the sandbox's network stack
//! ([`moat_net::ingress`]): the stack opens a TCP connection from its gateway address to the
//! guest's port and hands back a Unix stream that carries its bytes, so the host kernel never
//! routes a guest packet. A connection holds the sandbox (`Manager::running`, resuming a
//! suspended one) for its life, and ends when the sandbox is deleted.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{any, get};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;
use utoipa::OpenApi;

use crate::api::{self, ErrorBody, ExposePort, Port, PortList};
use crate::error::{Error, Result};
use crate::http::access::{local_sandbox, require_use, visible_sandbox};
use crate::http::extract::{path_param, ApiJson};
use crate::http::state::AppState;
use crate::sandboxes::Running;
use crate::store::Principal;

/// The upgrade token of `…/port-forward/{port}`.
pub const TCP_UPGRADE: &str = "moat-tcp";

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/ports",
            get(list_ports).post(expose_port),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/ports/{port}",
            get(get_port).delete(close_port),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/ports/{port}/",
            any(proxy_root),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/ports/{port}/{*path}",
            any(proxy_path),
        )
        .route(
            "/v1/sandbox-groups/{group}/sandboxes/{id}/port-forward/{port}",
            get(port_forward),
        )
}

#[derive(OpenApi)]
#[openapi(
    paths(
        expose_port,
        list_ports,
        get_port,
        close_port,
        proxy_path,
        proxy_root,
        port_forward
    ),
    components(schemas(ExposePort, Port, PortList))
)]
pub(in crate::http) struct Doc;

#[derive(Debug, Deserialize)]
struct PortPath {
    group: String,
    id: String,
    port: String,
}

#[utoipa::path(post, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/ports", tag = "ports",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    request_body = ExposePort,
    responses(
        (status = 421, body = ErrorBody),
        (status = 201, description = "Exposed: requests under `url` reach the guest's port \
            (whether or not anything listens there yet)", body = Port),
        (status = 400, description = "Bad port (1–65535) or body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already exposed, or the sandbox exposes 64 ports \
            already", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn expose_port(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    ApiJson(req): ApiJson<ExposePort>,
) -> Result<(StatusCode, Json<Port>)> {
    let (group, id) = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let port = api::validate_port(req.port)?;
    let exposed = state.store.expose_port(&row.id, port).await?;
    Ok((
        StatusCode::CREATED,
        Json(exposed.to_port(&row.group, &row.id)),
    ))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/ports", tag = "ports",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The sandbox's exposed ports, lowest first", body = PortList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_ports(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<PortList>> {
    let (group, id) = path_param(params)?;
    let row = visible_sandbox(&state, &p, &group, &id).await?;
    let ports = state.store.list_ports(&row.id).await?;
    Ok(Json(PortList {
        ports: ports
            .into_iter()
            .map(|e| e.to_port(&row.group, &row.id))
            .collect(),
    }))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/ports/{port}", tag = "ports",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("port" = u16, Path, description = "Guest port, 1–65535")),
    responses(
        (status = 200, body = Port),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "No such sandbox, or the port is not exposed",
            body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn get_port(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<PortPath>, PathRejection>,
) -> Result<Json<Port>> {
    let PortPath { group, id, port } = path_param(params)?;
    let row = visible_sandbox(&state, &p, &group, &id).await?;
    let port = api::parse_port(&port)?;
    let exposed = exposed(&state, &row, port).await?;
    Ok(Json(exposed.to_port(&row.group, &row.id)))
}

#[utoipa::path(delete, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/ports/{port}", tag = "ports",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("port" = u16, Path, description = "Guest port, 1–65535")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 204, description = "Closed: new requests under its url get a 404; requests \
            and WebSockets already proxied run to their end"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key", body = ErrorBody),
        (status = 404, description = "No such sandbox, or the port is not exposed",
            body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn close_port(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<PortPath>, PathRejection>,
) -> Result<StatusCode> {
    let PortPath { group, id, port } = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let port = api::parse_port(&port)?;
    if state.store.close_port(&row.id, port).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_exposed(&row, port))
    }
}

async fn exposed(state: &AppState, row: &api::Sandbox, port: u16) -> Result<api::ExposedPort> {
    state
        .store
        .get_port(&row.id, port)
        .await?
        .ok_or_else(|| not_exposed(row, port))
}

fn not_exposed(row: &api::Sandbox, port: u16) -> Error {
    Error::NotFound(format!(
        "port {port} of sandbox {} is not exposed; expose it with POST \
         /v1/sandbox-groups/{}/sandboxes/{}/ports {{\"port\": {port}}}",
        api::quote(&row.id),
        row.group,
        row.id
    ))
}

/// A connection to the guest's `port` through the sandbox's network stack.
async fn connect(run: &Running, port: u16) -> Result<UnixStream> {
    let path = run.sandbox()?.net_ports_path();
    moat_net::ingress::connect(&path, port)
        .await
        .map_err(|e| match e {
            moat_net::Error::Control(m) => Error::BadGateway(format!("guest port {port}: {m}")),
            e => Error::BadGateway(format!(
                "guest port {port}: the sandbox's network stack cannot be reached ({e})"
            )),
        })
}

#[utoipa::path(
    method(get, post, put, delete, patch, head, options),
    path = "/v1/sandbox-groups/{group}/sandboxes/{id}/ports/{port}/{path}", tag = "ports",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("port" = u16, Path, description = "An exposed guest port"),
        ("path" = String, Path, description = "The rest of the path, any number of segments, \
            as the guest gets it (with the query)")),
    responses(
        (status = 101, description = "A WebSocket (or other upgrade) the guest accepted; \
            bytes flow both ways until either side closes"),
        (status = 200, description = "Whatever the guest's server answers (any status, \
            headers and body), passed through; the daemon's own errors are the ones below",
            content_type = "*/*", body = String),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key", body = ErrorBody),
        (status = 404, description = "No such sandbox, or the port is not exposed",
            body = ErrorBody),
        (status = 409, description = "The sandbox is not running (and cannot be resumed)",
            body = ErrorBody),
        (status = 502, description = "The guest's port could not be reached: nothing \
            listens, no answer within 5 s, or not HTTP", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
/// The `{*path}` route's extra parameter is ignored here: the raw path is what is forwarded.
async fn proxy_path(
    state: State<AppState>,
    p: Principal,
    params: std::result::Result<Path<PortPath>, PathRejection>,
    req: Request,
) -> Result<Response> {
    proxy(state, p, params, req).await
}

#[utoipa::path(
    method(get, post, put, delete, patch, head, options),
    path = "/v1/sandbox-groups/{group}/sandboxes/{id}/ports/{port}/", tag = "ports",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("port" = u16, Path, description = "An exposed guest port")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 101, description = "A WebSocket (or other upgrade) the guest accepted"),
        (status = 200, description = "The guest's answer for `/`, passed through",
            content_type = "*/*", body = String),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key", body = ErrorBody),
        (status = 404, description = "No such sandbox, or the port is not exposed",
            body = ErrorBody),
        (status = 409, description = "The sandbox is not running (and cannot be resumed)",
            body = ErrorBody),
        (status = 502, description = "The guest's port could not be reached", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn proxy_root(
    state: State<AppState>,
    p: Principal,
    params: std::result::Result<Path<PortPath>, PathRejection>,
    req: Request,
) -> Result<Response> {
    proxy(state, p, params, req).await
}

/// Request headers that belong to one hop (RFC 9110 §7.6.1) and are not passed on, plus
/// `Authorization`, which carries the caller's moat API key: the guest never sees it.
const DROPPED_REQUEST: [HeaderName; 7] = [
    header::AUTHORIZATION,
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const DROPPED_RESPONSE: [HeaderName; 5] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies `from` without the hop-by-hop headers (and those `Connection` names); an upgrade
/// keeps `Connection: upgrade` and its `Upgrade`.
fn forward_headers(from: &HeaderMap, dropped: &[HeaderName], upgrade: bool) -> HeaderMap {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (k, v) in from {
        if dropped.contains(k) || named.iter().any(|n| n == k.as_str()) {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    if upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = from.get(header::UPGRADE) {
            out.insert(header::UPGRADE, u.clone());
        }
    }
    out
}

/// The proxy: `…/ports/{port}/rest?q` is sent to the guest's port as `/rest?q` over a new
/// connection through the stack (HTTP/1.1; an upgrade such as a WebSocket is passed through
/// and spliced). The guest sees the caller's headers without its API key, plus
/// `X-Forwarded-Prefix` (the proxy's path, for building links).
async fn proxy(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<PortPath>, PathRejection>,
    mut req: Request,
) -> Result<Response> {
    let PortPath { group, id, port } = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let port = api::parse_port(&port)?;
    exposed(&state, &row, port).await?;
    // The raw path after the first seven segments (v1, sandbox-groups, g, sandboxes, id,
    // ports, port), as the client encoded it.
    let raw = req.uri().path();
    let rest = raw.splitn(9, '/').nth(8).unwrap_or_default();
    let target = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    let upgrade = wants_upgrade(req.headers());
    let mut headers = forward_headers(req.headers(), &DROPPED_REQUEST, upgrade);
    let prefix = api::port_url(&row.group, &row.id, port);
    headers.insert(
        HeaderName::from_static("x-forwarded-prefix"),
        HeaderValue::from_str(prefix.trim_end_matches('/')).expect("names are header-safe"),
    );
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut out = axum::http::Request::builder()
        .method(req.method().clone())
        .uri(&target)
        .body(req.into_body())
        .map_err(|e| Error::BadRequest(format!("cannot proxy this request: {e}")))?;
    *out.headers_mut() = headers;

    let run = Arc::new(state.manager()?.running(&row).await?);
    let stream = connect(&run, port).await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::BadGateway(format!("guest port {port}: {e}")))?;
    let hold = run.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = conn.with_upgrades() => {}
            () = hold.deleted() => {}
        }
    });
    let mut resp = sender.send_request(out).await.map_err(|e| {
        Error::BadGateway(format!(
            "guest port {port} did not answer the request with HTTP: {e}"
        ))
    })?;
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client)) = (switched, client_upgrade) {
        let guest = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(guest)) = tokio::join!(client, guest) else {
                return;
            };
            let (mut client, mut guest) = (TokioIo::new(client), TokioIo::new(guest));
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut guest) => {}
                () = run.deleted() => {}
            }
        });
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers = forward_headers(&parts.headers, &DROPPED_RESPONSE, switched);
    Ok(Response::from_parts(parts, Body::new(body)))
}

#[utoipa::path(get, path = "/v1/sandbox-groups/{group}/sandboxes/{id}/port-forward/{port}",
    tag = "ports",
    security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name"),
        ("id" = String, Path, description = "Sandbox id"),
        ("port" = u16, Path, description = "Any guest port, 1–65535 (it need not be exposed)")),
    responses(
        (status = 421, body = ErrorBody),
        (status = 101, description = "Switching to `moat-tcp`: from here the connection \
            carries the bytes of one TCP connection to the guest's port, both ways; a \
            half-close is passed on. Send `Connection: Upgrade` and `Upgrade: moat-tcp`."),
        (status = 400, description = "Bad port, or not a `moat-tcp` upgrade", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A reader key", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The sandbox is not running (and cannot be resumed)",
            body = ErrorBody),
        (status = 502, description = "The guest's port could not be reached: nothing \
            listens, or no answer within 5 s", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn port_forward(
    State(state): State<AppState>,
    p: Principal,
    params: std::result::Result<Path<PortPath>, PathRejection>,
    mut req: Request,
) -> Result<Response> {
    let PortPath { group, id, port } = path_param(params)?;
    let row = local_sandbox(&state, &p, &group, &id).await?;
    require_use(&p)?;
    let port = api::parse_port(&port)?;
    let tcp = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(TCP_UPGRADE));
    if !tcp || !wants_upgrade(req.headers()) {
        return Err(Error::BadRequest(format!(
            "this route upgrades to a raw TCP stream: send a GET with \"Connection: Upgrade\" \
             and \"Upgrade: {TCP_UPGRADE}\""
        )));
    }
    let run = state.manager()?.running(&row).await?;
    let mut stream = connect(&run, port).await?;
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgraded.await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut stream) => {}
            () = run.deleted() => {}
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TCP_UPGRADE)
        .body(Body::empty())
        .map_err(|e| Error::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_api_key_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer moat_secret".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, X-Hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::COOKIE, "a=b".parse().unwrap());
        h.insert(header::HOST, "moat:7070".parse().unwrap());
        let out = forward_headers(&h, &DROPPED_REQUEST, false);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[header::COOKIE], "a=b");
        assert_eq!(out[header::HOST], "moat:7070");

        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(wants_upgrade(&h));
        let out = forward_headers(&h, &DROPPED_REQUEST, true);
        assert_eq!(out[header::UPGRADE], "websocket");
        assert_eq!(out[header::CONNECTION], "upgrade");
        assert!(!out.contains_key(header::AUTHORIZATION));
    }
}
