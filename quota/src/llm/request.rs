//! What an LLM request asks for, read from its JSON body: model, streaming, the output cap and
//! the prompt's tokens. Malformed bodies give a typed error, never a panic.

use super::Provider;
use super::tokens;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmRequest {
    pub model: String,
    pub stream: bool,
    /// `max_completion_tokens` or `max_tokens` (OpenAI), `max_tokens` (Anthropic).
    pub max_tokens: Option<u64>,
    /// OpenAI: the client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Counted with the tokenizer: an estimate until the upstream reports usage.
    pub prompt_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Read an LLM request. `path` tells OpenAI's chat from its legacy completions.
pub fn parse(provider: Provider, path: &str, body: &[u8]) -> Result<LlmRequest, RequestError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| RequestError::Invalid("the body must be a JSON object".into()))?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return Err(RequestError::Invalid(
                "`model` must be a non-empty string".into(),
            ));
        }
        None => return Err(RequestError::Invalid("`model` is required".into())),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(RequestError::Invalid("`stream` must be a boolean".into())),
    };
    let uint = |field: &str| -> Result<Option<u64>, RequestError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                RequestError::Invalid(format!("`{field}` must be a non-negative integer"))
            }),
        }
    };
    let max_tokens = uint("max_completion_tokens")?.or(uint("max_tokens")?);
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let array = |field: &str| -> Result<&Vec<Value>, RequestError> {
        obj.get(field)
            .and_then(Value::as_array)
            .ok_or_else(|| RequestError::Invalid(format!("`{field}` must be an array of messages")))
    };
    let prompt_tokens = match provider {
        Provider::Anthropic => {
            tokens::anthropic_prompt(&model, obj.get("system"), array("messages")?)
        }
        Provider::OpenAi if path.starts_with("/v1/completions") => match obj.get("prompt") {
            Some(Value::String(p)) => tokens::count(&model, p),
            Some(Value::Array(ps)) => ps
                .iter()
                .map(|p| p.as_str().map_or(0, |s| tokens::count(&model, s)))
                .sum(),
            _ => {
                return Err(RequestError::Invalid(
                    "`prompt` must be a string or an array".into(),
                ));
            }
        },
        Provider::OpenAi => tokens::openai_chat_prompt(&model, array("messages")?),
    };
    Ok(LlmRequest {
        model,
        stream,
        max_tokens,
        include_usage,
        prompt_tokens,
    })
}

/// The body with `stream_options.include_usage: true` added (OpenAI), so the upstream reports the
/// stream's usage even when the client did not ask for it.
pub fn with_usage_requested(body: &[u8]) -> Result<Vec<u8>, RequestError> {
    let mut v: Value =
        serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| RequestError::Invalid("the body must be a JSON object".into()))?;
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Default::default()));
    match opts.as_object_mut() {
        Some(o) => {
            o.insert("include_usage".into(), Value::Bool(true));
        }
        None => {
            return Err(RequestError::Invalid(
                "`stream_options` must be an object".into(),
            ));
        }
    }
    serde_json::to_vec(&v).map_err(|e| RequestError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_chat() {
        let body = br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse(Provider::OpenAi, "/v1/chat/completions", body).unwrap();
        assert_eq!(
            (r.model.as_str(), r.stream, r.max_tokens, r.include_usage),
            ("gpt-4o-mini", true, Some(50), false)
        );
        assert!(r.prompt_tokens > 6);
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b"{"[..],
            b"[]",
            br#"{"model":1}"#,
            br#"{"model":"m","messages":3}"#,
            br#"{"model":"m","messages":[],"max_tokens":-1}"#,
        ] {
            assert!(
                parse(Provider::OpenAi, "/v1/chat/completions", body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(matches!(
            parse(Provider::Anthropic, "/v1/messages", b"not json"),
            Err(RequestError::Json(_))
        ));
    }

    #[test]
    fn usage_is_requested_without_losing_fields() {
        let out = with_usage_requested(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#)
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        assert_eq!(v["model"], "m");
    }
}
