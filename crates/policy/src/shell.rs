//! Shell strings (`command`, `sh -c`, here-documents to `sh`, `$(…)`) parsed with a real shell
//! grammar, brush-parser: a maintained pure-Rust POSIX and bash parser (the parser of the brush
//! shell, tested against bash), so there is no C in the daemon's process and every construct
//! (pipelines, `&&`, `;`, subshells, functions, control flow, substitutions, here-documents) is
//! walked. Every simple command goes to `command::resolve`; a word whose value is only known
//! when it runs is a finding where it names a program. A string the parser rejects is refused.

use brush_parser::ast::{
    self, Command, CommandPrefixOrSuffixItem, CompoundCommand, CompoundList, IoFileRedirectTarget,
    IoRedirect, Pipeline,
};
use brush_parser::word::{WordPiece, WordPieceWithSource};
use brush_parser::ParserOptions;

use crate::check::Analysis;
use crate::command::{self, Arg, Stdin};
use crate::decision::{Lines, Loc, Rule};

/// brush-parser backtracks on `(` it cannot close: its time doubles with each one (22 take
/// 0.3 s, 26 take 5 s on the development machine; found by tests/mutations.rs). A string with
/// more than this many is refused unparsed (`input.too-complex`); the parser takes about a
/// millisecond for this many.
const MAX_UNCLOSED_PARENS: usize = 12;

