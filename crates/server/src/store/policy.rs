//! The `policies`, `group_policy` and `policy_decisions` tables: every version of a group's
//! policy, the version in force, and the hash-chained decisions log (moat_policy::log), which
//! is only ever appended to (triggers refuse updates and deletes).

use super::db::{params, Db, DbResult, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use super::{now, Store};
use crate::api::{rfc3339, DecisionFilter, LogAnchor, LogEntry, Policy, PolicyVersion, Verdict};
use crate::error::{Error, Result};

impl Store {
    /// The policy in force for `group` (None when it never had one).
    pub async fn get_policy(&self, group: &str) -> Result<Option<PolicyVersion>> {
        let group = group.to_string();
        self.call(move |c| active(c, &group)).await
    }

    /// Every version of `group`'s policy, oldest first.
    pub async fn list_policy_versions(&self, group: &str) -> Result<Vec<PolicyVersion>> {
        let group = group.to_string();
        self.call(move |c| {
            let rows = c.query_map(
                "SELECT group_name, version, body, sha256, author, created_at FROM policies \
                 WHERE group_name = ?1 ORDER BY version",
                [&group],
                version_row,
            )?;
            rows.into_iter().map(version_from).collect()
        })
        .await
    }

    /// Makes `policy` the one in force for `group` (which must exist), as a new version,
    /// unless it is the one in force already. Returns it and whether a version was made.
    pub async fn put_policy(
        &self,
        group: &str,
        policy: &Policy,
        author: &str,
    ) -> Result<(PolicyVersion, bool)> {
        let (group, author) = (group.to_string(), author.to_string());
        let body = serde_json::to_string(policy)
            .map_err(|e| Error::Internal(format!("serializing a policy: {e}")))?;
        self.call(move |c| {
            let tx = c.transaction()?;
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM sandbox_groups WHERE name = ?1)",
                [&group],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(Error::NotFound(format!(
                    "no sandbox group {}",
                    crate::api::quote(&group)
                )));
            }
            if let Some(current) = active(&tx, &group)? {
                if serde_json::to_string(&current.policy).ok().as_deref() == Some(body.as_str()) {
                    return Ok((current, false));
                }
            }
            // Versions go on across a deletion of the group: decisions name them.
            let version: i64 = tx.query_row(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM policies WHERE group_name = ?1",
                [&group],
                |r| r.get(0),
            )?;
            let sha = hex::encode(Sha256::digest(body.as_bytes()));
            tx.execute(
                "INSERT INTO policies (group_name, version, body, sha256, author, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![group, version, body, sha, author, now()],
            )?;
            tx.execute(
                "INSERT INTO group_policy (group_name, version) VALUES (?1, ?2) \
                 ON CONFLICT (group_name) DO UPDATE SET version = excluded.version",
                params![group, version],
            )?;
            let stored = active(&tx, &group)?
                .ok_or_else(|| Error::Internal("a policy just written is missing".into()))?;
            tx.commit()?;
            Ok((stored, true))
        })
        .await
    }

    /// Version `version` of `group`'s policy (None when there is no such version).
    pub async fn get_policy_version(
        &self,
        group: &str,
        version: u64,
    ) -> Result<Option<PolicyVersion>> {
        let group = group.to_string();
        self.call(move |c| {
            c.query_row(
                "SELECT group_name, version, body, sha256, author, created_at FROM policies \
                 WHERE group_name = ?1 AND version = ?2",
                params![group, version as i64],
                version_row,
            )
            .optional()?
            .map(version_from)
            .transpose()
        })
        .await
    }

    /// Appends `entry` to its group's decisions log: numbers it and chains it to the group's
    /// newest entry in one transaction, so concurrent decisions cannot fork the chain.
    pub async fn record_decision(&self, mut entry: LogEntry) -> Result<LogEntry> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let prev: Option<(i64, String)> = tx
                .query_row(
                    "SELECT n, hash FROM policy_decisions WHERE group_name = ?1 \
                     ORDER BY n DESC LIMIT 1",
                    [&entry.group],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            entry.chain_after(prev.as_ref().map(|(n, h)| (*n as u64, h.as_str())));
            let json = serde_json::to_string(&entry)
                .map_err(|e| Error::Internal(format!("serializing a decision: {e}")))?;
            tx.execute(
                "INSERT INTO policy_decisions (group_name, n, at, verdict, hash, entry) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    entry.group,
                    entry.n as i64,
                    now(),
                    entry.verdict.as_str(),
                    entry.hash,
                    json
                ],
            )?;
            tx.commit()?;
            Ok(entry.clone())
        })
        .await
    }

    /// A page of `group`'s decisions log, oldest first, and whether more follow.
    pub async fn list_decisions(
        &self,
        group: &str,
        q: &DecisionFilter,
    ) -> Result<(Vec<LogEntry>, bool)> {
        let (group, q) = (group.to_string(), q.clone());
        self.call(move |c| page(c, &group, &q)).await
    }

    /// A page and the log's anchor, read in one transaction so that a pruning in between
    /// cannot make them disagree.
    pub async fn list_decisions_anchored(
        &self,
        group: &str,
        q: &DecisionFilter,
    ) -> Result<(Vec<LogEntry>, bool, Option<LogAnchor>)> {
        let (group, q) = (group.to_string(), q.clone());
        self.call(move |c| {
            let tx = c.transaction()?;
            let anchor = anchor_of(&tx, &group)?;
            let (items, more) = page(&tx, &group, &q)?;
            tx.commit()?;
            Ok((items, more, anchor))
        })
        .await
    }

    /// Where `group`'s log starts after pruning (None: nothing was ever pruned).
    pub async fn decisions_anchor(&self, group: &str) -> Result<Option<LogAnchor>> {
        let group = group.to_string();
        self.call(move |c| anchor_of(c, &group)).await
    }

    /// Prunes every group's decisions made before `before` (unix seconds), keeping at least
    /// each group's newest entry (the next one chains to it). The newest pruned entry becomes
    /// the group's anchor first, in the same transaction: the triggers let entries go only at
    /// or before it. Returns how many entries went.
    pub async fn prune_decisions(&self, before: i64) -> Result<u64> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let cuts: Vec<(String, i64, String)> = tx.query_map(
                "SELECT d.group_name, d.n, d.hash FROM policy_decisions d \
                     JOIN (SELECT group_name, CASE \
                             WHEN MAX(CASE WHEN at < ?1 THEN n END) <= MAX(n) - 1 \
                               THEN MAX(CASE WHEN at < ?1 THEN n END) \
                             WHEN MAX(CASE WHEN at < ?1 THEN n END) IS NOT NULL \
                               THEN MAX(n) - 1 END AS cut \
                           FROM policy_decisions GROUP BY group_name) c \
                       ON c.group_name = d.group_name AND c.cut = d.n \
                     WHERE d.n > COALESCE((SELECT n FROM policy_log_anchors a \
                                           WHERE a.group_name = d.group_name), 0)",
                [before],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let mut pruned = 0;
            for (group, n, hash) in cuts {
                tx.execute(
                    "INSERT INTO policy_log_anchors (group_name, n, hash, pruned_at) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (group_name) DO UPDATE SET \
                     n = excluded.n, hash = excluded.hash, pruned_at = excluded.pruned_at",
                    params![group, n, hash, now()],
                )?;
                pruned += tx.execute(
                    "DELETE FROM policy_decisions WHERE group_name = ?1 AND n <= ?2",
                    params![group, n],
                )? as u64;
            }
            tx.commit()?;
            Ok(pruned)
        })
        .await
    }

    /// The newest `limit` decisions of `group`, oldest first (what a replay checks again).
    pub async fn recent_decisions(&self, group: &str, limit: u32) -> Result<Vec<LogEntry>> {
        let group = group.to_string();
        self.call(move |c| {
            let rows = c.query_map(
                "SELECT entry FROM policy_decisions WHERE group_name = ?1 \
                 ORDER BY n DESC LIMIT ?2",
                params![group, limit],
                |r| r.get::<_, String>(0),
            )?;
            let mut out = Vec::new();
            for row in rows {
                out.push(entry_from(&row)?);
            }
            out.reverse();
            Ok(out)
        })
        .await
    }
}

