//! Property tests of the input-facing parsers: the SSE stream meter (OpenAI and Anthropic), the LLM
//! request parser, the path normalizer and the policy loader. Each runs a fixed number of cases
//! from a fixed seed, so a CI run is repeatable and a failure reproduces; the fuzz targets in
//! `fuzz/` explore the same code for longer.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed};
use quota::http_path::{normalize, under};
use quota::llm::request::Endpoint;
use quota::llm::sse::{MeterLimits, StreamMeter};
use quota::llm::{Provider, request, tokens};
use serde_json::{Value, json};
use std::borrow::Cow;

/// Fixed seed, no regression files written into the tree, `cases` cases.
fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x7011_6a7e),
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------- SSE meter

/// Cut `s` at the positions picked by `cuts` (any number, any place, empty pieces included).
fn split(s: &[u8], cuts: &[Index]) -> Vec<Bytes> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(s.len() + 1)).collect();
    at.sort_unstable();
    let mut pieces = Vec::with_capacity(at.len() + 1);
    let mut from = 0;
    for a in at {
        pieces.push(Bytes::copy_from_slice(&s[from..a]));
        from = a;
    }
    pieces.push(Bytes::copy_from_slice(&s[from..]));
    pieces
}

/// What a meter forwards for `chunks`, and the meter after the stream's end.
fn meter_run(
    provider: Provider,
    strip: bool,
    limits: MeterLimits,
    chunks: Vec<Bytes>,
) -> (Vec<u8>, StreamMeter) {
    let mut m = StreamMeter::with_limits(provider, "gpt-4o-mini", strip, limits);
    let mut out = Vec::new();
    for c in chunks {
        m.feed(c, &mut out);
    }
    m.flush(&mut out);
    (out.concat(), m)
}

/// One generated stream: what the upstream sends, what the client should get when the gateway
/// injected the usage request (strip mode), the generated text and the usage it reports.
#[derive(Debug, Clone)]
struct Stream {
    wire: Vec<u8>,
    stripped: Vec<u8>,
    text: String,
    /// Input tokens the stream reports.
    prompt: Option<u64>,
    /// Output tokens the stream reports.
    completion: Option<u64>,
}

/// Generated text pieces: any Unicode, JSON-escaped on the wire (quotes, `\n`, controls included).
fn pieces() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(any::<String>(), 0..8)
}

fn openai_stream() -> impl Strategy<Value = Stream> {
    (
        pieces(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..100_000u64,
        0..100_000u64,
    )
        .prop_map(|(pieces, with_usage, crlf, legacy, prompt, completion)| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let (mut wire, mut stripped) = (String::new(), String::new());
            for p in &pieces {
                let choice = if legacy {
                    json!({"index": 0, "text": p, "finish_reason": null})
                } else {
                    json!({"index": 0, "delta": {"content": p}, "finish_reason": null})
                };
                let plain = json!({"id": "x", "choices": [choice]}).to_string();
                stripped += &format!("data: {plain}{eol}{eol}");
                let chunk = if with_usage {
                    // Where OpenAI puts it: last, after `choices`.
                    format!("{},\"usage\":null}}", &plain[..plain.len() - 1])
                } else {
                    plain
                };
                wire += &format!("data: {chunk}{eol}{eol}");
            }
            if with_usage {
                wire += &format!(
                    "data: {}{eol}{eol}",
                    json!({"id": "x", "choices": [], "usage": {
                        "prompt_tokens": prompt, "completion_tokens": completion,
                        "total_tokens": prompt + completion}})
                );
            }
            wire += &format!("data: [DONE]{eol}{eol}");
            stripped += &format!("data: [DONE]{eol}{eol}");
            Stream {
                wire: wire.into_bytes(),
                stripped: stripped.into_bytes(),
                text: pieces.concat(),
                prompt: with_usage.then_some(prompt),
                completion: with_usage.then_some(completion),
            }
        })
}

fn anthropic_stream() -> impl Strategy<Value = Stream> {
    (
        pieces(),
        any::<bool>(),
        any::<bool>(),
        0..100_000u64,
        0..100_000u64,
    )
        .prop_map(|(pieces, with_usage, crlf, prompt, completion)| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut events = vec![
                json!({"type": "message_start", "message": {"id": "m", "usage":
                    {"input_tokens": prompt, "output_tokens": 1}}}),
                json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
            ];
            for p in &pieces {
                events.push(json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": p}}));
            }
            events.push(json!({"type": "content_block_stop", "index": 0}));
            let mut delta = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}});
            if with_usage {
                delta["usage"] = json!({"output_tokens": completion});
            }
            events.push(delta);
            events.push(json!({"type": "message_stop"}));
            let mut wire = String::new();
            for e in &events {
                let kind = e["type"].as_str().unwrap_or_default();
                wire += &format!("event: {kind}{eol}data: {e}{eol}{eol}");
            }
            Stream {
                stripped: wire.clone().into_bytes(),
                wire: wire.into_bytes(),
                text: pieces.concat(),
                prompt: Some(prompt),
                completion: with_usage.then_some(completion),
            }
        })
}

