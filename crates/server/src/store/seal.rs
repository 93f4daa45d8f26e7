//! Encryption at rest for group secrets and the identity signing keys: ChaCha20-Poly1305
//! (ring) under one 32-byte key in `MOAT_HOME/secrets.key` (0600, written once, atomically and
//! durably). Each value is sealed with a fresh random nonce and what it is (the group and
//! secret name, the key's kid) as associated data, so a sealed value copied to another row
//! does not open. Without the key file the database's secrets and signing keys are unusable:
//! back it up apart from the database. Every node of a fleet has the same file (docs/FLEET.md):
//! the store holds a check value sealed with it, so that a node with another key refuses to
//! start instead of sealing rows the others cannot open.
//!
//! Rotation (docs/FLEET.md, "Rotating the sealing key"): a new key is put beside the current
//! one on every node as `secrets.key.next`; one transaction re-seals every value and the
//! check value with it; each node then finds the check value opens with its next key and
//! makes that key its `secrets.key`. The check value is the one truth of which key is active:
//! every seal reads it in the transaction that writes the sealed value
//! ([`Sealer::active`]), so a value sealed by a node that has not yet switched can never
//! outlive a rotation under the old key (on PostgreSQL the two transactions conflict).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::db::{Db, OptionalExtension};
use crate::error::{Error, Result};

/// The first byte of every sealed value: the format, so that a later one can be told apart.
const FORMAT: u8 = 1;
const KEY_LEN: usize = 32;

/// What the check value of a store is sealed for, and its plaintext.
const CHECK_AAD: &[u8] = b"moat-seal-check";
const CHECK_PLAIN: &[u8] = b"moat sealing key check v1";

/// One sealing key, with the id it is shown by (a MAC of a fixed label under the key: it
/// names the key without revealing anything of it).
pub(super) struct Key {
    pub(super) id: String,
    aead: LessSafeKey,
}

impl Key {
    fn new(bytes: &[u8; KEY_LEN]) -> Result<Key> {
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes),
            b"moat sealing key id v1",
        );
        let aead = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .map_err(|_| Error::Internal("the secrets key has the wrong length".into()))?;
        Ok(Key {
            id: hex::encode(&mac.as_ref()[..8]),
            aead: LessSafeKey::new(aead),
        })
    }
}

/// Which of a node's keys opened something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    Current,
    Next,
}

#[derive(Clone)]
struct Keys {
    current: Arc<Key>,
    next: Option<Arc<Key>>,
}

