//! The per-sandbox stack: the guest's only router. smoltcp plays the gateway on the guest's
//! link; every frame is classified before smoltcp sees it, so that a TCP flow exists in smoltcp
//! only once the policy allowed it, DNS (UDP or TCP, to any address) goes to moat's resolver,
//! and everything else (IPv6, fragments, spoofed sources, UDP without a rule, ICMP beyond the
//! gateway) is dropped. An allowed flow is terminated here and spliced to a new host
//! connection that a task of its own opens, after the first-bytes check on 443 (TLS SNI) and
//! 80 (HTTP Host) where the destination is a name.
//!
//! TCP to 169.254.169.254:80 is the in-guest identity endpoint when the sandbox has one
//! (`metadata.rs`): terminated here before any policy decision, answered by the stack itself,
//! never forwarded.
//!
//! The same loop opens inbound connections (host → guest port) for the daemon's port
//! exposure: a TCP connection from the gateway's address to the guest, spliced to the Unix
//! stream the request came on (`ingress.rs`), so the host kernel never routes a guest packet
//! either way.
//!
//! One loop owns the interface and the sockets; flow tasks talk to it through one event
//! channel. Host-to-guest bytes are bounded per flow by a semaphore of credits (returned as
//! smoltcp takes the bytes), guest-to-host bytes by a bounded channel per flow (smoltcp's
//! window closes while it is full), so a slow side holds the other back instead of filling
//! memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, IpAddress,
    IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, TcpRepr, UdpPacket,
    UdpRepr,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::audit::{Audit, Event, Kind, Verdict};
use crate::device::{put_frame, take_frame, Device};
use crate::dns::{is_synthetic, Resolver};
use crate::intercept::Interceptor;
use crate::peek::{self, Peek};
use crate::{Error, Policy, Protocol, Result};
// The link's addresses are shared with the guest agent through the protocol crate.
use moat_protocol::link::{GATEWAY_IP, GUEST_IP, MTU, PREFIX_LEN};

/// The gateway's MAC (locally administered). The guest's is whatever it uses.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x01];

/// Per-flow socket buffers: large enough that one flow's window is not the bottleneck.
const TCP_BUFFER: usize = 256 * 1024;
/// Bytes moved per channel message.
const CHUNK: usize = 64 * 1024;
/// Host bytes a flow may have read ahead of smoltcp.
const CREDITS: usize = 256 * 1024;
/// How long a flow on 443/80 may take to send its ClientHello or request head.
const PEEK_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a finished flow's task may take to write the guest's last bytes to the host.
const FLUSH_GRACE: Duration = Duration::from_secs(5);
/// The gateway's ports for inbound connections: the dynamic range, which no guest-initiated
/// flow uses on the gateway (those to its address are denied by the floor, DNS aside).
const INBOUND_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// A request for an inbound connection to the guest's `port`; `stream` is the requester's
/// end, answered with `ok` (then bytes both ways) or `error` (`ingress.rs`).
#[derive(Debug)]
pub struct Inbound {
    pub port: u16,
    pub stream: UnixStream,
}

/// An inbound connection the guest has not accepted yet.
struct Connecting {
    handle: SocketHandle,
    key: (u16, Ipv4Addr, u16),
    port: u16,
    stream: UnixStream,
    deadline: Instant,
}

/// Per-sandbox caps. Exceeding a count refuses the flow or query; the bandwidth cap slows
/// every flow of the sandbox together. Both are audited, neither ends anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_flows: usize,
    pub new_flows_per_s: u32,
    pub dns_qps: u32,
    /// Bytes per second, both directions of every TCP flow together; `None`: unlimited.
    pub bandwidth: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: 256,
            new_flows_per_s: 100,
            dns_qps: 50,
            bandwidth: None,
        }
    }
}

/// A token bucket with a burst of one second's worth.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_s: u64) -> Bucket {
        Bucket {
            rate: per_s as f64,
            tokens: per_s as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
    }

    fn take(&mut self) -> bool {
        self.take_up_to(1) == 1
    }

    /// Takes as many of `want` tokens as there are, whole ones only; how many it took.
    fn take_up_to(&mut self, want: usize) -> usize {
        self.refill();
        let n = (self.tokens.floor() as usize).min(want);
        self.tokens -= n as f64;
        n
    }

    /// How long until `n` tokens (at most a burst's worth) are there.
    fn wait_for(&self, n: usize) -> Duration {
        let missing = (n as f64).min(self.rate) - self.tokens;
        Duration::from_secs_f64((missing / self.rate).max(0.0))
    }
}

/// The bandwidth cap's state: its bucket, whether the last pass held bytes back, and when
/// that was last audited (at most once a second, so a slowed transfer is one event a second,
/// not one per packet).
#[derive(Debug)]
struct Bandwidth {
    bucket: Bucket,
    held: bool,
    audited: Option<Instant>,
}

impl Bandwidth {
    fn new(limit: Option<u64>) -> Option<Bandwidth> {
        limit.map(|b| Bandwidth {
            bucket: Bucket::new(b),
            held: false,
            audited: None,
        })
    }
}

/// How many of `want` bytes the cap lets through now (all without a cap).
fn allowance(bw: &mut Option<Bandwidth>, want: usize) -> usize {
    match bw {
        None => want,
        Some(b) => {
            let n = b.bucket.take_up_to(want);
            b.held |= n < want;
            n
        }
    }
}

/// What flow tasks share with the loop.
struct Shared {
    resolver: Arc<Resolver>,
    policy: RwLock<Arc<Policy>>,
    audit: Audit,
    dns: Mutex<Bucket>,
    events: mpsc::UnboundedSender<Ev>,
    /// The group CA's interceptor, for hosts whose rule has a transform (`intercept.rs`).
    intercept: Option<Arc<Interceptor>>,
    /// The in-guest identity endpoint, when the group's `identity.in_guest` was on as the
    /// sandbox started.
    metadata: Option<Arc<crate::metadata::Server>>,
}

impl Shared {
    fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy lock").clone()
    }

    fn dns_allowed(&self, name_hint: &str) -> bool {
        if self.dns.lock().expect("dns bucket").take() {
            return true;
        }
        let mut e = Event::new(Kind::Dns, Verdict::Deny, "limit: DNS queries per second");
        e.name = (!name_hint.is_empty()).then(|| name_hint.to_string());
        self.audit.emit(e);
        false
    }
}

/// Messages from tasks to the loop.
enum Ev {
    Connected {
        flow: u64,
        addr: SocketAddrV4,
    },
    Data {
        flow: u64,
        data: Bytes,
    },
    HostEof {
        flow: u64,
    },
    /// The task is done with the flow abnormally: refused after its first bytes (`deny`), or
    /// its host side failed. `reset` aborts the guest's side instead of closing it.
    End {
        flow: u64,
        reason: String,
        deny: bool,
        reset: bool,
    },
    /// The task took guest bytes off its channel: there may be room for more.
    Drained,
    /// A finished frame for the guest (DNS and relayed UDP answers).
    Frame(Vec<u8>),
    /// A UDP relay ended (idle, or its host socket failed).
    UdpDone((u16, Ipv4Addr, u16)),
}

