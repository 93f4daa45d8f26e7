//! A small client for the OCI distribution API: manifests and blobs (pull), monolithic blob
//! uploads and manifest puts (push). Handles Basic auth and the Bearer token flow announced in
//! `WWW-Authenticate`.

use std::path::Path;
use std::sync::Mutex;

use base64::Engine as _;
use futures_util::StreamExt;
use reqwest::{header, Method, RequestBuilder, Response, StatusCode};
use tokio::io::AsyncWriteExt;

use crate::digest::{self, Hasher};
use crate::error::{Error, Result};
use crate::reference::Reference;
use crate::spec::{self, Descriptor};
use crate::{ImportOptions, Progress};

/// Manifests above this size are refused (real ones are a few KiB).
const MAX_MANIFEST: usize = 4 << 20;

pub struct Client {
    http: reqwest::Client,
    base: String,
    /// `host:port`, for error messages.
    hostport: String,
    reference: Reference,
    creds: Option<(String, String)>,
    push: bool,
    authz: Mutex<Option<String>>,
}

impl Client {
    pub fn new(reference: &Reference, opts: &ImportOptions, push: bool) -> Result<Client> {
        let scheme = if opts.plain_http { "http" } else { "https" };
        let host = reference.host();
        let hostport = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:{}", if opts.plain_http { 80 } else { 443 })
        };
        let creds = crate::auth::credentials(opts.docker_config.as_deref(), &reference.registry)?;
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(15))
            .user_agent(concat!("moat-image/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Unreachable {
                host: hostport.clone(),
                detail: e.to_string(),
            })?;
        Ok(Client {
            http,
            base: format!("{scheme}://{host}/v2/{}", reference.repository),
            hostport,
            reference: reference.clone(),
            creds,
            push,
            authz: Mutex::new(None),
        })
    }

    fn net_err(&self, e: reqwest::Error) -> Error {
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        Error::Unreachable {
            host: self.hostport.clone(),
            detail,
        }
    }

    fn current_authz(&self) -> Option<String> {
        self.authz.lock().map(|g| g.clone()).unwrap_or(None)
    }

    /// Sends a request; on 401 obtains credentials per the challenge and retries once.
    async fn send(&self, what: &str, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        let with_auth = |rb: RequestBuilder| match self.current_authz() {
            Some(a) => rb.header(header::AUTHORIZATION, a),
            None => rb,
        };
        let resp = with_auth(build())
            .send()
            .await
            .map_err(|e| self.net_err(e))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return self.check(resp, what).await;
        }
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        self.authenticate(&challenge, what).await?;
        let resp = with_auth(build())
            .send()
            .await
            .map_err(|e| self.net_err(e))?;
        self.check(resp, what).await
    }

    async fn authenticate(&self, challenge: &str, what: &str) -> Result<()> {
        let unauthorized = |detail: String| Error::Unauthorized {
            host: self.hostport.clone(),
            what: what.into(),
            detail,
        };
        let (scheme, params) = crate::auth::parse_challenge(challenge);
        let basic = self.creds.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let value = match scheme.as_str() {
            "basic" => basic.ok_or_else(|| {
                unauthorized(
                    "the registry wants a username and password and none were found".into(),
                )
            })?,
            "bearer" => {
                let realm = params
                    .get("realm")
                    .ok_or_else(|| unauthorized("Bearer challenge without a realm".into()))?;
                let actions = if self.push { "pull,push" } else { "pull" };
                let scope = params.get("scope").cloned().unwrap_or_else(|| {
                    format!("repository:{}:{actions}", self.reference.repository)
                });
                let mut q: Vec<(&str, String)> = vec![("scope", scope)];
                if let Some(s) = params.get("service") {
                    q.push(("service", s.clone()));
                }
                let mut rb = self.http.get(realm).query(&q);
                if let Some(b) = &basic {
                    rb = rb.header(header::AUTHORIZATION, b);
                }
                let resp = rb.send().await.map_err(|e| self.net_err(e))?;
                if !resp.status().is_success() {
                    return Err(unauthorized(format!(
                        "token endpoint {realm} answered {}",
                        resp.status()
                    )));
                }
                #[derive(serde::Deserialize)]
                struct Tok {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Tok = resp
                    .json()
                    .await
                    .map_err(|e| unauthorized(format!("bad token response: {e}")))?;
                let t = t
                    .token
                    .or(t.access_token)
                    .ok_or_else(|| unauthorized("token response has no token".into()))?;
                format!("Bearer {t}")
            }
            _ => {
                return Err(unauthorized(format!(
                    "unsupported authentication challenge {challenge:?}"
                )))
            }
        };
        if let Ok(mut g) = self.authz.lock() {
            *g = Some(value);
        }
        Ok(())
    }

    async fn check(&self, resp: Response, what: &str) -> Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let detail = registry_message(&body).unwrap_or_else(|| body.chars().take(300).collect());
        Err(match status {
            StatusCode::NOT_FOUND => Error::NotFound {
                what: format!("{what} ({detail})"),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Unauthorized {
                host: self.hostport.clone(),
                what: what.into(),
                detail,
            },
            s => Error::Registry {
                host: self.hostport.clone(),
                what: what.into(),
                status: s.as_u16(),
                detail,
            },
        })
    }

    /// Fetches a manifest (or index) by tag or digest: `(body, media type)`. The body is
    /// verified against the digest when the reference is a digest.
    pub async fn manifest(&self, reference: &str) -> Result<(Vec<u8>, String)> {
        let what = format!(
            "manifest {}/{}:{reference}",
            self.reference.registry, self.reference.repository
        )
        .replace(":sha256:", "@sha256:");
        let url = format!("{}/manifests/{reference}", self.base);
        let accept = spec::MANIFEST_TYPES.join(", ");
        let resp = self
            .send(&what, || {
                self.http.get(&url).header(header::ACCEPT, &accept)
            })
            .await?;
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(|e| self.net_err(e))?);
            if body.len() > MAX_MANIFEST {
                return Err(Error::InvalidImage(format!(
                    "{what} is larger than {MAX_MANIFEST} bytes"
                )));
            }
        }
        if reference.starts_with("sha256:") {
            digest::check(|| what.clone(), reference, &digest::sha256(&body))?;
        }
        let mt = spec::manifest_media_type(ct.as_deref(), &body)?;
        Ok((body, mt))
    }

    /// Downloads a blob to `dest`, verifying size and digest while it streams.
    pub async fn download(
        &self,
        desc: &Descriptor,
        what: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<()> {
        let what = format!("{what} {}", desc.digest);
        let url = format!("{}/blobs/{}", self.base, desc.digest);
        let resp = self.send(&what, || self.http.get(&url)).await?;
        let mut f = tokio::fs::File::create(dest)
            .await
            .map_err(|e| Error::io("creating", dest, e))?;
        let mut h = Hasher::default();
        let mut n = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.net_err(e))?;
            n += chunk.len() as u64;
            if n > desc.size {
                return Err(Error::DigestMismatch {
                    what: format!("{what} (size)"),
                    expected: format!("{} bytes", desc.size),
                    actual: format!("more than {} bytes", desc.size),
                });
            }
            h.update(&chunk);
            f.write_all(&chunk)
                .await
                .map_err(|e| Error::io("writing", dest, e))?;
            progress.advance(chunk.len() as u64);
        }
        f.flush().await.map_err(|e| Error::io("writing", dest, e))?;
        digest::check(|| what.clone(), &desc.digest, &h.finish())?;
        if n != desc.size {
            return Err(Error::DigestMismatch {
                what: format!("{what} (size)"),
                expected: format!("{} bytes", desc.size),
                actual: format!("{n} bytes"),
            });
        }
        Ok(())
    }

    /// Uploads a blob unless the registry has it (monolithic: POST, then PUT ?digest=).
    pub async fn upload(&self, digest: &str, data: Vec<u8>) -> Result<()> {
        let what = format!("blob {digest}");
        let head = format!("{}/blobs/{digest}", self.base);
        match self.send(&what, || self.http.head(&head)).await {
            Ok(_) => return Ok(()),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let post = format!("{}/blobs/uploads/", self.base);
        let resp = self
            .send(&what, || {
                self.http
                    .request(Method::POST, &post)
                    .header(header::CONTENT_LENGTH, 0)
            })
            .await?;
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Registry {
                host: self.hostport.clone(),
                what: what.clone(),
                status: resp.status().as_u16(),
                detail: "upload started without a Location header".into(),
            })?;
        let mut url = resp.url().join(loc).map_err(|e| Error::Registry {
            host: self.hostport.clone(),
            what: what.clone(),
            status: 0,
            detail: format!("bad upload location {loc:?}: {e}"),
        })?;
        url.query_pairs_mut().append_pair("digest", digest);
        let body = bytes::Bytes::from(data);
        self.send(&what, || {
            self.http
                .put(url.clone())
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone())
        })
        .await?;
        Ok(())
    }

    /// Puts a manifest under a tag or digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        body: Vec<u8>,
    ) -> Result<()> {
        let what = format!(
            "manifest {}/{}:{reference}",
            self.reference.registry, self.reference.repository
        );
        let url = format!("{}/manifests/{reference}", self.base);
        let body = bytes::Bytes::from(body);
        self.send(&what, || {
            self.http
                .put(&url)
                .header(header::CONTENT_TYPE, media_type)
                .body(body.clone())
        })
        .await?;
        Ok(())
    }
}

