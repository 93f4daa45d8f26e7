//! What program a command really runs. argv[0] is only the first word: wrappers (`env`,
//! `timeout`, `nice`, `xargs`, `busybox APPLET`, `find -exec`, `sudo`, …) run another program
//! named further on, shells run a string of commands, and interpreters run inline code. This
//! module peels them, bounded in depth, and reports every program that would run; what it cannot
//! pin down is a finding, never a pass.

use crate::check::Analysis;
use crate::decision::{Loc, Rule};
use crate::policy::basename;
use crate::{javascript, python, shell};

/// One word of a command: its value when it is known before the command runs (None after an
/// expansion, a substitution or a glob), whether quoting or escapes were used in it, and where
/// it is.
#[derive(Debug, Clone)]
pub(crate) struct Arg {
    pub value: Option<String>,
    pub raw: String,
    pub quoted: bool,
    pub loc: Loc,
}

impl Arg {
    /// A word of an exec's argv: known exactly, no shell in between.
    pub fn literal(value: &str, loc: &Loc) -> Arg {
        Arg {
            value: Some(value.to_string()),
            raw: value.to_string(),
            quoted: false,
            loc: loc.clone(),
        }
    }
}

/// Where a program's standard input comes from, which matters when the program is an
/// interpreter that reads its code from it.
#[derive(Debug, Clone)]
pub(crate) enum Stdin {
    /// Nothing (an exec without stdin).
    Empty,
    /// Known text: the request's stdin, a quoted here-document, a here-string.
    Known(String),
    /// Only known when it runs: a pipe, an expanding here-document. The text says which.
    Unknown(String),
}

/// Reports every program `args` runs.
pub(crate) fn resolve(an: &mut Analysis, args: &[Arg], stdin: Stdin, depth: usize) {
    let mut args = args;
    let mut depth = depth;
    loop {
        let Some(first) = args.first() else { return };
        if !an.within_nesting(depth, &first.loc) {
            return;
        }
        let Some(name) = first.value.as_deref() else {
            an.finding(
                Rule::ShellDynamic,
                format!(
                    "the program name `{}` is only known when the command runs",
                    first.raw
                ),
                first.loc.clone(),
            );
            return;
        };
        if first.quoted {
            an.finding(
                Rule::ShellDynamic,
                format!(
                    "quoting in the program name `{}` disguises it (it runs {name})",
                    first.raw
                ),
                first.loc.clone(),
            );
        }
        an.program(name, &first.loc);
        let rest = &args[1..];
        let next = match basename(name) {
            "env" => env(an, name, rest, &stdin, depth),
            "timeout" => skip_options(an, name, rest, "sk", &["--signal", "--kill-after"], 1),
            "nice" => nice(an, name, rest),
            "nohup" | "builtin" => skip_options(an, name, rest, "", &[], 0),
            "setsid" => skip_options(an, name, rest, "", &[], 0),
            "stdbuf" => skip_options(
                an,
                name,
                rest,
                "ioe",
                &["--input", "--output", "--error"],
                0,
            ),
            "time" => skip_options(an, name, rest, "fo", &["--format", "--output"], 0),
            "chrt" | "taskset" | "ionice" => unresolved(an, name, first),
            "command" => {
                if rest
                    .iter()
                    .any(|a| matches!(a.value.as_deref(), Some("-v" | "-V")))
                {
                    Next::Done
                } else {
                    skip_options(an, name, rest, "", &[], 0)
                }
            }
            "exec" => skip_options(an, name, rest, "a", &[], 0),
            "sudo" | "doas" => {
                an.user_switch(name, &first.loc);
                sudo(an, name, rest)
            }
            "xargs" => xargs(an, name, rest, &first.loc),
            "busybox" => match rest.first().and_then(|a| a.value.as_deref()) {
                Some(applet) if !applet.starts_with('-') => Next::Run(rest),
                Some(_) => Next::Done,
                None if rest.is_empty() => Next::Done,
                None => Next::Run(rest),
            },
            "find" => {
                find(an, rest, depth);
                Next::Done
            }
            "eval" => {
                an.finding(
                    Rule::ShellDynamic,
                    "eval runs a string as commands, which is only known when it runs",
                    first.loc.clone(),
                );
                Next::Done
            }
            "alias" => {
                an.finding(
                    Rule::ShellDynamic,
                    "alias renames commands, so later command names are not what they say",
                    first.loc.clone(),
                );
                Next::Done
            }
            "enable" if rest.iter().any(|a| a.value.as_deref() != Some("-n")) => {
                an.finding(
                    Rule::ShellDynamic,
                    "enable can load builtins from shared objects or switch them on over programs",
                    first.loc.clone(),
                );
                Next::Done
            }
            "trap" => {
                trap(an, rest, depth);
                Next::Done
            }
            "export" | "declare" | "typeset" | "readonly" | "local" => {
                for a in rest {
                    if let Some((var, _)) = a.value.as_deref().and_then(|v| v.split_once('=')) {
                        an.env_name(var, &a.loc);
                        an.path_change(var, &a.loc);
                    }
                }
                Next::Done
            }
            "sh" | "bash" | "dash" | "ash" | "zsh" | "ksh" | "mksh" | "rbash" => {
                shell_invocation(an, name, rest, &stdin, depth);
                Next::Done
            }
            base if is_python(base) => {
                python_invocation(an, name, rest, &stdin, depth);
                Next::Done
            }
            base if is_node(base) => {
                node_invocation(an, name, rest, &stdin, depth);
                Next::Done
            }
            _ => Next::Done,
        };
        match next {
            Next::Run(rest) if !rest.is_empty() => {
                args = rest;
                depth += 1;
            }
            _ => return,
        }
    }
}

