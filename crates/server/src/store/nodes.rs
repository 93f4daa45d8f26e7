//! The `nodes` table: every daemon on a store is a node that holds a lease on its row
//! (docs/FLEET.md). Lease times come from the database's clock (one clock for every node),
//! in milliseconds. Each acquisition of a lease starts a new `epoch`; the writes a node makes
//! about its sandboxes check, in their own transaction, that its lease is still of its epoch
//! and that no other node has marked it lost ([`Fence`]), so a node that was stopped past its
//! lease cannot overwrite what the others decided meanwhile.
//!
//! An expired lease by itself fences nothing: only another node acting on the expiry (marking
//! the node lost, or taking its name with a new epoch) does, and that act is a write to the
//! node's row which serializes with the node's own writes. Until then nothing was decided
//! against the node, so its writes and its renewal go on. Fencing on the expiry alone made a
//! node whose renewal was merely late (its own disk busy with gigabytes of guest writes, the
//! store's one connection behind a slow fsync) refuse every write with nobody to take over,
//! which is always the case for a fleet of one.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::db::{params, Backend, Db, OptionalExtension};
use super::Store;
use crate::api::{quote, rfc3339, Node, NodeCapacity, NodeState, NodeUse};
use crate::error::{Error, Result};

/// The database's clock, Unix milliseconds, as SQL: one clock for every node's leases.
pub(super) fn now_ms_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    }
}

/// What a node says about itself when it takes its lease.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    /// Random, kept in the node's MOAT_HOME: the same home takes its row back at once after a
    /// restart; another home waits until the lease has expired.
    pub holder: String,
    pub advertise_url: String,
    pub accelerator: String,
    pub labels: BTreeMap<String, String>,
    pub memory_mib: u64,
    pub millicpus: u64,
    pub lease_ms: i64,
}

/// A lease held: its epoch and when it ends (database clock, Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub epoch: i64,
    pub expires_ms: i64,
}

/// What a renewal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    Renewed(Lease),
    /// Another node marked this one lost or took its name with a new epoch: this node has
    /// stopped writing and must acquire a new epoch.
    Lost(String),
}

/// The node and epoch this daemon's writes are fenced by.
#[derive(Debug, Default)]
pub(crate) struct Fence(Mutex<FenceState>);

#[derive(Debug, Default, Clone)]
enum FenceState {
    /// No lease taken yet (a store opened by a unit test or a tool): no fencing.
    #[default]
    Unfenced,
    Held {
        node: String,
        epoch: i64,
    },
    Lost {
        node: String,
    },
}

impl Fence {
    fn get(&self) -> FenceState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, state: FenceState) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// This node's name and lease epoch while it holds its lease.
    pub(crate) fn held(&self) -> Option<(String, i64)> {
        match self.get() {
            FenceState::Held { node, epoch } => Some((node, epoch)),
            _ => None,
        }
    }

    /// This node's name, once it has taken a lease.
    pub(crate) fn node(&self) -> Option<String> {
        match self.get() {
            FenceState::Unfenced => None,
            FenceState::Held { node, .. } | FenceState::Lost { node } => Some(node),
        }
    }

    /// Refuses the write of the transaction `tx` unless this node still holds its epoch and
    /// is not marked lost, checked there (so that the check and the write commit together or
    /// not at all, and serialize with a sweep that marks the node lost).
    pub(crate) fn check(&self, tx: &Db) -> Result<()> {
        let (node, epoch) = match self.get() {
            FenceState::Unfenced => return Ok(()),
            FenceState::Lost { node } => return Err(lost(&node)),
            FenceState::Held { node, epoch } => (node, epoch),
        };
        let current: i64 = tx.query_row(
            "SELECT COUNT(*) FROM nodes WHERE name = ?1 AND epoch = ?2 AND state <> 'lost'",
            params![node, epoch],
            |r| r.get(0),
        )?;
        if current == 1 {
            Ok(())
        } else {
            Err(lost(&node))
        }
    }
}

fn lost(node: &str) -> Error {
    Error::Unavailable(format!(
        "node {} does not hold its lease (another node marked it lost or took its name): \
         it changes nothing until it has acquired a new one",
        quote(node)
    ))
}

pub(super) const NODE_COLUMNS: &str =
    "name, advertise_url, accelerator, labels, memory_mib, millicpus, \
    used_memory_mib, used_millicpus, sandboxes, state, epoch, lease_ms, lease_expires_ms, \
    acquired_ms, lost_ms, lost_reason, drain_progress, sealing_key_id, next_sealing_key_id, \
    shared_storage, (SELECT COUNT(*) FROM sandboxes WHERE sandboxes.node = nodes.name \
     AND sandboxes.state = 'suspended' AND sandboxes.files = 'local')";

