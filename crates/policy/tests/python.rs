//! The Python analyser against single families: a policy that denies only some families lets
//! the others through, code it cannot see is reported under whichever family is denied, and
//! hostile input (deep nesting, huge input) is refused, not crashed on.

use moat_policy::{check, CheckRequest, Decision, Policy, Rule};

fn decide(deny: &str, code: &str) -> Decision {
    let policy = Policy::parse(&format!("mode: enforce\npython: {{deny: [{deny}]}}")).unwrap();
    let request = CheckRequest {
        python: Some(code.to_string()),
        ..Default::default()
    };
    check(&policy, &request)
}

#[track_caller]
fn refused(deny: &str, code: &str, rule: Rule) {
    let d = decide(deny, code);
    assert!(
        !d.allowed && d.has(rule),
        "expected {rule} for {code:?}: {d:#?}"
    );
}

#[track_caller]
fn allowed(deny: &str, code: &str) {
    let d = decide(deny, code);
    assert!(d.allowed && d.findings.is_empty(), "{code:?}: {d:#?}");
}

#[test]
fn only_denied_families_refuse() {
    allowed("network", "import subprocess\nsubprocess.run(['ls'])");
    allowed("process", "import socket");
    allowed("process", "import ctypes");
    refused("native", "import ctypes", Rule::PythonNative);
    allowed("", "import os\nos.system('id')");
}

#[test]
fn code_the_analyser_cannot_see_counts_as_every_family() {
    // A literal is analysed; what it does is judged like the rest of the file.
    allowed("process", "exec('print(1)')");
    refused(
        "process",
        "exec(\"import os\\nos.system('id')\")",
        Rule::PythonProcess,
    );
    refused("dynamic-code", "exec('print(1)')", Rule::PythonDynamicCode);
    // Computed code or names could be anything, so they are refused under any denied family.
    refused("process", "exec(payload)", Rule::PythonProcess);
    refused("network", "exec(payload)", Rule::PythonNetwork);
    refused("native", "__import__(name)", Rule::PythonNative);
    refused(
        "process",
        "import os\ngetattr(os, n)('id')",
        Rule::PythonProcess,
    );
    // A computed attribute of an ordinary object is reflection only.
    allowed("process", "getattr(obj, field)");
    refused("reflection", "getattr(obj, field)", Rule::PythonReflection);
    refused(
        "process",
        "import codecs, os\ngetattr(os, codecs.decode('flfgrz', 'rot13'))('id')",
        Rule::PythonProcess,
    );
}

#[test]
fn resolution_follows_the_forms_in_the_issue() {
    for code in [
        "import os as o; o.system('id')",
        "from os import system as s; s('id')",
        "import os; getattr(os, 'sys' + 'tem')('id')",
        "__import__('os').system('id')",
        "import importlib; importlib.import_module('subprocess')",
        "import sys; sys.modules['os'].popen('id')",
        "__builtins__.__import__('os').system('id')",
        "import os; os.posix_spawnp('id', ['id'], {})",
        "import pty",
        "import multiprocessing.pool",
        "import asyncio; asyncio.create_subprocess_exec('id')",
        "import os; list(map(os.system, ['id']))",
        "import os\nx = os\ny = x.system\ny('id')",
    ] {
        refused("process", code, Rule::PythonProcess);
    }
    for code in [
        "eval('1')",
        "compile('1', 'x', 'eval')",
        "import runpy",
        "import code",
        "import pickle; pickle.loads(b'')",
        "import marshal; marshal.loads(b'')",
        "import builtins; builtins.exec('1')",
        "getattr(__builtins__, 'eval')('1')",
    ] {
        refused("dynamic-code", code, Rule::PythonDynamicCode);
    }
    for code in [
        "import socket",
        "import http.client",
        "import urllib.request",
        "from urllib import request",
        "import requests",
        "import httpx",
    ] {
        refused("network", code, Rule::PythonNetwork);
    }
    for code in ["import ctypes", "from cffi import FFI", "import _ctypes"] {
        refused("native", code, Rule::PythonNative);
    }
    for code in [
        "x.__class__",
        "import sys; sys.modules",
        "globals()['x']",
        "f.__globals__",
        "getattr(x, '__subclasses__')",
    ] {
        refused("reflection", code, Rule::PythonReflection);
    }
}

#[test]
fn unparseable_python_is_refused_when_any_family_is_denied() {
    refused("process", "def f(:\n  pass", Rule::PythonUnparseable);
    refused("network", "print 'py2'", Rule::PythonUnparseable);
    allowed("", "def f(:\n  pass");
    // Newer syntax than most hosts' Python parses, so it is analysed, not failed open.
    refused(
        "process",
        "type Alias = int\nimport os\nos.system('id')",
        Rule::PythonProcess,
    );
}

#[test]
fn deep_syntax_trees_are_refused_at_a_bound() {
    let depth = 50_000;
    let code = format!("x = {}1{}", "[".repeat(depth), "]".repeat(depth));
    // Ruff's parser needs a large stack for this (the worker gives it one, see tests/worker.rs);
    // the walk over the tree stops at its own bound.
    let d = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || decide("process", &code))
        .unwrap()
        .join()
        .unwrap();
    assert!(!d.allowed && d.has(Rule::InputTooComplex), "{d:#?}");
}
