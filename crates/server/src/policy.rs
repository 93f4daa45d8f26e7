//! The policy gate: every exec, background process and shell start is checked against its
//! group's policy before anything reaches the sandbox (docs/POLICY.md). The analysis of the
//! caller's code runs in a `moat policy worker` process (moat_policy::check_in_worker), never
//! in the daemon, so a parser that crashes or hangs on hostile input costs one worker and
//! refuses the request (`analysis.failed`). Every decision made under a policy that is not
//! `off` is appended to the group's hash-chained decisions log before the request goes on; a
//! decision that cannot be recorded refuses the request too.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_policy::log::{LogEntry, Verdict};
use moat_policy::{analysis_failed, check_in_worker, Bounds, CheckRequest, Decision, Mode, Policy};

use crate::api::{rfc3339, ExecRequest};
use crate::error::{Error, Result};
use crate::metrics::{self, Metrics};
use crate::store::{now, Store};

/// How the daemon runs analyses: the `moat` executable (its hidden `policy worker` command)
/// and the bounds of each worker.
#[derive(Debug, Clone)]
pub struct Gate {
    program: PathBuf,
    bounds: Bounds,
    rate: CheckRate,
    /// One token bucket per API key id, for dry runs.
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

/// How many dry runs (`POST …/policy/check`) one API key may ask for: each starts a worker
/// process, so a key that loops on it would take the host's CPU. A token bucket per key:
/// `burst` at once, then `per_s` a second. (Gated execs are not limited here: each also
/// reaches a sandbox, whose own limits apply.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckRate {
    pub burst: u32,
    pub per_s: f64,
}

impl Default for CheckRate {
    fn default() -> Self {
        CheckRate {
            burst: 20,
            per_s: 5.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token at `now`, or says how long until one is there.
    fn take(&mut self, rate: CheckRate, now: Instant) -> std::result::Result<(), Duration> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate.per_s;
        self.tokens = (self.tokens + refill).min(f64::from(rate.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate.per_s))
        }
    }
}

/// Where a checked request was going, for the decisions log.
pub struct Asked<'a> {
    pub group: &'a str,
    pub sandbox: &'a str,
    /// `exec`, `process`, `shell` or `upload`.
    pub route: &'static str,
    /// The API key's id.
    pub key: &'a str,
}

impl Gate {
    /// Workers are `program policy worker` within the default bounds (2 s, 1 GiB).
    pub fn new(program: PathBuf) -> Gate {
        Gate::with_bounds(program, Bounds::default())
    }

    pub fn with_bounds(program: PathBuf, bounds: Bounds) -> Gate {
        Gate {
            program,
            bounds,
            rate: CheckRate::default(),
            buckets: Arc::default(),
        }
    }

    /// The same gate with another dry-run rate per key.
    pub fn with_check_rate(mut self, rate: CheckRate) -> Gate {
        self.rate = rate;
        self
    }

    /// Admits one dry run for API key `key`, or refuses it (429) saying when to retry.
    pub fn admit_check(&self, key: &str) -> Result<()> {
        self.admit_check_at(key, Instant::now())
    }

