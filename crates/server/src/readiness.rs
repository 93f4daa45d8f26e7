//! Whether the daemon can run sandboxes yet. A daemon that starts on a MOAT_HOME without the
//! guest kernel or initramfs prepares what is missing (the base image too) itself, in the
//! background and once, with the same code as `moat setup` (`prepare`): meanwhile the sandbox routes answer 503 with the
//! step and a `Retry-After`, `/healthz` shows the progress, and the sandbox manager takes over
//! when it is done, without a restart. A failed preparation is reported (log, `/healthz`, the
//! 503's message) and tried again after a delay that doubles up to [`MAX_RETRY`].

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::api::{SandboxesHealth, SandboxesState};
use crate::capacity::Limits;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::prepare::{self, Step};
use crate::sandboxes::Manager;
use crate::store::Store;

/// The delay before the first retry of a failed preparation; each later one doubles it.
pub const FIRST_RETRY: Duration = Duration::from_secs(10);
/// The longest delay between two attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(300);
/// `Retry-After` of a sandbox call while the preparation runs.
const RETRY_WHILE_PREPARING_S: u64 = 5;

/// The sandbox manager, or why there is none yet. Shared by every request.
pub struct Sandboxes {
    state: RwLock<State>,
}

enum State {
    Ready(Arc<Manager>),
    Preparing {
        step: Step,
        attempt: u32,
    },
    Failed {
        step: Option<Step>,
        reason: String,
        attempt: u32,
        retry_at: Instant,
    },
    /// Sandboxes cannot work and the daemon will not prepare them (no agent, `--no-setup`).
    Unavailable(String),
}

impl Sandboxes {
    fn new(state: State) -> Arc<Sandboxes> {
        Arc::new(Sandboxes {
            state: RwLock::new(state),
        })
    }

    /// Sandboxes that cannot work, for `why`; the daemon still serves groups and keys.
    pub fn unavailable(why: String) -> Arc<Sandboxes> {
        Sandboxes::new(State::Unavailable(why))
    }

    /// The manager, once sandboxes are ready.
    pub fn ready(&self) -> Option<Arc<Manager>> {
        match &*self.read() {
            State::Ready(mgr) => Some(mgr.clone()),
            _ => None,
        }
    }

    /// The manager, or the 503 that says why there is none yet and when to ask again.
    pub fn manager(&self) -> Result<Arc<Manager>> {
        let state = self.read();
        match &*state {
            State::Ready(mgr) => Ok(mgr.clone()),
            State::Preparing { .. } => Err(Error::NotReady {
                message: describe(&state),
                retry_after_s: RETRY_WHILE_PREPARING_S,
            }),
            State::Failed { retry_at, .. } => Err(Error::NotReady {
                message: describe(&state),
                retry_after_s: seconds_until(*retry_at),
            }),
            State::Unavailable(_) => Err(Error::Unavailable(describe(&state))),
        }
    }

