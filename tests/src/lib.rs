//! Harness for end-to-end tests and benchmarks: start the real `gateway` and `mock-upstream`
//! binaries on loopback, wait until they serve, write policy files, and stop everything on drop.
//!
//! The binaries are taken from the same target directory as the test executable, so build them
//! first (`cargo build --workspace`; the README's test command does).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Path of a workspace binary built next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bench>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace{})",
        path.display(),
        if dir.ends_with("release") {
            " --release"
        } else {
            ""
        }
    );
    path
}

/// The workspace root (for shipped policy files).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A loopback port that was free a moment ago, for a process that must be told its port.
///
/// Drawn at random from 10000-19999, below the kernel's ephemeral range (32768 and up): a port
/// from `bind(0)` would be free for any other test's `bind(0)` or outgoing connection to take
/// before the process we hand it to binds it, and the test would then talk to a stranger. The
/// port 10000 above it (20000-29999, never drawn) must be free too: a Redis Cluster node listens
/// there for its cluster bus.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    const LOW: u64 = 10_000;
    const SPAN: u64 = 10_000;
    const BUS: u16 = 10_000;
    for attempt in 0u64..1_000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(attempt);
        h.write_u32(std::process::id());
        let port = (LOW + h.finish() % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + BUS)).is_ok()
            // Never the same port twice in one test, before the first one was bound.
            && HANDED_OUT
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(port)
        {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range");
}

