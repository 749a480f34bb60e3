//! The dead-letter topic: messages that cannot become stored ticks are copied to `<topic>.dlq` (same key
//! and payload) with headers saying why, and from where:
//!
//! | header | value |
//! |---|---|
//! | `tickfleet-reason` | short code: `malformed`, `invalid_price`, `key_mismatch`, `clock_skew`, `store_rejected`, … |
//! | `tickfleet-error` | the full error message (for `store_rejected`, the store's own) |
//! | `tickfleet-source-topic` / `-partition` / `-offset` | where the message was |
//! | `tickfleet-truncated` | only on a dead letter too large for the producer: the original payload size in bytes |
//!
//! The lane waits for the broker's acknowledgement before moving past the message, so a dead letter is
//! never lost; a retried send may duplicate a dead letter, which is harmless for an audit log.
//!
//! **Too large.** A dead letter must fit the producer's `message.max.bytes` (1,000,000 by default; set
//! with `--kafka-option`). One that does not — the `oversized` path itself, a payload larger than the
//! limit — is sent with its payload cut to fit and a `tickfleet-truncated` header; if the broker still
//! finds it too large (its own, smaller limit), the cut is halved until it fits or drops below 1 KiB.
//!
//! **Unwritable.** A missing or forbidden topic, or a message that cannot be made to fit, is a permanent
//! [`Error::DeadLetterUnwritable`]: the lane stops at that message (see [`crate::lane`]).

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tickfleet_service::LogFold;
use tickfleet_service::kafka_log::FoldedLogs;

use crate::Error;
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
    /// Present when the payload was cut to fit the producer: the original payload size in bytes.
    pub const TRUNCATED: &str = "tickfleet-truncated";
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;
/// Room left for the record's framing beyond key, payload and headers (librdkafka counts some).
const FRAMING_BYTES: usize = 512;
/// A cut below this is not worth sending: the dead letter is unwritable.
const MIN_CUT_BYTES: usize = 1024;

/// A [`DeadLetterSink`] producing to a Kafka topic.
pub struct KafkaDeadLetters {
    producer: FutureProducer<FoldedLogs>,
    topic: String,
    max_message_bytes: usize,
}

impl KafkaDeadLetters {
    /// A producer on `config` (bootstrap servers and security already set) writing to `topic`;
    /// its librdkafka log lines are folded by `logs` (shared with the consumer, so a broker that is
    /// down is one folded series of lines).
    pub fn new(
        config: &ClientConfig,
        topic: &str,
        logs: std::sync::Arc<LogFold>,
    ) -> Result<Self, Error> {
        let max_message_bytes = config
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        let producer = config
            .clone()
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .create_with_context(FoldedLogs::new(logs, "dead-letter producer"))?;
        Ok(KafkaDeadLetters {
            producer,
            topic: topic.to_owned(),
            max_message_bytes,
        })
    }
}

/// How much of a payload of `len` bytes fits in `budget` bytes beside `fixed` bytes of key and headers,
/// or `None` when all of it does.
fn payload_cut(len: usize, fixed: usize, budget: usize) -> Option<usize> {
    let room = budget.saturating_sub(fixed + FRAMING_BYTES);
    (len > room).then_some(room)
}

/// Whether a producer error means the message is too large (for the producer or for the broker).
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

/// Whether a producer error will not pass by retrying: the topic is missing, invalid or forbidden.
fn unwritable(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(
        &self,
        record: &Record,
        reason: &'static str,
        message: &str,
    ) -> Result<(), Error> {
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let base: [(&str, &str); 5] = [
            (headers::REASON, reason),
            (headers::ERROR, message),
            (headers::SOURCE_TOPIC, &*record.topic),
            (headers::SOURCE_PARTITION, partition.as_str()),
            (headers::SOURCE_OFFSET, offset.as_str()),
        ];
        let original = record.payload.len().to_string();
        let fixed = record.key.as_ref().map_or(0, Vec::len)
            + base.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + headers::TRUNCATED.len()
            + original.len();
        let mut budget = self.max_message_bytes;
        loop {
            let cut = payload_cut(record.payload.len(), fixed, budget);
            let mut hdrs = OwnedHeaders::new_with_capacity(base.len() + 1);
            for (key, value) in base {
                hdrs = hdrs.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let payload = match cut {
                Some(n) => {
                    hdrs = hdrs.insert(Header {
                        key: headers::TRUNCATED,
                        value: Some(&original),
                    });
                    &record.payload[..n]
                }
                None => &record.payload[..],
            };
            let mut out = FutureRecord::to(&self.topic).payload(payload).headers(hdrs);
            if let Some(key) = &record.key {
                out = out.key(key);
            }
            let e = match self.producer.send(out, Duration::from_secs(10)).await {
                Ok(_) => return Ok(()),
                Err((e, _)) => e,
            };
            let sent = cut.unwrap_or(record.payload.len());
            if too_large(&e) && sent / 2 >= MIN_CUT_BYTES {
                // The broker's limit is below the producer's: cut deeper.
                budget = fixed + FRAMING_BYTES + sent / 2;
                continue;
            }
            let detail = e.to_string();
            return Err(if unwritable(&e) || too_large(&e) {
                Error::DeadLetterUnwritable {
                    topic: self.topic.clone(),
                    detail,
                }
            } else {
                Error::DeadLetterUnavailable {
                    topic: self.topic.clone(),
                    detail,
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_cut_only_when_it_does_not_fit() {
        assert_eq!(payload_cut(100, 50, 1_000_000), None);
        assert_eq!(
            payload_cut(2_000_000, 300, 1_000_000),
            Some(1_000_000 - 300 - FRAMING_BYTES)
        );
        assert_eq!(payload_cut(10, 2_000, 1_000), Some(0));
    }

    #[test]
    fn producer_errors_are_classified() {
        let e = |c| KafkaError::MessageProduction(c);
        assert!(unwritable(&e(RDKafkaErrorCode::UnknownTopicOrPartition)));
        assert!(unwritable(&e(RDKafkaErrorCode::TopicAuthorizationFailed)));
        assert!(!unwritable(&e(RDKafkaErrorCode::MessageTimedOut)));
        assert!(too_large(&e(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(!too_large(&e(RDKafkaErrorCode::BrokerTransportFailure)));
    }
}
