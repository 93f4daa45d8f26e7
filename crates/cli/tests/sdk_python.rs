//! The Python SDK (`sdk/python`) against a real daemon booting real VMs: its pytest suite runs
//! with MOAT_URL and MOAT_API_KEY pointing at a fresh `moat serve`, and `mypy --strict` checks
//! its types. The SDK and its test tools live in a virtualenv under the target directory,
//! created once and reused (pip reaches PyPI only when `pyproject.toml` changed).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, ADMIN};

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// `target/` (or CARGO_TARGET_DIR): this binary is `target/debug/deps/sdk_python-…`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// Runs `cmd` to its end, at most `limit`, so that a stuck pip or pytest fails the test
/// instead of hanging it. Output goes to files: a pipe that nobody reads could block it.
fn run(mut cmd: Command, what: &str, limit: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {limit:?}; its output:\n{}\n{}",
                std::fs::read_to_string(&out).unwrap_or_default(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const NEED_PYTHON: &str = "python3 -m venv: the SDK tests need python3 (3.9 or newer) with its \
    venv module; run scripts/install-deps.sh (Debian: apt-get install python3-venv), or point \
    MOAT_PYTHON at another python";

/// The venv's python, with the SDK installed (editable, so source changes need no
/// reinstall) and its test extras. Created once per target directory.
fn venv_python() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let venv = target_dir().join("sdk-venv");
    let python = venv.join("bin/python");
    let pyproject = root().join("sdk/python/pyproject.toml");
    let stamp = venv.join("moat-installed-from");
    // What was installed: this checkout's SDK with this pyproject.
    let want = format!(
        "{}\n{}",
        root().display(),
        std::fs::read_to_string(&pyproject).unwrap()
    );
    if python.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&*want) {
        return python;
    }
    let python3 = std::env::var_os("MOAT_PYTHON").unwrap_or_else(|| "python3".into());
    let mut c = Command::new(&python3);
    c.args(["-m", "venv", "--clear"]).arg(&venv);
    let o = run(c, NEED_PYTHON, Duration::from_secs(120));
    assert!(o.status.success(), "{NEED_PYTHON}; it said:\n{}", text(&o));
    let mut c = Command::new(&python);
    c.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--timeout",
        "30",
        "-e",
    ])
    .arg(format!("{}[test]", root().join("sdk/python").display()));
    let o = run(c, "pip install", Duration::from_secs(600));
    assert!(
        o.status.success(),
        "pip could not install the SDK and its test tools (it needs PyPI):\n{}",
        text(&o)
    );
    std::fs::write(&stamp, want).unwrap();
    python
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
