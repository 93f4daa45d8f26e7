//! End-to-end tests of `moat serve` (the daemon) and the client verbs: the real binary on a free
//! loopback port with its own MOAT_HOME. Every JSON response these tests receive through
//! `Daemon::call` is checked against the daemon's own OpenAPI document.

mod common;

use std::sync::atomic::Ordering;

use common::daemon::{check_response, free_port, moat, msg, Daemon, ADMIN, G};
use serde_json::{json, Value};

#[tokio::test]
async fn groups_crud_idempotence_and_delete_rules() {
    let d = Daemon::start(Some(ADMIN)).await;
    let k = Some(ADMIN);
    let spec = json!({"image": "base", "tier": "s", "pool": {"size": 2},
        "egress": {"rules": [{"host": "*.pypi.org", "ports": [443]}]},
        "labels": {"team": "ml", "app.kubernetes.io/name": "x"}});
    let (st, g) = d
        .call(k, "PUT", &format!("{G}/team-a"), Some(spec.clone()))
        .await;
    assert_eq!(st, 201, "{g}");
    assert_eq!(g["spec"]["tier"], "s");
    assert_eq!(
        g["spec"]["lifecycle"]["idle_timeout_s"], 300,
        "defaults are filled in"
    );
    assert_eq!(g["spec"]["egress"]["default"], "deny");
    // the same PUT again: 200 and nothing changes
    let (st, g2) = d
        .call(k, "PUT", &format!("{G}/team-a"), Some(spec.clone()))
        .await;
    assert_eq!(st, 200);
    assert_eq!(g, g2);
    let (st, got) = d.call(k, "GET", &format!("{G}/team-a"), None).await;
    assert_eq!(st, 200);
    assert_eq!(got, g);
    // an update replaces the spec
    let (st, g3) = d
        .call(
            k,
            "PUT",
            &format!("{G}/team-a"),
            Some(json!({"tier": "xl"})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(g3["spec"]["tier"], "xl");
    assert_eq!(g3["spec"]["pool"]["size"], 0);
    assert_eq!(g3["created_at"], g["created_at"]);
    let (st, _) = d
        .call(k, "PUT", &format!("{G}/team-b"), Some(json!({})))
        .await;
    assert_eq!(st, 201);
    let (st, list) = d.call(k, "GET", G, None).await;
    assert_eq!(st, 200);
    let names: Vec<&str> = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["team-a", "team-b"]);

    // This daemon's home has no kernel and it may not prepare one (--no-setup): the sandbox
    // routes say so, the rest works.
    let (st, e) = d
        .call(k, "POST", &format!("{G}/team-a/sandboxes"), Some(json!({})))
        .await;
    assert_eq!(st, 503, "{e}");
    assert!(
        msg(&e).contains("cannot run sandboxes") && msg(&e).contains("--no-setup"),
        "{e}"
    );
    let (_, h) = d.call(None, "GET", "/healthz", None).await;
    assert_eq!(h["sandboxes"]["state"], "unavailable", "{h}");

    // A group with sandboxes: 409 unless force. (This daemon has no VM runtime, so the row is
    // written straight into the store; tests/daemon_sandboxes.rs does it with real VMs.)
    d.db_execute(
        "INSERT INTO sandboxes (id, group_name, state, image, tier, created_at, updated_at)
         VALUES ('sb-1', 'team-a', 'failed', 'sha256:00', 'm', 0, 0)",
        &[],
    )
    .unwrap();
    let (st, e) = d.call(k, "DELETE", &format!("{G}/team-a"), None).await;
    assert_eq!(st, 409);
    assert!(msg(&e).contains("force=true"), "{e}");
    let (st, e) = d
        .call(k, "DELETE", &format!("{G}/team-a?force=maybe"), None)
        .await;
    assert_eq!(st, 400, "{e}");
    let (st, _) = d
        .call(k, "DELETE", &format!("{G}/team-a?force=true"), None)
        .await;
    assert_eq!(st, 204);
    let (st, _) = d.call(k, "GET", &format!("{G}/team-a"), None).await;
    assert_eq!(st, 404);
    let (st, _) = d.call(k, "DELETE", &format!("{G}/team-b"), None).await;
    assert_eq!(st, 204);
    let (st, e) = d.call(k, "DELETE", &format!("{G}/team-b"), None).await;
    assert_eq!(st, 404);
    assert_eq!(e["error"]["code"], "not_found");
    assert!(d.validated.load(Ordering::Relaxed) >= 12);
}

#[tokio::test]
async fn bad_input_gets_a_clear_400_413_or_422() {
    let d = Daemon::start(Some(ADMIN)).await;
    let k = Some(ADMIN);
    let put = |name: &str, body: Value| {
        let path = format!("{G}/{name}");
        let d = &d;
        async move { d.call(k, "PUT", &path, Some(body)).await }
    };
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "ok",
            json!({"imgae": "x"}),
            &["unknown field `imgae`", "`image`"],
        ),
        (
            "ok",
            json!({"pool": {"size": 2, "min": 1}}),
            &["unknown field `min`", "`size`"],
        ),
        (
            "Bad_Name",
            json!({}),
            &["lowercase letters, digits and '-'"],
        ),
        ("-x", json!({}), &["not starting or ending with '-'"]),
        (
            "ok",
            json!({"tier": "huge"}),
            &["unknown variant `huge`", "`xs`", "`xl`"],
        ),
        (
            "ok",
            json!({"egress": {"default": "maybe"}}),
            &["`deny`", "`allow`"],
        ),
        ("ok", json!({"pool": {"size": 65}}), &["0–64"]),
        (
            "ok",
            json!({"lifecycle": {"idle_timeout_s": 0}}),
            &["1–604800"],
        ),
        (
            "ok",
            json!({"labels": {"bad key!": "v"}}),
            &["invalid label key"],
        ),
        ("ok", json!({"labels": {"k": "-v"}}), &["invalid value"]),
        ("ok", json!([1, 2]), &["invalid request body"]),
    ];
    for (name, body, needles) in cases {
        let (st, e) = put(name, body.clone()).await;
        assert_eq!(st, 400, "{name} {body}: {e}");
        assert_eq!(e["error"]["code"], "bad_request");
        for n in needles {
            assert!(msg(&e).contains(n), "{body}: {:?} lacks {n:?}", msg(&e));
        }
    }
    // Allowed by the document, refused by the network stack's rules, which it cannot state.
    for (body, needles) in [
        (
            json!({"egress": {"rules": [{"host": "a.*.com"}]}}),
            ["egress.rules[0].host", "*.example.com"],
        ),
        (
            json!({"egress": {"rules": [{"host": "a.com", "ports": [0]}]}}),
            ["port 0", "1–65535"],
        ),
    ] {
        let (st, e) = put("ok", body.clone()).await;
        assert_eq!(st, 422, "{body}: {e}");
        assert_eq!(e["error"]["code"], "unprocessable");
        for n in needles {
            assert!(msg(&e).contains(n), "{body}: {:?} lacks {n:?}", msg(&e));
        }
    }
    let (st, e) = d
        .call_raw(k, "PUT", &format!("{G}/ok"), Some(b"{not json".to_vec()))
        .await;
    assert_eq!(st, 400);
    assert!(msg(&e).contains("invalid request body"), "{e}");
    // 2 MiB of valid JSON: refused for its size, not parsed.
    let huge = json!({"labels": {"k": "v".repeat(2 << 20)}});
    let (st, e) = put("ok", huge).await;
    assert_eq!(st, 413, "{e}");
    assert!(msg(&e).contains("1048576 bytes"), "{e}");
    let (st, e) = d
        .call(
            k,
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "x", "role": "root", "groups": []})),
        )
        .await;
    assert_eq!(st, 400);
    assert!(msg(&e).contains("`admin`"), "{e}");
    let (st, e) = d
        .call(
            k,
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "x", "role": "user"})),
        )
        .await;
    assert_eq!(st, 422);
    assert!(msg(&e).contains("at least one group"), "{e}");
    let (st, e) = d.call(k, "GET", "/v1/nothing", None).await;
    assert_eq!(st, 404);
    assert!(msg(&e).contains("no such endpoint"), "{e}");
    // nothing was created by any of this
    let (_, list) = d.call(k, "GET", G, None).await;
    assert_eq!(list["groups"], json!([]));
}

