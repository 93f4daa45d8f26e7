//! Placement (docs/FLEET.md, "Placement"): what each node holds as the store counts it, the
//! nodes that may take a new sandbox of a group ranked by the group's strategy, and the
//! admission check that the insert of a sandbox row makes on its node in the same fenced
//! transaction, so that two creates placed at once on one node never overcommit it.
//!
//! The store counts tier memory, from the rows themselves (each node's sandboxes that have a
//! VM and its warm-pool VMs), never from the use a node last reported: a row is in the count
//! the moment its transaction commits. vCPUs are left to the chosen node's own check
//! (`capacity.rs`), the only one that knows which of its VMs are parked and hold no CPU share.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::db::{params, Db};
use super::nodes::{node_from_row, now_ms_sql, NODE_COLUMNS};
use super::Store;
use crate::api::{quote, Node, NodeState, PlacementSpec, PlacementStrategy, Tier};
use crate::error::{Error, Result};

/// Sandbox states in which the VM exists on its node (or is being made) and holds its tier.
const HOLDING: &str = "('creating', 'running', 'suspending', 'resuming', 'deleting')";

/// What a node holds, as the store counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub memory_mib: u64,
    /// Sandboxes with a VM and warm-pool VMs.
    pub vms: u64,
}

/// A node that may take the sandbox, with what it holds and its ready pool VMs of the group.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub node: Node,
    /// As the store counts it, plus the creates this daemon has placed there in flight.
    pub held: Held,
    pub pooled: u64,
    /// Whether its lease is unexpired by the database's clock. A node renews late under load
    /// and is fenced only once another node acts on it (marks it lost), so one that has not
    /// renewed yet is tried last, not left out: in a fleet of one it is the only node.
    pub current: bool,
}

/// Tier memory (MiB) of the creates this daemon has placed on each node and not yet seen
/// answered. Ranking counts it as held, so that creates placed at the same moment (their rows
/// not yet inserted) spread instead of all taking the node that looked emptiest; room is
/// still decided by the rows alone, as a placed create may yet fail.
#[derive(Debug, Default)]
pub(crate) struct InFlight(Mutex<HashMap<String, u64>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A create placed on a node, counted by [`InFlight`] until dropped.
#[derive(Debug)]
pub struct Placing {
    flight: Arc<InFlight>,
    node: String,
    mib: u64,
}

impl Drop for Placing {
    fn drop(&mut self) {
        let mut m = self.flight.lock();
        if let Some(v) = m.get_mut(&self.node) {
            *v = v.saturating_sub(self.mib);
            if *v == 0 {
                m.remove(&self.node);
            }
        }
    }
}

/// The held memory and VMs of each node (of `node` only, when given).
fn held(c: &Db, node: Option<&str>) -> Result<HashMap<String, Held>> {
    let rows = c.query_map(
        &format!(
            "SELECT node, tier, COUNT(*) FROM sandboxes WHERE node IS NOT NULL \
             AND state IN {HOLDING} AND (CAST(?1 AS TEXT) IS NULL OR node = ?1) \
             GROUP BY node, tier \
             UNION ALL SELECT node, tier, COUNT(*) FROM pool_members WHERE node IS NOT NULL \
             AND (CAST(?1 AS TEXT) IS NULL OR node = ?1) GROUP BY node, tier"
        ),
        params![node],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        },
    )?;
    let mut out: HashMap<String, Held> = HashMap::new();
    for (node, tier, n) in rows {
        let tier: Tier = tier
            .parse()
            .map_err(|_| Error::Internal(format!("stored tier {tier:?} is unknown")))?;
        let h = out.entry(node).or_default();
        h.memory_mib += u64::from(tier.mem_mib()) * n as u64;
        h.vms += n as u64;
    }
    Ok(out)
}

/// Refuses (429) a new VM of `tier` on `node` unless its tier memory still has room, counted
/// in the transaction `tx` that then inserts the VM's row: on PostgreSQL (SERIALIZABLE) two
/// such transactions for one node conflict and one is retried, seeing the other's row.
pub(super) fn admit(tx: &Db, node: &str, tier: Tier) -> Result<()> {
    let capacity: i64 = tx.query_row(
        "SELECT memory_mib FROM nodes WHERE name = ?1",
        [node],
        |r| r.get(0),
    )?;
    let capacity = capacity as u64;
    let h = held(tx, Some(node))?.remove(node).unwrap_or_default();
    let need = u64::from(tier.mem_mib());
    if h.memory_mib + need > capacity {
        return Err(Error::TooManyRequests(format!(
            "node {node} is full: a tier {} sandbox needs {need} MiB of memory, but only {} of \
             its {capacity} MiB are free ({} MiB held by {} running, starting or pooled VMs). \
             Suspend or delete sandboxes, shrink a pool, or retry later",
            tier.as_str(),
            capacity.saturating_sub(h.memory_mib),
            h.memory_mib,
            h.vms
        )));
    }
    Ok(())
}