/// Small limits, so generated streams overflow them often.
fn limits() -> impl Strategy<Value = MeterLimits> {
    prop_oneof![
        Just(MeterLimits::default()),
        (16..400usize, 8..200usize).prop_map(|(max_event, max_text)| MeterLimits {
            max_event,
            max_text
        }),
    ]
}

/// Usage, forwarded bytes and flags for any split equal those for the whole stream in one chunk;
/// with the default limits they equal what the stream says.
fn check_stream(
    provider: Provider,
    s: &Stream,
    limits: MeterLimits,
    cuts: &[Index],
) -> Result<(), TestCaseError> {
    for strip in [false, true] {
        let (whole_out, whole) =
            meter_run(provider, strip, limits, vec![Bytes::from(s.wire.clone())]);
        let (out, m) = meter_run(provider, strip, limits, split(&s.wire, cuts));
        prop_assert_eq!(m.usage(3), whole.usage(3), "strip {}", strip);
        prop_assert_eq!(m.overflowed(), whole.overflowed());
        prop_assert_eq!(m.finished(), whole.finished());
        prop_assert_eq!(m.reported(), whole.reported());
        prop_assert_eq!(m.bytes(), s.wire.len() as u64);
        prop_assert!(
            out == whole_out,
            "same bytes whatever the split (strip {})",
            strip
        );
        prop_assert!(m.buffered() == 0, "nothing held after flush");
        // OpenAI only strips when asked to; Anthropic streams are never altered.
        let altered = strip && provider == Provider::OpenAi;
        if !altered {
            prop_assert!(out == s.wire, "pass-through is byte-identical");
        }
        if m.overflowed() {
            continue;
        }
        if altered {
            prop_assert!(
                out == s.stripped,
                "strip mode drops exactly the injected usage"
            );
        }
        prop_assert!(m.finished());
        let usage = m.usage(3);
        prop_assert_eq!(usage.prompt, s.prompt.unwrap_or(3));
        prop_assert_eq!(m.reported(), s.completion.is_some());
        if let Some(completion) = s.completion {
            prop_assert_eq!(usage.completion, completion);
        } else if limits == MeterLimits::default() {
            prop_assert_eq!(usage.completion, tokens::count("gpt-4o-mini", &s.text));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(192))]

    #[test]
    fn sse_openai_any_split_same_usage_and_bytes(
        s in openai_stream(),
        limits in limits(),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        check_stream(Provider::OpenAi, &s, limits, &cuts)?;
    }

    #[test]
    fn sse_anthropic_any_split_same_usage_and_bytes(
        s in anthropic_stream(),
        limits in limits(),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        check_stream(Provider::Anthropic, &s, limits, &cuts)?;
    }

    #[test]
    fn sse_random_bytes_never_panic_and_pass_through(
        // Bytes biased to SSE's own: line ends, `data:`, braces, quotes.
        wire in prop::collection::vec(prop_oneof![
            any::<u8>(),
            Just(b'\n'),
            Just(b'\r'),
            Just(b'"'),
        ], 0..600).prop_map(|mut v| { if v.len() > 10 { v.splice(0..0, b"data: {".iter().copied()); } v }),
        limits in limits(),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        for provider in [Provider::OpenAi, Provider::Anthropic] {
            for strip in [false, true] {
                let (out, m) = meter_run(provider, strip, limits, split(&wire, &cuts));
                let _ = m.usage(0);
                if !strip || provider == Provider::Anthropic {
                    prop_assert!(out == wire);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- LLM request parser

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "(gpt-4o|claude|model|text|content|user|system)".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Keys the parser looks at, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        "(model|stream|max_tokens|max_completion_tokens|stream_options|include_usage|messages|\
          system|prompt|content|role|text|type)",
        any::<String>(),
    ]
}

const LLM_PATHS: [(Provider, Endpoint); 3] = [
    (Provider::OpenAi, Endpoint::Chat),
    (Provider::OpenAi, Endpoint::Completions),
    (Provider::Anthropic, Endpoint::Messages),
];

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn llm_request_arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..400)) {
        for (provider, path) in LLM_PATHS {
            let _ = request::parse(provider, path, &body, None);
        }
    }

    #[test]
    fn llm_request_arbitrary_json_never_panics(
        top in prop::collection::vec((key(), json_value()), 0..8),
        any_value in json_value(),
    ) {
        let object = Value::Object(top.into_iter().collect());
        for v in [object, any_value] {
            let body = serde_json::to_vec(&v).unwrap_or_default();
            for (provider, path) in LLM_PATHS {
                let _ = request::parse(provider, path, &body, None);
            }
        }
    }
}

