//! Wiring: build the shared state, start the API listener, the policy watcher and the counter sweeper
//! on a small runtime of their own, then run the pingora proxy service until a signal stops it.

use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::state::{AppState, Clock, Sources, Store};
use anyhow::Context;
use pingora::proxy::http_proxy_service;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use quota::PolicyHandle;
use quota::audit::{AuditSink, JsonlSink, NoSink};
use quota::engine::Engine;
use quota::policy::read_sources;
use quota::storage::{LeaseConfig, LeasedStore, MemoryStore, RedisConfig, RedisStore};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct RunConfig {
    /// The policy file or directory; optional when following a control plane.
    pub config: Option<PathBuf>,
    pub control_plane: Option<crate::link::ControlPlaneConfig>,
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    /// The bearer token of the API listener's private endpoints (`/check`, `/status`).
    pub api_token: Option<String>,
    /// Serve the API without a token on a non-loopback address (refused otherwise).
    pub api_insecure: bool,
    pub threads: usize,
    pub grace_period_s: u64,
    /// Let `POST /test/clock` move the gateway's clock (tests only).
    pub test_clock: bool,
    /// Shared counters in Redis; `None` keeps them in memory.
    pub redis: Option<RedisConfig>,
    /// With Redis: admit locally from leases (`None`: ask Redis for every request).
    pub leases: Option<LeaseConfig>,
    pub audit: AuditConfig,
    /// Terminate TLS on the proxy listener (HTTP/2 and HTTP/1.1 by ALPN); `None`: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Where LLM settlements wait while the counter store cannot take them (read back at start).
    pub settlement_journal: PathBuf,
}

/// The proxy listener's certificate: PEM files, reloaded when they change.
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct AuditConfig {
    /// Append audit events to this JSONL file; `None`: no audit log.
    pub log: Option<PathBuf>,
    /// Send audit events to Kafka (with a disk spool for outages) instead.
    pub kafka: Option<audit_kafka::KafkaSinkConfig>,
    /// This gateway's name in audit events.
    pub gateway_id: String,
}

/// Build the state from the policy at `config`; fails with every policy error when it is invalid.
/// With Redis, must run inside the Tokio runtime that will drive the Redis connection.
pub fn build_state(
    config: Option<PathBuf>,
    control_plane: Option<&crate::link::ControlPlaneConfig>,
    clock: Clock,
    redis: Option<&RedisConfig>,
    leases: Option<LeaseConfig>,
    audit_cfg: &AuditConfig,
    settlement_journal: &std::path::Path,
) -> anyhow::Result<Arc<AppState>> {
    let settlements = quota::billing::Deferred::open(settlement_journal)?;
    let mut kafka = None;
    let audit: Box<dyn AuditSink> = match (&audit_cfg.log, &audit_cfg.kafka) {
        (Some(path), _) => {
            tracing::info!(path = %path.display(), "audit events to a JSONL file");
            Box::new(JsonlSink::open(path)?)
        }
        (None, Some(cfg)) => {
            tracing::info!(brokers = %cfg.brokers, topic = %cfg.topic, spool = %cfg.spool.dir.display(), "audit events to Kafka");
            let sink = Arc::new(
                audit_kafka::KafkaSink::new(cfg.clone())
                    .context("starting the Kafka audit sink")?,
            );
            kafka = Some(sink.clone());
            Box::new(sink)
        }
        (None, None) => Box::new(NoSink),
    };
    let mut sources = Sources::default();
    if let Some(path) = &config {
        sources.file = read_sources(path).map_err(|e| anyhow::anyhow!("invalid policy:\n{e}"))?;
    }
    let link = control_plane.map(crate::link::Link::new);
    let mut policy = sources
        .compile()
        .map_err(|e| anyhow::anyhow!("invalid policy:\n{e}"))?;
    if let Some(link) = &link
        && let Some(snap) = crate::cp::read_disk_snapshot(&link.snapshot_path)
    {
        let revision = snap.revision;
        let with_snapshot = Sources {
            file: sources.file.clone(),
            snapshot: Some(snap),
        };
        match with_snapshot.compile() {
            Ok(p) => {
                tracing::info!(revision, path = %link.snapshot_path.display(), "starting from the saved control-plane snapshot");
                policy = p;
                sources = with_snapshot;
                link.set_applied(revision);
            }
            Err(e) => {
                tracing::warn!(errors = %e, "the saved control-plane snapshot does not compile; ignored")
            }
        }
    }
    tracing::info!(version = %policy.version, hash = %policy.hash, source = %sources.describe(), "policy loaded");
    let store = match redis {
        None => Store::Memory(MemoryStore::new()),
        Some(cfg) => {
            let urls: Vec<String> = cfg
                .urls
                .iter()
                .map(|u| quota::storage::redact_url(u))
                .collect();
            tracing::info!(?urls, cluster = cfg.cluster, prefix = %cfg.prefix, "counters in redis");
            let redis = RedisStore::new(cfg).context("configuring redis")?;
            match leases {
                Some(l) => {
                    tracing::info!(
                        fraction = l.fraction,
                        max = l.max,
                        ttl_ms = l.ttl.as_millis() as u64,
                        "local-first admission with leases"
                    );
                    Store::Leased(Box::new(LeasedStore::new(redis, l)))
                }
                None => Store::Redis(Box::new(redis)),
            }
        }
    };
    Ok(Arc::new(AppState {
        policy: PolicyHandle::new(policy),
        engine: Engine::new(store),
        metrics: Metrics::new().context("registering metrics")?,
        config_path: config,
        sources: std::sync::Mutex::new(sources),
        control_plane: link,
        clock,
        guardrail: Default::default(),
        audit,
        kafka,
        gateway_id: audit_cfg.gateway_id.clone(),
        connector: pingora::connectors::http::Connector::new(None),
        upstreams: Default::default(),
        tokenizer_slots: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ),
        settlements,
    }))
}

