//! End-to-end tests of suspend and resume through the daemon: real `moat serve`, real VMs.
//! Every JSON response is checked against the daemon's OpenAPI document (the fixture does it).

mod common;

use std::time::{Duration, Instant};

use common::daemon::{msg, Daemon, ADMIN};
use serde_json::{json, Value};

const G: &str = "/v1/sandbox-groups";

async fn setup(d: &Daemon) {
    let (st, g) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/web"),
            Some(json!({"tier": "s"})),
        )
        .await;
    assert_eq!(st, 201, "{g}");
}

async fn create(d: &Daemon) -> String {
    let (st, sb) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/web/sandboxes"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201, "{sb}");
    sb["id"].as_str().unwrap().to_string()
}

/// `POST …/{id}/{verb}` (suspend or resume): status, body, and how long it took.
async fn lifecycle(d: &Daemon, id: &str, verb: &str) -> (u16, Value, Duration) {
    let t = Instant::now();
    let (st, v) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/web/sandboxes/{id}/{verb}"),
            None,
        )
        .await;
    (st, v, t.elapsed())
}

async fn state(d: &Daemon, id: &str) -> Value {
    let (st, sb) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/sandboxes/{id}"), None)
        .await;
    assert_eq!(st, 200, "{sb}");
    sb["state"].clone()
}

async fn exec(d: &Daemon, id: &str, script: &str) -> (u16, Value) {
    d.call(
        Some(ADMIN),
        "POST",
        &format!("{G}/web/sandboxes/{id}/exec"),
        Some(json!({"command": script})),
    )
    .await
}

async fn sh(d: &Daemon, id: &str, script: &str) -> String {
    let (st, r) = exec(d, id, script).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["exit_code"], 0, "{script}: {r}");
    r["stdout"].as_str().unwrap().trim().to_string()
}

const COUNTER: &str = "(i=0; while true; do i=$((i+1)); echo $i > /run/counter; sleep 0.2; done) \
                       > /dev/null 2>&1 &";

async fn counter(d: &Daemon, id: &str) -> u64 {
    sh(d, id, "cat /run/counter")
        .await
        .parse()
        .expect("counter")
}

