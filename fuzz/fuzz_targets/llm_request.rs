//! The LLM request parser on arbitrary bodies: the first byte picks the route, the rest is the
//! body. It must return a result, never panic.
#![no_main]

use quota::llm::request::Endpoint;
use quota::llm::{Provider, request};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((route, body)) = data.split_first() else {
        return;
    };
    let (provider, path) = match route % 3 {
        0 => (Provider::OpenAi, Endpoint::Chat),
        1 => (Provider::OpenAi, Endpoint::Completions),
        _ => (Provider::Anthropic, Endpoint::Messages),
    };
    let _ = request::parse(provider, path, body, None);
});
