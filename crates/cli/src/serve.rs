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
    /// Do not prepare a MOAT_HOME that lacks the guest kernel or initramfs (by default the
    /// daemon does what `moat setup` does, in the background): its sandbox routes then answer
    /// 503 until `moat setup` and a restart.
    #[arg(long)]
    no_setup: bool,
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
        },
        shutdown,
    )
    .await?;
    Ok(0)
}
