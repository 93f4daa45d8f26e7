//! Forwarding (docs/FLEET.md): a request that acts on a sandbox run by another live node of
//! the fleet is sent on to that node's advertised URL, with the caller's own headers (its API
//! key included: the owner checks it, so nodes trust each other with nothing new), and the
//! answer comes back as the owner gave it. Bodies stream both ways; WebSocket and other
//! upgrades are spliced once both sides have switched.
//!
//! A forwarded request carries [`FORWARDED_BY`]. A node never forwards a request that carries
//! it, so two nodes with different views of where a sandbox runs cannot bounce a request
//! between them: the second answers 421 `other_node` itself. A client that sets the header
//! only gets that 421 sooner; the header grants nothing.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::api::{self, Node, NodeState, SandboxState};
use crate::error::{Error, Result};
use crate::sandboxes::unreachable_suspended;
use crate::store::{Files, Store};

use super::access::no_group;
use super::extract::ShellPrincipal;
use super::state::AppState;

/// Names the node that forwarded a request (set by the forwarding node, over any value the
/// client sent).
pub const FORWARDED_BY: &str = "x-moat-forwarded-by";

/// How long a node waits for a TCP connection to the owner: a node whose host is gone is
/// reported within this, not after TCP's own minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Marks an answer that came from another node, so that the audit middleware leaves it (and
/// its request id) to the owner, which recorded the call.
#[derive(Clone, Copy)]
pub(crate) struct Forwarded;

/// The HTTP client of forwarded requests: one pool of kept-alive connections per owner.
pub struct Forwarder {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>,
}

impl Forwarder {
    /// `https://` owners are verified against the public roots (the same as the CLI's) and
    /// the CAs of `ca_file` (PEM; `MOAT_CA_FILE` for `moat serve`): a fleet with a private CA
    /// gives every node that file.
    pub fn new(ca_file: Option<&std::path::Path>) -> Result<Forwarder> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let bad = |what: String| {
                Error::Config(format!(
                    "--ca-file (MOAT_CA_FILE) {}: {what}",
                    path.display()
                ))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(format!("cannot read it: {e}")))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not a PEM certificate bundle: {e}")))?;
            if certs.is_empty() {
                return Err(bad("holds no CERTIFICATE block".to_string()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| bad(format!("a certificate in it is not usable: {e}")))?;
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Forwarder {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends `req` to `owner` and gives back its answer, streaming; an upgrade is spliced.
    /// `what` starts the errors: "sandbox sb-… runs on" (then "node c (URL), which …").
    pub(crate) async fn send(
        &self,
        store: &Store,
        owner: &Node,
        me: &str,
        what: &str,
        mut req: Request,
    ) -> Result<Response> {
        let unreachable = |why: String| {
            Error::BadGateway(format!(
                "{what} node {} ({}), which could not be reached from node {me}: {why}",
                api::quote(&owner.name),
                owner.advertise_url
            ))
        };
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = format!("{}{target}", owner.advertise_url.trim_end_matches('/'))
            .parse()
            .map_err(|e| {
                unreachable(format!(
                    "its advertised URL does not make a request URL: {e}"
                ))
            })?;
        let upgrade = req.headers().contains_key(header::UPGRADE);
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        parts.extensions = Default::default();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        // The client sets the owner's own Host from the URL.
        parts.headers.remove(header::HOST);
        let by = HeaderValue::from_str(me).map_err(|e| Error::Internal(e.to_string()))?;
        parts
            .headers
            .insert(HeaderName::from_static(FORWARDED_BY), by);
        let sent = self.client.request(Request::from_parts(parts, body));
        // A node that stopped (SIGSTOP, a partition) still has its connections accepted by
        // its kernel and answers nothing: the request waits until the fleet declares it lost.
        let mut resp = tokio::select! {
            r = sent => r.map_err(|e| unreachable(chain(&e)))?,
            why = declared_lost(store.clone(), owner.clone()) => {
                return Err(Error::Unavailable(format!(
                    "{what} node {} ({}), which did not answer and was declared lost while \
                     the request waited{why}",
                    api::quote(&owner.name),
                    owner.advertise_url
                )))
            }
        };
        // What streams on after the answer began (an exec's output, a download, a spliced
        // shell) would stall forever if the owner stopped: it is cut once the fleet declares
        // the owner lost, so the caller sees the break instead of a silence.
        let lost = declared_lost(store.clone(), owner.clone());
        let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(resp.headers_mut(), upgraded);
        let mut resp = match (upgraded, client_side) {
            (true, Some(client_side)) => {
                let owner_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    let (Ok(c), Ok(o)) = (client_side.await, owner_side.await) else {
                        return;
                    };
                    let (mut c, mut o) = (TokioIo::new(c), TokioIo::new(o));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut o) => {}
                        _ = lost => {}
                    }
                });
                resp.map(Body::new)
            }
            (true, None) => resp.map(Body::new),
            (false, _) => resp.map(|b| cut_when_lost(b, lost)),
        };
        resp.extensions_mut().insert(Forwarded);
        Ok(resp)
    }
}