/// What a wrapper runs next.
enum Next<'a> {
    Run(&'a [Arg]),
    Done,
}

fn unresolved<'a>(an: &mut Analysis, program: &str, arg: &Arg) -> Next<'a> {
    an.finding(
        Rule::CommandUnresolved,
        format!(
            "cannot tell which program {program} runs from `{}`",
            arg.raw
        ),
        arg.loc.clone(),
    );
    Next::Done
}

fn is_python(base: &str) -> bool {
    let version = base
        .strip_prefix("python")
        .or_else(|| base.strip_prefix("pypy"));
    version.is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// Skips a wrapper's options: `short_with_arg` are the short options that take a value (in the
/// same word or the next), `long_with_arg` the long ones (`--x=v` or `--x v`); then
/// `positional` operands (timeout's duration). Any other word starting with '-' is a flag.
fn skip_options<'a>(
    an: &mut Analysis,
    program: &str,
    rest: &'a [Arg],
    short_with_arg: &str,
    long_with_arg: &[&str],
    positional: usize,
) -> Next<'a> {
    let mut i = 0;
    while i < rest.len() {
        let Some(v) = rest[i].value.as_deref() else {
            return unresolved(an, program, &rest[i]);
        };
        if v == "--" {
            i += 1;
            break;
        }
        if let Some(long) = v.strip_prefix("--") {
            let takes = long_with_arg
                .iter()
                .any(|l| l.trim_start_matches("--") == long);
            i += if takes { 2 } else { 1 };
        } else if v.len() > 1 && v.starts_with('-') {
            let opts = &v[1..];
            match opts
                .char_indices()
                .find(|(_, c)| short_with_arg.contains(*c))
            {
                // The value is the rest of this word, or the next word.
                Some((k, c)) => i += if k + c.len_utf8() == opts.len() { 2 } else { 1 },
                None => i += 1,
            }
        } else {
            break;
        }
    }
    let start = (i + positional).min(rest.len());
    Next::Run(&rest[start..])
}

fn nice<'a>(an: &mut Analysis, program: &str, rest: &'a [Arg]) -> Next<'a> {
    // `nice -10 cmd` is an old form of `-n 10`.
    let numeric = |v: &str| v.len() > 1 && v[1..].chars().all(|c| c.is_ascii_digit());
    let mut i = 0;
    while let Some(v) = rest.get(i).and_then(|a| a.value.as_deref()) {
        if v.starts_with('-') && numeric(v) {
            i += 1;
        } else {
            break;
        }
    }
    skip_options(an, program, &rest[i..], "n", &["--adjustment"], 0)
}

