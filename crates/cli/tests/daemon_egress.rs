//! The daemon's egress end to end, in real guests: a group's policy reaches every one of its
//! sandboxes' network stacks (create, pool hand-over, fork, resume, adoption after a
//! `kill -9`), a `PUT` of the group changes it for running sandboxes before it answers, every
//! decision is in the audit (API, CLI, metrics), and a sandbox whose stack dies is failed with
//! the reason. Test servers listen on the host's loopback and are reached by name through
//! `moat serve --egress-hosts`; the upstream resolver is a closed loopback port, so no query
//! leaves the host.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, ADMIN, G};
use serde_json::{json, Value};

/// A daemon whose stacks answer web.test and other.test from a hosts file (both the loopback
/// server), and ask a resolver that does not exist for anything else.
async fn daemon(dir: &Path) -> Daemon {
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 web.test other.test fork.test\n").unwrap();
    let hosts = hosts.display().to_string();
    Daemon::start_with_runtime_args(
        Some(ADMIN),
        &["--egress-hosts", &hosts, "--egress-resolver", "127.0.0.1:9"],
    )
    .await
}

fn allow(hosts: &[&str], port: u16) -> Value {
    let rules: Vec<Value> = hosts
        .iter()
        .map(|h| json!({"host": h, "ports": [port]}))
        .collect();
    json!({"tier": "s", "egress": {"rules": rules}})
}

/// What the guest got for `http://NAME:PORT/`: the body, or `ERR <exception>`.
async fn fetch(d: &Daemon, group: &str, id: &str, name: &str, port: u16) -> String {
    let script = format!(
        "import urllib.request\ntry:\n print(urllib.request.urlopen('http://{name}:{port}/', \
         timeout=20).read().decode())\nexcept Exception as e:\n print('ERR', type(e).__name__, e)"
    );
    let (st, r) = d
        .exec(ADMIN, group, id, json!({"argv": ["python3", "-c", script]}))
        .await;
    assert_eq!(st, 200, "{r}");
    r["stdout"].as_str().unwrap().trim().to_string()
}

/// The audit at `path` (a sandbox's or group's `/egress`, with its query).
async fn audit(d: &Daemon, path: &str) -> Vec<Value> {
    let (st, v) = d.call(Some(ADMIN), "GET", path, None).await;
    assert_eq!(st, 200, "{v}");
    v["items"].as_array().unwrap().clone()
}

