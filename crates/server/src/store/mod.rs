//! The store: the embedded SQLite database (`MOAT_HOME/moatd.db`, WAL; the default) or a
//! PostgreSQL database (`moat serve --store postgres://…`, which many daemons may share), each
//! with its numbered schema migrations (`store/migrations/`, `store/migrations/postgres/`).
//! Every call runs on a blocking thread (`Store::call`), never on the executor.
//!
//! All of the daemon's SQL lives under this module, one file per table: `keys`, `groups`,
//! `sandboxes`, `pool`, `snapshots`, `operations`, `egress`, `policy`, `identity`,
//! `secrets`, `ports`, `audit`. Each query is written once, in the SQL both engines share, against
//! `db::Db` (see `db.rs`). The rest of the daemon calls `Store` methods that take and return
//! API types, never a connection or a row. This file holds the connection, the migrations,
//! the time helpers and the queries that span tables.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

mod audit;
pub(crate) mod db;
mod egress;
mod groups;
mod handovers;
mod identity;
mod keys;
mod nodes;
mod operations;
mod placement;
mod policy;
mod pool;
mod ports;
mod sandboxes;
mod seal;
mod sealing;
mod secrets;
mod shared;
mod snapshots;

pub use audit::NewAuditEvent;
pub use db::Backend;
use db::{params, Db, OptionalExtension};
pub use identity::{KeyRow, NewIdentityEvent, WorkloadIds};
pub use keys::{Authenticated, Principal};
pub use nodes::{Lease, NodeSpec, Renewal};
pub use placement::{Candidate, ImportedImage, Placing, PoolNodes};
pub use pool::PoolMember;
pub use sandboxes::Timers;
pub use sealing::{create_next_sealing_key, sealing_key_id};
pub use shared::Files;

/// Numbered migrations of the SQLite schema, applied in order, each once. Only ever append to
/// this list. Each version not yet applied runs, even one below the newest applied (branches
/// that numbered theirs ahead of one another merge in any order). Every version has its
/// PostgreSQL twin in [`POSTGRES_MIGRATIONS`], under the same number.
const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
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
    (14, include_str!("migrations/0014_nodes.sql")),
    (15, include_str!("migrations/0015_shared_storage.sql")),
    (17, include_str!("migrations/0017_handovers.sql")),
    (18, include_str!("migrations/0018_sealing_key.sql")),
];

/// The same schema in PostgreSQL's dialect (`migrations/postgres/`): `BIGINT` for every
/// integer, `BYTEA` for blobs, identity columns for AUTOINCREMENT, PL/pgSQL triggers.
const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/postgres/0001_init.sql")),
    (2, include_str!("migrations/postgres/0002_sandboxes.sql")),
    (3, include_str!("migrations/postgres/0003_snapshots.sql")),
    (
        4,
        include_str!("migrations/postgres/0004_pools_lifecycle.sql"),
    ),
    (5, include_str!("migrations/postgres/0005_operations.sql")),
    (6, include_str!("migrations/postgres/0006_egress.sql")),
    (7, include_str!("migrations/postgres/0007_policy.sql")),
    (8, include_str!("migrations/postgres/0008_ports.sql")),
    (9, include_str!("migrations/postgres/0009_policy_prune.sql")),
    (10, include_str!("migrations/postgres/0010_identity.sql")),
    (11, include_str!("migrations/postgres/0011_secrets.sql")),
    (
        12,
        include_str!("migrations/postgres/0012_api_key_limits.sql"),
    ),
    (13, include_str!("migrations/postgres/0013_audit.sql")),
    (14, include_str!("migrations/postgres/0014_nodes.sql")),
    (
        15,
        include_str!("migrations/postgres/0015_shared_storage.sql"),
    ),
    (17, include_str!("migrations/postgres/0017_handovers.sql")),
    (18, include_str!("migrations/postgres/0018_sealing_key.sql")),
];

fn migrations(backend: Backend) -> &'static [(i64, &'static str)] {
    match backend {
        Backend::Sqlite => SQLITE_MIGRATIONS,
        Backend::Postgres => POSTGRES_MIGRATIONS,
    }
}