    fn admit_check_at(&self, key: &str, now: Instant) -> Result<()> {
        let rate = self.rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        });
        bucket.take(rate, now).map_err(|wait| {
            Error::TooManyRequests(format!(
                "too many policy checks for this API key: each starts an analysis process, so \
                 a key may ask for {} at once and {} a second after that; retry in {:.1} s",
                rate.burst,
                rate.per_s,
                wait.as_secs_f64()
            ))
        })
    }

    /// `policy`'s decision about `request`, analysed in a worker off the async runtime.
    pub async fn decide(&self, policy: &Policy, request: &CheckRequest) -> Decision {
        let (gate, p, r) = (self.clone(), policy.clone(), request.clone());
        let mode = policy.mode;
        tokio::task::spawn_blocking(move || gate.decide_blocking(&p, &r))
            .await
            .unwrap_or_else(|e| analysis_failed(mode, request, &format!("the check task: {e}")))
    }

    fn decide_blocking(&self, policy: &Policy, request: &CheckRequest) -> Decision {
        check_in_worker(
            &self.program,
            &["policy", "worker"],
            policy,
            request,
            self.bounds,
        )
    }

    /// Checks `policy` (every problem at once), deciding its `tests` examples in workers: they
    /// are code from the caller too.
    pub async fn validate(&self, policy: &Policy) -> Result<()> {
        let (gate, p) = (self.clone(), policy.clone());
        tokio::task::spawn_blocking(move || p.validate_with(|p, r| gate.decide_blocking(p, r)))
            .await
            .map_err(Error::task("checking the policy"))?
            .map_err(invalid)
    }

    /// The gate itself: decides `request` under `group`'s policy in force, records the
    /// decision, and refuses (403 `policy_denied`) what `enforce` refuses. A group without a
    /// policy, or with mode `off`, is not checked and nothing is recorded.
    pub async fn enforce(
        &self,
        store: &Store,
        metrics: &Metrics,
        asked: Asked<'_>,
        request: CheckRequest,
    ) -> Result<()> {
        let Some(active) = store.get_policy(asked.group).await? else {
            return Ok(());
        };
        if active.policy.mode == Mode::Off {
            return Ok(());
        }
        let t0 = Instant::now();
        let decision = self.decide(&active.policy, &request).await;
        metrics.observe_op(metrics::POLICY_CHECK, &[], t0.elapsed());
        let verdict = Verdict::of(&decision);
        count(metrics, asked.group, verdict, &decision);
        let mut request = request;
        for v in request.env.values_mut() {
            *v = "<redacted>".to_string();
        }
        let entry = LogEntry {
            n: 0,
            group: asked.group.to_string(),
            at: rfc3339(now()),
            key: asked.key.to_string(),
            route: asked.route.to_string(),
            sandbox: Some(asked.sandbox.to_string()),
            request,
            policy_version: active.version,
            verdict,
            decision: decision.clone(),
            prev_hash: String::new(),
            hash: String::new(),
        };
        // Not recorded, not run: the log must hold every decision that let something through.
        store.record_decision(entry).await?;
        if decision.allowed {
            return Ok(());
        }
        Err(denied(asked.group, active.version, decision))
    }
}

/// `moat_policy_decisions_total{group, verdict, rule}`: one per distinct rule of a decision
/// (`rule="none"` when nothing was found), so a dashboard can show what is refused most.
fn count(metrics: &Metrics, group: &str, verdict: Verdict, decision: &Decision) {
    let mut rules: Vec<&str> = decision.findings.iter().map(|f| f.rule.id()).collect();
    rules.sort_unstable();
    rules.dedup();
    if rules.is_empty() {
        rules.push("none");
    }
    for rule in rules {
        metrics.count(
            metrics::POLICY_DECISIONS,
            &[
                ("group", group),
                ("verdict", verdict.as_str()),
                ("rule", rule),
            ],
        );
    }
}

/// The 403 for a refused request: the first findings in the message, all of them in the body.
fn denied(group: &str, version: u64, decision: Decision) -> Error {
    let mut reasons: Vec<String> = decision
        .findings
        .iter()
        .take(3)
        .map(|f| format!("{}: {}", f.rule, f.message))
        .collect();
    if decision.findings.len() > 3 {
        reasons.push(format!("and {} more", decision.findings.len() - 3));
    }
    Error::PolicyDenied {
        message: format!(
            "refused by the policy of group {} (version {version}): {}",
            crate::api::quote(group),
            reasons.join("; ")
        ),
        findings: decision.findings,
        policy_version: version,
    }
}

impl ExecRequest {
    /// What the policy checks of this exec: what runs, the environment the request sets, the
    /// user, the working directory, stdin and the timeout.
    pub fn policy_request(&self) -> CheckRequest {
        CheckRequest {
            argv: self.argv.clone(),
            command: self.command.clone(),
            python: None,
            shell: None,
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            stdin: self.stdin.clone(),
            timeout_s: self.timeout_s,
        }
    }
}

