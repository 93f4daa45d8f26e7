//! Fuzz target for the analysers: any bytes, as Python, as a shell string and as argv, through
//! the in-process check (the worker's stack and caps are what the daemon relies on; this finds
//! the crashes and hangs they would contain). Run: `cargo +nightly fuzz run check` in
//! crates/policy, seeded with `tests/corpus`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_policy::{check, CheckRequest, Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = Policy::parse(
        "mode: enforce\ncommands: {allow: [ls, sh, python3, env], deny: [curl]}\n\
         python: {deny: [process, dynamic-code, native, network, reflection]}",
    )
    .expect("the fuzz policy is valid");
    for request in [
        CheckRequest {
            python: Some(text.to_string()),
            ..Default::default()
        },
        CheckRequest {
            command: Some(text.to_string()),
            ..Default::default()
        },
        CheckRequest {
            argv: Some(text.split(' ').map(String::from).collect()),
            ..Default::default()
        },
    ] {
        let decision = check(&policy, &request);
        assert_eq!(decision.allowed, decision.findings.is_empty());
    }
});
