//! This daemon as a node of the store it shares with others (docs/FLEET.md): its name,
//! advertised URL and lease flags, the lease taken at start, and the timer that renews it,
//! takes a new one when it was lost, marks the nodes whose leases expired `lost`, and picks
//! up signing keys another node rotated.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::api::quote;
use crate::error::{Error, Result};
use crate::store::{NodeSpec, Renewal, Store};

/// The default of `--lease-s`.
pub const DEFAULT_LEASE_S: u64 = 10;
/// The bounds of `--lease-s`: renewals every third of it must fit a slow database round trip,
/// and a lost node is noticed within about one lease.
pub const MIN_LEASE_S: u64 = 3;
pub const MAX_LEASE_S: u64 = 300;
/// `--node-label`s a node may have.
pub const MAX_NODE_LABELS: usize = 32;

/// `moat serve --node-name/--advertise-url/--lease-s/--node-label`.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    /// Default: the host name's first label, made a valid name.
    pub name: Option<String>,
    /// Default: the scheme and `--listen` address (the host name for an unspecified address).
    pub advertise_url: Option<String>,
    /// Default [`DEFAULT_LEASE_S`].
    pub lease_s: Option<u64>,
    /// `k=v` each.
    pub labels: Vec<String>,
}

/// The checked node settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub advertise_url: String,
    pub lease: Duration,
    pub labels: BTreeMap<String, String>,
}

impl NodeConfig {
    /// Checks the flags, with the defaults filled in; every error names the flag and what is
    /// allowed.
    pub fn settings(&self, scheme: &str, listen: SocketAddr) -> Result<Settings> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => default_name()?,
        };
        crate::api::validate_name("--node-name", &name)
            .map_err(|e| Error::Config(e.to_string()))?;
        let lease_s = self.lease_s.unwrap_or(DEFAULT_LEASE_S);
        if !(MIN_LEASE_S..=MAX_LEASE_S).contains(&lease_s) {
            return Err(Error::Config(format!(
                "invalid --lease-s {lease_s}: allowed is {MIN_LEASE_S} to {MAX_LEASE_S} seconds"
            )));
        }
        let advertise_url = match &self.advertise_url {
            Some(u) => {
                validate_url(u)?;
                u.clone()
            }
            None if listen.ip().is_unspecified() => {
                format!("{scheme}://{}:{}", host_name()?, listen.port())
            }
            None => format!("{scheme}://{listen}"),
        };
        let mut labels = BTreeMap::new();
        for kv in &self.labels {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                Error::Config(format!(
                    "invalid --node-label {}: expected KEY=VALUE",
                    quote(kv)
                ))
            })?;
            labels.insert(k.to_string(), v.to_string());
        }
        crate::api::validate_labels(&labels)
            .map_err(|e| Error::Config(format!("--node-label: {e}")))?;
        if labels.len() > MAX_NODE_LABELS {
            return Err(Error::Config(format!(
                "too many --node-label ({}): at most {MAX_NODE_LABELS}",
                labels.len()
            )));
        }
        Ok(Settings {
            name,
            advertise_url,
            lease: Duration::from_secs(lease_s),
            labels,
        })
    }
}

fn host_name() -> Result<String> {
    nix::unistd::gethostname()
        .map_err(|e| Error::Config(format!("reading the host name: {e}")))?
        .into_string()
        .map_err(|_| Error::Config("the host name is not UTF-8".into()))
}

/// The host name's first label as a node name: lowercased, other characters made '-', at
/// most 63 characters ("node" if nothing is left), so that a daemon starts on any host.
fn default_name() -> Result<String> {
    let host = host_name()?;
    let label: String = host
        .split('.')
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .take(63)
        .collect();
    let name = label.trim_matches('-');
    Ok(if name.is_empty() { "node" } else { name }.to_string())
}

/// `--advertise-url`: http:// or https://, a host, no query or fragment (it is where other
/// nodes and clients send requests).
fn validate_url(url: &str) -> Result<()> {
    if crate::api::is_http_base_url(url) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid --advertise-url {}: expected http://HOST[:PORT] or https://HOST[:PORT] \
             (how other nodes and clients reach this one), without a query or fragment",
            quote(url)
        )))
    }
}

/// The random id of this MOAT_HOME as a lease holder (`MOAT_HOME/node-id`, made once): a
/// restart of the same home takes its node back at once, another home must wait for the lease.
pub fn holder_id(home: &Path) -> Result<String> {
    let path = home.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    let tmp = home.join(format!(".node-id.{}", std::process::id()));
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(id)
}

