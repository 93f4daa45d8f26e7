//! The always-deny floor: destinations no group rule can open, because reaching them would let
//! a sandbox reach the host, the moat API, other sandboxes, the cloud's metadata service or the
//! operator's private network. It is checked for raw-address connections and for every address
//! the host resolves for an allowed name (DNS rebinding); the operator's hosts file is the only
//! way past it, and only for the names it lists.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

use crate::policy::Protocol;

/// IPv4 ranges in the floor and why. 198.18.0.0/15 holds the synthetic addresses moat's DNS
/// hands the guest; nothing real is reached there.
const RANGES: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this\" network (0.0.0.0/8)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private (10.0.0.0/8)"),
    (Ipv4Addr::new(100, 64, 0, 0), 10, "CGNAT (100.64.0.0/10)"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (127.0.0.0/8)"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local incl. cloud metadata (169.254.0.0/16)",
    ),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private (172.16.0.0/12)"),
    (
        Ipv4Addr::new(192, 0, 0, 0),
        24,
        "IETF protocol assignments (192.0.0.0/24)",
    ),
    (
        Ipv4Addr::new(192, 168, 0, 0),
        16,
        "private (192.168.0.0/16)",
    ),
    (
        Ipv4Addr::new(198, 18, 0, 0),
        15,
        "benchmarking and moat's synthetic addresses (198.18.0.0/15)",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (224.0.0.0/4)"),
    (
        Ipv4Addr::new(240, 0, 0, 0),
        4,
        "reserved and broadcast (240.0.0.0/4)",
    ),
];

/// TCP port 25 (SMTP) is never allowed: an open relay path is a spam cannon.
pub const SMTP_PORT: u16 = 25;

/// The floor as it applies on this host: the fixed ranges plus the host's own addresses.
#[derive(Debug, Clone, Default)]
pub struct Floor {
    host_addrs: Vec<IpAddr>,
}

impl Floor {
    /// The floor with the addresses of this host's interfaces (read now; public addresses of
    /// the host are as dangerous a destination as loopback).
    pub fn with_host_addrs() -> crate::Result<Floor> {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| crate::Error::Io {
            context: "listing the host's addresses".into(),
            source: e.into(),
        })?;
        let mut host_addrs = Vec::new();
        for a in addrs {
            let Some(addr) = a.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                host_addrs.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                host_addrs.push(IpAddr::V6(v6.ip()));
            }
        }
        host_addrs.sort();
        host_addrs.dedup();
        Ok(Floor { host_addrs })
    }

    /// A floor with exactly these host addresses (tests, and callers that know them).
    pub fn new(host_addrs: Vec<IpAddr>) -> Floor {
        Floor { host_addrs }
    }

    /// Why `ip` may not be reached, or `None` if the floor does not stop it.
    pub fn address(&self, ip: IpAddr) -> Option<String> {
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => return Some("IPv6 (sandboxes have no IPv6)".into()),
            },
        };
        if let Some(r) = range_of(v4) {
            return Some(r.to_string());
        }
        if self.host_addrs.contains(&IpAddr::V4(v4)) {
            return Some(format!("the host's own address ({v4})"));
        }
        None
    }

    /// Why this port may not be reached whatever the address, or `None`.
    pub fn port(port: u16, protocol: Protocol) -> Option<String> {
        (protocol == Protocol::Tcp && port == SMTP_PORT).then(|| "TCP port 25 (SMTP)".to_string())
    }
}

fn range_of(ip: Ipv4Addr) -> Option<&'static str> {
    RANGES
        .iter()
        .find(|(net, len, _)| {
            Ipv4Net::new(*net, *len)
                .expect("prefix lengths above are valid")
                .contains(&ip)
        })
        .map(|(_, _, why)| *why)
}

/// The floor range that contains all of `net`, if any: a rule for it can never match.
pub fn range_containing(net: Ipv4Net) -> Option<&'static str> {
    RANGES
        .iter()
        .find(|(base, len, _)| {
            Ipv4Net::new(*base, *len)
                .expect("prefix lengths above are valid")
                .contains(&net)
        })
        .map(|(_, _, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(f: &Floor, s: &str) -> bool {
        f.address(s.parse().unwrap()).is_some()
    }

    #[test]
    fn floor_ranges() {
        let f = Floor::new(vec!["203.0.113.7".parse().unwrap()]);
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.1",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.170",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.251",
            "239.255.255.250",
            "255.255.255.255",
            "203.0.113.7",
            // IPv4-mapped IPv6 is the IPv4 address in disguise.
            "::ffff:127.0.0.1",
            "::1",
            "fe80::1",
            "2001:db8::1",
        ] {
            assert!(denied(&f, ip), "{ip} must be in the floor");
        }
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "203.0.113.8",
            "::ffff:8.8.8.8",
        ] {
            assert!(!denied(&f, ip), "{ip} is not in the floor");
        }
    }

    #[test]
    fn smtp_is_tcp_only() {
        assert!(Floor::port(25, Protocol::Tcp).is_some());
        assert!(Floor::port(25, Protocol::Udp).is_none());
        assert!(Floor::port(587, Protocol::Tcp).is_none());
    }

    #[test]
    fn host_addresses_are_read() {
        let f = Floor::with_host_addrs().unwrap();
        // Every host has loopback, and it is in the floor twice over.
        assert!(f.host_addrs.contains(&"127.0.0.1".parse().unwrap()));
    }
}
