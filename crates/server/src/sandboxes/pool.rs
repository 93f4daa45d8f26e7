//! Warm pools: a group with `pool.size = N` keeps N restored VMs of its default image and tier
//! (`Manager::pools`), each with a `pool_members` row under the id it will have as a sandbox,
//! so that the next daemon re-adopts them. A create that matches hands one over (the row moves
//! to `sandboxes` in one transaction) and the pool is refilled in the background.
//!
//! A pool VM is parked (vCPUs stopped) as soon as it is ready, unless parking is off: waiting
//! in a pool is the purest idleness there is. The hand-over continues it.
//!
//! Pool VMs are not sandboxes until handed over (no entry, no row in `sandboxes`), so
//! everything that knows about them, from adoption at start-up to detaching at a stop, is
//! here; the rest of the manager sees only hand-overs and refills.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_image::ImageConfig;
use tokio::sync::OwnedMutexGuard;

use super::{new_id, Manager};
use crate::api::{Sandbox, SandboxState, Tier};
use crate::error::{Error, Result};
use crate::metrics;
use crate::store;

/// After a refill fails (no room, a broken image), how long before the pool tries again.
const REFILL_BACKOFF: Duration = Duration::from_secs(5);
/// After a hand-over, how long before the pool refills (the reaper's next tick after that).
pub(super) const REFILL_AFTER_HAND_OVER: Duration = Duration::from_secs(1);

/// A ready VM in a warm pool; `id` is the id it gets as a sandbox.
pub(super) struct PoolVm {
    pub(super) id: String,
    /// Manifest digest.
    image: String,
    tier: Tier,
    vm: moat_vm::Sandbox,
}

