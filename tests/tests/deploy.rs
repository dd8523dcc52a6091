//! The deployment kit checked against the code: every metric the Grafana dashboard and the alert
//! rules query is exported by a real gateway and accounting consumer after some traffic; the rules
//! pass `promtool` and each has a unit test; the compose file validates and wires what it says;
//! audit events travel to the ledger over TLS; a broken TLS option stops the start with a clear
//! message.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tollgate_e2e::*;

fn deploy_file(rel: &str) -> PathBuf {
    workspace_root().join("deploy").join(rel)
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read YAML");
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Metric names a PromQL expression reads: identifiers that are not functions, aggregations,
/// keywords, label names (inside `{}` and grouping clauses), durations or strings.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: usize, close: u8| -> usize {
        let mut j = i + 1;
        let mut quote = None;
        while j < b.len() {
            match (quote, b[j]) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), b'\\') => j += 1,
                (Some(_), _) => {}
                (None, b'"' | b'\'') => quote = Some(b[j]),
                (None, c) if c == close => return j + 1,
                _ => {}
            }
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            i = skip_to(i, b'}');
        } else if c == b'[' {
            i = skip_to(i, b']');
        } else if c == b'"' || c == b'\'' {
            let mut j = i + 1;
            while j < b.len() && b[j] != c {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c.is_ascii_digit() {
            // A number or a duration (5m, 1h).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' || c == b'$' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b"_:$".contains(&b[i])) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut next = i;
            while next < b.len() && b[next] == b' ' {
                next += 1;
            }
            // A function or aggregation: `f(`, or `sum by (…) (` / `sum without (…) (`.
            let rest = &expr[next..];
            let call = rest.starts_with('(')
                || ["by", "without"].iter().any(|g| {
                    rest.strip_prefix(g)
                        .is_some_and(|r| r.trim_start().starts_with('('))
                });
            if GROUPING.contains(&word) && call {
                i = skip_to(next, b')');
            } else if !call && !KEYWORDS.contains(&word) && !word.starts_with('$') {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The dashboard's queries: every panel target's `expr`, and the metric of each
/// `label_values(metric, label)` variable.
fn dashboard_queries() -> (Vec<String>, BTreeSet<String>) {
    let path = deploy_file("grafana/dashboards/tollgate.json");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut exprs = Vec::new();
    let mut panels: Vec<&Value> = dash["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(
                t["expr"]
                    .as_str()
                    .expect("every target has an expr")
                    .to_string(),
            );
        }
    }
    let mut variables = BTreeSet::new();
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if let Some(arg) = q.and_then(|q| q.strip_prefix("label_values(")) {
            let metric = arg.split([',', ')', '{']).next().unwrap_or_default();
            variables.insert(metric.trim().to_string());
        }
    }
    (exprs, variables)
}

/// The alert rules: `(alert name, expr)`.
fn alert_rules() -> Vec<(String, String)> {
    let rules = read_yaml(&deploy_file("prometheus/alerts.yml"));
    let mut out = Vec::new();
    for g in rules["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            out.push((
                r["alert"].as_str().expect("alert name").to_string(),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

/// Sample names in a Prometheus text exposition.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The test policy: `dead` is an upstream nothing listens on (its requests give their units back).
fn deploy_policy(upstream: SocketAddr, dead: SocketAddr, version: &str) -> String {
    format!(
        "version: {version}
upstreams:
  up: {{ address: '{upstream}', read_timeout_ms: 10000 }}
  gone: {{ address: '{dead}', connect_timeout_ms: 500 }}
routes:
  - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: lookup }}
  - {{ name: report, match: {{ path_prefix: /report }}, upstream: gone, quota: report }}
  - name: chat
    match: {{ path_prefix: /v1/chat/completions }}
    upstream: up
    quota: requests
    llm: {{ provider: openai, tokens: tokens, spend: spend, default_max_tokens: 100 }}
models:
  default: {{ input_per_million: 1, output_per_million: 4 }}
tiers:
  free:
    lookup: {{ daily: 2 }}
    report: {{ daily: 100 }}
    requests: {{ daily: 100 }}
    tokens: {{ daily: 100000 }}
    spend: {{ daily: 1000000 }}
subjects:
  - {{ key: deploy-key, id: alice, tier: free }}
"
    )
}

async fn get_text(url: String) -> String {
    client()
        .get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_metric_is_exported() {
    let mock = MockUpstream::start();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let broker = Broker::start();
    let cp_db = Db::sqlite();
    let ledger_db = Db::sqlite();
    let cp = ControlPlane::start(&cp_db);
    cp.publish_policy(deploy_policy(mock.addr, dead, "deploy-1"))
        .await;
    let (token, _) = cp.issue_token("gateways", "viewer").await;
    let accounting = Accounting::start(&broker, &ledger_db, 100);
    let dir = TempDir::new("deploy");
    let spool = dir.0.join("spool");
    let brokers = broker.brokers();
    let gw = Gateway::following_with(
        &[cp.url("")],
        &token,
        &dir.0.join("snapshot.json"),
        &Backend::shared_redis(),
        &[
            "--audit-kafka",
            &brokers,
            "--audit-spool",
            spool.to_str().expect("utf-8 path"),
            // As in tests/tests/kafka.rs: tansu and idempotent producers across restarts.
            "--audit-kafka-option",
            "enable.idempotence=false",
        ],
    );
    let c = client();
    let lookup = || c.get(gw.url("/lookup/1")).bearer_auth("deploy-key").send();
    assert!(
        eventually(Duration::from_secs(20), || async {
            lookup().await.is_ok_and(|r| r.status() == 200)
        })
        .await,
        "the gateway enforces the control plane's policy"
    );
    // The second lookup of the day is the last one; the third is refused.
    assert_eq!(lookup().await.expect("lookup").status(), 200);
    assert_eq!(lookup().await.expect("lookup").status(), 429);
    // An upstream that is down: 502, the unit given back, the error counted.
    let r = c
        .get(gw.url("/report"))
        .bearer_auth("deploy-key")
        .send()
        .await
        .expect("report");
    assert_eq!(r.status(), 502);
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("deploy-key")
        .json(&json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "max_tokens": 50,
            "messages": [{ "role": "user", "content": "hello" }],
        }))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("stream read to the end");
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(
                &metrics(&gw).await,
                "llm_settlements_total{result=\"charged\"}",
            )
            .unwrap_or(0)
                >= 1
        })
        .await,
        "the stream is settled"
    );
    // A revision pushed while the gateway follows: its propagation time is measured.
    cp.publish_policy(deploy_policy(mock.addr, dead, "deploy-2"))
        .await;
    let propagated = eventually(Duration::from_secs(10), || async {
        metric(
            &metrics(&gw).await,
            "control_plane_propagation_seconds_count",
        )
        .unwrap_or(0)
            >= 1
    })
    .await;
    assert!(propagated, "the pushed revision's propagation is measured");
    assert!(
        eventually(Duration::from_secs(20), || async {
            accounting.counter("accounting_events_inserted_total").await >= 3
        })
        .await,
        "decisions reach the ledger"
    );
    let gw_text = metrics(&gw).await;
    let acc_text = get_text(format!("http://{}/metrics", accounting.metrics)).await;
    // What the dashboard's breakdowns rely on: refusals by reason and tier, units per subject.
    assert!(
        gw_text.contains(
            "quota_refusals_total{reason=\"quota_exceeded\",tier=\"free\",type=\"lookup\"} 1"
        ),
        "{gw_text}"
    );
    assert!(
        gw_text.contains("quota_subject_units_total{subject=\"alice\",type=\"lookup\"} 2"),
        "{gw_text}"
    );
    assert!(
        metric(&gw_text, "llm_settled_units_total{type=\"spend\"}").is_some_and(|v| v > 0),
        "{gw_text}"
    );
    assert_eq!(
        metric(&gw_text, "control_plane_revision{kind=\"applied\"}"),
        metric(&gw_text, "control_plane_revision{kind=\"latest\"}"),
        "{gw_text}"
    );

    let mut exported = exported_names(&gw_text);
    exported.extend(exported_names(&acc_text));
    let (exprs, variables) = dashboard_queries();
    let mut missing = Vec::new();
    for e in &exprs {
        let names = promql_metrics(e);
        assert!(!names.is_empty(), "no metric found in `{e}`");
        for n in names {
            if !exported.contains(&n) {
                missing.push(format!("dashboard `{e}`: {n}"));
            }
        }
    }
    for v in &variables {
        if !exported.contains(v) {
            missing.push(format!("dashboard variable: {v}"));
        }
    }
    for (alert, e) in alert_rules() {
        for n in promql_metrics(&e) {
            if !exported.contains(&n) {
                missing.push(format!("alert {alert}: {n}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics queried but not exported:\n{}",
        missing.join("\n")
    );
    figure("deploy_dashboard_queries", exprs.len());
}

#[test]
fn the_promql_scanner_finds_metrics_and_nothing_else() {
    let got = promql_metrics(
        "sum by (route, status) (rate(gateway_requests_total{instance=~\"$instance\", a=\"x y\"}[$__rate_interval])) \
         > 3 * (sum(rate(quota_refusals_total[1h] offset 5m)) or vector(0)) \
         and on (instance) control_plane_revision{kind=\"applied\"} \
         - time() + histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))",
    );
    let want: BTreeSet<String> = [
        "gateway_requests_total",
        "quota_refusals_total",
        "control_plane_revision",
        "x_bucket",
    ]
    .map(String::from)
    .into();
    assert_eq!(got, want);
}

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn every_alert_rule_has_a_unit_test_and_promtool_passes_them() {
    let rules: BTreeSet<String> = alert_rules().into_iter().map(|(a, _)| a).collect();
    let tests = read_yaml(&deploy_file("prometheus/alerts_test.yml"));
    let mut tested = BTreeSet::new();
    for t in tests["tests"].as_array().expect("tests") {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            // Only cases where the alert is expected to fire count as covering the rule.
            if a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()) {
                tested.insert(a["alertname"].as_str().expect("alertname").to_string());
            }
        }
    }
    assert_eq!(rules, tested, "each alert rule fires in some unit test");
    if !have("promtool", "--version") {
        println!(
            "note: promtool is not installed (Debian package `prometheus`; scripts/setup --test \
             installs it): the rules were not run"
        );
        return;
    }
    let dir = deploy_file("prometheus");
    run_ok(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["check", "rules", "alerts.yml"]),
    );
    let out = run_ok(Command::new("promtool").current_dir(&dir).args([
        "test",
        "rules",
        "alerts_test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
    run_ok(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["check", "config", "prometheus.yml"]),
    );
}

#[test]
fn the_compose_file_wires_the_fleet_and_validates() {
    let path = deploy_file("compose.yaml");
    let compose = read_yaml(&path);
    let services = compose["services"].as_object().expect("services");
    for s in [
        "redis",
        "postgres",
        "kafka",
        "control-plane",
        "accounting",
        "gateway-1",
        "gateway-2",
        "mock-upstream",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(s), "service {s}");
    }
    let kafka = &services["kafka"];
    assert!(
        kafka["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("apache/kafka:4.")),
        "the official Apache Kafka image, pinned"
    );
    assert_eq!(
        kafka["environment"]["KAFKA_PROCESS_ROLES"],
        "broker,controller"
    );
    // Prometheus scrapes services that exist, on the ports they serve metrics on.
    let prom = read_yaml(&deploy_file("prometheus/prometheus.yml"));
    for job in prom["scrape_configs"].as_array().expect("scrape configs") {
        for sc in job["static_configs"].as_array().into_iter().flatten() {
            for t in sc["targets"].as_array().into_iter().flatten() {
                let host = t.as_str().and_then(|t| t.split(':').next()).unwrap_or("");
                assert!(
                    host == "localhost" || services.contains_key(host),
                    "scrape target {t}"
                );
            }
        }
    }
    let deploy = deploy_file("");
    let compose_cmd = if have("docker-compose", "--version") {
        Some(vec!["docker-compose"])
    } else if Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some(vec!["docker", "compose"])
    } else {
        None
    };
    let Some(cmd) = compose_cmd else {
        println!(
            "note: no compose implementation installed (Debian package `docker-compose`; \
             scripts/setup --test installs it): `config` was not run"
        );
        return;
    };
    run_ok(
        Command::new(cmd[0])
            .args(&cmd[1..])
            .current_dir(&deploy)
            .args(["-f", "compose.yaml", "config", "-q"]),
    );
}

/// A TLS terminator in front of a plaintext Kafka-protocol broker (tansu has no TLS listener):
/// accepts TLS on `listener` with `certs`, forwards the bytes to `backend`. Counts handshakes.
fn tls_terminator(
    listener: std::net::TcpListener,
    certs: &tls::Certs,
    backend: SocketAddr,
) -> Arc<AtomicU64> {
    use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod};
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
    b.set_certificate_chain_file(&certs.cert).expect("cert");
    b.set_private_key_file(&certs.key, SslFiletype::PEM)
        .expect("key");
    let acceptor = b.build();
    let handshakes = Arc::new(AtomicU64::new(0));
    let counted = handshakes.clone();
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(ssl) = Ssl::new(acceptor.context()) else {
                continue;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, tcp) else {
                    return;
                };
                if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                    return;
                }
                counted.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut up) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    handshakes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_reach_the_ledger_over_tls() {
    let certs = tls::Certs::new();
    let dir = TempDir::new("kafka-tls");
    let ca = dir.0.join("ca.pem");
    std::fs::write(&ca, &certs.ca_pem).expect("write CA");
    let front = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let tls_port = front.local_addr().expect("addr").port();
    // The broker tells clients to come back through the terminator.
    let broker = Broker::start_advertising(free_port(), tls_port);
    let backend: SocketAddr = format!("127.0.0.1:{}", broker.port).parse().expect("addr");
    let handshakes = tls_terminator(front, &certs, backend);
    let brokers = format!("127.0.0.1:{tls_port}");
    let ca_opt = format!("ssl.ca.location={}", ca.display());
    let tls_opts = ["security.protocol=ssl", ca_opt.as_str()];

    let mock = MockUpstream::start();
    let db = Db::sqlite();
    let _accounting = Accounting::start_with(
        &brokers,
        &db,
        50,
        &["--kafka-option", tls_opts[0], "--kafka-option", tls_opts[1]],
    );
    let spool = dir.0.join("spool");
    let gw = Gateway::start_with(
        &policy(
            mock.addr,
            &[("lookup", "/lookup", "lookup", 1)],
            "  t:\n    lookup: { daily: 1000 }",
            &["t"],
        ),
        &[
            "--audit-kafka",
            &brokers,
            "--audit-spool",
            spool.to_str().expect("utf-8 path"),
            "--audit-kafka-option",
            "enable.idempotence=false",
            "--audit-kafka-option",
            tls_opts[0],
            "--audit-kafka-option",
            tls_opts[1],
        ],
    );
    let n = 20;
    for i in 0..n {
        let r = client()
            .get(gw.url("/lookup/1"))
            .bearer_auth("key-t")
            .header("x-request-id", format!("tls-{i}"))
            .send()
            .await
            .expect("lookup");
        assert_eq!(r.status(), 200);
    }
    let ledger = LedgerDb::open(&db).await;
    let arrived = eventually(Duration::from_secs(30), || async {
        ledger
            .scalar("SELECT COUNT(DISTINCT event_id) FROM quota_audit WHERE type = 'QuotaConsumed'")
            .await
            == n
    })
    .await;
    let m = metrics(&gw).await;
    assert!(arrived, "every decision reaches the ledger over TLS\n{m}");
    assert!(
        metric(&m, "audit_kafka_delivered_total").is_some_and(|d| d >= n as u64),
        "delivered directly, none spooled\n{m}"
    );
    assert_eq!(metric(&m, "audit_kafka_spooled_total"), Some(0), "{m}");
    // Producer and consumer each reached the broker only through TLS handshakes.
    assert!(handshakes.load(Ordering::Relaxed) >= 2);
}

