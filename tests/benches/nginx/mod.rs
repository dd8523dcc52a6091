//! nginx as the baseline, in the same run (`scripts/bench nginx` runs this section alone).
//!
//! Two private nginx instances (own config and temporary files in a temp dir, own loopback ports,
//! one process each, `daemon off` and no master, killed on drop): a canned upstream — a fixed
//! JSON body for `GET /lookup…` (and any other GET), a fixed OpenAI chat completion with `usage`
//! for `POST /v1/chat/completions`, and a fixed 5-event OpenAI SSE body when the request carries
//! `x-bench-stream: 1` (nginx cannot read the JSON body's `"stream": true`; the gateway forwards
//! client headers) — and a plain reverse proxy in front of it (HTTP/1.1, kept-alive upstream
//! connections). The gateway (release build, quotas on) proxies to the same canned upstream, and
//! so does pingora alone (`gateway/examples/pingora_floor.rs`, configured as the gateway configures
//! it): the floor under the gateway, separating what pingora costs from what Tollgate adds.
//!
//! Each row gets the same load: `CONNECTIONS` kept-alive connections from the load generator in
//! `load.rs`, which counts only complete, well-framed responses with exactly the canned body (a
//! response framed by closing the connection is an error). Rows alternate over `ROUNDS` rounds,
//! so drift in the machine's load hits every row alike; the ratio column gives the spread of the
//! per-round ratios too.
//!
//! Cores, when there are two or more: the proxy under test (nginx's proxy or the gateway, one
//! worker each) alone on the second; the load generator and the canned upstream on the first.

mod load;

use load::{Outcome, Target, quantile_ms};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_e2e::{Proc, TempDir, bin, cpu_seconds, figure, free_port, unique_prefix};

const CONNECTIONS: usize = 32;

/// The rows' "through" column: which proxy served them.
const NGINX: &str = "nginx (plain proxy)";
const FLOOR: &str = "pingora alone (no Tollgate)";
const GW: &str = "gateway, quotas on";
const GW_BARE: &str = "gateway, bare proxy";
const GW_MEMORY: &str = "gateway, memory";
const GW_REDIS: &str = "gateway, Redis + leases";
const ROUNDS: usize = 5;
const WARMUP: Duration = Duration::from_millis(300);
const WINDOW: Duration = Duration::from_secs(2);
const ONE_CONNECTION_WINDOW: Duration = Duration::from_secs(1);

const LOOKUP_BODY: &str =
    r#"{"id":1,"sku":"TG-0001","name":"canned lookup","price_cents":1999,"in_stock":true}"#;

const CHAT_BODY: &str = concat!(
    r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1764633600,"model":"gpt-4o-mini","#,
    r#""choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the canned upstream."},"#,
    r#""finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#,
);

/// Three content chunks (the last with `finish_reason`), the usage chunk, `[DONE]`.
const SSE_BODY: &str = concat!(
    r#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764633600,"model":"gpt-4o-mini","#,
    r#""choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764633600,"model":"gpt-4o-mini","#,
    r#""choices":[{"index":0,"delta":{"content":" from the"},"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764633600,"model":"gpt-4o-mini","#,
    r#""choices":[{"index":0,"delta":{"content":" canned upstream."},"finish_reason":"stop"}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764633600,"model":"gpt-4o-mini","#,
    r#""choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

/// The client's chat requests; the streamed one asks for the usage chunk itself, so the gateway
/// relays the canned stream unchanged.
const CHAT_REQUEST: &str = r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"Say hello."}]}"#;
const SSE_REQUEST: &str = r#"{"model":"gpt-4o-mini","max_tokens":16,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello."}]}"#;

/// Where the processes run: `proxy` for the proxy under test, `rest` for the load generator and
/// the canned upstream; None when there are not two CPUs to pin to (or no `taskset`).
struct Cores {
    proxy: Option<usize>,
    rest: Option<usize>,
    /// The bench's own affinity before pinning, restored at the end.
    original: Option<String>,
}

impl Cores {
    fn split() -> Cores {
        let me = std::process::id();
        let original = affinity(me);
        let cpus = original.as_deref().map(parse_cpu_list).unwrap_or_default();
        if cpus.len() < 2 || !set_affinity(me, &cpus[0].to_string()) {
            return Cores {
                proxy: None,
                rest: None,
                original: None,
            };
        }
        Cores {
            proxy: Some(cpus[1]),
            rest: Some(cpus[0]),
            original,
        }
    }

