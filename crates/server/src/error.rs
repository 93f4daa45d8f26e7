//! The one error type of moat-server, and the one place where errors become HTTP statuses.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::{ErrorBody, ErrorDetail};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// The group's policy refused the request (docs/POLICY.md): a 403 whose body also carries
    /// the findings and the policy's version.
    #[error("{message}")]
    PolicyDenied {
        message: String,
        findings: Vec<moat_policy::Finding>,
        policy_version: u64,
    },
    /// Well-formed by the OpenAPI document, but refused by a rule the document cannot state
    /// (one field excludes another, an egress rule that can never match, a policy whose
    /// rules do not compile): a 422 whose message names the rule.
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    /// The sandbox's row went away under a lifecycle change (a delete won the race).
    #[error("sandbox {0} was deleted")]
    SandboxGone(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// An API key over its rate limit: a 429 with `Retry-After`.
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    /// The guest's disk is full (a file upload).
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Unavailable(String),
    /// The sandbox runs on another node of the fleet, which alone may act on it: a 421 whose
    /// message names that node and its advertised URL. Only for a request that was already
    /// forwarded once (http/forward.rs): it is never forwarded twice.
    #[error("{0}")]
    OtherNode(String),
    /// A sandbox's port could not be reached (nothing listens, no answer, its network is not
    /// running): the message says which.
    #[error("{0}")]
    BadGateway(String),
    /// Sandboxes are being prepared, or their preparation failed and is retried: a 503 with
    /// `Retry-After`.
    #[error("{message}")]
    NotReady { message: String, retry_after_s: u64 },
    /// Preparing MOAT_HOME (`moat setup`, or a daemon's first start) failed at `step`.
    #[error("{}: {message}", .step.describe())]
    Prepare {
        step: crate::prepare::Step,
        message: String,
    },
    #[error(
        "the database {path} has schema version {found}, but this moat knows only up to \
         version {known}: it was written by a newer moat; run that version or use another \
         MOAT_HOME"
    )]
    NewerSchema {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::db::DbError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A moat_vm call failed while the daemon was doing `context` ("starting the sandbox").
    #[error("{context}: {source}")]
    Vm {
        context: String,
        #[source]
        source: moat_vm::Error,
    },
    /// An image store call failed; `context` (what the daemon was doing) is kept for the log.
    #[error("{source}")]
    Image {
        context: String,
        #[source]
        source: moat_image::Error,
    },
    /// A task the daemon spawned failed (it panicked, or the runtime is shutting down).
    #[error("{what}: {source}")]
    Task {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<moat_vm::Error> for Error {
    fn from(source: moat_vm::Error) -> Error {
        Error::Vm {
            context: "the sandbox's VM".to_string(),
            source,
        }
    }
}

impl From<moat_image::Error> for Error {
    fn from(source: moat_image::Error) -> Error {
        Error::Image {
            context: String::new(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `.map_err(Error::vm("taking the snapshot"))`: a moat_vm error with what the daemon was
    /// doing.
    pub(crate) fn vm(context: &str) -> impl FnOnce(moat_vm::Error) -> Error + '_ {
        move |source| Error::Vm {
            context: context.to_string(),
            source,
        }
    }

    /// `.map_err(Error::image("removing image x"))`: a moat_image error with what the daemon
    /// was doing (for the log; the client sees the error itself).
    pub(crate) fn image(context: impl Into<String>) -> impl FnOnce(moat_image::Error) -> Error {
        let context = context.into();
        move |source| Error::Image { context, source }
    }

    /// `.map_err(Error::task("the create task failed"))` on the join of a spawned task.
    pub(crate) fn task(what: &str) -> impl FnOnce(tokio::task::JoinError) -> Error + '_ {
        move |source| Error::Task {
            what: what.to_string(),
            source,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The HTTP status and the stable machine-readable code of every error. The only mapping.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::PolicyDenied { .. } => (StatusCode::FORBIDDEN, "policy_denied"),
            Error::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Error::Conflict(_) | Error::SandboxGone(_) => (StatusCode::CONFLICT, "conflict"),
            Error::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Error::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Error::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Error::InsufficientStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
            Error::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            Error::OtherNode(_) => (StatusCode::MISDIRECTED_REQUEST, "other_node"),
            Error::Unavailable(_) | Error::NotReady { .. } | Error::Prepare { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            // What the guest refused is the caller's to fix; the rest of the VM's failures are
            // ours (details in the log).
            Error::Vm {
                source: moat_vm::Error::Guest { .. },
                ..
            } => (StatusCode::BAD_REQUEST, "bad_request"),
            // An agent that did not answer or broke the protocol: the daemon is fine, the
            // sandbox's `health` says what it does about it.
            e if crate::sandboxes::is_agent_failure(e) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            Error::Image { source, .. } => match source {
                moat_image::Error::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
                moat_image::Error::InUse { .. } => (StatusCode::CONFLICT, "conflict"),
                moat_image::Error::InvalidName { .. }
                | moat_image::Error::InvalidReference { .. } => {
                    (StatusCode::BAD_REQUEST, "bad_request")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            // A busy SQLite, an unreachable PostgreSQL (restarting, failing over), a
            // transaction that kept conflicting: the client may retry.
            Error::Store(e) if e.is_transient() => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::NewerSchema { .. }
            | Error::Config(_)
            | Error::Store(_)
            | Error::Io { .. }
            | Error::Vm { .. }
            | Error::Task { .. }
            | Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // Internal details go to the log, not to a client that may not be trusted with them.
        let message = if status.is_server_error()
            && status != StatusCode::SERVICE_UNAVAILABLE
            && status != StatusCode::BAD_GATEWAY
            && status != StatusCode::INSUFFICIENT_STORAGE
        {
            match &self {
                Error::Image { context, source } => {
                    tracing::error!(error = %source, context, "request failed")
                }
                e => tracing::error!(error = %e, "request failed"),
            }
            "internal error; see the moat serve log".to_string()
        } else {
            self.to_string()
        };
        let mut detail = ErrorDetail::new(code, message);
        if let Error::PolicyDenied {
            findings,
            policy_version,
            ..
        } = self
        {
            detail.findings = Some(findings);
            detail.policy_version = Some(policy_version);
            return (status, Json(ErrorBody { error: detail })).into_response();
        }
        let body = Json(ErrorBody { error: detail });
        let retry_after = match &self {
            Error::NotReady { retry_after_s, .. } | Error::RateLimited { retry_after_s, .. } => {
                Some(*retry_after_s)
            }
            _ => None,
        };
        let mut resp = (status, body).into_response();
        if let Some(s) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_errors_map_to_statuses_here() {
        let guest = moat_vm::Error::Guest {
            kind: moat_protocol::ErrorKind::InvalidInput,
            message: "no such user".to_string(),
        };
        let e = Error::vm("exec")(guest);
        assert_eq!(e.status_and_code().0, StatusCode::BAD_REQUEST);
        assert_eq!(e.to_string(), "exec: no such user");
        let e = Error::from(moat_vm::Error::AgentGone);
        assert_eq!(e.status_and_code().0, StatusCode::BAD_GATEWAY);
        let e = Error::vm("exec")(moat_vm::Error::AgentTimeout(
            std::time::Duration::from_secs(30),
        ));
        assert_eq!(
            e.status_and_code(),
            (StatusCode::BAD_GATEWAY, "bad_gateway")
        );
        let e = Error::vm("exec")(moat_vm::Error::QmpProtocol("x".to_string()));
        assert_eq!(e.status_and_code().0, StatusCode::INTERNAL_SERVER_ERROR);

        let in_use = moat_image::Error::InUse {
            image: "base".to_string(),
            why: "a disk uses it".to_string(),
        };
        let shown = in_use.to_string();
        let e = Error::image("removing image base")(in_use);
        assert_eq!(e.status_and_code(), (StatusCode::CONFLICT, "conflict"));
        assert_eq!(
            e.to_string(),
            shown,
            "the client sees the image error itself"
        );
        let e = Error::from(moat_image::Error::NotFound {
            what: "image x".to_string(),
        });
        assert_eq!(e.status_and_code().0, StatusCode::NOT_FOUND);
        let e = Error::from(moat_image::Error::InvalidImage("bad".to_string()));
        assert_eq!(e.status_and_code().0, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
