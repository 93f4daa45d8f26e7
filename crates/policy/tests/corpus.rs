//! The corpus: every file under `tests/corpus/refuse` must be refused by `tests/corpus/policy.yaml`
//! with the rule its first line names (`# expect: RULE`), and every file under
//! `tests/corpus/pass` must be allowed with no finding at all. `.py` files are checked as
//! Python, `.sh` files as a shell command line, `.js` files as `node -e CODE`. Also checked under `audit` (reported, never
//! refused) and `off` (nothing analysed).

use std::path::{Path, PathBuf};

use moat_policy::{check, CheckRequest, Decision, Mode, Policy};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn policy() -> Policy {
    Policy::parse(&std::fs::read_to_string(corpus().join("policy.yaml")).unwrap()).unwrap()
}

fn files(dir: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(corpus().join(dir))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    out.sort();
    out
}

fn request(name: &str, text: &str) -> CheckRequest {
    let mut r = CheckRequest::default();
    if name.ends_with(".py") {
        r.python = Some(text.to_string());
    } else if name.ends_with(".sh") {
        r.command = Some(text.to_string());
    } else if name.ends_with(".js") {
        r.argv = Some(vec!["node".into(), "-e".into(), text.to_string()]);
    } else {
        panic!("{name}: corpus files end in .py, .sh or .js");
    }
    r
}

fn decide(policy: &Policy, name: &str, text: &str) -> Decision {
    check(policy, &request(name, text))
}

#[test]
fn every_refuse_snippet_is_refused_with_its_rule() {
    let policy = policy();
    let refuse = files("refuse");
    assert!(refuse.len() >= 40, "only {} refuse snippets", refuse.len());
    let mut failures = Vec::new();
    for (name, text) in &refuse {
        let expect = text
            .lines()
            .next()
            .and_then(|l| {
                l.strip_prefix("# expect: ")
                    .or_else(|| l.strip_prefix("// expect: "))
            })
            .unwrap_or_else(|| {
                panic!("{name}: first line must be `# expect: RULE` (`// expect: RULE` in .js)")
            });
        let d = decide(&policy, name, text);
        if d.allowed || !d.findings.iter().any(|f| f.rule.id() == expect) {
            failures.push(format!("{name}: expected {expect}, got {:#?}", d));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_pass_snippet_is_allowed_without_findings() {
    let policy = policy();
    let pass = files("pass");
    assert!(pass.len() >= 40, "only {} pass snippets", pass.len());
    let mut failures = Vec::new();
    for (name, text) in &pass {
        let d = decide(&policy, name, text);
        if !d.allowed || !d.findings.is_empty() {
            failures.push(format!("{name}: {:#?}", d.findings));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn audit_reports_the_same_findings_and_refuses_nothing_off_checks_nothing() {
    let enforce = policy();
    let audit = Policy {
        mode: Mode::Audit,
        ..enforce.clone()
    };
    let off = Policy {
        mode: Mode::Off,
        ..enforce.clone()
    };
    for (name, text) in files("refuse") {
        let e = decide(&enforce, &name, &text);
        let a = decide(&audit, &name, &text);
        assert!(a.allowed && a.mode == Mode::Audit, "{name}");
        assert_eq!(a.findings, e.findings, "{name}");
        let o = decide(&off, &name, &text);
        assert!(o.allowed && o.findings.is_empty(), "{name}");
    }
}
