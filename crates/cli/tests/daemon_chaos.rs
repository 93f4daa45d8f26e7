//! Chaos: `moat serve` is killed with SIGKILL at random points during creates, execs, suspends,
//! resumes, snapshots, forks, deletes, pool refills, image imports, cold creates (template
//! builds) and its own start-up, restarted on the same MOAT_HOME, and after every restart the
//! invariants hold: every QEMU belongs to a running sandbox or the pool's member, with one
//! network stack each; every running sandbox answers; no suspended sandbox or named snapshot is
//! lost; no run, suspend or snapshot directory, half-built image or killed template build is
//! left over; no row is left half-way or failed; no import stays `running`. At the end every
//! suspended sandbox resumes and every snapshot forks. Timing windows adapt: each operation
//! that finishes before its kill sets the window the next kill of its kind is drawn from.
//!
//! The RNG is seeded: the seed is printed and `MOAT_CHAOS_SEED` replays it. The normal test
//! suite runs a few kills (`MOAT_CHAOS_KILLS`, default 10); `scripts/chaos.sh N` runs N.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, ADMIN, G};
use common::unique;
use moat_testkit::Registry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The group the operations work in, and the group whose warm pool (one VM) is refilled.
const C: &str = "chaos";
const P: &str = "chaospool";

/// What the daemon is killed during, with how long it usually takes here (TCG, 2 cores): the
/// kill comes at a uniformly random moment within that time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Create,
    Exec,
    Suspend,
    Resume,
    Snapshot,
    Fork,
    Delete,
    PoolRefill,
    Import,
    /// A create from a newly imported image: its template is built (a cold boot) first.
    ColdCreate,
    /// The daemon's own start-up: adopting the VMs, recovering rows, refilling the pool.
    Restart,
}

const OPS: [Op; 11] = [
    Op::Create,
    Op::Exec,
    Op::Suspend,
    Op::Resume,
    Op::Snapshot,
    Op::Fork,
    Op::Delete,
    Op::PoolRefill,
    Op::Import,
    Op::ColdCreate,
    Op::Restart,
];

impl Op {
    /// A first guess at how long the operation takes here (TCG, 2 cores); each one that
    /// finishes before its kill corrects it.
    fn guess(self) -> Duration {
        Duration::from_millis(match self {
            Op::Exec | Op::Restart => 300,
            Op::Delete | Op::Create | Op::PoolRefill | Op::Resume => 1000,
            Op::Import | Op::Suspend | Op::Snapshot | Op::Fork => 3000,
            Op::ColdCreate => 8000,
        })
    }
}

