//! The `egress_events` table: the egress audit, written in batches by the manager's audit
//! writer and pruned to the newest N rows, read by the egress routes.

use super::db::{params, Db, DbResult, Param, Value};

use super::Store;
use crate::api::{parse_rfc3339_ms, EgressEvent, EgressFilter, EgressKind, EgressVerdict};
use crate::error::Result;
use crate::sandboxes::AuditRecord;

impl Store {
    /// Stores `events` in one transaction, then keeps only the newest `retention` rows.
    pub async fn insert_egress_events(
        &self,
        events: Vec<AuditRecord>,
        retention: u64,
    ) -> Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            insert(&tx, &events)?;
            prune(&tx, retention)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// The events `f` selects, oldest first (see [`EgressFilter`]).
    pub async fn list_egress_events(&self, f: EgressFilter) -> Result<Vec<EgressEvent>> {
        self.call(move |c| list(c, &f)).await
    }
}

fn insert(c: &Db, events: &[AuditRecord]) -> Result<()> {
    for r in events {
        let e = &r.event;
        // The stack's clock is the host's; an unreadable time is stored as now.
        let (time, time_ms) = match parse_rfc3339_ms(&e.time) {
            Some(ms) => (e.time.clone(), ms),
            None => {
                let now = std::time::SystemTime::now();
                let ms = now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                (moat_net::audit::rfc3339(now), ms)
            }
        };
        let kind = match e.kind {
            moat_net::audit::Kind::Dns => "dns",
            moat_net::audit::Kind::Tcp => "tcp",
            moat_net::audit::Kind::Udp => "udp",
            moat_net::audit::Kind::Http => "http",
        };
        let verdict = match e.verdict {
            moat_net::audit::Verdict::Allow => "allow",
            moat_net::audit::Verdict::Deny => "deny",
        };
        c.execute(
            "INSERT INTO egress_events (time, time_ms, group_name, sandbox, kind, name, \
                 address, port, verdict, rule, reason, bytes_sent, bytes_received, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                time,
                time_ms,
                r.group,
                r.sandbox,
                kind,
                e.name,
                e.address,
                e.port,
                verdict,
                e.rule.map(|i| i as i64),
                e.reason,
                clamp(e.bytes_sent),
                clamp(e.bytes_received),
                clamp(e.duration_ms),
            ],
        )?;
    }
    Ok(())
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn prune(c: &Db, retention: u64) -> Result<()> {
    c.execute(
        "DELETE FROM egress_events WHERE id <= (SELECT MAX(id) FROM egress_events) - ?1",
        [clamp(retention)],
    )?;
    Ok(())
}

