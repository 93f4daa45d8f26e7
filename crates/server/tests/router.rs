//! The daemon's router in-process, without a VM runtime or a spawned `moat serve`: an
//! `AppState` over a store in a temporary directory, requests through `oneshot`. Covers what
//! needs no VM: authentication, the API-key permission matrix, the error shapes (400, 401, 403,
//! 404, 405, 413, 503) and that every route of the OpenAPI document is served. Every response
//! is checked against the generated OpenAPI document.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request};
use axum::Router;
use moat_server::http::{router, AppState, MAX_BODY};
use moat_server::images::Operations;
use moat_server::metrics::Metrics;
use moat_server::policy::Gate;
use moat_server::store::{Location, Store};
use moat_testkit::openapi::check_response;
use serde_json::{json, Value};
use tower::ServiceExt;

const ADMIN: &str = "moat_AdminAdminAdminAdminAdminAdminAdminAdmin123";
const G: &str = "/v1/sandbox-groups";
const NO_WORKER: &str = "/nonexistent/moat";

/// A router over a fresh store whose bootstrap key is [`ADMIN`], and its OpenAPI document.
struct App {
    router: Router,
    store: Store,
    doc: Value,
    _home: tempfile::TempDir,
}

impl App {
    fn new() -> App {
        // No `moat` binary here: every analysis fails, which the policy tests use to show
        // that the gate fails closed (the real worker is exercised by
        // crates/cli/tests/daemon_policy.rs).
        App::with_gate(Gate::new(NO_WORKER.into()))
    }

    fn with_gate(gate: Gate) -> App {
        let home = tempfile::tempdir().unwrap();
        let store =
            Store::open(&Location::Sqlite(home.path().join("moatd.db")), home.path()).unwrap();
        assert!(store.bootstrap(Some(ADMIN)).unwrap().is_none());
        let state = AppState {
            store: store.clone(),
            metrics: Arc::new(Metrics::default()),
            sandboxes: moat_server::readiness::Sandboxes::unavailable(
                "no VM runtime in the router tests".to_string(),
            ),
            operations: Arc::new(Operations::default()),
            policy: Arc::new(gate),
            limiter: Arc::default(),
            audit_retention: 1000,
            stopping: Default::default(),
            forwarder: Arc::new(moat_server::http::forward::Forwarder::new(None).unwrap()),
            migrations: Arc::default(),
            identity: Arc::new(
                moat_server::identity::Issuer::open(
                    home.path(),
                    "http://127.0.0.1:7070".into(),
                    store.clone(),
                    Arc::default(),
                )
                .unwrap(),
            ),
        };
        let doc = serde_json::to_value(moat_server::http::openapi_document()).unwrap();
        App {
            router: router(state),
            store,
            doc,
            _home: home,
        }
    }

    /// A request with an optional JSON body; see [`App::send`].
    async fn call(&self, k: Option<&str>, m: &str, path: &str, b: Option<Value>) -> (u16, Value) {
        let body = b.map(|b| b.to_string().into_bytes());
        self.send(request(k, m, path, body)).await
    }

    /// Sends `req`; returns the status and the JSON body (`null` when empty), after checking
    /// both against the OpenAPI document.
    async fn send(&self, req: Request<Body>) -> (u16, Value) {
        let (status, value, _) = self.send_full(req).await;
        (status, value)
    }

    /// [`App::call`], with the answer's headers.
    async fn call_full(
        &self,
        k: Option<&str>,
        m: &str,
        path: &str,
        b: Option<Value>,
    ) -> (u16, Value, axum::http::HeaderMap) {
        let body = b.map(|b| b.to_string().into_bytes());
        self.send_full(request(k, m, path, body)).await
    }

    /// [`App::send`], with the answer's headers.
    async fn send_full(&self, req: Request<Body>) -> (u16, Value, axum::http::HeaderMap) {
        let (method, path) = (req.method().to_string(), req.uri().to_string());
        let (method, path) = (method.as_str(), path.as_str());
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        if status == 401 {
            assert_eq!(
                resp.headers().get(header::WWW_AUTHENTICATE).unwrap(),
                "Bearer"
            );
        }
        let json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else if !json {
            // `/metrics` is text; the document gives it no JSON schema.
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {bytes:?}"))
        };
        if status >= 400 {
            assert!(
                value["error"]["code"].is_string() && value["error"]["message"].is_string(),
                "{method} {path} {status}: not the error shape: {value}"
            );
        }
        // A 405 has no operation to be documented under, and the document does not describe
        // itself; everything else must be as documented.
        if status != 405 && path != "/openapi.json" {
            check_response(&self.doc, method, path, status, &value);
        }
        (status, value, headers)
    }

    /// A new key of `role` that sees `groups`.
    async fn key(&self, role: &str, groups: &[&str]) -> String {
        let (st, k) = self
            .call(
                Some(ADMIN),
                "POST",
                "/v1/api-keys",
                Some(json!({"name": role, "role": role, "groups": groups})),
            )
            .await;
        assert_eq!(st, 201, "{k}");
        k["key"].as_str().unwrap().to_string()
    }
}

/// A request with `key` as its Bearer token, if any, and `body` as given (not necessarily JSON).
fn request(key: Option<&str>, method: &str, path: &str, body: Option<Vec<u8>>) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    req.body(body.map_or_else(Body::empty, Body::from)).unwrap()
}

