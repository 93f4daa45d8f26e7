//! Long but ordinary input must be analysed in time linear in its size, within the worker's
//! deadline: a command with 100,000 words (an `echo` or an `xargs`-style argument list, about
//! 600 KB, under the 1 MiB cap) used to take ~10 s in the shell analysis, so it was refused as
//! `analysis.failed`. Measured against a 10× smaller input of the same shape, so the bound holds
//! on a slow or loaded machine too.

use std::time::{Duration, Instant};

use moat_policy::{check, Bounds, CheckRequest, Decision, Policy};

const POLICY: &str = "
mode: enforce
commands:
  allow: [echo, printf, xargs, rm, node, python3]
python:
  deny: [process, dynamic-code, native, network, reflection]
javascript:
  deny: [process, dynamic-code, native, network, reflection]
";

/// The fastest of five runs: the least disturbed by other work on the machine.
fn timed(request: &CheckRequest) -> (Duration, Decision) {
    let policy = Policy::parse(POLICY).unwrap();
    let mut best = Duration::MAX;
    let mut decision = None;
    for _ in 0..5 {
        let t0 = Instant::now();
        let d = check(&policy, request);
        best = best.min(t0.elapsed());
        decision = Some(d);
    }
    (best, decision.unwrap())
}

fn command(text: String) -> CheckRequest {
    CheckRequest {
        command: Some(text),
        ..Default::default()
    }
}

/// Checks the shape at `n` and `10 n` words: both allowed without findings, the larger within
/// the worker's deadline and at most 30× the smaller (linear: 10×; quadratic: 100×; before the
/// fix, 60×: 0.25 s and 15.2 s in a debug build). The slack is for a loaded machine.
#[track_caller]
fn linear(what: &str, make: impl Fn(usize) -> CheckRequest) {
    let (small, d) = timed(&make(10_000));
    assert!(d.allowed && d.findings.is_empty(), "{what}: {d:#?}");
    let (large, d) = timed(&make(100_000));
    assert!(d.allowed && d.findings.is_empty(), "{what}: {d:#?}");
    eprintln!("{what}: 10,000 words {small:?}, 100,000 words {large:?}");
    let deadline = Bounds::default().deadline;
    assert!(
        large < deadline,
        "{what}: {large:?}, over the worker's {deadline:?}"
    );
    assert!(
        large < small * 30 + Duration::from_millis(50),
        "{what}: not linear: {small:?} for 10,000 words, {large:?} for 100,000"
    );
}

#[test]
fn a_command_with_100000_words_is_analysed_in_linear_time() {
    linear("echo", |n| {
        command(format!(
            "echo {}",
            (0..n)
                .map(|i| format!("w{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        ))
    });
    linear("xargs", |n| {
        command(format!(
            "printf '%s\\n' x | xargs rm -f -- {}",
            (0..n)
                .map(|i| format!("f{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        ))
    });
    linear("argv", |n| CheckRequest {
        argv: Some(
            ["xargs", "echo"]
                .into_iter()
                .map(String::from)
                .chain((0..n).map(|i| format!("a{i}")))
                .collect(),
        ),
        ..Default::default()
    });
}
