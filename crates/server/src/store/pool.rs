//! The `pool_members` table: the ready VMs of each group's warm pool, and the hand-over that
//! turns one into a sandbox row.

use super::db::{params, Db};

use super::sandboxes::insert_sandbox;
use super::{now, Store};
use crate::api::{Sandbox, Tier};
use crate::error::{Error, Result};

impl Store {
    pub async fn insert_pool_member(&self, m: &PoolMember) -> Result<()> {
        let m = m.clone();
        self.call(move |c| insert_pool_member(c, &m)).await
    }

    pub async fn delete_pool_member(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call(move |c| delete_pool_member(c, &id)).await
    }

    pub async fn list_pool_members(&self) -> Result<Vec<PoolMember>> {
        self.call(list_pool_members).await
    }

    /// Turns pool member `sb.id` into the sandbox `sb` (see [`hand_over`]).
    pub async fn hand_over(&self, sb: &Sandbox) -> Result<Sandbox> {
        let sb = sb.clone();
        self.call(move |c| hand_over(c, &sb)).await
    }
}

/// A ready VM of a group's warm pool (not a sandbox until a create takes it).
#[derive(Debug, Clone)]
pub struct PoolMember {
    pub id: String,
    pub group: String,
    /// Manifest digest.
    pub image: String,
    pub tier: Tier,
}

pub(super) fn insert_pool_member(conn: &Db, m: &PoolMember) -> Result<()> {
    conn.execute(
        "INSERT INTO pool_members (id, group_name, image, tier, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![m.id, m.group, m.image, m.tier.as_str(), now()],
    )?;
    Ok(())
}

pub(super) fn delete_pool_member(conn: &Db, id: &str) -> Result<()> {
    conn.execute("DELETE FROM pool_members WHERE id = ?1", [id])?;
    Ok(())
}

pub(super) fn list_pool_members(conn: &Db) -> Result<Vec<PoolMember>> {
    let rows = conn.query_map(
        "SELECT id, group_name, image, tier FROM pool_members ORDER BY id",
        [],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for (id, group, image, tier) in rows {
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
pub(super) fn hand_over(conn: &Db, sb: &Sandbox) -> Result<Sandbox> {
    let tx = conn.transaction()?;
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
