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
//! Capacity: every VM that exists holds its tier's memory and vCPUs in [`Capacity`] until it
//! ends or is suspended; creates, resumes and refills that do not fit are refused (429).
//!
//! This file holds the manager's state and what every part of it leans on: start-up (adoption
//! and recovery), create, launch and fork, delete, [`Manager::running`] and the store and
//! error helpers. Each concern with state or rules of its own is an `impl Manager` in a
//! submodule, so that it can be read whole: `suspend` (suspend, resume, suspend directories),
//! `pool` (warm pools), `lifecycle` (activity and the reaper's timers) and `network` (each
//! sandbox's link to its network stack: egress policy, audit, a stack that dies).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use moat_image::{Image, ImageConfig, ImageStore};
use moat_vm::{LaunchOptions, Runtime};
use tokio::sync::{watch, OwnedRwLockReadGuard, RwLock};

use crate::api::{self, Sandbox, SandboxState, Tier};
use crate::capacity::{Capacity, Limits, Usage};
use crate::error::{Error, Result};
use crate::metrics::{self, Metrics};
use crate::store::Store;

use lifecycle::{ActiveHold, Activity};
use network::Link;
use pool::{PoolVm, REFILL_AFTER_HAND_OVER};

pub(crate) use health::is_agent_failure;
pub(crate) use migrate::Identity;
pub use network::{AuditRecord, NetConfig, DEFAULT_AUDIT_RETENTION};
pub use shared::check_shared_dir;
pub(crate) use shared::unreachable_suspended;
pub(crate) use transfer::FILES as TRANSFER_FILES;

mod group_ca;
mod health;
mod lifecycle;
mod migrate;
mod network;
mod pool;
mod shared;
mod suspend;
mod transfer;

/// One live sandbox: its VM (None while suspended, or once deleted), its image's config, for
/// exec defaults, and its activity, for the idle timer.
pub struct Entry {
    pub(crate) vm: Arc<RwLock<Option<moat_vm::Sandbox>>>,
    config: ImageConfig,
    /// Becomes true when a delete begins (or the sandbox fails). A delete needs the write lock,
    /// which waits for every [`Running`]; holders watch this and let go at once instead of
    /// running to their end.
    deleted: watch::Sender<bool>,
    activity: Arc<Activity>,
    health: Arc<health::Health>,
}

impl Entry {
    fn new(vm: Arc<RwLock<Option<moat_vm::Sandbox>>>, config: ImageConfig) -> Arc<Entry> {
        Arc::new(Entry {
            vm,
            config,
            deleted: watch::channel(false).0,
            activity: Arc::default(),
            health: Arc::default(),
        })
    }
}

/// A shared hold on a running sandbox for the duration of an exec (or a file or process
/// request): the VM stays while it lives, and it counts as activity for the idle timer.
pub struct Running {
    guard: OwnedRwLockReadGuard<Option<moat_vm::Sandbox>>,
    pub config: ImageConfig,
    deleted: watch::Receiver<bool>,
    health: Arc<health::Health>,
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
    /// or transfer in the guest) and the answer is a 409 saying so. An error that says the
    /// agent failed has the daemon look at its health at once.
    pub async fn unless_deleted<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let r = tokio::select! {
            r = fut => r,
            () = self.deleted() => Err(deleted_error()),
        };
        if let Err(e) = &r {
            self.health.observe(e);
        }
        r
    }
}

pub(crate) fn deleted_error() -> Error {
    Error::Conflict(
        "the sandbox was deleted, or failed, or its agent stopped answering, while this \
         request was running; see the sandbox's state and health"
            .to_string(),
    )
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
    /// How long a running sandbox must be idle before it is parked; `None`: never (warm-pool
    /// VMs are then not parked either).
    park_after: Option<std::time::Duration>,
    stopping: AtomicBool,
    /// The daemon's egress settings, for every stack's `start`.
    net: NetConfig,
    /// The workload-identity issuer: mints what sandboxes' stacks ask for.
    identity: Arc<crate::identity::Issuer>,
    /// `--shared-dir`: where this node writes suspends, so that other nodes can resume them
    /// (see `shared.rs`).
    shared: Option<PathBuf>,
    /// Each running sandbox's link to its network stack.
    links: Mutex<HashMap<String, Link>>,
    /// Egress audit events on their way to the store.
    audit: tokio::sync::mpsc::Sender<AuditRecord>,
}

