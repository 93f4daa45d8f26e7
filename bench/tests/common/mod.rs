//! Runs `moat-bench` as the smoke tests need it: against this build's debug `moat` and release
//! agent, in the MOAT_HOME the other tests share.

use std::path::PathBuf;
use std::process::Command;

/// `moat-bench ARGS`: its JSON report; panics with its stderr if it failed.
pub fn run(args: &[&str]) -> serde_json::Value {
    // target/debug/deps/<this test> → target/debug.
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let target = debug.parent().unwrap();
    let home = std::env::var_os("MOAT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".moat"));
    let out = Command::new(env!("CARGO_BIN_EXE_moat-bench"))
        .args(args)
        .env("MOAT_HOME", &home)
        .env("MOAT_BIN", debug.join("moat"))
        .env(
            "MOAT_AGENT",
            target.join("x86_64-unknown-linux-gnu/release/moat-agent"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}
