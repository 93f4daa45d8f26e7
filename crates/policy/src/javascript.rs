//! JavaScript analysis for `node -e`/`-p` and code on node's stdin, on oxc's parser
//! (`oxc_parser`, pinned): pure Rust, current ECMAScript, the parser of the oxc linter and
//! minifier. tree-sitter-javascript would parse hostile code in C.
//!
//! The same shape as the Python analysis (python.rs), over the same families: a first pass
//! records what local names stand for (`const cp = require('child_process')`, destructuring,
//! `import … from`, `x = y`), a second resolves names, member chains, `require`/`import()`
//! calls with constant names and `Reflect.get` to qualified names (`child_process.exec`,
//! `globalThis.process.binding`) and reports references, not only calls. What it cannot
//! resolve but could reach anything is reported under every family: `require`/`import()` of
//! a computed name, a computed property of `globalThis`, `process` or a module, `eval` or
//! `Function` of code it cannot see, `require` handed around as a value. Names of the
//! gateways (`require`, `process`, `eval`, …) always mean the globals, whatever is declared
//! with that name somewhere: the analysis has no scopes, and a shadowing declaration must not
//! hide a real use elsewhere. docs/POLICY.md lists what it cannot see.

use std::collections::{HashMap, HashSet};

use oxc_allocator::Allocator;
use oxc_ast::ast::{
    Argument, AssignmentTarget, AssignmentTargetMaybeDefault, AssignmentTargetProperty,
    BindingPattern, CallExpression, ComputedMemberExpression, Expression,
    ImportDeclarationSpecifier, MemberExpression, ModuleExportName, NewExpression, PropertyKey,
    Statement, TaggedTemplateExpression, VariableDeclarator,
};
use oxc_ast_visit::{walk, Visit};
use oxc_parser::{ParseOptions, Parser};
use oxc_span::{GetSpan, SourceType, Span};

use crate::check::Analysis;
use crate::command::Stdin;
use crate::decision::{Lines, Loc, Rule};
use crate::policy::{Family, Language};

use Family::{DynamicCode, Native, Network, Process, Reflection};

/// Deeper syntax trees than this are refused (`input.too-complex`) rather than walked.
const MAX_TREE_DEPTH: usize = 200;

/// Qualified names and their families: modules by their name (`node:` dropped, `/` read as
/// `.`), globals under `globalThis`. A name matches an entry when it is the entry or inside it
/// (`child_process.exec` is in `child_process`).
const NAMES: &[(&str, Family)] = &[
    ("child_process", Process),
    ("worker_threads", Process),
    ("cluster", Process),
    ("globalThis.process.execve", Process),
    ("globalThis.process.binding", Process),
    ("globalThis.process._linkedBinding", Process),
    ("globalThis.eval", DynamicCode),
    ("globalThis.Function", DynamicCode),
    ("globalThis.ShadowRealm", DynamicCode),
    ("vm", DynamicCode),
    ("repl", DynamicCode),
    ("inspector", DynamicCode),
    ("module", DynamicCode),
    ("globalThis.process.binding", DynamicCode),
    ("globalThis.process._linkedBinding", DynamicCode),
    ("globalThis.process.dlopen", Native),
    ("globalThis.process.binding", Native),
    ("globalThis.process._linkedBinding", Native),
    ("ffi", Native),
    ("ffi-napi", Native),
    ("ffi-rs", Native),
    ("koffi", Native),
    ("net", Network),
    ("http", Network),
    ("https", Network),
    ("http2", Network),
    ("dgram", Network),
    ("tls", Network),
    ("dns", Network),
    ("_http_agent", Network),
    ("_http_client", Network),
    ("_http_server", Network),
    ("_tls_wrap", Network),
    ("undici", Network),
    ("ws", Network),
    ("axios", Network),
    ("node-fetch", Network),
    ("got", Network),
    ("globalThis.fetch", Network),
    ("globalThis.WebSocket", Network),
    ("globalThis.XMLHttpRequest", Network),
    ("globalThis.EventSource", Network),
    ("globalThis.process.binding", Network),
    ("globalThis.process._linkedBinding", Network),
    ("module", Reflection),
    ("globalThis.process.mainModule", Reflection),
    ("globalThis.process.binding", Reflection),
    ("globalThis.process._linkedBinding", Reflection),
    ("globalThis.require.cache", Reflection),
    ("globalThis.module.constructor", Reflection),
    ("globalThis.module.children", Reflection),
    ("globalThis.module.parent", Reflection),
    ("globalThis.Object.getPrototypeOf", Reflection),
    ("globalThis.Object.setPrototypeOf", Reflection),
    ("globalThis.Reflect.getPrototypeOf", Reflection),
    ("globalThis.Reflect.setPrototypeOf", Reflection),
    // Node's own internals (reachable with --expose-internals) can do anything.
    ("internal", Process),
    ("internal", DynamicCode),
    ("internal", Native),
    ("internal", Network),
    ("internal", Reflection),
];

/// Names that mean the global object itself.
const GLOBAL_OBJECTS: &[&str] = &["globalThis", "global", "self", "window"];

/// Properties that walk from any object to constructors and prototypes, and from there to
/// `Function` (`''.constructor.constructor('code')()`).
const PROTO_WALKS: &[&str] = &[
    "constructor",
    "__proto__",
    "__defineGetter__",
    "__lookupGetter__",
];

