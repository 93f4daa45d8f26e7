//! What the host can hold: every VM that exists (running, being created or resumed, or ready
//! in a warm pool) holds its tier's memory and vCPUs here, under its id, until it ends or is
//! suspended. A parked VM (vCPUs stopped while idle) keeps its memory but holds no CPU share
//! until it is unparked.
//!
//! Memory is admitted twice. By tier: the sum of tiers may exceed the host's memory by a ratio
//! (`--memory-overcommit`), because a sandbox restored from a template shares the template's
//! memory copy-on-write and holds privately only what it touched (~44 MiB idle for a 512 MiB
//! xs tier, docs/SNAPSHOTS.md). By the host's real state: a new VM is refused unless the host's
//! MemAvailable still covers its whole tier plus a reserve, so that admission stops before the
//! host would have to swap or kill, whatever the ratio. What VMs really hold is measured as PSS
//! ([`crate::sandboxes::Manager::memory_pss`]), which counts shared template pages once over all clones.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::api::Tier;
use crate::error::{Error, Result};

/// Host memory kept free of VMs by default (the daemon, QEMU's own overhead, the page cache).
pub const DEFAULT_RESERVE_MIB: u64 = 1024;

/// The default of `--memory-overcommit`: how many MiB of tiers one MiB of host memory may
/// back. Measured here (docs/SNAPSHOTS.md): an idle clone of a template holds ~44 MiB of its
/// xs tier's 512 MiB privately (ratio 11.6) and a busy one all of it; 5 admits 230 xs
/// sandboxes on a 24 GiB host, and the MemAvailable check refuses new ones before the host
/// swaps if many fill their memory at once.
pub const DEFAULT_MEMORY_OVERCOMMIT: f64 = 5.0;

/// The daemon's limits, from `moat serve --max-memory-mib/--memory-overcommit/
/// --memory-reserve-mib/--cpu-overcommit`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tier memory all VMs together may hold: `--max-memory-mib`, or by default (MemTotal less
    /// the reserve) × the memory overcommit ratio.
    pub memory_mib: u64,
    /// vCPUs all VMs together may have, in thousandths (a fractional tier counts its share).
    pub millicpus: u64,
    /// Host memory a new VM's whole tier must leave available (MemAvailable).
    pub reserve_mib: u64,
}

impl Limits {
    /// Limits from the host's MemTotal and CPU count. `max_memory_mib` replaces the default
    /// tier-memory limit; `memory_overcommit` (≥ 1) scales that default; `cpu_overcommit`
    /// (> 0) is vCPUs allowed per host CPU.
    pub fn from_host(
        max_memory_mib: Option<u64>,
        memory_overcommit: f64,
        reserve_mib: u64,
        cpu_overcommit: f64,
    ) -> Result<Limits> {
        if !(cpu_overcommit > 0.0 && cpu_overcommit <= 1000.0) {
            return Err(Error::Config(format!(
                "invalid CPU overcommit ratio {cpu_overcommit}: allowed is more than 0 and at \
                 most 1000 (vCPUs per host CPU)"
            )));
        }
        if !(1.0..=100.0).contains(&memory_overcommit) {
            return Err(Error::Config(format!(
                "invalid memory overcommit ratio {memory_overcommit}: allowed is 1 (no \
                 overcommit) to 100 (MiB of tiers per MiB of host memory)"
            )));
        }
        let total = meminfo_mib("MemTotal")?;
        if reserve_mib >= total {
            return Err(Error::Config(format!(
                "invalid memory reserve {reserve_mib} MiB: it must be less than the host's \
                 {total} MiB"
            )));
        }
        let memory_mib = match max_memory_mib {
            Some(m) => m,
            None => ((total - reserve_mib) as f64 * memory_overcommit) as u64,
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Ok(Limits {
            memory_mib,
            millicpus: (cpus * cpu_overcommit * 1000.0) as u64,
            reserve_mib,
        })
    }
}

/// Field `name` of the host's /proc/meminfo, in MiB.
fn meminfo_mib(name: &str) -> Result<u64> {
    moat_vm::qemu::host_meminfo_mib(name)
        .ok_or_else(|| Error::Config(format!("/proc/meminfo has no readable {name}")))
}

/// The host's MemAvailable in MiB: what it can still give without swapping (free memory and
/// reclaimable cache).
pub fn host_available_mib() -> Result<u64> {
    meminfo_mib("MemAvailable")
}

/// The tier's (memory MiB, millicpus).
fn cost(tier: Tier) -> (u64, u64) {
    (u64::from(tier.mem_mib()), u64::from(tier.millicores()))
}

pub struct Capacity {
    limits: Limits,
    held: Mutex<HashMap<String, Held>>,
    /// The host's MemAvailable, MiB ([`host_available_mib`]; tests give their own).
    available: fn() -> Result<u64>,
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
    /// VMs held (sandboxes and pool VMs).
    pub vms: usize,
    pub limits: Limits,
}

impl Capacity {
    pub fn new(limits: Limits) -> Capacity {
        Capacity::with_host(limits, host_available_mib)
    }

