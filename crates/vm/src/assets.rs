//! Guest assets: the kernel (Debian's cloud kernel, booted as a bzImage) and the initramfs
//! that carries our agent as `/init` plus the virtio modules the kernel has as `=m`.
//!
//! Layout under the moat home:
//! ```text
//! kernels/<version>/vmlinuz-<version>
//! kernels/<version>/modules/<name>.ko
//! initramfs/<sha256>.img
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cpio::Cpio;
use crate::error::IoContext;
use crate::util::{fsync_dir, run, write_atomic};
use crate::{Error, Result};

/// The Debian meta package whose dependency names the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest needs, in load order (each depends only on earlier ones). The Debian
/// package ships no `modules.dep`, so the order is fixed here.
pub const INITRAMFS_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    // eth0, served by the sandbox's own network stack (crates/net).
    "failover",
    "net_failover",
    "virtio_net",
];

/// Modules kept in the kernel directory for later use (erofs root, overlay root, balloon) but
/// not put into the initramfs yet. Missing ones are skipped.
const OPTIONAL_MODULES: &[&str] = &["libcrc32c", "erofs", "overlay", "virtio_balloon"];

/// Bumped whenever the initramfs layout changes, so old cached images are not reused.
const INITRAMFS_LAYOUT: &str = "moat-initramfs-v1";

/// An installed guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`; part of every snapshot's cache key.
    pub version: String,
    /// The bzImage given to `-kernel`.
    pub vmlinuz: PathBuf,
    /// Directory holding `<name>.ko` for the modules we use.
    pub modules_dir: PathBuf,
}

impl Kernel {
    /// Path of module `name` (e.g. `virtio_blk`).
    pub fn module(&self, name: &str) -> PathBuf {
        self.modules_dir.join(format!("{name}.ko"))
    }

    fn at(dir: &Path, version: &str) -> Kernel {
        Kernel {
            version: version.to_string(),
            vmlinuz: dir.join(format!("vmlinuz-{version}")),
            modules_dir: dir.join("modules"),
        }
    }

    fn is_complete(&self) -> bool {
        self.vmlinuz.is_file() && INITRAMFS_MODULES.iter().all(|m| self.module(m).is_file())
    }
}

/// A built initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initramfs {
    /// The gzip'd newc archive given to `-initrd`.
    pub path: PathBuf,
    /// Hex sha256 of its inputs (agent bytes, kernel version, module list): its cache key.
    pub sha256: String,
}

/// Downloads and installs the kernel that `linux-image-cloud-amd64` currently depends on.
/// Idempotent: nothing is downloaded when that version is already installed. The kernel
/// directory appears atomically (built under a temp name, then renamed).
pub fn install_kernel(home: &Path) -> Result<Kernel> {
    let package = resolve_kernel_package()?;
    let version = package
        .strip_prefix("linux-image-")
        .ok_or_else(|| Error::KernelContent {
            version: package.clone(),
            what: format!("unexpected package name {package:?} from `apt-cache depends`"),
        })?
        .to_string();
    let kernels = home.join("kernels");
    let dest = kernels.join(&version);
    let kernel = Kernel::at(&dest, &version);
    if kernel.is_complete() {
        tracing::debug!(%version, "guest kernel already installed");
        return Ok(kernel);
    }
    std::fs::create_dir_all(&kernels).ctx(|| format!("creating {}", kernels.display()))?;
    let tmp = kernels.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let res = stage_kernel(&package, &version, &tmp);
    let res = res.and_then(|()| {
        if dest.exists() {
            // An incomplete leftover (or a concurrent install that lost the race): replace it.
            if Kernel::at(&dest, &version).is_complete() {
                return Ok(());
            }
            std::fs::remove_dir_all(&dest).ctx(|| format!("removing {}", dest.display()))?;
        }
        match std::fs::rename(tmp.join("stage"), &dest) {
            Ok(()) => fsync_dir(&kernels),
            // Someone else installed it in the meantime.
            Err(_) if Kernel::at(&dest, &version).is_complete() => Ok(()),
            Err(e) => Err(Error::io(format!("renaming into {}", dest.display()), e)),
        }
    });
    let _ = std::fs::remove_dir_all(&tmp);
    res?;
    tracing::info!(%version, path = %dest.display(), "guest kernel installed");
    Ok(kernel)
}