/// The first `message` of a distribution error body.
fn registry_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let e = v.get("errors")?.get(0)?;
    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
    let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
    Some(format!("{code}: {msg}"))
}

/// Pushes the image(s) of an OCI layout to a registry: every blob, child manifests of an index
/// by digest, then the selected manifest under the reference's tag (or digest). The manifest is
/// chosen like an import does: by ref name == tag if present, else the only one. Returns the
/// pushed top-level manifest digest.
pub async fn push_layout(
    layout_dir: &Path,
    reference: &Reference,
    opts: &ImportOptions,
) -> Result<String> {
    let client = Client::new(reference, opts, true)?;
    let index = crate::layout::read_index(layout_dir)?;
    let by_tag: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            reference.tag.is_some() && d.annotations.get(spec::REF_NAME) == reference.tag.as_ref()
        })
        .collect();
    let desc = match (by_tag.first(), index.manifests.len()) {
        (Some(d), _) => (*d).clone(),
        (None, 1) => index.manifests[0].clone(),
        _ => {
            return Err(Error::NotFound {
                what: format!(
                    "a manifest for {reference} in {} (give it the ref name of the tag)",
                    layout_dir.display()
                ),
            })
        }
    };
    push_manifest(&client, layout_dir, &desc, 0).await?;
    let body = crate::layout::read_blob_verified(layout_dir, &desc, "manifest")?;
    client
        .put_manifest(reference.manifest_ref(), &desc.media_type, body)
        .await?;
    Ok(desc.digest)
}

