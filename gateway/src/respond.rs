//! What every request carries through the proxy phases (`Ctx`) and how the gateway answers by
//! itself: JSON error bodies, refusals (429/403 with the quota's state), framing of bodies it
//! writes. Shared by plain and LLM routes, so neither depends on the other for them.

use crate::headers::{ceil_s, ratelimit, ratelimit_policy, refusal_body};
use bytes::Bytes;
use pingora::Result;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use quota::engine::{Decision, Reason};
use quota::policy::{Subject, Upstream};
use std::sync::Arc;
use std::time::Instant;

/// Per-request state carried between the proxy phases.
pub struct Ctx {
    pub(crate) started: Instant,
    pub(crate) request_id: String,
    pub(crate) route: Option<Arc<str>>,
    /// The normalized path and the query, when they differ from the request's: what routes
    /// matched.
    pub(crate) path_and_query: Option<String>,
    /// The path and query the upstream receives, when they differ from the request's (path
    /// normalized, prefix rewritten, base path added).
    pub(crate) upstream_pq: Option<String>,
    pub(crate) upstream: Option<Arc<Upstream>>,
    pub(crate) decision: Option<Decision>,
    /// A plain route's charge, given back if the request never reaches the upstream.
    pub(crate) charged: Option<Charge>,
    /// No connection to the upstream could be made for this request (so far).
    pub(crate) never_sent: bool,
    /// A connection to the upstream was made for this request: an attempt may have reached it,
    /// so a later retry that fails to connect does not make it "never sent".
    pub(crate) connected: bool,
}

/// What a plain request consumed, to give back when it was never sent.
pub(crate) struct Charge {
    pub(crate) subject: Arc<Subject>,
    pub(crate) quota: Arc<str>,
    pub(crate) cost: u64,
    pub(crate) at_ns: i64,
    pub(crate) local: bool,
}

impl Ctx {
    /// The normalized path of the request (what routes matched).
    pub(crate) fn path<'a>(&'a self, req: &'a RequestHeader) -> &'a str {
        match &self.path_and_query {
            Some(pq) => pq.split_once('?').map_or(pq.as_str(), |(p, _)| p),
            None => req.uri.path(),
        }
    }
}

/// Answer a refused decision (already recorded by `admit`): 429 with the quota's state, or 403
/// when the tier lacks the quota.
pub(crate) async fn refuse(
    session: &mut Session,
    ctx: &Ctx,
    subject: &Subject,
    costs: &[(&str, u64)],
    decision: &Decision,
) -> Result<()> {
    let rid = &ctx.request_id;
    // The quota that refused: for a multi-quota reservation, the binding limit's.
    let first = costs.first().map_or("", |(q, _)| *q);
    let quota = decision.binding().map_or(first, |l| &*l.quota_type);
    if decision.reason == Reason::NotInTier {
        let msg = format!(
            "tier `{}` does not include quota `{quota}`",
            subject.tier.name
        );
        let mut body = error_body("quota_not_in_tier", msg, rid);
        body["quota"] = quota.into();
        return respond_json(session, 403, body, &[], rid).await;
    }
    let mut extra = vec![(
        "retry-after",
        ceil_s(decision.retry_after_ns()).max(1).to_string(),
    )];
    extra.extend(ratelimit_policy(decision).map(|v| ("ratelimit-policy", v.to_string())));
    extra.extend(ratelimit(decision).map(|v| ("ratelimit", v)));
    respond_json(
        session,
        429,
        refusal_body(quota, decision, rid),
        &extra,
        rid,
    )
    .await
}

fn has_body(req: &RequestHeader) -> bool {
    req.headers.contains_key("transfer-encoding")
        || req
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

pub(crate) async fn respond_json(
    session: &mut Session,
    status: u16,
    body: serde_json::Value,
    extra: &[(&'static str, String)],
    request_id: &str,
) -> Result<()> {
    let body = Bytes::from(body.to_string());
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("x-request-id", request_id)?;
    for (name, value) in extra {
        resp.insert_header(*name, value)?;
    }
    // An unread request body would be taken for the next request on this connection.
    if has_body(session.req_header()) {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Answer `status` with the plain error body ([`error_body`]) and no other header.
pub(crate) async fn respond_error(
    session: &mut Session,
    status: u16,
    error: &str,
    message: impl Into<String>,
    request_id: &str,
) -> Result<()> {
    respond_json(
        session,
        status,
        error_body(error, message, request_id),
        &[],
        request_id,
    )
    .await
}

pub(crate) fn error_body(
    error: &str,
    message: impl Into<String>,
    request_id: &str,
) -> serde_json::Value {
    serde_json::json!({ "error": error, "message": message.into(), "request_id": request_id })
}
