//! End-to-end tests of images through the daemon: imports as operations from a real registry
//! on loopback, listing, sandboxes from the imported image, deletion rules, operations across
//! restarts, and `moat image` through the daemon. Real `moat serve`, real VMs.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{msg, Daemon, ADMIN, G};
use common::unique;
use moat_testkit::Registry;
use serde_json::{json, Value};

/// Polls the operation until it is no longer running.
async fn wait_op(d: &Daemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (st, op) = d
            .call(Some(ADMIN), "GET", &format!("/v1/operations/{id}"), None)
            .await;
        assert_eq!(st, 200, "{op}");
        if op["state"] != "running" {
            return op;
        }
        assert!(Instant::now() < deadline, "import still running: {op}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn import(d: &Daemon, body: Value) -> Value {
    let (st, op) = d.call(Some(ADMIN), "POST", "/v1/images", Some(body)).await;
    assert_eq!(st, 202, "{op}");
    assert_eq!(op["kind"], "image-import");
    assert_eq!(op["state"], "running");
    op
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_import_list_use_and_delete() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let reg = Registry::start(None);
    let marker = unique("marker").to_lowercase();
    let (reference, digest) = common::push_image(&reg, "e2e", &marker).await;
    let name = unique("img");

    // Import; a second import of the same name meanwhile is refused.
    let t = Instant::now();
    let op = import(
        &d,
        json!({"source": reference, "name": name, "plain_http": true}),
    )
    .await;
    let (st, v) = d
        .call(
            Some(ADMIN),
            "POST",
            "/v1/images",
            Some(json!({"source": reference, "name": name, "plain_http": true})),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(msg(&v).contains("already running"), "{v}");
    let op = wait_op(&d, op["id"].as_str().unwrap()).await;
    eprintln!("image import through the daemon: {:?}", t.elapsed());
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["progress"]["phase"], "done", "{op}");
    assert_eq!(op["result"]["name"], name.as_str());
    assert_eq!(op["result"]["digest"], digest.as_str());
    assert!(op["error"].is_null());

    // Listed and shown, to any key.
    let reader = d.key("reader", &["web"]).await;
    let (st, list) = d.call(Some(&reader), "GET", "/v1/images", None).await;
    assert_eq!(st, 200, "{list}");
    let mine = list["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {list}"));
    assert_eq!(mine["digest"], digest.as_str());
    assert!(mine["size_bytes"].as_u64().unwrap() > 0);
    let (st, img) = d
        .call(Some(&reader), "GET", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!((st, &img["digest"]), (200, &json!(digest)), "{img}");

    // A group whose default is the image keeps it.
    d.put_group("web", json!({"tier": "s", "image": name}), 201)
        .await;
    let (st, v) = d
        .call(Some(ADMIN), "DELETE", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(msg(&v).contains("web"), "{v}");

    // So does a sandbox made from it (after the group moves on).
    let sb = d.create(ADMIN, "web", json!({})).await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["image"], digest.as_str());
    let (st, r) = d
        .exec(ADMIN, "web", &id, json!({"argv": ["cat", "/marker"]}))
        .await;
    assert_eq!((st, &r["stdout"]), (200, &json!(marker)), "{r}");
    d.put_group("web", json!({"tier": "s"}), 200).await;
    let (st, v) = d
        .call(Some(ADMIN), "DELETE", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(msg(&v).contains(&id), "{v}");

    // Only an admin deletes; once unused, the image and its templates go.
    let owner = d.key("owner", &["web"]).await;
    let (st, v) = d
        .call(Some(&owner), "DELETE", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 403, "{v}");
    // A snapshot's disk is a layer over the image: it keeps the image after its sandbox goes.
    let (st, v) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/web/sandboxes/{id}/snapshots"),
            Some(json!({"name": "keep"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    d.delete("web", &id).await;
    let (st, v) = d
        .call(Some(ADMIN), "DELETE", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(msg(&v).contains("web/keep"), "{v}");
    let (st, _) = d
        .call(
            Some(ADMIN),
            "DELETE",
            &format!("{G}/web/snapshots/keep"),
            None,
        )
        .await;
    assert_eq!(st, 204);
    // A sandbox the store does not know (a `moat run` on this home) keeps it too: its disk
    // lies over the image's.
    let mut run = common::moat()
        .env("MOAT_HOME", d.home.path())
        .args(["run", &name, "--", "sh", "-c", "echo up; exec sleep 120"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(run.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "up\n");
    let (st, v) = d
        .call(Some(ADMIN), "DELETE", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(msg(&v).contains("still under the disk of a sandbox"), "{v}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    run.wait().unwrap();
    let (st, v) = d
        .call(Some(ADMIN), "DELETE", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 204, "{v}");
    let (st, _) = d
        .call(Some(ADMIN), "GET", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 404);
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert!(
        !d.home.path().join("images/sha256").join(hex).exists(),
        "the image's disk is left"
    );

    // Operations are records: they survive a restart, and one a restart interrupted is failed.
    let op_id = op["id"].as_str().unwrap().to_string();
    d.terminate();
    d.db_execute(
        "INSERT INTO operations (id, kind, state, target, request, phase, created_at,
             updated_at) VALUES ('op-00000000000000aa', 'image-import', 'running', 'x', '{}',
             'resolving', 1, 1)",
        &[],
    )
    .unwrap();
    d.spawn(None).await;
    let (st, again) = d
        .call(Some(ADMIN), "GET", &format!("/v1/operations/{op_id}"), None)
        .await;
    assert_eq!((st, &again["state"]), (200, &json!("succeeded")), "{again}");
    let (_, cut) = d
        .call(
            Some(ADMIN),
            "GET",
            "/v1/operations/op-00000000000000aa",
            None,
        )
        .await;
    assert_eq!(cut["state"], "failed", "{cut}");
    assert_eq!(cut["error"]["code"], "interrupted", "{cut}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_requests_are_validated_and_failures_reported() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let reg = Registry::start(None);
    // Allowed by the document's schema, refused by the source's grammar or the name rules it
    // cannot state: 422.
    for (body, needle) in [
        (
            json!({"source": "oci:relative/dir", "name": "a"}),
            "absolute",
        ),
        (
            json!({"source": "docker-archive:/x.tar"}),
            "give a \"name\"",
        ),
        (
            json!({"source": "Not A Ref", "name": "a"}),
            "invalid source",
        ),
        (
            json!({"source": "localhost:5000/a:b", "name": "a..b"}),
            "image names",
        ),
    ] {
        let (st, v) = d
            .call(Some(ADMIN), "POST", "/v1/images", Some(body.clone()))
            .await;
        assert_eq!(st, 422, "{body}: {v}");
        assert!(msg(&v).contains(needle), "{body}: {v}");
    }
    for (body, needle) in [
        (json!({"source": ""}), "source"),
        (
            json!({"source": "localhost:5000/a:b", "name": "-x"}),
            "name",
        ),
        (
            json!({"source": "localhost:5000/a:b", "name": "a", "extra": 1}),
            "unknown field",
        ),
        (json!({"name": "a"}), "source"),
    ] {
        let (st, v) = d
            .call(Some(ADMIN), "POST", "/v1/images", Some(body.clone()))
            .await;
        assert_eq!(st, 400, "{body}: {v}");
        assert!(msg(&v).contains(needle), "{body}: {v}");
    }
    let owner = d.key("owner", &["web"]).await;
    let (st, v) = d
        .call(
            Some(&owner),
            "POST",
            "/v1/images",
            Some(json!({"source": "localhost:5000/a:b"})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    let (st, _) = d
        .call(Some(&owner), "GET", "/v1/operations/op-1", None)
        .await;
    assert_eq!(st, 403);
    let (st, _) = d
        .call(Some(ADMIN), "GET", "/v1/operations/op-1", None)
        .await;
    assert_eq!(st, 404);
    let (st, _) = d
        .call(Some(ADMIN), "GET", "/v1/images/no-such-image", None)
        .await;
    assert_eq!(st, 404);
    // A name no image can have is not found, with the rules (whatever the daemon's state).
    let (st, v) = d.call(Some(ADMIN), "DELETE", "/v1/images/-bad", None).await;
    assert_eq!(st, 404, "{v}");
    assert!(msg(&v).contains("image names are"), "{v}");

    // Sources that fail: the operation fails and says why.
    for (source, needle) in [
        (format!("{}/e2e/missing:v1", reg.addr()), "missing"),
        ("oci:/no/such/layout".to_string(), "/no/such/layout"),
    ] {
        let op = import(
            &d,
            json!({"source": source, "name": unique("fail"), "plain_http": true}),
        )
        .await;
        let op = wait_op(&d, op["id"].as_str().unwrap()).await;
        assert_eq!(op["state"], "failed", "{op}");
        assert_eq!(op["error"]["code"], "import_failed", "{op}");
        let m = op["error"]["message"].as_str().unwrap();
        assert!(m.contains(needle), "{source}: {m}");
        assert!(op["result"].is_null());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moat_image_goes_through_the_daemon_when_told_to() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let reg = Registry::start(None);
    let marker = unique("climarker").to_lowercase();
    let (reference, digest) = common::push_image(&reg, "e2e", &marker).await;
    let name = unique("cli");
    let o = d.cli(
        ADMIN,
        &[
            "image",
            "import",
            &reference,
            "--name",
            &name,
            "--plain-http",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), digest);
    // The daemon did it: its operation record exists.
    let n = d.db_i64(
        "SELECT COUNT(*) FROM operations WHERE target = ?1 AND state = 'succeeded'",
        &[name.as_str()],
    );
    assert_eq!(n, 1);

    let o = d.cli(ADMIN, &["image", "ls", "--json"]);
    assert!(o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == name.as_str()),
        "{v}"
    );
    let o = d.cli(ADMIN, &["image", "ls"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&name));

    // A failing import exits 125 with the reason.
    let o = d.cli(
        ADMIN,
        &[
            "image",
            "import",
            &format!("{}/e2e/missing:v1", reg.addr()),
            "--name",
            &unique("cli"),
            "--plain-http",
        ],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing"));

    let o = d.cli(ADMIN, &["image", "rm", &name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), digest);
    let (st, _) = d
        .call(Some(ADMIN), "GET", &format!("/v1/images/{name}"), None)
        .await;
    assert_eq!(st, 404);
}
