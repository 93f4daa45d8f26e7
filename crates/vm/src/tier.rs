//! Resource tiers: how much CPU, memory and disk a sandbox gets.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Resource tier of a sandbox: xs 0.25 vCPU/512 MiB, s 1/1 GiB, m 1/2 GiB, l 2/4 GiB, xl 4/8 GiB.
/// The guest sees the tier's memory and a root disk of the tier's size; the host stores only
/// the blocks the guest writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Xs,
    S,
    #[default]
    M,
    L,
    Xl,
}

const GIB: u64 = 1024 * 1024 * 1024;

impl Tier {
    pub const ALL: [Tier; 5] = [Tier::Xs, Tier::S, Tier::M, Tier::L, Tier::Xl];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Xs => "xs",
            Tier::S => "s",
            Tier::M => "m",
            Tier::L => "l",
            Tier::Xl => "xl",
        }
    }

    /// The CPU share of the tier, in thousandths of a CPU.
    pub fn millicores(self) -> u32 {
        match self {
            Tier::Xs => 250,
            Tier::S | Tier::M => 1000,
            Tier::L => 2000,
            Tier::Xl => 4000,
        }
    }

    /// Whole vCPUs for QEMU: the share rounded up, and never more than the host has.
    pub fn cpus(self) -> u32 {
        let host = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        self.millicores().div_ceil(1000).clamp(1, host)
    }

    pub fn mem_mib(self) -> u32 {
        match self {
            Tier::Xs => 512,
            Tier::S => 1024,
            Tier::M => 2048,
            Tier::L => 4096,
            Tier::Xl => 8192,
        }
    }

    /// Size of the root disk the guest sees.
    pub fn disk_bytes(self) -> u64 {
        GIB * match self {
            Tier::Xs => 5,
            Tier::S => 10,
            Tier::M => 20,
            Tier::L => 40,
            Tier::Xl => 80,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = Error;

    fn from_str(s: &str) -> Result<Tier, Error> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "invalid tier {s:?}: use one of xs (0.25 vCPU, 512 MiB), s (1 vCPU, 1 GiB), \
                     m (1 vCPU, 2 GiB, the default), l (2 vCPU, 4 GiB), xl (4 vCPU, 8 GiB)"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_sizes() {
        assert_eq!("xl".parse::<Tier>().unwrap(), Tier::Xl);
        assert_eq!(Tier::default(), Tier::M);
        let err = "huge".parse::<Tier>().unwrap_err().to_string();
        assert!(err.contains("\"huge\"") && err.contains("xs"), "{err}");
        assert_eq!(Tier::Xs.cpus(), 1);
        assert!(Tier::Xl.cpus() <= std::thread::available_parallelism().unwrap().get() as u32);
        assert_eq!(Tier::Xs.disk_bytes(), 5 * GIB);
        assert_eq!(Tier::Xl.mem_mib(), 8192);
    }
}
