//! The first bytes of a guest flow, read before any host connection exists: the TLS
//! ClientHello's server name on 443 and the HTTP request's host on 80. Both parsers take a
//! byte slice and return a verdict with no side effects (fuzz-friendly), read at most
//! [`MAX_PEEK`] bytes and fail closed: anything they cannot parse is a denial.

use tls_parser::{
    parse_tls_client_hello_extensions, parse_tls_message_handshake, SNIType, TlsExtension,
    TlsMessage, TlsMessageHandshake,
};

/// The most a flow may send before its name is known.
pub const MAX_PEEK: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet.
    More,
    /// The name the client asked for (lowercase, no port, no trailing dot).
    Name(String),
    /// Not acceptable, and why.
    Bad(String),
}

/// The TLS alert `access_denied` (fatal), sent before closing a flow whose ClientHello is
/// refused, so the client reports a clear TLS error instead of a reset.
pub const TLS_ACCESS_DENIED: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// The server name of a TLS ClientHello that may span several handshake records.
pub fn client_hello_sni(buf: &[u8]) -> Peek {
    // Reassemble the handshake layer: consecutive records of type 22.
    let mut hs = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            break;
        }
        if rest[0] != 0x16 {
            return Peek::Bad("not a TLS handshake".into());
        }
        if rest[1] != 0x03 {
            return Peek::Bad("not a TLS record".into());
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > 16384 + 2048 {
            return Peek::Bad("bad TLS record length".into());
        }
        if rest.len() < 5 + len {
            break;
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if hs.len() >= 4 {
            let need =
                4 + (usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]));
            if hs[0] != 1 {
                return Peek::Bad("the first handshake message is not a ClientHello".into());
            }
            if need > MAX_PEEK {
                return Peek::Bad("ClientHello too large".into());
            }
            if hs.len() >= need {
                return sni_of(&hs[..need]);
            }
        }
    }
    if buf.len() >= MAX_PEEK {
        Peek::Bad("no ClientHello in the first 16 KiB".into())
    } else if !buf.is_empty() && buf[0] != 0x16 {
        Peek::Bad("not a TLS handshake".into())
    } else {
        Peek::More
    }
}

fn sni_of(msg: &[u8]) -> Peek {
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)))) =
        parse_tls_message_handshake(msg)
    else {
        return Peek::Bad("malformed ClientHello".into());
    };
    let Some(ext) = ch.ext else {
        return Peek::Bad("ClientHello without a server name (SNI)".into());
    };
    let Ok((_, exts)) = parse_tls_client_hello_extensions(ext) else {
        return Peek::Bad("malformed ClientHello extensions".into());
    };
    let mut names = exts.iter().filter_map(|e| match e {
        TlsExtension::SNI(list) => Some(list),
        _ => None,
    });
    let (Some(list), None) = (names.next(), names.next()) else {
        return Peek::Bad("ClientHello without exactly one server name extension".into());
    };
    let hosts: Vec<&[u8]> = list
        .iter()
        .filter(|(t, _)| *t == SNIType::HostName)
        .map(|(_, n)| *n)
        .collect();
    match hosts.as_slice() {
        [one] => match std::str::from_utf8(one)
            .ok()
            .and_then(crate::policy::normalize_name)
        {
            Some(n) => Peek::Name(n),
            None => Peek::Bad("the server name is not a host name".into()),
        },
        _ => Peek::Bad("ClientHello without exactly one server name (SNI)".into()),
    }
}

