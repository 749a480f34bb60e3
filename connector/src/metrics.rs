//! The connector's Prometheus metrics, all `tickfleet_connector_…`, labelled by `exchange` (and a short
//! `reason` where one is given): low cardinality, no symbol labels.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of one connector process.
#[derive(Clone)]
pub struct Metrics {
    /// Where they are registered (served on `/metrics`).
    pub registry: Registry,
    /// Trades read from the venue.
    pub trades_received: IntCounter,
    /// Trades whose Kafka delivery was acknowledged.
    pub trades_produced: IntCounter,
    /// Trades (or frames) that did not become ticks, by reason.
    pub dropped: IntCounterVec,
    /// Frames that could not be read (malformed, unexpected, binary) or that reported a venue error, by
    /// reason.
    pub frames_rejected: IntCounterVec,
    /// Trades whose id was not above the last one seen for the symbol (replays after a reconnect); still
    /// produced, and stored once because their identity is the same.
    pub trades_replayed: IntCounter,
    /// Reconnects (after the first connection).
    pub reconnects: IntCounter,
    /// Gaps seen: trade-id jumps.
    pub gaps: IntCounter,
    /// Trades missing in those gaps.
    pub gap_trades: IntCounter,
    /// Kafka deliveries that failed and were retried.
    pub delivery_retries: IntCounter,
    /// Ping frames answered and application pings sent.
    pub pings: IntCounter,
    /// Trades handed to the producer and not yet acknowledged.
    pub in_flight: IntGauge,
    /// 1 while subscribed and producing.
    pub ready: IntGauge,
    /// Venue trade time to Kafka acknowledgement, seconds.
    pub latency: Histogram,
}

impl Metrics {
    /// Creates and registers the metrics for `exchange`.
    pub fn new(exchange: &str) -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| {
            Opts::new(format!("tickfleet_connector_{name}"), help).const_label("exchange", exchange)
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(opts(name, help)).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let by_reason = |name: &str, help: &str| {
            let c = IntCounterVec::new(opts(name, help), &["reason"]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(opts(name, help)).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "tickfleet_connector_produce_latency_seconds",
                "Venue trade time to Kafka acknowledgement",
            )
            .const_label("exchange", exchange)
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(latency.clone()))
            .expect("unique metric");
        Metrics {
            trades_received: counter("trades_received_total", "Trades read from the venue"),
            trades_produced: counter(
                "trades_produced_total",
                "Trades whose Kafka delivery was acknowledged",
            ),
            dropped: by_reason(
                "trades_dropped_total",
                "Trades that did not become ticks, by reason",
            ),
            frames_rejected: by_reason(
                "frames_rejected_total",
                "Frames that could not be read or that reported a venue error, by reason",
            ),
            trades_replayed: counter(
                "trades_replayed_total",
                "Trades at or below the last trade id seen for their symbol (replays); stored once",
            ),
            reconnects: counter("reconnects_total", "Reconnects to the venue"),
            gaps: counter("gaps_total", "Trade-id jumps seen"),
            gap_trades: counter("gap_trades_total", "Trades missing in the gaps seen"),
            delivery_retries: counter(
                "delivery_retries_total",
                "Kafka deliveries that failed and were retried",
            ),
            pings: counter("pings_total", "Pings answered or sent"),
            in_flight: gauge(
                "in_flight",
                "Trades handed to Kafka and not yet acknowledged",
            ),
            ready: gauge("ready", "1 while subscribed and producing"),
            latency,
            registry,
        }
    }
}
