//! One QEMU `microvm` process per sandbox: launch (cold boot or restore from a memory
//! snapshot), QMP control, the agent channel, memory snapshots, and reliable cleanup.
//!
//! This file is the VM handle ([`Vm`]) and its life: [`launch`], [`Vm::adopt`], snapshots and
//! teardown. Split by concern beside it: `args.rs` builds QEMU's argument list (pure, with a
//! golden test: its `-sandbox` and `-drive` strings matter for security), `spawn.rs` starts
//! the binary from one long-lived thread with the descriptors it inherits, `pidfd.rs` watches
//! a QEMU that is not our child (the spawner also starts each sandbox's network stack, see
//! `crate::netstack`), and `procfs.rs` reads `/proc` (the host's TSC frequency, and
//! which processes are QEMUs of a given disk).
//!
//! The QMP and agent sockets are created and bound here and handed to QEMU as inherited
//! listening descriptors, so they exist before QEMU starts and nobody polls for socket files.
//! QEMU runs in its own process group (a terminal Ctrl-C reaches only moat, which then cleans
//! up) with `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with moat even on `kill -9`.
//!
//! A daemon launches its VMs *detached* instead ([`VmSpec::detached`]): no death signal, a
//! session of their own, so they outlive the daemon, and the next daemon re-adopts them with
//! [`Vm::adopt`] (they are not its children, so it watches them through a pidfd).

mod args;
mod migrate;
mod pidfd;
mod procfs;
mod spawn;

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::UnixStream;

use crate::accel::AccelChoice;
use crate::error::IoContext;
use crate::qmp::Qmp;
use crate::util::file_tail;
use crate::{Error, Result};
pub(crate) use pidfd::PidFd;
use pidfd::Process;
pub(crate) use pidfd::{pidfd_kill, pidfd_poll, reap_blocking};
pub(crate) use spawn::bind;
use spawn::connect;
pub(crate) use spawn::{spawn_child, Spawned};

pub use args::{kernel_cmdline, qemu_args, QemuFds, RAM_ID};
pub(crate) use migrate::spawn_migration_target;
pub use migrate::{MigrateParams, MigrationStats, MigrationStreams};
pub(crate) use procfs::kill_qemu_of;
pub use procfs::{cpu_time, host_meminfo_mib, host_tsc_khz, is_qemu_of, pss_bytes, status_field};
pub use spawn::{qemu_version, qemu_version_cached};

/// The QEMU binary we run.
pub const QEMU_BIN: &str = "qemu-system-x86_64";

/// How long QEMU may take to come up and answer QMP.
const QMP_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long loading a memory snapshot may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long saving a memory snapshot may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of console shown in errors.
const ERROR_TAIL: usize = 4096;

/// Everything needed to start a VM. A restore (`incoming`) must use the same accelerator,
/// memory, CPU count, kernel and initramfs as the VM that was saved (the device set is fixed
/// by this module); the disk may be a different overlay of the same content.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub accel: AccelChoice,
    pub mem_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The VM's qcow2 overlay (see [`crate::disk::create_overlay`]).
    pub disk: PathBuf,
    /// Per-VM directory: `qemu.log` (QEMU's stderr), `qmp.sock`, `agent.sock`.
    pub run_dir: PathBuf,
    /// Where the guest's RAM lives.
    pub ram: GuestRam,
    /// A memory snapshot written by [`Vm::save_memory`] to restore instead of booting.
    pub incoming: Option<Incoming>,
    /// Let QEMU outlive this process (a daemon's VMs): no parent-death signal, its own
    /// session, not killed when its `Vm` is [released](Vm::release). Default: attached.
    pub detached: bool,
    /// The CPU time the VM may use, in thousandths of a CPU (its tier's share; the jail's
    /// cgroup enforces it).
    pub millicores: u32,
    /// Whether QEMU (and the sandbox's network stack) run jailed ([`crate::jail`]).
    pub jail: crate::jail::JailMode,
}