/// One request that may fail because the daemon is killed under it.
async fn try_call(
    url: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Option<(u16, Value)> {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new()
        .request(m, format!("{url}{path}"))
        .bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.ok()?;
    let st = resp.status().as_u16();
    let body = resp.bytes().await.ok()?;
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Some((st, v))
}

/// The operation under fire: one request (`method` an HTTP method); `POOL`, a create in the
/// pool group and then the refill it starts, until the pool is full again; `POLL`, polls of
/// an import's operation (the import runs in the daemon) until it ends. The answer's status,
/// if it came.
async fn under_fire(url: String, method: &str, path: String, body: Option<Value>) -> Option<u16> {
    if method == "POOL" {
        let (st, _) = try_call(&url, "POST", &path, body).await?;
        let series = format!("moat_pool_ready{{group=\"{P}\"}} 1");
        loop {
            let (_, m) = try_call(&url, "GET", "/metrics", None).await?;
            if m.as_str().is_some_and(|m| m.lines().any(|l| l == series)) {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if method != "POLL" {
        return try_call(&url, method, &path, body).await.map(|a| a.0);
    }
    loop {
        let (st, op) = try_call(&url, "GET", &path, None).await?;
        if op["state"] != "running" {
            return Some(st);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Imports a new image (not under fire) and waits for it: its name.
async fn imported(d: &Daemon, reg: &Registry, w: &mut World) -> String {
    let reference = common::push_image(reg, "chaos", &unique("chaos").to_lowercase())
        .await
        .0;
    let name = unique("chaos-img").to_lowercase();
    let (st, o) = d
        .call(
            Some(ADMIN),
            "POST",
            "/v1/images",
            Some(json!({"source": reference, "name": name, "plain_http": true})),
        )
        .await;
    assert_eq!(st, 202, "{o}");
    let op = o["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, o) = d
            .call(Some(ADMIN), "GET", &format!("/v1/operations/{op}"), None)
            .await;
        if o["state"] == "succeeded" {
            break;
        }
        assert_eq!(o["state"], "running", "{o}");
        assert!(Instant::now() < deadline, "import stuck: {o}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.imports.push((op, name.clone()));
    name
}

/// A `.tmp-` template build nobody is running (its key's lock is free).
fn dead_template_builds(home: &Path) -> Vec<String> {
    let root = home.join("templates");
    entries(&root)
        .into_iter()
        .filter(|n| {
            let Some(key) = n.strip_prefix(".tmp-").and_then(|k| k.get(..64)) else {
                return false;
            };
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(root.join(format!("{key}.lock")))
                .unwrap();
            lock.try_lock().is_ok()
        })
        .collect()
}

async fn rows(d: &Daemon, group: &str) -> Vec<Value> {
    let (st, l) = d
        .call(Some(ADMIN), "GET", &format!("{G}/{group}/sandboxes"), None)
        .await;
    assert_eq!(st, 200, "{l}");
    l["sandboxes"].as_array().unwrap().clone()
}

fn ids_in(rows: &[Value], state: &str) -> BTreeSet<String> {
    rows.iter()
        .filter(|r| r["state"] == state)
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

async fn snapshots(d: &Daemon) -> BTreeSet<String> {
    let (st, l) = d
        .call(Some(ADMIN), "GET", &format!("{G}/{C}/snapshots"), None)
        .await;
    assert_eq!(st, 200, "{l}");
    l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// The sandbox ids of the daemon's QEMUs (from the run directory their command line names).
fn qemu_ids(home: &Path) -> BTreeMap<String, u32> {
    let run = format!("{}/run/", home.display());
    let mut found = BTreeMap::new();
    for pid in common::qemu_processes(&run) {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).into_owned();
        let id = cmd.split(&run).nth(1).unwrap().split('/').next().unwrap();
        found.insert(id.to_string(), pid);
    }
    found
}

/// The sandbox ids of the network stacks (`moat net-stack`) whose log, their stderr, is in
/// one of the daemon's run directories.
fn net_stack_ids(home: &Path) -> BTreeSet<String> {
    let run = format!("{}/run/", home.display());
    let mut found = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd).contains("\0net-stack\0") {
            continue;
        }
        let Ok(log) = std::fs::read_link(e.path().join("fd/2")) else {
            continue;
        };
        if let Some(rest) = log.to_string_lossy().strip_prefix(&run) {
            found.insert(rest.split('/').next().unwrap().to_string());
        }
    }
    found
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// What must survive every kill: the suspended sandboxes and named snapshots that existed
/// before the operation (less the one it may have resumed or deleted).
#[derive(Default)]
struct World {
    suspended: BTreeSet<String>,
    snapshots: BTreeSet<String>,
    imports: Vec<(String, String)>,
}

/// Waits until the pool group has its VM again (a refill may be under way after a restart).
async fn pool_settles(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let series = format!("moat_pool_ready{{group=\"{P}\"}}");
    while d.metric(&series).await.unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "the pool never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The invariants after a restart; updates `w` to what exists now.
async fn check(d: &Daemon, w: &mut World, spared: Option<&str>) {
    pool_settles(d).await;
    let home = d.home.path();
    let mut all = rows(d, C).await;
    all.extend(rows(d, P).await);
    for r in &all {
        let st = r["state"].as_str().unwrap();
        assert!(
            st == "running" || st == "suspended",
            "a sandbox left {st} after a restart: {r}"
        );
    }
    let running = ids_in(&all, "running");
    let suspended = ids_in(&all, "suspended");
    let known: BTreeSet<String> = all
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();

    // No leaked QEMU: one per running sandbox, plus the pool's one VM, which no row names.
    let qemus = qemu_ids(home);
    let vms: BTreeSet<String> = qemus.keys().cloned().collect();
    let missing: Vec<_> = running.difference(&vms).collect();
    assert!(missing.is_empty(), "running without a QEMU: {missing:?}");
    let extra: Vec<_> = vms.difference(&running).cloned().collect();
    assert_eq!(
        extra.len(),
        1,
        "QEMUs beyond the running sandboxes: {extra:?}"
    );
    assert!(!known.contains(&extra[0]), "a {} row has a QEMU", extra[0]);
    // A network stack per VM (one whose QEMU died ends by itself, soon).
    let deadline = Instant::now() + Duration::from_secs(10);
    while net_stack_ids(home) != vms {
        assert!(
            Instant::now() < deadline,
            "network stacks {:?} against the QEMUs {vms:?}",
            net_stack_ids(home)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No orphan files: a run directory per VM; suspend directories only of known sandboxes,
    // each holding only complete suspends; snapshot directories only of listed snapshots.
    assert_eq!(entries(&home.join("run")), vms, "run/ against the QEMUs");
    for id in entries(&home.join("suspended")) {
        assert!(known.contains(&id), "suspended/{id} has no row");
        for n in entries(&home.join("suspended").join(&id)) {
            assert!(n.parse::<u32>().is_ok(), "suspended/{id}/{n} is a leftover");
        }
    }
    for id in &suspended {
        assert!(
            !entries(&home.join("suspended").join(id)).is_empty(),
            "suspended {id} has no suspend directory"
        );
    }
    // Images are built in tmp/ and renamed into place: no import runs after a restart.
    let builds = entries(&home.join("images/tmp"));
    assert!(builds.is_empty(), "half-built images: {builds:?}");
    // Template builds killed half-way are collected (in the background after start).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dead_template_builds(home).is_empty() {
        assert!(
            Instant::now() < deadline,
            "killed template builds left: {:?}",
            dead_template_builds(home)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snaps = snapshots(d).await;
    assert_eq!(
        entries(&home.join("snapshots").join(C)),
        snaps,
        "snapshots/{C} against the list"
    );
    let groups = entries(&home.join("snapshots"));
    assert!(
        groups.iter().all(|g| g == C),
        "a leftover in snapshots/: {groups:?}"
    );
    // Nothing lost.
    for id in &w.suspended {
        if Some(id.as_str()) != spared {
            assert!(suspended.contains(id), "suspended {id} was lost");
        }
    }
    for name in &w.snapshots {
        assert!(snaps.contains(name), "snapshot {name} was lost");
    }
    // Every running sandbox answers.
    for id in &running {
        let group = if rows_group(&all, id) == P { P } else { C };
        assert_eq!(d.sh(group, id, "echo ok").await, "ok", "{id}");
    }
    // No import stays running; one that succeeded has its image.
    for (op, name) in &w.imports {
        let (st, o) = d
            .call(Some(ADMIN), "GET", &format!("/v1/operations/{op}"), None)
            .await;
        assert_eq!(st, 200, "{o}");
        assert_ne!(o["state"], "running", "{o}");
        if o["state"] == "succeeded" {
            let (st, img) = d
                .call(Some(ADMIN), "GET", &format!("/v1/images/{name}"), None)
                .await;
            assert_eq!(st, 200, "{img}");
        }
    }
    w.suspended = suspended;
    w.snapshots = snaps;
}

fn rows_group(all: &[Value], id: &str) -> String {
    all.iter()
        .find(|r| r["id"] == id)
        .map(|r| r["group"].as_str().unwrap().to_string())
        .unwrap()
}

async fn pick(rng: &mut StdRng, d: &Daemon, state: &str) -> Option<String> {
    let ids: Vec<_> = ids_in(&rows(d, C).await, state).into_iter().collect();
    (!ids.is_empty()).then(|| ids[rng.gen_range(0..ids.len())].clone())
}

/// A running sandbox of group C (made if there is none).
async fn running(rng: &mut StdRng, d: &Daemon) -> String {
    match pick(rng, d, "running").await {
        Some(id) => id,
        None => d.new_sandbox(C).await,
    }
}

/// Keeps the machine's load bounded: at most two running and two suspended sandboxes in C,
/// two snapshots, and none in the pool group (made by earlier pool rounds).
async fn trim(d: &Daemon, w: &mut World) {
    let all = rows(d, C).await;
    for state in ["running", "suspended"] {
        for id in ids_in(&all, state).iter().skip(2) {
            d.delete(C, id).await;
            w.suspended.remove(id);
        }
    }
    for id in ids_in(&rows(d, P).await, "running") {
        d.delete(P, &id).await;
    }
    for name in snapshots(d).await.iter().skip(2) {
        let (st, v) = d
            .call(
                Some(ADMIN),
                "DELETE",
                &format!("{G}/{C}/snapshots/{name}"),
                None,
            )
            .await;
        assert_eq!(st, 204, "{v}");
        w.snapshots.remove(name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_survives_kill_9_at_random_points() {
    let seed = std::env::var("MOAT_CHAOS_SEED")
        .map(|s| s.parse::<u64>().expect("MOAT_CHAOS_SEED is a u64"))
        .unwrap_or_else(|_| rand::random());
    let kills: usize = std::env::var("MOAT_CHAOS_KILLS")
        .map(|s| s.parse().expect("MOAT_CHAOS_KILLS is a count"))
        .unwrap_or(10);
    eprintln!("chaos: seed {seed} (replay with MOAT_CHAOS_SEED={seed}), {kills} kills");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    let reg = Registry::start(None);
    d.put_group(C, json!({"tier": "s"}), 201).await;
    d.put_group(P, json!({"tier": "s", "pool": {"size": 1}}), 201)
        .await;
    let mut w = World::default();
    let mut done: BTreeMap<Op, (usize, usize)> = BTreeMap::new();
    let mut took: BTreeMap<Op, Duration> = BTreeMap::new();
    let started = Instant::now();

    for round in 1..=kills {
        let op = OPS[rng.gen_range(0..OPS.len())];
        trim(&d, &mut w).await;
        pool_settles(&d).await;
        // The operation's preconditions, not under fire.
        let url = d.url();
        let mut spared = None;
        let (method, path, body) = match op {
            Op::Create => ("POST", format!("{G}/{C}/sandboxes"), Some(json!({}))),
            Op::PoolRefill => ("POOL", format!("{G}/{P}/sandboxes"), Some(json!({}))),
            Op::Exec => {
                let id = running(&mut rng, &d).await;
                (
                    "POST",
                    format!("{G}/{C}/sandboxes/{id}/exec"),
                    Some(json!({"command": "head -c 1000000 /dev/urandom > /root/f; sync"})),
                )
            }
            Op::Suspend => {
                let id = running(&mut rng, &d).await;
                d.sh(C, &id, common::COUNTER).await;
                ("POST", format!("{G}/{C}/sandboxes/{id}/suspend"), None)
            }
            Op::Resume => {
                let id = match pick(&mut rng, &d, "suspended").await {
                    Some(id) => id,
                    None => {
                        let id = running(&mut rng, &d).await;
                        let (st, v, _) = d.lifecycle(C, &id, "suspend").await;
                        assert_eq!(st, 200, "{v}");
                        w.suspended.insert(id.clone());
                        id
                    }
                };
                spared = Some(id.clone());
                ("POST", format!("{G}/{C}/sandboxes/{id}/resume"), None)
            }
            Op::Delete => {
                let state = ["running", "suspended"][rng.gen_range(0..2)];
                let id = match pick(&mut rng, &d, state).await {
                    Some(id) => id,
                    None => running(&mut rng, &d).await,
                };
                spared = Some(id.clone());
                ("DELETE", format!("{G}/{C}/sandboxes/{id}"), None)
            }
            Op::Snapshot => {
                let id = running(&mut rng, &d).await;
                let name = unique("snap").to_lowercase();
                (
                    "POST",
                    format!("{G}/{C}/sandboxes/{id}/snapshots"),
                    Some(json!({ "name": name })),
                )
            }
            Op::Fork => {
                let name = match w.snapshots.iter().next() {
                    Some(n) => n.clone(),
                    None => {
                        let id = running(&mut rng, &d).await;
                        let name = unique("snap").to_lowercase();
                        let (st, v) = d
                            .call(
                                Some(ADMIN),
                                "POST",
                                &format!("{G}/{C}/sandboxes/{id}/snapshots"),
                                Some(json!({ "name": name })),
                            )
                            .await;
                        assert_eq!(st, 201, "{v}");
                        w.snapshots.insert(name.clone());
                        name
                    }
                };
                let count = rng.gen_range(1..=2);
                (
                    "POST",
                    format!("{G}/{C}/sandboxes"),
                    Some(json!({"from_snapshot": name, "count": count})),
                )
            }
            Op::Restart => ("", String::new(), None),
            Op::ColdCreate => {
                let name = imported(&d, &reg, &mut w).await;
                (
                    "POST",
                    format!("{G}/{C}/sandboxes"),
                    Some(json!({ "image": name })),
                )
            }
            Op::Import => {
                let marker = unique("chaos").to_lowercase();
                let reference = common::push_image(&reg, "chaos", &marker).await.0;
                let name = unique("chaos-img").to_lowercase();
                let (st, o) = d
                    .call(
                        Some(ADMIN),
                        "POST",
                        "/v1/images",
                        Some(json!({"source": reference, "name": name, "plain_http": true})),
                    )
                    .await;
                assert_eq!(st, 202, "{o}");
                w.imports
                    .push((o["id"].as_str().unwrap().to_string(), name));
                (
                    "POLL",
                    format!("/v1/operations/{}", o["id"].as_str().unwrap()),
                    None,
                )
            }
        };
        let window = *took.entry(op).or_insert_with(|| op.guess());
        let delay = window.mul_f64(rng.gen_range(0.0..1.0));
        let t = Instant::now();
        let (finished, answer) = if op == Op::Restart {
            // Killed while it starts: before, during or after it adopts and recovers.
            d.kill9();
            let (mut c, _) = d.command(Some(ADMIN));
            let t = Instant::now();
            let mut child = c.spawn().expect("moat serve starts");
            let ready = async {
                while try_call(&url, "GET", "/healthz", None).await.is_none() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                t.elapsed()
            };
            let finished = tokio::time::timeout(delay, ready).await;
            child.kill().unwrap();
            child.wait().unwrap();
            if let Ok(elapsed) = finished {
                took.insert(op, elapsed);
            }
            (finished.is_ok(), None)
        } else {
            let task = tokio::spawn(async move {
                let answer = under_fire(url, method, path, body).await;
                (answer, t.elapsed())
            });
            tokio::time::sleep(delay).await;
            let finished = task.is_finished();
            d.kill9();
            let (answer, elapsed) = task.await.unwrap();
            if finished {
                took.insert(op, elapsed);
            }
            (finished, answer)
        };
        let restart = Instant::now();
        d.spawn(Some(ADMIN)).await;
        eprintln!(
            "chaos round {round}: kill -9 {:?} after {:?} during {op:?} (finished first: \
             {finished}, answer {answer:?}); restarted in {:?}",
            delay,
            t.elapsed(),
            restart.elapsed()
        );
        check(&d, &mut w, spared.as_deref()).await;
        let e = done.entry(op).or_default();
        e.0 += 1;
        e.1 += usize::from(!finished);
    }

    // Everything kept is still usable: every suspended sandbox resumes, every snapshot forks.
    for id in w.suspended.clone() {
        let (st, v, _) = d.lifecycle(C, &id, "resume").await;
        assert_eq!(st, 200, "resuming {id} after the kills: {v}");
        assert_eq!(d.sh(C, &id, "echo ok").await, "ok");
        d.delete(C, &id).await;
    }
    for name in w.snapshots.clone() {
        let fork = d.create(ADMIN, C, json!({ "from_snapshot": name })).await;
        let id = fork["id"].as_str().unwrap();
        assert_eq!(d.sh(C, id, "echo ok").await, "ok");
        d.delete(C, id).await;
    }
    // Images are kept by the sandboxes and snapshots made from them.
    for id in ids_in(&rows(&d, C).await, "running") {
        d.delete(C, &id).await;
    }
    for name in &w.snapshots {
        let path = format!("{G}/{C}/snapshots/{name}");
        let (st, v) = d.call(Some(ADMIN), "DELETE", &path, None).await;
        assert_eq!(st, 204, "{v}");
    }
    for (_, name) in &w.imports {
        // An interrupted import may have left no name: only the ones there are removed.
        let (st, v) = d
            .call(Some(ADMIN), "DELETE", &format!("/v1/images/{name}"), None)
            .await;
        assert!(st == 204 || st == 404, "{st} {v}");
    }
    let summary = json!({
        "seed": seed,
        "kills_survived": kills,
        "seconds": started.elapsed().as_secs(),
        "by_operation": done
            .iter()
            .map(|(op, (n, mid))| (format!("{op:?}"), json!({"kills": n, "mid_operation": mid})))
            .collect::<serde_json::Map<_, _>>(),
    });
    println!("CHAOS {summary}");
}

/// A daemon killed after a suspend renamed its new directory into place but before it removed
/// the older ones (the previous resume's backing disk, a whole disk image) left them for good:
/// the next start keeps only the newest directory of each sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_only_the_newest_suspend_directory() {
    let mut d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group(C, json!({"tier": "s"}), 201).await;
    let id = d.new_sandbox(C).await;
    d.sh(C, &id, "echo kept > /root/f").await;
    let (st, v, _) = d.lifecycle(C, &id, "suspend").await;
    assert_eq!(st, 200, "{v}");
    let root = d.home.path().join("suspended").join(&id);
    let newest = entries(&root);
    assert_eq!(newest.len(), 1, "{newest:?}");
    // The older directory as a resume leaves it: its disk, no memory image.
    let old = root.join("0");
    std::fs::create_dir(&old).unwrap();
    for f in ["meta.json", "disk.qcow2"] {
        std::fs::copy(root.join(newest.first().unwrap()).join(f), old.join(f)).unwrap();
    }

    d.kill9();
    d.spawn(Some(ADMIN)).await;
    assert_eq!(
        entries(&root),
        newest,
        "an older suspend directory was kept"
    );
    let (st, v, _) = d.lifecycle(C, &id, "resume").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(d.sh(C, &id, "cat /root/f").await, "kept");
}
