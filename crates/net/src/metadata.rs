//! The in-guest identity endpoint (docs/IDENTITY.md, `in_guest`): what the stack answers to
//! one HTTP request a guest sends to the link-local metadata address. The stack terminates
//! TCP to [`METADATA_IP`]:80 itself, before any policy decision (it works under deny-all
//! egress and never reaches the network or the host's own cloud metadata), reads one request
//! head and hands it to [`Server::answer`]. The request is decided here from its bytes alone;
//! a token comes from the daemon through the stack's [`Minter`], for the sandbox whose stack
//! this is: nothing the guest sends names a sandbox.
//!
//! Two forms, both needing something a server-side request forgery cannot add:
//! - ACA-compatible (what the Azure SDKs' managed-identity credential sends when
//!   `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set): `GET /msi/token?resource=AUD&
//!   api-version=2019-08-01` with `X-IDENTITY-HEADER: <the sandbox's IDENTITY_HEADER>`.
//! - IMDSv2-style: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1–21600`
//!   gives a session token; `GET /metadata/identity/token?resource=AUD` with
//!   `X-aws-ec2-metadata-token: <session>` uses it.
//!
//! Every request carrying `X-Forwarded-For`, `Forwarded` or `Via` is refused (a proxy relayed
//! it), and at most [`RATE_PER_S`] requests a second are answered. The header and the sessions
//! live in this stack only: every resume and fork starts a new stack with a new header, so
//! those of an earlier incarnation stop working. Refusals are reported to the daemon, which
//! audits them with the mints (a flood's refusals at most once a second); no token is logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::control::{Delivery, Minter};

// The address (port 80) and the guest's `IDENTITY_ENDPOINT`, shared with the agent.
pub use moat_protocol::link::{IDENTITY_ENDPOINT, METADATA_IP};
/// Requests answered per second, at most (Azure IMDS allows 20 for managed identity).
pub const RATE_PER_S: u32 = 20;
/// The longest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_SESSION_S: u64 = 21_600;
const MAX_SESSIONS: usize = 64;

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer at once (a session token).
    Answer(Response),
    /// Refuse: the status, why, and the audience if the request named one.
    Refuse {
        status: u16,
        reason: String,
        resource: Option<String>,
    },
    /// Mint a token for `resource`, then answer with [`token_response`].
    Mint { resource: String },
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    fn error(status: u16, message: &str) -> Response {
        Response {
            status,
            body: serde_json::json!({"error": message}).to_string(),
        }
    }

    /// The response as HTTP/1.1 bytes (the connection closes after it).
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            _ => "Error",
        };
        let kind = if self.body.starts_with('{') {
            "application/json"
        } else {
            "text/plain"
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n{}",
            self.status,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

fn refuse(status: u16, reason: &str, resource: Option<String>) -> Decision {
    Decision::Refuse {
        status,
        reason: reason.to_string(),
        resource,
    }
}

/// The answer to a mint: ACA's shape (`expires_on` a string of Unix seconds, as ACA sends it).
pub fn token_response(resource: &str, minted: Result<(String, i64), String>) -> Response {
    match minted {
        Ok((token, expires_on)) => Response {
            status: 200,
            body: serde_json::json!({
                "access_token": token,
                "expires_on": expires_on.to_string(),
                "resource": resource,
                "token_type": "Bearer",
            })
            .to_string(),
        },
        Err(e) => Response::error(403, &e),
    }
}

/// The endpoint's state for one sandbox incarnation: its `IDENTITY_HEADER`, its sessions,
/// its rate.
pub struct Endpoint {
    identity_header: String,
    sessions: HashMap<String, Instant>,
    window: (Instant, u32),
}

impl Endpoint {
    /// `identity_header`: the secret the guest's env carries as `IDENTITY_HEADER`.
    pub fn new(identity_header: String, now: Instant) -> Endpoint {
        Endpoint {
            identity_header,
            sessions: HashMap::new(),
            window: (now, 0),
        }
    }

    /// Decides the request whose head is `head` (up to and including the blank line).
    pub fn handle(&mut self, head: &[u8], now: Instant) -> Decision {
        if now.duration_since(self.window.0) >= Duration::from_secs(1) {
            self.window = (now, 0);
        }
        self.window.1 += 1;
        if self.window.1 > RATE_PER_S {
            return refuse(429, "too many requests: at most 20 a second", None);
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return refuse(400, "not an HTTP/1.x request head", None),
        }
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
        };
        let (method, target) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(n, _)| *n == k)
                .map(|(_, v)| percent_decode(v))
        };
        let named = param("resource").flatten().filter(|r| !r.is_empty());
        if ["x-forwarded-for", "forwarded", "via"]
            .iter()
            .any(|h| header(h).is_some())
        {
            return refuse(403, "forwarded requests are refused", named);
        }
        match (method, path) {
            ("GET", "/msi/token") => {
                let ok = header("x-identity-header").is_some_and(|v| {
                    !self.identity_header.is_empty() && ct_eq(v, &self.identity_header)
                });
                if !ok {
                    return refuse(401, "missing or wrong X-IDENTITY-HEADER", named);
                }
                if param("api-version").flatten().as_deref() != Some("2019-08-01") {
                    return refuse(400, "api-version must be 2019-08-01", named);
                }
                resource(named)
            }
            ("PUT", "/latest/api/token") => {
                let ttl = header("x-aws-ec2-metadata-token-ttl-seconds")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|t| (1..=MAX_SESSION_S).contains(t));
                let Some(ttl) = ttl else {
                    return refuse(
                        400,
                        "X-aws-ec2-metadata-token-ttl-seconds must be 1–21600",
                        None,
                    );
                };
                self.sessions.retain(|_, exp| *exp > now);
                if self.sessions.len() >= MAX_SESSIONS {
                    return refuse(429, "too many sessions", None);
                }
                let token = random_hex();
                self.sessions
                    .insert(token.clone(), now + Duration::from_secs(ttl));
                Decision::Answer(Response {
                    status: 200,
                    body: token,
                })
            }
            ("GET", "/metadata/identity/token") => {
                let live = header("x-aws-ec2-metadata-token")
                    .and_then(|t| self.sessions.get(t))
                    .is_some_and(|exp| *exp > now);
                if !live {
                    return refuse(
                        401,
                        "missing or expired session (PUT /latest/api/token)",
                        named,
                    );
                }
                resource(named)
            }
            (_, "/msi/token" | "/latest/api/token" | "/metadata/identity/token") => {
                refuse(405, "method not allowed", named)
            }
            _ => refuse(404, "no such path", None),
        }
    }
}