#[derive(Debug, Clone)]
enum Dest {
    Name(String),
    Addr(Ipv4Addr),
}

struct Flow {
    handle: SocketHandle,
    key: (u16, Ipv4Addr, u16),
    name: Option<String>,
    dst: Ipv4Addr,
    port: u16,
    /// Not an egress flow: DNS over TCP (answered here, audited per query) or an inbound
    /// connection (authorised by the daemon). Policy updates leave it alone and it is not
    /// audited as a flow.
    internal: bool,
    rule: Option<usize>,
    reason: String,
    denied: bool,
    to_host: Option<mpsc::Sender<Bytes>>,
    pending: VecDeque<Bytes>,
    host_eof: bool,
    fin_sent: bool,
    credits: Arc<Semaphore>,
    task: JoinHandle<()>,
    started: Instant,
    sent: u64,
    received: u64,
    dialed: Option<SocketAddrV4>,
}

/// A relayed UDP conversation: datagrams from the guest go to its task.
struct UdpFlow {
    tx: mpsc::Sender<Bytes>,
    task: JoinHandle<()>,
}

struct Stack {
    iface: Interface,
    device: Device,
    sockets: SocketSet<'static>,
    epoch: Instant,
    flows: HashMap<u64, Flow>,
    udp: HashMap<(u16, Ipv4Addr, u16), UdpFlow>,
    keys: HashSet<(u16, Ipv4Addr, u16)>,
    connecting: Vec<Connecting>,
    next_inbound_port: u16,
    next_id: u64,
    limits: Limits,
    new_flows: Bucket,
    bandwidth: Option<Bandwidth>,
    shared: Arc<Shared>,
}

/// What the stack answers or carries itself for some flows, beside splicing.
#[derive(Default)]
pub struct Services {
    /// The group CA's interceptor, for hosts whose rule has a transform (`intercept.rs`).
    pub intercept: Option<Arc<Interceptor>>,
    /// The in-guest identity endpoint (`metadata.rs`), when the daemon gave a header.
    pub metadata: Option<Arc<crate::metadata::Server>>,
}

