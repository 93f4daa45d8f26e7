//! Several daemons on one PostgreSQL, each a node (docs/FLEET.md): they share the sealing key
//! (so one's tokens verify with another's JWKS, and a node with another key refuses to start),
//! list one another, drain and undrain; a node killed with -9 is marked lost with the sandbox
//! it ran; a node stopped past its lease (SIGSTOP) finds on waking that it lost its lease,
//! changes nothing the others decided, and takes a new epoch. Any node serves a sandbox of
//! another: requests are forwarded to its node (exec, files, shell), with the caller's key,
//! never twice, and with a clear error when that node is down. Each test starts a throwaway
//! PostgreSQL of its own (scripts/postgres.sh).

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use common::daemon::{moat, msg, Daemon, ADMIN, G};
use common::fleet::{home_with_key, node_row, sandboxes_ready, start_node, until_node};
use futures_util::{SinkExt, StreamExt};
use moat_testkit::postgres::Postgres;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The lease of every node here: short, so that a loss is noticed within seconds, yet long
/// enough for renewals (every third of it) on a loaded 2-core machine.
const LEASE_S: u64 = 5;

async fn node(pg: &Postgres, name: &str, key: Option<&[u8]>) -> Daemon {
    sized_node(pg, name, key, &[]).await
}

/// A node labelled `zone=test` and `node=<name>` (so a group can be kept on it), with the
/// `extra` arguments of `moat serve`.
async fn sized_node(pg: &Postgres, name: &str, key: Option<&[u8]>, extra: &[&str]) -> Daemon {
    let label = format!("node={name}");
    let mut args = vec!["--node-label", "zone=test", "--node-label", &label];
    args.extend_from_slice(extra);
    start_node(pg, name, key, LEASE_S, &args).await
}

