//! Python for the tests that drive moat from Python (the SDK's pytest suite, the MCP tests
//! with the official MCP SDK): virtualenvs under the target directory, created once and
//! reused (pip reaches PyPI only when what they install changed), and commands run with a
//! deadline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// `target/` (or CARGO_TARGET_DIR): test binaries are `target/debug/deps/NAME-…`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// Runs `cmd` to its end, at most `limit`, so that a stuck pip or pytest fails the test
/// instead of hanging it. Output goes to files: a pipe that nobody reads could block it.
pub fn run(mut cmd: Command, what: &str, limit: Duration) -> Output {
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

pub fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const NEED_PYTHON: &str = "python3 -m venv: these tests need python3 (3.10 or newer) with its \
    venv module; run scripts/install-deps.sh (Debian: apt-get install python3-venv), or point \
    MOAT_PYTHON at another python";

/// The python of the virtualenv `target/NAME` with `pip install ARGS…` done in it. `inputs`
/// are the files that decide what gets installed (a pyproject.toml, a requirements file): the
/// venv is made again only when one of them (or this checkout's path) changed.
pub fn venv(name: &str, pip_args: &[String], inputs: &[PathBuf]) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let venv = target_dir().join(name);
    let python = venv.join("bin/python");
    let stamp = venv.join("moat-installed-from");
    let mut want = format!("{}\n{pip_args:?}\n", root().display());
    for f in inputs {
        want.push_str(&std::fs::read_to_string(f).unwrap());
    }
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
    ])
    .args(pip_args);
    let o = run(c, "pip install", Duration::from_secs(600));
    assert!(
        o.status.success(),
        "pip could not install {pip_args:?} (it needs PyPI):\n{}",
        text(&o)
    );
    std::fs::write(&stamp, want).unwrap();
    python
}
