//! The embedded store: one SQLite database (`MOAT_HOME/moatd.db`, WAL) with numbered schema
//! migrations. Every call runs on a blocking thread (`Store::call`), never on the executor.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use subtle::ConstantTimeEq;

use crate::api::{
    ApiKey, CreateApiKey, CreatedApiKey, Group, GroupSpec, GroupStatus, Role, Sandbox,
    SandboxState, Tier,
};
use crate::error::{Error, Result};
use crate::keys;

/// Numbered migrations, applied in order, each once. Only ever append to this list.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_sandboxes.sql")),
    (3, include_str!("migrations/0003_snapshots.sql")),
    (4, include_str!("migrations/0004_pools_lifecycle.sql")),
    (5, include_str!("migrations/0005_operations.sql")),
];

pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

#[derive(Clone)]
pub struct Store {
    // One connection: SQLite serialises writers anyway, and the API's load is small.
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

/// The caller an API key stands for.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
    pub groups: Vec<String>,
}

impl Principal {
    /// Whether this key may see group `name` at all (else it gets a 404, never a 403).
    pub fn sees(&self, name: &str) -> bool {
        self.role == Role::Admin || self.groups.iter().any(|g| g == name)
    }
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
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on this thread: only from a blocking context.
    pub fn blocking<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
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
        .map_err(|e| Error::Internal(format!("store task failed: {e}")))?
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
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let known = latest_version();
    if current > known {
        return Err(Error::NewerSchema {
            path: path.display().to_string(),
            found: current,
            known,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
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

pub fn schema_version(conn: &Connection) -> Result<i64> {
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

/// Unix seconds → RFC 3339 UTC (`2024-01-02T03:04:05Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---- API keys ----

const BOOTSTRAPPED: &str = "bootstrap_done";

/// Creates the first admin key once per database. Returns the key when it was generated here
/// (so the caller prints it); `None` when it came from `chosen` or the database was already
/// bootstrapped.
pub fn bootstrap(conn: &mut Connection, chosen: Option<&str>) -> Result<Option<String>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let done: Option<String> = tx
        .query_row(
            "SELECT value FROM settings WHERE key = ?1",
            [BOOTSTRAPPED],
            |r| r.get(0),
        )
        .optional()?;
    if done.is_some() {
        return Ok(None);
    }
    let (key, generated) = match chosen {
        Some(k) => {
            keys::check_bootstrap(k)?;
            (k.to_string(), false)
        }
        None => (keys::generate(), true),
    };
    insert_key(&tx, "bootstrap admin", Role::Admin, &[], &key)?;
    tx.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2)",
        params![BOOTSTRAPPED, now().to_string()],
    )?;
    tx.commit()?;
    Ok(generated.then_some(key))
}

fn insert_key(
    conn: &Connection,
    name: &str,
    role: Role,
    groups: &[String],
    key: &str,
) -> Result<ApiKey> {
    let row = ApiKey {
        id: keys::new_id(),
        name: name.to_string(),
        role,
        groups: groups.to_vec(),
        prefix: keys::public_prefix(key),
        created_at: String::new(),
    };
    let created = now();
    let groups_json = serde_json::to_string(groups).map_err(|e| Error::Internal(e.to_string()))?;
    conn.execute(
        "INSERT INTO api_keys (id, name, prefix, hash, role, groups, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            row.id,
            row.name,
            row.prefix,
            keys::hash(key).to_vec(),
            role.as_str(),
            groups_json,
            created
        ],
    )?;
    Ok(ApiKey {
        created_at: rfc3339(created),
        ..row
    })
}

/// The principal of a presented key, or `None` when no stored key matches.
pub fn authenticate(conn: &Connection, presented: &str) -> Result<Option<Principal>> {
    if !keys::well_formed(presented) {
        return Ok(None);
    }
    let want = keys::hash(presented);
    // Find candidates by the public prefix, then compare the hashes in constant time, so the
    // time taken says nothing about how much of a guess matched.
    let mut stmt =
        conn.prepare_cached("SELECT id, hash, role, groups FROM api_keys WHERE prefix = ?1")?;
    let rows = stmt.query_map([keys::public_prefix(presented)], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    for row in rows {
        let (id, hash, role, groups) = row?;
        if bool::from(hash.as_slice().ct_eq(&want)) {
            return Ok(Some(Principal {
                key_id: id,
                role: parse_role(&role)?,
                groups: parse_groups(&groups)?,
            }));
        }
    }
    Ok(None)
}

fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| Error::Internal(format!("stored role {s:?} is unknown")))
}

