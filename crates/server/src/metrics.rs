//! Prometheus metrics, with the text exposition written by hand: two metric families do not
//! justify a registry crate. Labels are route templates (`/v1/sandbox-groups/{group}`), never
//! raw paths, so a client cannot grow the label set without bound.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the request-latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
}

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

    /// The text exposition format (version 0.0.4). `gauges` are (name, help, value) read from
    /// the store at scrape time.
    pub fn render(&self, gauges: &[(&str, &str, i64)]) -> String {
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
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
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
        let t = m.render(&[("moat_sandbox_groups", "Groups.", 3)]);
        assert!(t.contains("moat_http_requests_total{route=\"/healthz\",status=\"200\"} 2"));
        assert!(t.contains("moat_http_requests_total{route=\"/healthz\",status=\"404\"} 1"));
        assert!(t.contains("_bucket{route=\"/healthz\",le=\"0.0005\"} 1"));
        assert!(t.contains("_bucket{route=\"/healthz\",le=\"0.05\"} 2"));
        assert!(t.contains("_bucket{route=\"/healthz\",le=\"+Inf\"} 3"));
        assert!(t.contains("_count{route=\"/healthz\"} 3"));
        assert!(t.contains("moat_sandbox_groups 3"));
    }
}
