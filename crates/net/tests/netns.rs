//! The stack with a real guest: a network namespace whose TAP device's frames are relayed in
//! QEMU's stream framing to the stack, so the Linux kernel, `curl` and Python in that namespace
//! are the guest. The stack runs through its process entry (`moat_net::run`) and is driven
//! over its control socket as the daemon will drive it; it, its test servers and its test
//! upstream resolver run in a second namespace (their "host"), and a third one behind a veth
//! plays a public server, so nothing touches the machine's own network. Needs root
//! (`ip netns`), `ip`, `curl` and `python3`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record};
use moat_net::audit::{Event, Kind, Verdict};
use moat_net::control::Reply;
use moat_net::peek::{client_hello_sni, Peek};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    control_path: std::path::PathBuf,
    ports_path: std::path::PathBuf,
    control: Mutex<Option<Control>>,
    _dir: tempfile::TempDir,
    _cleanup: Cleanup,
}

/// The daemon's end of the control channel: requests out, replies in (audit events go to
/// `Seen`, everything else to `replies`).
struct Control {
    tx: UnixStream,
    replies: std::sync::mpsc::Receiver<Reply>,
}

/// Removes the namespaces, however the test ends.
struct Cleanup(Vec<String>);

const HOSTS: &str = "127.0.0.1 api.test x.api2.test blocked.api2.test\n";
/// A public-looking server: another namespace behind a veth, reached through a CIDR rule.
const CIDR_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The host namespace's own address on that link: in the floor.
const HOST_OWN: &str = "198.51.100.2";

fn default_policy() -> serde_json::Value {
    serde_json::json!({"rules": [
        {"host": "blocked.api2.test", "action": "deny"},
        {"host": "*.api2.test"},
        {"host": "api.test"},
        {"host": "rebind.test"},
        {"host": "private.test"},
        {"cidr": "198.51.100.0/24", "ports": [7000]},
        {"host": "api.test", "protocol": "udp", "ports": [7001]},
        {"cidr": "198.51.100.0/24", "protocol": "udp", "ports": [7001]},
    ]})
}

/// Runs `f` on a thread of its own inside namespace `ns`, on a runtime of its own.
fn in_ns<F, Fut>(ns: &str, f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let ns = ns.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let fut = f();
            ready_tx.send(()).unwrap();
            fut.await;
            std::future::pending::<()>().await;
        });
    });
    ready_rx.recv().unwrap();
}

impl Net {
    fn new() -> Net {
        Net::with_limits(
            serde_json::json!({"max_flows": 64, "new_flows_per_s": 1000, "dns_qps": 1000}),
        )
    }

    fn with_limits(limits: serde_json::Value) -> Net {
        Net::build(limits, None)
    }

    /// A stack that serves the in-guest identity endpoint with `identity_header`.
    fn with_identity(identity_header: &str) -> Net {
        Net::build(
            serde_json::json!({"max_flows": 64, "new_flows_per_s": 1000, "dns_qps": 1000}),
            Some(identity_header),
        )
    }

