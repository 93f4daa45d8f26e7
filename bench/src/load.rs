//! The load run (`moat-bench load [SECONDS] [CLIENTS]`): many clients at once against one
//! daemon for a bounded time, each doing creates (with a first exec and a delete), execs, file
//! uploads with their download, and interactive shells over the WebSocket, chosen at random.
//! It reports throughput, p50/p99 and errors per kind of operation as JSON (a create is
//! create, exec and delete; a transfer is upload, download and delete), and what was lost: an
//! exec that did not print what it was asked to, a download that is not its upload, a shell
//! that did not echo its marker. At the end the daemon must have exactly the sandboxes it was
//! left with, each answering, and one QEMU each (else the run fails).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::daemon::{percentile, Daemon, KEY};

const GROUP: &str = "load";
/// The sandboxes the execs, transfers and shells share (creates make and delete their own).
const SHARED: usize = 4;
/// How an error that lost data (an answer that is not what was sent or asked for) begins.
const LOST: &str = "lost";
/// Bytes of each upload.
const FILE: usize = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Create,
    Exec,
    Transfer,
    Shell,
}

/// Out of 20 requests: 1 create, 9 execs, 6 transfers, 4 shells.
fn kind(roll: u32) -> Kind {
    match roll {
        0 => Kind::Create,
        1..=9 => Kind::Exec,
        10..=15 => Kind::Transfer,
        _ => Kind::Shell,
    }
}

#[derive(Default)]
struct Tally {
    ms: Vec<f64>,
    errors: BTreeMap<String, usize>,
}

pub async fn measure(
    moat: &Path,
    home: &Path,
    agent: &Path,
    seconds: u64,
    clients: usize,
) -> Result<Value> {
    let d = Arc::new(Daemon::start(moat, home, agent, &[]).await?);
    let result = run(&d, seconds, clients).await;
    Arc::into_inner(d)
        .context("a client still holds the daemon")?
        .stop(&[GROUP])
        .await?;
    result
}

