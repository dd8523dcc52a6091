//! LLM routes: one billing path for streamed and plain responses — reserve, forward, meter,
//! settle.
//!
//! The gateway makes the upstream call itself (instead of pingora's proxy loop) because billing
//! needs what pingora would drop: when a client disconnects mid-stream, pingora closes the
//! upstream too, but Tollgate keeps reading it in the background (bounded by the route's
//! `drain_ms`/`drain_bytes`) to learn the real usage. Every exit path settles: completed, cut,
//! upstream error, client gone — and a `Bill` dropped unsettled settles what it knows.

use crate::headers::{ratelimit, ratelimit_policy};
use crate::proxy::{CLIENT_CREDENTIALS, Ctx, error_body, refuse, respond_json};
use crate::state::AppState;
use bytes::Bytes;
use futures_util::StreamExt;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use quota::audit::{EventBody, Settlement};
use quota::llm::price::Price;
use quota::llm::request::{LlmRequest, parse, with_usage_requested};
use quota::llm::sse::{StreamMeter, json_usage};
use quota::llm::{Provider, Usage};
use quota::policy::{FailureMode, LlmRoute, Policy, Route, Subject};
use quota::storage::Settled;
use std::sync::Arc;
use std::time::Instant;

/// Headers that belong to one hop and are not forwarded.
const HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

/// What one upstream attempt reserved and how to settle it, exactly once.
struct Bill {
    state: Arc<AppState>,
    subject: Arc<Subject>,
    route_quota: Arc<str>,
    route_cost: u64,
    llm: Arc<LlmRoute>,
    price: Option<Price>,
    attempt_id: String,
    reserved_at_ns: i64,
    prompt_estimate: u64,
    /// What was reserved, per quota type, for the settlement's audit record.
    reserved: Vec<(Arc<str>, u64)>,
    request_id: String,
    /// Reserved in this gateway's local store with this share of each limit (the shared store
    /// was down): settle there, the same way.
    local: Option<f64>,
    settled: bool,
}

impl Bill {
    fn actual(&self, usage: Usage, answered: bool) -> Vec<(Arc<str>, u64)> {
        let mut v = vec![
            // A failed call is not a request served.
            (
                self.route_quota.clone(),
                if answered { self.route_cost } else { 0 },
            ),
            (self.llm.tokens_quota.clone(), usage.total()),
        ];
        if let (Some(q), Some(p)) = (&self.llm.spend_quota, self.price) {
            v.push((q.clone(), p.cost_micros(usage.prompt, usage.completion)));
        }
        v
    }

    /// What settling with `usage` means, owned so it can outlive the request.
    fn settling(&mut self, usage: Usage, answered: bool) -> Settling {
        self.settled = true;
        Settling {
            state: self.state.clone(),
            subject: self.subject.clone(),
            attempt_id: std::mem::take(&mut self.attempt_id),
            request_id: std::mem::take(&mut self.request_id),
            reserved_at_ns: self.reserved_at_ns,
            local: self.local,
            reserved: std::mem::take(&mut self.reserved),
            actual: self.actual(usage, answered),
            usage,
            deferred: false,
        }
    }

    /// Replace the reservation with `usage`. `answered`: the upstream served the request.
    async fn settle(mut self, usage: Usage, answered: bool) {
        if let Err(s) = self.settling(usage, answered).try_once().await {
            // The shared store is unreachable: keep trying without holding up the response.
            tokio::spawn(s.retry());
        }
    }
}

/// How long a settlement the shared store could not take is retried (it is idempotent).
const SETTLE_RETRIES: u32 = 120;

/// One settlement to make, owned so it can be retried in the background.
struct Settling {
    state: Arc<AppState>,
    subject: Arc<Subject>,
    attempt_id: String,
    request_id: String,
    reserved_at_ns: i64,
    local: Option<f64>,
    reserved: Vec<(Arc<str>, u64)>,
    actual: Vec<(Arc<str>, u64)>,
    usage: Usage,
    /// An earlier try failed in transit: the store may have applied it without our hearing.
    deferred: bool,
}

