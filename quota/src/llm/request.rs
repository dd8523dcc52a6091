//! What an LLM request asks for, read from its JSON body: model, streaming, the output cap and
//! the prompt's tokens. Malformed bodies give a typed error, never a panic.

use super::Provider;
use super::tokens;
use serde_json::Value;

/// What an LLM route's path is, by its last segments: only generation endpoints reserve and
/// meter tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// OpenAI `…/chat/completions`.
    Chat,
    /// OpenAI legacy `…/completions`.
    Completions,
    /// Anthropic `…/messages`.
    Messages,
    /// OpenAI Responses API `…/responses`.
    Responses,
    /// OpenAI `…/embeddings`: input only, billed at the embedding price.
    Embeddings,
    /// Anthropic `…/messages/count_tokens`, OpenAI `…/responses/input_tokens`: free at the
    /// provider, generates nothing. Only those paths: an upstream that routes by prefix could
    /// generate at `…/chat/completions/count_tokens`.
    CountTokens,
    /// Anything else (batches, files, models…): cannot be metered as one call.
    Other,
}

impl Endpoint {
    /// The endpoint of normalized `path` on a route speaking `provider`.
    pub fn of(provider: Provider, path: &str) -> Endpoint {
        let path = path.trim_end_matches('/');
        match provider {
            Provider::Anthropic if path.ends_with("/messages/count_tokens") => {
                Endpoint::CountTokens
            }
            Provider::OpenAi if path.ends_with("/responses/input_tokens") => Endpoint::CountTokens,
            Provider::OpenAi if path.ends_with("/chat/completions") => Endpoint::Chat,
            Provider::OpenAi if path.ends_with("/completions") => Endpoint::Completions,
            Provider::OpenAi if path.ends_with("/responses") => Endpoint::Responses,
            Provider::OpenAi if path.ends_with("/embeddings") => Endpoint::Embeddings,
            Provider::Anthropic if path.ends_with("/messages") => Endpoint::Messages,
            _ => Endpoint::Other,
        }
    }

    /// Whether calls to this endpoint are metered in tokens (reserved, then settled).
    pub fn generates(self) -> bool {
        !matches!(self, Endpoint::CountTokens | Endpoint::Other)
    }

    /// Whether the response has output tokens (embeddings have none).
    pub fn has_output(self) -> bool {
        self != Endpoint::Embeddings
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmRequest {
    pub model: String,
    pub stream: bool,
    /// `max_completion_tokens` or `max_tokens` (OpenAI chat; the larger when both are sent),
    /// `max_output_tokens` (Responses), `max_tokens` (completions, Anthropic). Per choice.
    pub max_tokens: Option<u64>,
    /// The fields the client's output limit was in, every one a ceiling rewrites (an upstream
    /// may honour either name, so none is left above the ceiling); the first names it in errors.
    pub max_tokens_fields: &'static [&'static str],
    /// Outputs the upstream generates for this one call, each up to `max_tokens`: OpenAI's `n`,
    /// or `best_of` on completions (generated server-side and billed, though only `n` return),
    /// for each prompt of a completions call that sends several.
    pub choices: u64,
    /// OpenAI: the client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Counted with the tokenizer: an estimate until the upstream reports usage.
    pub prompt_tokens: u64,
}

impl LlmRequest {
    /// The output a call generates in all when each of its outputs is held to `per_output`.
    pub fn total_output(&self, per_output: u64) -> u64 {
        per_output.saturating_mul(self.choices)
    }
}

/// The request fields the gateway reads to meter a call.
const READ_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "background",
    "messages",
    "prompt",
    "input",
    "instructions",
    "system",
    "tools",
    "functions",
];

