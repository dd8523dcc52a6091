//! Token counting with OpenAI's BPE encodings (`tiktoken-rs`, files bundled: works offline).
//!
//! The encoding follows the model family (o200k for gpt-4o/4.1/o-series, cl100k for gpt-4/3.5).
//! Other models (Claude, open-weight models) are counted with cl100k: a documented approximation
//! (typically within 10–20% of their own tokenizers). It only sizes reservations and the fallback
//! when an upstream never reports usage; reported usage always wins.

use serde_json::Value;
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

fn bpe(model: &str) -> &'static CoreBPE {
    match get_tokenizer(model) {
        Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony) => tiktoken_rs::o200k_base_singleton(),
        _ => tiktoken_rs::cl100k_base_singleton(),
    }
}

/// Load the encodings now (a few hundred milliseconds) rather than on the first LLM request.
pub fn warm_up() {
    let _ = (
        tiktoken_rs::cl100k_base_singleton(),
        tiktoken_rs::o200k_base_singleton(),
    );
}

/// Text is encoded in pieces of at most this many bytes (cut at a char boundary): BPE is
/// quadratic in the length of one pre-tokenized piece, and a pathological prompt (a million
/// spaces, one endless word) is one piece. Cutting changes counts only at the cuts (±1 each).
const PIECE: usize = 2048;

/// Tokens of `text` for `model`.
pub fn count(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let bpe = bpe(model);
    let mut total = 0u64;
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(PIECE);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        total = total.saturating_add(bpe.encode_ordinary(piece).len() as u64);
        rest = tail;
    }
    total
}

/// Prompt tokens per image when a route does not set `image_tokens`: the provider's documented
/// maximum. OpenAI: 85 base + 170 per 512 px tile, at most 6 tiles after scaling (1105); `low`
/// detail is 85. Anthropic: width × height / 750 for images scaled to at most 1.15 megapixels
/// (about 1600).
pub const OPENAI_IMAGE_TOKENS: u64 = 1105;
pub const OPENAI_LOW_DETAIL_IMAGE_TOKENS: u64 = 85;
pub const ANTHROPIC_IMAGE_TOKENS: u64 = 1600;
/// Anthropic adds a tool-use system prompt when `tools` are given (346 tokens for `auto`/`none`
/// tool choice on current models).
pub const ANTHROPIC_TOOL_SYSTEM_TOKENS: u64 = 346;

/// What a prompt holds besides its text, gathered while walking it.
#[derive(Default)]
struct Prompt {
    text: String,
    /// Tokens that do not come from text: images, fixed overheads.
    fixed: u64,
}

impl Prompt {
    fn tokens(&self, model: &str) -> u64 {
        count(model, &self.text).saturating_add(self.fixed)
    }

    /// Any JSON the provider bills as input in serialized form (tool definitions, arguments).
    fn json(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.text.push_str(s),
            Value::Null => {}
            other => self.text.push_str(&other.to_string()),
        }
        self.text.push('\n');
    }

    /// A message `content`: a string, or parts (text, images, tool calls and results).
    fn content(&mut self, content: &Value, image_tokens: u64, provider_openai: bool) {
        match content {
            Value::String(s) => self.text.push_str(s),
            Value::Array(parts) => {
                for p in parts {
                    self.part(p, image_tokens, provider_openai);
                }
            }
            _ => {}
        }
        self.text.push('\n');
    }

    fn part(&mut self, p: &Value, image_tokens: u64, provider_openai: bool) {
        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "image_url" | "input_image" => {
                let low = p
                    .get("image_url")
                    .and_then(|i| i.get("detail"))
                    .or_else(|| p.get("detail"))
                    .and_then(Value::as_str)
                    == Some("low");
                self.fixed = self.fixed.saturating_add(if low && provider_openai {
                    OPENAI_LOW_DETAIL_IMAGE_TOKENS.min(image_tokens)
                } else {
                    image_tokens
                });
            }
            // Anthropic: a document whose text is in the request is counted as text...
            "document" if p["source"]["type"] == "text" => {
                self.json(&p["source"]["data"]);
                for field in ["title", "context"] {
                    self.json(&p[field]);
                }
            }
            "document" if p["source"]["type"] == "content" => {
                self.content(&p["source"]["content"], image_tokens, provider_openai);
            }
            // ...and images, PDFs and files sent by reference at one image each (PDF pages are
            // billed as images and text; the reported usage settles the difference). OpenAI's
            // `file` and `input_file` parts likewise.
            "image" | "document" | "file" | "input_file" => {
                self.fixed = self.fixed.saturating_add(image_tokens);
            }
            "tool_use" => {
                if let Some(n) = p.get("name") {
                    self.json(n);
                }
                if let Some(i) = p.get("input") {
                    self.json(i);
                }
            }
            "tool_result" => {
                if let Some(c) = p.get("content") {
                    self.content(c, image_tokens, provider_openai);
                }
            }
            _ => {
                for field in ["text", "thinking", "input_audio"] {
                    if let Some(t) = p.get(field) {
                        self.json(t);
                    }
                }
            }
        }
    }
}

