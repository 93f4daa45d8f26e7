//! `moat-bench-policy`: how long a policy check takes, printed as JSON. The check runs before
//! every exec of a governed group, so it must be invisible next to one (goals: under 5 ms for a
//! 1-line script and under 50 ms for a 1,000-line one). Measures the analysis in process and,
//! when MOAT_BIN names a `moat` binary, the whole bounded check in a `moat policy worker`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use moat_policy::{check, check_in_worker, Bounds, CheckRequest, Policy};
use serde_json::json;

const POLICY: &str = "
mode: enforce
commands: {allow: [python3, ls, sh], deny: [curl]}
python: {deny: [process, dynamic-code, native, network, reflection]}
";

/// Ten lines of ordinary data-processing Python; `n` keeps names distinct across copies.
fn block(n: usize) -> String {
    format!(
        "import json\nimport os.path\nfrom collections import Counter\n\
         def summarise_{n}(rows):\n    counts = Counter(r['kind'] for r in rows)\n    \
         total = sum(r['amount'] for r in rows if r['amount'] > {n})\n    \
         path = os.path.join('out', 'summary_{n}.json')\n    \
         with open(path, 'w') as f:\n        json.dump({{'counts': counts, 'total': total}}, f)\n    \
         return total\n"
    )
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    let m = samples[samples.len() / 2];
    (m.as_secs_f64() * 1e5).round() / 100.0
}

fn time(rounds: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm caches
    median_ms(
        (0..rounds)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let policy = Policy::parse(POLICY).expect("the benchmark policy is valid");
    let one = CheckRequest {
        python: Some("print(sum(range(10)))\n".into()),
        ..Default::default()
    };
    let thousand = CheckRequest {
        python: Some((0..100).map(block).collect()),
        ..Default::default()
    };
    let lines = thousand.python.as_ref().map_or(0, |c| c.lines().count());
    assert_eq!(lines, 1000, "the 1,000-line script has {lines} lines");
    for r in [&one, &thousand] {
        assert!(
            check(&policy, r).allowed,
            "benchmark scripts are ordinary code"
        );
    }
    let mut out = json!({
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "policy_check_1_line_ms": time(200, || { check(&policy, &one); }),
        "policy_check_1000_lines_ms": time(30, || { check(&policy, &thousand); }),
        "goals_ms": {"1_line": 5, "1000_lines": 50},
    });
    if let Some(moat) = std::env::var_os("MOAT_BIN").map(PathBuf::from) {
        let worker = |r: &CheckRequest| {
            let d = check_in_worker(&moat, &["policy", "worker"], &policy, r, Bounds::default());
            assert!(d.allowed, "the worker refused ordinary code: {d:?}");
        };
        out["policy_worker_1_line_ms"] = time(20, || worker(&one)).into();
        out["policy_worker_1000_lines_ms"] = time(10, || worker(&thousand)).into();
    }
    println!("{out}");
}
