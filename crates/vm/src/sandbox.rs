//! A sandbox: one QEMU process, its copy-on-write disk, its run directory and a session with its
//! agent. Booted from a base disk, or restored from a snapshot (a template is one).
//!
//! For a daemon, sandboxes can be *detached* ([`LaunchOptions::detached`]): QEMU outlives its
//! owner, `run/<id>/sandbox.json` records what taking it over needs, and the next owner finds
//! it with [`Runtime::orphans`] and takes it over with [`Sandbox::adopt`]. A sandbox can also
//! be *suspended* to a directory (memory and a flattened disk, no process) and resumed.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::AgentConn;
use crate::assets::{Initramfs, Kernel};
use crate::error::IoContext;
use crate::netstack::{self, NetStack};
use crate::qemu::{
    GuestRam, Incoming, MigrateParams, MigrationStats, MigrationStreams, Vm, VmSpec,
};
use serde::{Deserialize, Serialize};

use crate::snapshot::{self, BaseDisk, SnapshotMeta, SNAPSHOT_FORMAT};
use crate::tier::Tier;
use crate::{disk, AccelChoice, Error, Result};

/// How a sandbox's QEMU is started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    /// QEMU outlives this process (see [`crate::VmSpec::detached`]) and `sandbox.json` is
    /// written so that another process can [`Sandbox::adopt`] it. `moat run` leaves this off:
    /// its VMs must die with it.
    pub detached: bool,
    /// A CA (PEM) the guest adds to its trust store at boot and restore: the group's egress
    /// CA, whose certificates the network stack presents for intercepted hosts.
    pub trust_ca: Option<String>,
    /// This incarnation's `IDENTITY_HEADER`, when the guest may fetch identity tokens: the
    /// agent gives execs `IDENTITY_ENDPOINT` and it, and [`Sandbox::identity_header`] keeps it
    /// for the network stack that serves the endpoint. A new one for every start.
    pub identity_header: Option<String>,
}

/// When each step of a sandbox's start was done, measured from the start (steps overlap, so
/// these are points in time, not durations that add up): what the density bench reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartPhases {
    /// QEMU answers QMP; a restore's incoming migration has started.
    pub qemu: Duration,
    /// The network stack is spawned.
    pub net_started: Duration,
    /// The guest runs: a restore's memory is loaded and the VM continued (a boot: as `qemu`).
    pub running: Duration,
    /// The agent answered the handshake.
    pub agent_ready: Duration,
    /// Clock, entropy, hostname and network configured: the sandbox is ready.
    pub ready: Duration,
}

/// `run/<id>/sandbox.json`, written atomically when a detached sandbox starts: everything
/// [`Sandbox::adopt`] needs that the VM cannot tell us.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    /// Version of this file ([`SandboxRecord::FORMAT`]).
    pub format: u32,
    pub id: String,
    /// QEMU's pid; trusted only after [`crate::qemu::is_qemu_of`] confirms it.
    pub pid: u32,
    /// Digest of the image.
    pub image: String,
    pub tier: Tier,
    pub mem_mib: u32,
    pub cpus: u32,
    /// The sandbox's own overlay (`run/<id>/disk.qcow2`).
    pub disk: PathBuf,
    /// The overlay's direct backing file; the overlay itself when it has none (a disk that
    /// arrived whole by live migration).
    pub backing: PathBuf,
    /// The shared read-only disk a suspend flattens onto (see [`SnapshotMeta::shared_base`]).
    pub shared_base: BaseDisk,
    pub created_unix: u64,
    /// The template whose RAM the VM maps (a clone), so that an adopted clone's suspend also
    /// stores only what differs from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_base: Option<PathBuf>,
}

impl SandboxRecord {
    pub const FORMAT: u32 = 1;
    const FILE: &'static str = "sandbox.json";

    /// Reads `dir/sandbox.json`.
    pub fn load(dir: &Path) -> Result<SandboxRecord> {
        let path = dir.join(Self::FILE);
        let bytes = std::fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
        let rec: SandboxRecord = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Adopt(format!("{} is malformed: {e}", path.display())))?;
        if rec.format != Self::FORMAT {
            return Err(Error::Adopt(format!(
                "{} has format {}; this moat reads format {}",
                path.display(),
                rec.format,
                Self::FORMAT
            )));
        }
        Ok(rec)
    }

    fn store(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("encoding sandbox.json: {e}")))?;
        crate::util::write_atomic(&dir.join(Self::FILE), &bytes)
    }
}

/// What the destination of a live migration needs to know about the sandbox before its
/// state arrives ([`Sandbox::migration_manifest`], [`Sandbox::migrate_in`]): the owner sends
/// it ahead of the streams. Paths are the source's: the destination must hold the overlay's
/// backing chain at the same paths (the image's rootfs, and the snapshot, template or
/// suspend directory's disk a restored sandbox's overlay sits on), as on shared storage or
/// after copying them; only the overlay itself travels with the migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationManifest {
    /// Version of this document ([`MigrationManifest::FORMAT`]).
    pub format: u32,
    pub id: String,
    /// Digest of the image.
    pub image: String,
    pub tier: Tier,
    pub mem_mib: u32,
    pub cpus: u32,
    /// The shared read-only disk a suspend flattens onto.
    pub shared_base: BaseDisk,
    /// The overlay's direct backing file, and its format (`raw` or `qcow2`).
    pub backing: BaseDisk,
    /// The overlay has no backing file (it arrived whole by an earlier live migration): the
    /// destination must receive the whole disk, and `backing` names the source's overlay.
    #[serde(default)]
    pub standalone: bool,
    /// Both QEMUs must be the same build on the same accelerator, with the same guest kernel
    /// and agent (the guest keeps running the source's, and later snapshots name them).
    pub accel: String,
    pub qemu_version: String,
    pub kernel_version: String,
    pub initramfs_sha256: String,
}

impl MigrationManifest {
    pub const FORMAT: u32 = 1;

    /// Refuses a manifest this host cannot receive, naming what differs. A host that
    /// receives the `whole_disk` needs none of the source's disk files.
    fn check(&self, rt: &Runtime, whole_disk: bool) -> Result<()> {
        if self.format != Self::FORMAT {
            return Err(Error::InvalidArgument(format!(
                "migration manifest format {}; this moat reads format {}",
                self.format,
                Self::FORMAT
            )));
        }
        let pairs = [
            ("accelerator", rt.accel.accel.as_str(), self.accel.as_str()),
            ("QEMU", &rt.qemu_version, &self.qemu_version),
            ("guest kernel", &rt.kernel.version, &self.kernel_version),
            ("guest agent", &rt.initramfs.sha256, &self.initramfs_sha256),
        ];
        for (what, ours, theirs) in pairs {
            if ours != theirs {
                return Err(Error::InvalidArgument(format!(
                    "sandbox {} runs on {what} {theirs}, this host has {ours}: it cannot migrate here",
                    self.id
                )));
            }
        }
        if whole_disk {
            return Ok(());
        }
        if self.standalone {
            return Err(Error::InvalidArgument(format!(
                "sandbox {}: its disk has no backing file, so it can only be received whole",
                self.id
            )));
        }
        if !matches!(self.backing.format.as_str(), "raw" | "qcow2") {
            return Err(Error::InvalidArgument(format!(
                "backing format {:?}: use \"raw\" or \"qcow2\"",
                self.backing.format
            )));
        }
        if !self.backing.path.is_file() {
            return Err(Error::InvalidArgument(format!(
                "sandbox {}: its disk's backing file {} is not on this host",
                self.id,
                self.backing.path.display()
            )));
        }
        Ok(())
    }
}