/// The owner's answer body, ended with an error (which aborts the caller's connection, so a
/// partial answer is never taken for a whole one) if `lost` resolves before it is done.
fn cut_when_lost(
    body: hyper::body::Incoming,
    lost: impl std::future::Future<Output = String> + Send + 'static,
) -> Body {
    use futures_util::{FutureExt, StreamExt};
    let mut data = Body::new(body).into_data_stream();
    let mut lost = Box::pin(lost.fuse());
    let mut cut = false;
    Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        if cut {
            return std::task::Poll::Ready(None);
        }
        if let std::task::Poll::Ready(item) = data.poll_next_unpin(cx) {
            return std::task::Poll::Ready(item);
        }
        match lost.poll_unpin(cx) {
            std::task::Poll::Ready(why) => {
                cut = true;
                std::task::Poll::Ready(Some(Err(axum::Error::new(std::io::Error::other(format!(
                    "the sandbox's node was declared lost mid-answer{why}"
                ))))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }))
}

impl Forwarder {
    /// A node-to-node request of live migration (`crate::migrate`): `POST url` with the
    /// node credential `credential` and `body`; the answer's body, or, for an answer other
    /// than 2xx, an error with the other node's message.
    pub(crate) async fn node_call(
        &self,
        node: &str,
        url: &str,
        credential: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let req = node_request(url, credential, Body::from(body), false)?;
        self.node_send(node, url, req).await
    }

    async fn node_send(&self, node: &str, url: &str, req: Request) -> Result<Vec<u8>> {
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| unreachable_node(node, url, &chain(&e)))?;
        if !resp.status().is_success() {
            return Err(node_refused(node, url, resp).await);
        }
        axum::body::to_bytes(Body::new(resp.into_body()), 64 << 10)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| unreachable_node(node, url, &format!("reading its answer: {e}")))
    }

    /// A file sent to another node (`crate::transfer`): `POST url` with `body` streamed, its
    /// SHA-256 `sha256` (hex, which `credential` covers) in [`crate::transfer::BODY_SHA256`].
    pub(crate) async fn node_send_file(
        &self,
        node: &str,
        url: &str,
        credential: &str,
        sha256: &str,
        body: Body,
    ) -> Result<Vec<u8>> {
        let mut req = node_request(url, credential, body, false)?;
        let headers = req.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(
            crate::transfer::BODY_SHA256,
            HeaderValue::from_str(sha256)
                .map_err(|e| Error::Internal(format!("a file's hash as a header: {e}")))?,
        );
        self.node_send(node, url, req).await
    }

    /// A node-to-node stream of live migration: `POST url` upgraded to raw bytes (protocol
    /// [`crate::migrate::UPGRADE`]).
    pub(crate) async fn node_upgrade(
        &self,
        node: &str,
        url: &str,
        credential: &str,
    ) -> Result<hyper::upgrade::Upgraded> {
        let req = node_request(url, credential, Body::empty(), true)?;
        let mut resp = self
            .client
            .request(req)
            .await
            .map_err(|e| unreachable_node(node, url, &chain(&e)))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(node_refused(node, url, resp).await);
        }
        hyper::upgrade::on(&mut resp)
            .await
            .map_err(|e| unreachable_node(node, url, &chain(&e)))
    }
}

