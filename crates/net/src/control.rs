//! The control channel between the daemon and one sandbox's stack, and the stack's process
//! entry. The channel is a listening Unix socket the stack inherits (like QEMU's QMP socket),
//! so a daemon that restarts can connect again; while no daemon is connected the stack goes on
//! with the policy it has, and audit events wait in a bounded queue.
//!
//! Protocol (version 1): JSON, one object per line, each with `"v": 1` and a `"type"`. Message
//! types and fields are only ever added; a peer ignores fields it does not know and answers
//! an unknown type with an error.
//!
//! stack → daemon: `hello {version, started, dropped}` on every connection; `ok` or
//! `error {message}` after each request; `audit {event}` for every decision; `mint {id,
//! audience, delivery?}` when stack code needs a workload-identity token (a [`Minter`]:
//! `egress` for a transform, `endpoint` for guest code through the in-guest endpoint);
//! `identity_refused {audience, reason}` when the in-guest endpoint refused a request itself.
//! daemon → stack: `start {egress, hosts?, resolver?, limits?, secrets?, ca?, upstream_ca?,
//! identity_header?}`
//! once, first (nothing is forwarded before it); `policy {egress, secrets?}` at any time after,
//! applied to the next decision and to live flows (those it denies are reset); `limits
//! {limits}` at any time after, applied from then on; `token {id, token?, expires_on?,
//! error?}` answers a `mint` (no `ok` follows it). The daemon decides which sandbox a `mint` is
//! for from the control connection it arrived on: nothing in it names a sandbox.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::audit::{Audit, Event};
use crate::device::take_frame;
use crate::dns::Resolver;
use crate::intercept::{CaSpec, Interceptor};
use crate::stack::{self, Limits};
use crate::{EgressSpec, Error, Floor, HostsFile, Policy, Result, Secret};

pub const VERSION: u32 = 1;
/// Audit events kept while no daemon reads them.
const AUDIT_QUEUE: usize = 4096;

/// A sandbox's network limits (a group's `network_limits`, and what the daemon sends its
/// stacks); an absent field keeps its default. Exceeding one is audited, never fatal: a flow
/// or query over a count is refused, and the bandwidth cap slows the sandbox's flows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Concurrent TCP flows and UDP relays, 1–1024 (default 256; each TCP flow holds 512 KiB
    /// of buffers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1024)]
    pub max_flows: Option<usize>,
    /// New flows per second, 1–10000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10000)]
    pub new_flows_per_s: Option<u32>,
    /// DNS queries per second, 1–10000 (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10000)]
    pub dns_qps: Option<u32>,
    /// Bytes per second across all of the sandbox's TCP flows, both directions together,
    /// 16384 (16 KiB/s) – 10^11 (default: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 16384, maximum = 100000000000_u64)]
    pub bandwidth: Option<u64>,
}

/// The bounds of [`LimitsSpec`]'s fields.
const MAX_FLOWS: usize = 1024;
const MAX_RATE: u32 = 10_000;
/// Below about ten packets a second a TCP flow stalls rather than slows.
const MIN_BANDWIDTH: u64 = 16 * 1024;
const MAX_BANDWIDTH: u64 = 100_000_000_000;

impl LimitsSpec {
    /// The limits these give, or an error naming the field (`limits.max_flows`) and what is
    /// allowed.
    pub fn validate(&self) -> Result<Limits> {
        fn check<T: PartialOrd + std::fmt::Display>(
            field: &str,
            v: Option<T>,
            min: T,
            max: T,
            what: &str,
        ) -> Result<()> {
            match v {
                Some(x) if x < min || x > max => Err(Error::Invalid {
                    field: format!("limits.{field}"),
                    message: format!("{x}: allowed is {min}–{max} {what}"),
                }),
                _ => Ok(()),
            }
        }
        check("max_flows", self.max_flows, 1, MAX_FLOWS, "flows")?;
        check(
            "new_flows_per_s",
            self.new_flows_per_s,
            1,
            MAX_RATE,
            "per second",
        )?;
        check("dns_qps", self.dns_qps, 1, MAX_RATE, "per second")?;
        check(
            "bandwidth",
            self.bandwidth,
            MIN_BANDWIDTH,
            MAX_BANDWIDTH,
            "bytes per second, or absent for unlimited",
        )?;
        let d = Limits::default();
        Ok(Limits {
            max_flows: self.max_flows.unwrap_or(d.max_flows),
            new_flows_per_s: self.new_flows_per_s.unwrap_or(d.new_flows_per_s),
            dns_qps: self.dns_qps.unwrap_or(d.dns_qps),
            bandwidth: self.bandwidth,
        })
    }
}

