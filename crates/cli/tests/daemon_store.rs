//! The store behind `moat serve --store`: a bad or unreachable PostgreSQL is refused at start
//! with a message that says what is allowed, and a daemon on PostgreSQL rides out a restart of
//! the server (it reconnects by itself, and answers 503 only while the server is down).
//! Each test that needs PostgreSQL starts a throwaway one of its own (scripts/postgres.sh).

mod common;

use common::daemon::{moat, Daemon, ADMIN, G};
use moat_testkit::postgres::Postgres;
use serde_json::json;

/// `moat serve --store <store>` on a fresh home: its exit status and stderr.
fn serve_with_store(store: &str) -> (std::process::ExitStatus, String) {
    let home = tempfile::tempdir().unwrap();
    let out = moat()
        .args([
            "serve",
            "--no-setup",
            "--listen",
            "127.0.0.1:0",
            "--store",
            store,
        ])
        .env("MOAT_HOME", home.path())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_store_that_is_not_a_postgres_url_is_refused_with_what_is_allowed() {
    for bad in ["mysql://moat@localhost/moat", "/var/lib/moat/moatd.db"] {
        let (status, err) = serve_with_store(bad);
        assert!(!status.success(), "{bad}");
        assert!(err.contains("not a PostgreSQL URL"), "{bad}: {err}");
        assert!(err.contains("postgres://USER"), "{bad}: {err}");
    }
    let (status, err) = serve_with_store("postgres://moat:hunter2@localhost:99999/moat");
    assert!(!status.success());
    assert!(err.contains("--store"), "{err}");
    assert!(!err.contains("hunter2"), "a password is never shown: {err}");
    // Several members without asking for the primary: the daemon could land on a standby.
    let (status, err) = serve_with_store("postgres://moat:hunter2@127.0.0.1:1,127.0.0.1:2/moat");
    assert!(!status.success());
    assert!(err.contains("target_session_attrs=read-write"), "{err}");
    assert!(!err.contains("hunter2"), "a password is never shown: {err}");
}

#[test]
fn an_unreachable_postgres_is_refused_at_start() {
    let nowhere = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://moat@localhost/moat?host={}",
        nowhere.path().display()
    );
    let (status, err) = serve_with_store(&url);
    assert!(!status.success());
    assert!(err.contains("cannot use the PostgreSQL store"), "{err}");
}

#[tokio::test]
async fn a_daemon_on_postgres_survives_a_restart_of_the_server() {
    let pg = Postgres::start();
    let d = Daemon::start_on_store(&pg.url, Some(ADMIN)).await;
    d.put_group("before", json!({}), 201).await;
    let key = d.key("user", &["before"]).await;

    pg.ctl("restart");
    // The first request after the restart finds the old connection dead and reconnects.
    let (status, body) = d
        .call(Some(ADMIN), "GET", &format!("{G}/before"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = d
        .call(Some(&key), "GET", &format!("{G}/before"), None)
        .await;
    assert_eq!(status, 200, "a key made before the restart still works");

    // While the server is down, requests get 503 (retry), not a crash.
    pg.ctl("stop");
    let (status, body) = d.call(Some(ADMIN), "GET", G, None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    pg.ctl("start");
    d.put_group("after", json!({}), 201).await;
    let (status, body) = d.call(Some(ADMIN), "GET", G, None).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["after", "before"]);
}
