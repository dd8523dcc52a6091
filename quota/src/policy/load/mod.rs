//! Loading a policy: read one YAML file or every `*.yaml`/`*.yml` file of a directory, parse each into
//! DTOs, then validate the whole and build the runtime `Policy`. Every error names the file, line,
//! column and field path and says what was expected; all errors found are reported, not just the first.
//!
//! This module owns the pipeline (read, parse, check, build); its parts live in `sources` (reading
//! files and the price books they include), `error` (the error types and how parse errors are
//! rendered) and `build` (validating the parsed DTOs into a `Policy`, one file per section).

mod build;
mod error;
mod sources;

pub use error::{PolicyError, PolicyErrors};
pub use sources::read_sources;

use super::dto::PolicyFile;
use super::{EnvMode, Policy};
use build::Builder;
use error::{bare_message, clean_path};
use serde_saphyr::Location;
use sha2::{Digest, Sha256};
use sources::check_price_books;
use std::path::Path;

/// Load a policy file, or every policy file directly inside a directory (in name order).
pub fn load_path(path: &Path) -> Result<Policy, PolicyErrors> {
    parse_sources(&read_sources(path)?)
}

/// Build a policy from named YAML texts (a file name or any label used in error messages).
pub fn parse_sources(sources: &[(String, String)]) -> Result<Policy, PolicyErrors> {
    parse_layered(sources, sources.len(), EnvMode::Strict)
}

/// Build a policy from named YAML texts where the subjects of `sources[overlay_from..]` take the
/// place of earlier sources' subjects with the same id or API key: the control plane's
/// entitlements over those of a policy file.
pub fn parse_layered(
    sources: &[(String, String)],
    overlay_from: usize,
    env: EnvMode,
) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let mut parsed = Vec::with_capacity(sources.len());
    let mut hasher = Sha256::new();
    for (name, text) in sources {
        hasher.update(text.as_bytes());
        hasher.update([0u8]);
        match parse_file(name, text) {
            Ok(file) => parsed.push((name.as_str(), file)),
            Err(e) => errors.push(e),
        }
    }
    check_price_books(&parsed, &mut errors);
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let hash = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Builder::new(env).build(parsed, hash, overlay_from)
}

fn parse_file(name: &str, text: &str) -> Result<PolicyFile, PolicyError> {
    let mut field_path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, PolicyFile>(de).map_err(|e| {
            field_path = clean_path(&e.path().to_string());
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let loc = e.location().unwrap_or(Location::UNKNOWN);
        PolicyError::At {
            file: name.to_string(),
            line: loc.line() as u32,
            column: loc.column() as u32,
            path: if field_path.is_empty() || field_path == "?" {
                "(document)".into()
            } else {
                field_path
            },
            message: bare_message(&e.without_snippet().to_string()),
        }
    })
}
