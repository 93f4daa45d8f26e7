//! Node for the tests that drive moat from JavaScript (the web console in a browser, the
//! TypeScript examples): a package's dependencies installed with `npm ci` into a directory
//! under the target directory, once per change of its lock file, so that the source tree
//! holds no node_modules and npm reaches the registry only when the lock changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use super::python::{run, target_dir, text};

const NEED_NODE: &str = "these tests need node (18 or newer) and npm; run \
    scripts/install-deps.sh (Debian: apt-get install nodejs npm)";

/// `npm ARGS…` in `dir`; its output, or a failed test saying what failed.
pub fn npm(dir: &Path, args: &[&str], what: &str) -> String {
    let mut c = Command::new("npm");
    c.args(args)
        .args(["--no-audit", "--no-fund", "--no-update-notifier"])
        .current_dir(dir);
    let o = run(c, what, Duration::from_secs(600));
    let out = text(&o);
    assert!(o.status.success(), "{what} failed ({NEED_NODE}):\n{out}");
    out
}

/// `target/NAME`: a copy of the files of `src` (not its subdirectories) with `npm ci` done for
/// its package-lock.json. Scripts run from the copy: ES modules resolve their imports from
/// their own directory's node_modules, and NODE_PATH does not apply to them.
pub fn installed(src: &Path, name: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = target_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = std::fs::read_to_string(src.join("package.json")).unwrap();
    let lock = std::fs::read_to_string(src.join("package-lock.json")).unwrap();
    let want = format!("{manifest}\n{lock}");
    let stamp = dir.join("moat-installed-from");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(&*want) {
        std::fs::write(dir.join("package.json"), &manifest).unwrap();
        std::fs::write(dir.join("package-lock.json"), &lock).unwrap();
        npm(&dir, &["ci"], &format!("npm ci in {}", dir.display()));
        std::fs::write(&stamp, &want).unwrap();
    }
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}
