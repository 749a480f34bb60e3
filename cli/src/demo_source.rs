//! `tickctl demo --source EXCHANGE`: instead of the generator, real-format trades — the exchange's
//! recorded-format fixture (the script the connector's tests play, written from the venue's documentation)
//! served by a local replay WebSocket server and read by the real connector code into the demo's topic.
//! Works offline; nothing here talks to the venue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::out::sayln;
use tickfleet_connector::replay::{self, ReplayServer, Script};
use tickfleet_connector::{ConnectorConfig, Exchange, KafkaSink, Metrics, Readiness, Symbol};
use tickfleet_service::{CancellationToken, Health};
use tickfleet_worker::KafkaOptions;

/// What a replay did.
pub struct Replayed {
    /// Trades the connector read (replays included).
    pub received: u64,
    /// Trades Kafka acknowledged.
    pub produced: u64,
    /// Distinct trades the fixture holds: what the store should hold.
    pub expected_stored: u64,
}

/// The symbols every fixture trades.
pub const SYMBOLS: [&str; 3] = ["BTC-USDT", "ETH-USDT", "SOL-USDT"];

/// Replays `exchange`'s fixture through the connector into `topic`, printing progress, until the script
/// is over (or `stop`); then drains the producer.
pub async fn replay(
    exchange: Exchange,
    kafka: &KafkaOptions,
    topic: &str,
    stop: &CancellationToken,
) -> anyhow::Result<Replayed> {
    let (text, path) = replay::fixture(exchange);
    let script = Script::parse(text)?;
    let server = ReplayServer::start("127.0.0.1:0".parse()?, script.clone()).await?;
    let symbols = SYMBOLS
        .iter()
        .map(|s| s.parse::<Symbol>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let config = ConnectorConfig {
        exchange,
        symbols,
        ws_url: Some(server.url(path)),
        kafka: kafka.clone(),
        topic: topic.to_owned(),
        format: tickfleet_proto::Format::Protobuf,
        reconnect_min_ms: 20,
        reconnect_max_ms: 200,
        ping_interval_secs: 15,
        idle_timeout_secs: 60,
        drain_timeout_secs: 30,
        admin_addr: "127.0.0.1:0".parse()?,
        log_format: "text".into(),
    };
    let metrics = Metrics::new(exchange.name());
    let readiness = Readiness::new(Health::new());
    let sink = Arc::new(KafkaSink::new(
        &kafka.client_config(KafkaSink::DEFAULTS),
        topic,
        tickfleet_proto::Format::Protobuf,
        metrics.clone(),
        readiness.clone(),
    )?);
    sayln!(
        "  source  {} fixture ({} script steps) from a local replay server at {}",
        exchange.name(),
        script.steps.len(),
        server.url(path)
    );
    let connector_stop = stop.child_token();
    let task = {
        let (metrics, connector_stop) = (metrics.clone(), connector_stop.clone());
        tokio::spawn(async move {
            let venue = config.exchange.venue(&config.symbols);
            tickfleet_connector::run(
                &config,
                venue.as_ref(),
                sink,
                &metrics,
                readiness,
                connector_stop,
            )
            .await
        })
    };
    let want = script.expected("received");
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = || server.finished() && metrics.trades_produced.get() >= want;
    while !done() && !stop.is_cancelled() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    connector_stop.cancel();
    task.await??;
    sayln!(
        "  source  read {} trades ({} replays after the reconnect), {} gaps ({} trades missing), {} frames rejected, {} reconnects",
        metrics.trades_received.get(),
        metrics.trades_replayed.get(),
        metrics.gaps.get(),
        metrics.gap_trades.get(),
        crate::demo::counter_total(&metrics.frames_rejected),
        metrics.reconnects.get(),
    );
    Ok(Replayed {
        received: metrics.trades_received.get(),
        produced: metrics.trades_produced.get(),
        expected_stored: script.expected("stored"),
    })
}
