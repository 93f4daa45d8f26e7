//! Interception of the hosts whose rule has a transform (and only those): the stack
//! terminates the guest's TLS with a leaf certificate for the SNI issued by the group's CA,
//! opens its own TLS to the upstream (verified against Mozilla's roots and the operator's
//! `--upstream-ca`), and carries requests across one by one with hyper, HTTP/1.1 or HTTP/2 on
//! either side (whatever each side negotiated by ALPN). Each request's Host or `:authority`
//! must be the name the flow was allowed for. On requests the transform applies to (paths,
//! methods), the guest's copies of its headers are removed and the transform's set, the
//! placeholders resolved through [`crate::transform::Values`]; nothing else in a request is
//! touched. Every injection and every refusal is audited, never with a value.
//!
//! The policy is read again for every request: a rule or a secret that is gone refuses the
//! next request (fail closed), a changed one applies to it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::audit::{Audit, Event, Kind, Verdict};
use crate::{Policy, Protocol, Secret};

/// How long a leaf certificate is valid, and how long one is reused.
const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
const LEAF_REUSE: Duration = Duration::from_secs(86_400);
/// Leaves kept per stack; beyond that the cache starts over.
const MAX_LEAVES: usize = 1024;
const UPSTREAM_HANDSHAKE: Duration = Duration::from_secs(10);

/// A group's interception CA as the daemon keeps it and sends it to the stacks.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSpec {
    /// The CA's common name: the leaves' issuer name is built from it.
    pub name: String,
    pub cert_pem: String,
    pub key_pem: Secret,
}

impl std::fmt::Debug for CaSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSpec").field("name", &self.name).finish()
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "moat");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

impl CaSpec {
    /// A new CA for `group`: ECDSA P-256, valid for ten years. It is not name-constrained:
    /// its names would have to be fixed when the guest's trust is installed, while the hosts
    /// with a transform change with the policy (docs/NETWORK.md).
    pub fn generate(group: &str) -> crate::Result<CaSpec> {
        let err = |e: rcgen::Error| crate::Error::Control(format!("creating the group CA: {e}"));
        let name = format!("moat egress CA ({group})");
        let key = KeyPair::generate().map_err(err)?;
        let mut p = ca_params(&name);
        let now = time_now();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(3650);
        let cert = p.self_signed(&key).map_err(err)?;
        Ok(CaSpec {
            name,
            cert_pem: cert.pem(),
            key_pem: Secret::new(key.serialize_pem()),
        })
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Checks that `pem` holds certificates usable as upstream roots (`--upstream-ca`).
pub fn check_roots(pem: &str) -> crate::Result<()> {
    add_roots(&mut rustls::RootCertStore::empty(), pem).map_err(|m| crate::Error::Invalid {
        field: "upstream_ca".into(),
        message: m,
    })
}

fn add_roots(roots: &mut rustls::RootCertStore, pem: &str) -> std::result::Result<(), String> {
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| format!("not PEM certificates: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("a certificate rustls refuses: {e}"))?;
        n += 1;
    }
    if n == 0 {
        return Err("holds no PEM certificate".into());
    }
    Ok(())
}

/// What one stack intercepts with: the group CA, the leaves issued so far, the upstream TLS
/// settings.
pub struct Interceptor {
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
    upstream: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interceptor")
    }
}

impl Interceptor {
    /// `extra_roots`: PEM certificates trusted upstream besides Mozilla's (`--upstream-ca`).
    pub fn new(ca: &CaSpec, extra_roots: Option<&str>) -> crate::Result<Interceptor> {
        let bad = |what: &str, e: String| crate::Error::Invalid {
            field: what.into(),
            message: e,
        };
        let key =
            KeyPair::from_pem(ca.key_pem.expose()).map_err(|e| bad("ca.key_pem", e.to_string()))?;
        let issuer = Issuer::new(ca_params(&ca.name), key);
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(pem) = extra_roots {
            add_roots(&mut roots, pem).map_err(|m| bad("upstream_ca", m))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut upstream = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls", e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        upstream.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Interceptor {
            issuer,
            leaves: Mutex::new(HashMap::new()),
            upstream: Arc::new(upstream),
        })
    }

