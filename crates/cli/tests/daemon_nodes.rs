//! Several daemons on one PostgreSQL, each a node (docs/FLEET.md): they share the sealing key
//! (so one's tokens verify with another's JWKS, and a node with another key refuses to start),
//! list one another, drain and undrain; a node killed with -9 is marked lost with the sandbox
//! it ran; a node stopped past its lease (SIGSTOP) finds on waking that it lost its lease,
//! changes nothing the others decided, and takes a new epoch. Each test starts a throwaway
//! PostgreSQL of its own (scripts/postgres.sh).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use common::daemon::{moat, msg, runtime_home, Daemon, ADMIN, G};
use serde_json::{json, Value};

/// The lease of every node here: short, so that a loss is noticed within seconds, yet long
/// enough for renewals (every third of it) on a loaded 2-core machine.
const LEASE_S: u64 = 5;

struct Postgres {
    dir: tempfile::TempDir,
    url: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/postgres.sh")
}

impl Postgres {
    fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script())
            .args(["start", &dir.path().display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postgres.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Postgres { dir, url }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", &self.dir.path().display().to_string()])
            .output();
    }
}

/// A home (able to run sandboxes) holding the fleet's sealing key `key`, if given.
fn home_with_key(key: Option<&[u8]>) -> tempfile::TempDir {
    let home = runtime_home();
    if let Some(key) = key {
        let path = home.path().join("secrets.key");
        std::fs::write(&path, key).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    home
}

async fn node(pg: &Postgres, name: &str, key: Option<&[u8]>) -> Daemon {
    let lease = LEASE_S.to_string();
    let args = [
        "--store",
        &pg.url,
        "--node-name",
        name,
        "--lease-s",
        &lease,
        "--node-label",
        "zone=test",
    ];
    Daemon::start_at(home_with_key(key), Some(ADMIN), &args).await
}

async fn nodes(d: &Daemon) -> Vec<Value> {
    let (st, v) = d.call(Some(ADMIN), "GET", "/v1/nodes", None).await;
    assert_eq!(st, 200, "{v}");
    v["nodes"].as_array().unwrap().clone()
}

async fn node_row(d: &Daemon, name: &str) -> Value {
    let (st, v) = d
        .call(Some(ADMIN), "GET", &format!("/v1/nodes/{name}"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    v
}

/// Waits (a bounded while) until `f` holds of node `name` as `d` sees it.
async fn until_node(d: &Daemon, name: &str, within: Duration, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let n = node_row(d, name).await;
        if f(&n) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "node {name} never got there: {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (bounded) until `d`'s sandboxes are ready: a fresh home checks what it has first.
async fn sandboxes_ready(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, h) = d.call(None, "GET", "/healthz", None).await;
        if h["sandboxes"]["state"] == "ready" {
            return;
        }
        assert_ne!(h["sandboxes"]["state"], "failed", "{h}");
        assert!(Instant::now() < deadline, "sandboxes never got ready: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the RS256 JWT `token` verifies with one of the keys of `jwks`.
fn verifies_with(jwks: &Value, token: &str) -> bool {
    let mut parts = token.rsplitn(2, '.');
    let (sig, input) = (parts.next().unwrap(), parts.next().unwrap());
    let sig = B64.decode(sig).unwrap();
    jwks["keys"].as_array().unwrap().iter().any(|k| {
        let n = B64.decode(k["n"].as_str().unwrap()).unwrap();
        let e = B64.decode(k["e"].as_str().unwrap()).unwrap();
        ring::signature::RsaPublicKeyComponents { n, e }
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                input.as_bytes(),
                &sig,
            )
            .is_ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_keys_drain_and_lose_a_killed_or_stopped_node() {
    let t0 = Instant::now();
    let pg = Postgres::start();
    let a = node(&pg, "node-a", None).await;
    let key = std::fs::read(a.home.path().join("secrets.key")).unwrap();
    let b = node(&pg, "node-b", Some(&key)).await;
    let mut c = node(&pg, "node-c", Some(&key)).await;

    // All three are ready nodes, seen alike from each.
    for d in [&a, &b, &c] {
        let ns = nodes(d).await;
        let names: Vec<&str> = ns.iter().map(|n| n["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["node-a", "node-b", "node-c"]);
        assert!(ns.iter().all(|n| n["state"] == "ready"), "{ns:?}");
        assert!(ns.iter().all(|n| n["labels"]["zone"] == "test"), "{ns:?}");
    }
    let row = node_row(&a, "node-b").await;
    assert_eq!(row["advertise_url"], b.url());
    assert_eq!(row["epoch"], 1);
    assert_eq!(row["lease_s"], LEASE_S);
    assert!(row["capacity"]["memory_mib"].as_u64().unwrap() > 0, "{row}");

    // One set of signing keys: every node publishes the same JWKS.
    let (_, jwks_a) = a.call(None, "GET", "/.well-known/jwks.json", None).await;
    let (_, jwks_b) = b.call(None, "GET", "/.well-known/jwks.json", None).await;
    assert_eq!(jwks_a, jwks_b);

    // A real VM on node-c: the sandbox shows its node; the others answer for it with a 421
    // naming node-c and its URL.
    a.put_group(
        "fleet",
        json!({"tier": "xs", "identity": {"enabled": true, "audiences": ["sts.amazonaws.com"]}}),
        201,
    )
    .await;
    sandboxes_ready(&c).await;
    let sb = c.create(ADMIN, "fleet", json!({})).await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["node"], "node-c", "{sb}");
    let exec = json!({"argv": ["true"]});
    let path = format!("{G}/fleet/sandboxes/{id}/exec");
    let (st, e) = a.call(Some(ADMIN), "POST", &path, Some(exec.clone())).await;
    assert_eq!(st, 421, "{e}");
    assert_eq!(e["error"]["code"], "other_node", "{e}");
    assert!(
        msg(&e).contains("node-c") && msg(&e).contains(&c.url()),
        "{e}"
    );
    let (st, e) = c.call(Some(ADMIN), "POST", &path, Some(exec)).await;
    assert_eq!(st, 200, "{e}");

    // A token minted through node-b verifies with node-a's JWKS.
    let (st, tok) = b
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/fleet/sandboxes/{id}/identity/token"),
            Some(json!({"audience": "sts.amazonaws.com"})),
        )
        .await;
    assert_eq!(st, 200, "{tok}");
    assert!(verifies_with(&jwks_a, tok["token"].as_str().unwrap()));

    // Drain: node-b takes no new sandboxes (a clear 503), others may drain and list it.
    let (st, d) = a
        .call(Some(ADMIN), "POST", "/v1/nodes/node-b/drain", None)
        .await;
    assert_eq!((st, d["state"].as_str()), (200, Some("draining")), "{d}");
    let (st, e) = b
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/fleet/sandboxes"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 503, "{e}");
    assert!(msg(&e).contains("node node-b is draining"), "{e}");
    let user = a.key("user", &["fleet"]).await;
    let (st, e) = a
        .call(Some(&user), "POST", "/v1/nodes/node-b/undrain", None)
        .await;
    assert_eq!(st, 403, "only an admin key drains: {e}");
    let o = a.cli(ADMIN, &["node", "undrain", "node-b", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "ready");
    let o = a.cli(ADMIN, &["node", "ls"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("node-b") && table.contains("ready"),
        "{table}"
    );

    // kill -9 of node-c: within about a lease the others mark it lost, and its running
    // sandbox lost with the reason.
    c.kill9();
    let killed = Instant::now();
    let lost = until_node(&a, "node-c", Duration::from_secs(4 * LEASE_S), |n| {
        n["state"] == "lost"
    })
    .await;
    let noticed = killed.elapsed();
    eprintln!("node-c marked lost {noticed:?} after kill -9 (lease {LEASE_S} s)");
    assert!(
        noticed <= Duration::from_secs(2 * LEASE_S + 2),
        "{noticed:?}"
    );
    assert!(
        lost["lost_reason"].as_str().unwrap().contains("lease"),
        "{lost}"
    );
    let sb = b.get("fleet", &id).await.unwrap();
    assert_eq!(sb["state"], "lost", "{sb}");
    assert!(
        sb["reason"].as_str().unwrap().contains("node node-c"),
        "{sb}"
    );

    // SIGSTOP of node-b, which runs a sandbox, past its lease (a partition): the others mark
    // it and its sandbox lost. On SIGCONT it says it lost its lease, overwrites nothing (its
    // row comes back only with a new epoch; its sandbox stays lost) and destroys that VM.
    sandboxes_ready(&b).await;
    let on_b = b.create(ADMIN, "fleet", json!({})).await;
    let on_b = on_b["id"].as_str().unwrap().to_string();
    let b_home = b.home.path().display().to_string();
    assert!(!common::qemu_processes(&b_home).is_empty());
    let pid = nix::unistd::Pid::from_raw(b.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    until_node(&a, "node-b", Duration::from_secs(4 * LEASE_S), |n| {
        n["state"] == "lost"
    })
    .await;
    assert_eq!(a.state("fleet", &on_b).await, "lost");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let back = until_node(&a, "node-b", Duration::from_secs(4 * LEASE_S), |n| {
        n["state"] == "ready"
    })
    .await;
    assert_eq!(back["epoch"], 2, "a new epoch: {back}");
    assert!(back.get("lost_reason").is_none(), "{back}");
    let err = b.stderr(1);
    assert!(err.contains("node-b LOST ITS LEASE"), "{err}");
    assert!(err.contains("took its lease again, epoch 2"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !common::qemu_processes(&b_home).is_empty() {
        assert!(
            Instant::now() < deadline,
            "node-b kept the VM of its lost sandbox"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for sb in [&id, &on_b] {
        let row = b.get("fleet", sb).await.unwrap();
        assert_eq!(row["state"], "lost", "{row}");
    }
    // Acting on a lost sandbox is refused; deleting it works through any node.
    let (st, e) = b
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/fleet/sandboxes/{on_b}/suspend"),
            None,
        )
        .await;
    assert_eq!(st, 409, "{e}");
    b.delete("fleet", &id).await;
    a.delete("fleet", &on_b).await;
    assert!(a.get("fleet", &id).await.is_none());
    assert!(b.get("fleet", &on_b).await.is_none());
    eprintln!("whole fleet test: {:?}", t0.elapsed());
}

/// A node whose `secrets.key` is not the one the store was sealed with refuses to start, and
/// says which file and what to do.
#[tokio::test]
async fn a_node_with_another_sealing_key_refuses_to_start() {
    let pg = Postgres::start();
    let _a = node(&pg, "node-a", None).await;
    let home = tempfile::tempdir().unwrap();
    let out = moat()
        .args([
            "serve",
            "--no-setup",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &pg.url,
            "--node-name",
            "node-x",
        ])
        .env("MOAT_HOME", home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is not the sealing key of the store"), "{err}");
    assert!(err.contains("same secrets.key"), "{err}");
    // It took no lease: the fleet has one node.
    let d = Daemon::start_at(
        home_with_key(Some(
            &std::fs::read(_a.home.path().join("secrets.key")).unwrap(),
        )),
        Some(ADMIN),
        &["--no-setup", "--store", &pg.url, "--node-name", "node-y"],
    )
    .await;
    let names: Vec<String> = nodes(&d)
        .await
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["node-a", "node-y"]);
}