fn msg(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn missing_malformed_and_unknown_keys_get_401() {
    let app = App::new();
    let (st, e) = app.call(None, "GET", G, None).await;
    assert_eq!(st, 401);
    assert_eq!(e["error"]["code"], "unauthorized");
    assert!(msg(&e).contains("Authorization: Bearer"), "{e}");
    for bad in [
        "nope",
        "moat_short",
        "moat_AdminAdminAdminAdminAdminAdminAdminAdmin124",
    ] {
        let (st, e) = app.call(Some(bad), "GET", G, None).await;
        assert_eq!(st, 401, "{bad}");
        assert!(msg(&e).contains("invalid or deleted API key"), "{e}");
    }
    // Not a bearer token at all.
    let req = Request::get(G)
        .header(header::AUTHORIZATION, format!("Basic {ADMIN}"))
        .body(Body::empty())
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // Only the health check, the metrics and the document itself are open.
    for open in ["/healthz", "/metrics", "/openapi.json"] {
        let req = Request::get(open).body(Body::empty()).unwrap();
        let resp = app.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{open}");
    }
}

#[tokio::test]
async fn permission_matrix_of_roles_over_groups_keys_and_sandboxes() {
    let app = App::new();
    for g in ["team-a", "team-b"] {
        let (st, _) = app
            .call(Some(ADMIN), "PUT", &format!("{G}/{g}"), Some(json!({})))
            .await;
        assert_eq!(st, 201);
    }
    let mut keys = vec![("admin", ADMIN.to_string())];
    for role in ["owner", "user", "reader"] {
        keys.push((role, app.key(role, &["team-a"]).await));
    }
    for (role, key) in &keys {
        let k = Some(key.as_str());
        let admin = *role == "admin";
        let manages = matches!(*role, "admin" | "owner");
        let uses = *role != "reader";

        // groups: its own is readable; changing it needs owner or admin
        let (st, _) = app.call(k, "GET", &format!("{G}/team-a"), None).await;
        assert_eq!(st, 200, "{role}");
        let (st, list) = app.call(k, "GET", G, None).await;
        assert_eq!(st, 200);
        let seen = list["groups"].as_array().unwrap().len();
        assert_eq!(seen, if admin { 2 } else { 1 }, "{role}: {list}");
        let (st, e) = app
            .call(k, "PUT", &format!("{G}/team-a"), Some(json!({"tier": "l"})))
            .await;
        assert_eq!(st, if manages { 200 } else { 403 }, "{role}: {e}");
        if !manages {
            assert!(msg(&e).contains("owner or admin"), "{e}");
        }

        // another group: invisible to a scoped key, 404 whatever the route, exactly as for a
        // group that does not exist
        if !admin {
            for (m, path, body) in [
                ("GET", format!("{G}/team-b"), None),
                ("PUT", format!("{G}/team-b"), Some(json!({}))),
                ("DELETE", format!("{G}/team-b"), None),
                ("GET", format!("{G}/team-b/sandboxes"), None),
                ("POST", format!("{G}/team-b/sandboxes"), Some(json!({}))),
                ("GET", format!("{G}/team-b/sandboxes/sb-1"), None),
                ("GET", format!("{G}/team-b/snapshots"), None),
            ] {
                let (st, e) = app.call(k, m, &path, body.clone()).await;
                assert_eq!(st, 404, "{role} {m} {path}: {e}");
                let missing = path.replace("team-b", "no-such");
                let (_, e2) = app.call(k, m, &missing, body).await;
                assert_eq!(
                    msg(&e).replace("team-b", "X"),
                    msg(&e2).replace("no-such", "X"),
                    "{role} {m} {path}: a hidden group answers like a missing one"
                );
            }
        }

        // sandboxes: listing needs visibility only; creating needs a user key or better (and
        // then this daemon, which has no VM runtime, answers 503)
        let (st, list) = app
            .call(k, "GET", &format!("{G}/team-a/sandboxes"), None)
            .await;
        assert_eq!(st, 200, "{role}: {list}");
        let (st, e) = app
            .call(k, "POST", &format!("{G}/team-a/sandboxes"), Some(json!({})))
            .await;
        if uses {
            assert_eq!(st, 503, "{role}: {e}");
            assert!(msg(&e).contains("cannot run sandboxes"), "{e}");
        } else {
            assert_eq!(st, 403, "{role}: {e}");
            assert!(msg(&e).contains("may only read sandboxes"), "{e}");
        }
        let (st, _) = app
            .call(k, "GET", &format!("{G}/team-a/sandboxes/sb-0"), None)
            .await;
        assert_eq!(st, 404, "{role}");

        // API keys and image imports: admin only
        let (st, e) = app.call(k, "GET", "/v1/api-keys", None).await;
        assert_eq!(st, if admin { 200 } else { 403 }, "{role}: {e}");
        let (st, e) = app
            .call(
                k,
                "POST",
                "/v1/api-keys",
                Some(json!({"name": "x", "role": "reader", "groups": ["team-a"]})),
            )
            .await;
        assert_eq!(st, if admin { 201 } else { 403 }, "{role}: {e}");
        let (st, e) = app
            .call(
                k,
                "POST",
                "/v1/images",
                Some(json!({"source": "127.0.0.1:5000/a:b"})),
            )
            .await;
        assert_eq!(st, if admin { 503 } else { 403 }, "{role}: {e}");
    }

    // A deleted key stops working at once; the last admin key cannot go.
    let (_, list) = app.call(Some(ADMIN), "GET", "/v1/api-keys", None).await;
    let list = list["api_keys"].as_array().unwrap().clone();
    assert!(list.iter().all(|k| k.get("key").is_none()), "no secrets");
    let id_of = |role: &str| {
        list.iter().find(|k| k["role"] == role).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let user_key = &keys.iter().find(|(r, _)| *r == "user").unwrap().1;
    let (st, _) = app
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("/v1/api-keys/{}", id_of("user")),
            None,
        )
        .await;
    assert_eq!(st, 204);
    let (st, _) = app.call(Some(user_key), "GET", G, None).await;
    assert_eq!(st, 401);
    let (st, e) = app
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("/v1/api-keys/{}", id_of("admin")),
            None,
        )
        .await;
    assert_eq!(st, 409, "{e}");
    assert!(msg(&e).contains("last admin key"), "{e}");
}

#[tokio::test]
async fn error_shapes_400_404_405_413() {
    let app = App::new();
    let k = Some(ADMIN);
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "ok",
            json!({"imgae": "x"}),
            &["unknown field `imgae`", "`image`"],
        ),
        (
            "Bad_Name",
            json!({}),
            &["lowercase letters, digits and '-'"],
        ),
        (
            "ok",
            json!({"tier": "huge"}),
            &["unknown variant `huge`", "`xl`"],
        ),
        (
            "ok",
            json!({"pool": {"size": 65}}),
            // Refused by the schema; the message is the group's own check's.
            &["invalid pool.size 65", "allowed is 0–64"],
        ),
        ("ok", json!([1, 2]), &["invalid request body"]),
    ];
    for (name, body, needles) in cases {
        let (st, e) = app
            .call(k, "PUT", &format!("{G}/{name}"), Some(body.clone()))
            .await;
        assert_eq!(st, 400, "{body}: {e}");
        assert_eq!(e["error"]["code"], "bad_request");
        for n in needles {
            assert!(msg(&e).contains(n), "{body}: {e} lacks {n:?}");
        }
    }
    let bad_json = Some(b"{not json".to_vec());
    let (st, e) = app
        .send(request(k, "PUT", &format!("{G}/ok"), bad_json))
        .await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = app
        .call(k, "GET", &format!("{G}/ok/sandboxes?labels=a"), None)
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(msg(&e).contains("invalid label selector"), "{e}");
    let (st, e) = app.call(k, "DELETE", &format!("{G}/ok?nuke=1"), None).await;
    assert_eq!(st, 400, "{e}");
    assert!(msg(&e).contains("invalid query"), "{e}");

    let (st, e) = app.call(k, "GET", "/v1/nothing", None).await;
    assert_eq!(st, 404);
    assert_eq!(e["error"]["code"], "not_found");
    assert!(msg(&e).contains("no such endpoint"), "{e}");
    let (st, e) = app.call(k, "PUT", "/v1/api-keys/key-0", None).await;
    assert_eq!(st, 405, "{e}");
    assert_eq!(e["error"]["code"], "method_not_allowed");
    assert!(msg(&e).contains("PUT is not allowed on"), "{e}");
    let (st, e) = app.call(k, "DELETE", "/v1/api-keys/key-0", None).await;
    assert_eq!(st, 404, "{e}");

    // A body over the limit is refused for its size, before it is parsed.
    let huge = json!({"labels": {"k": "v".repeat(MAX_BODY)}});
    let (st, e) = app.call(k, "PUT", &format!("{G}/ok"), Some(huge)).await;
    assert_eq!(st, 413, "{e}");
    assert_eq!(e["error"]["code"], "payload_too_large");
    assert!(msg(&e).contains(&format!("{MAX_BODY} bytes")), "{e}");
    // Nothing was created by any of this.
    let (_, list) = app.call(k, "GET", G, None).await;
    assert_eq!(list["groups"], json!([]));
}

