//! Reading policy sources: a file or a directory's policy files, the price books they include
//! (`models_file:`), the check that included books were read and hold prices only, and the
//! `${NAME}` environment expansion of header values.

use super::error::{PolicyError, PolicyErrors};
use crate::policy::dto::PolicyFile;
use serde_saphyr::{Location, Spanned};
use std::collections::HashSet;
use std::path::Path;

/// The named texts of a policy file, or of every policy file directly inside a directory.
pub fn read_sources(path: &Path) -> Result<Vec<(String, String)>, PolicyErrors> {
    let display = path.display().to_string();
    let source_err = |message: String| {
        PolicyErrors(vec![PolicyError::Source {
            file: display.clone(),
            message,
        }])
    };
    let meta = std::fs::metadata(path).map_err(|e| source_err(format!("cannot read: {e}")))?;
    let mut files = Vec::new();
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| source_err(format!("cannot read: {e}")))?;
        for entry in entries.flatten() {
            let p = entry.path();
            let is_yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if is_yaml && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(source_err(
                "no policy files (*.yaml, *.yml) in this directory".into(),
            ));
        }
    } else {
        files.push(path.to_path_buf());
    }
    let mut sources = Vec::with_capacity(files.len());
    for f in files {
        let name = f.display().to_string();
        match std::fs::read_to_string(&f) {
            Ok(text) => sources.push((name, text)),
            Err(e) => {
                return Err(PolicyErrors(vec![PolicyError::Source {
                    file: name,
                    message: format!("cannot read: {e}"),
                }]));
            }
        }
    }
    // Price books the files include, read once each (a book inside a policy directory is one of
    // its files already).
    let mut errors = Vec::new();
    for i in 0..sources.len() {
        let Some((book, at)) = models_file_of(&sources[i].0, &sources[i].1) else {
            continue;
        };
        let name = book.display().to_string();
        if sources.iter().any(|(n, _)| *n == name) {
            continue;
        }
        match std::fs::read_to_string(&book) {
            Ok(text) => sources.push((name, text)),
            Err(e) => errors.push(PolicyError::At {
                file: sources[i].0.clone(),
                line: at.line() as u32,
                column: at.column() as u32,
                path: "models_file".into(),
                message: format!("cannot read the price book `{name}`: {e}"),
            }),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    Ok(sources)
}

/// The price book policy file `name` includes (`models_file:`), resolved against the file's
/// directory, and where it is named. `None` when there is none or the file does not parse (its
/// parse reports that).
fn models_file_of(name: &str, text: &str) -> Option<(std::path::PathBuf, Location)> {
    #[derive(serde::Deserialize)]
    struct Includes {
        models_file: Option<Spanned<String>>,
    }
    let inc: Includes = serde_saphyr::from_str(text).ok()?;
    let m = inc.models_file?;
    Some((resolve_book(name, &m.value), m.referenced))
}

/// `book` relative to the directory of policy file `name` (absolute paths as they are), with
/// `.` segments dropped so that the same file always gets the same name.
fn resolve_book(name: &str, book: &str) -> std::path::PathBuf {
    let dir = Path::new(name).parent().unwrap_or(Path::new(""));
    dir.join(book).components().collect()
}

/// Every `models_file` names a source that was read as a price book, and a price book holds
/// prices only (operators update it without touching limits).
pub(super) fn check_price_books(parsed: &[(&str, PolicyFile)], errors: &mut Vec<PolicyError>) {
    let mut books = HashSet::new();
    for (name, doc) in parsed {
        let Some(m) = &doc.models_file else { continue };
        let book = resolve_book(name, &m.value).display().to_string();
        if !parsed.iter().any(|(n, _)| *n == book) {
            errors.push(PolicyError::At {
                file: name.to_string(),
                line: m.referenced.line() as u32,
                column: m.referenced.column() as u32,
                path: "models_file".into(),
                message: format!(
                    "the price book `{book}` was not loaded: `models_file` is read only from policy files on disk"
                ),
            });
        }
        books.insert(book);
    }
    for (name, doc) in parsed {
        if !books.contains(*name) {
            continue;
        }
        let other = [
            ("upstreams", doc.upstreams.is_empty()),
            ("routes", doc.routes.is_empty()),
            ("tiers", doc.tiers.is_empty()),
            ("subjects", doc.subjects.is_empty()),
            ("guardrail", doc.guardrail.is_none()),
            ("guest_tier", doc.guest_tier.is_none()),
            ("failure_mode", doc.failure_mode.is_none()),
            ("local_share", doc.local_share.is_none()),
            ("models_file", doc.models_file.is_none()),
        ]
        .into_iter()
        .find(|(_, empty)| !empty);
        if let Some((field, _)) = other {
            errors.push(PolicyError::At {
                file: name.to_string(),
                line: 1,
                column: 1,
                path: field.into(),
                message: "a price book (`models_file`) holds only `models` (and `version`)".into(),
            });
        }
    }
}

/// Why a `${NAME}` was not expanded.
pub(super) enum EnvError {
    /// Not set in this process.
    Missing(String),
    /// `TOLLGATE_*`: the process's own settings and secrets (its API and control-plane tokens),
    /// which a policy must not send to an upstream of its choosing.
    Reserved(String),
}

/// Replace every `${NAME}` with the environment variable NAME.
pub(super) fn expand_env(value: &str) -> Result<String, EnvError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        if name.starts_with("TOLLGATE_") {
            return Err(EnvError::Reserved(name.to_string()));
        }
        out.push_str(&std::env::var(name).map_err(|_| EnvError::Missing(name.to_string()))?);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}
