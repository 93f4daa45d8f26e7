//! Suspended sandboxes on shared storage (docs/FLEET.md, "Shared storage"): nodes started
//! with one `--shared-dir` write their suspends there, standalone; when a node is killed, a
//! resume through another node takes its suspended sandbox over and continues it there with
//! its files, memory and processes; a node without the shared directory leaves its suspended
//! sandboxes stranded, and the answer says so; a draining node hands its suspended sandboxes
//! to a node that can read them. A snapshot on the shared storage forks on another node once
//! its node is gone. Real VMs (tier xs) and a throwaway PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{msg, Daemon, ADMIN, G};
use common::fleet::{node_row, sandboxes_ready, start_node};
use moat_testkit::postgres::Postgres;
use serde_json::{json, Value};

const LEASE_S: u64 = 5;

async fn node(pg: &Postgres, name: &str, key: Option<&[u8]>, shared: Option<&str>) -> Daemon {
    let extra = match shared {
        Some(dir) => vec!["--shared-dir", dir],
        None => vec![],
    };
    start_node(pg, name, key, LEASE_S, &extra).await
}

async fn until_lost(d: &Daemon, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(4 * LEASE_S);
    while node_row(d, name).await["state"] != "lost" {
        assert!(Instant::now() < deadline, "node {name} never got lost");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Bytes allocated under `path`.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .unwrap()
        .flatten()
        .map(|e| allocated(&e.path()))
        .sum::<u64>()
}

async fn snapshot(d: &Daemon, id: &str, name: &str) {
    let (st, v) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/fleet/sandboxes/{id}/snapshots"),
            Some(json!({ "name": name })),
        )
        .await;
    assert_eq!(st, 201, "{v}");
}

