//! The policy error types (`PolicyError`, `PolicyErrors`) and the rendering of the YAML library's
//! parse errors into our `file:line:column: field: message` form.

use std::fmt;

/// One problem in a policy source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The source as a whole: unreadable, or a directory without policy files.
    #[error("{file}: {message}")]
    Source { file: String, message: String },
    /// A spot in a file.
    #[error("{file}:{line}:{column}: {path}: {message}")]
    At {
        file: String,
        line: u32,
        column: u32,
        path: String,
        message: String,
    },
}

/// Every problem found in a policy; a policy with any of them is not enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// `Spanned` values show up as an inner `value` field in serde paths; users never wrote it.
pub(super) fn clean_path(path: &str) -> String {
    path.replace(".value", "")
        .replace(".referenced", "")
        .replace(".defined", "")
}

/// The YAML library prefixes messages with `error: line N column M: `; we print the location
/// ourselves, in `file:line:column` form.
pub(super) fn bare_message(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or(rendered);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first.find(" column ") {
        Some(i) if first.starts_with("line ") => first[i + 8..]
            .split_once(": ")
            .map_or(first, |(_, rest)| rest),
        _ => first,
    }
    .split(" at line ")
    .next()
    .unwrap_or_default()
    .to_string()
}
