//! The answer to a check: allowed or not, under which mode, and the findings that say why, each
//! with a stable rule id (documented in docs/POLICY.md; ids are only ever added).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::policy::{Family, Mode};

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
    pub const ALL: [Rule; 19] = [
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

    pub(crate) fn for_family(family: Family) -> Rule {
        match family {
            Family::Process => Rule::PythonProcess,
            Family::DynamicCode => Rule::PythonDynamicCode,
            Family::Native => Rule::PythonNative,
            Family::Network => Rule::PythonNetwork,
            Family::Reflection => Rule::PythonReflection,
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
    /// The position of byte `offset` in `source`, with that line (clipped) as the snippet.
    pub fn at(source: &str, offset: usize) -> Loc {
        let offset = offset.min(source.len());
        let offset = (0..=offset)
            .rev()
            .find(|i| source.is_char_boundary(*i))
            .unwrap_or(0);
        let line_start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[offset..]
            .find('\n')
            .map_or(source.len(), |i| offset + i);
        let line = source[..line_start].matches('\n').count() + 1;
        let column = source[line_start..offset].chars().count() + 1;
        Loc {
            line: Some(u32::try_from(line).unwrap_or(u32::MAX)),
            column: Some(u32::try_from(column).unwrap_or(u32::MAX)),
            snippet: clip(source[line_start..line_end].trim_end(), SNIPPET_CHARS),
        }
    }

    /// 1-based `line` and `column` as a parser reports them, with that line as the snippet.
    pub fn line_col(source: &str, line: usize, column: usize) -> Loc {
        let text = source.lines().nth(line.saturating_sub(1)).unwrap_or("");
        Loc {
            line: Some(u32::try_from(line).unwrap_or(u32::MAX)),
            column: Some(u32::try_from(column).unwrap_or(u32::MAX)),
            snippet: clip(text.trim_end(), SNIPPET_CHARS),
        }
    }

    /// A finding about the request, with a snippet of what was asked.
    pub fn request(snippet: &str) -> Loc {
        Loc {
            line: None,
            column: None,
            snippet: clip(snippet, SNIPPET_CHARS),
        }
    }
}

/// Snippets are for people reading a refusal; long lines are cut.
const SNIPPET_CHARS: usize = 160;

pub(crate) fn clip(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
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
        for family in Family::ALL {
            assert_eq!(
                Rule::for_family(family).id(),
                format!("python.{}", family.as_str())
            );
        }
    }

    #[test]
    fn locations_are_one_based_in_characters() {
        let src = "x = 1\nπ = os.system('id')\n";
        let loc = Loc::at(src, src.find("os").unwrap());
        assert_eq!((loc.line, loc.column), (Some(2), Some(5)));
        assert_eq!(loc.snippet, "π = os.system('id')");
        assert_eq!(Loc::at("", 10).line, Some(1));
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
