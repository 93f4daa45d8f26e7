//! `moat policy`: the offline checker, for CI and for writing policies without a daemon. It
//! checks one request (a Python file, a shell file or a command line) against a group's policy
//! object exactly as the daemon will, in the same bounded worker process (`moat policy worker`,
//! hidden), and says why in text, JSON or SARIF. Exit 0: allowed, 1: refused, 2: bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use moat_policy::{check_in_worker, Bounds, CheckRequest, Decision, Mode, Policy, Rule};

const EXIT_ALLOWED: u8 = 0;
const EXIT_REFUSED: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a Python file, a shell file or a command against a policy file, offline.
    /// Exit 0 when allowed, 1 when refused, 2 on bad input.
    Check(CheckArgs),
    /// Serve one check on stdin/stdout under caps (used by `check` and by the daemon).
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The group's `policy` object, as JSON or YAML.
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
    /// Print the decision as JSON.
    #[arg(long, conflicts_with = "sarif")]
    json: bool,
    /// Print the findings as SARIF 2.1.0 (for code-scanning tools).
    #[arg(long)]
    sarif: bool,
    /// The command to check, as an exec's argv.
    #[arg(last = true, value_name = "CMD")]
    argv: Vec<String>,
}

pub fn run(command: PolicyCommand) -> u8 {
    match command {
        PolicyCommand::Worker => {
            match moat_policy::worker::serve(std::io::stdin().lock(), std::io::stdout().lock()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("moat: {e}");
                    1
                }
            }
        }
        PolicyCommand::Check(args) => match prepare(&args) {
            Ok((policy, request, source)) => {
                let worker = match std::env::current_exe() {
                    Ok(path) => path,
                    Err(e) => {
                        eprintln!("moat: cannot find the moat binary to run the check in: {e}");
                        return EXIT_BAD_INPUT;
                    }
                };
                let decision = check_in_worker(
                    &worker,
                    &["policy", "worker"],
                    &policy,
                    &request,
                    Bounds::default(),
                );
                report(&args, &decision, source.as_deref());
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
        },
    }
}

/// The policy and the request, or what is wrong with the input. Also the file checked, for
/// SARIF locations.
fn prepare(args: &CheckArgs) -> Result<(Policy, CheckRequest, Option<String>), String> {
    let Some(policy_file) = &args.policy else {
        return Err("give the policy with --policy FILE (JSON or YAML)".into());
    };
    let text = read(policy_file)?;
    let policy = Policy::parse(&text).map_err(|e| format!("{}: {e}", policy_file.display()))?;
    let mut request = CheckRequest::default();
    let mut source = None;
    if let Some(file) = &args.python {
        request.python = Some(read(file)?);
        source = Some(file.display().to_string());
    } else if let Some(file) = &args.shell {
        request.shell = Some(read(file)?);
        source = Some(file.display().to_string());
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
    Ok((policy, request, source))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn report(args: &CheckArgs, decision: &Decision, source: Option<&str>) {
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(decision).expect("a decision serializes")
        );
    } else if args.sarif {
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
        println!("{verdict} by policy (mode {})", decision.mode);
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