/// The host an HTTP/1 request is for: its `Host` header, which must be the only one, and the
/// authority of an absolute-form target, which must agree with it (servers prefer the target).
pub fn http_host(buf: &[u8]) -> Peek {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() < MAX_PEEK => return Peek::More,
        Ok(httparse::Status::Partial) => {
            return Peek::Bad("no complete HTTP request head in 16 KiB".into())
        }
        Err(e) => return Peek::Bad(format!("not an HTTP/1 request ({e})")),
        Ok(httparse::Status::Complete(_)) => {}
    }
    if req.method == Some("CONNECT") {
        return Peek::Bad("CONNECT is not allowed".into());
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let (Some(h), None) = (hosts.next(), hosts.next()) else {
        return Peek::Bad("the request needs exactly one Host header".into());
    };
    let Some(host) = std::str::from_utf8(h.value).ok().and_then(authority_host) else {
        return Peek::Bad("the Host header is not a host name".into());
    };
    let path = req.path.unwrap_or("");
    if let Some(after) = path.split_once("://").map(|(_, a)| a) {
        let auth = after.split(['/', '?', '#']).next().unwrap_or("");
        if authority_host(auth).as_deref() != Some(host.as_str()) {
            return Peek::Bad("the request target names another host than the Host header".into());
        }
    } else if !path.starts_with('/') && path != "*" {
        return Peek::Bad("unsupported request target".into());
    }
    Peek::Name(host)
}

/// `Name[:port]` → normalised name; userinfo and IPv6 literals are refused.
fn authority_host(a: &str) -> Option<String> {
    let a = a.trim();
    if a.contains('@') || a.starts_with('[') {
        return None;
    }
    let host = match a.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some(_) => return None,
        None => a,
    };
    crate::policy::normalize_name(host)
}

/// The answer to a plain-HTTP request that is refused.
pub fn http_forbidden(reason: &str) -> Vec<u8> {
    let body = format!("moat: egress denied: {reason}\n");
    let header: String = reason
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .collect();
    format!(
        "HTTP/1.1 403 Forbidden\r\nX-Moat-Deny: {header}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Follows the requests of one plain-HTTP/1 connection, so that every request's host is
/// checked, not only the first: request heads are parsed with [`http_host`], bodies skipped by
/// `Content-Length` or chunked framing. After a request that asks for an `Upgrade`
/// (WebSocket) the rest of the connection is no longer HTTP and is not checked. Anything it
/// cannot follow is an error (fail closed).
#[derive(Debug)]
pub struct HttpRequests {
    name: String,
    buf: Vec<u8>,
    state: Body,
    requests: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Expecting a request head.
    Head,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Tunnel,
}

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

impl HttpRequests {
    /// For a connection whose requests must all be for `name`.
    pub fn new(name: &str) -> HttpRequests {
        HttpRequests {
            name: name.to_string(),
            buf: Vec::new(),
            state: Body::Head,
            requests: 0,
        }
    }

    /// Takes the next bytes from the client; `Err` says why the connection must end.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        if self.state == Body::Tunnel {
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        let r = self.step(&mut pos);
        self.buf.drain(..pos);
        r
    }

    fn step(&mut self, pos: &mut usize) -> Result<(), String> {
        loop {
            let rest = &self.buf[*pos..];
            match self.state {
                Body::Tunnel => return Ok(()),
                Body::Head => {
                    let head_len = match head_length(rest) {
                        None if rest.len() >= MAX_PEEK => {
                            return Err("no complete HTTP request head in 16 KiB".into())
                        }
                        None => return Ok(()),
                        Some(n) => n,
                    };
                    self.requests += 1;
                    let head = &rest[..head_len];
                    match http_host(head) {
                        Peek::Name(n) if n == self.name => {}
                        Peek::Name(n) => {
                            return Err(format!(
                                "HTTP Host {n} is not {} (request {})",
                                self.name, self.requests
                            ))
                        }
                        Peek::Bad(why) => return Err(format!("{why} (request {})", self.requests)),
                        Peek::More => return Err("unparsable HTTP request head".into()),
                    }
                    self.state = body_of(head)?;
                    *pos += head_len;
                }
                Body::Length(n) | Body::ChunkData(n) => {
                    let k = n.min(rest.len() as u64);
                    *pos += k as usize;
                    let left = n - k;
                    self.state = match (self.state, left) {
                        (Body::Length(_), 0) => Body::Head,
                        (Body::Length(_), l) => Body::Length(l),
                        (_, 0) => Body::ChunkEnd,
                        (_, l) => Body::ChunkData(l),
                    };
                    if left > 0 {
                        return Ok(());
                    }
                }
                Body::ChunkEnd => {
                    if rest.len() < 2 {
                        return Ok(());
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err("malformed chunked body".into());
                    }
                    *pos += 2;
                    self.state = Body::ChunkSize;
                }
                Body::ChunkSize | Body::Trailers => {
                    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if rest.len() > MAX_LINE {
                            return Err("malformed chunked body".into());
                        }
                        return Ok(());
                    };
                    let line = &rest[..end];
                    *pos += end + 2;
                    self.state = if self.state == Body::Trailers {
                        if line.is_empty() {
                            Body::Head
                        } else {
                            Body::Trailers
                        }
                    } else {
                        let digits = line.split(|b| *b == b';').next().unwrap_or(b"");
                        let size = std::str::from_utf8(digits)
                            .ok()
                            .and_then(|d| u64::from_str_radix(d.trim(), 16).ok())
                            .ok_or("malformed chunk size")?;
                        if size == 0 {
                            Body::Trailers
                        } else {
                            Body::ChunkData(size)
                        }
                    };
                }
            }
        }
    }
}