/// Run the gateway until SIGINT/SIGTERM. Only returns on a startup error.
pub fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let api_token = cfg
        .api_token
        .as_deref()
        .map(|t| crate::api::ApiToken::new(t).context("the API token is empty"))
        .transpose()?;
    if api_token.is_none() && !cfg.api_listen.ip().is_loopback() {
        if !cfg.api_insecure {
            anyhow::bail!(
                "the API listener on {} is not a loopback address and has no token: anyone who \
                 reaches it could charge any subject through /check. Set TOLLGATE_API_TOKEN or \
                 --api-token-file (or --api-insecure to accept the risk)",
                cfg.api_listen
            );
        }
        tracing::warn!(api = %cfg.api_listen, "--api-insecure: /check and /status are open to the network");
    }
    // First: a bad certificate stops the start before anything else is set up.
    let certs = cfg
        .tls
        .as_ref()
        .map(|t| crate::tls::CertStore::load(&t.cert, &t.key))
        .transpose()?;
    let clock = if cfg.test_clock {
        tracing::warn!(
            "--test-clock: the clock can be moved through the API; never use this in production"
        );
        Clock::adjustable()
    } else {
        Clock::system()
    };
    // The runtime of the API, the watcher and the Redis connection; the proxy has its own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tollgate-control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let state = {
        let _in_rt = rt.enter();
        build_state(
            cfg.config.clone(),
            cfg.control_plane.as_ref(),
            clock,
            cfg.redis.as_ref(),
            cfg.leases,
            &cfg.audit,
            &cfg.settlement_journal,
        )?
    };
    // The tokenizer's encodings take a moment to load: before the proxy listens, so the first LLM
    // requests do not wait on them (a policy that gains LLM routes later loads them lazily).
    if state.policy.load().routes.iter().any(|r| r.llm.is_some()) {
        quota::llm::tokens::warm_up();
    }
    // Bind the API here so a taken port is reported at once, before the proxy starts.
    let api = std::net::TcpListener::bind(cfg.api_listen)
        .with_context(|| format!("binding the API listener on {}", cfg.api_listen))?;
    api.set_nonblocking(true)?;
    let api_addr = api.local_addr()?;
    let control = state.clone();
    std::thread::Builder::new()
        .name("tollgate-control".into())
        .spawn({
            let certs = certs.clone();
            move || control_plane_tasks(rt, control, api, api_token, certs)
        })
        .context("starting the control thread")?;
    println!("api listening on {api_addr}");
    println!(
        "proxy listening on {}{}",
        cfg.listen,
        if certs.is_some() { " (TLS)" } else { "" }
    );

    let conf = ServerConf {
        threads: cfg.threads.max(1),
        // One thread has nothing to steal from: a current-thread runtime skips the multi-thread
        // scheduler's synchronisation on every wake-up.
        work_stealing: cfg.threads > 1,
        grace_period_seconds: Some(cfg.grace_period_s),
        graceful_shutdown_timeout_seconds: Some(cfg.grace_period_s),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Gateway::new(state.clone()));
    match certs {
        Some(certs) => {
            let settings = crate::tls::settings(certs)?;
            proxy.add_tls_with_settings(&cfg.listen.to_string(), None, settings);
        }
        None => proxy.add_tcp(&cfg.listen.to_string()),
    }
    server.add_service(proxy);
    server.add_service(background_service(
        "lease return and audit flush on shutdown",
        OnShutdown {
            state,
            grace: Duration::from_secs(cfg.grace_period_s),
        },
    ));
    server.run_forever()
}

