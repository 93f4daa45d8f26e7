//! Each sandbox's network stack: a process of its own (`moat net-stack`, running
//! `moat_net::run`) on the host's end of the guest NIC's link, started beside QEMU with the
//! same lifecycle (attached: dies with us; detached: outlives us with its VM). It parses
//! hostile frames, so a crash costs one sandbox its network, never moat. It ends by itself
//! when QEMU closes the link; its policy comes later, over its control socket
//! (`run/<id>/net.sock`, see [`moat_net::control`]), and until then it serves nothing.
//! Connections to the guest's ports are asked for on its port socket (`run/<id>/ports.sock`,
//! see [`moat_net::ingress`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::error::IoContext;
use crate::jail::{JailSpec, Plan, Slot, View};
use crate::qemu::{bind, pidfd_kill, pidfd_poll, reap_blocking, spawn_child, Spawned};
use crate::{Error, Result};

/// The control socket's name in the run directory.
pub const CONTROL_SOCKET: &str = "net.sock";
/// The port socket's name in the run directory (connections to the guest's ports).
pub const PORTS_SOCKET: &str = "ports.sock";
/// The stack's stderr in the run directory.
const LOG: &str = "net.log";

/// The running stack of one sandbox: our child, or `None` for an adopted sandbox (its stack
/// is the previous owner's child and ends with its VM).
#[derive(Debug)]
pub(crate) struct NetStack {
    child: Option<Spawned>,
    detached: bool,
}

impl NetStack {
    pub(crate) fn adopted() -> NetStack {
        NetStack {
            child: None,
            detached: true,
        }
    }

    /// The stack's pid while it is our child (not for an adopted sandbox).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid)
    }
}

impl Drop for NetStack {
    /// Attached, the stack dies with its handle; either way an exited stack is reaped.
    fn drop(&mut self) {
        let Some(child) = &self.child else { return };
        let fd = child.pidfd.as_raw_fd();
        if !self.detached {
            let _ = pidfd_kill(fd);
        }
        if pidfd_poll(fd, if self.detached { 0 } else { 1000 }) {
            reap_blocking(&child.pidfd);
        }
    }
}

/// Files of the host a network stack reads besides its program: name resolution, for hosts
/// its policy names.
const NET_ETC: [&str; 4] = [
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
];

/// The stack's jail: the sandbox's slot, its own uid, the host's network.
fn jail(program: &Path, slot: &Slot) -> Result<Plan> {
    let mut view = View::system();
    let program = std::fs::canonicalize(program)
        .ctx(|| format!("resolving the network stack program {}", program.display()))?;
    view.binds.push((program, false));
    for f in NET_ETC {
        if Path::new(f).exists() {
            view.binds.push((f.into(), false));
        }
    }
    Plan::new(JailSpec {
        slot,
        uid: slot.net_uid(),
        view,
        new_net: false,
        groups: Vec::new(),
    })
}

/// What spawning one stack needs, owned: prepared while the VM is at hand (its jail slot),
/// spawned by [`start`] while the VM is busy with something else (a restore's load).
pub(crate) struct Prepared {
    program: std::path::PathBuf,
    args: Vec<String>,
    stderr: std::fs::File,
    fds: (OwnedFd, OwnedFd, OwnedFd),
    keep: Vec<std::os::fd::RawFd>,
    plan: Option<Plan>,
}

/// Binds the control socket at `run_dir/net.sock` and the port socket at
/// `run_dir/ports.sock`, and plans the jail of `program net-stack` on `guest` (the host's end
/// of the NIC's link) in `slot`, whose lock descriptor must stay open until [`start`] returns.
pub(crate) fn prepare(
    program: &Path,
    guest: OwnedFd,
    run_dir: &Path,
    slot: Option<&Slot>,
) -> Result<Prepared> {
    let control = bind(&run_dir.join(CONTROL_SOCKET))?;
    let ports = bind(&run_dir.join(PORTS_SOCKET))?;
    let log = run_dir.join(LOG);
    let stderr = std::fs::File::create(&log).ctx(|| format!("creating {}", log.display()))?;
    let args = vec![
        program.to_string_lossy().into_owned(),
        "net-stack".to_string(),
        "--guest-fd".into(),
        guest.as_raw_fd().to_string(),
        "--control-fd".into(),
        control.as_raw_fd().to_string(),
        "--ports-fd".into(),
        ports.as_raw_fd().to_string(),
    ];
    let mut keep = vec![guest.as_raw_fd(), control.as_raw_fd(), ports.as_raw_fd()];
    let plan = slot.map(|s| jail(program, s)).transpose()?;
    if let Some(s) = slot {
        keep.push(s.lock_fd());
    }
    let program = std::fs::canonicalize(program)
        .ctx(|| format!("resolving the network stack program {}", program.display()))?;
    Ok(Prepared {
        program,
        args,
        stderr,
        fds: (guest, control.into(), ports.into()),
        keep,
        plan,
    })
}

/// Starts the stack [`prepare`]d. Attached, it is killed when the returned handle drops.
pub(crate) async fn start(prepared: Prepared, detached: bool) -> Result<NetStack> {
    let Prepared {
        program,
        args,
        stderr,
        fds,
        keep,
        plan,
    } = prepared;
    let env: Vec<(&str, String)> = std::env::var("RUST_LOG")
        .ok()
        .map(|v| ("RUST_LOG", v))
        .into_iter()
        .collect();
    let jailed = plan.is_some();
    let child = spawn_child(&program, &args, &env, stderr, keep, detached, true, plan)
        .await
        .map_err(|e| {
            let what = format!("starting the network stack {} net-stack", program.display());
            if jailed {
                Error::Jail(format!("{what} in its jail: {e}"))
            } else {
                Error::io(what, e)
            }
        })?;
    // The stack holds the only host end now: when QEMU closes the link, the stack sees it.
    drop(fds);
    Ok(NetStack {
        child: Some(child),
        detached,
    })
}
