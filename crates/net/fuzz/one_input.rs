//! What one fuzz input must satisfy, shared by the libFuzzer target (`fuzz_targets/frames.rs`,
//! run by scripts/fuzz-net.sh) and the bounded smoke run in `cargo test`
//! (`tests/mutations.rs`), so both drive exactly the same harness: the bytes, as QEMU's stream
//! framing carries them, through a fresh stack's own loop (`stack::serve`) with a policy that
//! allows nothing and no upstream resolver, so nothing leaves the machine.

use std::sync::Arc;

use moat_net::audit::Audit;
use moat_net::dns::Resolver;
use moat_net::stack::{serve, Limits, GATEWAY_MAC};
use moat_net::{EgressSpec, Floor, HostsFile, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// Runs `input` through a fresh stack until its end; the stack's result and everything it
/// wrote back. A panic inside the stack is raised again here.
pub async fn feed(input: &[u8]) -> (moat_net::Result<()>, Vec<u8>) {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let resolver = Arc::new(Resolver::new(
        None,
        HostsFile::default(),
        Floor::new(vec![]),
    ));
    let (_policy_tx, policy) = watch::channel(Arc::new(
        Policy::new(EgressSpec::default()).expect("the empty spec denies all"),
    ));
    let (audit, _events) = Audit::channel(1 << 16);
    let (_inbound_tx, inbound) = mpsc::channel(1);
    let limits = Limits {
        max_flows: 64,
        new_flows_per_s: 1_000_000,
        dns_qps: 1_000_000,
        bandwidth: None,
    };
    let (_limits_tx, limits) = watch::channel(limits);
    let stack = tokio::spawn(serve(
        theirs,
        resolver,
        policy,
        audit,
        limits,
        inbound,
        Default::default(),
    ));
    let (mut rd, mut wr) = tokio::io::split(ours);
    let write = async move {
        // The stack stops reading at a corrupt length: the rest may not fit anywhere.
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
    };
    let mut out = Vec::new();
    let (_, read) = tokio::join!(write, rd.read_to_end(&mut out));
    read.expect("reading the stack's output");
    let result = match stack.await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    (result, out)
}

/// Every frame the stack sent is whole, at most MTU + Ethernet header, and from the gateway.
pub fn check_output(out: &[u8]) -> Result<(), String> {
    let mut rest = out;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(format!("a partial length: {rest:?}"));
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if !(14..=1514).contains(&len) || rest.len() < 4 + len {
            return Err(format!("a frame of {len} bytes ({} left)", rest.len() - 4));
        }
        let src = &rest[4 + 6..4 + 12];
        if src != GATEWAY_MAC {
            return Err(format!("a frame from {src:02x?}"));
        }
        rest = &rest[4 + len..];
    }
    Ok(())
}