#[tokio::test]
async fn api_key_matrix() {
    let d = Daemon::start(Some(ADMIN)).await;
    for g in ["team-a", "team-b"] {
        let (st, _) = d
            .call(Some(ADMIN), "PUT", &format!("{G}/{g}"), Some(json!({})))
            .await;
        assert_eq!(st, 201);
    }
    // 401: no key, a malformed one, an unknown one
    let (st, e) = d.call(None, "GET", G, None).await;
    assert_eq!(st, 401);
    assert!(msg(&e).contains("Authorization"), "{e}");
    let (st, _) = d.call(Some("nope"), "GET", G, None).await;
    assert_eq!(st, 401);
    let unknown = "moat_AdminAdminAdminAdminAdminAdminAdminAdmin124";
    let (st, _) = d.call(Some(unknown), "GET", G, None).await;
    assert_eq!(st, 401);

    for role in ["owner", "user", "reader"] {
        let key = d.key(role, &["team-a"]).await;
        let k = Some(key.as_str());
        let can_write = role == "owner";
        // its own group: read always, write by role
        let (st, _) = d.call(k, "GET", &format!("{G}/team-a"), None).await;
        assert_eq!(st, 200, "{role}");
        let (st, list) = d.call(k, "GET", G, None).await;
        assert_eq!(st, 200);
        assert_eq!(
            list["groups"].as_array().unwrap().len(),
            1,
            "{role}: {list}"
        );
        assert_eq!(list["groups"][0]["name"], "team-a");
        let (st, e) = d
            .call(k, "PUT", &format!("{G}/team-a"), Some(json!({"tier": "l"})))
            .await;
        assert_eq!(st, if can_write { 200 } else { 403 }, "{role}: {e}");
        if !can_write {
            assert!(msg(&e).contains("owner or admin"), "{e}");
            let (st, _) = d.call(k, "DELETE", &format!("{G}/team-a"), None).await;
            assert_eq!(st, 403, "{role}");
        }
        // another group: invisible, 404 whatever the method, as for a group that does not exist
        for (m, body) in [("GET", None), ("PUT", Some(json!({}))), ("DELETE", None)] {
            let (st, e) = d.call(k, m, &format!("{G}/team-b"), body.clone()).await;
            assert_eq!(st, 404, "{role} {m}: {e}");
            let (_, e2) = d.call(k, m, &format!("{G}/no-such"), body).await;
            assert_eq!(
                msg(&e).replace("team-b", "X"),
                msg(&e2).replace("no-such", "X"),
                "a hidden group answers exactly like a missing one"
            );
        }
        // only admin manages keys
        let (st, _) = d.call(k, "GET", "/v1/api-keys", None).await;
        assert_eq!(st, 403, "{role}");
        let (st, _) = d
            .call(
                k,
                "POST",
                "/v1/api-keys",
                Some(json!({"name": "x", "role": "admin"})),
            )
            .await;
        assert_eq!(st, 403, "{role}");
    }
    // an owner creates a group in its scope and deletes it
    let owner = d.key("owner", &["team-c"]).await;
    let (st, _) = d
        .call(Some(&owner), "PUT", &format!("{G}/team-c"), Some(json!({})))
        .await;
    assert_eq!(st, 201);
    let (st, _) = d
        .call(Some(&owner), "DELETE", &format!("{G}/team-c"), None)
        .await;
    assert_eq!(st, 204);

    // key management by admin; a deleted key stops working at once; the last admin stays
    let (st, keys) = d.call(Some(ADMIN), "GET", "/v1/api-keys", None).await;
    assert_eq!(st, 200);
    let keys = keys["api_keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 5);
    assert!(
        !keys.iter().any(|k| k.get("key").is_some()),
        "listings never hold secrets"
    );
    let owner_id = keys
        .iter()
        .find(|k| {
            owner.starts_with(k["prefix"].as_str().unwrap()) && k["groups"] == json!(["team-c"])
        })
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, _) = d
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("/v1/api-keys/{owner_id}"),
            None,
        )
        .await;
    assert_eq!(st, 204);
    let (st, _) = d.call(Some(&owner), "GET", G, None).await;
    assert_eq!(st, 401);
    let (st, _) = d
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("/v1/api-keys/{owner_id}"),
            None,
        )
        .await;
    assert_eq!(st, 404);
    let admin_id = keys.iter().find(|k| k["role"] == "admin").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, e) = d
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("/v1/api-keys/{admin_id}"),
            None,
        )
        .await;
    assert_eq!(st, 409, "{e}");
    assert!(msg(&e).contains("last admin key"));
}

