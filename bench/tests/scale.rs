//! A bounded smoke run of `moat-bench scale` (three sandboxes instead of 200) against the debug
//! build, so the scale run cannot rot between the times someone runs it in full
//! (`scripts/bench.sh scale`).

mod common;

#[test]
fn a_small_scale_run_admits_every_sandbox_and_reports_its_figures() {
    let report = common::run(&["scale", "3"]);
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
