//! The answer to a check: allowed or not, under which mode, and the findings that say why, each
//! with a stable rule id (documented in docs/POLICY.md; ids are only ever added).

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::policy::{Family, Language, Mode};

/// Every rule a finding can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Rule {
    #[serde(rename = "command.denied")]
    CommandDenied,
    #[serde(rename = "command.not-allowed")]
    CommandNotAllowed,
    #[serde(rename = "command.unresolved")]
    CommandUnresolved,
    #[serde(rename = "shell.dynamic")]
    ShellDynamic,
    #[serde(rename = "shell.unparseable")]
    ShellUnparseable,
    #[serde(rename = "python.process")]
    PythonProcess,
    #[serde(rename = "python.dynamic-code")]
    PythonDynamicCode,
    #[serde(rename = "python.native")]
    PythonNative,
    #[serde(rename = "python.network")]
    PythonNetwork,
    #[serde(rename = "python.reflection")]
    PythonReflection,
    #[serde(rename = "python.unparseable")]
    PythonUnparseable,
    #[serde(rename = "javascript.process")]
    JavascriptProcess,
    #[serde(rename = "javascript.dynamic-code")]
    JavascriptDynamicCode,
    #[serde(rename = "javascript.native")]
    JavascriptNative,
    #[serde(rename = "javascript.network")]
    JavascriptNetwork,
    #[serde(rename = "javascript.reflection")]
    JavascriptReflection,
    #[serde(rename = "javascript.unparseable")]
    JavascriptUnparseable,
    #[serde(rename = "limits.timeout")]
    LimitsTimeout,
    #[serde(rename = "limits.env")]
    LimitsEnv,
    #[serde(rename = "limits.user")]
    LimitsUser,
    #[serde(rename = "limits.stdin")]
    LimitsStdin,
    #[serde(rename = "input.too-large")]
    InputTooLarge,
    #[serde(rename = "input.too-complex")]
    InputTooComplex,
    #[serde(rename = "request.invalid")]
    RequestInvalid,
    #[serde(rename = "analysis.failed")]
    AnalysisFailed,
}