/// A child process killed when dropped; its stdout lines arrive on a channel.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Self::spawn_logged(cmd, None)
    }

    /// Spawn with stderr (the logs) appended to `log` (unless TOLLGATE_TEST_LOGS shows them).
    pub fn spawn_logged(cmd: &mut Command, log: Option<&Path>) -> Proc {
        let stderr = if std::env::var_os("TOLLGATE_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else if let Some(path) = log {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_or_else(|_| Stdio::null(), Stdio::from)
        } else {
            Stdio::null()
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn process");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// Wait for a stdout line starting with `prefix`; returns the rest of the line.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => panic!("process did not print `{prefix}` in time"),
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit by itself; false if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Ask the process to stop gracefully (SIGTERM).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "SIGTERM delivered");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_tcp(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The mock LLM/lookup upstream on an OS-chosen port.
pub struct MockUpstream {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl MockUpstream {
    pub fn start() -> MockUpstream {
        let mut proc =
            Proc::spawn(Command::new(bin("mock-upstream")).args(["--listen", "127.0.0.1:0"]));
        let addr = proc
            .wait_line("listening on ")
            .parse()
            .expect("mock address");
        MockUpstream { addr, _proc: proc }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tollgate-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` command on loopback `port` that keeps nothing on disk but its working files.
fn redis_server(port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .arg("--dir")
    .arg(dir);
    cmd
}

/// Run `cmd` to its end; it must succeed. Returns its output (stdout, stderr and the status).
pub fn output_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{} could not start: {e}", cmd.get_program().display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        cmd.get_program().display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run the SDK script `tests/sdk/<script>` with `python` and `args`; it must succeed and print a
/// JSON report on stdout, which is returned.
pub async fn sdk_report(python: &str, script: &str, args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(python)
        .arg(workspace_root().join("tests/sdk").join(script))
        .args(args)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json report")
}

/// An HTTP client for tests: no proxy from the environment, bounded waits.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// POST `body` as JSON to the gateway's `path` with API key `key`, request id `rid` and extra
/// headers (mock-upstream's faults).
pub async fn post_as(
    gw: &Gateway,
    key: &str,
    rid: &str,
    path: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = client()
        .post(gw.url(path))
        .bearer_auth(key)
        .header("x-request-id", rid)
        .json(body);
    for (h, v) in headers {
        r = r.header(*h, *v);
    }
    r.send().await.expect("request")
}

/// GET `url` and parse the JSON answer.
pub async fn get_json(url: impl reqwest::IntoUrl) -> serde_json::Value {
    let r = client().get(url).send().await.expect("GET");
    r.json().await.expect("JSON body")
}

/// The gateway's Prometheus metrics, as text.
pub async fn metrics(gw: &Gateway) -> String {
    let r = client()
        .get(gw.api_url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    r.text().await.expect("metrics text")
}

/// The value of the sample whose line starts with `series ` (e.g. `audit_events_total`).
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// POST `body` as JSON to `url` and parse the JSON answer.
pub async fn post_json(url: impl reqwest::IntoUrl, body: &serde_json::Value) -> serde_json::Value {
    let r = client().post(url).json(body).send().await.expect("POST");
    r.json().await.expect("JSON body")
}

/// A private `redis-server` on its own port, so a test may kill and restart it.
pub struct RedisServer {
    pub port: u16,
    proc: Option<Proc>,
    dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let mut r = RedisServer {
            port: free_port(),
            proc: None,
            dir,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port, with an empty dataset.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        let proc = Proc::spawn(&mut redis_server(self.port, &self.dir.0));
        wait_tcp(format!("127.0.0.1:{port}").parse().expect("addr"));
        self.proc = Some(proc);
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// A Redis Cluster of `n` masters on loopback, created with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _nodes: Vec<Proc>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let dir = TempDir::new("cluster");
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let nodes: Vec<Proc> = ports
            .iter()
            .map(|p| {
                let node_dir = dir.0.join(p.to_string());
                std::fs::create_dir_all(&node_dir).expect("node dir");
                Proc::spawn(redis_server(*p, &node_dir).args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ]))
            })
            .collect();
        for p in &ports {
            wait_tcp(format!("127.0.0.1:{p}").parse().expect("addr"));
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        output_ok(create.args(["--cluster-replicas", "0", "--cluster-yes"]));
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in &ports {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .expect("cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not become ready");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster {
            ports,
            _nodes: nodes,
            _dir: dir,
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }
}

/// Where a gateway keeps its counters.
#[derive(Debug, Clone)]
pub enum Backend {
    Memory,
    /// A Redis URL (several for Cluster nodes) and the key prefix of this test.
    Redis {
        urls: Vec<String>,
        prefix: String,
    },
}

impl Backend {
    /// The shared Redis of the test machine (`TOLLGATE_REDIS_URL`, default 127.0.0.1:6379), with a
    /// key prefix no other test uses.
    pub fn shared_redis() -> Backend {
        let url =
            std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        Backend::Redis {
            urls: vec![url],
            prefix: unique_prefix(),
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            Backend::Memory => Vec::new(),
            Backend::Redis { urls, prefix } => {
                let mut a = vec![
                    "--redis-prefix".to_string(),
                    prefix.clone(),
                    "--redis-timeout-ms".into(),
                    "250".into(),
                ];
                for u in urls {
                    a.push("--redis".into());
                    a.push(u.clone());
                }
                a
            }
        }
    }
}

/// A key prefix unique to this process and call.
pub fn unique_prefix() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tgtest-{}-{t}-{n}", std::process::id())
}

/// A running gateway with its policy file in a temporary directory.
pub struct Gateway {
    pub proxy: SocketAddr,
    pub api: SocketAddr,
    pub policy_file: PathBuf,
    /// The gateway's logs (stderr).
    pub log: PathBuf,
    proc: Proc,
    _dir: TempDir,
}

impl Gateway {
    /// Start a gateway enforcing `policy_yaml`.
    pub fn start(policy_yaml: &str) -> Gateway {
        Self::start_with(policy_yaml, &[])
    }

    /// Start a gateway with extra `gateway run` arguments.
    pub fn start_with(policy_yaml: &str, extra_args: &[&str]) -> Gateway {
        Self::start_on(&Backend::Memory, policy_yaml, extra_args)
    }

    /// Start a gateway with extra environment variables.
    pub fn start_with_env(policy_yaml: &str, env: &[(&str, &str)]) -> Gateway {
        Self::spawn(&Backend::Memory, Some(policy_yaml), &[], env)
    }

    /// Start a gateway keeping its counters in `backend`.
    pub fn start_on(backend: &Backend, policy_yaml: &str, extra_args: &[&str]) -> Gateway {
        Self::spawn(backend, Some(policy_yaml), extra_args, &[])
    }

    /// Start a gateway that follows `cp` (no policy file), keeping its last snapshot at
    /// `snapshot`.
    pub fn following(cp: &ControlPlane, token: &str, snapshot: &Path) -> Gateway {
        Self::following_urls(&[cp.url("")], token, snapshot)
    }

    /// Start a gateway that follows the control-plane instances at `urls`, in that order of
    /// preference.
    pub fn following_urls(urls: &[String], token: &str, snapshot: &Path) -> Gateway {
        Self::following_with(urls, token, snapshot, &Backend::Memory, &[])
    }

    /// Start a gateway that follows `cp` with extra environment variables.
    pub fn following_env(
        cp: &ControlPlane,
        token: &str,
        snapshot: &Path,
        env: &[(&str, &str)],
    ) -> Gateway {
        Self::follow(&[cp.url("")], token, snapshot, &Backend::Memory, &[], env)
    }

    /// Start a gateway that follows the control-plane instances at `urls`, counting in
    /// `backend`, with extra `gateway run` arguments.
    pub fn following_with(
        urls: &[String],
        token: &str,
        snapshot: &Path,
        backend: &Backend,
        extra_args: &[&str],
    ) -> Gateway {
        Self::follow(urls, token, snapshot, backend, extra_args, &[])
    }

    fn follow(
        urls: &[String],
        token: &str,
        snapshot: &Path,
        backend: &Backend,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let snapshot = snapshot.to_str().expect("utf-8 path");
        let url = urls.join(",");
        let mut args = vec![
            "--control-plane",
            &url,
            "--control-plane-token",
            token,
            "--control-plane-snapshot",
            snapshot,
        ];
        args.extend_from_slice(extra_args);
        Self::spawn(backend, None, &args, env)
    }

    fn spawn(
        backend: &Backend,
        policy_yaml: Option<&str>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let dir = TempDir::new("gw");
        let policy_file = dir.0.join("policy.yaml");
        let log = dir.0.join("logs");
        std::fs::create_dir_all(&log).expect("log dir");
        let log = log.join("stderr.log");
        let mut config = Vec::new();
        if let Some(yaml) = policy_yaml {
            std::fs::write(&policy_file, yaml).expect("write policy");
            config = vec!["--config", policy_file.to_str().expect("utf-8 path")];
        }
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        // A journal of its own (two gateways never share one), unless the test keeps it itself.
        let journal = dir.0.join("settlements.journal");
        let mut own_journal = vec![
            "--settlement-journal",
            journal.to_str().expect("utf-8 path"),
        ];
        if extra_args.contains(&"--settlement-journal") {
            own_journal.clear();
        }
        let mut proc = Proc::spawn_logged(
            Command::new(bin("gateway"))
                .arg("run")
                .args(config)
                .args([
                    "--listen",
                    &proxy.to_string(),
                    "--api-listen",
                    "127.0.0.1:0",
                    "--threads",
                    "2",
                ])
                .args(backend.args())
                .args(own_journal)
                .args(extra_args)
                .envs(env.iter().copied()),
            Some(&log),
        );
        let api = proc
            .wait_line("api listening on ")
            .parse()
            .expect("api address");
        wait_tcp(proxy);
        Gateway {
            proxy,
            api,
            policy_file,
            log,
            proc,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Move a `--test-clock` gateway's clock to `now` (RFC 3339).
    pub async fn set_clock(&self, now: &str) {
        let r = client()
            .post(self.api_url("/test/clock"))
            .json(&serde_json::json!({ "now": now }))
            .send()
            .await
            .expect("clock");
        assert_eq!(r.status(), 200, "the gateway runs with --test-clock");
    }

    /// Replace the policy file the way an editor does: write a new file, rename it over the old.
    pub fn rewrite_policy(&self, yaml: &str) {
        let tmp = self.policy_file.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write policy");
        std::fs::rename(&tmp, &self.policy_file).expect("replace policy");
    }

    pub fn stop(&mut self) {
        self.proc.kill();
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGTERM: the graceful shutdown an orchestrator asks for.
    pub fn terminate(&self) {
        self.proc.terminate();
    }

    /// SIGTERM, then wait until the gateway has exited.
    pub fn shut_down(&mut self) {
        self.proc.terminate();
        assert!(
            self.proc.wait_exit(Duration::from_secs(20)),
            "the gateway exits after SIGTERM"
        );
    }
}

/// A database for the control plane: a SQLite file or a fresh PostgreSQL database (on the server
/// named by `TOLLGATE_POSTGRES_URL`, default the local one), dropped with the value.
pub enum Db {
    Sqlite(TempDir),
    Postgres {
        admin_url: String,
        url: String,
        name: String,
    },
}

impl Db {
    pub fn sqlite() -> Db {
        Db::Sqlite(TempDir::new("cpdb"))
    }

    pub fn postgres() -> Db {
        let admin_url = std::env::var("TOLLGATE_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = unique_prefix().replace('-', "_");
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(b, _)| b);
        Db::Postgres {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        }
    }

    pub fn url(&self) -> String {
        match self {
            Db::Sqlite(dir) => format!("sqlite://{}", dir.0.join("cp.db").display()),
            Db::Postgres { url, .. } => url.clone(),
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Db::Postgres {
            admin_url, name, ..
        } = self
        {
            let _ = Command::new("psql")
                .arg(admin_url.as_str())
                .args([
                    "-qc",
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .expect("psql (PostgreSQL client) must be installed: scripts/setup does it");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `control-plane serve` on a fixed loopback port (so it can be restarted in place).
pub struct ControlPlane {
    pub addr: SocketAddr,
    /// The bootstrap admin token.
    pub admin: String,
    pub db_url: String,
    pub log: PathBuf,
    proc: Option<Proc>,
    _dir: TempDir,
}

impl ControlPlane {
    pub fn start(db: &Db) -> ControlPlane {
        let dir = TempDir::new("cp");
        let mut cp = ControlPlane {
            addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            admin: format!("admin-{}", unique_prefix()),
            db_url: db.url(),
            log: dir.0.join("stderr.log"),
            proc: None,
            _dir: dir,
        };
        cp.restart();
        cp
    }

    /// Another instance on the same database with the same bootstrap token.
    pub fn another(&self) -> ControlPlane {
        let dir = TempDir::new("cp");
        let mut cp = ControlPlane {
            addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            admin: self.admin.clone(),
            db_url: self.db_url.clone(),
            log: dir.0.join("stderr.log"),
            proc: None,
            _dir: dir,
        };
        cp.restart();
        cp
    }

    /// Start it again (after `kill`) on the same address and database.
    pub fn restart(&mut self) {
        self.kill();
        let mut proc = Proc::spawn_logged(
            Command::new(bin("control-plane"))
                .args(["serve", "--listen", &self.addr.to_string()])
                .args(["--database", &self.db_url, "--heartbeat-ms", "1000"])
                .env("TOLLGATE_ADMIN_TOKEN", &self.admin),
            Some(&self.log),
        );
        proc.wait_line("control plane listening on ");
        self.proc = Some(proc);
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Send `body` (JSON, or text when it is a string) with the admin token; returns status and
    /// the JSON answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = client()
            .request(method.parse().expect("method"), self.url(path))
            .bearer_auth(&self.admin);
        match body {
            Some(serde_json::Value::String(text)) => req = req.body(text),
            Some(v) => req = req.json(&v),
            None => {}
        }
        let resp = req.send().await.expect("control plane request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Publish `yaml` as the next policy version (201 expected); returns the answer.
    pub async fn publish_policy(&self, yaml: String) -> serde_json::Value {
        let (status, body) = self
            .call(
                "POST",
                "/v1/policies",
                Some(serde_json::Value::String(yaml)),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Issue a control-plane token named `name` with `role` (201 expected); returns the token and
    /// its id.
    pub async fn issue_token(&self, name: &str, role: &str) -> (String, String) {
        let (status, t) = self
            .call(
                "POST",
                "/v1/tokens",
                Some(serde_json::json!({ "name": name, "role": role })),
            )
            .await;
        assert_eq!(status, 201, "{t}");
        (
            t["token"].as_str().expect("token").to_string(),
            t["id"].as_str().expect("token id").to_string(),
        )
    }

    /// Move `subject` to `tier` through the entitlement (webhook) endpoint (200 expected);
    /// returns the answer.
    pub async fn set_tier(&self, subject: &str, tier: &str) -> serde_json::Value {
        let (status, body) = self
            .call(
                "POST",
                "/v1/entitlements",
                Some(serde_json::json!({ "subject": subject, "tier": tier })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Revoke `subject`'s first API key (204 expected).
    pub async fn revoke_first_key(&self, subject: &str) {
        let (_, s) = self
            .call("GET", &format!("/v1/subjects/{subject}"), None)
            .await;
        let key_id = s["keys"][0]["id"].as_str().expect("key id");
        let (status, body) = self
            .call(
                "DELETE",
                &format!("/v1/subjects/{subject}/keys/{key_id}"),
                None,
            )
            .await;
        assert_eq!(status, 204, "{body}");
    }

    /// Publish `policy` (e.g. [`acme_policy`]), put subject `acme` on `free` with one API key, and issue a viewer token
    /// for gateways. Returns (API key, gateway token).
    pub async fn seed_acme(&self, policy: String) -> (String, String) {
        self.publish_policy(policy).await;
        let (status, body) = self
            .call(
                "PUT",
                "/v1/subjects/acme",
                Some(serde_json::json!({ "tier": "free" })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, key) = self.call("POST", "/v1/subjects/acme/keys", None).await;
        assert_eq!(status, 201, "{key}");
        let (token, _) = self.issue_token("gateways", "viewer").await;
        (key["key"].as_str().expect("key").to_string(), token)
    }
}

/// The policy [`ControlPlane::seed_acme`] is made for, labelled `label`: routes `/lookup` (quota
/// `lookup`) and `/exports` (quota `export`) to `upstream`; tier `free` has unlimited lookups and no
/// export, `pro` both unlimited; `extra` (e.g. a `subjects:` block) is appended.
pub fn acme_policy(upstream: SocketAddr, label: &str, extra: &str) -> String {
    format!(
        "version: {label}
upstreams:
  up: {{ address: '{upstream}' }}
routes:
  - {{ name: lookup, match: {{ path_prefix: /lookup }}, upstream: up, quota: lookup }}
  - {{ name: export, match: {{ path_prefix: /exports }}, upstream: up, quota: export }}
tiers:
  free:
    lookup: {{ unlimited: true }}
  pro:
    lookup: {{ unlimited: true }}
    export: {{ unlimited: true }}
{extra}"
    )
}

/// A policy with one upstream (`up`) at `upstream`, a route per `(name, path_prefix, quota, cost)`,
/// the given tiers block (YAML under `tiers:`), and subjects `key-<tier>` → `user-<tier>` for the
/// tiers listed in `subject_tiers`.
pub fn policy(
    upstream: SocketAddr,
    routes: &[(&str, &str, &str, u64)],
    tiers: &str,
    subject_tiers: &[&str],
) -> String {
    let mut y = format!(
        "version: test\nupstreams:\n  up: {{ address: '{upstream}', read_timeout_ms: 10000 }}\nroutes:\n"
    );
    for (name, prefix, quota, cost) in routes {
        y.push_str(&format!(
            "  - {{ name: {name}, match: {{ path_prefix: '{prefix}' }}, upstream: up, quota: {quota}, cost: {cost} }}\n"
        ));
    }
    y.push_str("tiers:\n");
    y.push_str(tiers);
    y.push_str("\nsubjects:\n");
    for t in subject_tiers {
        y.push_str(&format!(
            "  - {{ key: key-{t}, id: user-{t}, tier: {t}, time_zone: UTC }}\n"
        ));
    }
    y
}

/// Record a measured figure: printed, and appended as `name value` to the file named by
/// `TOLLGATE_FIGURES` when set.
pub fn figure(name: &str, value: impl std::fmt::Display) {
    println!("figure {name} {value}");
    if let Some(path) = std::env::var_os("TOLLGATE_FIGURES") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{name} {value}");
        }
    }
}

/// Poll `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// CPU seconds (user + system) a process has used so far, from /proc; 0 when unreadable.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; 100 ticks/s.
    (ticks(11) + ticks(12)) / 100.0
}

/// The `tansu` binary (a Kafka-protocol broker): `TOLLGATE_TANSU`, else where `scripts/setup`
/// installs it, else `tansu` on the PATH.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_TANSU") {
        return p.into();
    }
    let cached = std::env::var_os("HOME")
        .map(PathBuf::from)
        .map(|h| h.join(".cache/tollgate-tools/bin/tansu"));
    match cached {
        Some(p) if p.exists() => p,
        _ => "tansu".into(),
    }
}

/// A real Kafka-protocol broker (tansu) on a fixed loopback port, storing in SQLite in its own
/// directory, so it can be killed and restarted with its data. The topic `tollgate-audit` (3
/// partitions) is created on first start.
pub struct Broker {
    pub port: u16,
    /// The address clients are told to connect to (metadata): `port`, unless something such as
    /// a TLS terminator stands in front of the broker.
    pub advertised_port: u16,
    proc: Option<Proc>,
    dir: TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        let port = free_port();
        Self::start_advertising(port, port)
    }

    /// Listen on `port` but send clients to `advertised_port` (where a proxy forwards to `port`).
    pub fn start_advertising(port: u16, advertised_port: u16) -> Broker {
        let mut b = Broker {
            port,
            advertised_port,
            proc: None,
            dir: TempDir::new("tansu"),
        };
        b.restart();
        let status = Command::new(tansu_bin())
            .args(["topic", "create", "tollgate-audit", "--partitions", "3"])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", b.port)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "topic created");
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        self.kill();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
        let proc = Proc::spawn_logged(
            Command::new(tansu_bin())
                .current_dir(&self.dir.0)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &advertised,
                ])
                // A relative path: tansu resolves it against its working directory.
                .args(["--storage-engine", "sqlite://tansu.db"]),
            Some(&self.dir.0.join("broker.log")),
        );
        wait_tcp(format!("127.0.0.1:{}", self.port).parse().expect("addr"));
        self.proc = Some(proc);
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// SIGKILL: the broker vanishes mid-conversation.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// `control-plane accounting`: the consumer that turns audit events into the ledger.
pub struct Accounting {
    pub metrics: SocketAddr,
    proc: Proc,
}

impl Accounting {
    pub fn start(broker: &Broker, db: &Db, batch: usize) -> Accounting {
        Self::start_with(&broker.brokers(), db, batch, &[])
    }

    /// Start it against `brokers` with extra `control-plane accounting` arguments (TLS options).
    pub fn start_with(brokers: &str, db: &Db, batch: usize, extra_args: &[&str]) -> Accounting {
        let mut proc = Proc::spawn(
            Command::new(bin("control-plane"))
                .args(["accounting", "--brokers", brokers])
                .args(["--database", &db.url(), "--batch", &batch.to_string()])
                .args(["--metrics-listen", "127.0.0.1:0"])
                // A killed consumer's partitions move to its successor after this long (the
                // default, 45 s, would only slow the tests down).
                .args(["--kafka-option", "session.timeout.ms=6000"])
                .args(extra_args),
        );
        let metrics = proc
            .wait_line("metrics listening on ")
            .parse()
            .expect("metrics address");
        proc.wait_line("accounting consumer running");
        Accounting { metrics, proc }
    }

    /// SIGKILL, wherever it is in a batch.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub async fn counter(&self, name: &str) -> u64 {
        let text = client()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default();
        metric(&text, name).unwrap_or(0)
    }
}

