//! Encryption at rest for group secrets and the identity signing keys: ChaCha20-Poly1305
//! (ring) under one 32-byte key in `MOAT_HOME/secrets.key` (0600, written once, atomically and
//! durably). Each value is sealed with a fresh random nonce and what it is (the group and
//! secret name, the key's kid) as associated data, so a sealed value copied to another row
//! does not open. Without the key file the database's secrets and signing keys are unusable:
//! back it up apart from the database. Every node of a fleet has the same file (docs/FLEET.md):
//! the store holds a check value sealed with it, so that a node with another key refuses to
//! start instead of sealing rows the others cannot open.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, Result};

/// The first byte of every sealed value: the format, so that a later one can be told apart.
const FORMAT: u8 = 1;
const KEY_LEN: usize = 32;

/// What the check value of a store is sealed for, and its plaintext.
const CHECK_AAD: &[u8] = b"moat-seal-check";
const CHECK_PLAIN: &[u8] = b"moat sealing key check v1";

/// The key, read (or created) on first use.
pub(super) struct Sealer {
    path: PathBuf,
    key: OnceLock<LessSafeKey>,
    node_key: OnceLock<ring::hmac::Key>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("path", &self.path).finish()
    }
}

impl Sealer {
    pub(super) fn new(path: PathBuf) -> Sealer {
        Sealer {
            path,
            key: OnceLock::new(),
            node_key: OnceLock::new(),
        }
    }

    fn key(&self) -> Result<&LessSafeKey> {
        if let Some(k) = self.key.get() {
            return Ok(k);
        }
        let bytes = load_or_create(&self.path)?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| Error::Internal("the secrets key has the wrong length".into()))?;
        Ok(self.key.get_or_init(|| LessSafeKey::new(key)))
    }

    /// The key of node-to-node credentials (`migrate.rs`): derived from the sealing key, the
    /// one secret every node of a fleet has, under a label of its own, so that a credential
    /// reveals nothing about the sealing key and nothing sealed can pass for a credential.
    pub(super) fn node_key(&self) -> Result<&ring::hmac::Key> {
        if let Some(k) = self.node_key.get() {
            return Ok(k);
        }
        let bytes = load_or_create(&self.path)?;
        let root = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
        let derived = ring::hmac::sign(&root, b"moat node-to-node credential key v1");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
        Ok(self.node_key.get_or_init(|| key))
    }

    /// `value` sealed for secret `name` of `group`.
    pub(super) fn seal(&self, group: &str, name: &str, value: &str) -> Result<Vec<u8>> {
        self.seal_bytes(&aad(group, name), value.as_bytes())
    }

    /// The value sealed by [`Sealer::seal`] for the same group and name.
    pub(super) fn open(&self, group: &str, name: &str, sealed: &[u8]) -> Result<String> {
        let broken = || {
            Error::Internal(format!(
                "secret {name:?} of group {group:?} does not decrypt with {} (another \
                 MOAT_HOME's key, or a damaged row): set it again",
                self.path.display()
            ))
        };
        let plain = self
            .open_bytes(&aad(group, name), sealed)?
            .ok_or_else(broken)?;
        String::from_utf8(plain).map_err(|_| broken())
    }

    /// The PKCS#8 private key of identity signing key `kid`, sealed.
    pub(super) fn seal_signing_key(&self, kid: &str, der: &[u8]) -> Result<Vec<u8>> {
        self.seal_bytes(&signing_aad(kid), der)
    }

    /// The private key sealed by [`Sealer::seal_signing_key`] for `kid`.
    pub(super) fn open_signing_key(&self, kid: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        self.open_bytes(&signing_aad(kid), sealed)?.ok_or_else(|| {
            Error::Config(format!(
                "identity signing key {kid} in the store does not decrypt with {} (another \
                 node's key, or a damaged row)",
                self.path.display()
            ))
        })
    }

    /// A new check value: the store keeps it to tell whether a node has its key.
    pub(super) fn check_value(&self) -> Result<Vec<u8>> {
        self.seal_bytes(CHECK_AAD, CHECK_PLAIN)
    }

    /// Whether `check` was made by [`Sealer::check_value`] with this key.
    pub(super) fn verify_check(&self, check: &[u8]) -> Result<bool> {
        Ok(self.open_bytes(CHECK_AAD, check)?.as_deref() == Some(CHECK_PLAIN))
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    fn seal_bytes(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        let key = self.key()?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Internal("no randomness for a nonce".into()))?;
        let mut data = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut data,
        )
        .map_err(|_| Error::Internal("sealing a value failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + data.len());
        out.push(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// The plaintext, or `None` when `sealed` does not open with this key and `aad` (an error
    /// only when there is no key).
    fn open_bytes(&self, aad: &[u8], sealed: &[u8]) -> Result<Option<Vec<u8>>> {
        let key = self.key()?;
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != FORMAT {
            return Ok(None);
        }
        let Ok(nonce) = Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN]) else {
            return Ok(None);
        };
        let mut data = sealed[1 + NONCE_LEN..].to_vec();
        Ok(key
            .open_in_place(nonce, Aad::from(aad), &mut data)
            .ok()
            .map(|p| p.to_vec()))
    }
}

