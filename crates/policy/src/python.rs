//! Python analysis on Ruff's parser (`ruff_python_parser`, pinned): the parser of the most used
//! Python linter, pure Rust, current grammar (3.14 syntax parses), and it normalises identifiers
//! (NFKC) as CPython does, so `os.ｓｙｓｔｅｍ` is `os.system`. RustPython's parser is no longer
//! maintained and tree-sitter would put C that parses hostile input in our process.
//!
//! Two passes over the module. The first records what local names stand for (`import os as o`,
//! `from os import system as s`, `f = os.system`, walrus) and which names are bound at all.
//! The second resolves every name, attribute chain, subscript and call it can to a qualified
//! name (through `getattr` with folded constant strings, `__import__`/`importlib` with literal
//! names, `sys.modules[...]`, `__builtins__`, `X.__dict__[...]`, `vars(X)[...]`) and reports
//! references — not only calls, so passing `os.system` to `map` or a thread is seen too. What
//! it cannot resolve but could reach anything (a computed module or attribute name, code
//! given to `exec`) is reported under every family. docs/POLICY.md lists what it cannot see.

use std::collections::{HashMap, HashSet};

use ruff_python_ast::visitor::{walk_expr, walk_stmt, Visitor};
use ruff_python_ast::{self as ast, Expr, ExprContext, Stmt};
use ruff_text_size::Ranged;

use crate::check::Analysis;
use crate::command::Stdin;
use crate::decision::{Lines, Loc, Rule};
use crate::policy::{Family, Language};

use Family::{DynamicCode, Native, Network, Process, Reflection};

/// Deeper syntax trees than this are refused (`input.too-complex`) rather than walked.
const MAX_TREE_DEPTH: usize = 200;

/// Qualified names (a trailing `*` matches any suffix of the last part) and the families they
/// belong to. A name matches an entry when it is the entry or inside it (`subprocess.run` is in
/// `subprocess`).
const NAMES: &[(&str, Family)] = &[
    ("subprocess", Process),
    ("_posixsubprocess", Process),
    ("pty", Process),
    ("multiprocessing", Process),
    ("concurrent.futures.ProcessPoolExecutor", Process),
    ("concurrent.futures.process", Process),
    ("asyncio.create_subprocess_exec", Process),
    ("asyncio.create_subprocess_shell", Process),
    ("asyncio.subprocess", Process),
    ("os.system", Process),
    ("os.popen", Process),
    ("os.exec*", Process),
    ("os.spawn*", Process),
    ("os.posix_spawn*", Process),
    ("os.fork*", Process),
    ("os.startfile", Process),
    ("posix.system", Process),
    ("posix.exec*", Process),
    ("posix.posix_spawn*", Process),
    ("posix.fork*", Process),
    ("platform.popen", Process),
    ("webbrowser", Process),
    ("pexpect", Process),
    ("sh", Process),
    ("plumbum", Process),
    ("builtins.eval", DynamicCode),
    ("builtins.exec", DynamicCode),
    ("builtins.compile", DynamicCode),
    ("builtins.breakpoint", DynamicCode),
    ("runpy", DynamicCode),
    ("code", DynamicCode),
    ("codeop", DynamicCode),
    ("pickle.load*", DynamicCode),
    ("pickle.Unpickler", DynamicCode),
    ("_pickle", DynamicCode),
    ("cPickle", DynamicCode),
    ("dill", DynamicCode),
    ("cloudpickle", DynamicCode),
    ("jsonpickle", DynamicCode),
    ("shelve", DynamicCode),
    ("marshal.load*", DynamicCode),
    ("pandas.read_pickle", DynamicCode),
    ("joblib.load", DynamicCode),
    ("yaml.unsafe_load*", DynamicCode),
    ("timeit", DynamicCode),
    ("pdb.run*", DynamicCode),
    ("types.FunctionType", DynamicCode),
    ("types.CodeType", DynamicCode),
    ("logging.config.listen", DynamicCode),
    ("importlib.util.spec_from_file_location", DynamicCode),
    ("importlib.machinery.SourceFileLoader", DynamicCode),
    ("ctypes", Native),
    ("_ctypes", Native),
    ("cffi", Native),
    ("importlib.machinery.ExtensionFileLoader", Native),
    ("socket", Network),
    ("_socket", Network),
    ("ssl", Network),
    ("http.client", Network),
    ("http.server", Network),
    ("urllib.request", Network),
    ("urllib3", Network),
    ("requests", Network),
    ("httpx", Network),
    ("aiohttp", Network),
    ("ftplib", Network),
    ("smtplib", Network),
    ("poplib", Network),
    ("imaplib", Network),
    ("nntplib", Network),
    ("telnetlib", Network),
    ("xmlrpc", Network),
    ("socketserver", Network),
    ("wsgiref.simple_server", Network),
    ("asyncio.open_connection", Network),
    ("asyncio.open_unix_connection", Network),
    ("asyncio.start_server", Network),
    ("asyncio.start_unix_server", Network),
    ("websocket", Network),
    ("websockets", Network),
    ("paramiko", Network),
    ("pycurl", Network),
    ("zmq", Network),
    ("grpc", Network),
    ("sys.modules", Reflection),
    ("sys._getframe", Reflection),
    ("builtins.globals", Reflection),
    ("builtins.locals", Reflection),
    ("builtins.vars", Reflection),
    ("inspect.currentframe", Reflection),
    ("inspect.stack", Reflection),
    ("inspect.getouterframes", Reflection),
    ("gc.get_objects", Reflection),
    ("gc.get_referrers", Reflection),
    ("gc.get_referents", Reflection),
];

