//! Pseudo-terminals for interactive execs: a master the agent reads and writes asynchronously,
//! and a slave that becomes the child's stdin, stdout, stderr and controlling terminal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use moat_protocol::PtySize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys::{check, cstr};

/// The master side of a pseudo-terminal. Clones share the one master fd: one reads the
/// output, one writes the input, and the exec loop resizes through a third.
#[derive(Clone)]
pub struct Pty(Arc<AsyncFd<OwnedFd>>);

impl Pty {
    /// Allocates a terminal of `size`; returns the master and the (close-on-exec) slave.
    pub fn open(size: PtySize) -> io::Result<(Pty, OwnedFd)> {
        let ptmx = cstr("/dev/ptmx")?;
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: `ptmx` is a NUL-terminated string that outlives the call.
        let fd = check(unsafe { libc::open(ptmx.as_ptr(), flags | libc::O_NONBLOCK) })?;
        // SAFETY: the fd was just opened and is owned by nobody else.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads an int from the live local.
        check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &mut unlock) })?;
        // TIOCGPTPEER opens the slave through the master, with no path lookup (and no race
        // with another devpts instance).
        // SAFETY: TIOCGPTPEER takes the open flags as a plain integer.
        let slave = check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) })?;
        // SAFETY: the fd was just opened and is owned by nobody else.
        let slave = unsafe { OwnedFd::from_raw_fd(slave) };
        // SAFETY: the master is an OwnedFd that the AsyncFd owns from now on; nothing replaces
        // or closes it while registered.
        let master = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
        let pty = Pty(Arc::new(master));
        pty.resize(size)?;
        Ok((pty, slave))
    }

    /// Sets the window size; the kernel sends SIGWINCH to the foreground process group.
    pub fn resize(&self, size: PtySize) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the live local.
        check(unsafe { libc::ioctl(self.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(drop)
    }
}

impl AsRawFd for Pty {
    fn as_raw_fd(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }
}

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let r = guard.try_io(|fd| {
                // SAFETY: reads into `unfilled`, which is valid for its length.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // EIO: every slave fd is closed, the terminal's end of file.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let r = guard.try_io(|fd| {
                // SAFETY: writes from `data`, which is valid for its length.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
