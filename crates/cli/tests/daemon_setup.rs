//! A daemon on a MOAT_HOME that lacks the guest assets prepares them itself, with the code of
//! `moat setup`: `/healthz` shows the progress, the sandbox routes answer 503 with the step and
//! a `Retry-After` meanwhile, a failure is reported and tried again, and once ready a sandbox
//! runs without a restart.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{check_response, msg, Daemon, ADMIN, G};
use serde_json::{json, Value};

/// The `sandboxes` part of `/healthz` (checked against the OpenAPI document).
async fn health(d: &Daemon) -> Value {
    let (st, h) = d.call(None, "GET", "/healthz", None).await;
    assert_eq!(st, 200, "{h}");
    // No runtime yet: nothing to say about its jail.
    if h["sandboxes"]["state"] != "ready" {
        assert!(h.get("jail").is_none(), "{h}");
    }
    h["sandboxes"].clone()
}

/// Polls `/healthz` until its sandboxes state is `want`, recording each new (state, step,
/// attempt) in `seen`. Returns the last `sandboxes` value.
async fn wait_for(
    d: &Daemon,
    want: &str,
    limit: Duration,
    seen: &mut Vec<(String, String, u64)>,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let h = health(d).await;
        let now = (
            h["state"].as_str().unwrap().to_string(),
            h["step"].as_str().unwrap_or("-").to_string(),
            h["attempt"].as_u64().unwrap(),
        );
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        if h["state"] == want {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "sandboxes never became {want}: {seen:?}; log:\n{}",
            d.stderr(1)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sandbox create that must be refused with 503 and `Retry-After`; returns the message.
async fn create_refused(d: &Daemon) -> (String, u64) {
    let path = format!("{G}/fresh/sandboxes");
    let resp = d
        .http
        .post(format!("{}{path}", d.url()))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    let body: Value = resp.json().await.unwrap();
    check_response(d.doc.as_ref().unwrap(), "POST", &path, status, &body);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let retry = retry.unwrap_or_else(|| panic!("no Retry-After on {body}"));
    assert!((1..=300).contains(&retry), "Retry-After {retry}");
    (msg(&body), retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_home_is_prepared_by_the_daemon_and_a_failure_is_retried() {
    // The base image (mmdebstrap takes minutes) and the templates made from it come from the
    // shared test home; the guest kernel (apt-get download, unpacking, modules) and the
    // initramfs are this daemon's own work.
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("moat-agent");
    // First a guest agent that cannot be a guest's /init (dynamically linked): the last step
    // fails, and the daemon must say so and try again.
    std::fs::copy("/bin/true", &agent).unwrap();
    let d = Daemon::start_partial(&["images", "templates"], agent.clone(), Some(ADMIN)).await;
    assert!(!d.home.path().join("kernels").exists());
    d.put_group("fresh", json!({}), 201).await;

    let mut seen = Vec::new();
    let first = health(&d).await;
    assert_eq!(first["state"], "preparing", "{first}");
    assert_eq!(first["steps_total"], 3);
    let (m, retry) = create_refused(&d).await;
    assert!(
        m.contains("preparing") && m.contains("of 3"),
        "the 503 names the step: {m}"
    );
    assert_eq!(retry, 5);

    let failed = wait_for(&d, "failed", Duration::from_secs(300), &mut seen).await;
    assert_eq!(
        seen.first().map(|s| s.0.as_str()),
        Some("preparing"),
        "{seen:?}"
    );
    assert_eq!(failed["step"], "initramfs", "{failed}");
    assert_eq!(failed["steps_done"], 2, "{failed}");
    assert_eq!(failed["attempt"], 1, "{failed}");
    let why = failed["message"].as_str().unwrap();
    assert!(
        why.contains("crt-static") && why.contains("tries again"),
        "{why}"
    );
    let retry_in = failed["retry_after_s"].as_u64().unwrap();
    assert!((1..=10).contains(&retry_in), "{failed}");
    let (m, _) = create_refused(&d).await;
    assert!(m.contains("crt-static"), "the 503 says why: {m}");
    // The kernel is the daemon's own download, kept for the next attempt.
    let kernels: Vec<_> = std::fs::read_dir(d.home.path().join("kernels"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(kernels.len(), 1, "{kernels:?}");
    let log = d.stderr(1);
    for line in [
        "step 1 of 3: installing the guest kernel",
        "guest kernel 6.",
        "step 2 of 3",
        "base image base present",
        "step 3 of 3",
        "preparing sandboxes failed (attempt 1)",
    ] {
        assert!(log.contains(line), "{line:?} not in the log:\n{log}");
    }

    // The cause is fixed: the next attempt succeeds, and sandboxes work without a restart.
    std::fs::copy(common::agent(), &agent).unwrap();
    let ready = wait_for(&d, "ready", Duration::from_secs(300), &mut seen).await;
    assert!(
        seen.iter().any(|s| s.0 == "preparing" && s.2 == 2),
        "a second attempt: {seen:?}"
    );
    assert_eq!(ready["steps_done"], 3, "{ready}");
    assert!(d.stderr(1).contains("sandboxes are ready"));
    // Once ready, /healthz says how sandboxes are jailed, as the runtime found the host.
    let (_, h) = d.call(None, "GET", "/healthz", None).await;
    let jail = h["jail"]
        .as_str()
        .unwrap_or_else(|| panic!("no jail in {h}"));
    let expected = if std::env::var("MOAT_NO_JAIL").is_ok_and(|v| v == "1") {
        jail == "off (MOAT_NO_JAIL=1)"
    } else {
        jail.starts_with("on: ") && jail.contains("namespaces") && jail.contains("cgroup v")
    };
    assert!(expected, "{jail}");
    let id = d.new_sandbox("fresh").await;
    let (st, r) = d
        .exec(ADMIN, "fresh", &id, json!({"command": "true"}))
        .await;
    assert_eq!((st, &r["exit_code"]), (200, &json!(0)), "{r}");
    d.delete("fresh", &id).await;
}