/// The installed kernel (the newest, if several are), without touching the network.
pub fn installed_kernel(home: &Path) -> Result<Kernel> {
    let kernels = home.join("kernels");
    let mut found: Vec<Kernel> = std::fs::read_dir(&kernels)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (!name.starts_with('.')).then(|| Kernel::at(&e.path(), &name))
                })
                .filter(Kernel::is_complete)
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|k| version_key(&k.version));
    found.pop().ok_or(Error::NoKernel(kernels))
}

/// Numeric-aware sort key: `6.1.0-56` sorts after `6.1.0-9`.
fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(['.', '-'])
        .map(|p| (p.parse().unwrap_or(0), p.to_string()))
        .collect()
}

fn resolve_kernel_package() -> Result<String> {
    let out = run(
        Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
        "apt-cache",
        "apt",
    )?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| Error::KernelContent {
            version: KERNEL_META_PACKAGE.into(),
            what: format!(
                "`apt-cache depends {KERNEL_META_PACKAGE}` names no linux-image package; \
                 run `apt-get update` and check the apt sources"
            ),
        })
}

/// Downloads and unpacks the package in `tmp`, then builds `tmp/stage` = the final directory.
fn stage_kernel(package: &str, version: &str, tmp: &Path) -> Result<()> {
    let dl = tmp.join("download");
    let unpacked = tmp.join("unpacked");
    let stage = tmp.join("stage");
    for d in [&dl, &unpacked, &stage.join("modules")] {
        std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
    }
    tracing::info!(%package, "downloading guest kernel");
    run(
        Command::new("apt-get")
            // We run as root in a private temp dir; apt's `_apt` sandbox user could not write there.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
            .current_dir(&dl),
        "apt-get",
        "apt",
    )?;
    let deb = std::fs::read_dir(&dl)
        .ctx(|| format!("listing {}", dl.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| Error::KernelContent {
            version: version.into(),
            what: format!("`apt-get download {package}` produced no .deb"),
        })?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        "dpkg-deb",
        "dpkg",
    )?;

    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{version}"));
    let dst = stage.join(format!("vmlinuz-{version}"));
    std::fs::copy(&vmlinuz, &dst).map_err(|e| Error::KernelContent {
        version: version.into(),
        what: format!("cannot copy {}: {e}", vmlinuz.display()),
    })?;
    sync_file(&dst)?;

    let mod_root = ["lib", "usr/lib"]
        .iter()
        .map(|p| unpacked.join(p).join("modules").join(version))
        .find(|p| p.is_dir())
        .ok_or_else(|| Error::KernelContent {
            version: version.into(),
            what: "the package has no lib/modules directory".into(),
        })?;
    let mut all = Vec::new();
    walk(&mod_root, &mut all)?;
    for (name, required) in INITRAMFS_MODULES
        .iter()
        .map(|m| (m, true))
        .chain(OPTIONAL_MODULES.iter().map(|m| (m, false)))
    {
        let file = format!("{name}.ko");
        match all
            .iter()
            .find(|p| p.file_name().is_some_and(|f| f == file.as_str()))
        {
            Some(src) => {
                let dst = stage.join("modules").join(&file);
                std::fs::copy(src, &dst).ctx(|| format!("copying {}", src.display()))?;
                sync_file(&dst)?;
            }
            None if required => {
                let compressed = all.iter().any(|p| {
                    p.file_name()
                        .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{file}.")))
                });
                return Err(Error::KernelContent {
                    version: version.into(),
                    what: if compressed {
                        format!("module {name} is compressed; moat needs uncompressed .ko files")
                    } else {
                        format!("module {name} is missing from the package")
                    },
                });
            }
            None => tracing::debug!(module = name, "optional module not in kernel package"),
        }
    }
    fsync_dir(&stage.join("modules"))?;
    fsync_dir(&stage)
}

