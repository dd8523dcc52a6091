//! Checks shared by the fuzz targets: each reads raw fuzzer bytes, drives one parser and asserts
//! the properties the property tests in `quota/tests/properties.rs` state, so a violated property
//! is a crash libFuzzer keeps and minimizes, not only a panic.

use bytes::Bytes;
use quota::llm::Provider;
use quota::llm::sse::{MeterLimits, StreamMeter};

/// Feed `chunks` to a new meter, flush; what the client got and the meter.
fn run(
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

/// The SSE meter on arbitrary input. Layout: `[flags, limit, cuts, cut bytes (2 each)..., stream...]`.
/// flags bit 0: strip mode; bit 1: small limits (so the fuzzer reaches overflows).
/// Asserts: any split of the stream gives the same forwarded bytes, usage and flags as one
/// chunk; pass-through output is byte-identical; nothing stays held after `flush`.
pub fn sse(provider: Provider, data: &[u8]) {
    let [flags, limit, cuts, rest @ ..] = data else {
        return;
    };
    let strip = flags & 1 != 0;
    let limits = if flags & 2 != 0 {
        MeterLimits {
            max_event: 8 + usize::from(*limit) * 4,
            max_text: 4 + usize::from(*limit),
        }
    } else {
        MeterLimits::default()
    };
    let cut_bytes = (usize::from(*cuts) % 16 * 2).min(rest.len());
    let (cut_bytes, wire) = rest.split_at(cut_bytes);
    let mut at: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (wire.len() + 1))
        .collect();
    at.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for a in at {
        chunks.push(Bytes::copy_from_slice(&wire[from..a]));
        from = a;
    }
    chunks.push(Bytes::copy_from_slice(&wire[from..]));

    let (whole_out, whole) = run(provider, strip, limits, vec![Bytes::copy_from_slice(wire)]);
    let (out, m) = run(provider, strip, limits, chunks);
    assert!(out == whole_out, "forwarded bytes depend on the split");
    assert_eq!(m.usage(5), whole.usage(5), "usage depends on the split");
    assert_eq!(m.overflowed(), whole.overflowed());
    assert_eq!(m.finished(), whole.finished());
    assert_eq!(m.reported(), whole.reported());
    assert_eq!(m.bytes(), wire.len() as u64);
    assert_eq!(m.buffered(), 0, "bytes held after flush");
    if !strip || provider == Provider::Anthropic {
        assert!(out == wire, "pass-through altered the stream");
    }
}
