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
}

pub async fn run(home: &Home, args: ServeArgs) -> Result<u8> {
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
    moat_server::serve(
        moat_server::Config {
            home: home.root.clone(),
            listen: args.listen,
            bootstrap_key,
        },
        shutdown,
    )
    .await?;
    Ok(0)
}
