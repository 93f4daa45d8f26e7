//! What the host can hold: every VM that exists (running, being created or resumed, or ready
//! in a warm pool) holds its tier's memory and vCPUs here, under its id, until it ends or is
//! suspended. Memory is never overcommitted; vCPUs may be, by a ratio. A parked VM (vCPUs
//! stopped while idle) keeps its memory but holds no CPU share until it is unparked.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::api::Tier;
use crate::error::{Error, Result};

/// Memory left to the host (the daemon, QEMU's own overhead, the page cache) by default.
const HOST_RESERVE_MIB: u64 = 1024;

/// The daemon's limits, from `moat serve --max-memory-mib/--cpu-overcommit`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory all VMs together may have; default the host's MemTotal less 1 GiB.
    pub memory_mib: u64,
    /// vCPUs all VMs together may have, in thousandths (a fractional tier counts its share).
    pub millicpus: u64,
}

impl Limits {
    /// Limits from the host's MemTotal and CPU count. `max_memory_mib` replaces the memory
    /// limit; `cpu_overcommit` (> 0) is vCPUs allowed per host CPU.
    pub fn from_host(max_memory_mib: Option<u64>, cpu_overcommit: f64) -> Result<Limits> {
        if !(cpu_overcommit > 0.0 && cpu_overcommit <= 1000.0) {
            return Err(Error::Config(format!(
                "invalid CPU overcommit ratio {cpu_overcommit}: allowed is more than 0 and at \
                 most 1000 (vCPUs per host CPU)"
            )));
        }
        let memory_mib = match max_memory_mib {
            Some(m) => m,
            None => host_memory_mib()?.saturating_sub(HOST_RESERVE_MIB),
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Ok(Limits {
            memory_mib,
            millicpus: (cpus * cpu_overcommit * 1000.0) as u64,
        })
    }
}

/// MemTotal of /proc/meminfo, in MiB.
fn host_memory_mib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| Error::io("reading /proc/meminfo", e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .ok_or_else(|| Error::Config("/proc/meminfo has no MemTotal".to_string()))
}

/// The tier's (memory MiB, millicpus).
fn cost(tier: Tier) -> (u64, u64) {
    (u64::from(tier.mem_mib()), u64::from(tier.millicores()))
}

pub struct Capacity {
    limits: Limits,
    held: Mutex<HashMap<String, Held>>,
}

/// What one VM holds.
#[derive(Clone, Copy)]
struct Held {
    mem: u64,
    cpu: u64,
    parked: bool,
}

impl Held {
    fn new(tier: Tier) -> Held {
        let (mem, cpu) = cost(tier);
        Held {
            mem,
            cpu,
            parked: false,
        }
    }

    /// Memory and the CPU share it holds now.
    fn used(&self) -> (u64, u64) {
        (self.mem, if self.parked { 0 } else { self.cpu })
    }
}

/// Sums of [`Held::used`].
fn total<'a>(held: impl Iterator<Item = &'a Held>) -> (u64, u64) {
    held.map(Held::used)
        .fold((0, 0), |(m, c), (m2, c2)| (m + m2, c + c2))
}

/// Use of the host, for metrics.
pub struct Usage {
    pub memory_mib: u64,
    pub millicpus: u64,
    /// VMs parked now.
    pub parked: usize,
    pub limits: Limits,
}

