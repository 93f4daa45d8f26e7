//! End-to-end tests of the daemon's background-process routes: the real `moat serve` and a
//! real VM; every JSON answer is checked against the daemon's OpenAPI document.

mod common;

use common::daemon::{msg, Daemon, ADMIN, G};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_through_the_daemon() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    for g in ["web", "other"] {
        d.put_group(g, json!({"tier": "s"}), 201).await;
    }
    let user = d.key("user", &["web"]).await;
    let reader = d.key("reader", &["web"]).await;
    let stranger = d.key("owner", &["other"]).await;
    let sb = d.create(&user, "web", json!({"env": {"SB": "sb"}})).await;
    let id = sb["id"].as_str().unwrap().to_string();
    let base = format!("{G}/web/sandboxes/{id}/processes");

    // Start: env merged as exec merges it (sandbox < request).
    let (st, p1) = d
        .call(
            Some(&user),
            "POST",
            &base,
            Some(json!({"command": "echo out $SB $X; echo err >&2; sleep 1", "env": {"X": "x"}})),
        )
        .await;
    assert_eq!(st, 201, "{p1}");
    let p1 = p1["id"].as_str().unwrap().to_string();
    let (st, p2) = d
        .call(
            Some(&user),
            "POST",
            &base,
            Some(json!({"argv": ["sleep", "600"]})),
        )
        .await;
    assert_eq!(st, 201, "{p2}");
    assert!(p2["pid"].as_u64().unwrap() > 1, "{p2}");
    let p2 = p2["id"].as_str().unwrap().to_string();

    // List: both, the sleeper running.
    let (st, l) = d.call(Some(&reader), "GET", &base, None).await;
    assert_eq!(st, 200, "{l}");
    let procs = l["processes"].as_array().unwrap();
    let sleeper = procs.iter().find(|p| p["id"] == json!(p2)).unwrap();
    assert_eq!(sleeper["running"], json!(true), "{l}");
    assert_eq!(sleeper["argv"], json!(["sleep", "600"]), "{l}");
    assert!(sleeper["exit"].is_null(), "{l}");
    assert!(
        sleeper["started_at"].as_str().unwrap().ends_with('Z'),
        "{l}"
    );

    // Wait → exit 0 (a reader may wait), then its logs.
    let (st, w) = d
        .call(
            Some(&reader),
            "POST",
            &format!("{base}/{p1}/wait?timeout_s=30"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{w}");
    assert_eq!(
        w,
        json!({"exit_code": 0, "signal": null, "timed_out": false})
    );
    let (st, logs) = d
        .call(Some(&reader), "GET", &format!("{base}/{p1}/logs"), None)
        .await;
    assert_eq!(st, 200, "{logs}");
    assert_eq!(logs, json!({"stdout": "out sb x\n", "stderr": "err\n"}));

    // A wait that runs out: 409; a bad timeout: 400.
    let (st, e) = d
        .call(
            Some(&user),
            "POST",
            &format!("{base}/{p2}/wait?timeout_s=0.2"),
            None,
        )
        .await;
    assert_eq!(st, 409, "{e}");
    assert!(msg(&e).contains("still running"), "{e}");
    let (st, _) = d
        .call(
            Some(&user),
            "POST",
            &format!("{base}/{p2}/wait?timeout_s=301"),
            None,
        )
        .await;
    assert_eq!(st, 400);

    // Readers may not start or kill; strangers see nothing.
    let (st, e) = d
        .call(
            Some(&reader),
            "POST",
            &base,
            Some(json!({"argv": ["true"]})),
        )
        .await;
    assert_eq!(st, 403, "{e}");
    let (st, _) = d
        .call(Some(&reader), "POST", &format!("{base}/{p2}/kill"), None)
        .await;
    assert_eq!(st, 403);
    for (m, path) in [
        ("GET", base.clone()),
        ("GET", format!("{base}/{p2}/logs")),
        ("POST", format!("{base}/{p2}/kill")),
        ("POST", format!("{base}/{p2}/wait?timeout_s=0")),
    ] {
        let (st, e) = d.call(Some(&stranger), m, &path, None).await;
        assert_eq!(st, 404, "{m} {path}: {e}");
    }

    // Unknown and malformed process ids: 404. Bad requests: 400.
    for bad in ["p999", "x1", "p"] {
        let (st, e) = d
            .call(Some(&user), "GET", &format!("{base}/{bad}/logs"), None)
            .await;
        assert_eq!(st, 404, "{bad}: {e}");
        let (st, _) = d
            .call(
                Some(&user),
                "POST",
                &format!("{base}/{bad}/wait?timeout_s=0"),
                None,
            )
            .await;
        assert_eq!(st, 404, "{bad}");
        let (st, _) = d
            .call(Some(&user), "POST", &format!("{base}/{bad}/kill"), None)
            .await;
        assert_eq!(st, 404, "{bad}");
    }
    for (path, body, status) in [
        // Allowed by the schema, refused by a rule it cannot state.
        (base.clone(), json!({"argv": ["x"], "command": "x"}), 422),
        (base.clone(), json!({"argv": ["x"], "stdin": "x"}), 400),
        (format!("{base}/{p2}/kill"), json!({"signal": 0}), 400),
    ] {
        let (st, _) = d.call(Some(&user), "POST", &path, Some(body.clone())).await;
        assert_eq!(st, status, "{path} {body}");
    }

    // The sleeper survives a daemon kill -9: the VM and its agent keep it.
    d.kill9();
    d.spawn(Some(ADMIN)).await;
    let (st, l) = d.call(Some(&user), "GET", &base, None).await;
    assert_eq!(st, 200, "{l}");
    let sleeper = l["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == json!(p2))
        .cloned();
    assert_eq!(sleeper.unwrap()["running"], json!(true), "{l}");

    // Kill (default SIGTERM) → signal 15.
    let (st, k) = d
        .call(Some(&user), "POST", &format!("{base}/{p2}/kill"), None)
        .await;
    assert_eq!(st, 204, "{k}");
    let (st, w) = d
        .call(
            Some(&user),
            "POST",
            &format!("{base}/{p2}/wait?timeout_s=10"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{w}");
    assert_eq!(
        w,
        json!({"exit_code": 143, "signal": 15, "timed_out": false})
    );
    let (st, l) = d.call(Some(&reader), "GET", &base, None).await;
    assert_eq!(st, 200);
    let sleeper = l["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == json!(p2))
        .cloned()
        .unwrap();
    assert_eq!(sleeper["running"], json!(false), "{l}");
    assert_eq!(
        sleeper["exit"],
        json!({"code": null, "signal": 15, "timed_out": false}),
        "{l}"
    );
    // Killing a finished process changes nothing.
    let (st, _) = d
        .call(
            Some(&user),
            "POST",
            &format!("{base}/{p2}/kill"),
            Some(json!({"signal": 9})),
        )
        .await;
    assert_eq!(st, 204);

    let (st, _) = d
        .call(
            Some(&user),
            "DELETE",
            &format!("{G}/web/sandboxes/{id}"),
            None,
        )
        .await;
    assert_eq!(st, 204);
}