fn node_request(url: &str, credential: &str, body: Body, upgrade: bool) -> Result<Request> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(crate::migrate::CREDENTIAL, credential);
    if upgrade {
        req = req
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, crate::migrate::UPGRADE);
    } else {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    req.body(body)
        .map_err(|e| Error::Internal(format!("a request to {url}: {e}")))
}

fn unreachable_node(node: &str, url: &str, why: &str) -> Error {
    Error::BadGateway(format!(
        "node {} ({url}) could not be reached: {why}",
        api::quote(node)
    ))
}

/// The other node's refusal, with its message.
async fn node_refused(
    node: &str,
    url: &str,
    resp: hyper::Response<hyper::body::Incoming>,
) -> Error {
    let status = resp.status();
    let body = axum::body::to_bytes(Body::new(resp.into_body()), 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    Error::Conflict(format!(
        "node {} ({url}) answered {status}: {message}",
        api::quote(node)
    ))
}

/// Resolves once `owner` is marked lost (its reason, as ": …"), checked twice a lease.
async fn declared_lost(store: Store, owner: Node) -> String {
    let every = Duration::from_millis((owner.lease_s * 500).max(1000));
    loop {
        tokio::time::sleep(every).await;
        if let Ok(Some(n)) = store.get_node(&owner.name).await {
            if n.state == NodeState::Lost {
                return n.lost_reason.map(|r| format!(": {r}")).unwrap_or_default();
            }
        }
    }
}

/// An error and its causes, for the message ("client error (Connect): tcp connect error:
/// Connection refused (os error 111)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Headers of one connection, not of the request (RFC 9110 7.6.1); an upgrade keeps
/// `Connection: upgrade` and `Upgrade`, which are what it asks of the next hop.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(n);
    }
    if !upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// Whether a route (as matched: `/v1/sandbox-groups/{group}/sandboxes/{id}/exec`) is one only
/// the sandbox's node can answer: every route under `/sandboxes/{id}` but the reads of the
/// store (the sandbox, its egress audit, its exposed ports) and identity tokens (minted from
/// the store's keys), which any node answers, so they work while the owner is down.
pub(crate) fn owner_only(get: bool, route: &str) -> bool {
    let Some(rest) = route.strip_prefix("/v1/sandbox-groups/{group}/sandboxes/{id}") else {
        return false;
    };
    let read = matches!(rest, "" | "/egress" | "/ports" | "/ports/{port}");
    (rest.is_empty() || rest.starts_with('/')) && !(read && get) && rest != "/identity/token"
}

/// The group and sandbox id of a request only the sandbox's node can answer.
fn owner_route(req: &Request) -> Option<(String, String)> {
    let route = req.extensions().get::<MatchedPath>()?.as_str();
    if !owner_only(req.method() == Method::GET, route) {
        return None;
    }
    let mut segments = req.uri().path().split('/').skip(3);
    let group = segments.next()?.to_string();
    segments.next();
    let id = segments.next()?.to_string();
    Some((group, id))
}

