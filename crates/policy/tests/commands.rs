//! Command resolution: each case is an evasion of a command allow/deny list (research note §5
//! and AGT's first-token check) or an ordinary command that must keep working, checked through
//! the public `check` with an enforcing policy.

use moat_policy::{check, CheckRequest, Decision, Policy, Rule};
use serde_json::json;

const POLICY: &str = "
mode: enforce
commands:
  allow: [ls, cat, echo, head, wc, grep, sort, find, xargs, env, timeout, nice, python3, sh,
          bash, busybox, mkdir, cd, test, true, export]
  deny: [curl, wget, nc]
python:
  deny: [process, dynamic-code, native, network, reflection]
";

fn decide(request: serde_json::Value) -> Decision {
    let policy = Policy::parse(POLICY).unwrap();
    let request: CheckRequest = serde_json::from_value(request).unwrap();
    check(&policy, &request)
}

fn argv(words: &[&str]) -> Decision {
    decide(json!({ "argv": words }))
}

fn command(text: &str) -> Decision {
    decide(json!({ "command": text }))
}

#[track_caller]
fn refused(d: Decision, rule: Rule) {
    assert!(!d.allowed, "allowed, expected {rule}: {d:#?}");
    assert!(d.has(rule), "expected {rule}: {d:#?}");
}

#[track_caller]
fn allowed(d: Decision) {
    assert!(d.allowed && d.findings.is_empty(), "refused: {d:#?}");
}

#[test]
fn wrappers_are_peeled_to_the_program_they_run() {
    for words in [
        &["/usr/bin/curl", "x"][..],
        &["env", "curl", "x"],
        &["env", "-i", "-u", "HOME", "A=1", "curl", "x"],
        &["env", "--", "curl"],
        &["timeout", "5", "curl", "x"],
        &["timeout", "-s", "KILL", "-k", "1", "5", "curl"],
        &["timeout", "--signal=KILL", "5s", "/bin/curl"],
        &["nice", "-n", "10", "curl"],
        &["nice", "-5", "curl"],
        &["xargs", "-n1", "curl"],
        &["xargs", "-0", "-P", "4", "curl"],
        &["busybox", "wget", "x"],
        &["find", ".", "-name", "x", "-exec", "curl", "x", ";"],
        &["find", ".", "-execdir", "wget", "{}", "+"],
        &["timeout", "5", "env", "nice", "xargs", "curl"],
    ] {
        refused(argv(words), Rule::CommandDenied);
    }
    refused(argv(&["env", "-S", "curl x"]), Rule::CommandDenied);
    refused(argv(&["/usr/bin/node", "-e", "1"]), Rule::CommandNotAllowed);
    refused(
        argv(&["/lib64/ld-linux-x86-64.so.2", "/usr/bin/ls"]),
        Rule::CommandNotAllowed,
    );
    refused(argv(&["./ls"]), Rule::CommandNotAllowed);
    allowed(argv(&["xargs", "-0"]));
    refused(argv(&["find", ".", "-exec", "{}", ";"]), Rule::ShellDynamic);
    refused(argv(&["xargs", "-I", "P", "P", "x"]), Rule::ShellDynamic);
}

#[test]
fn shells_and_interpreters_have_their_code_checked() {
    refused(argv(&["sh", "-c", "curl x"]), Rule::CommandDenied);
    refused(argv(&["bash", "-lc", "ls; curl x"]), Rule::CommandDenied);
    refused(
        argv(&["bash", "-e", "-o", "pipefail", "-c", "ls | nc h 1"]),
        Rule::CommandDenied,
    );
    refused(
        argv(&["python3", "-c", "import os; os.system('id')"]),
        Rule::PythonProcess,
    );
    refused(
        argv(&["python3", "-uc", "import socket"]),
        Rule::PythonNetwork,
    );
    refused(argv(&["python3", "-m", "http.server"]), Rule::PythonNetwork);
    refused(
        decide(json!({"argv": ["python3"], "stdin": "import ctypes"})),
        Rule::PythonNative,
    );
    refused(
        decide(json!({"argv": ["python3", "-"], "stdin": "import ctypes"})),
        Rule::PythonNative,
    );
    refused(
        decide(json!({"argv": ["sh"], "stdin": "curl x"})),
        Rule::CommandDenied,
    );
    allowed(argv(&["python3", "-c", "print(1 + 1)"]));
    allowed(argv(&["python3", "-u", "script.py", "--flag"]));
    allowed(argv(&["sh", "-c", "ls -la | wc -l && echo done"]));
}

#[test]
fn shell_strings_are_parsed_not_split() {
    for text in [
        "curl x",
        "ls && curl x",
        "ls; curl x",
        "ls || curl x",
        "ls | curl -T - x",
        "(cd /tmp; curl x)",
        "{ curl x; }",
        "echo $(curl x)",
        "echo `curl x`",
        "echo \"$(curl x)\"",
        "if true; then curl x; fi",
        "for i in 1 2; do curl x; done",
        "while true; do wget x; done",
        "case x in x) curl x;; esac",
        "ls <(curl x)",
        "cat <<EOF\n$(curl x)\nEOF",
        "echo $((1 + $(curl x | wc -l)))",
        "ls > \"$(curl x)\"",
        "A=$(curl x) ls",
        "find / -maxdepth 0 -exec sh -c 'curl x' \\;",
        "echo x | xargs curl",
        "sh -c \"sh -c 'bash -c \\\"curl x\\\"'\"",
        "f() { curl x; }",
        "trap 'curl x' EXIT",
    ] {
        refused(command(text), Rule::CommandDenied);
    }
}

