//! A group's `policy` object: its wire form (JSON or YAML, unknown fields refused) and the
//! checks that make a stored policy mean what it says. Validation collects every problem, so a
//! platform team fixes a policy in one round instead of one error at a time.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::decision::Decision;
use crate::error::Error;
use crate::request::CheckRequest;

/// The longest timeout moat accepts on an exec (a week), so a policy's cap cannot exceed it.
pub const MAX_TIMEOUT_S: f64 = 604_800.0;

/// What a policy does with its findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refuse a request that has findings.
    Enforce,
    /// Decide and report, never refuse.
    Audit,
    /// Check nothing (new groups start here).
    #[default]
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
            Mode::Off => "off",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A family of findings in code (Python, JavaScript) that `python.deny` and `javascript.deny`
/// can refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Every way to start a process.
    Process,
    /// Running code the analyser cannot see: eval, exec, compile, runpy, code, pickle, marshal.
    DynamicCode,
    /// Calling native code: ctypes, cffi.
    Native,
    /// Opening network connections or servers.
    Network,
    /// Introspection that can reach any of the above (dunders, sys.modules, computed getattr).
    Reflection,
}

impl Family {
    /// What code with these findings does, in words, for a finding's message.
    pub(crate) fn describe(families: &[Family]) -> String {
        let words: Vec<&str> = families
            .iter()
            .map(|f| match f {
                Family::Process => "starts processes",
                Family::DynamicCode => "runs code it is given",
                Family::Native => "calls native code",
                Family::Network => "uses the network",
                Family::Reflection => "reaches objects by introspection",
            })
            .collect();
        words.join(", ")
    }
}

impl Family {
    /// In the order a finding that could be any of them is reported (see `FamilySet::first_in`).
    pub const ALL: [Family; 5] = [
        Family::Process,
        Family::DynamicCode,
        Family::Native,
        Family::Network,
        Family::Reflection,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Process => "process",
            Family::DynamicCode => "dynamic-code",
            Family::Native => "native",
            Family::Network => "network",
            Family::Reflection => "reflection",
        }
    }
}

/// `commands`: which executables may run. Names match by basename; an entry with a '/' is an
/// absolute path (see `Policy::command_verdict`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Commands {
    /// When present, only these run (an empty list allows nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Never run, whatever `allow` says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// `python`, `javascript`: which families of findings in one language's code are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CodePolicy {
    #[serde(default)]
    pub deny: BTreeSet<Family>,
}

/// A language whose code the policy analyses: each has its own `deny` list and rule ids
/// (`python.process`, `javascript.process`), over the same families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Language {
    Python,
    Javascript,
}

/// `limits`: bounds on the request itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// A request must name a timeout no longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout_s: Option<f64>,
    /// The only environment variable names a request may set (others are refused, not
    /// stripped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// The only users a request may run as; the request must name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    /// The most standard input a request may send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stdin_bytes: Option<u64>,
}

/// `tests`: example requests the policy must allow and must refuse; a policy that contradicts
/// its own examples is not accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Tests {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<CheckRequest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<CheckRequest>,
}

/// A group's policy, as stored and as written by hand.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub commands: Commands,
    #[serde(default)]
    pub python: CodePolicy,
    /// Inline JavaScript (`node -e`, `node -p`, code on node's stdin).
    #[serde(default, skip_serializing_if = "CodePolicy::is_empty")]
    pub javascript: CodePolicy,
    #[serde(default)]
    pub limits: Limits,
    /// Also check files uploaded to a sandbox whose names end in `.py` (as Python) or `.sh`
    /// (as a shell script), before they are written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scan_uploads: bool,
    #[serde(default)]
    pub tests: Tests,
}

impl CodePolicy {
    fn is_empty(&self) -> bool {
        self.deny.is_empty()
    }
}

impl Policy {
    /// The families denied in `language`'s code.
    pub(crate) fn denied(&self, language: Language) -> &BTreeSet<Family> {
        match language {
            Language::Python => &self.python.deny,
            Language::Javascript => &self.javascript.deny,
        }
    }
}

/// How `commands` judges one program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommandVerdict {
    Allowed,
    Denied,
    NotAllowed,
}

/// Directories a bare allow-list name may be reached through by absolute path. A bare name
/// elsewhere (`/tmp/python3`, `./python3`) is a file the caller may have written, so it does
/// not count as the allowed program.
const SYSTEM_BIN_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

