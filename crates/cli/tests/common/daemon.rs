//! The `moat serve` fixture shared by the daemon tests: the real binary on a free loopback port
//! with its own MOAT_HOME. Every JSON response received through [`Daemon::call`] is checked
//! against the daemon's own OpenAPI document.

// Each test binary compiles this module and uses a part of it.
#[allow(unused_imports)]
pub use moat_testkit::openapi::{check_response, validate};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The first admin key of every test daemon.
pub const ADMIN: &str = "moat_AdminAdminAdminAdminAdminAdminAdminAdmin123";

/// The sandbox groups route.
pub const G: &str = "/v1/sandbox-groups";

/// The `moat` binary with none of the client or daemon settings of the environment.
pub fn moat() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moat"));
    for v in [
        "MOAT_URL",
        "MOAT_API_KEY",
        "MOAT_BOOTSTRAP_KEY",
        "MOAT_LISTEN",
        "MOAT_STORE",
        "MOAT_SHARED_DIR",
        "RUST_LOG",
    ] {
        c.env_remove(v);
    }
    c
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `moat serve` on a free loopback port with a MOAT_HOME of its own; killed (and its
/// detached VMs with it) on drop.
pub struct Daemon {
    pub home: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    pub starts: usize,
    pub http: reqwest::Client,
    pub doc: Option<Value>,
    pub validated: AtomicUsize,
    /// Extra `moat serve` arguments, on every start.
    pub args: Vec<String>,
    /// The guest agent (MOAT_AGENT) of every start.
    pub agent: PathBuf,
    /// `--store` of every start (see [`store_for`]); `None`: SQLite in the home.
    pub store: Option<String>,
}

/// The `--store` of a daemon on `home`: none (the embedded SQLite database in the home)
/// unless `MOAT_TEST_STORE` holds a PostgreSQL URL (scripts/test.sh's second pass). Then the
/// daemon gets a schema of that database of its own, named after its home and created here,
/// so that daemons never see one another's rows and a restarted one finds its own.
pub fn store_for(home: &std::path::Path) -> Option<String> {
    use sha2::Digest;
    let url = std::env::var("MOAT_TEST_STORE")
        .ok()
        .filter(|u| !u.is_empty())?;
    let digest = sha2::Sha256::digest(home.as_os_str().as_encoded_bytes());
    let schema = format!("d_{}", &hex::encode(digest)[..16]);
    let admin = url.clone();
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    // The blocking client must not run on the test's executor thread.
    std::thread::spawn(move || {
        postgres::Client::connect(&admin, postgres::NoTls)
            .expect("MOAT_TEST_STORE connects")
            .batch_execute(&create)
            .expect("a schema for the test daemon")
    })
    .join()
    .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{sep}options=-csearch_path%3D{schema}"))
}

/// A new MOAT_HOME with links to the entries `names` of the shared test home (built once per
/// machine by `moat setup`); its database, socket and `run/` stay its own, so a daemon's
/// start-up adoption and orphan clean-up only ever see its own VMs.
fn linked_home(names: &[&str]) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let shared = super::home();
    for name in names {
        if shared.join(name).exists() {
            std::os::unix::fs::symlink(shared.join(name), home.path().join(name)).unwrap();
        }
    }
    home
}

/// A new MOAT_HOME that can run sandboxes: links to the shared test home's kernels, images,
/// templates and initramfs (see [`Daemon::start_with_runtime`]).
pub fn runtime_home() -> tempfile::TempDir {
    linked_home(&[
        "kernels",
        "images",
        "templates",
        "initramfs",
        "qemu-version.json",
    ])
}

impl Daemon {
    /// A daemon on a fresh MOAT_HOME whose first admin key is `bootstrap` (generated if None).
    /// It serves groups and keys only: `--no-setup` keeps it from preparing sandboxes (which
    /// tests/daemon_setup.rs covers).
    pub async fn start(bootstrap: Option<&str>) -> Daemon {
        let home = tempfile::tempdir().unwrap();
        Daemon::start_in(home, super::agent_path(), bootstrap, &["--no-setup"]).await
    }

    /// [`Daemon::start`] with its state in the PostgreSQL database `url` (`--store`).
    pub async fn start_on_store(url: &str, bootstrap: Option<&str>) -> Daemon {
        let home = tempfile::tempdir().unwrap();
        let args = ["--no-setup", "--store", url];
        Daemon::start_in(home, super::agent_path(), bootstrap, &args).await
    }

