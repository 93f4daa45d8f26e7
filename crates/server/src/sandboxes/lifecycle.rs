//! Lifecycle: every data-plane request holds a [`Running`](super::Running), which counts as
//! activity while it lives and records the time when it ends; one reaper task applies the
//! groups' timers every [`TICK`] (idle → park; idle → suspend or delete, suspended TTL,
//! maximum lifetime) and keeps pools full.
//!
//! Parking stops an idle sandbox's vCPUs (see `moat_vm::Sandbox::park`): under TCG an idle
//! guest's timer ticks alone cost a few % of a host CPU each, which on a host of thousands of
//! sandboxes is all of it. A sandbox is parked when no request has touched it for the
//! daemon's `park_after`, no background process runs in it, and its QEMU used less than
//! [`QUIET_CPU`] of a CPU since the reaper's last look; the next request continues it
//! ([`Manager::running`](super::Manager::running)). Work a user started with `&` in an exec
//! does not keep a sandbox awake: background processes are the way to say "this is working".
//!
//! Activity is counted without locks on every request and read by the reaper alone, so the
//! counters and the timers that read them live together here; what the timers do (suspend,
//! delete, refill) is the other modules'.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::health::Check;
use super::Manager;
use crate::api::{self, OnIdle, SandboxState};
use crate::error::{Error, Result};

/// How often the reaper applies lifecycle timers and tops up pools.
const TICK: Duration = Duration::from_millis(500);
/// While background processes run in an otherwise idle sandbox, how often the reaper asks the
/// agent whether they still do (the idle clock starts when they are seen gone).
const PROBE_EVERY_MS: i64 = 1000;
/// The most CPU (a fraction of one host CPU, measured between two reaper looks) a sandbox's
/// QEMU may use and still count as quiet enough to park. An idle TCG guest uses a few %; a
/// guest computing uses a whole vCPU.
const QUIET_CPU: f64 = 0.15;

/// What the idle timer needs to know, updated without locks by every data-plane request.
#[derive(Default)]
pub(super) struct Activity {
    /// Requests in flight (including ones waiting for the sandbox's lock).
    pub(super) active: AtomicU32,
    /// When the last one ended, Unix milliseconds (0: none since the daemon started).
    pub(super) last_ms: AtomicI64,
    /// `last_ms` changed since it was last written to the store.
    dirty: AtomicBool,
    /// Background processes were running when the reaper last looked.
    procs: AtomicBool,
    /// When the reaper looks at them next, Unix milliseconds.
    next_probe_ms: AtomicI64,
    /// The QEMU's CPU time when the reaper last considered parking it, and when that was.
    cpu_seen: std::sync::Mutex<Option<(std::time::Instant, Duration)>>,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::SeqCst);
        self.dirty.store(true, Ordering::SeqCst);
    }
}

/// Counts as activity while it lives; records the time it ends.
pub(super) struct ActiveHold(Arc<Activity>);

