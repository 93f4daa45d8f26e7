//! The sandbox manager: owns the running `moat_vm::Sandbox`es of the daemon, keeps their store
//! rows in step, and re-adopts them after a restart.
//!
//! The store row is the source of truth for the API; the VM's own state lives in
//! `MOAT_HOME/run/<id>/`. Every sandbox is launched detached, so its QEMU outlives the daemon
//! (even `kill -9`) and the next daemon adopts it in [`Manager::start`].
//!
//! Concurrency: each sandbox has one `RwLock`. Execs take it shared (many execs on one
//! sandbox run at once); lifecycle changes (create, delete, suspend, resume) take it
//! exclusively, so they are serialised with each other and never pull the VM out from under
//! a running exec. Lifecycle work runs in spawned tasks: a client that hangs up must not
//! leave a VM half-created or a row stuck in `creating`/`deleting`.
//!
//! Suspend: the VM is saved to `MOAT_HOME/suspended/<id>/<n>/` (n counts up; a fork of a
//! snapshot starts as if resumed from `<0>`, see `Manager::start_fork`) and ends; the
//! entry stays with no VM. The newest `<n>` is the one to resume; after a resume it keeps only
//! its `disk.qcow2`, the new VM's backing file, until the next suspend writes `<n+1>` (see
//! docs/SNAPSHOTS.md). A directory appears complete or not at all, so after a crash "the newest
//! `<n>` still has `memory.bin`" means "resumable".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use moat_image::{Image, ImageConfig, ImageStore};
use moat_vm::{LaunchOptions, Runtime};
use tokio::sync::{watch, OwnedRwLockReadGuard, RwLock};

use crate::api::{self, Sandbox, SandboxState, Tier};
use crate::error::{Error, Result};
use crate::store::{self, Store};

/// One live sandbox: its VM (None while suspended, or once deleted) and its image's config,
/// for exec defaults.
pub struct Entry {
    pub(crate) vm: Arc<RwLock<Option<moat_vm::Sandbox>>>,
    config: ImageConfig,
    /// Becomes true when a delete begins. A delete needs the write lock, which waits for every
    /// [`Running`]; holders watch this and let go at once instead of running to their end.
    deleted: watch::Sender<bool>,
}

impl Entry {
    fn new(vm: Arc<RwLock<Option<moat_vm::Sandbox>>>, config: ImageConfig) -> Arc<Entry> {
        Arc::new(Entry {
            vm,
            config,
            deleted: watch::channel(false).0,
        })
    }
}

/// A shared hold on a running sandbox for the duration of an exec.
pub struct Running {
    guard: OwnedRwLockReadGuard<Option<moat_vm::Sandbox>>,
    pub config: ImageConfig,
    deleted: watch::Receiver<bool>,
}

impl Running {
    pub fn sandbox(&self) -> Result<&moat_vm::Sandbox> {
        self.guard.as_ref().ok_or_else(deleted_error)
    }

    /// Resolves once a delete of the sandbox has begun: the holder must then drop this hold
    /// (the delete is waiting for it).
    pub async fn deleted(&self) {
        let mut rx = self.deleted.clone();
        // An error means the entry itself is gone: so is the sandbox.
        let _ = rx.wait_for(|d| *d).await;
    }

    /// `fut`, unless the sandbox is deleted first: then `fut` is dropped (which ends the exec
    /// or transfer in the guest) and the answer is a 409 saying so.
    pub async fn unless_deleted<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::select! {
            r = fut => r,
            () = self.deleted() => Err(deleted_error()),
        }
    }
}

pub(crate) fn deleted_error() -> Error {
    Error::Conflict("the sandbox was deleted while this request was running".to_string())
}

/// What a new sandbox starts from.
enum Source {
    /// The image's template (built on first use).
    Image(Image),
    /// A complete snapshot directory (`snapshots/<group>/<name>`): a fork.
    Snapshot(PathBuf),
}

pub struct Manager {
    rt: Runtime,
    images: ImageStore,
    store: Store,
    live: Mutex<HashMap<String, Arc<Entry>>>,
}

