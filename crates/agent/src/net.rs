//! The guest's network interface, configured as the host says (`Request::Network`): address,
//! MTU, up, default route via the host's stack, `/etc/resolv.conf`, IPv6 off. Plain ioctls on
//! an AF_INET socket (no netlink library in the guest). Idempotent, because the host sends it
//! at boot and again after every restore.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use moat_protocol::{ErrorKind, NetworkConfig};

use crate::files::Failure;
use crate::sys::check;

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The link part of the last configuration applied (no CA, no identity): a restored guest
/// remembers it with the rest of its memory.
static APPLIED_LINK: std::sync::Mutex<Option<NetworkConfig>> = std::sync::Mutex::new(None);

/// Applies `c` to the guest. The link (address, route, MTU, resolv.conf) is left alone when
/// this guest applied exactly that link before: every restore sends the configuration again,
/// and re-running the interface ioctls costs a restored guest ~80 ms under TCG, which must
/// translate those kernel paths anew; a different link (a guest saved by an older host) is
/// applied. The CA and the identity are applied every time.
pub fn configure(c: &NetworkConfig) -> Result<(), Failure> {
    let link = NetworkConfig {
        trust_ca_pem: None,
        identity: None,
        ..c.clone()
    };
    let mut applied = APPLIED_LINK.lock().unwrap_or_else(|p| p.into_inner());
    if applied.as_ref() != Some(&link) {
        let iface = match &c.interface {
            Some(i) => i.clone(),
            None => first_interface()?,
        };
        configure_at(c, &iface, Path::new(RESOLV_CONF))?;
        *applied = Some(link);
    }
    drop(applied);
    if let Some(pem) = &c.trust_ca_pem {
        crate::trust::install(pem).map_err(|m| Failure(ErrorKind::Other, m))?;
    }
    set_identity(c.identity.as_ref());
    Ok(())
}