/// Prompt tokens of an OpenAI chat request, by OpenAI's accounting: 3 per message, the role,
/// the content (and name), tool calls and results, images, tool definitions, plus 3 to prime
/// the reply.
pub fn openai_chat_prompt(
    model: &str,
    messages: &[Value],
    tools: Option<&Value>,
    image_tokens: u64,
) -> u64 {
    let mut p = Prompt {
        fixed: 3u64.saturating_add(3u64.saturating_mul(messages.len() as u64)),
        ..Prompt::default()
    };
    for m in messages {
        for field in ["role", "name"] {
            if let Some(v) = m.get(field).and_then(Value::as_str) {
                p.text.push_str(v);
                p.text.push(' ');
            }
        }
        if let Some(c) = m.get("content") {
            p.content(c, image_tokens, true);
        }
        for call in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(f) = call.get("function") {
                p.json(&f["name"]);
                p.json(&f["arguments"]);
            }
        }
        if let Some(f) = m.get("function_call") {
            p.json(&f["name"]);
            p.json(&f["arguments"]);
        }
    }
    if let Some(t) = tools {
        p.json(t);
    }
    p.tokens(model)
}

/// Prompt tokens of an OpenAI Responses API request: `instructions`, the `input` (a string, or
/// items: messages with text or image parts, function calls and their outputs, anything else
/// in serialized form), tool definitions; 3 per item plus 3, as for chat.
pub fn openai_responses_prompt(
    model: &str,
    instructions: Option<&Value>,
    input: &Value,
    tools: Option<&Value>,
    image_tokens: u64,
) -> u64 {
    let mut p = Prompt {
        fixed: 3,
        ..Prompt::default()
    };
    if let Some(Value::String(s)) = instructions {
        p.text.push_str(s);
        p.text.push('\n');
    }
    match input {
        Value::String(s) => p.text.push_str(s),
        Value::Array(items) => {
            p.fixed = p
                .fixed
                .saturating_add(3u64.saturating_mul(items.len() as u64));
            for item in items {
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                match (kind, item) {
                    (_, Value::String(s)) => p.text.push_str(s),
                    ("message", _) => {
                        if let Some(r) = item.get("role").and_then(Value::as_str) {
                            p.text.push_str(r);
                            p.text.push(' ');
                        }
                        if let Some(c) = item.get("content") {
                            p.content(c, image_tokens, true);
                        }
                    }
                    ("function_call", _) => {
                        p.json(&item["name"]);
                        p.json(&item["arguments"]);
                    }
                    ("function_call_output", _) => p.json(&item["output"]),
                    _ => p.json(item),
                }
            }
        }
        other => p.json(other),
    }
    if let Some(t) = tools {
        p.json(t);
    }
    p.tokens(model)
}

/// Input tokens of an embeddings request: `input` as a string, an array of strings, an array of
/// token ids or an array of such arrays (ids count one each). `count: false` checks the shape
/// only (0).
pub fn embeddings_input(model: &str, input: Option<&Value>, count: bool) -> Result<u64, String> {
    let invalid = || {
        "`input` must be a string, an array of strings, an array of token ids or an array of token id arrays"
            .to_string()
    };
    let text = |s: &str| if count { self::count(model, s) } else { 0 };
    let ids = |a: &[Value]| -> Result<u64, String> {
        if a.iter().all(Value::is_u64) {
            Ok(a.len() as u64)
        } else {
            Err(invalid())
        }
    };
    match input {
        Some(Value::String(s)) => Ok(text(s)),
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => ids(items),
        Some(Value::Array(items)) => items.iter().try_fold(0u64, |n, item| {
            let t = match item {
                Value::String(s) => text(s),
                Value::Array(a) => ids(a)?,
                _ => return Err(invalid()),
            };
            Ok(n.saturating_add(t))
        }),
        _ => Err(invalid()),
    }
}

