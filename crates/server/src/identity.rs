//! Workload identity: the daemon as an OIDC issuer. It signs short-lived JWTs (RS256, the one
//! algorithm AWS, Entra, GCP and Vault all accept) that say which group and sandbox asked, and
//! publishes the discovery document and the JWKS that relying parties verify them with.
//!
//! Keys: RSA-2048, in the store (states, and the PKCS#8 private halves sealed with the
//! sealing key, so that every node of a fleet signs with the same keys and a database backup
//! alone cannot sign). Homes from before keep theirs in `MOAT_HOME/identity/keys/<kid>.pk8`
//! until the first start moves them into the store. There is always a *pending* key, published but
//! not signing, so that a rotation activates a key relying parties have had the chance to
//! fetch; the key it replaces is *retired*: published, not signing, until every token it signed
//! has expired. Signing is ring's (constant time); the `rsa` crate only generates keys.
//!
//! A mint is decided here from the store only: the sandbox (it must exist and run), its
//! group's `identity` settings (enabled, the audience allowlisted, the lifetime bounded) and
//! the uids that make a subject never reused. Callers say which sandbox asks from how the
//! request reached them (an API key's route, a stack's control connection), never from
//! anything the guest says. Every mint and refusal is audited and counted; no token is ever
//! logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::{
    quote, rfc3339, validate_audience, IdentityDelivery, IdentityKey, IdentityKeys,
    IdentityOutcome, IdentitySubject, IdentityToken, Jwk, Jwks, KeyState, OpenIdConfiguration,
    SandboxState, MAX_TOKEN_TTL_S, MIN_TOKEN_TTL_S,
};
use crate::error::{Error, Result};
use crate::metrics::{self, Metrics};
use crate::store::{KeyRow, NewIdentityEvent, Store};

/// RSA modulus size of new keys.
const KEY_BITS: usize = 2048;
/// How long a retired key stays published: the longest token lifetime plus the 5 minutes of
/// clock leeway relying parties allow (AWS STS documents 5).
pub const RETIRED_KEPT_S: i64 = MAX_TOKEN_TTL_S as i64 + 300;
/// `Cache-Control` of the issuer documents: relying parties refetch within 5 minutes, so a
/// new pending key is seen long before a rotation an operator would do.
pub const CACHE_CONTROL: &str = "public, max-age=300";

/// The claims beyond the registered ones, for `claims_supported`.
const MOAT_CLAIMS: [&str; 8] = [
    "group",
    "group_uid",
    "sandbox_id",
    "sandbox_uid",
    "incarnation",
    "image_digest",
    "labels",
    "delivery",
];

/// The issuer: its URL, its keys, and what a mint needs (store, metrics).
pub struct Issuer {
    url: String,
    dir: PathBuf,
    store: Store,
    metrics: Arc<Metrics>,
    ring: RwLock<Ring>,
    rotating: tokio::sync::Mutex<()>,
}

/// The keys in force: the signing one, and every published one with its row.
struct Ring {
    active: Arc<Signer>,
    published: Vec<(KeyRow, Jwk)>,
}

struct Signer {
    kid: String,
    pair: RsaKeyPair,
}

/// Who asks for a token, as the caller established it (never from what a guest says).
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub group: String,
    pub sandbox: String,
    pub audience: String,
    pub ttl_s: Option<u64>,
    pub delivery: IdentityDelivery,
    /// The API key that asked (`api` delivery).
    pub key_id: Option<String>,
}

/// Checks an issuer URL (`--issuer-url`): `https://` (or `http://` for tests and private
/// verifiers), a host, no query, fragment or trailing slash: it is compared byte for byte
/// by every relying party, and `/.well-known/…` is appended to it.
pub fn validate_issuer_url(url: &str) -> Result<()> {
    if crate::api::is_http_base_url(url) && !url.ends_with('/') {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid issuer URL {}: expected https://HOST[:PORT][/PATH] (or http://) without a \
             query, fragment or trailing slash",
            quote(url)
        )))
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The JWK of a key pair and its RFC 7638 thumbprint (the `kid`).
fn jwk_of(pair: &RsaKeyPair) -> Jwk {
    let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
    let (n, e) = (B64.encode(&public.n), B64.encode(&public.e));
    // RFC 7638: the required members, in lexicographic order, no whitespace.
    let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
    let kid = B64.encode(Sha256::digest(canonical.as_bytes()));
    Jwk {
        kty: "RSA".into(),
        use_: "sig".into(),
        alg: "RS256".into(),
        kid,
        n,
        e,
    }
}

