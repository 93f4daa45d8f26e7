//! Live migration of a running VM to another QEMU over two streams the caller provides: one
//! carries the memory and device state (QEMU's migration stream), the other the disk (NBD).
//! The streams are plain connected sockets, so whoever sets up the migration decides how they
//! travel (a socket pair on one host, a relay over an authenticated connection between hosts);
//! QEMU never opens a socket or a path itself, in or out of its jail.
//!
//! The protocol, libvirt's for non-shared storage:
//!
//! 1. Destination: QEMU starts with `-incoming defer` on the memory stream (inherited), is told
//!    `stop` (so it will not start the guest by itself once the state has arrived), serves its
//!    fresh overlay over NBD (`nbd-server-start` on a listener it gets by `getfd`, one
//!    connection, which this side relays to the disk stream) and starts `migrate-incoming`.
//! 2. Source: an NBD client node on the disk stream (`blockdev-add`, by `getfd`), then
//!    `blockdev-mirror` of the overlay only (`sync: top`: the backing chain must be on the
//!    destination already), or of the whole chain into a destination disk without a backing
//!    file (`sync: full`, [`MigrateParams::whole_disk`]), in `write-blocking` mode: once in sync, every guest write reaches
//!    the destination before it completes, so the disk cannot fall behind however busy the
//!    guest is. When the mirror is ready, the memory is sent live (pre-copy) with
//!    `pause-before-switchover`: QEMU stops the guest when what is left fits in
//!    `downtime-limit` and waits; the mirror is then completed (no write can come any more),
//!    its client removed, and the migration continued with the device state.
//! 3. Destination: once the state is loaded, the NBD server is stopped and the guest continued.
//!
//! A failure anywhere before the source completes leaves the source running: the migration is
//! cancelled, the mirror job and its client node removed, the capabilities reset and the guest
//! continued if QEMU had stopped it. After the source completes it is paused (`postmigrate`)
//! with the full state on the destination; whether it ends or continues is the caller's
//! decision ([`Vm::resume`] is still possible as long as the destination never ran).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use super::{bind, spawn_with, Vm, VmSpec, ERROR_TAIL};
use crate::error::IoContext;
use crate::{Error, Result};

/// QEMU's name of the guest disk (the `-drive id`), also the name of its NBD export.
const DISK: &str = "root";
/// The source's NBD client node, the mirror's target.
const TARGET_NODE: &str = "moat-migration-target";
/// The mirror job.
const MIRROR_JOB: &str = "moat-migration-mirror";
/// `getfd` names.
const FD_MEMORY: &str = "moat-migration-memory";
const FD_DISK: &str = "moat-migration-disk";
const FD_NBD_LISTENER: &str = "moat-migration-nbd";
/// The destination's NBD listener in its run directory; removed once connected.
const NBD_SOCKET: &str = "nbd.sock";
/// How often migration and job states are polled (QMP events would need more round trips
/// to set up than they save).
const POLL: Duration = Duration::from_millis(10);
/// How long winding down a failed migration may take.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(30);

/// The two streams of one migration, connected stream sockets (a Unix socket pair's ends, or
/// sockets relayed to the other host). Each side gets its end of both.
#[derive(Debug)]
pub struct MigrationStreams {
    /// QEMU's migration stream: RAM and device state, source to destination.
    pub memory: OwnedFd,
    /// NBD, both ways: the source's mirror writes the overlay into the destination's disk.
    pub disk: OwnedFd,
}

/// How the source sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateParams {
    /// The longest pause QEMU aims for (`downtime-limit`): pre-copy goes on until the rest of
    /// the RAM can be sent within it at the measured bandwidth.
    pub downtime_limit: Duration,
    /// Slow the guest's vCPUs down when pre-copy does not converge (`auto-converge`): a guest
    /// that dirties memory faster than the stream carries it is otherwise never done.
    pub auto_converge: bool,
    /// Bytes per second the memory stream may use; `None`: no cap (QEMU's default is 128 MiB/s).
    pub max_bandwidth: Option<u64>,
    /// How long the whole migration may take before it is cancelled.
    pub timeout: Duration,
    /// Mirror the whole disk (`sync: full`: every layer of the backing chain, into a
    /// destination disk that has no backing file) instead of the overlay alone (`sync: top`,
    /// the destination holding the same backing chain). The destination must have been
    /// prepared the same way ([`crate::Sandbox::migrate_in`]'s `whole_disk`).
    pub whole_disk: bool,
}

impl Default for MigrateParams {
    fn default() -> Self {
        MigrateParams {
            downtime_limit: Duration::from_millis(300),
            auto_converge: true,
            max_bandwidth: None,
            timeout: Duration::from_secs(600),
            whole_disk: false,
        }
    }
}

