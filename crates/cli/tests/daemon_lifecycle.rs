//! Lifecycle timers and capacity checks through the daemon: real `moat serve`, real VMs, short
//! timers. Every JSON response is checked against the daemon's OpenAPI document.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{msg, Daemon, ADMIN, G};
use serde_json::json;

/// Polls until the sandbox is in `want`; returns how long that took.
async fn wait_state(d: &Daemon, group: &str, id: &str, want: &str, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let s = d.state(group, id).await;
        if s == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{id} is still {s} after {within:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_are_suspended_unless_active() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group(
        "idle",
        json!({"tier": "s", "lifecycle": {"idle_timeout_s": 2}}),
        201,
    )
    .await;
    let id = d.new_sandbox("idle").await;

    // Activity every second for 4 s keeps it running.
    for _ in 0..4 {
        d.sh("idle", &id, "true").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(d.state("idle", &id).await, "running");
    let sb = d.get("idle", &id).await.expect("the sandbox");
    assert!(sb["last_activity_at"].is_string(), "{sb}");

    // Then idle: suspended 2 s (give or take the reaper's tick) after the last exec.
    d.sh("idle", &id, "true").await;
    let took = wait_state(&d, "idle", &id, "suspended", Duration::from_secs(8)).await;
    eprintln!("idle → suspended after {took:?}");
    assert!(took >= Duration::from_millis(1500), "too early: {took:?}");
    assert!(common::qemu_processes(&id).is_empty());

    // A background process counts as activity for as long as it runs.
    let (st, r) = d
        .exec(ADMIN, "idle", &id, json!({"command": "echo back"}))
        .await;
    assert_eq!((st, r["stdout"].as_str()), (200, Some("back\n")), "{r}");
    let (st, p) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/idle/sandboxes/{id}/processes"),
            Some(json!({"command": "sleep 5"})),
        )
        .await;
    assert_eq!(st, 201, "{p}");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(4500) {
        assert_eq!(
            d.state("idle", &id).await,
            "running",
            "suspended while a background process ran ({:?})",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = wait_state(&d, "idle", &id, "suspended", Duration::from_secs(10)).await;
    eprintln!(
        "process ended → suspended after {:?}",
        took + Duration::from_millis(4500)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_delete_suspended_ttl_and_max_lifetime() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group(
        "del",
        json!({"tier": "s", "lifecycle": {"idle_timeout_s": 2, "on_idle": "delete"}}),
        201,
    )
    .await;
    d.put_group(
        "ttl",
        json!({"tier": "s", "lifecycle": {"idle_timeout_s": 1, "suspended_ttl_s": 2}}),
        201,
    )
    .await;
    d.put_group(
        "max",
        json!({"tier": "s", "lifecycle": {"idle_timeout_s": null, "max_lifetime_s": 3}}),
        201,
    )
    .await;
    let del = d.new_sandbox("del").await;
    let ttl = d.new_sandbox("ttl").await;
    let max = d.new_sandbox("max").await;
    let t0 = Instant::now();

    // max_lifetime_s bounds a sandbox however busy it is.
    while d.state("max", &max).await != "gone" {
        let _ = d.exec(ADMIN, "max", &max, json!({"command": "true"})).await;
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "max_lifetime_s ignored"
        );
    }
    let took = t0.elapsed();
    eprintln!("max_lifetime_s 3 → deleted after {took:?}");
    assert!(took >= Duration::from_secs(2), "too early: {took:?}");

    wait_state(&d, "del", &del, "gone", Duration::from_secs(8)).await;
    // Suspended after 1 s idle, deleted 2 s later (with its suspend directory).
    wait_state(&d, "ttl", &ttl, "gone", Duration::from_secs(10)).await;
    assert!(!d.home.path().join("suspended").join(&ttl).exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !common::qemu_processes(&d.home.path().display().to_string()).is_empty() {
        assert!(Instant::now() < deadline, "VMs left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_refuses_overcommit_and_counts_suspended_as_free() {
    // Room for one tier s sandbox (1024 MiB), not two.
    let d = Daemon::start_with_runtime_args(Some(ADMIN), &["--max-memory-mib", "1536"]).await;
    d.put_group("cap", json!({"tier": "s"}), 201).await;
    let a = d.new_sandbox("cap").await;
    let (st, e) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/cap/sandboxes"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 429, "{e}");
    assert_eq!(e["error"]["code"], "too_many_requests");
    let m = msg(&e);
    assert!(
        m.contains("needs 1024 MiB") && m.contains("512 of") && m.contains("1536 MiB"),
        "{m}"
    );

    // A suspended sandbox holds no memory: now there is room.
    let (st, sb, _) = d.lifecycle("cap", &a, "suspend").await;
    assert_eq!(st, 200, "{sb}");
    let b = d.new_sandbox("cap").await;

    // And resuming `a` (explicitly or by an exec) would overcommit.
    let (st, e, _) = d.lifecycle("cap", &a, "resume").await;
    assert_eq!(st, 429, "{e}");
    assert!(msg(&e).contains(&format!("resuming sandbox {a}")), "{e}");
    let (st, e) = d.exec(ADMIN, "cap", &a, json!({"command": "true"})).await;
    assert_eq!(st, 429, "{e}");
    assert_eq!(d.state("cap", &a).await, "suspended");

    d.delete("cap", &b).await;
    let (st, r) = d
        .exec(ADMIN, "cap", &a, json!({"command": "echo up"}))
        .await;
    assert_eq!((st, r["stdout"].as_str()), (200, Some("up\n")), "{r}");

    let (_, text) = d.call(None, "GET", "/metrics", None).await;
    let text = text.as_str().unwrap();
    for needle in [
        "moat_sandbox_suspend_duration_seconds_count 1",
        "moat_sandbox_resume_duration_seconds_count 1",
        "moat_memory_mib{kind=\"limit\"} 1536",
        "moat_memory_mib{kind=\"used\"} 1024",
        "moat_memory_mib{kind=\"reserve\"} 1024",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
    // What the one running sandbox really holds: more than QEMU alone, far less than its
    // 1024 MiB tier (a restored template shares its memory).
    let pss = gauge(text, "moat_memory_mib{kind=\"pss\"}");
    assert!((20.0..700.0).contains(&pss), "pss {pss} MiB");
    assert!(gauge(text, "moat_memory_mib{kind=\"host_available\"}") > 1024.0);
}

/// The value of the metric line starting with `series`.
fn gauge(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_low_on_memory_refuses_new_sandboxes_whatever_the_overcommit() {
    // Keep all but 64 MiB of the host's memory free: no tier fits in what is left, however
    // much the overcommitted tier limit allows.
    let total_mib = moat_vm::qemu::host_meminfo_mib("MemTotal").unwrap();
    let reserve = (total_mib - 64).to_string();
    let d = Daemon::start_with_runtime_args(
        Some(ADMIN),
        &[
            "--memory-overcommit",
            "50",
            "--memory-reserve-mib",
            &reserve,
        ],
    )
    .await;
    d.put_group("low", json!({"tier": "xs"}), 201).await;
    let (st, e) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/low/sandboxes"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 429, "{e}");
    let m = msg(&e);
    assert!(
        m.contains("low on memory") && m.contains(&format!("keeps {reserve} MiB")),
        "{m}"
    );
    let (_, list) = d
        .call(Some(ADMIN), "GET", &format!("{G}/low/sandboxes"), None)
        .await;
    assert_eq!(
        list["sandboxes"].as_array().map(Vec::len),
        Some(0),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timers_survive_a_kill9() {
    const IDLE_S: u64 = 8;
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group(
        "idle",
        json!({"tier": "s", "lifecycle": {"idle_timeout_s": IDLE_S}}),
        201,
    )
    .await;
    let id = d.new_sandbox("idle").await;
    d.sh("idle", &id, "true").await;
    // The activity time reaches the store within a reaper tick.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sb = d.get("idle", &id).await.expect("the sandbox");
        if sb["last_activity_at"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "no last_activity_at: {sb}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Down for longer than the idle timeout: the next daemon suspends it at once, instead of
    // starting the idle clock again.
    d.kill9();
    tokio::time::sleep(Duration::from_secs(IDLE_S)).await;
    d.spawn(Some(ADMIN)).await;
    let took = wait_state(&d, "idle", &id, "suspended", Duration::from_secs(20)).await;
    eprintln!("suspended {took:?} after the restart");
    // A restarted clock would need the whole timeout again, then the suspend; a kept one
    // only a reaper tick and the suspend (seconds under TCG on a loaded host).
    assert!(
        took < Duration::from_secs(IDLE_S - 2),
        "the idle clock restarted: {took:?}"
    );
}
