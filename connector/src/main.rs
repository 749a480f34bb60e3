//! `tickfleet-connector`: one exchange's public trade stream onto the pipeline's Kafka topic, or (`poll`)
//! the provider polling jobs. See `--help` and `poll --help`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use tickfleet_connector::poll::{PollConfig, PollMetrics};
use tickfleet_connector::{ConnectorConfig, KafkaOptions, KafkaSink, Metrics, Readiness};
use tickfleet_service::{
    CancellationToken, Health, init_tracing, serve_admin, shutdown_on_signals,
};

/// Read an exchange's trades over WebSocket (Binance, Coinbase Exchange, Kraken v2) and produce each as a
/// tick to Kafka, keyed by its BASE-QUOTE symbol. `tickfleet-connector poll` runs the provider polling
/// jobs instead (see `tickfleet-connector poll --help`).
///
/// Every option is also an environment variable (shown in brackets). SIGTERM or SIGINT: stop reading,
/// wait for every Kafka acknowledgement, exit 0 (1 when the drain times out); a second signal exits at
/// once.
#[derive(Parser, Debug)]
#[command(name = "tickfleet-connector", version, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    config: ConnectorConfig,
}

/// Run the provider polling jobs stored in Redis (created with `POST /v1/prices/poll` or the
/// CreatePollJob gRPC method): Finnhub, Alpha Vantage and Yahoo Finance quotes, each new price produced
/// to Kafka as a tick. Run several replicas: each (provider, symbol) is polled by one at a time, under a
/// lease with a TTL and a fencing token; a dead holder's pairs are taken over when its lease expires.
///
/// Every option is also an environment variable (shown in brackets). SIGTERM or SIGINT: stop polling,
/// release the leases, wait for every Kafka acknowledgement, exit 0 (1 when the drain times out).
#[derive(Parser, Debug)]
#[command(name = "tickfleet-connector poll", version, args_override_self = true)]
struct PollCli {
    #[command(flatten)]
    config: PollConfig,
}

/// What both modes start the same way, once tracing is up.
struct Started {
    sink: KafkaSink,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
}

/// Starts the signal handling, the Kafka sink to `topic` (its delivery failures make the process not
/// ready) and the admin endpoint on `admin_addr` (`/healthz`, `/readyz`, and `/metrics` of `metrics`):
/// the part of either mode's configuration they share.
async fn start(
    kafka: &KafkaOptions,
    topic: &str,
    format: tickfleet_proto::Format,
    admin_addr: SocketAddr,
    metrics: &Metrics,
) -> anyhow::Result<Started> {
    let shutdown = shutdown_on_signals();
    let health = Health::new();
    health.mirror_ready(metrics.ready.clone());
    let readiness = Readiness::new(health.clone());
    let sink = KafkaSink::new(
        &kafka.client_config(KafkaSink::DEFAULTS),
        topic,
        format,
        metrics.clone(),
        readiness.clone(),
    )?;
    let (admin, _) = serve_admin(
        admin_addr,
        metrics.registry.clone(),
        health,
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%admin, %topic, "admin endpoint up");
    Ok(Started {
        sink,
        readiness,
        shutdown,
    })
}

/// Exits as the drain went: 0 once Kafka acknowledged everything produced, 1 when it did not.
fn drained<E: std::fmt::Display>(outcome: Result<(), E>, what: &str) -> anyhow::Result<()> {
    match outcome {
        Ok(()) => {
            tracing::info!("drained: every {what} was acknowledged by Kafka");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "shutdown drain failed");
            std::process::exit(1)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "poll") {
        args.remove(1);
        return poll(PollCli::parse_from(args).config).await;
    }
    let Cli { config } = Cli::parse_from(args);
    init_tracing(config.log_format == "json");
    let exchange = config.exchange;
    let metrics = Metrics::new(exchange.name());
    let venue = exchange.venue(&config.symbols);
    let c = &config;
    let started = start(&c.kafka, &c.topic, c.format, c.admin_addr, &metrics).await?;
    tracing::info!(exchange = exchange.name(), "reading the exchange's trades");
    let outcome = tickfleet_connector::run(
        &config,
        venue.as_ref(),
        Arc::new(started.sink),
        &metrics,
        started.readiness,
        started.shutdown,
    )
    .await;
    drained(outcome, "trade read")
}

async fn poll(config: PollConfig) -> anyhow::Result<()> {
    init_tracing(config.log_format == "json");
    let metrics = Metrics::new("poll");
    let poll_metrics = PollMetrics::new(&metrics);
    let store = Arc::new(
        config
            .redis
            .open(tickfleet_store::Retention::default())?
            .jobs(),
    );
    let c = &config;
    let started = start(&c.kafka, &c.topic, c.format, c.admin_addr, &metrics).await?;
    let outcome = tickfleet_connector::poll::run(
        config,
        store,
        started.sink,
        poll_metrics,
        started.readiness,
        started.shutdown,
    )
    .await;
    drained(outcome, "tick produced")
}
