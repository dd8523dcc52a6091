//! `mock-upstream [--listen ADDR] [--tls-cert PEM --tls-key PEM]`: binds, prints
//! `listening on ADDR` (the real address, so port 0 works) on stdout, then
//! serves until killed: plain HTTP/1.1, or with a certificate HTTPS with
//! HTTP/2 and HTTP/1.1 by ALPN.

use std::io::Write;
use std::path::PathBuf;
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
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM certificate chain.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
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

    // Before binding: a bad certificate fails the start, not the first handshake.
    let acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(mock_upstream::tls::acceptor(cert, key)?),
        _ => None,
    };
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
    let state = Arc::new(MockState::new());
    match acceptor {
        Some(acceptor) => {
            tracing::info!("mock-upstream listening on {addr} (TLS, h2 and http/1.1)");
            mock_upstream::tls::serve_tls(listener, acceptor, state).await
        }
        None => {
            tracing::info!("mock-upstream listening on {addr}");
            mock_upstream::serve(listener, state).await
        }
    }
    .context("serving")
}
