//! The proxy (`ProxyHttp`): identify the subject, find the route, decide against the engine before
//! any upstream connection, answer refusals itself, and forward admitted requests with bodies
//! streamed through untouched.

use crate::guardrail::{Standing, standing};
use crate::headers::{ceil_s, ratelimit, ratelimit_policy, refusal_body};
use crate::state::AppState;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use quota::engine::{Decision, Reason};
use quota::policy::{EntitlementSource, Subject, Upstream};
use std::sync::Arc;
use std::time::Instant;

pub struct Gateway {
    state: Arc<AppState>,
}

impl Gateway {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

/// Per-request state carried between the proxy phases.
pub struct Ctx {
    started: Instant,
    pub(crate) request_id: String,
    route: Option<Arc<str>>,
    /// The normalized path and the query, when they differ from the request's: what routes
    /// matched.
    pub(crate) path_and_query: Option<String>,
    /// The path and query the upstream receives, when they differ from the request's (path
    /// normalized, prefix rewritten, base path added).
    pub(crate) upstream_pq: Option<String>,
    pub(crate) upstream: Option<Arc<Upstream>>,
    pub(crate) decision: Option<Decision>,
    /// A plain route's charge, given back if the request never reaches the upstream.
    charged: Option<Charge>,
    /// No connection to the upstream could be made for this request (so far).
    never_sent: bool,
}

/// What a plain request consumed, to give back when it was never sent.
struct Charge {
    subject: Arc<Subject>,
    quota: Arc<str>,
    cost: u64,
    at_ns: i64,
    local: bool,
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

/// Answer a refused decision: 429 with the quota's state, or 403 when the tier lacks the quota.
pub(crate) async fn refuse(
    state: &AppState,
    session: &mut Session,
    ctx: &Ctx,
    subject: &Subject,
    costs: &[(&str, u64)],
    decision: &Decision,
) -> Result<()> {
    let rid = &ctx.request_id;
    // The quota that refused: for a multi-quota reservation, the binding limit's.
    let (first, first_cost) = costs.first().copied().unwrap_or(("", 0));
    let quota = decision.binding().map_or(first, |l| &*l.quota_type);
    let amount = costs
        .iter()
        .find(|(q, _)| *q == quota)
        .map_or(first_cost, |(_, c)| *c);
    let reason = match decision.reason {
        Reason::NotInTier => "quota_not_in_tier",
        _ => "quota_exceeded",
    };
    state.record_decision(subject, Some(rid), quota, amount, Some(reason));
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
    extra.extend(ratelimit_policy(decision).map(|v| ("ratelimit-policy", v)));
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

/// The API key from `Authorization: Bearer <key>` or `x-api-key`.
fn api_key(req: &RequestHeader) -> Option<&str> {
    if let Some(v) = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, key) = v.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then_some(key.trim());
    }
    req.headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn host(req: &RequestHeader) -> Option<&str> {
    req.uri
        .host()
        .or_else(|| req.headers.get("host").and_then(|v| v.to_str().ok()))
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

pub(crate) fn error_body(
    error: &str,
    message: impl Into<String>,
    request_id: &str,
) -> serde_json::Value {
    serde_json::json!({ "error": error, "message": message.into(), "request_id": request_id })
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            request_id: String::new(),
            route: None,
            path_and_query: None,
            upstream_pq: None,
            upstream: None,
            decision: None,
            charged: None,
            never_sent: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = match req
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
        {
            Some(id) if !id.is_empty() && id.len() <= 200 => id.to_string(),
            _ => uuid::Uuid::now_v7().to_string(),
        };
        let policy = self.state.policy.load_full();
        let key = api_key(req).filter(|k| !k.is_empty());
        let subject = match key.map(|k| (k, policy.subject_for_key(k))) {
            Some((_, Some(s))) => s,
            // A key we have never seen may be one the control plane issued while we could not
            // hear it: not "unauthorized" but "try again", unless the policy admits guests.
            Some((_, None))
                if self
                    .state
                    .control_plane
                    .as_ref()
                    .is_some_and(|l| l.unreachable()) =>
            {
                match &policy.guest {
                    // One subject for every such key: made-up keys share one guest quota.
                    Some(guest) => guest.clone(),
                    None => {
                        let msg = "this key's entitlement cannot be checked while the control plane is unreachable; retry shortly";
                        respond_json(
                            session,
                            503,
                            error_body("entitlement_unavailable", msg, &ctx.request_id),
                            &[("retry-after", "3".to_string())],
                            &ctx.request_id,
                        )
                        .await?;
                        return Ok(true);
                    }
                }
            }
            _ => {
                let msg = "a valid API key is required (Authorization: Bearer <key> or x-api-key)";
                respond_json(
                    session,
                    401,
                    error_body("unauthorized", msg, &ctx.request_id),
                    &[],
                    &ctx.request_id,
                )
                .await?;
                return Ok(true);
            }
        };
        if !subject.enabled {
            let msg = format!("subject `{}` is disabled", subject.id);
            respond_json(
                session,
                403,
                error_body("subject_disabled", msg, &ctx.request_id),
                &[],
                &ctx.request_id,
            )
            .await?;
            return Ok(true);
        }
        let path = match quota::http_path::normalize(req.uri.path()) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("invalid request path: {e}");
                respond_json(
                    session,
                    400,
                    error_body("invalid_path", msg, &ctx.request_id),
                    &[],
                    &ctx.request_id,
                )
                .await?;
                return Ok(true);
            }
        };
        let route = policy.route(req.method.as_str(), host(req), &path);
        // The upstream gets the path that was matched and billed; only rebuilt when it differs.
        if path != req.uri.path() {
            ctx.path_and_query = Some(match req.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            });
        }
        let Some(route) = route else {
            let msg = format!("no route for {} {path}", req.method);
            respond_json(
                session,
                404,
                error_body("no_route", msg, &ctx.request_id),
                &[],
                &ctx.request_id,
            )
            .await?;
            return Ok(true);
        };
        ctx.route = Some(route.name.clone());
        ctx.upstream = Some(route.upstream.clone());
        if route.expensive
            && let Some(g) = &policy.guardrail
            && let Standing::Tripped {
                used,
                limit,
                reset_after_ns,
            } = standing(&self.state, &subject, g).await
        {
            let m = &self.state.metrics;
            if let Some(fallback) = &route.fallback_upstream {
                m.guardrail_actions.with_label_values(&["fallback"]).inc();
                ctx.upstream = Some(fallback.clone());
            } else {
                m.guardrail_actions.with_label_values(&["refused"]).inc();
                let rid = &ctx.request_id;
                let pct = used as f64 * 100.0 / limit.max(1) as f64;
                let msg = format!(
                    "spend today is at {pct:.0}% of the budget: expensive route `{}` is paused until the budget resets",
                    route.name
                );
                let mut body = error_body("cost_guardrail", msg, rid);
                body["quota"] = (*g.quota).into();
                body["used"] = used.into();
                body["limit"] = limit.into();
                body["retry_after_s"] = ceil_s(reset_after_ns).into();
                body["reset_at"] =
                    crate::headers::rfc3339(self.state.clock.now_ns() + reset_after_ns).into();
                let retry = ("retry-after", ceil_s(reset_after_ns).max(1).to_string());
                respond_json(session, 429, body, &[retry], rid).await?;
                return Ok(true);
            }
        }
        if let Some(up) = &ctx.upstream {
            let client = ctx
                .path_and_query
                .as_deref()
                .or_else(|| {
                    session
                        .req_header()
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str())
                })
                .unwrap_or("/");
            let target = route.upstream_path(up, client);
            if Some(&*target)
                != session
                    .req_header()
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
            {
                ctx.upstream_pq = Some(target.into_owned());
            }
        }
        if let Some(llm) = &route.llm
            && crate::llm::serve(
                &self.state,
                session,
                ctx,
                &policy,
                route,
                llm,
                subject.clone(),
            )
            .await?
        {
            return Ok(true);
        }
        let (quota, cost) = (route.quota.clone(), route.cost);
        let decided_at = self.state.clock.now_ns();
        let decision = self
            .state
            .engine
            .decide(&subject, &quota, cost, None, decided_at, policy.failure)
            .await;
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, subject = %subject.id, "quota check failed");
                let body = error_body(
                    "quota_unavailable",
                    "quota service unavailable",
                    &ctx.request_id,
                );
                respond_json(
                    session,
                    503,
                    body,
                    &[("retry-after", "1".into())],
                    &ctx.request_id,
                )
                .await?;
                return Ok(true);
            }
        };
        let m = &self.state.metrics;
        if let Some(mode) = decision.degraded {
            m.backend_fallbacks
                .with_label_values(&[fallback_label(mode)])
                .inc();
        }
        if !decision.allowed {
            refuse(
                &self.state,
                session,
                ctx,
                &subject,
                &[(&quota, cost)],
                &decision,
            )
            .await?;
            return Ok(true);
        }
        self.state
            .record_decision(&subject, Some(&ctx.request_id), &quota, cost, None);
        ctx.charged = Some(Charge {
            local: decision.degraded.is_some(),
            subject,
            quota,
            cost,
            at_ns: decided_at,
        });
        ctx.decision = Some(decision);
        Ok(false)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        e: Box<Error>,
    ) -> Box<Error> {
        ctx.never_sent = true;
        e
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(up) = ctx.upstream.clone() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no upstream chosen",
            ));
        };
        match self.state.upstreams.peer(&up).await {
            Ok(peer) => Ok(Box::new(peer)),
            Err(e) => {
                // Never sent: the charge is given back in `logging`.
                ctx.never_sent = true;
                Err(Error::explain(ErrorType::ConnectNoRoute, e.to_string()))
            }
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(up) = ctx.upstream.as_ref() else {
            return Ok(());
        };
        let pq = match &ctx.upstream_pq {
            Some(pq) => pq.clone(),
            None => upstream_request
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        };
        crate::upstream::shape(upstream_request, up, &pq, &ctx.request_id).map_err(|e| {
            Error::because(ErrorType::InternalError, "shaping the upstream request", e)
        })
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        resp.insert_header("x-request-id", &ctx.request_id)?;
        if let Some(d) = &ctx.decision {
            if let Some(v) = ratelimit_policy(d) {
                resp.insert_header("ratelimit-policy", v)?;
            }
            if let Some(v) = ratelimit(d) {
                resp.insert_header("ratelimit", v)?;
            }
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let m = &self.state.metrics;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route.as_deref().unwrap_or("-");
        m.requests
            .with_label_values(&[route, status_label(status)])
            .inc();
        m.request_duration
            .observe(ctx.started.elapsed().as_secs_f64());
        // Admitted but never sent (the upstream could not be reached): the units go back.
        if e.is_some()
            && ctx.never_sent
            && let Some(c) = ctx.charged.take()
        {
            let state = self.state.clone();
            tokio::spawn(async move {
                let now = state.clock.now_ns();
                let given = state
                    .engine
                    .release(&c.subject, &c.quota, c.cost, c.at_ns, now, c.local)
                    .await;
                match given {
                    Ok(()) => state
                        .metrics
                        .quota_released
                        .with_label_values(&[&*c.quota])
                        .inc_by(c.cost),
                    Err(e) => {
                        tracing::warn!(error = %e, subject = %c.subject.id, "units of an unsent request not given back")
                    }
                }
            });
        }
        if let (Some(e), Some(up)) = (e, &ctx.upstream)
            && e.esource() == &ErrorSource::Upstream
        {
            m.upstream_errors.with_label_values(&[&*up.name]).inc();
            tracing::warn!(upstream = %up.name, request_id = %ctx.request_id, error = %e, "upstream error");
        }
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        401 => "401",
        403 => "403",
        404 => "404",
        429 => "429",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

fn fallback_label(mode: quota::policy::FailureMode) -> &'static str {
    match mode {
        quota::policy::FailureMode::FailOpen => "fail_open",
        quota::policy::FailureMode::FailClosed => "fail_closed",
        quota::policy::FailureMode::Local => "local",
    }
}
