//! High availability of the store: daemons on a replicated PostgreSQL managed by Patroni
//! (three etcd members and three PostgreSQL members on loopback, scripts/patroni.sh), given
//! every member in one `--store` URL with `target_session_attrs=read-write`. `kill -9` of the
//! primary's postmaster makes Patroni promote the synchronous standby; each daemon, without a
//! restart, answers 503 `unavailable` until then and reaches the new primary by itself; every
//! write it acknowledged is still there and new ones work. Twice by default (the old primary
//! rejoins as a standby in between), `MOAT_HA_FAILOVERS=N` times for a measurement. The time
//! from the kill to the first write accepted on the new primary is printed (docs/FLEET.md
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
    /// Its Patroni's REST API, http://127.0.0.1:PORT.
    api: String,
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
                    api: f[2].to_string(),
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

/// What one failover looked like from the daemon's side; times are from the kill.
struct Failover {
    /// When Patroni's REST API first named another member primary.
    promoted: Duration,
    /// The first write, and the first read (a GET with a user key), the daemon accepted that
    /// were sent after that.
    write_after: Duration,
    read_after: Duration,
    /// The first and the last write answered 503, and how many were.
    refused: Option<(Duration, Duration)>,
    writes_refused: u32,
    reads_refused: u32,
    /// The groups whose creation the daemon acknowledged during the failover.
    acknowledged: Vec<String>,
}

/// One daemon of the fleet and what it was told it wrote.
struct Node {
    d: Daemon,
    pid: u32,
    /// Groups written before a failover, each with a user key of its own.
    keyed: Vec<(String, String)>,
    /// Groups whose creation it acknowledged during failovers.
    acknowledged: Vec<String>,
}

impl Node {
    /// Acknowledged writes of each kind the store keeps: a group, an API key, a secret.
    async fn write(&mut self, group: &str) -> String {
        let d = &self.d;
        d.put_group(group, json!({}), 201).await;
        let key = d.key("user", &[group]).await;
        let (st, v) = d
            .call(
                Some(ADMIN),
                "PUT",
                &format!("{G}/{group}/secrets/token"),
                Some(json!({"value": format!("s3cret-{group}")})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        key
    }

    /// The same process as before; every acknowledged write is there; keys made before any
    /// failover still authenticate; new writes of every kind work.
    async fn check(&mut self, fresh: &str) {
        let d = &self.d;
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), None).is_ok(),
            "the daemon was not restarted"
        );
        assert_eq!(d.pid(), Some(self.pid));
        let (st, v) = d.call(Some(ADMIN), "GET", G, None).await;
        assert_eq!(st, 200, "{v}");
        let names: Vec<&str> = v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        for name in &self.acknowledged {
            assert!(names.contains(&name.as_str()), "{name} lost: {names:?}");
        }
        for (group, key) in &self.keyed {
            assert!(names.contains(&group.as_str()), "{group} lost: {names:?}");
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
        self.write(fresh).await;
    }
}

/// Two daemons, each in a schema of its own (one store serves one daemon until node mode
/// shares the signing keys: docs/FLEET.md), on the same cluster.
const DAEMONS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_follow_a_patroni_failover_by_themselves() {
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
    let mut nodes = Vec::new();
    for i in 0..DAEMONS {
        let schema = format!("node{i}");
        let url = cluster.url.clone();
        let create = format!("CREATE SCHEMA {schema}");
        // The blocking client must not run on the test's executor thread.
        std::thread::spawn(move || {
            postgres::Client::connect(&url, postgres::NoTls)
                .unwrap()
                .batch_execute(&create)
                .unwrap()
        })
        .join()
        .unwrap();
        let url = format!("{}&options=-csearch_path%3D{schema}", cluster.url);
        let d = Daemon::start_on_store(&url, Some(ADMIN)).await;
        let pid = d.pid().unwrap();
        nodes.push(Node {
            d,
            pid,
            keyed: Vec::new(),
            acknowledged: Vec::new(),
        });
    }

    let mut failovers = Vec::new();
    for round in 0..rounds {
        let group = format!("before-{round}");
        let mut keys = Vec::new();
        for node in &mut nodes {
            let key = node.write(&group).await;
            node.keyed.push((group.clone(), key.clone()));
            keys.push(key);
        }

        let members = cluster.settled();
        let old = members
            .iter()
            .find(|m| m.role == "primary")
            .unwrap()
            .clone();
        let pid = old.pid.expect("the primary's postmaster runs");
        let others: Vec<String> = (members.iter())
            .filter(|m| m.name != old.name)
            .map(|m| m.api.clone())
            .collect();

        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let rides = nodes
            .iter()
            .zip(&keys)
            .map(|(n, key)| ride_out(&n.d, round, key, &group, &others, killed));
        let results = futures_util::future::join_all(rides).await;
        for (i, (node, f)) in nodes.iter_mut().zip(results).enumerate() {
            let window = f.refused.map_or("none".to_string(), |(a, b)| {
                format!("from {} ms to {} ms", a.as_millis(), b.as_millis())
            });
            eprintln!(
                "failover {}, daemon {i}: {} killed; another primary at {} ms (Patroni's REST \
                 API); writes answered 503 {window} ({} writes, {} reads); the daemon wrote \
                 again at {} ms and read at {} ms; {} writes acknowledged meanwhile; /healthz \
                 200 throughout",
                round + 1,
                old.name,
                f.promoted.as_millis(),
                f.writes_refused,
                f.reads_refused,
                f.write_after.as_millis(),
                f.read_after.as_millis(),
                f.acknowledged.len(),
            );
            failovers.push(f.write_after);
            node.acknowledged.extend(f.acknowledged);
        }
        for node in &mut nodes {
            node.check(&format!("fresh-{round}")).await;
        }
    }
    failovers.sort();
    eprintln!(
        "{} failovers seen by {DAEMONS} daemons, kill -9 of the primary to the first write \
         accepted on the new one: min {} ms, median {} ms, max {} ms; the whole test took {:?}",
        failovers.len() / DAEMONS,
        failovers[0].as_millis(),
        failovers[failovers.len() / 2].as_millis(),
        failovers[failovers.len() - 1].as_millis(),
        started.elapsed()
    );
}

