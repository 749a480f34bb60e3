//! `tickfleet-connector`: one exchange's public trade stream onto the pipeline's Kafka topic, or (`poll`)
//! the provider polling jobs. See `--help` and `poll --help`.

use std::ffi::OsString;
use std::sync::Arc;

use clap::Parser;
use tickfleet_connector::poll::{PollConfig, PollMetrics};
use tickfleet_connector::{ConnectorConfig, KafkaSink, Metrics, Readiness};
use tickfleet_service::{Health, init_tracing, serve_admin, shutdown_on_signals};

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "poll") {
        args.remove(1);
        return poll(PollCli::parse_from(args).config).await;
    }
    let Cli { config } = Cli::parse_from(args);
    init_tracing(config.log_format == "json");
    let shutdown = shutdown_on_signals();
    let exchange = config.exchange;
    let metrics = Metrics::new(exchange.name());
    let health = Health::new();
    health.mirror_ready(metrics.ready.clone());
    let readiness = Readiness::new(health.clone());
    let venue = exchange.venue(&config.symbols);
    let sink = KafkaSink::new(
        &config.kafka.client_config(KafkaSink::DEFAULTS),
        &config.topic,
        config.format,
        metrics.clone(),
        readiness.clone(),
    )?;
    let (admin, _) = serve_admin(
        config.admin_addr,
        metrics.registry.clone(),
        health,
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%admin, exchange = exchange.name(), topic = %config.topic, "admin endpoint up");
    match tickfleet_connector::run(
        &config,
        venue.as_ref(),
        Arc::new(sink),
        &metrics,
        readiness,
        shutdown,
    )
    .await
    {
        Ok(()) => {
            tracing::info!("drained: every trade read was acknowledged by Kafka");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "shutdown drain failed");
            std::process::exit(1)
        }
    }
}

async fn poll(config: PollConfig) -> anyhow::Result<()> {
    init_tracing(config.log_format == "json");
    let shutdown = shutdown_on_signals();
    let metrics = Metrics::new("poll");
    let poll_metrics = PollMetrics::new(&metrics);
    let health = Health::new();
    health.mirror_ready(metrics.ready.clone());
    let readiness = Readiness::new(health.clone());
    let store = Arc::new(
        config
            .redis
            .open(tickfleet_store::Retention::default())?
            .jobs(),
    );
    let sink = KafkaSink::new(
        &config.kafka.client_config(KafkaSink::DEFAULTS),
        &config.topic,
        config.format,
        metrics.clone(),
        readiness.clone(),
    )?;
    let (admin, _) = serve_admin(
        config.admin_addr,
        metrics.registry.clone(),
        health,
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%admin, topic = %config.topic, "admin endpoint up");
    match tickfleet_connector::poll::run(config, store, sink, poll_metrics, readiness, shutdown)
        .await
    {
        Ok(()) => {
            tracing::info!("drained: every tick produced was acknowledged by Kafka");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "shutdown drain failed");
            std::process::exit(1)
        }
    }
}
