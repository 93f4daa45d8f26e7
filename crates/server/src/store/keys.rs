//! The `api_keys` table (and the `settings` row that records the bootstrap): only a key's
//! SHA-256 is stored, and a presented key is compared in constant time.

use subtle::ConstantTimeEq;

use super::db::{params, Db, OptionalExtension, Row};

use super::{now, Store};
use crate::api::{rfc3339, ApiKey, CreateApiKey, CreatedApiKey, RateLimit, Role, RotateApiKey};
use crate::error::{Error, Result};
use crate::keys;

/// The caller an API key stands for.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
    pub groups: Vec<String>,
    /// The key's own rate limit; `None`: the daemon's.
    pub rate_limit: Option<RateLimit>,
}

/// What a presented key turned out to be.
#[derive(Debug)]
pub enum Authenticated {
    Key(Principal),
    /// A stored key whose `expires_at` (unix seconds) has passed.
    Expired {
        key_id: String,
        at: i64,
    },
    /// No stored key matches (never existed, deleted, or its secret was rotated).
    Unknown,
}

/// `last_used_at` is written when it is at least this old, so that a busy key costs one
/// write a minute, not one a request.
const LAST_USED_GRANULARITY_S: i64 = 60;

impl Principal {
    /// Whether this key may see group `name` at all (else it gets a 404, never a 403).
    pub fn sees(&self, name: &str) -> bool {
        self.role == Role::Admin || self.groups.iter().any(|g| g == name)
    }
}

impl Store {
    /// Creates the first admin key once per database (see [`bootstrap`]). Blocking: called
    /// before serving.
    pub fn bootstrap(&self, chosen: Option<&str>) -> Result<Option<String>> {
        self.blocking(|c| bootstrap(c, chosen))
    }

    /// What a presented key is; records its use (at most once a minute).
    pub async fn authenticate(&self, presented: &str) -> Result<Authenticated> {
        let key = presented.to_string();
        self.call(move |c| authenticate(c, &key)).await
    }

    pub async fn create_key(&self, req: &CreateApiKey) -> Result<CreatedApiKey> {
        let req = req.clone();
        self.call(move |c| create_key(c, &req)).await
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        self.call(list_keys).await
    }

    pub async fn get_key(&self, id: &str) -> Result<ApiKey> {
        let id = id.to_string();
        self.call(move |c| get_key(c, &id)).await
    }

    /// A new secret for key `id`; the old one stops working at once.
    pub async fn rotate_key(&self, id: &str, req: &RotateApiKey) -> Result<CreatedApiKey> {
        let (id, req) = (id.to_string(), req.clone());
        self.call(move |c| rotate_key(c, &id, &req)).await
    }

    /// Deletes a key; refused for the last admin key.
    pub async fn delete_key(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call(move |c| delete_key(c, &id)).await
    }
}

const BOOTSTRAPPED: &str = "bootstrap_done";

/// Creates the first admin key once per database. Returns the key when it was generated here
/// (so the caller prints it); `None` when it came from `chosen` or the database was already
/// bootstrapped.
pub(super) fn bootstrap(conn: &Db, chosen: Option<&str>) -> Result<Option<String>> {
    let tx = conn.transaction()?;
    let done: Option<String> = tx
        .query_row(
            "SELECT value FROM settings WHERE key = ?1",
            [BOOTSTRAPPED],
            |r| r.get(0),
        )
        .optional()?;
    if done.is_some() {
        return Ok(None);
    }
    let (key, generated) = match chosen {
        Some(k) => {
            keys::check_bootstrap(k)?;
            (k.to_string(), false)
        }
        None => (keys::generate(), true),
    };
    let req = CreateApiKey {
        name: "bootstrap admin".to_string(),
        role: Role::Admin,
        groups: Vec::new(),
        expires_in_s: None,
        rate_limit: None,
    };
    insert_key(&tx, &req, &key)?;
    tx.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2)",
        params![BOOTSTRAPPED, now().to_string()],
    )?;
    tx.commit()?;
    Ok(generated.then_some(key))
}

