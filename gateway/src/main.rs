//! `gateway`: run the quota-enforcing proxy, or check a policy file without starting anything.

use clap::{Parser, Subcommand};
use gateway::server::{RunConfig, run};
use quota::storage::RedisConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Tollgate: a quota and rate-limit gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Policy file, or directory of policy files (hot-reloaded). Optional with --control-plane,
    /// whose policy wins when it has one.
    #[arg(long, required_unless_present = "control_plane")]
    config: Option<PathBuf>,
    /// Follow this control plane (`http://HOST:PORT`): policies and entitlements pushed live.
    /// Repeat it (or give a comma list) for instances sharing one database: the gateway fails
    /// over between them.
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    control_plane: Vec<String>,
    /// How often the enforced revision is checked against the control plane, even while the
    /// stream is quiet.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    control_plane_check_ms: u64,
    /// Resync (reconnect, to another instance when there are several) after being behind the
    /// control plane this long.
    #[arg(long, value_name = "MS", default_value_t = 10000)]
    control_plane_resync_after_ms: u64,
    /// Token for the control plane (viewer role is enough).
    #[arg(long, env = "TOLLGATE_CONTROL_PLANE_TOKEN", hide_env_values = true)]
    control_plane_token: Option<String>,
    /// Where the last control-plane snapshot is kept, to start from while it is unreachable.
    #[arg(long, value_name = "PATH", default_value = "tollgate-snapshot.json")]
    control_plane_snapshot: PathBuf,
    /// Address of the proxy.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve the proxy over TLS with this PEM certificate chain (leaf first), HTTP/2 and HTTP/1.1
    /// by ALPN. Reloaded when the file changes.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert. Reloaded when the file changes.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Address of the API: /check, /metrics, /status, /healthz.
    #[arg(long, default_value = "127.0.0.1:9090")]
    api_listen: SocketAddr,
    /// File holding the bearer token that /check and /status need (/metrics and /healthz stay
    /// open). Required when the API listens on a non-loopback address.
    #[arg(long, value_name = "PATH", conflicts_with = "api_token")]
    api_token_file: Option<PathBuf>,
    /// The API's bearer token, from the environment (prefer --api-token-file on shared hosts).
    #[arg(long, env = "TOLLGATE_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Serve the API without a token on a non-loopback address.
    #[arg(long)]
    api_insecure: bool,
    /// Proxy worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds to finish in-flight requests after SIGTERM.
    #[arg(long, default_value_t = 5)]
    grace_period: u64,
    /// Keep counters in Redis, shared by every gateway using it: `redis://HOST:PORT[/DB]`.
    /// Give it several times for the nodes of a Redis Cluster.
    #[arg(long = "redis", value_name = "URL")]
    redis: Vec<String>,
    /// Treat a single --redis URL as a Cluster node.
    #[arg(long)]
    redis_cluster: bool,
    /// Prefix of every Redis key.
    #[arg(long, default_value = "tg")]
    redis_prefix: String,
    /// Limit on each Redis call; past it the policy's failure mode applies.
    #[arg(long, default_value_t = 50)]
    redis_timeout_ms: u64,
    /// With --redis: ask Redis for every request instead of admitting locally from leases.
    #[arg(long)]
    no_leases: bool,
    /// With leases: unused lease units go back to Redis after this long.
    #[arg(long, default_value_t = 2000)]
    lease_ttl_ms: u64,
    /// Append an audit event per decision and settlement to this JSONL file.
    #[arg(long, value_name = "PATH")]
    audit_log: Option<PathBuf>,
    /// Send audit events to Kafka (`host:port[,host:port]`), spooling to disk while it is away.
    #[arg(long, value_name = "BROKERS", conflicts_with = "audit_log")]
    audit_kafka: Option<String>,
    /// Kafka topic of audit events.
    #[arg(long, default_value = "tollgate-audit")]
    audit_topic: String,
    /// Directory of the audit spool (events waiting for Kafka survive restarts here).
    #[arg(long, value_name = "DIR", default_value = "tollgate-audit-spool")]
    audit_spool: PathBuf,
    /// A librdkafka property for the audit producer, `KEY=VALUE` (TLS, SASL, tuning); repeatable.
    #[arg(long = "audit-kafka-option", value_name = "KEY=VALUE")]
    audit_kafka_options: Vec<String>,
    /// Upper bound of the audit spool; past it new events are dropped and counted.
    #[arg(long, default_value_t = 1024)]
    audit_spool_max_mb: u64,
    /// Where LLM settlements the counter store cannot take yet are kept (fsynced) until it can;
    /// read back at start. Each gateway needs its own.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "tollgate-settlements.journal"
    )]
    settlement_journal: PathBuf,
    /// This gateway's name in audit events (default: gateway-<pid>).
    #[arg(long)]
    gateway_id: Option<String>,
    /// Testing only (builds with the `test-clock` feature): allow POST /test/clock on the API
    /// listener to set the gateway's clock.
    #[cfg(feature = "test-clock")]
    #[arg(long, hide = true)]
    test_clock: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and its API listener.
    Run(Box<RunArgs>),
    /// Validate a policy file or directory; prints every error and exits non-zero if any.
    Check { path: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,pingora_core=warn,pingora_proxy=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Check { path } => match quota::policy::load_path(&path) {
            Ok(p) => {
                println!(
                    "{}: OK (version {}, {} routes, {} tiers, {} subjects, sha256 {})",
                    path.display(),
                    p.version,
                    p.routes.len(),
                    p.tiers.len(),
                    p.subjects().count(),
                    p.hash
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let RunArgs {
                config,
                control_plane,
                control_plane_check_ms,
                control_plane_resync_after_ms,
                control_plane_token,
                control_plane_snapshot,
                listen,
                tls_cert,
                tls_key,
                api_listen,
                api_token_file,
                api_token,
                api_insecure,
                threads,
                grace_period,
                #[cfg(feature = "test-clock")]
                test_clock,
                redis,
                redis_cluster,
                redis_prefix,
                redis_timeout_ms,
                no_leases,
                lease_ttl_ms,
                audit_log,
                audit_kafka,
                audit_topic,
                audit_spool,
                audit_spool_max_mb,
                audit_kafka_options,
                settlement_journal,
                gateway_id,
            } = *args;
            let api_token = match api_token_file {
                Some(path) => match std::fs::read_to_string(&path) {
                    Ok(t) => Some(t.trim().to_string()),
                    Err(e) => {
                        eprintln!("gateway: --api-token-file {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => api_token,
            };
            #[cfg(not(feature = "test-clock"))]
            let test_clock = false;
            let mut kafka_extra = Vec::new();
            for o in audit_kafka_options {
                match o.split_once('=') {
                    Some((k, v)) => kafka_extra.push((k.trim().to_string(), v.trim().to_string())),
                    None => {
                        eprintln!("gateway: --audit-kafka-option `{o}`: expected KEY=VALUE");
                        return ExitCode::FAILURE;
                    }
                }
            }
            let kafka = audit_kafka.map(|brokers| {
                let mut k = audit_kafka::KafkaSinkConfig::new(brokers, audit_spool);
                k.topic = audit_topic;
                k.spool.max_bytes = audit_spool_max_mb.saturating_mul(1 << 20);
                k.extra = kafka_extra;
                k
            });
            let audit = gateway::server::AuditConfig {
                log: audit_log,
                kafka,
                gateway_id: gateway_id.unwrap_or_else(|| format!("gateway-{}", std::process::id())),
            };
            let leases = (!no_leases).then(|| quota::storage::LeaseConfig {
                ttl: std::time::Duration::from_millis(lease_ttl_ms.max(1)),
                ..Default::default()
            });
            let redis = (!redis.is_empty()).then(|| {
                let mut cfg = RedisConfig::new(redis);
                cfg.cluster |= redis_cluster;
                cfg.prefix = redis_prefix;
                cfg.timeout = std::time::Duration::from_millis(redis_timeout_ms.max(1));
                cfg
            });
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let control_plane = match (control_plane.is_empty(), control_plane_token) {
                (false, Some(token)) => Some(gateway::link::ControlPlaneConfig {
                    urls: control_plane,
                    token,
                    snapshot: control_plane_snapshot,
                    check_every: std::time::Duration::from_millis(control_plane_check_ms.max(100)),
                    resync_after: std::time::Duration::from_millis(control_plane_resync_after_ms),
                }),
                (false, None) => {
                    eprintln!(
                        "gateway: --control-plane needs --control-plane-token (or TOLLGATE_CONTROL_PLANE_TOKEN)"
                    );
                    return ExitCode::FAILURE;
                }
                (true, _) => None,
            };
            let cfg = RunConfig {
                config,
                control_plane,
                listen,
                api_listen,
                api_token,
                api_insecure,
                threads,
                grace_period_s: grace_period,
                test_clock,
                redis,
                leases,
                audit,
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(cert, key)| gateway::server::TlsConfig { cert, key }),
                settlement_journal,
            };
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gateway: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Release builds (no `test-clock` feature) do not even accept the flag, so no deployment can
    /// turn the clock API on by mistake.
    #[test]
    fn the_test_clock_exists_only_in_test_builds() {
        let parsed = Cli::try_parse_from(["gateway", "run", "--config", "p.yaml", "--test-clock"]);
        assert_eq!(parsed.is_ok(), cfg!(feature = "test-clock"));
    }

    #[test]
    fn the_api_token_comes_from_a_file_or_the_environment_not_both() {
        let both = Cli::try_parse_from([
            "gateway",
            "run",
            "--config",
            "p.yaml",
            "--api-token-file",
            "t",
            "--api-token",
            "x",
        ]);
        assert!(both.is_err());
    }

    #[test]
    fn a_tls_certificate_needs_its_key() {
        let run = |extra: &[&str]| {
            let mut args = vec!["gateway", "run", "--config", "p.yaml"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).is_ok()
        };
        assert!(!run(&["--tls-cert", "c.pem"]));
        assert!(!run(&["--tls-key", "k.pem"]));
        assert!(run(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]));
    }
}
