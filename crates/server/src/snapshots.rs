//! Named snapshots of sandboxes, scoped to a group: taking, keeping and removing them (the
//! routes are `http/routes/snapshots.rs`). A fork (`from_snapshot` on create) is
//! [`Manager::fork`].
//!
//! On disk a snapshot is `MOAT_HOME/snapshots/<group>/<name>/` = {`meta.json`, `memory.bin`,
//! `disk.qcow2`}: a moat_vm snapshot whose disk layer is flattened onto the image's read-only
//! rootfs (recorded as its `shared_base`), so it depends on nothing but the image — not on the
//! source sandbox, its suspend directories, a template, or another snapshot. It is built under
//! `.tmp-<name>-<random>` beside its final place and renamed there when complete (everything
//! fsynced), so after a crash it exists complete or not at all.
//!
//! The store row is `creating` while the directory is written (it holds the name) and `ready`
//! after; [`recover`] reconciles both at the daemon's start.
//!
//! A node with `--shared-dir` writes its snapshots under `<shared-dir>/snapshots/` instead
//! (`files = 'shared'` on the row), standalone: the disk flattened into one file with no
//! backing file, as a shared suspend (see `sandboxes/shared.rs`), so that any node of the
//! fleet with the shared directory forks it, also when the node that took it is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::{self, Snapshot};
use crate::error::{Error, Result};
use crate::sandboxes::{conflict, Manager};
use crate::store::{Files, Store};

/// `MOAT_HOME/snapshots`.
fn root(home: &Path) -> PathBuf {
    home.join("snapshots")
}

/// `MOAT_HOME/snapshots/<group>/<name>`.
pub(crate) fn dir(home: &Path, group: &str, name: &str) -> PathBuf {
    root(home).join(group).join(name)
}

// ---- files ----

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

fn fsync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("fsyncing {}", path.display())))
}

/// Removes a directory tree by first renaming it to a `.tmp-` name beside it (atomic), so a
/// crash half-way leaves something [`recover`] removes, never a half snapshot under its name.
fn remove_tree(path: &Path) {
    let Some(parent) = path.parent() else { return };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let trash = parent.join(format!(
        ".tmp-rm-{}-{:016x}",
        name.unwrap_or_default(),
        rand::random::<u64>()
    ));
    let target = match std::fs::rename(path, &trash) {
        Ok(()) => trash,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(_) => path.to_path_buf(),
    };
    if let Err(e) = std::fs::remove_dir_all(&target) {
        tracing::warn!(error = %e, "removing {}", target.display());
    }
}