pub fn latest_version() -> i64 {
    SQLITE_MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Where the daemon keeps its state: `moat serve --store` (see [`Location::parse`]).
#[derive(Clone)]
pub enum Location {
    /// The embedded database, `MOAT_HOME/moatd.db` (the default).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`--store postgres://…`), which many daemons may share.
    Postgres(Box<postgres::Config>),
}

impl Location {
    /// `--store`: absent for the embedded SQLite database at `default_db`, else a
    /// `postgres://` or `postgresql://` URL. A URL with several hosts (the members of a
    /// replicated cluster, e.g. Patroni's) must say `target_session_attrs=read-write`: each
    /// (re)connection then tries the hosts in turn and keeps the one that accepts writes, the
    /// primary, so the daemon follows a failover by itself.
    pub fn parse(store: Option<&str>, default_db: &Path) -> Result<Location> {
        let Some(url) = store else {
            return Ok(Location::Sqlite(default_db.to_path_buf()));
        };
        let allowed =
            "--store takes a PostgreSQL URL, postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE \
             (or postgresql://…; ?host=/run/dir for a unix socket; the members of a replicated \
             cluster as HOST1:PORT1,HOST2:PORT2,…/DATABASE?target_session_attrs=read-write); \
             leave it out for the embedded SQLite database in MOAT_HOME";
        let refuse = |why: &str| {
            Error::Config(format!(
                "--store {}: {why}. {allowed}",
                crate::api::quote(&redact(url))
            ))
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(refuse("not a PostgreSQL URL"));
        }
        let config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| refuse(&e.to_string()))?;
        if config.get_dbname().is_none() {
            return Err(refuse("the URL names no database"));
        }
        // TCP hosts only: `postgres://u@localhost/db?host=/run/dir`, the unix socket form, has
        // two hosts (the URL's and the query's) but names one server.
        let hosts = (config.get_hosts().iter())
            .filter(|h| matches!(h, postgres::config::Host::Tcp(_)))
            .count()
            .max(config.get_hostaddrs().len());
        match config.get_target_session_attrs() {
            postgres::config::TargetSessionAttrs::ReadWrite => {}
            _ if hosts > 1 => {
                return Err(refuse(&format!(
                    "it names {hosts} hosts without target_session_attrs=read-write, so the \
                     daemon could connect to a standby, which refuses writes: add \
                     target_session_attrs=read-write to connect to the primary, whichever it is"
                )))
            }
            postgres::config::TargetSessionAttrs::Any => {}
            _ => {
                return Err(refuse(
                    "target_session_attrs must be read-write (or left out): the daemon writes",
                ))
            }
        }
        Ok(Location::Postgres(Box::new(config)))
    }

    /// What to call it in messages (never a password): the user, every host with its port,
    /// the database.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(c) => {
                let ports = c.get_ports();
                let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                let mut hosts: Vec<String> = c
                    .get_hosts()
                    .iter()
                    .enumerate()
                    .map(|(i, h)| match h {
                        postgres::config::Host::Tcp(h) if h.contains(':') => {
                            format!("[{h}]:{}", port(i))
                        }
                        postgres::config::Host::Tcp(h) => format!("{h}:{}", port(i)),
                        postgres::config::Host::Unix(p) => format!("{}:{}", p.display(), port(i)),
                    })
                    .collect();
                if hosts.is_empty() {
                    hosts = (c.get_hostaddrs().iter().enumerate())
                        .map(|(i, a)| std::net::SocketAddr::new(*a, port(i)).to_string())
                        .collect();
                }
                if hosts.is_empty() {
                    hosts.push(format!("localhost:{}", port(0)));
                }
                format!(
                    "postgres://{}@{}/{}",
                    c.get_user().unwrap_or(""),
                    hosts.join(","),
                    c.get_dbname().unwrap_or("")
                )
            }
        }
    }
}

/// `url` without the password between `:` and `@` of its authority.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match auth.rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let user = user.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_string(),
    }
}

#[derive(Clone)]
pub struct Store {
    // One connection per daemon, used by one blocking thread at a time: SQLite serialises
    // writers anyway, and the API's load is small. With PostgreSQL, transactions are
    // SERIALIZABLE, so other daemons sharing the database cannot break them.
    conn: Arc<Mutex<Db>>,
    location: Arc<Location>,
    /// Seals group secrets and identity signing keys with `secrets.key` in MOAT_HOME.
    seal: Arc<seal::Sealer>,
    /// This daemon's node and lease epoch, once it holds its lease: the fence of its writes.
    fence: Arc<nodes::Fence>,
    /// Creates this daemon placed and has not seen answered (`placement::InFlight`).
    placing: Arc<placement::InFlight>,
}