async fn run(d: &Arc<Daemon>, seconds: u64, clients: usize) -> Result<Value> {
    d.ok(
        "PUT",
        &format!("/v1/sandbox-groups/{GROUP}"),
        Some(json!({"tier": "xs"})),
    )
    .await?;
    // The template first (built if missing), outside the figures.
    let mut shared = Vec::new();
    for _ in 0..SHARED {
        shared.push(d.create_and_exec(GROUP).await?.1);
    }
    let shared = Arc::new(shared);
    let tallies: Arc<Mutex<BTreeMap<Kind, Tally>>> = Arc::default();
    let seed: u64 = std::env::var("MOAT_LOAD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (d, shared, tallies) = (d.clone(), shared.clone(), tallies.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ c as u64);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let k = kind(rng.gen_range(0..20));
                    let id = &shared[rng.gen_range(0..shared.len())];
                    let tag = format!("c{c}-{n}");
                    let t = Instant::now();
                    let r = match k {
                        Kind::Create => create(&d).await,
                        Kind::Exec => exec(&d, id, &tag).await,
                        Kind::Transfer => transfer(&d, id, &tag, &mut rng).await,
                        Kind::Shell => shell(&d, id, &tag).await,
                    };
                    let ms = crate::ms(t.elapsed());
                    let mut all = tallies.lock().await;
                    let tally = all.entry(k).or_default();
                    match r {
                        Ok(()) => tally.ms.push(ms),
                        Err(e) => *tally.errors.entry(e.to_string()).or_default() += 1,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Nothing lost: the shared sandboxes, and only they, are there, each answering, with one
    // QEMU each.
    let list = d
        .ok(
            "GET",
            &format!("/v1/sandbox-groups/{GROUP}/sandboxes"),
            None,
        )
        .await?;
    let mut listed: Vec<String> = list["sandboxes"]
        .as_array()
        .context("sandboxes")?
        .iter()
        .map(|s| s["id"].as_str().unwrap_or_default().to_string())
        .collect();
    listed.sort();
    let mut want = shared.to_vec();
    want.sort();
    if listed != want {
        bail!("after the load the daemon has {listed:?}, not {want:?}");
    }
    for id in shared.iter() {
        exec(d, id, "after").await?;
    }
    let qemus = qemu_count(d.home());
    if qemus != SHARED {
        bail!("{qemus} QEMUs after the load, not {SHARED}");
    }

    let all = tallies.lock().await;
    let mut by_kind = serde_json::Map::new();
    let (mut ok, mut errors, mut lost) = (0, 0, 0);
    for (k, t) in all.iter() {
        let failed: usize = t.errors.values().sum();
        lost += t
            .errors
            .iter()
            .filter(|(e, _)| e.starts_with(LOST))
            .map(|(_, n)| n)
            .sum::<usize>();
        ok += t.ms.len();
        errors += failed;
        by_kind.insert(
            format!("{k:?}").to_lowercase(),
            json!({
                "ok": t.ms.len(),
                "errors": failed,
                "error_messages": t.errors,
                "per_s": (t.ms.len() as f64 / elapsed * 100.0).round() / 100.0,
                "p50_ms": if t.ms.is_empty() { 0.0 } else { percentile(&t.ms, 0.5) },
                "p99_ms": if t.ms.is_empty() { 0.0 } else { percentile(&t.ms, 0.99) },
            }),
        );
    }
    Ok(json!({
        "load_seed": seed,
        "load_clients": clients,
        "load_seconds": (elapsed * 10.0).round() / 10.0,
        "load_tier": "xs",
        "load_shared_sandboxes": SHARED,
        "load_file_bytes": FILE,
        "load_operations_ok": ok,
        "load_errors": errors,
        "load_per_s": (ok as f64 / elapsed * 100.0).round() / 100.0,
        "load_lost": lost,
        "load_by_kind": by_kind,
    }))
}

/// A sandbox of its own: create, first exec, delete.
async fn create(d: &Daemon) -> Result<()> {
    let (_, id) = d.create_and_exec(GROUP).await?;
    d.delete(GROUP, &id).await
}

/// An exec that must print its tag back.
async fn exec(d: &Daemon, id: &str, tag: &str) -> Result<()> {
    let r = d
        .ok(
            "POST",
            &format!("/v1/sandbox-groups/{GROUP}/sandboxes/{id}/exec"),
            Some(json!({"argv": ["echo", tag]})),
        )
        .await?;
    if r["exit_code"] != 0 || r["stdout"] != format!("{tag}\n") {
        bail!("{LOST} an exec's output: {r}");
    }
    Ok(())
}

/// An upload of random bytes, its download (which must be the same bytes) and its removal.
async fn transfer(d: &Daemon, id: &str, tag: &str, rng: &mut impl Rng) -> Result<()> {
    let mut data = vec![0u8; FILE];
    rng.fill(&mut data[..]);
    let path = format!("/v1/sandbox-groups/{GROUP}/sandboxes/{id}/files?path=/tmp/load-{tag}");
    let st = d.send_bytes("PUT", &path, data.clone()).await?.0;
    if st != 201 {
        bail!("upload: {st}");
    }
    let (st, got) = d.send_bytes("GET", &path, Vec::new()).await?;
    if st != 200 || got != data {
        bail!(
            "download: {st}, {} bytes, not the {FILE} uploaded",
            got.len()
        );
    }
    let (st, _) = d.send_bytes("DELETE", &path, Vec::new()).await?;
    if st != 204 {
        bail!("file delete: {st}");
    }
    Ok(())
}

/// A shell over the WebSocket: a command that prints a marker, then `exit`; the marker must
/// come back and the exit code be 0.
async fn shell(d: &Daemon, id: &str, tag: &str) -> Result<()> {
    let url = format!(
        "{}/v1/sandbox-groups/{GROUP}/sandboxes/{id}/shell?cols=80&rows=24",
        d.url().replacen("http", "ws", 1)
    );
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {KEY}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    // `m""ark` so that the terminal's echo of the line does not match.
    let line = format!("echo m\"\"ark-{tag}; exit\n");
    ws.send(Message::Binary(line.into_bytes().into())).await?;
    let want = format!("mark-{tag}\r\n");
    let mut out = String::new();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let m = tokio::time::timeout_at(until.into(), ws.next())
            .await
            .context("the shell did not finish within 60 s")?;
        match m {
            Some(Ok(Message::Binary(b))) => out.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] != "exit" || v["exit_code"] != 0 {
                    bail!("shell ended with {v}");
                }
                if !out.contains(&want) {
                    bail!("{LOST} a shell's output: {out:?}");
                }
                return Ok(());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("shell: {e}"),
            None => bail!("the shell closed without an exit message"),
        }
    }
}

/// QEMU processes whose command line names `home`.
fn qemu_count(home: &Path) -> usize {
    let needle = home.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| c.starts_with("qemu-system") && c.contains(&needle))
        .count()
}
