//! `moat serve`: parse flags and run the daemon library (`moat-server`) until SIGINT/SIGTERM.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use crate::home::Home;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TCP address of the API (it also listens on MOAT_HOME/moatd.sock).
    #[arg(long, env = "MOAT_LISTEN", default_value = moat_server::DEFAULT_LISTEN, value_name = "ADDR")]
    listen: SocketAddr,
    /// Tier memory all sandbox VMs together may hold, in MiB (running, starting and
    /// warm-pool VMs count their tier's memory; suspended ones none). Default: the host's
    /// MemTotal less the reserve, times --memory-overcommit.
    #[arg(long, env = "MOAT_MAX_MEMORY_MIB", value_name = "MIB")]
    max_memory_mib: Option<u64>,
    /// MiB of tiers one MiB of host memory may back (1 = none). Clones of a template share
    /// its memory, so an idle sandbox holds a fraction of its tier; new VMs are still refused
    /// once the host's available memory runs low (--memory-reserve-mib).
    #[arg(long, env = "MOAT_MEMORY_OVERCOMMIT", default_value_t = moat_server::DEFAULT_MEMORY_OVERCOMMIT, value_name = "RATIO")]
    memory_overcommit: f64,
    /// Host memory (MemAvailable) that must remain after a new VM gets its whole tier, in MiB:
    /// below it, creates, resumes and pool refills answer 429.
    #[arg(long, env = "MOAT_MEMORY_RESERVE_MIB", default_value_t = moat_server::DEFAULT_RESERVE_MIB, value_name = "MIB")]
    memory_reserve_mib: u64,
    /// vCPUs allowed per host CPU, over all sandbox VMs (a fractional tier counts its share).
    #[arg(long, env = "MOAT_CPU_OVERCOMMIT", default_value_t = moat_server::DEFAULT_CPU_OVERCOMMIT, value_name = "RATIO")]
    cpu_overcommit: f64,
    /// Seconds a sandbox must be idle (no request, no background process, its VM quiet) before
    /// its vCPUs are stopped; the next request continues it in milliseconds. Warm-pool VMs
    /// are parked once ready. 0 turns parking off.
    #[arg(long, env = "MOAT_PARK_AFTER", default_value_t = moat_server::DEFAULT_PARK_AFTER_S, value_name = "SECS")]
    park_after: u64,
    /// Do not prepare a MOAT_HOME that lacks the guest kernel or initramfs (by default the
    /// daemon does what `moat setup` does, in the background): its sandbox routes then answer
    /// 503 until `moat setup` and a restart.
    #[arg(long)]
    no_setup: bool,
    /// A hosts(5) file for every sandbox's network: its names are answered from it instead of
    /// DNS, and its addresses are reachable for those names even in private ranges (how a
    /// local service is reached). A group's egress rules must still allow the names.
    #[arg(long, env = "MOAT_EGRESS_HOSTS", value_name = "FILE")]
    egress_hosts: Option<std::path::PathBuf>,
    /// The DNS resolver the host asks for the names groups allow (default: the host's own).
    #[arg(long, env = "MOAT_EGRESS_RESOLVER", value_name = "ADDR:PORT")]
    egress_resolver: Option<SocketAddr>,
    /// PEM certificates to trust, besides Mozilla's roots, for the upstream connections of
    /// intercepted hosts (egress rules with a transform): a private CA of internal services.
    #[arg(long, env = "MOAT_UPSTREAM_CA", value_name = "FILE")]
    upstream_ca: Option<std::path::PathBuf>,
    /// Egress audit events kept in the store, over all groups; the oldest go first.
    #[arg(long, env = "MOAT_EGRESS_AUDIT_RETENTION", default_value_t = moat_server::sandboxes::DEFAULT_AUDIT_RETENTION, value_name = "EVENTS")]
    egress_audit_retention: u64,
    /// The workload-identity issuer URL: `iss` of every token, and where relying parties
    /// fetch `/.well-known/openid-configuration` and `/.well-known/jwks.json` (clouds need it
    /// public and https: put the daemon behind a proxy, or host `moat identity publish`'s
    /// files there). Default: http:// and the listen address.
    #[arg(long, env = "MOAT_ISSUER_URL", value_name = "URL")]
    issuer_url: Option<String>,
    /// How long policy decisions are kept, e.g. 90d, 12h, 30m, 45s (default: forever). Older
    /// entries are pruned behind an anchor (the newest pruned entry's hash), so `moat policy
    /// verify-log` still verifies what is left and tells pruning from tampering.
    #[arg(long, env = "MOAT_POLICY_DECISIONS_RETENTION", value_name = "DURATION", value_parser = duration)]
    policy_decisions_retention: Option<std::time::Duration>,
    /// Requests a second, on average, that each API key without a limit of its own may make
    /// (a token bucket per key; over it: 429 with Retry-After). 0: no limit.
    #[arg(long, env = "MOAT_RATE_LIMIT", default_value_t = moat_server::ratelimit::DEFAULT.per_s, value_name = "PER_S")]
    rate_limit: u32,
    /// The burst of those keys: requests a key may make at once after a quiet while.
    #[arg(long, env = "MOAT_RATE_BURST", default_value_t = moat_server::ratelimit::DEFAULT.burst, value_name = "N")]
    rate_burst: u32,
    /// Entries of the audit log of mutating API calls (`moat audit`) kept; the oldest go first.
    #[arg(long, env = "MOAT_AUDIT_RETENTION", default_value_t = moat_server::DEFAULT_AUDIT_RETENTION, value_name = "ENTRIES")]
    audit_retention: u64,
    /// Serve the TCP listener over TLS with this PEM certificate chain (leaf first); needs
    /// --tls-key. Clients verify it (MOAT_CA_FILE names a private CA). The Unix socket stays
    /// plain: it is reachable only by this user.
    #[arg(long, env = "MOAT_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "MOAT_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificates trusted, besides the public roots, when this node forwards a
    /// request to another node whose --advertise-url is https (the variable the CLI reads
    /// for the same private CA).
    #[arg(long, env = "MOAT_CA_FILE", value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Where to keep the daemon's state: a PostgreSQL URL,
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (`?host=/run/dir` for a unix socket),
    /// which several daemons may share (docs/FLEET.md). A replicated cluster: every member,
    /// HOST1:PORT1,HOST2:PORT2,…, and `?target_session_attrs=read-write` (the daemon follows
    /// the primary). Default: the embedded SQLite database MOAT_HOME/moatd.db.
    #[arg(long, env = "MOAT_STORE", value_name = "URL")]
    store: Option<String>,
    /// This daemon's name as a node of its store (1–63 lowercase letters, digits and '-').
    /// Default: the host name's first label.
    #[arg(long, env = "MOAT_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// How other nodes and clients reach this node's API, http(s)://HOST[:PORT]. Default: the
    /// scheme and --listen address (the host name when it listens on every address).
    #[arg(long, env = "MOAT_ADVERTISE_URL", value_name = "URL")]
    advertise_url: Option<String>,
    /// Seconds this node's lease lasts unrenewed (it renews every third of it); the other
    /// nodes mark it and its running sandboxes lost about this long after it stops.
    #[arg(long, env = "MOAT_LEASE_S", value_name = "SECS")]
    lease_s: Option<u64>,
    /// A directory on shared storage (any POSIX shared filesystem: NFS, CephFS, …) that every
    /// node of the fleet mounts and may write: suspended sandboxes are written there, so that
    /// another node resumes them when this one is lost or drains (docs/FLEET.md).
    #[arg(long, env = "MOAT_SHARED_DIR", value_name = "DIR")]
    shared_dir: Option<std::path::PathBuf>,
    /// A label of this node, KEY=VALUE (repeatable).
    #[arg(long = "node-label", value_name = "KEY=VALUE")]
    node_labels: Vec<String>,
}

