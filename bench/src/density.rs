//! Density figures (issue 10): host memory and CPU per idle sandbox and restore-to-ready (with
//! when each step of the restore was done), with template RAM shared copy-on-write and without
//! it, measured in the same run on the same template; and the same idle guests parked (vCPUs
//! stopped): their CPU, and the first exec that has to continue one.
//!
//! "Shared" restores the template itself (its sealed RAM mapped privately by every clone).
//! "Private" restores a full memory image of the same idle guest (a snapshot of a clone taken
//! right after its restore), which loads all of the guest's RAM into each QEMU's own memory,
//! as every restore did before templates shared their RAM.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use moat_protocol::ExecRequest;
use moat_vm::{Runtime, Sandbox};
use serde_json::{json, Value};

use crate::{id, median, ms, proc_usage, PATH};

/// `key:` of `/proc/<pid>/smaps_rollup`, in kB.
fn rollup(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Idle figures of `clones` sandboxes restored from `snapshot` at once, and the median of
/// `rounds` restores to agent ready.
async fn measure_kind(
    rt: &Runtime,
    snapshot: &Path,
    kind: &str,
    clones: usize,
    rounds: usize,
) -> Result<Value> {
    let mut restores = Vec::new();
    let mut phases: [Vec<f64>; 5] = Default::default();
    for _ in 0..rounds {
        let t = Instant::now();
        let sb = Sandbox::restore(rt, &id(kind), snapshot).await?;
        restores.push(ms(t.elapsed()));
        let p = sb
            .start_phases()
            .context("a restored sandbox has start phases")?;
        for (all, at) in
            phases
                .iter_mut()
                .zip([p.qemu, p.net_started, p.running, p.agent_ready, p.ready])
        {
            all.push(ms(at));
        }
        sb.destroy().await;
    }
    let [qemu, net, guest_running, agent, ready] = phases.map(median);
    let mut running: Vec<Sandbox> = Vec::new();
    for _ in 0..clones {
        let sb = Sandbox::restore(rt, &id(kind), snapshot).await?;
        sb.agent()
            .exec_output(ExecRequest::new(&["true"], &[PATH]), 1024)
            .await?;
        running.push(sb);
    }
    // Let every guest settle, then measure them idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ticks0: Vec<u64> = running
        .iter()
        .map(|sb| proc_usage(sb.qemu_pid()).map(|u| u.1))
        .collect::<Result<_>>()?;
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let (mut pss, mut private, mut rss, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut anon = Vec::new();
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for (sb, t0) in running.iter().zip(ticks0) {
        let pid = sb.qemu_pid();
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .context("reading smaps_rollup")?;
        pss.push(rollup(&text, "Pss:") as f64 / 1024.0);
        private.push(
            (rollup(&text, "Private_Clean:") + rollup(&text, "Private_Dirty:")) as f64 / 1024.0,
        );
        rss.push(rollup(&text, "Rss:") as f64 / 1024.0);
        anon.push(rollup(&text, "Anonymous:") as f64 / 1024.0);
        let (_, t1) = proc_usage(pid)?;
        cpu.push((t1 - t0) as f64 / hz / window.as_secs_f64() * 100.0);
    }
    // The same guests parked (vCPUs stopped): their idle CPU, then how long the first exec
    // takes when it has to continue one.
    for sb in running.iter_mut() {
        sb.park().await?;
    }
    let ticks0: Vec<u64> = running
        .iter()
        .map(|sb| proc_usage(sb.qemu_pid()).map(|u| u.1))
        .collect::<Result<_>>()?;
    tokio::time::sleep(window).await;
    let mut parked_cpu = Vec::new();
    for (sb, t0) in running.iter().zip(ticks0) {
        let (_, t1) = proc_usage(sb.qemu_pid())?;
        parked_cpu.push((t1 - t0) as f64 / hz / window.as_secs_f64() * 100.0);
    }
    let mut unpark_exec = Vec::new();
    for sb in running.iter_mut() {
        let t = Instant::now();
        sb.unpark().await?;
        sb.agent()
            .exec_output(ExecRequest::new(&["true"], &[PATH]), 1024)
            .await?;
        unpark_exec.push(ms(t.elapsed()));
    }
    for sb in running {
        sb.destroy().await;
    }
    Ok(json!({
        "restore_to_ready_ms": median(restores),
        // When each step of those restores was done, from the start (medians; they overlap).
        "restore_phases_ms": {
            "qemu_qmp_ready": qemu,
            "net_stack_started": net,
            "guest_running": guest_running,
            "agent_handshake_done": agent,
            "refreshed_and_configured": ready,
        },
        "parked_cpu_pct": median(parked_cpu),
        "unpark_to_first_exec_ms": median(unpark_exec),
        "idle_pss_mib": median(pss),
        "idle_private_mib": median(private),
        // Memory that exists only for this sandbox and goes with it: QEMU's heap, TCG's
        // translation buffer, the guest pages it wrote (copy-on-write). "Private" above also
        // counts template pages that only this clone happens to map; those stay in the
        // template's one copy when it exits.
        "idle_anon_mib": median(anon),
        "idle_rss_mib": median(rss),
        "idle_cpu_pct": median(cpu),
        "clones": clones,
    }))
}

/// The figures of both kinds, and what the shared template costs the host once.
pub async fn measure(rt: &Runtime, template: &Path, clones: usize, rounds: usize) -> Result<Value> {
    let meta = moat_vm::SnapshotMeta::load(template)?;
    // A full memory image of the same idle guest: what a restore loaded before sharing.
    let parent = crate::tempfile_dir(&rt.home)?;
    let full = parent.join("full");
    let mut sb = Sandbox::restore(rt, &id("full"), template).await?;
    sb.agent()
        .exec_output(ExecRequest::new(&["true"], &[PATH]), 1024)
        .await?;
    let full_meta = sb.snapshot(rt, &full).await?;
    sb.destroy().await;
    let shared = measure_kind(rt, template, "shared", clones, rounds).await;
    let private = measure_kind(rt, &full, "private", clones, rounds).await;
    let _ = std::fs::remove_dir_all(&parent);
    Ok(json!({
        "tier": meta.tier.as_str(),
        "shared": shared?,
        "private": private?,
        "template_state_bytes": meta.memory_bytes,
        "template_ram_stored_mib": (meta.shared_ram_bytes.unwrap_or(0) as f64 / 1048576.0).round(),
        "full_memory_image_mib": (full_meta.memory_bytes as f64 / 1048576.0).round(),
    }))
}
