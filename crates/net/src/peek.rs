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
}
