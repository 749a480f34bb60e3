//! Real trades in, end to end with the real binaries: a local WebSocket server speaking each venue's
//! documented protocol (`connector/tests/fixtures/*.script`: subscribe, trades, pings, malformed frames, a
//! disconnect mid-stream, a replay of trades already sent, a gap) → `tickfleet-connector` → Apache Kafka
//! (the run's shared broker) → `tickfleet-worker` → redis-server, read back with `tickctl ticks` and
//! `tickctl candles` through `tickfleet-api`: every fixture trade stored exactly once, gaps and rejected
//! frames counted, and SIGTERM drains (every trade read is acknowledged) and exits 0.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rust_decimal::Decimal;
use tickfleet_connector::replay::{ReplayServer, Script};
use tickfleet_e2e::{
    Api, Worker, WorkerSetup, bin, free_port, http_get, metric_sum, redis_url, shared_topic,
    signal, tickctl_json, wait_exit, wait_for,
};

struct Connector {
    child: Child,
    admin: String,
    log: std::path::PathBuf,
}

impl Connector {
    fn metric(&self, name: &str) -> f64 {
        http_get(&self.admin, "/metrics")
            .map(|m| metric_sum(&m, name))
            .unwrap_or(0.0)
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn m(name: &str) -> String {
    format!("tickfleet_connector_{name}")
}

fn venue_end_to_end(venue: &str, path: &str) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(format!(
        "{}/connector/tests/fixtures/{venue}.script",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let script = Script::parse(&text).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(ReplayServer::start(
            "127.0.0.1:0".parse().unwrap(),
            script.clone(),
        ))
        .unwrap();

    let (bootstrap, topic) = shared_topic(&format!("connector-{venue}"), 3);
    let setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    let worker = Worker::start(&setup, 0);
    let admin = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("connector.log");
    let child = Command::new(bin("tickfleet-connector"))
        .args([
            "--exchange",
            venue,
            "--symbols",
            "BTC-USDT,ETH-USDT,SOL-USDT",
        ])
        .args(["--ws-url", &server.url(path)])
        .args(["--brokers", &bootstrap, "--topic", &topic])
        .args(["--admin-addr", &admin])
        .args(["--reconnect-min-ms", "20", "--reconnect-max-ms", "200"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start tickfleet-connector");
    let mut connector = Connector { child, admin, log };

    let count = |k: &str| script.expected(k);
    let stored = count("stored") as f64;
    wait_for(
        Duration::from_secs(120),
        Duration::from_millis(200),
        "every fixture trade produced and stored",
        || {
            (server.finished()
                && connector.metric(&m("trades_produced_total")) >= count("received") as f64
                && worker.metric("tickfleet_worker_ticks_stored_total") >= stored)
                .then_some(())
        },
    );
    let ready = http_get(&connector.admin, "/readyz").unwrap_or_default();
    assert!(ready.contains("ready"), "/readyz while subscribed: {ready}");

    // the connector's counts are the script's
    assert_eq!(
        connector.metric(&m("trades_received_total")),
        count("received") as f64
    );
    assert_eq!(
        connector.metric(&m("trades_produced_total")),
        count("received") as f64
    );
    assert_eq!(
        connector.metric(&m("frames_rejected_total")),
        count("rejected") as f64
    );
    assert_eq!(
        connector.metric(&m("trades_dropped_total")),
        count("dropped") as f64
    );
    assert_eq!(connector.metric(&m("gaps_total")), count("gaps") as f64);
    assert_eq!(
        connector.metric(&m("gap_trades_total")),
        count("gap_trades") as f64
    );
    assert_eq!(
        connector.metric(&m("trades_replayed_total")),
        count("replayed") as f64
    );
    assert_eq!(
        connector.metric(&m("reconnects_total")),
        (count("connections") - 1) as f64
    );
    assert!(connector.metric(&m("produce_latency_seconds_count")) >= count("received") as f64);

    // SIGTERM: stop reading, wait for acknowledgements, exit 0
    signal(&connector.child, "TERM");
    let status = wait_exit(&mut connector.child, Duration::from_secs(30)).expect("connector exits");
    assert!(status.success(), "{status}\n{}", connector.log_text());
    assert!(
        connector.log_text().contains("drained"),
        "{}",
        connector.log_text()
    );

    // the store holds every trade once: the worker stored exactly `stored` new ticks (replays were no-ops)
    assert_eq!(
        worker.metric("tickfleet_worker_ticks_stored_total"),
        stored,
        "{}",
        worker.log_text()
    );
    let api = Api::start(&setup.prefix, dir.path(), 0);
    let range = [
        "--from",
        "2026-11-21T00:00:00Z",
        "--to",
        "2026-11-22T00:00:00Z",
    ];
    for asset in ["BTC-USDT", "ETH-USDT", "SOL-USDT"] {
        let want = count(&format!("stored_{asset}"));
        let mut args = vec!["ticks", asset, "--all", "--limit", "1000"];
        args.extend(range);
        let ticks = tickctl_json(&api.url, &args).unwrap();
        let ticks = ticks["ticks"].as_array().unwrap();
        let seqs: HashSet<u64> = ticks.iter().map(|t| t["seq"].as_u64().unwrap()).collect();
        assert_eq!(ticks.len() as u64, want, "{venue} {asset}: stored ticks");
        assert_eq!(
            seqs.len(),
            ticks.len(),
            "{venue} {asset}: one tick per trade id"
        );
        assert!(ticks.iter().all(|t| t["source"] == venue));
        let volume: Decimal = ticks
            .iter()
            .map(|t| t["size"].as_str().unwrap().parse::<Decimal>().unwrap())
            .sum();

        let mut args = vec!["candles", asset, "--interval", "1m"];
        args.extend(range);
        let candles = tickctl_json(&api.url, &args).unwrap();
        let candles = candles["candles"].as_array().unwrap();
        let n: u64 = candles
            .iter()
            .map(|c| c["tick_count"].as_u64().unwrap())
            .sum();
        let v: Decimal = candles
            .iter()
            .map(|c| c["volume"].as_str().unwrap().parse::<Decimal>().unwrap())
            .sum();
        assert_eq!(n, want, "{venue} {asset}: candle tick counts");
        assert_eq!(v, volume, "{venue} {asset}: candle volume");
    }
    drop(server);
}

#[test]
fn binance_trades_are_stored_exactly_once() {
    venue_end_to_end("binance", "stream");
}

#[test]
fn coinbase_trades_are_stored_exactly_once() {
    venue_end_to_end("coinbase", "");
}

#[test]
fn kraken_trades_are_stored_exactly_once() {
    venue_end_to_end("kraken", "v2");
}

#[test]
fn demo_replays_a_venue_fixture_offline() {
    let out = Command::new(bin("tickctl"))
        .args(["demo", "--source", "binance", "--duration", "0.1"])
        .args(["--api-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .output()
        .expect("run tickctl demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(format!(
        "{}/connector/tests/fixtures/binance.script",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let script = Script::parse(&text).unwrap();
    let want = format!(
        "stored {} distinct ticks (the fixture holds {})",
        script.expected("stored"),
        script.expected("stored")
    );
    assert!(stdout.contains(&want), "{stdout}");
}
