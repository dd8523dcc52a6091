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
use quota::billing::{Placement, Reserved, Tariff, Ticket};
use quota::http_path::under;
use quota::llm::ceiling::{CutReason, OutputCeiling};
use quota::llm::request::{
    Endpoint, LlmRequest, RequestError, Rewrite, parse, parse_uncounted, rewrite,
};
use quota::llm::sse::{StreamMeter, json_usage};
use quota::llm::{Provider, Usage};
use quota::policy::{LlmRoute, Policy, Route, Subject};
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

/// What one upstream attempt reserved, settled exactly once (see `quota::billing`).
type Bill = Ticket<AppState>;

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

/// The largest `max_tokens` a client may ask for on a route without `max_output_tokens`: keeps
/// every reservation and sum far from overflow.
const MAX_OUTPUT_TOKENS: u64 = 100_000_000;

/// The prompt's tokens, counted on the blocking pool (bounded by `tokenizer_slots`); a tokenizer
/// panic falls back to an estimate from the body's size.
async fn parse_off_thread(
    state: &Arc<AppState>,
    provider: Provider,
    endpoint: Endpoint,
    body: Arc<Vec<u8>>,
    image_tokens: Option<u64>,
) -> Result<LlmRequest, RequestError> {
    let _slot = state.tokenizer_slots.acquire().await;
    let b = body.clone();
    // A panic in the tokenizer comes back as a JoinError, not down this thread.
    let counted =
        tokio::task::spawn_blocking(move || parse(provider, endpoint, &b, image_tokens)).await;
    match counted {
        Ok(result) => result,
        // The tokenizer failed on this input: read the request without it and size the prompt
        // by bytes (3 per token: above the usual 4 for prose, the safe side for a reservation).
        _ => {
            tracing::warn!(
                bytes = body.len(),
                "tokenizer failed; prompt estimated from its size"
            );
            state.metrics.tokenizer_fallbacks.inc();
            let mut r = parse_uncounted(provider, endpoint, &body)?;
            r.prompt_tokens = (body.len() as u64).div_ceil(3);
            Ok(r)
        }
    }
}

