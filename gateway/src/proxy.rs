//! The proxy (`ProxyHttp`): identify the subject, find the route, decide against the engine before
//! any upstream connection, answer refusals itself, and forward admitted requests with bodies
//! streamed through untouched.

use crate::admit::{Ask, admit};
use crate::guardrail::Standing;
use crate::headers::{ceil_s, ratelimit, ratelimit_policy};
use crate::respond::{Charge, Ctx, error_body, refuse, respond_error, respond_json};
use crate::state::AppState;
use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use quota::policy::EntitlementSource;
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

/// Why a request's target or Host cannot be routed as sent, if so. Only origin-form targets
/// (`/path?query`) are taken: pingora routes an absolute-form or opaque target (`x:/exports`) by
/// a path of its own while the upstream gets the raw bytes (and may read another path), and
/// picks the upstream's Host from an absolute target after routing. An HTTP/1.1 request without
/// Host is malformed (RFC 9112 §3.2).
fn unroutable(req: &RequestHeader) -> Option<&'static str> {
    if req.raw_path().first() != Some(&b'/') {
        return Some("the request target must be a path (origin form: /path?query)");
    }
    if req.version == http::Version::HTTP_11 && !req.headers.contains_key(http::header::HOST) {
        return Some("an HTTP/1.1 request needs a Host header");
    }
    None
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
            connected: false,
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
            _ => quota::ids::uuid_v7().to_string(),
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
                respond_error(session, 401, "unauthorized", msg, &ctx.request_id).await?;
                return Ok(true);
            }
        };
        if !subject.enabled {
            let msg = format!("subject `{}` is disabled", subject.id);
            respond_error(session, 403, "subject_disabled", msg, &ctx.request_id).await?;
            return Ok(true);
        }
        if let Some(why) = unroutable(req) {
            respond_error(session, 400, "invalid_path", why, &ctx.request_id).await?;
            return Ok(true);
        }
        let path = match quota::http_path::normalize(req.uri.path()) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("invalid request path: {e}");
                respond_error(session, 400, "invalid_path", msg, &ctx.request_id).await?;
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
            respond_error(session, 404, "no_route", msg, &ctx.request_id).await?;
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
            } = self
                .state
                .guardrail
                .standing(&self.state.engine, self.state.clock.now_ns(), &subject, g)
                .await
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
        if ctx
            .upstream
            .as_ref()
            .is_some_and(|u| u.unresolved.is_some())
        {
            // Sending it without the credentials its headers carry would be refused upstream at
            // best, and would bill nothing useful. The operator learns the variable's name from
            // the log line written when the policy loaded (`reload`), not the client, and not
            // once per request.
            let msg = format!(
                "route `{}` is not configured on this gateway (its upstream credentials are missing)",
                route.name
            );
            respond_error(session, 503, "upstream_unconfigured", msg, &ctx.request_id).await?;
            return Ok(true);
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
        let ask = Ask::Consume {
            quota: &quota,
            cost,
            idempotency_key: None,
        };
        let rid = Some(ctx.request_id.as_str());
        let decision = admit(&self.state, &subject, rid, ask, decided_at, policy.failure).await;
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
        if !decision.allowed {
            refuse(session, ctx, &subject, &[(&quota, cost)], &decision).await?;
            return Ok(true);
        }
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
        ctx.never_sent = !ctx.connected;
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
                ctx.never_sent = !ctx.connected;
                Err(Error::explain(ErrorType::ConnectNoRoute, e.to_string()))
            }
        }
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.connected = true;
        Ok(())
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
        let target = ctx.upstream_pq.as_deref();
        crate::upstream::shape(upstream_request, up, target, &ctx.request_id).map_err(|e| {
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
