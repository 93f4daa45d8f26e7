//! Watching and killing a QEMU process: our own child through tokio, or one adopted from an
//! earlier moat (not our child, so `wait` cannot see it) through a pidfd, which names exactly
//! that process even after its pid is reused.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::process::Child;

/// The QEMU process: our child, or one adopted from an earlier moat.
#[derive(Debug)]
pub(super) enum Process {
    Child(Child),
    /// Not our child (its parent died): watched through a pidfd, reaped by init.
    Adopted(PidFd),
}

impl Process {
    pub(super) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Process::Child(c) => c.wait().await,
            Process::Adopted(p) => {
                p.wait().await?;
                // Only the parent learns the status; report success rather than invent one.
                Ok(std::os::unix::process::ExitStatusExt::from_raw(0))
            }
        }
    }

    pub(super) fn start_kill(&mut self) {
        match self {
            Process::Child(c) => {
                let _ = c.start_kill();
            }
            Process::Adopted(p) => {
                let _ = p.kill();
            }
        }
    }

    /// Waits up to `timeout` for the process to exit, blocking the thread (used in `Drop`).
    pub(super) fn wait_blocking(&mut self, timeout: Duration) {
        match self {
            Process::Child(c) => {
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline {
                    match c.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                    }
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
pub(super) struct PidFd(tokio::io::unix::AsyncFd<OwnedFd>);

/// A pidfd outside tokio (for synchronous callers such as garbage collection).
#[derive(Debug)]
pub(super) struct SyncPidFd(OwnedFd);

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
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
fn pidfd_poll(fd: RawFd, timeout_ms: libc::c_int) -> bool {
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
fn pidfd_kill(fd: RawFd) -> std::io::Result<()> {
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

impl PidFd {
    pub(super) fn open(pid: u32) -> std::io::Result<PidFd> {
        let fd = pidfd_open(pid)?;
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
    pub(super) fn poll(&self, timeout_ms: libc::c_int) -> bool {
        pidfd_poll(self.0.get_ref().as_raw_fd(), timeout_ms)
    }

    pub(super) fn has_exited(&self) -> bool {
        self.poll(0)
    }

    pub(super) async fn wait(&self) -> std::io::Result<()> {
        // Readiness stays set once the process is gone, so every later wait returns at once.
        let _ready = self.0.readable().await?;
        Ok(())
    }

    pub(super) fn kill(&self) -> std::io::Result<()> {
        pidfd_kill(self.0.get_ref().as_raw_fd())
    }
}