/// Serve a request on an LLM route. `Ok(true)`: answered here. `Ok(false)`: the path is one the
/// route forwards unmetered (token counting, `unmetered_paths`); the caller proxies it as a plain
/// request.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut Ctx,
    policy: &Policy,
    route: &Route,
    llm: &Arc<LlmRoute>,
    subject: Arc<Subject>,
) -> pingora::Result<bool> {
    let rid = ctx.request_id.clone();
    let path = ctx.path(session.req_header()).to_string();
    let endpoint = Endpoint::of(llm.provider, &path);
    if !endpoint.generates() {
        if endpoint == Endpoint::CountTokens || llm.unmetered_paths.iter().any(|p| under(&path, p))
        {
            return Ok(false);
        }
        let msg = format!(
            "`{path}` is not an endpoint this route meters (chat completions, completions, messages); the route must list it in `unmetered_paths` to forward it"
        );
        respond_json(
            session,
            404,
            error_body("unmetered_endpoint", msg, &rid),
            &[],
            &rid,
        )
        .await?;
        return Ok(true);
    }
    // Cheap refusals first: no request or no token left is answered before the body is read.
    let needs = [(&*route.quota, route.cost), (&*llm.tokens_quota, 1)];
    let probe = state
        .engine
        .probe(&subject, &needs, state.clock.now_ns(), policy.failure)
        .await;
    // A store that cannot answer: the reservation below decides, under the failure policy.
    if let Ok(d) = probe
        && !d.allowed
    {
        refuse(state, session, ctx, &subject, &needs, &d).await?;
        return Ok(true);
    }
    let Some(body) = read_body(session, llm.max_body_bytes).await? else {
        let msg = format!("request body larger than {} bytes", llm.max_body_bytes);
        respond_json(
            session,
            413,
            error_body("body_too_large", msg, &rid),
            &[],
            &rid,
        )
        .await?;
        return Ok(true);
    };
    let body = Arc::new(body);
    let req = match parse_off_thread(
        state,
        llm.provider,
        endpoint,
        body.clone(),
        llm.image_tokens,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            respond_json(
                session,
                400,
                error_body("invalid_request", e.to_string(), &rid),
                &[],
                &rid,
            )
            .await?;
            return Ok(true);
        }
    };
    let price = policy.price(&req.model);
    if llm.spend_quota.is_some() && price.is_none() {
        let msg = format!(
            "no price for model `{}`; add it (or `default`) under `models`",
            req.model
        );
        respond_json(
            session,
            400,
            error_body("unknown_model", msg, &rid),
            &[],
            &rid,
        )
        .await?;
        return Ok(true);
    }
    // The output ceiling: what the client asked for, within the route's cap; the route's default
    // when it asked for nothing. The upstream is asked for exactly what is reserved.
    let cap = llm.max_output_tokens.unwrap_or(MAX_OUTPUT_TOKENS);
    let max_out = match req.max_tokens {
        Some(asked) if asked > cap && !llm.clamp_max_output => {
            let msg = format!(
                "`{}` is {asked}; this route allows at most {cap} output tokens",
                req.max_tokens_field
            );
            respond_json(
                session,
                400,
                error_body("max_tokens_too_large", msg, &rid),
                &[],
                &rid,
            )
            .await?;
            return Ok(true);
        }
        Some(asked) => asked.min(cap),
        None => llm.default_max_tokens.min(cap),
    };
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
            respond_json(session, 503, body, &[("retry-after", "1".into())], &rid).await?;
            return Ok(true);
        }
    };
    if !decision.allowed {
        refuse(state, session, ctx, &subject, &reserve, &decision).await?;
        return Ok(true);
    }
    let bill = Bill::new(
        state.clone(),
        Reserved {
            subject,
            attempt_id,
            request_id: rid.clone(),
            reserved_at_ns: now,
            prompt_estimate: req.prompt_tokens,
            amounts: reserve
                .iter()
                .map(|(q, n)| (Arc::<str>::from(*q), *n))
                .collect(),
            placement: Placement::of(&decision, policy.failure),
            tariff: Tariff::new(route, llm, price),
        },
    );
    ctx.decision = Some(decision);
    let body = Arc::try_unwrap(body).unwrap_or_else(|b| (*b).clone());
    forward(
        state, session, ctx, route, llm, policy, req, max_out, body, bill,
    )
    .await?;
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut Ctx,
    route: &Route,
    llm: &Arc<LlmRoute>,
    policy: &Policy,
    req: LlmRequest,
    max_out: u64,
    body: Vec<u8>,
    bill: Bill,
) -> pingora::Result<()> {
    let rid = ctx.request_id.clone();
    let inject = llm.provider == Provider::OpenAi && req.stream && !req.include_usage;
    let changes = Rewrite {
        max_tokens: (req.max_tokens != Some(max_out)).then_some((req.max_tokens_field, max_out)),
        include_usage: inject,
    };
    let body = if changes.max_tokens.is_some() || changes.include_usage {
        match rewrite(&body, changes) {
            Ok(b) => b,
            Err(e) => {
                // Parsed once already: only a body that is not an object gets here.
                bill.settle(Usage::default(), false).await;
                let body = error_body("invalid_request", e.to_string(), &rid);
                return respond_json(session, 400, body, &[], &rid).await;
            }
        }
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
    let path = ctx
        .path_and_query
        .as_deref()
        .or_else(|| head.uri.path_and_query().map(|p| p.as_str()))
        .unwrap_or("/");
    let url = format!("{scheme}://{}{path}", up.address);
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
    // `cut`: the stream ends at what was reserved. `bill`: it may go on while the quota covers it.
    let ceiling = if llm.cut_overrun { max_out } else { u64::MAX };
    let mut guard = OutputCeiling::new(llm.provider, &req.model, ceiling);
    let mut overrun_check_at = max_out;
    let mut stream = resp.bytes_stream();
    let mut metered: Vec<Bytes> = Vec::new();
    let mut pending: Vec<Bytes> = Vec::new();
    if let Err(e) = session.write_response_header(Box::new(out), false).await {
        return drain_then_settle(state, stream, meter, bill, llm, req.prompt_tokens, e).await;
    }
    loop {
        let next = tokio::time::timeout(up.read_timeout, stream.next()).await;
        match next {
            Ok(Some(Ok(chunk))) => {
                meter.feed(chunk, &mut metered);
                for piece in metered.drain(..) {
                    guard.pass(piece, &mut pending);
                }
                // Past the reservation (`bill`): go on only while the subject's quota covers it.
                if guard.delivered_bound() > overrun_check_at && guard.cut().is_none() {
                    let over = guard.delivered().saturating_sub(max_out);
                    overrun_check_at = guard.delivered_bound().saturating_add(OVERRUN_CHECK_EVERY);
                    if over > 0 && !quota_covers(state, &bill.subject, llm, policy, over).await {
                        guard.cut_now(CutReason::QuotaExhausted, &mut pending);
                    }
                }
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
    let usage = if let Some(reason) = guard.cut() {
        // Ended by the gateway: the prompt and what the client received.
        state
            .metrics
            .llm_stream_cuts
            .with_label_values(&[match reason {
                CutReason::Reservation => "reservation",
                CutReason::QuotaExhausted => "quota",
                CutReason::OversizedEvent => "oversized_event",
            }])
            .inc();
        tracing::info!(request_id = %rid, reserved = max_out, delivered = guard.delivered(), ?reason, "stream cut by the gateway");
        Usage {
            prompt: meter.usage(req.prompt_tokens).prompt,
            completion: guard.delivered(),
        }
    } else {
        meter.flush(&mut metered);
        for piece in metered.drain(..) {
            guard.pass(piece, &mut pending);
        }
        guard.finish(&mut pending);
        meter.usage(req.prompt_tokens)
    };
    bill.settle(usage, true).await;
    for piece in pending {
        session.write_response_body(Some(piece), false).await?;
    }
    session.write_response_body(None, true).await
}

/// Tokens of upper-bound output between two checks of the quota while a `bill` stream is past
/// its reservation.
const OVERRUN_CHECK_EVERY: u64 = 256;

/// Whether the subject's token quota still has `over` tokens for a stream past its reservation.
async fn quota_covers(
    state: &Arc<AppState>,
    subject: &Subject,
    llm: &LlmRoute,
    policy: &Policy,
    over: u64,
) -> bool {
    let probe = state
        .engine
        .probe(
            subject,
            &[(&llm.tokens_quota, over)],
            state.clock.now_ns(),
            policy.failure,
        )
        .await;
    match probe {
        Ok(d) => d.allowed,
        // The store cannot say: the route chose to bill, so let the stream finish.
        Err(_) => true,
    }
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
