//! QEMU's argument list, built from a [`VmSpec`] and the descriptor numbers QEMU inherits, and
//! the guest kernel's command line. Pure apart from reading the host's TSC frequency (which
//! [`qemu_args`] passes in), so the security-relevant strings (`-sandbox`, `-nodefaults`, no
//! NIC, the `-drive` options) are pinned by the golden tests below.

use std::os::fd::RawFd;
use std::path::Path;

use super::procfs::host_tsc_khz;
use super::VmSpec;

/// The kernel command line.
pub fn kernel_cmdline() -> String {
    let khz = host_tsc_khz();
    if khz.is_none() {
        tracing::warn!("no \"cpu MHz\" in /proc/cpuinfo: booting without tsc_early_khz");
    }
    cmdline(khz)
}

/// The kernel command line for a host TSC of `tsc_khz`.
fn cmdline(tsc_khz: Option<u64>) -> String {
    let mut s = String::from("console=ttyS0 quiet panic=-1 init_on_free=1");
    if let Some(khz) = tsc_khz {
        s.push_str(&format!(" tsc_early_khz={khz}"));
    }
    // The RTC is needed for the wall clock, but its driver probe costs ~1 s under TCG.
    s.push_str(" initcall_blacklist=cmos_init");
    s
}

/// QEMU option values use `,` as separator; a literal comma is written `,,`.
fn esc(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Descriptor numbers QEMU inherits.
#[derive(Debug, Clone, Copy)]
pub struct QemuFds {
    /// Listening socket for QMP.
    pub qmp: RawFd,
    /// Listening socket for the agent's virtio-serial port.
    pub agent: RawFd,
    /// Connected socket that carries the serial console to the host.
    pub console: RawFd,
    /// A memory snapshot to restore.
    pub incoming: Option<RawFd>,
}

/// The full QEMU argument list (without the binary).
pub fn qemu_args(spec: &VmSpec, fds: &QemuFds) -> Vec<String> {
    argv(spec, fds, kernel_cmdline())
}

/// [`qemu_args`] with the kernel command line given, so that it depends on nothing else.
fn argv(spec: &VmSpec, fds: &QemuFds, cmdline: String) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-M".into(),
        "microvm,x-option-roms=off,isa-serial=on,rtc=on".into(),
    ];
    a.extend(spec.accel.accel.qemu_args().iter().map(|s| s.to_string()));
    a.extend([
        "-m".to_string(),
        spec.mem_mib.to_string(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-kernel".into(),
        spec.kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        spec.initramfs.to_string_lossy().into_owned(),
        "-append".into(),
        cmdline,
        "-chardev".into(),
        format!("socket,id=console,fd={}", fds.console),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!("socket,id=qmp,fd={},server=on,wait=off", fds.qmp),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // writeback (not unsafe): guest flushes reach the host file, so the overlay is
        // consistent when `stop`/migration flush it for a snapshot.
        "-drive".into(),
        format!(
            "id=root,file={},format=qcow2,if=none,cache=writeback",
            esc(&spec.disk)
        ),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("socket,id=agent,fd={},server=on,wait=off", fds.agent),
        "-device".into(),
        "virtserialport,chardev=agent,name=agent".into(),
    ]);
    if let Some(fd) = fds.incoming {
        a.push("-incoming".into());
        a.push(format!("fd:{fd}"));
    }
    a
}

#[cfg(test)]
mod tests {
    //! Golden tests: `testdata/qemu-args.golden` holds the exact argument list of every
    //! accelerator × tier × (boot | restore) combination, so any change to what QEMU is started
    //! with fails here. After an intended change, regenerate it with
    //! `MOAT_UPDATE_GOLDEN=1 cargo test -p moat-vm --lib qemu::args` and review the diff. The
    //! security-relevant strings are also asserted in code below, so a regenerated file cannot
    //! quietly weaken them.

    use std::path::{Path, PathBuf};

    use super::*;
    use crate::{Accel, AccelChoice, Tier};

    /// What the guest kernel gets on a host with a known TSC.
    const CMDLINE: &str = "console=ttyS0 quiet panic=-1 init_on_free=1 tsc_early_khz=2100000 \
                           initcall_blacklist=cmos_init";
    /// The seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec, no
    /// affinity/scheduler changes.
    const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
    const DISK: &str = "/home/u/.moat/run/sb1/disk.qcow2";

