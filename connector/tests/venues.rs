//! Each venue's connector against a local WebSocket server that speaks the venue's documented protocol
//! (the scripts in `tests/fixtures/`): subscribe, trades, pings, malformed frames, a server-side
//! disconnect mid-stream followed by a replay of trades already sent, and a gap. The ticks go to an
//! in-memory sink here (the Kafka path is the end-to-end test `tests/connector.rs` at the workspace root).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::Parser;
use tickfleet_connector::replay::{ReplayServer, Script};
use tickfleet_connector::{ConnectorConfig, Error, Metrics, Readiness, Sink};
use tickfleet_proto::Tick;
use tickfleet_service::{CancellationToken, Health};

#[derive(Default)]
struct Collect(Mutex<Vec<Tick>>);

#[async_trait]
impl Sink for Collect {
    async fn send(&self, tick: Tick) -> Result<(), Error> {
        self.0.lock().unwrap().push(tick);
        Ok(())
    }
    async fn flush(&self, _: Duration) -> Result<(), Error> {
        Ok(())
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    config: ConnectorConfig,
}

fn script(venue: &str) -> Script {
    let path = format!(
        "{}/tests/fixtures/{venue}.script",
        env!("CARGO_MANIFEST_DIR")
    );
    Script::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn replay(venue: &str, path: &str) {
    let script = script(venue);
    let server = ReplayServer::start("127.0.0.1:0".parse().unwrap(), script.clone())
        .await
        .unwrap();
    let config = Cli::parse_from([
        "x",
        "--exchange",
        venue,
        "--symbols",
        "BTC-USDT,ETH-USDT,SOL-USDT",
        "--ws-url",
        &server.url(path),
        "--reconnect-min-ms",
        "10",
        "--reconnect-max-ms",
        "50",
    ])
    .config;
    let metrics = Metrics::new(venue);
    let health = Health::new();
    let readiness = Readiness::new(health.clone());
    let sink = Arc::new(Collect::default());
    let stop = CancellationToken::new();
    let v = config.exchange.venue(&config.symbols);
    let task = {
        let (config, metrics, sink, stop) =
            (config.clone(), metrics.clone(), sink.clone(), stop.clone());
        tokio::spawn(async move {
            let v = config.exchange.venue(&config.symbols);
            tickfleet_connector::run(&config, v.as_ref(), sink, &metrics, readiness, stop).await
        })
    };
    drop(v);
    let received = script.expected("received");
    let started = Instant::now();
    while !(server.finished() && metrics.trades_received.get() >= received) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{venue}: script not played in 30 s: finished {}, received {}",
            server.finished(),
            metrics.trades_received.get()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(health.is_ready(), "{venue}: not ready while subscribed");
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(!health.is_ready(), "{venue}: still ready after shutdown");

    let ticks = sink.0.lock().unwrap().clone();
    let count = |name: &str| script.expected(name);
    assert_eq!(
        metrics.trades_received.get(),
        count("received"),
        "{venue}: received"
    );
    assert_eq!(
        ticks.len() as u64,
        count("received"),
        "{venue}: ticks handed on"
    );
    let rejected: u64 = metrics
        .frames_rejected
        .with_label_values(&["not_json"])
        .get()
        + [
            "unexpected",
            "bad_price",
            "bad_size",
            "bad_time",
            "unknown_symbol",
            "venue_error",
            "binary",
        ]
        .iter()
        .map(|r| metrics.frames_rejected.with_label_values(&[r]).get())
        .sum::<u64>();
    assert_eq!(rejected, count("rejected"), "{venue}: rejected frames");
    let dropped: u64 = [
        "bad_price",
        "bad_size",
        "bad_time",
        "unknown_symbol",
        "unexpected",
    ]
    .iter()
    .map(|r| metrics.dropped.with_label_values(&[r]).get())
    .sum();
    assert_eq!(dropped, count("dropped"), "{venue}: dropped trades");
    assert_eq!(metrics.gaps.get(), count("gaps"), "{venue}: gaps");
    assert_eq!(
        metrics.gap_trades.get(),
        count("gap_trades"),
        "{venue}: gap trades"
    );
    assert_eq!(
        metrics.trades_replayed.get(),
        count("replayed"),
        "{venue}: replays"
    );
    assert_eq!(
        metrics.reconnects.get(),
        count("connections") - 1,
        "{venue}: reconnects"
    );
    assert_eq!(
        server.stats.connections.load(Ordering::Relaxed),
        count("connections")
    );
    assert_eq!(
        server.stats.mismatches.load(Ordering::Relaxed),
        0,
        "{venue}: bad subscribe"
    );
    assert_eq!(
        server.stats.subscribes.load(Ordering::Relaxed),
        count("connections")
    );
    assert_eq!(
        server.stats.pongs.load(Ordering::Relaxed),
        count("pongs"),
        "{venue}: pongs"
    );

    // a replayed trade is the very same tick (same id, time, price, size): the store keeps it once
    let distinct: HashSet<&Tick> = ticks.iter().collect();
    let ids: HashSet<(&str, u64)> = ticks.iter().map(|t| (t.asset_id.as_str(), t.seq)).collect();
    assert_eq!(
        distinct.len() as u64,
        count("stored"),
        "{venue}: distinct ticks"
    );
    assert_eq!(ids.len(), distinct.len(), "{venue}: one tick per trade id");
    let mut per_asset = BTreeMap::new();
    for t in &distinct {
        *per_asset.entry(t.asset_id.clone()).or_insert(0u64) += 1;
        assert_eq!(t.source, venue);
        assert!(t.price > rust_decimal::Decimal::ZERO && t.size.is_some());
    }
    for (asset, n) in per_asset {
        assert_eq!(n, count(&format!("stored_{asset}")), "{venue}: {asset}");
    }
}

#[tokio::test]
async fn binance_fixture_replays_exactly() {
    replay("binance", "stream").await;
}

#[tokio::test]
async fn coinbase_fixture_replays_exactly() {
    replay("coinbase", "").await;
}

#[tokio::test]
async fn kraken_fixture_replays_exactly() {
    replay("kraken", "v2").await;
}

#[tokio::test]
async fn unreachable_venue_backs_off_and_shuts_down_cleanly() {
    // a port nobody listens on: connection refused, over and over, until shutdown
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = Cli::parse_from([
        "x",
        "--exchange",
        "kraken",
        "--symbols",
        "BTC-USDT",
        "--ws-url",
        &format!("ws://127.0.0.1:{port}/v2"),
        "--reconnect-min-ms",
        "5",
        "--reconnect-max-ms",
        "20",
    ])
    .config;
    let metrics = Metrics::new("kraken");
    let health = Health::new();
    let stop = CancellationToken::new();
    let task = {
        let (config, metrics, stop, health) = (
            config.clone(),
            metrics.clone(),
            stop.clone(),
            health.clone(),
        );
        tokio::spawn(async move {
            let v = config.exchange.venue(&config.symbols);
            let sink = Arc::new(Collect::default());
            tickfleet_connector::run(
                &config,
                v.as_ref(),
                sink,
                &metrics,
                Readiness::new(health),
                stop,
            )
            .await
        })
    };
    let started = Instant::now();
    while metrics.reconnects.get() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no reconnect attempts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!health.is_ready());
    stop.cancel();
    task.await.unwrap().unwrap();
}
