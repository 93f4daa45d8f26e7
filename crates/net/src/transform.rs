//! Request transforms of egress rules: headers the stack sets on a guest's HTTPS requests to
//! a host on their way out (`{"headers": {"Authorization": "Bearer ${secret:openai}"}}`),
//! optionally only on some paths and methods, with the values the placeholders stand for.
//!
//! Placeholders are allowed only in header values, and substituted only there: nothing the
//! guest sends is ever searched for them (an echoing host would hand the value back). A
//! placeholder resolves through one seam, [`Values::resolve`]: `${secret:NAME}` from the
//! secrets the daemon sent with the policy; `${identity:AUDIENCE}` is parsed and validated
//! but resolves only once workload identity provides tokens (until then the daemon refuses
//! policies that use it, and a stack refuses the request).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const MAX_HEADERS: usize = 16;
pub const MAX_PATHS: usize = 64;
pub const MAX_METHODS: usize = 16;
pub const MAX_VALUE_LEN: usize = 8192;
pub const MAX_PATH_LEN: usize = 1024;

/// A secret value: never printed by `Debug`, wiped from memory when dropped. It serialises as
/// the plain string, for the control channel only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// Secret names: what `${secret:NAME}` and the secrets API accept.
pub fn check_secret_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(
            "a secret name has 1–63 lowercase letters, digits, '-' and '_', starting with a \
             letter or digit"
                .into(),
        )
    }
}

/// Characters a header value may hold (and so a secret value and a template's text): visible
/// ASCII and spaces, nothing that could end the header or start another.
pub fn check_header_text(s: &str) -> std::result::Result<(), String> {
    match s.bytes().find(|&b| !(b == b' ' || b.is_ascii_graphic())) {
        None => Ok(()),
        Some(b) => Err(format!(
            "byte 0x{b:02x} is not allowed: only visible ASCII characters and spaces (what an \
             HTTP header value may carry)"
        )),
    }
}

/// One rule's `transform`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = EgressTransform)]
pub struct Transform {
    /// Headers to set (1–16), replacing any copy the guest sent. Values may hold
    /// `${secret:NAME}` (a secret of the group) and `${identity:AUDIENCE}` (a workload
    /// identity token); names are case-insensitive.
    #[schema(example = json!({"Authorization": "Bearer ${secret:openai}"}))]
    pub headers: BTreeMap<String, String>,
    /// Only requests whose path is one of these or under one (`/v1` matches `/v1` and
    /// `/v1/chat`, not `/v10`); empty: every path. At most 64.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub paths: Vec<String>,
    /// Only requests with one of these methods (`GET`, `POST`…); empty: every method.
    #[serde(default)]
    #[schema(max_items = 16)]
    pub methods: Vec<String>,
    /// Accept plain HTTP from the guest on port 80 and send it upstream as HTTPS (port
    /// 443). Without it a transform applies to HTTPS (port 443) only: a secret never travels
    /// in the clear.
    #[serde(default)]
    pub upgrade_to_https: bool,
}

/// What a placeholder stands for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placeholder {
    Secret(String),
    Identity(String),
}

impl std::fmt::Display for Placeholder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placeholder::Secret(n) => write!(f, "${{secret:{n}}}"),
            Placeholder::Identity(a) => write!(f, "${{identity:{a}}}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Value(Placeholder),
}

/// A header value with its placeholders parsed out.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

