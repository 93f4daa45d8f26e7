//! Background processes (`ProcStart` and friends): started like an exec, but they outlive the
//! stream and the session. The agent keeps a table of them with their output in bounded rings,
//! so a chatty process never blocks on a full pipe and never grows the agent's memory.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_protocol::{
    channel, ErrorKind, Event, ExecRequest, Message, ProcExit, ProcInfo, Stream, StreamSender,
    PROC_KEEP_FINISHED, PROC_LOG_RING,
};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::exec::{deadline_after, sleep_until, Execs, Io, Running};
use crate::files::Failure;
use crate::reaper::ExitStatus;
use crate::sys::{kill_group, lock};

/// What `Procs` reports of an argv: enough to recognise the process, small enough that one
/// entry always fits in a message.
const ARGV_MAX_ARGS: usize = 32;
const ARGV_MAX_CHARS: usize = 256;
/// A `Procs` message is cut once its entries pass this size (below the frame limit).
const PROCS_MSG_BYTES: usize = 64 * 1024;

#[derive(Default)]
pub struct ProcTable {
    next: u64,
    procs: BTreeMap<u64, Arc<Proc>>,
}

impl ProcTable {
    /// Forgets the oldest finished processes beyond the newest [`PROC_KEEP_FINISHED`].
    fn prune(&mut self) {
        let finished: Vec<u64> = self
            .procs
            .iter()
            .filter(|(_, p)| p.exit.borrow().is_some())
            .map(|(n, _)| *n)
            .collect();
        let excess = finished.len().saturating_sub(PROC_KEEP_FINISHED);
        for n in &finished[..excess] {
            self.procs.remove(n);
        }
    }
}

struct Proc {
    id: String,
    pid: u32,
    argv: Vec<String>,
    started_unix_ms: u64,
    exit: watch::Sender<Option<ProcExit>>,
    stdout: Arc<Mutex<Ring>>,
    stderr: Arc<Mutex<Ring>>,
    /// `cgroup.kill` of the process's tree, while its cgroup exists.
    kill_tree: Box<dyn Fn() -> bool + Send + Sync>,
}

/// The newest [`PROC_LOG_RING`] bytes of an output.
#[derive(Default)]
struct Ring(VecDeque<u8>);

impl Ring {
    fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(PROC_LOG_RING)..];
        let excess = (self.0.len() + data.len()).saturating_sub(PROC_LOG_RING);
        self.0.drain(..excess);
        self.0.extend(data);
    }
}

fn failure(kind: ErrorKind, message: impl Into<String>) -> Failure {
    Failure(kind, message.into())
}

impl Execs {
    fn proc(&self, id: &str) -> Result<Arc<Proc>, Failure> {
        let n = id.strip_prefix('p').and_then(|n| n.parse::<u64>().ok());
        n.and_then(|n| lock(&self.procs).procs.get(&n).cloned())
            .ok_or_else(|| failure(ErrorKind::NotFound, format!("no background process {id:?}")))
    }

    pub fn proc_start(&self, req: ExecRequest) -> Result<Message, Failure> {
        if req.pty.is_some() || req.stdin {
            return Err(failure(
                ErrorKind::InvalidInput,
                "background processes take neither stdin nor a terminal",
            ));
        }
        let Running {
            pid,
            exit,
            io,
            cgroup,
        } = self.start(&req, false).map_err(|(k, m)| Failure(k, m))?;
        let Io::Pipes { stdout, stderr, .. } = io else {
            unreachable!("started without a terminal");
        };
        let mut table = lock(&self.procs);
        table.next += 1;
        let n = table.next;
        let cgroup = Arc::new(Mutex::new(cgroup));
        let cg = cgroup.clone();
        let proc = Arc::new(Proc {
            id: format!("p{n}"),
            pid,
            argv: req
                .argv
                .iter()
                .take(ARGV_MAX_ARGS)
                .map(|a| a.chars().take(ARGV_MAX_CHARS).collect())
                .collect(),
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            exit: watch::channel(None).0,
            stdout: Arc::default(),
            stderr: Arc::default(),
            kill_tree: Box::new(move || lock(&cg).as_ref().is_some_and(|c| c.kill().is_ok())),
        });
        table.procs.insert(n, proc.clone());
        drop(table);
        let reply = Message::ProcStarted {
            id: proc.id.clone(),
            pid,
        };
        let deadline = deadline_after(req.timeout_ms);
        tokio::spawn(
            self.clone()
                .supervise(proc, exit, (stdout, stderr), cgroup, deadline),
        );
        Ok(reply)
    }

