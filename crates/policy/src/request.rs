//! What a policy is checked against: the parts of an exec request (or of a background process
//! or shell start) that say what will run, plus the two code-only forms of the dry run and of
//! `tests` examples (`{"python": CODE}`, `{"shell": CODE}`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One request to check. Exactly one of `argv`, `command`, `python` and `shell` says what runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// A program and its arguments, as an exec's `argv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A shell command line, as an exec's `command` (run as `/bin/sh -c COMMAND`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Python source, as a script would hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// A shell script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// The environment the request sets (only the names are checked).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Accepted so an exec body can be checked as it is; no rule reads it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Standard input: when the program is an interpreter reading its code from stdin, this is
    /// the code, and it is analysed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

impl CheckRequest {
    /// Exactly one of the four forms, and a non-empty argv.
    pub fn validate(&self) -> Result<(), String> {
        let given = [
            self.argv.is_some(),
            self.command.is_some(),
            self.python.is_some(),
            self.shell.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(format!(
                "give exactly one of argv, command, python and shell (got {given})"
            ));
        }
        if let Some(argv) = &self.argv {
            if argv.first().is_none_or(|a| a.is_empty()) {
                return Err("argv must start with a program name".into());
            }
        }
        Ok(())
    }

    /// A short human form for messages about examples.
    pub fn summary(&self) -> String {
        let text = if let Some(argv) = &self.argv {
            format!("argv {argv:?}")
        } else if let Some(c) = &self.command {
            format!("command {c:?}")
        } else if let Some(p) = &self.python {
            format!("python {p:?}")
        } else if let Some(s) = &self.shell {
            format!("shell {s:?}")
        } else {
            "empty request".to_string()
        };
        crate::decision::clip(&text, 120)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_form_is_required() {
        let none = CheckRequest::default();
        assert!(none.validate().unwrap_err().contains("got 0"));
        let two = CheckRequest {
            argv: Some(vec!["ls".into()]),
            python: Some("1".into()),
            ..Default::default()
        };
        assert!(two.validate().unwrap_err().contains("got 2"));
        let empty = CheckRequest {
            argv: Some(vec![]),
            ..Default::default()
        };
        assert!(empty.validate().unwrap_err().contains("program name"));
        let ok: CheckRequest = serde_json::from_str(r#"{"command": "ls"}"#).unwrap();
        ok.validate().unwrap();
        assert!(serde_json::from_str::<CheckRequest>(r#"{"cmd": "ls"}"#).is_err());
    }
}
