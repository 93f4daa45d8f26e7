//! Audit events: one per DNS answer and one per flow (written when the flow ends, with its
//! byte counts), sent to the daemon as JSON lines on the control channel (`control.rs`). The
//! queue to the writer is bounded: a guest that floods the stack with denied attempts loses
//! events (counted in `dropped`), never the host's memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dns,
    Tcp,
    Udp,
    /// A request of an intercepted flow: a transform's injection or a refusal.
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// One decision on the record. `address` is the destination the guest used (for DNS: the
/// address moat answered), `resolved` the host-side addresses of a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub verdict: Verdict,
    /// Index of the deciding rule in the group's `egress.rules`; absent for the default and
    /// for checks outside the rules (floor, SNI, limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    pub reason: String,
    /// Guest to host.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Host to guest.
    #[serde(default)]
    pub bytes_received: u64,
    #[serde(default)]
    pub duration_ms: u64,
    /// DNS only: the query type (A, AAAA, TXT…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<String>,
}

impl Event {
    pub fn new(kind: Kind, verdict: Verdict, reason: impl Into<String>) -> Event {
        Event {
            time: rfc3339(SystemTime::now()),
            kind,
            name: None,
            address: None,
            port: None,
            verdict,
            rule: None,
            reason: reason.into(),
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0,
            qtype: None,
            resolved: Vec::new(),
        }
    }

    pub fn from_decision(kind: Kind, d: &crate::Decision) -> Event {
        let verdict = if d.allow {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        let mut e = Event::new(kind, verdict, d.reason.clone());
        e.rule = d.rule;
        e
    }
}

/// Where events go. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Audit {
    tx: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
}

impl Audit {
    /// A sink with room for `capacity` events not yet written, and its receiving end.
    pub fn channel(capacity: usize) -> (Audit, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Audit {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    pub fn emit(&self, e: Event) {
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events lost because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// `2026-11-30T15:04:05.123Z`, without a date crate: days since the epoch to a civil date
/// (the algorithm from Howard Hinnant's "chrono-compatible low-level date algorithms").
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_051_045_123);
        assert_eq!(rfc3339(t), "2026-11-30T15:04:05.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_full_queue_counts_drops() {
        let (a, mut rx) = Audit::channel(1);
        a.emit(Event::new(Kind::Tcp, Verdict::Deny, "x"));
        a.emit(Event::new(Kind::Tcp, Verdict::Deny, "y"));
        assert_eq!(a.dropped(), 1);
        assert_eq!(rx.try_recv().unwrap().reason, "x");
    }

    #[test]
    fn json_shape() {
        let mut e = Event::new(Kind::Dns, Verdict::Allow, "rule");
        e.name = Some("a.test".into());
        e.rule = Some(0);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "dns");
        assert_eq!(v["verdict"], "allow");
        assert_eq!(v["rule"], 0);
        assert!(v.get("port").is_none());
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