fn parse_groups(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| Error::Internal(format!("stored groups: {e}")))
}

pub fn create_key(conn: &mut Connection, req: &CreateApiKey) -> Result<CreatedApiKey> {
    let key = keys::generate();
    let k = insert_key(conn, &req.name, req.role, &req.groups, &key)?;
    Ok(CreatedApiKey {
        id: k.id,
        name: k.name,
        role: k.role,
        groups: k.groups,
        prefix: k.prefix,
        created_at: k.created_at,
        key,
    })
}

pub fn list_keys(conn: &Connection) -> Result<Vec<ApiKey>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, role, groups, prefix, created_at FROM api_keys ORDER BY created_at, id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name, role, groups, prefix, created) = row?;
        out.push(ApiKey {
            id,
            name,
            role: parse_role(&role)?,
            groups: parse_groups(&groups)?,
            prefix,
            created_at: rfc3339(created),
        });
    }
    Ok(out)
}

pub fn delete_key(conn: &mut Connection, id: &str) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let role: Option<String> = tx
        .query_row("SELECT role FROM api_keys WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(role) = role else {
        return Err(Error::NotFound(format!(
            "no API key {}",
            crate::api::quote(id)
        )));
    };
    if role == "admin" {
        let admins: i64 = tx.query_row(
            "SELECT COUNT(*) FROM api_keys WHERE role = 'admin'",
            [],
            |r| r.get(0),
        )?;
        if admins <= 1 {
            return Err(Error::Conflict(
                "this is the last admin key: create another admin key before deleting it"
                    .to_string(),
            ));
        }
    }
    tx.execute("DELETE FROM api_keys WHERE id = ?1", [id])?;
    tx.commit()?;
    Ok(())
}

// ---- sandbox groups ----

fn group_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn group_from_parts(parts: (String, String, i64, i64)) -> Result<Group> {
    let (name, spec, created, updated) = parts;
    let spec: GroupSpec = serde_json::from_str(&spec)
        .map_err(|e| Error::Internal(format!("stored spec of group {name}: {e}")))?;
    Ok(Group {
        name,
        spec,
        created_at: rfc3339(created),
        updated_at: rfc3339(updated),
        status: GroupStatus::default(),
    })
}

pub fn get_group(conn: &Connection, name: &str) -> Result<Option<Group>> {
    conn.query_row(
        "SELECT name, spec, created_at, updated_at FROM sandbox_groups WHERE name = ?1",
        [name],
        group_from_row,
    )
    .optional()?
    .map(group_from_parts)
    .transpose()
}

pub fn list_groups(conn: &Connection) -> Result<Vec<Group>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, spec, created_at, updated_at FROM sandbox_groups ORDER BY name",
    )?;
    let rows = stmt.query_map([], group_from_row)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(group_from_parts(row?)?);
    }
    Ok(out)
}

/// Creates or replaces a group's spec. Returns the group and whether it was created. Putting
/// the same spec again changes nothing, not even `updated_at`.
pub fn put_group(conn: &mut Connection, name: &str, spec: &GroupSpec) -> Result<(Group, bool)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing = tx
        .query_row(
            "SELECT name, spec, created_at, updated_at FROM sandbox_groups WHERE name = ?1",
            [name],
            group_from_row,
        )
        .optional()?
        .map(group_from_parts)
        .transpose()?;
    let json = serde_json::to_string(spec).map_err(|e| Error::Internal(e.to_string()))?;
    let t = now();
    let created = match existing {
        Some(g) if g.spec == *spec => return Ok((g, false)),
        Some(_) => {
            tx.execute(
                "UPDATE sandbox_groups SET spec = ?2, updated_at = ?3 WHERE name = ?1",
                params![name, json, t],
            )?;
            false
        }
        None => {
            tx.execute(
                "INSERT INTO sandbox_groups (name, spec, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?3)",
                params![name, json, t],
            )?;
            true
        }
    };
    let g = tx
        .query_row(
            "SELECT name, spec, created_at, updated_at FROM sandbox_groups WHERE name = ?1",
            [name],
            group_from_row,
        )
        .map_err(Error::from)
        .and_then(group_from_parts)?;
    tx.commit()?;
    Ok((g, created))
}

