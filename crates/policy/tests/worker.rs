//! The bounded check: a worker process per check, so that a crash, a hang or a memory blow-up
//! in a parser refuses the request instead of taking the caller down. This test binary is its
//! own worker: started with `--policy-worker` it serves one job, as `moat policy worker` does.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use moat_policy::{check, check_in_worker, Bounds, CheckRequest, Decision, Policy, Rule};

fn main() {
    if std::env::args().any(|a| a == "--policy-worker") {
        if let Err(e) = moat_policy::worker::serve(std::io::stdin().lock(), std::io::stdout()) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        return;
    }
    let cases: [(&str, fn()); 5] = [
        (
            "the worker decides as the in-process check",
            same_decision_as_in_process,
        ),
        (
            "a parser stack overflow in a thread is contained",
            hostile_input_is_contained,
        ),
        (
            "a hung worker is killed at the deadline",
            hang_is_refused_at_the_deadline,
        ),
        (
            "a worker that fails or cannot start refuses",
            failures_refuse,
        ),
        ("the memory cap applies", memory_cap_applies),
    ];
    for (name, case) in cases {
        case();
        println!("ok: {name}");
    }
}

fn me() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn policy(mode: &str) -> Policy {
    Policy::parse(&format!(
        "mode: {mode}\ncommands: {{deny: [curl]}}\npython: {{deny: [process, network]}}"
    ))
    .unwrap()
}

fn python(code: &str) -> CheckRequest {
    CheckRequest {
        python: Some(code.to_string()),
        ..Default::default()
    }
}

fn in_worker(policy: &Policy, request: &CheckRequest, bounds: Bounds) -> Decision {
    check_in_worker(&me(), &["--policy-worker"], policy, request, bounds)
}

fn same_decision_as_in_process() {
    let p = policy("enforce");
    for r in [
        python("import os\nos.system('id')"),
        python("print(1)"),
        serde_json::from_value(serde_json::json!({"command": "ls; c''url x"})).unwrap(),
    ] {
        assert_eq!(in_worker(&p, &r, Bounds::default()), check(&p, &r));
    }
}

fn hostile_input_is_contained() {
    // `[` × 100 000 overflows a default 2 MiB stack inside the parser; the worker's large stack
    // copes, and had it not, the crash would be the worker's alone.
    let p = policy("enforce");
    let d = in_worker(&p, &python(&"[".repeat(100_000)), Bounds::default());
    assert!(!d.allowed && d.has(Rule::PythonUnparseable), "{d:#?}");
    let deep = format!("x = {}1", "1+".repeat(300_000));
    let d = in_worker(&p, &python(&deep), Bounds::default());
    assert!(!d.allowed, "{d:#?}");
}

fn hang_is_refused_at_the_deadline() {
    let bounds = Bounds {
        deadline: Duration::from_millis(300),
        ..Bounds::default()
    };
    let start = Instant::now();
    let d = check_in_worker(
        std::path::Path::new("/bin/sleep"),
        &["30"],
        &policy("enforce"),
        &python("print(1)"),
        bounds,
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(!d.allowed && d.has(Rule::AnalysisFailed), "{d:#?}");
    assert!(d.findings[0].message.contains("300 ms"), "{d:#?}");
    // In audit mode the failure is reported, and the request runs.
    let d = check_in_worker(
        std::path::Path::new("/bin/sleep"),
        &["30"],
        &policy("audit"),
        &python("print(1)"),
        bounds,
    );
    assert!(d.allowed && d.has(Rule::AnalysisFailed), "{d:#?}");
}

fn failures_refuse() {
    let p = policy("enforce");
    let d = check_in_worker(
        std::path::Path::new("/bin/false"),
        &[],
        &p,
        &python("print(1)"),
        Bounds::default(),
    );
    assert!(!d.allowed && d.has(Rule::AnalysisFailed), "{d:#?}");
    let d = check_in_worker(
        std::path::Path::new("/nonexistent/moat"),
        &[],
        &p,
        &python("print(1)"),
        Bounds::default(),
    );
    assert!(
        !d.allowed && d.findings[0].message.contains("cannot start"),
        "{d:#?}"
    );
    // `echo` answers, but not with a decision.
    let d = check_in_worker(
        std::path::Path::new("/bin/echo"),
        &["{}"],
        &p,
        &python("print(1)"),
        Bounds::default(),
    );
    assert!(
        !d.allowed && d.findings[0].message.contains("not a decision"),
        "{d:#?}"
    );
}

fn memory_cap_applies() {
    // 64 MiB cannot hold the worker's 256 MiB analysis stack: the worker fails, and says so.
    let bounds = Bounds {
        memory_bytes: 64 << 20,
        ..Bounds::default()
    };
    let d = in_worker(&policy("enforce"), &python("print(1)"), bounds);
    assert!(!d.allowed && d.has(Rule::AnalysisFailed), "{d:#?}");
    assert!(d.findings[0].message.contains("analysis thread"), "{d:#?}");
}
