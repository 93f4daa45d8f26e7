//! A stable-Rust stand-in for fuzzing, run with the other tests: thousands of mutations of the
//! corpus (truncations, duplications, splices of brackets, quotes, substitutions, here-document
//! markers, NUL and astral characters) go through `check` as Python, as shell and as argv. The
//! check must return a decision for each, never panic, and never allow in `enforce` what it has
//! findings for. Seeded, so a failure reproduces.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use moat_policy::{check, CheckRequest, Policy};
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

#[test]
fn mutated_inputs_always_get_a_decision() {
    let policy = Policy::parse(
        "mode: enforce\ncommands: {allow: [ls, sh, python3, env, find, xargs], deny: [curl]}\n\
         python: {deny: [process, dynamic-code, native, network, reflection]}",
    )
    .unwrap();
    let seeds = seeds();
    let failures = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || {
            let mut rng = StdRng::seed_from_u64(0x6d6f6174);
            let mut failures = Vec::new();
            for i in 0..6000 {
                let input = mutate(&mut rng, &seeds[i % seeds.len()]);
                let mut request = CheckRequest::default();
                match i % 3 {
                    0 => request.python = Some(input.clone()),
                    1 => request.command = Some(input.clone()),
                    _ => request.argv = Some(input.split(' ').map(String::from).collect()),
                }
                match catch_unwind(AssertUnwindSafe(|| check(&policy, &request))) {
                    Ok(d) if d.allowed == d.findings.is_empty() => {}
                    Ok(d) => failures.push(format!("inconsistent {d:?} for {request:?}")),
                    Err(_) => failures.push(format!("panic for {request:?}")),
                }
            }
            failures
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
