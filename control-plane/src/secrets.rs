//! Plain-text API keys in an uploaded policy document: each subject's `key: VALUE` becomes
//! `key_sha256: [HEX]` before the document is stored, so the stored and served documents (and
//! every gateway's snapshot file) never hold a key. The rewrite is textual and in place: comments,
//! layout and line numbers stay as the author wrote them; the result is parsed again to prove
//! that no key is left.

use serde::Deserialize;
use serde_saphyr::Spanned;

/// Only what the rewrite needs; every other field is ignored here (the policy loader checks it).
#[derive(Deserialize)]
struct Doc {
    #[serde(default)]
    subjects: Option<Vec<Subj>>,
}

#[derive(Deserialize)]
struct Subj {
    key: Option<Spanned<String>>,
    #[serde(default)]
    key_sha256: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    /// The document does not parse as YAML with a `subjects` list; its keys cannot be found.
    #[error("the document could not be read to hash its API keys")]
    Unparsable,
    #[error(
        "subjects[{0}]: give `key` or `key_sha256`, not both (the control plane stores a `key` as its hash)"
    )]
    Both(usize),
    #[error(
        "subjects[{0}]: this `key` could not be replaced by its hash in place; give `key_sha256` (the key's SHA-256, hex) instead"
    )]
    Unrewritable(usize),
}

/// The document with every subject's `key` replaced by `key_sha256`; `None` when it has none.
pub fn hash_plain_keys(yaml: &str) -> Result<Option<String>, RewriteError> {
    let doc: Doc = serde_saphyr::from_str(yaml).map_err(|_| RewriteError::Unparsable)?;
    let subjects = doc.subjects.unwrap_or_default();
    let mut edits = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        let Some(key) = &s.key else { continue };
        if !s.key_sha256.is_empty() {
            return Err(RewriteError::Both(i));
        }
        let span = key.referenced.span();
        let (Some(off), Some(len)) = (span.byte_offset(), span.byte_len()) else {
            return Err(RewriteError::Unrewritable(i));
        };
        let (off, len) = (off as usize, len as usize);
        let edit = locate(yaml, off, len).ok_or(RewriteError::Unrewritable(i))?;
        edits.push((i, edit, quota::policy::key_sha256_hex(&key.value)));
    }
    if edits.is_empty() {
        return Ok(None);
    }
    // Back to front, so earlier offsets stay valid.
    edits.sort_by_key(|(_, e, _)| std::cmp::Reverse(e.name.0));
    let mut out = yaml.to_string();
    for (_, e, hash) in &edits {
        out.replace_range(e.value.0..e.value.1, &format!("[{hash}]"));
        out.replace_range(e.name.0..e.name.1, "key_sha256");
    }
    // Proof: every key is gone and each subject carries its hash.
    let again: Doc = serde_saphyr::from_str(&out).map_err(|_| RewriteError::Unparsable)?;
    let again = again.subjects.unwrap_or_default();
    for (i, _, hash) in &edits {
        match again.get(*i) {
            Some(s) if s.key.is_none() && s.key_sha256 == [hash.clone()] => {}
            _ => return Err(RewriteError::Unrewritable(*i)),
        }
    }
    if again.iter().any(|s| s.key.is_some()) {
        return Err(RewriteError::Unrewritable(0));
    }
    Ok(Some(out))
}

/// Byte ranges of the field name `key` and of its value.
struct Edit {
    name: (usize, usize),
    value: (usize, usize),
}

/// Find the `key:` in front of the value at `off..off + len` (quotes included when the span
/// leaves them out).
fn locate(text: &str, off: usize, len: usize) -> Option<Edit> {
    let b = text.as_bytes();
    let (mut start, mut end) = (off, off.checked_add(len)?);
    if end > b.len() || !text.is_char_boundary(start) || !text.is_char_boundary(end) {
        return None;
    }
    if start > 0 && end < b.len() && matches!(b[start - 1], b'"' | b'\'') && b[end] == b[start - 1]
    {
        start -= 1;
        end += 1;
    }
    // Backwards: blanks, the colon, blanks, the name.
    let mut i = start;
    while i > 0 && matches!(b[i - 1], b' ' | b'\t') {
        i -= 1;
    }
    if i == 0 || b[i - 1] != b':' {
        return None;
    }
    i -= 1;
    while i > 0 && matches!(b[i - 1], b' ' | b'\t') {
        i -= 1;
    }
    let before = &text[..i];
    let name_start = ["key", "\"key\"", "'key'"]
        .iter()
        .find(|n| before.ends_with(*n))
        .map(|n| i - n.len())?;
    // `api_key:` or `monkey:` is not the field.
    if name_start > 0 && !matches!(b[name_start - 1], b' ' | b'\t' | b'\n' | b'{' | b',' | b'-') {
        return None;
    }
    Some(Edit {
        name: (name_start, i),
        value: (start, end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_flow_and_quoted_keys_become_hashes() {
        let yaml = "version: x\nsubjects:\n  - { key: k-one, id: a, tier: free }  # first\n  - key: \"k two\"\n    id: b\n    tier: free\n  - { key_sha256: [abc], id: c, tier: free }\n";
        let out = hash_plain_keys(yaml).expect("rewrite").expect("changed");
        assert!(!out.contains("k-one") && !out.contains("k two"), "{out}");
        assert!(out.contains(&quota::policy::key_sha256_hex("k-one")));
        assert!(out.contains(&quota::policy::key_sha256_hex("k two")));
        assert!(out.contains("# first"), "comments stay");
        assert_eq!(out.lines().count(), yaml.lines().count(), "lines stay");
    }

    #[test]
    fn documents_without_keys_are_left_alone_and_both_forms_are_refused() {
        assert_eq!(hash_plain_keys("version: x\n"), Ok(None));
        assert_eq!(
            hash_plain_keys("subjects:\n  - { key: k, key_sha256: [abc], id: a, tier: t }\n"),
            Err(RewriteError::Both(0))
        );
    }
}