/// The identity endpoint's env for execs: `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` (what the
/// Azure SDKs' managed-identity credential reads), replaced by every configuration (a
/// restore's has a new header), none when the configuration has no endpoint.
static IDENTITY_ENV: std::sync::Mutex<Vec<(&'static str, String)>> =
    std::sync::Mutex::new(Vec::new());

fn set_identity(identity: Option<&moat_protocol::GuestIdentity>) {
    let env = identity.map_or_else(Vec::new, |i| {
        vec![
            ("IDENTITY_ENDPOINT", i.endpoint.clone()),
            ("IDENTITY_HEADER", i.header.clone()),
        ]
    });
    *IDENTITY_ENV.lock().unwrap_or_else(|p| p.into_inner()) = env;
}

/// Variables execs get for the identity endpoint (see [`set_identity`]).
pub fn identity_env() -> Vec<(&'static str, String)> {
    IDENTITY_ENV
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// The first interface in /sys/class/net that is not loopback (eth0 under QEMU).
fn first_interface() -> Result<String, Failure> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .map_err(|e| other("/sys/class/net", e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next().ok_or_else(|| {
        Failure(
            ErrorKind::NotFound,
            "no network interface: is virtio_net loaded?".into(),
        )
    })
}

fn invalid(m: String) -> Failure {
    Failure(ErrorKind::InvalidInput, m)
}

fn other(what: &str, e: io::Error) -> Failure {
    Failure(ErrorKind::Other, format!("{what}: {e}"))
}

fn parse(what: &str, s: &str) -> Result<Ipv4Addr, Failure> {
    s.parse()
        .map_err(|_| invalid(format!("{what} {s:?} is not an IPv4 address")))
}

fn configure_at(c: &NetworkConfig, iface: &str, resolv: &Path) -> Result<(), Failure> {
    let address = parse("address", &c.address)?;
    let gateway = parse("gateway", &c.gateway)?;
    if c.prefix_len == 0 || c.prefix_len > 32 {
        return Err(invalid(format!(
            "prefix_len {}: allowed is 1–32",
            c.prefix_len
        )));
    }
    if c.mtu < 576 {
        return Err(invalid(format!("mtu {}: at least 576", c.mtu)));
    }
    if c.nameservers.is_empty() || c.nameservers.len() > 3 {
        return Err(invalid("nameservers: give 1–3".into()));
    }
    let nameservers = c
        .nameservers
        .iter()
        .map(|n| parse("nameserver", n))
        .collect::<Result<Vec<_>, _>>()?;
    if iface.is_empty() || iface.len() >= libc::IFNAMSIZ || iface.contains('/') {
        return Err(invalid(format!(
            "interface {iface:?} is not an interface name"
        )));
    }
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(c.prefix_len)));
    let sock = socket().map_err(|e| other("socket", e))?;
    let fd = sock.as_raw_fd();
    let req = |f: &mut dyn FnMut(&mut libc::ifreq)| {
        // SAFETY: ifreq is plain data for which all zeroes is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in r.ifr_name.iter_mut().zip(iface.bytes()) {
            *dst = src as libc::c_char;
        }
        f(&mut r);
        r
    };
    let set = |what: &str, op: libc::c_ulong, r: libc::ifreq| {
        // SAFETY: `op` is a SIOCSIF* ioctl that reads the ifreq `r` points to.
        check(unsafe { libc::ioctl(fd, op, &r) })
            .map_err(|e| other(&format!("{what} on {iface}"), e))
    };
    set(
        "setting the MTU",
        libc::SIOCSIFMTU,
        req(&mut |r| r.ifr_ifru.ifru_mtu = i32::from(c.mtu)),
    )?;
    set(
        "setting the address",
        libc::SIOCSIFADDR,
        req(&mut |r| r.ifr_ifru.ifru_addr = sockaddr(address)),
    )?;
    set(
        "setting the netmask",
        libc::SIOCSIFNETMASK,
        req(&mut |r| r.ifr_ifru.ifru_netmask = sockaddr(mask)),
    )?;
    let mut flags = req(&mut |_| {});
    // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq `flags` points to.
    check(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut flags) })
        .map_err(|e| other(&format!("reading the flags of {iface}"), e))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { flags.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    set("bringing up", libc::SIOCSIFFLAGS, flags)?;
    default_route(fd, iface, gateway).map_err(|e| other("adding the default route", e))?;
    // No IPv6: the host's stack has none. Absent when the kernel has no IPv6 at all.
    match fs::write(format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"), "1") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(other("disabling IPv6", e)),
        _ => {}
    }
    let text: String = nameservers
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect();
    crate::files::replace_if_changed(resolv, text.as_bytes())
        .map_err(|e| other(&resolv.display().to_string(), e))
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the fd is owned right after.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in
    // because sin_family says so.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `route add default gw GATEWAY dev IFACE`; an existing default route is kept (a restore
/// sends the same configuration again).
fn default_route(fd: i32, iface: &str, gateway: Ipv4Addr) -> io::Result<()> {
    let mut dev: Vec<u8> = iface.bytes().collect();
    dev.push(0);
    // SAFETY: rtentry is plain data for which all zeroes is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr() as *mut libc::c_char;
    // SAFETY: SIOCADDRT reads the rtentry and the NUL-terminated device name it points to;
    // both outlive the call.
    match check(unsafe { libc::ioctl(fd, libc::SIOCADDRT, &rt) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetworkConfig {
        NetworkConfig {
            interface: Some("eth0".into()),
            address: "100.127.255.2".into(),
            prefix_len: 30,
            gateway: "100.127.255.1".into(),
            mtu: 1400,
            nameservers: vec!["100.127.255.1".into()],
            trust_ca_pem: None,
            identity: None,
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        let dir = std::env::temp_dir();
        let r = dir.join("moat-agent-resolv-never");
        for (c, hint) in [
            (
                NetworkConfig {
                    address: "x".into(),
                    ..config()
                },
                "address",
            ),
            (
                NetworkConfig {
                    gateway: "::1".into(),
                    ..config()
                },
                "gateway",
            ),
            (
                NetworkConfig {
                    prefix_len: 33,
                    ..config()
                },
                "prefix_len",
            ),
            (
                NetworkConfig {
                    mtu: 100,
                    ..config()
                },
                "mtu",
            ),
            (
                NetworkConfig {
                    nameservers: vec![],
                    ..config()
                },
                "nameservers",
            ),
        ] {
            let Failure(kind, m) = configure_at(&c, "eth0", &r).unwrap_err();
            assert_eq!(kind, ErrorKind::InvalidInput);
            assert!(m.contains(hint), "{m}");
        }
        let Failure(_, m) = configure_at(&config(), "a/b", &r).unwrap_err();
        assert!(m.contains("interface"), "{m}");
        assert!(!r.exists());
    }

    /// A real interface in a network namespace of its own (needs root and /dev/net/tun):
    /// configured twice, as after a restore, then read back through the kernel.
    #[test]
    fn configures_a_real_interface_twice() {
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread's network namespace.
            check(unsafe { libc::unshare(libc::CLONE_NEWNET) }).unwrap();
            let tun = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap();
            // SAFETY: ifreq is plain data for which all zeroes is valid.
            let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in r.ifr_name.iter_mut().zip(b"eth0") {
                *d = *s as libc::c_char;
            }
            r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
            // SAFETY: TUNSETIFF reads the ifreq `r`, which outlives the call.
            check(unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &r) }).unwrap();

            let resolv =
                std::env::temp_dir().join(format!("moat-agent-resolv-{}", std::process::id()));
            configure_at(&config(), "eth0", &resolv).unwrap();
            configure_at(&config(), "eth0", &resolv).unwrap();
            assert_eq!(
                fs::read_to_string(&resolv).unwrap(),
                "nameserver 100.127.255.1\n"
            );
            fs::remove_file(&resolv).unwrap();

            let sock = socket().unwrap();
            // SAFETY: ifreq is plain data for which all zeroes is valid.
            let mut q: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in q.ifr_name.iter_mut().zip(b"eth0") {
                *d = *s as libc::c_char;
            }
            // SAFETY: the SIOCGIF* ioctls write into the ifreq `q`, which outlives them.
            unsafe {
                check(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFADDR, &mut q)).unwrap();
                let sin =
                    &*(&q.ifr_ifru.ifru_addr as *const libc::sockaddr as *const libc::sockaddr_in);
                assert_eq!(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    Ipv4Addr::new(100, 127, 255, 2)
                );
                check(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut q)).unwrap();
                assert_eq!(q.ifr_ifru.ifru_mtu, 1400);
                check(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut q)).unwrap();
                assert_ne!(q.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short, 0);
            }
            // /proc/thread-self/net is this thread's namespace: the default route via .1
            // (0x01FF7F64 in the kernel's little-endian hex).
            let routes = fs::read_to_string("/proc/thread-self/net/route").unwrap();
            assert!(
                routes.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 2 && f[0] == "eth0" && f[1] == "00000000" && f[2] == "01FF7F64"
                }),
                "{routes}"
            );
            let v6 = fs::read_to_string("/proc/sys/net/ipv6/conf/eth0/disable_ipv6");
            if let Ok(v) = v6 {
                assert_eq!(v.trim(), "1");
            }
        })
        .join()
        .unwrap();
    }
}
