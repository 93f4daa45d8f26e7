//! Governance end to end, with the real `moat policy worker` behind a real `moat serve`:
//! policies applied and checked through the CLI and the API (examples decided in the worker),
//! the offline and daemon checkers' exit codes, and, against a real sandbox, the policy
//! corpus of crates/policy in `enforce` (refused before the VM; the side effect absent) and
//! `audit` (run, recorded), processes and shells refused before they start, and the
//! decisions log verified by `moat policy verify-log`, then tampered with and caught.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::daemon::{moat, msg, Daemon, ADMIN, G};
use serde_json::{json, Value};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/tests/corpus")
}

/// The corpus files of `dir` (`refuse` or `pass`), sorted: (name, text).
fn files(dir: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(corpus().join(dir))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// `text` as one shell word.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The exec that runs refused corpus file `name`: Python with `python3 -c`, JavaScript with
/// `node -e` in a command line, shell as a command line. `marker` is a file the request creates
/// first when it runs (a shell `touch`, a Python `open`), so a refused request can be shown not
/// to have run and an audited one to have run (JavaScript's `touch` runs even where the image
/// has no node). Python gets `exit` on stdin, so the interactive ones (`pty.spawn`,
/// `code.interact`, `pdb.run`) end when they run; stdin is not code for `python3 -c`.
fn exec_body(name: &str, code: &str, marker: &str) -> Value {
    if name.ends_with(".py") {
        json!({"argv": ["python3", "-c", format!("open({marker:?}, 'w').close()\n{code}")],
               "stdin": "exit\n", "timeout_s": 30})
    } else if name.ends_with(".js") {
        json!({"command": format!("touch {marker}; node -e {}", sh_quote(code)), "timeout_s": 30})
    } else {
        json!({"command": format!("touch {marker}; {code}"), "timeout_s": 30})
    }
}

/// The exec that runs passing corpus file `name` as it is, in `/tmp/work` (where [`FIXTURES`]
/// are): Python as the program on stdin (`python3 - --epochs 3`, so `__file__` and `sys.argv` are
/// a script's), except `json_stdin.py`, which reads JSON on stdin and is `python3 -c`;
/// JavaScript as `node -e` in a command line (so a missing node is the shell's exit 127); shell
/// as a command line.
fn pass_body(name: &str, code: &str) -> Value {
    let mut body = if name == "json_stdin.py" {
        json!({"argv": ["python3", "-c", code], "stdin": "{\"a\": [1, 2], \"b\": \"xyz\"}"})
    } else if name.ends_with(".py") {
        json!({"argv": ["python3", "-", "--epochs", "3"], "stdin": code})
    } else if name.ends_with(".js") {
        json!({"command": format!("node -e {}", sh_quote(code))})
    } else {
        json!({"command": code})
    };
    body["cwd"] = json!("/tmp/work");
    body["timeout_s"] = json!(60);
    body
}

/// The files the passing snippets read, put in `/tmp/work` before they run.
const FIXTURES: &[(&str, &str)] = &[
    ("text.txt", "to be or not to be\n"),
    ("data.csv", "# prices\nname,price\nb,2.0\na,1.5\n"),
    ("data.bin", "\u{0}\u{1}binary\n"),
    ("config.json", "{\"version\": 1}\n"),
    ("log.txt", "2026-11-30 started\n"),
    ("sales.csv", "region,amount\neu,3\nus,4\n"),
    (
        "train.py",
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--epochs', type=int)\n\
         print('2026-11-30 trained', p.parse_args().epochs, 'epochs')\n",
    ),
];

/// Passing snippets that need what the base image lacks: third-party modules (the base image
/// is Debian's python3 alone), and syntax of Python 3.12 (bookworm has 3.11). They are allowed
/// and run; the guest's Python then fails on its own environment, which the test checks.
const NEEDS_MODULE: &[(&str, &str)] = &[
    ("matplotlib_plot.py", "matplotlib"),
    ("numpy_stats.py", "numpy"),
    ("pandas_groupby.py", "pandas"),
    ("sklearn_fit.py", "sklearn"),
];
const NEEDS_PY312: &[&str] = &["fstring_nested_312.py", "type_alias_312.py"];

/// Passing snippets that run node, which the base image lacks: allowed, and the guest's shell
/// then finds no node (exit 127), which the test checks; where the image has node they run.
fn needs_node(name: &str) -> bool {
    name.ends_with(".js") || name.starts_with("node_")
}

/// The corpus policy (every Python family denied, an allow list of tools, network tools
/// denied) with `touch` allowed for the markers, in `mode`.
fn corpus_policy(mode: &str) -> Value {
    let text = std::fs::read_to_string(corpus().join("policy.yaml")).unwrap();
    let mut p = moat_policy::Policy::parse(&text).unwrap();
    p.commands.allow.as_mut().unwrap().push("touch".into());
    let mut v = serde_json::to_value(&p).unwrap();
    v["mode"] = json!(mode);
    v
}

/// Policies applied, shown and checked through the CLI and the API, with no VM: examples and
/// checks run in the real worker; exit codes as documented.
#[tokio::test(flavor = "multi_thread")]
async fn policies_through_the_cli_and_the_api() {
    let d = Daemon::start(Some(ADMIN)).await;
    d.put_group("gov", json!({}), 201).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };

    let out = d.cli(ADMIN, &["policy", "show", "gov"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(
        text(&out.stdout).contains("no policy was ever applied (off)"),
        "{}",
        show(&out)
    );

    let good = write(
        "good.yaml",
        "mode: enforce\ncommands:\n  deny: [curl]\npython:\n  deny: [process]\ntests:\n  \
         allow:\n    - argv: [ls]\n  deny:\n    - argv: [curl, x]\n    - python: \"import os; \
         os.system('id')\"\n",
    );
    let out = d.cli(ADMIN, &["policy", "apply", "gov", "-f", &good]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(
        text(&out.stdout).contains("applied: version 1"),
        "{}",
        show(&out)
    );
    let out = d.cli(ADMIN, &["policy", "apply", "gov", "-f", &good]);
    assert!(
        text(&out.stdout).contains("unchanged: version 1"),
        "{}",
        show(&out)
    );
    // The daemon decides the examples itself, in its worker: a policy PUT directly through
    // the API that contradicts its examples is refused with the failing one.
    let (st, e) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/gov/policy"),
            Some(json!({"mode": "enforce", "commands": {"deny": ["curl"]},
                        "tests": {"allow": [{"command": "ls | curl x"}]}})),
        )
        .await;
    assert_eq!(st, 422, "{e}");
    assert!(
        msg(&e).contains("tests.allow[0]") && msg(&e).contains("command.denied"),
        "{e}"
    );

    // The daemon's dry run, through the CLI: 1 refused, 0 allowed, with the version.
    let out = d.cli(
        ADMIN,
        &["policy", "check", "gov", "--", "/usr/bin/curl", "x"],
    );
    assert_eq!(code(&out), 1, "{}", show(&out));
    assert!(text(&out.stdout).contains("refused by policy (mode enforce, version 1)"));
    assert!(
        text(&out.stdout).contains("command.denied"),
        "{}",
        show(&out)
    );
    let out = d.cli(ADMIN, &["policy", "check", "gov", "--", "ls", "-l"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let job = write(
        "job.py",
        "import json\nimport os\nos.posix_spawn('/bin/id', ['id'], {})\n",
    );
    let out = d.cli(
        ADMIN,
        &["policy", "check", "gov", "--json", "--python", &job],
    );
    assert_eq!(code(&out), 1, "{}", show(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["policy_version"], 1);
    assert_eq!(v["findings"][0]["rule"], "python.process", "{v}");
    assert_eq!(
        (
            v["findings"][0]["line"].as_u64(),
            v["findings"][0]["column"].as_u64()
        ),
        (Some(3), Some(1))
    );

    // Hostile input the parser cannot take is contained in the worker: a refusal, and the
    // daemon answers on.
    let (st, v) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/gov/policy/check"),
            Some(json!({"python": "[".repeat(200_000)})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["allowed"], false, "{v}");
    let (st, _) = d.call(None, "GET", "/healthz", None).await;
    assert_eq!(st, 200);

    // Exit 2: bad input, including every usage error of `moat policy`; other commands keep 125.
    for args in [
        vec!["policy", "check", "gov"],
        vec!["policy", "check"],
        vec!["policy", "check", "gov", "--bogus"],
        vec!["policy", "nosuch"],
        vec!["policy", "check", "gov", "--policy", &good, "--", "ls"],
    ] {
        let out = d.cli(ADMIN, &args);
        assert_eq!(code(&out), 2, "{args:?}: {}", show(&out));
    }
    let out = moat().args(["run", "--bogus"]).output().unwrap();
    assert_eq!(code(&out), 125, "{}", show(&out));

    // Versions are kept; a user key may not apply or read decisions.
    let out = d.cli(
        ADMIN,
        &[
            "policy",
            "apply",
            "gov",
            "-f",
            &write("audit.yaml", "mode: audit\n"),
        ],
    );
    assert!(
        text(&out.stdout).contains("applied: version 2"),
        "{}",
        show(&out)
    );
    let (_, versions) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/gov/policy/versions"),
            None,
        )
        .await;
    assert_eq!(versions["items"].as_array().unwrap().len(), 2);
    // Rollback: version 1's policy again, as version 3.
    let out = d.cli(ADMIN, &["policy", "rollback", "gov", "--to", "1"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(
        text(&out.stdout).contains("rolled back: version 3 of group gov is version 1's policy"),
        "{}",
        show(&out)
    );
    let out = d.cli(ADMIN, &["policy", "check", "gov", "--", "curl", "x"]);
    assert_eq!(code(&out), 1, "enforcing again: {}", show(&out));
    let out = d.cli(ADMIN, &["policy", "rollback", "gov", "--to", "7"]);
    assert_eq!(code(&out), 125, "{}", show(&out));
    assert!(
        text(&out.stderr).contains("no policy version 7"),
        "{}",
        show(&out)
    );
    let user = d.key("user", &["gov"]).await;
    let out = d.cli(&user, &["policy", "apply", "gov", "-f", &good]);
    assert_eq!(code(&out), 125, "{}", show(&out));
    assert!(
        text(&out.stderr).contains("owner or admin"),
        "{}",
        show(&out)
    );
    let out = d.cli(&user, &["policy", "decisions", "gov"]);
    assert_eq!(code(&out), 125, "{}", show(&out));
    let out = d.cli(&user, &["policy", "rollback", "gov", "--to", "2"]);
    assert_eq!(code(&out), 125, "{}", show(&out));
}

/// The whole corpus through a real sandbox, each snippet its own exec through the daemon.
/// Enforce: every refused snippet is refused before the VM (a 403 naming the corpus's rule)
/// and none of their markers exists afterwards; every passing snippet is allowed and runs to
/// exit 0 (the few that need what the base image lacks run and fail on exactly that). Audit:
/// every refused snippet runs (its marker appears) and is recorded as an `audit` decision with
/// the corpus's rule among its findings. One sandbox for both modes.
#[tokio::test(flavor = "multi_thread")]
async fn the_corpus_against_a_real_sandbox_and_the_log_verified() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group("gov", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("gov").await;
    let files_route = format!("{G}/gov/sandboxes/{id}/files");
    d.sh("gov", &id, "mkdir -p /tmp/work").await;
    for (name, body) in FIXTURES {
        let (st, v) = d
            .call_raw(
                Some(ADMIN),
                "PUT",
                &format!("{files_route}?path=/tmp/work/{name}"),
                Some(body.as_bytes().to_vec()),
            )
            .await;
        assert_eq!(st, 201, "{name}: {v}");
    }
    let py_minor: u32 = d
        .sh(
            "gov",
            &id,
            "python3 -c 'import sys; print(sys.version_info[1])'",
        )
        .await
        .parse()
        .unwrap();
    let has_node = d.sh("gov", &id, "command -v node || echo none").await != "none";
    let (st, v) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/gov/policy"),
            Some(corpus_policy("enforce")),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    let t0 = std::time::Instant::now();
    let refuse = files("refuse");
    assert!(refuse.len() >= 40);
    let expected = |code: &str| -> String {
        let first = code.lines().next().unwrap();
        first
            .strip_prefix("# expect: ")
            .or_else(|| first.strip_prefix("// expect: "))
            .unwrap()
            .to_string()
    };
    let mut gated: u64 = 0;
    for (i, (name, code)) in refuse.iter().enumerate() {
        let expect = expected(code);
        let (st, e) = d
            .exec(
                ADMIN,
                "gov",
                &id,
                exec_body(name, code, &format!("/tmp/refused-{i}")),
            )
            .await;
        gated += 1;
        assert_eq!(st, 403, "{name}: {e}");
        assert_eq!(e["error"]["code"], "policy_denied", "{name}: {e}");
        assert_eq!(e["error"]["policy_version"], 1);
        let rules: Vec<&str> = e["error"]["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["rule"].as_str().unwrap())
            .collect();
        assert!(
            rules.contains(&expect.as_str()),
            "{name}: want {expect}, got {rules:?}"
        );
    }
    // Code sent on stdin to an interpreter is analysed as code.
    for argv in [
        json!(["python3"]),
        json!(["python3", "-"]),
        json!(["sh", "-s"]),
        json!(["node"]),
        json!(["node", "-"]),
    ] {
        let code = if argv[0] == "sh" {
            "touch /tmp/refused-stdin-sh; curl -s x"
        } else if argv[0] == "node" {
            "require('fs').writeFileSync('/tmp/refused-stdin-js', '')\n\
             require('child_process').execSync('id')\n"
        } else {
            "open('/tmp/refused-stdin-py', 'w')\nimport os\nos.system('id')\n"
        };
        let (st, e) = d
            .exec(
                ADMIN,
                "gov",
                &id,
                json!({"argv": argv, "stdin": code, "timeout_s": 30}),
            )
            .await;
        gated += 1;
        assert_eq!(st, 403, "{argv}: {e}");
        let rule = match argv[0].as_str() {
            Some("sh") => "command.denied",
            Some("node") => "javascript.process",
            _ => "python.process",
        };
        assert_eq!(e["error"]["findings"][0]["rule"], rule, "{argv}: {e}");
    }
    // node's inline code, as an exec's argv: refused before the VM with the finding's place.
    let (st, e) = d
        .exec(
            ADMIN,
            "gov",
            &id,
            json!({"argv": ["node", "-e",
                "const { execSync: run } = require('node:child_process');\n\
                 run('touch /tmp/refused-node-e')"], "timeout_s": 30}),
        )
        .await;
    gated += 1;
    assert_eq!(st, 403, "{e}");
    let finding = &e["error"]["findings"][0];
    assert_eq!(finding["rule"], "javascript.process", "{e}");
    assert_eq!(
        (&finding["line"], &finding["column"]),
        (&json!(1), &json!(9)),
        "{e}"
    );
    // Nothing refused reached the VM.
    let left = d.sh("gov", &id, "ls /tmp").await;
    assert!(
        !left.contains("refused-"),
        "side effects of refused requests: {left}"
    );
    gated += 1;
    eprintln!("enforce, {} refused: {:?}", refuse.len(), t0.elapsed());

    let t0 = std::time::Instant::now();
    let pass = files("pass");
    assert!(pass.len() >= 40);
    for (name, code) in &pass {
        let (st, r) = d.exec(ADMIN, "gov", &id, pass_body(name, code)).await;
        gated += 1;
        assert_eq!(st, 200, "{name}: allowed: {r}");
        let stderr = r["stderr"].as_str().unwrap_or_default();
        if let Some((_, module)) = NEEDS_MODULE.iter().find(|(n, _)| n == name) {
            assert!(
                r["exit_code"] == 1 && stderr.contains(&format!("No module named '{module}'")),
                "{name} ran, and only the missing {module} stopped it: {r}"
            );
        } else if needs_node(name) && !has_node {
            assert!(
                r["exit_code"] == 127 && stderr.contains("not found"),
                "{name} ran, and only the image's missing node stopped it: {r}"
            );
        } else if NEEDS_PY312.contains(&name.as_str()) && py_minor < 12 {
            assert!(
                r["exit_code"] == 1 && stderr.contains("SyntaxError"),
                "{name} ran, and only Python 3.{py_minor}'s grammar stopped it: {r}"
            );
        } else {
            assert_eq!(r["exit_code"], 0, "{name} runs as it is: {r}");
        }
    }
    // What a few of them did, read back: they ran as written, in the sandbox.
    let work = d
        .sh("gov", &id, "cat /tmp/work/config.json; ls /tmp/work")
        .await;
    gated += 1;
    for made in ["\"version\": 2", "local.db", "out.zip", "out"] {
        assert!(work.contains(made), "{made} in {work}");
    }
    eprintln!("enforce, {} passing: {:?}", pass.len(), t0.elapsed());

    // Uploads of code are checked too (scan_uploads), before anything is written.
    let mut scanning = corpus_policy("enforce");
    scanning["scan_uploads"] = json!(true);
    let (st, v) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/gov/policy"),
            Some(scanning),
        )
        .await;
    assert_eq!((st, v["version"].as_u64()), (201, Some(2)), "{v}");
    let files = format!("{G}/gov/sandboxes/{id}/files");
    let (st, e) = d
        .call_raw(
            Some(ADMIN),
            "PUT",
            &format!("{files}?path=/tmp/evil.py"),
            Some(b"import ctypes\nctypes.CDLL(None)\n".to_vec()),
        )
        .await;
    gated += 1;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (403, Some("policy_denied")),
        "{e}"
    );
    assert_eq!(e["error"]["findings"][0]["rule"], "python.native", "{e}");
    let (st, v) = d
        .call_raw(
            Some(ADMIN),
            "PUT",
            &format!("{files}?path=/tmp/fine.py"),
            Some(b"print(sum(range(10)))\n".to_vec()),
        )
        .await;
    gated += 1;
    assert_eq!(st, 201, "{v}");
    let left = d.sh("gov", &id, "ls /tmp").await;
    gated += 1;
    assert!(
        left.contains("fine.py") && !left.contains("evil.py"),
        "{left}"
    );

    // Background processes and shells are gated too, before they start.
    let (st, e) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/gov/sandboxes/{id}/processes"),
            Some(json!({"command": "sleep 1; curl -s x"})),
        )
        .await;
    gated += 1;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (403, Some("policy_denied")),
        "{e}"
    );
    let out = d.cli(ADMIN, &["sandbox", "shell", "gov", &id, "--", "wget", "x"]);
    gated += 1;
    assert_ne!(code(&out), 0, "{}", show(&out));
    assert!(
        text(&out.stderr).contains("command.denied"),
        "{}",
        show(&out)
    );

    // Audit: every refused snippet runs (its marker appears: Python's first line, the
    // shell's `touch`) and is recorded as `audit` with the corpus's rule.
    let (st, v) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/gov/policy"),
            Some(corpus_policy("audit")),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let t0 = std::time::Instant::now();
    for (i, (name, code)) in refuse.iter().enumerate() {
        let (st, r) = d
            .exec(
                ADMIN,
                "gov",
                &id,
                exec_body(name, code, &format!("/tmp/audited-{i}")),
            )
            .await;
        gated += 1;
        assert_eq!(st, 200, "{name}: audit mode never refuses: {r}");
        if expected(code) == "python.unparseable" {
            // Python cannot run what does not parse: the guest's own SyntaxError.
            assert!(
                r["stderr"].as_str().unwrap().contains("SyntaxError"),
                "{name}: {r}"
            );
        }
    }
    let ran = d.sh("gov", &id, "ls /tmp").await;
    gated += 1;
    let ran: Vec<&str> = ran.lines().collect();
    for (i, (name, code)) in refuse.iter().enumerate() {
        if expected(code) != "python.unparseable" {
            assert!(
                ran.contains(&format!("audited-{i}").as_str()),
                "{name} did not run: {ran:?}"
            );
        }
    }
    let (_, page) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/gov/policy/decisions?verdict=audit&limit=1000"),
            None,
        )
        .await;
    let audited = page["items"].as_array().unwrap();
    assert_eq!(audited.len(), refuse.len(), "{page}");
    for ((name, code), entry) in refuse.iter().zip(audited) {
        let rules: Vec<&str> = entry["decision"]["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["rule"].as_str().unwrap())
            .collect();
        assert!(
            rules.contains(&expected(code).as_str()) && entry["decision"]["allowed"] == true,
            "{name}: {entry}"
        );
        assert_eq!(entry["policy_version"], 3, "{name}: {entry}");
    }
    eprintln!("audit, {} refused: {:?}", refuse.len(), t0.elapsed());

    // The log: every gated request, in order, chained; the CLI verifies it.
    let out = d.cli(ADMIN, &["policy", "decisions", "gov", "--verdict", "deny"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(
        text(&out.stdout).contains("command.denied"),
        "{}",
        show(&out)
    );
    let out = d.cli(ADMIN, &["policy", "verify-log", "gov"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(
        text(&out.stdout).starts_with(&format!("intact: {gated} entries")),
        "{}",
        show(&out)
    );
    let metric = d
        .metric(
            "moat_policy_decisions_total{group=\"gov\",verdict=\"deny\",rule=\"command.denied\"}",
        )
        .await;
    assert!(metric.is_some_and(|n| n >= 1.0), "{metric:?}");
    // Every gated request's analysis was timed.
    let timed = d.metric("moat_policy_check_duration_seconds_count").await;
    assert!(
        timed.is_some_and(|n| n >= gated as f64),
        "{timed:?} < {gated}"
    );

    // Replay: an enforcing candidate without rules lets through recorded requests that had
    // findings (refused, or run in audit) — all but those whose shell is opaque whatever the
    // rules (`shell.dynamic`: `c''url`, `eval`, code piped into `sh`) — and nothing else.
    let (_, all) = d
        .call(
            Some(ADMIN),
            "GET",
            &format!("{G}/gov/policy/decisions?limit=1000"),
            None,
        )
        .await;
    let with_findings: Vec<u64> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["decision"]["findings"].as_array().unwrap().is_empty())
        .map(|e| e["n"].as_u64().unwrap())
        .collect();
    let (st, r) = d
        .call(
            Some(ADMIN),
            "POST",
            &format!("{G}/gov/policy/replay"),
            Some(json!({"policy": {"mode": "enforce"}, "limit": 500})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["checked"].as_u64(), Some(gated), "{r}");
    let changed: Vec<u64> = r["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c["was_refused"] == true && c["now_refused"] == false, "{c}");
            c["n"].as_u64().unwrap()
        })
        .collect();
    assert!(
        changed.iter().all(|n| with_findings.contains(n)),
        "{changed:?} ⊄ {with_findings:?}"
    );
    assert!(changed.len() * 10 >= with_findings.len() * 8, "{changed:?}");
    let opaque = with_findings.iter().filter(|n| !changed.contains(n));
    for n in opaque {
        let e = &all["items"][(n - 1) as usize];
        assert!(
            e["decision"]["findings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["rule"] == "shell.dynamic"),
            "entry {n} was not replayed as allowed: {e}"
        );
    }

    // Tampering behind the daemon's back: one entry edited, one removed.
    {
        let e = d
            .db_execute(
                "DELETE FROM policy_decisions WHERE group_name = 'gov' AND n = 5",
                &[],
            )
            .unwrap_err();
        assert!(e.contains("append-only"), "{e}");
        d.db_drop_trigger("policy_decisions_no_update", "policy_decisions");
        d.db_drop_trigger("policy_decisions_no_delete", "policy_decisions");
        let entry = d.db_text(
            "SELECT entry FROM policy_decisions WHERE group_name = 'gov' AND n = 3",
            &[],
        );
        let edited = entry.replace("\"allowed\":false", "\"allowed\":true");
        assert_ne!(entry, edited);
        d.db_execute(
            "UPDATE policy_decisions SET entry = ?1 WHERE group_name = 'gov' AND n = 3",
            &[edited.as_str()],
        )
        .unwrap();
        d.db_execute(
            "DELETE FROM policy_decisions WHERE group_name = 'gov' AND n = 5",
            &[],
        )
        .unwrap();
    }
    let out = d.cli(ADMIN, &["policy", "verify-log", "gov"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    let report = text(&out.stdout);
    assert!(report.starts_with("BROKEN"), "{report}");
    assert!(
        report.contains("entry 3: its content does not match its hash"),
        "{report}"
    );
    assert!(report.contains("entry 5 is missing"), "{report}");
    assert!(
        report.contains("entry 6: its prev_hash does not match"),
        "{report}"
    );
}

/// Retention: with `--policy-decisions-retention 2s` old decisions are pruned behind an anchor,
/// `verify-log` still verifies what is left (and says entries were pruned), deleting an entry
/// after the anchor is still refused, and an edit after pruning is named.
#[tokio::test(flavor = "multi_thread")]
async fn pruned_decisions_still_verify_and_tampering_is_named() {
    let d =
        Daemon::start_with_runtime_args(Some(ADMIN), &["--policy-decisions-retention", "2s"]).await;
    d.put_group("gov", json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox("gov").await;
    let (st, v) = d
        .call(
            Some(ADMIN),
            "PUT",
            &format!("{G}/gov/policy"),
            Some(json!({"mode": "enforce", "commands": {"deny": ["curl"]}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let curl = || d.exec(ADMIN, "gov", &id, json!({"argv": ["curl", "x"]}));
    for _ in 0..3 {
        assert_eq!(curl().await.0, 403);
    }
    // The pruner runs every second; entries older than 2 s go, the newest stays.
    let decisions = format!("{G}/gov/policy/decisions?limit=1000");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let anchor = loop {
        let (_, page) = d.call(Some(ADMIN), "GET", &decisions, None).await;
        // (Entries made across a second boundary may go in two steps.)
        if page["pruned"]["n"] == 2 {
            break page["pruned"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "never pruned: {page}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(anchor["hash"].as_str().map(str::len), Some(64), "{anchor}");
    assert_eq!(curl().await.0, 403);
    let out = d.cli(ADMIN, &["policy", "verify-log", "gov"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(
        text(&out.stdout).contains("pruned by retention"),
        "{}",
        show(&out)
    );
    {
        let newest = d.db_i64(
            "SELECT MAX(n) FROM policy_decisions WHERE group_name = 'gov'",
            &[],
        );
        // The number goes into the SQL: the helpers bind text only.
        let e = d
            .db_execute(
                &format!("DELETE FROM policy_decisions WHERE group_name = 'gov' AND n = {newest}"),
                &[],
            )
            .unwrap_err();
        assert!(e.contains("append-only"), "{e}");
        d.db_drop_trigger("policy_decisions_no_update", "policy_decisions");
        let entry = d.db_text(
            &format!(
                "SELECT entry FROM policy_decisions WHERE group_name = 'gov' AND n = {newest}"
            ),
            &[],
        );
        let edited = entry.replace("\"curl\"", "\"ls\"");
        assert_ne!(entry, edited);
        d.db_execute(
            &format!(
                "UPDATE policy_decisions SET entry = ?1 WHERE group_name = 'gov' AND n = {newest}"
            ),
            &[edited.as_str()],
        )
        .unwrap();
        let out = d.cli(ADMIN, &["policy", "verify-log", "gov"]);
        assert_eq!(code(&out), 1, "{}", show(&out));
        assert!(
            text(&out.stdout).contains(&format!(
                "entry {newest}: its content does not match its hash"
            )),
            "{}",
            show(&out)
        );
    }
}
