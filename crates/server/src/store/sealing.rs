//! Rotating the sealing key (docs/FLEET.md, "Rotating the sealing key"): every node shows the
//! ids of its key and of the next one it holds; a rotation re-seals every sealed value of the
//! store with the next key in one transaction, once every node that is not lost holds it;
//! each node switches to it when it finds the store's check value opens with it.

use std::path::Path;

use super::db::{params, Db, OptionalExtension};
use super::seal::{self, Which};
use super::Store;
use crate::api::{quote, SealingKeyRotation};
use crate::error::{Error, Result};

fn check_value(c: &Db) -> Result<Option<Vec<u8>>> {
    Ok(
        c.query_row("SELECT sealed FROM seal_check WHERE id = 1", [], |r| {
            r.get(0)
        })
        .optional()?,
    )
}

/// `moat sealing-key new`: creates `MOAT_HOME/secrets.key.next` (0600) for a rotation; its id.
/// Refused if there is one already (it may be the one the other nodes were given).
pub fn create_next_sealing_key(home: &Path) -> Result<String> {
    let path = home.join("secrets.key.next");
    match seal::create_key(&path) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(Error::Conflict(format!(
                "{} exists already (id {}): copy that one to every node, or remove it to make \
                 another",
                path.display(),
                seal::key_id(&path)?
            )))
        }
        Err(e) => Err(e),
        Ok(_) => seal::key_id(&path),
    }
}

/// The id of a key file (`moat sealing-key show`).
pub fn sealing_key_id(path: &Path) -> Result<String> {
    seal::key_id(path)
}

impl Store {
    /// At each lease renewal: reads `secrets.key.next` again, switches to it if the store's
    /// check value opens with it (another node rotated), and shows this node's key ids in its
    /// row. The id switched to, if it did. An error if the store is sealed with a key this node
    /// lacks (the fleet rotated to a key it was not given).
    pub async fn sync_sealing_key(&self) -> Result<Option<String>> {
        let seal = self.seal.clone();
        let me = self.fence.node();
        self.call(move |c| {
            seal.reload_next()?;
            let mut switched = None;
            match check_value(c)?
                .map(|check| seal.verify_check(&check))
                .transpose()?
            {
                Some(Some(Which::Next)) => {
                    seal.promote()?;
                    switched = Some(seal.ids()?.0);
                }
                Some(None) => {
                    return Err(Error::Unavailable(format!(
                        "the store's sealing key was rotated to one this node does not have: \
                         put the fleet's secrets.key in {} and restart it",
                        seal.path().display()
                    )))
                }
                Some(Some(Which::Current)) | None => {}
            }
            if let Some(me) = &me {
                let (current, next) = seal.ids()?;
                c.execute(
                    "UPDATE nodes SET sealing_key_id = ?2, next_sealing_key_id = ?3 \
                     WHERE name = ?1",
                    params![me, current, next],
                )?;
            }
            Ok(switched)
        })
        .await
    }

