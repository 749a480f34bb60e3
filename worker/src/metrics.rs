//! The worker's Prometheus metrics. Labels stay low-cardinality: topic, partition, reason, kind, outcome,
//! trigger — never asset id.
//!
//! There is no `pipeline` label here on purpose: which pipeline a worker belongs to is a fact of where it
//! runs, so the scrape sets it as a target label (the chart's PodMonitor from the TickPipeline's name,
//! docker-compose's Prometheus as `compose`). A label the process exposed itself would collide with that
//! target label and be renamed `exported_pipeline`.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    exponential_buckets,
};

/// Every metric the worker exports, registered in one [`Registry`].
#[derive(Clone, Debug)]
pub struct Metrics {
    /// The registry the admin endpoint serves.
    pub registry: Registry,
    /// Messages taken from Kafka, by topic and partition.
    pub consumed: IntCounterVec,
    /// Ticks newly written to the store, by topic and partition.
    pub stored: IntCounterVec,
    /// Ticks the store already had (redeliveries), by topic and partition.
    pub duplicates: IntCounterVec,
    /// Messages sent to the dead-letter topic, by reason.
    pub dead_lettered: IntCounterVec,
    /// Failed store writes (each retried), by error kind.
    pub store_errors: IntCounterVec,
    /// Ticks per store write.
    pub batch_size: Histogram,
    /// Store write latency in seconds, by outcome.
    pub write_seconds: HistogramVec,
    /// Partitions currently assigned to this worker.
    pub assigned_partitions: IntGauge,
    /// Rebalance events, by kind (assign, revoke).
    pub rebalances: IntCounterVec,
    /// Messages taken from Kafka and not yet stored.
    pub in_flight: IntGauge,
    /// Bytes (key and payload) of the messages taken from Kafka and not yet stored, over all partitions;
    /// kept under `--max-in-flight-bytes`.
    pub in_flight_bytes: IntGauge,
    /// Failed dead-letter sends, by reason (`unwritable`: the topic is missing or forbidden, the
    /// partition stops; `unavailable`: the broker is unreachable, retried).
    pub dead_letter_failures: IntCounterVec,
    /// Last committed offset, by topic and partition.
    pub committed_offset: IntGaugeVec,
    /// Consumer lag (messages in the partition past the committed offset), by topic and partition, from
    /// librdkafka's statistics; only for partitions assigned to this worker.
    pub consumer_lag: IntGaugeVec,
    /// 1 while the worker is ready (`/readyz` answers 200), else 0.
    pub ready: IntGauge,
    /// Offset commit failures.
    pub commit_failures: IntCounterVec,
    /// How long the last drain took, in seconds.
    pub drain_seconds: prometheus::Gauge,
}

impl Metrics {
    /// Creates and registers the worker metrics in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let consumed = counter(
            "tickfleet_worker_messages_consumed_total",
            "Messages taken from Kafka.",
            &["topic", "partition"],
        );
        let stored = counter(
            "tickfleet_worker_ticks_stored_total",
            "Ticks newly written to the store.",
            &["topic", "partition"],
        );
        let duplicates = counter(
            "tickfleet_worker_ticks_duplicate_total",
            "Redelivered ticks the store already had (no effect).",
            &["topic", "partition"],
        );
        let dead_lettered = counter(
            "tickfleet_worker_messages_dead_lettered_total",
            "Messages sent to the dead-letter topic.",
            &["reason"],
        );
        let store_errors = counter(
            "tickfleet_worker_store_errors_total",
            "Failed store writes (kind rejected: dead-lettered as store_rejected; others retried).",
            &["kind"],
        );
        let dead_letter_failures = counter(
            "tickfleet_worker_dead_letter_failures_total",
            "Failed dead-letter sends; the partition does not move past the message until one succeeds.",
            &["reason"],
        );
        let rebalances = counter(
            "tickfleet_worker_rebalances_total",
            "Consumer group rebalance events.",
            &["kind"],
        );
        let commit_failures = counter(
            "tickfleet_worker_commit_failures_total",
            "Offset commits Kafka refused (the next owner re-reads; writes are idempotent).",
            &["trigger"],
        );
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "tickfleet_worker_batch_size_ticks",
                "Ticks per store write.",
            )
            .buckets(exponential_buckets(1.0, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        registry
            .register(Box::new(batch_size.clone()))
            .expect("unique metric");
        let write_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tickfleet_worker_store_write_seconds",
                "Store write latency.",
            )
            .buckets(exponential_buckets(0.0001, 2.0, 16).expect("valid buckets")),
            &["outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(write_seconds.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let assigned_partitions = gauge(
            "tickfleet_worker_assigned_partitions",
            "Partitions assigned to this worker.",
        );
        let in_flight = gauge(
            "tickfleet_worker_in_flight_messages",
            "Messages consumed and not yet stored.",
        );
        let in_flight_bytes = gauge(
            "tickfleet_worker_in_flight_bytes",
            "Bytes of the messages consumed and not yet stored, over all partitions.",
        );
        let committed_offset = IntGaugeVec::new(
            Opts::new(
                "tickfleet_worker_committed_offset",
                "Last offset committed (the next offset to read).",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(committed_offset.clone()))
            .expect("unique metric");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "tickfleet_worker_consumer_lag_messages",
                "Messages in an assigned partition past the committed offset (librdkafka statistics).",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(consumer_lag.clone()))
            .expect("unique metric");
        let ready = gauge(
            "tickfleet_worker_ready",
            "1 while the worker is ready (/readyz answers 200).",
        );
        let drain_seconds = prometheus::Gauge::new(
            "tickfleet_worker_drain_seconds",
            "Duration of the last drain.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(drain_seconds.clone()))
            .expect("unique metric");
        // Start the counters whose label values are known at 0, so `rate()`/`increase()` see their first
        // increment and dashboards show 0 rather than "no data" on a healthy worker.
        for kind in ["redis", "rejected", "corrupt"] {
            // StoreError::kind() of the real stores ("injected" exists only in tests)
            store_errors.with_label_values(&[kind]);
        }
        for reason in ["unwritable", "unavailable"] {
            dead_letter_failures.with_label_values(&[reason]);
        }
        for trigger in ["periodic", "revoke", "shutdown"] {
            commit_failures.with_label_values(&[trigger]);
        }
        for kind in ["assign", "revoke"] {
            rebalances.with_label_values(&[kind]);
        }
        Metrics {
            registry,
            consumed,
            stored,
            duplicates,
            dead_lettered,
            store_errors,
            batch_size,
            write_seconds,
            assigned_partitions,
            rebalances,
            in_flight,
            in_flight_bytes,
            dead_letter_failures,
            committed_offset,
            consumer_lag,
            ready,
            commit_failures,
            drain_seconds,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
