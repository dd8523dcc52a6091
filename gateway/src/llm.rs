//! LLM routes: one billing path for streamed and plain responses — reserve, forward, meter,
//! settle.
//!
//! The gateway drives the upstream exchange itself, on a pingora connector with the same peers,
//! pool options and request shaping as plain routes (`upstream`), instead of pingora's proxy
//! loop, because billing needs what that loop would drop: when a client disconnects
//! mid-stream, the loop closes the upstream too, but Tollgate keeps reading it in the background
//! (bounded by the route's `drain_ms`/`drain_bytes`) to learn the real usage. Every exit path
//! settles: completed, cut, upstream error, client gone — and a `Bill` dropped unsettled settles
//! what it knows.

use crate::admit::{Ask, admit};
use crate::headers::{ratelimit, ratelimit_policy};
use crate::respond::{Ctx, error_body, refuse, respond_error, respond_json};
use crate::state::AppState;
use crate::upstream::{HOP_BY_HOP, shape};
use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use quota::billing::{Placement, Reserved, Tariff, Ticket};
use quota::http_path::under;
use quota::llm::ceiling::{CutReason, OutputCeiling};
use quota::llm::request::{
    Endpoint, LlmRequest, RequestError, Rewrite, parse, parse_uncounted, rewrite,
};
use quota::llm::sse::{StreamMeter, json_usage};
use quota::llm::{Provider, Usage};
use quota::policy::{LlmRoute, Policy, Route, Subject, Upstream};
use std::sync::Arc;
use std::time::Instant;

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

/// Bodies up to this size are counted on the request's own task: a few hundred tokens take
/// microseconds, less than handing them to the blocking pool and back.
const INLINE_COUNT_BYTES: usize = 2048;

