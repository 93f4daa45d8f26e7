//! A bounded smoke run of `moat-bench load` (four clients for five seconds) against the debug
//! build, so the load run cannot rot between the times someone runs it in full
//! (`scripts/bench.sh load`).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_short_load_run_loses_nothing_and_reports_its_figures() {
    // target/debug/deps/<this test> → target/debug.
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let target = debug.parent().unwrap();
    let home = std::env::var_os("MOAT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".moat"));
    let out = Command::new(env!("CARGO_BIN_EXE_moat-bench"))
        .args(["load", "5", "4"])
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
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let l = &report["load"];
    assert_eq!(l["load_errors"], 0, "{report}");
    assert_eq!(l["load_lost"], 0, "{report}");
    assert_eq!(l["load_clients"], 4, "{report}");
    assert!(l["load_operations_ok"].as_u64().unwrap() > 0, "{report}");
    for (kind, k) in l["load_by_kind"].as_object().unwrap() {
        assert!(k["ok"].as_u64().unwrap() > 0, "{kind}: {report}");
        assert!(k["p99_ms"].as_f64().unwrap() >= k["p50_ms"].as_f64().unwrap());
    }
}
