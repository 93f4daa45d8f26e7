//! moat-server: the daemon behind `moat serve` (moatd): the embedded store, API keys, sandbox
//! groups, sandboxes (create, exec, delete; re-adopted after a restart) and the HTTP API on TCP
//! and on a Unix socket, suspend/resume, warm pools, lifecycle timers, capacity checks and the
//! group policies checked before anything runs, and the workload-identity issuer.

pub mod api;
pub mod capacity;
pub mod error;
pub mod exec;
pub mod http;
pub mod identity;
pub mod images;
pub mod keys;
pub mod metrics;
pub mod migrate;
pub mod node;
pub mod policy;
pub mod prepare;
pub mod ratelimit;
pub mod readiness;
pub mod sandboxes;
pub mod snapshots;
pub mod store;
pub mod tls;
pub mod transfer;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{Error, Result};
use nix::fcntl::{Flock, FlockArg};
use tokio::net::{TcpListener, UnixListener};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

#[derive(Debug, Clone)]
pub struct Config {
    /// MOAT_HOME: holds `moatd.db`, `moatd.sock` and `moatd.lock`.
    pub home: PathBuf,
    /// TCP address of the API.
    pub listen: SocketAddr,
    /// The first admin key, instead of a generated one (MOAT_BOOTSTRAP_KEY). Used only when
    /// the database has never been bootstrapped.
    pub bootstrap_key: Option<String>,
    /// The static guest agent, or why there is none: the daemon then serves groups and keys,
    /// and its sandbox routes answer 503 with this reason.
    pub agent: std::result::Result<PathBuf, String>,
    /// The `moat` executable, whose hidden `net-stack` command is each sandbox's network stack.
    pub net_stack: PathBuf,
    /// The `moat` executable, whose hidden `policy worker` command analyses requests against
    /// group policies (one process per check).
    pub policy_worker: PathBuf,
    /// The accelerator to force (`--accel`/`MOAT_ACCEL`), else detected.
    pub accel: Option<String>,
    /// When the home lacks the guest kernel or initramfs, prepare what is missing (the base
    /// image too) in the background at start, as `moat setup` does; `moat serve --no-setup`
    /// turns it off.
    pub setup: bool,
    /// Tier memory all sandbox VMs together may hold, MiB (`--max-memory-mib`); default the
    /// host's MemTotal less the reserve, times `memory_overcommit`.
    pub max_memory_mib: Option<u64>,
    /// MiB of tiers one MiB of host memory may back (`--memory-overcommit`, ≥ 1).
    pub memory_overcommit: f64,
    /// Host memory a new VM's whole tier must leave available, MiB (`--memory-reserve-mib`).
    pub memory_reserve_mib: u64,
    /// vCPUs allowed per host CPU (`--cpu-overcommit`).
    pub cpu_overcommit: f64,
    /// How long a sandbox must be idle (no request, no background process, its QEMU quiet)
    /// before its vCPUs are stopped until the next request (`--park-after`); `None` turns
    /// parking off, for warm-pool VMs too.
    pub park_after: Option<std::time::Duration>,
    /// Egress: the hosts file and resolver every sandbox's network stack gets, and how many
    /// audit events the store keeps (`--egress-hosts`, `--egress-resolver`,
    /// `--egress-audit-retention`).
    pub net: sandboxes::NetConfig,
    /// The workload-identity issuer URL (`--issuer-url`): `iss` of every token, where relying
    /// parties fetch `/.well-known/…`. `None`: this daemon's own `http://` listen address.
    pub issuer_url: Option<String>,
    /// How long policy decisions are kept (`--policy-decisions-retention`); `None`: forever.
    /// Older entries are pruned behind an anchor that keeps the rest verifiable.
    pub policy_decisions_retention: Option<std::time::Duration>,
    /// The rate limit of API keys without their own (`--rate-limit`, `--rate-burst`); `None`:
    /// unlimited.
    pub rate_limit: Option<api::RateLimit>,
    /// Audit log entries kept (`--audit-retention`); the oldest go first.
    pub audit_retention: u64,
    /// The PEM certificate chain and private key of the TCP listener (`--tls-cert`,
    /// `--tls-key`); `None`: plain HTTP. The Unix socket is always plain.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `--ca-file` (MOAT_CA_FILE): CAs trusted besides the public roots when forwarding to a
    /// node whose advertised URL is https.
    pub ca_file: Option<PathBuf>,
    /// Where the state is kept (`--store`): `None` for the embedded SQLite database
    /// (`MOAT_HOME/moatd.db`), else a `postgres://` URL (docs/FLEET.md).
    pub store: Option<String>,
    /// This daemon as a node of its store (`--node-name`, `--advertise-url`, `--lease-s`,
    /// `--node-label`).
    pub node: node::NodeConfig,
    /// `--shared-dir`: a directory on shared storage that every node of the fleet mounts;
    /// suspends are written there, so that another node can resume them when this one is
    /// lost or drains (docs/FLEET.md, "Shared storage"). `None`: in MOAT_HOME.
    pub shared_dir: Option<PathBuf>,
}

