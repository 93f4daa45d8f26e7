//! Watching and killing a QEMU process (or a network stack) through a pidfd, which names
//! exactly that process even after its pid is reused: our own child (started by clone3 with
//! `CLONE_PIDFD`, reaped with `waitid(P_PIDFD)`), or one adopted from an earlier moat (not our
//! child, so only its exit can be seen, not its status).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitStatus;
use std::time::Duration;

/// The QEMU process: our child, or one adopted from an earlier moat.
#[derive(Debug)]
pub(crate) enum Process {
    /// Our child: its exit status is ours to collect.
    Child(PidFd),
    /// Not our child (its parent died): watched through a pidfd, reaped by init.
    Adopted(PidFd),
}

impl Process {
    pub(crate) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Process::Child(p) => {
                p.wait().await?;
                Ok(p.reap())
            }
            Process::Adopted(p) => {
                p.wait().await?;
                // Only the parent learns the status; report success rather than invent one.
                Ok(std::os::unix::process::ExitStatusExt::from_raw(0))
            }
        }
    }

    pub(crate) fn start_kill(&mut self) {
        match self {
            Process::Child(p) | Process::Adopted(p) => {
                let _ = p.kill();
            }
        }
    }

    /// Waits up to `timeout` for the process to exit, blocking the thread (used in `Drop`).
    pub(crate) fn wait_blocking(&mut self, timeout: Duration) {
        match self {
            Process::Child(p) => {
                if p.poll(timeout.as_millis() as libc::c_int) {
                    p.reap();
                }
            }
            Process::Adopted(p) => {
                p.poll(timeout.as_millis() as libc::c_int);
            }
        }
    }
}

/// A pidfd: a handle on one process that stays valid (and never names another process) after
/// the pid is reused; readable once the process has exited.
#[derive(Debug)]
pub(crate) struct PidFd(tokio::io::unix::AsyncFd<OwnedFd>);

/// A pidfd outside tokio (for synchronous callers such as garbage collection).
#[derive(Debug)]
pub(super) struct SyncPidFd(OwnedFd);

pub(super) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open(2) takes a pid and flags by value and returns a new descriptor or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor the kernel just created for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process behind pidfd `fd` has exited, waiting up to `timeout_ms` (0: just look).
pub(crate) fn pidfd_poll(fd: RawFd, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd on our stack and we pass a count of 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// SIGKILLs the process behind pidfd `fd`.
pub(crate) fn pidfd_kill(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a pidfd, a signal number, no siginfo (NULL) and no
    // flags; it reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl SyncPidFd {
    pub(super) fn has_exited(&self) -> bool {
        pidfd_poll(self.0.as_raw_fd(), 0)
    }

    pub(super) fn kill(&self) -> std::io::Result<()> {
        pidfd_kill(self.0.as_raw_fd())
    }
}

/// Collects the exit status of our exited child behind `fd` (so it leaves no zombie), or 0
/// if it was already collected.
pub(crate) fn reap_blocking(fd: &OwnedFd) -> ExitStatus {
    // SAFETY: siginfo_t is plain data for which all zeroes is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(2) with P_PIDFD on a pidfd we own, writing into `info` on our stack.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED,
        )
    };
    use std::os::unix::process::ExitStatusExt;
    if r != 0 {
        return ExitStatus::from_raw(0);
    }
    // SAFETY: waitid succeeded for an exited child, so si_status is set.
    let status = unsafe { info.si_status() };
    if info.si_code == libc::CLD_EXITED {
        ExitStatus::from_raw((status & 0xff) << 8)
    } else {
        ExitStatus::from_raw(status & 0x7f)
    }
}

impl PidFd {
    pub(super) fn open(pid: u32) -> std::io::Result<PidFd> {
        PidFd::from_owned(pidfd_open(pid)?)
    }

    /// Watches the process behind `fd` (e.g. a child's pidfd from clone3).
    pub(crate) fn from_owned(fd: OwnedFd) -> std::io::Result<PidFd> {
        // SAFETY: `fd` is a valid descriptor we own; the AsyncFd owns it from here and it is
        // neither replaced nor closed while registered.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        Ok(PidFd(registered?))
    }

    pub(super) fn open_blocking(pid: u32) -> std::io::Result<SyncPidFd> {
        pidfd_open(pid).map(SyncPidFd)
    }

    /// Whether the process has exited, waiting up to `timeout_ms` (0: just look).
    pub(crate) fn poll(&self, timeout_ms: libc::c_int) -> bool {
        pidfd_poll(self.0.get_ref().as_raw_fd(), timeout_ms)
    }

    pub(super) fn has_exited(&self) -> bool {
        self.poll(0)
    }

    pub(crate) async fn wait(&self) -> std::io::Result<()> {
        // Readiness stays set once the process is gone, so every later wait returns at once.
        let _ready = self.0.readable().await?;
        Ok(())
    }

    pub(crate) fn kill(&self) -> std::io::Result<()> {
        pidfd_kill(self.0.get_ref().as_raw_fd())
    }

    /// [`reap_blocking`] of an exited child.
    pub(crate) fn reap(&self) -> ExitStatus {
        reap_blocking(self.0.get_ref())
    }
}