    /// Re-seals every group secret, every identity signing key and the check value with this
    /// node's next key, in one transaction fenced by its lease, then switches to that key.
    /// Refused (409, saying what to do) without a next key, when the store is not sealed with
    /// this node's current key, or while a node that is not lost does not show the same next
    /// key (it could not open the store afterwards).
    pub async fn rotate_sealing_key(&self) -> Result<SealingKeyRotation> {
        let seal = self.seal.clone();
        let fence = self.fence.clone();
        let me = self.fence.node();
        let done = self
            .call(move |c| {
                seal.reload_next()?;
                let (current, next) = seal.current_and_next()?;
                let Some(next) = next else {
                    return Err(Error::Conflict(format!(
                        "this node has no next sealing key: make one with `moat sealing-key \
                         new`, copy it to {} on every node, then rotate",
                        seal.next_path().display()
                    )));
                };
                let tx = c.transaction()?;
                fence.check(&tx)?;
                let check = check_value(&tx)?.ok_or_else(|| {
                    Error::Internal("the store has no sealing check value".into())
                })?;
                match seal.verify_check(&check)? {
                    Some(Which::Current) => {}
                    Some(Which::Next) => {
                        return Err(Error::Conflict(format!(
                            "the store is sealed with the next key {} already: the nodes \
                             switch to it at their next lease renewal",
                            next.id
                        )))
                    }
                    None => {
                        return Err(Error::Conflict(
                            "the store is sealed with neither of this node's keys".into(),
                        ))
                    }
                }
                let nodes: Vec<(String, Option<String>)> = tx.query_map(
                    "SELECT name, next_sealing_key_id FROM nodes WHERE state <> 'lost' \
                     ORDER BY name",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let behind: Vec<String> = nodes
                    .into_iter()
                    .filter(|(n, id)| Some(n) != me.as_ref() && id.as_deref() != Some(&next.id))
                    .map(|(n, id)| match id {
                        Some(id) => format!("{} (holds {id})", quote(&n)),
                        None => format!("{} (holds none)", quote(&n)),
                    })
                    .collect();
                if !behind.is_empty() {
                    return Err(Error::Conflict(format!(
                        "not every node holds the next sealing key {}: {}. Copy this node's \
                         {} to their MOAT_HOME (each shows it within a lease renewal, in \
                         `moat node ls`), then rotate again",
                        next.id,
                        behind.join(", "),
                        seal.next_path().display()
                    )));
                }
                let secrets: Vec<(String, String, Vec<u8>)> = tx.query_map(
                    "SELECT group_name, name, sealed FROM group_secrets",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                for (group, name, sealed) in &secrets {
                    tx.execute(
                        "UPDATE group_secrets SET sealed = ?3 WHERE group_name = ?1 AND name = ?2",
                        params![group, name, seal.reseal(&next, group, name, sealed)?],
                    )?;
                }
                let keys: Vec<(String, Vec<u8>)> = tx.query_map(
                    "SELECT kid, private_key FROM identity_keys WHERE private_key IS NOT NULL",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                for (kid, sealed) in &keys {
                    tx.execute(
                        "UPDATE identity_keys SET private_key = ?2 WHERE kid = ?1",
                        params![kid, seal.reseal_signing_key(&next, kid, sealed)?],
                    )?;
                }
                tx.execute(
                    "UPDATE seal_check SET sealed = ?1 WHERE id = 1",
                    params![seal.check_value(&next)?],
                )?;
                tx.commit()?;
                Ok(SealingKeyRotation {
                    key_id: next.id.clone(),
                    previous_key_id: current.id.clone(),
                    secrets: secrets.len() as u64,
                    signing_keys: keys.len() as u64,
                })
            })
            .await?;
        // The store holds nothing the old key opens any more: this node switches at once (the
        // others at their next renewal). Should the rename fail, the next key still opens
        // everything and seals come from the check value; the renewal tries again.
        if let Err(e) = self.sync_sealing_key().await {
            tracing::error!(error = %e, "switching to the rotated sealing key");
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::api::KeyState;
    use crate::store::tests::{node_spec, off};
    use crate::store::{test_location, Location};
    use moat_net::Secret;

    fn copy_key(from: &Path, to: &Path) {
        std::fs::copy(from, to).unwrap();
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn node(location: &Location, home: &Path, name: &str) -> Store {
        let s = off(|| Store::open(location, home)).unwrap();
        off(|| s.acquire_lease(&node_spec(name))).unwrap().unwrap();
        s
    }

    async fn value(s: &Store, name: &str) -> String {
        s.secret_values("g", vec![name.to_string()]).await.unwrap()[name]
            .expose()
            .to_string()
    }

    #[tokio::test]
    async fn a_rotation_reseals_everything_once_every_node_holds_the_next_key() {
        let dir = tempfile::tempdir().unwrap();
        let location = off(|| test_location(dir.path()));
        let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = node(&location, home_a.path(), "a");
        let old_key = home_a.path().join("secrets.key");
        copy_key(&old_key, &home_b.path().join("secrets.key"));
        let old_copy = dir.path().join("old.key");
        copy_key(&old_key, &old_copy);
        let b = node(&location, home_b.path(), "b");
        a.with_conn(|c| {
            c.execute_batch(
                "INSERT INTO sandbox_groups (name, spec, created_at, updated_at) \
                 VALUES ('g', '{}', 0, 0)",
            )
        })
        .unwrap();
        a.put_secret("g", "k1", Secret::new("v1".into()))
            .await
            .unwrap();
        off(|| a.insert_identity_key("kid-1", KeyState::Active, b"pkcs8-1")).unwrap();
        let old_id = sealing_key_id(&old_key).unwrap();
        for s in [&a, &b] {
            assert_eq!(s.sync_sealing_key().await.unwrap(), None);
        }
        let row = b.get_node("b").await.unwrap().unwrap();
        assert_eq!(row.sealing_key_id.as_deref(), Some(old_id.as_str()));
        assert_eq!(row.next_sealing_key_id, None);

        // Without a next key, and while node b lacks the one a has: refused, saying what to do.
        let e = a.rotate_sealing_key().await.unwrap_err().to_string();
        assert!(
            e.contains("no next sealing key") && e.contains("moat sealing-key new"),
            "{e}"
        );
        let next_id = create_next_sealing_key(home_a.path()).unwrap();
        let e = create_next_sealing_key(home_a.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("exists already") && e.contains(&next_id), "{e}");
        let e = a.rotate_sealing_key().await.unwrap_err().to_string();
        assert!(
            e.contains("not every node holds") && e.contains("holds none"),
            "{e}"
        );
        assert!(e.contains(&next_id), "{e}");

        copy_key(
            &home_a.path().join("secrets.key.next"),
            &home_b.path().join("secrets.key.next"),
        );
        assert_eq!(b.sync_sealing_key().await.unwrap(), None);
        let row = a.get_node("b").await.unwrap().unwrap();
        assert_eq!(row.next_sealing_key_id.as_deref(), Some(next_id.as_str()));
        let done = a.rotate_sealing_key().await.unwrap();
        assert_eq!(
            (done.key_id.as_str(), done.previous_key_id.as_str()),
            (next_id.as_str(), old_id.as_str())
        );
        assert_eq!((done.secrets, done.signing_keys), (1, 1));
        // Node a switched at once: its secrets.key is the new key, the next file is gone.
        assert_eq!(sealing_key_id(&old_key).unwrap(), next_id);
        assert!(!home_a.path().join("secrets.key.next").exists());
        let e = a.rotate_sealing_key().await.unwrap_err().to_string();
        assert!(e.contains("no next sealing key"), "{e}");

        // Node b has not switched yet: it opens what the rotation re-sealed, and what it seals
        // meanwhile is sealed with the new key (the store's check value says which).
        assert_eq!(value(&b, "k1").await, "v1");
        b.put_secret("g", "k2", Secret::new("v2".into()))
            .await
            .unwrap();
        assert_eq!(b.sync_sealing_key().await.unwrap(), Some(next_id.clone()));
        assert_eq!(
            sealing_key_id(&home_b.path().join("secrets.key")).unwrap(),
            next_id
        );
        assert_eq!(value(&a, "k2").await, "v2");
        assert_eq!(value(&b, "k1").await, "v1");
        assert_eq!(
            off(|| a.identity_private_key("kid-1")).unwrap().as_deref(),
            Some(&b"pkcs8-1"[..])
        );

        // A node given only the old key cannot open the store any more; one that was down
        // during the rotation with the next key beside the old one switches as it opens it.
        let only_old = tempfile::tempdir().unwrap();
        copy_key(&old_copy, &only_old.path().join("secrets.key"));
        let e = off(|| Store::open(&location, only_old.path()).map(drop))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not the sealing key of the store"), "{e}");
        let down = tempfile::tempdir().unwrap();
        copy_key(&old_copy, &down.path().join("secrets.key"));
        copy_key(&old_key, &down.path().join("secrets.key.next"));
        let c = off(|| Store::open(&location, down.path())).unwrap();
        assert_eq!(
            sealing_key_id(&down.path().join("secrets.key")).unwrap(),
            next_id
        );
        assert!(!down.path().join("secrets.key.next").exists());
        assert_eq!(value(&c, "k2").await, "v2");
    }
}
