//! moat-policy: the governance engine. A group's policy (which commands may run, which kinds
//! of Python are refused, limits on the request) and the analysis that checks a request against
//! it before anything reaches a sandbox. The daemon calls it on every exec, process and shell
//! start; `moat policy check` runs it offline. Analysis is static and says so: docs/POLICY.md
//! lists what it cannot see.

mod check;
mod command;
mod decision;
mod error;
mod javascript;
pub mod log;
mod policy;
mod python;
mod request;
mod shell;
pub mod worker;

pub use check::{check, MAX_CODE_BYTES, MAX_FINDINGS, MAX_NESTING};
pub use decision::{Decision, Finding, Rule};
pub use error::Error;
pub use policy::{CodePolicy, Commands, Family, Limits, Mode, Policy, Tests, MAX_TIMEOUT_S};
pub use request::CheckRequest;
pub use worker::{analysis_failed, check_in_worker, Bounds};