/// `labels` as `k=v,k=v`.
fn show(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `a` should come before `b`: more ready pool VMs first, then by `strategy` on the
/// share of memory held, then the receiving node `me` (no hop), then by name; nodes whose
/// lease is current before all of those.
fn better(
    a: &Candidate,
    b: &Candidate,
    strategy: PlacementStrategy,
    me: &str,
) -> std::cmp::Ordering {
    // held_a / cap_a against held_b / cap_b, without floats.
    let share = |c: &Candidate| {
        (
            u128::from(c.held.memory_mib),
            u128::from(c.node.capacity.memory_mib.max(1)),
        )
    };
    let ((ha, ca), (hb, cb)) = (share(a), share(b));
    let by_share = (ha * cb).cmp(&(hb * ca));
    let by_share = match strategy {
        PlacementStrategy::Spread => by_share,
        PlacementStrategy::Pack => by_share.reverse(),
    };
    b.current
        .cmp(&a.current)
        .then(b.pooled.cmp(&a.pooled))
        .then(by_share)
        .then((b.node.name == me).cmp(&(a.node.name == me)))
        .then(a.node.name.cmp(&b.node.name))
}

impl Store {
    /// Counts a create of `tier` placed on `node` until the guard is dropped (its answer
    /// came).
    pub fn placing(&self, node: &str, tier: Tier) -> Placing {
        let mib = u64::from(tier.mem_mib());
        *self.placing.lock().entry(node.to_string()).or_default() += mib;
        Placing {
            flight: self.placing.clone(),
            node: node.to_string(),
            mib,
        }
    }

    /// The nodes that may take a new tier `tier` sandbox of group `group` placed by `spec`,
    /// received by node `me`: ready (not draining, not lost; one whose lease is not current
    /// is tried last), with every
    /// label of `spec.node_labels`, and room for the tier's memory. `pooled`: prefer nodes
    /// with ready pool VMs of the group and this tier (the create asks for the group's image
    /// and tier). Best first; 503 naming the constraint and each node's reason when no node
    /// may run it, 429 naming each node's room when those that may are full (a node's own
    /// check would refuse too: it counts the same VMs). The first is counted as placing
    /// (the guard) from the moment it is ranked first, so that the next create's ranking
    /// sees it.
    pub async fn placement(
        &self,
        group: &str,
        spec: &PlacementSpec,
        tier: Tier,
        pooled: bool,
        me: &str,
    ) -> Result<(Vec<Candidate>, Placing)> {
        let (group, s) = (group.to_string(), spec.clone());
        let mut fits = self
            .call(move |c| fits(c, &group, &s, tier, pooled))
            .await?;
        // Ranked and counted under one lock: two creates ranked at once see each other.
        let mut flying = self.placing.lock();
        for c in &mut fits {
            c.held.memory_mib += flying.get(&c.node.name).copied().unwrap_or(0);
        }
        fits.sort_by(|a, b| better(a, b, spec.strategy, me));
        let first = &fits[0].node.name;
        let mib = u64::from(tier.mem_mib());
        *flying.entry(first.clone()).or_default() += mib;
        drop(flying);
        let placing = Placing {
            flight: self.placing.clone(),
            node: first.clone(),
            mib,
        };
        Ok((fits, placing))
    }
}

impl Store {
    /// Where a draining node `me` moves sandbox `sb` (a live migration, or the hand-over of a
    /// suspended one): the best node placement ranks for a new sandbox of its group and tier
    /// (the group's `placement.node_labels`, room counted in the store, spread or pack), other
    /// than `me`, that `usable` accepts (the same accelerator; the shared storage). 503 saying
    /// why when there is none, so a drain never moves a sandbox where its group may not run.
    pub async fn destination(
        &self,
        sb: &crate::api::Sandbox,
        me: &str,
        usable: impl Fn(&Node) -> bool,
    ) -> Result<Node> {
        let group = self
            .get_group(&sb.group)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no group {}", quote(&sb.group))))?;
        let (ranked, _placing) = self
            .placement(&group.name, &group.spec.placement, sb.tier, false, me)
            .await?;
        ranked
            .into_iter()
            .map(|c| c.node)
            .find(|n| n.name != me && usable(n))
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "no other node may take sandbox {} of group {}: none of those its \
                     placement allows (ready, with its labels and room) can receive it here",
                    sb.id,
                    quote(&group.name)
                ))
            })
    }
}