fn env<'a>(
    an: &mut Analysis,
    program: &str,
    rest: &'a [Arg],
    stdin: &Stdin,
    depth: usize,
) -> Next<'a> {
    let mut i = 0;
    while i < rest.len() {
        let arg = &rest[i];
        let Some(v) = arg.value.as_deref() else {
            return unresolved(an, program, arg);
        };
        if v == "--" || v == "-" {
            i += 1;
            break;
        }
        let split = v
            .strip_prefix("--split-string=")
            .or_else(|| v.strip_prefix("-S").filter(|s| !s.is_empty()));
        if let Some(text) = split {
            shell::analyse(an, text, stdin.clone(), depth + 1);
            return Next::Done;
        }
        if v == "-S" || v == "--split-string" {
            match rest.get(i + 1) {
                Some(Arg {
                    value: Some(text), ..
                }) => {
                    shell::analyse(an, text, stdin.clone(), depth + 1);
                }
                Some(other) => return unresolved(an, program, other),
                None => {}
            }
            return Next::Done;
        }
        if v.starts_with("--") {
            let takes = ["--unset", "--chdir"].contains(&v);
            i += if takes { 2 } else { 1 };
        } else if let Some(opts) = v.strip_prefix('-') {
            match opts.char_indices().find(|(_, c)| "uC".contains(*c)) {
                Some((k, _)) => i += if k + 1 == opts.len() { 2 } else { 1 },
                None if opts.chars().all(|c| "i0v".contains(c)) => i += 1,
                None => return unresolved(an, program, arg),
            }
        } else if let Some((var, _)) = v.split_once('=') {
            an.env_name(var, &arg.loc);
            an.path_change(var, &arg.loc);
            i += 1;
        } else {
            break;
        }
    }
    Next::Run(&rest[i.min(rest.len())..])
}

fn sudo<'a>(an: &mut Analysis, program: &str, rest: &'a [Arg]) -> Next<'a> {
    let next = skip_options(an, program, rest, "ugCDhprtTU", &["--user", "--group"], 0);
    let Next::Run(run) = next else { return next };
    let assignments = run
        .iter()
        .take_while(|a| a.value.as_deref().is_some_and(|v| v.contains('=')))
        .count();
    for a in &run[..assignments] {
        if let Some((var, _)) = a.value.as_deref().and_then(|v| v.split_once('=')) {
            an.env_name(var, &a.loc);
            an.path_change(var, &a.loc);
        }
    }
    Next::Run(&run[assignments..])
}

fn xargs<'a>(an: &mut Analysis, program: &str, rest: &'a [Arg], loc: &Loc) -> Next<'a> {
    const LONG_WITH_ARG: [&str; 7] = [
        "--arg-file",
        "--delimiter",
        "--max-args",
        "--max-lines",
        "--max-procs",
        "--max-chars",
        "--process-slot-var",
    ];
    let mut replace: Option<String> = None;
    let mut i = 0;
    while i < rest.len() {
        let Some(v) = rest[i].value.as_deref() else {
            return unresolved(an, program, &rest[i]);
        };
        if v == "--" {
            i += 1;
            break;
        }
        if let Some(long) = v.strip_prefix("--") {
            if let Some(r) = long.strip_prefix("replace=") {
                replace = Some(r.to_string());
            } else if long == "replace" {
                replace = Some("{}".to_string());
            }
            let takes = !long.contains('=') && LONG_WITH_ARG.contains(&v);
            i += if takes { 2 } else { 1 };
        } else if v.len() > 1 && v.starts_with('-') {
            let opts = &v[1..];
            match opts.char_indices().find(|(_, c)| "adEILPsn".contains(*c)) {
                Some((k, c)) => {
                    let attached = &opts[k + 1..];
                    let value = if attached.is_empty() {
                        rest.get(i + 1).and_then(|a| a.value.clone())
                    } else {
                        Some(attached.to_string())
                    };
                    if c == 'I' {
                        replace = value.or(Some(String::new()));
                    }
                    i += if attached.is_empty() { 2 } else { 1 };
                }
                None => {
                    if let Some(k) = opts.find('i') {
                        let attached = &opts[k + 1..];
                        replace = Some(if attached.is_empty() { "{}" } else { attached }.into());
                    }
                    i += 1;
                }
            }
        } else {
            break;
        }
    }
    let run = &rest[i.min(rest.len())..];
    let Some(first) = run.first() else {
        // With no command xargs runs echo.
        an.program("echo", loc);
        return Next::Done;
    };
    if let (Some(r), Some(v)) = (&replace, &first.value) {
        if !r.is_empty() && v.contains(r.as_str()) {
            an.finding(
                Rule::ShellDynamic,
                format!("xargs puts its input into the program name `{v}`"),
                first.loc.clone(),
            );
            return Next::Done;
        }
    }
    Next::Run(run)
}