/// Host memory a VM may use beyond its guest RAM: QEMU itself (~25-60 MiB), TCG's
/// translation cache (resident part grows with the guest's code, ~15-50 MiB measured, up to
/// its 1 GiB reservation in theory), the page cache of its disk and the network stack.
const MEMORY_OVERHEAD_MIB: u64 = 512;
/// Tasks (threads) of a sandbox's QEMU and network stack together: QEMU has its main, RCU
/// and vCPU threads and a thread pool of up to 64 for disk I/O; the stack a few runtime
/// threads.
const SANDBOX_PIDS: u32 = 512;
/// CPU headroom of whole-vCPU tiers for QEMU's main loop and the network stack; a
/// fractional tier gets exactly its share.
const CPU_HEADROOM_MILLICORES: u32 = 500;

/// The cgroup limits of a VM of `spec`.
fn limits(spec: &VmSpec) -> crate::cgroup::Limits {
    let millicores = if spec.millicores < spec.cpus * 1000 {
        spec.millicores
    } else {
        spec.millicores + CPU_HEADROOM_MILLICORES
    };
    // A template clone may be charged for the template's zero pages too (SharedRam::holes):
    // without room for them, a guest using most of its RAM was OOM-killed (the chaos run: a
    // tier-s clone at 1,038 MB shared + 584 MB private against 1,536 MiB).
    let template_holes = match &spec.ram {
        GuestRam::TemplateClone { ram, .. } => ram.holes(),
        _ => 0,
    };
    crate::cgroup::Limits {
        memory_bytes: ((u64::from(spec.mem_mib) + MEMORY_OVERHEAD_MIB) << 20) + template_holes,
        pids: SANDBOX_PIDS,
        millicores,
    }
}

/// The jail slot of a VM: taken at launch, found from QEMU's uid at adoption.
#[derive(Debug)]
enum VmSlot {
    None,
    Own(crate::jail::Slot),
    Adopted(crate::jail::AdoptedSlot),
}

/// Sets up the jail of QEMU for `spec`: a slot, the overlay given to its uid, and the plan of
/// what it sees (`/usr`, the boot files, the disk and its backing chain, `/dev/kvm` for KVM).
fn qemu_jail(
    host: &std::sync::Arc<crate::jail::JailHost>,
    spec: &VmSpec,
    booting: bool,
) -> Result<(crate::jail::Slot, crate::jail::Plan)> {
    use crate::jail::{JailSpec, Plan, View};
    let slot = host.take_slot(limits(spec))?;
    let uid = slot.qemu_uid();
    crate::jail::give(&spec.disk, uid)?;
    let mut view = View::system();
    if booting {
        view.binds.push((spec.kernel.clone(), false));
        view.binds.push((spec.initramfs.clone(), false));
    }
    view.binds.push((spec.disk.clone(), true));
    for backing in crate::disk::backing_chain(&spec.disk)? {
        crate::jail::share_read_only(&backing)?;
        view.binds.push((backing, false));
    }
    let mut groups = Vec::new();
    if spec.accel.accel == crate::Accel::Kvm {
        view.devices.push("/dev/kvm".into());
        groups.extend(crate::jail::kvm_group());
    }
    let plan = Plan::new(JailSpec {
        slot: &slot,
        uid,
        view,
        new_net: true,
        groups,
    })?;
    Ok((slot, plan))
}

/// Where a VM's guest RAM lives. Every kind is the RAM block `microvm.ram` (QEMU's own name for
/// microvm's RAM), so a memory image saved from any of them restores into any other.
#[derive(Debug, Clone)]
pub enum GuestRam {
    /// Anonymous memory of this QEMU alone: cold boots of sandboxes, and restores of full
    /// memory images (snapshots, suspended sandboxes).
    Private,
    /// A template being built: the memfd, mapped shared, so that a save skips the RAM
    /// (`x-ignore-shared`) and the host reads it from the memfd. Such a VM must never run
    /// again after its save: clones would see its writes.
    TemplateSource(Arc<OwnedFd>),
    /// A clone of a template: its sealed RAM (see [`crate::ram`]), mapped privately
    /// (copy-on-write). `readonly` adds `readonly=on,rom=off` (QEMU ≥ 8.2, see
    /// [`has_readonly_rom`]), which opens it read-only.
    TemplateClone {
        ram: Arc<crate::ram::SharedRam>,
        readonly: bool,
    },
}