/// The nodes that may take the sandbox (see [`Store::placement`]), unranked.
fn fits(
    c: &Db,
    group: &str,
    spec: &PlacementSpec,
    tier: Tier,
    pooled: bool,
) -> Result<Vec<Candidate>> {
    let now = now_ms_sql(c.backend());
    let tx = c.transaction()?;
    let rows = tx.query_map(
        &format!(
            "SELECT {NODE_COLUMNS}, CASE WHEN lease_expires_ms > {now} THEN 1 ELSE 0 END \
                     FROM nodes ORDER BY name"
        ),
        [],
        // The lease's currency comes after the node's own columns.
        |r| {
            let current = r.get::<_, i64>(NODE_COLUMNS.split(',').count())?;
            Ok((node_from_row(r)?, current == 1))
        },
    )?;
    let mut held = held(&tx, None)?;
    let ready: HashMap<String, i64> = if pooled {
        tx.query_map(
            "SELECT node, COUNT(*) FROM pool_members WHERE node IS NOT NULL \
                     AND group_name = ?1 AND tier = ?2 GROUP BY node",
            params![group, tier.as_str()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )?
        .into_iter()
        .collect()
    } else {
        HashMap::new()
    };
    tx.commit()?;
    let need = u64::from(tier.mem_mib());
    let (mut fits, mut full, mut why_not, mut labelled) = (vec![], vec![], vec![], 0);
    for (node, current) in rows {
        let node = node?;
        if !spec
            .node_labels
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
        {
            continue;
        }
        labelled += 1;
        // Node names are plain (`moat serve --node-name`: lowercase, digits, '-').
        let name = node.name.clone();
        match node.state {
            NodeState::Lost => why_not.push(format!("node {name} is lost")),
            NodeState::Draining => why_not.push(format!("node {name} is draining")),
            NodeState::Ready => {
                let h = held.remove(&node.name).unwrap_or_default();
                let cap = node.capacity.memory_mib;
                if h.memory_mib + need > cap {
                    full.push(format!(
                        "node {name} has {} of its {cap} MiB free",
                        cap.saturating_sub(h.memory_mib)
                    ));
                } else {
                    fits.push(Candidate {
                        pooled: ready.get(&node.name).copied().unwrap_or(0) as u64,
                        current,
                        node,
                        held: h,
                    });
                }
            }
        }
    }
    let constraint = if spec.node_labels.is_empty() {
        String::new()
    } else {
        format!(" (its placement.node_labels: {})", show(&spec.node_labels))
    };
    if labelled == 0 {
        return Err(Error::Unavailable(format!(
            "no node can run a sandbox of group {}: no node of the fleet has the \
                     labels {}{constraint}. Give a node those labels (moat serve \
                     --node-label), or change the group's placement",
            quote(group),
            show(&spec.node_labels)
        )));
    }
    if fits.is_empty() && full.is_empty() {
        return Err(Error::Unavailable(format!(
            "no node can take a sandbox of group {}{constraint} now: {}",
            quote(group),
            why_not.join("; ")
        )));
    }
    if fits.is_empty() {
        why_not.extend(full);
        return Err(Error::TooManyRequests(format!(
            "the fleet is full for group {}{constraint}: a tier {} sandbox needs {need} \
                     MiB of memory, and {}. Suspend or delete sandboxes, shrink a pool, or \
                     retry later",
            quote(group),
            tier.as_str(),
            why_not.join("; ")
        )));
    }
    Ok(fits)
}

/// Where an image a node lacks came from: the registry source of a succeeded import on some
/// node, and the name and digest it gave.
#[derive(Debug, Clone)]
pub struct ImportedImage {
    pub request: crate::api::ImportImage,
    pub name: String,
    pub digest: String,
}

impl Store {
    /// The newest succeeded import by another node of the image named `r` or of digest `r`.
    /// This node's own imports are left out: an image it had and deleted stays deleted here.
    pub async fn imported_image(&self, r: &str) -> Result<Option<ImportedImage>> {
        let Some(me) = self.fence.node() else {
            return Ok(None);
        };
        let r = r.to_string();
        self.call(move |c| {
            let rows = c.query_map(
                "SELECT request, result FROM operations WHERE kind = 'image-import' \
                 AND state = 'succeeded' AND result IS NOT NULL AND node IS NOT NULL \
                 AND node <> ?1 ORDER BY updated_at DESC",
                [&me],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)),
            )?;
            for (request, result) in rows {
                let (Ok(request), Ok(image)) = (
                    serde_json::from_str::<crate::api::ImportImage>(&request),
                    serde_json::from_str::<crate::api::Image>(&result),
                ) else {
                    continue;
                };
                if image.name == r || image.digest == r {
                    return Ok(Some(ImportedImage {
                        request,
                        name: image.name,
                        digest: image.digest,
                    }));
                }
            }
            Ok(None)
        })
        .await
    }
}

