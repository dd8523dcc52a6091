//! The admin console served by `control-plane serve`: sign-in with a control-plane token, the
//! session cookie's attributes, CSRF and role checks on every state-changing form (403 for a
//! viewer, for a form without the token, for a cross-site post), the pages of each role, policy
//! editing (line/column errors, publish, rollback), a tier change through the entitlement path,
//! sign-out and expiry, and charts whose points add up to what `control-plane ingest` put in the
//! ledger. Then a real browser (headless Chromium driven by Selenium, `tests/browser/console.py`)
//! does the same as a user would, saving screenshots.

use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;
use tollgate_e2e::*;

const POLICY: &str = "version: console-test
upstreams:
  up: { address: '127.0.0.1:9' }
routes:
  - { name: lookup, match: { path_prefix: /lookup }, upstream: up, quota: lookup }
  - name: chat
    match: { method: POST, path_prefix: /v1/chat/completions }
    upstream: up
    quota: llm_requests
    llm: { provider: openai, tokens: llm_tokens, spend: llm_spend }
models:
  default: { input_per_million: 1.00, output_per_million: 4.00 }
tiers:
  free:
    lookup: { daily: 100 }
    llm_requests: { daily: 50 }
    llm_tokens: { daily: 20000 }
    llm_spend: { daily: 10000 }
  pro:
    lookup: { daily: 10000 }
    llm_requests: { daily: 2000 }
    llm_tokens: { monthly: 5000000 }
    llm_spend: { monthly: 5000000 }
";

/// What the synthetic audit log holds (all within the last minutes, so in every range).
const ADMITTED_ACME: u64 = 7;
const ADMITTED_BOB: u64 = 4;
const REFUSED_ACME: u64 = 3;
const SETTLED: u64 = 2;
const TOKENS_EACH: u64 = 1500;
const SPEND_EACH: u64 = 2500;

/// A client that shows redirects instead of following them.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// `application/x-www-form-urlencoded`.
fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The value of the first `name="csrf"` field of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find(r#"name="csrf" value=""#).expect("a csrf field") + 19;
    html[at..at + html[at..].find('"').expect("end")].to_string()
}

/// `name=value` of a `Set-Cookie` header named `name`, and the whole header.
fn set_cookie(r: &reqwest::Response, name: &str) -> Option<(String, String)> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| (v.split(';').next().unwrap_or("").to_string(), v.to_string()))
}

/// A signed-in browser, as far as HTTP goes.
struct Session {
    base: String,
    cookie: String,
    csrf: String,
}

impl Session {
    async fn get(&self, path: &str) -> (u16, String) {
        let r = http()
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .expect("get");
        let s = r.status().as_u16();
        (s, r.text().await.unwrap_or_default())
    }

    /// POST a form (with this session's CSRF token unless `csrf` says otherwise); returns the
    /// status, the `Location` and the body.
    async fn post(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        csrf: Option<&str>,
    ) -> (u16, String, String) {
        let mut all: Vec<(&str, &str)> = fields.to_vec();
        if let Some(c) = csrf {
            all.push(("csrf", c));
        }
        let r = http()
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("origin", &self.base)
            .body(form(&all))
            .send()
            .await
            .expect("post");
        let s = r.status().as_u16();
        let loc = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        (s, loc, r.text().await.unwrap_or_default())
    }
}

