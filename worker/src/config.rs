//! Worker configuration: every setting is a flag and a `TICKFLEET_*` environment variable (`--help` lists
//! them with their defaults).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use rdkafka::ClientConfig;
use tickfleet_proto::{Format, Limits};
use tickfleet_store::{RedisOptions, Retention};

use crate::lane::{Backoff, LaneConfig};

/// How to reach Kafka: bootstrap servers, security, and any extra librdkafka property.
/// Shared by the worker and `tickctl`.
#[derive(Args, Debug, Clone)]
pub struct KafkaOptions {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "TICKFLEET_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Kafka security protocol (plaintext, ssl, sasl_plaintext, sasl_ssl).
    #[arg(long, env = "TICKFLEET_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<String>,
    /// SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).
    #[arg(long, env = "TICKFLEET_KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,
    /// SASL username.
    #[arg(long, env = "TICKFLEET_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// SASL password (prefer the environment variable, from a Secret, to the flag).
    #[arg(long, env = "TICKFLEET_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
    /// Extra librdkafka properties, `key=value`, comma-separated or repeated; they win over tickfleet's defaults.
    #[arg(long = "kafka-option", env = "TICKFLEET_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    pub kafka_options: Vec<(String, String)>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

impl KafkaOptions {
    /// Options for `brokers` with nothing else set.
    pub fn new(brokers: &str) -> Self {
        KafkaOptions {
            brokers: brokers.to_owned(),
            kafka_security_protocol: None,
            kafka_sasl_mechanism: None,
            kafka_sasl_username: None,
            kafka_sasl_password: None,
            kafka_options: Vec::new(),
        }
    }

    /// A librdkafka client config with the servers and security set; `defaults` are applied before the
    /// user's `--kafka-option`s, so users can override them.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (key, value) in [
            ("security.protocol", &self.kafka_security_protocol),
            ("sasl.mechanism", &self.kafka_sasl_mechanism),
            ("sasl.username", &self.kafka_sasl_username),
            ("sasl.password", &self.kafka_sasl_password),
        ] {
            if let Some(v) = value {
                c.set(key, v);
            }
        }
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.kafka_options {
            c.set(k, v);
        }
        c
    }
}

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
    /// Payload format: protobuf (tickfleet.v1.Tick) or json ({"symbol","price","timestamp","source"}).
    #[arg(long, env = "TICKFLEET_FORMAT", default_value = "protobuf")]
    pub format: Format,
    /// Dead-letter topic [default: <topic>.dlq].
    #[arg(long, env = "TICKFLEET_DLQ_TOPIC")]
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
    /// Reject ticks whose event time is further than this from the worker's clock, in seconds.
    #[arg(long, env = "TICKFLEET_MAX_SKEW_SECS")]
    pub max_skew_secs: Option<u64>,
    /// The store.
    #[command(flatten)]
    pub redis: RedisOptions,
    /// Keep ticks at most this many seconds back from each asset's newest tick.
    #[arg(long, env = "TICKFLEET_RETENTION_MAX_AGE_SECS")]
    pub retention_max_age_secs: Option<u64>,
    /// Keep at most this many ticks per asset.
    #[arg(long, env = "TICKFLEET_RETENTION_MAX_COUNT")]
    pub retention_max_count: Option<u64>,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, env = "TICKFLEET_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "TICKFLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl WorkerConfig {
    /// The dead-letter topic name.
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.topic))
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
                max_skew_ns: self
                    .max_skew_secs
                    .map(|s| i64::try_from(s.saturating_mul(1_000_000_000)).unwrap_or(i64::MAX)),
                ..Limits::default()
            },
            backoff: Backoff::default(),
        }
    }

    /// The consumer's librdkafka config.
    pub fn consumer_config(&self) -> ClientConfig {
        self.kafka.client_config(&[
            ("group.id", &self.group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("session.timeout.ms", "10000"),
            // Bound what librdkafka prefetches, so a backlog costs Kafka disk, not worker memory.
            ("queued.max.messages.kbytes", "8192"),
            // librdkafka statistics feed the per-partition consumer lag metric; every 5 s is finer than
            // any scrape interval worth having and costs one small JSON document per interval.
            ("statistics.interval.ms", "5000"),
        ])
    }
}
