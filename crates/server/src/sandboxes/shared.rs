//! Suspended sandboxes on shared storage (`moat serve --shared-dir DIR`, docs/FLEET.md).
//!
//! A node with a shared directory writes every new suspend under `DIR/suspended/<id>/<n>/`
//! by the same rules as a local one (built under a `.tmp-` name, fsynced, renamed), and
//! records `files = 'shared'` on the row. Such a directory must not depend on anything of
//! the node that wrote it, because another node resumes it with its own MOAT_HOME: a local
//! suspend's disk is one layer over the node's template disk or image rootfs, and a clone's
//! memory image holds only the pages that differ from the node's template RAM. Those files
//! are the node's own (each node builds its templates; a template's RAM differs from one
//! build to the next), so a shared suspend is written standalone instead
//! ([`moat_vm::Sandbox::suspend_standalone`]): the whole disk chain flattened into one qcow2
//! and all of the guest's RAM. It costs the image's data on every suspend, and nothing but
//! the same kernel, initramfs and QEMU is needed to resume it anywhere (the check every
//! resume makes).
//!
//! A suspended sandbox moves between nodes only as its row: taken over from a lost node by
//! the node a resume reaches ([`Manager::take_over`]), or handed over by a draining node
//! ([`Manager::drain_suspended`]). The files stay where they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Manager;
use crate::api::{self, Sandbox, SandboxState};
use crate::error::{Error, Result};
use crate::http::forward::node_gone;
use crate::store::Files;

/// Checks `--shared-dir` at start: it exists, is a directory, and this node can create,
/// fsync, rename and remove files in it (what a suspend does there). Returns its canonical
/// path.
pub fn check_shared_dir(dir: &Path) -> Result<PathBuf> {
    let bad = |why: String| {
        Error::Config(format!(
            "--shared-dir (MOAT_SHARED_DIR) {}: {why}; give a directory on a POSIX shared \
             filesystem that every node mounts and may write",
            dir.display()
        ))
    };
    let meta = std::fs::metadata(dir).map_err(|e| bad(format!("cannot be read ({e})")))?;
    if !meta.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    let canonical = std::fs::canonicalize(dir).map_err(|e| bad(format!("{e}")))?;
    let probe = canonical.join(format!(".tmp-probe-{:016x}", rand::random::<u64>()));
    let done = canonical.join(format!(".tmp-probed-{:016x}", rand::random::<u64>()));
    let tried = (|| {
        let f = std::fs::File::create(&probe)?;
        f.sync_all()?;
        std::fs::rename(&probe, &done)?;
        std::fs::File::open(&canonical)?.sync_all()?;
        std::fs::remove_file(&done)
    })();
    let _ = std::fs::remove_file(&probe);
    let _ = std::fs::remove_file(&done);
    tried.map_err(|e| bad(format!("this node cannot write in it ({e})")))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
    if mode & 0o077 != 0 {
        // Not refused: on NFS the owner and mode seen here may not be what the server checks.
        eprintln!(
            "moat serve: warning: --shared-dir {} has mode {mode:03o}: it will hold the memory \
             and disks of suspended sandboxes; make it 0700 so that only this user reads it",
            dir.display()
        );
    }
    Ok(canonical)
}

/// Why suspended sandbox `id` of node `node` (lost, or no longer a node of the store) cannot
/// be reached, and what can be done: resumed through a node with the shared directory when
/// its files are shared, nothing until its node comes back when they are on its disk.
pub(crate) fn unreachable_suspended(id: &str, node: &str, why: &str, files: Files) -> Error {
    let node = api::quote(node);
    Error::Unavailable(match files {
        Files::Shared => format!(
            "sandbox {id} is suspended on node {node}, which {why}; its files are on the \
             shared storage: resume it (POST …/sandboxes/{id}/resume) through a node started \
             with --shared-dir and it moves there"
        ),
        Files::Local => format!(
            "sandbox {id} is suspended on node {node}, which {why}; it cannot be resumed on \
             another node: its memory and disk are on node {node}'s own disk (it runs without \
             --shared-dir), so it resumes only when node {node} comes back"
        ),
    })
}

impl Manager {
    /// Where this node writes new files (suspends, snapshots).
    pub(crate) fn new_files(&self) -> Files {
        match self.shared {
            Some(_) => Files::Shared,
            None => Files::Local,
        }
    }

    /// The directory that holds `snapshots/` for files kept as `files`: MOAT_HOME, or the
    /// shared directory (when this node has it).
    pub(crate) fn files_home(&self, files: Files) -> PathBuf {
        match (files, &self.shared) {
            (Files::Shared, Some(dir)) => dir.clone(),
            _ => self.rt.home.clone(),
        }
    }

    /// The directory of snapshot `name` of `group` for a fork on this node, or why this
    /// node cannot read it: on the shared storage without `--shared-dir` here, or on the
    /// disk of another node.
    pub(crate) async fn snapshot_dir(&self, group: &str, name: &str) -> Result<PathBuf> {
        let me = self.store.node_name();
        let (files, node) = self
            .store
            .snapshot_files(group, name)
            .await?
            .unwrap_or((Files::Local, None));
        let whose = node.clone().unwrap_or_default();
        match files {
            Files::Shared if self.shared.is_none() => Err(Error::Unavailable(format!(
                "snapshot {} is on the shared storage and node {} has no --shared-dir: create \
                 the sandbox through a node started with --shared-dir",
                api::quote(name),
                api::quote(me.as_deref().unwrap_or("?"))
            ))),
            Files::Local if node.is_some() && node != me => Err(Error::Unavailable(format!(
                "snapshot {} is on node {}'s own disk (it was taken without --shared-dir): \
                 create the sandbox through node {}",
                api::quote(name),
                api::quote(&whose),
                api::quote(&whose)
            ))),
            _ => Ok(crate::snapshots::dir(&self.files_home(files), group, name)),
        }
    }

