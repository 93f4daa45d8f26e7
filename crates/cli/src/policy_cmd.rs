//! `moat policy`: a group's policy on a daemon (`show`, `apply`, `rollback`, `check GROUP`, `decisions`,
//! `verify-log`) and the offline checker (`check --policy FILE`), for CI and for writing
//! policies without a daemon. The offline checker checks one request (a Python file, a shell
//! file or a command line) exactly as the daemon will, in the same bounded worker process
//! (`moat policy worker`, hidden), and says why in text, JSON or SARIF. `check` exits 0 when
//! allowed, 1 when refused, 2 on bad input; `verify-log` 0 when the chain is intact, 1 when it
//! is broken.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use moat_policy::log::{LogAnchor, LogEntry, Verifier};
use moat_policy::{check_in_worker, Bounds, CheckRequest, Decision, Mode, Policy, Rule};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::client::{path_segment, print_json, print_table, s, Client, ClientArgs};

const EXIT_ALLOWED: u8 = 0;
const EXIT_REFUSED: u8 = 1;
/// Bad input to `check`; also every usage error of `moat policy …` (see main.rs).
pub const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the policy in force for a group (version 0: none, so it is off).
    Show { group: String },
    /// Apply a policy file (JSON or YAML) to a group as its new version.
    Apply {
        group: String,
        /// The group's `policy` object, as JSON or YAML.
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
    },
    /// Make an earlier version of a group's policy the one in force again, as a new version
    /// (the history is kept).
    Rollback {
        group: String,
        /// The version to go back to (`moat policy show`, `GET …/policy/versions`).
        #[arg(long, value_name = "VERSION")]
        to: u64,
    },
    /// Check a Python file, a shell file or a command against a group's policy on the daemon
    /// (GROUP), or against a policy file offline (--policy FILE). Exit 0 when allowed, 1 when
    /// refused, 2 on bad input.
    Check(CheckArgs),
    /// List a group's recorded decisions, oldest first.
    Decisions(DecisionsArgs),
    /// Check a group's decisions log: recompute every entry's hash and its link to the entry
    /// before. Exit 0 when intact, 1 when an entry was changed or removed (it says which).
    VerifyLog { group: String },
    /// Serve one check on stdin/stdout under caps (used by `check` and by the daemon).
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The group whose policy in force checks the request (on the daemon).
    #[arg(conflicts_with = "policy")]
    group: Option<String>,
    /// The group's `policy` object, as JSON or YAML: check offline, without a daemon.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Check this file as Python source.
    #[arg(long, value_name = "FILE.py", conflicts_with_all = ["shell", "argv"])]
    python: Option<PathBuf>,
    /// Check this file as a shell script (analysed as an exec's `command` is).
    #[arg(long, value_name = "FILE.sh", conflicts_with = "argv")]
    shell: Option<PathBuf>,
    /// Environment the request would set, as NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// The user the request would run as.
    #[arg(long)]
    user: Option<String>,
    /// The request's timeout in seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Print the findings as SARIF 2.1.0 (for code-scanning tools); not with --json.
    #[arg(long)]
    sarif: bool,
    /// The command to check, as an exec's argv.
    #[arg(last = true, value_name = "CMD")]
    argv: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DecisionsArgs {
    group: String,
    /// Only allow, deny or audit (ran in audit mode with findings).
    #[arg(long)]
    verdict: Option<String>,
    /// Only decisions at or after this time (unix seconds).
    #[arg(long, value_name = "UNIX_SECONDS")]
    since: Option<u64>,
    /// At most this many (1–1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

/// `moat policy worker`: one check for the bounded worker (run before any async runtime
/// exists, so a worker starts as fast as a process can).
pub fn worker() -> u8 {
    match moat_policy::worker::serve(std::io::stdin().lock(), std::io::stdout().lock()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("moat: {e}");
            1
        }
    }
}