/// The keys, read (the current one created if there is none) on first use.
pub(super) struct Sealer {
    path: PathBuf,
    keys: RwLock<Option<Keys>>,
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
            keys: RwLock::new(None),
        }
    }

    /// `secrets.key.next`: the key a rotation will switch to.
    pub(super) fn next_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".next");
        PathBuf::from(p)
    }

    fn keys(&self) -> Result<Keys> {
        if let Some(k) = self.keys.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(k.clone());
        }
        let current = Arc::new(Key::new(&load_or_create(&self.path)?)?);
        let next = self.read_next()?;
        let mut slot = self.keys.write().unwrap_or_else(|p| p.into_inner());
        Ok(slot.get_or_insert(Keys { current, next }).clone())
    }

    fn read_next(&self) -> Result<Option<Arc<Key>>> {
        match read_key(&self.next_path()) {
            Ok(bytes) => Ok(Some(Arc::new(Key::new(&bytes)?))),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads `secrets.key.next` again (put there, changed or removed by the operator).
    pub(super) fn reload_next(&self) -> Result<()> {
        let current = self.keys()?.current;
        let next = self.read_next()?.filter(|n| n.id != current.id);
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Keys { current, next });
        Ok(())
    }

    /// The ids of the current key and of the next one, if there is one.
    pub(super) fn ids(&self) -> Result<(String, Option<String>)> {
        let k = self.keys()?;
        Ok((k.current.id.clone(), k.next.as_ref().map(|n| n.id.clone())))
    }

    /// Makes the next key the current one, on disk (`secrets.key.next` renamed over
    /// `secrets.key`, the directory fsynced) and here. Called once the store's check value
    /// opens with the next key: the store no longer holds anything the old key opens.
    pub(super) fn promote(&self) -> Result<()> {
        let k = self.keys()?;
        let Some(next) = k.next else {
            return Err(Error::Internal("no next sealing key to switch to".into()));
        };
        let from = self.next_path();
        std::fs::rename(&from, &self.path).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", from.display(), self.path.display()),
                e,
            )
        })?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Keys {
            current: next,
            next: None,
        });
        Ok(())
    }

    /// The key the store's check value opens with, read in `db`'s transaction: the one every
    /// value written in that transaction must be sealed with.
    pub(super) fn active(&self, db: &Db) -> Result<Arc<Key>> {
        let check: Option<Vec<u8>> = db
            .query_row("SELECT sealed FROM seal_check WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        let k = self.keys()?;
        let Some(check) = check else {
            return Ok(k.current);
        };
        match self.verify_check(&check)? {
            Some(Which::Current) => Ok(k.current),
            Some(Which::Next) => Ok(k.next.expect("opened with the next key")),
            None => Err(Error::Unavailable(format!(
                "the store's sealing key was rotated to one this node does not have: put the \
                 fleet's secrets.key in {} (docs/FLEET.md, \"Rotating the sealing key\")",
                self.path.display()
            ))),
        }
    }

    /// `value` sealed with `key` for secret `name` of `group`.
    pub(super) fn seal(&self, key: &Key, group: &str, name: &str, value: &str) -> Result<Vec<u8>> {
        seal_bytes(key, &aad(group, name), value.as_bytes())
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
            .ok_or_else(broken)?
            .1;
        String::from_utf8(plain).map_err(|_| broken())
    }

    /// The PKCS#8 private key of identity signing key `kid`, sealed with `key`.
    pub(super) fn seal_signing_key(&self, key: &Key, kid: &str, der: &[u8]) -> Result<Vec<u8>> {
        seal_bytes(key, &signing_aad(kid), der)
    }

    /// The private key sealed by [`Sealer::seal_signing_key`] for `kid`.
    pub(super) fn open_signing_key(&self, kid: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        Ok(self
            .open_bytes(&signing_aad(kid), sealed)?
            .ok_or_else(|| {
                Error::Config(format!(
                    "identity signing key {kid} in the store does not decrypt with {} (another \
                     node's key, or a damaged row)",
                    self.path.display()
                ))
            })?
            .1)
    }

    /// Re-seals a secret's value from whichever key opens it to `to` (a rotation).
    pub(super) fn reseal(
        &self,
        to: &Key,
        group: &str,
        name: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>> {
        let value = self.open(group, name, sealed)?;
        self.seal(to, group, name, &value)
    }

    /// Re-seals a signing key from whichever key opens it to `to` (a rotation).
    pub(super) fn reseal_signing_key(&self, to: &Key, kid: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let der = self.open_signing_key(kid, sealed)?;
        self.seal_signing_key(to, kid, &der)
    }

    /// A new check value: the store keeps it to tell whether a node has its key.
    pub(super) fn check_value(&self, key: &Key) -> Result<Vec<u8>> {
        seal_bytes(key, CHECK_AAD, CHECK_PLAIN)
    }

    /// The current key (the one a new store's check value is sealed with) and the next one.
    pub(super) fn current_and_next(&self) -> Result<(Arc<Key>, Option<Arc<Key>>)> {
        let k = self.keys()?;
        Ok((k.current, k.next))
    }

    /// Which of this node's keys made `check` ([`Sealer::check_value`]), if either.
    pub(super) fn verify_check(&self, check: &[u8]) -> Result<Option<Which>> {
        Ok(match self.open_bytes(CHECK_AAD, check)? {
            Some((which, plain)) if plain == CHECK_PLAIN => Some(which),
            _ => None,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The plaintext and the key that opened it, or `None` when `sealed` opens with neither
    /// key and `aad` (an error only when there is no key).
    fn open_bytes(&self, aad: &[u8], sealed: &[u8]) -> Result<Option<(Which, Vec<u8>)>> {
        let k = self.keys()?;
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != FORMAT {
            return Ok(None);
        }
        let Ok(nonce) = Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN]) else {
            return Ok(None);
        };
        let mut keys = vec![(Which::Current, &k.current)];
        keys.extend(k.next.as_ref().map(|n| (Which::Next, n)));
        for (which, key) in keys {
            let mut data = sealed[1 + NONCE_LEN..].to_vec();
            let nonce = Nonce::assume_unique_for_key(*nonce.as_ref());
            if let Ok(plain) = key.aead.open_in_place(nonce, Aad::from(aad), &mut data) {
                return Ok(Some((which, plain.to_vec())));
            }
        }
        Ok(None)
    }
}

fn seal_bytes(key: &Key, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Error::Internal("no randomness for a nonce".into()))?;
    let mut data = plain.to_vec();
    key.aead
        .seal_in_place_append_tag(
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

fn aad(group: &str, name: &str) -> Vec<u8> {
    format!("moat-secret\0{group}\0{name}").into_bytes()
}

fn signing_aad(kid: &str) -> Vec<u8> {
    format!("moat-identity-key\0{kid}").into_bytes()
}

/// Reads the key file, or creates it ([`create_key`]); the key of a process that won a race
/// to create it is read then.
fn load_or_create(path: &Path) -> Result<[u8; KEY_LEN]> {
    match read_key(path) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    match create_key(path) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key(path)
        }
        other => other,
    }
}

/// Creates a new random key file: written to a temporary file (0600) and fsynced, then
/// linked into place, which fails (`AlreadyExists`) if the file exists, then the directory
/// fsynced.
pub(super) fn create_key(path: &Path) -> Result<[u8; KEY_LEN]> {
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
    linked.map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
    Ok(key)
}

/// The id a key file's key is shown by (`GET /v1/nodes`, `moat sealing-key`).
pub(super) fn key_id(path: &Path) -> Result<String> {
    Ok(Key::new(&read_key(path)?)?.id)
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

    fn current(s: &Sealer) -> Arc<Key> {
        s.current_and_next().unwrap().0
    }

    #[test]
    fn seals_opens_and_binds_to_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let s = Sealer::new(path.clone());
        let k = current(&s);
        let sealed = s.seal(&k, "g", "openai", "sk-live-1234").unwrap();
        assert!(!sealed.windows(b"sk-live".len()).any(|w| w == b"sk-live"));
        assert_eq!(s.open("g", "openai", &sealed).unwrap(), "sk-live-1234");
        // Another row, another group, a flipped bit: refused.
        assert!(s.open("g", "other", &sealed).is_err());
        assert!(s.open("h", "openai", &sealed).is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(s.open("g", "openai", &bad).is_err());
        // Two seals of one value differ (fresh nonces).
        assert_ne!(sealed, s.seal(&k, "g", "openai", "sk-live-1234").unwrap());
        // The key file: 0600, 32 bytes, and the same key after a restart.
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let again = Sealer::new(path.clone());
        assert_eq!(again.open("g", "openai", &sealed).unwrap(), "sk-live-1234");
        assert_eq!(current(&again).id, k.id);
        assert_eq!(key_id(&path).unwrap(), k.id);
        // Another key does not open it, and says what to do.
        let other = Sealer::new(dir.path().join("other.key"));
        assert_ne!(current(&other).id, k.id);
        let e = other.open("g", "openai", &sealed).unwrap_err().to_string();
        assert!(e.contains("set it again"), "{e}");
    }

    #[test]
    fn the_check_value_and_signing_keys_open_only_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::new(dir.path().join("a.key"));
        let other = Sealer::new(dir.path().join("b.key"));
        let check = s.check_value(&current(&s)).unwrap();
        assert_eq!(s.verify_check(&check).unwrap(), Some(Which::Current));
        assert_eq!(other.verify_check(&check).unwrap(), None);
        assert_eq!(s.verify_check(b"junk").unwrap(), None);
        let sealed = s.seal_signing_key(&current(&s), "kid-1", b"pkcs8").unwrap();
        assert_eq!(s.open_signing_key("kid-1", &sealed).unwrap(), b"pkcs8");
        // Another kid, another key, or a secret's seal: refused.
        assert!(s.open_signing_key("kid-2", &sealed).is_err());
        let e = other.open_signing_key("kid-1", &sealed).unwrap_err();
        assert!(e.to_string().contains("another node's key"), "{e}");
        assert!(s.open("kid-1", "x", &sealed).is_err());
    }

    #[test]
    fn a_next_key_opens_beside_the_current_one_until_it_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let s = Sealer::new(path.clone());
        let old = current(&s);
        let by_old = s.seal(&old, "g", "a", "v1").unwrap();
        assert_eq!(s.ids().unwrap(), (old.id.clone(), None));
        // The operator puts the next key beside it: seen at the next reload, both open.
        create_key(&s.next_path()).unwrap();
        assert!(matches!(
            create_key(&s.next_path()),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists
        ));
        s.reload_next().unwrap();
        let next = s.current_and_next().unwrap().1.unwrap();
        assert_eq!(s.ids().unwrap(), (old.id.clone(), Some(next.id.clone())));
        let by_next = s.reseal(&next, "g", "a", &by_old).unwrap();
        assert_eq!(s.open("g", "a", &by_next).unwrap(), "v1");
        assert_eq!(
            s.verify_check(&s.check_value(&next).unwrap()).unwrap(),
            Some(Which::Next)
        );
        // Promoted: the next file is now secrets.key, the old key is gone from disk and
        // memory, and what it sealed no longer opens.
        s.promote().unwrap();
        assert!(!s.next_path().exists());
        assert_eq!(key_id(&path).unwrap(), next.id);
        assert_eq!(s.ids().unwrap(), (next.id.clone(), None));
        assert_eq!(s.open("g", "a", &by_next).unwrap(), "v1");
        assert!(s.open("g", "a", &by_old).is_err());
        assert_eq!(Sealer::new(path).open("g", "a", &by_next).unwrap(), "v1");
        // A next key file open to others is refused at reload, like the current one.
        std::fs::write(s.next_path(), [1u8; 32]).unwrap();
        std::fs::set_permissions(s.next_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = s.reload_next().unwrap_err();
        assert!(e.to_string().contains("0600"), "{e}");
    }

    #[test]
    fn an_open_or_damaged_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        std::fs::write(&path, [0u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Sealer::new(path.clone()).current_and_next().err().unwrap();
        assert!(e.to_string().contains("0600"), "{e}");
        std::fs::write(&path, [0u8; 5]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Sealer::new(path).current_and_next().err().unwrap();
        assert!(e.to_string().contains("5 bytes"), "{e}");
    }
}