/// Waits until the audit at `path` has an event that `want` accepts (events are stored a
/// moment after the decision; flows when they end).
async fn audited(d: &Daemon, path: &str, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let items = audit(d, path).await;
        if let Some(e) = items.iter().find(|e| want(e)) {
            return e.clone();
        }
        assert!(Instant::now() < deadline, "no {what} in {path}: {items:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is(e: &Value, kind: &str, name: &str, verdict: &str) -> bool {
    e["kind"] == kind && e["name"] == name && e["verdict"] == verdict
}

#[tokio::test]
async fn groups_policy_is_enforced_audited_and_updated_live() {
    let port = common::http_server("hello from the host");
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    d.put_group("net", allow(&["web.test"], port), 201).await;
    let a = d.new_sandbox("net").await;
    let sb_audit = format!("{G}/net/sandboxes/{a}/egress");

    assert_eq!(
        fetch(&d, "net", &a, "web.test", port).await,
        "hello from the host"
    );
    let (st, r) = d
        .exec(
            ADMIN,
            "net",
            &a,
            json!({"argv": ["python3", "-c",
                "import socket\ntry:\n socket.gethostbyname('evil.test')\nexcept OSError as e:\n print('nxdomain', e)"]}),
        )
        .await;
    assert_eq!(st, 200);
    assert!(r["stdout"].as_str().unwrap().starts_with("nxdomain"), "{r}");

    // The audit: the allowed answer and flow (by rule 0, with bytes), the denied name.
    let e = audited(&d, &sb_audit, "the web.test answer", |e| {
        is(e, "dns", "web.test", "allow")
    })
    .await;
    assert_eq!(
        (e["rule"].clone(), e["sandbox"].clone()),
        (json!(0), json!(a))
    );
    let e = audited(&d, &sb_audit, "the web.test flow", |e| {
        is(e, "tcp", "web.test", "allow")
    })
    .await;
    assert_eq!(e["port"], port);
    assert!(e["bytes_sent"].as_u64().unwrap() > 0, "{e}");
    assert!(e["bytes_received"].as_u64().unwrap() > 0, "{e}");
    let denied = audited(&d, &sb_audit, "the evil.test denial", |e| {
        is(e, "dns", "evil.test", "deny")
    })
    .await;
    assert!(denied["reason"].as_str().unwrap().contains("default deny"));
    assert_eq!(denied["rule"], Value::Null);
    let group_denied = audit(&d, &format!("{G}/net/egress?verdict=deny&sandbox={a}")).await;
    assert!(group_denied.iter().all(|e| e["verdict"] == "deny"));
    assert!(group_denied.iter().any(|e| e["id"] == denied["id"]));
    let since = audit(
        &d,
        &format!("{G}/net/egress?since={}", denied["time"].as_str().unwrap()),
    )
    .await;
    assert!(
        since.iter().any(|e| e["id"] == denied["id"]),
        "since is inclusive"
    );
    let after = audit(&d, &format!("{sb_audit}?after={}", denied["id"])).await;
    assert!(after
        .iter()
        .all(|e| e["id"].as_u64() > denied["id"].as_u64()));
    let (st, e) = d
        .call(Some(ADMIN), "GET", &format!("{sb_audit}?limit=5000"), None)
        .await;
    assert_eq!(st, 400, "{e}");
    // The metrics and the CLI see the same decisions.
    let conns = d
        .metric("moat_egress_connections_total{group=\"net\",verdict=\"allow\"}")
        .await;
    assert!(conns.unwrap_or(0.0) >= 1.0, "{conns:?}");
    let dns = d
        .metric("moat_egress_dns_queries_total{group=\"net\",verdict=\"deny\"}")
        .await;
    assert!(dns.unwrap_or(0.0) >= 1.0, "{dns:?}");
    assert!(
        d.metric("moat_egress_bytes_received_total{group=\"net\"}")
            .await
            .unwrap_or(0.0)
            > 0.0
    );
    let out = d.cli(ADMIN, &["sandbox", "egress", "net", &a]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(" deny ") && l.contains("evil.test")),
        "{text}"
    );

    // --follow prints what comes after it started, one JSON object a line with --json.
    let mut follow = common::daemon::moat()
        .args([
            "sandbox", "egress", "net", &a, "--follow", "--limit", "1", "--json",
        ])
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(20)).unwrap()).unwrap();
    assert!(first["id"].is_u64(), "{first}");
    let r = fetch(&d, "net", &a, "followed.test", port).await;
    assert!(r.starts_with("ERR"), "{r}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("--follow printed the new denial");
        let e: Value = serde_json::from_str(&line).unwrap();
        assert!(
            e["id"].as_u64() > first["id"].as_u64(),
            "only newer events: {e}"
        );
        if is(&e, "dns", "followed.test", "deny") {
            break;
        }
    }
    follow.kill().unwrap();
    follow.wait().unwrap();

    // A live PUT without the rule: the next connection fails, and that is audited.
    let before = audit(&d, &sb_audit).await.last().unwrap()["id"].clone();
    d.put_group("net", json!({"tier": "s"}), 200).await;
    let r = fetch(&d, "net", &a, "web.test", port).await;
    assert!(r.starts_with("ERR"), "{r}");
    audited(
        &d,
        &format!("{sb_audit}?after={before}"),
        "the denial after the update",
        |e| e["name"] == "web.test" && e["verdict"] == "deny",
    )
    .await;

    // Changed while suspended: the resumed sandbox has the group's policy as it is now.
    let (st, v, _) = d.lifecycle("net", &a, "suspend").await;
    assert_eq!(st, 200, "{v}");
    d.put_group("net", allow(&["web.test", "other.test"], port), 200)
        .await;
    let (st, v, _) = d.lifecycle("net", &a, "resume").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        fetch(&d, "net", &a, "other.test", port).await,
        "hello from the host"
    );

    // A fork has a stack of its own with the current policy; its decisions are its own.
    let (st, snap) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/net/sandboxes/{a}/snapshots"),
            Some(json!({"name": "s1"})),
        )
        .await;
    assert_eq!(st, 201, "{snap}");
    d.put_group("net", allow(&["web.test", "fork.test"], port), 200)
        .await;
    let b = d.create(ADMIN, "net", json!({"from_snapshot": "s1"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        fetch(&d, "net", &b, "fork.test", port).await,
        "hello from the host"
    );
    let r = fetch(&d, "net", &b, "other.test", port).await;
    assert!(r.starts_with("ERR"), "the fork has the current policy: {r}");
    // The source runs on with its own network, under the same current policy.
    assert_eq!(
        fetch(&d, "net", &a, "fork.test", port).await,
        "hello from the host"
    );
    audited(
        &d,
        &format!("{G}/net/sandboxes/{b}/egress"),
        "the fork's flow",
        |e| is(e, "tcp", "fork.test", "allow"),
    )
    .await;
    assert!(
        !audit(&d, &sb_audit)
            .await
            .iter()
            .any(|e| e["name"] == "other.test" && e["verdict"] == "deny"),
        "the fork's denial is not the source's"
    );
}

/// The pid of the network stack of sandbox `id` of daemon `d`: the process whose stderr is
/// the sandbox's `net.log`.
fn stack_pid(d: &Daemon, id: &str) -> i32 {
    let log: PathBuf = d.home.path().join("run").join(id).join("net.log");
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(p.path().join("fd/2")).is_ok_and(|t| t == log) {
            return pid;
        }
    }
    panic!("no network stack writes {}", log.display());
}

