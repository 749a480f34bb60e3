//! Worker configuration: every setting is a flag and a `TICKFLEET_*` environment variable (`--help` lists
//! them with their defaults).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use rdkafka::ClientConfig;
use tickfleet_proto::{Format, Limits};
use tickfleet_store::{ReplicaAckOptions, Retention, RollupRetention, StoreOptions};

use crate::lane::{Backoff, LaneConfig};

pub use tickfleet_service::kafka::KafkaOptions;

/// Everything the worker needs.
#[derive(Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaOptions,
    /// Topic to consume.
    #[arg(long, env = "TICKFLEET_TOPIC", default_value = "ticks")]
    pub topic: String,
    /// Consumer group shared by all workers of a pipeline.
    #[arg(long, env = "TICKFLEET_GROUP", default_value = "tickfleet-workers")]
    pub group: String,
    /// Consumer group protocol: `classic` (cooperative-sticky, assigned by a group member) or
    /// `consumer` (KIP-848: the broker assigns and moves only what changes; Kafka 4.0 or later; the
    /// session timeout is then the broker's `group.consumer.session.timeout.ms`).
    #[arg(long, env = "TICKFLEET_GROUP_PROTOCOL", default_value = "classic", value_parser = ["classic", "consumer"])]
    pub group_protocol: String,
    /// Payload format: protobuf (tickfleet.v1.Tick) or json ({"symbol","price","timestamp","source"}).
    #[arg(long, env = "TICKFLEET_FORMAT", default_value = "protobuf")]
    pub format: Format,
    /// Dead-letter topic (default: the topic's name and `.dlq`).
    #[arg(
        long,
        env = "TICKFLEET_DLQ_TOPIC",
        help = "Dead-letter topic [default: <topic>.dlq]"
    )]
    pub dlq_topic: Option<String>,
    /// Most ticks per store write.
    #[arg(long, env = "TICKFLEET_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// How long a partition's batch waits to fill, in milliseconds.
    #[arg(long, env = "TICKFLEET_BATCH_LINGER_MS", default_value_t = 20)]
    pub batch_linger_ms: u64,
    /// How often stored offsets are committed, in milliseconds (also on revoke and shutdown).
    #[arg(long, env = "TICKFLEET_COMMIT_INTERVAL_MS", default_value_t = 500)]
    pub commit_interval_ms: u64,
    /// Upper bound on a graceful drain (SIGTERM, or a revoked partition), in seconds.
    #[arg(long, env = "TICKFLEET_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Messages buffered per partition between the consumer and its lane.
    #[arg(long, env = "TICKFLEET_LANE_CAPACITY", default_value_t = 2000)]
    pub lane_capacity: usize,
    /// Largest accepted message, in bytes.
    #[arg(long, env = "TICKFLEET_MAX_PAYLOAD_BYTES", default_value_t = 64 * 1024)]
    pub max_payload_bytes: usize,
    /// Most bytes (keys and payloads) of consumed, not yet stored messages over all partitions; above
    /// it every partition is paused until half of it is free.
    #[arg(long, env = "TICKFLEET_MAX_IN_FLIGHT_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_in_flight_bytes: u64,
    /// Dead-letter (reason clock_skew) ticks dated more than this many seconds after the worker's clock.
    #[arg(long, env = "TICKFLEET_MAX_SKEW_AHEAD_SECS", default_value_t = 300)]
    pub max_skew_ahead_secs: u64,
    /// Dead-letter (reason clock_skew) ticks dated more than this many seconds before the worker's clock
    /// [default: 365 days].
    #[arg(long, env = "TICKFLEET_MAX_SKEW_BEHIND_SECS", default_value_t = 365 * 86_400)]
    pub max_skew_behind_secs: u64,
    /// The store.
    #[command(flatten)]
    pub store: StoreOptions,
    /// How many replicas must hold a batch before its offsets may be committed.
    #[command(flatten)]
    pub replica_acks: ReplicaAckOptions,
    /// Keep ticks at most this many seconds back from each asset's newest tick (bounded by the worker's clock).
    #[arg(long, env = "TICKFLEET_RETENTION_MAX_AGE_SECS")]
    pub retention_max_age_secs: Option<u64>,
    /// Keep at most this many ticks per asset.
    #[arg(long, env = "TICKFLEET_RETENTION_MAX_COUNT")]
    pub retention_max_count: Option<u64>,
    /// How long candle rollups are kept per base interval, counted like raw retention and separate
    /// from it: `1s=7d,1m=400d,1h=forever,1d=forever` (the default; bases not named keep theirs).
    #[arg(long, env = "TICKFLEET_ROLLUP_RETENTION", default_value = "", value_parser = RollupRetention::parse)]
    pub rollup_retention: RollupRetention,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, env = "TICKFLEET_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "TICKFLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn secs_to_ns(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1_000_000_000)).unwrap_or(i64::MAX)
}

