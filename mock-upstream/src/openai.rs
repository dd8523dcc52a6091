//! OpenAI-compatible endpoints: `POST /v1/chat/completions` and the legacy
//! `POST /v1/completions`, non-stream and SSE, with OpenAI's usage rules
//! (`stream_options.include_usage`).

use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::llm::{Call, Flavor, Incoming, now_unix};
use crate::sse::{self, Script};
use crate::tokens;

#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<Cached>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<Reasoning>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Cached {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Reasoning {
    pub reasoning_tokens: u64,
}

impl Usage {
    /// `prompt` includes `cached`; the reported output is the visible `completion` plus
    /// `reasoning`, as OpenAI counts them.
    fn new(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> Self {
        let completion = completion + reasoning;
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: (cached > 0).then_some(Cached {
                cached_tokens: cached,
            }),
            completion_tokens_details: (reasoning > 0).then_some(Reasoning {
                reasoning_tokens: reasoning,
            }),
        }
    }
}

/// How `usage` appears on stream chunks: absent, `null` on every chunk
/// (include_usage), or the counts on the final usage chunk.
type ChunkUsage = Option<Option<Usage>>;

#[derive(Serialize)]
struct Completion<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: ChunkUsage,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: ChatMessage<'a>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// The parts of a request both endpoints need.
struct Plan {
    id: String,
    created: u64,
    model: String,
    stream: bool,
    /// Usage chunk requested and not omitted.
    stream_usage: bool,
    omit_usage: bool,
    prompt_tokens: u64,
    tokens: u64,
    cached: u64,
    reasoning: u64,
    finish_reason: &'static str,
}

impl Plan {
    fn read(
        call: &Call,
        prefix: &str,
        request_id: &str,
        max_tokens: Option<u64>,
        prompt_tokens: u64,
    ) -> Result<Self, String> {
        let model = call.model()?;
        let stream = call.opt_bool("stream")?;
        let include_usage = match call.body.get("stream_options") {
            Some(Value::Object(o)) => o
                .get("include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            _ => false,
        };
        let (tokens, truncated) = call.faults.output_tokens(max_tokens);
        let omit_usage = call.faults.omit_usage;
        call.guard.plan(&model, stream, prompt_tokens, tokens);
        let cached = call.faults.cached_tokens.min(prompt_tokens);
        let reasoning = call.faults.reasoning_tokens;
        if !omit_usage {
            call.guard.kinds(cached, 0, 0, reasoning);
        }
        Ok(Self {
            id: format!("{prefix}{request_id}"),
            created: now_unix(),
            model,
            stream,
            stream_usage: include_usage && !omit_usage,
            omit_usage,
            prompt_tokens,
            tokens,
            cached,
            reasoning,
            finish_reason: if truncated { "length" } else { "stop" },
        })
    }

    fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.tokens, self.cached, self.reasoning)
    }

    /// `usage` field of ordinary stream chunks.
    fn chunk_usage(&self) -> ChunkUsage {
        self.stream_usage.then_some(None)
    }

    fn chunk<C: Serialize>(&self, object: &'static str, choice: C) -> Bytes {
        sse::data(&Completion {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices: vec![choice],
            usage: self.chunk_usage(),
        })
    }

    /// Final usage chunk (empty choices), then `[DONE]`.
    fn tail(&self, object: &'static str) -> Vec<Bytes> {
        let mut tail = Vec::new();
        if self.stream_usage {
            tail.push(sse::data(&Completion::<ChatChunkChoice> {
                id: &self.id,
                object,
                created: self.created,
                model: &self.model,
                choices: Vec::new(),
                usage: Some(Some(self.usage())),
            }));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        tail
    }
}