fn kill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[tokio::test]
async fn network_survives_restarts_and_pools_and_a_dead_stack_fails_its_sandbox() {
    let port = common::http_server("hello again");
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(dir.path()).await;
    let mut spec = allow(&["web.test"], port);
    spec["pool"] = json!({"size": 1});
    d.put_group("pooled", spec, 201).await;
    // A hand-over from the warm pool: the pool VM's stack starts with the group's policy.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, g) = d
            .call(Some(ADMIN), "GET", &format!("{G}/pooled"), None)
            .await;
        if g["status"]["pool_ready"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the pool never filled: {g}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = d.new_sandbox("pooled").await;
    assert_eq!(
        d.metric("moat_pool_hits_total{group=\"pooled\"}").await,
        Some(1.0)
    );
    assert_eq!(
        fetch(&d, "pooled", &c, "web.test", port).await,
        "hello again"
    );

    // kill -9 of the daemon: the next one adopts the sandbox, and its stack (started by the
    // first daemon) takes the group's policy and later updates.
    d.kill9();
    d.spawn(None).await;
    assert_eq!(d.state("pooled", &c).await, "running");
    assert_eq!(
        fetch(&d, "pooled", &c, "web.test", port).await,
        "hello again"
    );
    d.put_group("pooled", json!({"tier": "s", "pool": {"size": 1}}), 200)
        .await;
    let r = fetch(&d, "pooled", &c, "web.test", port).await;
    assert!(
        r.starts_with("ERR"),
        "the update reached the adopted stack: {r}"
    );

    // A stack that dies while no daemon watches: the next daemon fails its sandbox at start.
    let e = d.new_sandbox("pooled").await;
    d.kill9();
    kill(stack_pid(&d, &e));
    d.spawn(None).await;
    let sb = d.get("pooled", &e).await.unwrap();
    assert_eq!(sb["state"], "failed", "{sb}");
    assert!(
        sb["reason"]
            .as_str()
            .unwrap()
            .contains("network stack was gone when the daemon started"),
        "{sb}"
    );
    assert_eq!(d.state("pooled", &c).await, "running");

    // The stack dies under a live VM: the sandbox is failed with the reason, not left offline.
    kill(stack_pid(&d, &c));
    let deadline = Instant::now() + Duration::from_secs(20);
    let sb = loop {
        let sb = d.get("pooled", &c).await.unwrap();
        if sb["state"] == "failed" {
            break sb;
        }
        assert!(Instant::now() < deadline, "still {sb}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        sb["reason"]
            .as_str()
            .unwrap()
            .contains("network stack exited"),
        "{sb}"
    );
    let (st, e) = d
        .exec(ADMIN, "pooled", &c, json!({"command": "true"}))
        .await;
    assert_eq!(st, 409, "{e}");
    // Its VM is gone too.
    let qemus = common::qemu_processes(&d.home.path().join("run").join(&c).display().to_string());
    assert!(qemus.is_empty(), "{qemus:?}");
}

/// An HTTP server on the host's loopback that answers every request with `n` bytes.
fn bulk_server(n: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let _ = c.read(&mut buf);
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                );
                let _ = c.write_all(&vec![b'x'; n]);
            });
        }
    });
    port
}

