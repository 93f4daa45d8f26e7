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
    let forks = d.snapshot_and_fork("ids", &b, "fork-me", 2).await;
    let fork_claims: Vec<Value> = forks
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

/// Guest code's side of the in-guest endpoint: argv[1] is a JSON list of requests
/// `[name, method, path, headers]`, where `$H` in a header value is `IDENTITY_HEADER` and a
/// path starting with `/` is on the endpoint's host; prints `{name: [status, body]}` and the
/// endpoint the env names.
const GUEST: &str = r#"
import http.client, json, os, sys, urllib.parse
ep = urllib.parse.urlsplit(os.environ.get('IDENTITY_ENDPOINT', 'http://169.254.169.254/msi/token'))
out = {'endpoint': os.environ.get('IDENTITY_ENDPOINT'), 'header': os.environ.get('IDENTITY_HEADER')}
for name, method, path, headers in json.loads(sys.argv[1]):
    headers = {k: v.replace('$H', os.environ.get('IDENTITY_HEADER', '')) for k, v in headers.items()}
    c = http.client.HTTPConnection(ep.hostname, ep.port or 80, timeout=30)
    c.request(method, path, headers=headers)
    r = c.getresponse()
    out[name] = [r.status, r.read().decode()]
print(json.dumps(out))
"#;

