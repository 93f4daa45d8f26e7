//! The decisions log's hash chain. Every decision the daemon makes under a group's policy is an
//! entry that carries the hash of the group's previous entry, so changing or removing an entry
//! breaks the chain at that place. It lives here, beside the decision it records, because two
//! parties compute it: the daemon when it writes an entry and `moat policy verify-log` when it
//! checks the entries the daemon hands out (it recomputes every hash itself).
//!
//! What a chain cannot show on its own: that the newest entries were cut off (compare the head
//! `verify-log` prints with one noted earlier), or that someone with write access to the
//! database rewrote an entry *and* every entry after it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decision::Decision;
use crate::request::CheckRequest;

/// The `prev_hash` of a group's first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How a decision turned out, as the decisions query filters it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Ran, and nothing was found.
    Allow,
    /// Refused (`enforce` mode with findings).
    Deny,
    /// Ran in `audit` mode although there were findings: `enforce` would have refused it.
    Audit,
}

impl Verdict {
    pub fn of(decision: &Decision) -> Verdict {
        match (decision.allowed, decision.findings.is_empty()) {
            (false, _) => Verdict::Deny,
            (true, true) => Verdict::Allow,
            (true, false) => Verdict::Audit,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Audit => "audit",
        }
    }
}

/// Where a pruned log starts: its newest removed entry's number and hash. The entry after it
/// must carry this hash as its `prev_hash`; that is how pruning (the daemon's retention) is told
/// apart from entries removed behind its back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogAnchor {
    /// Entries 1 to `n` were pruned.
    pub n: u64,
    /// The hash of entry `n`.
    pub hash: String,
    /// When the newest pruning happened (RFC 3339, UTC).
    pub pruned_at: String,
}

/// One decision of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    /// Position in the group's log, from 1, without gaps.
    pub n: u64,
    pub group: String,
    /// When it was decided (RFC 3339, UTC).
    pub at: String,
    /// Who asked: the id of the API key.
    pub key: String,
    /// What was asked: `exec`, `process`, `shell` or `upload` (a scanned file).
    pub route: String,
    pub sandbox: Option<String>,
    /// What was asked, as checked; environment values are replaced by `<redacted>` (only the
    /// names are checked, and values often are secrets).
    pub request: CheckRequest,
    /// The policy version that decided.
    pub policy_version: u64,
    pub verdict: Verdict,
    pub decision: Decision,
    /// The `hash` of the group's previous entry ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// SHA-256 (hex) of this entry written as JSON with `hash` empty; see [`LogEntry::digest`].
    pub hash: String,
}

impl LogEntry {
    /// The hash this entry must carry: SHA-256 of its JSON form with `hash` set to "". The
    /// form is this struct's serde serialization, whose field order and number formatting are
    /// fixed, so the daemon and the CLI compute the same bytes.
    pub fn digest(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let bytes = serde_json::to_vec(&unhashed).expect("a log entry serializes");
        hex::encode(Sha256::digest(&bytes))
    }

    /// Sets `n`, `prev_hash` and `hash` so that this entry follows the entry numbered `n`
    /// with hash `hash` (None: it is the first).
    pub fn chain_after(&mut self, prev: Option<(u64, &str)>) {
        self.n = prev.map_or(1, |(n, _)| n + 1);
        self.prev_hash = prev.map_or(GENESIS, |(_, h)| h).to_string();
        self.hash = self.digest();
    }
}

/// Checks a group's entries in order, one at a time (the CLI reads them page by page).
#[derive(Debug)]
pub struct Verifier {
    group: String,
    entries: u64,
    last: Option<(u64, String)>,
    pruned: u64,
    problems: Vec<String>,
}

/// What verifying found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub group: String,
    /// Entries read.
    pub entries: u64,
    /// The newest entry's `n` and `hash` (note them: a later run can then tell whether entries
    /// were cut off the end).
    pub head: Option<(u64, String)>,
    /// Entries 1 to this were pruned by the daemon's retention (0: none).
    #[serde(default)]
    pub pruned: u64,
    /// Each break in the chain, saying at which entry and what is wrong; empty when intact.
    pub problems: Vec<String>,
}

/// At most this many problems are listed; the first ones say where tampering starts.
const MAX_PROBLEMS: usize = 100;

impl Verifier {
    pub fn new(group: &str) -> Verifier {
        Verifier {
            group: group.to_string(),
            entries: 0,
            last: None,
            pruned: 0,
            problems: Vec::new(),
        }
    }

    /// Takes the log's anchor (as the daemon reports it with every page): the log may go on
    /// right after it. An anchor behind what was already read changes nothing, so pruning
    /// between two pages is not reported as a removal.
    pub fn anchor(&mut self, anchor: &LogAnchor) {
        let read = self.last.as_ref().map_or(0, |(n, _)| *n);
        if anchor.n > read {
            self.last = Some((anchor.n, anchor.hash.clone()));
            self.pruned = anchor.n;
        }
    }

