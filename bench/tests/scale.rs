//! A bounded smoke run of `moat-bench scale` (three sandboxes instead of 200) against the debug
//! build, so the scale run cannot rot between the times someone runs it in full
//! (`scripts/bench.sh scale`).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_small_scale_run_admits_every_sandbox_and_reports_its_figures() {
    // target/debug/deps/<this test> → target/debug.
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let target = debug.parent().unwrap();
    let home = std::env::var_os("MOAT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".moat"));
    let out = Command::new(env!("CARGO_BIN_EXE_moat-bench"))
        .args(["scale", "3"])
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
    let s = &report["scale"];
    assert_eq!(s["scale_admitted"], 3, "{report}");
    assert_eq!(s["scale_exec_failures"], 0, "{report}");
    assert!(s["scale_refusal"].is_null(), "{report}");
    let pss = s["scale_pss_mib_per_sandbox"].as_f64().unwrap();
    assert!((5.0..600.0).contains(&pss), "{report}");
    assert!(
        s["scale_suspended_bytes_each"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(s["scale_create_to_first_exec_p99_ms"].as_f64().unwrap() > 0.0);
    assert!(report["machine"]["accel"].is_string(), "{report}");
}