/// The API listener, the policy and certificate watchers and the sweeper of idle counters, on their
/// own runtime so they never compete with proxy workers for a thread (it also drives the Redis
/// connection).
fn control_plane_tasks(
    rt: tokio::runtime::Runtime,
    state: Arc<AppState>,
    api: std::net::TcpListener,
    api_token: Option<crate::api::ApiToken>,
    certs: Option<Arc<crate::tls::CertStore>>,
) {
    rt.block_on(async move {
        if let Some(certs) = certs {
            tokio::spawn(certs.watch());
        }
        state.upstreams.prepare(&state.policy.load()).await;
        if state.control_plane.is_some() {
            tokio::spawn(crate::cp::follow(state.clone()));
        }
        // Settlements journaled while the store was away (before a restart too), applied in order.
        state
            .metrics
            .settlement_journal_depth
            .set(i64::try_from(state.settlements.len()).unwrap_or(i64::MAX));
        tokio::spawn(quota::billing::run_deferred(state.clone()));
        let watcher = state.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::reload::watch(watcher).await {
                tracing::error!(error = %e, "cannot watch the policy; hot reload is off");
            }
        });
        if let Store::Leased(leased) = state.engine.store() {
            let every = (leased.config().ttl / 2).max(Duration::from_millis(50));
            let returner = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    if let Store::Leased(l) = returner.engine.store() {
                        let _ = l.return_leases(returner.clock.now_ns(), false).await;
                    }
                }
            });
        }
        let sweeper = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let now = sweeper.clock.now_ns();
                if let Store::Memory(m) = sweeper.engine.store() {
                    m.sweep(now);
                }
                sweeper.engine.fallback().sweep(now);
            }
        });
        let listener = match tokio::net::TcpListener::from_std(api) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the API listener");
                std::process::exit(1);
            }
        };
        if let Err(e) = axum::serve(listener, crate::api::app(state, api_token)).await {
            tracing::error!(error = %e, "API listener failed");
            std::process::exit(1);
        }
    });
}

/// On graceful shutdown (SIGTERM): give back every unused lease so the fleet can use it, and
/// hand every audit event to Kafka or the disk spool.
struct OnShutdown {
    state: Arc<AppState>,
    grace: Duration,
}

#[async_trait::async_trait]
impl BackgroundService for OnShutdown {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _ = shutdown.changed().await;
        if let Store::Leased(leased) = self.state.engine.store() {
            match leased.return_leases(self.state.clock.now_ns(), true).await {
                Ok(()) => tracing::info!("unused leases returned"),
                Err(e) => tracing::warn!(error = %e, "unused leases not returned"),
            }
        }
        if let Some(k) = &self.state.kafka {
            // Leave time within the grace period for the spool's fsync.
            let wait = self
                .grace
                .saturating_sub(Duration::from_secs(1))
                .max(Duration::from_millis(500));
            match k.shutdown(wait).await {
                Ok(s) => tracing::info!(
                    delivered = s.delivered,
                    spooled = s.spool_pending_records,
                    "audit sink flushed"
                ),
                Err(e) => tracing::warn!(error = %e, "audit sink not flushed"),
            }
        }
    }
}