impl WorkerConfig {
    /// The dead-letter topic name.
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| tickfleet_service::kafka::dead_letter_topic(&self.topic))
    }

    /// The store retention policy.
    pub fn retention(&self) -> Retention {
        Retention {
            max_age: self.retention_max_age_secs.map(Duration::from_secs),
            max_count: self.retention_max_count,
        }
    }

    /// The drain bound.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// How lanes batch and decode.
    pub fn lane(&self) -> LaneConfig {
        LaneConfig {
            batch_size: self.batch_size as usize,
            linger: Duration::from_millis(self.batch_linger_ms),
            format: self.format,
            limits: Limits {
                max_payload_bytes: self.max_payload_bytes,
                max_ahead_ns: secs_to_ns(self.max_skew_ahead_secs),
                max_behind_ns: secs_to_ns(self.max_skew_behind_secs),
                ..Limits::default()
            },
            backoff: Backoff::default(),
        }
    }

    /// The consumer's librdkafka config.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut defaults = vec![
            ("group.id", self.group.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            // Bound what librdkafka prefetches, so a backlog costs Kafka disk, not worker memory.
            ("queued.max.messages.kbytes", "8192"),
            // librdkafka statistics feed the per-partition consumer lag metric; every 5 s is finer than
            // any scrape interval worth having and costs one small JSON document per interval.
            ("statistics.interval.ms", "5000"),
        ];
        if self.group_protocol == "consumer" {
            // Assignment and session timeout are the broker's under KIP-848; librdkafka refuses the
            // classic settings.
            defaults.push(("group.protocol", "consumer"));
        } else {
            defaults.push(("partition.assignment.strategy", "cooperative-sticky"));
            defaults.push(("session.timeout.ms", "10000"));
        }
        self.kafka.client_config(&defaults)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: WorkerConfig,
    }

    fn consumer(args: &[&str]) -> ClientConfig {
        Cli::try_parse_from(std::iter::once("tickfleet-worker").chain(args.iter().copied()))
            .expect("valid flags")
            .config
            .consumer_config()
    }

    #[test]
    fn the_classic_group_protocol_is_cooperative_sticky_by_default() {
        let c = consumer(&[]);
        assert_eq!(
            c.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(c.get("session.timeout.ms"), Some("10000"));
        assert_eq!(c.get("group.protocol"), None);
    }

    #[test]
    fn kip848_leaves_assignment_and_session_timeout_to_the_broker() {
        let c = consumer(&["--group-protocol", "consumer"]);
        assert_eq!(c.get("group.protocol"), Some("consumer"));
        assert_eq!(c.get("partition.assignment.strategy"), None);
        assert_eq!(c.get("session.timeout.ms"), None);
        assert!(
            Cli::try_parse_from(["tickfleet-worker", "--group-protocol", "eager"]).is_err(),
            "only classic and consumer are accepted"
        );
    }
}
