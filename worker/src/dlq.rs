//! The dead-letter topic: messages that cannot become ticks are copied to `<topic>.dlq` unchanged (same
//! key and payload) with headers saying why, and from where:
//!
//! | header | value |
//! |---|---|
//! | `tickfleet-reason` | short code: `malformed`, `invalid_price`, `key_mismatch`, … |
//! | `tickfleet-error` | the full error message |
//! | `tickfleet-source-topic` / `-partition` / `-offset` | where the message was |
//!
//! The lane waits for the broker's acknowledgement before moving past the message, so a dead letter is
//! never lost; a retried send may duplicate a dead letter, which is harmless for an audit log.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tickfleet_proto::DecodeError;

use crate::lane::{DeadLetterSink, Record};

/// Header names written on every dead letter.
pub mod headers {
    /// Short reason code.
    pub const REASON: &str = "tickfleet-reason";
    /// Full error text.
    pub const ERROR: &str = "tickfleet-error";
    /// Source topic.
    pub const SOURCE_TOPIC: &str = "tickfleet-source-topic";
    /// Source partition.
    pub const SOURCE_PARTITION: &str = "tickfleet-source-partition";
    /// Source offset.
    pub const SOURCE_OFFSET: &str = "tickfleet-source-offset";
}

/// A [`DeadLetterSink`] producing to a Kafka topic.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl KafkaDeadLetters {
    /// A producer on `config` (bootstrap servers and security already set) writing to `topic`.
    pub fn new(config: &ClientConfig, topic: &str) -> rdkafka::error::KafkaResult<Self> {
        let producer = config
            .clone()
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .create()?;
        Ok(KafkaDeadLetters {
            producer,
            topic: topic.to_owned(),
        })
    }
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, record: &Record, error: &DecodeError) -> Result<(), String> {
        let message = error.to_string();
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: headers::REASON,
                value: Some(error.reason()),
            })
            .insert(Header {
                key: headers::ERROR,
                value: Some(&message),
            })
            .insert(Header {
                key: headers::SOURCE_TOPIC,
                value: Some(record.topic.as_bytes()),
            })
            .insert(Header {
                key: headers::SOURCE_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: headers::SOURCE_OFFSET,
                value: Some(&offset),
            });
        let mut out = FutureRecord::to(&self.topic)
            .payload(&record.payload)
            .headers(headers);
        if let Some(key) = &record.key {
            out = out.key(key);
        }
        self.producer
            .send(out, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| format!("dead-letter topic {}: {e}", self.topic))
    }
}
