//! The check: one request against one policy, in process. It applies the limits, hands what
//! will run to the analysers (commands, shell, Python), and turns what they see into findings
//! under the policy. It has no bound of its own on time or on the stack: callers facing hostile
//! input go through `bounded` (see `worker`), which runs this where a crash cannot spread.

use crate::command::{self, Arg, Stdin};
use crate::decision::{Decision, Finding, Loc, Rule};
use crate::policy::{is_env_name, CommandVerdict, Family, Language, Mode, Policy};
use crate::request::CheckRequest;
use crate::{python, shell};

/// The most bytes of code (a shell string, Python source, code on stdin, all of argv) analysed
/// at once; more is refused (`input.too-large`), never truncated, so what is checked is always
/// exactly what would run.
pub const MAX_CODE_BYTES: usize = 1 << 20;

/// How deep code may nest inside code (`sh -c "python3 -c '...'"`, `$(…)` in `$(…)`, wrappers
/// of wrappers, `exec` of a literal) before the request is refused (`input.too-complex`).
pub const MAX_NESTING: usize = 8;

/// The most findings reported for one request: enough to see what is wrong, bounded so that a
/// hostile input cannot make the answer huge.
pub const MAX_FINDINGS: usize = 100;

/// Checks `request` against `policy`. With `mode: off` nothing is analysed.
pub fn check(policy: &Policy, request: &CheckRequest) -> Decision {
    if policy.mode == Mode::Off {
        return Decision::from_findings(Mode::Off, Vec::new());
    }
    let mut an = Analysis::new(policy);
    if let Err(why) = request.validate() {
        an.finding(Rule::RequestInvalid, why, Loc::request(""));
        return an.decide();
    }
    an.limits(request);
    let stdin = match &request.stdin {
        Some(code) => Stdin::Known(code.clone()),
        None => Stdin::Empty,
    };
    if let Some(argv) = &request.argv {
        let total: usize = argv.iter().map(|a| a.len() + 1).sum();
        let line = argv.join(" ");
        if an.fits(total, &line) {
            // One location for all the words: clipping the line again for each of 100,000
            // arguments cost more than analysing them.
            let loc = Loc::request(&line);
            let args: Vec<Arg> = argv.iter().map(|a| Arg::literal(a, &loc)).collect();
            command::resolve(&mut an, &args, stdin, 0);
        }
    } else if let Some(code) = request.command.as_ref().or(request.shell.as_ref()) {
        shell::analyse(&mut an, code, stdin, 0);
    } else if let Some(code) = &request.python {
        python::analyse(&mut an, code, 0);
    }
    an.decide()
}

/// One check in progress: the policy and the findings so far. The analysers report what they
/// see through its methods, which decide under the policy whether it is a finding.
pub(crate) struct Analysis<'p> {
    pub policy: &'p Policy,
    findings: Vec<Finding>,
}

impl<'p> Analysis<'p> {
    pub fn new(policy: &'p Policy) -> Self {
        Analysis {
            policy,
            findings: Vec::new(),
        }
    }

    fn decide(mut self) -> Decision {
        let mut seen = std::collections::HashSet::new();
        self.findings
            .retain(|f| seen.insert((f.rule, f.line, f.column, f.message.clone())));
        Decision::from_findings(self.policy.mode, self.findings)
    }