/// Post the sign-in form with `token`; the answer.
async fn try_sign_in(cp: &ControlPlane, token: &str) -> reqwest::Response {
    let base = format!("http://{}", cp.addr);
    let r = http()
        .get(format!("{base}/console/login"))
        .send()
        .await
        .expect("login page");
    assert_eq!(r.status(), 200);
    let (login_cookie, _) = set_cookie(&r, "tg_login").expect("a sign-in cookie");
    let page = r.text().await.expect("page");
    let csrf = csrf_of(&page);
    http()
        .post(format!("{base}/console/login"))
        .header("cookie", &login_cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", token), ("csrf", &csrf)]))
        .send()
        .await
        .expect("sign in")
}

async fn sign_in(cp: &ControlPlane, token: &str) -> Session {
    let base = format!("http://{}", cp.addr);
    let r = try_sign_in(cp, token).await;
    assert_eq!(r.status(), 303, "signing in redirects to the overview");
    let (cookie, header) = set_cookie(&r, "tg_session").expect("a session cookie");
    assert!(header.contains("HttpOnly"), "{header}");
    assert!(header.contains("SameSite=Strict"), "{header}");
    let mut s = Session {
        base,
        cookie,
        csrf: String::new(),
    };
    let (status, page) = s.get("/console/overview").await;
    assert_eq!(status, 200, "{page}");
    s.csrf = csrf_of(&page);
    s
}

/// The control plane with the test policy, subjects `acme` (free) and `bob` (pro) with a key
/// each, and an audit log of their traffic ingested into the ledger.
async fn seeded(db: Db) -> (ControlPlane, Db, TempDir) {
    let cp = ControlPlane::start(&db);
    let (s, b) = cp
        .call(
            "POST",
            "/v1/policies?comment=first",
            Some(Value::String(POLICY.into())),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    for (id, tier) in [("acme", "free"), ("bob", "pro")] {
        let (s, b) = cp
            .call(
                "PUT",
                &format!("/v1/subjects/{id}"),
                Some(json!({ "tier": tier })),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let (s, b) = cp
            .call("POST", &format!("/v1/subjects/{id}/keys"), None)
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let dir = TempDir::new("console");
    let log = dir.0.join("audit.jsonl");
    std::fs::write(&log, audit_log()).expect("audit log");
    let ingest = |expect: &str| {
        let out = output_ok(
            Command::new(bin("control-plane"))
                .args(["ingest", "--database", &cp.db_url, "--audit-log"])
                .arg(&log),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(expect), "{text}");
    };
    let events = ADMITTED_ACME + ADMITTED_BOB + REFUSED_ACME + SETTLED;
    ingest(&format!(
        "{} lines, {events} new events, 1 unreadable",
        events + 1
    ));
    // Read again: the ledger's key makes it a no-op.
    ingest(&format!("{} lines, 0 new events", events + 1));
    (cp, db, dir)
}

/// Gateway audit events of the last minutes: lookups of acme and bob, refusals of acme, LLM
/// settlements of acme; and one line that is not an event.
fn audit_log() -> String {
    let now = chrono::Utc::now();
    let day = now.format("%Y-%m-%d").to_string();
    // Within the last minute, but today (UTC) even just after midnight: the top tables and the
    // daily limits are of today.
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let base = (now - chrono::Duration::seconds(60)).max(midnight);
    let mut out = String::new();
    let mut n = 0u64;
    let mut line = |subject: &str, body: Value| {
        n += 1;
        let at = base + chrono::Duration::milliseconds(50 * n as i64);
        let mut e = json!({
            "event_id": format!("0190a000-0000-7000-8000-{n:012}"),
            "schema_version": 1,
            "occurred_at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "source": "gateway-test",
            "subject": subject,
            "tenant": subject,
            "request_id": format!("req-{n}"),
            "day": day,
        });
        for (k, v) in body.as_object().unwrap() {
            e[k] = v.clone();
        }
        out.push_str(&e.to_string());
        out.push('\n');
    };
    for _ in 0..ADMITTED_ACME {
        line(
            "acme",
            json!({ "type": "QuotaConsumed", "quota": "lookup", "amount": 1 }),
        );
    }
    for _ in 0..ADMITTED_BOB {
        line(
            "bob",
            json!({ "type": "QuotaConsumed", "quota": "lookup", "amount": 1 }),
        );
    }
    for _ in 0..REFUSED_ACME {
        line(
            "acme",
            json!({ "type": "QuotaRejected", "quota": "lookup", "amount": 1, "reason": "daily_limit" }),
        );
    }
    for i in 0..SETTLED {
        line(
            "acme",
            json!({ "type": "ReservationSettled", "attempt_id": format!("a{i}"), "settlements": [
            { "quota": "llm_tokens", "reserved": 4000, "actual": TOKENS_EACH, "refunded": 4000 - TOKENS_EACH },
            { "quota": "llm_spend", "reserved": 9000, "actual": SPEND_EACH, "refunded": 9000 - SPEND_EACH },
        ] }),
        );
    }
    out.push_str("not an event\n");
    out
}

/// The `data-value`s of a chart's series, summed.
fn series_total(page: &str, chart: &str, series: &str) -> f64 {
    let start = page
        .find(&format!(r#"id="chart-{chart}""#))
        .unwrap_or_else(|| panic!("chart {chart}"));
    let rest = &page[start..];
    let rest = &rest[..rest.find("</figure>").unwrap_or(rest.len())];
    let at = rest
        .find(&format!(r#"data-series="{series}""#))
        .unwrap_or_else(|| panic!("series {series} in {chart}"));
    let group = &rest[at..rest[at..].find("</g>").map_or(rest.len(), |e| at + e)];
    group
        .split(r#"data-value=""#)
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_roles_csrf_and_sessions() {
    let (cp, _db, _dir) = seeded(Db::sqlite()).await;
    let base = format!("http://{}", cp.addr);
    // Signed out: pages send to the sign-in page, posts are refused.
    let r = http()
        .get(format!("{base}/console/overview"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/login");
    let r = http()
        .post(format!("{base}/console/subjects/acme/tier"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("tier=pro")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A sign-in without the sign-in form's token is refused, a wrong token too.
    let r = http()
        .post(format!("{base}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", &cp.admin)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "sign-in without a CSRF token");
    // Behind a TLS terminator the cookies are Secure; served directly (plain HTTP) they cannot be.
    for (proto, secure) in [(Some("https"), true), (None, false)] {
        let mut req = http().get(format!("{base}/console/login"));
        if let Some(p) = proto {
            req = req.header("x-forwarded-proto", p);
        }
        let r = req.send().await.unwrap();
        let (_, header) = set_cookie(&r, "tg_login").expect("a sign-in cookie");
        assert_eq!(header.contains("; Secure"), secure, "{proto:?}: {header}");
        assert!(header.contains("HttpOnly"), "{header}");
    }
    let (viewer_token, viewer_id) = cp.issue_token("alice-viewer", "viewer").await;
    let (editor_token, _) = cp.issue_token("erin-editor", "editor").await;
    // A payment webhook's token posts entitlements only: no console session for it.
    let (billing_token, _) = cp.issue_token("stripe-webhook", "billing").await;
    let r = try_sign_in(&cp, &billing_token).await;
    assert_eq!(r.status(), 403, "a billing token signs in");
    assert!(
        set_cookie(&r, "tg_session").is_none(),
        "a billing token got a session"
    );

    // A viewer sees every page and no edit control, and is refused when posting anyway.
    let viewer = sign_in(&cp, &viewer_token).await;
    for page in [
        "overview",
        "subjects",
        "subjects/acme",
        "policies",
        "gateways",
        "changes",
    ] {
        let (status, html) = viewer.get(&format!("/console/{page}")).await;
        assert_eq!(status, 200, "{page}: {html}");
        assert!(html.contains("token:alice-viewer"), "{page} names the user");
        for control in [
            "change-tier",
            "issue-key",
            "edit-policy",
            "Roll back",
            "Revoke",
        ] {
            assert!(
                !html.contains(control),
                "a viewer sees `{control}` on {page}"
            );
        }
    }
    let (status, _) = viewer.get("/console/policies/edit").await;
    assert_eq!(status, 403);
    let (status, _, _) = viewer
        .post(
            "/console/subjects/acme/tier",
            &[("tier", "pro")],
            Some(&viewer.csrf),
        )
        .await;
    assert_eq!(status, 403, "a viewer may not change a tier");
    let (status, _, _) = viewer
        .post("/console/policies/1/rollback", &[], Some(&viewer.csrf))
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        cp.call("GET", "/v1/subjects/acme", None).await.1["tier"],
        "free"
    );

    // An editor: forms without the CSRF token, with another session's, or from another site
    // are refused; with it the tier changes through the entitlement path.
    let editor = sign_in(&cp, &editor_token).await;
    assert_ne!(editor.csrf, viewer.csrf);
    let (status, _, _) = editor
        .post("/console/subjects/acme/tier", &[("tier", "pro")], None)
        .await;
    assert_eq!(status, 403, "no CSRF token");
    let (status, _, _) = editor
        .post(
            "/console/subjects/acme/tier",
            &[("tier", "pro")],
            Some(&viewer.csrf),
        )
        .await;
    assert_eq!(status, 403, "another session's CSRF token");
    let r = http()
        .post(format!("{base}/console/subjects/acme/tier"))
        .header("cookie", &editor.cookie)
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("tier", "pro"), ("csrf", &editor.csrf)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a cross-site post");
    assert_eq!(
        cp.call("GET", "/v1/subjects/acme", None).await.1["tier"],
        "free"
    );
    let (status, loc, body) = editor
        .post(
            "/console/subjects/acme/tier",
            &[("tier", "pro")],
            Some(&editor.csrf),
        )
        .await;
    assert_eq!(
        (status, loc.as_str()),
        (303, "/console/subjects/acme"),
        "{body}"
    );
    assert_eq!(
        cp.call("GET", "/v1/subjects/acme", None).await.1["tier"],
        "pro"
    );
    let changes = cp.call("GET", "/v1/changes?limit=1", None).await.1;
    assert_eq!(changes[0]["actor"], "token:erin-editor", "{changes}");
    assert!(
        changes[0]["detail"]
            .as_str()
            .unwrap()
            .contains("free → pro"),
        "{changes}"
    );
    let (_, html) = editor.get("/console/changes").await;
    assert!(html.contains("free → pro"));

    // Keys: issued (shown once) and revoked from the subject's page.
    let (status, page) = editor.get("/console/subjects/bob").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("issue-key") && page.contains("change-tier"),
        "an editor sees the controls"
    );
    let (status, _, html) = editor
        .post("/console/subjects/bob/keys", &[], Some(&editor.csrf))
        .await;
    assert_eq!(status, 201, "{html}");
    let key_at = html.find(r#"id="new-key">"#).expect("the new key") + 13;
    let key = &html[key_at..key_at + html[key_at..].find('<').unwrap()];
    assert!(key.starts_with("tg_"), "{key}");
    let bob = cp.call("GET", "/v1/subjects/bob", None).await.1;
    let keys = bob["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let (_, page) = editor.get("/console/subjects/bob").await;
    assert!(!page.contains(key), "a listed key is masked");
    let newest = keys
        .iter()
        .find(|k| {
            key.starts_with(k["prefix"].as_str().unwrap()) && !k["id"].as_str().unwrap().is_empty()
        })
        .unwrap();
    let id = newest["id"].as_str().unwrap();
    let (status, _, _) = editor
        .post(
            &format!("/console/subjects/bob/keys/{id}/revoke"),
            &[],
            Some(&editor.csrf),
        )
        .await;
    assert_eq!(status, 303);
    let bob = cp.call("GET", "/v1/subjects/bob", None).await.1;
    assert!(
        bob["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id && k["revoked"] == true)
    );

    // Policies: a mistake is shown at its line and column and nothing changes; a fix is
    // published; an older version is rolled back to.
    let broken = POLICY.replace("lookup: { daily: 100 }", "lookup: { daily: lots }");
    let (status, _, html) = editor
        .post(
            "/console/policies/validate",
            &[("yaml", &broken), ("comment", "")],
            Some(&editor.csrf),
        )
        .await;
    assert_eq!(status, 422, "{html}");
    let line = POLICY
        .lines()
        .position(|l| l.contains("lookup: { daily: 100 }"))
        .unwrap()
        + 1;
    assert!(html.contains(&format!("line {line}, column")), "{html}");
    // Thousands of mistakes on one long line: the first hundred are shown, the page stays small.
    let quotas: Vec<String> = (0..5000).map(|i| format!("q{i}: {{ daily: 0 }}")).collect();
    let many = format!("{POLICY}  huge: {{ {} }}\n", quotas.join(", "));
    let (status, _, html) = editor
        .post(
            "/console/policies/validate",
            &[("yaml", &many), ("comment", "")],
            Some(&editor.csrf),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(html.matches("class=\"policy-error\"").count(), 100);
    assert!(html.contains("and 4900 more"), "the rest is counted");
    assert!(
        html.len() < 2 * many.len() + 200_000,
        "{} bytes",
        html.len()
    );
    let (status, _, _) = editor
        .post(
            "/console/policies/publish",
            &[("yaml", &broken), ("comment", "broken")],
            Some(&editor.csrf),
        )
        .await;
    assert_eq!(status, 422);
    let versions = || async {
        cp.call("GET", "/v1/policies", None)
            .await
            .1
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(versions().await, 1, "a refused policy is not stored");
    let fixed = POLICY
        .replace("version: console-test", "version: console-test-2")
        .replace("\n", "\r\n");
    let (status, _, html) = editor
        .post(
            "/console/policies/validate",
            &[("yaml", &fixed)],
            Some(&editor.csrf),
        )
        .await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("Valid: label console-test-2"), "{html}");
    let (status, loc, _) = editor
        .post(
            "/console/policies/publish",
            &[("yaml", &fixed), ("comment", "relabel")],
            Some(&editor.csrf),
        )
        .await;
    assert_eq!(
        (status, loc.as_str()),
        (303, "/console/policies?published=2")
    );
    let active = cp.call("GET", "/v1/policies/active", None).await.1;
    assert_eq!(active["label"], "console-test-2");
    assert_eq!(active["comment"], "relabel");
    assert_eq!(active["actor"], "token:erin-editor");
    assert!(
        !active["yaml"].as_str().unwrap().contains('\r'),
        "line ends are stored as LF"
    );
    let (status, html) = editor.get("/console/policies/diff?from=1&to=2").await;
    assert_eq!(status, 200);
    assert!(
        html.contains(r#"<span class="del">-version: console-test</span>"#),
        "{html}"
    );
    assert!(
        html.contains(r#"<span class="add">+version: console-test-2</span>"#),
        "{html}"
    );
    let (status, loc, _) = editor
        .post("/console/policies/1/rollback", &[], Some(&editor.csrf))
        .await;
    assert_eq!(
        (status, loc.as_str()),
        (303, "/console/policies?published=3")
    );
    let active = cp.call("GET", "/v1/policies/active", None).await.1;
    assert_eq!(
        (active["label"].as_str(), active["comment"].as_str()),
        (Some("console-test"), Some("rollback to v1"))
    );
    let (_, html) = viewer.get("/console/policies").await;
    assert!(
        html.contains("rollback to v1") && html.contains("token:erin-editor"),
        "history shows author and comment"
    );

    // Sign-out ends the session; a revoked token ends its sessions too.
    let (status, loc, _) = editor
        .post("/console/logout", &[], Some(&editor.csrf))
        .await;
    assert_eq!((status, loc.as_str()), (303, "/console/login"));
    let (status, _) = editor.get("/console/overview").await;
    assert_eq!(status, 303, "signed out");
    let (status, _, _) = editor
        .post(
            "/console/subjects/acme/tier",
            &[("tier", "free")],
            Some(&editor.csrf),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(viewer.get("/console/overview").await.0, 200);
    let (s, _) = cp
        .call("DELETE", &format!("/v1/tokens/{viewer_id}"), None)
        .await;
    assert_eq!(s, 204);
    assert_eq!(
        viewer.get("/console/overview").await.0,
        303,
        "a revoked token's session ends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_charts_match_the_ledger_and_gateways_are_listed_sqlite() {
    charts(Db::sqlite(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_charts_match_the_ledger_and_gateways_are_listed_postgres() {
    charts(Db::postgres(), false).await;
}

/// The charts against what was ingested, the gateways page, then (`with_browser`) the browser.
async fn charts(db: Db, with_browser: bool) {
    let (cp, _db, dir) = seeded(db).await;
    let (viewer_token, _) = cp.issue_token("gateways", "viewer").await;
    let viewer = sign_in(&cp, &viewer_token).await;
    for range in ["hour", "day", "30d"] {
        let (status, html) = viewer
            .get(&format!("/console/overview?range={range}"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            series_total(&html, "requests", "admitted"),
            (ADMITTED_ACME + ADMITTED_BOB) as f64,
            "{range}"
        );
        assert_eq!(
            series_total(&html, "requests", "refused"),
            REFUSED_ACME as f64,
            "{range}"
        );
        assert_eq!(
            series_total(&html, "refusals", "daily_limit"),
            REFUSED_ACME as f64,
            "{range}"
        );
        assert_eq!(
            series_total(&html, "tokens", "tokens"),
            (SETTLED * TOKENS_EACH) as f64,
            "{range}"
        );
        assert_eq!(
            series_total(&html, "spend", "spend"),
            (SETTLED * SPEND_EACH) as f64 / 1e6,
            "{range}"
        );
    }
    let (_, html) = viewer.get("/console/overview").await;
    let top = &html[html.find(r#"id="top-refusals""#).unwrap()..];
    assert!(
        top.contains(">acme</a>") && top.contains(&format!(">{REFUSED_ACME}<")),
        "{top}"
    );
    let top = &html[html.find(r#"id="top-spend""#).unwrap()..];
    assert!(top.contains("$0.005000"), "{top}");
    // The subject's page: usage per quota over 30 days, against its limits, and its refusals.
    let (_, html) = viewer.get("/console/subjects/acme").await;
    assert_eq!(
        series_total(&html, "quota-lookup", "used"),
        ADMITTED_ACME as f64
    );
    assert_eq!(
        series_total(&html, "quota-llm_tokens", "used"),
        (SETTLED * TOKENS_EACH) as f64
    );
    let limits = &html[html.find(r#"id="limits""#).unwrap()..];
    assert!(
        limits.contains(&format!(r#"<td class="num">{ADMITTED_ACME}</td>"#)),
        "{limits}"
    );
    assert!(limits.contains("aria-label=\"7 of 100\""), "{limits}");
    let refusals = &html[html.find(r#"id="refusals""#).unwrap()..];
    assert_eq!(
        refusals.matches("daily_limit").count(),
        REFUSED_ACME as usize
    );
    // A gateway's watch stream is listed with the revision it was sent.
    let revision = cp.call("GET", "/v1/revision", None).await.1["revision"]
        .as_u64()
        .unwrap();
    let mut stream = http()
        .get(cp.url("/v1/watch"))
        .bearer_auth(&viewer_token)
        .header("user-agent", "tollgate-gateway-test")
        .send()
        .await
        .unwrap();
    let _ = stream.chunk().await.unwrap();
    let (_, html) = viewer.get("/console/gateways").await;
    let row = &html[html
        .find("tollgate-gateway-test")
        .expect("the gateway is listed")..];
    assert!(
        row.contains(&format!(
            r#"<td class="num">{revision}</td><td class="num">0</td>"#
        )),
        "{row}"
    );
    drop(stream);
    if with_browser {
        browser(&cp, &viewer_token, &dir).await;
    }
}

/// The browser test, when Chromium, its driver and Selenium are installed (`scripts/setup
/// --test` installs them); skipped with a message otherwise.
async fn browser(cp: &ControlPlane, viewer_token: &str, dir: &TempDir) {
    let python = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/tollgate-tools/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let has = |cmd: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let selenium = Command::new(&python)
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !(has("chromium") && has("chromedriver") && selenium) {
        println!(
            "SKIPPED the browser test: needs chromium, chromedriver and selenium in {python} (scripts/setup --test installs them)"
        );
        return;
    }
    let (editor_token, _) = cp.issue_token("browser-editor", "editor").await;
    let shots = std::env::var("TOLLGATE_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("tollgate-console-screenshots"));
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let out = Command::new(&python)
        .arg(workspace_root().join("tests/browser/console.py"))
        .env("CONSOLE_URL", format!("http://{}", cp.addr))
        .env("VIEWER_TOKEN", viewer_token)
        .env("EDITOR_TOKEN", &editor_token)
        .env(
            "EXPECT_ADMITTED",
            (ADMITTED_ACME + ADMITTED_BOB).to_string(),
        )
        .env("SHOTS", &shots)
        .env("HOME", &dir.0)
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("BROWSER TEST PASSED"), "{stdout}");
    let tier = cp.call("GET", "/v1/subjects/bob", None).await.1;
    assert_eq!(tier["tier"], "free", "the browser changed bob's tier");
}

/// Several control-plane instances on one PostgreSQL database (behind one load balancer) share
/// console sessions: signed in through one, a browser is signed in through all, and signing out
/// through any ends the session everywhere. The database holds no cookie or token in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_are_shared_by_every_instance() {
    let db = Db::postgres();
    let a = ControlPlane::start(&db);
    let b = a.another();
    let on_a = sign_in(&a, &a.admin).await;
    let on_b = Session {
        base: format!("http://{}", b.addr),
        cookie: on_a.cookie.clone(),
        csrf: on_a.csrf.clone(),
    };
    let (status, page) = on_b.get("/console/subjects").await;
    assert_eq!(status, 200, "the session opened on A is known to B: {page}");
    let stored = tollgate_e2e::LedgerDb::open(&db)
        .await
        .strings("SELECT id_sha256 || ' ' || token_id || ' ' || token_sha256 FROM console_sessions")
        .await;
    let cookie_value = on_a.cookie.split_once('=').map_or("", |(_, v)| v);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|s| !s.contains(cookie_value) && !s.contains(&a.admin)),
        "only hashes are stored: {stored:?}"
    );
    let (status, _, _) = on_b.post("/console/logout", &[], Some(&on_b.csrf)).await;
    assert_eq!(status, 303);
    let (status, _) = on_a.get("/console/overview").await;
    assert_eq!(status, 303, "signed out through B, signed out through A");
}