    /// A VM of `tier` as the runtime builds it (whole vCPUs: the share rounded up; an xs
    /// sandbox's quarter CPU is a cgroup quota around QEMU, not a QEMU argument), booted or
    /// restored from a template's memory snapshot on descriptor 6.
    fn case(accel: Accel, tier: Tier, restore: bool, disk: &str) -> Vec<String> {
        let spec = VmSpec {
            accel: AccelChoice {
                accel,
                reason: "test".into(),
            },
            mem_mib: tier.mem_mib(),
            cpus: tier.millicores().div_ceil(1000),
            kernel: "/home/u/.moat/kernels/vmlinuz-6.1".into(),
            initramfs: "/home/u/.moat/initramfs/abc.cpio.gz".into(),
            disk: PathBuf::from(disk),
            run_dir: "/home/u/.moat/run/sb1".into(),
            incoming: restore.then(|| "/home/u/.moat/templates/t1/memory".into()),
            detached: false,
        };
        let fds = QemuFds {
            qmp: 3,
            agent: 4,
            console: 5,
            incoming: restore.then_some(6),
        };
        argv(&spec, &fds, CMDLINE.to_string())
    }

    /// Every combination, each with its name.
    fn all_cases() -> Vec<(String, Vec<String>)> {
        let mut cases = Vec::new();
        for accel in [Accel::Tcg, Accel::Kvm] {
            for tier in Tier::ALL {
                for restore in [false, true] {
                    let start = if restore { "restore" } else { "boot" };
                    let name = format!("{accel} {tier} {start}");
                    cases.push((name, case(accel, tier, restore, DISK)));
                }
            }
        }
        cases
    }

    #[test]
    fn argument_lists_match_the_golden_file() {
        let mut got = String::new();
        for (name, args) in all_cases() {
            got.push_str(&format!("# {name}\n"));
            for a in args {
                got.push_str(&a);
                got.push('\n');
            }
            got.push('\n');
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/qemu/testdata/qemu-args.golden");
        if std::env::var_os("MOAT_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap();
        // Line by line, so a failure names the argument that changed.
        assert_eq!(
            got.lines().collect::<Vec<_>>(),
            want.lines().collect::<Vec<_>>(),
            "QEMU's arguments differ from {} (see this module's docs)",
            path.display()
        );
    }

    /// In every combination: the seccomp sandbox, no default or user-config devices, exactly
    /// the disk, the serial bus and the agent port as devices (no network device of any kind),
    /// and one qcow2 drive with writeback caching.
    #[test]
    fn every_combination_is_confined() {
        for (name, args) in all_cases() {
            let values = |opt: &str| -> Vec<&str> {
                args.windows(2)
                    .filter(|w| w[0] == opt)
                    .map(|w| w[1].as_str())
                    .collect()
            };
            assert_eq!(values("-sandbox"), [SANDBOX], "{name}");
            assert!(args.iter().any(|a| a == "-nodefaults"), "{name}");
            assert!(args.iter().any(|a| a == "-no-user-config"), "{name}");
            assert_eq!(
                values("-device"),
                [
                    "virtio-blk-device,drive=root",
                    "virtio-serial-device",
                    "virtserialport,chardev=agent,name=agent"
                ],
                "{name}"
            );
            for a in &args {
                assert!(
                    !["-net", "-nic", "-netdev"].contains(&a.as_str()) && !a.contains("-net-"),
                    "{name}: {a}"
                );
            }
            assert_eq!(
                values("-drive"),
                [format!(
                    "id=root,file={DISK},format=qcow2,if=none,cache=writeback"
                )],
                "{name}"
            );
        }
    }

    /// A comma in the disk path cannot smuggle drive options (`readonly=off`, a second `file=`):
    /// QEMU reads `,,` as a literal comma.
    #[test]
    fn commas_in_the_disk_path_are_escaped() {
        let disk = "/tmp/x,file=/etc/shadow,format=raw,cache=unsafe/disk.qcow2";
        let args = case(Accel::Tcg, Tier::M, false, disk);
        let i = args.iter().position(|a| a == "-drive").unwrap();
        assert_eq!(
            args[i + 1],
            "id=root,file=/tmp/x,,file=/etc/shadow,,format=raw,,cache=unsafe/disk.qcow2,\
             format=qcow2,if=none,cache=writeback"
        );
    }

    #[test]
    fn kernel_command_line() {
        assert_eq!(cmdline(Some(2_100_000)), CMDLINE);
        assert_eq!(
            cmdline(None),
            "console=ttyS0 quiet panic=-1 init_on_free=1 initcall_blacklist=cmos_init"
        );
    }
}
