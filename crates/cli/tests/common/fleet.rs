//! A fleet for the tests (docs/FLEET.md): nodes able to run sandboxes on one PostgreSQL,
//! sharing the first node's sealing key, and waiting on what they say of themselves.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use moat_testkit::postgres::Postgres;
use serde_json::Value;

use super::daemon::{runtime_home, Daemon, ADMIN};

/// A home able to run sandboxes that holds the fleet's sealing key `key`, if given (without
/// one, the node makes the key the others are then given).
pub fn home_with_key(key: Option<&[u8]>) -> tempfile::TempDir {
    let home = runtime_home();
    if let Some(key) = key {
        let path = home.path().join("secrets.key");
        std::fs::write(&path, key).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    home
}

/// Node `name` on `pg` with the sealing key `key`, a lease of `lease_s` seconds and the
/// `extra` arguments of `moat serve`; its first key is the test kit's admin key.
pub async fn start_node(
    pg: &Postgres,
    name: &str,
    key: Option<&[u8]>,
    lease_s: u64,
    extra: &[&str],
) -> Daemon {
    let lease = lease_s.to_string();
    let mut args = vec!["--store", &pg.url, "--node-name", name, "--lease-s", &lease];
    args.extend_from_slice(extra);
    Daemon::start_at(home_with_key(key), Some(ADMIN), &args).await
}

/// Node `name` as `d` sees it.
pub async fn node_row(d: &Daemon, name: &str) -> Value {
    let (st, v) = d
        .call(Some(ADMIN), "GET", &format!("/v1/nodes/{name}"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    v
}

/// Waits (a bounded while) until `f` holds of node `name` as `d` sees it; the row then.
pub async fn until_node(
    d: &Daemon,
    name: &str,
    within: Duration,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let n = node_row(d, name).await;
        if f(&n) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "node {name} never got there: {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (bounded) until `d`'s sandboxes are ready: a fresh home checks what it has first.
pub async fn sandboxes_ready(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, h) = d.call(None, "GET", "/healthz", None).await;
        if h["sandboxes"]["state"] == "ready" {
            return;
        }
        assert_ne!(h["sandboxes"]["state"], "failed", "{h}");
        assert!(Instant::now() < deadline, "sandboxes never got ready: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