/// Calls that take code as a string.
const CODE_RUNNERS: &[&str] = &["globalThis.eval", "globalThis.Function"];

/// Timers that browsers (not Node) run a string argument of as code.
const TIMERS: &[&str] = &[
    "globalThis.setTimeout",
    "globalThis.setInterval",
    "globalThis.setImmediate",
    "timers.setTimeout",
    "timers.setInterval",
    "timers.setImmediate",
];

/// Calls that read the properties of the object they are given, so given a module, `process`
/// or the global object they reach everything on it.
const PROPERTY_READERS: &[&str] = &[
    "globalThis.Reflect",
    "globalThis.Object.getOwnPropertyDescriptor",
    "globalThis.Object.getOwnPropertyDescriptors",
    "globalThis.Object.entries",
    "globalThis.Object.values",
    "globalThis.Object.assign",
    "globalThis.Object.fromEntries",
];

/// Calls that produce text at run time from something unreadable (decoding, decompressing).
const DECODERS: &[&str] = &[
    "atob",
    "from",
    "toString",
    "decodeURIComponent",
    "decodeURI",
    "unescape",
    "fromCharCode",
    "fromCodePoint",
    "decode",
    "inflateSync",
    "gunzipSync",
    "brotliDecompressSync",
    "reverse",
];

/// Code that could do anything, with running code as its main family.
const CODE_ANY: [Family; 5] = [DynamicCode, Process, Native, Network, Reflection];

fn families_of(qname: &str) -> Vec<Family> {
    let mut out = Vec::new();
    for (pattern, family) in NAMES {
        let inside = qname
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        if inside && !out.contains(family) {
            out.push(*family);
        }
    }
    out
}

/// A global the analysis always reads as the global: the first part of a listed global name,
/// or one that loads modules or runs code. A local declaration with such a name is not trusted
/// to shadow the global (see the module documentation).
fn is_gateway_name(name: &str) -> bool {
    GLOBAL_OBJECTS.contains(&name)
        || [
            "require",
            "module",
            "process",
            "setTimeout",
            "setInterval",
            "setImmediate",
        ]
        .contains(&name)
        || NAMES.iter().any(|(pattern, _)| {
            pattern
                .strip_prefix("globalThis.")
                .is_some_and(|rest| rest.split('.').next() == Some(name))
        })
}

/// Whether calling `qname` loads a module by name: `require`, its copies (`module.require`,
/// `require.main.require`, `process.mainModule.require`, `createRequire(…)`), `Module._load`,
/// `process.getBuiltinModule`.
fn is_importer(qname: &str) -> bool {
    qname == "globalThis.require"
        || qname == "globalThis.process.getBuiltinModule"
        || qname == "module.createRequire()"
        || qname.ends_with(".require")
        || qname.ends_with("._load")
}

/// The qualified name of a module specifier: `node:` dropped, `/` read as `.`. None for a
/// file path (a file is not analysed, as `node FILE` is not).
fn module_name(specifier: &str) -> Option<String> {
    let name = specifier.strip_prefix("node:").unwrap_or(specifier);
    if name.starts_with('.') || name.starts_with('/') || name.contains(':') {
        return None;
    }
    Some(name.replace('/', "."))
}

/// A module loaded by name; `process` is the global `process`.
fn module(specifier: &str) -> Option<Resolved> {
    let name = module_name(specifier)?;
    Some(Resolved {
        qname: if name == "process" {
            "globalThis.process".into()
        } else {
            name
        },
        gateway: true,
    })
}

/// Checks JavaScript source.
pub(crate) fn analyse(an: &mut Analysis, code: &str, depth: usize) {
    if !an.fits(code.len(), code) || !an.within_nesting(depth, &Loc::request(code)) {
        return;
    }
    let allocator = Allocator::default();
    // Unambiguous: a script unless it has module syntax, as node decides for `-e` code. A
    // top-level `return` is accepted so that a `Function` body parses alone.
    let options = ParseOptions {
        allow_return_outside_function: true,
        ..ParseOptions::default()
    };
    let parsed = Parser::new(&allocator, code, SourceType::unambiguous())
        .with_options(options)
        .parse();
    if parsed.panicked || !parsed.diagnostics.is_empty() {
        let first = parsed.diagnostics.first();
        let message = first.map_or_else(|| "the parser gave up".to_string(), |d| d.to_string());
        let offset = first
            .and_then(|d| d.labels.first())
            .map_or(0, |l| l.offset() as usize);
        an.unparseable(
            Language::Javascript,
            format!("JavaScript the analyser cannot parse: {message}"),
            Lines::new(code).at(offset),
        );
        return;
    }
    let mut names = Names::default();
    // Twice, so that an alias of an alias defined later in the code resolves too.
    for _ in 0..2 {
        let mut binder = Binder {
            names: &mut names,
            depth: 0,
        };
        binder.visit_program(&parsed.program);
    }
    let mut checker = Checker {
        an,
        lines: Lines::new(code),
        names: &names,
        depth,
        tree_depth: 0,
        too_deep: false,
    };
    checker.visit_program(&parsed.program);
}

/// JavaScript fed to node on stdin.
pub(crate) fn analyse_stdin(an: &mut Analysis, code: &str, _stdin: Stdin, depth: usize) {
    analyse(an, code, depth);
}

