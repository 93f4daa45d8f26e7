//! Group secrets end to end: `moat secret set|ls|rm` against a real `moat serve`, the value
//! from stdin, never in any answer, the database or the daemon's log (at debug level).

mod common;

use std::io::Write;
use std::process::Stdio;

use common::daemon::{Daemon, ADMIN, G};
use serde_json::json;

const VALUE: &str = "sk-cli-secret-VALUE-9f3a";

#[tokio::test]
async fn cli_sets_lists_and_removes_secrets_and_the_value_stays_hidden() {
    let mut d = Daemon::start(Some(ADMIN)).await;
    // Again with debug logs: the log is checked for the value at the end.
    d.terminate();
    d.args.push("-vv".into());
    d.spawn(None).await;
    d.put_group("sec", json!({}), 201).await;

    let mut set = common::daemon::moat()
        .args(["secret", "set", "sec", "openai"])
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(format!("{VALUE}\n").as_bytes())
        .unwrap();
    let out = set.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("secret openai of group sec created"),
        "{text}"
    );

    let out = d.cli(ADMIN, &["secret", "ls", "sec"]);
    let ls = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success());
    assert!(ls.contains("openai") && !ls.contains(VALUE), "{ls}");
    let out = d.cli(ADMIN, &["secret", "ls", "sec", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["secrets"][0]["name"], "openai");

    // The trailing newline was dropped: a transform naming it is accepted, and the group's
    // spec holds the placeholder only.
    let (st, g) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/sec"),
            Some(
                json!({"egress": {"rules": [{"host": "api.example.com", "ports": [443],
                "transform": {"headers": {"Authorization": "Bearer ${secret:openai}"}}}]}}),
            ),
        )
        .await;
    assert_eq!(st, 200, "{g}");
    assert!(!g.to_string().contains(VALUE));

    // No value on stdin: a clear error, nothing sent.
    let out = common::daemon::moat()
        .args(["secret", "set", "sec", "empty"])
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no value on stdin"));

    let out = d.cli(ADMIN, &["secret", "rm", "sec", "openai"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli(ADMIN, &["secret", "rm", "sec", "openai"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no secret"));

    // Nowhere on disk in the clear: not the database (WAL included), not the log.
    for f in std::fs::read_dir(d.home.path()).unwrap().flatten() {
        if f.path().is_file() {
            let bytes = std::fs::read(f.path()).unwrap();
            assert!(
                !bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
                "{} holds the value",
                f.path().display()
            );
        }
    }
    assert!(
        d.stderr(2).contains("INFO"),
        "logs at debug level: {}",
        d.stderr(2)
    );
}
