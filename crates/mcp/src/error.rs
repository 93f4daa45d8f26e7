//! The one error type of the MCP server. Tool calls turn these into tool results with
//! `isError: true` and the message, so the model reads what went wrong and what is allowed.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon refused the request: its status, code and message, as the REST API says them.
    #[error("{message} (HTTP {status} {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The daemon could not be reached or answered something that is not the API.
    #[error("the moat daemon cannot be reached: {0}")]
    Unreachable(String),
    /// An answer larger than the tool returns.
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    /// A tool argument that is not valid; the message says what is allowed.
    #[error("{0}")]
    BadArgument(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