    pub fn finding(&mut self, rule: Rule, message: impl Into<String>, loc: Loc) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(Finding::new(rule, message, loc));
        }
    }

    /// Refuses code over the size bound; true when it may be analysed.
    pub fn fits(&mut self, bytes: usize, what: &str) -> bool {
        if bytes > MAX_CODE_BYTES {
            self.finding(
                Rule::InputTooLarge,
                format!("{bytes} bytes of code; at most {MAX_CODE_BYTES} are analysed"),
                Loc::request(what),
            );
            return false;
        }
        true
    }

    /// Refuses code nested deeper than the bound; true when it may be analysed.
    pub fn within_nesting(&mut self, depth: usize, loc: &Loc) -> bool {
        if depth > MAX_NESTING {
            self.finding(
                Rule::InputTooComplex,
                format!("code nested more than {MAX_NESTING} levels deep (wrappers, shells, inline code)"),
                loc.clone(),
            );
            return false;
        }
        true
    }

    /// A program that would run, named as written (argv[0], a command word, a wrapper's
    /// argument).
    pub fn program(&mut self, name: &str, loc: &Loc) {
        match self.policy.command_verdict(name) {
            CommandVerdict::Allowed => {}
            CommandVerdict::Denied => self.finding(
                Rule::CommandDenied,
                format!("{name} is in commands.deny"),
                loc.clone(),
            ),
            CommandVerdict::NotAllowed => self.finding(
                Rule::CommandNotAllowed,
                format!("{name} is not in commands.allow"),
                loc.clone(),
            ),
        }
    }

    /// Code in `language` that can do what any of `families` names; a finding when the policy
    /// denies one of them, reported under the first denied one in the order given (its main
    /// family first). `loc` is only worked out for a finding that is recorded.
    pub fn code(
        &mut self,
        language: Language,
        families: &[Family],
        message: &str,
        loc: impl FnOnce() -> Loc,
    ) {
        let denied = self.policy.denied(language);
        if let Some(family) = families.iter().find(|f| denied.contains(f)) {
            if self.findings.len() < MAX_FINDINGS {
                let rule = Rule::for_family(language, *family);
                self.finding(rule, message, loc());
            }
        }
    }

    /// Code the analyser cannot read; refused whenever any family of its language is denied,
    /// since the analyser cannot say it is free of them.
    pub fn unparseable(&mut self, language: Language, message: String, loc: Loc) {
        if !self.policy.denied(language).is_empty() {
            self.finding(Rule::unparseable(language), message, loc);
        }
    }

    /// Environment names set by the request or by `env NAME=…`/`NAME=… cmd` in a command.
    pub fn env_name(&mut self, name: &str, loc: &Loc) {
        if let Some(allowed) = &self.policy.limits.env {
            if !allowed.iter().any(|a| a == name) {
                self.finding(
                    Rule::LimitsEnv,
                    format!("{name} is not in limits.env ({})", allowed.join(", ")),
                    loc.clone(),
                );
            }
        }
    }

    /// A change of PATH under an allow list: bare names would then be looked up where the
    /// caller chose, so they no longer name the allowed programs.
    pub fn path_change(&mut self, name: &str, loc: &Loc) {
        if name == "PATH" && self.policy.commands.allow.is_some() {
            self.finding(
                Rule::CommandUnresolved,
                "PATH is changed, so command names may not be the programs commands.allow means",
                loc.clone(),
            );
        }
    }

    /// A command that switches user (`sudo`, `doas`): it escapes `limits.users`.
    pub fn user_switch(&mut self, program: &str, loc: &Loc) {
        if self.policy.limits.users.is_some() {
            self.finding(
                Rule::LimitsUser,
                format!("{program} runs the command as another user than limits.users allows"),
                loc.clone(),
            );
        }
    }

    fn limits(&mut self, request: &CheckRequest) {
        let limits = &self.policy.limits;
        if let Some(max) = limits.max_timeout_s {
            match request.timeout_s {
                Some(t) if t.is_finite() && t > 0.0 && t <= max => {}
                Some(t) => self.finding(
                    Rule::LimitsTimeout,
                    format!("timeout_s {t} is over limits.max_timeout_s {max}"),
                    Loc::request(&format!("timeout_s: {t}")),
                ),
                None => self.finding(
                    Rule::LimitsTimeout,
                    format!("no timeout_s; limits.max_timeout_s needs one of at most {max}"),
                    Loc::request("timeout_s"),
                ),
            }
        }
        for name in request.env.keys() {
            if !is_env_name(name) {
                self.finding(
                    Rule::LimitsEnv,
                    format!("{name:?} is not a variable name"),
                    Loc::request(name),
                );
            } else {
                self.env_name(name, &Loc::request(name));
                self.path_change(name, &Loc::request(name));
            }
        }
        if let Some(users) = &limits.users {
            match &request.user {
                Some(u) if users.iter().any(|a| a == u) => {}
                Some(u) => self.finding(
                    Rule::LimitsUser,
                    format!("user {u:?} is not in limits.users ({})", users.join(", ")),
                    Loc::request(u),
                ),
                None => self.finding(
                    Rule::LimitsUser,
                    format!(
                        "no user given (the image's default may be root); limits.users needs one \
                         of {}",
                        users.join(", ")
                    ),
                    Loc::request("user"),
                ),
            }
        }
        if let (Some(max), Some(stdin)) = (limits.max_stdin_bytes, &request.stdin) {
            if stdin.len() as u64 > max {
                self.finding(
                    Rule::LimitsStdin,
                    format!(
                        "{} bytes of stdin; limits.max_stdin_bytes is {max}",
                        stdin.len()
                    ),
                    Loc::request("stdin"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        Policy::parse(yaml).unwrap()
    }

    fn req(json: serde_json::Value) -> CheckRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn off_checks_nothing_audit_reports_enforce_refuses() {
        let r = req(serde_json::json!({"argv": ["curl", "x"]}));
        let off = check(&policy("mode: off\ncommands: {deny: [curl]}"), &r);
        assert!(off.allowed && off.findings.is_empty());
        let audit = check(&policy("mode: audit\ncommands: {deny: [curl]}"), &r);
        assert!(audit.allowed && audit.has(Rule::CommandDenied));
        let enforce = check(&policy("mode: enforce\ncommands: {deny: [curl]}"), &r);
        assert!(!enforce.allowed && enforce.has(Rule::CommandDenied));
        assert_eq!(enforce.findings[0].snippet, "curl x");
    }

    #[test]
    fn limits_refuse_what_they_do_not_list() {
        let p = policy(
            "mode: enforce\nlimits: {max_timeout_s: 10, env: [HOME], users: [sandbox], \
             max_stdin_bytes: 4}",
        );
        let ok = req(
            serde_json::json!({"argv": ["ls"], "timeout_s": 10, "env": {"HOME": "/"},
            "user": "sandbox", "stdin": "abcd"}),
        );
        assert!(check(&p, &ok).allowed, "{:?}", check(&p, &ok));
        let bad = req(serde_json::json!({"argv": ["ls"], "timeout_s": 11,
            "env": {"HOME": "/", "LD_PRELOAD": "x"}, "user": "root", "stdin": "abcde"}));
        let d = check(&p, &bad);
        for rule in [
            Rule::LimitsTimeout,
            Rule::LimitsEnv,
            Rule::LimitsUser,
            Rule::LimitsStdin,
        ] {
            assert!(d.has(rule), "{rule} missing in {d:?}");
        }
        assert!(d.findings.iter().any(|f| f.message.contains("LD_PRELOAD")));
        let unnamed = check(&p, &req(serde_json::json!({"argv": ["ls"]})));
        assert!(unnamed.has(Rule::LimitsTimeout) && unnamed.has(Rule::LimitsUser));
    }

    #[test]
    fn an_invalid_request_is_refused_not_passed() {
        let p = policy("mode: enforce");
        let d = check(&p, &CheckRequest::default());
        assert!(!d.allowed && d.has(Rule::RequestInvalid));
    }

    #[test]
    fn a_policy_that_contradicts_its_tests_names_the_example() {
        let e = Policy::parse(
            "mode: audit\ncommands: {deny: [curl]}\ntests:\n  allow:\n    - argv: [curl, x]\n  \
             deny:\n    - argv: [ls]\n",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("tests.allow[0]") && text.contains("command.denied"),
            "{text}"
        );
        assert!(
            text.contains("tests.deny[0]") && text.contains("\"ls\""),
            "{text}"
        );
        Policy::parse(
            "commands: {deny: [curl]}\ntests:\n  allow: [{argv: [ls]}]\n  deny: [{command: 'curl x'}]\n",
        )
        .unwrap();
    }

    #[test]
    fn oversized_code_is_refused_whole() {
        let p = policy("mode: enforce\npython: {deny: [process]}");
        let big = "x".repeat(MAX_CODE_BYTES + 1);
        let d = check(
            &p,
            &req(serde_json::json!({"argv": ["python3", "-c", big]})),
        );
        assert!(!d.allowed && d.has(Rule::InputTooLarge));
    }
}