    /// The leaf for `name`, issued now or reused.
    fn leaf(&self, name: &str) -> std::result::Result<Arc<CertifiedKey>, String> {
        let mut leaves = self.leaves.lock().expect("leaf cache");
        if let Some((at, k)) = leaves.get(name) {
            if at.elapsed() < LEAF_REUSE {
                return Ok(k.clone());
            }
        }
        let err = |e: rcgen::Error| format!("issuing a certificate for {name}: {e}");
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(vec![name.to_string()]).map_err(err)?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        let now = time_now();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::seconds(LEAF_VALIDITY.as_secs() as i64);
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).map_err(err)?;
        let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| e.to_string())?;
        let ck = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(name.to_string(), (Instant::now(), ck.clone()));
        Ok(ck)
    }

    /// A TLS server configuration presenting a leaf for `name` (ALPN h2, http/1.1).
    pub fn server_config(
        &self,
        name: &str,
    ) -> std::result::Result<Arc<rustls::ServerConfig>, String> {
        let leaf = self.leaf(name)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(leaf)));
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

/// What a flow's interception needs from the stack.
#[derive(Clone)]
pub struct Context {
    /// The name the flow was allowed for (the SNI, or the Host of plain HTTP).
    pub name: String,
    /// The guest's port (443, or 80 when upgraded).
    pub port: u16,
    /// The policy in force now.
    pub policy: Arc<dyn Fn() -> Arc<Policy> + Send + Sync>,
    pub audit: Audit,
}

/// Serves one intercepted flow: `guest` (TLS from the guest when `tls`, else plain HTTP on
/// port 80 upgraded) carried to `upstream`, a TCP connection to the host. Returns why it
/// ended early, if it did.
pub async fn serve<G>(
    icpt: Arc<Interceptor>,
    guest: G,
    upstream: TcpStream,
    tls: bool,
    cx: Context,
) -> std::result::Result<(), String>
where
    G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let server_name =
        ServerName::try_from(cx.name.clone()).map_err(|e| format!("{}: {e}", cx.name))?;
    let connector = tokio_rustls::TlsConnector::from(icpt.upstream.clone());
    let up = tokio::time::timeout(UPSTREAM_HANDSHAKE, connector.connect(server_name, upstream))
        .await
        .map_err(|_| "the upstream TLS handshake timed out".to_string())?
        .map_err(|e| format!("upstream TLS: {e}"))?;
    let h2 = up.get_ref().1.alpn_protocol() == Some(b"h2");
    let sender = if h2 {
        let (s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(up))
                .await
                .map_err(|e| format!("upstream HTTP/2: {e}"))?;
        tokio::spawn(conn);
        Upstream::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up))
            .await
            .map_err(|e| format!("upstream HTTP/1.1: {e}"))?;
        tokio::spawn(conn);
        Upstream::H1(tokio::sync::Mutex::new(s))
    };
    let sender = Arc::new(sender);
    let name = cx.name.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (sender, cx) = (sender.clone(), cx.clone());
        async move { Ok::<_, Infallible>(forward(req, &sender, &cx).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let served = if tls {
        let config = icpt.server_config(&name)?;
        let guest = tokio_rustls::TlsAcceptor::from(config)
            .accept(guest)
            .await
            .map_err(|e| format!("the guest's TLS handshake: {e}"))?;
        builder.serve_connection(TokioIo::new(guest), service).await
    } else {
        builder
            .http1_only()
            .serve_connection(TokioIo::new(guest), service)
            .await
    };
    served.map_err(|e| format!("intercepted HTTP: {e}"))
}

/// The upstream connection's request side.
enum Upstream {
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
    /// One request at a time: HTTP/2 requests from the guest queue here.
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>),
}

type Body = BoxBody<Bytes, hyper::Error>;

