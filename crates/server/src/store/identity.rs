//! The identity tables: signing-key states (`identity_keys`), the never-reused uids of groups
//! and sandboxes (`identity_groups`, `identity_sandboxes`) and the mint audit
//! (`identity_events`, pruned to the newest N rows).

use super::db::{params, Db, OptionalExtension, Param, Value};
use rand::RngCore;

use super::Store;
use crate::api::{IdentityDelivery, IdentityEvent, IdentityOutcome, KeyState};
use crate::error::{Error, Result};

/// Identity audit rows kept; the oldest go first.
const EVENTS_KEPT: i64 = 100_000;

/// A signing key's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub kid: String,
    pub state: KeyState,
    pub created_at: i64,
    pub activated_at: Option<i64>,
    pub retired_at: Option<i64>,
}

/// The uids a token names: the group's (changes when the group is deleted and re-created) and
/// the sandbox's (never reused, even if its id is), and the sandbox's incarnation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIds {
    pub group_uid: String,
    pub sandbox_uid: String,
    pub incarnation: u64,
}

/// One identity audit event as the issuer records it.
#[derive(Debug, Clone)]
pub struct NewIdentityEvent {
    pub group: String,
    pub sandbox: String,
    pub outcome: IdentityOutcome,
    pub delivery: IdentityDelivery,
    pub audience: String,
    pub subject: Option<String>,
    pub jti: Option<String>,
    pub kid: Option<String>,
    pub expires_on: Option<i64>,
    pub reason: Option<String>,
    pub key_id: Option<String>,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

impl Store {
    pub fn identity_keys(&self) -> Result<Vec<KeyRow>> {
        self.blocking(keys)
    }

    /// Records new key `kid` in `state` (`active` or `pending`) with its PKCS#8 private key,
    /// sealed, unless the store has a key in that state already (another node starting on
    /// the same store made it first): false then.
    pub fn insert_identity_key(&self, kid: &str, state: KeyState, der: &[u8]) -> Result<bool> {
        let (kid, t) = (kid.to_string(), super::now());
        self.blocking(move |c| {
            let tx = c.transaction()?;
            let key = self.seal.active(&tx)?;
            let sealed = self.seal.seal_signing_key(&key, &kid, der)?;
            let activated = (state == KeyState::Active).then_some(t);
            let inserted = tx.execute(
                "INSERT INTO identity_keys (kid, state, created_at, activated_at, private_key) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                params![kid, state.as_str(), t, activated, sealed],
            )? == 1;
            tx.commit()?;
            Ok(inserted)
        })
    }

