//! The `audit_log` table: one row per mutating API call, pruned to the newest `retention`
//! rows at each insert.

use super::db::{params, Db};

use super::Store;
use crate::api::{rfc3339, AuditEvent, AuditQuery};
use crate::error::Result;

/// A call to record (see [`AuditEvent`] for the fields).
#[derive(Debug, Clone)]
pub struct NewAuditEvent {
    pub at_ms: i64,
    pub key_id: Option<String>,
    pub action: String,
    pub target: String,
    pub group: Option<String>,
    pub status: u16,
    pub request_id: String,
}

impl Store {
    /// Records `e` and drops what is older than the newest `retention` rows.
    pub async fn insert_audit_event(&self, e: NewAuditEvent, retention: u64) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO audit_log (at_ms, key_id, action, target, group_name, status,
                     request_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    e.at_ms,
                    e.key_id,
                    e.action,
                    e.target,
                    e.group,
                    e.status,
                    e.request_id
                ],
            )?;
            let keep = i64::try_from(retention).unwrap_or(i64::MAX);
            tx.execute(
                "DELETE FROM audit_log WHERE n <= (SELECT MAX(n) FROM audit_log) - ?1",
                [keep],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// A page of the events `q` selects, oldest first; and whether more follow.
    pub async fn list_audit_events(&self, q: AuditQuery) -> Result<(Vec<AuditEvent>, bool)> {
        self.call(move |c| list(c, &q)).await
    }
}

fn list(c: &Db, q: &AuditQuery) -> Result<(Vec<AuditEvent>, bool)> {
    let limit = q.limit.unwrap_or(100);
    // The casts give PostgreSQL the parameters' types where they stand alone.
    let mut events = c.query_map(
        "SELECT n, at_ms, key_id, action, target, group_name, status, request_id
         FROM audit_log
         WHERE n > ?1 AND at_ms >= ?2 AND (CAST(?3 AS TEXT) IS NULL OR key_id = ?3)
             AND (CAST(?4 AS TEXT) IS NULL OR group_name = ?4)
         ORDER BY n LIMIT ?5",
        params![
            q.after.unwrap_or(0) as i64,
            q.since.unwrap_or(0) as i64 * 1000,
            q.key,
            q.group,
            i64::from(limit) + 1
        ],
        |r| {
            Ok(AuditEvent {
                n: r.get::<_, i64>(0)? as u64,
                at: rfc3339_ms(r.get(1)?),
                key_id: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                group: r.get(5)?,
                status: r.get(6)?,
                request_id: r.get(7)?,
            })
        },
    )?;
    let more = events.len() > limit as usize;
    events.truncate(limit as usize);
    Ok((events, more))
}

/// `2024-01-02T03:04:05.678Z`.
fn rfc3339_ms(ms: i64) -> String {
    let secs = rfc3339(ms.div_euclid(1000));
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms.rem_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64, key: Option<&str>, group: Option<&str>) -> NewAuditEvent {
        NewAuditEvent {
            at_ms: 1_700_000_000_000 + n * 1000,
            key_id: key.map(str::to_string),
            action: "PUT /v1/sandbox-groups/{group}".to_string(),
            target: format!("/v1/sandbox-groups/{}", group.unwrap_or("x")),
            group: group.map(str::to_string),
            status: 201,
            request_id: format!("req-{n}"),
        }
    }

    #[tokio::test]
    async fn events_filter_page_and_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::super::tests::open(&dir);
        for n in 0..10 {
            let key = if n % 2 == 0 { Some("key-a") } else { None };
            let group = if n < 5 { Some("g") } else { Some("h") };
            s.insert_audit_event(event(n, key, group), 8).await.unwrap();
        }
        // Retention 8: the two oldest went.
        let (all, more) = s.list_audit_events(AuditQuery::default()).await.unwrap();
        assert!(!more);
        assert_eq!(all.len(), 8);
        assert_eq!(all[0].request_id, "req-2");
        assert_eq!(all[0].at, "2023-11-14T22:13:22.000Z");
        let q = |f: fn(&mut AuditQuery)| {
            let mut q = AuditQuery::default();
            f(&mut q);
            q
        };
        let (a, _) = s
            .list_audit_events(q(|q| q.key = Some("key-a".into())))
            .await
            .unwrap();
        assert_eq!(
            a.iter().map(|e| e.request_id.as_str()).collect::<Vec<_>>(),
            ["req-2", "req-4", "req-6", "req-8"]
        );
        let (g, _) = s
            .list_audit_events(q(|q| q.group = Some("g".into())))
            .await
            .unwrap();
        assert_eq!(g.len(), 3);
        let (since, _) = s
            .list_audit_events(q(|q| q.since = Some(1_700_000_008)))
            .await
            .unwrap();
        assert_eq!(since.len(), 2);
        let (page, more) = s.list_audit_events(q(|q| q.limit = Some(3))).await.unwrap();
        assert!(more);
        let after = page.last().unwrap().n;
        let (rest, more) = s
            .list_audit_events(AuditQuery {
                after: Some(after),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!more);
        assert_eq!(page.len() + rest.len(), 8);
    }
}