impl Capacity {
    pub fn new(limits: Limits) -> Capacity {
        Capacity {
            limits,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds room for VM `id` of `tier`, or 429 saying what `what` needs and what is free.
    /// Holding again under the same id is a no-op.
    pub fn reserve(&self, id: &str, tier: Tier, what: &str) -> Result<()> {
        let mut held = self.lock();
        if held.contains_key(id) {
            return Ok(());
        }
        let (mem, cpu) = cost(tier);
        let (used_mem, used_cpu) = total(held.values());
        let vms = held.len();
        let l = self.limits;
        if used_mem + mem > l.memory_mib {
            return Err(Error::TooManyRequests(format!(
                "the host is full: {what} needs {mem} MiB of memory (tier {}), but only {} of \
                 this daemon's {} MiB are free ({used_mem} MiB held by {vms} running, starting \
                 or pooled VMs; suspended sandboxes hold none). Suspend or delete sandboxes, \
                 shrink a pool, or retry later",
                tier.as_str(),
                l.memory_mib.saturating_sub(used_mem),
                l.memory_mib
            )));
        }
        if used_cpu + cpu > l.millicpus {
            return Err(Error::TooManyRequests(format!(
                "the host is full: {what} needs {} vCPUs (tier {}), but only {} of this \
                 daemon's {} vCPUs (host CPUs × the overcommit ratio) are free. Suspend or \
                 delete sandboxes, shrink a pool, or retry later",
                cpu as f64 / 1000.0,
                tier.as_str(),
                l.millicpus.saturating_sub(used_cpu) as f64 / 1000.0,
                l.millicpus as f64 / 1000.0
            )));
        }
        held.insert(id.to_string(), Held::new(tier));
        Ok(())
    }

    /// Holds room for a VM that exists already (adopted at start), even past the limits.
    pub fn force(&self, id: &str, tier: Tier) {
        self.lock().insert(id.to_string(), Held::new(tier));
    }

    /// Marks `id` parked (it gives back its CPU share, keeps its memory) or running again (it
    /// takes its share back even past the limit: its user is waiting, and CPU, unlike memory,
    /// is only shared more thinly when overcommitted). Nothing if `id` holds nothing.
    pub fn set_parked(&self, id: &str, parked: bool) {
        if let Some(h) = self.lock().get_mut(id) {
            h.parked = parked;
        }
    }

    /// Whether `id` is parked.
    pub fn is_parked(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|h| h.parked)
    }

    /// Gives back what `id` held (nothing if it held nothing).
    pub fn release(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn usage(&self) -> Usage {
        let held = self.lock();
        let (memory_mib, millicpus) = total(held.values());
        Usage {
            memory_mib,
            millicpus,
            parked: held.values().filter(|h| h.parked).count(),
            limits: self.limits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_vm_holds_memory_but_no_cpu_share() {
        let c = Capacity::new(Limits {
            memory_mib: 100_000,
            millicpus: 500,
        });
        c.reserve("a", Tier::Xs, "a create").unwrap();
        c.reserve("b", Tier::Xs, "a create").unwrap();
        let e = c.reserve("c", Tier::Xs, "a create").unwrap_err();
        assert!(e.to_string().contains("vCPUs"), "{e}");
        c.set_parked("a", true);
        assert!(c.is_parked("a") && !c.is_parked("b"));
        let u = c.usage();
        assert_eq!((u.millicpus, u.parked), (250, 1));
        assert_eq!(u.memory_mib, 2 * u64::from(Tier::Xs.mem_mib()));
        c.reserve("c", Tier::Xs, "a create").unwrap();
        // Unparking takes the share back past the limit rather than fail a waiting request.
        c.set_parked("a", false);
        assert_eq!(c.usage().millicpus, 750);
        assert!(c.reserve("d", Tier::Xs, "a create").is_err());
    }

    #[test]
    fn refuses_what_would_overcommit_memory_and_frees_on_release() {
        let c = Capacity::new(Limits {
            memory_mib: 2048,
            millicpus: 100_000,
        });
        c.reserve("a", Tier::S, "a create").unwrap();
        c.reserve("a", Tier::S, "a create").unwrap();
        c.reserve("b", Tier::S, "a create").unwrap();
        let e = c.reserve("c", Tier::S, "a create").unwrap_err();
        assert!(matches!(e, Error::TooManyRequests(_)));
        let m = e.to_string();
        assert!(
            m.contains("needs 1024 MiB") && m.contains("only 0 of"),
            "{m}"
        );
        c.release("a");
        c.reserve("c", Tier::S, "a create").unwrap();
        assert_eq!(c.usage().memory_mib, 2048);
    }

    #[test]
    fn vcpus_are_bounded_by_the_ratio() {
        let c = Capacity::new(Limits {
            memory_mib: 1 << 20,
            millicpus: 1500,
        });
        c.reserve("a", Tier::S, "x").unwrap();
        c.reserve("b", Tier::Xs, "x").unwrap();
        c.reserve("c", Tier::Xs, "x").unwrap();
        let m = c.reserve("d", Tier::Xs, "x").unwrap_err().to_string();
        assert!(m.contains("vCPUs"), "{m}");
        assert!(Limits::from_host(None, 0.0).is_err());
        assert!(Limits::from_host(Some(1), 2.0).unwrap().millicpus >= 2000);
    }
}
