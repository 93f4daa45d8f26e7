//! The embedded store: one SQLite database (`MOAT_HOME/moatd.db`, WAL) with numbered schema
//! migrations (`store/migrations/`). Every call runs on a blocking thread (`Store::call`),
//! never on the executor.
//!
//! All of the daemon's SQL lives under this module, one file per table: `keys`, `groups`,
//! `sandboxes`, `pool`, `snapshots`, `operations`, `egress`, `policy`, `identity`, `audit`. The rest of the daemon calls `Store`
//! methods that take and return API types, never a connection or a row, so that a second
//! backend (PostgreSQL) can implement the same methods. This file holds the connection,
//! the migrations, the time helpers and the queries that span tables.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, TransactionBehavior};

use crate::error::{Error, Result};

mod audit;
mod egress;
mod groups;
mod identity;
mod keys;
mod operations;
mod policy;
mod pool;
mod ports;
mod sandboxes;
mod seal;
mod secrets;
mod snapshots;

pub use audit::NewAuditEvent;
pub use identity::{KeyRow, NewIdentityEvent, WorkloadIds};
pub use keys::{Authenticated, Principal};
pub use pool::PoolMember;
pub use sandboxes::Timers;

/// Numbered migrations, applied in order, each once. Only ever append to this list. Each
/// version not yet applied runs, even one below the newest applied (branches that numbered
/// theirs ahead of one another merge in any order).
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_sandboxes.sql")),
    (3, include_str!("migrations/0003_snapshots.sql")),
    (4, include_str!("migrations/0004_pools_lifecycle.sql")),
    (5, include_str!("migrations/0005_operations.sql")),
    (6, include_str!("migrations/0006_egress.sql")),
    (7, include_str!("migrations/0007_policy.sql")),
    (8, include_str!("migrations/0008_ports.sql")),
    (9, include_str!("migrations/0009_policy_prune.sql")),
    (10, include_str!("migrations/0010_identity.sql")),
    (11, include_str!("migrations/0011_secrets.sql")),
    (12, include_str!("migrations/0012_api_key_limits.sql")),
    (13, include_str!("migrations/0013_audit.sql")),
];

pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

#[derive(Clone)]
pub struct Store {
    // One connection: SQLite serialises writers anyway, and the API's load is small.
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// Seals group secrets with `secrets.key` beside the database.
    seal: Arc<seal::Sealer>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database. Blocking: call before serving or
    /// from a blocking thread.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = Connection::open(path)?;
        // WAL: readers never block the writer; synchronous=FULL: a 2xx means the change is on
        // disk, not only in the OS cache (it survives a power cut, not just a kill -9).
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Config(format!(
                "{} cannot use WAL mode (got {mode})",
                path.display()
            )));
        }
        conn.execute_batch(
            "PRAGMA foreign_keys=ON; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
        )?;
        migrate(&mut conn, path)?;
        let key = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("secrets.key");
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            seal: Arc::new(seal::Sealer::new(key)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on this thread: only from a blocking context.
    fn blocking<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection itself is still sound
            // (SQLite rolls back an unfinished transaction when the next one begins).
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(Error::task("store task failed"))?
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at INTEGER NOT NULL
         ) STRICT;",
    )?;
    // Every migration not applied yet, not only those above the highest applied: numbers are
    // reserved by branches that may land in any order. A version this moat does not know is a
    // newer schema.
    let applied: std::collections::HashSet<i64> = {
        let mut stmt = tx.prepare("SELECT version FROM schema_migrations")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if let Some(&unknown) = applied
        .iter()
        .find(|v| !MIGRATIONS.iter().any(|m| m.0 == **v))
    {
        return Err(Error::NewerSchema {
            path: path.display().to_string(),
            found: unknown,
            known: latest_version(),
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| !applied.contains(&m.0)) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now()],
        )?;
        tracing::info!(version, "applied schema migration");
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
fn schema_version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What `/metrics` reports from the store.
#[derive(Debug, Clone)]
pub struct Counts {
    pub groups: i64,
    pub api_keys: i64,
    /// `(state, count)` for each state that has sandboxes.
    pub sandboxes_by_state: Vec<(String, i64)>,
}

/// What still refers to an image (see [`Store::image_users`]).
#[derive(Debug, Clone, Default)]
pub struct ImageUsers {
    /// Ids of the sandboxes that run it.
    pub sandboxes: Vec<String>,
    /// Groups whose default image it is.
    pub groups: Vec<String>,
    /// `group/name` of the snapshots whose disk is a layer over it.
    pub snapshots: Vec<String>,
}

impl Store {
    pub async fn counts(&self) -> Result<Counts> {
        self.call(|c| {
            let groups = c.query_row("SELECT COUNT(*) FROM sandbox_groups", [], |r| r.get(0))?;
            let api_keys = c.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
            let mut stmt =
                c.prepare_cached("SELECT state, COUNT(*) FROM sandboxes GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let sandboxes_by_state = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Counts {
                groups,
                api_keys,
                sandboxes_by_state,
            })
        })
        .await
    }

    /// The sandboxes, groups and snapshots that use the image named `name` with manifest
    /// `digest`, read in one go.
    pub async fn image_users(&self, name: &str, digest: &str) -> Result<ImageUsers> {
        let (n, digest) = (name.to_string(), digest.to_string());
        self.call(move |c| {
            let sandboxes = sandboxes::list_sandboxes(c, None)?
                .into_iter()
                .filter(|s| s.image == digest)
                .map(|s| s.id)
                .collect();
            let groups = groups::list_groups(c)?
                .into_iter()
                .filter(|g| g.spec.image == n || g.spec.image == digest)
                .map(|g| g.name)
                .collect();
            let snapshots = snapshots::list_ready(c, None)?
                .into_iter()
                .filter(|s| s.image == digest)
                .map(|s| format!("{}/{}", s.group, s.name))
                .collect();
            Ok(ImageUsers {
                sandboxes,
                groups,
                snapshots,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("moatd.db")).unwrap()
    }

    #[test]
    fn migrating_twice_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let mut c = s.conn.lock().unwrap();
        groups::put_group(&mut c, "g", &crate::api::GroupSpec::default()).unwrap();
        migrate(&mut c, s.path()).unwrap();
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, MIGRATIONS.len() as i64);
        assert_eq!(schema_version(&c).unwrap(), latest_version());
        drop(c);
        drop(s);
        let s = open(&dir);
        let c = s.conn.lock().unwrap();
        assert!(groups::get_group(&c, "g").unwrap().is_some());
    }

    /// A migration numbered below one already applied (its branch landed later) is applied.
    #[test]
    fn a_migration_that_landed_later_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.conn
            .lock()
            .unwrap()
            .execute_batch(
                "DELETE FROM schema_migrations WHERE version = 8; DROP TABLE sandbox_ports;",
            )
            .unwrap();
        drop(s);
        let s = open(&dir);
        let c = s.conn.lock().unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM sandbox_ports", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "the table is back");
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.conn
            .lock()
            .unwrap()
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)",
                [],
            )
            .unwrap();
        drop(s);
        let e = Store::open(&dir.path().join("moatd.db")).err().unwrap();
        let m = e.to_string();
        assert!(matches!(e, Error::NewerSchema { found: 999, .. }), "{m}");
        assert!(m.contains("newer moat"), "{m}");
    }
}