/// The most outputs one call may ask for (OpenAI's documented limit on `n`).
pub const MAX_CHOICES: u64 = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    Json(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Read an LLM request for `endpoint` (a generation endpoint). `image_tokens`: prompt tokens
/// counted per image (`None`: the provider's documented maximum).
pub fn parse(
    provider: Provider,
    endpoint: Endpoint,
    body: &[u8],
    image_tokens: Option<u64>,
) -> Result<LlmRequest, RequestError> {
    parse_with(provider, endpoint, body, image_tokens, true)
}

/// `parse` without counting the prompt (`prompt_tokens` is 0): for when the tokenizer failed on
/// this body and the prompt is sized another way.
pub fn parse_uncounted(
    provider: Provider,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<LlmRequest, RequestError> {
    parse_with(provider, endpoint, body, None, false)
}

fn parse_with(
    provider: Provider,
    endpoint: Endpoint,
    body: &[u8],
    image_tokens: Option<u64>,
    count: bool,
) -> Result<LlmRequest, RequestError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| RequestError::Invalid("the body must be a JSON object".into()))?;
    // Some upstreams match field names without regard to case (Go's encoding/json): a `Model`
    // or `MAX_TOKENS` beside the field this gateway read could be what they act on.
    for key in obj.keys() {
        // Go also folds `ſ` into `s` and the Kelvin sign into `k`: no top-level field of these
        // APIs is anything but ASCII.
        if !key.is_ascii() {
            return Err(RequestError::Invalid(format!(
                "`{key}`: field names are ASCII in this API"
            )));
        }
        if let Some(field) = READ_FIELDS
            .iter()
            .find(|f| f.eq_ignore_ascii_case(key) && **f != key.as_str())
        {
            return Err(RequestError::Invalid(format!(
                "`{key}`: field names are case-sensitive; send `{field}`"
            )));
        }
    }
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return Err(RequestError::Invalid(
                "`model` must be a non-empty string".into(),
            ));
        }
        None => return Err(RequestError::Invalid("`model` is required".into())),
    };
    // The model name reaches prices, events and the ledger.
    crate::names::check(crate::names::NameKind::Model, &model)
        .map_err(|e| RequestError::Invalid(format!("`model`: {e}")))?;
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
    let (max_tokens, max_tokens_fields): (_, &'static [&'static str]) = match (provider, endpoint) {
        // OpenAI's current name for chat, and the older one OpenAI-compatible servers read:
        // both sent, the ceiling covers the larger and both are rewritten.
        (Provider::OpenAi, Endpoint::Chat) => {
            match (uint("max_completion_tokens")?, uint("max_tokens")?) {
                (Some(a), Some(b)) => (Some(a.max(b)), &["max_completion_tokens", "max_tokens"]),
                (Some(a), None) => (Some(a), &["max_completion_tokens"]),
                (None, b) => (b, &["max_tokens"]),
            }
        }
        (_, Endpoint::Responses) => (uint("max_output_tokens")?, &["max_output_tokens"]),
        // Embeddings produce no output.
        (_, Endpoint::Embeddings) => (None, &["max_tokens"]),
        _ => (uint("max_tokens")?, &["max_tokens"]),
    };
    let choices = match (provider, endpoint) {
        (Provider::OpenAi, Endpoint::Chat | Endpoint::Completions) => {
            let n = uint("n")?.unwrap_or(1);
            let best_of = if endpoint == Endpoint::Completions {
                uint("best_of")?.unwrap_or(n)
            } else {
                n
            };
            if n == 0 || n > MAX_CHOICES || best_of < n || best_of > MAX_CHOICES {
                return Err(RequestError::Invalid(format!(
                    "`n` (and `best_of`, at least `n`) must be between 1 and {MAX_CHOICES}"
                )));
            }
            // A completions `prompt` that is a list of prompts (strings or token lists; a list
            // of numbers is one tokenized prompt) gets `best_of` outputs for each.
            let prompts = match obj.get("prompt") {
                Some(Value::Array(ps)) if endpoint == Endpoint::Completions => {
                    if ps.iter().all(Value::is_number) {
                        1
                    } else {
                        ps.len() as u64
                    }
                }
                _ => 1,
            };
            best_of.saturating_mul(prompts.max(1))
        }
        _ => 1,
    };
    // A background response is generated after this call has answered, where no meter sees it.
    // Anything but an explicit `false` is refused: an upstream may read `"true"` or `1` as true.
    if endpoint == Endpoint::Responses
        && obj
            .get("background")
            .is_some_and(|b| !b.is_null() && b != &Value::Bool(false))
    {
        return Err(RequestError::Invalid(
            "`background` responses are generated after the call returns and cannot be metered \
             by this gateway; send the request without `background`"
                .into(),
        ));
    }
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
    let responses_input = || -> Result<&Value, RequestError> {
        match obj.get("input") {
            Some(v @ (Value::String(_) | Value::Array(_))) => Ok(v),
            _ => Err(RequestError::Invalid(
                "`input` must be a string or an array of input items".into(),
            )),
        }
    };
    let prompt_tokens = match (provider, endpoint) {
        _ if !count => {
            // Still check the shape, as the counting path does.
            match endpoint {
                Endpoint::Completions => {}
                Endpoint::Responses => {
                    responses_input()?;
                }
                Endpoint::Embeddings => {
                    tokens::embeddings_input(&model, obj.get("input"), false)
                        .map_err(RequestError::Invalid)?;
                }
                _ => {
                    array("messages")?;
                }
            }
            0
        }
        (_, Endpoint::Responses) => tokens::openai_responses_prompt(
            &model,
            obj.get("instructions"),
            responses_input()?,
            obj.get("tools"),
            image_tokens.unwrap_or(tokens::OPENAI_IMAGE_TOKENS),
        ),
        (_, Endpoint::Embeddings) => tokens::embeddings_input(&model, obj.get("input"), true)
            .map_err(RequestError::Invalid)?,
        (Provider::Anthropic, _) => tokens::anthropic_prompt(
            &model,
            obj.get("system"),
            array("messages")?,
            obj.get("tools"),
            image_tokens.unwrap_or(tokens::ANTHROPIC_IMAGE_TOKENS),
        ),
        (Provider::OpenAi, Endpoint::Completions) => match obj.get("prompt") {
            Some(Value::String(p)) => tokens::count(&model, p),
            // Strings, or token ids (one list, or a list per prompt), each id a token.
            Some(Value::Array(ps)) if ps.iter().all(Value::is_number) => ps.len() as u64,
            Some(Value::Array(ps)) => ps
                .iter()
                .map(|p| match p {
                    Value::String(s) => tokens::count(&model, s),
                    Value::Array(ids) => ids.len() as u64,
                    _ => 0,
                })
                .fold(0u64, u64::saturating_add),
            _ => {
                return Err(RequestError::Invalid(
                    "`prompt` must be a string or an array".into(),
                ));
            }
        },
        (Provider::OpenAi, _) => {
            let tools = obj.get("tools").or_else(|| obj.get("functions"));
            tokens::openai_chat_prompt(
                &model,
                array("messages")?,
                tools,
                image_tokens.unwrap_or(tokens::OPENAI_IMAGE_TOKENS),
            )
        }
    };
    Ok(LlmRequest {
        model,
        stream,
        max_tokens,
        max_tokens_fields,
        choices,
        include_usage,
        prompt_tokens,
    })
}