/// Daemon → stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Start {
        egress: EgressSpec,
        /// hosts(5) text of the operator's egress hosts file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hosts: Option<String>,
        /// The upstream resolver (`ip:port`); absent: the host's own (/etc/resolv.conf).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resolver: Option<SocketAddr>,
        #[serde(default)]
        limits: LimitsSpec,
        /// The values of the secrets the policy's transforms use (only those).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        secrets: BTreeMap<String, Secret>,
        /// The group's CA, for the hosts with a transform; absent: none is intercepted (a
        /// transform flow is refused).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca: Option<Box<CaSpec>>,
        /// PEM certificates trusted upstream besides Mozilla's roots (`--upstream-ca`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upstream_ca: Option<String>,
        /// The sandbox incarnation's `IDENTITY_HEADER`: the stack serves the in-guest
        /// identity endpoint (`metadata.rs`) with it. Absent: 169.254.169.254 is not served.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity_header: Option<String>,
    },
    Policy {
        egress: EgressSpec,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        secrets: BTreeMap<String, Secret>,
    },
    Limits {
        limits: LimitsSpec,
    },
    /// The answer to `mint {id}`: a token, or why there is none.
    Token {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Unix seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_on: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// Stack → daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        version: u32,
        /// False until a `start` was accepted.
        started: bool,
        /// Audit events lost so far because no daemon read them in time.
        dropped: u64,
    },
    Ok,
    Error {
        message: String,
    },
    Audit {
        event: Event,
    },
    /// A workload-identity token for `audience` is wanted (answered by `token {id}`).
    Mint {
        id: u64,
        audience: String,
        #[serde(default)]
        delivery: Delivery,
    },
    /// The in-guest endpoint refused a request before any mint (for the identity audit).
    IdentityRefused {
        audience: String,
        reason: String,
    },
}

/// Who a token is for: a transform adding it to a request (`egress`), or guest code that
/// asked the in-guest endpoint (`endpoint`, only when the group's `identity.in_guest` is on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    #[default]
    Egress,
    Endpoint,
}

/// What the stack sends unasked: an audit event, a token request, or an in-guest endpoint's
/// refusal.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Audit(Event),
    Mint {
        id: u64,
        audience: String,
        delivery: Delivery,
    },
    IdentityRefused {
        audience: String,
        reason: String,
    },
}

/// A workload-identity token, as the daemon minted it for this stack's sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The JWT: a bearer credential; never log it.
    pub token: String,
    /// Unix seconds.
    pub expires_on: i64,
}

/// How long [`Minter::mint`] waits for the daemon.
const MINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What stack code asks of the control loop about identity.
#[derive(Debug)]
pub enum MintAsk {
    Mint {
        audience: String,
        delivery: Delivery,
        done: tokio::sync::oneshot::Sender<Result<Token>>,
    },
    Refused {
        audience: String,
        reason: String,
    },
}

/// Stack code's handle for workload-identity tokens of its sandbox: each `mint` goes to the
/// daemon over the control channel, which decides (the group's identity settings, the
/// audience allowlist) and audits. Cloneable; fails when no daemon is connected.
#[derive(Debug, Clone)]
pub struct Minter {
    asks: tokio::sync::mpsc::Sender<MintAsk>,
}

impl Minter {
    /// A minter and the receiving end the control loop serves.
    pub fn channel() -> (Minter, tokio::sync::mpsc::Receiver<MintAsk>) {
        let (asks, rx) = tokio::sync::mpsc::channel(64);
        (Minter { asks }, rx)
    }

