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
//! `error {message}` after each request; `audit {event}` for every decision.
//! daemon → stack: `start {egress, hosts?, resolver?, limits?, secrets?, ca?, upstream_ca?}` once, first (nothing
//! is forwarded before it); `policy {egress, secrets?}` at any time after, applied to the next decision
//! and to live flows (those it denies are reset).

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

/// Limits as the daemon sends them; absent fields keep the defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flows_per_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_qps: Option<u32>,
}

impl LimitsSpec {
    fn limits(&self) -> Result<Limits> {
        let d = Limits::default();
        let l = Limits {
            max_flows: self.max_flows.unwrap_or(d.max_flows),
            new_flows_per_s: self.new_flows_per_s.unwrap_or(d.new_flows_per_s),
            dns_qps: self.dns_qps.unwrap_or(d.dns_qps),
        };
        if l.max_flows == 0 || l.new_flows_per_s == 0 || l.dns_qps == 0 {
            return Err(Error::Invalid {
                field: "limits".into(),
                message: "every limit is at least 1".into(),
            });
        }
        Ok(l)
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
        ca: Option<CaSpec>,
        /// PEM certificates trusted upstream besides Mozilla's roots (`--upstream-ca`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upstream_ca: Option<String>,
    },
    Policy {
        egress: EgressSpec,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        secrets: BTreeMap<String, Secret>,
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
                Some(Reply::Hello { .. }) => {}
                None => {
                    return Err(Error::Control(
                        "the network stack closed the control connection".into(),
                    ))
                }
            }
        }
    }

    /// The next audit event; `None` when the stack is gone.
    pub async fn next_event(&mut self) -> Result<Option<Event>> {
        loop {
            match self.next().await? {
                Some(Reply::Audit { event }) => return Ok(Some(event)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io {
            context: "starting the stack's runtime".into(),
            source: e,
        })?;
    rt.block_on(run_async(guest, control, ports))
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

async fn run_async(guest: OwnedFd, control: OwnedFd, ports: OwnedFd) -> Result<()> {
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
    let (policy, resolver, limits, intercept) = loop {
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
            Some(Request::Policy { .. }) => {
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
            }) => match start(egress, hosts, resolver, limits, secrets, ca, upstream_ca) {
                Ok(s) => {
                    let _ = conn.send(&Reply::Ok).await;
                    break s;
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
    inbound_started.send_replace(true);
    // The bytes of a frame that was half read when `start` came go first.
    let guest = tokio::io::join(std::io::Cursor::new(early).chain(guest_rx), guest_tx);
    let serve = stack::serve(
        guest,
        Arc::new(resolver),
        policy_rx,
        audit.clone(),
        limits,
        inbound,
        intercept,
    );
    tokio::pin!(serve);
    loop {
        tokio::select! {
            r = &mut serve => return r,
            c = listener.accept() => {
                // A new daemon replaces the old connection.
                if let Ok((s, _)) = c {
                    let (rx, tx) = s.into_split();
                    let mut c = Conn { lines: BufReader::new(rx).lines(), tx };
                    let _ = c.send(&Reply::Hello { version: VERSION, started: true, dropped: audit.dropped() }).await;
                    conn = Some(c);
                }
            }
            line = async { next_line(conn.as_mut().expect("guarded")).await }, if conn.is_some() => {
                let c = conn.as_mut().expect("guarded");
                let Some(line) = line else {
                    conn = None;
                    continue;
                };
                let reply = match request(c, &line).await {
                    None => continue,
                    Some(Request::Start { .. }) => Reply::Error { message: "already started".into() },
                    Some(Request::Policy { egress, secrets }) => match Policy::new(egress) {
                        Ok(p) => { policy_tx.send_replace(Arc::new(p.with_secrets(secrets))); Reply::Ok }
                        Err(e) => Reply::Error { message: e.to_string() },
                    },
                };
                if c.send(&reply).await.is_err() {
                    conn = None;
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

fn start(
    egress: EgressSpec,
    hosts: Option<String>,
    resolver: Option<SocketAddr>,
    limits: LimitsSpec,
    secrets: BTreeMap<String, Secret>,
    ca: Option<CaSpec>,
    upstream_ca: Option<String>,
) -> Result<(Policy, Resolver, Limits, Option<Arc<Interceptor>>)> {
    let policy = Policy::new(egress)?.with_secrets(secrets);
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
    let limits = limits.limits()?;
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
    fn limits_default_and_refuse_zero() {
        assert_eq!(LimitsSpec::default().limits().unwrap(), Limits::default());
        let l = LimitsSpec {
            dns_qps: Some(5),
            ..Default::default()
        }
        .limits()
        .unwrap();
        assert_eq!(l.dns_qps, 5);
        assert!(LimitsSpec {
            max_flows: Some(0),
            ..Default::default()
        }
        .limits()
        .is_err());
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
        arp.extend(stack::GUEST_IP.octets());
        arp.extend([0; 6]);
        arp.extend(stack::GATEWAY_IP.octets());
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
        assert_eq!(&reply[28..32], &stack::GATEWAY_IP.octets());
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

    #[test]
    fn start_validates_everything_it_gets() {
        let bad_policy: EgressSpec =
            serde_json::from_value(json!({"rules": [{"host": "*"}]})).unwrap();
        assert!(start(
            bad_policy,
            None,
            None,
            LimitsSpec::default(),
            BTreeMap::new(),
            None,
            None
        )
        .unwrap_err()
        .to_string()
        .contains("egress.rules[0].host"));
        let e = start(
            EgressSpec::default(),
            Some("127.0.0.1 ok.test\nnope\n".into()),
            None,
            LimitsSpec::default(),
            BTreeMap::new(),
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains(":2:"), "{e}");
    }
}