/// The default of [`Config::audit_retention`].
pub const DEFAULT_AUDIT_RETENTION: u64 = 1_000_000;

/// The default of [`Config::park_after`], seconds.
pub const DEFAULT_PARK_AFTER_S: u64 = 10;

pub use capacity::{DEFAULT_MEMORY_OVERCOMMIT, DEFAULT_RESERVE_MIB};

/// The default of [`Config::cpu_overcommit`].
pub const DEFAULT_CPU_OVERCOMMIT: f64 = 4.0;

pub fn db_path(home: &Path) -> PathBuf {
    home.join("moatd.db")
}

pub fn socket_path(home: &Path) -> PathBuf {
    home.join("moatd.sock")
}

/// Prunes policy decisions older than `keep`, at start and then every quarter of `keep`
/// (between a second and ten minutes), for as long as the daemon runs.
async fn prune_decisions(store: store::Store, keep: std::time::Duration) {
    let every = (keep / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(600),
    );
    loop {
        let before = store::now() - keep.as_secs() as i64;
        match store.prune_decisions(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "policy decisions past their retention pruned"),
            Err(e) => tracing::error!(error = %e, "pruning policy decisions"),
        }
        tokio::time::sleep(every).await;
    }
}

/// How long a start waits for the MOAT_HOME lock before it says another daemon runs.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs the daemon until `shutdown` completes (then it finishes the requests in flight).
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // A bad --store is refused before anything else happens.
    let location = store::Location::parse(config.store.as_deref(), &db_path(&config.home))?;
    std::fs::create_dir_all(&config.home)
        .map_err(|e| Error::io(format!("creating {}", config.home.display()), e))?;
    // One daemon per MOAT_HOME: the lock is released by the kernel however the daemon dies,
    // so a stale socket file left by a kill -9 can then be removed safely.
    let lock_path = config.home.join("moatd.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
    // A daemon that was just killed can leave the lock held for a moment: a child it forked
    // (a jailed QEMU or network stack being set up) holds the descriptor until its exec closes
    // it. So a held lock is tried again for a short while before it means another daemon.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut file = lock_file;
    let _lock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((f, errno))
                if errno == nix::errno::Errno::EWOULDBLOCK
                    && std::time::Instant::now() < deadline =>
            {
                file = f;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err((_, errno)) => {
                return Err(Error::Config(format!(
                    "another moat serve is running with MOAT_HOME {} ({errno})",
                    config.home.display()
                )))
            }
        }
    };

    // Read before anything else, so that a bad certificate stops the start with its reason.
    let tls = match &config.tls {
        Some((cert, key)) => Some(tls::server_config(cert, key)?),
        None => None,
    };
    let forwarder = Arc::new(http::forward::Forwarder::new(config.ca_file.as_deref())?);
    let shared_dir = match &config.shared_dir {
        Some(dir) => Some(sandboxes::check_shared_dir(dir)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let settings = config.node.settings(scheme, config.listen)?;
    let limits = capacity::Limits::from_host(
        config.max_memory_mib,
        config.memory_overcommit,
        config.memory_reserve_mib,
        config.cpu_overcommit,
    )?;
    let spec = store::NodeSpec {
        name: settings.name.clone(),
        holder: node::holder_id(&config.home)?,
        advertise_url: settings.advertise_url.clone(),
        accelerator: match moat_vm::accel::detect(config.accel.as_deref()) {
            Ok(choice) => choice.accel.as_str().to_string(),
            Err(e) => {
                tracing::warn!(error = %e, "no accelerator for the node's row");
                "none".to_string()
            }
        },
        labels: settings.labels.clone(),
        memory_mib: limits.memory_mib,
        millicpus: limits.millicpus,
        lease_ms: settings.lease.as_millis() as i64,
    };
    let bootstrap = config.bootstrap_key.clone();
    let home = config.home.clone();
    let node_spec = spec.clone();
    let (store, generated, lease) = tokio::task::spawn_blocking(move || -> Result<_> {
        let store = store::Store::open(&location, &home)?;
        // Before anything that writes about sandboxes: those writes are fenced by the lease.
        let lease = node::acquire(&store, &node_spec)?;
        let generated = store.bootstrap(bootstrap.as_deref())?;
        let interrupted = store.fail_interrupted_operations()?;
        if interrupted > 0 {
            tracing::warn!(
                interrupted,
                "image imports interrupted by a restart marked failed"
            );
        }
        Ok((store, generated, lease))
    })
    .await
    .map_err(Error::task("opening the store"))??;
    eprintln!(
        "moat serve: node {} (epoch {}, lease {} s, advertised at {})",
        spec.name,
        lease.epoch,
        settings.lease.as_secs(),
        spec.advertise_url
    );
    store.set_shared_storage(shared_dir.is_some()).await?;
    let claimed = store.claim_unowned().await?;
    if claimed > 0 {
        tracing::info!(claimed, node = %spec.name, "sandboxes from before node mode claimed");
    }
    if let Some(key) = generated {
        eprintln!(
            "moat serve: created the first admin API key; it is printed once, on stdout, and \
             only its hash is stored:"
        );
        println!("{key}");
    }

    tracing::info!(
        memory_mib = limits.memory_mib,
        reserve_mib = limits.reserve_mib,
        vcpus = limits.millicpus as f64 / 1000.0,
        "capacity"
    );
    let metrics = Arc::new(metrics::Metrics::default());
    let issuer_url = config
        .issuer_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}", config.listen));
    let identity = Arc::new({
        let (home, store, metrics) = (config.home.clone(), store.clone(), metrics.clone());
        // The first start generates two RSA keys: a blocking second or so.
        tokio::task::spawn_blocking(move || {
            identity::Issuer::open(&home, issuer_url, store, metrics)
        })
        .await
        .map_err(Error::task("opening the identity issuer"))??
    });
    // After the lock: only one daemon may adopt, and destroy, detached VMs.
    let sandboxes = readiness::start(readiness::Start {
        home: config.home.clone(),
        agent: config.agent.clone(),
        net_stack: config.net_stack.clone(),
        accel: config.accel.clone(),
        setup: config.setup,
        store: store.clone(),
        metrics: metrics.clone(),
        limits,
        park_after: config.park_after,
        net: config.net.clone(),
        identity: identity.clone(),
        shared_dir,
    })
    .await?;
    if let Some(keep) = config.policy_decisions_retention {
        tokio::spawn(prune_decisions(store.clone(), keep));
    }
    tokio::spawn(node::run(
        store.clone(),
        spec,
        sandboxes.clone(),
        identity.clone(),
    ));
    let state = http::AppState {
        store,
        metrics,
        sandboxes: sandboxes.clone(),
        operations: Arc::new(images::Operations::default()),
        policy: Arc::new(policy::Gate::new(config.policy_worker.clone())),
        identity,
        limiter: Arc::new(ratelimit::Limiter::new(config.rate_limit)),
        audit_retention: config.audit_retention,
        stopping: moat_mcp::CancellationToken::new(),
        forwarder,
        migrations: Arc::default(),
    };
    tokio::spawn(migrate::drain(state.clone()));
    let stopping = state.stopping.clone();
    let app = http::router(state);

    let tcp = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::io(format!("listening on {}", config.listen), e))?;
    let local = tcp
        .local_addr()
        .map_err(|e| Error::io("reading the listening address", e))?;
    let sock = socket_path(&config.home);
    match std::fs::remove_file(&sock) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing stale {}", sock.display()), e)),
    }
    let unix = UnixListener::bind(&sock)
        .map_err(|e| Error::io(format!("listening on {}", sock.display()), e))?;
    // Only this user may connect; requests still need an API key.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", sock.display()), e))?;
    eprintln!(
        "moat serve: listening on {scheme}://{local} and unix:{}",
        sock.display()
    );
    tracing::info!(%local, socket = %sock.display(), "serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        stopping.cancel();
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let tcp_server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match tls
    {
        Some(config) => {
            let listener = tls::TlsListener::new(tcp, config)
                .map_err(|e| Error::io("listening for TLS", e))?;
            Box::pin(
                axum::serve(listener, app.clone())
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            )
        }
        None => Box::pin(
            axum::serve(tcp, app.clone())
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
        ),
    };
    let unix_server = axum::serve(unix, app).with_graceful_shutdown(stopped(stop_rx));
    let result = tokio::try_join!(
        async { tcp_server.await.map_err(|e| Error::io("serving TCP", e)) },
        async {
            unix_server
                .await
                .map_err(|e| Error::io("serving the Unix socket", e))
        },
    );
    let _ = std::fs::remove_file(&sock);
    // A graceful stop leaves the VMs running for the next daemon to adopt.
    if let Some(mgr) = sandboxes.ready() {
        mgr.detach_all().await;
    }
    result.map(|_| ())
}
