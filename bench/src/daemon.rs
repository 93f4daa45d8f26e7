//! The daemon's figures: a `moat serve` on a temporary home that shares the kernel, images,
//! templates and initramfs of `MOAT_HOME` (as the tests do), measured through its HTTP API and
//! torn down (its VMs destroyed) at the end.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub const KEY: &str = "moat_BenchBenchBenchBenchBenchBenchBenchBench123";

pub struct Daemon {
    child: Child,
    _home: tempdir::TempHome,
    url: String,
    http: reqwest::Client,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct TempHome(pub std::path::PathBuf);

    impl Drop for TempHome {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Daemon {
    /// A daemon with `args` added to `moat serve`'s.
    pub async fn start(moat: &Path, home: &Path, agent: &Path, args: &[&str]) -> Result<Daemon> {
        Daemon::start_sealed(moat, home, agent, args, None).await
    }

    /// [`Daemon::start`] with the sealing key `sealing` as its `secrets.key`: another node of
    /// a fleet needs the first one's (docs/FLEET.md).
    pub async fn start_sealed(
        moat: &Path,
        home: &Path,
        agent: &Path,
        args: &[&str],
        sealing: Option<&[u8]>,
    ) -> Result<Daemon> {
        let dir =
            std::env::temp_dir().join(format!("moat-bench-home-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let temp = tempdir::TempHome(dir.clone());
        if let Some(key) = sealing {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join("secrets.key"))?
                .write_all(key)?;
        }
        for name in [
            "kernels",
            "images",
            "templates",
            "initramfs",
            "qemu-version.json",
        ] {
            if home.join(name).exists() {
                std::os::unix::fs::symlink(home.join(name), dir.join(name))?;
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(moat)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            // Eight concurrent creates on a 2-CPU machine need more than the default ratio.
            .args(["--cpu-overcommit", "16"])
            .args(args)
            .env("MOAT_HOME", &dir)
            .env("MOAT_AGENT", agent)
            .env("MOAT_BOOTSTRAP_KEY", KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.log"))?)
            .spawn()
            .context("starting moat serve")?;
        let d = Daemon {
            child,
            _home: temp,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while d
            .http
            .get(format!("{}/healthz", d.url))
            .send()
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("moat serve never answered");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(d)
    }

    /// The daemon's base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The daemon's MOAT_HOME.
    pub fn home(&self) -> &Path {
        &self._home.0
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, v))
    }

    /// A request with a raw body (file transfers): the status and the raw answer.
    pub async fn send_bytes(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>)> {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let resp = self
            .http
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(KEY)
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.to_vec()))
    }

    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (st, v) = self.call(method, path, body).await?;
        if !(200..300).contains(&st) {
            bail!("{method} {path}: {st} {v}");
        }
        Ok(v)
    }