async fn nodes(d: &Daemon) -> Vec<Value> {
    let (st, v) = d.call(Some(ADMIN), "GET", "/v1/nodes", None).await;
    assert_eq!(st, 200, "{v}");
    v["nodes"].as_array().unwrap().clone()
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

    // A real VM on node-c: the sandbox shows its node; the others forward to it.
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
    for d in [&a, &c] {
        let (st, e) = d.call(Some(ADMIN), "POST", &path, Some(exec.clone())).await;
        assert_eq!(st, 200, "{e}");
    }

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

    // Drain: node-b takes no new sandboxes (a group only it may run gets a clear 503, and
    // a create it receives itself with the forwarded header too), others may drain and list
    // it.
    let (st, d) = a
        .call(Some(ADMIN), "POST", "/v1/nodes/node-b/drain", None)
        .await;
    assert_eq!((st, d["state"].as_str()), (200, Some("draining")), "{d}");
    a.put_group(
        "on-b",
        json!({"tier": "xs", "placement": {"node_labels": {"node": "node-b"}}}),
        201,
    )
    .await;
    let (st, e) = a
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/on-b/sandboxes"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 503, "{e}");
    assert!(msg(&e).contains("node node-b is draining"), "{e}");
    let resp = b
        .http
        .post(format!("{}{G}/fleet/sandboxes", b.url()))
        .bearer_auth(ADMIN)
        .header("x-moat-forwarded-by", "node-a")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let e: Value = resp.json().await.unwrap();
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

    // A force delete of a group through node-a ends its sandbox on node-c too: node-c
    // destroys a VM whose row is gone at its next renewal (every third of the lease).
    a.put_group(
        "gone",
        json!({"tier": "xs", "placement": {"node_labels": {"node": "node-c"}}}),
        201,
    )
    .await;
    let doomed = c.create(ADMIN, "gone", json!({})).await;
    assert_eq!(doomed["node"], "node-c", "{doomed}");
    let c_home = c.home.path().display().to_string();
    assert_eq!(common::qemu_processes(&c_home).len(), 2);
    let (st, e) = a
        .call(Some(ADMIN), "DELETE", &format!("{G}/gone?force=true"), None)
        .await;
    assert_eq!(st, 204, "{e}");
    let deadline = Instant::now() + Duration::from_secs(2 * LEASE_S);
    while common::qemu_processes(&c_home).len() != 1 {
        assert!(
            Instant::now() < deadline,
            "node-c still runs the VM of a group deleted through node-a"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, e) = a.call(Some(ADMIN), "POST", &path, Some(exec.clone())).await;
    assert_eq!(st, 200, "the other sandbox of node-c still answers: {e}");

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

/// Placement (docs/FLEET.md, "Placement"): three nodes of 1024, 1536 and 512 MiB of tier
/// memory (2, 3 and 1 xs sandboxes). Creates through one node spread by the share of memory
/// in use; `pack` fills the most used node that still has room; `node_labels` keep a group
/// on the nodes that have them (set with the CLI); a group that no node may take is told why
/// (429 when its nodes are full, 503 when none has its labels) and leaves no row behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_placed_by_capacity_strategy_and_labels() {
    let t0 = Instant::now();
    let pg = Postgres::start();
    let a = sized_node(&pg, "node-a", None, &["--max-memory-mib", "1024"]).await;
    let key = std::fs::read(a.home.path().join("secrets.key")).unwrap();
    let b = sized_node(&pg, "node-b", Some(&key), &["--max-memory-mib", "1536"]).await;
    let c = sized_node(&pg, "node-c", Some(&key), &["--max-memory-mib", "512"]).await;
    for d in [&a, &b, &c] {
        sandboxes_ready(d).await;
    }
    let node_of = |sb: &Value| sb["node"].as_str().unwrap().to_string();

    // Spread, all through node-a: node-a itself while all are empty (no hop), then the empty
    // node-b and node-c; the share decides, not the count: node-c is full with one.
    a.put_group("spread", json!({"tier": "xs"}), 201).await;
    let mut placed = Vec::new();
    for _ in 0..3 {
        placed.push(node_of(&a.create(ADMIN, "spread", json!({})).await));
    }
    assert_eq!(placed, ["node-a", "node-b", "node-c"]);

    // Pack, through node-c (full): node-a holds half of its memory, node-b a third, so pack
    // takes node-a where spread would take node-b.
    a.put_group(
        "packed",
        json!({"tier": "xs", "placement": {"strategy": "pack"}}),
        201,
    )
    .await;
    let sb = c.create(ADMIN, "packed", json!({})).await;
    assert_eq!(node_of(&sb), "node-a", "{sb}");

    // Labels, set with the CLI: a group kept on node-b, created through node-c.
    let o = a.cli(
        ADMIN,
        &[
            "group",
            "apply",
            "--name",
            "on-b",
            "--tier",
            "xs",
            "--node-label",
            "node=node-b",
            "--placement",
            "pack",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        g["spec"]["placement"],
        json!({"node_labels": {"node": "node-b"}, "strategy": "pack"}),
        "{g}"
    );
    let sb = c.create(ADMIN, "on-b", json!({})).await;
    assert_eq!(node_of(&sb), "node-b", "{sb}");
    // Its sandbox is served through any node, as every other.
    let (st, e) = c
        .exec(
            ADMIN,
            "on-b",
            sb["id"].as_str().unwrap(),
            json!({"command": "true"}),
        )
        .await;
    assert_eq!(st, 200, "{e}");

    // Full where the group may run: 429 naming the node and its room, through any node.
    a.put_group(
        "on-a",
        json!({"tier": "xs", "placement": {"node_labels": {"node": "node-a"}}}),
        201,
    )
    .await;
    for d in [&b, &a] {
        let (st, e) = d
            .call(
                Some(ADMIN),
                "POST",
                &format!("{G}/on-a/sandboxes"),
                Some(json!({})),
            )
            .await;
        assert_eq!(st, 429, "{e}");
        assert!(msg(&e).contains("node-a"), "{e}");
    }
    // No node with the labels: 503 naming them.
    a.put_group(
        "nowhere",
        json!({"tier": "xs", "placement": {"node_labels": {"zone": "mars"}}}),
        201,
    )
    .await;
    let (st, e) = b
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/nowhere/sandboxes"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 503, "{e}");
    assert!(msg(&e).contains("zone=mars"), "{e}");
    // A bad constraint is refused when the group is written.
    let (st, e) = a
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/bad"),
            Some(json!({"placement": {"strategy": "random"}})),
        )
        .await;
    assert_eq!(st, 400, "{e}");

    // The refusals left nothing: five sandboxes, as placed.
    let mut all = Vec::new();
    for g in ["spread", "packed", "on-b", "on-a"] {
        let (_, l) = b
            .call(Some(ADMIN), "GET", &format!("{G}/{g}/sandboxes"), None)
            .await;
        all.extend(l["sandboxes"].as_array().unwrap().iter().map(node_of));
    }
    all.sort();
    assert_eq!(all, ["node-a", "node-a", "node-b", "node-b", "node-c"]);
    eprintln!("placement test: {:?}", t0.elapsed());
}

/// Ready VMs of `group`'s pool on node `d` (the group's status, as that node answers it).
async fn pool_ready(d: &Daemon, group: &str) -> u64 {
    let (st, g) = d
        .call(Some(ADMIN), "GET", &format!("{G}/{group}"), None)
        .await;
    assert_eq!(st, 200, "{g}");
    g["status"]["pool_ready"].as_u64().unwrap()
}

/// Waits (bounded) until the pools of `group` on `nodes` hold `want`.
async fn until_pools(nodes: &[&Daemon], group: &str, want: &[u64], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut have = Vec::new();
        for d in nodes {
            have.push(pool_ready(d, group).await);
        }
        if have == want {
            return;
        }
        assert!(Instant::now() < deadline, "pools {have:?}, never {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Warm pools per node (docs/FLEET.md, "Placement"): a pool of 2 over three nodes is one VM
/// on each of the first two; a create through the third takes a pool VM on another node
/// (a hand-over there); when a node is lost, its share moves to the node that had none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_are_split_over_the_nodes_and_refilled_elsewhere_when_one_is_lost() {
    let t0 = Instant::now();
    let pg = Postgres::start();
    let a = node(&pg, "node-a", None).await;
    let key = std::fs::read(a.home.path().join("secrets.key")).unwrap();
    let mut b = node(&pg, "node-b", Some(&key)).await;
    let c = node(&pg, "node-c", Some(&key)).await;
    for d in [&a, &b, &c] {
        sandboxes_ready(d).await;
    }
    a.put_group("warm", json!({"tier": "xs", "pool": {"size": 2}}), 201)
        .await;
    let within = Duration::from_secs(120);
    until_pools(&[&a, &b, &c], "warm", &[1, 1, 0], within).await;

    // Through node-c, which has no pool VM: placed on node-a, whose pool VM it takes (the
    // two with one tie, and the name decides), and node-a refills.
    let sb = c.create(ADMIN, "warm", json!({})).await;
    assert_eq!(sb["node"], "node-a", "{sb}");
    assert_eq!(
        a.metric("moat_pool_hits_total{group=\"warm\"}").await,
        Some(1.0)
    );
    until_pools(&[&a, &b, &c], "warm", &[1, 1, 0], within).await;

    // node-b is lost: node-c's share becomes one, and it fills it.
    b.kill9();
    until_pools(&[&a, &c], "warm", &[1, 1], Duration::from_secs(6 * LEASE_S)).await;
    a.delete("warm", sb["id"].as_str().unwrap()).await;
    eprintln!("pool test: {:?}", t0.elapsed());
}

/// Whether node `d` lists image `name`.
async fn has_image(d: &Daemon, name: &str) -> bool {
    let (_, l) = d.call(Some(ADMIN), "GET", "/v1/images", None).await;
    l["images"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == name)
}

/// Images on the node that needs them (docs/FLEET.md): an image imported from a registry
/// through node-a only; a group kept on node-b runs it there, node-b pulling it by the digest
/// node-a's import gave (the marker file is in the sandbox), and lists it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_image_pulls_it_by_digest() {
    let t0 = Instant::now();
    let pg = Postgres::start();
    let a = node(&pg, "node-a", None).await;
    let key = std::fs::read(a.home.path().join("secrets.key")).unwrap();
    // node-b's image store is its own, with only the base image: the others' homes share
    // the test home's.
    let home = home_with_key(Some(&key));
    let (shared, images) = (common::home().join("images"), home.path().join("images"));
    std::fs::remove_file(&images).unwrap();
    for dir in ["names", "sha256", "locks", "tmp"] {
        std::fs::create_dir_all(images.join(dir)).unwrap();
    }
    std::fs::copy(shared.join("names/base"), images.join("names/base")).unwrap();
    let base = std::fs::read_to_string(shared.join("names/base")).unwrap();
    let hex = base.trim().trim_start_matches("sha256:");
    std::os::unix::fs::symlink(
        shared.join("sha256").join(hex),
        images.join("sha256").join(hex),
    )
    .unwrap();
    let lease = LEASE_S.to_string();
    let args = [
        "--store",
        &pg.url,
        "--node-name",
        "node-b",
        "--lease-s",
        &lease,
        "--node-label",
        "node=node-b",
    ];
    let b = Daemon::start_at(home, Some(ADMIN), &args).await;
    let reg = moat_testkit::Registry::start(None);
    let marker = common::unique("marker").to_lowercase();
    let (reference, digest) = common::push_image(&reg, "fleet", &marker).await;
    let name = common::unique("img");
    let (st, op) = a
        .call(
            Some(ADMIN),
            "POST",
            "/v1/images",
            Some(json!({"source": reference, "name": name, "plain_http": true})),
        )
        .await;
    assert_eq!(st, 202, "{op}");
    let path = format!("/v1/operations/{}", op["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, op) = a.call(Some(ADMIN), "GET", &path, None).await;
        if op["state"] != "running" {
            assert_eq!(op["state"], "succeeded", "{op}");
            break;
        }
        assert!(Instant::now() < deadline, "import still running: {op}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !has_image(&b, &name).await,
        "node-b has the image before any create"
    );

    a.put_group(
        "pulled",
        json!({"tier": "xs", "image": name,
            "placement": {"node_labels": {"node": "node-b"}}}),
        201,
    )
    .await;
    sandboxes_ready(&b).await;
    let sb = a.create(ADMIN, "pulled", json!({})).await;
    assert_eq!(
        (&sb["node"], &sb["image"]),
        (&json!("node-b"), &json!(digest)),
        "{sb}"
    );
    let (st, r) = a
        .exec(
            ADMIN,
            "pulled",
            sb["id"].as_str().unwrap(),
            json!({"argv": ["cat", "/marker"]}),
        )
        .await;
    assert_eq!((st, &r["stdout"]), (200, &json!(marker)), "{r}");
    assert!(
        has_image(&b, &name).await,
        "node-b does not list the image it pulled"
    );
    // The test home's image store (node-a's) keeps nothing of this test.
    let (st, e) = a
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("{G}/pulled?force=true"),
            None,
        )
        .await;
    assert_eq!(st, 204, "{e}");
    let (st, e) = a
        .call(Some(ADMIN), "DELETE", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 204, "{e}");
    eprintln!("pull-by-digest test: {:?}", t0.elapsed());
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

/// The header a node sets on a request it forwards (crates/server/src/http/forward.rs).
const FORWARDED_BY: &str = "x-moat-forwarded-by";

/// An exec streamed as NDJSON through `d`: its events, and when the first came and the last.
async fn streamed_exec(
    d: &Daemon,
    key: &str,
    path: &str,
    command: &str,
) -> (Vec<Value>, Duration, Duration) {
    let t = Instant::now();
    let resp = d
        .http
        .post(format!("{}{path}", d.url()))
        .bearer_auth(key)
        .header("accept", "application/x-ndjson")
        .json(&json!({ "command": command }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.bytes_stream();
    let (mut buf, mut events, mut first) = (Vec::new(), Vec::new(), None);
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            first.get_or_insert(t.elapsed());
            events.push(serde_json::from_slice(&line).unwrap());
        }
    }
    (events, first.unwrap(), t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Node-a serves a sandbox that runs on node-c, wholly: a streamed exec, a file of a few MiB
/// up and down, a shell over a WebSocket. The owner checks the caller's key; a request that
/// was forwarded once is never forwarded again (421); when node-c is killed, a request
/// through node-a answers a clear 502 within seconds, and after its lease the sandbox is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_a_sandbox_of_another_and_says_when_it_cannot() {
    let t0 = Instant::now();
    let pg = Postgres::start();
    let a = node(&pg, "node-a", None).await;
    let key = std::fs::read(a.home.path().join("secrets.key")).unwrap();
    let mut b = node(&pg, "node-b", Some(&key)).await;
    let mut c = node(&pg, "node-c", Some(&key)).await;
    // Packed: the sandboxes created through node-c stay there while it has room.
    a.put_group(
        "fleet",
        json!({"tier": "xs", "identity": {"enabled": true, "audiences": ["sts.amazonaws.com"]},
            "placement": {"strategy": "pack"}}),
        201,
    )
    .await;
    a.put_group("other", json!({"tier": "xs"}), 201).await;
    sandboxes_ready(&c).await;
    let sb = c.create(ADMIN, "fleet", json!({})).await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["node"], "node-c", "{sb}");
    let base = format!("{G}/fleet/sandboxes/{id}");
    let user = a.key("user", &["fleet"]).await;

    // A streamed exec: its events as they come (the first well before the end), its exit code.
    let (events, first, all) = streamed_exec(
        &a,
        &user,
        &format!("{base}/exec"),
        "echo one; sleep 1.5; echo two >&2; exit 7",
    )
    .await;
    assert_eq!(events[0], json!({"stdout": "one\n"}), "{events:?}");
    assert!(events.contains(&json!({"stderr": "two\n"})), "{events:?}");
    assert_eq!(events.last().unwrap()["exit"]["exit_code"], 7, "{events:?}");
    assert!(
        first + Duration::from_secs(1) < all,
        "not streamed: {first:?} of {all:?}"
    );
    let (st, e) = a
        .call(
            Some(&user),
            "POST",
            &format!("{base}/exec"),
            Some(json!({"command": "hostname; exit 3"})),
        )
        .await;
    assert_eq!((st, &e["exit_code"]), (200, &json!(3)), "{e}");

    // A file of 6 MiB up and down through node-a, streamed both ways, byte for byte.
    let big: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    let resp = a
        .http
        .put(format!("{}{base}/files?path=/root/big.bin", a.url()))
        .bearer_auth(&user)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let w: Value = resp.json().await.unwrap();
    assert_eq!(w["size"], big.len(), "{w}");
    let resp = a
        .http
        .get(format!("{}{base}/files?path=/root/big.bin", a.url()))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.bytes().await.unwrap();
    assert!(
        got[..] == big[..],
        "the download differs ({} bytes)",
        got.len()
    );
    // What node-c wrote is what node-c reads.
    let (st, e) = c
        .call(
            Some(&user),
            "POST",
            &format!("{base}/exec"),
            Some(json!({"command": "wc -c < /root/big.bin"})),
        )
        .await;
    assert_eq!(
        (st, e["stdout"].as_str().map(str::trim)),
        (200, Some("6291456")),
        "{e}"
    );

    // A port of the sandbox through node-a: a server started, the port exposed and the file
    // fetched through the port proxy, all forwarded.
    let (st, p) = a
        .call(
            Some(&user),
            "POST",
            &format!("{base}/processes"),
            Some(json!({"argv": ["python3", "-m", "http.server", "8080", "--directory", "/root"]})),
        )
        .await;
    assert_eq!(st, 201, "{p}");
    let (st, p) = a
        .call(
            Some(&user),
            "POST",
            &format!("{base}/ports"),
            Some(json!({"port": 8080})),
        )
        .await;
    assert_eq!(st, 201, "{p}");
    let proxied = format!("{}{base}/ports/8080/big.bin", a.url());
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let resp = a
            .http
            .get(&proxied)
            .bearer_auth(&user)
            .send()
            .await
            .unwrap();
        let st = resp.status().as_u16();
        if st == 200 {
            break resp.bytes().await.unwrap();
        }
        assert!(
            st == 502 && Instant::now() < deadline,
            "the port proxy: {st}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        got[..] == big[..],
        "the proxied file differs ({} bytes)",
        got.len()
    );

    // A shell through node-a: the WebSocket upgrade is forwarded and spliced.
    let url = format!("ws://127.0.0.1:{}{base}/shell?cols=80&rows=24", a.port);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {user}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::Binary(b"echo fw\"\"d-$((6*7))\n".to_vec().into()))
        .await
        .unwrap();
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.contains("fwd-42") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("the forwarded shell: {other:?}; output {out:?}"),
        }
    }
    ws.send(Message::Binary(b"exit 4\n".to_vec().into()))
        .await
        .unwrap();
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("no exit message: {other:?}"),
        }
    };
    assert_eq!(exit["exit_code"], 4, "{exit}");

    // The owner checks the key: a wrong one, or one of another group, gets what it would on
    // node-c itself.
    let path = format!("{base}/exec");
    let exec = json!({"argv": ["true"]});
    let (st, e) = a
        .call(
            Some("moat_NotAKeyNotAKeyNotAKeyNotAKeyNotAKey12345678"),
            "POST",
            &path,
            Some(exec.clone()),
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{e}"
    );
    let (st, e) = a.call(None, "POST", &path, Some(exec.clone())).await;
    assert_eq!(st, 401, "{e}");
    let stranger = a.key("user", &["other"]).await;
    let (st, e) = a
        .call(Some(&stranger), "POST", &path, Some(exec.clone()))
        .await;
    assert_eq!(st, 404, "{e}");
    let reader = a.key("reader", &["fleet"]).await;
    let (st, e) = a
        .call(Some(&reader), "POST", &path, Some(exec.clone()))
        .await;
    assert_eq!(st, 403, "{e}");

    // The forwarded header stops forwarding (a stale view cannot loop) and grants nothing:
    // node-a answers 421 naming node-c; node-c, the owner, serves it as any request (and
    // still checks the key).
    let with_header = |d: &Daemon, key: &str| {
        d.http
            .post(format!("{}{path}", d.url()))
            .bearer_auth(key)
            .header(FORWARDED_BY, "node-z")
            .json(&exec)
            .send()
    };
    let resp = with_header(&a, &user).await.unwrap();
    assert_eq!(resp.status(), 421);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "other_node", "{e}");
    assert!(
        msg(&e).contains("node-c") && msg(&e).contains(&c.url()),
        "{e}"
    );
    assert_eq!(with_header(&c, &user).await.unwrap().status(), 200);
    assert_eq!(with_header(&c, &stranger).await.unwrap().status(), 404);
    // Reads of the store are answered by any node, forwarded header or not.
    let (st, row) = a.call(Some(&user), "GET", &base, None).await;
    assert_eq!((st, &row["node"]), (200, &json!("node-c")), "{row}");

    // A lifecycle change through node-a: a second sandbox suspended on node-c.
    let parked = c.create(ADMIN, "fleet", json!({})).await;
    let parked = parked["id"].as_str().unwrap().to_string();
    let (st, e) = a
        .call(
            Some(&user),
            "POST",
            &format!("{G}/fleet/sandboxes/{parked}/suspend"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{e}");
    assert_eq!(a.state("fleet", &parked).await, "suspended");

    // The cost of forwarding: `true` on node-c directly, and through node-a, interleaved
    // (MOAT_FORWARD_SAMPLES times each, default 20).
    let samples: usize = std::env::var("MOAT_FORWARD_SAMPLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let mut direct = Vec::new();
    let mut forwarded = Vec::new();
    for _ in 0..samples {
        for (d, times) in [(&c, &mut direct), (&a, &mut forwarded)] {
            let t = Instant::now();
            let (st, e) = d.call(Some(&user), "POST", &path, Some(exec.clone())).await;
            times.push(t.elapsed());
            assert_eq!(st, 200, "{e}");
        }
    }
    let fastest = |v: &[Duration]| *v.iter().min().unwrap();
    let (min_direct, min_forwarded) = (fastest(&direct), fastest(&forwarded));
    let (direct, forwarded) = (median(direct), median(forwarded));
    eprintln!(
        "exec true, {samples} each: median on the owner {direct:?}, through another node \
         {forwarded:?}; fastest {min_direct:?} and {min_forwarded:?}"
    );

    // kill -9 of node-c: a request through node-a answers 502 naming node-c within seconds
    // (connection refused, or the connect timeout), and once its lease is out the sandbox is
    // lost, which node-a says itself.
    c.kill9();
    let t = Instant::now();
    let (st, e) = a.call(Some(&user), "POST", &path, Some(exec.clone())).await;
    let answered = t.elapsed();
    eprintln!("a request for node-c's sandbox answered {st} {answered:?} after its kill -9");
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (502, Some("bad_gateway")),
        "{e}"
    );
    assert!(
        msg(&e).contains("node-c") && msg(&e).contains("could not be reached"),
        "{e}"
    );
    assert!(answered < Duration::from_secs(5), "{answered:?}");
    // An identity token needs only the store: any node mints it, while its owner is down.
    let (st, tok) = a
        .call(
            Some(ADMIN),
            "POST",
            &format!("{base}/identity/token"),
            Some(json!({"audience": "sts.amazonaws.com"})),
        )
        .await;
    assert_eq!(st, 200, "{tok}");
    // Without a key that sees the sandbox, nothing about its node.
    let (st, e) = a
        .call(Some(&stranger), "POST", &path, Some(exec.clone()))
        .await;
    assert_eq!(st, 404, "{e}");
    until_node(&a, "node-c", Duration::from_secs(4 * LEASE_S), |n| {
        n["state"] == "lost"
    })
    .await;
    let (st, e) = a.call(Some(&user), "POST", &path, Some(exec.clone())).await;
    assert_eq!(st, 409, "{e}");
    assert!(msg(&e).contains("lost"), "{e}");
    // The suspended sandbox stays suspended on the lost node, which cannot be reached: a 503
    // that says so, instead of a try.
    let (st, e) = a
        .call(
            Some(&user),
            "POST",
            &format!("{G}/fleet/sandboxes/{parked}/resume"),
            None,
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{e}"
    );
    assert!(
        msg(&e).contains("node-c") && msg(&e).contains("was lost"),
        "{e}"
    );
    a.delete("fleet", &id).await;

    // SIGSTOP of node-b, which runs a sandbox: its kernel still accepts the connection and
    // nothing answers. The request through node-a waits only until node-b is declared lost,
    // then answers 503 saying so.
    sandboxes_ready(&b).await;
    let on_b = b.create(ADMIN, "fleet", json!({})).await;
    let on_b = on_b["id"].as_str().unwrap().to_string();
    // An exec already streaming through node-a when node-b stops: its answer is cut (the
    // body ends with an error, never cleanly) once node-b is declared lost, not left hanging.
    let streaming = a
        .http
        .post(format!("{}{G}/fleet/sandboxes/{on_b}/exec", a.url()))
        .bearer_auth(&user)
        .header("accept", "application/x-ndjson")
        .json(&json!({ "command": "while :; do echo tick; sleep 0.2; done" }))
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status(), 200);
    let mut streaming = streaming.bytes_stream();
    let first = streaming.next().await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&first).contains("tick"),
        "{first:?}"
    );
    let pid = nix::unistd::Pid::from_raw(b.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t = Instant::now();
    let cut = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(6 * LEASE_S), streaming.next()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) => return Ok(t.elapsed()),
                Ok(None) => return Err("the stream ended cleanly, as if the exec had".to_string()),
                Err(_) => return Err(format!("the stream still hangs after {:?}", t.elapsed())),
            }
        }
    });
    let (st, e) = a
        .call(
            Some(&user),
            "POST",
            &format!("{G}/fleet/sandboxes/{on_b}/exec"),
            Some(exec.clone()),
        )
        .await;
    let answered = t.elapsed();
    eprintln!("a request for stopped node-b's sandbox answered {st} after {answered:?}");
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{e}"
    );
    assert!(
        msg(&e).contains("node-b") && msg(&e).contains("declared lost"),
        "{e}"
    );
    assert!(answered < Duration::from_secs(4 * LEASE_S), "{answered:?}");
    let cut = cut.await.unwrap().unwrap();
    eprintln!("the exec streaming from stopped node-b was cut after {cut:?}");
    assert!(cut < Duration::from_secs(4 * LEASE_S), "{cut:?}");
    b.kill9();
    eprintln!("whole forwarding test: {:?}", t0.elapsed());
}