fn find(an: &mut Analysis, rest: &[Arg], depth: usize) {
    let mut i = 0;
    while i < rest.len() {
        let action = rest[i].value.as_deref();
        if matches!(action, Some("-exec" | "-execdir" | "-ok" | "-okdir")) {
            let start = i + 1;
            let mut end = start;
            while end < rest.len() && !matches!(rest[end].value.as_deref(), Some(";" | "+")) {
                end += 1;
            }
            let sub = &rest[start..end];
            match sub.first() {
                Some(first) if first.value.as_deref().is_some_and(|v| v.contains("{}")) => {
                    an.finding(
                        Rule::ShellDynamic,
                        "find -exec runs the files it finds as programs",
                        first.loc.clone(),
                    );
                }
                Some(_) => resolve(an, sub, Stdin::Empty, depth + 1),
                None => {}
            }
            i = end + 1;
        } else {
            i += 1;
        }
    }
}

fn trap(an: &mut Analysis, rest: &[Arg], depth: usize) {
    let Some(action) = rest.iter().find(|a| a.value.as_deref() != Some("--")) else {
        return;
    };
    match &action.value {
        Some(code) if !code.starts_with('-') => shell::analyse(an, code, Stdin::Empty, depth + 1),
        Some(_) => {}
        None => {
            an.finding(
                Rule::ShellDynamic,
                "trap runs a string as commands, which is only known when it runs",
                action.loc.clone(),
            );
        }
    }
}

/// `sh -c STRING`, `sh` reading stdin, or `sh FILE`.
fn shell_invocation(an: &mut Analysis, program: &str, rest: &[Arg], stdin: &Stdin, depth: usize) {
    // Options are taken from the front; the first other word is the -c string or a script.
    let mut command_mode = false;
    let mut i = 0;
    while i < rest.len() {
        // A word only known at run time ends the options: it is the -c string or a script.
        let Some(v) = rest[i].value.as_deref() else {
            break;
        };
        if v == "--" || v == "-" {
            i += 1;
            break;
        }
        if let Some(long) = v.strip_prefix("--") {
            i += if matches!(long, "rcfile" | "init-file") {
                2
            } else {
                1
            };
        } else if v.len() > 1 && (v.starts_with('-') || v.starts_with('+')) {
            let opts = &v[1..];
            command_mode |= opts.contains('c');
            // `-o NAME`/`-O NAME` take the next word.
            i += 1 + opts.chars().filter(|c| matches!(c, 'o' | 'O')).count();
        } else {
            break;
        }
    }
    if command_mode {
        match rest.get(i) {
            Some(Arg {
                value: Some(code), ..
            }) => shell::analyse(an, code, stdin.clone(), depth + 1),
            Some(arg) => {
                an.finding(
                    Rule::ShellDynamic,
                    format!(
                        "{program} -c runs `{}`, which is only known when it runs",
                        arg.raw
                    ),
                    arg.loc.clone(),
                );
            }
            None => {}
        }
    } else if i >= rest.len() {
        code_on_stdin(an, program, stdin, depth, shell::analyse);
    }
    // Otherwise it runs a script file, which is not analysed (docs/POLICY.md says why).
}

/// The word `arg` given to interpreter `program`, or `None` (with a `shell.dynamic` finding)
/// when it is only known at run time: the rest of the command line cannot be read then.
fn known_word<'a>(an: &mut Analysis, program: &str, arg: &'a Arg) -> Option<&'a str> {
    let v = arg.value.as_deref();
    if v.is_none() {
        an.finding(
            Rule::ShellDynamic,
            format!(
                "{program} is given `{}`, which is only known when it runs",
                arg.raw
            ),
            arg.loc.clone(),
        );
    }
    v
}

