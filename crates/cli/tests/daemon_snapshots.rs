//! End-to-end tests of named snapshots, N-way forks and deletes that end running execs,
//! through a real `moat serve` booting real VMs. Every JSON response is checked against the
//! daemon's OpenAPI document (the fixture does it).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::daemon::{msg, validate, Daemon, ADMIN, G};
use common::COUNTER;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// `POST …/sandboxes` as is: a fork of `count` answers a list, and refusals are the point.
async fn create(d: &Daemon, group: &str, body: Value) -> (u16, Value) {
    d.call(
        Some(ADMIN),
        "POST",
        &format!("{G}/{group}/sandboxes"),
        Some(body),
    )
    .await
}

async fn snapshot(d: &Daemon, key: &str, group: &str, id: &str, name: &str) -> (u16, Value) {
    d.call(
        Some(key),
        "POST",
        &format!("{G}/{group}/sandboxes/{id}/snapshots"),
        Some(json!({ "name": name })),
    )
    .await
}

fn ids(list: &Value) -> Vec<String> {
    list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_forks_into_three_with_its_processes_and_files_and_fresh_entropy() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let src = d.new_sandbox("web").await;
    d.sh("web", &src, &format!("echo kept > /root/note; {COUNTER}"))
        .await;
    d.counter_moves("web", &src, 1).await;

    let (st, snap) = snapshot(&d, ADMIN, "web", &src, "s1").await;
    assert_eq!(st, 201, "{snap}");
    let (_, src_row) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/web/sandboxes/{src}"),
            None,
        )
        .await;
    assert_eq!(snap["name"], "s1");
    assert_eq!(snap["group"], "web");
    assert_eq!(snap["sandbox"], src.as_str());
    assert_eq!(snap["image"], src_row["image"]);
    assert_eq!(snap["tier"], "s");
    assert!(snap["size_bytes"].as_u64().unwrap() > 1 << 20, "{snap}");
    let dir = d.home.path().join("snapshots/web/s1");
    for f in ["meta.json", "memory.bin", "disk.qcow2"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    // The disk layer stands on the image's rootfs alone, not on the source's files.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(dir.join("disk.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info["full-backing-filename"]
            .as_str()
            .unwrap()
            .ends_with("rootfs.ext4"),
        "{info}"
    );

    // The source runs on.
    assert_eq!(d.sh("web", &src, "cat /root/note").await, "kept");
    let c = d.counter("web", &src).await;
    d.counter_moves("web", &src, c).await;
    assert_eq!(d.state("web", &src).await, "running");

    let t = Instant::now();
    let (st, forks) = create(&d, "web", json!({"from_snapshot": "s1", "count": 3})).await;
    assert_eq!(st, 201, "{forks}");
    eprintln!("3 forks in {:?}", t.elapsed());
    let fork_ids = ids(&forks);
    assert_eq!(fork_ids.len(), 3);
    for f in forks["sandboxes"].as_array().unwrap() {
        assert_eq!(f["state"], "running", "{f}");
        assert_eq!(f["image"], src_row["image"]);
        assert_eq!(f["tier"], "s");
    }
    let (mut uuids, mut random, mut hosts) = (HashSet::new(), HashSet::new(), HashSet::new());
    for id in &fork_ids {
        assert_eq!(d.sh("web", id, "cat /root/note").await, "kept");
        // The counter process came along and goes on counting.
        let c = d.counter("web", id).await;
        d.counter_moves("web", id, c).await;
        uuids.insert(d.sh("web", id, "cat /proc/sys/kernel/random/uuid").await);
        random.insert(
            d.sh("web", id, "head -c 16 /dev/urandom | od -An -tx1")
                .await,
        );
        let h = d.sh("web", id, "hostname").await;
        assert_eq!(&h, id);
        hosts.insert(h);
    }
    assert_eq!(uuids.len(), 3, "{uuids:?}");
    assert_eq!(random.len(), 3, "{random:?}");
    assert_eq!(hosts.len(), 3, "{hosts:?}");

    // The snapshot does not depend on its source...
    d.delete("web", &src).await;
    assert!(!d.home.path().join("suspended").join(&src).exists());
    let one = d.create(ADMIN, "web", json!({"from_snapshot": "s1"})).await;
    assert!(
        one["sandboxes"].is_null(),
        "without count, one Sandbox: {one}"
    );
    let one_id = one["id"].as_str().unwrap().to_string();
    assert_eq!(d.sh("web", &one_id, "cat /root/note").await, "kept");

    // ...and the forks do not depend on the snapshot: deleted, they run, suspend and resume.
    let (st, _) = d
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("{G}/web/snapshots/s1"),
            None,
        )
        .await;
    assert_eq!(st, 204);
    assert!(!dir.exists());
    let f = &fork_ids[0];
    d.sh("web", f, "echo more >> /root/note").await;
    for verb in ["suspend", "resume"] {
        let (st, v, _) = d.lifecycle("web", f, verb).await;
        assert_eq!(st, 200, "{verb}: {v}");
    }
    assert_eq!(d.sh("web", f, "cat /root/note").await, "kept\nmore");
    let c = d.counter("web", f).await;
    d.counter_moves("web", f, c).await;
    assert_eq!(d.sh("web", &one_id, "cat /root/note").await, "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_routes_validate_scope_and_conflicts() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    d.put_group("other", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    d.sh("web", &id, "echo v1 > /root/v").await;

    // A suspended sandbox is resumed for the snapshot and runs on afterwards.
    let (st, v, _) = d.lifecycle("web", &id, "suspend").await;
    assert_eq!(st, 200, "{v}");
    let (st, snap) = snapshot(&d, ADMIN, "web", &id, "base-1").await;
    assert_eq!(st, 201, "{snap}");
    assert_eq!(d.state("web", &id).await, "running");

    // Bad names, duplicates, unknown fields.
    for bad in ["Bad", "-x", "a/b", "", &"x".repeat(64)] {
        let (st, e) = snapshot(&d, ADMIN, "web", &id, bad).await;
        assert_eq!(st, 400, "{bad:?}: {e}");
        assert!(msg(&e).contains("snapshot name"), "{e}");
    }
    let (st, e) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/web/sandboxes/{id}/snapshots"),
            Some(json!({"name": "x", "memory": true})),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = snapshot(&d, ADMIN, "web", &id, "base-1").await;
    assert_eq!(st, 409, "{e}");
    assert!(msg(&e).contains("exists already"), "{e}");
    let (st, e) = snapshot(&d, ADMIN, "web", "sb-000000000000", "n").await;
    assert_eq!(st, 404, "{e}");

    // Get, list, unknown.
    let (st, got) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/web/snapshots/base-1"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got, snap);
    let (st, list) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/snapshots"), None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(list, json!({"snapshots": [snap]}));
    for m in ["GET", "DELETE"] {
        let (st, e) = d
            .call(Some(ADMIN), m, &format!("{G}/web/snapshots/nope"), None)
            .await;
        assert_eq!(st, 404, "{m}: {e}");
        let (st, e) = d
            .call(Some(ADMIN), m, &format!("{G}/web/snapshots/Nope"), None)
            .await;
        assert_eq!(st, 400, "{m}: {e}");
    }

    // Forks: what the request may not say.
    for (body, want) in [
        (json!({"from_snapshot": "nope"}), 404),
        (json!({"from_snapshot": "base-1", "count": 0}), 400),
        (json!({"from_snapshot": "base-1", "count": 17}), 400),
        // Rules between fields, which the schema cannot state: 422.
        (json!({"count": 2}), 422),
        (json!({"from_snapshot": "base-1", "image": "base"}), 422),
        (json!({"from_snapshot": "base-1", "tier": "m"}), 422),
        (json!({"from_snapshot": "Bad"}), 400),
    ] {
        let (st, e) = create(&d, "web", body.clone()).await;
        assert_eq!(st, want, "{body}: {e}");
    }
    // Snapshots are per group: the same name elsewhere is another snapshot (or none).
    let (st, e) = create(&d, "other", json!({"from_snapshot": "base-1"})).await;
    assert_eq!(st, 404, "{e}");

    // Keys: another group's key sees nothing; a reader reads but does not take or delete.
    let other = d.key("user", &["other"]).await;
    for (m, path) in [
        ("GET", format!("{G}/web/snapshots")),
        ("GET", format!("{G}/web/snapshots/base-1")),
        ("DELETE", format!("{G}/web/snapshots/base-1")),
    ] {
        let (st, e) = d.call(Some(&other), m, &path, None).await;
        assert_eq!(st, 404, "{m} {path}: {e}");
    }
    let (st, e) = snapshot(&d, &other, "web", &id, "mine").await;
    assert_eq!(st, 404, "{e}");
    let reader = d.key("reader", &["web"]).await;
    let (st, _) = d
        .call(
            Some(&reader),
            "GET",
            &format!("{G}/web/snapshots/base-1"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, e) = snapshot(&d, &reader, "web", &id, "mine").await;
    assert_eq!(st, 403, "{e}");
    let (st, e) = d
        .call(
            Some(&reader),
            "DELETE",
            &format!("{G}/web/snapshots/base-1"),
            None,
        )
        .await;
    assert_eq!(st, 403, "{e}");

    // A group with snapshots is not deleted without force; with force they go too.
    d.delete("web", &id).await;
    let (st, e) = d
        .call(Some(ADMIN), "DELETE", &format!("{G}/web"), None)
        .await;
    assert_eq!(st, 409, "{e}");
    assert!(msg(&e).contains("snapshot"), "{e}");
    let (st, e) = d
        .call(Some(ADMIN), "DELETE", &format!("{G}/web?force=true"), None)
        .await;
    assert_eq!(st, 204, "{e}");
    assert!(!d.home.path().join("snapshots/web").exists());
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let (st, list) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/snapshots"), None)
        .await;
    assert_eq!((st, list), (200, json!({"snapshots": []})));
}

/// A streamed exec's NDJSON lines, each checked against the documented ExecEvent; `started`
/// gets a message when the first line arrives.
async fn stream_exec(
    d: &Daemon,
    path: &str,
    script: &str,
    started: tokio::sync::oneshot::Sender<()>,
) -> Vec<Value> {
    let resp = d
        .http
        .post(format!("{}{path}", d.url()))
        .bearer_auth(ADMIN)
        .header("accept", "application/x-ndjson")
        .json(&json!({ "command": script }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let schema = &d.doc.as_ref().unwrap()["components"]["schemas"]["ExecEvent"];
    let mut body = resp.bytes_stream();
    let (mut buf, mut events, mut started) = (Vec::new(), Vec::new(), Some(started));
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: Value = serde_json::from_slice(&line).unwrap();
            validate(d.doc.as_ref().unwrap(), schema, &ev, "an ndjson exec event");
            events.push(ev);
            if let Some(s) = started.take() {
                let _ = s.send(());
            }
        }
    }
    events
}

/// Waits until `/run/<flag>` exists in the sandbox: the exec that creates it has started.
async fn wait_flag(d: &Daemon, group: &str, id: &str, flag: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, r) = d
            .exec(
                ADMIN,
                group,
                id,
                json!({ "command": format!("test -e /run/{flag}") }),
            )
            .await;
        assert_eq!(st, 200, "{r}");
        if r["exit_code"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "/run/{flag} never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_ends_running_execs_promptly() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    d.put_group("other", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    let sb = format!("{G}/web/sandboxes/{id}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let collected = d.exec(
        ADMIN,
        "web",
        &id,
        json!({"command": "touch /run/json-started; sleep 600"}),
    );
    let exec_path = format!("{sb}/exec");
    let streamed = stream_exec(&d, &exec_path, "echo started; sleep 600", tx);
    let delete = async {
        wait_flag(&d, "web", &id, "json-started").await;
        rx.await.unwrap();
        let t = Instant::now();
        let (st, e) = d.call(Some(ADMIN), "DELETE", &sb, None).await;
        assert_eq!(st, 204, "{e}");
        t.elapsed()
    };
    let t = Instant::now();
    let ((st, e), events, took) = tokio::join!(collected, streamed, delete);
    eprintln!("delete with two execs in flight took {took:?}");
    assert!(took < Duration::from_secs(10), "the delete took {took:?}");
    assert!(t.elapsed() < Duration::from_secs(120));
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "conflict");
    assert!(msg(&e).contains("deleted"), "{e}");
    assert_eq!(events[0], json!({"stdout": "started\n"}), "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "conflict", "{events:?}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deleted"),
        "{events:?}"
    );
    let (st, _) = d.call(Some(ADMIN), "GET", &sb, None).await;
    assert_eq!(st, 404);

    // A forced group delete does the same.
    let id = d.new_sandbox("other").await;
    let collected = d.exec(
        ADMIN,
        "other",
        &id,
        json!({"command": "touch /run/started; sleep 600"}),
    );
    let delete = async {
        wait_flag(&d, "other", &id, "started").await;
        let t = Instant::now();
        let (st, e) = d
            .call(
                Some(ADMIN),
                "DELETE",
                &format!("{G}/other?force=true"),
                None,
            )
            .await;
        assert_eq!(st, 204, "{e}");
        t.elapsed()
    };
    let ((st, e), took) = tokio::join!(collected, delete);
    assert!(
        took < Duration::from_secs(10),
        "the group delete took {took:?}"
    );
    assert_eq!(st, 409, "{e}");
    assert!(common::qemu_processes(&d.home.path().display().to_string()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_takes_lists_forks_and_removes_snapshots() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    d.sh("web", &id, "echo from-cli > /root/f").await;
    let run = |args: &[&str]| {
        let out = d.cli(ADMIN, args);
        assert!(
            out.status.success(),
            "moat {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run(&["sandbox", "snapshot", "web", &id, "cli-1"]);
    assert!(
        out.starts_with(&format!("snapshot cli-1 of {id} taken")),
        "{out}"
    );
    let table = run(&["snapshot", "ls", "web"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("cli-1") && table.contains(&id), "{table}");
    let list: Value = serde_json::from_str(&run(&["snapshot", "ls", "web", "--json"])).unwrap();
    assert_eq!(list["snapshots"][0]["name"], "cli-1");
    let one: Value =
        serde_json::from_str(&run(&["snapshot", "show", "web", "cli-1", "--json"])).unwrap();
    assert_eq!(one["sandbox"], id.as_str());
    assert!(run(&["snapshot", "show", "web", "cli-1"]).contains("sandbox:  sb-"));

    let out = run(&[
        "sandbox",
        "create",
        "web",
        "--from-snapshot",
        "cli-1",
        "--count",
        "2",
    ]);
    let forks: Vec<&str> = out.lines().collect();
    assert_eq!(forks.len(), 2, "{out}");
    for f in &forks {
        assert!(f.starts_with("sb-"), "{out}");
        assert_eq!(d.sh("web", f, "cat /root/f").await, "from-cli");
    }
    // Bad input is refused before anything is sent.
    let out = d.cli(
        ADMIN,
        &[
            "sandbox",
            "create",
            "web",
            "--from-snapshot",
            "cli-1",
            "--image",
            "base",
        ],
    );
    assert!(!out.status.success());
    let out = d.cli(ADMIN, &["sandbox", "create", "web", "--count", "2"]);
    assert!(!out.status.success());
    let out = d.cli(
        ADMIN,
        &[
            "sandbox",
            "create",
            "web",
            "--from-snapshot",
            "cli-1",
            "--count",
            "40",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("count must be 1–16"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(
        run(&["snapshot", "rm", "web", "cli-1"]).trim(),
        "snapshot cli-1 deleted"
    );
    let out = d.cli(ADMIN, &["snapshot", "show", "web", "cli-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_survive_kill_9_and_leftovers_are_removed() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    d.sh("web", &id, "echo durable > /root/d").await;
    let t = Instant::now();
    let (st, snap) = snapshot(&d, ADMIN, "web", &id, "keep").await;
    assert_eq!(st, 201, "{snap}");
    eprintln!(
        "snapshot of a tier-s sandbox: {:?}, {} bytes",
        t.elapsed(),
        snap["size_bytes"]
    );
    // What a crash mid-snapshot or mid-delete leaves behind.
    let root = d.home.path().join("snapshots");
    for leftover in [
        "web/.tmp-half-0123456789abcdef",
        "web/ghost",
        ".tmp-rm-gone-01",
    ] {
        std::fs::create_dir_all(root.join(leftover).join("s")).unwrap();
    }

    d.kill9();
    d.spawn(Some(ADMIN)).await;
    for leftover in [
        "web/.tmp-half-0123456789abcdef",
        "web/ghost",
        ".tmp-rm-gone-01",
    ] {
        assert!(!root.join(leftover).exists(), "{leftover} is still there");
    }
    let (st, got) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/snapshots/keep"), None)
        .await;
    assert_eq!((st, &got), (200, &snap));
    let fork = d
        .create(ADMIN, "web", json!({"from_snapshot": "keep"}))
        .await;
    let f = fork["id"].as_str().unwrap();
    assert_eq!(d.sh("web", f, "cat /root/d").await, "durable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_that_fails_leaves_nothing_behind() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    let (st, snap) = snapshot(&d, ADMIN, "web", &id, "broken").await;
    assert_eq!(st, 201, "{snap}");
    // A memory image cut in half: every restore of it fails.
    let memory = d.home.path().join("snapshots/web/broken/memory.bin");
    let len = std::fs::metadata(&memory).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (st, e) = create(&d, "web", json!({"from_snapshot": "broken", "count": 3})).await;
    assert_eq!(st, 500, "{e}");
    only_the_source_is_left(&d, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_of_which_one_fails_rolls_the_others_back() {
    // Room for the source and two forks (tier s: 1 GiB each): the third fork is refused.
    let d = Daemon::start_with_runtime_args(Some(ADMIN), &["--max-memory-mib", "3072"]).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("web").await;
    let (st, snap) = snapshot(&d, ADMIN, "web", &id, "three").await;
    assert_eq!(st, 201, "{snap}");
    let (st, e) = create(&d, "web", json!({"from_snapshot": "three", "count": 3})).await;
    assert_eq!(st, 429, "{e}");
    // The two that started are gone again, with their files and VMs.
    only_the_source_is_left(&d, &id).await;
    // And the room they took is free again: two forks fit.
    let (st, v) = create(&d, "web", json!({"from_snapshot": "three", "count": 2})).await;
    assert_eq!(st, 201, "{v}");
}

/// After a failed fork: group web lists only sandbox `id`, and no fork left a suspend or run
/// directory or a VM behind.
async fn only_the_source_is_left(d: &Daemon, id: &str) {
    let (_, list) = d
        .call(Some(ADMIN), "GET", &format!("{G}/web/sandboxes"), None)
        .await;
    assert_eq!(ids(&list), vec![id.to_string()]);
    let suspended: Vec<_> = std::fs::read_dir(d.home.path().join("suspended"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(suspended.is_empty(), "{suspended:?}");
    let run: Vec<_> = std::fs::read_dir(d.home.path().join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != id)
        .collect();
    assert!(run.is_empty(), "{run:?}");
    assert_eq!(
        common::qemu_processes(&d.home.path().display().to_string()).len(),
        1
    );
}