fn page(c: &Db, group: &str, q: &DecisionFilter) -> Result<(Vec<LogEntry>, bool)> {
    let rows = c.query_map(
        "SELECT entry FROM policy_decisions WHERE group_name = ?1 AND n > ?2 \
         AND (CAST(?3 AS TEXT) IS NULL OR verdict = ?3) AND (CAST(?4 AS BIGINT) IS NULL OR at >= ?4) \
         ORDER BY n LIMIT ?5",
        params![
            group,
            q.after as i64,
            q.verdict.map(Verdict::as_str),
            q.since,
            i64::from(q.limit) + 1
        ],
        |r| r.get::<_, String>(0),
    )?;
    let mut out = Vec::new();
    for row in rows {
        out.push(entry_from(&row)?);
    }
    let more = out.len() > q.limit as usize;
    out.truncate(q.limit as usize);
    Ok((out, more))
}

fn anchor_of(c: &Db, group: &str) -> Result<Option<LogAnchor>> {
    Ok(c.query_row(
        "SELECT n, hash, pruned_at FROM policy_log_anchors WHERE group_name = ?1",
        [group],
        |r| {
            Ok(LogAnchor {
                n: r.get::<_, i64>(0)? as u64,
                hash: r.get(1)?,
                pruned_at: rfc3339(r.get(2)?),
            })
        },
    )
    .optional()?)
}