/// An answer made here (a refusal), not upstream's.
fn answer(status: StatusCode, why: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("moat: {why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Headers that belong to one connection, not to the request.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// The host of a Host header or authority without its default port, lowercased.
fn host_of(authority: &str, port: u16) -> String {
    let a = authority.to_ascii_lowercase();
    let default = format!(":{port}");
    let a = a.strip_suffix(&default).unwrap_or(&a);
    let a = a.strip_suffix(":443").unwrap_or(a);
    a.strip_suffix('.').unwrap_or(a).to_string()
}

fn event(cx: &Context, verdict: Verdict, rule: Option<usize>, reason: String) -> Event {
    let mut e = Event::new(Kind::Http, verdict, reason);
    e.name = Some(cx.name.clone());
    e.port = Some(cx.port);
    e.rule = rule;
    e
}

async fn forward(mut req: Request<Incoming>, up: &Upstream, cx: &Context) -> Response<Body> {
    let refuse = |status: StatusCode, rule: Option<usize>, why: String| {
        cx.audit.emit(event(cx, Verdict::Deny, rule, why.clone()));
        answer(status, &why)
    };
    // The request's target is the flow's name, whichever way it is given.
    let mut targets = Vec::new();
    if let Some(a) = req.uri().authority() {
        targets.push(a.as_str().to_string());
    }
    for h in req.headers().get_all(HOST) {
        targets.push(String::from_utf8_lossy(h.as_bytes()).into_owned());
    }
    if targets.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            None,
            "a request without Host or :authority".into(),
        );
    }
    if let Some(t) = targets.iter().find(|t| host_of(t, cx.port) != cx.name) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            None,
            format!("request for {t:?} on a connection to {}: Host and :authority must be the TLS server name", cx.name),
        );
    }
    let policy = (cx.policy)();
    let d = policy.decide_name(&cx.name, cx.port, Protocol::Tcp);
    if !d.allow {
        return refuse(
            StatusCode::FORBIDDEN,
            d.rule,
            format!("policy: {}", d.reason),
        );
    }
    let rule = d.rule;
    let transform = rule.and_then(|r| policy.transform(r)).cloned();
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_string();
    for h in HOP_BY_HOP {
        req.headers_mut().remove(*h);
    }
    req.headers_mut().remove(HOST);
    let mut injected = Vec::new();
    if let Some(t) = &transform {
        if t.limits_paths() && !crate::transform::is_plain_path(&path) {
            return refuse(
                StatusCode::BAD_REQUEST,
                rule,
                "the path has dot segments, empty segments or escapes, which a rule's paths \
                 cannot be matched against"
                    .into(),
            );
        }
        if t.applies(&method, &path) {
            for (name, tpl) in &t.headers {
                let value = match tpl.render(policy.values()).await {
                    Ok(v) => v,
                    Err(why) => {
                        return refuse(StatusCode::FORBIDDEN, rule, format!("transform: {why}"))
                    }
                };
                let (Ok(hn), Ok(hv)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value.expose()),
                ) else {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        rule,
                        format!("transform: header {name} is not a valid header"),
                    );
                };
                req.headers_mut().remove(&hn);
                let mut hv = hv;
                hv.set_sensitive(true);
                req.headers_mut().insert(hn, hv);
                injected.push(name.clone());
            }
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let result = match up {
        Upstream::H2(s) => {
            *req.uri_mut() = match Uri::try_from(format!("https://{}{pq}", cx.name)) {
                Ok(u) => u,
                Err(e) => return refuse(StatusCode::BAD_REQUEST, rule, format!("target: {e}")),
            };
            *req.version_mut() = Version::HTTP_2;
            let mut s = s.clone();
            match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            }
        }
        Upstream::H1(s) => {
            *req.uri_mut() = match Uri::try_from(pq) {
                Ok(u) => u,
                Err(e) => return refuse(StatusCode::BAD_REQUEST, rule, format!("target: {e}")),
            };
            *req.version_mut() = Version::HTTP_11;
            if let Ok(h) = HeaderValue::from_str(&cx.name) {
                req.headers_mut().insert(HOST, h);
            }
            let sent = {
                let mut s = s.lock().await;
                match s.ready().await {
                    Ok(()) => Ok(s.send_request(req)),
                    Err(e) => Err(e),
                }
            };
            match sent {
                Ok(f) => f.await,
                Err(e) => Err(e),
            }
        }
    };
    if !injected.is_empty() {
        cx.audit.emit(event(
            cx,
            Verdict::Allow,
            rule,
            format!(
                "injected {} into {method} {}",
                injected.join(", "),
                cut(&path)
            ),
        ));
    }
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            for h in HOP_BY_HOP {
                parts.headers.remove(*h);
            }
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => answer(StatusCode::BAD_GATEWAY, &format!("upstream: {e}")),
    }
}

