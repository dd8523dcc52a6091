//! Anthropic-compatible `POST /v1/messages`: the non-stream message and the
//! named-event SSE stream (`message_start` ... `message_stop`).

use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;

use crate::llm::{Call, Flavor, Incoming};
use crate::sse::{self, Script};
use crate::tokens;

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(flatten)]
    cache: Cache,
}

/// Cache counts, reported only when the request asked for them (as Anthropic leaves them out
/// for prompts without cache control on older models).
#[derive(Serialize, Clone, Copy)]
struct Cache {
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Serialize)]
struct OutputUsage {
    output_tokens: u64,
    #[serde(flatten)]
    cache: Cache,
}

#[derive(Serialize)]
struct Text<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

impl<'a> Text<'a> {
    fn block(text: &'a str) -> Self {
        Self { kind: "text", text }
    }

    fn delta(text: &'a str) -> Self {
        Self {
            kind: "text_delta",
            text,
        }
    }
}

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<Text<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<&'static str>,
}

/// Stream events; the tag doubles as the SSE `event:` name.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: Message<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: Text<'a>,
    },
    Ping,
    ContentBlockDelta {
        index: u32,
        delta: Text<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: StopDelta,
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<OutputUsage>,
    },
    MessageStop,
}

impl Event<'_> {
    fn frame(&self) -> Bytes {
        let name = match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::Ping => "ping",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
        };
        sse::event(name, self)
    }
}

/// `POST /v1/messages`
pub(crate) async fn messages(incoming: Incoming) -> Response {
    let call = match Call::start(Flavor::Anthropic, "/v1/messages", &incoming) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    let read = || -> Result<_, String> {
        let prompt = tokens::messages_tokens(call.messages()?)
            + call.body.get("system").map_or(0, tokens::content_words);
        // Lenient: the real API requires max_tokens, tests need not send it.
        let max_tokens = call.opt_u64("max_tokens")?;
        Ok((call.model()?, call.opt_bool("stream")?, prompt, max_tokens))
    };
    let (model, stream, prompt_tokens, max_tokens) = match read() {
        Ok(read) => read,
        Err(msg) => return call.bad_request(&msg),
    };
    let (tokens, truncated) = call.faults.output_tokens(max_tokens);
    call.guard.plan(&model, stream, prompt_tokens, tokens);
    let (cache_write, cache_read) = (call.faults.cache_write, call.faults.cache_read);
    let cache = Cache {
        cache_creation_input_tokens: (cache_write > 0).then_some(cache_write),
        cache_read_input_tokens: (cache_read > 0).then_some(cache_read),
    };
    if !call.faults.omit_usage {
        call.guard.kinds(0, cache_write, cache_read, 0);
    }
    let call = match call.forced_status().await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let id = format!("msg_{}", incoming.request_id);
    let stop_reason = if truncated { "max_tokens" } else { "end_turn" };
    let omit_usage = call.faults.omit_usage;

    if !stream {
        let text = tokens::text(tokens);
        let body = Message {
            id: &id,
            kind: "message",
            role: "assistant",
            model: &model,
            content: vec![Text::block(&text)],
            stop_reason: Some(stop_reason),
            stop_sequence: None,
            usage: (!omit_usage).then_some(Usage {
                input_tokens: prompt_tokens,
                output_tokens: tokens,
                cache,
            }),
        };
        return call.answer_json(tokens, &body).await;
    }

    let pre = vec![
        Event::MessageStart {
            message: Message {
                id: &id,
                kind: "message",
                role: "assistant",
                model: &model,
                content: Vec::new(),
                stop_reason: None,
                stop_sequence: None,
                // Anthropic reports a provisional output count of 1 here.
                usage: (!omit_usage).then_some(Usage {
                    input_tokens: prompt_tokens,
                    output_tokens: 1,
                    cache,
                }),
            },
        }
        .frame(),
        Event::ContentBlockStart {
            index: 0,
            content_block: Text::block(""),
        }
        .frame(),
        Event::Ping.frame(),
    ];
    let post = vec![
        Event::ContentBlockStop { index: 0 }.frame(),
        Event::MessageDelta {
            delta: StopDelta {
                stop_reason,
                stop_sequence: None,
            },
            // The final counts repeat the cache counts, as current Anthropic streams do.
            usage: (!omit_usage).then_some(OutputUsage {
                output_tokens: tokens,
                cache,
            }),
        }
        .frame(),
        Event::MessageStop.frame(),
    ];
    let render = |token: &str| {
        Event::ContentBlockDelta {
            index: 0,
            delta: Text::delta(token),
        }
        .frame()
    };
    call.answer_stream(Script {
        pre,
        tokens,
        render,
        post,
    })
}
