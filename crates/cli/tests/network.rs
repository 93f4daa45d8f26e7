//! Sandbox networking end to end, in real guests: every sandbox has eth0 served by a network
//! stack of its own, whose policy comes from `moat run`'s flags (or, here, straight over its
//! control socket). Test servers listen on the host's loopback and are reached by name
//! through an egress hosts file; no packet ever leaves the host (denied flows are refused by
//! the stack, and DNS is answered by it whatever resolver the guest asks).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{base_template, children, moat, req, runtime, unique};
use moat_net::control::{Client, LimitsSpec, Request};
use moat_vm::{Sandbox, Tier};

/// An HTTP server on the host's loopback that answers every request with `body` and keeps
/// the first line of each request it saw.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

fn server(body: &'static str) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut buf = vec![0u8; 4096];
            let n = c.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            s.lock()
                .unwrap()
                .push(head.lines().next().unwrap_or("").to_string());
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Server { port, seen }
}

/// `hosts(5)` text naming the loopback servers.
const HOSTS: &str = "127.0.0.1 web.test other.test\n";

/// A guest program that prints one line per probe: an HTTP GET of an allowed name, a denied
/// name, a raw address, and DNS over UDP to 8.8.8.8 for an allowed and a denied name. Each
/// probe prints how long it took, so "at once" is checked, not just "eventually".
const PROBE: &str = r#"
import socket, struct, sys, time, urllib.request
port = int(sys.argv[1])
def timed(name, f):
    t = time.time()
    try:
        r = f()
    except Exception as e:
        r = "ERR " + type(e).__name__ + " " + str(e)
    print(name, "|", r, "|", round(time.time() - t, 2), flush=True)
timed("get", lambda: urllib.request.urlopen("http://web.test:%d/" % port, timeout=20).read().decode())
timed("unknown", lambda: socket.gethostbyname("evil.test"))
timed("other", lambda: urllib.request.urlopen("http://other.test:%d/" % port, timeout=20).read().decode())
timed("raw", lambda: socket.create_connection(("203.0.113.7", 80), timeout=20) and "connected")
def dns(name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.sendto(q, ("8.8.8.8", 53))
    a = s.recv(512)
    rcode = a[3] & 15
    ancount = struct.unpack(">H", a[6:8])[0]
    return "rcode=%d answers=%d last=%s" % (rcode, ancount, ".".join(str(b) for b in a[-4:]))
timed("dns-allowed", lambda: dns("web.test"))
timed("dns-denied", lambda: dns("evil.test"))
"#;

/// The probe's lines as (name, result, seconds).
fn probes(out: &str) -> Vec<(String, String, f64)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(" | ").collect();
            (f.len() == 3).then(|| (f[0].to_string(), f[1].to_string(), f[2].parse().unwrap()))
        })
        .collect()
}

fn probe<'a>(p: &'a [(String, String, f64)], name: &str) -> (&'a str, f64) {
    let (_, r, t) = p
        .iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {p:?}"));
    (r, *t)
}

/// What every sandbox with `--allow web.test:PORT` must show: the allowed name works, every
/// other way out is refused at once, and DNS to any resolver is answered by the stack.
fn check_policy(out: &str) {
    let p = probes(out);
    assert_eq!(probe(&p, "get").0, "hello from the host", "{out}");
    let (r, t) = probe(&p, "unknown");
    assert!(r.starts_with("ERR gaierror"), "{out}");
    assert!(t < 3.0, "a denied name took {t} s: {out}");
    // other.test is in the hosts file but not allowed: no answer for it either.
    let (r, t) = probe(&p, "other");
    assert!(
        r.starts_with("ERR URLError") && r.contains("Name or service"),
        "{out}"
    );
    assert!(t < 3.0, "{out}");
    let (r, t) = probe(&p, "raw");
    assert!(r.contains("ConnectionRefusedError"), "{out}");
    assert!(t < 3.0, "a raw address took {t} s to be refused: {out}");
    // Answered by the stack: 8.8.8.8 could not know web.test, and its answer is a
    // synthetic address from 198.18.0.0/15.
    let (r, t) = probe(&p, "dns-allowed");
    assert!(r.starts_with("rcode=0 answers=1 last=198.18."), "{out}");
    assert!(t < 3.0, "{out}");
    let (r, t) = probe(&p, "dns-denied");
    assert!(
        r.starts_with("rcode=3 answers=0"),
        "NXDOMAIN expected: {out}"
    );
    assert!(t < 3.0, "{out}");
}

