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
    //! Golden tests: the exact argument lists are written out here, so any change to what QEMU
    //! is started with fails a test and has to be made here too, on purpose. To "regenerate",
    //! edit the expected lists by hand and say in the commit why the argument changed.

    use std::path::PathBuf;

    use super::*;
    use crate::{Accel, AccelChoice, Tier};

    /// What the guest kernel gets on a host with a known TSC.
    const CMDLINE: &str = "console=ttyS0 quiet panic=-1 init_on_free=1 tsc_early_khz=2100000 \
                           initcall_blacklist=cmos_init";
    /// The seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec, no
    /// affinity/scheduler changes.
    const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

    const FDS: QemuFds = QemuFds {
        qmp: 3,
        agent: 4,
        console: 5,
        incoming: None,
    };

    /// A VM of `tier` as the runtime builds it (whole vCPUs: the share rounded up; an xs
    /// sandbox's quarter CPU is a cgroup quota, not a QEMU argument).
    fn spec(accel: Accel, tier: Tier, disk: &str) -> VmSpec {
        VmSpec {
            accel: AccelChoice {
                accel,
                reason: "test".into(),
            },
            mem_mib: tier.mem_mib(),
            cpus: tier.millicores().div_ceil(1000),
            kernel: "/home/u/.moat/kernel/vmlinuz-6.1".into(),
            initramfs: "/home/u/.moat/initramfs/abc.cpio.gz".into(),
            disk: PathBuf::from(disk),
            run_dir: "/home/u/.moat/run/sb1".into(),
            incoming: None,
            detached: false,
        }
    }

    fn args(spec: &VmSpec, fds: &QemuFds) -> Vec<String> {
        argv(spec, fds, CMDLINE.to_string())
    }

    #[test]
    fn tcg_cold_boot() {
        let spec = spec(Accel::Tcg, Tier::Xs, "/home/u/.moat/run/sb1/disk.qcow2");
        let expected = [
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=on",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64,+arat",
            "-m",
            "512",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel",
            "/home/u/.moat/kernel/vmlinuz-6.1",
            "-initrd",
            "/home/u/.moat/initramfs/abc.cpio.gz",
            "-append",
            CMDLINE,
            "-chardev",
            "socket,id=console,fd=5",
            "-serial",
            "chardev:console",
            "-chardev",
            "socket,id=qmp,fd=3,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-drive",
            "id=root,file=/home/u/.moat/run/sb1/disk.qcow2,format=qcow2,if=none,cache=writeback",
            "-device",
            "virtio-blk-device,drive=root",
            "-device",
            "virtio-serial-device",
            "-chardev",
            "socket,id=agent,fd=4,server=on,wait=off",
            "-device",
            "virtserialport,chardev=agent,name=agent",
        ];
        assert_eq!(args(&spec, &FDS), expected);
    }

    #[test]
    fn kvm_restore_from_a_memory_snapshot() {
        let mut spec = spec(Accel::Kvm, Tier::Xl, "/home/u/.moat/run/sb2/disk.qcow2");
        spec.incoming = Some("/home/u/.moat/templates/t1/memory".into());
        let fds = QemuFds {
            incoming: Some(6),
            ..FDS
        };
        let expected = [
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "8192",
            "-smp",
            "4",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel",
            "/home/u/.moat/kernel/vmlinuz-6.1",
            "-initrd",
            "/home/u/.moat/initramfs/abc.cpio.gz",
            "-append",
            CMDLINE,
            "-chardev",
            "socket,id=console,fd=5",
            "-serial",
            "chardev:console",
            "-chardev",
            "socket,id=qmp,fd=3,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-drive",
            "id=root,file=/home/u/.moat/run/sb2/disk.qcow2,format=qcow2,if=none,cache=writeback",
            "-device",
            "virtio-blk-device,drive=root",
            "-device",
            "virtio-serial-device",
            "-chardev",
            "socket,id=agent,fd=4,server=on,wait=off",
            "-device",
            "virtserialport,chardev=agent,name=agent",
            // The snapshot arrives on an inherited descriptor, never by path or network.
            "-incoming",
            "fd:6",
        ];
        assert_eq!(args(&spec, &fds), expected);
    }

    /// Each tier changes `-m` and `-smp` and nothing else, under both accelerators, booted or
    /// restored; the sandbox, device and drive strings are the same in every combination.
    #[test]
    fn every_tier_accelerator_and_start_differs_only_where_it_must() {
        let sizes = [
            (Tier::Xs, "512", "1"),
            (Tier::S, "1024", "1"),
            (Tier::M, "2048", "1"),
            (Tier::L, "4096", "2"),
            (Tier::Xl, "8192", "4"),
        ];
        let disk = "/home/u/.moat/run/sb1/disk.qcow2";
        let base = args(&spec(Accel::Tcg, Tier::Xs, disk), &FDS);
        for (tier, mem, cpus) in sizes {
            for (accel, accel_args) in [
                (Accel::Tcg, ["-accel", "tcg", "-cpu", "qemu64,+arat"]),
                (Accel::Kvm, ["-accel", "kvm", "-cpu", "host"]),
            ] {
                for incoming in [None, Some(7)] {
                    let mut s = spec(accel, tier, disk);
                    s.incoming = incoming.map(|_| "/snap/memory".into());
                    let got = args(&s, &QemuFds { incoming, ..FDS });
                    let mut want = base.clone();
                    want.splice(2..6, accel_args.map(String::from));
                    want[7] = mem.into();
                    want[9] = cpus.into();
                    if let Some(fd) = incoming {
                        want.extend(["-incoming".into(), format!("fd:{fd}")]);
                    }
                    assert_eq!(got, want, "{tier} {accel} incoming={incoming:?}");
                    assert_eq!(got.iter().filter(|a| *a == "-sandbox").count(), 1);
                    assert!(got.windows(2).any(|w| w == ["-sandbox", SANDBOX]));
                    assert!(got.iter().any(|a| a == "-nodefaults"));
                }
            }
        }
    }

    /// No network device of any kind: the guest talks to the host only over the agent port.
    #[test]
    fn the_guest_gets_no_network_device() {
        let mut s = spec(Accel::Kvm, Tier::M, "/d/disk.qcow2");
        s.incoming = Some("/snap/memory".into());
        let got = args(
            &s,
            &QemuFds {
                incoming: Some(6),
                ..FDS
            },
        );
        for a in &got {
            for nic in [
                "-net",
                "-nic",
                "-netdev",
                "virtio-net",
                "user,",
                "tap,",
                "e1000",
            ] {
                assert!(!a.starts_with(nic) && !a.contains("virtio-net"), "{a}");
            }
        }
        // Only the three virtio devices (disk, serial bus, agent port) are added.
        let devices: Vec<_> = got
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            devices,
            [
                "virtio-blk-device,drive=root",
                "virtio-serial-device",
                "virtserialport,chardev=agent,name=agent"
            ]
        );
    }

    /// A comma in the disk path cannot smuggle drive options (`readonly=off`, a second `file=`):
    /// QEMU reads `,,` as a literal comma.
    #[test]
    fn commas_in_the_disk_path_are_escaped() {
        let s = spec(
            Accel::Tcg,
            Tier::M,
            "/tmp/x,file=/etc/shadow,format=raw,cache=unsafe/disk.qcow2",
        );
        let got = args(&s, &FDS);
        let drives: Vec<_> = got
            .windows(2)
            .filter(|w| w[0] == "-drive")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            drives,
            [
                "id=root,file=/tmp/x,,file=/etc/shadow,,format=raw,,cache=unsafe/disk.qcow2,\
              format=qcow2,if=none,cache=writeback"
            ]
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