/// Attributes that walk from any object to classes, frames, globals and builtins, and from
/// there to everything else.
const DUNDERS: &[&str] = &[
    "__class__",
    "__bases__",
    "__base__",
    "__mro__",
    "__subclasses__",
    "__globals__",
    "__builtins__",
    "__dict__",
    "__code__",
    "__closure__",
    "__getattribute__",
    "__reduce__",
    "__reduce_ex__",
    "__import__",
    "__loader__",
    "__spec__",
    "__self__",
    "__func__",
    "__objclass__",
    "f_globals",
    "f_locals",
    "f_builtins",
    "f_back",
    "f_code",
    "gi_frame",
    "gi_code",
    "cr_frame",
    "ag_frame",
    "tb_frame",
    "tb_next",
    "co_code",
];

/// Calls that load a module by name.
const IMPORTERS: &[&str] = &[
    "builtins.__import__",
    "importlib.import_module",
    "importlib.__import__",
];

/// Calls whose first argument is code.
const CODE_RUNNERS: &[&str] = &[
    "builtins.eval",
    "builtins.exec",
    "builtins.compile",
    "timeit.timeit",
    "timeit.repeat",
    "timeit.Timer",
    "pdb.run",
    "pdb.runeval",
    "code.InteractiveInterpreter.runsource",
];

/// Code that could do anything, with running code as its main family.
const CODE_ANY: [Family; 5] = [DynamicCode, Process, Native, Network, Reflection];

/// Calls that produce text at run time from something unreadable (decoding, decompressing).
const DECODERS: &[&str] = &[
    "b64decode",
    "b32decode",
    "b16decode",
    "b85decode",
    "a85decode",
    "urlsafe_b64decode",
    "decodebytes",
    "decode",
    "fromhex",
    "unhexlify",
    "decompress",
];

fn families_of(qname: &str) -> Vec<Family> {
    let mut out = Vec::new();
    for (pattern, family) in NAMES {
        if matches(pattern, qname) && !out.contains(family) {
            out.push(*family);
        }
    }
    out
}

fn matches(pattern: &str, qname: &str) -> bool {
    match pattern.strip_suffix('*') {
        // `os.exec*` matches `os.execv` (and anything under it), not `os.path`.
        Some(prefix) => qname.starts_with(prefix),
        None => qname
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.')),
    }
}

/// The families of every listed name inside module `module` (for `from module import *`).
fn families_under(module: &str) -> Vec<Family> {
    let mut out = families_of(module);
    for (pattern, family) in NAMES {
        let inside = pattern
            .strip_prefix(module)
            .is_some_and(|rest| rest.starts_with('.'));
        if inside && !out.contains(family) {
            out.push(*family);
        }
    }
    out
}

