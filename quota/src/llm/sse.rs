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
//!
//! The meter is bounded, whatever the upstream sends:
//! - memory: one line (pass-through) or event (strip mode) is held up to
//!   [`MeterLimits::max_event`] bytes; the generated text kept for the tokenizer up to
//!   [`MeterLimits::max_text`] bytes, the rest of it is counted by bytes;
//! - work: each byte is searched for a line or event end once (the search resumes where it
//!   stopped), and each complete line or event is read once.
//!
//! A line or event longer than the limit *overflows* the meter: it stops metering that stream
//! (nothing after is read), forwards every byte unchanged from there on (strip mode sends what it
//! held as it is and turns into pass-through, so the client may then see the injected usage), and
//! [`StreamMeter::usage`] counts what it could not read by [`BYTES_PER_TOKEN`] unless the upstream
//! had reported the output tokens before. The outcome does not depend on how the stream was cut
//! into chunks: the limit applies to the length of a line or event, not to what is buffered.

use super::ceiling::text_keys;
use super::{Provider, Usage, tokens};
use bytes::{Bytes, BytesMut};
use memchr::{memchr, memmem};

/// Longest line (pass-through) or event (strip mode) the meter reads: 1 MiB. Real SSE events are
/// a few hundred bytes; only a broken or hostile upstream sends more before a line end.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Generated text (escaped JSON strings) kept for the tokenizer: 2 MiB, some 500k tokens, beyond
/// any model's output limit. Text past it is counted by [`BYTES_PER_TOKEN`].
pub const MAX_TEXT_BYTES: usize = 2 << 20;

/// Bytes per output token for what the meter could not count with the tokenizer (text past
/// [`MAX_TEXT_BYTES`]; the stream after an overflow). Four bytes per token is the usual figure for
/// English text; applied to raw SSE bytes it errs **high**, since the `data:` framing, JSON keys
/// and ids are counted as if they were text: an unreadable stream is over-billed, never free.
pub const BYTES_PER_TOKEN: u64 = 4;

/// The bounds of one [`StreamMeter`]; [`Default`] is [`MAX_EVENT_BYTES`] and [`MAX_TEXT_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterLimits {
    /// Longest line (pass-through) or event, blank line included (strip mode), in bytes.
    pub max_event: usize,
    /// Most bytes of generated text kept for the tokenizer.
    pub max_text: usize,
}

impl Default for MeterLimits {
    fn default() -> Self {
        Self {
            max_event: MAX_EVENT_BYTES,
            max_text: MAX_TEXT_BYTES,
        }
    }
}

#[derive(Debug)]
pub struct StreamMeter {
    provider: Provider,
    /// A Responses API stream (its events are told by their `type`), not chat or completions.
    responses: bool,
    model: String,
    strip_injected_usage: bool,
    limits: MeterLimits,
    /// A line not yet ended by `\n` (pass-through mode); at most `limits.max_event` bytes.
    line: Vec<u8>,
    /// An event not yet ended by a blank line (strip mode); at most `limits.max_event` bytes
    /// between two calls.
    event: BytesMut,
    /// How much of `event` was already searched for an event end: the search resumes there.
    scanned_to: usize,
    /// Stream offset of the first byte of the line or event being assembled.
    start: u64,
    /// Stream offset of the line or event that overflowed; nothing from there on was read.
    overflow_at: Option<u64>,
    reported: Reported,
    /// Generated text as a JSON array of the still-escaped string pieces (`["a","b"`), decoded
    /// only if the upstream never reports usage: most streams never pay for decoding.
    text: Vec<u8>,
    /// Bytes of text pieces not kept because `text` reached `limits.max_text`.
    text_dropped: u64,
    finished: bool,
    bytes: u64,
    /// Bytes searched for line and event ends: lets tests check the work is linear.
    #[cfg(test)]
    searched: u64,
}

/// Usage as an upstream reported it, in its own terms, each kind when it was reported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Reported {
    /// OpenAI `prompt_tokens`/`input_tokens` (cached ones included); Anthropic `input_tokens`
    /// (cache writes and reads excluded).
    input: Option<u64>,
    /// `completion_tokens`/`output_tokens` (reasoning included).
    output: Option<u64>,
    /// OpenAI `prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens`.
    cached: Option<u64>,
    /// Anthropic `cache_creation_input_tokens`.
    cache_write: Option<u64>,
    /// Anthropic `cache_read_input_tokens`.
    cache_read: Option<u64>,
    /// OpenAI `completion_tokens_details.reasoning_tokens` / `output_tokens_details.reasoning_tokens`.
    reasoning: Option<u64>,
}