/// A moat_vm error as an API error: what the guest refused is the caller's to fix (400); the
/// rest is ours (500, details in the log).
pub fn vm_error(what: &str, e: moat_vm::Error) -> Error {
    match e {
        moat_vm::Error::Guest { message, .. } => Error::BadRequest(format!("{what}: {message}")),
        e => Error::Internal(format!("{what}: {e}")),
    }
}

fn new_id() -> String {
    format!("sb-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl Manager {
    /// Takes over after a (re)start, before any request is served: adopts the VM of every
    /// `running` row (a row whose VM is gone becomes `failed`), finishes interrupted deletes,
    /// rolls back interrupted creates, and destroys detached VMs that no row claims.
    pub async fn start(rt: Runtime, store: Store) -> Result<Manager> {
        crate::snapshots::recover(&rt.home, &store).await?;
        let images = ImageStore::open(&rt.home.join("images"))
            .map_err(|e| Error::Config(format!("opening the image store: {e}")))?;
        let mgr = Manager {
            rt,
            images,
            store,
            live: Mutex::new(HashMap::new()),
        };
        let rows = mgr.store.call(|c| store::list_sandboxes(c, None)).await?;
        let mut orphans: HashSet<String> = mgr.rt.orphans().into_iter().collect();
        for row in rows {
            let has_vm = orphans.remove(&row.id);
            mgr.remove_partial_suspends(&row.id);
            match row.state {
                SandboxState::Running => mgr.readopt(&row, has_vm).await?,
                // Nobody was told these exist (create) or are gone (delete) for certain:
                // roll the create back, finish the delete.
                SandboxState::Creating | SandboxState::Deleting => {
                    if has_vm {
                        destroy_orphan(&mgr.rt, &row.id).await;
                    }
                    mgr.remove_suspend_dirs(&row.id);
                    let id = row.id.clone();
                    mgr.store
                        .call(move |c| store::delete_sandbox(c, &id))
                        .await?;
                    tracing::info!(id = row.id, state = row.state.as_str(), "rolled back");
                }
                SandboxState::Suspending | SandboxState::Resuming => {
                    mgr.recover_transition(&row, has_vm).await?;
                }
                SandboxState::Suspended => {
                    if has_vm {
                        destroy_orphan(&mgr.rt, &row.id).await;
                    }
                    if mgr.resumable(&row.id).is_some() {
                        mgr.insert_suspended(&row).await;
                    } else {
                        mgr.fail(
                            &row.id,
                            "its suspend directory was gone when the daemon started",
                        )
                        .await?;
                    }
                }
                SandboxState::Failed => {
                    if has_vm {
                        destroy_orphan(&mgr.rt, &row.id).await;
                    }
                }
            }
        }
        for id in orphans {
            tracing::warn!(id, "destroying a detached sandbox the store does not know");
            destroy_orphan(&mgr.rt, &id).await;
        }
        Ok(mgr)
    }

    async fn readopt(&self, row: &Sandbox, has_vm: bool) -> Result<()> {
        if !has_vm {
            return self
                .fail(
                    &row.id,
                    "its VM was gone when the daemon started (QEMU exited, or the host \
                     restarted)",
                )
                .await;
        }
        match moat_vm::Sandbox::adopt(&self.rt, &row.id).await {
            Ok(sb) => {
                let config = self.image_config(&row.image).await;
                self.insert(&row.id, sb, config);
                tracing::info!(id = row.id, "re-adopted");
                Ok(())
            }
            Err(e) => {
                self.fail(
                    &row.id,
                    &format!("adopting its VM after a restart failed: {e}"),
                )
                .await
            }
        }
    }

    /// A row left in `suspending` or `resuming` by a crash, decided from what is on disk: a
    /// complete, unresumed suspend directory wins (the suspend finished, or the resume never
    /// got going: the VM, if any, is one that a suspend was saving); else a live VM is adopted
    /// (the suspend never got going, or the resume finished); else the sandbox is lost.
    async fn recover_transition(&self, row: &Sandbox, has_vm: bool) -> Result<()> {
        let was = row.state.as_str();
        if self.resumable(&row.id).is_some() {
            if has_vm {
                destroy_orphan(&self.rt, &row.id).await;
            }
            self.set_state(&row.id, SandboxState::Suspended).await?;
            self.insert_suspended(row).await;
            tracing::info!(id = row.id, was, "recovered as suspended");
            return Ok(());
        }
        if has_vm {
            if let Ok(sb) = moat_vm::Sandbox::adopt(&self.rt, &row.id).await {
                self.set_state(&row.id, SandboxState::Running).await?;
                let config = self.image_config(&row.image).await;
                self.insert(&row.id, sb, config);
                tracing::info!(id = row.id, was, "recovered as running");
                return Ok(());
            }
        }
        self.fail(
            &row.id,
            &format!(
                "the daemon stopped while it was {was}, and neither a complete suspend nor a                  live VM was left"
            ),
        )
        .await
    }

    async fn set_state(&self, id: &str, state: SandboxState) -> Result<Sandbox> {
        let i = id.to_string();
        self.store
            .call(move |c| store::set_sandbox_state(c, &i, state, None))
            .await?
            .ok_or_else(|| Error::Conflict(format!("sandbox {id} was deleted")))
    }

    pub(crate) async fn get_row(&self, id: &str) -> Result<Sandbox> {
        let i = id.to_string();
        self.store
            .call(move |c| store::get_sandbox(c, &i))
            .await?
            .ok_or_else(|| Error::Conflict(format!("sandbox {id} was deleted")))
    }

    /// `MOAT_HOME/suspended/<id>`: the sandbox's suspend directories, `<n>` each.
    fn suspend_root(&self, id: &str) -> PathBuf {
        self.rt.home.join("suspended").join(id)
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
    fn resumable(&self, id: &str) -> Option<PathBuf> {
        let (_, dir) = self.suspend_dirs(id).pop()?;
        dir.join("memory.bin").exists().then_some(dir)
    }

    /// Removes what suspends of `id` interrupted by a crash left behind (`.tmp-*`, never
    /// complete, never resumed from).
    fn remove_partial_suspends(&self, id: &str) {
        for e in std::fs::read_dir(self.suspend_root(id))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(id, error = %err, "removing {}", e.path().display());
                }
            }
        }
    }

    fn remove_suspend_dirs(&self, id: &str) {
        let root = self.suspend_root(id);
        if let Err(e) = std::fs::remove_dir_all(&root) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(id, error = %e, "removing {}", root.display());
            }
        }
    }

    /// Registers a suspended sandbox (no VM), so that resume and auto-resume find it.
    async fn insert_suspended(&self, row: &Sandbox) {
        let config = self.image_config(&row.image).await;
        let entry = Entry::new(Arc::new(RwLock::new(None)), config);
        self.lock_live().insert(row.id.clone(), entry);
    }

    async fn fail(&self, id: &str, reason: &str) -> Result<()> {
        tracing::warn!(id, reason, "sandbox failed");
        let (id, reason) = (id.to_string(), reason.to_string());
        self.store
            .call(move |c| {
                store::set_sandbox_state(c, &id, SandboxState::Failed, Some(&reason)).map(|_| ())
            })
            .await
    }

    /// The config of an image by digest; an image removed since is treated as empty (the
    /// sandbox's disk is its own, so it still runs).
    async fn image_config(&self, digest: &str) -> ImageConfig {
        let images = self.images.clone();
        let digest = digest.to_string();
        tokio::task::spawn_blocking(move || images.resolve(&digest).map(|i| i.config))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default()
    }

    fn insert(&self, id: &str, vm: moat_vm::Sandbox, config: ImageConfig) {
        let entry = Entry::new(Arc::new(RwLock::new(Some(vm))), config);
        self.lock_live().insert(id.to_string(), entry);
    }

    /// The daemon's image store (the runtime's `images/`).
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// MOAT_HOME of the runtime (its templates live there).
    pub fn runtime_home(&self) -> PathBuf {
        self.rt.home.clone()
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn entry(&self, id: &str) -> Option<Arc<Entry>> {
        self.lock_live().get(id).cloned()
    }

    pub(crate) fn runtime(&self) -> &Runtime {
        &self.rt
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Creates and starts a sandbox in `group` (a restore of the image's template, launched
    /// detached). Runs to the end even if the caller goes away.
    pub async fn create(
        self: &Arc<Self>,
        group: &api::Group,
        req: api::CreateSandbox,
    ) -> Result<Sandbox> {
        let image_ref = req
            .image
            .clone()
            .unwrap_or_else(|| group.spec.image.clone());
        let tier = req.tier.unwrap_or(group.spec.tier);
        let image = self.resolve_image(&image_ref).await.map_err(|e| match e {
            Some(e) => Error::Internal(format!("resolving image {image_ref}: {e}")),
            None => Error::BadRequest(format!(
                "unknown image {}: import it first (`moat image import`), or see `moat image ls`",
                api::quote(&image_ref)
            )),
        })?;
        let row = self.new_row(group, &image.digest, tier, &req);
        let config = image.config.clone();
        self.launch(row, config, Source::Image(image)).await
    }

    /// The image `r` (a name or digest): `Err(None)` if there is no such image.
    pub(crate) async fn resolve_image(
        &self,
        r: &str,
    ) -> std::result::Result<Image, Option<String>> {
        let images = self.images.clone();
        let r = r.to_string();
        tokio::task::spawn_blocking(move || images.resolve(&r))
            .await
            .map_err(|e| Some(e.to_string()))?
            .map_err(|e| (!e.is_not_found()).then(|| e.to_string()))
    }

    fn new_row(
        &self,
        group: &api::Group,
        image: &str,
        tier: Tier,
        req: &api::CreateSandbox,
    ) -> Sandbox {
        Sandbox {
            id: new_id(),
            group: group.name.clone(),
            state: SandboxState::Creating,
            reason: None,
            image: image.to_string(),
            tier,
            env: req.env.clone(),
            labels: req.labels.clone(),
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    /// Forks snapshot `dir` of `group` `count` times (see [`Source::Snapshot`]): all of them
    /// start, or none is left (the ones that did are deleted again and the first error is
    /// returned). Runs to the end even if the caller goes away.
    pub(crate) async fn fork(
        self: &Arc<Self>,
        group: &api::Group,
        snap: &api::Snapshot,
        dir: PathBuf,
        req: api::CreateSandbox,
    ) -> Result<Vec<Sandbox>> {
        let config = self.image_config(&snap.image).await;
        let rows: Vec<Sandbox> = (0..req.count.unwrap_or(1))
            .map(|_| self.new_row(group, &snap.image, snap.tier, &req))
            .collect();
        let mgr = self.clone();
        tokio::spawn(async move {
            let started = futures_util::future::join_all(
                rows.into_iter()
                    .map(|row| mgr.launch(row, config.clone(), Source::Snapshot(dir.clone()))),
            )
            .await;
            let mut failure = None;
            let mut forks = Vec::new();
            for r in started {
                match r {
                    Ok(sb) => forks.push(sb),
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            let Some(e) = failure else {
                return Ok(forks);
            };
            for sb in forks {
                if let Err(de) = mgr.delete(&sb.id).await {
                    tracing::warn!(id = sb.id, error = %de, "rolling back a fork");
                }
            }
            Err(e)
        })
        .await
        .map_err(|e| Error::Internal(format!("the fork task failed: {e}")))?
    }

    /// Inserts `row` (state creating) and starts its VM from `source`, detached; the row
    /// becomes running, or is removed again if the start fails.
    async fn launch(
        self: &Arc<Self>,
        row: Sandbox,
        config: ImageConfig,
        source: Source,
    ) -> Result<Sandbox> {
        let r = row.clone();
        self.store
            .call(move |c| store::insert_sandbox(c, &r))
            .await?;
        let mgr = self.clone();
        tokio::spawn(async move {
            let id = row.id.clone();
            // Locked before it is visible and until the VM is in place, so a delete that
            // comes meanwhile waits for it.
            let vm = Arc::new(RwLock::new(None));
            let mut slot = vm.clone().write_owned().await;
            mgr.lock_live().insert(id.clone(), Entry::new(vm, config));
            let opts = LaunchOptions { detached: true };
            let started = match source {
                Source::Image(image) => {
                    async {
                        let tpl = moat_vm::template::ensure(
                            &mgr.rt,
                            &image.digest,
                            &image.rootfs,
                            row.tier,
                        )
                        .await?;
                        moat_vm::Sandbox::restore_with(&mgr.rt, &id, &tpl.dir, opts).await
                    }
                    .await
                }
                Source::Snapshot(snap) => mgr.start_fork(&id, &snap).await,
            };
            match started {
                Ok(sb) => {
                    *slot = Some(sb);
                    drop(slot);
                    let i = id.clone();
                    mgr.store
                        .call(move |c| store::set_sandbox_state(c, &i, SandboxState::Running, None))
                        .await?
                        .ok_or_else(|| Error::Conflict(format!("sandbox {id} was deleted")))
                }
                Err(e) => {
                    mgr.lock_live().remove(&id);
                    mgr.remove_suspend_dirs(&id);
                    let i = id.clone();
                    mgr.store
                        .call(move |c| store::delete_sandbox(c, &i))
                        .await?;
                    Err(vm_error("starting the sandbox", e))
                }
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("the create task failed: {e}")))?
    }

    /// Starts a fork of snapshot `snap` as a *resume* of a private copy of it: the copy is
    /// the fork's first suspend directory (`suspended/<id>/0/`, memory image hard-linked,
    /// disk layer copied), so the fork never reads the snapshot's files after it started
    /// (deleting the snapshot cannot break it) and the rest of its life (suspend, resume,
    /// adopt, delete) is that of any resumed sandbox. The snapshot's disk layer lies over the
    /// image's rootfs (its `shared_base`), so the fork's chain is
    /// `run/<id>/disk.qcow2 → suspended/<id>/0/disk.qcow2 → rootfs`.
    async fn start_fork(
        &self,
        id: &str,
        snap: &std::path::Path,
    ) -> moat_vm::Result<moat_vm::Sandbox> {
        let root = self.suspend_root(id);
        let (snap_dir, root_dir) = (snap.to_path_buf(), root.clone());
        let dir = tokio::task::spawn_blocking(move || {
            crate::snapshots::copy_for_fork(&snap_dir, &root_dir)
        })
        .await
        .map_err(|e| moat_vm::Error::Snapshot(format!("copying the snapshot: {e}")))?
        .map_err(|e| moat_vm::Error::Snapshot(format!("copying the snapshot: {e}")))?;
        let sb =
            moat_vm::Sandbox::resume(&self.rt, id, &dir, LaunchOptions { detached: true }).await?;
        if let Err(e) = moat_vm::snapshot::discard_memory(&dir) {
            tracing::warn!(id, error = %e, "discarding the fork's memory image link");
        }
        Ok(sb)
    }

    /// Destroys the sandbox's VM and removes its row. Execs and file transfers in flight are
    /// told to end (see [`Running::deleted`]) and the VM goes as soon as they let go.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<()> {
        let mgr = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let i = id.clone();
            mgr.store
                .call(move |c| store::set_sandbox_state(c, &i, SandboxState::Deleting, None))
                .await?;
            if let Some(entry) = mgr.entry(&id) {
                // Execs and transfers in flight end now instead of the delete waiting for them.
                entry.deleted.send_replace(true);
                let vm = entry.vm.write().await.take();
                if let Some(vm) = vm {
                    vm.destroy().await;
                }
                mgr.lock_live().remove(&id);
            }
            mgr.remove_suspend_dirs(&id);
            mgr.store.call(move |c| store::delete_sandbox(c, &id)).await
        })
        .await
        .map_err(|e| Error::Internal(format!("the delete task failed: {e}")))?
    }

    /// A shared hold on the running sandbox `row`, resuming it first if it is suspended: the
    /// one way in for every data-plane route (exec, files), so that all of them resume
    /// transparently. 409 for a sandbox that is creating, deleting or failed.
    pub async fn running(self: &Arc<Self>, row: &Sandbox) -> Result<Running> {
        // Twice at most: a suspend may slip in between our resume and our read lock; after
        // that the caller gets the 409 rather than a loop.
        for _ in 0..2 {
            let current = self
                .get_row(&row.id)
                .await
                .map_err(|_| Error::Conflict(format!("sandbox {} was deleted", row.id)))?;
            match current.state {
                SandboxState::Running
                | SandboxState::Suspending
                | SandboxState::Suspended
                | SandboxState::Resuming => {}
                _ => return Err(not_running(&current)),
            }
            let entry = self.entry(&row.id).ok_or_else(|| not_running(&current))?;
            // Queued behind any suspend or resume in progress (the lock is fair).
            let guard = entry.vm.clone().read_owned().await;
            if guard.is_some() {
                return Ok(Running {
                    guard,
                    config: entry.config.clone(),
                    deleted: entry.deleted.subscribe(),
                });
            }
            drop(guard);
            self.resume(&row.id).await?;
        }
        Err(Error::Conflict(format!(
            "sandbox {} was suspended again while it was being resumed; retry",
            row.id
        )))
    }

    /// Suspends a running sandbox into a new `suspended/<id>/<n>/` (the VM ends; only disk
    /// remains) and then removes the older directories. Suspending a suspended sandbox is a
    /// no-op; any state other than running is a 409. Runs to the end even if the caller goes.
    pub async fn suspend(self: &Arc<Self>, id: &str) -> Result<Sandbox> {
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
            let vm = slot.take().ok_or_else(|| conflict("suspend", &row))?;
            mgr.set_state(&id, SandboxState::Suspending).await?;
            let dirs = mgr.suspend_dirs(&id);
            let next = dirs.last().map_or(1, |(n, _)| n + 1);
            let dest = mgr.suspend_root(&id).join(next.to_string());
            let started = Instant::now();
            match vm.suspend(&mgr.rt, &dest).await {
                Ok(meta) => {
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
                    mgr.set_state(&id, SandboxState::Suspended).await
                }
                Err(e) => {
                    // The VM is gone either way, and the previous directory (if any) has
                    // given up its memory image: nothing is left to resume.
                    let err = vm_error("suspending the sandbox", e);
                    mgr.lock_live().remove(&id);
                    mgr.fail(&id, &format!("{err}")).await?;
                    Err(err)
                }
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("the suspend task failed: {e}")))?
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
            mgr.set_state(&id, SandboxState::Resuming).await?;
            let started = Instant::now();
            let resumed =
                moat_vm::Sandbox::resume(&mgr.rt, &id, &dir, LaunchOptions { detached: true })
                    .await;
            match resumed {
                Ok(sb) => {
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
                    mgr.set_state(&id, SandboxState::Suspended).await?;
                    Err(vm_error("resuming the sandbox", e))
                }
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("the resume task failed: {e}")))?
    }

    /// Lets go of every VM without stopping it (a graceful daemon stop): the next daemon
    /// adopts them.
    pub async fn detach_all(&self) {
        let entries: Vec<(String, Arc<Entry>)> = self.lock_live().drain().collect();
        for (id, entry) in entries {
            if let Some(vm) = entry.vm.write().await.take() {
                if let Err(e) = vm.detach() {
                    tracing::warn!(id, error = %e, "detaching");
                }
            }
        }
    }
}

/// 409 for a sandbox in a state that does not allow `what`.
pub(crate) fn conflict(what: &str, row: &Sandbox) -> Error {
    Error::Conflict(format!(
        "cannot {what} sandbox {}: it is {}{}",
        row.id,
        row.state.as_str(),
        reason_suffix(row)
    ))
}

fn not_running(row: &Sandbox) -> Error {
    Error::Conflict(format!(
        "sandbox {} is {}{}, not running",
        row.id,
        row.state.as_str(),
        reason_suffix(row)
    ))
}

fn reason_suffix(row: &Sandbox) -> String {
    row.reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default()
}

/// Takes over a detached VM nobody wants and destroys it (adopt kills what it cannot adopt).
async fn destroy_orphan(rt: &Runtime, id: &str) {
    match moat_vm::Sandbox::adopt(rt, id).await {
        Ok(sb) => sb.destroy().await,
        Err(e) => tracing::warn!(id, error = %e, "destroying an orphan"),
    }
}

/// Whether `labels` has every pair of `selector`.
pub fn matches(labels: &BTreeMap<String, String>, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}
