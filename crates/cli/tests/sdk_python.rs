//! The Python SDK (`sdk/python`) against a real daemon booting real VMs: its pytest suite runs
//! with MOAT_URL and MOAT_API_KEY pointing at a fresh `moat serve`, and `mypy --strict` checks
//! its types. The SDK and its test tools live in a virtualenv under the target directory,
//! created once and reused (pip reaches PyPI only when `pyproject.toml` changed).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, ADMIN};
use common::python::{self, root, run, target_dir, text};

/// The venv's python, with the SDK installed (editable, so source changes need no
/// reinstall) and its test extras. Created once per target directory.
fn venv_python() -> PathBuf {
    let sdk = root().join("sdk/python");
    python::venv(
        "sdk-venv",
        &["-e".to_string(), format!("{}[test]", sdk.display())],
        &[sdk.join("pyproject.toml")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pytest_suite_against_a_real_daemon() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let mut c = Command::new(python);
    c.args([
        "-m",
        "pytest",
        "sdk/python/tests",
        "-q",
        // Say which tests were skipped or expected to fail, and why.
        "-rsxX",
        "-p",
        "no:cacheprovider",
    ])
    .current_dir(root())
    .env("MOAT_URL", d.url())
    .env("MOAT_API_KEY", ADMIN)
    .env("MOAT_TEST_SOCKET", d.home.path().join("moatd.sock"))
    .env("MOAT_TEST_GROUP", "sdk-test")
    .env("MOAT_TEST_REQUIRE_DAEMON", "1")
    .env("PYTHONDONTWRITEBYTECODE", "1")
    .env_remove("MOAT_HOME");
    let o = tokio::task::spawn_blocking(move || run(c, "pytest", Duration::from_secs(600)))
        .await
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "pytest failed:\n{out}");
    eprintln!("{out}");
    // Every daemon test ran: only the marked snapshot test may be an expected failure.
    assert!(!out.contains("skipped"), "pytest skipped tests:\n{out}");
}

#[test]
fn sdk_types_check_with_mypy_strict() {
    let python = venv_python();
    let mut c = Command::new(python);
    c.args(["-m", "mypy", "--cache-dir"])
        .arg(target_dir().join("sdk-venv/mypy-cache"))
        .current_dir(root().join("sdk/python"));
    let o = run(c, "mypy", Duration::from_secs(600));
    assert!(o.status.success(), "mypy --strict failed:\n{}", text(&o));
}