/// `(` left open at the end of `code`, outside single quotes and backslash escapes. Parentheses
/// in double quotes and here-documents count too: over-counting can only refuse (a string
/// with a dozen unbalanced `(` in its text), never let through what the parser would choke on.
fn unclosed_parens(code: &str) -> usize {
    let (mut depth, mut chars) = (0usize, code.chars());
    let mut single = false;
    while let Some(c) = chars.next() {
        match c {
            '\'' => single = !single,
            '\\' if !single => {
                chars.next();
            }
            '(' if !single => depth += 1,
            ')' if !single => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    depth
}

/// Checks every command in the shell string `code`.
pub(crate) fn analyse(an: &mut Analysis, code: &str, stdin: Stdin, depth: usize) {
    if !an.fits(code.len(), code) || !an.within_nesting(depth, &Loc::request(code)) {
        return;
    }
    let open = unclosed_parens(code);
    if open > MAX_UNCLOSED_PARENS {
        an.finding(
            Rule::InputTooComplex,
            format!(
                "{open} unclosed `(`: more than {MAX_UNCLOSED_PARENS} make the shell parser's \
                 work grow exponentially, so the string is not parsed"
            ),
            Loc::request(code),
        );
        return;
    }
    let options = ParserOptions::default();
    let mut parser = brush_parser::Parser::new(code.as_bytes(), &options);
    match parser.parse_program() {
        Ok(program) => {
            let mut walker = Walker {
                an,
                lines: Lines::new(code),
                options,
                depth,
            };
            for list in &program.complete_commands {
                walker.list(list, &stdin);
            }
        }
        Err(e) => {
            let loc = match &e {
                brush_parser::ParseError::ParsingNear(p) => {
                    Lines::new(code).line_col(p.line, p.column)
                }
                brush_parser::ParseError::Tokenizing {
                    position: Some(p), ..
                } => Lines::new(code).line_col(p.line, p.column),
                _ => Loc::request(code),
            };
            an.finding(
                Rule::ShellUnparseable,
                format!("the shell parser cannot read this: {e}"),
                loc,
            );
        }
    }
}

struct Walker<'a, 'b, 'p> {
    an: &'b mut Analysis<'p>,
    lines: Lines<'a>,
    options: ParserOptions,
    depth: usize,
}

impl Walker<'_, '_, '_> {
    fn list(&mut self, list: &CompoundList, stdin: &Stdin) {
        for item in &list.0 {
            self.pipeline(&item.0.first, stdin);
            for next in &item.0.additional {
                let (ast::AndOr::And(p) | ast::AndOr::Or(p)) = next;
                self.pipeline(p, stdin);
            }
        }
    }

    fn pipeline(&mut self, pipeline: &Pipeline, stdin: &Stdin) {
        for (i, cmd) in pipeline.seq.iter().enumerate() {
            if i == 0 {
                self.command(cmd, stdin);
            } else {
                self.command(cmd, &Stdin::Unknown("a pipe".into()));
            }
        }
    }

    fn command(&mut self, cmd: &Command, stdin: &Stdin) {
        match cmd {
            Command::Simple(simple) => self.simple(simple, stdin),
            Command::Compound(compound, redirects) => {
                self.compound(compound, stdin);
                for r in redirects.iter().flat_map(|r| &r.0) {
                    self.redirect(r);
                }
            }
            Command::Function(f) => {
                self.compound(&f.body.0, &Stdin::Empty);
                for r in f.body.1.iter().flat_map(|r| &r.0) {
                    self.redirect(r);
                }
            }
            Command::ExtendedTest(test, redirects) => {
                self.test_expr(&test.expr);
                for r in redirects.iter().flat_map(|r| &r.0) {
                    self.redirect(r);
                }
            }
        }
    }

    fn test_expr(&mut self, expr: &ast::ExtendedTestExpr) {
        use ast::ExtendedTestExpr as E;
        match expr {
            E::And(a, b) | E::Or(a, b) => {
                self.test_expr(a);
                self.test_expr(b);
            }
            E::Not(a) | E::Parenthesized(a) => self.test_expr(a),
            E::UnaryTest(_, w) => {
                self.arg(w);
            }
            E::BinaryTest(_, a, b) => {
                self.arg(a);
                self.arg(b);
            }
        }
    }

    fn compound(&mut self, compound: &CompoundCommand, stdin: &Stdin) {
        match compound {
            CompoundCommand::Arithmetic(a) => self.arithmetic(&a.expr.value),
            CompoundCommand::ArithmeticForClause(f) => {
                for e in [&f.initializer, &f.condition, &f.updater]
                    .into_iter()
                    .flatten()
                {
                    self.arithmetic(&e.value);
                }
                self.list(&f.body.list, stdin);
            }
            CompoundCommand::BraceGroup(b) => self.list(&b.list, stdin),
            CompoundCommand::Subshell(s) => self.list(&s.list, stdin),
            CompoundCommand::ForClause(f) => {
                for w in f.values.iter().flatten() {
                    self.arg(w);
                }
                self.list(&f.body.list, stdin);
            }
            CompoundCommand::CaseClause(c) => {
                self.arg(&c.value);
                for item in &c.cases {
                    for w in &item.patterns {
                        self.arg(w);
                    }
                    if let Some(list) = &item.cmd {
                        self.list(list, stdin);
                    }
                }
            }
            CompoundCommand::IfClause(i) => {
                self.list(&i.condition, stdin);
                self.list(&i.then, stdin);
                for e in i.elses.iter().flatten() {
                    if let Some(c) = &e.condition {
                        self.list(c, stdin);
                    }
                    self.list(&e.body, stdin);
                }
            }
            CompoundCommand::WhileClause(w) | CompoundCommand::UntilClause(w) => {
                self.list(&w.0, stdin);
                self.list(&w.1.list, stdin);
            }
            CompoundCommand::Coprocess(c) => self.command(&c.body, stdin),
        }
    }

    fn simple(&mut self, simple: &ast::SimpleCommand, stdin: &Stdin) {
        let mut assignments = Vec::new();
        let mut args = Vec::new();
        let mut own_stdin = None;
        let items = simple
            .prefix
            .iter()
            .flat_map(|p| p.0.iter())
            .map(Some)
            .chain(std::iter::once(None))
            .chain(simple.suffix.iter().flat_map(|s| s.0.iter()).map(Some));
        for item in items {
            let Some(item) = item else {
                if let Some(w) = &simple.word_or_name {
                    args.push(self.arg(w));
                }
                continue;
            };
            match item {
                CommandPrefixOrSuffixItem::Word(w) => args.push(self.arg(w)),
                CommandPrefixOrSuffixItem::AssignmentWord(a, w) => {
                    match &a.value {
                        ast::AssignmentValue::Scalar(v) => {
                            self.arg(v);
                        }
                        ast::AssignmentValue::Array(items) => {
                            for (k, v) in items {
                                if let Some(k) = k {
                                    self.arg(k);
                                }
                                self.arg(v);
                            }
                        }
                    }
                    if let ast::AssignmentName::VariableName(name) = &a.name {
                        assignments.push((name.clone(), self.loc(w)));
                    }
                }
                CommandPrefixOrSuffixItem::IoRedirect(r) => {
                    if let Some(s) = self.redirect(r) {
                        own_stdin = Some(s);
                    }
                }
                CommandPrefixOrSuffixItem::ProcessSubstitution(_, sub) => {
                    self.nested_list(&sub.list);
                    args.push(Arg {
                        value: None,
                        raw: "<(…)".into(),
                        quoted: false,
                        loc: Loc::request("<(…)"),
                    });
                }
            }
        }
        if args.is_empty() {
            // Only assignments: shell variables, not a program's environment.
            return;
        }
        for (name, loc) in &assignments {
            self.an.env_name(name, loc);
            self.an.path_change(name, loc);
        }
        let stdin = own_stdin.unwrap_or_else(|| stdin.clone());
        command::resolve(self.an, &args, stdin, self.depth);
    }

    /// Scans a redirection for substitutions; returns the stdin it gives the command when it is
    /// an input redirection (a here-document or here-string is code for an interpreter).
    fn redirect(&mut self, r: &IoRedirect) -> Option<Stdin> {
        match r {
            IoRedirect::File(_, kind, target) => {
                match target {
                    IoFileRedirectTarget::Filename(w) | IoFileRedirectTarget::Duplicate(w) => {
                        self.arg(w);
                    }
                    IoFileRedirectTarget::ProcessSubstitution(_, sub) => {
                        self.nested_list(&sub.list)
                    }
                    IoFileRedirectTarget::Fd(_) => {}
                }
                matches!(kind, ast::IoFileRedirectKind::Read)
                    .then(|| Stdin::Unknown("a file".into()))
            }
            IoRedirect::HereDocument(_, doc) => {
                if doc.requires_expansion {
                    let arg = self.heredoc(&doc.doc);
                    Some(match arg {
                        Some(text) => Stdin::Known(text),
                        None => Stdin::Unknown("an expanding here-document".into()),
                    })
                } else {
                    Some(Stdin::Known(doc.doc.value.clone()))
                }
            }
            IoRedirect::HereString(_, w) => {
                let arg = self.arg(w);
                Some(match arg.value {
                    Some(mut text) => {
                        text.push('\n');
                        Stdin::Known(text)
                    }
                    None => Stdin::Unknown("an expanding here-string".into()),
                })
            }
            IoRedirect::OutputAndError(w, _) => {
                self.arg(w);
                None
            }
        }
    }

    /// An unquoted here-document: its substitutions run, so they are checked; its text is known
    /// only when it has no expansions.
    fn heredoc(&mut self, doc: &ast::Word) -> Option<String> {
        let loc = self.loc(doc);
        match brush_parser::word::parse_heredoc(&doc.value, &self.options) {
            Ok(pieces) => {
                let mut value = Some(String::new());
                let mut quoted = false;
                self.pieces(&pieces, &mut value, &mut quoted, true);
                value
            }
            Err(e) => {
                self.an.finding(
                    Rule::ShellUnparseable,
                    format!("the shell parser cannot read this here-document: {e}"),
                    loc,
                );
                None
            }
        }
    }

    fn loc(&mut self, w: &ast::Word) -> Loc {
        match &w.loc {
            Some(span) => self.lines.line_col(span.start.line, span.start.column),
            None => Loc::request(&w.value),
        }
    }

    /// A word's value after quote removal, when it is known before the command runs; checks
    /// the commands in its substitutions.
    fn arg(&mut self, w: &ast::Word) -> Arg {
        let loc = self.loc(w);
        let mut value = Some(String::new());
        let mut quoted = false;
        match brush_parser::word::parse(&w.value, &self.options) {
            Ok(pieces) => self.pieces(&pieces, &mut value, &mut quoted, false),
            Err(e) => {
                self.an.finding(
                    Rule::ShellUnparseable,
                    format!("the shell parser cannot read the word `{}`: {e}", w.value),
                    loc.clone(),
                );
                value = None;
            }
        }
        Arg {
            value,
            raw: w.value.clone(),
            quoted,
            loc,
        }
    }

    fn pieces(
        &mut self,
        pieces: &[WordPieceWithSource],
        value: &mut Option<String>,
        quoted: &mut bool,
        in_quotes: bool,
    ) {
        for p in pieces {
            match &p.piece {
                WordPiece::Text(s) => {
                    // Unquoted, these expand (globs, braces) to names only known when it runs.
                    if !in_quotes && s.contains(['*', '?', '[', '{']) {
                        *value = None;
                    }
                    push(value, s);
                }
                WordPiece::SingleQuotedText(s) => {
                    *quoted = true;
                    push(value, s);
                }
                WordPiece::AnsiCQuotedText(s) => {
                    *quoted = true;
                    if s.contains('\\') {
                        *value = None;
                    }
                    push(value, s);
                }
                WordPiece::DoubleQuotedSequence(inner)
                | WordPiece::GettextDoubleQuotedSequence(inner) => {
                    *quoted = true;
                    self.pieces(inner, value, quoted, true);
                }
                WordPiece::EscapeSequence(s) => {
                    *quoted = true;
                    push(value, s.strip_prefix('\\').unwrap_or(s));
                }
                WordPiece::TildeExpansion(_) | WordPiece::ParameterExpansion(_) => *value = None,
                WordPiece::CommandSubstitution(code)
                | WordPiece::BackquotedCommandSubstitution(code) => {
                    *value = None;
                    analyse(self.an, code, Stdin::Empty, self.depth + 1);
                }
                WordPiece::ArithmeticExpression(e) => {
                    *value = None;
                    self.arithmetic(&e.value);
                }
            }
        }
    }

    /// Arithmetic can hold command substitutions (`$(( $(wc -l <f) + 1 ))`); they are checked.
    fn arithmetic(&mut self, text: &str) {
        if let Ok(pieces) = brush_parser::word::parse(text, &self.options) {
            let mut value = Some(String::new());
            let mut quoted = false;
            self.pieces(&pieces, &mut value, &mut quoted, true);
        } else if text.contains("$(") || text.contains('`') {
            self.an.finding(
                Rule::ShellUnparseable,
                format!("the shell parser cannot read the arithmetic `{text}`"),
                Loc::request(text),
            );
        }
    }

    fn nested_list(&mut self, list: &CompoundList) {
        self.depth += 1;
        if self.an.within_nesting(self.depth, &Loc::request("(…)")) {
            self.list(list, &Stdin::Empty);
        }
        self.depth -= 1;
    }
}

fn push(value: &mut Option<String>, s: &str) {
    if let Some(v) = value {
        v.push_str(s);
    }
}