/// Takes this node's lease (blocking). A live lease of another home with the same name is
/// waited out for one lease time (a replacement node started as the old one died), then
/// refused.
pub fn acquire(store: &Store, spec: &NodeSpec) -> Result<crate::store::Lease> {
    let deadline = std::time::Instant::now() + Duration::from_millis(spec.lease_ms as u64 + 1000);
    loop {
        match store.acquire_lease(spec)? {
            Ok(lease) => return Ok(lease),
            Err(held) if std::time::Instant::now() >= deadline => return Err(Error::Config(held)),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Renews the lease every third of its length for as long as the daemon runs; a lost lease
/// is said loudly and taken again with a new epoch. Each round also follows a rotation of the
/// sealing key, marks nodes whose leases expired `lost` and reloads signing keys another node
/// rotated.
pub async fn run(
    store: Store,
    spec: NodeSpec,
    sandboxes: Arc<crate::readiness::Sandboxes>,
    identity: Arc<crate::identity::Issuer>,
) {
    // Ticks every third of the lease from the start of one round to the next, so the
    // round's own work (ending disowned VMs, the sweep, the keys) does not stretch it.
    let mut tick = tokio::time::interval(Duration::from_millis(spec.lease_ms as u64 / 3));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    if let Err(e) = store.sync_sealing_key().await {
        tracing::error!(node = %spec.name, error = %e, "the sealing key");
    }
    let mut lost = false;
    loop {
        tick.tick().await;
        let usage = sandboxes.ready().map(|m| m.usage());
        let (mem, cpu, vms) =
            usage.map_or((0, 0, 0), |u| (u.memory_mib, u.millicpus, u.vms as u64));
        match store.renew_lease(mem, cpu, vms).await {
            Ok(Renewal::Renewed(_)) => {
                if let Some(mgr) = sandboxes.ready() {
                    mgr.drop_disowned().await;
                }
            }
            Ok(Renewal::Lost(why)) => {
                if !lost {
                    eprintln!(
                        "moat serve: node {} LOST ITS LEASE: {why}. It changes nothing until it \
                         holds a new one.",
                        spec.name
                    );
                    tracing::error!(node = %spec.name, reason = %why, "lease lost; fenced");
                }
                lost = true;
                let (s, sp) = (store.clone(), spec.clone());
                match tokio::task::spawn_blocking(move || s.acquire_lease(&sp)).await {
                    Ok(Ok(Ok(lease))) => {
                        lost = false;
                        eprintln!(
                            "moat serve: node {} took its lease again, epoch {}",
                            spec.name, lease.epoch
                        );
                        tracing::warn!(node = %spec.name, epoch = lease.epoch, "lease re-acquired");
                        if let Some(mgr) = sandboxes.ready() {
                            mgr.drop_disowned().await;
                        }
                    }
                    Ok(Ok(Err(held))) => tracing::error!(node = %spec.name, %held, "lease"),
                    Ok(Err(e)) => {
                        tracing::error!(node = %spec.name, error = %e, "taking the lease")
                    }
                    Err(e) => tracing::error!(node = %spec.name, error = %e, "taking the lease"),
                }
                continue;
            }
            Err(e) => {
                tracing::error!(node = %spec.name, error = %e, "cannot renew the lease");
                continue;
            }
        }
        match store.sync_sealing_key().await {
            Ok(Some(id)) => {
                eprintln!(
                    "moat serve: node {} switched to the rotated sealing key {id} (its \
                     secrets.key.next is now its secrets.key)",
                    spec.name
                );
                tracing::warn!(node = %spec.name, key = %id, "sealing key rotated");
            }
            Ok(None) => {}
            Err(e) => tracing::error!(node = %spec.name, error = %e, "the sealing key"),
        }
        match store.sweep_lost_nodes().await {
            Ok(swept) => {
                for (node, sandboxes) in swept {
                    tracing::warn!(%node, sandboxes, "node lost: its lease expired");
                }
            }
            Err(e) => tracing::warn!(error = %e, "checking for lost nodes"),
        }
        let issuer = identity.clone();
        match tokio::task::spawn_blocking(move || issuer.refresh()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "reloading the signing keys"),
            Err(e) => tracing::warn!(error = %e, "reloading the signing keys"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen() -> SocketAddr {
        "127.0.0.1:7070".parse().unwrap()
    }

    #[test]
    fn the_default_name_is_always_valid() {
        let name = default_name().unwrap();
        crate::api::validate_name("node name", &name).unwrap();
    }

    #[test]
    fn node_flags_are_checked_with_what_is_allowed() {
        let ok = NodeConfig {
            name: Some("n-1".into()),
            lease_s: Some(5),
            labels: vec!["zone=a".into(), "gpu=none".into()],
            ..Default::default()
        }
        .settings("http", listen())
        .unwrap();
        assert_eq!(ok.advertise_url, "http://127.0.0.1:7070");
        assert_eq!(ok.lease, Duration::from_secs(5));
        assert_eq!(ok.labels.len(), 2);
        let bad = |c: NodeConfig| c.settings("https", listen()).unwrap_err().to_string();
        let e = bad(NodeConfig {
            name: Some("Bad_Name".into()),
            ..Default::default()
        });
        assert!(e.contains("--node-name") && e.contains("lowercase"), "{e}");
        for lease in [0, 2, 301] {
            let e = bad(NodeConfig {
                name: Some("n".into()),
                lease_s: Some(lease),
                ..Default::default()
            });
            assert!(e.contains("--lease-s") && e.contains("3 to 300"), "{e}");
        }
        let e = bad(NodeConfig {
            name: Some("n".into()),
            advertise_url: Some("ftp://x".into()),
            ..Default::default()
        });
        assert!(
            e.contains("--advertise-url") && e.contains("http://HOST"),
            "{e}"
        );
        let e = bad(NodeConfig {
            name: Some("n".into()),
            labels: vec!["novalue".into()],
            ..Default::default()
        });
        assert!(e.contains("KEY=VALUE"), "{e}");
        let everywhere = NodeConfig {
            name: Some("n".into()),
            ..Default::default()
        }
        .settings("https", "0.0.0.0:7443".parse().unwrap())
        .unwrap();
        assert!(everywhere.advertise_url.starts_with("https://"));
        assert!(everywhere.advertise_url.ends_with(":7443"));
        assert!(!everywhere.advertise_url.contains("0.0.0.0"));
    }
}