    /// A daemon that can run sandboxes: its MOAT_HOME links `kernels`, `images`, `templates`
    /// and `initramfs` to the shared test home (built once per machine by `moat setup`), while
    /// its database, socket and `run/` stay its own, so its start-up adoption and orphan
    /// clean-up only ever see its own VMs.
    pub async fn start_with_runtime(bootstrap: Option<&str>) -> Daemon {
        Daemon::start_with_runtime_args(bootstrap, &[]).await
    }

    /// [`Daemon::start_with_runtime`] with extra `moat serve` arguments.
    pub async fn start_with_runtime_args(bootstrap: Option<&str>, args: &[&str]) -> Daemon {
        Daemon::start_at(runtime_home(), bootstrap, args).await
    }

    /// A daemon on `home` (from [`runtime_home`], or prepared by the test: a fleet's nodes
    /// share a `secrets.key`) with `moat serve` arguments `args`.
    pub async fn start_at(
        home: tempfile::TempDir,
        bootstrap: Option<&str>,
        args: &[&str],
    ) -> Daemon {
        Daemon::start_in(home, super::agent_path(), bootstrap, args).await
    }

    /// A daemon on a MOAT_HOME that has only the entries `names` of the shared test home
    /// (linked), with `agent` as its guest agent: it prepares the rest itself.
    pub async fn start_partial(names: &[&str], agent: PathBuf, bootstrap: Option<&str>) -> Daemon {
        Daemon::start_in(linked_home(names), agent, bootstrap, &[]).await
    }

    async fn start_in(
        home: tempfile::TempDir,
        agent: PathBuf,
        bootstrap: Option<&str>,
        args: &[&str],
    ) -> Daemon {
        let mut d = Daemon {
            home,
            port: free_port(),
            child: None,
            starts: 0,
            http: reqwest::Client::new(),
            doc: None,
            validated: AtomicUsize::new(0),
            args: args.iter().map(|a| a.to_string()).collect(),
            agent,
            store: None,
        };
        if !args.contains(&"--store") {
            d.store = store_for(d.home.path());
        }
        d.spawn(bootstrap).await;
        let (status, doc) = d.call(None, "GET", "/openapi.json", None).await;
        assert_eq!(status, 200);
        d.doc = Some(doc);
        d
    }

    /// Runs `sql` on the daemon's own database behind its back, whichever backend it uses
    /// (SQLite's `?N` placeholders, text parameters): what someone with access to the database
    /// can do. Returns the rows changed, or the database's error message.
    pub fn db_execute(&self, sql: &str, params: &[&str]) -> Result<u64, String> {
        match &self.store {
            None => {
                let db = rusqlite::Connection::open(self.home.path().join("moatd.db")).unwrap();
                db.execute(sql, rusqlite::params_from_iter(params))
                    .map(|n| n as u64)
                    .map_err(|e| e.to_string())
            }
            Some(url) => {
                let (url, sql) = (url.clone(), sql.replace('?', "$"));
                let params: Vec<String> = params.iter().map(|p| p.to_string()).collect();
                std::thread::spawn(move || {
                    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                    let args: Vec<&(dyn postgres::types::ToSql + Sync)> = params
                        .iter()
                        .map(|p| p as &(dyn postgres::types::ToSql + Sync))
                        .collect();
                    c.execute(sql.as_str(), &args)
                        .map_err(|e| match e.as_db_error() {
                            Some(db) => db.message().to_string(),
                            None => e.to_string(),
                        })
                })
                .join()
                .unwrap()
            }
        }
    }

    /// Drops trigger `name` of `table` behind the daemon's back (a tampering test).
    pub fn db_drop_trigger(&self, name: &str, table: &str) {
        let sql = match self.store {
            None => format!("DROP TRIGGER {name}"),
            Some(_) => format!("DROP TRIGGER {name} ON {table}"),
        };
        self.db_execute(&sql, &[]).unwrap();
    }

    /// The text `sql` (one row, one column) selects from the daemon's database, like
    /// [`Daemon::db_execute`].
    pub fn db_text(&self, sql: &str, params: &[&str]) -> String {
        self.db_value(sql, params)
    }

    /// The integer `sql` (one row, one column) selects from the daemon's database, like
    /// [`Daemon::db_execute`].
    pub fn db_i64(&self, sql: &str, params: &[&str]) -> i64 {
        self.db_value(sql, params)
    }

