//! The one error type of `moat-vm`. Every message says what went wrong and, where there is
//! one, how to fix it, because these errors end up in front of operators via the CLI.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while preparing, running or snapshotting a microVM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host tool is missing.
    #[error("{tool} not found: install it with `apt-get install {package}`")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },

    /// A host command ran but failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    /// An I/O operation on a named path or object failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The accelerator override was neither `kvm` nor `tcg`.
    #[error("unknown accelerator {0:?}: use `kvm` or `tcg` (or leave it unset to auto-detect)")]
    InvalidAccel(String),

    /// No guest kernel has been installed under the moat home.
    #[error("no guest kernel in {}: run `moat setup`", .0.display())]
    NoKernel(PathBuf),

    /// The kernel package did not contain something we need.
    #[error("guest kernel {version}: {what}")]
    KernelContent { version: String, what: String },

    /// The agent binary cannot be PID 1 of the guest.
    #[error("agent binary {}: {reason}", path.display())]
    BadAgent { path: PathBuf, reason: String },

    /// QMP talked nonsense or the connection broke.
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),

    /// QEMU closed the QMP connection (it exited or crashed).
    #[error("QMP connection closed by QEMU (did it exit? see its console/stderr log)")]
    QmpClosed,

    /// QEMU answered a command with an error.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },

    /// A migration (memory snapshot save or restore) failed.
    #[error("migration {what} failed: {desc}")]
    Migration { what: &'static str, desc: String },

    /// QEMU exited while we were waiting for something.
    #[error("QEMU exited ({status}) while {what}; console tail:\n{console_tail}\nQEMU stderr:\n{stderr_tail}")]
    VmExited {
        what: String,
        status: String,
        console_tail: String,
        stderr_tail: String,
    },

    /// A channel to the guest closed while QEMU kept running.
    #[error("the channel to the guest closed while {what}, but QEMU is still running; console tail:\n{console_tail}")]
    ChannelClosed { what: String, console_tail: String },

    /// Something took longer than allowed.
    #[error("timed out after {secs:.1}s while {what}; console tail:\n{console_tail}")]
    Timeout {
        what: String,
        secs: f64,
        console_tail: String,
    },

    /// The guest agent broke the protocol or could not be reached.
    #[error("guest agent: {0}")]
    Agent(String),

    /// The guest agent did not complete the handshake in time.
    #[error("the guest agent did not answer within {0:?}")]
    AgentTimeout(std::time::Duration),

    /// The session with the guest agent ended (the VM stopped, or the guest broke the framing).
    #[error("the connection to the guest agent is gone")]
    AgentGone,

    /// A request failed inside the guest; `kind` says how.
    #[error("{message}")]
    Guest {
        kind: moat_protocol::ErrorKind,
        message: String,
    },

    /// A snapshot directory cannot be used.
    #[error("snapshot: {0}")]
    Snapshot(String),

    /// An argument is not acceptable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A VM or sandbox left by an earlier moat cannot be taken over.
    /// The jail around QEMU cannot be set up: the host lacks a feature (named in the
    /// message) or a step of entering it failed.
    #[error("jail: {0} (MOAT_NO_JAIL=1 runs VMs unjailed, for development only)")]
    Jail(String),

    #[error("cannot adopt {0}")]
    Adopt(String),
}

impl Error {
    /// Wraps an `io::Error` with what we were doing.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attach a context to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

impl From<moat_protocol::Error> for Error {
    fn from(e: moat_protocol::Error) -> Error {
        match e {
            moat_protocol::Error::Closed => Error::AgentGone,
            other => Error::Agent(other.to_string()),
        }
    }
}