async fn push_manifest(client: &Client, dir: &Path, desc: &Descriptor, depth: u32) -> Result<()> {
    if depth > 3 {
        return Err(Error::InvalidImage(
            "image indexes nested too deeply".into(),
        ));
    }
    let body = crate::layout::read_blob_verified(dir, desc, "manifest")?;
    let mt = spec::manifest_media_type(Some(&desc.media_type), &body)?;
    if spec::is_index(&mt) {
        let idx: spec::Index =
            serde_json::from_slice(&body).map_err(|e| Error::InvalidImage(e.to_string()))?;
        for m in &idx.manifests {
            Box::pin(push_manifest(client, dir, m, depth + 1)).await?;
            let b = crate::layout::read_blob_verified(dir, m, "manifest")?;
            client.put_manifest(&m.digest, &m.media_type, b).await?;
        }
        return Ok(());
    }
    let m: spec::Manifest =
        serde_json::from_slice(&body).map_err(|e| Error::InvalidImage(e.to_string()))?;
    for b in std::iter::once(&m.config).chain(m.layers.iter()) {
        digest::validate(&b.digest)?;
        let p = crate::layout::blob_path(dir, &b.digest);
        let data = tokio::fs::read(&p)
            .await
            .map_err(|e| Error::io("reading", &p, e))?;
        client.upload(&b.digest, data).await?;
    }
    Ok(())
}
