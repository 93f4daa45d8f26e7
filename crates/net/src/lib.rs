//! moat-net: one sandbox's userspace network stack. It runs as a process of its own per
//! sandbox (it parses hostile frames; a crash must cost one sandbox its network, never the
//! daemon), speaks QEMU's stream-netdev framing on one socket, terminates every guest flow in
//! smoltcp and opens a host connection only when the group's egress policy allows it.
//! docs/NETWORK.md describes the packet path and the policy semantics.

pub mod audit;
pub mod control;
mod device;
pub mod dns;
pub mod floor;
pub mod hosts;
pub mod ingress;
pub mod intercept;
pub mod metadata;
pub mod peek;
pub mod policy;
pub mod stack;
pub mod transform;

pub use control::run;
pub use floor::Floor;
pub use hosts::HostsFile;
pub use policy::{Action, Decision, EgressRule, EgressSpec, Policy, Protocol};
pub use transform::{Secret, Transform};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy (or other setting) that does not validate; `field` is its JSON path.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{path}:{line}: {message}")]
    HostsFile {
        path: String,
        line: usize,
        message: String,
    },
    /// The network stack refused a request or broke the control protocol.
    #[error("network stack: {0}")]
    Control(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
