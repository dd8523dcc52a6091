//! Tollgate's data plane: a pingora reverse proxy that decides every request against the quota
//! engine before connecting upstream, an API listener (`/check`, `/metrics`, `/status`,
//! `/healthz`), hot reload of the policy file, and TLS with HTTP/2 on the proxy listener.

pub mod admit;
pub mod api;
pub mod cp;
pub mod guardrail;
pub mod headers;
pub mod link;
pub mod llm;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod respond;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
