//! The `sandboxes` table: one row per sandbox, the API's source of truth for its state
//! (the VM's own state lives in `MOAT_HOME/run/<id>/`), and its lifecycle timestamps.

use super::db::{params, Db, DbResult, OptionalExtension, Row};

use super::{now, Store};
use crate::api::{rfc3339, Sandbox, SandboxState, Tier};
use crate::error::{Error, Result};

impl Store {
    /// Inserts a new sandbox row (its timestamps are set here).
    /// On this node, fenced by its lease; a row with a VM only if the node's memory has room
    /// for its tier as the store counts it (429 otherwise; see `placement::admit`).
    pub async fn insert_sandbox(&self, sb: &Sandbox) -> Result<Sandbox> {
        let (sb, fence) = (sb.clone(), self.fence.clone());
        let node = self.fence.node();
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            if let (Some(node), SandboxState::Creating | SandboxState::Running) = (&node, sb.state)
            {
                super::placement::admit(&tx, node, sb.tier)?;
            }
            let row = insert_sandbox(
                &tx,
                &Sandbox {
                    node: node.clone(),
                    ..sb.clone()
                },
            )?;
            tx.commit()?;
            Ok(row)
        })
        .await
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
    /// is gone. Only for a sandbox of this node that is not `lost`, fenced by its lease.
    pub async fn set_sandbox_state(
        &self,
        id: &str,
        state: SandboxState,
        reason: Option<&str>,
    ) -> Result<Option<Sandbox>> {
        let (id, reason) = (id.to_string(), reason.map(str::to_string));
        let (fence, node) = (self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            let row = set_sandbox_state(&tx, &id, node.as_deref(), state, reason.as_deref())?;
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    /// Deletes a sandbox of this node, or a `lost` one (its VM is gone with its node), fenced
    /// by this node's lease.
    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        let (fence, node) = (self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            tx.execute(
                "DELETE FROM sandboxes WHERE id = ?1 \
                 AND (CAST(?2 AS TEXT) IS NULL OR node = ?2 OR state = 'lost')",
                params![id, node],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Gives sandboxes and pool VMs made before node mode (no node) to this node: the first
    /// node to start on a store that one daemon used before.
    pub async fn claim_unowned(&self) -> Result<usize> {
        let (fence, node) = (self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            let n = tx.execute(
                "UPDATE sandboxes SET node = ?1 WHERE node IS NULL",
                params![node],
            )?;
            tx.execute(
                "UPDATE pool_members SET node = ?1 WHERE node IS NULL",
                params![node],
            )?;
            tx.commit()?;
            Ok(n)
        })
        .await
    }

    /// The timers of this node's sandboxes.
    pub async fn list_timers(&self) -> Result<Vec<Timers>> {
        let node = self.fence.node();
        self.call(move |c| list_timers(c, node.as_deref())).await
    }

    /// Records the last activity of this node's sandboxes (Unix seconds), in one transaction
    /// fenced by its lease.
    pub async fn record_activity(&self, seen: Vec<(String, i64)>) -> Result<()> {
        let (fence, node) = (self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            for (id, at) in &seen {
                tx.execute(
                    "UPDATE sandboxes SET last_activity_at = ?2 WHERE id = ?1 \
                     AND (CAST(?3 AS TEXT) IS NULL OR node = ?3)",
                    params![id, at, node],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

const SANDBOX_COLUMNS: &str = "id, group_name, state, reason, image, tier, env, labels, \
                               created_at, updated_at, last_activity_at, node";

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
            node: r.get(11)?,
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
                                created_at, updated_at, node)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
        params![
            sb.id,
            sb.group,
            sb.state.as_str(),
            sb.reason,
            sb.image,
            sb.tier.as_str(),
            json(&sb.env)?,
            json(&sb.labels)?,
            t,
            sb.node
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
/// gone. With `node`, only a sandbox of that node; never a `lost` one (the other nodes
/// decided its fate; its node's word no longer counts).
pub(super) fn set_sandbox_state(
    conn: &Db,
    id: &str,
    node: Option<&str>,
    state: SandboxState,
    reason: Option<&str>,
) -> Result<Option<Sandbox>> {
    let n = conn.execute(
        "UPDATE sandboxes SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1 \
         AND (CAST(?5 AS TEXT) IS NULL OR node = ?5) AND state <> 'lost'",
        params![id, state.as_str(), reason, now(), node],
    )?;
    let row = get_sandbox(conn, id)?;
    match &row {
        Some(sb) if n == 0 && sb.state == SandboxState::Lost => Err(Error::Conflict(format!(
            "sandbox {id} is lost ({}): only deleting it is allowed",
            sb.reason.as_deref().unwrap_or("its node stopped")
        ))),
        Some(sb) if n == 0 => Err(Error::Conflict(format!(
            "sandbox {id} runs on node {}, not this one",
            sb.node.as_deref().unwrap_or("(none)")
        ))),
        _ => Ok(row),
    }
}

#[cfg(test)]
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

fn list_timers(conn: &Db, node: Option<&str>) -> Result<Vec<Timers>> {
    let rows = conn.query_map(
        "SELECT id, group_name, state, created_at, updated_at, last_activity_at FROM sandboxes \
         WHERE CAST(?1 AS TEXT) IS NULL OR node = ?1",
        [node],
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
            node: None,
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
        let failed = set_sandbox_state(&c, "sb-1", None, SandboxState::Failed, Some("gone"))
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
        assert!(
            set_sandbox_state(&c, "sb-1", None, SandboxState::Running, None)
                .unwrap()
                .is_none()
        );
    }
}
