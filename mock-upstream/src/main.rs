//! `mock-upstream [--listen ADDR]`: binds, prints `listening on ADDR` (the
//! real address, so port 0 works) on stdout, then serves until killed.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use mock_upstream::MockState;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(about = "Mock OpenAI/Anthropic/lookup upstream with faults on request")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // The one stdout line a spawning test waits for; flushed because stdout
    // is a pipe (block-buffered) then.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!("mock-upstream listening on {addr}");

    mock_upstream::serve(listener, Arc::new(MockState::new()))
        .await
        .context("serving")
}
