//! Understanding LLM traffic: what a request asks for (model, stream, max tokens, prompt tokens
//! counted with a real tokenizer), what it costs (price table, integer micro-units), and what the
//! response really used (usage in JSON bodies and in OpenAI/Anthropic SSE streams, parsed
//! incrementally). No I/O: the gateway feeds bytes in.

/// A substring searcher for a fixed needle, built once per call site: streams scan every event
/// with these, and building a searcher costs more than most searches.
macro_rules! finder {
    ($needle:expr) => {{
        static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new($needle));
        &*FINDER
    }};
}

pub mod ceiling;
pub mod price;
pub mod request;
pub mod sse;
pub mod tokens;

/// Which wire format a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// `/v1/chat/completions`, `/v1/completions`: OpenAI-compatible.
    OpenAi,
    /// `/v1/messages`: Anthropic-compatible.
    Anthropic,
}

/// Token usage of one upstream call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }
}