impl Template {
    pub fn parse(s: &str) -> std::result::Result<Template, String> {
        if s.len() > MAX_VALUE_LEN {
            return Err(format!("{} bytes: at most {MAX_VALUE_LEN}", s.len()));
        }
        check_header_text(s)?;
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(at) = rest.find("${") {
            if at > 0 {
                parts.push(Part::Text(rest[..at].to_string()));
            }
            let after = &rest[at + 2..];
            let end = after.find('}').ok_or_else(|| {
                "a \"${\" without its \"}\": placeholders are ${secret:NAME} and \
                 ${identity:AUDIENCE}"
                    .to_string()
            })?;
            let inner = &after[..end];
            let p = match inner.split_once(':') {
                Some(("secret", name)) => {
                    check_secret_name(name).map_err(|m| format!("${{{inner}}}: {m}"))?;
                    Placeholder::Secret(name.to_string())
                }
                Some(("identity", aud)) if !aud.is_empty() && !aud.contains(' ') => {
                    Placeholder::Identity(aud.to_string())
                }
                _ => {
                    return Err(format!(
                        "${{{inner}}} is not a placeholder: they are ${{secret:NAME}} and \
                         ${{identity:AUDIENCE}}"
                    ))
                }
            };
            parts.push(Part::Value(p));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.0.iter().filter_map(|p| match p {
            Part::Value(p) => Some(p),
            Part::Text(_) => None,
        })
    }

    /// The value with every placeholder resolved; the error names the one that is not.
    pub async fn render(&self, values: &Values) -> std::result::Result<Secret, String> {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Value(p) => out.push_str(values.resolve(p).await?.expose()),
            }
        }
        Ok(Secret(out))
    }
}

/// What placeholders resolve to in one stack. This is the one seam for placeholder values:
/// the group's secrets, and fresh workload-identity tokens from the daemon.
#[derive(Debug, Clone, Default)]
pub struct Values {
    secrets: BTreeMap<String, Secret>,
    /// Asks the daemon for a token; `None` where no daemon stands behind the stack.
    minter: Option<crate::control::Minter>,
}

impl Values {
    pub fn new(
        secrets: BTreeMap<String, Secret>,
        minter: Option<crate::control::Minter>,
    ) -> Values {
        Values { secrets, minter }
    }

    pub async fn resolve(&self, p: &Placeholder) -> std::result::Result<Secret, String> {
        match p {
            Placeholder::Secret(name) => self.secrets.get(name).cloned().ok_or_else(|| {
                format!("secret {name:?} of this sandbox's group does not exist (deleted?)")
            }),
            // A new token on every request: the daemon checks the audience against the
            // group's identity settings now, audits the mint, and the token never waits here.
            Placeholder::Identity(aud) => match &self.minter {
                Some(m) => m
                    .mint(aud, crate::control::Delivery::Egress)
                    .await
                    .map(|t| Secret::new(t.token))
                    .map_err(|e| format!("{p}: {e}")),
                None => Err(format!(
                    "{p}: no daemon gives this network stack workload-identity tokens"
                )),
            },
        }
    }
}

/// Headers that a transform may not set: they frame the message or the connection, or are
/// the request's target, which the stack checks itself.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// A validated transform, as the stack applies it.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Lowercase names.
    pub headers: Vec<(String, Template)>,
    paths: Vec<String>,
    methods: Vec<String>,
    pub upgrade_to_https: bool,
}

impl Compiled {
    /// Validates `t`; errors are `(field suffix, message)`.
    pub fn new(t: &Transform) -> std::result::Result<Compiled, (String, String)> {
        if t.headers.is_empty() || t.headers.len() > MAX_HEADERS {
            return Err((
                ".headers".into(),
                format!("{} headers: give 1–{MAX_HEADERS}", t.headers.len()),
            ));
        }
        let mut headers: Vec<(String, Template)> = Vec::new();
        for (name, value) in &t.headers {
            let field = format!(".headers[{name:?}]");
            let ok = !name.is_empty()
                && name.len() <= 256
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !ok {
                return Err((
                    field,
                    "not a header name: letters, digits and !#$%&'*+-.^_`|~".into(),
                ));
            }
            let lower = name.to_ascii_lowercase();
            if RESERVED.contains(&lower.as_str()) {
                return Err((
                    field,
                    format!(
                        "{lower} cannot be set by a transform (it frames the request or is its \
                         target)"
                    ),
                ));
            }
            if headers.iter().any(|(n, _)| *n == lower) {
                return Err((field, "given twice (names are case-insensitive)".into()));
            }
            let tpl = Template::parse(value).map_err(|m| (field, m))?;
            headers.push((lower, tpl));
        }
        if t.paths.len() > MAX_PATHS {
            return Err((
                ".paths".into(),
                format!("{} paths: at most {MAX_PATHS}", t.paths.len()),
            ));
        }
        for (i, p) in t.paths.iter().enumerate() {
            check_path(p).map_err(|m| (format!(".paths[{i}]"), m))?;
        }
        if t.methods.len() > MAX_METHODS {
            return Err((
                ".methods".into(),
                format!("{} methods: at most {MAX_METHODS}", t.methods.len()),
            ));
        }
        for (i, m) in t.methods.iter().enumerate() {
            let ok = !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase());
            if !ok {
                return Err((
                    format!(".methods[{i}]"),
                    format!("{m:?}: a method is 1–32 uppercase letters (GET, POST…)"),
                ));
            }
        }
        Ok(Compiled {
            headers,
            paths: t
                .paths
                .iter()
                .map(|p| p.trim_end_matches('/').into())
                .collect(),
            methods: t.methods.clone(),
            upgrade_to_https: t.upgrade_to_https,
        })
    }

    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.headers.iter().flat_map(|(_, t)| t.placeholders())
    }

    /// Whether `paths` limits where the headers go.
    pub fn limits_paths(&self) -> bool {
        !self.paths.is_empty()
    }

    /// Whether a request with `method` and `path` (without its query) gets the headers.
    pub fn applies(&self, method: &str, path: &str) -> bool {
        let method_ok = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        let path_ok = self.paths.is_empty()
            || self.paths.iter().any(|p| {
                p.is_empty()
                    || path == p
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|r| r.starts_with('/'))
            });
        method_ok && path_ok
    }
}