impl Policy {
    /// Parses a policy written as JSON (when it starts with `{`) or YAML, then validates it.
    pub fn parse(text: &str) -> Result<Policy, Error> {
        let policy: Policy = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| Error::PolicySyntax(e.to_string()))?
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| Error::PolicySyntax(e.to_string()))?
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Every problem with this policy, including examples in `tests` it contradicts (checked
    /// in this process: for policies from trusted hands; the daemon uses
    /// [`Policy::validate_with`] to run the examples in the bounded worker).
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_with(crate::check::check)
    }

    /// Every problem with this policy; its `tests` examples are decided by `check` (given the
    /// policy in `enforce` mode and one example).
    pub fn validate_with(
        &self,
        check: impl FnMut(&Policy, &CheckRequest) -> Decision,
    ) -> Result<(), Error> {
        let mut problems = Vec::new();
        let allow = self.commands.allow.as_deref().unwrap_or_default();
        for (list, names) in [
            ("commands.allow", allow),
            ("commands.deny", &self.commands.deny),
        ] {
            for name in names {
                if let Err(why) = check_command_name(name) {
                    problems.push(format!("{list}: {name:?} {why}"));
                }
            }
        }
        for name in allow {
            if self.commands.deny.contains(name) {
                problems.push(format!(
                    "commands: {name:?} is in both allow and deny; keep it in one"
                ));
            }
        }
        if let Some(t) = self.limits.max_timeout_s {
            if !(t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_S) {
                problems.push(format!(
                    "limits.max_timeout_s: {t} is not a number of seconds in (0, {MAX_TIMEOUT_S}]"
                ));
            }
        }
        for name in self.limits.env.iter().flatten() {
            if !is_env_name(name) {
                problems.push(format!(
                    "limits.env: {name:?} is not a variable name (letters, digits and '_', not \
                     starting with a digit)"
                ));
            }
        }
        for user in self.limits.users.iter().flatten() {
            if user.is_empty() || user.contains(char::is_whitespace) {
                problems.push(format!(
                    "limits.users: {user:?} is not a user name or uid (optionally user:group)"
                ));
            }
        }
        for (i, example) in self.tests.allow.iter().enumerate() {
            if let Err(e) = example.validate() {
                problems.push(format!("tests.allow[{i}]: {e}"));
            }
        }
        for (i, example) in self.tests.deny.iter().enumerate() {
            if let Err(e) = example.validate() {
                problems.push(format!("tests.deny[{i}]: {e}"));
            }
        }
        if !problems.is_empty() {
            return Err(Error::InvalidPolicy(problems));
        }
        let failures = self.failing_examples(check);
        if !failures.is_empty() {
            return Err(Error::ExamplesFail(failures));
        }
        Ok(())
    }

    /// The examples in `tests` this policy does not decide as they say, each with why. They are
    /// decided as in `enforce`, whatever `mode` is, since they say what enforcing would do.
    fn failing_examples(
        &self,
        mut check: impl FnMut(&Policy, &CheckRequest) -> Decision,
    ) -> Vec<String> {
        let enforced = Policy {
            mode: Mode::Enforce,
            ..self.clone()
        };
        let mut failures = Vec::new();
        for (i, example) in self.tests.allow.iter().enumerate() {
            let decision = check(&enforced, example);
            if !decision.allowed {
                let why: Vec<String> = decision
                    .findings
                    .iter()
                    .map(|f| format!("{}: {}", f.rule, f.message))
                    .collect();
                failures.push(format!(
                    "tests.allow[{i}] ({}) is refused: {}",
                    example.summary(),
                    why.join("; ")
                ));
            }
        }
        for (i, example) in self.tests.deny.iter().enumerate() {
            if check(&enforced, example).allowed {
                failures.push(format!(
                    "tests.deny[{i}] ({}) is allowed",
                    example.summary()
                ));
            }
        }
        failures
    }

    /// Judges one program as written in argv[0] or a shell command word. A deny entry matches
    /// by basename (a path entry by its basename too), so `/usr/bin/curl`, `./curl` and `curl`
    /// are all refused by `curl`; deny wins over allow. With an allow list, a bare entry
    /// matches the bare name (a PATH lookup) or that name in a system bin directory, and a path
    /// entry only that exact path.
    pub(crate) fn command_verdict(&self, program: &str) -> CommandVerdict {
        let path = normalise_path(program);
        let base = basename(&path);
        if self.commands.deny.iter().any(|d| basename(d) == base) {
            return CommandVerdict::Denied;
        }
        let Some(allow) = &self.commands.allow else {
            return CommandVerdict::Allowed;
        };
        let allowed = allow.iter().any(|entry| {
            if entry.contains('/') {
                normalise_path(entry) == path
            } else if path.contains('/') {
                entry == base
                    && SYSTEM_BIN_DIRS
                        .iter()
                        .any(|dir| path.strip_prefix(dir) == Some(&format!("/{base}")))
            } else {
                entry == &path
            }
        });
        if allowed {
            CommandVerdict::Allowed
        } else {
            CommandVerdict::NotAllowed
        }
    }
}

