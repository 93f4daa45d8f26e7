//! A throwaway PostgreSQL for tests: `scripts/postgres.sh` (a cluster in a temporary
//! directory, owned by nobody, on a unix socket only), stopped when dropped.

use std::path::PathBuf;
use std::process::Command;

pub struct Postgres {
    dir: tempfile::TempDir,
    /// The store URL `postgres.sh start` printed.
    pub url: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/postgres.sh")
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script())
            .args(["start", &dir.path().display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postgres.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Postgres { dir, url }
    }

    /// `postgres.sh restart|stop` of this cluster.
    pub fn ctl(&self, what: &str) {
        let out = Command::new(script())
            .args([what, &self.dir.path().display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postgres.sh {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", &self.dir.path().display().to_string()])
            .output();
    }
}