fn insert_key(conn: &Db, req: &CreateApiKey, key: &str) -> Result<ApiKey> {
    let id = keys::new_id();
    let created = now();
    let expires = req.expires_in_s.map(|s| created.saturating_add_unsigned(s));
    let groups_json =
        serde_json::to_string(&req.groups).map_err(|e| Error::Internal(e.to_string()))?;
    conn.execute(
        "INSERT INTO api_keys (id, name, prefix, hash, role, groups, created_at, expires_at,
             rate_per_s, rate_burst)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            id,
            req.name,
            keys::public_prefix(key),
            keys::hash(key).to_vec(),
            req.role.as_str(),
            groups_json,
            created,
            expires,
            req.rate_limit.map(|r| r.per_s),
            req.rate_limit.map(|r| r.burst),
        ],
    )?;
    get_key(conn, &id)
}

const KEY_COLUMNS: &str = "id, name, role, groups, prefix, created_at, expires_at, last_used_at, \
     rotated_at, rate_per_s, rate_burst";

fn key_row(r: &Row) -> super::db::DbResult<KeyRow> {
    Ok(KeyRow {
        id: r.get(0)?,
        name: r.get(1)?,
        role: r.get(2)?,
        groups: r.get(3)?,
        prefix: r.get(4)?,
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
        last_used_at: r.get(7)?,
        rotated_at: r.get(8)?,
        rate: (r.get(9)?, r.get(10)?),
    })
}

struct KeyRow {
    id: String,
    name: String,
    role: String,
    groups: String,
    prefix: String,
    created_at: i64,
    expires_at: Option<i64>,
    last_used_at: Option<i64>,
    rotated_at: Option<i64>,
    rate: (Option<u32>, Option<u32>),
}

impl KeyRow {
    fn into_api(self) -> Result<ApiKey> {
        Ok(ApiKey {
            id: self.id,
            name: self.name,
            role: parse_role(&self.role)?,
            groups: parse_groups(&self.groups)?,
            prefix: self.prefix,
            created_at: rfc3339(self.created_at),
            expires_at: self.expires_at.map(rfc3339),
            last_used_at: self.last_used_at.map(rfc3339),
            rotated_at: self.rotated_at.map(rfc3339),
            rate_limit: rate_limit(self.rate),
        })
    }
}

fn rate_limit(rate: (Option<u32>, Option<u32>)) -> Option<RateLimit> {
    match rate {
        (Some(per_s), Some(burst)) => Some(RateLimit { per_s, burst }),
        _ => None,
    }
}

fn get_key(conn: &Db, id: &str) -> Result<ApiKey> {
    conn.query_row(
        &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
        [id],
        key_row,
    )
    .optional()?
    .ok_or_else(|| Error::NotFound(format!("no API key {}", crate::api::quote(id))))?
    .into_api()
}

/// What a presented key is. A match records its use when the last record is a minute old.
pub(super) fn authenticate(conn: &Db, presented: &str) -> Result<Authenticated> {
    if !keys::well_formed(presented) {
        return Ok(Authenticated::Unknown);
    }
    let want = keys::hash(presented);
    // Find candidates by the public prefix, then compare the hashes in constant time, so the
    // time taken says nothing about how much of a guess matched.
    let rows = conn.query_map(
        "SELECT id, hash, role, groups, expires_at, last_used_at, rate_per_s, rate_burst
         FROM api_keys WHERE prefix = ?1",
        [keys::public_prefix(presented)],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                (r.get::<_, Option<u32>>(6)?, r.get::<_, Option<u32>>(7)?),
            ))
        },
    )?;
    for (id, hash, role, groups, expires_at, last_used, rate) in rows {
        if !bool::from(hash.as_slice().ct_eq(&want)) {
            continue;
        }
        let t = now();
        if let Some(at) = expires_at.filter(|at| *at <= t) {
            return Ok(Authenticated::Expired { key_id: id, at });
        }
        if last_used.is_none_or(|u| t - u >= LAST_USED_GRANULARITY_S) {
            conn.execute(
                "UPDATE api_keys SET last_used_at = ?1 WHERE id = ?2",
                params![t, id],
            )?;
        }
        return Ok(Authenticated::Key(Principal {
            key_id: id,
            role: parse_role(&role)?,
            groups: parse_groups(&groups)?,
            rate_limit: rate_limit(rate),
        }));
    }
    Ok(Authenticated::Unknown)
}

fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| Error::Internal(format!("stored role {s:?} is unknown")))
}

fn parse_groups(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| Error::Internal(format!("stored groups: {e}")))
}

pub(super) fn create_key(conn: &Db, req: &CreateApiKey) -> Result<CreatedApiKey> {
    let key = keys::generate();
    let k = insert_key(conn, req, &key)?;
    Ok(created(k, key))
}

fn created(k: ApiKey, key: String) -> CreatedApiKey {
    CreatedApiKey {
        id: k.id,
        name: k.name,
        role: k.role,
        groups: k.groups,
        prefix: k.prefix,
        created_at: k.created_at,
        expires_at: k.expires_at,
        rate_limit: k.rate_limit,
        key,
    }
}

pub(super) fn list_keys(conn: &Db) -> Result<Vec<ApiKey>> {
    let rows = conn.query_map(
        &format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"),
        [],
        key_row,
    )?;
    rows.into_iter().map(KeyRow::into_api).collect()
}

/// Replaces the secret of key `id` (its hash and prefix) in one statement: from its commit the
/// old secret matches no row. No overlap: a rotation is often the answer to a leak, and a
/// client that must switch without a gap creates a second key, moves to it, then deletes the
/// first.
pub(super) fn rotate_key(conn: &Db, id: &str, req: &RotateApiKey) -> Result<CreatedApiKey> {
    crate::api::validate_expiry(req.expires_in_s)?;
    let tx = conn.transaction()?;
    let old = get_key(&tx, id)?;
    let t = now();
    let expires_at: Option<i64> =
        tx.query_row("SELECT expires_at FROM api_keys WHERE id = ?1", [id], |r| {
            r.get(0)
        })?;
    let expires_at = match (req.expires_in_s, expires_at) {
        (Some(s), _) => Some(t.saturating_add_unsigned(s)),
        (None, Some(at)) if at <= t => {
            return Err(Error::BadRequest(format!(
                "API key {} expired at {}: give the new secret an expires_in_s",
                crate::api::quote(id),
                rfc3339(at)
            )))
        }
        (None, at) => at,
    };
    let key = keys::generate();
    tx.execute(
        "UPDATE api_keys SET hash = ?1, prefix = ?2, rotated_at = ?3, expires_at = ?4
         WHERE id = ?5",
        params![
            keys::hash(&key).to_vec(),
            keys::public_prefix(&key),
            t,
            expires_at,
            old.id
        ],
    )?;
    let k = get_key(&tx, id)?;
    tx.commit()?;
    Ok(created(k, key))
}