/// Node `name`'s row, `None` if there is no such node.
fn node_named(c: &Db, name: &str) -> Result<Option<Node>> {
    c.query_row(
        &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = ?1"),
        [name],
        node_from_row,
    )
    .optional()?
    .transpose()
}

pub(super) fn node_from_row(r: &super::db::Row) -> super::db::DbResult<Result<Node>> {
    let name: String = r.get(0)?;
    let labels: String = r.get(3)?;
    let state: String = r.get(9)?;
    let drain: Option<String> = r.get(16)?;
    let ms = |v: i64| rfc3339(v.div_euclid(1000));
    Ok((|| {
        Ok(Node {
            labels: serde_json::from_str(&labels)
                .map_err(|e| Error::Internal(format!("stored labels of node {name}: {e}")))?,
            state: NodeState::parse(&state).ok_or_else(|| {
                Error::Internal(format!("stored state {state:?} of node {name} is unknown"))
            })?,
            name: name.clone(),
            advertise_url: r.get(1)?,
            accelerator: r.get(2)?,
            capacity: NodeCapacity {
                memory_mib: r.get::<_, i64>(4)? as u64,
                vcpus: r.get::<_, i64>(5)? as f64 / 1000.0,
            },
            used: NodeUse {
                memory_mib: r.get::<_, i64>(6)? as u64,
                vcpus: r.get::<_, i64>(7)? as f64 / 1000.0,
                sandboxes: r.get::<_, i64>(8)? as u64,
            },
            epoch: r.get::<_, i64>(10)? as u64,
            lease_s: (r.get::<_, i64>(11)? / 1000) as u64,
            lease_expires_at: ms(r.get(12)?),
            acquired_at: ms(r.get(13)?),
            lost_at: r.get::<_, Option<i64>>(14)?.map(ms),
            lost_reason: r.get(15)?,
            drain: drain
                .map(|d| serde_json::from_str(&d))
                .transpose()
                .map_err(|e| Error::Internal(format!("stored drain of node {name}: {e}")))?,
            sealing_key_id: r.get(17)?,
            next_sealing_key_id: r.get(18)?,
            shared_storage: r.get::<_, i64>(19)? == 1,
            suspended_local: r.get::<_, i64>(20)? as u64,
        })
    })())
}

