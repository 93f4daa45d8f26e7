//! The `snapshots` table: a row per named snapshot of a group, `creating` while its directory
//! is written (the row holds the name) and `ready` after (see `crate::snapshots`).

use super::db::{params, Db, DbResult, OptionalExtension, Row};

use super::{now, Store};
use crate::api::{quote, rfc3339, Snapshot, Tier};
use crate::error::{Error, Result};

impl Store {
    /// The ready snapshot `name` of `group`.
    pub async fn get_snapshot(&self, group: &str, name: &str) -> Result<Option<Snapshot>> {
        let (g, n) = (group.to_string(), name.to_string());
        self.call(move |c| get_ready(c, &g, &n)).await
    }

    /// The ready snapshots of `group`, or of every group, oldest first.
    pub async fn list_snapshots(&self, group: Option<&str>) -> Result<Vec<Snapshot>> {
        let group = group.map(str::to_string);
        self.call(move |c| list_ready(c, group.as_deref())).await
    }

    /// Claims `s.name` in `s.group` with a `creating` row: a conflict if the name is taken.
    /// The row names this node: its files are in this node's MOAT_HOME.
    pub async fn claim_snapshot(&self, s: &Snapshot) -> Result<()> {
        let (s, node) = (s.clone(), self.fence.node());
        self.call(move |c| claim(c, &s, node.as_deref())).await
    }

    /// Marks a claimed snapshot ready; `None` if its row is gone (its group was
    /// force-deleted meanwhile).
    pub async fn snapshot_ready(
        &self,
        group: &str,
        name: &str,
        size: u64,
    ) -> Result<Option<Snapshot>> {
        let (g, n) = (group.to_string(), name.to_string());
        self.call(move |c| set_ready(c, &g, &n, size)).await
    }

    pub async fn delete_snapshot(&self, group: &str, name: &str) -> Result<()> {
        let (g, n) = (group.to_string(), name.to_string());
        self.call(move |c| delete_row(c, &g, &n)).await
    }

    /// At the daemon's start: forgets this node's `creating` rows (a crash while a snapshot
    /// was taken) and returns its ready ones (their files are in its MOAT_HOME). Rows from
    /// before node mode are this node's (the first to start claims them).
    pub async fn recover_snapshots(&self) -> Result<Vec<Snapshot>> {
        let node = self.fence.node();
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute("UPDATE snapshots SET node = ?1 WHERE node IS NULL", [&node])?;
            tx.execute(
                "DELETE FROM snapshots WHERE state = 'creating' \
                 AND (CAST(?1 AS TEXT) IS NULL OR node = ?1)",
                [&node],
            )?;
            let mine: Vec<(String, String)> = tx.query_map(
                "SELECT group_name, name FROM snapshots WHERE state = 'ready' \
                 AND (CAST(?1 AS TEXT) IS NULL OR node = ?1)",
                [&node],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let ready = list_ready(&tx, None)?
                .into_iter()
                .filter(|s| mine.contains(&(s.group.clone(), s.name.clone())))
                .collect();
            tx.commit()?;
            Ok(ready)
        })
        .await
    }
}

fn snapshot_from_row(r: &Row) -> DbResult<Result<Snapshot>> {
    let tier: String = r.get(4)?;
    let size: i64 = r.get(5)?;
    let name: String = r.get(1)?;
    Ok(Ok(Snapshot {
        tier: match tier.parse::<Tier>().ok() {
            Some(t) => t,
            None => {
                return Ok(Err(Error::Internal(format!(
                    "stored tier {tier:?} of snapshot {name} is unknown"
                ))))
            }
        },
        group: r.get(0)?,
        name,
        sandbox: r.get(2)?,
        image: r.get(3)?,
        size_bytes: u64::try_from(size).unwrap_or(0),
        created_at: rfc3339(r.get(6)?),
    }))
}

const COLUMNS: &str = "group_name, name, sandbox, image, tier, size_bytes, created_at";

pub(super) fn get_ready(c: &Db, group: &str, name: &str) -> Result<Option<Snapshot>> {
    c.query_row(
        &format!(
            "SELECT {COLUMNS} FROM snapshots WHERE group_name = ?1 AND name = ?2 \
             AND state = 'ready'"
        ),
        [group, name],
        snapshot_from_row,
    )
    .optional()?
    .transpose()
}

/// The ready snapshots of `group`, or of every group.
pub(super) fn list_ready(c: &Db, group: Option<&str>) -> Result<Vec<Snapshot>> {
    let rows = c.query_map(
        &format!(
            "SELECT {COLUMNS} FROM snapshots WHERE state = 'ready' \
         AND (CAST(?1 AS TEXT) IS NULL OR group_name = ?1) ORDER BY created_at, name"
        ),
        [group],
        snapshot_from_row,
    )?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

/// Claims `name` in `group` with a `creating` row: 409 if the name is taken.
pub(super) fn claim(c: &Db, s: &Snapshot, node: Option<&str>) -> Result<()> {
    let inserted = c.execute(
        "INSERT INTO snapshots (group_name, name, state, sandbox, image, tier, created_at, node)
         VALUES (?1, ?2, 'creating', ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        params![
            s.group,
            s.name,
            s.sandbox,
            s.image,
            s.tier.as_str(),
            now(),
            node
        ],
    )?;
    if inserted == 0 {
        return Err(Error::Conflict(format!(
            "snapshot {} exists already in group {} (or is being taken): choose another \
             name, or delete it first",
            quote(&s.name),
            quote(&s.group)
        )));
    }
    Ok(())
}

/// Marks the claimed row ready; `None` if it is gone (its group was force-deleted meanwhile).
pub(super) fn set_ready(c: &Db, group: &str, name: &str, size: u64) -> Result<Option<Snapshot>> {
    let n = c.execute(
        "UPDATE snapshots SET state = 'ready', size_bytes = ?3
         WHERE group_name = ?1 AND name = ?2 AND state = 'creating'",
        params![group, name, i64::try_from(size).unwrap_or(i64::MAX)],
    )?;
    if n == 0 {
        return Ok(None);
    }
    get_ready(c, group, name)
}

pub(super) fn delete_row(c: &Db, group: &str, name: &str) -> Result<()> {
    c.execute(
        "DELETE FROM snapshots WHERE group_name = ?1 AND name = ?2",
        [group, name],
    )?;
    Ok(())
}
