//! Metering a response as it streams: feed each chunk in, in order, synchronously; the meter reads
//! usage from OpenAI (`data:` chunks, the final usage chunk) and Anthropic (`message_start`,
//! `message_delta`) events, across chunk boundaries, and keeps the generated text so tokens can be
//! counted when an upstream never reports usage.
//!
//! Chunks are forwarded as they are (a cheap `Bytes` clone; only a partial trailing line is kept).
//! The one exception: when the gateway asked the upstream for usage the client did not ask for
//! (`strip_injected_usage`), whole events are held until complete, the usage-only event is removed
//! and the `"usage":null` fields OpenAI then adds to every chunk are taken out, so the client gets
//! exactly the stream it would have got directly.

use super::{Provider, Usage, tokens};
use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::Deserialize;

#[derive(Debug)]
pub struct StreamMeter {
    provider: Provider,
    model: String,
    strip_injected_usage: bool,
    /// A line not yet ended by `\n` (pass-through mode).
    line: Vec<u8>,
    /// An event not yet ended by a blank line (strip mode).
    event: BytesMut,
    prompt: Option<u64>,
    completion: Option<u64>,
    /// Generated text as a JSON array of the still-escaped string pieces (`["a","b"`), decoded
    /// only if the upstream never reports usage: most streams never pay for decoding.
    text: Vec<u8>,
    finished: bool,
    bytes: u64,
}

#[derive(Deserialize)]
struct OaChunk {
    #[serde(default)]
    choices: Vec<OaChoice>,
    usage: Option<OaUsage>,
}

#[derive(Deserialize)]
struct OaChoice {
    delta: Option<OaDelta>,
    /// Legacy completions stream `text` instead of a delta.
    text: Option<String>,
}

#[derive(Deserialize)]
struct OaDelta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct OaUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct AnEvent {
    #[serde(rename = "type")]
    kind: String,
    message: Option<AnMessage>,
    usage: Option<AnUsage>,
}

#[derive(Deserialize)]
struct AnMessage {
    usage: Option<AnUsage>,
}

#[derive(Deserialize)]
struct AnUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl StreamMeter {
    pub fn new(provider: Provider, model: &str, strip_injected_usage: bool) -> Self {
        Self {
            provider,
            model: model.to_string(),
            strip_injected_usage: strip_injected_usage && provider == Provider::OpenAi,
            line: Vec::new(),
            event: BytesMut::new(),
            prompt: None,
            completion: None,
            text: Vec::new(),
            finished: false,
            bytes: 0,
        }
    }