fn sync_file(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("syncing {}", p.display()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
        let e = e.ctx(|| format!("listing {}", dir.display()))?;
        let ft = e
            .file_type()
            .ctx(|| format!("stat {}", e.path().display()))?;
        if ft.is_dir() {
            walk(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

/// The initramfs skeleton every guest boots from: `/dev` (with `/dev/console`), `/proc`,
/// `/sys`, `/newroot` and `/modules/NN-<name>.ko` in load order. The caller adds `/init`.
/// Public so tests and tools can build variants (e.g. a busybox `/init`).
pub fn base_cpio(kernel: &Kernel) -> Result<Cpio> {
    let mut c = Cpio::new();
    for d in ["/dev", "/proc", "/sys", "/newroot", "/modules"] {
        c.dir(d, 0o755);
    }
    // The kernel opens /dev/console for PID 1's stdio before anything mounts devtmpfs.
    c.char_dev("/dev/console", 0o600, 5, 1);
    for (i, name) in INITRAMFS_MODULES.iter().enumerate() {
        let p = kernel.module(name);
        let data = std::fs::read(&p).ctx(|| {
            format!(
                "reading {} (reinstall the kernel with `moat setup`)",
                p.display()
            )
        })?;
        c.file(&format!("/modules/{i:02}-{name}.ko"), 0o644, &data);
    }
    Ok(c)
}

/// Builds (or reuses) the initramfs with `agent_bin` as `/init`. Cached by sha256 of the
/// agent bytes, kernel version and module list under `home/initramfs/<hex>.img`.
pub fn build_initramfs(kernel: &Kernel, agent_bin: &Path, home: &Path) -> Result<Initramfs> {
    let agent =
        std::fs::read(agent_bin).ctx(|| format!("reading agent {}", agent_bin.display()))?;
    check_static_elf(&agent).map_err(|reason| Error::BadAgent {
        path: agent_bin.to_path_buf(),
        reason,
    })?;
    let mut h = Sha256::new();
    h.update(INITRAMFS_LAYOUT.as_bytes());
    h.update([0]);
    h.update(&agent);
    h.update([0]);
    h.update(kernel.version.as_bytes());
    for m in INITRAMFS_MODULES {
        h.update([0]);
        h.update(m.as_bytes());
    }
    let sha256 = hex::encode(h.finalize());
    let path = home.join("initramfs").join(format!("{sha256}.img"));
    if !path.is_file() {
        let mut c = base_cpio(kernel)?;
        c.file("/init", 0o755, &agent);
        write_atomic(&path, &c.finish_gz()?)?;
        tracing::info!(path = %path.display(), "initramfs built");
    }
    Ok(Initramfs { path, sha256 })
}

/// Accepts only an x86-64 ELF executable without a `PT_INTERP` header: PID 1 in an
/// initramfs has no dynamic loader or libc to load.
pub fn check_static_elf(b: &[u8]) -> std::result::Result<(), String> {
    const PT_INTERP: u32 = 3;
    let rd16 = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let rd32 = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let rd64 = |o: usize| {
        b.get(o..o + 8).map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
    };
    if b.get(..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF executable".into());
    }
    if rd16(18) != Some(62) {
        return Err("not an x86-64 executable".into());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd64(32), rd16(54), rd16(56)) else {
        return Err("truncated ELF header".into());
    };
    for i in 0..usize::from(phnum) {
        let off = usize::try_from(phoff)
            .unwrap_or(usize::MAX)
            .saturating_add(i * usize::from(phentsize));
        match rd32(off) {
            Some(PT_INTERP) => {
                return Err("it is dynamically linked (has a PT_INTERP program header), but the \
                     guest has no libc: build it static with `RUSTFLAGS=\"-C target-feature=+crt-static\" \
                     cargo build --release -p moat-agent --target x86_64-unknown-linux-gnu`"
                    .into())
            }
            Some(_) => {}
            None => return Err("truncated ELF program headers".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_checks() {
        assert!(check_static_elf(b"#!/bin/sh\n")
            .unwrap_err()
            .contains("ELF"));
        // busybox-static, which scripts/install-deps.sh installs.
        let b =
            std::fs::read("/bin/busybox").expect("/bin/busybox (Debian package busybox-static)");
        check_static_elf(&b).unwrap();
        let dynamic = std::fs::read("/bin/true").unwrap();
        let e = check_static_elf(&dynamic).unwrap_err();
        assert!(e.contains("PT_INTERP") && e.contains("crt-static"), "{e}");
    }

    #[test]
    fn version_sorting() {
        let mut v = [
            "6.1.0-9-cloud-amd64",
            "6.1.0-56-cloud-amd64",
            "6.1.0-10-cloud-amd64",
        ];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(v[2], "6.1.0-56-cloud-amd64");
    }

    #[test]
    fn missing_kernel_says_run_setup() {
        let d = tempfile::tempdir().unwrap();
        let e = installed_kernel(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("no guest kernel") && e.contains("moat setup"),
            "{e}"
        );
    }
}
