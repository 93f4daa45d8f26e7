//! A stable-Rust stand-in for the `frames` fuzz target (`crates/net/fuzz`, run by
//! `scripts/fuzz-net.sh`), run with the other tests: seeded mutations of real guest frames
//! (ARP, TCP SYNs, DNS over UDP, ICMP, UDP, IPv6), with their checksums mostly made valid again
//! so that they get past the first checks (the unit test `hostile_frames_are_survived` feeds
//! the classifier frames whose checksums mostly fail), go several to a stream, in QEMU's
//! framing with now and then a corrupt length, through the stack's own loop (`stack::serve`).
//! Each stream must end the stack cleanly or as corrupt, never panic or hang, and the stack may
//! only send back whole Ethernet frames from the gateway. The policy allows nothing and there
//! is no upstream resolver, so nothing leaves the machine. Seeded, so a failure reproduces;
//! capped in time, so a slow machine runs fewer cases. (The DNS engine's stand-in is the unit
//! test `mutated_queries_are_handled` in dns.rs.)

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use moat_net::audit::Audit;
use moat_net::dns::Resolver;
use moat_net::stack::{serve, Limits, GATEWAY_MAC};
use moat_net::{EgressSpec, Floor, HostsFile, Policy};
use moat_protocol::link::{GATEWAY_IP, GUEST_IP};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

const GUEST_MAC: EthernetAddress = EthernetAddress([2, 0x6d, 0x6f, 0x61, 0x74, 2]);
/// Long enough for thousands of cases on an idle machine; a busy one runs what fits.
const TIME_CAP: Duration = Duration::from_secs(20);

fn ethernet(dst: EthernetAddress, ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 14 + payload.len()];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: dst,
        ethertype,
    }
    .emit(&mut eth);
    eth.payload_mut().copy_from_slice(payload);
    buf
}

/// An IPv4 frame from the guest; `emit` writes its `len`-byte payload.
fn ipv4(dst: Ipv4Addr, protocol: IpProtocol, len: usize, emit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: GUEST_IP,
        dst_addr: dst,
        next_header: protocol,
        payload_len: len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + len];
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &ChecksumCapabilities::default());
    emit(p.payload_mut());
    ethernet(EthernetAddress(GATEWAY_MAC), EthernetProtocol::Ipv4, &buf)
}

fn tcp(dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: 40000,
        dst_port: port,
        control: smoltcp::wire::TcpControl::Syn,
        seq_number: TcpSeqNumber(1),
        ack_number: None,
        window_len: 64240,
        window_scale: Some(7),
        max_seg_size: Some(1460),
        sack_permitted: true,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    ipv4(dst, IpProtocol::Tcp, repr.buffer_len(), |b| {
        repr.emit(
            &mut TcpPacket::new_unchecked(b),
            &GUEST_IP.into(),
            &dst.into(),
            &ChecksumCapabilities::default(),
        )
    })
}

fn udp(dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: 40001,
        dst_port: port,
    };
    ipv4(
        dst,
        IpProtocol::Udp,
        repr.header_len() + payload.len(),
        |b| {
            repr.emit(
                &mut UdpPacket::new_unchecked(b),
                &GUEST_IP.into(),
                &dst.into(),
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

fn dns_query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x4d54;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

/// Real frames a guest sends.
fn seed_frames() -> Vec<Vec<u8>> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GATEWAY_IP,
    };
    let mut arp_buf = vec![0u8; arp.buffer_len()];
    arp.emit(&mut ArpPacket::new_unchecked(&mut arp_buf[..]));
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 7,
        seq_no: 1,
        data: b"moat",
    };
    let ping = ipv4(GATEWAY_IP, IpProtocol::Icmp, icmp.buffer_len(), |b| {
        icmp.emit(
            &mut Icmpv4Packet::new_unchecked(b),
            &ChecksumCapabilities::default(),
        )
    });
    let raw: Ipv4Addr = "203.0.113.7".parse().unwrap();
    vec![
        ethernet(EthernetAddress::BROADCAST, EthernetProtocol::Arp, &arp_buf),
        ping,
        tcp(raw, 80, &[]),
        tcp(GATEWAY_IP, 53, &[]),
        tcp(
            "198.18.0.1".parse().unwrap(),
            443,
            b"\x16\x03\x01\x00\x05hello",
        ),
        udp(GATEWAY_IP, 53, &dns_query("a.fuzz.test.", RecordType::A)),
        udp(
            "8.8.8.8".parse().unwrap(),
            53,
            &dns_query("evil.test.", RecordType::TXT),
        ),
        udp(raw, 9, b"datagram"),
        ethernet(
            EthernetAddress(GATEWAY_MAC),
            EthernetProtocol::Ipv6,
            &[0x60, 0, 0, 0, 0, 8, 17, 64],
        ),
    ]
}

/// Makes the IPv4 header's and its TCP, UDP or ICMP checksum valid again, where the frame
/// still parses that far.
fn fix_checksums(f: &mut [u8]) {
    if f.len() < 14 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(&mut f[14..]) else {
        return;
    };
    ip.fill_checksum();
    let (src, dst, protocol) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
    let payload = ip.payload_mut();
    match protocol {
        IpProtocol::Udp => {
            if let Ok(mut u) = UdpPacket::new_checked(payload) {
                u.fill_checksum(&src.into(), &dst.into());
            }
        }
        IpProtocol::Tcp => {
            if let Ok(mut t) = TcpPacket::new_checked(payload) {
                t.fill_checksum(&src.into(), &dst.into());
            }
        }
        IpProtocol::Icmp => {
            if let Ok(mut i) = Icmpv4Packet::new_checked(payload) {
                i.fill_checksum();
            }
        }
        _ => {}
    }
}