/// How many bytes the guest downloaded from `http://web.test:PORT/`, and in how many seconds.
async fn timed_download(d: &Daemon, group: &str, id: &str, port: u16) -> (usize, f64) {
    let script = format!(
        "import time, urllib.request\nt = time.time()\n\
         n = len(urllib.request.urlopen('http://web.test:{port}/', timeout=60).read())\n\
         print(n, time.time() - t)"
    );
    let (st, r) = d
        .exec(ADMIN, group, id, json!({"argv": ["python3", "-c", script]}))
        .await;
    assert_eq!(st, 200, "{r}");
    let out = r["stdout"].as_str().unwrap().trim().to_string();
    let (n, t) = out.split_once(' ').unwrap_or_else(|| panic!("{r}"));
    (n.parse().unwrap(), t.parse().unwrap())
}

/// A group's network limits reach its sandboxes' stacks and change live: under a bandwidth
/// cap of 256 KiB/s (a burst of one second's worth) a 1 MiB download takes three seconds more
/// and the cap is audited, not fatal; after a `PUT` without it the same download is fast. A
/// limit out of bounds is refused, naming the field.
#[tokio::test]
async fn network_limits_apply_and_change_live() {
    const MIB: usize = 1 << 20;
    let port = bulk_server(MIB);
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    let mut spec = allow(&["web.test"], port);
    spec["network_limits"] = json!({"bandwidth": 262144, "dns_qps": 20});
    d.put_group("lim", spec.clone(), 201).await;
    let (_, g) = d.call(Some(ADMIN), "GET", &format!("{G}/lim"), None).await;
    assert_eq!(
        g["spec"]["network_limits"],
        json!({"bandwidth": 262144, "dns_qps": 20})
    );
    let a = d.new_sandbox("lim").await;

    let (n, capped) = timed_download(&d, "lim", &a, port).await;
    assert_eq!(n, MIB);
    assert!(capped >= 2.5, "1 MiB at 256 KiB/s took {capped} s");
    let e = audited(
        &d,
        &format!("{G}/lim/sandboxes/{a}/egress"),
        "the bandwidth limit",
        |e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("limit: 262144 bytes per second of bandwidth"))
        },
    )
    .await;
    assert_eq!(
        (e["name"].clone(), e["verdict"].clone()),
        (json!("web.test"), json!("allow"))
    );

    // Live: the PUT answers once the stack has the new limits.
    spec["network_limits"] = json!({});
    d.put_group("lim", spec.clone(), 200).await;
    let (n, free) = timed_download(&d, "lim", &a, port).await;
    assert_eq!(n, MIB);
    assert!(
        free < capped / 2.0,
        "without the cap 1 MiB took {free} s (capped: {capped} s)"
    );

    spec["network_limits"] = json!({"bandwidth": 1000});
    let (st, v) = d
        .call(Some(ADMIN), "PUT", &format!("{G}/lim"), Some(spec))
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(
        common::daemon::msg(&v),
        "invalid network_limits.bandwidth: 1000: allowed is 16384–100000000000 bytes per \
         second, or absent for unlimited"
    );
    d.delete("lim", &a).await;
}

