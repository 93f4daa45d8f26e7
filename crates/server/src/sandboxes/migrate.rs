//! The manager's side of live migration between nodes (the protocol between the daemons is
//! `crate::migrate`; docs/FLEET.md): on the source, taking a running sandbox's VM out of its
//! entry for the migration and either giving it back (the migration failed; it runs on) or
//! letting the sandbox go (handed over); on the destination, receiving the VM, proving it
//! alive, giving it its network and holding it paused until the hand-over, then making it a
//! sandbox of this node.

use std::sync::Arc;
use std::time::Duration;

use moat_net::intercept::CaSpec;
use moat_vm::{Arrived, LaunchOptions, MigrationManifest, MigrationStreams};
use tokio::sync::OwnedRwLockWriteGuard;

use super::{Entry, Manager};
use crate::api::{Sandbox, SandboxState};
use crate::error::{Error, Result};

/// How long a migration waits for the sandbox's requests in flight to end.
const BUSY_WAIT: Duration = Duration::from_secs(30);
/// How long the destination waits for the migration's state to arrive.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(300);

/// A running sandbox's VM taken out of its entry for a migration: its write lock is held, so
/// execs, suspends, deletes and the reaper wait (the agent is quiet meanwhile anyway).
pub(crate) struct Leaving {
    entry: Arc<Entry>,
    slot: OwnedRwLockWriteGuard<Option<moat_vm::Sandbox>>,
}

/// What the destination must know of the sandbox besides the runtime's manifest: who it is
/// to the API and how its network stack must be started so that the guest, which keeps its
/// trust store and its `IDENTITY_HEADER`, finds the same CA and header.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Identity {
    pub group: String,
    pub image: String,
    pub ca: CaSpec,
    pub identity_header: Option<String>,
}

impl Manager {
    /// Takes running sandbox `row`'s VM for a migration (unparked), with what the destination
    /// needs. 409 if it is not running here.
    pub(crate) async fn leave(
        &self,
        row: &Sandbox,
    ) -> Result<(Leaving, moat_vm::Sandbox, MigrationManifest, Identity)> {
        let not_here = || {
            Error::Conflict(format!(
                "sandbox {} is not running on this node: it cannot be migrated",
                row.id
            ))
        };
        if row.state != SandboxState::Running {
            return Err(not_here());
        }
        let entry = self.entry(&row.id).ok_or_else(not_here)?;
        // Requests in flight keep the VM until they end: a long exec is waited for, within
        // a bound, rather than cut.
        let mut slot = tokio::time::timeout(BUSY_WAIT, entry.vm.clone().write_owned())
            .await
            .map_err(|_| {
                Error::Conflict(format!(
                    "sandbox {} has requests in flight that did not end within {} s; it was not \
                     moved",
                    row.id,
                    BUSY_WAIT.as_secs()
                ))
            })?;
        let mut vm = slot.take().ok_or_else(not_here)?;
        if let Err(e) = self.unpark(&row.id, &mut vm).await {
            *slot = Some(vm);
            return Err(e);
        }
        let manifest = vm.migration_manifest(&self.rt);
        let identity = match self.group_ca(&row.group).await {
            Ok(ca) => Identity {
                group: row.group.clone(),
                image: row.image.clone(),
                ca,
                identity_header: vm.identity_header().map(str::to_string),
            },
            Err(e) => {
                *slot = Some(vm);
                return Err(e);
            }
        };
        Ok((Leaving { entry, slot }, vm, manifest, identity))
    }

    /// Why a request that waited for sandbox `id` finds no VM here, if it is that the sandbox
    /// moved to another node meanwhile: 503, to be sent again (any node forwards it there).
    pub(crate) async fn moved_away(&self, id: &str) -> Option<Error> {
        let row = self.store.get_sandbox(id).await.ok()??;
        let node = row.node?;
        (Some(&node) != self.store.node_name().as_ref()).then(|| {
            Error::Unavailable(format!(
                "sandbox {id} moved to node {node} by live migration while this request \
                 waited: send it again (any node forwards it there)"
            ))
        })
    }

    /// The migration failed before the hand-over: the VM (running again) goes back into its
    /// entry, as if nothing happened.
    pub(crate) fn stay(&self, mut leaving: Leaving, vm: moat_vm::Sandbox) {
        *leaving.slot = Some(vm);
    }