fn new_id() -> String {
    format!("sb-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl Manager {
    /// Takes over after a (re)start, before any request is served: adopts the VM of every
    /// `running` row (a row whose VM is gone becomes `failed`), finishes interrupted deletes,
    /// rolls back interrupted creates, and destroys detached VMs that no row claims.
    /// Pool members whose VM is alive are re-adopted into their pools; the rest are dropped.
    /// Then every adopted sandbox's network stack gets its group's current policy; one whose
    /// stack is gone is failed.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        rt: Runtime,
        store: Store,
        metrics: Arc<Metrics>,
        limits: Limits,
        park_after: Option<std::time::Duration>,
        net: NetConfig,
        identity: Arc<crate::identity::Issuer>,
        shared: Option<PathBuf>,
    ) -> Result<Arc<Manager>> {
        crate::snapshots::recover(&rt.home, shared.as_deref(), &store).await?;
        let images = ImageStore::open(&rt.home.join("images"))
            .map_err(|e| Error::Config(format!("opening the image store: {e}")))?;
        let audit = network::audit_writer(store.clone(), net.audit_retention);
        let mgr = Manager {
            rt,
            images,
            store,
            audit,
            live: Mutex::new(HashMap::new()),
            metrics,
            cap: Capacity::new(limits),
            pools: Mutex::new(HashMap::new()),
            pool_locks: Mutex::new(HashMap::new()),
            pool_backoff: Mutex::new(HashMap::new()),
            acting: Mutex::new(HashSet::new()),
            park_after,
            stopping: AtomicBool::new(false),
            net,
            identity,
            links: Mutex::new(HashMap::new()),
            shared,
        };
        // Only this node's rows: the others' VMs run elsewhere (rows from before node mode
        // were claimed by the first node to start).
        let me = mgr.store.node_name();
        let rows: Vec<Sandbox> = mgr
            .store
            .list_sandboxes(None)
            .await?
            .into_iter()
            .filter(|r| r.node == me)
            .collect();
        let mut adopted = Vec::new();
        mgr.remove_foreign_suspends(rows.iter().map(|r| r.id.as_str()).collect());
        let mut orphans: HashSet<String> = mgr.rt.orphans().into_iter().collect();
        mgr.readopt_pool(&mut orphans).await?;
        for row in rows {
            let has_vm = orphans.remove(&row.id);
            mgr.remove_stale_suspends(&row.id);
            match row.state {
                SandboxState::Running => {
                    if mgr.readopt(&row, has_vm).await? {
                        adopted.push(row);
                    }
                }
                // Nobody was told these exist (create) or are gone (delete) for certain:
                // roll the create back, finish the delete.
                SandboxState::Creating | SandboxState::Deleting => {
                    if has_vm {
                        destroy_orphan(&mgr.rt, &row.id).await;
                    }
                    mgr.remove_suspend_dirs(&row.id);
                    mgr.store.delete_sandbox(&row.id).await?;
                    tracing::info!(id = row.id, state = row.state.as_str(), "rolled back");
                }
                SandboxState::Suspending | SandboxState::Resuming => {
                    if mgr.recover_transition(&row, has_vm).await? {
                        adopted.push(row);
                    }
                }
                SandboxState::Suspended => {
                    if has_vm {
                        destroy_orphan(&mgr.rt, &row.id).await;
                    }
                    if mgr.resumable(&row.id).is_some() {
                        mgr.insert_suspended(&row).await;
                    } else if mgr.shared_files_unseen(&row.id).await? {
                        tracing::warn!(
                            id = row.id,
                            "suspended on the shared storage, which this node no longer has \
                             (no --shared-dir): left as it is for a node that has it"
                        );
                    } else {
                        mgr.fail(
                            &row.id,
                            "its suspend directory was gone when the daemon started",
                        )
                        .await?;
                    }
                }
                // Lost: the other nodes gave up on it while this one was cut off.
                SandboxState::Failed | SandboxState::Lost => {
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
        let mgr = Arc::new(mgr);
        for row in adopted {
            mgr.reconnect_network(&row).await?;
        }
        Ok(mgr)
    }

    /// Links adopted sandbox `row` to its network stack; a sandbox whose stack died while no
    /// daemon watched is failed and its VM destroyed.
    async fn reconnect_network(self: &Arc<Self>, row: &Sandbox) -> Result<()> {
        let Some(entry) = self.entry(&row.id) else {
            return Ok(());
        };
        let mut slot = entry.vm.write().await;
        let Some(sb) = slot.as_ref() else {
            return Ok(());
        };
        let Err(e) = self.connect_network(&row.id, &row.group, sb).await else {
            return Ok(());
        };
        if let Some(vm) = slot.take() {
            vm.destroy().await;
        }
        self.cap.release(&row.id);
        self.lock_live().remove(&row.id);
        self.fail(
            &row.id,
            &format!("its network stack was gone when the daemon started ({e})"),
        )
        .await
    }

    /// Adopts the VM of running sandbox `row`; true if it was (its network is linked later).
    async fn readopt(&self, row: &Sandbox, has_vm: bool) -> Result<bool> {
        if !has_vm {
            return self
                .fail(
                    &row.id,
                    "its VM was gone when the daemon started (QEMU exited, or the host \
                     restarted)",
                )
                .await
                .map(|()| false);
        }
        match moat_vm::Sandbox::adopt(&self.rt, &row.id).await {
            Ok(sb) => {
                self.cap.force(&row.id, row.tier);
                let config = self.image_config(&row.image).await;
                self.insert(&row.id, sb, config);
                tracing::info!(id = row.id, "re-adopted");
                Ok(true)
            }
            Err(e) => self
                .fail(
                    &row.id,
                    &format!("adopting its VM after a restart failed: {e}"),
                )
                .await
                .map(|()| false),
        }
    }

    /// A row left in `suspending` or `resuming` by a crash, decided from what is on disk: a
    /// complete, unresumed suspend directory wins (the suspend finished, or the resume never
    /// got going: the VM, if any, is one that a suspend was saving); else a live VM is adopted
    /// (the suspend never got going, or the resume finished); else the sandbox is lost. True if
    /// it is running again (its network is linked later).
    async fn recover_transition(&self, row: &Sandbox, has_vm: bool) -> Result<bool> {
        let was = row.state.as_str();
        if self.resumable(&row.id).is_some() {
            if has_vm {
                destroy_orphan(&self.rt, &row.id).await;
            }
            self.set_state(&row.id, SandboxState::Suspended).await?;
            self.insert_suspended(row).await;
            tracing::info!(id = row.id, was, "recovered as suspended");
            return Ok(false);
        }
        if has_vm {
            if let Ok(sb) = moat_vm::Sandbox::adopt(&self.rt, &row.id).await {
                self.cap.force(&row.id, row.tier);
                self.set_state(&row.id, SandboxState::Running).await?;
                let config = self.image_config(&row.image).await;
                self.insert(&row.id, sb, config);
                tracing::info!(id = row.id, was, "recovered as running");
                return Ok(true);
            }
        }
        self.fail(
            &row.id,
            &format!(
                "the daemon stopped while it was {was}, and neither a complete suspend nor a \
                 live VM was left"
            ),
        )
        .await
        .map(|()| false)
    }

    async fn set_state(&self, id: &str, state: SandboxState) -> Result<Sandbox> {
        self.store
            .set_sandbox_state(id, state, None)
            .await?
            .ok_or_else(|| Error::SandboxGone(id.to_string()))
    }

    pub(crate) async fn get_row(&self, id: &str) -> Result<Sandbox> {
        self.store
            .get_sandbox(id)
            .await?
            .ok_or_else(|| Error::SandboxGone(id.to_string()))
    }

    async fn fail(&self, id: &str, reason: &str) -> Result<()> {
        tracing::warn!(id, reason, "sandbox failed");
        self.store
            .set_sandbox_state(id, SandboxState::Failed, Some(reason))
            .await
            .map(|_| ())
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
    /// Whether sandboxes run jailed and what the host offers the jail, for `/healthz`.
    pub fn jail(&self) -> String {
        self.rt.jail.describe()
    }

    pub fn runtime_home(&self) -> PathBuf {
        self.rt.home.clone()
    }

    /// On every lease renewal: destroys the VMs of sandboxes that are no longer this node's
    /// own. The other nodes marked them `lost` while it was cut off, or their rows are gone:
    /// a group force-deleted through another node, which deletes the rows of every node's
    /// sandboxes and leaves each node to end its VMs. Those rows are the others' decision and
    /// stay as they are; a sandbox whose row is gone loses its suspended images too.
    pub async fn drop_disowned(&self) {
        // Live first, rows second: a sandbox is live only once its row exists, so one made
        // between the two reads is in both or in neither, never taken for disowned.
        let live: Vec<String> = self.lock_live().keys().cloned().collect();
        let rows = match self.store.list_timers().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "listing this node's sandboxes");
                return;
            }
        };
        let states: HashMap<String, SandboxState> =
            rows.into_iter().map(|r| (r.id, r.state)).collect();
        for id in live {
            // Taken over, handed over or migrated: its files are the other node's to keep.
            let moved = !states.contains_key(&id) && self.moved_away(&id).await.is_some();
            let why = match states.get(&id) {
                Some(SandboxState::Lost) => "the other nodes declared it lost",
                Some(_) => continue,
                None if moved => "another node runs it now (taken over or handed over)",
                None => "its row is gone (its group was force-deleted through another node)",
            };
            let Some(entry) = self.entry(&id) else {
                continue;
            };
            entry.deleted.send_replace(true);
            let vm = entry.vm.write().await.take();
            self.release_network(&id);
            if let Some(vm) = vm {
                vm.destroy().await;
            }
            self.cap.release(&id);
            self.lock_live().remove(&id);
            if !states.contains_key(&id) && !moved {
                self.remove_suspend_dirs(&id);
            }
            tracing::warn!(
                id,
                why,
                "destroyed the VM of a sandbox that is not this node's"
            );
        }
    }

    /// What the VMs hold of the host (for metrics).
    pub fn usage(&self) -> Usage {
        self.cap.usage()
    }

    /// What every VM of this daemon really holds of the host's memory, in bytes: the sum of
    /// the PSS of their processes (sandboxes and warm-pool VMs), which counts memory shared
    /// copy-on-write from a template once in all. A sandbox busy with a suspend or delete at
    /// that moment is left out.
    pub async fn memory_pss(&self) -> u64 {
        let mut pids: Vec<u32> = self.pool_host_pids();
        let entries: Vec<Arc<Entry>> = self.lock_live().values().cloned().collect();
        for e in entries {
            if let Ok(vm) = e.vm.try_read() {
                pids.extend(vm.iter().flat_map(moat_vm::Sandbox::host_pids));
            }
        }
        // Each read walks the process's page tables: off the async threads.
        tokio::task::spawn_blocking(move || {
            pids.into_iter().filter_map(moat_vm::qemu::pss_bytes).sum()
        })
        .await
        .unwrap_or(0)
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
        let image = match self.resolve_image(&image_ref).await {
            Ok(image) => image,
            Err(Some(e)) => {
                return Err(Error::Internal(format!("resolving image {image_ref}: {e}")))
            }
            // Not on this node: imported from a registry on another node of the fleet, it is
            // pulled here by digest (docs/FLEET.md, "Images on the node that needs them").
            Err(None) => crate::images::pull_imported(&self.store, &self.images, &image_ref)
                .await?
                .ok_or_else(|| {
                    Error::Unprocessable(format!(
                        "unknown image {}: import it first (`moat image import`), or see \
                         `moat image ls`",
                        api::quote(&image_ref)
                    ))
                })?,
        };
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
                        .map_err(Error::task("the hand-over task failed"))?;
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
            node: None,
            health: None,
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
        .map_err(Error::task("the fork task failed"))?
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
        if let Err(e) = self.store.insert_sandbox(&row).await {
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
            let started = match mgr.launch_options(&row.group).await {
                Err(e) => Err(e),
                Ok(opts) => match source {
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
                    Source::Snapshot(snap) => mgr.start_fork(&id, &snap, opts).await,
                }
                .map_err(Error::vm("starting the sandbox")),
            };
            // Running only with its network: the policy is in force before anyone hears of it.
            let started = match started {
                Ok(sb) => match mgr.connect_network(&id, &row.group, &sb).await {
                    Ok(()) => Ok(sb),
                    Err(e) => {
                        sb.destroy().await;
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            match started {
                Ok(sb) => {
                    *slot = Some(sb);
                    drop(slot);
                    mgr.store
                        .set_sandbox_state(&id, SandboxState::Running, None)
                        .await?
                        .ok_or_else(|| Error::SandboxGone(id.to_string()))
                }
                Err(e) => {
                    mgr.cap.release(&id);
                    mgr.lock_live().remove(&id);
                    mgr.remove_suspend_dirs(&id);
                    mgr.store.delete_sandbox(&id).await?;
                    Err(e)
                }
            }
        })
        .await
        .map_err(Error::task("the create task failed"))?
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
        opts: LaunchOptions,
    ) -> moat_vm::Result<moat_vm::Sandbox> {
        let root = self.suspend_root(id);
        let (snap_dir, root_dir) = (snap.to_path_buf(), root.clone());
        let dir = tokio::task::spawn_blocking(move || {
            crate::snapshots::copy_for_fork(&snap_dir, &root_dir)
        })
        .await
        .map_err(|e| moat_vm::Error::Snapshot(format!("copying the snapshot: {e}")))?
        .map_err(|e| moat_vm::Error::Snapshot(format!("copying the snapshot: {e}")))?;
        let sb = moat_vm::Sandbox::resume(&self.rt, id, &dir, opts).await?;
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
            // A lost sandbox has no VM here (its node is gone, or dropped it): only its row.
            let row = mgr.store.get_sandbox(&id).await?;
            if row.is_some_and(|r| r.state == SandboxState::Lost) {
                return mgr.store.delete_sandbox(&id).await;
            }
            mgr.store
                .set_sandbox_state(&id, SandboxState::Deleting, None)
                .await?;
            if let Some(entry) = mgr.entry(&id) {
                // Execs and transfers in flight end now instead of the delete waiting for them.
                entry.deleted.send_replace(true);
                let vm = entry.vm.write().await.take();
                mgr.release_network(&id);
                if let Some(vm) = vm {
                    vm.destroy().await;
                }
                mgr.cap.release(&id);
                mgr.lock_live().remove(&id);
            }
            mgr.remove_suspend_dirs(&id);
            mgr.store.delete_sandbox(&id).await
        })
        .await
        .map_err(Error::task("the delete task failed"))?
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
                .map_err(|_| Error::SandboxGone(row.id.clone()))?;
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
            let mut guard = entry.vm.clone().read_owned().await;
            if guard.as_ref().is_some_and(moat_vm::Sandbox::is_parked) {
                drop(guard);
                let mut slot = entry.vm.clone().write_owned().await;
                if let Some(vm) = slot.as_mut() {
                    self.unpark(&row.id, vm).await?;
                }
                guard = slot.downgrade();
            }
            if guard.is_some() {
                return Ok(Running {
                    guard,
                    config: entry.config.clone(),
                    deleted: entry.deleted.subscribe(),
                    health: entry.health.clone(),
                    _active: active,
                });
            }
            drop(guard);
            if let Some(moved) = self.moved_away(&row.id).await {
                return Err(moved);
            }
            self.resume(&row.id).await?;
        }
        Err(Error::Conflict(format!(
            "sandbox {} was suspended again while it was being resumed; retry",
            row.id
        )))
    }

    /// Continues `vm` (sandbox `id`) if it is parked; the caller holds its write lock.
    pub(crate) async fn unpark(&self, id: &str, vm: &mut moat_vm::Sandbox) -> Result<()> {
        if !vm.is_parked() {
            return Ok(());
        }
        let started = Instant::now();
        vm.unpark()
            .await
            .map_err(Error::vm("continuing a parked sandbox"))?;
        self.cap.set_parked(id, false);
        self.metrics
            .observe_op(metrics::UNPARK, &[], started.elapsed());
        tracing::debug!(id, ms = started.elapsed().as_millis() as u64, "unparked");
        Ok(())
    }

    /// Lets go of every VM without stopping it (a graceful daemon stop): the next daemon
    /// adopts them.
    pub async fn detach_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Held to the end: no refill starts while the sandboxes are detached.
        let _refills = self.detach_pools().await;
        let entries: Vec<(String, Arc<Entry>)> = self.lock_live().drain().collect();
        for (id, entry) in entries {
            if let Some(vm) = entry.vm.write().await.take() {
                self.release_network(&id);
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