/// The newest suspend directory of `id` under the shared directory.
fn shared_suspend(shared: &std::path::Path, id: &str) -> std::path::PathBuf {
    let root = shared.join("suspended").join(id);
    let mut dirs: Vec<u64> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    dirs.sort();
    root.join(dirs.last().expect("a suspend directory").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_suspended_sandbox_resumes_on_another_node_from_shared_storage() {
    let t0 = Instant::now();
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let dir = shared.path().to_str().unwrap();
    let a = node(&pg, "node-a", None, Some(dir)).await;
    let key = std::fs::read(a.home.path().join("secrets.key")).unwrap();
    let mut b = node(&pg, "node-b", Some(&key), None).await;
    let mut c = node(&pg, "node-c", Some(&key), Some(dir)).await;
    a.put_group("fleet", json!({"tier": "xs"}), 201).await;

    // On node-c: a file on disk and a background process (memory state); suspended.
    sandboxes_ready(&c).await;
    let sb = c.create(ADMIN, "fleet", json!({})).await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["node"], "node-c");
    let pid = c
        .sh(
            "fleet",
            &id,
            "echo on-disk > /root/kept; sleep 100000 >/dev/null 2>&1 & echo $!",
        )
        .await;
    snapshot(&c, &id, "snap").await;
    let snap_disk = std::fs::read(shared.path().join("snapshots/fleet/snap/disk.qcow2")).unwrap();
    assert_eq!(
        &snap_disk[8..16],
        &[0u8; 8],
        "a shared snapshot's disk has no backing file"
    );
    let (st, v, took) = c.lifecycle("fleet", &id, "suspend").await;
    assert_eq!(st, 200, "{v}");
    eprintln!("suspend to the shared directory: {took:?} (TCG)");
    // Standalone: the disk has no backing file, the memory image no template RAM.
    let files = shared_suspend(shared.path(), &id);
    let disk = std::fs::read(files.join("disk.qcow2")).unwrap();
    assert_eq!(&disk[..4], b"QFI\xfb");
    assert_eq!(
        &disk[8..16],
        &[0u8; 8],
        "a shared suspend's disk has no backing file"
    );
    let meta: Value =
        serde_json::from_slice(&std::fs::read(files.join("meta.json")).unwrap()).unwrap();
    assert!(meta.get("ram_base").is_none(), "{meta}");
    assert!(!c.home.path().join("suspended").join(&id).exists());

    // On node-b (no shared directory): a suspended sandbox whose files are on its disk.
    sandboxes_ready(&b).await;
    let local = b.create(ADMIN, "fleet", json!({})).await;
    let local = local["id"].as_str().unwrap().to_string();
    snapshot(&b, &local, "local-snap").await;
    let (st, v, _) = b.lifecycle("fleet", &local, "suspend").await;
    assert_eq!(st, 200, "{v}");
    let local_files = b.home.path().join("suspended").join(&local);
    eprintln!(
        "allocated on disk: a shared (standalone) suspend {} MiB, a local one {} MiB",
        allocated(&files) >> 20,
        allocated(&local_files) >> 20
    );

    // Through node-a, while node-c lives, the resume is forwarded to node-c (not taken over).
    c.kill9();
    b.kill9();
    let killed = Instant::now();
    until_lost(&a, "node-c").await;
    until_lost(&a, "node-b").await;
    eprintln!(
        "node-b and node-c lost {:?} after kill -9",
        killed.elapsed()
    );

    // node-b's sandbox cannot be resumed elsewhere: its node's view counts it, and the
    // answer says why.
    let row = node_row(&a, "node-b").await;
    assert_eq!(row["shared_storage"], false, "{row}");
    assert_eq!(row["suspended_local"], 1, "{row}");
    let row = node_row(&a, "node-c").await;
    assert_eq!(row["shared_storage"], true, "{row}");
    assert_eq!(row["suspended_local"], 0, "{row}");
    let (st, e, _) = a.lifecycle("fleet", &local, "resume").await;
    assert_eq!(st, 503, "{e}");
    assert!(msg(&e).contains("cannot be resumed on another node"), "{e}");
    assert!(msg(&e).contains("without --shared-dir"), "{e}");
    let (st, e) = a
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/fleet/sandboxes/{id}/exec"),
            Some(json!({"argv": ["true"]})),
        )
        .await;
    assert_eq!(st, 503, "{e}");
    assert!(msg(&e).contains("resume it"), "{e}");
    // A stranger learns nothing.
    let other = a.key("user", &["other"]).await;
    let (st, _) = a
        .call(
            Some(&other),
            "POST",
            &format!("{G}/fleet/sandboxes/{id}/resume"),
            None,
        )
        .await;
    assert_eq!(st, 404);
    assert_eq!(a.get("fleet", &id).await.unwrap()["node"], "node-c");

    // node-c's resumes on node-a: its files, its memory and its process.
    sandboxes_ready(&a).await;
    let (st, v, took) = a.lifecycle("fleet", &id, "resume").await;
    assert_eq!(st, 200, "{v}");
    eprintln!("resume from the shared directory on another node: {took:?} (TCG)");
    assert_eq!(v["node"], "node-a", "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(a.sh("fleet", &id, "cat /root/kept").await, "on-disk");
    assert_eq!(
        a.sh("fleet", &id, &format!("kill -0 {pid} && echo alive"))
            .await,
        "alive"
    );

    // node-c's snapshot forks on node-a; node-b's cannot, and the answer says why.
    let fork = a
        .create(ADMIN, "fleet", json!({"from_snapshot": "snap"}))
        .await;
    assert_eq!(fork["node"], "node-a", "{fork}");
    let fork = fork["id"].as_str().unwrap().to_string();
    assert_eq!(a.sh("fleet", &fork, "cat /root/kept").await, "on-disk");
    a.delete("fleet", &fork).await;
    let (st, e) = a
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/fleet/sandboxes"),
            Some(json!({"from_snapshot": "local-snap"})),
        )
        .await;
    assert_eq!(st, 503, "{e}");
    assert!(
        msg(&e).contains("own disk") && msg(&e).contains("node-b"),
        "{e}"
    );

    // Drain: node-a hands its suspended sandbox to node-d, the other node with the share.
    let d = node(&pg, "node-d", Some(&key), Some(dir)).await;
    let (st, v, _) = a.lifecycle("fleet", &id, "suspend").await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = a
        .call(Some(ADMIN), "POST", "/v1/nodes/node-a/drain", None)
        .await;
    assert_eq!(st, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.get("fleet", &id).await.unwrap()["node"] != "node-d" {
        assert!(Instant::now() < deadline, "the drain never handed it over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Resumed through the drained node: forwarded to node-d, which runs it.
    sandboxes_ready(&d).await;
    let (st, v, _) = a.lifecycle("fleet", &id, "resume").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["node"], "node-d", "{v}");
    assert_eq!(d.sh("fleet", &id, "cat /root/kept").await, "on-disk");
    d.delete("fleet", &id).await;
    assert!(!shared.path().join("suspended").join(&id).exists());
    eprintln!("whole shared-storage test: {:?}", t0.elapsed());
}

#[tokio::test]
async fn a_bad_shared_dir_stops_the_daemon_with_what_is_wrong() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let missing = "/nonexistent/moat-shared";
    for (dir, want) in [
        (missing, "cannot be read"),
        (file.path().to_str().unwrap(), "is not a directory"),
    ] {
        let home = tempfile::tempdir().unwrap();
        let o = common::daemon::moat()
            .env("MOAT_HOME", home.path())
            .args([
                "serve",
                "--no-setup",
                "--listen",
                "127.0.0.1:0",
                "--shared-dir",
                dir,
            ])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--shared-dir") && err.contains(want), "{err}");
    }
}
