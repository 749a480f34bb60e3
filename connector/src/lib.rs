//! `tickfleet-connector`: reads one exchange's public trade stream over WebSocket and produces every trade
//! as a [`Tick`] to the pipeline's Kafka topic.
//!
//! * [`venue`]: one module per exchange (Binance, Coinbase, Kraken) behind the [`Venue`] trait.
//! * [`run`]: connect, subscribe, read; answer pings and send the venue's keep-alive; on a disconnect or a
//!   silent connection, reconnect with exponential backoff and jitter and subscribe again.
//! * Identity: a tick's `seq` is the venue's trade id and its event time the venue's trade time, so a
//!   trade seen twice (the replay a venue sends after a reconnect, or a connector restart) is the same
//!   tick and is stored once. Trade ids increase by one per symbol on all three venues: a jump is a gap
//!   (counted in `tickfleet_connector_gaps_total` and logged), an id at or below the last one a replay
//!   (`…_trades_replayed_total`, still produced, stored once).
//! * The asset id (and Kafka key) is the normalised `BASE-QUOTE` symbol, the same for every venue: one
//!   pipeline takes each asset from one venue (the operator rejects two sources with the same symbol),
//!   so two venues' trade ids never meet in one asset's series.
//! * [`sink::KafkaSink`]: idempotent producer, murmur2 partitioner, deliveries retried until
//!   acknowledged; shutdown stops reading, waits for every delivery, flushes.
//! * [`poll`]: provider polling jobs (`tickfleet-connector poll`): Finnhub, Alpha Vantage, Yahoo Finance
//!   quotes onto the same topic, each (provider, symbol) polled by one replica at a time.
//! * [`replay`]: a local WebSocket server that plays a venue's documented messages from a script, for the
//!   tests and `tickctl demo --source`.

pub mod metrics;
pub mod poll;
pub mod replay;
pub mod sink;
pub mod venue;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::{SinkExt, StreamExt};
use rand::Rng;
use tickfleet_proto::Tick;
use tickfleet_service::CancellationToken;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

pub use metrics::Metrics;
pub use sink::{KafkaSink, Readiness, Sink};
pub use tickfleet_service::kafka::KafkaOptions;
pub use venue::{Event, Exchange, FrameError, Symbol, Trade, Venue};

/// Everything that can go wrong in the connector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kafka client failed.
    #[error("kafka: {0}")]
    Kafka(#[source] rdkafka::error::KafkaError),
    /// Shutdown's drain timed out with deliveries still unacknowledged.
    #[error("drain timed out with {0} deliveries unacknowledged")]
    Drain(i64),
    /// The sink was closed.
    #[error("the sink is closed")]
    Closed,
    /// Bad configuration.
    #[error("config: {0}")]
    Config(String),
    /// An I/O error (admin endpoint, replay server).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// The connector's flags; each is also a `TICKFLEET_*` environment variable.
#[derive(Args, Debug, Clone)]
pub struct ConnectorConfig {
    /// The exchange to read.
    #[arg(long, env = "TICKFLEET_EXCHANGE")]
    pub exchange: Exchange,
    /// Symbols as BASE-QUOTE, comma-separated (e.g. BTC-USDT,ETH-USDT,SOL-USDT).
    #[arg(
        long,
        env = "TICKFLEET_SYMBOLS",
        value_delimiter = ',',
        required = true
    )]
    pub symbols: Vec<Symbol>,
    /// WebSocket URL, instead of the exchange's public endpoint (proxies, tests).
    #[arg(long, env = "TICKFLEET_WS_URL")]
    pub ws_url: Option<String>,
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaOptions,
    /// Topic to produce to.
    #[arg(long, env = "TICKFLEET_TOPIC", default_value = "ticks")]
    pub topic: String,
    /// Payload format, the one the pipeline's workers read: protobuf (tickfleet.v1.Tick) or json.
    #[arg(long, env = "TICKFLEET_FORMAT", default_value = "protobuf")]
    pub format: tickfleet_proto::Format,
    /// First reconnect delay, in milliseconds (doubles per failed attempt, with jitter).
    #[arg(long, env = "TICKFLEET_RECONNECT_MIN_MS", default_value_t = 500)]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in milliseconds.
    #[arg(long, env = "TICKFLEET_RECONNECT_MAX_MS", default_value_t = 30_000)]
    pub reconnect_max_ms: u64,
    /// Send a keep-alive (the venue's ping, or a WebSocket ping) after this many seconds without a frame.
    #[arg(long, env = "TICKFLEET_PING_INTERVAL_SECS", default_value_t = 15)]
    pub ping_interval_secs: u64,
    /// Reconnect after this many seconds without any frame (all three venues send something at least
    /// every 20 s).
    #[arg(long, env = "TICKFLEET_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Upper bound on the shutdown drain (waiting for Kafka acknowledgements), in seconds.
    #[arg(long, env = "TICKFLEET_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, env = "TICKFLEET_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "TICKFLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl ConnectorConfig {
    /// The WebSocket URL to connect to.
    pub fn url(&self, venue: &dyn Venue) -> String {
        self.ws_url
            .clone()
            .unwrap_or_else(|| venue.default_url().to_owned())
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            min: Duration::from_millis(self.reconnect_min_ms.max(1)),
            max: Duration::from_millis(self.reconnect_max_ms.max(self.reconnect_min_ms.max(1))),
            attempt: 0,
        }
    }
}

