//! Fuzz target for the stack's guest side: any bytes, as QEMU's stream framing would carry
//! them, through a fresh stack's own loop (`stack::serve`: the framing, the classifier, DNS
//! over UDP and TCP, smoltcp). The stack must end when the stream does, never panic, and only
//! send whole frames from the gateway. Run: `scripts/fuzz-net.sh frames`; the bounded stand-in
//! that runs with the tests is `crates/net/tests/mutations.rs`, on the same harness
//! (`one_input.rs`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../one_input.rs"]
mod one_input;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (_, out) = one_input::feed(data).await;
        if let Err(e) = one_input::check_output(&out) {
            panic!("{e}");
        }
    });
});
