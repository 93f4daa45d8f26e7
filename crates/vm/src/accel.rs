//! Choosing the accelerator. KVM is used only when it demonstrably works: a PVM-backed
//! `/dev/kvm` (as on our CI hosts) opens fine and answers the API version, but ordinary guest
//! kernels hang under it; such hosts expose no `vmx`/`svm` CPU flag, which is what tells them apart.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use crate::{Error, Result};

/// The QEMU accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualisation (VT-x / AMD-V).
    Kvm,
    /// QEMU's binary translator: slow but works everywhere.
    Tcg,
}

impl Accel {
    /// The accelerator's short name (`kvm`/`tcg`), also used in cache keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// QEMU arguments selecting the accelerator and CPU model. The CPU model is part of the
    /// snapshot compatibility key: a restore must use exactly these arguments.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            // +arat gives the guest a lapic timer that keeps running in C3, so the kernel can
            // go tickless: ~1 % idle host CPU instead of ~5 %.
            Accel::Tcg => ["-accel", "tcg", "-cpu", "qemu64,+arat"],
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The chosen accelerator and why, so that logs and `moat doctor` can explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

// KVM_GET_API_VERSION = _IO(KVMIO=0xAE, 0x00).
nix::ioctl_none!(kvm_get_api_version, 0xAE, 0x00);

/// The stable KVM API version every usable kernel reports.
const KVM_API_VERSION: i32 = 12;

/// Picks KVM or TCG. `override_` (`"kvm"`/`"tcg"`, case-insensitive) wins over detection;
/// anything else is an error rather than a silent fallback.
pub fn detect(override_: Option<&str>) -> Result<AccelChoice> {
    let choice = match override_.map(|s| s.trim().to_ascii_lowercase()) {
        Some(o) if o == "kvm" => AccelChoice {
            accel: Accel::Kvm,
            reason: "forced by override `kvm`".into(),
        },
        Some(o) if o == "tcg" => AccelChoice {
            accel: Accel::Tcg,
            reason: "forced by override `tcg`".into(),
        },
        Some(_) => return Err(Error::InvalidAccel(override_.unwrap_or_default().into())),
        None => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            detect_from(&cpuinfo, probe_dev_kvm)
        }
    };
    tracing::info!(accel = %choice.accel, reason = %choice.reason, "accelerator chosen");
    Ok(choice)
}

/// Detection with the `/dev/kvm` probe injectable, so the decision logic is testable.
fn detect_from(cpuinfo: &str, probe: impl FnOnce() -> Result<i32, String>) -> AccelChoice {
    let has_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm");
    if !has_virt {
        return AccelChoice {
            accel: Accel::Tcg,
            reason: "the CPU has no vmx/svm flag (no hardware virtualisation, or a PVM-backed \
                     /dev/kvm that ordinary guest kernels hang on)"
                .into(),
        };
    }
    match probe() {
        Ok(KVM_API_VERSION) => AccelChoice {
            accel: Accel::Kvm,
            reason: "CPU has vmx/svm and /dev/kvm reports API version 12".into(),
        },
        Ok(v) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("/dev/kvm reports API version {v}, expected {KVM_API_VERSION}"),
        },
        Err(e) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("CPU has vmx/svm but {e}"),
        },
    }
}

fn probe_dev_kvm() -> Result<i32, String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))?;
    // SAFETY: `f` is an open file descriptor for the lifetime of the call, and
    // KVM_GET_API_VERSION takes no argument and writes no memory.
    unsafe { kvm_get_api_version(f.as_raw_fd()) }
        .map_err(|e| format!("KVM_GET_API_VERSION on /dev/kvm failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_virt_flags_means_tcg() {
        let c = detect_from("flags\t: fpu sse2 lm\n", || Ok(12));
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("vmx/svm"));
    }

    #[test]
    fn virt_flags_and_api_12_means_kvm() {
        let c = detect_from("flags\t: fpu vmx lm\n", || Ok(12));
        assert_eq!(c.accel, Accel::Kvm);
        let c = detect_from("flags\t: fpu svm lm\n", || Err("no".into()));
        assert_eq!(c.accel, Accel::Tcg);
        let c = detect_from("flags\t: svm\n", || Ok(11));
        assert_eq!(c.accel, Accel::Tcg);
    }

    #[test]
    fn override_and_this_host() {
        assert_eq!(detect(Some("tcg")).unwrap().accel, Accel::Tcg);
        assert_eq!(detect(Some("KVM")).unwrap().accel, Accel::Kvm);
        let e = detect(Some("hvf")).unwrap_err().to_string();
        assert!(e.contains("kvm") && e.contains("tcg"), "{e}");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        if !cpuinfo.contains(" vmx") && !cpuinfo.contains(" svm") {
            let c = detect(None).unwrap();
            assert_eq!(c.accel, Accel::Tcg);
            assert!(c.reason.contains("vmx/svm"), "{}", c.reason);
        }
    }
}