/// A path for the audit: bounded.
fn cut(p: &str) -> String {
    if p.len() > 200 {
        format!(
            "{}…",
            &p[..p.char_indices().nth(200).map_or(p.len(), |c| c.0)]
        )
    } else {
        p.to_string()
    }
}

/// Whether a flow to `name` on `port` is intercepted: its rule has a transform (on 443, or on
/// 80 when the transform upgrades plain HTTP). An error for a transform flow that cannot be
/// (validation keeps such rules out; this is the stack's own guard).
pub fn wanted(policy: &Policy, name: &str, port: u16) -> std::result::Result<bool, String> {
    let d = policy.decide_name(name, port, Protocol::Tcp);
    let Some(t) = d.rule.and_then(|r| policy.transform(r)) else {
        return Ok(false);
    };
    match port {
        443 => Ok(true),
        80 if t.upgrade_to_https => Ok(true),
        _ => Err(format!(
            "port {port} of {name}: a transform applies to HTTPS on 443 (or plain HTTP on 80 \
             with upgrade_to_https) only"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EgressSpec;
    use serde_json::{json, Value};
    use tokio::sync::mpsc;

    /// What the upstream saw of one request.
    #[derive(Debug)]
    struct Seen {
        target: String,
        auth: Vec<String>,
        other: Vec<String>,
        body: usize,
        version: Version,
    }

    /// An HTTPS server for api.test with a certificate of `ca`, HTTP/1.1 and HTTP/2, that
    /// reports every request and answers with its Authorization headers.
    async fn upstream(ca: &CaSpec) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Seen>) {
        let certs = Interceptor::new(ca, None).unwrap();
        let config = certs.server_config("api.test").unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let (config, tx) = (config.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(s).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let all = |n: &str| {
                                req.headers()
                                    .get_all(n)
                                    .iter()
                                    .map(|v| v.to_str().unwrap().to_string())
                                    .collect::<Vec<_>>()
                            };
                            let (auth, other) = (all("authorization"), all("x-other"));
                            let target = format!("{} {}", req.method(), req.uri().path());
                            let version = req.version();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let reply = auth.join("|");
                            let _ = tx.send(Seen {
                                target,
                                auth,
                                other,
                                body: body.len(),
                                version,
                            });
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(reply))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (addr, rx)
    }

    struct Setup {
        icpt: Arc<Interceptor>,
        group_ca: CaSpec,
        addr: std::net::SocketAddr,
        seen: mpsc::UnboundedReceiver<Seen>,
        policy: Arc<Mutex<Arc<Policy>>>,
        events: mpsc::Receiver<Event>,
        audit: Audit,
    }

    fn policy(secret: Option<&str>) -> Arc<Policy> {
        let spec: EgressSpec = serde_json::from_value(json!({"rules": [{"host": "api.test",
            "ports": [443], "transform": {"headers": {"Authorization": "Bearer ${secret:k}"},
            "paths": ["/v1"]}}]}))
        .unwrap();
        let secrets = secret
            .map(|v| [("k".to_string(), Secret::new(v.into()))].into())
            .unwrap_or_default();
        Arc::new(Policy::new(spec).unwrap().with_values(secrets, None))
    }

    async fn setup() -> Setup {
        let upstream_ca = CaSpec::generate("upstream").unwrap();
        let group_ca = CaSpec::generate("g").unwrap();
        let (addr, seen) = upstream(&upstream_ca).await;
        let icpt = Arc::new(Interceptor::new(&group_ca, Some(&upstream_ca.cert_pem)).unwrap());
        let (audit, events) = Audit::channel(1000);
        Setup {
            icpt,
            group_ca,
            addr,
            seen,
            policy: Arc::new(Mutex::new(policy(Some("sk-live-1")))),
            events,
            audit,
        }
    }

    /// A guest TLS connection through a new intercepted flow, trusting only the group CA.
    async fn connect(
        s: &Setup,
        alpn: &[u8],
        sni: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::io::DuplexStream> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let policy = s.policy.clone();
        let cx = Context {
            name: "api.test".into(),
            port: 443,
            policy: Arc::new(move || policy.lock().unwrap().clone()),
            audit: s.audit.clone(),
        };
        let up = TcpStream::connect(s.addr).await.unwrap();
        tokio::spawn(serve(s.icpt.clone(), theirs, up, true, cx));
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(s.group_ca.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(sni.to_string()).unwrap(), ours)
            .await
            .unwrap()
    }

    type Sender1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

    async fn h1(s: &Setup) -> Sender1 {
        let tls = connect(s, b"http/1.1", "api.test").await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    async fn get(send: &mut Sender1, path: &str, host: &str, auth: Option<&str>) -> (u16, String) {
        let mut req = Request::get(path)
            .header("host", host)
            .header("x-other", "kept");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn http1_headers_are_replaced_only_where_the_transform_applies() {
        let mut s = setup().await;
        let mut send = h1(&s).await;
        // The guest's own Authorization is replaced, not added to.
        let (st, body) = get(&mut send, "/v1/chat", "api.test", Some("Bearer guest")).await;
        assert_eq!((st, body.as_str()), (200, "Bearer sk-live-1"));
        let seen = s.seen.recv().await.unwrap();
        assert_eq!(seen.auth, vec!["Bearer sk-live-1"]);
        assert_eq!(seen.other, vec!["kept"], "other headers pass untouched");
        assert_eq!(seen.target, "GET /v1/chat");
        // Outside the transform's paths: nothing injected, the guest's header kept.
        let (st, body) = get(&mut send, "/v10", "api.test", Some("Bearer guest")).await;
        assert_eq!((st, body.as_str()), (200, "Bearer guest"));
        // A path that a server would normalise into /v1 is refused, not injected.
        let (st, body) = get(&mut send, "/x/../v1/a", "api.test", None).await;
        assert_eq!(st, 400, "{body}");
        // Host must be the SNI (default port allowed).
        let (st, body) = get(&mut send, "/v1/a", "api.test:443", None).await;
        assert_eq!(st, 200, "{body}");
        let (st, body) = get(&mut send, "/v1/a", "evil.test", None).await;
        assert_eq!(st, 421, "{body}");
        assert!(body.contains("TLS server name"), "{body}");
        // A deleted secret: the request is refused, never sent without it.
        *s.policy.lock().unwrap() = policy(None);
        let (st, body) = get(&mut send, "/v1/a", "api.test", Some("Bearer guest")).await;
        assert_eq!(st, 403, "{body}");
        assert!(
            body.contains("\"k\"") && body.contains("does not exist"),
            "{body}"
        );
        // Only the requests that reached upstream were seen there.
        let mut n = 0;
        while let Ok(seen) = s.seen.try_recv() {
            assert!(!seen.target.contains("evil") && seen.target != "GET /x/../v1/a");
            n += 1;
        }
        assert_eq!(n, 2, "/v10 and /v1/a with the default port");
        // Audited: injections and refusals, with header names but never the value.
        let mut events = Vec::new();
        while let Ok(e) = s.events.try_recv() {
            events.push(e);
        }
        assert!(events.iter().all(|e| e.kind == Kind::Http));
        assert!(events.iter().any(|e| e.verdict == Verdict::Allow
            && e.reason.contains("authorization")
            && e.rule == Some(0)));
        assert!(events
            .iter()
            .any(|e| e.verdict == Verdict::Deny && e.reason.contains("evil.test")));
        assert!(events
            .iter()
            .any(|e| e.verdict == Verdict::Deny && e.reason.contains("does not exist")));
        let text = format!("{events:?}");
        assert!(!text.contains("sk-live"), "{text}");
    }

    #[tokio::test]
    async fn http2_and_a_large_upload_are_carried_with_the_injection() {
        let mut s = setup().await;
        let tls = connect(&s, b"h2", "api.test").await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let big = Bytes::from(vec![7u8; 10 << 20]);
        let req = Request::post("https://api.test/v1/upload")
            .header("authorization", "Bearer guest")
            .body(Full::new(big))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), Version::HTTP_2);
        let seen = s.seen.recv().await.unwrap();
        assert_eq!(seen.body, 10 << 20);
        assert_eq!(seen.auth, vec!["Bearer sk-live-1"]);
        assert_eq!(seen.target, "POST /v1/upload");
        assert_eq!(seen.version, Version::HTTP_2, "h2 upstream too");
        // :authority other than the SNI is refused.
        let req = Request::get("https://evil.test/v1/x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 421);
    }

    /// Plain HTTP from the guest on port 80 is intercepted only for a rule that asks for
    /// `upgrade_to_https`, and then goes upstream as HTTPS (the test upstream speaks TLS only)
    /// with the injection; without the upgrade, a transform on port 80 is refused by
    /// validation and by the stack's guard ([`wanted`]), and a rule without a transform is
    /// never intercepted.
    #[tokio::test]
    async fn plain_http_is_upgraded_to_https_only_when_the_rule_asks() {
        let mut s = setup().await;
        let rule = |upgrade: bool, ports: Value| {
            serde_json::from_value::<EgressSpec>(json!({"rules": [{"host": "api.test",
                "ports": ports, "transform": {"headers": {"Authorization": "Bearer ${secret:k}"},
                "upgrade_to_https": upgrade}}, {"host": "plain.test", "ports": [80]}]}))
            .unwrap()
        };
        let upgraded = Arc::new(
            Policy::new(rule(true, json!([80, 443])))
                .unwrap()
                .with_values(
                    [("k".to_string(), Secret::new("sk-up".into()))].into(),
                    None,
                ),
        );
        assert_eq!(wanted(&upgraded, "api.test", 80), Ok(true));
        assert_eq!(wanted(&upgraded, "api.test", 443), Ok(true));
        assert_eq!(
            wanted(&upgraded, "plain.test", 80),
            Ok(false),
            "no transform"
        );
        let e = Policy::new(rule(false, json!([80, 443])))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("egress.rules[0].ports") && e.contains("set \"upgrade_to_https\": true"),
            "{e}"
        );
        // An HTTPS-only transform rule does not cover port 80: plain HTTP there is denied by
        // the policy and never intercepted.
        let https_only = Policy::new(rule(false, json!([443]))).unwrap();
        assert!(!https_only.decide_name("api.test", 80, Protocol::Tcp).allow);
        assert_eq!(wanted(&https_only, "api.test", 80), Ok(false));

        *s.policy.lock().unwrap() = upgraded;
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let policy = s.policy.clone();
        let cx = Context {
            name: "api.test".into(),
            port: 80,
            policy: Arc::new(move || policy.lock().unwrap().clone()),
            audit: s.audit.clone(),
        };
        let up = TcpStream::connect(s.addr).await.unwrap();
        let served = tokio::spawn(serve(s.icpt.clone(), theirs, up, false, cx));
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (st, body) = get(&mut send, "/v1/chat", "api.test", Some("Bearer guest")).await;
        assert_eq!((st, body.as_str()), (200, "Bearer sk-up"));
        let seen = s.seen.recv().await.unwrap();
        assert_eq!(
            seen.auth,
            vec!["Bearer sk-up"],
            "replaced, over TLS upstream"
        );
        assert_eq!(seen.target, "GET /v1/chat");
        // Host with the plain port is the name; another name is refused.
        let (st, _) = get(&mut send, "/v1/a", "api.test:80", None).await;
        assert_eq!(st, 200);
        let (st, body) = get(&mut send, "/v1/a", "evil.test", None).await;
        assert_eq!(st, 421, "{body}");
        drop(send);
        served.await.unwrap().unwrap();
        let mut events = Vec::new();
        while let Ok(e) = s.events.try_recv() {
            events.push(e);
        }
        assert!(
            events
                .iter()
                .any(|e| e.verdict == Verdict::Allow && e.port == Some(80)),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn the_guest_sees_a_leaf_of_the_group_ca_for_its_sni_only() {
        let s = setup().await;
        let tls = connect(&s, b"http/1.1", "api.test").await;
        let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
        let again = s.icpt.leaf("api.test").unwrap();
        assert_eq!(leaf, &again.cert[0], "leaves are cached per name");
        // An upstream not signed by a trusted CA is refused (no --upstream-ca for it).
        let other = Interceptor::new(&s.group_ca, None).unwrap();
        let (ours, theirs) = tokio::io::duplex(1024);
        drop(ours);
        let up = TcpStream::connect(s.addr).await.unwrap();
        let policy = s.policy.clone();
        let cx = Context {
            name: "api.test".into(),
            port: 443,
            policy: Arc::new(move || policy.lock().unwrap().clone()),
            audit: s.audit.clone(),
        };
        let e = serve(Arc::new(other), theirs, up, true, cx)
            .await
            .unwrap_err();
        assert!(e.contains("upstream TLS"), "{e}");
    }
}