    /// The private key (PKCS#8) of `kid`, opened; `None` while it is still a file in
    /// MOAT_HOME (a key made before the store kept them).
    pub fn identity_private_key(&self, kid: &str) -> Result<Option<Vec<u8>>> {
        let kid = kid.to_string();
        let sealed: Option<Vec<u8>> = self.blocking(|c| {
            Ok(c.query_row(
                "SELECT private_key FROM identity_keys WHERE kid = ?1",
                [&kid],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
        })?;
        sealed
            .map(|s| self.seal.open_signing_key(&kid, &s))
            .transpose()
    }

    /// Stores the private key of `kid`, sealed, where the store has none yet (moving a key
    /// file of an older MOAT_HOME in).
    pub fn adopt_identity_private_key(&self, kid: &str, der: &[u8]) -> Result<()> {
        let kid = kid.to_string();
        self.blocking(move |c| {
            let tx = c.transaction()?;
            let key = self.seal.active(&tx)?;
            let sealed = self.seal.seal_signing_key(&key, &kid, der)?;
            tx.execute(
                "UPDATE identity_keys SET private_key = ?2 WHERE kid = ?1 AND private_key IS NULL",
                params![kid, sealed],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// One rotation, in one transaction: the active key retires, the pending one signs, and
    /// `next` (its PKCS#8 private key `der`, sealed here) becomes the pending key.
    pub fn rotate_identity_keys(&self, next: &str, der: &[u8]) -> Result<()> {
        let (next, t) = (next.to_string(), super::now());
        self.blocking(move |c| {
            let tx = c.transaction()?;
            let key = self.seal.active(&tx)?;
            let sealed = self.seal.seal_signing_key(&key, &next, der)?;
            let pending: Option<String> = tx
                .query_row(
                    "SELECT kid FROM identity_keys WHERE state = 'pending'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(pending) = pending else {
                return Err(Error::Internal("no pending signing key to activate".into()));
            };
            tx.execute(
                "UPDATE identity_keys SET state = 'retired', retired_at = ?1 WHERE state = 'active'",
                [t],
            )?;
            tx.execute(
                "UPDATE identity_keys SET state = 'active', activated_at = ?2 WHERE kid = ?1",
                params![pending, t],
            )?;
            tx.execute(
                "INSERT INTO identity_keys (kid, state, created_at, private_key) \
                 VALUES (?1, 'pending', ?2, ?3)",
                params![next, t, sealed],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Moves every retired key's retirement `by` seconds into the past (tests of pruning).
    #[cfg(test)]
    pub fn age_retired_keys(&self, by: i64) -> Result<()> {
        self.blocking(move |c| {
            c.execute(
                "UPDATE identity_keys SET retired_at = retired_at - ?1 WHERE state = 'retired'",
                [by],
            )?;
            Ok(())
        })
    }

    pub fn delete_identity_key(&self, kid: &str) -> Result<()> {
        let kid = kid.to_string();
        self.blocking(move |c| {
            c.execute("DELETE FROM identity_keys WHERE kid = ?1", [&kid])?;
            Ok(())
        })
    }

    /// The uids of sandbox `sandbox` of `group`, made on first use.
    pub async fn workload_ids(&self, group: &str, sandbox: &str) -> Result<WorkloadIds> {
        let (group, sandbox) = (group.to_string(), sandbox.to_string());
        self.call(move |c| workload_ids(c, &group, &sandbox)).await
    }

    /// A new incarnation of `sandbox` (a resume): what the old one was given stops working.
    pub async fn next_incarnation(&self, sandbox: &str) -> Result<()> {
        let sandbox = sandbox.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE identity_sandboxes SET incarnation = incarnation + 1 WHERE sandbox = ?1",
                [&sandbox],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn insert_identity_event(&self, e: NewIdentityEvent) -> Result<()> {
        self.call(move |c| insert_event(c, &e)).await
    }

    pub async fn list_identity_events(
        &self,
        group: &str,
        sandbox: Option<String>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<IdentityEvent>> {
        let group = group.to_string();
        self.call(move |c| list_events(c, &group, sandbox.as_deref(), after, limit))
            .await
    }
}

fn keys(c: &Db) -> Result<Vec<KeyRow>> {
    let rows = c.query_map(
        "SELECT kid, state, created_at, activated_at, retired_at FROM identity_keys \
         ORDER BY created_at, kid",
        [],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for (kid, state, created_at, activated_at, retired_at) in rows {
        let state = KeyState::parse(&state)
            .ok_or_else(|| Error::Internal(format!("signing key {kid}: state {state:?}")))?;
        out.push(KeyRow {
            kid,
            state,
            created_at,
            activated_at,
            retired_at,
        });
    }
    Ok(out)
}

fn workload_ids(c: &Db, group: &str, sandbox: &str) -> Result<WorkloadIds> {
    let tx = c.transaction()?;
    // 64 bits for the group (its uid is in `sub`, which GCP caps at 127 bytes), 128 for the
    // sandbox.
    tx.execute(
        "INSERT INTO identity_groups (group_name, uid) VALUES (?1, ?2) \
         ON CONFLICT (group_name) DO NOTHING",
        params![group, random_hex(8)],
    )?;
    tx.execute(
        "INSERT INTO identity_sandboxes (sandbox, uid) VALUES (?1, ?2) \
         ON CONFLICT (sandbox) DO NOTHING",
        params![sandbox, random_hex(16)],
    )?;
    let group_uid = tx.query_row(
        "SELECT uid FROM identity_groups WHERE group_name = ?1",
        [group],
        |r| r.get(0),
    )?;
    let (sandbox_uid, incarnation): (String, i64) = tx.query_row(
        "SELECT uid, incarnation FROM identity_sandboxes WHERE sandbox = ?1",
        [sandbox],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    tx.commit()?;
    Ok(WorkloadIds {
        group_uid,
        sandbox_uid,
        incarnation: incarnation.max(0) as u64,
    })
}

fn insert_event(c: &Db, e: &NewIdentityEvent) -> Result<()> {
    let now = std::time::SystemTime::now();
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let tx = c.transaction()?;
    tx.execute(
        "INSERT INTO identity_events (time, time_ms, group_name, sandbox, outcome, delivery,
             audience, subject, jti, kid, expires_on, reason, key_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            moat_net::audit::rfc3339(now),
            ms,
            e.group,
            e.sandbox,
            match e.outcome {
                IdentityOutcome::Minted => "minted",
                IdentityOutcome::Refused => "refused",
            },
            e.delivery.as_str(),
            e.audience,
            e.subject,
            e.jti,
            e.kid,
            e.expires_on,
            e.reason,
            e.key_id,
        ],
    )?;
    tx.execute(
        "DELETE FROM identity_events WHERE id <= (SELECT MAX(id) FROM identity_events) - ?1",
        [EVENTS_KEPT],
    )?;
    tx.commit()?;
    Ok(())
}

fn list_events(
    c: &Db,
    group: &str,
    sandbox: Option<&str>,
    after: Option<u64>,
    limit: u32,
) -> Result<Vec<IdentityEvent>> {
    let mut sql = String::from(
        "SELECT id, time, sandbox, outcome, delivery, audience, subject, jti, kid, expires_on,
                reason, key_id
         FROM identity_events WHERE group_name = ?",
    );
    let mut args: Vec<Value> = vec![group.value()];
    if let Some(s) = sandbox {
        sql.push_str(" AND sandbox = ?");
        args.push(s.to_string().value());
    }
    let newest = after.is_none();
    if let Some(a) = after {
        sql.push_str(" AND id > ? ORDER BY id ASC");
        args.push(i64::try_from(a).unwrap_or(i64::MAX).value());
    } else {
        sql.push_str(" ORDER BY id DESC");
    }
    sql.push_str(" LIMIT ?");
    args.push(i64::from(limit).value());
    let mut out = c.query_map(&sql, args, |r| {
        let outcome: String = r.get(3)?;
        let delivery: String = r.get(4)?;
        Ok(IdentityEvent {
            id: r.get::<_, i64>(0)?.max(0) as u64,
            time: r.get(1)?,
            sandbox: r.get(2)?,
            outcome: if outcome == "minted" {
                IdentityOutcome::Minted
            } else {
                IdentityOutcome::Refused
            },
            delivery: match delivery.as_str() {
                "endpoint" => IdentityDelivery::Endpoint,
                "egress" => IdentityDelivery::Egress,
                _ => IdentityDelivery::Api,
            },
            audience: r.get(5)?,
            subject: r.get(6)?,
            jti: r.get(7)?,
            kid: r.get(8)?,
            expires_on: r.get(9)?,
            reason: r.get(10)?,
            key_id: r.get(11)?,
        })
    })?;
    if newest {
        out.reverse();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GroupSpec;
    use crate::store::groups::{delete_group, put_group};
    use crate::store::sandboxes::{insert_sandbox, tests::new_row};
    use crate::store::tests::open;

    /// A group or sandbox deleted and re-created under the same name never gets the old uid.
    #[test]
    fn uids_are_never_inherited() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let c = s.conn.lock().unwrap();
        put_group(&c, "g", &GroupSpec::default()).unwrap();
        insert_sandbox(&c, &new_row("s1", "g")).unwrap();
        let a = workload_ids(&c, "g", "s1").unwrap();
        assert_eq!(a, workload_ids(&c, "g", "s1").unwrap());
        assert_eq!((a.group_uid.len(), a.sandbox_uid.len()), (16, 32));
        insert_sandbox(&c, &new_row("s2", "g")).unwrap();
        let b = workload_ids(&c, "g", "s2").unwrap();
        assert_eq!(a.group_uid, b.group_uid);
        assert_ne!(a.sandbox_uid, b.sandbox_uid);
        delete_group(&c, "g", true).unwrap();
        put_group(&c, "g", &GroupSpec::default()).unwrap();
        insert_sandbox(&c, &new_row("s1", "g")).unwrap();
        let again = workload_ids(&c, "g", "s1").unwrap();
        assert_ne!(again.group_uid, a.group_uid);
        assert_ne!(again.sandbox_uid, a.sandbox_uid);
    }

    #[test]
    fn rotation_moves_every_state_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        assert!(s.insert_identity_key("a", KeyState::Active, b"ka").unwrap());
        // One active key: a second (another node starting at once) is not recorded.
        assert!(!s
            .insert_identity_key("a2", KeyState::Active, b"ka2")
            .unwrap());
        assert!(
            s.rotate_identity_keys("x", b"kx").is_err(),
            "no pending key"
        );
        assert!(s
            .insert_identity_key("b", KeyState::Pending, b"kb")
            .unwrap());
        s.rotate_identity_keys("c", b"kc").unwrap();
        assert_eq!(
            s.identity_private_key("c").unwrap().as_deref(),
            Some(&b"kc"[..])
        );
        let states: Vec<_> = s
            .identity_keys()
            .unwrap()
            .into_iter()
            .map(|k| (k.kid, k.state))
            .collect();
        assert!(states.contains(&("a".into(), KeyState::Retired)));
        assert!(states.contains(&("b".into(), KeyState::Active)));
        assert!(states.contains(&("c".into(), KeyState::Pending)));
    }
}
