//! Suspended sandboxes on shared storage (`moat serve --shared-dir`, docs/FLEET.md): where a
//! sandbox's suspend files are (`sandboxes.files`), which nodes can read the shared directory
//! (`nodes.shared_storage`), and the two ways a suspended sandbox's row moves to another node:
//! taken over from a lost node, or handed over by a draining one. Each move is one
//! transaction fenced by the lease of the node that writes it and conditional on the old
//! owner, so of two nodes that race for one sandbox exactly one wins.

use super::db::{params, OptionalExtension};
use super::sandboxes::get_sandbox;
use super::{now, Store};
use crate::api::Sandbox;
use crate::error::Result;

/// Where a sandbox's suspend files are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    /// In its node's MOAT_HOME: only that node can resume it.
    Local,
    /// In the fleet's shared directory: any node started with `--shared-dir` can.
    Shared,
}

impl Files {
    fn as_str(self) -> &'static str {
        match self {
            Files::Local => "local",
            Files::Shared => "shared",
        }
    }

    fn parse(s: &str) -> Files {
        match s {
            "shared" => Files::Shared,
            _ => Files::Local,
        }
    }
}

impl Store {
    /// Records whether this node has the shared directory (at its start, after its lease).
    pub async fn set_shared_storage(&self, shared: bool) -> Result<()> {
        let (fence, node) = (self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            tx.execute(
                "UPDATE nodes SET shared_storage = ?2 WHERE name = ?1",
                params![node, i64::from(shared)],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Records where the suspend files of this node's sandbox `id` are, fenced by its lease.
    pub async fn set_sandbox_files(&self, id: &str, files: Files) -> Result<()> {
        let id = id.to_string();
        let (fence, node) = (self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            tx.execute(
                "UPDATE sandboxes SET files = ?2 WHERE id = ?1 \
                 AND (CAST(?3 AS TEXT) IS NULL OR node = ?3)",
                params![id, files.as_str(), node],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Where the suspend files of sandbox `id` are; `None` if there is no such sandbox.
    pub async fn sandbox_files(&self, id: &str) -> Result<Option<Files>> {
        let id = id.to_string();
        self.call(move |c| {
            let files: Option<String> = c
                .query_row("SELECT files FROM sandboxes WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(files.as_deref().map(Files::parse))
        })
        .await
    }

    /// Records where the files of claimed snapshot `name` of `group` are (before they are
    /// written: a crash leaves its `.tmp-` directory there).
    pub async fn set_snapshot_files(&self, group: &str, name: &str, files: Files) -> Result<()> {
        let (g, n) = (group.to_string(), name.to_string());
        self.call(move |c| {
            c.execute(
                "UPDATE snapshots SET files = ?3 WHERE group_name = ?1 AND name = ?2",
                params![g, n, files.as_str()],
            )?;
            Ok(())
        })
        .await
    }

    /// Where the files of snapshot `name` of `group` are and the node that wrote them;
    /// `None` if there is no such snapshot.
    pub async fn snapshot_files(
        &self,
        group: &str,
        name: &str,
    ) -> Result<Option<(Files, Option<String>)>> {
        let (g, n) = (group.to_string(), name.to_string());
        self.call(move |c| {
            c.query_row(
                "SELECT files, node FROM snapshots WHERE group_name = ?1 AND name = ?2",
                [&g, &n],
                |r| Ok((Files::parse(&r.get::<_, String>(0)?), r.get(1)?)),
            )
            .optional()
            .map_err(Into::into)
        })
        .await
    }

    /// Moves suspended sandbox `id` to this node if its files are shared and its node is
    /// lost or no longer a node of the store, in one transaction fenced by this node's lease.
    /// The moved row, or `None` if it was not eligible (another node took it first, it was
    /// resumed or deleted, its files are local, its node is alive).
    pub async fn take_over_sandbox(&self, id: &str) -> Result<Option<Sandbox>> {
        let id = id.to_string();
        let (fence, node) = (self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            let n = tx.execute(
                "UPDATE sandboxes SET node = ?2, updated_at = ?3 WHERE id = ?1 \
                 AND state = 'suspended' AND files = 'shared' \
                 AND node IS NOT NULL AND node <> ?2 \
                 AND NOT EXISTS (SELECT 1 FROM nodes \
                                 WHERE nodes.name = sandboxes.node AND nodes.state <> 'lost')",
                params![id, node, now()],
            )?;
            let row = if n == 1 { get_sandbox(&tx, &id)? } else { None };
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    /// Hands this node's suspended sandbox `id`, whose files are shared, to node `to` if `to`
    /// is ready (not draining, not lost) and has the shared directory; fenced by this node's
    /// lease. Whether it moved.
    pub async fn hand_over_sandbox(&self, id: &str, to: &str) -> Result<bool> {
        let (id, to) = (id.to_string(), to.to_string());
        let (fence, node) = (self.fence.clone(), self.fence.node());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            let n = tx.execute(
                "UPDATE sandboxes SET node = ?2, updated_at = ?4 WHERE id = ?1 AND node = ?3 \
                 AND state = 'suspended' AND files = 'shared' \
                 AND EXISTS (SELECT 1 FROM nodes WHERE name = ?2 AND state = 'ready' \
                             AND shared_storage = 1)",
                params![id, to, node, now()],
            )?;
            tx.commit()?;
            Ok(n == 1)
        })
        .await
    }

    /// This node's suspended sandboxes whose files are shared (what a drain hands over).
    pub async fn suspended_shared(&self) -> Result<Vec<String>> {
        let node = self.fence.node();
        self.call(move |c| {
            c.query_map(
                "SELECT id FROM sandboxes WHERE node = ?1 AND state = 'suspended' \
                 AND files = 'shared' ORDER BY id",
                [&node],
                |r| r.get(0),
            )
            .map_err(Into::into)
        })
        .await
    }

    /// This node's suspended sandboxes whose files are on its own disk (what a drain sends
    /// to another node, `crate::transfer`).
    pub async fn suspended_local(&self) -> Result<Vec<String>> {
        let node = self.fence.node();
        self.call(move |c| {
            c.query_map(
                "SELECT id FROM sandboxes WHERE node = ?1 AND state = 'suspended' \
                 AND files = 'local' ORDER BY id",
                [&node],
                |r| r.get(0),
            )
            .map_err(Into::into)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SandboxState;
    use crate::store::nodes::NodeSpec;
    use crate::store::sandboxes::tests::new_row;
    use crate::store::tests::{node_spec, off, open};

    /// Three nodes on one database; c (short lease) has a suspended sandbox on shared
    /// storage `sb-s` and one on its own disk `sb-l`.
    async fn fleet(dir: &tempfile::TempDir) -> (Store, Store, Store) {
        let (a, b, c) = (open(dir), open(dir), open(dir));
        for (s, name, lease) in [(&a, "a", 60_000), (&b, "b", 60_000), (&c, "c", 1500)] {
            off(|| {
                s.acquire_lease(&NodeSpec {
                    lease_ms: lease,
                    ..node_spec(name)
                })
            })
            .unwrap()
            .unwrap();
        }
        c.with_conn(|db| {
            db.execute_batch(
                "INSERT INTO sandbox_groups (name, spec, created_at, updated_at) \
                 VALUES ('g', '{}', 0, 0)",
            )
        })
        .unwrap();
        for (id, files) in [("sb-s", Files::Shared), ("sb-l", Files::Local)] {
            let mut row = new_row(id, "g");
            row.state = SandboxState::Suspended;
            c.insert_sandbox(&row).await.unwrap();
            c.set_sandbox_files(id, files).await.unwrap();
        }
        (a, b, c)
    }

    #[tokio::test]
    async fn a_lost_nodes_shared_suspended_sandbox_is_taken_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = fleet(&dir).await;
        assert_eq!(a.sandbox_files("sb-s").await.unwrap(), Some(Files::Shared));
        assert_eq!(a.sandbox_files("sb-l").await.unwrap(), Some(Files::Local));
        assert_eq!(a.sandbox_files("sb-x").await.unwrap(), None);
        // c is alive: nobody takes its sandboxes.
        assert!(a.take_over_sandbox("sb-s").await.unwrap().is_none());
        tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
        assert_eq!(a.sweep_lost_nodes().await.unwrap(), vec![("c".into(), 0)]);
        // Local files stay where they are, whoever asks.
        assert!(a.take_over_sandbox("sb-l").await.unwrap().is_none());
        assert!(b.take_over_sandbox("sb-l").await.unwrap().is_none());
        let c_row = a.get_node("c").await.unwrap().unwrap();
        assert_eq!((c_row.suspended_local, c_row.shared_storage), (1, false));
        // a and b race for the shared one: exactly one wins, whatever the interleaving.
        let (ra, rb) = tokio::join!(a.take_over_sandbox("sb-s"), b.take_over_sandbox("sb-s"));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra.is_some() != rb.is_some(), "{ra:?} {rb:?}");
        let winner = if ra.is_some() { "a" } else { "b" };
        let row = a.get_sandbox("sb-s").await.unwrap().unwrap();
        assert_eq!(row.node.as_deref(), Some(winner));
        assert_eq!(row.state, SandboxState::Suspended);
        // Nor does the loser take it from the winner, who is alive.
        let (loser, winner_store) = if winner == "a" { (&b, &a) } else { (&a, &b) };
        assert!(loser.take_over_sandbox("sb-s").await.unwrap().is_none());
        // The winner owns it now: its state changes go through, c's would not.
        winner_store
            .set_sandbox_state("sb-s", SandboxState::Resuming, None)
            .await
            .unwrap();
        // c wakes up with a new epoch: it cannot take the sandbox back or change it.
        off(|| c.acquire_lease(&node_spec("c"))).unwrap().unwrap();
        assert!(c.take_over_sandbox("sb-s").await.unwrap().is_none());
        assert!(c
            .set_sandbox_state("sb-s", SandboxState::Suspended, None)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_fenced_out_node_takes_nothing_over() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _b, c) = fleet(&dir).await;
        tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
        a.sweep_lost_nodes().await.unwrap();
        // a's own lease is taken by a restart of its home (epoch 2): the old handle is fenced.
        let a2 = open(&dir);
        off(|| a2.acquire_lease(&node_spec("a"))).unwrap().unwrap();
        let e = a.take_over_sandbox("sb-s").await.unwrap_err();
        assert!(e.to_string().contains("does not hold its lease"), "{e}");
        assert_eq!(
            c.get_sandbox("sb-s")
                .await
                .unwrap()
                .unwrap()
                .node
                .as_deref(),
            Some("c")
        );
        assert!(a2.take_over_sandbox("sb-s").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_drain_hands_shared_suspended_sandboxes_to_ready_nodes_with_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = fleet(&dir).await;
        // Neither a nor b said it has the shared directory yet.
        assert!(!c.hand_over_sandbox("sb-s", "a").await.unwrap());
        a.set_shared_storage(true).await.unwrap();
        b.set_shared_storage(true).await.unwrap();
        c.set_shared_storage(true).await.unwrap();
        b.set_node_draining("b", true).await.unwrap();
        assert_eq!(
            c.suspended_shared().await.unwrap(),
            vec!["sb-s".to_string()]
        );
        // Not to a draining node, never a local one, and only the owner hands over.
        assert!(!c.hand_over_sandbox("sb-s", "b").await.unwrap());
        assert!(!c.hand_over_sandbox("sb-l", "a").await.unwrap());
        assert!(!b.hand_over_sandbox("sb-s", "a").await.unwrap());
        assert!(c.hand_over_sandbox("sb-s", "a").await.unwrap());
        let row = a.get_sandbox("sb-s").await.unwrap().unwrap();
        assert_eq!(row.node.as_deref(), Some("a"));
        assert!(c.suspended_shared().await.unwrap().is_empty());
        let c_row = a.get_node("c").await.unwrap().unwrap();
        assert_eq!((c_row.suspended_local, c_row.shared_storage), (1, true));
    }
}
