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
    let out = moat()
        .arg("run")
        .args(flags)
        .arg("--egress-hosts")
        .arg(hosts)
        .args(["--", "python3", "-c", script])
        .arg(port.to_string())
        .output()
        .unwrap();
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