/// Deletes a group; refused while it has sandboxes or snapshots unless `force`, which deletes
/// their rows too (stopping the VMs and removing snapshot directories is the caller's job).
pub fn delete_group(conn: &mut Connection, name: &str, force: bool) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let exists: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM sandbox_groups WHERE name = ?1)",
        [name],
        |r| r.get(0),
    )?;
    if !exists {
        return Err(Error::NotFound(format!("no sandbox group {name:?}")));
    }
    let n: i64 = tx.query_row(
        "SELECT COUNT(*) FROM sandboxes WHERE group_name = ?1",
        [name],
        |r| r.get(0),
    )?;
    if n > 0 && !force {
        return Err(Error::Conflict(format!(
            "sandbox group {name:?} still has {n} sandbox(es): delete them first, or delete \
             with ?force=true to delete them too"
        )));
    }
    let snapshots: i64 = tx.query_row(
        "SELECT COUNT(*) FROM snapshots WHERE group_name = ?1",
        [name],
        |r| r.get(0),
    )?;
    if snapshots > 0 && !force {
        return Err(Error::Conflict(format!(
            "sandbox group {name:?} still has {snapshots} snapshot(s): delete them first, or \
             delete with ?force=true to delete them too"
        )));
    }
    if force {
        tx.execute("DELETE FROM sandboxes WHERE group_name = ?1", [name])?;
        tx.execute("DELETE FROM snapshots WHERE group_name = ?1", [name])?;
    }
    tx.execute("DELETE FROM sandbox_groups WHERE name = ?1", [name])?;
    tx.commit()?;
    Ok(())
}

// ---- sandboxes ----

const SANDBOX_COLUMNS: &str = "id, group_name, state, reason, image, tier, env, labels, \
                               created_at, updated_at, last_activity_at";

fn sandbox_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Sandbox>> {
    let id: String = r.get(0)?;
    let state: String = r.get(2)?;
    let tier: String = r.get(5)?;
    let env: String = r.get(6)?;
    let labels: String = r.get(7)?;
    let parsed = (|| {
        Ok(Sandbox {
            state: SandboxState::parse(&state).ok_or_else(|| {
                Error::Internal(format!("stored state {state:?} of sandbox {id} is unknown"))
            })?,
            tier: tier.parse::<Tier>().ok().ok_or_else(|| {
                Error::Internal(format!("stored tier {tier:?} of sandbox {id} is unknown"))
            })?,
            env: serde_json::from_str(&env)
                .map_err(|e| Error::Internal(format!("stored env of sandbox {id}: {e}")))?,
            labels: serde_json::from_str(&labels)
                .map_err(|e| Error::Internal(format!("stored labels of sandbox {id}: {e}")))?,
            id: id.clone(),
            group: r.get(1)?,
            reason: r.get(3)?,
            image: r.get(4)?,
            created_at: rfc3339(r.get(8)?),
            updated_at: rfc3339(r.get(9)?),
            last_activity_at: r.get::<_, Option<i64>>(10)?.map(rfc3339),
        })
    })();
    Ok(parsed)
}

/// Inserts a new sandbox row (its timestamps are set here).
pub fn insert_sandbox(conn: &Connection, sb: &Sandbox) -> Result<Sandbox> {
    let t = now();
    let json = |v| serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()));
    conn.execute(
        "INSERT INTO sandboxes (id, group_name, state, reason, image, tier, env, labels,
                                created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
        params![
            sb.id,
            sb.group,
            sb.state.as_str(),
            sb.reason,
            sb.image,
            sb.tier.as_str(),
            json(&sb.env)?,
            json(&sb.labels)?,
            t
        ],
    )?;
    Ok(Sandbox {
        created_at: rfc3339(t),
        updated_at: rfc3339(t),
        ..sb.clone()
    })
}

pub fn get_sandbox(conn: &Connection, id: &str) -> Result<Option<Sandbox>> {
    conn.query_row(
        &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
        [id],
        sandbox_from_row,
    )
    .optional()?
    .transpose()
}

/// The sandboxes of `group`, or of every group.
pub fn list_sandboxes(conn: &Connection, group: Option<&str>) -> Result<Vec<Sandbox>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE ?1 IS NULL OR group_name = ?1
         ORDER BY created_at, id"
    ))?;
    let rows = stmt.query_map([group], sandbox_from_row)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row??);
    }
    Ok(out)
}