/// Every operation of the document is routed (nothing it lists answers "no such endpoint"
/// or 405), and each answer, here without a VM runtime, is one the document describes.
#[tokio::test]
async fn egress_audit_routes_filter_validate_and_hide_other_groups() {
    use moat_net::audit::{Event, Kind, Verdict};
    let app = App::new();
    for g in ["g", "h"] {
        let (st, _) = app
            .call(Some(ADMIN), "PUT", &format!("{G}/{g}"), Some(json!({})))
            .await;
        assert_eq!(st, 201);
    }
    let record = |group: &str, kind, verdict, name: &str| {
        let mut event = Event::new(kind, verdict, "no rule allows this name (default deny)");
        event.name = Some(name.to_string());
        moat_server::sandboxes::AuditRecord {
            group: group.to_string(),
            sandbox: "sb-0123456789ab".to_string(),
            event,
        }
    };
    app.store
        .insert_egress_events(
            vec![
                record("g", Kind::Dns, Verdict::Deny, "evil.test"),
                record("g", Kind::Tcp, Verdict::Allow, "web.test"),
                record("h", Kind::Dns, Verdict::Deny, "other-group.test"),
            ],
            100,
        )
        .await
        .unwrap();
    let (st, v) = app
        .call(Some(ADMIN), "GET", &format!("{G}/g/egress"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{v}");
    assert_eq!(items[0]["name"], "evil.test");
    assert_eq!(items[0]["sandbox"], "sb-0123456789ab");
    assert_eq!(
        (items[0]["kind"].clone(), items[0]["port"].clone()),
        (json!("dns"), Value::Null)
    );
    let (st, v) = app
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/g/egress?verdict=allow&sandbox=sb-0123456789ab&limit=10"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["items"][0]["name"], "web.test");
    for (query, want) in [
        ("limit=0", "1–1000"),
        ("since=yesterday", "RFC 3339"),
        ("sandbox=x", "sb- and 12 hex"),
        ("verdict=maybe", "allow"),
        ("bogus=1", "bogus"),
    ] {
        let (st, e) = app
            .call(Some(ADMIN), "GET", &format!("{G}/g/egress?{query}"), None)
            .await;
        assert_eq!(st, 400, "{query}: {e}");
        assert!(msg(&e).contains(want), "{query}: {e}");
    }
    // A key that sees only h: g's audit does not exist for it.
    let reader = app.key("reader", &["h"]).await;
    let (st, _) = app
        .call(Some(&reader), "GET", &format!("{G}/g/egress"), None)
        .await;
    assert_eq!(st, 404);
    let (st, v) = app
        .call(Some(&reader), "GET", &format!("{G}/h/egress"), None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["items"][0]["name"], "other-group.test");
    let (st, _) = app
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/g/sandboxes/sb-0123456789ab/egress"),
            None,
        )
        .await;
    assert_eq!(
        st, 404,
        "no such sandbox: its events are in the group's audit"
    );
}

#[tokio::test]
async fn every_documented_operation_is_served_as_documented() {
    let app = App::new();
    let (st, _) = app
        .call(Some(ADMIN), "PUT", &format!("{G}/g"), Some(json!({})))
        .await;
    assert_eq!(st, 201);
    let paths = app.doc["paths"].as_object().unwrap().clone();
    assert!(paths.len() >= 20, "{}", paths.len());
    let mut operations = 0;
    for (template, item) in &paths {
        let path = template
            .replace("{group}", "g")
            .replace("{id}", "sb-0")
            .replace("{pid_id}", "p1")
            .replace("{name}", "n")
            .replace("{port}", "8080")
            .replace("{path}", "a/b");
        for method in ["get", "put", "post", "delete"] {
            if item[method].is_null() {
                continue;
            }
            operations += 1;
            let m = method.to_ascii_uppercase();
            let body = matches!(method, "put" | "post").then(|| json!({}));
            // `send` checks the status and body against the document.
            let (st, e) = app.call(Some(ADMIN), &m, &path, body).await;
            assert_ne!(st, 405, "{m} {template}: {e}");
            assert!(
                !msg(&e).contains("no such endpoint"),
                "{m} {template} is documented but not routed: {e}"
            );
        }
    }
    assert!(operations >= 30, "{operations}");
}

/// Rollback makes a new version equal to an old one (the history stays append-only); going
/// back to the version in force makes none; unknown versions, bad bodies and user keys are
/// refused.
#[tokio::test]
async fn policies_roll_back_as_a_new_version() {
    let app = App::new();
    let k = Some(ADMIN);
    let pol = format!("{G}/g/policy");
    let back = format!("{pol}/rollback");
    assert_eq!(
        app.call(k, "PUT", &format!("{G}/g"), Some(json!({})))
            .await
            .0,
        201
    );
    let enforce = json!({"mode": "enforce", "commands": {"deny": ["curl"]}});
    let audit = json!({"mode": "audit", "commands": {"deny": ["wget"]}});
    assert_eq!(app.call(k, "PUT", &pol, Some(enforce)).await.0, 201);
    assert_eq!(app.call(k, "PUT", &pol, Some(audit)).await.0, 201);
    let (st, v) = app
        .call(k, "POST", &back, Some(json!({"version": 1})))
        .await;
    assert_eq!((st, v["version"].as_u64()), (201, Some(3)), "{v}");
    assert_eq!(v["policy"]["mode"], "enforce", "{v}");
    assert_eq!(v["policy"]["commands"]["deny"], json!(["curl"]), "{v}");
    let (_, now) = app.call(k, "GET", &pol, None).await;
    assert_eq!(now["version"], 3, "{now}");
    let (_, versions) = app.call(k, "GET", &format!("{pol}/versions"), None).await;
    let items = versions["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{versions}");
    assert_eq!(items[0]["sha256"], items[2]["sha256"], "{versions}");
    assert_eq!(items[1]["policy"]["mode"], "audit", "version 2 is kept");
    // Back to the policy in force: no new version.
    let (st, v) = app
        .call(k, "POST", &back, Some(json!({"version": 1})))
        .await;
    assert_eq!((st, v["version"].as_u64()), (200, Some(3)), "{v}");
    let (st, e) = app
        .call(k, "POST", &back, Some(json!({"version": 9})))
        .await;
    assert_eq!(st, 404, "{e}");
    assert!(msg(&e).contains("no policy version 9"), "{e}");
    for body in [
        json!({"version": "1"}),
        json!({"version": 1, "to": 2}),
        json!({}),
    ] {
        let (st, e) = app.call(k, "POST", &back, Some(body.clone())).await;
        assert_eq!(st, 400, "{body}: {e}");
    }
    let user = app.key("user", &["g"]).await;
    let (st, _) = app
        .call(Some(&user), "POST", &back, Some(json!({"version": 2})))
        .await;
    assert_eq!(st, 403);
    let (_, now) = app.call(k, "GET", &pol, None).await;
    assert_eq!(now["version"], 3, "{now}");
}

/// Dry runs are limited per API key (each starts a worker): past the burst a 429 that says
/// why and when to retry; another key is not affected.
#[tokio::test]
async fn policy_dry_runs_are_rate_limited_per_key() {
    let app = App::with_gate(Gate::new(NO_WORKER.into()).with_check_rate(
        moat_server::policy::CheckRate {
            burst: 3,
            per_s: 0.001,
        },
    ));
    let k = Some(ADMIN);
    app.call(k, "PUT", &format!("{G}/g"), Some(json!({}))).await;
    let check = format!("{G}/g/policy/check");
    for _ in 0..3 {
        let (st, v) = app
            .call(k, "POST", &check, Some(json!({"argv": ["ls"]})))
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, e) = app
        .call(k, "POST", &check, Some(json!({"argv": ["ls"]})))
        .await;
    assert_eq!(st, 429, "{e}");
    assert_eq!(e["error"]["code"], "too_many_requests");
    assert!(
        msg(&e).contains("too many policy checks for this API key") && msg(&e).contains("retry in"),
        "{e}"
    );
    let other = app.key("owner", &["g"]).await;
    let (st, v) = app
        .call(Some(&other), "POST", &check, Some(json!({"argv": ["ls"]})))
        .await;
    assert_eq!(st, 200, "{v}");
}

/// Policies through the API, with no analysis worker to be had: versions and roles, a policy
/// whose `tests` cannot be decided is refused, and the dry run and an exec fail closed
/// (`analysis.failed`), the exec refused before anything asks for its sandbox's VM.
#[tokio::test]
async fn policies_versions_roles_and_failing_closed_without_a_worker() {
    let app = App::new();
    let k = Some(ADMIN);
    let pol = format!("{G}/g/policy");
    assert_eq!(
        app.call(k, "PUT", &format!("{G}/g"), Some(json!({})))
            .await
            .0,
        201
    );
    let (st, v) = app.call(k, "GET", &pol, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["version"].as_u64(), v["policy"]["mode"].as_str()),
        (Some(0), Some("off"))
    );
    assert!(v["sha256"].is_null());

    let enforce = json!({"mode": "enforce", "commands": {"deny": ["curl"]}});
    let (st, v) = app.call(k, "PUT", &pol, Some(enforce.clone())).await;
    assert_eq!((st, v["version"].as_u64()), (201, Some(1)), "{v}");
    let (st, v) = app.call(k, "PUT", &pol, Some(enforce.clone())).await;
    assert_eq!(
        (st, v["version"].as_u64()),
        (200, Some(1)),
        "unchanged: {v}"
    );
    // Not a policy object (400), or one whose rules moat-policy refuses (422).
    for (body, status, needle) in [
        (json!({"mode": "enforce", "comands": {}}), 400, "comands"),
        (
            json!({"commands": {"allow": ["bin/ls"]}}),
            422,
            "relative path",
        ),
        (json!({"mode": "strict"}), 400, "strict"),
        // Examples are decided in the worker; without one they cannot hold.
        (
            json!({"mode": "enforce", "tests": {"allow": [{"argv": ["ls"]}]}}),
            422,
            "tests.allow[0]",
        ),
    ] {
        let (st, e) = app.call(k, "PUT", &pol, Some(body.clone())).await;
        assert_eq!(st, status, "{body}: {e}");
        assert!(msg(&e).contains(needle), "{body}: {e}");
    }
    let (_, versions) = app.call(k, "GET", &format!("{pol}/versions"), None).await;
    assert_eq!(versions["items"].as_array().unwrap().len(), 1, "{versions}");

    // Roles: a user key reads the policy and dry-runs, but neither applies one nor reads
    // decisions; a key of another group sees nothing.
    let user = app.key("user", &["g"]).await;
    let u = Some(user.as_str());
    assert_eq!(app.call(u, "GET", &pol, None).await.0, 200);
    assert_eq!(app.call(u, "PUT", &pol, Some(json!({}))).await.0, 403);
    assert_eq!(
        app.call(u, "GET", &format!("{pol}/decisions"), None)
            .await
            .0,
        403
    );
    let other = app.key("owner", &["h"]).await;
    assert_eq!(app.call(Some(&other), "GET", &pol, None).await.0, 404);

    let (st, d) = app
        .call(
            u,
            "POST",
            &format!("{pol}/check"),
            Some(json!({"argv": ["ls"]})),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["allowed"], false, "{d}");
    assert_eq!(d["policy_version"], 1);
    assert_eq!(d["findings"][0]["rule"], "analysis.failed", "{d}");
    assert!(
        d["findings"][0]["message"]
            .as_str()
            .unwrap()
            .contains(NO_WORKER),
        "{d}"
    );
    let (st, e) = app
        .call(u, "POST", &format!("{pol}/check"), Some(json!({})))
        .await;
    assert_eq!(st, 422, "{e}");
    assert!(
        msg(&e).contains("exactly one of argv, command, python and shell"),
        "{e}"
    );

    // An exec in a sandbox of the group: refused by the gate (403, with findings and the
    // version) although this daemon has no VM runtime at all, so nothing reached a sandbox.
    let sb = moat_server::api::Sandbox {
        id: "sb-000000000001".into(),
        group: "g".into(),
        state: moat_server::api::SandboxState::Running,
        reason: None,
        image: "sha256:0".into(),
        tier: Default::default(),
        env: Default::default(),
        labels: Default::default(),
        created_at: String::new(),
        updated_at: String::new(),
        last_activity_at: None,
        node: None,
        health: None,
    };
    app.store.insert_sandbox(&sb).await.unwrap();
    let exec = format!("{G}/g/sandboxes/{}/exec", sb.id);
    let (st, e) = app
        .call(
            u,
            "POST",
            &exec,
            Some(json!({"argv": ["ls"], "env": {"TOKEN": "s3cret"}})),
        )
        .await;
    assert_eq!(st, 403, "{e}");
    assert_eq!(e["error"]["code"], "policy_denied");
    assert_eq!(e["error"]["policy_version"], 1);
    assert_eq!(e["error"]["findings"][0]["rule"], "analysis.failed", "{e}");
    let procs = format!("{G}/g/sandboxes/{}/processes", sb.id);
    let (st, e) = app
        .call(u, "POST", &procs, Some(json!({"command": "sleep 1"})))
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (403, Some("policy_denied")),
        "{e}"
    );

    // Both refusals are in the log, chained, with the secret redacted; dry runs are not.
    let (st, log) = app.call(k, "GET", &format!("{pol}/decisions"), None).await;
    assert_eq!(st, 200, "{log}");
    let items: Vec<moat_server::api::LogEntry> =
        serde_json::from_value(log["items"].clone()).unwrap();
    assert_eq!(items.len(), 2, "{log}");
    assert_eq!(
        (items[0].route.as_str(), items[1].route.as_str()),
        ("exec", "process")
    );
    assert_eq!(items[0].request.env["TOKEN"], "<redacted>");
    assert!(moat_policy::log::verify("g", &items).problems.is_empty());
    let (st, e) = app
        .call(k, "GET", &format!("{pol}/decisions?verdict=maybe"), None)
        .await;
    assert_eq!(st, 400, "{e}");
    let (_, none) = app
        .call(k, "GET", &format!("{pol}/decisions?verdict=allow"), None)
        .await;
    assert_eq!(none["items"], json!([]));

    // scan_uploads: a .py upload is checked (and refused, the worker being absent) before the
    // sandbox is touched; other files are not checked (and then need the VM: 503).
    let scan = json!({"mode": "enforce", "scan_uploads": true});
    assert_eq!(app.call(k, "PUT", &pol, Some(scan)).await.0, 201);
    let files = format!("{G}/g/sandboxes/{}/files", sb.id);
    let up = |path: &str| {
        let body = Some(b"print(1)\n".to_vec());
        request(u, "PUT", &format!("{files}?path={path}"), body)
    };
    let (st, e) = app.send(up("/tmp/job.py")).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (403, Some("policy_denied")),
        "{e}"
    );
    let (st, e) = app.send(up("/tmp/data.txt")).await;
    assert_eq!(st, 503, "{e}");

    // With the policy off, the gate does not run at all (the exec then needs a VM: 503).
    let (st, _) = app.call(k, "PUT", &pol, Some(json!({"mode": "off"}))).await;
    assert_eq!(st, 201);
    let (st, e) = app
        .call(u, "POST", &exec, Some(json!({"argv": ["ls"]})))
        .await;
    assert_eq!(st, 503, "{e}");
}

