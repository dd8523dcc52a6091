//! The `control-plane` binary: `serve` runs the REST API and the gateways' watch streams.

use anyhow::Context;
use audit_kafka::{AccountingConsumer, ConsumerConfig, KafkaSink, KafkaSinkConfig};
use clap::{Parser, Subcommand};
use control_plane::auth::{Actor, BOOTSTRAP_ID, Role, sha256_hex};
use control_plane::ledger::Ledger;
use control_plane::write::{self, Op, Outcome};
use control_plane::{AppState, Store};
use quota::audit::{AuditSink, JsonlSink, NoSink};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The actor of changes made at start from the operator's configuration.
const OPERATOR: &str = "operator";

#[derive(Parser)]
#[command(name = "control-plane", version, about = "Tollgate control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the admin REST API and the gateways' watch streams.
    Serve(ServeArgs),
    /// Read audit events from Kafka into the `quota_audit` ledger (a consumer group: run several
    /// to share the partitions).
    Accounting(AccountingArgs),
    /// Compare the ledger's totals of a day with a gateway's live daily counters.
    Reconcile(ReconcileArgs),
    /// Read gateways' JSONL audit logs (`gateway --audit-log FILE`) into the `quota_audit` ledger,
    /// as the accounting consumer does from Kafka (a line read twice changes nothing).
    Ingest(IngestArgs),
    /// Rotate or revoke the bootstrap admin token, directly in the database (for when no admin
    /// token is at hand).
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    #[command(subcommand)]
    action: TokenAction,
    /// The control plane's database: `sqlite://FILE` or `postgres://…`.
    #[arg(
        long,
        global = true,
        default_value = "sqlite://tollgate-control-plane.db"
    )]
    database: String,
    /// Append the audit event of the change to this JSONL file.
    #[arg(long, global = true)]
    audit_log: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Replace the bootstrap token with a new one, printed once; the old one is refused from now
    /// on (also when a later start passes it in TOLLGATE_ADMIN_TOKEN).
    RotateBootstrap,
    /// Revoke the bootstrap token (another admin token must exist).
    RevokeBootstrap,
}

#[derive(clap::Args)]
struct IngestArgs {
    /// A gateway's JSONL audit log; repeatable.
    #[arg(long = "audit-log", required = true)]
    audit_logs: Vec<PathBuf>,
    /// The ledger: `sqlite://FILE` or `postgres://…` (the console reads the control plane's
    /// database unless `serve --ledger` names another).
    #[arg(long, default_value = "sqlite://tollgate-control-plane.db")]
    database: String,
}

#[derive(clap::Args)]
struct AccountingArgs {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    #[arg(long)]
    brokers: String,
    #[arg(long, default_value = "tollgate-audit")]
    topic: String,
    #[arg(long, default_value = "tollgate-accounting")]
    group: String,
    /// The ledger: `sqlite://FILE` or `postgres://…`.
    #[arg(long, default_value = "sqlite://tollgate-ledger.db")]
    database: String,
    /// Events per transaction at most.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Serve the consumer's counters as Prometheus metrics here (`/metrics`, and `/healthz`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// A librdkafka consumer property, `KEY=VALUE` (TLS, SASL, `session.timeout.ms`); repeatable.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    kafka_options: Vec<String>,
}