/// Sets a sandbox's state (and the reason, for `failed`); returns the row, or `None` if it is
/// gone.
pub fn set_sandbox_state(
    conn: &Connection,
    id: &str,
    state: SandboxState,
    reason: Option<&str>,
) -> Result<Option<Sandbox>> {
    conn.execute(
        "UPDATE sandboxes SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
        params![id, state.as_str(), reason, now()],
    )?;
    get_sandbox(conn, id)
}

pub fn delete_sandbox(conn: &Connection, id: &str) -> Result<()> {
    conn.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
    Ok(())
}

/// What the lifecycle timers need of a sandbox, times in Unix seconds.
#[derive(Debug, Clone)]
pub struct Timers {
    pub id: String,
    pub group: String,
    pub state: SandboxState,
    pub created_at: i64,
    /// The last state change (a resume restarts the idle clock; a suspend starts the TTL).
    pub updated_at: i64,
    pub last_activity_at: Option<i64>,
}

pub fn list_timers(conn: &Connection) -> Result<Vec<Timers>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, group_name, state, created_at, updated_at, last_activity_at FROM sandboxes",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, Option<i64>>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, group, state, created_at, updated_at, last_activity_at) = row?;
        let state = SandboxState::parse(&state).ok_or_else(|| {
            Error::Internal(format!("stored state {state:?} of sandbox {id} is unknown"))
        })?;
        out.push(Timers {
            id,
            group,
            state,
            created_at,
            updated_at,
            last_activity_at,
        });
    }
    Ok(out)
}

/// Records the last activity of sandboxes (Unix seconds), in one transaction.
pub fn record_activity(conn: &mut Connection, seen: &[(String, i64)]) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (id, at) in seen {
        tx.execute(
            "UPDATE sandboxes SET last_activity_at = ?2 WHERE id = ?1",
            params![id, at],
        )?;
    }
    tx.commit()?;
    Ok(())
}

// ---- warm pools ----

/// A ready VM of a group's warm pool (not a sandbox until a create takes it).
#[derive(Debug, Clone)]
pub struct PoolMember {
    pub id: String,
    pub group: String,
    /// Manifest digest.
    pub image: String,
    pub tier: Tier,
}

pub fn insert_pool_member(conn: &Connection, m: &PoolMember) -> Result<()> {
    conn.execute(
        "INSERT INTO pool_members (id, group_name, image, tier, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![m.id, m.group, m.image, m.tier.as_str(), now()],
    )?;
    Ok(())
}

pub fn delete_pool_member(conn: &Connection, id: &str) -> Result<()> {
    conn.execute("DELETE FROM pool_members WHERE id = ?1", [id])?;
    Ok(())
}

pub fn list_pool_members(conn: &Connection) -> Result<Vec<PoolMember>> {
    let mut stmt =
        conn.prepare_cached("SELECT id, group_name, image, tier FROM pool_members ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, group, image, tier) = row?;
        let tier = tier.parse::<Tier>().ok().ok_or_else(|| {
            Error::Internal(format!(
                "stored tier {tier:?} of pool member {id} is unknown"
            ))
        })?;
        out.push(PoolMember {
            id,
            group,
            image,
            tier,
        });
    }
    Ok(out)
}

