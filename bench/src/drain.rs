//! `moat-bench drain [ROUNDS]`: live migration between two daemons (docs/FLEET.md, "Live
//! migration between nodes"). Two nodes on a throwaway PostgreSQL; an idle and a busy (it
//! rewrites 64 MiB of tmpfs without end) tier xs sandbox on one; that node is drained, which
//! moves both to the other, then the other is drained to move them back, ROUNDS times
//! (default 3). Each move's pause (QEMU's downtime to the hand-over's answer) and total time
//! are as the draining node reports them in `GET /v1/nodes/{node}`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::daemon::{percentile, Daemon};
use crate::forward::{ready, Postgres};

const BUSY: &str = "while :; do head -c 64M /dev/urandom > /dev/shm/churn; done";

/// Drains `from` until it reports done, then undrains it; its moves.
async fn drain(d: &Daemon, from: &str) -> Result<Vec<Value>> {
    d.ok("POST", &format!("/v1/nodes/{from}/drain"), None)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let progress = loop {
        let n = d.ok("GET", &format!("/v1/nodes/{from}"), None).await?;
        if n["drain"]["done"] == true {
            break n["drain"].clone();
        }
        if Instant::now() > deadline {
            bail!("the drain of {from} did not end: {n}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if progress["failed"] != json!([]) {
        bail!("the drain of {from} could not move everything: {progress}");
    }
    d.ok("POST", &format!("/v1/nodes/{from}/undrain"), None)
        .await?;
    Ok(progress["moved"].as_array().cloned().unwrap_or_default())
}

pub async fn measure(moat: &Path, home: &Path, agent: &Path, rounds: usize) -> Result<Value> {
    let (_pg, url) = Postgres::start()?;
    let a = Daemon::start(
        moat,
        home,
        agent,
        &["--store", &url, "--node-name", "bench-a"],
    )
    .await?;
    let sealing = std::fs::read(a.home().join("secrets.key")).context("node a's secrets.key")?;
    let args = ["--store", &url, "--node-name", "bench-b"];
    let b = Daemon::start_sealed(moat, home, agent, &args, Some(&sealing)).await?;
    ready(&a).await?;
    ready(&b).await?;
    // Packed, so that both sandboxes start on node a (placement would spread them).
    a.ok(
        "PUT",
        "/v1/sandbox-groups/mig",
        Some(json!({"tier": "xs", "placement": {"strategy": "pack"}})),
    )
    .await?;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let sb = a
            .ok("POST", "/v1/sandbox-groups/mig/sandboxes", Some(json!({})))
            .await?;
        ids.push(sb["id"].as_str().context("id")?.to_string());
    }
    let busy = ids[1].clone();
    a.ok(
        "POST",
        &format!("/v1/sandbox-groups/mig/sandboxes/{busy}/processes"),
        Some(json!({"argv": ["sh", "-c", BUSY]})),
    )
    .await?;
    let (mut idle_pause, mut idle_total, mut busy_pause, mut busy_total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let from = if round % 2 == 0 { "bench-a" } else { "bench-b" };
        for m in drain(&a, from).await? {
            let (pause, total) = (
                m["pause_ms"].as_f64().context("pause_ms")?,
                m["total_ms"].as_f64().context("total_ms")?,
            );
            if m["sandbox"] == json!(busy) {
                busy_pause.push(pause);
                busy_total.push(total);
            } else {
                idle_pause.push(pause);
                idle_total.push(total);
            }
        }
    }
    // Deleted through a (forwarded to the node that runs each) while both nodes run: a VM
    // that migrated to b would outlive b's daemon, as every detached VM does.
    for id in &ids {
        a.ok(
            "DELETE",
            &format!("/v1/sandbox-groups/mig/sandboxes/{id}"),
            None,
        )
        .await?;
    }
    b.stop(&[]).await?;
    a.stop(&["mig"]).await?;
    if idle_pause.len() != rounds || busy_pause.len() != rounds {
        bail!(
            "each drain should have moved both sandboxes: {} idle and {} busy moves in {rounds} \
             rounds",
            idle_pause.len(),
            busy_pause.len()
        );
    }
    let p50 = |v: &[f64]| percentile(v, 0.5);
    Ok(json!({
        "drain_rounds": rounds,
        "drain_idle_pause_p50_ms": p50(&idle_pause),
        "drain_idle_total_p50_ms": p50(&idle_total),
        "drain_busy_pause_p50_ms": p50(&busy_pause),
        "drain_busy_total_p50_ms": p50(&busy_total),
        "drain_idle_pause_ms": idle_pause,
        "drain_busy_pause_ms": busy_pause,
        "drain_idle_total_ms": idle_total,
        "drain_busy_total_ms": busy_total,
    }))
}
