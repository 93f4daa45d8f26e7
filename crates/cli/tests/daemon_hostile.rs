//! A guest that turns on the host, through the daemon with real VMs. Root in a sandbox takes
//! its agent's own port to the host (`hostile/evil_agent.py` duplicates PID 1's descriptor
//! with `pidfd_getfd`: no test code in the agent) and writes what a hostile agent would:
//! lengths that lie, an unknown frame kind, a frame that drips in a byte at a time, and
//! frames that keep the framing but break every rule (unknown streams, garbage messages,
//! thousands of guest-opened streams never closed, a flood nobody reads); or it freezes every
//! process of the guest, its agent with them. The daemon must stay up with bounded memory,
//! show the sandbox's `health`, recover it with a new session (or fail it with the reason and
//! stop its VM), answer the sandbox's requests meanwhile with a clear error, never a 500, and
//! leave the neighbour sandbox untouched.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, ADMIN, G};
use futures_util::StreamExt;
use serde_json::{json, Value};

const EVIL: &str = include_str!("hostile/evil_agent.py");
const GROUP: &str = "hostile";

/// Puts the hostile agent at `/tmp/evil.py` in sandbox `id`.
async fn install(d: &Daemon, id: &str) {
    let (st, r) = d
        .call_raw(
            Some(ADMIN),
            "PUT",
            &format!("{G}/{GROUP}/sandboxes/{id}/files?path=/tmp/evil.py"),
            Some(EVIL.as_bytes().to_vec()),
        )
        .await;
    assert!(st == 200 || st == 201, "{st} {r}");
}

/// Runs the hostile agent's `case` in the background of sandbox `id` (the exec answers first:
/// its own stream would die with the session).
async fn unleash(d: &Daemon, id: &str, case: &str) {
    d.sh(
        GROUP,
        id,
        &format!(
            "(sleep 0.5; python3 /tmp/evil.py {case} > /tmp/evil.log 2>&1) > /dev/null 2>&1 &"
        ),
    )
    .await;
}