/// From the kill on, every 50 ms: creates a group (a new one each time), reads a group with a
/// user key, asks `/healthz`, and asks the other members' Patroni whether one is primary;
/// until the daemon has accepted a write and a read sent after Patroni named another primary.
/// Meanwhile the store's requests get 503 `unavailable` (retry) or succeed, nothing else:
/// writes may still succeed for a moment after the kill, on the old primary's backend, which
/// outlives its postmaster briefly (synchronous replication makes them durable, and the test
/// checks that every acknowledged one survives). `/healthz`, which does not touch the store,
/// answers 200 throughout (what a liveness probe sees).
async fn ride_out(
    d: &Daemon,
    round: u32,
    key: &str,
    group: &str,
    others: &[String],
    killed: Instant,
) -> Failover {
    let patroni = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut promoted: Option<Duration> = None;
    let (mut write_after, mut read_after) = (None, None);
    let mut f = Failover {
        promoted: Duration::ZERO,
        write_after: Duration::ZERO,
        read_after: Duration::ZERO,
        refused: None,
        writes_refused: 0,
        reads_refused: 0,
        acknowledged: Vec::new(),
    };
    for n in 0u64.. {
        let sent = killed.elapsed();
        let after_promotion = promoted.is_some_and(|p| p <= sent);
        let name = format!("during-{round}-{n}");
        let (st, v) = d
            .call(Some(ADMIN), "PUT", &format!("{G}/{name}"), Some(json!({})))
            .await;
        match st {
            201 => {
                f.acknowledged.push(name);
                if after_promotion && write_after.is_none() {
                    write_after = Some(killed.elapsed());
                }
            }
            503 => {
                assert_eq!(v["error"]["code"], "unavailable", "{v}");
                f.writes_refused += 1;
                let first = f.refused.map_or(sent, |(a, _)| a);
                f.refused = Some((first, sent));
            }
            _ => panic!("a write during the failover: {st} {v}"),
        }
        let after_promotion = promoted.is_some_and(|p| p <= killed.elapsed());
        let (st, v) = d
            .call(Some(key), "GET", &format!("{G}/{group}"), None)
            .await;
        match st {
            200 if after_promotion && read_after.is_none() => {
                read_after = Some(killed.elapsed());
            }
            200 => {}
            503 => {
                assert_eq!(v["error"]["code"], "unavailable", "{v}");
                f.reads_refused += 1;
            }
            _ => panic!("a read during the failover: {st} {v}"),
        }
        let (st, v) = d.call(None, "GET", "/healthz", None).await;
        assert_eq!(st, 200, "/healthz during the failover: {v}");
        if promoted.is_none() {
            for api in others {
                let r = patroni.get(format!("{api}/primary")).send().await;
                if r.is_ok_and(|r| r.status() == 200) {
                    promoted = Some(killed.elapsed());
                }
            }
        }
        if let (Some(p), Some(w), Some(r)) = (promoted, write_after, read_after) {
            f.promoted = p;
            f.write_after = w;
            f.read_after = r;
            return f;
        }
        assert!(
            killed.elapsed() < RECOVERY_BOUND,
            "the daemon did not recover within {RECOVERY_BOUND:?} of the kill (another \
             primary: {promoted:?}; {} writes, {} reads answered 503)",
            f.writes_refused,
            f.reads_refused
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!("the loop returns or fails")
}