// ---------------------------------------------------------------- path normalizer

/// Paths built from the pieces that matter to normalization (dots, escapes, slashes), and some
/// that must be refused.
fn path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => Just("/"),
        2 => Just("."),
        2 => Just(".."),
        3 => Just("a"),
        2 => Just("bc"),
        2 => Just("%2e"),
        1 => Just("%2E"),
        1 => Just("%41"),
        1 => Just("%7e"),
        1 => Just("%25"),
        1 => Just("%3f"),
        1 => Just("%2f"),
        1 => Just("%5C"),
        1 => Just("%"),
        1 => Just("%g1"),
        1 => Just("\\"),
        1 => Just("%00"),
        1 => Just("\t"),
        1 => Just("é"),
        1 => Just("~-_"),
    ];
    prop_oneof![
        9 => prop::collection::vec(piece, 0..16).prop_map(|p| p.concat()),
        1 => any::<String>(),
    ]
}

fn segments(p: &str) -> Vec<&str> {
    p.split('/').filter(|s| !s.is_empty()).collect()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn path_normalize_is_idempotent_and_clean(raw in path()) {
        let Ok(n) = normalize(&raw) else { return Ok(()) };
        prop_assert!(n.starts_with('/'), "{:?} -> {:?}", raw, n);
        prop_assert!(!n.contains("//"), "{:?} -> {:?}", raw, n);
        prop_assert!(
            n.split('/').all(|s| s != "." && s != ".."),
            "{:?} -> {:?}", raw, n
        );
        let again = normalize(&n);
        prop_assert_eq!(again.as_deref(), Ok(&*n), "idempotent for {:?}", raw);
        // And cheap: a normal path is returned borrowed, never copied.
        prop_assert!(matches!(again, Ok(Cow::Borrowed(_))), "copied {:?}", n);
    }

    #[test]
    fn path_under_matches_whole_segments_only(
        raw in path(),
        raw_prefix in path(),
        cut in any::<Index>(),
    ) {
        let Ok(p) = normalize(&raw) else { return Ok(()) };
        // A normalized prefix, and a prefix of the path cut anywhere (mid-segment included).
        let cut_at = cut.index(p.len() + 1);
        let mut prefixes = vec![p[..cut_at].to_string()];
        if let Ok(q) = normalize(&raw_prefix) {
            prefixes.push(q.into_owned());
        }
        for q in prefixes.iter().filter(|q| q.starts_with('/')) {
            let (ps, qs) = (segments(&p), segments(q));
            if under(&p, q) {
                prop_assert!(ps.starts_with(&qs), "{:?} matched {:?} across a segment", q, p);
            } else if !q.ends_with('/') {
                prop_assert!(!ps.starts_with(&qs), "{:?} should cover {:?}", q, p);
            }
        }
    }
}

// ---------------------------------------------------------------- policy loader

const EXAMPLE: &str = include_str!("../../policies/example.yaml");

/// Policy texts: the example cut, spliced and garbled, and arbitrary text.
fn policy_text() -> impl Strategy<Value = String> {
    let edit = (
        any::<Index>(),
        any::<Index>(),
        "[ -~\n\t:{}\\[\\],&*!|>'\"#-]{0,12}",
    );
    prop_oneof![
        3 => prop::collection::vec(edit, 1..6).prop_map(|edits| {
            let mut text = EXAMPLE.to_string();
            for (a, b, insert) in edits {
                let (mut x, mut y) = (a.index(text.len() + 1), b.index(text.len() + 1));
                if x > y {
                    std::mem::swap(&mut x, &mut y);
                }
                // Keep the cut short, so most of the policy survives and validation goes deep.
                y = y.min(x + 40);
                while !text.is_char_boundary(x) { x -= 1; }
                while !text.is_char_boundary(y) { y -= 1; }
                text.replace_range(x..y.max(x), &insert);
            }
            text
        }),
        1 => any::<String>(),
        1 => "[a-z_:\\- \n{}\\[\\]0-9,.*&!|>]{0,200}",
    ]
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn policy_loader_arbitrary_text_never_panics(text in policy_text(), second in policy_text()) {
        let _ = quota::policy::parse_sources(&[("a.yaml".into(), text.clone())]);
        let _ = quota::policy::parse_sources(&[("a.yaml".into(), text), ("b.yaml".into(), second)]);
    }
}
