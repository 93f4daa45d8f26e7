//! `moat-bench`: measures the runtime on this machine and prints one JSON object.
//!
//! Run with `scripts/bench.sh` (release build); `scripts/bench.sh density` measures only the
//! density figures (`density.rs`), `scripts/bench.sh scale [N]` only the scale run
//! (`scale.rs`), `scripts/bench.sh load [SECONDS] [CLIENTS]` only the load run (`load.rs`),
//! `scripts/bench.sh migrate` only live migration (`migrate.rs`).
//! Figures are medians over several runs; the
//! machine, accelerator and QEMU version are part of the output, because absolute times only
//! mean something next to them.

mod daemon;
mod density;
mod drain;
mod fleet;
mod forward;
mod load;
mod migrate;
mod scale;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use moat_image::ImageStore;
use moat_protocol::ExecRequest;
use moat_vm::{template, Runtime, Sandbox, Tier};
use serde_json::json;

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The median, rounded to hundredths.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let m = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (m * 100.0).round() / 100.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn id(prefix: &str) -> String {
    format!("bench-{prefix}-{:08x}", rand::random::<u32>())
}

/// Times `moat run [--tier T] -- true` end to end, as a user would see it.
fn time_moat_run(moat: &Path, tier: Tier) -> Result<f64> {
    let started = Instant::now();
    let status = Command::new(moat)
        .args(["run", "--tier", tier.as_str(), "--", "true"])
        .status()
        .context("running moat")?;
    if !status.success() {
        bail!("moat run failed: {status}");
    }
    Ok(ms(started.elapsed()))
}

/// `runsc do true` (gVisor, ptrace platform), the peer a user could pick instead of moat on a
/// machine like this; `None` when runsc is not installed.
fn time_gvisor(rounds: usize) -> Result<Option<f64>> {
    if Command::new("runsc").arg("--version").output().is_err() {
        eprintln!("runsc not installed: skipping the gVisor comparison (apt-get install runsc)");
        return Ok(None);
    }
    let root = std::env::temp_dir().join(format!("moat-bench-runsc-{}", std::process::id()));
    let mut times = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let status = Command::new("runsc")
            .arg(format!("--root={}", root.display()))
            .args(["--network=none", "--platform=ptrace", "do", "true"])
            .status()?;
        if !status.success() {
            bail!("runsc do true failed: {status}");
        }
        times.push(ms(started.elapsed()));
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(Some(median(times)))
}

/// RSS (kB) and CPU ticks (user+system) of a process.
fn proc_usage(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(") ").context("stat")?.1;
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok((rss, ticks))
}