/// The endpoint as the stack serves it: decisions, tokens from the daemon, refusals reported.
pub struct Server {
    endpoint: Mutex<Endpoint>,
    minter: Minter,
    /// When a refusal for the rate was last reported.
    throttled: Mutex<Option<Instant>>,
}

impl Server {
    pub fn new(identity_header: String, minter: Minter) -> Server {
        Server {
            endpoint: Mutex::new(Endpoint::new(identity_header, Instant::now())),
            minter,
            throttled: Mutex::new(None),
        }
    }

    /// The HTTP answer to the request whose head is `head`.
    pub async fn answer(&self, head: &[u8]) -> Vec<u8> {
        let now = Instant::now();
        let decision = self
            .endpoint
            .lock()
            .expect("endpoint lock")
            .handle(head, now);
        match decision {
            Decision::Answer(r) => r.to_bytes(),
            // The daemon decides and audits the mint (and its refusal) itself.
            Decision::Mint { resource } => {
                let minted = self
                    .minter
                    .mint(&resource, Delivery::Endpoint)
                    .await
                    .map(|t| (t.token, t.expires_on))
                    .map_err(|e| match e {
                        crate::Error::Control(m) => m,
                        e => e.to_string(),
                    });
                token_response(&resource, minted).to_bytes()
            }
            Decision::Refuse {
                status,
                reason,
                resource,
            } => {
                let report = status != 429 || {
                    let mut last = self.throttled.lock().expect("throttle lock");
                    let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
                    if due {
                        *last = Some(now);
                    }
                    due
                };
                if report {
                    self.minter.refused(
                        resource.as_deref().unwrap_or(""),
                        &format!("in-guest endpoint: {reason}"),
                    );
                }
                Response::error(status, &reason).to_bytes()
            }
        }
    }

    /// The answer to a head longer than [`MAX_HEAD`] (reported like any refusal).
    pub fn too_long(&self) -> Vec<u8> {
        let reason = format!("the request head is longer than {MAX_HEAD} bytes");
        self.minter
            .refused("", &format!("in-guest endpoint: {reason}"));
        Response::error(431, &reason).to_bytes()
    }
}

fn resource(named: Option<String>) -> Decision {
    match named {
        Some(resource) => Decision::Mint { resource },
        None => refuse(400, "resource (the audience) is required", None),
    }
}