/// Runs the stack on `guest` (the stream-netdev socket) until QEMU closes it. `policy` is
/// watched: a new value applies to the next decision, and live flows it denies are reset.
/// `limits` is watched too: new ones apply from then on (their buckets start full).
/// `inbound` brings requests for connections to the guest's ports.
pub async fn serve<S>(
    guest: S,
    resolver: Arc<Resolver>,
    mut policy: watch::Receiver<Arc<Policy>>,
    audit: Audit,
    mut limits: watch::Receiver<Limits>,
    mut inbound: mpsc::Receiver<Inbound>,
    services: Services,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite,
{
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let first = *limits.borrow_and_update();
    let shared = Arc::new(Shared {
        resolver,
        policy: RwLock::new(policy.borrow_and_update().clone()),
        audit,
        dns: Mutex::new(Bucket::new(first.dns_qps.into())),
        events: events_tx,
        intercept: services.intercept,
        metadata: services.metadata,
    });
    let mut st = Stack::new(shared, first);
    let mut limits_open = true;
    let (mut rd, mut wr) = tokio::io::split(guest);
    let mut inbuf = BytesMut::with_capacity(256 * 1024);
    let mut policy_open = true;
    let mut inbound_open = true;
    let io = |e: std::io::Error| Error::Io {
        context: "the guest's network socket".into(),
        source: e,
    };
    loop {
        st.run();
        if !st.device.tx.is_empty() {
            wr.write_all(&st.device.tx).await.map_err(io)?;
            st.device.tx.clear();
        }
        let delay = st.delay();
        tokio::select! {
            r = rd.read_buf(&mut inbuf) => {
                if r.map_err(io)? == 0 {
                    st.shutdown();
                    return Ok(());
                }
                while let Some(frame) = take_frame(&mut inbuf).map_err(|m| Error::Io {
                    context: m,
                    source: std::io::ErrorKind::InvalidData.into(),
                })? {
                    st.frame(frame);
                }
                if inbuf.capacity() - inbuf.len() < 64 * 1024 {
                    inbuf.reserve(256 * 1024);
                }
            }
            Some(ev) = events.recv() => {
                st.event(ev);
                while let Ok(ev) = events.try_recv() {
                    st.event(ev);
                }
            }
            r = policy.changed(), if policy_open => match r {
                Ok(()) => {
                    let p = policy.borrow_and_update().clone();
                    st.set_policy(p);
                }
                Err(_) => policy_open = false,
            },
            r = limits.changed(), if limits_open => match r {
                Ok(()) => {
                    let l = *limits.borrow_and_update();
                    st.set_limits(l);
                }
                Err(_) => limits_open = false,
            },
            r = inbound.recv(), if inbound_open => match r {
                Some(req) => st.inbound(req),
                None => inbound_open = false,
            },
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

impl Stack {
    fn new(shared: Arc<Shared>, limits: Limits) -> Stack {
        let mut device = Device::default();
        let epoch = Instant::now();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(GATEWAY_IP), PREFIX_LEN))
                .expect("one address fits");
        });
        // Accept flows to any destination: the classifier decided which ones get a socket.
        iface.set_any_ip(true);
        Stack {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            epoch,
            flows: HashMap::new(),
            udp: HashMap::new(),
            keys: HashSet::new(),
            connecting: Vec::new(),
            next_inbound_port: *INBOUND_PORTS.start(),
            next_id: 0,
            limits,
            new_flows: Bucket::new(limits.new_flows_per_s.into()),
            bandwidth: Bandwidth::new(limits.bandwidth),
            shared,
        }
    }

    /// New limits, from now on. Flows over a lower flow count stay; new ones are refused.
    fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.new_flows = Bucket::new(limits.new_flows_per_s.into());
        *self.shared.dns.lock().expect("dns bucket") = Bucket::new(limits.dns_qps.into());
        self.bandwidth = Bandwidth::new(limits.bandwidth);
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
    }

    fn delay(&mut self) -> Duration {
        let now = self.now();
        let d = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_secs(1));
        // Bytes held back by the bandwidth cap move when the bucket has a packet's worth.
        let d = match &self.bandwidth {
            Some(b) if b.held => d.min(
                b.bucket
                    .wait_for(usize::from(MTU))
                    .max(Duration::from_millis(1)),
            ),
            _ => d,
        };
        // Inbound connections waiting for the guest have deadlines of their own.
        if self.connecting.is_empty() {
            d
        } else {
            d.min(Duration::from_millis(100))
        }
    }

    /// Polls and moves bytes between sockets and flows until nothing changes.
    fn run(&mut self) {
        for _ in 0..64 {
            self.poll();
            if !self.service() {
                break;
            }
        }
    }

    /// One frame from the guest.
    fn frame(&mut self, frame: Bytes) {
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
            return;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => self.device.rx.push_back(frame),
            EthernetProtocol::Ipv4 => self.ipv4(frame),
            // IPv6 and everything else: sandboxes have none.
            _ => {}
        }
    }

    fn ipv4(&mut self, frame: Bytes) {
        let eth = EthernetFrame::new_unchecked(&frame[..]);
        let src_mac = eth.src_addr();
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return;
        };
        if ip.src_addr() != GUEST_IP
            || !ip.verify_checksum()
            || ip.more_frags()
            || ip.frag_offset() != 0
        {
            return;
        }
        let dst = ip.dst_addr();
        match ip.next_header() {
            // Ping the gateway, nothing else.
            IpProtocol::Icmp if dst == GATEWAY_IP => self.device.rx.push_back(frame),
            IpProtocol::Udp => {
                let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                    return;
                };
                if !udp.verify_checksum(&GUEST_IP.into(), &dst.into()) {
                    return;
                }
                if udp.dst_port() == 53 {
                    self.dns_udp(
                        src_mac,
                        dst,
                        udp.src_port(),
                        Bytes::copy_from_slice(udp.payload()),
                    );
                } else {
                    let key = (udp.src_port(), dst, udp.dst_port());
                    self.udp(src_mac, key, Bytes::copy_from_slice(udp.payload()));
                }
            }
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    return;
                };
                let Ok(repr) = TcpRepr::parse(
                    &tcp,
                    &GUEST_IP.into(),
                    &dst.into(),
                    &ChecksumCapabilities::default(),
                ) else {
                    return;
                };
                let key = (repr.src_port, dst, repr.dst_port);
                if repr.control == smoltcp::wire::TcpControl::Syn
                    && repr.ack_number.is_none()
                    && !self.keys.contains(&key)
                {
                    self.syn(key, frame);
                } else {
                    self.device.rx.push_back(frame);
                }
            }
            _ => {}
        }
    }

    /// A new TCP flow: decide now; only an allowed one gets a listening socket, so smoltcp
    /// answers the others' SYN with a reset.
    fn syn(&mut self, key: (u16, Ipv4Addr, u16), frame: Bytes) {
        let (_, dst, port) = key;
        // Answered here whatever the policy says (it would deny the link-local address).
        let metadata = match &self.shared.metadata {
            Some(m) if dst == crate::metadata::METADATA_IP && port == 80 => Some(m.clone()),
            _ => None,
        };
        let internal = port == 53 || metadata.is_some();
        let (dest, decision) = if internal {
            (
                Dest::Addr(dst),
                crate::Decision {
                    allow: true,
                    rule: None,
                    reason: if port == 53 {
                        "DNS".into()
                    } else {
                        "identity endpoint".into()
                    },
                },
            )
        } else {
            self.decide(dst, port, Protocol::Tcp)
        };
        let name = match &dest {
            Dest::Name(n) => Some(n.clone()),
            Dest::Addr(_) => None,
        };
        let refuse = self.refusal(&decision);
        if let Some((rule, reason)) = refuse {
            let mut e = Event::new(Kind::Tcp, Verdict::Deny, reason);
            e.rule = rule;
            e.name = name;
            e.address = Some(dst.to_string());
            e.port = Some(port);
            self.shared.audit.emit(e);
            self.device.rx.push_back(frame);
            return;
        }
        // Earlier frames first, so this SYN is the one the new listener takes.
        self.poll();
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        sock.set_nagle_enabled(false);
        sock.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        if sock
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(dst)),
                port,
            })
            .is_err()
        {
            return;
        }
        let handle = self.sockets.add(sock);
        self.device.rx.push_back(frame);
        self.poll();
        if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            // smoltcp did not take the SYN: no flow.
            self.sockets.remove(handle);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let (to_host, from_guest) = mpsc::channel(8);
        let credits = Arc::new(Semaphore::new(CREDITS));
        let shared = self.shared.clone();
        let task = if let Some(m) = metadata {
            tokio::spawn(metadata_flow(id, shared, m, from_guest))
        } else if internal {
            tokio::spawn(dns_tcp(id, shared, from_guest))
        } else {
            tokio::spawn(splice(id, shared, dest, port, from_guest, credits.clone()))
        };
        self.keys.insert(key);
        self.flows.insert(
            id,
            Flow {
                handle,
                key,
                name,
                dst,
                port,
                internal,
                rule: decision.rule,
                reason: decision.reason,
                denied: false,
                to_host: Some(to_host),
                pending: VecDeque::new(),
                host_eof: false,
                fin_sent: false,
                credits,
                task,
                started: Instant::now(),
                sent: 0,
                received: 0,
                dialed: None,
            },
        );
    }

    /// A request for a connection to the guest's `port`: a socket from the gateway's address
    /// connects to the guest; the flow starts when the guest accepts (`connected`).
    pub(crate) fn inbound(&mut self, req: Inbound) {
        let Inbound { port, stream } = req;
        if port == 0 {
            return refuse(stream, "port 0: a guest port is 1-65535".into());
        }
        if self.flows.len() + self.udp.len() + self.connecting.len() >= self.limits.max_flows {
            return refuse(
                stream,
                format!("limit: {} concurrent flows", self.limits.max_flows),
            );
        }
        let Some(local) = self.inbound_port(port) else {
            return refuse(stream, "no free gateway port for the connection".into());
        };
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        sock.set_nagle_enabled(false);
        sock.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        if let Err(e) = sock.connect(
            self.iface.context(),
            (IpAddress::Ipv4(GUEST_IP), port),
            (IpAddress::Ipv4(GATEWAY_IP), local),
        ) {
            return refuse(stream, format!("connecting to guest port {port}: {e}"));
        }
        let key = (port, GATEWAY_IP, local);
        let handle = self.sockets.add(sock);
        self.keys.insert(key);
        self.connecting.push(Connecting {
            handle,
            key,
            port,
            stream,
            deadline: Instant::now() + CONNECT_TIMEOUT,
        });
    }

    /// A gateway port for a connection to the guest's `port` that no flow uses.
    fn inbound_port(&mut self, port: u16) -> Option<u16> {
        let span = INBOUND_PORTS.end() - INBOUND_PORTS.start();
        for _ in 0..=span {
            let p = self.next_inbound_port;
            self.next_inbound_port = if p == *INBOUND_PORTS.end() {
                *INBOUND_PORTS.start()
            } else {
                p + 1
            };
            if !self.keys.contains(&(port, GATEWAY_IP, p)) {
                return Some(p);
            }
        }
        None
    }

    /// Inbound connections the guest accepted become flows; those it refused (a reset: nothing
    /// listens) or left unanswered past their deadline are answered with an error. True if
    /// any changed.
    fn connected(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        let mut i = 0;
        while i < self.connecting.len() {
            let c = &self.connecting[i];
            let state = self.sockets.get::<tcp::Socket>(c.handle).state();
            let outcome = match state {
                tcp::State::SynSent if now < c.deadline => None,
                tcp::State::SynSent => Some(Err(format!(
                    "the sandbox did not answer on port {} within {} s",
                    c.port,
                    CONNECT_TIMEOUT.as_secs()
                ))),
                tcp::State::Closed => Some(Err(format!(
                    "nothing listens on port {} in the sandbox (connection refused)",
                    c.port
                ))),
                _ => Some(Ok(())),
            };
            let Some(outcome) = outcome else {
                i += 1;
                continue;
            };
            changed = true;
            let c = self.connecting.swap_remove(i);
            match outcome {
                Ok(()) => self.accepted(c),
                Err(why) => {
                    self.sockets.get_mut::<tcp::Socket>(c.handle).abort();
                    self.sockets.remove(c.handle);
                    self.keys.remove(&c.key);
                    refuse(c.stream, why);
                }
            }
        }
        changed
    }

    fn accepted(&mut self, c: Connecting) {
        let id = self.next_id;
        self.next_id += 1;
        let (to_host, from_guest) = mpsc::channel(8);
        let credits = Arc::new(Semaphore::new(CREDITS));
        let task = tokio::spawn(inbound_flow(
            id,
            self.shared.clone(),
            c.stream,
            from_guest,
            credits.clone(),
        ));
        self.flows.insert(
            id,
            Flow {
                handle: c.handle,
                key: c.key,
                name: None,
                dst: GUEST_IP,
                port: c.port,
                internal: true,
                rule: None,
                reason: "inbound".into(),
                denied: false,
                to_host: Some(to_host),
                pending: VecDeque::new(),
                host_eof: false,
                fin_sent: false,
                credits,
                task,
                started: Instant::now(),
                sent: 0,
                received: 0,
                dialed: None,
            },
        );
    }

    /// The policy's decision for a flow to `dst:port`.
    /// Why a new TCP flow or UDP relay is refused (the rule that denied it, the reason), if it
    /// is: the policy's decision first, then the per-sandbox limits, which count TCP flows and
    /// UDP relays together.
    fn refusal(&mut self, decision: &crate::Decision) -> Option<(Option<usize>, String)> {
        if !decision.allow {
            Some((decision.rule, decision.reason.clone()))
        } else if self.flows.len() + self.udp.len() >= self.limits.max_flows {
            Some((
                None,
                format!("limit: {} concurrent flows", self.limits.max_flows),
            ))
        } else if !self.new_flows.take() {
            Some((
                None,
                format!(
                    "limit: {} new flows per second",
                    self.limits.new_flows_per_s
                ),
            ))
        } else {
            None
        }
    }

    fn decide(&self, dst: Ipv4Addr, port: u16, protocol: Protocol) -> (Dest, crate::Decision) {
        let policy = self.shared.policy();
        if is_synthetic(dst) {
            return match self.shared.resolver.name_of(dst) {
                Some(n) => {
                    let d = policy.decide_name(&n, port, protocol);
                    (Dest::Name(n), d)
                }
                None => (
                    Dest::Addr(dst),
                    crate::Decision::deny("an address moat's DNS never handed out"),
                ),
            };
        }
        let d = policy.decide_addr(self.shared.resolver.floor(), dst, port, protocol);
        (Dest::Addr(dst), d)
    }

    /// A UDP datagram other than DNS: relayed only when a rule allows UDP to its
    /// destination, through a host socket per (guest port, destination) that lives until it
    /// has been idle for a minute.
    fn udp(&mut self, guest_mac: EthernetAddress, key: (u16, Ipv4Addr, u16), payload: Bytes) {
        if let Some(f) = self.udp.get(&key) {
            // A full queue drops the datagram, as a congested link would.
            let _ = f.tx.try_send(payload);
            return;
        }
        let (_, dst, port) = key;
        let (dest, d) = self.decide(dst, port, Protocol::Udp);
        let refuse = self.refusal(&d);
        if let Some((rule, reason)) = refuse {
            let mut e = Event::new(Kind::Udp, Verdict::Deny, reason);
            e.rule = rule;
            e.name = match dest {
                Dest::Name(n) => Some(n),
                Dest::Addr(_) => None,
            };
            e.address = Some(dst.to_string());
            e.port = Some(port);
            self.shared.audit.emit(e);
            return;
        }
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.try_send(payload);
        let task = tokio::spawn(udp_relay(self.shared.clone(), guest_mac, key, dest, d, rx));
        self.udp.insert(key, UdpFlow { tx, task });
    }

    /// DNS over UDP to any address: answered by moat, from the address the guest asked.
    fn dns_udp(&mut self, guest_mac: EthernetAddress, dst: Ipv4Addr, sport: u16, query: Bytes) {
        if !self.shared.dns_allowed("") {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let policy = shared.policy();
            let Some((answer, event)) = shared.resolver.answer(&policy, &query).await else {
                return;
            };
            shared.audit.emit(event);
            let frame = udp_frame(guest_mac, (dst, 53), (GUEST_IP, sport), &answer);
            let _ = shared.events.send(Ev::Frame(frame));
        });
    }

    fn event(&mut self, ev: Ev) {
        match ev {
            Ev::Frame(f) => put_frame(&mut self.device.tx, &f),
            Ev::Drained => {}
            Ev::UdpDone(key) => {
                self.udp.remove(&key);
            }
            Ev::Connected { flow, addr } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.dialed = Some(addr);
                }
            }
            Ev::Data { flow, data } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.pending.push_back(data);
                }
            }
            Ev::HostEof { flow } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.host_eof = true;
                }
            }
            Ev::End {
                flow,
                reason,
                deny,
                reset,
            } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.reason = reason;
                    f.denied |= deny;
                    f.host_eof = true;
                    f.to_host = None;
                    if reset {
                        f.pending.clear();
                        self.sockets.get_mut::<tcp::Socket>(f.handle).abort();
                    }
                }
            }
        }
    }

    /// Moves bytes between smoltcp and the flow tasks; ends finished flows. True if anything
    /// moved (smoltcp has something to send).
    fn service(&mut self) -> bool {
        let mut progress = self.connected();
        let mut done = Vec::new();
        let mut slowed = None;
        if let Some(b) = &mut self.bandwidth {
            b.held = false;
        }
        for (&id, f) in self.flows.iter_mut() {
            let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
            // Guest to host.
            if let Some(tx) = &f.to_host {
                while sock.can_recv() {
                    let Ok(permit) = tx.try_reserve() else { break };
                    let want = sock.recv_queue().min(CHUNK);
                    let allowed = if f.internal {
                        want
                    } else {
                        allowance(&mut self.bandwidth, want)
                    };
                    if allowed == 0 {
                        slowed.get_or_insert(id);
                        break;
                    }
                    let data = sock
                        .recv(|b| {
                            let n = b.len().min(allowed);
                            (n, Bytes::copy_from_slice(&b[..n]))
                        })
                        .unwrap_or_default();
                    f.sent += data.len() as u64;
                    permit.send(data);
                    progress = true;
                }
                let guest_fin = matches!(
                    sock.state(),
                    tcp::State::CloseWait
                        | tcp::State::LastAck
                        | tcp::State::Closing
                        | tcp::State::TimeWait
                        | tcp::State::Closed
                );
                if guest_fin && !sock.can_recv() {
                    f.to_host = None;
                }
            }
            // Host to guest.
            while let Some(front) = f.pending.front_mut() {
                let room = sock.send_capacity() - sock.send_queue();
                let want = front.len().min(room);
                let allowed = if f.internal {
                    want
                } else {
                    allowance(&mut self.bandwidth, want)
                };
                if allowed == 0 {
                    if want > 0 {
                        slowed.get_or_insert(id);
                    }
                    break;
                }
                let n = sock.send_slice(&front[..allowed]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                f.received += n as u64;
                f.credits.add_permits(n);
                front.advance(n);
                if front.is_empty() {
                    f.pending.pop_front();
                }
                progress = true;
            }
            if f.host_eof && f.pending.is_empty() && !f.fin_sent {
                sock.close();
                f.fin_sent = true;
                progress = true;
            }
            if matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait) {
                done.push(id);
            }
        }
        if let Some(id) = slowed {
            self.audit_bandwidth(id);
        }
        for id in done {
            self.finish(id);
        }
        progress
    }

    /// The bandwidth cap held back bytes of flow `id` (and maybe others): one audit event a
    /// second at most, naming that flow. Nothing is refused, so the verdict is `allow`.
    fn audit_bandwidth(&mut self, id: u64) {
        let (Some(b), Some(f)) = (&mut self.bandwidth, self.flows.get(&id)) else {
            return;
        };
        if b.audited
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        b.audited = Some(Instant::now());
        let mut e = Event::new(
            Kind::Tcp,
            Verdict::Allow,
            format!(
                "limit: {} bytes per second of bandwidth (flows slowed, not refused)",
                self.limits.bandwidth.unwrap_or_default()
            ),
        );
        e.rule = f.rule;
        e.name = f.name.clone();
        e.address = Some(
            f.dialed
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| f.dst.to_string()),
        );
        e.port = Some(f.port);
        self.shared.audit.emit(e);
    }

    fn finish(&mut self, id: u64) {
        let Some(mut f) = self.flows.remove(&id) else {
            return;
        };
        // The guest's last bytes and its FIN can end the socket in the same poll that queued
        // them for the task: the task gets a moment to write them out (its channel is closed,
        // so it ends by itself once they are written), then it is stopped.
        f.to_host = None;
        let mut task = f.task;
        tokio::spawn(async move {
            if tokio::time::timeout(FLUSH_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        });
        self.sockets.remove(f.handle);
        self.keys.remove(&f.key);
        if f.internal {
            return;
        }
        let verdict = if f.denied {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
        let mut e = Event::new(Kind::Tcp, verdict, f.reason);
        e.rule = f.rule;
        e.name = f.name;
        e.address = Some(
            f.dialed
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| f.dst.to_string()),
        );
        e.port = Some(f.port);
        e.bytes_sent = f.sent;
        e.bytes_received = f.received;
        e.duration_ms = f.started.elapsed().as_millis() as u64;
        self.shared.audit.emit(e);
    }

    /// A new policy: later decisions use it, and live flows it denies are reset now.
    fn set_policy(&mut self, policy: Arc<Policy>) {
        *self.shared.policy.write().expect("policy lock") = policy;
        let ids: Vec<u64> = self.flows.keys().copied().collect();
        for id in ids {
            let f = &self.flows[&id];
            if f.internal {
                continue;
            }
            let (_, d) = self.decide(f.dst, f.port, Protocol::Tcp);
            if d.allow {
                continue;
            }
            let f = self.flows.get_mut(&id).expect("listed above");
            f.denied = true;
            f.rule = d.rule;
            f.reason = format!("policy update: {}", d.reason);
            f.task.abort();
            f.to_host = None;
            f.pending.clear();
            self.sockets.get_mut::<tcp::Socket>(f.handle).abort();
        }
        let keys: Vec<_> = self.udp.keys().copied().collect();
        for key in keys {
            let (dest, d) = self.decide(key.1, key.2, Protocol::Udp);
            if d.allow {
                continue;
            }
            if let Some(f) = self.udp.remove(&key) {
                f.task.abort();
                let mut e = Event::new(
                    Kind::Udp,
                    Verdict::Deny,
                    format!("policy update: {}", d.reason),
                );
                e.rule = d.rule;
                e.name = match dest {
                    Dest::Name(n) => Some(n),
                    Dest::Addr(_) => None,
                };
                e.address = Some(key.1.to_string());
                e.port = Some(key.2);
                self.shared.audit.emit(e);
            }
        }
    }

    /// QEMU went away: record the flows that were still open; requesters of inbound
    /// connections still waiting see their stream close.
    fn shutdown(&mut self) {
        self.connecting.clear();
        let ids: Vec<u64> = self.flows.keys().copied().collect();
        for id in ids {
            self.finish(id);
        }
    }
}

