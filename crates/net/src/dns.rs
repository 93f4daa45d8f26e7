//! moat's DNS: every query the guest sends, to any resolver address and over UDP or TCP, is
//! answered here and never forwarded as it is. A name the policy allows is resolved on the host
//! (the operator's hosts file first, then the one configured upstream resolver, answers in the
//! floor dropped) and answered with a *synthetic* address from 198.18.0.0/15 bound to that name
//! for this sandbox; any other name gets NXDOMAIN and causes no upstream query. Record types
//! other than A (AAAA, TXT, HTTPS, SVCB, …) of an allowed name get an empty answer, so no data
//! and no ECH or SVCB hints come back. A later connection to a synthetic address is then
//! checked by the name it stands for (`Resolver::name_of`), on any port.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

use crate::audit::{Event, Kind, Verdict};
use crate::policy::normalize_name;
use crate::{Floor, HostsFile, Policy};

/// The synthetic pool: 198.18.0.0/15 (RFC 2544 benchmarking, in the floor, so never a real
/// destination here).
const POOL_BASE: u32 = u32::from_be_bytes([198, 18, 0, 1]);
const POOL_SIZE: u32 = (1 << 17) - 2;
/// TTL of synthetic answers; the binding itself lasts as long as the sandbox.
const ANSWER_TTL: u32 = 60;
/// Upstream answers are used for at most this long before a connection re-resolves.
const MAX_CACHE: Duration = Duration::from_secs(300);
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

pub fn is_synthetic(ip: Ipv4Addr) -> bool {
    let n = u32::from(ip);
    (POOL_BASE..POOL_BASE + POOL_SIZE).contains(&n)
}

#[derive(Debug, Clone)]
struct Binding {
    synthetic: Ipv4Addr,
    targets: Vec<Ipv4Addr>,
    from_hosts: bool,
    fresh_until: Instant,
}

#[derive(Debug, Default)]
struct Names {
    by_name: HashMap<String, Binding>,
    by_addr: HashMap<Ipv4Addr, String>,
    next: u32,
}

/// Where a name's connections go on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    pub addrs: Vec<Ipv4Addr>,
    /// From the operator's hosts file: these addresses are let past the floor.
    pub from_hosts: bool,
}

/// Why a name could not be resolved on the host.
#[derive(Debug, Clone, PartialEq)]
pub enum LookupError {
    /// NXDOMAIN (or nothing usable) upstream.
    NoSuchName,
    /// Every upstream answer was in the floor: a rebinding attempt or a private name.
    Rebinding(String),
    /// The upstream resolver failed or timed out.
    Upstream(String),
}

impl LookupError {
    pub fn reason(&self) -> String {
        match self {
            LookupError::NoSuchName => "no such name upstream".into(),
            LookupError::Rebinding(why) => {
                format!("rebinding: upstream answered only addresses in the floor ({why})")
            }
            LookupError::Upstream(why) => format!("upstream resolver: {why}"),
        }
    }
}

/// One sandbox's DNS state: the name↔synthetic-address bindings and the host-side lookups.
#[derive(Debug)]
pub struct Resolver {
    upstream: Option<SocketAddr>,
    hosts: HostsFile,
    floor: Floor,
    names: Mutex<Names>,
}

impl Resolver {
    /// `upstream` is the resolver the host asks for allowed names not in `hosts`; `None` means
    /// only the hosts file answers.
    pub fn new(upstream: Option<SocketAddr>, hosts: HostsFile, floor: Floor) -> Resolver {
        Resolver {
            upstream,
            hosts,
            floor,
            names: Mutex::new(Names::default()),
        }
    }

    pub fn floor(&self) -> &Floor {
        &self.floor
    }

    /// The name a synthetic address was handed out for.
    pub fn name_of(&self, ip: Ipv4Addr) -> Option<String> {
        self.names
            .lock()
            .expect("names lock")
            .by_addr
            .get(&ip)
            .cloned()
    }