/// `python3 -c CODE`, `python3 -m MODULE`, python reading stdin, or `python3 FILE`.
fn python_invocation(an: &mut Analysis, program: &str, rest: &[Arg], stdin: &Stdin, depth: usize) {
    let mut i = 0;
    while i < rest.len() {
        let arg = &rest[i];
        let Some(v) = known_word(an, program, arg) else {
            return;
        };
        if v == "-" {
            break;
        }
        if v == "--" {
            return;
        }
        if v.starts_with("--") {
            i += if v == "--check-hash-based-pycs" { 2 } else { 1 };
            continue;
        }
        if !(v.len() > 1 && v.starts_with('-')) {
            return; // a script file
        }
        let opts = &v[1..];
        for (k, c) in opts.char_indices() {
            let attached = &opts[k + 1..];
            match c {
                'c' | 'm' => {
                    let value = if attached.is_empty() {
                        rest.get(i + 1)
                    } else {
                        None
                    };
                    let text = if attached.is_empty() {
                        value.and_then(|a| a.value.clone())
                    } else {
                        Some(attached.to_string())
                    };
                    let loc = value.map_or(&arg.loc, |a| &a.loc);
                    match (c, text) {
                        ('c', Some(code)) => python::analyse(an, &code, depth + 1),
                        ('m', Some(module)) => python::analyse_module(an, &module, loc),
                        (_, None) if value.is_some() => {
                            an.finding(
                                Rule::ShellDynamic,
                                format!(
                                    "{program} -{c} is given `{}`, which is only known when it runs",
                                    value.map_or("", |a| a.raw.as_str())
                                ),
                                loc.clone(),
                            );
                        }
                        _ => {}
                    }
                    return;
                }
                'W' | 'X' => {
                    if attached.is_empty() {
                        i += 1;
                    }
                    break;
                }
                _ => {}
            }
        }
        i += 1;
    }
    code_on_stdin(an, program, stdin, depth, python::analyse_stdin);
}

