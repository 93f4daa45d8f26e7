//! Agent health: a running sandbox whose agent stops answering, or breaks the protocol, is
//! found, shown in its `health` (with the reason and since when), and then either recovered
//! with a new session or failed with the reason and its VM stopped. Never a sandbox that stays
//! `running` and answers every request with an error for good (issue 11 §3).
//!
//! Found three ways: the session has ended (the host ends it when the guest breaks the
//! framing or its QEMU exits; read every reaper tick, free), a request that got no answer or
//! a broken one (it marks the sandbox suspect), and a probe (`stat /`, bounded by
//! [`PROBE_TIMEOUT`]) every [`PROBE_EVERY`] of each running, unparked sandbox.
//!
//! Recovery: requests holding the sandbox are told to let go (their streams died with the
//! session), a new session is started (the agent accepts a new HELLO at any time; processes
//! in the guest keep running) and probed. If that fails, or the agent needed recovering
//! [`MAX_RECOVERIES`] times already, the sandbox is failed: a guest that keeps breaking the
//! protocol does not get to cost the host a reconnect loop.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Manager;
use crate::api::{AgentHealth, SandboxHealth};
use crate::error::Error;
use crate::metrics;

/// How often an unparked sandbox's agent is asked whether it answers.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(10);
/// How long the agent has to answer a probe (or the handshake of a new session). Generous: a
/// TCG guest under a fork bomb answers in under a second (docs/SECURITY.md), so this is a
/// guest that does not answer at all.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Recoveries one sandbox gets from one daemon before it is failed instead.
const MAX_RECOVERIES: u32 = 3;