/// What QEMU measured on the source (`query-migrate` once completed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MigrationStats {
    /// From the start of the disk mirror to the source's completion, as measured here.
    pub total_ms: u64,
    /// QEMU's `total-time`: the memory migration alone, from `migrate` to completion.
    pub memory_ms: u64,
    /// QEMU's `downtime`: the guest was stopped this long on the source (the last RAM pass,
    /// the mirror's completion, the device state).
    pub downtime_ms: u64,
    /// Bytes of RAM sent, all passes together.
    pub ram_transferred_bytes: u64,
    /// The guest's RAM size.
    pub ram_total_bytes: u64,
    /// Passes over the dirty bitmap (1 for a guest that dirtied nothing meanwhile).
    pub dirty_sync_count: u64,
    /// How far auto-converge slowed the guest down at the end (percent of its CPU time).
    pub cpu_throttle_percentage: u64,
    /// The mirror job's length: bytes of the overlay it went through, and wrote guest writes
    /// meanwhile (zeros cross the stream as NBD write-zeroes requests, so fewer bytes travel).
    pub disk_bytes: u64,
}

/// The destination's side of a migration in progress: the relay of its NBD connection.
/// Dropping it ends the relay (the VM is dropped by its owner).
#[derive(Debug)]
pub(crate) struct MigrationTarget {
    relay: JoinHandle<()>,
}

impl Drop for MigrationTarget {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

/// Starts the destination QEMU for `spec` (which must have no `incoming` image: the memory
/// stream is its incoming migration) and prepares it to receive: see the module's protocol,
/// step 1. Returns once QEMU waits for the stream; [`Vm::finish_migration_in`] waits for it.
pub(crate) async fn spawn_migration_target(
    spec: &VmSpec,
    streams: MigrationStreams,
) -> Result<(Vm, MigrationTarget)> {
    if spec.incoming.is_some() {
        return Err(Error::InvalidArgument(
            "a migration target loads its memory from the stream, not from an image".into(),
        ));
    }
    let MigrationStreams { memory, disk } = streams;
    let memory_fd = memory.as_raw_fd();
    let mut vm = spawn_with(spec, Some(memory)).await?;
    // `stop` while in `inmigrate` clears autostart: the guest must not run before the NBD
    // export is gone (it holds the disk's write permission, which the guest's device wants
    // exclusively) and before the owner decides it may.
    vm.qmp.execute("stop", None).await?;
    let socket = spec.run_dir.join(NBD_SOCKET);
    let listener = bind(&socket)?;
    vm.qmp.getfd(FD_NBD_LISTENER, listener.as_fd()).await?;
    drop(listener);
    vm.qmp
        .execute(
            "nbd-server-start",
            Some(json!({
                "addr": { "type": "fd", "data": { "str": FD_NBD_LISTENER } },
                "max-connections": 1,
            })),
        )
        .await?;
    vm.qmp
        .execute(
            "nbd-server-add",
            Some(json!({ "device": DISK, "writable": true })),
        )
        .await?;
    let local = StdUnixStream::connect(&socket)
        .ctx(|| format!("connecting to the NBD server on {}", socket.display()))?;
    // Nobody else may connect (the server takes one client anyway).
    let _ = std::fs::remove_file(&socket);
    let relay = relay(local, disk)?;
    vm.qmp
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("fd:{memory_fd}") })),
        )
        .await?;
    Ok((vm, MigrationTarget { relay }))
}

/// Copies bytes both ways between the NBD server's connection and the caller's disk stream.
fn relay(local: StdUnixStream, remote: OwnedFd) -> Result<JoinHandle<()>> {
    let remote = StdUnixStream::from(remote);
    for s in [&local, &remote] {
        s.set_nonblocking(true)
            .ctx(|| "configuring the disk stream".to_string())?;
    }
    let mut local =
        UnixStream::from_std(local).ctx(|| "registering the NBD connection".to_string())?;
    let mut remote =
        UnixStream::from_std(remote).ctx(|| "registering the disk stream".to_string())?;
    Ok(tokio::spawn(async move {
        if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut remote).await {
            tracing::debug!(error = %e, "the disk stream of a migration ended");
        }
    }))
}

/// The string field `key` of a QMP reply.
fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