/// Checks Python source.
pub(crate) fn analyse(an: &mut Analysis, code: &str, depth: usize) {
    if !an.fits(code.len(), code) || !an.within_nesting(depth, &Loc::request(code)) {
        return;
    }
    let parsed = match ruff_python_parser::parse_module(code) {
        Ok(parsed) => parsed,
        Err(e) => {
            an.unparseable(
                Language::Python,
                format!("Python the analyser cannot parse: {}", e.error),
                Lines::new(code).at(e.location.start().to_usize()),
            );
            return;
        }
    };
    let body = &parsed.syntax().body;
    let mut names = Names::default();
    // Twice, so that an alias of an alias defined later in the file resolves too.
    for _ in 0..2 {
        let mut binder = Binder {
            names: &mut names,
            depth: 0,
        };
        binder.visit_body(body);
    }
    let mut checker = Checker {
        an,
        lines: Lines::new(code),
        names: &names,
        depth,
        tree_depth: 0,
        too_deep: false,
    };
    checker.visit_body(body);
}

/// Python code fed to an interpreter on stdin.
pub(crate) fn analyse_stdin(an: &mut Analysis, code: &str, _stdin: Stdin, depth: usize) {
    analyse(an, code, depth);
}

/// `python -m MODULE`: judged as `import MODULE`.
pub(crate) fn analyse_module(an: &mut Analysis, module: &str, loc: &Loc) {
    let valid = !module.is_empty()
        && module
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c == '_' || c.is_alphanumeric()));
    if !valid {
        an.unparseable(
            Language::Python,
            format!("{module:?} is not a module name"),
            loc.clone(),
        );
        return;
    }
    let families = families_of(module);
    if !families.is_empty() {
        an.code(
            Language::Python,
            &families,
            &format!(
                "python -m {module} runs a module that {}",
                Family::describe(&families)
            ),
            || loc.clone(),
        );
    }
}

/// What local names stand for.
#[derive(Default)]
struct Names {
    /// Local name → qualified name (`o` → `os`, `s` → `os.system`).
    aliases: HashMap<String, String>,
    /// Every name bound anywhere (assigned, a parameter, a def): not a builtin.
    bound: HashSet<String>,
}

/// A name resolved to what it refers to.
#[derive(Debug, Clone)]
struct Resolved {
    qname: String,
    /// Families met on the way (`sys.modules[...]`, `__builtins__`, `__dict__` are reflection).
    via: Vec<Family>,
    /// A namespace dictionary (`X.__dict__`, `vars(X)`): `[...]` looks up `X.key`.
    dict: bool,
}

impl Resolved {
    fn families(&self) -> Vec<Family> {
        let mut out = families_of(&self.qname);
        for f in &self.via {
            if !out.contains(f) {
                out.push(*f);
            }
        }
        out
    }

    fn child(&self, attr: &str) -> Resolved {
        Resolved {
            qname: format!("{}.{attr}", self.qname),
            via: self.via.clone(),
            dict: false,
        }
    }
}

impl Names {
    fn resolve(&self, e: &Expr) -> Option<Resolved> {
        let plain = |qname: String| Resolved {
            qname,
            via: Vec::new(),
            dict: false,
        };
        match e {
            Expr::Name(n) => {
                let id = n.id.as_str();
                if let Some(q) = self.aliases.get(id) {
                    Some(plain(q.clone()))
                } else if id == "__builtins__" {
                    Some(Resolved {
                        qname: "builtins".into(),
                        via: vec![Reflection],
                        dict: true,
                    })
                } else if self.bound.contains(id) {
                    None
                } else {
                    Some(plain(format!("builtins.{id}")))
                }
            }
            Expr::Attribute(a) => {
                let base = self.resolve(&a.value)?;
                if a.attr.as_str() == "__dict__" {
                    let mut via = base.via.clone();
                    via.push(Reflection);
                    return Some(Resolved {
                        qname: base.qname,
                        via,
                        dict: true,
                    });
                }
                Some(base.child(a.attr.as_str()))
            }
            Expr::Subscript(s) => {
                let base = self.resolve(&s.value)?;
                let key = fold(&s.slice)?;
                if base.qname == "sys.modules" {
                    let mut via = base.via.clone();
                    via.push(Reflection);
                    Some(Resolved {
                        qname: key,
                        via,
                        dict: false,
                    })
                } else if base.dict {
                    Some(base.child(&key))
                } else {
                    None
                }
            }
            Expr::Call(c) => {
                let func = self.resolve(&c.func)?;
                let first = c.arguments.args.first();
                let q = func.qname.as_str();
                if IMPORTERS.contains(&q) {
                    Some(plain(fold(first?)?))
                } else if q == "builtins.getattr" {
                    let obj = self.resolve(first?)?;
                    let name = fold(c.arguments.args.get(1)?)?;
                    Some(obj.child(&name))
                } else if q == "builtins.vars" {
                    let obj = self.resolve(first?)?;
                    let mut via = obj.via.clone();
                    via.push(Reflection);
                    Some(Resolved {
                        qname: obj.qname,
                        via,
                        dict: true,
                    })
                } else {
                    None
                }
            }
            Expr::Named(n) => self.resolve(&n.value),
            _ => None,
        }
    }
}

