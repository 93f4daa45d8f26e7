//! Workload identity end to end: a daemon booting real VMs mints tokens for its sandboxes
//! (`moat identity token`), and a standard JWT library (PyJWT, in a virtualenv under the
//! target directory) verifies them against the JWKS the daemon serves, as a relying party
//! would: the claims, a refused audience, a rotation that keeps old tokens verifiable, a
//! suspended or deleted sandbox that mints nothing, a resume that is a new incarnation, forks
//! with ids and uids of their own, the audit without token values, and `publish`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{msg, Daemon, ADMIN, G};
use common::python::{self, run, text};
use serde_json::{json, Value};

/// Verifies TOKEN (argv[3]) for AUDIENCE (argv[2]) against the JWKS at argv[1] with PyJWT
/// and prints the claims, or prints `refused: …` when PyJWT refuses it.
const VERIFY: &str = r#"
import json, sys, jwt
url, aud, token = sys.argv[1], sys.argv[2], sys.argv[3]
key = jwt.PyJWKClient(url, cache_jwk_set=False).get_signing_key_from_jwt(token)
try:
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=aud,
        options={"require": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"]})
    print(json.dumps({"claims": claims, "kid": key.key_id}))
except jwt.InvalidTokenError as e:
    print(json.dumps({"refused": type(e).__name__}))
"#;

fn verify(python: &std::path::Path, d: &Daemon, aud: &str, token: &str) -> Value {
    let mut c = Command::new(python);
    c.args(["-c", VERIFY])
        .arg(format!("{}/.well-known/jwks.json", d.url()))
        .args([aud, token]);
    let o = run(c, "PyJWT", Duration::from_secs(60));
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)))
}

