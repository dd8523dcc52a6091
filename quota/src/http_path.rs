//! The one path normalizer of the gateway. Routes match the normalized path and the upstream
//! receives exactly it, so what is billed is what is served: no dot segment, encoded separator or
//! doubled slash can make a request billed as one endpoint reach another.
//!
//! Rules (RFC 3986 §6.2.2 plus refusals for forms servers disagree on):
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; other
//!   percent-encodings are kept, with upper-case hex;
//! - `.` segments are removed and `..` removes the segment before it, never above the root;
//! - repeated `/` collapse into one;
//! - refused: an encoded `/` (`%2F`) or `\` (`%5C`), a raw `\`, NUL or any other control byte
//!   (raw or encoded), a `%` not followed by two hex digits, non-ASCII bytes, a path that does
//!   not start with `/`, and a `.` or `..` segment with `;` parameters (`/a/..;/b`: Java servers
//!   strip the parameters and climb, others see a plain name).

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("an encoded `/` or `\\` (`%2F`, `%5C`) is not accepted in a path")]
    EncodedSeparator,
    #[error("a `\\` is not accepted in a path")]
    Backslash,
    #[error("control characters (NUL included) are not accepted in a path")]
    Control,
    #[error("`%` must be followed by two hexadecimal digits")]
    BadEscape,
    #[error("non-ASCII bytes must be percent-encoded")]
    NonAscii,
    #[error("a `.` or `..` segment with `;` parameters is not accepted in a path")]
    DotParameters,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The normalized form of `path` (without the query). Borrowed when it is already normal, the
/// common case, so a well-formed request costs one scan.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: decode unreserved escapes, refuse the ambiguous forms.
    let mut decoded: Option<String> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = h * 16 + l;
                if c == b'/' || c == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if c.is_ascii_control() {
                    return Err(PathError::Control);
                }
                let upper = [HEX_UPPER[usize::from(h)], HEX_UPPER[usize::from(l)]];
                if !unreserved(c) && bytes[i + 1..i + 3] == upper {
                    // Kept as it is: no reason to copy the path (`/a%20b` stays borrowed).
                    if let Some(out) = decoded.as_mut() {
                        out.push_str(&path[i..i + 3]);
                    }
                    i += 3;
                    continue;
                }
                let out = decoded.get_or_insert_with(|| path[..i].to_string());
                if unreserved(c) {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(char::from(upper[0]));
                    out.push(char::from(upper[1]));
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if b.is_ascii_control() => return Err(PathError::Control),
            _ if !b.is_ascii() => return Err(PathError::NonAscii),
            _ => {
                if let Some(out) = decoded.as_mut() {
                    out.push(b as char);
                }
            }
        }
        i += 1;
    }
    let p: Cow<'_, str> = match decoded {
        Some(s) => Cow::Owned(s),
        None => Cow::Borrowed(path),
    };
    if (p.contains(';') || p.contains("%3B")) && p[1..].split('/').any(dot_with_parameters) {
        return Err(PathError::DotParameters);
    }
    if !needs_segment_work(&p) {
        return Ok(p);
    }
    // Pass 2: remove dot segments and empty segments.
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in p[1..].split('/') {
        trailing_slash = false;
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(p.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// A `.` or `..` segment carrying `;` parameters (raw or `%3B`).
fn dot_with_parameters(seg: &str) -> bool {
    let name = seg.split(';').next().unwrap_or(seg);
    let name = name.split("%3B").next().unwrap_or(name);
    name.len() < seg.len() && (name == "." || name == "..")
}

/// Whether `p` holds `//`, or a `.` or `..` segment.
fn needs_segment_work(p: &str) -> bool {
    p.contains("//") || p[1..].split('/').any(|s| s == "." || s == "..")
}

/// Whether `path` (normalized) is under `prefix`: equal to it, or continuing it at a segment
/// boundary (`/lookup` covers `/lookup/42` but not `/lookupx`). A prefix ending in `/` covers
/// everything below it.
pub fn under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_are_borrowed_untouched() {
        for p in [
            "/",
            "/lookup/42",
            "/v1/chat/completions",
            "/a/b/",
            "/a%20b",
            "/a;v=1/b",
            "/..a;x",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(x)) if x == p),
                "{p}"
            );
        }
    }

    #[test]
    fn dots_escapes_and_slashes_are_resolved() {
        for (raw, want) in [
            ("/lookup/../exports/1", "/exports/1"),
            (
                "/v1/chat/completions/%2e%2e/%2e%2e/completions",
                "/v1/completions",
            ),
            ("/v1/chat/completions/%2E./x", "/v1/chat/x"),
            ("/a/./b", "/a/b"),
            ("//a///b", "/a/b"),
            ("/../../a", "/a"),
            ("/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/%7euser/%41", "/~user/A"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%25b", "/a%25b"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn ambiguous_forms_are_refused() {
        for (raw, err) in [
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::Backslash),
            ("/a%00b", PathError::Control),
            ("/a\0b", PathError::Control),
            ("/a%zz", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("/lookup/..;/exports/1", PathError::DotParameters),
            ("/lookup/.;x/exports", PathError::DotParameters),
            // `.;` is `.` to Java, so the `..` after it climbs out of /lookup there.
            ("/lookup/.;/../exports/1", PathError::DotParameters),
            ("/lookup/%2e%2e;/exports", PathError::DotParameters),
            ("/lookup/..%3b/exports", PathError::DotParameters),
            ("/lookup/..;jsessionid=1/x", PathError::DotParameters),
            ("a/b", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("/é", PathError::NonAscii),
        ] {
            assert_eq!(normalize(raw), Err(err), "{raw:?}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for raw in ["/a/%2e%2e/b//c/./", "/x/%41%2e/..", "/%7e/%25"] {
            let once = normalize(raw).unwrap().into_owned();
            assert_eq!(normalize(&once).unwrap(), once, "{raw}");
        }
    }

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert!(under("/lookup", "/lookup"));
        assert!(under("/lookup/42", "/lookup"));
        assert!(!under("/lookupx", "/lookup"));
        assert!(under("/anything", "/"));
        assert!(under("/v1/x", "/v1/"));
    }
}
