//! In-process tests of the router (`tower::ServiceExt::oneshot`): response
//! shapes, usage numbers, faults and stats.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use mock_upstream::{MockState, RequestRecord, app, tokens};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    /// Body frames, one per SSE event for streams.
    frames: Vec<Bytes>,
    /// The body ended with an error (the connection would be cut).
    error: Option<String>,
}

impl Reply {
    fn text(&self) -> String {
        let bytes: Vec<u8> = self.frames.iter().flat_map(|f| f.iter().copied()).collect();
        String::from_utf8(bytes).expect("utf-8 body")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text()).expect("JSON body")
    }

    fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// `data:` payloads of an OpenAI-style stream, one per frame.
    fn data_events(&self) -> Vec<String> {
        self.frames
            .iter()
            .map(|f| {
                let s = std::str::from_utf8(f).expect("utf-8 frame");
                let payload = s
                    .strip_prefix("data: ")
                    .and_then(|s| s.strip_suffix("\n\n"))
                    .unwrap_or_else(|| panic!("not one data event: {s:?}"));
                payload.to_owned()
            })
            .collect()
    }

    /// `(event, data)` of an Anthropic-style stream, one per frame.
    fn named_events(&self) -> Vec<(String, Value)> {
        self.frames
            .iter()
            .map(|f| {
                let s = std::str::from_utf8(f).expect("utf-8 frame");
                let (event, data) = s
                    .strip_suffix("\n\n")
                    .and_then(|s| s.split_once('\n'))
                    .unwrap_or_else(|| panic!("not one named event: {s:?}"));
                let event = event.strip_prefix("event: ").expect("event line");
                let data = data.strip_prefix("data: ").expect("data line");
                (
                    event.to_owned(),
                    serde_json::from_str(data).expect("event JSON"),
                )
            })
            .collect()
    }
}

async fn send(state: &Arc<MockState>, request: Request<Body>) -> Reply {
    let response = app(Arc::clone(state))
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut frames = Vec::new();
    let mut error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                }
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    Reply {
        status,
        headers,
        frames,
        error,
    }
}

fn post(uri: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::post(uri).header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body.into()).expect("request")
}

fn post_json(uri: &str, headers: &[(&str, &str)], body: Value) -> Request<Body> {
    post(uri, headers, body.to_string())
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

async fn record(state: &Arc<MockState>, id: &str) -> RequestRecord {
    let reply = send(state, get(&format!("/stats/{id}"))).await;
    assert_eq!(reply.status, StatusCode::OK, "stats for {id}");
    serde_json::from_value(reply.json()).expect("record JSON")
}

fn chat_body(stream: bool, include_usage: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "you are terse"},
            {"role": "user", "content": [{"type": "text", "text": "hello big world"}]}
        ],
        "stream": stream,
        "stream_options": {"include_usage": include_usage}
    })
}
/// (3 + 4) + (3 + 4) for `chat_body`.
const CHAT_PROMPT: u64 = 14;

#[tokio::test]
async fn openai_non_stream_usage_and_request_id() {
    let state = Arc::new(MockState::new());
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions",
            &[("x-request-id", "req-a")],
            chat_body(false, false),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-request-id"], "req-a");
    assert!(reply.content_type().starts_with("application/json"));
    let body = reply.json();
    assert_eq!(body["id"], "chatcmpl-req-a");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert!(body["created"].as_u64().expect("created") > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().expect("content");
    assert_eq!(content, tokens::text(20));
    assert_eq!(content.split_whitespace().count(), 20);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": CHAT_PROMPT, "completion_tokens": 20, "total_tokens": CHAT_PROMPT + 20})
    );

    let rec = record(&state, "req-a").await;
    assert_eq!(rec.endpoint, "/v1/chat/completions");
    assert_eq!(rec.model.as_deref(), Some("gpt-4o-mini"));
    assert!(!rec.stream);
    assert_eq!(rec.prompt_tokens, CHAT_PROMPT);
    assert_eq!(rec.completion_tokens_planned, 20);
    assert_eq!(rec.tokens_sent, 20);
    assert!(rec.completed && !rec.cut && !rec.client_disconnected);
    assert_eq!(rec.attempts, 1);
}