/// A memory image to load.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub path: PathBuf,
    /// The image was saved with `x-ignore-shared` (snapshot format ≥ 3); QEMU refuses to load
    /// it unless the capability is set on this side too, and refuses the opposite as well.
    pub ignore_shared: bool,
}

/// Whether QEMU `version` (as [`qemu_version`] reports it) has `memory-backend-file`'s
/// `readonly=on,rom=off` (read-only file, writable private mapping): 8.2 and later.
pub fn has_readonly_rom(version: &str) -> bool {
    let number = version
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or_default();
    let mut parts = number.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (8, 2)
}

/// A running QEMU. Dropping it kills QEMU (SIGKILL) and reaps it before returning.
#[derive(Debug)]
pub struct Vm {
    proc: Proc,
    qmp: Qmp,
    agent: Option<UnixStream>,
    /// The host's end of the NIC's link, until [`Vm::take_net_socket`].
    net: Option<OwnedFd>,
    agent_sock: PathBuf,
    qmp_sock: PathBuf,
    /// Launched detached or adopted: may outlive us.
    detached: bool,
    /// [`Vm::release`]d: dropping leaves QEMU and its sockets alone.
    released: bool,
    /// The jail's slot (uids, cgroup); its cgroup is removed when the VM is destroyed.
    slot: VmSlot,
}

/// The QEMU process and its logs, separate from `Qmp` so both can be borrowed at once.
#[derive(Debug)]
struct Proc {
    process: Process,
    pid: u32,
    console: ConsoleTail,
    stderr_log: PathBuf,
    exited: Option<ExitStatus>,
}

/// The end of what the guest printed on its serial console, kept in memory. The console is a
/// socket the host drains, not a file: a hostile guest printing without end must not fill the
/// host's disk, and only the tail is ever shown (in boot and crash errors).
#[derive(Debug, Clone, Default)]
struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

/// Bytes of console kept per VM.
const CONSOLE_KEEP: usize = 64 * 1024;

impl ConsoleTail {
    /// Drains `socket` into the tail until QEMU closes it.
    fn drain(&self, socket: UnixStream) {
        let tail = self.0.clone();
        tokio::spawn(async move {
            let mut socket = socket;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                        t.extend(&buf[..n]);
                        let excess = t.len().saturating_sub(CONSOLE_KEEP);
                        t.drain(..excess);
                    }
                }
            }
        });
    }

    fn tail(&self, max_bytes: usize) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let skip = t.len().saturating_sub(max_bytes);
        let bytes: Vec<u8> = t.iter().skip(skip).copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Starts QEMU for `spec` and returns once QMP answers. A cold boot returns while the guest
/// is still booting (wait for the agent yourself, e.g. with [`Vm::while_alive`]); a restore
/// returns with the guest running again (`cont` done).
pub async fn launch(spec: &VmSpec) -> Result<Vm> {
    let mut vm = spawn(spec).await?;
    if spec.incoming.is_some() {
        vm.finish_restore().await?;
    }
    Ok(vm)
}

/// [`launch`] without waiting for a restore's load: returns once QMP answers and, for a
/// restore, the incoming migration has started. QEMU loads the image meanwhile, so the caller
/// can prepare what the guest needs next, then calls [`Vm::finish_restore`].
pub(crate) async fn spawn(spec: &VmSpec) -> Result<Vm> {
    spawn_with(spec, None).await
}

