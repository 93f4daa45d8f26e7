//! The manager's side of sending a suspended sandbox's files to another node
//! (`crate::transfer`, docs/FLEET.md "Moving suspended sandboxes' files"): a standalone form
//! of its suspend directory on the source, and the received directory on the destination.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Manager;
use crate::api::Sandbox;
use crate::error::{Error, Result};

/// The files of a standalone suspend directory, in the order they are sent (`meta.json`
/// last: a directory without it is not one).
pub(crate) const FILES: [&str; 3] = ["disk.qcow2", "memory.bin", "meta.json"];

/// Where the destination collects the files of sandbox `id` (under its suspend root, with
/// the `.tmp-` prefix that start-up and every suspend clean up, and no resume ever reads).
const INCOMING: &str = ".tmp-incoming";

/// Whether suspend directory `dir` depends on nothing of this node: its disk has no backing
/// file and its memory image holds all of the guest's RAM.
fn is_standalone(dir: &Path) -> Result<bool> {
    let meta = moat_vm::SnapshotMeta::load(dir).map_err(Error::vm("reading a suspend"))?;
    let disk = moat_vm::disk::backing_file(&dir.join("disk.qcow2"))
        .map_err(Error::vm("reading a suspend's disk"))?;
    Ok(disk.is_none() && meta.ram_base.is_none() && meta.shared_ram_bytes.is_none())
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
}

impl Manager {
    /// The suspend directory of suspended sandbox `id` in a form another node can resume
    /// (see [`is_standalone`]). A local suspend leans on this node's template (its disk is a
    /// layer over the template's disk, its memory image only the pages that differ from the
    /// template's RAM), so it is resumed here and suspended again standalone: the one tested
    /// way to rebuild its whole RAM (the guest runs for the few seconds between). One that
    /// already is standalone (written to shared storage before, or by an earlier attempt) is
    /// sent as it is.
    pub(crate) async fn standalone_suspend(self: &Arc<Self>, id: &str) -> Result<PathBuf> {
        if let Some(dir) = self.local_resumable(id) {
            if is_standalone(&dir)? {
                return Ok(dir);
            }
        }
        self.resume(id).await?;
        self.suspend_inner(id, None, true).await?;
        self.local_resumable(id).ok_or_else(|| {
            Error::Internal(format!(
                "sandbox {id} was suspended again but its directory is not on this node"
            ))
        })
    }

    /// [`Manager::resumable`], only under MOAT_HOME (what a transfer sends).
    fn local_resumable(&self, id: &str) -> Option<PathBuf> {
        let dir = self.resumable(id)?;
        dir.starts_with(self.rt.home.join("suspended"))
            .then_some(dir)
    }

    /// Holds suspended sandbox `id` (its write lock: no resume of it runs here meanwhile)
    /// for as long as the guard lives.
    pub(crate) async fn hold_suspended(
        &self,
        id: &str,
    ) -> Result<tokio::sync::OwnedRwLockWriteGuard<Option<moat_vm::Sandbox>>> {
        let entry = self
            .entry(id)
            .ok_or_else(|| Error::SandboxGone(id.to_string()))?;
        let slot = entry.vm.clone().write_owned().await;
        if slot.is_some() {
            return Err(Error::Conflict(format!(
                "sandbox {id} was resumed meanwhile: it is no longer suspended"
            )));
        }
        Ok(slot)
    }

    /// The sandbox was handed over with its files: this node forgets it and removes them.
    pub(crate) async fn sent_away(&self, id: &str) {
        self.lock_live().remove(id);
        self.remove_suspend_dirs(id);
    }

    /// Where the files of sandbox `id` arriving from another node are collected.
    pub(crate) fn incoming_dir(&self, id: &str) -> PathBuf {
        self.rt.home.join("suspended").join(id).join(INCOMING)
    }

    /// The destination's last step: the collected files of sandbox `id` from node `from`
    /// become its suspend directory `1` (checked first: every file there, a standalone
    /// suspend this node's QEMU, kernel and agent can resume), and the row moves to this
    /// node in one transaction fenced by both nodes' leases. On any failure the files are
    /// removed and the row stays `from`'s.
    pub(crate) async fn land(&self, id: &str, from: &str) -> Result<Sandbox> {
        let incoming = self.incoming_dir(id);
        let root = self.rt.home.join("suspended").join(id);
        let dest = root.join("1");
        let landed = async {
            for f in FILES {
                if !incoming.join(f).is_file() {
                    return Err(Error::Conflict(format!(
                        "sandbox {id}: file {f} did not arrive; nothing was handed over"
                    )));
                }
            }
            if !is_standalone(&incoming)? {
                return Err(Error::BadRequest(format!(
                    "sandbox {id}: the files sent are not a standalone suspend (their disk \
                     has a backing file or their memory image is relative to a template)"
                )));
            }
            moat_vm::SnapshotMeta::load(&incoming)
                .and_then(|m| m.check_compatible(&self.rt))
                .map_err(Error::vm("checking the suspend that arrived"))?;
            if dest.exists() {
                return Err(Error::Conflict(format!(
                    "sandbox {id} already has a suspend directory on this node"
                )));
            }
            std::fs::rename(&incoming, &dest)
                .map_err(|e| Error::io(format!("moving {} into place", incoming.display()), e))?;
            fsync_dir(&root)?;
            self.store.complete_file_handover(id, from).await
        }
        .await;
        match landed {
            Ok(row) => {
                self.adopt_suspended(&row).await;
                Ok(row)
            }
            Err(e) => {
                self.drop_incoming(id);
                // Only once the row says for certain that it stayed the other node's (a
                // commit whose answer was lost may have happened).
                if let Ok(row) = self.store.get_sandbox(id).await {
                    if row.and_then(|r| r.node) != self.store.node_name() {
                        let _ = std::fs::remove_dir_all(&root);
                    }
                }
                Err(e)
            }
        }
    }

    /// At start: removes the suspend directories in MOAT_HOME of sandboxes that are not this
    /// node's (`mine`): files a transfer was receiving when this node stopped (the row
    /// stayed the sender's), or a copy a sender kept when it stopped right after the
    /// hand-over. Nothing else ever leaves them there.
    pub(super) fn remove_foreign_suspends(&self, mine: std::collections::HashSet<&str>) {
        let root = self.rt.home.join("suspended");
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name();
            let Some(id) = name.to_str() else { continue };
            if mine.contains(id) {
                continue;
            }
            tracing::info!(
                id,
                "removing the suspend files of a sandbox of another node"
            );
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(id, error = %err, "removing {}", e.path().display());
            }
        }
    }

    /// Removes what arrived of sandbox `id` (an aborted or failed transfer).
    pub(crate) fn drop_incoming(&self, id: &str) {
        let incoming = self.incoming_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&incoming) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(id, error = %e, "removing {}", incoming.display());
            }
        }
        let root = self.rt.home.join("suspended").join(id);
        // The root was made for the transfer: nothing else of the sandbox is here.
        let _ = std::fs::remove_dir(&root);
    }
}