#[tokio::test]
async fn kill_9_and_restart_keep_keys_and_groups() {
    // No MOAT_BOOTSTRAP_KEY: the key is generated and printed once on stdout.
    let mut d = Daemon::start(None).await;
    let printed = d.stdout(1);
    let admin = printed.trim().to_string();
    assert!(
        admin.starts_with("moat_") && admin.len() == 48,
        "{printed:?}"
    );
    let (st, _) = d
        .call(
            Some(&admin),
            "PUT",
            &format!("{G}/keep"),
            Some(json!({"tier": "xs"})),
        )
        .await;
    assert_eq!(st, 201);
    let (st, k) = d
        .call(
            Some(&admin),
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "r", "role": "reader", "groups": ["keep"]})),
        )
        .await;
    assert_eq!(st, 201);
    let reader = k["key"].as_str().unwrap().to_string();
    // A second daemon on the same MOAT_HOME is refused while the first runs.
    let (mut c, n) = d.command(None);
    let st = c.status().unwrap();
    assert!(!st.success());
    assert!(
        d.stderr(n).contains("another moat serve is running"),
        "{}",
        d.stderr(n)
    );

    d.kill9();
    // The socket file a kill -9 leaves behind does not stop the next start; a bootstrap key
    // given now is ignored: the database was bootstrapped already.
    assert!(d.home.path().join("moatd.sock").exists());
    d.spawn(Some(ADMIN)).await;
    let n = d.starts;
    assert_eq!(d.stdout(n), "", "no new key is printed");
    let (st, _) = d.call(Some(ADMIN), "GET", G, None).await;
    assert_eq!(st, 401, "the bootstrap key is not re-created");
    let (st, g) = d
        .call(Some(&reader), "GET", &format!("{G}/keep"), None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(g["spec"]["tier"], "xs");
    let (st, keys) = d.call(Some(&admin), "GET", "/v1/api-keys", None).await;
    assert_eq!(st, 200);
    assert_eq!(keys["api_keys"].as_array().unwrap().len(), 2);
    // the key is stored only as a hash
    if d.store.is_none() {
        let db = std::fs::read(d.home.path().join("moatd.db")).unwrap();
        let wal = std::fs::read(d.home.path().join("moatd.db-wal")).unwrap_or_default();
        for bytes in [db, wal] {
            let hay = String::from_utf8_lossy(&bytes);
            assert!(!hay.contains(&admin[5..]) && !hay.contains(&reader[5..]));
        }
    } else {
        for key in [&admin[5..], &reader[5..]] {
            let found = d.db_i64(
                "SELECT COUNT(*) FROM api_keys WHERE strpos(id || name || prefix || groups \
                 || encode(hash, 'escape'), ?1) > 0",
                &[key],
            );
            assert_eq!(found, 0, "a key is stored only as its hash");
        }
    }
}