fn hosts_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("hosts");
    std::fs::write(&p, HOSTS).unwrap();
    p
}

/// `moat run FLAGS --egress-hosts HOSTS -- python3 -c SCRIPT PORT`, which must succeed; its
/// stdout.
fn moat_run(flags: &[&str], hosts: &Path, script: &str, port: u16) -> String {
    let mut run = moat();
    run.arg("run")
        .args(flags)
        .arg("--egress-hosts")
        .arg(hosts)
        .args(["--", "python3", "-c", script])
        .arg(port.to_string());
    succeeded(run)
}

/// The stdout of `cmd`, which must succeed.
fn succeeded(mut cmd: std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn moat_run_allows_exactly_what_its_flags_say() {
    let srv = server("hello from the host");
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path());
    let allow = format!("web.test:{}", srv.port);
    let stdout = moat_run(&["--allow", &allow], &hosts, PROBE, srv.port);
    check_policy(&stdout);
    // Only the allowed request reached a server.
    assert_eq!(*srv.seen.lock().unwrap(), ["GET / HTTP/1.1"]);
}

#[test]
fn moat_run_without_rules_has_eth0_and_reaches_nothing() {
    let srv = server("nobody should see this");
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path());
    let script = r#"
import socket, urllib.request, sys
print("operstate", open("/sys/class/net/eth0/operstate").read().strip())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("203.0.113.7", 9))
print("address", s.getsockname()[0])
print("resolv", open("/etc/resolv.conf").read().strip())
try:
    urllib.request.urlopen("http://web.test:%s/" % sys.argv[1], timeout=20)
    print("reached")
except Exception as e:
    print("refused", type(e).__name__)
"#;
    let stdout = moat_run(&[], &hosts, script, srv.port);
    assert!(stdout.contains("operstate up\n"), "{stdout}");
    assert!(stdout.contains("address 100.127.255.2\n"), "{stdout}");
    assert!(
        stdout.contains("resolv nameserver 100.127.255.1\n"),
        "{stdout}"
    );
    assert!(stdout.contains("refused URLError"), "{stdout}");
    assert!(srv.seen.lock().unwrap().is_empty());
}

#[test]
fn moat_run_refuses_bad_egress_flags() {
    let out = moat()
        .args(["run", "--allow", "*.com", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allow *.com") && err.contains("public suffix"),
        "{err}"
    );
}

/// Sends the stack of `sb` its `start`: web.test on `port`, through the loopback hosts file.
async fn start_net(sb: &Sandbox, port: u16) {
    let (mut c, _) = Client::connect(&sb.net_control_path()).await.unwrap();
    let egress = serde_json::from_value(serde_json::json!({
        "rules": [{"host": "web.test", "ports": [port]}]
    }))
    .unwrap();
    c.request(
        &Request::Start {
            egress,
            hosts: Some(HOSTS.into()),
            resolver: None,
            limits: LimitsSpec::default(),
            secrets: Default::default(),
            ca: None,
            upstream_ca: None,
            identity_header: None,
        },
        |_| {},
    )
    .await
    .unwrap();
}

async fn run_probe(sb: &Sandbox, port: u16) -> String {
    let out = sb
        .agent()
        .exec_output(req(&["python3", "-c", PROBE, &port.to_string()]), 1 << 20)
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Suspend/resume and a fork: each new VM gets a stack of its own (its source's is never
/// shared), the agent configures eth0 again, and the network works with the policy given to
/// the new stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_resume_and_fork_keep_the_network() {
    let srv = server("hello from the host");
    let rt = runtime();
    let tpl = base_template(&rt).await;
    let id = unique("net");
    let mut sb = Sandbox::restore(&rt, &id, &tpl).await.unwrap();
    start_net(&sb, srv.port).await;
    check_policy(&run_probe(&sb, srv.port).await);

    // A fork from a snapshot: its own stack, which knows nothing until it is started.
    let store = tempfile::tempdir_in(common::home()).unwrap();
    let snap = store.path().join("snap");
    sb.snapshot(&rt, &snap).await.unwrap();
    let fork = Sandbox::restore(&rt, &unique("net-fork"), &snap)
        .await
        .unwrap();
    assert_ne!(fork.net_control_path(), sb.net_control_path());
    let unstarted = fork
        .agent()
        .exec_output(
            req(&[
                "python3",
                "-c",
                "import socket\ntry:\n socket.gethostbyname('web.test'); print('resolved')\n\
                 except Exception as e: print('no', type(e).__name__)",
            ]),
            1 << 16,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&unstarted.stdout).trim(),
        "no gaierror"
    );
    start_net(&fork, srv.port).await;
    check_policy(&run_probe(&fork, srv.port).await);
    // The source's network is untouched by its fork.
    check_policy(&run_probe(&sb, srv.port).await);
    fork.destroy().await;

    let dest = store.path().join("suspended");
    sb.suspend(&rt, &dest).await.unwrap();
    let sb = Sandbox::resume(&rt, &id, &dest, Default::default())
        .await
        .unwrap();
    assert_eq!(sb.tier(), Tier::M);
    start_net(&sb, srv.port).await;
    check_policy(&run_probe(&sb, srv.port).await);
    sb.destroy().await;
}

/// Whether process `pid` is gone (or a zombie, which runs nothing).
fn gone(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty())
}