    /// Read `chunk`; append what the client should receive to `out`.
    pub fn feed(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        self.bytes += chunk.len() as u64;
        if self.strip_injected_usage {
            self.event.extend_from_slice(&chunk);
            while let Some(end) = find_event_end(&self.event) {
                let event = self.event.split_to(end).freeze();
                if let Some(kept) = self.filter_event(event) {
                    out.push(kept);
                }
            }
            return;
        }
        out.push(chunk.clone());
        let mut rest = &chunk[..];
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.on_line(&rest[..nl]);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&rest[..nl]);
                self.on_line(&line);
            }
            rest = &rest[nl + 1..];
        }
        self.line.extend_from_slice(rest);
    }

    /// Bytes still held back (an incomplete event); sent when the stream ends.
    pub fn flush(&mut self, out: &mut Vec<Bytes>) {
        if !self.event.is_empty() {
            let rest = self.event.split().freeze();
            if let Some(kept) = self.filter_event(rest) {
                out.push(kept);
            }
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line);
        }
    }

    /// One complete event in strip mode: `None` drops it.
    fn filter_event(&mut self, event: Bytes) -> Option<Bytes> {
        let mut usage_only = false;
        for line in event.split(|&b| b == b'\n') {
            if let Some(data) = data_payload(line) {
                usage_only |= self.on_data(data);
            }
        }
        if usage_only {
            return None;
        }
        Some(remove_usage_null(event))
    }

    fn on_line(&mut self, line: &[u8]) {
        if let Some(data) = data_payload(line) {
            self.on_data(data);
        }
    }

    /// Keep the escaped JSON string that follows `key` (e.g. `"content":`) in `data`.
    fn keep_text(&mut self, data: &[u8], key: &[u8]) {
        if let Some(raw) = json_string_after(data, key) {
            self.text
                .push(if self.text.is_empty() { b'[' } else { b',' });
            self.text.extend_from_slice(raw);
        }
    }

    /// Read one `data:` payload; true when it is OpenAI's usage-only chunk. Events are scanned,
    /// not parsed: only those carrying usage (a handful per stream) go through a JSON parser.
    fn on_data(&mut self, data: &[u8]) -> bool {
        match self.provider {
            Provider::OpenAi => {
                if data == b"[DONE]" {
                    self.finished = true;
                    return false;
                }
                if memmem::find(data, b"\"usage\":{").is_none() {
                    self.keep_text(data, b"\"content\":");
                    self.keep_text(data, b"\"text\":");
                    return false;
                }
                let Ok(c) = serde_json::from_slice::<OaChunk>(data) else {
                    return false;
                };
                for ch in &c.choices {
                    if let Some(t) = ch
                        .delta
                        .as_ref()
                        .and_then(|d| d.content.as_deref())
                        .or(ch.text.as_deref())
                    {
                        self.push_text(t);
                    }
                }
                match c.usage {
                    Some(u) => {
                        self.prompt = u.prompt_tokens.or(self.prompt);
                        self.completion = u.completion_tokens.or(self.completion);
                        c.choices.is_empty()
                    }
                    None => false,
                }
            }
            Provider::Anthropic => {
                if memmem::find(data, b"\"type\":\"content_block_delta\"").is_some() {
                    self.keep_text(data, b"\"text\":");
                    return false;
                }
                let Ok(e) = serde_json::from_slice::<AnEvent>(data) else {
                    return false;
                };
                match e.kind.as_str() {
                    "message_start" => {
                        if let Some(u) = e.message.and_then(|m| m.usage) {
                            self.prompt = u.input_tokens.or(self.prompt);
                        }
                    }
                    // Cumulative output tokens of the message so far.
                    "message_delta" => {
                        if let Some(u) = e.usage {
                            self.completion = u.output_tokens.or(self.completion);
                            self.prompt = u.input_tokens.or(self.prompt);
                        }
                    }
                    "message_stop" => self.finished = true,
                    _ => {}
                }
                false
            }
        }
    }

    fn push_text(&mut self, t: &str) {
        self.text
            .push(if self.text.is_empty() { b'[' } else { b',' });
        // Re-escaped so the buffer stays one JSON array; serializing a str cannot fail.
        self.text
            .extend_from_slice(&serde_json::to_vec(t).unwrap_or_default());
    }

    /// The generated text received so far.
    fn received_text(&self) -> String {
        if self.text.is_empty() {
            return String::new();
        }
        let mut array = self.text.clone();
        array.push(b']');
        serde_json::from_slice::<Vec<String>>(&array)
            .map(|pieces| pieces.concat())
            .unwrap_or_default()
    }

    /// The stream ended normally (`[DONE]`, `message_stop`).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Whether the upstream reported the output tokens itself.
    pub fn reported(&self) -> bool {
        self.completion.is_some()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The usage to bill: what the upstream reported, else the prompt estimate and the received
    /// text counted with the tokenizer.
    pub fn usage(&self, prompt_estimate: u64) -> Usage {
        Usage {
            prompt: self.prompt.unwrap_or(prompt_estimate),
            completion: self
                .completion
                .unwrap_or_else(|| tokens::count(&self.model, &self.received_text())),
        }
    }
}

/// The payload of a `data:` line (without the optional space and a trailing `\r`).
fn data_payload(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"data:")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// End (exclusive) of the first complete event: after its blank line (`\n\n` or `\r\n\r\n`).
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The JSON string (quotes included, escapes kept) right after `key` in `data`, if it is a string.
fn json_string_after<'a>(data: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = memmem::find(data, key)? + key.len();
    let rest = &data[start..];
    let skip = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let rest = &rest[skip..];
    if rest.first() != Some(&b'"') {
        return None;
    }
    let mut escaped = false;
    for (i, &b) in rest.iter().enumerate().skip(1) {
        match b {
            b'\\' if !escaped => escaped = true,
            b'"' if !escaped => return Some(&rest[..=i]),
            _ => escaped = false,
        }
    }
    None
}

/// Take out the `"usage":null` OpenAI adds to every chunk when usage was requested.
fn remove_usage_null(event: Bytes) -> Bytes {
    const PATTERNS: [&[u8]; 2] = [b",\"usage\":null", b"\"usage\":null,"];
    let Some((at, len)) = PATTERNS.iter().find_map(|p| {
        event
            .windows(p.len())
            .position(|w| w == *p)
            .map(|i| (i, p.len()))
    }) else {
        return event;
    };
    let mut out = BytesMut::with_capacity(event.len() - len);
    out.extend_from_slice(&event[..at]);
    out.extend_from_slice(&event[at + len..]);
    remove_usage_null(out.freeze())
}

