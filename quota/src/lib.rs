//! Tollgate's quota engine: the policy model and its validation, the limiter algorithms, the
//! storage backends that hold counters, and the engine that turns a request into a decision.
//! It does no network I/O of its own beyond what a storage backend needs; billing keeps a local
//! journal of the settlements the store could not take.

pub mod audit;
pub mod billing;
pub mod calendar;
pub mod engine;
pub mod http_path;
pub mod ids;
pub mod limiter;
pub mod llm;
pub mod names;
pub mod policy;
pub mod storage;

pub use engine::{Decision, Engine, EngineError, PolicyHandle};
pub use policy::{EntitlementSource, Policy, PolicyErrors};