/// A CA, and a certificate for 127.0.0.1 it signed, with its key: PEM each (rcgen).
fn tls_chain() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "moat fleet test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

/// A node started by hand (the test kit speaks plain HTTP): killed, with its VMs, when dropped.
struct HandNode {
    child: std::process::Child,
    home: tempfile::TempDir,
}

impl Drop for HandNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in common::qemu_processes(&self.home.path().display().to_string()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A node whose advertised URL is https is forwarded to over TLS, verified: a node given the
/// fleet's CA (`--ca-file`) reaches it, one with the public roots only is refused with a 502
/// that says why, and a bad `--ca-file` stops a node at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_to_an_https_node_verifies_its_certificate() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_chain();
    let path = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (ca_file, cert_file, key_file) = (
        path("ca.pem", &ca),
        path("cert.pem", &cert),
        path("key.pem", &key),
    );
    let lease = LEASE_S.to_string();
    let a = Daemon::start_at(
        home_with_key(None),
        Some(ADMIN),
        &[
            "--store",
            &pg.url,
            "--node-name",
            "node-a",
            "--lease-s",
            &lease,
            "--ca-file",
            &ca_file,
        ],
    )
    .await;
    let sealing = std::fs::read(a.home.path().join("secrets.key")).unwrap();
    let b = node(&pg, "node-b", Some(&sealing)).await;

    let home = home_with_key(Some(&sealing));
    let port = common::daemon::free_port();
    let err = std::fs::File::create(home.path().join("serve.err")).unwrap();
    let child = moat()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--store",
            &pg.url,
            "--node-name",
            "node-c",
            "--lease-s",
            &lease,
        ])
        .args(["--tls-cert", &cert_file, "--tls-key", &key_file])
        .env("MOAT_HOME", home.path())
        .env("MOAT_AGENT", common::agent_path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let c = HandNode { child, home };
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .build()
        .unwrap();
    let c_url = format!("https://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let h = match https.get(format!("{c_url}/healthz")).send().await {
            Ok(r) => r.json::<Value>().await.unwrap(),
            Err(_) => Value::Null,
        };
        if h["sandboxes"]["state"] == "ready" {
            break;
        }
        let log = std::fs::read_to_string(c.home.path().join("serve.err")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "node-c never got ready: {h} {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(node_row(&a, "node-c").await["advertise_url"], c_url);

    a.put_group("fleet", json!({"tier": "xs"}), 201).await;
    let resp = https
        .post(format!("{c_url}{G}/fleet/sandboxes"))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let sb: Value = resp.json().await.unwrap();
    let id = sb["id"].as_str().unwrap().to_string();
    let path = format!("{G}/fleet/sandboxes/{id}/exec");
    let exec = json!({"command": "echo over-tls"});

    let (st, e) = a.call(Some(ADMIN), "POST", &path, Some(exec.clone())).await;
    assert_eq!((st, e["stdout"].as_str()), (200, Some("over-tls\n")), "{e}");
    let (st, e) = b.call(Some(ADMIN), "POST", &path, Some(exec)).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (502, Some("bad_gateway")),
        "{e}"
    );
    assert!(
        msg(&e).contains("node-c") && msg(&e).contains("certificate"),
        "{e}"
    );
    a.delete("fleet", &id).await;

    let out = moat()
        .args(["serve", "--no-setup", "--listen", "127.0.0.1:0"])
        .args(["--ca-file", &cert_file.replace("cert.pem", "missing.pem")])
        .env("MOAT_HOME", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--ca-file (MOAT_CA_FILE)"), "{err}");
    drop(c);
}
