//! The policy loader on arbitrary text: one source, or two when the input holds a NUL (the
//! layered case, a control-plane overlay over a file). It must give a policy or errors, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let sources: Vec<(String, String)> = match text.split_once('\0') {
        Some((a, b)) => vec![("a.yaml".into(), a.into()), ("b.yaml".into(), b.into())],
        None => vec![("a.yaml".into(), text.into_owned())],
    };
    let _ = quota::policy::parse_sources(&sources);
});
