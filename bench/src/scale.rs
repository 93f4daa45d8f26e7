//! The scale run (`moat-bench scale [N]`): N sandboxes of tier xs from one template in one
//! daemon, as issue 10 asks of a 24 GiB, 2-core host (N = 200 by default). It reports what a
//! sandbox costs the host once many exist: create→first exec p50/p99, the largest N admitted
//! (a 429 ends the creates), that every sandbox still answers, host memory per sandbox (PSS and
//! the fall of MemAvailable), the idle CPU of all QEMUs once parked, and the disk a suspended
//! sandbox takes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::daemon::{percentile, Daemon};

const GROUP: &str = "scale";
/// Sandboxes suspended at the end to measure their disk bytes.
const SUSPENDED: usize = 3;

pub async fn measure(moat: &Path, home: &Path, agent: &Path, n: usize) -> Result<Value> {
    // Parked sandboxes hold no CPU share: a short park delay lets the creates go on while
    // the earlier sandboxes give theirs back.
    let d = Daemon::start(moat, home, agent, &["--park-after", "2"]).await?;
    let result = run(&d, n).await;
    d.stop(&[GROUP]).await?;
    result
}

async fn run(d: &Daemon, n: usize) -> Result<Value> {
    d.ok(
        "PUT",
        &format!("/v1/sandbox-groups/{GROUP}"),
        Some(json!({"tier": "xs"})),
    )
    .await?;
    // The template first (built if missing), outside the figures.
    let (_, id) = d.create_and_exec(GROUP).await?;
    d.delete(GROUP, &id).await?;

    let available_before = mem_available_mib()?;
    let mut ids = Vec::new();
    let mut creates = Vec::new();
    let mut refusal = Value::Null;
    let started = Instant::now();
    for _ in 0..n {
        match d.try_create_and_exec(GROUP).await? {
            Ok((ms, id)) => {
                creates.push(ms);
                ids.push(id);
            }
            Err(e) => {
                refusal = e;
                break;
            }
        }
    }
    let all_created_s = started.elapsed().as_secs_f64();
    if ids.is_empty() {
        bail!("no sandbox was admitted: {refusal}");
    }

    // Every one answers (which also continues the parked ones).
    let mut failures = 0;
    for id in &ids {
        if d.exec(GROUP, id).await.is_err() {
            failures += 1;
        }
    }

    // Idle: wait until all are parked, then the CPU of every QEMU of this daemon over 10 s.
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.metric("moat_vms_parked").await? < ids.len() as f64 {
        if Instant::now() > deadline {
            bail!("the sandboxes never all parked");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let qemus = qemu_pids(d.home());
    let t0 = cpu_ticks(&qemus);
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let t1 = cpu_ticks(&qemus);
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let idle_cpu_pct = (t1 - t0) as f64 / hz / window.as_secs_f64() * 100.0;

    let pss_mib = d.metric("moat_memory_mib{kind=\"pss\"}").await?;
    let available_after = mem_available_mib()?;
    let count = ids.len() as f64;

    // A few suspends: the disk each suspended sandbox takes.
    let mut suspended_bytes = Vec::new();
    for id in ids.iter().take(SUSPENDED) {
        d.ok(
            "POST",
            &format!("/v1/sandbox-groups/{GROUP}/sandboxes/{id}/suspend"),
            None,
        )
        .await?;
        suspended_bytes.push(dir_bytes(&d.home().join("suspended").join(id)) as f64);
    }

    let round = |v: f64| (v * 100.0).round() / 100.0;
    Ok(json!({
        "scale_tier": "xs",
        "scale_requested": n,
        "scale_admitted": ids.len(),
        "scale_refusal": refusal,
        "scale_all_created_s": round(all_created_s),
        "scale_create_to_first_exec_p50_ms": percentile(&creates, 0.5),
        "scale_create_to_first_exec_p99_ms": percentile(&creates, 0.99),
        "scale_exec_failures": failures,
        "scale_pss_mib_per_sandbox": round(pss_mib / count),
        "scale_host_mem_available_drop_mib_per_sandbox":
            round((available_before as f64 - available_after as f64) / count),
        "scale_idle_parked_cpu_pct_total": round(idle_cpu_pct),
        "scale_idle_parked_cpu_pct_per_sandbox": (idle_cpu_pct / count * 1000.0).round() / 1000.0,
        "scale_suspended_bytes_each": crate::median(suspended_bytes),
    }))
}

fn mem_available_mib() -> Result<u64> {
    moat_vm::qemu::host_meminfo_mib("MemAvailable").context("MemAvailable in /proc/meminfo")
}

/// The QEMUs of this daemon's sandboxes, from their run directories' records.
fn qemu_pids(home: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(home.join("run")) else {
        return Vec::new();
    };
    dir.filter_map(|e| moat_vm::SandboxRecord::load(&e.ok()?.path()).ok())
        .map(|r| r.pid)
        .collect()
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| crate::proc_usage(*p).ok().map(|(_, t)| t))
        .sum()
}

fn dir_bytes(dir: &Path) -> u64 {
    // Allocated blocks, not lengths: the memory image is sparse.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}
