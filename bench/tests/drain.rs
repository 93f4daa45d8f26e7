//! A bounded smoke run of `moat-bench drain` (one drain instead of three) against the debug
//! build, so the figure of live migration between daemons cannot rot
//! (`scripts/bench.sh drain`).

mod common;

#[test]
fn a_small_drain_run_reports_an_idle_and_a_busy_move() {
    let report = common::run(&["drain", "1"]);
    let d = &report["drain"];
    assert_eq!(d["drain_rounds"], 1, "{report}");
    for k in [
        "drain_idle_pause_p50_ms",
        "drain_busy_pause_p50_ms",
        "drain_busy_total_p50_ms",
    ] {
        assert!(d[k].as_f64().unwrap() > 0.0, "{report}");
    }
}