    fn describe(&self) -> String {
        match (self.proxy, self.rest) {
            (Some(p), Some(r)) => format!(
                "CPU {p}: the proxy under test alone (nginx's proxy: one process; the gateway: \
                 `--threads 1`); CPU {r}: the load generator (one thread) and the canned nginx \
                 upstream; Redis (shared) not pinned"
            ),
            _ => "not pinned (fewer than two CPUs or no taskset): every process floats".into(),
        }
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        if let Some(list) = &self.original {
            set_affinity(std::process::id(), list);
        }
    }
}

/// The CPU list `taskset` reports for `pid` (e.g. `0,1` or `0-3`).
fn affinity(pid: u32) -> Option<String> {
    let out = Command::new("taskset")
        .args(["-c", "-p", &pid.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.rsplit_once(':')?.1.trim().to_string()).filter(|s| !s.is_empty())
}

/// Pin every thread of `pid` to the CPUs in `list`.
fn set_affinity(pid: u32, list: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-c", "-p", list, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.trim().parse::<usize>().ok()),
        }
    }
    cpus
}

/// `program`, run on `cpu` when given.
fn on_cpu(program: &Path, cpu: Option<usize>) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string()]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn wait_tcp(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {addr}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private nginx: one process (no master, no daemon), its files under `dir/name*`.
struct Nginx {
    addr: SocketAddr,
    proc: Proc,
}

impl Nginx {
    /// `http` goes into the `http` block, `server` into its one `server` block.
    fn start(dir: &Path, name: &str, http: &str, server: &str, cpu: Option<usize>) -> Nginx {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let d = dir.display();
        let mut temp_paths = String::new();
        for kind in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            temp_paths.push_str(&format!("  {kind}_temp_path {d}/{name}-{kind};\n"));
        }
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/{name}.pid;\n\
             error_log {d}/{name}.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n{temp_paths}  keepalive_requests 1000000;\n\
             \x20 keepalive_timeout 300s;\n{http}  server {{\n    listen {addr};\n{server}  }}\n}}\n"
        );
        let conf_path = dir.join(format!("{name}.conf"));
        std::fs::write(&conf_path, conf).expect("write nginx config");
        let log = dir.join(format!("{name}.log"));
        let proc = Proc::spawn_logged(
            on_cpu(Path::new("nginx"), cpu)
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(&log),
            Some(&log),
        );
        wait_tcp(addr, &format!("nginx ({name})"), &log);
        Nginx { addr, proc }
    }

    /// The canned upstream.
    fn upstream(dir: &Path, cpu: Option<usize>) -> Nginx {
        for body in [LOOKUP_BODY, CHAT_BODY, SSE_BODY] {
            assert!(!body.contains(['\'', '\\', '$']), "quotable in nginx");
        }
        let server = format!(
            "    location / {{ default_type application/json; return 200 '{LOOKUP_BODY}'; }}\n\
             \x20   location = /v1/chat/completions {{\n\
             \x20     if ($http_x_bench_stream) {{ rewrite ^ /canned-sse last; }}\n\
             \x20     default_type application/json; return 200 '{CHAT_BODY}';\n    }}\n\
             \x20   location = /canned-sse {{\n\
             \x20     internal; default_type text/event-stream; return 200 '{SSE_BODY}';\n    }}\n"
        );
        Nginx::start(dir, "upstream", "", &server, cpu)
    }

    /// A plain reverse proxy to `upstream`: HTTP/1.1, kept-alive upstream connections; unbuffered
    /// on `/v1/`, as LLM deployments configure it for streams.
    fn proxy(dir: &Path, upstream: SocketAddr, cpu: Option<usize>) -> Nginx {
        let http = format!(
            "  upstream canned {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n"
        );
        let pass =
            "proxy_pass http://canned; proxy_http_version 1.1; proxy_set_header Connection \"\";";
        let server = format!(
            "    location / {{ {pass} }}\n    location /v1/ {{ {pass} proxy_buffering off; }}\n"
        );
        Nginx::start(dir, "proxy", &http, &server, cpu)
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// A release gateway enforcing `policy` on its own port; logs in `dir/name.log`.
struct Gw {
    addr: SocketAddr,
    proc: Proc,
}

impl Gw {
    fn start(dir: &Path, name: &str, policy: &str, extra: &[String], cpu: Option<usize>) -> Gw {
        let policy_file = dir.join(format!("{name}.yaml"));
        std::fs::write(&policy_file, policy).expect("write policy");
        let log = dir.join(format!("{name}.log"));
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut proc = Proc::spawn_logged(
            on_cpu(&bin("gateway"), cpu)
                .arg("run")
                .arg("--config")
                .arg(&policy_file)
                .args(["--listen", &addr.to_string(), "--api-listen", "127.0.0.1:0"])
                .args(["--threads", "1"])
                // Each gateway its own settlement journal: two cannot share one.
                .arg("--settlement-journal")
                .arg(dir.join(format!("{name}.journal")))
                .args(extra),
            Some(&log),
        );
        proc.wait_line("api listening on ");
        wait_tcp(addr, &format!("gateway ({name})"), &log);
        Gw { addr, proc }
    }
}

/// pingora alone (`gateway/examples/pingora_floor.rs`): the floor under the gateway's proxy path.
struct Floor {
    addr: SocketAddr,
    proc: Proc,
}

impl Floor {
    fn start(dir: &Path, upstream: SocketAddr, cpu: Option<usize>) -> Floor {
        let log = dir.join("pingora-floor.log");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let proc = Proc::spawn_logged(
            on_cpu(&bin("examples/pingora_floor"), cpu)
                .arg(addr.to_string())
                .arg(upstream.to_string()),
            Some(&log),
        );
        wait_tcp(addr, "pingora alone", &log);
        Floor { addr, proc }
    }
}

/// Routes to the canned upstream: `/lookup` with quotas on (a token bucket and a daily quota),
/// `/bare` unlimited (no counters: the bare proxy), and the metered chat route (requests, tokens
/// and spend quotas: reserve, meter, settle).
fn gateway_policy(upstream: SocketAddr) -> String {
    format!(
        "version: bench-nginx\n\
         upstreams:\n  up: {{ address: '{upstream}', read_timeout_ms: 10000 }}\n\
         models:\n  default: {{ input_per_million: 1, output_per_million: 4 }}\n\
         routes:\n\
         \x20 - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: lookup }}\n\
         \x20 - {{ name: bare, match: {{ path_prefix: /bare }}, upstream: up, quota: bare }}\n\
         \x20 - {{ name: chat, match: {{ path_prefix: /v1/chat/completions }}, upstream: up, quota: requests,\n\
         \x20     llm: {{ provider: openai, tokens: tokens, spend: spend }} }}\n\
         tiers:\n  pro:\n\
         \x20   lookup:\n      rates: [ {{ limit: 100000000, per: second }} ]\n      daily: 100000000000\n\
         \x20   bare: {{ unlimited: true }}\n\
         \x20   requests: {{ daily: 1000000000 }}\n\
         \x20   tokens: {{ daily: 1000000000000 }}\n\
         \x20   spend: {{ daily: 1000000000000 }}\n\
         subjects:\n  - {{ key: key-pro, id: user-pro, tier: pro, time_zone: UTC }}\n"
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Get,
    Chat,
    Sse,
}

/// The same request bytes go to nginx and to the gateway (nginx ignores the key).
fn target(addr: SocketAddr, kind: Kind, path: &str) -> Target {
    let head =
        format!("Host: {addr}\r\nAuthorization: Bearer key-pro\r\nUser-Agent: tollgate-bench\r\n");
    let (request, expect) = match kind {
        Kind::Get => (format!("GET {path} HTTP/1.1\r\n{head}\r\n"), LOOKUP_BODY),
        Kind::Chat | Kind::Sse => {
            let (body, extra, expect) = if kind == Kind::Sse {
                (
                    SSE_REQUEST,
                    "X-Bench-Stream: 1\r\nAccept: text/event-stream\r\n",
                    SSE_BODY,
                )
            } else {
                (CHAT_REQUEST, "", CHAT_BODY)
            };
            (
                format!(
                    "POST {path} HTTP/1.1\r\n{head}{extra}Content-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
                expect,
            )
        }
    };
    Target {
        addr,
        request: request.into_bytes().into(),
        expect: expect.as_bytes().to_vec().into(),
    }
}

/// A row group of the table: its path, kind and URL, and the gateway rows (through, side, URL)
/// after its nginx and pingora rows.
type Group<'a> = (
    &'static str,
    Kind,
    &'a str,
    Vec<(&'static str, &'a Side, &'a str)>,
);

/// A proxy under test: where it listens, and its process (for its CPU time).
struct Side {
    addr: SocketAddr,
    pid: u32,
}

/// One row of the table: a target, the process whose CPU it costs, and its baseline row.
struct Row {
    path: &'static str,
    via: &'static str,
    kind: Kind,
    target: Target,
    proxy_pid: u32,
    baseline: Option<usize>,
    connections: usize,
    window: Duration,
    runs: Vec<Run>,
}

struct Run {
    outcome: Outcome,
    good: usize,
    /// CPU seconds the proxy process used in the window.
    cpu_s: f64,
    /// Busy share of the proxy's core and of the driver's core (every process on them).
    cores_busy: Option<(f64, f64)>,
}

/// Busy and total jiffies of `cpu`, from /proc/stat.
fn core_jiffies(cpu: usize) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&format!("cpu{cpu}")))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

fn busy_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (before?, after?);
    (t1 > t0).then(|| (b1 - b0) as f64 / (t1 - t0) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Row {
    #[allow(clippy::too_many_arguments)]
    fn new(
        path: &'static str,
        via: &'static str,
        kind: Kind,
        side: &Side,
        url: &str,
        baseline: Option<usize>,
        connections: usize,
        window: Duration,
    ) -> Row {
        Row {
            path,
            via,
            kind,
            target: target(side.addr, kind, url),
            proxy_pid: side.pid,
            baseline,
            connections,
            window,
            runs: Vec::new(),
        }
    }

    fn all(&self) -> Outcome {
        let mut all = Outcome::default();
        for r in &self.runs {
            all.latencies.extend(&r.outcome.latencies);
            all.ttfb.extend(&r.outcome.ttfb);
            for (k, n) in &r.outcome.errors {
                *all.errors.entry(k).or_default() += n;
            }
            all.reconnects += r.outcome.reconnects;
        }
        all.latencies.sort();
        all.ttfb.sort();
        all
    }

    fn round_rps(&self, i: usize) -> f64 {
        self.runs[i].good as f64 / self.window.as_secs_f64()
    }

    /// Median over the rounds: robust to a round that another process on the machine disturbed.
    fn rps(&self) -> f64 {
        median((0..self.runs.len()).map(|i| self.round_rps(i)).collect())
    }

    fn cpu_us_per_request(&self) -> Option<f64> {
        let good: usize = self.runs.iter().map(|r| r.good).sum();
        let cpu: f64 = self.runs.iter().map(|r| r.cpu_s).sum();
        (good > 0).then(|| cpu / good as f64 * 1e6)
    }

    /// Median busy share of the proxy's core and of the driver's core over the rounds.
    fn cores_busy(&self) -> Option<(f64, f64)> {
        let b: Vec<(f64, f64)> = self.runs.iter().filter_map(|r| r.cores_busy).collect();
        (!b.is_empty()).then(|| {
            (
                median(b.iter().map(|x| x.0).collect()),
                median(b.iter().map(|x| x.1).collect()),
            )
        })
    }

    fn measure(&mut self, rt: &tokio::runtime::Runtime, cores: &Cores) {
        let start = Instant::now() + WARMUP;
        let end = start + self.window;
        let pid = self.proxy_pid;
        let (proxy_core, driver_core) = (cores.proxy, cores.rest);
        let (outcome, (cpu_s, cores_busy)) = rt.block_on(async {
            let cpu = tokio::spawn(async move {
                let sample = || {
                    (
                        cpu_seconds(pid),
                        proxy_core.and_then(core_jiffies),
                        driver_core.and_then(core_jiffies),
                    )
                };
                tokio::time::sleep_until(start.into()).await;
                let (c0, p0, d0) = sample();
                tokio::time::sleep_until(end.into()).await;
                let (c1, p1, d1) = sample();
                (c1 - c0, busy_share(p0, p1).zip(busy_share(d0, d1)))
            });
            let o = load::run(&self.target, self.connections, start, end).await;
            (o, cpu.await.expect("cpu sampler"))
        });
        self.runs.push(Run {
            good: outcome.latencies.len(),
            outcome,
            cpu_s,
            cores_busy,
        });
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.3}"))
}

fn fmt_errors(o: &Outcome) -> String {
    if o.errors.is_empty() {
        return "0".into();
    }
    o.errors
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Thousands separators, as the README's tables have them.
fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run() {
    if Command::new("nginx").arg("-v").output().is_err() {
        println!("\n(nginx baseline skipped: no nginx; scripts/bench installs it)");
        return;
    }
    load::self_check();
    let dir = TempDir::new("bench-nginx");
    let cores = Cores::split();
    let upstream = Nginx::upstream(&dir.0, cores.rest);
    let nginx = Nginx::proxy(&dir.0, upstream.addr, cores.proxy);
    let policy = gateway_policy(upstream.addr);
    let gw = Gw::start(&dir.0, "gateway", &policy, &[], cores.proxy);
    let floor = Floor::start(&dir.0, upstream.addr, cores.proxy);
    let redis_url =
        std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // Leases are on by default with --redis.
    let redis_args: Vec<String> = [
        "--redis",
        &redis_url,
        "--redis-prefix",
        &unique_prefix(),
        "--redis-timeout-ms",
        "1000",
    ]
    .map(String::from)
    .to_vec();
    let gw_redis = Gw::start(&dir.0, "gateway-redis", &policy, &redis_args, cores.proxy);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let nginx_side = Side {
        addr: nginx.addr,
        pid: nginx.pid(),
    };
    let gw_side = Side {
        addr: gw.addr,
        pid: gw.proc.pid(),
    };
    let redis_side = Side {
        addr: gw_redis.addr,
        pid: gw_redis.proc.pid(),
    };
    let floor_side = Side {
        addr: floor.addr,
        pid: floor.proc.pid(),
    };
    let (ng, gm, gr, fl) = (&nginx_side, &gw_side, &redis_side, &floor_side);
    const CHAT: &str = "/v1/chat/completions";
    const LOOKUP: &str = "/lookup/1";
    // Each group: nginx first (the baseline of the rows after it), then pingora alone (the floor
    // under the gateway), then the gateway.
    let mut rows: Vec<Row> = Vec::new();
    let groups: [Group; 3] = [
        (
            "`GET /lookup`",
            Kind::Get,
            LOOKUP,
            vec![(GW, gm, LOOKUP), (GW_BARE, gm, "/bare/1")],
        ),
        (
            "chat completion",
            Kind::Chat,
            CHAT,
            vec![(GW_MEMORY, gm, CHAT), (GW_REDIS, gr, CHAT)],
        ),
        (
            "streamed chat (SSE)",
            Kind::Sse,
            CHAT,
            vec![(GW_MEMORY, gm, CHAT)],
        ),
    ];
    for (path, kind, url, gateways) in groups {
        let base = rows.len();
        let sides = [(NGINX, ng, url), (FLOOR, fl, url)]
            .into_iter()
            .chain(gateways);
        for (i, (via, side, url)) in sides.enumerate() {
            // The group's first row (nginx) is the baseline of the others.
            let baseline = (i > 0).then_some(base);
            rows.push(Row::new(
                path,
                via,
                kind,
                side,
                url,
                baseline,
                CONNECTIONS,
                WINDOW,
            ));
        }
    }
    let mut single: Vec<Row> = [
        ("`GET /lookup`", "nginx", Kind::Get, ng, LOOKUP, None),
        ("`GET /lookup`", "gateway", Kind::Get, gm, LOOKUP, Some(0)),
        ("chat completion", "nginx", Kind::Chat, ng, CHAT, None),
        ("chat completion", "gateway", Kind::Chat, gm, CHAT, Some(2)),
        ("streamed chat (SSE)", "nginx", Kind::Sse, ng, CHAT, None),
        (
            "streamed chat (SSE)",
            "gateway",
            Kind::Sse,
            gm,
            CHAT,
            Some(4),
        ),
    ]
    .into_iter()
    .map(|(path, via, kind, side, url, base)| {
        Row::new(path, via, kind, side, url, base, 1, ONE_CONNECTION_WINDOW)
    })
    .collect();
    let started = Instant::now();
    // Alternate rows round by round, so drift in the machine's load hits every row alike.
    for _ in 0..ROUNDS {
        for row in rows.iter_mut().chain(single.iter_mut()) {
            row.measure(&rt, &cores);
        }
    }
    let elapsed = started.elapsed();
    let split = cores.describe();
    drop(cores);

    println!(
        "\n## nginx as the baseline ({CONNECTIONS} kept-alive connections, loopback, {ROUNDS} rounds of {:.1} s per row, alternated; same run)\n",
        WINDOW.as_secs_f64()
    );
    println!(
        "Canned upstream: nginx (fixed JSON, chat completion, 5-event SSE). Cores: {split}.\n"
    );
    print_rows(&rows);
    print_single(&single);
    println!("\n(measured in {:.0} s)", elapsed.as_secs_f64());
    drop((gw, gw_redis, floor, nginx, upstream));
}

/// `rows[i]`'s req/s over its baseline's: the median of the per-round ratios (a row and its
/// baseline run seconds apart in each round), and their range.
fn ratio(rows: &[Row], i: usize) -> Option<(f64, f64, f64)> {
    let base = &rows[rows[i].baseline?];
    let per_round: Vec<f64> = (0..rows[i].runs.len())
        .filter(|&r| base.round_rps(r) > 0.0)
        .map(|r| rows[i].round_rps(r) / base.round_rps(r))
        .collect();
    if per_round.is_empty() {
        return None;
    }
    let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per_round.iter().copied().fold(0.0, f64::max);
    Some((median(per_round), lo, hi))
}

/// The baseline's CPU per request over `rows[i]`'s: the ratio of capacity per core, which does
/// not depend on whether the load generator's core kept up.
fn cpu_ratio(rows: &[Row], i: usize) -> Option<f64> {
    let base = rows[rows[i].baseline?].cpu_us_per_request()?;
    Some(base / rows[i].cpu_us_per_request()?)
}

fn print_rows(rows: &[Row]) {
    println!(
        "| path | through | req/s | ÷ nginx (range over rounds) | p50 ms | p99 ms | TTFB p50 / p99 ms | proxy CPU µs/req | ÷ nginx by CPU | busy % proxy / driver core | errors |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (i, row) in rows.iter().enumerate() {
        let all = row.all();
        let ratio = match ratio(rows, i) {
            Some((r, lo, hi)) => format!("**{r:.2}x** ({lo:.2}–{hi:.2})"),
            None if row.baseline.is_none() => "1.00x".into(),
            None => "–".into(),
        };
        let ttfb = if row.kind == Kind::Sse {
            format!(
                "{} / {}",
                fmt_ms(quantile_ms(&all.ttfb, 0.5)),
                fmt_ms(quantile_ms(&all.ttfb, 0.99))
            )
        } else {
            "–".into()
        };
        let cpu = row
            .cpu_us_per_request()
            .map_or("–".into(), |c| format!("{c:.1}"));
        let by_cpu = match cpu_ratio(rows, i) {
            Some(r) => format!("{r:.2}x"),
            None if row.baseline.is_none() => "1.00x".into(),
            None => "–".into(),
        };
        let busy = row.cores_busy().map_or("–".into(), |(p, d)| {
            format!("{:.0} / {:.0}", p * 100.0, d * 100.0)
        });
        let mut errors = fmt_errors(&all);
        if all.reconnects > 0 {
            errors.push_str(&format!("; {} reconnects", all.reconnects));
        }
        println!(
            "| {} | {} | {} | {ratio} | {} | {} | {ttfb} | {cpu} | {by_cpu} | {busy} | {errors} |",
            row.path,
            row.via,
            thousands(row.rps()),
            fmt_ms(quantile_ms(&all.latencies, 0.5)),
            fmt_ms(quantile_ms(&all.latencies, 0.99)),
        );
    }
    println!(
        "\nreq/s: median over the rounds; ÷ nginx: median of the per-round ratios (range); proxy \
         CPU: the proxy process's CPU time per good response; ÷ nginx by CPU: nginx's CPU per \
         response over the gateway's (capacity per core, whatever the driver core managed); busy: \
         share of each core busy in the window, every process on it (the machine is shared)."
    );
    let driver_bound: Vec<&str> = rows
        .iter()
        .filter(|r| r.baseline.is_none())
        .filter(|r| r.cores_busy().is_some_and(|(p, d)| d > 0.9 && p < 0.9))
        .map(|r| r.path)
        .collect();
    if !driver_bound.is_empty() {
        println!(
            "\nnginx did not fill its core on {} while the driver core was full: there nginx's req/s \
             is a lower bound and the gateway's req/s ratio an upper bound; the CPU ratio is the \
             fairer comparison.",
            driver_bound.join(", ")
        );
    }
    let fig = |name: &str, kind: Kind, via: &str| {
        let r = rows
            .iter()
            .position(|r| r.kind == kind && r.via == via)
            .and_then(|i| ratio(rows, i))
            .map_or(0.0, |(r, _, _)| r);
        figure(name, format!("{r:.3}"));
        r
    };
    println!();
    let get = fig("gw_vs_nginx_get", Kind::Get, GW);
    fig("gw_vs_nginx_bare", Kind::Get, GW_BARE);
    let chat = fig("gw_vs_nginx_chat", Kind::Chat, GW_MEMORY);
    let chat_redis = fig("gw_vs_nginx_chat_redis", Kind::Chat, GW_REDIS);
    let sse = fig("gw_vs_nginx_sse", Kind::Sse, GW_MEMORY);
    fig("pingora_vs_nginx_get", Kind::Get, FLOOR);
    fig("pingora_vs_nginx_chat", Kind::Chat, FLOOR);
    fig("pingora_vs_nginx_sse", Kind::Sse, FLOOR);
    let met = |ok: bool| if ok { "met" } else { "not met" };
    println!(
        "\nGoals (issue 12), gateway with quotas on ÷ nginx as a plain proxy: GET ≥ 1.0x: {get:.2}x, {}; \
         chat ≥ 0.9x: {chat:.2}x in memory, {chat_redis:.2}x on Redis with leases, {}; SSE ≥ 0.9x: {sse:.2}x, {}.",
        met(get >= 1.0),
        met(chat >= 0.9 && chat_redis >= 0.9),
        met(sse >= 0.9),
    );
}

fn print_single(rows: &[Row]) {
    println!(
        "\n| one connection, one request at a time | nginx p50 ms | gateway p50 ms | **p50 added** | nginx p99 ms | gateway p99 ms | errors (gateway) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    let mut added_all = Vec::new();
    for pair in rows.chunks(2) {
        let (n, g) = (pair[0].all(), pair[1].all());
        let (n50, g50) = (
            quantile_ms(&n.latencies, 0.5),
            quantile_ms(&g.latencies, 0.5),
        );
        let added = n50.zip(g50).map(|(n, g)| g - n);
        let name = match pair[1].kind {
            Kind::Get => "get",
            Kind::Chat => "chat",
            Kind::Sse => "sse",
        };
        if let Some(a) = added {
            added_all.push((name, a));
        }
        let mut errors = fmt_errors(&g);
        if g.reconnects > 0 {
            errors.push_str(&format!("; {} reconnects", g.reconnects));
        }
        println!(
            "| {} | {} | {} | **{}** | {} | {} | {errors} |",
            pair[1].path,
            fmt_ms(n50),
            fmt_ms(g50),
            added.map_or("–".into(), |a| format!("{a:+.3}")),
            fmt_ms(quantile_ms(&n.latencies, 0.99)),
            fmt_ms(quantile_ms(&g.latencies, 0.99)),
        );
    }
    println!();
    for (name, a) in &added_all {
        figure(&format!("gw_added_p50_ms_{name}"), format!("{a:.3}"));
    }
    let worst = added_all
        .iter()
        .map(|(_, a)| *a)
        .fold(f64::NEG_INFINITY, f64::max);
    println!(
        "\nGoal: p50 added at one connection ≤ 0.1 ms: worst {worst:+.3} ms, {}.",
        if worst <= 0.1 && added_all.len() == 3 {
            "met"
        } else {
            "not met"
        }
    );
}