/// Generates a key: its kid and PKCS#8 private key. Blocking (about a second).
fn generate() -> Result<(String, Vec<u8>)> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, KEY_BITS)
        .map_err(|e| Error::Internal(format!("generating a signing key: {e}")))?;
    let der = key
        .to_pkcs8_der()
        .map_err(|e| Error::Internal(format!("encoding a signing key: {e}")))?;
    let pair = RsaKeyPair::from_pkcs8(der.as_bytes())
        .map_err(|e| Error::Internal(format!("reading back a new signing key: {e}")))?;
    Ok((jwk_of(&pair).kid, der.as_bytes().to_vec()))
}

/// The key pair `kid` from the store, after moving it in from `MOAT_HOME/identity/keys` if an
/// older moat left it there (the file is removed once the store has it, sealed).
fn load(store: &Store, dir: &Path, kid: &str) -> Result<(RsaKeyPair, Jwk)> {
    let der = match store.identity_private_key(kid)? {
        Some(der) => der,
        None => {
            let path = dir.join(format!("{kid}.pk8"));
            let der = std::fs::read(&path).map_err(io(format!(
                "reading signing key {} (restore MOAT_HOME/identity from a backup; without it \
                 no token can be signed)",
                path.display()
            )))?;
            check_kid(&der, kid)?;
            store.adopt_identity_private_key(kid, &der)?;
            std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
            tracing::info!(kid, "identity signing key moved into the store, sealed");
            der
        }
    };
    check_kid(&der, kid)
}

fn check_kid(der: &[u8], kid: &str) -> Result<(RsaKeyPair, Jwk)> {
    let pair = RsaKeyPair::from_pkcs8(der)
        .map_err(|e| Error::Config(format!("signing key {kid}: {e}")))?;
    let jwk = jwk_of(&pair);
    if jwk.kid != kid {
        return Err(Error::Config(format!(
            "signing key {kid} does not match its name (its thumbprint is {})",
            jwk.kid
        )));
    }
    Ok((pair, jwk))
}