/// The counter is alive: it moves past `after`.
async fn counter_moves(d: &Daemon, id: &str, after: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(d, id).await <= after {
        assert!(Instant::now() < deadline, "counter stuck at {after}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The numbered suspend directories of `id`, and whether each still has its memory image.
fn suspend_dirs(d: &Daemon, id: &str) -> Vec<(String, bool)> {
    let root = d.home.path().join("suspended").join(id);
    let mut v: Vec<(String, bool)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.path().join("memory.bin").exists(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_resume_keeps_state_and_auto_resumes() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    setup(&d).await;
    let id = create(&d).await;
    sh(&d, &id, "echo kept > /root/f").await;
    sh(&d, &id, COUNTER).await;
    counter_moves(&d, &id, 0).await;

    // Suspend: no QEMU left, one complete directory.
    let before = counter(&d, &id).await;
    let (st, sb, took) = lifecycle(&d, &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    eprintln!("suspend: {took:?}");
    assert!(
        common::qemu_processes(&id).is_empty(),
        "QEMU while suspended"
    );
    assert_eq!(suspend_dirs(&d, &id), vec![("1".to_string(), true)]);

    // Suspend again: a no-op, still 200.
    let (st, sb, _) = lifecycle(&d, &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");

    // Resume: the file and the counter are there, and the counter goes on.
    let (st, sb, took) = lifecycle(&d, &id, "resume").await;
    assert_eq!((st, &sb["state"]), (200, &json!("running")), "{sb}");
    eprintln!("resume: {took:?}");
    assert_eq!(common::qemu_processes(&id).len(), 1);
    assert_eq!(sh(&d, &id, "cat /root/f").await, "kept");
    let after = counter(&d, &id).await;
    assert!(after >= before, "counter went back: {before} -> {after}");
    counter_moves(&d, &id, after).await;
    // The memory image is gone; the disk stays as the VM's backing file.
    assert_eq!(suspend_dirs(&d, &id), vec![("1".to_string(), false)]);

    // Resume again: a no-op.
    let (st, sb, _) = lifecycle(&d, &id, "resume").await;
    assert_eq!((st, &sb["state"]), (200, &json!("running")), "{sb}");

    // A second cycle replaces directory 1 with 2; an exec resumes transparently.
    sh(&d, &id, "echo second >> /root/f").await;
    let (st, sb, took) = lifecycle(&d, &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    eprintln!("suspend (2nd): {took:?}");
    assert_eq!(suspend_dirs(&d, &id), vec![("2".to_string(), true)]);
    assert!(common::qemu_processes(&id).is_empty());
    let t = Instant::now();
    assert_eq!(sh(&d, &id, "cat /root/f").await, "kept\nsecond");
    eprintln!("exec with auto-resume: {:?}", t.elapsed());
    assert_eq!(state(&d, &id).await, "running");
    counter_moves(&d, &id, counter(&d, &id).await).await;

    // Delete removes the suspend directories too.
    let (st, _, _) = lifecycle(&d, &id, "suspend").await;
    assert_eq!(st, 200);
    let (st, v) = d
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("{G}/web/sandboxes/{id}"),
            None,
        )
        .await;
    assert_eq!(st, 204, "{v}");
    assert!(!d.home.path().join("suspended").join(&id).exists());

    // A reader may not suspend.
    let id2 = create(&d).await;
    let reader = d.key("reader", &["web"]).await;
    let (st, v) = d
        .call(
            Some(&reader),
            "POST",
            &format!("{G}/web/sandboxes/{id2}/suspend"),
            None,
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(d.validated.load(std::sync::atomic::Ordering::Relaxed) > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_sandboxes_survive_kill9_and_conflicts_are_409() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    setup(&d).await;
    let keep = create(&d).await;
    let lost = create(&d).await;
    sh(&d, &keep, "echo kept > /root/f").await;
    sh(&d, &keep, COUNTER).await;
    counter_moves(&d, &keep, 0).await;
    let before = counter(&d, &keep).await;
    for id in [&keep, &lost] {
        let (st, sb, _) = lifecycle(&d, id, "suspend").await;
        assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    }

    // kill -9, and one suspend directory goes missing meanwhile.
    d.kill9();
    std::fs::remove_dir_all(d.home.path().join("suspended").join(&lost)).unwrap();
    d.spawn(Some(ADMIN)).await;

    assert_eq!(state(&d, &keep).await, "suspended");
    let (st, sb, took) = lifecycle(&d, &keep, "resume").await;
    assert_eq!((st, &sb["state"]), (200, &json!("running")), "{sb}");
    eprintln!("resume after kill -9: {took:?}");
    assert_eq!(sh(&d, &keep, "cat /root/f").await, "kept");
    assert!(counter(&d, &keep).await >= before);
    counter_moves(&d, &keep, before).await;

    // The one without its directory is failed, with a reason; every verb is a clear 409.
    let (st, sb) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/web/sandboxes/{lost}"),
            None,
        )
        .await;
    assert_eq!((st, &sb["state"]), (200, &json!("failed")), "{sb}");
    assert!(
        sb["reason"].as_str().unwrap().contains("suspend directory"),
        "{sb}"
    );
    for verb in ["suspend", "resume"] {
        let (st, v, _) = lifecycle(&d, &lost, verb).await;
        assert_eq!(st, 409, "{verb}: {v}");
        assert_eq!(v["error"]["code"], "conflict");
        let m = msg(&v);
        assert!(
            m.contains(&format!("cannot {verb} sandbox {lost}: it is failed")),
            "{m}"
        );
    }
    let (st, v) = exec(&d, &lost, "true").await;
    assert_eq!(st, 409, "{v}");
    assert!(msg(&v).contains("is failed"), "{v}");
    // A failed sandbox can still be deleted.
    let (st, v) = d
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("{G}/web/sandboxes/{lost}"),
            None,
        )
        .await;
    assert_eq!(st, 204, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_suspend_loses_nothing() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    setup(&d).await;
    let id = create(&d).await;
    sh(&d, &id, "echo kept > /root/f").await;
    // ~300 MB of non-zero memory makes the save take long enough to be interrupted.
    sh(&d, &id, "yes | head -c 300000000 > /dev/shm/big").await;
    sh(&d, &id, COUNTER).await;
    counter_moves(&d, &id, 0).await;
    let before = counter(&d, &id).await;

    let suspend = {
        let (url, path) = (d.url(), format!("{G}/web/sandboxes/{id}/suspend"));
        tokio::spawn(async move {
            // The daemon dies under this request: its result does not matter.
            let _ = reqwest::Client::new()
                .post(format!("{url}{path}"))
                .bearer_auth(ADMIN)
                .send()
                .await;
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&d, &id).await != "suspending" {
        assert!(Instant::now() < deadline, "the suspend never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.kill9();
    let _ = suspend.await;
    d.spawn(Some(ADMIN)).await;

    // Either the suspend was complete (suspended) or it is undone (running); never lost.
    let now = state(&d, &id).await;
    let log = d.stderr(2);
    eprintln!(
        "after kill -9 mid-suspend: {now} (an abandoned save was cancelled: {})",
        log.contains("cancelling the migration")
    );
    match now.as_str() {
        Some("running") => assert_eq!(common::qemu_processes(&id).len(), 1),
        Some("suspended") => assert!(common::qemu_processes(&id).is_empty()),
        other => panic!("lost the sandbox: {other:?}"),
    }
    let leftovers: Vec<_> = suspend_dirs(&d, &id)
        .into_iter()
        .filter(|(n, _)| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(sh(&d, &id, "cat /root/f").await, "kept");
    assert_eq!(sh(&d, &id, "wc -c < /dev/shm/big").await, "300000000");
    counter_moves(&d, &id, before).await;
    // And it still suspends and resumes normally.
    let (st, sb, _) = lifecycle(&d, &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    assert_eq!(sh(&d, &id, "cat /root/f").await, "kept");
}
