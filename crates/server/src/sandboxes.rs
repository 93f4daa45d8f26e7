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
//! Suspend: the VM is saved to `MOAT_HOME/suspended/<id>/<n>/` (n counts up) and ends; the
//! entry stays with no VM. The newest `<n>` is the one to resume; after a resume it keeps only
//! its `disk.qcow2`, the new VM's backing file, until the next suspend writes `<n+1>` (see
//! docs/SNAPSHOTS.md). A directory appears complete or not at all, so after a crash "the newest
//! `<n>` still has `memory.bin`" means "resumable".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use moat_image::{ImageConfig, ImageStore};
use moat_vm::{LaunchOptions, Runtime};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use crate::api::{self, Sandbox, SandboxState, Tier};
use crate::error::{Error, Result};
use crate::store::{self, Store};

/// One live sandbox: its VM (None while suspended, or once deleted) and its image's config,
/// for exec defaults.
pub struct Entry {
    vm: Arc<RwLock<Option<moat_vm::Sandbox>>>,
    config: ImageConfig,
}

/// A shared hold on a running sandbox for the duration of an exec.
pub struct Running {
    guard: OwnedRwLockReadGuard<Option<moat_vm::Sandbox>>,
    pub config: ImageConfig,
}

impl Running {
    pub fn sandbox(&self) -> Result<&moat_vm::Sandbox> {
        self.guard
            .as_ref()
            .ok_or_else(|| Error::Conflict("the sandbox was deleted".to_string()))
    }
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

fn vm_tier(t: Tier) -> moat_vm::Tier {
    match t {
        Tier::Xs => moat_vm::Tier::Xs,
        Tier::S => moat_vm::Tier::S,
        Tier::M => moat_vm::Tier::M,
        Tier::L => moat_vm::Tier::L,
        Tier::Xl => moat_vm::Tier::Xl,
    }
}

impl Manager {
    /// Takes over after a (re)start, before any request is served: adopts the VM of every
    /// `running` row (a row whose VM is gone becomes `failed`), finishes interrupted deletes,
    /// rolls back interrupted creates, and destroys detached VMs that no row claims.
    pub async fn start(rt: Runtime, store: Store) -> Result<Manager> {
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

    async fn get_row(&self, id: &str) -> Result<Sandbox> {
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
        let entry = Arc::new(Entry {
            vm: Arc::new(RwLock::new(None)),
            config,
        });
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
        let entry = Arc::new(Entry {
            vm: Arc::new(RwLock::new(Some(vm))),
            config,
        });
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

    fn entry(&self, id: &str) -> Option<Arc<Entry>> {
        self.lock_live().get(id).cloned()
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
        let images = self.images.clone();
        let r = image_ref.clone();
        let image = tokio::task::spawn_blocking(move || images.resolve(&r))
            .await
            .map_err(|e| Error::Internal(format!("resolving the image: {e}")))?
            .map_err(|e| {
                if e.is_not_found() {
                    Error::BadRequest(format!(
                        "unknown image {}: import it first (`moat image import`), or see \
                         `moat image ls`",
                        api::quote(&image_ref)
                    ))
                } else {
                    Error::Internal(format!("resolving image {image_ref}: {e}"))
                }
            })?;
        let row = Sandbox {
            id: new_id(),
            group: group.name.clone(),
            state: SandboxState::Creating,
            reason: None,
            image: image.digest.clone(),
            tier,
            env: req.env,
            labels: req.labels,
            created_at: String::new(),
            updated_at: String::new(),
        };
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
            mgr.lock_live().insert(
                id.clone(),
                Arc::new(Entry {
                    vm,
                    config: image.config.clone(),
                }),
            );
            let started = async {
                let t = vm_tier(tier);
                let tpl =
                    moat_vm::template::ensure(&mgr.rt, &image.digest, &image.rootfs, t).await?;
                moat_vm::Sandbox::restore_with(
                    &mgr.rt,
                    &id,
                    &tpl.dir,
                    LaunchOptions { detached: true },
                )
                .await
            }
            .await;
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

    /// Destroys the sandbox's VM and removes its row. Waits for running execs to end.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<()> {
        let mgr = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let i = id.clone();
            mgr.store
                .call(move |c| store::set_sandbox_state(c, &i, SandboxState::Deleting, None))
                .await?;
            if let Some(entry) = mgr.entry(&id) {
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
fn conflict(what: &str, row: &Sandbox) -> Error {
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
