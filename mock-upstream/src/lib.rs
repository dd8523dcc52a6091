//! `mock-upstream`: a real HTTP/SSE server that behaves like the OpenAI and
//! Anthropic APIs and like plain lookup APIs, with faults on request, so the
//! gateway's tests can run against something that streams like the real thing.
//!
//! This file owns the router, the request-id/request-counting middleware and
//! `serve` (plain HTTP/1.1). Faults: [`faults`]; bookkeeping: [`stats`];
//! HTTPS with HTTP/2: [`tls`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Version};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

mod anthropic;
pub mod faults;
mod llm;
mod openai;
mod plain;
mod responses;
mod sse;
pub mod stats;
pub mod tls;
pub mod tokens;

pub use stats::{MockState, RequestCounts, RequestRecord};

/// Request and response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Response header saying which HTTP version the request came in (`HTTP/1.1`, `HTTP/2`), so a
/// test can tell how a proxy reached the mock.
pub const HTTP_VERSION_HEADER: &str = "x-mock-http-version";

/// Largest request body accepted.
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// The id of the current request, put in the request extensions by the
/// middleware for handlers to read.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub String);

/// The whole mock as a router.
pub fn app(state: Arc<MockState>) -> Router {
    Router::new()
        .merge(provider_api())
        // A provider mounted under a base path, as some are (`/anthropic/v1/messages`).
        .nest("/anthropic", provider_api())
        .route("/healthz", get(plain::healthz))
        .route("/stats", get(stats::list_records))
        .route("/stats/{request_id}", get(stats::get_record))
        .route("/_mock/requests", get(stats::request_counts))
        .route("/_mock/reset", post(stats::reset))
        .fallback(plain::echo)
        // Big prompts are legitimate test input; axum's 2 MB default is not.
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            request_context,
        ))
        .with_state(state)
}

/// The provider endpoints.
fn provider_api() -> Router<Arc<MockState>> {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/embeddings", post(responses::embeddings))
}

/// Serve `app` on an already bound listener until the server fails.
pub async fn serve(listener: TcpListener, state: Arc<MockState>) -> io::Result<()> {
    // Without TCP_NODELAY, small SSE frames can sit in Nagle's buffer and
    // blur the chunk timing tests observe.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY: {e}");
        }
    });
    let app = app(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).await
}

/// How [`HTTP_VERSION_HEADER`] and the request counts name an HTTP version.
pub fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "other",
    }
}

/// Paths that observe the mock rather than use it, so they are not counted.
fn is_introspection(path: &str) -> bool {
    path == "/healthz"
        || path == "/stats"
        || path.starts_with("/stats/")
        || path == "/_mock"
        || path.starts_with("/_mock/")
}

/// Counts the request (by path, HTTP version and connection), settles its id
/// (given or generated) and echoes it in the response, with the HTTP version.
async fn request_context(
    State(state): State<Arc<MockState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let version = version_name(request.version());
    if !is_introspection(path) {
        // No peer in-process (`oneshot`): such requests count no connection.
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        state.count_request(path, version, peer);
    }
    let given = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    let id = given.unwrap_or_else(|| state.next_request_id());
    // The id is visible ASCII either way (checked by to_str, or generated).
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("mock"));
    request
        .headers_mut()
        .insert(REQUEST_ID_HEADER, value.clone());
    tracing::debug!(method = %request.method(), uri = %request.uri(), request_id = %id, "request");
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID_HEADER, value);
    headers.insert(HTTP_VERSION_HEADER, HeaderValue::from_static(version));
    response
}