    /// A token for `audience`, or why the daemon (or the channel) refused.
    pub async fn mint(&self, audience: &str, delivery: Delivery) -> Result<Token> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let gone = || Error::Control("the network stack's control loop is gone".into());
        let ask = MintAsk::Mint {
            audience: audience.to_string(),
            delivery,
            done,
        };
        self.asks.send(ask).await.map_err(|_| gone())?;
        match tokio::time::timeout(MINT_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(Error::Control(format!(
                "no token from the daemon within {} s",
                MINT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Tells the daemon that the in-guest endpoint refused a request for `audience` (empty
    /// if none was named). Dropped when the channel is full or no daemon is connected: a
    /// flood must not stall the stack.
    pub fn refused(&self, audience: &str, reason: &str) {
        let _ = self.asks.try_send(MintAsk::Refused {
            audience: audience.to_string(),
            reason: reason.to_string(),
        });
    }
}

/// The stack's side of the mints in flight: asks sent to the daemon, by id.
#[derive(Default)]
struct Mints {
    next: u64,
    waiting: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Result<Token>>>,
}

impl Mints {
    /// Sends `ask` to the daemon on `conn`, or fails it at once when there is none. False
    /// when the connection failed.
    async fn ask(&mut self, conn: Option<&mut Conn>, ask: MintAsk) -> bool {
        match (ask, conn) {
            (MintAsk::Mint { done, .. }, None) => {
                let _ = done.send(Err(Error::Control(
                    "no daemon is connected to mint a token".into(),
                )));
                true
            }
            (MintAsk::Refused { .. }, None) => true,
            (
                MintAsk::Mint {
                    audience,
                    delivery,
                    done,
                },
                Some(c),
            ) => {
                self.next += 1;
                let id = self.next;
                self.waiting.insert(id, done);
                let mint = Reply::Mint {
                    id,
                    audience,
                    delivery,
                };
                c.send(&mint).await.is_ok()
            }
            (MintAsk::Refused { audience, reason }, Some(c)) => c
                .send(&Reply::IdentityRefused { audience, reason })
                .await
                .is_ok(),
        }
    }

    fn answer(
        &mut self,
        id: u64,
        token: Option<String>,
        expires_on: Option<i64>,
        error: Option<String>,
    ) {
        let Some(done) = self.waiting.remove(&id) else {
            return;
        };
        let r = match (token, expires_on, error) {
            (Some(token), Some(expires_on), None) => Ok(Token { token, expires_on }),
            (_, _, Some(e)) => Err(Error::Control(e)),
            _ => Err(Error::Control(
                "the daemon's token answer is incomplete".into(),
            )),
        };
        let _ = done.send(r);
    }

    /// The daemon went away: what it was asked will not be answered.
    fn fail_all(&mut self) {
        for (_, done) in self.waiting.drain() {
            let _ = done.send(Err(Error::Control(
                "the daemon disconnected before answering".into(),
            )));
        }
    }
}

/// One line on the wire: the message and its version.
#[derive(Debug, Serialize, Deserialize)]
struct Line<T> {
    v: u32,
    #[serde(flatten)]
    msg: T,
}

/// Encodes one message as a line (with its newline).
pub fn encode<T: Serialize>(msg: &T) -> String {
    let mut s = serde_json::to_string(&Line { v: VERSION, msg }).expect("messages serialise");
    s.push('\n');
    s
}

/// Decodes one line; the error says what was wrong.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &str) -> std::result::Result<T, String> {
    let raw: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    match raw.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => return Err(format!("protocol version {v}: this stack speaks {VERSION}")),
        None => return Err("missing \"v\"".into()),
    }
    let line: Line<T> = serde_json::from_value(raw).map_err(|e| e.to_string())?;
    Ok(line.msg)
}

/// The daemon's end of the control channel: requests out, their answers back, audit events
/// in between handed to the caller.
pub struct Client {
    lines: Lines<BufReader<OwnedReadHalf>>,
    tx: OwnedWriteHalf,
    /// Token requests and refusals that came while a request waited for its answer.
    mints: std::collections::VecDeque<Incoming>,
}

impl Client {
    /// Connects to a stack's control socket and reads its `hello`.
    pub async fn connect(path: &std::path::Path) -> Result<(Client, Reply)> {
        let context = format!("the network stack's control socket {}", path.display());
        let s = UnixStream::connect(path).await.map_err(io(&context))?;
        let (rx, tx) = s.into_split();
        let mut c = Client {
            lines: BufReader::new(rx).lines(),
            tx,
            mints: Default::default(),
        };
        match c.next().await? {
            Some(hello @ Reply::Hello { .. }) => Ok((c, hello)),
            other => Err(Error::Control(format!(
                "expected hello from the network stack, got {other:?}"
            ))),
        }
    }

    /// Sends `req` and waits for its answer; audit events that come first go to `on_audit`.
    pub async fn request(&mut self, req: &Request, mut on_audit: impl FnMut(Event)) -> Result<()> {
        self.tx
            .write_all(encode(req).as_bytes())
            .await
            .map_err(io("writing to the network stack"))?;
        loop {
            match self.next().await? {
                Some(Reply::Ok) => return Ok(()),
                Some(Reply::Error { message }) => return Err(Error::Control(message)),
                Some(Reply::Audit { event }) => on_audit(event),
                Some(Reply::Mint {
                    id,
                    audience,
                    delivery,
                }) => self.mints.push_back(Incoming::Mint {
                    id,
                    audience,
                    delivery,
                }),
                Some(Reply::IdentityRefused { audience, reason }) => self
                    .mints
                    .push_back(Incoming::IdentityRefused { audience, reason }),
                Some(Reply::Hello { .. }) => {}
                None => {
                    return Err(Error::Control(
                        "the network stack closed the control connection".into(),
                    ))
                }
            }
        }
    }

    /// The next audit event, token request or refusal; `None` when the stack is gone.
    pub async fn next_incoming(&mut self) -> Result<Option<Incoming>> {
        if let Some(m) = self.mints.pop_front() {
            return Ok(Some(m));
        }
        loop {
            match self.next().await? {
                Some(Reply::Audit { event }) => return Ok(Some(Incoming::Audit(event))),
                Some(Reply::Mint {
                    id,
                    audience,
                    delivery,
                }) => {
                    return Ok(Some(Incoming::Mint {
                        id,
                        audience,
                        delivery,
                    }))
                }
                Some(Reply::IdentityRefused { audience, reason }) => {
                    return Ok(Some(Incoming::IdentityRefused { audience, reason }))
                }
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }

    /// Answers the stack's `mint {id}` (nothing comes back for it).
    pub async fn answer_mint(
        &mut self,
        id: u64,
        minted: std::result::Result<Token, String>,
    ) -> Result<()> {
        let answer = match minted {
            Ok(t) => Request::Token {
                id,
                token: Some(t.token),
                expires_on: Some(t.expires_on),
                error: None,
            },
            Err(e) => Request::Token {
                id,
                token: None,
                expires_on: None,
                error: Some(e),
            },
        };
        self.tx
            .write_all(encode(&answer).as_bytes())
            .await
            .map_err(io("writing to the network stack"))
    }

    async fn next(&mut self) -> Result<Option<Reply>> {
        let line = self
            .lines
            .next_line()
            .await
            .map_err(io("reading from the network stack"))?;
        line.map(|l| decode(&l).map_err(Error::Control)).transpose()
    }
}

/// The upstream resolver of this host: the first `nameserver` of /etc/resolv.conf.
pub fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<std::net::IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// The stack process: serves the guest's stream-netdev socket `guest` with the policy the
/// daemon sends on the listening control socket `control`, and connections to the guest's
/// ports asked for on the listening socket `ports` (`ingress.rs`), until QEMU closes `guest`.
/// Blocks; runs its own single-threaded runtime.
pub fn run(guest: OwnedFd, control: OwnedFd, ports: OwnedFd) -> Result<()> {
    let (minter, asks) = Minter::channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io {
            context: "starting the stack's runtime".into(),
            source: e,
        })?;
    rt.block_on(run_async(guest, control, ports, minter, asks))
}

struct Conn {
    lines: Lines<BufReader<OwnedReadHalf>>,
    tx: OwnedWriteHalf,
}

impl Conn {
    async fn send(&mut self, r: &Reply) -> std::io::Result<()> {
        self.tx.write_all(encode(r).as_bytes()).await
    }
}

fn io(context: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        context: context.to_string(),
        source,
    }
}

async fn accept(l: &UnixListener, started: bool, audit: &Audit) -> Result<Conn> {
    let (s, _) = l
        .accept()
        .await
        .map_err(io("accepting a control connection"))?;
    let (rx, tx) = UnixStream::into_split(s);
    let mut c = Conn {
        lines: BufReader::new(rx).lines(),
        tx,
    };
    let hello = Reply::Hello {
        version: VERSION,
        started,
        dropped: audit.dropped(),
    };
    // A daemon that is gone already is noticed at the next read.
    let _ = c.send(&hello).await;
    Ok(c)
}

/// The next line; `None` when the connection ended. Only reads, so it is safe to cancel.
async fn next_line(c: &mut Conn) -> Option<String> {
    c.lines.next_line().await.ok().flatten()
}

/// The request on `line`, or the error already answered for it.
async fn request(c: &mut Conn, line: &str) -> Option<Request> {
    match decode::<Request>(line) {
        Ok(r) => Some(r),
        Err(message) => {
            let _ = c.send(&Reply::Error { message }).await;
            None
        }
    }
}

fn listening(fd: OwnedFd, what: &str) -> Result<UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(io(what))?;
    UnixListener::from_std(listener).map_err(io(what))
}

async fn run_async(
    guest: OwnedFd,
    control: OwnedFd,
    ports: OwnedFd,
    minter: Minter,
    mut asks: tokio::sync::mpsc::Receiver<MintAsk>,
) -> Result<()> {
    let listener = listening(control, "the control socket")?;
    let (inbound_started, inbound) = crate::ingress::channel(listening(ports, "the port socket")?);
    let guest = std::os::unix::net::UnixStream::from(guest);
    guest
        .set_nonblocking(true)
        .map_err(io("the guest socket"))?;
    let guest = UnixStream::from_std(guest).map_err(io("the guest socket"))?;
    let (audit, mut events) = Audit::channel(AUDIT_QUEUE);

    // Nothing is served before the daemon's `start`: the guest's frames are read and dropped
    // (so QEMU never stalls on a full socket), and a VM that ends first ends the stack.
    let (mut guest_rx, guest_tx) = guest.into_split();
    let mut early = BytesMut::with_capacity(64 * 1024);
    let mut conn: Option<Conn> = None;
    let (policy, resolver, limits, intercept, metadata) = loop {
        let line = tokio::select! {
            r = guest_rx.read_buf(&mut early) => {
                if r.map_err(io("the guest socket"))? == 0 {
                    return Ok(());
                }
                while take_frame(&mut early)
                    .map_err(|m| Error::Io { context: m, source: std::io::ErrorKind::InvalidData.into() })?
                    .is_some()
                {}
                early.reserve(64 * 1024);
                continue;
            }
            c = accept(&listener, false, &audit), if conn.is_none() => {
                conn = Some(c?);
                continue;
            }
            line = async { next_line(conn.as_mut().expect("guarded")).await }, if conn.is_some() => line,
        };
        let Some(line) = line else {
            conn = None;
            continue;
        };
        let conn = conn.as_mut().expect("a line came from it");
        match request(conn, &line).await {
            None => {}
            Some(Request::Policy { .. } | Request::Limits { .. } | Request::Token { .. }) => {
                let _ = conn
                    .send(&Reply::Error {
                        message: "send start first".into(),
                    })
                    .await;
            }
            Some(Request::Start {
                egress,
                hosts,
                resolver,
                limits,
                secrets,
                ca,
                upstream_ca,
                identity_header,
            }) => match start(egress, hosts, resolver, limits, ca.map(|c| *c), upstream_ca)
                .and_then(|s| check_identity_header(identity_header.as_deref()).map(|()| s))
            {
                Ok((policy, resolver, limits, intercept)) => {
                    let _ = conn.send(&Reply::Ok).await;
                    let policy = policy.with_values(secrets, Some(minter.clone()));
                    let metadata = identity_header
                        .map(|h| Arc::new(crate::metadata::Server::new(h, minter.clone())));
                    break (policy, resolver, limits, intercept, metadata);
                }
                Err(e) => {
                    let _ = conn
                        .send(&Reply::Error {
                            message: e.to_string(),
                        })
                        .await;
                }
            },
        }
    };
    let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
    let (limits_tx, limits_rx) = watch::channel(limits);
    inbound_started.send_replace(true);
    // The bytes of a frame that was half read when `start` came go first.
    let guest = tokio::io::join(std::io::Cursor::new(early).chain(guest_rx), guest_tx);
    let serve = stack::serve(
        guest,
        Arc::new(resolver),
        policy_rx,
        audit.clone(),
        limits_rx,
        inbound,
        stack::Services {
            intercept,
            metadata,
        },
    );
    tokio::pin!(serve);
    let mut mints = Mints::default();
    loop {
        tokio::select! {
            r = &mut serve => return r,
            c = listener.accept() => {
                // A new daemon replaces the old connection.
                if let Ok((s, _)) = c {
                    let (rx, tx) = s.into_split();
                    let mut c = Conn { lines: BufReader::new(rx).lines(), tx };
                    let _ = c.send(&Reply::Hello { version: VERSION, started: true, dropped: audit.dropped() }).await;
                    mints.fail_all();
                    conn = Some(c);
                }
            }
            line = async { next_line(conn.as_mut().expect("guarded")).await }, if conn.is_some() => {
                let c = conn.as_mut().expect("guarded");
                let Some(line) = line else {
                    conn = None;
                    mints.fail_all();
                    continue;
                };
                let reply = match request(c, &line).await {
                    None => continue,
                    Some(Request::Token { id, token, expires_on, error }) => {
                        mints.answer(id, token, expires_on, error);
                        continue;
                    }
                    Some(Request::Start { .. }) => Reply::Error { message: "already started".into() },
                    Some(Request::Policy { egress, secrets }) => match Policy::new(egress) {
                        Ok(p) => { policy_tx.send_replace(Arc::new(p.with_values(secrets, Some(minter.clone())))); Reply::Ok }
                        Err(e) => Reply::Error { message: e.to_string() },
                    },
                    Some(Request::Limits { limits }) => match limits.validate() {
                        Ok(l) => { limits_tx.send_replace(l); Reply::Ok }
                        Err(e) => Reply::Error { message: e.to_string() },
                    },
                };
                if c.send(&reply).await.is_err() {
                    conn = None;
                }
            }
            Some(ask) = asks.recv() => {
                if !mints.ask(conn.as_mut(), ask).await {
                    conn = None;
                    mints.fail_all();
                }
            }
            Some(event) = events.recv(), if conn.is_some() => {
                let c = conn.as_mut().expect("guarded");
                if c.send(&Reply::Audit { event }).await.is_err() {
                    conn = None;
                }
            }
        }
    }
}

/// An `IDENTITY_HEADER` goes into HTTP headers and the guest's env: 16–256 printable ASCII
/// characters without spaces.
fn check_identity_header(h: Option<&str>) -> Result<()> {
    match h {
        Some(h) if !(16..=256).contains(&h.len()) || !h.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(Error::Invalid {
                field: "identity_header".into(),
                message: "allowed are 16–256 printable ASCII characters without spaces".into(),
            })
        }
        _ => Ok(()),
    }
}

fn start(
    egress: EgressSpec,
    hosts: Option<String>,
    resolver: Option<SocketAddr>,
    limits: LimitsSpec,
    ca: Option<CaSpec>,
    upstream_ca: Option<String>,
) -> Result<(Policy, Resolver, Limits, Option<Arc<Interceptor>>)> {
    let policy = Policy::new(egress)?;
    let intercept = match &ca {
        Some(ca) => Some(Arc::new(Interceptor::new(ca, upstream_ca.as_deref())?)),
        None => None,
    };
    let hosts = match hosts {
        Some(text) => HostsFile::parse(&text).map_err(|(line, message)| Error::HostsFile {
            path: "hosts".into(),
            line,
            message,
        })?,
        None => HostsFile::default(),
    };
    let limits = limits.validate()?;
    let floor = Floor::with_host_addrs()?;
    let upstream = resolver.or_else(system_resolver);
    Ok((
        policy,
        Resolver::new(upstream, hosts, floor),
        limits,
        intercept,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A listening port socket in `dir` for a stack under test.
    fn ports_socket(dir: &std::path::Path) -> OwnedFd {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("ports-{n}.sock"));
        OwnedFd::from(std::os::unix::net::UnixListener::bind(path).unwrap())
    }

    #[test]
    fn wire_shapes_are_stable() {
        assert_eq!(
            encode(&Reply::Hello {
                version: 1,
                started: false,
                dropped: 0
            }),
            "{\"v\":1,\"type\":\"hello\",\"version\":1,\"started\":false,\"dropped\":0}\n"
        );
        assert_eq!(encode(&Reply::Ok), "{\"v\":1,\"type\":\"ok\"}\n");
        let r: Request = decode(
            &json!({"v": 1, "type": "policy", "egress": {"rules": [{"host": "a.com"}]}})
                .to_string(),
        )
        .unwrap();
        assert!(matches!(r, Request::Policy { egress, .. } if egress.rules.len() == 1));
        let r: Request =
            decode(&json!({"v": 1, "type": "start", "egress": {}}).to_string()).unwrap();
        assert_eq!(
            r,
            Request::Start {
                egress: EgressSpec::default(),
                hosts: None,
                resolver: None,
                limits: LimitsSpec::default(),
                secrets: BTreeMap::new(),
                ca: None,
                upstream_ca: None,
                identity_header: None,
            }
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let e = |l: &str| decode::<Request>(l).unwrap_err();
        assert!(e("{").starts_with("not JSON"));
        assert!(e(r#"{"type":"policy","egress":{}}"#).contains("\"v\""));
        assert!(e(r#"{"v":2,"type":"policy","egress":{}}"#).contains("version 2"));
        assert!(e(r#"{"v":1,"type":"reboot"}"#).contains("reboot"));
        assert!(e(r#"{"v":1,"type":"policy","egress":{"default":"maybe"}}"#).contains("maybe"));
    }

    #[test]
    fn limits_default_and_refuse_out_of_bounds() {
        assert_eq!(LimitsSpec::default().validate().unwrap(), Limits::default());
        let l = LimitsSpec {
            dns_qps: Some(5),
            bandwidth: Some(1 << 20),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!((l.dns_qps, l.bandwidth), (5, Some(1 << 20)));
        assert_eq!(l.max_flows, Limits::default().max_flows);
        for (spec, want) in [
            (
                json!({"max_flows": 0}),
                "invalid limits.max_flows: 0: allowed is 1–1024 flows",
            ),
            (json!({"max_flows": 5000}), "limits.max_flows: 5000"),
            (
                json!({"new_flows_per_s": 0}),
                "limits.new_flows_per_s: 0: allowed is 1–10000",
            ),
            (json!({"dns_qps": 10001}), "limits.dns_qps: 10001"),
            (
                json!({"bandwidth": 100}),
                "invalid limits.bandwidth: 100: allowed is 16384–100000000000 bytes per second, \
                 or absent for unlimited",
            ),
        ] {
            let spec: LimitsSpec = serde_json::from_value(spec).unwrap();
            let e = spec.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(serde_json::from_value::<LimitsSpec>(json!({"bandwith": 1})).is_err());
    }

    /// The process entry serves nothing before `start`, answers on the control socket, and
    /// returns when QEMU closes its end.
    #[test]
    fn run_ends_when_the_guest_socket_closes() {
        use std::io::{BufRead, BufReader, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (qemu, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let ports = ports_socket(dir.path());
        let stack =
            std::thread::spawn(move || run(OwnedFd::from(guest), OwnedFd::from(listener), ports));
        let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut lines = BufReader::new(c.try_clone().unwrap()).lines();
        let hello: Reply = decode(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(
            hello,
            Reply::Hello {
                version: 1,
                started: false,
                dropped: 0
            }
        );
        c.write_all(b"{\"v\":1,\"type\":\"policy\",\"egress\":{}}\n")
            .unwrap();
        let r: Reply = decode(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(
            r,
            Reply::Error {
                message: "send start first".into()
            }
        );
        c.write_all(b"{\"v\":1,\"type\":\"start\",\"egress\":{},\"resolver\":\"127.0.0.1:9\"}\n")
            .unwrap();
        let r: Reply = decode(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(r, Reply::Ok);
        drop(qemu);
        stack.join().unwrap().unwrap();
    }

    /// Before `start` the guest's frames are dropped without stalling QEMU (more than a
    /// socket buffer of them), a frame cut in half by `start` is still read whole (the stack
    /// answers the ARP request it holds), and a VM that ends before `start` ends the stack.
    #[test]
    fn frames_before_start_are_dropped_and_framing_survives_start() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (mut qemu, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let ports = ports_socket(dir.path());
        let stack =
            std::thread::spawn(move || run(OwnedFd::from(guest), OwnedFd::from(listener), ports));
        let mut arp = vec![0xff; 6];
        arp.extend([0x02, 0x6d, 0x6f, 0x61, 0x74, 0x02, 0x08, 0x06]);
        arp.extend([0, 1, 8, 0, 6, 4, 0, 1, 0x02, 0x6d, 0x6f, 0x61, 0x74, 0x02]);
        arp.extend(moat_protocol::link::GUEST_IP.octets());
        arp.extend([0; 6]);
        arp.extend(moat_protocol::link::GATEWAY_IP.octets());
        let mut framed = Vec::new();
        crate::device::put_frame(&mut framed, &arp);
        // 4 MiB of frames: far more than the socket buffers hold.
        for _ in 0..(4 << 20) / framed.len() {
            qemu.write_all(&framed).unwrap();
        }
        qemu.write_all(&framed[..10]).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut c, hello) = Client::connect(&path).await.unwrap();
            assert!(matches!(hello, Reply::Hello { started: false, .. }));
            let start = Request::Start {
                egress: EgressSpec::default(),
                hosts: None,
                resolver: Some("127.0.0.1:9".parse().unwrap()),
                limits: LimitsSpec::default(),
                secrets: BTreeMap::new(),
                ca: None,
                upstream_ca: None,
                identity_header: None,
            };
            c.request(&start, |_| {}).await.unwrap();
            let e = c.request(&start, |_| {}).await.unwrap_err();
            assert!(e.to_string().contains("already started"), "{e}");
        });
        qemu.write_all(&framed[10..]).unwrap();
        let mut len = [0u8; 4];
        qemu.read_exact(&mut len).unwrap();
        let mut reply = vec![0; u32::from_be_bytes(len) as usize];
        qemu.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[12..14], &[0x08, 0x06], "an ARP frame");
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[28..32], &moat_protocol::link::GATEWAY_IP.octets());
        drop(qemu);
        stack.join().unwrap().unwrap();

        let path = dir.path().join("control2.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (qemu, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let ports = ports_socket(dir.path());
        let stack =
            std::thread::spawn(move || run(OwnedFd::from(guest), OwnedFd::from(listener), ports));
        drop(qemu);
        stack.join().unwrap().unwrap();
    }

    /// A [`Minter`]'s request reaches the daemon as `mint` (naming no sandbox), the daemon's
    /// `token` (or refusal) comes back to it, and without a daemon it fails at once.
    #[tokio::test]
    async fn minter_asks_the_connected_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (qemu, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let ports = ports_socket(dir.path());
        let (minter, asks) = Minter::channel();
        let m = minter.clone();
        let stack = tokio::spawn(run_async(
            OwnedFd::from(guest),
            OwnedFd::from(listener),
            ports,
            minter,
            asks,
        ));
        let (mut c, _) = Client::connect(&path).await.unwrap();
        let start = Request::Start {
            egress: EgressSpec::default(),
            hosts: None,
            resolver: Some("127.0.0.1:9".parse().unwrap()),
            limits: LimitsSpec::default(),
            secrets: BTreeMap::new(),
            ca: None,
            upstream_ca: None,
            identity_header: None,
        };
        c.request(&start, |_| {}).await.unwrap();
        let asked = tokio::spawn({
            let m = m.clone();
            async move { m.mint("sts.amazonaws.com", Delivery::Egress).await }
        });
        let Some(Incoming::Mint {
            id,
            audience,
            delivery: Delivery::Egress,
        }) = c.next_incoming().await.unwrap()
        else {
            panic!("expected a mint");
        };
        assert_eq!(audience, "sts.amazonaws.com");
        let t = Token {
            token: "a.b.c".into(),
            expires_on: 42,
        };
        c.answer_mint(id, Ok(t.clone())).await.unwrap();
        assert_eq!(asked.await.unwrap().unwrap(), t);
        let refused = tokio::spawn({
            let m = m.clone();
            async move { m.mint("api://x", Delivery::Egress).await }
        });
        let Some(Incoming::Mint { id, .. }) = c.next_incoming().await.unwrap() else {
            panic!("expected a mint");
        };
        c.answer_mint(id, Err("audience not allowed".into()))
            .await
            .unwrap();
        let e = refused.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("not allowed"), "{e}");
        // The wire form names no sandbox: only an id and the audience.
        assert_eq!(
            encode(&Reply::Mint {
                id: 7,
                audience: "a".into(),
                delivery: Delivery::Endpoint,
            }),
            "{\"v\":1,\"type\":\"mint\",\"id\":7,\"audience\":\"a\",\"delivery\":\"endpoint\"}\n"
        );
        // A daemon's answer to an in-guest refusal is nothing; the refusal reaches it.
        m.refused(
            "sts.amazonaws.com",
            "in-guest endpoint: forwarded requests are refused",
        );
        assert_eq!(
            c.next_incoming().await.unwrap(),
            Some(Incoming::IdentityRefused {
                audience: "sts.amazonaws.com".into(),
                reason: "in-guest endpoint: forwarded requests are refused".into()
            })
        );
        drop(c);
        // The stack notices the daemon is gone at its next read; until then a mint waits on
        // a dead connection and fails when it is noticed, after that at once.
        let e = m
            .mint("sts.amazonaws.com", Delivery::Egress)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("daemon"), "{e}");
        drop(qemu);
        stack.await.unwrap().unwrap();
    }

    #[test]
    fn start_validates_everything_it_gets() {
        let bad_policy: EgressSpec =
            serde_json::from_value(json!({"rules": [{"host": "*"}]})).unwrap();
        assert!(
            start(bad_policy, None, None, LimitsSpec::default(), None, None,)
                .unwrap_err()
                .to_string()
                .contains("egress.rules[0].host")
        );
        let e = start(
            EgressSpec::default(),
            Some("127.0.0.1 ok.test\nnope\n".into()),
            None,
            LimitsSpec::default(),
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains(":2:"), "{e}");
    }
}