/// A module node loads before the code (`node -r MODULE`, `--import MODULE`): judged as
/// `require(MODULE)`.
pub(crate) fn analyse_preload(an: &mut Analysis, specifier: &str, loc: &Loc) {
    if let Some(families) = special_module(specifier) {
        let message = describe_module(specifier, &families);
        an.code(Language::Javascript, &families, &message, || loc.clone());
    } else if let Some(name) = module_name(specifier) {
        let families = families_of(&name);
        if !families.is_empty() {
            let message = format!("loads {specifier}, which {}", Family::describe(&families));
            an.code(Language::Javascript, &families, &message, || loc.clone());
        }
    }
}

/// Modules judged by their form, not their name: native addons and code in a URL.
fn special_module(specifier: &str) -> Option<Vec<Family>> {
    if specifier.ends_with(".node") {
        Some(vec![Native])
    } else if specifier.starts_with("data:") || specifier.contains("://") {
        Some(CODE_ANY.to_vec())
    } else {
        None
    }
}

fn describe_module(specifier: &str, families: &[Family]) -> String {
    if families.contains(&Native) && families.len() == 1 {
        format!("loads the native addon {specifier:?}")
    } else {
        "loads code from a URL; it could do anything".to_string()
    }
}

/// A name resolved to what it refers to.
#[derive(Debug, Clone)]
struct Resolved {
    qname: String,
    /// A module, `process` or the global object: a computed property of it could be anything
    /// on it.
    gateway: bool,
}

impl Resolved {
    /// A global or a name inside a module (modules themselves come from `module`).
    fn new(qname: String) -> Resolved {
        let gateway = matches!(
            qname.as_str(),
            "globalThis" | "globalThis.process" | "globalThis.module"
        );
        Resolved { qname, gateway }
    }

    fn child(&self, property: &str) -> Resolved {
        Resolved::new(format!("{}.{property}", self.qname))
    }

    fn families(&self) -> Vec<Family> {
        families_of(&self.qname)
    }

    /// The name for messages.
    fn shown(&self) -> &str {
        self.qname
            .strip_prefix("globalThis.")
            .unwrap_or(&self.qname)
    }
}

/// What local names stand for.
#[derive(Default)]
struct Names {
    aliases: HashMap<String, Resolved>,
    /// Every name declared anywhere (a variable, a parameter, a function): not a global.
    bound: HashSet<String>,
}

impl Names {
    fn resolve(&self, e: &Expression) -> Option<Resolved> {
        self.resolve_in(e, 0)
    }

    /// `resolve`, `depth` levels into an expression: past the tree bound nothing resolves (the
    /// walk then refuses the code as too deep), so a long chain cannot exhaust the stack here.
    fn resolve_in(&self, e: &Expression, depth: usize) -> Option<Resolved> {
        if depth > MAX_TREE_DEPTH {
            return None;
        }
        let depth = depth + 1;
        match e {
            Expression::Identifier(id) => {
                let name = id.name.as_str();
                if GLOBAL_OBJECTS.contains(&name) {
                    Some(Resolved::new("globalThis".into()))
                } else if is_gateway_name(name) {
                    Some(Resolved::new(format!("globalThis.{name}")))
                } else if let Some(r) = self.aliases.get(name) {
                    Some(r.clone())
                } else if self.bound.contains(name) {
                    None
                } else {
                    Some(Resolved::new(format!("globalThis.{name}")))
                }
            }
            Expression::StaticMemberExpression(m) => Some(
                self.resolve_in(&m.object, depth)?
                    .child(m.property.name.as_str()),
            ),
            Expression::ComputedMemberExpression(m) => {
                let key = fold(&m.expression)?;
                Some(self.resolve_in(&m.object, depth)?.child(&key))
            }
            Expression::CallExpression(c) => self.resolve_call_in(&c.callee, &c.arguments, depth),
            Expression::ImportExpression(i) => module(&fold(&i.source)?),
            Expression::ParenthesizedExpression(p) => self.resolve_in(&p.expression, depth),
            Expression::AwaitExpression(a) => self.resolve_in(&a.argument, depth),
            Expression::SequenceExpression(s) => self.resolve_in(s.expressions.last()?, depth),
            Expression::AssignmentExpression(a) => self.resolve_in(&a.right, depth),
            Expression::ChainExpression(c) => match c.expression.as_member_expression()? {
                MemberExpression::StaticMemberExpression(m) => Some(
                    self.resolve_in(&m.object, depth)?
                        .child(m.property.name.as_str()),
                ),
                MemberExpression::ComputedMemberExpression(m) => {
                    let key = fold(&m.expression)?;
                    Some(self.resolve_in(&m.object, depth)?.child(&key))
                }
                MemberExpression::PrivateFieldExpression(_) => None,
            },
            _ => None,
        }
    }

    /// What a call returns, when it is a module or a name: `require('x')`, `createRequire(…)`,
    /// `Reflect.get(o, 'k')`.
    fn resolve_call(&self, callee: &Expression, args: &[Argument]) -> Option<Resolved> {
        self.resolve_call_in(callee, args, 0)
    }