/// An Ethernet/IPv4/UDP frame from `src` to the guest.
fn udp_frame(
    guest_mac: EthernetAddress,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let udp_len = 8 + payload.len();
    let ip = Ipv4Repr {
        src_addr: src.0,
        dst_addr: dst.0,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 14 + ip.buffer_len() + udp_len];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: EthernetAddress(GATEWAY_MAC),
        dst_addr: guest_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut ipp, &caps);
    let mut udp = UdpPacket::new_unchecked(ipp.payload_mut());
    UdpRepr {
        src_port: src.1,
        dst_port: dst.1,
    }
    .emit(
        &mut udp,
        &src.0.into(),
        &dst.0.into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// How long a UDP relay lives without traffic either way.
const UDP_IDLE: Duration = Duration::from_secs(60);

/// One allowed UDP conversation: a host socket connected to the destination; datagrams both
/// ways until it is idle; audited when it ends.
async fn udp_relay(
    shared: Arc<Shared>,
    guest_mac: EthernetAddress,
    key: (u16, Ipv4Addr, u16),
    dest: Dest,
    decision: crate::Decision,
    mut from_guest: mpsc::Receiver<Bytes>,
) {
    let (sport, dst, port) = key;
    let started = Instant::now();
    let mut e = Event::from_decision(Kind::Udp, &decision);
    e.address = Some(dst.to_string());
    e.port = Some(port);
    let target = match &dest {
        Dest::Addr(a) => Ok(*a),
        Dest::Name(n) => {
            e.name = Some(n.clone());
            shared
                .resolver
                .targets(n)
                .await
                .map(|t| t.addrs[0])
                .map_err(|err| err.reason())
        }
    };
    let (mut sent, mut received) = (0u64, 0u64);
    let result: std::result::Result<(), String> = async {
        let target = target?;
        e.address = Some(target.to_string());
        let sock = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(|err| err.to_string())?;
        sock.connect((target, port))
            .await
            .map_err(|err| err.to_string())?;
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                d = from_guest.recv() => match d {
                    Some(d) => {
                        sent += d.len() as u64;
                        // A datagram the host refuses is lost, as on any network.
                        let _ = sock.send(&d).await;
                    }
                    None => return Ok(()),
                },
                r = sock.recv(&mut buf) => {
                    // ICMP errors from the destination show up here; the guest gets nothing.
                    let Ok(n) = r else { continue };
                    // Keep answers within the guest's MTU.
                    if n > usize::from(MTU) - 28 {
                        continue;
                    }
                    received += n as u64;
                    let frame = udp_frame(guest_mac, (dst, port), (GUEST_IP, sport), &buf[..n]);
                    let _ = shared.events.send(Ev::Frame(frame));
                }
                _ = tokio::time::sleep(UDP_IDLE) => return Ok(()),
            }
        }
    }
    .await;
    if let Err(why) = result {
        e.verdict = Verdict::Deny;
        e.reason = why;
    }
    e.bytes_sent = sent;
    e.bytes_received = received;
    e.duration_ms = started.elapsed().as_millis() as u64;
    shared.audit.emit(e);
    let _ = shared.events.send(Ev::UdpDone(key));
}

