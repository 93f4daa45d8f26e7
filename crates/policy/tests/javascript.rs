//! Inline JavaScript (`node -e`, `node -p`, code on node's stdin) against the families it is
//! refused for: every way the research note and the issue list to reach `child_process`,
//! dynamic code, native code, the network and reflection, through node's options and the
//! wrappers around it; ordinary code that must pass; code the analyser cannot read refused,
//! never waved through.

use moat_policy::{check, CheckRequest, Decision, Policy, Rule};
use serde_json::json;

fn policy(deny: &str) -> Policy {
    Policy::parse(&format!(
        "mode: enforce\ncommands: {{allow: [node, nodejs, sh, env, timeout, xargs, echo, cat]}}\n\
         javascript: {{deny: [{deny}]}}"
    ))
    .unwrap()
}

const ALL: &str = "process, dynamic-code, native, network, reflection";

fn decide(deny: &str, request: serde_json::Value) -> Decision {
    let request: CheckRequest = serde_json::from_value(request).unwrap();
    check(&policy(deny), &request)
}

/// `node -e CODE` under a policy denying `deny`.
fn node_e(deny: &str, code: &str) -> Decision {
    decide(deny, json!({"argv": ["node", "-e", code]}))
}

#[track_caller]
fn refused(d: Decision, rule: Rule) {
    assert!(!d.allowed && d.has(rule), "expected {rule}: {d:#?}");
}

/// `node -e CODE` refused with `rule` under a policy denying `deny`.
#[track_caller]
fn refused_e(deny: &str, code: &str, rule: Rule) {
    let d = node_e(deny, code);
    assert!(
        !d.allowed && d.has(rule),
        "expected {rule} for {code:?}: {d:#?}"
    );
}

#[track_caller]
fn allowed(d: Decision) {
    assert!(d.allowed && d.findings.is_empty(), "refused: {d:#?}");
}

#[test]
fn every_form_of_child_process_is_refused() {
    for code in [
        "require('child_process').execSync('id')",
        "require(\"node:child_process\").spawn('id')",
        "require(`child_process`).exec('id')",
        "const cp = require('child_process'); cp.exec('id')",
        "const { exec } = require('child_process'); exec('id')",
        "const { exec: run } = require('node:child_process'); run('id')",
        "const { spawnSync: s = null } = require('child_process'); s('id')",
        "let cp; cp = require('child_process'); cp.fork('x.js')",
        "var x = require('child_' + 'process')",
        "require(['child', 'process'].join('_'))",
        "require('child'.concat('_process'))",
        "require(String.fromCharCode(99,104,105,108,100,95,112,114,111,99,101,115,115))",
        "require?.('child_process')",
        "(0, require)('child_process')",
        "module.require('child_process')",
        "require.main.require('child_process')",
        "process.mainModule.require('child_process')",
        "module.constructor._load('child_process')",
        "require('module')._load('child_process')",
        "require('module').createRequire(__filename)('child_process')",
        "process.getBuiltinModule('child_process')",
        "import('child_process').then(m => m.exec('id'))",
        "const m = await import('node:child_process'); m.execSync('id')",
        "import { exec } from 'child_process'; exec('id')",
        "import * as cp from 'node:child_process'; cp.exec('id')",
        "import cp from 'child_process'",
        "export * from 'child_process'",
        "process.binding('spawn_sync')",
        "process['bind' + 'ing']('spawn_sync')",
        "process?.binding('spawn_sync')",
        "process._linkedBinding('spawn_sync')",
        "const { binding } = process; binding('spawn_sync')",
        "const { binding: b } = require('process'); b('spawn_sync')",
        "Reflect.get(process, 'binding')('spawn_sync')",
        "with (process) binding('spawn_sync')",
        "new (require('worker_threads').Worker)('1', { eval: true })",
        "const { Worker } = require('worker_threads')",
        "require('cluster').fork()",
        "process.execve('/bin/id')",
        "require('internal/child_process')",
        // Shadowing a gateway name somewhere does not hide the real one.
        "function f(require) { return 1 } require('child_process')",
        "{ const process = {}; } process.binding('spawn_sync')",
        "var require = console.log; require('child_process')",
        // Hidden in arguments of calls the analysis resolves.
        "require('fs', require('child_process')).x",
        "require('fs').readFileSync(require('child_process'))",
    ] {
        refused_e("process", code, Rule::JavascriptProcess);
    }
}