/// How many times the daemon recovered an agent with a new session (only `evil`'s breaks).
async fn recoveries(d: &Daemon) -> usize {
    d.metric(r#"moat_agent_recoveries_total{outcome="recovered"}"#)
        .await
        .unwrap_or(0.0) as usize
}

/// The daemon's resident memory, in KiB.
fn rss_kib(d: &Daemon) -> u64 {
    let pid = d.pid().expect("the daemon runs");
    moat_vm::qemu::status_field(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next().map(str::to_string))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Polls sandbox `id` until `done` holds for it; panics after `within`.
async fn wait_for(
    d: &Daemon,
    id: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let sb = d.get(GROUP, id).await.expect("the sandbox");
        if done(&sb) {
            eprintln!("{id}: {what} after {:?}", t.elapsed());
            return sb;
        }
        assert!(
            t.elapsed() < within,
            "{id}: not {what} after {within:?}: {sb}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Downloads `limit` bytes of `/dev/zero` from sandbox `id`, then hangs up.
async fn endless_download(d: &Daemon, id: &str, limit: usize) {
    let resp = d
        .http
        .get(format!(
            "{}{G}/{GROUP}/sandboxes/{id}/files?path=/dev/zero",
            d.url()
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.content_length(),
        None,
        "the guest's size was passed on"
    );
    let mut body = resp.bytes_stream();
    let mut got = 0;
    while got < limit {
        let chunk = body.next().await.expect("/dev/zero ended").unwrap();
        assert!(chunk.iter().all(|&b| b == 0));
        got += chunk.len();
    }
}

async fn echo(d: &Daemon, id: &str, word: &str) {
    assert_eq!(d.sh(GROUP, id, &format!("echo {word}")).await, word);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_is_contained_recovered_or_failed() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group(GROUP, json!({"tier": "xs"}), 201).await;
    let neighbour = d.new_sandbox(GROUP).await;
    let evil = d.new_sandbox(GROUP).await;
    let sb = d.get(GROUP, &evil).await.unwrap();
    assert_eq!(sb["health"], json!({"agent": "ok"}), "{sb}");
    install(&d, &evil).await;
    let rss_before = rss_kib(&d);

    // A file whose size lies with no help from a hostile agent: /dev/zero says 0 bytes and
    // never ends. The download streams what comes, within flow control; a client that hangs
    // up ends the guest's read, and the session holds.
    endless_download(&d, &evil, 16 << 20).await;
    echo(&d, &evil, "after-endless").await;
    assert_eq!(recoveries(&d).await, 0, "{}", d.stderr(1));

    // Frames that keep the framing but break every rule: ignored or reset one by one; the
    // session holds, nothing needs recovering.
    // Waited out, not polled: the only way to ask the guest is the channel the hostile
    // writes go into, and a reply of the real agent interleaved with them breaks the framing
    // (a recovery this test must not count). The writes take ~1 s under TCG.
    unleash(&d, &evil, "noise").await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    echo(&d, &evil, "after-noise").await;
    let log = d.sh(GROUP, &evil, "cat /tmp/evil.log").await;
    assert!(log.is_empty(), "the hostile agent failed: {log}");
    assert_eq!(recoveries(&d).await, 0, "{}", d.stderr(1));
    echo(&d, &neighbour, "fine").await;

    // Each of these breaks the framing: the daemon ends the session, shows it, starts a new
    // one, and the sandbox answers again.
    for (i, case) in ["oversized", "unknown-kind", "drip"]
        .into_iter()
        .enumerate()
    {
        unleash(&d, &evil, case).await;
        let t = Instant::now();
        while recoveries(&d).await <= i {
            if t.elapsed() > Duration::from_secs(60) {
                panic!(
                    "{case}: no recovery; the sandbox: {:?}; the daemon: {}",
                    d.get(GROUP, &evil).await,
                    d.stderr(1)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("{case}: recovered after {:?}", t.elapsed());
        echo(&d, &evil, "back").await;
        let sb = d.get(GROUP, &evil).await.unwrap();
        assert_eq!(sb["state"], "running", "{sb}");
        assert_eq!(sb["health"]["agent"], "ok", "{sb}");
        echo(&d, &neighbour, "fine").await;
    }

    // A guest that keeps breaking it gets no endless reconnects: failed, with the reason.
    unleash(&d, &evil, "short").await;
    let sb = wait_for(&d, &evil, Duration::from_secs(60), "failed", |sb| {
        sb["state"] == "failed"
    })
    .await;
    let reason = sb["reason"].as_str().unwrap();
    assert!(reason.contains("stopped answering"), "{reason}");
    assert!(reason.contains("recovering 3 times"), "{reason}");
    assert!(
        common::qemu_processes(&evil).is_empty(),
        "its QEMU lives on"
    );
    let (st, r) = d
        .exec(ADMIN, GROUP, &evil, json!({"command": "true"}))
        .await;
    assert_eq!(st, 409, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stopped answering"),
        "{r}"
    );

    // Bounded memory: the flood and the lies cost the daemon little.
    let rss_after = rss_kib(&d);
    eprintln!("daemon RSS: {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the daemon grew from {rss_before} to {rss_after} KiB"
    );

    // A silent agent: every process of the guest frozen (suspend to idle, nothing wakes it).
    let silent = d.new_sandbox(GROUP).await;
    let states = d.sh(GROUP, &silent, "cat /sys/power/state").await;
    assert!(
        states.contains("freeze"),
        "the guest kernel cannot freeze: {states}"
    );
    d.sh(
        GROUP,
        &silent,
        "(sleep 0.5; echo freeze > /sys/power/state) > /dev/null 2>&1 &",
    )
    .await;
    let sb = wait_for(&d, &silent, Duration::from_secs(60), "unresponsive", |sb| {
        sb["health"]["agent"] == "unresponsive"
    })
    .await;
    assert!(
        sb["health"]["reason"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{sb}"
    );
    assert!(sb["health"]["since"].is_string(), "{sb}");
    assert_eq!(sb["state"], "running", "{sb}");
    // A request meanwhile: a clear error (the agent's, or that it is being recovered).
    let (st, r) = d
        .exec(ADMIN, GROUP, &silent, json!({"command": "true"}))
        .await;
    assert!(st == 502 || st == 409, "{st} {r}");
    echo(&d, &neighbour, "fine").await;
    let sb = wait_for(&d, &silent, Duration::from_secs(90), "failed", |sb| {
        sb["state"] == "failed"
    })
    .await;
    let reason = sb["reason"].as_str().unwrap();
    assert!(reason.contains("stopped answering"), "{reason}");
    assert!(
        common::qemu_processes(&silent).is_empty(),
        "its QEMU lives on"
    );

    // The daemon and the neighbour are as they were; the failed sandboxes go on delete.
    echo(&d, &neighbour, "still-fine").await;
    let (st, h) = d.call(None, "GET", "/healthz", None).await;
    assert_eq!(st, 200, "{h}");
    for id in [&evil, &silent, &neighbour] {
        d.delete(GROUP, id).await;
    }
}