pub async fn run(client: ClientArgs, command: PolicyCommand) -> Result<u8> {
    match command {
        PolicyCommand::Worker => Ok(worker()),
        PolicyCommand::Check(args) => Ok(check(&client, &args).await),
        PolicyCommand::Show { group } => {
            let c = Client::new(&client)?;
            let (_, v) = c
                .call(
                    Method::GET,
                    &format!("{}/policy", group_path(&group)?),
                    None,
                )
                .await?;
            if client.json {
                print_json(&v)?;
            } else {
                print_version(&v);
                println!("{}", serde_json::to_string_pretty(&v["policy"])?);
            }
            Ok(0)
        }
        PolicyCommand::Apply { group, file } => {
            let text = read(&file).map_err(anyhow::Error::msg)?;
            let policy = Policy::parse(&text).with_context(|| file.display().to_string())?;
            let c = Client::new(&client)?;
            let body = serde_json::to_value(&policy)?;
            let (status, v) = c
                .call(
                    Method::PUT,
                    &format!("{}/policy", group_path(&group)?),
                    Some(&body),
                )
                .await?;
            if client.json {
                print_json(&v)?;
            } else if status == StatusCode::CREATED {
                println!("applied: version {} of group {group}", s(&v["version"]));
            } else {
                println!("unchanged: version {} of group {group}", s(&v["version"]));
            }
            Ok(0)
        }
        PolicyCommand::Rollback { group, to } => {
            let c = Client::new(&client)?;
            let (status, v) = c
                .call(
                    Method::POST,
                    &format!("{}/policy/rollback", group_path(&group)?),
                    Some(&serde_json::json!({ "version": to })),
                )
                .await?;
            if client.json {
                print_json(&v)?;
            } else if status == StatusCode::CREATED {
                println!(
                    "rolled back: version {} of group {group} is version {to}'s policy",
                    s(&v["version"])
                );
            } else {
                println!(
                    "unchanged: version {to}'s policy is in force (version {})",
                    s(&v["version"])
                );
            }
            Ok(0)
        }
        PolicyCommand::Decisions(a) => {
            let c = Client::new(&client)?;
            let mut path = format!(
                "{}/policy/decisions?limit={}",
                group_path(&a.group)?,
                a.limit
            );
            if let Some(v) = &a.verdict {
                path.push_str(&format!("&verdict={}", path_segment(v)?));
            }
            if let Some(t) = a.since {
                path.push_str(&format!("&since={t}"));
            }
            let (_, v) = c.call(Method::GET, &path, None).await?;
            if client.json {
                print_json(&v)?;
                return Ok(0);
            }
            let items: Vec<LogEntry> = serde_json::from_value(v["items"].clone())
                .context("the daemon's decisions are not log entries")?;
            print_table(
                &[
                    "N", "AT", "ROUTE", "SANDBOX", "VERDICT", "VERSION", "RULES", "REQUEST",
                ],
                items.iter().map(decision_row).collect(),
            );
            Ok(0)
        }
        PolicyCommand::VerifyLog { group } => verify_log(&client, &group).await,
    }
}

fn group_path(group: &str) -> Result<String> {
    Ok(format!("/v1/sandbox-groups/{}", path_segment(group)?))
}

fn print_version(v: &Value) {
    if v["version"] == 0 {
        println!(
            "# group {}: no policy was ever applied (off)",
            s(&v["group"])
        );
    } else {
        println!(
            "# group {}: version {} (sha256 {}), applied by {} at {}",
            s(&v["group"]),
            s(&v["version"]),
            s(&v["sha256"]),
            s(&v["author"]),
            s(&v["created_at"])
        );
    }
}

fn decision_row(e: &LogEntry) -> Vec<String> {
    let mut rules: Vec<&str> = e.decision.findings.iter().map(|f| f.rule.id()).collect();
    rules.dedup();
    vec![
        e.n.to_string(),
        e.at.clone(),
        e.route.clone(),
        e.sandbox.clone().unwrap_or_default(),
        e.verdict.as_str().to_string(),
        e.policy_version.to_string(),
        if rules.is_empty() {
            "-".into()
        } else {
            rules.join(",")
        },
        e.request.summary(),
    ]
}