/// `%XX` and `+` decoding of a query value; `None` if malformed or not UTF-8.
fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Compares without an early exit, so timing says nothing about how much matched.
fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// 192 random bits, hex: a session token must be unguessable.
fn random_hex() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lines: &[&str]) -> Vec<u8> {
        let mut s = lines.join("\r\n");
        s.push_str("\r\n\r\n");
        s.into_bytes()
    }

    fn status(d: &Decision) -> u16 {
        match d {
            Decision::Answer(r) => r.status,
            Decision::Refuse { status, .. } => *status,
            Decision::Mint { .. } => 0,
        }
    }

    #[test]
    fn aca_form_needs_the_header_and_the_version() {
        let now = Instant::now();
        let mut e = Endpoint::new("s3cret".into(), now);
        let ok = e.handle(
            &head(&[
                "GET /msi/token?resource=api%3A%2F%2FAzureADTokenExchange&api-version=2019-08-01 HTTP/1.1",
                "Host: 169.254.169.254",
                "X-IDENTITY-HEADER: s3cret",
            ]),
            now,
        );
        assert_eq!(
            ok,
            Decision::Mint {
                resource: "api://AzureADTokenExchange".into()
            }
        );
        for bad in [
            vec!["GET /msi/token?resource=a&api-version=2019-08-01 HTTP/1.1"],
            vec![
                "GET /msi/token?resource=a&api-version=2019-08-01 HTTP/1.1",
                "X-IDENTITY-HEADER: s3cre",
            ],
        ] {
            assert_eq!(status(&e.handle(&head(&bad), now)), 401, "{bad:?}");
        }
        let no_version = head(&[
            "GET /msi/token?resource=a HTTP/1.1",
            "X-IDENTITY-HEADER: s3cret",
        ]);
        assert_eq!(status(&e.handle(&no_version, now)), 400);
        let no_resource = head(&[
            "GET /msi/token?api-version=2019-08-01 HTTP/1.1",
            "X-IDENTITY-HEADER: s3cret",
        ]);
        assert_eq!(status(&e.handle(&no_resource, now)), 400);
    }

    #[test]
    fn imds_form_needs_a_live_session() {
        let now = Instant::now();
        let mut e = Endpoint::new("h".into(), now);
        let get = |t: &str| {
            head(&[
                "GET /metadata/identity/token?resource=sts.amazonaws.com HTTP/1.1",
                &format!("X-aws-ec2-metadata-token: {t}"),
            ])
        };
        assert_eq!(status(&e.handle(&get("nope"), now)), 401);
        let put = head(&[
            "PUT /latest/api/token HTTP/1.1",
            "X-aws-ec2-metadata-token-ttl-seconds: 2",
        ]);
        let Decision::Answer(r) = e.handle(&put, now) else {
            panic!()
        };
        assert_eq!(r.status, 200);
        assert!(
            matches!(e.handle(&get(&r.body), now), Decision::Mint { resource } if resource == "sts.amazonaws.com")
        );
        let later = now + Duration::from_secs(3);
        assert_eq!(status(&e.handle(&get(&r.body), later)), 401, "expired");
        // A GET cannot open a session, and the TTL is bounded.
        assert_eq!(
            status(&e.handle(&head(&["GET /latest/api/token HTTP/1.1"]), later)),
            405
        );
        let long = head(&[
            "PUT /latest/api/token HTTP/1.1",
            "X-aws-ec2-metadata-token-ttl-seconds: 21601",
        ]);
        assert_eq!(status(&e.handle(&long, later)), 400);
        // A new endpoint (a new stack: resume, fork) knows no old session.
        let mut fresh = Endpoint::new("h".into(), later);
        let again = head(&[
            "PUT /latest/api/token HTTP/1.1",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
        ]);
        let Decision::Answer(s) = e.handle(&again, later) else {
            panic!()
        };
        assert_eq!(status(&fresh.handle(&get(&s.body), later)), 401);
    }

    #[test]
    fn forwarded_requests_and_floods_are_refused() {
        let now = Instant::now();
        let mut e = Endpoint::new("s".into(), now);
        for h in [
            "X-Forwarded-For: 10.0.0.1",
            "Forwarded: for=1.2.3.4",
            "Via: 1.1 proxy",
        ] {
            let r = e.handle(
                &head(&[
                    "GET /msi/token?resource=a&api-version=2019-08-01 HTTP/1.1",
                    "X-IDENTITY-HEADER: s",
                    h,
                ]),
                now,
            );
            assert_eq!(status(&r), 403, "{h}");
        }
        let mut e = Endpoint::new("s".into(), now);
        let req = head(&["GET /other HTTP/1.1"]);
        let codes: Vec<u16> = (0..25).map(|_| status(&e.handle(&req, now))).collect();
        assert!(codes[..20].iter().all(|c| *c == 404));
        assert!(codes[20..].iter().all(|c| *c == 429));
        let next = now + Duration::from_secs(1);
        assert_eq!(status(&e.handle(&req, next)), 404, "a new second");
        assert_eq!(status(&e.handle(b"garbage\r\n\r\n", next)), 400);
    }

    #[test]
    fn token_answers_have_acas_shape() {
        let r = token_response("aud", Ok(("a.b.c".into(), 1700000000)));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["expires_on"], "1700000000");
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["resource"], "aud");
        let bytes = String::from_utf8(r.to_bytes()).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 200 OK\r\n") && bytes.contains("no-store"));
        assert_eq!(token_response("aud", Err("no".into())).status, 403);
    }
}
