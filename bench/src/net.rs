//! `moat-bench-net`: what the sandbox network stack costs, measured with a real Linux guest.
//! A network namespace with a TAP device plays the guest (its frames relayed in QEMU's stream
//! framing, as QEMU would), the stack runs as its own process through `moat_net::run` as the
//! daemon will run it, and a server on the host's loopback is reached by name through the
//! operator hosts file. The same transfers are then done directly on loopback, in the same run.
//! Prints one JSON object. Needs root (`ip netns`).
//!
//! `moat-bench-net --stack` is the child: the stack on fds 3 (guest), 4 (control) and 5
//! (ports).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

const BULK: usize = 512 << 20;
const ROUNDS: usize = 200;

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--stack") {
        // SAFETY: the parent put the guest socket on fd 3, the control listener on fd 4 and the
        // port listener on fd 5 (dup2 in pre_exec) and nothing else owns them.
        let (guest, control, ports) = unsafe {
            (
                OwnedFd::from_raw_fd(3),
                OwnedFd::from_raw_fd(4),
                OwnedFd::from_raw_fd(5),
            )
        };
        moat_net::run(guest, control, ports)?;
        return Ok(());
    }
    let ns = format!("moat-bench-{}", std::process::id());
    let _cleanup = Cleanup(ns.clone());
    sh(&["ip", "netns", "add", &ns])?;
    std::fs::create_dir_all(format!("/etc/netns/{ns}"))?;
    std::fs::write(
        format!("/etc/netns/{ns}/resolv.conf"),
        "nameserver 100.127.255.1\n",
    )?;
    sh(&[
        "ip", "-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap",
    ])?;
    let tap = open_tap(&ns)?;
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    sh(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "100.127.255.2/30",
        "dev",
        "tap0",
    ])?;
    sh(&["ip", "-n", &ns, "link", "set", "tap0", "up"])?;
    sh(&[
        "ip",
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        "100.127.255.1",
    ])?;
    let (ours, theirs) = UnixStream::pair()?;
    relay(tap, ours)?;

    let server = serve()?;
    let dir = tempfile::tempdir()?;
    let control_path = dir.path().join("control.sock");
    let listener = UnixListener::bind(&control_path)?;
    let ports = UnixListener::bind(dir.path().join("ports.sock"))?;
    let mut stack = spawn_stack(theirs, listener, ports)?;
    let control = UnixStream::connect(&control_path)?;
    let mut replies = BufReader::new(control.try_clone()?).lines();
    let hello = replies.next().context("no hello")??;
    ensure!(hello.contains("\"hello\""), "{hello}");
    let start = json!({"v": 1, "type": "start",
        "egress": {"rules": [{"host": "bench.test"}]},
        "hosts": "127.0.0.1 bench.test\n",
        "limits": {"new_flows_per_s": 100000, "dns_qps": 100000, "max_flows": 4096}});
    (&control).write_all(format!("{start}\n").as_bytes())?;
    let ok = replies.next().context("no answer to start")??;
    ensure!(ok.contains("\"ok\""), "{ok}");
    // Audit events are read and thrown away, as a daemon would read and store them.
    std::thread::spawn(move || for _ in replies.by_ref() {});

    let synthetic = resolve(&ns, "bench.test")?;
    let via = SocketAddr::from((synthetic, server.port()));
    let direct = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port()));
    let rss_idle = rss_kib(stack.id())?;

    let dns = in_ns(&ns, move || dns_times("bench.test"))?;
    let stack_connect = in_ns(&ns, move || connect_times(via))?;
    let direct_connect = connect_times(direct)?;
    let stack_down = in_ns(&ns, move || download(via))?;
    let direct_down = download(direct)?;
    let stack_up = in_ns(&ns, move || upload(via))?;
    let direct_up = upload(direct)?;
    let rss_after = rss_kib(stack.id())?;
    let _ = stack.kill();

    let out = json!({
        "network": {
            "download_mb_s": {"stack": stack_down, "direct": direct_down},
            "upload_mb_s": {"stack": stack_up, "direct": direct_up},
            "connect_ms_median": {"stack": stack_connect, "direct": direct_connect,
                                  "added": round2(stack_connect - direct_connect)},
            "dns_answer_ms_median": dns,
            "stack_rss_mib": {"idle": round2(rss_idle as f64 / 1024.0),
                              "after_transfers": round2(rss_after as f64 / 1024.0)},
            "bulk_bytes": BULK,
            "rounds": ROUNDS,
        }
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    round2(v[v.len() / 2])
}

/// Runs `f` on a thread inside the guest namespace.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let nsf = File::open(format!("/run/netns/{ns}"))?;
        nix::sched::setns(nsf, nix::sched::CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("guest thread panicked"))?
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_tap(ns: &str) -> Result<File> {
    in_ns(ns, || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..4].copy_from_slice(b"tap0");
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: `req` is a valid ifreq for TUNSETIFF and outlives the call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
        ensure!(r == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        Ok(f)
    })
}

