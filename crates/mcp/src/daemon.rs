//! The MCP server's only way into moat: the daemon's REST API, called with the session's API
//! key. Going through the API (rather than the daemon's internals) means every tool call gets
//! exactly the validation, access checks, roles and error messages of the REST routes.
//!
//! How a request reaches the API is a [`Transport`]: [`HttpTransport`] for `moat mcp` (a
//! daemon at MOAT_URL), and an in-process one in `moat-server` for the daemon's own `/mcp`
//! route, which hands the request to its router without a network hop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Method, Request, StatusCode};
use serde_json::Value;

use crate::error::{Error, Result};

/// A response of the API, its body read up to the request's limit.
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends one request to the daemon's REST API and reads at most `limit` bytes of its answer
/// ([`Error::TooLarge`] past that).
pub trait Transport: Send + Sync + 'static {
    fn send(&self, request: Request<Bytes>, limit: usize) -> BoxFuture<'_, Result<Response>>;
}

/// The REST API over HTTP (`moat mcp`: MOAT_URL).
pub struct HttpTransport {
    base: String,
    http: reqwest::Client,
}

impl HttpTransport {
    pub fn new(base_url: &str) -> HttpTransport {
        HttpTransport {
            base: base_url.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }
}

impl Transport for HttpTransport {
    fn send(&self, request: Request<Bytes>, limit: usize) -> BoxFuture<'_, Result<Response>> {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let url = format!("{}{}", self.base, parts.uri);
            let resp = self
                .http
                .request(parts.method, &url)
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| Error::Unreachable(format!("{}: {e}", self.base)))?;
            let status = resp.status();
            let mut stream = resp.bytes_stream();
            let mut body = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| Error::Unreachable(format!("{}: {e}", self.base)))?;
                if body.len() + chunk.len() > limit {
                    return Err(Error::TooLarge(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Response {
                status,
                body: body.into(),
            })
        })
    }
}

/// The REST API with one API key.
#[derive(Clone)]
pub struct Daemon {
    transport: Arc<dyn Transport>,
    key: String,
}

/// JSON answers are small; file reads set their own limit.
const JSON_LIMIT: usize = 32 * 1024 * 1024;

/// Percent-encodes a query value or path segment (everything but unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Daemon {
    pub fn new(transport: Arc<dyn Transport>, key: String) -> Daemon {
        Daemon { transport, key }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &str,
        limit: usize,
    ) -> Result<Response> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .map_err(|e| Error::BadArgument(format!("invalid request {path}: {e}")))?;
        let resp = self.transport.send(request, limit).await?;
        if resp.status.is_success() {
            return Ok(resp);
        }
        // The API's one error shape; anything else is shown as it came.
        let parsed: Option<Value> = serde_json::from_slice(&resp.body).ok();
        let field = |f: &str| {
            parsed
                .as_ref()
                .and_then(|v| v["error"][f].as_str())
                .map(str::to_string)
        };
        Err(Error::Api {
            status: resp.status.as_u16(),
            code: field("code").unwrap_or_else(|| "unknown".into()),
            message: field("message")
                .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned()),
        })
    }

    /// A JSON request; `Value::Null` for an empty (204) answer.
    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let resp = self
            .send(method, path, bytes, "application/json", JSON_LIMIT)
            .await?;
        if resp.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&resp.body).map_err(|e| {
            Error::Unreachable(format!("the daemon answered {path} with bad JSON: {e}"))
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.json(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.json(Method::DELETE, path, None).await.map(drop)
    }

    /// The bytes of a file in a sandbox, at most `limit`.
    pub async fn read_file(&self, sandbox: &str, path: &str, limit: usize) -> Result<Bytes> {
        let url = format!("{sandbox}/files?path={}", encode(path));
        Ok(self
            .send(Method::GET, &url, Bytes::new(), "application/json", limit)
            .await?
            .body)
    }

    /// Writes a file in a sandbox, creating missing parent directories.
    pub async fn write_file(
        &self,
        sandbox: &str,
        path: &str,
        data: Bytes,
        mode: Option<&str>,
    ) -> Result<Value> {
        let mut url = format!("{sandbox}/files?path={}&parents=true", encode(path));
        if let Some(m) = mode {
            url.push_str(&format!("&mode={}", encode(m)));
        }
        let resp = self
            .send(
                Method::PUT,
                &url,
                data,
                "application/octet-stream",
                JSON_LIMIT,
            )
            .await?;
        serde_json::from_slice(&resp.body).map_err(|e| {
            Error::Unreachable(format!("the daemon answered an upload with bad JSON: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn encode_keeps_slashes_and_escapes_the_rest() {
        assert_eq!(encode("/root/a b&c=d"), "/root/a%20b%26c%3Dd");
        assert_eq!(encode("/tmp/ü"), "/tmp/%C3%BC");
    }
}