impl Issuer {
    /// Opens the issuer of `home`, making its first keys (active and pending) if it has none
    /// and dropping retired keys whose tokens have all expired. Blocking.
    pub fn open(home: &Path, url: String, store: Store, metrics: Arc<Metrics>) -> Result<Issuer> {
        validate_issuer_url(&url)?;
        let dir = home.join("identity").join("keys");
        let rows = store.identity_keys()?;
        // Nodes starting together on a new store may each make one: the store keeps the first.
        for state in [KeyState::Active, KeyState::Pending] {
            if !rows.iter().any(|k| k.state == state) {
                let (kid, der) = generate()?;
                store.insert_identity_key(&kid, state, &der)?;
            }
        }
        let ring = read_ring(&dir, &store)?;
        Ok(Issuer {
            url,
            dir,
            store,
            metrics,
            ring: RwLock::new(ring),
            rotating: tokio::sync::Mutex::new(()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The published public keys: pending, active, and retired ones still needed.
    pub fn jwks(&self) -> Jwks {
        let now = unix_now();
        Jwks {
            keys: self
                .ring()
                .published
                .iter()
                .filter(|(row, _)| !expired(row, now))
                .map(|(_, jwk)| jwk.clone())
                .collect(),
        }
    }

    pub fn discovery(&self) -> OpenIdConfiguration {
        let claims = ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"]
            .into_iter()
            .chain(MOAT_CLAIMS)
            .map(String::from)
            .collect();
        OpenIdConfiguration {
            issuer: self.url.clone(),
            jwks_uri: format!("{}/.well-known/jwks.json", self.url),
            response_types_supported: vec!["id_token".into()],
            subject_types_supported: vec!["public".into()],
            id_token_signing_alg_values_supported: vec!["RS256".into()],
            claims_supported: claims,
        }
    }

    pub fn keys(&self) -> IdentityKeys {
        let now = unix_now();
        IdentityKeys {
            issuer: self.url.clone(),
            keys: self
                .ring()
                .published
                .iter()
                .filter(|(row, _)| !expired(row, now))
                .map(|(row, _)| IdentityKey {
                    kid: row.kid.clone(),
                    state: row.state,
                    created_at: rfc3339(row.created_at),
                    activated_at: row.activated_at.map(rfc3339),
                    retired_at: row.retired_at.map(rfc3339),
                    removed_after: row.retired_at.map(|t| rfc3339(t + RETIRED_KEPT_S)),
                })
                .collect(),
        }
    }

    /// Reads the keys again when the store's differ from the ones in force: another node
    /// of the fleet rotated them. Blocking; called on the node's lease timer.
    pub fn refresh(&self) -> Result<()> {
        let rows = self.store.identity_keys()?;
        let same = {
            let ring = self.ring();
            rows.len() == ring.published.len()
                && rows
                    .iter()
                    .zip(&ring.published)
                    .all(|(a, (b, _))| a.kid == b.kid && a.state == b.state)
        };
        if same {
            return Ok(());
        }
        let ring = read_ring(&self.dir, &self.store)?;
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
        tracing::info!(kid = %self.ring().active.kid, "identity signing keys changed by another node");
        Ok(())
    }

    /// Rotates: the pending key (published since the last rotation or the first start) signs
    /// from now on, the active one retires, and a new pending key is published.
    pub async fn rotate(self: &Arc<Self>) -> Result<IdentityKeys> {
        let _one = self.rotating.lock().await;
        let me = self.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let (next, der) = generate()?;
            me.store.rotate_identity_keys(&next, &der)?;
            let ring = read_ring(&me.dir, &me.store)?;
            *me.ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
            Ok(())
        })
        .await
        .map_err(Error::task("rotating the signing keys"))??;
        tracing::info!(kid = %self.ring().active.kid, "identity signing key rotated");
        Ok(self.keys())
    }

    /// Signs `claims` with the active key: the compact JWS and the kid.
    fn sign(&self, claims: &serde_json::Value) -> Result<(String, String)> {
        let signer = self.ring().active.clone();
        let header = json!({"alg": "RS256", "kid": signer.kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut sig = vec![0; signer.pair.public().modulus_len()];
        signer
            .pair
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| Error::Internal("signing a token failed".into()))?;
        Ok((format!("{input}.{}", B64.encode(sig)), signer.kid.clone()))
    }

    /// Mints a token for `req` or refuses it (see the module header); either is audited.
    pub async fn mint(&self, req: MintRequest) -> Result<IdentityToken> {
        let start = Instant::now();
        match self.decide_and_sign(&req).await {
            Ok((token, subject)) => {
                let group = req.group.as_str();
                self.metrics.count(
                    metrics::IDENTITY_MINTED,
                    &[("group", group), ("delivery", req.delivery.as_str())],
                );
                self.metrics
                    .observe_op(metrics::IDENTITY_MINT, &[], start.elapsed());
                self.audit(NewIdentityEvent {
                    group: req.group.clone(),
                    sandbox: req.sandbox.clone(),
                    outcome: IdentityOutcome::Minted,
                    delivery: req.delivery,
                    audience: req.audience.clone(),
                    subject: Some(subject),
                    jti: Some(token.jti.clone()),
                    kid: Some(token.kid.clone()),
                    expires_on: Some(token.expires_on),
                    reason: None,
                    key_id: req.key_id.clone(),
                })
                .await;
                Ok(token)
            }
            Err((reason, e)) => {
                self.metrics.count(
                    metrics::IDENTITY_REFUSED,
                    &[("group", req.group.as_str()), ("reason", reason)],
                );
                self.audit(NewIdentityEvent {
                    group: req.group.clone(),
                    sandbox: req.sandbox.clone(),
                    outcome: IdentityOutcome::Refused,
                    delivery: req.delivery,
                    audience: req.audience.clone(),
                    subject: None,
                    jti: None,
                    kid: None,
                    expires_on: None,
                    reason: Some(e.to_string()),
                    key_id: req.key_id.clone(),
                })
                .await;
                Err(e)
            }
        }
    }

    /// Audits and counts a request the in-guest endpoint of sandbox `sandbox` refused by
    /// itself (a wrong header, a forwarded request, over its rate), as its stack reported it.
    pub async fn refused_in_guest(
        &self,
        group: &str,
        sandbox: &str,
        audience: String,
        reason: String,
    ) {
        self.metrics.count(
            metrics::IDENTITY_REFUSED,
            &[("group", group), ("reason", "endpoint")],
        );
        self.audit(NewIdentityEvent {
            group: group.to_string(),
            sandbox: sandbox.to_string(),
            outcome: IdentityOutcome::Refused,
            delivery: IdentityDelivery::Endpoint,
            audience,
            subject: None,
            jti: None,
            kid: None,
            expires_on: None,
            reason: Some(reason),
            key_id: None,
        })
        .await;
    }

    async fn audit(&self, e: NewIdentityEvent) {
        if let Err(err) = self.store.insert_identity_event(e).await {
            tracing::error!(error = %err, "storing an identity audit event");
        }
    }

    /// The decision; a refusal comes with its metric reason.
    async fn decide_and_sign(
        &self,
        req: &MintRequest,
    ) -> std::result::Result<(IdentityToken, String), (&'static str, Error)> {
        let internal = |e: Error| ("internal", e);
        let sb = self
            .store
            .get_sandbox(&req.sandbox)
            .await
            .map_err(internal)?
            .filter(|s| s.group == req.group)
            .ok_or_else(|| {
                (
                    "no_sandbox",
                    Error::NotFound(format!(
                        "no sandbox {} in group {}: a deleted sandbox mints nothing",
                        quote(&req.sandbox),
                        quote(&req.group)
                    )),
                )
            })?;
        if sb.state != SandboxState::Running {
            return Err((
                "not_running",
                Error::Conflict(format!(
                    "sandbox {} is {}: only a running sandbox gets tokens",
                    sb.id,
                    sb.state.as_str()
                )),
            ));
        }
        let group = self
            .store
            .get_group(&req.group)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                (
                    "no_sandbox",
                    Error::NotFound(format!("no sandbox group {}", quote(&req.group))),
                )
            })?;
        let spec = &group.spec.identity;
        if !spec.enabled {
            return Err((
                "disabled",
                Error::Forbidden(format!(
                    "workload identity is not enabled for group {} (identity.enabled)",
                    quote(&req.group)
                )),
            ));
        }
        if req.delivery == IdentityDelivery::Endpoint && !spec.in_guest {
            return Err((
                "in_guest",
                Error::Forbidden(format!(
                    "guest code may not fetch tokens in group {} (identity.in_guest is off)",
                    quote(&req.group)
                )),
            ));
        }
        if let Err(m) = validate_audience(&req.audience) {
            return Err((
                "audience",
                Error::BadRequest(format!("invalid audience {}: {m}", quote(&req.audience))),
            ));
        }
        if !spec.audiences.contains(&req.audience) || req.audience == self.url {
            return Err((
                "audience",
                Error::Forbidden(format!(
                    "audience {} is not allowed for group {}: allowed are {} \
                     (identity.audiences)",
                    quote(&req.audience),
                    quote(&req.group),
                    spec.audiences
                        .iter()
                        .map(|a| quote(a))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            ));
        }
        let ttl = req.ttl_s.unwrap_or(spec.ttl_s);
        if !(MIN_TOKEN_TTL_S..=spec.ttl_s).contains(&ttl) {
            // Within the document's range but above this group's own lifetime: a 422.
            return Err((
                "ttl",
                Error::Unprocessable(format!(
                    "invalid ttl_s {ttl}: allowed is {MIN_TOKEN_TTL_S}–{} seconds (the group's \
                     identity.ttl_s)",
                    spec.ttl_s
                )),
            ));
        }
        let ids = self
            .store
            .workload_ids(&req.group, &sb.id)
            .await
            .map_err(internal)?;
        // Segments are a DNS label and hex: no `:` can appear inside one.
        let mut subject = format!("group:{}:{}", req.group, ids.group_uid);
        if spec.subject == IdentitySubject::Sandbox {
            subject.push_str(&format!(":sandbox:{}", ids.sandbox_uid));
        }
        let now = unix_now();
        let exp = now + ttl as i64;
        let mut jti = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut jti);
        let jti = hex::encode(jti);
        let claims = json!({
            "iss": self.url,
            "sub": subject,
            "aud": req.audience,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": jti,
            "group": req.group,
            "group_uid": ids.group_uid,
            "sandbox_id": sb.id,
            "sandbox_uid": ids.sandbox_uid,
            "incarnation": ids.incarnation,
            "image_digest": sb.image,
            "labels": sb.labels,
            "delivery": req.delivery.as_str(),
        });
        let (token, kid) = self.sign(&claims).map_err(internal)?;
        Ok((
            IdentityToken {
                token,
                token_type: "Bearer".into(),
                audience: req.audience.clone(),
                subject: subject.clone(),
                issuer: self.url.clone(),
                jti,
                kid,
                expires_on: exp,
                expires_at: rfc3339(exp),
            },
            subject,
        ))
    }
}

/// A retired key whose every token has expired.
fn expired(row: &KeyRow, now: i64) -> bool {
    row.retired_at.is_some_and(|t| now > t + RETIRED_KEPT_S)
}

/// Reads the keys in force from the store and their files, dropping (row and file) retired
/// keys no token needs any more.
fn read_ring(dir: &Path, store: &Store) -> Result<Ring> {
    let now = unix_now();
    let mut active = None;
    let mut published = Vec::new();
    for row in store.identity_keys()? {
        if expired(&row, now) {
            let _ = std::fs::remove_file(dir.join(format!("{}.pk8", row.kid)));
            store.delete_identity_key(&row.kid)?;
            continue;
        }
        let (pair, jwk) = load(store, dir, &row.kid)?;
        if row.state == KeyState::Active {
            active = Some(Arc::new(Signer {
                kid: row.kid.clone(),
                pair,
            }));
        }
        published.push((row, jwk));
    }
    let active =
        active.ok_or_else(|| Error::Internal("the store has no active signing key".into()))?;
    Ok(Ring { active, published })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GroupSpec, IdentitySpec, Sandbox};
    use ring::signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};

