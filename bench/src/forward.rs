//! `moat-bench forward [N]`: what forwarding costs (docs/FLEET.md, Forwarding). Two nodes on
//! a throwaway PostgreSQL (scripts/postgres.sh), a tier xs sandbox on one, and `exec true`
//! sent N times (default 20) to its node and N times through the other, interleaved.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::daemon::{percentile, Daemon};

/// A PostgreSQL of `scripts/postgres.sh`, stopped when dropped.
pub(crate) struct Postgres {
    dir: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh")
}

impl Postgres {
    pub(crate) fn start() -> Result<(Postgres, String)> {
        let dir = std::env::temp_dir().join(format!("moat-bench-pg-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let pg = Postgres { dir };
        let out = Command::new(script())
            .arg("start")
            .arg(&pg.dir)
            .output()
            .context("running scripts/postgres.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/postgres.sh start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let url = String::from_utf8(out.stdout)?.trim().to_string();
        Ok((pg, url))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded) until `d` can run sandboxes.
pub(crate) async fn ready(d: &Daemon) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, h) = d.call("GET", "/healthz", None).await?;
        if h["sandboxes"]["state"] == "ready" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the node's sandboxes never got ready: {h}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn measure(moat: &Path, home: &Path, agent: &Path, n: usize) -> Result<Value> {
    let (_pg, url) = Postgres::start()?;
    let a = Daemon::start(
        moat,
        home,
        agent,
        &["--store", &url, "--node-name", "bench-a"],
    )
    .await?;
    let sealing = std::fs::read(a.home().join("secrets.key")).context("node a's secrets.key")?;
    let args = ["--store", &url, "--node-name", "bench-c"];
    let c = Daemon::start_sealed(moat, home, agent, &args, Some(&sealing)).await?;
    ready(&c).await?;
    c.ok("PUT", "/v1/sandbox-groups/fwd", Some(json!({"tier": "xs"})))
        .await?;
    let sb = c
        .ok("POST", "/v1/sandbox-groups/fwd/sandboxes", Some(json!({})))
        .await?;
    let id = sb["id"].as_str().context("id")?.to_string();
    // Connections opened and pools warm before the first timed call.
    c.exec("fwd", &id).await?;
    a.exec("fwd", &id).await?;
    let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
    for _ in 0..n {
        for (d, times) in [(&c, &mut direct), (&a, &mut forwarded)] {
            let t = Instant::now();
            d.exec("fwd", &id).await?;
            times.push(crate::ms(t.elapsed()));
        }
    }
    let direct_p50 = percentile(&direct, 0.5);
    let forwarded_p50 = percentile(&forwarded, 0.5);
    c.stop(&["fwd"]).await?;
    a.stop(&[]).await?;
    Ok(json!({
        "forward_samples": n,
        "forward_exec_direct_p50_ms": direct_p50,
        "forward_exec_forwarded_p50_ms": forwarded_p50,
        "forward_exec_overhead_p50_ms": ((forwarded_p50 - direct_p50) * 100.0).round() / 100.0,
        "forward_exec_direct_min_ms": percentile(&direct, 0.0),
        "forward_exec_forwarded_min_ms": percentile(&forwarded, 0.0),
    }))
}