/// Exposed ports without a VM: validation, duplicates, the cap, roles and groups, and the
/// proxy's and port-forward's refusals before any connection to a guest.
#[tokio::test]
async fn ports_are_validated_and_scoped_to_the_sandboxes_group() {
    let app = App::new();
    for g in ["g", "other"] {
        let (st, _) = app
            .call(Some(ADMIN), "PUT", &format!("{G}/{g}"), Some(json!({})))
            .await;
        assert_eq!(st, 201);
    }
    let row = moat_server::api::Sandbox {
        id: "sb-0123456789ab".into(),
        group: "g".into(),
        state: moat_server::api::SandboxState::Running,
        reason: None,
        image: "sha256:00".into(),
        tier: moat_server::api::Tier::S,
        env: Default::default(),
        labels: Default::default(),
        created_at: String::new(),
        updated_at: String::new(),
        last_activity_at: None,
        node: None,
        health: None,
    };
    app.store.insert_sandbox(&row).await.unwrap();
    let ports = format!("{G}/g/sandboxes/sb-0123456789ab/ports");
    let a = Some(ADMIN);

    let (st, p) = app
        .call(a, "POST", &ports, Some(json!({"port": 8080})))
        .await;
    assert_eq!(st, 201, "{p}");
    assert_eq!(p["url"], format!("{ports}/8080/"));
    let (st, e) = app
        .call(a, "POST", &ports, Some(json!({"port": 8080})))
        .await;
    assert_eq!(st, 409);
    assert!(msg(&e).contains("already exposed"), "{e}");
    for bad in [
        json!({"port": 0}),
        json!({"port": 70000}),
        json!({"port": "80"}),
        json!({}),
    ] {
        let (st, e) = app.call(a, "POST", &ports, Some(bad.clone())).await;
        assert_eq!(st, 400, "{bad}: {e}");
    }
    let (st, e) = app.call(a, "GET", &format!("{ports}/http"), None).await;
    assert_eq!((st, msg(&e).contains("1 to 65535")), (400, true), "{e}");
    let (st, e) = app.call(a, "GET", &format!("{ports}/9"), None).await;
    assert_eq!((st, msg(&e).contains("not exposed")), (404, true), "{e}");
    let (st, p) = app.call(a, "GET", &format!("{ports}/8080"), None).await;
    assert_eq!((st, p["port"].as_u64()), (200, Some(8080)));

    // A reader may list, not expose; a key of another group sees nothing, proxy included.
    let reader = app.key("reader", &["g"]).await;
    let (st, l) = app.call(Some(&reader), "GET", &ports, None).await;
    assert_eq!((st, l["ports"].as_array().unwrap().len()), (200, 1));
    let (st, _) = app
        .call(Some(&reader), "POST", &ports, Some(json!({"port": 81})))
        .await;
    assert_eq!(st, 403);
    let (st, _) = app
        .call(Some(&reader), "GET", &format!("{ports}/8080/x"), None)
        .await;
    assert_eq!(st, 403);
    let stranger = app.key("owner", &["other"]).await;
    for (m, path) in [
        ("GET", ports.clone()),
        ("GET", format!("{ports}/8080/")),
        ("POST", format!("{ports}/8080/upload")),
        ("DELETE", format!("{ports}/8080")),
        (
            "GET",
            format!("{G}/g/sandboxes/sb-0123456789ab/port-forward/22"),
        ),
    ] {
        let (st, _) = app.call(Some(&stranger), m, &path, None).await;
        assert_eq!(st, 404, "{m} {path}");
        let (st, _) = app.call(None, m, &path, None).await;
        assert_eq!(st, 401, "{m} {path}");
    }
    // The same sandbox id under another group is not found either.
    let (st, _) = app
        .call(
            a,
            "GET",
            &format!("{G}/other/sandboxes/sb-0123456789ab/ports"),
            None,
        )
        .await;
    assert_eq!(st, 404);

    // The proxy: a port not exposed is a 404; an exposed one needs the VM runtime (503 here).
    let (st, e) = app.call(a, "GET", &format!("{ports}/9/"), None).await;
    assert_eq!((st, msg(&e).contains("not exposed")), (404, true), "{e}");
    let (st, _) = app
        .call(a, "GET", &format!("{ports}/8080/a/b?c=d"), None)
        .await;
    assert_eq!(st, 503);
    let (st, e) = app
        .call(
            a,
            "GET",
            &format!("{G}/g/sandboxes/sb-0123456789ab/port-forward/22"),
            None,
        )
        .await;
    assert_eq!((st, msg(&e).contains("moat-tcp")), (400, true), "{e}");
    let (st, _) = app
        .call(
            a,
            "GET",
            &format!("{G}/g/sandboxes/sb-0123456789ab/port-forward/0"),
            None,
        )
        .await;
    assert_eq!(st, 400);

    // At most 64 ports; closing one makes room, closing it twice is a 404.
    for port in 1..64 {
        let (st, _) = app
            .call(a, "POST", &ports, Some(json!({"port": port})))
            .await;
        assert_eq!(st, 201);
    }
    let (st, e) = app
        .call(a, "POST", &ports, Some(json!({"port": 9999})))
        .await;
    assert_eq!((st, msg(&e).contains("64 ports")), (409, true), "{e}");
    let (st, _) = app.call(a, "DELETE", &format!("{ports}/8080"), None).await;
    assert_eq!(st, 204);
    let (st, _) = app.call(a, "DELETE", &format!("{ports}/8080"), None).await;
    assert_eq!(st, 404);
    let (st, _) = app
        .call(a, "POST", &ports, Some(json!({"port": 9999})))
        .await;
    assert_eq!(st, 201);
    // Deleting the sandbox's row takes its ports with it.
    app.store.delete_sandbox("sb-0123456789ab").await.unwrap();
    app.store.insert_sandbox(&row).await.unwrap();
    let (_, l) = app.call(a, "GET", &ports, None).await;
    assert_eq!(l["ports"], json!([]));
}

