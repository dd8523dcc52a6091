//! OpenAI's Responses API (`POST /v1/responses`, plain and streamed with its named events) and
//! embeddings (`POST /v1/embeddings`), with the same faults and stats records as chat.
//!
//! A Responses stream is `response.created`, `response.output_item.added`,
//! `response.content_part.added`, one `response.output_text.delta` per token, then
//! `response.output_text.done`, `response.content_part.done`, `response.output_item.done` and
//! `response.completed` (or `response.incomplete` when `max_output_tokens` truncated it) carrying
//! the usage. Every event has a `sequence_number`.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::llm::{Call, Flavor, Incoming, now_unix};
use crate::sse::{self, Script};
use crate::tokens;

/// Input tokens of a Responses `input` (a string or items) and `instructions`: words, plus the
/// per-message overhead for each item.
fn input_tokens(input: Option<&Value>, instructions: Option<&Value>) -> Result<u64, String> {
    let instructions = match instructions {
        None | Some(Value::Null) => 0,
        Some(Value::String(s)) => tokens::words(s),
        Some(_) => return Err("instructions: expected a string".to_owned()),
    };
    let input = match input {
        Some(Value::String(s)) => tokens::words(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => tokens::words(s),
                Value::Object(o) => {
                    let body = o
                        .get("content")
                        .or_else(|| o.get("output"))
                        .or_else(|| o.get("arguments"));
                    tokens::PER_MESSAGE + body.map_or(0, tokens::content_words)
                }
                _ => 0,
            })
            .sum(),
        None | Some(Value::Null) => return Err("input: this field is required".to_owned()),
        Some(_) => return Err("input: expected a string or an array of items".to_owned()),
    };
    Ok(instructions + input)
}

/// What one Responses call produces.
struct Plan {
    id: String,
    msg_id: String,
    created: u64,
    model: String,
    instructions: Value,
    max_output_tokens: Value,
    prompt: u64,
    tokens: u64,
    cached: u64,
    reasoning: u64,
    truncated: bool,
    omit_usage: bool,
}

impl Plan {
    fn usage(&self) -> Value {
        if self.omit_usage {
            return Value::Null;
        }
        let output = self.tokens + self.reasoning;
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": { "cached_tokens": self.cached },
            "output_tokens": output,
            "output_tokens_details": { "reasoning_tokens": self.reasoning },
            "total_tokens": self.prompt + output,
        })
    }

    fn status(&self) -> &'static str {
        if self.truncated {
            "incomplete"
        } else {
            "completed"
        }
    }

    fn message(&self, text: &str, status: &str) -> Value {
        json!({
            "type": "message", "id": self.msg_id, "status": status, "role": "assistant",
            "content": [{ "type": "output_text", "text": text, "annotations": [] }],
        })
    }

    /// The response object; `done`: with its output, status and usage.
    fn response(&self, done: bool) -> Value {
        let (status, output, usage) = if done {
            let text = tokens::text(self.tokens);
            (
                self.status(),
                json!([self.message(&text, "completed")]),
                self.usage(),
            )
        } else {
            ("in_progress", json!([]), Value::Null)
        };
        let incomplete = (done && self.truncated).then(|| json!({ "reason": "max_output_tokens" }));
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": null, "incomplete_details": incomplete, "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens, "model": self.model, "output": output,
            "parallel_tool_calls": true, "previous_response_id": null, "temperature": 1.0,
            "text": { "format": { "type": "text" } }, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": usage, "metadata": {},
        })
    }
}

/// An event of the stream: `event: <type>` and its data, numbered.
fn event(kind: &str, seq: u64, mut fields: Value) -> Bytes {
    if let Value::Object(o) = &mut fields {
        o.insert("type".into(), Value::from(kind));
        o.insert("sequence_number".into(), Value::from(seq));
    }
    sse::event(kind, &fields)
}

/// `base` with the fields of `extra` added.
fn with_fields(base: &Value, extra: Value) -> Value {
    let mut v = base.clone();
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v
}

