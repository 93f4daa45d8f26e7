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

/// The kinds of mapping [`breakdown`] tells apart.
const KINDS: [&str; 8] = [
    "tcg_code_buffer",
    "guest_ram",
    "heap",
    "thread_malloc_arenas",
    "stacks",
    "binary_data",
    "library_data",
    "other_anonymous",
];

/// Where a process's private memory (Private_Clean + Private_Dirty of `/proc/<pid>/smaps`)
/// is, in MiB, by kind of mapping ([`KINDS`]). The kinds are told apart by what QEMU 7.2 and
/// glibc map: TCG's code buffer is the one large `rwxp` anonymous region; guest RAM is the
/// template's memfd (its private pages: those the clone wrote) or a large anonymous region (a
/// full image); glibc's thread arenas are anonymous heaps aligned to their 64 MiB maximum; a
/// stack (a thread's or a coroutine's) follows a `---p` guard page.
fn breakdown(pid: u32) -> Result<[f64; KINDS.len()]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).context("reading smaps")?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).context("reading exe")?;
    let mut kib = [0u64; KINDS.len()];
    let mut kind = 0;
    // The end of the previous mapping, and whether it was a guard page.
    let mut prev = (0, false);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        let range = first.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        });
        if let Some((start, end)) = range {
            let perms = f.next().unwrap_or("");
            let path = f.nth(3).unwrap_or("");
            let (anon, size) = (path.is_empty(), end - start);
            kind = if path.contains("moat-template-ram")
                || (anon && !perms.contains('x') && size >= 256 << 20)
            {
                1
            } else if anon && perms == "rwxp" && size >= 16 << 20 {
                0
            } else if path == "[heap]" {
                2
            } else if anon && start % (64 << 20) == 0 && size <= 64 << 20 {
                3
            } else if path == "[stack]" || (anon && prev == (start, true)) {
                4
            } else if Path::new(path) == exe {
                5
            } else if path.starts_with('/') {
                6
            } else {
                7
            };
            prev = (end, anon && perms == "---p");
        } else if first == "Private_Clean:" || first == "Private_Dirty:" {
            kib[kind] += f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    Ok(kib.map(|k| k as f64 / 1024.0))
}

/// The median of each kind of [`breakdown`] over `all`, rounded to 0.1 MiB.
fn median_breakdown(all: &[[f64; KINDS.len()]]) -> Value {
    KINDS
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let m = median(all.iter().map(|b| b[i]).collect());
            (k.to_string(), json!((m * 10.0).round() / 10.0))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
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
    let mut first_exec = Vec::new();
    for _ in 0..clones {
        let t = Instant::now();
        let sb = Sandbox::restore(rt, &id(kind), snapshot).await?;
        sb.agent()
            .exec_output(ExecRequest::new(&["true"], &[PATH]), 1024)
            .await?;
        first_exec.push(ms(t.elapsed()));
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
    let (mut anon, mut kinds, mut net_private) = (Vec::new(), Vec::new(), Vec::new());
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
        kinds.push(breakdown(pid)?);
        // The sandbox's other process: its network stack.
        for p in sb.host_pids().into_iter().filter(|&p| p != pid) {
            let text = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
                .context("reading the network stack's smaps_rollup")?;
            net_private.push(
                (rollup(&text, "Private_Clean:") + rollup(&text, "Private_Dirty:")) as f64 / 1024.0,
            );
        }
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
        // While other clones run: the restore and its first exec answered.
        "restore_to_first_exec_ms": median(first_exec),
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
        // Where QEMU's private memory is, by kind of mapping (medians of each kind).
        "idle_private_breakdown_mib": median_breakdown(&kinds),
        // The sandbox's network stack (`moat net-stack`), a process beside QEMU.
        "idle_net_stack_private_mib": median(net_private),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The kinds add up to the process's whole private memory, and a thread's stack, a
    /// thread's malloc arena and the heap are each found where glibc puts them.
    #[test]
    fn breakdown_accounts_for_all_private_memory() {
        // A thread that allocates (so it gets an arena) and stays alive while we look.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // Small blocks, so malloc serves them from the arena rather than by mmap.
            let v: Vec<Vec<u8>> = (0..512).map(|_| vec![1u8; 4096]).collect();
            let mut stack = [0u8; 256 << 10];
            stack.iter_mut().for_each(|b| *b = std::hint::black_box(1));
            ready_tx.send(()).unwrap();
            rx.recv().unwrap();
            std::hint::black_box((&v, &stack));
        });
        ready_rx.recv().unwrap();
        let pid = std::process::id();
        let b = breakdown(pid).unwrap();
        let rollup_text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
        tx.send(()).unwrap();
        t.join().unwrap();
        let total = (rollup(&rollup_text, "Private_Clean:")
            + rollup(&rollup_text, "Private_Dirty:")) as f64
            / 1024.0;
        let sum: f64 = b.iter().sum();
        // Read at slightly different moments: allow a little drift.
        assert!(
            (sum - total).abs() < 1.0,
            "{b:?} sums to {sum}, smaps_rollup says {total}"
        );
        let at = |k: &str| b[KINDS.iter().position(|n| *n == k).unwrap()];
        assert!(at("stacks") >= 0.25, "{b:?}");
        assert!(at("thread_malloc_arenas") >= 1.0, "{b:?}");
        assert!(at("heap") > 0.0, "{b:?}");
        assert_eq!(at("tcg_code_buffer"), 0.0, "{b:?}");
    }
}