/// The prompt's tokens: small bodies counted in place, larger ones on the blocking pool (bounded
/// by `tokenizer_slots`). A tokenizer panic falls back to an estimate from the body's size.
async fn parse_off_thread(
    state: &Arc<AppState>,
    provider: Provider,
    endpoint: Endpoint,
    body: Arc<Vec<u8>>,
    image_tokens: Option<u64>,
) -> Result<LlmRequest, RequestError> {
    let counted = if body.len() <= INLINE_COUNT_BYTES {
        std::panic::catch_unwind(|| parse(provider, endpoint, &body, image_tokens)).ok()
    } else {
        let _slot = state.tokenizer_slots.acquire().await;
        let b = body.clone();
        // A panic in the tokenizer comes back as a JoinError, not down this thread.
        tokio::task::spawn_blocking(move || parse(provider, endpoint, &b, image_tokens))
            .await
            .ok()
    };
    match counted {
        Some(result) => result,
        // The tokenizer failed on this input: read the request without it and size the prompt
        // by bytes (3 per token: above the usual 4 for prose, the safe side for a reservation).
        None => {
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
            "`{path}` is not an endpoint this route meters (chat completions, completions, responses, embeddings, messages); the route must list it in `unmetered_paths` to forward it"
        );
        respond_error(session, 404, "unmetered_endpoint", msg, &rid).await?;
        return Ok(true);
    }
    // Cheap refusals first: no request or no token left is answered before the body is read.
    let needs = [(&*route.quota, route.cost), (&*llm.tokens_quota, 1)];
    let probed_at = state.clock.now_ns();
    let ask = Ask::Probe { needs: &needs };
    let probe = admit(state, &subject, Some(&rid), ask, probed_at, policy.failure).await;
    // A store that cannot answer: the reservation below decides, under the failure policy.
    if let Ok(d) = probe
        && !d.allowed
    {
        refuse(session, ctx, &subject, &needs, &d).await?;
        return Ok(true);
    }
    let Some(body) = read_body(session, llm.max_body_bytes).await? else {
        let msg = format!("request body larger than {} bytes", llm.max_body_bytes);
        respond_error(session, 413, "body_too_large", msg, &rid).await?;
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
            respond_error(session, 400, "invalid_request", e.to_string(), &rid).await?;
            return Ok(true);
        }
    };
    // Embeddings are input only, at the model's embedding price.
    let price = policy.price(&req.model).map(|p| {
        if endpoint.has_output() {
            p
        } else {
            p.for_embeddings()
        }
    });
    if llm.spend_quota.is_some() && price.is_none() {
        let msg = format!(
            "no price for model `{}`; add it (or `default`) under `models`",
            req.model
        );
        respond_error(session, 400, "unknown_model", msg, &rid).await?;
        return Ok(true);
    }
    // The output ceiling: what the client asked for, within the route's cap; the route's default
    // when it asked for nothing. The upstream is asked for exactly what is reserved. The cap
    // bounds the call's whole output: every choice (`n`, `best_of`) is generated and billed.
    let cap = llm.max_output_tokens.unwrap_or(MAX_OUTPUT_TOKENS);
    let per_choice_cap = cap / req.choices;
    let max_out = match req.max_tokens {
        _ if !endpoint.has_output() => 0,
        asked
            if per_choice_cap == 0
                || asked.is_some_and(|a| a > per_choice_cap && !llm.clamp_max_output) =>
        {
            let field = req.max_tokens_fields[0];
            let asked = asked.unwrap_or(llm.default_max_tokens);
            let msg = if req.choices > 1 {
                format!(
                    "`{field}` is {asked} for each of {} outputs; this route allows at most \
                     {cap} output tokens in all",
                    req.choices
                )
            } else {
                format!("`{field}` is {asked}; this route allows at most {cap} output tokens")
            };
            respond_error(session, 400, "max_tokens_too_large", msg, &rid).await?;
            return Ok(true);
        }
        Some(asked) => asked.min(per_choice_cap),
        None => llm.default_max_tokens.min(per_choice_cap),
    };
    // Every output the upstream generates for this call, in all.
    let out_total = req.total_output(max_out);
    let mut reserve: Vec<(&str, u64)> = vec![
        (&route.quota, route.cost),
        (
            &llm.tokens_quota,
            req.prompt_tokens.saturating_add(out_total),
        ),
    ];
    let money = price.map(|p| p.reserve_micros(req.prompt_tokens, out_total));
    if let (Some(q), Some(m)) = (&llm.spend_quota, money) {
        reserve.push((q, m));
    }
    let now = state.clock.now_ns();
    let attempt_id = format!("{rid}.{}", quota::ids::uuid_v7());
    let expires = now.saturating_add(llm.reservation_ttl.as_nanos() as i64);
    let ask = Ask::Reserve {
        costs: &reserve,
        attempt_id: &attempt_id,
        expires_ns: expires,
    };
    let decision = admit(state, &subject, Some(&rid), ask, now, policy.failure).await;
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
        refuse(session, ctx, &subject, &reserve, &decision).await?;
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
            ttl: llm.reservation_ttl,
        },
    );
    ctx.decision = Some(decision);
    let body = Arc::try_unwrap(body).unwrap_or_else(|b| (*b).clone());
    let call = Call {
        endpoint,
        req,
        max_out,
    };
    forward(state, session, ctx, route, llm, policy, call, body, bill).await?;
    Ok(true)
}

/// How many times a request is sent again when a pooled connection turns out to be closed
/// before the upstream answered (the request cannot have been processed).
const STALE_CONNECTION_RETRIES: usize = 2;

/// A request that got no response header.
struct SendError {
    error: Box<pingora::Error>,
    /// The whole request reached the upstream and it went silent: it may be generating (and
    /// billing) all the same.
    unanswered: bool,
}

/// The most of a non-streamed response body kept to read its usage; a larger body is passed on
/// and billed at its reservation.
const MAX_JSON_BODY: usize = 32 << 20;

/// The largest stream with a `Content-Length` that is read whole before it is relayed.
const WHOLE_STREAM_MAX: usize = 1 << 20;

/// A request in flight on a pooled upstream connection.
struct Exchange {
    state: Arc<AppState>,
    session: HttpSession,
    peer: HttpPeer,
}