#[test]
fn what_the_analyser_cannot_see_is_refused_under_every_family() {
    for code in [
        "require(name)",
        "require(`child_${x}`)",
        "require(atob('Y2hpbGRfcHJvY2Vzcw=='))",
        "import(m)",
        "const r = require; r('child_process')",
        "[require][0]('child_process')",
        "load(require)",
        "require.call(null, 'child_process')",
        "require.apply(null, ['child_process'])",
        "Reflect.apply(require, null, ['child_process'])",
        "globalThis[k]('child_process')",
        "global[atob('cmVxdWlyZQ==')]",
        "process[key]('spawn_sync')",
        "Object.getOwnPropertyDescriptor(process, 'binding').value('spawn_sync')",
        "Object.values(process)",
        "Object.assign({}, process).binding('spawn_sync')",
        "const { ...p } = process; p.binding('spawn_sync')",
        "const { [k]: f } = process; f('spawn_sync')",
        "(p => p.binding('spawn_sync'))(process)",
        "require('fs')[method]('x')",
    ] {
        for (deny, rule) in [
            ("process", Rule::JavascriptProcess),
            ("network", Rule::JavascriptNetwork),
            ("native", Rule::JavascriptNative),
        ] {
            refused_e(deny, code, rule);
        }
    }
    for code in [
        "eval(code)",
        "eval(atob('cmVxdWlyZSgiY2hpbGRfcHJvY2VzcyIp'))",
        "(0, eval)(code)",
        "globalThis.eval(code)",
        "global['ev' + 'al'](code)",
        "Function(code)()",
        "new Function('a', body)",
        "''.constructor.constructor('return process')()",
        "(async () => {}).constructor('return 1')",
        "const F = [].constructor.constructor",
        "eval.call(null, code)",
        "Function`return process`",
    ] {
        refused_e("dynamic-code", code, Rule::JavascriptDynamicCode);
        refused_e("process", code, Rule::JavascriptProcess);
    }
}

#[test]
fn literal_code_is_analysed_and_judged_like_the_rest() {
    // eval/Function of a literal is dynamic code; what the literal does is analysed too.
    refused(
        node_e("dynamic-code", "eval('1 + 1')"),
        Rule::JavascriptDynamicCode,
    );
    allowed(node_e("process", "eval('1 + 1')"));
    refused(
        node_e(
            "process",
            "eval(\"require('child_process').execSync('id')\")",
        ),
        Rule::JavascriptProcess,
    );
    refused(
        node_e(
            "process",
            "new Function('return require(\"child_process\")')()",
        ),
        Rule::JavascriptProcess,
    );
    // Parameter defaults are code too.
    refused(
        node_e(
            "process",
            "Function('a = require(\"child_process\")', 'return a')()",
        ),
        Rule::JavascriptProcess,
    );
    refused(
        node_e("dynamic-code", "setTimeout('doIt()', 10)"),
        Rule::JavascriptDynamicCode,
    );
    refused(
        node_e("process", "setInterval(\"require('child_process')\", 10)"),
        Rule::JavascriptProcess,
    );
    refused(
        node_e("dynamic-code", "require('vm').runInThisContext('1')"),
        Rule::JavascriptDynamicCode,
    );
    refused(
        node_e("dynamic-code", "new ShadowRealm().evaluate('1')"),
        Rule::JavascriptDynamicCode,
    );
}

#[test]
fn native_network_and_reflection_families() {
    for code in [
        "process.dlopen({exports: {}}, '/tmp/x.so')",
        "require('./addon.node')",
        "require('/opt/lib/binding.node').run()",
        "require('ffi-napi')",
        "import koffi from 'koffi'",
    ] {
        refused_e("native", code, Rule::JavascriptNative);
    }
    for code in [
        "fetch('http://example.invalid')",
        "globalThis.fetch('http://x')",
        "new WebSocket('ws://x')",
        "require('http').get('http://x')",
        "require('node:https').request('https://x')",
        "require('net').connect(80, 'x')",
        "require('http2')",
        "require('dgram').createSocket('udp4')",
        "require('tls').connect(443, 'x')",
        "require('dns').lookup('x', () => {})",
        "require('dns/promises')",
        "import { request } from 'undici'",
        "const { get } = require('https'); get('https://x')",
    ] {
        refused_e("network", code, Rule::JavascriptNetwork);
    }
    for code in [
        "process.mainModule",
        "require.cache",
        "module.constructor",
        "x.__proto__",
        "obj.constructor.name",
        "Object.getPrototypeOf(x)",
    ] {
        refused_e("reflection", code, Rule::JavascriptReflection);
    }
}