/// DNS over TCP (RFC 7766: 2-byte length, then the message), answered like UDP queries.
async fn dns_tcp(id: u64, shared: Arc<Shared>, mut from_guest: mpsc::Receiver<Bytes>) {
    let mut buf = BytesMut::new();
    while let Some(b) = from_guest.recv().await {
        let _ = shared.events.send(Ev::Drained);
        buf.extend_from_slice(&b);
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            buf.advance(2);
            let query = buf.split_to(len);
            if !shared.dns_allowed("") {
                continue;
            }
            let policy = shared.policy();
            let Some((answer, event)) = shared.resolver.answer(&policy, &query).await else {
                let _ = shared.events.send(Ev::End {
                    flow: id,
                    reason: "malformed DNS".into(),
                    deny: false,
                    reset: true,
                });
                return;
            };
            shared.audit.emit(event);
            let mut out = Vec::with_capacity(2 + answer.len());
            out.extend_from_slice(&(answer.len() as u16).to_be_bytes());
            out.extend_from_slice(&answer);
            let _ = shared.events.send(Ev::Data {
                flow: id,
                data: out.into(),
            });
        }
    }
    let _ = shared.events.send(Ev::HostEof { flow: id });
}

/// One connection to the in-guest identity endpoint: one request head in, one answer out,
/// then the stack closes (`Connection: close`). A guest that sends no complete head within
/// [`PEEK_TIMEOUT`] is closed without an answer.
async fn metadata_flow(
    id: u64,
    shared: Arc<Shared>,
    server: Arc<crate::metadata::Server>,
    mut from_guest: mpsc::Receiver<Bytes>,
) {
    let mut head = Vec::new();
    let answer = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break server.answer(&head[..end + 4]).await;
        }
        if head.len() > crate::metadata::MAX_HEAD {
            break server.too_long();
        }
        match tokio::time::timeout(PEEK_TIMEOUT, from_guest.recv()).await {
            Ok(Some(b)) => {
                let _ = shared.events.send(Ev::Drained);
                head.extend_from_slice(&b);
            }
            Ok(None) | Err(_) => {
                let _ = shared.events.send(Ev::HostEof { flow: id });
                return;
            }
        }
    };
    let _ = shared.events.send(Ev::Data {
        flow: id,
        data: answer.into(),
    });
    let _ = shared.events.send(Ev::HostEof { flow: id });
}