impl Store {
    /// Takes the lease of node `spec.name` with a new epoch: a new row, a row of this holder
    /// (a restart of the same node), or a row whose lease has expired. Another holder's live
    /// lease: `Ok(Err(message))` saying whose and until when. Blocking.
    pub fn acquire_lease(&self, spec: &NodeSpec) -> Result<std::result::Result<Lease, String>> {
        let spec = spec.clone();
        let labels = serde_json::to_string(&spec.labels)
            .map_err(|e| Error::Internal(format!("node labels: {e}")))?;
        let got = self.blocking(|c| {
            let now = now_ms_sql(c.backend());
            let tx = c.transaction()?;
            let t: i64 = tx.query_row(&format!("SELECT {now}"), [], |r| r.get(0))?;
            let row: Option<(String, String, i64, i64)> = tx
                .query_row(
                    "SELECT holder, advertise_url, lease_expires_ms, epoch FROM nodes \
                     WHERE name = ?1",
                    [&spec.name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let epoch = match row {
                None => {
                    tx.execute(
                        "INSERT INTO nodes (name, holder, advertise_url, accelerator, labels, \
                         memory_mib, millicpus, state, epoch, lease_ms, lease_expires_ms, \
                         acquired_ms) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'ready', 1, ?8, ?9, ?10)",
                        params![
                            spec.name,
                            spec.holder,
                            spec.advertise_url,
                            spec.accelerator,
                            labels,
                            spec.memory_mib as i64,
                            spec.millicpus as i64,
                            spec.lease_ms,
                            t + spec.lease_ms,
                            t
                        ],
                    )?;
                    1
                }
                Some((holder, url, expires, _)) if holder != spec.holder && expires > t => {
                    return Ok(Err(format!(
                        "node name {} is held by another daemon (advertised at {url}) whose \
                         lease ends in {} ms: give this one another --node-name, or stop that one",
                        quote(&spec.name),
                        expires - t
                    )));
                }
                Some((_, _, _, epoch)) => {
                    tx.execute(
                        "UPDATE nodes SET holder = ?2, advertise_url = ?3, accelerator = ?4, \
                         labels = ?5, memory_mib = ?6, millicpus = ?7, \
                         state = CASE WHEN draining = 1 THEN 'draining' ELSE 'ready' END, \
                         epoch = ?8, lease_ms = ?9, lease_expires_ms = ?10, acquired_ms = ?11, \
                         lost_ms = NULL, lost_reason = NULL WHERE name = ?1",
                        params![
                            spec.name,
                            spec.holder,
                            spec.advertise_url,
                            spec.accelerator,
                            labels,
                            spec.memory_mib as i64,
                            spec.millicpus as i64,
                            epoch + 1,
                            spec.lease_ms,
                            t + spec.lease_ms,
                            t
                        ],
                    )?;
                    epoch + 1
                }
            };
            // Which sealing keys it holds, from the start (`store/sealing.rs`).
            let (key, next) = self.seal.ids()?;
            tx.execute(
                "UPDATE nodes SET sealing_key_id = ?2, next_sealing_key_id = ?3 WHERE name = ?1",
                params![spec.name, key, next],
            )?;
            tx.commit()?;
            Ok(Ok(Lease {
                epoch,
                expires_ms: t + spec.lease_ms,
            }))
        })?;
        if let Ok(lease) = &got {
            self.fence.set(FenceState::Held {
                node: spec.name.clone(),
                epoch: lease.epoch,
            });
        }
        Ok(got)
    }

    /// Renews this node's lease and records its use, if the node still holds its epoch and
    /// is not marked lost (a late renewal of an expired lease nobody acted on succeeds); else
    /// the fence closes until [`Store::acquire_lease`] succeeds again.
    pub async fn renew_lease(
        &self,
        used_memory_mib: u64,
        used_millicpus: u64,
        sandboxes: u64,
    ) -> Result<Renewal> {
        let (node, epoch) = match self.fence.get() {
            FenceState::Held { node, epoch } => (node, epoch),
            FenceState::Lost { node } => return Ok(Renewal::Lost(lost(&node).to_string())),
            FenceState::Unfenced => {
                return Err(Error::Internal("renewing a lease never taken".into()))
            }
        };
        let n = node.clone();
        let renewed = self
            .call(move |c| {
                let now = now_ms_sql(c.backend());
                let tx = c.transaction()?;
                let updated = tx.execute(
                    &format!(
                        "UPDATE nodes SET lease_expires_ms = {now} + lease_ms, \
                         used_memory_mib = ?3, used_millicpus = ?4, sandboxes = ?5 \
                         WHERE name = ?1 AND epoch = ?2 AND state <> 'lost'"
                    ),
                    params![
                        n,
                        epoch,
                        used_memory_mib as i64,
                        used_millicpus as i64,
                        sandboxes as i64
                    ],
                )?;
                let row: Option<(i64, i64, String, Option<String>)> = tx
                    .query_row(
                        "SELECT epoch, lease_expires_ms, state, lost_reason FROM nodes \
                         WHERE name = ?1",
                        [&n],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()?;
                tx.commit()?;
                Ok(match row {
                    Some((e, expires_ms, _, _)) if updated == 1 => Renewal::Renewed(Lease {
                        epoch: e,
                        expires_ms,
                    }),
                    Some((e, _, state, reason)) if state == "lost" => Renewal::Lost(format!(
                        "another node marked this node lost (epoch {e}): {}",
                        reason.unwrap_or_default()
                    )),
                    Some((e, _, _, _)) => Renewal::Lost(format!(
                        "the lease was taken with epoch {e} by another daemon"
                    )),
                    None => Renewal::Lost("the node's row is gone".into()),
                })
            })
            .await?;
        if let Renewal::Lost(_) = renewed {
            self.fence.set(FenceState::Lost { node });
        }
        Ok(renewed)
    }

    /// This daemon's node, once it has taken its lease.
    pub fn node_name(&self) -> Option<String> {
        self.fence.node()
    }

    pub async fn list_nodes(&self) -> Result<Vec<Node>> {
        self.call(|c| {
            c.query_map(
                &format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name"),
                [],
                node_from_row,
            )?
            .into_iter()
            .collect()
        })
        .await
    }

    pub async fn get_node(&self, name: &str) -> Result<Option<Node>> {
        let name = name.to_string();
        self.call(move |c| node_named(c, &name)).await
    }

    /// Drains (`true`) or undrains node `name`: a draining node takes no new sandboxes. A lost
    /// node stays `lost` (and comes back draining or ready as set here). `None`: no such node.
    pub async fn set_node_draining(&self, name: &str, draining: bool) -> Result<Option<Node>> {
        let name = name.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE nodes SET draining = ?2, \
                 drain_progress = CASE WHEN ?3 = 'draining' THEN drain_progress END, \
                 state = CASE WHEN state = 'lost' THEN 'lost' ELSE ?3 END WHERE name = ?1",
                params![
                    name,
                    i64::from(draining),
                    if draining { "draining" } else { "ready" }
                ],
            )?;
            node_named(c, &name)
        })
        .await
    }