/// Polls `f` for up to 20 s.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The stack is a process of its own beside QEMU and dies with its sandbox: when `moat run`
/// is killed with SIGKILL (no cleanup code runs), and when a sandbox is destroyed.
#[test]
fn the_stack_dies_with_its_sandbox() {
    let mut run = moat().args(["run", "--", "sleep", "600"]).spawn().unwrap();
    let stacks = || -> Vec<(u32, String)> {
        children(run.id())
            .into_iter()
            .filter(|(_, c)| c.contains(" net-stack --guest-fd "))
            .collect()
    };
    eventually("moat run started no network stack", || stacks().len() == 1);
    let (stack, _) = stacks()[0].clone();
    let qemu = common::qemu_children(run.id());
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    run.kill().unwrap();
    run.wait().unwrap();
    eventually("the stack outlived moat run", || gone(stack));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let rt_vm = runtime();
        let tpl = base_template(&rt_vm).await;
        let sb = Sandbox::restore(&rt_vm, &unique("net-die"), &tpl)
            .await
            .unwrap();
        let me = std::process::id();
        let stack = children(me)
            .into_iter()
            .find(|(_, c)| c.contains(" net-stack --guest-fd "))
            .expect("the sandbox's stack is our child")
            .0;
        sb.destroy().await;
        eventually("the stack outlived its sandbox", || gone(stack));
    });
}

/// What a [`digest_server`] saw: per request, its first line and how many body bytes came.
type Requests = Arc<Mutex<Vec<(String, usize)>>>;

/// An HTTP server on `addr` (over TLS with `tls`) that reads each request whole, its body by
/// `Content-Length`, and answers `got N bytes sha256 HEX` of that body.
fn digest_server(addr: &str, tls: Option<Arc<rustls::ServerConfig>>) -> (u16, Requests) {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Requests::default();
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let s = s.clone();
            let tls = tls.clone();
            std::thread::spawn(move || match tls {
                Some(cfg) => {
                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                    let mut t = rustls::StreamOwned::new(conn, c);
                    if answer_digest(&mut t, &s).is_ok() {
                        t.conn.send_close_notify();
                        let _ = t.flush();
                    }
                }
                None => {
                    let mut c = c;
                    let _ = answer_digest(&mut c, &s);
                }
            });
        }
    });
    (port, seen)
}

fn answer_digest(c: &mut (impl Read + Write), seen: &Requests) -> std::io::Result<()> {
    use sha2::Digest;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = c.read(&mut buf[..left.min(64 << 10)])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        sha.update(&buf[..n]);
        left -= n;
    }
    seen.lock()
        .unwrap()
        .push((head.lines().next().unwrap_or("").to_string(), len));
    let body = format!("got {len} bytes sha256 {:x}", sha.finalize());
    write!(
        c,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    c.flush()
}

/// A test CA (its PEM) and a server configuration for `name` whose certificate it signed
/// (its DER, to recognise it where the guest saw it).
fn test_tls(name: &str) -> (String, Vec<u8>, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "moat test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (ca_pem, leaf.der().to_vec(), Arc::new(cfg))
}

