//! Fuzz target `api_json`: see `../one_input.rs` (the entry point it shares with the smoke run
//! in `cargo test -p moat-server --test fuzz_smoke`). Run: scripts/fuzz-server.sh api_json.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../one_input.rs"]
mod one_input;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = one_input::api_json(data) {
        panic!("{e}");
    }
});