fn aad(group: &str, name: &str) -> Vec<u8> {
    format!("moat-secret\0{group}\0{name}").into_bytes()
}

fn signing_aad(kid: &str) -> Vec<u8> {
    format!("moat-identity-key\0{kid}").into_bytes()
}

/// Reads the key file, or creates it: written to a temporary file (0600) and fsynced, then
/// linked into place, which fails if another process won the race (its key is read then),
/// then the directory fsynced. A key file readable by others is refused.
fn load_or_create(path: &Path) -> Result<[u8; KEY_LEN]> {
    match read_key(path) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let dir = path
        .parent()
        .ok_or_else(|| Error::Config(format!("{} has no directory", path.display())))?;
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| Error::Internal("no randomness for the secrets key".into()))?;
    let tmp = dir.join(format!(".secrets.key.{}", std::process::id()));
    let io = |what: &str| {
        let what = format!("{what} {}", tmp.display());
        move |e| Error::io(what, e)
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("creating"))?;
    f.write_all(&key).map_err(io("writing"))?;
    f.sync_all().map_err(io("syncing"))?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(path),
        Err(e) => Err(Error::io(format!("creating {}", path.display()), e)),
    }
}

fn read_key(path: &Path) -> Result<[u8; KEY_LEN]> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::Config(format!(
            "{} is readable by others (mode {:o}): it must be 0600 (chmod 600 it)",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        Error::Config(format!(
            "{} has {} bytes: a secrets key has {KEY_LEN}",
            path.display(),
            b.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_binds_to_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let s = Sealer::new(path.clone());
        let sealed = s.seal("g", "openai", "sk-live-1234").unwrap();
        assert!(!sealed.windows(b"sk-live".len()).any(|w| w == b"sk-live"));
        assert_eq!(s.open("g", "openai", &sealed).unwrap(), "sk-live-1234");
        // Another row, another group, a flipped bit: refused.
        assert!(s.open("g", "other", &sealed).is_err());
        assert!(s.open("h", "openai", &sealed).is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(s.open("g", "openai", &bad).is_err());
        // Two seals of one value differ (fresh nonces).
        assert_ne!(sealed, s.seal("g", "openai", "sk-live-1234").unwrap());
        // The key file: 0600, 32 bytes, and the same key after a restart.
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let again = Sealer::new(path.clone());
        assert_eq!(again.open("g", "openai", &sealed).unwrap(), "sk-live-1234");
        // Another key does not open it, and says what to do.
        let other = Sealer::new(dir.path().join("other.key"));
        let e = other.open("g", "openai", &sealed).unwrap_err().to_string();
        assert!(e.contains("set it again"), "{e}");
    }

    #[test]
    fn the_check_value_and_signing_keys_open_only_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::new(dir.path().join("a.key"));
        let other = Sealer::new(dir.path().join("b.key"));
        let check = s.check_value().unwrap();
        assert!(s.verify_check(&check).unwrap());
        assert!(!other.verify_check(&check).unwrap());
        assert!(!s.verify_check(b"junk").unwrap());
        let sealed = s.seal_signing_key("kid-1", b"pkcs8").unwrap();
        assert_eq!(s.open_signing_key("kid-1", &sealed).unwrap(), b"pkcs8");
        // Another kid, another key, or a secret's seal: refused.
        assert!(s.open_signing_key("kid-2", &sealed).is_err());
        let e = other.open_signing_key("kid-1", &sealed).unwrap_err();
        assert!(e.to_string().contains("another node's key"), "{e}");
        assert!(s.open("kid-1", "x", &sealed).is_err());
    }

    #[test]
    fn an_open_or_damaged_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        std::fs::write(&path, [0u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Sealer::new(path.clone()).seal("g", "a", "v").unwrap_err();
        assert!(e.to_string().contains("0600"), "{e}");
        std::fs::write(&path, [0u8; 5]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Sealer::new(path).seal("g", "a", "v").unwrap_err();
        assert!(e.to_string().contains("5 bytes"), "{e}");
    }
}