#[tokio::test]
async fn openai_stream_with_include_usage() {
    let state = Arc::new(MockState::new());
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions",
            &[("x-request-id", "s1"), ("x-mock-tokens", "5")],
            chat_body(true, true),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "text/event-stream");
    assert!(reply.error.is_none());
    let events = reply.data_events();
    // role + 5 tokens + finish + usage + [DONE]
    assert_eq!(events.len(), 9, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..8]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    for chunk in &chunks {
        assert_eq!(chunk["id"], "chatcmpl-s1");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o-mini");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks[1..6]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().expect("token"))
        .collect();
    assert_eq!(text, tokens::text(5));
    for chunk in &chunks[..7] {
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        assert_eq!(chunk["choices"].as_array().map(Vec::len), Some(1));
    }
    assert_eq!(chunks[6]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[7]["choices"], json!([]));
    assert_eq!(
        chunks[7]["usage"],
        json!({"prompt_tokens": CHAT_PROMPT, "completion_tokens": 5, "total_tokens": CHAT_PROMPT + 5})
    );

    let rec = record(&state, "s1").await;
    assert!(rec.stream);
    assert_eq!(rec.tokens_sent, 5);
    assert_eq!(rec.chunks_sent, 9);
    assert!(rec.completed && !rec.cut && !rec.client_disconnected);
}

#[tokio::test]
async fn openai_stream_without_include_usage_has_no_usage_key() {
    let state = Arc::new(MockState::new());
    let reply = send(
        &state,
        post_json("/v1/chat/completions?tokens=3", &[], chat_body(true, false)),
    )
    .await;
    let events = reply.data_events();
    assert_eq!(events.len(), 1 + 3 + 1 + 1);
    assert!(!reply.text().contains("usage"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn anthropic_stream_event_order_and_usage() {
    let state = Arc::new(MockState::new());
    let body = json!({
        "model": "claude-sonnet-4-5",
        "system": "you are terse",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "one two"}]}],
        "max_tokens": 100,
        "stream": true
    });
    let reply = send(
        &state,
        post_json(
            "/v1/messages",
            &[("x-request-id", "a1"), ("x-mock-tokens", "4")],
            body,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "text/event-stream");
    let events = reply.named_events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    let prompt = 3 + 2 + 4;
    let start = &events[0].1["message"];
    assert_eq!(start["id"], "msg_a1");
    assert_eq!(start["model"], "claude-sonnet-4-5");
    assert_eq!(start["content"], json!([]));
    assert_eq!(
        start["usage"],
        json!({"input_tokens": prompt, "output_tokens": 1})
    );
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events[3..7]
        .iter()
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().expect("text")
        })
        .collect();
    assert_eq!(text, tokens::text(4));
    assert_eq!(
        events[8].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 4}})
    );

    let rec = record(&state, "a1").await;
    assert_eq!(rec.prompt_tokens, prompt);
    assert_eq!(rec.tokens_sent, 4);
    assert_eq!(rec.chunks_sent, 10);
    assert!(rec.completed);
}

#[tokio::test]
async fn anthropic_non_stream() {
    let state = Arc::new(MockState::new());
    let body = json!({"model": "claude", "messages": [{"role": "user", "content": "a b c d e"}], "max_tokens": 64});
    let reply = send(
        &state,
        post_json("/v1/messages?tokens=6", &[("x-request-id", "a2")], body),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["id"], "msg_a2");
    assert_eq!(body["type"], "message");
    assert_eq!(
        body["content"],
        json!([{"type": "text", "text": tokens::text(6)}])
    );
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(
        body["usage"],
        json!({"input_tokens": 9, "output_tokens": 6})
    );
}