/// Turns pool member `sb.id` into the sandbox `sb` (state `running`) in one transaction, so
/// that after a crash the VM belongs to exactly one of the two tables.
pub fn hand_over(conn: &mut Connection, sb: &Sandbox) -> Result<Sandbox> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let n = tx.execute("DELETE FROM pool_members WHERE id = ?1", [&sb.id])?;
    if n != 1 {
        return Err(Error::Internal(format!(
            "pool member {} vanished from the store",
            sb.id
        )));
    }
    let row = insert_sandbox(&tx, sb)?;
    tx.commit()?;
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_row(id: &str, group: &str) -> Sandbox {
        Sandbox {
            id: id.into(),
            group: group.into(),
            state: SandboxState::Creating,
            reason: None,
            image: "sha256:00".into(),
            tier: Tier::S,
            env: [("A".to_string(), "1".to_string())].into(),
            labels: [("app".to_string(), "x".to_string())].into(),
            created_at: String::new(),
            updated_at: String::new(),
            last_activity_at: None,
        }
    }

    #[test]
    fn sandbox_rows_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let mut c = s.conn.lock().unwrap();
        put_group(&mut c, "g", &GroupSpec::default()).unwrap();
        let row = insert_sandbox(&c, &new_row("sb-1", "g")).unwrap();
        assert_eq!(get_sandbox(&c, "sb-1").unwrap().unwrap().labels, row.labels);
        let failed = set_sandbox_state(&c, "sb-1", SandboxState::Failed, Some("gone"))
            .unwrap()
            .unwrap();
        assert_eq!(failed.state, SandboxState::Failed);
        assert_eq!(failed.reason.as_deref(), Some("gone"));
        assert_eq!(failed.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(list_sandboxes(&c, Some("g")).unwrap().len(), 1);
        assert_eq!(list_sandboxes(&c, Some("h")).unwrap().len(), 0);
        assert_eq!(list_sandboxes(&c, None).unwrap().len(), 1);
        // the schema refuses states and tiers it does not know
        assert!(c
            .execute("UPDATE sandboxes SET state = 'zombie'", [])
            .is_err());
        delete_sandbox(&c, "sb-1").unwrap();
        assert!(get_sandbox(&c, "sb-1").unwrap().is_none());
        assert!(set_sandbox_state(&c, "sb-1", SandboxState::Running, None)
            .unwrap()
            .is_none());
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("moatd.db")).unwrap()
    }

    #[test]
    fn migrating_twice_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let mut c = s.conn.lock().unwrap();
        put_group(&mut c, "g", &GroupSpec::default()).unwrap();
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
        assert!(get_group(&c, "g").unwrap().is_some());
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

    #[test]
    fn sandboxes_pin_their_group() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let mut c = s.conn.lock().unwrap();
        put_group(&mut c, "g", &GroupSpec::default()).unwrap();
        insert_sandbox(&c, &new_row("s1", "g")).unwrap();
        // The foreign key holds even without the check in delete_group.
        assert!(c
            .execute("DELETE FROM sandbox_groups WHERE name = 'g'", [])
            .is_err());
        assert!(matches!(
            delete_group(&mut c, "g", false),
            Err(Error::Conflict(_))
        ));
        delete_group(&mut c, "g", true).unwrap();
        assert!(get_group(&c, "g").unwrap().is_none());
        assert!(matches!(
            delete_group(&mut c, "g", false),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn keys_bootstrap_once_and_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let mut c = s.conn.lock().unwrap();
        let k = bootstrap(&mut c, None).unwrap().unwrap();
        assert!(bootstrap(&mut c, None).unwrap().is_none());
        let p = authenticate(&c, &k).unwrap().unwrap();
        assert_eq!(p.role, Role::Admin);
        assert!(authenticate(&c, &keys::generate()).unwrap().is_none());
        assert!(authenticate(&c, "nonsense").unwrap().is_none());
        // same prefix, different secret
        let mut forged = k.clone();
        forged.pop();
        forged.push(if k.ends_with('a') { 'b' } else { 'a' });
        assert!(authenticate(&c, &forged).unwrap().is_none());
        let created = create_key(
            &mut c,
            &CreateApiKey {
                name: "r".into(),
                role: Role::Reader,
                groups: vec!["g".into()],
            },
        )
        .unwrap();
        let p = authenticate(&c, &created.key).unwrap().unwrap();
        assert_eq!(p.groups, vec!["g".to_string()]);
        assert!(p.sees("g") && !p.sees("h"));
        // the last admin cannot go
        let keys = list_keys(&c).unwrap();
        let admin = keys
            .iter()
            .find(|k| k.role == Role::Admin)
            .unwrap()
            .id
            .clone();
        assert!(matches!(
            delete_key(&mut c, &admin),
            Err(Error::Conflict(_))
        ));
        delete_key(&mut c, &created.id).unwrap();
        assert!(matches!(
            delete_key(&mut c, &created.id),
            Err(Error::NotFound(_))
        ));
        // the stored row holds no secret
        let stored: Vec<u8> = c
            .query_row("SELECT hash FROM api_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, keys::hash(&k).to_vec());
    }

    #[test]
    fn put_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let mut c = s.conn.lock().unwrap();
        let (_, created) = put_group(&mut c, "g", &GroupSpec::default()).unwrap();
        assert!(created);
        let (_, created) = put_group(&mut c, "g", &GroupSpec::default()).unwrap();
        assert!(!created);
        let mut spec = GroupSpec::default();
        spec.pool.size = 2;
        let (g, created) = put_group(&mut c, "g", &spec).unwrap();
        assert!(!created);
        assert_eq!(g.spec.pool.size, 2);
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
