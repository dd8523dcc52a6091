//! The SSE meter reading OpenAI streams, pass-through and strip mode (see `tollgate_fuzz::sse`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tollgate_fuzz::sse(quota::llm::Provider::OpenAi, data);
});