fn token(d: &Daemon, id: &str, aud: &str) -> Result<Value, String> {
    let o = d.cli(
        ADMIN,
        &["identity", "token", "ids", id, "--aud", aud, "--json"],
    );
    if o.status.success() {
        Ok(serde_json::from_slice(&o.stdout).unwrap())
    } else {
        Err(text(&o))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_verify_with_pyjwt_against_the_served_jwks() {
    let python = tokio::task::spawn_blocking(|| {
        python::venv("identity-venv", &["PyJWT[crypto]==2.10.1".to_string()], &[])
    })
    .await
    .unwrap();
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let o = d.cli(
        ADMIN,
        &[
            "group",
            "apply",
            "--name",
            "ids",
            "--identity",
            "true",
            "--identity-audience",
            "sts.amazonaws.com",
            "--identity-audience",
            "api://AzureADTokenExchange",
            "--label",
            "team=ml",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let a = d
        .create(ADMIN, "ids", json!({"labels": {"job": "one"}}))
        .await;
    let b = d.new_sandbox("ids").await;
    let a_id = a["id"].as_str().unwrap();

    // The claims, verified by PyJWT with the key the daemon publishes.
    let t = token(&d, a_id, "sts.amazonaws.com").unwrap();
    let v = verify(
        &python,
        &d,
        "sts.amazonaws.com",
        t["token"].as_str().unwrap(),
    );
    let c = &v["claims"];
    assert_eq!(c["iss"], d.url(), "{v}");
    assert_eq!(c["aud"], "sts.amazonaws.com");
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
    assert_eq!(c["group"], "ids");
    assert_eq!(c["sandbox_id"], a_id);
    assert_eq!(c["image_digest"], a["image"]);
    assert_eq!(c["labels"], json!({"job": "one"}));
    assert_eq!(c["sub"], format!("group:ids:{}", s(&c["group_uid"])));
    assert_eq!(c["jti"], t["jti"]);
    assert_eq!(s(&c["sandbox_uid"]).len(), 32);
    // A relying party that expects another audience refuses it.
    let other = verify(&python, &d, "api://AzureADTokenExchange", s(&t["token"]));
    assert_eq!(other["refused"], "InvalidAudienceError", "{other}");

    // Another sandbox: the same group subject, its own sandbox claims.
    let tb = token(&d, &b, "api://AzureADTokenExchange").unwrap();
    let vb = verify(&python, &d, "api://AzureADTokenExchange", s(&tb["token"]));
    assert_eq!(vb["claims"]["sub"], c["sub"]);
    assert_eq!(vb["claims"]["sandbox_id"], b);
    assert_ne!(vb["claims"]["sandbox_uid"], c["sandbox_uid"]);

    // An audience the group does not allow is refused, and audited.
    let e = token(&d, a_id, "https://evil.example").unwrap_err();
    assert!(
        e.contains("not allowed") && e.contains("sts.amazonaws.com"),
        "{e}"
    );

    // Rotation: the old token still verifies; new ones are signed by the key that was
    // published before the rotation.
    let (_, before) = d.call(None, "GET", "/.well-known/jwks.json", None).await;
    let o = d.cli(ADMIN, &["identity", "rotate", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let again = verify(&python, &d, "sts.amazonaws.com", s(&t["token"]));
    assert_eq!(again["claims"]["jti"], t["jti"], "{again}");
    let t2 = token(&d, a_id, "sts.amazonaws.com").unwrap();
    assert_ne!(t2["kid"], t["kid"]);
    let published_before = before["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == t2["kid"]);
    assert!(
        published_before,
        "the new signing key was in the JWKS before it signed"
    );
    verify(&python, &d, "sts.amazonaws.com", s(&t2["token"]))["claims"]
        .as_object()
        .expect("verifies");

    // `publish` writes what the daemon serves.
    let out = tempfile::tempdir().unwrap();
    let o = d.cli(
        ADMIN,
        &["identity", "publish", out.path().to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    for name in ["openid-configuration", "jwks.json"] {
        let (_, served) = d
            .call(None, "GET", &format!("/.well-known/{name}"), None)
            .await;
        let file: Value = serde_json::from_slice(
            &std::fs::read(out.path().join(".well-known").join(name)).unwrap(),
        )
        .unwrap();
        assert_eq!(file, served, "{name}");
    }

    // Forks of one snapshot are sandboxes of their own: their own ids and uids.
    let (st, snap) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/ids/sandboxes/{b}/snapshots"),
            Some(json!({"name": "fork-me"})),
        )
        .await;
    assert_eq!(st, 201, "{snap}");
    let (st, forks) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/ids/sandboxes"),
            Some(json!({"from_snapshot": "fork-me", "count": 2})),
        )
        .await;
    assert_eq!(st, 201, "{forks}");
    let fork_claims: Vec<Value> = forks["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let t = token(&d, s(&f["id"]), "sts.amazonaws.com").unwrap();
            verify(&python, &d, "sts.amazonaws.com", s(&t["token"]))["claims"].clone()
        })
        .collect();
    assert_ne!(fork_claims[0]["sandbox_id"], fork_claims[1]["sandbox_id"]);
    assert_ne!(fork_claims[0]["sandbox_uid"], fork_claims[1]["sandbox_uid"]);
    for f in &fork_claims {
        assert_ne!(
            f["sandbox_uid"], vb["claims"]["sandbox_uid"],
            "not the source's"
        );
        assert_eq!(f["sub"], c["sub"], "the same group principal");
        d.delete("ids", s(&f["sandbox_id"])).await;
    }

    // A suspended sandbox mints nothing; resumed, it is a new incarnation of the same
    // sandbox (same uid).
    let (st, sb, _) = d.lifecycle("ids", a_id, "suspend").await;
    assert_eq!(st, 200, "{sb}");
    let e = token(&d, a_id, "sts.amazonaws.com").unwrap_err();
    assert!(e.contains("suspended") && e.contains("409"), "{e}");
    let (st, sb, _) = d.lifecycle("ids", a_id, "resume").await;
    assert_eq!(st, 200, "{sb}");
    let t3 = token(&d, a_id, "sts.amazonaws.com").unwrap();
    let c3 = verify(&python, &d, "sts.amazonaws.com", s(&t3["token"]))["claims"].clone();
    assert_eq!(c3["sandbox_uid"], c["sandbox_uid"]);
    assert_eq!(
        c3["incarnation"].as_u64().unwrap(),
        c["incarnation"].as_u64().unwrap() + 1
    );

    // A deleted sandbox mints nothing.
    d.delete("ids", &b).await;
    let e = token(&d, &b, "sts.amazonaws.com").unwrap_err();
    assert!(e.contains("no sandbox"), "{e}");

    // The audit: every mint and the refusal, never a token.
    let (st, ev) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/ids/identity/events"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{}", msg(&ev));
    let outcomes: Vec<&str> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["minted", "minted", "refused", "minted", "minted", "minted", "refused", "minted"],
        "{ev}"
    );
    for tok in [&t, &tb, &t2, &t3] {
        assert!(!ev.to_string().contains(s(&tok["token"])));
    }
    let minted = d
        .metric("moat_identity_tokens_minted_total{group=\"ids\",delivery=\"api\"}")
        .await;
    assert_eq!(minted, Some(6.0));
    d.delete("ids", a_id).await;
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}