#[tokio::test]
async fn bad_bootstrap_key_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let out = moat()
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .env("MOAT_HOME", home.path())
        .env("MOAT_BOOTSTRAP_KEY", "hunter2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MOAT_BOOTSTRAP_KEY must be \"moat_\""),
        "{err}"
    );
}

#[tokio::test]
async fn bad_capacity_flags_are_refused() {
    let home = tempfile::tempdir().unwrap();
    for (flag, value, says) in [
        (
            "--memory-overcommit",
            "0.5",
            "invalid memory overcommit ratio 0.5",
        ),
        (
            "--memory-overcommit",
            "nan",
            "invalid memory overcommit ratio",
        ),
        ("--memory-reserve-mib", "999999999", "less than the host"),
        ("--cpu-overcommit", "0", "invalid CPU overcommit ratio"),
    ] {
        let out = moat()
            .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args([flag, value])
            .env("MOAT_HOME", home.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}

#[tokio::test]
async fn metrics_count_requests() {
    let d = Daemon::start(Some(ADMIN)).await;
    for _ in 0..3 {
        d.call(None, "GET", "/healthz", None).await;
    }
    d.call(None, "GET", G, None).await;
    let (st, text) = d.call(None, "GET", "/metrics", None).await;
    assert_eq!(st, 200);
    let text = text.as_str().unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    // 3 here + the readiness probe(s) of the start
    assert!(value("moat_http_requests_total{route=\"/healthz\",status=\"200\"}") >= 4.0);
    assert_eq!(
        value("moat_http_requests_total{route=\"/v1/sandbox-groups\",status=\"401\"}"),
        1.0
    );
    assert!(value("moat_http_request_duration_seconds_count{route=\"/healthz\"}") >= 4.0);
    assert!(text.contains("# TYPE moat_http_request_duration_seconds histogram"));
    assert_eq!(value("moat_api_keys"), 1.0);
}

#[tokio::test]
async fn openapi_document_describes_the_api() {
    let d = Daemon::start(Some(ADMIN)).await;
    let doc = d.doc.as_ref().unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/v1/sandbox-groups", "get"),
        ("/v1/sandbox-groups/{group}", "put"),
        ("/v1/sandbox-groups/{group}", "delete"),
        ("/v1/api-keys", "post"),
        ("/v1/api-keys/{id}", "delete"),
        ("/healthz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    let s = &doc["components"]["schemas"];
    for name in [
        "GroupSpec",
        "Group",
        "ErrorBody",
        "CreatedApiKey",
        "Tier",
        "EgressRule",
    ] {
        assert!(s[name].is_object(), "{name}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn unix_socket_serves_the_api() {
    use std::io::{Read, Write};
    let d = Daemon::start(Some(ADMIN)).await;
    let sock = d.home.path().join("moatd.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let get = |path: &str, key: Option<&str>| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let auth = key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: moat\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(get("/healthz", None).starts_with("HTTP/1.1 200"));
    assert!(get(G, None).starts_with("HTTP/1.1 401"));
    assert!(get(G, Some(ADMIN)).starts_with("HTTP/1.1 200"));
}

fn text(o: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_verbs_against_the_daemon() {
    let d = Daemon::start(Some(ADMIN)).await;
    // group apply from flags, then from a file (flags override the file)
    let o = d.cli(
        ADMIN,
        &[
            "group",
            "apply",
            "--name",
            "web",
            "--tier",
            "s",
            "--allow",
            "*.pypi.org:443",
            "--label",
            "team=ml",
            "--idle-timeout",
            "never",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.trim(), "group web created");
    let file = d.home.path().join("g.json");
    std::fs::write(
        &file,
        r#"{"name": "batch", "pool": {"size": 1}, "tier": "l"}"#,
    )
    .unwrap();
    let o = d.cli(
        ADMIN,
        &[
            "group",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--tier",
            "xl",
        ],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let o = d.cli(
        ADMIN,
        &[
            "group",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--tier",
            "xl",
        ],
    );
    assert_eq!(text(&o).0.trim(), "group batch updated");

    let o = d.cli(ADMIN, &["group", "ls"]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("TIER"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("batch") && lines[1].contains("xl"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("web") && lines[2].contains("team=ml"),
        "{out}"
    );
    let o = d.cli(ADMIN, &["group", "ls", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["groups"].as_array().unwrap().len(), 2);

    let o = d.cli(ADMIN, &["group", "show", "web"]);
    let (out, _) = text(&o);
    assert!(out.contains("allow *.pypi.org:443"), "{out}");
    assert!(out.contains("idle never"), "{out}");
    let o = d.cli(ADMIN, &["group", "show", "web", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spec"]["lifecycle"]["idle_timeout_s"], Value::Null);

    // errors: the daemon's message, a non-zero exit
    let o = d.cli(
        ADMIN,
        &["group", "apply", "--name", "web", "--tier", "huge"],
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        err.contains("unknown variant `huge`") && err.contains("HTTP 400"),
        "{err}"
    );
    let o = d.cli(ADMIN, &["group", "show", "nope"]);
    assert!(
        text(&o).1.contains("no sandbox group \"nope\""),
        "{}",
        text(&o).1
    );
    let o = d.cli(ADMIN, &["group", "rm", "nope"]);
    assert!(!o.status.success());
    let o = d.cli("", &["group", "ls"]);
    assert!(text(&o).1.contains("set MOAT_API_KEY"), "{}", text(&o).1);
    let o = moat()
        .args(["group", "ls"])
        .env("MOAT_URL", format!("http://127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert!(
        text(&o).1.contains("is `moat serve` running?"),
        "{}",
        text(&o).1
    );

    let o = d.cli(ADMIN, &["group", "rm", "batch"]);
    assert_eq!(text(&o).0.trim(), "group batch deleted");

    // api keys
    let o = d.cli(
        ADMIN,
        &[
            "api-key", "create", "--name", "ci", "--role", "user", "--group", "web", "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let k: Value = serde_json::from_slice(&o.stdout).unwrap();
    let user_key = k["key"].as_str().unwrap();
    let id = k["id"].as_str().unwrap();
    let o = d.cli(user_key, &["group", "ls"]);
    assert!(text(&o).0.contains("web"));
    let o = d.cli(user_key, &["group", "rm", "web"]);
    assert!(text(&o).1.contains("HTTP 403"), "{}", text(&o).1);
    let o = d.cli(ADMIN, &["api-key", "ls"]);
    let (out, _) = text(&o);
    assert!(
        out.contains(id) && out.contains("ci") && !out.contains(user_key),
        "{out}"
    );
    let o = d.cli(
        ADMIN,
        &["api-key", "create", "--name", "x", "--role", "root"],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("unknown variant `root`"),
        "{}",
        text(&o).1
    );
    let o = d.cli(ADMIN, &["api-key", "rm", id]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = d.cli(ADMIN, &["api-key", "rm", id]);
    assert!(text(&o).1.contains("no API key"), "{}", text(&o).1);
}

#[tokio::test]
async fn the_openapi_check_catches_mismatches() {
    let d = Daemon::start(Some(ADMIN)).await;
    let doc = d.doc.clone().unwrap();
    let fails = |method: &'static str, path: &'static str, status: u16, body: Value| {
        let doc = doc.clone();
        std::panic::catch_unwind(move || check_response(&doc, method, path, status, &body)).is_err()
    };
    let sandboxes = json!({"state": "preparing", "message": "m", "step": "base_image",
        "steps_done": 1, "steps_total": 3, "attempt": 1});
    assert!(!fails(
        "GET",
        "/healthz",
        200,
        json!({"status": "ok", "version": "1", "sandboxes": sandboxes})
    ));
    assert!(fails(
        "GET",
        "/healthz",
        200,
        json!({"status": "ok", "version": "1"})
    ));
    let mut unknown_step = sandboxes.clone();
    unknown_step["step"] = json!("coffee");
    let mut extra = sandboxes.clone();
    extra["eta_s"] = json!(3);
    for bad in [unknown_step, extra] {
        assert!(fails(
            "GET",
            "/healthz",
            200,
            json!({"status": "ok", "version": "1", "sandboxes": bad})
        ));
    }
    assert!(fails(
        "GET",
        "/healthz",
        200,
        json!({"status": 1, "version": "1"})
    ));
    assert!(fails(
        "GET",
        "/healthz",
        200,
        json!({"status": "ok", "version": "1", "x": 1})
    ));
    assert!(fails("GET", "/v1/sandbox-groups/x", 418, json!({})));
    assert!(fails("PATCH", "/v1/sandbox-groups/x", 200, json!({})));
}

/// `moat group apply` gives every kind of egress rule and the network limits from flags:
/// deny rules first, then allow rules, hosts before CIDRs within each, in the order given;
/// `group show` prints them in that order; the daemon's checks apply (a CIDR in the floor, a
/// deny rule an allow cannot follow, a bandwidth too low), with its message and exit 125.
#[tokio::test]
async fn group_apply_flags_give_cidr_and_deny_rules_and_limits() {
    let d = Daemon::start(Some(ADMIN)).await;
    let o = d.cli(
        ADMIN,
        &[
            "group",
            "apply",
            "--name",
            "net",
            "--allow",
            "*.pypi.test:443",
            "--allow-cidr",
            "203.0.113.0/24:5432,5433",
            "--deny",
            "upload.pypi.test",
            "--deny-cidr",
            "203.0.113.7/32",
            "--allow",
            "files.test",
            "--bandwidth",
            "1048576",
            "--dns-qps",
            "10",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.trim(), "group net created");
    let o = d.cli(ADMIN, &["group", "show", "net", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rules: Vec<Value> = v["spec"]["egress"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| json!([r["action"], r.get("host").unwrap_or(&r["cidr"]), r["ports"]]))
        .collect();
    assert_eq!(
        rules,
        [
            json!(["deny", "upload.pypi.test", []]),
            json!(["deny", "203.0.113.7/32", []]),
            json!(["allow", "*.pypi.test", [443]]),
            json!(["allow", "files.test", []]),
            json!(["allow", "203.0.113.0/24", [5432, 5433]]),
        ]
    );
    assert_eq!(
        v["spec"]["network_limits"],
        json!({"bandwidth": 1048576, "dns_qps": 10})
    );
    let (out, _) = text(&d.cli(ADMIN, &["group", "show", "net"]));
    let deny = out.find("deny upload.pypi.test").expect(&out);
    let allow = out.find("allow 203.0.113.0/24:5432,5433").expect(&out);
    assert!(deny < allow, "{out}");

    for (flags, want) in [
        (&["--allow-cidr", "10.0.0.0/8"][..], "egress.rules[0].cidr"),
        (
            &["--allow-cidr", "203.0.113.0/24:x"][..],
            "invalid --allow-cidr",
        ),
        (&["--bandwidth", "1000"][..], "network_limits.bandwidth"),
        (&["--max-flows", "0"][..], "network_limits.max_flows"),
    ] {
        let mut args = vec!["group", "apply", "--name", "net"];
        args.extend_from_slice(flags);
        let o = d.cli(ADMIN, &args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(125), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}
