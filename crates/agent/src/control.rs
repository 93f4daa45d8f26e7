//! Control requests: refresh after a restore, quiesce before a snapshot, shutdown.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::time::Duration;

use moat_protocol::{ErrorKind, Message, Refresh, Stream};

use crate::files::Failure;
use crate::port::Port;
use crate::sys::{check, console, mount, power_off, sethostname};

/// `_IOW('R', 0x03, int[2])`
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
const MIN_ENTROPY: usize = 32;

/// Sets the wall clock, mixes the host's entropy into the kernel RNG and forces a reseed (two
/// restores of one snapshot must not share random bytes), and sets the hostname.
pub fn refresh(r: &Refresh) -> Result<(), Failure> {
    let entropy = decode_hex(&r.entropy_hex)
        .filter(|e| e.len() >= MIN_ENTROPY)
        .ok_or_else(|| {
            Failure(
                ErrorKind::InvalidInput,
                format!("entropy_hex must be at least {MIN_ENTROPY} hex-encoded bytes"),
            )
        })?;
    let other = |what: &str, e: std::io::Error| Failure(ErrorKind::Other, format!("{what}: {e}"));
    let ts = libc::timespec {
        tv_sec: (r.unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (r.unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the live timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
        .map_err(|e| other("setting the clock", e))?;

    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| other("/dev/urandom", e))?;
    let info = rand_pool_info(&entropy);
    // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` whose buf_size bytes follow the
    // two ints; `info` is laid out exactly so and outlives the call.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })
        .map_err(|e| other("RNDADDENTROPY", e))?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) })
        .map_err(|e| other("RNDRESEEDCRNG", e))?;

    if let Some(name) = &r.hostname {
        sethostname(name).map_err(|e| other("setting the hostname", e))?;
    }
    Ok(())
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` as u32 words.
fn rand_pool_info(entropy: &[u8]) -> Vec<u32> {
    let mut words = vec![(entropy.len() * 8) as u32, entropy.len() as u32];
    words.extend(entropy.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_ne_bytes(w)
    }));
    words
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Replies `Quiesced` as the last frame the writer sends, and holds the writer until the host
/// ends this stream (the reader thread also ends it on EOF/RESET, or a new session does).
pub async fn quiesce(port: &Port, generation: u64, mut stream: Stream) {
    port.quiesce_after(generation, stream.id());
    if stream.sender().msg(&Message::Quiesced).await.is_ok() {
        // Any event (EOF, RESET) or the end of the session ends the quiesce.
        let _ = stream.recv().await;
    }
    port.resume(generation, stream.id());
    stream.close();
}

/// Replies `Done`, ends every process, syncs, remounts / read-only and powers off.
pub async fn shutdown(stream: Stream) -> ! {
    let _ = stream.sender().msg(&Message::Done).await;
    stream.close();
    // Let the writer thread put `Done` on the wire.
    tokio::time::sleep(Duration::from_millis(50)).await;
    // SAFETY: kill has no memory-safety preconditions; -1 means every process but us.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    for _ in 0..40 {
        if !user_processes_left() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if let Err(e) = mount("none", "/", None, libc::MS_REMOUNT | libc::MS_RDONLY, None) {
        console(&format!("remounting / read-only: {e}"));
    }
    power_off()
}

/// Whether any process but us and the kernel threads is still alive. `kill(-1, 0)` cannot tell:
/// it counts kernel threads too. Kernel threads and zombies have an empty cmdline.
fn user_processes_left() -> bool {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return false;
    };
    proc.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        pid != std::process::id()
            && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| !c.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex() {
        assert_eq!(decode_hex("00ff7A"), Some(vec![0, 255, 0x7a]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é1"), None);
    }

    #[test]
    fn pool_info_layout() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(info.len(), 4);
        assert_eq!(&info[..2], &[40, 5]);
        assert_eq!(info[2].to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(info[3].to_ne_bytes(), [5, 0, 0, 0]);
    }
}