/// What the daemon knows of one sandbox's agent.
#[derive(Default)]
pub(super) struct Health {
    /// Why and since when it is unresponsive (RFC 3339); `None`: it answers.
    unresponsive: Mutex<Option<(String, String)>>,
    /// A request saw it fail: look now instead of at the next probe.
    suspect: AtomicBool,
    /// When the next probe is due, Unix milliseconds.
    next_probe_ms: AtomicI64,
    recoveries: AtomicU32,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(String, String)>> {
        self.unresponsive.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn api(&self) -> SandboxHealth {
        match &*self.lock() {
            None => SandboxHealth {
                agent: AgentHealth::Ok,
                reason: None,
                since: None,
            },
            Some((reason, since)) => SandboxHealth {
                agent: AgentHealth::Unresponsive,
                reason: Some(reason.clone()),
                since: Some(since.clone()),
            },
        }
    }

    /// A request got `e`: if it says the agent failed, look at it now.
    pub(super) fn observe(&self, e: &Error) {
        if is_agent_failure(e) {
            self.suspect.store(true, Ordering::SeqCst);
        }
    }
}

/// Whether `e` means the agent did not answer, or broke the protocol (as opposed to a guest
/// that answered with an error, or a request the daemon refused).
pub(crate) fn is_agent_failure(e: &Error) -> bool {
    matches!(
        e,
        Error::Vm {
            source: moat_vm::Error::AgentGone
                | moat_vm::Error::AgentTimeout(_)
                | moat_vm::Error::Agent(_),
            ..
        }
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn now_rfc3339() -> String {
    crate::api::rfc3339(now_ms() / 1000)
}

/// What the reaper should do about one sandbox's agent.
pub(super) enum Check {
    /// Its session ended, or a request saw it fail.
    Recover(String),
    Probe,
}

impl Manager {
    /// The health of running sandbox `id`'s agent; `None` if the daemon holds no VM for it.
    pub fn health_of(&self, id: &str) -> Option<SandboxHealth> {
        let entry = self.entry(id)?;
        let vm = entry.vm.try_read().ok();
        if vm.as_ref().is_some_and(|v| v.is_none()) {
            return None;
        }
        Some(entry.health.api())
    }

    /// The reaper's look at `id`'s agent (every tick, cheap): what to do, if anything.
    pub(super) fn health_check(&self, id: &str) -> Option<Check> {
        let entry = self.entry(id)?;
        // Not behind a suspend, delete or recovery: they decide the matter.
        let guard = entry.vm.try_read().ok()?;
        let vm = guard.as_ref()?;
        if vm.is_parked() {
            return None;
        }
        let h = &entry.health;
        if vm.agent().is_closed() {
            return Some(Check::Recover(
                "the agent's session ended (the guest broke the protocol, or its VM stopped)"
                    .to_string(),
            ));
        }
        if h.suspect.swap(false, Ordering::SeqCst) {
            return Some(Check::Probe);
        }
        let now = now_ms();
        if now >= h.next_probe_ms.load(Ordering::SeqCst) {
            h.next_probe_ms
                .store(now + PROBE_EVERY.as_millis() as i64, Ordering::SeqCst);
            return Some(Check::Probe);
        }
        None
    }

    /// Asks `id`'s agent whether it answers; recovers it if not.
    pub(super) async fn probe_agent(self: &Arc<Self>, id: &str) -> crate::error::Result<()> {
        let Some(entry) = self.entry(id) else {
            return Ok(());
        };
        let answered = {
            let Ok(guard) = entry.vm.try_read() else {
                return Ok(());
            };
            let Some(vm) = guard.as_ref() else {
                return Ok(());
            };
            if vm.is_parked() {
                return Ok(());
            }
            vm.agent_answers(PROBE_TIMEOUT).await
        };
        match answered {
            Ok(()) => Ok(()),
            Err(e) => {
                self.recover_agent(id, format!("the agent did not answer: {e}"))
                    .await
            }
        }
    }

    /// `id`'s agent failed (`why`): shown at once, then a new session, or the sandbox failed.
    pub(super) async fn recover_agent(
        self: &Arc<Self>,
        id: &str,
        why: String,
    ) -> crate::error::Result<()> {
        let Some(entry) = self.entry(id) else {
            return Ok(());
        };
        tracing::warn!(id, why, "agent unresponsive; reconnecting");
        *entry.health.lock() = Some((why.clone(), now_rfc3339()));
        // Requests on the old session are waiting for answers that will not come.
        entry.deleted.send_replace(true);
        let mut slot = entry.vm.write().await;
        let Some(vm) = slot.as_mut() else {
            // Deleted or suspended meanwhile: nothing left to recover.
            *entry.health.lock() = None;
            return Ok(());
        };
        let tries = entry.health.recoveries.fetch_add(1, Ordering::SeqCst) + 1;
        let recovered = if tries > MAX_RECOVERIES {
            Err(format!(
                "it needed recovering {MAX_RECOVERIES} times already"
            ))
        } else {
            match self.unpark(id, vm).await {
                Err(e) => Err(e.to_string()),
                Ok(()) => match vm.reconnect_agent(PROBE_TIMEOUT).await {
                    Err(e) => Err(format!("a new session failed: {e}")),
                    Ok(()) => vm
                        .agent_answers(PROBE_TIMEOUT)
                        .await
                        .map_err(|e| format!("the new session did not answer: {e}")),
                },
            }
        };
        match recovered {
            Ok(()) => {
                // No request holds the sandbox (this holds its write lock): new ones may come.
                entry.deleted.send_replace(false);
                *entry.health.lock() = None;
                entry
                    .health
                    .next_probe_ms
                    .store(now_ms() + PROBE_EVERY.as_millis() as i64, Ordering::SeqCst);
                tracing::info!(id, tries, "agent recovered with a new session");
                self.metrics
                    .count(metrics::AGENT_RECOVERIES, &[("outcome", "recovered")]);
                Ok(())
            }
            Err(e) => {
                let vm = slot.take();
                drop(slot);
                self.release_network(id);
                let reason =
                    format!("its agent stopped answering ({why}) and {e}; its VM was stopped");
                tracing::warn!(id, reason, "failing the sandbox");
                self.metrics
                    .count(metrics::AGENT_RECOVERIES, &[("outcome", "failed")]);
                let failed = self.fail(id, &reason).await;
                if let Some(vm) = vm {
                    vm.destroy().await;
                }
                self.cap.release(id);
                self.lock_live().remove(id);
                failed
            }
        }
    }
}
