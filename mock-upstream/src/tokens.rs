//! The fake model: deterministic output tokens and the prompt token
//! approximation shared by every provider flavour.

use serde_json::Value;

/// Common English words with a leading space: each is exactly one token in
/// OpenAI's cl100k and o200k encodings, so N of them concatenated are N tokens.
pub const VOCAB: [&str; 20] = [
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " with", " as", " on",
    " was", " be", " at", " by", " this", " from", " or", " have",
];

/// The `i`-th output token (7 is coprime with 20, so all words cycle through).
pub fn token(i: u64) -> &'static str {
    // Reduce first so the multiplication cannot overflow.
    let len = VOCAB.len() as u64;
    VOCAB[((i % len) * 7 % len) as usize]
}

/// The whole output of `n` tokens.
pub fn text(n: u64) -> String {
    (0..n).map(token).collect()
}

pub fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Words in a message `content`: a string, or an array of parts whose `text`
/// is counted (bare strings in the array too). Anything else counts 0.
pub fn content_words(content: &Value) -> u64 {
    match content {
        Value::String(s) => words(s),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part {
                Value::String(s) => words(s),
                Value::Object(o) => o.get("text").and_then(Value::as_str).map_or(0, words),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Per-message overhead, like OpenAI's chat format adds.
pub const PER_MESSAGE: u64 = 4;

/// Prompt tokens of a `messages` array: words of each content + 4 per message.
pub fn messages_tokens(messages: &[Value]) -> u64 {
    messages
        .iter()
        .map(|m| m.get("content").map_or(0, content_words) + PER_MESSAGE)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_is_deterministic_and_cycles() {
        assert_eq!(token(0), " the");
        assert_eq!(token(1), VOCAB[7]);
        assert_eq!(text(3), format!(" the{}{}", VOCAB[7], VOCAB[14]));
        let mut seen: Vec<&str> = (0..20).map(token).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 20);
        assert_eq!(token(u64::MAX), VOCAB[(u64::MAX % 20 * 7 % 20) as usize]);
    }

    #[test]
    fn prompt_counting() {
        let messages = vec![
            json!({"role": "system", "content": "be  brief"}),
            json!({"role": "user", "content": [{"type": "text", "text": "hello there world"}, {"type": "image_url"}]}),
            json!({"role": "assistant"}),
        ];
        assert_eq!(messages_tokens(&messages), 2 + 3 + 3 * PER_MESSAGE);
    }
}