/// Start `cmd`, which must fail at once; returns what it wrote on stderr.
fn failed_start(mut cmd: Command, log: &Path) -> String {
    let mut proc = Proc::spawn_logged(&mut cmd, Some(log));
    assert!(
        proc.wait_exit(Duration::from_secs(15)),
        "it stops by itself"
    );
    std::fs::read_to_string(log).unwrap_or_default()
}

#[test]
fn a_misconfigured_tls_option_stops_the_start_with_a_clear_message() {
    let dir = TempDir::new("kafka-tls-bad");
    let policy_file = dir.0.join("policy.yaml");
    std::fs::write(
        &policy_file,
        policy(
            "127.0.0.1:9".parse().expect("addr"),
            &[("lookup", "/lookup", "lookup", 1)],
            "  t:\n    lookup: { daily: 10 }",
            &["t"],
        ),
    )
    .expect("policy");
    let mut gw = Command::new(bin("gateway"));
    gw.arg("run")
        .arg("--config")
        .arg(&policy_file)
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .arg("--settlement-journal")
        .arg(dir.0.join("journal"))
        .arg("--audit-spool")
        .arg(dir.0.join("spool"))
        .args(["--audit-kafka", "127.0.0.1:9"])
        .args(["--audit-kafka-option", "security.protocol=ssl"])
        .args([
            "--audit-kafka-option",
            "ssl.ca.location=/nonexistent/ca.pem",
        ]);
    let err = failed_start(gw, &dir.0.join("gateway.log"));
    assert!(
        err.contains("Kafka option ssl.ca.location=/nonexistent/ca.pem: no such file"),
        "{err}"
    );

    let db = Db::sqlite();
    let mut acc = Command::new(bin("control-plane"));
    acc.args(["accounting", "--brokers", "127.0.0.1:9", "--database"])
        .arg(db.url())
        .args(["--kafka-option", "security.protocol=SASL_SSL"])
        .args(["--kafka-option", "sasl.mechanism=GSSAPI"]);
    let err = failed_start(acc, &dir.0.join("accounting.log"));
    assert!(
        err.contains("Kafka option sasl.mechanism=GSSAPI: this build's Kafka client lacks the `sasl_gssapi` feature"),
        "{err}"
    );
}