impl Settling {
    /// Settle once; gives itself back when the store was unreachable.
    async fn try_once(self) -> Result<(), Settling> {
        let items: Vec<(&str, u64)> = self.actual.iter().map(|(q, n)| (&**q, *n)).collect();
        let now = self.state.clock.now_ns();
        let engine = &self.state.engine;
        let result = engine
            .settle(
                &self.subject,
                &items,
                &self.attempt_id,
                self.reserved_at_ns,
                now,
                self.local,
            )
            .await;
        let m = &self.state.metrics;
        match result {
            Ok(Settled::Charged) => self.record(),
            // The try that failed in transit was applied after all: this attempt was charged, and
            // its event not yet recorded (the ledger would miss it otherwise).
            Ok(Settled::AlreadySettled) if self.deferred => self.record(),
            Ok(Settled::AlreadySettled) => {
                m.llm_settlements.with_label_values(&["duplicate"]).inc()
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, attempt = %self.attempt_id, "settlement deferred: store unreachable");
                let mut again = self;
                again.deferred = true;
                return Err(again);
            }
            Err(e) => {
                m.llm_settlements.with_label_values(&["error"]).inc();
                tracing::error!(error = %e, attempt = %self.attempt_id, "settlement failed; the reservation will expire");
            }
        }
        Ok(())
    }

    async fn retry(mut self) {
        for _ in 0..SETTLE_RETRIES {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            match self.try_once().await {
                Ok(()) => return,
                Err(s) => self = s,
            }
        }
        self.state
            .metrics
            .llm_settlements
            .with_label_values(&["error"])
            .inc();
        tracing::error!(attempt = %self.attempt_id, "settlement abandoned; the reservation will expire");
    }

    fn record(&self) {
        let settlements = self
            .actual
            .iter()
            .map(|(q, a)| {
                let r = self
                    .reserved
                    .iter()
                    .find(|(rq, _)| rq == q)
                    .map_or(0, |(_, n)| *n);
                Settlement {
                    quota: q.to_string(),
                    reserved: r,
                    actual: *a,
                    refunded: r.saturating_sub(*a),
                }
            })
            .collect();
        let body = EventBody::ReservationSettled {
            attempt_id: self.attempt_id.clone(),
            settlements,
        };
        self.state.emit(
            &self.subject,
            Some(&self.request_id),
            self.reserved_at_ns,
            body,
        );
        let m = &self.state.metrics;
        m.llm_tokens
            .with_label_values(&["prompt"])
            .inc_by(self.usage.prompt);
        m.llm_tokens
            .with_label_values(&["completion"])
            .inc_by(self.usage.completion);
        m.llm_settlements.with_label_values(&["charged"]).inc();
    }
}

impl Drop for Bill {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // An exit path that did not settle (an early error): release all but the prompt, which
        // the upstream may have read. Runs on the current runtime, after this request.
        let usage = Usage {
            prompt: self.prompt_estimate,
            completion: 0,
        };
        let s = self.settling(usage, false);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(s) = s.try_once().await {
                    s.retry().await;
                }
            });
        }
    }
}

