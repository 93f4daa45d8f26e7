//! The guest's link to its host-side network stack: the addresses both ends must agree on.
//! The stack (moat-net) plays the gateway and the resolver at [`GATEWAY_IP`]; the host tells
//! the agent its side with [`guest_config`] in a `network` request after every boot and
//! restore. They live here, in the one crate both sides link, so that the agent never links
//! the stack (crates are split by trust boundary) and the two ends cannot drift apart.

use std::net::Ipv4Addr;

use crate::messages::{GuestIdentity, NetworkConfig};

/// The guest's side of the link: a /30 in CGNAT space, which is in the stack's always-deny
/// floor, so these addresses never clash with a real destination.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(100, 127, 255, 2);
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(100, 127, 255, 1);
pub const PREFIX_LEN: u8 = 30;
pub const MTU: u16 = 1500;
/// The in-guest identity endpoint's address (port 80), answered by the stack itself when the
/// sandbox has one, and its ACA-style URL (`IDENTITY_ENDPOINT`).
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const IDENTITY_ENDPOINT: &str = "http://169.254.169.254/msi/token";

/// What the agent sets up in the guest: eth0 on the link to the stack, which is its gateway
/// and its resolver, the CA it trusts for intercepted hosts (the group's, if any), and the
/// identity endpoint's env for execs when the sandbox has one (`identity_header`).
pub fn guest_config(
    trust_ca_pem: Option<String>,
    identity_header: Option<String>,
) -> NetworkConfig {
    NetworkConfig {
        interface: None,
        address: GUEST_IP.to_string(),
        prefix_len: PREFIX_LEN,
        gateway: GATEWAY_IP.to_string(),
        mtu: MTU,
        nameservers: vec![GATEWAY_IP.to_string()],
        trust_ca_pem,
        identity: identity_header.map(|header| GuestIdentity {
            endpoint: IDENTITY_ENDPOINT.to_string(),
            header,
        }),
    }
}
