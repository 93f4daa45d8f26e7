//! `moat setup`: everything a first sandbox needs, installed under MOAT_HOME with spinners on
//! the terminal. Idempotent: what is there already is kept. The work itself is
//! `moat_server::prepare`, which a daemon on a fresh MOAT_HOME runs too.

use anyhow::Result;
use clap::Args;
use moat_server::prepare::{self, Step};

use crate::home::Home;
use crate::progress::Bars;

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Rebuild the base image even when one is imported.
    #[arg(long)]
    rebuild_base: bool,
}

pub async fn run(home: &Home, accel: Option<&str>, args: SetupArgs) -> Result<u8> {
    let agent = home.agent_binary()?;
    let bars = Spinners(Bars::new());
    let options = prepare::Options {
        rebuild_base: args.rebuild_base,
    };
    let moat = crate::home::moat_executable()?;
    let rt = prepare::prepare(&home.root, &agent, &moat, accel, options, &bars).await?;
    let collected = tokio::task::spawn_blocking(move || moat_vm::template::collect(&rt)).await??;
    if collected.removed > 0 {
        eprintln!(
            "removed {} superseded template(s), {} MiB",
            collected.removed,
            collected.freed_bytes >> 20
        );
    }
    Ok(0)
}

/// A spinner while each step runs, and its outcome on a line of its own after it.
struct Spinners(Bars);

impl prepare::Progress for Spinners {
    fn start(&self, step: Step) {
        self.0.spinner(step.describe());
    }

    fn done(&self, outcome: &str) {
        self.0.finish();
        eprintln!("{outcome}");
    }
}
