//! The `handovers` table: a running sandbox on its way from one node to another by live
//! migration (docs/FLEET.md, "Live migration between nodes"). The source records the
//! hand-over before it sends anything; the destination moves the row to itself only in the
//! transaction that deletes that record, checked against both nodes' leases; whichever side
//! gives up deletes the record first ([`Store::cancel_handover`]), after which the hand-over
//! can no longer happen, so the source may continue its VM.

use super::db::{params, OptionalExtension};
use super::nodes::now_ms_sql;
use super::{now, Store};
use crate::api::{quote, DrainProgress, Sandbox};
use crate::error::{Error, Result};

impl Store {
    /// Records that this node is handing running sandbox `id` over to node `to`, fenced by
    /// its lease (a record of an earlier attempt is replaced).
    pub async fn begin_handover(&self, id: &str, to: &str) -> Result<()> {
        self.begin_handover_in(id, to, "running").await
    }

    /// [`Store::begin_handover`] of a suspended sandbox whose files this node sends
    /// (`crate::transfer`).
    pub async fn begin_file_handover(&self, id: &str, to: &str) -> Result<()> {
        self.begin_handover_in(id, to, "suspended").await
    }

    async fn begin_handover_in(&self, id: &str, to: &str, state: &'static str) -> Result<()> {
        let fence = self.fence.clone();
        let Some((me, epoch)) = self.fence.held() else {
            return Err(Error::Unavailable(
                "this daemon does not hold a node lease: it cannot hand sandboxes over".into(),
            ));
        };
        let (id, to) = (id.to_string(), to.to_string());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            let owned: i64 = tx.query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE id = ?1 AND node = ?2 AND state = ?3",
                params![id, me, state],
                |r| r.get(0),
            )?;
            if owned != 1 {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is not a {state} sandbox of node {}",
                    quote(&me)
                )));
            }
            let now = now_ms_sql(tx.backend());
            tx.execute(
                &format!(
                    "INSERT INTO handovers (sandbox_id, from_node, from_epoch, to_node, \
                     created_ms) VALUES (?1, ?2, ?3, ?4, {now}) ON CONFLICT (sandbox_id) DO \
                     UPDATE SET from_node = excluded.from_node, from_epoch = \
                     excluded.from_epoch, to_node = excluded.to_node, created_ms = \
                     excluded.created_ms"
                ),
                params![id, me, epoch, to],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// The hand-over itself, on the destination: sandbox `id`'s row moves from node `from` to
    /// this node, in one transaction that checks this node's lease (its fence), that `from`
    /// still holds the lease of the epoch it recorded the hand-over with (not lost, not
    /// expired by the database's clock), that the record is still there (neither side gave
    /// up), and that the sandbox is still `from`'s and running. Returns the moved row.
    pub async fn complete_handover(&self, id: &str, from: &str) -> Result<Sandbox> {
        self.complete_handover_in(id, from, "running").await
    }

    /// [`Store::complete_handover`] of a suspended sandbox whose files this node received
    /// (and holds, complete and checked): its files are then this node's own (`local`).
    pub async fn complete_file_handover(&self, id: &str, from: &str) -> Result<Sandbox> {
        self.complete_handover_in(id, from, "suspended").await
    }

    async fn complete_handover_in(
        &self,
        id: &str,
        from: &str,
        state: &'static str,
    ) -> Result<Sandbox> {
        let fence = self.fence.clone();
        let Some(me) = self.fence.node() else {
            return Err(Error::Unavailable(
                "this daemon does not hold a node lease: it cannot take sandboxes over".into(),
            ));
        };
        let (id, from) = (id.to_string(), from.to_string());
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            let record: Option<i64> = tx
                .query_row(
                    "SELECT from_epoch FROM handovers WHERE sandbox_id = ?1 \
                     AND from_node = ?2 AND to_node = ?3",
                    params![id, from, me],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(epoch) = record else {
                return Err(Error::Conflict(format!(
                    "no hand-over of sandbox {id} from node {} to node {} is pending (the \
                     migration was given up)",
                    quote(&from),
                    quote(&me)
                )));
            };
            let clock = now_ms_sql(tx.backend());
            let current: i64 = tx.query_row(
                &format!(
                    "SELECT COUNT(*) FROM nodes WHERE name = ?1 AND epoch = ?2 \
                     AND state <> 'lost' AND lease_expires_ms > {clock}"
                ),
                params![from, epoch],
                |r| r.get(0),
            )?;
            if current != 1 {
                return Err(Error::Unavailable(format!(
                    "node {} no longer holds the lease of epoch {epoch} it began the \
                     hand-over of sandbox {id} with",
                    quote(&from)
                )));
            }
            let moved = tx.execute(
                "UPDATE sandboxes SET node = ?3, updated_at = ?4, \
                 files = CASE WHEN state = 'suspended' THEN 'local' ELSE files END \
                 WHERE id = ?1 AND node = ?2 AND state = ?5",
                params![id, from, me, now(), state],
            )?;
            if moved != 1 {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is no longer a {state} sandbox of node {}",
                    quote(&from)
                )));
            }
            tx.execute("DELETE FROM handovers WHERE sandbox_id = ?1", [&id])?;
            let row = super::sandboxes::get_sandbox(&tx, &id)?
                .ok_or_else(|| Error::SandboxGone(id.clone()))?;
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    /// Whether a hand-over of sandbox `id` from node `from` to node `to` is recorded.
    pub async fn handover_pending(&self, id: &str, from: &str, to: &str) -> Result<bool> {
        let (id, from, to) = (id.to_string(), from.to_string(), to.to_string());
        self.call(move |c| {
            let n: i64 = c.query_row(
                "SELECT COUNT(*) FROM handovers WHERE sandbox_id = ?1 AND from_node = ?2 \
                 AND to_node = ?3",
                params![id, from, to],
                |r| r.get(0),
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Gives up the hand-over of sandbox `id` (either side): true if the record was there,
    /// false if it was gone (the hand-over happened, or someone gave up first). Once this has
    /// returned, [`Store::complete_handover`] of it fails. Not fenced: giving up only ever
    /// makes a hand-over impossible, which is safe whoever asks.
    pub async fn cancel_handover(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.call(move |c| {
            Ok(c.execute("DELETE FROM handovers WHERE sandbox_id = ?1", [&id])? == 1)
        })
        .await
    }

    /// Records this node's drain progress (`None` to clear it) while it is draining (an
    /// undrain clears it, and a move that ends after it must not bring it back), fenced by
    /// its lease.
    pub async fn set_drain_progress(&self, progress: Option<&DrainProgress>) -> Result<()> {
        let fence = self.fence.clone();
        let Some(me) = self.fence.node() else {
            return Ok(());
        };
        let json = progress
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::Internal(format!("drain progress: {e}")))?;
        self.call(move |c| {
            let tx = c.transaction()?;
            fence.check(&tx)?;
            tx.execute(
                "UPDATE nodes SET drain_progress = ?2 WHERE name = ?1 AND draining = 1",
                params![me, json],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::api::SandboxState;
    use crate::store::tests::{node_spec, off, open};

    #[tokio::test]
    async fn a_hand_over_moves_the_row_once_and_never_after_either_side_gave_up() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open(&dir), open(&dir));
        off(|| a.acquire_lease(&node_spec("a"))).unwrap().unwrap();
        off(|| b.acquire_lease(&node_spec("b"))).unwrap().unwrap();
        a.with_conn(|c| {
            c.execute_batch(
                "INSERT INTO sandbox_groups (name, spec, created_at, updated_at) \
                 VALUES ('g', '{}', 0, 0)",
            )
        })
        .unwrap();
        for id in ["sb-1", "sb-2"] {
            let mut row = crate::store::sandboxes::tests::new_row(id, "g");
            row.state = SandboxState::Running;
            a.insert_sandbox(&row).await.unwrap();
        }
        // Nothing recorded: no hand-over; b cannot record one for a's sandbox.
        let e = b.complete_handover("sb-1", "a").await.unwrap_err();
        assert!(e.to_string().contains("no hand-over"), "{e}");
        let e = b.begin_handover("sb-1", "a").await.unwrap_err();
        assert!(
            e.to_string().contains("not a running sandbox of node"),
            "{e}"
        );

        a.begin_handover("sb-1", "b").await.unwrap();
        let row = b.complete_handover("sb-1", "a").await.unwrap();
        assert_eq!(row.node.as_deref(), Some("b"));
        assert_eq!(row.state, SandboxState::Running);
        // Done once: the record is gone, and a can no longer write about it.
        assert!(!a.cancel_handover("sb-1").await.unwrap());
        assert!(b.complete_handover("sb-1", "a").await.is_err());
        let e = a
            .set_sandbox_state("sb-1", SandboxState::Failed, Some("x"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("runs on node b"), "{e}");

        // Given up first (by either side): the hand-over cannot happen after.
        a.begin_handover("sb-2", "b").await.unwrap();
        assert!(b.cancel_handover("sb-2").await.unwrap());
        let e = b.complete_handover("sb-2", "a").await.unwrap_err();
        assert!(e.to_string().contains("given up"), "{e}");
        assert_eq!(
            a.get_sandbox("sb-2")
                .await
                .unwrap()
                .unwrap()
                .node
                .as_deref(),
            Some("a")
        );

        // A source that restarted (a new epoch) cannot be handed over from: its old VM is
        // not the one the destination holds.
        a.begin_handover("sb-2", "b").await.unwrap();
        off(|| a.acquire_lease(&node_spec("a"))).unwrap().unwrap();
        let e = b.complete_handover("sb-2", "a").await.unwrap_err();
        assert!(e.to_string().contains("no longer holds the lease"), "{e}");
        // Nor can a destination whose own lease is gone take it.
        a.begin_handover("sb-2", "b").await.unwrap();
        let b_again = open(&dir);
        off(|| b_again.acquire_lease(&node_spec("b")))
            .unwrap()
            .unwrap();
        let e = b.complete_handover("sb-2", "a").await.unwrap_err();
        assert!(e.to_string().contains("does not hold its lease"), "{e}");
        assert_eq!(
            a.get_sandbox("sb-2")
                .await
                .unwrap()
                .unwrap()
                .node
                .as_deref(),
            Some("a")
        );
    }

    #[tokio::test]
    async fn a_file_hand_over_moves_a_suspended_row_and_makes_its_files_local() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open(&dir), open(&dir));
        off(|| a.acquire_lease(&node_spec("a"))).unwrap().unwrap();
        off(|| b.acquire_lease(&node_spec("b"))).unwrap().unwrap();
        a.with_conn(|c| {
            c.execute_batch(
                "INSERT INTO sandbox_groups (name, spec, created_at, updated_at) \
                 VALUES ('g', '{}', 0, 0)",
            )
        })
        .unwrap();
        for (id, state) in [
            ("sb-s", SandboxState::Suspended),
            ("sb-r", SandboxState::Running),
        ] {
            let mut row = crate::store::sandboxes::tests::new_row(id, "g");
            row.state = state;
            a.insert_sandbox(&row).await.unwrap();
        }
        // Only a suspended sandbox goes by its files, and a running one only live.
        let e = a.begin_file_handover("sb-r", "b").await.unwrap_err();
        assert!(e.to_string().contains("not a suspended sandbox"), "{e}");
        let e = a.begin_handover("sb-s", "b").await.unwrap_err();
        assert!(e.to_string().contains("not a running sandbox"), "{e}");
        a.begin_handover("sb-r", "b").await.unwrap();
        let e = b.complete_file_handover("sb-r", "a").await.unwrap_err();
        assert!(e.to_string().contains("no longer a suspended"), "{e}");
        assert!(a.cancel_handover("sb-r").await.unwrap());

        a.set_sandbox_files("sb-s", crate::store::Files::Shared)
            .await
            .unwrap();
        assert!(!b.handover_pending("sb-s", "a", "b").await.unwrap());
        a.begin_file_handover("sb-s", "b").await.unwrap();
        assert!(b.handover_pending("sb-s", "a", "b").await.unwrap());
        assert!(!b.handover_pending("sb-s", "a", "c").await.unwrap());
        let row = b.complete_file_handover("sb-s", "a").await.unwrap();
        assert_eq!(row.node.as_deref(), Some("b"));
        assert_eq!(row.state, SandboxState::Suspended);
        // The files are on b's own disk now; the record is gone with the hand-over.
        assert_eq!(
            b.sandbox_files("sb-s").await.unwrap(),
            Some(crate::store::Files::Local)
        );
        assert!(!b.handover_pending("sb-s", "a", "b").await.unwrap());
        assert!(b.complete_file_handover("sb-s", "a").await.is_err());
    }

    #[tokio::test]
    async fn drain_progress_shows_while_draining_and_an_undrain_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(&dir);
        off(|| a.acquire_lease(&node_spec("a"))).unwrap().unwrap();
        let progress = crate::api::DrainProgress {
            running_left: 1,
            failed: vec![crate::api::DrainFailure {
                sandbox: "sb-1".into(),
                reason: "no other ready node".into(),
            }],
            done: true,
            ..Default::default()
        };
        // Not draining: nothing is recorded.
        a.set_drain_progress(Some(&progress)).await.unwrap();
        assert!(a.get_node("a").await.unwrap().unwrap().drain.is_none());
        a.set_node_draining("a", true).await.unwrap();
        a.set_drain_progress(Some(&progress)).await.unwrap();
        let node = a.get_node("a").await.unwrap().unwrap();
        assert_eq!(node.drain.as_ref(), Some(&progress));
        // Draining again keeps it; an undrain clears it, and a move that ends after the
        // undrain cannot bring it back.
        a.set_node_draining("a", true).await.unwrap();
        assert!(a.get_node("a").await.unwrap().unwrap().drain.is_some());
        let undrained = a.set_node_draining("a", false).await.unwrap().unwrap();
        assert!(undrained.drain.is_none());
        a.set_drain_progress(Some(&progress)).await.unwrap();
        assert!(a.get_node("a").await.unwrap().unwrap().drain.is_none());
    }
}