    /// The directories that hold `snapshots/` on this node: MOAT_HOME and the shared one.
    pub(crate) fn snapshot_homes(&self) -> Vec<PathBuf> {
        std::iter::once(self.rt.home.clone())
            .chain(self.shared.clone())
            .collect()
    }

    /// Whether sandbox `id`'s files are on the shared storage and this node has none (it
    /// was restarted without `--shared-dir`): they are not gone, only out of its sight.
    pub(super) async fn shared_files_unseen(&self, id: &str) -> Result<bool> {
        let files = self.store.sandbox_files(id).await?;
        Ok(self.shared.is_none() && files == Some(Files::Shared))
    }

    /// Where a suspend into `dest` writes its files.
    pub(super) fn files_at(&self, dest: &Path) -> Files {
        match &self.shared {
            Some(dir) if dest.starts_with(dir) => Files::Shared,
            _ => Files::Local,
        }
    }

    /// For a resume of `row` through this node: if it is suspended on a node that is lost
    /// or gone, it is taken over ([`Manager::take_over`]) and its moved row returned, or the
    /// 503 that says why it cannot be (its files are on that node's disk). `None`: it is
    /// not such a sandbox (the resume goes on as usual).
    pub async fn take_over_for_resume(self: &Arc<Self>, row: &Sandbox) -> Result<Option<Sandbox>> {
        let me = self.store.node_name();
        let Some(node) = row.node.as_deref().filter(|n| Some(*n) != me.as_deref()) else {
            return Ok(None);
        };
        if row.state != SandboxState::Suspended {
            return Ok(None);
        }
        let Some(gone) = node_gone(self.store.get_node(node).await?.as_ref()) else {
            return Ok(None);
        };
        match self.store.sandbox_files(&row.id).await? {
            Some(Files::Shared) => self.take_over(row).await.map(Some),
            _ => Err(unreachable_suspended(&row.id, node, &gone, Files::Local)),
        }
    }

    /// Moves suspended sandbox `row`, whose node is lost or gone, to this node so that it
    /// can be resumed here: only with its files on the shared storage, which this node must
    /// have too. Of nodes racing for it one wins; the others get a 409.
    async fn take_over(self: &Arc<Self>, row: &Sandbox) -> Result<Sandbox> {
        let me = self.store.node_name().unwrap_or_default();
        let from = row.node.clone().unwrap_or_default();
        if self.shared.is_none() {
            return Err(Error::Unavailable(format!(
                "sandbox {} is suspended on node {}, which is lost; node {} has no \
                 --shared-dir, so it cannot read the sandbox's files: resume it through a \
                 node started with --shared-dir",
                row.id,
                api::quote(&from),
                api::quote(&me)
            )));
        }
        let Some(moved) = self.store.take_over_sandbox(&row.id).await? else {
            let now = self.get_row(&row.id).await?;
            return Err(Error::Conflict(format!(
                "sandbox {} was not taken over by node {}: it is {} on node {} now (another \
                 node took it first, or it changed); retry",
                row.id,
                api::quote(&me),
                now.state.as_str(),
                api::quote(now.node.as_deref().unwrap_or("?"))
            )));
        };
        tracing::info!(
            id = row.id,
            from,
            "took over a suspended sandbox of a lost node"
        );
        self.adopt_suspended(&moved).await;
        Ok(moved)
    }

    /// Registers suspended sandbox `row`, just moved to this node, if its files can be read
    /// here (else a resume says that its suspend directory is gone).
    pub(super) async fn adopt_suspended(&self, row: &Sandbox) {
        let mine = row.node.is_some() && row.node == self.store.node_name();
        let suspended = row.state == SandboxState::Suspended;
        if mine && suspended && self.entry(&row.id).is_none() && self.resumable(&row.id).is_some() {
            self.insert_suspended(row).await;
        }
    }

    /// On every lifecycle tick: registers the suspended sandboxes another node handed to
    /// this one (a drain), so that a resume finds them.
    pub(super) async fn pick_up_moved(&self, rows: &[crate::store::Timers]) {
        for t in rows {
            if t.state != SandboxState::Suspended || self.entry(&t.id).is_some() {
                continue;
            }
            if let Ok(row) = self.get_row(&t.id).await {
                self.adopt_suspended(&row).await;
            }
        }
    }

    /// The draining node's step for suspended sandboxes: each one whose files are on the
    /// shared storage is handed to another ready node with the shared directory (the row
    /// only). Those on this node's disk stay (`GET /v1/nodes/{node}` counts them).
    pub(super) async fn drain_suspended(self: &Arc<Self>) {
        let moved = async {
            let ids = self.store.suspended_shared().await?;
            if ids.is_empty() {
                return Ok(());
            }
            let me = self.store.node_name().unwrap_or_default();
            for id in ids {
                let Some(sb) = self.store.get_sandbox(&id).await? else {
                    continue;
                };
                let to = match self.store.destination(&sb, &me, |n| n.shared_storage).await {
                    Ok(node) => node.name,
                    Err(e) => {
                        tracing::warn!(id, error = %e, "a suspended sandbox stays (drain)");
                        continue;
                    }
                };
                // Under the sandbox's lock: no resume of it here runs meanwhile.
                let entry = self.entry(&id);
                let _slot = match &entry {
                    Some(e) => Some(e.vm.write().await),
                    None => None,
                };
                if self.store.hand_over_sandbox(&id, &to).await? {
                    self.lock_live().remove(&id);
                    tracing::info!(id, to, "handed a suspended sandbox over (drain)");
                }
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = moved.await {
            tracing::warn!(error = %e, "handing suspended sandboxes over (drain)");
        }
    }
}
