//! Registry credentials from the Docker config file (`auths` entries with a base64 `auth` or
//! `username`/`password`). Credential helpers are not run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

fn host_of_key(k: &str) -> &str {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k)
}

/// Finds `(username, password)` for `registry` (as written in the reference). An explicitly
/// given file must exist; the default one may be missing.
pub fn credentials(explicit: Option<&Path>, registry: &str) -> Result<Option<(String, String)>> {
    let (path, must_exist) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_path() {
            Some(p) => (p, false),
            None => return Ok(None),
        },
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => return Ok(None),
        Err(e) => {
            return Err(Error::DockerConfig {
                path,
                detail: e.to_string(),
            })
        }
    };
    let cfg: ConfigFile = serde_json::from_slice(&bytes).map_err(|e| Error::DockerConfig {
        path: path.clone(),
        detail: format!("not valid JSON: {e}"),
    })?;
    let wanted: &[&str] = if registry == crate::reference::DOCKER_HUB {
        &["index.docker.io", "docker.io", "registry-1.docker.io"]
    } else {
        &[registry]
    };
    let Some((key, entry)) = cfg
        .auths
        .iter()
        .find(|(k, _)| wanted.contains(&host_of_key(k)))
    else {
        return Ok(None);
    };
    let bad = |d: &str| Error::DockerConfig {
        path: path.clone(),
        detail: format!("auths[{key:?}]: {d}"),
    };
    if let Some(a) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| bad("\"auth\" is not valid base64 of \"user:password\""))?;
        let s = String::from_utf8(raw).map_err(|_| bad("\"auth\" is not UTF-8"))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| bad("\"auth\" must decode to \"user:password\""))?;
        return Ok(Some((u.to_string(), p.to_string())));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some((u.clone(), p.clone()))),
        _ => Ok(None),
    }
}

/// Parses a `WWW-Authenticate` header into its scheme and parameters.
pub fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), val.trim().to_string());
    }
    (scheme.to_ascii_lowercase(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="x""#);
        assert_eq!((s.as_str(), p["realm"].as_str()), ("basic", "x"));
    }

    #[test]
    fn config_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"https://r.example:5000/v1/":{"auth":"dTpwOng="},"other:1":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        assert_eq!(
            credentials(Some(&p), "r.example:5000").unwrap(),
            Some(("u".into(), "p:x".into()))
        );
        assert_eq!(
            credentials(Some(&p), "other:1").unwrap(),
            Some(("a".into(), "b".into()))
        );
        assert_eq!(credentials(Some(&p), "nope").unwrap(), None);
        assert!(credentials(Some(&dir.path().join("missing")), "x").is_err());
    }
}
