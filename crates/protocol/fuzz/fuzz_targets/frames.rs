//! Fuzz target `frames`: see `../one_input.rs` (the entry point it shares with the smoke run in
//! `cargo test -p moat-protocol --test fuzz_smoke`). Run: scripts/fuzz-protocol.sh frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../one_input.rs"]
mod one_input;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = one_input::frames(data) {
        panic!("{e}");
    }
});
