//! `moat policy check`, the offline checker, run as a user or CI would: the built binary, a
//! policy file in JSON or YAML, a Python file, a shell file or a command; exit codes 0/1/2, and
//! text, JSON and SARIF output. It needs no MOAT_HOME and no daemon.

use std::path::Path;
use std::process::{Command, Output};

const POLICY_YAML: &str = "
mode: enforce
commands:
  allow: [ls, wc, python3, sh]
  deny: [curl]
python:
  deny: [process, network]
limits:
  users: [sandbox]
";

fn moat(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .current_dir(dir)
        // Offline: no daemon, no home.
        .env_remove("MOAT_URL")
        .env("MOAT_HOME", dir.join("no-home"))
        .output()
        .expect("moat runs")
}

/// `moat policy check --policy policy.yaml --user sandbox ARGS…` in `dir`.
fn check_as_sandbox(dir: &Path, args: &[&str]) -> Output {
    let mut all = vec![
        "policy",
        "check",
        "--policy",
        "policy.yaml",
        "--user",
        "sandbox",
    ];
    all.extend_from_slice(args);
    moat(dir, &all)
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY_YAML).unwrap();
    std::fs::write(
        dir.path().join("bad.py"),
        "import os\nname = 'sys' + 'tem'\ngetattr(os, name)('id')\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("ok.py"),
        "import json\nprint(json.dumps([1]))\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("bad.sh"), "ls | wc -l\nc''url http://x/\n").unwrap();
    dir
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn allowed_refused_and_bad_input_have_their_exit_codes() {
    let dir = setup();
    let d = dir.path();
    let ok = check_as_sandbox(d, &["--python", "ok.py"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}{}",
        text(&ok.stdout),
        text(&ok.stderr)
    );
    assert!(
        text(&ok.stdout).starts_with("allowed"),
        "{}",
        text(&ok.stdout)
    );

    let bad = check_as_sandbox(d, &["--python", "bad.py"]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad.stderr));
    let out = text(&bad.stdout);
    assert!(out.starts_with("refused"), "{out}");
    assert!(out.contains("python.process at 3:1"), "{out}");
    assert!(out.contains("getattr(os, name)('id')"), "{out}");

    let cmd = check_as_sandbox(d, &["--", "env", "curl", "x"]);
    assert_eq!(cmd.status.code(), Some(1));
    assert!(
        text(&cmd.stdout).contains("command.denied"),
        "{}",
        text(&cmd.stdout)
    );

    // limits.users needs a user; without one the request is refused, with the reason.
    let no_user = moat(
        d,
        &["policy", "check", "--policy", "policy.yaml", "--", "ls"],
    );
    assert_eq!(no_user.status.code(), Some(1));
    assert!(
        text(&no_user.stdout).contains("limits.user"),
        "{}",
        text(&no_user.stdout)
    );

    for (args, needle) in [
        (&["policy", "check", "--python", "ok.py"][..], "--policy"),
        (
            &["policy", "check", "--policy", "policy.yaml"],
            "what to check",
        ),
        (
            &["policy", "check", "--policy", "missing.yaml", "--", "ls"],
            "missing.yaml",
        ),
        (
            &[
                "policy",
                "check",
                "--policy",
                "policy.yaml",
                "--python",
                "missing.py",
            ],
            "missing.py",
        ),
        (
            &[
                "policy",
                "check",
                "--policy",
                "policy.yaml",
                "--env",
                "NOVALUE",
                "--",
                "ls",
            ],
            "NAME=VALUE",
        ),
    ] {
        let o = moat(d, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(needle),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
}

#[test]
fn a_bad_policy_is_bad_input_with_every_problem_named() {
    let dir = setup();
    let d = dir.path();
    std::fs::write(d.join("typo.json"), r#"{"mode": "enforce", "comands": {}}"#).unwrap();
    let o = moat(d, &["policy", "check", "--policy", "typo.json", "--", "ls"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("comands"), "{}", text(&o.stderr));
    std::fs::write(
        d.join("contradicts.yaml"),
        "mode: enforce\ncommands: {deny: [curl]}\ntests:\n  allow: [{argv: [curl, x]}]\n",
    )
    .unwrap();
    let o = moat(
        d,
        &[
            "policy",
            "check",
            "--policy",
            "contradicts.yaml",
            "--",
            "ls",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("tests.allow[0]"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn json_and_sarif_carry_the_findings() {
    let dir = setup();
    let d = dir.path();
    let o = check_as_sandbox(d, &["--shell", "bad.sh", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["mode"], "enforce");
    let rules: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert!(
        rules.contains(&"shell.dynamic") && rules.contains(&"command.denied"),
        "{v}"
    );
    assert_eq!(v["findings"][0]["line"], 2);

    let o = check_as_sandbox(d, &["--python", "bad.py", "--sarif"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], "2.1.0");
    let result = &v["runs"][0]["results"][0];
    assert_eq!(result["ruleId"], "python.process");
    assert_eq!(result["level"], "error");
    let loc = &result["locations"][0]["physicalLocation"];
    assert_eq!(loc["artifactLocation"]["uri"], "bad.py");
    assert_eq!(loc["region"]["startLine"], 3);
    assert_eq!(
        v["runs"][0]["tool"]["driver"]["rules"][0]["id"],
        "python.process"
    );
}

#[test]
fn audit_mode_exits_zero_but_reports() {
    let dir = setup();
    let d = dir.path();
    std::fs::write(
        d.join("audit.json"),
        r#"{"mode": "audit", "python": {"deny": ["process"]}}"#,
    )
    .unwrap();
    let o = moat(
        d,
        &[
            "policy",
            "check",
            "--policy",
            "audit.json",
            "--python",
            "bad.py",
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(
        text(&o.stdout).contains("would be refused"),
        "{}",
        text(&o.stdout)
    );
    assert!(
        text(&o.stdout).contains("python.process"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn hostile_input_is_refused_by_the_worker_not_crashed_on() {
    let dir = setup();
    let d = dir.path();
    std::fs::write(d.join("deep.py"), "[".repeat(200_000)).unwrap();
    let o = check_as_sandbox(d, &["--python", "deep.py", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["findings"][0]["rule"], "python.unparseable", "{v}");
}