/// [`spawn`]; with `stream`, QEMU waits for an incoming live migration on it instead of
/// booting (see `migrate.rs`, which starts it).
async fn spawn_with(spec: &VmSpec, stream: Option<OwnedFd>) -> Result<Vm> {
    let started = Instant::now();
    std::fs::create_dir_all(&spec.run_dir)
        .ctx(|| format!("creating run directory {}", spec.run_dir.display()))?;
    let qmp_sock = spec.run_dir.join("qmp.sock");
    let agent_sock = spec.run_dir.join("agent.sock");
    let stderr_log = spec.run_dir.join("qemu.log");
    let (console_host, console_qemu) =
        StdUnixStream::pair().ctx(|| "creating the console socket pair".to_string())?;
    let (net_host, net_qemu) =
        StdUnixStream::pair().ctx(|| "creating the network socket pair".to_string())?;
    let qmp_listener = bind(&qmp_sock)?;
    let agent_listener = bind(&agent_sock)?;
    let incoming: Option<OwnedFd> = match stream {
        Some(stream) => Some(stream),
        None => spec
            .incoming
            .as_ref()
            .map(|i| {
                std::fs::File::open(&i.path)
                    .map(OwnedFd::from)
                    .ctx(|| format!("opening snapshot {}", i.path.display()))
            })
            .transpose()?,
    };

    let fds = QemuFds {
        qmp: qmp_listener.as_raw_fd(),
        agent: agent_listener.as_raw_fd(),
        console: console_qemu.as_raw_fd(),
        net: net_qemu.as_raw_fd(),
        incoming: incoming.as_ref().map(|f| f.as_raw_fd()),
        ram: match &spec.ram {
            GuestRam::Private => None,
            GuestRam::TemplateSource(fd) => Some(fd.as_raw_fd()),
            GuestRam::TemplateClone { ram, .. } => Some(ram.fd().as_raw_fd()),
        },
    };
    let mut keep: Vec<RawFd> = [fds.qmp, fds.agent, fds.console, fds.net]
        .into_iter()
        .chain(fds.incoming)
        .chain(fds.ram)
        .collect();
    let (slot, plan) = match &spec.jail {
        crate::jail::JailMode::On(host) => {
            let (slot, plan) = qemu_jail(host, spec, fds.incoming.is_none())?;
            keep.push(slot.lock_fd());
            (VmSlot::Own(slot), Some(plan))
        }
        crate::jail::JailMode::Off => (VmSlot::None, None),
    };
    let args = qemu_args(spec, &fds);
    tracing::debug!(?args, "starting QEMU");
    let stderr =
        std::fs::File::create(&stderr_log).ctx(|| format!("creating {}", stderr_log.display()))?;
    let jailed = plan.is_some();
    let argv: Vec<String> = std::iter::once(QEMU_BIN.to_string())
        .chain(args.iter().cloned())
        .collect();
    let child = spawn_child(
        &spawn::qemu_binary()?,
        &argv,
        &[],
        stderr,
        keep,
        spec.detached,
        args::huge_pages(spec),
        plan,
    )
    .await
    .map_err(|e| {
        if jailed {
            Error::Jail(format!("starting {QEMU_BIN} in its jail: {e}"))
        } else {
            Error::io(format!("starting {QEMU_BIN}"), e)
        }
    })?;
    // QEMU holds its own copies now.
    drop((
        qmp_listener,
        agent_listener,
        console_qemu,
        net_qemu,
        incoming,
    ));
    let console = ConsoleTail::default();
    console_host
        .set_nonblocking(true)
        .ctx(|| "configuring the console socket".to_string())?;
    console.drain(
        UnixStream::from_std(console_host).ctx(|| "registering the console socket".to_string())?,
    );
    let pid = child.pid;
    let process =
        Process::Child(PidFd::from_owned(child.pidfd).ctx(|| format!("watching QEMU pid {pid}"))?);
    let qmp_stream = connect(&qmp_sock)?;
    let agent = connect(&agent_sock)?;

    let mut proc = Proc {
        process,
        pid,
        console,
        stderr_log,
        exited: None,
    };
    let qmp = proc
        .while_alive(
            "waiting for QMP",
            QMP_READY_TIMEOUT,
            Qmp::connect(qmp_stream),
        )
        .await??;
    let mut vm = Vm {
        proc,
        qmp,
        agent: Some(agent),
        net: Some(net_host.into()),
        agent_sock,
        qmp_sock,
        detached: spec.detached,
        released: false,
        slot,
    };
    tracing::info!(pid, ms = started.elapsed().as_millis() as u64, accel = %spec.accel.accel, restore = spec.incoming.is_some(), migration = fds.incoming.is_some() && spec.incoming.is_none(), template_ram = matches!(spec.ram, GuestRam::TemplateClone { .. }), "QEMU started");

    if let (Some(incoming), Some(fd)) = (&spec.incoming, fds.incoming) {
        vm.start_restore(incoming, fd).await?;
    }
    Ok(vm)
}

