//! Suspend and resume, and the suspend directories they work in.
//!
//! A suspended sandbox is saved to `MOAT_HOME/suspended/<id>/<n>/` (n counts up; a fork of a
//! snapshot starts as if resumed from `<0>`, see `Manager::start_fork`) and its VM ends; the
//! entry stays with no VM. The newest `<n>` is the one to resume; after a resume it keeps only
//! its `disk.qcow2`, the new VM's backing file, until the next suspend writes `<n+1>` (see
//! docs/SNAPSHOTS.md). A directory appears complete or not at all, so after a crash "the newest
//! `<n>` still has `memory.bin`" means "resumable".
//!
//! The rest of the manager (start-up recovery, launch, delete) reaches `suspended/` only through
//! the helpers here, so the rules above are kept in one place; a fork's `<0>` is written by
//! `snapshots::copy_for_fork` under [`Manager::suspend_root`], by the same rules.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::RwLock;

use super::{conflict, Entry, Manager};
use crate::api::{Sandbox, SandboxState};
use crate::error::{Error, Result};
use crate::metrics;
use crate::store::Files;

impl Manager {
    /// The sandbox's suspend directories, `<n>` each: `MOAT_HOME/suspended/<id>`, or
    /// `<--shared-dir>/suspended/<id>` on a node with a shared directory (a sandbox that has
    /// a local one from before keeps it: see `shared.rs`).
    pub(super) fn suspend_root(&self, id: &str) -> PathBuf {
        let local = self.rt.home.join("suspended").join(id);
        match &self.shared {
            Some(dir) if !local.exists() => dir.join("suspended").join(id),
            _ => local,
        }
    }

