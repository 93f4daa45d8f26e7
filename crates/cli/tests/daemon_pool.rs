//! Warm pools through the daemon: real `moat serve`, real VMs. Every JSON response is checked
//! against the daemon's OpenAPI document (the fixture does it).

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, ADMIN, G};
use serde_json::json;

/// Waits until the group's pool has `n` ready VMs.
async fn pool_ready(d: &Daemon, group: &str, n: usize) {
    let series = format!("moat_pool_ready{{group=\"{group}\"}}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = d.metric(&series).await.unwrap_or(0.0) as usize;
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool {group} stuck at {got}, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn qemus(d: &Daemon) -> Vec<u32> {
    let mut v = common::qemu_processes(&d.home.path().display().to_string());
    v.sort();
    v
}

/// Waits until the daemon has `n` QEMUs (a VM leaves the pool before its QEMU is gone).
async fn wait_qemus(d: &Daemon, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemus(d).len() != n {
        assert!(
            Instant::now() < deadline,
            "{} QEMUs, want {n}",
            qemus(d).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_hands_over_refills_resizes_and_stays_hidden() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s", "pool": {"size": 2}}), 201)
        .await;
    pool_ready(&d, "web", 2).await;
    assert_eq!(qemus(&d).len(), 2, "two pool VMs");
    // The group says so too.
    let (st, g) = d.call(Some(ADMIN), "GET", &format!("{G}/web"), None).await;
    assert_eq!((st, &g["status"]), (200, &json!({"pool_ready": 2})), "{g}");

    // Pool members are not sandboxes.
    let (_, l) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/sandboxes"), None)
        .await;
    assert_eq!(l["sandboxes"], json!([]), "{l}");

    // A create is a hand-over: the request's env and labels, its own hostname and entropy.
    let a = d
        .create(
            ADMIN,
            "web",
            json!({"env": {"X": "from-request"}, "labels": {"app": "a"}}),
        )
        .await;
    assert_eq!(a["labels"]["app"], "a");
    let a_id = a["id"].as_str().unwrap();
    assert_eq!(d.sh("web", a_id, "echo $X").await, "from-request");
    assert_eq!(d.sh("web", a_id, "hostname").await, a_id);
    assert_eq!(
        d.metric("moat_pool_hits_total{group=\"web\"}").await,
        Some(1.0)
    );
    let b = d.create(ADMIN, "web", json!({})).await;
    let b_id = b["id"].as_str().unwrap();
    let rand = "head -c 16 /dev/urandom | od -An -tx1";
    assert_ne!(
        d.sh("web", a_id, rand).await,
        d.sh("web", b_id, rand).await,
        "siblings from one pool share their entropy"
    );
    let (_, l) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/sandboxes"), None)
        .await;
    assert_eq!(l["sandboxes"].as_array().unwrap().len(), 2, "{l}");

    // The pool refills to 2 in the background: 2 sandboxes + 2 pool VMs.
    pool_ready(&d, "web", 2).await;
    wait_qemus(&d, 4).await;

    // Three creates at once: two hand-overs, one template restore (a miss).
    let creates = (0..3).map(|_| d.create(ADMIN, "web", json!({})));
    let made = futures_util::future::join_all(creates).await;
    assert_eq!(made.len(), 3);
    assert_eq!(
        d.metric("moat_pool_hits_total{group=\"web\"}").await,
        Some(4.0)
    );
    assert_eq!(
        d.metric("moat_pool_misses_total{group=\"web\"}").await,
        Some(1.0)
    );
    for sb in &made {
        d.delete("web", sb["id"].as_str().unwrap()).await;
    }
    pool_ready(&d, "web", 2).await;

    // Metrics: hit and miss latencies, sandboxes by state, exec latency.
    let (_, text) = d.call(None, "GET", "/metrics", None).await;
    let text = text.as_str().unwrap();
    for needle in [
        "moat_sandbox_create_duration_seconds_count{pool=\"hit\"} 4",
        "moat_sandbox_create_duration_seconds_count{pool=\"miss\"} 1",
        "moat_sandboxes{state=\"running\"} 2",
        "moat_sandboxes{state=\"suspended\"} 0",
        "# TYPE moat_exec_duration_seconds histogram",
        "moat_memory_mib{kind=\"used\"} 4096",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }

    // Shrink, grow, then delete the group: the pool follows.
    d.put_group("web", json!({"tier": "s", "pool": {"size": 1}}), 200)
        .await;
    pool_ready(&d, "web", 1).await;
    wait_qemus(&d, 3).await;
    d.put_group("web", json!({"tier": "s", "pool": {"size": 0}}), 200)
        .await;
    pool_ready(&d, "web", 0).await;
    let (_, l) = d.call(Some(ADMIN), "GET", G, None).await;
    assert_eq!(l["groups"][0]["status"], json!({"pool_ready": 0}), "{l}");
    wait_qemus(&d, 2).await;
    d.put_group("web", json!({"tier": "s", "pool": {"size": 1}}), 200)
        .await;
    pool_ready(&d, "web", 1).await;

    // A draining node takes no creates, so it keeps no pool; undrained, it refills.
    let (_, nodes) = d.call(Some(ADMIN), "GET", "/v1/nodes", None).await;
    let node = nodes["nodes"][0]["name"].as_str().unwrap().to_string();
    let (st, _) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("/v1/nodes/{node}/drain"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    pool_ready(&d, "web", 0).await;
    wait_qemus(&d, 2).await;
    let (st, _) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("/v1/nodes/{node}/undrain"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    pool_ready(&d, "web", 1).await;

    let (st, _) = d
        .call(Some(ADMIN), "DELETE", &format!("{G}/web?force=true"), None)
        .await;
    assert_eq!(st, 204);
    assert!(qemus(&d).is_empty(), "VMs left: {:?}", qemus(&d));
    assert!(
        std::fs::read_dir(d.home.path().join("run"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("sb-")),
        "run directories left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_survives_kill9_and_restarts() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s", "pool": {"size": 2}}), 201)
        .await;
    pool_ready(&d, "web", 2).await;
    let before = qemus(&d);
    assert_eq!(before.len(), 2);

    d.kill9();
    d.spawn(Some(ADMIN)).await;
    pool_ready(&d, "web", 2).await;
    // The same VMs, re-adopted: none destroyed, none leaked.
    assert_eq!(qemus(&d), before);
    let (_, l) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/sandboxes"), None)
        .await;
    assert_eq!(l["sandboxes"], json!([]), "{l}");
    let sb = d.create(ADMIN, "web", json!({})).await;
    let id = sb["id"].as_str().unwrap();
    assert_eq!(
        d.metric("moat_pool_hits_total{group=\"web\"}").await,
        Some(1.0)
    );
    assert_eq!(d.sh("web", id, "echo ok").await, "ok");
    pool_ready(&d, "web", 2).await;
    wait_qemus(&d, 3).await;

    // A graceful stop leaves the pool VMs to the next daemon too.
    let before = qemus(&d);
    d.terminate();
    d.spawn(Some(ADMIN)).await;
    pool_ready(&d, "web", 2).await;
    assert_eq!(qemus(&d), before);
    assert_eq!(d.sh("web", id, "echo ok").await, "ok");
}