/// OpenAPI requires every `operationId` to be unique; client generators (the TypeScript SDK's
/// openapi-typescript) refuse the document otherwise. The port proxy serves seven methods
/// from one handler.
#[test]
fn every_operation_id_is_unique() {
    let doc = serde_json::to_value(moat_server::http::openapi_document()).unwrap();
    let mut ids = std::collections::HashMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if let Some(id) = op["operationId"].as_str() {
                if let Some(other) = ids.insert(id.to_string(), format!("{method} {path}")) {
                    panic!("operationId {id} of {method} {path} is also that of {other}");
                }
            }
        }
    }
    assert!(ids.contains_key("proxy_root_post"), "{ids:?}");
}

/// A browser's WebSocket cannot send headers: the shell (and nothing else) takes the key as
/// the subprotocol `moat.key.<key>`, and a wrong or doubled one is a 401 like a wrong header.
#[tokio::test]
async fn the_shell_alone_takes_a_key_from_a_subprotocol() {
    let app = App::new();
    let shell = format!("{G}/nope/sandboxes/sb-000000000000/shell?cols=80&rows=24");
    let with = |path: &str, protocols: &str| {
        Request::get(path)
            .header(header::SEC_WEBSOCKET_PROTOCOL, protocols)
            .body(Body::empty())
            .unwrap()
    };
    let wrong = "moat_AdminAdminAdminAdminAdminAdminAdminAdmin124";
    let (st, e) = app
        .send(with(&shell, &format!("moat.shell.v1, moat.key.{wrong}")))
        .await;
    assert_eq!(st, 401, "{e}");
    assert!(msg(&e).contains("invalid or deleted API key"), "{e}");
    let (st, e) = app
        .send(with(
            &shell,
            &format!("moat.key.{ADMIN}, moat.shell.v1, moat.key.{wrong}"),
        ))
        .await;
    assert_eq!(st, 401, "{e}");
    assert!(msg(&e).contains("more than one"), "{e}");
    let (st, e) = app.send(with(&shell, "moat.shell.v1")).await;
    assert_eq!(st, 401, "{e}");
    assert!(msg(&e).contains("moat.key.<API key>"), "{e}");
    // The right key authenticates: what is left is that the group does not exist.
    let (st, e) = app
        .send(with(&shell, &format!("moat.shell.v1, moat.key.{ADMIN}")))
        .await;
    assert_eq!(st, 404, "{e}");
    // Anywhere else the subprotocol is no key.
    let (st, e) = app
        .send(with(G, &format!("moat.shell.v1, moat.key.{ADMIN}")))
        .await;
    assert_eq!(st, 401, "{e}");
    // The console's page itself needs no key (it asks for one).
    let req = Request::get("/ui/").body(Body::empty()).unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// Workload identity without a VM: the issuer documents are public and cacheable, a group's
/// `identity` is validated, tokens are minted only by owner and admin keys for an allowed
/// audience of an enabled group, every mint and refusal is audited without the token, and
/// only an admin key sees and rotates the signing keys.
#[tokio::test]
async fn identity_issuer_tokens_audit_and_roles() {
    let app = App::new();
    let a = Some(ADMIN);
    for path in [
        "/.well-known/openid-configuration",
        "/.well-known/jwks.json",
    ] {
        let resp = app
            .router
            .clone()
            .oneshot(request(None, "GET", path, None))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path} needs no key");
        assert_eq!(
            resp.headers().get(header::CACHE_CONTROL).unwrap(),
            "public, max-age=300"
        );
    }
    let (_, d) = app
        .call(None, "GET", "/.well-known/openid-configuration", None)
        .await;
    assert_eq!(d["issuer"], "http://127.0.0.1:7070");
    assert_eq!(d["jwks_uri"], "http://127.0.0.1:7070/.well-known/jwks.json");
    let (_, jwks) = app.call(None, "GET", "/.well-known/jwks.json", None).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);

    let (st, e) = app
        .call(
            a,
            "PUT",
            &format!("{G}/g"),
            Some(json!({"identity": {"enabled": true}})),
        )
        .await;
    // A rule between fields, beyond what the schema states: 422.
    assert_eq!((st, msg(&e).contains("audiences")), (422, true), "{e}");
    let spec = json!({"identity": {"enabled": true, "audiences": ["sts.amazonaws.com"]}});
    let (st, g) = app.call(a, "PUT", &format!("{G}/g"), Some(spec)).await;
    assert_eq!(st, 201, "{g}");
    assert_eq!(g["spec"]["identity"]["ttl_s"], 600);
    assert_eq!(g["spec"]["identity"]["in_guest"], false);
    let row = moat_server::api::Sandbox {
        id: "sb-0123456789ab".into(),
        group: "g".into(),
        state: moat_server::api::SandboxState::Running,
        reason: None,
        image: "sha256:00".into(),
        tier: moat_server::api::Tier::S,
        env: Default::default(),
        labels: Default::default(),
        created_at: String::new(),
        updated_at: String::new(),
        last_activity_at: None,
        node: None,
        health: None,
    };
    app.store.insert_sandbox(&row).await.unwrap();
    let mint = format!("{G}/g/sandboxes/sb-0123456789ab/identity/token");
    let (st, t) = app
        .call(
            a,
            "POST",
            &mint,
            Some(json!({"audience": "sts.amazonaws.com"})),
        )
        .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["token"].as_str().unwrap().split('.').count(), 3);
    let (st, e) = app
        .call(a, "POST", &mint, Some(json!({"audience": "api://nope"})))
        .await;
    assert_eq!((st, msg(&e).contains("not allowed")), (403, true), "{e}");
    let (st, e) = app
        .call(a, "POST", &mint, Some(json!({"audiences": "x"})))
        .await;
    assert_eq!(st, 400, "{e}");
    for (role, want) in [("owner", 200), ("user", 403), ("reader", 403)] {
        let k = app.key(role, &["g"]).await;
        let (st, e) = app
            .call(
                Some(&k),
                "POST",
                &mint,
                Some(json!({"audience": "sts.amazonaws.com", "ttl_s": 60})),
            )
            .await;
        assert_eq!(st, want, "{role}: {e}");
        let (st, _) = app.call(Some(&k), "GET", "/v1/identity/keys", None).await;
        assert_eq!(st, 403, "{role}");
        let (st, _) = app
            .call(Some(&k), "POST", "/v1/identity/keys/rotate", None)
            .await;
        assert_eq!(st, 403, "{role}");
        let (st, _) = app
            .call(Some(&k), "GET", &format!("{G}/g/identity/events"), None)
            .await;
        assert_eq!(st, 200, "{role} reads the audit");
    }
    let other = app.key("owner", &["other"]).await;
    let (st, _) = app
        .call(
            Some(&other),
            "POST",
            &mint,
            Some(json!({"audience": "sts.amazonaws.com"})),
        )
        .await;
    assert_eq!(st, 404, "another group's owner sees nothing");

    let (st, ev) = app
        .call(a, "GET", &format!("{G}/g/identity/events"), None)
        .await;
    assert_eq!(st, 200);
    let items = ev["items"].as_array().unwrap();
    let outcomes: Vec<&str> = items
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["minted", "refused", "minted"], "{ev}");
    assert_eq!(items[0]["jti"], t["jti"]);
    assert!(!ev.to_string().contains(t["token"].as_str().unwrap()));
    let (st, _) = app
        .call(a, "GET", &format!("{G}/g/identity/events?limit=0"), None)
        .await;
    assert_eq!(st, 400);

    let (st, before) = app.call(a, "GET", "/v1/identity/keys", None).await;
    assert_eq!(st, 200);
    let (st, after) = app.call(a, "POST", "/v1/identity/keys/rotate", None).await;
    assert_eq!(st, 200, "{after}");
    let state_of = |keys: &Value, kid: &Value| {
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == *kid)
            .map(|k| k["state"].clone())
    };
    let pending = before["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "pending")
        .unwrap()["kid"]
        .clone();
    assert_eq!(state_of(&after, &pending), Some(json!("active")));
    assert_eq!(state_of(&after, &t["kid"]), Some(json!("retired")));
    let (_, jwks) = app.call(None, "GET", "/.well-known/jwks.json", None).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 3);
}