impl Exchange {
    /// Send `head` and `body` to `up`, on a pooled connection when one is free, and read the
    /// response header.
    async fn send(
        state: &Arc<AppState>,
        up: &Upstream,
        head: &RequestHeader,
        body: Bytes,
    ) -> Result<Exchange, SendError> {
        let failed = |error| SendError {
            error,
            unanswered: false,
        };
        let peer = state.upstreams.peer(up).await.map_err(|e| {
            failed(pingora::Error::explain(
                pingora::ErrorType::ConnectNoRoute,
                e.to_string(),
            ))
        })?;
        let mut tries = 0;
        loop {
            let (mut session, reused) = state
                .connector
                .get_http_session(&peer)
                .await
                .map_err(failed)?;
            session.set_read_timeout(Some(up.read_timeout));
            session.set_write_timeout(Some(up.write_timeout));
            let mut req = Box::new(head.clone());
            // An HTTP/2 client's request goes out in the version of the connection we got (the
            // h2 client sets its own).
            if session.as_http1().is_some() {
                req.set_version(http::Version::HTTP_11);
            }
            let mut written = false;
            let sent = async {
                session.write_request_header(req).await?;
                session.write_request_body(body.clone(), true).await?;
                session.finish_request_body().await?;
                written = true;
                session.read_response_header().await
            }
            .await;
            match sent {
                Ok(()) => {
                    return Ok(Exchange {
                        state: state.clone(),
                        session,
                        peer,
                    });
                }
                Err(mut e) => {
                    // Sent again only where nothing can have been processed: a kept-alive
                    // connection the upstream had closed, found while writing (the request never
                    // arrived whole) or as pingora judges it while reading. A timeout is not
                    // that: the upstream has the request and may be generating it.
                    e.retry.decide_reuse(reused);
                    let unsent = reused && !written && e.etype() == &pingora::ErrorType::WriteError;
                    if (unsent || e.retry()) && tries < STALE_CONNECTION_RETRIES {
                        tries += 1;
                        continue;
                    }
                    let unanswered = written && e.etype() == &pingora::ErrorType::ReadTimedout;
                    return Err(SendError {
                        error: e,
                        unanswered,
                    });
                }
            }
        }
    }

    fn header(&self) -> Option<&ResponseHeader> {
        self.session.response_header()
    }

    async fn next(&mut self) -> pingora::Result<Option<Bytes>> {
        self.session.read_response_body().await
    }

    /// The response was read to its end: the connection goes back to the pool.
    async fn done(mut self) {
        if self.session.response_done() {
            let idle = self.peer.options.idle_timeout;
            self.state
                .connector
                .release_http_session(self.session, &self.peer, idle)
                .await;
        } else {
            self.session.shutdown().await;
        }
    }
}

/// Frame a response whose length is not known in advance: chunked on HTTP/1.1, by closing on
/// HTTP/1.0; HTTP/2 frames itself. Never "close" while announcing keep-alive.
fn frame_unsized(session: &mut Session, out: &mut ResponseHeader) -> pingora::Result<()> {
    out.remove_header("content-length");
    out.remove_header("transfer-encoding");
    if session.is_http2() {
        return Ok(());
    }
    if session.req_header().version == http::Version::HTTP_10 {
        session.set_keepalive(None);
        out.insert_header("connection", "close")?;
    } else {
        out.insert_header("transfer-encoding", "chunked")?;
    }
    Ok(())
}