/// A policy or request the document's schema allows but moat-policy refuses (a rule that does
/// not compile, examples the policy contradicts, "exactly one of argv, command, python and
/// shell"): 422, with every problem named. Text that is not a policy at all is a 400.
pub fn invalid(e: moat_policy::Error) -> Error {
    match e {
        moat_policy::Error::PolicySyntax(_) => Error::BadRequest(e.to_string()),
        moat_policy::Error::Worker(_) => Error::Unavailable(e.to_string()),
        _ => Error::Unprocessable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::{GroupSpec, Rule};

    const ENFORCE: &str = "mode: enforce\ncommands:\n  deny: [curl]\n";

    async fn group_with(policy: &str) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_store(dir.path());
        store.put_group("g", &GroupSpec::default()).await.unwrap();
        let policy = Policy::parse(policy).unwrap();
        store.put_policy("g", &policy, "key-1").await.unwrap();
        (dir, store)
    }

    fn asked() -> Asked<'static> {
        Asked {
            group: "g",
            sandbox: "sb-1",
            route: "exec",
            key: "key-1",
        }
    }

    fn ls() -> CheckRequest {
        CheckRequest {
            argv: Some(vec!["ls".into()]),
            env: [("TOKEN".to_string(), "s3cret".to_string())].into(),
            ..Default::default()
        }
    }

    /// Fail closed: a worker that cannot start, crashes, or hangs past its deadline refuses
    /// the request in `enforce` (saying why), and the refusal is recorded.
    #[tokio::test]
    async fn a_worker_that_fails_refuses_and_says_why() {
        let (_dir, store) = group_with(ENFORCE).await;
        let metrics = Metrics::default();
        let short = Bounds {
            deadline: Duration::from_millis(300),
            ..Bounds::default()
        };
        for (gate, why) in [
            (Gate::new("/nonexistent/moat".into()), "cannot start"),
            (
                Gate::new("/bin/false".into()),
                "the worker ended with exit status: 1",
            ),
            (
                Gate::with_bounds(hang_script(), short),
                "no answer within 300 ms",
            ),
        ] {
            let e = gate
                .enforce(&store, &metrics, asked(), ls())
                .await
                .unwrap_err();
            let Error::PolicyDenied {
                findings, message, ..
            } = &e
            else {
                panic!("{e:?}")
            };
            assert_eq!(findings[0].rule, Rule::AnalysisFailed, "{message}");
            assert!(
                findings[0].message.contains(why),
                "{why}: {}",
                findings[0].message
            );
        }
        let (log, _) = store
            .list_decisions(
                "g",
                &crate::api::DecisionFilter {
                    verdict: None,
                    since: None,
                    after: 0,
                    limit: 100,
                },
            )
            .await
            .unwrap();
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|e| e.verdict == Verdict::Deny));
        assert_eq!(log[0].request.env["TOKEN"], "<redacted>");
        let text = metrics.render(&[]);
        assert!(
            text.contains(
                "moat_policy_decisions_total{group=\"g\",verdict=\"deny\",rule=\"analysis.failed\"} 3"
            ),
            "{text}"
        );
    }

    /// A script that ignores its job and sleeps: a worker that hangs.
    fn hang_script() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moat-policy-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hang");
        std::fs::write(&path, "#!/bin/sh\nexec sleep 30\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn audit_and_off_never_refuse_and_off_records_nothing() {
        let (_dir, store) = group_with("mode: audit\ncommands:\n  deny: [ls]\n").await;
        let metrics = Metrics::default();
        // Even a worker that cannot start only reports in audit mode.
        let gate = Gate::new("/nonexistent/moat".into());
        gate.enforce(&store, &metrics, asked(), ls()).await.unwrap();
        let off = Policy::parse("mode: off\ncommands:\n  deny: [ls]\n").unwrap();
        store.put_policy("g", &off, "key-1").await.unwrap();
        gate.enforce(&store, &metrics, asked(), ls()).await.unwrap();
        let recent = store.recent_decisions("g", 10).await.unwrap();
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].verdict, Verdict::Audit);
        assert_eq!(recent[0].policy_version, 1);
    }

    /// The dry-run bucket: a burst, then refusals naming the wait, refilled over time, and
    /// one key's use never costs another key.
    #[test]
    fn dry_runs_are_limited_per_key() {
        let gate = Gate::new("/nonexistent".into()).with_check_rate(CheckRate {
            burst: 3,
            per_s: 2.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            gate.admit_check_at("k1", t0).unwrap();
        }
        let e = gate.admit_check_at("k1", t0).unwrap_err();
        assert!(matches!(e, Error::TooManyRequests(_)), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("3 at once and 2 a second") && m.contains("retry in 0.5 s"),
            "{m}"
        );
        assert_eq!(e.status_and_code().0.as_u16(), 429);
        gate.admit_check_at("k2", t0).unwrap();
        // Half a second gives one token back, and no more than the burst ever builds up.
        let t1 = t0 + Duration::from_millis(500);
        gate.admit_check_at("k1", t1).unwrap();
        assert!(gate.admit_check_at("k1", t1).is_err());
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            gate.admit_check_at("k1", t2).unwrap();
        }
        assert!(gate.admit_check_at("k1", t2).is_err());
    }

    #[test]
    fn a_refusal_names_the_group_version_and_rules() {
        let policy = Policy::parse(ENFORCE).unwrap();
        let req = CheckRequest {
            command: Some("curl a; curl b; curl c; curl d".into()),
            ..Default::default()
        };
        let e = denied("g", 4, moat_policy::check(&policy, &req));
        let m = e.to_string();
        assert!(
            m.starts_with("refused by the policy of group \"g\" (version 4): command.denied"),
            "{m}"
        );
        assert!(m.ends_with("and 1 more"), "{m}");
        let (status, code) = e.status_and_code();
        assert_eq!((status.as_u16(), code), (403, "policy_denied"));
    }
}
