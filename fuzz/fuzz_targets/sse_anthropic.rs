//! The SSE meter reading Anthropic streams (see `tollgate_fuzz::sse`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tollgate_fuzz::sse(quota::llm::Provider::Anthropic, data);
});
