//! `tickfleet-api`: the gRPC and REST apis over a tickfleet Redis store.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tickfleet_api::ApiMetrics;
use tickfleet_api::ratelimit::{Rate, RateLimits};
use tickfleet_service::Health;
use tickfleet_store::Retention;
use tracing::{error, info};

/// tickfleet's gRPC api (tickfleet.v1.TickService, grpc.health.v1, server reflection) and the same
/// queries as REST/JSON, over the Redis the workers write to. Every option is also an environment variable; other TICKFLEET_* variables are ignored.
#[derive(Parser, Debug)]
#[command(name = "tickfleet-api", version)]
struct Config {
    /// gRPC listen address.
    #[arg(long, env = "TICKFLEET_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    grpc_addr: SocketAddr,
    /// REST/JSON api listen address (the same queries as gRPC, live ticks as Server-Sent Events).
    #[arg(long, env = "TICKFLEET_HTTP_ADDR", default_value = tickfleet_api::rest::DEFAULT_HTTP_ADDR)]
    http_addr: SocketAddr,
    /// Admin endpoint (/healthz, /readyz, /metrics) listen address.
    #[arg(long, env = "TICKFLEET_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    admin_addr: SocketAddr,
    /// The store (the same URL and prefix as the pipeline's workers).
    #[command(flatten)]
    store: tickfleet_store::StoreOptions,
    /// Serve gRPC over TLS with this PEM certificate (chain), e.g. from a mounted Secret.
    #[arg(long, env = "TICKFLEET_GRPC_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert-file.
    #[arg(long, env = "TICKFLEET_GRPC_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<std::path::PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "TICKFLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Bound on a graceful shutdown (seconds): in-flight calls still running after it are cut (exit 1).
    #[arg(long, env = "TICKFLEET_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Messages buffered per live-stream client; a client further behind loses the newest messages (for
    /// it alone) and gets a gap notice.
    #[arg(long, env = "TICKFLEET_STREAM_BUFFER", default_value_t = tickfleet_api::service::STREAM_BUFFER)]
    stream_buffer: usize,
    /// Most unary calls this replica serves at once; beyond it a call is refused with
    /// RESOURCE_EXHAUSTED (not queued).
    #[arg(long, env = "TICKFLEET_MAX_CONCURRENT_CALLS", default_value_t = tickfleet_api::limits::MAX_CALLS)]
    max_concurrent_calls: usize,
    /// Most live streams (StreamTicks + StreamCandles) open on this replica; beyond it a new stream is
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TICKFLEET_MAX_STREAMS", default_value_t = tickfleet_api::limits::MAX_STREAMS)]
    max_streams: usize,
    /// Deadline of each store (Redis) call in milliseconds: a call Redis has not answered by then fails
    /// with UNAVAILABLE instead of hanging.
    #[arg(long, env = "TICKFLEET_STORE_TIMEOUT_MS", default_value_t = tickfleet_api::service::STORE_TIMEOUT.as_millis() as u64)]
    store_timeout_ms: u64,
    /// Per-client rate limit of cheap reads (GetLatest, BatchGetLatest, ListAssets and their REST
    /// routes): COUNT/UNIT[:BURST], UNIT s, m or h (e.g. 100/s:200), or off. Beyond it a call is
    /// refused: RESOURCE_EXHAUSTED on gRPC, 429 with Retry-After on REST.
    #[arg(long, env = "TICKFLEET_RATE_LIMIT_READS", default_value = "off", value_parser = rate)]
    rate_limit_reads: RateFlag,
    /// Per-client rate limit of range reads (ListTicks, GetCandles, GetMovingAverage), as
    /// --rate-limit-reads.
    #[arg(long, env = "TICKFLEET_RATE_LIMIT_RANGES", default_value = "off", value_parser = rate)]
    rate_limit_ranges: RateFlag,
    /// Per-client rate limit of opening live streams (gRPC and SSE), as --rate-limit-reads.
    #[arg(long, env = "TICKFLEET_RATE_LIMIT_STREAMS", default_value = "off", value_parser = rate)]
    rate_limit_streams: RateFlag,
    /// Per-client rate limit of writes (polling jobs), as --rate-limit-reads.
    #[arg(long, env = "TICKFLEET_RATE_LIMIT_WRITES", default_value = "off", value_parser = rate)]
    rate_limit_writes: RateFlag,
    /// Name the rate-limited client by this request header (gRPC metadata), e.g. x-api-key, when a
    /// call carries it; else (and by default) by its peer IP address. Keys are not verified: use it
    /// behind a gateway that authenticates them.
    #[arg(long, env = "TICKFLEET_RATE_LIMIT_KEY_HEADER")]
    rate_limit_key_header: Option<String>,
    /// Most clients tracked per route class; while that many are active, new clients share one
    /// bucket (so a flood of client ids is limited as one client and memory stays bounded).
    #[arg(long, env = "TICKFLEET_RATE_LIMIT_MAX_CLIENTS", default_value_t = tickfleet_api::ratelimit::MAX_CLIENTS)]
    rate_limit_max_clients: usize,
    /// REST candles of a range (to_ns set) that ended at least this many seconds ago are served with
    /// `Cache-Control: immutable`. It must cover the workers' --max-skew-behind-secs (late ticks up
    /// to that old still change their candle) plus a margin; the default is their default (365
    /// days) plus a day.
    #[arg(long, env = "TICKFLEET_CANDLES_IMMUTABLE_AFTER_SECS", default_value_t = tickfleet_api::service::CANDLES_IMMUTABLE_AFTER.as_secs())]
    candles_immutable_after_secs: u64,
    /// Print the REST api's OpenAPI 3.1 document (what /openapi.json serves) and exit.
    #[arg(long)]
    print_openapi: bool,
}

