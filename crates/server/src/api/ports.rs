//! Exposed ports: the request, the port as returned, and the checks on port numbers.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::rfc3339;
use crate::error::{Error, Result};

/// The most ports one sandbox may expose at a time.
pub const MAX_EXPOSED_PORTS: usize = 64;

/// `POST …/sandboxes/{id}/ports`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExposePort {
    /// A TCP port in the guest, 1–65535.
    #[schema(example = 8080, minimum = 1, maximum = 65535)]
    pub port: u16,
}

/// A port of a sandbox reachable through the daemon: HTTP and WebSocket requests under `url`
/// are proxied to it, with the same API key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub port: u16,
    /// The proxy's path on this daemon, `/v1/sandbox-groups/{group}/sandboxes/{id}/ports/{port}/`
    /// (append it to the daemon's address); a request to `url` + `a/b?q` reaches the guest as
    /// `/a/b?q`.
    #[schema(example = "/v1/sandbox-groups/dev/sandboxes/sb-0123456789ab/ports/8080/")]
    pub url: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortList {
    pub ports: Vec<Port>,
}

/// A port as the store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExposedPort {
    pub port: u16,
    /// Unix seconds.
    pub created_at: i64,
}

impl ExposedPort {
    pub fn to_port(self, group: &str, sandbox: &str) -> Port {
        Port {
            port: self.port,
            url: port_url(group, sandbox, self.port),
            created_at: rfc3339(self.created_at),
        }
    }
}

/// The proxy's path for `port` of a sandbox.
pub fn port_url(group: &str, sandbox: &str, port: u16) -> String {
    format!("/v1/sandbox-groups/{group}/sandboxes/{sandbox}/ports/{port}/")
}

/// A guest port from a request body: 1–65535.
pub fn validate_port(port: u16) -> Result<u16> {
    if port == 0 {
        return Err(Error::BadRequest(
            "invalid port 0: a guest TCP port is 1-65535".to_string(),
        ));
    }
    Ok(port)
}

/// A guest port from a path segment: digits only, 1–65535.
pub fn parse_port(s: &str) -> Result<u16> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(Error::BadRequest(format!(
            "invalid port {}: a guest TCP port is a number from 1 to 65535",
            super::quote(s)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(parse_port("8080").unwrap(), 8080);
        assert_eq!(parse_port("65535").unwrap(), 65535);
        for bad in ["0", "65536", "-1", "+80", "8080a", "", "0x50"] {
            let e = parse_port(bad).unwrap_err().to_string();
            assert!(e.contains("1 to 65535"), "{bad}: {e}");
        }
        assert!(validate_port(0).is_err());
        assert_eq!(validate_port(1).unwrap(), 1);
        let e = serde_json::from_str::<ExposePort>(r#"{"port": 70000}"#).unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
        assert!(serde_json::from_str::<ExposePort>(r#"{"port": 80, "host": "x"}"#).is_err());
    }

    #[test]
    fn the_url_is_the_proxy_path() {
        let p = ExposedPort {
            port: 8080,
            created_at: 0,
        }
        .to_port("dev", "sb-1");
        assert_eq!(p.url, "/v1/sandbox-groups/dev/sandboxes/sb-1/ports/8080/");
        assert_eq!(p.created_at, "1970-01-01T00:00:00Z");
    }
}