impl Vm {
    /// Sends this running VM to a destination prepared by [`spawn_migration_target`] (the
    /// module's protocol, step 2) and returns once the source is done: it is then paused
    /// (`postmigrate`), its whole state on the destination. On error the migration is wound
    /// down and the VM runs on as before.
    pub(crate) async fn migrate_out(
        &mut self,
        streams: MigrationStreams,
        params: &MigrateParams,
    ) -> Result<MigrationStats> {
        let started = Instant::now();
        let sent = self.send(streams, params, started).await;
        if sent.is_err() {
            if let Err(e) = self.abandon_migration_out().await {
                tracing::error!(error = %e, "winding down a failed migration");
            }
        }
        sent
    }

    async fn send(
        &mut self,
        streams: MigrationStreams,
        params: &MigrateParams,
        started: Instant,
    ) -> Result<MigrationStats> {
        let deadline = started + params.timeout;
        self.qmp.getfd(FD_DISK, streams.disk.as_fd()).await?;
        drop(streams.disk);
        self.qmp
            .execute(
                "blockdev-add",
                Some(json!({
                    "driver": "nbd",
                    "node-name": TARGET_NODE,
                    "server": { "type": "fd", "str": FD_DISK },
                    "export": DISK,
                })),
            )
            .await?;
        self.qmp
            .execute(
                "blockdev-mirror",
                Some(json!({
                    "job-id": MIRROR_JOB,
                    "device": DISK,
                    "target": TARGET_NODE,
                    "sync": if params.whole_disk { "full" } else { "top" },
                    "copy-mode": "write-blocking",
                    "auto-dismiss": false,
                })),
            )
            .await?;
        let disk_bytes = loop {
            let job = self
                .mirror_job(deadline, "waiting for the disk mirror")
                .await?;
            if job["ready"].as_bool() == Some(true) {
                break job["len"].as_u64().unwrap_or(0);
            }
            if text(&job, "status") == "concluded" {
                return Err(mirror_error(&job));
            }
            tokio::time::sleep(POLL).await;
        };
        let caps = json!({ "capabilities": [
            { "capability": "pause-before-switchover", "state": true },
            // The destination cannot be assumed to map the same template RAM: all RAM goes
            // in the stream (and a stream with it on would carry different headers).
            { "capability": "x-ignore-shared", "state": false },
            { "capability": "auto-converge", "state": params.auto_converge },
        ]});
        self.qmp
            .execute("migrate-set-capabilities", Some(caps))
            .await?;
        self.qmp
            .execute(
                "migrate-set-parameters",
                Some(json!({
                    "downtime-limit": params.downtime_limit.as_millis() as u64,
                    "max-bandwidth": params.max_bandwidth.unwrap_or(1u64 << 40),
                })),
            )
            .await?;
        self.qmp.getfd(FD_MEMORY, streams.memory.as_fd()).await?;
        drop(streams.memory);
        self.qmp
            .execute("migrate", Some(json!({ "uri": format!("fd:{FD_MEMORY}") })))
            .await?;
        let mut switched = false;
        let mig = loop {
            let mig = self.query_migrate(deadline).await?;
            match text(&mig, "status").as_str() {
                "completed" => break mig,
                "failed" | "cancelled" => {
                    return Err(Error::Migration {
                        what: "live migration",
                        desc: mig["error-desc"]
                            .as_str()
                            .unwrap_or("no error description from QEMU")
                            .to_string(),
                    })
                }
                "pre-switchover" if !switched => {
                    // The guest is stopped and its I/O drained: completing the mirror now
                    // leaves the destination's disk exactly the source's.
                    self.complete_mirror(deadline).await?;
                    self.qmp
                        .execute(
                            "migrate-continue",
                            Some(json!({ "state": "pre-switchover" })),
                        )
                        .await?;
                    switched = true;
                }
                _ => {}
            }
            tokio::time::sleep(POLL).await;
        };
        self.qmp.take_events();
        let ram = &mig["ram"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        Ok(MigrationStats {
            total_ms: started.elapsed().as_millis() as u64,
            memory_ms: n(&mig["total-time"]),
            downtime_ms: n(&mig["downtime"]),
            ram_transferred_bytes: n(&ram["transferred"]),
            ram_total_bytes: n(&ram["total"]),
            dirty_sync_count: n(&ram["dirty-sync-count"]),
            cpu_throttle_percentage: n(&mig["cpu-throttle-percentage"]),
            disk_bytes,
        })
    }

    /// `query-migrate`, unless QEMU exits or `deadline` passes.
    async fn query_migrate(&mut self, deadline: Instant) -> Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        let fut = self.qmp.execute("query-migrate", None);
        self.proc.while_alive("migrating the VM", left, fut).await?
    }