    /// Whether this node is draining (then it takes no new sandboxes).
    pub async fn draining(&self) -> Result<bool> {
        let Some(node) = self.fence.node() else {
            return Ok(false);
        };
        self.call(move |c| {
            Ok(
                c.query_row("SELECT draining FROM nodes WHERE name = ?1", [&node], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
                    == Some(1),
            )
        })
        .await
    }

    /// Marks every other node whose lease has expired `lost`, and its sandboxes that were
    /// running (or on their way to or from it) `lost` with a reason, in one transaction
    /// fenced by this node's lease: of nodes sweeping at once, one does it. Suspended
    /// sandboxes stay as they are (their files are on the lost node). Returns the nodes
    /// marked lost and how many sandboxes each lost.
    pub async fn sweep_lost_nodes(&self) -> Result<Vec<(String, usize)>> {
        let fence = self.fence.clone();
        let me = self.fence.node();
        self.call(move |c| {
            let now = now_ms_sql(c.backend());
            let tx = c.transaction()?;
            fence.check(&tx)?;
            let t: i64 = tx.query_row(&format!("SELECT {now}"), [], |r| r.get(0))?;
            let expired: Vec<(String, i64)> = tx.query_map(
                "SELECT name, lease_expires_ms FROM nodes WHERE state <> 'lost' \
                 AND lease_expires_ms <= ?1 ORDER BY name",
                [t],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let mut out = Vec::new();
            for (name, expired_ms) in expired {
                if Some(&name) == me.as_ref() {
                    continue;
                }
                let reason = format!(
                    "node {name} stopped renewing its lease ({} ms ago)",
                    t - expired_ms
                );
                tx.execute(
                    "UPDATE nodes SET state = 'lost', lost_ms = ?2, lost_reason = ?3 \
                     WHERE name = ?1",
                    params![name, t, reason],
                )?;
                let n = tx.execute(
                    "UPDATE sandboxes SET state = 'lost', reason = ?2, updated_at = ?3 \
                     WHERE node = ?1 AND state IN ('creating', 'running', 'suspending', \
                     'resuming', 'deleting')",
                    params![
                        name,
                        format!("{reason}: the sandbox's VM ran there"),
                        t.div_euclid(1000)
                    ],
                )?;
                tx.execute("DELETE FROM pool_members WHERE node = ?1", [&name])?;
                out.push((name, n));
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{node_spec, off, open};

    fn spec(name: &str, holder: &str, lease_ms: i64) -> NodeSpec {
        NodeSpec {
            holder: holder.into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            lease_ms,
            ..node_spec(name)
        }
    }

    #[tokio::test]
    async fn leases_are_taken_renewed_and_fenced_by_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(&dir);
        // The same database, another daemon: a second handle with its own fence.
        let b = open(&dir);
        let lease = off(|| a.acquire_lease(&spec("n1", "home-a", 60_000)))
            .unwrap()
            .unwrap();
        assert_eq!(lease.epoch, 1);
        // Another home cannot take a live lease; it is told whose it is.
        let held = off(|| b.acquire_lease(&spec("n1", "home-b", 60_000)))
            .unwrap()
            .unwrap_err();
        assert!(held.contains("held by another daemon"), "{held}");
        assert!(held.contains("http://n1:7070"), "{held}");
        // The same home (a restart) takes it back at once with a new epoch; the old epoch's
        // handle is fenced out.
        let again = off(|| b.acquire_lease(&spec("n1", "home-a", 60_000)))
            .unwrap()
            .unwrap();
        assert_eq!(again.epoch, 2);
        let renewal = a.renew_lease(0, 0, 0).await.unwrap();
        assert!(
            matches!(&renewal, Renewal::Lost(m) if m.contains("epoch 2")),
            "{renewal:?}"
        );
        let e = a.with_conn(|c| a.fence.check(c)).unwrap_err();
        assert!(e.to_string().contains("does not hold its lease"), "{e}");
        b.with_conn(|c| b.fence.check(c)).unwrap();
        let Renewal::Renewed(r) = b.renew_lease(512, 2000, 3).await.unwrap() else {
            panic!("b holds the lease");
        };
        assert_eq!(r.epoch, 2);
        assert!(r.expires_ms >= again.expires_ms);
        let node = b.get_node("n1").await.unwrap().unwrap();
        assert_eq!(node.state, NodeState::Ready);
        assert_eq!((node.used.memory_mib, node.used.sandboxes), (512, 3));
        assert_eq!(node.used.vcpus, 2.0);
        assert_eq!(node.epoch, 2);
        assert_eq!(node.labels.get("zone").map(String::as_str), Some("a"));
    }

    #[tokio::test]
    async fn an_expired_lease_fences_its_node_once_another_node_marks_it_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open(&dir), open(&dir));
        off(|| a.acquire_lease(&spec("a", "home-a", 60_000)))
            .unwrap()
            .unwrap();
        off(|| b.acquire_lease(&spec("b", "home-b", 1500)))
            .unwrap()
            .unwrap();
        b.with_conn(|c| {
            c.execute_batch(
                "INSERT INTO sandbox_groups (name, spec, created_at, updated_at) \
                 VALUES ('g', '{}', 0, 0)",
            )
        })
        .unwrap();
        let mut row = crate::store::sandboxes::tests::new_row("sb-1", "g");
        row.state = crate::api::SandboxState::Running;
        b.insert_sandbox(&row).await.unwrap();
        let mut suspended = crate::store::sandboxes::tests::new_row("sb-2", "g");
        suspended.state = crate::api::SandboxState::Suspended;
        b.insert_sandbox(&suspended).await.unwrap();
        assert_eq!(
            b.get_sandbox("sb-1")
                .await
                .unwrap()
                .unwrap()
                .node
                .as_deref(),
            Some("b")
        );
        // b's lease runs out (b was slow) and nobody acts on it: nothing was decided against
        // b, so its writes and its late renewal go on.
        tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
        let mut late = crate::store::sandboxes::tests::new_row("sb-3", "g");
        late.state = crate::api::SandboxState::Running;
        b.insert_sandbox(&late).await.unwrap();
        let renewal = b.renew_lease(0, 0, 0).await.unwrap();
        assert!(matches!(renewal, Renewal::Renewed(_)), "{renewal:?}");
        assert!(a.sweep_lost_nodes().await.unwrap().is_empty());
        // It runs out again (b was stopped), and this time a marks it lost: b's next write is
        // refused.
        tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
        let swept = a.sweep_lost_nodes().await.unwrap();
        assert_eq!(swept, vec![("b".to_string(), 2)]);
        let e = b
            .set_sandbox_state("sb-1", crate::api::SandboxState::Failed, Some("x"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does not hold its lease"), "{e}");
        // Once is enough: another sweep finds nothing.
        assert!(a.sweep_lost_nodes().await.unwrap().is_empty());
        let lost = a.get_sandbox("sb-1").await.unwrap().unwrap();
        assert_eq!(lost.state, crate::api::SandboxState::Lost);
        assert!(lost.reason.unwrap().contains("node b stopped renewing"));
        let kept = a.get_sandbox("sb-2").await.unwrap().unwrap();
        assert_eq!(kept.state, crate::api::SandboxState::Suspended);
        let node = a.get_node("b").await.unwrap().unwrap();
        assert_eq!(node.state, NodeState::Lost);
        // b wakes up: its renewal says it was lost, and it re-acquires a new epoch; the
        // sandbox the others declared lost stays lost.
        let renewal = b.renew_lease(0, 0, 0).await.unwrap();
        assert!(
            matches!(&renewal, Renewal::Lost(m) if m.contains("marked this node lost")),
            "{renewal:?}"
        );
        let lease = off(|| b.acquire_lease(&spec("b", "home-b", 60_000)))
            .unwrap()
            .unwrap();
        assert_eq!(lease.epoch, 2);
        let e = b
            .set_sandbox_state("sb-1", crate::api::SandboxState::Running, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("lost"), "{e}");
        assert_eq!(
            a.get_sandbox("sb-1").await.unwrap().unwrap().state,
            crate::api::SandboxState::Lost
        );
        assert_eq!(
            a.get_node("b").await.unwrap().unwrap().state,
            NodeState::Ready
        );
        // A node does not sweep itself, and drain survives a loss.
        a.set_node_draining("b", true).await.unwrap().unwrap();
        assert_eq!(
            a.get_node("b").await.unwrap().unwrap().state,
            NodeState::Draining
        );
        assert!(b.draining().await.unwrap());
        a.set_node_draining("b", false).await.unwrap().unwrap();
        assert!(!b.draining().await.unwrap());
        assert!(a.set_node_draining("zz", true).await.unwrap().is_none());
    }
}
