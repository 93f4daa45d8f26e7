//! Child reaping for PID 1. Every orphan in the guest ends up as our child, so one
//! `waitpid(-1)` loop reaps everything and hands the statuses of our own execs to their tasks.
//!
//! Spawning and reaping are serialised by one lock: a child is registered before the reaper can
//! reap it, so an exit racing its registration is never lost. That also keeps std's own
//! `waitpid` (after a failed `execve`) from ever seeing ECHILD.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::sys::lock;

/// How a process ended, as in `Message::Exited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

type Waiters = HashMap<u32, oneshot::Sender<ExitStatus>>;
type Hook = Box<dyn FnMut() + Send>;

#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
    /// Called after every round of reaping (to remove emptied exec cgroups).
    on_reap: Arc<Mutex<Vec<Hook>>>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD on the current runtime.
    pub fn start() -> io::Result<Reaper> {
        let reaper = Reaper::default();
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Registers a hook that runs after each round of reaping.
    pub fn on_reap(&self, hook: impl FnMut() + Send + 'static) {
        lock(&self.on_reap).push(Box::new(hook));
    }

    /// Spawns `cmd`; the receiver gets the exit status once the child is reaped.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut waiters = lock(&self.waiters);
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id(), tx);
        Ok((child, rx))
    }

    fn reap(&self) {
        loop {
            let mut waiters = lock(&self.waiters);
            let mut status = 0;
            // SAFETY: waitpid writes the status to the live local `status`.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            // Orphans nobody waits for are simply dropped.
            if let Some(tx) = waiters.remove(&(pid as u32)) {
                let _ = tx.send(decode(status));
            }
        }
        for hook in lock(&self.on_reap).iter_mut() {
            hook();
        }
    }
}

fn decode(status: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}