    pub fn health(&self) -> SandboxesHealth {
        let state = self.read();
        let total = Step::ALL.len() as u32;
        let (state_name, step, steps_done, attempt, retry_after_s) = match &*state {
            State::Ready(_) => (SandboxesState::Ready, None, total, 0, None),
            State::Preparing { step, attempt } => (
                SandboxesState::Preparing,
                Some(*step),
                step.number() - 1,
                *attempt,
                None,
            ),
            State::Failed {
                step,
                attempt,
                retry_at,
                ..
            } => (
                SandboxesState::Failed,
                *step,
                step.map_or(total, |s| s.number() - 1),
                *attempt,
                Some(seconds_until(*retry_at)),
            ),
            State::Unavailable(_) => (SandboxesState::Unavailable, None, 0, 0, None),
        };
        SandboxesHealth {
            state: state_name,
            message: describe(&state),
            step,
            steps_done,
            steps_total: total,
            attempt,
            retry_after_s,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, state: State) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

/// The one wording of each state, for `/healthz` and for the 503 of the sandbox routes.
fn describe(state: &State) -> String {
    let total = Step::ALL.len();
    match state {
        State::Ready(_) => "sandboxes are ready".into(),
        State::Preparing { step, .. } => format!(
            "sandboxes are not ready yet: the daemon is preparing what they need, step {} of \
             {total}: {}; try again shortly",
            step.number(),
            step.describe()
        ),
        State::Failed {
            reason,
            attempt,
            retry_at,
            ..
        } => format!(
            "sandboxes are unavailable: preparing them failed (attempt {attempt}): {reason}; \
             the daemon tries again in {} s (see its log), or run `moat setup`",
            seconds_until(*retry_at)
        ),
        State::Unavailable(why) => format!("this daemon cannot run sandboxes: {why}"),
    }
}

fn seconds_until(t: Instant) -> u64 {
    t.saturating_duration_since(Instant::now()).as_secs().max(1)
}

/// What the daemon needs to make sandboxes work.
pub struct Start {
    pub home: PathBuf,
    /// The static guest agent, or why there is none.
    pub agent: std::result::Result<PathBuf, String>,
    /// The `moat` executable that runs each sandbox's network stack.
    pub net_stack: PathBuf,
    pub accel: Option<String>,
    /// Prepare what is missing (else sandboxes stay unavailable until a restart after
    /// `moat setup`).
    pub setup: bool,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// See [`crate::Config::park_after`].
    pub park_after: Option<std::time::Duration>,
    /// The egress settings every sandbox's network stack starts with.
    pub net: crate::sandboxes::NetConfig,
    /// Answers the stacks' token requests.
    pub identity: Arc<crate::identity::Issuer>,
    /// See [`crate::Config::shared_dir`].
    pub shared_dir: Option<PathBuf>,
}

/// Sandboxes as this daemon starts them: ready at once (after adopting the VMs of an earlier
/// daemon) when the runtime's assets are there; else being prepared in the background (all of
/// `moat setup`, the base image included), or unavailable.
pub async fn start(s: Start) -> Result<Arc<Sandboxes>> {
    let agent = match &s.agent {
        Ok(a) => a.clone(),
        Err(why) => return Ok(unavailable(why.clone())),
    };
    let (home, a, net, accel) = (
        s.home.clone(),
        agent.clone(),
        s.net_stack.clone(),
        s.accel.clone(),
    );
    // The runtime's assets (kernel, initramfs) decide; a missing base image alone does not:
    // its owner may have removed it and use other images.
    let ready = tokio::task::spawn_blocking(move || {
        moat_vm::Runtime::new(&home, &a, &net, accel.as_deref()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| Error::Internal(format!("checking the guest assets: {e}")))?;
    match ready {
        Ok(rt) => Ok(Sandboxes::new(State::Ready(start_manager(rt, &s).await?))),
        Err(why) if !s.setup => Ok(unavailable(format!(
            "{why}; then restart this daemon (it was started with --no-setup, so it does not \
             prepare sandboxes itself)"
        ))),
        Err(why) => {
            tracing::info!(missing = why, "preparing sandboxes in the background");
            eprintln!(
                "moat serve: sandboxes are not ready ({why}); preparing them in the background"
            );
            let slot = Sandboxes::new(State::Preparing {
                step: Step::Kernel,
                attempt: 1,
            });
            tokio::spawn(prepare_until_ready(slot.clone(), agent, s));
            Ok(slot)
        }
    }
}

fn unavailable(why: String) -> Arc<Sandboxes> {
    tracing::warn!(reason = why, "serving without sandboxes");
    eprintln!("moat serve: sandboxes are unavailable: {why}");
    Sandboxes::unavailable(why)
}

/// The manager over `rt`: it adopts the VMs of an earlier daemon, then reaps idle sandboxes;
/// superseded templates are collected in the background.
async fn start_manager(rt: moat_vm::Runtime, s: &Start) -> Result<Arc<Manager>> {
    let mgr = Manager::start(
        rt.clone(),
        s.store.clone(),
        s.metrics.clone(),
        s.limits,
        s.park_after,
        s.net.clone(),
        s.identity.clone(),
        s.shared_dir.clone(),
    )
    .await?;
    mgr.spawn_reaper();
    // After adoption, so the disks of every live and suspended sandbox are in place and keep
    // their templates.
    collect_templates(rt);
    Ok(mgr)
}

/// Removes superseded templates and interrupted template builds in the background (see
/// `moat_vm::template::collect`).
fn collect_templates(rt: moat_vm::Runtime) {
    tokio::task::spawn_blocking(move || match moat_vm::template::collect(&rt) {
        Ok(c) if c.removed > 0 => {
            tracing::info!(
                removed = c.removed,
                freed_mib = c.freed_bytes >> 20,
                kept_in_use = c.kept_in_use,
                "collected superseded templates and interrupted builds"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "collecting superseded templates"),
    });
}

/// Runs the preparation until it succeeds, waiting longer after each failure.
async fn prepare_until_ready(slot: Arc<Sandboxes>, agent: PathBuf, s: Start) {
    let mut delay = FIRST_RETRY;
    for attempt in 1.. {
        let report = Report {
            slot: &slot,
            attempt,
        };
        let result = async {
            let rt = prepare::prepare(
                &s.home,
                &agent,
                &s.net_stack,
                s.accel.as_deref(),
                prepare::Options::default(),
                &report,
            )
            .await?;
            start_manager(rt, &s).await
        }
        .await;
        match result {
            Ok(mgr) => {
                tracing::info!(attempt, "sandboxes are ready");
                eprintln!("moat serve: sandboxes are ready");
                slot.set(State::Ready(mgr));
                return;
            }
            Err(e) => {
                let step = match &e {
                    Error::Prepare { step, .. } => Some(*step),
                    _ => None,
                };
                tracing::info!(attempt, error = %e, retry_in_s = delay.as_secs(), "preparing sandboxes failed");
                eprintln!(
                    "moat serve: preparing sandboxes failed (attempt {attempt}): {e}; trying \
                     again in {} s",
                    delay.as_secs()
                );
                slot.set(State::Failed {
                    step,
                    reason: e.to_string(),
                    attempt,
                    retry_at: Instant::now() + delay,
                });
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY);
            }
        }
    }
}

/// The daemon's view of the preparation's progress: its state and its log.
struct Report<'a> {
    slot: &'a Sandboxes,
    attempt: u32,
}

impl prepare::Progress for Report<'_> {
    fn start(&self, step: Step) {
        self.slot.set(State::Preparing {
            step,
            attempt: self.attempt,
        });
        let (n, total) = (step.number(), Step::ALL.len());
        tracing::info!(step = n, of = total, "{}", step.describe());
        eprintln!(
            "moat serve: preparing sandboxes, step {n} of {total}: {}",
            step.describe()
        );
    }

    fn done(&self, outcome: &str) {
        tracing::info!("{outcome}");
        eprintln!("moat serve: {outcome}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(s: &Sandboxes) -> (u16, Option<u64>, String) {
        let e = s.manager().err().expect("no manager yet");
        let retry = match &e {
            Error::NotReady { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        };
        (e.status_and_code().0.as_u16(), retry, e.to_string())
    }

    #[test]
    fn each_state_has_its_503_and_its_health() {
        let s = Sandboxes::new(State::Preparing {
            step: Step::BaseImage,
            attempt: 2,
        });
        let (status, retry, msg) = refusal(&s);
        assert_eq!((status, retry), (503, Some(RETRY_WHILE_PREPARING_S)));
        assert!(
            msg.contains("step 2 of 3") && msg.contains("mmdebstrap"),
            "{msg}"
        );
        let h = s.health();
        assert_eq!(h.state, SandboxesState::Preparing);
        assert_eq!(
            (h.step, h.steps_done, h.attempt),
            (Some(Step::BaseImage), 1, 2)
        );
        assert_eq!(h.message, msg);

        // The manager itself failed to start: no step, every step done.
        s.set(State::Failed {
            step: None,
            reason: "the store is locked".into(),
            attempt: 3,
            retry_at: Instant::now() + Duration::from_secs(40),
        });
        let (status, retry, msg) = refusal(&s);
        assert_eq!(status, 503);
        assert!(matches!(retry, Some(39..=40)), "{retry:?}");
        assert!(
            msg.contains("the store is locked") && msg.contains("attempt 3"),
            "{msg}"
        );
        let h = s.health();
        assert_eq!(h.state, SandboxesState::Failed);
        assert_eq!((h.step, h.steps_done, h.steps_total), (None, 3, 3));
        assert!(matches!(h.retry_after_s, Some(39..=40)), "{h:?}");

        // A retry time already past still asks the client to wait a second, never zero.
        s.set(State::Failed {
            step: Some(Step::Kernel),
            reason: "apt-get failed".into(),
            attempt: 1,
            retry_at: Instant::now(),
        });
        assert_eq!(refusal(&s).1, Some(1));
        assert_eq!(s.health().steps_done, 0);

        let s = Sandboxes::unavailable("no static guest agent found".into());
        let (status, retry, msg) = refusal(&s);
        assert_eq!((status, retry), (503, None));
        assert!(
            msg.contains("cannot run sandboxes: no static guest agent"),
            "{msg}"
        );
        assert_eq!(s.health().state, SandboxesState::Unavailable);
        assert!(s.ready().is_none());
    }
}