    /// [`Issuer::open`] on a thread of its own: it reads the store with blocking calls, which
    /// must not run on an async test's executor thread (the PostgreSQL client panics there).
    fn open_issuer(home: &Path, url: String, store: Store) -> Result<Issuer> {
        std::thread::scope(|s| {
            s.spawn(|| Issuer::open(home, url, store, Arc::default()))
                .join()
                .unwrap()
        })
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        home: PathBuf,
        store: Store,
        issuer: Arc<Issuer>,
    }

    async fn fixture(identity: IdentitySpec) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_path_buf();
        let store = crate::store::test_store(&home);
        let spec = GroupSpec {
            identity,
            ..Default::default()
        };
        store.put_group("web", &spec).await.unwrap();
        let sb = Sandbox {
            id: "sb-000000000001".into(),
            group: "web".into(),
            state: SandboxState::Running,
            reason: None,
            image: "sha256:abc".into(),
            tier: moat_vm::Tier::S,
            env: Default::default(),
            labels: [("team".to_string(), "ml".to_string())].into(),
            created_at: String::new(),
            updated_at: String::new(),
            last_activity_at: None,
            node: None,
            health: None,
        };
        store.insert_sandbox(&sb).await.unwrap();
        let issuer =
            Arc::new(open_issuer(&home, "https://id.example.com".into(), store.clone()).unwrap());
        Fixture {
            _dir: dir,
            home,
            store,
            issuer,
        }
    }

    fn enabled() -> IdentitySpec {
        IdentitySpec {
            enabled: true,
            audiences: vec!["sts.amazonaws.com".into()],
            ..Default::default()
        }
    }

    fn ask(aud: &str) -> MintRequest {
        MintRequest {
            group: "web".into(),
            sandbox: "sb-000000000001".into(),
            audience: aud.into(),
            ttl_s: None,
            delivery: IdentityDelivery::Api,
            key_id: None,
        }
    }

    /// Verifies `token` against `jwks` as a relying party would: by its kid, RS256.
    fn verify(token: &str, jwks: &Jwks) -> serde_json::Value {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header.as_object().unwrap().len(), 3, "alg, kid, typ only");
        let jwk = jwks
            .keys
            .iter()
            .find(|k| k.kid == header["kid"].as_str().unwrap())
            .expect("the kid is published");
        let key = RsaPublicKeyComponents {
            n: B64.decode(&jwk.n).unwrap(),
            e: B64.decode(&jwk.e).unwrap(),
        };
        key.verify(
            &RSA_PKCS1_2048_8192_SHA256,
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &B64.decode(parts[2]).unwrap(),
        )
        .expect("the signature verifies");
        serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn tokens_carry_the_claims_and_verify() {
        let f = fixture(enabled()).await;
        let t = f.issuer.mint(ask("sts.amazonaws.com")).await.unwrap();
        let c = verify(&t.token, &f.issuer.jwks());
        assert_eq!(c["iss"], "https://id.example.com");
        assert_eq!(c["aud"], "sts.amazonaws.com");
        assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
        assert_eq!(c["nbf"], c["iat"]);
        assert_eq!(c["group"], "web");
        assert_eq!(c["sandbox_id"], "sb-000000000001");
        assert_eq!(c["image_digest"], "sha256:abc");
        assert_eq!(c["labels"]["team"], "ml");
        assert_eq!(c["delivery"], "api");
        let gid = c["group_uid"].as_str().unwrap();
        assert_eq!(c["sub"], format!("group:web:{gid}"));
        assert_eq!(c["jti"], t.jti);
        assert_eq!(t.subject, c["sub"].as_str().unwrap());
        let t2 = f.issuer.mint(ask("sts.amazonaws.com")).await.unwrap();
        assert_ne!(t.jti, t2.jti);
        // The private key is in the store, sealed: the row alone does not hold it, and the
        // home has no key file.
        let kid = t.kid.clone();
        let der = std::thread::scope(|s| {
            s.spawn(|| f.store.identity_private_key(&kid).unwrap().unwrap())
                .join()
                .unwrap()
        });
        let sealed: Vec<u8> = f.store.with_conn(|c| {
            c.query_row(
                "SELECT private_key FROM identity_keys WHERE kid = ?1",
                [&kid],
                |r| r.get(0),
            )
            .unwrap()
        });
        assert!(!sealed.windows(64).any(|w| der.windows(64).any(|d| d == w)));
        assert!(!f.home.join(format!("identity/keys/{kid}.pk8")).exists());
        let events = f
            .store
            .list_identity_events("web", None, None, 10)
            .await
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].jti.as_deref(), Some(t.jti.as_str()));
        let text = serde_json::to_string(&events).unwrap();
        assert!(!text.contains(&t.token), "no token in the audit");
    }

    #[tokio::test]
    async fn refusals_say_why_and_are_audited() {
        let f = fixture(enabled()).await;
        let e = f.issuer.mint(ask("api://other")).await.unwrap_err();
        assert!(matches!(e, Error::Forbidden(_)), "{e}");
        assert!(e.to_string().contains("\"sts.amazonaws.com\""), "{e}");
        let mut long = ask("sts.amazonaws.com");
        long.ttl_s = Some(601);
        // Within the document's range, above the group's: a 422.
        assert!(matches!(
            f.issuer.mint(long).await,
            Err(Error::Unprocessable(_))
        ));
        let mut other = ask("sts.amazonaws.com");
        other.group = "other".into();
        assert!(matches!(
            f.issuer.mint(other).await,
            Err(Error::NotFound(_))
        ));
        // Suspended, then deleted: nothing.
        f.store
            .set_sandbox_state("sb-000000000001", SandboxState::Suspended, None)
            .await
            .unwrap();
        assert!(matches!(
            f.issuer.mint(ask("sts.amazonaws.com")).await,
            Err(Error::Conflict(_))
        ));
        f.store.delete_sandbox("sb-000000000001").await.unwrap();
        assert!(matches!(
            f.issuer.mint(ask("sts.amazonaws.com")).await,
            Err(Error::NotFound(_))
        ));
        let events = f
            .store
            .list_identity_events("web", None, None, 10)
            .await
            .unwrap();
        assert_eq!(events.len(), 4);
        assert!(events
            .iter()
            .all(|e| e.outcome == IdentityOutcome::Refused && e.reason.is_some()));

        let off = fixture(IdentitySpec::default()).await;
        let e = off.issuer.mint(ask("sts.amazonaws.com")).await.unwrap_err();
        assert!(e.to_string().contains("not enabled"), "{e}");
    }

    #[tokio::test]
    async fn per_sandbox_subjects() {
        let f = fixture(IdentitySpec {
            subject: IdentitySubject::Sandbox,
            ..enabled()
        })
        .await;
        let t = f.issuer.mint(ask("sts.amazonaws.com")).await.unwrap();
        let c = verify(&t.token, &f.issuer.jwks());
        let want = format!(
            "group:web:{}:sandbox:{}",
            c["group_uid"].as_str().unwrap(),
            c["sandbox_uid"].as_str().unwrap()
        );
        assert_eq!(c["sub"], want);
        assert!(want.len() <= 127, "GCP's google.subject limit");
    }

    /// The pending key is published before it signs; after a rotation the old key still
    /// verifies the tokens it signed, and a restart reads the same keys back.
    #[tokio::test]
    async fn rotation_publishes_first_and_keeps_old_tokens_verifiable() {
        let f = fixture(enabled()).await;
        let before = f.issuer.jwks();
        assert_eq!(before.keys.len(), 2, "active and pending");
        let keys = f.issuer.keys();
        let pending = keys
            .keys
            .iter()
            .find(|k| k.state == KeyState::Pending)
            .unwrap()
            .kid
            .clone();
        let old = f.issuer.mint(ask("sts.amazonaws.com")).await.unwrap();
        assert_ne!(old.kid, pending);
        f.issuer.rotate().await.unwrap();
        let after = f.issuer.jwks();
        assert_eq!(after.keys.len(), 3, "retired, active, new pending");
        verify(&old.token, &after);
        let new = f.issuer.mint(ask("sts.amazonaws.com")).await.unwrap();
        assert_eq!(new.kid, pending, "the key published earlier signs now");
        verify(&new.token, &before);
        let again = open_issuer(&f.home, "https://id.example.com".into(), f.store.clone()).unwrap();
        assert_eq!(again.jwks(), after);
        // A retired key whose tokens have all expired leaves the JWKS, row and file.
        let retired = old.kid.clone();
        std::thread::scope(|s| {
            s.spawn(|| f.store.age_retired_keys(RETIRED_KEPT_S + 1))
                .join()
        })
        .unwrap()
        .unwrap();
        let pruned =
            open_issuer(&f.home, "https://id.example.com".into(), f.store.clone()).unwrap();
        assert_eq!(pruned.jwks().keys.len(), 2);
        assert!(!f.home.join(format!("identity/keys/{retired}.pk8")).exists());
    }

    /// A home from before the store kept the private keys: the key file is moved into the
    /// store (sealed) at the next start and removed, and the issuer signs with the same key.
    #[test]
    fn key_files_of_an_older_home_move_into_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_store(dir.path());
        let url = "https://id.example.com".to_string();
        let first = open_issuer(dir.path(), url.clone(), store.clone()).unwrap();
        let kid = first.ring().active.kid.clone();
        let der = std::thread::scope(|s| {
            s.spawn(|| store.identity_private_key(&kid).unwrap().unwrap())
                .join()
                .unwrap()
        });
        // What an older moat left: the file, and a row without the key.
        let keys = dir.path().join("identity/keys");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(keys.join(format!("{kid}.pk8")), &der).unwrap();
        store.with_conn(|c| {
            c.execute(
                "UPDATE identity_keys SET private_key = NULL WHERE kid = ?1",
                [&kid],
            )
            .unwrap()
        });
        let again = open_issuer(dir.path(), url, store.clone()).unwrap();
        assert_eq!(again.ring().active.kid, kid);
        assert_eq!(again.jwks(), first.jwks());
        assert!(!keys.join(format!("{kid}.pk8")).exists());
        let moved = std::thread::scope(|s| {
            s.spawn(|| store.identity_private_key(&kid).unwrap())
                .join()
                .unwrap()
        });
        assert_eq!(moved, Some(der));
    }

    #[test]
    fn issuer_urls() {
        for ok in [
            "https://id.example.com",
            "http://127.0.0.1:7070",
            "https://x.io/moat",
        ] {
            validate_issuer_url(ok).unwrap();
        }
        for bad in [
            "",
            "id.example.com",
            "https://",
            "https://x/",
            "https://x?a",
            "https://x#f",
            "https://a b",
            "ftp://x",
        ] {
            assert!(validate_issuer_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn discovery_names_the_issuer_and_its_jwks() {
        let f = fixture(enabled()).await;
        let d = f.issuer.discovery();
        assert_eq!(d.issuer, "https://id.example.com");
        assert_eq!(d.jwks_uri, "https://id.example.com/.well-known/jwks.json");
        assert_eq!(d.id_token_signing_alg_values_supported, ["RS256"]);
        assert!(d.claims_supported.iter().any(|c| c == "sandbox_uid"));
        let e = open_issuer(&f.home, "https://x/".into(), f.store.clone())
            .err()
            .unwrap();
        assert!(e.to_string().contains("trailing slash"), "{e}");
    }
}
