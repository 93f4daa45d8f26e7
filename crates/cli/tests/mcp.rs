//! The MCP server with the official MCP Python SDK as its client, against a real daemon
//! booting real VMs: `moat mcp` over stdio and the daemon's `/mcp` over streamable HTTP. The
//! client and pytest live in a virtualenv under the target directory
//! (`crates/mcp/tests/python/requirements.txt`, pinned), created once and reused.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, ADMIN};
use common::python::{self, root, run, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_client_over_stdio_and_http() {
    let reqs = root().join("crates/mcp/tests/python/requirements.txt");
    let python = tokio::task::spawn_blocking(move || {
        python::venv(
            "mcp-venv",
            &["-r".to_string(), reqs.display().to_string()],
            std::slice::from_ref(&reqs),
        )
    })
    .await
    .unwrap();
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let mut c = Command::new(python);
    c.args([
        "-m",
        "pytest",
        "crates/mcp/tests/python",
        "-q",
        "-rsxX",
        "-p",
        "no:cacheprovider",
    ])
    .current_dir(root())
    .env("MOAT_URL", d.url())
    .env("MOAT_API_KEY", ADMIN)
    .env("MOAT_BIN", env!("CARGO_BIN_EXE_moat"))
    .env("MOAT_TEST_GROUP", "mcp-test")
    .env("PYTHONDONTWRITEBYTECODE", "1")
    .env_remove("MOAT_HOME");
    let o = tokio::task::spawn_blocking(move || run(c, "pytest", Duration::from_secs(900)))
        .await
        .unwrap();
    let out = text(&o);
    assert!(
        o.status.success(),
        "pytest failed:\n{out}\ndaemon log:\n{}",
        d.stderr(d.starts)
    );
    eprintln!("{out}");
    assert!(!out.contains("skipped"), "pytest skipped tests:\n{out}");
    assert!(out.contains(" passed"), "pytest ran nothing:\n{out}");
}