#[test]
fn only_denied_families_refuse_and_ordinary_code_passes() {
    allowed(node_e("network", "require('child_process').execSync('id')"));
    allowed(node_e("process", "fetch('http://x')"));
    allowed(node_e("process", "process.mainModule"));
    allowed(decide(
        "",
        json!({"argv": ["node", "-e", "require('child_process').execSync('id')"]}),
    ));
    for code in [
        "console.log(1 + 1)",
        "const fs = require('fs'); console.log(fs.readFileSync('/etc/hostname', 'utf8'))",
        "const path = require('node:path'); console.log(path.join('a', 'b'))",
        "import { readFileSync } from 'node:fs'; console.log(readFileSync('x', 'utf8'))",
        "console.log(process.argv.slice(2), process.env.HOME, process.env[name])",
        "const o = {a: 1}; for (const k in o) console.log(o[k])",
        "setTimeout(() => console.log('x'), 10); setInterval(tick, 100)",
        "const { floor } = Math; console.log(floor(1.5))",
        "class A { constructor() { this.x = 1 } }; new A()",
        "JSON.stringify({ constructor: 1 })",
        "const require2 = 1; console.log(require2)",
        "require.resolve('fs')",
        "(async () => { await new Promise(r => setTimeout(r, 1)); return 'ok' })()",
        "#!/usr/bin/env node\nconsole.log('shebang')",
        "return 1",
    ] {
        allowed(node_e(ALL, code));
    }
}

#[test]
fn node_options_and_spellings_lead_to_the_code() {
    let bad = "require('child_process').execSync('id')";
    for argv in [
        vec!["node", "-e", bad],
        vec!["node", "--eval", bad],
        vec!["node", &format!("--eval={bad}")],
        vec!["node", "-p", bad],
        vec!["node", "--print", bad],
        vec!["node", "-pe", bad],
        vec!["nodejs", "-e", bad],
        vec!["/usr/bin/node", "-e", bad],
        vec!["node22", "-e", bad],
        vec!["node", "--no-warnings", "--input-type=commonjs", "-e", bad],
        vec!["node", "--input-type", "module", "-e", bad],
        vec!["node", "--max_old_space_size=100", "-e", bad],
        vec!["node", "--title", "x", "-e", bad],
        vec!["node", "--some-future-flag", "-e", bad],
    ] {
        refused(
            decide("process", json!({ "argv": argv })),
            Rule::JavascriptProcess,
        );
    }
    // Modules loaded before the code.
    refused(
        decide(
            "process",
            json!({"argv": ["node", "-r", "child_process", "x.js"]}),
        ),
        Rule::JavascriptProcess,
    );
    refused(
        decide(
            "process",
            json!({"argv": ["node", "--import=node:child_process", "-e", "1"]}),
        ),
        Rule::JavascriptProcess,
    );
    for url in [
        "data:text/javascript,require('child_process')",
        "https://example.invalid/x.mjs",
    ] {
        refused(
            decide(
                "process",
                json!({"argv": ["node", "--import", url, "-e", "1"]}),
            ),
            Rule::JavascriptProcess,
        );
    }
    // An option it does not know, followed by a word node might take as its value: node could
    // then run code the analyser did not see, so it is refused.
    refused(
        decide(
            "process",
            json!({"argv": ["node", "--future-option", "v", "-e", bad]}),
        ),
        Rule::CommandUnresolved,
    );
    refused(
        decide("process", json!({"argv": ["node", "-x", "-e", bad]})),
        Rule::CommandUnresolved,
    );
    // A script file is a program, not code the analyser sees (docs/POLICY.md).
    allowed(decide(
        ALL,
        json!({"argv": ["node", "script.js", "-e", bad]}),
    ));
    allowed(decide(ALL, json!({"argv": ["node", "--", "-e"]})));
    allowed(decide(ALL, json!({"argv": ["node", "--version"]})));
}

#[test]
fn node_inside_shells_and_wrappers() {
    let bad = "require(\"child_process\").execSync(\"id\")";
    for command in [
        format!("node -e '{bad}'"),
        format!("sh -c \"node -e '{bad}'\""),
        format!("env NODE_ENV=x node -e '{bad}'"),
        format!("timeout 5 nodejs -p '{bad}'"),
        format!("echo x | xargs node -e '{bad}'"),
        format!("cat file && node --eval='{bad}'"),
        format!("x=$(node -e '{bad}')"),
    ] {
        refused(
            decide("process", json!({ "command": command })),
            Rule::JavascriptProcess,
        );
    }
    refused(
        decide("process", json!({"command": "node -e \"$CODE\""})),
        Rule::ShellDynamic,
    );
}

