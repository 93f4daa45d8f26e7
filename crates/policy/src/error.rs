//! The one error type of moat-policy: what is wrong with a policy or a request given to it.
//! Findings are not errors; they are the normal output of a check (see `decision`).

/// A policy or a request that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not a policy object (bad JSON/YAML, an unknown field, a wrong value).
    #[error("the policy is not valid JSON/YAML for a policy object: {0}")]
    PolicySyntax(String),
    /// The policy parses, but some values are not acceptable.
    #[error("the policy is not valid:\n  {}", .0.join("\n  "))]
    InvalidPolicy(Vec<String>),
    /// The policy contradicts examples in its own `tests`.
    #[error("the policy contradicts its own tests:\n  {}", .0.join("\n  "))]
    ExamplesFail(Vec<String>),
    /// A request to check is malformed.
    #[error("the request is not valid: {0}")]
    InvalidRequest(String),
    /// The analysis worker could not be started or talked to.
    #[error("the policy analysis worker failed: {0}")]
    Worker(String),
}