#[tokio::test]
async fn cut_after_openai_stream() {
    let state = Arc::new(MockState::new());
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions?cut_after=3&tokens=10",
            &[("x-request-id", "cut1")],
            chat_body(true, true),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.error.is_some(), "body must end with an error");
    let events = reply.data_events();
    // role chunk + exactly 3 content chunks, no finish/usage/[DONE].
    assert_eq!(events.len(), 4, "{events:?}");
    let contents: Vec<Value> = events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).expect("chunk")["choices"][0]["delta"]["content"]
                .clone()
        })
        .collect();
    assert_eq!(contents[0], "");
    assert_eq!(
        contents[1..],
        [
            json!(tokens::token(0)),
            json!(tokens::token(1)),
            json!(tokens::token(2))
        ]
    );
    assert!(!reply.text().contains("[DONE]"));
    assert!(!reply.text().contains("prompt_tokens"));

    let rec = record(&state, "cut1").await;
    assert!(rec.cut);
    assert!(!rec.completed);
    assert!(!rec.client_disconnected);
    assert_eq!(rec.tokens_sent, 3);
    assert_eq!(rec.chunks_sent, 4);
    assert_eq!(rec.completion_tokens_planned, 10);
}

#[tokio::test]
async fn cut_after_anthropic_counts_deltas() {
    let state = Arc::new(MockState::new());
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let reply = send(
        &state,
        post_json(
            "/v1/messages",
            &[("x-request-id", "cut2"), ("x-mock-cut-after", "2")],
            body,
        ),
    )
    .await;
    assert!(reply.error.is_some());
    let names: Vec<String> = reply.named_events().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta"
        ]
    );
    let rec = record(&state, "cut2").await;
    assert!(rec.cut && !rec.completed);
    assert_eq!(rec.tokens_sent, 2);
}

#[tokio::test]
async fn cut_after_beyond_output_cuts_before_the_end() {
    let state = Arc::new(MockState::new());
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions?cut_after=99&tokens=2",
            &[],
            chat_body(true, true),
        ),
    )
    .await;
    assert!(reply.error.is_some());
    assert_eq!(reply.data_events().len(), 3);
}

#[tokio::test]
async fn cut_after_non_stream_aborts_the_body() {
    let state = Arc::new(MockState::new());
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions?cut_after=1",
            &[("x-request-id", "cut3")],
            chat_body(false, false),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.error.is_some());
    assert!(reply.frames.is_empty());
    let rec = record(&state, "cut3").await;
    assert!(rec.cut);
    assert_eq!(rec.tokens_sent, 0);
}

#[tokio::test]
async fn omit_usage_everywhere() {
    let state = Arc::new(MockState::new());
    let omit = [("x-mock-omit-usage", "1")];

    let reply = send(
        &state,
        post_json("/v1/chat/completions", &omit, chat_body(false, false)),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.json().get("usage").is_none());
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        tokens::text(20)
    );

    let reply = send(
        &state,
        post_json("/v1/chat/completions", &omit, chat_body(true, true)),
    )
    .await;
    assert!(!reply.text().contains("usage"));
    // No usage chunk: role + 20 tokens + finish + [DONE].
    assert_eq!(reply.data_events().len(), 23);

    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let reply = send(
        &state,
        post_json("/v1/messages?omit_usage=true&tokens=2", &[], body),
    )
    .await;
    let events = reply.named_events();
    assert_eq!(events.len(), 8);
    assert!(events[0].1["message"].get("usage").is_none());
    assert_eq!(events[6].0, "message_delta");
    assert!(events[6].1.get("usage").is_none());
    assert!(!reply.text().contains("tokens"));

    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let reply = send(&state, post_json("/v1/messages?omit_usage=true", &[], body)).await;
    assert!(reply.json().get("usage").is_none());
    assert_eq!(reply.json()["stop_reason"], "end_turn");
}

