//! End-to-end tests of the daemon's sandbox routes: the real `moat serve` booting real VMs.
//!
//! Each daemon gets its own MOAT_HOME (its database, socket and `run/` directory, so its
//! start-up adoption and orphan clean-up only ever see its own VMs) in which `kernels`,
//! `images`, `templates` and `initramfs` are symlinks to the shared test home, so the kernel,
//! the base image and its templates are built once per machine (`moat setup`), not per test.
//! Every JSON response is checked against the daemon's OpenAPI document.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{msg, validate, Daemon, ADMIN, G};
use common::COUNTER;
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_list_delete_and_roles() {
    let started = Instant::now();
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    d.put_group("other", json!({}), 201).await;
    let user = d.key("user", &["web"]).await;
    let reader = d.key("reader", &["web"]).await;
    let stranger = d.key("owner", &["other"]).await;

    // create: validation first, then roles, then the VM
    let path = format!("{G}/web/sandboxes");
    for (body, want) in [
        (json!({"imgae": "base"}), "unknown field"),
        (json!({"tier": "huge"}), "xs"),
        (json!({"env": {"1A": "x"}}), "invalid env key"),
        (json!({"labels": {"a": "not ok"}}), "label"),
    ] {
        let (st, e) = d.call(Some(&user), "POST", &path, Some(body.clone())).await;
        assert_eq!(st, 400, "{body}: {e}");
        assert!(msg(&e).contains(want), "{body}: {e}");
    }
    // Well-formed, but naming an image the daemon does not have: 422.
    let body = json!({"image": "no-such-image"});
    let (st, e) = d.call(Some(&user), "POST", &path, Some(body)).await;
    assert_eq!(st, 422, "{e}");
    assert!(msg(&e).contains("unknown image"), "{e}");
    let (st, e) = d.call(Some(&reader), "POST", &path, Some(json!({}))).await;
    assert_eq!(st, 403, "{e}");
    let (st, _) = d
        .call(Some(&stranger), "POST", &path, Some(json!({})))
        .await;
    assert_eq!(st, 404);

    let sb = d
        .create(
            &user,
            "web",
            json!({"env": {"FOO": "bar"}, "labels": {"app": "a"}}),
        )
        .await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sb-") && id.len() == 15, "{id}");
    assert_eq!(sb["tier"], "s", "the group's tier is the default");
    assert!(sb["image"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(common::qemu_processes(&id).len(), 1);
    let one = format!("{G}/web/sandboxes/{id}");

    // reads: the reader sees it, another group's key does not, as if it did not exist
    let (st, got) = d.call(Some(&reader), "GET", &one, None).await;
    assert_eq!((st, &got["state"]), (200, &json!("running")));
    // env often carries credentials: a reader sees the names only
    assert_eq!(got["env"], json!({"FOO": "<redacted>"}));
    let (_, l) = d.call(Some(&reader), "GET", &path, None).await;
    assert_eq!(l["sandboxes"][0]["env"], json!({"FOO": "<redacted>"}));
    let (_, got) = d.call(Some(&user), "GET", &one, None).await;
    assert_eq!(got["env"], json!({"FOO": "bar"}));
    let (st, e) = d.call(Some(&stranger), "GET", &one, None).await;
    assert_eq!(st, 404, "{e}");
    let (st, e) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/other/sandboxes/{id}"),
            None,
        )
        .await;
    assert_eq!(st, 404, "a sandbox is found only under its own group: {e}");
    for (sel, n) in [("app=a", 1), ("app=b", 0), ("app=a,x=y", 0), ("", 1)] {
        let (st, l) = d
            .call(Some(&reader), "GET", &format!("{path}?labels={sel}"), None)
            .await;
        assert_eq!(st, 200);
        assert_eq!(l["sandboxes"].as_array().unwrap().len(), n, "{sel}");
    }
    let (st, e) = d
        .call(Some(&reader), "GET", &format!("{path}?labels=app"), None)
        .await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = d
        .call(Some(&reader), "GET", &format!("{path}?lables=a=b"), None)
        .await;
    assert_eq!(st, 400, "{e}");

    // exec: env layers (image < sandbox < exec), exit codes, stderr, stdin, cwd, user
    let t = Instant::now();
    let (st, r) = d
        .exec(
            &user,
            "web",
            &id,
            json!({"argv": ["sh", "-c", "echo $FOO; echo err >&2; exit 3"]}),
        )
        .await;
    eprintln!("exec round trip: {:?}", t.elapsed());
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["stdout"], "bar\n");
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["timed_out"], false);
    let (_, r) = d
        .exec(
            &user,
            "web",
            &id,
            json!({"command": "echo $FOO:$PATH", "env": {"FOO": "baz"}}),
        )
        .await;
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .starts_with("baz:/usr/local/sbin"),
        "{r}"
    );
    let (_, r) = d
        .exec(
            &user,
            "web",
            &id,
            json!({"argv": ["cat"], "stdin": "hello\u{e9}"}),
        )
        .await;
    assert_eq!(r["stdout"], "hello\u{e9}");
    let (_, r) = d
        .exec(
            &user,
            "web",
            &id,
            json!({"command": "pwd; id -u", "cwd": "/tmp", "user": "nobody"}),
        )
        .await;
    assert_eq!(r["stdout"], "/tmp\n65534\n", "{r}");
    let (_, r) = d
        .exec(&user, "web", &id, json!({"command": "printf '\\377ok'"}))
        .await;
    assert_eq!(r["stdout"], "\u{fffd}ok", "invalid UTF-8 is replaced");
    let (st, r) = d
        .exec(&user, "web", &id, json!({"argv": ["no-such-command"]}))
        .await;
    assert_eq!((st, &r["exit_code"]), (200, &json!(127)), "{r}");
    assert!(
        r["stderr"].as_str().unwrap().contains("no-such-command"),
        "{r}"
    );
    let t = Instant::now();
    let (_, r) = d
        .exec(
            &user,
            "web",
            &id,
            json!({"command": "sleep 30", "timeout_s": 1}),
        )
        .await;
    assert_eq!(
        (&r["exit_code"], &r["timed_out"]),
        (&json!(124), &json!(true)),
        "{r}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    // a file written by one exec is there for the next
    d.sh("web", &id, "echo kept > /root/f").await;
    assert_eq!(d.sh("web", &id, "cat /root/f").await, "kept");

    // Allowed by the document, refused by a rule it cannot state: 422.
    for body in [json!({}), json!({"argv": ["x"], "command": "x"})] {
        let (st, e) = d.exec(&user, "web", &id, body.clone()).await;
        assert_eq!(st, 422, "{body}: {e}");
        assert!(msg(&e).contains("exactly one"), "{body}: {e}");
    }
    for (body, want) in [
        (json!({"argv": []}), "argv"),
        (json!({"command": "x", "cwd": "tmp"}), "absolute"),
        (json!({"command": "x", "user": "a b"}), "invalid user"),
        (json!({"command": "x", "timeout_s": 0}), "timeout_s"),
        (json!({"command": "x", "env": {"A-B": "x"}}), "env key"),
        (json!({"command": "x", "stdn": ""}), "unknown field"),
    ] {
        let (st, e) = d.exec(&user, "web", &id, body.clone()).await;
        assert_eq!(st, 400, "{body}: {e}");
        assert!(msg(&e).contains(want), "{body}: {e}");
    }
    let (st, _) = d
        .exec(&reader, "web", &id, json!({"command": "true"}))
        .await;
    assert_eq!(st, 403);
    let (st, _) = d
        .exec(&stranger, "web", &id, json!({"command": "true"}))
        .await;
    assert_eq!(st, 404);

    // output over the bound: 413, and the process is gone
    let (st, e) = d
        .exec(
            &user,
            "web",
            &id,
            json!({"command": "head -c 17000000 /dev/zero"}),
        )
        .await;
    assert_eq!(st, 413, "{e}");
    assert!(msg(&e).contains("x-ndjson"), "{e}");

    // streaming: events arrive as produced, each matching the documented ExecEvent
    let execs_timed = d
        .metric("moat_exec_duration_seconds_count")
        .await
        .unwrap_or(0.0);
    let t = Instant::now();
    let resp = d
        .http
        .post(format!("{}{one}/exec", d.url()))
        .bearer_auth(&user)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "echo one; sleep 1.5; echo two >&2; echo three; exit 5"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let schema = &d.doc.as_ref().unwrap()["components"]["schemas"]["ExecEvent"];
    let mut body = resp.bytes_stream();
    let (mut buf, mut events, mut first_at) = (Vec::new(), Vec::new(), None);
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: Value = serde_json::from_slice(&line).unwrap();
            validate(d.doc.as_ref().unwrap(), schema, &ev, "an ndjson exec event");
            first_at.get_or_insert(t.elapsed());
            events.push(ev);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(events[0], json!({"stdout": "one\n"}), "{events:?}");
    assert!(
        first_at.unwrap() + Duration::from_secs(1) < t.elapsed(),
        "the first line came only at the end: {first_at:?} of {:?}",
        t.elapsed()
    );
    assert!(events.contains(&json!({"stderr": "two\n"})), "{events:?}");
    assert!(events.contains(&json!({"stdout": "three\n"})), "{events:?}");
    assert_eq!(
        events.last().unwrap(),
        &json!({"exit": {"exit_code": 5, "signal": null, "timed_out": false}})
    );
    // a streamed exec is timed too, once its command has exited
    assert_eq!(
        d.metric("moat_exec_duration_seconds_count")
            .await
            .unwrap_or(0.0),
        execs_timed + 1.0
    );

    // delete: only users and up; then the VM is gone and the id unknown
    let (st, _) = d.call(Some(&reader), "DELETE", &one, None).await;
    assert_eq!(st, 403);
    let (st, _) = d.call(Some(&stranger), "DELETE", &one, None).await;
    assert_eq!(st, 404);
    let (st, _) = d.call(Some(&user), "DELETE", &one, None).await;
    assert_eq!(st, 204);
    assert!(common::qemu_processes(&id).is_empty());
    let (st, _) = d.call(Some(&user), "GET", &one, None).await;
    assert_eq!(st, 404);
    let (st, _) = d.exec(&user, "web", &id, json!({"command": "true"})).await;
    assert_eq!(st, 404);
    assert!(!d.home.path().join("run").join(&id).exists());

    // a forced group delete takes its sandboxes' VMs along
    let sb = d.create(&user, "web", json!({})).await;
    let id2 = sb["id"].as_str().unwrap().to_string();
    let (st, e) = d
        .call(Some(ADMIN), "DELETE", &format!("{G}/web"), None)
        .await;
    assert_eq!(st, 409, "{e}");
    let (st, _) = d
        .call(Some(ADMIN), "DELETE", &format!("{G}/web?force=true"), None)
        .await;
    assert_eq!(st, 204);
    assert!(common::qemu_processes(&id2).is_empty());
    eprintln!("create_exec_list_delete_and_roles: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_running_sandboxes() {
    let started = Instant::now();
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("web", json!({"tier": "s"}), 201).await;
    let keep = d.new_sandbox("web").await;
    let lost = d.new_sandbox("web").await;
    let stray = d.new_sandbox("web").await;
    d.sh("web", &keep, "echo kept > /root/f").await;
    d.sh("web", &keep, COUNTER).await;
    d.counter_moves("web", &keep, d.counter("web", &keep).await)
        .await;

    // A graceful stop leaves the VMs to the next daemon.
    d.terminate();
    assert_eq!(common::qemu_processes(&keep).len(), 1);
    d.spawn(Some(ADMIN)).await;
    d.counter_moves("web", &keep, d.counter("web", &keep).await)
        .await;

    // kill -9: the VMs live on. Meanwhile one VM dies and one row goes missing.
    d.kill9();
    for id in [&keep, &lost, &stray] {
        assert_eq!(common::qemu_processes(id).len(), 1, "{id} survives kill -9");
    }
    for pid in common::qemu_processes(&lost) {
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    d.db_execute("DELETE FROM sandboxes WHERE id = ?1", &[stray.as_str()])
        .unwrap();
    let t = Instant::now();
    d.spawn(Some(ADMIN)).await;
    eprintln!("restart with adoption: {:?}", t.elapsed());

    // The kept sandbox: running, its file and background process intact.
    assert_eq!(d.state("web", &keep).await, "running");
    assert_eq!(d.sh("web", &keep, "cat /root/f").await, "kept");
    d.counter_moves("web", &keep, d.counter("web", &keep).await)
        .await;
    // The one whose VM died: failed, with a reason, and exec says so.
    let sb = d.get("web", &lost).await.expect("the failed sandbox");
    assert_eq!(sb["state"], "failed", "{sb}");
    assert!(
        sb["reason"].as_str().unwrap().contains("VM was gone"),
        "{sb}"
    );
    let (st, e) = d
        .exec(ADMIN, "web", &lost, json!({"command": "true"}))
        .await;
    assert_eq!(st, 409, "{e}");
    assert!(msg(&e).contains("failed"), "{e}");
    // A failed sandbox can still be deleted.
    d.delete("web", &lost).await;
    // The VM no row claims was destroyed.
    assert!(
        common::qemu_processes(&stray).is_empty(),
        "the stray VM was destroyed"
    );
    assert!(!d.home.path().join("run").join(&stray).exists());

    d.delete("web", &keep).await;
    assert!(common::qemu_processes(&keep).is_empty());
    eprintln!("restarts_keep_running_sandboxes: {:?}", started.elapsed());
}
