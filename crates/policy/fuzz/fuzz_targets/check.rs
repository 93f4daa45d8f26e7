//! Fuzz target for the analysers: any UTF-8 text (the API only ever hands the analysers JSON
//! strings), as Python, as a shell string and as argv, through the in-process check (the
//! worker's stack and caps are what the daemon relies on; this finds the crashes and hangs they
//! would contain). Run: scripts/fuzz-policy.sh, seeded with `tests/corpus`. The same check runs
//! on generated and mutated inputs in `cargo test` (tests/mutations.rs).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moat_policy::Policy;

#[path = "../one_input.rs"]
mod one_input;

fuzz_target!(|data: &[u8]| {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = one_input::check_input(POLICY.get_or_init(one_input::policy), text) {
        panic!("{e}");
    }
});
