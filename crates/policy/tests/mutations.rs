//! The bounded fuzz smoke run of `cargo test` (CI has no nightly toolchain for cargo-fuzz;
//! scripts/fuzz-policy.sh runs the real fuzzer): 20,000 mutations of the corpus (truncations,
//! duplications, splices of brackets, quotes, substitutions, here-document markers, NUL and
//! astral characters) and generated hostile shapes (deep nesting, long lines) go through the
//! fuzz target's own entry point (`fuzz/one_input.rs`): as Python, as shell, as argv and as
//! JavaScript. The
//! check must return a decision for each, never panic, never allow in `enforce` what it has
//! findings for, and finish each input within the worker's deadline (the bound the daemon
//! kills a worker at), the whole run within a time cap. Seeded, so a failure reproduces.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use std::time::{Duration, Instant};

use moat_policy::Bounds;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SPLICES: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "'",
    "\"",
    "\"\"\"",
    "$(",
    "`",
    "\\",
    "\n",
    "\n    ",
    "<<EOF\n",
    "<<'E'\n",
    "\nEOF\n",
    "|",
    ";",
    "&&",
    "${",
    "$((",
    "<(",
    "\u{31860}",
    "\0",
    "getattr(",
    "exec(",
    "__import__(",
    "sys.modules[",
    "f\"{",
    "lambda:",
    "async ",
    "match ",
    "case ",
    "type ",
    "@",
    ":=",
    "**",
    "#",
    "\r",
    "\t",
    "python3 -c ",
    "sh -c ",
    "env ",
    "node -e ",
    "require(",
    "import(",
    "eval(",
    "${",
    "=>",
    "/*",
    "//",
    "`${",
    "/[",
    "new Function(",
    "process.binding(",
];

fn seeds() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut out = Vec::new();
    for sub in ["refuse", "pass"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            out.push(std::fs::read_to_string(e.unwrap().path()).unwrap());
        }
    }
    out.sort();
    out
}

fn mutate(rng: &mut StdRng, seed: &str) -> String {
    let mut s: Vec<char> = seed.chars().collect();
    for _ in 0..rng.gen_range(1..6) {
        let at = rng.gen_range(0..=s.len());
        match rng.gen_range(0..4) {
            0 => s.truncate(at),
            1 => {
                let end = rng.gen_range(at..=s.len());
                let copy: Vec<char> = s[at..end].to_vec();
                s.splice(at..at, copy);
            }
            2 => {
                let end = rng.gen_range(at..=s.len().min(at + 8));
                s.drain(at..end);
            }
            _ => {
                let splice = SPLICES[rng.gen_range(0..SPLICES.len())];
                s.splice(at..at, splice.chars());
            }
        }
    }
    s.into_iter().collect()
}

#[path = "../fuzz/one_input.rs"]
mod one_input;

/// Mutated inputs per run.
const MUTATIONS: usize = 20_000;
/// The whole smoke run, generated inputs included (it takes seconds; this catches a slowdown
/// that makes it useless to run on every commit).
const TOTAL_CAP: Duration = Duration::from_secs(120);

/// Hostile shapes no mutation of the corpus reaches: nesting far past the analysers' limits in
/// every bracket either language has, and one very long line.
fn generated() -> Vec<String> {
    let mut out = Vec::new();
    for (open, close) in [
        ("(", ")"),
        ("[", "]"),
        ("{", "}"),
        ("$(", ")"),
        ("`", "`"),
        ("f\"{", "}\""),
        ("lambda: ", ""),
        ("sh -c '", "'"),
        ("not ", ""),
        ("-", ""),
        ("x=>", ""),
        ("!", ""),
        ("`${", "}`"),
        ("a?b:", "c"),
        ("new ", "X"),
    ] {
        for depth in [300, 5_000] {
            out.push(format!("{}x{}", open.repeat(depth), close.repeat(depth)));
            out.push(open.repeat(depth));
        }
    }
    // Long, flat input. (The shell analysis grows faster than linearly in the words of one
    // command: 100,000 take ~10 s in a debug build, past the worker's deadline, so such a
    // request is refused as `analysis.failed`; docs/POLICY.md, "Not yet".)
    out.push(format!("x = [{}]", "1, ".repeat(20_000)));
    out.push("a | ".repeat(5_000));
    out
}

/// The start of an input and its length, for messages.
fn short(input: &str) -> String {
    format!(
        "{}… ({} bytes)",
        input.chars().take(60).collect::<String>(),
        input.len()
    )
}

#[test]
fn mutated_and_generated_inputs_always_get_a_decision_within_the_bound() {
    let seeds = seeds();
    let bound = Bounds::default().deadline;
    let (failures, checked, slowest, total) = std::thread::Builder::new()
        // The worker's stack: the daemon runs the check on exactly this much.
        .stack_size(256 << 20)
        .spawn(move || {
            let policy = one_input::policy();
            let mut rng = StdRng::seed_from_u64(0x6d6f6174);
            let mut failures = Vec::new();
            let mut slowest = (Duration::ZERO, String::new());
            let start = Instant::now();
            let inputs = (0..MUTATIONS)
                .map(|i| mutate(&mut rng, &seeds[i % seeds.len()]))
                .chain(generated());
            let mut checked = 0;
            for input in inputs {
                let t0 = Instant::now();
                match catch_unwind(AssertUnwindSafe(|| one_input::check_input(&policy, &input))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failures.push(e.chars().take(400).collect()),
                    Err(_) => failures.push(format!("panic for {:?}", short(&input))),
                }
                let took = t0.elapsed();
                if took > slowest.0 {
                    slowest = (took, short(&input));
                }
                if took > bound {
                    failures.push(format!("{took:?} (over {bound:?}) for {:?}", short(&input)));
                }
                checked += 1;
            }
            (failures, checked, slowest, start.elapsed())
        })
        .unwrap()
        .join()
        .unwrap();
    eprintln!(
        "{checked} inputs in {total:?}; slowest {:?}: {:?}",
        slowest.0, slowest.1
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(total < TOTAL_CAP, "the smoke run took {total:?}");
}