/// A stored entry as written. It is not re-checked here: `verify-log` does that, and an entry
/// that no longer parses is reported rather than hidden.
fn entry_from(json: &str) -> Result<LogEntry> {
    serde_json::from_str(json).map_err(|e| {
        Error::Internal(format!(
            "a stored policy decision is not a log entry ({e}); the log was changed outside \
             moat"
        ))
    })
}

type VersionRow = (String, i64, String, String, String, i64);

fn version_row(r: &Row) -> DbResult<VersionRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn version_from(row: VersionRow) -> Result<PolicyVersion> {
    let (group, version, body, sha, author, created) = row;
    let policy: Policy = serde_json::from_str(&body)
        .map_err(|e| Error::Internal(format!("stored policy {version} of group {group}: {e}")))?;
    Ok(PolicyVersion {
        group,
        version: version as u64,
        policy,
        sha256: Some(sha),
        author: Some(author),
        created_at: Some(rfc3339(created)),
    })
}

fn active(conn: &Db, group: &str) -> Result<Option<PolicyVersion>> {
    conn.query_row(
        "SELECT p.group_name, p.version, p.body, p.sha256, p.author, p.created_at \
         FROM group_policy g JOIN policies p \
           ON p.group_name = g.group_name AND p.version = g.version \
         WHERE g.group_name = ?1",
        [group],
        version_row,
    )
    .optional()?
    .map(version_from)
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CheckRequest, Decision, GroupSpec, Mode};

    fn entry(group: &str, verdict: Verdict, argv: &str) -> LogEntry {
        LogEntry {
            n: 0,
            group: group.into(),
            at: rfc3339(now()),
            key: "key-1".into(),
            route: "exec".into(),
            sandbox: Some("sb-1".into()),
            request: CheckRequest {
                argv: Some(vec![argv.into()]),
                ..Default::default()
            },
            policy_version: 1,
            verdict,
            decision: Decision {
                allowed: verdict != Verdict::Deny,
                mode: Mode::Enforce,
                findings: vec![],
            },
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    /// What someone with write access to the database can do: drop a guard.
    fn drop_trigger(c: &Db, name: &str, table: &str) {
        let sql = match c.backend() {
            crate::store::Backend::Sqlite => format!("DROP TRIGGER {name}"),
            crate::store::Backend::Postgres => format!("DROP TRIGGER {name} ON {table}"),
        };
        c.execute_batch(&sql).unwrap();
    }

    fn filter(verdict: Option<Verdict>, after: u64, limit: u32) -> DecisionFilter {
        DecisionFilter {
            verdict,
            since: None,
            after,
            limit,
        }
    }

    #[tokio::test]
    async fn versions_are_kept_and_a_deleted_group_starts_off() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        let p1 = Policy::parse("mode: audit\n").unwrap();
        let e = s.put_policy("g", &p1, "key-1").await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        s.put_group("g", &GroupSpec::default()).await.unwrap();
        assert!(s.get_policy("g").await.unwrap().is_none());
        let (v1, made) = s.put_policy("g", &p1, "key-1").await.unwrap();
        assert!(made);
        assert_eq!((v1.version, v1.author.as_deref()), (1, Some("key-1")));
        // The same policy again makes no version.
        let (again, made) = s.put_policy("g", &p1, "key-2").await.unwrap();
        assert!(!made);
        assert_eq!(again.version, 1);
        let p2 = Policy::parse("mode: enforce\n").unwrap();
        let (v2, _) = s.put_policy("g", &p2, "key-2").await.unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(
            s.get_policy("g").await.unwrap().unwrap().policy.mode,
            Mode::Enforce
        );
        let all = s.list_policy_versions("g").await.unwrap();
        assert_eq!(all.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
        assert_ne!(all[0].sha256, all[1].sha256);

        s.delete_group("g", false).await.unwrap();
        s.put_group("g", &GroupSpec::default()).await.unwrap();
        assert!(
            s.get_policy("g").await.unwrap().is_none(),
            "a new group is off"
        );
        let (v3, _) = s.put_policy("g", &p1, "key-1").await.unwrap();
        assert_eq!(v3.version, 3, "versions go on: old decisions name 1 and 2");
    }

    #[tokio::test]
    async fn decisions_chain_page_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        for (i, v) in [Verdict::Allow, Verdict::Deny, Verdict::Audit, Verdict::Deny]
            .into_iter()
            .enumerate()
        {
            let e = s
                .record_decision(entry("g", v, &format!("p{i}")))
                .await
                .unwrap();
            assert_eq!(e.n, i as u64 + 1);
        }
        s.record_decision(entry("h", Verdict::Allow, "other"))
            .await
            .unwrap();
        let (all, more) = s.list_decisions("g", &filter(None, 0, 100)).await.unwrap();
        assert!(!more);
        assert_eq!(all.len(), 4);
        let v = moat_policy::log::verify("g", &all);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let (h, _) = s.list_decisions("h", &filter(None, 0, 100)).await.unwrap();
        assert_eq!((h.len(), h[0].n), (1, 1), "each group has its own chain");

        let (denied, _) = s
            .list_decisions("g", &filter(Some(Verdict::Deny), 0, 100))
            .await
            .unwrap();
        assert_eq!(denied.iter().map(|e| e.n).collect::<Vec<_>>(), [2, 4]);
        let (page, more) = s.list_decisions("g", &filter(None, 1, 2)).await.unwrap();
        assert!(more);
        assert_eq!(page.iter().map(|e| e.n).collect::<Vec<_>>(), [2, 3]);
        let recent = s.recent_decisions("g", 2).await.unwrap();
        assert_eq!(recent.iter().map(|e| e.n).collect::<Vec<_>>(), [3, 4]);
    }

    /// Pruning keeps the log verifiable from its anchor; it is the one way entries go (a
    /// delete after the anchor, or moving the anchor back, is refused); an edit after pruning
    /// is still named.
    #[tokio::test]
    async fn pruning_keeps_the_log_verifiable_and_tampering_visible() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        for i in 0..4 {
            s.record_decision(entry("g", Verdict::Deny, &format!("old{i}")))
                .await
                .unwrap();
        }
        s.record_decision(entry("h", Verdict::Allow, "only"))
            .await
            .unwrap();
        // Entries 1–4 of g are old; g's newest and h's only entry are always kept.
        assert_eq!(s.prune_decisions(now() + 10).await.unwrap(), 3);
        assert_eq!(s.decisions_anchor("h").await.unwrap(), None);
        s.record_decision(entry("g", Verdict::Allow, "new"))
            .await
            .unwrap();
        let anchor = s.decisions_anchor("g").await.unwrap().unwrap();
        assert_eq!(anchor.n, 3);
        let verify = || async {
            let (all, _) = s.list_decisions("g", &filter(None, 0, 100)).await.unwrap();
            let mut v = moat_policy::log::Verifier::new("g");
            v.anchor(&s.decisions_anchor("g").await.unwrap().unwrap());
            for e in &all {
                v.push(e);
            }
            v.finish()
        };
        let v = verify().await;
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.entries, v.pruned), (2, 3));
        // Nothing old enough: nothing goes.
        assert_eq!(s.prune_decisions(now() - 3600).await.unwrap(), 0);
        s.with_conn(|c| {
            for sql in [
                "DELETE FROM policy_decisions WHERE group_name = 'g' AND n = 4",
                "UPDATE policy_log_anchors SET n = 2",
                "UPDATE policy_log_anchors SET hash = 'x'",
                "DELETE FROM policy_log_anchors",
            ] {
                let e = c.execute(sql, []).unwrap_err().to_string();
                assert!(
                    e.contains("append-only") || e.contains("anchor"),
                    "{sql}: {e}"
                );
            }
            drop_trigger(c, "policy_decisions_no_update", "policy_decisions");
            let json: String = c
                .query_row(
                    "SELECT entry FROM policy_decisions WHERE group_name = 'g' AND n = 4",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            c.execute(
                "UPDATE policy_decisions SET entry = ?1 WHERE group_name = 'g' AND n = 4",
                [json.replace("\"old3\"", "\"ls\"")],
            )
            .unwrap();
        });
        let v = verify().await;
        assert!(
            v.problems[0].starts_with("entry 4: its content does not match its hash"),
            "{:?}",
            v.problems
        );
    }

    /// The adversarial case: the log refuses changes through SQL, and when someone drops that
    /// guard and edits or deletes rows anyway, verifying names the entry where it happened.
    #[tokio::test]
    async fn tampering_is_refused_and_then_detected_where_it_happened() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        for i in 0..5 {
            s.record_decision(entry("g", Verdict::Deny, &format!("curl{i}")))
                .await
                .unwrap();
        }
        let verify = || async {
            let (all, _) = s.list_decisions("g", &filter(None, 0, 100)).await.unwrap();
            moat_policy::log::verify("g", &all)
        };
        assert!(verify().await.problems.is_empty());
        s.with_conn(|c| {
            let e = c
                .execute("DELETE FROM policy_decisions WHERE n = 2", [])
                .unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
            let e = c
                .execute("UPDATE policy_decisions SET verdict = 'allow'", [])
                .unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
            drop_trigger(c, "policy_decisions_no_update", "policy_decisions");
            drop_trigger(c, "policy_decisions_no_delete", "policy_decisions");
            // Entry 2 now says it was allowed; entry 4 is gone.
            let json: String = c
                .query_row("SELECT entry FROM policy_decisions WHERE n = 2", [], |r| {
                    r.get(0)
                })
                .unwrap();
            let edited = json.replace("\"curl1\"", "\"ls\"");
            assert_ne!(edited, json);
            c.execute(
                "UPDATE policy_decisions SET entry = ?1 WHERE n = 2",
                [&edited],
            )
            .unwrap();
            c.execute("DELETE FROM policy_decisions WHERE n = 4", [])
                .unwrap();
        });
        let v = verify().await;
        assert_eq!(v.entries, 4);
        assert!(
            v.problems[0].starts_with("entry 2: its content does not match its hash"),
            "{:?}",
            v.problems
        );
        assert!(
            v.problems[1].contains("entry 4 is missing"),
            "{:?}",
            v.problems
        );
        assert!(
            v.problems[2].starts_with("entry 5: its prev_hash"),
            "{:?}",
            v.problems
        );
    }
}
