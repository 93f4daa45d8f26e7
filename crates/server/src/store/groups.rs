//! The `sandbox_groups` table: a group's name and its spec (stored as JSON, every default
//! filled in).

use super::db::{params, Db, DbResult, OptionalExtension, Row};

use super::{now, Store};
use crate::api::{rfc3339, Group, GroupSpec, GroupStatus};
use crate::error::{Error, Result};

impl Store {
    pub async fn get_group(&self, name: &str) -> Result<Option<Group>> {
        let name = name.to_string();
        self.call(move |c| get_group(c, &name)).await
    }

    pub async fn list_groups(&self) -> Result<Vec<Group>> {
        self.call(list_groups).await
    }

    /// Creates or replaces a group's spec (see [`put_group`]).
    pub async fn put_group(&self, name: &str, spec: &GroupSpec) -> Result<(Group, bool)> {
        let (name, spec) = (name.to_string(), spec.clone());
        self.call(move |c| put_group(c, &name, &spec)).await
    }

    /// Deletes a group (see [`delete_group`]).
    pub async fn delete_group(&self, name: &str, force: bool) -> Result<()> {
        let name = name.to_string();
        self.call(move |c| delete_group(c, &name, force)).await
    }
}

fn group_from_row(r: &Row) -> DbResult<(String, String, i64, i64)> {
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

pub(super) fn get_group(conn: &Db, name: &str) -> Result<Option<Group>> {
    conn.query_row(
        "SELECT name, spec, created_at, updated_at FROM sandbox_groups WHERE name = ?1",
        [name],
        group_from_row,
    )
    .optional()?
    .map(group_from_parts)
    .transpose()
}

pub(super) fn list_groups(conn: &Db) -> Result<Vec<Group>> {
    let rows = conn.query_map(
        "SELECT name, spec, created_at, updated_at FROM sandbox_groups ORDER BY name",
        [],
        group_from_row,
    )?;
    let mut out = Vec::new();
    for row in rows {
        out.push(group_from_parts(row)?);
    }
    Ok(out)
}

/// Creates or replaces a group's spec. Returns the group and whether it was created. Putting
/// the same spec again changes nothing, not even `updated_at`.
pub(super) fn put_group(conn: &Db, name: &str, spec: &GroupSpec) -> Result<(Group, bool)> {
    let tx = conn.transaction()?;
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
pub(super) fn delete_group(conn: &Db, name: &str, force: bool) -> Result<()> {
    let tx = conn.transaction()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sandboxes::{insert_sandbox, tests::new_row};
    use crate::store::tests::open;

    #[test]
    fn sandboxes_pin_their_group() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let c = s.conn.lock().unwrap();
        put_group(&c, "g", &GroupSpec::default()).unwrap();
        insert_sandbox(&c, &new_row("s1", "g")).unwrap();
        // The foreign key holds even without the check in delete_group.
        assert!(c
            .execute("DELETE FROM sandbox_groups WHERE name = 'g'", [])
            .is_err());
        assert!(matches!(
            delete_group(&c, "g", false),
            Err(Error::Conflict(_))
        ));
        delete_group(&c, "g", true).unwrap();
        assert!(get_group(&c, "g").unwrap().is_none());
        assert!(matches!(
            delete_group(&c, "g", false),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn put_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let c = s.conn.lock().unwrap();
        let (_, created) = put_group(&c, "g", &GroupSpec::default()).unwrap();
        assert!(created);
        let (_, created) = put_group(&c, "g", &GroupSpec::default()).unwrap();
        assert!(!created);
        let mut spec = GroupSpec::default();
        spec.pool.size = 2;
        let (g, created) = put_group(&c, "g", &spec).unwrap();
        assert!(!created);
        assert_eq!(g.spec.pool.size, 2);
    }
}