/// Length of the request head at the start of `buf` (through the blank line), if complete.
fn head_length(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// What follows a (valid) request head.
fn body_of(head: &[u8]) -> Result<Body, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).map_err(|e| e.to_string())?;
    let value = |name: &str| -> Vec<String> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
            .collect()
    };
    if !value("upgrade").is_empty() {
        return Ok(Body::Tunnel);
    }
    if let Some(te) = value("transfer-encoding").last() {
        return if te.rsplit(',').next().map(str::trim) == Some("chunked") {
            Ok(Body::ChunkSize)
        } else {
            Err(format!("unsupported Transfer-Encoding {te}"))
        };
    }
    let lengths = value("content-length");
    match lengths.as_slice() {
        [] => Ok(Body::Head),
        [one] => one
            .parse::<u64>()
            .map(|n| if n == 0 { Body::Head } else { Body::Length(n) })
            .map_err(|_| format!("bad Content-Length {one}")),
        _ => Err("more than one Content-Length".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, as rustls writes it for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn sni_of_a_real_client_hello() {
        let ch = client_hello("API.Example.com");
        assert_eq!(client_hello_sni(&ch), Peek::Name("api.example.com".into()));
        // Every prefix is "more", never a verdict.
        for cut in [0, 1, 4, 5, 6, 40, ch.len() - 1] {
            assert_eq!(client_hello_sni(&ch[..cut]), Peek::More, "cut at {cut}");
        }
    }

    #[test]
    fn a_client_hello_split_over_records_is_reassembled() {
        let ch = client_hello("api.example.com");
        let body = &ch[5..];
        let (a, b) = body.split_at(100);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            client_hello_sni(&split),
            Peek::Name("api.example.com".into())
        );
    }

    #[test]
    fn no_sni_or_garbage_is_refused() {
        // rustls sends no SNI for an IP address.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let ip = rustls::pki_types::ServerName::try_from("93.184.216.34").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), ip).unwrap();
        let mut ch = Vec::new();
        conn.write_tls(&mut ch).unwrap();
        assert!(matches!(client_hello_sni(&ch), Peek::Bad(m) if m.contains("server name")));
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0x16, 0x03, 0x01, 0x00, 0x00],
            &[0x16, 0x02, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
            &[0x16, 0x03, 0x01, 0x00, 0x05, 2, 0, 0, 1, 0],
            &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 0, 0, 1, 0],
        ] {
            assert!(matches!(client_hello_sni(bad), Peek::Bad(_)), "{bad:?}");
        }
        // A stream of tiny records never reaches a name: refused at the cap.
        let tiny: Vec<u8> =
            std::iter::repeat_n([0x16, 0x03, 0x01, 0x00, 0x01, 0x01], MAX_PEEK / 6 + 1)
                .flatten()
                .collect();
        assert!(matches!(client_hello_sni(&tiny), Peek::Bad(_)));
    }

    #[test]
    fn every_truncation_and_bit_flip_of_a_client_hello_is_handled() {
        let ch = client_hello("api.example.com");
        for i in 0..ch.len() {
            let _ = client_hello_sni(&ch[..i]);
            for bit in [0x01u8, 0x80] {
                let mut m = ch.clone();
                m[i] ^= bit;
                if let Peek::Name(n) = client_hello_sni(&m) {
                    // A flip inside the name changes the name; it never yields an
                    // unparseable one.
                    assert!(crate::policy::normalize_name(&n).is_some());
                }
            }
        }
    }

    #[test]
    fn http_host_checks() {
        let ok = |r: &str| http_host(r.as_bytes());
        assert_eq!(
            ok("GET / HTTP/1.1\r\nHost: API.test:8080\r\n\r\n"),
            Peek::Name("api.test".into())
        );
        assert_eq!(
            ok("GET http://api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            Peek::Name("api.test".into())
        );
        assert_eq!(ok("GET / HTTP/1.1\r\nHost: api.test\r\n"), Peek::More);
        for bad in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            "GET http://evil.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
            "GET http://user@api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
            "CONNECT evil.test:443 HTTP/1.1\r\nHost: api.test\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test:x\r\n\r\n",
            "\x16\x03\x01\x00\x05hello",
        ] {
            assert!(matches!(ok(bad), Peek::Bad(_)), "{bad:?}: {:?}", ok(bad));
        }
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_PEEK));
        assert!(matches!(ok(&big), Peek::Bad(_)));
    }

    #[test]
    fn forbidden_answer_is_http() {
        let r = String::from_utf8(http_forbidden("Host evil.test is not api.test")).unwrap();
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(r.contains("\r\nX-Moat-Deny: Host evil.test is not api.test\r\n"));
    }

    fn feed_all(name: &str, data: &[u8], split: usize) -> Result<(), String> {
        let mut h = HttpRequests::new(name);
        for part in data.chunks(split.max(1)) {
            h.feed(part)?;
        }
        Ok(())
    }

    #[test]
    fn every_request_of_a_connection_is_checked() {
        let good = b"POST /a HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: api.test:80\r\n\r\n\
POST /c HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n\
5;ext=1\r\nGET /\r\n3\r\nxyz\r\n0\r\nX-Trailer: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: api.test\r\n\r\n";
        // However the bytes are split, the same verdict.
        for split in [1, 2, 3, 7, 64, good.len()] {
            feed_all("api.test", good, split).unwrap_or_else(|e| panic!("split {split}: {e}"));
        }
        let mut evil = good.to_vec();
        evil.extend_from_slice(b"GET /e HTTP/1.1\r\nHost: evil.test\r\n\r\n");
        for split in [1, 5, evil.len()] {
            let e = feed_all("api.test", &evil, split).unwrap_err();
            assert_eq!(e, "HTTP Host evil.test is not api.test (request 5)");
        }
    }

    #[test]
    fn a_body_that_looks_like_a_request_is_not_one() {
        // The body carries a request head for another host: it is body, not a request.
        let body = b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        let mut r = format!(
            "POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        feed_all("api.test", &r, 3).unwrap();
        // The request after the body is checked.
        r.extend_from_slice(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n");
        assert!(feed_all("api.test", &r, 3).is_err());
    }

    #[test]
    fn framing_it_cannot_follow_is_refused() {
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
        ] {
            assert!(feed_all("api.test", bad, 4).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_upgrade_ends_the_checks() {
        let mut r = b"GET /ws HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec();
        r.extend_from_slice(&[0x81, 0x05, b'h', b'e', b'l', b'l', b'o']);
        feed_all("api.test", &r, 5).unwrap();
    }
}