/// `run/<id>/departed.json`: the sandbox's live migration completed on this side (its
/// [`MigrationStats`]); the paused QEMU must not be continued by whoever adopts it next.
const DEPARTED_FILE: &str = "departed.json";

/// A sandbox whose live migration has left the source ([`Sandbox::migrate_out`]): its QEMU is
/// paused with everything on the destination. Exactly one of the two must run from here on:
/// [`Departed::complete`] once the destination runs, [`Departed::abort`] if it is gone.
/// Dropping it kills the source, like `complete`. Its run directory is marked departed, so an
/// owner that dies now leaves a QEMU that [`Sandbox::adopt`] ends instead of continuing
/// (unless the next owner knows better: [`Runtime::cancel_departure`]).
#[derive(Debug)]
pub struct Departed {
    sandbox: Sandbox,
    stats: MigrationStats,
    quiet: crate::agent::Quiesced,
}

impl Departed {
    /// What QEMU measured.
    pub fn stats(&self) -> &MigrationStats {
        &self.stats
    }

    /// The destination runs the sandbox ([`Arrived::verify`] succeeded there): the source
    /// ends and its run directory goes.
    pub async fn complete(self) {
        self.sandbox.destroy().await;
    }

    /// The destination does not run the sandbox and never will ([`Sandbox::migrate_in`] or
    /// [`Arrived::verify`] failed there, which removes its QEMU, or the owner gave up on it): the source continues
    /// as it was. Never call this while the destination may still run: two copies would go
    /// on from one state.
    pub async fn abort(self) -> Result<Sandbox> {
        let Departed {
            mut sandbox, quiet, ..
        } = self;
        // Before `cont`: an owner dying in between leaves a VM that adopt continues, which
        // is what was decided here.
        let marker = sandbox.dir.path.join(DEPARTED_FILE);
        std::fs::remove_file(&marker).ctx(|| format!("removing {}", marker.display()))?;
        sandbox.vm.resume().await?;
        quiet.release().await?;
        // The pause was short, but the guest's clock stood still through it.
        sandbox.agent.refresh(None).await?;
        tracing::warn!(
            id = sandbox.id,
            "live migration aborted; the source runs on"
        );
        Ok(sandbox)
    }

    /// Lets go of the paused source without deciding (a daemon's graceful restart): as
    /// [`Sandbox::detach`]; the next owner's [`Sandbox::adopt`] ends it, unless it calls
    /// [`Runtime::cancel_departure`] first.
    pub fn detach(self) -> Result<()> {
        self.sandbox.detach()
    }
}

/// A sandbox whose live migration arrived ([`Sandbox::migrate_in`]): it runs on the
/// destination and its agent said hello, but it is not yet proven alive. Under TCG about 2%
/// of migrations here left a destination guest that oopsed or stopped making progress just
/// after `cont` (docs/SNAPSHOTS.md), so the only way to its [`Sandbox`] is
/// [`Arrived::verify`]: a real round trip with the guest. The owner tells the source to
/// [`Departed::complete`] only after `verify` succeeded, and [`Departed::abort`]s it
/// otherwise. Dropping it kills the destination's QEMU.
#[derive(Debug)]
pub struct Arrived {
    sandbox: Sandbox,
}

impl Arrived {
    /// A bound for [`Arrived::verify`]: an exec takes well under a second under TCG here; a
    /// guest that has not answered in this long is not going to.
    pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(20);

    pub fn id(&self) -> &str {
        self.sandbox.id()
    }

    /// The destination's QEMU.
    pub fn qemu_pid(&self) -> u32 {
        self.sandbox.qemu_pid()
    }

    /// Gives up on the destination (the owner aborts the source instead): as
    /// [`Sandbox::destroy`].
    pub async fn destroy(self) {
        self.sandbox.destroy().await;
    }

