//! End-to-end tests of suspend and resume through the daemon: real `moat serve`, real VMs.
//! Every JSON response is checked against the daemon's OpenAPI document (the fixture does it).

mod common;

use std::time::{Duration, Instant};

use common::daemon::{msg, Daemon, ADMIN, G};
use common::COUNTER;
use serde_json::json;

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
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    d.sh("web", &id, "echo kept > /root/f").await;
    d.sh("web", &id, COUNTER).await;
    d.counter_moves("web", &id, 0).await;

    // Suspend: no QEMU left, one complete directory.
    let before = d.counter("web", &id).await;
    let (st, sb, took) = d.lifecycle("web", &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    eprintln!("suspend: {took:?}");
    assert!(
        common::qemu_processes(&id).is_empty(),
        "QEMU while suspended"
    );
    assert_eq!(suspend_dirs(&d, &id), vec![("1".to_string(), true)]);

    // Suspend again: a no-op, still 200.
    let (st, sb, _) = d.lifecycle("web", &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");

    // Resume: the file and the counter are there, and the counter goes on.
    let (st, sb, took) = d.lifecycle("web", &id, "resume").await;
    assert_eq!((st, &sb["state"]), (200, &json!("running")), "{sb}");
    eprintln!("resume: {took:?}");
    assert_eq!(common::qemu_processes(&id).len(), 1);
    assert_eq!(d.sh("web", &id, "cat /root/f").await, "kept");
    let after = d.counter("web", &id).await;
    assert!(after >= before, "counter went back: {before} -> {after}");
    d.counter_moves("web", &id, after).await;
    // The memory image is gone; the disk stays as the VM's backing file.
    assert_eq!(suspend_dirs(&d, &id), vec![("1".to_string(), false)]);

    // Resume again: a no-op.
    let (st, sb, _) = d.lifecycle("web", &id, "resume").await;
    assert_eq!((st, &sb["state"]), (200, &json!("running")), "{sb}");

    // A second cycle replaces directory 1 with 2; an exec resumes transparently.
    d.sh("web", &id, "echo second >> /root/f").await;
    let (st, sb, took) = d.lifecycle("web", &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    eprintln!("suspend (2nd): {took:?}");
    assert_eq!(suspend_dirs(&d, &id), vec![("2".to_string(), true)]);
    assert!(common::qemu_processes(&id).is_empty());
    let t = Instant::now();
    assert_eq!(d.sh("web", &id, "cat /root/f").await, "kept\nsecond");
    eprintln!("exec with auto-resume: {:?}", t.elapsed());
    assert_eq!(d.state("web", &id).await, "running");
    d.counter_moves("web", &id, d.counter("web", &id).await)
        .await;

    // Delete removes the suspend directories too.
    let (st, _, _) = d.lifecycle("web", &id, "suspend").await;
    assert_eq!(st, 200);
    d.delete("web", &id).await;
    assert!(!d.home.path().join("suspended").join(&id).exists());

    // A reader may not suspend.
    let id2 = d.new_sandbox("web").await;
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
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let keep = d.new_sandbox("web").await;
    let lost = d.new_sandbox("web").await;
    d.sh("web", &keep, "echo kept > /root/f").await;
    d.sh("web", &keep, COUNTER).await;
    d.counter_moves("web", &keep, 0).await;
    let before = d.counter("web", &keep).await;
    for id in [&keep, &lost] {
        let (st, sb, _) = d.lifecycle("web", id, "suspend").await;
        assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    }

    // kill -9, and one suspend directory goes missing meanwhile.
    d.kill9();
    std::fs::remove_dir_all(d.home.path().join("suspended").join(&lost)).unwrap();
    d.spawn(Some(ADMIN)).await;

    assert_eq!(d.state("web", &keep).await, "suspended");
    let (st, sb, took) = d.lifecycle("web", &keep, "resume").await;
    assert_eq!((st, &sb["state"]), (200, &json!("running")), "{sb}");
    eprintln!("resume after kill -9: {took:?}");
    assert_eq!(d.sh("web", &keep, "cat /root/f").await, "kept");
    assert!(d.counter("web", &keep).await >= before);
    d.counter_moves("web", &keep, before).await;

    // The one without its directory is failed, with a reason; every verb is a clear 409.
    let sb = d.get("web", &lost).await.expect("the failed sandbox");
    assert_eq!(sb["state"], "failed", "{sb}");
    assert!(
        sb["reason"].as_str().unwrap().contains("suspend directory"),
        "{sb}"
    );
    for verb in ["suspend", "resume"] {
        let (st, v, _) = d.lifecycle("web", &lost, verb).await;
        assert_eq!(st, 409, "{verb}: {v}");
        assert_eq!(v["error"]["code"], "conflict");
        let m = msg(&v);
        assert!(
            m.contains(&format!("cannot {verb} sandbox {lost}: it is failed")),
            "{m}"
        );
    }
    let (st, v) = d
        .exec(ADMIN, "web", &lost, json!({"command": "true"}))
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(msg(&v).contains("is failed"), "{v}");
    // A failed sandbox can still be deleted.
    d.delete("web", &lost).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_suspend_loses_nothing() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    d.sh("web", &id, "echo kept > /root/f").await;
    // ~300 MB of non-zero memory makes the save take long enough to be interrupted.
    d.sh("web", &id, "yes | head -c 300000000 > /dev/shm/big")
        .await;
    d.sh("web", &id, COUNTER).await;
    d.counter_moves("web", &id, 0).await;
    let before = d.counter("web", &id).await;

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
    while d.state("web", &id).await != "suspending" {
        assert!(Instant::now() < deadline, "the suspend never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.kill9();
    let _ = suspend.await;
    d.spawn(Some(ADMIN)).await;

    // Either the suspend was complete (suspended) or it is undone (running); never lost.
    let now = d.state("web", &id).await;
    let log = d.stderr(2);
    eprintln!(
        "after kill -9 mid-suspend: {now} (an abandoned save was cancelled: {})",
        log.contains("cancelling the migration")
    );
    match now.as_str() {
        "running" => assert_eq!(common::qemu_processes(&id).len(), 1),
        "suspended" => assert!(common::qemu_processes(&id).is_empty()),
        other => panic!("lost the sandbox: {other:?}"),
    }
    let leftovers: Vec<_> = suspend_dirs(&d, &id)
        .into_iter()
        .filter(|(n, _)| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(d.sh("web", &id, "cat /root/f").await, "kept");
    assert_eq!(d.sh("web", &id, "wc -c < /dev/shm/big").await, "300000000");
    d.counter_moves("web", &id, before).await;
    // And it still suspends and resumes normally.
    let (st, sb, _) = d.lifecycle("web", &id, "suspend").await;
    assert_eq!((st, &sb["state"]), (200, &json!("suspended")), "{sb}");
    assert_eq!(d.sh("web", &id, "cat /root/f").await, "kept");
}