/// Copies snapshot `snap` into `root/0/` (see `Manager::start_fork`): `memory.bin` hard-linked
/// (QEMU only reads it, and the fork unlinks its name once loaded), `disk.qcow2` copied (the
/// fork's backing file, which must not change under it), `meta.json` copied; built under a
/// `.tmp-` name and renamed, so the suspend-directory rules of the manager hold.
pub(crate) fn copy_for_fork(snap: &Path, root: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    let tmp = root.join(format!(".tmp-0-{:016x}", rand::random::<u64>()));
    let dest = root.join("0");
    let made = (|| {
        std::fs::create_dir(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let memory = snap.join("memory.bin");
        if std::fs::hard_link(&memory, tmp.join("memory.bin")).is_err() {
            std::fs::copy(&memory, tmp.join("memory.bin"))
                .map_err(io(format!("copying {}", memory.display())))?;
        }
        for f in ["disk.qcow2", "meta.json"] {
            std::fs::copy(snap.join(f), tmp.join(f))
                .map_err(io(format!("copying {}", snap.join(f).display())))?;
            fsync(&tmp.join(f))?;
        }
        fsync(&tmp)?;
        std::fs::rename(&tmp, &dest).map_err(io(format!("creating {}", dest.display())))?;
        fsync(root)
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    made.map(|()| dest)
}

/// At the daemon's start: `creating` rows (a crash while a snapshot was taken) are removed,
/// and so is every directory under `snapshots/` that no `ready` row claims (leftovers of those
/// and of interrupted deletes); a `ready` row whose directory is gone is removed with a warning.
/// This node's snapshots on the shared storage (`shared`) are only checked: the directory
/// holds every node's, some being written.
pub(crate) async fn recover(home: &Path, shared: Option<&Path>, store: &Store) -> Result<()> {
    let home = home.to_path_buf();
    let mut ready = Vec::new();
    for s in store.recover_snapshots().await? {
        match store.snapshot_files(&s.group, &s.name).await? {
            Some((Files::Shared, _)) => {
                let gone = shared.is_some_and(|d| !dir(d, &s.group, &s.name).is_dir());
                if gone {
                    tracing::warn!(
                        group = s.group,
                        name = s.name,
                        "snapshot directory on the shared storage is gone; forgetting it"
                    );
                    store.delete_snapshot(&s.group, &s.name).await?;
                }
            }
            _ => ready.push(s),
        }
    }
    let keep: std::collections::HashSet<PathBuf> = ready
        .iter()
        .map(|s| dir(&home, &s.group, &s.name))
        .collect();
    let groups = std::fs::read_dir(root(&home))
        .into_iter()
        .flatten()
        .flatten();
    for g in groups {
        if g.file_name().to_string_lossy().starts_with(".tmp-") {
            // A force-deleted group's directory, renamed away before its removal finished.
            remove_tree(&g.path());
            continue;
        }
        for e in std::fs::read_dir(g.path()).into_iter().flatten().flatten() {
            if !keep.contains(&e.path()) {
                tracing::info!(dir = %e.path().display(), "removing an unfinished snapshot");
                remove_tree(&e.path());
            }
        }
    }
    for s in ready {
        if !dir(&home, &s.group, &s.name).join("meta.json").is_file() {
            tracing::warn!(
                group = s.group,
                name = s.name,
                "snapshot directory is gone; forgetting it"
            );
            store.delete_snapshot(&s.group, &s.name).await?;
        }
    }
    Ok(())
}

// ---- the manager's part ----

impl Manager {
    /// Takes snapshot `name` of sandbox `row`: memory and disk, processes included. A
    /// suspended sandbox is resumed first (as an exec would); the sandbox keeps running.
    /// Waits for execs and transfers in flight on it (the VM is paused while its memory is
    /// saved, under the sandbox's write lock). Runs to the end even if the caller goes away.
    pub(crate) async fn snapshot(
        self: &Arc<Self>,
        row: &api::Sandbox,
        name: &str,
    ) -> Result<Snapshot> {
        let claim_row = Snapshot {
            name: name.to_string(),
            group: row.group.clone(),
            sandbox: row.id.clone(),
            image: row.image.clone(),
            tier: row.tier,
            size_bytes: 0,
            created_at: String::new(),
        };
        let mgr = self.clone();
        tokio::spawn(async move {
            mgr.store().claim_snapshot(&claim_row).await?;
            let (group, name) = (claim_row.group.clone(), claim_row.name.clone());
            let files = mgr.new_files();
            let made = match mgr.store().set_snapshot_files(&group, &name, files).await {
                Ok(()) => mgr.take_snapshot(&claim_row, files).await,
                Err(e) => Err(e),
            };
            let final_dir = dir(&mgr.files_home(files), &group, &name);
            match made {
                Ok(size) => {
                    let ready = mgr.store().snapshot_ready(&group, &name, size).await;
                    match ready {
                        Ok(Some(snap)) => Ok(snap),
                        Ok(None) => {
                            remove_tree(&final_dir);
                            Err(Error::Conflict(format!(
                                "group {} was deleted while the snapshot was taken",
                                api::quote(&group)
                            )))
                        }
                        Err(e) => {
                            remove_tree(&final_dir);
                            Err(e)
                        }
                    }
                }
                Err(e) => {
                    mgr.store().delete_snapshot(&group, &name).await?;
                    Err(e)
                }
            }
        })
        .await
        .map_err(Error::task("the snapshot task failed"))?
    }

    /// Writes the snapshot's directory; returns its size.
    async fn take_snapshot(self: &Arc<Self>, s: &Snapshot, files: Files) -> Result<u64> {
        let home = self.files_home(files);
        let group_dir = root(&home).join(&s.group);
        let staging = group_dir.join(format!(".tmp-{}-{:016x}", s.name, rand::random::<u64>()));
        std::fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
        let made = self.write_snapshot(s, &staging, files).await;
        let result = made.and_then(|built| {
            let dest = dir(&home, &s.group, &s.name);
            std::fs::rename(&built, &dest).map_err(io(format!("creating {}", dest.display())))?;
            fsync(&group_dir)?;
            Ok(moat_vm::snapshot::allocated_bytes(&dest))
        });
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    /// Saves the VM into `staging/s` and flattens its disk onto the image's rootfs (or, for
    /// the shared storage, into one file); returns `staging/s`, complete and fsynced.
    async fn write_snapshot(
        self: &Arc<Self>,
        s: &Snapshot,
        staging: &Path,
        files: Files,
    ) -> Result<PathBuf> {
        let image = self.resolve_image(&s.image).await.map_err(|e| {
            Error::Conflict(format!(
                "the sandbox's image {} is not available ({}): a snapshot is kept over the \
                 image's disk",
                s.image,
                e.unwrap_or_else(|| "it was removed".to_string())
            ))
        })?;
        let built = staging.join("s");
        // Twice at most, as in `running`: a suspend may slip in between the resume and the lock.
        for _ in 0..2 {
            let row = self.get_row(&s.sandbox).await?;
            match row.state {
                api::SandboxState::Suspended => {
                    self.resume(&s.sandbox).await?;
                    continue;
                }
                api::SandboxState::Running => {}
                _ => return Err(conflict("snapshot", &row)),
            }
            let entry = self
                .entry(&s.sandbox)
                .ok_or_else(|| conflict("snapshot", &row))?;
            let mut slot = entry.vm.write().await;
            let Some(vm) = slot.as_mut() else {
                continue;
            };
            self.unpark(&s.sandbox, vm).await?;
            let mut meta = vm
                .snapshot(self.runtime(), &built)
                .await
                .map_err(Error::vm("taking the snapshot"))?;
            // The VM runs on; a read hold keeps a suspend or delete from removing the files
            // the copied layer's backing chain still reads until it is flattened.
            let _hold = slot.downgrade();
            let disk = built.join("disk.qcow2");
            match files {
                Files::Shared => {
                    let flat = built.join("disk.flat.qcow2");
                    moat_vm::disk::flatten(&disk, &flat)
                        .await
                        .map_err(Error::vm("flattening the snapshot's disk"))?;
                    std::fs::rename(&flat, &disk)
                        .map_err(io(format!("replacing {}", disk.display())))?;
                }
                Files::Local => moat_vm::disk::rebase(&disk, &image.rootfs, "raw")
                    .await
                    .map_err(Error::vm("flattening the snapshot's disk"))?,
            }
            fsync(&disk)?;
            let rootfs = std::fs::canonicalize(&image.rootfs)
                .map_err(io(format!("resolving {}", image.rootfs.display())))?;
            // A fork resumes a copy of this directory, and a resume needs to know the layer's
            // base (it becomes the fork's base for its suspends).
            meta.shared_base = Some(moat_vm::BaseDisk {
                path: rootfs,
                format: "raw".to_string(),
            });
            meta.store(&built)
                .map_err(Error::vm("writing the snapshot's metadata"))?;
            fsync(&built)?;
            return Ok(built);
        }
        Err(Error::Conflict(format!(
            "sandbox {} was suspended again while it was being resumed for the snapshot; retry",
            s.sandbox
        )))
    }
}

/// Removes snapshot `name` of `group` from disk (its row is already gone): from `home`, the
/// directory that holds its `snapshots/` (MOAT_HOME, or the shared directory).
pub(crate) async fn remove(home: PathBuf, group: &str, name: &str) -> Result<()> {
    let path = dir(&home, group, name);
    tokio::task::spawn_blocking(move || remove_tree(&path))
        .await
        .map_err(Error::task("removing the snapshot"))
}

/// Removes the snapshot directories of a deleted group (its rows went with it).
pub(crate) fn remove_group_dirs(home: &Path, group: &str) {
    remove_tree(&root(home).join(group));
}
