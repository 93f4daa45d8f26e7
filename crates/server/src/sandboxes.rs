//! The sandbox manager: owns the running `moat_vm::Sandbox`es of the daemon, keeps their store
//! rows in step, and re-adopts them after a restart.
//!
//! The store row is the source of truth for the API; the VM's own state lives in
//! `MOAT_HOME/run/<id>/`. Every sandbox is launched detached, so its QEMU outlives the daemon
//! (even `kill -9`) and the next daemon adopts it in [`Manager::start`].
//!
//! Concurrency: each sandbox has one `RwLock`. Execs take it shared (many execs on one
//! sandbox run at once); lifecycle changes (delete, and later suspend/resume) take it
//! exclusively, so they are serialised with each other and never pull the VM out from under
//! a running exec. Lifecycle work runs in spawned tasks: a client that hangs up must not
//! leave a VM half-created or a row stuck in `creating`/`deleting`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use moat_image::{ImageConfig, ImageStore};
use moat_vm::{LaunchOptions, Runtime};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use crate::api::{self, Sandbox, SandboxState, Tier};
use crate::error::{Error, Result};
use crate::store::{self, Store};

/// One live sandbox: its VM (None once deleted) and its image's config, for exec defaults.
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
                    let id = row.id.clone();
                    mgr.store
                        .call(move |c| store::delete_sandbox(c, &id))
                        .await?;
                    tracing::info!(id = row.id, state = row.state.as_str(), "rolled back");
                }
                SandboxState::Suspending | SandboxState::Resuming => {
                    if has_vm {
                        destroy_orphan(&mgr.rt, &row.id).await;
                    }
                    mgr.fail(&row.id, "interrupted by a daemon restart").await?;
                }
                SandboxState::Suspended | SandboxState::Failed => {}
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
            mgr.store.call(move |c| store::delete_sandbox(c, &id)).await
        })
        .await
        .map_err(|e| Error::Internal(format!("the delete task failed: {e}")))?
    }

    /// A shared hold on the running sandbox `row` (for an exec).
    pub async fn running(&self, row: &Sandbox) -> Result<Running> {
        let not_running = || {
            let why = row
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            Error::Conflict(format!(
                "sandbox {} is {}{why}, not running",
                row.id,
                row.state.as_str()
            ))
        };
        if row.state != SandboxState::Running {
            return Err(not_running());
        }
        let entry = self.entry(&row.id).ok_or_else(not_running)?;
        let guard = entry.vm.clone().read_owned().await;
        Ok(Running {
            guard,
            config: entry.config.clone(),
        })
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
