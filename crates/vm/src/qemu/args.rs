//! QEMU's argument list, built from a [`VmSpec`] and the descriptor numbers QEMU inherits, and
//! the guest kernel's command line. Pure apart from reading the host's TSC frequency, so the
//! security-relevant strings (`-sandbox`, `-nodefaults`, no NIC, the `-drive` options) are
//! pinned by a golden test below.

use std::os::fd::RawFd;
use std::path::Path;

use super::procfs::host_tsc_khz;
use super::VmSpec;

/// The kernel command line.
pub fn kernel_cmdline() -> String {
    let mut s = String::from("console=ttyS0 quiet panic=-1 init_on_free=1");
    match host_tsc_khz() {
        Some(khz) => s.push_str(&format!(" tsc_early_khz={khz}")),
        None => tracing::warn!("no \"cpu MHz\" in /proc/cpuinfo: booting without tsc_early_khz"),
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
        kernel_cmdline(),
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
