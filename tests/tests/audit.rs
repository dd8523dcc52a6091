//! The audit log: every decision and settlement of a real gateway becomes exactly one event, with
//! the amounts the counters saw.

use quota::audit::{AuditEvent, EventBody};
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use tollgate_e2e::{Gateway, MockUpstream, TempDir, client, eventually, get_json, post_json};

fn read_events(path: &std::path::Path) -> Vec<AuditEvent> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is one event"))
        .collect()
}

#[tokio::test]
async fn decisions_and_settlements_become_exactly_one_event_each() {
    let mock = MockUpstream::start();
    let dir = TempDir::new("audit");
    let log = dir.0.join("audit.jsonl");
    let yaml = format!(
        "upstreams:\n  up: {{ address: '{}' }}\nmodels:\n  default: {{ input_per_million: 1, output_per_million: 2 }}\n\
         routes:\n  - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: lookup }}\n\
         \x20 - {{ name: chat, match: {{ path_prefix: /v1/chat }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens, spend: spend }} }}\n\
         tiers:\n  t:\n    lookup: {{ daily: 7 }}\n    requests: {{ daily: 100 }}\n    tokens: {{ daily: 100000 }}\n    spend: {{ daily: 100000 }}\n\
         subjects:\n  - {{ key: k, id: alice, tier: t }}\n",
        mock.addr
    );
    let gw = Gateway::start_with(
        &yaml,
        &[
            "--audit-log",
            log.to_str().unwrap(),
            "--gateway-id",
            "gw-test",
        ],
    );
    let c = client();
    for i in 0..10 {
        let r = c
            .get(gw.url("/lookup"))
            .bearer_auth("k")
            .header("x-request-id", format!("l{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            if i < 7 {
                StatusCode::OK
            } else {
                StatusCode::TOO_MANY_REQUESTS
            }
        );
    }
    // A repeated /check request id is one decision, one event.
    for _ in 0..3 {
        post_json(
            gw.api_url("/check"),
            &json!({ "subject": "alice", "quota": "requests", "cost": 2, "request_id": "c1" }),
        )
        .await;
    }
    let body = json!({ "model": "gpt-4o-mini", "stream": true, "max_tokens": 100,
        "messages": [{ "role": "user", "content": "hi" }] });
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("k")
        .header("x-request-id", "llm1")
        .header("x-mock-tokens", "25")
        .json(&body)
        .send()
        .await
        .unwrap();
    r.text().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            read_events(&log).len() >= 12
        })
        .await,
        "events written"
    );
    let events = read_events(&log);
    assert_eq!(
        events.len(),
        12,
        "10 lookups + 1 check + 1 settlement: {events:#?}"
    );
    let ids: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "unique event ids");
    assert!(events.iter().all(|e| e.schema_version == 1
        && e.source == "gw-test"
        && e.subject.as_deref() == Some("alice")));
    let consumed = events.iter().filter(|e| matches!(&e.body, EventBody::QuotaConsumed { quota, amount: 1 } if quota == "lookup")).count();
    let rejected = events
        .iter()
        .filter(|e| matches!(&e.body, EventBody::QuotaRejected { quota, .. } if quota == "lookup"))
        .count();
    assert_eq!((consumed, rejected), (7, 3));
    let check = events
        .iter()
        .filter(|e| e.request_id.as_deref() == Some("c1"))
        .count();
    assert_eq!(check, 1);
    let settled = events.iter().find_map(|e| match &e.body {
        EventBody::ReservationSettled { settlements, .. } => Some(settlements.clone()),
        _ => None,
    });
    let settled = settled.expect("one settlement event");
    let stats = get_json(mock.url("/stats/llm1")).await;
    let produced =
        stats["prompt_tokens"].as_u64().unwrap() + stats["tokens_sent"].as_u64().unwrap();
    let tokens = settled.iter().find(|s| s.quota == "tokens").unwrap();
    assert_eq!(tokens.actual, produced);
    assert_eq!(tokens.refunded, tokens.reserved - produced);
    // The counters agree with the ledger-to-be.
    let live = post_json(
        gw.api_url("/check"),
        &json!({ "subject": "alice", "quota": "tokens", "cost": 0 }),
    )
    .await;
    assert_eq!(live["remaining"].as_u64().unwrap(), 100_000 - tokens.actual);
    let m = tollgate_e2e::metrics(&gw).await;
    assert!(m.contains("audit_events_total 12"), "{m}");
    assert!(m.contains("audit_events_dropped_total 0"), "{m}");
    // A policy reload is recorded too, with both versions.
    gw.rewrite_policy(&yaml.replace("lookup: { daily: 7 }", "lookup: { daily: 8 }"));
    let reloaded = || {
        read_events(&log).into_iter().find_map(|e| match e.body {
            EventBody::PolicyChanged {
                before_version,
                after_version,
                ..
            } => Some((before_version, after_version)),
            _ => None,
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || async { reloaded().is_some() }).await,
        "reload recorded"
    );
    let (before, after) = reloaded().unwrap();
    assert_ne!(
        before.as_deref(),
        Some(after.as_str()),
        "{before:?} -> {after}"
    );
}