    /// The mirror job's entry in `query-block-jobs` (it stays, `concluded`, until dismissed).
    async fn mirror_job(&mut self, deadline: Instant, what: &str) -> Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        let fut = self.qmp.execute("query-block-jobs", None);
        let jobs = self.proc.while_alive(what, left, fut).await??;
        jobs.as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["device"] == MIRROR_JOB))
            .cloned()
            .ok_or_else(|| Error::Migration {
                what: "live migration",
                desc: "the disk mirror job is gone".into(),
            })
    }

    /// Completes the ready mirror without switching the guest to it (`block-job-cancel` of a
    /// ready mirror: the target becomes a consistent copy), dismisses it and disconnects
    /// the target.
    async fn complete_mirror(&mut self, deadline: Instant) -> Result<()> {
        self.qmp
            .execute("block-job-cancel", Some(json!({ "device": MIRROR_JOB })))
            .await?;
        loop {
            let job = self
                .mirror_job(deadline, "completing the disk mirror")
                .await?;
            if text(&job, "status") == "concluded" {
                if job.get("error").is_some() {
                    return Err(mirror_error(&job));
                }
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        self.qmp
            .execute("job-dismiss", Some(json!({ "id": MIRROR_JOB })))
            .await?;
        self.qmp
            .execute("blockdev-del", Some(json!({ "node-name": TARGET_NODE })))
            .await?;
        Ok(())
    }

    /// Winds a failed outgoing migration down so that the VM runs on as before: each step is
    /// tried whatever state the failure left (most find nothing to do).
    async fn abandon_migration_out(&mut self) -> Result<()> {
        let q = &mut self.qmp;
        let _ = q.execute("migrate_cancel", None).await;
        let _ = q
            .execute(
                "block-job-cancel",
                Some(json!({ "device": MIRROR_JOB, "force": true })),
            )
            .await;
        let deadline = Instant::now() + ABANDON_TIMEOUT;
        loop {
            match self
                .mirror_job(deadline, "cancelling the disk mirror")
                .await
            {
                Err(Error::Migration { .. }) => break,
                Err(e) => return Err(e),
                Ok(job) if text(&job, "status") == "concluded" => {
                    self.qmp
                        .execute("job-dismiss", Some(json!({ "id": MIRROR_JOB })))
                        .await?;
                    break;
                }
                Ok(_) => tokio::time::sleep(POLL).await,
            }
        }
        let q = &mut self.qmp;
        let _ = q
            .execute("blockdev-del", Some(json!({ "node-name": TARGET_NODE })))
            .await;
        for name in [FD_DISK, FD_MEMORY] {
            let _ = q.execute("closefd", Some(json!({ "fdname": name }))).await;
        }
        // A later snapshot is a migration too: it must not stop at pre-switchover.
        let caps = json!({ "capabilities": [
            { "capability": "pause-before-switchover", "state": false },
            { "capability": "auto-converge", "state": false },
        ]});
        q.execute("migrate-set-capabilities", Some(caps)).await?;
        q.take_events();
        if self.ensure_running().await? {
            tracing::warn!(
                pid = self.pid(),
                "continued the VM after a failed migration"
            );
        }
        Ok(())
    }

    /// Waits until the incoming migration prepared by [`spawn_migration_target`] has loaded
    /// (at most `timeout`), stops the NBD server and starts the guest (the module's protocol,
    /// step 3).
    pub(crate) async fn finish_migration_in(
        &mut self,
        target: MigrationTarget,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let fut = self.qmp.execute("query-status", None);
            let status = self
                .proc
                .while_alive("receiving a live migration", left, fut)
                .await??;
            match text(&status, "status").as_str() {
                "inmigrate" => {}
                "paused" => break,
                other => {
                    return Err(Error::Migration {
                        what: "incoming live migration",
                        desc: format!("unexpected VM status {other:?} while receiving"),
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "receiving a live migration".into(),
                    secs: timeout.as_secs_f64(),
                    console_tail: self.console_tail(ERROR_TAIL),
                });
            }
            tokio::time::sleep(POLL).await;
        }
        let mig = self.qmp.execute("query-migrate", None).await?;
        if text(&mig, "status") != "completed" {
            return Err(Error::Migration {
                what: "incoming live migration",
                desc: mig["error-desc"].as_str().map_or_else(
                    || format!("status {:?}", text(&mig, "status")),
                    str::to_string,
                ),
            });
        }
        self.qmp.execute("nbd-server-stop", None).await?;
        drop(target);
        self.qmp.take_events();
        self.qmp.execute("cont", None).await?;
        Ok(())
    }
}

fn mirror_error(job: &Value) -> Error {
    Error::Migration {
        what: "live migration",
        desc: format!(
            "the disk mirror failed: {}",
            job["error"]
                .as_str()
                .unwrap_or("no error description from QEMU")
        ),
    }
}