const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, 0x45, 0x40, 0x05, 0x11, 0x06, 0xc0];
/// Bytes worth aiming at in a frame: IP version/IHL, total length, flags/fragment offset,
/// protocol, the source address, the destination port, UDP length, TCP data offset and flags,
/// the DNS header's counts.
const FIELDS: &[usize] = &[
    14, 16, 17, 20, 21, 23, 26, 36, 37, 38, 39, 45, 46, 47, 48, 49,
];

/// `seed` with 1 to 4 truncations, insertions, bit flips and overwrites.
fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut f = seed.to_vec();
    for _ in 0..rng.gen_range(1..5) {
        let at = rng.gen_range(0..=f.len());
        match rng.gen_range(0..6) {
            0 => f.truncate(at),
            1 => {
                let n = rng.gen_range(1..64);
                let tail: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                f.splice(at..at, tail);
            }
            2 if !f.is_empty() => {
                let i = rng.gen_range(0..f.len());
                f[i] ^= 1 << rng.gen_range(0..8);
            }
            3 if !f.is_empty() => {
                let i = rng.gen_range(0..f.len());
                f[i] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
            }
            _ => {
                let i = FIELDS[rng.gen_range(0..FIELDS.len())];
                if i < f.len() {
                    f[i] = if rng.gen_bool(0.5) {
                        INTERESTING[rng.gen_range(0..INTERESTING.len())]
                    } else {
                        rng.gen()
                    };
                }
            }
        }
    }
    f
}

/// A stream of 1 to 8 frames, most mutated, in stream framing; now and then a corrupt length.
fn stream(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.gen_range(1..9) {
        let seed = &seeds[rng.gen_range(0..seeds.len())];
        let frame = if rng.gen_bool(0.9) {
            let mut f = mutate(rng, seed);
            if rng.gen_bool(0.8) {
                fix_checksums(&mut f);
            }
            f
        } else {
            seed.clone()
        };
        let len = if rng.gen_bool(0.02) {
            rng.gen::<u32>()
        } else {
            frame.len() as u32
        };
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&frame);
    }
    out
}

/// Runs `input` through a fresh stack, as QEMU would write it, until its end; the stack's
/// result and everything it wrote back.
async fn feed(input: Vec<u8>) -> (moat_net::Result<()>, Vec<u8>) {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let resolver = Arc::new(Resolver::new(
        None,
        HostsFile::default(),
        Floor::new(vec![]),
    ));
    let (_policy_tx, policy) =
        watch::channel(Arc::new(Policy::new(EgressSpec::default()).unwrap()));
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
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    };
    let mut out = Vec::new();
    let (_, read) = tokio::join!(write, rd.read_to_end(&mut out));
    read.unwrap();
    let result = match stack.await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    (result, out)
}

/// Every frame the stack sent is whole, at most MTU + Ethernet header, and from the gateway.
fn check_output(out: &[u8]) -> Result<(), String> {
    let mut rest = out;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(format!("a partial length: {rest:?}"));
        }
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        if !(14..=1514).contains(&len) || rest.len() < 4 + len {
            return Err(format!("a frame of {len} bytes ({} left)", rest.len() - 4));
        }
        let eth = EthernetFrame::new_unchecked(&rest[4..4 + len]);
        if eth.src_addr() != EthernetAddress(GATEWAY_MAC) {
            return Err(format!("a frame from {}", eth.src_addr()));
        }
        rest = &rest[4 + len..];
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_guest_frames_never_crash_or_hang_the_stack() {
    let seeds = seed_frames();
    // The seeds themselves: the stack answers ARP, the ping and the denied SYN.
    let all: Vec<u8> = seeds
        .iter()
        .flat_map(|f| [&(f.len() as u32).to_be_bytes()[..], f].concat())
        .collect();
    let (r, out) = feed(all).await;
    r.unwrap();
    check_output(&out).unwrap();
    assert!(out.len() > 3 * 60, "the stack answered the seeds: {out:?}");

    let mut rng = StdRng::seed_from_u64(0x6d6f6174);
    let start = Instant::now();
    let mut cases = 0;
    let mut corrupt = 0;
    let mut replied = 0;
    while cases < 20_000 && start.elapsed() < TIME_CAP {
        let input = stream(&mut rng, &seeds);
        let (r, out) = tokio::time::timeout(Duration::from_secs(10), feed(input.clone()))
            .await
            .unwrap_or_else(|_| panic!("case {cases} hung: {input:?}"));
        if let Err(e) = r {
            assert!(
                e.to_string().contains("the stream is corrupt"),
                "case {cases}: {e}"
            );
            corrupt += 1;
        }
        if let Err(e) = check_output(&out) {
            panic!("case {cases}: {e}; input {input:?}");
        }
        replied += usize::from(!out.is_empty());
        cases += 1;
    }
    assert!(cases >= 200, "only {cases} cases in {TIME_CAP:?}");
    assert!(
        corrupt > 0 && corrupt < cases / 2,
        "{corrupt} of {cases} corrupt"
    );
    // Mutated frames got far enough for the stack to answer many (mostly valid checksums).
    assert!(replied > cases / 4, "{replied} of {cases} answered");
}