#[test]
fn code_on_stdin_is_analysed_like_python_on_stdin() {
    let bad = "require('child_process').execSync('id')\n";
    for argv in [
        vec!["node"],
        vec!["node", "-"],
        vec!["node", "-i"],
        vec!["node", "--no-warnings"],
    ] {
        refused(
            decide("process", json!({"argv": argv, "stdin": bad})),
            Rule::JavascriptProcess,
        );
        allowed(decide(
            ALL,
            json!({"argv": argv, "stdin": "console.log(1)\n"}),
        ));
    }
    // With code in -e, stdin is data.
    allowed(decide(
        ALL,
        json!({"argv": ["node", "-e", "1"], "stdin": bad}),
    ));
    refused(
        decide(
            "process",
            json!({"command": "node <<'EOF'\nrequire('child_process').execSync('id')\nEOF\n"}),
        ),
        Rule::JavascriptProcess,
    );
    refused(
        decide(
            "process",
            json!({"command": "node <<< \"require('child_process')\""}),
        ),
        Rule::JavascriptProcess,
    );
    refused(
        decide("process", json!({"command": "cat x.js | node"})),
        Rule::ShellDynamic,
    );
    refused(
        decide("process", json!({"command": "node - < x.js"})),
        Rule::ShellDynamic,
    );
}

#[test]
fn unreadable_deep_and_huge_code_is_refused() {
    for code in [
        "require('child_process'",
        "%DebugPrint(1)",
        "if (",
        "}{",
        "a =>> b",
    ] {
        refused_e("process", code, Rule::JavascriptUnparseable);
    }
    // With nothing denied in JavaScript there is nothing to refuse it for.
    allowed(decide("", json!({"argv": ["node", "-e", "}{"]})));
    let d = node_e("process", "}{");
    assert!(
        d.findings[0].message.contains("cannot parse") && d.findings[0].line == Some(1),
        "{d:#?}"
    );
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    refused(node_e("process", &deep), Rule::InputTooComplex);
    let huge = "1;".repeat(moat_policy::MAX_CODE_BYTES / 2 + 1);
    refused(node_e("process", &huge), Rule::InputTooLarge);
    // Long flat shapes the parser builds without recursion, on the worker's stack: refused as
    // too deep (or decided), never a crash, within the worker's deadline.
    let long = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(|| {
            let mut out = Vec::new();
            for code in [
                format!("a{}", ".b".repeat(200_000)),
                format!("require('a'{})", " + 'a'".repeat(100_000)),
                format!("eval(x{})", "[0]".repeat(100_000)),
                format!("setTimeout(x{}, 1)", " + y".repeat(100_000)),
            ] {
                let t0 = std::time::Instant::now();
                let d = node_e("process", &code);
                out.push((code.len(), d, t0.elapsed()));
            }
            out
        })
        .unwrap()
        .join()
        .unwrap();
    for (len, d, took) in long {
        assert!(
            d.allowed == d.findings.is_empty() && took < moat_policy::Bounds::default().deadline,
            "{len} bytes: {took:?} {d:#?}"
        );
    }
    // Literal code in eval nests one level deeper each time; past the bound it is refused.
    let mut nested = "1".to_string();
    for _ in 0..10 {
        nested = format!("eval({})", serde_json::to_string(&nested).unwrap());
    }
    refused(node_e("process", &nested), Rule::InputTooComplex);
}

#[test]
fn audit_reports_what_enforce_refuses() {
    let p = Policy::parse("mode: audit\ncommands: {allow: [node]}\njavascript: {deny: [process]}")
        .unwrap();
    let request: CheckRequest = serde_json::from_value(
        json!({"argv": ["node", "-e", "require('child_process').execSync('id')"]}),
    )
    .unwrap();
    let d = check(&p, &request);
    assert!(d.allowed && d.has(Rule::JavascriptProcess), "{d:#?}");
    let f = &d.findings[0];
    assert_eq!((f.line, f.column), (Some(1), Some(1)), "{f:#?}");
    assert!(f.snippet.contains("child_process"), "{f:#?}");
}
