//! What one fuzz input must satisfy, shared by the libFuzzer target (`fuzz_targets/check.rs`,
//! run by scripts/fuzz-policy.sh) and the bounded smoke run in `cargo test`
//! (`tests/mutations.rs`), so both exercise exactly the same entry point: the text as Python,
//! as a shell command line, as argv and as JavaScript (`node -e`), through the in-process
//! check, which must return a decision that refuses exactly when it has findings.

use moat_policy::{check, CheckRequest, Policy};

/// The policy every input is checked against: every Python and JavaScript family denied, an
/// allow list with the wrappers and interpreters whose arguments are analysed, a deny list.
pub fn policy() -> Policy {
    Policy::parse(
        "mode: enforce\ncommands: {allow: [ls, sh, python3, node, env, find, xargs], deny: [curl]}\n\
         python: {deny: [process, dynamic-code, native, network, reflection]}\n\
         javascript: {deny: [process, dynamic-code, native, network, reflection]}",
    )
    .expect("the fuzz policy is valid")
}

/// Checks `text` in the four forms; an inconsistent decision is an error naming the request.
pub fn check_input(policy: &Policy, text: &str) -> Result<(), String> {
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
        CheckRequest {
            argv: Some(vec!["node".into(), "-e".into(), text.to_string()]),
            ..Default::default()
        },
    ] {
        let decision = check(policy, &request);
        if decision.allowed != decision.findings.is_empty() {
            return Err(format!("inconsistent {decision:?} for {request:?}"));
        }
    }
    Ok(())
}
