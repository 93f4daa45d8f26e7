//! The bounded fuzz smoke runs of `cargo test` (the real fuzzers, `scripts/fuzz-*.sh`, need a
//! nightly toolchain): a fuzz crate's committed seeds and seeded mutations of them (bit flips,
//! lengths that lie, truncations, duplications, splices of two seeds, runs of one byte, JSON
//! tokens) go through the fuzz target's own entry point (its `one_input.rs`): no panic, no
//! broken invariant, and the whole run within a time cap. Seeded, so a failure reproduces;
//! the failing input is printed as hex, to be added to the seeds as a regression.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

/// A small deterministic generator (xorshift64*): the run must reproduce from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values a lying length field likes: around the header, at and past the frame limit.
const LENGTHS: &[u32] = &[
    0,
    1,
    4,
    5,
    6,
    9,
    128 * 1024 + 4,
    128 * 1024 + 5,
    128 * 1024 + 6,
    u32::MAX,
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(8) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => {
                let len = LENGTHS[rng.below(LENGTHS.len())].to_le_bytes();
                let end = (at + 4).min(out.len());
                out.splice(at..end, len);
            }
            3 => out.truncate(at),
            4 if !out.is_empty() => {
                let from = rng.below(out.len());
                let to = (from + 1 + rng.below(64)).min(out.len());
                let piece = out[from..to].to_vec();
                out.splice(at..at, piece);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                out.splice(at.., other[from..].iter().copied());
            }
            6 => {
                let byte = rng.next() as u8;
                let n = rng.below(300);
                out.splice(at..at, std::iter::repeat_n(byte, n));
            }
            _ => {
                // A JSON-ish token where the text was.
                const TOKENS: &[&str] =
                    &["null", "{}", "[]", "\"", "\\u0000", "1e999", "-1", ":", ","];
                let t = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, t.bytes());
            }
        }
    }
    out
}

fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs the seeds in `seeds_dir/<target>/` and `mutations` mutations of them through `check`
/// (a fuzz target's entry point); panics naming up to five failing inputs (as hex), or if
/// the run took `cap` or longer.
pub fn smoke(
    seeds_dir: &Path,
    target: &str,
    mutations: usize,
    cap: Duration,
    check: fn(&[u8]) -> Result<(), String>,
) {
    let seeds = seeds(&seeds_dir.join(target));
    let mut rng = Rng(0x6d6f_6174_0000_0000 | target.len() as u64);
    let start = Instant::now();
    let mut failures = Vec::new();
    let inputs = seeds
        .clone()
        .into_iter()
        .chain((0..mutations).map(|i| mutate(&mut rng, &seeds, &seeds[i % seeds.len()])));
    let mut n = 0;
    for input in inputs {
        n += 1;
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
        let why = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => "panic".to_string(),
        };
        let hex: String = input.iter().take(512).map(|b| format!("{b:02x}")).collect();
        failures.push(format!("{why}: {hex} ({} bytes)", input.len()));
        if failures.len() >= 5 {
            break;
        }
    }
    let took = start.elapsed();
    eprintln!("{target}: {n} inputs in {took:?}");
    assert!(failures.is_empty(), "{target}:\n{}", failures.join("\n"));
    assert!(took < cap, "{target}: the smoke run took {took:?}");
}
