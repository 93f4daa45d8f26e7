//! The web console (`/ui`) end to end: `console/e2e.mjs` drives it in the system's headless
//! Chromium with playwright-core against a real daemon booting real VMs (sign in, a sandbox,
//! the terminal, files, suspend and resume, charts). Its screenshots are kept under
//! `target/console-shots/`, for a person to look at.
//!
//! `npm ci` of playwright-core runs once per change of `console/package-lock.json`; it never
//! downloads a browser (it drives Debian's `chromium`).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, ADMIN};
use common::node::installed;
use common::python::{root, run, target_dir, text};

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect(
            "the console test needs Chromium; run scripts/install-deps.sh \
             (Debian: apt-get install chromium)",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_headless_chromium_against_a_real_daemon() {
    let dir = tokio::task::spawn_blocking(|| {
        installed(&root().join("crates/cli/tests/console"), "console-npm")
    })
    .await
    .unwrap();
    let shots = target_dir().join("console-shots");
    std::fs::create_dir_all(&shots).unwrap();
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let mut c = Command::new("node");
    c.arg(dir.join("e2e.mjs"))
        .current_dir(&dir)
        .env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .env("MOAT_TEST_GROUP", "console-test")
        .env("CHROMIUM", chromium())
        .env("MOAT_SHOTS", &shots);
    let o = tokio::task::spawn_blocking(move || {
        run(c, "the console's browser test", Duration::from_secs(600))
    })
    .await
    .unwrap();
    let out = text(&o);
    eprintln!("{out}\nscreenshots: {}", shots.display());
    assert!(
        o.status.success(),
        "the console's browser test failed:\n{out}\ndaemon log:\n{}",
        d.stderr(d.starts)
    );
    assert!(out.contains("console e2e: ok"), "{out}");
    for shot in ["sandbox-terminal.png", "metrics.png"] {
        let len = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(len > 10_000, "{shot} is missing or empty ({len} bytes)");
    }
}
