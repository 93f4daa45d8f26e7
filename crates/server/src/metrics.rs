//! Prometheus metrics, with the text exposition written by hand: a handful of metric families
//! do not justify a registry crate. Labels are route templates (`/v1/sandbox-groups/{group}`),
//! never raw paths, and group names (which only keys allowed to create groups can add), so a
//! client cannot grow the label set without bound.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the request-latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Upper bounds (seconds) of the buckets of VM operations (create, exec, suspend, resume):
/// from a pool hand-over (milliseconds) to a cold template build (a minute).
const VM_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
];

/// The VM-operation histograms: (name, help).
pub const CREATE: (&str, &str) = (
    "moat_sandbox_create_duration_seconds",
    "Time to create a sandbox, by whether a warm pool served it (pool=\"hit\") or the \
     template was restored (pool=\"miss\").",
);
pub const EXEC: (&str, &str) = (
    "moat_exec_duration_seconds",
    "Time to run an exec (collected or streamed), from request to the command's exit.",
);
pub const SUSPEND: (&str, &str) = (
    "moat_sandbox_suspend_duration_seconds",
    "Time to suspend a sandbox (memory and disk saved, VM ended).",
);
pub const RESUME: (&str, &str) = (
    "moat_sandbox_resume_duration_seconds",
    "Time to resume a suspended sandbox.",
);
pub const UNPARK: (&str, &str) = (
    "moat_sandbox_unpark_duration_seconds",
    "Time to continue a parked (idle, vCPUs stopped) sandbox or warm-pool VM before a request, \
     clock refresh included.",
);
pub const POLICY_CHECK: (&str, &str) = (
    "moat_policy_check_duration_seconds",
    "Time to check a request against its group's policy (analysis in a worker process).",
);
/// The counters: (name, help).
pub const POOL_HITS: (&str, &str) = (
    "moat_pool_hits_total",
    "Creates served by a group's warm pool.",
);
pub const POOL_MISSES: (&str, &str) = (
    "moat_pool_misses_total",
    "Creates in a group with a warm pool that the pool could not serve (it was empty, or the \
     request asked for another image or tier).",
);
pub const EGRESS_CONNECTIONS: (&str, &str) = (
    "moat_egress_connections_total",
    "Connections (TCP flows and UDP relays) from sandboxes that their network stack decided, \
     by group and verdict.",
);
pub const EGRESS_REQUESTS: (&str, &str) = (
    "moat_egress_intercepted_requests_total",
    "Requests of intercepted flows (hosts with a transform) by group and verdict: allow is an \
     injection, deny a refusal (Host not the TLS name, a missing secret, a path not plain).",
);
pub const EGRESS_DNS: (&str, &str) = (
    "moat_egress_dns_queries_total",
    "DNS queries from sandboxes that their network stack answered, by group and verdict \
     (deny: NXDOMAIN).",
);
pub const EGRESS_BYTES_SENT: (&str, &str) = (
    "moat_egress_bytes_sent_total",
    "Bytes sandboxes sent through allowed connections (counted when each ends), by group.",
);
pub const EGRESS_BYTES_RECEIVED: (&str, &str) = (
    "moat_egress_bytes_received_total",
    "Bytes sandboxes received through allowed connections (counted when each ends), by group.",
);

pub const IDENTITY_MINTED: (&str, &str) = (
    "moat_identity_tokens_minted_total",
    "Workload identity tokens minted, by group and delivery (api, endpoint, egress).",
);
pub const IDENTITY_REFUSED: (&str, &str) = (
    "moat_identity_refusals_total",
    "Workload identity token requests refused, by group and reason (disabled, in_guest, \
     audience, ttl, not_running, no_sandbox, endpoint, internal; endpoint: the in-guest \
     endpoint refused the request itself).",
);
pub const IDENTITY_MINT: (&str, &str) = (
    "moat_identity_mint_duration_seconds",
    "Time to decide and sign a workload identity token.",
);

pub const AGENT_RECOVERIES: (&str, &str) = (
    "moat_agent_recoveries_total",
    "Sandboxes whose agent stopped answering or broke the protocol, by outcome (recovered: a \
     new session answers; failed: the sandbox was failed and its VM stopped).",
);

pub const POLICY_DECISIONS: (&str, &str) = (
    "moat_policy_decisions_total",
    "Decisions under group policies, by group, verdict (allow, deny, audit) and rule (one \
     count per distinct rule of a decision; none when nothing was found).",
);

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    /// (family, rendered labels) → histogram over VM_BUCKETS.
    ops: BTreeMap<(&'static str, String), OpHistogram>,
    /// (family, rendered labels) → count.
    counters: BTreeMap<(&'static str, String), u64>,
    helps: BTreeMap<&'static str, &'static str>,
}

#[derive(Default)]
struct OpHistogram {
    counts: [u64; VM_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// A labelled gauge read at scrape time: (name, help, [(labels, value)]); labels are
/// `(key, value)` pairs.
pub type Gauge<'a> = (&'a str, &'a str, Vec<(Vec<(&'a str, String)>, f64)>);