    fn build(limits: serde_json::Value, identity_header: Option<&str>) -> Net {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let (guest, host, server) = (
            format!("mng-{id}"),
            format!("mnh-{id}"),
            format!("mns-{id}"),
        );
        let cleanup = Cleanup(vec![guest.clone(), host.clone(), server.clone()]);
        for ns in &cleanup.0 {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        std::fs::create_dir_all(format!("/etc/netns/{guest}")).unwrap();
        std::fs::write(
            format!("/etc/netns/{guest}/resolv.conf"),
            "nameserver 100.127.255.1\n",
        )
        .unwrap();
        sh(&[
            "ip", "-n", &host, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns",
            &server,
        ]);
        sh(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            &format!("{HOST_OWN}/24"),
            "dev",
            "v0",
        ]);
        sh(&["ip", "-n", &host, "link", "set", "v0", "up"]);
        sh(&[
            "ip",
            "-n",
            &server,
            "addr",
            "add",
            "198.51.100.1/24",
            "dev",
            "v1",
        ]);
        sh(&["ip", "-n", &server, "link", "set", "v1", "up"]);
        sh(&[
            "ip", "-n", &guest, "tuntap", "add", "dev", "tap0", "mode", "tap",
        ]);
        let tap = open_tap(&guest);
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
        let s = seen.clone();
        in_ns(&host, move || async move {
            start_servers(s.clone(), Ipv4Addr::LOCALHOST, &[80, 443, 5432, 5433]).await;
            // Its own address, to show the floor stops it even under a CIDR rule.
            start_servers(s.clone(), HOST_OWN.parse().unwrap(), &[7000]).await;
            start_upstream(s).await;
            udp_echo(Ipv4Addr::LOCALHOST, 7001).await;
        });
        let s = seen.clone();
        in_ns(&server, move || async move {
            start_servers(s, CIDR_SERVER, &[7000]).await;
            udp_echo(CIDR_SERVER, 7001).await;
        });

        // The stack, through its process entry, in the host namespace.
        let dir = tempfile::tempdir().unwrap();
        let control_path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&control_path).unwrap();
        let ports_path = dir.path().join("ports.sock");
        let ports = std::os::unix::net::UnixListener::bind(&ports_path).unwrap();
        let hostns = host.clone();
        std::thread::spawn(move || {
            enter(&hostns);
            moat_net::run(
                OwnedFd::from(theirs),
                OwnedFd::from(listener),
                OwnedFd::from(ports),
            )
            .unwrap();
        });
        let net = Net {
            guest,
            seen,
            control_path,
            ports_path,
            control: Mutex::new(None),
            _dir: dir,
            _cleanup: cleanup,
        };
        let hello = net.connect();
        assert_eq!(
            hello,
            Reply::Hello {
                version: 1,
                started: false,
                dropped: 0
            }
        );
        let mut start = serde_json::json!({
            "v": 1, "type": "start", "egress": default_policy(), "hosts": HOSTS,
            "resolver": "127.0.0.1:53", "limits": limits,
        });
        if let Some(h) = identity_header {
            start["identity_header"] = h.into();
        }
        assert_eq!(net.request(start), Reply::Ok);
        net
    }

    /// Connects to the control socket as a daemon would; returns its hello.
    fn connect(&self) -> Reply {
        let tx = UnixStream::connect(&self.control_path).unwrap();
        let rx = std::io::BufReader::new(tx.try_clone().unwrap());
        let (reply_tx, replies) = std::sync::mpsc::channel();
        let seen = self.seen.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in rx.lines() {
                let Ok(line) = line else { break };
                match moat_net::control::decode::<Reply>(&line).unwrap() {
                    Reply::Audit { event } => seen.lock().unwrap().events.push(event),
                    other => {
                        if reply_tx.send(other).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        *self.control.lock().unwrap() = Some(Control { tx, replies });
        self.reply()
    }

    /// Drops the control connection, as a daemon that dies does.
    fn disconnect(&self) {
        *self.control.lock().unwrap() = None;
    }

    fn reply(&self) -> Reply {
        let c = self.control.lock().unwrap();
        c.as_ref()
            .unwrap()
            .replies
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
    }

    fn request(&self, msg: serde_json::Value) -> Reply {
        {
            let mut c = self.control.lock().unwrap();
            let tx = &mut c.as_mut().unwrap().tx;
            tx.write_all(format!("{msg}\n").as_bytes()).unwrap();
        }
        self.reply()
    }

    /// Sends `msg` without waiting for an answer (`token` gets none).
    fn send(&self, msg: serde_json::Value) {
        let mut c = self.control.lock().unwrap();
        let tx = &mut c.as_mut().unwrap().tx;
        tx.write_all(format!("{msg}\n").as_bytes()).unwrap();
    }

    /// Runs `guest` while playing the daemon for the stack's token requests: a mint for
    /// `refused.test` is refused, any other gets the token `tok.<audience>`. Returns what
    /// `guest` returned and what the stack sent meanwhile (mints and refusals).
    fn minting<T: Send>(&self, guest: impl FnOnce() -> T + Send) -> (T, Vec<Reply>) {
        std::thread::scope(|s| {
            let g = s.spawn(guest);
            let mut got = Vec::new();
            loop {
                let done = g.is_finished();
                let r = {
                    let c = self.control.lock().unwrap();
                    c.as_ref()
                        .unwrap()
                        .replies
                        .recv_timeout(Duration::from_millis(50))
                };
                match r {
                    Ok(Reply::Mint { id, audience, .. }) => {
                        let answer = if audience == "refused.test" {
                            serde_json::json!({"v": 1, "type": "token", "id": id,
                                "error": "audience \"refused.test\" is not allowed"})
                        } else {
                            serde_json::json!({"v": 1, "type": "token", "id": id,
                                "token": format!("tok.{audience}"), "expires_on": 1_900_000_000})
                        };
                        self.send(answer);
                        got.push(Reply::Mint {
                            id,
                            audience,
                            delivery: moat_net::control::Delivery::Endpoint,
                        });
                    }
                    Ok(other) => got.push(other),
                    Err(_) if done => break,
                    Err(_) => {}
                }
            }
            (g.join().unwrap(), got)
        })
    }

    fn set_policy(&self, egress: serde_json::Value) -> Reply {
        self.request(serde_json::json!({"v": 1, "type": "policy", "egress": egress}))
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
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

/// Test servers: HTTP on 80, a recorder on 443 that answers nothing TLS, a server-first
/// banner then echo on 5432 and 7000, a reset on 5433.
async fn start_servers(seen: Arc<Mutex<Seen>>, addr: Ipv4Addr, ports: &[u16]) {
    for &port in ports {
        let l = tokio::net::TcpListener::bind((addr, port)).await.unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    if port == 5433 {
                        // Resets every connection after a moment, as a crashing server does.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        s.set_zero_linger().unwrap();
                        return;
                    }
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

/// Echoes UDP datagrams.
async fn udp_echo(addr: Ipv4Addr, port: u16) {
    let sock = tokio::net::UdpSocket::bind((addr, port)).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.unwrap();
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
}

/// The host's upstream resolver: rebind.test answers into the floor, private.test too.
async fn start_upstream(seen: Arc<Mutex<Seen>>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:53").await.unwrap();
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
    let synthetic = net.python("import socket\nprint(socket.gethostbyname('api.test'))");
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
    let bad = net.set_policy(serde_json::json!({"rules": [{"host": "*.com"}]}));
    assert!(
        matches!(&bad, Reply::Error { message } if message.contains("public suffix")),
        "{bad:?}"
    );
    assert_eq!(
        net.set_policy(serde_json::json!({"rules": [{"host": "*.api2.test"}]})),
        Reply::Ok
    );
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
    // New lookups follow the new policy, and so does the address the guest already has.
    let (ok, out) = net.curl(&["http://api.test/"]);
    assert!(!ok && out.contains("resolve"), "{out}");
    let out = net.python(&format!(
        "import socket\n\
         try:\n    socket.create_connection(('{synthetic}', 5432), timeout=5)\n    print('connected')\n\
         except ConnectionRefusedError:\n    print('refused')"
    ));
    assert_eq!(out, "refused");
}

#[test]
fn the_hosts_own_address_is_in_the_floor_even_under_a_cidr_rule() {
    let net = Net::new();
    let (ok, out) = net.curl(&[&format!("http://{HOST_OWN}:7000/")]);
    assert!(!ok && out.contains("Couldn't connect to server"), "{out}");
    let e = net.event("host own address", |e| {
        e.address.as_deref() == Some(HOST_OWN)
    });
    assert!(e.reason.contains("the host's own address"), "{e:?}");
    assert!(net.server_saw(7000).is_empty());
}

#[test]
fn the_control_channel_survives_a_daemon_restart() {
    let net = Net::new();
    net.disconnect();
    // Decisions made while no daemon listens wait for the next one.
    assert_eq!(
        net.dig("100.127.255.1", "while-away.test", 1, false),
        (3, 0)
    );
    let hello = net.connect();
    assert_eq!(
        hello,
        Reply::Hello {
            version: 1,
            started: true,
            dropped: 0
        }
    );
    net.event("queued", |e| e.name.as_deref() == Some("while-away.test"));
    let again = net.request(serde_json::json!({"v": 1, "type": "start", "egress": {}}));
    assert!(
        matches!(again, Reply::Error { ref message } if message == "already started"),
        "{again:?}"
    );
    let junk = net.request(serde_json::json!({"v": 9, "type": "policy"}));
    assert!(
        matches!(junk, Reply::Error { ref message } if message.contains("version 9")),
        "{junk:?}"
    );
    // The new connection still steers the policy.
    assert_eq!(
        net.set_policy(serde_json::json!({"rules": [{"host": "while-away.test"}]})),
        Reply::Ok
    );
    assert!(net.upstream_asked().is_empty());
    net.dig("100.127.255.1", "while-away.test", 1, false);
    assert_eq!(
        net.upstream_asked(),
        vec!["while-away.test"],
        "allowed now, so asked upstream"
    );
    net.event("allowed after update", |e| {
        e.name.as_deref() == Some("while-away.test") && e.reason == "no such name upstream"
    });
}

#[test]
fn udp_is_relayed_only_where_a_rule_allows_it() {
    let net = Net::new();
    let echo = |host: &str, port: u16| {
        net.python(&format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.settimeout(2)\n\
             s.sendto(b'ping', ('{host}', {port}))\n\
             try:\n    print(s.recv(100).decode())\n\
             except socket.timeout:\n    print('timeout')"
        ))
    };
    assert_eq!(echo("api.test", 7001), "ping", "by name");
    assert_eq!(echo("198.51.100.1", 7001), "ping", "by CIDR rule");
    assert_eq!(echo("api.test", 7002), "timeout", "no rule for this port");
    let e = net.event("udp deny", |e| e.kind == Kind::Udp && e.port == Some(7002));
    assert_eq!(
        (e.verdict, e.name.as_deref()),
        (Verdict::Deny, Some("api.test"))
    );
    // Tightening the policy ends the live relays.
    assert_eq!(
        net.set_policy(serde_json::json!({"rules": [{"host": "api.test"}]})),
        Reply::Ok
    );
    let e = net.event("udp policy update", |e| {
        e.kind == Kind::Udp && e.port == Some(7001)
    });
    assert!(e.reason.starts_with("policy update"), "{e:?}");
    assert_eq!(echo("api.test", 7001), "timeout");
}

#[test]
fn limits_refuse_and_audit_without_stopping_the_stack() {
    let net = Net::with_limits(
        serde_json::json!({"max_flows": 2, "new_flows_per_s": 1000, "dns_qps": 10}),
    );
    // Two flows held open; the third is refused at once.
    let out = net.python(
        "import socket, time\n\
         ip = socket.gethostbyname('api.test')\n\
         held = [socket.create_connection((ip, 5432), timeout=5) for _ in range(2)]\n\
         t = time.time()\n\
         try:\n    socket.create_connection((ip, 5432), timeout=5)\n    print('connected')\n\
         except ConnectionRefusedError:\n    print('refused', round(time.time() - t, 1))",
    );
    assert_eq!(out, "refused 0.0");
    net.event("flow limit", |e| e.reason == "limit: 2 concurrent flows");
    // A burst of 40 queries: about a second's worth (10) is answered, the rest is not.
    let out = net.python(
        "import socket, struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(1)\n\
         q = struct.pack('>HHHHHH', 1, 0x0100, 1, 0, 0, 0) + b'\\x03api\\x04test\\x00' + struct.pack('>HH', 1, 1)\n\
         for i in range(40):\n    s.sendto(q, ('100.127.255.1', 53))\n\
         n = 0\n\
         try:\n    while True:\n        s.recv(512)\n        n += 1\n\
         except socket.timeout:\n    pass\n\
         print(n)",
    );
    let answered: u32 = out.parse().unwrap();
    assert!((5..=15).contains(&answered), "answered {answered} of 40");
    net.event("dns limit", |e| e.reason == "limit: DNS queries per second");
    // The stack still works once the burst is over.
    std::thread::sleep(Duration::from_millis(1100));
    let (ok, out) = net.curl(&["http://api.test/"]);
    assert!(ok, "{out}");
}

#[test]
fn a_host_side_reset_reaches_the_guest_at_once() {
    let net = Net::new();
    let out = net.python(
        "import socket, time\n\
         s = socket.create_connection(('api.test', 5433), timeout=10)\n\
         t = time.time()\n\
         try:\n    r = s.recv(10)\n    print('eof' if r == b'' else r)\n\
         except ConnectionResetError:\n    print('reset')\n\
         print(round(time.time() - t, 1))",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "reset", "{out}");
    let waited: f64 = lines[1].parse().unwrap();
    assert!(waited < 2.0, "{out}");
    let e = net.event("host reset", |e| {
        e.kind == Kind::Tcp && e.port == Some(5433)
    });
    assert!(e.reason.starts_with("host connection:"), "{e:?}");
}

#[test]
fn every_plain_http_request_on_a_connection_is_checked() {
    let net = Net::new();
    let out = net.python(
        "import socket\n\
         s = socket.create_connection(('api.test', 80), timeout=5)\n\
         s.sendall(b'GET /1 HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\nGET /2 HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n')\n\
         try:\n    r = s.recv(100)\n    print('eof' if r == b'' else r)\n\
         except ConnectionResetError:\n    print('reset')",
    );
    assert_eq!(out, "reset");
    let e = net.event("second request", |e| {
        e.kind == Kind::Tcp && e.port == Some(80)
    });
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.reason, "HTTP Host evil.test is not api.test (request 2)");
    let saw = net.server_saw(80);
    assert!(
        saw.iter()
            .all(|r| !String::from_utf8_lossy(r).contains("evil.test")),
        "the server never saw the second request: {saw:?}"
    );
}

/// Inbound connections (the daemon's port exposure): the stack connects from the gateway's
/// address to the guest's port and the requester's Unix stream carries the bytes both ways,
/// half-closes included; a port where nothing listens is refused at once with the reason.
#[test]
fn inbound_connections_reach_the_guests_port_through_the_stack() {
    let net = Net::new();
    let mut server = Command::new("ip")
        .args(["netns", "exec", &net.guest, "python3", "-c"])
        .arg(
            "import socket\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', 8080))\n\
             s.listen()\n\
             print('ready', flush=True)\n\
             while True:\n\
             \x20   c, a = s.accept()\n\
             \x20   c.sendall(('from %s\\n' % a[0]).encode())\n\
             \x20   n = 0\n\
             \x20   while True:\n\
             \x20       d = c.recv(65536)\n\
             \x20       if not d: break\n\
             \x20       n += len(d)\n\
             \x20   c.sendall(b'got %d bytes' % n)\n\
             \x20   c.close()\n",
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    server
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    assert_eq!(&ready, b"ready\n");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..3 {
            let mut s = moat_net::ingress::connect(&net.ports_path, 8080)
                .await
                .unwrap();
            // Server-first: the guest speaks before the requester does, and sees the gateway.
            let mut hello = [0u8; 19];
            s.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello, b"from 100.127.255.1\n");
            s.write_all(&vec![7u8; 3 << 20]).await.unwrap();
            s.shutdown().await.unwrap();
            let mut rest = String::new();
            s.read_to_string(&mut rest).await.unwrap();
            assert_eq!(rest, format!("got {} bytes", 3 << 20));
        }
        let t0 = Instant::now();
        let e = moat_net::ingress::connect(&net.ports_path, 8081)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("nothing listens on port 8081"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "refused at once");
        let e = moat_net::ingress::connect(&net.ports_path, 0)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("port 0"), "{e}");
    });
    // Inbound connections are not egress: no audit event, and the guest's own connection to
    // the gateway's port stays denied.
    assert!(
        net.seen
            .lock()
            .unwrap()
            .events
            .iter()
            .all(|e| e.port != Some(8080)),
        "{:#?}",
        net.seen.lock().unwrap().events
    );
    let (ok, _) = net.curl(&["http://100.127.255.1:49152/"]);
    assert!(!ok);
    let _ = server.kill();
    let _ = server.wait();
}

/// The in-guest identity endpoint, from a real guest kernel under deny-all egress: served by
/// the stack itself (the mint goes to the daemon, with delivery `endpoint`), both forms, and
/// every refusal (wrong or missing header, a forwarded request, no session, over the rate)
/// answered and reported to the daemon. Without an identity header the address is not served.
#[test]
fn the_identity_endpoint_is_served_by_the_stack_under_deny_all() {
    let header = "0123456789abcdef0123456789abcdef";
    let net = Net::with_identity(header);
    assert_eq!(net.set_policy(serde_json::json!({})), Reply::Ok);
    let script = format!(
        r#"
import http.client, json
def req(method, path, headers={{}}):
    c = http.client.HTTPConnection('169.254.169.254', 80, timeout=5)
    c.request(method, path, headers=headers)
    r = c.getresponse()
    return [r.status, r.read().decode()]
aca = '/msi/token?resource=api%3A%2F%2FAzureADTokenExchange&api-version=2019-08-01'
out = {{}}
out['aca'] = req('GET', aca, {{'X-IDENTITY-HEADER': '{header}'}})
out['refused_aud'] = req('GET', '/msi/token?resource=refused.test&api-version=2019-08-01',
    {{'X-IDENTITY-HEADER': '{header}'}})
out['no_header'] = req('GET', aca)
out['wrong_header'] = req('GET', aca, {{'X-IDENTITY-HEADER': 'x' * 32}})
out['forwarded'] = req('GET', aca, {{'X-IDENTITY-HEADER': '{header}', 'X-Forwarded-For': '10.0.0.1'}})
out['no_session'] = req('GET', '/metadata/identity/token?resource=sts.amazonaws.com')
s = req('PUT', '/latest/api/token', {{'X-aws-ec2-metadata-token-ttl-seconds': '60'}})
out['session'] = s
out['imds'] = req('GET', '/metadata/identity/token?resource=sts.amazonaws.com',
    {{'X-aws-ec2-metadata-token': s[1]}})
out['imds_via'] = req('GET', '/metadata/identity/token?resource=sts.amazonaws.com',
    {{'X-aws-ec2-metadata-token': s[1], 'Via': '1.1 proxy'}})
print(json.dumps(out))
"#
    );
    let (out, sent) = net.minting(|| net.python(&script));
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    let aca = |k: &str| {
        let v = &out[k];
        (
            v[0].as_u64().unwrap(),
            serde_json::from_str::<serde_json::Value>(v[1].as_str().unwrap())
                .unwrap_or_else(|_| v[1].clone()),
        )
    };
    let (st, b) = aca("aca");
    assert_eq!(st, 200, "{out}");
    assert_eq!(
        b,
        serde_json::json!({"access_token": "tok.api://AzureADTokenExchange",
            "expires_on": "1900000000", "resource": "api://AzureADTokenExchange",
            "token_type": "Bearer"})
    );
    let (st, b) = aca("refused_aud");
    assert_eq!(st, 403, "{out}");
    assert!(b["error"].as_str().unwrap().contains("not allowed"), "{b}");
    for (k, want) in [
        ("no_header", 401),
        ("wrong_header", 401),
        ("forwarded", 403),
        ("no_session", 401),
        ("imds_via", 403),
    ] {
        assert_eq!(aca(k).0, want, "{k}: {out}");
    }
    assert_eq!(aca("session").0, 200, "{out}");
    let (st, b) = aca("imds");
    assert_eq!(st, 200, "{out}");
    assert_eq!(b["access_token"], "tok.sts.amazonaws.com");
    // The daemon heard the three mints, all for the endpoint, and the five refusals; the
    // stack never names a sandbox.
    let mints: Vec<&str> = sent
        .iter()
        .filter_map(|r| match r {
            Reply::Mint { audience, .. } => Some(audience.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        mints,
        [
            "api://AzureADTokenExchange",
            "refused.test",
            "sts.amazonaws.com"
        ]
    );
    let refusals: Vec<String> = sent
        .iter()
        .filter_map(|r| match r {
            Reply::IdentityRefused { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(refusals.len(), 5, "{refusals:?}");
    assert!(refusals[2].contains("forwarded"), "{refusals:?}");
    // The endpoint is not an egress flow: no TCP audit event names it.
    assert!(!net
        .seen
        .lock()
        .unwrap()
        .events
        .iter()
        .any(|e| e.address.as_deref() == Some("169.254.169.254")));

    // Over 20 requests a second: refused with 429 (reported once a second at most).
    let (out, sent) = net.minting(|| {
        net.python(
            "import http.client\n\
             codes = []\n\
             for _ in range(30):\n\
             \x20   c = http.client.HTTPConnection('169.254.169.254', 80, timeout=5)\n\
             \x20   c.request('GET', '/nothing')\n\
             \x20   codes.append(c.getresponse().status)\n\
             print(' '.join(map(str, codes)))",
        )
    });
    let codes: Vec<u16> = out.split(' ').map(|c| c.parse().unwrap()).collect();
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.iter().all(|c| *c == 404 || *c == 429), "{codes:?}");
    let throttled = sent
        .iter()
        .filter(
            |r| matches!(r, Reply::IdentityRefused { reason, .. } if reason.contains("too many")),
        )
        .count();
    assert!(throttled <= 2, "{sent:?}");
}

/// Without an identity header the metadata address is an ordinary destination: link-local,
/// in the floor, refused and audited; nothing answers there.
#[test]
fn without_an_identity_header_the_metadata_address_is_refused() {
    let net = Net::new();
    let (ok, out) = net.curl(&["http://169.254.169.254/msi/token"]);
    assert!(!ok, "{out}");
    net.event("metadata refused", |e| {
        e.verdict == Verdict::Deny && e.address.as_deref() == Some("169.254.169.254")
    });
}