    /// The sandbox was handed over to another node: its requests in flight end, its network
    /// link is released and its room given back. The caller ends the source VM
    /// (`Departed::complete`).
    pub(crate) fn left(&self, id: &str, leaving: Leaving) {
        leaving.entry.deleted.send_replace(true);
        drop(leaving.slot);
        self.release_network(id);
        self.cap.release(id);
        self.lock_live().remove(id);
    }

    /// The migration left the source VM unable to continue (its abort failed): the sandbox
    /// is failed with `reason`.
    pub(crate) async fn left_failed(&self, id: &str, leaving: Leaving, reason: &str) {
        self.left(id, leaving);
        if let Err(e) = self.fail(id, reason).await {
            tracing::error!(id, error = %e, "marking a sandbox failed");
        }
    }

    /// Whether `path` is one of this node's own files: in its MOAT_HOME (its templates,
    /// images, snapshots and suspends, wherever their directories link to) or on its shared
    /// storage. A path that exists here but belongs to another home (another node on this
    /// host) is not: separate hosts would not have it.
    pub(crate) fn holds_file(&self, path: &std::path::Path) -> bool {
        let Ok(path) = std::fs::canonicalize(path) else {
            return false;
        };
        let mut roots: Vec<std::path::PathBuf> = self.shared.iter().cloned().collect();
        roots.push(self.rt.home.clone());
        if let Ok(entries) = std::fs::read_dir(&self.rt.home) {
            roots.extend(entries.flatten().map(|e| e.path()));
        }
        roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .any(|r| path.starts_with(r))
    }

    /// Receives sandbox `manifest.id` by live migration on `streams`, proves it alive
    /// (`Arrived::verify`: a destination that fails it is destroyed) and starts its network
    /// stack with the group's policy and the source's CA. The sandbox is returned parked
    /// (paused), so that it does not run on here before the hand-over: [`Manager::arrive`]
    /// continues it once its row is this node's, [`Manager::discard`] ends it otherwise.
    pub(crate) async fn receive(
        self: &Arc<Self>,
        manifest: &MigrationManifest,
        identity: &Identity,
        streams: MigrationStreams,
        whole_disk: bool,
    ) -> Result<moat_vm::Sandbox> {
        let id = manifest.id.clone();
        if self.entry(&id).is_some() {
            return Err(Error::Conflict(format!(
                "sandbox {id} already runs on this node"
            )));
        }
        self.cap.reserve(
            &id,
            manifest.tier,
            &format!(
                "a tier {} sandbox arriving by live migration",
                manifest.tier.as_str()
            ),
        )?;
        let received = async {
            let opts = LaunchOptions {
                detached: true,
                trust_ca: Some(identity.ca.cert_pem.clone()),
                identity_header: identity.identity_header.clone(),
            };
            let arrived = moat_vm::Sandbox::migrate_in(
                &self.rt,
                manifest,
                streams,
                opts,
                ARRIVAL_TIMEOUT,
                whole_disk,
            )
            .await
            .map_err(Error::vm("receiving the live migration"))?;
            let mut sb = arrived
                .verify(Arrived::VERIFY_TIMEOUT)
                .await
                .map_err(Error::vm(
                    "the migrated sandbox failed its check on this node",
                ))?;
            if let Err(e) = self
                .connect_network_with(&id, &identity.group, &sb, Some(identity.ca.clone()))
                .await
            {
                sb.destroy().await;
                return Err(e);
            }
            if let Err(e) = sb.park().await {
                self.release_network(&id);
                sb.destroy().await;
                return Err(Error::vm("pausing the migrated sandbox")(e));
            }
            Ok(sb)
        }
        .await;
        if received.is_err() {
            self.cap.release(&id);
        }
        received
    }

    /// The hand-over committed: `row` is this node's. The received VM is continued and
    /// becomes a live sandbox of this node (one that does not continue is this node's to
    /// watch like any other: its health check fails it).
    pub(crate) async fn arrive(&self, row: &Sandbox, mut sb: moat_vm::Sandbox) {
        let config = self.image_config(&row.image).await;
        if let Err(e) = sb.unpark().await {
            tracing::error!(id = row.id, error = %e, "continuing the migrated sandbox");
        }
        self.insert(&row.id, sb, config);
    }

    /// The hand-over did not happen: the received VM ends.
    pub(crate) async fn discard(&self, sb: moat_vm::Sandbox) {
        let id = sb.id().to_string();
        self.release_network(&id);
        sb.destroy().await;
        self.cap.release(&id);
    }
}