#[derive(clap::Args)]
struct ReconcileArgs {
    /// The ledger: `sqlite://FILE` or `postgres://…`.
    #[arg(long)]
    database: String,
    /// A gateway's API address (`http://127.0.0.1:9090`), whose counters are compared.
    #[arg(long)]
    gateway: String,
    /// The gateway API's bearer token, when it has one (its `TOLLGATE_API_TOKEN`).
    #[arg(long, env = "TOLLGATE_API_TOKEN", hide_env_values = true)]
    gateway_token: Option<String>,
    /// The subjects' local day, `YYYY-MM-DD` (default: today in UTC).
    #[arg(long)]
    day: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the drift as Prometheus text (for a textfile collector).
    #[arg(long)]
    metrics_file: Option<PathBuf>,
    /// Acknowledge the dead letters listed by an earlier run, once dealt with: they stay in
    /// `quota_audit_dead_letter` as a record but no longer fail reconciliation. The report lists
    /// exactly those acknowledged.
    #[arg(long)]
    ack_dead_letters: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// `sqlite://FILE` (created if missing) or `postgres://USER@HOST/DB`.
    #[arg(long, default_value = "sqlite://tollgate-control-plane.db")]
    database: String,
    /// A file holding the bootstrap admin token (else the TOLLGATE_ADMIN_TOKEN variable).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Append audit events (policy and entitlement changes) to this JSONL file.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Send audit events to Kafka instead (`host:port[,host:port]`), spooling while it is away.
    #[arg(long, value_name = "BROKERS", conflicts_with = "audit_log")]
    audit_kafka: Option<String>,
    #[arg(long, default_value = "tollgate-audit")]
    audit_topic: String,
    #[arg(
        long,
        value_name = "DIR",
        default_value = "tollgate-control-plane-spool"
    )]
    audit_spool: PathBuf,
    /// A librdkafka property for the audit producer, `KEY=VALUE` (TLS, SASL, tuning); repeatable.
    #[arg(long = "audit-kafka-option", value_name = "KEY=VALUE")]
    audit_kafka_options: Vec<String>,
    /// Interval of heartbeats on idle watch streams.
    #[arg(long, default_value_t = 5000)]
    heartbeat_ms: u64,
    /// The ledger the console charts (`quota_audit`, as the accounting consumer writes it):
    /// default the control plane's own database.
    #[arg(long)]
    ledger: Option<String>,
    /// Follow a gateway's JSONL audit log into the ledger (one machine, no Kafka); repeatable.
    #[arg(long = "ingest-audit-log", value_name = "FILE")]
    ingest_audit_logs: Vec<PathBuf>,
    /// How long a console sign-in lasts.
    #[arg(long, default_value_t = 480)]
    console_session_minutes: u64,
}

fn main() -> anyhow::Result<()> {
    // Logs on stderr: stdout carries what a command prints (`reconcile --json`, the listen address).
    // PostgreSQL's notices (`... already exists, skipping` at each start) are not worth a line.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx::postgres::notice=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Accounting(args) => rt.block_on(accounting(args)),
        Command::Token(args) => rt.block_on(token(args)),
        Command::Ingest(args) => rt.block_on(ingest(args)),
        Command::Reconcile(args) => {
            let clean = rt.block_on(reconcile(args))?;
            // Non-zero when the ledger and the counters disagree (or the ledger holds messages or
            // events it could not account for), for cron jobs and CI.
            std::process::exit(if clean { 0 } else { 3 });
        }
    }
}

async fn ledger(url: &str) -> anyhow::Result<Ledger> {
    let store = Store::connect(url)
        .await
        .with_context(|| format!("opening the database {}", redact(url)))?;
    Ok(Ledger::new(store.pool().clone()).await?)
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let ledger = ledger(&args.database).await?;
    for path in &args.audit_logs {
        let mut offset = 0;
        let mut total = control_plane::ingest::Ingested::default();
        // A large file is read in chunks; go on until a call reads nothing more.
        loop {
            let done = control_plane::ingest::ingest_file(&ledger, path, offset).await?;
            total.lines += done.lines;
            total.written.inserted += done.written.inserted;
            total.written.dead_lettered += done.written.dead_lettered;
            total.unreadable += done.unreadable;
            if done.offset == offset {
                break;
            }
            offset = done.offset;
        }
        println!(
            "{}: {} lines, {} new events, {} unreadable, {} dead letters",
            path.display(),
            total.lines,
            total.written.inserted,
            total.unreadable,
            total.written.dead_lettered
        );
    }
    Ok(())
}

