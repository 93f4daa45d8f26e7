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
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// The guest's disk is full (a file upload).
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Unavailable(String),
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
    Store(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
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
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Error::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Error::InsufficientStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
            Error::Unavailable(_) | Error::NotReady { .. } | Error::Prepare { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            // SQLITE_BUSY/LOCKED are transient: the client may retry.
            Error::Store(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            Error::NewerSchema { .. }
            | Error::Config(_)
            | Error::Store(_)
            | Error::Io { .. }
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
            && status != StatusCode::INSUFFICIENT_STORAGE
        {
            tracing::error!(error = %self, "request failed");
            "internal error; see the moat serve log".to_string()
        } else {
            self.to_string()
        };
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message,
            },
        });
        let retry_after = match &self {
            Error::NotReady { retry_after_s, .. } => Some(*retry_after_s),
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