/// A rule's path: absolute, no query or fragment, and nothing a server could read as another
/// path (dot segments, percent escapes, backslashes, empty segments).
fn check_path(p: &str) -> std::result::Result<(), String> {
    if !p.starts_with('/') || p.len() > MAX_PATH_LEN {
        return Err(format!(
            "{p:?}: a path starts with '/' and has at most {MAX_PATH_LEN} characters"
        ));
    }
    if !is_plain_path(p) {
        return Err(format!(
            "{p:?}: only plain paths: no query or fragment, no '.' or '..' segments, no empty \
             segments, no '%' escapes or backslashes"
        ));
    }
    Ok(())
}

/// A request path whose meaning every server agrees on: the stack compares it with a rule's
/// paths as text, so one that a server would normalise to something else is refused.
pub fn is_plain_path(p: &str) -> bool {
    let trimmed = p.strip_suffix('/').unwrap_or(p);
    p.starts_with('/')
        && p.bytes()
            .all(|b| b.is_ascii_graphic() && !b"%\\?#".contains(&b))
        && (trimmed.is_empty()
            || trimmed[1..]
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != ".."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compiled(v: serde_json::Value) -> std::result::Result<Compiled, (String, String)> {
        Compiled::new(&serde_json::from_value(v).unwrap())
    }

    #[tokio::test]
    async fn templates_resolve_through_the_values() {
        let t = Template::parse("Bearer ${secret:openai} (${secret:b})").unwrap();
        let mut s = BTreeMap::new();
        s.insert("openai".to_string(), Secret::new("sk-1".into()));
        s.insert("b".to_string(), Secret::new("x".into()));
        let v = Values::new(s.clone(), None);
        assert_eq!(t.render(&v).await.unwrap().expose(), "Bearer sk-1 (x)");
        let e = Template::parse("${secret:gone}")
            .unwrap()
            .render(&v)
            .await
            .unwrap_err();
        assert!(
            e.contains("\"gone\"") && e.contains("does not exist"),
            "{e}"
        );
        let e = Template::parse("Bearer ${identity:api://x}")
            .unwrap()
            .render(&v)
            .await
            .unwrap_err();
        assert!(e.contains("workload-identity tokens"), "{e}");
        // With a daemon behind the stack: a token minted for that audience, on every render.
        let (minter, mut asks) = crate::control::Minter::channel();
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(ask) = asks.recv().await {
                let crate::control::MintAsk::Mint {
                    audience,
                    delivery: crate::control::Delivery::Egress,
                    done,
                } = ask
                else {
                    panic!("a transform mints for egress: {ask:?}");
                };
                n += 1;
                let _ = done.send(Ok(crate::control::Token {
                    token: format!("jwt-{n}-for-{audience}"),
                    expires_on: 0,
                }));
            }
        });
        let v = Values::new(s, Some(minter));
        let t = Template::parse("Bearer ${identity:api://x}").unwrap();
        assert_eq!(
            t.render(&v).await.unwrap().expose(),
            "Bearer jwt-1-for-api://x"
        );
        assert_eq!(
            t.render(&v).await.unwrap().expose(),
            "Bearer jwt-2-for-api://x"
        );
        assert_eq!(
            format!("{:?}", Secret::new("sk-1".into())),
            "Secret(<redacted>)"
        );
        assert!(!format!("{v:?}").contains("sk-1"));
    }

    #[test]
    fn bad_templates_say_why() {
        for (s, want) in [
            ("Bearer ${secret:openai", "without its"),
            ("${env:HOME}", "not a placeholder"),
            ("${secret:Bad}", "lowercase"),
            ("${secret:}", "secret name"),
            ("${identity:}", "not a placeholder"),
            ("a\r\nX-Evil: 1", "0x0d"),
            ("tab\there", "0x09"),
        ] {
            let e = Template::parse(s).unwrap_err();
            assert!(e.contains(want), "{s:?}: {e}");
        }
        assert!(Template::parse(&"a".repeat(MAX_VALUE_LEN + 1)).is_err());
        assert_eq!(
            Template::parse("${identity:api://my-api}")
                .unwrap()
                .placeholders()
                .collect::<Vec<_>>(),
            vec![&Placeholder::Identity("api://my-api".into())]
        );
    }

    #[test]
    fn transforms_are_validated() {
        for (v, field, want) in [
            (json!({"headers": {}}), ".headers", "1–16"),
            (json!({"headers": {"Host": "x"}}), "Host", "cannot be set"),
            (
                json!({"headers": {"Content-Length": "1"}}),
                "Content-Length",
                "cannot",
            ),
            (json!({"headers": {"a b": "x"}}), "a b", "header name"),
            (json!({"headers": {"A": "1", "a": "2"}}), "\"a\"", "twice"),
            (
                json!({"headers": {"A": "${x}"}}),
                "\"A\"",
                "not a placeholder",
            ),
            (
                json!({"headers": {"A": "1"}, "paths": ["v1"]}),
                ".paths[0]",
                "starts with",
            ),
            (
                json!({"headers": {"A": "1"}, "paths": ["/a/../b"]}),
                ".paths[0]",
                "plain",
            ),
            (
                json!({"headers": {"A": "1"}, "paths": ["/a%2f"]}),
                ".paths[0]",
                "plain",
            ),
            (
                json!({"headers": {"A": "1"}, "paths": ["/a?b"]}),
                ".paths[0]",
                "plain",
            ),
            (
                json!({"headers": {"A": "1"}, "methods": ["get"]}),
                ".methods[0]",
                "uppercase",
            ),
        ] {
            let (f, m) = compiled(v.clone()).unwrap_err();
            assert!(f.contains(field) && m.contains(want), "{v}: {f} {m}");
        }
        assert!(
            serde_json::from_value::<Transform>(json!({"headers": {"A": "1"}, "path": []}))
                .is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn paths_and_methods_limit_where_headers_go() {
        let c = compiled(json!({"headers": {"A": "1"}, "paths": ["/v1/chat", "/up/"],
            "methods": ["POST"]}))
        .unwrap();
        assert!(c.applies("POST", "/v1/chat"));
        assert!(c.applies("POST", "/v1/chat/completions"));
        assert!(c.applies("POST", "/up/x"));
        assert!(!c.applies("POST", "/v1/chatter"));
        assert!(!c.applies("POST", "/v1"));
        assert!(!c.applies("GET", "/v1/chat"));
        let all = compiled(json!({"headers": {"A": "1"}})).unwrap();
        assert!(all.applies("DELETE", "/anything"));
        let root = compiled(json!({"headers": {"A": "1"}, "paths": ["/"]})).unwrap();
        assert!(root.applies("GET", "/x"));
        for p in ["/a/./b", "/a/../b", "/a//b", "/a%2e", "/a\\b", "x"] {
            assert!(!is_plain_path(p), "{p}");
        }
        for p in ["/", "/a", "/a/b/", "/a.b/c-d_e~"] {
            assert!(is_plain_path(p), "{p}");
        }
    }
}
