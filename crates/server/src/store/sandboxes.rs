//! The `sandboxes` table: one row per sandbox, the API's source of truth for its state
//! (the VM's own state lives in `MOAT_HOME/run/<id>/`), and its lifecycle timestamps.

use super::db::{params, Db, DbResult, OptionalExtension, Row};

use super::{now, Store};
use crate::api::{rfc3339, Sandbox, SandboxState, Tier};
use crate::error::{Error, Result};

impl Store {
    /// Inserts a new sandbox row (its timestamps are set here).
    pub async fn insert_sandbox(&self, sb: &Sandbox) -> Result<Sandbox> {
        let sb = sb.clone();
        self.call(move |c| insert_sandbox(c, &sb)).await
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Option<Sandbox>> {
        let id = id.to_string();
        self.call(move |c| get_sandbox(c, &id)).await
    }

    /// The sandboxes of `group`, or of every group.
    pub async fn list_sandboxes(&self, group: Option<&str>) -> Result<Vec<Sandbox>> {
        let group = group.map(str::to_string);
        self.call(move |c| list_sandboxes(c, group.as_deref()))
            .await
    }

    /// Sets a sandbox's state (and the reason, for `failed`); returns the row, or `None` if it
    /// is gone.
    pub async fn set_sandbox_state(
        &self,
        id: &str,
        state: SandboxState,
        reason: Option<&str>,
    ) -> Result<Option<Sandbox>> {
        let (id, reason) = (id.to_string(), reason.map(str::to_string));
        self.call(move |c| set_sandbox_state(c, &id, state, reason.as_deref()))
            .await
    }

    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call(move |c| delete_sandbox(c, &id)).await
    }

    pub async fn list_timers(&self) -> Result<Vec<Timers>> {
        self.call(list_timers).await
    }

    /// Records the last activity of sandboxes (Unix seconds), in one transaction.
    pub async fn record_activity(&self, seen: Vec<(String, i64)>) -> Result<()> {
        self.call(move |c| record_activity(c, &seen)).await
    }
}

const SANDBOX_COLUMNS: &str = "id, group_name, state, reason, image, tier, env, labels, \
                               created_at, updated_at, last_activity_at";

fn sandbox_from_row(r: &Row) -> DbResult<Result<Sandbox>> {
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
            health: None,
        })
    })();
    Ok(parsed)
}

/// Inserts a new sandbox row (its timestamps are set here).
pub(super) fn insert_sandbox(conn: &Db, sb: &Sandbox) -> Result<Sandbox> {
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

pub(super) fn get_sandbox(conn: &Db, id: &str) -> Result<Option<Sandbox>> {
    conn.query_row(
        &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
        [id],
        sandbox_from_row,
    )
    .optional()?
    .transpose()
}

/// The sandboxes of `group`, or of every group.
pub(super) fn list_sandboxes(conn: &Db, group: Option<&str>) -> Result<Vec<Sandbox>> {
    let rows = conn.query_map(
        &format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE CAST(?1 AS TEXT) IS NULL OR group_name = ?1
         ORDER BY created_at, id"
        ),
        [group],
        sandbox_from_row,
    )?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

/// Sets a sandbox's state (and the reason, for `failed`); returns the row, or `None` if it is
/// gone.
pub(super) fn set_sandbox_state(
    conn: &Db,
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

pub(super) fn delete_sandbox(conn: &Db, id: &str) -> Result<()> {
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

pub(super) fn list_timers(conn: &Db) -> Result<Vec<Timers>> {
    let rows = conn.query_map(
        "SELECT id, group_name, state, created_at, updated_at, last_activity_at FROM sandboxes",
        [],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for (id, group, state, created_at, updated_at, last_activity_at) in rows {
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
pub(super) fn record_activity(conn: &Db, seen: &[(String, i64)]) -> Result<()> {
    let tx = conn.transaction()?;
    for (id, at) in seen {
        tx.execute(
            "UPDATE sandboxes SET last_activity_at = ?2 WHERE id = ?1",
            params![id, at],
        )?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::api::GroupSpec;
    use crate::store::groups::put_group;
    use crate::store::tests::open;

    pub(in crate::store) fn new_row(id: &str, group: &str) -> Sandbox {
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
            health: None,
        }
    }

    #[test]
    fn sandbox_rows_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let c = s.conn.lock().unwrap();
        put_group(&c, "g", &GroupSpec::default()).unwrap();
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
}