fn check_command_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.contains(|c: char| c.is_whitespace() || c == '\0') {
        return Err("contains whitespace; list one executable name or absolute path per entry");
    }
    if name.contains('/') {
        if !name.starts_with('/') {
            return Err("is a relative path; use a bare name or an absolute path");
        }
        if name.ends_with('/') {
            return Err("is a directory; name an executable");
        }
    }
    Ok(())
}

pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Collapses `//` and `/./` so that spelling a path differently does not change its verdict.
/// `..` is kept: such a path then matches no allow entry, which fails closed.
fn normalise_path(path: &str) -> String {
    if !path.contains('/') {
        return path.to_string();
    }
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        if part.is_empty() || part == "." {
            continue;
        }
        out.push(part);
    }
    let joined = out.join("/");
    // A relative path stays one (`./python3` is not the bare name `python3`).
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        format!("./{joined}")
    }
}

pub(crate) fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_parse_to_the_same_policy() {
        let yaml = "mode: enforce\ncommands:\n  allow: [python3, ls]\n  deny: [curl]\npython:\n  \
                    deny: [process, network]\nlimits:\n  max_timeout_s: 60\n  env: [HOME]\n  \
                    users: [sandbox]\n  max_stdin_bytes: 1024\n";
        let json = r#"{"mode": "enforce", "commands": {"allow": ["python3", "ls"], "deny": ["curl"]},
            "python": {"deny": ["network", "process"]},
            "limits": {"max_timeout_s": 60, "env": ["HOME"], "users": ["sandbox"], "max_stdin_bytes": 1024}}"#;
        let a = Policy::parse(yaml).unwrap();
        let b = Policy::parse(json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.mode, Mode::Enforce);
        assert!(a.python.deny.contains(&Family::Network));
    }

    #[test]
    fn an_empty_policy_is_off() {
        assert_eq!(Policy::parse("{}").unwrap().mode, Mode::Off);
    }

    #[test]
    fn unknown_fields_and_values_are_refused_with_their_name() {
        let e = Policy::parse("mode: enforce\ncomands: {}\n").unwrap_err();
        assert!(e.to_string().contains("comands"), "{e}");
        let e = Policy::parse("mode: strict\n").unwrap_err();
        assert!(e.to_string().contains("strict"), "{e}");
        let e = Policy::parse("python:\n  deny: [files]\n").unwrap_err();
        assert!(e.to_string().contains("files"), "{e}");
        let e = Policy::parse(r#"{"limits": {"max_memory": 3}}"#).unwrap_err();
        assert!(e.to_string().contains("max_memory"), "{e}");
    }

    #[test]
    fn validation_lists_every_problem() {
        let e = Policy::parse(
            "commands:\n  allow: ['', 'bin/ls', 'py thon', curl]\n  deny: [curl]\nlimits:\n  \
             max_timeout_s: -1\n  env: ['1X', 'A-B']\n  users: ['']\n",
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "\"\" is empty",
            "\"bin/ls\" is a relative path",
            "\"py thon\" contains whitespace",
            "\"curl\" is in both allow and deny",
            "max_timeout_s: -1",
            "\"1X\" is not a variable name",
            "\"A-B\" is not a variable name",
            "limits.users: \"\"",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
        let e = Policy::parse("limits:\n  max_timeout_s: 700000\n").unwrap_err();
        assert!(e.to_string().contains("700000"), "{e}");
    }

    #[test]
    fn deny_matches_every_spelling_of_a_program() {
        let p = Policy::parse("commands:\n  deny: [/usr/bin/curl, wget]\n").unwrap();
        for prog in [
            "curl",
            "/usr/bin/curl",
            "/bin/curl",
            "./curl",
            "/tmp//x/../curl",
            "wget",
        ] {
            assert_eq!(p.command_verdict(prog), CommandVerdict::Denied, "{prog}");
        }
        assert_eq!(p.command_verdict("ls"), CommandVerdict::Allowed);
    }

    #[test]
    fn allow_lists_match_names_in_system_dirs_and_exact_paths_only() {
        let p = Policy::parse("commands:\n  allow: [python3, /opt/tool/bin/run]\n").unwrap();
        for prog in [
            "python3",
            "/usr/bin/python3",
            "/bin//python3",
            "/opt/tool/bin/run",
        ] {
            assert_eq!(p.command_verdict(prog), CommandVerdict::Allowed, "{prog}");
        }
        for prog in [
            "/tmp/python3",
            "./python3",
            "bin/python3",
            "/usr/bin/../../tmp/python3",
            "run",
            "/opt/tool/bin/../bin/run",
            "python",
        ] {
            assert_eq!(
                p.command_verdict(prog),
                CommandVerdict::NotAllowed,
                "{prog}"
            );
        }
        let none = Policy::parse("commands:\n  allow: []\n").unwrap();
        assert_eq!(none.command_verdict("ls"), CommandVerdict::NotAllowed);
    }
}
