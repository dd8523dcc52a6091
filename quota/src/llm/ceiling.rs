//! A stream's output ceiling: what sits between the meter and the client, passing whole SSE
//! events and counting the output tokens they deliver, so a stream can be ended at its
//! reservation with a final error event in the provider's own format (the official SDKs raise an
//! API error on it rather than a parse error).
//!
//! Counting is cheap until it matters: the length of the still-escaped text of each event is an
//! upper bound of its tokens (every token covers at least one byte), so nothing is tokenized
//! while that bound stays under the ceiling. Past it, the text delivered so far is counted once
//! and every later event is counted as it passes (per event, which overcounts by at most the
//! merges across event boundaries: streams send about one token per event).

use super::sse::{data_payload, decode_pieces, json_string_at};
use super::{Provider, tokens};
use bytes::{Bytes, BytesMut};
use memchr::memmem;
use std::sync::LazyLock;

/// The largest single event passed on; a larger one ends the stream (an upstream that sends a
/// megabyte without an event boundary is not streaming tokens).
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Why a stream is ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// The output reached what was reserved for it.
    Reservation,
    /// The subject's quota ran out while the stream was past its reservation.
    QuotaExhausted,
    /// The upstream sent an event larger than [`MAX_EVENT_BYTES`].
    OversizedEvent,
}

#[derive(Debug)]
pub struct OutputCeiling {
    provider: Provider,
    /// The stream is a Responses API stream: its text is in `…delta` events' `delta`.
    responses: bool,
    model: String,
    max_output: u64,
    /// The current incomplete event.
    held: BytesMut,
    /// How far `held` was already searched for the end of an event.
    scanned: usize,
    /// Upper bound of delivered output tokens, while counting is not yet precise.
    bound: u64,
    /// Escaped text pieces of delivered events as a JSON array (`["a","b"`), until precise.
    kept: Vec<u8>,
    /// Delivered output tokens, counted precisely (once `precise`).
    delivered: u64,
    precise: bool,
    cut: Option<CutReason>,
}

impl OutputCeiling {
    /// `max_output`: the output tokens the stream may deliver (`u64::MAX`: no ceiling, count only).
    pub fn new(provider: Provider, model: &str, max_output: u64) -> Self {
        Self {
            provider,
            responses: false,
            model: model.to_string(),
            max_output,
            held: BytesMut::new(),
            scanned: 0,
            bound: 0,
            kept: Vec::new(),
            delivered: 0,
            precise: false,
            cut: None,
        }
    }

    /// A ceiling for an OpenAI Responses API stream.
    pub fn for_responses(model: &str, max_output: u64) -> Self {
        Self {
            responses: true,
            ..Self::new(Provider::OpenAi, model, max_output)
        }
    }

    /// Pass `piece` (what the meter lets through); whole events the client may get go to `out`.
    /// After a cut, nothing more passes.
    pub fn pass(&mut self, piece: Bytes, out: &mut Vec<Bytes>) {
        if self.cut.is_some() {
            return;
        }
        // The common case: the piece is whole events, forwarded as one piece.
        if self.held.is_empty() && (piece.ends_with(b"\n\n") || piece.ends_with(b"\r\n\r\n")) {
            let mut at = 0;
            while at < piece.len() {
                let end = at + event_end(&piece[at..]).unwrap_or(piece.len() - at);
                if !self.admit(&piece[at..end]) {
                    // The events before this one were admitted.
                    if at > 0 {
                        out.push(piece.slice(..at));
                    }
                    self.cut_now(CutReason::Reservation, out);
                    return;
                }
                at = end;
            }
            out.push(piece);
            return;
        }
        self.held.extend_from_slice(&piece);
        loop {
            // An event end may straddle the previous search's stop: back up three bytes.
            let from = self.scanned.saturating_sub(3);
            match event_end(&self.held[from..]) {
                Some(e) => {
                    let event = self.held.split_to(from + e).freeze();
                    self.scanned = 0;
                    if !self.admit(&event) {
                        self.held.clear();
                        self.cut_now(CutReason::Reservation, out);
                        return;
                    }
                    out.push(event);
                }
                None => {
                    self.scanned = self.held.len();
                    if self.held.len() > MAX_EVENT_BYTES {
                        self.held.clear();
                        self.cut_now(CutReason::OversizedEvent, out);
                    }
                    return;
                }
            }
        }
    }