/// Runs [`GUEST`] in sandbox `id` with `requests`; its output.
async fn guest(d: &Daemon, id: &str, requests: Value) -> Value {
    let (st, r) = d
        .exec(
            ADMIN,
            "ing",
            id,
            json!({"argv": ["python3", "-c", GUEST, requests.to_string()], "timeout_s": 120}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");
    serde_json::from_str(s(&r["stdout"])).unwrap_or_else(|_| panic!("{r}"))
}

/// The ACA form for `aud` with the env's header.
fn aca(name: &str, aud: &str, extra: Value) -> Value {
    let mut h = json!({"X-IDENTITY-HEADER": "$H"});
    for (k, v) in extra.as_object().unwrap() {
        h[k] = v.clone();
    }
    json!([
        name,
        "GET",
        format!(
            "/msi/token?resource={}&api-version=2019-08-01",
            urlencode(aud)
        ),
        h
    ])
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `[status, body]` of request `name` in a [`guest`] output, the body as JSON where it is.
fn answer(out: &Value, name: &str) -> (u64, Value) {
    let v = &out[name];
    let body = s(&v[1]);
    (
        v[0].as_u64().unwrap_or_else(|| panic!("{name}: {out}")),
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into())),
    )
}

/// The in-guest endpoint end to end (`identity.in_guest`), under deny-all egress: guest code
/// gets tokens through `IDENTITY_ENDPOINT` (ACA's protocol) and the IMDS form, and PyJWT
/// verifies them against the served JWKS; a refused audience, a missing or wrong header and a
/// forwarded request are refused and audited; forks' tokens name the forks; a resume makes the
/// old header and session useless; turning `in_guest` off stops mints at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_code_fetches_tokens_from_the_in_guest_endpoint() {
    let python = tokio::task::spawn_blocking(|| {
        python::venv("identity-venv", &["PyJWT[crypto]==2.10.1".to_string()], &[])
    })
    .await
    .unwrap();
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let mut spec = json!({"identity": {"enabled": true, "in_guest": true,
        "audiences": ["sts.amazonaws.com", "api://AzureADTokenExchange"]}});
    d.put_group("ing", spec.clone(), 201).await;
    let a = d.new_sandbox("ing").await;

    let session = json!(["session", "PUT", "/latest/api/token",
        {"X-aws-ec2-metadata-token-ttl-seconds": "300"}]);
    let out = guest(
        &d,
        &a,
        json!([
            aca("aca", "api://AzureADTokenExchange", json!({})),
            aca("refused_aud", "https://evil.example", json!({})),
            [
                "no_header",
                "GET",
                "/msi/token?resource=sts.amazonaws.com&api-version=2019-08-01",
                {}
            ],
            aca(
                "wrong_header",
                "sts.amazonaws.com",
                json!({"X-IDENTITY-HEADER": "0".repeat(64)})
            ),
            aca(
                "forwarded",
                "sts.amazonaws.com",
                json!({"X-Forwarded-For": "10.1.2.3"})
            ),
            session,
        ]),
    )
    .await;
    assert_eq!(out["endpoint"], "http://169.254.169.254/msi/token", "{out}");
    let header = s(&out["header"]).to_string();
    assert_eq!(header.len(), 64, "{out}");
    let (st, tok) = answer(&out, "aca");
    assert_eq!(st, 200, "{out}");
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["resource"], "api://AzureADTokenExchange");
    let v = verify(
        &python,
        &d,
        "api://AzureADTokenExchange",
        s(&tok["access_token"]),
    );
    let c = &v["claims"];
    assert_eq!(c["sandbox_id"], a.as_str(), "{v}");
    assert_eq!(c["delivery"], "endpoint");
    assert_eq!(c["group"], "ing");
    assert_eq!(
        c["exp"].as_i64().unwrap().to_string(),
        s(&tok["expires_on"])
    );
    let (st, e) = answer(&out, "refused_aud");
    assert_eq!(st, 403, "{out}");
    assert!(s(&e["error"]).contains("not allowed"), "{e}");
    assert_eq!(answer(&out, "no_header").0, 401, "{out}");
    assert_eq!(answer(&out, "wrong_header").0, 401, "{out}");
    assert_eq!(answer(&out, "forwarded").0, 403, "{out}");
    let (st, sess) = answer(&out, "session");
    assert_eq!(st, 200, "{out}");
    let sess = sess.as_str().unwrap().to_string();

    // The IMDS form, with the session.
    let imds = |name: &str, token: &str| {
        json!([name, "GET", "/metadata/identity/token?resource=sts.amazonaws.com",
            {"X-aws-ec2-metadata-token": token}])
    };
    let out = guest(&d, &a, json!([imds("imds", &sess)])).await;
    let (st, tok) = answer(&out, "imds");
    assert_eq!(st, 200, "{out}");
    let v = verify(&python, &d, "sts.amazonaws.com", s(&tok["access_token"]));
    assert_eq!(v["claims"]["sandbox_id"], a.as_str(), "{v}");
    let incarnation = v["claims"]["incarnation"].as_u64().unwrap();

    // Forks: their own sandbox claims, their own headers (the source's is refused there).
    let forks = d.snapshot_and_fork("ing", &a, "ing-fork", 2).await;
    let mut fork_claims = Vec::new();
    for f in &forks {
        let id = s(&f["id"]);
        let out = guest(
            &d,
            id,
            json!([
                aca("aca", "sts.amazonaws.com", json!({})),
                aca(
                    "old_header",
                    "sts.amazonaws.com",
                    json!({"X-IDENTITY-HEADER": header})
                ),
                imds("old_session", &sess),
            ]),
        )
        .await;
        assert_ne!(s(&out["header"]), header, "a fork gets its own header");
        assert_eq!(answer(&out, "old_header").0, 401, "{out}");
        assert_eq!(answer(&out, "old_session").0, 401, "{out}");
        let (st, tok) = answer(&out, "aca");
        assert_eq!(st, 200, "{out}");
        let v = verify(&python, &d, "sts.amazonaws.com", s(&tok["access_token"]));
        assert_eq!(v["claims"]["sandbox_id"], id, "{v}");
        fork_claims.push(v["claims"].clone());
    }
    assert_ne!(fork_claims[0]["sandbox_uid"], fork_claims[1]["sandbox_uid"]);
    assert_ne!(fork_claims[0]["sandbox_uid"], c["sandbox_uid"]);
    for f in &fork_claims {
        d.delete("ing", s(&f["sandbox_id"])).await;
    }

    // A resume is a new incarnation: the old header and session stop working.
    let (st, sb, _) = d.lifecycle("ing", &a, "suspend").await;
    assert_eq!(st, 200, "{sb}");
    let (st, sb, _) = d.lifecycle("ing", &a, "resume").await;
    assert_eq!(st, 200, "{sb}");
    let out = guest(
        &d,
        &a,
        json!([
            aca("aca", "sts.amazonaws.com", json!({})),
            aca(
                "old_header",
                "sts.amazonaws.com",
                json!({"X-IDENTITY-HEADER": header})
            ),
            imds("old_session", &sess),
        ]),
    )
    .await;
    assert_ne!(s(&out["header"]), header, "{out}");
    assert_eq!(answer(&out, "old_header").0, 401, "{out}");
    assert_eq!(answer(&out, "old_session").0, 401, "{out}");
    let (st, tok) = answer(&out, "aca");
    assert_eq!(st, 200, "{out}");
    let v = verify(&python, &d, "sts.amazonaws.com", s(&tok["access_token"]));
    assert_eq!(
        v["claims"]["incarnation"].as_u64().unwrap(),
        incarnation + 1,
        "{v}"
    );

    // Turning in_guest off refuses the next mint at once (the env stays until a resume).
    spec["identity"]["in_guest"] = json!(false);
    d.put_group("ing", spec, 200).await;
    let out = guest(&d, &a, json!([aca("aca", "sts.amazonaws.com", json!({}))])).await;
    let (st, e) = answer(&out, "aca");
    assert_eq!(st, 403, "{out}");
    assert!(s(&e["error"]).contains("in_guest"), "{e}");

    // The audit: mints and refusals of the endpoint, no token value.
    let (st, ev) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/ing/identity/events?limit=100"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{}", msg(&ev));
    let items = ev["items"].as_array().unwrap();
    assert!(items.iter().all(|e| e["delivery"] == "endpoint"), "{ev}");
    let count = |outcome: &str| items.iter().filter(|e| e["outcome"] == outcome).count();
    // Minted: a's two, the forks' two, after the resume one. Refused: the audience, the
    // missing and wrong header, the forwarded request; per fork the old header and session;
    // after the resume the old header and session; in_guest off.
    assert_eq!(count("minted"), 5, "{ev}");
    assert_eq!(count("refused"), 11, "{ev}");
    assert!(
        items
            .iter()
            .any(|e| s(&e["reason"]).contains("forwarded requests are refused")),
        "{ev}"
    );
    assert!(!ev.to_string().contains(s(&tok["access_token"])));
    d.delete("ing", &a).await;
}