/// The floor holds under `"default": "allow"`: a sandbox cannot reach the daemon's port, on
/// the host's own address or on its gateway (the guest's 127.0.0.1 is its own loopback, so
/// those are the ways to the host), so neither the API nor another sandbox's exposed port
/// through it; nor the metadata address. Each is refused at once and audited with the floor's
/// reason, while the other sandbox's port works from the host all along.
#[tokio::test]
async fn the_floor_holds_under_default_allow() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    d.put_group(
        "open",
        json!({"tier": "s", "egress": {"default": "allow"}}),
        201,
    )
    .await;
    let (a, b) = (d.new_sandbox("open").await, d.new_sandbox("open").await);
    let (st, p) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/open/sandboxes/{b}/processes"),
            Some(json!({"argv": ["python3", "-m", "http.server", "8080"]})),
        )
        .await;
    assert_eq!(st, 201, "{p}");
    let (st, p) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/open/sandboxes/{b}/ports"),
            Some(json!({"port": 8080})),
        )
        .await;
    assert_eq!(st, 201, "{p}");
    let path = p["url"].as_str().unwrap().to_string();
    let path = path[path.find("/v1/").unwrap()..].to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, _) = d.call(Some(ADMIN), "GET", &path, None).await;
        if st == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "b's server never answered: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let daemon_port = d.port;
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let own = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .expect("the host has a global IPv4 address");
    let script = format!(
        "import socket, time, urllib.request\n\
         def probe(name, f):\n    t = time.time()\n    try:\n        r = f()\n    \
         except Exception as e:\n        r = 'ERR ' + type(e).__name__\n    \
         print(name, r, round(time.time() - t, 1))\n\
         probe('api', lambda: urllib.request.urlopen('http://100.127.255.1:{daemon_port}{path}', \
         timeout=20).status)\n\
         probe('own', lambda: socket.create_connection(('{own}', {daemon_port}), timeout=20) \
         and 'connected')\n\
         probe('metadata', lambda: socket.create_connection(('169.254.169.254', 80), \
         timeout=20) and 'connected')\n"
    );
    let (st, r) = d
        .exec(
            ADMIN,
            "open",
            &a,
            json!({"argv": ["python3", "-c", script]}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let out = r["stdout"].as_str().unwrap();
    for name in ["api", "own", "metadata"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {out}"));
        let f: Vec<&str> = line.split(' ').collect();
        assert!(
            f[1] == "ERR" && (f[2].contains("Refused") || f[2] == "URLError"),
            "{line}"
        );
        assert!(f[3].parse::<f64>().unwrap() < 3.0, "not at once: {line}");
    }
    let sb_audit = format!("{G}/open/sandboxes/{a}/egress?verdict=deny");
    for (what, port, reason) in [
        ("100.127.255.1", daemon_port, "CGNAT (100.64.0.0/10)"),
        (own.as_str(), daemon_port, "the host's own address"),
        ("169.254.169.254", 80, "link-local"),
    ] {
        let e = audited(&d, &sb_audit, what, |e| {
            e["address"] == what && e["port"] == port
        })
        .await;
        let r = e["reason"].as_str().unwrap();
        assert!(r.starts_with("floor: ") && r.contains(reason), "{e}");
    }
}