impl Reported {
    /// Take the counts of one `usage` object (a later report of a kind replaces an earlier one:
    /// Anthropic's counts are cumulative).
    fn merge(&mut self, u: &serde_json::Value) {
        if !u.is_object() {
            return;
        }
        let first = |names: &[&str]| names.iter().find_map(|n| u[*n].as_u64());
        let detail = |objs: [&str; 2], field: &str| objs.iter().find_map(|o| u[*o][field].as_u64());
        self.input = first(&["prompt_tokens", "input_tokens"]).or(self.input);
        self.output = first(&["completion_tokens", "output_tokens"]).or(self.output);
        self.cached = detail(
            ["prompt_tokens_details", "input_tokens_details"],
            "cached_tokens",
        )
        .or(self.cached);
        self.cache_write = first(&["cache_creation_input_tokens"]).or(self.cache_write);
        self.cache_read = first(&["cache_read_input_tokens"]).or(self.cache_read);
        self.reasoning = detail(
            ["completion_tokens_details", "output_tokens_details"],
            "reasoning_tokens",
        )
        .or(self.reasoning);
    }

    /// The usage per kind: cached tokens taken out of the input they are part of (OpenAI), the
    /// prompt estimate for an input never reported, `completion` as given.
    fn usage(&self, prompt_estimate: u64, completion: u64) -> Usage {
        let cached = self.cached.unwrap_or(0);
        Usage {
            prompt: self.input.unwrap_or(prompt_estimate).saturating_sub(cached),
            cached_input: cached,
            cache_write: self.cache_write.unwrap_or(0),
            cache_read: self.cache_read.unwrap_or(0),
            completion,
            reasoning: self.reasoning.unwrap_or(0).min(completion),
        }
    }
}

impl StreamMeter {
    pub fn new(provider: Provider, model: &str, strip_injected_usage: bool) -> Self {
        Self::with_limits(
            provider,
            model,
            strip_injected_usage,
            MeterLimits::default(),
        )
    }

    /// A meter for an OpenAI Responses API stream: told apart at the start, so chat chunks are
    /// never scanned for an event type they do not have.
    pub fn for_responses(model: &str) -> Self {
        Self {
            responses: true,
            ..Self::new(Provider::OpenAi, model, false)
        }
    }

    /// A meter with other bounds than the defaults (tests, or a route that expects huge events).
    pub fn with_limits(
        provider: Provider,
        model: &str,
        strip_injected_usage: bool,
        limits: MeterLimits,
    ) -> Self {
        Self {
            provider,
            responses: false,
            model: model.to_string(),
            strip_injected_usage: strip_injected_usage && provider == Provider::OpenAi,
            limits,
            line: Vec::new(),
            event: BytesMut::new(),
            scanned_to: 0,
            start: 0,
            overflow_at: None,
            reported: Reported::default(),
            text: Vec::new(),
            text_dropped: 0,
            finished: false,
            bytes: 0,
            #[cfg(test)]
            searched: 0,
        }
    }

    /// Read `chunk`; append what the client should receive to `out`.
    pub fn feed(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        self.bytes += chunk.len() as u64;
        if self.overflow_at.is_some() {
            out.push(chunk);
        } else if self.strip_injected_usage {
            self.feed_events(&chunk, out);
        } else {
            self.feed_lines(&chunk);
            out.push(chunk);
        }
    }