impl ActiveHold {
    pub(super) fn new(a: Arc<Activity>) -> ActiveHold {
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

/// What the reaper does to a sandbox.
enum Act {
    Delete(&'static str),
    /// Idle for the daemon's `park_after`: park it if it is quiet.
    Park,
    /// The idle timer is due (or background processes need a look): `idle_ms` and what to do.
    Idle {
        idle_ms: i64,
        on_idle: OnIdle,
        stored_last_ms: i64,
    },
    /// Its agent needs a look (see `health.rs`).
    Health(Check),
}

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
            .list_groups()
            .await?
            .into_iter()
            .map(|g| (g.name, g.spec))
            .collect();
        let timers = self.store.list_timers().await?;
        self.pick_up_moved(&timers).await;
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
                    let Some(entry) = self.entry(&t.id) else {
                        continue;
                    };
                    if let Some(check) = self.health_check(&t.id) {
                        self.act(&t.id, Act::Health(check));
                        continue;
                    }
                    let a = &entry.activity;
                    if a.active.load(Ordering::SeqCst) > 0 {
                        continue;
                    }
                    let stored_last_ms = end_ms(t.last_activity_at.unwrap_or(0).max(t.updated_at));
                    let last = a.last_ms.load(Ordering::SeqCst).max(stored_last_ms);
                    if let Some(after) = self.park_after {
                        if now - last >= after.as_millis() as i64
                            && now >= a.next_probe_ms.load(Ordering::SeqCst)
                            && !self.cap.is_parked(&t.id)
                        {
                            self.act(&t.id, Act::Park);
                        }
                    }
                    let Some(idle) = l.idle_timeout_s else {
                        continue;
                    };
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
        // A draining node hands its suspended sandboxes on shared storage to the others.
        if self.store.draining().await? {
            self.drain_suspended().await;
        }
        // Pools below or above this node's share (after hand-overs, failed refills, spec
        // changes, deleted groups, a drain of this node, which takes no creates and so keeps
        // no pool, or another node joining, draining or lost, which moves the shares).
        let nodes = self.store.pool_nodes().await?;
        let me = self.store.node_name();
        let ready: HashMap<String, usize> = self.pool_ready().into_iter().collect();
        let mut names: Vec<&String> = groups.keys().chain(ready.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let want = groups
                .get(name)
                .map_or(0, |s| nodes.share(s.pool.size, &s.placement, me.as_deref()));
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
        self.store.record_activity(seen).await
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
                Act::Park => mgr.park(&id).await,
                Act::Idle {
                    idle_ms,
                    on_idle,
                    stored_last_ms,
                } => mgr.on_idle(&id, idle_ms, on_idle, stored_last_ms).await,
                Act::Health(Check::Probe) => mgr.probe_agent(&id).await,
                Act::Health(Check::Recover(why)) => mgr.recover_agent(&id, why).await,
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
            if vm.is_parked() {
                // Parked only with no background process running, and nothing ran since.
                Ok(Vec::new())
            } else {
                vm.agent().proc_list().await
            }
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
                self.suspend_inner(id, Some(now), false).await.map(|_| ())
            }
            OnIdle::Delete => {
                // A request may have come while the agent listed its processes: it wins. (One
                // arriving after this check finds the sandbox deleting: a 409.)
                if a.active.load(Ordering::SeqCst) > 0 || a.last_ms.load(Ordering::SeqCst) > now {
                    return Ok(());
                }
                tracing::info!(id, idle_ms, "deleting an idle sandbox");
                self.delete(id).await
            }
        }
    }

    /// Parks `id` if it is still idle and quiet: nothing holds it, no background process runs,
    /// and its QEMU used less than [`QUIET_CPU`] since the last look (the first look only
    /// takes the measure).
    async fn park(&self, id: &str) -> Result<()> {
        let Some(entry) = self.entry(id) else {
            return Ok(());
        };
        let a = &entry.activity;
        // Not behind a request, suspend or delete: they decide the matter.
        let Ok(mut slot) = entry.vm.try_write() else {
            return Ok(());
        };
        let Some(vm) = slot.as_mut() else {
            return Ok(());
        };
        if a.active.load(Ordering::SeqCst) > 0 || vm.is_parked() {
            return Ok(());
        }
        let Some(cpu) = vm.cpu_time() else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        let before = a
            .cpu_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((now, cpu));
        // Only a measure from the reaper's previous look counts: an older one may span a
        // time the sandbox was parked, which would make a busy guest look quiet.
        let quiet = before.is_some_and(|(at, used)| {
            let wall = now.duration_since(at);
            wall > Duration::ZERO
                && wall <= 3 * TICK
                && cpu.saturating_sub(used).as_secs_f64() / wall.as_secs_f64() < QUIET_CPU
        });
        if !quiet {
            tracing::debug!(id, ?before, ?cpu, "not quiet enough to park");
            return Ok(());
        }
        match vm.agent().proc_list().await {
            Ok(list) if list.iter().any(|p| p.running) => {
                a.procs.store(true, Ordering::SeqCst);
                a.next_probe_ms
                    .store(now_ms() + PROBE_EVERY_MS, Ordering::SeqCst);
                return Ok(());
            }
            Ok(_) => a.procs.store(false, Ordering::SeqCst),
            // Parking a sandbox whose agent does not answer would hide why.
            Err(e) => {
                tracing::warn!(id, error = %e, "listing background processes before parking");
                return Ok(());
            }
        }
        vm.park()
            .await
            .map_err(Error::vm("parking an idle sandbox"))?;
        self.cap.set_parked(id, true);
        tracing::debug!(id, "parked");
        Ok(())
    }
}