/// HTTPS passes through untouched: the guest verifies the loopback server's own certificate
/// against a test CA it was given (argv) and sees exactly that certificate; a ClientHello for
/// another name on the same address is refused with a TLS alert and never reaches the server.
/// The stack checks the server name on port 443 only, so the server listens there, on a
/// loopback address of its own (127.77.0.1) to stay clear of the machine's services.
#[test]
fn https_passes_through_with_the_upstreams_own_certificate() {
    use sha2::Digest;
    let (ca, leaf, cfg) = test_tls("tls.test");
    let (port, seen) = digest_server("127.77.0.1:443", Some(cfg));
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.77.0.1 tls.test\n").unwrap();
    let script = r#"
import hashlib, http.client, socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cadata=ca)
c = http.client.HTTPSConnection("tls.test", port, context=ctx, timeout=30)
c.request("GET", "/")
cert = hashlib.sha256(c.sock.getpeercert(binary_form=True)).hexdigest()
print("body", c.getresponse().read().decode())
print("cert", cert)
try:
    s = ctx.wrap_socket(socket.create_connection(("tls.test", port), timeout=30), server_hostname="evil.test")
    print("sni-mismatch connected")
except Exception as e:
    print("sni-mismatch", type(e).__name__, e)
"#;
    let mut run = moat();
    run.args(["run", "--allow", "tls.test:443", "--egress-hosts"])
        .arg(&hosts)
        .args(["--", "python3", "-c", script, &port.to_string(), &ca]);
    let out = succeeded(run);
    let empty = format!("{:x}", sha2::Sha256::digest(b""));
    assert!(
        out.contains(&format!("body got 0 bytes sha256 {empty}\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("cert {:x}\n", sha2::Sha256::digest(&leaf))),
        "the guest saw another certificate: {out}"
    );
    assert!(
        out.contains("sni-mismatch SSLError") && out.to_lowercase().contains("alert"),
        "{out}"
    );
    assert_eq!(*seen.lock().unwrap(), [("GET / HTTP/1.1".to_string(), 0)]);
}

/// A 10 MiB upload arrives whole: the server's digest of the body is the guest's.
#[test]
fn a_10_mib_upload_arrives_whole() {
    let (port, seen) = digest_server("127.0.0.1:0", None);
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts_file(dir.path());
    let script = r#"
import hashlib, sys, urllib.request
body = bytes(range(256)) * (10 << 12)
r = urllib.request.Request("http://web.test:%s/up" % sys.argv[1], data=body, method="POST")
print(urllib.request.urlopen(r, timeout=120).read().decode())
print("sent", len(body), hashlib.sha256(body).hexdigest())
"#;
    let allow = format!("web.test:{port}");
    let out = moat_run(&["--allow", &allow], &hosts, script, port);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let (n, hex) = lines[1]
        .strip_prefix("sent ")
        .unwrap()
        .split_once(' ')
        .unwrap();
    assert_eq!(n, (10 << 20).to_string(), "{out}");
    assert_eq!(lines[0], format!("got {n} bytes sha256 {hex}"), "{out}");
    assert_eq!(
        *seen.lock().unwrap(),
        [("POST /up HTTP/1.1".to_string(), 10 << 20)]
    );
}

/// A child process (a test server) killed when the test ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with its stdout piped; returns it and its first line (its readiness signal).
fn spawn_ready(mut cmd: std::process::Command) -> (Child, String) {
    use std::io::BufRead;
    let mut child = Child(cmd.stdout(std::process::Stdio::piped()).spawn().unwrap());
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// Network namespaces made by a test, deleted when it ends.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", ns])
                .status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `program` run inside network namespace `ns` (only its network: the mounts, and so the
/// cgroup tree the jail uses, stay the host's).
fn in_netns(ns: &str, program: &std::ffi::OsStr) -> std::process::Command {
    let mut c = std::process::Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(program);
    c
}

/// A protocol whose server speaks first (an SMTP-like banner) on a CIDR rule: the stack dials
/// a raw address at once, without waiting for the guest's first bytes, and only on the rule's
/// port. The address must be outside the floor, so the server lives in a network namespace
/// behind a veth (198.51.100.1, a documentation range), and `moat run` runs in a second one
/// whose only other address (198.51.100.2) is thereby the host's own.
#[test]
fn a_server_first_protocol_works_on_a_cidr_rule() {
    let (host, srv) = (unique("mnrh"), unique("mnrs"));
    let _netns = Netns(vec![host.clone(), srv.clone()]);
    for ns in [&host, &srv] {
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&[
        "-n", &host, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", &srv,
    ]);
    ip(&["-n", &host, "addr", "add", "198.51.100.2/24", "dev", "v0"]);
    ip(&["-n", &host, "link", "set", "v0", "up"]);
    ip(&["-n", &srv, "addr", "add", "198.51.100.1/24", "dev", "v1"]);
    ip(&["-n", &srv, "link", "set", "v1", "up"]);

    let banner = r#"
import socket
l = socket.socket()
l.bind(("198.51.100.1", 2525))
l.listen()
print("ready", flush=True)
while True:
    c, _ = l.accept()
    c.sendall(b"220 banner.test ESMTP moat test\r\n")
    line = c.makefile("rb").readline()
    c.sendall(b"250 hello " + line.split(b" ", 1)[-1])
    c.close()
"#;
    let mut server = in_netns(&srv, "python3".as_ref());
    server.args(["-c", banner]);
    let (_server, ready) = spawn_ready(server);
    assert_eq!(ready, "ready\n");

    let guest = r#"
import socket
s = socket.create_connection(("198.51.100.1", 2525), timeout=30)
print(s.recv(100).decode().strip())
s.sendall(b"EHLO guest\r\n")
print(s.recv(100).decode().strip())
try:
    socket.create_connection(("198.51.100.1", 2526), timeout=30)
    print("other port connected")
except Exception as e:
    print("other port", type(e).__name__)
"#;
    let m = moat();
    let mut run = in_netns(&host, m.get_program());
    for (k, v) in m.get_envs() {
        match v {
            Some(v) => run.env(k, v),
            None => run.env_remove(k),
        };
    }
    run.args(["run", "--allow-cidr", "198.51.100.1/32:2525"])
        .args(["--", "python3", "-c", guest]);
    let out = succeeded(run);
    assert_eq!(
        out,
        "220 banner.test ESMTP moat test\n250 hello guest\nother port ConnectionRefusedError\n"
    );
}

/// Writes a PEP 503 package index into `dir`: `simple/moat-demo/` links a wheel of
/// `moat_demo` made here with the host's Python, and `pip.whl` is the host's own pip wheel
/// (Debian's python3-pip-whl), which the guest fetches first: the base image has no pip.
fn package_index(dir: &Path) {
    use sha2::Digest;
    let make_wheel = r#"
import base64, hashlib, sys, zipfile
files = {
    "moat_demo/__init__.py": b"GREETING = 'installed from the local index'\n",
    "moat_demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: moat-demo\nVersion: 1.0\n",
    "moat_demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: moat-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(sys.argv[1], "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
        h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (name, h, len(data)))
    record.append("moat_demo-1.0.dist-info/RECORD,,")
    z.writestr("moat_demo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
"#;
    let wheel_name = "moat_demo-1.0-py3-none-any.whl";
    std::fs::create_dir_all(dir.join("packages")).unwrap();
    std::fs::create_dir_all(dir.join("simple/moat-demo")).unwrap();
    let wheel = dir.join("packages").join(wheel_name);
    let mut py = std::process::Command::new("python3");
    py.args(["-c", make_wheel]).arg(&wheel);
    succeeded(py);
    let sha = sha2::Sha256::digest(std::fs::read(&wheel).unwrap());
    std::fs::write(
        dir.join("simple/index.html"),
        "<!DOCTYPE html><html><body><a href=\"moat-demo/\">moat-demo</a></body></html>\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("simple/moat-demo/index.html"),
        format!(
            "<!DOCTYPE html><html><body><a href=\"../../packages/{wheel_name}#sha256={sha:x}\">\
             {wheel_name}</a></body></html>\n"
        ),
    )
    .unwrap();
    let pip = std::fs::read_dir("/usr/share/python-wheels")
        .expect("Debian's python3-pip-whl (installed with python3-venv)")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pip-"))
        })
        .expect("a pip wheel in /usr/share/python-wheels");
    std::fs::copy(pip, dir.join("pip.whl")).unwrap();
}

/// `pip install` from a package index on the host's loopback (Python's own HTTP server over
/// a PEP 503 directory), reached by name through an allow rule, as in the README.
#[test]
fn pip_installs_from_a_local_index() {
    let index = tempfile::tempdir().unwrap();
    package_index(index.path());
    let mut serve = std::process::Command::new("python3");
    serve
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(index.path())
        .stderr(std::process::Stdio::piped());
    let (mut server, ready) = spawn_ready(serve);
    // "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
    let port: u16 = ready
        .split_whitespace()
        .nth(5)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {ready:?}"));

    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 pypi.test\n").unwrap();
    let script = r#"set -e
python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], "/tmp/pip.whl")' "http://pypi.test:$1/pip.whl"
python3 /tmp/pip.whl/pip install --quiet --no-cache-dir --disable-pip-version-check --no-input \
    --index-url "http://pypi.test:$1/simple/" --trusted-host pypi.test --target /tmp/site moat-demo
PYTHONPATH=/tmp/site python3 -c 'import moat_demo; print(moat_demo.GREETING)'
"#;
    let allow = format!("pypi.test:{port}");
    let mut run = moat();
    run.args(["run", "--allow", &allow, "--egress-hosts"])
        .arg(&hosts)
        .args(["--", "sh", "-c", script, "sh", &port.to_string()]);
    let out = succeeded(run);
    assert!(out.ends_with("installed from the local index\n"), "{out}");
    // The wheel came from this index.
    let _ = server.0.kill();
    let mut log = String::new();
    server
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("\"GET /packages/moat_demo-1.0-py3-none-any.whl HTTP/1.1\" 200"),
        "{log}"
    );
}

