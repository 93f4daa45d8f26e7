//! Thin wrappers over the raw system calls the agent needs and std does not offer.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// `path` as a C string; paths from the host may contain NUL, which no syscall can take.
pub fn cstr(path: impl AsRef<Path>) -> io::Result<CString> {
    CString::new(path.as_ref().as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Locks `m`, ignoring poisoning: the agent must keep serving after a panicked task.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns a `-1` return value into the `errno` error.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })
    .map(drop)
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`, which outlives the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// Sends `signal` to process group `pgid`, or to the process itself when the group is gone.
pub fn kill_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pid = pgid as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(-pid, signal) })
        // SAFETY: as above.
        .or_else(|_| check(unsafe { libc::kill(pid, signal) }))
        .map(drop)
}

/// Writes `msg` to the console (our stderr is /dev/console), where the host reads the tail of
/// it when the guest fails to come up.
pub fn console(msg: &str) {
    eprintln!("moat-agent: {msg}");
}

/// Powers the VM off; the last thing PID 1 ever does.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; PID 1 exiting panics the kernel, which stops QEMU too.
    std::process::exit(1)
}

/// Reports a failure that leaves the guest useless and powers off.
pub fn fatal(msg: &str) -> ! {
    console(&format!("FATAL: {msg}"));
    power_off()
}
