//! The path normalizer on arbitrary text `PATH[\tPREFIX]` (a tab never belongs to a valid path).
//! Asserts: a normalized path starts with `/`, has no `//` and no `.`/`..` segment, normalizes to
//! itself; `under` matches whole segments only.
#![no_main]

use quota::http_path::{normalize, under};

fn segments(p: &str) -> Vec<&str> {
    p.split('/').filter(|s| !s.is_empty()).collect()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (raw, raw_prefix) = text.split_once('\t').unwrap_or((text, ""));
    let Ok(p) = normalize(raw) else {
        return;
    };
    assert!(p.starts_with('/'), "{p:?}");
    assert!(!p.contains("//"), "{p:?}");
    assert!(p.split('/').all(|s| s != "." && s != ".."), "{p:?}");
    assert_eq!(normalize(&p).as_deref(), Ok(&*p), "not idempotent");

    // The normalized prefix, and the path cut where the prefix's length says (mid-segment too).
    let mut prefixes = vec![p[..raw_prefix.len().min(p.len())].to_string()];
    if let Ok(q) = normalize(raw_prefix) {
        prefixes.push(q.into_owned());
    }
    for q in prefixes.iter().filter(|q| q.starts_with('/')) {
        let (ps, qs) = (segments(&p), segments(q));
        if under(&p, q) {
            assert!(ps.starts_with(&qs), "{q:?} matched {p:?} across a segment");
        } else if !q.ends_with('/') {
            assert!(!ps.starts_with(&qs), "{q:?} should cover {p:?}");
        }
    }
});
