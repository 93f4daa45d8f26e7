//! Parking (issue 10): idle sandboxes and warm-pool VMs have their vCPUs stopped, cost no host
//! CPU and no CPU share, and the next request continues them with the right clock. Real
//! `moat serve`, real VMs; whether a VM is parked is read from the host (its QEMU's CPU time),
//! not taken from the daemon's word.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, ADMIN, G};
use serde_json::{json, Value};

/// The QEMU pid of sandbox (or pool VM) `id`, from its run directory's record.
fn qemu_pid(d: &Daemon, id: &str) -> u32 {
    let rec = std::fs::read(d.home.path().join("run").join(id).join("sandbox.json"))
        .expect("sandbox.json");
    let rec: Value = serde_json::from_slice(&rec).unwrap();
    rec["pid"].as_u64().unwrap() as u32
}

/// CPU time process `pid` used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Context switches of each thread of `pid` so far, by thread id: a running guest's vCPU
/// threads wake for its timers even when it idles; a stopped vCPU sleeps until it is continued.
fn wakeups(pid: u32) -> HashMap<String, u64> {
    let mut by_thread = HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let n = status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
        by_thread.insert(t.file_name().to_string_lossy().into_owned(), n);
    }
    by_thread
}

/// CPU ticks (1/100 s) and wakeups of QEMU `pid` over two seconds. Threads that ended
/// meanwhile count what they did before the first sample only; new ones count all of theirs.
async fn over_2s(pid: u32) -> (u64, u64) {
    let (t0, w0) = (cpu_ticks(pid), wakeups(pid));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woke = wakeups(pid)
        .iter()
        .map(|(tid, n)| n.saturating_sub(w0.get(tid).copied().unwrap_or(0)))
        .sum();
    (cpu_ticks(pid).saturating_sub(t0), woke)
}

/// Whether QEMU `pid` is parked, as the host sees it: in two seconds no thread of it woke.
/// (An idle running guest wakes its vCPU for timer ticks hundreds of times meanwhile.)
async fn is_parked(pid: u32) -> bool {
    let (ticks, wakeups) = over_2s(pid).await;
    eprintln!("pid {pid}: {ticks} ticks, {wakeups} wakeups in 2 s");
    wakeups <= 5 && ticks == 0
}

/// Waits until `moat_vms_parked` is `n`.
async fn parked(d: &Daemon, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = d.metric("moat_vms_parked").await.unwrap_or(-1.0);
        if got == n as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "parked VMs stuck at {got}, want {n}; the daemon said:\n{}",
            d.stderr(1)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Seconds between the guest's wall clock and the host's.
async fn clock_skew(d: &Daemon, group: &str, id: &str) -> i64 {
    let guest: i64 = d.sh(group, id, "date +%s").await.parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    (host - guest).abs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_and_pool_vms_park_and_continue_on_the_next_request() {
    let d = Daemon::start_with_runtime_args(Some(ADMIN), &["--park-after", "1"]).await;
    d.put_group("web", json!({"tier": "xs", "pool": {"size": 1}}), 201)
        .await;
    // The pool VM is parked as soon as it is ready: its QEMU then uses no CPU at all.
    parked(&d, 1).await;
    let (_, l) = d.call(Some(ADMIN), "GET", "/metrics", None).await;
    assert!(
        l.as_str()
            .unwrap()
            .contains("moat_vcpus{kind=\"used\"} 0\n"),
        "{l}"
    );

    // A create hands the parked VM over: it answers at once, with the host's clock.
    let a = d.create(ADMIN, "web", json!({})).await;
    let a = a["id"].as_str().unwrap().to_string();
    assert_eq!(d.sh("web", &a, "echo hi").await, "hi");
    let pid = qemu_pid(&d, &a);
    // Idle for the park delay: parked (the refilled pool VM too), and quiet on the host.
    parked(&d, 2).await;
    assert!(is_parked(pid).await, "a parked sandbox's QEMU ran");
    // Its clock stood still while parked; the request that continues it sets it again.
    assert!(clock_skew(&d, "web", &a).await <= 1);
    let (_, text) = d.call(None, "GET", "/metrics", None).await;
    assert!(
        text.as_str()
            .unwrap()
            .contains("moat_sandbox_unpark_duration_seconds_count 2"),
        "{text}"
    );
    // Files and processes the guest had are all there.
    d.sh("web", &a, "echo kept > /root/f").await;
    parked(&d, 2).await;
    assert_eq!(d.sh("web", &a, "cat /root/f").await, "kept");

    // A background process keeps a sandbox awake; so does a guest that computes.
    let (st, p) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/web/sandboxes/{a}/processes"),
            Some(json!({"argv": ["sleep", "600"]})),
        )
        .await;
    assert_eq!(st, 201, "{p}");
    let b = d.create(ADMIN, "web", json!({})).await;
    let b = b["id"].as_str().unwrap().to_string();
    d.sh("web", &b, "(while :; do :; done) >/dev/null 2>&1 &")
        .await;
    // Well past the park delay, a and b are both seen running on the host.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (pid_a, pid_b) = (qemu_pid(&d, &a), qemu_pid(&d, &b));
    assert!(!is_parked(pid_a).await, "a has a background process");
    assert!(over_2s(pid_b).await.0 > 20, "b is computing");
    // Once the process ends, a parks; b computes on.
    let procs = format!("{G}/web/sandboxes/{a}/processes");
    let (st, v) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{procs}/{}/kill", p["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, 204, "{v}");
    parked(&d, 2).await;
    assert!(is_parked(pid_a).await);
    assert!(!is_parked(pid_b).await, "b still computes");

    // Snapshot and suspend/resume of a parked sandbox work (they continue it first).
    let (st, s) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/web/sandboxes/{a}/snapshots"),
            Some(json!({"name": "parked"})),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    parked(&d, 2).await;
    let (st, v, _) = d.lifecycle("web", &a, "suspend").await;
    assert_eq!(st, 200, "{v}");
    let (st, v, _) = d.lifecycle("web", &a, "resume").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(d.sh("web", &a, "cat /root/f").await, "kept");
    assert!(clock_skew(&d, "web", &a).await <= 1);
    d.delete("web", &a).await;
    d.delete("web", &b).await;
}

/// A parked sandbox holds no CPU share: on a host whose CPU admits two tier-xs sandboxes, a
/// third fits once the first two are parked, and all three then answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_sandboxes_hold_no_cpu_share() {
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    // Two xs sandboxes (a quarter vCPU each) fill the host's CPU.
    let ratio = format!("{}", 0.5 / cores);
    let d = Daemon::start_with_runtime_args(
        Some(ADMIN),
        &["--park-after", "1", "--cpu-overcommit", &ratio],
    )
    .await;
    d.put_group("web", json!({"tier": "xs"}), 201).await;
    let a = d.new_sandbox("web").await;
    let b = d.new_sandbox("web").await;
    let (st, v) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/web/sandboxes"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 429, "{v}");
    parked(&d, 2).await;
    let c = d.new_sandbox("web").await;
    for id in [&a, &b, &c] {
        assert_eq!(d.sh("web", id, "echo up").await, "up");
    }
    for id in [&a, &b, &c] {
        d.delete("web", id).await;
    }
}
