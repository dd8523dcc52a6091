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

/// Tokens of `text` for `model`.
pub fn count(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe(model).encode_ordinary(text).len() as u64
}

/// Text of a message `content`: a string, or the `text` of content parts.
fn content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                    out.push('\n');
                }
            }
        }
        _ => {}
    }
}

/// Prompt tokens of an OpenAI chat request, by OpenAI's accounting: 3 per message, the role,
/// the content (and name), plus 3 to prime the reply.
pub fn openai_chat_prompt(model: &str, messages: &[Value]) -> u64 {
    let mut total = 3;
    let mut text = String::new();
    for m in messages {
        text.clear();
        for field in ["role", "name"] {
            if let Some(v) = m.get(field).and_then(Value::as_str) {
                text.push_str(v);
                text.push(' ');
            }
        }
        if let Some(c) = m.get("content") {
            content_text(c, &mut text);
        }
        total += 3 + count(model, &text);
    }
    total
}

/// Prompt tokens of an Anthropic messages request: system prompt and message contents.
pub fn anthropic_prompt(model: &str, system: Option<&Value>, messages: &[Value]) -> u64 {
    let mut text = String::new();
    if let Some(s) = system {
        content_text(s, &mut text);
    }
    for m in messages {
        if let Some(c) = m.get("content") {
            content_text(c, &mut text);
            text.push('\n');
        }
    }
    count(model, &text) + 3 * messages.len() as u64
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
            openai_chat_prompt("gpt-4o", &msgs),
            3 + 3 + count("gpt-4o", "user hello there")
        );
    }
}
