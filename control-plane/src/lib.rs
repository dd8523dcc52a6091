//! Tollgate's control plane: admins change policies and entitlements over REST; every change is a
//! new revision, validated with the gateway's own policy code, stored (SQLite or PostgreSQL),
//! audited, and pushed to every watching gateway.

pub mod api;
pub mod auth;
pub mod console;
pub mod error;
pub mod gateways;
pub mod ingest;
pub mod ledger;
pub mod reconcile;
pub mod secrets;
pub mod state;
pub mod store;
pub mod usage;
pub mod watch;
pub mod write;

pub use api::app;
pub use state::AppState;
pub use store::Store;
