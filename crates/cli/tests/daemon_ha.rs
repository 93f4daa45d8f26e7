//! High availability of the store: a daemon on a replicated PostgreSQL managed by Patroni
//! (three etcd members and three PostgreSQL members on loopback, scripts/patroni.sh), given
//! every member in one `--store` URL with `target_session_attrs=read-write`. `kill -9` of the
//! primary's postmaster makes Patroni promote the synchronous standby; the daemon, without a
//! restart, answers 503 `unavailable` until then and reaches the new primary by itself; every
//! write it had acknowledged is still there and new ones work. Twice by default (the old
//! primary rejoins as a standby in between), `MOAT_HA_FAILOVERS=N` times for a measurement.
//! The time from the kill to the first write the daemon accepts is printed (docs/FLEET.md
//! quotes it). No VM: groups, API keys and secrets are all store writes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, ADMIN, G};
use common::python::{run, text};
use serde_json::json;

/// How long the daemon may take to accept writes again after the kill: Patroni notices the
/// crash within its loop (1 s here) and promotes in a few more; the rest is slack for a busy
/// machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(60);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/patroni.sh")
}

/// One PostgreSQL member as `patroni.sh status` reports it (from Patroni's REST API).
#[derive(Debug, Clone)]
struct Member {
    name: String,
    /// primary, sync (the synchronous standby), replica or down.
    role: String,
    /// Its postmaster's pid, when one runs.
    pid: Option<i32>,
}

/// The etcd and Patroni cluster in a temporary directory; every process of it is stopped on
/// drop, also when the test fails half-way (even inside `start`).
struct Cluster {
    dir: tempfile::TempDir,
    url: String,
}

