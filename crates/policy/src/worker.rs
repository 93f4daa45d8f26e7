//! Analysis of hostile input, bounded. Parsers of untrusted code have crashed and hung before
//! (Ruff's stack overflow on deep nesting, tree-sitter segfaults; here, `[` × 100 000 overflows
//! a 2 MiB thread stack inside the Python parser). A stack overflow aborts the whole process and
//! a hung thread cannot be stopped, so `catch_unwind` and a timer on a thread would not protect
//! the daemon. Instead each check runs in a short-lived worker process — the `moat` binary
//! itself (`moat policy worker`) — that caps its own address space and CPU time and runs the
//! check on a thread with a large stack; the caller kills it at the deadline. Whatever goes
//! wrong (crash, hang, garbage answer, no worker at all) becomes an `analysis.failed` finding,
//! so it refuses in `enforce` and never passes code through unchecked.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::check::{check, MAX_CODE_BYTES};
use crate::decision::{Decision, Finding, Loc, Rule};
use crate::error::Error;
use crate::policy::{Mode, Policy};
use crate::request::CheckRequest;

/// The stack of the worker's analysis thread: parsers and tree walks recurse, and the deepest
/// trees 1 MiB of code can build (`1+1+…`) need far more than a default stack. Only the pages
/// used are ever touched.
const WORKER_STACK_BYTES: usize = 256 << 20;

/// The most a worker reads: a policy and a request holding at most a few pieces of code.
const MAX_WORKER_INPUT: u64 = 8 * MAX_CODE_BYTES as u64;

/// What a worker may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    /// Wall-clock time from start to answer, start-up included.
    pub deadline: Duration,
    /// The worker's address space (RLIMIT_AS); must leave room for its 256 MiB stack.
    pub memory_bytes: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            deadline: Duration::from_secs(2),
            memory_bytes: 1 << 30,
        }
    }
}

/// What the caller sends a worker on stdin.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Job {
    policy: Policy,
    request: CheckRequest,
    bounds: Bounds,
}

/// Checks `request` in a worker process started as `program args…` (which must call
/// [`serve`]), within `bounds`. Never fails: a worker that cannot answer yields a decision with
/// an `analysis.failed` finding.
pub fn check_in_worker(
    program: &Path,
    args: &[&str],
    policy: &Policy,
    request: &CheckRequest,
    bounds: Bounds,
) -> Decision {
    if policy.mode == Mode::Off {
        return check(policy, request);
    }
    match run_worker(program, args, policy, request, bounds) {
        Ok(decision) => decision,
        Err(why) => analysis_failed(policy.mode, request, &why),
    }
}

/// The decision when the analysis could not run (for callers that lose a worker some other
/// way, such as a task that could not be joined): an `analysis.failed` finding saying why.
pub fn analysis_failed(mode: Mode, request: &CheckRequest, why: &str) -> Decision {
    Decision::from_findings(
        mode,
        vec![Finding::new(
            Rule::AnalysisFailed,
            format!("the analysis did not finish, so nothing was checked: {why}"),
            Loc::request(&request.summary()),
        )],
    )
}

fn run_worker(
    program: &Path,
    args: &[&str],
    policy: &Policy,
    request: &CheckRequest,
    bounds: Bounds,
) -> Result<Decision, String> {
    let job = serde_json::to_vec(&Job {
        policy: policy.clone(),
        request: request.clone(),
        bounds,
    })
    .map_err(|e| e.to_string())?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let mut stdin = child.stdin.take().ok_or("no stdin pipe")?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    // Reading and writing happen off this thread so that the deadline holds whatever the
    // worker does with its pipes.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // A worker that dies early closes its stdin; what it said matters more than EPIPE.
        let _ = stdin.write_all(&job);
        drop(stdin);
        let mut out = Vec::new();
        let read = (&mut stdout).take(MAX_WORKER_INPUT).read_to_end(&mut out);
        let mut err = Vec::new();
        let _ = (&mut stderr).take(4096).read_to_end(&mut err);
        let _ = tx.send((read.map(|_| out), err));
    });
    let answer = rx.recv_timeout(bounds.deadline);
    let Ok((out, err)) = answer else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "no answer within {} ms",
            bounds.deadline.as_millis()
        ));
    };
    let status = child.wait().map_err(|e| e.to_string())?;
    let out = out.map_err(|e| e.to_string())?;
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        let err = err.trim();
        return Err(format!(
            "the worker ended with {status}{}{err}",
            if err.is_empty() { "" } else { ": " }
        ));
    }
    serde_json::from_slice(&out).map_err(|e| format!("the worker's answer is not a decision: {e}"))
}

/// The worker's side: reads a job on `input`, caps this process's address space and CPU time,
/// checks on a large stack and writes the decision to `output`. Run it in a process of its own
/// (it lowers that process's limits for good).
pub fn serve(input: impl Read, mut output: impl Write) -> Result<(), Error> {
    let mut text = Vec::new();
    input
        .take(MAX_WORKER_INPUT)
        .read_to_end(&mut text)
        .map_err(|e| Error::Worker(format!("reading the job: {e}")))?;
    let job: Job = serde_json::from_slice(&text)
        .map_err(|e| Error::Worker(format!("the job is not valid: {e}")))?;
    drop(text);
    limit(job.bounds)?;
    let handle = std::thread::Builder::new()
        .name("policy-analysis".into())
        .stack_size(WORKER_STACK_BYTES)
        .spawn(move || check(&job.policy, &job.request))
        .map_err(|e| Error::Worker(format!("starting the analysis thread: {e}")))?;
    let decision = handle
        .join()
        .map_err(|_| Error::Worker("the analysis panicked".into()))?;
    serde_json::to_writer(&mut output, &decision)
        .map_err(|e| Error::Worker(format!("writing the decision: {e}")))?;
    output
        .flush()
        .map_err(|e| Error::Worker(format!("writing the decision: {e}")))
}

fn limit(bounds: Bounds) -> Result<(), Error> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(
        Resource::RLIMIT_AS,
        bounds.memory_bytes,
        bounds.memory_bytes,
    )
    .map_err(|e| Error::Worker(format!("capping memory: {e}")))?;
    // CPU seconds, rounded up: a backstop for a caller that forgets the deadline.
    let cpu = bounds.deadline.as_secs() + 1;
    setrlimit(Resource::RLIMIT_CPU, cpu, cpu)
        .map_err(|e| Error::Worker(format!("capping CPU time: {e}")))
}