    /// Pass-through mode: read the complete lines of `chunk`, keep its unended tail.
    fn feed_lines(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = memchr(b'\n', rest) {
            self.count_searched(nl + 1);
            let len = self.line.len() + nl;
            if len > self.limits.max_event {
                self.overflow(None);
                return;
            }
            if self.line.is_empty() {
                self.on_line(&rest[..nl]);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&rest[..nl]);
                self.on_line(&line);
            }
            self.start += len as u64 + 1;
            rest = &rest[nl + 1..];
        }
        self.count_searched(rest.len());
        // The line is already longer than the limit, wherever it ends.
        if self.line.len() + rest.len() > self.limits.max_event {
            self.overflow(None);
            return;
        }
        self.line.extend_from_slice(rest);
    }

    /// Strip mode: hold `chunk` with the unended event, send on each complete event filtered.
    fn feed_events(&mut self, chunk: &[u8], out: &mut Vec<Bytes>) {
        self.event.extend_from_slice(chunk);
        while let Some(end) = self.next_event_end() {
            if end > self.limits.max_event {
                self.overflow(Some(out));
                return;
            }
            let event = self.event.split_to(end).freeze();
            self.scanned_to = 0;
            self.start += end as u64;
            if let Some(kept) = self.filter_event(event) {
                out.push(kept);
            }
        }
        // The event is already longer than the limit, wherever it ends.
        if self.event.len() > self.limits.max_event {
            self.overflow(Some(out));
        }
    }

    /// End (exclusive) of the first complete event in `event`: after its blank line (`\n\n` or
    /// `\r\n\r\n`). Searches only what earlier calls did not; a blank line found at the edge of
    /// the last search is still seen, as the look-back is within the held event.
    fn next_event_end(&mut self) -> Option<usize> {
        let buf = &self.event[..];
        let mut from = self.scanned_to;
        let mut found = None;
        while let Some(i) = memchr(b'\n', &buf[from..]) {
            let nl = from + i;
            from = nl + 1;
            if (nl >= 1 && buf[nl - 1] == b'\n') || (nl >= 3 && &buf[nl - 3..nl] == b"\r\n\r") {
                found = Some(from);
                break;
            }
        }
        if found.is_none() {
            from = buf.len();
        }
        self.count_searched(from - self.scanned_to);
        self.scanned_to = from;
        found
    }

    /// Stop metering: the line or event that began at `self.start` is too long. Strip mode sends
    /// what it held, unchanged, to `out`.
    fn overflow(&mut self, out: Option<&mut Vec<Bytes>>) {
        self.overflow_at = Some(self.start);
        if let Some(out) = out
            && !self.event.is_empty()
        {
            out.push(self.event.split().freeze());
        }
        // Give the memory back: this stream is not buffered again.
        self.event = BytesMut::new();
        self.line = Vec::new();
        self.scanned_to = 0;
    }

    #[cfg(test)]
    fn count_searched(&mut self, n: usize) {
        self.searched += n as u64;
    }

    #[cfg(not(test))]
    fn count_searched(&mut self, _n: usize) {}

    /// Bytes still held back (an incomplete event); sent when the stream ends.
    pub fn flush(&mut self, out: &mut Vec<Bytes>) {
        if !self.event.is_empty() {
            if self.event.len() > self.limits.max_event {
                self.overflow(Some(out));
                return;
            }
            let rest = self.event.split().freeze();
            self.scanned_to = 0;
            self.start += rest.len() as u64;
            if let Some(kept) = self.filter_event(rest) {
                out.push(kept);
            }
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.start += line.len() as u64;
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

    /// Keep every escaped JSON string that follows one of `keys` (e.g. `"content":`) in `data`:
    /// the same generated text the output ceiling counts (tool arguments, reasoning and
    /// thinking included), of every choice.
    fn keep_texts(&mut self, data: &[u8], keys: &[memmem::Finder<'_>]) {
        for key in keys {
            for at in key.find_iter(data) {
                if let Some(raw) = json_string_at(&data[at + key.needle().len()..]) {
                    self.keep_piece(raw);
                }
            }
        }
    }

    /// Add one JSON string (quotes included) to `text`, or count it once `text` is full. Pieces
    /// are at least 2 bytes (the quotes), so `text_dropped > 0` means full: later pieces are
    /// counted too, even small ones, so the kept text stays a prefix of the generated text.
    fn keep_piece(&mut self, piece: &[u8]) {
        if self.text_dropped > 0 || self.text.len() + 1 + piece.len() > self.limits.max_text {
            self.text_dropped += piece.len() as u64;
            return;
        }
        self.text
            .push(if self.text.is_empty() { b'[' } else { b',' });
        self.text.extend_from_slice(piece);
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
                if self.responses {
                    if let Some(kind) = top_level_str(data, b"type") {
                        self.on_responses_event(kind, data);
                    }
                    return false;
                }
                if finder!(b"\"usage\":{").find(data).is_none() {
                    self.keep_texts(data, text_keys(Provider::OpenAi));
                    return false;
                }
                let Ok(c) = serde_json::from_slice::<serde_json::Value>(data) else {
                    return false;
                };
                let choices = c["choices"].as_array().map_or(&[][..], Vec::as_slice);
                for ch in choices {
                    for t in choice_texts(&ch["delta"]).chain(ch["text"].as_str()) {
                        self.push_text(t);
                    }
                }
                if c["usage"].is_object() {
                    self.reported.merge(&c["usage"]);
                    choices.is_empty()
                } else {
                    false
                }
            }
            Provider::Anthropic => {
                if finder!(b"\"type\":\"content_block_delta\"")
                    .find(data)
                    .is_some()
                {
                    self.keep_texts(data, text_keys(Provider::Anthropic));
                    return false;
                }
                let Ok(e) = serde_json::from_slice::<serde_json::Value>(data) else {
                    return false;
                };
                match e["type"].as_str().unwrap_or("") {
                    "message_start" => {
                        // Its output count is provisional (1): the real one comes with
                        // `message_delta`, and a stream cut before that counts its text.
                        let output = self.reported.output;
                        self.reported.merge(&e["message"]["usage"]);
                        self.reported.output = output;
                    }
                    // Cumulative counts of the message so far (cache counts when present).
                    "message_delta" => self.reported.merge(&e["usage"]),
                    "message_stop" => self.finished = true,
                    _ => {}
                }
                false
            }
        }
    }

    /// One event of a Responses API stream: text deltas are kept, the final event
    /// (`response.completed`, `response.failed`, `response.incomplete`) carries the usage and
    /// ends the stream. Other events (`…done` events repeat the whole text) are not read.
    /// The kind is the event's own top-level `type`: a `.delta` or `response.completed` inside a
    /// string the client chose (metadata, instructions) must not change how the event is read.
    fn on_responses_event(&mut self, kind: &[u8], data: &[u8]) {
        if kind.ends_with(b".delta") {
            if let Some(raw) = json_string_after(data, finder!(b"\"delta\":")) {
                self.keep_piece(raw);
            }
            return;
        }
        let last: [&[u8]; 3] = [
            b"response.completed",
            b"response.failed",
            b"response.incomplete",
        ];
        if !last.contains(&kind) {
            return;
        }
        if let Ok(e) = serde_json::from_slice::<serde_json::Value>(data) {
            self.reported.merge(&e["response"]["usage"]);
        }
        self.finished = true;
    }

    fn push_text(&mut self, t: &str) {
        // Re-escaped so the buffer stays one JSON array; serializing a str cannot fail.
        let piece = serde_json::to_vec(t).unwrap_or_default();
        self.keep_piece(&piece);
    }

    /// The generated text kept (all of it unless past `limits.max_text`).
    fn received_text(&self) -> String {
        decode_pieces(&self.text)
    }

    /// The stream ended normally (`[DONE]`, `message_stop`).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Whether the upstream reported the output tokens itself.
    pub fn reported(&self) -> bool {
        self.reported.output.is_some()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A line or event was longer than the limit: the rest of the stream was forwarded unread
    /// and [`usage`](Self::usage) counts it by bytes unless usage was reported before.
    pub fn overflowed(&self) -> bool {
        self.overflow_at.is_some()
    }

    /// Bytes held back right now (an unended line or event): at most the limit once `feed`
    /// returns.
    pub fn buffered(&self) -> usize {
        self.line.len() + self.event.len()
    }

    /// The usage to bill: what the upstream reported, else the prompt estimate and the output
    /// counted: the kept text with the tokenizer, what was not kept or not read (text past the
    /// text limit, the stream from an overflow on) at [`BYTES_PER_TOKEN`], rounded up.
    pub fn usage(&self, prompt_estimate: u64) -> Usage {
        let completion = self.reported.output.unwrap_or_else(|| {
            let unread = self.overflow_at.map_or(0, |at| self.bytes - at);
            tokens::count(&self.model, &self.received_text())
                + (self.text_dropped + unread).div_ceil(BYTES_PER_TOKEN)
        });
        self.reported.usage(prompt_estimate, completion)
    }
}

/// Escaped JSON string pieces kept as an unterminated array (`["a","b"`), as one text.
pub(crate) fn decode_pieces(array: &[u8]) -> String {
    if array.is_empty() {
        return String::new();
    }
    let mut a = Vec::with_capacity(array.len() + 1);
    a.extend_from_slice(array);
    a.push(b']');
    serde_json::from_slice::<Vec<String>>(&a)
        .map(|pieces| pieces.concat())
        .unwrap_or_default()
}

/// The payload of a `data:` line (without the optional space and a trailing `\r`).
pub(crate) fn data_payload(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"data:")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// The value (escapes kept, quotes removed) of the string member `key` of the top-level JSON
/// object in `data`, found by scanning: members of nested objects and text inside strings do not
/// count. `None` when there is no such member or its value is not a string.
pub(crate) fn top_level_str<'a>(data: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut depth = 0u32;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => {
                let s = json_string_at(&data[i..])?;
                i += s.len();
                if depth == 1 && &s[1..s.len() - 1] == key {
                    let rest = &data[i..];
                    let skip = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
                    if rest.get(skip) == Some(&b':') {
                        let v = json_string_at(&rest[skip + 1..])?;
                        return Some(&v[1..v.len() - 1]);
                    }
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The generated text of an OpenAI chat message or delta: content, refusal, reasoning, and the
/// arguments of its tool calls.
fn choice_texts(m: &serde_json::Value) -> impl Iterator<Item = &str> {
    ["content", "refusal", "reasoning_content", "reasoning"]
        .into_iter()
        .filter_map(|k| m[k].as_str())
        .chain(
            m["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["function"]["arguments"].as_str()),
        )
}

/// The JSON string (quotes included, escapes kept) right after `key` in `data`, if it is a string.
fn json_string_after<'a>(data: &'a [u8], key: &memmem::Finder<'_>) -> Option<&'a [u8]> {
    let start = key.find(data)? + key.needle().len();
    json_string_at(&data[start..])
}

/// The JSON string (quotes included, escapes kept) at the start of `rest`, after whitespace.
pub(crate) fn json_string_at(rest: &[u8]) -> Option<&[u8]> {
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

/// Take out the `"usage":null` OpenAI adds to every chunk when usage was requested, with the
/// comma before it (or after it, when it is the first field). One pass over the event.
fn remove_usage_null(event: Bytes) -> Bytes {
    const FIELD: &[u8] = b"\"usage\":null";
    let mut out: Option<BytesMut> = None;
    // `event[..copied]` is dealt with: copied to `out` or cut.
    let mut copied = 0;
    for at in finder!(FIELD).find_iter(&event) {
        let end = at + FIELD.len();
        let (cut_from, cut_to) = if at > copied && event[at - 1] == b',' {
            (at - 1, end)
        } else if event.get(end) == Some(&b',') {
            (at, end + 1)
        } else {
            continue;
        };
        let o = out.get_or_insert_with(|| BytesMut::with_capacity(event.len()));
        o.extend_from_slice(&event[copied..cut_from]);
        copied = cut_to;
    }
    match out {
        None => event,
        Some(mut o) => {
            o.extend_from_slice(&event[copied..]);
            o.freeze()
        }
    }
}

/// Usage in a complete (non-streamed) JSON response (chat, completions, Responses API,
/// embeddings, Anthropic messages); the generated text counted when usage is missing. `None`
/// when the body is not a JSON object (compressed, HTML, a stream sent as plain JSON): what was
/// produced is unknown, so the caller bills what it reserved.
pub fn json_usage(
    _provider: Provider,
    model: &str,
    body: &[u8],
    prompt_estimate: u64,
) -> Option<Usage> {
    /// The usage object alone: the rest of the body is skipped, not built into a tree.
    #[derive(serde::Deserialize)]
    struct UsageOnly {
        #[serde(default)]
        usage: serde_json::Value,
    }
    // An object only (serde would read a struct from an array too).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let u = serde_json::from_slice::<UsageOnly>(body).ok()?;
    let mut r = Reported::default();
    r.merge(&u.usage);
    if let Some(output) = r.output {
        return Some(r.usage(prompt_estimate, output));
    }
    // No output reported: the text is counted, every kind the model generates.
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut text = String::new();
    let mut add = |t: &str| text.push_str(t);
    for c in v["choices"].as_array().into_iter().flatten() {
        choice_texts(&c["message"])
            .chain(c["text"].as_str())
            .for_each(&mut add);
    }
    for c in v["content"].as_array().into_iter().flatten() {
        ["text", "thinking"]
            .into_iter()
            .filter_map(|k| c[k].as_str())
            .for_each(&mut add);
        if c["type"] == "tool_use" {
            add(&c["input"].to_string());
        }
    }
    // Responses API: message text, function call arguments, reasoning summaries.
    for item in v["output"].as_array().into_iter().flatten() {
        for part in ["content", "summary"] {
            for c in item[part].as_array().into_iter().flatten() {
                ["text", "refusal"]
                    .into_iter()
                    .filter_map(|k| c[k].as_str())
                    .for_each(&mut add);
            }
        }
        item["arguments"].as_str().into_iter().for_each(&mut add);
    }
    let completion = tokens::count(model, &text);
    Some(r.usage(prompt_estimate, completion))
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
            assert_eq!(m.usage(0), Usage::plain(11, 3));
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
            assert_eq!(m.usage(0), Usage::plain(11, 3));
        }
    }

    #[test]
    fn without_reported_usage_the_received_text_is_counted() {
        let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", false);
        let cut = &openai_stream(false)[..150];
        run(&mut m, cut, 10);
        assert!(!m.reported());
        assert_eq!(m.usage(42), Usage::plain(42, 1), "one full delta received");
    }

    #[test]
    fn crlf_event_endings_are_events_too() {
        let s = openai_stream(true).replace("\n\n", "\r\n\r\n");
        let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", true);
        let out = run(&mut m, &s, 7);
        assert_eq!(out, openai_stream(false).replace("\n\n", "\r\n\r\n"));
        assert_eq!(m.usage(0), Usage::plain(11, 3));
    }

    #[test]
    fn reads_anthropic_usage_events() {
        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
                 event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" the\"}}\n\n\
                 event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n\
                 event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut m = StreamMeter::new(Provider::Anthropic, "claude-3-5-haiku", true);
        assert_eq!(run(&mut m, s, 3), s, "Anthropic streams are never altered");
        assert_eq!(m.usage(0), Usage::plain(25, 7));
        assert!(m.finished());
    }

    #[test]
    fn json_usage_with_and_without_usage() {
        let body = br#"{"choices":[{"message":{"content":" the of"}}],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#;
        assert_eq!(
            json_usage(Provider::OpenAi, "gpt-4o", body, 0),
            Some(Usage::plain(9, 2))
        );
        let body = br#"{"content":[{"type":"text","text":" the of and"}]}"#;
        assert_eq!(
            json_usage(Provider::Anthropic, "claude", body, 5),
            Some(Usage::plain(5, 3))
        );
        // Not JSON (a compressed or HTML body): unknown, never "no output".
        for body in [
            &b"\x1f\x8b\x08\x00"[..],
            b"<html>oops</html>",
            b"data: {}\n\n",
            b"[]",
            b"",
        ] {
            assert_eq!(json_usage(Provider::OpenAi, "gpt-4o", body, 5), None);
        }
        // No usage: tool arguments, refusals, reasoning and thinking are output too.
        let body = br#"{"choices":[{"message":{"content":null,"tool_calls":[{"function":{"name":"f","arguments":" the of"}}]}},{"message":{"refusal":" and"}}]}"#;
        assert_eq!(
            json_usage(Provider::OpenAi, "gpt-4o", body, 5),
            Some(Usage::plain(5, 3))
        );
        let body =
            br#"{"content":[{"type":"thinking","thinking":" the"},{"type":"text","text":" of"}]}"#;
        assert_eq!(
            json_usage(Provider::Anthropic, "claude", body, 0),
            Some(Usage::plain(0, 2))
        );
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    fn run(meter: &mut StreamMeter, s: &str, step: usize) {
        let mut out = Vec::new();
        for piece in s.as_bytes().chunks(step) {
            meter.feed(Bytes::copy_from_slice(piece), &mut out);
        }
        meter.flush(&mut out);
    }

    #[test]
    fn openai_cached_and_reasoning_tokens_are_their_own_kinds() {
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\" the\"}}]}\n\n\
                 data: {\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":30,\
                 \"prompt_tokens_details\":{\"cached_tokens\":64},\"completion_tokens_details\":{\"reasoning_tokens\":12}}}\n\n\
                 data: [DONE]\n\n";
        let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o", false);
        run(&mut m, s, 9);
        let u = m.usage(0);
        assert_eq!(
            (u.prompt, u.cached_input, u.completion, u.reasoning),
            (36, 64, 30, 12),
            "cached out of the input, reasoning inside the output"
        );
        assert_eq!(u.total(), 130);
    }

    #[test]
    fn anthropic_cache_writes_and_reads_come_on_top_of_the_input() {
        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"cache_creation_input_tokens\":300,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n\
                 event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" the\"}}\n\n\
                 event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9,\"cache_read_input_tokens\":50}}\n\n\
                 event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut m = StreamMeter::new(Provider::Anthropic, "claude", false);
        run(&mut m, s, 11);
        let u = m.usage(0);
        assert_eq!(
            (u.prompt, u.cache_write, u.cache_read, u.completion),
            (20, 300, 50, 9)
        );
    }

    fn responses_stream(last: &str, with_usage: bool) -> String {
        let mut s = String::from(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n",
        );
        for w in [" the", " of", " and"] {
            s += &format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"item_id\":\"m\",\"delta\":\"{w}\"}}\n\n"
            );
        }
        s += "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"text\":\" the of and\"}\n\n";
        let usage = if with_usage {
            "{\"input_tokens\":40,\"input_tokens_details\":{\"cached_tokens\":8},\"output_tokens\":10,\"output_tokens_details\":{\"reasoning_tokens\":7}}"
        } else {
            "null"
        };
        s + &format!(
            "event: {last}\ndata: {{\"type\":\"{last}\",\"response\":{{\"output\":[{{\"content\":[{{\"text\":\" the of and\"}}]}}],\"usage\":{usage}}}}}\n\n"
        )
    }

    #[test]
    fn responses_streams_are_billed_from_their_last_event() {
        for last in [
            "response.completed",
            "response.incomplete",
            "response.failed",
        ] {
            for step in [1, 13, 4096] {
                let mut m = StreamMeter::for_responses("gpt-4o");
                run(&mut m, &responses_stream(last, true), step);
                assert!(m.finished() && m.reported(), "{last}");
                let u = m.usage(0);
                assert_eq!(
                    (u.prompt, u.cached_input, u.completion, u.reasoning),
                    (32, 8, 10, 7),
                    "{last} step {step}"
                );
            }
        }
        // Without usage: the deltas, counted once (not the `done` events that repeat them).
        let mut m = StreamMeter::for_responses("gpt-4o");
        run(&mut m, &responses_stream("response.completed", false), 7);
        assert_eq!(m.usage(5), Usage::plain(5, 3));
    }

    /// The client chooses strings the final event repeats (metadata, instructions): one ending
    /// in `.delta` must not turn `response.completed` into a text delta and lose its usage.
    #[test]
    fn client_strings_do_not_change_how_an_event_is_read() {
        let s = responses_stream("response.completed", true).replace(
            "\"response\":{\"output\"",
            "\"response\":{\"metadata\":{\"k\":\"x.delta\",\"type\":\"response.output_text.delta\"},\"output\"",
        );
        assert!(s.contains("x.delta"));
        let mut m = StreamMeter::for_responses("gpt-4o");
        run(&mut m, &s, 64);
        assert!(m.finished() && m.reported());
        assert_eq!(m.usage(0).completion, 10);
        // A chat chunk whose text looks like a Responses event is still a chat chunk.
        let chat = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"type\\\":\\\"response.completed\\\"\"}}]}\n\n";
        let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o", false);
        run(&mut m, chat, 5);
        assert!(!m.finished());
        assert!(m.usage(0).completion > 0);
    }

    /// A stream that never reports usage is counted from all it generated: tool arguments,
    /// reasoning, thinking, and every choice.
    #[test]
    fn counted_output_includes_tools_reasoning_and_every_choice() {
        let chat = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" the\"}},{\"index\":1,\"delta\":{\"content\":\" of\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\" and\"}}]}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"reasoning_content\":\" the\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"reasoning\":\" of\"}}]}\n\n";
        let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o", false);
        run(&mut m, chat, 7);
        assert_eq!(m.usage(0), Usage::plain(0, 5));
        let anthropic = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n\
                         event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\" the of\"}}\n\n\
                         event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\" and\"}}\n\n";
        let mut m = StreamMeter::new(Provider::Anthropic, "claude", false);
        run(&mut m, anthropic, 7);
        assert_eq!(m.usage(0).completion, 3);
    }

    #[test]
    fn top_level_members_are_told_from_nested_ones() {
        let d = br#"{"response":{"type":"response.completed"},"note":""type":"x"","type":"response.output_text.delta"}"#;
        assert_eq!(
            top_level_str(d, b"type"),
            Some(&b"response.output_text.delta"[..])
        );
        assert_eq!(top_level_str(br#"{"a":{"type":"x"}}"#, b"type"), None);
        assert_eq!(top_level_str(br#"{"type":1}"#, b"type"), None);
        assert_eq!(
            top_level_str(br#"{"type" : "t"}"#, b"type"),
            Some(&b"t"[..])
        );
    }

    #[test]
    fn plain_responses_and_embeddings_usage() {
        let body = br#"{"object":"response","output":[{"type":"message","content":[{"type":"output_text","text":" the"}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":2},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":4}}}"#;
        let u = json_usage(Provider::OpenAi, "gpt-4o", body, 0).expect("usage");
        assert_eq!(
            (u.prompt, u.cached_input, u.completion, u.reasoning),
            (10, 2, 5, 4)
        );
        let body = br#"{"object":"list","data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":7,"total_tokens":7}}"#;
        assert_eq!(
            json_usage(Provider::OpenAi, "e", body, 0),
            Some(Usage::plain(7, 0))
        );
        let body = br#"{"content":[{"type":"text","text":"x"}],"usage":{"input_tokens":3,"cache_creation_input_tokens":10,"cache_read_input_tokens":20,"output_tokens":2}}"#;
        let u = json_usage(Provider::Anthropic, "claude", body, 0).expect("usage");
        assert_eq!(
            (u.prompt, u.cache_write, u.cache_read, u.completion),
            (3, 10, 20, 2)
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
            json_string_after(b"{\"a\": \"x\\\\\"}", &memmem::Finder::new(b"\"a\":")),
            Some(&b"\"x\\\\\""[..])
        );
        assert_eq!(
            json_string_after(b"{\"a\":null}", &memmem::Finder::new(b"\"a\":")),
            None
        );
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn feed_all(m: &mut StreamMeter, s: &[u8], step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in s.chunks(step) {
            m.feed(Bytes::copy_from_slice(piece), &mut out);
            assert!(
                m.buffered() <= m.limits.max_event + step,
                "held {} bytes",
                m.buffered()
            );
        }
        m.flush(&mut out);
        out.concat()
    }

    fn delta(text: &str) -> String {
        format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}\n\n"
        )
    }

    #[test]
    fn a_3_mib_line_without_newline_is_forwarded_unread_in_bounded_memory() {
        let mut s = delta(" the").into_bytes();
        let huge_from = s.len();
        s.extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"");
        s.resize(s.len() + 3 * MIB, b'a');
        s.extend_from_slice(b"\"}}]}\n\ndata: [DONE]\n\n");
        for strip in [false, true] {
            let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", strip);
            let out = feed_all(&mut m, &s, 64 * 1024);
            let want = if strip {
                // The first event is filtered as usual; from the huge one on, bytes go as they are.
                let mut w = delta(" the").replace(",\"usage\":null", "").into_bytes();
                w.extend_from_slice(&s[huge_from..]);
                w
            } else {
                s.clone()
            };
            assert!(out == want, "forwarded byte-exact (strip: {strip})");
            assert!(m.overflowed() && !m.reported() && !m.finished());
            assert_eq!(m.buffered(), 0);
            let unread = (s.len() - huge_from) as u64;
            assert_eq!(
                m.usage(7),
                Usage::plain(7, 1 + unread.div_ceil(BYTES_PER_TOKEN)),
                "the delta before by the tokenizer, the rest by bytes (strip: {strip})"
            );
        }
    }

    #[test]
    fn usage_reported_before_an_overflow_wins() {
        let mut s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25}}}\n\n\
                     event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n"
            .as_bytes()
            .to_vec();
        s.resize(s.len() + 2 * MIB, b'x');
        let mut m = StreamMeter::new(Provider::Anthropic, "claude", false);
        assert!(feed_all(&mut m, &s, 100_000) == s);
        assert!(m.overflowed());
        assert_eq!(m.usage(0), Usage::plain(25, 9));
    }

    #[test]
    fn an_event_fed_one_byte_at_a_time_is_searched_once() {
        let event = delta(&"b".repeat(200 * 1024));
        for strip in [false, true] {
            let mut m = StreamMeter::new(Provider::OpenAi, "gpt-4o-mini", strip);
            let out = feed_all(&mut m, event.as_bytes(), 1);
            assert!(!m.overflowed());
            // Linear: every byte looked at once for a line or event end, never again.
            assert!(
                m.searched <= event.len() as u64,
                "searched {} of {} bytes (strip: {strip})",
                m.searched,
                event.len()
            );
            let want = if strip {
                event.replace(",\"usage\":null", "")
            } else {
                event.clone()
            };
            assert!(out == want.as_bytes());
            assert_eq!(m.received_text().len(), 200 * 1024);
        }
    }

    #[test]
    fn an_event_just_under_the_limit_is_read_one_over_overflows() {
        let limits = MeterLimits {
            max_event: 64,
            max_text: MAX_TEXT_BYTES,
        };
        let event = delta("hi");
        let head = event.len() - "hi\"}}],\"usage\":null}\n\n".len();
        for (strip, len) in [(true, event.len()), (false, event.len() - 2)] {
            // `len` is what the limit measures: an event with its blank line, a line without `\n`.
            let pad = "x".repeat(64 - len);
            let fits = format!("{}{pad}{}", &event[..head], &event[head..]);
            let over = format!("{}{pad}x{}", &event[..head], &event[head..]);
            for step in [1, 5, 1000] {
                let mut m = StreamMeter::with_limits(Provider::OpenAi, "gpt-4o", strip, limits);
                feed_all(&mut m, fits.as_bytes(), step);
                assert!(!m.overflowed(), "strip {strip} step {step}");
                let mut m = StreamMeter::with_limits(Provider::OpenAi, "gpt-4o", strip, limits);
                assert!(feed_all(&mut m, over.as_bytes(), step) == over.as_bytes());
                assert!(m.overflowed(), "strip {strip} step {step}");
            }
        }
    }

    #[test]
    fn kept_text_is_bounded_and_the_rest_counted_by_bytes() {
        let limits = MeterLimits {
            max_event: MAX_EVENT_BYTES,
            max_text: 64,
        };
        let mut m = StreamMeter::with_limits(Provider::OpenAi, "gpt-4o-mini", false, limits);
        let s: String = (0..100).map(|_| delta(" the")).collect();
        feed_all(&mut m, s.as_bytes(), 10);
        assert!(m.text.len() <= 64);
        let kept = m.received_text();
        assert!(kept.starts_with(" the the"));
        let kept_pieces = kept.len() / 4;
        // Each dropped piece is `" the"`, quotes included: 6 bytes.
        let dropped = 6 * (100 - kept_pieces) as u64;
        assert_eq!(
            m.usage(0).completion,
            kept_pieces as u64 + dropped.div_ceil(BYTES_PER_TOKEN)
        );
    }

    #[test]
    fn usage_null_is_removed_in_one_pass() {
        for (event, want) in [
            (&b"{\"a\":1,\"usage\":null}"[..], &b"{\"a\":1}"[..]),
            (b"{\"usage\":null,\"a\":1}", b"{\"a\":1}"),
            (b"{\"usage\":null}", b"{\"usage\":null}"),
            (b"{\"usage\":null,\"usage\":null}", b"{\"usage\":null}"),
            (
                b"[{\"a\":1,\"usage\":null},{\"b\":2,\"usage\":null}]",
                b"[{\"a\":1},{\"b\":2}]",
            ),
        ] {
            assert_eq!(
                &remove_usage_null(Bytes::copy_from_slice(event))[..],
                want,
                "{}",
                String::from_utf8_lossy(event)
            );
        }
    }
}