    fn resolve_call_in(
        &self,
        callee: &Expression,
        args: &[Argument],
        depth: usize,
    ) -> Option<Resolved> {
        let func = self.resolve_in(callee, depth)?;
        let q = func.qname.as_str();
        let arg = |i: usize| args.get(i).and_then(Argument::as_expression);
        if is_importer(q) {
            module(&fold(arg(0)?)?)
        } else if q == "module.createRequire" || q == "globalThis.module.createRequire" {
            Some(Resolved::new("module.createRequire()".into()))
        } else if q == "globalThis.Reflect.get" {
            let object = self.resolve_in(arg(0)?, depth)?;
            Some(object.child(&fold(arg(1)?)?))
        } else {
            None
        }
    }

    /// Binds `name` to what `value` resolved to; a name bound to nothing known (or one of the
    /// gateway names, which are never aliased) is only recorded as bound.
    fn bind(&mut self, name: &str, value: Option<Resolved>) {
        match value {
            Some(r) if !is_gateway_name(name) => {
                self.aliases.insert(name.to_string(), r);
            }
            _ => {
                self.bound.insert(name.to_string());
            }
        }
    }

    /// Records what the names in `pattern` stand for when it destructures `value`.
    fn bind_pattern(&mut self, pattern: &BindingPattern, value: Option<Resolved>) {
        match pattern {
            BindingPattern::BindingIdentifier(id) => {
                self.bind(id.name.as_str(), value);
            }
            BindingPattern::ObjectPattern(o) => {
                for p in &o.properties {
                    let child = match (&value, key_name(&p.key)) {
                        (Some(v), Some(k)) => Some(v.child(&k)),
                        _ => None,
                    };
                    self.bind_pattern(&p.value, child);
                }
                if let Some(rest) = &o.rest {
                    self.bind_pattern(&rest.argument, None);
                }
            }
            BindingPattern::ArrayPattern(a) => {
                for p in a.elements.iter().flatten() {
                    self.bind_pattern(p, None);
                }
                if let Some(rest) = &a.rest {
                    self.bind_pattern(&rest.argument, None);
                }
            }
            BindingPattern::AssignmentPattern(a) => {
                let value = value.or_else(|| self.resolve(&a.right));
                self.bind_pattern(&a.left, value);
            }
        }
    }