async fn read_body(session: &mut Session, limit: u64) -> pingora::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Serve an LLM request entirely: the caller returns `Ok(true)` afterwards.
pub async fn serve(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut Ctx,
    policy: &Policy,
    route: &Route,
    llm: &Arc<LlmRoute>,
    subject: Arc<Subject>,
) -> pingora::Result<()> {
    let rid = ctx.request_id.clone();
    let Some(body) = read_body(session, llm.max_body_bytes).await? else {
        let msg = format!("request body larger than {} bytes", llm.max_body_bytes);
        return respond_json(
            session,
            413,
            error_body("body_too_large", msg, &rid),
            &[],
            &rid,
        )
        .await;
    };
    let path = session.req_header().uri.path().to_string();
    let req = match parse(llm.provider, &path, &body) {
        Ok(r) => r,
        Err(e) => {
            return respond_json(
                session,
                400,
                error_body("invalid_request", e.to_string(), &rid),
                &[],
                &rid,
            )
            .await;
        }
    };
    let price = policy.price(&req.model);
    if llm.spend_quota.is_some() && price.is_none() {
        let msg = format!(
            "no price for model `{}`; add it (or `default`) under `models`",
            req.model
        );
        return respond_json(
            session,
            400,
            error_body("unknown_model", msg, &rid),
            &[],
            &rid,
        )
        .await;
    }
    let max_out = req.max_tokens.unwrap_or(llm.default_max_tokens);
    let mut reserve: Vec<(&str, u64)> = vec![
        (&route.quota, route.cost),
        (&llm.tokens_quota, req.prompt_tokens.saturating_add(max_out)),
    ];
    let money = price.map(|p| p.cost_micros(req.prompt_tokens, max_out));
    if let (Some(q), Some(m)) = (&llm.spend_quota, money) {
        reserve.push((q, m));
    }
    let now = state.clock.now_ns();
    let attempt_id = format!("{rid}.{}", uuid::Uuid::now_v7());
    let expires = now.saturating_add(llm.reservation_ttl.as_nanos() as i64);
    let decision = state
        .engine
        .reserve(
            &subject,
            &reserve,
            &attempt_id,
            expires,
            now,
            policy.failure,
        )
        .await;
    let decision = match decision {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "reservation failed");
            let body = error_body("quota_unavailable", "quota service unavailable", &rid);
            return respond_json(session, 503, body, &[("retry-after", "1".into())], &rid).await;
        }
    };
    if !decision.allowed {
        return refuse(state, session, ctx, &subject, &reserve, &decision).await;
    }
    let bill = Bill {
        state: state.clone(),
        subject,
        route_quota: route.quota.clone(),
        route_cost: route.cost,
        llm: llm.clone(),
        price,
        attempt_id,
        reserved_at_ns: now,
        prompt_estimate: req.prompt_tokens,
        reserved: reserve
            .iter()
            .map(|(q, n)| (Arc::<str>::from(*q), *n))
            .collect(),
        request_id: rid.clone(),
        local: decision.degraded.map(|mode| match mode {
            FailureMode::Local => policy.failure.local_share,
            _ => 1.0,
        }),
        settled: false,
    };
    ctx.decision = Some(decision);
    forward(state, session, ctx, route, llm, req, body, bill).await
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut Ctx,
    route: &Route,
    llm: &Arc<LlmRoute>,
    req: LlmRequest,
    body: Vec<u8>,
    bill: Bill,
) -> pingora::Result<()> {
    let rid = ctx.request_id.clone();
    let inject = llm.provider == Provider::OpenAi && req.stream && !req.include_usage;
    let body = if inject {
        with_usage_requested(&body).unwrap_or(body)
    } else {
        body
    };
    // The route's upstream, or its fallback when the cost guardrail diverted the request.
    let up = ctx
        .upstream
        .clone()
        .unwrap_or_else(|| route.upstream.clone());
    let up = &up;
    let scheme = if up.tls { "https" } else { "http" };
    let head = session.req_header();
    let url = format!(
        "{scheme}://{}{}",
        up.address,
        head.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut rb = state.http.request(head.method.clone(), url).body(body);
    for (name, value) in head.headers.iter() {
        let skip = HOP.contains(&name.as_str())
            || CLIENT_CREDENTIALS.contains(&name.as_str())
            || up.headers.iter().any(|(n, _)| n == name)
            || name == "host"
            || name == "accept-encoding";
        if !skip {
            rb = rb.header(name, value);
        }
    }
    for (name, value) in &up.headers {
        rb = rb.header(name, value);
    }
    // The gateway reads the stream: it must not arrive compressed.
    rb = rb
        .header("accept-encoding", "identity")
        .header("x-request-id", &rid);
    if up.tls {
        rb = rb.header("host", &up.sni);
    }
    let resp = match tokio::time::timeout(up.connect_timeout + up.read_timeout, rb.send()).await {
        Ok(Ok(r)) => r,
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            state
                .metrics
                .upstream_errors
                .with_label_values(&[&*up.name])
                .inc();
            tracing::warn!(upstream = %up.name, error = %why, request_id = %rid, "LLM upstream unreachable");
            bill.settle(Usage::default(), false).await;
            let body = error_body(
                "upstream_unavailable",
                "the upstream could not be reached",
                &rid,
            );
            return respond_json(session, 502, body, &[], &rid).await;
        }
    };
    let status = resp.status();
    let mut out = ResponseHeader::build(status.as_u16(), Some(resp.headers().len() + 4))?;
    for (name, value) in resp.headers() {
        if !HOP.contains(&name.as_str()) {
            out.append_header(name.clone(), value.clone())?;
        }
    }
    out.insert_header("x-request-id", &rid)?;
    if let Some(d) = &ctx.decision {
        if let Some(v) = ratelimit_policy(d) {
            out.insert_header("ratelimit-policy", v)?;
        }
        if let Some(v) = ratelimit(d) {
            out.insert_header("ratelimit", v)?;
        }
    }
    let is_sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !status.is_success() {
        // The upstream refused or failed: nothing was produced; release the reservation.
        state
            .metrics
            .upstream_errors
            .with_label_values(&[&*up.name])
            .inc();
        bill.settle(Usage::default(), false).await;
        let body = match tokio::time::timeout(up.read_timeout, resp.bytes()).await {
            Ok(Ok(b)) => b,
            _ => Bytes::new(),
        };
        out.insert_header("content-length", body.len().to_string())?;
        session.write_response_header(Box::new(out), false).await?;
        return session.write_response_body(Some(body), true).await;
    }
    if !is_sse {
        let body = match tokio::time::timeout(up.read_timeout, resp.bytes()).await {
            Ok(Ok(b)) => b,
            _ => {
                bill.settle(
                    Usage {
                        prompt: req.prompt_tokens,
                        completion: 0,
                    },
                    true,
                )
                .await;
                let body = error_body("upstream_failed", "the upstream response was cut", &rid);
                return respond_json(session, 502, body, &[], &rid).await;
            }
        };
        let usage = json_usage(llm.provider, &req.model, &body, req.prompt_tokens);
        bill.settle(usage, true).await;
        out.insert_header("content-length", body.len().to_string())?;
        session.write_response_header(Box::new(out), false).await?;
        return session.write_response_body(Some(body), true).await;
    }

    let mut meter = StreamMeter::new(llm.provider, &req.model, inject);
    let mut stream = resp.bytes_stream();
    let mut pending: Vec<Bytes> = Vec::new();
    if let Err(e) = session.write_response_header(Box::new(out), false).await {
        return drain_then_settle(state, stream, meter, bill, llm, req.prompt_tokens, e).await;
    }
    loop {
        let next = tokio::time::timeout(up.read_timeout, stream.next()).await;
        match next {
            Ok(Some(Ok(chunk))) => {
                meter.feed(chunk, &mut pending);
                for piece in pending.drain(..) {
                    if let Err(e) = session.write_response_body(Some(piece), false).await {
                        return drain_then_settle(
                            state,
                            stream,
                            meter,
                            bill,
                            llm,
                            req.prompt_tokens,
                            e,
                        )
                        .await;
                    }
                }
            }
            Ok(None) => break,
            // Cut upstream or silent for too long: bill what was produced, end the client's stream.
            Ok(Some(Err(_))) | Err(_) => {
                state
                    .metrics
                    .upstream_errors
                    .with_label_values(&[&*up.name])
                    .inc();
                tracing::warn!(request_id = %rid, "LLM stream cut by the upstream");
                break;
            }
        }
    }
    meter.flush(&mut pending);
    let usage = meter.usage(req.prompt_tokens);
    bill.settle(usage, true).await;
    for piece in pending {
        session.write_response_body(Some(piece), false).await?;
    }
    session.write_response_body(None, true).await
}

/// The client went away: keep reading the upstream (bounded) for its real usage, then settle.
async fn drain_then_settle<S>(
    state: &Arc<AppState>,
    mut stream: S,
    mut meter: StreamMeter,
    bill: Bill,
    llm: &Arc<LlmRoute>,
    prompt_estimate: u64,
    cause: Box<pingora::Error>,
) -> pingora::Result<()>
where
    S: futures_util::Stream<Item = reqwest::Result<Bytes>> + Send + Unpin + 'static,
{
    state.metrics.llm_disconnects.inc();
    let (deadline, max_bytes) = (Instant::now() + llm.drain, llm.drain_bytes);
    tokio::spawn(async move {
        let mut sink = Vec::new();
        while !meter.finished() && meter.bytes() < max_bytes {
            match tokio::time::timeout_at(deadline.into(), stream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    meter.feed(chunk, &mut sink);
                    sink.clear();
                }
                _ => break,
            }
        }
        bill.settle(meter.usage(prompt_estimate), true).await;
    });
    Err(cause)
}