    /// Captures the output of a background process until it exits, then records the exit.
    async fn supervise(
        self,
        proc: Arc<Proc>,
        mut exit: oneshot::Receiver<ExitStatus>,
        (stdout, stderr): (pipe::Receiver, pipe::Receiver),
        cgroup: Arc<Mutex<Option<crate::exec::ExecCgroup>>>,
        deadline: Option<Instant>,
    ) {
        let (exited_tx, exited_rx) = watch::channel(false);
        let out = tokio::spawn(capture(stdout, proc.stdout.clone(), exited_rx.clone()));
        let err = tokio::spawn(capture(stderr, proc.stderr.clone(), exited_rx));
        let mut timed_out = false;
        let status = loop {
            tokio::select! {
                status = &mut exit => break status.unwrap_or(ExitStatus::Signal(libc::SIGKILL)),
                _ = sleep_until(deadline), if !timed_out => {
                    timed_out = true;
                    if !(proc.kill_tree)() {
                        let _ = kill_group(proc.pid, libc::SIGKILL);
                    }
                }
            }
        };
        // Everything the process wrote is in its pipes now: take it into the rings before the
        // exit is visible, so a `ProcWait` followed by `ProcLogs` sees all of it.
        let _ = exited_tx.send(true);
        let _ = out.await;
        let _ = err.await;
        let (code, signal) = match status {
            ExitStatus::Code(c) => (Some(c), None),
            ExitStatus::Signal(s) => (None, Some(s)),
        };
        proc.exit.send_replace(Some(ProcExit {
            code,
            signal,
            timed_out,
        }));
        self.release_cgroup(lock(&cgroup).take());
        lock(&self.procs).prune();
    }

    pub async fn proc_list(&self, sender: &StreamSender) -> Result<Message, Failure> {
        let procs: Vec<ProcInfo> = lock(&self.procs)
            .procs
            .values()
            .map(|p| {
                let exit = *p.exit.borrow();
                ProcInfo {
                    id: p.id.clone(),
                    pid: p.pid,
                    argv: p.argv.clone(),
                    running: exit.is_none(),
                    exit,
                    started_unix_ms: p.started_unix_ms,
                }
            })
            .collect();
        let mut batch = Vec::new();
        let mut bytes = 0;
        for info in procs {
            bytes += serde_json::to_vec(&info).map_or(0, |v| v.len());
            batch.push(info);
            if bytes >= PROCS_MSG_BYTES {
                send(sender, std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            send(sender, batch).await?;
        }
        Ok(Message::Done)
    }

    pub fn proc_kill(&self, id: &str, signal: i32) -> Result<Message, Failure> {
        let proc = self.proc(id)?;
        if !(1..=libc::SIGRTMAX()).contains(&signal) {
            return Err(failure(
                ErrorKind::InvalidInput,
                format!("bad signal {signal}"),
            ));
        }
        // Once the leader is reaped its pid may be reused: only the cgroup is still safe.
        let running = proc.exit.borrow().is_none();
        if signal == libc::SIGKILL && (proc.kill_tree)() {
            return Ok(Message::Done);
        }
        if running {
            kill_group(proc.pid, signal)
                .map_err(|e| failure(ErrorKind::Other, format!("kill {id}: {e}")))?;
        }
        Ok(Message::Done)
    }

    /// Waits for the exit, but gives up when the host abandons the stream.
    pub async fn proc_wait(
        &self,
        id: &str,
        timeout_ms: u64,
        stream: &mut Stream,
    ) -> Option<Result<Message, Failure>> {
        let proc = match self.proc(id) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let mut exit = proc.exit.subscribe();
        let wait = tokio::time::timeout(
            Duration::from_millis(timeout_ms),
            exit.wait_for(Option::is_some),
        );
        tokio::select! {
            r = wait => Some(match r {
                Ok(Ok(e)) => {
                    let e = e.expect("waited for Some");
                    Ok(Message::Exited {
                        code: e.code,
                        signal: e.signal,
                        timed_out: e.timed_out,
                    })
                }
                _ => Err(failure(
                    ErrorKind::Timeout,
                    format!("{id} still running after {timeout_ms} ms"),
                )),
            }),
            () = abandoned(stream) => None,
        }
    }

    pub async fn proc_logs(&self, id: &str, sender: &StreamSender) -> Result<Message, Failure> {
        let proc = self.proc(id)?;
        for (ring, ch) in [
            (&proc.stdout, channel::STDOUT),
            (&proc.stderr, channel::STDERR),
        ] {
            let data: Vec<u8> = lock(ring).0.iter().copied().collect();
            let gone = |_| failure(ErrorKind::Other, "the stream closed");
            sender.data(ch, &data).await.map_err(gone)?;
            sender.eof(ch).await.map_err(gone)?;
        }
        Ok(Message::Done)
    }
}

async fn send(sender: &StreamSender, procs: Vec<ProcInfo>) -> Result<(), Failure> {
    sender
        .msg(&Message::Procs { procs })
        .await
        .map_err(|e| failure(ErrorKind::Other, e.to_string()))
}

/// Returns once the host resets the stream or the session ends.
async fn abandoned(stream: &mut Stream) {
    while let Some(ev) = stream.recv().await {
        if matches!(ev, Event::Reset(_)) {
            return;
        }
    }
}

/// Reads one output of a background process into its ring until EOF. Once the process has
/// exited, takes what is buffered in the pipe and returns; a tree that still holds the pipe
/// keeps writing into the ring from a detached task.
async fn capture(
    mut rx: pipe::Receiver,
    ring: Arc<Mutex<Ring>>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            biased;
            r = rx.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => lock(&ring).push(&buf[..n]),
            },
            _ = exited.wait_for(|e| *e) => break,
        }
    }
    loop {
        // A raw read: tokio's try_read may report WouldBlock before it has seen readiness.
        // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return,
            n if n < 0 => break,
            n => lock(&ring).push(&buf[..n as usize]),
        }
    }
    tokio::spawn(async move {
        while let Ok(n @ 1..) = rx.read(&mut buf).await {
            lock(&ring).push(&buf[..n]);
        }
    });
}
