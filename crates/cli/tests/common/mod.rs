//! Shared fixtures of the end-to-end tests: the moat home they share (kernel, base image and
//! templates are built once per machine by `moat setup`), the runtime, and the `moat` binary.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod daemon;
pub mod fleet;
pub mod node;
pub mod python;

use std::path::{Path, PathBuf};
use std::process::Command;

use moat_image::ImageStore;
use moat_protocol::ExecRequest;
use moat_vm::agent::Output;
use moat_vm::{template, Runtime, Sandbox, Tier};

/// The home the tests share with `scripts/test.sh`, which ran `moat setup` in it.
pub fn home() -> PathBuf {
    let home = std::env::var_os("MOAT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".moat"));
    assert!(
        home.join("kernels").is_dir(),
        "no guest kernel in {}: run scripts/test.sh (or `moat setup`) first",
        home.display()
    );
    home
}

/// Where scripts/build.sh puts the static agent.
pub fn agent_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/x86_64-unknown-linux-gnu/release/moat-agent")
}

/// The static agent built by scripts/build.sh.
pub fn agent() -> PathBuf {
    let p = agent_path();
    assert!(
        p.is_file(),
        "no static agent at {}: run scripts/build.sh",
        p.display()
    );
    p
}

pub fn runtime() -> Runtime {
    Runtime::new(
        &home(),
        &agent(),
        Path::new(env!("CARGO_BIN_EXE_moat")),
        None,
    )
    .expect("runtime")
}

pub fn images() -> ImageStore {
    ImageStore::open(&home().join("images")).expect("image store")
}

/// The `moat` binary under test, pointed at the shared home.
pub fn moat() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
    c.env("MOAT_HOME", home())
        .env("MOAT_AGENT", agent())
        .env_remove("RUST_LOG");
    c
}

/// A name no other test (or concurrent run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Command lines of the QEMU processes whose parent is `ppid`.
pub fn qemu_children(ppid: u32) -> Vec<String> {
    children(ppid)
        .into_iter()
        .map(|(_, cmd)| cmd)
        .filter(|cmd| cmd.starts_with("qemu-system"))
        .collect()
}

/// Pids and command lines (arguments joined by spaces) of the live processes whose parent is
/// `ppid` (a zombie has an empty command line and is left out).
pub fn children(ppid: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok());
        if parent != Some(ppid) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let pid = e.file_name().to_string_lossy().parse::<u32>();
        if let (Ok(pid), false) = (pid, cmd.is_empty()) {
            found.push((pid, cmd));
        }
    }
    found
}

/// QEMU processes whose command line mentions `needle`.
pub fn qemu_processes(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("qemu-system") && cmd.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The PATH of the Debian base image.
pub const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The base image's template at tier m (as `moat run` uses), built on first use.
pub async fn base_template(rt: &Runtime) -> PathBuf {
    let image = images()
        .resolve("base")
        .expect("base image: run `moat setup`");
    template::ensure(rt, &image.digest, &image.rootfs, Tier::M)
        .await
        .expect("template")
        .dir
}

/// A fresh sandbox restored from the base image's template.
pub async fn sandbox(rt: &Runtime) -> Sandbox {
    Sandbox::restore(rt, &unique("test"), &base_template(rt).await)
        .await
        .expect("restore")
}

/// An exec of `argv` with the base image's PATH and nothing else set.
pub fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest::new(argv, &[PATH])
}

/// Runs `sh -c SCRIPT` to completion (at most 1 MiB of each output).
pub async fn sh(sb: &Sandbox, script: &str) -> Output {
    sb.agent()
        .exec_output(req(&["sh", "-c", script]), 1 << 20)
        .await
        .expect("exec")
}

/// A background process that counts in `/run/counter` five times a second (see
/// [`counter`] and `Daemon::counter`): it shows that a sandbox's processes live on.
///
/// Each value is written beside the file and renamed over it: `echo $i > /run/counter` alone
/// truncates first, and a suspend or snapshot taken between the truncation and the write
/// froze an empty file that the first read after the resume found (`counter` then failed).
///
/// The first value (0) is written before the loop starts, so the file is there as soon as the
/// command that started it returns.
pub const COUNTER: &str = "echo 0 > /run/counter; \
     (i=0; while true; do i=$((i+1)); echo $i > /run/counter.new; \
     mv /run/counter.new /run/counter; sleep 0.2; done) > /dev/null 2>&1 &";

/// The value a test's background counter process last wrote to `/run/counter`.
pub async fn counter(sb: &Sandbox) -> u64 {
    String::from_utf8_lossy(&sh(sb, "cat /run/counter").await.stdout)
        .trim()
        .parse()
        .expect("counter")
}

/// Waits until the counter passes `than`: the background process is alive and running.
pub async fn counter_passes(sb: &Sandbox, than: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while counter(sb).await <= than {
        assert!(
            std::time::Instant::now() < deadline,
            "counter stuck at {than}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// An image of its own (a marker layer makes its digest unique) pushed to `reg` as
/// `REPO/MARKER:v1`: its reference and digest.
pub async fn push_image(
    reg: &moat_testkit::Registry,
    repo: &str,
    marker: &str,
) -> (String, String) {
    use moat_testkit::{busybox_layer, test_config, write_oci_layout, LayerBuilder};
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let layers = vec![
        busybox_layer(),
        LayerBuilder::new()
            .file("marker", marker.as_bytes(), 0o644)
            .finish(),
    ];
    write_oci_layout(
        &layout,
        &layers,
        moat_image::Compression::Gzip,
        &test_config(),
        Some("v1"),
    );
    reg.push(&layout, &format!("{repo}/{marker}:v1")).await
}

/// An HTTP server on the host's loopback that answers every request with `body`; its port.
pub fn http_server(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut buf = vec![0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}
