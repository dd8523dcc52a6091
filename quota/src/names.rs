//! The one rule for names that reach Redis keys, metric labels, audit events and the ledger:
//! subject ids, quota types, tier, route and model names. Every entry point (the policy loader, the
//! control plane, `/check`, LLM request bodies) checks names with these functions before using
//! them, so a name can never split a Redis key or a Cluster hash tag (`{`, `}`), smuggle a control
//! character into a label or a log, or be refused by a database (NUL).
//!
//! - identifiers (quota types, tiers, routes): 1–64 of `A-Z a-z 0-9 _ - .`
//! - subject ids: 1–128 of the same plus `: @ +`
//! - model names: 1–128 of the same plus `: @ + /` (provider model ids such as
//!   `meta-llama/Llama-3.1-8B` or `llama3:8b`)

use std::fmt;

/// What kind of name is being checked: it decides the character set and the length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    QuotaType,
    Tier,
    Route,
    Subject,
    Model,
}

impl NameKind {
    pub fn label(self) -> &'static str {
        match self {
            NameKind::QuotaType => "quota type",
            NameKind::Tier => "tier name",
            NameKind::Route => "route name",
            NameKind::Subject => "subject id",
            NameKind::Model => "model name",
        }
    }

    pub fn max_len(self) -> usize {
        match self {
            NameKind::QuotaType | NameKind::Tier | NameKind::Route => 64,
            NameKind::Subject | NameKind::Model => 128,
        }
    }

    fn allows(self, b: u8) -> bool {
        let base = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
        match self {
            NameKind::QuotaType | NameKind::Tier | NameKind::Route => base,
            NameKind::Subject => base || matches!(b, b':' | b'@' | b'+'),
            NameKind::Model => base || matches!(b, b':' | b'@' | b'+' | b'/'),
        }
    }

    /// The allowed characters, as error messages show them.
    pub fn charset(self) -> &'static str {
        match self {
            NameKind::QuotaType | NameKind::Tier | NameKind::Route => "letters, digits, `_ - .`",
            NameKind::Subject => "letters, digits, `_ - . : @ +`",
            NameKind::Model => "letters, digits, `_ - . : @ + /`",
        }
    }
}

/// Why a name was refused; the message never echoes the raw name (it may hold control bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NameError {
    pub kind: NameKind,
    pub reason: String,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.kind.label(), self.reason)
    }
}

/// Check `name` against the rule for `kind`.
pub fn check(kind: NameKind, name: &str) -> Result<(), NameError> {
    let err = |reason: String| Err(NameError { kind, reason });
    if name.is_empty() {
        return err("must not be empty".into());
    }
    if name.len() > kind.max_len() {
        return err(format!(
            "{} bytes long; at most {} are allowed",
            name.len(),
            kind.max_len()
        ));
    }
    // Every allowed character is ASCII, so the first refused byte starts the refused character.
    if let Some(i) = name.bytes().position(|b| !kind.allows(b)) {
        let c = name[i..].chars().next().unwrap_or('?');
        let shown = if c.is_control() || !c.is_ascii() {
            format!("U+{:04X}", c as u32)
        } else {
            format!("`{c}`")
        };
        return err(format!(
            "character {shown} at byte {i} is not allowed; use {}",
            kind.charset()
        ));
    }
    Ok(())
}

/// Whether `name` is valid for `kind`.
pub fn is_valid(kind: NameKind, name: &str) -> bool {
    check(kind, name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_names_people_use() {
        for (kind, name) in [
            (NameKind::QuotaType, "llm_tokens"),
            (NameKind::QuotaType, "lookup"),
            (NameKind::Tier, "pro-2026.v2"),
            (NameKind::Subject, "tenant:acme"),
            (NameKind::Subject, "alice@example.com"),
            (NameKind::Model, "gpt-4o-mini-2024-07-18"),
            (NameKind::Model, "meta-llama/Llama-3.1-8B"),
            (NameKind::Model, "llama3:8b"),
        ] {
            assert!(is_valid(kind, name), "{kind:?} {name}");
        }
    }

    #[test]
    fn refuses_what_would_break_keys_labels_or_the_ledger() {
        let long = "a".repeat(65);
        for (kind, name) in [
            (NameKind::QuotaType, "a\0b"),
            (NameKind::QuotaType, ""),
            (NameKind::QuotaType, "a:b"),
            (NameKind::QuotaType, long.as_str()),
            (NameKind::Subject, "{acme}"),
            (NameKind::Subject, "a}b"),
            (NameKind::Subject, "a b"),
            (NameKind::Subject, "a\nb"),
            (NameKind::Model, "gpt\u{202e}4"),
            (NameKind::Tier, "pro/x"),
        ] {
            assert!(!is_valid(kind, name), "{kind:?} {name:?}");
        }
        let e = check(NameKind::QuotaType, "a\0b").unwrap_err().to_string();
        assert!(e.contains("U+0000") && !e.contains('\0'), "{e}");
    }
}