impl Cluster {
    fn start() -> Cluster {
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            url: String::new(),
        };
        let o = c.script("start", Duration::from_secs(240));
        assert!(o.status.success(), "patroni.sh start:\n{}", text(&o));
        c.url = String::from_utf8(o.stdout).unwrap().trim().to_string();
        c
    }

    fn script(&self, what: &str, limit: Duration) -> std::process::Output {
        let mut cmd = Command::new(script());
        cmd.args([what, &self.dir.path().display().to_string()]);
        run(cmd, &format!("patroni.sh {what}"), limit)
    }

    fn members(&self) -> Vec<Member> {
        let o = self.script("status", Duration::from_secs(60));
        assert!(o.status.success(), "patroni.sh status:\n{}", text(&o));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f.len(), 5, "a status line: {l}");
                Member {
                    name: f[0].to_string(),
                    role: f[1].to_string(),
                    pid: f[4].parse().ok(),
                }
            })
            .collect()
    }

    /// Polls Patroni's REST API (every 200 ms, at most `limit`) until `ok` holds for the
    /// members.
    fn wait(&self, what: &str, limit: Duration, ok: impl Fn(&[Member]) -> bool) -> Vec<Member> {
        let deadline = Instant::now() + limit;
        loop {
            let m = self.members();
            if ok(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {limit:?}: {m:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One primary, a synchronous standby, every other member a running replica: a commit is
    /// on two members, and a failover is possible.
    fn settled(&self) -> Vec<Member> {
        self.wait("settled cluster", Duration::from_secs(120), |m| {
            let count = |r: &str| m.iter().filter(|x| x.role == r).count();
            count("primary") == 1 && count("sync") >= 1 && count("down") == 0
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let o = self.script("stop", Duration::from_secs(60));
        if !o.status.success() {
            eprintln!("patroni.sh stop:\n{}", text(&o));
        }
    }
}

/// What one failover looked like from the daemon's side.
struct Failover {
    /// From the kill to the first write the daemon accepted.
    write_after: Duration,
    /// From the kill to the first read (a GET with a user key) it answered.
    read_after: Duration,
    /// 503 answers before those.
    writes_refused: u32,
    reads_refused: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_follows_a_patroni_failover_by_itself() {
    let rounds: u32 = std::env::var("MOAT_HA_FAILOVERS").map_or(2, |v| {
        v.parse().ok().filter(|n| *n >= 1).unwrap_or_else(|| {
            panic!("MOAT_HA_FAILOVERS={v}: give a number of failovers, 1 or more")
        })
    });
    let started = Instant::now();
    let cluster = Cluster::start();
    assert!(
        cluster.url.contains(',') && cluster.url.contains("target_session_attrs=read-write"),
        "every member in one URL: {}",
        cluster.url
    );
    eprintln!("cluster up after {:?}: {}", started.elapsed(), cluster.url);
    let d = Daemon::start_on_store(&cluster.url, Some(ADMIN)).await;
    let daemon_pid = d.pid().unwrap();

    let mut written: Vec<(String, String)> = Vec::new(); // (group, a key of that group)
    let mut failovers = Vec::new();
    for round in 0..rounds {
        // Acknowledged writes of each kind the store keeps: a group, an API key, a secret.
        let group = format!("before-{round}");
        d.put_group(&group, json!({}), 201).await;
        let key = d.key("user", &[&group]).await;
        let (st, v) = d
            .call(
                Some(ADMIN),
                "PUT",
                &format!("{G}/{group}/secrets/token"),
                Some(json!({"value": format!("s3cret-{round}")})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        written.push((group.clone(), key.clone()));

        let members = cluster.settled();
        let old = members
            .iter()
            .find(|m| m.role == "primary")
            .unwrap()
            .clone();
        let pid = old.pid.expect("the primary's postmaster runs");

        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let f = ride_out(&d, &format!("after-{round}"), &key, &group, killed).await;
        eprintln!(
            "failover {}: {} killed; the daemon wrote again after {} ms and read after {} ms \
             ({} writes and {} reads answered 503 before; /healthz 200 throughout)",
            round + 1,
            old.name,
            f.write_after.as_millis(),
            f.read_after.as_millis(),
            f.writes_refused,
            f.reads_refused
        );
        failovers.push(f.write_after);

        // Patroni's REST API agrees that another member leads now.
        let members = cluster.members();
        let new = members.iter().find(|m| m.role == "primary");
        assert!(
            new.is_some_and(|m| m.name != old.name),
            "the daemon wrote, but the primary is not another member than {}: {members:?}",
            old.name
        );

        // Every acknowledged write is there, the daemon is the same process, and the keys
        // made before any failover still authenticate.
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon_pid as i32), None).is_ok(),
            "the daemon was not restarted"
        );
        assert_eq!(d.pid(), Some(daemon_pid));
        let (st, v) = d.call(Some(ADMIN), "GET", G, None).await;
        assert_eq!(st, 200, "{v}");
        let names: Vec<&str> = v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        for (i, (group, key)) in written.iter().enumerate() {
            assert!(names.contains(&group.as_str()), "{group} lost: {names:?}");
            assert!(
                names.contains(&format!("after-{i}").as_str()),
                "after-{i}: {names:?}"
            );
            let (st, v) = d
                .call(Some(key), "GET", &format!("{G}/{group}"), None)
                .await;
            assert_eq!(st, 200, "the key of {group}: {v}");
            let (st, v) = d
                .call(Some(ADMIN), "GET", &format!("{G}/{group}/secrets"), None)
                .await;
            assert_eq!(st, 200, "{v}");
            assert_eq!(v["secrets"][0]["name"], "token", "{v}");
        }
        // New writes of every kind work.
        let fresh = format!("fresh-{round}");
        d.put_group(&fresh, json!({}), 201).await;
        d.key("user", &[&fresh]).await;
        let (st, v) = d
            .call(
                Some(ADMIN),
                "PUT",
                &format!("{G}/{fresh}/secrets/token"),
                Some(json!({"value": "v"})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    failovers.sort();
    eprintln!(
        "{} failovers, kill -9 of the primary to the first accepted write: min {} ms, median \
         {} ms, max {} ms; the whole test took {:?}",
        failovers.len(),
        failovers[0].as_millis(),
        failovers[failovers.len() / 2].as_millis(),
        failovers[failovers.len() - 1].as_millis(),
        started.elapsed()
    );
}

/// Writes (a group), reads (a group, with a user key) and asks `/healthz` every 50 ms from
/// the kill on, until the daemon has accepted a write and answered a read. Until then the
/// store's requests must get 503 `unavailable` (retry), nothing else; `/healthz`, which does
/// not touch the store, 200 throughout (what a liveness probe sees).
async fn ride_out(d: &Daemon, write: &str, key: &str, group: &str, killed: Instant) -> Failover {
    let (mut write_after, mut read_after) = (None, None);
    let (mut writes_refused, mut reads_refused) = (0, 0);
    loop {
        if write_after.is_none() {
            let (st, v) = d
                .call(Some(ADMIN), "PUT", &format!("{G}/{write}"), Some(json!({})))
                .await;
            match st {
                // 200: an attempt answered 503 had committed (the connection broke after the
                // standby confirmed the commit, before the answer came back).
                200 | 201 => write_after = Some(killed.elapsed()),
                503 => {
                    assert_eq!(v["error"]["code"], "unavailable", "{v}");
                    writes_refused += 1;
                }
                _ => panic!("a write during the failover: {st} {v}"),
            }
        }
        if read_after.is_none() {
            let (st, v) = d
                .call(Some(key), "GET", &format!("{G}/{group}"), None)
                .await;
            match st {
                200 => read_after = Some(killed.elapsed()),
                503 => {
                    assert_eq!(v["error"]["code"], "unavailable", "{v}");
                    reads_refused += 1;
                }
                _ => panic!("a read during the failover: {st} {v}"),
            }
        }
        let (st, v) = d.call(None, "GET", "/healthz", None).await;
        assert_eq!(st, 200, "/healthz during the failover: {v}");
        if let (Some(write_after), Some(read_after)) = (write_after, read_after) {
            return Failover {
                write_after,
                read_after,
                writes_refused,
                reads_refused,
            };
        }
        assert!(
            killed.elapsed() < RECOVERY_BOUND,
            "the daemon did not recover within {RECOVERY_BOUND:?} of the kill \
             ({writes_refused} writes, {reads_refused} reads answered 503)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
