//! `MOAT_HOME`: the one directory that holds all of moat's state (layout in
//! docs/ARCHITECTURE.md), and where the guest agent binary comes from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone)]
pub struct Home {
    pub root: PathBuf,
}

impl Home {
    /// `--home`/`MOAT_HOME`, else `~/.moat`.
    pub fn resolve(flag: Option<&Path>) -> Result<Home> {
        let root = match flag {
            Some(p) => p.to_path_buf(),
            None => {
                let home = std::env::var_os("HOME").context("HOME is not set; set MOAT_HOME")?;
                PathBuf::from(home).join(".moat")
            }
        };
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating MOAT_HOME {}", root.display()))?;
        let root = root
            .canonicalize()
            .with_context(|| format!("resolving MOAT_HOME {}", root.display()))?;
        Ok(Home { root })
    }

    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The static guest agent: `MOAT_AGENT`, else `moat-agent` beside this executable, else the
    /// cargo output of the static build (`target/x86_64-unknown-linux-gnu/<profile>/`).
    pub fn agent_binary(&self) -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("MOAT_AGENT") {
            return Ok(PathBuf::from(p));
        }
        let exe = moat_executable()?;
        let dir = exe
            .parent()
            .context("the moat executable has no directory")?;
        let mut candidates = vec![dir.join("moat-agent")];
        if let Some(target) = dir.parent() {
            for profile in ["release", "debug"] {
                candidates.push(
                    target
                        .join("x86_64-unknown-linux-gnu")
                        .join(profile)
                        .join("moat-agent"),
                );
            }
        }
        // Skip a dynamically linked moat-agent that a plain `cargo build` may leave beside moat.
        for c in &candidates {
            if c.is_file() && moat_vm::assets::check_static_elf(&std::fs::read(c)?).is_ok() {
                return Ok(c.clone());
            }
        }
        bail!(
            "no static guest agent found (looked at {}); build it with scripts/build.sh or set \
             MOAT_AGENT",
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    pub fn runtime(&self, accel: Option<&str>) -> Result<moat_vm::Runtime> {
        let agent = self.agent_binary()?;
        Ok(moat_vm::Runtime::new(
            &self.root,
            &agent,
            &moat_executable()?,
            accel,
        )?)
    }
}

/// This `moat` executable: its hidden `net-stack` command is each sandbox's network stack.
pub fn moat_executable() -> Result<PathBuf> {
    std::env::current_exe().context("locating the moat executable")
}