    /// The numbered suspend directories of `id`, oldest first (`.tmp-` ones, being written
    /// or left by a crash, are not counted).
    fn suspend_dirs(&self, id: &str) -> Vec<(u64, PathBuf)> {
        let mut dirs: Vec<(u64, PathBuf)> = std::fs::read_dir(self.suspend_root(id))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.parse::<u64>().ok()?;
                Some((n, e.path()))
            })
            .collect();
        dirs.sort();
        dirs
    }

    /// The directory to resume `id` from: the newest, if it still has its memory image.
    pub(super) fn resumable(&self, id: &str) -> Option<PathBuf> {
        let (_, dir) = self.suspend_dirs(id).pop()?;
        dir.join("memory.bin").exists().then_some(dir)
    }

    /// Removes what suspends of `id` interrupted by a crash left behind: `.tmp-*` (never
    /// complete, never resumed from), and the numbered directories older than the newest (a
    /// suspend killed after it renamed its new directory into place, before it removed them).
    /// Only the newest is ever needed: a sandbox resumes from it, or runs on its disk, which a
    /// suspend flattened, so it leans on no older one.
    pub(super) fn remove_stale_suspends(&self, id: &str) {
        let mut stale: Vec<PathBuf> = std::fs::read_dir(self.suspend_root(id))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .map(|e| e.path())
            .collect();
        let mut dirs = self.suspend_dirs(id);
        dirs.pop();
        stale.extend(dirs.into_iter().map(|(_, dir)| dir));
        for dir in stale {
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(id, error = %err, "removing {}", dir.display());
            }
        }
    }

    pub(super) fn remove_suspend_dirs(&self, id: &str) {
        let root = self.suspend_root(id);
        if let Err(e) = std::fs::remove_dir_all(&root) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(id, error = %e, "removing {}", root.display());
            }
        }
    }

    /// Registers a suspended sandbox (no VM), so that resume and auto-resume find it.
    pub(super) async fn insert_suspended(&self, row: &Sandbox) {
        let config = self.image_config(&row.image).await;
        let entry = Entry::new(Arc::new(RwLock::new(None)), config);
        self.lock_live().insert(row.id.clone(), entry);
    }

    /// Suspends a running sandbox into a new `suspended/<id>/<n>/` (the VM ends; only disk
    /// remains) and then removes the older directories. Suspending a suspended sandbox is a
    /// no-op; any state other than running is a 409. Runs to the end even if the caller goes.
    pub async fn suspend(self: &Arc<Self>, id: &str) -> Result<Sandbox> {
        self.suspend_inner(id, None, false).await
    }

    /// [`Manager::suspend`]; with `idle_since_ms`, only if there was no activity after that
    /// time (the reaper decided at that time that the sandbox was idle); `standalone`: its
    /// directory depends on nothing of this node even when it is local (to be sent to
    /// another node, `transfer.rs`).
    pub(super) async fn suspend_inner(
        self: &Arc<Self>,
        id: &str,
        idle_since_ms: Option<i64>,
        standalone: bool,
    ) -> Result<Sandbox> {
        let mgr = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let row = mgr.get_row(&id).await?;
            let entry = mgr.entry(&id).ok_or_else(|| conflict("suspend", &row))?;
            let mut slot = entry.vm.write().await;
            let row = mgr.get_row(&id).await?;
            match row.state {
                SandboxState::Suspended => return Ok(row),
                SandboxState::Running => {}
                _ => return Err(conflict("suspend", &row)),
            }
            if let Some(since) = idle_since_ms {
                let a = &entry.activity;
                if a.active.load(Ordering::SeqCst) > 0 || a.last_ms.load(Ordering::SeqCst) > since {
                    return Ok(row);
                }
            }
            let vm = slot.take().ok_or_else(|| conflict("suspend", &row))?;
            // The VM and its stack end here; a resume links the new ones.
            mgr.release_network(&id);
            mgr.set_state(&id, SandboxState::Suspending).await?;
            let dirs = mgr.suspend_dirs(&id);
            let next = dirs.last().map_or(1, |(n, _)| n + 1);
            let dest = mgr.suspend_root(&id).join(next.to_string());
            let started = Instant::now();
            let files = mgr.files_at(&dest);
            let suspended = match files {
                Files::Local if !standalone => vm.suspend(&mgr.rt, &dest).await,
                _ => vm.suspend_standalone(&mgr.rt, &dest).await,
            };
            mgr.cap.release(&id);
            match suspended {
                Ok(meta) => {
                    mgr.metrics
                        .observe_op(metrics::SUSPEND, &[], started.elapsed());
                    // The new directory is complete: the older ones (the last resume's backing
                    // disk among them) are no longer needed.
                    for (_, old) in dirs {
                        if let Err(e) = std::fs::remove_dir_all(&old) {
                            tracing::warn!(id, error = %e, "removing {}", old.display());
                        }
                    }
                    tracing::info!(
                        id,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        memory_bytes = meta.memory_bytes,
                        "suspended"
                    );
                    mgr.store.set_sandbox_files(&id, files).await?;
                    mgr.set_state(&id, SandboxState::Suspended).await
                }
                Err(e) => {
                    // The VM is gone either way, and the previous directory (if any) has
                    // given up its memory image: nothing is left to resume.
                    let err = Error::vm("suspending the sandbox")(e);
                    mgr.lock_live().remove(&id);
                    mgr.fail(&id, &format!("{err}")).await?;
                    Err(err)
                }
            }
        })
        .await
        .map_err(Error::task("the suspend task failed"))?
    }

    /// Resumes a suspended sandbox from its newest suspend directory (processes, memory and
    /// files as they were) as a detached VM, then drops that directory's memory image.
    /// Resuming a running sandbox is a no-op; other states are a 409. A resume that fails
    /// leaves the sandbox suspended (its directory is untouched), so it can be retried.
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<Sandbox> {
        let mgr = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let row = mgr.get_row(&id).await?;
            // Handed to this node by a draining one since the last lifecycle tick.
            mgr.adopt_suspended(&row).await;
            let entry = mgr.entry(&id).ok_or_else(|| conflict("resume", &row))?;
            let mut slot = entry.vm.write().await;
            let row = mgr.get_row(&id).await?;
            match row.state {
                SandboxState::Running if slot.is_some() => return Ok(row),
                SandboxState::Suspended if slot.is_none() => {}
                _ => return Err(conflict("resume", &row)),
            }
            let Some(dir) = mgr.resumable(&id) else {
                mgr.lock_live().remove(&id);
                let why = "its suspend directory is gone";
                mgr.fail(&id, why).await?;
                return Err(Error::Conflict(format!(
                    "sandbox {id} cannot be resumed: {why}"
                )));
            };
            mgr.cap
                .reserve(&id, row.tier, &format!("resuming sandbox {id}"))?;
            if let Err(e) = mgr.set_state(&id, SandboxState::Resuming).await {
                mgr.cap.release(&id);
                return Err(e);
            }
            let started = Instant::now();
            let resumed = match mgr.launch_options(&row.group).await {
                Ok(opts) => moat_vm::Sandbox::resume(&mgr.rt, &id, &dir, opts)
                    .await
                    .map_err(Error::vm("resuming the sandbox")),
                Err(e) => Err(e),
            };
            // With its group's policy as it is now, before it counts as running.
            let resumed = match resumed {
                Ok(sb) => match mgr.connect_network(&id, &row.group, &sb).await {
                    Ok(()) => Ok(sb),
                    Err(e) => {
                        sb.destroy().await;
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            match resumed {
                Ok(sb) => {
                    mgr.metrics
                        .observe_op(metrics::RESUME, &[], started.elapsed());
                    // A new incarnation: tokens say which one they were minted for.
                    if let Err(e) = mgr.store.next_incarnation(&id).await {
                        tracing::warn!(id, error = %e, "counting the sandbox's incarnation");
                    }
                    *slot = Some(sb);
                    // QEMU has loaded it; only disk.qcow2 (the backing file) must stay.
                    if let Err(e) = moat_vm::snapshot::discard_memory(&dir) {
                        tracing::warn!(id, error = %e, "discarding the memory image");
                    }
                    tracing::info!(
                        id,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "resumed"
                    );
                    mgr.set_state(&id, SandboxState::Running).await
                }
                Err(e) => {
                    mgr.cap.release(&id);
                    mgr.set_state(&id, SandboxState::Suspended).await?;
                    Err(e)
                }
            }
        })
        .await
        .map_err(Error::task("the resume task failed"))?
    }
}
