//! The `group_secrets` table: each group's secrets, sealed by [`super::seal::Sealer`] on the
//! way in and opened only for the daemon's own use (the values a group's network stacks
//! inject at egress), never for an API answer.

use std::collections::BTreeMap;

use super::db::{params, Db, OptionalExtension};
use moat_net::Secret;

use super::{now, Store};
use crate::api::{quote, rfc3339, SecretInfo, MAX_SECRETS};
use crate::error::{Error, Result};

impl Store {
    /// Sets secret `name` of `group` to `value`; true if it is new. The group must exist.
    pub async fn put_secret(
        &self,
        group: &str,
        name: &str,
        value: Secret,
    ) -> Result<(SecretInfo, bool)> {
        let (group, name) = (group.to_string(), name.to_string());
        let seal = self.seal.clone();
        self.call(move |c| {
            let tx = c.transaction()?;
            let key = seal.active(&tx)?;
            let sealed = seal.seal(&key, &group, &name, value.expose())?;
            let old: Option<i64> = tx
                .query_row(
                    "SELECT created_at FROM group_secrets WHERE group_name = ?1 AND name = ?2",
                    params![group, name],
                    |r| r.get(0),
                )
                .optional()?;
            if old.is_none() {
                let count: i64 = tx.query_row(
                    "SELECT count(*) FROM group_secrets WHERE group_name = ?1",
                    params![group],
                    |r| r.get(0),
                )?;
                if count >= MAX_SECRETS as i64 {
                    return Err(Error::Conflict(format!(
                        "group {} already has {MAX_SECRETS} secrets, the most it may; delete \
                         one first",
                        quote(&group)
                    )));
                }
            }
            let at = now();
            tx.execute(
                "INSERT INTO group_secrets (group_name, name, sealed, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (group_name, name) DO UPDATE SET sealed = ?3, updated_at = ?4",
                params![group, name, sealed, at],
            )?;
            tx.commit()?;
            Ok((
                SecretInfo {
                    name: name.clone(),
                    created_at: rfc3339(old.unwrap_or(at)),
                    updated_at: rfc3339(at),
                },
                old.is_none(),
            ))
        })
        .await
    }

    /// The names and times of `group`'s secrets, by name.
    pub async fn list_secrets(&self, group: &str) -> Result<Vec<SecretInfo>> {
        let group = group.to_string();
        self.call(move |c| list(c, &group)).await
    }

    /// Deletes secret `name` of `group`; false if there was none.
    pub async fn delete_secret(&self, group: &str, name: &str) -> Result<bool> {
        let (group, name) = (group.to_string(), name.to_string());
        self.call(move |c| {
            Ok(c.execute(
                "DELETE FROM group_secrets WHERE group_name = ?1 AND name = ?2",
                params![group, name],
            )? > 0)
        })
        .await
    }

    /// The values of those of `names` that `group` has (a name it lacks is left out: the
    /// stack then refuses the requests that need it).
    pub async fn secret_values(
        &self,
        group: &str,
        names: Vec<String>,
    ) -> Result<BTreeMap<String, Secret>> {
        let group = group.to_string();
        let seal = self.seal.clone();
        self.call(move |c| {
            let mut out = BTreeMap::new();
            for name in &names {
                let sealed: Option<Vec<u8>> = c
                    .query_row(
                        "SELECT sealed FROM group_secrets WHERE group_name = ?1 AND name = ?2",
                        params![group, name],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(sealed) = sealed {
                    let value = seal.open(&group, name, &sealed)?;
                    out.insert(name.clone(), Secret::new(value));
                }
            }
            Ok(out)
        })
        .await
    }
}

fn list(c: &Db, group: &str) -> Result<Vec<SecretInfo>> {
    let rows = c.query_map(
        "SELECT name, created_at, updated_at FROM group_secrets WHERE group_name = ?1
         ORDER BY name",
        params![group],
        |r| {
            Ok(SecretInfo {
                name: r.get(0)?,
                created_at: rfc3339(r.get(1)?),
                updated_at: rfc3339(r.get(2)?),
            })
        },
    )?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use crate::api::GroupSpec;

    #[tokio::test]
    async fn secrets_are_sealed_listed_without_values_and_go_with_their_group() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        s.put_group("g", &GroupSpec::default()).await.unwrap();
        let (info, created) = s
            .put_secret(
                "g",
                "openai",
                moat_net::Secret::new("sk-plain-VALUE".into()),
            )
            .await
            .unwrap();
        assert!(created);
        assert_eq!(info.name, "openai");
        let (_, created) = s
            .put_secret(
                "g",
                "openai",
                moat_net::Secret::new("sk-plain-VALUE2".into()),
            )
            .await
            .unwrap();
        assert!(!created, "a second PUT updates");
        let listed = serde_json::to_string(&s.list_secrets("g").await.unwrap()).unwrap();
        assert!(
            listed.contains("openai") && !listed.contains("sk-plain"),
            "{listed}"
        );
        let v = s
            .secret_values("g", vec!["openai".into(), "missing".into()])
            .await
            .unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v["openai"].expose(), "sk-plain-VALUE2");
        // Not in the database file in the clear (WAL included).
        drop(v);
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let bytes = std::fs::read(f.path()).unwrap();
            assert!(
                !bytes.windows(8).any(|w| w == b"sk-plain"),
                "{} holds the value",
                f.path().display()
            );
        }
        // A secret of a group that does not exist is refused by the database.
        assert!(s
            .put_secret("nope", "a", moat_net::Secret::new("v".into()))
            .await
            .is_err());
        assert!(s.delete_secret("g", "openai").await.unwrap());
        assert!(!s.delete_secret("g", "openai").await.unwrap());
        s.put_secret("g", "b", moat_net::Secret::new("v".into()))
            .await
            .unwrap();
        s.delete_group("g", false).await.unwrap();
        s.put_group("g", &GroupSpec::default()).await.unwrap();
        assert!(
            s.list_secrets("g").await.unwrap().is_empty(),
            "a re-created group does not inherit secrets"
        );
    }
}