    fn keys(&self) -> &'static [memmem::Finder<'static>] {
        if self.responses {
            responses_keys()
        } else {
            text_keys(self.provider)
        }
    }

    /// Count one complete event; false when it would pass the ceiling, so it must not be sent.
    fn admit(&mut self, event: &[u8]) -> bool {
        // Escaped length (quotes excluded) bounds the text's bytes, hence its tokens.
        let raw_len: u64 = text_pieces(self.keys(), event)
            .map(|p| p.len().saturating_sub(2) as u64)
            .sum();
        if raw_len == 0 {
            return true;
        }
        if !self.precise {
            let bound = self.bound.saturating_add(raw_len);
            if bound <= self.max_output {
                self.bound = bound;
                let keys = self.keys();
                append_pieces(&mut self.kept, text_pieces(keys, event));
                return true;
            }
            self.delivered = tokens::count(&self.model, &decode_pieces(&self.kept));
            self.kept = Vec::new();
            self.precise = true;
        }
        let mut array = Vec::with_capacity(raw_len as usize + 8);
        append_pieces(&mut array, text_pieces(self.keys(), event));
        let n = tokens::count(&self.model, &decode_pieces(&array));
        if self.delivered.saturating_add(n) > self.max_output {
            return false;
        }
        self.delivered += n;
        true
    }

    /// End the stream now: the provider's error event goes to `out`, nothing passes after it.
    pub fn cut_now(&mut self, reason: CutReason, out: &mut Vec<Bytes>) {
        if self.cut.is_some() {
            return;
        }
        self.cut = Some(reason);
        out.push(error_event(self.provider, reason, self.max_output));
    }

    /// The end of the stream: a trailing partial event is passed as it is.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.cut.is_none() && !self.held.is_empty() {
            out.push(self.held.split().freeze());
        }
    }

    pub fn cut(&self) -> Option<CutReason> {
        self.cut
    }

    /// Output tokens in the events passed to the client.
    pub fn delivered(&self) -> u64 {
        if self.precise {
            self.delivered
        } else {
            tokens::count(&self.model, &decode_pieces(&self.kept))
        }
    }

    /// Upper bound of the output delivered so far, without tokenizing (for checks on every
    /// chunk).
    pub fn delivered_bound(&self) -> u64 {
        if self.precise {
            self.delivered
        } else {
            self.bound
        }
    }
}

pub(crate) fn text_keys(provider: Provider) -> &'static [memmem::Finder<'static>] {
    // Searchers built once: every event of every stream is scanned with them.
    static OPENAI: LazyLock<Vec<memmem::Finder<'static>>> = LazyLock::new(|| {
        finders(&[
            b"\"content\":",
            b"\"text\":",
            b"\"arguments\":",
            b"\"reasoning_content\":",
            // OpenAI-compatible servers (OpenRouter, vLLM) stream reasoning text under this name.
            b"\"reasoning\":",
            b"\"refusal\":",
        ])
    });
    static ANTHROPIC: LazyLock<Vec<memmem::Finder<'static>>> =
        LazyLock::new(|| finders(&[b"\"text\":", b"\"partial_json\":", b"\"thinking\":"]));
    match provider {
        Provider::OpenAi => &OPENAI,
        Provider::Anthropic => &ANTHROPIC,
    }
}

/// Responses API streams: only the deltas (`…done` events and `response.completed` repeat the
/// whole text).
fn responses_keys() -> &'static [memmem::Finder<'static>] {
    static KEYS: LazyLock<Vec<memmem::Finder<'static>>> =
        LazyLock::new(|| finders(&[b"\"delta\":"]));
    &KEYS
}

fn finders(needles: &[&'static [u8]]) -> Vec<memmem::Finder<'static>> {
    needles.iter().map(|n| memmem::Finder::new(*n)).collect()
}

/// The escaped text strings (quotes included) of one event's `data:` lines, every occurrence of
/// every text field (several choices, several content blocks).
fn text_pieces<'a>(
    keys: &'static [memmem::Finder<'static>],
    event: &'a [u8],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    event
        .split(|&b| b == b'\n')
        .filter_map(data_payload)
        .flat_map(move |data| {
            keys.iter().flat_map(move |key| {
                key.find_iter(data)
                    .filter_map(move |at| json_string_at(&data[at + key.needle().len()..]))
            })
        })
}

/// Append escaped string pieces to an unterminated JSON array (`["a","b"`).
fn append_pieces<'a>(array: &mut Vec<u8>, pieces: impl Iterator<Item = &'a [u8]>) {
    for p in pieces {
        array.push(if array.is_empty() { b'[' } else { b',' });
        array.extend_from_slice(p);
    }
}

