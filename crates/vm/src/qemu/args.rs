//! QEMU's argument list, built from a [`VmSpec`] and the descriptor numbers QEMU inherits, and
//! the guest kernel's command line. Pure apart from reading the host's TSC frequency (which
//! [`qemu_args`] passes in), so the security-relevant strings (`-sandbox`, `-nodefaults`, the
//! one NIC on a stream socket, the `-drive` options) are pinned by the golden tests below.

use std::os::fd::RawFd;
use std::path::Path;

use super::procfs::host_tsc_khz;
use super::{GuestRam, VmSpec};

/// The id of the RAM backend: QEMU's own name for microvm's default RAM (the name memory
/// images saved before moat named the backend carry).
pub const RAM_ID: &str = "microvm.ram";

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

/// The guest NIC's MAC address: the same in every VM, as each VM has a link of its own (to
/// its own network stack), and a template restored many times must keep its device state.
pub const GUEST_MAC: &str = "02:6d:6f:61:74:02";

/// Descriptor numbers QEMU inherits.
#[derive(Debug, Clone, Copy)]
pub struct QemuFds {
    /// Listening socket for QMP.
    pub qmp: RawFd,
    /// Listening socket for the agent's virtio-serial port.
    pub agent: RawFd,
    /// Connected socket that carries the serial console to the host.
    pub console: RawFd,
    /// Connected stream socket to the sandbox's network stack: the NIC's only link.
    pub net: RawFd,
    /// A memory snapshot to restore.
    pub incoming: Option<RawFd>,
    /// The memfd holding template RAM (see [`GuestRam`]).
    pub ram: Option<RawFd>,
}

/// The `-object` of the RAM backend.
fn ram_backend(spec: &VmSpec, fds: &QemuFds) -> String {
    let size = format!("id={RAM_ID},size={}M", spec.mem_mib);
    let file = |fd: Option<RawFd>| format!("mem-path=/proc/self/fd/{}", fd.unwrap_or(-1));
    match &spec.ram {
        GuestRam::Private => format!("memory-backend-ram,{size}"),
        GuestRam::TemplateSource(_) => {
            format!("memory-backend-file,{size},{},share=on", file(fds.ram))
        }
        GuestRam::TemplateClone { readonly, .. } => format!(
            "memory-backend-file,{size},{},share=off{}",
            file(fds.ram),
            if *readonly {
                ",readonly=on,rom=off"
            } else {
                ""
            }
        ),
    }
}

/// Whether QEMU may use transparent huge pages. Not a template's clone under TCG: QEMU asks
/// for huge pages on every RAM block, and one of microvm's small ROM blocks then holds a whole
/// 2 MiB page, 2 of an idle clone's ~47 MiB of private memory; turning them off cost neither
/// restore nor the first exec (after a restore or a pause) anything measurable
/// (docs/SNAPSHOTS.md, "What an idle clone holds"). A clone's guest RAM is a private mapping
/// of the template's memfd, whose pages are small anyway. Under KVM, and for guests whose RAM is
/// anonymous (boots, full-image restores), huge pages back guest memory and stay on.
pub fn huge_pages(spec: &VmSpec) -> bool {
    !(spec.accel.accel == crate::Accel::Tcg && matches!(spec.ram, GuestRam::TemplateClone { .. }))
}

/// The full QEMU argument list (without the binary).
pub fn qemu_args(spec: &VmSpec, fds: &QemuFds) -> Vec<String> {
    argv(spec, fds, kernel_cmdline())
}

