//! `tickfleet-worker`: consumes ticks from Kafka and stores them in Redis. See `--help`.

use clap::Parser;
use tickfleet_service::{Health, init_tracing, serve_admin, shutdown_on_signals};
use tickfleet_worker::{Drain, Metrics, WorkerConfig};

/// Consume ticks from a Kafka topic and store each exactly once in effect in Redis.
///
/// Every option is also an environment variable (shown in brackets). SIGTERM or SIGINT drains: stop
/// fetching, store and commit what is in flight, leave the group, exit 0; a second signal exits at once.
#[derive(Parser, Debug)]
#[command(name = "tickfleet-worker", version, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { config } = Cli::parse();
    init_tracing(config.log_format == "json");
    let shutdown = shutdown_on_signals();
    let metrics = Metrics::new();
    let health = Health::new();
    let store = config.store.open_with_acks(
        config.retention(),
        config.rollup_retention,
        &config.replica_acks,
    )?;
    let (admin, _) = serve_admin(
        config.admin_addr,
        metrics.registry.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%admin, "admin endpoint up");
    match tickfleet_worker::run(&config, store, None, metrics, health, shutdown).await? {
        Drain::Clean => Ok(()),
        Drain::TimedOut | Drain::CommitFailed => std::process::exit(1),
    }
}