/// The first-bytes check of a flow to a name on 443 or 80.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Sni,
    Host,
}

impl Check {
    fn peek(self, first: &[u8]) -> Peek {
        match self {
            Check::Sni => peek::client_hello_sni(first),
            Check::Host => peek::http_host(first),
        }
    }

    fn what(self) -> &'static str {
        match self {
            Check::Sni => "TLS server name",
            Check::Host => "HTTP Host",
        }
    }

    /// What the guest gets before the close: a TLS alert, or an HTTP 403 with the reason.
    fn refusal(self, why: &str) -> Vec<u8> {
        match self {
            Check::Sni => peek::TLS_ACCESS_DENIED.to_vec(),
            Check::Host => peek::http_forbidden(why),
        }
    }
}

/// One allowed flow's host side: the first-bytes check where it applies, the dial, then
/// bytes both ways until both sides are done.
async fn splice(
    id: u64,
    shared: Arc<Shared>,
    dest: Dest,
    port: u16,
    mut from_guest: mpsc::Receiver<Bytes>,
    credits: Arc<Semaphore>,
) {
    let ev = shared.events.clone();
    let end = |reason: String, deny: bool, reset: bool| {
        let _ = ev.send(Ev::End {
            flow: id,
            reason,
            deny,
            reset,
        });
    };
    let mut first = Vec::new();
    let check = match (&dest, port) {
        (Dest::Name(name), 443) => Some((name, Check::Sni)),
        (Dest::Name(name), 80) => Some((name, Check::Host)),
        _ => None,
    };
    if let Some((name, check)) = check {
        loop {
            let why = match check.peek(&first) {
                Peek::Name(n) if n == *name => break,
                Peek::Name(n) => format!("{} {n} is not {name}", check.what()),
                Peek::Bad(why) => why,
                Peek::More => match tokio::time::timeout(PEEK_TIMEOUT, from_guest.recv()).await {
                    Ok(Some(b)) => {
                        let _ = ev.send(Ev::Drained);
                        first.extend_from_slice(&b);
                        continue;
                    }
                    Ok(None) => return end("closed before its first request".into(), false, false),
                    Err(_) => "no request within 10 s".into(),
                },
            };
            let _ = ev.send(Ev::Data {
                flow: id,
                data: check.refusal(&why).into(),
            });
            return end(why, true, false);
        }
    }
    // A host whose rule has a transform is intercepted (HTTPS, or plain HTTP upgraded to
    // HTTPS upstream); every other flow is spliced untouched.
    let intercepted = match &dest {
        Dest::Name(name) => match crate::intercept::wanted(&shared.policy(), name, port) {
            Ok(w) => w,
            Err(why) => {
                let _ = ev.send(Ev::Data {
                    flow: id,
                    data: check.map_or_else(Vec::new, |(_, c)| c.refusal(&why)).into(),
                });
                return end(why, true, false);
            }
        },
        Dest::Addr(_) => false,
    };
    let interceptor = match (intercepted, &shared.intercept) {
        (false, _) => None,
        (true, Some(i)) => Some(i.clone()),
        (true, None) => {
            let why = "this stack has no interception CA for the rule's transform".to_string();
            return end(why, true, true);
        }
    };
    // Upgraded plain HTTP goes to the host's HTTPS port.
    let port = if interceptor.is_some() { 443 } else { port };
    // A name's addresses were checked against the floor when resolved (the hosts file's are
    // the operator's exception for that name); a raw address was checked at SYN time.
    let addrs = match &dest {
        Dest::Addr(a) => vec![*a],
        Dest::Name(n) => match shared.resolver.targets(n).await {
            Ok(t) => t.addrs,
            Err(e) => return end(e.reason(), true, true),
        },
    };
    let mut stream = None;
    let mut last_err = String::from("no address");
    for a in addrs {
        let sa = SocketAddrV4::new(a, port);
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(SocketAddr::V4(sa))).await {
            Ok(Ok(s)) => {
                stream = Some((s, sa));
                break;
            }
            Ok(Err(e)) => last_err = format!("connect {sa}: {e}"),
            Err(_) => last_err = format!("connect {sa}: timed out"),
        }
    }
    let Some((stream, sa)) = stream else {
        return end(last_err, false, true);
    };
    let _ = stream.set_nodelay(true);
    let _ = ev.send(Ev::Connected { flow: id, addr: sa });
    if let (Some(icpt), Dest::Name(name), Some((_, check))) = (interceptor, &dest, check) {
        let cx = crate::intercept::Context {
            name: name.clone(),
            port: if check == Check::Sni { 443 } else { 80 },
            policy: {
                let shared = shared.clone();
                Arc::new(move || shared.policy())
            },
            audit: shared.audit.clone(),
        };
        // The interceptor talks to the guest through a pipe of its own, so that the flow's
        // credits and channels stay as for any other flow.
        let (ours, theirs) = tokio::io::duplex(CHUNK);
        let tls = check == Check::Sni;
        let task = tokio::spawn(crate::intercept::serve(icpt, theirs, stream, tls, cx));
        let piped = pipe(id, &ev, ours, first.into(), from_guest, credits, None).await;
        let served = task
            .await
            .unwrap_or_else(|e| Err(format!("interception: {e}")));
        return match (served, piped) {
            (Err(why), _) => end(why, false, true),
            (Ok(()), Err(Stop::Io(e))) => end(format!("guest connection: {e}"), false, true),
            (Ok(()), Err(Stop::Denied(why))) => end(why, true, true),
            (Ok(()), Ok(())) => {}
        };
    }
    // Plain HTTP to a name: every later request on the connection is checked too.
    let requests = match check {
        Some((name, Check::Host)) => Some(peek::HttpRequests::new(name)),
        _ => None,
    };
    match pipe(id, &ev, stream, first.into(), from_guest, credits, requests).await {
        Ok(()) => {}
        Err(Stop::Denied(why)) => end(why, true, true),
        Err(Stop::Io(e)) => end(format!("host connection: {e}"), false, true),
    }
}