/// Reads the whole log page by page and checks the chain here, with the CLI's own hashing:
/// the daemon is not asked whether its log is intact.
async fn verify_log(client: &ClientArgs, group: &str) -> Result<u8> {
    let c = Client::new(client)?;
    let base = format!("{}/policy/decisions?limit=1000", group_path(group)?);
    let mut verifier = Verifier::new(group);
    let mut after = 0;
    loop {
        let (_, v) = c
            .call(Method::GET, &format!("{base}&after={after}"), None)
            .await?;
        let items: Vec<LogEntry> = serde_json::from_value(v["items"].clone())
            .context("the daemon's decisions are not log entries")?;
        if !v["pruned"].is_null() {
            let anchor: LogAnchor = serde_json::from_value(v["pruned"].clone())
                .context("the daemon's log anchor is not one")?;
            verifier.anchor(&anchor);
        }
        for e in &items {
            verifier.push(e);
        }
        match v["next"].as_u64() {
            Some(n) if n > after => after = n,
            _ => break,
        }
    }
    let result = verifier.finish();
    if client.json {
        print_json(&serde_json::to_value(&result)?)?;
    } else if result.problems.is_empty() {
        match &result.head {
            Some((n, hash)) => println!(
                "intact: {} entries{}; head: entry {n}, hash {hash} (note it: a later check can \
                 then tell whether entries were cut off the end)",
                result.entries,
                if result.pruned > 0 {
                    format!(
                        " after entries 1–{} pruned by retention (the first kept chains to \
                         their anchor)",
                        result.pruned
                    )
                } else {
                    String::new()
                }
            ),
            None => println!("intact: the log of group {group} is empty"),
        }
    } else {
        println!(
            "BROKEN: the decisions log of group {group} was changed ({} entries read):",
            result.entries
        );
        for p in &result.problems {
            println!("  {p}");
        }
    }
    Ok(if result.problems.is_empty() { 0 } else { 1 })
}

async fn check(client: &ClientArgs, args: &CheckArgs) -> u8 {
    if client.json && args.sarif {
        eprintln!("moat: give one of --json and --sarif");
        return EXIT_BAD_INPUT;
    }
    let request = match request(args) {
        Ok(r) => r,
        Err(message) => {
            eprintln!("moat: {message}");
            return EXIT_BAD_INPUT;
        }
    };
    let decided = match (&args.policy, &args.group) {
        (Some(file), _) => offline(file, &request).map(|d| (d, None)),
        (None, Some(group)) => remote(client, group, &request)
            .await
            .map_err(|e| format!("{e:#}")),
        (None, None) => Err(
            "give the group to check against (moat policy check GROUP …) or a policy file \
             (--policy FILE)"
                .into(),
        ),
    };
    match decided {
        Ok((decision, version)) => {
            let source = args
                .python
                .as_ref()
                .or(args.shell.as_ref())
                .map(|f| f.display().to_string());
            report(
                client.json,
                args.sarif,
                &decision,
                version,
                source.as_deref(),
            );
            if decision.allowed {
                EXIT_ALLOWED
            } else {
                EXIT_REFUSED
            }
        }
        Err(message) => {
            eprintln!("moat: {message}");
            EXIT_BAD_INPUT
        }
    }
}

fn offline(policy_file: &Path, request: &CheckRequest) -> Result<Decision, String> {
    let text = read(policy_file)?;
    let policy = Policy::parse(&text).map_err(|e| format!("{}: {e}", policy_file.display()))?;
    let worker = std::env::current_exe()
        .map_err(|e| format!("cannot find the moat binary to run the check in: {e}"))?;
    Ok(check_in_worker(
        &worker,
        &["policy", "worker"],
        &policy,
        request,
        Bounds::default(),
    ))
}

