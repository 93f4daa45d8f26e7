//! The `pool_members` table: the ready VMs of each group's warm pool on each node, and the
//! hand-over that turns one into a sandbox row. A node sees and changes only its own, fenced
//! by its lease.

use super::db::{params, Db};

use super::sandboxes::insert_sandbox;
use super::{now, Store};
use crate::api::{Sandbox, Tier};
use crate::error::{Error, Result};

impl Store {
    pub async fn insert_pool_member(&self, m: &PoolMember) -> Result<()> {
        let (m, fence, node) = (m.clone(), self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            insert_pool_member(&tx, &m, node.as_deref())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub async fn delete_pool_member(&self, id: &str) -> Result<()> {
        let (id, fence, node) = (id.to_string(), self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            tx.execute(
                "DELETE FROM pool_members WHERE id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR node = ?2)",
                params![id, node],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// This node's pool VMs.
    pub async fn list_pool_members(&self) -> Result<Vec<PoolMember>> {
        let node = self.fence.node();
        self.call(move |c| list_pool_members(c, node.as_deref()))
            .await
    }

    /// Turns pool member `sb.id` into the sandbox `sb` of this node (see [`hand_over`]).
    pub async fn hand_over(&self, sb: &Sandbox) -> Result<Sandbox> {
        let sb = Sandbox {
            node: self.fence.node(),
            ..sb.clone()
        };
        let fence = self.fence.clone();
        self.call(move |c| hand_over(c, &fence, &sb)).await
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

fn insert_pool_member(conn: &Db, m: &PoolMember, node: Option<&str>) -> Result<()> {
    conn.execute(
        "INSERT INTO pool_members (id, group_name, image, tier, created_at, node)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![m.id, m.group, m.image, m.tier.as_str(), now(), node],
    )?;
    Ok(())
}

fn list_pool_members(conn: &Db, node: Option<&str>) -> Result<Vec<PoolMember>> {
    let rows = conn.query_map(
        "SELECT id, group_name, image, tier FROM pool_members \
         WHERE CAST(?1 AS TEXT) IS NULL OR node = ?1 ORDER BY id",
        [node],
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
fn hand_over(conn: &Db, fence: &super::nodes::Fence, sb: &Sandbox) -> Result<Sandbox> {
    let tx = conn.transaction()?;
    fence.check(&tx)?;
    let n = tx.execute(
        "DELETE FROM pool_members WHERE id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR node = ?2)",
        params![sb.id, sb.node],
    )?;
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