/// Bytes both ways between a flow's guest side and `stream` (its host connection, or the
/// requester of an inbound one), `first` going first, every guest byte fed to `requests`
/// where plain HTTP is checked. Half-closes are forwarded; the first failure either way ends
/// it at once, a clean end of one direction waits for the other.
async fn pipe<S: AsyncRead + AsyncWrite>(
    id: u64,
    ev: &mpsc::UnboundedSender<Ev>,
    stream: S,
    first: Bytes,
    mut from_guest: mpsc::Receiver<Bytes>,
    credits: Arc<Semaphore>,
    mut requests: Option<peek::HttpRequests>,
) -> std::result::Result<(), Stop> {
    let (mut hr, mut hw) = tokio::io::split(stream);
    let up = async {
        let mut next = Some(first);
        loop {
            let Some(b) = next.take() else { break };
            if let Some(r) = requests.as_mut() {
                r.feed(&b).map_err(Stop::Denied)?;
            }
            if !b.is_empty() {
                hw.write_all(&b).await?;
            }
            next = from_guest.recv().await;
            if next.is_some() {
                let _ = ev.send(Ev::Drained);
            }
        }
        hw.shutdown().await.map_err(Stop::Io)
    };
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = hr.read(&mut buf).await?;
            if n == 0 {
                let _ = ev.send(Ev::HostEof { flow: id });
                return Ok::<(), Stop>(());
            }
            credits
                .acquire_many(n as u32)
                .await
                .map_err(|_| Stop::Io(std::io::Error::other("flow closed")))?
                .forget();
            let _ = ev.send(Ev::Data {
                flow: id,
                data: Bytes::copy_from_slice(&buf[..n]),
            });
        }
    };
    tokio::try_join!(up, down).map(|_| ())
}

/// An inbound connection the guest accepted: the requester hears `ok`, then bytes flow.
async fn inbound_flow(
    id: u64,
    shared: Arc<Shared>,
    mut stream: UnixStream,
    from_guest: mpsc::Receiver<Bytes>,
    credits: Arc<Semaphore>,
) {
    let ev = &shared.events;
    let result = match crate::ingress::answer(&mut stream, Ok(())).await {
        Ok(()) => pipe(id, ev, stream, Bytes::new(), from_guest, credits, None).await,
        Err(e) => Err(Stop::Io(e)),
    };
    if let Err(e) = result {
        let reason = match e {
            Stop::Denied(why) => why,
            Stop::Io(e) => format!("requester: {e}"),
        };
        let _ = ev.send(Ev::End {
            flow: id,
            reason,
            deny: false,
            reset: true,
        });
    }
}

/// Answers a requester whose inbound connection cannot be made.
fn refuse(mut stream: UnixStream, why: String) {
    tokio::spawn(async move {
        let _ = crate::ingress::answer(&mut stream, Err(why)).await;
    });
}

/// Why a spliced flow stopped early.
enum Stop {
    /// A later request broke the rules (plain HTTP to another host).
    Denied(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Stop {
        Stop::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EgressSpec, Floor, HostsFile};
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, TcpSeqNumber};

