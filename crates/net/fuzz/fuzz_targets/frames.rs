//! Fuzz target for the stack's guest side: any bytes, as QEMU's stream framing would carry
//! them, through a fresh stack's own loop (`stack::serve`: the framing, the classifier, DNS
//! over UDP and TCP, smoltcp), with a policy that allows nothing and no upstream resolver, so
//! nothing leaves the machine. The stack must end when the stream does, never panic, and only
//! send whole frames. Run: `scripts/fuzz-net.sh frames`; the bounded stand-in that runs with
//! the tests is `crates/net/tests/mutations.rs`.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use moat_net::audit::Audit;
use moat_net::dns::Resolver;
use moat_net::stack::{serve, Limits};
use moat_net::{EgressSpec, Floor, HostsFile, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

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
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let resolver = Arc::new(Resolver::new(
            None,
            HostsFile::default(),
            Floor::new(vec![]),
        ));
        let (_policy_tx, policy) = watch::channel(Arc::new(
            Policy::new(EgressSpec::default()).expect("deny all"),
        ));
        let (audit, _events) = Audit::channel(1 << 12);
        let (_inbound_tx, inbound) = mpsc::channel(1);
        let limits = Limits {
            max_flows: 64,
            new_flows_per_s: 1_000_000,
            dns_qps: 1_000_000,
            bandwidth: None,
        };
        let (_limits_tx, limits) = watch::channel(limits);
        let stack = tokio::spawn(serve(
            theirs, resolver, policy, audit, limits, inbound, None,
        ));
        let (mut rd, mut wr) = tokio::io::split(ours);
        let write = async move {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let mut out = Vec::new();
        let (_, read) = tokio::join!(write, rd.read_to_end(&mut out));
        read.expect("the stack's output");
        match stack.await {
            Ok(_) => {}
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
        let mut rest = &out[..];
        while !rest.is_empty() {
            assert!(rest.len() >= 4, "a partial length");
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            assert!(
                (14..=1514).contains(&len) && rest.len() >= 4 + len,
                "a bad frame"
            );
            rest = &rest[4 + len..];
        }
    });
});