    fn problem(&mut self, text: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(text);
        }
    }

    /// Checks `entry`, the next one read.
    pub fn push(&mut self, entry: &LogEntry) {
        let n = entry.n;
        self.entries += 1;
        let (expected_n, expected_prev) = match &self.last {
            None => (1, GENESIS.to_string()),
            Some((last_n, hash)) => (last_n + 1, hash.clone()),
        };
        if entry.group != self.group {
            self.problem(format!(
                "entry {n} belongs to group {:?}, not {:?}",
                entry.group, self.group
            ));
        }
        if n > expected_n {
            let missing = if n == expected_n + 1 {
                format!("entry {expected_n} is missing")
            } else {
                format!("entries {expected_n}–{} are missing", n - 1)
            };
            self.problem(format!("{missing}: the log goes on at entry {n} (removed)"));
        } else if n < expected_n {
            self.problem(format!(
                "entry {n} comes after entry {}: entries are out of order or repeated",
                expected_n - 1
            ));
        }
        if entry.prev_hash != expected_prev {
            let what = if n == 1 {
                "the genesis hash".to_string()
            } else {
                format!("the hash of the entry before it (entry {})", expected_n - 1)
            };
            self.problem(format!(
                "entry {n}: its prev_hash does not match {what}: an earlier entry was changed \
                 or removed"
            ));
        }
        if entry.digest() != entry.hash {
            self.problem(format!(
                "entry {n}: its content does not match its hash: it was changed after it was \
                 written"
            ));
        }
        self.last = Some((n, entry.hash.clone()));
    }

    pub fn finish(self) -> Verification {
        Verification {
            entries: self.entries,
            group: self.group,
            head: self.last,
            pruned: self.pruned,
            problems: self.problems,
        }
    }
}

/// Verifies a whole log at once.
pub fn verify<'a>(group: &str, entries: impl IntoIterator<Item = &'a LogEntry>) -> Verification {
    let mut v = Verifier::new(group);
    for e in entries {
        v.push(e);
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;

    fn log(len: u64) -> Vec<LogEntry> {
        let mut out: Vec<LogEntry> = Vec::new();
        for i in 0..len {
            let mut e = LogEntry {
                n: 0,
                group: "g".into(),
                at: format!("2026-11-30T18:00:0{i}Z"),
                key: "key-1".into(),
                route: "exec".into(),
                sandbox: Some("sb-1".into()),
                request: CheckRequest {
                    argv: Some(vec!["ls".into(), format!("/{i}")]),
                    timeout_s: Some(1.5),
                    ..Default::default()
                },
                policy_version: 1,
                verdict: Verdict::Allow,
                decision: Decision {
                    allowed: true,
                    mode: Mode::Enforce,
                    findings: vec![],
                },
                prev_hash: String::new(),
                hash: String::new(),
            };
            e.chain_after(out.last().map(|p| (p.n, p.hash.as_str())));
            out.push(e);
        }
        out
    }

    #[test]
    fn an_intact_log_verifies_and_reports_its_head() {
        let l = log(3);
        let v = verify("g", &l);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.entries, 3);
        assert_eq!(v.head, Some((3, l[2].hash.clone())));
        assert_eq!(l[0].prev_hash, GENESIS);
        // The hash survives a round trip through JSON (how the CLI receives it).
        let back: Vec<LogEntry> =
            serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert!(verify("g", &back).problems.is_empty());
    }

    #[test]
    fn an_edited_entry_is_named() {
        let mut l = log(4);
        l[1].request.argv = Some(vec!["curl".into()]);
        let v = verify("g", &l);
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(
            v.problems[0].starts_with("entry 2: its content"),
            "{:?}",
            v.problems
        );
        // Rehashing the edited entry moves the break to the next one.
        l[1].hash = l[1].digest();
        let v = verify("g", &l);
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(
            v.problems[0].starts_with("entry 3: its prev_hash"),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn removed_entries_are_named() {
        let mut l = log(5);
        l.remove(2);
        let v = verify("g", &l);
        assert!(
            v.problems[0].contains("entry 3 is missing"),
            "{:?}",
            v.problems
        );
        assert!(
            v.problems[1].starts_with("entry 4: its prev_hash"),
            "{:?}",
            v.problems
        );
        let mut l = log(3);
        l.remove(0);
        let v = verify("g", &l);
        assert!(
            v.problems[0].contains("entry 1 is missing"),
            "{:?}",
            v.problems
        );
        let v = verify("other", &log(1));
        assert!(
            v.problems[0].contains("belongs to group"),
            "{:?}",
            v.problems
        );
    }

    /// A pruned log verifies from its anchor; an anchor that does not match the first entry
    /// kept, or entries removed after it, are named.
    #[test]
    fn a_pruned_log_verifies_from_its_anchor() {
        let l = log(6);
        let anchor = LogAnchor {
            n: 3,
            hash: l[2].hash.clone(),
            pruned_at: "2026-11-30T18:00:09Z".into(),
        };
        let mut v = Verifier::new("g");
        v.anchor(&anchor);
        for e in &l[3..] {
            v.push(e);
        }
        let v = v.finish();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.entries, v.pruned), (3, 3));
        // Without the anchor, the same entries are a removal.
        assert!(verify("g", &l[3..]).problems[0].contains("entries 1–3 are missing"));
        // A forged anchor (another hash) does not chain to the first entry kept.
        let mut v = Verifier::new("g");
        v.anchor(&LogAnchor {
            hash: GENESIS.into(),
            ..anchor.clone()
        });
        for e in &l[3..] {
            v.push(e);
        }
        assert!(v.finish().problems[0].starts_with("entry 4: its prev_hash"));
        // Entry 5 removed after the anchor is still a removal.
        let mut v = Verifier::new("g");
        v.anchor(&anchor);
        for e in [&l[3], &l[5]] {
            v.push(e);
        }
        assert!(v.finish().problems[0].contains("entry 5 is missing"));
    }

    #[test]
    fn verdicts_follow_the_decision() {
        let mut d = Decision {
            allowed: true,
            mode: Mode::Audit,
            findings: vec![],
        };
        assert_eq!(Verdict::of(&d), Verdict::Allow);
        d.findings.push(crate::decision::Finding::new(
            crate::decision::Rule::CommandDenied,
            "m",
            crate::decision::Loc::request("curl"),
        ));
        assert_eq!(Verdict::of(&d), Verdict::Audit);
        d.allowed = false;
        assert_eq!(Verdict::of(&d), Verdict::Deny);
    }
}
