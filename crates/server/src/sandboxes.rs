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
//!
//! Warm pools: a group with `pool.size = N` keeps N restored VMs of its default image and tier
//! (`pools`), each with a `pool_members` row under the id it will have as a sandbox, so that
//! the next daemon re-adopts them. A create that matches hands one over (the row moves to
//! `sandboxes` in one transaction) and the pool is refilled in the background.
//!
//! Lifecycle: every data-plane request holds a [`Running`], which counts as activity while it
//! lives and records the time when it ends; one reaper task applies the groups' timers every
//! [`TICK`] (idle → suspend or delete, suspended TTL, maximum lifetime) and keeps pools full.
//!
//! Capacity: every VM that exists holds its tier's memory and vCPUs in [`Capacity`] until it
//! ends or is suspended; creates, resumes and refills that do not fit are refused (429).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_image::{Image, ImageConfig, ImageStore};
use moat_vm::{LaunchOptions, Runtime};
use tokio::sync::{watch, OwnedRwLockReadGuard, RwLock};

use crate::api::{self, OnIdle, Sandbox, SandboxState, Tier};
use crate::capacity::{Capacity, Limits, Usage};
use crate::error::{Error, Result};
use crate::metrics::{self, Metrics};
use crate::store::{self, Store};

/// How often the reaper applies lifecycle timers and tops up pools.
const TICK: Duration = Duration::from_millis(500);
/// While background processes run in an otherwise idle sandbox, how often the reaper asks the
/// agent whether they still do (the idle clock starts when they are seen gone).
const PROBE_EVERY_MS: i64 = 1000;
/// After a refill fails (no room, a broken image), how long before the pool tries again.
const REFILL_BACKOFF: Duration = Duration::from_secs(5);
/// After a hand-over, how long before the pool refills (the reaper's next tick after that).
const REFILL_AFTER_HAND_OVER: Duration = Duration::from_secs(1);

/// One live sandbox: its VM (None while suspended, or once deleted), its image's config, for
/// exec defaults, and its activity, for the idle timer.
pub struct Entry {
    pub(crate) vm: Arc<RwLock<Option<moat_vm::Sandbox>>>,
    config: ImageConfig,
    /// Becomes true when a delete begins. A delete needs the write lock, which waits for every
    /// [`Running`]; holders watch this and let go at once instead of running to their end.
    deleted: watch::Sender<bool>,
    activity: Arc<Activity>,
}

impl Entry {
    fn new(vm: Arc<RwLock<Option<moat_vm::Sandbox>>>, config: ImageConfig) -> Arc<Entry> {
        Arc::new(Entry {
            vm,
            config,
            deleted: watch::channel(false).0,
            activity: Arc::default(),
        })
    }
}

/// What the idle timer needs to know, updated without locks by every data-plane request.
#[derive(Default)]
struct Activity {
    /// Requests in flight (including ones waiting for the sandbox's lock).
    active: AtomicU32,
    /// When the last one ended, Unix milliseconds (0: none since the daemon started).
    last_ms: AtomicI64,
    /// `last_ms` changed since it was last written to the store.
    dirty: AtomicBool,
    /// Background processes were running when the reaper last looked.
    procs: AtomicBool,
    /// When the reaper looks at them next, Unix milliseconds.
    next_probe_ms: AtomicI64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::SeqCst);
        self.dirty.store(true, Ordering::SeqCst);
    }
}

/// Counts as activity while it lives; records the time it ends.
struct ActiveHold(Arc<Activity>);

impl ActiveHold {
    fn new(a: Arc<Activity>) -> ActiveHold {
        a.active.fetch_add(1, Ordering::SeqCst);
        ActiveHold(a)
    }
}

