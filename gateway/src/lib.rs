//! Tollgate's data plane: a pingora reverse proxy that decides every request against the quota
//! engine before connecting upstream, an API listener (`/check`, `/metrics`, `/status`,
//! `/healthz`), and hot reload of the policy file.

pub mod api;
pub mod cp;
pub mod guardrail;
pub mod headers;
pub mod llm;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod respond;
pub mod server;
pub mod state;
pub mod upstream;