/// What a metered call asks for, once admitted.
struct Call {
    endpoint: Endpoint,
    req: LlmRequest,
    /// The output ceiling of each choice, as the upstream is asked for it (0 for embeddings).
    max_out: u64,
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    state: &Arc<AppState>,
    session: &mut Session,
    ctx: &mut Ctx,
    route: &Route,
    llm: &Arc<LlmRoute>,
    policy: &Policy,
    call: Call,
    body: Vec<u8>,
    bill: Bill,
) -> pingora::Result<()> {
    let Call {
        endpoint,
        req,
        max_out,
    } = call;
    // The output reserved: every choice's.
    let out_total = req.total_output(max_out);
    let rid = ctx.request_id.clone();
    // Chat and completions streams report usage only when asked; Responses streams always do.
    let inject = llm.provider == Provider::OpenAi
        && matches!(endpoint, Endpoint::Chat | Endpoint::Completions)
        && req.stream
        && !req.include_usage;
    let changes = Rewrite {
        max_tokens: (endpoint.has_output()
            && (req.max_tokens != Some(max_out) || req.max_tokens_fields.len() > 1))
            .then_some((req.max_tokens_fields, max_out)),
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
    let mut head = session.req_header().clone();
    let shaped = shape(&mut head, &up, ctx.upstream_pq.as_deref(), &rid);
    if let Err(e) = shaped {
        bill.settle(Usage::default(), false).await;
        let body = error_body("invalid_request", e.to_string(), &rid);
        return respond_json(session, 400, body, &[], &rid).await;
    }
    head.remove_header("transfer-encoding");
    head.insert_header("content-length", body.len().to_string())?;
    // The gateway reads the response: it must not arrive compressed.
    head.insert_header("accept-encoding", "identity")?;
    let mut ex = match Exchange::send(state, &up, &head, Bytes::from(body)).await {
        Ok(ex) => ex,
        Err(SendError { error, unanswered }) => {
            state
                .metrics
                .upstream_errors
                .with_label_values(&[&*up.name])
                .inc();
            if unanswered {
                // The upstream took the request and did not answer in time: it may be
                // generating (and billing) it still, so the call is billed its reservation.
                tracing::warn!(upstream = %up.name, error = %error, request_id = %rid, "LLM upstream timed out");
                bill.settle(Usage::plain(req.prompt_tokens, out_total), true)
                    .await;
                let body = error_body(
                    "upstream_timeout",
                    "the upstream did not answer in time; the call was billed its reservation",
                    &rid,
                );
                return respond_json(session, 504, body, &[], &rid).await;
            }
            tracing::warn!(upstream = %up.name, error = %error, request_id = %rid, "LLM upstream unreachable");
            bill.settle(Usage::default(), false).await;
            let body = error_body(
                "upstream_unavailable",
                "the upstream could not be reached",
                &rid,
            );
            return respond_json(session, 502, body, &[], &rid).await;
        }
    };
    let Some(upstream_head) = ex.header() else {
        return Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "response header missing after it was read",
        ));
    };
    let mut out = upstream_head.clone();
    // An h2 upstream's answer goes to this client in this client's HTTP version.
    out.set_version(session.req_header().version);
    // This hop's connection headers and framing are not relayed (framing is set below).
    for h in HOP_BY_HOP.iter().chain(&["transfer-encoding"]) {
        out.remove_header(*h);
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
    // Asked for `identity`, an upstream may compress anyway: such a body cannot be metered (nor
    // cut), so it is relayed as it is and billed what was reserved (`relay_json`).
    let encoded = out
        .headers
        .get("content-encoding")
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let is_sse = !encoded
        && out
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.get(..17)
                    .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
            });
    if !out.status.is_success() {
        // The upstream refused or failed: nothing was produced; release the reservation and
        // relay its answer as it comes, without holding it.
        state
            .metrics
            .upstream_errors
            .with_label_values(&[&*up.name])
            .inc();
        bill.settle(Usage::default(), false).await;
        if !out.headers.contains_key("content-length") {
            frame_unsized(session, &mut out)?;
        }
        session.write_response_header(Box::new(out), false).await?;
        while let Ok(Some(chunk)) = ex.next().await {
            session.write_response_body(Some(chunk), false).await?;
        }
        ex.done().await;
        return session.write_response_body(None, true).await;
    }
    if !is_sse {
        return relay_json(state, session, ex, out, llm, &req, out_total, bill).await;
    }
    // An upstream that announces the stream's length has produced all of it already: nothing
    // about it is real time. Such a stream (up to `WHOLE_STREAM_MAX`) is read whole, metered and
    // cut as usual, and sent in one write with its final length, instead of one flush per read.
    let whole = out
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .filter(|n| *n <= WHOLE_STREAM_MAX);
    // `held`: the header and the body kept for that one write; `head`: the header to send now.
    let (mut held, head) = match whole {
        Some(n) => (Some((out, BytesMut::with_capacity(n))), None),
        None => {
            frame_unsized(session, &mut out)?;
            (None, Some(out))
        }
    };
    let mut meter = if endpoint == Endpoint::Responses {
        StreamMeter::for_responses(&req.model)
    } else {
        StreamMeter::new(llm.provider, &req.model, inject)
    };
    // `cut`: the stream ends at what was reserved. `bill`: it may go on while the quota covers it.
    let ceiling = if llm.cut_overrun { out_total } else { u64::MAX };
    let mut guard = if endpoint == Endpoint::Responses {
        OutputCeiling::for_responses(&req.model, ceiling)
    } else {
        OutputCeiling::new(llm.provider, &req.model, ceiling)
    };
    let mut overrun_check_at = out_total;
    let mut metered: Vec<Bytes> = Vec::new();
    let mut pending: Vec<Bytes> = Vec::new();
    // `Some`: the client went away; the upstream is drained for its usage instead.
    let client_gone = 'relay: {
        if let Some(head) = head
            && let Err(e) = session.write_response_header(Box::new(head), false).await
        {
            break 'relay Some(e);
        }
        loop {
            match ex.next().await {
                Ok(Some(chunk)) => {
                    meter.feed(chunk, &mut metered);
                    for piece in metered.drain(..) {
                        guard.pass(piece, &mut pending);
                    }
                    // Past the reservation (`bill`): go on only while the subject's quota covers it.
                    if guard.delivered_bound() > overrun_check_at && guard.cut().is_none() {
                        let over = guard.delivered().saturating_sub(out_total);
                        overrun_check_at =
                            guard.delivered_bound().saturating_add(OVERRUN_CHECK_EVERY);
                        if over > 0 && !quota_covers(state, &bill.subject, llm, policy, over).await
                        {
                            guard.cut_now(CutReason::QuotaExhausted, &mut pending);
                        }
                    }
                    for piece in pending.drain(..) {
                        if let Some((_, body)) = &mut held {
                            body.extend_from_slice(&piece);
                        } else if let Err(e) = session.write_response_body(Some(piece), false).await
                        {
                            break 'relay Some(e);
                        }
                    }
                    // Cut: the upstream is hung up on rather than read to its end, so it stops
                    // generating what nobody will receive (or pay for) and the client's stream
                    // ends now.
                    if guard.cut().is_some() {
                        break 'relay None;
                    }
                }
                Ok(None) => break 'relay None,
                // Cut upstream or silent for too long: bill what was produced, end the client's
                // stream.
                Err(e) => {
                    state
                        .metrics
                        .upstream_errors
                        .with_label_values(&[&*up.name])
                        .inc();
                    tracing::warn!(request_id = %rid, error = %e, "LLM stream cut by the upstream");
                    break 'relay None;
                }
            }
        }
    };
    if let Some(e) = client_gone {
        let drain = Drain::Stream(Box::new(meter));
        return drain_then_settle(state, ex, drain, bill, llm, req.prompt_tokens, e);
    }
    ex.done().await;
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
        tracing::info!(request_id = %rid, reserved = out_total, delivered = guard.delivered(), ?reason, "stream cut by the gateway");
        // The input as reported (kinds included), the output the client received.
        Usage {
            completion: guard.delivered(),
            reasoning: 0,
            ..meter.usage(req.prompt_tokens)
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
    if let Some((mut out, mut body)) = held {
        for piece in pending {
            body.extend_from_slice(&piece);
        }
        out.insert_header("content-length", body.len().to_string())?;
        session.write_response_header(Box::new(out), false).await?;
        return session.write_response_body(Some(body.freeze()), true).await;
    }
    for piece in pending {
        session.write_response_body(Some(piece), false).await?;
    }
    session.write_response_body(None, true).await
}