/// QEMU's part: frames between the tap and the stream framing.
fn relay(tap: File, sock: UnixStream) -> Result<()> {
    let (mut tap_r, mut sock_w) = (tap.try_clone()?, sock.try_clone()?);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536 + 4];
        while let Ok(n) = tap_r.read(&mut buf[4..]) {
            buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
            if n == 0 || sock_w.write_all(&buf[..4 + n]).is_err() {
                break;
            }
        }
    });
    let (mut tap_w, mut sock_r) = (tap, BufReader::with_capacity(1 << 18, sock));
    std::thread::spawn(move || {
        let mut len = [0u8; 4];
        let mut buf = vec![0u8; 65536];
        while sock_r.read_exact(&mut len).is_ok() {
            let n = u32::from_be_bytes(len) as usize;
            if sock_r.read_exact(&mut buf[..n]).is_err() || tap_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    Ok(())
}

fn spawn_stack(guest: UnixStream, control: UnixListener, ports: UnixListener) -> Result<Child> {
    let (g, c, p) = (guest.as_raw_fd(), control.as_raw_fd(), ports.as_raw_fd());
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--stack");
    // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(g, 3) < 0 || libc::dup2(c, 4) < 0 || libc::dup2(p, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}

/// The synthetic address moat's DNS hands out for `name`, through the guest's resolver.
fn resolve(ns: &str, name: &str) -> Result<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "getent", "ahostsv4", name])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(addr) = text.split_whitespace().next() else {
        bail!("{name} did not resolve: {text}")
    };
    Ok(addr.parse()?)
}

/// Test server: `D` → BULK bytes then close; `U` → read to EOF, answer 8 bytes of count;
/// `E` → one byte back.
fn serve() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut cmd = [0u8; 1];
                if s.read_exact(&mut cmd).is_err() {
                    return;
                }
                let buf = vec![0x5au8; 1 << 16];
                match cmd[0] {
                    b'D' => {
                        let mut left = BULK;
                        while left > 0 {
                            let n = left.min(buf.len());
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            left -= n;
                        }
                    }
                    b'U' => {
                        let mut buf = buf;
                        let mut total = 0u64;
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            total += n as u64;
                        }
                        let _ = s.write_all(&total.to_be_bytes());
                    }
                    _ => {
                        let _ = s.write_all(b"e");
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn mb_s(bytes: usize, d: Duration) -> f64 {
    round2(bytes as f64 / d.as_secs_f64() / 1e6)
}

fn download(to: SocketAddr) -> Result<f64> {
    let mut s = TcpStream::connect(to)?;
    let t = Instant::now();
    s.write_all(b"D")?;
    let mut buf = vec![0u8; 1 << 18];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    ensure!(got == BULK, "downloaded {got} of {BULK} bytes");
    Ok(mb_s(got, t.elapsed()))
}

fn upload(to: SocketAddr) -> Result<f64> {
    let mut s = TcpStream::connect(to)?;
    let t = Instant::now();
    s.write_all(b"U")?;
    let buf = vec![0xa5u8; 1 << 18];
    let mut left = BULK;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n])?;
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    ensure!(
        u64::from_be_bytes(count) == BULK as u64,
        "server got {} bytes",
        u64::from_be_bytes(count)
    );
    Ok(mb_s(BULK, t.elapsed()))
}

/// Median time from connect() to the first byte of the answer, in ms.
fn connect_times(to: SocketAddr) -> Result<f64> {
    let mut v = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut s = TcpStream::connect(to)?;
        s.set_nodelay(true)?;
        s.write_all(b"E")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

/// Median DNS answer time from the guest, in ms (A query for an allowed name).
fn dns_times(name: &str) -> Result<f64> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.connect("100.127.255.1:53")?;
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut v = Vec::with_capacity(ROUNDS);
    let mut buf = [0u8; 512];
    for _ in 0..ROUNDS {
        let t = Instant::now();
        sock.send(&q)?;
        let n = sock.recv(&mut buf)?;
        ensure!(
            n > 12 && buf[3] & 0xf == 0,
            "DNS answer rcode {}",
            buf[3] & 0xf
        );
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}
