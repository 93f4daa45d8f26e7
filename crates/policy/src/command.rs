//! What program a command really runs.

use crate::check::Analysis;
use crate::decision::Loc;

/// One word of a command: its value when it is known before the command runs.
pub(crate) struct Arg {
    pub value: Option<String>,
    pub loc: Loc,
}

impl Arg {
    pub fn literal(value: &str, snippet: &str) -> Arg {
        Arg {
            value: Some(value.to_string()),
            loc: Loc::request(snippet),
        }
    }
}

pub(crate) fn resolve(an: &mut Analysis, args: &[Arg]) {
    if let Some(Arg {
        value: Some(name),
        loc,
    }) = args.first()
    {
        an.program(name, loc);
    }
}