#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Metrics {
    pub fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.requests.entry((route.to_string(), status)).or_default() += 1;
        let h = m.latency.entry(route.to_string()).or_default();
        let secs = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        h.counts[slot] += 1;
        h.sum += secs;
        h.count += 1;
    }

    /// Records one VM operation of family `op` (one of the constants above) with `labels`.
    pub fn observe_op(
        &self,
        op: (&'static str, &'static str),
        labels: &[(&str, &str)],
        d: Duration,
    ) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.helps.insert(op.0, op.1);
        let h = m.ops.entry((op.0, render_labels(labels))).or_default();
        let secs = d.as_secs_f64();
        let slot = VM_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(VM_BUCKETS.len());
        h.counts[slot] += 1;
        h.sum += secs;
        h.count += 1;
    }

    /// Adds one to counter `c` (one of the constants above) with `labels`.
    pub fn count(&self, c: (&'static str, &'static str), labels: &[(&str, &str)]) {
        self.add(c, labels, 1);
    }

    /// Adds `n` to counter `c` (one of the constants above) with `labels`.
    pub fn add(&self, c: (&'static str, &'static str), labels: &[(&str, &str)], n: u64) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.helps.insert(c.0, c.1);
        *m.counters.entry((c.0, render_labels(labels))).or_default() += n;
    }

    /// The text exposition format (version 0.0.4). `gauges` are read at scrape time.
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP moat_http_requests_total HTTP requests answered, by route and status.\n\
             # TYPE moat_http_requests_total counter"
        );
        for ((route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "moat_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP moat_http_request_duration_seconds Time to answer an HTTP request.\n\
             # TYPE moat_http_request_duration_seconds histogram"
        );
        for (route, h) in &m.latency {
            let r = escape(route);
            let mut cum = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += h.counts[i];
                let _ = writeln!(
                    out,
                    "moat_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"{b}\"}} {cum}"
                );
            }
            let _ = writeln!(
                out,
                "moat_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {}\n\
                 moat_http_request_duration_seconds_sum{{route=\"{r}\"}} {}\n\
                 moat_http_request_duration_seconds_count{{route=\"{r}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let mut last = "";
        for ((name, labels), h) in &m.ops {
            if *name != last {
                let help = m.helps.get(name).copied().unwrap_or("");
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
                last = name;
            }
            let sep = if labels.is_empty() { "" } else { "," };
            let mut cum = 0;
            for (i, b) in VM_BUCKETS.iter().enumerate() {
                cum += h.counts[i];
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
            }
            let braced = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}\n{name}_sum{braced} {}\n\
                 {name}_count{braced} {}",
                h.count, h.sum, h.count
            );
        }
        let mut last = "";
        for ((name, labels), n) in &m.counters {
            if *name != last {
                let help = m.helps.get(name).copied().unwrap_or("");
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                last = name;
            }
            let _ = writeln!(out, "{name}{{{labels}}} {n}");
        }
        for (name, help, values) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in values {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let pairs: Vec<(&str, &str)> =
                        labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    let _ = writeln!(out, "{name}{{{}}} {v}", render_labels(&pairs));
                }
            }
        }
        out
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.observe("/healthz", 200, Duration::from_micros(100));
        m.observe("/healthz", 200, Duration::from_millis(30));
        m.observe("/healthz", 404, Duration::from_secs(10));
        m.observe_op(CREATE, &[("pool", "hit")], Duration::from_millis(3));
        m.observe_op(CREATE, &[("pool", "miss")], Duration::from_millis(300));
        m.count(POOL_HITS, &[("group", "web")]);
        m.count(POOL_HITS, &[("group", "web")]);
        let t = m.render(&[
            ("moat_sandbox_groups", "Groups.", vec![(vec![], 3.0)]),
            (
                "moat_sandboxes",
                "By state.",
                vec![(vec![("state", "running".to_string())], 2.0)],
            ),
        ]);
        assert!(t.contains("moat_http_requests_total{route=\"/healthz\",status=\"200\"} 2"));
        assert!(t.contains("moat_http_requests_total{route=\"/healthz\",status=\"404\"} 1"));
        assert!(t.contains("_bucket{route=\"/healthz\",le=\"0.0005\"} 1"));
        assert!(t.contains("_bucket{route=\"/healthz\",le=\"0.05\"} 2"));
        assert!(t.contains("_bucket{route=\"/healthz\",le=\"+Inf\"} 3"));
        assert!(t.contains("_count{route=\"/healthz\"} 3"));
        assert!(t.contains("moat_sandbox_groups 3"));
        assert!(t.contains("moat_sandboxes{state=\"running\"} 2"));
        assert!(t.contains("moat_pool_hits_total{group=\"web\"} 2"));
        assert!(
            t.contains("moat_sandbox_create_duration_seconds_bucket{pool=\"hit\",le=\"0.005\"} 1")
        );
        assert!(t.contains("moat_sandbox_create_duration_seconds_count{pool=\"miss\"} 1"));
        assert_eq!(
            t.matches("# TYPE moat_sandbox_create_duration_seconds histogram")
                .count(),
            1
        );
    }
}
