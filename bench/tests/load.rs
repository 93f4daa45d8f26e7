//! A bounded smoke run of `moat-bench load` (four clients for five seconds) against the debug
//! build, so the load run cannot rot between the times someone runs it in full
//! (`scripts/bench.sh load`).

mod common;

#[test]
fn a_short_load_run_loses_nothing_and_reports_its_figures() {
    let report = common::run(&["load", "5", "4"]);
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