/// Read-only queries on the ledger (`quota_audit`).
pub struct LedgerDb(sqlx::AnyPool);

impl LedgerDb {
    pub async fn open(db: &Db) -> LedgerDb {
        sqlx::any::install_default_drivers();
        let url = match db {
            // The consumer may not have created the file yet.
            Db::Sqlite(_) => format!("{}?mode=rwc", db.url()),
            Db::Postgres { .. } => db.url(),
        };
        LedgerDb(sqlx::AnyPool::connect(&url).await.expect("ledger"))
    }

    /// One number from `sql`; 0 while the table does not exist yet.
    pub async fn scalar(&self, sql: &'static str) -> i64 {
        use sqlx::Row;
        match sqlx::query(sql).fetch_one(&self.0).await {
            Ok(row) => row.try_get::<i64, _>(0).unwrap_or(0),
            Err(_) => 0,
        }
    }

    pub async fn strings(&self, sql: &'static str) -> Vec<String> {
        use sqlx::Row;
        sqlx::query(sql)
            .fetch_all(&self.0)
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect()
    }
}

/// TLS for end-to-end tests: certificates from a throwaway CA written where the gateway or the mock
/// reads them, the mock served over HTTPS (h2 and http/1.1), and a client holding exactly one
/// connection over TLS that speaks whatever ALPN chose.
pub mod tls {
    use super::{Proc, TempDir, bin};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response, Version};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use mock_upstream::tls::TestCa;
    use openssl::hash::MessageDigest;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::process::Command;

    /// A CA and a server certificate for `localhost`/`127.0.0.1` it signed, in `cert.pem` and
    /// `key.pem` of a temporary directory.
    pub struct Certs {
        ca: TestCa,
        /// The CA's certificate: what clients trust.
        pub ca_pem: Vec<u8>,
        pub cert: PathBuf,
        pub key: PathBuf,
        dir: TempDir,
    }

    impl Certs {
        pub fn new() -> Certs {
            let ca = TestCa::new().expect("test CA");
            let dir = TempDir::new("certs");
            let certs = Certs {
                ca_pem: ca.cert_pem().expect("CA PEM"),
                ca,
                cert: dir.0.join("cert.pem"),
                key: dir.0.join("key.pem"),
                dir,
            };
            certs.rotate();
            certs
        }

        /// Replace both files with a new certificate and key from the same CA, each by renaming a
        /// complete file over the old one (as certificate tools do).
        pub fn rotate(&self) {
            let (cert, key) = self.ca.issue().expect("certificate");
            self.replace(&cert, &key);
        }

        /// Replace the files with these contents (renaming complete files over the old ones).
        pub fn replace(&self, cert: &[u8], key: &[u8]) {
            for (path, pem) in [(&self.key, key), (&self.cert, cert)] {
                let tmp = self.dir.0.join("incoming.tmp");
                std::fs::write(&tmp, pem).expect("write PEM");
                std::fs::rename(&tmp, path).expect("replace PEM");
            }
        }

        /// `--tls-cert PATH --tls-key PATH`.
        pub fn args(&self) -> Vec<String> {
            let path = |p: &PathBuf| p.to_str().expect("utf-8 path").to_string();
            vec![
                "--tls-cert".into(),
                path(&self.cert),
                "--tls-key".into(),
                path(&self.key),
            ]
        }
    }

    impl Default for Certs {
        fn default() -> Self {
            Self::new()
        }
    }

    /// `mock-upstream` over HTTPS (HTTP/2 and HTTP/1.1 by ALPN) on an OS-chosen port, with a
    /// certificate from its own CA.
    pub struct MockUpstreamTls {
        pub addr: SocketAddr,
        pub certs: Certs,
        _proc: Proc,
    }

    impl MockUpstreamTls {
        pub fn start() -> MockUpstreamTls {
            let certs = Certs::new();
            let mut proc = Proc::spawn(
                Command::new(bin("mock-upstream"))
                    .args(["--listen", "127.0.0.1:0"])
                    .args(certs.args()),
            );
            let addr = proc
                .wait_line("listening on ")
                .parse()
                .expect("mock address");
            MockUpstreamTls {
                addr,
                certs,
                _proc: proc,
            }
        }

        /// GET `path` from the mock (e.g. `/_mock/requests`, whose `by_version` tells how it was
        /// reached) over a new HTTP/1.1 connection, and parse the JSON answer.
        pub async fn get_json(&self, path: &str) -> serde_json::Value {
            let mut c = TlsClient::connect(self.addr, &self.certs.ca_pem, &["http/1.1"]).await;
            let r = c
                .send(
                    c.request("GET", path)
                        .body(Full::default())
                        .expect("request"),
                )
                .await;
            serde_json::from_slice(&body_bytes(r).await).expect("JSON body")
        }
    }

    enum Sender {
        H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
        H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    }

    /// One TLS connection and the HTTP version ALPN chose on it; every request goes on it.
    pub struct TlsClient {
        /// HTTP/2 when the server chose `h2`, else HTTP/1.1.
        pub version: Version,
        /// SHA-256 of the certificate the server presented, in hex.
        pub cert_sha256: String,
        sender: Sender,
    }

    impl TlsClient {
        /// Connect to `addr` trusting `ca_pem` (name `localhost`), offering `alpn`.
        pub async fn connect(addr: SocketAddr, ca_pem: &[u8], alpn: &[&str]) -> TlsClient {
            let stream = mock_upstream::tls::connect(addr, ca_pem, alpn)
                .await
                .expect("TLS connection");
            let cert_sha256 = stream
                .ssl()
                .peer_certificate()
                .expect("a server certificate")
                .digest(MessageDigest::sha256())
                .expect("digest")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let h2 = stream.ssl().selected_alpn_protocol() == Some(b"h2");
            let io = TokioIo::new(stream);
            let (version, sender) = if h2 {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                tokio::spawn(conn);
                (Version::HTTP_2, Sender::H2(send))
            } else {
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("h1 handshake");
                tokio::spawn(conn);
                (Version::HTTP_11, Sender::H1(send))
            };
            TlsClient {
                version,
                cert_sha256,
                sender,
            }
        }

        /// A request for `path` in the form this connection's HTTP version needs (HTTP/2: an
        /// absolute URI; HTTP/1.1: the path and a Host header).
        pub fn request(&self, method: &str, path: &str) -> hyper::http::request::Builder {
            let b = Request::builder().method(method);
            match self.sender {
                Sender::H2(_) => b.uri(format!("https://localhost{path}")),
                Sender::H1(_) => b.uri(path).header("host", "localhost"),
            }
        }

        /// Send on this connection (HTTP/2: concurrently with other requests is fine; HTTP/1.1:
        /// after the previous response was read to its end).
        pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Response<Incoming> {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.expect("HTTP/1.1 connection still open");
                    s.send_request(request).await.expect("response")
                }
                Sender::H2(s) => {
                    s.ready().await.expect("HTTP/2 connection still open");
                    s.send_request(request).await.expect("response")
                }
            }
        }

        /// Another handle on the same HTTP/2 connection (for concurrent streams); `None` on
        /// HTTP/1.1, which has one request at a time.
        pub fn h2_handle(&self) -> Option<TlsClient> {
            match &self.sender {
                Sender::H2(s) => Some(TlsClient {
                    version: self.version,
                    cert_sha256: self.cert_sha256.clone(),
                    sender: Sender::H2(s.clone()),
                }),
                Sender::H1(_) => None,
            }
        }
    }

    /// The whole body of `r`.
    pub async fn body_bytes(r: Response<Incoming>) -> Bytes {
        r.into_body()
            .collect()
            .await
            .expect("whole body")
            .to_bytes()
    }
}
