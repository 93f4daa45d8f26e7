//! The TypeScript SDK (`sdk/typescript`) against a real daemon booting real VMs: its types
//! are checked against the daemon's live `/openapi.json` (the committed `src/openapi.ts` must
//! be what openapi-typescript makes of it, and `tsc --strict` must accept the SDK over it),
//! its Node test-runner suite runs against a fresh `moat serve`, and `npm pack` gives a
//! package that installs and imports in a project of its own.
//!
//! `npm ci` runs once per change of `package-lock.json` (it needs the npm registry then).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::daemon::{Daemon, ADMIN};
use common::python::{root, run, text};

const NEED_NODE: &str = "the TypeScript SDK tests need node (18 or newer) and npm; run \
    scripts/install-deps.sh (Debian: apt-get install nodejs npm)";

fn sdk() -> PathBuf {
    root().join("sdk/typescript")
}

fn npm(dir: &Path, args: &[&str], what: &str) -> String {
    let mut c = Command::new("npm");
    c.args(args)
        .args(["--no-audit", "--no-fund", "--no-update-notifier"])
        .current_dir(dir);
    let o = run(c, what, Duration::from_secs(600));
    let out = text(&o);
    assert!(o.status.success(), "{what} failed ({NEED_NODE}):\n{out}");
    out
}

/// `npm ci` (when the lock file changed) and `tsc`: the SDK built into `dist/`.
fn built() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let lock = std::fs::read_to_string(sdk().join("package-lock.json")).unwrap();
    let stamp = sdk().join("node_modules/.moat-installed-from");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(&*lock) {
        npm(&sdk(), &["ci"], "npm ci");
        std::fs::write(&stamp, &lock).unwrap();
    }
    npm(&sdk(), &["run", "build"], "tsc (npm run build)");
}

fn node(args: &[&str], d: &Daemon, what: &str) -> String {
    let mut c = Command::new("node");
    c.args(args)
        .current_dir(sdk())
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .env("MOAT_TEST_GROUP", "sdk-ts-test")
        .env("MOAT_TEST_REQUIRE_DAEMON", "1");
    let o = run(c, what, Duration::from_secs(900));
    let out = text(&o);
    assert!(
        o.status.success(),
        "{what} failed:\n{out}\ndaemon log:\n{}",
        d.stderr(d.starts)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_suite_and_openapi_types_against_a_real_daemon() {
    tokio::task::spawn_blocking(built).await.unwrap();
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let d = std::sync::Arc::new(d);
    let dd = d.clone();
    let check = tokio::task::spawn_blocking(move || {
        node(
            &["scripts/openapi.mjs", "--check"],
            &dd,
            "the OpenAPI types check",
        )
    })
    .await
    .unwrap();
    assert!(check.contains("matches"), "{check}");
    let dd = d.clone();
    let out = tokio::task::spawn_blocking(move || {
        node(
            &[
                "--test",
                "--test-reporter=spec",
                "test/unit.test.mjs",
                "test/daemon.test.mjs",
            ],
            &dd,
            "node --test",
        )
    })
    .await
    .unwrap();
    eprintln!("{out}");
    // Every daemon test ran (none skipped for want of a daemon).
    assert!(
        out.contains("ℹ skipped 0") && out.contains("ℹ fail 0"),
        "{out}"
    );
}

#[test]
fn npm_pack_installs_and_imports_in_another_project() {
    built();
    let out = tempfile::tempdir().unwrap();
    let packed = npm(
        &sdk(),
        &["pack", "--pack-destination", out.path().to_str().unwrap()],
        "npm pack",
    );
    let tgz = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .unwrap_or_else(|| panic!("npm pack made no tarball:\n{packed}"));
    let project = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("package.json"),
        r#"{"name": "uses-moat", "version": "1.0.0", "type": "module", "private": true}"#,
    )
    .unwrap();
    // Its one dependency (ws) comes from npm's cache, filled by `npm ci`.
    npm(
        project.path(),
        &["install", "--prefer-offline", tgz.to_str().unwrap()],
        "npm install of the packed SDK",
    );
    let mut c = Command::new("node");
    c.args([
        "--input-type=module",
        "-e",
        "import * as m from 'moat-sdk'; const c = new m.Client('http://127.0.0.1:9', 'k'); \
         const e = await c.health().catch((e) => e); \
         console.log(typeof m.Sandbox, e instanceof m.ConnectionFailed, e instanceof m.MoatError);",
    ])
    .current_dir(project.path());
    let o = run(c, "node importing the packed SDK", Duration::from_secs(60));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "function true true"
    );
    // The package carries the compiled code and its declarations, not the sources or tests.
    let files = std::fs::read_dir(project.path().join("node_modules/moat-sdk/dist"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    assert!(files.contains(&"index.d.ts".to_string()), "{files:?}");
    assert!(!project.path().join("node_modules/moat-sdk/test").exists());
}