impl Vm {
    /// Takes over a detached VM that an earlier (possibly killed) moat launched with
    /// `run_dir` as its [`VmSpec::run_dir`] and `run_dir/disk.qcow2` as its disk.
    ///
    /// Refused unless `pid` is a live QEMU whose command line names that disk, so a reused pid
    /// is never mistaken for the VM. QEMU is not our child, so it is watched through a pidfd
    /// (Linux ≥ 5.3) and its exit status is unknown ([`Vm::wait_exit`] reports 0). QMP is
    /// reconnected on `qmp.sock`; [`Vm::take_agent_stream`] opens a new agent connection.
    /// The console tail is gone (its socket died with the old owner): [`Vm::console_tail`] is
    /// empty from now on; QEMU's own stderr (`qemu.log`) is still there.
    ///
    /// If QMP does not answer, QEMU is killed: a VM nobody can control must not live on.
    pub async fn adopt(run_dir: &Path, pid: u32, jail: &crate::jail::JailMode) -> Result<Vm> {
        let disk = run_dir.join("disk.qcow2");
        let refuse = |why: &str| Error::Adopt(format!("pid {pid} ({}): {why}", run_dir.display()));
        // Open the pidfd before checking the command line: if the pid is reused after the
        // check, the pidfd (bound to the process we checked) reports it exited.
        let pidfd = PidFd::open(pid).map_err(|e| refuse(&format!("pidfd_open: {e}")))?;
        if !is_qemu_of(pid, &disk) {
            return Err(refuse("not a QEMU running this directory's disk"));
        }
        if pidfd.has_exited() {
            return Err(refuse("the process exited"));
        }
        let qmp_sock = run_dir.join("qmp.sock");
        let agent_sock = run_dir.join("agent.sock");
        let mut proc = Proc {
            process: Process::Adopted(pidfd),
            pid,
            console: ConsoleTail::default(),
            stderr_log: run_dir.join("qemu.log"),
            exited: None,
        };
        let qmp = async {
            let stream = connect(&qmp_sock)?;
            proc.while_alive(
                "reconnecting to QMP",
                QMP_READY_TIMEOUT,
                Qmp::connect(stream),
            )
            .await?
        }
        .await;
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                let _ = proc.kill().await;
                return Err(e);
            }
        };
        tracing::info!(pid, run_dir = %run_dir.display(), "adopted QEMU");
        let slot = match jail {
            crate::jail::JailMode::On(host) => procfs::uid_of(pid)
                .and_then(|uid| host.slot_of_qemu_uid(uid))
                .map_or(VmSlot::None, VmSlot::Adopted),
            crate::jail::JailMode::Off => VmSlot::None,
        };
        Ok(Vm {
            proc,
            qmp,
            agent: None,
            net: None,
            agent_sock,
            qmp_sock,
            detached: true,
            released: false,
            slot,
        })
    }

    /// Lets go of a detached VM without stopping it: QEMU keeps running and its sockets stay,
    /// so another process can [`Vm::adopt`] it. Our QMP and agent connections close. An
    /// attached VM cannot be released (it dies with us anyway): it is killed and an error
    /// returned.
    pub fn release(mut self) -> Result<()> {
        if !self.detached {
            return Err(Error::InvalidArgument(
                "only a VM launched detached (VmSpec::detached) can be released".into(),
            ));
        }
        self.released = true;
        if let VmSlot::Own(slot) = &mut self.slot {
            slot.keep();
        }
        Ok(())
    }

    /// The jail slot QEMU runs in (the network stack of its sandbox takes the same one);
    /// `None` unjailed or adopted.
    pub(crate) fn jail_slot(&self) -> Option<&crate::jail::Slot> {
        match &self.slot {
            VmSlot::Own(s) => Some(s),
            _ => None,
        }
    }

    /// Whether QEMU was launched detached or adopted (it may outlive this process).
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// The QMP session.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// A connected client of the agent port. The first call returns the connection made at
    /// launch (so nothing the guest writes early is lost); later calls open a new one, which
    /// QEMU accepts once the previous one is closed — that is how the host reconnects.
    ///
    /// Never a blocking connect: QEMU stops accepting while it has a client and listens with
    /// a backlog of one, so a connect can find the queue full until QEMU has seen the previous
    /// client go. A blocking one then holds an executor thread that the previous client's
    /// teardown may be waiting for (seen as a daemon that never recovered a sandbox). This
    /// retries until `deadline` instead.
    pub async fn take_agent_stream(&mut self, deadline: Duration) -> Result<UnixStream> {
        if let Some(s) = self.agent.take() {
            return Ok(s);
        }
        let start = Instant::now();
        loop {
            match UnixStream::connect(&self.agent_sock).await {
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                r => return r.ctx(|| format!("connecting to {}", self.agent_sock.display())),
            }
        }
    }

    /// The host's end of the guest NIC's link (QEMU's stream netdev framing), for the
    /// sandbox's network stack; `None` after the first call and for an adopted VM (its
    /// stack outlived the previous owner and still holds it).
    pub fn take_net_socket(&mut self) -> Option<OwnedFd> {
        self.net.take()
    }

    /// The last `max_bytes` of the serial console (kernel messages, panics); empty for an
    /// adopted VM.
    pub fn console_tail(&self, max_bytes: usize) -> String {
        self.proc.console_tail(max_bytes)
    }

    /// The last `max_bytes` of QEMU's own stderr.
    pub fn stderr_tail(&self, max_bytes: usize) -> String {
        self.proc.stderr_tail(max_bytes)
    }

    /// Waits until QEMU exits (e.g. guest panic or poweroff with `-no-reboot`).
    pub async fn wait_exit(&mut self) -> Result<ExitStatus> {
        self.proc.wait_exit().await
    }

    /// SIGKILLs QEMU and reaps it.
    pub async fn kill(&mut self) -> Result<()> {
        self.proc.kill().await
    }

    /// Runs `fut` unless QEMU exits or `timeout` passes first; both become errors that
    /// carry the console tail, so a guest panic explains itself. `what` names the wait.
    pub async fn while_alive<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        fut: impl Future<Output = T>,
    ) -> Result<T> {
        self.proc.while_alive(what, timeout, fut).await
    }

    /// The error to report when a channel to the guest (agent stream, QMP) broke: QEMU
    /// closes its sockets a moment before it is reaped, so this waits up to 2 s for it to
    /// exit and then returns [`Error::VmExited`] with the console tail (e.g. a guest panic);
    /// if QEMU keeps running it returns [`Error::ChannelClosed`].
    pub async fn exit_error(&mut self, what: &str) -> Error {
        match self
            .proc
            .while_alive(
                what,
                Duration::from_secs(2),
                std::future::pending::<std::convert::Infallible>(),
            )
            .await
        {
            Err(Error::Timeout { console_tail, .. }) => Error::ChannelClosed {
                what: what.to_string(),
                console_tail,
            },
            Err(e) => e,
            Ok(never) => match never {},
        }
    }

    /// QMP `query-status`'s `status` (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub async fn status(&mut self) -> Result<String> {
        let s = self.qmp.execute("query-status", None).await?;
        Ok(s["status"].as_str().unwrap_or_default().to_string())
    }

    /// Starts loading the memory image QEMU inherited as `fd` (it waits for this, started
    /// with `-incoming defer`: QEMU 7.2 can set `x-ignore-shared` only through QMP).
    async fn start_restore(&mut self, incoming: &Incoming, fd: RawFd) -> Result<()> {
        if incoming.ignore_shared {
            self.set_ignore_shared().await?;
        }
        self.qmp
            .execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("fd:{fd}") })),
            )
            .await?;
        Ok(())
    }

    /// Leaves shared RAM (a template's) out of migration streams, and expects it left out of
    /// incoming ones.
    async fn set_ignore_shared(&mut self) -> Result<()> {
        let caps = json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
        self.qmp
            .execute("migrate-set-capabilities", Some(caps))
            .await
            .map(|_| ())
    }

    /// Waits for the incoming migration that [`spawn`] started to finish, then starts the
    /// guest. The source was paused when saved, so QEMU does not autostart; we `cont`
    /// explicitly.
    pub(crate) async fn finish_restore(&mut self) -> Result<()> {
        let started = Instant::now();
        if self.load_incoming().await? {
            self.qmp.execute("cont", None).await?;
        }
        tracing::info!(
            pid = self.proc.pid,
            waited_ms = started.elapsed().as_millis() as u64,
            "VM restored and running"
        );
        Ok(())
    }

    /// Waits until the incoming migration has loaded; whether the VM is paused (needs `cont`).
    async fn load_incoming(&mut self) -> Result<bool> {
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        loop {
            let qmp = &mut self.qmp;
            let fut = async {
                let st = qmp.execute("query-status", None).await?;
                Ok::<_, Error>(st["status"].as_str().unwrap_or_default().to_string())
            };
            // Polled every 3 ms: the load takes ~100-200 ms, and MIGRATION events on the
            // destination would need the `events` capability set before the stream starts
            // (`-incoming defer` + `migrate-incoming`), one more round trip for no gain.
            let status = self
                .proc
                .while_alive("loading the memory snapshot", RESTORE_TIMEOUT, fut)
                .await??;
            match status.as_str() {
                "inmigrate" => {}
                "paused" | "postmigrate" => break,
                "running" => return Ok(false),
                other => {
                    return Err(Error::Migration {
                        what: "restore",
                        desc: format!("unexpected VM status {other:?} after loading the snapshot"),
                    })
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "loading the memory snapshot".into(),
                    secs: RESTORE_TIMEOUT.as_secs_f64(),
                    console_tail: self.console_tail(ERROR_TAIL),
                });
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let mig = self.qmp.execute("query-migrate", None).await?;
        if let Some(st) = mig["status"].as_str() {
            if st == "failed" {
                return Err(Error::Migration {
                    what: "restore",
                    desc: mig["error-desc"].as_str().unwrap_or("unknown").to_string(),
                });
            }
        }
        Ok(true)
    }

    /// Saves the guest's memory and device state to exactly `path` and returns its size.
    /// The VM is stopped first and stays paused afterwards ([`Vm::resume`] continues it).
    ///
    /// The disk needs no separate flush: `stop` drains and flushes all block devices, and
    /// completing the migration flushes again and inactivates the images, so the overlay
    /// file is consistent on return and may serve as a (frozen) backing file for clones as
    /// long as this VM is not resumed on it.
    pub async fn save_memory(&mut self, path: &Path) -> Result<u64> {
        let started = Instant::now();
        self.qmp.execute("stop", None).await?;
        // Format 3 images: a template's shared RAM stays out of the stream, private RAM is in.
        self.set_ignore_shared().await?;
        // The default cap of 128 MiB/s makes a ~100 MB save take ~0.7 s instead of ~0.12 s.
        self.qmp
            .execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": 1u64 << 40 })),
            )
            .await?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .ctx(|| format!("creating snapshot file {}", path.display()))?;
        use std::os::fd::AsFd;
        self.qmp.getfd("moat-snapshot", file.as_fd()).await?;
        self.qmp
            .execute("migrate", Some(json!({ "uri": "fd:moat-snapshot" })))
            .await?;
        let deadline = Instant::now() + SAVE_TIMEOUT;
        loop {
            let fut = self.qmp.execute("query-migrate", None);
            let mig = self
                .proc
                .while_alive("saving the memory snapshot", SAVE_TIMEOUT, fut)
                .await??;
            match mig["status"].as_str().unwrap_or_default() {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(Error::Migration {
                        what: "save",
                        desc: mig["error-desc"]
                            .as_str()
                            .unwrap_or("no error description from QEMU")
                            .to_string(),
                    })
                }
                _ => {}
            }
            if Instant::now() > deadline {
                let _ = self.qmp.execute("migrate_cancel", None).await;
                return Err(Error::Timeout {
                    what: "saving the memory snapshot".into(),
                    secs: SAVE_TIMEOUT.as_secs_f64(),
                    console_tail: self.console_tail(ERROR_TAIL),
                });
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        file.sync_all()
            .ctx(|| format!("syncing snapshot file {}", path.display()))?;
        let len = file
            .metadata()
            .ctx(|| format!("stat {}", path.display()))?
            .len();
        tracing::info!(bytes = len, ms = started.elapsed().as_millis() as u64, path = %path.display(), "memory snapshot saved");
        Ok(len)
    }

    /// Stops the vCPUs (QMP `stop`); devices, memory and QEMU's own loop stay. [`Vm::resume`]
    /// continues.
    pub async fn pause(&mut self) -> Result<()> {
        self.qmp.execute("stop", None).await.map(|_| ())
    }

    /// Continues a paused VM (after [`Vm::save_memory`], [`Vm::pause`] or `stop`). After a save this also
    /// re-activates the disk images, so the overlay must no longer be used as a clone base.
    pub async fn resume(&mut self) -> Result<()> {
        self.qmp.execute("cont", None).await.map(|_| ())
    }

    /// Makes an adopted VM run again if its previous owner died half-way through a save: a
    /// migration still going is cancelled (its file is incomplete and nobody will finish it),
    /// and a VM paused for the save (or left in `postmigrate`) is continued. Returns whether
    /// anything had to be done.
    pub async fn ensure_running(&mut self) -> Result<bool> {
        let deadline = Instant::now() + SAVE_TIMEOUT;
        let mut cancelled = false;
        loop {
            let mig = self.qmp.execute("query-migrate", None).await?;
            let status = mig["status"].as_str().unwrap_or_default();
            if !matches!(
                status,
                "setup" | "active" | "pre-switchover" | "device" | "cancelling" | "wait-unplug"
            ) {
                break;
            }
            if !cancelled {
                tracing::warn!(status, "cancelling the migration of a dead owner");
                self.qmp.execute("migrate_cancel", None).await?;
                cancelled = true;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "cancelling an abandoned memory save".into(),
                    secs: SAVE_TIMEOUT.as_secs_f64(),
                    console_tail: self.console_tail(ERROR_TAIL),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let status = self.qmp.execute("query-status", None).await?;
        let state = status["status"].as_str().unwrap_or_default().to_string();
        if state == "running" {
            return Ok(cancelled);
        }
        tracing::warn!(state, "continuing a VM its previous owner left paused");
        self.resume().await?;
        Ok(true)
    }
}

impl Proc {
    /// Waits until QEMU exits (e.g. guest panic or poweroff with `-no-reboot`).
    async fn wait_exit(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        let s = self
            .process
            .wait()
            .await
            .ctx(|| format!("waiting for QEMU pid {}", self.pid))?;
        self.exited = Some(s);
        Ok(s)
    }

    /// SIGKILLs QEMU and reaps it.
    async fn kill(&mut self) -> Result<()> {
        if self.exited.is_none() {
            self.process.start_kill();
        }
        self.wait_exit().await.map(|_| ())
    }

    /// Runs `fut` unless QEMU exits or `timeout` passes first; both become errors that
    /// carry the console tail, so a guest panic explains itself. `what` names the wait.
    async fn while_alive<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        fut: impl Future<Output = T>,
    ) -> Result<T> {
        if let Some(s) = self.exited {
            return Err(self.exited_error(what, s));
        }
        let r = tokio::select! {
            r = fut => Ok(r),
            s = self.process.wait() => Err(s),
            () = tokio::time::sleep(timeout) => {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs_f64(),
                    console_tail: self.console_tail(ERROR_TAIL),
                });
            }
        };
        match r {
            Ok(v) => Ok(v),
            Err(Ok(s)) => {
                self.exited = Some(s);
                Err(self.exited_error(what, s))
            }
            Err(Err(e)) => Err(Error::io(format!("waiting for QEMU pid {}", self.pid), e)),
        }
    }

    fn exited_error(&self, what: &str, status: ExitStatus) -> Error {
        Error::VmExited {
            what: what.to_string(),
            status: status.to_string(),
            console_tail: self.console_tail(ERROR_TAIL),
            stderr_tail: self.stderr_tail(ERROR_TAIL),
        }
    }

    fn console_tail(&self, max_bytes: usize) -> String {
        self.console.tail(max_bytes)
    }

    fn stderr_tail(&self, max_bytes: usize) -> String {
        file_tail(&self.stderr_log, max_bytes)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if self.proc.exited.is_none() {
            self.proc.process.start_kill();
            // Reap synchronously (bounded), so no QEMU outlives its Vm even briefly.
            self.proc.process.wait_blocking(Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(&self.qmp_sock);
        let _ = std::fs::remove_file(&self.agent_sock);
        // The sandbox is gone: whatever else is in its cgroup (its network stack) goes too.
        if let VmSlot::Adopted(slot) = &self.slot {
            slot.remove();
        }
    }
}