#[tokio::test]
async fn status_faults_use_provider_error_formats() {
    let state = Arc::new(MockState::new());
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions",
            &[("x-request-id", "st1"), ("x-mock-status", "503")],
            chat_body(true, true),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.content_type().starts_with("application/json"));
    let body = reply.json();
    assert_eq!(body["error"]["type"], "server_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("503")
    );
    let rec = record(&state, "st1").await;
    assert_eq!(rec.status, 503);
    assert_eq!(rec.tokens_sent, 0);
    assert!(!rec.completed && !rec.client_disconnected);

    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions?status=429",
            &[],
            chat_body(false, false),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");

    // The header wins over the query parameter.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let reply = send(
        &state,
        post_json("/v1/messages?status=429", &[("x-mock-status", "500")], body),
    )
    .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let body = reply.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "api_error");

    let reply = send(&state, get("/lookup/x?status=502")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["ok"], false);
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let state = Arc::new(MockState::new());
    let reply = send(
        &state,
        post(
            "/v1/chat/completions",
            &[("x-request-id", "bad1")],
            "{not json",
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = reply.json();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["param"].is_null() && body["error"]["code"].is_null());
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    let rec = record(&state, "bad1").await;
    assert_eq!(rec.status, 400);
    assert_eq!(rec.model, None);

    let reply = send(
        &state,
        post_json("/v1/chat/completions", &[], json!({"model": "m"})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .expect("message")
            .contains("messages")
    );

    let reply = send(&state, post("/v1/messages", &[], "[1,")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = reply.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let reply = send(
        &state,
        post_json(
            "/v1/messages",
            &[],
            json!({"messages": [], "max_tokens": "x"}),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let reply = send(
        &state,
        post_json("/v1/completions", &[], json!({"model": "m"})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    // A bad fault value is loud too.
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions?tokens=lots",
            &[],
            chat_body(false, false),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .expect("message")
            .contains("tokens")
    );
}

#[tokio::test]
async fn max_tokens_truncates() {
    let state = Arc::new(MockState::new());
    let mut body = chat_body(false, false);
    body["max_tokens"] = json!(3);
    let reply = send(&state, post_json("/v1/chat/completions", &[], body)).await;
    let body = reply.json();
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["choices"][0]["message"]["content"], tokens::text(3));
    assert_eq!(body["usage"]["completion_tokens"], 3);

    // max_completion_tokens is honoured too, and a larger limit does not truncate.
    let mut body = chat_body(false, false);
    body["max_completion_tokens"] = json!(2);
    let reply = send(&state, post_json("/v1/chat/completions", &[], body)).await;
    assert_eq!(reply.json()["usage"]["completion_tokens"], 2);
    let mut body = chat_body(false, false);
    body["max_tokens"] = json!(8);
    let reply = send(
        &state,
        post_json("/v1/chat/completions?tokens=8", &[], body),
    )
    .await;
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "stop");

    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true});
    let reply = send(
        &state,
        post_json("/v1/messages", &[("x-request-id", "mt")], body),
    )
    .await;
    let events = reply.named_events();
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .count();
    assert_eq!(deltas, 2);
    let delta = events
        .iter()
        .find(|(n, _)| n == "message_delta")
        .expect("message_delta");
    assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta.1["usage"]["output_tokens"], 2);
    let rec = record(&state, "mt").await;
    assert_eq!(rec.completion_tokens_planned, 2);
    assert_eq!(rec.tokens_sent, 2);
}

#[tokio::test]
async fn legacy_completions() {
    let state = Arc::new(MockState::new());
    let body =
        json!({"model": "gpt-3.5-turbo-instruct", "prompt": "say three words", "max_tokens": 4});
    let reply = send(
        &state,
        post_json("/v1/completions", &[("x-request-id", "l1")], body),
    )
    .await;
    let body = reply.json();
    assert_eq!(body["id"], "cmpl-l1");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], tokens::text(4));
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    );

    let body =
        json!({"prompt": ["a b", "c"], "stream": true, "stream_options": {"include_usage": true}});
    let reply = send(&state, post_json("/v1/completions?tokens=2", &[], body)).await;
    let events = reply.data_events();
    assert_eq!(events.len(), 2 + 1 + 1 + 1);
    let usage: Value = serde_json::from_str(&events[3]).expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    );
    let first: Value = serde_json::from_str(&events[0]).expect("chunk");
    assert_eq!(first["choices"][0]["text"], tokens::token(0));
    assert_eq!(events[4], "[DONE]");
}

