//! `tickfleet-connector`: one exchange's public trade stream onto the pipeline's Kafka topic. See `--help`.

use clap::Parser;
use tickfleet_connector::{ConnectorConfig, KafkaSink, Metrics, Readiness};
use tickfleet_service::{Health, init_tracing, serve_admin, shutdown_on_signals};

/// Read an exchange's trades over WebSocket (Binance, Coinbase Exchange, Kraken v2) and produce each as a
/// tick to Kafka, keyed by its BASE-QUOTE symbol.
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { config } = Cli::parse();
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
        std::sync::Arc::new(sink),
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