async fn accounting(args: AccountingArgs) -> anyhow::Result<()> {
    let ledger = ledger(&args.database).await?;
    let mut cfg = ConsumerConfig::new(&args.brokers, &args.group, &args.topic);
    cfg.batch_max = args.batch.max(1);
    cfg.extra = key_values("--kafka-option", &args.kafka_options)?;
    let consumer = AccountingConsumer::new(cfg, ledger)?;
    let stats = consumer.stats_handle();
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        println!("metrics listening on {}", listener.local_addr()?);
        // `/healthz` for container health checks, as on the other binaries.
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" })).route(
            "/metrics",
            axum::routing::get(move || {
                let s = stats.get();
                async move {
                    format!(
                        "# TYPE accounting_events_consumed_total counter\naccounting_events_consumed_total {}\n\
                         # TYPE accounting_events_inserted_total counter\naccounting_events_inserted_total {}\n\
                         # TYPE accounting_events_duplicate_total counter\naccounting_events_duplicate_total {}\n\
                         # TYPE accounting_events_undecodable_total counter\naccounting_events_undecodable_total {}\n\
                         # TYPE accounting_events_dead_lettered_total counter\naccounting_events_dead_lettered_total {}\n\
                         # TYPE accounting_batches_total counter\naccounting_batches_total {}\n",
                        s.consumed, s.inserted, s.duplicates, s.undecodable, s.dead_lettered, s.batches
                    )
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    println!(
        "accounting consumer running (topic {}, group {})",
        args.topic, args.group
    );
    consumer.run(stop_signal()).await?;
    Ok(())
}

async fn reconcile(args: ReconcileArgs) -> anyhow::Result<bool> {
    let ledger = ledger(&args.database).await?;
    let day = args
        .day
        .unwrap_or_else(|| chrono::Utc::now().format("%Y-%m-%d").to_string());
    let report = control_plane::reconcile::reconcile(
        &ledger,
        &args.gateway,
        args.gateway_token.as_deref(),
        &day,
        args.ack_dead_letters,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.metrics_file {
        std::fs::write(path, report.prometheus())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.clean())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = Store::connect(&args.database)
        .await
        .with_context(|| format!("opening the database {}", redact(&args.database)))?;
    let bootstrap = match &args.admin_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("TOLLGATE_ADMIN_TOKEN").ok(),
    };
    let mut kafka = None;
    let audit: Box<dyn AuditSink> = match (&args.audit_log, args.audit_kafka) {
        (Some(path), _) => Box::new(JsonlSink::open(path)?),
        (None, Some(brokers)) => {
            let mut cfg = KafkaSinkConfig::new(brokers, args.audit_spool);
            cfg.topic = args.audit_topic;
            cfg.extra = key_values("--audit-kafka-option", &args.audit_kafka_options)?;
            let sink = Arc::new(KafkaSink::new(cfg)?);
            kafka = Some(sink.clone());
            Box::new(sink)
        }
        (None, None) => Box::new(NoSink),
    };
    let state = AppState::new(
        store,
        audit,
        Duration::from_millis(args.heartbeat_ms.max(100)),
    )
    .await?;
    install_bootstrap(&state, bootstrap).await?;
    let operator = Actor {
        name: OPERATOR.into(),
        role: Role::Admin,
    };
    apply(&state, &operator, Op::HashStoredKeys).await?;
    let ledger = match &args.ledger {
        Some(url) => ledger(url).await?,
        None => Ledger::new(state.store.pool().clone()).await?,
    };
    if !args.ingest_audit_logs.is_empty() {
        tokio::spawn(control_plane::ingest::follow(
            ledger.clone(),
            args.ingest_audit_logs.clone(),
            Duration::from_secs(1),
        ));
    }
    let console = control_plane::console::Console::new(
        state.clone(),
        Some(ledger),
        Duration::from_secs(args.console_session_minutes.max(1) * 60),
    );
    let app = control_plane::app(state.clone()).merge(control_plane::console::router(console));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    println!("control plane listening on {local}");
    println!("console: http://{local}/console");
    tracing::info!(revision = state.published.borrow().revision, "serving");
    let closing = state.closing.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop_signal().await;
        // Watch streams never end by themselves; end them so the server can drain.
        closing.send_replace(true);
    });
    server.await?;
    if let Some(k) = kafka {
        k.shutdown(Duration::from_secs(3)).await?;
    }
    Ok(())
}

/// `KEY=VALUE` librdkafka properties given with `flag`.
fn key_values(flag: &str, options: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    options
        .iter()
        .map(|o| {
            let (k, v) = o
                .split_once('=')
                .with_context(|| format!("{flag} `{o}`: expected KEY=VALUE"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The bootstrap admin token rule. With `TOLLGATE_ADMIN_TOKEN` (or `--admin-token-file`): that
/// token becomes the bootstrap token, unless it was rotated or revoked before (then start fails:
/// a leaked token must not come back with a restart). Without it: a bootstrap token that came from
/// the environment is revoked, and another admin token must exist; one rotated through the API or
/// `control-plane token rotate-bootstrap` stays valid (its holder got it from there).
async fn install_bootstrap(state: &AppState, token: Option<String>) -> anyhow::Result<()> {
    let operator = Actor {
        name: OPERATOR.into(),
        role: Role::Admin,
    };
    let current = state.store.token(BOOTSTRAP_ID).await?;
    match token {
        Some(token) => {
            anyhow::ensure!(
                token.len() >= 16,
                "the bootstrap admin token must be at least 16 characters"
            );
            let sha256 = sha256_hex(token.as_bytes());
            anyhow::ensure!(
                !state.store.is_retired(&sha256).await?,
                "TOLLGATE_ADMIN_TOKEN holds a bootstrap token that was rotated or revoked: set a new one, or leave it unset when another admin token exists"
            );
            if current.is_none_or(|c| c.sha256 != sha256) {
                apply(state, &operator, Op::SetBootstrap { sha256 }).await?;
            }
        }
        None => {
            if current.is_some_and(|c| c.created_by == OPERATOR) {
                let revoke = Op::RevokeToken {
                    id: BOOTSTRAP_ID.into(),
                };
                apply(state, &operator, revoke).await.context(
                    "no admin token: set TOLLGATE_ADMIN_TOKEN or pass --admin-token-file",
                )?;
                tracing::info!(
                    "started without TOLLGATE_ADMIN_TOKEN: the earlier bootstrap token is revoked"
                );
            }
            let admins = state.store.tokens().await?;
            anyhow::ensure!(
                admins.iter().any(|t| t.role == "admin" && !t.revoked),
                "no admin token: set TOLLGATE_ADMIN_TOKEN or pass --admin-token-file"
            );
        }
    }
    Ok(())
}

async fn apply(state: &AppState, actor: &Actor, op: Op) -> anyhow::Result<Outcome> {
    write::apply(state, actor, op)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn token(args: TokenArgs) -> anyhow::Result<()> {
    let store = Store::connect(&args.database)
        .await
        .with_context(|| format!("opening the database {}", redact(&args.database)))?;
    let audit: Box<dyn AuditSink> = match &args.audit_log {
        Some(path) => Box::new(JsonlSink::open(path)?),
        None => Box::new(NoSink),
    };
    let state = AppState::new(store, audit, Duration::from_secs(5)).await?;
    let actor = Actor {
        name: "cli".into(),
        role: Role::Admin,
    };
    match args.action {
        TokenAction::RotateBootstrap => {
            if let Outcome::Token(t) = apply(&state, &actor, Op::RotateBootstrap).await? {
                println!("{}", t.token);
            }
        }
        TokenAction::RevokeBootstrap => {
            let op = Op::RevokeToken {
                id: BOOTSTRAP_ID.into(),
            };
            apply(&state, &actor, op).await?;
            println!("bootstrap token revoked");
        }
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// The database URL without its password, for messages.
fn redact(url: &str) -> String {
    quota::storage::redact_url(url)
}