/// A guest loop that, every 50 ms, sends `GET /<hostname>` to web.test (at the address it
/// resolved last, and resolving it again when that fails), and appends `fail <hostname>` to
/// /tmp/attempts for every connection or lookup that fails. Started in the background.
const LOOP: &str = r#"
import socket, sys, time
port = int(sys.argv[1])
ip = socket.gethostbyname("web.test")
def fail(name):
    with open("/tmp/attempts", "a") as f:
        f.write("fail %s\n" % name)
while True:
    name = socket.gethostname()
    try:
        c = socket.create_connection((ip, port), timeout=0.5)
        c.sendall(("GET /%s HTTP/1.0\r\n\r\n" % name).encode())
        c.recv(100)
        c.close()
    except Exception:
        fail(name)
        try:
            ip = socket.gethostbyname("web.test")
        except Exception:
            fail(name)
    time.sleep(0.05)
"#;

/// A restored guest that keeps trying to reach the outside from its first instant gets
/// nothing out before its stack has its policy, although the stack now starts while QEMU
/// loads the memory (issue 10): its fork's attempts (tagged with the fork's hostname, which
/// the restore sets) fail in the guest and never reach the server; once the policy is sent,
/// the same loop gets through, so the check above is not vacuous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_guest_sends_nothing_out_before_its_policy() {
    let srv = server("hello from the host");
    let rt = runtime();
    let tpl = base_template(&rt).await;
    let id = unique("net-early");
    let sb = Sandbox::restore(&rt, &id, &tpl).await.unwrap();
    start_net(&sb, srv.port).await;
    let script = format!(
        "python3 -c '{}' {} </dev/null >/dev/null 2>&1 &",
        LOOP.replace('\'', "'\\''"),
        srv.port
    );
    let out = common::sh(&sb, &script).await;
    assert_eq!(out.status.code, Some(0), "{out:?}");
    let seen = |name: &str| {
        let line = format!("GET /{name} HTTP/1.0");
        srv.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|l| **l == line)
            .count()
    };
    eventually("the source's loop reaches the server", || seen(&id) > 0);

    let store = tempfile::tempdir_in(common::home()).unwrap();
    let snap = store.path().join("snap");
    let mut sb = sb;
    sb.snapshot(&rt, &snap).await.unwrap();
    sb.destroy().await;
    let fork_id = unique("net-early-fork");
    let fork = Sandbox::restore(&rt, &fork_id, &snap).await.unwrap();
    // The guest's own word that it tried, under its new name, and failed: three times.
    let fails = format!("cat /tmp/attempts 2>/dev/null | grep -c '^fail {fork_id}$' || true");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n: u32 = String::from_utf8_lossy(&common::sh(&fork, &fails).await.stdout)
            .trim()
            .parse()
            .unwrap();
        if n >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fork's loop never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen(&fork_id), 0, "a request left before the policy");
    start_net(&fork, srv.port).await;
    eventually("the fork's loop reaches the server once started", || {
        seen(&fork_id) > 0
    });
    fork.destroy().await;
}