impl Drop for ActiveHold {
    fn drop(&mut self) {
        // The time first: the reaper reads `active == 0` and then the time.
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A shared hold on a running sandbox for the duration of an exec (or a file or process
/// request): the VM stays while it lives, and it counts as activity for the idle timer.
pub struct Running {
    guard: OwnedRwLockReadGuard<Option<moat_vm::Sandbox>>,
    pub config: ImageConfig,
    deleted: watch::Receiver<bool>,
    _active: ActiveHold,
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
    metrics: Arc<Metrics>,
    cap: Capacity,
    /// Ready VMs of each group's warm pool.
    pools: Mutex<HashMap<String, Vec<PoolVm>>>,
    /// One refill at a time per group.
    pool_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Groups whose last refill failed, and until when they wait.
    pool_backoff: Mutex<HashMap<String, Instant>>,
    /// Sandboxes the reaper is acting on (so a slow suspend is not started twice).
    acting: Mutex<HashSet<String>>,
    stopping: AtomicBool,
}

/// A ready VM in a warm pool; `id` is the id it gets as a sandbox.
struct PoolVm {
    id: String,
    /// Manifest digest.
    image: String,
    tier: Tier,
    vm: moat_vm::Sandbox,
}

/// What the reaper does to a sandbox.
enum Act {
    Delete(&'static str),
    /// The idle timer is due (or background processes need a look): `idle_ms` and what to do.
    Idle {
        idle_ms: i64,
        on_idle: OnIdle,
        stored_last_ms: i64,
    },
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
    /// Pool members whose VM is alive are re-adopted into their pools; the rest are dropped.
    pub async fn start(
        rt: Runtime,
        store: Store,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Result<Manager> {
        crate::snapshots::recover(&rt.home, &store).await?;
        let images = ImageStore::open(&rt.home.join("images"))
            .map_err(|e| Error::Config(format!("opening the image store: {e}")))?;
        let mgr = Manager {
            rt,
            images,
            store,
            live: Mutex::new(HashMap::new()),
            metrics,
            cap: Capacity::new(limits),
            pools: Mutex::new(HashMap::new()),
            pool_locks: Mutex::new(HashMap::new()),
            pool_backoff: Mutex::new(HashMap::new()),
            acting: Mutex::new(HashSet::new()),
            stopping: AtomicBool::new(false),
        };
        let rows = mgr.store.call(|c| store::list_sandboxes(c, None)).await?;
        let mut orphans: HashSet<String> = mgr.rt.orphans().into_iter().collect();
        let members = mgr.store.call(|c| store::list_pool_members(c)).await?;
        for m in members {
            let adopted = if orphans.remove(&m.id) {
                match moat_vm::Sandbox::adopt(&mgr.rt, &m.id).await {
                    Ok(vm) => Some(vm),
                    Err(e) => {
                        tracing::warn!(id = m.id, error = %e, "adopting a pool member");
                        None
                    }
                }
            } else {
                None
            };
            match adopted {
                Some(vm) => {
                    mgr.cap.force(&m.id, m.tier);
                    tracing::info!(id = m.id, group = m.group, "re-adopted a pool member");
                    mgr.lock_pools().entry(m.group).or_default().push(PoolVm {
                        id: m.id,
                        image: m.image,
                        tier: m.tier,
                        vm,
                    });
                }
                None => {
                    // Its refill was interrupted, or its VM died: the pool makes another.
                    let id = m.id.clone();
                    mgr.store
                        .call(move |c| store::delete_pool_member(c, &id))
                        .await?;
                }
            }
        }
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
                self.cap.force(&row.id, row.tier);
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
                self.cap.force(&row.id, row.tier);
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

    /// Creates and starts a sandbox in `group`: a VM of the group's warm pool if the request
    /// asks for the group's image and tier and one is ready, else a restore of the image's
    /// template (launched detached). Runs to the end even if the caller goes away.
    pub async fn create(
        self: &Arc<Self>,
        group: &api::Group,
        req: api::CreateSandbox,
    ) -> Result<Sandbox> {
        let t0 = Instant::now();
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
        let mut row = self.new_row(group, &image.digest, tier, &req);
        if group.spec.pool.size > 0 {
            let g = [("group", group.name.as_str())];
            if tier == group.spec.tier {
                if let Some(pvm) = self.take_pooled(&group.name, &image.digest, tier) {
                    row.id = pvm.id.clone();
                    let mgr = self.clone();
                    let config = image.config.clone();
                    let r = row.clone();
                    let handed = tokio::spawn(async move { mgr.hand_over(pvm, r, config).await })
                        .await
                        .map_err(|e| Error::Internal(format!("the hand-over task failed: {e}")))?;
                    // The refill waits a moment: a restore takes the CPU for a few hundred ms
                    // (TCG), and the new sandbox's first requests come first.
                    self.back_off_for(&group.name, REFILL_AFTER_HAND_OVER);
                    if let Some(sb) = handed {
                        self.metrics.count(metrics::POOL_HITS, &g);
                        self.metrics
                            .observe_op(metrics::CREATE, &[("pool", "hit")], t0.elapsed());
                        return Ok(sb);
                    }
                    row.id = new_id();
                }
            }
            self.metrics.count(metrics::POOL_MISSES, &g);
        }
        let config = image.config.clone();
        let created = self.launch(row, config, Source::Image(image)).await?;
        self.metrics
            .observe_op(metrics::CREATE, &[("pool", "miss")], t0.elapsed());
        Ok(created)
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
            last_activity_at: None,
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

    /// Reserves room for `row` (429 if the host has none), inserts it (state creating) and
    /// starts its VM from `source`, detached; the row becomes running, or is removed again
    /// (and the room given back) if the start fails.
    async fn launch(
        self: &Arc<Self>,
        row: Sandbox,
        config: ImageConfig,
        source: Source,
    ) -> Result<Sandbox> {
        self.cap.reserve(
            &row.id,
            row.tier,
            &format!("a new tier {} sandbox", row.tier.as_str()),
        )?;
        let r = row.clone();
        if let Err(e) = self.store.call(move |c| store::insert_sandbox(c, &r)).await {
            self.cap.release(&row.id);
            return Err(e);
        }
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
                    mgr.cap.release(&id);
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
                mgr.cap.release(&id);
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
            // Active from now on: the reaper must not suspend it while we wait for the lock.
            let active = ActiveHold::new(entry.activity.clone());
            // Queued behind any suspend or resume in progress (the lock is fair).
            let guard = entry.vm.clone().read_owned().await;
            if guard.is_some() {
                return Ok(Running {
                    guard,
                    config: entry.config.clone(),
                    deleted: entry.deleted.subscribe(),
                    _active: active,
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
        self.suspend_inner(id, None).await
    }

    /// [`Manager::suspend`]; with `idle_since_ms`, only if there was no activity after that
    /// time (the reaper decided at that time that the sandbox was idle).
    async fn suspend_inner(
        self: &Arc<Self>,
        id: &str,
        idle_since_ms: Option<i64>,
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
            mgr.set_state(&id, SandboxState::Suspending).await?;
            let dirs = mgr.suspend_dirs(&id);
            let next = dirs.last().map_or(1, |(n, _)| n + 1);
            let dest = mgr.suspend_root(&id).join(next.to_string());
            let started = Instant::now();
            let suspended = vm.suspend(&mgr.rt, &dest).await;
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
            mgr.cap
                .reserve(&id, row.tier, &format!("resuming sandbox {id}"))?;
            if let Err(e) = mgr.set_state(&id, SandboxState::Resuming).await {
                mgr.cap.release(&id);
                return Err(e);
            }
            let started = Instant::now();
            let resumed =
                moat_vm::Sandbox::resume(&mgr.rt, &id, &dir, LaunchOptions { detached: true })
                    .await;
            match resumed {
                Ok(sb) => {
                    mgr.metrics
                        .observe_op(metrics::RESUME, &[], started.elapsed());
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
        self.stopping.store(true, Ordering::SeqCst);
        // A refill in progress finishes first (its VM then has its row and is detached too).
        let locks: Vec<_> = self.lock_pool_locks().values().cloned().collect();
        let mut _held = Vec::new();
        for l in locks {
            _held.push(l.lock_owned().await);
        }
        let pooled: Vec<PoolVm> = self.lock_pools().drain().flat_map(|(_, v)| v).collect();
        for m in pooled {
            if let Err(e) = m.vm.detach() {
                tracing::warn!(id = m.id, error = %e, "detaching a pool member");
            }
        }
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

// ---- warm pools ----
impl Manager {
    fn lock_pools(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<PoolVm>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_pool_locks(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.pool_locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready VMs per group (for metrics).
    pub fn pool_ready(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = self
            .lock_pools()
            .iter()
            .map(|(g, m)| (g.clone(), m.len()))
            .collect();
        v.sort();
        v
    }

    /// What the VMs hold of the host (for metrics).
    pub fn usage(&self) -> Usage {
        self.cap.usage()
    }

    fn take_pooled(&self, group: &str, image: &str, tier: Tier) -> Option<PoolVm> {
        let mut pools = self.lock_pools();
        let v = pools.get_mut(group)?;
        let i = v.iter().position(|m| m.image == image && m.tier == tier)?;
        Some(v.remove(i))
    }

    /// Makes pool VM `pvm` the sandbox `row` (state running, the request's env and labels).
    /// Its hostname is already its id and its entropy its own (the restore refreshed both);
    /// the clock and entropy are refreshed again, as it may have waited long in the pool.
    /// `None` if the VM is broken (it is destroyed; the caller restores the template instead).
    async fn hand_over(&self, pvm: PoolVm, row: Sandbox, config: ImageConfig) -> Option<Sandbox> {
        let id = pvm.id.clone();
        if let Err(e) = pvm.vm.agent().refresh(None).await {
            tracing::warn!(id, error = %e, "a pool member did not answer; destroying it");
            self.destroy_pooled(pvm).await;
            return None;
        }
        let row = Sandbox {
            state: SandboxState::Running,
            ..row
        };
        match self.store.call(move |c| store::hand_over(c, &row)).await {
            Ok(row) => {
                self.insert(&id, pvm.vm, config);
                tracing::info!(id, group = row.group, "handed over from the pool");
                Some(row)
            }
            Err(e) => {
                tracing::error!(id, error = %e, "handing over a pool member");
                self.destroy_pooled(pvm).await;
                None
            }
        }
    }

    async fn destroy_pooled(&self, m: PoolVm) {
        let id = m.id.clone();
        if let Err(e) = self
            .store
            .call(move |c| store::delete_pool_member(c, &id))
            .await
        {
            tracing::warn!(id = m.id, error = %e, "removing a pool member's row");
        }
        m.vm.destroy().await;
        self.cap.release(&m.id);
    }

    /// Destroys the pool of a deleted group.
    pub async fn drain_pool(&self, group: &str) {
        let members = self.lock_pools().remove(group).unwrap_or_default();
        for m in members {
            self.destroy_pooled(m).await;
        }
    }

    /// Brings `group`'s pool to its spec in the background (grow, shrink, replace VMs of an
    /// old image or tier, or destroy it if the group is gone). A no-op while a refill of the
    /// group runs: that one re-reads the spec after every VM.
    pub fn refill(self: &Arc<Self>, group: &str) {
        let lock = self
            .lock_pool_locks()
            .entry(group.to_string())
            .or_default()
            .clone();
        let Ok(held) = lock.try_lock_owned() else {
            return;
        };
        let mgr = self.clone();
        let group = group.to_string();
        tokio::spawn(async move {
            let _held = held;
            if let Err(e) = mgr.reconcile(&group).await {
                tracing::warn!(group, error = %e, "refilling the warm pool");
                mgr.back_off(&group);
            }
        });
    }

    fn back_off(&self, group: &str) {
        self.back_off_for(group, REFILL_BACKOFF);
    }

    /// No refill of `group` starts for `d` (a later deadline already set stays).
    fn back_off_for(&self, group: &str, d: Duration) {
        let until = Instant::now() + d;
        let mut b = self.pool_backoff.lock().unwrap_or_else(|p| p.into_inner());
        let e = b.entry(group.to_string()).or_insert(until);
        *e = (*e).max(until);
    }

    fn backing_off(&self, group: &str) -> bool {
        self.pool_backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(group)
            .is_some_and(|until| Instant::now() < *until)
    }

    async fn reconcile(self: &Arc<Self>, group: &str) -> Result<()> {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            let g = group.to_string();
            let Some(spec) = self
                .store
                .call(move |c| store::get_group(c, &g))
                .await?
                .map(|g| g.spec)
            else {
                self.drain_pool(group).await;
                return Ok(());
            };
            let target = spec.pool.size as usize;
            let image = if target > 0 {
                let images = self.images.clone();
                let r = spec.image.clone();
                let resolved = tokio::task::spawn_blocking(move || images.resolve(&r))
                    .await
                    .map_err(|e| Error::Internal(format!("resolving the image: {e}")))?
                    .map_err(|e| {
                        Error::Internal(format!("resolving the pool's image {}: {e}", spec.image))
                    })?;
                Some(resolved)
            } else {
                None
            };
            let (stale, have) = {
                let mut pools = self.lock_pools();
                let v = pools.entry(group.to_string()).or_default();
                let (keep, mut stale): (Vec<PoolVm>, Vec<PoolVm>) = v.drain(..).partition(|m| {
                    image
                        .as_ref()
                        .is_some_and(|i| i.digest == m.image && m.tier == spec.tier)
                });
                *v = keep;
                while v.len() > target {
                    stale.extend(v.pop());
                }
                (stale, v.len())
            };
            for m in stale {
                tracing::info!(id = m.id, group, "removing a VM from the pool");
                self.destroy_pooled(m).await;
            }
            let Some(image) = image.filter(|_| have < target) else {
                return Ok(());
            };
            if self.backing_off(group) {
                return Ok(());
            }
            let member = store::PoolMember {
                id: new_id(),
                group: group.to_string(),
                image: image.digest.clone(),
                tier: spec.tier,
            };
            self.cap.reserve(
                &member.id,
                spec.tier,
                &format!("a warm-pool VM of group {group}"),
            )?;
            let m = member.clone();
            if let Err(e) = self
                .store
                .call(move |c| store::insert_pool_member(c, &m))
                .await
            {
                self.cap.release(&member.id);
                return Err(e);
            }
            let restored = async {
                let tpl =
                    moat_vm::template::ensure(&self.rt, &image.digest, &image.rootfs, spec.tier)
                        .await?;
                moat_vm::Sandbox::restore_with(
                    &self.rt,
                    &member.id,
                    &tpl.dir,
                    LaunchOptions { detached: true },
                )
                .await
            }
            .await;
            let restored = match restored {
                Ok(vm) => warm_up(&vm, &image.config).await.map(|_| vm),
                Err(e) => Err(e),
            };
            match restored {
                Ok(vm) => {
                    self.lock_pools()
                        .entry(group.to_string())
                        .or_default()
                        .push(PoolVm {
                            id: member.id,
                            image: member.image,
                            tier: member.tier,
                            vm,
                        });
                }
                Err(e) => {
                    self.cap.release(&member.id);
                    let id = member.id.clone();
                    self.store
                        .call(move |c| store::delete_pool_member(c, &id))
                        .await?;
                    return Err(vm_error("restoring a warm-pool VM", e));
                }
            }
        }
    }
}

// ---- lifecycle timers ----
impl Manager {
    /// Starts the reaper: every [`TICK`] it applies the groups' lifecycle timers, writes
    /// activity times to the store and tops up warm pools.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let mgr = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if mgr.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Err(e) = mgr.reap().await {
                    tracing::warn!(error = %e, "applying lifecycle timers");
                }
            }
        });
    }

    async fn reap(self: &Arc<Self>) -> Result<()> {
        self.flush_activity().await?;
        let groups: HashMap<String, api::GroupSpec> = self
            .store
            .call(|c| store::list_groups(c))
            .await?
            .into_iter()
            .map(|g| (g.name, g.spec))
            .collect();
        let timers = self.store.call(|c| store::list_timers(c)).await?;
        let now = now_ms();
        // Stored times are whole seconds, rounded down: taken as the end of their second, a
        // timer fires up to a second late but never early.
        let end_ms = |secs: i64| secs * 1000 + 999;
        for t in timers {
            let Some(spec) = groups.get(&t.group) else {
                continue;
            };
            let l = &spec.lifecycle;
            if let Some(max) = l.max_lifetime_s {
                let over = now - end_ms(t.created_at) >= max as i64 * 1000;
                if over
                    && matches!(
                        t.state,
                        SandboxState::Running | SandboxState::Suspended | SandboxState::Failed
                    )
                {
                    self.act(&t.id, Act::Delete("its max_lifetime_s passed"));
                    continue;
                }
            }
            match t.state {
                SandboxState::Suspended => {
                    if let Some(ttl) = l.suspended_ttl_s {
                        if now - end_ms(t.updated_at) >= ttl as i64 * 1000 {
                            self.act(&t.id, Act::Delete("its suspended_ttl_s passed"));
                        }
                    }
                }
                SandboxState::Running => {
                    let Some(idle) = l.idle_timeout_s else {
                        continue;
                    };
                    let Some(entry) = self.entry(&t.id) else {
                        continue;
                    };
                    let a = &entry.activity;
                    if a.active.load(Ordering::SeqCst) > 0 {
                        continue;
                    }
                    let stored_last_ms = end_ms(t.last_activity_at.unwrap_or(0).max(t.updated_at));
                    let last = a.last_ms.load(Ordering::SeqCst).max(stored_last_ms);
                    let idle_ms = idle as i64 * 1000;
                    let due = now - last >= idle_ms;
                    let probe = a.procs.load(Ordering::SeqCst)
                        && now >= a.next_probe_ms.load(Ordering::SeqCst);
                    if due || probe {
                        self.act(
                            &t.id,
                            Act::Idle {
                                idle_ms,
                                on_idle: l.on_idle,
                                stored_last_ms,
                            },
                        );
                    }
                }
                _ => {}
            }
        }
        // Pools below or above their size (after hand-overs, failed refills, spec changes,
        // deleted groups).
        let ready: HashMap<String, usize> = self.pool_ready().into_iter().collect();
        let mut names: Vec<&String> = groups.keys().chain(ready.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let want = groups.get(name).map_or(0, |s| s.pool.size as usize);
            if ready.get(name).copied().unwrap_or(0) != want && !self.backing_off(name) {
                self.refill(name);
            }
        }
        Ok(())
    }

    /// Writes the activity times that changed to the store, so that idle timers survive a
    /// restart.
    async fn flush_activity(&self) -> Result<()> {
        let seen: Vec<(String, i64)> = self
            .lock_live()
            .iter()
            .filter(|(_, e)| e.activity.dirty.swap(false, Ordering::SeqCst))
            .map(|(id, e)| (id.clone(), e.activity.last_ms.load(Ordering::SeqCst) / 1000))
            .collect();
        if seen.is_empty() {
            return Ok(());
        }
        self.store
            .call(move |c| store::record_activity(c, &seen))
            .await
    }

    /// Runs `act` on `id` in the background, unless the reaper is already acting on it.
    fn act(self: &Arc<Self>, id: &str, act: Act) {
        if !self
            .acting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
        {
            return;
        }
        let mgr = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let result = match act {
                Act::Delete(why) => {
                    tracing::info!(id, why, "deleting");
                    mgr.delete(&id).await.map(|_| ())
                }
                Act::Idle {
                    idle_ms,
                    on_idle,
                    stored_last_ms,
                } => mgr.on_idle(&id, idle_ms, on_idle, stored_last_ms).await,
            };
            if let Err(e) = result {
                tracing::warn!(id, error = %e, "applying a lifecycle timer");
            }
            mgr.acting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    /// The idle timer of `id` is due, or its background processes need a look: a running
    /// background process counts as activity; else the sandbox is suspended or deleted.
    async fn on_idle(
        self: &Arc<Self>,
        id: &str,
        idle_ms: i64,
        on_idle: OnIdle,
        stored_last_ms: i64,
    ) -> Result<()> {
        let Some(entry) = self.entry(id) else {
            return Ok(());
        };
        let a = &entry.activity;
        let procs = {
            // Not behind a suspend or delete in progress: they decide the matter.
            let Ok(guard) = entry.vm.try_read() else {
                return Ok(());
            };
            let Some(vm) = guard.as_ref() else {
                return Ok(());
            };
            vm.agent().proc_list().await
        };
        let now = now_ms();
        match procs {
            Ok(list) if list.iter().any(|p| p.running) => {
                a.touch();
                a.procs.store(true, Ordering::SeqCst);
                a.next_probe_ms
                    .store(now + PROBE_EVERY_MS, Ordering::SeqCst);
                return Ok(());
            }
            Ok(_) => a.procs.store(false, Ordering::SeqCst),
            // An agent that cannot list its processes has none we could know of.
            Err(e) => tracing::warn!(id, error = %e, "listing background processes"),
        }
        let last = a.last_ms.load(Ordering::SeqCst).max(stored_last_ms);
        if now - last < idle_ms {
            return Ok(());
        }
        match on_idle {
            OnIdle::Suspend => {
                tracing::info!(id, idle_ms, "suspending an idle sandbox");
                self.suspend_inner(id, Some(now)).await.map(|_| ())
            }
            OnIdle::Delete => {
                tracing::info!(id, idle_ms, "deleting an idle sandbox");
                self.delete(id).await
            }
        }
    }
}

/// Runs `true` in a new pool VM: the first exec in a restored guest loads the exec path (the
/// agent's, the dynamic loader, libc) from disk, about 150 ms under TCG; a pool VM pays that
/// before it is handed over rather than in its user's first exec.
async fn warm_up(vm: &moat_vm::Sandbox, config: &ImageConfig) -> moat_vm::Result<()> {
    let req = moat_protocol::ExecRequest {
        argv: vec!["true".to_string()],
        env: config.merged_env([]),
        cwd: None,
        user: None,
        stdin: false,
        timeout_ms: Some(30_000),
        pty: None,
    };
    vm.agent().exec_output(req, 1024).await.map(|_| ())
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