/// A rate-limit flag's value: a rate, or none (`off`).
#[derive(Debug, Clone, Copy)]
struct RateFlag(Option<Rate>);

fn rate(s: &str) -> Result<RateFlag, String> {
    tickfleet_api::ratelimit::parse_rate(s).map(RateFlag)
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if config.print_openapi {
        print!("{}", tickfleet_api::rest::openapi::json());
        return ExitCode::SUCCESS;
    }
    tickfleet_service::init_tracing(config.log_format == "json");
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = tickfleet_service::shutdown_on_signals();
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => {
            let read = |p: &std::path::PathBuf| {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
            Some(tonic::transport::ServerTlsConfig::new().identity(identity))
        }
        _ => None,
    };
    let store = config.store.open(Retention::default())?;
    let registry = prometheus::Registry::new();
    let metrics = ApiMetrics::new(&registry)?;
    let health = Health::new();
    let (_, admin) = tickfleet_service::serve_admin(
        config.admin_addr,
        registry,
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    let running = tickfleet_api::start(
        store,
        config.grpc_addr,
        metrics,
        health,
        shutdown,
        tickfleet_api::Options {
            drain_timeout: Duration::from_secs(config.drain_timeout_secs),
            stream_buffer: config.stream_buffer,
            tls,
            limits: tickfleet_api::limits::Limits::new(
                config.max_concurrent_calls,
                config.max_streams,
            ),
            store_timeout: Duration::from_millis(config.store_timeout_ms),
            http_addr: Some(config.http_addr),
            rate_limits: RateLimits {
                rates: [
                    config.rate_limit_reads.0,
                    config.rate_limit_ranges.0,
                    config.rate_limit_streams.0,
                    config.rate_limit_writes.0,
                ],
                key_header: config.rate_limit_key_header.clone(),
                max_clients: config.rate_limit_max_clients,
            },
            candles_immutable_after: Duration::from_secs(config.candles_immutable_after_secs),
            jobs: config.store.open_jobs()?,
        },
    )
    .await?;
    let http = running.http_addr.map(|a| a.to_string()).unwrap_or_default();
    info!(grpc = %running.addr, %http, prefix = %config.store.redis.redis_prefix, "tickfleet-api started");
    running.task.await??;
    admin.await??;
    Ok(())
}