    fn stack() -> (Stack, mpsc::Receiver<Event>) {
        let (audit, events) = Audit::channel(100_000);
        // Default deny and no upstream: nothing here may reach any network.
        let resolver = Arc::new(Resolver::new(
            None,
            HostsFile::default(),
            Floor::new(vec![]),
        ));
        let (tx, _rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            resolver,
            policy: RwLock::new(Arc::new(Policy::new(EgressSpec::default()).unwrap())),
            audit,
            dns: Mutex::new(Bucket::new(1_000_000)),
            events: tx,
            intercept: None,
            metadata: None,
        });
        (Stack::new(shared, Limits::default()), events)
    }

    fn tcp_syn(dst: Ipv4Addr, port: u16) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: port,
            control: smoltcp::wire::TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 64240,
            window_scale: Some(7),
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        ipv4_frame(dst, IpProtocol::Tcp, tcp.buffer_len(), |payload| {
            let mut t = TcpPacket::new_unchecked(payload);
            tcp.emit(&mut t, &GUEST_IP.into(), &dst.into(), &caps);
        })
    }

    /// An IPv4 frame from the guest to the gateway's MAC; `emit` writes its `len`-byte payload.
    fn ipv4_frame(
        dst: Ipv4Addr,
        protocol: IpProtocol,
        len: usize,
        emit: impl FnOnce(&mut [u8]),
    ) -> Vec<u8> {
        let ip = Ipv4Repr {
            src_addr: GUEST_IP,
            dst_addr: dst,
            next_header: protocol,
            payload_len: len,
            hop_limit: 64,
        };
        let mut buf = vec![0u8; 14 + ip.buffer_len() + len];
        let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
        EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            dst_addr: EthernetAddress(GATEWAY_MAC),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip.emit(&mut ipp, &ChecksumCapabilities::default());
        emit(ipp.payload_mut());
        buf
    }

    fn arp_request() -> Vec<u8> {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            source_protocol_addr: GUEST_IP,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: GATEWAY_IP,
        };
        let mut buf = vec![0u8; 14 + arp.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
        EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut eth);
        arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        buf
    }

    fn ping(dst: Ipv4Addr) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let icmp = smoltcp::wire::Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: 1,
            data: b"moat",
        };
        ipv4_frame(dst, IpProtocol::Icmp, icmp.buffer_len(), |payload| {
            icmp.emit(
                &mut smoltcp::wire::Icmpv4Packet::new_unchecked(payload),
                &caps,
            );
        })
    }

    /// Frames out of the device, unframed.
    fn sent(st: &mut Stack) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut b = BytesMut::from(&st.device.tx[..]);
        while let Some(f) = take_frame(&mut b).unwrap() {
            out.push(f.to_vec());
        }
        st.device.tx.clear();
        out
    }

    #[tokio::test]
    async fn the_gateway_answers_arp_and_a_denied_syn_gets_a_reset() {
        let (mut st, mut events) = stack();
        st.frame(arp_request().into());
        st.run();
        let out = sent(&mut st);
        assert_eq!(out.len(), 1);
        let eth = EthernetFrame::new_checked(&out[0][..]).unwrap();
        assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
        assert_eq!(eth.src_addr(), EthernetAddress(GATEWAY_MAC));

        st.frame(tcp_syn(Ipv4Addr::new(93, 184, 216, 34), 443).into());
        st.run();
        let out = sent(&mut st);
        let eth = EthernetFrame::new_checked(&out[0][..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.rst(), "a denied SYN is reset at once");
        assert!(st.flows.is_empty() && st.sockets.iter().count() == 0);
        let e = events.try_recv().unwrap();
        assert_eq!((e.kind, e.verdict), (Kind::Tcp, Verdict::Deny));
    }

    #[tokio::test]
    async fn only_the_gateway_answers_ping() {
        let (mut st, _events) = stack();
        // The guest's MAC is learnt from its ARP request first.
        st.frame(arp_request().into());
        st.run();
        sent(&mut st);
        st.frame(ping(GATEWAY_IP).into());
        st.run();
        let out = sent(&mut st);
        assert_eq!(out.len(), 1, "an echo reply");
        let eth = EthernetFrame::new_checked(&out[0][..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(
            (ip.src_addr(), ip.next_header()),
            (GATEWAY_IP, IpProtocol::Icmp)
        );
        st.frame(ping(Ipv4Addr::new(8, 8, 8, 8)).into());
        st.run();
        assert!(
            sent(&mut st).is_empty(),
            "no answer for anything past the gateway"
        );
    }

    /// Mutated and random frames (truncations, bit flips, garbage) never panic the stack and
    /// never leave a socket behind. A deterministic stand-in for a fuzzer.
    #[tokio::test]
    async fn hostile_frames_are_survived() {
        let (mut st, _events) = stack();
        let seeds = [
            arp_request(),
            tcp_syn(Ipv4Addr::new(93, 184, 216, 34), 443),
            tcp_syn(Ipv4Addr::new(198, 18, 0, 1), 80),
            tcp_syn(GATEWAY_IP, 53),
            udp_frame(
                EthernetAddress([2, 0, 0, 0, 0, 2]),
                (GUEST_IP, 5353),
                (GATEWAY_IP, 53),
                b"\x12\x34\x01\x00\x00\x01",
            ),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..50_000 {
            let mut f = seeds[i % seeds.len()].clone();
            match rand() % 4 {
                0 => f.truncate((rand() as usize) % (f.len() + 1)),
                1 => {
                    for _ in 0..1 + rand() % 4 {
                        let at = (rand() as usize) % f.len();
                        f[at] ^= 1 << (rand() % 8);
                    }
                }
                2 => f = (0..rand() % 1600).map(|_| rand() as u8).collect(),
                _ => {
                    // A valid header with a garbage tail.
                    let keep = 34.min(f.len());
                    f.truncate(keep);
                    f.extend((0..rand() % 200).map(|_| rand() as u8));
                }
            }
            st.frame(f.into());
            st.run();
            st.device.tx.clear();
        }
        // Only DNS over TCP passes default deny; every socket belongs to a flow.
        assert!(st.flows.values().all(|f| f.internal));
        assert_eq!(st.sockets.iter().count(), st.flows.len());
    }

    /// The byte bucket: a burst of one second's worth, then the rate, whole bytes only; and
    /// the wait until a packet's worth is there.
    #[test]
    fn the_bandwidth_bucket_lets_its_rate_through() {
        let mut b = Bucket::new(100_000);
        assert_eq!(b.take_up_to(60_000), 60_000);
        assert_eq!(
            b.take_up_to(60_000),
            40_000,
            "the burst is one second's worth"
        );
        assert_eq!(b.take_up_to(1), 0);
        assert!(b.wait_for(1500) > Duration::from_millis(10));
        assert!(b.wait_for(1500) <= Duration::from_millis(15));
        std::thread::sleep(Duration::from_millis(200));
        let got = b.take_up_to(usize::MAX);
        assert!(
            (20_000..=30_000).contains(&got),
            "{got} bytes after 0.2 s at 100 kB/s"
        );
        // A long idle time refills to the burst, no more.
        b.tokens = 0.0;
        b.last = Instant::now() - Duration::from_secs(30);
        assert_eq!(b.take_up_to(usize::MAX), 100_000);
    }

    /// Without a cap every byte goes; with one, what the bucket holds, and the shortfall is
    /// remembered for the loop's next wake-up.
    #[test]
    fn allowance_holds_back_what_the_cap_does_not_allow() {
        assert_eq!(allowance(&mut None, 1 << 20), 1 << 20);
        let mut bw = Bandwidth::new(Some(10_000));
        assert_eq!(allowance(&mut bw, 4_000), 4_000);
        assert!(!bw.as_ref().unwrap().held);
        assert_eq!(allowance(&mut bw, 8_000), 6_000);
        assert!(bw.as_ref().unwrap().held);
    }
}
