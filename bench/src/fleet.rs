//! `moat-bench fleet [N]`: creates per second through one node of a fleet of three against a
//! fleet of one (docs/FLEET.md, "Placement"). Each fleet runs on a throwaway PostgreSQL of its
//! own (scripts/postgres.sh); N tier xs creates (default 12), four at a time, all sent to the
//! first node, which places them (spread: across the three nodes, or on itself alone), then
//! deleted. On one host the nodes share its CPUs, so the figure is what placement and
//! forwarding cost and how creates spread, not the throughput of three machines.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::daemon::{percentile, Daemon};
use crate::forward::{ready, Postgres};

/// Creates in flight at once.
const CONCURRENCY: usize = 4;

/// `n` creates through the first of `nodes` nodes: creates per second, latency and where
/// they ran. The nodes are stopped (their VMs destroyed) whatever happened.
async fn run(moat: &Path, home: &Path, agent: &Path, nodes: usize, n: usize) -> Result<Value> {
    let (_pg, url) = Postgres::start()?;
    let mut fleet: Vec<Daemon> = Vec::new();
    let mut started = Ok(());
    for i in 0..nodes {
        let name = format!("bench-{i}");
        let args = ["--store", &url, "--node-name", &name];
        let sealing = match fleet.first() {
            Some(first) => match std::fs::read(first.home().join("secrets.key")) {
                Ok(k) => Some(k),
                Err(e) => {
                    started = Err(anyhow::Error::new(e).context("the sealing key"));
                    break;
                }
            },
            None => None,
        };
        match Daemon::start_sealed(moat, home, agent, &args, sealing.as_deref()).await {
            Ok(d) => fleet.push(d),
            Err(e) => {
                started = Err(e);
                break;
            }
        }
    }
    let mut ids = Vec::new();
    let result = match started {
        Ok(()) => creates(&fleet, n, &mut ids).await,
        Err(e) => Err(e),
    };
    // Each through the first node, forwarded to its own: a node destroys the VMs of a group
    // deleted elsewhere only at its next lease renewal, later than it is stopped here.
    for id in &ids {
        let _ = fleet[0].delete("fleet", id).await;
    }
    for d in fleet {
        d.stop(&["fleet"]).await?;
    }
    result
}

/// The creates; the id of each sandbox made goes into `ids`, also when a later one fails.
async fn creates(fleet: &[Daemon], n: usize, ids: &mut Vec<String>) -> Result<Value> {
    for d in fleet {
        ready(d).await?;
    }
    let first = &fleet[0];
    first
        .ok(
            "PUT",
            "/v1/sandbox-groups/fleet",
            Some(json!({"tier": "xs"})),
        )
        .await?;
    let t0 = Instant::now();
    let created: Vec<Result<(f64, Value)>> = futures_util::stream::iter(0..n)
        .map(|_| async move {
            let t = Instant::now();
            let sb = first
                .ok(
                    "POST",
                    "/v1/sandbox-groups/fleet/sandboxes",
                    Some(json!({})),
                )
                .await?;
            Ok((crate::ms(t.elapsed()), sb))
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let wall = t0.elapsed().as_secs_f64();
    let mut times = Vec::new();
    let mut per_node: BTreeMap<String, u64> = BTreeMap::new();
    for c in created.iter().flatten() {
        ids.extend(c.1["id"].as_str().map(str::to_string));
    }
    for c in created {
        // The daemons' homes go with them: their logs say what a 500 was.
        let (ms, sb) = c.map_err(|e| {
            let logs: Vec<String> = fleet
                .iter()
                .map(|d| std::fs::read_to_string(d.home().join("serve.log")).unwrap_or_default())
                .collect();
            e.context(format!("the nodes' logs:\n{}", logs.join("\n---\n")))
        })?;
        times.push(ms);
        *per_node
            .entry(sb["node"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    Ok(json!({
        "creates_per_s": ((n as f64 / wall) * 100.0).round() / 100.0,
        "create_p50_ms": percentile(&times, 0.5),
        "create_max_ms": percentile(&times, 1.0),
        "per_node": per_node,
    }))
}

pub async fn measure(moat: &Path, home: &Path, agent: &Path, n: usize) -> Result<Value> {
    let one = run(moat, home, agent, 1, n).await?;
    let three = run(moat, home, agent, 3, n).await?;
    Ok(json!({
        "fleet_creates": n,
        "fleet_concurrency": CONCURRENCY,
        "fleet_one_node": one,
        "fleet_three_nodes": three,
    }))
}