    fn with_host(limits: Limits, available: fn() -> Result<u64>) -> Capacity {
        Capacity {
            limits,
            held: Mutex::new(HashMap::new()),
            available,
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
        // Last, as it reads /proc: the host must still have the whole tier, and the reserve.
        let available = (self.available)()?;
        if available < l.reserve_mib + mem {
            return Err(Error::TooManyRequests(format!(
                "the host is low on memory: {what} may use {mem} MiB (tier {}), but the host \
                 has {available} MiB available and this daemon keeps {} MiB of it free \
                 (--memory-reserve-mib). Running sandboxes use more than their share of the \
                 overcommitted memory; suspend or delete sandboxes, or retry later",
                tier.as_str(),
                l.reserve_mib
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
            vms: held.len(),
            limits: self.limits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with memory to spare, so that only the tier limits decide.
    fn plenty() -> Result<u64> {
        Ok(1 << 30)
    }

    fn capacity(memory_mib: u64, millicpus: u64) -> Capacity {
        Capacity::with_host(
            Limits {
                memory_mib,
                millicpus,
                reserve_mib: DEFAULT_RESERVE_MIB,
            },
            plenty,
        )
    }

    #[test]
    fn a_parked_vm_holds_memory_but_no_cpu_share() {
        let c = capacity(100_000, 500);
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
    fn refuses_past_the_tier_memory_limit_and_frees_on_release() {
        let c = capacity(2048, 100_000);
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
        let c = capacity(1 << 20, 1500);
        c.reserve("a", Tier::S, "x").unwrap();
        c.reserve("b", Tier::Xs, "x").unwrap();
        c.reserve("c", Tier::Xs, "x").unwrap();
        let m = c.reserve("d", Tier::Xs, "x").unwrap_err().to_string();
        assert!(m.contains("vCPUs"), "{m}");
        assert!(Limits::from_host(None, 3.0, 1024, 0.0).is_err());
        assert!(
            Limits::from_host(Some(1), 3.0, 1024, 2.0)
                .unwrap()
                .millicpus
                >= 2000
        );
    }

    #[test]
    fn tier_memory_is_overcommitted_by_the_ratio_unless_a_maximum_is_given() {
        let host = meminfo_mib("MemTotal").unwrap();
        let one = Limits::from_host(None, 1.0, 1024, 4.0).unwrap();
        assert_eq!(one.memory_mib, host - 1024);
        let three = Limits::from_host(None, 3.0, 1024, 4.0).unwrap();
        assert_eq!(three.memory_mib, ((host - 1024) as f64 * 3.0) as u64);
        assert_eq!(
            Limits::from_host(Some(1536), 3.0, 1024, 4.0)
                .unwrap()
                .memory_mib,
            1536
        );
        for bad in [0.5, 0.0, f64::NAN, 101.0] {
            let e = Limits::from_host(None, bad, 1024, 4.0).unwrap_err();
            assert!(e.to_string().contains("memory overcommit"), "{e}");
        }
        let e = Limits::from_host(None, 3.0, host, 4.0).unwrap_err();
        assert!(e.to_string().contains("less than the host"), "{e}");
    }

    #[test]
    fn a_host_low_on_real_memory_refuses_whatever_the_tier_limit_says() {
        let limits = Limits {
            memory_mib: 1 << 30,
            millicpus: 1 << 30,
            reserve_mib: 1024,
        };
        // 1024 reserved + 512 for an xs tier: 1536 available admits one, 1535 none.
        let c = Capacity::with_host(limits, || Ok(1536));
        c.reserve("a", Tier::Xs, "a create").unwrap();
        let c = Capacity::with_host(limits, || Ok(1535));
        let e = c.reserve("b", Tier::Xs, "a create").unwrap_err();
        assert!(matches!(e, Error::TooManyRequests(_)));
        let m = e.to_string();
        assert!(
            m.contains("low on memory") && m.contains("1535 MiB available"),
            "{m}"
        );
        assert_eq!(c.usage().memory_mib, 0);
        // Unreadable: refused, not admitted blindly.
        let c = Capacity::with_host(limits, || Err(Error::Config("no /proc".into())));
        assert!(c.reserve("c", Tier::Xs, "a create").is_err());
    }
}