impl Rule {
    pub const ALL: [Rule; 25] = [
        Rule::CommandDenied,
        Rule::CommandNotAllowed,
        Rule::CommandUnresolved,
        Rule::ShellDynamic,
        Rule::ShellUnparseable,
        Rule::PythonProcess,
        Rule::PythonDynamicCode,
        Rule::PythonNative,
        Rule::PythonNetwork,
        Rule::PythonReflection,
        Rule::PythonUnparseable,
        Rule::JavascriptProcess,
        Rule::JavascriptDynamicCode,
        Rule::JavascriptNative,
        Rule::JavascriptNetwork,
        Rule::JavascriptReflection,
        Rule::JavascriptUnparseable,
        Rule::LimitsTimeout,
        Rule::LimitsEnv,
        Rule::LimitsUser,
        Rule::LimitsStdin,
        Rule::InputTooLarge,
        Rule::InputTooComplex,
        Rule::RequestInvalid,
        Rule::AnalysisFailed,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Rule::CommandDenied => "command.denied",
            Rule::CommandNotAllowed => "command.not-allowed",
            Rule::CommandUnresolved => "command.unresolved",
            Rule::ShellDynamic => "shell.dynamic",
            Rule::ShellUnparseable => "shell.unparseable",
            Rule::PythonProcess => "python.process",
            Rule::PythonDynamicCode => "python.dynamic-code",
            Rule::PythonNative => "python.native",
            Rule::PythonNetwork => "python.network",
            Rule::PythonReflection => "python.reflection",
            Rule::PythonUnparseable => "python.unparseable",
            Rule::JavascriptProcess => "javascript.process",
            Rule::JavascriptDynamicCode => "javascript.dynamic-code",
            Rule::JavascriptNative => "javascript.native",
            Rule::JavascriptNetwork => "javascript.network",
            Rule::JavascriptReflection => "javascript.reflection",
            Rule::JavascriptUnparseable => "javascript.unparseable",
            Rule::LimitsTimeout => "limits.timeout",
            Rule::LimitsEnv => "limits.env",
            Rule::LimitsUser => "limits.user",
            Rule::LimitsStdin => "limits.stdin",
            Rule::InputTooLarge => "input.too-large",
            Rule::InputTooComplex => "input.too-complex",
            Rule::RequestInvalid => "request.invalid",
            Rule::AnalysisFailed => "analysis.failed",
        }
    }

    pub(crate) fn for_family(language: Language, family: Family) -> Rule {
        match (language, family) {
            (Language::Python, Family::Process) => Rule::PythonProcess,
            (Language::Python, Family::DynamicCode) => Rule::PythonDynamicCode,
            (Language::Python, Family::Native) => Rule::PythonNative,
            (Language::Python, Family::Network) => Rule::PythonNetwork,
            (Language::Python, Family::Reflection) => Rule::PythonReflection,
            (Language::Javascript, Family::Process) => Rule::JavascriptProcess,
            (Language::Javascript, Family::DynamicCode) => Rule::JavascriptDynamicCode,
            (Language::Javascript, Family::Native) => Rule::JavascriptNative,
            (Language::Javascript, Family::Network) => Rule::JavascriptNetwork,
            (Language::Javascript, Family::Reflection) => Rule::JavascriptReflection,
        }
    }

    pub(crate) fn unparseable(language: Language) -> Rule {
        match language {
            Language::Python => Rule::PythonUnparseable,
            Language::Javascript => Rule::JavascriptUnparseable,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// Where a finding is: 1-based line and column (in characters) of the code it was found in
/// (the Python code, the shell string), or none for findings about the request itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Loc {
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub snippet: String,
}

impl Loc {
    /// A finding about the request, with a snippet of what was asked.
    pub fn request(snippet: &str) -> Loc {
        Loc {
            line: None,
            column: None,
            snippet: clip(snippet, SNIPPET_CHARS),
        }
    }
}

/// The lines of one piece of code, indexed once, so that locating many findings or words in it
/// costs each only its own position: finding line N by scanning from the start made the shell
/// walk quadratic in the words of a long one-line command (every word has a location).
pub(crate) struct Lines<'s> {
    src: &'s str,
    /// Byte offset of the start of each line.
    starts: Vec<usize>,
    /// Each line's snippet, made once: a line is as long as the whole code at worst.
    snippets: HashMap<usize, String>,
}

impl<'s> Lines<'s> {
    pub fn new(src: &'s str) -> Lines<'s> {
        let starts = std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines {
            src,
            starts,
            snippets: HashMap::new(),
        }
    }

    fn snippet(&mut self, index: usize) -> String {
        let (src, starts) = (self.src, &self.starts);
        self.snippets
            .entry(index)
            .or_insert_with(|| {
                let start = starts.get(index).copied().unwrap_or(src.len());
                let end = starts.get(index + 1).map_or(src.len(), |next| next - 1);
                clip(src[start..end].trim_end(), SNIPPET_CHARS)
            })
            .clone()
    }

    /// The position of byte `offset` (clamped into the code), with its line as the snippet.
    pub fn at(&mut self, offset: usize) -> Loc {
        let mut offset = offset.min(self.src.len());
        while !self.src.is_char_boundary(offset) {
            offset -= 1;
        }
        let index = self.starts.partition_point(|s| *s <= offset) - 1;
        let column = self.src[self.starts[index]..offset].chars().count() + 1;
        self.line_col(index + 1, column)
    }

    /// 1-based `line` and `column` as a parser reports them, with that line as the snippet.
    pub fn line_col(&mut self, line: usize, column: usize) -> Loc {
        Loc {
            line: Some(u32::try_from(line).unwrap_or(u32::MAX)),
            column: Some(u32::try_from(column).unwrap_or(u32::MAX)),
            snippet: self.snippet(line.saturating_sub(1)),
        }
    }
}

/// Snippets are for people reading a refusal; long lines are cut.
const SNIPPET_CHARS: usize = 160;

/// `text`, or its first `max_chars - 1` characters and '…'. Reads at most `max_chars`
/// characters, whatever the length of `text`: an exec's 100,000 arguments share one snippet of
/// their joined line, clipped once for each.
pub(crate) fn clip(text: &str, max_chars: usize) -> String {
    if text.char_indices().nth(max_chars).is_none() {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max_chars - 1).collect();
    out.push('…');
    out
}

/// One reason a request is (or, in audit mode, would be) refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Finding {
    pub rule: Rule,
    pub message: String,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub snippet: String,
}

