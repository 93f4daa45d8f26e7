//! Live migration of a running xs sandbox to a second QEMU on this host (a second runtime
//! with a home of its own, as a second node would be) over a Unix socket pair per stream:
//! the pause QEMU measured (`downtime`) and the total time, for an idle sandbox and for a busy
//! one that rewrites 64 MiB of memory without end. Run as `scripts/bench.sh migrate`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use moat_protocol::ExecRequest;
use moat_vm::{
    Arrived, LaunchOptions, MigrateParams, MigrationStats, MigrationStreams, Runtime, Sandbox,
};
use serde_json::{json, Value};

use crate::{id, median, PATH};

/// Rewrites a 64 MiB file in the guest's tmpfs (RAM) with non-zero bytes, over and over:
/// QEMU sends pages of zeros as flags, so zeros would dirty nothing worth measuring.
const DIRTIER: &str = "while :; do yes abcdefghijklmnop | head -c 67108864 > /dev/shm/dirty; done";

/// The destination's home: the source home's kernel, initramfs cache, images and templates,
/// a run directory of its own.
fn second_home(home: &Path) -> Result<PathBuf> {
    let dest = home.join(format!(".bench-migrate-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dest)?;
    for name in [
        "kernels",
        "initramfs",
        "images",
        "templates",
        "qemu-version.json",
    ] {
        if home.join(name).exists() {
            std::os::unix::fs::symlink(home.join(name), dest.join(name))?;
        }
    }
    Ok(dest)
}

fn pair() -> Result<(MigrationStreams, MigrationStreams)> {
    let (m1, m2) = UnixStream::pair()?;
    let (d1, d2) = UnixStream::pair()?;
    Ok((
        MigrationStreams {
            memory: m1.into(),
            disk: d1.into(),
        },
        MigrationStreams {
            memory: m2.into(),
            disk: d2.into(),
        },
    ))
}

/// One migration of a fresh clone of `tpl`, busy or idle.
async fn once(
    src_rt: &Runtime,
    dst_rt: &Runtime,
    tpl: &Path,
    busy: bool,
) -> Result<MigrationStats> {
    let sb = Sandbox::restore(src_rt, &id("migrate"), tpl).await?;
    if busy {
        sb.agent()
            .proc_start(ExecRequest::new(&["sh", "-c", DIRTIER], &[PATH]))
            .await?;
        // Let it get going: a full 64 MiB pass under TCG takes a few seconds.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let manifest = sb.migration_manifest(src_rt);
    let (out, inn) = pair()?;
    let params = MigrateParams::default();
    let (departed, arrived) = tokio::join!(
        sb.migrate_out(out, &params),
        Sandbox::migrate_in(
            dst_rt,
            &manifest,
            inn,
            LaunchOptions::default(),
            Duration::from_secs(600),
            false
        ),
    );
    let departed = match departed {
        Ok(d) => d,
        Err(stayed) => {
            stayed.sandbox.destroy().await;
            if let Ok(dst) = arrived {
                dst.destroy().await;
            }
            bail!("migration failed: {}", stayed.error);
        }
    };
    let verified = match arrived {
        Ok(arrived) => arrived.verify(Arrived::VERIFY_TIMEOUT).await,
        Err(e) => Err(e),
    };
    let dst = match verified {
        Ok(dst) => dst,
        Err(e) => {
            departed.abort().await?.destroy().await;
            bail!("the destination failed: {e}");
        }
    };
    let stats = *departed.stats();
    departed.complete().await;
    dst.destroy().await;
    Ok(stats)
}

fn summary(runs: &[MigrationStats]) -> Value {
    let m = |f: fn(&MigrationStats) -> u64| median(runs.iter().map(|s| f(s) as f64).collect());
    json!({
        "downtime_ms": m(|s| s.downtime_ms),
        "total_ms": m(|s| s.total_ms),
        "memory_ms": m(|s| s.memory_ms),
        "ram_transferred_mb": (m(|s| s.ram_transferred_bytes) / 1e6).round(),
        "disk_mirrored_mb": (m(|s| s.disk_bytes) / 1e4).round() / 100.0,
        "dirty_sync_count": m(|s| s.dirty_sync_count),
        "cpu_throttle_pct": m(|s| s.cpu_throttle_percentage),
        "runs": runs,
    })
}

/// Medians over `rounds` migrations of an idle and of a busy clone of the template `tpl`.
pub async fn measure(
    rt: &Runtime,
    home: &Path,
    agent: &Path,
    moat: &Path,
    tpl: &Path,
    rounds: usize,
) -> Result<Value> {
    let dst_home = second_home(home)?;
    let measured = async {
        let dst_rt = Runtime::new(&dst_home, agent, moat, None)?;
        let mut idle = Vec::new();
        let mut busy = Vec::new();
        for _ in 0..rounds {
            idle.push(once(rt, &dst_rt, tpl, false).await?);
            busy.push(once(rt, &dst_rt, tpl, true).await?);
        }
        let params = MigrateParams::default();
        anyhow::Ok(json!({
            "downtime_limit_ms": params.downtime_limit.as_millis() as u64,
            "auto_converge": params.auto_converge,
            "streams": "unix socket pairs on one host",
            "idle": summary(&idle),
            "busy": summary(&busy),
            "rounds": rounds,
        }))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dst_home);
    measured
}