/// `POST /v1/responses`
pub(crate) async fn responses(incoming: Incoming) -> Response {
    let call = match Call::start(Flavor::OpenAi, "/v1/responses", &incoming) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    let read = || -> Result<(Plan, bool), String> {
        let prompt = input_tokens(call.body.get("input"), call.body.get("instructions"))?;
        let max = call.opt_u64("max_output_tokens")?;
        let stream = call.opt_bool("stream")?;
        let model = call.model()?;
        let (tokens, truncated) = call.faults.output_tokens(max);
        call.guard.plan(&model, stream, prompt, tokens);
        let cached = call.faults.cached_tokens.min(prompt);
        let reasoning = call.faults.reasoning_tokens;
        if !call.faults.omit_usage {
            call.guard.kinds(cached, 0, 0, reasoning);
        }
        let plan = Plan {
            id: format!("resp_{}", incoming.request_id),
            msg_id: format!("msg_{}", incoming.request_id),
            created: now_unix(),
            model,
            instructions: call
                .body
                .get("instructions")
                .cloned()
                .unwrap_or(Value::Null),
            max_output_tokens: max.map_or(Value::Null, Value::from),
            prompt,
            tokens,
            cached,
            reasoning,
            truncated,
            omit_usage: call.faults.omit_usage,
        };
        Ok((plan, stream))
    };
    let (plan, stream) = match read() {
        Ok(read) => read,
        Err(msg) => return call.bad_request(&msg),
    };
    let call = match call.forced_status().await {
        Ok(call) => call,
        Err(response) => return response,
    };
    if !stream {
        let tokens = plan.tokens;
        return call.answer_json(tokens, &plan.response(true)).await;
    }
    let item = json!({ "item_id": plan.msg_id, "output_index": 0, "content_index": 0 });
    let with = |extra: Value| with_fields(&item, extra);
    let pre = vec![
        event(
            "response.created",
            0,
            json!({ "response": plan.response(false) }),
        ),
        event(
            "response.output_item.added",
            1,
            json!({ "output_index": 0, "item": plan.message("", "in_progress") }),
        ),
        event(
            "response.content_part.added",
            2,
            with(json!({ "part": { "type": "output_text", "text": "", "annotations": [] } })),
        ),
    ];
    let text = tokens::text(plan.tokens);
    let mut seq = pre.len() as u64 + plan.tokens;
    let mut next = || {
        seq += 1;
        seq - 1
    };
    let last = if plan.truncated {
        "response.incomplete"
    } else {
        "response.completed"
    };
    let post = vec![
        event(
            "response.output_text.done",
            next(),
            with(json!({ "text": text })),
        ),
        event(
            "response.content_part.done",
            next(),
            with(json!({ "part": { "type": "output_text", "text": text, "annotations": [] } })),
        ),
        event(
            "response.output_item.done",
            next(),
            json!({ "output_index": 0, "item": plan.message(&text, "completed") }),
        ),
        event(last, next(), json!({ "response": plan.response(true) })),
    ];
    let tokens = plan.tokens;
    let counter = AtomicU64::new(pre.len() as u64);
    let render = move |token: &str| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        event(
            "response.output_text.delta",
            n,
            with_fields(&item, json!({ "delta": token })),
        )
    };
    call.answer_stream(Script {
        pre,
        tokens,
        render,
        post,
    })
}

/// Input tokens of an embeddings `input`: words of strings, the length of token id arrays;
/// and how many inputs there are.
fn embedding_inputs(input: Option<&Value>) -> Result<(u64, usize), String> {
    let invalid = || {
        "input: expected a string, an array of strings, token ids or arrays of token ids".to_owned()
    };
    match input {
        Some(Value::String(s)) => Ok((tokens::words(s), 1)),
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            Ok((items.len() as u64, 1))
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut n = 0;
            for item in items {
                n += match item {
                    Value::String(s) => tokens::words(s),
                    Value::Array(ids) if ids.iter().all(Value::is_u64) => ids.len() as u64,
                    _ => return Err(invalid()),
                };
            }
            Ok((n, items.len()))
        }
        _ => Err(invalid()),
    }
}

/// Dimensions of the mock's embeddings (small: tests do not need real vectors).
const DIMENSIONS: usize = 8;

/// `POST /v1/embeddings`
pub(crate) async fn embeddings(incoming: Incoming) -> Response {
    let call = match Call::start(Flavor::OpenAi, "/v1/embeddings", &incoming) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    let read = || -> Result<_, String> {
        let (prompt, count) = embedding_inputs(call.body.get("input"))?;
        let base64 = match call.body.get("encoding_format") {
            None | Some(Value::Null) => false,
            Some(Value::String(f)) if f == "float" => false,
            Some(Value::String(f)) if f == "base64" => true,
            Some(_) => return Err("encoding_format: expected `float` or `base64`".to_owned()),
        };
        Ok((call.model()?, prompt, count, base64))
    };
    let (model, prompt, count, as_base64) = match read() {
        Ok(read) => read,
        Err(msg) => return call.bad_request(&msg),
    };
    call.guard.plan(&model, false, prompt, 0);
    let call = match call.forced_status().await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let data: Vec<Value> = (0..count)
        .map(|i| {
            let v: Vec<f32> = (0..DIMENSIONS)
                .map(|d| ((i + d) % 7) as f32 / 7.0)
                .collect();
            let embedding = if as_base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::from(openssl::base64::encode_block(&bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let usage = if call.faults.omit_usage {
        Value::Null
    } else {
        json!({ "prompt_tokens": prompt, "total_tokens": prompt })
    };
    let body = json!({ "object": "list", "data": data, "model": model, "usage": usage });
    call.answer_json(0, &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_of_every_shape() {
        assert_eq!(embedding_inputs(Some(&json!("a b c"))).unwrap(), (3, 1));
        assert_eq!(
            embedding_inputs(Some(&json!(["a b", "c"]))).unwrap(),
            (3, 2)
        );
        assert_eq!(embedding_inputs(Some(&json!([1, 2, 3]))).unwrap(), (3, 1));
        assert_eq!(
            embedding_inputs(Some(&json!([[1, 2], [3]]))).unwrap(),
            (3, 2)
        );
        assert!(embedding_inputs(Some(&json!([{}]))).is_err());
    }
}