/// `N` followed by `s`, `m`, `h` or `d`; at least one second.
pub(crate) fn duration(text: &str) -> std::result::Result<std::time::Duration, String> {
    let bad =
        || format!("invalid duration {text:?}: give a whole number and s, m, h or d (e.g. 90d)");
    let split = text.len().checked_sub(1).ok_or_else(bad)?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .filter(|s| *s >= 1)
    .ok_or_else(bad)?;
    Ok(std::time::Duration::from_secs(secs))
}

pub async fn run(home: &Home, accel: Option<&str>, args: ServeArgs) -> Result<u8> {
    // Read here, not as a flag, so the key never shows up in `ps`.
    let bootstrap_key = match std::env::var("MOAT_BOOTSTRAP_KEY") {
        Ok(k) if !k.is_empty() => Some(k),
        _ => None,
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    // Without an agent the daemon still serves groups and keys; its sandbox routes say why
    // they cannot work.
    let agent = home.agent_binary().map_err(|e| format!("{e:#}"));
    let hosts = match &args.egress_hosts {
        Some(path) => {
            // Parsed here for a clear error at start; each stack parses the text again.
            moat_net::HostsFile::load(path).context("--egress-hosts")?;
            Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --egress-hosts {}", path.display()))?,
            )
        }
        None => None,
    };
    let upstream_ca = match &args.upstream_ca {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading --upstream-ca {}", path.display()))?;
            // Checked here for a clear error at start; each stack parses it again.
            moat_net::intercept::check_roots(&pem)
                .with_context(|| format!("--upstream-ca {}", path.display()))?;
            Some(pem)
        }
        None => None,
    };
    if args.egress_audit_retention == 0 {
        anyhow::bail!("--egress-audit-retention must be at least 1");
    }
    if args.audit_retention == 0 {
        anyhow::bail!("--audit-retention must be at least 1");
    }
    let max = moat_server::api::MAX_RATE;
    if args.rate_limit > max || args.rate_burst == 0 || args.rate_burst > max {
        anyhow::bail!("--rate-limit must be 0 (no limit) to {max} and --rate-burst 1 to {max}");
    }
    moat_server::serve(
        moat_server::Config {
            home: home.root.clone(),
            listen: args.listen,
            bootstrap_key,
            agent,
            net_stack: crate::home::moat_executable()?,
            policy_worker: crate::home::moat_executable()?,
            accel: accel.map(str::to_string),
            setup: !args.no_setup,
            max_memory_mib: args.max_memory_mib,
            memory_overcommit: args.memory_overcommit,
            memory_reserve_mib: args.memory_reserve_mib,
            cpu_overcommit: args.cpu_overcommit,
            park_after: (args.park_after > 0)
                .then(|| std::time::Duration::from_secs(args.park_after)),
            net: moat_server::sandboxes::NetConfig {
                hosts,
                resolver: args.egress_resolver,
                audit_retention: args.egress_audit_retention,
                upstream_ca,
            },
            issuer_url: args.issuer_url,
            policy_decisions_retention: args.policy_decisions_retention,
            rate_limit: (args.rate_limit > 0).then_some(moat_server::api::RateLimit {
                per_s: args.rate_limit,
                burst: args.rate_burst,
            }),
            audit_retention: args.audit_retention,
            tls: args.tls_cert.zip(args.tls_key),
            ca_file: args.ca_file.filter(|p| !p.as_os_str().is_empty()),
            store: args.store,
            node: moat_server::node::NodeConfig {
                name: args.node_name,
                advertise_url: args.advertise_url,
                lease_s: args.lease_s,
                labels: args.node_labels,
            },
            shared_dir: args.shared_dir.filter(|p| !p.as_os_str().is_empty()),
        },
        shutdown,
    )
    .await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::duration as retention;
    use std::time::Duration;

    #[test]
    fn retentions_parse_with_their_unit() {
        assert_eq!(retention("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(retention("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(retention("30m"), Ok(Duration::from_secs(1800)));
        for bad in ["", "d", "0s", "10", "5w", "-1h", "1.5h"] {
            let e = retention(bad).unwrap_err();
            assert!(e.contains("s, m, h or d"), "{bad}: {e}");
        }
    }
}
