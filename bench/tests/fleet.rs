//! A bounded smoke run of `moat-bench fleet` (three creates per fleet instead of 12) against
//! the debug build, so the placement figure cannot rot (`scripts/bench.sh fleet`).

mod common;

#[test]
fn a_small_fleet_run_reports_one_node_and_three() {
    let report = common::run(&["fleet", "3"]);
    let f = &report["fleet"];
    assert_eq!(f["fleet_creates"], 3, "{report}");
    for k in ["fleet_one_node", "fleet_three_nodes"] {
        assert!(f[k]["creates_per_s"].as_f64().unwrap() > 0.0, "{report}");
    }
    assert_eq!(
        f["fleet_one_node"]["per_node"],
        serde_json::json!({"bench-0": 3})
    );
    // Spread over three empty nodes: one create each.
    assert_eq!(
        f["fleet_three_nodes"]["per_node"],
        serde_json::json!({"bench-0": 1, "bench-1": 1, "bench-2": 1}),
        "{report}"
    );
    assert!(report["machine"]["accel"].is_string(), "{report}");
}