/// The value of a string expression built only from constants: literals, `+`, `"".join([...])`.
fn fold(e: &Expr) -> Option<String> {
    match e {
        Expr::StringLiteral(s) => Some(s.value.to_str().to_string()),
        Expr::BinOp(b) if b.op == ast::Operator::Add => Some(fold(&b.left)? + &fold(&b.right)?),
        Expr::Call(c) => {
            let Expr::Attribute(a) = c.func.as_ref() else {
                return None;
            };
            let sep = fold(&a.value)?;
            if a.attr.as_str() != "join" || c.arguments.args.len() != 1 {
                return None;
            }
            let items = match &c.arguments.args[0] {
                Expr::List(l) => &l.elts,
                Expr::Tuple(t) => &t.elts,
                _ => return None,
            };
            let parts: Option<Vec<String>> = items.iter().map(fold).collect();
            Some(parts?.join(&sep))
        }
        _ => None,
    }
}

/// Whether a decoding call is inside `e` (for the message: code built at run time).
fn decodes(e: &Expr) -> bool {
    struct Finder(bool);
    impl<'a> Visitor<'a> for Finder {
        fn visit_expr(&mut self, e: &'a Expr) {
            if let Expr::Call(c) = e {
                if let Expr::Attribute(a) = c.func.as_ref() {
                    self.0 |= DECODERS.contains(&a.attr.as_str());
                }
            }
            if !self.0 {
                walk_expr(self, e);
            }
        }
    }
    let mut f = Finder(false);
    f.visit_expr(e);
    f.0
}

struct Binder<'n> {
    names: &'n mut Names,
    depth: usize,
}

impl<'a> Visitor<'a> for Binder<'_> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        if self.depth > MAX_TREE_DEPTH {
            return;
        }
        self.depth += 1;
        match stmt {
            Stmt::Import(i) => {
                for alias in &i.names {
                    let full = alias.name.as_str();
                    match &alias.asname {
                        Some(local) => {
                            self.names
                                .aliases
                                .insert(local.to_string(), full.to_string());
                        }
                        None => {
                            let top = full.split('.').next().unwrap_or(full);
                            self.names.aliases.insert(top.to_string(), top.to_string());
                        }
                    }
                }
            }
            Stmt::ImportFrom(i) if i.level == 0 => {
                let module = i.module.as_ref().map_or("", |m| m.as_str());
                for alias in &i.names {
                    let name = alias.name.as_str();
                    let local = alias.asname.as_ref().map_or(name, |a| a.as_str());
                    if name != "*" {
                        self.names
                            .aliases
                            .insert(local.to_string(), format!("{module}.{name}"));
                    }
                }
            }
            Stmt::FunctionDef(f) => {
                self.names.bound.insert(f.name.to_string());
            }
            Stmt::ClassDef(c) => {
                self.names.bound.insert(c.name.to_string());
            }
            Stmt::Assign(a) => {
                if let Some(r) = self.names.resolve(&a.value) {
                    for t in &a.targets {
                        if let Expr::Name(n) = t {
                            self.names.aliases.insert(n.id.to_string(), r.qname.clone());
                        }
                    }
                }
            }
            Stmt::AnnAssign(a) => {
                if let (Expr::Name(n), Some(v)) = (a.target.as_ref(), &a.value) {
                    if let Some(r) = self.names.resolve(v) {
                        self.names.aliases.insert(n.id.to_string(), r.qname);
                    }
                }
            }
            _ => {}
        }
        walk_stmt(self, stmt);
        self.depth -= 1;
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        if self.depth > MAX_TREE_DEPTH {
            return;
        }
        self.depth += 1;
        match expr {
            Expr::Name(n)
                if matches!(n.ctx, ExprContext::Store | ExprContext::Del)
                    && !self.names.aliases.contains_key(n.id.as_str()) =>
            {
                self.names.bound.insert(n.id.to_string());
            }
            Expr::Named(n) => {
                if let (Expr::Name(t), Some(r)) = (n.target.as_ref(), self.names.resolve(&n.value))
                {
                    self.names.aliases.insert(t.id.to_string(), r.qname);
                }
            }
            _ => {}
        }
        walk_expr(self, expr);
        self.depth -= 1;
    }

    fn visit_parameter(&mut self, parameter: &'a ast::Parameter) {
        self.names.bound.insert(parameter.name.to_string());
        ruff_python_ast::visitor::walk_parameter(self, parameter);
    }

    fn visit_except_handler(&mut self, handler: &'a ast::ExceptHandler) {
        let ast::ExceptHandler::ExceptHandler(h) = handler;
        if let Some(name) = &h.name {
            self.names.bound.insert(name.to_string());
        }
        ruff_python_ast::visitor::walk_except_handler(self, handler);
    }
}

