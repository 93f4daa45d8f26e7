//! moat's microVM runtime: accelerator detection, guest kernel/initramfs assets, a QMP client,
//! QEMU `microvm` processes with memory snapshots, copy-on-write disks and CPU quotas; on top of
//! them sandboxes (a VM plus a session with its agent), snapshots and templates, whose RAM every
//! restore shares copy-on-write (`ram`).
//!
//! The two largest parts are directories split by concern: `qemu/` (the `Vm` handle, the pure
//! argument builder, spawning, pidfds, `/proc`) and `agent/` (the session, then `exec`, `files`
//! and `procs`, named like the guest agent's files and the daemon's routes).
//!
//! Everything here runs real QEMU; only the QMP protocol and agent session tests use a fake peer.

pub mod accel;
pub mod agent;
pub mod assets;
pub mod cgroup;
pub mod cpio;
pub mod disk;
mod error;
pub mod jail;
pub mod netstack;
pub mod qemu;
pub mod qmp;
pub mod ram;
mod ramdiff;
mod sandbox;
pub mod snapshot;
pub mod template;
mod tier;
mod util;

pub use accel::{Accel, AccelChoice};
pub use assets::{Initramfs, Kernel};
pub use error::{Error, Result};
pub use qemu::{GuestRam, Incoming, Vm, VmSpec};
pub use qemu::{MigrateParams, MigrationStats, MigrationStreams};
pub use qmp::Qmp;
pub use sandbox::{Arrived, Departed, MigrationManifest, Stayed};
pub use sandbox::{LaunchOptions, SandboxRecord, StartPhases};
pub use sandbox::{Runtime, Sandbox};
pub use snapshot::BaseDisk;
pub use snapshot::SnapshotMeta;
pub use tier::Tier;