    /// Answers one DNS message from the guest. `None` when it is not worth an answer (not a
    /// query, or too broken to echo an id back). Every answered query comes with its audit
    /// event.
    pub async fn answer(&self, policy: &Policy, query: &[u8]) -> Option<(Vec<u8>, Event)> {
        let req = Message::from_vec(query).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        let mut event = Event::new(Kind::Dns, Verdict::Deny, "");
        let q = match (req.metadata.op_code, req.queries.as_slice()) {
            (OpCode::Query, [q]) if q.query_class == DNSClass::IN => q.clone(),
            _ => {
                resp.metadata.response_code = ResponseCode::NotImp;
                event.reason = "not a single IN query".into();
                return Some((resp.to_vec().ok()?, event));
            }
        };
        resp.add_query(q.clone());
        event.qtype = Some(q.query_type.to_string());
        let raw = q.name.to_ascii();
        event.name = Some(raw.strip_suffix('.').unwrap_or(&raw).to_ascii_lowercase());
        let Some(name) = normalize_name(&raw) else {
            resp.metadata.response_code = ResponseCode::NXDomain;
            event.reason = "not a host name".into();
            return Some((resp.to_vec().ok()?, event));
        };
        let decision = policy.decide_dns(&name);
        event.rule = decision.rule;
        if !decision.allow {
            resp.metadata.response_code = ResponseCode::NXDomain;
            event.reason = decision.reason;
            return Some((resp.to_vec().ok()?, event));
        }
        if q.query_type != RecordType::A {
            // NODATA: the name exists for the guest, but only as an IPv4 address.
            event.verdict = Verdict::Allow;
            event.reason = format!("{}; only A records are answered", decision.reason);
            return Some((resp.to_vec().ok()?, event));
        }
        match self.bind(&name).await {
            Ok((synthetic, targets)) => {
                event.verdict = Verdict::Allow;
                event.reason = decision.reason;
                event.address = Some(synthetic.to_string());
                event.resolved = targets.addrs.iter().map(|a| a.to_string()).collect();
                resp.add_answer(Record::from_rdata(
                    q.name.clone(),
                    ANSWER_TTL,
                    RData::A(synthetic.into()),
                ));
            }
            Err(e) => {
                resp.metadata.response_code = match e {
                    LookupError::Upstream(_) => ResponseCode::ServFail,
                    _ => ResponseCode::NXDomain,
                };
                event.reason = e.reason();
            }
        }
        Some((resp.to_vec().ok()?, event))
    }

    /// Resolves `name` on the host and binds it to its synthetic address.
    async fn bind(&self, name: &str) -> Result<(Ipv4Addr, Targets), LookupError> {
        let targets = self.targets(name).await?;
        let mut names = self.names.lock().expect("names lock");
        if let Some(b) = names.by_name.get(name) {
            return Ok((b.synthetic, targets));
        }
        if names.next >= POOL_SIZE {
            return Err(LookupError::Upstream(
                "this sandbox has used every synthetic address".into(),
            ));
        }
        let synthetic = Ipv4Addr::from(POOL_BASE + names.next);
        names.next += 1;
        names.by_addr.insert(synthetic, name.to_string());
        names.by_name.insert(
            name.to_string(),
            Binding {
                synthetic,
                targets: targets.addrs.clone(),
                from_hosts: targets.from_hosts,
                fresh_until: Instant::now() + MAX_CACHE,
            },
        );
        Ok((synthetic, targets))
    }

    /// Where connections to `name` go: the hosts file's addresses, or the upstream answers
    /// outside the floor (cached for a while).
    pub async fn targets(&self, name: &str) -> Result<Targets, LookupError> {
        if let Some(addrs) = self.hosts.lookup(name) {
            return Ok(Targets {
                addrs: addrs.to_vec(),
                from_hosts: true,
            });
        }
        {
            let names = self.names.lock().expect("names lock");
            if let Some(b) = names.by_name.get(name) {
                if b.fresh_until > Instant::now() && !b.targets.is_empty() {
                    return Ok(Targets {
                        addrs: b.targets.clone(),
                        from_hosts: b.from_hosts,
                    });
                }
            }
        }
        let Some(upstream) = self.upstream else {
            return Err(LookupError::NoSuchName);
        };
        let (answers, ttl) = query_upstream(upstream, name).await?;
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for a in answers {
            match self.floor.address(IpAddr::V4(a)) {
                None => kept.push(a),
                Some(why) => dropped.push(format!("{a}: {why}")),
            }
        }
        if kept.is_empty() {
            return Err(if dropped.is_empty() {
                LookupError::NoSuchName
            } else {
                LookupError::Rebinding(dropped.join("; "))
            });
        }
        let mut names = self.names.lock().expect("names lock");
        if let Some(b) = names.by_name.get_mut(name) {
            b.targets = kept.clone();
            b.fresh_until = Instant::now() + Duration::from_secs(ttl.into()).min(MAX_CACHE);
        }
        Ok(Targets {
            addrs: kept,
            from_hosts: false,
        })
    }
}