/// The node to forward to, `None` to answer here (the sandbox is this node's, lost, or not
/// there, which the route says itself; or a `resume` of a suspended sandbox whose node is
/// gone and whose files are shared, which this node takes over), or why no node can answer.
async fn owner(
    state: &AppState,
    me: &str,
    (group, id): (&str, &str),
    resume: bool,
) -> Result<Option<(String, Node)>> {
    if api::validate_name("group name", group).is_err() || id.len() > 64 {
        return Ok(None);
    }
    let Some(sb) = state.store.get_sandbox(id).await? else {
        return Ok(None);
    };
    let Some(name) = sb.node.filter(|n| n != me && sb.group == group) else {
        return Ok(None);
    };
    if sb.state == SandboxState::Lost {
        return Ok(None);
    }
    let node = state.store.get_node(&name).await?;
    let Some(gone) = node_gone(node.as_ref()) else {
        return Ok(node.map(|n| (sb.id, n)));
    };
    if sb.state == SandboxState::Suspended {
        let files = state.store.sandbox_files(id).await?.unwrap_or(Files::Local);
        if resume && files == Files::Shared {
            return Ok(None);
        }
        return Err(unreachable_suspended(id, &name, &gone, files));
    }
    Err(Error::Unavailable(format!(
        "sandbox {id} is on node {}, which {gone}: its sandboxes cannot be reached until it \
         comes back",
        api::quote(&name),
    )))
}

/// Why `node` (its row, `None` if there is none) cannot answer for its sandboxes ("was lost (…)", "is not a node of this
/// store"); `None` while it holds its lease.
pub(crate) fn node_gone(node: Option<&Node>) -> Option<String> {
    match node {
        Some(n) if n.state == NodeState::Lost => Some(format!(
            "was lost{}",
            n.lost_reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )),
        Some(_) => None,
        None => Some("is not a node of this store".to_string()),
    }
}

/// The middleware: forwards what only another node can answer, passes the rest on.
pub(crate) async fn forward(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some((group, id)) = owner_route(&req) else {
        return next.run(req).await;
    };
    // Never forwarded twice: the route answers 421 if this node does not run the sandbox.
    if req.headers().contains_key(FORWARDED_BY) {
        return next.run(req).await;
    }
    let Some(me) = state.store.node_name() else {
        return next.run(req).await;
    };
    // Kept to check the key if no node can answer (the request itself is gone by then).
    let headers = req.headers().clone();
    let resume = req.method() == Method::POST
        && req
            .extensions()
            .get::<MatchedPath>()
            .is_some_and(|m| m.as_str().ends_with("/{id}/resume"));
    let err = match owner(&state, &me, (&group, &id), resume).await {
        Ok(None) => return next.run(req).await,
        Ok(Some((sandbox, node))) => match state
            .forwarder
            .send(
                &state.store,
                &node,
                &me,
                &format!("sandbox {sandbox} runs on"),
                req,
            )
            .await
        {
            Ok(resp) => return resp,
            Err(e) => e,
        },
        Err(e) => e,
    };
    // A caller learns that a sandbox is on a node that is lost or down only with a key that
    // may see it, as for every other answer about a sandbox.
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.headers = headers;
    match ShellPrincipal::from_request_parts(&mut parts, &state).await {
        Ok(ShellPrincipal(p)) if p.sees(&group) => err.into_response(),
        Ok(_) => no_group(&group).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::owner_only;

    const SB: &str = "/v1/sandbox-groups/{group}/sandboxes/{id}";

    #[test]
    fn only_what_needs_the_sandboxs_node_is_forwarded() {
        for (get, rest) in [
            (false, ""),
            (false, "/exec"),
            (true, "/files"),
            (false, "/files"),
            (true, "/shell"),
            (true, "/processes"),
            (false, "/suspend"),
            (false, "/ports"),
            (false, "/ports/{port}"),
            (true, "/ports/{port}/{*path}"),
            (true, "/port-forward/{port}"),
        ] {
            assert!(owner_only(get, &format!("{SB}{rest}")), "{get} {rest}");
        }
        for (get, rest) in [
            (true, ""),
            (true, "/egress"),
            (true, "/ports"),
            (true, "/ports/{port}"),
            (false, "/identity/token"),
        ] {
            assert!(!owner_only(get, &format!("{SB}{rest}")), "{get} {rest}");
        }
        for route in [
            "/v1/sandbox-groups/{group}/sandboxes",
            "/v1/sandbox-groups/{group}/sandboxes/{id}x",
            "/v1/nodes",
        ] {
            assert!(!owner_only(false, route), "{route}");
        }
    }
}