/// The count N of `moat-bench NAME [N]`: `default` without one, at least 1.
fn count_arg(name: &str, default: usize, what: &str) -> Result<usize> {
    match std::env::args().nth(2) {
        None => Ok(default),
        Some(a) => match a.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("{name} N: N is {what}, at least 1 (got {a:?})"),
        },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let home = PathBuf::from(std::env::var("MOAT_HOME").context("set MOAT_HOME")?);
    let agent = PathBuf::from(std::env::var("MOAT_AGENT").context("set MOAT_AGENT")?);
    let moat = PathBuf::from(std::env::var("MOAT_BIN").context("set MOAT_BIN")?);
    let rounds: usize = std::env::var("MOAT_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let rt = Runtime::new(&home, &agent, &moat, None)?;
    let image = ImageStore::open(&home.join("images"))?.resolve("base")?;
    let tier = Tier::M;
    let clones: usize = std::env::var("MOAT_BENCH_CLONES")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4);
    // The daemon-level subcommands, `moat-bench NAME [N]`: each a report of its own.
    let counted = match std::env::args().nth(1).as_deref() {
        Some("scale") => Some((
            "scale",
            scale::measure(
                &moat,
                &home,
                &agent,
                count_arg("scale", 200, "a count of sandboxes")?,
            )
            .await?,
        )),
        Some("forward") => Some((
            "forward",
            forward::measure(
                &moat,
                &home,
                &agent,
                count_arg("forward", 20, "a count of execs each way")?,
            )
            .await?,
        )),
        Some("drain") => Some((
            "drain",
            drain::measure(
                &moat,
                &home,
                &agent,
                count_arg("drain", 3, "a count of drains")?,
            )
            .await?,
        )),
        Some("fleet") => Some((
            "fleet",
            fleet::measure(
                &moat,
                &home,
                &agent,
                count_arg("fleet", 12, "a count of creates per fleet")?,
            )
            .await?,
        )),
        _ => None,
    };
    if let Some((name, part)) = counted {
        let report = json!({ "machine": machine(&rt, Tier::Xs), name: part });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if std::env::args().nth(1).as_deref() == Some("load") {
        let arg = |n: usize, default: u64, what: &str| match std::env::args().nth(n) {
            None => Ok(default),
            Some(a) => match a.parse::<u64>() {
                Ok(v) if v >= 1 => Ok(v),
                _ => bail!(
                    "load [SECONDS] [CLIENTS]: {what} is a whole number, at least 1 (got {a:?})"
                ),
            },
        };
        let seconds = arg(2, 60, "SECONDS")?;
        let clients = arg(3, 16, "CLIENTS")? as usize;
        let report = json!({
            "machine": machine(&rt, Tier::Xs),
            "load": load::measure(&moat, &home, &agent, seconds, clients).await?,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if std::env::args().nth(1).as_deref() == Some("migrate") {
        let tpl = template::ensure(&rt, &image.digest, &image.rootfs, Tier::Xs).await?;
        let report = json!({
            "machine": machine(&rt, Tier::Xs),
            "migrate": migrate::measure(&rt, &home, &agent, &moat, &tpl.dir, rounds.min(3)).await?,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if std::env::args().nth(1).as_deref() == Some("density") {
        let tpl = template::ensure(&rt, &image.digest, &image.rootfs, tier).await?;
        let report = json!({
            "machine": machine(&rt, tier),
            "density": density::measure(&rt, &tpl.dir, clones, rounds).await?,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }

    // Cold boot to agent ready, from the base disk.
    let mut boots = Vec::new();
    for _ in 0..rounds.min(3) {
        let t = Instant::now();
        let sb = Sandbox::boot(&rt, &id("boot"), &image.digest, &image.rootfs, tier).await?;
        boots.push(ms(t.elapsed()));
        sb.destroy().await;
    }

    // `moat run -- true`: cold (the first run of the image builds its template) and warm.
    template::remove_for_tier(&rt, &image.digest, tier)?;
    let run_cold = time_moat_run(&moat, tier)?;
    let mut warm = Vec::new();
    for _ in 0..rounds {
        warm.push(time_moat_run(&moat, tier)?);
    }
    let run_warm = median(warm);

    // Template restore to agent ready (includes the clock/entropy refresh).
    let tpl = template::ensure(&rt, &image.digest, &image.rootfs, tier).await?;
    let mut restores = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let sb = Sandbox::restore(&rt, &id("restore"), &tpl.dir).await?;
        restores.push(ms(t.elapsed()));
        sb.destroy().await;
    }

    // In one running sandbox: exec round trip, the guest's own process start, files, snapshot.
    let mut sb = Sandbox::restore(&rt, &id("run"), &tpl.dir).await?;
    // Let the restored guest settle before measuring its idle cost.
    sb.agent()
        .exec_output(ExecRequest::new(&["true"], &[PATH]), 1024)
        .await?;
    // Idle cost, then a snapshot of the idle sandbox.
    let pid = sb.qemu_pid();
    let (_, t0) = proc_usage(pid)?;
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let (rss_kb, t1) = proc_usage(pid)?;
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let idle_cpu_pct = (t1 - t0) as f64 / hz / window.as_secs_f64() * 100.0;
    let snap_parent = tempfile_dir(&home)?;
    let meta = sb.snapshot(&rt, &snap_parent.join("snap")).await?;
    let _ = std::fs::remove_dir_all(&snap_parent);

    let agent_conn = sb.agent();
    agent_conn
        .exec_output(ExecRequest::new(&["true"], &[PATH]), 1024)
        .await?;
    let mut rtts = Vec::new();
    for _ in 0..rounds * 4 {
        let t = Instant::now();
        agent_conn
            .exec_output(ExecRequest::new(&["true"], &[PATH]), 1024)
            .await?;
        rtts.push(ms(t.elapsed()));
    }
    let spawns = 50;
    let t = Instant::now();
    let out = agent_conn
        .exec_output(
            ExecRequest::new(
                &[
                    "sh",
                    "-c",
                    &format!("i=0; while [ $i -lt {spawns} ]; do /bin/true; i=$((i+1)); done"),
                ],
                &[PATH],
            ),
            1024,
        )
        .await?;
    if out.status.code != Some(0) {
        bail!("spawn loop failed");
    }
    let guest_spawn = ms(t.elapsed()) / f64::from(spawns);

    let size: usize = 100 << 20;
    let data = vec![0x5au8; size];
    let t = Instant::now();
    agent_conn
        .write_file("/root/bench.bin", None, false, &data[..])
        .await?;
    let write_mbs = size as f64 / 1e6 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut reader = agent_conn.read_file("/root/bench.bin").await?;
    let mut n = 0usize;
    while let Some(c) = reader.chunk().await? {
        n += c.len();
    }
    let read_mbs = n as f64 / 1e6 / t.elapsed().as_secs_f64();
    agent_conn.remove("/root/bench.bin", false).await?;
    sb.destroy().await;

    let density = density::measure(&rt, &tpl.dir, clones, rounds).await?;
    let gvisor = time_gvisor(rounds)?;

    let daemon = daemon::measure(&moat, &home, &agent, tier.as_str(), rounds).await?;
    let cold = median(boots.clone());
    let hit = daemon["daemon_create_to_first_exec_pool_hit_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);

    let mut report = json!({
        "machine": machine(&rt, tier),
        "density": density,
        "cold_boot_to_ready_ms": median(boots),
        "template_restore_to_ready_ms": median(restores),
        "moat_run_true_cold_ms": run_cold,
        "moat_run_true_warm_ms": run_warm,
        "moat_run_cold_over_warm": (run_cold / run_warm * 10.0).round() / 10.0,
        "gvisor_runsc_do_true_ms": gvisor,
        "exec_round_trip_ms": median(rtts),
        "guest_process_start_ms": (guest_spawn * 100.0).round() / 100.0,
        "file_write_mb_s": write_mbs.round(),
        "file_read_mb_s": read_mbs.round(),
        "snapshot_save_ms": meta.save_ms,
        "snapshot_memory_mb": (meta.memory_bytes as f64 / 1e6).round(),
        "idle_host_rss_mb": (rss_kb as f64 / 1024.0).round(),
        "idle_host_cpu_pct": (idle_cpu_pct * 100.0).round() / 100.0,
        "rounds": rounds,
        // The goal: a pool hit at least 50× faster than a cold boot.
        "pool_hit_speedup_over_cold_boot": (cold / hit * 10.0).round() / 10.0,
    });
    if let (Some(r), Some(d)) = (report.as_object_mut(), daemon.as_object()) {
        r.extend(d.clone());
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// What the figures were measured on.
fn machine(rt: &Runtime, tier: Tier) -> serde_json::Value {
    json!({
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu_model": cpu_model(),
        "accel": rt.accel.accel.as_str(),
        "accel_reason": rt.accel.reason,
        "qemu": rt.qemu_version,
        "kernel": rt.kernel.version,
        "tier": tier.as_str(),
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default()
}

fn tempfile_dir(home: &Path) -> Result<PathBuf> {
    let p = home.join(format!(".bench-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