/// Usage in a complete (non-streamed) JSON response; text counted when usage is missing.
pub fn json_usage(provider: Provider, model: &str, body: &[u8], prompt_estimate: u64) -> Usage {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let u = &v["usage"];
    let field = |names: [&str; 2]| names.iter().find_map(|n| u[*n].as_u64());
    let (prompt, completion) = match provider {
        Provider::OpenAi => (
            field(["prompt_tokens", "input_tokens"]),
            field(["completion_tokens", "output_tokens"]),
        ),
        Provider::Anthropic => (
            field(["input_tokens", "prompt_tokens"]),
            field(["output_tokens", "completion_tokens"]),
        ),
    };
    let completion = completion.unwrap_or_else(|| {
        let mut text = String::new();
        for c in v["choices"].as_array().into_iter().flatten() {
            text.push_str(
                c["message"]["content"]
                    .as_str()
                    .or(c["text"].as_str())
                    .unwrap_or(""),
            );
        }
        for c in v["content"].as_array().into_iter().flatten() {
            text.push_str(c["text"].as_str().unwrap_or(""));
        }
        tokens::count(model, &text)
    });
    Usage {
        prompt: prompt.unwrap_or(prompt_estimate),
        completion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai_stream(with_usage: bool) -> String {
        let usage_null = if with_usage { ",\"usage\":null" } else { "" };
        let mut s = String::new();
        for w in [" the", " of", " and"] {
            s += &format!(
                "data: {{\"id\":\"x\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}},\"finish_reason\":null}}]{usage_null}}}\n\n"
            );
        }
        if with_usage {
            s += "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3,\"total_tokens\":14}}\n\n";
        }
        s + "data: [DONE]\n\n"
    }

    /// Feed `s` cut every `step` bytes; return what the client gets.
    fn run(meter: &mut StreamMeter, s: &str, step: usize) -> String {
        let mut out = Vec::new();
        for piece in s.as_bytes().chunks(step) {
            meter.feed(Bytes::copy_from_slice(piece), &mut out);
        }
        meter.flush(&mut out);
        out.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn reads_openai_usage_across_any_chunk_boundaries() {
        for step in [1, 2, 7, 64, 4096] {
            let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", false);
            let forwarded = run(&mut m, &openai_stream(true), step);
            assert_eq!(forwarded, openai_stream(true), "pass-through is untouched");
            assert_eq!(
                m.usage(0),
                Usage {
                    prompt: 11,
                    completion: 3
                }
            );
            assert!(m.finished() && m.reported());
        }
    }

    #[test]
    fn injected_usage_is_read_then_removed_from_what_the_client_gets() {
        for step in [1, 5, 4096] {
            let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", true);
            let forwarded = run(&mut m, &openai_stream(true), step);
            assert_eq!(
                forwarded,
                openai_stream(false),
                "exactly the stream without usage"
            );
            assert_eq!(
                m.usage(0),
                Usage {
                    prompt: 11,
                    completion: 3
                }
            );
        }
    }

    #[test]
    fn without_reported_usage_the_received_text_is_counted() {
        let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", false);
        let cut = &openai_stream(false)[..150];
        run(&mut m, cut, 10);
        assert!(!m.reported());
        assert_eq!(
            m.usage(42),
            Usage {
                prompt: 42,
                completion: 1
            },
            "one full delta received"
        );
    }

    #[test]
    fn crlf_event_endings_are_events_too() {
        let s = openai_stream(true).replace("\n\n", "\r\n\r\n");
        let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", true);
        let out = run(&mut m, &s, 7);
        assert_eq!(out, openai_stream(false).replace("\n\n", "\r\n\r\n"));
        assert_eq!(
            m.usage(0),
            Usage {
                prompt: 11,
                completion: 3
            }
        );
    }

    #[test]
    fn reads_anthropic_usage_events() {
        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
                 event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" the\"}}\n\n\
                 event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n\
                 event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut m = StreamMeter::new(Provider::Anthropic, "claude-3-5-haiku", true);
        assert_eq!(run(&mut m, s, 3), s, "Anthropic streams are never altered");
        assert_eq!(
            m.usage(0),
            Usage {
                prompt: 25,
                completion: 7
            }
        );
        assert!(m.finished());
    }

    #[test]
    fn json_usage_with_and_without_usage() {
        let body = br#"{"choices":[{"message":{"content":" the of"}}],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#;
        assert_eq!(
            json_usage(Provider::OpenAi, "gpt-4o", body, 0),
            Usage {
                prompt: 9,
                completion: 2
            }
        );
        let body = br#"{"content":[{"type":"text","text":" the of and"}]}"#;
        assert_eq!(
            json_usage(Provider::Anthropic, "claude", body, 5),
            Usage {
                prompt: 5,
                completion: 3
            }
        );
    }
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    #[test]
    fn escaped_text_is_kept_and_decoded_only_when_needed() {
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\" say \\\"hi\\\"\\n\"}}]}\n\n";
        let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o", false);
        let mut out = Vec::new();
        m.feed(Bytes::from(s), &mut out);
        assert_eq!(m.received_text(), " say \"hi\"\n");
        assert_eq!(
            json_string_after(b"{\"a\": \"x\\\\\"}", b"\"a\":"),
            Some(&b"\"x\\\\\""[..])
        );
        assert_eq!(json_string_after(b"{\"a\":null}", b"\"a\":"), None);
    }
}