/// How often a transaction PostgreSQL aborted for a conflict with another one is run again.
const SERIALIZATION_RETRIES: u32 = 5;

impl Store {
    /// The key of node-to-node credentials, derived from `secrets.key` (`migrate.rs`).
    pub(crate) fn node_key(&self) -> Result<ring::hmac::Key> {
        self.seal.node_key()
    }

    /// Opens (creating if needed) and migrates the store; `home` is MOAT_HOME (it holds
    /// `secrets.key`). Blocking: call before serving or from a blocking thread.
    pub fn open(location: &Location, home: &Path) -> Result<Store> {
        let db = match location {
            Location::Sqlite(path) => open_sqlite(path)?,
            Location::Postgres(config) => Db::postgres((**config).clone()).map_err(|e| {
                Error::Config(format!(
                    "cannot use the PostgreSQL store {}: {e}",
                    location.describe()
                ))
            })?,
        };
        migrate(&db, &location.describe())?;
        let seal = seal::Sealer::new(home.join("secrets.key"));
        check_sealing_key(&db, &seal, location)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(db)),
            location: Arc::new(location.clone()),
            seal: Arc::new(seal),
            fence: Arc::default(),
            placing: Arc::default(),
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Runs `f` with the connection on this thread: only from a blocking context.
    fn blocking<T>(&self, mut f: impl FnMut(&Db) -> Result<T>) -> Result<T> {
        let guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        with_retries(&guard, &mut f)
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn call<T, F>(&self, mut f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Db) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection itself is still sound
            // (an unfinished transaction was rolled back when its guard dropped).
            let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            with_retries(&guard, &mut f)
        })
        .await
        .map_err(Error::task("store task failed"))?
    }
}

/// Runs `f`, again when PostgreSQL aborted its transaction for a conflict with a concurrent
/// one (another daemon on the same database): SERIALIZABLE promises only that one of the
/// two commits. `f` holds its writes in one transaction, so a retry starts from scratch.
fn with_retries<T>(db: &Db, f: &mut impl FnMut(&Db) -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        match f(db) {
            Err(Error::Store(e))
                if e.is_serialization_failure() && tries < SERIALIZATION_RETRIES =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(
                    rand::random::<u64>() % (10 << tries),
                ));
            }
            r => return r,
        }
    }
}

/// Refuses a sealing key that is not the store's: the first node to open a store records a
/// value sealed with its key, and every later open must be able to open it. Two nodes that
/// start together on a new store with different keys: one records its value, the other is
/// refused. A node that was down while the fleet rotated its key finds the value opens with
/// its `secrets.key.next` and switches to it here.
fn check_sealing_key(db: &Db, seal: &seal::Sealer, location: &Location) -> Result<()> {
    let get = || -> Result<Option<Vec<u8>>> {
        Ok(db
            .query_row("SELECT sealed FROM seal_check WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?)
    };
    let check = match get()? {
        Some(check) => check,
        None => {
            db.execute(
                "INSERT INTO seal_check (id, sealed) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
                params![seal.check_value(&seal.current_and_next()?.0)?],
            )?;
            get()?.ok_or_else(|| Error::Internal("the sealing check value vanished".into()))?
        }
    };
    match seal.verify_check(&check)? {
        Some(seal::Which::Current) => return Ok(()),
        Some(seal::Which::Next) => return seal.promote(),
        None => {}
    }
    Err(Error::Config(format!(
        "{} is not the sealing key of the store {}: its secrets and signing keys were sealed \
         with another one. Every node on one store needs the same secrets.key: copy it from a \
         node that runs on this store (docs/FLEET.md)",
        seal.path().display(),
        location.describe()
    )))
}

fn open_sqlite(path: &Path) -> Result<Db> {
    let conn = rusqlite::Connection::open(path).map_err(db::DbError::from)?;
    // WAL: readers never block the writer; synchronous=FULL: a 2xx means the change is on
    // disk, not only in the OS cache (it survives a power cut, not just a kill -9).
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(db::DbError::from)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Config(format!(
            "{} cannot use WAL mode (got {mode})",
            path.display()
        )));
    }
    conn.execute_batch(
        "PRAGMA foreign_keys=ON; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
    )
    .map_err(db::DbError::from)?;
    Ok(Db::sqlite(conn))
}