/// End (exclusive) of the first event in `buf`: after its blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = finder!(b"\n\n").find(buf).map(|i| i + 2);
    let crlf = finder!(b"\r\n\r\n").find(buf).map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The final event that ends a cut stream, in the provider's error format.
fn error_event(provider: Provider, reason: CutReason, max_output: u64) -> Bytes {
    let (code, message) = match reason {
        CutReason::Reservation => (
            "output_limit_reached",
            format!(
                "the response reached the {max_output} output tokens reserved for it and was ended by the gateway"
            ),
        ),
        CutReason::QuotaExhausted => (
            "quota_exceeded",
            "the token quota ran out while the response was streaming; it was ended by the gateway"
                .to_string(),
        ),
        CutReason::OversizedEvent => (
            "upstream_event_too_large",
            "the upstream sent an event too large to meter; the response was ended by the gateway"
                .to_string(),
        ),
    };
    let text = match provider {
        Provider::OpenAi => {
            let body = serde_json::json!({ "error": {
                "message": message, "type": "tollgate_error", "code": code, "param": null } });
            format!("data: {body}\n\n")
        }
        Provider::Anthropic => {
            let body = serde_json::json!({ "type": "error", "error": {
                "type": "rate_limit_error", "message": message, "code": code } });
            format!("event: error\ndata: {body}\n\n")
        }
    };
    Bytes::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai_events(words: &[&str]) -> String {
        let mut s = String::from(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        );
        for w in words {
            s += &format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}}}}]}}\n\n"
            );
        }
        s + "data: [DONE]\n\n"
    }

    fn run(c: &mut OutputCeiling, s: &str, step: usize) -> String {
        let mut out = Vec::new();
        for p in s.as_bytes().chunks(step) {
            c.pass(Bytes::copy_from_slice(p), &mut out);
        }
        c.finish(&mut out);
        out.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn under_the_ceiling_the_stream_is_untouched() {
        let s = openai_events(&[" the", " of", " and"]);
        for step in [1, 3, 50, 4096] {
            let mut c = OutputCeiling::new(Provider::OpenAi, "gpt-4o", 3);
            assert_eq!(run(&mut c, &s, step), s, "step {step}");
            assert_eq!((c.cut(), c.delivered()), (None, 3));
        }
    }

    #[test]
    fn at_the_ceiling_the_stream_ends_with_a_parseable_error_event() {
        let words: Vec<&str> = std::iter::repeat_n(" the", 40).collect();
        let s = openai_events(&words);
        for step in [1, 7, 4096] {
            let mut c = OutputCeiling::new(Provider::OpenAi, "gpt-4o", 25);
            let got = run(&mut c, &s, step);
            assert_eq!(c.cut(), Some(CutReason::Reservation));
            assert_eq!(c.delivered(), 25, "step {step}");
            let events: Vec<&str> = got.split("\n\n").filter(|e| !e.is_empty()).collect();
            assert_eq!(events.len(), 1 + 25 + 1, "role, 25 words, the error");
            let last: serde_json::Value =
                serde_json::from_str(events.last().unwrap().strip_prefix("data: ").unwrap())
                    .unwrap();
            assert_eq!(last["error"]["code"], "output_limit_reached");
            for e in &events {
                assert!(e.starts_with("data: {"), "every event is whole: {e}");
            }
        }
    }

    #[test]
    fn anthropic_streams_end_with_an_error_event() {
        let mut s = String::from(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5}}}\n\n",
        );
        for _ in 0..10 {
            s += "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" the\"}}\n\n";
        }
        let mut c = OutputCeiling::new(Provider::Anthropic, "claude", 4);
        let got = run(&mut c, &s, 13);
        assert_eq!(c.delivered(), 4);
        assert!(got.ends_with("\n\n"));
        let last = got.trim_end().rsplit("\n\n").next().unwrap();
        assert!(last.starts_with("event: error\ndata: {\"error\""), "{last}");
    }

    #[test]
    fn an_endless_event_is_cut_not_buffered() {
        let mut c = OutputCeiling::new(Provider::OpenAi, "gpt-4o", u64::MAX);
        let mut out = Vec::new();
        let junk = Bytes::from(vec![b'a'; 64 * 1024]);
        for _ in 0..20 {
            c.pass(junk.clone(), &mut out);
        }
        assert_eq!(c.cut(), Some(CutReason::OversizedEvent));
        assert!(c.held.len() <= MAX_EVENT_BYTES);
    }
}