    fn bind_target(&mut self, target: &AssignmentTarget, value: Option<Resolved>) {
        match target {
            AssignmentTarget::AssignmentTargetIdentifier(id) => {
                self.bind(id.name.as_str(), value);
            }
            AssignmentTarget::ObjectAssignmentTarget(o) => {
                for p in &o.properties {
                    match p {
                        AssignmentTargetProperty::AssignmentTargetPropertyIdentifier(p) => {
                            let name = p.binding.name.as_str();
                            self.bind(name, value.as_ref().map(|v| v.child(name)));
                        }
                        AssignmentTargetProperty::AssignmentTargetPropertyProperty(p) => {
                            let child = match (&value, key_name(&p.name)) {
                                (Some(v), Some(k)) => Some(v.child(&k)),
                                _ => None,
                            };
                            if let Some(t) = maybe_default_target(&p.binding) {
                                self.bind_target(t, child);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fn maybe_default_target<'x, 'a>(
    target: &'x AssignmentTargetMaybeDefault<'a>,
) -> Option<&'x AssignmentTarget<'a>> {
    match target {
        AssignmentTargetMaybeDefault::AssignmentTargetWithDefault(d) => Some(&d.binding),
        other => other.as_assignment_target(),
    }
}

/// The name a property key stands for, when it is known before the code runs.
fn key_name(key: &PropertyKey) -> Option<String> {
    match key {
        PropertyKey::StaticIdentifier(id) => Some(id.name.to_string()),
        PropertyKey::PrivateIdentifier(_) => None,
        other => fold(other.as_expression()?),
    }
}

/// The value of a string expression built only from constants: literals, template literals
/// without substitutions, `+`, `[...].join(sep)`, `'a'.concat('b')`,
/// `String.fromCharCode(99, …)`.
fn fold(e: &Expression) -> Option<String> {
    fold_in(e, 0)
}

/// `fold`, `depth` levels in: past the tree bound nothing folds (a long `'a' + 'a' + …`).
fn fold_in(e: &Expression, depth: usize) -> Option<String> {
    if depth > MAX_TREE_DEPTH {
        return None;
    }
    let fold = |e: &Expression| fold_in(e, depth + 1);
    match e {
        Expression::StringLiteral(s) => Some(s.value.to_string()),
        Expression::TemplateLiteral(t) if t.expressions.is_empty() => t
            .quasis
            .first()
            .and_then(|q| q.value.cooked.as_ref())
            .map(|c| c.to_string()),
        Expression::ParenthesizedExpression(p) => fold(&p.expression),
        Expression::BinaryExpression(b)
            if b.operator == oxc_syntax::operator::BinaryOperator::Addition =>
        {
            Some(fold(&b.left)? + &fold(&b.right)?)
        }
        Expression::CallExpression(c) => {
            let Expression::StaticMemberExpression(m) = &c.callee else {
                return None;
            };
            let args: Option<Vec<&Expression>> =
                c.arguments.iter().map(Argument::as_expression).collect();
            let args = args?;
            match m.property.name.as_str() {
                "join" => {
                    let Expression::ArrayExpression(a) = &m.object else {
                        return None;
                    };
                    let sep = match args.first() {
                        Some(s) => fold(s)?,
                        None => ",".into(),
                    };
                    let parts: Option<Vec<String>> = a
                        .elements
                        .iter()
                        .map(|el| fold(el.as_expression()?))
                        .collect();
                    Some(parts?.join(&sep))
                }
                "concat" => {
                    let mut out = fold(&m.object)?;
                    for a in args {
                        out.push_str(&fold(a)?);
                    }
                    Some(out)
                }
                "fromCharCode" | "fromCodePoint" if matches!(&m.object, Expression::Identifier(i) if i.name == "String") => {
                    args.iter()
                        .map(|a| match a {
                            Expression::NumericLiteral(n) => char::from_u32(n.value as u32),
                            _ => None,
                        })
                        .collect()
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether a decoding call is inside `e` (for the message: code built at run time).
fn decodes(e: &Expression) -> bool {
    struct Finder(bool, usize);
    impl<'a> Visit<'a> for Finder {
        fn visit_expression(&mut self, e: &Expression<'a>) {
            // Past the tree bound the walk refuses the code anyway.
            if self.1 < MAX_TREE_DEPTH && !self.0 {
                self.1 += 1;
                walk::walk_expression(self, e);
                self.1 -= 1;
            }
        }

        fn visit_call_expression(&mut self, c: &CallExpression<'a>) {
            let name = match &c.callee {
                Expression::Identifier(i) => Some(i.name.as_str()),
                Expression::StaticMemberExpression(m) => Some(m.property.name.as_str()),
                _ => None,
            };
            self.0 |= name.is_some_and(|n| DECODERS.contains(&n));
            if !self.0 {
                walk::walk_call_expression(self, c);
            }
        }
    }
    let mut f = Finder(false, 0);
    f.visit_expression(e);
    f.0
}

/// Whether `e` is text: a string, a template, or a concatenation with one.
fn is_text(e: &Expression) -> bool {
    let mut part = e;
    for _ in 0..MAX_TREE_DEPTH {
        match part {
            Expression::StringLiteral(_) | Expression::TemplateLiteral(_) => return true,
            Expression::ParenthesizedExpression(p) => part = &p.expression,
            Expression::BinaryExpression(b)
                if b.operator == oxc_syntax::operator::BinaryOperator::Addition =>
            {
                // `+` groups to the left: the text is the rightmost operand or further left.
                if matches!(
                    b.right,
                    Expression::StringLiteral(_) | Expression::TemplateLiteral(_)
                ) {
                    return true;
                }
                part = &b.left;
            }
            _ => return false,
        }
    }
    false
}

/// The first pass: what names stand for, bounded in depth like the second.
struct Binder<'n> {
    names: &'n mut Names,
    depth: usize,
}

impl<'a> Visit<'a> for Binder<'_> {
    fn visit_statement(&mut self, it: &Statement<'a>) {
        if self.depth > MAX_TREE_DEPTH {
            return;
        }
        self.depth += 1;
        if let Statement::ImportDeclaration(i) = it {
            let source = module(i.source.value.as_str());
            for s in i.specifiers.iter().flatten() {
                let (local, value) = match s {
                    ImportDeclarationSpecifier::ImportSpecifier(s) => {
                        let imported = match &s.imported {
                            ModuleExportName::IdentifierName(n) => n.name.to_string(),
                            ModuleExportName::IdentifierReference(n) => n.name.to_string(),
                            ModuleExportName::StringLiteral(n) => n.value.to_string(),
                        };
                        (&s.local, source.as_ref().map(|m| m.child(&imported)))
                    }
                    ImportDeclarationSpecifier::ImportDefaultSpecifier(s) => {
                        (&s.local, source.clone())
                    }
                    ImportDeclarationSpecifier::ImportNamespaceSpecifier(s) => {
                        (&s.local, source.clone())
                    }
                };
                self.names.bind(local.name.as_str(), value);
            }
        } else {
            walk::walk_statement(self, it);
        }
        self.depth -= 1;
    }

    fn visit_expression(&mut self, it: &Expression<'a>) {
        if self.depth > MAX_TREE_DEPTH {
            return;
        }
        self.depth += 1;
        if let Expression::AssignmentExpression(a) = it {
            let value = self.names.resolve(&a.right);
            self.names.bind_target(&a.left, value);
        }
        walk::walk_expression(self, it);
        self.depth -= 1;
    }

    fn visit_variable_declarator(&mut self, it: &VariableDeclarator<'a>) {
        let value = it.init.as_ref().and_then(|e| self.names.resolve(e));
        self.names.bind_pattern(&it.id, value);
        if let Some(init) = &it.init {
            self.visit_expression(init);
        }
    }

    fn visit_binding_identifier(&mut self, it: &oxc_ast::ast::BindingIdentifier<'a>) {
        let name = it.name.as_str();
        if !self.names.aliases.contains_key(name) {
            self.names.bound.insert(name.to_string());
        }
    }
}

/// The second pass: reports what the code reaches.
struct Checker<'s, 'b, 'p> {
    an: &'b mut Analysis<'p>,
    lines: Lines<'s>,
    names: &'s Names,
    /// Nesting of code in code (an `eval` of a literal is analysed one level deeper).
    depth: usize,
    tree_depth: usize,
    too_deep: bool,
}

impl Checker<'_, '_, '_> {
    fn report(&mut self, families: &[Family], message: &str, span: Span) {
        let lines = &mut self.lines;
        self.an.code(Language::Javascript, families, message, || {
            lines.at(span.start as usize)
        });
    }

    /// A use of a resolved name that is in a family.
    fn reference(&mut self, r: &Resolved, span: Span) {
        let families = r.families();
        if !families.is_empty() {
            let message = format!("{} {}", r.shown(), Family::describe(&families));
            self.report(&families, &message, span);
        }
    }

    /// Enters one level of the syntax tree; false (and a finding, once) past the bound.
    fn enter(&mut self, span: Span) -> bool {
        if self.too_deep {
            return false;
        }
        self.tree_depth += 1;
        if self.tree_depth > MAX_TREE_DEPTH {
            self.too_deep = true;
            let loc = self.lines.at(span.start as usize);
            self.an.finding(
                Rule::InputTooComplex,
                format!("JavaScript nested more than {MAX_TREE_DEPTH} levels deep"),
                loc,
            );
            self.tree_depth -= 1;
            return false;
        }
        true
    }

    /// `require(...)`, `import(...)` and their kin: the module is reported through its name
    /// (by `reference`); here only what the name cannot say.
    fn import(&mut self, what: &str, specifier: Option<&Expression>, span: Span) {
        let Some(arg) = specifier else { return };
        match fold(arg) {
            Some(s) => {
                if let Some(families) = special_module(&s) {
                    let message = describe_module(&s, &families);
                    self.report(&families, &message, span);
                }
            }
            None => {
                let hint = if decodes(arg) {
                    " (decoded at run time)"
                } else {
                    ""
                };
                let message = format!(
                    "{what} of a module whose name is computed{hint}; it could be any module"
                );
                self.report(&Family::ALL, &message, span);
            }
        }
    }

    /// A call or `new`: importers, code runners, timers given strings, `.constructor(...)`,
    /// property readers given a gateway. Then its parts.
    fn call(&mut self, callee: &Expression, args: &[Argument], span: Span) {
        let arg = |i: usize| args.get(i).and_then(Argument::as_expression);
        if let Some(r) = self.names.resolve_call(callee, args) {
            self.reference(&r, span);
        }
        let mut callee_seen = false;
        if let Some(func) = self.names.resolve(callee) {
            let q = func.qname.as_str();
            if is_importer(q) {
                self.import(func.shown(), arg(0), span);
                callee_seen = true;
            } else if CODE_RUNNERS.contains(&q) {
                self.code_runner(func.shown(), args, span);
                callee_seen = true;
            } else if TIMERS.contains(&q) {
                if let Some(first) = arg(0).filter(|a| is_text(a)) {
                    let message = format!("{} of a string of code", func.shown());
                    self.report(&[DynamicCode], &message, span);
                    if let Some(code) = fold(first) {
                        analyse(self.an, &code, self.depth + 1);
                    }
                }
            } else if let Some(base) = [".call", ".apply", ".bind"]
                .iter()
                .find_map(|s| q.strip_suffix(s))
                .filter(|b| is_importer(b) || CODE_RUNNERS.contains(b))
            {
                let shown = base.strip_prefix("globalThis.").unwrap_or(base);
                let message =
                    format!("{shown} called indirectly; what it loads or runs is not seen");
                self.report(&Family::ALL, &message, span);
                callee_seen = true;
            } else if PROPERTY_READERS
                .iter()
                .any(|p| q == *p || q.starts_with(&format!("{p}.")))
            {
                let target = arg(0).and_then(|a| self.names.resolve(a));
                if let Some(t) = target.filter(|t| t.gateway) {
                    let message = format!(
                        "{} reads the properties of {}; it could reach any of them",
                        func.shown(),
                        t.shown()
                    );
                    self.report(&Family::ALL, &message, span);
                }
            }
        }
        if let Some(name) = member_property(callee) {
            if name == "constructor" {
                self.report(
                    &CODE_ANY,
                    "calls a constructor reached through .constructor, which can be Function; \
                     it could run any code",
                    span,
                );
            }
        }
        if callee_seen {
            self.visit_callee_parts(callee);
        } else {
            self.visit_expression(callee);
        }
        for a in args {
            if let Some(e) = a.as_expression() {
                if let Some(r) = self.names.resolve(e).filter(|r| r.gateway) {
                    let message = format!(
                        "{} is passed to a function; what is done with it is not seen",
                        r.shown()
                    );
                    self.report(&Family::ALL, &message, e.span());
                }
            }
            self.visit_argument(a);
        }
    }

    /// `eval(code)`, `Function(args…, body)`, `new Function(…)`.
    fn code_runner(&mut self, name: &str, args: &[Argument], span: Span) {
        let texts: Option<Vec<String>> = args
            .iter()
            .map(|a| a.as_expression().and_then(fold))
            .collect();
        match texts {
            Some(texts) if !texts.is_empty() => {
                self.report(&[DynamicCode], &format!("{name} of a string of code"), span);
                let code = if name == "eval" {
                    texts.join("")
                } else {
                    // As V8 builds it: the parameters' text (defaults are code too), the body.
                    let (body, params) = texts.split_last().expect("not empty");
                    format!(
                        "(function anonymous({}\n) {{\n{body}\n}})",
                        params.join(",")
                    )
                };
                analyse(self.an, &code, self.depth + 1);
            }
            Some(_) => {}
            None => {
                let hint = if args.iter().filter_map(Argument::as_expression).any(decodes) {
                    " (decoded at run time)"
                } else {
                    ""
                };
                let message =
                    format!("{name} of code the analyser cannot see{hint}; it could do anything");
                self.report(&CODE_ANY, &message, span);
            }
        }
    }

    /// A name, a member chain or a computed member.
    fn name(&mut self, e: &Expression) {
        // Every property read along the chain (`obj.constructor.name` reads `constructor`).
        let mut properties = Vec::new();
        let mut part = e;
        while let Some(name) = member_property(part).filter(|_| properties.len() < MAX_TREE_DEPTH) {
            properties.push(name);
            match member_object(part) {
                Some(object) => part = object,
                None => break,
            }
        }
        for (i, name) in properties.iter().enumerate() {
            if PROTO_WALKS.contains(&name.as_str()) {
                let message = format!("reads {name}, which leads to prototypes and Function");
                self.report(&[Reflection], &message, e.span());
                if name == "constructor" && properties.get(i + 1).map(String::as_str) == Some(name)
                {
                    self.report(
                        &CODE_ANY,
                        "reads .constructor.constructor, which is Function; it could run any code",
                        e.span(),
                    );
                }
            }
        }
        if let Some(r) = self.names.resolve(e) {
            self.reference(&r, e.span());
            if is_importer(&r.qname) {
                let message = format!(
                    "{} is used as a value; what it loads is not seen",
                    r.shown()
                );
                self.report(&Family::ALL, &message, e.span());
            }
            if is_pure_name(e) {
                return;
            }
            // Calls inside the chain (`require('fs', code).x`) still have arguments to see.
            self.visit_callee_parts(e);
            return;
        }
        walk::walk_expression(self, e);
    }

    /// The parts of a callee (or a resolved chain) that are not the name itself: the object of
    /// a member, the key of a computed member, all but the last of a sequence.
    fn visit_callee_parts(&mut self, e: &Expression) {
        match e {
            Expression::Identifier(_) => {}
            Expression::StaticMemberExpression(m) => self.visit_callee_object(&m.object),
            Expression::ComputedMemberExpression(m) => {
                self.visit_callee_object(&m.object);
                self.visit_expression(&m.expression);
            }
            Expression::ParenthesizedExpression(p) => self.visit_callee_parts(&p.expression),
            Expression::SequenceExpression(s) => {
                if let Some((last, rest)) = s.expressions.split_last() {
                    for x in rest {
                        self.visit_expression(x);
                    }
                    self.visit_callee_parts(last);
                }
            }
            Expression::AwaitExpression(a) => self.visit_callee_parts(&a.argument),
            Expression::CallExpression(c) => self.visit_call_expression(c),
            _ => self.visit_expression(e),
        }
    }

    /// The object of a callee's member: a name is only the start of the callee's name (already
    /// judged), anything else is visited.
    fn visit_callee_object(&mut self, e: &Expression) {
        if is_pure_name(e) {
            self.visit_callee_parts(e);
        } else {
            self.visit_expression(e);
        }
    }

    /// Destructuring of a resolved value: each property taken is a reference to it.
    fn destructure(&mut self, pattern: &BindingPattern, value: &Resolved) {
        match pattern {
            BindingPattern::ObjectPattern(o) => {
                for p in &o.properties {
                    match key_name(&p.key) {
                        Some(k) => {
                            let child = value.child(&k);
                            self.reference(&child, p.span);
                            self.destructure(&p.value, &child);
                        }
                        None if value.gateway => {
                            let message = format!(
                                "a computed property of {} is destructured; it could be anything on it",
                                value.shown()
                            );
                            self.report(&Family::ALL, &message, p.span);
                        }
                        None => {}
                    }
                }
                if o.rest.is_some() && value.gateway {
                    let message = format!(
                        "every property of {} is copied out; any of them could be used",
                        value.shown()
                    );
                    self.report(&Family::ALL, &message, o.span);
                }
            }
            BindingPattern::AssignmentPattern(a) => self.destructure(&a.left, value),
            _ => {}
        }
    }
}

/// The property a member expression reads, when it is known.
fn member_property(e: &Expression) -> Option<String> {
    match e {
        Expression::StaticMemberExpression(m) => Some(m.property.name.to_string()),
        Expression::ComputedMemberExpression(m) => fold(&m.expression),
        Expression::ParenthesizedExpression(p) => member_property(&p.expression),
        Expression::ChainExpression(c) => match c.expression.as_member_expression()? {
            MemberExpression::StaticMemberExpression(m) => Some(m.property.name.to_string()),
            MemberExpression::ComputedMemberExpression(m) => fold(&m.expression),
            MemberExpression::PrivateFieldExpression(_) => None,
        },
        _ => None,
    }
}

/// The object a member expression reads a property of.
fn member_object<'x, 'a>(e: &'x Expression<'a>) -> Option<&'x Expression<'a>> {
    match e {
        Expression::StaticMemberExpression(m) => Some(&m.object),
        Expression::ComputedMemberExpression(m) => Some(&m.object),
        Expression::ParenthesizedExpression(p) => member_object(&p.expression),
        Expression::ChainExpression(c) => match c.expression.as_member_expression()? {
            MemberExpression::StaticMemberExpression(m) => Some(&m.object),
            MemberExpression::ComputedMemberExpression(m) => Some(&m.object),
            MemberExpression::PrivateFieldExpression(m) => Some(&m.object),
        },
        _ => None,
    }
}

/// Whether `e` is only a name: identifiers, `.x` and `['x']`, nothing that runs.
fn is_pure_name(e: &Expression) -> bool {
    let mut part = e;
    for _ in 0..MAX_TREE_DEPTH {
        match part {
            Expression::Identifier(_) => return true,
            Expression::StaticMemberExpression(m) => part = &m.object,
            Expression::ComputedMemberExpression(m) if fold(&m.expression).is_some() => {
                part = &m.object
            }
            Expression::ParenthesizedExpression(p) => part = &p.expression,
            _ => return false,
        }
    }
    false
}

impl<'a> Visit<'a> for Checker<'_, '_, '_> {
    fn visit_statement(&mut self, it: &Statement<'a>) {
        if !self.enter(it.span()) {
            return;
        }
        match it {
            Statement::ImportDeclaration(i) => {
                self.module_declaration(i.source.value.as_str(), i.span)
            }
            Statement::ExportAllDeclaration(e) => {
                self.module_declaration(e.source.value.as_str(), e.span)
            }
            Statement::ExportFromDeclaration(e) => {
                self.module_declaration(e.source.value.as_str(), e.span)
            }
            Statement::WithStatement(w) => {
                if let Some(r) = self.names.resolve(&w.object).filter(|r| r.gateway) {
                    let message = format!(
                        "with ({}) makes every property of it a bare name",
                        r.shown()
                    );
                    self.report(&Family::ALL, &message, w.span);
                }
            }
            _ => {}
        }
        walk::walk_statement(self, it);
        self.tree_depth -= 1;
    }

    fn visit_expression(&mut self, it: &Expression<'a>) {
        if !self.enter(it.span()) {
            return;
        }
        match it {
            Expression::Identifier(_)
            | Expression::StaticMemberExpression(_)
            | Expression::ComputedMemberExpression(_)
            | Expression::ChainExpression(_) => self.name(it),
            Expression::ImportExpression(i) => {
                if let Some(r) = self.names.resolve(it) {
                    self.reference(&r, i.span);
                }
                self.import("import()", Some(&i.source), i.span);
                walk::walk_expression(self, it);
            }
            Expression::AssignmentExpression(a) => {
                if let (AssignmentTarget::ObjectAssignmentTarget(_), Some(r)) =
                    (&a.left, self.names.resolve(&a.right))
                {
                    if r.gateway || !r.families().is_empty() {
                        // Assignment destructuring is rarer; judged as a whole.
                        self.reference(&r, a.span);
                    }
                }
                walk::walk_expression(self, it);
            }
            _ => walk::walk_expression(self, it),
        }
        self.tree_depth -= 1;
    }

    fn visit_call_expression(&mut self, it: &CallExpression<'a>) {
        self.call(&it.callee, &it.arguments, it.span);
    }

    fn visit_new_expression(&mut self, it: &NewExpression<'a>) {
        self.call(&it.callee, &it.arguments, it.span);
    }

    fn visit_computed_member_expression(&mut self, it: &ComputedMemberExpression<'a>) {
        if fold(&it.expression).is_none() {
            if let Some(base) = self.names.resolve(&it.object).filter(|b| b.gateway) {
                let hint = if decodes(&it.expression) {
                    " (decoded at run time)"
                } else {
                    ""
                };
                let message = format!(
                    "a computed property of {}{hint}; it could reach anything on it",
                    base.shown()
                );
                self.report(&Family::ALL, &message, it.span);
            }
        }
        walk::walk_computed_member_expression(self, it);
    }

    fn visit_variable_declarator(&mut self, it: &VariableDeclarator<'a>) {
        if let Some(value) = it.init.as_ref().and_then(|e| self.names.resolve(e)) {
            self.destructure(&it.id, &value);
        }
        walk::walk_variable_declarator(self, it);
    }

    fn visit_binding_pattern(&mut self, it: &BindingPattern<'a>) {
        if !self.enter(it.span()) {
            return;
        }
        walk::walk_binding_pattern(self, it);
        self.tree_depth -= 1;
    }

    fn visit_tagged_template_expression(&mut self, it: &TaggedTemplateExpression<'a>) {
        // A tag is called with the template's text: Function`code` makes a function of it.
        if let Some(r) = self.names.resolve(&it.tag) {
            if CODE_RUNNERS.contains(&r.qname.as_str()) || is_importer(&r.qname) {
                let message = format!("{} called as a template tag", r.shown());
                self.report(&CODE_ANY, &message, it.span);
            }
        }
        walk::walk_tagged_template_expression(self, it);
    }
}

impl Checker<'_, '_, '_> {
    fn module_declaration(&mut self, specifier: &str, span: Span) {
        if let Some(families) = special_module(specifier) {
            let message = describe_module(specifier, &families);
            self.report(&families, &message, span);
        } else if let Some(name) = module_name(specifier) {
            let families = families_of(&name);
            if !families.is_empty() {
                let message = format!("imports {specifier}, which {}", Family::describe(&families));
                self.report(&families, &message, span);
            }
        }
    }
}