/// The daemon's dry run: the group's policy in force decides; nothing runs.
async fn remote(
    client: &ClientArgs,
    group: &str,
    request: &CheckRequest,
) -> Result<(Decision, Option<u64>)> {
    let c = Client::new(client)?;
    let (_, v) = c
        .call(
            Method::POST,
            &format!("{}/policy/check", group_path(group)?),
            Some(&serde_json::to_value(request)?),
        )
        .await?;
    let decision = Decision {
        allowed: v["allowed"]
            .as_bool()
            .context("no `allowed` in the answer")?,
        mode: serde_json::from_value(v["mode"].clone())?,
        findings: serde_json::from_value(v["findings"].clone())?,
    };
    Ok((decision, v["policy_version"].as_u64()))
}

/// The request to check, or what is wrong with the input.
fn request(args: &CheckArgs) -> Result<CheckRequest, String> {
    let mut request = CheckRequest::default();
    if let Some(file) = &args.python {
        request.python = Some(read(file)?);
    } else if let Some(file) = &args.shell {
        request.shell = Some(read(file)?);
    } else if !args.argv.is_empty() {
        request.argv = Some(args.argv.clone());
    } else {
        return Err("give what to check: --python FILE.py, --shell FILE.sh or -- CMD…".into());
    }
    let mut env = BTreeMap::new();
    for pair in &args.env {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(format!("--env {pair:?}: write NAME=VALUE"));
        };
        env.insert(name.to_string(), value.to_string());
    }
    request.env = env;
    request.user = args.user.clone();
    request.timeout_s = args.timeout;
    request.validate()?;
    Ok(request)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn report(
    json_out: bool,
    sarif_out: bool,
    decision: &Decision,
    version: Option<u64>,
    source: Option<&str>,
) {
    if json_out {
        let mut v = serde_json::to_value(decision).expect("a decision serializes");
        if let Some(n) = version {
            v["policy_version"] = json!(n);
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON serializes")
        );
    } else if sarif_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&sarif(decision, source)).expect("SARIF serializes")
        );
    } else {
        let verdict = match (decision.allowed, decision.findings.is_empty()) {
            (true, true) => "allowed",
            (true, false) => "allowed (audit mode: would be refused)",
            (false, _) => "refused",
        };
        let version = version.map_or(String::new(), |n| format!(", version {n}"));
        println!("{verdict} by policy (mode {}{version})", decision.mode);
        for f in &decision.findings {
            let at = match (f.line, f.column) {
                (Some(l), Some(c)) => format!(" at {l}:{c}"),
                _ => String::new(),
            };
            println!("  {}{at}: {}", f.rule, f.message);
            if !f.snippet.is_empty() {
                println!("      {}", f.snippet);
            }
        }
    }
}

/// A SARIF 2.1.0 log: one run, the rules that fired, one result per finding.
fn sarif(decision: &Decision, source: Option<&str>) -> serde_json::Value {
    let level = if decision.mode == Mode::Enforce {
        "error"
    } else {
        "warning"
    };
    let mut rules: Vec<Rule> = decision.findings.iter().map(|f| f.rule).collect();
    rules.sort();
    rules.dedup();
    let results: Vec<serde_json::Value> = decision
        .findings
        .iter()
        .map(|f| {
            let mut result = serde_json::json!({
                "ruleId": f.rule.id(),
                "level": level,
                "message": {"text": f.message},
            });
            if let Some(uri) = source {
                let mut region = serde_json::json!({"snippet": {"text": f.snippet}});
                if let (Some(l), Some(c)) = (f.line, f.column) {
                    region["startLine"] = l.into();
                    region["startColumn"] = c.into();
                }
                result["locations"] = serde_json::json!([{
                    "physicalLocation": {"artifactLocation": {"uri": uri}, "region": region}
                }]);
            }
            result
        })
        .collect();
    serde_json::json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "moat policy",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": rules.iter().map(|r| serde_json::json!({"id": r.id()})).collect::<Vec<_>>(),
            }},
            "results": results,
        }],
    })
}