pub(super) fn delete_key(conn: &Db, id: &str) -> Result<()> {
    let tx = conn.transaction()?;
    let role: Option<String> = tx
        .query_row("SELECT role FROM api_keys WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(role) = role else {
        return Err(Error::NotFound(format!(
            "no API key {}",
            crate::api::quote(id)
        )));
    };
    if role == "admin" {
        let admins: i64 = tx.query_row(
            "SELECT COUNT(*) FROM api_keys WHERE role = 'admin'",
            [],
            |r| r.get(0),
        )?;
        if admins <= 1 {
            return Err(Error::Conflict(
                "this is the last admin key: create another admin key before deleting it"
                    .to_string(),
            ));
        }
    }
    tx.execute("DELETE FROM api_keys WHERE id = ?1", [id])?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(c: &Db, key: &str) -> Option<Principal> {
        match authenticate(c, key).unwrap() {
            Authenticated::Key(p) => Some(p),
            _ => None,
        }
    }

    fn reader(expires_in_s: Option<u64>) -> CreateApiKey {
        CreateApiKey {
            name: "r".into(),
            role: Role::Reader,
            groups: vec!["g".into()],
            expires_in_s,
            rate_limit: None,
        }
    }

    #[test]
    fn expired_keys_are_told_apart_and_rotation_ends_the_old_secret() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        let c = s.conn.lock().unwrap();
        bootstrap(&c, None).unwrap();
        let k = create_key(&c, &reader(Some(3600))).unwrap();
        assert!(principal(&c, &k.key).is_some());
        // Expire it by moving its expiry into the past, as the clock would.
        c.execute(
            "UPDATE api_keys SET expires_at = ?1 WHERE id = ?2",
            params![now() - 1, k.id],
        )
        .unwrap();
        assert!(matches!(
            authenticate(&c, &k.key).unwrap(),
            Authenticated::Expired { ref key_id, .. } if *key_id == k.id
        ));
        // An expired key is rotated only with a new expiry.
        let e = rotate_key(&c, &k.id, &RotateApiKey::default()).unwrap_err();
        assert!(e.to_string().contains("expires_in_s"), "{e}");
        let r = rotate_key(
            &c,
            &k.id,
            &RotateApiKey {
                expires_in_s: Some(60),
            },
        )
        .unwrap();
        assert_eq!((r.id.as_str(), r.role), (k.id.as_str(), Role::Reader));
        assert_ne!(r.key, k.key);
        assert!(matches!(
            authenticate(&c, &k.key).unwrap(),
            Authenticated::Unknown
        ));
        let p = principal(&c, &r.key).unwrap();
        assert_eq!((p.key_id, p.groups), (k.id.clone(), vec!["g".to_string()]));
        let listed = list_keys(&c).unwrap();
        let row = listed.iter().find(|x| x.id == k.id).unwrap();
        assert!(row.rotated_at.is_some() && row.last_used_at.is_some());
        assert_eq!(row.prefix, keys::public_prefix(&r.key));
        assert!(matches!(
            rotate_key(&c, "key-none", &RotateApiKey::default()),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn last_use_is_written_at_most_once_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        let c = s.conn.lock().unwrap();
        bootstrap(&c, None).unwrap();
        let k = create_key(&c, &reader(None)).unwrap();
        let used = |c: &Db| -> Option<i64> {
            c.query_row(
                "SELECT last_used_at FROM api_keys WHERE id = ?1",
                [&k.id],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(used(&c), None);
        principal(&c, &k.key).unwrap();
        let first = used(&c).unwrap();
        // Within the minute a use writes nothing (seen by planting an older time that stays).
        c.execute(
            "UPDATE api_keys SET last_used_at = ?1 WHERE id = ?2",
            params![first - 30, k.id],
        )
        .unwrap();
        principal(&c, &k.key).unwrap();
        assert_eq!(used(&c), Some(first - 30));
        c.execute(
            "UPDATE api_keys SET last_used_at = ?1 WHERE id = ?2",
            params![first - 61, k.id],
        )
        .unwrap();
        principal(&c, &k.key).unwrap();
        assert!(used(&c).unwrap() >= first);
    }

    #[test]
    fn keys_bootstrap_once_and_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        let c = s.conn.lock().unwrap();
        let k = bootstrap(&c, None).unwrap().unwrap();
        assert!(bootstrap(&c, None).unwrap().is_none());
        let p = principal(&c, &k).unwrap();
        assert_eq!(p.role, Role::Admin);
        assert!(principal(&c, &keys::generate()).is_none());
        assert!(principal(&c, "nonsense").is_none());
        // same prefix, different secret
        let mut forged = k.clone();
        forged.pop();
        forged.push(if k.ends_with('a') { 'b' } else { 'a' });
        assert!(principal(&c, &forged).is_none());
        let created = create_key(&c, &reader(None)).unwrap();
        let p = principal(&c, &created.key).unwrap();
        assert_eq!(p.groups, vec!["g".to_string()]);
        assert!(p.sees("g") && !p.sees("h"));
        // the last admin cannot go
        let keys = list_keys(&c).unwrap();
        let admin = keys
            .iter()
            .find(|k| k.role == Role::Admin)
            .unwrap()
            .id
            .clone();
        assert!(matches!(delete_key(&c, &admin), Err(Error::Conflict(_))));
        delete_key(&c, &created.id).unwrap();
        assert!(matches!(
            delete_key(&c, &created.id),
            Err(Error::NotFound(_))
        ));
        // the stored row holds no secret
        let stored: Vec<u8> = c
            .query_row("SELECT hash FROM api_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, keys::hash(&k).to_vec());
    }
}
