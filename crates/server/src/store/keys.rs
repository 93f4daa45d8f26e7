//! The `api_keys` table (and the `settings` row that records the bootstrap): only a key's
//! SHA-256 is stored, and a presented key is compared in constant time.

use super::db::{params, Db, OptionalExtension};
use subtle::ConstantTimeEq;

use super::{now, Store};
use crate::api::{rfc3339, ApiKey, CreateApiKey, CreatedApiKey, Role};
use crate::error::{Error, Result};
use crate::keys;

/// The caller an API key stands for.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
    pub groups: Vec<String>,
}

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

    /// The principal of a presented key, or `None` when no stored key matches.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Principal>> {
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
    insert_key(&tx, "bootstrap admin", Role::Admin, &[], &key)?;
    tx.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2)",
        params![BOOTSTRAPPED, now().to_string()],
    )?;
    tx.commit()?;
    Ok(generated.then_some(key))
}

fn insert_key(conn: &Db, name: &str, role: Role, groups: &[String], key: &str) -> Result<ApiKey> {
    let row = ApiKey {
        id: keys::new_id(),
        name: name.to_string(),
        role,
        groups: groups.to_vec(),
        prefix: keys::public_prefix(key),
        created_at: String::new(),
    };
    let created = now();
    let groups_json = serde_json::to_string(groups).map_err(|e| Error::Internal(e.to_string()))?;
    conn.execute(
        "INSERT INTO api_keys (id, name, prefix, hash, role, groups, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            row.id,
            row.name,
            row.prefix,
            keys::hash(key).to_vec(),
            role.as_str(),
            groups_json,
            created
        ],
    )?;
    Ok(ApiKey {
        created_at: rfc3339(created),
        ..row
    })
}

/// The principal of a presented key, or `None` when no stored key matches.
pub(super) fn authenticate(conn: &Db, presented: &str) -> Result<Option<Principal>> {
    if !keys::well_formed(presented) {
        return Ok(None);
    }
    let want = keys::hash(presented);
    // Find candidates by the public prefix, then compare the hashes in constant time, so the
    // time taken says nothing about how much of a guess matched.
    let rows = conn.query_map(
        "SELECT id, hash, role, groups FROM api_keys WHERE prefix = ?1",
        [keys::public_prefix(presented)],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        },
    )?;
    for (id, hash, role, groups) in rows {
        if bool::from(hash.as_slice().ct_eq(&want)) {
            return Ok(Some(Principal {
                key_id: id,
                role: parse_role(&role)?,
                groups: parse_groups(&groups)?,
            }));
        }
    }
    Ok(None)
}

fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| Error::Internal(format!("stored role {s:?} is unknown")))
}

fn parse_groups(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| Error::Internal(format!("stored groups: {e}")))
}

pub(super) fn create_key(conn: &Db, req: &CreateApiKey) -> Result<CreatedApiKey> {
    let key = keys::generate();
    let k = insert_key(conn, &req.name, req.role, &req.groups, &key)?;
    Ok(CreatedApiKey {
        id: k.id,
        name: k.name,
        role: k.role,
        groups: k.groups,
        prefix: k.prefix,
        created_at: k.created_at,
        key,
    })
}

pub(super) fn list_keys(conn: &Db) -> Result<Vec<ApiKey>> {
    let rows = conn.query_map(
        "SELECT id, name, role, groups, prefix, created_at FROM api_keys ORDER BY created_at, id",
        [],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for (id, name, role, groups, prefix, created) in rows {
        out.push(ApiKey {
            id,
            name,
            role: parse_role(&role)?,
            groups: parse_groups(&groups)?,
            prefix,
            created_at: rfc3339(created),
        });
    }
    Ok(out)
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

    #[test]
    fn keys_bootstrap_once_and_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        let c = s.conn.lock().unwrap();
        let k = bootstrap(&c, None).unwrap().unwrap();
        assert!(bootstrap(&c, None).unwrap().is_none());
        let p = authenticate(&c, &k).unwrap().unwrap();
        assert_eq!(p.role, Role::Admin);
        assert!(authenticate(&c, &keys::generate()).unwrap().is_none());
        assert!(authenticate(&c, "nonsense").unwrap().is_none());
        // same prefix, different secret
        let mut forged = k.clone();
        forged.pop();
        forged.push(if k.ends_with('a') { 'b' } else { 'a' });
        assert!(authenticate(&c, &forged).unwrap().is_none());
        let created = create_key(
            &c,
            &CreateApiKey {
                name: "r".into(),
                role: Role::Reader,
                groups: vec!["g".into()],
            },
        )
        .unwrap();
        let p = authenticate(&c, &created.key).unwrap().unwrap();
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
