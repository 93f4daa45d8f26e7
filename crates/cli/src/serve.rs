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
    /// Memory all sandbox VMs together may have, in MiB (running, starting and warm-pool VMs
    /// count their tier's memory; suspended ones none). Default: the host's MemTotal less 1 GiB.
    #[arg(long, env = "MOAT_MAX_MEMORY_MIB", value_name = "MIB")]
    max_memory_mib: Option<u64>,
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
            cpu_overcommit: args.cpu_overcommit,
            park_after: (args.park_after > 0)
                .then(|| std::time::Duration::from_secs(args.park_after)),
            net: moat_server::sandboxes::NetConfig {
                hosts,
                resolver: args.egress_resolver,
                audit_retention: args.egress_audit_retention,
                upstream_ca,
            },
        },
        shutdown,
    )
    .await?;
    Ok(0)
}