impl Finding {
    pub(crate) fn new(rule: Rule, message: impl Into<String>, loc: Loc) -> Finding {
        Finding {
            rule,
            message: message.into(),
            line: loc.line,
            column: loc.column,
            snippet: loc.snippet,
        }
    }
}

/// The result of checking one request against one policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Whether the request may run: false only in `enforce` mode with findings.
    pub allowed: bool,
    pub mode: Mode,
    /// Why it is refused (in `audit` mode: why it would be). Empty when nothing was found.
    pub findings: Vec<Finding>,
}

impl Decision {
    /// The decision `mode` gives for these findings.
    pub(crate) fn from_findings(mode: Mode, findings: Vec<Finding>) -> Decision {
        Decision {
            allowed: mode != Mode::Enforce || findings.is_empty(),
            mode,
            findings,
        }
    }

    /// Whether the findings name `rule`.
    pub fn has(&self, rule: Rule) -> bool {
        self.findings.iter().any(|f| f.rule == rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_serialize_as_their_stable_names() {
        for rule in Rule::ALL {
            let json = serde_json::to_string(&rule).unwrap();
            assert_eq!(json, format!("\"{}\"", rule.id()));
            assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), rule);
        }
        for (language, name) in [
            (Language::Python, "python"),
            (Language::Javascript, "javascript"),
        ] {
            for family in Family::ALL {
                assert_eq!(
                    Rule::for_family(language, family).id(),
                    format!("{name}.{}", family.as_str())
                );
            }
            assert_eq!(
                Rule::unparseable(language).id(),
                format!("{name}.unparseable")
            );
        }
    }

    #[test]
    fn locations_are_one_based_in_characters() {
        let src = "x = 1\nπ = os.system('id')\n";
        let mut lines = Lines::new(src);
        let loc = lines.at(src.find("os").unwrap());
        assert_eq!((loc.line, loc.column), (Some(2), Some(5)));
        assert_eq!(loc.snippet, "π = os.system('id')");
        assert_eq!(lines.line_col(1, 3).snippet, "x = 1");
        assert_eq!(lines.at(src.len() + 10).line, Some(3));
        assert_eq!(Lines::new("").at(10).line, Some(1));
        let long = format!("{}  \n", "é".repeat(500));
        let snippet = Lines::new(&long).at(700).snippet;
        assert_eq!(snippet.chars().count(), SNIPPET_CHARS);
        assert!(snippet.ends_with('…'));
    }

    #[test]
    fn modes_decide_as_documented() {
        let f = Finding::new(Rule::CommandDenied, "m", Loc::request("curl"));
        assert!(!Decision::from_findings(Mode::Enforce, vec![f.clone()]).allowed);
        assert!(Decision::from_findings(Mode::Audit, vec![f]).allowed);
        assert!(Decision::from_findings(Mode::Enforce, vec![]).allowed);
        let json = serde_json::to_value(Decision::from_findings(Mode::Audit, vec![])).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"allowed": true, "mode": "audit", "findings": []})
        );
    }
}