/// How the forwarded body differs from the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    /// Set these output limit fields to this value: the upstream is never asked for more output
    /// than was reserved.
    pub max_tokens: Option<(&'static [&'static str], u64)>,
    /// Add `stream_options.include_usage: true` (OpenAI), so the upstream reports the stream's
    /// usage even when the client did not ask for it.
    pub include_usage: bool,
}

/// The body with `rewrite` applied (other fields kept as they are).
pub fn rewrite(body: &[u8], rewrite: Rewrite) -> Result<Vec<u8>, RequestError> {
    let mut v: Value =
        serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| RequestError::Invalid("the body must be a JSON object".into()))?;
    if let Some((fields, n)) = rewrite.max_tokens {
        for field in fields {
            obj.insert((*field).into(), Value::from(n));
        }
    }
    if rewrite.include_usage {
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
    }
    serde_json::to_vec(&v).map_err(|e| RequestError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `body` as forwarded with `r`'s output limits set to `n`.
    fn capped(body: &[u8], r: &LlmRequest, n: u64) -> Value {
        let changes = Rewrite {
            max_tokens: Some((r.max_tokens_fields, n)),
            include_usage: false,
        };
        serde_json::from_slice(&rewrite(body, changes).unwrap()).unwrap()
    }

    #[test]
    fn reads_openai_chat() {
        let body = br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse(Provider::OpenAi, Endpoint::Chat, body, None).unwrap();
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
            br#"{"model":"m\u0000x","messages":[]}"#,
        ] {
            assert!(
                parse(Provider::OpenAi, Endpoint::Chat, body, None).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(matches!(
            parse(Provider::Anthropic, Endpoint::Messages, b"not json", None),
            Err(RequestError::Json(_))
        ));
    }

    #[test]
    fn usage_is_requested_without_losing_fields() {
        let out = rewrite(
            br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#,
            Rewrite {
                max_tokens: None,
                include_usage: true,
            },
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        assert_eq!(v["model"], "m");
    }

    #[test]
    fn a_ceiling_is_written_in_the_field_the_client_used() {
        let body = br#"{"model":"m","max_completion_tokens":90000,"messages":[]}"#;
        let r = parse(Provider::OpenAi, Endpoint::Chat, body, None).unwrap();
        assert_eq!(
            (r.max_tokens, r.max_tokens_fields),
            (Some(90000), &["max_completion_tokens"][..])
        );
        let v = capped(body, &r, 500);
        assert_eq!(v["max_completion_tokens"], 500);
        assert!(v.get("max_tokens").is_none());
    }

    #[test]
    fn both_output_limits_sent_are_covered_and_both_rewritten() {
        // An upstream reading `max_tokens` would generate 100000 if only the other were capped.
        let body = br#"{"model":"m","max_completion_tokens":0,"max_tokens":100000,"messages":[]}"#;
        let r = parse(Provider::OpenAi, Endpoint::Chat, body, None).unwrap();
        assert_eq!(r.max_tokens, Some(100000));
        let v = capped(body, &r, 500);
        assert_eq!(
            (&v["max_completion_tokens"], &v["max_tokens"]),
            (&json!(500), &json!(500))
        );
    }

    #[test]
    fn every_output_generated_is_counted() {
        let chat = |extra: &str| {
            let body = format!(r#"{{"model":"m","messages":[]{extra}}}"#);
            parse(Provider::OpenAi, Endpoint::Chat, body.as_bytes(), None).map(|r| r.choices)
        };
        assert_eq!(chat(""), Ok(1));
        assert_eq!(chat(r#","n":50"#), Ok(50));
        for bad in [r#","n":0"#, r#","n":129"#, r#","n":-1"#, r#","n":"2""#] {
            assert!(chat(bad).is_err(), "{bad}");
        }
        let completions = |extra: &str| {
            let body = format!(r#"{{"model":"m","prompt":"hi"{extra}}}"#);
            parse(
                Provider::OpenAi,
                Endpoint::Completions,
                body.as_bytes(),
                None,
            )
            .map(|r| r.choices)
        };
        // best_of generates that many server-side, all billed.
        assert_eq!(completions(r#","n":2,"best_of":5"#), Ok(5));
        assert_eq!(completions(r#","n":3"#), Ok(3));
        assert!(completions(r#","n":3,"best_of":2"#).is_err());
        // Each prompt of a list gets its outputs; a list of token ids is one prompt.
        let prompts = |prompt: &str, extra: &str| {
            let body = format!(r#"{{"model":"gpt-4o","prompt":{prompt}{extra}}}"#);
            parse(
                Provider::OpenAi,
                Endpoint::Completions,
                body.as_bytes(),
                None,
            )
            .map(|r| (r.choices, r.prompt_tokens))
        };
        assert_eq!(prompts(r#"["a","b","c"]"#, r#","best_of":4"#), Ok((12, 3)));
        assert_eq!(prompts(r#"[[1,2,3],[4,5]]"#, ""), Ok((2, 5)));
        assert_eq!(prompts(r#"[1,2,3,4]"#, r#","n":2"#), Ok((2, 4)));
        let anthropic = br#"{"model":"c","n":7,"max_tokens":5,"messages":[]}"#;
        let r = parse(Provider::Anthropic, Endpoint::Messages, anthropic, None).unwrap();
        assert_eq!(r.choices, 1, "Anthropic has no `n`");
    }

    #[test]
    fn field_names_that_differ_only_in_case_are_refused() {
        for body in [
            r#"{"model":"gpt-4o-mini","Model":"gpt-4o","messages":[]}"#,
            r#"{"model":"gpt-4o-mini","messages":[],"max_tokens":5,"MAX_TOKENS":90000}"#,
            r#"{"model":"gpt-4o-mini","messages":[],"max_tokens":5,"max_tokenſ":90000}"#,
        ] {
            let e = parse(Provider::OpenAi, Endpoint::Chat, body.as_bytes(), None).unwrap_err();
            assert!(
                e.to_string().contains("case-sensitive") || e.to_string().contains("ASCII"),
                "{e}"
            );
        }
        let fine = br#"{"model":"gpt-4o-mini","messages":[],"User":"x"}"#;
        assert!(parse(Provider::OpenAi, Endpoint::Chat, fine, None).is_ok());
    }

    #[test]
    fn background_responses_are_refused() {
        let body = br#"{"model":"gpt-4o","background":true,"input":"hi"}"#;
        let e = parse(Provider::OpenAi, Endpoint::Responses, body, None).unwrap_err();
        assert!(e.to_string().contains("background"), "{e}");
        for loose in ["\"true\"", "1", "{}"] {
            let body = format!(r#"{{"model":"gpt-4o","background":{loose},"input":"hi"}}"#);
            let e = parse(Provider::OpenAi, Endpoint::Responses, body.as_bytes(), None);
            assert!(e.is_err(), "background {loose}");
        }
        let body = br#"{"model":"gpt-4o","background":false,"input":"hi"}"#;
        assert!(parse(Provider::OpenAi, Endpoint::Responses, body, None).is_ok());
    }

    #[test]
    fn responses_and_embeddings_requests() {
        let body = br#"{"model":"gpt-4o","stream":true,"max_output_tokens":64,"instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"hello there"}]},{"type":"function_call_output","call_id":"c","output":"42"}]}"#;
        let r = parse(Provider::OpenAi, Endpoint::Responses, body, None).unwrap();
        assert_eq!(
            (r.stream, r.max_tokens, r.max_tokens_fields),
            (true, Some(64), &["max_output_tokens"][..])
        );
        assert!(r.prompt_tokens > 8, "{}", r.prompt_tokens);
        let plain = br#"{"model":"gpt-4o","input":"hello there"}"#;
        assert!(parse(Provider::OpenAi, Endpoint::Responses, plain, None).is_ok());
        let bad = br#"{"model":"gpt-4o","input":3}"#;
        assert!(parse(Provider::OpenAi, Endpoint::Responses, bad, None).is_err());
        for (input, tokens) in [
            (r#""the of and""#, 3),
            (r#"["the of", "and"]"#, 3),
            ("[1, 2, 3, 4]", 4),
            ("[[1, 2], [3]]", 3),
        ] {
            let body = format!(r#"{{"model":"text-embedding-3-small","input":{input}}}"#);
            let r = parse(
                Provider::OpenAi,
                Endpoint::Embeddings,
                body.as_bytes(),
                None,
            )
            .unwrap();
            assert_eq!((r.prompt_tokens, r.max_tokens), (tokens, None), "{input}");
        }
        let bad = br#"{"model":"e","input":[{"a":1}]}"#;
        assert!(parse(Provider::OpenAi, Endpoint::Embeddings, bad, None).is_err());
        assert!(parse_uncounted(Provider::OpenAi, Endpoint::Embeddings, bad).is_err());
    }

    #[test]
    fn endpoints_are_told_apart_by_their_last_segments() {
        use Endpoint::*;
        for (p, path, want) in [
            (Provider::OpenAi, "/v1/chat/completions", Chat),
            (Provider::OpenAi, "/api/v1/chat/completions", Chat),
            (Provider::OpenAi, "/v1/completions", Completions),
            (Provider::OpenAi, "/v1/batches", Other),
            (Provider::OpenAi, "/v1/responses", Responses),
            (Provider::OpenAi, "/v1/embeddings", Embeddings),
            (Provider::Anthropic, "/v1/responses", Other),
            (Provider::Anthropic, "/v1/messages", Messages),
            (
                Provider::Anthropic,
                "/v1/messages/count_tokens",
                CountTokens,
            ),
            (Provider::Anthropic, "/v1/messages/batches", Other),
            (Provider::OpenAi, "/v1/responses/input_tokens", CountTokens),
            (Provider::OpenAi, "/v1/chat/completions/count_tokens", Other),
            (Provider::Anthropic, "/v1/complete/count_tokens", Other),
            (Provider::OpenAi, "/v1/messages/count_tokens", Other),
            (Provider::Anthropic, "/v1/chat/completions", Other),
        ] {
            assert_eq!(Endpoint::of(p, path), want, "{path}");
        }
    }
}
