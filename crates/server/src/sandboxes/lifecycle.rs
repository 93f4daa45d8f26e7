//! Lifecycle: every data-plane request holds a [`Running`](super::Running), which counts as
//! activity while it lives and records the time when it ends; one reaper task applies the
//! groups' timers every [`TICK`] (idle → suspend or delete, suspended TTL, maximum lifetime)
//! and keeps pools full.
//!
//! Activity is counted without locks on every request and read by the reaper alone, so the
//! counters and the timers that read them live together here; what the timers do (suspend,
//! delete, refill) is the other modules'.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Manager;
use crate::api::{self, OnIdle, SandboxState};
use crate::error::Result;

/// How often the reaper applies lifecycle timers and tops up pools.
const TICK: Duration = Duration::from_millis(500);
/// While background processes run in an otherwise idle sandbox, how often the reaper asks the
/// agent whether they still do (the idle clock starts when they are seen gone).
const PROBE_EVERY_MS: i64 = 1000;

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
    /// The idle timer is due (or background processes need a look): `idle_ms` and what to do.
    Idle {
        idle_ms: i64,
        on_idle: OnIdle,
        stored_last_ms: i64,
    },
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
}
