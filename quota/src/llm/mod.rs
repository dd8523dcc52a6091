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
    /// `/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/embeddings`:
    /// OpenAI-compatible.
    OpenAi,
    /// `/v1/messages`: Anthropic-compatible.
    Anthropic,
}

/// Token usage of one upstream call, per kind as providers bill it. The kinds are disjoint, so
/// each token is priced once:
/// - `prompt`: input at the input price (OpenAI: prompt/input tokens minus the cached ones;
///   Anthropic: `input_tokens`, which excludes cache writes and reads);
/// - `cached_input`: OpenAI's `cached_tokens` (`prompt_tokens_details`, `input_tokens_details`);
/// - `cache_write`, `cache_read`: Anthropic's `cache_creation_input_tokens`,
///   `cache_read_input_tokens`;
/// - `completion`: all output, reasoning included; `reasoning` says how much of it was reasoning
///   (OpenAI `reasoning_tokens`), for the record only: it is never added again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub cache_read: u64,
    pub reasoning: u64,
}

impl Usage {
    /// Only input and output at their base prices (estimates, reservations).
    pub fn plain(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt,
            completion,
            ..Usage::default()
        }
    }

    /// Input tokens of every kind.
    pub fn input(&self) -> u64 {
        self.prompt
            .saturating_add(self.cached_input)
            .saturating_add(self.cache_write)
            .saturating_add(self.cache_read)
    }

    /// Every token the call used: all input kinds and the output.
    pub fn total(&self) -> u64 {
        self.input().saturating_add(self.completion)
    }

    /// The tokens of the kinds in `kinds`.
    pub fn counted(&self, kinds: TokenKinds) -> u64 {
        [
            (TokenKinds::INPUT, self.prompt),
            (TokenKinds::CACHED_INPUT, self.cached_input),
            (TokenKinds::CACHE_WRITE, self.cache_write),
            (TokenKinds::CACHE_READ, self.cache_read),
            (TokenKinds::OUTPUT, self.completion),
        ]
        .iter()
        .filter(|(k, _)| kinds.contains(*k))
        .fold(0u64, |n, (_, v)| n.saturating_add(*v))
    }
}

/// A set of token kinds: which ones a route's token quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenKinds(u8);

impl TokenKinds {
    pub const INPUT: TokenKinds = TokenKinds(1);
    pub const CACHED_INPUT: TokenKinds = TokenKinds(2);
    pub const CACHE_WRITE: TokenKinds = TokenKinds(4);
    pub const CACHE_READ: TokenKinds = TokenKinds(8);
    /// Output, reasoning included.
    pub const OUTPUT: TokenKinds = TokenKinds(16);
    /// The default: every input kind and the output.
    pub const ALL: TokenKinds = TokenKinds(31);
    pub const NONE: TokenKinds = TokenKinds(0);

    pub fn contains(self, other: TokenKinds) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn with(self, other: TokenKinds) -> TokenKinds {
        TokenKinds(self.0 | other.0)
    }
}

impl Default for TokenKinds {
    fn default() -> Self {
        TokenKinds::ALL
    }
}