    /// Proves the destination guest runs: it starts a process that sleeps 100 ms (the agent's
    /// session, process creation and the guest's timers all work) and reports its exit within
    /// `timeout` ([`Arrived::VERIFY_TIMEOUT`] unless the owner knows better). On failure the
    /// destination is destroyed (its QEMU, network stack and run directory) and the error,
    /// with the guest's console when QEMU died, returned: the owner then aborts the source,
    /// which has not run since and is the one copy.
    pub async fn verify(self, timeout: Duration) -> Result<Sandbox> {
        let mut sb = self.sandbox;
        let request = moat_protocol::ExecRequest::new(&["/bin/sleep", "0.1"], &[]);
        let exec = sb.agent.exec_output(request, 4096);
        let checked = match sb
            .vm
            .while_alive("the migrated guest's first exec", timeout, exec)
            .await
        {
            Ok(Ok(out)) if out.status.code == Some(0) => Ok(()),
            Ok(Ok(out)) => Err(Error::Agent(format!(
                "the migrated guest's first exec ended with {:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))),
            Ok(Err(e)) | Err(e) => Err(e),
        };
        match checked {
            Ok(()) => Ok(sb),
            Err(e) => {
                tracing::error!(id = sb.id, error = %e, "the migrated guest does not run; destroying the destination");
                sb.destroy().await;
                Err(e)
            }
        }
    }
}

/// A live migration that failed on the source: the sandbox runs on, as before.
#[derive(Debug)]
pub struct Stayed {
    pub sandbox: Sandbox,
    pub error: Error,
}

/// How long a cold boot may take to reach "agent ready". TCG boots take ~3 s here; a guest that
/// takes 20× longer is broken.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restored guest may take to answer.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the runtime needs that does not change between sandboxes.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub home: PathBuf,
    pub accel: AccelChoice,
    pub kernel: Kernel,
    pub initramfs: Initramfs,
    pub qemu_version: String,
    /// The program run as each sandbox's network stack, as `<net_stack> net-stack` (the
    /// `moat` binary; see [`crate::netstack`]).
    pub net_stack: PathBuf,
    /// Whether VMs and network stacks run jailed (see [`crate::jail`]).
    pub jail: crate::jail::JailMode,
}

impl Runtime {
    /// Finds the installed kernel, builds (or reuses) the initramfs for `agent_bin`, detects the
    /// accelerator and removes run directories that crashed processes left behind. Sandboxes'
    /// network stacks are run as `net_stack net-stack` (the `moat` binary).
    pub fn new(
        home: &Path,
        agent_bin: &Path,
        net_stack: &Path,
        accel_override: Option<&str>,
    ) -> Result<Runtime> {
        let kernel = crate::assets::installed_kernel(home)?;
        let initramfs = crate::assets::build_initramfs(&kernel, agent_bin, home)?;
        let accel = crate::accel::detect(accel_override)?;
        let qemu_version = crate::qemu::qemu_version_cached(&home.join("qemu-version.json"))?;
        let jail = crate::jail::JailMode::from_env()?;
        tracing::info!(jail = %jail.describe(), "sandbox jail");
        let rt = Runtime {
            home: home.to_path_buf(),
            accel,
            kernel,
            initramfs,
            qemu_version,
            net_stack: net_stack.to_path_buf(),
            jail,
        };
        rt.collect_garbage();
        Ok(rt)
    }

    pub fn run_root(&self) -> PathBuf {
        self.home.join("run")
    }

    /// Makes the paused source of a completed live migration whose owner died
    /// ([`Departed::detach`], or a crash) adoptable again: the next [`Sandbox::adopt`]
    /// continues it. Only for an owner that knows the destination does not run the sandbox
    /// and never will; otherwise adopt ends it. Refused while another process owns it.
    pub fn cancel_departure(&self, id: &str) -> Result<()> {
        let mut dir = RunDir::open(self, id)?;
        dir.keep = true;
        let marker = dir.path.join(DEPARTED_FILE);
        std::fs::remove_file(&marker).ctx(|| format!("removing {}", marker.display()))
    }

    /// Removes run directories whose owner is gone: a process that owns one holds an exclusive
    /// lock on its `lock` file for as long as it lives, even through `kill -9` (the kernel drops
    /// the lock with the process). Directories are created complete, lock held, under a
    /// `.tmp-` name and renamed into place, so a directory without a held lock is garbage,
    /// unless a detached QEMU still runs it (its `sandbox.json` pid is a live QEMU of its
    /// disk): that is an orphan waiting for [`Sandbox::adopt`]. A `.tmp-` directory is garbage
    /// only once it is old enough that its creator must be gone.
    ///
    /// Called by [`Runtime::new`]; a daemon may call it again at any time.
    pub fn collect_garbage(&self) {
        let Ok(entries) = std::fs::read_dir(self.run_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let young = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < Duration::from_secs(60)));
                if young {
                    continue;
                }
            }
            if !lock_is_free(&dir) || live_qemu(&dir).is_some() {
                continue;
            }
            // A detached QEMU whose owner died before writing sandbox.json cannot be adopted;
            // it must not run on without its directory.
            crate::qemu::kill_qemu_of(&dir.join("disk.qcow2"));
            tracing::info!(dir = %dir.display(), "removing run directory of a dead sandbox");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// Ids of detached sandboxes whose owner is gone but whose QEMU still runs: a free lock
    /// and a live QEMU of the directory's disk. A daemon adopts them with [`Sandbox::adopt`].
    pub fn orphans(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.run_root()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
            .filter(|e| {
                let dir = e.path();
                dir.join("lock").exists() && lock_is_free(&dir) && live_qemu(&dir).is_some()
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    }
}

/// Whether nobody holds `dir/lock` (a missing lock file counts as free).
fn lock_is_free(dir: &Path) -> bool {
    let lock = dir.join("lock");
    !lock.exists() || matches!(snapshot::try_lock(&lock), Ok(Some(_)))
}

/// The pid of the detached QEMU running `dir`, if its `sandbox.json` names a live one.
fn live_qemu(dir: &Path) -> Option<u32> {
    let rec = SandboxRecord::load(dir).ok()?;
    crate::qemu::is_qemu_of(rec.pid, &dir.join("disk.qcow2")).then_some(rec.pid)
}

/// The per-sandbox directory under `MOAT_HOME/run`: removed when the sandbox is dropped.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    _lock: File,
    /// Leave the directory in place on drop (the lock is still released).
    keep: bool,
}

impl RunDir {
    fn create(rt: &Runtime, id: &str) -> Result<RunDir> {
        let path = rt.run_root().join(id);
        if path.exists() {
            return Err(Error::InvalidArgument(format!(
                "sandbox {id} exists already"
            )));
        }
        let tmp = rt
            .run_root()
            .join(format!(".tmp-{id}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        let locked = snapshot::try_lock(&tmp.join("lock")).and_then(|lock| {
            let lock = lock.ok_or_else(|| {
                Error::InvalidArgument(format!("{} is locked by another process", tmp.display()))
            })?;
            // The lock is on the file, so it moves with the directory.
            std::fs::rename(&tmp, &path).ctx(|| {
                format!(
                    "creating {} (does the sandbox exist already?)",
                    path.display()
                )
            })?;
            Ok(lock)
        });
        match locked {
            Ok(lock) => Ok(RunDir {
                path,
                _lock: lock,
                keep: false,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }
}

impl RunDir {
    /// Takes over the directory of sandbox `id` if its lock is free.
    fn open(rt: &Runtime, id: &str) -> Result<RunDir> {
        let path = rt.run_root().join(id);
        if !path.join("lock").is_file() {
            return Err(Error::Adopt(format!(
                "sandbox {id}: no run directory {}",
                path.display()
            )));
        }
        let lock = snapshot::try_lock(&path.join("lock"))?
            .ok_or_else(|| Error::Adopt(format!("sandbox {id}: it is owned by a live process")))?;
        Ok(RunDir {
            path,
            _lock: lock,
            keep: false,
        })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// How [`Sandbox::save`] treats the VM and its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaveMode {
    /// Copy the overlay; the VM goes on (a snapshot).
    Copy,
    /// Move the overlay; the VM ends (a template).
    Move,
    /// Stop QEMU, flatten the overlay onto the shared base and move it (a suspend).
    Suspend,
    /// A suspend that depends on no file of this host: the whole disk chain in one file and
    /// all of the guest's memory (no template's RAM), for another host to resume.
    SuspendStandalone,
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    image: String,
    tier: Tier,
    mem_mib: u32,
    cpus: u32,
    /// The shared read-only disk a suspend flattens onto.
    shared_base: BaseDisk,
    /// The overlay's direct backing file (the shared base, or a suspended disk).
    backing: PathBuf,
    /// The RAM memfd of a template being built, which [`Sandbox::snapshot_and_stop`] stores.
    ram_source: Option<Arc<OwnedFd>>,
    /// The template directory whose RAM this clone maps copy-on-write: a suspend then stores
    /// only the pages that differ from it.
    ram_base: Option<PathBuf>,
    /// Paused by [`Sandbox::park`]: its vCPUs are stopped and its agent cannot answer.
    parked: bool,
    /// [`LaunchOptions::identity_header`]; unknown (`None`) for an adopted sandbox, whose
    /// stack has it already.
    identity_header: Option<String>,
    /// How its start went; `None` for an adopted sandbox.
    phases: Option<StartPhases>,
    // Field order matters for Drop: the agent session, then QEMU, then its network stack,
    // then the directory.
    agent: AgentConn,
    vm: Vm,
    net: NetStack,
    dir: RunDir,
}

impl Sandbox {
    /// Boots a fresh VM on a copy-on-write disk over `base` (the raw, read-only root disk of
    /// the image `image`) and waits until its agent answers.
    pub async fn boot(
        rt: &Runtime,
        id: &str,
        image: &str,
        base: &Path,
        tier: Tier,
    ) -> Result<Sandbox> {
        Self::boot_with(rt, id, image, base, tier, LaunchOptions::default()).await
    }

    /// [`Sandbox::boot`] with launch options (e.g. detached).
    pub async fn boot_with(
        rt: &Runtime,
        id: &str,
        image: &str,
        base: &Path,
        tier: Tier,
        opts: LaunchOptions,
    ) -> Result<Sandbox> {
        Self::boot_inner(rt, id, (image, base, tier), opts, GuestRam::Private).await
    }

    /// Boots the VM a template is made of: its RAM is a fresh memfd mapped shared, which
    /// [`Sandbox::snapshot_and_stop`] stores as the template's `memory.ram` (see [`crate::ram`]).
    pub(crate) async fn boot_template(
        rt: &Runtime,
        id: &str,
        image: &str,
        base: &Path,
        tier: Tier,
        key: &str,
    ) -> Result<Sandbox> {
        let memfd = crate::ram::source(key, u64::from(tier.mem_mib()) << 20)?;
        let ram = GuestRam::TemplateSource(Arc::new(memfd));
        let opts = LaunchOptions::default();
        Self::boot_inner(rt, id, (image, base, tier), opts, ram).await
    }

    async fn boot_inner(
        rt: &Runtime,
        id: &str,
        (image, base, tier): (&str, &Path, Tier),
        opts: LaunchOptions,
        ram: GuestRam,
    ) -> Result<Sandbox> {
        let dir = RunDir::create(rt, id)?;
        let disk_path = dir.path.join("disk.qcow2");
        disk::create_overlay(base, "raw", tier.disk_bytes(), &disk_path).await?;
        let base = canonical(base)?;
        let origin = Origin {
            image: image.to_string(),
            tier,
            mem_mib: tier.mem_mib(),
            cpus: tier.cpus(),
            shared_base: BaseDisk {
                path: base.clone(),
                format: "raw".into(),
            },
            backing: base,
            ram,
            ram_base: None,
        };
        Self::start(rt, id, dir, origin, Load::Boot, opts).await
    }

    /// Starts a new VM from a snapshot directory with its own copy-on-write disk on top of the
    /// snapshot's, then gives the guest fresh time and entropy. One snapshot can be restored
    /// any number of times at once.
    pub async fn restore(rt: &Runtime, id: &str, snapshot: &Path) -> Result<Sandbox> {
        Self::restore_with(rt, id, snapshot, LaunchOptions::default()).await
    }

    /// [`Sandbox::restore`] with launch options (e.g. detached).
    pub async fn restore_with(
        rt: &Runtime,
        id: &str,
        snapshot: &Path,
        opts: LaunchOptions,
    ) -> Result<Sandbox> {
        Self::restore_inner(rt, id, snapshot, opts, false).await
    }

    /// Continues a sandbox [suspended](Sandbox::suspend) to `dir`: a restore of `dir` (a new
    /// overlay on `dir/disk.qcow2`, processes go on running) that keeps the suspended
    /// sandbox's shared base, so its next suspend again flattens onto that base. `dir` must
    /// stay until then (its disk is the new overlay's backing file); its `memory.bin` may be
    /// deleted at once with [`snapshot::discard_memory`].
    pub async fn resume(
        rt: &Runtime,
        id: &str,
        dir: &Path,
        opts: LaunchOptions,
    ) -> Result<Sandbox> {
        Self::restore_inner(rt, id, dir, opts, true).await
    }

    async fn restore_inner(
        rt: &Runtime,
        id: &str,
        snapshot: &Path,
        opts: LaunchOptions,
        resume: bool,
    ) -> Result<Sandbox> {
        let meta = SnapshotMeta::load(snapshot)?;
        meta.check_compatible(rt)?;
        let snapshot_disk = canonical(&snapshot.join("disk.qcow2"))?;
        let shared_base = if resume {
            meta.shared_base.clone().ok_or_else(|| {
                Error::Snapshot(format!(
                    "{} is not a suspended sandbox (its meta.json has no shared_base)",
                    snapshot.display()
                ))
            })?
        } else {
            BaseDisk {
                path: snapshot_disk.clone(),
                format: "qcow2".into(),
            }
        };
        // A template's RAM is mapped copy-on-write from the one sealed copy of this process;
        // any other image holds all of the guest's RAM and is loaded into private memory.
        // A suspend of a clone holds only what differs from its template: its template's RAM
        // again, with the difference loaded on top.
        let ram_base = if meta.shared_ram_bytes.is_some() {
            Some(canonical(snapshot)?)
        } else if let Some(base) = &meta.ram_base {
            if SnapshotMeta::load(base)?.shared_ram_bytes.is_none() {
                return Err(Error::Snapshot(format!(
                    "{} holds memory relative to {}, which has no template RAM",
                    snapshot.display(),
                    base.display()
                )));
            }
            Some(base.clone())
        } else {
            None
        };
        let ram = match &ram_base {
            Some(base) => GuestRam::TemplateClone {
                ram: crate::ram::load(base).await?,
                readonly: crate::qemu::has_readonly_rom(&rt.qemu_version),
            },
            None => GuestRam::Private,
        };
        let dir = RunDir::create(rt, id)?;
        let disk_path = dir.path.join("disk.qcow2");
        overlay_from_seed(snapshot, meta.tier.disk_bytes(), &disk_path).await?;
        let origin = Origin {
            image: meta.image.clone(),
            tier: meta.tier,
            mem_mib: meta.mem_mib,
            cpus: meta.cpus,
            shared_base,
            backing: snapshot_disk,
            ram,
            ram_base,
        };
        let incoming = Incoming {
            path: snapshot.join("memory.bin"),
            ignore_shared: meta.format >= 3,
        };
        Self::start(rt, id, dir, origin, Load::Image(incoming), opts).await
    }

    /// Launches QEMU on `dir/disk.qcow2` (booting, or loading `incoming`), records a detached
    /// sandbox in `sandbox.json` and opens the agent session.
    async fn start(
        rt: &Runtime,
        id: &str,
        dir: RunDir,
        origin: Origin,
        load: Load,
        opts: LaunchOptions,
    ) -> Result<Sandbox> {
        let disk_path = dir.path.join("disk.qcow2");
        let started = Instant::now();
        let restoring = !matches!(load, Load::Boot);
        let ram_source = match &origin.ram {
            GuestRam::TemplateSource(fd) => Some(fd.clone()),
            _ => None,
        };
        let (incoming, migration) = match load {
            Load::Boot => (None, None),
            Load::Image(incoming) => (Some(incoming), None),
            Load::Migration { streams, timeout } => (None, Some((streams, timeout))),
        };
        let vm_spec = spec(
            rt,
            (origin.mem_mib, origin.cpus, origin.tier.millicores()),
            &dir.path,
            &disk_path,
            (incoming, origin.ram),
            opts.detached,
        );
        let (mut vm, migration) = match migration {
            None => (crate::qemu::spawn(&vm_spec).await?, None),
            Some((streams, timeout)) => {
                let (vm, target) = crate::qemu::spawn_migration_target(&vm_spec, streams).await?;
                (vm, Some((target, timeout)))
            }
        };
        let qemu = started.elapsed();
        // Every VM, a restore or a fork included, gets a NIC and a stack of its own, spawned
        // while QEMU loads a restore's memory. The guest may run before the stack does: its
        // frames wait in the link's socket, and the stack forwards nothing before its policy
        // arrives on its control socket.
        let guest = vm
            .take_net_socket()
            .ok_or_else(|| Error::InvalidArgument("a new VM has no network link".into()))?;
        let prepared = netstack::prepare(&rt.net_stack, guest, &dir.path, vm.jail_slot())?;
        let spawn_net = async {
            let net = netstack::start(prepared, opts.detached).await;
            (net, started.elapsed())
        };
        let ((net, net_started), restored) = tokio::join!(spawn_net, async {
            match migration {
                Some((target, timeout)) => vm.finish_migration_in(target, timeout).await,
                None if restoring => vm.finish_restore().await,
                None => Ok(()),
            }
        });
        // A failed restore's error carries the guest's console: it goes first (a stack that
        // started is killed as it drops).
        restored?;
        let net = net?;
        let running = started.elapsed();
        if opts.detached {
            SandboxRecord {
                format: SandboxRecord::FORMAT,
                id: id.to_string(),
                pid: vm.pid(),
                image: origin.image.clone(),
                tier: origin.tier,
                mem_mib: origin.mem_mib,
                cpus: origin.cpus,
                disk: disk_path.clone(),
                backing: origin.backing.clone(),
                shared_base: origin.shared_base.clone(),
                created_unix: snapshot::unix_now(),
                ram_base: origin.ram_base.clone(),
            }
            .store(&dir.path)?;
        }
        let agent = if restoring {
            connect_agent(&mut vm, RESTORE_TIMEOUT, "restoring").await?
        } else {
            connect_agent(&mut vm, BOOT_TIMEOUT, "booting").await?
        };
        let agent_ready = started.elapsed();
        let mut sb = Sandbox {
            id: id.to_string(),
            image: origin.image,
            tier: origin.tier,
            mem_mib: origin.mem_mib,
            cpus: origin.cpus,
            shared_base: origin.shared_base,
            backing: origin.backing,
            ram_source,
            ram_base: origin.ram_base,
            parked: false,
            identity_header: opts.identity_header.clone(),
            phases: None,
            agent,
            vm,
            net,
            dir,
        };
        // Both in flight at once: the agent serves them concurrently and neither depends on
        // the other. The network configuration is sent again after a restore: the saved
        // guest may predate it.
        let hostname = hostname(id);
        tokio::try_join!(
            sb.agent.refresh(Some(&hostname)),
            sb.agent
                .configure_network(moat_protocol::link::guest_config(
                    opts.trust_ca.clone(),
                    opts.identity_header.clone(),
                )),
        )?;
        let phases = StartPhases {
            qemu,
            net_started,
            running,
            agent_ready,
            ready: started.elapsed(),
        };
        sb.phases = Some(phases);
        tracing::info!(
            id,
            restoring,
            detached = opts.detached,
            elapsed_ms = phases.ready.as_millis() as u64,
            ?phases,
            "sandbox started"
        );
        Ok(sb)
    }

    /// Takes over the detached sandbox `id` whose owner is gone (see [`Runtime::orphans`]):
    /// takes its directory's lock, adopts its QEMU ([`Vm::adopt`], which checks the pid is
    /// really this sandbox's QEMU) and opens a new agent session. The guest's processes keep
    /// running (a new HELLO starts a new session without touching them); streams of the old
    /// owner's execs are gone.
    ///
    /// Fails without touching anything if the directory is locked (owned by a live process).
    /// Otherwise a sandbox that cannot be adopted is killed and its directory removed: its
    /// QEMU is gone, or nobody could control it.
    pub async fn adopt(rt: &Runtime, id: &str) -> Result<Sandbox> {
        let mut dir = RunDir::open(rt, id)?;
        if dir.path.join(DEPARTED_FILE).exists() {
            // Its owner died between a completed live migration and deciding: the destination
            // may run it, and two copies must never go on.
            crate::qemu::kill_qemu_of(&dir.path.join("disk.qcow2"));
            return Err(Error::Adopt(format!(
                "sandbox {id}: it was live-migrated away and its owner never decided what                  happens to this paused copy; it is ended (Runtime::cancel_departure before                  adopting continues it instead, when the destination is known never to run)"
            )));
        }
        let rec = match SandboxRecord::load(&dir.path) {
            Ok(rec) => rec,
            Err(e) => {
                // Not ours to judge here: garbage collection kills and removes it.
                dir.keep = true;
                return Err(e);
            }
        };
        let mut vm = Vm::adopt(&dir.path, rec.pid, &rt.jail).await?;
        // A previous owner that died mid-suspend or mid-snapshot left it paused; the agent's
        // quiesce ends with that owner's session.
        let continued = vm.ensure_running().await?;
        let agent = connect_agent(&mut vm, RESTORE_TIMEOUT, "adopting").await?;
        if continued {
            // It may have been parked for long: its wall clock stood still meanwhile.
            agent.refresh(None).await?;
        }
        tracing::info!(id, pid = rec.pid, "sandbox adopted");
        Ok(Sandbox {
            id: rec.id,
            image: rec.image,
            tier: rec.tier,
            mem_mib: rec.mem_mib,
            cpus: rec.cpus,
            shared_base: rec.shared_base,
            backing: rec.backing,
            ram_base: rec.ram_base,
            ram_source: None,
            parked: false,
            identity_header: None,
            phases: None,
            agent,
            vm,
            net: NetStack::adopted(),
            dir,
        })
    }

    /// Lets go of a detached sandbox without stopping it: the agent session and QMP close,
    /// the directory's lock is released, QEMU and the run directory stay, and the sandbox
    /// shows up in [`Runtime::orphans`] for the next owner to [`Sandbox::adopt`] (a daemon's
    /// graceful restart). An attached sandbox cannot be detached: it is destroyed and an
    /// error returned.
    pub fn detach(self) -> Result<()> {
        let Sandbox {
            agent, vm, mut dir, ..
        } = self;
        drop(agent);
        vm.release()?;
        dir.keep = true;
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// When each step of this sandbox's start was done; `None` for an adopted one.
    pub fn start_phases(&self) -> Option<StartPhases> {
        self.phases
    }

    /// This incarnation's `IDENTITY_HEADER` ([`LaunchOptions::identity_header`]).
    pub fn identity_header(&self) -> Option<&str> {
        self.identity_header.as_deref()
    }

    /// Digest of the image the sandbox runs.
    pub fn image(&self) -> &str {
        &self.image
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    pub fn agent(&self) -> &AgentConn {
        &self.agent
    }

    /// Whether the agent answers within `deadline`: its session is open and a `stat /`
    /// comes back. A parked sandbox's agent cannot answer; ask only a running one.
    pub async fn agent_answers(&self, deadline: Duration) -> Result<()> {
        if self.agent.is_closed() {
            return Err(Error::AgentGone);
        }
        match tokio::time::timeout(deadline, self.agent.stat("/")).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(Error::AgentTimeout(deadline)),
        }
    }

    /// Drops the agent session and starts a new one (a new HELLO, which the agent accepts at
    /// any time): what recovers a guest that broke the framing or stalled for a while. Streams
    /// of the old session end; processes in the guest keep running. Fails with QEMU's console
    /// if the VM exited, or when the agent does not answer the handshake within `deadline`.
    pub async fn reconnect_agent(&mut self, deadline: Duration) -> Result<()> {
        // QEMU's agent chardev takes one client at a time: the old one must be gone first.
        self.agent.close().await;
        self.agent = connect_agent(&mut self.vm, deadline, "reconnecting").await?;
        Ok(())
    }

    /// The QEMU process id (for measurements).
    pub fn qemu_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The CPU time its QEMU has used so far (vCPUs and devices); `None` if QEMU is gone.
    pub fn cpu_time(&self) -> Option<Duration> {
        crate::qemu::cpu_time(self.vm.pid())
    }

    /// The host processes that hold the sandbox's memory: its QEMU, and its network stack
    /// while that is our child (an adopted sandbox's stack is not, and holds a few MiB).
    /// Their [`crate::qemu::pss_bytes`] is what the sandbox really costs the host.
    pub fn host_pids(&self) -> Vec<u32> {
        std::iter::once(self.vm.pid())
            .chain(self.net.pid())
            .collect()
    }

    /// `MOAT_HOME/run/<id>`.
    pub fn run_dir(&self) -> &Path {
        &self.dir.path
    }

    /// The control socket of the sandbox's network stack ([`moat_net::control`]): nothing
    /// reaches the network until a `start` is sent there.
    pub fn net_control_path(&self) -> PathBuf {
        self.dir.path.join(netstack::CONTROL_SOCKET)
    }

    /// The port socket of the sandbox's network stack ([`moat_net::ingress`]): how the host
    /// opens a connection to a port in the guest.
    pub fn net_ports_path(&self) -> PathBuf {
        self.dir.path.join(netstack::PORTS_SOCKET)
    }

    /// Whether QEMU may outlive this process (launched detached, or adopted).
    pub fn is_detached(&self) -> bool {
        self.vm.is_detached()
    }

    /// The shared read-only disk a [suspend](Sandbox::suspend) flattens this sandbox's disk
    /// onto: the template's or snapshot's disk it was restored from, or the image's rootfs.
    pub fn shared_base(&self) -> &BaseDisk {
        &self.shared_base
    }

    /// Parks the sandbox: its vCPUs stop (QMP `stop`), so an idle sandbox costs no host CPU
    /// at all, while its memory, disk, devices and network stack stay as they are. Execs
    /// cannot run until [`Sandbox::unpark`]; everything here that needs the guest unparks
    /// it first. Idempotent.
    pub async fn park(&mut self) -> Result<()> {
        if !self.parked {
            self.vm.pause().await?;
            self.parked = true;
        }
        Ok(())
    }

    /// Continues a parked sandbox and sets its wall clock, which stood still while it was
    /// parked (a stopped VM's virtual clock does not run). Idempotent.
    pub async fn unpark(&mut self) -> Result<()> {
        if self.parked {
            self.vm.resume().await?;
            self.parked = false;
            self.agent.refresh(None).await?;
        }
        Ok(())
    }

    /// Whether the sandbox is [parked](Sandbox::park).
    pub fn is_parked(&self) -> bool {
        self.parked
    }

    /// Saves memory and disk to `dest` (which must not exist), atomically: the directory
    /// appears complete or not at all. The sandbox keeps running afterwards.
    pub async fn snapshot(&mut self, rt: &Runtime, dest: &Path) -> Result<SnapshotMeta> {
        self.unpark().await?;
        let saved = self.save(rt, dest, SaveMode::Copy).await;
        // Also after a failed save (say, the host's disk is full): the VM may be stopped, and
        // it must go on running (the agent's quiesce ended when its stream was dropped).
        let resumed = self.vm.resume().await;
        let meta = saved?;
        resumed?;
        Ok(meta)
    }

    /// Saves a snapshot and ends the sandbox; its disk moves into the snapshot instead of being
    /// copied. Used for templates.
    pub async fn snapshot_and_stop(mut self, rt: &Runtime, dest: &Path) -> Result<SnapshotMeta> {
        let meta = self.save(rt, dest, SaveMode::Move).await?;
        self.destroy().await;
        Ok(meta)
    }

    /// Suspends the sandbox to `dest` (which must not exist) and ends it: afterwards it costs
    /// no CPU and no RAM, only disk. The guest is quiesced, its memory saved, its disk copied
    /// and flattened into `dest/disk.qcow2` as one private layer over
    /// [`Sandbox::shared_base`], so the backing chain stays `disk → shared base → rootfs`
    /// however many suspend/resume cycles happen, and only then is QEMU stopped. `dest`
    /// appears complete or not at all.
    /// [`Sandbox::resume`] continues it, processes included.
    ///
    /// The sandbox is gone even when this fails; the directory of its previous suspend (its
    /// backing file, if it was resumed) is never modified, so the caller can still resume that.
    pub async fn suspend(mut self, rt: &Runtime, dest: &Path) -> Result<SnapshotMeta> {
        self.unpark().await?;
        let meta = self.save(rt, dest, SaveMode::Suspend).await?;
        self.destroy().await;
        Ok(meta)
    }

    /// [`Sandbox::suspend`] into a directory that needs nothing else of this host: its disk
    /// is the whole chain flattened into one file and its memory image holds all of the
    /// guest's RAM, so another host with the same kernel, initramfs and QEMU resumes it
    /// without this host's template or image files (a suspend on shared storage).
    pub async fn suspend_standalone(mut self, rt: &Runtime, dest: &Path) -> Result<SnapshotMeta> {
        self.unpark().await?;
        let meta = self.save(rt, dest, SaveMode::SuspendStandalone).await?;
        self.destroy().await;
        Ok(meta)
    }

    async fn save(&mut self, rt: &Runtime, dest: &Path, mode: SaveMode) -> Result<SnapshotMeta> {
        let parent = dest.parent().ok_or_else(|| {
            Error::InvalidArgument(format!("bad snapshot path {}", dest.display()))
        })?;
        std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        if dest.exists() {
            return Err(Error::InvalidArgument(format!(
                "snapshot {} exists already",
                dest.display()
            )));
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = snapshot::TempDir::new_in(parent, &format!(".tmp-{name}"))?;
        let started = Instant::now();
        if self.ram_source.is_some() && mode != SaveMode::Move {
            // Its RAM is mapped shared: it must never run again once it is a template.
            return Err(Error::InvalidArgument(
                "a template's VM can only be saved as a template".into(),
            ));
        }
        // No frame may be half-way through the channel when memory is saved.
        let quiet = self.agent.quiesce().await?;
        let memory = tmp.path().join("memory.bin");
        let mut memory_bytes = self.vm.save_memory(&memory).await?;
        let ram_base = match (&self.ram_base, mode) {
            (Some(base), SaveMode::Suspend) => {
                let (full, template) = (memory.clone(), base.clone());
                let reduced = tokio::task::spawn_blocking(move || diff_memory(&full, &template))
                    .await
                    .map_err(|e| Error::io("filtering memory", std::io::Error::other(e)))??;
                reduced.map(|bytes| {
                    memory_bytes = bytes;
                    base.clone()
                })
            }
            _ => None,
        };
        // The stream left the shared RAM out (x-ignore-shared); it is in the memfd.
        let shared_ram_bytes = match &self.ram_source {
            Some(fd) => {
                let (fd, size) = (fd.clone(), u64::from(self.mem_mib) << 20);
                let dest = tmp.path().join(crate::ram::RAM_FILE);
                Some(
                    tokio::task::spawn_blocking(move || crate::ram::store(&fd, size, &dest))
                        .await
                        .map_err(|e| {
                            Error::io("storing template RAM", std::io::Error::other(e))
                        })??,
                )
            }
            None => None,
        };
        let disk = tmp.path().join("disk.qcow2");
        let src = self.dir.path.join("disk.qcow2");
        match mode {
            SaveMode::Copy => {
                std::fs::copy(&src, &disk).ctx(|| format!("copying {}", src.display()))?;
            }
            SaveMode::Move => {
                std::fs::rename(&src, &disk).ctx(|| format!("moving {}", src.display()))?;
            }
            SaveMode::SuspendStandalone => {
                // Flattened from a copy: QEMU (paused, flushed) still holds its overlay's lock.
                let copy = tmp.path().join("overlay.qcow2");
                std::fs::copy(&src, &copy).ctx(|| format!("copying {}", src.display()))?;
                disk::flatten(&copy, &disk).await?;
                std::fs::remove_file(&copy).ctx(|| format!("removing {}", copy.display()))?;
            }
            SaveMode::Suspend => {
                // A copy, not a move: QEMU (paused, its disk flushed by the save) stays
                // alive until the directory is complete, so an owner that dies before then
                // leaves a VM the next one adopts and continues, never a lost sandbox.
                std::fs::copy(&src, &disk).ctx(|| format!("copying {}", src.display()))?;
                if self.backing != self.shared_base.path {
                    let chain = disk::backing_chain(&disk)?;
                    if chain.contains(&self.shared_base.path) {
                        disk::rebase(&disk, &self.shared_base.path, &self.shared_base.format)
                            .await?;
                    } else if !chain.is_empty() {
                        // A chain that does not reach the shared base (a standalone disk
                        // received by live migration, then suspended and resumed): this
                        // host may not have that base, so the suspend depends on nothing.
                        let layer = tmp.path().join("layer.qcow2");
                        std::fs::rename(&disk, &layer)
                            .ctx(|| format!("moving {}", disk.display()))?;
                        disk::flatten(&layer, &disk).await?;
                        std::fs::remove_file(&layer)
                            .ctx(|| format!("removing {}", layer.display()))?;
                    }
                }
            }
        }
        snapshot::fsync_file(&disk)?;
        let meta = SnapshotMeta {
            format: SNAPSHOT_FORMAT,
            image: self.image.clone(),
            tier: self.tier,
            mem_mib: self.mem_mib,
            cpus: self.cpus,
            accel: rt.accel.accel.as_str().to_string(),
            kernel_version: rt.kernel.version.clone(),
            initramfs_sha256: rt.initramfs.sha256.clone(),
            qemu_version: rt.qemu_version.clone(),
            memory_bytes,
            created_unix: snapshot::unix_now(),
            save_ms: started.elapsed().as_millis() as u64,
            shared_base: matches!(mode, SaveMode::Suspend | SaveMode::SuspendStandalone)
                .then(|| self.shared_base.clone()),
            shared_ram_bytes,
            ram_base,
        };
        meta.store(tmp.path())?;
        tmp.persist(dest)?;
        if mode == SaveMode::Copy {
            quiet.release().await?;
        }
        Ok(meta)
    }

    /// Asks the guest to end its processes, sync its disk and power off, and waits for QEMU to
    /// exit; a guest that does not within `deadline` is killed. Returns whether it was clean.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        let asked = self.unpark().await.is_ok() && self.agent.shutdown().await.is_ok();
        let exited = asked
            && matches!(
                tokio::time::timeout(deadline, self.vm.wait_exit()).await,
                Ok(Ok(status)) if status.success()
            );
        // With -no-reboot a guest panic also ends QEMU with status 0: tell them apart.
        let clean = exited && !self.vm.console_tail(16 * 1024).contains("Kernel panic");
        if !clean {
            tracing::warn!(id = self.id, "the guest did not power off; killing it");
        }
        self.destroy().await;
        clean
    }

    /// What the destination of a live migration of this sandbox needs first (see
    /// [`Sandbox::migrate_in`]).
    pub fn migration_manifest(&self, rt: &Runtime) -> MigrationManifest {
        let backing_format = if self.backing == self.shared_base.path {
            self.shared_base.format.clone()
        } else {
            // Anything else under the overlay is a snapshot's or suspend's disk.
            "qcow2".into()
        };
        MigrationManifest {
            format: MigrationManifest::FORMAT,
            id: self.id.clone(),
            image: self.image.clone(),
            tier: self.tier,
            mem_mib: self.mem_mib,
            cpus: self.cpus,
            shared_base: self.shared_base.clone(),
            backing: BaseDisk {
                path: self.backing.clone(),
                format: backing_format,
            },
            standalone: canonical(&self.dir.path.join("disk.qcow2"))
                .is_ok_and(|d| d == self.backing),
            accel: rt.accel.accel.as_str().to_string(),
            qemu_version: rt.qemu_version.clone(),
            kernel_version: rt.kernel.version.clone(),
            initramfs_sha256: rt.initramfs.sha256.clone(),
        }
    }

    /// Live-migrates this running sandbox to a destination started with
    /// [`Sandbox::migrate_in`] on the other ends of `streams` (see `qemu/migrate.rs` for the
    /// protocol): its overlay is mirrored, its memory sent while it runs (pre-copy), and it is
    /// paused only for the last pass, about `params.downtime_limit`. All of its RAM travels,
    /// into private memory on the destination (which need not have its template).
    ///
    /// Returns once the destination holds the whole state; the source is then paused, and the
    /// owner ends it with [`Departed::complete`] when the destination runs (or continues it
    /// with [`Departed::abort`] if the destination failed). On failure the sandbox runs on,
    /// untouched, in [`Stayed`]. The agent session stays quiet from the start (no frame may
    /// be cut in half by the switch): exec streams of this session see nothing more.
    ///
    /// To cancel, close the streams (or let `params.timeout` pass): this then returns
    /// [`Stayed`]. Dropping the future drops the sandbox, and with it its QEMU.
    pub async fn migrate_out(
        mut self,
        streams: MigrationStreams,
        params: &MigrateParams,
    ) -> std::result::Result<Departed, Box<Stayed>> {
        let stay = |sandbox: Sandbox, error: Error| Box::new(Stayed { sandbox, error });
        if self.ram_source.is_some() {
            let e = Error::InvalidArgument("a template's VM cannot be migrated".into());
            return Err(stay(self, e));
        }
        if let Err(e) = self.unpark().await {
            return Err(stay(self, e));
        }
        let quiet = match self.agent.quiesce().await {
            Ok(q) => q,
            Err(e) => return Err(stay(self, e)),
        };
        match self.vm.migrate_out(streams, params).await {
            Ok(stats) => {
                tracing::info!(id = self.id, ?stats, "live migration sent");
                let marker = serde_json::to_vec(&stats).unwrap_or_default();
                if let Err(e) =
                    crate::util::write_atomic(&self.dir.path.join(DEPARTED_FILE), &marker)
                {
                    // The destination has it all and will run: there is no going back now.
                    tracing::error!(id = self.id, error = %e, "marking the source departed");
                }
                Ok(Departed {
                    sandbox: self,
                    stats,
                    quiet,
                })
            }
            Err(e) => {
                if let Err(e) = quiet.release().await {
                    tracing::warn!(id = self.id, error = %e, "releasing the agent");
                }
                Err(stay(self, e))
            }
        }
    }

    /// Receives a sandbox live-migrated by [`Sandbox::migrate_out`] on the other ends of
    /// `streams`: a new QEMU waits for its state on a fresh overlay over
    /// `manifest.backing` or, with `whole_disk` (the source mirrors its whole chain:
    /// [`MigrateParams::whole_disk`]), on an empty disk of the tier's size with no backing
    /// file, so that none of the source's disk files is needed here; and the sandbox comes back under its own id with its processes,
    /// files and guest network settings, a new network stack (whose policy the owner sends
    /// again, as after a restore) and a new agent session. Returns once it runs and its agent
    /// said hello, as [`Arrived`]: the owner must [`Arrived::verify`] it before the source is
    /// told to [`Departed::complete`]. Fails if the state does not arrive within `timeout`.
    /// On failure everything made here is removed; the source is not told (its owner calls
    /// [`Departed::abort`]).
    pub async fn migrate_in(
        rt: &Runtime,
        manifest: &MigrationManifest,
        streams: MigrationStreams,
        opts: LaunchOptions,
        timeout: Duration,
        whole_disk: bool,
    ) -> Result<Arrived> {
        manifest.check(rt, whole_disk)?;
        let dir = RunDir::create(rt, &manifest.id)?;
        let disk_path = dir.path.join("disk.qcow2");
        let backing = if whole_disk {
            disk::create_standalone(manifest.tier.disk_bytes(), &disk_path).await?;
            // Its own path: a disk with no backing file (see `SandboxRecord::backing`).
            canonical(&disk_path)?
        } else {
            disk::create_overlay(
                &manifest.backing.path,
                &manifest.backing.format,
                manifest.tier.disk_bytes(),
                &disk_path,
            )
            .await?;
            canonical(&manifest.backing.path)?
        };
        let origin = Origin {
            image: manifest.image.clone(),
            tier: manifest.tier,
            mem_mib: manifest.mem_mib,
            cpus: manifest.cpus,
            shared_base: manifest.shared_base.clone(),
            backing,
            ram: GuestRam::Private,
            ram_base: None,
        };
        let load = Load::Migration { streams, timeout };
        let sandbox = Self::start(rt, &manifest.id, dir, origin, load, opts).await?;
        Ok(Arrived { sandbox })
    }

    /// Stops the VM and removes everything the sandbox wrote.
    pub async fn destroy(mut self) {
        if let Err(e) = self.vm.kill().await {
            tracing::warn!(id = self.id, error = %e, "stopping QEMU");
        }
    }
}

/// Replaces the full memory image `memory` of a clone of template `base` with only what differs
/// from the template ([`crate::ramdiff`]); its new size, or `None` if the stream was not one
/// the filter knows (then the full image stays, and a resume loads it whole).
fn diff_memory(memory: &Path, base: &Path) -> Result<Option<u64>> {
    let diff = memory.with_extension("diff");
    let template = base.join(crate::ram::RAM_FILE);
    match crate::ramdiff::filter(memory, &template, crate::qemu::RAM_ID, &diff) {
        Ok(f) => {
            std::fs::rename(&diff, memory).ctx(|| format!("replacing {}", memory.display()))?;
            let bytes = std::fs::metadata(memory)
                .ctx(|| format!("stat {}", memory.display()))?
                .len();
            tracing::info!(
                kept_pages = f.kept_pages,
                dropped_pages = f.dropped_pages,
                bytes,
                "memory image reduced to what differs from the template"
            );
            Ok(Some(bytes))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&diff);
            tracing::warn!(error = %e, "keeping the whole memory image");
            Ok(None)
        }
    }
}

fn hostname(id: &str) -> String {
    let mut h: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if h.is_empty() {
        h.push_str("sandbox");
    }
    h
}

fn spec(
    rt: &Runtime,
    (mem_mib, cpus, millicores): (u32, u32, u32),
    dir: &Path,
    disk: &Path,
    (incoming, ram): (Option<Incoming>, GuestRam),
    detached: bool,
) -> VmSpec {
    VmSpec {
        accel: rt.accel.clone(),
        mem_mib,
        cpus,
        kernel: rt.kernel.vmlinuz.clone(),
        initramfs: rt.initramfs.path.clone(),
        disk: disk.to_path_buf(),
        run_dir: dir.to_path_buf(),
        incoming,
        ram,
        detached,
        millicores,
        jail: rt.jail.clone(),
    }
}

/// What a new VM starts from.
enum Load {
    /// A cold boot.
    Boot,
    /// A memory image (a snapshot, template or suspended sandbox).
    Image(Incoming),
    /// A live migration arriving on these streams within `timeout`.
    Migration {
        streams: MigrationStreams,
        timeout: Duration,
    },
}

/// Where a sandbox comes from: what [`Sandbox::start`] records besides the VM.
struct Origin {
    image: String,
    tier: Tier,
    mem_mib: u32,
    cpus: u32,
    shared_base: BaseDisk,
    backing: PathBuf,
    ram: GuestRam,
    /// The template directory whose RAM `ram` maps (a clone's), for diff suspends.
    ram_base: Option<PathBuf>,
}

/// The absolute path of an existing disk (qemu-img stores backing paths as given).
fn canonical(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).ctx(|| format!("resolving {}", path.display()))
}

/// Makes a fresh copy-on-write overlay on a snapshot's disk at `dest`. `qemu-img create` costs
/// ~40 ms, a tenth of a warm `moat run`, and makes the same file for every restore of one
/// snapshot; so it runs once, its result is kept as `overlay-seed.qcow2` in the snapshot, and
/// each restore copies that (~1 ms).
async fn overlay_from_seed(snapshot: &Path, size: u64, dest: &Path) -> Result<()> {
    let seed = snapshot.join("overlay-seed.qcow2");
    if !seed.exists() {
        let tmp = snapshot.join(format!(
            ".overlay-seed-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let made = disk::create_overlay(&snapshot.join("disk.qcow2"), "qcow2", size, &tmp).await;
        // Concurrent restores may both get here; each rename installs a valid seed.
        let installed = made.and_then(|()| {
            snapshot::fsync_file(&tmp)?;
            std::fs::rename(&tmp, &seed).ctx(|| format!("installing {}", seed.display()))
        });
        if installed.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        installed?;
    }
    std::fs::copy(&seed, dest).ctx(|| format!("copying {}", seed.display()))?;
    Ok(())
}

async fn connect_agent(vm: &mut Vm, deadline: Duration, what: &str) -> Result<AgentConn> {
    let socket = vm.take_agent_stream(deadline).await?;
    let what = format!("{what}: waiting for the guest agent");
    // The VM's own deadline fires first: its error carries the guest console.
    let handshake = AgentConn::connect(socket, deadline + Duration::from_secs(5));
    match vm.while_alive(&what, deadline, handshake).await? {
        Ok(conn) => Ok(conn),
        Err(Error::Agent(_) | Error::AgentGone | Error::AgentTimeout(_)) => {
            Err(vm.exit_error(&what).await)
        }
        Err(e) => Err(e),
    }
}
