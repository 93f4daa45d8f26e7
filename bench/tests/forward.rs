//! A bounded smoke run of `moat-bench forward` (three execs each way instead of 20) against
//! the debug build, so the forwarding figure cannot rot (`scripts/bench.sh forward`).

mod common;

#[test]
fn a_small_forward_run_reports_both_ways() {
    let report = common::run(&["forward", "3"]);
    let f = &report["forward"];
    assert_eq!(f["forward_samples"], 3, "{report}");
    for k in [
        "forward_exec_direct_p50_ms",
        "forward_exec_forwarded_p50_ms",
    ] {
        assert!(f[k].as_f64().unwrap() > 0.0, "{report}");
    }
    assert!(report["machine"]["accel"].is_string(), "{report}");
}