/// Prompt tokens of an Anthropic messages request: system prompt, message contents (text,
/// images, documents, tool use and results), tool definitions and the tool-use system prompt.
pub fn anthropic_prompt(
    model: &str,
    system: Option<&Value>,
    messages: &[Value],
    tools: Option<&Value>,
    image_tokens: u64,
) -> u64 {
    let mut p = Prompt::default();
    if let Some(s) = system {
        p.content(s, image_tokens, false);
    }
    p.fixed = 3u64.saturating_mul(messages.len() as u64);
    for m in messages {
        if let Some(c) = m.get("content") {
            p.content(c, image_tokens, false);
        }
    }
    if let Some(t) = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
        p.json(t);
        p.fixed = p.fixed.saturating_add(ANTHROPIC_TOOL_SYSTEM_TOKENS);
    }
    p.tokens(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_words_are_one_token_each() {
        assert_eq!(count("gpt-4o-mini", " the of and to in"), 5);
        assert_eq!(count("gpt-4", " the of and to in"), 5);
        assert_eq!(count("claude-3-5-sonnet", ""), 0);
    }

    #[test]
    fn chat_prompt_adds_per_message_overhead() {
        let msgs = vec![serde_json::json!({ "role": "user", "content": "hello there" })];
        // 3 priming + 3 per message + "user hello there" (3 tokens: "user", " hello", " there")
        assert_eq!(
            openai_chat_prompt("gpt-4o", &msgs, None, 0),
            3 + 3 + count("gpt-4o", "user hello there\n")
        );
    }
}

#[cfg(test)]
mod prompt_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_and_files_count_as_input() {
        let text = "the quick brown fox jumps over the lazy dog ".repeat(200);
        let doc = |source: Value| {
            vec![json!({ "role": "user", "content": [
                { "type": "document", "source": source },
                { "type": "text", "text": "summarize" } ] })]
        };
        let plain = anthropic_prompt(
            "claude-3-5-haiku",
            None,
            &doc(json!({ "type": "text", "media_type": "text/plain", "data": text })),
            None,
            1600,
        );
        assert!(plain > 1800, "the document's text is counted: {plain}");
        let blocks = anthropic_prompt(
            "claude-3-5-haiku",
            None,
            &doc(json!({ "type": "content", "content": [{ "type": "text", "text": text }] })),
            None,
            1600,
        );
        assert!(blocks > 1800, "content blocks are counted: {blocks}");
        let by_url = anthropic_prompt(
            "claude-3-5-haiku",
            None,
            &doc(json!({ "type": "url", "url": "https://example.com/a.pdf" })),
            None,
            1600,
        );
        assert!(by_url >= 1600, "{by_url}");
        let file = vec![json!({ "role": "user", "content": [
            { "type": "file", "file": { "file_id": "file-abc" } } ] })];
        assert!(openai_chat_prompt("gpt-4o", &file, None, 1105) >= 1105);
    }

    #[test]
    fn tools_tool_calls_and_images_count_as_input() {
        let plain = vec![json!({ "role": "user", "content": "what is the weather" })];
        let base = openai_chat_prompt("gpt-4o", &plain, None, 1105);
        let tools = json!([{ "type": "function", "function": {
            "name": "get_weather", "description": "Weather of a city, today and tomorrow",
            "parameters": { "type": "object", "properties": { "city": { "type": "string" } } } } }]);
        assert!(openai_chat_prompt("gpt-4o", &plain, Some(&tools), 1105) > base + 20);
        let with_image = vec![json!({ "role": "user", "content": [
            { "type": "text", "text": "what is the weather" },
            { "type": "image_url", "image_url": { "url": "data:image/png;base64,AAAA" } } ] })];
        assert!(openai_chat_prompt("gpt-4o", &with_image, None, 1105) >= base + 1105);
        let call = vec![
            json!({ "role": "assistant", "content": null, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris and its suburbs\"}" } }] }),
        ];
        assert!(openai_chat_prompt("gpt-4o", &call, None, 1105) > 10);

        let an = vec![json!({ "role": "user", "content": [
            { "type": "tool_result", "tool_use_id": "t", "content": "sunny, 21 degrees in the afternoon" },
            { "type": "image", "source": { "type": "base64", "data": "AAAA" } } ] })];
        let t = anthropic_prompt("claude", None, &an, Some(&tools), 1600);
        assert!(t >= 1600 + ANTHROPIC_TOOL_SYSTEM_TOKENS + 10, "{t}");
    }

    #[test]
    fn pathological_text_is_counted_quickly_and_bounded() {
        let spaces = " ".repeat(1_100_000);
        let n = count("gpt-4o", &spaces);
        assert!(n > 0 && n <= 1_100_000, "{n}");
        let word = "a".repeat(300_000);
        assert!(count("gpt-4", &word) <= 300_000);
    }
}