/// Asks `server` for the A records of `name` over UDP; returns the addresses and the smallest
/// TTL. CNAME chains are followed by the upstream; every A record in the answer is taken.
async fn query_upstream(
    server: SocketAddr,
    name: &str,
) -> Result<(Vec<Ipv4Addr>, u32), LookupError> {
    let fail = |m: String| LookupError::Upstream(m);
    let qname = Name::from_str(&format!("{name}.")).map_err(|e| fail(e.to_string()))?;
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname, RecordType::A));
    // EDNS0 with the DNS-flag-day payload size, so a long address list is not truncated to
    // 512 bytes (there is no TCP retry).
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    msg.set_edns(edns);
    let bytes = msg.to_vec().map_err(|e| fail(e.to_string()))?;
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| fail(e.to_string()))?;
    sock.connect(server)
        .await
        .map_err(|e| fail(format!("{server}: {e}")))?;
    let mut buf = vec![0u8; 4096];
    for _attempt in 0..2 {
        sock.send(&bytes)
            .await
            .map_err(|e| fail(format!("{server}: {e}")))?;
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(fail(format!("{server}: {e}"))),
                Ok(Ok(n)) => n,
            };
            let Ok(resp) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            // A reply to something else (or forged): keep waiting for ours.
            if resp.metadata.id != msg.metadata.id || resp.queries != msg.queries {
                continue;
            }
            return match resp.metadata.response_code {
                ResponseCode::NoError => {
                    let mut ttl = u32::MAX;
                    let addrs: Vec<Ipv4Addr> = resp
                        .answers
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::A(a) => {
                                ttl = ttl.min(r.ttl);
                                Some(a.0)
                            }
                            _ => None,
                        })
                        .collect();
                    if addrs.is_empty() {
                        Err(LookupError::NoSuchName)
                    } else {
                        Ok((addrs, ttl))
                    }
                }
                ResponseCode::NXDomain => Err(LookupError::NoSuchName),
                other => Err(fail(format!("{server} answered {other}"))),
            };
        }
    }
    Err(fail(format!("{server} did not answer")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    /// A real DNS server on loopback that answers from a table and counts what it was asked.
    struct TestUpstream {
        addr: SocketAddr,
        asked: Arc<std::sync::Mutex<Vec<String>>>,
        _task: tokio::task::JoinHandle<()>,
    }

    impl TestUpstream {
        async fn start(table: &[(&str, &[&str])]) -> TestUpstream {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = sock.local_addr().unwrap();
            let table: HashMap<String, Vec<Ipv4Addr>> = table
                .iter()
                .map(|(n, a)| {
                    (
                        n.to_string(),
                        a.iter().map(|s| s.parse().unwrap()).collect(),
                    )
                })
                .collect();
            let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
            let log = asked.clone();
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let (n, from) = sock.recv_from(&mut buf).await.unwrap();
                    let req = Message::from_vec(&buf[..n]).unwrap();
                    let q = req.queries[0].clone();
                    let name = q.name.to_ascii().trim_end_matches('.').to_string();
                    log.lock().unwrap().push(name.clone());
                    let mut resp = Message::response(req.metadata.id, OpCode::Query);
                    resp.add_query(q.clone());
                    match table.get(&name) {
                        Some(addrs) => {
                            for a in addrs {
                                resp.add_answer(Record::from_rdata(
                                    q.name.clone(),
                                    30,
                                    RData::A((*a).into()),
                                ));
                            }
                        }
                        None => resp.metadata.response_code = ResponseCode::NXDomain,
                    }
                    // Like a real server: without EDNS an answer over 512 bytes is truncated.
                    let limit = req
                        .edns
                        .as_ref()
                        .map_or(512, |e| usize::from(e.max_payload()));
                    if resp.to_vec().unwrap().len() > limit {
                        resp.answers.clear();
                        resp.metadata.truncation = true;
                    }
                    sock.send_to(&resp.to_vec().unwrap(), from).await.unwrap();
                }
            });
            TestUpstream {
                addr,
                asked,
                _task: task,
            }
        }

        fn asked(&self) -> Vec<String> {
            self.asked.lock().unwrap().clone()
        }
    }

    fn policy(v: serde_json::Value) -> Policy {
        Policy::new(serde_json::from_value(v).unwrap()).unwrap()
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    async fn ask(r: &Resolver, p: &Policy, name: &str, t: RecordType) -> (Message, Event) {
        let (bytes, ev) = r.answer(p, &query(name, t)).await.unwrap();
        (Message::from_vec(&bytes).unwrap(), ev)
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn allowed_names_get_a_synthetic_address_bound_to_them() {
        let up = TestUpstream::start(&[("api.example.com", &["93.184.216.34"])]).await;
        let r = Resolver::new(Some(up.addr), HostsFile::default(), Floor::new(vec![]));
        let p = policy(json!({"rules": [{"host": "api.example.com", "ports": [443]}]}));
        let (m, ev) = ask(&r, &p, "API.example.com.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let a = a_records(&m);
        assert_eq!(a.len(), 1);
        assert!(is_synthetic(a[0]), "{a:?}");
        assert_eq!(r.name_of(a[0]).as_deref(), Some("api.example.com"));
        assert_eq!((ev.verdict, ev.rule), (Verdict::Allow, Some(0)));
        assert_eq!(ev.resolved, vec!["93.184.216.34"]);
        let t = r.targets("api.example.com").await.unwrap();
        assert_eq!(t.addrs, vec!["93.184.216.34".parse::<Ipv4Addr>().unwrap()]);
        // The same name keeps its address; another name gets another one.
        let (m2, _) = ask(&r, &p, "api.example.com.", RecordType::A).await;
        assert_eq!(a_records(&m2), a);
        assert_eq!(
            up.asked(),
            vec!["api.example.com"],
            "the second answer came from the cache"
        );
    }

    #[tokio::test]
    async fn denied_names_get_nxdomain_and_are_never_sent_upstream() {
        let up = TestUpstream::start(&[("evil.test", &["93.184.216.34"])]).await;
        let r = Resolver::new(Some(up.addr), HostsFile::default(), Floor::new(vec![]));
        let p = policy(json!({"rules": [
            {"host": "bad.example.com", "action": "deny"},
            {"host": "*.example.com"},
        ]}));
        for (name, t) in [
            ("evil.test.", RecordType::A),
            ("secret-data-in-a-label.evil.test.", RecordType::TXT),
            ("evil.test.", RecordType::AAAA),
            ("evil.test.", RecordType::HTTPS),
            ("evil.test.", RecordType::SVCB),
            ("bad.example.com.", RecordType::A),
            ("example.com.", RecordType::A),
        ] {
            let (m, ev) = ask(&r, &p, name, t).await;
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::NXDomain,
                "{name} {t}"
            );
            assert!(m.answers.is_empty());
            assert_eq!(ev.verdict, Verdict::Deny, "{name} {t}");
        }
        assert!(
            up.asked().is_empty(),
            "nothing left the host: {:?}",
            up.asked()
        );
    }

    #[tokio::test]
    async fn other_types_of_allowed_names_get_an_empty_answer() {
        let up = TestUpstream::start(&[("a.example.com", &["93.184.216.34"])]).await;
        let r = Resolver::new(Some(up.addr), HostsFile::default(), Floor::new(vec![]));
        let p = policy(json!({"rules": [{"host": "*.example.com"}]}));
        for t in [
            RecordType::AAAA,
            RecordType::TXT,
            RecordType::HTTPS,
            RecordType::SVCB,
            RecordType::MX,
            RecordType::ANY,
        ] {
            let (m, ev) = ask(&r, &p, "a.example.com.", t).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t}");
            assert!(m.answers.is_empty(), "{t}: {:?}", m.answers);
            assert_eq!(ev.qtype.as_deref(), Some(t.to_string().as_str()));
        }
        assert!(up.asked().is_empty(), "only A queries reach upstream");
    }

    #[tokio::test]
    async fn upstream_answers_in_the_floor_are_dropped() {
        let up = TestUpstream::start(&[
            ("rebind.example.com", &["127.0.0.1", "10.0.0.5"]),
            ("meta.example.com", &["169.254.169.254"]),
            ("mixed.example.com", &["10.0.0.5", "93.184.216.34"]),
            ("self.example.com", &["203.0.113.9"]),
        ])
        .await;
        let r = Resolver::new(
            Some(up.addr),
            HostsFile::default(),
            Floor::new(vec!["203.0.113.9".parse().unwrap()]),
        );
        let p = policy(json!({"rules": [{"host": "*.example.com"}]}));
        for n in [
            "rebind.example.com.",
            "meta.example.com.",
            "self.example.com.",
        ] {
            let (m, ev) = ask(&r, &p, n, RecordType::A).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{n}");
            assert!(ev.reason.starts_with("rebinding"), "{n}: {}", ev.reason);
            assert!(r.targets(n.trim_end_matches('.')).await.is_err());
        }
        let (m, _) = ask(&r, &p, "mixed.example.com.", RecordType::A).await;
        assert_eq!(a_records(&m).len(), 1);
        let t = r.targets("mixed.example.com").await.unwrap();
        assert_eq!(t.addrs, vec!["93.184.216.34".parse::<Ipv4Addr>().unwrap()]);
        let (m, ev) = ask(&r, &p, "nope.example.com.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(ev.reason, "no such name upstream");
    }

    #[tokio::test]
    async fn a_long_address_list_is_not_truncated() {
        let many: Vec<String> = (1..=60).map(|i| format!("93.184.216.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let up = TestUpstream::start(&[("cdn.example.com", &many)]).await;
        let r = Resolver::new(Some(up.addr), HostsFile::default(), Floor::new(vec![]));
        let t = r.targets("cdn.example.com").await.unwrap();
        assert_eq!(t.addrs.len(), 60);
    }

    #[tokio::test]
    async fn the_hosts_file_answers_first_and_passes_the_floor_for_its_names_only() {
        let up = TestUpstream::start(&[("other.test", &["127.0.0.1"])]).await;
        let hosts = HostsFile::parse("127.0.0.1 api.test\n").unwrap();
        let r = Resolver::new(Some(up.addr), hosts, Floor::new(vec![]));
        let p = policy(
            json!({"rules": [{"host": "api.test"}, {"host": "other.test"}, {"host": "unlisted.test"}]}),
        );
        let (m, _) = ask(&r, &p, "api.test.", RecordType::A).await;
        assert_eq!(a_records(&m).len(), 1);
        let t = r.targets("api.test").await.unwrap();
        assert!(t.from_hosts);
        assert_eq!(t.addrs, vec![Ipv4Addr::LOCALHOST]);
        // The same loopback address from upstream for another name is still rebinding.
        let (m, ev) = ask(&r, &p, "other.test.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(ev.reason.starts_with("rebinding"));
        assert_eq!(
            up.asked(),
            vec!["other.test"],
            "api.test was never asked upstream"
        );
        // A name in the file the policy does not allow is still refused.
        let p2 = policy(json!({"rules": [{"host": "other.test"}]}));
        let (m, _) = ask(&r, &p2, "api.test.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[tokio::test]
    async fn an_upstream_that_does_not_answer_is_servfail() {
        // A bound socket that never replies.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = Resolver::new(
            Some(silent.local_addr().unwrap()),
            HostsFile::default(),
            Floor::new(vec![]),
        );
        let p = policy(json!({"default": "allow"}));
        let (m, ev) = ask(&r, &p, "a.example.com.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(ev.reason.contains("did not answer"), "{}", ev.reason);
    }

    /// Mutated queries (bit flips, truncations, junk tails) never panic the engine, every
    /// answer is a well-formed response to the same id, and nothing but the one allowed name
    /// ever gets an address.
    #[tokio::test]
    async fn mutated_queries_are_handled() {
        let hosts = HostsFile::parse("127.0.0.1 a.example.com\n").unwrap();
        let r = Resolver::new(None, hosts, Floor::new(vec![]));
        let p = policy(json!({"rules": [{"host": "a.example.com"}]}));
        let seeds = [
            query("a.example.com.", RecordType::A),
            query("b.example.com.", RecordType::TXT),
            query("a.example.com.", RecordType::AAAA),
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            let mut q = seeds[i % seeds.len()].clone();
            match rand() % 3 {
                0 => q.truncate((rand() as usize) % (q.len() + 1)),
                1 => {
                    let at = (rand() as usize) % q.len();
                    q[at] ^= 1 << (rand() % 8);
                }
                _ => q.extend((0..rand() % 64).map(|_| rand() as u8)),
            }
            let Some((bytes, _)) = r.answer(&p, &q).await else {
                continue;
            };
            let m = Message::from_vec(&bytes).expect("answers parse");
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_eq!(&bytes[..2], &q[..2], "same id");
            for a in a_records(&m) {
                assert_eq!(r.name_of(a).as_deref(), Some("a.example.com"));
            }
        }
    }

    #[tokio::test]
    async fn garbage_is_not_answered_and_odd_queries_are_refused() {
        let r = Resolver::new(None, HostsFile::default(), Floor::new(vec![]));
        let p = policy(json!({"default": "allow"}));
        assert!(r.answer(&p, b"").await.is_none());
        assert!(r.answer(&p, &[0xff; 11]).await.is_none());
        // Two questions in one message.
        let mut m = Message::query();
        m.add_query(Query::query(
            Name::from_str("a.test.").unwrap(),
            RecordType::A,
        ));
        m.add_query(Query::query(
            Name::from_str("b.test.").unwrap(),
            RecordType::A,
        ));
        let (bytes, _) = r.answer(&p, &m.to_vec().unwrap()).await.unwrap();
        assert_eq!(
            Message::from_vec(&bytes).unwrap().metadata.response_code,
            ResponseCode::NotImp
        );
        // A response sent as a query is ignored.
        let resp = Message::response(7, OpCode::Query);
        assert!(r.answer(&p, &resp.to_vec().unwrap()).await.is_none());
    }
}