    fn db_value<T>(&self, sql: &str, params: &[&str]) -> T
    where
        T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a> + Send + 'static,
    {
        match &self.store {
            None => {
                let db = rusqlite::Connection::open(self.home.path().join("moatd.db")).unwrap();
                db.query_row(sql, rusqlite::params_from_iter(params), |r| r.get(0))
                    .unwrap()
            }
            Some(url) => {
                let (url, sql) = (url.clone(), sql.replace('?', "$"));
                let params: Vec<String> = params.iter().map(|p| p.to_string()).collect();
                std::thread::spawn(move || {
                    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                    let args: Vec<&(dyn postgres::types::ToSql + Sync)> = params
                        .iter()
                        .map(|p| p as &(dyn postgres::types::ToSql + Sync))
                        .collect();
                    c.query_one(sql.as_str(), &args).unwrap().get::<_, T>(0)
                })
                .join()
                .unwrap()
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn out_path(&self, n: usize, what: &str) -> PathBuf {
        self.home.path().join(format!("serve-{n}.{what}"))
    }

    pub fn stdout(&self, n: usize) -> String {
        std::fs::read_to_string(self.out_path(n, "out")).unwrap_or_default()
    }

    pub fn stderr(&self, n: usize) -> String {
        std::fs::read_to_string(self.out_path(n, "err")).unwrap_or_default()
    }

    pub fn command(&mut self, bootstrap: Option<&str>) -> (Command, usize) {
        self.starts += 1;
        let n = self.starts;
        let mut c = moat();
        c.args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.args)
            .args(self.store.iter().flat_map(|s| ["--store", s]))
            .env("MOAT_HOME", self.home.path())
            .env("MOAT_AGENT", &self.agent)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.out_path(n, "out")).unwrap())
            .stderr(std::fs::File::create(self.out_path(n, "err")).unwrap());
        if let Some(k) = bootstrap {
            c.env("MOAT_BOOTSTRAP_KEY", k);
        }
        (c, n)
    }

