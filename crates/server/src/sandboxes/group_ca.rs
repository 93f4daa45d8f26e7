//! Each group's interception CA (`MOAT_HOME/egress-ca/<group>.json`, 0600: it holds the
//! private key): made on first need, before the group's first sandbox boots, so that every
//! sandbox of the group trusts it and its stacks sign with it. The file goes with its group:
//! a group deleted and made again gets a new CA.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use moat_net::intercept::CaSpec;

use super::Manager;
use crate::error::{Error, Result};

impl Manager {
    fn ca_path(&self, group: &str) -> PathBuf {
        self.rt.home.join("egress-ca").join(format!("{group}.json"))
    }

    /// `group`'s CA, made now if it has none. Two callers racing both end with the same one:
    /// the file is linked into place only if none is there yet.
    pub(crate) async fn group_ca(&self, group: &str) -> Result<CaSpec> {
        let path = self.ca_path(group);
        let group = group.to_string();
        tokio::task::spawn_blocking(move || load_or_create(&path, &group))
            .await
            .map_err(Error::task("the group CA"))?
    }

    /// How the VMs of `group` start: detached, trusting the group's CA, and with a new
    /// `IDENTITY_HEADER` when the group's `identity.in_guest` is on now (docs/IDENTITY.md:
    /// turning it on reaches a sandbox at its next start or resume; turning it off stops its
    /// mints at once, since the issuer checks it on every mint).
    pub(crate) async fn launch_options(&self, group: &str) -> Result<moat_vm::LaunchOptions> {
        let in_guest = self
            .store
            .get_group(group)
            .await?
            .is_some_and(|g| g.spec.identity.enabled && g.spec.identity.in_guest);
        let identity_header = in_guest.then(|| {
            use rand::RngCore;
            let mut b = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut b);
            hex::encode(b)
        });
        Ok(moat_vm::LaunchOptions {
            detached: true,
            trust_ca: Some(self.group_ca(group).await?.cert_pem),
            identity_header,
        })
    }

    /// Forgets `group`'s CA (the group is gone).
    pub(crate) fn remove_group_ca(&self, group: &str) {
        let path = self.ca_path(group);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(group, error = %e, "removing the group's CA");
            }
        }
    }
}

fn load_or_create(path: &std::path::Path, group: &str) -> Result<CaSpec> {
    let read = |path: &std::path::Path| -> Result<CaSpec> {
        let text =
            std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&text)
            .map_err(|e| Error::Internal(format!("{} is not a group CA: {e}", path.display())))
    };
    if path.exists() {
        return read(path);
    }
    let dir = path.parent().expect("under egress-ca");
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let ca = CaSpec::generate(group).map_err(|e| Error::Internal(e.to_string()))?;
    // A name of this caller's own: callers racing in one daemon (the first creates of a new
    // group, at once) must not write or remove one another's file.
    let tmp = dir.join(format!(
        ".{group}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(&ca).expect("a CA serialises"))?;
        f.sync_all()?;
        // Another caller that won the race keeps its CA.
        if let Err(e) = std::fs::hard_link(&tmp, path) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        std::fs::File::open(dir)?.sync_all()
    };
    let written = write();
    let _ = std::fs::remove_file(&tmp);
    written.map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    read(path)
}

#[cfg(test)]
mod tests {
    use super::load_or_create;

    #[test]
    fn callers_racing_in_one_process_all_get_the_one_ca() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress-ca").join("g.json");
        let cas: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&path, "g").unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(cas.iter().all(|c| c.cert_pem == cas[0].cert_pem));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("egress-ca"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["g.json"], "temporary files left");
    }
}