impl Manager {
    fn lock_pools(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<PoolVm>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_pool_locks(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.pool_locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-adopts the pool members whose VM is alive (taking them out of `orphans`) and drops
    /// the rows of the rest.
    pub(super) async fn readopt_pool(&self, orphans: &mut HashSet<String>) -> Result<()> {
        let members = self.store.list_pool_members().await?;
        for m in members {
            let adopted = if orphans.remove(&m.id) {
                match moat_vm::Sandbox::adopt(&self.rt, &m.id).await {
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
                Some(mut vm) => {
                    self.cap.force(&m.id, m.tier);
                    self.park_pooled(&m.id, &mut vm).await;
                    tracing::info!(id = m.id, group = m.group, "re-adopted a pool member");
                    self.lock_pools().entry(m.group).or_default().push(PoolVm {
                        id: m.id,
                        image: m.image,
                        tier: m.tier,
                        vm,
                    });
                }
                None => {
                    // Its refill was interrupted, or its VM died: the pool makes another.
                    self.store.delete_pool_member(&m.id).await?;
                }
            }
        }
        Ok(())
    }

    /// Waits for refills in progress (their VMs then have their rows too) and detaches every
    /// pool VM. Returns the refill locks: no refill starts while the caller holds them.
    pub(super) async fn detach_pools(&self) -> Vec<OwnedMutexGuard<()>> {
        let locks: Vec<_> = self.lock_pool_locks().values().cloned().collect();
        let mut held = Vec::new();
        for l in locks {
            held.push(l.lock_owned().await);
        }
        let pooled: Vec<PoolVm> = self.lock_pools().drain().flat_map(|(_, v)| v).collect();
        for m in pooled {
            if let Err(e) = m.vm.detach() {
                tracing::warn!(id = m.id, error = %e, "detaching a pool member");
            }
        }
        held
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

    /// The host processes of every ready pool VM (see [`Manager::memory_pss`]).
    pub(super) fn pool_host_pids(&self) -> Vec<u32> {
        self.lock_pools()
            .values()
            .flatten()
            .flat_map(|m| m.vm.host_pids())
            .collect()
    }

    /// Ready VMs in `group`'s pool.
    pub fn pool_ready_in(&self, group: &str) -> usize {
        self.lock_pools().get(group).map_or(0, Vec::len)
    }

    pub(super) fn take_pooled(&self, group: &str, image: &str, tier: Tier) -> Option<PoolVm> {
        let mut pools = self.lock_pools();
        let v = pools.get_mut(group)?;
        let i = v.iter().position(|m| m.image == image && m.tier == tier)?;
        Some(v.remove(i))
    }

    /// Makes pool VM `pvm` the sandbox `row` (state running, the request's env and labels).
    /// Its hostname is already its id and its entropy its own (the restore refreshed both);
    /// the clock and entropy are refreshed again, as it may have waited long in the pool.
    /// `None` if the VM is broken (it is destroyed; the caller restores the template instead).
    pub(super) async fn hand_over(
        self: &Arc<Self>,
        mut pvm: PoolVm,
        row: Sandbox,
        config: ImageConfig,
    ) -> Option<Sandbox> {
        let id = pvm.id.clone();
        let started = std::time::Instant::now();
        let ready = if pvm.vm.is_parked() {
            // Continuing it refreshes the clock and entropy.
            let r = pvm.vm.unpark().await;
            self.cap.set_parked(&id, false);
            self.metrics
                .observe_op(metrics::UNPARK, &[], started.elapsed());
            r
        } else {
            pvm.vm.agent().refresh(None).await
        };
        if let Err(e) = ready {
            tracing::warn!(id, error = %e, "a pool member did not answer; destroying it");
            self.destroy_pooled(pvm).await;
            return None;
        }
        let row = Sandbox {
            state: SandboxState::Running,
            ..row
        };
        // A pool VM's stack was never started: it gets its policy as it becomes a sandbox.
        if let Err(e) = self.connect_network(&id, &row.group, &pvm.vm).await {
            tracing::warn!(id, error = %e, "a pool member's network did not start; destroying it");
            self.destroy_pooled(pvm).await;
            return None;
        }
        match self.store.hand_over(&row).await {
            Ok(row) => {
                self.insert(&id, pvm.vm, config);
                tracing::info!(id, group = row.group, "handed over from the pool");
                Some(row)
            }
            Err(e) => {
                tracing::error!(id, error = %e, "handing over a pool member");
                self.release_network(&id);
                self.destroy_pooled(pvm).await;
                None
            }
        }
    }

    /// Parks a ready pool VM, unless parking is off. One that cannot be parked stays running:
    /// it costs CPU, but it still serves.
    async fn park_pooled(&self, id: &str, vm: &mut moat_vm::Sandbox) {
        if self.park_after.is_none() {
            return;
        }
        match vm.park().await {
            Ok(()) => self.cap.set_parked(id, true),
            Err(e) => tracing::warn!(id, error = %e, "parking a pool VM"),
        }
    }

    async fn destroy_pooled(&self, m: PoolVm) {
        if let Err(e) = self.store.delete_pool_member(&m.id).await {
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
    pub(super) fn back_off_for(&self, group: &str, d: Duration) {
        let until = Instant::now() + d;
        let mut b = self.pool_backoff.lock().unwrap_or_else(|p| p.into_inner());
        let e = b.entry(group.to_string()).or_insert(until);
        *e = (*e).max(until);
    }

    pub(super) fn backing_off(&self, group: &str) -> bool {
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
            let Some(spec) = self.store.get_group(group).await?.map(|g| g.spec) else {
                self.drain_pool(group).await;
                return Ok(());
            };
            // This node's share of the pool (none while it drains: it takes no creates).
            let target = self.store.pool_nodes().await?.share(
                spec.pool.size,
                &spec.placement,
                self.store.node_name().as_deref(),
            );
            let image = if target > 0 {
                let images = self.images.clone();
                let r = spec.image.clone();
                let resolved = tokio::task::spawn_blocking(move || images.resolve(&r))
                    .await
                    .map_err(Error::task("resolving the image"))?
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
            if let Err(e) = self.store.insert_pool_member(&member).await {
                self.cap.release(&member.id);
                return Err(e);
            }
            // The group CA is the daemon's own state: its failure is reported as it is, not as
            // a VM error.
            let restored = match self.launch_options(group).await {
                Ok(opts) => async {
                    let tpl = moat_vm::template::ensure(
                        &self.rt,
                        &image.digest,
                        &image.rootfs,
                        spec.tier,
                    )
                    .await?;
                    let vm = moat_vm::Sandbox::restore_with(&self.rt, &member.id, &tpl.dir, opts)
                        .await?;
                    warm_up(&vm, &image.config).await?;
                    Ok::<_, moat_vm::Error>(vm)
                }
                .await
                .map_err(Error::vm("restoring a warm-pool VM")),
                Err(e) => Err(e),
            };
            match restored {
                Ok(mut vm) => {
                    self.park_pooled(&member.id, &mut vm).await;
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
                    self.store.delete_pool_member(&member.id).await?;
                    return Err(e);
                }
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