    pub async fn spawn(&mut self, bootstrap: Option<&str>) {
        let (mut c, n) = self.command(bootstrap);
        let mut child = c.spawn().expect("moat serve starts");
        // Start-up adopts VMs: allow for a slow machine.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("moat serve exited ({st}): {}", self.stderr(n));
            }
            let ok = self
                .http
                .get(format!("{}/healthz", self.url()))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "moat serve never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child = Some(child);
    }

    /// Stops the daemon gracefully (its VMs keep running for the next start).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let st = c.wait().unwrap();
            assert!(st.success(), "moat serve after SIGTERM: {st}");
        }
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    /// One request; checks the answer against the OpenAPI document (once it is loaded).
    pub async fn call(
        &self,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let raw = body.map(|b| serde_json::to_vec(&b).unwrap());
        self.call_raw(key, method, path, raw).await
    }

    pub async fn call_raw(
        &self,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("{}{path}", self.url()));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            if b.len() > 1 << 20 {
                // The daemon answers 413 without reading the body, then closes the connection:
                // keep it out of the client's pool.
                req = req.header("connection", "close");
            }
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.bytes().await.unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else if ctype.as_deref() == Some("application/json") {
            serde_json::from_slice(&bytes).unwrap()
        } else {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        };
        if let Some(doc) = &self.doc {
            check_response(doc, method, path, status, &value);
            self.validated.fetch_add(1, Ordering::Relaxed);
        }
        (status, value)
    }

    /// Creates a key and returns its secret.
    pub async fn key(&self, role: &str, groups: &[&str]) -> String {
        let (st, k) = self
            .call(
                Some(ADMIN),
                "POST",
                "/v1/api-keys",
                Some(json!({"name": format!("{role} key"), "role": role, "groups": groups})),
            )
            .await;
        assert_eq!(st, 201, "{k}");
        k["key"].as_str().unwrap().to_string()
    }

    /// `PUT` a group as the admin; `want` is 201 for a new group, 200 for a changed one.
    pub async fn put_group(&self, group: &str, spec: Value, want: u16) {
        let (st, g) = self
            .call(Some(ADMIN), "PUT", &format!("{G}/{group}"), Some(spec))
            .await;
        assert_eq!(st, want, "{g}");
    }

    /// Creates a sandbox; it must be made (201) and running. Returns the sandbox.
    pub async fn create(&self, key: &str, group: &str, body: Value) -> Value {
        let t = Instant::now();
        let (st, sb) = self
            .call(
                Some(key),
                "POST",
                &format!("{G}/{group}/sandboxes"),
                Some(body),
            )
            .await;
        assert_eq!(st, 201, "{sb}");
        assert_eq!(sb["state"], "running", "{sb}");
        eprintln!("create: {:?}", t.elapsed());
        sb
    }

    /// The id of a new sandbox with the group's defaults, made by the admin.
    pub async fn new_sandbox(&self, group: &str) -> String {
        let sb = self.create(ADMIN, group, json!({})).await;
        sb["id"].as_str().unwrap().to_string()
    }

    pub async fn exec(&self, key: &str, group: &str, id: &str, body: Value) -> (u16, Value) {
        self.call(
            Some(key),
            "POST",
            &format!("{G}/{group}/sandboxes/{id}/exec"),
            Some(body),
        )
        .await
    }

    /// `sh -c SCRIPT` as the admin must succeed; returns its stdout, trimmed.
    pub async fn sh(&self, group: &str, id: &str, script: &str) -> String {
        let (st, r) = self
            .exec(ADMIN, group, id, json!({ "command": script }))
            .await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["exit_code"], 0, "{script}: {r}");
        r["stdout"].as_str().unwrap().trim().to_string()
    }

    /// The sandbox as the admin sees it, or None once it is deleted.
    pub async fn get(&self, group: &str, id: &str) -> Option<Value> {
        let (st, sb) = self
            .call(
                Some(ADMIN),
                "GET",
                &format!("{G}/{group}/sandboxes/{id}"),
                None,
            )
            .await;
        match st {
            200 => Some(sb),
            404 => None,
            _ => panic!("{st} {sb}"),
        }
    }

    /// The value of one `/metrics` series (name and labels exactly as exposed), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (st, text) = self.call(None, "GET", "/metrics", None).await;
        assert_eq!(st, 200);
        text.as_str()
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The sandbox's state, or "gone" once it is deleted.
    pub async fn state(&self, group: &str, id: &str) -> String {
        match self.get(group, id).await {
            Some(sb) => sb["state"].as_str().unwrap().to_string(),
            None => "gone".to_string(),
        }
    }

    /// `POST …/{id}/{verb}` (suspend or resume) as the admin: status, body, and how long it took.
    pub async fn lifecycle(&self, group: &str, id: &str, verb: &str) -> (u16, Value, Duration) {
        let t = Instant::now();
        let (st, v) = self
            .call(
                Some(ADMIN),
                "POST",
                &format!("{G}/{group}/sandboxes/{id}/{verb}"),
                None,
            )
            .await;
        (st, v, t.elapsed())
    }

    /// Deletes a sandbox as the admin; it must go (204).
    /// Takes snapshot `name` of sandbox `id` and forks it `count` times: the forks as created.
    pub async fn snapshot_and_fork(
        &self,
        group: &str,
        id: &str,
        name: &str,
        count: u32,
    ) -> Vec<Value> {
        let (st, snap) = self
            .call(
                Some(ADMIN),
                "POST",
                &format!("{G}/{group}/sandboxes/{id}/snapshots"),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(st, 201, "{snap}");
        let (st, forks) = self
            .call(
                Some(ADMIN),
                "POST",
                &format!("{G}/{group}/sandboxes"),
                Some(json!({"from_snapshot": name, "count": count})),
            )
            .await;
        assert_eq!(st, 201, "{forks}");
        forks["sandboxes"].as_array().unwrap().clone()
    }

    pub async fn delete(&self, group: &str, id: &str) {
        let (st, v) = self
            .call(
                Some(ADMIN),
                "DELETE",
                &format!("{G}/{group}/sandboxes/{id}"),
                None,
            )
            .await;
        assert_eq!(st, 204, "{v}");
    }

    /// The value the sandbox's [`super::COUNTER`] last wrote.
    pub async fn counter(&self, group: &str, id: &str) -> u64 {
        self.sh(group, id, "cat /run/counter")
            .await
            .parse()
            .expect("counter")
    }

    /// The sandbox's [`super::COUNTER`] is alive: it moves past `after`.
    pub async fn counter_moves(&self, group: &str, id: &str, after: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.counter(group, id).await <= after {
            assert!(
                Instant::now() < deadline,
                "counter of {id} stuck at {after}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn cli(&self, key: &str, args: &[&str]) -> std::process::Output {
        moat()
            .args(args)
            .env("MOAT_URL", self.url())
            .env("MOAT_API_KEY", key)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // The daemon's VMs are detached and outlive it: a test must not leave them behind.
        for pid in super::qemu_processes(&self.home.path().display().to_string()) {
            // SAFETY: kill(2) with a pid we just read from /proc; at worst the process is gone.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

pub fn msg(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