fn is_node(base: &str) -> bool {
    let version = base
        .strip_prefix("nodejs")
        .or_else(|| base.strip_prefix("node"));
    version.is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// node's options that take a value (as `--opt VALUE` or `--opt=VALUE`), other than the code
/// and module ones handled on their own. An option not listed here and not in [`NODE_FLAGS`]
/// makes the command unresolved when a word follows it that it could take as its value.
const NODE_VALUE_OPTIONS: &[&str] = &[
    "-C",
    "--conditions",
    "--cpu-prof-dir",
    "--cpu-prof-interval",
    "--cpu-prof-name",
    "--diagnostic-dir",
    "--disable-warning",
    "--dns-result-order",
    "--env-file",
    "--env-file-if-exists",
    "--es-module-specifier-resolution",
    "--experimental-config-file",
    "--experimental-default-type",
    "--experimental-policy",
    "--experimental-sea-config",
    "--heap-prof-dir",
    "--heap-prof-interval",
    "--heap-prof-name",
    "--heapsnapshot-near-heap-limit",
    "--heapsnapshot-signal",
    "--icu-data-dir",
    "--input-type",
    "--inspect-port",
    "--debug-port",
    "--localstorage-file",
    "--max-http-header-size",
    "--openssl-config",
    "--policy-integrity",
    "--redirect-warnings",
    "--report-dir",
    "--report-directory",
    "--report-filename",
    "--report-signal",
    "--secure-heap",
    "--secure-heap-min",
    "--snapshot-blob",
    "--test-concurrency",
    "--test-name-pattern",
    "--test-reporter",
    "--test-reporter-destination",
    "--test-shard",
    "--test-skip-pattern",
    "--test-timeout",
    "--title",
    "--tls-cipher-list",
    "--tls-keylog",
    "--trace-event-categories",
    "--trace-event-file-pattern",
    "--unhandled-rejections",
    "--use-largepages",
    "--watch-path",
    "--stack-size",
    "--max-old-space-size",
    "--max-semi-space-size",
];

/// node's common options that take no value.
const NODE_FLAGS: &[&str] = &[
    "-v",
    "--version",
    "-h",
    "--help",
    "-c",
    "--check",
    "-i",
    "--interactive",
    "--abort-on-uncaught-exception",
    "--enable-source-maps",
    "--expose-gc",
    "--frozen-intrinsics",
    "--inspect",
    "--inspect-brk",
    "--inspect-wait",
    "--jitless",
    "--pending-deprecation",
    "--preserve-symlinks",
    "--preserve-symlinks-main",
    "--prof",
    "--cpu-prof",
    "--heap-prof",
    "--test",
    "--throw-deprecation",
    "--trace-deprecation",
    "--trace-exit",
    "--trace-sigint",
    "--trace-sync-io",
    "--trace-uncaught",
    "--trace-warnings",
    "--watch",
    "--zero-fill-buffers",
    "--experimental-vm-modules",
    "--experimental-strip-types",
    "--experimental-transform-types",
    "--experimental-detect-module",
    "--experimental-require-module",
    "--experimental-wasm-modules",
    "--experimental-websocket",
    "--experimental-sqlite",
    "--experimental-eventsource",
    "--experimental-permission",
    "--permission",
    "--allow-child-process",
    "--allow-worker",
    "--allow-addons",
    "--allow-wasi",
    "--use-openssl-ca",
    "--use-bundled-ca",
    "--openssl-legacy-provider",
    "--insecure-http-parser",
    "--report-on-signal",
    "--report-uncaught-exception",
    "--report-on-fatalerror",
    "--report-compact",
];

/// `node -e CODE`, `node -p CODE`, `node -r MODULE`/`--import MODULE`, node reading its program
/// from stdin (`node`, `node -`, `node -i`), or `node FILE`.
fn node_invocation(an: &mut Analysis, program: &str, rest: &[Arg], stdin: &Stdin, depth: usize) {
    let mut i = 0;
    while i < rest.len() {
        let arg = &rest[i];
        let Some(v) = known_word(an, program, arg) else {
            return;
        };
        if v == "-" {
            break;
        }
        if v == "--" || !v.starts_with('-') || v.len() == 1 {
            return; // a script file (after `--`, the next word is one)
        }
        // node spells options with `_` or `-` alike.
        let (name, attached) = match v.split_once('=') {
            Some((n, a)) if n.starts_with("--") => (n.replace('_', "-"), Some(a)),
            _ if v.starts_with("--") => (v.replace('_', "-"), None),
            _ => (v.to_string(), None),
        };
        // The value of an option: attached, or the next word.
        let value = |i: usize| -> (Option<String>, &Arg, usize) {
            match attached {
                Some(a) => (Some(a.to_string()), arg, 1),
                None => match rest.get(i + 1) {
                    Some(next) => (next.value.clone(), next, 2),
                    None => (None, arg, 1),
                },
            }
        };
        match name.as_str() {
            "-e" | "--eval" | "-p" | "--print" | "-pe" | "-ep" => {
                let (code, at, _) = value(i);
                match code {
                    Some(code) => javascript::analyse(an, &code, depth + 1),
                    None if !std::ptr::eq(at, arg) => an.finding(
                        Rule::ShellDynamic,
                        format!(
                            "{program} {v} is given `{}`, which is only known when it runs",
                            at.raw
                        ),
                        at.loc.clone(),
                    ),
                    None => {}
                }
                return;
            }
            "-r" | "--require" | "--import" | "--loader" | "--experimental-loader" => {
                let (module, at, step) = value(i);
                match module {
                    Some(m) => javascript::analyse_preload(an, &m, &at.loc),
                    None => {
                        return unresolved_arg(an, program, at);
                    }
                }
                i += step;
            }
            n if NODE_VALUE_OPTIONS.contains(&n) => i += value(i).2,
            n if attached.is_some() || NODE_FLAGS.contains(&n) || n.starts_with("--no-") => i += 1,
            n if n.starts_with("--") => {
                // Unknown: harmless as a flag, but if it took a value node would read the next
                // word as one, and what follows as the program: only a following option is safe.
                match rest.get(i + 1).and_then(|a| a.value.as_deref()) {
                    Some(next) if next.starts_with('-') && next.len() > 1 => i += 1,
                    None if i + 1 == rest.len() => i += 1,
                    _ => return unresolved_arg(an, program, arg),
                }
            }
            _ => return unresolved_arg(an, program, arg),
        }
    }
    code_on_stdin(an, program, stdin, depth, javascript::analyse_stdin);
}

fn unresolved_arg(an: &mut Analysis, program: &str, arg: &Arg) {
    an.finding(
        Rule::CommandUnresolved,
        format!(
            "cannot tell what {program} runs: `{}` is an option the analyser does not know",
            arg.raw
        ),
        arg.loc.clone(),
    );
}

fn code_on_stdin(
    an: &mut Analysis,
    program: &str,
    stdin: &Stdin,
    depth: usize,
    analyse: fn(&mut Analysis, &str, Stdin, usize),
) {
    match stdin {
        Stdin::Empty => {}
        Stdin::Known(code) => analyse(an, code, Stdin::Empty, depth + 1),
        Stdin::Unknown(from) => an.finding(
            Rule::ShellDynamic,
            format!("{program} reads its program from {from}, which is only known when it runs"),
            Loc::request(program),
        ),
    }
}