/// Secrets: only owner and admin keys set and delete them, any key that sees the group lists
/// names and times, no answer ever holds a value, names and values are checked, transforms
/// must name secrets the group has, and `${identity:…}` an audience the group's identity allows.
#[tokio::test]
async fn secrets_are_write_only_scoped_and_checked() {
    let app = App::new();
    const VALUE: &str = "sk-router-test-VALUE-1234";
    for g in ["g", "h"] {
        let (st, _) = app
            .call(Some(ADMIN), "PUT", &format!("{G}/{g}"), Some(json!({})))
            .await;
        assert_eq!(st, 201);
    }
    let s = |g: &str, n: &str| format!("{G}/{g}/secrets/{n}");
    let mut answers = Vec::new();
    let (st, v) = app
        .call(
            Some(ADMIN),
            "PUT",
            &s("g", "openai"),
            Some(json!({"value": VALUE})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["name"], "openai");
    answers.push(v);
    let (st, v) = app
        .call(
            Some(ADMIN),
            "PUT",
            &s("g", "openai"),
            Some(json!({"value": VALUE})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    answers.push(v);
    let owner = app.key("owner", &["g"]).await;
    let user = app.key("user", &["g"]).await;
    let reader = app.key("reader", &["g"]).await;
    let (st, v) = app
        .call(
            Some(&owner),
            "PUT",
            &s("g", "gh"),
            Some(json!({"value": "ghp-x"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    for k in [&user, &reader] {
        let (st, v) = app
            .call(Some(k), "PUT", &s("g", "x"), Some(json!({"value": "v"})))
            .await;
        assert_eq!(st, 403, "{v}");
        let (st, v) = app.call(Some(k), "DELETE", &s("g", "gh"), None).await;
        assert_eq!(st, 403, "{v}");
    }
    // Another group's key sees nothing of it.
    let (st, _) = app
        .call(
            Some(&owner),
            "PUT",
            &s("h", "x"),
            Some(json!({"value": "v"})),
        )
        .await;
    assert_eq!(st, 404);
    let (st, list) = app
        .call(Some(&reader), "GET", &format!("{G}/g/secrets"), None)
        .await;
    assert_eq!(st, 200, "{list}");
    let names: Vec<_> = list["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("gh"), json!("openai")]);
    answers.push(list);
    let (st, list) = app
        .call(Some(ADMIN), "GET", &format!("{G}/h/secrets"), None)
        .await;
    assert_eq!((st, list["secrets"].as_array().unwrap().len()), (200, 0));

    // Bad names and values: clear errors that never quote the value.
    for (name, body, want) in [
        ("Bad", json!({"value": "v"}), "secret name"),
        (
            "ok",
            json!({"value": ""}),
            "at /value: the value is shorter than 1 character",
        ),
        (
            "ok",
            json!({"value": "a\nSECRETPART"}),
            "at /value: the value does not match",
        ),
        ("ok", json!({"value": "v", "extra": 1}), "unknown field"),
        ("ok", json!({}), "value"),
    ] {
        let (st, e) = app
            .call(Some(ADMIN), "PUT", &s("g", name), Some(body.clone()))
            .await;
        assert_eq!(st, 400, "{body}: {e}");
        assert!(
            msg(&e).contains(want) && !msg(&e).contains("SECRETPART"),
            "{body}: {e}"
        );
    }

    // Transforms name existing secrets and allowed identity audiences only.
    let transform = |h: &str| {
        json!({"egress": {"rules": [{"host": "api.openai.com", "ports": [443],
            "transform": {"headers": {"Authorization": h}}}]}})
    };
    let (st, g) = app
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/g"),
            Some(transform("Bearer ${secret:openai}")),
        )
        .await;
    assert_eq!(st, 200, "{g}");
    assert_eq!(
        g["spec"]["egress"]["rules"][0]["transform"]["headers"]["Authorization"],
        "Bearer ${secret:openai}",
        "the spec holds the placeholder, never the value"
    );
    answers.push(g);
    let (st, e) = app
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/g"),
            Some(transform("Bearer ${secret:nope}")),
        )
        .await;
    assert_eq!(st, 422);
    assert!(
        msg(&e).contains("egress.rules[0].transform.headers.authorization")
            && msg(&e).contains("no secret \"nope\""),
        "{e}"
    );
    let (st, e) = app
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/g"),
            Some(transform("Bearer ${identity:api://x}")),
        )
        .await;
    assert_eq!(st, 422);
    assert!(
        msg(&e).contains("does not allow audience \"api://x\""),
        "{e}"
    );
    // With the audience allowed by the group's identity, the same transform is accepted
    // (each request then carries a token minted for it).
    let mut with_identity = transform("Bearer ${identity:api://x}");
    with_identity["identity"] = json!({"enabled": true, "audiences": ["api://x"]});
    let (st, g) = app
        .call(Some(ADMIN), "PUT", &format!("{G}/g"), Some(with_identity))
        .await;
    assert_eq!(st, 200, "{g}");
    let (st, e) = app
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/g"),
            Some(json!({"egress": {"rules": [
            {"host": "a.com", "ports": [80], "transform": {"headers": {"A": "x"}}}]}})),
        )
        .await;
    assert_eq!(st, 422);
    assert!(msg(&e).contains("upgrade_to_https"), "{e}");

    // Deleting a secret a transform uses is allowed (its requests are then refused).
    let (st, _) = app
        .call(Some(&owner), "DELETE", &s("g", "openai"), None)
        .await;
    assert_eq!(st, 204);
    let (st, e) = app
        .call(Some(&owner), "DELETE", &s("g", "openai"), None)
        .await;
    assert_eq!(st, 404, "{e}");
    let (st, g) = app.call(Some(ADMIN), "GET", &format!("{G}/g"), None).await;
    assert_eq!(st, 200);
    answers.push(g);

    for a in &answers {
        assert!(
            !a.to_string().contains(VALUE),
            "an answer holds the value: {a}"
        );
    }
    // The database holds only the sealed value; no other file under the home holds it.
    let mut dirs = vec![app._home.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for f in std::fs::read_dir(&dir).unwrap().flatten() {
            if f.file_type().unwrap().is_dir() {
                dirs.push(f.path());
                continue;
            }
            let bytes = std::fs::read(f.path()).unwrap();
            assert!(
                !bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
                "{} holds the value",
                f.path().display()
            );
        }
    }
}

/// serde takes a struct as a JSON array too (`[null, null]` made a sandbox): every JSON body
/// is checked against its schema in the document, so an array, or a value of the wrong type
/// anywhere, is refused by every operation that takes a body, before anything else happens.
#[tokio::test]
async fn every_json_body_is_held_to_its_documented_schema() {
    let app = App::new();
    let (st, _) = app
        .call(Some(ADMIN), "PUT", &format!("{G}/g"), Some(json!({})))
        .await;
    assert_eq!(st, 201);
    let paths = app.doc["paths"].as_object().unwrap().clone();
    let mut bodies = 0;
    for (template, item) in &paths {
        for method in ["put", "post"] {
            let op = &item[method];
            if op["requestBody"]["content"]["application/json"].is_null() {
                continue;
            }
            bodies += 1;
            let path = template
                .replace("{group}", "g")
                .replace("{id}", "sb-0123456789ab")
                .replace("{pid_id}", "p1")
                .replace("{name}", "n")
                .replace("{port}", "8080");
            for body in [json!([null, null]), json!([]), json!(null), json!(7)] {
                let (st, e) = app
                    .call(
                        Some(ADMIN),
                        &method.to_ascii_uppercase(),
                        &path,
                        Some(body.clone()),
                    )
                    .await;
                assert_eq!(st, 400, "{method} {template} {body}: {e}");
                assert!(msg(&e).contains("invalid request body"), "{e}");
            }
        }
    }
    assert!(bodies >= 12, "{bodies}");
    // A schema rule serde does not know: the API key's name. The type's own check refuses it
    // too, and its message is the one given.
    let (st, e) = app
        .call(
            Some(ADMIN),
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "\u{7}bell", "role": "admin"})),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(
        msg(&e).contains("invalid name") && msg(&e).contains("printable"),
        "{e}"
    );
    // Integers are bounded by their type (a version the store cannot hold), and the schema's
    // message says where when no check of the type's own speaks.
    let (st, e) = app
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/g/policy/rollback"),
            Some(json!({"version": 9_223_372_036_854_775_808_u64})),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(msg(&e).contains("at /version"), "{e}");
    // Allowed by the document, refused by a rule it cannot state: 422, naming the rule.
    let (st, e) = app
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/g/sandboxes"),
            Some(json!({"from_snapshot": "s", "image": "base"})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (422, Some("unprocessable")),
        "{e}"
    );
    assert!(msg(&e).contains("from_snapshot excludes image"), "{e}");
    // Nothing was created by any of it.
    let (_, keys) = app.call(Some(ADMIN), "GET", "/v1/api-keys", None).await;
    assert_eq!(keys["api_keys"].as_array().unwrap().len(), 1, "{keys}");
}

/// The rules the server checks of path parameters are in the document, for generated clients.
#[test]
fn path_parameter_rules_are_documented() {
    let doc = serde_json::to_value(moat_server::http::openapi_document()).unwrap();
    let mut seen = 0;
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (_, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let schema = &p["schema"];
                match (p["name"].as_str().unwrap(), p["in"].as_str().unwrap()) {
                    ("group", "path") => {
                        seen += 1;
                        assert_eq!(
                            schema["pattern"],
                            moat_server::api::NAME_PATTERN,
                            "{template}"
                        );
                        assert_eq!(schema["maxLength"], 63, "{template}");
                    }
                    ("port", "path") => {
                        assert_eq!(
                            (&schema["minimum"], &schema["maximum"]),
                            (&json!(1), &json!(65535)),
                            "{template}"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(seen >= 40, "{seen}");
}

/// `NAME_PATTERN` says what `validate_name` does.
#[test]
fn the_name_pattern_agrees_with_the_server() {
    let schema = json!({"type": "string", "pattern": moat_server::api::NAME_PATTERN,
        "minLength": 1, "maxLength": 63});
    let v = jsonschema::validator_for(&schema).unwrap();
    for name in [
        "a",
        "a-b",
        "0",
        "a0-9z",
        "-a",
        "a-",
        "A",
        "a_b",
        "",
        "a b",
        "é",
        &"a".repeat(63),
        &"a".repeat(64),
        "a--b",
        "a.b",
    ] {
        assert_eq!(
            v.is_valid(&json!(name)),
            moat_server::api::validate_name("x", name).is_ok(),
            "{name:?}"
        );
    }
}

fn key_id_of(app_keys: &Value, key: &str) -> String {
    let prefix: String = key.chars().take(13).collect();
    app_keys["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["prefix"] == prefix.as_str())
        .unwrap_or_else(|| panic!("no key with prefix {prefix} in {app_keys}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A key that expires is refused with 401 and why once its time has passed, and only an
/// admin's rotation with a new expiry brings it back, under a new secret.
#[tokio::test]
async fn expired_keys_get_401_until_rotated_with_a_new_expiry() {
    let app = App::new();
    app.call(Some(ADMIN), "PUT", &format!("{G}/g"), Some(json!({})))
        .await;
    let (st, k) = app
        .call(
            Some(ADMIN),
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "short", "role": "user", "groups": ["g"], "expires_in_s": 1})),
        )
        .await;
    assert_eq!(st, 201, "{k}");
    assert!(k["expires_at"].is_string(), "{k}");
    let (key, id) = (k["key"].as_str().unwrap(), k["id"].as_str().unwrap());
    let (st, _) = app.call(Some(key), "GET", G, None).await;
    assert_eq!(st, 200);
    // Expiry is to the second: within two seconds the key must stop working.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let e = loop {
        let (st, e) = app.call(Some(key), "GET", G, None).await;
        if st == 401 {
            break e;
        }
        assert_eq!(st, 200, "{e}");
        assert!(
            std::time::Instant::now() < deadline,
            "the key never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        msg(&e).contains("expired at") && msg(&e).contains(id),
        "{e}"
    );
    // Expired: no mutation either.
    let (st, _) = app
        .call(Some(key), "PUT", &format!("{G}/other"), Some(json!({})))
        .await;
    assert_eq!(st, 401);
    // Past expiry, a rotation must give a new one.
    let rotate = format!("/v1/api-keys/{id}/rotate");
    let (st, e) = app
        .call(Some(ADMIN), "POST", &rotate, Some(json!({})))
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(msg(&e).contains("expires_in_s"), "{e}");
    for bad in [json!({"expires_in_s": 0}), json!({"expires_in_s": -1})] {
        let (st, e) = app
            .call(Some(ADMIN), "POST", &rotate, Some(bad.clone()))
            .await;
        assert_eq!(st, 400, "{bad}: {e}");
    }
    let (st, r) = app
        .call(
            Some(ADMIN),
            "POST",
            &rotate,
            Some(json!({"expires_in_s": 3600})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let new = r["key"].as_str().unwrap();
    assert_eq!(
        (r["id"].as_str(), r["role"].as_str()),
        (Some(id), Some("user"))
    );
    let (st, _) = app.call(Some(new), "GET", G, None).await;
    assert_eq!(st, 200);
    let (st, e) = app.call(Some(key), "GET", G, None).await;
    assert_eq!(st, 401);
    assert!(msg(&e).contains("invalid or deleted API key"), "{e}");
    // Show: expiry, rotation and last use, never a secret.
    let (st, shown) = app
        .call(Some(ADMIN), "GET", &format!("/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(st, 200, "{shown}");
    assert!(shown["expires_at"].is_string() && shown["rotated_at"].is_string());
    assert!(shown["last_used_at"].is_string(), "{shown}");
    assert!(shown.get("key").is_none() && !shown.to_string().contains(new));
    // Only admins rotate or show.
    let (st, _) = app.call(Some(new), "POST", &rotate, Some(json!({}))).await;
    assert_eq!(st, 403);
    let (st, _) = app
        .call(Some(new), "GET", &format!("/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(st, 403);
}

/// Rotating a key that has not expired keeps its expiry, role, groups and rate limit; the old
/// secret is refused from the rotation's answer on.
#[tokio::test]
async fn rotation_ends_the_old_secret_and_keeps_the_rest() {
    let app = App::new();
    app.call(Some(ADMIN), "PUT", &format!("{G}/g"), Some(json!({})))
        .await;
    let (_, k) = app
        .call(
            Some(ADMIN),
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "ci", "role": "reader", "groups": ["g"],
                "expires_in_s": 86400, "rate_limit": {"per_s": 50, "burst": 60}})),
        )
        .await;
    let (old, id) = (k["key"].as_str().unwrap(), k["id"].as_str().unwrap());
    let (st, r) = app
        .call(
            Some(ADMIN),
            "POST",
            &format!("/v1/api-keys/{id}/rotate"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    for field in ["id", "role", "groups", "expires_at", "rate_limit", "name"] {
        assert_eq!(r[field], k[field], "{field}");
    }
    assert_ne!(r["prefix"], k["prefix"]);
    let new = r["key"].as_str().unwrap();
    let (st, _) = app.call(Some(old), "GET", &format!("{G}/g"), None).await;
    assert_eq!(st, 401);
    let (st, _) = app.call(Some(new), "GET", &format!("{G}/g"), None).await;
    assert_eq!(st, 200);
    // The new secret is a reader's, scoped as before.
    let (st, _) = app.call(Some(new), "GET", &format!("{G}/h"), None).await;
    assert_eq!(st, 404);
    let (st, _) = app
        .call(Some(new), "PUT", &format!("{G}/g"), Some(json!({})))
        .await;
    assert_eq!(st, 403);
    let (st, _) = app
        .call(
            Some(ADMIN),
            "POST",
            "/v1/api-keys/key-nope/rotate",
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 404);
}

/// A key over its rate limit gets 429 with Retry-After; other keys are unaffected; rotating
/// the key does not refill its bucket (the bucket is the key's, not its secret's); the wait
/// Retry-After names is enough.
#[tokio::test]
async fn rate_limits_are_per_key_with_retry_after() {
    let app = App::new();
    app.call(Some(ADMIN), "PUT", &format!("{G}/g"), Some(json!({})))
        .await;
    let (_, k) = app
        .call(
            Some(ADMIN),
            "POST",
            "/v1/api-keys",
            Some(json!({"name": "slow", "role": "reader", "groups": ["g"],
                "rate_limit": {"per_s": 1, "burst": 3}})),
        )
        .await;
    let (slow, id) = (k["key"].as_str().unwrap(), k["id"].as_str().unwrap());
    let path = format!("{G}/g");
    for _ in 0..3 {
        let (st, e) = app.call(Some(slow), "GET", &path, None).await;
        assert_eq!(st, 200, "{e}");
    }
    let (st, e, headers) = app.call_full(Some(slow), "GET", &path, None).await;
    assert_eq!(st, 429, "{e}");
    assert_eq!(e["error"]["code"], "rate_limited");
    assert!(msg(&e).contains("1 requests a second, bursts of 3"), "{e}");
    let retry: u64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // Refused requests take no token, but they do not get through either: a flood stays out.
    for _ in 0..20 {
        let (st, _) = app.call(Some(slow), "GET", &path, None).await;
        assert_eq!(st, 429);
    }
    // Another key, and the admin, are not slowed by it.
    for _ in 0..20 {
        let (st, _) = app.call(Some(ADMIN), "GET", &path, None).await;
        assert_eq!(st, 200);
    }
    // A new secret for the same key is the same bucket.
    let (st, r) = app
        .call(
            Some(ADMIN),
            "POST",
            &format!("/v1/api-keys/{id}/rotate"),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let new = r["key"].as_str().unwrap();
    let (st, _) = app.call(Some(new), "GET", &path, None).await;
    assert_eq!(st, 429);
    // After Retry-After, a request gets through.
    tokio::time::sleep(std::time::Duration::from_secs(retry)).await;
    let (st, e) = app.call(Some(new), "GET", &path, None).await;
    assert_eq!(st, 200, "{e}");
    // Limits outside 1–100000 are refused, by the document's schema.
    for bad in [
        json!({"per_s": 0, "burst": 1}),
        json!({"per_s": 1}),
        json!({"per_s": 1, "burst": 100001}),
    ] {
        let (st, e) = app
            .call(
                Some(ADMIN),
                "POST",
                "/v1/api-keys",
                Some(json!({"name": "x", "role": "admin", "rate_limit": bad})),
            )
            .await;
        assert_eq!(st, 400, "{e}");
    }
}

/// Every mutating call is in the audit log with its key, route, path, group, status and
/// request id (the answer's X-Request-Id), refused ones too; no body, so no secret value, is
/// ever in it; only admins read it, filtered by key, group and time.
#[tokio::test]
async fn mutating_calls_are_audited_without_bodies() {
    let app = App::new();
    let (st, _, h) = app
        .call_full(Some(ADMIN), "PUT", &format!("{G}/g"), Some(json!({})))
        .await;
    assert_eq!(st, 201);
    let put_id = h["x-request-id"].to_str().unwrap().to_string();
    app.call(Some(ADMIN), "PUT", &format!("{G}/h"), Some(json!({})))
        .await;
    let owner = app.key("owner", &["g"]).await;
    let secret = "sk-live-THIS-MUST-NOT-BE-LOGGED";
    let (st, e) = app
        .call(
            Some(&owner),
            "PUT",
            &format!("{G}/g/secrets/api-token"),
            Some(json!({"value": secret})),
        )
        .await;
    assert_eq!(st, 201, "{e}");
    // Refused: a reader-less forbidden change, and one without a key.
    let (st, _) = app
        .call(Some(&owner), "PUT", &format!("{G}/h"), Some(json!({})))
        .await;
    assert_eq!(st, 404);
    let (st, _) = app.call(None, "DELETE", &format!("{G}/g"), None).await;
    assert_eq!(st, 401);
    // Reads are not audited.
    app.call(Some(ADMIN), "GET", G, None).await;

    let (st, log) = app.call(Some(ADMIN), "GET", "/v1/audit", None).await;
    assert_eq!(st, 200, "{log}");
    assert!(!log.to_string().contains(secret), "{log}");
    assert!(!log.to_string().contains(&owner), "{log}");
    let events = log["events"].as_array().unwrap();
    let actions: Vec<(String, u64)> = events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("PUT /v1/sandbox-groups/{group}".to_string(), 201),
            ("PUT /v1/sandbox-groups/{group}".to_string(), 201),
            ("POST /v1/api-keys".to_string(), 201),
            (
                "PUT /v1/sandbox-groups/{group}/secrets/{name}".to_string(),
                201
            ),
            ("PUT /v1/sandbox-groups/{group}".to_string(), 404),
            ("DELETE /v1/sandbox-groups/{group}".to_string(), 401),
        ],
        "{log}"
    );
    assert_eq!(events[0]["request_id"], put_id.as_str());
    assert_eq!(events[0]["target"], "/v1/sandbox-groups/g");
    assert_eq!(events[0]["group"], "g");
    assert!(events[5]["key_id"].is_null());
    let keys = app.call(Some(ADMIN), "GET", "/v1/api-keys", None).await.1;
    let owner_id = key_id_of(&keys, &owner);
    assert_eq!(events[3]["key_id"], owner_id.as_str());

    let (_, by_key) = app
        .call(
            Some(ADMIN),
            "GET",
            &format!("/v1/audit?key={owner_id}"),
            None,
        )
        .await;
    assert_eq!(by_key["events"].as_array().unwrap().len(), 2, "{by_key}");
    let (_, by_group) = app
        .call(Some(ADMIN), "GET", "/v1/audit?group=h", None)
        .await;
    assert_eq!(
        by_group["events"].as_array().unwrap().len(),
        2,
        "{by_group}"
    );
    let (_, page) = app
        .call(Some(ADMIN), "GET", "/v1/audit?limit=4", None)
        .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 4);
    let next = page["next"].as_u64().unwrap();
    let (_, rest) = app
        .call(Some(ADMIN), "GET", &format!("/v1/audit?after={next}"), None)
        .await;
    assert_eq!(rest["events"].as_array().unwrap().len(), 2, "{rest}");
    let (_, future) = app
        .call(Some(ADMIN), "GET", "/v1/audit?since=99999999999", None)
        .await;
    assert_eq!(future["events"], json!([]));
    for bad in ["limit=0", "group=Bad", "since=x", "nope=1"] {
        let (st, e) = app
            .call(Some(ADMIN), "GET", &format!("/v1/audit?{bad}"), None)
            .await;
        assert_eq!(st, 400, "{bad}: {e}");
    }
    let (st, _) = app.call(Some(&owner), "GET", "/v1/audit", None).await;
    assert_eq!(st, 403);
}