/// The nodes that keep warm pools, by name: ready (not draining, not lost), and their labels.
/// A lease renewed late does not count (only a loss, once another node marks it, does), so
/// that a node slow to renew under load does not empty and refill its pools.
#[derive(Debug, Clone, Default)]
pub struct PoolNodes(Vec<(String, BTreeMap<String, String>)>);

impl PoolNodes {
    /// This node's share of a pool of `size` VMs for a group placed by `spec`: the pool is
    /// split evenly over the nodes that keep pools and have the group's labels, in the order
    /// of their names, the first `size % n` of them keeping one more. A node that is not one
    /// of them keeps none; a store with no node (`me` `None`) keeps the whole pool. When a
    /// node drains or is lost, the others' shares grow at their next look (a lifecycle tick).
    pub fn share(&self, size: u32, spec: &PlacementSpec, me: Option<&str>) -> usize {
        let Some(me) = me else {
            return size as usize;
        };
        let eligible: Vec<&str> = self
            .0
            .iter()
            .filter(|(_, labels)| {
                spec.node_labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let Some(i) = eligible.iter().position(|n| *n == me) else {
            return 0;
        };
        let (n, size) = (eligible.len(), size as usize);
        size / n + usize::from(i < size % n)
    }
}

impl Store {
    /// The nodes that keep warm pools now (see [`PoolNodes::share`]).
    pub async fn pool_nodes(&self) -> Result<PoolNodes> {
        self.call(|c| {
            let rows = c.query_map(
                "SELECT name, labels FROM nodes WHERE state = 'ready' ORDER BY name",
                [],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )?;
            let mut out = Vec::new();
            for (name, labels) in rows {
                let labels = serde_json::from_str(&labels)
                    .map_err(|e| Error::Internal(format!("stored labels of node {name}: {e}")))?;
                out.push((name, labels));
            }
            Ok(PoolNodes(out))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::nodes::NodeSpec;
    use crate::store::tests::{node_spec, off, open};

    fn spec(name: &str, memory_mib: u64, zone: &str) -> NodeSpec {
        NodeSpec {
            labels: [("zone".to_string(), zone.to_string())].into(),
            memory_mib,
            ..node_spec(name)
        }
    }

    fn group(s: &Store) {
        s.with_conn(|c| {
            c.execute_batch(
                "INSERT INTO sandbox_groups (name, spec, created_at, updated_at) \
                 VALUES ('g', '{}', 0, 0)",
            )
        })
        .unwrap();
    }

    fn running(id: &str) -> crate::api::Sandbox {
        let mut row = crate::store::sandboxes::tests::new_row(id, "g");
        row.state = crate::api::SandboxState::Running;
        row.tier = Tier::Xs;
        row
    }

    fn names((p, _): (Vec<Candidate>, Placing)) -> Vec<String> {
        p.into_iter().map(|c| c.node.name).collect()
    }

    /// Many creates at once on one node, each through its own connection: the store admits
    /// exactly as many as its memory holds (PostgreSQL: SERIALIZABLE conflicts, retried;
    /// SQLite: one writer).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_creates_never_overcommit_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut stores: Vec<Store> = (0..6).map(|_| open(&dir)).collect();
        off(|| stores[0].acquire_lease(&spec("n", 1536, "x")))
            .unwrap()
            .unwrap();
        group(&stores[0]);
        // Six connections of node n (its lease and epoch), as six requests of a daemon with
        // a pool of connections would be; three xs VMs fit in its 1536 MiB.
        let fence = stores[0].fence.clone();
        for s in &mut stores[1..] {
            s.fence = fence.clone();
        }
        let tries = stores.iter().enumerate().map(|(i, s)| {
            let s = s.clone();
            tokio::spawn(async move { s.insert_sandbox(&running(&format!("sb-{i}"))).await })
        });
        let results = futures_util::future::join_all(tries).await;
        let (ok, refused): (Vec<_>, Vec<_>) = results
            .into_iter()
            .map(|r| r.unwrap())
            .partition(|r| r.is_ok());
        assert_eq!((ok.len(), refused.len()), (3, 3));
        for r in refused {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::TooManyRequests(_)), "{e}");
            assert!(e.to_string().contains("node n is full"), "{e}");
        }
        let h = stores[0]
            .with_conn(|c| held(c, Some("n")))
            .unwrap()
            .remove("n")
            .unwrap();
        assert_eq!(
            h,
            Held {
                memory_mib: 1536,
                vms: 3
            }
        );
    }

    /// A drain moves a sandbox only where placement would put a new one of its group: never
    /// the draining node itself, never a node without the group's labels.
    #[tokio::test]
    async fn a_drain_destination_honours_the_groups_placement() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (open(&dir), open(&dir), open(&dir));
        for (s, sp) in [
            (&a, spec("a", 2048, "x")),
            (&b, spec("b", 4096, "y")),
            (&c, spec("c", 1024, "x")),
        ] {
            off(|| s.acquire_lease(&sp)).unwrap().unwrap();
        }
        group(&a);
        a.with_conn(|c| {
            c.execute_batch(
                "UPDATE sandbox_groups SET spec = \
                 '{\"placement\": {\"node_labels\": {\"zone\": \"x\"}}}' WHERE name = 'g'",
            )
        })
        .unwrap();
        a.set_node_draining("a", true).await.unwrap().unwrap();
        let sb = running("sb-1");
        // b is the emptiest, but only a and c have zone=x, and a drains.
        assert_eq!(a.destination(&sb, "a", |_| true).await.unwrap().name, "c");
        let e = a
            .destination(&sb, "a", |n| n.name != "c")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no other node may take sandbox sb-1"), "{e}");
    }

    #[tokio::test]
    async fn nodes_are_ranked_by_labels_room_pool_and_strategy() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (open(&dir), open(&dir), open(&dir));
        for (s, sp) in [
            (&a, spec("a", 2048, "x")),
            (&b, spec("b", 1536, "x")),
            (&c, spec("c", 1024, "y")),
        ] {
            off(|| s.acquire_lease(&sp)).unwrap().unwrap();
        }
        group(&a);
        let any = PlacementSpec::default();
        let pack = PlacementSpec {
            strategy: PlacementStrategy::Pack,
            ..Default::default()
        };
        let zone = |z: &str| PlacementSpec {
            node_labels: [("zone".to_string(), z.to_string())].into(),
            ..Default::default()
        };
        // All empty: the receiving node first, then by name.
        let p = a.placement("g", &any, Tier::Xs, true, "b").await.unwrap();
        assert_eq!(names(p), ["b", "a", "c"]);
        // A create b has placed on itself and not yet inserted moves the next one on; it
        // stops counting once answered.
        let placing = b.placing("b", Tier::Xs);
        let p = b.placement("g", &any, Tier::Xs, true, "b").await.unwrap();
        assert_eq!(names(p), ["a", "c", "b"]);
        drop(placing);
        let p = b.placement("g", &any, Tier::Xs, true, "b").await.unwrap();
        assert_eq!(names(p), ["b", "a", "c"]);
        // One xs on a (a quarter of it) and one on b (a third): spread goes to c, then a.
        a.insert_sandbox(&running("sb-a")).await.unwrap();
        b.insert_sandbox(&running("sb-b")).await.unwrap();
        let p = a.placement("g", &any, Tier::Xs, true, "b").await.unwrap();
        assert_eq!(names(p), ["c", "a", "b"]);
        // Pack: the fullest that still has room.
        let p = a.placement("g", &pack, Tier::Xs, true, "a").await.unwrap();
        assert_eq!(names(p), ["b", "a", "c"]);
        // Labels keep the group on matching nodes.
        let p = a.placement("g", &zone("y"), Tier::Xs, true, "a").await;
        assert_eq!(names(p.unwrap()), ["c"]);
        let e = a
            .placement("g", &zone("z"), Tier::Xs, true, "a")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("labels zone=z"), "{e}");
        // A ready pool VM of the group on b comes first, whatever the strategy.
        b.insert_pool_member(&crate::store::pool::PoolMember {
            id: "sb-p".into(),
            group: "g".into(),
            image: "sha256:x".into(),
            tier: Tier::Xs,
        })
        .await
        .unwrap();
        let p = a.placement("g", &any, Tier::Xs, true, "a").await.unwrap();
        assert_eq!(names(p), ["b", "c", "a"]);
        // Not for another tier (and b, at 1024 of 1536 MiB, has no room for an s).
        let p = a.placement("g", &any, Tier::S, true, "a").await.unwrap();
        assert_eq!(names(p), ["c", "a"]);
        // A draining node gets nothing; a group only it may run is told so.
        a.set_node_draining("c", true).await.unwrap().unwrap();
        let e = a
            .placement("g", &zone("y"), Tier::Xs, true, "a")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("node c is draining"), "{e}");
        // Full everywhere the group may run: 429 with each node's room.
        for i in 0..3 {
            a.insert_sandbox(&running(&format!("sb-a{i}")))
                .await
                .unwrap();
        }
        b.insert_sandbox(&running("sb-b1")).await.unwrap();
        let e = b.insert_sandbox(&running("sb-b2")).await.unwrap_err();
        assert!(matches!(e, Error::TooManyRequests(_)), "{e}");
        let p = a.placement("g", &zone("x"), Tier::Xs, true, "a").await;
        let e = p.unwrap_err();
        assert!(matches!(e, Error::TooManyRequests(_)), "{e}");
        assert!(
            e.to_string().contains("node a has 0 of its 2048 MiB free"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_pool_is_split_over_the_nodes_that_may_run_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (open(&dir), open(&dir), open(&dir));
        for (s, sp) in [
            (&a, spec("a", 2048, "x")),
            (&b, spec("b", 1536, "x")),
            (&c, spec("c", 1024, "y")),
        ] {
            off(|| s.acquire_lease(&sp)).unwrap().unwrap();
        }
        let any = PlacementSpec::default();
        let x = PlacementSpec {
            node_labels: [("zone".to_string(), "x".to_string())].into(),
            ..Default::default()
        };
        let shares = |nodes: &PoolNodes, size, spec: &PlacementSpec| -> Vec<usize> {
            ["a", "b", "c"]
                .iter()
                .map(|n| nodes.share(size, spec, Some(n)))
                .collect()
        };
        let nodes = a.pool_nodes().await.unwrap();
        assert_eq!(shares(&nodes, 7, &any), [3, 2, 2]);
        assert_eq!(shares(&nodes, 1, &any), [1, 0, 0]);
        assert_eq!(shares(&nodes, 7, &x), [4, 3, 0]);
        assert_eq!(nodes.share(7, &any, None), 7);
        // b drains: a and c take its share over.
        a.set_node_draining("b", true).await.unwrap().unwrap();
        let nodes = a.pool_nodes().await.unwrap();
        assert_eq!(shares(&nodes, 7, &any), [4, 0, 3]);
        assert_eq!(shares(&nodes, 7, &x), [7, 0, 0]);
    }

    /// A node that has not renewed its lease in time (late under load, not yet marked lost)
    /// is tried last but still tried, and keeps its pool share.
    #[tokio::test]
    async fn a_node_late_to_renew_is_tried_last_and_keeps_its_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (a, z) = (open(&dir), open(&dir));
        off(|| a.acquire_lease(&spec("a", 1024, "x")))
            .unwrap()
            .unwrap();
        let late = NodeSpec {
            lease_ms: 1,
            ..spec("z", 4096, "x")
        };
        off(|| z.acquire_lease(&late)).unwrap().unwrap();
        group(&a);
        a.insert_sandbox(&running("sb-a")).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // z is emptier and receives the create, yet a, whose lease is current, comes first.
        let p = z
            .placement("g", &PlacementSpec::default(), Tier::Xs, false, "z")
            .await
            .unwrap();
        assert_eq!(names(p), ["a", "z"]);
        let nodes = a.pool_nodes().await.unwrap();
        let any = PlacementSpec::default();
        assert_eq!(
            [
                nodes.share(3, &any, Some("a")),
                nodes.share(3, &any, Some("z"))
            ],
            [2, 1]
        );
    }
}