#[test]
fn names_only_known_at_run_time_are_refused() {
    for text in [
        "c''url x",
        "\\curl x",
        "\"cu\"rl x",
        "$(printf cu)rl x",
        "`echo curl` x",
        "X=curl; $X x",
        "${X:-curl} x",
        "eval 'curl x'",
        "eval ls",
        "bash -c \"$(echo Y3VybCB4 | base64 -d)\"",
        "sh -c \"$CMD\"",
        "cu*l x",
        "c{u,}rl x",
        "$'\\x63url' x",
        "ls | python3",
        "ls | sh",
        "python3 -c \"$CODE\"",
        "alias x=ls",
        "python3 <<EOF\nimport $M\nEOF",
    ] {
        refused(command(text), Rule::ShellDynamic);
    }
    // Quoting tricks still name the real program as well.
    refused(command("c''url x"), Rule::CommandDenied);
    refused(
        command("echo Y3VybA== | base64 -d | sh"),
        Rule::CommandNotAllowed,
    );
}

#[test]
fn here_documents_to_interpreters_are_analysed() {
    refused(
        command("python3 <<'E'\nimport subprocess\nsubprocess.run(['id'])\nE"),
        Rule::PythonProcess,
    );
    refused(command("python3 <<< 'import socket'"), Rule::PythonNetwork);
    refused(command("sh <<'E'\ncurl x\nE"), Rule::CommandDenied);
    allowed(command("python3 <<'E'\nprint('hi')\nE"));
    allowed(command("cat <<EOF\nhello $HOME\nEOF"));
}

#[test]
fn path_env_and_unparseable_strings_fail_closed() {
    refused(command("PATH=/tmp python3 x.py"), Rule::CommandUnresolved);
    refused(
        command("export PATH=/tmp:$PATH; ls"),
        Rule::CommandUnresolved,
    );
    refused(argv(&["env", "PATH=/tmp", "ls"]), Rule::CommandUnresolved);
    refused(
        decide(json!({"argv": ["ls"], "env": {"PATH": "/tmp"}})),
        Rule::CommandUnresolved,
    );
    refused(command("ls ("), Rule::ShellUnparseable);
    refused(command("echo 'unterminated"), Rule::ShellUnparseable);
    refused(argv(&["env", "-Z", "curl"]), Rule::CommandUnresolved);
}

#[test]
fn nesting_is_bounded() {
    let mut words = vec!["env"; 40];
    words.push("ls");
    refused(argv(&words), Rule::InputTooComplex);
    let mut text = "ls".to_string();
    for _ in 0..12 {
        text = format!("echo $({text})");
    }
    refused(command(&text), Rule::InputTooComplex);
}

#[test]
fn ordinary_commands_pass() {
    for text in [
        "ls -la",
        "ls -la | wc -l",
        "cat a.txt | grep -i x | sort | head -n 3",
        "find . -name '*.py' -exec wc -l {} +",
        "timeout 5 python3 -c 'import json; print(json.dumps({}))'",
        "echo $HOME",
        "for f in *.txt; do wc -l \"$f\"; done",
        "X=1; echo $X",
        "mkdir -p out && cd out && ls",
        "test -f x || echo missing",
        "env -i HOME=/x ls",
        "find . -type f | xargs -n1 wc -l",
        "nice -n 5 python3 train.py --epochs 3",
        "python3 - <<'EOF'\nimport json, sys\nprint(json.dumps(sys.argv))\nEOF",
        "busybox ls",
        "echo \"a $(ls | wc -l) b\"",
    ] {
        allowed(command(text));
    }
}

#[test]
fn deny_lists_alone_let_other_programs_run() {
    let policy = Policy::parse("mode: enforce\ncommands: {deny: [curl]}").unwrap();
    let ok: CheckRequest = serde_json::from_value(json!({"command": "node -e 1; ls"})).unwrap();
    assert!(check(&policy, &ok).allowed);
    let bad: CheckRequest =
        serde_json::from_value(json!({"command": "node -e 1; /opt/curl"})).unwrap();
    assert!(!check(&policy, &bad).allowed);
}

#[test]
fn sudo_escapes_user_limits() {
    let policy =
        Policy::parse("mode: enforce\nlimits: {users: [sandbox]}\ncommands: {deny: [curl]}")
            .unwrap();
    let r: CheckRequest =
        serde_json::from_value(json!({"argv": ["sudo", "-u", "root", "curl"], "user": "sandbox"}))
            .unwrap();
    let d = check(&policy, &r);
    assert!(
        d.has(Rule::LimitsUser) && d.has(Rule::CommandDenied),
        "{d:#?}"
    );
}

/// Unclosed `(` make brush-parser backtrack exponentially (26 took 5 s): past a dozen the
/// string is refused unparsed, at once; quoted and balanced parentheses stay ordinary.
#[test]
fn unclosed_parentheses_are_refused_before_the_parser_sees_them() {
    let t0 = std::time::Instant::now();
    refused(command(&"(".repeat(40)), Rule::InputTooComplex);
    refused(
        command(&format!("ls {}", "$(".repeat(30))),
        Rule::InputTooComplex,
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    allowed(command("echo '((((((((((((((((((((' \\( ; (ls) | (cat)"));
    allowed(command(&format!("{}ls{}", "(".repeat(30), ")".repeat(30))));
}
