//! Fuzz target for moat's DNS engine: any bytes as a query from the guest, answered under a
//! policy with an allowed wildcard, a deny rule and a hosts-file name, and no upstream
//! resolver. An answer must parse and carry the query's id. Run: `scripts/fuzz-net.sh dns`;
//! the bounded stand-in that runs with the tests is `crates/net/tests/mutations.rs`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moat_net::dns::Resolver;
use moat_net::{EgressSpec, Floor, HostsFile, Policy};

struct Fixture {
    rt: tokio::runtime::Runtime,
    resolver: Resolver,
    policy: Policy,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let spec: EgressSpec = serde_json::from_value(serde_json::json!({
            "rules": [{"host": "*.fuzz.test"}, {"host": "evil.test", "action": "deny"}]
        }))
        .expect("a valid spec");
        Fixture {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            resolver: Resolver::new(
                None,
                HostsFile::parse("127.0.0.1 a.fuzz.test\n").expect("a valid hosts file"),
                Floor::new(vec![]),
            ),
            policy: Policy::new(spec).expect("a valid policy"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    if let Some((answer, _event)) = f.rt.block_on(f.resolver.answer(&f.policy, data)) {
        assert!(answer.len() >= 12, "an answer without a header");
        assert_eq!(answer[..2], data[..2], "an answer with another id");
    }
});