/// `POST /v1/chat/completions`
pub(crate) async fn chat_completions(incoming: Incoming) -> Response {
    let call = match Call::start(Flavor::OpenAi, "/v1/chat/completions", &incoming) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    let read = || -> Result<Plan, String> {
        let prompt_tokens = tokens::messages_tokens(call.messages()?);
        // The newer name wins, as OpenAI documents max_tokens as deprecated.
        let max_tokens = match call.opt_u64("max_completion_tokens")? {
            Some(max) => Some(max),
            None => call.opt_u64("max_tokens")?,
        };
        Plan::read(
            &call,
            "chatcmpl-",
            &incoming.request_id,
            max_tokens,
            prompt_tokens,
        )
    };
    let plan = match read() {
        Ok(plan) => plan,
        Err(msg) => return call.bad_request(&msg),
    };
    let call = match call.forced_status().await {
        Ok(call) => call,
        Err(response) => return response,
    };

    if !plan.stream {
        let text = tokens::text(plan.tokens);
        let body = Completion {
            id: &plan.id,
            object: "chat.completion",
            created: plan.created,
            model: &plan.model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessage {
                    role: "assistant",
                    content: &text,
                },
                finish_reason: plan.finish_reason,
            }],
            usage: (!plan.omit_usage).then_some(Some(plan.usage())),
        };
        return call.answer_json(plan.tokens, &body).await;
    }

    const OBJECT: &str = "chat.completion.chunk";
    let pre = vec![plan.chunk(
        OBJECT,
        ChatChunkChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: Some(""),
            },
            finish_reason: None,
        },
    )];
    let mut post = vec![plan.chunk(
        OBJECT,
        ChatChunkChoice {
            index: 0,
            delta: Delta::default(),
            finish_reason: Some(plan.finish_reason),
        },
    )];
    post.extend(plan.tail(OBJECT));
    let tokens = plan.tokens;
    let render = move |token: &str| {
        plan.chunk(
            OBJECT,
            ChatChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: Some(token),
                },
                finish_reason: None,
            },
        )
    };
    call.answer_stream(Script {
        pre,
        tokens,
        render,
        post,
    })
}

/// Prompt tokens of a legacy `prompt`: words of a string or of each string in
/// an array; pre-tokenized prompts (integer arrays) count their length.
fn prompt_tokens(prompt: Option<&Value>) -> Result<u64, String> {
    let invalid = || "prompt: expected a string or an array of strings".to_owned();
    match prompt {
        Some(Value::String(s)) => Ok(tokens::words(s)),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(tokens::words(s)),
                Value::Number(_) => Ok(1),
                Value::Array(ids) => Ok(ids.len() as u64),
                _ => Err(invalid()),
            })
            .sum(),
        None | Some(Value::Null) => Err("prompt: this field is required".to_owned()),
        Some(_) => Err(invalid()),
    }
}

/// `POST /v1/completions` (legacy)
pub(crate) async fn completions(incoming: Incoming) -> Response {
    let call = match Call::start(Flavor::OpenAi, "/v1/completions", &incoming) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    let read = || -> Result<Plan, String> {
        let prompt_tokens = prompt_tokens(call.body.get("prompt"))?;
        let max_tokens = call.opt_u64("max_tokens")?;
        Plan::read(
            &call,
            "cmpl-",
            &incoming.request_id,
            max_tokens,
            prompt_tokens,
        )
    };
    let plan = match read() {
        Ok(plan) => plan,
        Err(msg) => return call.bad_request(&msg),
    };
    let call = match call.forced_status().await {
        Ok(call) => call,
        Err(response) => return response,
    };

    const OBJECT: &str = "text_completion";
    if !plan.stream {
        let text = tokens::text(plan.tokens);
        let body = Completion {
            id: &plan.id,
            object: OBJECT,
            created: plan.created,
            model: &plan.model,
            choices: vec![TextChoice {
                text: &text,
                index: 0,
                logprobs: None,
                finish_reason: Some(plan.finish_reason),
            }],
            usage: (!plan.omit_usage).then_some(Some(plan.usage())),
        };
        return call.answer_json(plan.tokens, &body).await;
    }

    // Legacy streams have no role chunk: tokens first, then the finish chunk.
    let mut post = vec![plan.chunk(
        OBJECT,
        TextChoice {
            text: "",
            index: 0,
            logprobs: None,
            finish_reason: Some(plan.finish_reason),
        },
    )];
    post.extend(plan.tail(OBJECT));
    let tokens = plan.tokens;
    let render = move |token: &str| {
        plan.chunk(
            OBJECT,
            TextChoice {
                text: token,
                index: 0,
                logprobs: None,
                finish_reason: None,
            },
        )
    };
    call.answer_stream(Script {
        pre: Vec::new(),
        tokens,
        render,
        post,
    })
}
