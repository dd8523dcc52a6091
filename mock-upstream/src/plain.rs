//! Plain (non-LLM) endpoints: the catch-all JSON echo used for lookup-style
//! APIs (`/lookup`, `/regenerate...`, `/exports...`, anything unmatched) and
//! `/healthz`.

use axum::Extension;
use axum::Json;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

use crate::RequestId;
use crate::faults::Faults;

#[derive(Serialize)]
struct Echo<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    method: &'a str,
    path: &'a str,
    request_id: &'a str,
    /// The credentials the upstream received, so a test can check what a gateway forwards.
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x_api_key: Option<&'a str>,
}

/// Any method, any unmatched path: echo it back, honouring `status` and
/// `delay_ms`.
pub(crate) async fn echo(
    Extension(RequestId(request_id)): Extension<RequestId>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    // Read (and drop) the body so the connection stays reusable.
    _body: Bytes,
) -> Response {
    let echo = |ok, error| Echo {
        ok,
        error,
        method: method.as_str(),
        path: uri.path(),
        request_id: &request_id,
        authorization: headers.get("authorization").and_then(|v| v.to_str().ok()),
        x_api_key: headers.get("x-api-key").and_then(|v| v.to_str().ok()),
    };
    let faults = match Faults::from_request(&headers, &uri) {
        Ok(faults) => faults,
        Err(msg) => return (StatusCode::BAD_REQUEST, Json(echo(false, Some(msg)))).into_response(),
    };
    faults.sleep_once().await;
    match faults.status {
        Some(status) => {
            let msg = format!("mock fault: forced HTTP {}", status.as_u16());
            (status, Json(echo(false, Some(msg)))).into_response()
        }
        None => Json(echo(true, None)).into_response(),
    }
}

/// `GET /healthz`
pub(crate) async fn healthz() -> &'static str {
    "ok"
}