fn list(c: &Db, f: &EgressFilter) -> Result<Vec<EgressEvent>> {
    let mut sql = String::from(
        "SELECT id, time, sandbox, kind, name, address, port, verdict, rule, reason,
                bytes_sent, bytes_received, duration_ms
         FROM egress_events WHERE group_name = ?",
    );
    let mut args: Vec<Value> = vec![f.group.value()];
    if let Some(s) = &f.sandbox {
        sql.push_str(" AND sandbox = ?");
        args.push(s.clone().value());
    }
    if let Some(v) = f.verdict {
        sql.push_str(" AND verdict = ?");
        args.push(v.as_str().value());
    }
    if let Some(ms) = f.since_ms {
        sql.push_str(" AND time_ms >= ?");
        args.push(ms.value());
    }
    // Following: the oldest after the cursor. Otherwise the newest, turned oldest first.
    let newest = f.after.is_none();
    if let Some(a) = f.after {
        sql.push_str(" AND id > ? ORDER BY id ASC");
        args.push(clamp(a).value());
    } else {
        sql.push_str(" ORDER BY id DESC");
    }
    sql.push_str(" LIMIT ?");
    args.push(i64::from(f.limit).value());
    let mut out = c.query_map(&sql, args, |r| {
        let kind: String = r.get(3)?;
        let verdict: String = r.get(7)?;
        let n = |i: usize| -> DbResult<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
        Ok(EgressEvent {
            id: n(0)?,
            time: r.get(1)?,
            sandbox: r.get(2)?,
            kind: match kind.as_str() {
                "dns" => EgressKind::Dns,
                "udp" => EgressKind::Udp,
                "http" => EgressKind::Http,
                _ => EgressKind::Tcp,
            },
            name: r.get(4)?,
            address: r.get(5)?,
            port: r.get(6)?,
            verdict: if verdict == "allow" {
                EgressVerdict::Allow
            } else {
                EgressVerdict::Deny
            },
            rule: r.get::<_, Option<i64>>(8)?.map(|i| i as u32),
            reason: r.get(9)?,
            bytes_sent: n(10)?,
            bytes_received: n(11)?,
            duration_ms: n(12)?,
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
    use moat_net::audit::{Event, Kind, Verdict};

    fn record(group: &str, sandbox: &str, verdict: Verdict, time: &str) -> AuditRecord {
        let mut event = Event::new(Kind::Tcp, verdict, "rule");
        event.time = time.to_string();
        event.name = Some("web.test".into());
        event.port = Some(80);
        event.bytes_sent = 5;
        AuditRecord {
            group: group.into(),
            sandbox: sandbox.into(),
            event,
        }
    }

    fn filter(group: &str) -> EgressFilter {
        EgressFilter {
            group: group.into(),
            sandbox: None,
            verdict: None,
            since_ms: None,
            after: None,
            limit: 100,
        }
    }

    #[test]
    fn filters_order_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_store(dir.path());
        let c = &store.conn.lock().unwrap();
        let t = |s: u32| format!("2026-11-30T15:00:{s:02}.000Z");
        let mut batch = Vec::new();
        for i in 0..10u32 {
            let v = if i % 2 == 0 {
                Verdict::Allow
            } else {
                Verdict::Deny
            };
            batch.push(record("g", if i < 5 { "sb-a" } else { "sb-b" }, v, &t(i)));
        }
        batch.push(record("other", "sb-c", Verdict::Allow, &t(0)));
        batch.push(record("g", "sb-a", Verdict::Allow, "garbage"));
        insert(c, &batch).unwrap();
        let all = list(c, &filter("g")).unwrap();
        assert_eq!(all.len(), 11);
        assert!(all.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
        assert_eq!(all[0].time, t(0));
        assert_eq!(all[0].bytes_sent, 5);
        assert!(
            all[10].time.ends_with('Z'),
            "an unreadable time is stored as now"
        );
        let f = EgressFilter {
            sandbox: Some("sb-b".into()),
            verdict: Some(EgressVerdict::Deny),
            ..filter("g")
        };
        let got = list(c, &f).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got
            .iter()
            .all(|e| e.sandbox == "sb-b" && e.verdict == EgressVerdict::Deny));
        let f = EgressFilter {
            since_ms: parse_rfc3339_ms(&t(8)),
            ..filter("g")
        };
        assert_eq!(
            list(c, &f).unwrap().len(),
            3,
            "t8, t9 and the one stored as now"
        );
        // Without a cursor: the newest; with one: the oldest after it.
        let f = EgressFilter {
            limit: 2,
            ..filter("g")
        };
        let newest = list(c, &f).unwrap();
        assert_eq!(newest.len(), 2);
        assert_eq!(newest[1].id, all[10].id);
        let f = EgressFilter {
            after: Some(all[2].id),
            limit: 2,
            ..filter("g")
        };
        let next = list(c, &f).unwrap();
        assert_eq!(
            next.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![all[3].id, all[4].id]
        );
        prune(c, 4).unwrap();
        let total: i64 = c
            .query_row("SELECT COUNT(*) FROM egress_events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(total, 4, "the newest 4 over all groups");
        assert_eq!(
            list(c, &filter("g")).unwrap().last().unwrap().id,
            all[10].id
        );
    }
}