/// A non-streamed completion: relayed as it arrives (its length as the upstream framed it),
/// kept aside (by reference) to read its usage at the end. One whose usage cannot be read (cut,
/// too large to keep, not JSON: compressed, or a stream under another content type) is billed
/// its whole reservation: `out_total` output tokens.
#[allow(clippy::too_many_arguments)]
async fn relay_json(
    state: &Arc<AppState>,
    session: &mut Session,
    mut ex: Exchange,
    mut out: ResponseHeader,
    llm: &Arc<LlmRoute>,
    req: &LlmRequest,
    out_total: u64,
    bill: Bill,
) -> pingora::Result<()> {
    if !out.headers.contains_key("content-length") {
        frame_unsized(session, &mut out)?;
    }
    let mut body = JsonBody::default();
    // `Err`: the client went away; the upstream is drained for its usage instead.
    let complete = 'relay: {
        if let Err(e) = session.write_response_header(Box::new(out), false).await {
            break 'relay Err(e);
        }
        loop {
            match ex.next().await {
                Ok(Some(chunk)) => {
                    body.keep(&chunk);
                    if let Err(e) = session.write_response_body(Some(chunk), false).await {
                        break 'relay Err(e);
                    }
                }
                Ok(None) => break 'relay Ok(true),
                Err(e) => {
                    tracing::warn!(error = %e, "LLM response cut by the upstream");
                    break 'relay Ok(false);
                }
            }
        }
    };
    let complete = match complete {
        Ok(complete) => complete,
        Err(e) => {
            let drain = Drain::Json(body, req.model.clone(), out_total);
            return drain_then_settle(state, ex, drain, bill, llm, req.prompt_tokens, e);
        }
    };
    ex.done().await;
    let usage = match body.usage(llm.provider, &req.model, req.prompt_tokens) {
        Some(u) if complete => u,
        // Cut or too large to read: what was produced is unknown, and may be all of it.
        _ => Usage::plain(req.prompt_tokens, out_total),
    };
    bill.settle(usage, true).await;
    if complete {
        session.write_response_body(None, true).await
    } else {
        Err(pingora::Error::explain(
            pingora::ErrorType::ReadError,
            "the upstream response was cut",
        ))
    }
}

