//! Every example in `examples/` run the way its header says, against one real daemon booting
//! real VMs, with its output checked: the code-interpreter agent loop in Python and in
//! TypeScript, the data analysis that reads back a chart, the three-way fork and the MCP
//! session. The Python ones run in `target/examples-venv` (the SDK from sdk/python and the MCP
//! client pinned in crates/mcp/tests/python/requirements.txt); the TypeScript one builds the
//! SDK and runs `npm start` in examples/typescript (`npm ci` once per lock change).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, ADMIN, G};
use common::node::npm;
use common::python::{self, root, run, target_dir, text};

const GROUP: &str = "examples";

fn env(c: &mut Command, d: &Daemon) {
    c.env("MOAT_URL", d.url())
        .env("MOAT_API_KEY", ADMIN)
        .env("MOAT_EXAMPLE_GROUP", GROUP)
        .env("MOAT_BIN", env!("CARGO_BIN_EXE_moat"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("MOAT_HOME");
}

async fn example(mut c: Command, d: &Daemon, what: &'static str) -> String {
    env(&mut c, d);
    let o = tokio::task::spawn_blocking(move || run(c, what, Duration::from_secs(600)))
        .await
        .unwrap();
    let out = text(&o);
    eprintln!("== {what}\n{out}");
    assert!(
        o.status.success(),
        "{what} failed:\n{out}\ndaemon log:\n{}",
        d.stderr(d.starts)
    );
    out
}

/// `npm ci` in `dir` when its lock changed since the last one (a stamp in node_modules).
fn npm_ci(dir: &Path) {
    let lock = std::fs::read_to_string(dir.join("package-lock.json")).unwrap();
    let stamp = dir.join("node_modules/.moat-installed-from");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(&*lock) {
        npm(dir, &["ci"], &format!("npm ci in {}", dir.display()));
        std::fs::write(&stamp, &lock).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_runs_against_a_real_daemon() {
    let sdk = root().join("sdk/python");
    let reqs = root().join("crates/mcp/tests/python/requirements.txt");
    let py = tokio::task::spawn_blocking(move || {
        python::venv(
            "examples-venv",
            &[
                "-e".to_string(),
                sdk.display().to_string(),
                "-r".to_string(),
                reqs.display().to_string(),
            ],
            &[sdk.join("pyproject.toml"), reqs.clone()],
        )
    })
    .await
    .unwrap();
    let ts = root().join("examples/typescript");
    let ts2 = ts.clone();
    tokio::task::spawn_blocking(move || {
        let sdk = root().join("sdk/typescript");
        npm_ci(&sdk);
        npm(&sdk, &["run", "build"], "the TypeScript SDK's build");
        npm_ci(&ts2);
    })
    .await
    .unwrap();
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let ex = root().join("examples/python");
    let python = |script: &str| {
        let mut c = Command::new(&py);
        c.arg(ex.join(script)).current_dir(root());
        c
    };

    let out = example(python("agent_loop.py"), &d, "examples/python/agent_loop.py").await;
    assert!(
        out.contains("answer: There are 25 primes below 100; the sum of their squares is 65796."),
        "{out}"
    );

    let mut c = Command::new("npm");
    c.args(["start", "--silent"]).current_dir(&ts);
    let out = example(c, &d, "examples/typescript: npm start").await;
    assert!(
        out.contains(
            "answer: 5 words have more than three letters: quick, brown, jumps, over, lazy."
        ),
        "{out}"
    );

    let charts = target_dir().join("examples-out");
    let mut c = python("data_analysis.py");
    c.arg(&charts);
    let out = example(c, &d, "examples/python/data_analysis.py").await;
    assert!(out.contains(r#""total": 1011"#), "{out}");
    let svg = std::fs::read_to_string(charts.join("chart.svg")).unwrap();
    assert!(
        svg.starts_with("<svg")
            && svg.contains("Revenue by month")
            && svg.matches("<rect").count() == 5,
        "{svg}"
    );

    let out = example(
        python("fork_three_ways.py"),
        &d,
        "examples/python/fork_three_ways.py",
    )
    .await;
    assert!(
        out.contains("PASS  average-middle") && out.contains("fail  upper-middle"),
        "{out}"
    );
    assert!(out.contains("keep: average-middle, statistics"), "{out}");

    let out = example(
        python("mcp_session.py"),
        &d,
        "examples/python/mcp_session.py",
    )
    .await;
    assert!(
        out.contains("server: moat") && out.contains("run_code"),
        "{out}"
    );
    assert!(out.contains(r#""squares": [0, 1, 4, 9, 16]"#), "{out}");

    // Every example cleans up after itself.
    let (st, list) = d
        .call(Some(ADMIN), "GET", &format!("{G}/{GROUP}/sandboxes"), None)
        .await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(list["sandboxes"], serde_json::json!([]), "{list}");
}