#[tokio::test]
async fn plain_endpoints_and_request_counts() {
    let state = Arc::new(MockState::new());
    let reply = send(&state, get("/lookup/some/thing?q=1")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let id = reply.headers["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    assert!(id.starts_with("mock-"), "{id}");
    assert_eq!(
        reply.json(),
        json!({"ok": true, "method": "GET", "path": "/lookup/some/thing", "request_id": id})
    );
    let reply = send(
        &state,
        post("/regenerate/key", &[("x-request-id", "p1")], "payload"),
    )
    .await;
    assert_eq!(reply.json()["method"], "POST");
    assert_eq!(reply.json()["request_id"], "p1");
    send(&state, get("/lookup/some/thing")).await;
    send(&state, get("/exports")).await;

    // Introspection is not counted.
    let health = send(&state, get("/healthz")).await;
    assert_eq!(health.text(), "ok");
    send(&state, get("/stats/nope")).await;
    let reply = send(&state, get("/_mock/requests")).await;
    assert_eq!(
        reply.json(),
        json!({"total": 4, "by_path": {"/lookup/some/thing": 2, "/regenerate/key": 1, "/exports": 1},
            "by_version": {"HTTP/1.1": 4}, "connections": 0})
    );

    let reply = send(&state, get("/stats/nope")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json(), json!({"error": "unknown request id"}));

    let reply = send(
        &state,
        Request::post("/_mock/reset")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = send(&state, get("/_mock/requests")).await;
    assert_eq!(
        reply.json(),
        json!({"total": 0, "by_path": {}, "by_version": {}, "connections": 0})
    );
}

#[tokio::test]
async fn retried_request_id_counts_attempts() {
    let state = Arc::new(MockState::new());
    let headers = [("x-request-id", "retry"), ("x-mock-status", "503")];
    send(
        &state,
        post_json("/v1/chat/completions", &headers, chat_body(false, false)),
    )
    .await;
    let rec = record(&state, "retry").await;
    assert_eq!((rec.attempts, rec.status), (1, 503));
    let headers = [("x-request-id", "retry"), ("x-mock-tokens", "7")];
    send(
        &state,
        post_json("/v1/chat/completions", &headers, chat_body(false, false)),
    )
    .await;
    let rec = record(&state, "retry").await;
    assert_eq!((rec.attempts, rec.status, rec.tokens_sent), (2, 200, 7));
    assert!(rec.completed);

    let reply = send(&state, get("/stats")).await;
    let all = reply.json();
    assert_eq!(all.as_array().map(Vec::len), Some(1));
    assert_eq!(all[0]["attempts"], 2);
}

#[tokio::test]
async fn delay_applies_per_chunk_and_once_for_non_stream() {
    let state = Arc::new(MockState::new());
    let started = Instant::now();
    let reply = send(&state, get("/lookup?delay_ms=80")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(80));

    let started = Instant::now();
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions?delay_ms=30&tokens=10",
            &[],
            chat_body(false, false),
        ),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(reply.json()["usage"]["completion_tokens"], 10);
    // Once, not per token (which would be 300 ms).
    assert!(
        elapsed >= Duration::from_millis(30) && elapsed < Duration::from_millis(250),
        "{elapsed:?}"
    );

    // role + 2 tokens + finish + [DONE] = 5 events, 30 ms each.
    let started = Instant::now();
    let reply = send(
        &state,
        post_json(
            "/v1/chat/completions?delay_ms=30&tokens=2",
            &[],
            chat_body(true, false),
        ),
    )
    .await;
    assert_eq!(reply.data_events().len(), 5);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
}