/// Applies the migrations not applied yet. SQLite's run with foreign keys off (a table rebuild,
/// as migration 14's, must not cascade to the rows that refer to the old table; SQLite ignores
/// the pragma inside a transaction) and every key is checked before they commit.
fn migrate(db: &Db, name: &str) -> Result<()> {
    if db.backend() == Backend::Sqlite {
        db.execute_batch("PRAGMA foreign_keys=OFF;")?;
    }
    let migrated = apply_migrations(db, name);
    if db.backend() == Backend::Sqlite {
        db.execute_batch("PRAGMA foreign_keys=ON;")?;
    }
    migrated
}

fn apply_migrations(db: &Db, name: &str) -> Result<()> {
    let known = migrations(db.backend());
    let tx = db.transaction()?;
    match db.backend() {
        Backend::Sqlite => tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at INTEGER NOT NULL
             ) STRICT;",
        )?,
        // Daemons sharing a database may start together: one migrates, the others wait for
        // it here and then find nothing to do. (The lock ends with the transaction.)
        Backend::Postgres => tx.execute_batch(
            "SELECT pg_advisory_xact_lock(7370616);
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    BIGINT PRIMARY KEY,
                 applied_at BIGINT NOT NULL
             );",
        )?,
    }
    // Every migration not applied yet, not only those above the highest applied: numbers are
    // reserved by branches that may land in any order. A version this moat does not know is a
    // newer schema.
    let applied: std::collections::HashSet<i64> = tx
        .query_map("SELECT version FROM schema_migrations", [], |r| r.get(0))?
        .into_iter()
        .collect();
    if let Some(&unknown) = applied.iter().find(|v| !known.iter().any(|m| m.0 == **v)) {
        return Err(Error::NewerSchema {
            path: name.to_string(),
            found: unknown,
            known: latest_version(),
        });
    }
    for (version, sql) in known.iter().filter(|m| !applied.contains(&m.0)) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now()],
        )?;
        tracing::info!(version, "applied schema migration");
    }
    if db.backend() == Backend::Sqlite {
        let broken: i64 =
            tx.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })?;
        if broken > 0 {
            return Err(Error::Internal(format!(
                "the migrations of {name} left {broken} rows whose foreign keys do not hold"
            )));
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
fn schema_version(conn: &Db) -> Result<i64> {
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
            let sandboxes_by_state = c.query_map(
                "SELECT state, COUNT(*) FROM sandboxes GROUP BY state",
                [],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            )?;
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

/// The store of a unit test in `dir`: SQLite there, or, when `MOAT_TEST_STORE` holds a
/// PostgreSQL URL (scripts/test.sh sets it for the second pass), a fresh schema of that
/// database, so that tests never see one another's rows.
#[cfg(test)]
pub(crate) fn test_store(dir: &Path) -> Store {
    // The blocking PostgreSQL client must not run on an async test's executor thread.
    std::thread::scope(|s| {
        s.spawn(|| Store::open(&test_location(dir), dir).unwrap())
            .join()
            .unwrap()
    })
}

#[cfg(test)]
pub(crate) fn test_location(dir: &Path) -> Location {
    use sha2::Digest;
    match std::env::var("MOAT_TEST_STORE") {
        Ok(url) if !url.is_empty() => {
            let mut config: postgres::Config = url.parse().expect("MOAT_TEST_STORE is a URL");
            // One schema per test directory: a test that opens its store again finds its rows.
            let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
            let schema = format!("t_{}", &hex::encode(digest)[..16]);
            let mut admin = config
                .connect(postgres::NoTls)
                .expect("MOAT_TEST_STORE connects");
            admin
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .expect("a test schema");
            config.options(&format!("-c search_path={schema}"));
            Location::Postgres(Box::new(config))
        }
        _ => Location::Sqlite(dir.join("moatd.db")),
    }
}

#[cfg(test)]
impl Store {
    /// Runs `f` with the connection on a thread of its own (an async test's executor thread
    /// must not block on PostgreSQL).
    pub(crate) fn with_conn<T: Send>(&self, f: impl FnOnce(&Db) -> T + Send) -> T {
        std::thread::scope(|s| s.spawn(|| f(&self.conn.lock().unwrap())).join().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn open(dir: &tempfile::TempDir) -> Store {
        test_store(dir.path())
    }

    /// Node `name` of a test fleet: its own holder, 4 GiB and 8 vCPUs, no labels, a
    /// one-minute lease (tests change what they need: `NodeSpec { lease_ms: 1500, ..}`).
    pub(super) fn node_spec(name: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            holder: format!("home-{name}"),
            advertise_url: format!("http://{name}:7070"),
            accelerator: "tcg".into(),
            labels: Default::default(),
            memory_mib: 4096,
            millicpus: 8000,
            lease_ms: 60_000,
        }
    }

    /// A test's blocking store calls, off the async executor thread (the PostgreSQL client
    /// blocks).
    pub(super) fn off<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| s.spawn(f).join().unwrap())
    }

    #[test]
    fn migrating_twice_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let c = s.conn.lock().unwrap();
        groups::put_group(&c, "g", &crate::api::GroupSpec::default()).unwrap();
        migrate(&c, "test").unwrap();
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, migrations(c.backend()).len() as i64);
        assert_eq!(schema_version(&c).unwrap(), latest_version());
        drop(c);
        drop(s);
        let s = open(&dir);
        let c = s.conn.lock().unwrap();
        assert!(groups::get_group(&c, "g").unwrap().is_some());
    }

    /// Each backend has the same migrations, by number: a version added to one is added to
    /// the other (see docs/FLEET.md, "Adding a migration").
    #[test]
    fn both_backends_have_the_same_migrations() {
        let numbers = |m: &[(i64, &str)]| m.iter().map(|m| m.0).collect::<Vec<_>>();
        assert_eq!(numbers(SQLITE_MIGRATIONS), numbers(POSTGRES_MIGRATIONS));
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
        assert_eq!(rows, migrations(c.backend()).len() as i64);
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
        let e = Store::open(&test_location(dir.path()), dir.path())
            .err()
            .unwrap();
        let m = e.to_string();
        assert!(matches!(e, Error::NewerSchema { found: 999, .. }), "{m}");
        assert!(m.contains("newer moat"), "{m}");
    }

    /// A store of the version before node mode (13) upgrades: migration 14 rebuilds SQLite's
    /// `sandboxes` with foreign keys off, so the rows that refer to a sandbox (its identity uid,
    /// its ports) stay, and its row gets a node once a node claims it.
    #[tokio::test]
    async fn a_store_from_before_node_mode_keeps_its_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        // Off the executor thread: the blocking PostgreSQL client makes a schema.
        let old = std::thread::scope(|s| s.spawn(|| test_location(dir.path())).join().unwrap());
        std::thread::spawn(move || {
            let db = match &old {
                Location::Sqlite(path) => open_sqlite(path).unwrap(),
                Location::Postgres(config) => Db::postgres((**config).clone()).unwrap(),
            };
            let tx = db.transaction().unwrap();
            tx.execute_batch(
                "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, \
                 applied_at BIGINT NOT NULL)",
            )
            .unwrap();
            for (version, sql) in migrations(db.backend()).iter().filter(|m| m.0 < 14) {
                tx.execute_batch(sql).unwrap();
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                    params![version],
                )
                .unwrap();
            }
            groups::put_group(&tx, "g", &crate::api::GroupSpec::default()).unwrap();
            tx.execute_batch(
                "INSERT INTO sandboxes (id, group_name, state, image, tier, created_at, \
                 updated_at) VALUES ('sb-1', 'g', 'running', 'sha256:00', 'xs', 0, 0);
                 INSERT INTO identity_sandboxes (sandbox, uid) VALUES ('sb-1', 'u-1');
                 INSERT INTO sandbox_ports (sandbox, port, created_at) VALUES ('sb-1', 8080, 0);",
            )
            .unwrap();
            tx.commit().unwrap();
        })
        .join()
        .unwrap();
        let s = test_store(dir.path());
        let count = |sql: &'static str| {
            s.with_conn(move |c| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap())
        };
        assert_eq!(count("SELECT COUNT(*) FROM identity_sandboxes"), 1);
        assert_eq!(count("SELECT COUNT(*) FROM sandbox_ports"), 1);
        let sb = s.get_sandbox("sb-1").await.unwrap().unwrap();
        assert_eq!(
            (sb.state, sb.node),
            (crate::api::SandboxState::Running, None)
        );
        let spec = NodeSpec {
            name: "n".into(),
            holder: "h".into(),
            advertise_url: "http://n:7070".into(),
            accelerator: "tcg".into(),
            labels: Default::default(),
            memory_mib: 1,
            millicpus: 1,
            lease_ms: 60_000,
        };
        let s2 = s.clone();
        std::thread::spawn(move || s2.acquire_lease(&spec).unwrap().unwrap())
            .join()
            .unwrap();
        assert_eq!(s.claim_unowned().await.unwrap(), 1);
        let sb = s.get_sandbox("sb-1").await.unwrap().unwrap();
        assert_eq!(sb.node.as_deref(), Some("n"));
        // The blocking PostgreSQL client closes its connection on drop: not on the executor.
        std::thread::spawn(move || drop(s)).join().unwrap();
    }

    /// A second home with another `secrets.key` on the same store is refused and says what to
    /// do; the same key opens it (every node of a fleet).
    #[test]
    fn a_store_refuses_another_sealing_key() {
        let dir = tempfile::tempdir().unwrap();
        let location = test_location(dir.path());
        let open_in = |home: &Path| {
            std::thread::scope(|s| {
                s.spawn(|| Store::open(&location, home).map(drop))
                    .join()
                    .unwrap()
            })
        };
        open_in(dir.path()).unwrap();
        let other = tempfile::tempdir().unwrap();
        let e = open_in(other.path()).unwrap_err().to_string();
        assert!(e.contains("not the sealing key of the store"), "{e}");
        assert!(e.contains("same secrets.key"), "{e}");
        let key = std::fs::read(dir.path().join("secrets.key")).unwrap();
        let shared = other.path().join("secrets.key");
        std::fs::write(&shared, key).unwrap();
        std::fs::set_permissions(
            &shared,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .unwrap();
        open_in(other.path()).unwrap();
    }

    #[test]
    fn a_store_that_is_not_postgres_is_refused_with_what_is_allowed() {
        let db = Path::new("/home/moatd.db");
        for bad in ["mysql://u@h/db", "/var/lib/moat.db", "sqlite:///x.db"] {
            let e = Location::parse(Some(bad), db).err().unwrap().to_string();
            assert!(e.contains("not a PostgreSQL URL"), "{bad}: {e}");
            assert!(e.contains("postgres://USER"), "{bad}: {e}");
        }
        let e = Location::parse(Some("postgres://u:hunter2@h:notaport/db"), db)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("invalid"), "{e}");
        assert!(!e.contains("hunter2"), "the password is never shown: {e}");
        let e = Location::parse(Some("postgres://u@h"), db)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("names no database"), "{e}");
        assert!(matches!(Location::parse(None, db), Ok(Location::Sqlite(p)) if p == db));
        let ok = Location::parse(Some("postgresql://moat:pw@db.example:6543/moat"), db).unwrap();
        assert_eq!(ok.describe(), "postgres://moat@db.example:6543/moat");
    }

    /// The members of a replicated cluster: accepted with target_session_attrs=read-write
    /// (and described with every host), refused without it, and read-only is never allowed.
    #[test]
    fn a_store_of_several_hosts_must_ask_for_the_primary() {
        let db = Path::new("/home/moatd.db");
        let ok = Location::parse(
            Some("postgres://moat:pw@10.0.0.1:5433,db2,[::1]:5434/moat?target_session_attrs=read-write"),
            db,
        )
        .unwrap();
        assert_eq!(
            ok.describe(),
            "postgres://moat@10.0.0.1:5433,db2:5432,[::1]:5434/moat"
        );
        let Location::Postgres(c) = &ok else {
            panic!("a PostgreSQL location")
        };
        assert_eq!(c.get_hosts().len(), 3);
        for bad in [
            "postgres://moat:hunter2@h1:5432,h2:5432/moat",
            "postgres://moat:hunter2@h1:5432,h2:5432/moat?target_session_attrs=any",
        ] {
            let e = Location::parse(Some(bad), db).err().unwrap().to_string();
            assert!(
                e.contains("2 hosts without target_session_attrs=read-write"),
                "{e}"
            );
            assert!(!e.contains("hunter2"), "the password is never shown: {e}");
        }
        let e = Location::parse(
            Some("postgres://moat@h1/moat?target_session_attrs=read-only"),
            db,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("must be read-write"), "{e}");
        let e = Location::parse(
            Some("postgres://moat@h1/moat?target_session_attrs=primary"),
            db,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("target_session_attrs"), "{e}");
        // One server needs nothing more, a unix socket included.
        Location::parse(Some("postgres://moat@h1:5432/moat"), db).unwrap();
        Location::parse(Some("postgres://moat@localhost/moat?host=/run/pg"), db).unwrap();
    }
}