struct Checker<'s, 'b, 'p> {
    an: &'b mut Analysis<'p>,
    lines: Lines<'s>,
    names: &'s Names,
    /// Nesting of code in code (an `exec` of a literal is analysed one level deeper).
    depth: usize,
    tree_depth: usize,
    too_deep: bool,
}

impl Checker<'_, '_, '_> {
    fn loc(&mut self, node: &impl Ranged) -> Loc {
        self.lines.at(node.start().to_usize())
    }

    fn report(&mut self, families: &[Family], message: &str, node: &impl Ranged) {
        let lines = &mut self.lines;
        self.an.code(Language::Python, families, message, || {
            lines.at(node.start().to_usize())
        });
    }

    /// A use of a resolved name that is in a family.
    fn reference(&mut self, r: &Resolved, node: &impl Ranged) -> bool {
        let families = r.families();
        if families.is_empty() {
            return false;
        }
        let name = r.qname.strip_prefix("builtins.").unwrap_or(&r.qname);
        self.report(
            &families,
            &format!("{name} {}", Family::describe(&families)),
            node,
        );
        true
    }

    /// Special calls: importers and getattr with computed names, code runners, format-string
    /// and attrgetter reflection. True when the callee itself has been reported.
    fn call(&mut self, c: &ast::ExprCall) -> bool {
        let args = &c.arguments.args;
        if let Expr::Attribute(a) = c.func.as_ref() {
            if a.attr.as_str() == "format" {
                if let Some(template) = fold(&a.value) {
                    if template.contains(".__") || template.contains("[__") {
                        self.report(
                            &[Reflection],
                            "a format string that reads dunder attributes",
                            c,
                        );
                    }
                }
            }
        }
        let Some(func) = self.names.resolve(&c.func) else {
            return false;
        };
        let q = func.qname.as_str();
        let hint = |e: &Expr| {
            if decodes(e) {
                " (decoded at run time)"
            } else {
                ""
            }
        };
        if IMPORTERS.contains(&q) {
            if let Some(arg) = args.first() {
                if fold(arg).is_none() {
                    let message = format!(
                        "imports a module whose name is computed{}; it could be any module",
                        hint(arg)
                    );
                    self.report(&Family::ALL, &message, c);
                }
            }
        } else if matches!(
            q,
            "builtins.getattr" | "builtins.setattr" | "builtins.delattr"
        ) {
            if let Some(name) = args.get(1) {
                match fold(name) {
                    Some(n) if DUNDERS.contains(&n.as_str()) => {
                        self.report(&[Reflection], &format!("{q} of {n}"), c);
                    }
                    Some(_) => {}
                    None => {
                        // A module (imported, or builtins itself), not an unknown object whose
                        // name fell back to `builtins.NAME`.
                        let on_module = args
                            .first()
                            .and_then(|o| self.names.resolve(o))
                            .filter(|r| r.qname == "builtins" || !r.qname.starts_with("builtins."));
                        let what = q.trim_start_matches("builtins.");
                        match on_module {
                            Some(m) => self.report(
                                &Family::ALL,
                                &format!(
                                    "{what} on {} with a computed name{}; it could reach any \
                                     function of it",
                                    m.qname.trim_start_matches("builtins."),
                                    hint(name)
                                ),
                                c,
                            ),
                            None => self.report(
                                &[Reflection],
                                &format!("{what} with a computed name{}", hint(name)),
                                c,
                            ),
                        }
                    }
                }
            }
        } else if CODE_RUNNERS.contains(&q) {
            let name = q.trim_start_matches("builtins.");
            match args.first().map(|a| (a, fold(a))) {
                Some((_, Some(code))) => {
                    self.report(&[DynamicCode], &format!("{name} of a string of code"), c);
                    analyse(self.an, &code, self.depth + 1);
                }
                Some((arg, None)) if !matches!(arg, Expr::Lambda(_)) => {
                    let message = format!(
                        "{name} of code the analyser cannot see{}; it could do anything",
                        hint(arg)
                    );
                    self.report(&CODE_ANY, &message, c);
                }
                _ => return false,
            }
            return true;
        } else if matches!(q, "operator.attrgetter" | "operator.methodcaller") {
            for arg in args.iter() {
                match fold(arg) {
                    Some(n) if !n.split('.').any(|p| DUNDERS.contains(&p)) => {}
                    _ => self.report(
                        &[Reflection],
                        &format!("{q} of a dunder or computed name"),
                        c,
                    ),
                }
            }
        }
        false
    }
}

