//! What every LLM endpoint does the same way: open the stats record, read the
//! faults and the JSON body, answer errors in the provider's format, and
//! deliver the answer (JSON or SSE) under the delay/cut faults.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::RequestId;
use crate::faults::Faults;
use crate::sse::{self, Script};
use crate::stats::{MockState, StatsGuard};

/// What every LLM endpoint reads of a request: the mock's state, the request id the middleware
/// set, the headers and query (faults) and the body.
pub(crate) struct Incoming {
    state: Arc<MockState>,
    pub(crate) request_id: String,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
}

impl FromRequest<Arc<MockState>> for Incoming {
    type Rejection = Response;

    async fn from_request(req: Request, state: &Arc<MockState>) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let (headers, uri) = (parts.headers.clone(), parts.uri.clone());
        let body = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Self {
            state: state.clone(),
            request_id,
            headers,
            uri,
            body,
        })
    }
}

/// Whose error format to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    OpenAi,
    Anthropic,
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    error: OpenAiErrorBody<'a>,
}

#[derive(Serialize)]
struct OpenAiErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct AnthropicError<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicErrorBody<'a>,
}

#[derive(Serialize)]
struct AnthropicErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

impl Flavor {
    /// An error response shaped like the real provider's for `status`.
    pub(crate) fn error(self, status: StatusCode, message: &str) -> Response {
        let code = status.as_u16();
        match self {
            Flavor::OpenAi => {
                let (kind, code) = match code {
                    401 => ("invalid_request_error", Some("invalid_api_key")),
                    429 => ("requests", Some("rate_limit_exceeded")),
                    500..=599 => ("server_error", None),
                    _ => ("invalid_request_error", None),
                };
                let body = OpenAiError {
                    error: OpenAiErrorBody {
                        message,
                        kind,
                        param: None,
                        code,
                    },
                };
                (status, Json(body)).into_response()
            }
            Flavor::Anthropic => {
                let kind = match code {
                    400 => "invalid_request_error",
                    401 => "authentication_error",
                    403 => "permission_error",
                    404 => "not_found_error",
                    413 => "request_too_large",
                    429 => "rate_limit_error",
                    529 => "overloaded_error",
                    500..=599 => "api_error",
                    _ => "invalid_request_error",
                };
                let body = AnthropicError {
                    kind: "error",
                    error: AnthropicErrorBody { kind, message },
                };
                (status, Json(body)).into_response()
            }
        }
    }
}

/// One LLM request on its way: stats record, faults and the parsed body.
pub(crate) struct Call {
    pub flavor: Flavor,
    pub guard: StatsGuard,
    pub faults: Faults,
    pub body: Map<String, Value>,
}

impl Call {
    /// Open the record, then read faults and body; a bad one is a 400 in the
    /// provider's format (boxed: a `Response` is large for an `Err`).
    pub(crate) fn start(
        flavor: Flavor,
        endpoint: &str,
        incoming: &Incoming,
    ) -> Result<Self, Box<Response>> {
        let Incoming {
            state,
            request_id,
            headers,
            uri,
            body,
        } = incoming;
        let guard = StatsGuard::begin(state, request_id, endpoint);
        let faults = match Faults::from_request(headers, uri) {
            Ok(faults) => faults,
            Err(msg) => {
                return Err(Box::new(reject(
                    guard,
                    flavor,
                    StatusCode::BAD_REQUEST,
                    &msg,
                )));
            }
        };
        let body = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                let msg = "request body must be a JSON object";
                return Err(Box::new(reject(
                    guard,
                    flavor,
                    StatusCode::BAD_REQUEST,
                    msg,
                )));
            }
            Err(e) => {
                let msg = format!("could not parse the JSON body of your request: {e}");
                return Err(Box::new(reject(
                    guard,
                    flavor,
                    StatusCode::BAD_REQUEST,
                    &msg,
                )));
            }
        };
        Ok(Self {
            flavor,
            guard,
            faults,
            body,
        })
    }

    /// A field error found after `start`.
    pub(crate) fn bad_request(self, message: &str) -> Response {
        reject(self.guard, self.flavor, StatusCode::BAD_REQUEST, message)
    }

    /// Apply the `status` fault, if any: wait the delay once, then answer it.
    pub(crate) async fn forced_status(self) -> Result<Self, Response> {
        let Some(status) = self.faults.status else {
            return Ok(self);
        };
        self.faults.sleep_once().await;
        let msg = format!("mock fault: forced HTTP {}", status.as_u16());
        Err(reject(self.guard, self.flavor, status, &msg))
    }

    /// Non-stream answer of `tokens` output tokens, after the delay. With a
    /// `cut_after` fault the headers go out and the body is aborted before
    /// its first byte (an upstream dying mid-response).
    pub(crate) async fn answer_json(mut self, tokens: u64, value: &impl Serialize) -> Response {
        self.faults.sleep_once().await;
        if self.faults.cut_after.is_some() {
            let script = Script {
                pre: Vec::new(),
                tokens: 0,
                render: |_: &str| Bytes::new(),
                post: Vec::new(),
            };
            let mut response = Response::new(sse::body(script, None, Some(0), self.guard));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return response;
        }
        self.guard.sent(0, tokens);
        self.guard.finish(200, true);
        let mut json = sse::to_json(value);
        json.extend(std::iter::repeat_n(' ', self.faults.pad_bytes as usize));
        let mut response = Response::new(Body::from(json));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }

    /// Streamed answer playing `script` under the delay/cut faults.
    pub(crate) fn answer_stream<F>(self, script: Script<F>) -> Response
    where
        F: Fn(&str) -> Bytes + Send + 'static,
    {
        if self.faults.whole {
            return sse::response(sse::whole(script, self.guard));
        }
        let body = sse::body(script, self.faults.delay, self.faults.cut_after, self.guard);
        sse::response(body)
    }

    /// `model` as given; lenient when absent so minimal test bodies work.
    pub(crate) fn model(&self) -> Result<String, String> {
        match self.body.get("model") {
            None | Some(Value::Null) => Ok(DEFAULT_MODEL.to_owned()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err("model: expected a string".to_owned()),
        }
    }

    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>, String> {
        match self.body.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{key}: expected a non-negative integer")),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<bool, String> {
        match self.body.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("{key}: expected a boolean")),
        }
    }

    pub(crate) fn messages(&self) -> Result<&[Value], String> {
        match self.body.get("messages") {
            Some(Value::Array(messages)) => Ok(messages),
            None | Some(Value::Null) => Err("messages: this field is required".to_owned()),
            Some(_) => Err("messages: expected an array".to_owned()),
        }
    }
}

/// Model answered when the request names none.
pub(crate) const DEFAULT_MODEL: &str = "mock-model";

fn reject(mut guard: StatsGuard, flavor: Flavor, status: StatusCode, message: &str) -> Response {
    guard.finish(status.as_u16(), false);
    flavor.error(status, message)
}

/// Unix seconds, for `created` fields.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