    pub async fn metric(&self, series: &str) -> Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0))
    }

    async fn pool_ready(&self, group: &str, n: f64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self
            .metric(&format!("moat_pool_ready{{group=\"{group}\"}}"))
            .await?
            != n
        {
            if Instant::now() > deadline {
                bail!("the pool of {group} never reached {n}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// create → first exec of `true`, in ms; returns the sandbox id too.
    pub async fn create_and_exec(&self, group: &str) -> Result<(f64, String)> {
        let t = Instant::now();
        let sb = self
            .ok(
                "POST",
                &format!("/v1/sandbox-groups/{group}/sandboxes"),
                Some(json!({})),
            )
            .await?;
        let id = sb["id"].as_str().context("id")?.to_string();
        self.exec(group, &id).await?;
        Ok((super::ms(t.elapsed()), id))
    }

    /// Like [`Daemon::create_and_exec`], but a 429 (the host is full) is `Ok(Err(body))`.
    pub async fn try_create_and_exec(
        &self,
        group: &str,
    ) -> Result<std::result::Result<(f64, String), Value>> {
        let t = Instant::now();
        let (st, sb) = self
            .call(
                "POST",
                &format!("/v1/sandbox-groups/{group}/sandboxes"),
                Some(json!({})),
            )
            .await?;
        match st {
            201 | 200 => {}
            429 => return Ok(Err(sb)),
            _ => bail!("create in {group}: {st} {sb}"),
        }
        let id = sb["id"].as_str().context("id")?.to_string();
        self.exec(group, &id).await?;
        Ok(Ok((super::ms(t.elapsed()), id)))
    }

    pub async fn exec(&self, group: &str, id: &str) -> Result<()> {
        let r = self
            .ok(
                "POST",
                &format!("/v1/sandbox-groups/{group}/sandboxes/{id}/exec"),
                Some(json!({"argv": ["true"]})),
            )
            .await?;
        if r["exit_code"] != 0 {
            bail!("exec true: {r}");
        }
        Ok(())
    }

    pub async fn delete(&self, group: &str, id: &str) -> Result<()> {
        self.ok(
            "DELETE",
            &format!("/v1/sandbox-groups/{group}/sandboxes/{id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Destroys every VM of `groups` (deleted with force), then stops the daemon.
    pub async fn stop(mut self, groups: &[&str]) -> Result<()> {
        for g in groups {
            let _ = self
                .call(
                    "DELETE",
                    &format!("/v1/sandbox-groups/{g}?force=true"),
                    None,
                )
                .await;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        Ok(())
    }
}

pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    (v[i] * 100.0).round() / 100.0
}

/// The daemon figures, as JSON fields.
pub async fn measure(
    moat: &Path,
    home: &Path,
    agent: &Path,
    tier: &str,
    rounds: usize,
) -> Result<Value> {
    let d = Daemon::start(moat, home, agent, &[]).await?;
    let result = run(&d, tier, rounds).await;
    d.stop(&["pool", "nopool"]).await?;
    result
}

async fn run(d: &Daemon, tier: &str, rounds: usize) -> Result<Value> {
    d.ok(
        "PUT",
        "/v1/sandbox-groups/pool",
        Some(json!({"tier": tier, "pool": {"size": 2}})),
    )
    .await?;
    d.ok(
        "PUT",
        "/v1/sandbox-groups/nopool",
        Some(json!({"tier": tier})),
    )
    .await?;

    // Miss first (it also builds the template if needed), outside the timings.
    let (_, id) = d.create_and_exec("nopool").await?;
    d.delete("nopool", &id).await?;
    let mut misses = Vec::new();
    for _ in 0..rounds {
        let (t, id) = d.create_and_exec("nopool").await?;
        misses.push(t);
        d.delete("nopool", &id).await?;
    }

    let mut hits = Vec::new();
    for _ in 0..rounds {
        d.pool_ready("pool", 2.0).await?;
        let (t, id) = d.create_and_exec("pool").await?;
        hits.push(t);
        d.delete("pool", &id).await?;
    }
    d.pool_ready("pool", 2.0).await?;
    let refill = Instant::now();
    let (_, id) = d.create_and_exec("pool").await?;
    d.pool_ready("pool", 2.0).await?;
    let refill_ms = super::ms(refill.elapsed());
    d.delete("pool", &id).await?;

    // API exec round trip and suspend/resume, on one sandbox.
    let (_, id) = d.create_and_exec("nopool").await?;
    let mut execs = Vec::new();
    for _ in 0..rounds * 4 {
        let t = Instant::now();
        d.exec("nopool", &id).await?;
        execs.push(super::ms(t.elapsed()));
    }
    let (mut suspends, mut resumes) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        d.ok(
            "POST",
            &format!("/v1/sandbox-groups/nopool/sandboxes/{id}/suspend"),
            None,
        )
        .await?;
        suspends.push(super::ms(t.elapsed()));
        let t = Instant::now();
        d.ok(
            "POST",
            &format!("/v1/sandbox-groups/nopool/sandboxes/{id}/resume"),
            None,
        )
        .await?;
        resumes.push(super::ms(t.elapsed()));
    }
    d.delete("nopool", &id).await?;

    // N creates at once (tier s, so that they fit in memory next to the pool).
    let n = 8;
    d.ok(
        "PUT",
        "/v1/sandbox-groups/nopool",
        Some(json!({"tier": "s"})),
    )
    .await?;
    // Its template first (a cold boot if it is missing), outside the timing.
    let (_, id) = d.create_and_exec("nopool").await?;
    d.delete("nopool", &id).await?;
    let t = Instant::now();
    let made = futures_util::future::join_all((0..n).map(|_| d.create_and_exec("nopool"))).await;
    let total = super::ms(t.elapsed());
    let mut each = Vec::new();
    for m in made {
        let (t, id) = m?;
        each.push(t);
        d.delete("nopool", &id).await?;
    }

    let hit = super::median(hits);
    let miss = super::median(misses);
    Ok(json!({
        "daemon_create_to_first_exec_pool_hit_ms": hit,
        "daemon_create_to_first_exec_pool_miss_ms": miss,
        "daemon_pool_refill_ms": refill_ms,
        "daemon_exec_round_trip_ms": super::median(execs),
        "daemon_suspend_ms": super::median(suspends),
        "daemon_resume_ms": super::median(resumes),
        "daemon_concurrent_creates": n,
        "daemon_concurrent_tier": "s",
        "daemon_concurrent_total_ms": total,
        "daemon_concurrent_p50_ms": percentile(&each, 0.5),
        "daemon_concurrent_p95_ms": percentile(&each, 0.95),
        "pool_miss_over_hit": (miss / hit * 10.0).round() / 10.0,
    }))
}
