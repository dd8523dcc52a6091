//! The `control-plane` binary: `serve` runs the REST API and the gateways' watch streams.

use anyhow::Context;
use clap::{Parser, Subcommand};
use control_plane::auth::{BOOTSTRAP_ID, sha256_hex};
use control_plane::{AppState, Store};
use quota::audit::{AuditSink, JsonlSink, NoSink};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Interval of heartbeats on idle watch streams.
    #[arg(long, default_value_t = 5000)]
    heartbeat_ms: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
    }
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
    match bootstrap {
        Some(token) => {
            anyhow::ensure!(
                token.len() >= 16,
                "the bootstrap admin token must be at least 16 characters"
            );
            store
                .put_token(
                    BOOTSTRAP_ID,
                    "bootstrap",
                    "admin",
                    &sha256_hex(token.as_bytes()),
                    "operator",
                )
                .await?;
        }
        None => {
            let admins = store.tokens().await?;
            anyhow::ensure!(
                admins.iter().any(|t| t.role == "admin" && !t.revoked),
                "no admin token: set TOLLGATE_ADMIN_TOKEN or pass --admin-token-file"
            );
        }
    }
    let audit: Box<dyn AuditSink> = match &args.audit_log {
        Some(path) => Box::new(JsonlSink::open(path)?),
        None => Box::new(NoSink),
    };
    let state = AppState::new(
        store,
        audit,
        Duration::from_millis(args.heartbeat_ms.max(100)),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("control plane listening on {}", listener.local_addr()?);
    tracing::info!(revision = state.published.borrow().revision, "serving");
    axum::serve(listener, control_plane::app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// The database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}