impl<'a> Visitor<'a> for Checker<'_, '_, '_> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        if self.too_deep {
            return;
        }
        self.tree_depth += 1;
        if self.tree_depth > MAX_TREE_DEPTH {
            self.too_deep = true;
            let loc = self.loc(stmt);
            self.an.finding(
                Rule::InputTooComplex,
                format!("Python nested more than {MAX_TREE_DEPTH} levels deep"),
                loc,
            );
            return;
        }
        match stmt {
            Stmt::Import(i) => {
                for alias in &i.names {
                    let families = families_of(alias.name.as_str());
                    if !families.is_empty() {
                        let msg = format!(
                            "imports {}, which {}",
                            alias.name,
                            Family::describe(&families)
                        );
                        self.report(&families, &msg, alias);
                    }
                }
            }
            Stmt::ImportFrom(i) if i.level == 0 => {
                let module = i.module.as_ref().map_or("", |m| m.as_str());
                for alias in &i.names {
                    let (families, what) = if alias.name.as_str() == "*" {
                        (families_under(module), format!("everything from {module}"))
                    } else {
                        let q = format!("{module}.{}", alias.name);
                        (families_of(&q), q)
                    };
                    if !families.is_empty() {
                        let msg = format!("imports {what}, which {}", Family::describe(&families));
                        self.report(&families, &msg, alias);
                    }
                }
            }
            _ => {}
        }
        walk_stmt(self, stmt);
        self.tree_depth -= 1;
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        if self.too_deep {
            return;
        }
        self.tree_depth += 1;
        if self.tree_depth > MAX_TREE_DEPTH {
            self.too_deep = true;
            let loc = self.loc(expr);
            self.an.finding(
                Rule::InputTooComplex,
                format!("Python nested more than {MAX_TREE_DEPTH} levels deep"),
                loc,
            );
            return;
        }
        if let Expr::Attribute(a) = expr {
            if DUNDERS.contains(&a.attr.as_str()) {
                self.report(
                    &[Reflection],
                    &format!("reads the attribute {}", a.attr),
                    expr,
                );
            }
        }
        let reported = match expr {
            Expr::Name(n) if n.ctx != ExprContext::Load => false,
            Expr::Name(_) | Expr::Attribute(_) | Expr::Subscript(_) | Expr::Call(_) => {
                match self.names.resolve(expr) {
                    Some(r) => self.reference(&r, expr),
                    None => false,
                }
            }
            _ => false,
        };
        match expr {
            Expr::Call(c) => {
                let callee_reported = self.call(c);
                if !reported && !callee_reported {
                    self.visit_expr(&c.func);
                }
                for arg in c.arguments.args.iter() {
                    self.visit_expr(arg);
                }
                for k in c.arguments.keywords.iter() {
                    self.visit_expr(&k.value);
                }
            }
            Expr::Subscript(s) if reported => self.visit_expr(&s.slice),
            _ if reported => {}
            _ => walk_expr(self, expr),
        }
        self.tree_depth -= 1;
    }
}