/// [`qemu_args`] with the kernel command line given, so that it depends on nothing else.
fn argv(spec: &VmSpec, fds: &QemuFds, cmdline: String) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-M".into(),
        format!("microvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend={RAM_ID}"),
        "-object".into(),
        ram_backend(spec, fds),
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
    ]);
    // Only a boot reads the kernel, initramfs and command line (through fw_cfg, which the
    // migration stream does not carry). QEMU keeps a copy of each for the VM's whole life,
    // ~15 MiB of private memory per sandbox; a restored guest never reboots (`-no-reboot`,
    // `panic=-1`), so restores go without.
    if fds.incoming.is_none() {
        a.extend([
            "-kernel".into(),
            spec.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            spec.initramfs.to_string_lossy().into_owned(),
            "-append".into(),
            cmdline,
        ]);
    }
    a.extend([
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
        // The NIC's frames go only to the sandbox's own network stack (crates/net), which
        // decides every flow; QEMU never opens a host network device.
        "-netdev".into(),
        format!("stream,id=net0,addr.type=fd,addr.str={}", fds.net),
        "-device".into(),
        format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}"),
    ]);
    // The image itself (inherited descriptor `fds.incoming`) is named over QMP once the
    // migration capabilities are set: see `Vm::start_restore`.
    if fds.incoming.is_some() {
        a.push("-incoming".into());
        a.push("defer".into());
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

    /// How the VM of a case starts.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Start {
        /// A sandbox's cold boot.
        Boot,
        /// A template's cold boot, its RAM in a memfd mapped shared.
        Template,
        /// A restore of a full memory image (a snapshot or a suspended sandbox).
        Restore,
        /// A restore from a template, its RAM the template's sealed memfd mapped privately.
        Clone,
        /// [`Start::Clone`] on QEMU ≥ 8.2.
        CloneReadonly,
    }

    const STARTS: [Start; 5] = [
        Start::Boot,
        Start::Template,
        Start::Restore,
        Start::Clone,
        Start::CloneReadonly,
    ];

    /// A sealed template RAM of one page (only its descriptor number matters here).
    fn shared_ram() -> std::sync::Arc<crate::ram::SharedRam> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(crate::ram::RAM_FILE);
        std::fs::write(&file, [1u8; 4096]).unwrap();
        std::sync::Arc::new(crate::ram::load_sealed(&file, "test").unwrap())
    }

    /// The argument list of [`spec`]'s VM: the network link on descriptor 6, a memory image on
    /// 7, template RAM on 8.
    fn case(accel: Accel, tier: Tier, start: Start, disk: &str) -> Vec<String> {
        let restore = matches!(start, Start::Restore | Start::Clone | Start::CloneReadonly);
        let fds = QemuFds {
            qmp: 3,
            agent: 4,
            console: 5,
            net: 6,
            incoming: restore.then_some(7),
            ram: matches!(start, Start::Template | Start::Clone | Start::CloneReadonly)
                .then_some(8),
        };
        argv(&spec(accel, tier, start, disk), &fds, CMDLINE.to_string())
    }

    /// A VM of `tier` as the runtime builds it (whole vCPUs: the share rounded up; an xs
    /// sandbox's quarter CPU is a cgroup quota around QEMU, not a QEMU argument), started as
    /// `start` says.
    fn spec(accel: Accel, tier: Tier, start: Start, disk: &str) -> VmSpec {
        let restore = matches!(start, Start::Restore | Start::Clone | Start::CloneReadonly);
        let ram = match start {
            Start::Boot | Start::Restore => GuestRam::Private,
            Start::Template => GuestRam::TemplateSource(std::sync::Arc::new(
                std::fs::File::open("/dev/null").unwrap().into(),
            )),
            Start::Clone | Start::CloneReadonly => GuestRam::TemplateClone {
                ram: shared_ram(),
                readonly: start == Start::CloneReadonly,
            },
        };
        VmSpec {
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
            incoming: restore.then(|| crate::qemu::Incoming {
                path: "/home/u/.moat/templates/t1/memory.bin".into(),
                ignore_shared: true,
            }),
            ram,
            detached: false,
            millicores: tier.millicores(),
            jail: crate::jail::JailMode::Off,
        }
    }

    /// Every combination, each with its name and how it starts.
    fn all_cases() -> Vec<(String, Start, Vec<String>)> {
        let mut cases = Vec::new();
        for accel in [Accel::Tcg, Accel::Kvm] {
            for tier in Tier::ALL {
                for start in STARTS {
                    let name = format!("{accel} {tier} {start:?}").to_lowercase();
                    cases.push((name, start, case(accel, tier, start, DISK)));
                }
            }
        }
        cases
    }

    #[test]
    fn argument_lists_match_the_golden_file() {
        let mut got = String::new();
        for (name, _, args) in all_cases() {
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
    /// the disk, the serial bus, the agent port and one virtio NIC as devices, the NIC's only
    /// backend a stream netdev on the inherited socket (no tap, user-mode or other host
    /// network backend), and one qcow2 drive with writeback caching.
    #[test]
    fn every_combination_is_confined() {
        for (name, _, args) in all_cases() {
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
                    "virtserialport,chardev=agent,name=agent",
                    "virtio-net-device,netdev=net0,mac=02:6d:6f:61:74:02",
                ],
                "{name}"
            );
            assert_eq!(
                values("-netdev"),
                ["stream,id=net0,addr.type=fd,addr.str=6"],
                "{name}"
            );
            for a in &args {
                assert!(!["-net", "-nic"].contains(&a.as_str()), "{name}: {a}");
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
        let args = case(Accel::Tcg, Tier::M, Start::Boot, disk);
        let i = args.iter().position(|a| a == "-drive").unwrap();
        assert_eq!(
            args[i + 1],
            "id=root,file=/tmp/x,,file=/etc/shadow,,format=raw,,cache=unsafe/disk.qcow2,\
             format=qcow2,if=none,cache=writeback"
        );
    }

    /// Template RAM is never discarded into: no balloon, free page reporting or virtio-mem
    /// device exists at all (`every_combination_is_confined` pins the device list), and only
    /// the template being built maps it shared; clones map it privately, read-only where QEMU
    /// can. Every other VM's RAM is anonymous. Only boots carry kernel, initramfs and command
    /// line.
    #[test]
    fn template_ram_is_mapped_as_each_start_needs() {
        for (name, start, args) in all_cases() {
            let objects: Vec<&str> = args
                .windows(2)
                .filter(|w| w[0] == "-object")
                .map(|w| w[1].as_str())
                .collect();
            assert_eq!(objects.len(), 1, "{name}");
            let ram = objects[0];
            assert!(ram.contains(&format!("id={RAM_ID},")), "{name}: {ram}");
            let want = match start {
                Start::Boot | Start::Restore => "memory-backend-ram,",
                Start::Template => "memory-backend-file,",
                Start::Clone | Start::CloneReadonly => "memory-backend-file,",
            };
            assert!(ram.starts_with(want), "{name}: {ram}");
            assert_eq!(ram.contains("share=on"), start == Start::Template, "{name}");
            assert_eq!(
                ram.contains("share=off"),
                matches!(start, Start::Clone | Start::CloneReadonly),
                "{name}"
            );
            assert_eq!(
                ram.ends_with(",readonly=on,rom=off"),
                start == Start::CloneReadonly,
                "{name}"
            );
            for a in &args {
                assert!(
                    !a.contains("balloon") && !a.contains("virtio-mem") && !a.contains("postcopy"),
                    "{name}: {a}"
                );
            }
            // Restores leave out the boot payload QEMU would keep a copy of.
            let boots = matches!(start, Start::Boot | Start::Template);
            for opt in ["-kernel", "-initrd", "-append"] {
                assert_eq!(args.iter().any(|a| a == opt), boots, "{name}: {opt}");
            }
        }
    }

    /// Only a template's clone under TCG runs without transparent huge pages.
    #[test]
    fn huge_pages_are_off_only_for_clones_under_tcg() {
        for accel in [Accel::Tcg, Accel::Kvm] {
            for start in STARTS {
                let spec = spec(accel, Tier::M, start, DISK);
                let clone = matches!(start, Start::Clone | Start::CloneReadonly);
                assert_eq!(
                    huge_pages(&spec),
                    !(clone && accel == Accel::Tcg),
                    "{accel} {start:?}"
                );
            }
        }
    }

    #[test]
    fn readonly_rom_from_qemu_8_2() {
        use crate::qemu::has_readonly_rom;
        assert!(!has_readonly_rom(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
        ));
        assert!(!has_readonly_rom("QEMU emulator version 8.1.5"));
        assert!(has_readonly_rom("QEMU emulator version 8.2.0"));
        assert!(has_readonly_rom("QEMU emulator version 10.0.2 (v10.0.2)"));
        assert!(!has_readonly_rom("garbage"));
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