/// The chunks of a JSON response, kept by reference up to `MAX_JSON_BODY`.
#[derive(Default)]
struct JsonBody {
    chunks: Vec<Bytes>,
    len: usize,
    overflowed: bool,
}

impl JsonBody {
    fn keep(&mut self, chunk: &Bytes) {
        self.len += chunk.len();
        if self.len > MAX_JSON_BODY {
            self.overflowed = true;
            self.chunks.clear();
        } else if !self.overflowed {
            self.chunks.push(chunk.clone());
        }
    }

    fn usage(&self, provider: Provider, model: &str, prompt_estimate: u64) -> Option<Usage> {
        if self.overflowed {
            return None;
        }
        let joined;
        let bytes: &[u8] = match self.chunks.as_slice() {
            [one] => one,
            many => {
                joined = many.concat();
                &joined
            }
        };
        json_usage(provider, model, bytes, prompt_estimate)
    }
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

/// What a drained response is metered with.
enum Drain {
    Stream(Box<StreamMeter>),
    /// The body so far, the model, and the output billed when the usage cannot be read.
    Json(JsonBody, String, u64),
}

/// The client went away: keep reading the upstream (bounded by the route's `drain_ms` and
/// `drain_bytes`) for its real usage, then settle; the request ends with `cause`.
fn drain_then_settle(
    state: &Arc<AppState>,
    mut ex: Exchange,
    mut drain: Drain,
    bill: Bill,
    llm: &Arc<LlmRoute>,
    prompt_estimate: u64,
    cause: Box<pingora::Error>,
) -> pingora::Result<()> {
    state.metrics.llm_disconnects.inc();
    let (deadline, max_bytes) = (Instant::now() + llm.drain, llm.drain_bytes);
    let provider = llm.provider;
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let mut read = 0u64;
        let mut complete = false;
        loop {
            let finished = match &drain {
                Drain::Stream(m) => m.finished(),
                Drain::Json(..) => false,
            };
            if finished || read >= max_bytes {
                break;
            }
            match tokio::time::timeout_at(deadline.into(), ex.next()).await {
                Ok(Ok(Some(chunk))) => {
                    read += chunk.len() as u64;
                    match &mut drain {
                        Drain::Stream(m) => {
                            m.feed(chunk, &mut sink);
                            sink.clear();
                        }
                        Drain::Json(b, ..) => b.keep(&chunk),
                    }
                }
                Ok(Ok(None)) => {
                    complete = true;
                    break;
                }
                _ => break,
            }
        }
        let usage = match &drain {
            Drain::Stream(m) => m.usage(prompt_estimate),
            Drain::Json(b, model, out_total) => b
                .usage(provider, model, prompt_estimate)
                .filter(|_| complete)
                .unwrap_or(Usage::plain(prompt_estimate, *out_total)),
        };
        bill.settle(usage, true).await;
        ex.done().await;
    });
    Err(cause)
}