/// Exponential backoff with "equal jitter": attempt n waits between d/2 and d, d = min(max, min·2ⁿ).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
    pub(crate) attempt: u32,
}

impl Backoff {
    pub(crate) fn next(&mut self) -> Duration {
        let d = self
            .min
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Per-symbol last trade id: tells new trades from replays and finds gaps.
#[derive(Debug, Default)]
struct Gaps {
    last: HashMap<Symbol, u64>,
}

/// What [`Gaps::see`] found.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// The next id (or the first one seen).
    Next,
    /// `missing` trades were skipped before this one.
    Gap { missing: u64, after: u64 },
    /// At or below the last id: a replay.
    Replay,
}

impl Gaps {
    fn see(&mut self, symbol: &Symbol, id: u64) -> Seen {
        match self.last.get(symbol).copied() {
            None => {
                self.last.insert(symbol.clone(), id);
                Seen::Next
            }
            Some(last) if id <= last => Seen::Replay,
            Some(last) => {
                self.last.insert(symbol.clone(), id);
                if id == last + 1 {
                    Seen::Next
                } else {
                    Seen::Gap {
                        missing: id - last - 1,
                        after: last,
                    }
                }
            }
        }
    }

    /// A venue's "last trade id so far" (Coinbase heartbeat): a gap if it is past ours.
    fn heartbeat(&mut self, symbol: &Symbol, last_trade_id: u64) -> Option<Seen> {
        match self.last.get(symbol).copied() {
            Some(last) if last_trade_id > last => Some(self.see(symbol, last_trade_id)).map(|s| {
                // the heartbeat names the last trade sent, which we did not receive either
                match s {
                    Seen::Next => Seen::Gap {
                        missing: 1,
                        after: last,
                    },
                    Seen::Gap { missing, after } => Seen::Gap {
                        missing: missing + 1,
                        after,
                    },
                    Seen::Replay => Seen::Replay,
                }
            }),
            _ => None,
        }
    }
}

/// The tick a trade becomes.
pub fn tick(trade: &Trade, source: &str) -> Tick {
    Tick {
        asset_id: trade.symbol.to_string(),
        price: trade.price,
        size: Some(trade.size),
        event_time_ns: trade.time_ns,
        seq: trade.trade_id,
        source: source.to_owned(),
    }
}

/// Reads the venue until `shutdown`, reconnecting as needed, handing every trade to `sink`; then waits
/// for the sink to deliver everything (bounded by the drain timeout).
pub async fn run(
    config: &ConnectorConfig,
    venue: &dyn Venue,
    sink: Arc<dyn Sink>,
    metrics: &Metrics,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let url = config.url(venue);
    let mut backoff = config.backoff();
    let mut gaps = Gaps::default();
    let mut first = true;
    while !shutdown.is_cancelled() {
        if !first {
            metrics.reconnects.inc();
            let wait = backoff.next();
            info!(
                exchange = venue.name(),
                wait_ms = wait.as_millis() as u64,
                "reconnecting"
            );
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        first = false;
        let session = Session {
            config,
            venue,
            sink: sink.as_ref(),
            metrics,
            readiness: &readiness,
            gaps: &mut gaps,
        };
        match session.run(&url, &shutdown).await {
            Ok(subscribed) => {
                if subscribed {
                    backoff.reset();
                }
            }
            Err(reason) => {
                warn!(exchange = venue.name(), %url, %reason, "connection failed")
            }
        }
        readiness.set_subscribed(false);
    }
    info!(
        exchange = venue.name(),
        "stopped reading; waiting for Kafka acknowledgements"
    );
    sink.flush(Duration::from_secs(config.drain_timeout_secs))
        .await
}

/// One connection.
struct Session<'a> {
    config: &'a ConnectorConfig,
    venue: &'a dyn Venue,
    sink: &'a dyn Sink,
    metrics: &'a Metrics,
    readiness: &'a Readiness,
    gaps: &'a mut Gaps,
}

impl Session<'_> {
    /// Connects, subscribes and reads until the connection ends or `shutdown`; `Ok(subscribed)` tells
    /// whether the subscription was acknowledged (which resets the backoff).
    async fn run(mut self, url: &str, shutdown: &CancellationToken) -> Result<bool, String> {
        let name = self.venue.name();
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        );
        let (mut ws, _) = tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            r = connect => r.map_err(|_| "connect timed out".to_owned())?.map_err(|e| e.to_string())?,
        };
        for msg in self.venue.subscribe() {
            ws.send(Message::text(msg))
                .await
                .map_err(|e| format!("subscribe: {e}"))?;
        }
        info!(exchange = name, %url, symbols = self.config.symbols.len(), "connected; subscribing");
        let mut subscribed = false;
        let ping_every = Duration::from_secs(self.config.ping_interval_secs.max(1));
        let idle = Duration::from_secs(self.config.idle_timeout_secs.max(1));
        let mut last_frame = tokio::time::Instant::now();
        let mut last_ping = last_frame;
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = ws.close(None).await;
                    return Ok(subscribed);
                }
                () = tokio::time::sleep_until(last_frame.max(last_ping) + ping_every) => {
                    if last_frame.elapsed() >= idle {
                        return Err(format!("no frame for {}s", idle.as_secs()));
                    }
                    let ping = match self.venue.ping() {
                        Some(text) => Message::text(text),
                        None => Message::Ping(Vec::new().into()),
                    };
                    self.metrics.pings.inc();
                    ws.send(ping).await.map_err(|e| format!("ping: {e}"))?;
                    last_ping = tokio::time::Instant::now();
                    continue;
                }
                next = ws.next() => next,
            };
            last_frame = tokio::time::Instant::now();
            let msg = match next {
                None => return Err("connection closed".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Text(text) => {
                    if self.frame(text.as_str()).await? {
                        if !subscribed {
                            info!(exchange = name, "subscribed");
                        }
                        subscribed = true;
                        self.readiness.set_subscribed(true);
                    }
                }
                Message::Ping(_) => {
                    // tungstenite queues the pong (same payload) and sends it with the next read
                    self.metrics.pings.inc();
                }
                Message::Close(frame) => {
                    info!(exchange = name, ?frame, "venue closed the connection");
                    return Ok(subscribed);
                }
                Message::Binary(_) => self.reject(&FrameError::new("binary", "binary frame"), ""),
                Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Handles one text frame; `Ok(true)` when it shows the subscription is up (an ack or trades).
    async fn frame(&mut self, text: &str) -> Result<bool, String> {
        match self.venue.parse(text) {
            Ok(Event::Trades { trades, rejected }) => {
                for e in &rejected {
                    self.metrics.dropped.with_label_values(&[e.reason]).inc();
                    warn!(exchange = self.venue.name(), reason = e.reason, detail = %e.detail, "trade dropped");
                }
                for trade in &trades {
                    self.trade(trade).await?;
                }
                Ok(!trades.is_empty())
            }
            Ok(Event::Subscribed) => Ok(true),
            Ok(Event::Heartbeat(Some((symbol, last)))) => {
                if let Some(seen) = self.gaps.heartbeat(&symbol, last) {
                    self.count(&symbol, last, &seen);
                }
                Ok(false)
            }
            Ok(Event::Heartbeat(None) | Event::Control) => Ok(false),
            Ok(Event::VenueError(message)) => {
                self.reject(&FrameError::new("venue_error", message), text);
                Ok(false)
            }
            Err(e) => {
                self.reject(&e, text);
                Ok(false)
            }
        }
    }

    async fn trade(&mut self, trade: &Trade) -> Result<(), String> {
        self.metrics.trades_received.inc();
        let seen = self.gaps.see(&trade.symbol, trade.trade_id);
        self.count(&trade.symbol, trade.trade_id, &seen);
        self.sink
            .send(tick(trade, self.venue.name()))
            .await
            .map_err(|e| e.to_string())
    }

    fn count(&self, symbol: &Symbol, id: u64, seen: &Seen) {
        match seen {
            Seen::Next => {}
            Seen::Replay => {
                self.metrics.trades_replayed.inc();
                debug!(exchange = self.venue.name(), %symbol, trade_id = id, "replayed trade");
            }
            Seen::Gap { missing, after } => {
                self.metrics.gaps.inc();
                self.metrics.gap_trades.inc_by(*missing);
                warn!(exchange = self.venue.name(), %symbol, after_trade_id = after, trade_id = id, missing, "gap in the venue's trade ids");
            }
        }
    }

    fn reject(&self, e: &FrameError, text: &str) {
        self.metrics
            .frames_rejected
            .with_label_values(&[e.reason])
            .inc();
        let frame: String = text.chars().take(200).collect();
        warn!(exchange = self.venue.name(), reason = e.reason, detail = %e.detail, %frame, "frame rejected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_replays_are_told_apart() {
        let mut g = Gaps::default();
        let s: Symbol = "BTC-USDT".parse().unwrap();
        let e: Symbol = "ETH-USDT".parse().unwrap();
        assert_eq!(g.see(&s, 10), Seen::Next);
        assert_eq!(g.see(&s, 11), Seen::Next);
        assert_eq!(g.see(&e, 500), Seen::Next);
        assert_eq!(
            g.see(&s, 15),
            Seen::Gap {
                missing: 3,
                after: 11
            }
        );
        assert_eq!(g.see(&s, 12), Seen::Replay);
        assert_eq!(g.see(&s, 15), Seen::Replay);
        assert_eq!(g.see(&s, 16), Seen::Next);
        // heartbeat: last trade 18 sent, we have 16: 17 and 18 are missing
        assert_eq!(
            g.heartbeat(&s, 18),
            Some(Seen::Gap {
                missing: 2,
                after: 16
            })
        );
        assert_eq!(g.heartbeat(&s, 18), None);
        assert_eq!(g.see(&s, 19), Seen::Next);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            attempt: 0,
        };
        for cap in [100u64, 200, 400, 800, 1000, 1000] {
            let d = b.next();
            let cap = Duration::from_millis(cap);
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
